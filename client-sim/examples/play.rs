//! A minimal game client: connect, quick-match into the arena, walk in a circle for a few
//! seconds while following the server's view, then leave and close.
//!
//! ```sh
//! cargo run --release --bin tickshard            # in one terminal
//! cargo run --release -p client-sim --example play  # in another, same directory
//! ```
//!
//! Copy this loop into a game: send one input per frame, read events, draw
//! `client.world()`; `last_applied_input()` tells which of your inputs the server has applied
//! (for client-side prediction and reconciliation).

use client_sim::drive::UdpClient;
use client_sim::{ClientConfig, ClientEvent, SessionState, Trust};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let server = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4433".into())
        .parse()?;
    // Trust the development certificate the server wrote (or use Trust::pin with the
    // SHA-256 it prints).
    let trust = Trust::from_cert_file(".tickshard/dev-cert.der".as_ref())?;
    let config = ClientConfig::new(trust, "localhost");
    let mut c = UdpClient::connect(server, &config, None)?;
    let frame = Duration::from_secs(1) / 30;
    let start = Instant::now();
    let mut joined = false;
    while start.elapsed() < Duration::from_secs(5) {
        c.run_for(frame)?;
        while let Some(ev) = c.client.poll_event() {
            match ev {
                ClientEvent::Welcome { player_id, .. } => {
                    println!("welcome, player {player_id}");
                    c.client.join(None, "arena");
                }
                ClientEvent::Joined {
                    room_id, players, ..
                } => {
                    println!("joined room {room_id} with {players} players");
                    joined = true;
                }
                ClientEvent::Error { code, message } => println!("error {code}: {message}"),
                ClientEvent::Closed(reason) => anyhow::bail!("connection closed: {reason:?}"),
                _ => {}
            }
        }
        if matches!(c.client.state(), SessionState::InRoom { .. }) {
            // Walk in a circle: the input is a direction; the server enforces the speed.
            let a = start.elapsed().as_secs_f32();
            let seq = c.client.send_input(
                Instant::now(),
                (a.cos() * 127.0) as i8,
                (a.sin() * 127.0) as i8,
                0,
                0,
            );
            if seq % 30 == 0 {
                if let Some(me) = c.client.own_entity() {
                    println!(
                        "input {seq}: server applied up to {}, I am at ({:.1}, {:.1}), I see {} entities, rtt {:?}",
                        c.client.last_applied_input(),
                        me.x() as f32 / 16.0,
                        me.y() as f32 / 16.0,
                        c.client.world().len(),
                        c.client.rtt()
                    );
                }
            }
        }
    }
    if joined {
        c.client.leave();
    }
    c.client.close(Instant::now());
    c.run_for(Duration::from_millis(100))?;
    Ok(())
}
