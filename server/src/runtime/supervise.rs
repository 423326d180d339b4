//! The supervisor thread: the thread that called [`serve`](super::serve) feeds the drain
//! state machine ([`crate::ops::supervisor`]) what it observes, carries out its actions,
//! watches the shards' heartbeats, and writes room results to the results file.

use super::{CAPACITY_INTERVAL, DRAIN_SLACK, SIGNALS, STOP, SUPERVISOR_INTERVAL};
use crate::fleet::Fleet;
use crate::ops::admin::{Hub, ProcessEvent, ShardFault};
use crate::ops::config::ServeConfig;
use crate::ops::supervisor::{Action, Observation, Outcome, Supervisor, SupervisorConfig};
use crate::ops::watchdog::{Liveness, WatchEvent, Watchdog, WATCHDOG_BOUND};
use crate::shard::operator::{Command, RoomResult};
use crate::ShardId;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Instant;
use tracing::{error, info, warn};

/// The supervisor thread: feeds the process's drain state machine ([`Supervisor`]) what it
/// observes every `SUPERVISOR_INTERVAL` (signals, drain requests, the shards' reports and
/// liveness), carries out what it decides, and writes room results as they arrive. Returns
/// false when the process stopped because every shard had died.
pub(super) fn supervise(
    config: &ServeConfig,
    hub: &Hub,
    events: &mpsc::Receiver<ProcessEvent>,
    results_rx: &mpsc::Receiver<RoomResult>,
    fleet: &mut dyn Fleet,
) -> bool {
    let mut results = ResultsFile::new(&config.data_dir);
    let start = Instant::now();
    let shards = config.shard_count();
    let mut sup = Supervisor::new(
        SupervisorConfig {
            drain_grace: config.drain_grace,
            drain_slack: DRAIN_SLACK,
            capacity_interval: CAPACITY_INTERVAL,
            reconnect_hint: config.reconnect_hint.clone(),
            players_capacity: shards.saturating_mul(config.max_connections),
            room_capacity: config.room_capacity as usize,
        },
        start,
    );
    let mut watchdog = Watchdog::new(shards, WATCHDOG_BOUND, start);
    loop {
        std::thread::sleep(SUPERVISOR_INTERVAL);
        let now = Instant::now();
        watch(&mut watchdog, hub, now);
        sup.handle_signals(SIGNALS.load(Ordering::Relaxed));
        while let Ok(ev) = events.try_recv() {
            match ev {
                ProcessEvent::Drain => sup.handle_drain_request(),
            }
        }
        while let Ok(r) = results_rx.try_recv() {
            results.write(&r);
        }
        let reports = hub.reports();
        let alive: Vec<bool> = (0..shards)
            .map(|i| watchdog.liveness(ShardId(i as u16)) == Liveness::Alive)
            .collect();
        sup.handle_observation(
            now,
            Observation {
                reports: &reports,
                alive: &alive,
                healthy: hub.faults().iter().all(Option::is_none),
                running: hub.shards_alive(),
            },
        );
        while let Some(action) = sup.poll_action() {
            match action {
                Action::SetDraining => {
                    info!(grace = ?config.drain_grace, "draining");
                    hub.set_draining();
                }
                Action::Broadcast(cmd) => {
                    if matches!(cmd, Command::Stop { .. }) {
                        warn!("cutting the drain short");
                    }
                    hub.broadcast(cmd);
                }
                Action::FleetReady => {
                    info!("every shard serves");
                    fleet.ready();
                }
                Action::FleetHealthy(healthy) => fleet.set_healthy(healthy),
                Action::FleetCapacity(capacity) => {
                    fleet.set_capacity(&capacity);
                    hub.set_fleet_status(fleet.status());
                }
                Action::Stop(outcome) => {
                    info!(?outcome, "stopping the shards");
                    STOP.store(true, Ordering::Relaxed);
                    results.finish();
                    return outcome != Outcome::Failed;
                }
            }
        }
    }
}

/// Feeds the shards' heartbeats to the watchdog; logs what it finds, with the shard's last
/// known state, and records it in the hub for `/healthz`.
fn watch(watchdog: &mut Watchdog, hub: &Hub, now: Instant) {
    for event in watchdog.observe(now, &hub.beats(), &hub.ended()) {
        match event {
            // A shard ends on its own only when it fails (the log has why).
            WatchEvent::Ended { shard } if !STOP.load(Ordering::Relaxed) => {
                error!(%shard, "shard stopped unexpectedly");
                hub.set_fault(shard, Some(ShardFault::Died));
            }
            WatchEvent::Ended { .. } => {}
            WatchEvent::Stalled { shard, silent_for } => {
                let report = hub.reports().get(shard.0 as usize).cloned().flatten();
                let thread = thread_state(hub.shard_tid(shard));
                match report {
                    Some(r) => error!(
                        %shard,
                        silent_ms = silent_for.as_millis() as u64,
                        %thread,
                        rooms = r.rooms.len(),
                        players = r.players,
                        connections = r.connections,
                        ticks = r.ticks.ticks,
                        drain = ?r.drain,
                        "shard stalled: no housekeeping pass; /healthz fails until it resumes"
                    ),
                    None => error!(
                        %shard,
                        silent_ms = silent_for.as_millis() as u64,
                        %thread,
                        "shard stalled before its first report; /healthz fails until it resumes"
                    ),
                }
                hub.set_fault(
                    shard,
                    Some(ShardFault::Stalled {
                        since: now - silent_for,
                    }),
                );
            }
            WatchEvent::Resumed { shard, stalled_for } => {
                warn!(%shard, stalled_ms = stalled_for.as_millis() as u64, "shard resumed");
                hub.set_fault(shard, None);
            }
        }
    }
}

/// A thread's scheduler state, for log lines about a shard that stopped: the state letter
/// and the system call it sits in, from `/proc` (426 is `io_uring_enter`).
pub(super) fn thread_state(tid: i32) -> String {
    if tid == 0 {
        return "unknown".into();
    }
    let read = |f: &str| std::fs::read_to_string(format!("/proc/self/task/{tid}/{f}"));
    // stat: "tid (comm) S ..."; the comm may hold spaces, so take what follows the last ')'.
    let state = read("stat")
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_else(|| "?".into());
    let syscall = read("syscall")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let wchan = read("wchan").unwrap_or_default();
    format!("tid {tid} state {state} syscall {syscall} wchan {wchan}")
}

/// `<data_dir>/results/<unix-time>-<pid>.jsonl`: one JSON line per ended room, opened on the
/// first result and flushed after every line.
pub(super) struct ResultsFile {
    dir: std::path::PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl ResultsFile {
    pub(super) fn new(data_dir: &std::path::Path) -> Self {
        ResultsFile {
            dir: data_dir.join("results"),
            file: None,
        }
    }

    /// The path of this process's results file.
    fn path(dir: &std::path::Path) -> std::path::PathBuf {
        static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let t = *START.get_or_init(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        dir.join(format!("{t}-{}.jsonl", std::process::id()))
    }

    pub(super) fn write(&mut self, r: &RoomResult) {
        use std::io::Write;
        let line = r.to_json().to_string();
        info!(result = %line, "room result");
        if self.file.is_none() {
            let path = Self::path(&self.dir);
            let opened = std::fs::create_dir_all(&self.dir).and_then(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
            });
            match opened {
                Ok(f) => self.file = Some(std::io::BufWriter::new(f)),
                Err(e) => {
                    error!(path = %path.display(), error = %e, "opening the results file");
                    return;
                }
            }
        }
        if let Some(f) = &mut self.file {
            if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                error!(error = %e, "writing the results file");
            }
        }
    }

    pub(super) fn finish(&mut self) {
        use std::io::Write;
        if let Some(f) = &mut self.file {
            let _ = f.flush();
            let _ = f.get_ref().sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::thread_state;

    /// The calling thread reads as running (it is reading its own `/proc` entry), with a
    /// system call field; an unknown thread id gives placeholders rather than an error.
    #[test]
    fn thread_state_reads_proc_and_tolerates_missing_threads() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let s = thread_state(tid);
        assert!(s.starts_with(&format!("tid {tid} state R syscall ")), "{s}");
        assert_eq!(thread_state(0), "unknown");
        assert_eq!(
            thread_state(i32::MAX),
            format!("tid {} state ? syscall ? wchan ", i32::MAX)
        );
    }
}
