//! Entity changes: the packed delta a snapshot carries in `Snapshot.changes` (protocol 2).
//!
//! A snapshot is a delta against a baseline the client acknowledged: the ids that left the
//! view, and one record per entity that is new or changed. Protocol 1 sent every changed entity
//! whole (16 bytes); here a record holds only the fields that changed, positions as the
//! difference from the baseline, and ids as the gap from the previous id. A player that moved
//! and turned costs 5 to 7 bytes. PROTOCOL.md ("Entity changes") is the reference for other
//! clients:
//!
//! ```text
//! changes  := count:varint  gap:varint * count  record*      (records run to the end)
//! record   := gap:varint  mask:u8  field*                    (fields in bit order)
//!   gap    the id minus the previous id of the same list (the first: the id itself); ids
//!          strictly ascending
//!   mask   bit 0 x, 1 y: zigzag varint of (value - base value)
//!          bit 2 kind, 3 angle, 4 health, 5 flags: one byte
//!          bit 6 value, 7 reserved: varint (at most 65535)
//!   base   the entity in the baseline state, or all fields 0 when it is new there
//! varint   unsigned LEB128, at most 5 bytes; zigzag(n) = (n << 1) ^ (n >> 31)
//! ```

use crate::{DecodeError, EntityState};

const X: u8 = 1 << 0;
const Y: u8 = 1 << 1;
const KIND: u8 = 1 << 2;
const ANGLE: u8 = 1 << 3;
const HEALTH: u8 = 1 << 4;
const FLAGS: u8 = 1 << 5;
const VALUE: u8 = 1 << 6;
const RESERVED: u8 = 1 << 7;

/// The all-zero state a new entity is encoded against.
fn zero() -> EntityState {
    EntityState::default()
}

fn varint_len(v: u32) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0xfff_ffff => 4,
        _ => 5,
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(d: i32) -> u32 {
    ((d << 1) ^ (d >> 31)) as u32
}

fn unzigzag(v: u32) -> i32 {
    ((v >> 1) as i32) ^ -((v & 1) as i32)
}

/// Which fields differ, from the two states' bytes (little-endian layout: id 0..4, x 4..6,
/// y 6..8, kind, angle, health, flags, value 12..14, reserved 14..16).
#[inline]
fn mask(base: &EntityState, e: &EntityState) -> u8 {
    let word = |s: &EntityState, at: usize| {
        u64::from_le_bytes(s.0[at..at + 8].try_into().expect("8 bytes of 16"))
    };
    let lo = word(base, 0) ^ word(e, 0);
    let hi = word(base, 8) ^ word(e, 8);
    let mut m = 0;
    m |= ((lo >> 32) & 0xffff != 0) as u8 * X;
    m |= (lo >> 48 != 0) as u8 * Y;
    m |= (hi & 0xff != 0) as u8 * KIND;
    m |= ((hi >> 8) & 0xff != 0) as u8 * ANGLE;
    m |= ((hi >> 16) & 0xff != 0) as u8 * HEALTH;
    m |= ((hi >> 24) & 0xff != 0) as u8 * FLAGS;
    m |= ((hi >> 32) & 0xffff != 0) as u8 * VALUE;
    m |= (hi >> 48 != 0) as u8 * RESERVED;
    m
}

/// Writes `v` as a varint into `buf` at `n` and advances `n` (the caller sized `buf`: at most
/// 5 bytes a varint).
#[inline]
pub fn put_varint_at(buf: &mut [u8], n: &mut usize, mut v: u32) {
    while v >= 0x80 {
        buf[*n] = v as u8 | 0x80;
        *n += 1;
        v >>= 7;
    }
    buf[*n] = v as u8;
    *n += 1;
}

/// Longest record: gap 5, mask 1, x 3, y 3, four bytes, value 3, reserved 3.
const RECORD_MAX: usize = 5 + 1 + 3 + 3 + 4 + 3 + 3;

fn delta(now: u16, base: u16) -> u32 {
    zigzag(now as i32 - base as i32)
}

/// Most bytes the record of `e` can take against `base` (`None`: new to the client), whatever
/// the id before it. The encoded record is never longer, so a budget planned with it holds.
pub fn record_bound(base: Option<&EntityState>, e: &EntityState) -> usize {
    let z = zero();
    let b = base.unwrap_or(&z);
    let m = mask(b, e);
    let mut n = varint_len(e.id()) + 1;
    if m & X != 0 {
        n += varint_len(delta(e.x(), b.x()));
    }
    if m & Y != 0 {
        n += varint_len(delta(e.y(), b.y()));
    }
    n += (m & (KIND | ANGLE | HEALTH | FLAGS)).count_ones() as usize;
    if m & VALUE != 0 {
        n += varint_len(e.value() as u32);
    }
    if m & RESERVED != 0 {
        n += varint_len(e.reserved() as u32);
    }
    n
}

/// Most bytes a removal of `id` takes (its gap can only be shorter).
pub fn removal_bound(id: u32) -> usize {
    varint_len(id)
}

/// Bytes of the removal count in front of the records.
pub fn count_bound(removals: usize) -> usize {
    varint_len(removals.min(u32::MAX as usize) as u32)
}

/// Appends the changes to `out`: `removed` and `changed` each in ascending id order, every
/// changed entity encoded against its state in `baseline` (sorted by id; empty for a full
/// snapshot).
pub fn encode_changes(
    baseline: &[EntityState],
    removed: &[u32],
    changed: &[EntityState],
    out: &mut Vec<u8>,
) {
    encode_removals(removed, out);
    let mut prev = 0u32;
    let mut bi = 0;
    for e in changed {
        // Both lists ascend: walk the baseline alongside.
        while bi < baseline.len() && baseline[bi].id() < e.id() {
            bi += 1;
        }
        let base = baseline.get(bi).filter(|b| b.id() == e.id());
        encode_record(prev, base, e, out);
        prev = e.id();
    }
}

/// Appends the removal list (count, then id gaps; `removed` ascending) to `out`: the start of
/// every `changes`.
pub fn encode_removals(removed: &[u32], out: &mut Vec<u8>) {
    put_varint(out, removed.len() as u32);
    let mut prev = 0u32;
    for &id in removed {
        debug_assert!(prev == 0 || id > prev, "removals ascend");
        put_varint(out, id - prev);
        prev = id;
    }
}

/// Appends the record of `e` against `base` (`None`: new to the client) to `out`, after a
/// record of id `prev` (0 for the first), and returns its length. Records follow the removals
/// in ascending id order.
pub fn encode_record(
    prev: u32,
    base: Option<&EntityState>,
    e: &EntityState,
    out: &mut Vec<u8>,
) -> usize {
    debug_assert!(prev == 0 || e.id() > prev, "records ascend");
    let z = zero();
    let base = base.unwrap_or(&z);
    let m = mask(base, e);
    let mut rec = [0u8; RECORD_MAX];
    let mut n = 0;
    put_varint_at(&mut rec, &mut n, e.id() - prev);
    rec[n] = m;
    n += 1;
    if m & X != 0 {
        put_varint_at(&mut rec, &mut n, delta(e.x(), base.x()));
    }
    if m & Y != 0 {
        put_varint_at(&mut rec, &mut n, delta(e.y(), base.y()));
    }
    for (bit, at) in [(KIND, 8), (ANGLE, 9), (HEALTH, 10), (FLAGS, 11)] {
        if m & bit != 0 {
            rec[n] = e.0[at];
            n += 1;
        }
    }
    if m & VALUE != 0 {
        put_varint_at(&mut rec, &mut n, e.value() as u32);
    }
    if m & RESERVED != 0 {
        put_varint_at(&mut rec, &mut n, e.reserved() as u32);
    }
    out.extend_from_slice(&rec[..n]);
    n
}

/// Reads the varints and bytes of a packed field (a snapshot's `changes`, an input's
/// `packed`), with errors rather than panics on truncated or overlong input.
pub struct ByteReader<'a> {
    buf: &'a [u8],
}

impl<'a> ByteReader<'a> {
    /// A reader of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        ByteReader { buf }
    }

    /// Whether every byte was read.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next byte.
    pub fn byte(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or(DecodeError::Field("packed data truncated"))?;
        self.buf = rest;
        Ok(b)
    }

    /// The next unsigned LEB128 varint (at most 5 bytes, at most `u32::MAX`).
    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut v = 0u64;
        for i in 0..5 {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return u32::try_from(v).map_err(|_| DecodeError::Field("packed varint over u32"));
            }
        }
        Err(DecodeError::Field("packed varint longer than 5 bytes"))
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        u16::try_from(self.varint()?).map_err(|_| DecodeError::Field("changes: field over 65535"))
    }

    fn pos(&mut self, base: u16) -> Result<u16, DecodeError> {
        let d = unzigzag(self.varint()?);
        u16::try_from(base as i32 + d)
            .map_err(|_| DecodeError::Field("changes: position out of range"))
    }
}

fn next_id(prev: Option<u32>, gap: u32) -> Result<u32, DecodeError> {
    match prev {
        None => Ok(gap),
        Some(_) if gap == 0 => Err(DecodeError::Field("changes: ids must ascend")),
        Some(p) => p
            .checked_add(gap)
            .ok_or(DecodeError::Field("changes: id overflow")),
    }
}

/// Applies `changes` to `state`, the client's state at the snapshot's baseline (sorted by id;
/// empty for a full snapshot). On an error `state` is partly updated: discard it.
pub fn apply_changes(changes: &[u8], state: &mut Vec<EntityState>) -> Result<(), DecodeError> {
    let baseline = std::mem::take(state);
    apply_changes_to(changes, &baseline, state)
}

/// Writes into `out` the state after `changes`: `baseline` (the client's state at the
/// snapshot's baseline, sorted by id; empty for a full snapshot) without the removals, with
/// each record applied to the entity's state there (or to all zeros when new), sorted by id.
/// One merge of the two ascending lists: no searching or shifting. On an error `out` holds
/// part of the result: discard it.
pub fn apply_changes_to(
    changes: &[u8],
    baseline: &[EntityState],
    out: &mut Vec<EntityState>,
) -> Result<(), DecodeError> {
    out.clear();
    let mut r = ByteReader::new(changes);
    let count = r.varint()? as usize;
    if count > r.buf.len() {
        return Err(DecodeError::Field("changes: more removals than bytes"));
    }
    // Check the removals now; walk them again, lazily, alongside the baseline.
    let removals = r.buf;
    let mut prev = None;
    for _ in 0..count {
        prev = Some(next_id(prev, r.varint()?)?);
    }
    let mut rem = ByteReader::new(&removals[..removals.len() - r.buf.len()]);
    let mut rem_left = count;
    let mut rem_prev = None;
    let mut next_removal = move || -> Option<u32> {
        if rem_left == 0 {
            return None;
        }
        rem_left -= 1;
        // Verified above: neither read nor sum can fail.
        let id = next_id(rem_prev, rem.varint().ok()?).ok()?;
        rem_prev = Some(id);
        Some(id)
    };
    let mut removal = next_removal();
    let mut bi = 0;
    // Baseline entries below `id` that stay, in order; returns the entry with `id` if it stays.
    let mut keep_below =
        |id: u64, out: &mut Vec<EntityState>, removal: &mut Option<u32>| -> Option<EntityState> {
            while let Some(b) = baseline.get(bi) {
                if b.id() as u64 > id {
                    break;
                }
                bi += 1;
                while removal.is_some_and(|r| r < b.id()) {
                    *removal = next_removal();
                }
                if *removal == Some(b.id()) {
                    continue;
                }
                if b.id() as u64 == id {
                    return Some(*b);
                }
                out.push(*b);
            }
            None
        };
    let mut prev = None;
    while !r.buf.is_empty() {
        let id = next_id(prev, r.varint()?)?;
        prev = Some(id);
        let m = r.byte()?;
        let b = keep_below(id as u64, out, &mut removal).unwrap_or_else(zero);
        let x = if m & X != 0 { r.pos(b.x())? } else { b.x() };
        let y = if m & Y != 0 { r.pos(b.y())? } else { b.y() };
        let mut byte = |bit: u8, v: u8| if m & bit != 0 { r.byte() } else { Ok(v) };
        let kind = byte(KIND, b.kind())?;
        let angle = byte(ANGLE, b.angle())?;
        let health = byte(HEALTH, b.health())?;
        let flags = byte(FLAGS, b.flags())?;
        let value = if m & VALUE != 0 { r.u16()? } else { b.value() };
        let reserved = if m & RESERVED != 0 {
            r.u16()?
        } else {
            b.reserved()
        };
        out.push(EntityState::new(
            id, x, y, kind, angle, health, flags, value, reserved,
        ));
    }
    keep_below(u64::MAX, out, &mut removal);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(id: u32, x: u16, y: u16, angle: u8, value: u16) -> EntityState {
        EntityState::new(id, x, y, 1, angle, 100, 0, value, 0)
    }

    #[test]
    fn round_trip_against_a_baseline() {
        let base = vec![
            ent(3, 1000, 2000, 7, 5),
            ent(9, 16000, 10, 0, 0),
            ent(12, 5, 5, 1, 1),
        ];
        let removed = [9];
        let changed = [
            ent(3, 1085, 1915, 9, 5),                     // moved and turned
            ent(12, 5, 5, 1, 2),                          // score only
            ent(40, 16383, 16383, 255, 65535),            // new
            EntityState::new(41, 0, 0, 0, 0, 0, 0, 0, 7), // new, reserved only
        ];
        let mut out = Vec::new();
        encode_changes(&base, &removed, &changed, &mut out);
        let bound: usize = count_bound(1)
            + removal_bound(9)
            + changed
                .iter()
                .map(|e| record_bound(base.iter().find(|b| b.id() == e.id()), e))
                .sum::<usize>();
        assert!(out.len() <= bound, "{} > bound {bound}", out.len());
        let mut state = base.clone();
        apply_changes(&out, &mut state).unwrap();
        let want = vec![changed[0], changed[1], changed[2], changed[3]];
        assert_eq!(state, want);
        // Moving 85 units and turning costs 1 (gap) + 1 (mask) + 2 + 2 + 1 bytes.
        let mut one = Vec::new();
        encode_changes(&base, &[], &changed[..1], &mut one);
        assert_eq!(one.len(), 1 + 7);
    }

    #[test]
    fn full_state_round_trips() {
        let all: Vec<EntityState> = (1..=50)
            .map(|i| ent(i, i as u16 * 300, 77, i as u8, i as u16))
            .collect();
        let mut out = Vec::new();
        encode_changes(&[], &[], &all, &mut out);
        let mut state = Vec::new();
        apply_changes(&out, &mut state).unwrap();
        assert_eq!(state, all);
        assert!(
            out.len() < all.len() * 12,
            "{} bytes for 50 entities",
            out.len()
        );
    }

    #[test]
    fn malformed_changes_are_errors_not_panics() {
        let good = {
            let mut out = Vec::new();
            encode_changes(
                &[],
                &[4, 8],
                &[ent(2, 9, 9, 9, 9), ent(5, 1, 1, 1, 1)],
                &mut out,
            );
            out
        };
        // Every truncation and every single-byte corruption decodes or fails cleanly.
        for len in 0..good.len() {
            let _ = apply_changes(&good[..len], &mut Vec::new());
        }
        for i in 0..good.len() {
            for v in [0u8, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] = v;
                let _ = apply_changes(&bad, &mut Vec::new());
            }
        }
        let cases: [&[u8]; 6] = [
            &[],                                   // no removal count
            &[0x80, 0x80, 0x80, 0x80, 0x80, 0x01], // varint too long
            &[0xff, 0xff, 0xff, 0xff, 0x1f],       // varint over u32
            &[0, 5, 0, 0, 0],                      // second record id does not ascend
            &[0, 1, X, 0x03],                      // x below 0
            &[0, 1, VALUE, 0x80, 0x80, 0x04],      // value over 65535
        ];
        for c in cases {
            assert!(apply_changes(c, &mut Vec::new()).is_err(), "{c:?} accepted");
        }
        assert!(
            apply_changes(&[9], &mut Vec::new()).is_err(),
            "9 removals in 0 bytes"
        );
    }

    /// The bytes PROTOCOL.md shows (§7 and the worked example).
    #[test]
    fn documented_examples() {
        let at = |x, y, angle| EntityState::new(1, x, y, 0, angle, 100, 0, 0, 0);
        let bytes = |base: &[EntityState], e: EntityState| {
            let mut out = Vec::new();
            encode_changes(base, &[], &[e], &mut out);
            out
        };
        assert_eq!(
            bytes(&[at(8000, 4000, 0)], at(8085, 3915, 9)),
            [0x00, 0x01, 0x0b, 0xaa, 0x01, 0xa9, 0x01, 0x09]
        );
        assert_eq!(
            bytes(&[], at(8000, 4000, 0)),
            [0x00, 0x01, 0x13, 0x80, 0x7d, 0xc0, 0x3e, 0x64]
        );
        assert_eq!(
            bytes(&[at(8000, 4000, 0)], at(8085, 4000, 0)),
            [0x00, 0x01, 0x01, 0xaa, 0x01]
        );
        let mut nothing = Vec::new();
        encode_changes(&[at(1, 1, 1)], &[], &[], &mut nothing);
        assert_eq!(nothing, [0x00]);
    }

    /// The merge gives what removing, then upserting one by one gives, for many random
    /// baselines and deltas (a seeded generator: the same cases every run).
    #[test]
    fn merge_matches_remove_then_upsert() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u32| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as u32) % n.max(1)
        };
        for _ in 0..500 {
            let mut ids: Vec<u32> = (0..next(30)).map(|_| 1 + next(60)).collect();
            ids.sort_unstable();
            ids.dedup();
            let base: Vec<EntityState> = ids
                .iter()
                .map(|&id| {
                    EntityState::new(
                        id,
                        next(16000) as u16,
                        next(16000) as u16,
                        0,
                        0,
                        100,
                        0,
                        0,
                        0,
                    )
                })
                .collect();
            let mut removed: Vec<u32> = ids.iter().copied().filter(|_| next(4) == 0).collect();
            removed.dedup();
            let mut cids: Vec<u32> = (0..next(20)).map(|_| 1 + next(70)).collect();
            cids.sort_unstable();
            cids.dedup();
            cids.retain(|id| !removed.contains(id));
            let changed: Vec<EntityState> = cids
                .iter()
                .map(|&id| {
                    EntityState::new(
                        id,
                        next(16000) as u16,
                        next(9) as u16,
                        next(2) as u8,
                        next(256) as u8,
                        100,
                        0,
                        next(3) as u16,
                        0,
                    )
                })
                .collect();
            let mut packed = Vec::new();
            encode_changes(&base, &removed, &changed, &mut packed);
            let mut want = base.clone();
            want.retain(|e| !removed.contains(&e.id()));
            for c in &changed {
                match want.binary_search_by_key(&c.id(), |e| e.id()) {
                    Ok(i) => want[i] = *c,
                    Err(i) => want.insert(i, *c),
                }
            }
            let mut got = Vec::new();
            apply_changes_to(&packed, &base, &mut got).unwrap();
            assert_eq!(got, want);
        }
    }
}
