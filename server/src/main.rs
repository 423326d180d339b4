//! `tickshard`: run the game server.
//!
//! With no arguments it serves the built-in arena on `127.0.0.1:4433` with one shard per
//! core and a development certificate under `./.tickshard`.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tickshard::config::ServeConfig;
use tickshard::runtime;

/// A thread-per-core authoritative game server on QUIC.
#[derive(Parser, Debug)]
#[command(name = "tickshard", version, about)]
struct Args {
    /// UDP address to serve on.
    #[arg(long, env = "TICKSHARD_LISTEN", default_value = "127.0.0.1:4433")]
    listen: SocketAddr,
    /// Number of shards (0: one per available core).
    #[arg(long, env = "TICKSHARD_SHARDS", default_value_t = 0)]
    shards: usize,
    /// Directory for the development certificate and other state.
    #[arg(long, env = "TICKSHARD_DATA_DIR", default_value = ".tickshard")]
    data_dir: PathBuf,
    /// PEM certificate chain (with --key); default: a development certificate.
    #[arg(long, env = "TICKSHARD_CERT")]
    cert: Option<PathBuf>,
    /// PEM private key (with --cert).
    #[arg(long, env = "TICKSHARD_KEY")]
    key: Option<PathBuf>,
    /// Arena ticks per second.
    #[arg(long, env = "TICKSHARD_TICK_RATE", default_value_t = 30)]
    tick_rate: u16,
    /// Arena players per room.
    #[arg(long, env = "TICKSHARD_ROOM_CAPACITY", default_value_t = 64)]
    room_capacity: u16,
    /// Most connections per shard.
    #[arg(long, env = "TICKSHARD_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Seconds a client has to send hello.
    #[arg(long, env = "TICKSHARD_HELLO_TIMEOUT", default_value_t = 5.0)]
    hello_timeout: f64,
    /// QUIC idle timeout in seconds.
    #[arg(long, env = "TICKSHARD_IDLE_TIMEOUT", default_value_t = 10.0)]
    idle_timeout: f64,
    /// Seconds an empty room stays open.
    #[arg(long, env = "TICKSHARD_EMPTY_ROOM_GRACE", default_value_t = 10.0)]
    empty_room_grace: f64,
    /// Largest snapshot datagram in bytes (256..=1150).
    #[arg(long, env = "TICKSHARD_MAX_DATAGRAM", default_value_t = 1100)]
    max_datagram: usize,
    /// Seed for the shards' randomness (rooms, spawn points); default: from the OS.
    #[arg(long, env = "TICKSHARD_SEED")]
    seed: Option<u64>,
    /// Seconds between each shard's figures in the log (0: never).
    #[arg(long, env = "TICKSHARD_STATS_INTERVAL", default_value_t = 10.0)]
    stats_interval: f64,
}

fn secs(setting: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("invalid setting {setting}: {v} is not a duration in seconds"))
}

extern "C" fn on_signal(_: libc::c_int) {
    runtime::request_stop();
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let config = ServeConfig {
        listen: a.listen,
        shards: a.shards,
        data_dir: a.data_dir,
        cert: a.cert,
        key: a.key,
        tick_rate: a.tick_rate,
        room_capacity: a.room_capacity,
        max_connections: a.max_connections,
        hello_timeout: secs("--hello-timeout", a.hello_timeout)?,
        idle_timeout: secs("--idle-timeout", a.idle_timeout)?,
        empty_room_grace: secs("--empty-room-grace", a.empty_room_grace)?,
        stats_interval: secs("--stats-interval", a.stats_interval)?,
        max_datagram: a.max_datagram,
        seed: a.seed,
    };
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    runtime::serve(config, |s| {
        tracing::info!(
            addrs = ?s.addrs,
            steering = ?s.steering,
            cert = %s.cert_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            sha256 = %s.fingerprint,
            "tls certificate"
        );
        // One machine-readable line for scripts and tests.
        println!(
            "tickshard listening on {} shards={} steering={:?} sha256={}",
            s.addrs[0],
            s.addrs.len(),
            s.steering,
            s.fingerprint
        );
    })
    .context("tickshard failed to start")?;
    Ok(())
}
