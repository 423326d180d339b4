//! The shard watchdog: notices a shard whose clock stopped.
//!
//! Every shard's tick task stamps a heartbeat in the [`Hub`](crate::ops::admin::Hub) at each
//! housekeeping pass (every `HOUSEKEEPING_INTERVAL`, 50 ms, loaded or idle: the pass runs
//! whether or not there are rooms). The supervisor reads the heartbeats every 50 ms and hands
//! them to a [`Watchdog`], which says when a shard has been silent for longer than its bound
//! ([`WATCHDOG_BOUND`]) and when it beats again. A silent shard serves nobody: its rooms do
//! not tick, its timers do not fire, drains and commands never reach it. The supervisor logs
//! it as an error with the shard's last known state, `/healthz` fails so that Kubernetes or
//! Agones replace the process, and the drain stops waiting for it.
//!
//! Plain data and no clock of its own: every input takes `now`, so the tests drive it with a
//! virtual clock.

use crate::ids::ShardId;
use std::time::{Duration, Instant};

/// How long a shard may go without a housekeeping pass before it counts as stalled. Passes
/// come every 50 ms; a tick task that is merely busy (a long tick, a bounded receive pass of
/// a few milliseconds) or a thread that lost its core for a moment is late by milliseconds,
/// not seconds, so 2 s is a stop, not a slow shard.
pub const WATCHDOG_BOUND: Duration = Duration::from_secs(2);

/// What the watchdog has to say after an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEvent {
    /// The shard has had no housekeeping pass for `silent_for` (more than the bound).
    Stalled {
        /// The shard.
        shard: ShardId,
        /// Time since its last pass (or since the watch began, if it never beat).
        silent_for: Duration,
    },
    /// A stalled shard beat again after `stalled_for` of silence.
    Resumed {
        /// The shard.
        shard: ShardId,
        /// How long it was silent in all.
        stalled_for: Duration,
    },
    /// The shard's task ended (the runtime knows whether it was told to); it is no longer
    /// watched.
    Ended {
        /// The shard.
        shard: ShardId,
    },
}

/// What the watchdog knows of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Beating within the bound (or not yet past the bound since the watch began).
    Alive,
    /// Silent for longer than the bound, since the given instant (its last beat).
    Stalled {
        /// The last beat, or the start of the watch.
        since: Instant,
    },
    /// The shard's task ended (a normal stop, or a crash the runtime logged): no longer
    /// watched.
    Ended,
}

#[derive(Debug, Clone)]
struct Watched {
    /// The last beat seen, or the start of the watch.
    last: Instant,
    state: Liveness,
}

/// Watches the heartbeats of a fixed set of shards.
#[derive(Debug, Clone)]
pub struct Watchdog {
    bound: Duration,
    shards: Vec<Watched>,
}

impl Watchdog {
    /// Watches `shards` shards from `now` on: a shard that never beats stalls `bound` after
    /// `now`.
    pub fn new(shards: usize, bound: Duration, now: Instant) -> Self {
        Watchdog {
            bound,
            shards: vec![
                Watched {
                    last: now,
                    state: Liveness::Alive,
                };
                shards
            ],
        }
    }

    /// Looks at each shard's latest heartbeat (`None`: none yet) and whether its task has
    /// ended, and returns what changed. `beats` and `ended` have one entry per shard.
    pub fn observe(
        &mut self,
        now: Instant,
        beats: &[Option<Instant>],
        ended: &[bool],
    ) -> Vec<WatchEvent> {
        let mut events = Vec::new();
        for (i, w) in self.shards.iter_mut().enumerate() {
            let shard = ShardId(i as u16);
            if w.state == Liveness::Ended {
                continue;
            }
            if ended.get(i).copied().unwrap_or(false) {
                w.state = Liveness::Ended;
                events.push(WatchEvent::Ended { shard });
                continue;
            }
            if let Some(beat) = beats.get(i).copied().flatten() {
                if beat > w.last {
                    w.last = beat;
                }
            }
            let silent = now.saturating_duration_since(w.last);
            match w.state {
                Liveness::Alive if silent > self.bound => {
                    w.state = Liveness::Stalled { since: w.last };
                    events.push(WatchEvent::Stalled {
                        shard,
                        silent_for: silent,
                    });
                }
                Liveness::Stalled { since } if w.last > since => {
                    w.state = Liveness::Alive;
                    events.push(WatchEvent::Resumed {
                        shard,
                        stalled_for: w.last.saturating_duration_since(since),
                    });
                }
                _ => {}
            }
        }
        events
    }

    /// What the watchdog knows of `shard` (`Ended` for a shard it does not watch).
    pub fn liveness(&self, shard: ShardId) -> Liveness {
        self.shards
            .get(shard.0 as usize)
            .map_or(Liveness::Ended, |w| w.state)
    }

    /// The shards stalled now.
    pub fn stalled(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.shards
            .iter()
            .enumerate()
            .filter(|(_, w)| matches!(w.state, Liveness::Stalled { .. }))
            .map(|(i, _)| ShardId(i as u16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Two shards beat every 50 ms; shard 1 stops at 1 s. The watchdog says nothing while
    /// both beat, calls shard 1 stalled once it has been silent for more than the bound (and
    /// only once), leaves shard 0 alone, and says when shard 1 beats again.
    #[test]
    fn a_shard_that_stops_beating_is_stalled_after_the_bound_and_resumes() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(2, WATCHDOG_BOUND, t0);
        let mut beats = [None, None];
        let mut events = Vec::new();
        for step in 1..=100u32 {
            let now = t0 + 50 * MS * step;
            beats[0] = Some(now);
            if now <= t0 + 1000 * MS {
                beats[1] = Some(now);
            }
            for e in w.observe(now, &beats, &[false, false]) {
                events.push((now - t0, e));
            }
        }
        // Last beat at 1.0 s; silent for more than 2 s first at 3.05 s.
        assert_eq!(
            events,
            vec![(
                3050 * MS,
                WatchEvent::Stalled {
                    shard: ShardId(1),
                    silent_for: 2050 * MS
                }
            )]
        );
        assert_eq!(w.stalled().collect::<Vec<_>>(), vec![ShardId(1)]);
        assert_eq!(w.liveness(ShardId(0)), Liveness::Alive);
        assert_eq!(
            w.liveness(ShardId(1)),
            Liveness::Stalled {
                since: t0 + 1000 * MS
            }
        );

        // It beats again at 5.1 s.
        let now = t0 + 5100 * MS;
        let e = w.observe(now, &[Some(now), Some(now)], &[false, false]);
        assert_eq!(
            e,
            vec![WatchEvent::Resumed {
                shard: ShardId(1),
                stalled_for: 4100 * MS
            }]
        );
        assert_eq!(w.stalled().count(), 0);
    }

    /// A shard that has not beaten yet (starting) is given the bound from the start of the
    /// watch, then called stalled like any other.
    #[test]
    fn a_shard_that_never_beats_stalls_from_the_start_of_the_watch() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(1, WATCHDOG_BOUND, t0);
        assert!(w.observe(t0 + 2000 * MS, &[None], &[false]).is_empty());
        assert_eq!(
            w.observe(t0 + 2001 * MS, &[None], &[false]),
            vec![WatchEvent::Stalled {
                shard: ShardId(0),
                silent_for: 2001 * MS
            }]
        );
    }

    /// A shard whose task ended is reported once and not watched any more: its silence is
    /// not a stall, whatever its last beat.
    #[test]
    fn an_ended_shard_is_not_a_stall() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(2, WATCHDOG_BOUND, t0);
        assert_eq!(
            w.observe(t0 + 100 * MS, &[Some(t0), Some(t0)], &[false, true]),
            vec![WatchEvent::Ended { shard: ShardId(1) }]
        );
        assert!(w
            .observe(
                t0 + 10_000 * MS,
                &[Some(t0 + 9_990 * MS), Some(t0)],
                &[false, true]
            )
            .is_empty());
        assert_eq!(w.liveness(ShardId(1)), Liveness::Ended);
        assert_eq!(w.stalled().count(), 0);
        // A stalled shard that then ends leaves the stalled set too.
        let mut w = Watchdog::new(1, WATCHDOG_BOUND, t0);
        assert_eq!(w.observe(t0 + 3000 * MS, &[None], &[false]).len(), 1);
        assert_eq!(
            w.observe(t0 + 3050 * MS, &[None], &[true]),
            vec![WatchEvent::Ended { shard: ShardId(0) }]
        );
        assert_eq!(w.stalled().count(), 0);
    }

    /// A beat older than one already seen (reports can be read out of order) never moves the
    /// last beat back.
    #[test]
    fn beats_only_move_forward() {
        let t0 = Instant::now();
        let mut w = Watchdog::new(1, WATCHDOG_BOUND, t0);
        assert!(w
            .observe(t0 + 1500 * MS, &[Some(t0 + 1500 * MS)], &[false])
            .is_empty());
        assert!(w
            .observe(t0 + 3400 * MS, &[Some(t0 + 10 * MS)], &[false])
            .is_empty());
        assert_eq!(w.observe(t0 + 3600 * MS, &[None], &[false]).len(), 1);
    }
}
