//! A deterministic network for the shard core: N shards, M clients, a virtual clock, and
//! seeded loss, latency, jitter, reordering and duplication per direction.
//!
//! Modelled on quinn-proto's `tests/util.rs` `Pair`, generalised to many peers. Nothing here
//! reads the real clock or the OS RNG for decisions, so a seed replays exactly: the same seed
//! gives the same packets, in the same order, at the same virtual times.

#![allow(dead_code)]

use bytes::BytesMut;
use client_sim::{Client, ClientConfig, ClientEvent, Trust};
use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tickshard::net::tls::{self, Identity, TransportSettings};
use tickshard::shard::mesh::ShardMsg;
use tickshard::shard::operator::RoomResult;
use tickshard::shard::Outputs;
use tickshard::{builtin_modes, ShardConfig, ShardCore, ShardId};

use client_sim::link::Conditioner;
pub use client_sim::link::Link;

/// A clean 1 ms link.
pub const CLEAN: Link = Link {
    latency: Duration::from_millis(1),
    ..Link::PERFECT
};

/// Setup of a simulated network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub shards: u16,
    pub seed: u64,
    pub tick_rate: u16,
    pub capacity: u16,
    pub up: Link,
    pub down: Link,
    pub hello_timeout: Duration,
    pub lobby_timeout: Duration,
    pub empty_room_grace: Duration,
    pub max_connections: usize,
    pub admission: tickshard::shard::Admission,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            shards: 1,
            seed: 1,
            tick_rate: 30,
            capacity: 64,
            up: CLEAN,
            down: CLEAN,
            hello_timeout: Duration::from_secs(5),
            lobby_timeout: Duration::from_secs(120),
            empty_room_grace: Duration::from_secs(5),
            max_connections: 10_000,
            admission: tickshard::shard::Admission::default(),
        }
    }
}

/// Which conditioner a datagram passes.
#[derive(Clone, Copy)]
enum Dir {
    Up,
    Down,
    Clean,
}

#[derive(Clone, Copy)]
enum Dest {
    Server,
    Client(usize),
}

/// A datagram on its way; the queue orders them by (delivery time, send order).
struct InFlight {
    dest: Dest,
    from: SocketAddr,
    data: Vec<u8>,
}

/// One simulated client.
pub struct SimClient {
    pub client: Client,
    pub addr: SocketAddr,
    /// Every event the client produced, in order.
    pub events: Vec<ClientEvent>,
    /// When set, every datagram to or from this client is lost (a vanished player).
    pub cut: bool,
    /// Something happened to the client since its outputs were last collected.
    dirty: bool,
    /// The client's next timer, as of its last collection.
    timeout: Option<Instant>,
}

pub struct Net {
    pub config: NetConfig,
    pub base: Instant,
    now: Rc<Cell<Instant>>,
    pub shards: Vec<ShardCore>,
    pub clients: Vec<SimClient>,
    pub server_addr: SocketAddr,
    client_config: ClientConfig,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    flights: std::collections::HashMap<u64, InFlight>,
    next_seq: u64,
    up: Conditioner,
    down: Conditioner,
    clean: Conditioner,
    delays: Vec<Duration>,
    mesh: VecDeque<(ShardId, ShardMsg)>,
    buf: Vec<u8>,
    /// What the shards handed out in the last `poll_outputs`, until it is routed.
    out: ShardOut,
    /// Results of rooms that ended, as the shards handed them out.
    pub results: Vec<RoomResult>,
    /// Datagrams delivered to the server.
    pub delivered_up: u64,
    /// Datagrams dropped by the link conditioner.
    pub dropped: u64,
    /// Datagrams the shards sent to addresses no client has (answers to injected traffic).
    pub unrouted: Vec<(SocketAddr, Vec<u8>)>,
    /// When set, messages between shards are lost (a stuck shard).
    pub mesh_down: bool,
    /// When set, every call into a shard runs inside [`measured_server`] and every call into a
    /// client inside [`measured_client`], so an instruction counter (callgrind's
    /// `--toggle-collect`) counts each side of the measured phase and nothing of the harness.
    pub measure: bool,
}

/// A shard's outputs as [`ShardCore::poll_outputs`] hands them out: copied, then routed by the
/// harness outside the measured frame.
#[derive(Default)]
struct ShardOut {
    data: Vec<u8>,
    /// Destination, offset and length in `data`, segment size.
    datagrams: Vec<(SocketAddr, usize, usize, Option<usize>)>,
    mesh: Vec<(ShardId, ShardMsg)>,
    results: Vec<RoomResult>,
}

impl Outputs for ShardOut {
    fn transmit(&mut self, t: &quinn_proto::Transmit, contents: &[u8]) {
        self.datagrams.push((
            t.destination,
            self.data.len(),
            contents.len(),
            t.segment_size,
        ));
        self.data.extend_from_slice(contents);
    }
    fn shard_message(&mut self, to: ShardId, msg: ShardMsg) {
        self.mesh.push((to, msg));
    }
    fn room_result(&mut self, result: RoomResult) {
        self.results.push(result);
    }
}

/// Runs `f`; the frame callgrind's `--toggle-collect=*measured_server*` counts (server work).
#[inline(never)]
pub fn measured_server<R>(f: impl FnOnce() -> R) -> R {
    std::hint::black_box(f())
}

/// Runs `f`; the frame callgrind's `--toggle-collect=*measured_client*` counts (client work).
#[inline(never)]
pub fn measured_client<R>(f: impl FnOnce() -> R) -> R {
    std::hint::black_box(f())
}

/// Runs `f` inside [`measured_server`] when `on`.
fn server<R>(on: bool, f: impl FnOnce() -> R) -> R {
    if on {
        measured_server(f)
    } else {
        f()
    }
}

/// Runs `f` inside [`measured_client`] when `on`.
fn client<R>(on: bool, f: impl FnOnce() -> R) -> R {
    if on {
        measured_client(f)
    } else {
        f()
    }
}

thread_local! {
    static IDENTITY: (Vec<u8>, Vec<u8>) = {
        let id = Identity::generate().expect("dev certificate");
        (id.chain[0].to_vec(), id.key.secret_der().to_vec())
    };
}

impl Net {
    pub fn new(config: NetConfig) -> Self {
        let base = Instant::now();
        let now = Rc::new(Cell::new(base));
        let (cert, key) = IDENTITY.with(|i| i.clone());
        let identity = Identity {
            chain: vec![cert.clone().into()],
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            cert_path: None,
        };
        let server_config = tls::server_config(
            &identity,
            TransportSettings {
                idle_timeout: Duration::from_secs(10),
                tick_period: Duration::from_secs(1) / u32::from(config.tick_rate.max(1)),
            },
        )
        .unwrap();
        let shards = (0..config.shards)
            .map(|i| {
                let clock = now.clone();
                ShardCore::new(
                    ShardConfig {
                        shard: ShardId(i),
                        shards: config.shards,
                        // The arena, and its faulty twin for failure-isolation tests.
                        modes: tickshard::modes(
                            &["arena", "faulty-arena"],
                            config.capacity,
                            config.tick_rate,
                        )
                        .unwrap_or_else(|_| builtin_modes(config.capacity, config.tick_rate)),
                        server_config: server_config.clone(),
                        max_connections: config.max_connections,
                        admission: config.admission,
                        hello_timeout: config.hello_timeout,
                        lobby_timeout: config.lobby_timeout,
                        reset_key: None,
                        empty_room_grace: config.empty_room_grace,
                        max_datagram: 1100,
                        seed: Some(config.seed),
                    },
                    Box::new(move || clock.get()),
                )
            })
            .collect();
        let client_config = ClientConfig::new(Trust::Roots(vec![cert.into()]), "localhost");
        Net {
            up: Conditioner::new(config.up, config.seed ^ 0xabcdef),
            down: Conditioner::new(config.down, config.seed ^ 0xfedcba),
            clean: Conditioner::new(CLEAN, 0),
            delays: Vec::new(),
            config,
            base,
            now,
            shards,
            clients: Vec::new(),
            server_addr: "127.0.0.1:4433".parse().unwrap(),
            client_config,
            queue: BinaryHeap::new(),
            flights: Default::default(),
            next_seq: 0,
            mesh: VecDeque::new(),
            buf: Vec::new(),
            out: ShardOut::default(),
            results: Vec::new(),
            delivered_up: 0,
            dropped: 0,
            unrouted: Vec::new(),
            mesh_down: false,
            measure: false,
        }
    }

    pub fn now(&self) -> Instant {
        self.now.get()
    }

    /// Adds a client built from `f(config)` (it starts connecting at once).
    pub fn add_client_with(&mut self, f: impl FnOnce(&mut ClientConfig)) -> usize {
        let mut config = self.client_config.clone();
        f(&mut config);
        let saved = std::mem::replace(&mut self.client_config, config);
        let i = self.add_client();
        self.client_config = saved;
        i
    }

    /// Delivers raw bytes to the server as if sent from `from` (garbage, attacks).
    pub fn inject(&mut self, from: SocketAddr, data: &[u8]) {
        self.send(Dest::Server, from, data, Dir::Clean);
    }

    /// Snapshots client `i` has applied so far.
    pub fn snapshots(&self, i: usize) -> u64 {
        self.clients[i].client.stats().snapshots
    }

    /// The close reason of client `i`, if its connection ended.
    pub fn closed(&self, i: usize) -> Option<&client_sim::CloseReason> {
        self.clients[i].events.iter().find_map(|e| match e {
            ClientEvent::Closed(r) => Some(r),
            _ => None,
        })
    }

    /// Adds a client (it starts connecting at once). Returns its index.
    pub fn add_client(&mut self) -> usize {
        let i = self.clients.len();
        let addr: SocketAddr = format!("127.0.1.{}:{}", 1 + i / 60000, 1000 + i % 60000)
            .parse()
            .unwrap();
        self.add_client_at(addr)
    }

    /// Adds a client on its own port of host `ip` (many clients of one host, or one client
    /// each of many hosts).
    pub fn add_client_from(&mut self, ip: std::net::IpAddr) -> usize {
        let port = 1000 + (self.clients.len() % 60000) as u16;
        self.add_client_at(SocketAddr::new(ip, port))
    }

    /// Adds a client at `addr`, built from `f(config)`.
    pub fn add_client_from_with(
        &mut self,
        ip: std::net::IpAddr,
        f: impl FnOnce(&mut ClientConfig),
    ) -> usize {
        let mut config = self.client_config.clone();
        f(&mut config);
        let saved = std::mem::replace(&mut self.client_config, config);
        let i = self.add_client_from(ip);
        self.client_config = saved;
        i
    }

    fn add_client_at(&mut self, addr: SocketAddr) -> usize {
        let i = self.clients.len();
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&self.config.seed.to_le_bytes());
        seed[8..16].copy_from_slice(&(i as u64).to_le_bytes());
        let client = Client::connect(
            self.now(),
            &self.client_config,
            self.server_addr,
            Some(seed),
        )
        .unwrap();
        self.clients.push(SimClient {
            client,
            addr,
            events: Vec::new(),
            cut: false,
            dirty: true,
            timeout: None,
        });
        i
    }

    /// The shard the kernel program would pick for this datagram.
    fn steer(&self, data: &[u8]) -> usize {
        let b = if data.first().is_some_and(|b| b & 0x80 != 0) {
            data.get(6)
        } else {
            data.get(1)
        };
        b.copied().unwrap_or(0) as usize % self.shards.len()
    }

    fn send(&mut self, dest: Dest, from: SocketAddr, data: &[u8], dir: Dir) {
        let conditioner = match dir {
            Dir::Up => &mut self.up,
            Dir::Down => &mut self.down,
            Dir::Clean => &mut self.clean,
        };
        let mut delays = std::mem::take(&mut self.delays);
        conditioner.decide(&mut delays);
        if delays.is_empty() {
            self.dropped += 1;
        }
        for delay in &delays {
            let at = self.now() + *delay;
            let seq = self.next_seq;
            self.next_seq += 1;
            self.flights.insert(
                seq,
                InFlight {
                    dest,
                    from,
                    data: data.to_vec(),
                },
            );
            self.queue.push(Reverse((at, seq)));
        }
        self.delays = delays;
    }

    /// Collects every output of every peer into the network.
    fn collect(&mut self) {
        let now = self.now();
        let on = self.measure;
        for s in 0..self.shards.len() {
            let (shard, out) = (&mut self.shards[s], &mut self.out);
            server(on, || shard.poll_outputs(now, out));
            let mut out = std::mem::take(&mut self.out);
            for &(to, off, len, seg) in &out.datagrams {
                let dest = self.clients.iter().position(|c| c.addr == to);
                match dest {
                    Some(ci) if !self.clients[ci].cut => {
                        for seg in out.data[off..off + len].chunks(seg.unwrap_or(len)) {
                            self.send(Dest::Client(ci), self.server_addr, seg, Dir::Down);
                        }
                    }
                    Some(_) => {}
                    None => self.unrouted.push((to, out.data[off..off + len].to_vec())),
                }
            }
            out.data.clear();
            out.datagrams.clear();
            self.mesh.extend(out.mesh.drain(..));
            self.results.append(&mut out.results);
            self.out = out;
        }
        for c in 0..self.clients.len() {
            if !self.clients[c].dirty {
                continue;
            }
            loop {
                let (cl, buf) = (&mut self.clients[c].client, &mut self.buf);
                let Some(t) = client(on, || cl.poll_transmit(now, buf)) else {
                    break;
                };
                let data = std::mem::take(&mut self.buf);
                let from = self.clients[c].addr;
                let cut = self.clients[c].cut;
                for seg in data[..t.size]
                    .chunks(t.segment_size.unwrap_or(t.size))
                    .filter(|_| !cut)
                {
                    self.send(Dest::Server, from, seg, Dir::Up);
                }
                self.buf = data;
            }
            loop {
                let cl = &mut self.clients[c].client;
                let Some(ev) = client(on, || cl.poll_event()) else {
                    break;
                };
                self.clients[c].events.push(ev);
            }
            let sc = &mut self.clients[c];
            sc.timeout = client(on, || sc.client.poll_timeout());
            sc.dirty = false;
        }
    }

    fn next_event(&mut self) -> Option<Instant> {
        let now = self.now();
        let mut t: Option<Instant> = self.queue.peek().map(|r| r.0 .0);
        let mut take = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        let on = self.measure;
        for s in &mut self.shards {
            take(Some(server(on, || s.next_due(now))));
        }
        for c in &self.clients {
            take(c.timeout);
        }
        t
    }

    /// Runs the network until virtual time `until`, processing events in time order.
    pub fn run_until(&mut self, until: Instant) {
        // Tests call clients directly between runs: look at every client once.
        for c in &mut self.clients {
            c.dirty = true;
        }
        let mut steps = 0u64;
        while self.step(until) {
            steps += 1;
            assert!(steps < 10_000_000, "livelock: the network never settles");
        }
    }

    /// One step of the network: route every output, deliver what the mesh holds, then move
    /// the clock to the next event (a datagram's arrival, a shard's or a client's deadline) if
    /// it is not after `until`, and run everything due then. Returns false, with the clock at
    /// `until`, when nothing more happens by then.
    pub fn step(&mut self, until: Instant) -> bool {
        self.collect();
        if self.mesh_down {
            self.mesh.clear();
        }
        while let Some((to, msg)) = self.mesh.pop_front() {
            let now = self.now();
            let on = self.measure;
            let shard = &mut self.shards[to.0 as usize];
            let _side = tracing::info_span!("shard", id = to.0).entered();
            server(on, || shard.handle_shard_message(now, msg));
            drop(_side);
            self.collect();
        }
        let next = self.next_event().filter(|&t| t <= until);
        let Some(next) = next else {
            self.now.set(until);
            return false;
        };
        let now = next.max(self.now());
        self.now.set(now);
        let on = self.measure;
        // Deliver due datagrams.
        while let Some(&Reverse((at, seq))) = self.queue.peek() {
            if at > now {
                break;
            }
            self.queue.pop();
            let f = self.flights.remove(&seq).unwrap();
            match f.dest {
                Dest::Server => {
                    self.delivered_up += 1;
                    let s = self.steer(&f.data);
                    let data = BytesMut::from(&f.data[..]);
                    let shard = &mut self.shards[s];
                    let _side = tracing::info_span!("shard", id = s).entered();
                    server(on, || shard.handle_datagram(now, f.from, None, data));
                }
                Dest::Client(i) => {
                    let data = BytesMut::from(&f.data[..]);
                    let c = &mut self.clients[i];
                    c.dirty = true;
                    let _side = tracing::info_span!("client", id = i).entered();
                    client(on, || c.client.handle_datagram(now, f.from, data));
                }
            }
        }
        for (i, s) in self.shards.iter_mut().enumerate() {
            let _side = tracing::info_span!("shard", id = i).entered();
            server(on, || s.handle_due(now));
        }
        for (i, c) in self.clients.iter_mut().enumerate() {
            if c.timeout.is_some_and(|t| t <= now) {
                c.dirty = true;
                let _side = tracing::info_span!("client", id = i).entered();
                client(on, || c.client.handle_timeout(now));
            }
        }
        true
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now() + d;
        self.run_until(until);
    }

    /// A network of `n` clients on `config`'s shards, every one welcomed and seated by quick
    /// match in the first mode (`arena`): the setup most tests start from.
    pub fn seated(n: usize, config: NetConfig) -> Net {
        let mut net = Net::new(config);
        for _ in 0..n {
            net.add_client();
        }
        net.connect_all(Duration::from_secs(20));
        net.join_all();
        net
    }

    /// Asks every client to quick-match into `arena` and runs until all are seated (`Joined`
    /// travels on the reliable stream: under loss it may need a retransmission); panics with
    /// the events of the first client not seated after 3 s.
    pub fn join_all(&mut self) {
        for c in &mut self.clients {
            c.client.join(None, "arena");
            c.dirty = true;
        }
        let seated = |net: &Net| {
            net.clients
                .iter()
                .position(|c| !matches!(c.client.state(), client_sim::SessionState::InRoom { .. }))
        };
        let deadline = self.now() + Duration::from_secs(3);
        self.run_for(Duration::from_millis(300));
        while seated(self).is_some() && self.now() < deadline {
            self.run_for(Duration::from_millis(50));
        }
        if let Some(i) = seated(self) {
            panic!("client {i} not seated: {:?}", self.events(i));
        }
    }

    /// Runs until every client is welcomed (or panics after `limit`).
    pub fn connect_all(&mut self, limit: Duration) {
        let deadline = self.now() + limit;
        while self.clients.iter().any(|c| c.client.player_id() == 0) {
            assert!(
                self.now() < deadline,
                "clients not welcomed within {limit:?}: {:?}",
                self.clients
                    .iter()
                    .map(|c| c.client.state().clone())
                    .collect::<Vec<_>>()
            );
            self.run_for(Duration::from_millis(10));
        }
    }

    /// Plays `ticks` client ticks at the tick rate; `input(net, client index, tick)` gives each
    /// seated client's command (move_x, move_y, buttons, aim) or None to send nothing.
    pub fn play(
        &mut self,
        ticks: u32,
        mut input: impl FnMut(usize, u32) -> Option<(i8, i8, u8, u16)>,
    ) {
        let period = Duration::from_secs(1) / self.config.tick_rate as u32;
        for t in 0..ticks {
            let now = self.now();
            for i in 0..self.clients.len() {
                if self.clients[i].client.entity_id().is_some() {
                    if let Some((x, y, b, a)) = input(i, t) {
                        let c = &mut self.clients[i];
                        c.dirty = true;
                        client(self.measure, || c.client.send_input(now, x, y, b, a));
                    }
                }
            }
            self.run_for(period);
        }
    }

    /// The events a client has seen.
    pub fn events(&self, i: usize) -> &[ClientEvent] {
        &self.clients[i].events
    }
}
