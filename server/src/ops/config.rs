//! Server configuration: what `tickshard serve` is started with.
//!
//! (About 850 lines, 240 of them tests: each setting is declared, layered and checked here,
//! in one place, so that it is written once.)
//!
//! Every setting is declared once, as a field of [`ServeConfig`]: its doc comment is the
//! flag's help, its name gives the flag (`--tick-rate`), the environment variable
//! (`TICKSHARD_TICK_RATE`) and the key in the TOML file given with `--config` (`tick_rate`),
//! and its serde attributes say how its value is read and printed. [`resolve`] layers the
//! sources with figment (flag over env over file over [`ServeConfig::default`]) and validates
//! the result; it is a pure function of its inputs, so tests exercise it without touching the
//! process's environment. Every error names the setting as its source spells it.
//!
//! Durations are a bare number of seconds (`30`, `2.5`: what `--print-config` writes) or
//! humantime's form (`500ms`, `10s`, `2m`, `1h 30m`).

use figment::providers::Format;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything the server needs to run. [`ServeConfig::default`] works on a laptop: loopback,
/// a development certificate under `./.tickshard`, the arena at 30 Hz, one shard per core,
/// admin HTTP on `127.0.0.1:4434`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// UDP address to serve on [default: 127.0.0.1:4433].
    #[arg(long)]
    #[serde(with = "address")]
    pub listen: SocketAddr,
    /// Number of shards (0: one per available core) [default: 0].
    #[arg(long)]
    #[serde(deserialize_with = "number")]
    pub shards: usize,
    /// Directory for the development certificate and results files [default: .tickshard].
    #[arg(long)]
    #[serde(deserialize_with = "text")]
    pub data_dir: PathBuf,
    /// PEM certificate chain (with --key); default: a development certificate.
    #[arg(long)]
    #[serde(
        deserialize_with = "optional_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub cert: Option<PathBuf>,
    /// PEM private key (with --cert).
    #[arg(long)]
    #[serde(
        deserialize_with = "optional_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub key: Option<PathBuf>,
    /// Arena ticks per second, 1..=1000 [default: 30].
    #[arg(long)]
    #[serde(deserialize_with = "number")]
    pub tick_rate: u16,
    /// Arena players per room, 1..=1024 [default: 64].
    #[arg(long)]
    #[serde(deserialize_with = "number")]
    pub room_capacity: u16,
    /// Most welcomed players per shard [default: 10000].
    #[arg(long)]
    #[serde(deserialize_with = "number")]
    pub max_connections: usize,
    /// Most sessions one IP address may hold per shard, 0 for no cap [default: 256].
    #[arg(long)]
    #[serde(deserialize_with = "number")]
    pub max_per_address: usize,
    /// Most sessions not yet welcomed (handshaking or before Hello) per shard [default: 256].
    #[arg(long)]
    #[serde(deserialize_with = "number")]
    pub max_handshakes: usize,
    /// Sessions not yet welcomed per shard from which on new clients must answer a QUIC Retry
    /// (address validation) first; 0: always [default: 32].
    #[arg(long)]
    #[serde(deserialize_with = "number")]
    pub retry_above: usize,
    /// Handshakes one IP address may start per second per shard, with a burst of twice that;
    /// 0 for no limit [default: 100].
    #[arg(long)]
    #[serde(deserialize_with = "number")]
    pub handshakes_per_second: u32,
    /// How long a client has to send hello after connecting [default: 10].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "seconds")]
    pub hello_timeout: Duration,
    /// How long a welcomed client may stay in no room before it is closed (LOBBY_TIMEOUT), 0:
    /// never [default: 120].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "seconds")]
    pub lobby_timeout: Duration,
    /// QUIC idle timeout [default: 10].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "seconds")]
    pub idle_timeout: Duration,
    /// How long an empty room stays open [default: 10].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "seconds")]
    pub empty_room_grace: Duration,
    /// Largest snapshot datagram in bytes, 256..=1150 [default: 1100].
    #[arg(long)]
    #[serde(deserialize_with = "number")]
    pub max_datagram: usize,
    /// How often each shard logs its figures, 0: never [default: 10].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "seconds")]
    pub stats_interval: Duration,
    /// Seed for the shards' randomness (tests); default: from the OS.
    #[arg(long)]
    #[serde(with = "seed", skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Admin HTTP address, or `off` [default: 127.0.0.1:4434].
    #[arg(long)]
    #[serde(with = "admin_address")]
    pub admin: Option<SocketAddr>,
    /// Probe-only HTTP address (`/healthz`, `/readyz`, no token, capacity of its own), or
    /// `off` [default: off]. For orchestrators' probes where many hosts reach the admin port.
    #[arg(long)]
    #[serde(with = "admin_address")]
    pub probe: Option<SocketAddr>,
    /// Bearer token the admin endpoint requires (except /healthz and /readyz). Never printed.
    #[arg(long)]
    #[serde(deserialize_with = "optional_text", skip_serializing)]
    pub admin_token: Option<String>,
    /// File whose first line is the admin bearer token (a mounted secret), instead of
    /// --admin-token.
    #[arg(long)]
    #[serde(
        deserialize_with = "optional_text",
        skip_serializing_if = "Option::is_none"
    )]
    pub admin_token_file: Option<PathBuf>,
    /// How long a drain (SIGTERM, POST /drain) lets rooms run before closing what remains
    /// [default: 30].
    #[arg(long, value_parser = parse_duration)]
    #[serde(with = "seconds")]
    pub drain_grace: Duration,
    /// Where draining clients should reconnect (sent in the drain notice; may be empty).
    #[arg(long)]
    #[serde(deserialize_with = "text")]
    pub reconnect_hint: String,
    /// Log format: `text` or `json` [default: text]. Filter with RUST_LOG.
    #[arg(long)]
    pub log_format: LogFormat,
    /// Game modes offered, comma-separated [default: arena]. `faulty-arena` panics on demand
    /// (button bit 7), for failure-isolation tests only.
    #[arg(long)]
    #[serde(deserialize_with = "text")]
    pub modes: String,
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
            max_per_address: crate::shard::Admission::default().max_per_address,
            max_handshakes: crate::shard::Admission::default().max_handshakes,
            retry_above: crate::shard::Admission::default().retry_above,
            handshakes_per_second: crate::shard::Admission::default().handshakes_per_second,
            hello_timeout: Duration::from_secs(10),
            lobby_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(10),
            empty_room_grace: Duration::from_secs(10),
            // A 1200-byte QUIC packet (the minimum path MTU) carries a datagram of about 1,160
            // bytes after headers and the AEAD tag; 1,100 keeps a margin.
            max_datagram: 1100,
            stats_interval: Duration::from_secs(10),
            seed: None,
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 4434))),
            probe: None,
            admin_token: None,
            admin_token_file: None,
            drain_grace: Duration::from_secs(30),
            reconnect_hint: String::new(),
            modes: "arena".into(),
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
        /// The setting's flag (`--tick-rate`).
        setting: String,
        /// What is wrong.
        reason: String,
    },
    /// A source could not be read: a value of the wrong form, an unknown setting, a file
    /// that is not TOML. The text names the setting as its source spells it (`--tick-rate`,
    /// `TICKSHARD_TICK_RATE`, `tick_rate` in the file) and the source.
    #[error("{0}")]
    Source(String),
}

/// Longest duration any setting accepts.
const MAX_DURATION: Duration = Duration::from_secs(86_400);

impl ServeConfig {
    /// The names in [`ServeConfig::modes`], trimmed, empty ones left out.
    pub fn mode_names(&self) -> Vec<&str> {
        self.modes
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .collect()
    }

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
        if self.admin_token.is_some() && self.admin_token_file.is_some() {
            return bad("--admin-token/--admin-token-file", "give one or the other");
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
            ("--lobby-timeout", self.lobby_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--empty-room-grace", self.empty_room_grace),
            ("--stats-interval", self.stats_interval),
            ("--drain-grace", self.drain_grace),
        ] {
            if d > MAX_DURATION {
                return bad(setting, "at most one day (86400 s)");
            }
        }
        if self.mode_names().is_empty() {
            return bad("--modes", "name at least one mode");
        }
        if let Err(e) = crate::modes(&self.mode_names(), self.room_capacity, self.tick_rate) {
            return bad("--modes", &e);
        }
        if self.reconnect_hint.len() > tickshard_schema::MAX_SHORT_STRING {
            return bad("--reconnect-hint", "at most 256 bytes");
        }
        Ok(())
    }

    /// The admin bearer token: `admin_token`, or the first line of `admin_token_file` (read
    /// now). `None`: the admin endpoint asks for no token.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.admin_token_file else {
            return Ok(self.admin_token.clone());
        };
        let invalid = |reason: String| ConfigError::Invalid {
            setting: "--admin-token-file".into(),
            reason,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("reading {}: {e}", path.display())))?;
        match text.lines().next().map(str::trim) {
            Some(t) if !t.is_empty() => Ok(Some(t.to_string())),
            _ => Err(invalid(format!("{} holds no token", path.display()))),
        }
    }

    /// A warning for operators when the admin endpoint (which can drain the server and kick
    /// players) listens beyond loopback and asks for no token.
    pub fn exposure_warning(&self) -> Option<String> {
        let addr = self.admin?;
        let open = self.admin_token.is_none() && self.admin_token_file.is_none();
        (open && !addr.ip().is_loopback()).then(|| {
            format!(
                "the admin endpoint on {addr} accepts anyone who can reach it (it can drain the \
                 server and kick players): set --admin-token or --admin-token-file"
            )
        })
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

/// Every setting's key (the field names of [`ServeConfig`], from its flags).
pub fn setting_keys() -> Vec<String> {
    use clap::Args;
    ServeConfig::augment_args(clap::Command::new("tickshard"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect()
}

/// The flag of a setting key.
pub fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// The environment variable of a setting key.
pub fn env_name(key: &str) -> String {
    format!("TICKSHARD_{}", key.to_uppercase())
}

/// The command-line flags of every setting, for `serve`'s command line: each takes one value
/// and none is required; [`ServeConfig`]'s doc comments are their help.
pub fn setting_args(cmd: clap::Command) -> clap::Command {
    use clap::Args;
    let settings = ServeConfig::augment_args(clap::Command::new("settings")).mut_args(|a| {
        a.required(false)
            .value_parser(clap::builder::NonEmptyStringValueParser::new())
            .help_heading("Settings (each also TICKSHARD_<NAME> and <name> in --config)")
    });
    cmd.args(settings.get_arguments().cloned())
}

/// The settings given on a command line that [`setting_args`] defined, as (key, value).
pub fn given_settings(matches: &clap::ArgMatches) -> Vec<(String, String)> {
    setting_keys()
        .into_iter()
        .filter_map(|k| {
            let v = matches.try_get_one::<String>(&k).ok()??.clone();
            Some((k, v))
        })
        .collect()
}

/// A layer of settings given as text (flags, environment variables), each value kept as
/// the text it is (each field reads its own form: `number`, `text`, `seconds`, ...), named
/// in errors by `name_of(key)`.
struct TextLayer {
    values: Vec<(String, String)>,
    source: &'static str,
    name_of: fn(&str) -> String,
}

impl Provider for TextLayer {
    fn metadata(&self) -> Metadata {
        let name_of = self.name_of;
        Metadata::named(self.source)
            .interpolater(move |_: &Profile, keys: &[&str]| name_of(&keys.join(".")))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (k, v) in &self.values {
            dict.insert(k.clone(), Value::from(v.clone()));
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// The `--config` file's layer, named by its path in errors.
struct FileLayer<'a> {
    name: &'a str,
    text: &'a str,
}

impl Provider for FileLayer<'_> {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("config file {}", self.name))
            .interpolater(|_: &Profile, keys: &[&str]| keys.join("."))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        figment::providers::Toml::string(self.text).data()
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
    let mut figment = Figment::from(figment::providers::Serialized::defaults(
        ServeConfig::default(),
    ));
    if let Some((name, text)) = file {
        figment = figment.merge(FileLayer { name, text });
    }
    // An empty variable (say, a missing Kubernetes secret) counts as unset: it must not
    // clear what the file says, such as the admin token.
    let vars = setting_keys()
        .into_iter()
        .filter_map(|k| Some((k.clone(), env(&env_name(&k)).filter(|v| !v.is_empty())?)))
        .collect();
    figment = figment
        .merge(TextLayer {
            values: vars,
            source: "the environment",
            name_of: env_name,
        })
        .merge(TextLayer {
            values: flags.to_vec(),
            source: "the command line",
            name_of: flag_name,
        });
    let c: ServeConfig = figment
        .extract()
        .map_err(|e| ConfigError::Source(e.to_string()))?;
    c.validate()?;
    Ok(c)
}

impl ServeConfig {
    /// The effective configuration as TOML (what `--print-config` shows; unset optional
    /// settings are left out). The admin token is left out, never printed.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// Reads a scalar as text: a value that looks like a number (`--reconnect-hint 1234`) is
/// still the text the user wrote.
fn text<'de, D: Deserializer<'de>, T: From<String>>(d: D) -> Result<T, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("text")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Text).map(T::from)
}

/// A number, from a number (TOML) or its text (flags, environment).
fn number<'de, D: Deserializer<'de>, T: std::str::FromStr>(d: D) -> Result<T, D::Error> {
    let v: String = text(d)?;
    v.trim()
        .parse()
        .map_err(|_| serde::de::Error::custom(format!("`{v}` is not a number in range")))
}

/// [`text`], with the empty text meaning none.
fn optional_text<'de, D: Deserializer<'de>, T: From<String>>(d: D) -> Result<Option<T>, D::Error> {
    let s: String = text(d)?;
    Ok((!s.is_empty()).then(|| T::from(s)))
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

/// Durations, written as seconds.
mod seconds {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v: String = text(d)?;
        parse_duration(&v).map_err(serde::de::Error::custom)
    }
}

/// The seed: an integer, or a string for seeds above TOML's signed 64-bit integers.
mod seed {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v.map(i64::try_from) {
            Some(Ok(i)) => s.serialize_i64(i),
            Some(Err(_)) => s.serialize_str(&v.unwrap_or_default().to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let v: String = text(d)?;
        match v.trim() {
            "" => Ok(None),
            v => v
                .parse()
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("`{v}` is not a number"))),
        }
    }
}

/// A socket address, `IP:PORT`.
mod address {
    use super::*;

    pub fn serialize<S: Serializer>(v: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let v: String = text(d)?;
        v.trim().parse().map_err(|_| {
            serde::de::Error::custom(format!("`{v}` is not a socket address (IP:PORT)"))
        })
    }
}

/// The admin address: `IP:PORT`, or `off`.
mod admin_address {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.map_or("off".into(), |a| a.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let v: String = text(d)?;
        match v.trim() {
            "off" | "" => Ok(None),
            a => a.parse().map(Some).map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{a}` is not a socket address (IP:PORT) or `off`"
                ))
            }),
        }
    }
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
            e.contains("\"tick_rate\" in config file f.toml") && e.contains("fast"),
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

    /// Text settings keep the text as written, even when it looks like a number (figment
    /// reads flag and environment values as numbers where it can).
    #[test]
    fn text_settings_keep_numbers_as_written() {
        let none = |_: &str| None;
        for text in [
            "4433",
            "00123",
            "123456789012345678901234567890",
            "1.50",
            "true",
        ] {
            let flags = vec![
                ("reconnect_hint".to_string(), text.to_string()),
                ("admin_token".to_string(), text.to_string()),
            ];
            let c = resolve(&flags, &none, None).unwrap();
            assert_eq!(c.reconnect_hint, text);
            assert_eq!(
                c.admin_token.as_deref(),
                Some(text),
                "a token is used as written"
            );
        }
        let e = resolve(&[("tick_rate".into(), "99999".into())], &none, None).unwrap_err();
        assert!(e.to_string().contains("--tick-rate"), "{e}");
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

    /// Every setting reads from each source the same way: a value for every key given as
    /// flags, as environment variables, and as the file `--print-config` writes, gives the
    /// same configuration (the token, never printed, aside). A new setting without a sample
    /// here fails the test.
    #[test]
    fn every_setting_reads_from_each_source() {
        let sample = |key: &str| -> &'static str {
            match key {
                "listen" => "127.0.0.2:5000",
                "shards" => "3",
                "data_dir" => "/var/lib/tickshard",
                "cert" => "/etc/tls/chain.pem",
                "key" => "/etc/tls/key.pem",
                "tick_rate" => "60",
                "room_capacity" => "16",
                "max_connections" => "500",
                "max_per_address" => "8",
                "max_handshakes" => "64",
                "retry_above" => "0",
                "handshakes_per_second" => "10",
                "hello_timeout" => "3s",
                "lobby_timeout" => "5m",
                "idle_timeout" => "2.5",
                "empty_room_grace" => "1m",
                "max_datagram" => "900",
                "stats_interval" => "0",
                "seed" => "12345",
                "admin" => "off",
                "probe" => "127.0.0.1:4435",
                "admin_token" => "777",
                "admin_token_file" => "",
                "drain_grace" => "45",
                "reconnect_hint" => "eu-2.example:4433",
                "log_format" => "json",
                "modes" => "arena,faulty-arena",
                other => panic!("no sample for setting `{other}`"),
            }
        };
        let flags: Vec<(String, String)> = setting_keys()
            .into_iter()
            .map(|k| {
                let v = sample(&k).to_string();
                (k, v)
            })
            .collect();
        let none = |_: &str| None;
        let from_flags = resolve(&flags, &none, None).unwrap();
        assert_ne!(from_flags, ServeConfig::default());
        assert_eq!(from_flags.admin_token.as_deref(), Some("777"));
        assert_eq!(from_flags.empty_room_grace, Duration::from_secs(60));
        let env = |var: &str| {
            flags
                .iter()
                .find(|(k, _)| env_name(k) == var)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(resolve(&[], &env, None).unwrap(), from_flags);
        let printed = from_flags.to_toml();
        assert!(!printed.contains("777"), "the token is never printed");
        let mut from_file = resolve(&[], &none, Some(("printed", &printed))).unwrap();
        from_file.admin_token = from_flags.admin_token.clone();
        assert_eq!(from_file, from_flags);
    }

    /// The admin token can come from a file (a mounted secret) named by flag or environment;
    /// a missing or empty file, or a token given both ways, is refused naming the setting.
    /// An admin endpoint beyond loopback with no token gets a warning; on loopback, or with a
    /// token, none.
    #[test]
    fn admin_token_from_a_file_and_the_open_admin_warning() {
        let dir = std::env::temp_dir().join(format!("tickshard-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret \nignored\n").unwrap();
        let path = file.display().to_string();
        let none = |_: &str| None;
        let flag = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let c = resolve(&flag("admin_token_file", &path), &none, None).unwrap();
        assert_eq!(c.admin_token().unwrap().as_deref(), Some("s3cret"));
        let env = |k: &str| (k == "TICKSHARD_ADMIN_TOKEN_FILE").then(|| path.clone());
        let c = resolve(&[], &env, None).unwrap();
        assert_eq!(c.admin_token().unwrap().as_deref(), Some("s3cret"));
        assert!(!c.to_toml().contains("s3cret"));
        let mut both = flag("admin_token_file", &path);
        both.extend(flag("admin_token", "x"));
        let e = resolve(&both, &none, None).unwrap_err().to_string();
        assert!(e.contains("--admin-token-file"), "{e}");
        std::fs::write(&file, "\n").unwrap();
        let c = resolve(&flag("admin_token_file", &path), &none, None).unwrap();
        let e = c.admin_token().unwrap_err().to_string();
        assert!(
            e.contains("--admin-token-file") && e.contains("no token"),
            "{e}"
        );
        let missing = dir.join("missing").display().to_string();
        let c = resolve(&flag("admin_token_file", &missing), &none, None).unwrap();
        assert!(c.admin_token().is_err());
        let _ = std::fs::remove_dir_all(&dir);

        let open = resolve(&flag("admin", "0.0.0.0:4434"), &none, None).unwrap();
        let w = open.exposure_warning().expect("warned");
        assert!(
            w.contains("0.0.0.0:4434") && w.contains("--admin-token"),
            "{w}"
        );
        assert_eq!(ServeConfig::default().exposure_warning(), None, "loopback");
        let mut guarded = flag("admin", "0.0.0.0:4434");
        guarded.extend(flag("admin_token", "t"));
        let c = resolve(&guarded, &none, None).unwrap();
        assert_eq!(c.exposure_warning(), None);
        assert_eq!(c.admin_token().unwrap().as_deref(), Some("t"));
    }
}
