//! tickshard (PATCHES.md, change 6): the packets of a space sent and not yet acknowledged or
//! lost, by packet number.
//!
//! Packet numbers only grow, so the packets are a ring buffer in number order, searched by
//! binary search. A packet taken out of the middle leaves a hole that is dropped once it reaches
//! either end. This holds what is in flight (usually a few packets for a game connection) in
//! that many slots: a `BTreeMap` allocated a node of eleven (1,160 bytes) for the first packet.

use std::collections::VecDeque;
use std::ops::{Bound, Index, RangeBounds};

use super::spaces::SentPacket;

/// Sent packets by number. See the module documentation.
#[derive(Debug, Default)]
pub(super) struct SentPackets {
    /// Numbers strictly ascending; `None` for a packet already taken.
    entries: VecDeque<(u64, Option<SentPacket>)>,
}

impl SentPackets {
    /// Records packet `number`. Numbers are expected in ascending order; an out-of-order one is
    /// still placed where it belongs.
    pub(super) fn insert(&mut self, number: u64, packet: SentPacket) {
        match self.entries.back() {
            Some(&(last, _)) if number <= last => {
                let i = self.entries.partition_point(|&(n, _)| n < number);
                match self.entries.get_mut(i) {
                    Some((n, slot)) if *n == number => *slot = Some(packet),
                    _ => self.entries.insert(i, (number, Some(packet))),
                }
            }
            _ => self.entries.push_back((number, Some(packet))),
        }
    }

    /// The packet `number`, if held.
    pub(super) fn get(&self, number: &u64) -> Option<&SentPacket> {
        let i = self.find(*number)?;
        self.entries[i].1.as_ref()
    }

    /// Takes packet `number` out.
    pub(super) fn remove(&mut self, number: &u64) -> Option<SentPacket> {
        let i = self.find(*number)?;
        let packet = self.entries[i].1.take()?;
        self.trim();
        Some(packet)
    }

    /// The packets with numbers in `range`, in ascending order.
    pub(super) fn range(
        &self,
        range: impl RangeBounds<u64>,
    ) -> impl Iterator<Item = (&u64, &SentPacket)> {
        let start = match range.start_bound() {
            Bound::Included(&s) => self.entries.partition_point(|&(n, _)| n < s),
            Bound::Excluded(&s) => self.entries.partition_point(|&(n, _)| n <= s),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => self.entries.partition_point(|&(n, _)| n <= e),
            Bound::Excluded(&e) => self.entries.partition_point(|&(n, _)| n < e),
            Bound::Unbounded => self.entries.len(),
        };
        self.entries
            .range(start..end.max(start))
            .filter_map(|(n, p)| Some((n, p.as_ref()?)))
    }

    /// Every packet held, in ascending order.
    pub(super) fn values(&self) -> impl Iterator<Item = &SentPacket> {
        self.entries.iter().filter_map(|(_, p)| p.as_ref())
    }

    /// Every packet held, in ascending order.
    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut SentPacket> {
        self.entries.iter_mut().filter_map(|(_, p)| p.as_mut())
    }

    /// Every packet held, in ascending order, taken.
    pub(super) fn into_values(self) -> impl Iterator<Item = SentPacket> {
        self.entries.into_iter().filter_map(|(_, p)| p)
    }

    /// Packets held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.values().count()
    }

    fn find(&self, number: u64) -> Option<usize> {
        // Most lookups are of the oldest packets (acknowledgements, loss detection).
        let first = self.entries.front()?.0;
        if number < first {
            return None;
        }
        // Without holes, `number - first` is the index; otherwise search.
        let guess = (number - first) as usize;
        if self.entries.get(guess).is_some_and(|&(n, _)| n == number) {
            return Some(guess);
        }
        self.entries.binary_search_by_key(&number, |&(n, _)| n).ok()
    }

    /// Drops holes at either end, and gives back most of a buffer left far too large by a burst.
    fn trim(&mut self) {
        while self.entries.front().is_some_and(|(_, p)| p.is_none()) {
            self.entries.pop_front();
        }
        while self.entries.back().is_some_and(|(_, p)| p.is_none()) {
            self.entries.pop_back();
        }
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 8 {
            self.entries.shrink_to(self.entries.len() * 2);
        }
    }
}

impl Index<&u64> for SentPackets {
    type Output = SentPacket;
    fn index(&self, number: &u64) -> &SentPacket {
        self.get(number).expect("no sent packet with this number")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Instant;
    use std::collections::BTreeMap;

    fn packet(size: u16) -> SentPacket {
        SentPacket {
            path_generation: 0,
            time_sent: Instant::now(),
            size,
            ack_eliciting: true,
            largest_acked: None,
            retransmits: Default::default(),
            stream_frames: Default::default(),
        }
    }

    /// Random sends, acknowledgements of ranges and single packets, checked against the
    /// `BTreeMap` this replaces.
    #[test]
    fn behaves_as_the_ordered_map_it_replaces() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut ours = SentPackets::default();
        let mut model = BTreeMap::new();
        let mut next = 0u64;
        for step in 0..20_000 {
            match rng.random_range(0..10) {
                0..=4 => {
                    // Numbers mostly ascend by one, sometimes skip (a packet number gap).
                    next += 1 + (rng.random_range(0..8) == 0) as u64 * rng.random_range(1..5);
                    let size = rng.random_range(0..1500);
                    ours.insert(next, packet(size));
                    model.insert(next, size);
                }
                5..=7 => {
                    let n = next.saturating_sub(rng.random_range(0..40));
                    assert_eq!(ours.remove(&n).map(|p| p.size), model.remove(&n), "step {step}");
                }
                _ => {
                    let a = next.saturating_sub(rng.random_range(0..60));
                    let b = a + rng.random_range(0..30);
                    let got: Vec<_> = ours.range(a..=b).map(|(&n, p)| (n, p.size)).collect();
                    let want: Vec<_> = model.range(a..=b).map(|(&n, &s)| (n, s)).collect();
                    assert_eq!(got, want, "step {step}: range {a}..={b}");
                    let got: Vec<_> = ours.range(..a).map(|(&n, _)| n).collect();
                    let want: Vec<_> = model.range(..a).map(|(&n, _)| n).collect();
                    assert_eq!(got, want, "step {step}: range ..{a}");
                    let after = (Bound::Excluded(a), Bound::Unbounded);
                    let got = ours.range(after).next().map(|(&n, _)| n);
                    assert_eq!(got, model.range(after).next().map(|(&n, _)| n));
                }
            }
            assert_eq!(ours.len(), model.len());
            assert_eq!(ours.get(&next).map(|p| p.size), model.get(&next).copied());
            assert_eq!(
                ours.values().map(|p| p.size).collect::<Vec<_>>(),
                model.values().copied().collect::<Vec<_>>()
            );
        }
        // Out of order, and a number sent twice, still land where they belong.
        let mut ours = SentPackets::default();
        for n in [5, 9, 7, 9, 1] {
            ours.insert(n, packet(n as u16));
        }
        let got: Vec<_> = ours.range(..).map(|(&n, p)| (n, p.size)).collect();
        assert_eq!(got, [(1, 1), (5, 5), (7, 7), (9, 9)]);
        assert_eq!(ours.len(), 4);
    }

    /// A few packets in flight take a few slots, not a tree node of eleven.
    #[test]
    fn holds_what_is_in_flight_in_that_many_slots() {
        let mut ours = SentPackets::default();
        for n in 0..1_000u64 {
            ours.insert(n, packet(100));
            if n >= 2 {
                assert!(ours.remove(&(n - 2)).is_some());
            }
        }
        assert_eq!(ours.len(), 2);
        assert!(ours.entries.capacity() <= 8, "{}", ours.entries.capacity());
        // A burst grows the buffer; once it drains, most of it is given back.
        for n in 1_000..3_000u64 {
            ours.insert(n, packet(100));
        }
        for n in 998..2_998u64 {
            ours.remove(&n);
        }
        assert_eq!(ours.len(), 2);
        assert!(ours.entries.capacity() <= 64, "{}", ours.entries.capacity());
    }
}
