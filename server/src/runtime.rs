//! The glommio layer: one executor per core, each driving one [`ShardCore`].
//!
//! This layer is deliberately thin: sockets, clocks and task wake-ups live here, every
//! decision lives in the sans-IO core. Each shard runs four kinds of task:
//!
//! - **tick** (latency-sensitive task queue): sleeps until the next room deadline, runs the
//!   due ticks, sends what they produced;
//! - **receive** (throughput queue): waits for the socket to be readable, then reads batches
//!   with `recvmmsg` (quinn-udp) until empty or [`RECV_BOUND`] datagrams, feeds them to the
//!   core and sends what they produced;
//! - **timers** (throughput queue): QUIC timers (loss detection, ACK delay, idle);
//! - **mesh** (throughput queue): one per peer shard, delivering cross-shard messages.
//!
//! The shard's state sits in an `Rc<RefCell<_>>`: one thread, no locks, no atomics.

use crate::config::ServeConfig;
use crate::mesh::ShardMsg;
use crate::net::{self, Steering};
use crate::shard::{ShardConfig, ShardCore};
use crate::tls::{self, Identity, TransportSettings};
use crate::{builtin_modes, ShardId};
use bytes::BytesMut;
use futures_lite::future;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::{Latency, LocalExecutorBuilder, Placement, Shares};
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use std::cell::{Cell, RefCell};
use std::io::IoSliceMut;
use std::net::UdpSocket;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Most datagrams one receive pass takes before the loop yields to the tick and sends what
/// it has. 256 datagrams cost about 0.5 ms of processing at 2 µs each: a burst can delay a
/// tick by at most that, well inside the 1 ms lateness budget, while a full pass still
/// amortises the wake-up over many packets (quinn's `IO_LOOP_BOUND` reasons the same way).
pub const RECV_BOUND: usize = 256;
/// Capacity of each shard-to-shard channel.
const MESH_CAPACITY: usize = 4096;
/// How long a stopping shard keeps sending so close frames reach clients.
const CLOSE_LINGER: Duration = Duration::from_millis(200);

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks every shard to close its connections and stop (signal-safe).
pub fn request_stop() {
    STOP.store(true, Ordering::Relaxed);
}

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
}

/// Runs the server until [`request_stop`]. `on_start` sees the bound addresses first.
pub fn serve(config: ServeConfig, on_start: impl FnOnce(&Started)) -> Result<(), StartError> {
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
        },
    )?;
    let sockets = net::bind(config.listen, shards).map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let started = Started {
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
    let mut handles = Vec::new();
    for (i, socket) in sockets.sockets.into_iter().enumerate() {
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
        let handle = LocalExecutorBuilder::new(Placement::Fixed(i % cores))
            .name(&format!("shard-{i}"))
            .io_memory(512 << 10)
            .spawn(
                move || async move { run_shard(shard_config, socket, mesh, stats_interval).await },
            )
            .map_err(|e| StartError::Executor(e.to_string()))?;
        handles.push(handle);
    }
    for h in handles {
        if let Err(e) = h.join() {
            error!(error = %e, "shard executor failed");
        }
    }
    Ok(())
}

/// Wakes a sleeping task from another task on the same executor.
#[derive(Default)]
struct Notify {
    set: Cell<bool>,
    waker: RefCell<Option<Waker>>,
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
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

struct Io {
    core: RefCell<ShardCore>,
    socket: UdpSocket,
    state: UdpSocketState,
    send_buf: RefCell<Vec<u8>>,
    mesh: Option<Senders<ShardMsg>>,
    timers_changed: Notify,
    timer_armed: Cell<Option<Instant>>,
}

impl Io {
    /// Sends everything the core has queued: datagrams, then mesh messages.
    fn flush(self: &Rc<Self>) {
        let now = Instant::now();
        let mut core = self.core.borrow_mut();
        let mut buf = self.send_buf.borrow_mut();
        while let Some(t) = core.poll_transmit(now, &mut buf) {
            let tx = quinn_udp::Transmit {
                destination: t.destination,
                ecn: t
                    .ecn
                    .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
                contents: &buf[..t.size],
                segment_size: t.segment_size,
                src_ip: t.src_ip,
            };
            if self
                .state
                .send(UdpSockRef::from(&self.socket), &tx)
                .is_err()
            {
                core.counters_mut().udp_send_errors += 1;
            }
        }
        while let Some((to, msg)) = core.poll_shard_message() {
            let Some(mesh) = &self.mesh else { continue };
            if let Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(msg))) =
                mesh.try_send_to(to.0 as usize, msg)
            {
                // The peer's channel is full: wait for room without blocking this task.
                let me = self.clone();
                glommio::spawn_local(async move {
                    if let Some(mesh) = &me.mesh {
                        let _ = mesh.send_to(to.0 as usize, msg).await;
                    }
                })
                .detach();
            }
        }
        // Wake the timer task only if the earliest QUIC deadline moved before the one it
        // sleeps on (otherwise the timer task would wake itself on every flush).
        let next = core.poll_timeout();
        drop(core);
        if let Some(next) = next {
            if self.timer_armed.get().is_none_or(|armed| next < armed) {
                self.timers_changed.notify();
            }
        }
    }
}

async fn run_shard(
    config: ShardConfig,
    socket: UdpSocket,
    mesh: Option<MeshBuilder<ShardMsg, Full>>,
    stats_interval: Duration,
) {
    let shard = config.shard;
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
    // glommio watches a duplicate of the socket for readability; quinn-udp reads and writes.
    let readiness = match socket.try_clone() {
        // SAFETY: `dup` is a freshly duplicated, owned UDP socket descriptor.
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
    let io = Rc::new(Io {
        core: RefCell::new(ShardCore::new(config, Box::new(Instant::now))),
        socket,
        state,
        send_buf: RefCell::new(Vec::with_capacity(64 * 1024)),
        mesh: senders,
        timers_changed: Notify::default(),
        timer_armed: Cell::new(None),
    });
    let ex = glommio::executor();
    let tick_q = ex.create_task_queue(
        Shares::Static(1000),
        Latency::Matters(Duration::from_millis(1)),
        "tick",
    );
    let io_q = ex.create_task_queue(Shares::Static(1000), Latency::NotImportant, "io");

    // Mesh receivers.
    let mut mesh_tasks = Vec::new();
    if let Some(mut receivers) = receivers {
        for (_peer, rx) in receivers.streams() {
            let io = io.clone();
            mesh_tasks.push(
                glommio::spawn_local_into(
                    async move {
                        while let Some(msg) = rx.recv().await {
                            io.core
                                .borrow_mut()
                                .handle_shard_message(Instant::now(), msg);
                            io.flush();
                        }
                    },
                    io_q,
                )
                .expect("task queue exists"),
            );
        }
    }

    // Receive.
    let recv_io = io.clone();
    let recv_task = glommio::spawn_local_into(
        async move {
            let io = recv_io;
            let batch = quinn_udp::BATCH_SIZE.max(1);
            let gro = io.state.gro_segments().max(1);
            let chunk = 1500 * gro;
            let mut storage = vec![0u8; chunk * batch];
            let mut meta = vec![RecvMeta::default(); batch];
            let mut peek = [0u8; 1];
            loop {
                // Readiness without consuming the datagram.
                if let Err(e) = readiness.peek_from(&mut peek).await {
                    warn!(error = %e, "socket readiness failed");
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                let mut taken = 0;
                while taken < RECV_BOUND {
                    let mut slices: Vec<IoSliceMut<'_>> =
                        storage.chunks_mut(chunk).map(IoSliceMut::new).collect();
                    let n =
                        match io
                            .state
                            .recv(UdpSockRef::from(&io.socket), &mut slices, &mut meta)
                        {
                            Ok(n) => n,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                warn!(error = %e, "recv failed");
                                break;
                            }
                        };
                    let now = Instant::now();
                    let mut core = io.core.borrow_mut();
                    for (m, buf) in meta.iter().zip(slices.iter()).take(n) {
                        let data = &buf[..m.len];
                        for seg in data.chunks(m.stride.max(1)) {
                            core.handle_datagram(now, m.addr, m.dst_ip, BytesMut::from(seg));
                            taken += 1;
                        }
                    }
                }
                io.flush();
                // Let the tick run between passes.
                glommio::yield_if_needed().await;
            }
        },
        io_q,
    )
    .expect("task queue exists");

    // QUIC timers.
    let timer_io = io.clone();
    let timer_task = glommio::spawn_local_into(
        async move {
            let io = timer_io;
            loop {
                let now = Instant::now();
                let deadline = io
                    .core
                    .borrow_mut()
                    .poll_timeout()
                    .unwrap_or(now + Duration::from_secs(1));
                io.timer_armed.set(Some(deadline));
                let wait = deadline.saturating_duration_since(now);
                future::or(
                    async { glommio::timer::sleep(wait).await },
                    io.timers_changed.wait(),
                )
                .await;
                io.timer_armed.set(None);
                io.core.borrow_mut().handle_timeout(Instant::now());
                io.flush();
            }
        },
        io_q,
    )
    .expect("task queue exists");

    // Ticks, on the latency-sensitive queue.
    let tick_io = io.clone();
    let tick_task = glommio::spawn_local_into(
        async move {
            let io = tick_io;
            let mut next_stats = Instant::now() + stats_interval;
            loop {
                let now = Instant::now();
                let due = io.core.borrow().next_tick(now, Duration::from_millis(100));
                if due > now {
                    glommio::timer::sleep(due - now).await;
                }
                if STOP.load(Ordering::Relaxed) {
                    break;
                }
                io.core.borrow_mut().handle_tick(Instant::now());
                io.flush();
                if !stats_interval.is_zero() && Instant::now() >= next_stats {
                    next_stats += stats_interval;
                    log_stats(&io.core.borrow());
                }
            }
            // Stopping: tell every client, keep sending briefly so the close frames leave.
            io.core.borrow_mut().close_all(
                Instant::now(),
                tickshard_schema::codes::SHUTTING_DOWN,
                "server shutting down",
            );
            io.flush();
            glommio::timer::sleep(CLOSE_LINGER).await;
            io.flush();
            log_stats(&io.core.borrow());
        },
        tick_q,
    )
    .expect("task queue exists");

    info!(%shard, "serving");
    tick_task.await;
    drop(recv_task);
    drop(timer_task);
    drop(mesh_tasks);
    info!(%shard, "stopped");
}

/// Logs one line of a shard's figures.
pub fn log_stats(core: &ShardCore) {
    let c = core.counters();
    let t = core.tick_stats();
    let per_snap = if c.snapshots > 0 {
        c.snapshot_bytes / c.snapshots
    } else {
        0
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
        snapshots = c.snapshots,
        bytes_per_snapshot = per_snap,
        inputs_applied = c.inputs_applied,
        inputs_dropped = c.inputs_dropped,
        malformed = c.malformed_datagrams + c.malformed_frames,
        udp_in = c.udp_in,
        udp_out = c.udp_out,
        "shard stats"
    );
}
