//! The fuzz targets, as plain functions of the fuzzer's bytes.
//!
//! Each one feeds arbitrary bytes to a piece of the server that meets network input and
//! checks what must hold whatever the bytes: no panic, no unbounded work, and the invariants
//! named in its docs. `cargo fuzz` runs them where a nightly toolchain exists
//! (`fuzz/cargo-fuzz`, one `fuzz_target!` per function); on stable, `tests/corpus.rs` replays
//! the committed corpus (`fuzz/corpus/<target>/`) through the same functions, so they are
//! built and exercised on every CI run.
//!
//! | target | what it feeds |
//! |---|---|
//! | [`control`] | one control-stream frame body: the verified decode of the `Control` root |
//! | [`snapshot`] | one snapshot datagram: the `Snapshot` root, then its packed changes merged |
//! | [`input`] | one input datagram (the tag byte and the packed commands) |
//! | [`frames`] | a control stream split anywhere: the frame decoder, then each frame decoded |
//! | [`shard`] | an operation sequence against two shard cores in the deterministic harness |

#[allow(missing_docs, unreachable_pub)]
#[path = "../../tests/harness/mod.rs"]
mod harness;

use harness::{Net, NetConfig};
use std::time::Duration;
use tickshard::shard::mesh::ShardMsg;
use tickshard::{PlayerId, RoomId, ShardId};
use tickshard_schema::{
    changes::apply_changes, decode_snapshot, ControlMsg, EntityState, FrameDecoder, InputDatagram,
};

/// A fuzz target: the fuzzer's bytes in, a panic if something that must hold does not.
pub type Target = fn(&[u8]);

/// The names of the targets, as the corpus directories and `cargo fuzz` know them.
pub const TARGETS: [(&str, Target); 5] = [
    ("control", control),
    ("snapshot", snapshot),
    ("input", input),
    ("frames", frames),
    ("shard", shard),
];

/// A control frame body: decoding either fails cleanly or gives a message that encodes and
/// decodes back to itself.
pub fn control(data: &[u8]) {
    if let Ok(msg) = ControlMsg::decode(data) {
        let mut fbb = flatbuffers::FlatBufferBuilder::new();
        let again = ControlMsg::decode(msg.encode(&mut fbb)).expect("an encoded message decodes");
        assert_eq!(again, msg, "decode(encode(m)) == m");
    }
}

/// A snapshot datagram: the verified decode, then its changes merged into a baseline; the
/// merged state stays sorted by entity id (what the client relies on).
pub fn snapshot(data: &[u8]) {
    let Ok(snap) = decode_snapshot(data) else {
        return;
    };
    let changes = snap.changes().map(|c| c.bytes()).unwrap_or_default();
    let mut state: Vec<EntityState> = (0..4u32)
        .map(|id| EntityState::new(id * 3, 100, 200, 1, 0, 100, 0, 0, 0))
        .collect();
    if apply_changes(changes, &mut state).is_ok() {
        assert!(
            state.windows(2).all(|w| w[0].id() < w[1].id()),
            "merged state sorted by id"
        );
    }
}

/// An input datagram: decoding fails cleanly or gives at most the redundancy's worth of
/// commands, newest first.
pub fn input(data: &[u8]) {
    if let Ok(d) = InputDatagram::decode(data) {
        assert!(d.cmds().len() <= tickshard_schema::MAX_INPUT_REDUNDANCY);
    }
}

/// A control stream, split where the fuzzer says: frames come out whole or as an error, and
/// every frame decodes or fails cleanly.
pub fn frames(data: &[u8]) {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let cut = (split as usize).min(stream.len());
    let mut decoder = FrameDecoder::default();
    for part in [&stream[..cut], &stream[cut..]] {
        decoder.push(part);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let _ = ControlMsg::decode(frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// Reads the operation stream.
struct Ops<'a>(&'a [u8]);

impl Ops<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, most: usize) -> &[u8] {
        let n = (self.byte().unwrap_or(0) as usize)
            .min(most)
            .min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken
    }

    fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = v << 8 | u64::from(self.byte().unwrap_or(0));
        }
        v
    }
}

/// Most clients one run adds.
const MAX_CLIENTS: usize = 6;
/// Most operations one run performs (each may run the network for a while).
const MAX_OPS: usize = 64;

/// An operation sequence against two shards in the harness: clients connecting, joining,
/// leaving, sending inputs, chat and raw frames and datagrams, garbage from other addresses,
/// messages between shards, operators' commands and time passing. Whatever happens, nothing
/// panics and every shard stays consistent: each welcomed player counted once, no more
/// players seated in a room than it has seats.
pub fn shard(data: &[u8]) {
    shard_run(data);
}

/// What a [`shard`] run reached, for checking that the seeds get past the handshake.
#[derive(Debug, Default)]
pub struct ShardRun {
    /// Clients the server welcomed.
    pub welcomed: usize,
    /// Most clients seated at once, seen after any operation.
    pub most_seated: usize,
    /// Rooms that ended (results recorded).
    pub rooms_ended: usize,
}

/// [`shard`], telling what the run reached.
pub fn shard_run(data: &[u8]) -> ShardRun {
    let mut run = ShardRun::default();
    let mut ops = Ops(data);
    let mut net = Net::new(NetConfig {
        shards: 2,
        capacity: 4,
        hello_timeout: Duration::from_secs(2),
        lobby_timeout: Duration::from_secs(4),
        ..NetConfig::default()
    });
    for _ in 0..MAX_OPS {
        let Some(op) = ops.byte() else {
            break;
        };
        let clients = net.clients.len();
        let pick = |b: u8| (b as usize) % clients.max(1);
        match op % 12 {
            0 if clients < MAX_CLIENTS => {
                net.add_client();
            }
            1 if clients > 0 => {
                let i = pick(ops.byte().unwrap_or(0));
                let mode = if ops.byte().unwrap_or(0) % 4 == 0 {
                    "faulty-arena"
                } else {
                    "arena"
                };
                net.clients[i].client.join(None, mode);
            }
            2 if clients > 0 => {
                let i = pick(ops.byte().unwrap_or(0));
                let (x, y, b) = (ops.byte(), ops.byte(), ops.byte());
                let now = net.now();
                net.clients[i].client.send_input(
                    now,
                    x.unwrap_or(0) as i8,
                    y.unwrap_or(0) as i8,
                    b.unwrap_or(0),
                    0,
                );
            }
            3 if clients > 0 => {
                let i = pick(ops.byte().unwrap_or(0));
                net.clients[i].client.leave();
            }
            4 if clients > 0 => {
                let i = pick(ops.byte().unwrap_or(0));
                let text = String::from_utf8_lossy(ops.bytes(300)).into_owned();
                net.clients[i].client.chat(&text);
            }
            5 if clients > 0 => {
                let i = pick(ops.byte().unwrap_or(0));
                let raw = ops.bytes(255).to_vec();
                net.clients[i].client.send_raw_control(&raw);
            }
            6 if clients > 0 => {
                let i = pick(ops.byte().unwrap_or(0));
                let raw = ops.bytes(255).to_vec();
                net.clients[i].client.send_raw_datagram(&raw);
            }
            7 => {
                let host = ops.byte().unwrap_or(1);
                let from = format!("127.9.{host}.1:4000").parse().expect("address");
                let raw = ops.bytes(255).to_vec();
                net.inject(from, &raw);
            }
            8 => {
                // A message from the other shard about ids the fuzzer chose. Peers are other
                // shards of the process: their ids always name one of its shards.
                let to = usize::from(ops.byte().unwrap_or(0) % 2);
                let shard = |b: Option<u8>| ShardId(u16::from(b.unwrap_or(0) % 2));
                let player = PlayerId::new(shard(ops.byte()), ops.u64() & 0xffff);
                let msg = match ops.byte().unwrap_or(0) % 4 {
                    0 => ShardMsg::JoinRequest {
                        player,
                        room: RoomId::new(shard(ops.byte()), ops.u64() & 0xffff),
                    },
                    1 => ShardMsg::Leave { player },
                    2 => ShardMsg::Chat {
                        player,
                        text: String::from_utf8_lossy(ops.bytes(64)).into_owned(),
                    },
                    _ => ShardMsg::Snapshot {
                        player,
                        bytes: bytes::Bytes::copy_from_slice(ops.bytes(255)),
                    },
                };
                let now = net.now();
                net.shards[to].handle_shard_message(now, msg);
            }
            9 => {
                let ms = u64::from(ops.byte().unwrap_or(0)) * 20;
                net.run_for(Duration::from_millis(ms));
            }
            10 if clients > 0 => {
                let i = pick(ops.byte().unwrap_or(0));
                net.clients[i].cut = !net.clients[i].cut;
            }
            _ => net.run_for(Duration::from_millis(5)),
        }
        net.run_for(Duration::from_millis(2));
        let seated = net
            .clients
            .iter()
            .filter(|c| c.client.entity_id().is_some())
            .count();
        run.most_seated = run.most_seated.max(seated);
    }
    net.run_for(Duration::from_millis(500));
    run.welcomed = net
        .clients
        .iter()
        .filter(|c| c.client.player_id() != 0)
        .count();
    run.rooms_ended = net.results.len();
    for shard in &net.shards {
        for room in shard.rooms() {
            assert!(room.players <= 4, "a room over its seats: {room:?}");
        }
    }
    run
}
