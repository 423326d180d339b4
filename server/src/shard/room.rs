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
//!
//! # Game code that panics
//! Every call into the game (`join`, `leave`, `apply_input`, `step`, `view`, the results)
//! runs under `catch_unwind`. A panic marks the room crashed ([`Room::crashed`], with the
//! panic's message): it neither ticks nor seats anyone again, and the shard ends it at its next
//! tick pass (its players get `Left` with reason RoomCrashed, its result is recorded as
//! crashed). The other rooms of the shard never notice. `catch_unwind` costs nothing until a
//! panic unwinds; the game's state after a panic is never looked at again, except for one
//! guarded attempt at its final result.

use crate::game::{Game, GameEvent, GameSetup, ModeSpec, PlayerInput, PlayerResult, ViewEntity};
use crate::ids::{ConnKey, EntityId, PlayerId, RoomId, ShardId, Tick};
use crate::shard::snapshot::{Scratch, ViewerHistory};
use crate::shard::stats::{record, Counters, Phase, TickStats};
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
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
    /// The game panicked (now or before): the room is ending.
    #[error("the room's game crashed")]
    Crashed,
}

/// Runs `f` on `game` unless `crashed` says it crashed before; a panic is recorded in
/// `crashed` (the call and the message) and gives `None`.
fn guard<T>(
    crashed: &mut Option<String>,
    game: &mut dyn Game,
    call: &str,
    f: impl FnOnce(&mut dyn Game) -> T,
) -> Option<T> {
    if crashed.is_some() {
        return None;
    }
    match catch_unwind(AssertUnwindSafe(|| f(game))) {
        Ok(value) => Some(value),
        Err(payload) => {
            *crashed = Some(format!("{call}: {}", panic_message(&*payload)));
            None
        }
    }
}

/// The text of a panic's payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_owned()
    }
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
    /// The game panicked: which call, and its message.
    crashed: Option<String>,
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
            crashed: None,
        }
    }

    /// Why the room's game crashed (the call that panicked and its message), if it did.
    pub fn crashed(&self) -> Option<&str> {
        self.crashed.as_deref()
    }

    /// Runs `f` on the game unless it crashed before; a panic marks the room crashed and
    /// gives `None`.
    fn guarded<T>(&mut self, call: &str, f: impl FnOnce(&mut dyn Game) -> T) -> Option<T> {
        guard(&mut self.crashed, &mut *self.game, call, f)
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
    /// The game's current standings (none once it crashed).
    pub fn results(&mut self) -> Vec<PlayerResult> {
        self.guarded("results", |g| g.results()).unwrap_or_default()
    }
    /// The game's final result (see [`Game::final_result`]). For a crashed game, one guarded
    /// attempt: what it can still tell, or nothing.
    pub fn final_result(&mut self) -> Vec<crate::game::Standing> {
        let game = &*self.game;
        catch_unwind(AssertUnwindSafe(|| game.final_result())).unwrap_or_default()
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
        let entity = self
            .guarded("join", |g| g.join(player))
            .ok_or(JoinError::Crashed)?
            .map_err(|_| JoinError::Full)?;
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
        self.guarded("leave", |g| g.leave(player));
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
        if now < due || self.crashed.is_some() {
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

        // (2) apply, the whole phase under one guard
        let seats = &mut self.seats;
        let applied = guard(&mut self.crashed, &mut *self.game, "apply_input", |game| {
            let mut applied = 0u64;
            for seat in seats.iter_mut() {
                while seat.budget > 0 {
                    let Some(input) = seat.queue.pop_front() else {
                        break;
                    };
                    seat.budget -= 1;
                    seat.last_applied = input.seq;
                    game.apply_input(seat.player, &input);
                    applied += 1;
                }
            }
            applied
        });
        counters.inputs_applied += applied.unwrap_or(0);
        let t2 = clock();
        record(&mut stats.phase_us[Phase::Apply as usize], t2 - t1);

        // (3) simulate
        self.events.clear();
        let (tick, events) = (self.tick, &mut self.events);
        guard(&mut self.crashed, &mut *self.game, "step", |game| {
            game.step(tick, events)
        });
        let t3 = clock();
        record(&mut stats.phase_us[Phase::Simulate as usize], t3 - t2);
        if self.crashed.is_some() {
            // Nothing of this tick goes out: the shard ends the room.
            return true;
        }

        // (4) snapshot, and (5) flush each one as it is built: the scratch's writer buffer is reused.
        let mut flush = Duration::ZERO;
        for seat in &mut self.seats {
            self.view.clear();
            let (game, view) = (&*self.game, &mut self.view);
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| game.view(seat.player, view))) {
                self.crashed = Some(format!("view: {}", panic_message(&*payload)));
                return true;
            }
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

    /// A game whose calls panic on demand.
    struct Faulty {
        panic_in: &'static str,
    }

    impl Game for Faulty {
        fn join(&mut self, player: PlayerId) -> Result<EntityId, crate::game::JoinRefused> {
            assert!(self.panic_in != "join", "join fails");
            Ok(EntityId(player.0 as u32))
        }
        fn leave(&mut self, _: PlayerId) {
            assert!(self.panic_in != "leave", "leave fails");
        }
        fn apply_input(&mut self, _: PlayerId, _: &PlayerInput) {
            assert!(self.panic_in != "apply_input", "apply_input fails");
        }
        fn step(&mut self, _: Tick, _: &mut Vec<GameEvent>) {
            assert!(self.panic_in != "step", "step fails");
        }
        fn view(&self, _: PlayerId, _: &mut Vec<ViewEntity>) {
            assert!(self.panic_in != "view", "view fails");
        }
        fn results(&self) -> Vec<PlayerResult> {
            assert!(self.panic_in != "results", "results fails");
            Vec::new()
        }
        fn final_result(&self) -> Vec<crate::game::Standing> {
            panic!("final_result fails too");
        }
    }

    /// A panic in any game call marks the room crashed with the call's name and message; the
    /// room then neither ticks, sends, nor seats anyone, and its final result is empty
    /// rather than a second panic.
    #[test]
    fn a_panic_in_any_game_call_marks_the_room_crashed() {
        for call in ["join", "leave", "apply_input", "step", "view", "results"] {
            let start = Instant::now();
            let mut r = room(start);
            r.game = Box::new(Faulty { panic_in: "" });
            let (p, q) = (PlayerId(1), PlayerId(2));
            r.join(p, Route::Remote(ShardId(1))).unwrap();
            r.join(q, Route::Remote(ShardId(1))).unwrap();
            r.game = Box::new(Faulty { panic_in: call });
            let mut counters = Counters::default();
            let mut input = InputDatagram {
                len: 1,
                seq: 1,
                ..Default::default()
            };
            input.cmds[0] = tickshard_schema::InputCmd::new(1, 1, 0, 0, 0, 0);
            r.handle_input(p, &input, &mut counters);
            let mut stats = TickStats::default();
            let mut sent = 0;
            let mut now = start;
            match call {
                "join" => assert_eq!(
                    r.join(PlayerId(3), Route::Remote(ShardId(1))),
                    Err(JoinError::Crashed)
                ),
                "leave" => assert!(r.leave(q, now)),
                "results" => assert!(r.results().is_empty()),
                _ => {
                    now += r.period();
                    assert!(r.tick(now, &|| now, &mut stats, &mut counters, &mut |_| sent += 1));
                }
            }
            let why = r
                .crashed()
                .unwrap_or_else(|| panic!("{call}: not marked crashed"));
            assert!(
                why.starts_with(call) && why.ends_with("fails"),
                "{call}: {why}"
            );
            assert_eq!(sent, 0, "{call}: nothing of the crashed tick goes out");
            now += r.period() * 2;
            assert!(!r.tick(now, &|| now, &mut stats, &mut counters, &mut |_| sent += 1));
            assert_eq!(sent, 0);
            assert_eq!(
                r.join(PlayerId(4), Route::Remote(ShardId(1))),
                Err(JoinError::Crashed)
            );
            assert!(r.final_result().is_empty());
        }
    }
}
