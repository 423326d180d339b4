//! TLS for QUIC: the server certificate and the quinn-proto server configuration.
//!
//! With no certificate configured, the server makes a self-signed development certificate
//! for `localhost` and `127.0.0.1` (ECDSA P-256, which every TLS 1.3 stack accepts), stores
//! it under the data directory as `dev-cert.der`, `dev-cert.pem` and `dev-key.pem`, and
//! reuses it on later starts so clients that pinned it keep working. Its SHA-256
//! fingerprint is logged at start.

use quinn_proto::crypto::rustls::QuicServerConfig;
use quinn_proto::{AckFrequencyConfig, ServerConfig, TransportConfig, VarInt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the leaf certificate is stored, if on disk.
    pub cert_path: Option<PathBuf>,
}

/// Why the TLS identity could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a certificate or key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A PEM file held no certificate or no key.
    #[error("{0}: no usable certificate or private key found")]
    Empty(PathBuf),
    /// A PEM file is not well-formed.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: rustls::pki_types::pem::Error,
    },
    /// Generating the development certificate failed.
    #[error("generating the development certificate: {0}")]
    Generate(String),
    /// rustls refused the certificate or key.
    #[error("tls configuration: {0}")]
    Config(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Identity {
    /// Loads a PEM certificate chain and PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = std::fs::read(cert).map_err(io(cert))?;
        let pem = |path: &Path| {
            let path = path.to_owned();
            move |source| TlsError::Pem { path, source }
        };
        let chain: Vec<_> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .map_err(pem(cert))?;
        if chain.is_empty() {
            return Err(TlsError::Empty(cert.to_owned()));
        }
        let key_pem = std::fs::read(key).map_err(io(key))?;
        let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty(key.to_owned()),
            e => pem(key)(e),
        })?;
        Ok(Identity {
            chain,
            key: key_der,
            cert_path: Some(cert.to_owned()),
        })
    }

    /// Loads the development certificate from `data_dir`, creating it on first use.
    pub fn development(data_dir: &Path) -> Result<Self, TlsError> {
        let cert_pem = data_dir.join("dev-cert.pem");
        let key_pem = data_dir.join("dev-key.pem");
        let der_path = data_dir.join("dev-cert.der");
        if cert_pem.exists() && key_pem.exists() {
            let id = Self::load(&cert_pem, &key_pem)?;
            // Clients are told to trust the DER file: put it back if it went missing.
            if !der_path.exists() {
                std::fs::write(&der_path, id.chain[0].as_ref()).map_err(io(&der_path))?;
            }
            return Ok(id);
        }
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let generated = Self::generate()?;
        let cert = &generated.chain[0];
        let cert_text = pem_encode("CERTIFICATE", cert.as_ref());
        let key_text = pem_encode("PRIVATE KEY", generated.key.secret_der());
        std::fs::write(&der_path, cert.as_ref()).map_err(io(&der_path))?;
        std::fs::write(&cert_pem, cert_text).map_err(io(&cert_pem))?;
        write_private(&key_pem, key_text.as_bytes())?;
        Ok(Identity {
            cert_path: Some(cert_pem),
            ..generated
        })
    }

    /// A fresh in-memory development certificate (nothing written).
    pub fn generate() -> Result<Self, TlsError> {
        let names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        let ck = rcgen::generate_simple_self_signed(names)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
        Ok(Identity {
            chain: vec![ck.cert.der().clone()],
            key,
            cert_path: None,
        })
    }

    /// SHA-256 of the leaf certificate, as lowercase hex: what a client pins.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }
}

/// SHA-256 of a DER certificate as lowercase hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a file only its owner can read (a private key).
/// Length of the stateless-reset key.
pub const RESET_KEY_LEN: usize = 32;

/// The key every shard signs stateless resets with, kept in `data_dir/reset-key` (created
/// with mode 0600 at the first start) so that it outlives the process: after a crash and a
/// restart, a client still connected to the old process gets a stateless reset at its next
/// packet and knows at once, instead of waiting for its idle timeout.
pub fn stateless_reset_key(data_dir: &Path) -> Result<[u8; RESET_KEY_LEN], TlsError> {
    let path = data_dir.join("reset-key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            return bytes.try_into().map_err(|_| TlsError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "a reset key is {RESET_KEY_LEN} bytes; delete the file to make a new one"
                    ),
                ),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(TlsError::Io { path, source: e }),
    }
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let mut key = [0u8; RESET_KEY_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    write_private(&path, &key)?;
    Ok(key)
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= n {
                b64.push(B64[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// QUIC transport settings shared by every shard.
#[derive(Debug, Clone, Copy)]
pub struct TransportSettings {
    /// Close a connection after this long without hearing from the peer.
    pub idle_timeout: Duration,
    /// The game's tick period (the longest, when modes differ): the server sends each seated
    /// client a packet every period, so acknowledgements can wait that long and ride on it.
    pub tick_period: Duration,
}

/// quinn's ACK frequency settings for a client the server sends to every `tick_period`: the
/// client may hold an acknowledgement for [`tickshard_schema::ack_delay_for`], even on a path
/// whose RTT is shorter (the vendored quinn-proto's `max_ack_delay_above_rtt`; stock quinn
/// asks at most the RTT or 25 ms), and acknowledges at once after 4 unacknowledged packets or a
/// reordering that would show a loss (quinn's defaults: 2, and 3).
pub fn ack_frequency(tick_period: Duration) -> AckFrequencyConfig {
    let mut c = AckFrequencyConfig::default();
    c.max_ack_delay(Some(tickshard_schema::ack_delay_for(tick_period)))
        .ack_eliciting_threshold(VarInt::from_u32(tickshard_schema::ACK_ELICITING_THRESHOLD))
        .max_ack_delay_above_rtt(true);
    c
}

/// Builds the quinn-proto server configuration: TLS 1.3 with ALPN `tickshard/1`, one
/// bidirectional stream per client (the control stream), no unidirectional streams, datagrams on.
pub fn server_config(
    identity: &Identity,
    settings: TransportSettings,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![tickshard_schema::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(
            settings
                .idle_timeout
                .try_into()
                .map_err(|_| TlsError::Config("idle timeout too large".into()))?,
        ))
        .datagram_receive_buffer_size(Some(64 * 1024))
        .datagram_send_buffer_size(64 * 1024)
        // Game traffic is paced by the tick; one connection never needs a large window.
        .stream_receive_window(VarInt::from_u32(64 * 1024))
        .receive_window(VarInt::from_u32(256 * 1024))
        .send_window(256 * 1024)
        .ack_frequency_config(Some(ack_frequency(settings.tick_period)))
        // Two connection IDs (one in use, one to move to on a migration) rather than the
        // client's limit: each costs memory in the connection and in the routing table
        // (vendored quinn-proto, PATCHES.md change 7).
        .max_issued_connection_ids(2);
    config.transport_config(Arc::new(transport));
    config.migration(true);
    // A shard holds thousands of connections: rustls's handshake state (about 4 KB each) is
    // freed once the handshake is confirmed (vendored quinn-proto, PATCHES.md change 3).
    config.release_tls_after_handshake(true);
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reset key is made once, private, and read back the same; a file of the wrong size
    /// is refused naming the file, not replaced (clients of the last process rely on it).
    #[test]
    fn reset_key_is_stored_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tickshard-reset-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = stateless_reset_key(&dir).unwrap();
        assert_eq!(stateless_reset_key(&dir).unwrap(), a);
        let file = dir.join("reset-key");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
        std::fs::write(&file, b"short").unwrap();
        let e = stateless_reset_key(&dir).unwrap_err().to_string();
        assert!(e.contains("reset-key") && e.contains("32 bytes"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"short");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn development_certificate_is_stored_and_reused() {
        let dir = std::env::temp_dir().join(format!("tickshard-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Identity::development(&dir).unwrap();
        assert!(dir.join("dev-cert.der").exists());
        std::fs::remove_file(dir.join("dev-cert.der")).unwrap();
        let b = Identity::development(&dir).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(
            dir.join("dev-cert.der").exists(),
            "the DER file is restored"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("dev-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
        assert_eq!(a.fingerprint().len(), 64);
        server_config(
            &b,
            TransportSettings {
                idle_timeout: Duration::from_secs(10),
                tick_period: Duration::from_millis(33),
            },
        )
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
