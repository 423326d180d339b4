//! Deterministic tests of the shard core: no sockets, a virtual clock, seeded network faults.

mod harness;

use client_sim::ClientEvent;
use harness::{Net, NetConfig};
use std::time::Duration;

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
    net.play(30, |_, _| Some((127, 0, 0, 0)));
    let snaps = net
        .events(c)
        .iter()
        .filter(|e| matches!(e, ClientEvent::Snapshot { .. }))
        .count();
    assert!(snaps >= 28, "{snaps} snapshots in one second");
    assert!(net.clients[c].client.own_entity().is_some());
}
