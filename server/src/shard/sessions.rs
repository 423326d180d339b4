//! The shard's table of sessions: slots by quinn's connection handle, generations that make a
//! stale [`ConnKey`] reach nobody, the welcomed players, each connection's timer, and the
//! connections with something to send.
//!
//! Everything outside this table names a connection by [`ConnKey`] (slot and generation), and
//! every lookup by key checks the generation: a room's route to a player who left cannot reach
//! the next connection that reuses the slot.

use crate::ids::{ConnKey, PlayerId};
use crate::shard::session::Session;
use crate::shard::stats::QuicStats;
use crate::shard::timers::Timers;
use bytes::Bytes;
use quinn_proto::Transmit;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The shard's sessions. See the module documentation.
#[derive(Default)]
pub struct Sessions {
    /// Sessions by quinn's handle. Boxed: a `Session` is over 6 KB (quinn's `Connection`), and
    /// a slab of them inline would reserve up to twice the live connections' memory as it grows.
    slots: Vec<Option<Box<Session>>>,
    /// Sessions held: the shard compares it with its limit at every new connection, so it is
    /// counted rather than found by walking the slots.
    live: usize,
    next_generation: u64,
    /// Welcomed players and their connections.
    players: HashMap<PlayerId, ConnKey>,
    /// Each connection's next quinn timeout, by slot.
    timers: Timers,
    /// Slots to ask for transmits (each at most once: [`Session::dirty`]).
    dirty: Vec<usize>,
    /// quinn's statistics of the connections already retired.
    retired: QuicStats,
    /// Sessions held per source IP address (for the per-address cap).
    per_address: HashMap<std::net::IpAddr, usize>,
}

impl Sessions {
    /// Puts a new session of `player` on `conn` in `slot` (quinn's connection handle, which
    /// quinn gives out only when the slot is free).
    pub fn insert(
        &mut self,
        slot: usize,
        conn: quinn_proto::Connection,
        player: PlayerId,
        now: Instant,
        hello_timeout: Duration,
    ) -> ConnKey {
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        debug_assert!(self.slots[slot].is_none(), "quinn reused a slot still held");
        self.live += 1;
        let session = Session::new(generation, conn, player, now, hello_timeout);
        *self.per_address.entry(session.admitted_from()).or_insert(0) += 1;
        self.slots[slot] = Some(Box::new(session));
        ConnKey { slot, generation }
    }

    /// The session in `slot`.
    pub fn get(&self, slot: usize) -> Option<&Session> {
        self.slots.get(slot)?.as_deref()
    }
    /// The session in `slot`.
    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Session> {
        self.slots.get_mut(slot)?.as_deref_mut()
    }
    /// The key of the session in `slot`, if there is one.
    pub fn key(&self, slot: usize) -> Option<ConnKey> {
        let generation = self.get(slot)?.generation;
        Some(ConnKey { slot, generation })
    }
    /// The slot of the connection `key` names, if that connection is still there.
    pub fn live(&self, key: ConnKey) -> Option<usize> {
        match self.get(key.slot) {
            Some(s) if s.generation == key.generation => Some(key.slot),
            _ => None,
        }
    }
    /// The session `key` names, if it is still there.
    pub fn by_key_mut(&mut self, key: ConnKey) -> Option<&mut Session> {
        self.get_mut(key.slot)
            .filter(|s| s.generation == key.generation)
    }
    /// One past the highest slot ever used: every session's slot is below it.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }
    /// Every session.
    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.slots.iter().flatten().map(|s| &**s)
    }
    /// How many sessions there are.
    pub fn len(&self) -> usize {
        self.live
    }
    /// No sessions.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    // ---- welcomed players ----

    /// Records that the session in `slot` is welcomed as its player.
    pub fn welcome(&mut self, slot: usize) {
        if let Some(s) = self.get(slot) {
            let key = ConnKey {
                slot,
                generation: s.generation,
            };
            self.players.insert(s.player, key);
        }
    }
    /// Forgets the session in `slot` as its player's connection.
    pub fn forget_player(&mut self, slot: usize) {
        let Some(s) = self.get(slot) else { return };
        let (player, key) = (s.player, self.key(slot));
        if self.players.get(&player).copied() == key {
            self.players.remove(&player);
        }
    }
    /// The key of a welcomed player's connection, if it is still open.
    pub fn of_player(&self, player: PlayerId) -> Option<ConnKey> {
        let key = *self.players.get(&player)?;
        self.live(key).map(|_| key)
    }
    /// The slot of a welcomed player's connection, if it is still open.
    pub fn slot_of(&self, player: PlayerId) -> Option<usize> {
        self.of_player(player).map(|k| k.slot)
    }
    /// Welcomed players.
    pub fn players(&self) -> usize {
        self.players.len()
    }

    // ---- timers and transmits ----

    /// A slot whose quinn timer is due at `now`, if any (call until `None`).
    pub fn pop_due(&mut self, now: Instant) -> Option<usize> {
        self.timers.pop_due(now)
    }
    /// The earliest quinn timer of any session.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }
    /// Puts the session in `slot` on the list to ask for transmits.
    pub fn mark_dirty(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot).and_then(Option::as_mut) {
            if !s.dirty {
                s.dirty = true;
                self.dirty.push(slot);
            }
        }
    }
    /// Queues a snapshot datagram for the session `key` names and puts it on the send list:
    /// `None` if that session is gone, `Some(false)` if quinn refused the datagram.
    pub fn send_snapshot(&mut self, key: ConnKey, bytes: Bytes) -> Option<bool> {
        let s = self.slots.get_mut(key.slot)?.as_mut()?;
        if s.generation != key.generation {
            return None;
        }
        let sent = s.send_snapshot(bytes);
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(key.slot);
        }
        Some(sent)
    }
    /// The next datagram of any session with something to send. `buf` receives its bytes.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        while let Some(&slot) = self.dirty.last() {
            let Some(s) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                self.dirty.pop();
                continue;
            };
            buf.clear();
            if let Some(t) = s.poll_transmit(now, buf) {
                return Some(t);
            }
            s.dirty = false;
            self.dirty.pop();
            self.after_io(slot);
        }
        None
    }
    /// Re-arms the session's timer, and retires it once quinn has drained it.
    pub fn after_io(&mut self, slot: usize) {
        let Some(s) = self.get_mut(slot) else { return };
        if s.is_drained() {
            self.remove(slot);
            return;
        }
        let at = s.poll_timeout();
        self.timers.set(slot, at);
    }

    /// Sessions held for source address `ip`.
    pub fn from_address(&self, ip: std::net::IpAddr) -> usize {
        self.per_address.get(&ip).copied().unwrap_or(0)
    }

    fn remove(&mut self, slot: usize) {
        self.forget_player(slot);
        if let Some(s) = self.slots[slot].take() {
            self.live -= 1;
            let ip = s.admitted_from();
            if let Some(n) = self.per_address.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_address.remove(&ip);
                }
            }
            self.timers.set(slot, None);
            self.retired.add(&s.stats());
            // The endpoint learns of the drain through the connection's endpoint events,
            // already delivered while the shard drove it.
        }
    }

    /// QUIC packet figures over every connection there has been (quinn's statistics of each
    /// live connection are read now: a few times a second, not per packet).
    pub fn quic_stats(&self) -> QuicStats {
        let mut q = self.retired;
        for s in self.iter() {
            q.add(&s.stats());
        }
        q
    }
}
