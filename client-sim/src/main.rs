//! `client-sim`: bots that speak the real tickshard protocol, and a report of what they saw.
//!
//! Every bot is a sans-IO [`client_sim::Client`] on its own UDP socket; all bots share one
//! thread, polled in turn, so a swarm costs no task or thread per bot.

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use client_sim::drive::UdpClient;
use client_sim::{ClientConfig, ClientEvent, Link, SessionState, Trust};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Behavior {
    /// Walk in a direction that changes every two seconds.
    Wander,
    /// Stand still (still sends inputs).
    Idle,
}

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
    /// Seconds to play after joining.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Game mode for quick match.
    #[arg(long, default_value = "arena")]
    mode: String,
    /// Join this room id instead of quick match.
    #[arg(long)]
    room: Option<u64>,
    /// Bot behaviour.
    #[arg(long, value_enum, default_value_t = Behavior::Wander)]
    behavior: Behavior,
    /// Seed: the same seed makes the same swarm.
    #[arg(long, default_value_t = 1)]
    seed: u64,
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
    /// Fail (exit 1) if fewer than this share of expected snapshots arrived (0..1).
    #[arg(long)]
    expect_delivery: Option<f64>,
    /// Fail (exit 1) if the RTT p99 across bots exceeds this many milliseconds.
    #[arg(long)]
    expect_rtt_p99: Option<f64>,
    /// Seconds over which bots join, evenly spread (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// Client ticks per second (inputs sent per second).
    #[arg(long, default_value_t = 30)]
    tick_rate: u32,
}

fn direction(seed: u64, bot: usize, tick: u64) -> (i8, i8) {
    // splitmix64 of (seed, bot, 2-second window): the same seed gives the same walk.
    let mut z = seed
        ^ (bot as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (tick / 60).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let a = (z % 360) as f32 * std::f32::consts::PI / 180.0;
    ((a.cos() * 127.0) as i8, (a.sin() * 127.0) as i8)
}

struct Bot {
    io: UdpClient,
    started: Instant,
    welcomed_at: Option<Instant>,
    room_rate: u16,
    welcomed: bool,
    join_sent: bool,
    joined_at: Option<Instant>,
    snapshots_in_room: u64,
    failed: Option<String>,
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
    let config = ClientConfig::new(trust, &a.server_name);
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
    let mut bots = Vec::with_capacity(a.bots);
    for i in 0..a.bots {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&a.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&(i as u64).to_le_bytes());
        let mut io = UdpClient::connect(a.server, &config, Some(seed))?;
        io.set_link(
            link,
            link,
            a.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        bots.push(Bot {
            io,
            started: Instant::now(),
            welcomed_at: None,
            room_rate: 0,
            welcomed: false,
            join_sent: false,
            joined_at: None,
            snapshots_in_room: 0,
            failed: None,
        });
    }
    let period = Duration::from_secs(1) / a.tick_rate.max(1);
    let start = Instant::now();
    let play = Duration::from_secs_f64(a.duration);
    let connect_deadline = start + Duration::from_secs(10) + Duration::from_secs_f64(a.ramp);
    let mut next_tick = start;
    let mut tick: u64 = 0;
    loop {
        let now = Instant::now();
        for (i, b) in bots.iter_mut().enumerate() {
            if b.failed.is_some() {
                continue;
            }
            if let Err(e) = b.io.poll_io() {
                b.failed = Some(format!("socket: {e}"));
                continue;
            }
            while let Some(ev) = b.io.client.poll_event() {
                match ev {
                    ClientEvent::Welcome { .. } => {
                        b.welcomed = true;
                        b.welcomed_at = Some(now);
                    }
                    ClientEvent::Joined { tick_rate, .. } => {
                        b.joined_at = Some(now);
                        b.room_rate = tick_rate;
                    }
                    ClientEvent::Snapshot { .. } if b.joined_at.is_some() => {
                        b.snapshots_in_room += 1
                    }
                    ClientEvent::Error { code, message } => {
                        b.failed = Some(format!("error {code}: {message}"))
                    }
                    ClientEvent::Closed(r) => b.failed = Some(format!("closed: {r:?}")),
                    _ => {}
                }
            }
            let join_at = start + Duration::from_secs_f64(a.ramp * i as f64 / a.bots.max(1) as f64);
            if b.welcomed && !b.join_sent && now >= join_at {
                b.join_sent = true;
                b.io.client.join(a.room, &a.mode);
            }
            if now >= next_tick && matches!(b.io.client.state(), SessionState::InRoom { .. }) {
                let (x, y) = match a.behavior {
                    Behavior::Wander => direction(a.seed, i, tick),
                    Behavior::Idle => (0, 0),
                };
                b.io.client.send_input(now, x, y, 0, 0);
                let _ = b.io.flush();
            }
        }
        if now >= next_tick {
            next_tick += period;
            tick += 1;
        }
        let all_done = bots
            .iter()
            .all(|b| b.failed.is_some() || b.joined_at.is_some_and(|t| now >= t + play));
        if all_done || (now > connect_deadline && bots.iter().all(|b| b.joined_at.is_none())) {
            break;
        }
        let wait = next_tick
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(1));
        std::thread::sleep(wait);
    }
    // Report.
    let end = Instant::now();
    let connected = bots.iter().filter(|b| b.joined_at.is_some()).count();
    let mut rates: Vec<f64> = bots
        .iter()
        .filter(|b| b.joined_at.is_some())
        .map(|b| {
            let t = b.joined_at.map_or(a.duration, |j| (end - j).as_secs_f64());
            b.snapshots_in_room as f64 / t.max(1e-3)
        })
        .collect();
    rates.sort_by(|x, y| x.partial_cmp(y).expect("finite"));
    let snaps: u64 = bots.iter().map(|b| b.io.client.stats().snapshots).sum();
    let snap_bytes: u64 = bots
        .iter()
        .map(|b| b.io.client.stats().snapshot_bytes)
        .sum();
    let decode_errors: u64 = bots.iter().map(|b| b.io.client.stats().decode_errors).sum();
    let late: u64 = bots
        .iter()
        .map(|b| b.io.client.stats().snapshots_late)
        .sum();
    let bytes_in: u64 = bots.iter().map(|b| b.io.bytes_in).sum();
    let bytes_out: u64 = bots.iter().map(|b| b.io.bytes_out).sum();
    let secs = start.elapsed().as_secs_f64();
    let mut rtts: Vec<f64> = bots
        .iter()
        .map(|b| b.io.client.rtt().as_secs_f64() * 1000.0)
        .collect();
    rtts.sort_by(|x, y| x.partial_cmp(y).expect("finite"));
    let pct = |v: &[f64], q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    println!("client-sim report");
    println!(
        "  bots {} connected {} failed {}",
        a.bots,
        connected,
        a.bots - connected
    );
    for b in bots.iter().filter_map(|b| b.failed.as_ref()).take(5) {
        println!("    failure: {b}");
    }
    println!(
        "  snapshots per bot per second: p50 {:.1} min {:.1} (tick rate {})",
        pct(&rates, 0.5),
        pct(&rates, 0.0),
        a.tick_rate
    );
    println!(
        "  bytes per snapshot: {:.0}",
        if snaps > 0 {
            snap_bytes as f64 / snaps as f64
        } else {
            0.0
        }
    );
    println!(
        "  bytes per bot per second: in {:.0} out {:.0}",
        bytes_in as f64 / a.bots as f64 / secs,
        bytes_out as f64 / a.bots as f64 / secs
    );
    println!(
        "  rtt ms: p50 {:.2} p99 {:.2}",
        pct(&rtts, 0.5),
        pct(&rtts, 0.99)
    );
    println!("  decode errors {decode_errors}, snapshots arriving after a newer one {late}");
    let (up, down): (u64, u64) = bots
        .iter()
        .map(|b| b.io.link_dropped())
        .fold((0, 0), |s, d| (s.0 + d.0, s.1 + d.1));
    println!("  link {} ({link:?}): dropped up {up} down {down}", a.link);
    // Delivery: snapshots received in the room against one per room tick while seated.
    let expected: u64 = bots
        .iter()
        .filter_map(|b| {
            b.joined_at
                .map(|j| ((end - j).as_secs_f64() * b.room_rate as f64).floor() as u64)
        })
        .sum();
    let received: u64 = bots.iter().map(|b| b.snapshots_in_room).sum();
    let delivery = if expected > 0 {
        (received as f64 / expected as f64).min(1.0)
    } else {
        0.0
    };
    let mut handshakes: Vec<f64> = bots
        .iter()
        .filter_map(|b| {
            b.welcomed_at
                .map(|w| (w - b.started).as_secs_f64() * 1000.0)
        })
        .collect();
    handshakes.sort_by(|x, y| x.partial_cmp(y).expect("finite"));
    println!("  snapshots received {received} of {expected} expected: delivery {delivery:.4}");
    println!(
        "  connect to welcome ms: p50 {:.2} p99 {:.2}",
        pct(&handshakes, 0.5),
        pct(&handshakes, 0.99)
    );
    let mut reasons: std::collections::BTreeMap<&str, u64> = Default::default();
    for b in bots.iter().filter(|b| b.joined_at.is_none()) {
        *reasons
            .entry(b.failed.as_deref().unwrap_or("did not join in time"))
            .or_default() += 1;
    }
    if let Some(path) = &a.json {
        let esc = |t: &str| t.replace('\\', "\\\\").replace('"', "\\\"");
        let reasons_json: Vec<String> = reasons
            .iter()
            .map(|(r, n)| format!("\"{}\": {n}", esc(r)))
            .collect();
        let json = format!(
            "{{\n  \"bots\": {},\n  \"connected\": {},\n  \"failed\": {},\n  \"failed_by_reason\": {{{}}},\n  \"snapshots_expected\": {},\n  \"snapshots_received\": {},\n  \"snapshot_delivery_ratio\": {:.6},\n  \"snapshots_per_bot_per_s\": {{\"p50\": {:.3}, \"worst\": {:.3}}},\n  \"rtt_ms\": {{\"p50\": {:.3}, \"p99\": {:.3}}},\n  \"handshake_ms\": {{\"p50\": {:.3}, \"p99\": {:.3}}},\n  \"bytes_in_per_bot_per_s\": {:.1},\n  \"bytes_out_per_bot_per_s\": {:.1},\n  \"bytes_per_snapshot\": {:.1},\n  \"decode_errors\": {},\n  \"late_snapshots\": {},\n  \"link\": \"{}\",\n  \"link_dropped\": {{\"up\": {up}, \"down\": {down}}}\n}}\n",
            a.bots,
            connected,
            a.bots - connected,
            reasons_json.join(", "),
            expected,
            received,
            delivery,
            pct(&rates, 0.5),
            pct(&rates, 0.0),
            pct(&rtts, 0.5),
            pct(&rtts, 0.99),
            pct(&handshakes, 0.5),
            pct(&handshakes, 0.99),
            bytes_in as f64 / a.bots as f64 / secs,
            bytes_out as f64 / a.bots as f64 / secs,
            if snaps > 0 { snap_bytes as f64 / snaps as f64 } else { 0.0 },
            decode_errors,
            late,
            esc(&a.link),
        );
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    for b in &mut bots {
        b.io.client.close(Instant::now());
        let _ = b.io.flush();
    }
    if connected < a.bots {
        bail!("{} of {} bots did not play", a.bots - connected, a.bots);
    }
    if let Some(want) = a.expect_delivery {
        if delivery < want {
            bail!("verdict: snapshot delivery {delivery:.4} is below the expected {want}");
        }
    }
    if let Some(max) = a.expect_rtt_p99 {
        let p99 = pct(&rtts, 0.99);
        if p99 > max {
            bail!("verdict: RTT p99 {p99:.2} ms exceeds the allowed {max} ms");
        }
    }
    Ok(())
}
