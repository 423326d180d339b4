//! A room: one running game, its seats, and its tick pipeline.
//!
//! A room is owned by exactly one shard. Its seats may belong to players whose connections
//! live on other shards ([`Route::Remote`]); the room does not care, it hands every output to
//! the shard with the route attached.
//!
//! # The tick
//! Tick `n` is due at `start + n * period` (fixed rate, not fixed delay). [`Room::tick`] runs
//! the numbered pipeline, each phase timed:
//!
//! 1. **ingest**: refill each seat's input budget, measure its queue;
//! 2. **apply**: apply queued commands in sequence order, within the budget;
//! 3. **simulate**: one game step;
//! 4. **snapshot**: one area-of-interest, delta-encoded snapshot per seat;
//! 5. **flush**: hand snapshots and events to the shard (QUIC datagrams or the mesh).
//!
//! **Overrun policy: skip.** A tick that starts a full period or more after its deadline runs
//! once, and the deadlines it missed are skipped (counted as overruns); the next deadline is the
//! first one still in the future. Catching up would run several steps back to back and send
//! bursts of stale snapshots; stretching would let the schedule drift. Skipping keeps game time
//! equal to steps taken and snapshots evenly spaced.
//!
//! # Inputs
//! Each seat keeps the commands received but not yet applied, oldest first, at most
//! [`INPUT_QUEUE`]. Commands at or below the newest one received are duplicates (redundancy)
//! and are ignored. Each tick grants one command of budget, up to [`INPUT_BURST`] saved up, so
//! commands recovered from redundancy after a loss still apply promptly, while a client that
//! sends more than one command per tick only fills its own queue, whose excess is dropped and
//! counted. The game therefore never sees more than the tick rate's worth of movement.

use crate::game::{Game, GameEvent, GameSetup, ModeSpec, PlayerInput, PlayerResult, ViewEntity};
use crate::ids::{ConnKey, EntityId, PlayerId, RoomId, ShardId, Tick};
use crate::shard::snapshot::{Scratch, ViewerHistory};
use crate::shard::stats::{record, Counters, Phase, TickStats};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tickshard_schema::InputDatagram;

/// Most commands a seat keeps queued. Eight ticks of redundancy recovery plus eight of jitter.
pub const INPUT_QUEUE: usize = 16;
/// Most commands one seat may apply in one tick (saved-up budget after loss or jitter).
pub const INPUT_BURST: u32 = 4;

/// Where a seat's player is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// On this shard: the player's connection, checked on every use (a key whose connection
    /// has gone reaches nobody).
    Local(ConnKey),
    /// On another shard; outputs go through the mesh.
    Remote(ShardId),
}

/// Something a room tick produced for one player.
pub enum RoomOutput<'a> {
    /// A snapshot datagram.
    Snapshot {
        /// Where the player is.
        route: Route,
        /// The player.
        player: PlayerId,
        /// The encoded datagram.
        bytes: &'a [u8],
    },
    /// A game event for the control stream.
    Event {
        /// Where the player is.
        route: Route,
        /// The player.
        player: PlayerId,
        /// The tick it happened in.
        tick: Tick,
        /// The event.
        event: GameEvent,
    },
}

/// Why a seat was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// Every seat is taken.
    #[error("room is full")]
    Full,
    /// The player already holds a seat here.
    #[error("already in this room")]
    AlreadyIn,
}

struct Seat {
    player: PlayerId,
    route: Route,
    queue: VecDeque<PlayerInput>,
    last_received: u32,
    last_applied: u32,
    budget: u32,
    ack: u32,
    history: ViewerHistory,
}

/// One running game.
pub struct Room {
    id: RoomId,
    mode: Rc<ModeSpec>,
    game: Box<dyn Game>,
    tick: Tick,
    start: Instant,
    period: Duration,
    deadline_index: u64,
    created: Instant,
    seats: Vec<Seat>,
    index: HashMap<PlayerId, usize>,
    empty_since: Option<Instant>,
    events: Vec<GameEvent>,
    view: Vec<ViewEntity>,
    /// Working buffers of snapshot builds (and the datagram writer), shared by the seats.
    scratch: Scratch,
    max_datagram: usize,
}

impl Room {
    /// A new room of `mode`, whose first tick is due one period after `now`.
    pub fn new(
        id: RoomId,
        mode: Rc<ModeSpec>,
        seed: u64,
        max_datagram: usize,
        now: Instant,
    ) -> Self {
        let period = Duration::from_secs(1) / mode.tick_rate.max(1) as u32;
        let game = (mode.factory)(GameSetup {
            seed,
            tick_rate: mode.tick_rate,
            capacity: mode.capacity,
        });
        Room {
            id,
            game,
            tick: Tick(0),
            start: now,
            period,
            deadline_index: 1,
            created: now,
            seats: Vec::with_capacity(mode.capacity as usize),
            index: HashMap::with_capacity(mode.capacity as usize),
            empty_since: Some(now),
            events: Vec::new(),
            view: Vec::with_capacity(64),
            scratch: Scratch::default(),
            max_datagram,
            mode,
        }
    }

    /// The room's id.
    pub fn id(&self) -> RoomId {
        self.id
    }
    /// The room's game mode.
    pub fn mode(&self) -> &ModeSpec {
        &self.mode
    }
    /// The last tick run.
    pub fn tick_number(&self) -> Tick {
        self.tick
    }
    /// When the room was created.
    pub fn created(&self) -> Instant {
        self.created
    }
    /// Seats taken.
    pub fn players(&self) -> usize {
        self.seats.len()
    }
    /// Seats free.
    pub fn free_seats(&self) -> usize {
        (self.mode.capacity as usize).saturating_sub(self.seats.len())
    }
    /// Since when the room has had no players.
    pub fn empty_since(&self) -> Option<Instant> {
        self.empty_since
    }
    /// The tick period.
    pub fn period(&self) -> Duration {
        self.period
    }
    /// Shifts the room's schedule by `offset` (at most a period) before its first tick, so that
    /// rooms created close together do not all tick at once: tick *n* falls due at `created +
    /// offset + n * period`. Ignored once the room has ticked.
    pub fn offset_schedule(&mut self, offset: Duration) {
        if self.tick == Tick(0) && self.deadline_index == 1 {
            self.start = self.created + offset.min(self.period);
        }
    }
    /// When the next tick is due.
    pub fn next_due(&self) -> Instant {
        self.start + self.period * self.deadline_index as u32
    }
    /// The players and where they are.
    pub fn members(&self) -> impl Iterator<Item = (PlayerId, Route)> + '_ {
        self.seats.iter().map(|s| (s.player, s.route))
    }
    /// The game's current standings.
    pub fn results(&self) -> Vec<PlayerResult> {
        self.game.results()
    }
    /// The game's final result (see [`Game::final_result`]).
    pub fn final_result(&self) -> Vec<crate::game::Standing> {
        self.game.final_result()
    }
    /// Bytes held by the seats' snapshot histories.
    pub fn history_bytes(&self) -> usize {
        self.seats.iter().map(|s| s.history.held_bytes()).sum()
    }
    /// The last input applied for `player`.
    pub fn last_applied(&self, player: PlayerId) -> Option<u32> {
        self.index.get(&player).map(|&i| self.seats[i].last_applied)
    }

    /// Seats `player`, reached by `route`. Returns the player's entity.
    pub fn join(&mut self, player: PlayerId, route: Route) -> Result<EntityId, JoinError> {
        if self.index.contains_key(&player) {
            return Err(JoinError::AlreadyIn);
        }
        if self.free_seats() == 0 {
            return Err(JoinError::Full);
        }
        let entity = self.game.join(player).map_err(|_| JoinError::Full)?;
        self.index.insert(player, self.seats.len());
        self.seats.push(Seat {
            player,
            route,
            queue: VecDeque::with_capacity(INPUT_QUEUE),
            last_received: 0,
            last_applied: 0,
            budget: 1,
            ack: 0,
            history: ViewerHistory::default(),
        });
        self.empty_since = None;
        Ok(entity)
    }

    /// Frees `player`'s seat. Returns false if the player had none.
    pub fn leave(&mut self, player: PlayerId, now: Instant) -> bool {
        let Some(i) = self.index.remove(&player) else {
            return false;
        };
        self.game.leave(player);
        self.seats.swap_remove(i);
        if let Some(moved) = self.seats.get(i) {
            self.index.insert(moved.player, i);
        }
        if self.seats.is_empty() {
            self.empty_since = Some(now);
        }
        true
    }

    /// Queues the commands of one input datagram from `player`. Returns false if the player
    /// has no seat here.
    pub fn handle_input(
        &mut self,
        player: PlayerId,
        input: &InputDatagram,
        counters: &mut Counters,
    ) -> bool {
        let Some(&i) = self.index.get(&player) else {
            return false;
        };
        let seat = &mut self.seats[i];
        // The client acknowledges the newest snapshot it holds; never trust one from the future.
        if input.ack_snapshot > seat.ack && input.ack_snapshot <= self.tick.0 {
            seat.ack = input.ack_snapshot;
        }
        // Commands come newest first; queue the new ones oldest first.
        for cmd in input.cmds().iter().rev() {
            if cmd.seq() <= seat.last_received {
                counters.inputs_stale += 1;
                continue;
            }
            seat.last_received = cmd.seq();
            if seat.queue.len() == INPUT_QUEUE {
                seat.queue.pop_front();
                counters.inputs_dropped += 1;
            }
            counters.inputs_received += 1;
            seat.queue.push_back(PlayerInput {
                seq: cmd.seq(),
                move_x: cmd.move_x(),
                move_y: cmd.move_y(),
                buttons: cmd.buttons(),
                aim: cmd.aim(),
            });
        }
        true
    }

    /// Runs one tick if it is due at `now`; returns whether it ran. `clock` reads the time for
    /// phase durations only (the harness passes its virtual clock).
    pub fn tick(
        &mut self,
        now: Instant,
        clock: &dyn Fn() -> Instant,
        stats: &mut TickStats,
        counters: &mut Counters,
        out: &mut dyn FnMut(RoomOutput<'_>),
    ) -> bool {
        let due = self.next_due();
        if now < due {
            return false;
        }
        let late = now - due;
        record(&mut stats.lateness_us, late);
        // Overrun policy: skip missed deadlines (see the module docs).
        let missed = (late.as_nanos() / self.period.as_nanos()) as u64;
        stats.overruns += missed;
        self.deadline_index += 1 + missed;
        self.tick = self.tick.next();
        stats.ticks += 1;
        let t0 = clock();

        // (1) ingest
        for seat in &mut self.seats {
            seat.budget = (seat.budget + 1).min(INPUT_BURST);
            stats
                .input_queue_depth
                .saturating_record(seat.queue.len() as u64);
        }
        let t1 = clock();
        record(&mut stats.phase_us[Phase::Ingest as usize], t1 - t0);

        // (2) apply
        for seat in &mut self.seats {
            while seat.budget > 0 {
                let Some(input) = seat.queue.pop_front() else {
                    break;
                };
                seat.budget -= 1;
                seat.last_applied = input.seq;
                self.game.apply_input(seat.player, &input);
                counters.inputs_applied += 1;
            }
        }
        let t2 = clock();
        record(&mut stats.phase_us[Phase::Apply as usize], t2 - t1);

        // (3) simulate
        self.events.clear();
        self.game.step(self.tick, &mut self.events);
        let t3 = clock();
        record(&mut stats.phase_us[Phase::Simulate as usize], t3 - t2);

        // (4) snapshot, and (5) flush each one as it is built: the scratch's writer buffer is reused.
        let mut flush = Duration::ZERO;
        for seat in &mut self.seats {
            self.view.clear();
            self.game.view(seat.player, &mut self.view);
            let (bytes, built) = seat.history.build(
                self.tick.0,
                seat.ack,
                seat.last_applied,
                &mut self.view,
                self.max_datagram,
                &mut self.scratch,
            );
            counters.snapshots += 1;
            counters.snapshot_bytes += bytes.len() as u64;
            counters.snapshot_deferred += built.deferred as u64;
            let f0 = clock();
            out(RoomOutput::Snapshot {
                route: seat.route,
                player: seat.player,
                bytes,
            });
            flush += clock() - f0;
        }
        let t4 = clock();
        for event in &self.events {
            for seat in &self.seats {
                out(RoomOutput::Event {
                    route: seat.route,
                    player: seat.player,
                    tick: self.tick,
                    event: *event,
                });
            }
        }
        let t5 = clock();
        flush += t5 - t4;
        record(
            &mut stats.phase_us[Phase::Snapshot as usize],
            (t4 - t3).saturating_sub(flush),
        );
        record(&mut stats.phase_us[Phase::Flush as usize], flush);
        record(&mut stats.duration_us, t5 - t0);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(now: Instant) -> Room {
        let mode = Rc::new(crate::builtin_modes(4, 30).remove(0));
        Room::new(RoomId::new(ShardId(0), 1), mode, 1, 1100, now)
    }

    fn run(r: &mut Room, now: Instant, stats: &mut TickStats) -> bool {
        let mut counters = Counters::default();
        r.tick(now, &|| now, stats, &mut counters, &mut |_| {})
    }

    #[test]
    fn deadlines_are_fixed_rate_and_overruns_skip() {
        let start = Instant::now();
        let period = Duration::from_secs(1) / 30;
        let mut r = room(start);
        let mut stats = TickStats::default();
        assert!(
            !run(&mut r, start + period / 2, &mut stats),
            "not due before its deadline"
        );
        // On time, a little late each tick: deadlines stay at start + n * period (no drift).
        for n in 1..=3u32 {
            assert!(run(
                &mut r,
                start + period * n + Duration::from_millis(2),
                &mut stats
            ));
            assert_eq!(r.next_due(), start + period * (n + 1));
        }
        assert_eq!(stats.overruns, 0);
        // 3.5 periods late: one step, three deadlines skipped and counted, next one in the future.
        let late = start + period * 7 + period / 2;
        assert!(run(&mut r, late, &mut stats));
        assert_eq!(
            r.tick_number(),
            Tick(4),
            "one step, not a burst of catch-up steps"
        );
        assert_eq!(stats.overruns, 3);
        assert_eq!(r.next_due(), start + period * 8);
        assert!(!run(&mut r, late, &mut stats), "nothing more due now");
    }

    #[test]
    fn input_budget_applies_at_most_a_burst_and_drops_overflow() {
        let start = Instant::now();
        let mut r = room(start);
        let p = PlayerId(1);
        r.join(
            p,
            Route::Local(ConnKey {
                slot: 0,
                generation: 1,
            }),
        )
        .unwrap();
        let mut counters = Counters::default();
        // 24 fresh commands at once (three datagrams of eight), then the same again (stale).
        for d in 0..3u32 {
            let mut input = InputDatagram {
                len: 8,
                ..Default::default()
            };
            for i in 0..8u32 {
                let seq = d * 8 + 8 - i;
                input.cmds[i as usize] = tickshard_schema::InputCmd::new(seq, 1, 0, 0, 0, 0);
            }
            input.seq = input.cmds[0].seq();
            r.handle_input(p, &input, &mut counters);
            r.handle_input(p, &input, &mut counters);
        }
        assert_eq!(counters.inputs_stale, 24, "duplicates ignored");
        assert_eq!(
            counters.inputs_dropped,
            24 - INPUT_QUEUE as u64,
            "overflow dropped"
        );
        let mut stats = TickStats::default();
        let period = Duration::from_secs(1) / 30;
        let mut n = 0u32;
        let mut tick = |r: &mut Room, counters: &mut Counters| {
            n += 1;
            r.tick(
                start + period * n,
                &|| start,
                &mut stats,
                counters,
                &mut |_| {},
            );
            counters.inputs_applied
        };
        // A flooded queue drains at one command per tick (the first tick had one saved).
        let applied: Vec<u64> = (0..6).map(|_| tick(&mut r, &mut counters)).collect();
        assert_eq!(applied, vec![2, 3, 4, 5, 6, 7]);
        while counters.inputs_applied < INPUT_QUEUE as u64 {
            tick(&mut r, &mut counters);
        }
        assert_eq!(r.last_applied(p), Some(24));
        // Idle ticks save up budget, at most INPUT_BURST: commands recovered after a loss apply
        // promptly, but never more than four in one tick.
        for _ in 0..6 {
            tick(&mut r, &mut counters);
        }
        let mut input = InputDatagram {
            len: 8,
            ..Default::default()
        };
        for i in 0..8u32 {
            input.cmds[i as usize] = tickshard_schema::InputCmd::new(32 - i, 1, 0, 0, 0, 0);
        }
        input.seq = 32;
        r.handle_input(p, &input, &mut counters);
        let before = counters.inputs_applied;
        assert_eq!(tick(&mut r, &mut counters) - before, INPUT_BURST as u64);
        assert_eq!(r.last_applied(p), Some(28));
    }
}
