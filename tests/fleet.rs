//! The server on Agones: with `AGONES_SDK_GRPC_PORT` set, the real binary marks itself Ready
//! once its shards serve, sends Health, labels its version, reports rooms and players as
//! Counters and the room ids as a List while bots play, and after a SIGTERM drain asks for
//! Shutdown before it exits 0. The SDK sidecar is the in-memory SDK server of
//! `tickshard::fleet::agones::local` (gRPC, the sidecar's rules), in this process.
//!
//! Built with `--features agones` (the README's test command has `--all-features`).
#![cfg(feature = "agones")]

mod common;

use client_sim::drive::UdpClient;
use client_sim::{ClientConfig, SessionState, Trust};
use common::Server;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use tickshard::fleet::agones::local::{GameServerRecord, LocalSdk};
use tickshard::fleet::AGONES_PORT_VAR;

fn status(admin: std::net::SocketAddr) -> Value {
    let Ok(mut s) = TcpStream::connect(admin) else {
        return Value::Null;
    };
    let _ = write!(
        s,
        "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null)
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn on_agones_the_server_reports_ready_capacity_and_shuts_down_after_a_drain() {
    let sdk = LocalSdk::start(GameServerRecord::tickshard()).expect("local sdk");
    let port = sdk.addr().port().to_string();
    let mut server = Server::start_with_env(
        "fleet",
        &[
            "--shards",
            "2",
            "--room-capacity",
            "4",
            "--drain-grace",
            "3",
        ],
        &[(AGONES_PORT_VAR, &port)],
    );
    wait_for("Ready", Duration::from_secs(10), || {
        sdk.record().state == "Ready"
    });
    let labels = sdk.record().labels;
    assert_eq!(
        labels
            .get("agones.dev/sdk-tickshard-version")
            .map(String::as_str),
        Some(env!("CARGO_PKG_VERSION")),
        "version label: {labels:?}"
    );
    // A matchmaker allocates the GameServer: the server sees it (the watch stream or a poll)
    // and says so in its status.
    sdk.set_state("Allocated");
    let admin = server.admin.expect("admin address");
    wait_for("allocated in /status", Duration::from_secs(10), || {
        status(admin)["process"]["fleet"]["allocated"] == json!(true)
    });
    assert_eq!(
        status(admin)["process"]["fleet"]["manager"],
        json!("agones")
    );
    // Six players: two rooms of up to four.
    let config = ClientConfig::new(Trust::pin(&server.fingerprint).unwrap(), "localhost");
    let mut bots: Vec<UdpClient> = (0..6)
        .map(|_| UdpClient::connect(server.addr, &config, None).unwrap())
        .collect();
    for b in &mut bots {
        b.client.join(None, "arena");
    }
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        for b in &mut bots {
            b.run_for(Duration::from_millis(2)).unwrap();
        }
        let seated = bots
            .iter()
            .filter(|b| matches!(b.client.state(), SessionState::InRoom { .. }))
            .count();
        let (players, rooms, listed) = {
            let record = sdk.record();
            (
                record.counters["players"].0,
                record.counters["rooms"].0,
                record.lists["rooms"].1.len() as i64,
            )
        };
        if seated == 6 && players == 6 && rooms >= 2 && listed == rooms {
            break;
        }
        assert!(
            Instant::now() < end,
            "capacity never reported (seated {seated}, players {players}, rooms {rooms}, listed {listed})"
        );
    }
    {
        let record = sdk.record();
        let (players, players_cap) = record.counters["players"];
        let (rooms, rooms_cap) = record.counters["rooms"];
        assert_eq!(players, 6);
        assert!(players_cap >= 6, "player capacity {players_cap}");
        assert!(
            rooms >= 2 && rooms_cap >= rooms,
            "rooms {rooms}/{rooms_cap}"
        );
        assert_eq!(
            record.lists["rooms"].1.len() as i64,
            rooms,
            "one list entry per room: {:?}",
            record.lists["rooms"].1
        );
        assert!(sdk.count("Health") >= 1, "health is sent");
    }
    // SIGTERM: the drain runs, the bots leave, the server asks Agones to shut down, exits 0.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        for b in &mut bots {
            let _ = b.run_for(Duration::from_millis(2));
            if matches!(b.client.state(), SessionState::InRoom { .. }) {
                b.client.leave();
            }
        }
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < end,
            "the server did not exit after the drain"
        );
    };
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(sdk.record().state, "Shutdown", "Shutdown asked before exit");
    let calls = sdk.calls();
    let last_ready = calls.iter().rposition(|c| c.method == "Ready").unwrap();
    let shutdown = calls.iter().position(|c| c.method == "Shutdown").unwrap();
    assert!(shutdown > last_ready, "Shutdown comes after Ready");
}

#[test]
fn without_agones_nothing_is_asked_of_a_sidecar() {
    // A sidecar on Agones' default gRPC port (9357, where the SDK looks when no port is
    // given) that nobody announced: a server without AGONES_SDK_GRPC_PORT must not call it,
    // must serve, and must say it has no fleet manager.
    let sdk = LocalSdk::start_on(
        "127.0.0.1:9357".parse().unwrap(),
        GameServerRecord::tickshard(),
    )
    .unwrap_or_else(|e| panic!("the local sidecar cannot listen on 9357: {e}"));
    let server = Server::start("fleet-none", &["--shards", "1"]);
    let admin = server.admin.expect("admin address");
    // Past the first capacity report (once a second), when a fleet hook would be called.
    wait_for("the shard to serve", Duration::from_secs(5), || {
        status(admin)["shards"][0]["players"].is_number()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let st = status(admin);
    assert_eq!(
        st["process"].get("fleet"),
        Some(&Value::Null),
        "no fleet manager, yet /status says {st}"
    );
    assert!(sdk.calls().is_empty(), "the unannounced sidecar was called");
    drop(server);
    // The same sidecar, announced: the server calls it at once (the check above can fail).
    let announced = Server::start_with_env(
        "fleet-announced",
        &["--shards", "1"],
        &[(AGONES_PORT_VAR, "9357")],
    );
    wait_for(
        "the announced sidecar to be called",
        Duration::from_secs(5),
        || !sdk.calls().is_empty(),
    );
    let admin = announced.admin.expect("admin address");
    wait_for("/status names Agones", Duration::from_secs(5), || {
        status(admin)["process"]["fleet"]["manager"] == json!("agones")
    });
    drop(announced);
}

#[test]
fn a_garbled_sidecar_port_stops_the_server_with_its_name() {
    let exe = common::binary("tickshard");
    let out = std::process::Command::new(exe)
        .args([
            "--shards",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .env(AGONES_PORT_VAR, "nine")
        .output()
        .expect("run tickshard");
    assert!(!out.status.success(), "started with a garbled sidecar port");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(AGONES_PORT_VAR), "{stderr}");
}
