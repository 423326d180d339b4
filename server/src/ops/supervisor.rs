//! The process's drain, as a state machine with no I/O and no clock of its own.
//!
//! A server process ends in one of three ways: a drain (the first SIGTERM or `POST /drain`:
//! every shard tells its players, stops taking new ones, and ends its rooms when they finish
//! or the grace runs out), a forced stop (a second signal, or shards still busy `slack` after
//! the grace), or failure (every shard died). Around that it tells the fleet manager when the
//! process is ready, whether it is healthy, and what capacity it has.
//!
//! [`Supervisor`] decides all of it. Like the shard core it is driven from outside: the
//! supervisor thread in `runtime/supervise.rs` feeds it what it observes (signals, drain requests, the
//! shards' reports and liveness) with the time, and carries out the [`Action`]s it asks for
//! (broadcast a command to the shards, call the fleet hook, stop). Tests drive it with a
//! virtual clock (`tests` below).

use crate::fleet::Capacity;
use crate::shard::operator::{Command, ShardReport};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the supervisor needs to know of the process.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// How long a drain lets rooms finish.
    pub drain_grace: Duration,
    /// How long after the grace shards may take to report that they are done before they are
    /// told to stop; as long again before the process stops without them.
    pub drain_slack: Duration,
    /// How often the fleet hears the capacity.
    pub capacity_interval: Duration,
    /// Where players should reconnect, given to them with the drain notice.
    pub reconnect_hint: String,
    /// Players the process could hold.
    pub players_capacity: usize,
    /// Seats per room.
    pub room_capacity: usize,
}

/// One look at the shards, as the supervisor thread gathers it.
#[derive(Clone, Copy)]
pub struct Observation<'a> {
    /// Each shard's last report (`None` before its first).
    pub reports: &'a [Option<Arc<ShardReport>>],
    /// Whether each shard is alive (neither stalled nor ended), by the watchdog.
    pub alive: &'a [bool],
    /// Whether no shard has a fault (stalled or died).
    pub healthy: bool,
    /// Shards whose tasks still run.
    pub running: usize,
}

/// Something the supervisor asks its thread to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Mark the process as draining (`/healthz` and `/status` say so).
    SetDraining,
    /// Send this command to every shard.
    Broadcast(Command),
    /// Tell the fleet manager the process serves.
    FleetReady,
    /// Tell the fleet manager whether the process is healthy.
    FleetHealthy(bool),
    /// Tell the fleet manager the capacity (and ask it for its status).
    FleetCapacity(Capacity),
    /// Stop the shards and end the process.
    Stop(Outcome),
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A drain that finished: every live shard reported it was done.
    Drained,
    /// A drain cut short: the shards were told to stop and did not report done in time.
    Forced,
    /// Every shard stopped without being asked.
    Failed,
}

/// The process's drain state machine. See the module documentation.
#[derive(Debug)]
pub struct Supervisor {
    config: SupervisorConfig,
    signals: usize,
    drain_requested: bool,
    drain_deadline: Option<Instant>,
    forced: bool,
    ready: bool,
    healthy: bool,
    next_capacity: Instant,
    outcome: Option<Outcome>,
    actions: VecDeque<Action>,
}

impl Supervisor {
    /// A supervisor of a process that just started at `now` (healthy, not ready).
    pub fn new(config: SupervisorConfig, now: Instant) -> Self {
        Supervisor {
            config,
            signals: 0,
            drain_requested: false,
            drain_deadline: None,
            forced: false,
            ready: false,
            healthy: true,
            next_capacity: now,
            outcome: None,
            actions: VecDeque::new(),
        }
    }

    /// Termination signals received so far, in total: the first drains, the second stops.
    pub fn handle_signals(&mut self, total: usize) {
        self.signals = self.signals.max(total);
    }

    /// An operator asked for a drain (`POST /drain`).
    pub fn handle_drain_request(&mut self) {
        self.drain_requested = true;
    }

    /// Decides what to do at `now`, given what the thread observed; the decisions wait in
    /// [`Supervisor::poll_action`].
    pub fn handle_observation(&mut self, now: Instant, seen: Observation<'_>) {
        if self.outcome.is_some() {
            return;
        }
        if seen.healthy != self.healthy {
            self.healthy = seen.healthy;
            self.actions.push_back(Action::FleetHealthy(seen.healthy));
        }
        if (self.signals >= 1 || self.drain_requested) && self.drain_deadline.is_none() {
            self.drain_deadline = Some(now + self.config.drain_grace);
            self.actions.push_back(Action::SetDraining);
            self.actions.push_back(Action::Broadcast(Command::Drain {
                grace: self.config.drain_grace,
                reconnect_hint: self.config.reconnect_hint.clone(),
            }));
        }
        let slack = self.config.drain_slack;
        if !self.forced
            && (self.signals >= 2 || self.drain_deadline.is_some_and(|d| now >= d + slack))
        {
            self.forced = true;
            self.actions.push_back(Action::Broadcast(Command::Stop {
                reason: "server shutting down".into(),
            }));
        }
        if !self.ready && self.drain_deadline.is_none() && seen.reports.iter().all(Option::is_some)
        {
            self.ready = true;
            self.actions.push_back(Action::FleetReady);
        }
        if now >= self.next_capacity {
            self.next_capacity = now + self.config.capacity_interval;
            self.actions
                .push_back(Action::FleetCapacity(self.capacity(seen.reports)));
        }
        // A stalled or ended shard cannot drain: waiting for it would only hold the others'
        // exit until the last resort.
        let drained = seen.reports.iter().enumerate().all(|(i, r)| {
            !seen.alive.get(i).copied().unwrap_or(false) || r.as_ref().is_some_and(|r| r.drained)
        });
        let outcome = if self.drain_deadline.is_some() && drained {
            Some(if self.forced {
                Outcome::Forced
            } else {
                Outcome::Drained
            })
        } else if seen.running == 0 {
            Some(Outcome::Failed)
        } else if self.forced && self.drain_deadline.is_some_and(|d| now >= d + 2 * slack) {
            Some(Outcome::Forced)
        } else {
            None
        };
        if let Some(o) = outcome {
            self.outcome = Some(o);
            self.actions.push_back(Action::Stop(o));
        }
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// How the process ended, once it has.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }

    fn capacity(&self, reports: &[Option<Arc<ShardReport>>]) -> Capacity {
        let players_capacity = self.config.players_capacity;
        let mut c = Capacity {
            players_capacity,
            rooms_capacity: players_capacity / self.config.room_capacity.max(1),
            ..Capacity::default()
        };
        for r in reports.iter().flatten() {
            c.rooms += r.rooms.len();
            c.players += r.players;
            c.room_ids
                .extend(r.rooms.iter().map(|room| room.id.0.to_string()));
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(30);
    const SLACK: Duration = Duration::from_secs(2);
    const STEP: Duration = Duration::from_millis(50);

    /// A supervisor of `n` shards on a virtual clock, with their reports and liveness.
    struct Rig {
        sup: Supervisor,
        now: Instant,
        reports: Vec<Option<Arc<ShardReport>>>,
        alive: Vec<bool>,
        healthy: bool,
        running: usize,
        actions: Vec<(Duration, Action)>,
        start: Instant,
    }

    impl Rig {
        fn new(n: usize) -> Self {
            let start = Instant::now();
            Rig {
                sup: Supervisor::new(
                    SupervisorConfig {
                        drain_grace: GRACE,
                        drain_slack: SLACK,
                        capacity_interval: Duration::from_secs(1),
                        reconnect_hint: "next:4433".into(),
                        players_capacity: 100 * n,
                        room_capacity: 50,
                    },
                    start,
                ),
                now: start,
                reports: vec![None; n],
                alive: vec![true; n],
                healthy: true,
                running: n,
                actions: Vec::new(),
                start,
            }
        }

        fn report(&mut self, i: usize, players: usize, drained: bool) {
            self.reports[i] = Some(Arc::new(ShardReport {
                shard: crate::ShardId(i as u16),
                counters: Default::default(),
                ticks: Default::default(),
                rooms: Vec::new(),
                players,
                connections: players,
                drain: crate::shard::operator::DrainState::Serving,
                drained,
                cpu_seconds: 0.0,
            }));
        }

        /// Runs the supervisor's loop for `d` of virtual time, collecting its actions.
        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end && self.sup.outcome().is_none() {
                self.now += STEP;
                self.sup.handle_observation(
                    self.now,
                    Observation {
                        reports: &self.reports,
                        alive: &self.alive,
                        healthy: self.healthy,
                        running: self.running,
                    },
                );
                while let Some(a) = self.sup.poll_action() {
                    self.actions.push((self.now - self.start, a));
                }
            }
        }

        fn take(&mut self) -> Vec<Action> {
            self.actions
                .drain(..)
                .map(|(_, a)| a)
                .filter(|a| !matches!(a, Action::FleetCapacity(_)))
                .collect()
        }
    }

    fn drain_cmd() -> Action {
        Action::Broadcast(Command::Drain {
            grace: GRACE,
            reconnect_hint: "next:4433".into(),
        })
    }

    fn stop_cmd() -> Action {
        Action::Broadcast(Command::Stop {
            reason: "server shutting down".into(),
        })
    }

    #[test]
    fn ready_once_every_shard_reported_and_capacity_every_second() {
        let mut r = Rig::new(2);
        r.report(0, 3, false);
        r.run(Duration::from_millis(500));
        assert!(
            !r.actions.iter().any(|(_, a)| *a == Action::FleetReady),
            "not ready before every shard reports"
        );
        r.report(1, 4, false);
        r.run(Duration::from_millis(2600));
        let capacities: Vec<_> = r
            .actions
            .iter()
            .filter_map(|(t, a)| match a {
                Action::FleetCapacity(c) => Some((*t, c.players, c.players_capacity)),
                _ => None,
            })
            .collect();
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(
            capacities,
            vec![
                (ms(50), 3, 200),
                (ms(1050), 7, 200),
                (ms(2050), 7, 200),
                (ms(3050), 7, 200)
            ]
        );
        assert_eq!(r.take(), vec![Action::FleetReady]);
        r.run(Duration::from_secs(60));
        assert!(
            r.take().is_empty(),
            "ready is said once; nothing ends by itself"
        );
        assert_eq!(r.sup.outcome(), None);
    }

    #[test]
    fn a_signal_drains_and_the_process_stops_when_every_shard_is_done() {
        let mut r = Rig::new(2);
        r.report(0, 1, false);
        r.report(1, 1, false);
        r.run(STEP);
        assert_eq!(r.take(), vec![Action::FleetReady]);
        r.sup.handle_signals(1);
        r.run(STEP);
        assert_eq!(r.take(), vec![Action::SetDraining, drain_cmd()]);
        r.report(0, 0, true);
        r.run(Duration::from_secs(10));
        assert!(r.take().is_empty(), "one shard is still draining");
        assert_eq!(r.sup.outcome(), None);
        r.report(1, 0, true);
        r.run(STEP);
        assert_eq!(r.take(), vec![Action::Stop(Outcome::Drained)]);
        // Nothing more once stopped.
        r.sup.handle_signals(2);
        r.run(STEP);
        assert!(r.take().is_empty());
    }

    #[test]
    fn a_drain_request_before_readiness_drains_without_ever_saying_ready() {
        let mut r = Rig::new(1);
        r.sup.handle_drain_request();
        r.run(STEP);
        assert_eq!(r.take(), vec![Action::SetDraining, drain_cmd()]);
        r.report(0, 0, false);
        r.run(Duration::from_secs(1));
        assert!(r.take().is_empty(), "a draining process is never ready");
        r.report(0, 0, true);
        r.run(STEP);
        assert_eq!(r.take(), vec![Action::Stop(Outcome::Drained)]);
    }

    #[test]
    fn shards_still_busy_after_grace_and_slack_are_stopped_then_left_behind() {
        let mut r = Rig::new(1);
        r.report(0, 5, false);
        r.run(STEP);
        r.take();
        r.sup.handle_signals(1);
        r.run(STEP);
        let drain_at = r.now;
        assert_eq!(r.take(), vec![Action::SetDraining, drain_cmd()]);
        // Just before grace + slack: nothing.
        r.run(GRACE + SLACK - STEP);
        assert!(r.take().is_empty());
        r.run(STEP);
        assert_eq!(r.now - drain_at, GRACE + SLACK);
        assert_eq!(r.take(), vec![stop_cmd()]);
        // Still not done 2 × slack after the grace: the process stops without it.
        r.run(SLACK - STEP);
        assert!(r.take().is_empty());
        r.run(STEP);
        assert_eq!(r.now - drain_at, GRACE + 2 * SLACK);
        assert_eq!(r.take(), vec![Action::Stop(Outcome::Forced)]);
    }

    #[test]
    fn a_second_signal_stops_at_once_and_a_stalled_shard_is_not_waited_for() {
        let mut r = Rig::new(2);
        r.report(0, 5, false);
        r.report(1, 5, false);
        r.run(STEP);
        r.take();
        r.sup.handle_signals(2);
        r.run(STEP);
        assert_eq!(r.take(), vec![Action::SetDraining, drain_cmd(), stop_cmd()]);
        r.report(0, 0, true);
        // Shard 1 stalls: the watchdog says it is not alive, and the process is unhealthy.
        r.alive[1] = false;
        r.healthy = false;
        r.run(STEP);
        assert_eq!(
            r.take(),
            vec![Action::FleetHealthy(false), Action::Stop(Outcome::Forced)]
        );
    }

    #[test]
    fn health_changes_are_told_once_each_and_dead_shards_end_the_process() {
        let mut r = Rig::new(2);
        r.report(0, 0, false);
        r.report(1, 0, false);
        r.run(STEP);
        r.take();
        r.healthy = false;
        r.run(Duration::from_secs(1));
        r.healthy = true;
        r.run(Duration::from_secs(1));
        assert_eq!(
            r.take(),
            vec![Action::FleetHealthy(false), Action::FleetHealthy(true)]
        );
        r.running = 0;
        r.alive = vec![false, false];
        r.run(STEP);
        assert_eq!(r.take(), vec![Action::Stop(Outcome::Failed)]);
    }
}
