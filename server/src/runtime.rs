//! The glommio layer: one executor per core, each driving one [`ShardCore`].
//!
//! This layer is deliberately thin: sockets, clocks and sleeping live here, every decision
//! lives in the sans-IO core. Each shard runs these tasks:
//!
//! - **tick** (latency-sensitive task queue): sleeps until the next room deadline or QUIC
//!   timer, whichever is first, then runs the due room ticks (and housekeeping) and the due
//!   QUIC timers, and sends what they produced. It is the only task that sleeps on a glommio
//!   timer; the others wake it early through a waker when the next deadline moves earlier.
//! - **receive** (throughput queue): waits for the socket to be readable (an io_uring
//!   `recvmsg` with `MSG_PEEK` on a duplicate of the socket), then reads batches with
//!   non-blocking `recvmmsg` (quinn-udp) until the socket is empty or [`RECV_BOUND`]
//!   datagrams were taken, feeds them to the core, sends what they produced, and yields so a
//!   due tick runs before the next pass.
//! - **mesh** (throughput queue): one task per peer shard, delivering its messages.
//!
//! Every task drives the core the same way, the one way the core documents: an input
//! (`handle_datagram`, `handle_shard_message`, or `handle_due` for whatever fell due), then
//! `Io::flush`, which takes every output through [`ShardCore::poll_outputs`] (datagrams into
//! one `sendmmsg` batch, mesh messages, ended rooms' results to the supervisor) and learns
//! when the core must next run. The test harness drives the core through the same two calls.
//!
//! The tick task also does the shard's operator work every [`HOUSEKEEPING_INTERVAL`]: it
//! carries out queued admin commands, and every
//! [`REPORT_INTERVAL`] publishes a [`ShardReport`](crate::shard::operator::ShardReport) into the shard's slot of the [`Hub`]. So the
//! per-packet and per-tick paths take no lock and touch no atomic; the admin thread only ever
//! reads the last report.
//!
//! The calling thread of [`serve`] becomes the **supervisor** thread. The decisions are the
//! sans-IO [`Supervisor`]'s (`supervisor.rs`: when to drain, to cut the drain short, to stop;
//! what to tell the [`Fleet`] hook); the thread only feeds it what it sees (signals, drain
//! requests, the shards' reports, the shard [`Watchdog`]'s view of the heartbeats each
//! housekeeping pass stamps) and carries out its actions, writes room results to the results
//! file, and once the supervisor stops waits at most `SHARD_EXIT_WAIT` (1 s) for the shards.
//!
//! Only one task sleeps on a timer by design: with several tasks each sleeping on its own
//! glommio timer, a short timer did not fire while another task's long one was pending, and
//! datagrams waited in the socket for seconds (ARCHITECTURE.md has the story; it was probably
//! the glommio executor bug that `server/vendor/glommio` fixes).

use crate::fleet::{Fleet, NoFleet};
use crate::net::tls::{self, Identity, TransportSettings};
use crate::net::{self, Steering};
use crate::ops::admin::{self, Envelope, Hub, ProcessEvent, ShardFault};
use crate::ops::config::ServeConfig;
use crate::ops::supervisor::{Action, Observation, Outcome, Supervisor, SupervisorConfig};
use crate::ops::watchdog::{Liveness, WatchEvent, Watchdog, WATCHDOG_BOUND};
use crate::shard::mesh::ShardMsg;
use crate::shard::operator::{Command, RoomResult};
use crate::shard::stats::QuicStats;
use crate::shard::HOUSEKEEPING_INTERVAL;
use crate::shard::{Outputs, ShardConfig, ShardCore};
use crate::{builtin_modes, ShardId};
use bytes::BytesMut;
use futures_lite::future;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::{Latency, LocalExecutorBuilder, Placement, Shares};
use hdrhistogram::Histogram;
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::net::UdpSocket;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Most datagrams one receive pass takes before it sends what it has and yields to the other
/// tasks (housekeeping, QUIC timers, the mesh). A room tick does not wait for the pass: after
/// every `recvmmsg` batch (32 datagrams, about 0.1-0.2 ms) the pass runs the ticks that fell
/// due and sends their snapshots, so a burst delays a tick by at most one batch. A full pass
/// still amortises the wake-up over many packets (quinn's `IO_LOOP_BOUND` reasons the same
/// way).
pub const RECV_BOUND: usize = 256;
/// Capacity of each shard-to-shard channel.
const MESH_CAPACITY: usize = 4096;
/// How long a stopping shard keeps sending so close frames reach clients.
const CLOSE_LINGER: Duration = Duration::from_millis(200);

/// How often a shard publishes its report for the admin thread and the supervisor.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(250);
/// How often the supervisor looks at signals, results and reports.
const SUPERVISOR_INTERVAL: Duration = Duration::from_millis(50);
/// How often the fleet hook hears the capacity.
const CAPACITY_INTERVAL: Duration = Duration::from_secs(1);
/// How long after the drain grace the supervisor waits for shards to report that they are
/// done before it stops them anyway.
const DRAIN_SLACK: Duration = Duration::from_secs(2);
/// How long the supervisor waits, once it told the shards to stop, for their tasks to end
/// (they linger `CLOSE_LINGER` so close frames leave). A shard still running then is left
/// behind and the process exits without it: SIGTERM ends the process within the drain grace
/// plus `2 * DRAIN_SLACK + SHARD_EXIT_WAIT` whatever the shards do.
const SHARD_EXIT_WAIT: Duration = Duration::from_secs(1);

/// Set by the supervisor: every shard closes what remains and exits.
static STOP: AtomicBool = AtomicBool::new(false);
/// Termination signals received (the first drains, the second cuts the drain short).
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// A termination signal arrived (one atomic add; called from the signal thread). The first starts a graceful
/// drain, the second closes what remains with SHUTTING_DOWN.
pub fn request_stop() {
    SIGNALS.fetch_add(1, Ordering::Relaxed);
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::ops::config::ConfigError),
    /// Certificate problems.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Socket problems.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// An executor could not start (often: the locked-memory limit is too low).
    #[error(
        "starting shard executors: {0} (glommio needs `ulimit -l` of at least 512 KiB per shard)"
    )]
    Executor(String),
    /// Every shard stopped without being asked to (a panic, a failed socket).
    #[error("every shard stopped unexpectedly; see the log")]
    ShardsFailed,
    /// Some shards did not stop when told to (stalled); the process exits without them.
    #[error("shards {0:?} did not stop; see the log")]
    ShardsStuck(Vec<u16>),
}

/// What a started server reports before it serves.
#[derive(Debug, Clone)]
pub struct Started {
    /// Address of each shard (all equal unless steering fell back to a port per shard).
    pub addrs: Vec<std::net::SocketAddr>,
    /// How datagrams reach shards.
    pub steering: Steering,
    /// The certificate's SHA-256 fingerprint.
    pub fingerprint: String,
    /// Where the certificate is stored.
    pub cert_path: Option<std::path::PathBuf>,
    /// The admin HTTP address, if enabled.
    pub admin: Option<std::net::SocketAddr>,
}

/// Runs the server until a drain finishes (see [`request_stop`]). `on_start` sees the bound
/// addresses first.
pub fn serve(config: ServeConfig, on_start: impl FnOnce(&Started)) -> Result<(), StartError> {
    serve_with_fleet(config, Box::new(NoFleet), on_start)
}

/// [`serve`], telling `fleet` about readiness, capacity and shutdown.
pub fn serve_with_fleet(
    config: ServeConfig,
    mut fleet: Box<dyn Fleet>,
    on_start: impl FnOnce(&Started),
) -> Result<(), StartError> {
    config.validate()?;
    let shards = config.shard_count();
    let identity = match (&config.cert, &config.key) {
        (Some(c), Some(k)) => Identity::load(c, k)?,
        _ => Identity::development(&config.data_dir)?,
    };
    let server_config = tls::server_config(
        &identity,
        TransportSettings {
            idle_timeout: config.idle_timeout,
            tick_period: Duration::from_secs(1) / u32::from(config.tick_rate.max(1)),
        },
    )?;
    let sockets = net::bind(config.listen, shards).map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let admin_listener = match config.admin {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    let started = Started {
        admin: admin_listener.as_ref().and_then(|l| l.local_addr().ok()),
        addrs: (0..shards)
            .map(|i| sockets.local_addr(i).expect("bound socket"))
            .collect(),
        steering: sockets.steering,
        fingerprint: identity.fingerprint(),
        cert_path: identity.cert_path.clone(),
    };
    on_start(&started);

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mesh: Option<MeshBuilder<ShardMsg, Full>> =
        (shards > 1).then(|| MeshBuilder::full(shards, MESH_CAPACITY));
    let (events_tx, events_rx) = mpsc::channel::<ProcessEvent>();
    let (results_tx, results_rx) = mpsc::channel::<RoomResult>();
    let mut command_rx = Vec::new();
    let mut command_tx = Vec::new();
    for _ in 0..shards {
        let (tx, rx) = mpsc::channel::<Envelope>();
        command_tx.push(tx);
        command_rx.push(rx);
    }
    let hub = Arc::new(Hub::new(
        shards,
        command_tx,
        events_tx,
        config.admin_token.clone(),
    ));
    let mut handles = Vec::new();
    for ((i, socket), commands) in sockets.sockets.into_iter().enumerate().zip(command_rx) {
        let shard_config = ShardConfig {
            shard: ShardId(i as u16),
            shards: shards as u16,
            modes: builtin_modes(config.room_capacity, config.tick_rate),
            server_config: server_config.clone(),
            max_connections: config.max_connections,
            hello_timeout: config.hello_timeout,
            empty_room_grace: config.empty_room_grace,
            max_datagram: config.max_datagram,
            seed: config.seed,
        };
        let mesh = mesh.clone();
        let stats_interval = config.stats_interval;
        let link = OpsLink {
            hub: hub.clone(),
            commands,
            results: results_tx.clone(),
        };
        let handle = LocalExecutorBuilder::new(Placement::Fixed(i % cores))
            .name(&format!("shard-{i}"))
            .io_memory(512 << 10)
            .spawn(move || async move {
                run_shard(shard_config, socket, mesh, stats_interval, link).await
            })
            .map_err(|e| StartError::Executor(e.to_string()))?;
        handles.push(handle);
    }
    drop(results_tx);
    let admin_thread = admin_listener.map(|l| admin::spawn(l, hub.clone()));
    let failed = !supervise(&config, &hub, &events_rx, &results_rx, &mut *fleet);
    // Wait for the shards' tasks to end, but not for ever: a stalled shard never would.
    let wait_until = Instant::now() + SHARD_EXIT_WAIT;
    while hub.ended().iter().any(|e| !e) && Instant::now() < wait_until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let ended = hub.ended();
    let mut stuck = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        if !ended[i] {
            let tid = hub.shard_tid(ShardId(i as u16));
            error!(shard = i, thread = %thread_state(tid), "shard did not stop; exiting without it");
            stuck.push(i as u16);
            continue;
        }
        if let Err(e) = h.join() {
            error!(error = %e, "shard executor failed");
        }
    }
    // Results of rooms the shards ended while stopping.
    let mut results = ResultsFile::new(&config.data_dir);
    while let Ok(r) = results_rx.try_recv() {
        results.write(&r);
    }
    results.finish();
    hub.stop_admin();
    if let Some(t) = admin_thread {
        let _ = t.join();
    }
    if failed {
        // Not a drain: do not tell the fleet manager this server shut down cleanly.
        error!("every shard stopped unexpectedly");
        return Err(StartError::ShardsFailed);
    }
    if !stuck.is_empty() {
        // The players of a stuck shard were never told: not a clean drain either.
        return Err(StartError::ShardsStuck(stuck));
    }
    fleet.shutdown();
    info!("stopped");
    Ok(())
}

/// The supervisor thread: feeds the process's drain state machine ([`Supervisor`]) what it
/// observes every `SUPERVISOR_INTERVAL` (signals, drain requests, the shards' reports and
/// liveness), carries out what it decides, and writes room results as they arrive. Returns
/// false when the process stopped because every shard had died.
fn supervise(
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
fn thread_state(tid: i32) -> String {
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
struct ResultsFile {
    dir: std::path::PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl ResultsFile {
    fn new(data_dir: &std::path::Path) -> Self {
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

    fn write(&mut self, r: &RoomResult) {
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

    fn finish(&mut self) {
        use std::io::Write;
        if let Some(f) = &mut self.file {
            let _ = f.flush();
            let _ = f.get_ref().sync_all();
        }
    }
}

/// What a shard's runtime needs to talk to the operators' side.
struct OpsLink {
    hub: Arc<Hub>,
    commands: mpsc::Receiver<Envelope>,
    results: mpsc::Sender<RoomResult>,
}

impl OpsLink {
    /// Carries out queued commands and hands over room results.
    fn serve(&self, core: &mut ShardCore, now: Instant) {
        while let Ok(env) = self.commands.try_recv() {
            let r = core.handle_command(now, env.cmd);
            if let Some(reply) = env.reply {
                let _ = reply.try_send(r);
            }
        }
    }

    fn publish(&self, core: &ShardCore) {
        let mut report = core.report();
        report.cpu_seconds = thread_cpu_seconds();
        self.hub.publish(core.id(), report);
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

struct Io {
    socket: UdpSocket,
    state: UdpSocketState,
    /// Datagrams of the current pass, sent together.
    batch: net::SendBatch,
    /// Sends that went around the batch (GSO), counted until the flush ends.
    unbatched: net::Flushed,
    /// Where ended rooms' results go (the supervisor).
    results: mpsc::Sender<RoomResult>,
    mesh: Option<Senders<ShardMsg>>,
    /// Messages waiting for room in a peer's channel, per peer, in order.
    mesh_backlog: Vec<VecDeque<ShardMsg>>,
}

impl Io {
    /// Sends everything the core has queued (datagrams gathered, then given to the kernel with
    /// `sendmmsg`; mesh messages; room results to the supervisor). Returns when the core must
    /// next run [`ShardCore::handle_due`].
    fn flush(&mut self, core: &mut ShardCore) -> Instant {
        self.retry_mesh_backlog();
        let now = Instant::now();
        core.poll_outputs(now, self);
        let wake = core.next_due(now);
        let mut f = self.batch.flush(&self.socket);
        f.errors += std::mem::take(&mut self.unbatched.errors);
        f.calls += std::mem::take(&mut self.unbatched.calls);
        let c = core.counters_mut();
        c.udp_send_errors += f.errors;
        c.udp_send_calls += f.calls;
        wake
    }

    /// Sends what waited for room in a peer's channel, in order: a message never overtakes one
    /// still waiting.
    fn retry_mesh_backlog(&mut self) {
        let Some(mesh) = &self.mesh else { return };
        for (peer, backlog) in self.mesh_backlog.iter_mut().enumerate() {
            while let Some(msg) = backlog.pop_front() {
                if let Err(e) = mesh.try_send_to(peer, msg) {
                    match e {
                        glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m)) => {
                            backlog.push_front(m);
                            break;
                        }
                        e => {
                            warn!(peer, error = %e, "shard mesh send failed");
                            break;
                        }
                    }
                }
            }
        }
    }
}

impl Outputs for Io {
    fn transmit(&mut self, t: &quinn_proto::Transmit, contents: &[u8]) {
        match t.segment_size {
            // A GSO batch (the core asks quinn for one datagram at a time, so this is not
            // expected): quinn-udp knows how to send it.
            Some(seg) if seg < t.size => {
                let tx = quinn_udp::Transmit {
                    destination: t.destination,
                    ecn: t
                        .ecn
                        .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
                    contents,
                    segment_size: Some(seg),
                    src_ip: t.src_ip,
                };
                let failed = self
                    .state
                    .send(UdpSockRef::from(&self.socket), &tx)
                    .is_err();
                self.unbatched.calls += 1;
                self.unbatched.errors += failed as u64;
            }
            _ => self
                .batch
                .push(contents, t.destination, t.ecn.map(|e| e as u8), t.src_ip),
        }
    }

    fn shard_message(&mut self, to: ShardId, msg: ShardMsg) {
        // With one shard there is no mesh, and nothing is addressed to another shard.
        let Some(mesh) = &self.mesh else { return };
        let peer = to.0 as usize;
        let Some(backlog) = self.mesh_backlog.get_mut(peer) else {
            return;
        };
        if !backlog.is_empty() {
            backlog.push_back(msg);
            return;
        }
        match mesh.try_send_to(peer, msg) {
            Ok(()) => {}
            Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))) => {
                backlog.push_back(m)
            }
            Err(e) => warn!(peer, error = %e, "shard mesh send failed"),
        }
    }

    fn room_result(&mut self, result: RoomResult) {
        let _ = self.results.send(result);
    }
}

async fn run_shard(
    config: ShardConfig,
    socket: UdpSocket,
    mesh: Option<MeshBuilder<ShardMsg, Full>>,
    stats_interval: Duration,
    link: OpsLink,
) {
    let shard = config.shard;
    let _alive = link.hub.shard_started(shard);
    let (senders, receivers) = match mesh {
        Some(m) => match m.join().await {
            Ok((s, r)) => (Some(s), Some(r)),
            Err(_) => {
                error!(%shard, "joining the shard mesh failed");
                return;
            }
        },
        None => (None, None),
    };
    let state = match UdpSocketState::new(UdpSockRef::from(&socket)) {
        Ok(s) => s,
        Err(e) => {
            error!(%shard, error = %e, "socket setup failed");
            return;
        }
    };
    // quinn-udp turns UDP GRO on; the loop reads one datagram per buffer.
    if let Err(e) = net::set_udp_gro(&socket, false) {
        warn!(%shard, error = %e, "turning UDP GRO off");
    }
    // Messages are addressed by shard number; the mesh numbers its peers by executor. Both
    // follow spawn order, which this checks rather than assumes.
    if let Some(s) = &senders {
        if s.peer_id() != shard.0 as usize {
            error!(%shard, peer_id = s.peer_id(), "shard mesh numbering differs from shard numbering");
            return;
        }
    }
    let peers_n = senders.as_ref().map_or(0, |s| s.nr_consumers());
    // glommio waits on a duplicate of the socket for readability (io_uring); quinn-udp reads
    // and writes the original.
    let readiness = match socket.try_clone() {
        // SAFETY: `dup` is a freshly duplicated UDP socket descriptor that nothing else owns.
        Ok(dup) => unsafe {
            <glommio::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(
                std::os::fd::IntoRawFd::into_raw_fd(dup),
            )
        },
        Err(e) => {
            error!(%shard, error = %e, "socket dup failed");
            return;
        }
    };
    let shared = Rc::new(Shared {
        core: RefCell::new(ShardCore::new(config, Box::new(Instant::now))),
        io: RefCell::new(Io {
            socket,
            state,
            batch: net::SendBatch::default(),
            unbatched: net::Flushed::default(),
            results: link.results.clone(),
            mesh: senders,
            mesh_backlog: (0..peers_n).map(|_| VecDeque::new()).collect(),
        }),
        wake_timer: Notify::default(),
        timer_armed: Cell::new(None),
    });
    let ex = glommio::executor();
    let tick_q = ex.create_task_queue(
        Shares::Static(1000),
        Latency::Matters(Duration::from_millis(1)),
        "tick",
    );
    let io_q = ex.create_task_queue(Shares::Static(1000), Latency::NotImportant, "io");

    // Mesh: one task per peer shard, woken by glommio's channel.
    let mut tasks = Vec::new();
    if let Some(mut receivers) = receivers {
        for (_, rx) in receivers.streams() {
            let sh = shared.clone();
            tasks.push(
                glommio::spawn_local_into(
                    async move {
                        while let Some(msg) = rx.recv().await {
                            sh.core
                                .borrow_mut()
                                .handle_shard_message(Instant::now(), msg);
                            sh.flush();
                        }
                    },
                    io_q,
                )
                .expect("task queue exists"),
            );
        }
    }

    // Receive: wait for readability, then read batches until empty or RECV_BOUND.
    let sh = shared.clone();
    tasks.push(
        glommio::spawn_local_into(
            async move {
                let batch = quinn_udp::BATCH_SIZE.max(1);
                const SLOT: usize = 2048;
                let mut storage = vec![0u8; SLOT * batch];
                let mut meta = vec![RecvMeta::default(); batch];
                // Built once: one buffer per datagram of a recvmmsg batch.
                let mut slices: Vec<IoSliceMut<'_>> =
                    storage.chunks_mut(SLOT).map(IoSliceMut::new).collect();
                let mut peek = [0u8; 1];
                loop {
                    if let Err(e) = readiness.peek_from(&mut peek).await {
                        warn!(%shard, error = %e, "waiting for the socket failed");
                    }
                    let mut taken = 0;
                    while taken < RECV_BOUND {
                        let io = sh.io.borrow();
                        let n = match io.state.recv(
                            UdpSockRef::from(&io.socket),
                            &mut slices,
                            &mut meta,
                        ) {
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                warn!(%shard, error = %e, "receive failed");
                                break;
                            }
                        };
                        drop(io);
                        let now = Instant::now();
                        let mut core = sh.core.borrow_mut();
                        for (m, buf) in meta.iter().zip(slices.iter()).take(n) {
                            core.handle_datagram(
                                now,
                                m.addr,
                                m.dst_ip,
                                BytesMut::from(&buf[..m.len]),
                            );
                            taken += 1;
                        }
                        // A tick that fell due during the batch runs now, not after the pass:
                        // yielding would not let the tick task in (glommio wakes it only when
                        // the executor polls for I/O, which a runnable receive task defers), and
                        // an earlier version that yielded here spun until the executor's
                        // 100 ms preemption timer.
                        let now = Instant::now();
                        if core.next_due(now) <= now {
                            core.handle_due(now);
                            drop(core);
                            sh.flush();
                        }
                    }
                    sh.flush();
                    // Let the tick queue in between passes.
                    future::yield_now().await;
                }
            },
            io_q,
        )
        .expect("task queue exists"),
    );

    // Ticks and QUIC timers, on the latency-sensitive queue: the only task that sleeps on a
    // timer.
    let sh = shared.clone();
    let ticker = glommio::spawn_local_into(
        async move {
            let mut next_stats = Instant::now() + stats_interval;
            let mut stats_window = StatsWindow::default();
            let mut next_ops = Instant::now();
            let mut next_report = Instant::now();
            loop {
                let now = Instant::now();
                let wake = sh.core.borrow_mut().next_due(now);
                sh.timer_armed.set(Some(wake));
                if wake > now {
                    future::or(glommio::timer::sleep(wake - now), sh.wake_timer.wait()).await;
                }
                sh.timer_armed.set(None);
                if STOP.load(Ordering::Relaxed) {
                    break;
                }
                let now = Instant::now();
                sh.core.borrow_mut().handle_due(now);
                if now >= next_ops {
                    next_ops = now + HOUSEKEEPING_INTERVAL;
                    link.hub.beat(shard, now);
                    let mut core = sh.core.borrow_mut();
                    link.serve(&mut core, now);
                    if now >= next_report {
                        next_report = now + REPORT_INTERVAL;
                        link.publish(&core);
                    }
                }
                sh.flush();
                if !stats_interval.is_zero() && Instant::now() >= next_stats {
                    next_stats += stats_interval;
                    log_stats(&sh.core.borrow(), &mut stats_window);
                }
            }
            // Stopping: end what remains (results recorded), tell every client, keep sending
            // briefly so the close frames leave.
            {
                let mut core = sh.core.borrow_mut();
                let _ = core.handle_command(
                    Instant::now(),
                    Command::Stop {
                        reason: "server shutting down".into(),
                    },
                );
                link.serve(&mut core, Instant::now());
            }
            sh.flush();
            let linger_end = Instant::now() + CLOSE_LINGER;
            while Instant::now() < linger_end {
                glommio::timer::sleep(Duration::from_millis(5)).await;
                sh.core.borrow_mut().handle_timeout(Instant::now());
                sh.flush();
            }
            link.publish(&sh.core.borrow());
            log_stats(&sh.core.borrow(), &mut stats_window);
        },
        tick_q,
    )
    .expect("task queue exists");
    info!(%shard, "serving");
    ticker.await;
    drop(tasks);
    info!(%shard, "stopped");
}

/// The shard's state, shared by its tasks (one thread: `RefCell`, no locks).
struct Shared {
    core: RefCell<ShardCore>,
    io: RefCell<Io>,
    wake_timer: Notify,
    timer_armed: Cell<Option<Instant>>,
}

impl Shared {
    /// Sends what the core queued, and wakes the timer task if the next deadline moved earlier.
    fn flush(&self) {
        let mut core = self.core.borrow_mut();
        let next = self.io.borrow_mut().flush(&mut core);
        drop(core);
        if self.timer_armed.get().is_some_and(|armed| next < armed) {
            self.wake_timer.notify();
        }
    }
}

/// Wakes a task sleeping on [`Notify::wait`] from another task of the same executor.
#[derive(Default)]
struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    async fn wait(&self) {
        future::poll_fn(|cx| {
            if self.set.replace(false) {
                std::task::Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// The tick figures at the previous stats line, so each line can also give the window since.
#[derive(Default)]
pub struct StatsWindow {
    prev: Option<(Histogram<u64>, Histogram<u64>, u64, u64)>,
    /// Snapshots, datagrams in and out, and QUIC figures at the previous line.
    prev_counts: (u64, u64, u64, QuicStats),
}

/// Logs one line of a shard's figures: totals since start, and `window_*` figures for the
/// time since the previous line (tick duration and lateness percentiles, ticks, overruns).
pub fn log_stats(core: &ShardCore, window: &mut StatsWindow) {
    let c = core.counters();
    let t = core.tick_stats();
    let per_snap = c.snapshot_bytes.checked_div(c.snapshots).unwrap_or(0);
    let (mut dur, mut late) = (t.duration_us.clone(), t.lateness_us.clone());
    let (mut ticks, mut overruns) = (t.ticks, t.overruns);
    if let Some((pd, pl, pt, po)) = &window.prev {
        // Counts only grow, so subtracting the earlier histogram cannot fail.
        let _ = dur.subtract(pd);
        let _ = late.subtract(pl);
        ticks -= pt;
        overruns -= po;
    }
    let quic = core.quic_stats();
    let (ps, pi, po, pq) = window.prev_counts;
    window.prev_counts = (c.snapshots, c.udp_in, c.udp_out, quic);
    let q = |h: &Histogram<u64>, p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    info!(
        shard = core.id().0,
        rooms = core.rooms().len(),
        players = core.players(),
        connections = core.connections(),
        ticks = t.ticks,
        tick_p50_us = t.duration_us.value_at_quantile(0.5),
        tick_p99_us = t.duration_us.value_at_quantile(0.99),
        late_p50_us = t.lateness_us.value_at_quantile(0.5),
        late_p99_us = t.lateness_us.value_at_quantile(0.99),
        overruns = t.overruns,
        window_ticks = ticks,
        window_tick_p50_us = q(&dur, 0.5),
        window_tick_p99_us = q(&dur, 0.99),
        window_late_p50_us = q(&late, 0.5),
        window_late_p99_us = q(&late, 0.99),
        window_overruns = overruns,
        snapshots = c.snapshots,
        bytes_per_snapshot = per_snap,
        inputs_applied = c.inputs_applied,
        inputs_dropped = c.inputs_dropped,
        malformed = c.malformed_datagrams + c.malformed_frames,
        udp_in = c.udp_in,
        udp_out = c.udp_out,
        window_snapshots = c.snapshots - ps,
        window_udp_in = c.udp_in - pi,
        window_udp_out = c.udp_out - po,
        window_ack_only_in = quic.ack_only_in.saturating_sub(pq.ack_only_in),
        window_ack_only_out = quic.ack_only_out.saturating_sub(pq.ack_only_out),
        window_lost_packets = quic.lost_packets.saturating_sub(pq.lost_packets),
        "shard stats"
    );
    window.prev = Some((
        t.duration_us.clone(),
        t.lateness_us.clone(),
        t.ticks,
        t.overruns,
    ));
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
