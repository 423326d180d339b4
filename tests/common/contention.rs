//! CPU contention for tests of scheduling races: one spinning thread per core, so the
//! scheduler preempts everything else on the machine at arbitrary points. Shared by the
//! workspace tests (`common::contention`) and `server/tests/executor_stall.rs` (by path).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Spinning threads, one per available core, until dropped.
pub struct Contention {
    done: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Contention {
    /// Starts one spinning thread per core.
    pub fn start() -> Contention {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let done = Arc::new(AtomicBool::new(false));
        let threads = (0..cores)
            .map(|_| {
                let done = done.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                })
            })
            .collect();
        Contention { done, threads }
    }
}

impl Drop for Contention {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
