//! The admin HTTP endpoint: Prometheus metrics, health, status, and operator actions.
//!
//! (About 1,150 lines, 300 of them tests: the hub, the transport and the routes are one
//! contract between the shards and operators, read together.)
//!
//! It runs on its own thread, never on a shard executor, and never slows a tick: shards
//! publish a [`ShardReport`] into their slot of the [`Hub`] every `REPORT_INTERVAL` from
//! their housekeeping, and this thread only reads the latest one. Actions go the other way
//! through a queue per shard that the shard drains in housekeeping (every 50 ms); the reply
//! comes back on a one-shot channel, and a shard that does not answer within
//! [`ACTION_TIMEOUT`] gets the request a 503.
//!
//! HTTP/1.1 is hyper's, on a single-threaded tokio runtime of the admin thread (at nice 10,
//! never on a shard core): one request per connection, strict limits ([`MAX_HEADER`],
//! [`MAX_BODY`], [`IO_TIMEOUT`] for the head and for the body, [`CONNECTION_LIFETIME`],
//! [`MAX_CONNECTIONS`] at once). Requests are answered on a few handler threads, since an
//! action waits for its shard. Slow or idle clients each hold one cheap task until their
//! timeout, so the probes stay answerable while they do (test
//! `probes_answer_while_slow_clients_hold_connections`); one source address holds at most
//! [`MAX_PER_ADDRESS`] of them. Where many hosts may reach the admin port, `--probe` opens a
//! second listener that answers only `/healthz` and `/readyz` with capacity of its own, for
//! the orchestrator's probes (test `the_probe_listener_answers_while_the_admin_port_is_full`).
//!
//! # Endpoints
//! - `GET /metrics` (OpenMetrics text, [`crate::ops::metrics`]), `GET /healthz`, `GET /readyz`, `GET /status`,
//!   `GET /rooms?shard=N&mode=M&min_free=K`;
//! - `POST /rooms/{id}/close` (`{"reason": "..."}` optional), `POST /players/{id}/kick`
//!   (`{"reason": "..."}`), `POST /shards/{n}/drain`, `POST /drain`.
//!
//! With a token configured, every endpoint but `/healthz` and `/readyz` (probes) needs
//! `Authorization: Bearer TOKEN`. Errors are JSON: `{"error": "..."}`.

use crate::ids::{PlayerId, RoomId, ShardId};
use crate::ops::metrics;
use crate::shard::operator::{Command, CommandError, DrainState, ShardReport};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

/// Largest request head (request line and headers).
pub const MAX_HEADER: usize = 8 * 1024;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// How long an admin client has for its request head, and then for its body.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an action waits for its shard (which answers within one housekeeping pass,
/// 50 ms, unless it is stuck).
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(2);
/// A shard whose last report is older than this is not ready (reports come every 250 ms).
pub const REPORT_STALE: Duration = Duration::from_secs(3);

/// Something for the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessEvent {
    /// `POST /drain`: drain the process.
    Drain,
}

/// A command for a shard with where to send the outcome.
pub struct Envelope {
    /// The command.
    pub cmd: Command,
    /// Where the outcome goes (a one-shot channel), if anyone waits for it.
    pub reply: Option<mpsc::SyncSender<Result<(), CommandError>>>,
}

struct Slot {
    report: Option<Arc<ShardReport>>,
    at: Option<Instant>,
}

/// What the supervisor's watchdog found wrong with a shard; `/healthz` fails while any shard
/// has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardFault {
    /// No housekeeping pass since this instant, for longer than the watchdog's bound.
    Stalled {
        /// The shard's last pass.
        since: Instant,
    },
    /// The shard's task ended while the process was not stopping (a panic or a failed
    /// socket; the log says which).
    Died,
}

/// One shard's liveness signals: a heartbeat stamped by the shard, whether its task has
/// ended, its thread id, and the fault the supervisor found.
struct Life {
    /// Nanoseconds from `Hub::started` to the last housekeeping pass, plus one (0: none yet).
    beat: AtomicU64,
    ended: AtomicBool,
    tid: AtomicI32,
    fault: Mutex<Option<ShardFault>>,
}

/// What shards, the supervisor and the admin thread share: a report slot, a command queue
/// and liveness signals per shard, the supervisor's event queue, and a few process flags.
pub struct Hub {
    slots: Vec<Mutex<Slot>>,
    lives: Vec<Life>,
    commands: Vec<mpsc::Sender<Envelope>>,
    events: mpsc::Sender<ProcessEvent>,
    token: Option<String>,
    draining: AtomicBool,
    stop: AtomicBool,
    started: Instant,
    fleet: Mutex<Option<Value>>,
}

/// Marks a shard as running while it lives (and as ended once dropped, even by a panic).
pub struct AliveGuard(Arc<Hub>, ShardId);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        if let Some(l) = self.0.lives.get(self.1 .0 as usize) {
            l.ended.store(true, Ordering::Release);
        }
    }
}

impl Hub {
    /// A hub for `shards` shards with their command queues.
    pub fn new(
        shards: usize,
        commands: Vec<mpsc::Sender<Envelope>>,
        events: mpsc::Sender<ProcessEvent>,
        token: Option<String>,
    ) -> Self {
        Hub {
            slots: (0..shards)
                .map(|_| {
                    Mutex::new(Slot {
                        report: None,
                        at: None,
                    })
                })
                .collect(),
            lives: (0..shards)
                .map(|_| Life {
                    beat: AtomicU64::new(0),
                    ended: AtomicBool::new(false),
                    tid: AtomicI32::new(0),
                    fault: Mutex::new(None),
                })
                .collect(),
            commands,
            events,
            token: token.filter(|t| !t.is_empty()),
            draining: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            started: Instant::now(),
            fleet: Mutex::new(None),
        }
    }

    /// What the fleet manager says of this server (Agones: state, allocated, reachable),
    /// shown in `/status` and `/metrics`.
    pub fn set_fleet_status(&self, v: Option<Value>) {
        *self.fleet.lock().unwrap_or_else(|e| e.into_inner()) = v;
    }

    fn fleet_status(&self) -> Option<Value> {
        self.fleet.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Called by a shard on its own thread as it starts; the guard counts it as running until
    /// dropped. The thread id goes into the watchdog's log lines.
    pub fn shard_started(self: &Arc<Self>, shard: ShardId) -> AliveGuard {
        if let Some(l) = self.lives.get(shard.0 as usize) {
            // SAFETY: gettid has no preconditions.
            l.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
        }
        AliveGuard(self.clone(), shard)
    }

    /// A shard's housekeeping pass ran at `now` (one relaxed store every 50 ms per shard).
    pub fn beat(&self, shard: ShardId, now: Instant) {
        if let Some(l) = self.lives.get(shard.0 as usize) {
            let ns = now.saturating_duration_since(self.started).as_nanos() as u64;
            l.beat.store(ns.saturating_add(1), Ordering::Relaxed);
        }
    }

    /// Each shard's last housekeeping pass, if any.
    pub fn beats(&self) -> Vec<Option<Instant>> {
        self.lives
            .iter()
            .map(|l| match l.beat.load(Ordering::Relaxed) {
                0 => None,
                ns => Some(self.started + Duration::from_nanos(ns - 1)),
            })
            .collect()
    }

    /// Whether each shard's task has ended.
    pub fn ended(&self) -> Vec<bool> {
        self.lives
            .iter()
            .map(|l| l.ended.load(Ordering::Acquire))
            .collect()
    }

    /// The OS thread id of a shard (0 before it started).
    pub fn shard_tid(&self, shard: ShardId) -> i32 {
        self.lives
            .get(shard.0 as usize)
            .map_or(0, |l| l.tid.load(Ordering::Relaxed))
    }

    /// Records what the watchdog found wrong with a shard (`None`: nothing any more).
    pub fn set_fault(&self, shard: ShardId, fault: Option<ShardFault>) {
        if let Some(l) = self.lives.get(shard.0 as usize) {
            *l.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
        }
    }

    /// Each shard's fault, if any.
    pub fn faults(&self) -> Vec<Option<ShardFault>> {
        self.lives
            .iter()
            .map(|l| *l.fault.lock().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// Shards still running.
    pub fn shards_alive(&self) -> usize {
        self.ended().iter().filter(|e| !**e).count()
    }

    /// Stores a shard's latest report.
    pub fn publish(&self, shard: ShardId, report: ShardReport) {
        if let Some(slot) = self.slots.get(shard.0 as usize) {
            let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
            s.report = Some(Arc::new(report));
            s.at = Some(Instant::now());
        }
    }

    /// Every shard's latest report.
    pub fn reports(&self) -> Vec<Option<Arc<ShardReport>>> {
        self.slots
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).report.clone())
            .collect()
    }

    fn report_ages(&self) -> Vec<Option<Duration>> {
        self.slots
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .at
                    .map(|t| t.elapsed())
            })
            .collect()
    }

    /// The process is draining.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the process is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Sends `cmd` to every shard without waiting.
    pub fn broadcast(&self, cmd: Command) {
        for tx in &self.commands {
            let _ = tx.send(Envelope {
                cmd: cmd.clone(),
                reply: None,
            });
        }
    }

    /// Sends `cmd` to `shard` and waits for the outcome; `None` if the shard did not answer.
    pub fn ask(&self, shard: usize, cmd: Command) -> Option<Result<(), CommandError>> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.commands
            .get(shard)?
            .send(Envelope {
                cmd,
                reply: Some(tx),
            })
            .ok()?;
        rx.recv_timeout(ACTION_TIMEOUT).ok()
    }

    /// Asks the admin thread to stop.
    pub fn stop_admin(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Admin connections served at once; more get a 503 at once. Each connection lives at most
/// [`CONNECTION_LIFETIME`], so slow or idle clients cannot hold the house for long.
pub const MAX_CONNECTIONS: usize = 512;
/// Admin connections one source address may hold at once; more from it get a 503 at once, so
/// one host cannot fill the house.
pub const MAX_PER_ADDRESS: usize = 128;
/// Connections the probe listener (`--probe`) serves at once, and per source address.
pub const PROBE_CONNECTIONS: usize = 256;
/// Probe connections one source address may hold at once.
pub const PROBE_PER_ADDRESS: usize = 32;
/// Longest a probe connection may live: a probe asks one small question.
pub const PROBE_LIFETIME: Duration = Duration::from_secs(2);
/// Longest an admin connection may live: its request head, body and answer.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);
/// Threads that carry out requests (an action waits up to [`ACTION_TIMEOUT`] for its shard).
const HANDLER_THREADS: usize = 8;

/// Starts the admin thread on `listener`: a single-threaded tokio runtime serving HTTP/1.1
/// through hyper, with [`HANDLER_THREADS`] threads for the requests themselves.
pub fn spawn(listener: TcpListener, hub: Arc<Hub>) -> std::thread::JoinHandle<()> {
    spawn_with_probe(Some(listener), None, hub)
}

/// [`spawn`], with a second listener that answers only `/healthz` and `/readyz`: capacity of
/// its own ([`PROBE_CONNECTIONS`], [`PROBE_LIFETIME`]), so however many clients hold the admin
/// port, the orchestrator's probes are answered.
pub fn spawn_with_probe(
    admin: Option<TcpListener>,
    probe: Option<TcpListener>,
    hub: Arc<Hub>,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || run(admin, probe, hub))
        .expect("spawning the admin thread")
}

/// Pending connections the kernel queues for an admin or probe listener before it drops SYNs
/// (std's default is 128): a burst of clients must not keep a probe out of the queue.
const LISTEN_BACKLOG: i32 = 1024;

/// Binds an admin or probe listener on `addr` with a deep accept queue
/// ([`LISTEN_BACKLOG`]).
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// What a listener serves, and with how much.
#[derive(Clone, Copy)]
struct Lane {
    /// Only `/healthz` and `/readyz`.
    probes_only: bool,
    connections: usize,
    per_address: usize,
    lifetime: Duration,
}

const ADMIN_LANE: Lane = Lane {
    probes_only: false,
    connections: MAX_CONNECTIONS,
    per_address: MAX_PER_ADDRESS,
    lifetime: CONNECTION_LIFETIME,
};

const PROBE_LANE: Lane = Lane {
    probes_only: true,
    connections: PROBE_CONNECTIONS,
    per_address: PROBE_PER_ADDRESS,
    lifetime: PROBE_LIFETIME,
};

/// Connections held per source address on one listener; a [`Held`] gives its place back.
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection's place in its address's count.
struct Held(Arc<PerAddress>, std::net::IpAddr);

impl PerAddress {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr, most: usize) -> Option<Held> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(ip).or_insert(0);
        if *n >= most {
            return None;
        }
        *n += 1;
        Some(Held(self.clone(), ip))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.1);
            }
        }
    }
}

/// Lowers the calling thread's scheduling priority (nice 10): where every core runs a shard,
/// admin work takes what the shards leave rather than preempting them.
fn yield_to_shards() {
    // SAFETY: setpriority on the calling thread (on Linux, `who` 0 is this thread).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

fn run(admin: Option<TcpListener>, probe: Option<TcpListener>, hub: Arc<Hub>) {
    yield_to_shards();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(HANDLER_THREADS)
        .thread_name("admin-handler")
        .on_thread_start(yield_to_shards)
        .build();
    match rt {
        Ok(rt) => rt.block_on(async {
            let probes = async {
                if let Some(l) = probe {
                    serve(l, hub.clone(), PROBE_LANE).await;
                }
            };
            let admin = async {
                if let Some(l) = admin {
                    serve(l, hub.clone(), ADMIN_LANE).await;
                }
            };
            tokio::join!(admin, probes);
        }),
        Err(e) => warn!(error = %e, "admin runtime; the admin endpoint is off"),
    }
}

async fn serve(listener: TcpListener, hub: Arc<Hub>, lane: Lane) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => return warn!(error = %e, "admin listener; the admin endpoint is off"),
    };
    let house = Arc::new(tokio::sync::Semaphore::new(lane.connections));
    let per_address = Arc::new(PerAddress::default());
    let mut stop = tokio::time::interval(Duration::from_millis(100));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.tick() => {
                if hub.stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "admin accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // A full house, or a host that holds its share: say so without reading the request
        // (the socket's buffer takes these few bytes at once, or the client gets a reset).
        let Some(held) = per_address.take(peer.ip(), lane.per_address) else {
            let _ = stream.try_write(FULL_HOUSE);
            continue;
        };
        let Ok(seat) = house.clone().try_acquire_owned() else {
            let _ = stream.try_write(FULL_HOUSE);
            continue;
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, hub.clone(), lane.probes_only));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IO_TIMEOUT)
                .max_buf_size(MAX_HEADER.max(8192))
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(lane.lifetime, connection).await {
                debug!(error = %e, "admin connection");
            }
            drop((seat, held));
        });
    }
}

const FULL_HOUSE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Reads one request's body within the limits and answers it on a handler thread.
async fn answer(
    req: hyper::Request<Incoming>,
    hub: Arc<Hub>,
    probes_only: bool,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    if probes_only && !matches!(req.uri().path(), "/healthz" | "/readyz") {
        return Ok(reply(Response::error(
            404,
            "this listener answers /healthz and /readyz only",
        )));
    }
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(IO_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            return Ok(reply(Response::error(413, "request body exceeds 64 KiB")))
        }
        Ok(Err(_)) => return Ok(reply(Response::error(400, "incomplete body"))),
        Err(_) => return Ok(reply(Response::error(408, "request too slow"))),
    };
    let bearer = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let request = Request {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or("").to_string(),
        bearer,
        body: body.to_vec(),
    };
    let response = tokio::task::spawn_blocking(move || route(&request, &hub))
        .await
        .unwrap_or_else(|_| Response::error(500, "the request failed"));
    Ok(reply(response))
}

fn reply(r: Response) -> hyper::Response<Full<Bytes>> {
    let mut out = hyper::Response::new(Full::new(Bytes::from(r.body)));
    *out.status_mut() =
        hyper::StatusCode::from_u16(r.status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    out.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(r.content_type),
    );
    out
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Query string (after `?`), possibly empty.
    pub query: String,
    /// The bearer token, if any.
    pub bearer: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// An HTTP response.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    fn json(status: u16, v: Value) -> Self {
        Response {
            status,
            content_type: "application/json",
            body: v.to_string(),
        }
    }
    fn error(status: u16, msg: impl Into<String>) -> Self {
        Self::json(status, json!({ "error": msg.into() }))
    }
}

/// Answers one request.
pub fn route(req: &Request, hub: &Hub) -> Response {
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let get = req.method == "GET";
    let post = req.method == "POST";
    // (allowed method, handler) by path shape; None: unknown path.
    let allowed = match segments.as_slice() {
        ["metrics"] | ["healthz"] | ["readyz"] | ["status"] | ["rooms"] => "GET",
        ["rooms", _, "close"] | ["players", _, "kick"] | ["shards", _, "drain"] | ["drain"] => {
            "POST"
        }
        _ => return Response::error(404, format!("no such endpoint: {}", req.path)),
    };
    if (allowed == "GET" && !get) || (allowed == "POST" && !post) {
        return Response::error(405, format!("{} needs {allowed}", req.path));
    }
    let probe = matches!(segments.as_slice(), ["healthz"] | ["readyz"]);
    if let Some(token) = &hub.token {
        // Compared in constant time: how long a wrong token takes says nothing of the right one.
        let good = req
            .bearer
            .as_deref()
            .is_some_and(|b| bool::from(b.as_bytes().ct_eq(token.as_bytes())));
        if !probe && !good {
            return Response::error(401, "missing or wrong bearer token");
        }
    }
    match segments.as_slice() {
        ["healthz"] => healthz(hub),
        ["readyz"] => readyz(hub),
        ["metrics"] => Response {
            status: 200,
            content_type: metrics::CONTENT_TYPE,
            body: metrics::render_metrics(&hub.reports(), hub.started.elapsed(), hub.is_draining()),
        },
        ["status"] => Response::json(200, status(hub)),
        ["rooms"] => rooms(hub, &req.query),
        ["rooms", id, "close"] => {
            let Ok(id) = id.parse::<u64>() else {
                return Response::error(400, "room id must be a number");
            };
            let reason = match body_reason(&req.body, "closed by an operator") {
                Ok(r) => r,
                Err(r) => return r,
            };
            let room = RoomId(id);
            act(
                hub,
                room.shard().0 as usize,
                Command::CloseRoom { room, reason },
                "no such room",
            )
        }
        ["players", id, "kick"] => {
            let Ok(id) = id.parse::<u64>() else {
                return Response::error(400, "player id must be a number");
            };
            let reason = match body_reason(&req.body, "kicked by an operator") {
                Ok(r) => r,
                Err(r) => return r,
            };
            let player = PlayerId(id);
            act(
                hub,
                player.shard().0 as usize,
                Command::Kick { player, reason },
                "no such player",
            )
        }
        ["shards", n, "drain"] => {
            let Ok(n) = n.parse::<usize>() else {
                return Response::error(400, "shard must be a number");
            };
            act(hub, n, Command::DrainShard, "no such shard")
        }
        ["drain"] => {
            let _ = hub.events.send(ProcessEvent::Drain);
            Response::json(202, json!({"ok": true, "draining": true}))
        }
        _ => Response::error(404, format!("no such endpoint: {}", req.path)),
    }
}

/// The `reason` of a JSON body, or `default` for an empty body.
fn body_reason(body: &[u8], default: &str) -> Result<String, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(default.to_string());
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("bad JSON body: {e}")))?;
    match v.get("reason") {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) if s.len() <= tickshard_schema::MAX_SHORT_STRING => Ok(s.clone()),
        Some(Value::String(_)) => Err(Response::error(400, "reason is too long (256 bytes)")),
        Some(_) => Err(Response::error(400, "reason must be a string")),
    }
}

fn act(hub: &Hub, shard: usize, cmd: Command, not_found: &str) -> Response {
    if shard >= hub.commands.len() {
        return Response::error(404, not_found);
    }
    match hub.ask(shard, cmd) {
        Some(Ok(())) => Response::json(200, json!({"ok": true})),
        Some(Err(e)) => Response::error(404, e.to_string()),
        None => Response::error(503, format!("shard {shard} did not answer")),
    }
}

/// Liveness: fails while a shard is stalled or has died, since such a process serves some of
/// its players no more and only a restart mends it.
fn healthz(hub: &Hub) -> Response {
    for (i, f) in hub.faults().iter().enumerate() {
        match f {
            Some(ShardFault::Stalled { since }) => {
                return Response::error(
                    503,
                    format!(
                        "shard {i} stalled: no housekeeping pass for {:.1} s",
                        since.elapsed().as_secs_f64()
                    ),
                )
            }
            Some(ShardFault::Died) => {
                return Response::error(503, format!("shard {i} stopped unexpectedly"))
            }
            None => {}
        }
    }
    Response::json(200, json!({"status": "alive"}))
}

fn readyz(hub: &Hub) -> Response {
    if hub.is_draining() {
        return Response::error(503, "draining");
    }
    let reports = hub.reports();
    for (i, (r, age)) in reports.iter().zip(hub.report_ages()).enumerate() {
        match (r, age) {
            (Some(r), Some(age)) if age <= REPORT_STALE && r.drain != DrainState::Stopped => {}
            (None, _) => return Response::error(503, format!("shard {i} has not started")),
            _ => return Response::error(503, format!("shard {i} is not running")),
        }
    }
    Response::json(200, json!({"status": "ready"}))
}

fn status(hub: &Hub) -> Value {
    let reports = hub.reports();
    let ages = hub.report_ages();
    let beats = hub.beats();
    let faults = hub.faults();
    let liveness = |i: usize| {
        json!({
            "housekeeping_age_seconds": beats.get(i).copied().flatten()
                .map(|b| b.elapsed().as_secs_f64()),
            "fault": match faults.get(i).copied().flatten() {
                None => Value::Null,
                Some(ShardFault::Stalled { .. }) => json!("stalled"),
                Some(ShardFault::Died) => json!("died"),
            },
        })
    };
    let shards: Vec<Value> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| match r {
            None => json!({"id": i, "running": false, "liveness": liveness(i)}),
            Some(r) => json!({
                "id": i,
                // A shard that stopped reporting (it died) is not running, whatever it said.
                "running": r.drain != DrainState::Stopped
                    && ages.get(i).copied().flatten().is_some_and(|a| a <= REPORT_STALE),
                "rooms": r.rooms.len(),
                "players": r.players,
                "connections": r.connections,
                "tick_p50_us": r.ticks.duration_us.value_at_quantile(0.5),
                "tick_p99_us": r.ticks.duration_us.value_at_quantile(0.99),
                "lateness_p99_us": r.ticks.lateness_us.value_at_quantile(0.99),
                "overruns": r.ticks.overruns,
                "ticks": r.ticks.ticks,
                "cpu_seconds": r.cpu_seconds,
                "draining": r.drain.is_draining(),
                "liveness": liveness(i),
            }),
        })
        .collect();
    json!({
        "process": {
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": hub.started.elapsed().as_secs_f64(),
            "draining": hub.is_draining(),
            "shards": reports.len(),
            "pid": std::process::id(),
            "fleet": hub.fleet_status(),
        },
        "shards": shards,
        "rooms": room_list(&reports, |_, _| true),
    })
}

fn room_list(
    reports: &[Option<Arc<ShardReport>>],
    keep: impl Fn(usize, &crate::shard::RoomInfo) -> bool,
) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, r) in reports.iter().enumerate() {
        let Some(r) = r else { continue };
        for room in r.rooms.iter().filter(|room| keep(i, room)) {
            out.push(json!({
                "id": room.id.0,
                "shard": i,
                "mode": room.mode,
                "players": room.players,
                "capacity": room.capacity,
                "tick": room.tick.0,
                "age_seconds": room.age.as_secs_f64(),
            }));
        }
    }
    out
}

fn rooms(hub: &Hub, query: &str) -> Response {
    let mut shard: Option<usize> = None;
    let mut mode: Option<String> = None;
    let mut min_free: usize = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "shard" => match v.parse() {
                Ok(n) => shard = Some(n),
                Err(_) => return Response::error(400, "shard must be a number"),
            },
            "mode" => mode = Some(v.to_string()),
            "min_free" => match v.parse() {
                Ok(n) => min_free = n,
                Err(_) => return Response::error(400, "min_free must be a number"),
            },
            _ => return Response::error(400, format!("unknown filter: {k}")),
        }
    }
    let list = room_list(&hub.reports(), |i, room| {
        shard.is_none_or(|s| s == i)
            && mode.as_deref().is_none_or(|m| m == room.mode)
            && (room.capacity as usize).saturating_sub(room.players) >= min_free
    });
    Response::json(200, json!({ "rooms": list }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> (Hub, mpsc::Receiver<Envelope>) {
        let (tx, rx) = mpsc::channel();
        let (etx, _erx) = mpsc::channel();
        (Hub::new(1, vec![tx], etx, Some("t".into())), rx)
    }

    fn req(method: &str, path: &str, token: Option<&str>, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            bearer: token.map(str::to_string),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn bad_requests_get_4xx_with_a_message() {
        let (hub, _rx) = hub();
        for (r, status) in [
            (req("GET", "/status", None, ""), 401),
            (req("GET", "/status", Some("x"), ""), 401),
            (req("GET", "/nope", Some("t"), ""), 404),
            (req("POST", "/status", Some("t"), ""), 405),
            (req("GET", "/drain", Some("t"), ""), 405),
            (req("POST", "/players/abc/kick", Some("t"), ""), 400),
            (req("POST", "/players/1/kick", Some("t"), "{not json"), 400),
            (
                req("POST", "/players/1/kick", Some("t"), "{\"reason\": 5}"),
                400,
            ),
            (req("POST", "/shards/7/drain", Some("t"), ""), 404),
        ] {
            let resp = route(&r, &hub);
            assert_eq!(resp.status, status, "{r:?}: {}", resp.body);
            let v: Value = serde_json::from_str(&resp.body).unwrap();
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        // Probes need no token.
        assert_eq!(route(&req("GET", "/healthz", None, ""), &hub).status, 200);
        assert_eq!(route(&req("GET", "/readyz", None, ""), &hub).status, 503);
    }

    /// `/healthz` answers 200 until the watchdog records a fault, then 503 naming the shard
    /// and the fault, and 200 again once the fault is cleared; `/status` shows the fault.
    #[test]
    fn healthz_fails_while_a_shard_is_stalled_or_dead() {
        let (tx0, _rx0) = mpsc::channel();
        let (tx1, _rx1) = mpsc::channel();
        let (etx, _erx) = mpsc::channel();
        let hub = Hub::new(2, vec![tx0, tx1], etx, None);
        let health = |hub: &Hub| route(&req("GET", "/healthz", None, ""), hub);
        hub.beat(ShardId(0), Instant::now());
        assert_eq!(health(&hub).status, 200);

        let since = Instant::now() - Duration::from_millis(2500);
        hub.set_fault(ShardId(1), Some(ShardFault::Stalled { since }));
        let r = health(&hub);
        assert_eq!(r.status, 503);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        let e = v["error"].as_str().unwrap();
        assert!(
            e.starts_with("shard 1 stalled: no housekeeping pass for 2."),
            "{e}"
        );
        let st: Value =
            serde_json::from_str(&route(&req("GET", "/status", None, ""), &hub).body).unwrap();
        assert_eq!(st["shards"][1]["liveness"]["fault"], "stalled");
        assert_eq!(st["shards"][0]["liveness"]["fault"], Value::Null);
        assert!(st["shards"][0]["liveness"]["housekeeping_age_seconds"]
            .as_f64()
            .is_some_and(|a| a < 1.0));

        hub.set_fault(ShardId(1), None);
        assert_eq!(health(&hub).status, 200);
        hub.set_fault(ShardId(0), Some(ShardFault::Died));
        let r = health(&hub);
        assert_eq!(r.status, 503);
        assert!(
            r.body.contains("shard 0 stopped unexpectedly"),
            "{}",
            r.body
        );
    }

    /// Starts the admin server on a free loopback port.
    fn serve_hub(hub: Hub) -> (Arc<Hub>, std::net::SocketAddr, std::thread::JoinHandle<()>) {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let hub = Arc::new(hub);
        let thread = spawn(listener, hub.clone());
        (hub, addr, thread)
    }

    /// Sends `request` on a new connection and reads the whole answer (the server closes).
    fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(request)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// 64 clients that open a connection and send half a request head (eight times what the
    /// old server served at once) do not keep the probes from answering: every probe on
    /// top gets its 200 at once. Each slow client is cut off once its head is overdue.
    #[test]
    fn probes_answer_while_slow_clients_hold_connections() {
        use std::io::{Read, Write};
        let (hub, _rx) = hub();
        let (hub, addr, thread) = serve_hub(hub);
        let mut slow: Vec<std::net::TcpStream> = (0..64)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
                    .unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        for probe in ["/healthz", "/metrics"] {
            for _ in 0..10 {
                let t = Instant::now();
                let req = format!(
                    "GET {probe} HTTP/1.1\r\nHost: probe\r\nAuthorization: Bearer t\r\n\r\n"
                );
                let answer = exchange(addr, req.as_bytes()).unwrap();
                assert!(answer.starts_with("HTTP/1.1 200"), "{probe}: {answer}");
                assert!(
                    t.elapsed() < Duration::from_secs(1),
                    "{probe}: {:?}",
                    t.elapsed()
                );
            }
        }
        // The slow clients are closed once IO_TIMEOUT has passed since they connected.
        let t = Instant::now();
        for s in &mut slow {
            s.set_read_timeout(Some(IO_TIMEOUT + Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 256];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        assert!(
            t.elapsed() < IO_TIMEOUT + Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        hub.stop_admin();
        thread.join().unwrap();
    }

    /// Opens `n` connections to `addr` from `from`, each with half a request head.
    fn slow_clients(
        from: std::net::IpAddr,
        addr: std::net::SocketAddr,
        n: usize,
    ) -> Vec<std::net::TcpStream> {
        use std::io::Write;
        (0..n)
            .map(|_| {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .unwrap();
                socket
                    .bind(&std::net::SocketAddr::new(from, 0).into())
                    .unwrap();
                socket.connect(&addr.into()).unwrap();
                let mut s: std::net::TcpStream = socket.into();
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: slow\r\n")
                    .unwrap();
                s
            })
            .collect()
    }

    /// `GET path` from `from`; the answer's status line.
    fn status_line(from: std::net::IpAddr, addr: std::net::SocketAddr, path: &str) -> String {
        use std::io::{Read, Write};
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&std::net::SocketAddr::new(from, 0).into())
            .unwrap();
        socket.connect(&addr.into()).unwrap();
        let mut s: std::net::TcpStream = socket.into();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer t\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// One host holds at most MAX_PER_ADDRESS admin connections: the rest of its
    /// connections get a 503 at once, and another host is served as usual.
    #[test]
    fn one_host_cannot_fill_the_admin_port() {
        let (hub, _rx) = hub();
        let (hub, addr, thread) = serve_hub(hub);
        let greedy: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        let _held = slow_clients(greedy, addr, MAX_PER_ADDRESS);
        std::thread::sleep(Duration::from_millis(200));
        let refused = status_line(greedy, addr, "/healthz");
        assert!(refused.contains("503"), "{refused}");
        let other: std::net::IpAddr = "127.0.0.3".parse().unwrap();
        let served = status_line(other, addr, "/healthz");
        assert!(served.contains("200"), "{served}");
        hub.stop_admin();
        thread.join().unwrap();
    }

    /// Hosts enough to fill the admin port (MAX_CONNECTIONS) leave it answering 503; the
    /// probe listener answers /healthz and /readyz all the while, and nothing else.
    #[test]
    fn the_probe_listener_answers_while_the_admin_port_is_full() {
        let (hub, _rx) = hub();
        let admin = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let probe = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let (admin_addr, probe_addr) = (admin.local_addr().unwrap(), probe.local_addr().unwrap());
        let hub = Arc::new(hub);
        let thread = spawn_with_probe(Some(admin), Some(probe), hub.clone());
        // One host more than needed: a few connections may still wait in the accept queue.
        let hosts = MAX_CONNECTIONS.div_ceil(MAX_PER_ADDRESS) + 1;
        let _held: Vec<_> = (0..hosts)
            .flat_map(|h| {
                let from = format!("127.0.1.{}", h + 1).parse().unwrap();
                slow_clients(from, admin_addr, MAX_PER_ADDRESS)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(800));
        let me: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let full = status_line(me, admin_addr, "/healthz");
        assert!(full.contains("503"), "the admin port is full: {full}");
        for path in ["/healthz", "/readyz"] {
            for _ in 0..10 {
                let t = Instant::now();
                let answer = status_line(me, probe_addr, path);
                assert!(
                    answer.contains("200") || answer.contains("503 "),
                    "{path}: {answer}"
                );
                assert!(!answer.is_empty(), "{path}: no answer");
                assert!(
                    t.elapsed() < Duration::from_secs(1),
                    "{path}: {:?}",
                    t.elapsed()
                );
            }
        }
        assert!(status_line(me, probe_addr, "/healthz").contains("200"));
        let other = status_line(me, probe_addr, "/metrics");
        assert!(
            other.contains("404"),
            "/metrics on the probe listener: {other}"
        );
        hub.stop_admin();
        thread.join().unwrap();
    }

    /// The transport's own refusals: a body over the limit gets 413, a body that never comes
    /// 408, and a request that is not HTTP a 400; the next request is served as usual.
    #[test]
    fn oversized_slow_and_garbled_requests_are_refused() {
        use std::io::{Read, Write};
        let (hub, _rx) = hub();
        let (hub, addr, thread) = serve_hub(hub);
        let big = format!(
            "POST /drain HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: {}\r\n\r\n{}",
            MAX_BODY + 1,
            "x".repeat(MAX_BODY + 1)
        );
        let answer = exchange(addr, big.as_bytes()).unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        let answer = exchange(addr, b"\x16\x03\x01 not http\r\n\r\n").unwrap();
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{answer}"
        );
        let answer = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("application/json"), "{answer}");
        hub.stop_admin();
        thread.join().unwrap();
    }
}
