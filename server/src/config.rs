//! Server configuration: what `tickshard` is started with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the server needs to run. [`ServeConfig::default`] works on a laptop: loopback,
/// a development certificate under `./.tickshard`, the arena at 30 Hz, one shard per core.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The public UDP address.
    pub listen: SocketAddr,
    /// Number of shards (0: one per available core).
    pub shards: usize,
    /// Where the development certificate and other state live.
    pub data_dir: PathBuf,
    /// PEM certificate chain; with `key`, replaces the development certificate.
    pub cert: Option<PathBuf>,
    /// PEM private key.
    pub key: Option<PathBuf>,
    /// Arena tick rate (Hz).
    pub tick_rate: u16,
    /// Arena room capacity.
    pub room_capacity: u16,
    /// Most connections per shard.
    pub max_connections: usize,
    /// A client must send hello this soon after connecting.
    pub hello_timeout: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// An empty room closes after this long.
    pub empty_room_grace: Duration,
    /// Largest snapshot datagram in bytes.
    pub max_datagram: usize,
    /// How often each shard logs its figures (zero: never).
    pub stats_interval: Duration,
    /// Seed for shard randomness (tests); `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: "127.0.0.1:4433".parse().expect("static address"),
            shards: 0,
            data_dir: PathBuf::from(".tickshard"),
            cert: None,
            key: None,
            tick_rate: 30,
            room_capacity: 64,
            max_connections: 10_000,
            hello_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            empty_room_grace: Duration::from_secs(10),
            // A 1200-byte QUIC packet (the minimum path MTU) carries a datagram of about 1,160
            // bytes after headers and the AEAD tag; 1,100 keeps a margin.
            max_datagram: 1100,
            stats_interval: Duration::from_secs(10),
            seed: None,
        }
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting is out of range.
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        /// The setting's name (as a flag).
        setting: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl ServeConfig {
    /// Checks ranges; returns the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting, reason: &str| {
            Err(ConfigError::Invalid {
                setting,
                reason: reason.into(),
            })
        };
        if !(1..=1000).contains(&self.tick_rate) {
            return bad("--tick-rate", "must be 1..=1000 Hz");
        }
        if !(1..=1024).contains(&self.room_capacity) {
            return bad("--room-capacity", "must be 1..=1024");
        }
        if self.shards > 255 {
            return bad(
                "--shards",
                "at most 255 (one connection-ID byte names the shard)",
            );
        }
        if self.cert.is_some() != self.key.is_some() {
            return bad("--cert/--key", "give both or neither");
        }
        if !(256..=1150).contains(&self.max_datagram) {
            return bad(
                "--max-datagram",
                "must be 256..=1150 bytes (a datagram must fit a 1200-byte QUIC packet)",
            );
        }
        if self.max_connections == 0 {
            return bad("--max-connections", "must be at least 1");
        }
        Ok(())
    }

    /// Shards to run: the configured number, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(255)
        }
    }
}
