//! The idle-shard stall, reproduced on glommio alone.
//!
//! glommio 0.9.0 parked an executor with a runnable task and no timer when the thread was
//! descheduled for longer than its preemption timer (1 ms for a `Latency::Matters(1 ms)`
//! queue, the shard's tick queue) between arming that timer and running the first task
//! queue: the woken tick task never ran, and the shard slept until a datagram arrived.
//! `server/vendor/glommio/PATCHES.md` has the cause and the fix.
//!
//! This test makes the window likely: executors on every core, each with a latency-sensitive
//! queue whose task sleeps 1 ms in a loop (a thousand chances per second each), and one
//! spinning thread per core so the scheduler preempts the executors at random points. On
//! the unpatched glommio, 5 or 6 of the 8 executors stopped within 8 s in 3 runs out of 3 on
//! a 2-core machine; with the patch none stops. Set `TICKSHARD_STALL_SECS` to run longer.

#[path = "../../tests/common/contention.rs"]
mod contention;

use contention::Contention;
use glommio::{Latency, LocalExecutorBuilder, Placement, Shares};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Executors started; more than cores, as on a machine running several servers.
const EXECUTORS: usize = 8;
/// A wake-up this late means the executor stopped: each sleeps 1 ms, and even a fully
/// contended core gives every thread a slice far more often than this.
const STALL_BOUND: Duration = Duration::from_millis(500);

#[test]
fn latency_queues_keep_waking_under_cpu_contention() {
    let secs: u64 = std::env::var("TICKSHARD_STALL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let run_for = Duration::from_secs(secs);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    // Milliseconds since `start` of each executor's last wake-up.
    let last: Arc<Vec<AtomicU64>> = Arc::new((0..EXECUTORS).map(|_| AtomicU64::new(0)).collect());

    let contention = Contention::start();

    let executors: Vec<_> = (0..EXECUTORS)
        .map(|i| {
            let (last, done) = (last.clone(), done.clone());
            LocalExecutorBuilder::new(Placement::Fixed(i % cores))
                .name(&format!("stall-{i}"))
                .io_memory(512 << 10)
                .spawn(move || async move {
                    let tq = glommio::executor().create_task_queue(
                        Shares::Static(1000),
                        Latency::Matters(Duration::from_millis(1)),
                        "tick",
                    );
                    glommio::spawn_local_into(
                        async move {
                            while !done.load(Ordering::Relaxed) {
                                glommio::timer::sleep(Duration::from_millis(1)).await;
                                last[i]
                                    .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                            }
                        },
                        tq,
                    )
                    .expect("task queue exists")
                    .await;
                })
                .expect("executor starts (ulimit -l of at least 4 MiB)")
        })
        .collect();

    let mut stalled: Vec<(usize, f64)> = Vec::new();
    while start.elapsed() < run_for {
        std::thread::sleep(Duration::from_millis(50));
        let now = start.elapsed().as_millis() as u64;
        for (i, l) in last.iter().enumerate() {
            let since = now.saturating_sub(l.load(Ordering::Relaxed));
            if since > STALL_BOUND.as_millis() as u64 && !stalled.iter().any(|(s, _)| *s == i) {
                stalled.push((i, now as f64 / 1e3));
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    drop(contention);
    if stalled.is_empty() {
        for e in executors {
            e.join().unwrap();
        }
    }
    // A stalled executor would never see `done`: it is left behind and ends with the process.
    assert!(
        stalled.is_empty(),
        "executors stopped waking (executor, seconds into the run): {stalled:?}"
    );
}
