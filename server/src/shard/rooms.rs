//! The rooms a shard hosts: created with ids of this shard and a tick phase of their own,
//! found by id, listed for status and the directory, removed when they end.
//!
//! Rooms tick in their place in [`Rooms::at_mut`]'s order; removal swaps the last room into
//! the gap, so positions change only when a room ends.

use crate::game::ModeSpec;
use crate::ids::{RoomId, ShardId, Tick};
use crate::shard::mesh::RoomSummary;
use crate::shard::room::Room;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Offsets into the tick period a new room's schedule is chosen from (see
/// [`Rooms::create`]): at 30 Hz, about half a millisecond apart.
pub const PHASE_CANDIDATES: u32 = 64;

/// A room as seen in a status listing.
#[derive(Debug, Clone)]
pub struct RoomInfo {
    /// The room.
    pub id: RoomId,
    /// Its mode.
    pub mode: String,
    /// Seats taken.
    pub players: usize,
    /// Capacity.
    pub capacity: u16,
    /// Last tick run.
    pub tick: Tick,
    /// Age.
    pub age: Duration,
}

/// The rooms of one shard. See the module documentation.
pub struct Rooms {
    shard: ShardId,
    list: Vec<Room>,
    index: HashMap<RoomId, usize>,
    next: u64,
}

impl Rooms {
    /// No rooms yet on `shard`.
    pub fn new(shard: ShardId) -> Self {
        Rooms {
            shard,
            list: Vec::new(),
            index: HashMap::new(),
            next: 1,
        }
    }

    /// The room `id`, if it is here.
    pub fn get(&self, id: RoomId) -> Option<&Room> {
        self.index.get(&id).map(|&i| &self.list[i])
    }
    /// The room `id`, if it is here.
    pub fn get_mut(&mut self, id: RoomId) -> Option<&mut Room> {
        self.index.get(&id).map(|&i| &mut self.list[i])
    }
    /// The room at position `i` (below [`Rooms::len`]).
    pub fn at_mut(&mut self, i: usize) -> &mut Room {
        &mut self.list[i]
    }
    /// Every room.
    pub fn iter(&self) -> std::slice::Iter<'_, Room> {
        self.list.iter()
    }
    /// How many rooms there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }
    /// No rooms.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Creates a room of `spec` and returns its id. Its ticks fall where the other rooms'
    /// ticks are farthest away (see [`Rooms::free_phase`]).
    pub fn create(
        &mut self,
        spec: Rc<ModeSpec>,
        seed: u64,
        max_datagram: usize,
        now: Instant,
    ) -> RoomId {
        let id = RoomId::new(self.shard, self.next);
        self.next += 1;
        let mut room = Room::new(id, spec, seed, max_datagram, now);
        room.offset_schedule(self.free_phase(room.period(), now));
        self.index.insert(id, self.list.len());
        self.list.push(room);
        id
    }

    /// Where in the tick period a new room ticking every `period` should tick: of
    /// [`PHASE_CANDIDATES`] offsets spread over the period, the one farthest from the ticks of
    /// the rooms already here (ties: the earliest). Rooms created together (a burst of quick
    /// matches) would otherwise tick at the same instant, and the last of them would start
    /// late by the sum of the others' ticks.
    fn free_phase(&self, period: Duration, now: Instant) -> Duration {
        let p = period.as_nanos().max(1);
        // Each room's next tick as an offset into the period from `now`.
        let phases: Vec<u128> = self
            .list
            .iter()
            .filter(|r| r.period() == period)
            .map(|r| {
                let due = r.next_due();
                if due >= now {
                    (due - now).as_nanos() % p
                } else {
                    (p - (now - due).as_nanos() % p) % p
                }
            })
            .collect();
        if phases.is_empty() {
            return Duration::ZERO;
        }
        let n = PHASE_CANDIDATES as u128;
        let best = (0..n)
            .map(|k| {
                let o = k * p / n;
                let gap = phases
                    .iter()
                    .map(|&ph| {
                        let d = o.abs_diff(ph);
                        d.min(p - d)
                    })
                    .min()
                    .unwrap_or(p);
                (gap, std::cmp::Reverse(k))
            })
            .max()
            .map_or(0, |(_, std::cmp::Reverse(k))| k);
        Duration::from_nanos((best * p / n) as u64)
    }

    /// Takes room `id` out of the table.
    pub fn remove(&mut self, id: RoomId) -> Option<Room> {
        let i = self.index.remove(&id)?;
        let room = self.list.swap_remove(i);
        if let Some(moved) = self.list.get(i) {
            self.index.insert(moved.id(), i);
        }
        Some(room)
    }

    /// The earliest tick due in any room.
    #[inline]
    pub fn next_due(&self) -> Option<Instant> {
        self.list.iter().map(Room::next_due).min()
    }
    /// The highest tick number run in any room (0 with none).
    pub fn latest_tick(&self) -> u32 {
        self.list
            .iter()
            .map(|r| r.tick_number().0)
            .max()
            .unwrap_or(0)
    }
    /// A room of `mode` with a free seat.
    pub fn with_free_seat(&self, mode: &str) -> Option<RoomId> {
        self.list
            .iter()
            .find(|r| r.mode().name == mode && r.free_seats() > 0)
            .map(Room::id)
    }
    /// A room that has been empty for at least `grace`.
    pub fn empty_for(&self, grace: Duration, now: Instant) -> Option<RoomId> {
        self.list
            .iter()
            .find(|r| {
                r.empty_since()
                    .is_some_and(|t| now.saturating_duration_since(t) >= grace)
            })
            .map(Room::id)
    }
    /// Rooms with a free seat, for the directory other shards match into.
    pub fn summaries(&self) -> Vec<RoomSummary> {
        self.list
            .iter()
            .filter(|r| r.free_seats() > 0)
            .map(|r| RoomSummary {
                room: r.id(),
                mode: r.mode().name.clone(),
                free: r.free_seats() as u16,
            })
            .collect()
    }
    /// Every room, for a status listing.
    pub fn infos(&self, now: Instant) -> Vec<RoomInfo> {
        self.list
            .iter()
            .map(|r| RoomInfo {
                id: r.id(),
                mode: r.mode().name.clone(),
                players: r.players(),
                capacity: r.mode().capacity,
                tick: r.tick_number(),
                age: now.saturating_duration_since(r.created()),
            })
            .collect()
    }
    /// Bytes held for snapshot deltas across all rooms.
    pub fn history_bytes(&self) -> usize {
        self.list.iter().map(Room::history_bytes).sum()
    }
}
