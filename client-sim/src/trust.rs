//! How a client decides to trust the server's certificate.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// What makes a server certificate acceptable.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Certificates trusted as roots (the development certificate is its own root).
    Roots(Vec<CertificateDer<'static>>),
    /// Accept exactly the certificate with this SHA-256 (lowercase hex, as the server logs it).
    Pin(String),
    /// Accept any certificate. Only for experiments: anyone on the path can impersonate the
    /// server. Callers must warn loudly when they use it.
    InsecureAnyCertificate,
}

/// Why a trust setting could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The certificate file could not be read.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The file holds no certificate.
    #[error("{0}: no certificate found (expected DER or PEM)")]
    Empty(String),
    /// A pin is not 64 hex digits.
    #[error("a SHA-256 pin is 64 hex digits")]
    BadPin,
}

impl Trust {
    /// Trusts the certificate(s) in a DER or PEM file.
    pub fn from_cert_file(path: &Path) -> Result<Self, TrustError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| TrustError::Io(name.clone(), e))?;
        let certs: Vec<CertificateDer<'static>> = if bytes.starts_with(b"-----") {
            CertificateDer::pem_slice_iter(&bytes)
                .filter_map(Result::ok)
                .collect()
        } else {
            vec![CertificateDer::from(bytes)]
        };
        if certs.is_empty() {
            return Err(TrustError::Empty(name));
        }
        Ok(Trust::Roots(certs))
    }

    /// Trusts exactly the certificate with this SHA-256 fingerprint.
    pub fn pin(hex: &str) -> Result<Self, TrustError> {
        let hex = hex.trim().to_ascii_lowercase().replace(':', "");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TrustError::BadPin);
        }
        Ok(Trust::Pin(hex))
    }

    /// The rustls configuration: TLS 1.3, ALPN `tickshard/1`.
    pub fn rustls_config(&self) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3");
        let mut config = match self {
            Trust::Roots(certs) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs {
                    let _ = roots.add(c.clone());
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Trust::Pin(hex) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin: Some(hex.clone()),
                    provider,
                }))
                .with_no_client_auth(),
            Trust::InsecureAnyCertificate => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinVerifier {
                    pin: None,
                    provider,
                }))
                .with_no_client_auth(),
        };
        config.alpn_protocols = vec![tickshard_schema::ALPN.to_vec()];
        config
    }
}

/// Accepts the certificate whose SHA-256 matches (any, without a pin) and still checks that
/// the server holds its key (the handshake signature).
#[derive(Debug)]
struct PinVerifier {
    pin: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pin) = &self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        let got: String = Sha256::digest(end_entity.as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if &got == pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint {got} does not match the pin"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used by QUIC".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
