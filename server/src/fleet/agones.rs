//! A client for the Agones game-server SDK, spoken over its REST gateway on localhost.
//!
//! (Over 2,000 lines, 880 of them tests: the REST contract, its retries and its threads. The
//! official `agones` SDK crate (gRPC) is to replace it; see ARCHITECTURE.md.)
//!
//! Agones runs an SDK sidecar next to every game server and names its HTTP port in
//! `AGONES_SDK_HTTP_PORT`. Through it the server says it is healthy and Ready, publishes its
//! room and player capacity as Counters and a List (so allocators can pick servers with
//! room), learns from a watch stream when a match has been allocated to it, and finally asks
//! to be shut down. Without the variable nothing here runs and nothing changes.
//!
//! # Guarantees
//! - **Callers never wait on the network.** [`Agones`]'s methods store a wish under a mutex
//!   that the worker threads hold only for a copy or a counter update, never across I/O; the
//!   requests run on two std threads of their own, never on a shard.
//! - **The game never notices the SDK.** A sidecar that is late, down or refusing gets
//!   retries with capped exponential backoff (100 ms doubling to 5 s), counted in
//!   [`AgonesStatus`]; an outage is logged once at warn when it starts and once at info when
//!   it ends. Nothing read from the socket can panic: sizes are capped and every field is
//!   checked.
//! - **Health is pinged on fixed-rate deadlines** whether or not other requests fail; a
//!   request that hangs delays it by at most the 2 s request timeout. While the server says
//!   it is unhealthy ([`Agones::set_healthy`]: a shard stalled or died) no ping is sent, so
//!   Agones marks the GameServer Unhealthy and replaces it.
//! - **Capacity is pushed only when it changed**, latest value wins, piece by piece (a counter
//!   that landed is not sent again because the list failed).
//! - **Dropping the handle returns promptly** (within about 100 ms): every blocking socket
//!   call waits at most that long before it looks at the stop flag.
//!
//! # The REST contract
//! Checked against googleforgames/agones: `sdks/swagger/sdk.swagger.json`,
//! `sdks/swagger/beta.swagger.json`, `proto/sdk/beta/beta.proto`, the REST guide
//! (`site/content/en/docs/Guides/Client SDKs/rest.md`) and the sidecar's
//! `pkg/sdkserver/sdkserver.go`. Bodies are proto3 JSON, so int64 fields are strings.
//!
//! | call | request |
//! |---|---|
//! | Ready, Health, Shutdown | `POST /ready`, `/health`, `/shutdown`, body `{}` |
//! | SetLabel | `PUT /metadata/label` `{"key":"k","value":"v"}`; stored as `agones.dev/sdk-k` |
//! | GetGameServer | `GET /gameserver`; the state is `status.state` |
//! | WatchGameServer | `GET /watch/gameserver`: chunked, one `{"result":{GameServer}}` per line |
//! | UpdateCounter | `PATCH /v1beta1/counters/{name}` `{"count":"5","capacity":"10"}` |
//! | GetList | `GET /v1beta1/lists/{name}` → `{"name","capacity":"10","values":[..]}` |
//! | UpdateList | `PATCH /v1beta1/lists/{name}` `{"capacity":"10"}` (the mask is the body's keys) |
//! | AddListValue, RemoveListValue | `POST /v1beta1/lists/{name}:addValue` / `:removeValue` `{"value":"x"}` |
//!
//! The sidecar applies a counter's capacity before it checks the count against it, so one
//! PATCH sets both. Room ids are synchronised with Get + remove + add, as `beta.proto` asks
//! ("Use AddListValue() or RemoveListValue() for modifying the List.Values field"), rather
//! than an UpdateList that overwrites `values`; the difference is computed from a fresh read
//! on every attempt, so a retry never adds a value twice ("already exists").
//!
//! # Layout
//! - [`AgonesConfig`], [`Agones`] (the handle), [`Capacity`], [`AgonesStatus`].
//! - The worker thread: health, the version label, Ready, capacity, Shutdown.
//! - The watch thread: `GET /gameserver`, then the watch stream, reconnecting after errors.
//! - `Client`: HTTP/1.1 over `std::net::TcpStream`, one connection per request.
//! - Sans-IO pieces with their own tests: `parse_head`, `ChunkedDecoder`, `Lines`,
//!   `label_value`, `Retry`.

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// The environment variable in which Agones names the SDK sidecar's HTTP port.
pub const PORT_VAR: &str = "AGONES_SDK_HTTP_PORT";
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

/// Longest wait for a connection, a request or a complete answer. The sidecar is on
/// localhost, so anything slower is a sidecar in trouble.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a blocking socket call waits before it checks the stop flag: the bound on how
/// long dropping [`Agones`] can take.
const STOP_POLL: Duration = Duration::from_millis(100);
/// First retry delay after a failure; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: a sidecar that starts late is noticed within this.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Shutdown attempts before giving up: with the backoff above about 16 s of trying, inside
/// Kubernetes' default 30 s termination grace period.
const SHUTDOWN_ATTEMPTS: u32 = 8;
/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest response body, or watch-stream line, accepted.
const MAX_BODY: usize = 1024 * 1024;
/// Largest List capacity the sidecar accepts (`apiserver.ListMaxCapacity`).
const LIST_MAX_CAPACITY: u64 = 1000;
/// The GameServer state that means a match was allocated to this server.
const ALLOCATED: &str = "Allocated";

/// Where the SDK sidecar is and how often to ping its health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgonesConfig {
    /// The sidecar's REST address (`127.0.0.1:$AGONES_SDK_HTTP_PORT`).
    pub sdk_addr: SocketAddr,
    /// Time between health pings.
    pub health_interval: Duration,
}

impl AgonesConfig {
    /// Reads [`PORT_VAR`]: `Ok(None)` when it is unset (not running under Agones), an error
    /// naming the variable when it is set but not a port.
    pub fn from_env() -> Result<Option<AgonesConfig>, String> {
        match std::env::var(PORT_VAR) {
            Ok(value) => from_port_var(Some(&value)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(format!("{PORT_VAR} is not unicode")),
        }
    }
}

/// [`AgonesConfig::from_env`] without the process environment, for tests.
fn from_port_var(value: Option<&str>) -> Result<Option<AgonesConfig>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    match value.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(Some(AgonesConfig {
            sdk_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            health_interval: DEFAULT_HEALTH_INTERVAL,
        })),
        _ => Err(format!(
            "{PORT_VAR} must be a port number from 1 to 65535, not {value:?}"
        )),
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
    /// Whether the last request got an HTTP answer (any status).
    pub reachable: bool,
    /// The GameServer's `status.state` last seen (`Scheduled`, `Ready`, `Allocated`, ...).
    pub state: Option<String>,
    /// Whether that state is `Allocated`.
    pub allocated: bool,
    /// Requests answered with a 2xx status.
    pub requests_ok: u64,
    /// Requests that failed: no connection, no complete answer, or a refusal.
    pub requests_failed: u64,
    /// The last failure, as text.
    pub last_error: Option<String>,
    /// Shutdown was asked for and is settled: delivered, or given up after its attempts.
    pub shutdown_settled: bool,
}

/// The handle on the SDK client: its methods only record a wish and return.
///
/// Two threads do the work: `agones-sdk` (health, label, Ready, capacity, Shutdown) and
/// `agones-watch` (the GameServer state). Dropping the handle stops and joins both.
pub struct Agones {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Agones {
    /// Starts the worker threads. The first requests set the label [`VERSION_LABEL`] to
    /// `version` (fitted to the label rules) and ping health.
    pub fn start(config: AgonesConfig, version: &str) -> Agones {
        let shared = Arc::new(Shared {
            addr: config.sdk_addr,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let version = label_value(version);
        let mut threads = Vec::new();
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("agones-sdk".into())
                .spawn(move || Worker::new(&shared, config.health_interval, version).run())
        };
        let watcher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("agones-watch".into())
                .spawn(move || watch(&shared))
        };
        for spawned in [worker, watcher] {
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => error!(error = %e, "starting an Agones SDK thread failed"),
            }
        }
        Agones { shared, threads }
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

    /// [`Agones::shutdown`], then waits up to `timeout` for the request to be delivered (or
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
        {
            // Under the lock, so a thread between its stop check and its wait cannot miss it.
            let _state = self.shared.lock();
            self.shared.stop.store(true, Ordering::Relaxed);
        }
        self.shared.wake.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What the handle and the threads share.
struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
    /// Signalled on every command and on stop.
    wake: Condvar,
    stop: AtomicBool,
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
    changed: bool,
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

    fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn command(&self, f: impl FnOnce(&mut Wanted)) {
        {
            let mut state = self.lock();
            f(&mut state.want);
            state.want.changed = true;
        }
        self.wake.notify_all();
    }

    /// Counts a request's outcome (`None`: it succeeded) and notices outages starting and
    /// ending.
    fn record(&self, failure: Option<&RequestError>) {
        let transition = {
            let mut state = self.lock();
            let reachable = match failure {
                Some(RequestError::Stopped) => return,
                None => {
                    state.status.requests_ok += 1;
                    true
                }
                Some(e) => {
                    state.status.requests_failed += 1;
                    state.status.last_error = Some(e.to_string());
                    !matches!(e, RequestError::Unreachable(_))
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
    fn observe_state(&self, new: &str) {
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

    /// Waits until `deadline`, a command, or stop.
    fn wait_for_command(&self, deadline: Instant) {
        let mut state = self.lock();
        while !state.want.changed && !self.is_stopped() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .wake
                .wait_timeout(state, deadline - now)
                .map_or_else(|e| e.into_inner().0, |(guard, _)| guard);
        }
    }

    /// Sleeps for `duration` unless stopped first.
    fn sleep(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        let mut state = self.lock();
        while !self.is_stopped() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .wake
                .wait_timeout(state, deadline - now)
                .map_or_else(|e| e.into_inner().0, |(guard, _)| guard);
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// No connection, or the connection broke or went silent before a complete answer.
    #[error("sdk unreachable: {0}")]
    Unreachable(io::Error),
    /// The sidecar answered with a non-2xx status.
    #[error("sdk answered {status}: {message}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The gateway's `message`, or the start of the body.
        message: String,
    },
    /// The answer broke HTTP or JSON rules, or a size limit.
    #[error("malformed answer from the sdk: {0}")]
    Malformed(&'static str),
    /// The client is stopping.
    #[error("client stopped")]
    Stopped,
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

/// A request that is retried with backoff until it lands or is cancelled.
#[derive(Debug, Default)]
struct Retry {
    /// When to try next; `None` when nothing is pending.
    due: Option<Instant>,
    backoff: Backoff,
    /// Failures since the last success.
    failures: u32,
}

impl Retry {
    /// Makes the request pending; one already pending keeps its time (and its backoff).
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
    fn settle<T>(&mut self, what: &'static str, result: Result<T, RequestError>) -> Option<T> {
        match result {
            Ok(value) => {
                self.done();
                Some(value)
            }
            Err(RequestError::Stopped) => None,
            Err(e) => {
                self.failed(Instant::now());
                if self.failures == 1 && !matches!(e, RequestError::Unreachable(_)) {
                    warn!(request = what, error = %e, "Agones SDK refused a request; retrying with backoff");
                } else {
                    debug!(request = what, failures = self.failures, error = %e, "Agones SDK request failed");
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

/// The `agones-sdk` thread: health on its deadlines, then whichever requests are due.
struct Worker<'a> {
    shared: &'a Shared,
    client: Client<'a>,
    health_interval: Duration,
    health_failures: u32,
    version: String,
    label: Retry,
    ready: Retry,
    capacity: Retry,
    shutdown: Retry,
    wanted: Option<Published>,
    pushed: Pushed,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Shared, health_interval: Duration, version: String) -> Worker<'a> {
        Worker {
            shared,
            client: Client { shared },
            health_interval,
            health_failures: 0,
            version,
            label: Retry::default(),
            ready: Retry::default(),
            capacity: Retry::default(),
            shutdown: Retry::default(),
            wanted: None,
            pushed: Pushed::default(),
        }
    }

    fn run(mut self) {
        let start = Instant::now();
        self.label.request(start);
        let mut next_health = start;
        while !self.shared.is_stopped() {
            self.take_commands(Instant::now());
            if Instant::now() >= next_health {
                self.health();
                // Fixed-rate deadlines; ones missed while a request hung are skipped, not
                // bunched.
                next_health += self.health_interval;
                let now = Instant::now();
                if next_health <= now {
                    next_health = now + self.health_interval;
                }
            }
            self.run_due(Instant::now());
            let wake_at = [
                self.label.due,
                self.ready.due,
                self.capacity.due,
                self.shutdown.due,
            ]
            .into_iter()
            .flatten()
            .fold(next_health, Instant::min);
            self.shared.wait_for_command(wake_at);
        }
    }

    fn take_commands(&mut self, now: Instant) {
        let want = {
            let mut state = self.shared.lock();
            std::mem::take(&mut state.want)
        };
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

    fn health(&mut self) {
        if self.shared.lock().unhealthy {
            return;
        }
        match self.client.call("POST", "/health", Some(&json!({}))) {
            Ok(_) => self.health_failures = 0,
            Err(RequestError::Stopped) => {}
            Err(e) => {
                self.health_failures += 1;
                if self.health_failures == 1 && !matches!(e, RequestError::Unreachable(_)) {
                    warn!(error = %e, "Agones SDK refused a health ping");
                }
            }
        }
    }

    fn run_due(&mut self, now: Instant) {
        if self.label.is_due(now) {
            let body = json!({ "key": VERSION_LABEL, "value": self.version });
            let result = self.client.call("PUT", "/metadata/label", Some(&body));
            self.label.settle("set label", result);
        }
        if self.ready.is_due(now) {
            let result = self.client.call("POST", "/ready", Some(&json!({})));
            if self.ready.settle("ready", result).is_some() {
                info!("told Agones the server is Ready");
            }
        }
        if self.capacity.is_due(now) {
            if let Some(want) = &self.wanted {
                let result = push_capacity(&self.client, &mut self.pushed, want);
                self.capacity.settle("publish capacity", result);
            } else {
                self.capacity.done();
            }
        }
        if self.shutdown.is_due(now) {
            let result = self.client.call("POST", "/shutdown", Some(&json!({})));
            if self.shutdown.settle("shutdown", result).is_some() {
                info!("asked Agones to shut the server down");
                self.shared.lock().status.shutdown_settled = true;
            } else if self.shutdown.failures >= SHUTDOWN_ATTEMPTS {
                error!(
                    attempts = SHUTDOWN_ATTEMPTS,
                    "giving up asking Agones to shut the server down"
                );
                self.shutdown.done();
                self.shared.lock().status.shutdown_settled = true;
            }
        }
    }
}

/// Sends the pieces of `want` the sidecar does not hold yet, noting each as it lands.
fn push_capacity(
    client: &Client,
    pushed: &mut Pushed,
    want: &Published,
) -> Result<(), RequestError> {
    for (name, want, pushed) in [
        (ROOMS, want.rooms, &mut pushed.rooms),
        (PLAYERS, want.players, &mut pushed.players),
    ] {
        if *pushed != Some(want) {
            let body = json!({ "count": int64(want.count), "capacity": int64(want.capacity) });
            client.call("PATCH", &format!("/v1beta1/counters/{name}"), Some(&body))?;
            *pushed = Some(want);
        }
    }
    if pushed.room_list.as_ref() != Some(&want.room_list) {
        sync_list(client, ROOMS, &want.room_list)?;
        pushed.room_list = Some(want.room_list.clone());
    }
    Ok(())
}

/// Makes list `name` equal `want`: removes first, so a lowered capacity never truncates
/// values that stay, and adds last, after a raised capacity has made room.
fn sync_list(client: &Client, name: &str, want: &ListValue) -> Result<(), RequestError> {
    let path = format!("/v1beta1/lists/{name}");
    let current = parse_list(&client.call("GET", &path, None)?)?;
    for stale in current.values.difference(&want.values) {
        let body = json!({ "value": stale });
        client.call("POST", &format!("{path}:removeValue"), Some(&body))?;
    }
    if current.capacity != want.capacity {
        let body = json!({ "capacity": int64(want.capacity) });
        client.call("PATCH", &path, Some(&body))?;
    }
    for missing in want.values.difference(&current.values) {
        let body = json!({ "value": missing });
        client.call("POST", &format!("{path}:addValue"), Some(&body))?;
    }
    Ok(())
}

/// Reads a List answer. proto3 JSON leaves out default values, so a missing capacity is 0
/// and missing values are none; int64 may come as a string or a number.
fn parse_list(list: &Value) -> Result<ListValue, RequestError> {
    let capacity = match list.get("capacity") {
        None | Some(Value::Null) => 0,
        Some(v) => parse_int64(v).ok_or(RequestError::Malformed("list capacity"))?,
    };
    let values = match list.get("values") {
        None | Some(Value::Null) => BTreeSet::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or(RequestError::Malformed("list values"))?,
        Some(_) => return Err(RequestError::Malformed("list values")),
    };
    Ok(ListValue { capacity, values })
}

/// A non-negative int64 in proto3 JSON: a decimal string or a number.
fn parse_int64(value: &Value) -> Option<u64> {
    match value {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// A count as a proto3 JSON int64 (a string).
fn int64(value: u64) -> String {
    value.min(i64::MAX as u64).to_string()
}

/// Least time between two watch streams.
const WATCH_REOPEN: Duration = Duration::from_millis(500);

/// The `agones-watch` thread: the current state, then the watch stream; again after errors.
fn watch(shared: &Shared) {
    let client = Client { shared };
    let mut backoff = Backoff::default();
    let mut failures = 0u32;
    while !shared.is_stopped() {
        // Older sidecars send nothing when a watch opens, newer ones the current state: a
        // GET first covers both.
        let (opened, ended) = match client.call("GET", "/gameserver", None).and_then(|gs| {
            state_of(&gs)
                .map(|state| shared.observe_state(state))
                .ok_or(RequestError::Malformed("gameserver without status.state"))
        }) {
            Err(e) => (false, e),
            Ok(()) => client.stream("/watch/gameserver", |line| {
                if let Some(state) = watch_event_state(line)? {
                    shared.observe_state(&state);
                }
                Ok(())
            }),
        };
        if matches!(ended, RequestError::Stopped) {
            break;
        }
        // A watch that opened and then lost its connection starts over fast. One that cannot
        // open, or that ended in garbage or a gateway error, backs off: the loop then polls
        // GET /gameserver at the backoff's pace.
        let refused = !matches!(ended, RequestError::Unreachable(_));
        if opened && !refused {
            backoff.reset();
            failures = 0;
        } else {
            failures += 1;
            if failures == 1 && refused {
                warn!(error = %ended, "watching the GameServer failed; retrying with backoff");
            }
        }
        debug!(error = %ended, "GameServer watch ended");
        // Even a watch that ends in good order waits a moment before the next: a sidecar
        // that closes every stream at once must not make this thread spin.
        let pause = backoff.next();
        shared.sleep(if opened && !refused {
            pause.max(WATCH_REOPEN)
        } else {
            pause
        });
    }
}

/// `status.state` of a GameServer.
fn state_of(game_server: &Value) -> Option<&str> {
    game_server.get("status")?.get("state")?.as_str()
}

/// The state carried by one watch-stream line (`{"result":{GameServer}}`), `None` for a
/// blank line or one without a state; the gateway's `{"error":{..}}` becomes an error.
fn watch_event_state(line: &[u8]) -> Result<Option<String>, RequestError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let event: Value =
        serde_json::from_slice(line).map_err(|_| RequestError::Malformed("watch event"))?;
    if let Some(error) = event.get("error") {
        return Err(RequestError::Rejected {
            status: error
                .get("http_code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(0),
            message: error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("watch stream error")
                .to_owned(),
        });
    }
    Ok(event.get("result").and_then(state_of).map(str::to_owned))
}

/// HTTP/1.1 to the sidecar: one connection per request (`Connection: close`). A handful of
/// requests a second to localhost do not need pooling, and a fresh connection cannot be
/// left half-read by an earlier failure.
struct Client<'a> {
    shared: &'a Shared,
}

impl Client<'_> {
    /// One request; the JSON answer of a 2xx (`Null` when empty). Counted in the status.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, RequestError> {
        let result = self.exchange(method, path, body);
        self.shared.record(result.as_ref().err());
        result
    }

    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, RequestError> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut stream = self.send(method, path, body, deadline)?;
        let (head, rest) = self.read_head(&mut stream, deadline)?;
        let body = self.read_body(&mut stream, head.framing, &rest, deadline)?;
        if !(200..300).contains(&head.status) {
            return Err(RequestError::Rejected {
                status: head.status,
                message: rejection_message(&body),
            });
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&body).map_err(|_| RequestError::Malformed("body is not json"))
    }

    /// Opens a streaming GET and hands each line of its body to `on_line` until it ends;
    /// returns whether it opened (a 200 head) and why it ended. An idle stream is normal (no
    /// events), so only the head has a deadline.
    fn stream(
        &self,
        path: &str,
        mut on_line: impl FnMut(&[u8]) -> Result<(), RequestError>,
    ) -> (bool, RequestError) {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let opened = self
            .send("GET", path, None, deadline)
            .and_then(|mut stream| {
                let (head, rest) = self.read_head(&mut stream, deadline)?;
                if head.status != 200 {
                    let body = self
                        .read_body(&mut stream, head.framing, &rest, deadline)
                        .unwrap_or_default();
                    return Err(RequestError::Rejected {
                        status: head.status,
                        message: rejection_message(&body),
                    });
                }
                Ok((stream, head.framing, rest))
            });
        self.shared.record(opened.as_ref().err());
        let (mut stream, mut framing, rest) = match opened {
            Ok(opened) => opened,
            Err(e) => return (false, e),
        };
        let mut lines = Lines::default();
        let mut decoded = Vec::new();
        let mut pending = rest;
        let mut clean = false;
        let ended = loop {
            decoded.clear();
            let complete = match framing.feed(&pending, &mut decoded) {
                Ok(complete) => complete,
                Err(e) => break e,
            };
            if let Err(e) = lines.push(&decoded, &mut on_line) {
                break e;
            }
            if complete {
                clean = true;
                break ended_stream();
            }
            let mut buf = [0u8; 4096];
            match self.read_some(&mut stream, &mut buf, None) {
                Ok(0) => {
                    clean = true;
                    break ended_stream();
                }
                Ok(n) => pending = buf[..n].to_vec(),
                Err(e) => break e,
            }
        };
        // A stream the sidecar ended in good order is not an outage.
        if !clean {
            self.shared.record(Some(&ended));
        }
        (true, ended)
    }

    /// Connects and writes the request.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        deadline: Instant,
    ) -> Result<TcpStream, RequestError> {
        let addr = self.shared.addr;
        let mut stream = loop {
            if self.shared.is_stopped() {
                return Err(RequestError::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(
                &addr,
                left.min(STOP_POLL).max(Duration::from_millis(1)),
            ) {
                Ok(stream) => break stream,
                Err(e) if e.kind() == io::ErrorKind::TimedOut && Instant::now() < deadline => {}
                Err(e) => return Err(RequestError::Unreachable(e)),
            }
        };
        let setup = stream
            .set_read_timeout(Some(STOP_POLL))
            .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
            .and_then(|()| stream.set_nodelay(true));
        setup.map_err(RequestError::Unreachable)?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n"
        );
        let body = body.map(Value::to_string);
        if let Some(body) = &body {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body.as_deref().unwrap_or(""));
        // A request of a few hundred bytes fits the socket buffer: this write does not block.
        stream
            .write_all(request.as_bytes())
            .map_err(RequestError::Unreachable)?;
        Ok(stream)
    }

    /// Reads until the head is complete; returns it and the body bytes read with it.
    fn read_head(
        &self,
        stream: &mut TcpStream,
        deadline: Instant,
    ) -> Result<(Head, Vec<u8>), RequestError> {
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = self.read_some(stream, &mut buf, Some(deadline))?;
            if n == 0 {
                return Err(RequestError::Unreachable(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before an answer",
                )));
            }
            received.extend_from_slice(&buf[..n]);
            if let Some((head, used)) = parse_head(&received)? {
                return Ok((head, received.split_off(used)));
            }
        }
    }

    fn read_body(
        &self,
        stream: &mut TcpStream,
        mut framing: Framing,
        rest: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, RequestError> {
        let mut body = Vec::new();
        let mut complete = framing.feed(rest, &mut body)?;
        let mut buf = [0u8; 4096];
        while !complete {
            let n = self.read_some(stream, &mut buf, Some(deadline))?;
            if n == 0 {
                framing.finish()?;
                break;
            }
            complete = framing.feed(&buf[..n], &mut body)?;
            if body.len() > MAX_BODY {
                return Err(RequestError::Malformed("body too large"));
            }
        }
        Ok(body)
    }

    /// One read, waiting in [`STOP_POLL`] slices until data, end of stream, `deadline`
    /// (`None`: no deadline) or stop.
    fn read_some(
        &self,
        stream: &mut TcpStream,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> Result<usize, RequestError> {
        loop {
            match stream.read(buf) {
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.shared.is_stopped() {
                        return Err(RequestError::Stopped);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(RequestError::Unreachable(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no answer in time",
                        )));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RequestError::Unreachable(e)),
            }
        }
    }
}

fn ended_stream() -> RequestError {
    RequestError::Unreachable(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "watch stream ended",
    ))
}

/// What a refusal says: the gateway's `{"code":..,"message":..}`, else the body's start.
fn rejection_message(body: &[u8]) -> String {
    if let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) {
        if let Some(Value::String(message)) = fields.get("message") {
            return message.clone();
        }
    }
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// A response head: the status and how the body is framed.
#[derive(Debug)]
struct Head {
    status: u16,
    framing: Framing,
}

/// Parses a response head from the start of `received`: `None` until it is complete, else
/// the head and the bytes it took.
fn parse_head(received: &[u8]) -> Result<Option<(Head, usize)>, RequestError> {
    let malformed = RequestError::Malformed;
    let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if received.len() > MAX_HEAD {
            Err(malformed("response head too large"))
        } else {
            Ok(None)
        };
    };
    if end > MAX_HEAD {
        return Err(malformed("response head too large"));
    }
    let text = std::str::from_utf8(&received[..end]).map_err(|_| malformed("head not utf-8"))?;
    let mut lines = text.split("\r\n");
    let mut status_line = lines.next().unwrap_or_default().split(' ');
    if !status_line.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(malformed("not an HTTP/1 answer"));
    }
    let status = status_line
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(malformed("bad status line"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(malformed("bad header line"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| malformed("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let framing = if chunked {
        Framing::Chunked(ChunkedDecoder::default())
    } else if status == 204 || status == 304 {
        Framing::Length(0)
    } else {
        match length {
            Some(n) if n > MAX_BODY => return Err(malformed("body too large")),
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    Ok(Some((Head { status, framing }, end + 4)))
}

/// How a response body ends.
#[derive(Debug)]
enum Framing {
    /// `Content-Length`: this many bytes are still to come.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked(ChunkedDecoder),
    /// Neither: the body runs to the end of the connection.
    UntilClose,
}

impl Framing {
    /// Appends the body bytes in `input` to `out`; whether the body is complete.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool, RequestError> {
        match self {
            Framing::Length(remaining) => {
                let take = input.len().min(*remaining);
                out.extend_from_slice(&input[..take]);
                *remaining -= take;
                Ok(*remaining == 0)
            }
            Framing::Chunked(decoder) => {
                decoder.feed(input, out)?;
                Ok(decoder.is_done())
            }
            Framing::UntilClose => {
                out.extend_from_slice(input);
                Ok(false)
            }
        }
    }

    /// Checks that the connection may end here.
    fn finish(&self) -> Result<(), RequestError> {
        match self {
            Framing::UntilClose | Framing::Length(0) => Ok(()),
            _ => Err(RequestError::Unreachable(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-body",
            ))),
        }
    }
}

/// Where a [`ChunkedDecoder`] is in the chunk grammar (RFC 9112 §7.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Chunk {
    /// Reading a `size[;extensions]` line.
    #[default]
    Size,
    /// This many data bytes are still to come.
    Data(usize),
    /// Reading the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: reading trailer lines up to the empty one.
    Trailer,
    /// The body is complete.
    Done,
}

/// Decodes `Transfer-Encoding: chunked` from input split anywhere (sans-IO).
#[derive(Debug, Default)]
struct ChunkedDecoder {
    state: Chunk,
    line: Vec<u8>,
}

impl ChunkedDecoder {
    /// Longest size or trailer line accepted.
    const MAX_LINE: usize = 4096;

    fn is_done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Appends the data in `input` to `out`; bytes after the end of the body are ignored.
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), RequestError> {
        while let Some((&byte, after)) = input.split_first() {
            match &mut self.state {
                Chunk::Done => break,
                Chunk::Data(remaining) => {
                    let take = input.len().min(*remaining);
                    out.extend_from_slice(&input[..take]);
                    *remaining -= take;
                    if *remaining == 0 {
                        self.state = Chunk::DataEnd;
                    }
                    input = &input[take..];
                }
                _ => {
                    input = after;
                    if byte != b'\n' {
                        if self.line.len() == Self::MAX_LINE {
                            return Err(RequestError::Malformed("chunk line too long"));
                        }
                        self.line.push(byte);
                        continue;
                    }
                    let mut line = std::mem::take(&mut self.line);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    self.end_line(&line)?;
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, line: &[u8]) -> Result<(), RequestError> {
        self.state = match self.state {
            Chunk::Size => {
                let size = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size)
                    .ok()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .and_then(|s| usize::from_str_radix(s, 16).ok())
                    .ok_or(RequestError::Malformed("bad chunk size"))?;
                if size > MAX_BODY {
                    return Err(RequestError::Malformed("chunk too large"));
                }
                if size == 0 {
                    Chunk::Trailer
                } else {
                    Chunk::Data(size)
                }
            }
            Chunk::DataEnd if line.is_empty() => Chunk::Size,
            Chunk::DataEnd => return Err(RequestError::Malformed("chunk data overran its size")),
            Chunk::Trailer if line.is_empty() => Chunk::Done,
            Chunk::Trailer => Chunk::Trailer,
            // Not reached: `feed` ends lines only in the line states above.
            state @ (Chunk::Data(_) | Chunk::Done) => state,
        };
        Ok(())
    }
}

/// Splits a byte stream into `\n`-terminated lines (sans-IO).
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// Adds `bytes` and hands each completed line (without its `\n`) to `on_line`.
    fn push(
        &mut self,
        bytes: &[u8],
        on_line: &mut impl FnMut(&[u8]) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let mut rest = bytes;
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.is_empty() {
                on_line(&rest[..newline])?;
            } else {
                self.partial.extend_from_slice(&rest[..newline]);
                let line = std::mem::take(&mut self.partial);
                on_line(&line)?;
            }
            rest = &rest[newline + 1..];
        }
        if self.partial.len() + rest.len() > MAX_BODY {
            return Err(RequestError::Malformed("watch event too large"));
        }
        self.partial.extend_from_slice(rest);
        Ok(())
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
        // The process exits right after: give the request a few seconds to land.
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
            "sdk_last_error": st.last_error,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::TcpListener;

    /// Longest any one condition is waited for.
    const WAIT: Duration = Duration::from_secs(5);
    /// Health interval in tests: short, so pings pile up quickly.
    const HEALTH: Duration = Duration::from_millis(50);

    /// Polls `condition` until it holds, failing the test after [`WAIT`].
    fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A request the fake received.
    #[derive(Clone, Debug)]
    struct Recorded {
        at: Instant,
        method: String,
        path: String,
        body: Value,
    }

    /// The fake sidecar's GameServer and what it saw.
    #[derive(Default)]
    struct FakeState {
        requests: Vec<Recorded>,
        state: String,
        labels: BTreeMap<String, String>,
        counters: BTreeMap<String, (i64, i64)>,
        lists: BTreeMap<String, (i64, Vec<String>)>,
        /// Unreachable: new connections are closed at once, open ones (watches) cut.
        down: bool,
        /// Bumped on every GameServer change; watches send an event per bump.
        version: u64,
        watchers: usize,
    }

    struct FakeShared {
        state: Mutex<FakeState>,
        changed: Condvar,
        stop: AtomicBool,
    }

    impl FakeShared {
        fn lock(&self) -> MutexGuard<'_, FakeState> {
            self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// An in-process Agones SDK sidecar speaking the REST contract in the module docs: the
    /// same paths, methods and proto3 JSON bodies (int64 strictly as strings), the same
    /// refusals (HTTP 500 with `{"code":2,"message":..}`), a chunked watch stream that
    /// sends the current GameServer on connect and one event per change, each split over
    /// two chunks.
    struct FakeSdk {
        addr: SocketAddr,
        shared: Arc<FakeShared>,
        acceptor: Option<JoinHandle<()>>,
    }

    impl FakeSdk {
        fn start() -> FakeSdk {
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let mut state = FakeState {
                state: "Scheduled".into(),
                ..FakeState::default()
            };
            state.counters.insert(ROOMS.into(), (0, 0));
            state.counters.insert(PLAYERS.into(), (0, 0));
            state.lists.insert(ROOMS.into(), (10, Vec::new()));
            let shared = Arc::new(FakeShared {
                state: Mutex::new(state),
                changed: Condvar::new(),
                stop: AtomicBool::new(false),
            });
            let acceptor = {
                let shared = shared.clone();
                std::thread::spawn(move || accept_loop(listener, shared))
            };
            FakeSdk {
                addr,
                shared,
                acceptor: Some(acceptor),
            }
        }

        fn lock(&self) -> MutexGuard<'_, FakeState> {
            self.shared.lock()
        }

        fn set_down(&self, down: bool) {
            self.lock().down = down;
            self.shared.changed.notify_all();
        }

        fn set_state(&self, new: &str) {
            {
                let mut state = self.lock();
                state.state = new.into();
                state.version += 1;
            }
            self.shared.changed.notify_all();
        }

        fn state(&self) -> String {
            self.lock().state.clone()
        }

        fn requests_to(&self, method: &str, path: &str) -> Vec<Recorded> {
            let state = self.lock();
            let matching = state.requests.iter();
            matching
                .filter(|r| r.method == method && r.path == path)
                .cloned()
                .collect()
        }

        fn count(&self, method: &str, path: &str) -> usize {
            self.requests_to(method, path).len()
        }

        fn capacity_requests(&self) -> usize {
            let state = self.lock();
            let all = state.requests.iter();
            all.filter(|r| r.path.starts_with("/v1beta1/")).count()
        }

        fn counter(&self, name: &str) -> (i64, i64) {
            self.lock().counters[name]
        }

        fn list(&self, name: &str) -> (i64, Vec<String>) {
            let (capacity, mut values) = self.lock().lists[name].clone();
            values.sort();
            (capacity, values)
        }

        fn label(&self, key: &str) -> Option<String> {
            self.lock().labels.get(key).cloned()
        }

        fn watchers(&self) -> usize {
            self.lock().watchers
        }
    }

    impl Drop for FakeSdk {
        fn drop(&mut self) {
            self.shared.stop.store(true, Ordering::Relaxed);
            self.shared.changed.notify_all();
            if let Some(acceptor) = self.acceptor.take() {
                let _ = acceptor.join();
            }
        }
    }

    fn accept_loop(listener: TcpListener, shared: Arc<FakeShared>) {
        listener.set_nonblocking(true).expect("nonblocking");
        while !shared.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, _)) if shared.lock().down => drop(stream),
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    std::thread::spawn(move || serve(stream, &shared));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    /// Reads one request: method, path and body.
    fn read_request(stream: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let n = stream.read(&mut buf).ok().filter(|&n| n > 0)?;
            received.extend_from_slice(&buf[..n]);
        };
        let head = std::str::from_utf8(&received[..end]).ok()?.to_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next()?.split(' ');
        let (method, path) = (request_line.next()?, request_line.next()?);
        let length = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = received.split_off(end + 4);
        while body.len() < length {
            let n = stream.read(&mut buf).ok().filter(|&n| n > 0)?;
            body.extend_from_slice(&buf[..n]);
        }
        Some((method.into(), path.into(), body))
    }

    fn serve(mut stream: TcpStream, shared: &FakeShared) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let Some((method, path, body)) = read_request(&mut stream) else {
            return;
        };
        let body = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(body) => body,
                Err(_) => return respond(&mut stream, 400, &gateway_error(3, "bad json")),
            }
        };
        let (status, answer) = {
            let mut state = shared.lock();
            if state.down {
                return;
            }
            state.requests.push(Recorded {
                at: Instant::now(),
                method: method.clone(),
                path: path.clone(),
                body: body.clone(),
            });
            if (method.as_str(), path.as_str()) == ("GET", "/watch/gameserver") {
                drop(state);
                return serve_watch(stream, shared);
            }
            let before = state.version;
            let answer = route(&mut state, &method, &path, &body);
            if state.version != before {
                shared.changed.notify_all();
            }
            answer
        };
        respond(&mut stream, status, &answer);
    }

    fn respond(stream: &mut TcpStream, status: u16, body: &Value) {
        let body = body.to_string();
        let answer = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes());
    }

    /// grpc-gateway's error body; Agones' sidecar errors are gRPC Unknown (2), HTTP 500.
    fn gateway_error(code: u32, message: &str) -> Value {
        json!({ "code": code, "message": message, "details": [] })
    }

    fn refuse(message: &str) -> (u16, Value) {
        (500, gateway_error(2, message))
    }

    fn game_server(state: &FakeState) -> Value {
        let counters: serde_json::Map<String, Value> = state
            .counters
            .iter()
            .map(|(name, (count, capacity))| {
                let value = json!({ "count": count.to_string(), "capacity": capacity.to_string() });
                (name.clone(), value)
            })
            .collect();
        let lists: serde_json::Map<String, Value> = state
            .lists
            .iter()
            .map(|(name, (capacity, values))| {
                let value = json!({ "capacity": capacity.to_string(), "values": values });
                (name.clone(), value)
            })
            .collect();
        json!({
            "object_meta": { "name": "fake", "namespace": "default", "labels": state.labels },
            "status": { "state": state.state, "counters": counters, "lists": lists },
        })
    }

    /// An optional proto3 JSON int64, strictly as a string.
    fn int64_field(body: &Value, field: &str) -> Result<Option<i64>, (u16, Value)> {
        match body.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| (400, gateway_error(3, field))),
            Some(_) => Err((400, gateway_error(3, "int64 must be a JSON string"))),
        }
    }

    fn is_label_value(value: &str) -> bool {
        let alnum = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
        value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && alnum(value.chars().next())
            && alnum(value.chars().last())
    }

    fn route(state: &mut FakeState, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let ok = |value: Value| (200, value);
        match (method, path) {
            ("POST", "/ready" | "/health" | "/shutdown") if *body != json!({}) => {
                (400, gateway_error(3, "body must be {}"))
            }
            ("POST", "/ready") => {
                state.state = "Ready".into();
                state.version += 1;
                ok(json!({}))
            }
            ("POST", "/health") => ok(json!({})),
            ("POST", "/shutdown") => {
                state.state = "Shutdown".into();
                state.version += 1;
                ok(json!({}))
            }
            ("PUT", "/metadata/label") => {
                let (Some(key), Some(value)) = (body["key"].as_str(), body["value"].as_str())
                else {
                    return (400, gateway_error(3, "key and value are strings"));
                };
                if !is_label_value(value) {
                    return refuse("invalid label value");
                }
                state
                    .labels
                    .insert(format!("agones.dev/sdk-{key}"), value.into());
                state.version += 1;
                ok(json!({}))
            }
            ("GET", "/gameserver") => ok(game_server(state)),
            _ => {
                if let Some(name) = path.strip_prefix("/v1beta1/counters/") {
                    route_counter(state, method, name, body)
                } else if let Some(rest) = path.strip_prefix("/v1beta1/lists/") {
                    route_list(state, method, rest, body)
                } else {
                    (404, gateway_error(5, "Not Found"))
                }
            }
        }
    }

    fn route_counter(
        state: &mut FakeState,
        method: &str,
        name: &str,
        body: &Value,
    ) -> (u16, Value) {
        let Some(&(count, capacity)) = state.counters.get(name) else {
            return refuse(&format!("counter not found: {name}"));
        };
        let answer = |count: i64, capacity: i64| json!({ "name": name, "count": count.to_string(), "capacity": capacity.to_string() });
        match method {
            "GET" => (200, answer(count, capacity)),
            "PATCH" => {
                let fields = ["capacity", "count", "countDiff"].map(|f| int64_field(body, f));
                let [new_capacity, new_count, diff] = match fields {
                    [Ok(a), Ok(b), Ok(c)] => [a, b, c],
                    [Err(e), ..] | [_, Err(e), _] | [.., Err(e)] => return e,
                };
                if new_capacity.is_none() && new_count.is_none() && diff.unwrap_or(0) == 0 {
                    return refuse("invalid argument. Malformed CounterUpdateRequest");
                }
                // As the sidecar: capacity first, then the count checked against it.
                let capacity = new_capacity.unwrap_or(capacity);
                let count = new_count.unwrap_or(count) + diff.unwrap_or(0);
                if capacity < 0 || count < 0 || count > capacity {
                    return refuse("out of range. Count must be within range [0,Capacity]");
                }
                state.counters.insert(name.into(), (count, capacity));
                state.version += 1;
                (200, answer(count, capacity))
            }
            _ => (405, gateway_error(12, "Method Not Allowed")),
        }
    }

    fn route_list(state: &mut FakeState, method: &str, rest: &str, body: &Value) -> (u16, Value) {
        let (name, verb) = rest.split_once(':').unwrap_or((rest, ""));
        let Some((capacity, values)) = state.lists.get_mut(name) else {
            return refuse(&format!("list not found: {name}"));
        };
        match (method, verb) {
            ("GET", "") => {}
            ("PATCH", "") => {
                let new_capacity = match int64_field(body, "capacity") {
                    Ok(c) => c,
                    Err(e) => return e,
                };
                if let Some(c) = new_capacity {
                    if !(0..=1000).contains(&c) {
                        return refuse("out of range. Capacity must be within range [0,1000]");
                    }
                    *capacity = c;
                }
                if let Some(new_values) = body.get("values").and_then(Value::as_array) {
                    *values = new_values
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect();
                }
                values.truncate(usize::try_from(*capacity).unwrap_or(0));
            }
            ("POST", "addValue" | "removeValue") => {
                let Some(value) = body.get("value").and_then(Value::as_str) else {
                    return (400, gateway_error(3, "value is required"));
                };
                let at = values.iter().position(|v| v == value);
                if verb == "addValue" {
                    if values.len() as i64 >= *capacity {
                        return refuse("out of range. No available capacity");
                    }
                    if at.is_some() {
                        return refuse(&format!("already exists. Value: {value}"));
                    }
                    values.push(value.into());
                } else {
                    let Some(at) = at else {
                        return refuse(&format!("not found. Value: {value}"));
                    };
                    values.remove(at);
                }
            }
            _ => return (405, gateway_error(12, "Method Not Allowed")),
        }
        let mut answer = json!({ "name": name, "capacity": capacity.to_string() });
        // proto3 JSON leaves out an empty repeated field.
        if !values.is_empty() {
            answer["values"] = json!(values);
        }
        if method != "GET" {
            state.version += 1;
        }
        (200, answer)
    }

    /// Streams `{"result":{GameServer}}` lines, chunked, until the fake goes down or stops.
    fn serve_watch(mut stream: TcpStream, shared: &FakeShared) {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        let (mut seen, mut event) = {
            let mut state = shared.lock();
            state.watchers += 1;
            (
                state.version,
                Some(json!({ "result": game_server(&state) })),
            )
        };
        loop {
            if let Some(event) = event.take() {
                let line = format!("{event}\n");
                let (a, b) = line.split_at(line.len() / 2);
                let chunks = format!("{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n", a.len(), b.len());
                if stream.write_all(chunks.as_bytes()).is_err() {
                    break;
                }
            }
            let state = shared.lock();
            let (state, _) = shared
                .changed
                .wait_timeout_while(state, Duration::from_millis(20), |s| {
                    s.version == seen && !s.down && !shared.stop.load(Ordering::Relaxed)
                })
                .unwrap_or_else(PoisonError::into_inner);
            if state.down || shared.stop.load(Ordering::Relaxed) {
                break;
            }
            if state.version != seen {
                seen = state.version;
                event = Some(json!({ "result": game_server(&state) }));
            }
        }
        shared.lock().watchers -= 1;
        // Dropping the stream cuts the watch without a last chunk, like a dying sidecar.
    }

    fn start(fake: &FakeSdk, version: &str) -> Agones {
        let config = AgonesConfig {
            sdk_addr: fake.addr,
            health_interval: HEALTH,
        };
        Agones::start(config, version)
    }

    fn capacity(room_ids: &[&str], players: u64) -> Capacity {
        Capacity {
            rooms: room_ids.len() as u64,
            rooms_capacity: 8,
            players,
            players_capacity: 64,
            room_ids: room_ids.iter().map(|id| id.to_string()).collect(),
        }
    }

    fn ids(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| id.to_string()).collect()
    }

    /// While the server says it is unhealthy, no health ping reaches the sidecar; pings
    /// resume when it is healthy again.
    #[test]
    fn health_pings_stop_while_unhealthy() {
        let fake = FakeSdk::start();
        let agones = start(&fake, "0.1.0");
        wait_until("two health pings", || fake.count("POST", "/health") >= 2);
        agones.set_healthy(false);
        // A ping already under way may still land.
        std::thread::sleep(HEALTH);
        let before = fake.count("POST", "/health");
        std::thread::sleep(HEALTH * 6);
        assert_eq!(
            fake.count("POST", "/health"),
            before,
            "no health ping while unhealthy"
        );
        agones.set_healthy(true);
        wait_until("pings resume", || {
            fake.count("POST", "/health") >= before + 2
        });
    }

    #[test]
    fn ready_marks_ready_labels_the_version_and_pings_health() {
        let fake = FakeSdk::start();
        let agones = start(&fake, "0.1.0+dev build");
        agones.ready();
        wait_until("the sidecar holds Ready", || fake.state() == "Ready");
        wait_until("the version label is set", || {
            fake.label("agones.dev/sdk-tickshard-version").as_deref() == Some("0.1.0-dev-build")
        });
        wait_until("five health pings", || fake.count("POST", "/health") >= 5);
        wait_until("the client saw Ready", || {
            agones.status().state.as_deref() == Some("Ready")
        });

        let ready = fake.requests_to("POST", "/ready");
        assert_eq!(ready.len(), 1, "Ready is sent once when it lands");
        assert_eq!(ready[0].body, json!({}));
        let health = fake.requests_to("POST", "/health");
        assert!(health.iter().all(|r| r.body == json!({})));
        let span = health[health.len() - 1].at - health[0].at;
        let most = span.as_millis() / HEALTH.as_millis() + 2;
        assert!(
            health.len() as u128 <= most,
            "{} health pings in {span:?}: faster than the interval",
            health.len()
        );
        let status = agones.status();
        assert!(status.reachable);
        assert!(!status.allocated && !agones.is_allocated());
        assert_eq!(status.requests_failed, 0, "{:?}", status.last_error);
        assert!(status.requests_ok >= 7);
    }

    #[test]
    fn capacity_lands_as_counters_and_the_room_list_then_converges() {
        let fake = FakeSdk::start();
        let agones = start(&fake, "v1");
        agones.set_capacity(capacity(&["r1", "r2"], 5));
        wait_until("counters and list hold the first capacity", || {
            fake.counter(ROOMS) == (2, 8)
                && fake.counter(PLAYERS) == (5, 64)
                && fake.list(ROOMS) == (8, ids(&["r1", "r2"]))
        });
        let patch = fake.requests_to("PATCH", "/v1beta1/counters/rooms");
        assert_eq!(patch[0].body, json!({ "count": "2", "capacity": "8" }));

        // A room closes, another opens, players come and go: the latest value wins.
        for players in 0..=40 {
            agones.set_capacity(capacity(&["r2", "r3"], players));
        }
        wait_until("the second capacity converges", || {
            fake.counter(ROOMS) == (2, 8)
                && fake.counter(PLAYERS) == (40, 64)
                && fake.list(ROOMS) == (8, ids(&["r2", "r3"]))
        });
        assert_eq!(fake.count("POST", "/v1beta1/lists/rooms:removeValue"), 1);

        // Nothing changed: nothing is sent.
        std::thread::sleep(Duration::from_millis(100));
        let before = fake.capacity_requests();
        agones.set_capacity(capacity(&["r3", "r2"], 40));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(fake.capacity_requests(), before);
        assert_eq!(
            agones.status().requests_failed,
            0,
            "{:?}",
            agones.status().last_error
        );
    }

    #[test]
    fn watch_reports_allocation_from_the_stream() {
        let fake = FakeSdk::start();
        let agones = start(&fake, "v1");
        wait_until("the watch is open and the state known", || {
            fake.watchers() == 1 && agones.status().state.as_deref() == Some("Scheduled")
        });
        let gets = fake.count("GET", "/gameserver");
        fake.set_state("Allocated");
        wait_until("the client sees the allocation", || agones.is_allocated());
        assert_eq!(
            fake.count("GET", "/gameserver"),
            gets,
            "learnt from the stream"
        );
        let status = agones.status();
        assert_eq!(status.state.as_deref(), Some("Allocated"));
        assert!(status.allocated);
    }

    #[test]
    fn sdk_outages_cost_callers_nothing_and_requests_land_after() {
        let fake = FakeSdk::start();
        fake.set_down(true);
        let agones = start(&fake, "v1");
        let call = Instant::now();
        agones.ready();
        agones.set_capacity(capacity(&["a"], 1));
        assert!(
            call.elapsed() < Duration::from_millis(50),
            "{:?}",
            call.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
        let during = agones.status();
        assert!(!during.reachable);
        assert!(during.requests_failed > 0);
        assert!(during.last_error.is_some());
        assert!(fake.lock().requests.is_empty());

        // The sidecar comes up late: everything asked for lands.
        fake.set_down(false);
        wait_until("Ready and capacity land", || {
            fake.state() == "Ready"
                && fake.counter(ROOMS) == (1, 8)
                && fake.list(ROOMS) == (8, ids(&["a"]))
        });
        wait_until("the client is back and watching", || {
            agones.status().reachable && fake.watchers() == 1
        });

        // An outage mid-run cuts the watch; it comes back by itself.
        fake.set_down(true);
        std::thread::sleep(Duration::from_millis(50));
        let call = Instant::now();
        agones.set_capacity(capacity(&["a", "b"], 2));
        assert!(
            call.elapsed() < Duration::from_millis(50),
            "{:?}",
            call.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
        assert!(agones.status().requests_failed > during.requests_failed);
        fake.set_down(false);
        wait_until("the new capacity lands", || {
            fake.list(ROOMS) == (8, ids(&["a", "b"])) && fake.counter(PLAYERS) == (2, 64)
        });
        wait_until("the watch reconnects", || fake.watchers() == 1);
        fake.set_state("Allocated");
        wait_until("the allocation is seen", || agones.is_allocated());
    }

    #[test]
    fn shutdown_asks_the_sidecar_to_shut_down() {
        let fake = FakeSdk::start();
        let agones = start(&fake, "v1");
        assert!(
            agones.shutdown_and_wait(Duration::from_secs(5)),
            "delivered in time"
        );
        wait_until("the sidecar is shut down", || fake.state() == "Shutdown");
        let shutdown = fake.requests_to("POST", "/shutdown");
        assert_eq!(shutdown.len(), 1);
        assert_eq!(shutdown[0].body, json!({}));
        wait_until("the client saw Shutdown", || {
            agones.status().state.as_deref() == Some("Shutdown")
        });
    }

    #[test]
    fn drop_returns_promptly_while_the_sdk_is_unreachable() {
        // A listener that never accepts: connections wait in its backlog, answers never come.
        let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        // A port nobody listens on: connections are refused.
        let refused = {
            let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
            probe.local_addr().expect("addr")
        };
        // A sidecar that closes every connection at once.
        let closing = FakeSdk::start();
        closing.set_down(true);
        for sdk_addr in [silent.local_addr().expect("addr"), refused, closing.addr] {
            let config = AgonesConfig {
                sdk_addr,
                health_interval: HEALTH,
            };
            let agones = Agones::start(config, "v1");
            agones.ready();
            agones.set_capacity(capacity(&["a"], 1));
            std::thread::sleep(Duration::from_millis(300));
            let dropping = Instant::now();
            drop(agones);
            let took = dropping.elapsed();
            assert!(
                took < Duration::from_secs(1),
                "drop took {took:?} for {sdk_addr}"
            );
        }
    }

    #[test]
    fn port_variable_parses_or_names_itself() {
        assert_eq!(from_port_var(None), Ok(None));
        let config = from_port_var(Some("9358")).expect("valid").expect("set");
        assert_eq!(config.sdk_addr, "127.0.0.1:9358".parse().expect("addr"));
        assert_eq!(config.health_interval, DEFAULT_HEALTH_INTERVAL);
        for garbage in ["", "nine", "0", "65536", "-1", "93 58"] {
            let error = from_port_var(Some(garbage)).expect_err(garbage);
            assert!(error.contains(PORT_VAR), "{error}");
        }
    }

    #[test]
    fn chunked_decoder_reassembles_input_split_anywhere() {
        let wire = b"4\r\nWiki\r\n5;name=value\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\nafter";
        let mut whole = ChunkedDecoder::default();
        let mut out = Vec::new();
        whole.feed(wire, &mut out).expect("valid");
        assert!(whole.is_done());
        assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.");
        let mut bytewise = ChunkedDecoder::default();
        let mut out = Vec::new();
        for byte in wire {
            bytewise
                .feed(std::slice::from_ref(byte), &mut out)
                .expect("valid");
        }
        assert!(bytewise.is_done());
        assert_eq!(out, b"Wikipedia in\r\n\r\nchunks.");
    }

    #[test]
    fn chunked_decoder_refuses_bad_framing() {
        for wire in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"3\r\nabcd\r\n",
            b"ffffffffffffffffffff\r\n",
        ] {
            let mut decoder = ChunkedDecoder::default();
            assert!(decoder.feed(wire, &mut Vec::new()).is_err(), "{wire:?}");
        }
        let mut endless = ChunkedDecoder::default();
        let long = vec![b'1'; ChunkedDecoder::MAX_LINE + 1];
        assert!(endless.feed(&long, &mut Vec::new()).is_err());
    }

    #[test]
    fn response_heads_parse_or_fail_cleanly() {
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .expect("ok")
            .is_none());
        let (head, used) = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            .expect("ok")
            .expect("complete");
        assert_eq!((head.status, used), (200, 38));
        assert!(matches!(head.framing, Framing::Length(2)));
        let (head, _) = parse_head(b"HTTP/1.1 500 X\r\nTransfer-Encoding: chunked\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert_eq!(head.status, 500);
        assert!(matches!(head.framing, Framing::Chunked(_)));
        for garbage in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        ] {
            assert!(parse_head(garbage).is_err(), "{garbage:?}");
        }
        assert!(parse_head(&vec![b'a'; MAX_HEAD + 1]).is_err());
    }

    #[test]
    fn lines_join_across_pushes_and_stay_bounded() {
        let mut lines = Lines::default();
        let mut seen = Vec::new();
        let mut collect = |line: &[u8]| {
            seen.push(String::from_utf8_lossy(line).into_owned());
            Ok(())
        };
        lines.push(b"{\"a\"", &mut collect).expect("ok");
        lines.push(b":1}\n{\"b\":2}\n{", &mut collect).expect("ok");
        assert_eq!(seen, ["{\"a\":1}", "{\"b\":2}"]);
        let mut huge = Lines::default();
        let mut ignore = |_: &[u8]| Ok(());
        assert!(huge.push(&vec![b'x'; MAX_BODY + 1], &mut ignore).is_err());
    }

    #[test]
    fn watch_events_give_the_state_or_an_error() {
        let event = br#"{"result":{"object_meta":{"name":"gs"},"status":{"state":"Allocated"}}}"#;
        assert_eq!(
            watch_event_state(event).expect("ok").as_deref(),
            Some("Allocated")
        );
        assert_eq!(watch_event_state(b"  \r").expect("ok"), None);
        let error = br#"{"error":{"grpc_code":14,"http_code":503,"message":"gone"}}"#;
        assert!(matches!(
            watch_event_state(error),
            Err(RequestError::Rejected { status: 503, .. })
        ));
        assert!(watch_event_state(b"{not json").is_err());
    }

    #[test]
    fn label_values_follow_kubernetes_rules() {
        assert_eq!(label_value("0.1.0+dev build"), "0.1.0-dev-build");
        assert_eq!(label_value("-v1.2_"), "v1.2");
        assert_eq!(label_value("+++"), "");
        assert_eq!(label_value("ünï"), "n");
        let long = label_value(&"a".repeat(100));
        assert_eq!(long.len(), 63);
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let mut backoff = Backoff::default();
        let delays: Vec<u64> = (0..9).map(|_| backoff.next().as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.next(), BACKOFF_MIN);
    }

    #[test]
    fn published_capacity_fits_what_the_sidecar_accepts() {
        let over = Capacity {
            rooms: 9,
            rooms_capacity: 4,
            players: 3,
            players_capacity: 2,
            room_ids: (0..1200)
                .map(|i| format!("r{i}"))
                .chain(["r1".into()])
                .collect(),
        };
        let published = Published::of(&over);
        assert_eq!(
            published.rooms,
            CounterValue {
                count: 4,
                capacity: 4
            }
        );
        assert_eq!(
            published.players,
            CounterValue {
                count: 2,
                capacity: 2
            }
        );
        assert_eq!(published.room_list.values.len(), 1000);
        assert_eq!(published.room_list.capacity, 1000);
        let few = Published::of(&capacity(&["b", "a", "b"], 0));
        assert_eq!(few.room_list.capacity, 8);
        assert_eq!(few.room_list.values.len(), 2);
    }
}
