//! Helpers for end-to-end tests: start the `tickshard` binary on a free loopback port, and a
//! game client built on stock `quinn` (tokio).

#![allow(dead_code)]

pub mod contention;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tickshard_schema::{ControlMsg, FrameDecoder};

/// Path of a workspace binary, built on first use. Cargo builds the binaries of other
/// workspace packages only for their own tests, so the end-to-end tests build `tickshard`
/// themselves (once per test process; only the binary is left to link).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let release = dir.file_name().is_some_and(|d| d == "release");
    build(name, release)
}

/// Path of a workspace binary built with the release profile (swarm tests: a debug build of
/// the swarm or the server measures the compiler's debug code, not the product).
pub fn release_binary(name: &str) -> PathBuf {
    build(name, true)
}

fn build(name: &str, release: bool) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<(String, bool)>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/
    let target = exe.parent().unwrap().parent().unwrap().parent().unwrap();
    let path = target
        .join(if release { "release" } else { "debug" })
        .join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|(b, r)| b == name && *r == release) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bin", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // The server as these tests were built to test it: with its Agones plug-in when they
        // were (`--features agones`), so tests/fleet.rs talks to a server that has it.
        if cfg!(feature = "agones") && name == "tickshard" {
            cmd.args(["--features", "tickshard/agones"]);
        }
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
        built.push((name.to_string(), release));
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A running server process, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub fingerprint: String,
    /// The admin HTTP address (tests bind it on a free loopback port), if enabled.
    pub admin: Option<SocketAddr>,
    /// The probe-only HTTP address, if enabled (`--probe`).
    pub probe: Option<SocketAddr>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl Server {
    /// Starts `tickshard` with `args` on 127.0.0.1, ports (game and admin) chosen by the OS.
    pub fn start(name: &str, args: &[&str]) -> Server {
        Self::start_binary(binary("tickshard"), name, args)
    }

    /// Like [`Server::start`], with the release build of the server.
    pub fn start_release(name: &str, args: &[&str]) -> Server {
        Self::start_binary(release_binary("tickshard"), name, args)
    }

    /// Like [`Server::start`], with extra environment variables.
    pub fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn(binary("tickshard"), name, args, env)
    }

    fn start_binary(exe: PathBuf, name: &str, args: &[&str]) -> Server {
        Self::spawn(exe, name, args, &[])
    }

    /// Like [`Server::start_release`], with the server's log (stderr) sent line by line to the
    /// returned channel. `TICKSHARD_TEST_BIN` names another `tickshard` binary to run instead
    /// (to check that a test fails on an older build).
    pub fn start_logged(name: &str, args: &[&str]) -> (Server, std::sync::mpsc::Receiver<String>) {
        let exe = std::env::var_os("TICKSHARD_TEST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| release_binary("tickshard"));
        let mut server = Self::spawn_with(exe, name, args, &[("RUST_LOG", "info")], Stdio::piped());
        let stderr = server.child.stderr.take().expect("stderr piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (server, rx)
    }

    /// Kills the server (SIGKILL, a crash), waits `pause`, and starts `exe` again on the same
    /// address and data directory with `args` (admin off); returns it once it prints its
    /// first line.
    pub fn crash_and_restart(
        &mut self,
        exe: PathBuf,
        pause: std::time::Duration,
        args: &[&str],
    ) -> std::process::Child {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        std::thread::sleep(pause);
        let mut again = Command::new(exe)
            .args(["--listen", &self.addr.to_string()])
            .args(args)
            .args(["--admin", "off", "--data-dir"])
            .arg(&self.data_dir)
            .env("RUST_LOG", "warn")
            .env_remove("AGONES_SDK_GRPC_PORT")
            .stdout(Stdio::piped())
            .spawn()
            .expect("restart tickshard");
        let mut line = String::new();
        BufReader::new(again.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("tickshard listening"), "{line}");
        again
    }

    fn spawn(exe: PathBuf, name: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn_with(exe, name, args, env, Stdio::inherit())
    }

    fn spawn_with(
        exe: PathBuf,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> Server {
        let data_dir =
            std::env::temp_dir().join(format!("tickshard-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut child = Command::new(exe)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(
                (!args.contains(&"--admin"))
                    .then_some(["--admin", "127.0.0.1:0"])
                    .into_iter()
                    .flatten(),
            )
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // Agones is on only where a test asks for it.
            .env_remove("AGONES_SDK_GRPC_PORT")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start tickshard");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read tickshard stdout");
        // "tickshard listening on ADDR shards=N steering=S admin=A probe=P sha256=HEX"
        let mut words = line.split_whitespace();
        let addr = words
            .nth(3)
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .parse()
            .unwrap();
        let fingerprint = line.split("sha256=").nth(1).unwrap().trim().to_string();
        let admin = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .and_then(|a| a.parse().ok());
        let probe = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("probe="))
            .and_then(|a| a.parse().ok());
        Server {
            child,
            addr,
            data_dir,
            fingerprint,
            admin,
            probe,
        }
    }

    pub fn cert_der(&self) -> Vec<u8> {
        std::fs::read(self.data_dir.join("dev-cert.der")).unwrap()
    }
}

/// A client on stock quinn: QUIC connection, control stream, datagrams.
pub struct QuinnClient {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    frames: FrameDecoder,
    fbb: flatbuffers::FlatBufferBuilder<'static>,
    _endpoint: quinn::Endpoint,
}

pub fn quinn_client_config(cert_der: &[u8]) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"tickshard/1".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(2)));
    config.transport_config(Arc::new(transport));
    config
}

impl QuinnClient {
    pub async fn connect(server: &Server) -> QuinnClient {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn_client_config(&server.cert_der()));
        let conn = endpoint
            .connect(server.addr, "localhost")
            .unwrap()
            .await
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.unwrap();
        QuinnClient {
            conn,
            send,
            recv,
            frames: FrameDecoder::default(),
            fbb: flatbuffers::FlatBufferBuilder::new(),
            _endpoint: endpoint,
        }
    }

    pub async fn send(&mut self, msg: &ControlMsg) {
        let mut out = Vec::new();
        msg.write_frame(&mut self.fbb, &mut out);
        self.send.write_all(&out).await.unwrap();
    }

    /// The next control message, within `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<ControlMsg> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(f) = self.frames.next_frame().expect("server frames are valid") {
                return Some(ControlMsg::decode(f).expect("server messages verify"));
            }
            let mut buf = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.recv.read(&mut buf)).await {
                Ok(Ok(Some(n))) => self.frames.push(&buf[..n]),
                _ => return None,
            }
        }
    }

    /// Receives control messages until one matches.
    pub async fn recv_until(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&ControlMsg) -> bool,
    ) -> ControlMsg {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let m = self
                .recv(left)
                .await
                .expect("expected control message did not arrive");
            if f(&m) {
                return m;
            }
        }
    }

    /// Hello, then welcome. Returns (player id, shard).
    pub async fn hello(&mut self) -> (u64, u16) {
        self.send(&ControlMsg::Hello {
            protocol_version: tickshard_schema::PROTOCOL_VERSION,
            token: String::new(),
            client_name: "e2e".into(),
        })
        .await;
        match self.recv(Duration::from_secs(5)).await {
            Some(ControlMsg::Welcome {
                player_id, shard, ..
            }) => (player_id, shard),
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Join (room id or quick match) and wait for joined. Returns (room id, shard, entity id).
    pub async fn join(&mut self, room_id: u64) -> (u64, u16, u32) {
        self.send(&ControlMsg::Join {
            room_id,
            mode: "arena".into(),
        })
        .await;
        match self
            .recv_until(Duration::from_secs(5), |m| {
                !matches!(m, ControlMsg::GameEvent { .. } | ControlMsg::Chat { .. })
            })
            .await
        {
            ControlMsg::Joined {
                room_id,
                shard,
                entity_id,
                ..
            } => (room_id, shard, entity_id),
            other => panic!("expected joined, got {other:?}"),
        }
    }
}

/// One input datagram with a single command (no redundancy, no acknowledgement: the server
/// then sends full snapshots, which keeps this test client simple).
pub fn input_datagram(seq: u32, move_x: i8, move_y: i8) -> bytes::Bytes {
    let mut d = tickshard_schema::InputDatagram {
        seq,
        client_tick: seq,
        ack_snapshot: 0,
        len: 1,
        ..Default::default()
    };
    d.cmds[0] = tickshard_schema::InputCmd::new(seq, move_x, move_y, 0, 0, 0);
    bytes::Bytes::copy_from_slice(d.encode().bytes())
}

/// What a test client saw in one full snapshot.
#[derive(Debug, Clone)]
pub struct Seen {
    pub tick: u32,
    pub last_input: u32,
    /// (entity id, x, y) in world units.
    pub entities: Vec<(u32, f32, f32)>,
}

impl QuinnClient {
    /// Plays for `dur`: sends one input per 1/30 s from `steer(own position)` and collects
    /// every snapshot. `entity` is the client's own entity.
    pub async fn play(
        &mut self,
        dur: Duration,
        entity: u32,
        mut steer: impl FnMut(Option<(f32, f32)>) -> (i8, i8),
        seq: &mut u32,
    ) -> Vec<Seen> {
        let mut seen = Vec::new();
        let start = tokio::time::Instant::now();
        let mut next = start;
        let mut own: Option<(f32, f32)> = None;
        while start.elapsed() < dur {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    next += Duration::from_secs(1) / 30;
                    *seq += 1;
                    let (x, y) = steer(own);
                    self.conn.send_datagram(input_datagram(*seq, x, y)).unwrap();
                }
                d = self.conn.read_datagram() => {
                    let d = d.expect("connection stays up");
                    let s = tickshard_schema::decode_snapshot(&d).expect("snapshots verify");
                    assert_eq!(s.baseline(), 0, "without acknowledgements every snapshot is full");
                    let mut state = Vec::new();
                    tickshard_schema::changes::apply_changes(s.changes().unwrap().bytes(), &mut state).expect("changes decode");
                    let entities: Vec<(u32, f32, f32)> = state.iter().map(|e| (e.id(), e.x() as f32 / 16.0, e.y() as f32 / 16.0)).collect();
                    if let Some(&(_, x, y)) = entities.iter().find(|e| e.0 == entity) {
                        own = Some((x, y));
                    }
                    seen.push(Seen { tick: s.tick(), last_input: s.last_input(), entities });
                }
            }
        }
        seen
    }
}

/// Direction (as an input) from `from` toward `to`, or still when within a step.
pub fn toward(from: (f32, f32), to: (f32, f32)) -> (i8, i8) {
    let (dx, dy) = (to.0 - from.0, to.1 - from.1);
    let len = (dx * dx + dy * dy).sqrt();
    if len < 6.0 {
        return (0, 0);
    }
    ((dx / len * 127.0) as i8, (dy / len * 127.0) as i8)
}
