//! Per-viewer snapshots: area of interest, delta against the acknowledged baseline, priority.
//!
//! The server remembers, for each viewer, what the client holds after each snapshot since the
//! one it acknowledged (the baseline state plus what was sent, minus what was removed), at most
//! [`HISTORY`] of them. A client acknowledges the newest snapshot it received in every input;
//! the next snapshot is a delta against that one: only entities that are new or changed, and
//! the ids of entities that left the view. Acknowledgements only move forward, so a snapshot
//! older than the acknowledged one can never be a baseline again and is forgotten: a viewer
//! holds about a round trip of snapshots (2-4 on a LAN, 8-10 at 200 ms), not always 16. Without
//! a usable acknowledgement (none yet, too old, or a tick never sent) the snapshot is a full
//! one (baseline 0).
//!
//! Each entity is sent as a packed record of only the fields that changed, positions as the
//! difference from the baseline ([`tickshard_schema::changes`], PROTOCOL.md "Entity changes").
//! When the changes do not fit one datagram, entities go in priority order (the viewer's own
//! entity first, then nearest first), planned with each record's size bound; what does not fit
//! stays as the client last saw it and is sent in a later tick. Removals always go first: they
//! are one to three bytes each.
//!
//! Every buffer here is reused from tick to tick: building a snapshot does not allocate once
//! the viewer's history has warmed up. A viewer owns only the states its client may still
//! acknowledge; the working buffers of a build are a [`Scratch`] that the room shares among
//! its viewers (about 1.5 KB less per player than a set per viewer).

use crate::game::ViewEntity;
use tickshard_schema::changes::{
    count_bound, encode_changes, encode_record, encode_removals, record_bound, removal_bound,
};
use tickshard_schema::{EntityState, SnapshotWriter, ENTITY_STATE_SIZE, SNAPSHOT_OVERHEAD};

/// Most past snapshots a viewer's history keeps. At 30 Hz, 16 ticks is 533 ms: an
/// acknowledgement older than that (a round trip beyond half a second) gets a full snapshot.
pub const HISTORY: usize = 16;

#[derive(Default)]
struct Entry {
    tick: u32,
    /// What the client holds after this snapshot, sorted by entity id.
    state: Vec<EntityState>,
}

/// What one viewer's client holds, snapshot by snapshot.
#[derive(Default)]
pub struct ViewerHistory {
    /// Snapshots from the acknowledged one on, oldest first (ticks ascending).
    entries: std::collections::VecDeque<Entry>,
    /// The buffer of the last forgotten snapshot, for the next one (no allocation per tick).
    spare: Option<Vec<EntityState>>,
}

/// The working buffers of one snapshot build, shared by every viewer of a room (a build
/// leaves nothing in them that the next one reads).
#[derive(Default)]
pub struct Scratch {
    sent: Vec<EntityState>,
    removed: Vec<u32>,
    /// Changed entities of this tick: (index in the view, whether the baseline has it).
    changed: Vec<(u32, bool)>,
    /// Their records, encoded in id order.
    records: Vec<u8>,
    merged: Vec<EntityState>,
    packed: Vec<u8>,
    writer: SnapshotWriter,
}

/// Figures of one built snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltSnapshot {
    /// The baseline tick (0: full).
    pub baseline: u32,
    /// Entities sent.
    pub entities: usize,
    /// Entities that changed but did not fit.
    pub deferred: usize,
    /// Removals sent.
    pub removed: usize,
}

impl ViewerHistory {
    /// Bytes of entity state held (for memory accounting).
    pub fn held_bytes(&self) -> usize {
        (self
            .entries
            .iter()
            .map(|e| e.state.capacity())
            .sum::<usize>()
            + self.spare.as_ref().map_or(0, Vec::capacity))
            * ENTITY_STATE_SIZE
    }

    /// Forgets the oldest snapshot, keeping its buffer for the next.
    fn recycle_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.spare = Some(e.state);
        }
    }

    /// Snapshots held (for tests and accounting).
    pub fn held(&self) -> usize {
        self.entries.len()
    }

    /// Builds the snapshot of `tick` for a viewer whose client acknowledged `ack`.
    ///
    /// `view` is what the viewer can see now (any order; it is sorted here by id, and by
    /// priority only when the changes do not fit).
    /// The encoded datagram is left in `scratch`'s buffer and returned with its figures.
    pub fn build<'w>(
        &mut self,
        tick: u32,
        ack: u32,
        last_input: u32,
        view: &mut [ViewEntity],
        max_bytes: usize,
        scratch: &'w mut Scratch,
    ) -> (&'w [u8], BuiltSnapshot) {
        // A usable baseline: sent by us (still held) and strictly older than this tick.
        let base_at = if ack != 0 && ack < tick && tick - ack < HISTORY as u32 {
            self.entries.iter().position(|e| e.tick == ack)
        } else {
            None
        };
        let baseline = if base_at.is_some() { ack } else { 0 };
        // Older snapshots can never be a baseline again (acknowledgements only move forward).
        let base_at = base_at.map(|i| {
            for _ in 0..i {
                self.recycle_front();
            }
            0
        });

        // Everything below walks the view and the baseline side by side in id order: one sort,
        // no searches. Priority matters only when the changes do not all fit.
        view.sort_unstable_by_key(|v| v.state.id());
        let base_state: &[EntityState] = match base_at {
            Some(b) => &self.entries[b].state,
            None => &[],
        };

        // Removals (in the baseline, not in view) and changes (new, or not as in the baseline),
        // each change encoded at once: in id order its record is final unless the changes
        // turn out not to fit.
        scratch.removed.clear();
        scratch.changed.clear();
        scratch.records.clear();
        let mut prev = 0;
        let (mut i, mut j) = (0, 0);
        while i < view.len() || j < base_state.len() {
            let (v, b) = (view.get(i), base_state.get(j));
            let base = match (v, b) {
                (Some(v), Some(b)) if v.state.id() == b.id() => {
                    i += 1;
                    j += 1;
                    if v.state == *b {
                        continue;
                    }
                    Some(b)
                }
                (Some(v), b) if b.is_none_or(|b| v.state.id() < b.id()) => {
                    i += 1;
                    None
                }
                (_, Some(b)) => {
                    scratch.removed.push(b.id());
                    j += 1;
                    continue;
                }
                (_, None) => break,
            };
            let e = &view[i - 1].state;
            encode_record(prev, base, e, &mut scratch.records);
            prev = e.id();
            scratch.changed.push(((i - 1) as u32, base.is_some()));
        }

        let cap = max_bytes.saturating_sub(SNAPSHOT_OVERHEAD);
        let removal_bytes = count_bound(scratch.removed.len())
            + scratch
                .removed
                .iter()
                .map(|&id| removal_bound(id))
                .sum::<usize>();
        let mut deferred = 0;
        scratch.packed.clear();
        if removal_bytes + scratch.records.len() <= cap {
            // Everything fits (the usual case): removals, then the records as encoded.
            encode_removals(&scratch.removed, &mut scratch.packed);
            scratch.packed.extend_from_slice(&scratch.records);
            scratch.sent.clear();
            scratch.sent.extend(
                scratch
                    .changed
                    .iter()
                    .map(|&(vi, _)| view[vi as usize].state),
            );
        } else {
            // Over budget: removals first while they fit, then changes in priority order,
            // planned with each record's size bound; the rest is deferred.
            let mut budget = cap.saturating_sub(count_bound(scratch.removed.len()));
            let mut kept = 0;
            for &id in &scratch.removed {
                let need = removal_bound(id);
                if need > budget {
                    break;
                }
                budget -= need;
                kept += 1;
            }
            scratch.removed.truncate(kept);
            scratch.changed.sort_unstable_by_key(|&(vi, _)| {
                let v = &view[vi as usize];
                (v.priority, v.state.id())
            });
            let mut keep = 0;
            for k in 0..scratch.changed.len() {
                let (vi, has_base) = scratch.changed[k];
                let e = &view[vi as usize].state;
                let base = if has_base {
                    base_state
                        .binary_search_by_key(&e.id(), |b| b.id())
                        .ok()
                        .map(|x| &base_state[x])
                } else {
                    None
                };
                let need = record_bound(base, e);
                if need > budget {
                    deferred += 1;
                    continue;
                }
                budget -= need;
                scratch.changed[keep] = (vi, has_base);
                keep += 1;
            }
            scratch.changed.truncate(keep);
            // Back in id order (the view is sorted by id).
            scratch.changed.sort_unstable_by_key(|&(vi, _)| vi);
            scratch.sent.clear();
            scratch.sent.extend(
                scratch
                    .changed
                    .iter()
                    .map(|&(vi, _)| view[vi as usize].state),
            );
            encode_changes(
                base_state,
                &scratch.removed,
                &scratch.sent,
                &mut scratch.packed,
            );
        }
        let bytes = scratch
            .writer
            .encode(tick, baseline, last_input, &scratch.packed);

        // Record what the client will hold: the baseline without the removals sent, with what
        // was sent upserted; all three lists ascend by id.
        scratch.merged.clear();
        let (mut r, mut s) = (0, 0);
        for b in base_state {
            while s < scratch.sent.len() && scratch.sent[s].id() < b.id() {
                scratch.merged.push(scratch.sent[s]);
                s += 1;
            }
            if scratch.removed.get(r) == Some(&b.id()) {
                r += 1;
                continue;
            }
            if s < scratch.sent.len() && scratch.sent[s].id() == b.id() {
                scratch.merged.push(scratch.sent[s]);
                s += 1;
            } else {
                scratch.merged.push(*b);
            }
        }
        scratch.merged.extend_from_slice(&scratch.sent[s..]);
        // Without an acknowledgement any held snapshot may still become the baseline: keep the
        // newest HISTORY - 1 and this one.
        while self.entries.len() >= HISTORY {
            self.recycle_front();
        }
        let mut state = self.spare.take().unwrap_or_default();
        state.clear();
        state.extend_from_slice(&scratch.merged);
        self.entries.push_back(Entry { tick, state });
        let built = BuiltSnapshot {
            baseline,
            entities: scratch.sent.len(),
            deferred,
            removed: scratch.removed.len(),
        };
        (bytes, built)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickshard_schema::changes::apply_changes;
    use tickshard_schema::decode_snapshot;

    fn ent(id: u32, x: u16) -> ViewEntity {
        ViewEntity {
            state: EntityState::new(id, x, 0, 0, 0, 100, 0, 0, 0),
            priority: id,
        }
    }

    #[test]
    fn delta_sends_only_changes_and_removals() {
        let mut h = ViewerHistory::default();
        let mut sc = Scratch::default();
        let mut view = vec![ent(1, 10), ent(2, 20), ent(3, 30)];
        let (_, b1) = h.build(1, 0, 0, &mut view, 1200, &mut sc);
        assert_eq!(
            b1,
            BuiltSnapshot {
                baseline: 0,
                entities: 3,
                deferred: 0,
                removed: 0
            }
        );
        let mut view = vec![ent(1, 11), ent(2, 20)];
        let (bytes, b2) = h.build(2, 1, 0, &mut view, 1200, &mut sc);
        assert_eq!(
            b2,
            BuiltSnapshot {
                baseline: 1,
                entities: 1,
                deferred: 0,
                removed: 1
            }
        );
        let s = decode_snapshot(bytes).unwrap();
        // The client held 1, 2, 3 at tick 1: 3 is removed and 1 moved.
        let mut held = vec![ent(1, 10).state, ent(2, 20).state, ent(3, 30).state];
        apply_changes(s.changes().unwrap().bytes(), &mut held).unwrap();
        assert_eq!(held, vec![ent(1, 11).state, ent(2, 20).state]);
    }

    #[test]
    fn budget_defers_low_priority_entities() {
        let mut h = ViewerHistory::default();
        let mut sc = Scratch::default();
        // Records of these new entities take 5 bytes (id gap, mask, x in 2, health): room for
        // ten, and the removal count.
        let mut view: Vec<_> = (1..=100).map(|i| ent(i, 300 + i as u16)).collect();
        let one = record_bound(None, &view[0].state);
        assert_eq!(one, 5);
        let max = SNAPSHOT_OVERHEAD + 1 + 10 * one;
        let (bytes, b) = h.build(1, 0, 0, &mut view, max, &mut sc);
        assert!(bytes.len() <= max, "{} > {max}", bytes.len());
        assert_eq!(b.entities, 10);
        assert_eq!(b.deferred, 90);
        let s = decode_snapshot(bytes).unwrap();
        let mut held = Vec::new();
        apply_changes(s.changes().unwrap().bytes(), &mut held).unwrap();
        let ids: Vec<u32> = held.iter().map(|e| e.id()).collect();
        assert_eq!(ids, (1..=10).collect::<Vec<_>>(), "highest priority first");
        // The next delta against tick 1 sends the next ten.
        let (_, b) = h.build(2, 1, 0, &mut view, max, &mut sc);
        assert_eq!((b.baseline, b.entities, b.deferred), (1, 10, 80));
    }

    #[test]
    fn stale_or_bogus_ack_gets_full_state() {
        let mut h = ViewerHistory::default();
        let mut sc = Scratch::default();
        let mut view = vec![ent(1, 1)];
        h.build(1, 0, 0, &mut view, 1200, &mut sc);
        for (tick, ack) in [(2, 9), (40, 1), (41, 0)] {
            let (_, b) = h.build(tick, ack, 0, &mut view, 1200, &mut sc);
            assert_eq!(b.baseline, 0, "tick {tick} ack {ack}");
        }
    }

    #[test]
    fn history_keeps_snapshots_from_the_acknowledged_one_on() {
        let mut h = ViewerHistory::default();
        let mut sc = Scratch::default();
        let mut view = vec![ent(1, 1), ent(2, 2)];
        // A client two ticks behind: the server holds the acknowledged snapshot and the two
        // since, never more.
        for tick in 1..=40u32 {
            let ack = tick.saturating_sub(2);
            let (_, b) = h.build(tick, ack, 0, &mut view, 1200, &mut sc);
            assert_eq!(b.baseline, if tick > 2 { ack } else { 0 }, "tick {tick}");
            assert!(h.held() <= 3, "tick {tick}: {} held", h.held());
        }
        // A client that never acknowledges: at most HISTORY snapshots.
        let mut h = ViewerHistory::default();
        for tick in 1..=40u32 {
            h.build(tick, 0, 0, &mut view, 1200, &mut sc);
        }
        assert_eq!(h.held(), HISTORY);
        // Its first acknowledgement, of a snapshot still held, gives a delta.
        let (_, b) = h.build(41, 30, 0, &mut view, 1200, &mut sc);
        assert_eq!((b.baseline, h.held()), (30, 12));
    }
}
