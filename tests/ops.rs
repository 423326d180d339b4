//! Operations end to end: the real `tickshard` binary, real QUIC bots (client-sim's
//! `UdpClient`), and its admin HTTP endpoint: metrics, status, actions, bad requests, SIGTERM
//! drain with results, configuration, and `tickshard ctl`.

mod common;

use client_sim::drive::UdpClient;
use client_sim::{ClientConfig, ClientEvent, CloseReason, SessionState, Trust};
use common::{binary, Server};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};
use tickshard::ops::ctl::request;
use tickshard_schema::{codes, LeaveReason};

/// A bot: a QUIC client that joins quick match and sends inputs at 10 Hz.
struct Bot {
    udp: UdpClient,
    events: Vec<ClientEvent>,
    joined: bool,
    next_input: Instant,
}

impl Bot {
    fn room(&self) -> Option<u64> {
        match self.udp.client.state() {
            SessionState::InRoom { room_id, .. } => Some(*room_id),
            _ => None,
        }
    }
    fn closed(&self) -> Option<&CloseReason> {
        self.events.iter().find_map(|e| match e {
            ClientEvent::Closed(r) => Some(r),
            _ => None,
        })
    }
}

struct Bots(Vec<Bot>);

impl Bots {
    fn connect(server: &Server, n: usize) -> Bots {
        let config = ClientConfig::new(Trust::Roots(vec![server.cert_der().into()]), "localhost");
        Bots(
            (0..n)
                .map(|i| {
                    let mut seed = [7u8; 32];
                    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    Bot {
                        udp: UdpClient::connect(server.addr, &config, Some(seed)).unwrap(),
                        events: Vec::new(),
                        joined: false,
                        next_input: Instant::now(),
                    }
                })
                .collect(),
        )
    }

    /// Runs every bot's I/O once: join once welcomed, input at 10 Hz when seated.
    fn pump(&mut self) {
        let now = Instant::now();
        for b in &mut self.0 {
            let _ = b.udp.poll_io();
            while let Some(ev) = b.udp.client.poll_event() {
                b.events.push(ev);
            }
            if !b.joined && b.udp.client.player_id() != 0 {
                b.joined = true;
                b.udp.client.join(None, "arena");
            }
            if b.room().is_some() && now >= b.next_input {
                b.next_input = now + Duration::from_millis(100);
                b.udp.client.send_input(now, 40, -20, 0, 0);
            }
            let _ = b.udp.flush();
        }
    }

    /// Pumps for `d`, sleeping a little between passes.
    fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Pumps until `f` holds, or panics after `limit`.
    fn run_until(&mut self, limit: Duration, what: &str, mut f: impl FnMut(&Bots) -> bool) {
        let end = Instant::now() + limit;
        while !f(self) {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            self.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn admin(server: &Server) -> String {
    server.admin.expect("admin enabled").to_string()
}

fn get(server: &Server, path: &str, token: Option<&str>) -> (u16, String) {
    request(&admin(server), "GET", path, token, "").expect("admin reachable")
}

fn post(server: &Server, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    request(&admin(server), "POST", path, token, body).expect("admin reachable")
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict parser of the OpenMetrics text format as tickshard writes it: every sample line
/// is `name{labels} value` (labels optional), every family has HELP then TYPE before its
/// samples, sample names belong to their family (`_total` for counters, `_info` for info,
/// `_bucket`, `_sum`, `_count` for histograms), every histogram series has cumulative
/// buckets ending in `+Inf` equal to `_count`, and the exposition ends with `# EOF`.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let text = text
        .strip_suffix("# EOF\n")
        .expect("the exposition ends with # EOF");
    let mut samples = Vec::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a text");
            assert!(!help.is_empty());
            assert!(helped.insert(name.to_string()), "HELP for {name} twice");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(helped.contains(name), "TYPE before HELP for {name}");
            assert!(
                ["counter", "gauge", "histogram", "info"].contains(&kind),
                "bad type {kind}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "TYPE for {name} twice"
            );
            current = Some((name.to_string(), kind.to_string()));
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("labels end with }");
                let mut labels = BTreeMap::new();
                for pair in body.split(',') {
                    let (k, v) = pair.split_once('=').expect("label is k=v");
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "bad label name {k}"
                    );
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .expect("label value quoted");
                    assert!(labels.insert(k.to_string(), v.to_string()).is_none());
                }
                (name.to_string(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name {name}"
        );
        let (family, kind) = current.as_ref().expect("sample before TYPE");
        let ok = match kind.as_str() {
            "histogram" => [
                format!("{family}_bucket"),
                format!("{family}_sum"),
                format!("{family}_count"),
            ]
            .contains(&name),
            "counter" => name == format!("{family}_total"),
            "info" => name == format!("{family}_info"),
            _ => &name == family,
        };
        assert!(ok, "sample {name} outside its family {family}");
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    // Histograms: per series (labels without le), buckets cumulative, +Inf == _count.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        let mut counts: BTreeMap<BTreeMap<String, String>, f64> = BTreeMap::new();
        for s in &samples {
            let mut key = s.labels.clone();
            if s.name == format!("{family}_bucket") {
                let le = key.remove("le").expect("bucket has le");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le is a number")
                };
                series.entry(key).or_default().push((le, s.value));
            } else if s.name == format!("{family}_count") {
                counts.insert(key, s.value);
            }
        }
        assert!(!series.is_empty(), "{family} has no series");
        for (key, buckets) in &series {
            assert!(
                buckets.windows(2).all(|w| w[0].0 < w[1].0),
                "{family} le order"
            );
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family} not cumulative"
            );
            let last = buckets.last().unwrap();
            assert!(last.0.is_infinite(), "{family} ends without +Inf");
            assert_eq!(
                Some(&last.1),
                counts.get(key),
                "{family}{key:?} +Inf != _count"
            );
        }
    }
    samples
}

fn sum(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

#[test]
fn metrics_status_and_sigterm_drain_with_100_bots() {
    let server = Server::start(
        "ops-drain",
        &[
            "--shards",
            "2",
            "--tick-rate",
            "10",
            "--room-capacity",
            "16",
            "--drain-grace",
            "15",
            "--reconnect-hint",
            "next.example:4433",
            "--stats-interval",
            "0",
        ],
    );
    assert_eq!(get(&server, "/healthz", None).0, 200);
    let mut bots = Bots::connect(&server, 100);
    bots.run_until(Duration::from_secs(20), "100 bots seated", |b| {
        b.0.iter().all(|b| b.room().is_some())
    });
    bots.run_for(Duration::from_millis(300));

    // Metrics: strict parse, and the shards' players add up (reports come every 250 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    let samples = loop {
        let (status, text) = get(&server, "/metrics", None);
        assert_eq!(status, 200);
        let samples = parse_prometheus(&text);
        if sum(&samples, "tickshard_players") == 100.0 || Instant::now() > deadline {
            break samples;
        }
        bots.run_for(Duration::from_millis(100));
    };
    assert_eq!(sum(&samples, "tickshard_players"), 100.0);
    for name in [
        "tickshard_tick_lateness_seconds_count",
        "tickshard_ticks_total",
        "tickshard_handshakes_total",
        "tickshard_input_queue_depth_count",
    ] {
        assert!(sum(&samples, name) > 0.0, "{name} is zero");
    }
    let phases: BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.name == "tickshard_tick_duration_seconds_count")
        .filter_map(|s| s.labels.get("phase").map(String::as_str))
        .collect();
    assert_eq!(
        phases,
        BTreeSet::from(["total", "ingest", "apply", "simulate", "snapshot", "flush"])
    );
    assert_eq!(sum(&samples, "tickshard_build_info"), 1.0);
    assert_eq!(sum(&samples, "tickshard_draining"), 0.0);
    assert!(
        sum(&samples, "tickshard_rooms") >= 7.0,
        "100 players in rooms of 16"
    );

    // Status agrees.
    let (status, body) = get(&server, "/status", None);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["process"]["shards"], 2);
    assert_eq!(v["process"]["draining"], false);
    let shard_players: u64 = v["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["players"].as_u64().unwrap())
        .sum();
    assert_eq!(shard_players, 100);
    let rooms: Vec<u64> = v["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    let seated: BTreeSet<u64> = bots.0.iter().filter_map(Bot::room).collect();
    assert_eq!(rooms.iter().copied().collect::<BTreeSet<_>>(), seated);
    let room_players: u64 = v["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["players"].as_u64().unwrap())
        .sum();
    assert_eq!(room_players, 100);
    assert!(v["shards"][0]["cpu_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(get(&server, "/readyz", None).0, 200);

    // SIGTERM: every bot hears the drain notice, leaves, and the process exits 0.
    let mut server = server;
    let sigterm = Instant::now();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
    let mut not_ready = false;
    let mut exit = None;
    let mut notices_at = None;
    while exit.is_none() {
        assert!(
            sigterm.elapsed() < Duration::from_secs(15),
            "no exit within the grace"
        );
        bots.pump();
        for b in &mut bots.0 {
            let noticed = b.events.iter().any(|e| {
                matches!(e, ClientEvent::Drain { reconnect_hint, grace_ms }
                    if reconnect_hint == "next.example:4433" && *grace_ms <= 15_000)
            });
            if noticed && b.room().is_some() {
                b.udp.client.leave();
            }
        }
        if notices_at.is_none()
            && bots.0.iter().all(|b| {
                b.events
                    .iter()
                    .any(|e| matches!(e, ClientEvent::Drain { .. }))
            })
        {
            notices_at = Some(sigterm.elapsed());
        }
        if !not_ready {
            if let Ok((503, _)) = request(&admin(&server), "GET", "/readyz", None, "") {
                not_ready = true;
            }
        }
        exit = server.child.try_wait().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = sigterm.elapsed();
    let exit = exit.unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    let noticed = bots
        .0
        .iter()
        .filter(|b| {
            b.events
                .iter()
                .any(|e| matches!(e, ClientEvent::Drain { .. }))
        })
        .count();
    assert_eq!(noticed, 100, "every bot got the drain notice");
    assert!(not_ready, "/readyz said 503 while draining");
    eprintln!(
        "drain of 100 bots: all notices after {:?}, exit 0 after {took:?}",
        notices_at.unwrap()
    );

    // The results file holds every room, with its players.
    let dir = server.data_dir.join("results");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 1, "one results file");
    let text = std::fs::read_to_string(files[0].path()).unwrap();
    let mut recorded = BTreeSet::new();
    let mut players = 0;
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        recorded.insert(r["room"].as_u64().unwrap());
        players += r["players"].as_array().unwrap().len();
    }
    assert_eq!(recorded, seated, "every room's result is recorded");
    assert_eq!(players, 100);
}

#[test]
fn kick_and_close_reach_clients_and_bad_requests_get_4xx() {
    let token = Some("s3cret");
    let server = Server::start(
        "ops-actions",
        &[
            "--shards",
            "2",
            "--tick-rate",
            "10",
            "--admin-token",
            "s3cret",
            "--stats-interval",
            "0",
        ],
    );
    let mut bots = Bots::connect(&server, 4);
    bots.run_until(Duration::from_secs(10), "bots seated", |b| {
        b.0.iter().all(|b| b.room().is_some())
    });

    // Close the first bot's room: its members get Left (RoomClosed).
    let room = bots.0[0].room().unwrap();
    let members: Vec<usize> = (0..4).filter(|&i| bots.0[i].room() == Some(room)).collect();
    let (status, body) = post(
        &server,
        &format!("/rooms/{room}/close"),
        token,
        r#"{"reason": "maintenance"}"#,
    );
    assert_eq!(status, 200, "{body}");
    bots.run_until(Duration::from_secs(5), "Left after close", |b| {
        members.iter().all(|&i| {
            b.0[i].events.iter().any(|e| {
                matches!(e, ClientEvent::Left { room_id, reason: LeaveReason::RoomClosed } if *room_id == room)
            })
        })
    });

    // Kick the last bot: its connection closes with KICKED and the reason.
    let player = bots.0[3].udp.client.player_id();
    let (status, body) = post(
        &server,
        &format!("/players/{player}/kick"),
        token,
        r#"{"reason": "cheating"}"#,
    );
    assert_eq!(status, 200, "{body}");
    bots.run_until(Duration::from_secs(5), "kick", |b| {
        b.0[3].closed().is_some()
    });
    assert_eq!(
        bots.0[3].closed(),
        Some(&CloseReason::Server {
            code: codes::KICKED as u64,
            reason: "cheating".into()
        })
    );
    assert!(bots.0[0].closed().is_none(), "others stay connected");

    // Filters.
    std::thread::sleep(Duration::from_millis(400));
    let (status, body) = get(&server, "/rooms?shard=0&mode=arena&min_free=1", token);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["shard"] == 0 && r["mode"] == "arena"));

    // Bad requests: 4xx with a JSON message.
    for (method, path, tok, body, want) in [
        ("GET", "/status", None, "", 401),
        ("GET", "/status", Some("wrong"), "", 401),
        ("GET", "/nope", token, "", 404),
        ("DELETE", "/status", token, "", 405),
        ("GET", "/drain", token, "", 405),
        ("POST", "/rooms/12345/close", token, "", 404),
        ("POST", "/rooms/xyz/close", token, "", 400),
        ("POST", "/players/999/kick", token, "{}", 404),
        ("POST", "/players/1/kick", token, "{bad json", 400),
        ("POST", "/shards/9/drain", token, "", 404),
        ("GET", "/rooms?min_free=lots", token, "", 400),
    ] {
        let (status, text) = request(&admin(&server), method, path, tok, body).unwrap();
        assert_eq!(status, want, "{method} {path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{text}");
    }

    // Shard drain: no new rooms there.
    assert_eq!(post(&server, "/shards/1/drain", token, "").0, 200);
    std::thread::sleep(Duration::from_millis(400));
    let (_, body) = get(&server, "/status", token);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["shards"][1]["draining"], true);
    assert_eq!(v["shards"][0]["draining"], false);
    assert_eq!(v["process"]["draining"], false);

    // ctl status: one table, an unreachable target shows its error.
    let out = Command::new(binary("tickshard"))
        .args(["ctl", "status", "--token", "s3cret", "--targets"])
        .arg(format!("{},127.0.0.1:1", admin(&server)))
        .output()
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("TARGET"));
    assert!(
        lines[1].starts_with(&admin(&server)) && lines[1].contains(" 2 "),
        "{table}"
    );
    assert!(
        lines[2].contains("127.0.0.1:1") && lines[2].contains("error"),
        "{table}"
    );
    // ctl drain of the process: the connected bots hear the drain notice.
    let out = Command::new(binary("tickshard"))
        .args(["ctl", "drain", "--token", "s3cret", "--target"])
        .arg(admin(&server))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    bots.run_until(Duration::from_secs(5), "drain notice", |b| {
        b.0[..3].iter().all(|b| {
            b.events
                .iter()
                .any(|e| matches!(e, ClientEvent::Drain { .. }))
        })
    });
    assert_eq!(get(&server, "/readyz", None).0, 503);
    let out = Command::new(binary("tickshard"))
        .args(["ctl", "drain", "--target"])
        .arg(admin(&server))
        .env_remove("TICKSHARD_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success(), "no token: refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

#[test]
fn print_config_and_bad_config_name_the_setting() {
    let dir = std::env::temp_dir().join(format!("tickshard-ops-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("server.toml");
    std::fs::write(&file, "tick_rate = 20\nroom_capacity = 8\nshards = 3\n").unwrap();
    let out = Command::new(binary("tickshard"))
        .args(["serve", "--print-config", "--tick-rate", "45", "--config"])
        .arg(&file)
        .env("TICKSHARD_ROOM_CAPACITY", "9")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tick_rate = 45"), "{text}");
    assert!(text.contains("room_capacity = 9"), "{text}");
    assert!(text.contains("shards = 3"), "{text}");
    // The default command is serve: the same flags work without the subcommand.
    let out = Command::new(binary("tickshard"))
        .args(["--print-config", "--admin", "off"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("admin = \"off\""));

    std::fs::write(&file, "tick_rate = 20\nbogus_key = 1\n").unwrap();
    for (args, env, want) in [
        (vec!["--tick-rate", "fast"], None, "--tick-rate"),
        (vec!["--drain-grace", "soon"], None, "--drain-grace"),
        (
            vec![],
            Some(("TICKSHARD_LISTEN", "nowhere")),
            "TICKSHARD_LISTEN",
        ),
        (vec!["--config", file.to_str().unwrap()], None, "bogus_key"),
    ] {
        let mut cmd = Command::new(binary("tickshard"));
        cmd.args(["--print-config"]).args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// On the real server, a room whose game panics ends alone: its player gets `Left`
/// (RoomCrashed) and plays on elsewhere, a player in another room of the same shard keeps
/// its snapshots, `/healthz` stays 200, `/metrics` counts the crash and the results file
/// records it.
#[test]
fn a_panicking_game_ends_only_its_room_on_the_real_server() {
    use tickshard::game::faulty::FAULT_BUTTON;
    let server = Server::start(
        "ops-crash",
        &["--shards", "1", "--modes", "arena,faulty-arena"],
    );
    let config = ClientConfig::new(Trust::Roots(vec![server.cert_der().into()]), "localhost");
    let mut bots: Vec<(UdpClient, Vec<ClientEvent>)> = (0..2)
        .map(|_| {
            (
                UdpClient::connect(server.addr, &config, None).unwrap(),
                Vec::new(),
            )
        })
        .collect();
    let pump = |bots: &mut Vec<(UdpClient, Vec<ClientEvent>)>, fault: bool| {
        for (i, (udp, events)) in bots.iter_mut().enumerate() {
            let _ = udp.poll_io();
            while let Some(e) = udp.client.poll_event() {
                events.push(e);
            }
            if udp.client.entity_id().is_some() {
                let buttons = if fault && i == 0 { FAULT_BUTTON } else { 0 };
                udp.client.send_input(Instant::now(), 20, 0, buttons, 0);
            }
            let _ = udp.flush();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let end = Instant::now() + Duration::from_secs(5);
    while bots.iter().any(|(u, _)| u.client.player_id() == 0) {
        assert!(Instant::now() < end, "not welcomed");
        pump(&mut bots, false);
    }
    bots[0].0.client.join(None, "faulty-arena");
    bots[1].0.client.join(None, "arena");
    let room = |u: &UdpClient| match u.client.state() {
        SessionState::InRoom { room_id, .. } => Some(*room_id),
        _ => None,
    };
    let end = Instant::now() + Duration::from_secs(5);
    while bots.iter().any(|(u, _)| room(u).is_none()) {
        assert!(Instant::now() < end, "not seated");
        pump(&mut bots, false);
    }
    let (faulty, arena) = (room(&bots[0].0).unwrap(), room(&bots[1].0).unwrap());
    let crashed = |events: &[ClientEvent]| {
        events.iter().any(|e| {
            matches!(e, ClientEvent::Left { room_id, reason: LeaveReason::RoomCrashed } if *room_id == faulty)
        })
    };
    let end = Instant::now() + Duration::from_secs(5);
    while !crashed(&bots[0].1) {
        assert!(Instant::now() < end, "no RoomCrashed: {:?}", bots[0].1);
        pump(&mut bots, true);
    }
    let before = bots[1].0.client.stats().snapshots;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        pump(&mut bots, false);
    }
    let got = bots[1].0.client.stats().snapshots - before;
    assert!(
        got >= 20,
        "the other room ticks on: {got} snapshots in 1 s at 30 Hz"
    );
    assert_eq!(room(&bots[1].0), Some(arena));
    assert!(bots[0]
        .1
        .iter()
        .all(|e| !matches!(e, ClientEvent::Closed(_))));

    let (status, body) = get(&server, "/healthz", None);
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = get(&server, "/metrics", None);
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("tickshard_rooms_crashed_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .eq([1.0]),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("crashed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The crashed room's player plays on in a new room.
    bots[0].0.client.join(None, "arena");
    let end = Instant::now() + Duration::from_secs(5);
    while room(&bots[0].0).is_none() {
        assert!(Instant::now() < end, "not seated again");
        pump(&mut bots, false);
    }
    let dir = server.data_dir.join("results");
    let end = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let text: String = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|f| std::fs::read_to_string(f.path()).ok())
            .collect();
        if let Some(line) = text.lines().find(|l| l.contains("crashed")) {
            break line.to_owned();
        }
        assert!(
            Instant::now() < end,
            "no crashed result in {}",
            dir.display()
        );
        pump(&mut bots, false);
    };
    let r: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(r["room"].as_u64(), Some(faulty));
    assert!(
        r["end"]
            .as_str()
            .unwrap()
            .starts_with("crashed: step: faulty-arena"),
        "{r}"
    );
}
