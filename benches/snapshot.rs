//! Micro-benchmarks of the tick's hot path, in memory.
//!
//! - `snapshot/build/N`: one viewer's delta snapshot with N entities in view, all moving.
//!   Shape: linear in N (one comparison and one 16-byte copy per entity), flat per entity.
//! - `room_tick/P`: one full arena room tick (apply P inputs, step, P snapshots) with P
//!   players. Shape: about linear in P while the view stays bounded by the grid (area of
//!   interest); the per-player cost should stay flat as P grows.
//! - `input/decode`: verifying and copying one input datagram with 8 commands. Flat.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tickshard::game::ViewEntity;
use tickshard::ids::{PlayerId, RoomId, ShardId};
use tickshard::shard::room::{Room, RoomOutput, Route};
use tickshard::shard::snapshot::{Scratch, ViewerHistory};
use tickshard::shard::stats::{Counters, TickStats};
use tickshard_schema::{EntityState, InputCmd, InputDatagram};

fn snapshot_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot/build");
    for n in [10u32, 50, 64] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let mut h = ViewerHistory::default();
            let mut sc = Scratch::default();
            let mut view: Vec<ViewEntity> = Vec::new();
            let mut tick = 0u32;
            b.iter(|| {
                tick += 1;
                view.clear();
                view.extend((1..=n).map(|i| ViewEntity {
                    state: EntityState::new(i, (i * 16 + tick) as u16, 100, 0, 0, 100, 0, 0, 0),
                    priority: i,
                }));
                let (bytes, _) =
                    h.build(tick, tick.saturating_sub(2), tick, &mut view, 1100, &mut sc);
                black_box(bytes.len());
            });
        });
    }
    g.finish();
}

fn room_tick(c: &mut Criterion) {
    let mut g = c.benchmark_group("room_tick");
    for players in [16u16, 50, 64] {
        g.throughput(Throughput::Elements(players as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(players),
            &players,
            |b, &players| {
                let mode = Rc::new(tickshard::builtin_modes(64, 30).remove(0));
                let start = Instant::now();
                let mut room = Room::new(RoomId::new(ShardId(0), 1), mode, 7, 1100, start);
                for p in 0..players as u64 {
                    room.join(
                        PlayerId(p + 1),
                        Route::Local(tickshard::ConnKey {
                            slot: p as usize,
                            generation: 1,
                        }),
                    )
                    .unwrap();
                }
                let mut stats = TickStats::default();
                let mut counters = Counters::default();
                let mut now = start;
                let mut seq = 0u32;
                let clock = || start;
                b.iter(|| {
                    seq += 1;
                    for p in 0..players as u64 {
                        let mut d = InputDatagram {
                            seq,
                            client_tick: seq,
                            ack_snapshot: seq.saturating_sub(3),
                            len: 1,
                            ..Default::default()
                        };
                        d.cmds[0] =
                            InputCmd::new(seq, ((p * 37 + seq as u64) % 255) as i8, 60, 0, 0, 0);
                        room.handle_input(PlayerId(p + 1), &d, &mut counters);
                    }
                    now += Duration::from_secs(1) / 30;
                    let mut bytes = 0usize;
                    room.tick(now, &clock, &mut stats, &mut counters, &mut |o| {
                        if let RoomOutput::Snapshot { bytes: b, .. } = o {
                            bytes += b.len();
                        }
                    });
                    black_box(bytes);
                });
            },
        );
    }
    g.finish();
}

fn input_decode(c: &mut Criterion) {
    let mut d = InputDatagram {
        seq: 100,
        client_tick: 100,
        ack_snapshot: 97,
        len: 8,
        ..Default::default()
    };
    for i in 0..8 {
        d.cmds[i] = InputCmd::new(100 - i as u32, 3, 4, 1, 0, 77);
    }
    let bytes = d.encode().bytes().to_vec();
    c.bench_function("input/decode", |b| {
        b.iter(|| black_box(InputDatagram::decode(black_box(&bytes)).unwrap()))
    });
}

#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, snapshot_build, room_tick, input_decode);
}
criterion_main!(group::benches);
