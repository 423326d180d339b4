//! Server configuration: what `tickshard serve` is started with.
//!
//! Every setting has a flag (`--tick-rate`), an environment variable (`TICKSHARD_TICK_RATE`)
//! and a key in the TOML file given with `--config` (`tick_rate`). [`resolve`] merges them
//! with that precedence (flag over env over file over default) and validates the result; it
//! is a pure function of its inputs, so tests exercise it without touching the process's
//! environment. Every error names the setting and where it came from.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the server needs to run. [`ServeConfig::default`] works on a laptop: loopback,
/// a development certificate under `./.tickshard`, the arena at 30 Hz, one shard per core,
/// admin HTTP on `127.0.0.1:4434`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The public UDP address.
    pub listen: SocketAddr,
    /// Number of shards (0: one per available core).
    pub shards: usize,
    /// Where the development certificate, the results files and other state live.
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
    /// Admin HTTP address; `None` (`off`) disables it.
    pub admin: Option<SocketAddr>,
    /// Bearer token the admin endpoint requires (except for probes); `None`: none.
    pub admin_token: Option<String>,
    /// How long a drain lets rooms run before closing what remains.
    pub drain_grace: Duration,
    /// Where draining clients should reconnect (sent in the drain notice; may be empty).
    pub reconnect_hint: String,
    /// Log format.
    pub log_format: LogFormat,
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
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            empty_room_grace: Duration::from_secs(10),
            // A 1200-byte QUIC packet (the minimum path MTU) carries a datagram of about 1,160
            // bytes after headers and the AEAD tag; 1,100 keeps a margin.
            max_datagram: 1100,
            stats_interval: Duration::from_secs(10),
            seed: None,
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 4434))),
            admin_token: None,
            drain_grace: Duration::from_secs(30),
            reconnect_hint: String::new(),
            log_format: LogFormat::Text,
        }
    }
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A setting is out of range.
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        /// The setting's name, as the source spells it (`--tick-rate`, `TICKSHARD_TICK_RATE`,
        /// `tick_rate in FILE`).
        setting: String,
        /// What is wrong.
        reason: String,
    },
    /// The TOML file is unreadable or names an unknown setting.
    #[error("config file {file}: {reason}")]
    File {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
}

/// Longest duration any setting accepts.
const MAX_DURATION: Duration = Duration::from_secs(86_400);

impl ServeConfig {
    /// Checks ranges; returns the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting: &str, reason: &str| {
            Err(ConfigError::Invalid {
                setting: setting.into(),
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
        for (setting, d) in [
            ("--hello-timeout", self.hello_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--empty-room-grace", self.empty_room_grace),
            ("--stats-interval", self.stats_interval),
            ("--drain-grace", self.drain_grace),
        ] {
            if d > MAX_DURATION {
                return bad(setting, "at most one day (86400 s)");
            }
        }
        if self.reconnect_hint.len() > tickshard_schema::MAX_SHORT_STRING {
            return bad("--reconnect-hint", "at most 256 bytes");
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

/// The settings, by TOML key (the flag is `--` and the key with `-` for `_`; the environment
/// variable is `TICKSHARD_` and the key in upper case), with their help.
pub const SETTINGS: &[(&str, &str)] = &[
    ("listen", "UDP address to serve on"),
    ("shards", "number of shards (0: one per available core)"),
    (
        "data_dir",
        "directory for the development certificate and results files",
    ),
    (
        "cert",
        "PEM certificate chain (with key); default: a development certificate",
    ),
    ("key", "PEM private key (with cert)"),
    ("tick_rate", "arena ticks per second"),
    ("room_capacity", "arena players per room"),
    ("max_connections", "most connections per shard"),
    ("hello_timeout", "seconds a client has to send hello"),
    ("idle_timeout", "QUIC idle timeout in seconds"),
    ("empty_room_grace", "seconds an empty room stays open"),
    (
        "max_datagram",
        "largest snapshot datagram in bytes (256..=1150)",
    ),
    (
        "seed",
        "seed for the shards' randomness; default: from the OS",
    ),
    (
        "stats_interval",
        "seconds between each shard's figures in the log (0: never)",
    ),
    ("admin", "admin HTTP address, or `off`"),
    ("admin_token", "bearer token the admin endpoint requires"),
    (
        "drain_grace",
        "seconds a drain lets rooms run before closing what remains",
    ),
    (
        "reconnect_hint",
        "where draining clients should reconnect (sent in the drain notice)",
    ),
    ("log_format", "`text` or `json`"),
];

/// The flag of a setting key.
pub fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// The environment variable of a setting key.
pub fn env_name(key: &str) -> String {
    format!("TICKSHARD_{}", key.to_uppercase())
}

/// A duration: a bare number of seconds (`30`, `2.5`: what `--print-config` writes), or
/// humantime's form (`500ms`, `10s`, `2m`, `1h 30m`).
fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("`{v}` is not a valid duration"));
    }
    humantime::parse_duration(v)
        .map_err(|e| format!("`{v}` is not a duration (seconds, or like 500ms, 10s, 2m): {e}"))
}

fn parse<T: std::str::FromStr>(v: &str, what: &str) -> Result<T, String> {
    v.trim().parse().map_err(|_| format!("`{v}` is not {what}"))
}

fn optional(v: &str) -> Option<String> {
    (!v.is_empty()).then(|| v.to_string())
}

impl ServeConfig {
    /// Sets one setting from its text form; the error says what is wrong with the value.
    pub fn set(&mut self, key: &str, v: &str) -> Result<(), String> {
        match key {
            "listen" => self.listen = parse(v, "a socket address (IP:PORT)")?,
            "shards" => self.shards = parse(v, "a number")?,
            "data_dir" => self.data_dir = PathBuf::from(v),
            "cert" => self.cert = optional(v).map(PathBuf::from),
            "key" => self.key = optional(v).map(PathBuf::from),
            "tick_rate" => self.tick_rate = parse(v, "a number of Hz (1..=1000)")?,
            "room_capacity" => self.room_capacity = parse(v, "a number")?,
            "max_connections" => self.max_connections = parse(v, "a number")?,
            "hello_timeout" => self.hello_timeout = parse_duration(v)?,
            "idle_timeout" => self.idle_timeout = parse_duration(v)?,
            "empty_room_grace" => self.empty_room_grace = parse_duration(v)?,
            "max_datagram" => self.max_datagram = parse(v, "a number of bytes")?,
            "seed" => {
                self.seed = match optional(v) {
                    None => None,
                    Some(v) => Some(parse(&v, "a number")?),
                }
            }
            "stats_interval" => self.stats_interval = parse_duration(v)?,
            "admin" => {
                self.admin = match v.trim() {
                    "off" | "" => None,
                    a => Some(parse(a, "a socket address (IP:PORT) or `off`")?),
                }
            }
            "admin_token" => self.admin_token = optional(v),
            "drain_grace" => self.drain_grace = parse_duration(v)?,
            "reconnect_hint" => self.reconnect_hint = v.to_string(),
            "log_format" => {
                self.log_format = match v.trim() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(format!("`{v}` is not `text` or `json`")),
                }
            }
            _ => return Err(format!("unknown setting `{key}`")),
        }
        Ok(())
    }

    /// The effective configuration as TOML (what `--print-config` shows; unset optional
    /// settings are left out). The admin token is left out, never printed.
    pub fn to_toml(&self) -> String {
        let mut t = toml::Table::new();
        let mut put = |k: &str, v: toml::Value| {
            t.insert(k.to_string(), v);
        };
        let secs = |d: Duration| toml::Value::Float(d.as_secs_f64());
        let text = |s: String| toml::Value::String(s);
        put("listen", text(self.listen.to_string()));
        put("shards", toml::Value::Integer(self.shards as i64));
        put("data_dir", text(self.data_dir.display().to_string()));
        if let Some(c) = &self.cert {
            put("cert", text(c.display().to_string()));
        }
        if let Some(k) = &self.key {
            put("key", text(k.display().to_string()));
        }
        put("tick_rate", toml::Value::Integer(self.tick_rate.into()));
        put(
            "room_capacity",
            toml::Value::Integer(self.room_capacity.into()),
        );
        put(
            "max_connections",
            toml::Value::Integer(self.max_connections as i64),
        );
        put("hello_timeout", secs(self.hello_timeout));
        put("idle_timeout", secs(self.idle_timeout));
        put("empty_room_grace", secs(self.empty_room_grace));
        put(
            "max_datagram",
            toml::Value::Integer(self.max_datagram as i64),
        );
        if let Some(s) = self.seed {
            // TOML integers are signed 64-bit; larger seeds are written as strings.
            put(
                "seed",
                i64::try_from(s).map_or_else(|_| text(s.to_string()), toml::Value::Integer),
            );
        }
        put("stats_interval", secs(self.stats_interval));
        put(
            "admin",
            text(self.admin.map_or("off".into(), |a| a.to_string())),
        );
        // The token is never printed (the output may be pasted or kept as a file).
        put("drain_grace", secs(self.drain_grace));
        put("reconnect_hint", text(self.reconnect_hint.clone()));
        put(
            "log_format",
            text(match self.log_format {
                LogFormat::Text => "text".into(),
                LogFormat::Json => "json".into(),
            }),
        );
        toml::to_string(&t).unwrap_or_default()
    }
}

/// Merges the sources, highest precedence first: `flags` (key and value, as given on the
/// command line), `env` (looks up an environment variable), `file` (name and TOML text of
/// the `--config` file), then the defaults; validates the result. Pure: no I/O of its own.
pub fn resolve(
    flags: &[(String, String)],
    env: &dyn Fn(&str) -> Option<String>,
    file: Option<(&str, &str)>,
) -> Result<ServeConfig, ConfigError> {
    let mut c = ServeConfig::default();
    if let Some((name, text)) = file {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::File {
            file: name.to_string(),
            reason: e.to_string(),
        })?;
        for (k, v) in &table {
            if !SETTINGS.iter().any(|(key, _)| key == k) {
                return Err(ConfigError::File {
                    file: name.to_string(),
                    reason: format!("unknown setting `{k}`"),
                });
            }
            let value = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => {
                    return Err(ConfigError::Invalid {
                        setting: format!("{k} in {name}"),
                        reason: "must be a string or a number".into(),
                    })
                }
            };
            c.set(k, &value).map_err(|reason| ConfigError::Invalid {
                setting: format!("{k} in {name}"),
                reason,
            })?;
        }
    }
    for (key, _) in SETTINGS {
        let var = env_name(key);
        // An empty variable (say, a missing Kubernetes secret) counts as unset: it must not
        // clear what the file says, such as the admin token.
        if let Some(v) = env(&var).filter(|v| !v.is_empty()) {
            c.set(key, &v).map_err(|reason| ConfigError::Invalid {
                setting: var,
                reason,
            })?;
        }
    }
    for (key, v) in flags {
        c.set(key, v).map_err(|reason| ConfigError::Invalid {
            setting: flag_name(key),
            reason,
        })?;
    }
    c.validate()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn precedence_is_flag_env_file_default() {
        let file = "tick_rate = 20\nroom_capacity = 10\nshards = 3\ndrain_grace = \"5s\"\n";
        let env = env_of(&[
            ("TICKSHARD_TICK_RATE", "40"),
            ("TICKSHARD_ROOM_CAPACITY", "12"),
        ]);
        let flags = vec![("tick_rate".to_string(), "50".to_string())];
        let c = resolve(&flags, &env, Some(("f.toml", file))).unwrap();
        assert_eq!(c.tick_rate, 50, "flag beats env and file");
        assert_eq!(c.room_capacity, 12, "env beats file");
        assert_eq!(c.shards, 3, "file beats default");
        assert_eq!(c.drain_grace, Duration::from_secs(5));
        assert_eq!(c.max_datagram, 1100, "default");
        let none = |_: &str| None;
        let c = resolve(&[], &none, None).unwrap();
        assert_eq!(c.tick_rate, 30);
        assert_eq!(c.admin, Some("127.0.0.1:4434".parse().unwrap()));
        let c = resolve(&[("admin".into(), "off".into())], &none, None).unwrap();
        assert_eq!(c.admin, None);
    }

    #[test]
    fn durations_are_seconds_or_humantime() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("30", ms(30_000)),
            ("2.5", ms(2_500)),
            ("500ms", ms(500)),
            ("10s", ms(10_000)),
            ("2m", ms(120_000)),
            ("1m 30s", ms(90_000)),
            (" 1h ", ms(3_600_000)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
        for bad in ["", "soon", "-1", "10 parsecs", "1e400"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("duration"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let none = |_: &str| None;
        let err = |flags: &[(&str, &str)], env: &dyn Fn(&str) -> Option<String>, file| {
            let flags: Vec<(String, String)> = flags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            resolve(&flags, env, file).unwrap_err().to_string()
        };
        let e = err(&[], &none, Some(("f.toml", "tick_rat = 3")));
        assert!(e.contains("f.toml") && e.contains("tick_rat"), "{e}");
        let e = err(&[], &none, Some(("f.toml", "tick_rate = \"fast\"")));
        assert!(
            e.contains("tick_rate in f.toml") && e.contains("fast"),
            "{e}"
        );
        let e = err(&[], &none, Some(("f.toml", "tick_rate = [")));
        assert!(e.contains("f.toml"), "{e}");
        let e = err(&[], &env_of(&[("TICKSHARD_LISTEN", "nowhere")]), None);
        assert!(
            e.contains("TICKSHARD_LISTEN") && e.contains("nowhere"),
            "{e}"
        );
        let e = err(&[("drain_grace", "soon")], &none, None);
        assert!(e.contains("--drain-grace"), "{e}");
        let e = err(&[("tick_rate", "0")], &none, None);
        assert!(e.contains("--tick-rate"), "{e}");
        let e = err(&[("log_format", "xml")], &none, None);
        assert!(e.contains("--log-format"), "{e}");
    }

    #[test]
    fn printed_config_reads_back_the_same() {
        let none = |_: &str| None;
        let c = resolve(
            &[
                ("seed".into(), "7".into()),
                ("reconnect_hint".into(), "eu-2.example:4433".into()),
            ],
            &none,
            None,
        )
        .unwrap();
        let text = c.to_toml();
        let back = resolve(&[], &none, Some(("printed", &text))).unwrap();
        assert_eq!(back.to_toml(), text);
        assert_eq!(back.seed, Some(7));
    }
}
