//! The `agones-sdk` thread's work: connecting, the worker (health, label, Ready, capacity,
//! Shutdown) and the GameServer watch, two futures joined on its runtime.

use super::{
    Backoff, CallError, CounterValue, ListValue, Published, Pushed, Retry, Shared, CONNECT_ATTEMPT,
    KEEP_ALIVE, PLAYERS, ROOMS, SHUTDOWN_ATTEMPTS, VERSION_LABEL, WATCH_REOPEN,
};
use agones::beta::Beta;
use agones::Sdk;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

/// The `agones-sdk` thread: connect, then the worker and the watch, until stopped.
pub(super) fn run(shared: Arc<Shared>, health_interval: Duration, version: String) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "starting the Agones SDK runtime failed");
            return;
        }
    };
    runtime.block_on(async {
        tokio::select! {
            () = shared.stop.notified() => {}
            () = async {
                let sdk = connect(&shared).await;
                let worker = Worker::new(&shared, sdk.clone(), health_interval, version);
                tokio::join!(worker.run(), watch(&shared, sdk));
            } => {}
        }
    });
    // Dropping the runtime cancels the Health stream's task where it waits.
}

/// Connects to the sidecar: done when it has answered once (GetGameServer). Failed attempts
/// are counted and retried with backoff.
async fn connect(shared: &Shared) -> Sdk {
    let host = match shared.addr {
        SocketAddr::V4(v4) => format!("http://{}", v4.ip()),
        SocketAddr::V6(v6) => format!("http://[{}]", v6.ip()),
    };
    let port = shared.addr.port();
    let mut backoff = Backoff::default();
    loop {
        let attempt = Sdk::new_with_host(Some(host.clone()), Some(port), Some(KEEP_ALIVE));
        let failure = match tokio::time::timeout(CONNECT_ATTEMPT, attempt).await {
            Ok(Ok(sdk)) => {
                shared.record(None);
                info!(sdk = %shared.addr, "connected to the Agones SDK");
                return sdk;
            }
            Ok(Err(e)) => CallError::of(e),
            Err(_) => CallError::Unreachable(format!(
                "no answer from {} within {CONNECT_ATTEMPT:?}",
                shared.addr
            )),
        };
        shared.record(Some(&failure));
        tokio::time::sleep(backoff.next()).await;
    }
}

/// The Health stream: opened on the first ping, opened again after the sidecar ended it.
struct Health {
    pings: Option<mpsc::Sender<()>>,
    failures: u32,
}

impl Health {
    fn ping(&mut self, shared: &Shared, sdk: &Sdk) {
        if shared.lock().unhealthy {
            return;
        }
        let pings = self.pings.get_or_insert_with(|| sdk.health_check());
        match pings.try_send(()) {
            Ok(()) => {
                self.failures = 0;
                shared.lock().status.health_pings += 1;
            }
            Err(e) => {
                // Closed: the stream ended (the sidecar went away); Full: it has not taken
                // the last ten pings. Either way the next ping opens a new one.
                self.pings = None;
                self.failures += 1;
                let closed = matches!(e, mpsc::error::TrySendError::Closed(_));
                if self.failures == 1 {
                    debug!(closed, "Agones Health stream lost; opening it again");
                }
            }
        }
    }
}

/// The worker: health on its deadlines, then whichever calls are due.
struct Worker<'a> {
    shared: &'a Shared,
    sdk: Sdk,
    beta: Beta,
    health_interval: Duration,
    health: Health,
    version: String,
    label: Retry,
    ready: Retry,
    capacity: Retry,
    shutdown: Retry,
    wanted: Option<Published>,
    pushed: Pushed,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Shared, sdk: Sdk, health_interval: Duration, version: String) -> Self {
        Worker {
            shared,
            beta: sdk.beta().clone(),
            sdk,
            health_interval,
            health: Health {
                pings: None,
                failures: 0,
            },
            version,
            label: Retry::default(),
            ready: Retry::default(),
            capacity: Retry::default(),
            shutdown: Retry::default(),
            wanted: None,
            pushed: Pushed::default(),
        }
    }

    async fn run(mut self) {
        let start = Instant::now();
        self.label.request(start);
        let mut next_health = start;
        loop {
            self.take_commands(Instant::now());
            if Instant::now() >= next_health {
                self.health.ping(self.shared, &self.sdk);
                // Fixed-rate deadlines; ones missed while a call hung are skipped, not
                // bunched.
                next_health += self.health_interval;
                let now = Instant::now();
                if next_health <= now {
                    next_health = now + self.health_interval;
                }
            }
            self.run_due(Instant::now()).await;
            let wake_at = [
                self.label.due,
                self.ready.due,
                self.capacity.due,
                self.shutdown.due,
            ]
            .into_iter()
            .flatten()
            .fold(next_health, Instant::min);
            tokio::select! {
                () = tokio::time::sleep_until(wake_at.into()) => {}
                () = self.shared.wake.notified() => {}
            }
        }
    }

    fn take_commands(&mut self, now: Instant) {
        let want = std::mem::take(&mut self.shared.lock().want);
        if want.shutdown {
            self.ready.done();
            self.shutdown.done();
            self.shutdown.request(now);
        } else if want.ready && self.shutdown.due.is_none() {
            self.ready.request(now);
        }
        if let Some(capacity) = want.capacity {
            let published = Published::of(&capacity);
            if self.pushed.matches(&published) {
                self.capacity.done();
            } else {
                self.capacity.request(now);
            }
            self.wanted = Some(published);
        }
    }

    async fn run_due(&mut self, now: Instant) {
        let shared = self.shared;
        if self.label.is_due(now) {
            let call = self.sdk.set_label(VERSION_LABEL, self.version.clone());
            let result = shared.call("SetLabel", call).await;
            self.label.settle("SetLabel", result);
        }
        if self.ready.is_due(now) {
            let result = shared.call("Ready", self.sdk.ready()).await;
            if self.ready.settle("Ready", result).is_some() {
                info!("told Agones the server is Ready");
            }
        }
        if self.capacity.is_due(now) {
            if let Some(want) = &self.wanted {
                let result = push_capacity(shared, &mut self.beta, &mut self.pushed, want).await;
                self.capacity.settle("publish capacity", result);
            } else {
                self.capacity.done();
            }
        }
        if self.shutdown.is_due(now) {
            let result = shared.call("Shutdown", self.sdk.shutdown()).await;
            if self.shutdown.settle("Shutdown", result).is_some() {
                info!("asked Agones to shut the server down");
                shared.lock().status.shutdown_settled = true;
            } else if self.shutdown.failures >= SHUTDOWN_ATTEMPTS {
                error!(
                    attempts = SHUTDOWN_ATTEMPTS,
                    "giving up asking Agones to shut the server down"
                );
                self.shutdown.done();
                shared.lock().status.shutdown_settled = true;
            }
        }
    }
}

/// An SDK count as the proto's int64.
fn int64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Sends the pieces of `want` the sidecar does not hold yet, noting each as it lands.
async fn push_capacity(
    shared: &Shared,
    beta: &mut Beta,
    pushed: &mut Pushed,
    want: &Published,
) -> Result<(), CallError> {
    for (name, want, pushed) in [
        (ROOMS, want.rooms, &mut pushed.rooms),
        (PLAYERS, want.players, &mut pushed.players),
    ] {
        if *pushed != Some(want) {
            set_counter(shared, beta, name, want).await?;
            *pushed = Some(want);
        }
    }
    if pushed.room_list.as_ref() != Some(&want.room_list) {
        sync_list(shared, beta, ROOMS, &want.room_list).await?;
        pushed.room_list = Some(want.room_list.clone());
    }
    Ok(())
}

/// Sets counter `name` to `want`. The sidecar checks a count against the capacity it holds,
/// so a raised capacity goes first and a lowered one last.
async fn set_counter(
    shared: &Shared,
    beta: &mut Beta,
    name: &str,
    want: CounterValue,
) -> Result<(), CallError> {
    let held = shared
        .call("GetCounter", beta.get_counter_capacity(name))
        .await?;
    let (count, capacity) = (int64(want.count), int64(want.capacity));
    if capacity >= held {
        let call = beta.set_counter_capacity(name, capacity);
        shared.call("UpdateCounter", call).await?;
        let call = beta.set_counter_count(name, count);
        shared.call("UpdateCounter", call).await?;
    } else {
        let call = beta.set_counter_count(name, count);
        shared.call("UpdateCounter", call).await?;
        let call = beta.set_counter_capacity(name, capacity);
        shared.call("UpdateCounter", call).await?;
    }
    Ok(())
}

/// Makes list `name` equal `want`: removes first, so a lowered capacity never truncates
/// values that stay, and adds last, after a raised capacity has made room.
async fn sync_list(
    shared: &Shared,
    beta: &mut Beta,
    name: &str,
    want: &ListValue,
) -> Result<(), CallError> {
    let values: BTreeSet<String> = shared
        .call("GetList", beta.get_list_values(name))
        .await?
        .into_iter()
        .collect();
    let capacity = shared.call("GetList", beta.get_list_capacity(name)).await?;
    for stale in values.difference(&want.values) {
        let call = beta.delete_list_value(name, stale);
        shared.call("RemoveListValue", call).await?;
    }
    if capacity != int64(want.capacity) {
        let call = beta.set_list_capacity(name, int64(want.capacity));
        shared.call("UpdateList", call).await?;
    }
    for missing in want.values.difference(&values) {
        let call = beta.append_list_value(name, missing);
        shared.call("AddListValue", call).await?;
    }
    Ok(())
}

/// The watch: the current GameServer, then the watch stream; again after it ends.
async fn watch(shared: &Shared, mut sdk: Sdk) {
    let mut backoff = Backoff::default();
    let mut failures = 0u32;
    loop {
        // Older sidecars send nothing when a watch opens, newer ones the current state: a
        // Get first covers both.
        let mut opened = false;
        let ended: Result<(), CallError> = async {
            let game_server = shared.call("GetGameServer", sdk.get_gameserver()).await?;
            shared.observe(&game_server);
            let mut stream = shared
                .call("WatchGameServer", sdk.watch_gameserver())
                .await?;
            opened = true;
            loop {
                match stream.message().await {
                    Ok(Some(game_server)) => shared.observe(&game_server),
                    Ok(None) => return Ok(()),
                    Err(status) => {
                        let error = CallError::of(status.into());
                        shared.record(Some(&error));
                        return Err(error);
                    }
                }
            }
        }
        .await;
        // A watch that opened and then ended starts over fast. One that cannot open, or that
        // ended in a refusal, backs off: the loop then polls GetGameServer at its pace.
        let refused = matches!(&ended, Err(e) if !e.is_unreachable());
        if opened && !refused {
            backoff.reset();
            failures = 0;
        } else {
            failures += 1;
            if failures == 1 && refused {
                if let Err(e) = &ended {
                    warn!(error = %e, "watching the GameServer failed; retrying with backoff");
                }
            }
        }
        debug!(ended = ?ended.err(), "GameServer watch ended");
        let pause = backoff.next();
        tokio::time::sleep(if opened && !refused {
            pause.max(WATCH_REOPEN)
        } else {
            pause
        })
        .await;
    }
}
