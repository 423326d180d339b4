//! The swarm against a real server: 200 bots against a 2-shard server for 10 s, on a perfect
//! link and on a poor one. The release builds of both binaries run (a debug build measures the
//! compiler's debug code, not the product); the tests read the swarm's JSON report.

mod common;

use common::{release_binary, Server};
use serde_json::Value;
use std::process::Command;
use std::sync::Mutex;

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
