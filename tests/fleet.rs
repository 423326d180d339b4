//! The server on Agones: with `AGONES_SDK_HTTP_PORT` set, the real binary marks itself Ready
//! once its shards serve, sends Health, labels its version, reports rooms and players as
//! Counters and the room ids as a List while bots play, and after a SIGTERM drain asks for
//! Shutdown before it exits 0. The SDK sidecar is a fake in this process that keeps the
//! GameServer's counters and lists as Agones's REST API does.

mod common;

use client_sim::drive::UdpClient;
use client_sim::{ClientConfig, SessionState, Trust};
use common::Server;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Sdk {
    requests: Vec<(String, String, Value)>,
    counters: BTreeMap<String, (i64, i64)>,
    lists: BTreeMap<String, (i64, Vec<String>)>,
    labels: BTreeMap<String, String>,
    state: String,
}

struct FakeSdk {
    port: u16,
    sdk: Arc<Mutex<Sdk>>,
    stop: Arc<AtomicBool>,
}

impl Drop for FakeSdk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn answer(sdk: &mut Sdk, method: &str, path: &str, body: &Value) -> (u16, Value) {
    sdk.requests
        .push((method.to_string(), path.to_string(), body.clone()));
    match (method, path) {
        ("POST", "/ready") => {
            sdk.state = "Ready".into();
            (200, json!({}))
        }
        ("POST", "/shutdown") => {
            sdk.state = "Shutdown".into();
            (200, json!({}))
        }
        ("POST", "/health") => (200, json!({})),
        ("PUT", "/metadata/label") => {
            let k = body["key"].as_str().unwrap_or_default().to_string();
            let v = body["value"].as_str().unwrap_or_default().to_string();
            sdk.labels.insert(k, v);
            (200, json!({}))
        }
        ("GET", "/gameserver") => (200, json!({"status": {"state": sdk.state}})),
        _ => {
            if let Some(name) = path.strip_prefix("/v1beta1/counters/") {
                let c = sdk.counters.entry(name.to_string()).or_insert((0, 0));
                if method == "PATCH" {
                    if let Some(cap) = body.get("capacity").and_then(int) {
                        c.1 = cap;
                    }
                    if let Some(n) = body.get("count").and_then(int) {
                        c.0 = n;
                    }
                }
                let c = *c;
                return (
                    200,
                    json!({"name": name, "count": c.0.to_string(), "capacity": c.1.to_string()}),
                );
            }
            if let Some(rest) = path.strip_prefix("/v1beta1/lists/") {
                let (name, op) = rest.split_once(':').unwrap_or((rest, ""));
                let l = sdk
                    .lists
                    .entry(name.to_string())
                    .or_insert((1000, Vec::new()));
                let value = body["value"].as_str().unwrap_or_default().to_string();
                match (method, op) {
                    ("PATCH", "") => {
                        if let Some(cap) = body.get("capacity").and_then(int) {
                            l.0 = cap;
                        }
                    }
                    ("POST", "addValue") => {
                        if l.1.contains(&value) {
                            return (409, json!({"error": "already exists"}));
                        }
                        l.1.push(value);
                    }
                    ("POST", "removeValue") => {
                        if !l.1.contains(&value) {
                            return (404, json!({"error": "not found"}));
                        }
                        l.1.retain(|v| *v != value);
                    }
                    _ => {}
                }
                return (
                    200,
                    json!({"name": name, "capacity": l.0.to_string(), "values": l.1}),
                );
            }
            (404, json!({"error": "unknown path"}))
        }
    }
}

fn serve(mut s: TcpStream, sdk: &Mutex<Sdk>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let Ok(read_half) = s.try_clone() else {
        return;
    };
    let mut r = BufReader::new(read_half);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut len = 0;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if path == "/watch/gameserver" {
        // One event, then the stream ends (the client reconnects).
        let state = sdk.lock().unwrap_or_else(|e| e.into_inner()).state.clone();
        let ev = json!({"result": {"status": {"state": state}}}).to_string() + "\n";
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{ev}\r\n0\r\n\r\n",
            ev.len()
        );
        return;
    }
    let (code, v) = answer(
        &mut sdk.lock().unwrap_or_else(|e| e.into_inner()),
        &method,
        &path,
        &body,
    );
    let text = v.to_string();
    let _ = write!(
        s,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

fn fake_sdk() -> FakeSdk {
    fake_sdk_on("127.0.0.1:0")
}

/// A fake sidecar listening on `addr`.
fn fake_sdk_on(addr: &str) -> FakeSdk {
    let listener = TcpListener::bind(addr)
        .unwrap_or_else(|e| panic!("the fake sidecar cannot listen on {addr}: {e}"));
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let sdk = Arc::new(Mutex::new(Sdk {
        state: "Scheduled".into(),
        ..Default::default()
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let (sdk2, stop2) = (sdk.clone(), stop.clone());
    std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let sdk = sdk2.clone();
                    std::thread::spawn(move || serve(s, &sdk));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    FakeSdk { port, sdk, stop }
}

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
    let fake = fake_sdk();
    let port = fake.port.to_string();
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
        &[("AGONES_SDK_HTTP_PORT", &port)],
    );
    wait_for("Ready", Duration::from_secs(10), || {
        fake.sdk.lock().unwrap_or_else(|e| e.into_inner()).state == "Ready"
    });
    {
        let sdk = fake.sdk.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            sdk.labels.keys().any(|k| k.contains("version")),
            "version label: {:?}",
            sdk.labels
        );
    }
    // A matchmaker allocates the GameServer: the server sees it (the watch stream or a poll)
    // and says so in its status.
    fake.sdk.lock().unwrap_or_else(|e| e.into_inner()).state = "Allocated".into();
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
            let sdk = fake.sdk.lock().unwrap();
            (
                sdk.counters.get("players").map_or(0, |c| c.0),
                sdk.counters.get("rooms").map_or(0, |c| c.0),
                sdk.lists.get("rooms").map_or(0, |l| l.1.len() as i64),
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
        let sdk = fake.sdk.lock().unwrap_or_else(|e| e.into_inner());
        let (players, players_cap) = sdk.counters["players"];
        let (rooms, rooms_cap) = sdk.counters["rooms"];
        assert_eq!(players, 6);
        assert!(players_cap >= 6, "player capacity {players_cap}");
        assert!(
            rooms >= 2 && rooms_cap >= rooms,
            "rooms {rooms}/{rooms_cap}"
        );
        assert_eq!(
            sdk.lists["rooms"].1.len() as i64,
            rooms,
            "one list entry per room: {:?}",
            sdk.lists["rooms"].1
        );
        let healths = sdk
            .requests
            .iter()
            .filter(|(m, p, _)| m == "POST" && p == "/health")
            .count();
        assert!(healths >= 1, "health is sent");
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
    let sdk = fake.sdk.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(sdk.state, "Shutdown", "Shutdown asked before exit");
    let last_ready = sdk
        .requests
        .iter()
        .rposition(|(m, p, _)| m == "POST" && p == "/ready")
        .unwrap();
    let shutdown = sdk
        .requests
        .iter()
        .position(|(m, p, _)| m == "POST" && p == "/shutdown")
        .unwrap();
    assert!(shutdown > last_ready, "Shutdown comes after Ready");
}

#[test]
fn without_agones_nothing_is_asked_of_a_sidecar() {
    // A sidecar on Agones' default port (9358) that nobody announced: a server without
    // AGONES_SDK_HTTP_PORT must not call it, must serve, and must say it has no fleet manager.
    let fake = fake_sdk_on("127.0.0.1:9358");
    let requests = |fake: &FakeSdk| {
        fake.sdk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
            .len()
    };
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
    assert_eq!(requests(&fake), 0, "the unannounced sidecar was called");
    drop(server);
    // The same sidecar, announced: the server calls it at once (the check above can fail).
    let announced = Server::start_with_env(
        "fleet-announced",
        &["--shards", "1"],
        &[(tickshard::fleet::agones::PORT_VAR, "9358")],
    );
    wait_for(
        "the announced sidecar to be called",
        Duration::from_secs(5),
        || requests(&fake) > 0,
    );
    drop(announced);
}
