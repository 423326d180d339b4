//! End-to-end tests over real loopback sockets: the `tickshard` binary with 2 shards and game
//! clients on stock `quinn` (tokio), speaking only what PROTOCOL.md describes.

mod common;

use common::{toward, QuinnClient, Server};
use std::time::Duration;
use tickshard_schema::ControlMsg;

const RATE: f64 = 30.0;

#[tokio::test(flavor = "current_thread")]
async fn connect_hello_join() {
    let server = Server::start("hello", &["--shards", "2"]);
    let mut c = QuinnClient::connect(&server).await;
    let (player, _shard) = c.hello().await;
    assert_ne!(player, 0);
    let (room, _, entity) = c.join(0).await;
    assert_ne!(room, 0);
    assert_ne!(entity, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn play_two_seconds_at_the_tick_rate_and_move_as_commanded() {
    let server = Server::start("play", &["--shards", "2"]);
    let mut c = QuinnClient::connect(&server).await;
    c.hello().await;
    let (_room, _, entity) = c.join(0).await;
    let mut seq = 0;
    // Learn where we stand, then walk toward the far side along x for 2 s.
    let first = c
        .play(Duration::from_millis(200), entity, |_| (0, 0), &mut seq)
        .await;
    let (x0, y0) = first
        .iter()
        .rev()
        .find_map(|s| s.entities.iter().find(|e| e.0 == entity))
        .map(|e| (e.1, e.2))
        .expect("own entity in view");
    let dir: i8 = if x0 < 512.0 { 127 } else { -127 };
    let seen = c
        .play(Duration::from_secs(2), entity, |_| (dir, 0), &mut seq)
        .await;
    // Snapshots at the tick rate, within 10%.
    let expected = 2.0 * RATE;
    let got = seen.len() as f64;
    assert!(
        (got - expected).abs() <= expected * 0.1,
        "{got} snapshots in 2 s, expected {expected}"
    );
    let ticks: Vec<u32> = seen.iter().map(|s| s.tick).collect();
    assert!(ticks.windows(2).all(|w| w[1] > w[0]), "ticks increase");
    // The entity moved along x as commanded: 160 units/s, limited by the world's edge.
    let (x1, y1) = seen
        .iter()
        .rev()
        .find_map(|s| s.entities.iter().find(|e| e.0 == entity))
        .map(|e| (e.1, e.2))
        .unwrap();
    let room_to_edge = if dir > 0 { 1024.0 - x0 } else { x0 };
    let want = (160.0 * 2.0f32).min(room_to_edge);
    let moved = (x1 - x0) * dir.signum() as f32;
    assert!(
        moved >= want * 0.8 && moved <= 160.0 * 2.0 * 1.1,
        "moved {moved}, wanted about {want}"
    );
    assert!((y1 - y0).abs() < 1.0, "no drift in y");
    // The server confirms applying our inputs.
    assert!(seen.last().unwrap().last_input >= seq - 10);
}

#[tokio::test(flavor = "current_thread")]
async fn a_second_client_in_the_room_sees_the_first() {
    let server = Server::start("two", &["--shards", "2"]);
    let mut a = QuinnClient::connect(&server).await;
    a.hello().await;
    let (room, _, ea) = a.join(0).await;
    let mut b = QuinnClient::connect(&server).await;
    b.hello().await;
    let (room_b, _, eb) = b.join(room).await;
    assert_eq!(room, room_b);
    // Both walk to the middle of the arena, so they end up in each other's view.
    let centre = (512.0, 512.0);
    let (mut sa, mut sb) = (0, 0);
    let (_, seen_b) = tokio::join!(
        a.play(
            Duration::from_secs(5),
            ea,
            |p| p.map_or((0, 0), |p| toward(p, centre)),
            &mut sa
        ),
        b.play(
            Duration::from_secs(5),
            eb,
            |p| p.map_or((0, 0), |p| toward(p, centre)),
            &mut sb
        ),
    );
    let last = seen_b.last().unwrap();
    assert!(
        last.entities.iter().any(|e| e.0 == ea),
        "b sees a's entity {ea}: {:?}",
        last.entities
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_client_on_one_shard_plays_in_a_room_on_the_other() {
    let server = Server::start("cross", &["--shards", "2"]);
    let mut host = QuinnClient::connect(&server).await;
    let (_, host_shard) = host.hello().await;
    let (room, room_shard, _) = host.join(0).await;
    assert_eq!(host_shard, room_shard);
    // New connections land on either shard (random connection IDs); take one on the other.
    let mut guest = None;
    for _ in 0..40 {
        let mut c = QuinnClient::connect(&server).await;
        let (_, shard) = c.hello().await;
        if shard != room_shard {
            guest = Some(c);
            break;
        }
    }
    let mut guest = guest.expect("some connection lands on the other shard");
    let (joined, shard, entity) = guest.join(room).await;
    assert_eq!((joined, shard), (room, room_shard));
    let mut seq = 0;
    let seen = guest
        .play(Duration::from_secs(2), entity, |_| (0, 90), &mut seq)
        .await;
    assert!(
        seen.len() as f64 >= 2.0 * RATE * 0.9,
        "{} snapshots through the other shard",
        seen.len()
    );
    let ys: Vec<f32> = seen
        .iter()
        .filter_map(|s| s.entities.iter().find(|e| e.0 == entity).map(|e| e.2))
        .collect();
    assert!(
        ys.last().unwrap() - ys[0] > 100.0 || *ys.last().unwrap() > 1000.0,
        "guest moved: {:?}",
        (ys[0], ys.last())
    );
    // Leaving is confirmed.
    guest.send(&ControlMsg::Leave).await;
    let left = guest
        .recv_until(Duration::from_secs(2), |m| {
            matches!(m, ControlMsg::Left { .. })
        })
        .await;
    assert!(matches!(left, ControlMsg::Left { room_id, .. } if room_id == room));
}

#[tokio::test(flavor = "current_thread")]
async fn bad_frames_close_only_that_connection() {
    let server = Server::start("bad", &["--shards", "2"]);
    let mut good = QuinnClient::connect(&server).await;
    good.hello().await;
    let (_, _, eg) = good.join(0).await;
    let mut bad = QuinnClient::connect(&server).await;
    bad.send
        .write_all(&(1u32 << 24).to_le_bytes())
        .await
        .unwrap();
    let err = bad.conn.closed().await;
    match err {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
            c.error_code.into_inner(),
            tickshard_schema::codes::FRAME_TOO_LARGE as u64
        ),
        other => panic!("expected an application close, got {other}"),
    }
    let mut seq = 0;
    let seen = good
        .play(Duration::from_secs(1), eg, |_| (0, 0), &mut seq)
        .await;
    assert!(
        seen.len() >= 27,
        "the good client kept playing: {}",
        seen.len()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn first_sigterm_drains_second_closes_clients_with_a_reason_and_exits_zero() {
    let mut server = Server::start("term", &["--shards", "2", "--drain-grace", "20"]);
    let mut c = QuinnClient::connect(&server).await;
    c.hello().await;
    c.join(0).await;
    // SAFETY: sending a signal to the child we started.
    unsafe {
        libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM);
    }
    // The first signal drains: the client is told and keeps its seat.
    let notice = c
        .recv_until(Duration::from_secs(3), |m| {
            matches!(m, ControlMsg::DrainNotice { .. })
        })
        .await;
    assert!(
        matches!(notice, ControlMsg::DrainNotice { grace_ms, .. } if grace_ms > 15_000 && grace_ms <= 20_000)
    );
    assert!(
        c.conn.close_reason().is_none(),
        "still connected while draining"
    );
    // The second cuts the drain short.
    // SAFETY: as above.
    unsafe {
        libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM);
    }
    match tokio::time::timeout(Duration::from_secs(3), c.conn.closed())
        .await
        .expect("closed promptly")
    {
        quinn::ConnectionError::ApplicationClosed(a) => {
            assert_eq!(
                a.error_code.into_inner(),
                tickshard_schema::codes::SHUTTING_DOWN as u64
            )
        }
        other => panic!("expected an application close, got {other}"),
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server did not exit within 5 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After a crash (SIGKILL) and a restart on the same port and data directory, a client of the
/// old process learns at its next packet that its connection is gone: the new process signs
/// stateless resets with the key the old one used (kept in the data directory), so the client
/// closes with `Reset` within one keep-alive (2 s) instead of waiting for its idle timeout
/// (10 s). With a key of each process's own, the client would only time out.
#[tokio::test(flavor = "current_thread")]
async fn after_a_crash_and_a_restart_old_clients_get_a_stateless_reset() {
    let mut server = Server::start("reset", &["--shards", "1"]);
    let mut c = QuinnClient::connect(&server).await;
    c.hello().await;
    let mut again = server.crash_and_restart(
        common::binary("tickshard"),
        Duration::ZERO,
        &["--shards", "1"],
    );
    let closed = tokio::time::timeout(Duration::from_secs(6), c.conn.closed()).await;
    let _ = again.kill();
    let _ = again.wait();
    let reason = closed.expect("the old connection ended within 6 s of the restart");
    assert!(
        matches!(reason, quinn::ConnectionError::Reset),
        "{reason:?}"
    );
}
