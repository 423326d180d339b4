//! Matchmaking and the room directory: where quick match seats a player.
//!
//! Quick match fills rooms before it opens new ones. A player asking for a mode gets, in this
//! order: the fullest room of that mode on their own shard that has a free seat (no message
//! between shards, and rooms fill up); else a room another shard advertised with a free seat,
//! the one with the fewest free seats; else a new room on their own shard.
//!
//! Each shard advertises its rooms with free seats to the others ([`Directory`]): at most every
//! [`DIRECTORY_INTERVAL`], and only when something changed. What a shard knows of the others is
//! therefore up to that old; a seat taken through the directory counts as taken until the
//! next advertisement, so a burst of quick matches spreads over rooms instead of racing for the
//! last seat. A join that loses the race anyway is refused by the room's shard (room full) and
//! the player's shard falls back to a room of its own.

use crate::ids::{RoomId, ShardId};
use crate::shard::mesh::RoomSummary;
use std::cmp::Reverse;
use std::time::{Duration, Instant};

/// How often a shard tells the others which of its rooms have free seats, at most.
pub const DIRECTORY_INTERVAL: Duration = Duration::from_millis(100);

/// A local room as quick match sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The room.
    pub room: RoomId,
    /// Its mode.
    pub mode: &'a str,
    /// Seats taken.
    pub players: usize,
    /// Seats free.
    pub free: usize,
}

/// Where quick match seats a player.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuickMatch {
    /// A room on this shard.
    Local(RoomId),
    /// A room another shard advertised (its seat is counted as taken).
    Remote(RoomId),
    /// No room has a free seat: open one here.
    New,
}

/// What one shard knows of the other shards' rooms, and when it last told them of its own.
#[derive(Debug)]
pub struct Directory {
    me: ShardId,
    /// Rooms with free seats advertised by each shard (own slot unused).
    remote: Vec<Vec<RoomSummary>>,
    /// Whether this shard's rooms changed since it last advertised them.
    changed: bool,
    sent: Option<Instant>,
}

impl Directory {
    /// The directory of shard `me` of `shards`.
    pub fn new(me: ShardId, shards: u16) -> Self {
        Directory {
            me,
            remote: vec![Vec::new(); shards as usize],
            changed: false,
            sent: None,
        }
    }

    /// This shard's rooms changed (opened, closed, a seat taken or freed).
    pub fn mark_changed(&mut self) {
        self.changed = true;
    }

    /// Shard `from` advertised `rooms`.
    pub fn update(&mut self, from: ShardId, rooms: Vec<RoomSummary>) {
        if from != self.me {
            if let Some(d) = self.remote.get_mut(from.0 as usize) {
                *d = rooms;
            }
        }
    }

    /// Chooses the room for a quick match of `mode` among this shard's `local` rooms and the
    /// advertised ones (see the module documentation).
    pub fn quick_match<'a>(
        &mut self,
        mode: &str,
        local: impl IntoIterator<Item = Candidate<'a>>,
    ) -> QuickMatch {
        let best_local = local
            .into_iter()
            .filter(|c| c.mode == mode && c.free > 0)
            .max_by_key(|c| (c.players, Reverse(c.room)))
            .map(|c| c.room);
        if let Some(room) = best_local {
            return QuickMatch::Local(room);
        }
        let seat = self
            .remote
            .iter_mut()
            .flatten()
            .filter(|s| s.mode == mode && s.free > 0)
            .min_by_key(|s| (s.free, s.room));
        match seat {
            Some(s) => {
                s.free -= 1;
                QuickMatch::Remote(s.room)
            }
            None => QuickMatch::New,
        }
    }

    /// Whether to advertise this shard's rooms now: they changed, there are other shards, and
    /// the last advertisement is at least [`DIRECTORY_INTERVAL`] old. When it answers yes, it
    /// counts the advertisement as sent.
    pub fn advertise_due(&mut self, now: Instant) -> bool {
        if !self.changed || self.remote.len() < 2 {
            return false;
        }
        if self
            .sent
            .is_some_and(|t| now.saturating_duration_since(t) < DIRECTORY_INTERVAL)
        {
            return false;
        }
        self.changed = false;
        self.sent = Some(now);
        true
    }

    /// The shards to advertise to: every other shard.
    pub fn peers(&self) -> impl Iterator<Item = ShardId> + '_ {
        (0..self.remote.len() as u16)
            .map(ShardId)
            .filter(move |&s| s != self.me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(room: u64, mode: &str, free: u16) -> RoomSummary {
        RoomSummary {
            room: RoomId(room),
            mode: mode.into(),
            free,
        }
    }

    fn local(room: u64, mode: &str, players: usize, free: usize) -> Candidate<'_> {
        Candidate {
            room: RoomId(room),
            mode,
            players,
            free,
        }
    }

    #[test]
    fn the_fullest_local_room_of_the_mode_comes_first() {
        let mut d = Directory::new(ShardId(0), 2);
        d.update(ShardId(1), vec![summary(100, "arena", 1)]);
        let rooms = [
            local(1, "arena", 3, 7),
            local(2, "arena", 9, 1),
            local(3, "arena", 10, 0),
            local(4, "duel", 1, 1),
        ];
        assert_eq!(d.quick_match("arena", rooms), QuickMatch::Local(RoomId(2)));
        assert_eq!(d.quick_match("duel", rooms), QuickMatch::Local(RoomId(4)));
        // Ties go to the older room.
        let tie = [local(7, "arena", 5, 5), local(6, "arena", 5, 5)];
        assert_eq!(d.quick_match("arena", tie), QuickMatch::Local(RoomId(6)));
    }

    #[test]
    fn then_the_advertised_room_with_fewest_free_seats_whose_seats_count_as_taken() {
        let mut d = Directory::new(ShardId(0), 3);
        d.update(
            ShardId(1),
            vec![summary(100, "arena", 2), summary(101, "duel", 1)],
        );
        d.update(ShardId(2), vec![summary(200, "arena", 1)]);
        let full = [local(1, "arena", 10, 0)];
        let picks: Vec<_> = (0..4).map(|_| d.quick_match("arena", full)).collect();
        assert_eq!(
            picks,
            vec![
                QuickMatch::Remote(RoomId(200)),
                QuickMatch::Remote(RoomId(100)),
                QuickMatch::Remote(RoomId(100)),
                QuickMatch::New,
            ]
        );
        assert_eq!(d.quick_match("duel", []), QuickMatch::Remote(RoomId(101)));
        assert_eq!(d.quick_match("race", []), QuickMatch::New);
        // A new advertisement replaces what was known.
        d.update(ShardId(2), vec![summary(201, "arena", 4)]);
        assert_eq!(d.quick_match("arena", []), QuickMatch::Remote(RoomId(201)));
        // What this shard hears of itself is ignored.
        let mut d = Directory::new(ShardId(0), 2);
        d.update(ShardId(0), vec![summary(5, "arena", 3)]);
        assert_eq!(d.quick_match("arena", []), QuickMatch::New);
    }

    #[test]
    fn rooms_are_advertised_when_changed_at_most_every_interval_and_only_to_others() {
        let t0 = Instant::now();
        let mut d = Directory::new(ShardId(1), 3);
        assert!(!d.advertise_due(t0), "nothing changed");
        d.mark_changed();
        assert!(d.advertise_due(t0));
        assert!(!d.advertise_due(t0), "sent, and nothing changed since");
        d.mark_changed();
        assert!(!d.advertise_due(t0 + DIRECTORY_INTERVAL - Duration::from_millis(1)));
        assert!(d.advertise_due(t0 + DIRECTORY_INTERVAL));
        assert_eq!(d.peers().collect::<Vec<_>>(), vec![ShardId(0), ShardId(2)]);
        let mut alone = Directory::new(ShardId(0), 1);
        alone.mark_changed();
        assert!(
            !alone.advertise_due(t0),
            "a single shard has nobody to tell"
        );
    }
}
