//! A client for the Agones game-server SDK, spoken over its REST gateway on localhost.
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
//!   request that hangs delays it by at most the 2 s request timeout.
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
            } else if self.shutdown.failures >= SHUTDOWN_ATTEMPTS {
                error!(
                    attempts = SHUTDOWN_ATTEMPTS,
                    "giving up asking Agones to shut the server down"
                );
                self.shutdown.done();
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
        shared.sleep(backoff.next());
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
                break ended_stream();
            }
            let mut buf = [0u8; 4096];
            match self.read_some(&mut stream, &mut buf, None) {
                Ok(0) => break ended_stream(),
                Ok(n) => pending = buf[..n].to_vec(),
                Err(e) => break e,
            }
        };
        self.shared.record(Some(&ended));
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
