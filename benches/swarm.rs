//! The swarm benchmark: how many players one core holds at 30 Hz, and what each costs.
//!
//! ```text
//! cargo bench --bench swarm                      # 1,000 bots, once
//! cargo bench --bench swarm -- --bots 2000 --runs 3
//! cargo bench --bench swarm -- --sweep           # the largest N held at 30 Hz
//! cargo bench --bench swarm -- --scrape-ms 100   # with /metrics scraped every 100 ms
//! cargo bench --bench swarm -- --shards 2        # 2 shards on both cores, swarm unpinned
//! cargo bench --bench swarm -- --bin-dir DIR     # binaries of another build (A/B runs)
//! ```
//!
//! The server runs with one shard, pinned to core 0; the swarm runs with one event loop,
//! pinned to core 1. Bots join rooms of 50 (the server's room capacity) at 30 Hz, each sending
//! one input and receiving one snapshot per tick. Bots connect over a ramp; the figures cover
//! the steady phase after it:
//! - server CPU µs per player-tick: the server process's CPU time (user + system, from
//!   /proc) over the phase, divided by players × ticks;
//! - tick duration and tick start lateness p50/p99: the server's own histograms over exactly
//!   that phase (its stats line covers the window since the previous line; the server logs
//!   one line per window, and the swarm's steady phase is aligned to the second window);
//! - snapshot delivery ratio, bytes per player per second (both directions), server memory
//!   per player (resident memory growth from idle to full over players), and swarm CPU per
//!   bot-tick.
//!
//! A point "holds 30 Hz" when the tick duration p99 is under half the period (16.7 ms) and
//! at least 99% of the expected snapshots arrived. `--sweep` doubles N from 500 until a point
//! fails, then bisects to 250 players.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

struct Opts {
    bots: usize,
    scrape_ms: u64,
    runs: usize,
    sweep: bool,
    window: u64,
    room: usize,
    tick_rate: u32,
    shards: usize,
    bin_dir: Option<PathBuf>,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        bots: 1000,
        scrape_ms: 0,
        runs: 1,
        sweep: false,
        window: 20,
        room: 50,
        tick_rate: 30,
        shards: 1,
        bin_dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--bots" => o.bots = num("--bots") as usize,
            "--runs" => o.runs = num("--runs").max(1) as usize,
            "--window" => o.window = num("--window").max(5),
            "--room" => o.room = num("--room").max(1) as usize,
            "--sweep" => o.sweep = true,
            "--scrape-ms" => o.scrape_ms = num("--scrape-ms"),
            "--shards" => o.shards = num("--shards").max(1) as usize,
            "--bin-dir" => o.bin_dir = args.next().map(PathBuf::from),
            // `cargo bench` passes --bench; filters do not apply here.
            _ => {}
        }
    }
    o
}

/// Builds the release binaries and returns the target directory holding them.
fn build() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bin",
            "tickshard",
            "--bin",
            "client-sim",
        ])
        .current_dir(root)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the release binaries failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("release")
}

/// Runs the child on one core only (`None`: on any core).
fn pinned(cmd: &mut Command, core: Option<usize>) -> &mut Command {
    let Some(core) = core else {
        return cmd;
    };
    // SAFETY: sched_setaffinity on the child itself between fork and exec; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

#[derive(Debug, Clone, Default)]
struct Point {
    bots: usize,
    connected: f64,
    delivery: f64,
    server_cpu_us: f64,
    swarm_cpu_us: f64,
    tick_p50_us: f64,
    tick_p99_us: f64,
    late_p50_us: f64,
    late_p99_us: f64,
    overruns: f64,
    bytes_in: f64,
    bytes_out: f64,
    mem_per_player: f64,
    rtt_p99_ms: f64,
    /// UDP datagrams into and out of the server per player-tick, and the ACK-only ones among
    /// them (the server's counters over the steady window; player-ticks = snapshots sent).
    pkts_in: f64,
    pkts_out: f64,
    ack_only_in: f64,
    ack_only_out: f64,
}

impl Point {
    fn holds(&self, period_us: f64) -> bool {
        self.connected >= self.bots as f64
            && self.delivery >= 0.99
            && self.tick_p99_us < period_us / 2.0
    }
}

/// `key=value` figures of a log line (ANSI colours stripped).
fn field(line: &str, key: &str) -> Option<f64> {
    let mut clean = String::with_capacity(line.len());
    let mut esc = false;
    for c in line.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => clean.push(c),
        }
    }
    clean.split_whitespace().find_map(|w| {
        let (k, v) = w.split_once('=')?;
        (k == key)
            .then(|| v.trim_matches('"').parse().ok())
            .flatten()
    })
}

fn run_point(bin: &Path, o: &Opts, bots: usize) -> Point {
    let dir = std::env::temp_dir().join(format!("tickshard-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench directory");
    // One shard: server on core 0, swarm on core 1. More: the server's shards pin themselves
    // to every core and the swarm runs where the scheduler puts it.
    let (server_core, swarm_core) = if o.shards == 1 {
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    let mut server = pinned(&mut Command::new(bin.join("tickshard")), server_core)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--shards", &o.shards.to_string()])
        .args(["--room-capacity", &o.room.to_string()])
        .args(["--tick-rate", &o.tick_rate.to_string()])
        .args(["--stats-interval", &o.window.to_string()])
        .arg("--data-dir")
        .arg(&dir)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tickshard");
    let mut first = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read the server's first line");
    let addr = first
        .split_whitespace()
        .nth(3)
        .expect("address")
        .to_string();
    let pin = first
        .split("sha256=")
        .nth(1)
        .expect("fingerprint")
        .trim()
        .to_string();
    let admin = first
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .expect("admin address")
        .to_string();
    // Optional load on the admin endpoint: a Prometheus scrape every `scrape_ms`.
    let scraping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(o.scrape_ms > 0));
    let scraper = {
        let (on, admin, every) = (scraping.clone(), admin.clone(), o.scrape_ms);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                if scrape(&admin) {
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(every));
            }
            n
        })
    };
    let stderr = server.stderr.take().expect("stderr");
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("shard stats"))
            .collect::<Vec<_>>()
    });
    // Ramp and settle fill the first stats window; the steady phase is the second.
    let settle = 2;
    let ramp = o.window - settle;
    let json = dir.join("swarm.json");
    let out = pinned(&mut Command::new(bin.join("client-sim")), swarm_core)
        .args(["--server", &addr, "--pin", &pin])
        .args(["--bots", &bots.to_string(), "--threads", "1"])
        .args(["--ramp", &format!("{ramp}s")])
        .args(["--duration", &format!("{}s", o.window + settle)])
        .args(["--tick-rate", &o.tick_rate.to_string()])
        .args(["--server-pid", &server.id().to_string()])
        .args([
            "--progress",
            "off",
            "--join-timeout",
            "20s",
            "--admin",
            &admin,
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run client-sim");
    scraping.store(false, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.join().unwrap_or(0);
    if o.scrape_ms > 0 {
        println!("  ({scrapes} scrapes of /metrics during the run)");
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
    let lines = log.join().unwrap_or_default();
    let report: Value = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| {
            panic!(
                "client-sim wrote no report:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let _ = std::fs::remove_dir_all(&dir);
    let g = |path: &[&str]| {
        let mut v = &report;
        for k in path {
            v = &v[*k];
        }
        v.as_f64().unwrap_or(f64::NAN)
    };
    // Each shard's second stats line covers the steady phase. Across shards: the worst
    // percentiles, the sums of counts.
    let steady: Vec<String> = (0..o.shards)
        .filter_map(|sh| {
            let mine: Vec<&String> = lines
                .iter()
                .filter(|l| field(l, "shard") == Some(sh as f64))
                .collect();
            mine.get(1).or(mine.last()).map(|l| l.to_string())
        })
        .collect();
    let w = |k: &str| {
        let v: Vec<f64> = steady.iter().filter_map(|l| field(l, k)).collect();
        if v.is_empty() {
            f64::NAN
        } else if k.contains("_p50_") || k.contains("_p99_") {
            v.iter().copied().fold(f64::MIN, f64::max)
        } else {
            v.iter().sum()
        }
    };
    let per_pt = |k: &str| w(k) / w("window_snapshots");
    Point {
        pkts_in: per_pt("window_udp_in"),
        pkts_out: per_pt("window_udp_out"),
        ack_only_in: per_pt("window_ack_only_in"),
        ack_only_out: per_pt("window_ack_only_out"),
        bots,
        connected: g(&["connected"]),
        delivery: g(&["snapshot_delivery_ratio"]),
        server_cpu_us: g(&["steady", "server_cpu_us_per_player_tick"]),
        swarm_cpu_us: g(&["steady", "swarm_cpu_us_per_bot_tick"]),
        tick_p50_us: w("window_tick_p50_us"),
        tick_p99_us: w("window_tick_p99_us"),
        late_p50_us: w("window_late_p50_us"),
        late_p99_us: w("window_late_p99_us"),
        overruns: w("window_overruns"),
        bytes_in: g(&["steady", "bytes_in_per_player_per_s"]),
        bytes_out: g(&["steady", "bytes_out_per_player_per_s"]),
        mem_per_player: g(&["steady", "server_bytes_per_player"]),
        rtt_p99_ms: g(&["rtt_ms", "p99"]),
    }
}

/// One `GET /metrics`; whether it answered 200.
fn scrape(admin: &str) -> bool {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    agent
        .get(format!("http://{admin}/metrics"))
        .call()
        .and_then(|mut r| r.body_mut().read_to_string())
        .is_ok()
}

fn print_header() {
    println!(
        "{:>6} {:>9} {:>8} {:>12} {:>11} {:>11} {:>11} {:>11} {:>8} {:>10} {:>10} {:>10} {:>8} {:>11}",
        "bots", "connected", "delivery", "srv µs/p-t", "tick p50µs", "tick p99µs", "late p50µs",
        "late p99µs", "overrun", "B/p/s in", "B/p/s out", "B/player", "rtt p99", "swarm µs/b-t"
    );
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9}   (datagrams per player-tick: in, out, ACK-only in, ACK-only out)",
        "", "pkt in", "pkt out", "ack in", "ack out"
    );
}

fn print_point(p: &Point) {
    println!(
        "{:>6} {:>9} {:>8.4} {:>12.2} {:>11.0} {:>11.0} {:>11.0} {:>11.0} {:>8} {:>10.0} {:>10.0} {:>10.0} {:>8.2} {:>11.2}",
        p.bots,
        p.connected,
        p.delivery,
        p.server_cpu_us,
        p.tick_p50_us,
        p.tick_p99_us,
        p.late_p50_us,
        p.late_p99_us,
        p.overruns,
        p.bytes_in,
        p.bytes_out,
        p.mem_per_player,
        p.rtt_p99_ms,
        p.swarm_cpu_us
    );
    println!(
        "{:>6} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        "", p.pkts_in, p.pkts_out, p.ack_only_in, p.ack_only_out
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let o = parse_opts();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cores >= 2,
        "the swarm benchmark needs two cores (server on one, swarm on the other)"
    );
    let bin = match &o.bin_dir {
        Some(d) => d.clone(),
        None => build(),
    };
    let period_us = 1e6 / o.tick_rate as f64;
    println!(
        "swarm benchmark: {}, rooms of {}, {} Hz, steady window {} s",
        if o.shards == 1 {
            "1 shard on core 0, swarm on core 1".to_string()
        } else {
            format!("{} shards on every core, swarm unpinned", o.shards)
        },
        o.room,
        o.tick_rate,
        o.window
    );
    if o.sweep {
        print_header();
        let mut good = 0;
        let mut bad = None;
        let mut n = 500;
        while bad.is_none() && n <= 32_000 {
            let p = run_point(&bin, &o, n);
            print_point(&p);
            if p.holds(period_us) {
                good = n;
                n *= 2;
            } else {
                bad = Some(n);
            }
        }
        if let Some(mut hi) = bad {
            while hi - good > 250 {
                let mid = (good + hi) / 2 / 250 * 250;
                if mid <= good {
                    break;
                }
                let p = run_point(&bin, &o, mid);
                print_point(&p);
                if p.holds(period_us) {
                    good = mid;
                } else {
                    hi = mid;
                }
            }
        }
        println!(
            "largest N held at {} Hz (tick p99 < {:.1} ms, delivery >= 99%): {good}",
            o.tick_rate,
            period_us / 2000.0
        );
        return;
    }
    print_header();
    let points: Vec<Point> = (0..o.runs)
        .map(|_| {
            let p = run_point(&bin, &o, o.bots);
            print_point(&p);
            p
        })
        .collect();
    if points.len() > 1 {
        let m = |f: fn(&Point) -> f64| median(points.iter().map(f).collect());
        println!("median of {} runs:", points.len());
        print_point(&Point {
            bots: o.bots,
            connected: m(|p| p.connected),
            delivery: m(|p| p.delivery),
            server_cpu_us: m(|p| p.server_cpu_us),
            swarm_cpu_us: m(|p| p.swarm_cpu_us),
            tick_p50_us: m(|p| p.tick_p50_us),
            tick_p99_us: m(|p| p.tick_p99_us),
            late_p50_us: m(|p| p.late_p50_us),
            late_p99_us: m(|p| p.late_p99_us),
            overruns: m(|p| p.overruns),
            bytes_in: m(|p| p.bytes_in),
            bytes_out: m(|p| p.bytes_out),
            mem_per_player: m(|p| p.mem_per_player),
            rtt_p99_ms: m(|p| p.rtt_p99_ms),
            pkts_in: m(|p| p.pkts_in),
            pkts_out: m(|p| p.pkts_out),
            ack_only_in: m(|p| p.ack_only_in),
            ack_only_out: m(|p| p.ack_only_out),
        });
    }
}
