//! `client-sim`: bot swarms that speak the real tickshard protocol, and a report of what the
//! players experienced.
//!
//! Many bots share each event loop, one loop per thread (`--threads`), so one machine can load
//! a server to its limit; see [`client_sim::swarm`].

use anyhow::{bail, Context};
use clap::Parser;
use client_sim::swarm::{self, Progress, SwarmConfig, SwarmResult};
use client_sim::{Behavior, ClientConfig, Link, Trust};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// jemalloc, as the server uses (thousands of bots allocate and free per tick on one thread).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bot swarm for tickshard servers.
#[derive(Parser, Debug)]
#[command(name = "client-sim", version, about)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Number of bots.
    #[arg(long, default_value_t = 1)]
    bots: usize,
    /// How long to play after the ramp (e.g. 30s, 2m, 500ms; a plain number is seconds).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Bots connect evenly spread over this time (0: all at once).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    ramp: Duration,
    /// Game mode for quick match.
    #[arg(long, default_value = "arena")]
    mode: String,
    /// Join this room id instead of quick match.
    #[arg(long)]
    room: Option<u64>,
    /// Bot behaviour: wander, chase, idle, spam or chaos. Whatever the behaviour, a bot that
    /// gets a drain notice leaves its room and closes, as a game client would.
    #[arg(long, default_value = "wander")]
    behavior: Behavior,
    /// Seed: the same seed makes the same swarm.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Event-loop threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Bots sharing one UDP socket.
    #[arg(long, default_value_t = 256)]
    bots_per_socket: usize,
    /// Seconds a bot may take from connecting to holding a seat.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    join_timeout: Duration,
    /// Lost bots connect again and rejoin, as a game client would: after a stateless reset
    /// (a server restart), a timeout, or a close other than a drain, with a backoff of 250 ms
    /// doubling to 4 s; a bot whose room ended joins another.
    #[arg(long)]
    reconnect: bool,
    /// Trust the server certificate in this DER or PEM file.
    #[arg(long, default_value = ".tickshard/dev-cert.der")]
    cert: PathBuf,
    /// Trust exactly the certificate with this SHA-256 (overrides --cert).
    #[arg(long)]
    pin: Option<String>,
    /// Accept any server certificate (dangerous; for experiments only).
    #[arg(long)]
    insecure: bool,
    /// TLS server name.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Link conditions for every bot, both directions: perfect, good, average or poor.
    #[arg(long, default_value = "perfect")]
    link: String,
    /// Override the preset's loss probability (0..1), both directions.
    #[arg(long)]
    loss: Option<f64>,
    /// Override the preset's one-way latency in milliseconds.
    #[arg(long)]
    latency: Option<u64>,
    /// Override the preset's jitter in milliseconds.
    #[arg(long)]
    jitter: Option<u64>,
    /// Override the preset's reordering probability (0..1).
    #[arg(long)]
    reorder: Option<f64>,
    /// Override the preset's duplication probability (0..1).
    #[arg(long)]
    duplicate: Option<f64>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG of RTT and snapshot interval over time to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Fail (exit 1) if fewer than this share of expected snapshots arrived (0..1).
    #[arg(long)]
    expect_delivery: Option<f64>,
    /// Fail (exit 1) if the RTT p99 exceeds this many milliseconds.
    #[arg(long)]
    expect_rtt_p99: Option<f64>,
    /// Client ticks per second (inputs sent per second).
    #[arg(long, default_value_t = 30)]
    tick_rate: u32,
    /// The server's admin address: its status is added to the report. `auto` asks
    /// 127.0.0.1:4434 when the server is the default 127.0.0.1:4433; `off` never asks.
    #[arg(long, default_value = "auto")]
    admin: String,
    /// Bearer token for the admin address.
    #[arg(long, env = "TICKSHARD_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// The server's process id (same machine): its CPU time and memory over the steady
    /// phase are added to the report, per player.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Live progress: auto (a bar on a terminal, a line every 2 s otherwise), bar, lines, off.
    #[arg(long, default_value = "auto")]
    progress: String,
}

/// Parses `250ms`, `10s`, `2m`, `1h` or a plain number of seconds.
/// A duration: humantime's form (`500ms`, `10s`, `2m`, `1h 30m`), or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (e.g. 500ms, 10s, 2m): {e}"))
}

fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time (user + system) and resident memory of another process, from /proc.
fn proc_usage(pid: u32) -> Option<(Duration, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = Duration::from_secs_f64((utime + stime) as f64 / hz);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((cpu, rss_kb * 1024))
}

/// GET `path` from an HTTP/1.1 server; the body of a 200 answer.
fn http_get(addr: &str, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(2)))
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = req
        .call()
        .with_context(|| format!("GET {path} from {addr}"))?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_string()?;
    if status != 200 {
        bail!("{path}: HTTP {}: {}", status.as_u16(), body.trim());
    }
    Ok(body)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn quantiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"p50": 0.0, "p99": 0.0, "max": 0.0, "samples": 0});
    }
    json!({
        "p50": ms(h.value_at_quantile(0.5)),
        "p99": ms(h.value_at_quantile(0.99)),
        "max": ms(h.max()),
        "samples": h.len(),
    })
}

struct Steady {
    from: Instant,
    to: Instant,
    swarm_cpu: Duration,
    seated: u64,
    bytes: (u64, u64),
    server: Option<(Duration, u64, u64)>, // cpu, rss at start of run, rss at end
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let trust = if a.insecure {
        eprintln!("WARNING: --insecure accepts ANY server certificate; anyone on the path can impersonate the server");
        Trust::InsecureAnyCertificate
    } else if let Some(pin) = &a.pin {
        Trust::pin(pin)?
    } else {
        Trust::from_cert_file(&a.cert)
            .with_context(|| "trusting the server certificate (use --pin or --cert)")?
    };
    let mut client = ClientConfig::new(trust, &a.server_name);
    if (1..=1000).contains(&a.tick_rate) {
        client.tick_period(Duration::from_secs(1) / a.tick_rate);
    }
    let mut link = Link::preset(&a.link)
        .with_context(|| format!("unknown --link {:?} (perfect, good, average, poor)", a.link))?;
    if let Some(v) = a.loss {
        link.loss = v;
    }
    if let Some(v) = a.latency {
        link.latency = Duration::from_millis(v);
    }
    if let Some(v) = a.jitter {
        link.jitter = Duration::from_millis(v);
    }
    if let Some(v) = a.reorder {
        link.reorder = v;
    }
    if let Some(v) = a.duplicate {
        link.duplicate = v;
    }
    for (name, p) in [
        ("--loss", link.loss),
        ("--reorder", link.reorder),
        ("--duplicate", link.duplicate),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{name} must be a probability between 0 and 1, got {p}");
        }
    }
    if a.bots == 0 {
        bail!("--bots must be at least 1");
    }
    if a.tick_rate == 0 || a.tick_rate > 1000 {
        bail!("--tick-rate must be between 1 and 1000");
    }
    let threads = if a.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.threads
    }
    .min(a.bots);
    let config = SwarmConfig {
        server: a.server,
        bots: a.bots,
        threads,
        bots_per_socket: a.bots_per_socket,
        ramp: a.ramp,
        duration: a.duration,
        join_timeout: a.join_timeout,
        mode: a.mode.clone(),
        room: a.room,
        behavior: a.behavior,
        seed: a.seed,
        tick_rate: a.tick_rate,
        up: link,
        down: link,
        client,
        reconnect: a.reconnect,
    };
    let progress = Progress::new(threads);
    let rss_before = a.server_pid.and_then(proc_usage).map(|u| u.1);
    let t0 = Instant::now();
    // The steady phase: after the ramp and a short settling time, to the end of play.
    let settle = (a.duration / 4).min(Duration::from_secs(2));
    let steady_from = t0 + a.ramp + settle;
    let steady_to = t0 + a.ramp + a.duration;
    let mode = match a.progress.as_str() {
        "auto" if std::io::stderr().is_terminal() => "bar",
        "auto" => "lines",
        m @ ("bar" | "lines" | "off") => m,
        m => bail!("unknown --progress {m:?} (auto, bar, lines, off)"),
    };
    let (result, steady) = std::thread::scope(|s| {
        let runner = s.spawn(|| swarm::run(&config, &progress));
        let steady = watch(&progress, &a, mode, steady_from, steady_to, &runner);
        (runner.join().expect("the swarm panicked"), steady)
    });
    let result = result.context("running the swarm")?;
    let admin = match a.admin.as_str() {
        "off" => None,
        // The server's defaults: game on 127.0.0.1:4433, admin on 127.0.0.1:4434.
        "auto" => (a.server == SocketAddr::from(([127, 0, 0, 1], 4433)))
            .then(|| "127.0.0.1:4434".to_string()),
        addr => Some(addr.to_string()),
    };
    let server_status = admin.and_then(|addr| {
        match http_get(&addr, "/status", a.admin_token.as_deref())
            .and_then(|b| serde_json::from_str::<Value>(&b).map_err(Into::into))
        {
            Ok(v) => Some(v),
            // Guessed, and nothing answers: say nothing.
            Err(_) if a.admin == "auto" => None,
            Err(e) => Some(json!({"error": e.to_string()})),
        }
    });
    report(&a, link, &result, steady, rss_before, server_status)
}

/// Shows live progress until the swarm finishes; samples CPU at the steady phase's bounds.
fn watch(
    progress: &Progress,
    a: &Args,
    mode: &str,
    steady_from: Instant,
    steady_to: Instant,
    runner: &std::thread::ScopedJoinHandle<'_, std::io::Result<SwarmResult>>,
) -> Option<Steady> {
    let bar = (mode == "bar").then(|| {
        let pb = indicatif::ProgressBar::new(a.bots as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} seated {msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        pb
    });
    let mut steady: Option<Steady> = None;
    let mut last_line = Instant::now();
    let mut last_snaps = (Instant::now(), 0u64);
    let mut rate = 0.0;
    while !runner.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        if now >= steady_from && steady.is_none() {
            steady = Some(Steady {
                from: now,
                to: now,
                swarm_cpu: process_cpu(),
                seated: progress.sum(|t| &t.connected) - progress.sum(|t| &t.disconnected),
                bytes: (
                    progress.sum(|t| &t.bytes_in),
                    progress.sum(|t| &t.bytes_out),
                ),
                server: a.server_pid.and_then(proc_usage).map(|u| (u.0, u.1, u.1)),
            });
        }
        if let Some(st) = &mut steady {
            if st.to == st.from && now >= steady_to {
                st.to = now;
                st.swarm_cpu = process_cpu().saturating_sub(st.swarm_cpu);
                st.bytes = (
                    progress.sum(|t| &t.bytes_in) - st.bytes.0,
                    progress.sum(|t| &t.bytes_out) - st.bytes.1,
                );
                if let (Some((cpu0, rss0, _)), Some((cpu1, rss1))) =
                    (st.server, a.server_pid.and_then(proc_usage))
                {
                    st.server = Some((cpu1.saturating_sub(cpu0), rss0, rss1));
                }
            }
        }
        let snaps = progress.sum(|t| &t.snapshots);
        if now - last_snaps.0 >= Duration::from_secs(1) {
            rate = (snaps - last_snaps.1) as f64 / (now - last_snaps.0).as_secs_f64();
            last_snaps = (now, snaps);
        }
        let line = format!(
            "connected {} failed {} disconnected {} snapshots/s {:.0} rtt p50 {:.1} ms p99 {:.1} ms errors {}",
            progress.sum(|t| &t.connected),
            progress.sum(|t| &t.failed),
            progress.sum(|t| &t.disconnected),
            rate,
            ms(progress.max(|t| &t.rtt_p50_us)),
            ms(progress.max(|t| &t.rtt_p99_us)),
            progress.sum(|t| &t.errors),
        );
        match (&bar, mode) {
            (Some(pb), _) => {
                pb.set_position(progress.sum(|t| &t.connected));
                pb.set_message(line);
            }
            (None, "lines") if now - last_line >= Duration::from_secs(2) => {
                last_line = now;
                eprintln!("client-sim: {line}");
            }
            _ => {}
        }
    }
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    steady.filter(|s| s.to > s.from)
}

fn report(
    a: &Args,
    link: Link,
    r: &SwarmResult,
    steady: Option<Steady>,
    rss_before: Option<u64>,
    server_status: Option<Value>,
) -> anyhow::Result<()> {
    let bots = r.bots.len();
    let connected = r.bots.iter().filter(|b| b.joined.is_some()).count();
    let mut failed_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut disconnects_by: BTreeMap<String, u64> = BTreeMap::new();
    for b in &r.bots {
        match (&b.joined, &b.ended) {
            (None, Some((_, why))) => *failed_by.entry(why.clone()).or_default() += 1,
            (None, None) => *failed_by.entry("never seated".into()).or_default() += 1,
            (Some(_), Some((_, why))) => *disconnects_by.entry(why.clone()).or_default() += 1,
            _ => {}
        }
    }
    // Delivery: snapshots received while seated against one per room tick while seated.
    let mut expected = 0u64;
    let mut received = 0u64;
    let mut rates: Vec<f64> = Vec::new();
    for b in &r.bots {
        if let Some(j) = b.joined {
            let until = b.ended.as_ref().map_or(r.end, |e| e.0.min(r.end));
            let secs = until.saturating_duration_since(j).as_secs_f64();
            expected += (secs * b.room_rate as f64).floor() as u64;
            received += b.snapshots_in_room;
            if secs > 0.5 {
                rates.push(b.snapshots_in_room as f64 / secs);
            }
        }
    }
    rates.sort_by(|x, y| x.total_cmp(y));
    let delivery = if expected > 0 {
        (received as f64 / expected as f64).min(1.0)
    } else {
        0.0
    };
    let secs = (r.end - r.start).as_secs_f64().max(1e-3);
    let sum = |f: &dyn Fn(&swarm::BotResult) -> u64| r.bots.iter().map(f).sum::<u64>();
    let bytes_in = sum(&|b| b.bytes_in) as f64 / bots as f64 / secs;
    let bytes_out = sum(&|b| b.bytes_out) as f64 / bots as f64 / secs;
    let decode_errors = sum(&|b| b.decode_errors);
    let late = sum(&|b| b.late_snapshots);
    let divergences = sum(&|b| b.divergences);
    let checked = sum(&|b| b.movement_checked);
    let skipped = sum(&|b| b.skipped_commands);
    let drain_notices = sum(&|b| b.drain_notices);
    let snaps = sum(&|b| b.snapshots);
    let snap_bytes = sum(&|b| b.snapshot_bytes);
    let (up, down) = r.bots.iter().fold((0, 0), |s, b| {
        (s.0 + b.link_dropped.0, s.1 + b.link_dropped.1)
    });
    let mut errors_by: BTreeMap<u16, u64> = BTreeMap::new();
    for b in &r.bots {
        for (c, n) in &b.errors {
            *errors_by.entry(*c).or_default() += n;
        }
    }
    let first_divergence = r.bots.iter().find_map(|b| {
        b.first_divergence
            .as_ref()
            .map(|d| format!("bot {}: {d}", b.index))
    });
    let pct = |v: &[f64], q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    let h = &r.hist;
    let q = |h: &Histogram<u64>, p: f64| {
        if h.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(p))
        }
    };
    // The steady phase, per unit of work.
    let steady_json = steady.as_ref().map(|s| {
        let window = (s.to - s.from).as_secs_f64();
        let bot_ticks = s.seated as f64 * a.tick_rate as f64 * window;
        let mut v = json!({
            "seconds": window,
            "players": s.seated,
            "swarm_cpu_seconds": s.swarm_cpu.as_secs_f64(),
            "swarm_cpu_us_per_bot_tick": if bot_ticks > 0.0 { s.swarm_cpu.as_secs_f64() * 1e6 / bot_ticks } else { 0.0 },
            "bytes_in_per_player_per_s": s.bytes.0 as f64 / (s.seated.max(1) as f64 * window),
            "bytes_out_per_player_per_s": s.bytes.1 as f64 / (s.seated.max(1) as f64 * window),
        });
        if let Some((cpu, _, rss_end)) = s.server {
            v["server_cpu_seconds"] = json!(cpu.as_secs_f64());
            v["server_cpu_us_per_player_tick"] =
                json!(if bot_ticks > 0.0 { cpu.as_secs_f64() * 1e6 / bot_ticks } else { 0.0 });
            v["server_rss_bytes"] = json!(rss_end);
            if let (Some(before), true) = (rss_before, s.seated > 0) {
                v["server_bytes_per_player"] =
                    json!(rss_end.saturating_sub(before) as f64 / s.seated as f64);
            }
        }
        v
    });

    println!(
        "client-sim report ({} bots, {} behaviour, link {})",
        bots, a.behavior, a.link
    );
    println!(
        "  bots {bots}: connected {connected}, failed {}",
        bots - connected
    );
    for (why, n) in &failed_by {
        println!("    failed: {n} × {why}");
    }
    for (why, n) in &disconnects_by {
        println!("    disconnected after playing: {n} × {why}");
    }
    println!(
        "  handshake (connect to welcome) ms: p50 {:.2} p99 {:.2} max {:.2}",
        q(&h.handshake_us, 0.5),
        q(&h.handshake_us, 0.99),
        if h.handshake_us.is_empty() {
            0.0
        } else {
            ms(h.handshake_us.max())
        }
    );
    println!(
        "  rtt ms: p50 {:.2} p99 {:.2}",
        q(&h.rtt_us, 0.5),
        q(&h.rtt_us, 0.99)
    );
    println!("  snapshots received {received} of {expected} expected: delivery {delivery:.4}");
    println!(
        "  snapshots per bot per second: p50 {:.1} worst {:.1}",
        pct(&rates, 0.5),
        pct(&rates, 0.0)
    );
    println!(
        "  snapshot interval ms: p50 {:.2} p99 {:.2}; jitter p99 {:.2}",
        q(&h.interval_us, 0.5),
        q(&h.interval_us, 0.99),
        q(&h.jitter_us, 0.99)
    );
    println!(
        "  input to acknowledgement ms: p50 {:.2} p99 {:.2}",
        q(&h.input_ack_us, 0.5),
        q(&h.input_ack_us, 0.99)
    );
    println!(
        "  bytes per bot per second: in {bytes_in:.0} out {bytes_out:.0}; bytes per snapshot {:.0}",
        if snaps > 0 {
            snap_bytes as f64 / snaps as f64
        } else {
            0.0
        }
    );
    println!("  decode errors {decode_errors}, snapshots arriving after a newer one {late}");
    println!(
        "  own movement checked {checked} times: {divergences} divergences, {skipped} commands skipped by the server"
    );
    if let Some(d) = &first_divergence {
        println!("    first: {d}");
    }
    if !errors_by.is_empty() {
        println!("  server errors by code: {errors_by:?}");
    }
    if drain_notices > 0 {
        println!("  drain notices received: {drain_notices}");
    }
    let reconnects = sum(&|b| b.reconnects);
    let mut recoveries: Vec<Duration> = r.bots.iter().flat_map(|b| b.recoveries.clone()).collect();
    recoveries.sort_unstable();
    if reconnects > 0 || !recoveries.is_empty() || r.stateless_resets > 0 {
        println!(
            "  stateless resets {}, reconnects {reconnects}, back in a room {} times (slowest {:.1} s, median {:.1} s)",
            r.stateless_resets,
            recoveries.len(),
            recoveries.last().map_or(0.0, Duration::as_secs_f64),
            recoveries.get(recoveries.len() / 2).map_or(0.0, Duration::as_secs_f64),
        );
    }
    println!("  link {} ({link:?}): dropped up {up} down {down}", a.link);
    if r.send_errors + r.stray_datagrams + r.ticks_skipped > 0 {
        println!(
            "  swarm: send errors {}, stray datagrams {}, swarm ticks skipped {}",
            r.send_errors, r.stray_datagrams, r.ticks_skipped
        );
    }
    if let Some(s) = &steady_json {
        println!(
            "  steady phase {:.1} s, {} players: {:.0} bytes in and {:.0} out per player per second; swarm CPU {:.2} µs per bot-tick",
            s["seconds"].as_f64().unwrap_or(0.0),
            s["players"],
            s["bytes_in_per_player_per_s"].as_f64().unwrap_or(0.0),
            s["bytes_out_per_player_per_s"].as_f64().unwrap_or(0.0),
            s["swarm_cpu_us_per_bot_tick"].as_f64().unwrap_or(0.0)
        );
        if let Some(c) = s.get("server_cpu_us_per_player_tick") {
            println!(
                "    server CPU {:.2} µs per player-tick, RSS {:.1} MiB, {:.0} bytes per player",
                c.as_f64().unwrap_or(0.0),
                s["server_rss_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                s.get("server_bytes_per_player")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
            );
        }
    }
    if let Some(st) = &server_status {
        println!("  server status: {}", compact_status(st));
    }

    if let Some(path) = &a.json {
        let json = json!({
            "bots": bots,
            "connected": connected,
            "failed": bots - connected,
            "failed_by_reason": failed_by,
            "disconnects_by_reason": disconnects_by,
            "snapshots_expected": expected,
            "snapshots_received": received,
            "snapshot_delivery_ratio": delivery,
            "snapshots_per_bot_per_s": {"p50": pct(&rates, 0.5), "worst": pct(&rates, 0.0)},
            "rtt_ms": quantiles(&h.rtt_us),
            "handshake_ms": quantiles(&h.handshake_us),
            "snapshot_interval_ms": quantiles(&h.interval_us),
            "snapshot_jitter_ms": quantiles(&h.jitter_us),
            "input_ack_ms": quantiles(&h.input_ack_us),
            "bytes_in_per_bot_per_s": bytes_in,
            "bytes_out_per_bot_per_s": bytes_out,
            "bytes_per_snapshot": if snaps > 0 { snap_bytes as f64 / snaps as f64 } else { 0.0 },
            "decode_errors": decode_errors,
            "late_snapshots": late,
            "movement_checked": checked,
            "divergences": divergences,
            "commands_skipped_by_server": skipped,
            "first_divergence": first_divergence,
            "server_errors_by_code": errors_by.iter().map(|(c, n)| (c.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "drain_notices": drain_notices,
            "stateless_resets": r.stateless_resets,
            "reconnects": reconnects,
            "recoveries_ms": recoveries.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
            "link": a.link,
            "link_dropped": {"up": up, "down": down},
            "behavior": a.behavior.to_string(),
            "seed": a.seed,
            "threads": r.bots.len().min(a.threads.max(1)),
            "swarm": {"send_errors": r.send_errors, "stray_datagrams": r.stray_datagrams, "ticks_skipped": r.ticks_skipped},
            "steady": steady_json,
            "server": server_status,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.plot {
        plot(path, r).with_context(|| format!("writing {}", path.display()))?;
    }
    if connected < bots {
        bail!("{} of {} bots did not play", bots - connected, bots);
    }
    if let Some(want) = a.expect_delivery {
        if delivery < want {
            bail!("verdict: snapshot delivery {delivery:.4} is below the expected {want}");
        }
    }
    if let Some(max) = a.expect_rtt_p99 {
        let p99 = q(&h.rtt_us, 0.99);
        if p99 > max {
            bail!("verdict: RTT p99 {p99:.2} ms exceeds the allowed {max} ms");
        }
    }
    Ok(())
}

/// One line of the server's status: its shards' figures.
fn compact_status(v: &Value) -> String {
    if let Some(e) = v.get("error") {
        return format!("unreachable ({e})");
    }
    match v.get("shards").and_then(Value::as_array) {
        Some(shards) => shards
            .iter()
            .map(|s| {
                let f = |k: &str| s.get(k).map_or("-".to_string(), |x| x.to_string());
                format!(
                    "shard {}: players {} rooms {} tick p50 {} µs p99 {} µs",
                    f("id"),
                    f("players"),
                    f("rooms"),
                    f("tick_p50_us"),
                    f("tick_p99_us")
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        None => v.to_string().chars().take(300).collect(),
    }
}

/// An SVG with RTT and snapshot interval (p50 and p99) per second.
fn plot(path: &PathBuf, r: &SwarmResult) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let series = |f: fn(&swarm::Second) -> &Histogram<u32>, q: f64| -> Vec<(f64, f64)> {
        r.seconds
            .iter()
            .enumerate()
            .filter(|(_, s)| !f(s).is_empty())
            .map(|(i, s)| (i as f64 + 1.0, f(s).value_at_quantile(q) as f64 / 1000.0))
            .collect()
    };
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(350);
    let secs = r.seconds.len().max(1) as f64 + 1.0;
    fn rtt(s: &swarm::Second) -> &Histogram<u32> {
        &s.rtt_us
    }
    fn interval(s: &swarm::Second) -> &Histogram<u32> {
        &s.interval_us
    }
    type Pick = fn(&swarm::Second) -> &Histogram<u32>;
    for (area, title, f) in [
        (&top, "RTT (ms)", rtt as Pick),
        (&bottom, "snapshot interval (ms)", interval as Pick),
    ] {
        let p50 = series(f, 0.5);
        let p99 = series(f, 0.99);
        let ymax = p99.iter().chain(&p50).map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..secs, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .draw()?;
        chart
            .draw_series(LineSeries::new(p50, &BLUE))?
            .label("p50")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(p99, &RED))?
            .label("p99")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
