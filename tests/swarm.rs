//! The swarm against a real server: 200 bots against a 2-shard server for 10 s, on a perfect
//! link and on a poor one. The release builds of both binaries run (a debug build measures the
//! compiler's debug code, not the product); the tests read the swarm's JSON report.

mod common;

use common::{release_binary, Server};
use serde_json::Value;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// The two swarms must not share the machine's two cores with each other.
static ONE_SWARM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn swarm(name: &str, extra: &[&str]) -> (Value, String) {
    let _one = ONE_SWARM_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let server = Server::start_release(
        name,
        &[
            "--shards",
            "2",
            "--room-capacity",
            "50",
            "--stats-interval",
            "0",
        ],
    );
    let json = server.data_dir.join("report.json");
    let out = Command::new(release_binary("client-sim"))
        .args(["--server", &server.addr.to_string()])
        .args(["--pin", &server.fingerprint])
        .args(["--bots", "200", "--ramp", "2s", "--duration", "10s"])
        .args(["--threads", "1", "--seed", "7", "--progress", "lines"])
        .arg("--json")
        .arg(&json)
        .args(extra)
        .output()
        .expect("run client-sim");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(
        &std::fs::read(&json).unwrap_or_else(|e| panic!("no report ({e}):\n{text}")),
    )
    .unwrap();
    (report, text)
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} missing in the report: {v}"))
}

#[test]
fn two_hundred_bots_on_two_shards_get_every_snapshot() {
    let (r, text) = swarm("swarm-perfect", &["--expect-delivery", "0.99"]);
    assert_eq!(f(&r, &["connected"]), 200.0, "{text}");
    assert!(f(&r, &["snapshot_delivery_ratio"]) >= 0.99, "{text}");
    assert_eq!(f(&r, &["decode_errors"]), 0.0, "{text}");
    assert_eq!(f(&r, &["divergences"]), 0.0, "{text}");
    assert!(
        f(&r, &["movement_checked"]) > 200.0 * 30.0 * 5.0,
        "every bot checks its movement all along: {text}"
    );
    assert!(
        f(&r, &["snapshots_per_bot_per_s", "worst"]) > 28.0,
        "{text}"
    );
    assert!(f(&r, &["handshake_ms", "samples"]) == 200.0, "{text}");
    assert!(f(&r, &["input_ack_ms", "p50"]) > 0.0, "{text}");
}

/// The `poor` preset: 100 ms ± 25 ms each way, 4% loss each way, 1% held back by up to three
/// latencies. What that link allows:
/// - every bot connects: the QUIC handshake retransmits lost flights, well inside the 10 s
///   join timeout;
/// - delivery at least 0.90: 4% of snapshots are lost on the way down, and a snapshot that
///   arrives after a newer one (the 1% held back) is useless and not counted, so about 0.95
///   is what a perfect server achieves here; 0.90 leaves room for a busy CI machine;
/// - RTT p99 under 400 ms: 200 ms of propagation plus up to 50 ms of jitter plus the
///   acknowledgement delay;
/// - zero decode errors and zero divergences: a lossy link may lose snapshots but must never
///   corrupt the world the client rebuilds from deltas, nor lose a command (each input carries
///   the unconfirmed earlier ones).
#[test]
fn two_hundred_bots_on_a_poor_link() {
    let (r, text) = swarm(
        "swarm-poor",
        &[
            "--link",
            "poor",
            "--expect-delivery",
            "0.90",
            "--expect-rtt-p99",
            "400",
        ],
    );
    assert_eq!(f(&r, &["connected"]), 200.0, "{text}");
    assert!(f(&r, &["snapshot_delivery_ratio"]) >= 0.90, "{text}");
    assert!(f(&r, &["rtt_ms", "p99"]) < 400.0, "{text}");
    assert!(
        f(&r, &["rtt_ms", "p50"]) > 150.0,
        "the link's latency is applied: {text}"
    );
    assert!(f(&r, &["link_dropped", "down"]) > 0.0, "{text}");
    assert!(f(&r, &["link_dropped", "up"]) > 0.0, "{text}");
    assert_eq!(f(&r, &["decode_errors"]), 0.0, "{text}");
    assert_eq!(f(&r, &["divergences"]), 0.0, "{text}");
    assert!(f(&r, &["movement_checked"]) > 200.0 * 20.0, "{text}");
}

/// A server killed (SIGKILL) and started again 0.1 s later on the same port and data
/// directory: bots run with `--reconnect` recognise the new process's stateless resets (one
/// reset key across restarts), connect again and are back in rooms within a few seconds,
/// instead of sitting out the idle timeout.
#[test]
fn after_a_crash_and_a_restart_reconnecting_bots_are_back_in_rooms_within_seconds() {
    let _one = ONE_SWARM_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let args = [
        "--shards",
        "2",
        "--room-capacity",
        "50",
        "--stats-interval",
        "0",
    ];
    let mut server = Server::start_release("swarm-crash", &args);
    let json = server.data_dir.join("report.json");
    let mut sim = Command::new(release_binary("client-sim"))
        .args(["--server", &server.addr.to_string()])
        .args(["--pin", &server.fingerprint])
        .args(["--bots", "100", "--ramp", "1s", "--duration", "12s"])
        .args([
            "--threads",
            "1",
            "--seed",
            "9",
            "--progress",
            "lines",
            "--reconnect",
        ])
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run client-sim");
    std::thread::sleep(Duration::from_secs(4));
    let mut again = server.crash_and_restart(
        release_binary("tickshard"),
        Duration::from_millis(100),
        &args,
    );
    let _ = sim.wait();
    let _ = again.kill();
    let _ = again.wait();
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the swarm's report")).unwrap();
    let resets = f(&report, &["stateless_resets"]);
    let reconnects = f(&report, &["reconnects"]);
    let recoveries: Vec<u64> = report["recoveries_ms"]
        .as_array()
        .expect("recoveries")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    eprintln!("resets {resets}, reconnects {reconnects}, recoveries (ms) {recoveries:?}");
    assert!(
        resets >= 90.0,
        "most bots learn of the restart by a reset: {resets}"
    );
    assert!(
        reconnects >= 100.0,
        "every bot connected again: {reconnects}"
    );
    assert!(
        recoveries.len() >= 100,
        "every bot back in a room: {}",
        recoveries.len()
    );
    let slowest = recoveries.iter().max().copied().unwrap_or(u64::MAX);
    assert!(
        slowest <= 5_000,
        "back within 5 s of the crash: slowest {slowest} ms"
    );
}
