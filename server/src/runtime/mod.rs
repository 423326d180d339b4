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

mod shard_loop;
mod supervise;

use crate::fleet::{Fleet, NoFleet};
use crate::net::tls::{self, Identity, TransportSettings};
use crate::net::{self, Steering};
use crate::ops::admin::{self, Envelope, Hub, ProcessEvent};
use crate::ops::config::ServeConfig;
use crate::shard::mesh::ShardMsg;
use crate::shard::operator::RoomResult;
use crate::shard::ShardConfig;
use crate::shard::HOUSEKEEPING_INTERVAL;
use crate::{builtin_modes, ShardId};
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::{LocalExecutorBuilder, Placement};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tracing::{error, info};

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
    /// The probe-only HTTP address, if enabled.
    pub probe: Option<std::net::SocketAddr>,
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
    let admin_token = config.admin_token()?;
    let reset_key = tls::stateless_reset_key(&config.data_dir)?;
    if let Some(w) = config.exposure_warning() {
        tracing::warn!("{w}");
    }
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
        Some(addr) => {
            Some(admin::bind_listener(addr).map_err(|source| StartError::Bind { addr, source })?)
        }
        None => None,
    };
    let probe_listener = match config.probe {
        Some(addr) => {
            Some(admin::bind_listener(addr).map_err(|source| StartError::Bind { addr, source })?)
        }
        None => None,
    };
    let started = Started {
        admin: admin_listener.as_ref().and_then(|l| l.local_addr().ok()),
        probe: probe_listener.as_ref().and_then(|l| l.local_addr().ok()),
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
    let hub = Arc::new(Hub::new(shards, command_tx, events_tx, admin_token));
    let mut handles = Vec::new();
    for ((i, socket), commands) in sockets.sockets.into_iter().enumerate().zip(command_rx) {
        let shard_config = ShardConfig {
            shard: ShardId(i as u16),
            shards: shards as u16,
            // Checked by ServeConfig::validate; the arena if that was skipped.
            modes: crate::modes(&config.mode_names(), config.room_capacity, config.tick_rate)
                .unwrap_or_else(|_| builtin_modes(config.room_capacity, config.tick_rate)),
            server_config: server_config.clone(),
            max_connections: config.max_connections,
            admission: crate::shard::Admission {
                max_per_address: config.max_per_address,
                max_handshakes: config.max_handshakes,
                retry_above: config.retry_above,
                handshakes_per_second: config.handshakes_per_second,
            },
            hello_timeout: config.hello_timeout,
            lobby_timeout: config.lobby_timeout,
            reset_key: Some(reset_key),
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
    let admin_thread = (admin_listener.is_some() || probe_listener.is_some())
        .then(|| admin::spawn_with_probe(admin_listener, probe_listener, hub.clone()));
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

pub use shard_loop::{log_stats, StatsWindow};
use shard_loop::{run_shard, OpsLink};
use supervise::{supervise, thread_state, ResultsFile};
