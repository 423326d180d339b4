//! The Agones plug-in: the server reports to the SDK sidecar through the official `agones`
//! crate (gRPC).
//!
//! Agones runs an SDK sidecar next to every game server and names its gRPC port in
//! `AGONES_SDK_GRPC_PORT`. Through it the server says it is healthy and Ready, labels its
//! version, publishes its room and player capacity as Counters and a List (so allocators
//! can pick servers with room), learns from the GameServer watch when a match has been
//! allocated to it, and finally asks to be shut down. Without the variable nothing here runs.
//!
//! The crate covers every call the server makes (Ready, Health, Shutdown, SetLabel,
//! GetGameServer, WatchGameServer, and the Beta Counters and Lists); what this module adds
//! is what a production server needs around it: a thread of its own, retries, timeouts,
//! convergence of the capacity, and a status for `/status`.
//!
//! # Guarantees
//! - **Callers never wait on the network.** [`Agones`]'s methods store a wish under a mutex
//!   held only for a copy and return; the calls run on a thread of their own (`agones-sdk`,
//!   a single-threaded tokio runtime), never on a shard.
//! - **The game never notices the SDK.** A sidecar that is late, down or refusing gets
//!   retries with capped exponential backoff (100 ms doubling to 5 s), counted in
//!   [`AgonesStatus`]; an outage is logged once at warn when it starts and once at info when
//!   it ends. Every call has a deadline ([`REQUEST_TIMEOUT`]), so a sidecar that accepts and
//!   never answers stalls nothing but that call.
//! - **Health is pinged on fixed-rate deadlines**, on the SDK's Health stream, whether or not
//!   other calls fail; a stream the sidecar ended is opened again at the next ping. While the
//!   server says it is unhealthy ([`Agones::set_healthy`]: a shard stalled or died) no ping
//!   is sent, so Agones marks the GameServer Unhealthy and replaces it.
//! - **Capacity is pushed only when it changed**, latest value wins, piece by piece (a counter
//!   that landed is not sent again because the list failed).
//! - **Dropping the handle returns promptly**: the runtime's tasks are cancelled where they
//!   wait.
//!
//! # What the sidecar is asked
//! | wish | calls |
//! |---|---|
//! | start | `SetLabel(tickshard-version)` (stored as `agones.dev/sdk-tickshard-version`) |
//! | every 2 s | one message on the `Health` stream |
//! | [`Agones::ready`] | `Ready` |
//! | [`Agones::set_capacity`] | Counters `rooms` and `players`: `GetCounter`, then `UpdateCounter` capacity and count (raised capacity first, lowered capacity last, as the sidecar checks a count against the capacity it holds); List `rooms`: `GetList`, `RemoveListValue` for stale ids, `UpdateList` capacity, `AddListValue` for new ids |
//! | [`Agones::shutdown`] | `Shutdown` |
//! | always | `GetGameServer`, then `WatchGameServer`, again after it ends |
//!
//! Room ids are synchronised with Get + remove + add, as `beta.proto` asks ("Use
//! AddListValue() or RemoveListValue() for modifying the List.Values field"); the difference
//! is computed from a fresh read on every attempt, so a retry never adds a value twice.
//!
//! # Layout
//! - [`AgonesConfig`], [`Agones`] (the handle), [`Capacity`], [`AgonesStatus`],
//!   [`AgonesFleet`] (the [`Fleet`](crate::fleet::Fleet) hook over the handle).
//! - `sync`: the worker (connect, health, label, Ready, capacity, Shutdown) and the watch,
//!   two futures joined on the `agones-sdk` thread.
//! - Sans-IO pieces with their own tests: [`Retry`], [`Backoff`], [`Published`],
//!   `label_value`.
//! - [`local`]: an Agones SDK server in memory, for tests and for trying the plug-in without
//!   a cluster.

pub mod local;
mod sync;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

/// Health ping interval unless configured otherwise. Agones marks a server Unhealthy after
/// `failureThreshold` (default 3) periods of `periodSeconds` (default 5) without a ping;
/// every 2 s puts two pings in each period.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// The label set at start to the server's version (Agones stores it as
/// `agones.dev/sdk-tickshard-version`).
pub const VERSION_LABEL: &str = "tickshard-version";
/// Name of the Counter (rooms open / room capacity) and of the List (room ids).
pub const ROOMS: &str = "rooms";
/// Name of the Counter of players (connected / capacity).
pub const PLAYERS: &str = "players";
/// Longest wait for one call's answer. The sidecar is on localhost, so anything slower is a
/// sidecar in trouble.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest one connection attempt waits for the sidecar's first answer (the SDK probes
/// every 100 ms meanwhile) before the failure is counted and the attempt is made again.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(1);
/// First retry delay after a failure; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: a sidecar that starts late is noticed within this.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Shutdown attempts before giving up: with the backoff above about 16 s of trying, inside
/// Kubernetes' default 30 s termination grace period.
const SHUTDOWN_ATTEMPTS: u32 = 8;
/// Largest List capacity the sidecar accepts (`apiserver.ListMaxCapacity`).
const LIST_MAX_CAPACITY: u64 = 1000;
/// The GameServer state that means a match was allocated to this server.
const ALLOCATED: &str = "Allocated";
/// Least time between two watches: a sidecar that ends every watch at once must not make
/// the thread spin.
const WATCH_REOPEN: Duration = Duration::from_millis(500);
/// HTTP/2 keep-alive on the channel to the sidecar.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Where the SDK sidecar is and how often to ping its health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgonesConfig {
    /// The sidecar's gRPC address (`127.0.0.1:$AGONES_SDK_GRPC_PORT`).
    pub sdk_addr: SocketAddr,
    /// Time between health pings.
    pub health_interval: Duration,
}

impl AgonesConfig {
    /// The sidecar at `sdk_addr`, health pinged every [`DEFAULT_HEALTH_INTERVAL`].
    pub fn new(sdk_addr: SocketAddr) -> AgonesConfig {
        AgonesConfig {
            sdk_addr,
            health_interval: DEFAULT_HEALTH_INTERVAL,
        }
    }
}

/// What the server can host, published as Counters `rooms` and `players` and List `rooms`.
///
/// A count above its capacity is sent as the capacity (the sidecar refuses such a count),
/// and the List holds at most 1000 ids (the sidecar's limit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Rooms open.
    pub rooms: u64,
    /// Most rooms this server will open.
    pub rooms_capacity: u64,
    /// Players connected.
    pub players: u64,
    /// Most players this server will take.
    pub players_capacity: u64,
    /// Ids of the open rooms.
    pub room_ids: Vec<String>,
}

/// What the client knows of the sidecar, for logs and metrics.
#[derive(Clone, Debug, Default)]
pub struct AgonesStatus {
    /// Whether the last call got an answer from the sidecar (a success or a refusal).
    pub reachable: bool,
    /// The GameServer's `status.state` last seen (`Scheduled`, `Ready`, `Allocated`, ...).
    pub state: Option<String>,
    /// Whether that state is `Allocated`.
    pub allocated: bool,
    /// Calls answered with success.
    pub requests_ok: u64,
    /// Calls that failed: no connection, no answer in time, or a refusal.
    pub requests_failed: u64,
    /// Health pings handed to the Health stream.
    pub health_pings: u64,
    /// The last failure, as text.
    pub last_error: Option<String>,
    /// Shutdown was asked for and is settled: delivered, or given up after its attempts.
    pub shutdown_settled: bool,
}

/// The handle on the SDK client: its methods only record a wish and return.
///
/// One thread, `agones-sdk`, does the work on a single-threaded tokio runtime. Dropping the
/// handle stops and joins it.
pub struct Agones {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Agones {
    /// Starts the client thread. The first calls set the label [`VERSION_LABEL`] to
    /// `version` (fitted to the label rules) and ping health.
    pub fn start(config: AgonesConfig, version: &str) -> Agones {
        let shared = Arc::new(Shared {
            addr: config.sdk_addr,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            stop: Notify::new(),
        });
        let version = label_value(version);
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("agones-sdk".into())
                .spawn(move || sync::run(shared, config.health_interval, version))
        };
        let thread = match thread {
            Ok(handle) => Some(handle),
            Err(e) => {
                error!(error = %e, "starting the Agones SDK thread failed");
                None
            }
        };
        Agones { shared, thread }
    }

    /// Asks for the GameServer to be marked Ready; retried until the sidecar accepts it.
    pub fn ready(&self) {
        self.shared.command(|want| want.ready = true);
    }

    /// Whether the server is healthy. While it is not, health pings stop, and Agones marks the
    /// GameServer Unhealthy once its health check's failure threshold passes.
    pub fn set_healthy(&self, healthy: bool) {
        self.shared.lock().unhealthy = !healthy;
    }

    /// Publishes `capacity`. Only the latest value is kept; it is sent when it differs from
    /// what the sidecar last accepted.
    pub fn set_capacity(&self, capacity: Capacity) {
        self.shared.command(|want| want.capacity = Some(capacity));
    }

    /// Asks the sidecar to shut the GameServer down (call after draining); tried 8 times
    /// with backoff (about 16 s) before giving up. A Ready not yet delivered is dropped.
    pub fn shutdown(&self) {
        self.shared.command(|want| want.shutdown = true);
    }

    /// [`Agones::shutdown`], then waits up to `timeout` for the call to be delivered (or
    /// given up). Returns whether it settled in time. For the last moments of the process:
    /// it exits right after.
    pub fn shutdown_and_wait(&self, timeout: Duration) -> bool {
        self.shutdown();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.shared.lock().status.shutdown_settled {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Whether the GameServer was last seen `Allocated`.
    pub fn is_allocated(&self) -> bool {
        self.shared.lock().status.allocated
    }

    /// A copy of what the client knows.
    pub fn status(&self) -> AgonesStatus {
        self.shared.lock().status.clone()
    }
}

impl Drop for Agones {
    fn drop(&mut self) {
        // A stored permit: the thread sees it even if it is not waiting yet.
        self.shared.stop.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the handle and the thread share.
struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
    /// Notified on every command.
    wake: Notify,
    /// Notified once, when the handle is dropped.
    stop: Notify,
}

#[derive(Default)]
struct State {
    want: Wanted,
    status: AgonesStatus,
    /// Whether the sidecar is in an outage already logged.
    outage: bool,
    /// The server is unhealthy: health pings are withheld.
    unhealthy: bool,
}

/// Commands not yet taken by the worker.
#[derive(Default)]
struct Wanted {
    ready: bool,
    capacity: Option<Capacity>,
    shutdown: bool,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum CallError {
    /// No connection, a connection that broke, or no answer within [`REQUEST_TIMEOUT`].
    #[error("sdk unreachable: {0}")]
    Unreachable(String),
    /// The sidecar answered with an error status.
    #[error("sdk refused ({code:?}): {message}")]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
}

impl CallError {
    /// Sorts an SDK error: trouble on the way (no connection, a broken or expired one, which
    /// tonic reports as Unavailable, Cancelled or DeadlineExceeded, or as Unknown with the
    /// transport's error as its source) is unreachability; any other status is the
    /// sidecar's own answer (the Go sidecar's plain errors arrive as Unknown, without source).
    fn of(error: agones::errors::Error) -> CallError {
        use agones::errors::Error;
        use tonic::Code;
        match error {
            Error::Rpc(status) => {
                let on_the_way = matches!(
                    status.code(),
                    Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded
                ) || (status.code() == Code::Unknown
                    && std::error::Error::source(&status).is_some());
                if on_the_way {
                    CallError::Unreachable(status.message().to_owned())
                } else {
                    CallError::Refused {
                        code: status.code(),
                        message: status.message().to_owned(),
                    }
                }
            }
            other => CallError::Unreachable(other.to_string()),
        }
    }

    fn is_unreachable(&self) -> bool {
        matches!(self, CallError::Unreachable(_))
    }
}

/// A change in reachability worth a log line.
enum Transition {
    OutageStarted,
    OutageEnded,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn command(&self, f: impl FnOnce(&mut Wanted)) {
        f(&mut self.lock().want);
        self.wake.notify_one();
    }

    /// Runs one SDK call with its deadline and counts its outcome.
    async fn call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = agones::errors::Result<T>>,
    ) -> Result<T, CallError> {
        let result = match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(CallError::of(e)),
            Err(_) => Err(CallError::Unreachable(format!(
                "no answer to {what} within {REQUEST_TIMEOUT:?}"
            ))),
        };
        self.record(result.as_ref().err());
        result
    }

    /// Counts a call's outcome (`None`: it succeeded) and notices outages starting and
    /// ending.
    fn record(&self, failure: Option<&CallError>) {
        let transition = {
            let mut state = self.lock();
            let reachable = match failure {
                None => {
                    state.status.requests_ok += 1;
                    true
                }
                Some(e) => {
                    state.status.requests_failed += 1;
                    state.status.last_error = Some(e.to_string());
                    !e.is_unreachable()
                }
            };
            state.status.reachable = reachable;
            let was_out = std::mem::replace(&mut state.outage, !reachable);
            match (was_out, reachable) {
                (false, false) => Some(Transition::OutageStarted),
                (true, true) => Some(Transition::OutageEnded),
                _ => None,
            }
        };
        match (transition, failure) {
            (Some(Transition::OutageStarted), Some(e)) => {
                warn!(sdk = %self.addr, error = %e, "Agones SDK unreachable; retrying with backoff");
            }
            (Some(Transition::OutageEnded), _) => {
                info!(sdk = %self.addr, "Agones SDK reachable again")
            }
            _ => {}
        }
    }

    /// Records the GameServer state seen.
    fn observe(&self, game_server: &agones::GameServer) {
        let Some(new) = game_server.status.as_ref().map(|s| s.state.as_str()) else {
            return;
        };
        let old = {
            let mut state = self.lock();
            state.status.allocated = new == ALLOCATED;
            state.status.state.replace(new.to_owned())
        };
        if old.as_deref() != Some(new) {
            info!(
                from = old.as_deref().unwrap_or("-"),
                to = new,
                "GameServer state"
            );
        }
    }
}

/// Capped exponential backoff: [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`].
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        delay
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// A call that is retried with backoff until it lands or is cancelled.
#[derive(Debug, Default)]
struct Retry {
    /// When to try next; `None` when nothing is pending.
    due: Option<Instant>,
    backoff: Backoff,
    /// Failures since the last success.
    failures: u32,
}

impl Retry {
    /// Makes the call pending; one already pending keeps its time (and its backoff).
    fn request(&mut self, now: Instant) {
        self.due.get_or_insert(now);
    }

    fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|due| due <= now)
    }

    fn done(&mut self) {
        *self = Retry::default();
    }

    fn failed(&mut self, now: Instant) {
        self.failures += 1;
        self.due = Some(now + self.backoff.next());
    }

    /// Settles an attempt; warns on the first refusal of a streak (unreachability is the
    /// outage log's business).
    fn settle<T>(&mut self, what: &'static str, result: Result<T, CallError>) -> Option<T> {
        match result {
            Ok(value) => {
                self.done();
                Some(value)
            }
            Err(e) => {
                self.failed(Instant::now());
                if self.failures == 1 && !e.is_unreachable() {
                    warn!(call = what, error = %e, "Agones SDK refused a call; retrying with backoff");
                } else {
                    debug!(call = what, failures = self.failures, error = %e, "Agones SDK call failed");
                }
                None
            }
        }
    }
}

/// A counter's value as the sidecar holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CounterValue {
    count: u64,
    capacity: u64,
}

/// A list's value as the sidecar holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ListValue {
    capacity: u64,
    values: BTreeSet<String>,
}

/// What a [`Capacity`] becomes on the sidecar.
#[derive(Debug, PartialEq, Eq)]
struct Published {
    rooms: CounterValue,
    players: CounterValue,
    room_list: ListValue,
}

impl Published {
    fn of(capacity: &Capacity) -> Published {
        let counter = |count: u64, capacity: u64| CounterValue {
            count: count.min(capacity),
            capacity,
        };
        let mut values = BTreeSet::new();
        for id in &capacity.room_ids {
            if values.len() as u64 == LIST_MAX_CAPACITY {
                break;
            }
            values.insert(id.clone());
        }
        Published {
            rooms: counter(capacity.rooms, capacity.rooms_capacity),
            players: counter(capacity.players, capacity.players_capacity),
            room_list: ListValue {
                capacity: capacity
                    .rooms_capacity
                    .max(values.len() as u64)
                    .min(LIST_MAX_CAPACITY),
                values,
            },
        }
    }
}

/// The pieces of capacity the sidecar has accepted.
#[derive(Debug, Default)]
struct Pushed {
    rooms: Option<CounterValue>,
    players: Option<CounterValue>,
    room_list: Option<ListValue>,
}

impl Pushed {
    fn matches(&self, want: &Published) -> bool {
        self.rooms == Some(want.rooms)
            && self.players == Some(want.players)
            && self.room_list.as_ref() == Some(&want.room_list)
    }
}

/// Fits `raw` to the Kubernetes label-value rules: at most 63 characters of
/// `[A-Za-z0-9._-]`, starting and ending alphanumeric (or empty). Other characters become
/// `-`, so `0.1.0+abc` becomes `0.1.0-abc`.
fn label_value(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// The Agones SDK as the runtime's fleet hook: Ready once every shard serves, capacity once a
/// second (Counters `rooms` and `players`, List `rooms`), Shutdown after the drain. It reacts
/// to the GameServer being Allocated (a matchmaker sent players here) with a log line, and
/// shows the GameServer's state in `/status`.
pub struct AgonesFleet {
    sdk: Agones,
    was_allocated: bool,
}

impl AgonesFleet {
    /// The hook over a started SDK client.
    pub fn new(sdk: Agones) -> Self {
        AgonesFleet {
            sdk,
            was_allocated: false,
        }
    }
}

impl crate::fleet::Fleet for AgonesFleet {
    fn ready(&mut self) {
        self.sdk.ready();
    }

    fn set_healthy(&mut self, healthy: bool) {
        if !healthy {
            error!("withholding Agones health pings: a shard is stalled or dead");
        } else {
            info!("Agones health pings resume");
        }
        self.sdk.set_healthy(healthy);
    }

    fn set_capacity(&mut self, c: &crate::fleet::Capacity) {
        self.sdk.set_capacity(Capacity {
            rooms: c.rooms as u64,
            rooms_capacity: c.rooms_capacity as u64,
            players: c.players as u64,
            players_capacity: c.players_capacity as u64,
            room_ids: c.room_ids.clone(),
        });
    }

    fn shutdown(&mut self) {
        // The process exits right after: give the call a few seconds to land.
        if !self.sdk.shutdown_and_wait(Duration::from_secs(5)) {
            warn!("Agones shutdown not confirmed before exit");
        }
    }

    fn status(&mut self) -> Option<Value> {
        let st = self.sdk.status();
        if st.allocated != self.was_allocated {
            self.was_allocated = st.allocated;
            if st.allocated {
                info!("the GameServer was allocated: players are on their way");
            } else {
                info!(state = ?st.state, "the GameServer is no longer allocated");
            }
        }
        Some(json!({
            "manager": "agones",
            "state": st.state,
            "allocated": st.allocated,
            "sdk_reachable": st.reachable,
            "sdk_requests_ok": st.requests_ok,
            "sdk_requests_failed": st.requests_failed,
            "sdk_health_pings": st.health_pings,
            "sdk_last_error": st.last_error,
        }))
    }
}

#[cfg(test)]
mod tests;
