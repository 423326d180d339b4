//! Deterministic tests of the shard core: no sockets, a virtual clock, N clients, seeded loss,
//! latency, jitter and reordering (see `harness/mod.rs`).
//!
//! (Over 1,000 lines: one test per behaviour, each a short scenario on the shared harness;
//! one file keeps them a single test binary, built and linked once.)

mod harness;

use client_sim::{ClientEvent, CloseReason, SessionState};
use harness::{Link, Net, NetConfig};
use std::collections::BTreeMap;
use std::time::Duration;
use tickshard::game::arena::{dequantise, max_step};
use tickshard::shard::operator::{Command, RoomEnd, RoomResult};
use tickshard::{PlayerId, RoomId};
use tickshard_schema::{codes, ControlMsg, FrameDecoder};

fn room_of(net: &Net, i: usize) -> Option<u64> {
    match net.clients[i].client.state() {
        SessionState::InRoom { room_id, .. } => Some(*room_id),
        _ => None,
    }
}

fn server_code(net: &Net, i: usize) -> Option<u64> {
    match net.closed(i) {
        Some(CloseReason::Server { code, .. }) => Some(*code),
        _ => None,
    }
}

#[test]
fn handshake_to_snapshot() {
    let mut net = Net::new(NetConfig::default());
    let c = net.add_client();
    net.connect_all(Duration::from_secs(2));
    net.clients[c].client.join(None, "arena");
    net.run_for(Duration::from_millis(100));
    assert!(
        net.clients[c].client.entity_id().is_some(),
        "{:?}",
        net.events(c)
    );
    let before = net.snapshots(c);
    net.play(30, |_, _| Some((127, 0, 0, 0)));
    let snaps = net.snapshots(c) - before;
    assert!(
        (29..=31).contains(&snaps),
        "{snaps} snapshots in one second at 30 Hz"
    );
    let own = net.clients[c].client.own_entity().expect("sees itself");
    assert_eq!(own.health(), 100);
    assert!(
        net.clients[c].client.last_applied_input() >= 25,
        "server confirms applied inputs"
    );
}

/// Every control request is answered within one round trip, not at the next timer: the
/// shard handles the frames of a read before it asks quinn for more. With 1 ms each way, a
/// join sent after the welcome is answered before 5 ms have passed, then a chat; a reply that
/// waited for quinn's acknowledgement timer would take over 40 ms.
#[test]
fn requests_are_answered_within_a_round_trip() {
    let mut net = Net::new(NetConfig::default());
    let c = net.add_client();
    net.connect_all(Duration::from_secs(2));
    net.run_for(Duration::from_millis(100));
    net.clients[c].client.join(None, "arena");
    net.run_for(Duration::from_millis(5));
    assert!(room_of(&net, c).is_some(), "{:?}", net.events(c));
    net.run_for(Duration::from_millis(100));
    let chats = |net: &Net| {
        net.events(c)
            .iter()
            .filter(|e| matches!(e, ClientEvent::Chat { .. }))
            .count()
    };
    net.clients[c].client.chat("at once");
    net.run_for(Duration::from_millis(5));
    assert_eq!(chats(&net), 1, "{:?}", net.events(c));
}

/// Chat reaches the room cleaned: a right-to-left override and a line break are gone, and a
/// text of nothing but such characters reaches nobody.
#[test]
fn chat_reaches_the_room_without_reordering_or_control_characters() {
    let mut net = Net::seated(2, NetConfig::default());
    net.clients[0].client.chat("\u{202E}\n");
    net.clients[0].client.chat("file\u{202E}exe.live\n");
    net.run_for(Duration::from_millis(200));
    let heard: Vec<&str> = net
        .events(1)
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Chat { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(heard, ["fileexe.live"]);
}

#[test]
fn fifty_clients_in_several_rooms() {
    let mut net = Net::seated(
        50,
        NetConfig {
            capacity: 10,
            ..Default::default()
        },
    );
    let rooms = net.shards[0].rooms();
    assert_eq!(rooms.len(), 5, "{rooms:?}");
    assert!(rooms.iter().all(|r| r.players == 10), "{rooms:?}");
    let before: Vec<u64> = (0..50).map(|i| net.snapshots(i)).collect();
    net.play(60, |i, t| Some(((i as i32 * 7 + t as i32) as i8, 64, 0, 0)));
    for (i, b) in before.iter().enumerate() {
        let got = net.snapshots(i) - b;
        assert!(got >= 58, "client {i} got {got} of 60 snapshots");
        assert_eq!(net.clients[i].client.stats().decode_errors, 0);
    }
}

#[test]
fn quick_match_fills_rooms_before_opening_new_ones() {
    let mut net = Net::new(NetConfig {
        capacity: 8,
        ..Default::default()
    });
    for _ in 0..20 {
        net.add_client();
    }
    net.connect_all(Duration::from_secs(3));
    for i in 0..20 {
        net.clients[i].client.join(None, "arena");
        net.run_for(Duration::from_millis(20));
    }
    net.run_for(Duration::from_millis(200));
    let mut sizes: Vec<usize> = net.shards[0].rooms().iter().map(|r| r.players).collect();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![4, 8, 8]);
}

#[test]
fn redundancy_recovers_inputs_under_15_percent_loss() {
    let lossy = Link {
        loss: 0.15,
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
        ..Default::default()
    };
    let mut net = Net::seated(
        10,
        NetConfig {
            up: lossy,
            down: lossy,
            seed: 7,
            ..Default::default()
        },
    );
    net.play(300, |i, t| {
        Some((((t / 30) as i32 * 40 + i as i32) as i8, 30, 0, 0))
    });
    // Quiet period: queued commands drain.
    net.play(30, |_, _| None);
    let sent: u64 = (0..10)
        .map(|i| net.clients[i].client.last_sent_input() as u64)
        .sum();
    let core = &net.shards[0];
    let mut applied_seq = 0u64;
    for i in 0..10 {
        let room = core.room(RoomId(room_of(&net, i).unwrap())).unwrap();
        applied_seq += room
            .last_applied(PlayerId(net.clients[i].client.player_id()))
            .unwrap() as u64;
    }
    let c = core.counters();
    // No gaps: every sequence number up to each seat's last applied one was applied once.
    assert_eq!(c.inputs_applied, applied_seq, "inputs were skipped");
    // Only the last few commands of each client can be missing (their datagrams were lost and
    // nothing came after them); at 15% loss without redundancy about 45 per client would be.
    assert!(
        applied_seq + 10 * 8 >= sent,
        "applied {applied_seq} of {sent}"
    );
    assert_eq!(c.inputs_dropped, 0);
    assert!(
        net.dropped > 500,
        "the link did drop packets ({})",
        net.dropped
    );
}

#[test]
fn speed_hack_and_input_flood_are_clamped() {
    let mut net = Net::seated(1, NetConfig::default());
    let cheat = 0;
    net.play(5, |_, _| Some((0, 0, 0, 0)));
    let start = *net.clients[cheat].client.own_entity().unwrap();
    let ticks = 60;
    for _ in 0..ticks {
        // An over-long direction, and three commands per tick instead of one.
        for _ in 0..3 {
            let now = net.now();
            net.clients[cheat].client.send_input(now, 127, 127, 0, 0);
        }
        net.run_for(Duration::from_secs(1) / 30);
    }
    net.play(10, |_, _| None);
    let end = *net.clients[cheat].client.own_entity().unwrap();
    let d = ((dequantise(end.x()) - dequantise(start.x())).powi(2)
        + (dequantise(end.y()) - dequantise(start.y())).powi(2))
    .sqrt();
    // At most one command per tick plus the saved-up burst of four, each at most max_step.
    let limit = max_step(30) * (ticks as f32 + 10.0 + 4.0) + 0.2;
    assert!(d <= limit, "moved {d} > {limit}");
    assert!(
        d >= max_step(30) * 30.0 || dequantise(end.x()) > 1000.0 || dequantise(end.y()) > 1000.0,
        "moved only {d}"
    );
    assert!(
        net.shards[0].counters().inputs_dropped > 0,
        "excess commands are dropped and counted"
    );
}

/// Runs one misbehaving client next to a well-behaved one; returns the net, the bad client's
/// index, and checks the bystander kept receiving every snapshot.
fn with_bystander(
    setup: impl FnOnce(&mut Net) -> usize,
    act: impl FnOnce(&mut Net, usize),
) -> (Net, usize) {
    let mut net = Net::new(NetConfig::default());
    let good = net.add_client();
    let bad = setup(&mut net);
    net.run_for(Duration::from_millis(300));
    net.clients[good].client.join(None, "arena");
    net.run_for(Duration::from_millis(200));
    let before = net.snapshots(good);
    act(&mut net, bad);
    net.play(30, |i, _| (i == good).then_some((10, 0, 0, 0)));
    let got = net.snapshots(good) - before;
    assert!(got >= 29, "the bystander lost snapshots: {got}");
    assert!(net.closed(good).is_none());
    (net, bad)
}

fn raw_client(net: &mut Net) -> usize {
    net.add_client_with(|c| c.auto_hello = false)
}

fn hello() -> ControlMsg {
    ControlMsg::Hello {
        protocol_version: tickshard_schema::PROTOCOL_VERSION,
        token: String::new(),
        client_name: "t".into(),
    }
}

#[test]
fn garbage_datagrams_are_ignored() {
    let mut connections = 0;
    let (net, _) = with_bystander(
        |net| net.add_client(),
        |net, _| {
            connections = net.shards[0].connections();
            let from = "127.0.9.9:999".parse().unwrap();
            for i in 0..200u32 {
                let mut junk = vec![0u8; (i as usize * 7) % 1300 + 1];
                for (k, b) in junk.iter_mut().enumerate() {
                    *b = (k as u32 * 31 + i) as u8;
                }
                net.inject(from, &junk);
            }
        },
    );
    assert!(net.shards[0].counters().udp_in >= 200);
    assert_eq!(connections, 2);
    assert_eq!(
        net.shards[0].connections(),
        connections,
        "garbage opened a connection"
    );
    assert_eq!(net.shards[0].counters().handshakes, 2);
    assert!(
        net.shards[0].counters().not_quic >= 190,
        "dropped at the first look: {}",
        net.shards[0].counters().not_quic
    );
    // The one answer QUIC allows: a stateless reset (it tells a client whose connection the
    // server no longer has), smaller than the datagram that caused it and at most one per
    // 20 ms (quinn's `min_reset_interval`): one for 200 datagrams that arrived at once.
    assert!(
        net.unrouted.len() <= 1,
        "the server answered garbage {} times",
        net.unrouted.len()
    );
    for (to, bytes) in &net.unrouted {
        assert_eq!(to.to_string(), "127.0.9.9:999");
        assert_eq!(
            bytes[0] & 0xc0,
            0x40,
            "not a stateless reset: {:02x?}",
            &bytes[..8]
        );
        assert!(
            bytes.len() < 1300,
            "a reset larger than any trigger: {}",
            bytes.len()
        );
    }
}

#[test]
fn unverifiable_control_frame_closes_that_connection() {
    let (net, bad) = with_bystander(raw_client, |net, bad| {
        let mut frame = Vec::new();
        tickshard_schema::write_frame(
            &[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8],
            &mut frame,
        );
        net.clients[bad].client.send_raw_control(&frame);
    });
    assert_eq!(server_code(&net, bad), Some(codes::MALFORMED_FRAME as u64));
}

#[test]
fn oversized_frame_closes_that_connection() {
    let (net, bad) = with_bystander(
        |net| net.add_client(),
        |net, bad| {
            net.clients[bad]
                .client
                .send_raw_control(&(1u32 << 20).to_le_bytes())
        },
    );
    assert_eq!(server_code(&net, bad), Some(codes::FRAME_TOO_LARGE as u64));
}

#[test]
fn frame_before_hello_is_a_protocol_violation() {
    let (net, bad) = with_bystander(raw_client, |net, bad| {
        net.clients[bad].client.send_control_msg(&ControlMsg::Join {
            room_id: 0,
            mode: "arena".into(),
        })
    });
    assert_eq!(
        server_code(&net, bad),
        Some(codes::PROTOCOL_VIOLATION as u64)
    );
}

#[test]
fn unsupported_version_is_refused() {
    let (net, bad) = with_bystander(raw_client, |net, bad| {
        let m = ControlMsg::Hello {
            protocol_version: 99,
            token: String::new(),
            client_name: String::new(),
        };
        net.clients[bad].client.send_control_msg(&m);
    });
    assert_eq!(
        server_code(&net, bad),
        Some(codes::UNSUPPORTED_VERSION as u64)
    );
}

#[test]
fn silent_client_is_closed_at_the_hello_deadline() {
    let mut net = Net::new(NetConfig {
        hello_timeout: Duration::from_secs(2),
        ..Default::default()
    });
    let bad = raw_client(&mut net);
    // Open (handshake done, no hello) until just before the deadline; housekeeping checks
    // hello deadlines every 50 ms, so the close comes within that of the deadline.
    net.run_for(Duration::from_millis(1900));
    assert!(
        !matches!(net.clients[bad].client.state(), SessionState::Closed { .. }),
        "closed before the deadline: {:?}",
        net.closed(bad)
    );
    assert_eq!(net.closed(bad), None);
    assert_eq!(net.shards[0].connections(), 1);
    net.run_for(Duration::from_millis(600));
    assert_eq!(server_code(&net, bad), Some(codes::HELLO_TIMEOUT as u64));
}

/// A welcomed client that never joins is closed with LOBBY_TIMEOUT once the lobby timeout
/// has passed since its welcome, and not before; one that leaves its room gets the timeout
/// again from its leave; a seated player is never closed for it. (At 2 s; housekeeping checks
/// every 50 ms.)
#[test]
fn clients_that_stay_in_the_lobby_are_closed_at_the_lobby_timeout() {
    let mut net = Net::new(NetConfig {
        lobby_timeout: Duration::from_secs(2),
        ..Default::default()
    });
    let idle = net.add_client();
    let leaver = net.add_client();
    let player = net.add_client();
    net.connect_all(Duration::from_secs(2));
    net.clients[leaver].client.join(None, "arena");
    net.clients[player].client.join(None, "arena");
    net.run_for(Duration::from_millis(1000));
    assert!(room_of(&net, leaver).is_some() && room_of(&net, player).is_some());
    net.clients[leaver].client.leave();
    // Welcomed within the first few milliseconds: still open just before 2 s.
    net.run_for(Duration::from_millis(850));
    assert_eq!(net.closed(idle), None, "{:?}", net.events(idle));
    net.run_for(Duration::from_millis(400));
    assert_eq!(server_code(&net, idle), Some(codes::LOBBY_TIMEOUT as u64));
    assert_eq!(
        net.closed(leaver),
        None,
        "the leaver's timeout counts from its leave"
    );
    net.run_for(Duration::from_millis(1000));
    assert_eq!(server_code(&net, leaver), Some(codes::LOBBY_TIMEOUT as u64));
    net.run_for(Duration::from_secs(3));
    assert_eq!(net.closed(player), None, "a seated player stays");
    assert!(room_of(&net, player).is_some());
}

#[test]
fn join_of_a_missing_room_is_an_error_and_the_session_stays() {
    let (net, bad) = with_bystander(
        |net| net.add_client(),
        |net, bad| {
            net.clients[bad]
                .client
                .join(Some(RoomId::new(tickshard::ShardId(0), 999).0), "arena");
            net.clients[bad]
                .client
                .join(Some(RoomId::new(tickshard::ShardId(7), 1).0), "arena");
            net.clients[bad].client.join(None, "no-such-mode");
        },
    );
    let errors: Vec<u16> = net
        .events(bad)
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Error { code, .. } => Some(*code),
            _ => None,
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            codes::ROOM_NOT_FOUND,
            codes::ROOM_NOT_FOUND,
            codes::UNKNOWN_MODE
        ]
    );
    assert!(net.closed(bad).is_none());
}

#[test]
fn inputs_outside_a_room_are_ignored_and_counted() {
    let (net, bad) = with_bystander(
        |net| net.add_client(),
        |net, bad| {
            for _ in 0..20 {
                let now = net.now();
                net.clients[bad].client.send_input(now, 1, 1, 0, 0);
            }
        },
    );
    assert!(net.shards[0].counters().input_not_in_room >= 20);
    assert!(net.closed(bad).is_none());
}

#[test]
fn malformed_datagrams_are_counted_then_close_the_connection() {
    let (net, bad) = with_bystander(
        |net| net.add_client(),
        |net, bad| {
            net.clients[bad].client.join(None, "arena");
            for i in 0..40u8 {
                net.clients[bad].client.send_raw_datagram(&[i; 24]);
            }
        },
    );
    assert!(net.shards[0].counters().malformed_datagrams > 16);
    assert_eq!(
        server_code(&net, bad),
        Some(codes::MALFORMED_DATAGRAMS as u64)
    );
}

#[test]
fn control_flood_closes_that_connection() {
    let (net, bad) = with_bystander(
        |net| net.add_client(),
        |net, bad| {
            net.clients[bad].client.join(None, "arena");
            for _ in 0..200 {
                net.clients[bad].client.chat("spam");
            }
        },
    );
    assert_eq!(server_code(&net, bad), Some(codes::CONTROL_FLOOD as u64));
}

#[test]
fn second_hello_is_a_protocol_violation() {
    let (net, bad) = with_bystander(
        |net| net.add_client(),
        |net, bad| net.clients[bad].client.send_control_msg(&hello()),
    );
    assert_eq!(
        server_code(&net, bad),
        Some(codes::PROTOCOL_VIOLATION as u64)
    );
}

#[test]
fn chat_reaches_the_room() {
    let mut net = Net::seated(2, NetConfig::default());
    let a = 0;
    let b = 1;
    net.clients[a].client.chat("gg");
    net.run_for(Duration::from_millis(100));
    let from = net.clients[a].client.player_id();
    assert!(net.events(b).iter().any(|e| matches!(e, ClientEvent::Chat { from_player, text } if *from_player == from && text == "gg")));
}

fn scenario(seed: u64) -> Vec<Vec<(u32, Vec<u8>)>> {
    let link = Link {
        loss: 0.05,
        latency: Duration::from_millis(15),
        jitter: Duration::from_millis(10),
        reorder: 0.05,
        duplicate: 0.02,
    };
    let mut net = Net::new(NetConfig {
        seed,
        up: link,
        down: link,
        capacity: 8,
        ..Default::default()
    });
    for _ in 0..6 {
        let i = net.add_client();
        net.clients[i].client.record_snapshots(true);
    }
    net.connect_all(Duration::from_secs(10));
    net.join_all();
    net.play(90, |i, t| {
        Some((
            ((i as u32 * 13 + t) % 255) as i8,
            50,
            (t % 7 == 0) as u8,
            (t * 500) as u16,
        ))
    });
    (0..6)
        .map(|i| net.clients[i].client.stats().recorded.clone())
        .collect()
}

#[test]
fn same_seed_gives_byte_identical_snapshot_streams() {
    let a = scenario(42);
    let b = scenario(42);
    assert!(
        a.iter().all(|s| s.len() > 60),
        "each client recorded most snapshots"
    );
    assert_eq!(a, b, "the same seed must replay exactly");
    let c = scenario(43);
    assert_ne!(a, c, "a different seed gives a different run");
}

#[test]
fn snapshots_are_deltas_against_the_acknowledged_baseline() {
    let mut net = Net::new(NetConfig::default());
    for _ in 0..3 {
        let i = net.add_client();
        net.clients[i].client.record_snapshots(true);
    }
    net.connect_all(Duration::from_secs(2));
    net.join_all();
    net.play(60, |_, _| Some((0, 0, 0, 0)));
    let rec = &net.clients[0].client.stats().recorded;
    let deltas = rec
        .iter()
        .filter(|(_, b)| tickshard_schema::decode_snapshot(b).unwrap().baseline() != 0)
        .count();
    assert!(
        deltas > rec.len() / 2,
        "{deltas} of {} are deltas",
        rec.len()
    );
    // Standing still, a delta carries no entities at all: only the removal count (0).
    let last = tickshard_schema::decode_snapshot(&rec.last().unwrap().1).unwrap();
    assert_eq!(last.changes().map(|c| c.bytes()), Some(&[0u8][..]));
    let _ = FrameDecoder::default();
}

#[test]
fn cross_shard_join_and_quick_match() {
    let mut net = Net::new(NetConfig {
        shards: 2,
        capacity: 4,
        ..Default::default()
    });
    for _ in 0..12 {
        net.add_client();
    }
    net.connect_all(Duration::from_secs(3));
    let shard_of = |net: &Net, i: usize| {
        net.events(i).iter().find_map(|e| match e {
            ClientEvent::Welcome { shard, .. } => Some(*shard),
            _ => None,
        })
    };
    // A client's first datagram carries a random connection ID, which picks its shard: the
    // test needs one client on shard 0 and two on shard 1, which twelve give but for about 1
    // run in 300; add clients until they are there.
    let on = |net: &Net, shard: u16| -> Vec<usize> {
        (0..net.clients.len())
            .filter(|&i| shard_of(net, i) == Some(shard))
            .collect()
    };
    while on(&net, 0).is_empty() || on(&net, 1).len() < 2 {
        assert!(
            net.clients.len() < 40,
            "connections do not spread over both shards"
        );
        net.add_client();
        net.connect_all(Duration::from_secs(3));
    }
    let (on0, on1) = (on(&net, 0), on(&net, 1));
    // A host on shard 0 opens a room; a player on shard 1 joins it by id.
    let (host, guest) = (on0[0], on1[0]);
    net.clients[host].client.join(None, "arena");
    net.run_for(Duration::from_millis(100));
    let room = room_of(&net, host).unwrap();
    assert_eq!(RoomId(room).shard().0, 0);
    net.clients[guest].client.join(Some(room), "arena");
    net.run_for(Duration::from_millis(100));
    assert_eq!(room_of(&net, guest), Some(room), "{:?}", net.events(guest));
    let before = net.snapshots(guest);
    net.play(60, |i, _| (i == guest).then_some((0, 100, 0, 0)));
    assert!(
        net.snapshots(guest) - before >= 58,
        "guest gets snapshots through the mesh"
    );
    let guest_entity = net.clients[guest].client.entity_id().unwrap();
    let host_applied = net.shards[0]
        .room(RoomId(room))
        .unwrap()
        .last_applied(PlayerId(net.clients[guest].client.player_id()));
    assert!(
        host_applied.unwrap() >= 55,
        "the guest's inputs reached the host shard"
    );
    assert!(net.clients[guest]
        .client
        .world()
        .iter()
        .any(|e| e.id() == guest_entity));
    // Quick match from shard 1 fills shard 0's room (advertised in the directory) first.
    net.clients[on1[1]].client.join(None, "arena");
    net.run_for(Duration::from_millis(200));
    assert_eq!(room_of(&net, on1[1]), Some(room));
    // Leaving frees the seat on the host.
    net.clients[guest].client.leave();
    net.run_for(Duration::from_millis(200));
    assert_eq!(net.shards[0].room(RoomId(room)).unwrap().players(), 2);
    let mut by_room: BTreeMap<u64, usize> = BTreeMap::new();
    for i in 0..net.clients.len() {
        if let Some(r) = room_of(&net, i) {
            *by_room.entry(r).or_default() += 1;
        }
    }
    assert_eq!(by_room.get(&room), Some(&2));
}

#[test]
fn leave_disconnect_and_idle_timeout_free_seats_and_empty_rooms_close() {
    let mut net = Net::seated(
        3,
        NetConfig {
            empty_room_grace: Duration::from_secs(2),
            ..Default::default()
        },
    );
    let (a, b, c) = (0, 1, 2);
    let room = RoomId(room_of(&net, a).unwrap());
    let players = |net: &Net| net.shards[0].room(room).map(|r| r.players());
    assert_eq!(players(&net), Some(3));
    // Leave.
    net.clients[a].client.leave();
    net.run_for(Duration::from_millis(100));
    assert_eq!(players(&net), Some(2));
    assert!(net
        .events(a)
        .iter()
        .any(|e| matches!(e, ClientEvent::Left { .. })));
    // Disconnect.
    let now = net.now();
    net.clients[b].client.close(now);
    net.run_for(Duration::from_millis(100));
    assert_eq!(players(&net), Some(1));
    // Vanish: the QUIC idle timeout (10 s) frees the seat.
    net.clients[c].cut = true;
    net.run_for(Duration::from_secs(9));
    assert_eq!(players(&net), Some(1), "not before the idle timeout");
    let mut waited = Duration::ZERO;
    while players(&net) != Some(0) {
        assert!(waited < Duration::from_secs(3), "idle seat not freed");
        net.run_for(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    }
    // The empty room closes after its grace period.
    net.run_for(Duration::from_millis(1500));
    assert!(
        net.shards[0].room(room).is_some(),
        "not before the grace period"
    );
    net.run_for(Duration::from_secs(1));
    assert!(
        net.shards[0].room(room).is_none(),
        "closed after the grace period"
    );
    assert_eq!(net.shards[0].counters().rooms_closed, 1);
}

#[test]
fn a_connection_stays_on_its_shard_when_the_client_address_changes() {
    let mut net = Net::seated(
        4,
        NetConfig {
            shards: 2,
            ..Default::default()
        },
    );
    let c = 0;
    let player = PlayerId(net.clients[c].client.player_id());
    let shard = player.shard().0 as usize;
    let connections_before = net.shards[shard].connections();
    // NAT rebinding: new source address and port mid-session.
    net.clients[c].addr = "127.0.3.3:4444".parse().unwrap();
    let before = net.snapshots(c);
    net.play(60, |i, _| (i == c).then_some((20, 20, 0, 0)));
    assert!(
        net.snapshots(c) - before >= 55,
        "snapshots follow the new address"
    );
    assert_eq!(
        net.shards[shard].connections(),
        connections_before,
        "same connection, same shard"
    );
    assert!(net.closed(c).is_none());
    let room = RoomId(room_of(&net, c).unwrap());
    let host = room.shard().0 as usize;
    assert!(
        net.shards[host]
            .room(room)
            .unwrap()
            .last_applied(player)
            .unwrap()
            >= 55
    );
}

#[test]
fn a_join_the_other_shard_never_answers_times_out() {
    let mut net = Net::new(NetConfig {
        shards: 2,
        ..Default::default()
    });
    // A client's first datagram carries a random connection ID, which picks its shard: add
    // clients until both shards have one (eight are not always enough: 1 in 128 runs).
    let on = |net: &Net, shard: u16| {
        (0..net.clients.len())
            .find(|&i| PlayerId(net.clients[i].client.player_id()).shard().0 == shard)
    };
    while on(&net, 0).is_none() || on(&net, 1).is_none() {
        assert!(net.clients.len() < 40, "every client landed on one shard");
        net.add_client();
        net.connect_all(Duration::from_secs(2));
    }
    let (host, guest) = (on(&net, 0).unwrap(), on(&net, 1).unwrap());
    net.clients[host].client.join(None, "arena");
    net.run_for(Duration::from_millis(100));
    let room = room_of(&net, host).unwrap();
    net.mesh_down = true;
    net.clients[guest].client.join(Some(room), "arena");
    net.run_for(Duration::from_millis(2500));
    assert!(
        net.events(guest).iter().any(
            |e| matches!(e, ClientEvent::Error { code, .. } if *code == codes::SHARD_UNAVAILABLE)
        ),
        "{:?}",
        net.events(guest)
    );
    // The session is usable again: with the mesh back, the join goes through.
    net.mesh_down = false;
    net.clients[guest].client.join(Some(room), "arena");
    net.run_for(Duration::from_millis(200));
    assert_eq!(room_of(&net, guest), Some(room));
}

#[test]
fn a_full_shard_refuses_new_connections_and_keeps_its_players() {
    let mut net = Net::seated(
        2,
        NetConfig {
            max_connections: 2,
            ..Default::default()
        },
    );
    let (a, b) = (0, 1);
    let c = net.add_client();
    net.run_for(Duration::from_secs(2));
    assert!(
        matches!(net.closed(c), Some(CloseReason::Transport(r)) if r.contains("refused")),
        "{:?}",
        net.closed(c)
    );
    assert_eq!(net.shards[0].counters().refused_full, 1);
    let before = (net.snapshots(a), net.snapshots(b));
    net.play(30, |_, _| Some((0, 0, 0, 0)));
    assert!(net.snapshots(a) - before.0 >= 29 && net.snapshots(b) - before.1 >= 29);
}

/// Runs swarm brains on harness clients for `ticks` ticks over a lossy link; returns every
/// action taken, as (tick, bot, action), and the movement checks' (checked, divergences).
fn bot_actions(
    seed: u64,
    behavior: client_sim::Behavior,
    ticks: u64,
) -> (Vec<(u64, usize, client_sim::Action)>, u64, u64) {
    use client_sim::{Brain, MovementCheck};
    let link = Link {
        loss: 0.03,
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(8),
        reorder: 0.02,
        duplicate: 0.01,
    };
    let mut net = Net::seated(
        8,
        NetConfig {
            seed,
            up: link,
            down: link,
            capacity: 8,
            ..Default::default()
        },
    );
    let mut brains: Vec<Brain> = (0..8).map(|i| Brain::new(behavior, seed, i)).collect();
    let mut checks: Vec<MovementCheck> = (0..8)
        .map(|_| MovementCheck::new(net.config.tick_rate, behavior.exact_movement()))
        .collect();
    let mut log = Vec::new();
    let mut out = Vec::new();
    let period = Duration::from_secs(1) / net.config.tick_rate as u32;
    for t in 0..ticks {
        let now = net.now();
        for i in 0..8 {
            let c = &mut net.clients[i].client;
            if let Some(e) = c.own_entity() {
                let (x, y, dead) = (
                    e.x(),
                    e.y(),
                    e.flags() & client_sim::behavior::FLAG_DEAD != 0,
                );
                checks[i].observe(c.last_applied_input(), x, y, dead);
            }
            out.clear();
            brains[i].act(t, c.world(), c.entity_id(), &mut out);
            for a in out.drain(..) {
                a.perform(c, now, "arena", &mut checks[i]);
                log.push((t, i, a));
            }
        }
        net.run_for(period);
    }
    for i in 0..8 {
        assert!(
            net.closed(i).is_none(),
            "{behavior} bot {i} stays connected: {:?}",
            net.closed(i)
        );
    }
    let checked = checks.iter().map(|c| c.checked).sum();
    let diverged = checks.iter().map(|c| c.divergences).sum();
    (log, checked, diverged)
}

#[test]
fn the_same_seed_makes_the_same_swarm_actions() {
    use client_sim::Behavior;
    // `chase` reacts to what the bot sees, so equal actions also mean equal worlds.
    let (a, checked, diverged) = bot_actions(11, Behavior::Chase, 240);
    let (b, _, _) = bot_actions(11, Behavior::Chase, 240);
    assert!(a.len() >= 8 * 200, "bots acted every tick: {}", a.len());
    assert_eq!(a, b, "the same seed must give the same actions");
    let (c, _, _) = bot_actions(12, Behavior::Chase, 240);
    assert_ne!(a, c, "another seed gives another swarm");
    assert!(checked > 8 * 150, "movement checked: {checked}");
    assert_eq!(diverged, 0, "bots' movement follows their commands");
}

#[test]
fn every_behaviour_is_tolerated_and_moves_as_commanded() {
    use client_sim::Behavior;
    for behavior in Behavior::ALL {
        let (a, checked, diverged) = bot_actions(5, behavior, 150);
        let (b, _, _) = bot_actions(5, behavior, 150);
        assert_eq!(a, b, "{behavior}: the same seed must give the same actions");
        assert!(checked > 8 * 80, "{behavior}: movement checked {checked}");
        assert_eq!(diverged, 0, "{behavior}: movement diverged");
    }
}

fn drain(net: &mut Net, shard: usize, grace: Duration) {
    let now = net.now();
    net.shards[shard]
        .handle_command(
            now,
            Command::Drain {
                grace,
                reconnect_hint: "next.example:4433".into(),
            },
        )
        .unwrap();
}

fn results(net: &mut Net) -> Vec<RoomResult> {
    std::mem::take(&mut net.results)
}

#[test]
fn drain_notifies_refuses_new_connections_and_new_rooms_and_ends_rooms_with_results() {
    let mut net = Net::new(NetConfig {
        capacity: 2,
        ..Default::default()
    });
    let (a, b, c) = (net.add_client(), net.add_client(), net.add_client());
    net.connect_all(Duration::from_secs(2));
    net.clients[a].client.join(None, "arena");
    net.clients[b].client.join(None, "arena");
    net.run_for(Duration::from_millis(300));
    let room = room_of(&net, a).expect("a seated");
    assert_eq!(room_of(&net, b), Some(room), "one full room of two");
    net.play(30, |_, _| Some((10, 0, 1, 0)));

    drain(&mut net, 0, Duration::from_secs(10));
    net.run_for(Duration::from_millis(200));
    for i in [a, b, c] {
        let notice = net.events(i).iter().find_map(|e| match e {
            ClientEvent::Drain {
                grace_ms,
                reconnect_hint,
            } => Some((*grace_ms, reconnect_hint.clone())),
            _ => None,
        });
        let (grace_ms, hint) = notice.unwrap_or_else(|| panic!("client {i} got no drain notice"));
        assert!(grace_ms > 9_000 && grace_ms <= 10_000, "{grace_ms}");
        assert_eq!(hint, "next.example:4433");
    }
    assert!(net.shards[0].drain_state().refuses_connections());

    // A new connection completes its handshake, then is closed with DRAINING.
    let d = net.add_client();
    net.run_for(Duration::from_secs(1));
    assert_eq!(server_code(&net, d), Some(codes::DRAINING as u64));
    assert_eq!(net.shards[0].counters().refused_draining, 1);
    assert_eq!(net.shards[0].counters().refused_full, 0);
    // A quick match that needs a new room (the only one is full) is refused with 106.
    net.clients[c].client.join(None, "arena");
    net.run_for(Duration::from_millis(200));
    assert!(
        net.events(c).iter().any(
            |e| matches!(e, ClientEvent::Error { code, .. } if *code == codes::SERVER_DRAINING)
        ),
        "{:?}",
        net.events(c)
    );
    assert!(!net.shards[0].is_drained(), "a room still runs");

    // The room ends as soon as its last player leaves, and its result is recorded.
    net.clients[a].client.leave();
    net.clients[b].client.leave();
    net.run_for(Duration::from_millis(200));
    let r = results(&mut net);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].room, RoomId(room));
    assert_eq!(r[0].end, RoomEnd::Empty);
    let mut players: Vec<u64> = r[0].standings.iter().map(|s| s.player.0).collect();
    players.sort();
    let mut want = vec![
        net.clients[a].client.player_id(),
        net.clients[b].client.player_id(),
    ];
    want.sort();
    assert_eq!(players, want);
    assert!(r[0]
        .standings
        .iter()
        .all(|s| !s.present && s.kills.is_some()));
    assert!(net.shards[0].is_drained(), "no rooms and nobody seated");
}

#[test]
fn drain_grace_expiry_closes_what_remains_with_shutting_down() {
    let mut net = Net::seated(2, NetConfig::default());
    let (a, b) = (0, 1);
    net.play(10, |_, _| Some((0, 10, 0, 0)));
    drain(&mut net, 0, Duration::from_secs(2));
    net.play(30, |_, _| Some((0, 10, 0, 0)));
    assert!(net.closed(a).is_none(), "still playing within the grace");
    net.run_for(Duration::from_secs(2));
    for i in [a, b] {
        assert!(
            matches!(net.closed(i), Some(CloseReason::Server { code, reason }) if *code == codes::SHUTTING_DOWN as u64 && reason == "drain grace ended"),
            "{:?}",
            net.closed(i)
        );
    }
    let r = results(&mut net);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].end, RoomEnd::Shutdown);
    assert_eq!(r[0].standings.len(), 2);
    assert!(r[0].standings.iter().all(|s| s.present));
    assert!(net.shards[0].is_drained());
}

#[test]
fn operators_close_rooms_and_kick_players() {
    let mut net = Net::seated(
        3,
        NetConfig {
            shards: 2,
            ..Default::default()
        },
    );
    let (a, b, c) = (0, 1, 2);
    let room = RoomId(room_of(&net, a).unwrap());
    // Quick match may have opened a room per shard; the close reaches the room's members
    // wherever their connections live.
    let members: Vec<usize> = [a, b, c]
        .into_iter()
        .filter(|&i| room_of(&net, i) == Some(room.0))
        .collect();
    let now = net.now();
    let host = room.shard().0 as usize;
    assert_eq!(
        net.shards[host].handle_command(
            now,
            Command::CloseRoom {
                room: RoomId(room.0 + 1000),
                reason: "x".into()
            }
        ),
        Err(tickshard::shard::operator::CommandError::RoomNotFound)
    );
    net.shards[host]
        .handle_command(
            now,
            Command::CloseRoom {
                room,
                reason: "tournament over".into(),
            },
        )
        .unwrap();
    net.run_for(Duration::from_millis(300));
    for &i in &members {
        assert!(
            net.events(i).iter().any(|e| matches!(
                e,
                ClientEvent::Left { room_id, reason: tickshard_schema::LeaveReason::RoomClosed } if *room_id == room.0
            )),
            "client {i}: {:?}",
            net.events(i)
        );
        assert_eq!(room_of(&net, i), None);
    }
    let r = results(&mut net);
    assert_eq!(r[0].end, RoomEnd::Closed("tournament over".into()));
    // Seats are free again: the players can quick-match into a new room.
    net.join_all();

    let player = PlayerId(net.clients[a].client.player_id());
    let now = net.now();
    net.shards[player.shard().0 as usize]
        .handle_command(
            now,
            Command::Kick {
                player,
                reason: "cheating".into(),
            },
        )
        .unwrap();
    net.run_for(Duration::from_millis(300));
    assert!(
        matches!(net.closed(a), Some(CloseReason::Server { code, reason }) if *code == codes::KICKED as u64 && reason == "cheating"),
        "{:?}",
        net.closed(a)
    );
    assert!(net.closed(b).is_none());
}

/// Rooms created in a burst do not tick at the same instant: each new room's schedule is put
/// where it is farthest from the others' ticks, so eight rooms made within a few milliseconds
/// tick about an eighth of a period apart (a room tick would otherwise wait for seven others).
#[test]
fn rooms_created_together_tick_apart() {
    let net = Net::seated(
        8,
        NetConfig {
            capacity: 1,
            ..NetConfig::default()
        },
    );
    let period = Duration::from_secs(1) / net.config.tick_rate as u32;
    let p = period.as_nanos();
    let now = net.now();
    let shard = &net.shards[0];
    let mut phases: Vec<u128> = shard
        .rooms()
        .iter()
        .map(|r| {
            let due = shard.room(r.id).unwrap().next_due();
            assert!(due + period > now, "room {} is overdue", r.id);
            due.saturating_duration_since(now).as_nanos() % p
        })
        .collect();
    assert_eq!(phases.len(), 8, "one room per client");
    phases.sort_unstable();
    let gaps: Vec<u128> = (0..8)
        .map(|i| (phases[(i + 1) % 8] + p - phases[i]) % p)
        .collect();
    let min = *gaps.iter().min().unwrap();
    // An eighth of the period, less one candidate step.
    assert!(
        min >= p / 8 - p / 64,
        "rooms tick too close together: gaps {gaps:?} ns of a {p} ns period"
    );
}

/// Acknowledgements ride on inputs and snapshots: with one packet a tick each way, almost no
/// packet carries an acknowledgement alone, even on a 1 ms link, whose RTT is far under the
/// 33 ms tick (stock quinn caps the ACK delay it asks for at max(RTT, 25 ms), which would leave
/// the delayed-ACK timer firing before the next packet).
#[test]
fn acknowledgements_ride_on_inputs_and_snapshots() {
    let mut net = Net::seated(10, NetConfig::default());
    net.play(30, |_, _| Some((10, 0, 0, 0)));
    let figures = |net: &Net| {
        (
            net.shards[0].counters().snapshots,
            net.shards[0].quic_stats(),
        )
    };
    let (snaps0, q0) = figures(&net);
    net.play(150, |_, _| Some((10, 0, 0, 0)));
    let (snaps1, q1) = figures(&net);
    let player_ticks = snaps1 - snaps0;
    assert!(player_ticks >= 10 * 140, "{player_ticks} player-ticks");
    let (out, inn) = (
        q1.ack_only_out - q0.ack_only_out,
        q1.ack_only_in - q0.ack_only_in,
    );
    assert!(
        out * 50 <= player_ticks && inn * 50 <= player_ticks,
        "ACK-only packets per player-tick: out {:.3}, in {:.3}",
        out as f64 / player_ticks as f64,
        inn as f64 / player_ticks as f64
    );
}

/// The old player's seat goes when its session ends; were a seat to outlive its connection
/// (held for a resume, or a bug), its route's generation check still keeps the new player out:
/// with the seat left in place, this test passes with the check and fails without it (B then
/// gets the old player's 90 snapshots).
#[test]
fn a_reused_connection_slot_gets_nothing_meant_for_its_last_player() {
    let mut net = Net::seated(2, NetConfig::default());
    let (a, c) = (0, 1);
    let room = room_of(&net, a).unwrap();
    assert_eq!(room_of(&net, c), Some(room));
    let old = PlayerId(net.clients[a].client.player_id());
    let old_key = net.shards[0].connection_of(old).unwrap();
    // A vanishes: the idle timeout ends its session and frees its seat and its slot.
    net.clients[a].cut = true;
    net.run_for(Duration::from_secs(12));
    assert_eq!(net.shards[0].connection_of(old), None);
    assert_eq!(
        net.shards[0].room(RoomId(room)).map(|r| r.players()),
        Some(1)
    );
    // B connects and takes the slot (quinn reuses it), but not the old player's place.
    let b = net.add_client();
    net.connect_all(Duration::from_secs(2));
    let new = PlayerId(net.clients[b].client.player_id());
    assert_ne!(new, old);
    let new_key = net.shards[0].connection_of(new).unwrap();
    assert_eq!(new_key.slot, old_key.slot, "the test needs the slot reused");
    assert_ne!(new_key.generation, old_key.generation);
    // The room plays on, with chat and events: none of it may reach B.
    net.clients[c].client.chat("still here?");
    net.play(90, |i, t| {
        (i == c).then_some((10, 0, (t % 10 == 0) as u8, 0))
    });
    assert_eq!(net.snapshots(b), 0, "B got the old player's snapshots");
    let leaked: Vec<_> = net
        .events(b)
        .iter()
        .filter(|e| {
            matches!(
                e,
                ClientEvent::Joined { .. }
                    | ClientEvent::Chat { .. }
                    | ClientEvent::GameEvent { .. }
                    | ClientEvent::Left { .. }
            )
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "B got the old player's messages: {leaked:?}"
    );
    assert!(
        net.snapshots(c) >= 85,
        "the room played on: {}",
        net.snapshots(c)
    );
}

/// A player whose address changes mid-game (a NAT rebinding, a phone moving networks) keeps
/// its connection and its snapshots, three times over: each move uses up one of the two
/// connection IDs the server provides, and the server replaces it.
#[test]
fn a_player_whose_address_changes_keeps_playing() {
    let mut net = Net::seated(4, NetConfig::default());
    net.run_for(Duration::from_secs(1));
    let connections = net.shards[0].connections();
    for k in 1..=3u8 {
        let before = net.snapshots(0);
        net.clients[0].addr = format!("127.0.9.{k}:4000").parse().unwrap();
        net.run_for(Duration::from_secs(2));
        assert!(net.closed(0).is_none(), "move {k}: {:?}", net.events(0));
        let got = net.snapshots(0) - before;
        // 2 s at 30 Hz is 60 snapshots; path validation may cost a few.
        assert!(got >= 50, "move {k}: {got} snapshots in 2 s");
        assert!(room_of(&net, 0).is_some());
    }
    assert_eq!(
        net.shards[0].connections(),
        connections,
        "a new connection was made"
    );
    // The others never noticed.
    for i in 1..4 {
        assert!(net.closed(i).is_none());
    }
}

/// Game code that panics ends only its own room: its player is told (`Left`, RoomCrashed)
/// and stays connected, able to play on; the other room of the same shard ticks on; the
/// result is recorded as crashed and counted.
#[test]
fn a_panicking_game_ends_only_its_room() {
    use tickshard::game::faulty::FAULT_BUTTON;
    let mut net = Net::new(NetConfig::default());
    let (a, b) = (net.add_client(), net.add_client());
    net.connect_all(Duration::from_secs(2));
    net.clients[a].client.join(None, "faulty-arena");
    net.clients[b].client.join(None, "arena");
    net.run_for(Duration::from_millis(300));
    let (faulty, arena) = (room_of(&net, a).unwrap(), room_of(&net, b).unwrap());
    assert_ne!(faulty, arena);
    assert_eq!(net.shards[0].rooms().len(), 2);

    // A few ordinary ticks, then the fault button.
    net.play(10, |_, _| Some((10, 0, 0, 0)));
    let before = net.snapshots(b);
    net.play(30, |i, t| {
        let buttons = if i == a && t == 5 { FAULT_BUTTON } else { 0 };
        Some((10, 0, buttons, 0))
    });
    assert!(
        net.events(a).iter().any(|e| matches!(
            e,
            ClientEvent::Left { room_id, reason: tickshard_schema::LeaveReason::RoomCrashed }
                if *room_id == faulty
        )),
        "{:?}",
        net.events(a)
    );
    assert_eq!(room_of(&net, a), None);
    assert!(net.closed(a).is_none(), "the connection stays open");
    let got = net.snapshots(b) - before;
    assert!(got >= 28, "the other room ticked on: {got} of 30 snapshots");
    assert_eq!(room_of(&net, b), Some(arena));

    let r = results(&mut net);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].room.0, faulty);
    assert!(
        matches!(&r[0].end, RoomEnd::Crashed(why) if why.starts_with("step: faulty-arena")),
        "{:?}",
        r[0].end
    );
    assert_eq!(
        r[0].standings.len(),
        1,
        "the final result is still recorded"
    );
    assert_eq!(net.shards[0].counters().rooms_crashed, 1);
    assert_eq!(net.shards[0].rooms().len(), 1);

    // The shard is whole: the same player plays on in a new room.
    net.clients[a].client.join(None, "arena");
    net.run_for(Duration::from_millis(300));
    assert_eq!(room_of(&net, a), Some(arena));
}

fn welcomed(net: &Net, i: usize) -> bool {
    net.clients[i].client.player_id() != 0
}

fn ip(text: &str) -> std::net::IpAddr {
    text.parse().unwrap()
}

/// One host holds at most `max_per_address` sessions: its next connections are refused,
/// counted, and another host is served; a place freed is taken again.
#[test]
fn one_address_holds_at_most_its_share_of_sessions() {
    use tickshard::shard::Admission;
    let mut net = Net::new(NetConfig {
        admission: Admission {
            max_per_address: 4,
            retry_above: 100,
            ..Admission::default()
        },
        ..NetConfig::default()
    });
    let greedy: Vec<usize> = (0..6)
        .map(|_| net.add_client_from(ip("127.0.5.1")))
        .collect();
    let other = net.add_client_from(ip("127.0.5.2"));
    net.run_for(Duration::from_secs(1));
    let served = greedy.iter().filter(|&&i| welcomed(&net, i)).count();
    assert_eq!(served, 4, "the host's share");
    for &i in &greedy {
        assert!(
            welcomed(&net, i) || net.closed(i).is_some(),
            "client {i} neither in nor refused"
        );
    }
    assert!(welcomed(&net, other), "another host is served");
    assert_eq!(net.shards[0].counters().refused_per_address, 2);
    // One of the host's clients leaves: a new one from it gets in.
    let leaving = *greedy.iter().find(|&&i| welcomed(&net, i)).unwrap();
    let now = net.now();
    net.clients[leaving].client.close(now);
    net.run_for(Duration::from_secs(1));
    let again = net.add_client_from(ip("127.0.5.1"));
    net.run_for(Duration::from_secs(1));
    assert!(welcomed(&net, again), "{:?}", net.events(again));
}

/// Sessions that never say Hello hold handshake budget, not player places: past
/// `max_handshakes` new connections are refused and counted, until the hello deadline
/// closes the silent ones.
#[test]
fn silent_sessions_are_bounded_by_the_handshake_budget() {
    use tickshard::shard::Admission;
    let mut net = Net::new(NetConfig {
        hello_timeout: Duration::from_secs(2),
        admission: Admission {
            max_handshakes: 5,
            retry_above: 100,
            ..Admission::default()
        },
        ..NetConfig::default()
    });
    let silent: Vec<usize> = (0..8)
        .map(|k| {
            net.add_client_from_with(ip(&format!("127.0.6.{}", k + 1)), |c| c.auto_hello = false)
        })
        .collect();
    net.run_for(Duration::from_millis(500));
    let refused = silent.iter().filter(|&&i| net.closed(i).is_some()).count();
    assert_eq!(
        refused,
        3,
        "{:?}",
        silent.iter().map(|&i| net.closed(i)).collect::<Vec<_>>()
    );
    assert_eq!(net.shards[0].counters().refused_handshakes, 3);
    assert_eq!(net.shards[0].connections(), 5);
    assert_eq!(net.shards[0].players(), 0);
    // While the budget is spent, even a real client waits its turn: refused.
    let early = net.add_client_from(ip("127.0.6.100"));
    net.run_for(Duration::from_millis(300));
    assert!(net.closed(early).is_some());
    // The hello deadline frees the budget.
    net.run_for(Duration::from_secs(3));
    let late = net.add_client_from(ip("127.0.6.101"));
    net.run_for(Duration::from_millis(500));
    assert!(welcomed(&net, late), "{:?}", net.events(late));
}

/// Past `retry_above` sessions not yet welcomed, new clients must answer a QUIC Retry before
/// their handshake is accepted; clients that do (every real one) get in. With 0, every
/// client is asked. Welcomed players alone count against `max_connections`.
#[test]
fn unvalidated_clients_answer_a_retry_when_handshakes_pile_up() {
    use tickshard::shard::Admission;
    for (retry_above, clients) in [(0usize, 6usize), (2, 12)] {
        let mut net = Net::new(NetConfig {
            admission: Admission {
                retry_above,
                ..Admission::default()
            },
            ..NetConfig::default()
        });
        let all: Vec<usize> = (0..clients)
            .map(|k| net.add_client_from(ip(&format!("127.0.7.{}", k + 1))))
            .collect();
        net.connect_all(Duration::from_secs(5));
        let retries = net.shards[0].counters().retries;
        if retry_above == 0 {
            assert_eq!(retries, clients as u64, "every client was asked");
        } else {
            assert!(
                retries >= 1 && retries < clients as u64,
                "some asked, not the first {retry_above}: {retries}"
            );
        }
        assert!(all.iter().all(|&i| welcomed(&net, i)));
    }
    // max_connections counts players: with 2 welcomed, a third is refused as full.
    let mut net = Net::new(NetConfig {
        max_connections: 2,
        ..NetConfig::default()
    });
    let (a, b) = (net.add_client(), net.add_client());
    net.connect_all(Duration::from_secs(2));
    let c = net.add_client_from(ip("127.0.7.200"));
    net.run_for(Duration::from_millis(500));
    assert!(welcomed(&net, a) && welcomed(&net, b));
    assert!(net.closed(c).is_some() && !welcomed(&net, c));
    assert_eq!(net.shards[0].counters().refused_full, 1);
}

/// One address starting handshakes faster than `handshakes_per_second` (burst twice that)
/// has the excess Initials dropped unanswered and counted; its clients' retransmissions get
/// in as tokens refill, and another host is not slowed.
#[test]
fn one_address_starts_handshakes_at_its_rate() {
    use tickshard::shard::Admission;
    let mut net = Net::new(NetConfig {
        admission: Admission {
            handshakes_per_second: 10,
            retry_above: 100,
            ..Admission::default()
        },
        ..NetConfig::default()
    });
    let burst: Vec<usize> = (0..30)
        .map(|_| net.add_client_from(ip("127.0.8.1")))
        .collect();
    let other = net.add_client_from(ip("127.0.8.2"));
    net.run_for(Duration::from_millis(200));
    let early = burst.iter().filter(|&&i| welcomed(&net, i)).count();
    assert_eq!(early, 20, "the burst");
    assert!(net.shards[0].counters().refused_handshake_rate >= 10);
    assert!(welcomed(&net, other), "another host is not slowed");
    net.connect_all(Duration::from_secs(8));
    assert!(burst
        .iter()
        .all(|&i| welcomed(&net, i) && net.closed(i).is_none()));
}
