//! The connections' timers: at most one deadline per connection slot, in a binary min-heap that
//! knows where each slot's entry is, so re-arming a timer moves that entry instead of adding
//! another.
//!
//! quinn re-arms a connection's timer after nearly every datagram (loss detection, idle, ACK
//! delay). A heap with lazy deletion keeps every superseded deadline until it comes due: at 30
//! Hz that was about 16 entries (over 500 bytes) per player, each popped and checked in turn.
//! Here the heap holds one entry per armed connection, and [`Timers::pop_due`] returns only
//! live deadlines.

use std::time::Instant;

/// Marks a slot with no entry in the heap.
const ABSENT: u32 = u32::MAX;

/// Deadlines by connection slot. See the module documentation.
#[derive(Debug, Default)]
pub struct Timers {
    /// The min-heap: (deadline, slot).
    heap: Vec<(Instant, usize)>,
    /// Each slot's index in `heap`, or [`ABSENT`].
    pos: Vec<u32>,
}

impl Timers {
    /// Arms `slot`'s timer for `at`, or disarms it (`None`), replacing what it had.
    pub fn set(&mut self, slot: usize, at: Option<Instant>) {
        if slot >= self.pos.len() {
            if at.is_none() {
                return;
            }
            self.pos.resize(slot + 1, ABSENT);
        }
        let i = self.pos[slot];
        match (at, i) {
            (None, ABSENT) => {}
            (None, i) => self.remove_at(i as usize),
            (Some(t), ABSENT) => {
                self.heap.push((t, slot));
                let last = self.heap.len() - 1;
                self.pos[slot] = last as u32;
                self.sift_up(last);
            }
            (Some(t), i) => {
                let i = i as usize;
                let old = std::mem::replace(&mut self.heap[i].0, t);
                if t < old {
                    self.sift_up(i);
                } else if t > old {
                    self.sift_down(i);
                }
            }
        }
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.heap.first().map(|e| e.0)
    }

    /// Takes the earliest deadline if it is at or before `now`, disarming its slot.
    pub fn pop_due(&mut self, now: Instant) -> Option<usize> {
        let &(t, slot) = self.heap.first()?;
        if t > now {
            return None;
        }
        self.remove_at(0);
        Some(slot)
    }

    /// Armed timers.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    fn remove_at(&mut self, i: usize) {
        let (_, slot) = self.heap.swap_remove(i);
        self.pos[slot] = ABSENT;
        if i < self.heap.len() {
            // The entry moved here from the end may belong above or below.
            let moved = self.heap[i].1;
            self.pos[moved] = i as u32;
            self.sift_up(i);
            self.sift_down(self.pos[moved] as usize);
        }
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[parent].0 <= self.heap[i].0 {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < n && self.heap[l].0 < self.heap[least].0 {
                least = l;
            }
            if r < n && self.heap[r].0 < self.heap[least].0 {
                least = r;
            }
            if least == i {
                break;
            }
            self.swap(i, least);
            i = least;
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a].1] = a as u32;
        self.pos[self.heap[b].1] = b as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use std::time::Duration;

    #[test]
    fn re_arming_moves_the_one_entry_of_a_slot() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut timers = Timers::default();
        timers.set(3, Some(ms(30)));
        timers.set(1, Some(ms(10)));
        timers.set(3, Some(ms(5)));
        timers.set(1, Some(ms(50)));
        assert_eq!(timers.len(), 2);
        assert_eq!(timers.next(), Some(ms(5)));
        assert_eq!(timers.pop_due(ms(4)), None);
        assert_eq!(timers.pop_due(ms(5)), Some(3));
        assert_eq!(timers.pop_due(ms(49)), None);
        timers.set(1, None);
        assert!(timers.is_empty());
        assert_eq!(timers.pop_due(ms(100)), None);
        // Disarming a slot never armed, even beyond the known slots, is nothing.
        timers.set(900, None);
        assert!(timers.is_empty());
    }

    /// Random arming, re-arming, disarming and popping, checked against a plain model.
    #[test]
    fn matches_a_model_under_random_operations() {
        let t0 = Instant::now();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut timers = Timers::default();
        let mut model: BTreeMap<usize, Instant> = BTreeMap::new();
        let mut now = t0;
        for step in 0..20_000 {
            let slot = rng.gen_range(0..64);
            match rng.gen_range(0..10) {
                0..=5 => {
                    let at = now + Duration::from_micros(rng.gen_range(0..50_000));
                    timers.set(slot, Some(at));
                    model.insert(slot, at);
                }
                6 => {
                    timers.set(slot, None);
                    model.remove(&slot);
                }
                _ => {
                    now += Duration::from_micros(rng.gen_range(0..5_000));
                    while let Some(s) = timers.pop_due(now) {
                        let at = model.remove(&s).expect("a popped slot was armed");
                        assert!(at <= now, "step {step}: popped a deadline not yet due");
                        // Nothing due is earlier than what was popped.
                        assert!(model.values().all(|&t| t >= at || t > now));
                    }
                    assert!(
                        model.values().all(|&t| t > now),
                        "step {step}: a due timer left"
                    );
                }
            }
            assert_eq!(timers.len(), model.len());
            assert_eq!(timers.next(), model.values().min().copied(), "step {step}");
        }
    }
}
