//! Instruction counts of a fixed harness scenario: what one player-tick costs the server and
//! one bot-tick costs the client, without the machine's noise.
//!
//! ```text
//! cargo bench --bench instructions              # under callgrind when valgrind is installed
//! cargo bench --bench instructions -- --native  # the same scenario once, natively (quick)
//! ```
//!
//! The scenario is the deterministic network of `tests/harness` (virtual clock, seeded links):
//! 200 clients on one shard in rooms of 50 at 30 Hz, both directions 20 ms ± 5 ms with 2% loss,
//! every client moving (one input per tick). After the handshakes and 30 ticks of warm-up, 300
//! ticks are measured. Each call into the shard runs inside `harness::measured_server` and each
//! call into a client inside `harness::measured_client`; callgrind counts only inside those
//! frames (`--toggle-collect`), so the harness's own work (its event queue, link conditioner,
//! copies) is not counted. The same binary, inputs and seed give the same counts, whatever else
//! the machine is doing.
//!
//! Figures: server instructions per player-tick (player-ticks = snapshots the shard produced),
//! client instructions per bot-tick, and the shard's datagrams in and out per player-tick.

#[path = "../tests/harness/mod.rs"]
mod harness;

use harness::{Link, Net, NetConfig};
use std::process::Command;
use std::time::{Duration, Instant};

const CLIENTS: usize = 200;
const WARMUP_TICKS: u32 = 30;
const TICKS: u32 = 300;

/// Figures of one run of the scenario (from the shard's counters; exact and repeatable).
struct Figures {
    player_ticks: u64,
    bot_ticks: u64,
    udp_in: u64,
    udp_out: u64,
    ack_only_in: u64,
    ack_only_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    wall: Duration,
}

fn link() -> Link {
    Link {
        loss: 0.02,
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        ..Link::PERFECT
    }
}

fn scenario() -> Figures {
    let mut net = Net::new(NetConfig {
        capacity: 50,
        up: link(),
        down: link(),
        seed: 7,
        ..NetConfig::default()
    });
    for _ in 0..CLIENTS {
        net.add_client();
    }
    net.connect_all(Duration::from_secs(20));
    for i in 0..CLIENTS {
        net.clients[i].client.join(None, "arena");
    }
    net.run_for(Duration::from_secs(2));
    let seated = net
        .clients
        .iter()
        .filter(|c| c.client.entity_id().is_some())
        .count();
    assert_eq!(seated, CLIENTS, "every client is seated before measuring");
    let moves = |i: usize, t: u32| Some(((i as i32 * 7 + t as i32) as i8, 64, 0, (t % 360) as u16));
    net.play(WARMUP_TICKS, moves);

    let sum = |net: &Net| {
        net.shards.iter().fold([0u64; 7], |mut a, s| {
            let c = s.counters();
            let q = s.quic_stats();
            a[0] += c.snapshots;
            a[1] += c.udp_in;
            a[2] += c.udp_out;
            a[3] += c.udp_bytes_in;
            a[4] += c.udp_bytes_out;
            a[5] += q.ack_only_in;
            a[6] += q.ack_only_out;
            a
        })
    };
    let history: usize = net.shards.iter().map(|s| s.history_bytes()).sum();
    println!(
        "snapshot history / player {} bytes (quinn Connection struct {} bytes)",
        history / CLIENTS,
        std::mem::size_of::<quinn_proto::Connection>()
    );
    let before = sum(&net);
    let started = Instant::now();
    net.measure = true;
    net.play(TICKS, |i, t| moves(i, t + WARMUP_TICKS));
    net.measure = false;
    let wall = started.elapsed();
    let after = sum(&net);
    Figures {
        player_ticks: after[0] - before[0],
        bot_ticks: (CLIENTS as u64) * TICKS as u64,
        udp_in: after[1] - before[1],
        udp_out: after[2] - before[2],
        ack_only_in: after[5] - before[5],
        ack_only_out: after[6] - before[6],
        bytes_in: after[3] - before[3],
        bytes_out: after[4] - before[4],
        wall,
    }
}

fn print_figures(f: &Figures) {
    let pt = f.player_ticks.max(1) as f64;
    println!(
        "scenario: {CLIENTS} clients, 1 shard, rooms of 50, 30 Hz, 20 ms ± 5 ms, 2% loss, {TICKS} ticks measured"
    );
    println!("player-ticks            {}", f.player_ticks);
    println!("datagrams in / p-tick   {:.3}", f.udp_in as f64 / pt);
    println!("datagrams out / p-tick  {:.3}", f.udp_out as f64 / pt);
    println!("ACK-only in / p-tick    {:.3}", f.ack_only_in as f64 / pt);
    println!("ACK-only out / p-tick   {:.3}", f.ack_only_out as f64 / pt);
    println!("bytes in / p-tick       {:.1}", f.bytes_in as f64 / pt);
    println!("bytes out / p-tick      {:.1}", f.bytes_out as f64 / pt);
    println!("wall time (measured)    {:.2?}", f.wall);
}

/// callgrind_annotate's inclusive count of the function named `frame` (its largest entry: code
/// inlined from other files is listed again under their names, and is part of it).
fn inclusive(annotated: &str, frame: &str) -> u64 {
    annotated
        .lines()
        .filter(|l| l.contains(frame))
        .filter_map(|l| {
            let n = l.split_whitespace().next()?;
            n.replace(',', "").parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--inner" || a == "--native") {
        // A subscriber as the server and the swarm install (warnings only): without one,
        // tracing hands every span quinn-proto opens per packet and per frame to the `log`
        // crate, a cost neither binary pays.
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(std::io::stderr)
            .init();
        let f = scenario();
        print_figures(&f);
        println!("bot-ticks               {}", f.bot_ticks);
        return;
    }
    let have_valgrind = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_valgrind {
        eprintln!(
            "valgrind is not installed: running the scenario natively (no instruction counts)"
        );
        print_figures(&scenario());
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let out = std::env::temp_dir().join(format!("tickshard-callgrind-{}.out", std::process::id()));
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg("--collect-atstart=no")
        .arg("--toggle-collect=*measured_server*")
        .arg("--toggle-collect=*measured_client*")
        .arg(&exe)
        .arg("--inner")
        .output()
        .expect("run valgrind");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the scenario failed under callgrind:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    print!("{stdout}");
    let annotated = Command::new("callgrind_annotate")
        .arg("--inclusive=yes")
        .arg("--auto=no")
        .arg("--threshold=100")
        .arg(&out)
        .output()
        .expect("run callgrind_annotate");
    let annotated = String::from_utf8_lossy(&annotated.stdout);
    let server = inclusive(&annotated, "measured_server");
    let client = inclusive(&annotated, "measured_client");
    let figure = |key: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} missing from the scenario's output"))
    };
    let player_ticks = figure("player-ticks");
    let bot_ticks = figure("bot-ticks");
    assert!(
        server > 0 && client > 0,
        "callgrind counted nothing:\n{annotated}"
    );
    println!("server instructions     {server}");
    println!("client instructions     {client}");
    println!(
        "server instr / p-tick   {:.0}",
        server as f64 / player_ticks as f64
    );
    println!(
        "client instr / bot-tick {:.0}",
        client as f64 / bot_ticks as f64
    );
    println!("callgrind profile       {}", out.display());
}
