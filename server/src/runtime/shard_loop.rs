//! One shard's glommio tasks: receive, tick (with the shard's operator work) and mesh, and
//! the I/O they share (`Io`: the socket with its send batch, the mesh channels, the results
//! channel), driving the [`ShardCore`] as it documents.

use super::{CLOSE_LINGER, HOUSEKEEPING_INTERVAL, RECV_BOUND, REPORT_INTERVAL, STOP};
use crate::net;
use crate::ops::admin::{Envelope, Hub};
use crate::shard::mesh::ShardMsg;
use crate::shard::operator::{Command, RoomResult};
use crate::shard::stats::QuicStats;
use crate::shard::{Outputs, ShardConfig, ShardCore};
use crate::ShardId;
use bytes::BytesMut;
use futures_lite::future;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::{Latency, Shares};
use hdrhistogram::Histogram;
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::net::UdpSocket;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// What a shard's runtime needs to talk to the operators' side.
pub(super) struct OpsLink {
    pub(super) hub: Arc<Hub>,
    pub(super) commands: mpsc::Receiver<Envelope>,
    pub(super) results: mpsc::Sender<RoomResult>,
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
    /// Datagrams of the current pass, sent together, a full batch at a time.
    batch: net::SendBatch,
    /// What the current flush sent so far (full batches, GSO sends), counted at its end.
    sent: net::Flushed,
    /// Where ended rooms' results go (the supervisor).
    results: mpsc::Sender<RoomResult>,
    mesh: Option<Senders<ShardMsg>>,
    /// Messages waiting for room in a peer's channel, per peer, in order; at most
    /// [`MAX_MESH_BACKLOG`] each (see [`queue_bounded`]).
    mesh_backlog: Vec<VecDeque<ShardMsg>>,
    /// Messages dropped at that bound since the last flush.
    mesh_dropped: u64,
}

/// Most messages waiting for one peer shard whose channel is full. A peer that falls this far
/// behind is stalled (the watchdog says so within 2 s); what waits for it must not grow
/// without end meanwhile.
pub const MAX_MESH_BACKLOG: usize = 8192;

/// Queues `msg` behind a full channel. At [`MAX_MESH_BACKLOG`], what a later message mends is
/// dropped first: an input (clients send every command several times), a snapshot (the next
/// one supersedes it), a directory (advertised again): `msg` itself if it is one of those, else
/// the oldest of those waiting, else the oldest message. Returns how many were dropped.
pub fn queue_bounded(backlog: &mut VecDeque<ShardMsg>, msg: ShardMsg) -> u64 {
    if backlog.len() < MAX_MESH_BACKLOG {
        backlog.push_back(msg);
        return 0;
    }
    let mended_later = |m: &ShardMsg| {
        matches!(
            m,
            ShardMsg::Input { .. } | ShardMsg::Snapshot { .. } | ShardMsg::Directory { .. }
        )
    };
    if mended_later(&msg) {
        return 1;
    }
    match backlog.iter().position(mended_later) {
        Some(i) => drop(backlog.remove(i)),
        None => drop(backlog.pop_front()),
    }
    backlog.push_back(msg);
    1
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
        f.add(std::mem::take(&mut self.sent));
        let c = core.counters_mut();
        c.udp_send_errors += f.errors;
        c.udp_send_calls += f.calls;
        c.mesh_dropped += std::mem::take(&mut self.mesh_dropped);
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
                // What was queued before goes first.
                let f = self.batch.flush(&self.socket);
                self.sent.add(f);
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
                self.sent.calls += 1;
                self.sent.errors += failed as u64;
                self.sent.sent += !failed as u64;
            }
            _ => {
                self.batch
                    .push(contents, t.destination, t.ecn.map(|e| e as u8), t.src_ip);
                if self.batch.is_full() {
                    let f = self.batch.flush(&self.socket);
                    self.sent.add(f);
                }
            }
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
            self.mesh_dropped += queue_bounded(backlog, msg);
            return;
        }
        match mesh.try_send_to(peer, msg) {
            Ok(()) => {}
            Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(m))) => {
                self.mesh_dropped += queue_bounded(backlog, m)
            }
            Err(e) => warn!(peer, error = %e, "shard mesh send failed"),
        }
    }

    fn room_result(&mut self, result: RoomResult) {
        let _ = self.results.send(result);
    }
}

pub(super) async fn run_shard(
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
            sent: net::Flushed::default(),
            results: link.results.clone(),
            mesh: senders,
            mesh_backlog: (0..peers_n).map(|_| VecDeque::new()).collect(),
            mesh_dropped: 0,
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
    use super::*;
    use crate::ids::PlayerId;

    fn chat(n: u64) -> ShardMsg {
        ShardMsg::Chat {
            player: PlayerId(n),
            text: String::new(),
        }
    }

    fn input(n: u64) -> ShardMsg {
        ShardMsg::Input {
            player: PlayerId(n),
            input: Default::default(),
        }
    }

    fn player(m: &ShardMsg) -> u64 {
        match m {
            ShardMsg::Chat { player, .. } | ShardMsg::Input { player, .. } => player.0,
            _ => unreachable!(),
        }
    }

    /// The backlog for a stalled peer stops at its bound: new inputs are dropped there, a
    /// message that must arrive displaces the oldest input, and with no input left the oldest
    /// message; each drop is counted.
    #[test]
    fn the_mesh_backlog_is_bounded_and_drops_what_is_mended_later_first() {
        let mut b = VecDeque::new();
        let mut dropped = 0;
        for n in 0..MAX_MESH_BACKLOG as u64 {
            let m = if n % 2 == 0 { input(n) } else { chat(n) };
            dropped += queue_bounded(&mut b, m);
        }
        assert_eq!((b.len(), dropped), (MAX_MESH_BACKLOG, 0));
        dropped += queue_bounded(&mut b, input(1_000_000));
        assert_eq!(dropped, 1, "a new input at the bound is dropped");
        assert!(b.iter().all(|m| player(m) != 1_000_000));
        dropped += queue_bounded(&mut b, chat(2_000_000));
        assert_eq!(b.len(), MAX_MESH_BACKLOG);
        assert_eq!(player(&b[0]), 1, "the oldest input (0) made room");
        assert_eq!(player(b.back().unwrap()), 2_000_000);
        // Only chats left: the oldest message goes.
        let mut c: VecDeque<ShardMsg> = (0..MAX_MESH_BACKLOG as u64).map(chat).collect();
        dropped += queue_bounded(&mut c, chat(3_000_000));
        assert_eq!(player(&c[0]), 1);
        assert_eq!(dropped, 3);
    }
}
