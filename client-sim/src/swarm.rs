//! The swarm engine: many bots per event loop, one loop per thread.
//!
//! (About 1,150 lines: one event loop whose pass is read top to bottom; the bots' own logic
//! is in `behavior` and `check`.)
//!
//! Each thread owns a slice of the bots and a few UDP sockets (one per
//! [`SwarmConfig::bots_per_socket`] bots). Bots tag their QUIC connection IDs with their
//! number ([`Client::connect_tagged`]), so the datagrams arriving on a shared socket are
//! handed to their bot by reading the tag ([`cid_tag`]). A pass of the loop receives with
//! `recvmmsg`, fires the bots' due timers (quinn's timers and link-conditioner releases, kept
//! in one heap), runs the swarm's tick (every bot acts), services only the bots that something
//! happened to, and sends everything queued with `sendmmsg`; then it sleeps in `ppoll` until
//! a socket is readable or the next deadline. No task or thread per bot.

use crate::behavior::{Action, Behavior, Brain, FLAG_DEAD};
use crate::check::MovementCheck;
use crate::drive::Delayed;
use crate::link::Link;
use crate::{cid_tag, Client, ClientConfig, ClientEvent, CloseReason, SessionState};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How late a bot's timer may fire, to batch wake-ups: small against link latencies and
/// QUIC's acknowledgement delay (25 ms).
const TIMER_SLACK: Duration = Duration::from_micros(500);

/// What to run.
#[derive(Clone)]
pub struct SwarmConfig {
    /// The server.
    pub server: SocketAddr,
    /// Number of bots.
    pub bots: usize,
    /// Event-loop threads (bots are split evenly).
    pub threads: usize,
    /// Bots sharing one UDP socket.
    pub bots_per_socket: usize,
    /// Bots connect evenly spread over this time.
    pub ramp: Duration,
    /// Play after the ramp.
    pub duration: Duration,
    /// A bot without a seat this long after it started connecting has failed.
    pub join_timeout: Duration,
    /// Game mode for quick match.
    pub mode: String,
    /// Join this room instead of quick match.
    pub room: Option<u64>,
    /// How bots play.
    pub behavior: Behavior,
    /// The same seed makes the same swarm.
    pub seed: u64,
    /// Swarm ticks (inputs) per second.
    pub tick_rate: u32,
    /// Link conditions of what bots send.
    pub up: Link,
    /// Link conditions of what bots receive.
    pub down: Link,
    /// How bots reach and trust the server.
    pub client: ClientConfig,
    /// Whether a bot whose connection is lost (a reset after a server restart, a timeout, a
    /// close other than a drain) connects again and rejoins, as a game client would, and
    /// whether one whose room ended joins another.
    pub reconnect: bool,
}

/// First wait before a lost bot connects again; it doubles per failed attempt up to
/// [`RECONNECT_MAX`], plus up to 200 ms spread by bot number so a swarm does not return in
/// one burst.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
/// Longest wait before a lost bot connects again.
const RECONNECT_MAX: Duration = Duration::from_secs(4);

/// Live figures of one thread, published a few times a second (not per packet).
#[derive(Debug, Default)]
pub struct ThreadProgress {
    /// Bots that started connecting.
    pub started: AtomicU64,
    /// Bots seated at least once.
    pub connected: AtomicU64,
    /// Bots that failed to get a seat.
    pub failed: AtomicU64,
    /// Bots that lost their connection after playing.
    pub disconnected: AtomicU64,
    /// Snapshots received.
    pub snapshots: AtomicU64,
    /// Error messages, decode errors and divergences.
    pub errors: AtomicU64,
    /// UDP bytes received.
    pub bytes_in: AtomicU64,
    /// UDP bytes sent.
    pub bytes_out: AtomicU64,
    /// RTT p50 over this thread's seated bots, µs.
    pub rtt_p50_us: AtomicU64,
    /// RTT p99 over this thread's seated bots, µs.
    pub rtt_p99_us: AtomicU64,
}

/// Live figures of the whole swarm.
#[derive(Debug)]
pub struct Progress {
    /// One per thread.
    pub threads: Vec<ThreadProgress>,
}

impl Progress {
    /// Progress slots for `threads` threads.
    pub fn new(threads: usize) -> Self {
        Progress {
            threads: (0..threads).map(|_| ThreadProgress::default()).collect(),
        }
    }

    /// Sum of one figure over the threads.
    pub fn sum(&self, f: impl Fn(&ThreadProgress) -> &AtomicU64) -> u64 {
        self.threads.iter().map(|t| f(t).load(Relaxed)).sum()
    }

    /// Largest of one figure over the threads.
    pub fn max(&self, f: impl Fn(&ThreadProgress) -> &AtomicU64) -> u64 {
        self.threads
            .iter()
            .map(|t| f(t).load(Relaxed))
            .max()
            .unwrap_or(0)
    }
}

/// What one bot went through.
#[derive(Debug, Clone, Default)]
pub struct BotResult {
    /// The bot's number.
    pub index: usize,
    /// Started connecting.
    pub started: Option<Instant>,
    /// Got the server's welcome.
    pub welcomed: Option<Instant>,
    /// First seated.
    pub joined: Option<Instant>,
    /// The room's tick rate.
    pub room_rate: u16,
    /// Snapshots received while seated.
    pub snapshots_in_room: u64,
    /// When and why it stopped before the end (a failure if it never sat).
    pub ended: Option<(Instant, String)>,
    /// Errors the server answered with, by code.
    pub errors: BTreeMap<u16, u64>,
    /// Drain notices received.
    pub drain_notices: u64,
    /// Observations of its own movement checked.
    pub movement_checked: u64,
    /// Observations that diverged from its commands.
    pub divergences: u64,
    /// Commands the server skipped (a full input queue), inferred from replays.
    pub skipped_commands: u64,
    /// The first divergence.
    pub first_divergence: Option<String>,
    /// Snapshots that failed to decode or named a missing baseline.
    pub decode_errors: u64,
    /// Snapshots arriving after a newer one.
    pub late_snapshots: u64,
    /// Snapshot bytes.
    pub snapshot_bytes: u64,
    /// Snapshots applied (in or out of a room).
    pub snapshots: u64,
    /// UDP bytes received.
    pub bytes_in: u64,
    /// UDP bytes sent.
    pub bytes_out: u64,
    /// Connections lost and made again (with `reconnect`).
    pub reconnects: u64,
    /// For each time it was out of a room it had (connection lost, room ended) and got a
    /// seat again: how long that took.
    pub recoveries: Vec<Duration>,
    /// Datagrams the link conditioner dropped (up, down).
    pub link_dropped: (u64, u64),
    /// The last smoothed RTT.
    pub rtt: Duration,
    /// Chat lines and game events received.
    pub messages: u64,
}

/// Figures of one second of the run, for plots.
#[derive(Debug, Clone)]
pub struct Second {
    /// RTT samples (µs), one per seated bot.
    pub rtt_us: Histogram<u32>,
    /// Snapshot intervals (µs).
    pub interval_us: Histogram<u32>,
}

impl Second {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 10_000_000, 2).expect("static bounds");
        Second {
            rtt_us: h(),
            interval_us: h(),
        }
    }
}

/// HDR histograms over the whole run, in microseconds.
#[derive(Debug, Clone)]
pub struct Histograms {
    /// Connect to welcome.
    pub handshake_us: Histogram<u64>,
    /// RTT, sampled once a second per seated bot.
    pub rtt_us: Histogram<u64>,
    /// Time between consecutive snapshots of one bot.
    pub interval_us: Histogram<u64>,
    /// |interval - room tick period|.
    pub jitter_us: Histogram<u64>,
    /// Sending an input to the first snapshot saying it was applied.
    pub input_ack_us: Histogram<u64>,
}

impl Histograms {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds");
        Histograms {
            handshake_us: h(),
            rtt_us: h(),
            interval_us: h(),
            jitter_us: h(),
            input_ack_us: h(),
        }
    }

    fn add(&mut self, o: &Histograms) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.handshake_us.add(&o.handshake_us);
        let _ = self.rtt_us.add(&o.rtt_us);
        let _ = self.interval_us.add(&o.interval_us);
        let _ = self.jitter_us.add(&o.jitter_us);
        let _ = self.input_ack_us.add(&o.input_ack_us);
    }
}

/// Everything a swarm run measured.
#[derive(Debug, Clone)]
pub struct SwarmResult {
    /// When the run started (bot 0 connects).
    pub start: Instant,
    /// When play ended.
    pub end: Instant,
    /// Per bot, in bot order.
    pub bots: Vec<BotResult>,
    /// Whole-run histograms.
    pub hist: Histograms,
    /// Per second since `start`.
    pub seconds: Vec<Second>,
    /// Datagrams the kernel refused to send.
    pub send_errors: u64,
    /// Datagrams that named no bot of ours (stateless resets not counted).
    pub stray_datagrams: u64,
    /// Stateless resets recognised (each ends one bot's connection at once).
    pub stateless_resets: u64,
    /// Swarm ticks skipped because a pass ran late.
    pub ticks_skipped: u64,
}

/// Runs the swarm to the end and returns what it measured. `progress` is updated as it goes.
pub fn run(config: &SwarmConfig, progress: &Progress) -> io::Result<SwarmResult> {
    let threads = config.threads.clamp(1, config.bots.max(1));
    assert!(
        progress.threads.len() >= threads,
        "one progress slot per thread"
    );
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + config.ramp + config.duration;
    let per = config.bots.div_ceil(threads);
    let results: Vec<io::Result<ThreadResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * per).min(config.bots)..((t + 1) * per).min(config.bots);
                let slot = &progress.threads[t];
                std::thread::Builder::new()
                    .name(format!("swarm-{t}"))
                    .spawn_scoped(s, move || Loop::new(config, range, start, end, slot)?.run())
                    .expect("spawning a swarm thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a swarm thread panicked"))
            .collect()
    });
    let mut out = SwarmResult {
        start,
        // Earlier than planned when every bot stopped (a drain, a server gone).
        end: end.min(Instant::now()),
        bots: Vec::with_capacity(config.bots),
        hist: Histograms::new(),
        seconds: Vec::new(),
        send_errors: 0,
        stray_datagrams: 0,
        stateless_resets: 0,
        ticks_skipped: 0,
    };
    for r in results {
        let r = r?;
        out.bots.extend(r.bots);
        out.hist.add(&r.hist);
        for (i, sec) in r.seconds.into_iter().enumerate() {
            if out.seconds.len() <= i {
                out.seconds.push(Second::new());
            }
            let _ = out.seconds[i].rtt_us.add(&sec.rtt_us);
            let _ = out.seconds[i].interval_us.add(&sec.interval_us);
        }
        out.send_errors += r.send_errors;
        out.stray_datagrams += r.stray;
        out.stateless_resets += r.resets;
        out.ticks_skipped = out.ticks_skipped.max(r.ticks_skipped);
    }
    Ok(out)
}

struct ThreadResult {
    bots: Vec<BotResult>,
    hist: Histograms,
    seconds: Vec<Second>,
    send_errors: u64,
    stray: u64,
    resets: u64,
    ticks_skipped: u64,
}

/// What earlier connections of a bot counted, added to its last one's at the end.
#[derive(Default, Clone, Copy)]
struct Carried {
    decode_errors: u64,
    late_snapshots: u64,
    snapshot_bytes: u64,
    snapshots: u64,
}

struct Bot {
    r: BotResult,
    brain: Brain,
    check: MovementCheck,
    client: Option<Client>,
    socket: usize,
    connect_at: Instant,
    up: Option<Delayed>,
    down: Option<Delayed>,
    tick: u64,
    last_snapshot: Option<Instant>,
    armed: Option<Instant>,
    touched: bool,
    done: bool,
    /// Since when the bot has been out of a room it had (lost connection, room ended).
    lost_at: Option<Instant>,
    /// Connection attempts since the bot was last seated (for the reconnect backoff).
    attempts: u32,
    /// Connections made so far.
    sessions: u32,
    carried: Carried,
}

struct Loop<'a> {
    config: &'a SwarmConfig,
    first: usize,
    start: Instant,
    end: Instant,
    slot: &'a ThreadProgress,
    sockets: Vec<UdpSocket>,
    bots: Vec<Bot>,
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
    touched: Vec<u32>,
    rx: RecvBatch,
    tx: Vec<SendBatch>,
    buf: Vec<u8>,
    actions: Vec<Action>,
    hist: Histograms,
    seconds: Vec<Second>,
    stray: u64,
    resets: u64,
    ticks_skipped: u64,
    /// Bots waiting to connect again, by when.
    reconnects: BinaryHeap<Reverse<(Instant, u32)>>,
}

impl<'a> Loop<'a> {
    fn new(
        config: &'a SwarmConfig,
        range: std::ops::Range<usize>,
        start: Instant,
        end: Instant,
        slot: &'a ThreadProgress,
    ) -> io::Result<Self> {
        let n = range.len();
        let per_socket = config.bots_per_socket.max(1);
        let bind: SocketAddr = match (config.server.is_ipv6(), config.server.ip().is_loopback()) {
            (false, true) => "127.0.0.1:0",
            (false, false) => "0.0.0.0:0",
            (true, true) => "[::1]:0",
            (true, false) => "[::]:0",
        }
        .parse()
        .expect("static address");
        let mut sockets = Vec::new();
        for k in 0..n.div_ceil(per_socket) {
            // Against a loopback server each socket has a loopback address of its own
            // (127.0.x.y, unique per socket: the thread's first bot number plus the socket's),
            // as bots on many hosts would: a server's per-address cap then sees at most one
            // socket's bots per address.
            let bind = match bind {
                SocketAddr::V4(v4) if v4.ip().is_loopback() => {
                    let index = range.start + k;
                    let (x, y) = ((index / 250) as u8, (index % 250 + 1) as u8);
                    SocketAddr::from(([127, 0, x, y], 0))
                }
                other => other,
            };
            let s = UdpSocket::bind(bind)?;
            s.set_nonblocking(true)?;
            // A tick's worth of snapshots for every bot on the socket arrives at once.
            // Best effort: the kernel caps these at net.core.{r,w}mem_max.
            let sock = socket2::SockRef::from(&s);
            let _ = sock.set_recv_buffer_size(4 << 20);
            let _ = sock.set_send_buffer_size(4 << 20);
            sockets.push(s);
        }
        let bots_total = config.bots.max(1) as f64;
        let bots = range
            .clone()
            .enumerate()
            .map(|(local, i)| {
                let link_seed = config.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                Bot {
                    r: BotResult {
                        index: i,
                        ..Default::default()
                    },
                    brain: Brain::new(config.behavior, config.seed, i as u64),
                    check: MovementCheck::new(30, config.behavior.exact_movement()),
                    client: None,
                    socket: local / per_socket,
                    connect_at: start + config.ramp.mul_f64(i as f64 / bots_total),
                    up: (!config.up.is_perfect())
                        .then(|| Delayed::new(config.up, link_seed ^ 0x5550)),
                    down: (!config.down.is_perfect())
                        .then(|| Delayed::new(config.down, link_seed ^ 0xd0d0)),
                    tick: 0,
                    last_snapshot: None,
                    armed: None,
                    touched: false,
                    done: false,
                    lost_at: None,
                    attempts: 0,
                    sessions: 0,
                    carried: Carried::default(),
                }
            })
            .collect();
        Ok(Loop {
            config,
            first: range.start,
            start,
            end,
            slot,
            tx: (0..sockets.len()).map(|_| SendBatch::default()).collect(),
            sockets,
            bots,
            heap: BinaryHeap::new(),
            touched: Vec::new(),
            rx: RecvBatch::new(64),
            buf: Vec::with_capacity(2048),
            actions: Vec::new(),
            hist: Histograms::new(),
            seconds: Vec::new(),
            stray: 0,
            resets: 0,
            ticks_skipped: 0,
            reconnects: BinaryHeap::new(),
        })
    }

    fn touch(&mut self, i: usize) {
        let b = &mut self.bots[i];
        if !b.touched {
            b.touched = true;
            self.touched.push(i as u32);
        }
    }

    fn run(mut self) -> io::Result<ThreadResult> {
        let period = Duration::from_secs(1) / self.config.tick_rate.max(1);
        let mut next_tick = self.start;
        let mut next_connect = 0usize;
        let mut next_second = self.start + Duration::from_secs(1);
        let mut next_publish = self.start;
        let mut pollfds: Vec<libc::pollfd> = self
            .sockets
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        loop {
            let now = Instant::now();
            if now >= self.end {
                break;
            }
            // Bots whose turn to connect has come.
            while next_connect < self.bots.len() && self.bots[next_connect].connect_at <= now {
                self.connect(next_connect, now);
                next_connect += 1;
            }
            while let Some(&Reverse((at, i))) = self.reconnects.peek() {
                if at > now {
                    break;
                }
                self.reconnects.pop();
                self.connect(i as usize, now);
            }
            self.receive(now)?;
            // Due timers.
            while let Some(&Reverse((at, i))) = self.heap.peek() {
                if at > now {
                    break;
                }
                self.heap.pop();
                let b = &mut self.bots[i as usize];
                if b.armed != Some(at) {
                    continue; // superseded
                }
                b.armed = None;
                if let (Some(down), Some(c)) = (&mut b.down, &mut b.client) {
                    while let Some((data, from)) = down.pop_due(now) {
                        c.handle_datagram(now, from, BytesMut::from(&data[..]));
                    }
                }
                if let Some(c) = &mut b.client {
                    c.handle_timeout(now);
                }
                self.touch(i as usize);
            }
            if now >= next_tick {
                self.tick(now);
                next_tick += period;
                if next_tick + period < now {
                    self.ticks_skipped += 1;
                    next_tick = now + period;
                }
            }
            if now >= next_second {
                self.sample_second(now);
                next_second += Duration::from_secs(1);
            }
            self.service(now);
            for (s, tx) in self.sockets.iter().zip(&mut self.tx) {
                tx.flush(s.as_raw_fd());
            }
            if now >= next_publish {
                self.publish();
                next_publish = now + Duration::from_millis(250);
                // Every bot of this loop has started and stopped (failed, disconnected or
                // told to drain): nothing is left to play.
                if next_connect == self.bots.len() && self.bots.iter().all(|b| b.done) {
                    break;
                }
            }
            // Sleep until a socket is readable or the next deadline.
            let mut deadline = next_tick.min(next_second).min(self.end).min(next_publish);
            if let Some(b) = self.bots.get(next_connect) {
                deadline = deadline.min(b.connect_at);
            }
            if let Some(&Reverse((at, _))) = self.reconnects.peek() {
                deadline = deadline.min(at);
            }
            if let Some(&Reverse((at, _))) = self.heap.peek() {
                // Bots' timers wake the loop a little late, so that those falling due close
                // together are fired in one pass instead of one wake-up each (on an impaired
                // link every held datagram has its own release time).
                deadline = deadline.min(at + TIMER_SLACK);
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                let ts = libc::timespec {
                    tv_sec: wait.as_secs() as libc::time_t,
                    tv_nsec: wait.subsec_nanos() as libc::c_long,
                };
                // SAFETY: `pollfds` is a valid array of pollfd for the call's duration.
                unsafe {
                    libc::ppoll(
                        pollfds.as_mut_ptr(),
                        pollfds.len() as libc::nfds_t,
                        &ts,
                        std::ptr::null(),
                    );
                }
            }
        }
        // The end: close every connection politely.
        let now = Instant::now();
        for i in 0..self.bots.len() {
            let b = &mut self.bots[i];
            if let Some(c) = &mut b.client {
                c.close(now);
            }
            b.r.link_dropped = (
                b.up.as_ref().map_or(0, |d| d.conditioner.dropped),
                b.down.as_ref().map_or(0, |d| d.conditioner.dropped),
            );
            b.up = None; // closes go out at once
            self.touch(i);
        }
        self.service(now);
        for (s, tx) in self.sockets.iter().zip(&mut self.tx) {
            tx.flush(s.as_raw_fd());
        }
        self.publish();
        let send_errors = self.tx.iter().map(|t| t.errors).sum();
        let bots = self
            .bots
            .into_iter()
            .map(|mut b| {
                let mut totals = b.carried;
                if let Some(c) = &b.client {
                    let st = c.stats();
                    totals.decode_errors += st.decode_errors;
                    totals.late_snapshots += st.snapshots_late;
                    totals.snapshot_bytes += st.snapshot_bytes;
                    totals.snapshots += st.snapshots;
                    b.r.rtt = c.rtt();
                }
                b.r.decode_errors = totals.decode_errors;
                b.r.late_snapshots = totals.late_snapshots;
                b.r.snapshot_bytes = totals.snapshot_bytes;
                b.r.snapshots = totals.snapshots;
                b.r.movement_checked = b.check.checked;
                b.r.divergences = b.check.divergences;
                b.r.skipped_commands = b.check.skipped;
                b.r.first_divergence = b.check.first.take();
                b.r
            })
            .collect();
        Ok(ThreadResult {
            bots,
            hist: self.hist,
            seconds: self.seconds,
            send_errors,
            stray: self.stray,
            resets: self.resets,
            ticks_skipped: self.ticks_skipped,
        })
    }

    fn connect(&mut self, i: usize, now: Instant) {
        let global = self.first + i;
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.config.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&(global as u64).to_le_bytes());
        let b = &mut self.bots[i];
        // Each connection of a bot its own keys and IDs.
        seed[16..20].copy_from_slice(&b.sessions.to_le_bytes());
        b.sessions += 1;
        b.attempts += 1;
        b.r.started.get_or_insert(now);
        match Client::connect_tagged(
            now,
            &self.config.client,
            self.config.server,
            Some(seed),
            Some(global as u32),
        ) {
            Ok(c) => b.client = Some(c),
            Err(e) => {
                b.r.ended = Some((now, format!("connect: {e}")));
                b.done = true;
            }
        }
        self.touch(i);
    }

    fn receive(&mut self, now: Instant) -> io::Result<()> {
        for s in 0..self.sockets.len() {
            // Bounded: a flood cannot starve the tick.
            for _ in 0..16 {
                let n = self.rx.recv(self.sockets[s].as_raw_fd())?;
                for k in 0..n {
                    let (data, from) = self.rx.get(k);
                    let Some(local) = cid_tag(data)
                        .and_then(|t| (t as usize).checked_sub(self.first))
                        .filter(|&l| l < self.bots.len() && self.bots[l].socket == s)
                    else {
                        // A stateless reset names no bot: its last 16 bytes are one of the
                        // socket's connections' reset token.
                        let reset = self.bots.iter_mut().enumerate().find_map(|(l, b)| {
                            let c = b.client.as_mut().filter(|_| b.socket == s)?;
                            c.handle_stray(now, from, data).then_some(l)
                        });
                        match reset {
                            Some(l) => {
                                self.resets += 1;
                                if !self.bots[l].touched {
                                    self.bots[l].touched = true;
                                    self.touched.push(l as u32);
                                }
                            }
                            None => self.stray += 1,
                        }
                        continue;
                    };
                    let b = &mut self.bots[local];
                    b.r.bytes_in += data.len() as u64;
                    match (&mut b.down, &mut b.client) {
                        (Some(down), Some(_)) => down.push(now, data, from),
                        (None, Some(c)) => c.handle_datagram(now, from, BytesMut::from(data)),
                        _ => {}
                    }
                    if !b.touched {
                        b.touched = true;
                        self.touched.push(local as u32);
                    }
                }
                if n < self.rx.capacity() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn tick(&mut self, now: Instant) {
        for i in 0..self.bots.len() {
            let b = &mut self.bots[i];
            let Some(c) = &mut b.client else { continue };
            if b.done || b.r.joined.is_none() || !matches!(c.state(), SessionState::InRoom { .. }) {
                continue;
            }
            self.actions.clear();
            b.brain
                .act(b.tick, c.world(), c.entity_id(), &mut self.actions);
            b.tick += 1;
            for a in self.actions.drain(..) {
                a.perform(c, now, &self.config.mode, &mut b.check);
            }
            if !b.touched {
                b.touched = true;
                self.touched.push(i as u32);
            }
        }
    }

    fn sample_second(&mut self, now: Instant) {
        let sec = ((now - self.start).as_secs() as usize).saturating_sub(1);
        while self.seconds.len() <= sec {
            self.seconds.push(Second::new());
        }
        for b in &mut self.bots {
            let Some(c) = &b.client else { continue };
            if b.done {
                continue;
            }
            if b.r.joined.is_some() {
                let us = c.rtt().as_micros() as u64;
                self.hist.rtt_us.saturating_record(us.max(1));
                self.seconds[sec].rtt_us.saturating_record(us.max(1));
            } else if b
                .r
                .started
                .is_some_and(|s| now.saturating_duration_since(s) > self.config.join_timeout)
            {
                let why = if b.r.welcomed.is_some() {
                    "no seat within the join timeout"
                } else {
                    "no welcome within the join timeout"
                };
                b.r.ended = Some((now, why.into()));
                b.done = true;
            }
        }
    }

    fn publish(&mut self) {
        let (mut started, mut connected, mut failed, mut disc, mut snaps, mut errs) =
            (0, 0, 0, 0, 0, 0);
        let (mut bytes_in, mut bytes_out) = (0, 0);
        let mut rtts: Vec<u64> = Vec::new();
        for b in &self.bots {
            started += b.r.started.is_some() as u64;
            connected += b.r.joined.is_some() as u64;
            failed += (b.r.joined.is_none() && b.r.ended.is_some()) as u64;
            disc += (b.r.joined.is_some() && b.r.ended.is_some()) as u64;
            snaps += b.r.snapshots_in_room;
            bytes_in += b.r.bytes_in;
            bytes_out += b.r.bytes_out;
            errs += b.r.errors.values().sum::<u64>() + b.check.divergences;
            if let Some(c) = &b.client {
                errs += c.stats().decode_errors;
                if b.r.joined.is_some() && !b.done {
                    rtts.push(c.rtt().as_micros() as u64);
                }
            }
        }
        rtts.sort_unstable();
        let pct = |q: f64| {
            rtts.get(((rtts.len().max(1) - 1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        let s = self.slot;
        s.started.store(started, Relaxed);
        s.connected.store(connected, Relaxed);
        s.failed.store(failed, Relaxed);
        s.disconnected.store(disc, Relaxed);
        s.snapshots.store(snaps, Relaxed);
        s.bytes_in.store(bytes_in, Relaxed);
        s.bytes_out.store(bytes_out, Relaxed);
        s.errors.store(errs, Relaxed);
        s.rtt_p50_us.store(pct(0.5), Relaxed);
        s.rtt_p99_us.store(pct(0.99), Relaxed);
    }

    fn service(&mut self, now: Instant) {
        let sec = now.saturating_duration_since(self.start).as_secs() as usize;
        let mut touched = std::mem::take(&mut self.touched);
        for &i in &touched {
            let i = i as usize;
            let b = &mut self.bots[i];
            b.touched = false;
            let Some(c) = &mut b.client else { continue };
            let mut saw_snapshot = false;
            let mut lost = false;
            while let Some(ev) = c.poll_event() {
                match ev {
                    ClientEvent::Welcome { .. } => {
                        b.r.welcomed = Some(now);
                        if let Some(s) = b.r.started {
                            record(&mut self.hist.handshake_us, now - s);
                        }
                        if !b.done {
                            c.join(self.config.room, &self.config.mode);
                        }
                    }
                    ClientEvent::Joined { tick_rate, .. } => {
                        if b.r.joined.is_none() {
                            b.r.joined = Some(now);
                            b.r.room_rate = tick_rate;
                        }
                        b.attempts = 0;
                        if let Some(lost_at) = b.lost_at.take() {
                            b.r.recoveries.push(now - lost_at);
                        }
                        b.check =
                            MovementCheck::new(tick_rate, self.config.behavior.exact_movement());
                        b.last_snapshot = None;
                    }
                    ClientEvent::Snapshot { .. } => {
                        if b.r.joined.is_some() && !b.done {
                            b.r.snapshots_in_room += 1;
                            saw_snapshot = true;
                            if let Some(prev) = b.last_snapshot {
                                let gap = now - prev;
                                let period =
                                    Duration::from_secs(1) / u32::from(b.r.room_rate.max(1));
                                record(&mut self.hist.interval_us, gap);
                                record(&mut self.hist.jitter_us, gap.abs_diff(period));
                                while self.seconds.len() <= sec {
                                    self.seconds.push(Second::new());
                                }
                                self.seconds[sec]
                                    .interval_us
                                    .saturating_record((gap.as_micros() as u64).max(1));
                            }
                            b.last_snapshot = Some(now);
                        }
                    }
                    ClientEvent::InputApplied { latency, .. } => {
                        record(&mut self.hist.input_ack_us, latency);
                    }
                    ClientEvent::Error { code, message } => {
                        *b.r.errors.entry(code).or_default() += 1;
                        if b.r.joined.is_none() && !b.done {
                            b.r.ended = Some((now, format!("join refused: {code} {message}")));
                            b.done = true;
                        }
                    }
                    ClientEvent::Drain { .. } => {
                        // As a game would: finish up and leave (a real client would then
                        // reconnect to the hint). Play ends here, not as a failure.
                        b.r.drain_notices += 1;
                        if !b.done {
                            b.r.ended = Some((now, "server draining".into()));
                            b.done = true;
                            if b.r.joined.is_some() {
                                c.leave();
                            }
                            c.close(now);
                        }
                    }
                    ClientEvent::Left { reason, .. } => {
                        if self.config.reconnect && !b.done && now < self.end {
                            // As a game would: back to quick match.
                            b.lost_at.get_or_insert(now);
                            c.join(self.config.room, &self.config.mode);
                        } else if !b.done {
                            b.r.ended = Some((now, format!("left the room: {reason:?}")));
                            b.done = true;
                        }
                    }
                    ClientEvent::Closed(reason) => {
                        let local = matches!(reason, CloseReason::Local);
                        if self.config.reconnect && !b.done && !local && now < self.end {
                            lost = true;
                        } else if !b.done {
                            let why = match reason {
                                CloseReason::Server { code, reason } => {
                                    format!("closed by server: {code} {reason}")
                                }
                                CloseReason::TimedOut => "timed out".into(),
                                CloseReason::Local => "closed".into(),
                                CloseReason::Transport(t) => format!("transport: {t}"),
                            };
                            b.r.ended = Some((now, why));
                            b.done = true;
                        }
                    }
                    ClientEvent::Chat { .. } | ClientEvent::GameEvent { .. } => b.r.messages += 1,
                }
            }
            if lost {
                // Connect again after a backoff; what this connection counted is kept.
                let st = c.stats();
                b.carried.decode_errors += st.decode_errors;
                b.carried.late_snapshots += st.snapshots_late;
                b.carried.snapshot_bytes += st.snapshot_bytes;
                b.carried.snapshots += st.snapshots;
                b.client = None;
                b.armed = None;
                b.lost_at.get_or_insert(now);
                b.r.reconnects += 1;
                let backoff = RECONNECT_MIN
                    .saturating_mul(1 << b.attempts.min(5))
                    .min(RECONNECT_MAX)
                    + Duration::from_millis((i as u64 * 37) % 200);
                self.reconnects.push(Reverse((now + backoff, i as u32)));
                continue;
            }
            if saw_snapshot {
                if let Some(e) = c.own_entity() {
                    let (x, y, dead) = (e.x(), e.y(), e.flags() & FLAG_DEAD != 0);
                    b.check.observe(c.last_applied_input(), x, y, dead);
                }
            }
            // Transmit.
            let tx = &mut self.tx[b.socket];
            while let Some(t) = c.poll_transmit(now, &mut self.buf) {
                let seg = t.segment_size.unwrap_or(t.size).max(1);
                for chunk in self.buf[..t.size].chunks(seg) {
                    match &mut b.up {
                        Some(up) => up.push(now, chunk, t.destination),
                        None => {
                            b.r.bytes_out += chunk.len() as u64;
                            tx.push(chunk, t.destination);
                        }
                    }
                }
            }
            if let Some(up) = &mut b.up {
                while let Some((data, to)) = up.pop_due(now) {
                    b.r.bytes_out += data.len() as u64;
                    tx.push(&data, to);
                }
            }
            // Re-arm the bot's one timer at its earliest deadline.
            let mut dl = c.poll_timeout();
            for d in [b.up.as_ref(), b.down.as_ref()].into_iter().flatten() {
                if let Some(at) = d.next_due() {
                    dl = Some(dl.map_or(at, |x| x.min(at)));
                }
            }
            // Only an earlier deadline needs a new heap entry: a later one is handled when the
            // armed entry fires early (nothing is due yet; the bot is re-armed then). This keeps
            // about one entry per bot in the heap.
            if let Some(at) = dl {
                if b.armed.is_none_or(|armed| at < armed) {
                    b.armed = Some(at);
                    self.heap.push(Reverse((at, i as u32)));
                }
            }
        }
        touched.clear();
        if self.touched.is_empty() {
            self.touched = touched;
        } else {
            // Something touched more bots while servicing (not expected); keep both.
            self.touched.extend(touched);
        }
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// The address the kernel wrote into `st` (`len` bytes of it) for a received datagram.
fn from_sockaddr(st: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: `st` is a sockaddr_storage the kernel filled in, `len` the length it reported
    // (never more than the storage).
    unsafe { socket2::SockAddr::new(*st, len) }.as_socket()
}

/// Datagrams queued for one socket, sent together with `sendmmsg`.
#[derive(Default)]
struct SendBatch {
    data: Vec<u8>,
    msgs: Vec<(usize, usize, socket2::SockAddr)>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    errors: u64,
}

impl SendBatch {
    fn push(&mut self, data: &[u8], to: SocketAddr) {
        self.msgs
            .push((self.data.len(), data.len(), socket2::SockAddr::from(to)));
        self.data.extend_from_slice(data);
    }

    fn flush(&mut self, fd: libc::c_int) {
        if self.msgs.is_empty() {
            return;
        }
        self.iov.clear();
        self.hdrs.clear();
        for (off, len, _) in &self.msgs {
            self.iov.push(libc::iovec {
                // SAFETY: in bounds of `data`, which is not touched until the send ends.
                iov_base: unsafe { self.data.as_mut_ptr().add(*off) } as *mut libc::c_void,
                iov_len: *len,
            });
        }
        for (k, (_, _, to)) in self.msgs.iter().enumerate() {
            // SAFETY: mmsghdr is plain data; all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            // sendmmsg reads the address and never writes it.
            h.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = to.len();
            h.msg_hdr.msg_iov = &mut self.iov[k] as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = 1;
            self.hdrs.push(h);
        }
        let mut sent = 0;
        while sent < self.hdrs.len() {
            let n = (self.hdrs.len() - sent).min(1024);
            // SAFETY: every header points at live buffers and addresses owned by `self`.
            let r = unsafe { libc::sendmmsg(fd, self.hdrs[sent..].as_mut_ptr(), n as u32, 0) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Buffer full or an error on one destination: drop that datagram, go on.
                self.errors += 1;
                sent += 1;
            } else {
                sent += r as usize;
            }
        }
        self.msgs.clear();
        self.data.clear();
    }
}

const SLOT: usize = 2048;

/// Buffers for `recvmmsg`.
struct RecvBatch {
    bufs: Vec<u8>,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_storage>,
    iov: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    fn new(n: usize) -> Self {
        RecvBatch {
            bufs: vec![0; n * SLOT],
            lens: vec![0; n],
            // SAFETY: sockaddr_storage is plain data; all-zero is valid.
            addrs: vec![unsafe { std::mem::zeroed() }; n],
            iov: Vec::with_capacity(n),
            // SAFETY: mmsghdr is plain data; all-zero is valid.
            hdrs: vec![unsafe { std::mem::zeroed() }; n],
        }
    }

    fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// Receives up to a batch without blocking; returns how many arrived.
    fn recv(&mut self, fd: libc::c_int) -> io::Result<usize> {
        let n = self.capacity();
        self.iov.clear();
        for k in 0..n {
            self.iov.push(libc::iovec {
                // SAFETY: slot k lies within `bufs`.
                iov_base: unsafe { self.bufs.as_mut_ptr().add(k * SLOT) } as *mut libc::c_void,
                iov_len: SLOT,
            });
        }
        for k in 0..n {
            let h = &mut self.hdrs[k];
            h.msg_hdr.msg_name = &mut self.addrs[k] as *mut _ as *mut libc::c_void;
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = &mut self.iov[k] as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        loop {
            // SAFETY: headers point at buffers owned by `self` that outlive the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    n as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                for k in 0..r as usize {
                    self.lens[k] = self.hdrs[k].msg_len as usize;
                }
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => continue,
                // An ICMP error from an earlier send: not fatal for the other bots.
                io::ErrorKind::ConnectionRefused => continue,
                _ => return Err(e),
            }
        }
    }

    fn get(&self, k: usize) -> (&[u8], SocketAddr) {
        let from = from_sockaddr(&self.addrs[k], self.hdrs[k].msg_hdr.msg_namelen)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        (&self.bufs[k * SLOT..k * SLOT + self.lens[k]], from)
    }
}
