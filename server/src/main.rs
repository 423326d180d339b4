//! `tickshard`: run the game server, or talk to running ones.
//!
//! With no arguments it serves the built-in arena on `127.0.0.1:4433` with one shard per
//! core, a development certificate under `./.tickshard`, and admin HTTP on `127.0.0.1:4434`.
//! `tickshard serve` is the same; `tickshard ctl ...` are the fleet tools.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tickshard::ops::config::{self, LogFormat};
use tickshard::ops::ctl;
use tickshard::{fleet, runtime};

/// jemalloc: size-class slabs and per-thread caches. Against glibc's allocator, side by side at
/// 1,000 players, 18% less memory per player (a handshake's freed buffers no longer leave holes
/// among the connections' long-lived allocations) and about 6% less CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A thread-per-core authoritative game server on QUIC.
#[derive(Parser, Debug)]
#[command(
    name = "tickshard",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve (the default). Every setting is also an environment variable TICKSHARD_<NAME>
    /// and a key in the TOML file of --config; flags win over env, env over the file.
    Serve(Box<ServeArgs>),
    /// Fleet tools over the admin HTTP endpoint.
    Ctl {
        #[command(subcommand)]
        command: CtlCmd,
    },
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// One status table across servers.
    Status {
        /// Admin addresses, comma-separated (HOST:PORT,...).
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<String>,
        /// Admin bearer token.
        #[arg(long, env = "TICKSHARD_ADMIN_TOKEN")]
        token: Option<String>,
    },
    /// Drain a server, or one of its shards.
    Drain {
        /// Admin address (HOST:PORT).
        #[arg(long)]
        target: String,
        /// Drain only this shard (no new rooms there).
        #[arg(long)]
        shard: Option<usize>,
        /// Admin bearer token.
        #[arg(long, env = "TICKSHARD_ADMIN_TOKEN")]
        token: Option<String>,
    },
}

/// Settings of `serve`: flags here, env TICKSHARD_<NAME>, TOML key <name>.
#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "TICKSHARD_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Print the effective configuration (TOML) and exit.
    #[arg(long)]
    print_config: bool,
    /// UDP address to serve on [default: 127.0.0.1:4433].
    #[arg(long)]
    listen: Option<String>,
    /// Number of shards (0: one per available core) [default: 0].
    #[arg(long)]
    shards: Option<String>,
    /// Directory for the development certificate and results files [default: .tickshard].
    #[arg(long)]
    data_dir: Option<String>,
    /// PEM certificate chain (with --key); default: a development certificate.
    #[arg(long)]
    cert: Option<String>,
    /// PEM private key (with --cert).
    #[arg(long)]
    key: Option<String>,
    /// Arena ticks per second [default: 30].
    #[arg(long)]
    tick_rate: Option<String>,
    /// Arena players per room [default: 64].
    #[arg(long)]
    room_capacity: Option<String>,
    /// Most connections per shard [default: 10000].
    #[arg(long)]
    max_connections: Option<String>,
    /// Seconds a client has to send hello [default: 10].
    #[arg(long)]
    hello_timeout: Option<String>,
    /// QUIC idle timeout in seconds [default: 10].
    #[arg(long)]
    idle_timeout: Option<String>,
    /// Seconds an empty room stays open [default: 10].
    #[arg(long)]
    empty_room_grace: Option<String>,
    /// Largest snapshot datagram in bytes, 256..=1150 [default: 1100].
    #[arg(long)]
    max_datagram: Option<String>,
    /// Seed for the shards' randomness; default: from the OS.
    #[arg(long)]
    seed: Option<String>,
    /// Seconds between each shard's figures in the log, 0: never [default: 10].
    #[arg(long)]
    stats_interval: Option<String>,
    /// Admin HTTP address, or `off` [default: 127.0.0.1:4434].
    #[arg(long)]
    admin: Option<String>,
    /// Bearer token the admin endpoint requires (except /healthz and /readyz).
    #[arg(long)]
    admin_token: Option<String>,
    /// Seconds a drain (SIGTERM, POST /drain) lets rooms run [default: 30].
    #[arg(long)]
    drain_grace: Option<String>,
    /// Where draining clients should reconnect (sent in the drain notice).
    #[arg(long)]
    reconnect_hint: Option<String>,
    /// Log format: text or json [default: text]. Filter with RUST_LOG.
    #[arg(long)]
    log_format: Option<String>,
}

impl ServeArgs {
    /// The flags given, as (setting key, value).
    fn flags(&self) -> Vec<(String, String)> {
        let all = [
            ("listen", &self.listen),
            ("shards", &self.shards),
            ("data_dir", &self.data_dir),
            ("cert", &self.cert),
            ("key", &self.key),
            ("tick_rate", &self.tick_rate),
            ("room_capacity", &self.room_capacity),
            ("max_connections", &self.max_connections),
            ("hello_timeout", &self.hello_timeout),
            ("idle_timeout", &self.idle_timeout),
            ("empty_room_grace", &self.empty_room_grace),
            ("max_datagram", &self.max_datagram),
            ("seed", &self.seed),
            ("stats_interval", &self.stats_interval),
            ("admin", &self.admin),
            ("admin_token", &self.admin_token),
            ("drain_grace", &self.drain_grace),
            ("reconnect_hint", &self.reconnect_hint),
            ("log_format", &self.log_format),
        ];
        debug_assert_eq!(all.len(), config::SETTINGS.len());
        all.into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), v.clone())))
            .collect()
    }
}

fn init_logs(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Cmd::Serve(a)) => serve(*a),
        Some(Cmd::Ctl { command }) => ctl_main(command),
    }
}

fn ctl_main(command: CtlCmd) -> anyhow::Result<()> {
    match command {
        CtlCmd::Status { targets, token } => {
            print!("{}", ctl::status_table(&targets, token.as_deref()));
            Ok(())
        }
        CtlCmd::Drain {
            target,
            shard,
            token,
        } => {
            let msg = ctl::drain(&target, shard, token.as_deref()).map_err(anyhow::Error::msg)?;
            println!("{msg}");
            Ok(())
        }
    }
}

fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let file = match &a.config {
        Some(p) => Some((
            p.display().to_string(),
            std::fs::read_to_string(p)
                .with_context(|| format!("reading config file {}", p.display()))?,
        )),
        None => None,
    };
    let env = |k: &str| std::env::var(k).ok();
    let config = config::resolve(
        &a.flags(),
        &env,
        file.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
    )?;
    if a.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    init_logs(config.log_format);
    // SIGINT and SIGTERM: each one counts (the first drains, the second cuts the drain short).
    // signal-hook's iterator takes them on a thread of its own, so nothing runs in the handler.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                runtime::request_stop();
            }
        })
        .context("starting the signal thread")?;
    // On Agones (the SDK sidecar's port is set) the fleet hook reports to it; otherwise
    // nothing changes.
    let fleet: Box<dyn fleet::Fleet> = match tickshard::fleet::agones::AgonesConfig::from_env() {
        Ok(Some(c)) => {
            tracing::info!(sdk = %c.sdk_addr, "Agones SDK found");
            Box::new(tickshard::fleet::agones::AgonesFleet::new(
                tickshard::fleet::agones::Agones::start(c, env!("CARGO_PKG_VERSION")),
            ))
        }
        Ok(None) => Box::new(fleet::NoFleet),
        Err(e) => anyhow::bail!("invalid setting: {e}"),
    };
    runtime::serve_with_fleet(config, fleet, |s| {
        tracing::info!(
            addrs = ?s.addrs,
            steering = ?s.steering,
            admin = ?s.admin,
            cert = %s.cert_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            sha256 = %s.fingerprint,
            "tls certificate"
        );
        // One machine-readable line for scripts and tests.
        println!(
            "tickshard listening on {} shards={} steering={:?} admin={} sha256={}",
            s.addrs[0],
            s.addrs.len(),
            s.steering,
            s.admin.map_or("off".into(), |a| a.to_string()),
            s.fingerprint
        );
    })
    .context("tickshard failed to start")?;
    Ok(())
}
