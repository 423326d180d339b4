//! Writes the hand-made seeds of the corpus (`fuzz/corpus/<target>/seed-*`): well-formed
//! inputs the fuzzer starts from. `cargo run -p tickshard-fuzz --example seeds`; the fuzzer's
//! own finds are added with `cargo fuzz cmin` (fuzz/README.md).

use std::path::Path;
use tickshard_schema::{
    changes::encode_changes, write_frame, ControlMsg, EntityState, InputCmd, InputDatagram,
    LeaveReason, SnapshotWriter,
};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(format!("seed-{name}")), data).expect("seed");
}

fn main() {
    let messages = [
        ControlMsg::Hello {
            protocol_version: 3,
            token: "tok".into(),
            client_name: "seed".into(),
        },
        ControlMsg::Join {
            room_id: 0,
            mode: "arena".into(),
        },
        ControlMsg::Leave,
        ControlMsg::Left {
            room_id: 1 << 48 | 1,
            reason: LeaveReason::RoomCrashed,
        },
        ControlMsg::Chat {
            from_player: 7,
            text: "gg \u{202e}wp".into(),
        },
        ControlMsg::GameEvent {
            tick: 9,
            kind: 1,
            a: 2,
            b: 3,
        },
        ControlMsg::DrainNotice {
            grace_ms: 30_000,
            reconnect_hint: "eu-2.example:4433".into(),
        },
        ControlMsg::Error {
            code: 4,
            message: "room full".into(),
        },
    ];
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let mut stream = Vec::new();
    for (i, msg) in messages.iter().enumerate() {
        write("control", &format!("{i}"), msg.encode(&mut fbb));
        msg.write_frame(&mut fbb, &mut stream);
    }
    // frames: the split byte first, then the stream.
    write("frames", "all", &[&[7u8][..], &stream].concat());
    write(
        "frames",
        "half",
        &[&[200u8][..], &stream[..stream.len() / 2]].concat(),
    );
    let mut oversized = vec![3u8];
    write_frame(&vec![0u8; 70_000], &mut oversized);
    write("frames", "oversized", &oversized);

    let entities: Vec<EntityState> = (1..6u32)
        .map(|id| EntityState::new(id, id as u16 * 100, 50, 1, 0, 100, 0, 0, 0))
        .collect();
    let mut changes = Vec::new();
    encode_changes(&[], &[], &entities, &mut changes);
    let mut writer = SnapshotWriter::default();
    write("snapshot", "full", writer.encode(12, 0, 5, &changes));
    let moved: Vec<EntityState> = entities
        .iter()
        .map(|e| EntityState::new(e.id(), e.x() + 3, e.y(), 1, 0, 90, 0, 0, 0))
        .collect();
    let mut delta = Vec::new();
    encode_changes(&entities, &[2], &moved[2..], &mut delta);
    write("snapshot", "delta", writer.encode(13, 12, 6, &delta));

    let mut input = InputDatagram {
        seq: 10,
        client_tick: 40,
        ack_snapshot: 12,
        len: 3,
        ..Default::default()
    };
    for i in 0..3u32 {
        input.cmds[i as usize] = InputCmd::new(10 - i, 20, -20, 1, 0, 1000);
    }
    write("input", "three", input.encode().bytes());

    // shard: operation sequences (see tickshard_fuzz::shard for the opcodes).
    let play = [
        0u8, 0, 0, 9, 50, // three clients, 1 s
        1, 0, 1, 1, 1, 1, 1, 2, 0, 9, 20, // join (client 2 into faulty-arena), 400 ms
        2, 0, 10, 10, 0, 2, 2, 5, 5, 0x80, 9, 10, // inputs, the fault button (client 2)
        4, 2, 5, b'h', b'e', b'l', b'l', b'o', // chat
        5, 0, 6, 1, 2, 3, 4, 5, 6, // a raw control frame
        6, 1, 4, 0xff, 0, 1, 2, // a raw datagram
        7, 9, 8, 0xc0, 0, 0, 0, 1, 2, 3, 4, // garbage from another host
        8, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, // a join from the mesh
        3, 0, 10, 1, 9, 100, // a leave, a cut link, 2 s
    ];
    write("shard", "play", &play);
    write("shard", "lobby", &[0, 0, 9, 255, 9, 255]);
}
