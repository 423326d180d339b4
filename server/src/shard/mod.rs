//! The shard core: one shard's QUIC endpoint, sessions and rooms, with no I/O of its own.
//!
//! Like quinn-proto's `Connection`, [`ShardCore`] performs no I/O and reads no clock: the
//! caller passes `now` into every call and carries out what the core asks for. In production
//! the glommio loop of `runtime/shard_loop.rs` drives it; in tests a harness with a virtual clock does.
//!
//! Its parts, each in its own file: [`room`] (seats, input queues, the tick pipeline),
//! [`snapshot`] (per-viewer delta snapshots), [`mesh`] (messages between shards), [`stats`]
//! (counters and histograms), [`operator`] (commands operators may give a shard, the report
//! it publishes, drain states, room results), [`matchmaking`] (where quick match seats a
//! player, and the directory of other shards' rooms). Connections and sessions are in this
//! file.
//!
//! # Methods
//! - getters: [`ShardCore::id`], [`ShardCore::counters`], [`ShardCore::tick_stats`],
//!   [`ShardCore::rooms`], [`ShardCore::players`], ...
//! - inputs: [`ShardCore::handle_datagram`] (a UDP datagram arrived),
//!   [`ShardCore::handle_timeout`] (a deadline from `poll_timeout` passed),
//!   [`ShardCore::handle_tick`] (a room tick from `next_tick` is due),
//!   [`ShardCore::handle_shard_message`] (a message from another shard arrived);
//!   [`ShardCore::handle_due`] runs both of the last two in the one order every driver uses;
//! - outputs, to take after every input: [`ShardCore::poll_outputs`] hands them to an
//!   [`Outputs`] in this order: [`ShardCore::poll_transmit`] until `None` (UDP datagrams to
//!   send), [`ShardCore::poll_shard_message`] until `None` (messages for other shards),
//!   [`ShardCore::poll_room_result`] until `None` (results of rooms that ended); then
//!   [`ShardCore::next_due`], the earlier of [`ShardCore::poll_timeout`] and
//!   [`ShardCore::next_tick`], says when to call [`ShardCore::handle_due`] again. The runtime and the test harness both drive the core
//!   this way and no other.
//!
//! # Sessions
//! A connection's client opens one bidirectional stream, the control stream, and sends
//! `Hello` within the hello timeout; the server answers `Welcome`. From then on the client
//! may `Join` (a room id, or quick match by mode), `Leave` and `Chat`, and sends input
//! datagrams while seated. Every frame and datagram is verified before use. Bad input gets a
//! defined answer (see PROTOCOL.md): ignored and counted, an `Error` message, or the one
//! connection closed with an application error code and reason. Other players never notice.

pub mod matchmaking;
pub mod mesh;
pub mod operator;
pub mod room;
pub mod snapshot;
pub mod stats;
pub mod timers;

use crate::game::{ModeSpec, Standing};
use crate::ids::{ConnKey, PlayerId, RoomId, ShardId, Tick};
use crate::net::cid::ShardCidGenerator;
use crate::shard::matchmaking::{Candidate, Directory, QuickMatch};
use crate::shard::mesh::{JoinedInfo, RoomSummary, ShardMsg};
use crate::shard::operator::{Command, CommandError, DrainState, RoomEnd, RoomResult, ShardReport};
use crate::shard::room::{JoinError, Room, RoomOutput, Route};
use crate::shard::stats::{Counters, QuicStats, TickStats};
use crate::shard::timers::Timers;
use bytes::{Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ServerConfig,
    StreamEvent, StreamId, Transmit, VarInt,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tickshard_schema::{
    codes, ControlMsg, FrameDecoder, FrameError, InputDatagram, LeaveReason, PROTOCOL_VERSION,
};
use tracing::{debug, info};

/// Most malformed datagrams a connection may send before it is closed. Any is a client bug
/// (QUIC authenticates every packet, so nobody else can inject them); a few are tolerated so
/// one bad build does not drop players mid-match, a stream of them is not.
pub const MAX_MALFORMED_DATAGRAMS: u32 = 16;
/// Control frames a client may send per second on average, and in a burst. Clients send a
/// handful per match (hello, join, leave, chat); 20/s leaves room for chat.
pub const CONTROL_RATE: f64 = 20.0;
/// See [`CONTROL_RATE`].
pub const CONTROL_BURST: f64 = 40.0;
/// Most bytes of control messages the server holds for a client that does not read them.
pub const MAX_CONTROL_BACKLOG: usize = 256 * 1024;
pub use matchmaking::DIRECTORY_INTERVAL;

/// How often hello deadlines, empty rooms and the room directory are checked. Hello
/// deadlines and room grace periods hold to within this.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(50);

/// How long a join may wait for the room's shard to answer before the client gets
/// `SHARD_UNAVAILABLE`. Shards answer within a loop pass; two seconds means one is stuck.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Offsets into the tick period a new room's schedule is chosen from (see `free_phase`): at
/// 30 Hz, about half a millisecond apart.
pub const PHASE_CANDIDATES: u32 = 64;

/// Configuration of one shard.
#[derive(Clone)]
pub struct ShardConfig {
    /// This shard.
    pub shard: ShardId,
    /// How many shards the process runs.
    pub shards: u16,
    /// Game modes; quick match without a mode uses the first.
    pub modes: Vec<ModeSpec>,
    /// QUIC server configuration (TLS, transport).
    pub server_config: Arc<ServerConfig>,
    /// Most connections this shard holds.
    pub max_connections: usize,
    /// A client must send `Hello` this soon after the handshake.
    pub hello_timeout: Duration,
    /// An empty room closes after this long.
    pub empty_room_grace: Duration,
    /// Largest snapshot datagram.
    pub max_datagram: usize,
    /// Seed for everything random on this shard; `None` seeds from the OS.
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Handshake or waiting for the control stream and hello, until the deadline.
    AwaitHello { deadline: Instant },
    /// Welcomed.
    Ready,
    /// Closed by us or the peer; waiting for quinn to drain.
    Closed,
}

/// Why a read of the control stream stopped.
enum ReadStop {
    /// Nothing more to read now.
    Blocked,
    /// The client finished the stream.
    Finished,
    /// The frame buffer is at its bound; handle frames, then read on.
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seat {
    None,
    /// A join was sent to another shard; `quick` holds the mode if it was a quick match.
    Joining {
        room: RoomId,
        quick: Option<String>,
        deadline: Instant,
    },
    In(RoomId),
}

struct Session {
    player: PlayerId,
    phase: Phase,
    control: Option<StreamId>,
    frames: FrameDecoder,
    backlog: Vec<u8>,
    seat: Seat,
    tokens: f64,
    refilled: Instant,
    malformed: u32,
}

struct Conn {
    /// Which connection this is, of all that used its slot (see [`ConnKey`]).
    generation: u64,
    conn: quinn_proto::Connection,
    dirty: bool,
    session: Session,
}

/// Where a shard core's outputs go: the runtime's socket and shard mesh, or a test network.
/// See [`ShardCore::poll_outputs`].
pub trait Outputs {
    /// A UDP datagram to send: `contents` is its `transmit.size` bytes.
    fn transmit(&mut self, transmit: &Transmit, contents: &[u8]);
    /// A message for another shard.
    fn shard_message(&mut self, to: ShardId, msg: ShardMsg);
    /// The final result of a room that ended here.
    fn room_result(&mut self, result: RoomResult);
}

/// A room as seen in a status listing.
#[derive(Debug, Clone)]
pub struct RoomInfo {
    /// The room.
    pub id: RoomId,
    /// Its mode.
    pub mode: String,
    /// Seats taken.
    pub players: usize,
    /// Capacity.
    pub capacity: u16,
    /// Last tick run.
    pub tick: Tick,
    /// Age.
    pub age: Duration,
}

/// One shard's state. See the module documentation.
pub struct ShardCore {
    config: ShardConfig,
    modes: Vec<Rc<ModeSpec>>,
    endpoint: Endpoint,
    /// Connections by quinn's handle. Boxed: a `Conn` is over 6 KB (quinn's `Connection`), and
    /// a slab of them inline would reserve up to twice the live connections' memory as it grows.
    conns: Vec<Option<Box<Conn>>>,
    next_generation: u64,
    /// Welcomed players and their connections.
    players: HashMap<PlayerId, ConnKey>,
    next_player: u64,
    /// Each connection's next quinn timeout, by slot.
    timers: Timers,
    dirty: Vec<usize>,
    responses: VecDeque<(Transmit, Vec<u8>)>,
    rooms: Vec<Room>,
    room_index: HashMap<RoomId, usize>,
    next_room: u64,
    /// Players from other shards seated here, and their room.
    guests: HashMap<PlayerId, RoomId>,
    directory: Directory,
    outbox: VecDeque<(ShardId, ShardMsg)>,
    rng: ChaCha8Rng,
    fbb: FlatBufferBuilder<'static>,
    frame: Vec<u8>,
    /// The datagram being handed out by `poll_outputs`.
    tx_buf: Vec<u8>,
    scratch: Vec<(Route, PlayerId, ControlMsg)>,
    clock: Box<dyn Fn() -> Instant>,
    counters: Counters,
    /// quinn's statistics of the connections already retired.
    retired_quic: QuicStats,
    ticks: TickStats,
    housekeeping_due: Option<Instant>,
    drain: DrainState,
    reconnect_hint: String,
    results: VecDeque<RoomResult>,
}

impl ShardCore {
    /// A shard with no connections and no rooms. `clock` is read only to time tick phases.
    pub fn new(config: ShardConfig, clock: Box<dyn Fn() -> Instant>) -> Self {
        let mut rng = match config.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s ^ ((config.shard.0 as u64) << 32)),
            None => ChaCha8Rng::from_entropy(),
        };
        let shard = config.shard;
        let cid_seed = config.seed.map(|s| s.wrapping_add(0x5eed));
        let mut ep = EndpointConfig::default();
        ep.cid_generator(move || Box::new(ShardCidGenerator::new(shard, cid_seed)));
        let mut ep_seed = [0u8; 32];
        rng.fill_bytes(&mut ep_seed);
        let endpoint = Endpoint::new(
            Arc::new(ep),
            Some(config.server_config.clone()),
            true,
            Some(ep_seed),
        );
        let modes = config.modes.iter().cloned().map(Rc::new).collect();
        ShardCore {
            directory: Directory::new(config.shard, config.shards),
            modes,
            endpoint,
            conns: Vec::new(),
            next_generation: 0,
            players: HashMap::new(),
            next_player: 1,
            timers: Timers::default(),
            dirty: Vec::new(),
            responses: VecDeque::new(),
            rooms: Vec::new(),
            room_index: HashMap::new(),
            next_room: 1,
            guests: HashMap::new(),
            outbox: VecDeque::new(),
            rng,
            fbb: FlatBufferBuilder::with_capacity(1024),
            frame: Vec::new(),
            tx_buf: Vec::with_capacity(2048),
            scratch: Vec::new(),
            clock,
            counters: Counters::default(),
            retired_quic: QuicStats::default(),
            ticks: TickStats::default(),
            housekeeping_due: None,
            drain: DrainState::Serving,
            reconnect_hint: String::new(),
            results: VecDeque::new(),
            config,
        }
    }

    // ---- getters ----

    /// This shard.
    pub fn id(&self) -> ShardId {
        self.config.shard
    }
    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    /// QUIC packet figures over every connection this shard has had (quinn's statistics of
    /// each live connection are read now: call it a few times a second, not per packet).
    pub fn quic_stats(&self) -> QuicStats {
        let mut q = self.retired_quic;
        for c in self.conns.iter().flatten() {
            q.add(&c.conn.stats());
        }
        q
    }
    /// Counters, for the runtime to add socket figures.
    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }
    /// Tick health.
    pub fn tick_stats(&self) -> &TickStats {
        &self.ticks
    }
    /// Open QUIC connections.
    pub fn connections(&self) -> usize {
        self.conns.iter().flatten().count()
    }
    /// Players connected to this shard (welcomed sessions).
    pub fn players(&self) -> usize {
        self.players.len()
    }
    /// The connection of a welcomed player on this shard, if it is still open.
    pub fn connection_of(&self, player: PlayerId) -> Option<ConnKey> {
        let key = *self.players.get(&player)?;
        self.live(key).map(|_| key)
    }
    /// Rooms hosted here.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        let now = (self.clock)();
        self.rooms
            .iter()
            .map(|r| RoomInfo {
                id: r.id(),
                mode: r.mode().name.clone(),
                players: r.players(),
                capacity: r.mode().capacity,
                tick: r.tick_number(),
                age: now.saturating_duration_since(r.created()),
            })
            .collect()
    }
    /// Whether this shard takes new rooms and connections (see [`DrainState`]).
    pub fn drain_state(&self) -> DrainState {
        self.drain
    }
    /// True once a process drain has finished here: no rooms left and no local player seated
    /// or joining anywhere (or the drain was cut short). The runtime may then stop the shard.
    pub fn is_drained(&self) -> bool {
        match self.drain {
            DrainState::Stopped => true,
            DrainState::Draining { .. } => {
                self.rooms.is_empty()
                    && self
                        .conns
                        .iter()
                        .flatten()
                        .all(|c| c.session.seat == Seat::None)
            }
            DrainState::Serving | DrainState::NoNewRooms => false,
        }
    }
    /// A report of this shard's figures for operators (allocates: call it every few hundred
    /// milliseconds from housekeeping, never per packet or per tick).
    pub fn report(&self) -> ShardReport {
        ShardReport {
            shard: self.config.shard,
            counters: self.counters.clone(),
            ticks: self.ticks.clone(),
            rooms: self.rooms(),
            players: self.players(),
            connections: self.connections(),
            drain: self.drain,
            drained: self.is_drained(),
            cpu_seconds: 0.0,
        }
    }
    /// A hosted room, for inspection.
    pub fn room(&self, id: RoomId) -> Option<&Room> {
        self.room_index.get(&id).map(|&i| &self.rooms[i])
    }
    /// Bytes held for snapshot deltas across all rooms.
    pub fn history_bytes(&self) -> usize {
        self.rooms.iter().map(Room::history_bytes).sum()
    }

    // ---- inputs ----

    /// Processes one UDP datagram from `remote`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local_ip: Option<IpAddr>,
        data: BytesMut,
    ) {
        self.counters.udp_in += 1;
        self.counters.udp_bytes_in += data.len() as u64;
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, remote, local_ip, None, data, &mut buf)
        {
            None => {}
            Some(DatagramEvent::Response(t)) => self.responses.push_back((t, buf)),
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(c) = self.conns.get_mut(ch.0).and_then(Option::as_mut) {
                    c.conn.handle_event(ev);
                    self.drive_after(ch.0, now, true);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                if self.connections() >= self.config.max_connections {
                    self.counters.refused += 1;
                    let t = self.endpoint.refuse(incoming, &mut buf);
                    self.responses.push_back((t, buf));
                    return;
                }
                match self.endpoint.accept(incoming, now, &mut buf, None) {
                    Ok((ch, conn)) => {
                        self.counters.handshakes += 1;
                        self.insert_conn(ch, conn, now);
                        self.drive(ch.0, now);
                    }
                    Err(e) => {
                        debug!(cause = %e.cause, "handshake refused");
                        if let Some(t) = e.response {
                            self.responses.push_back((t, buf));
                        }
                    }
                }
            }
        }
    }

    /// Runs connection timers and housekeeping due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(ch) = self.timers.pop_due(now) {
            let Some(c) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
                continue;
            };
            c.conn.handle_timeout(now);
            self.drive(ch, now);
        }
    }

    /// Runs every room tick due at `now`, then housekeeping (empty rooms, the directory).
    pub fn handle_tick(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.rooms.len() {
            let room = &mut self.rooms[i];
            let mut outputs: Vec<(Route, PlayerId, ControlMsg)> = std::mem::take(&mut self.scratch);
            let conns = &mut self.conns;
            let outbox = &mut self.outbox;
            let dirty = &mut self.dirty;
            let mut send_errors = 0u64;
            let mut sink = |o: RoomOutput<'_>| match o {
                RoomOutput::Snapshot {
                    route: Route::Local(key),
                    bytes,
                    ..
                } => {
                    let ch = key.slot;
                    if let Some(c) = conns
                        .get_mut(ch)
                        .and_then(Option::as_mut)
                        .filter(|c| c.generation == key.generation)
                    {
                        // A newer snapshot supersedes older ones: if the send buffer is full,
                        // quinn drops the oldest (`drop = true`).
                        if c.conn
                            .datagrams()
                            .send(Bytes::copy_from_slice(bytes), true)
                            .is_err()
                        {
                            send_errors += 1;
                        }
                        if !c.dirty {
                            c.dirty = true;
                            dirty.push(ch);
                        }
                    }
                }
                RoomOutput::Snapshot {
                    route: Route::Remote(shard),
                    player,
                    bytes,
                } => {
                    outbox.push_back((
                        shard,
                        ShardMsg::Snapshot {
                            player,
                            bytes: Bytes::copy_from_slice(bytes),
                        },
                    ));
                }
                RoomOutput::Event {
                    route,
                    player,
                    tick,
                    event,
                } => {
                    outputs.push((
                        route,
                        player,
                        ControlMsg::GameEvent {
                            tick: tick.0,
                            kind: event.kind,
                            a: event.a,
                            b: event.b,
                        },
                    ));
                }
            };
            room.tick(
                now,
                &*self.clock,
                &mut self.ticks,
                &mut self.counters,
                &mut sink,
            );
            self.counters.datagram_send_errors += send_errors;
            for (route, player, msg) in outputs.drain(..) {
                self.send_to_player(route, player, &msg, now);
            }
            self.scratch = outputs;
            i += 1;
        }
        if self.housekeeping_due.is_none_or(|t| t <= now) {
            self.housekeeping_due = Some(now + HOUSEKEEPING_INTERVAL);
            self.expire_hellos(now);
            self.close_empty_rooms(now);
            if let DrainState::Draining { deadline } = self.drain {
                if deadline <= now {
                    self.stop(now, "drain grace ended");
                }
            }
            self.publish_directory(now);
        }
    }

    /// Processes one message from another shard.
    pub fn handle_shard_message(&mut self, now: Instant, msg: ShardMsg) {
        self.counters.mesh_in += 1;
        match msg {
            ShardMsg::JoinRequest { player, room } => {
                let result = self
                    .seat_here(player, Route::Remote(player.shard()), room)
                    .map(|msg| {
                        self.guests.insert(player, room);
                        JoinedInfo { room, msg }
                    });
                self.outbox
                    .push_back((player.shard(), ShardMsg::JoinReply { player, result }));
            }
            ShardMsg::JoinReply { player, result } => self.on_join_reply(now, player, result),
            ShardMsg::Input { player, input } => {
                if let Some(&room) = self.guests.get(&player) {
                    if let Some(&ri) = self.room_index.get(&room) {
                        self.rooms[ri].handle_input(player, &input, &mut self.counters);
                    }
                }
            }
            ShardMsg::Leave { player } => {
                if let Some(room) = self.guests.remove(&player) {
                    if let Some(&ri) = self.room_index.get(&room) {
                        self.rooms[ri].leave(player, now);
                        self.directory.mark_changed();
                    }
                }
            }
            ShardMsg::Chat { player, text } => {
                if let Some(&room) = self.guests.get(&player) {
                    self.broadcast_chat(room, player, text, now);
                }
            }
            ShardMsg::Snapshot { player, bytes } => {
                if let Some(ch) = self.local_player(player) {
                    if let Some(c) = self.conns[ch].as_mut() {
                        if c.conn.datagrams().send(bytes, true).is_err() {
                            self.counters.datagram_send_errors += 1;
                        }
                        self.mark_dirty(ch);
                    }
                }
            }
            ShardMsg::Control { player, msg } => {
                if let Some(ch) = self.local_player(player) {
                    if let ControlMsg::Left { room_id, .. } = &msg {
                        if let Some(c) = self.conns[ch].as_mut() {
                            if c.session.seat == Seat::In(RoomId(*room_id)) {
                                c.session.seat = Seat::None;
                            }
                        }
                    }
                    self.send_control(ch, &msg, now);
                }
            }
            ShardMsg::Directory { from, rooms } => {
                self.directory.update(from, rooms);
            }
        }
    }

    /// Runs everything due at `now`: room ticks and housekeeping (if [`ShardCore::next_tick`]
    /// has passed), then connection timers (if [`ShardCore::poll_timeout`] has).
    pub fn handle_due(&mut self, now: Instant) {
        if self.next_tick(now) <= now {
            self.handle_tick(now);
        }
        if self.poll_timeout().is_some_and(|t| t <= now) {
            self.handle_timeout(now);
        }
    }

    // ---- outputs ----

    /// Hands every output queued so far to `out`: datagrams, then messages for other shards,
    /// then room results. Then ask [`ShardCore::next_due`] when to call
    /// [`ShardCore::handle_due`] (a driver that has other inputs to feed first need not).
    pub fn poll_outputs(&mut self, now: Instant, out: &mut impl Outputs) {
        let mut buf = std::mem::take(&mut self.tx_buf);
        while let Some(t) = self.poll_transmit(now, &mut buf) {
            out.transmit(&t, &buf[..t.size]);
        }
        self.tx_buf = buf;
        while let Some((to, msg)) = self.poll_shard_message() {
            out.shard_message(to, msg);
        }
        while let Some(r) = self.poll_room_result() {
            out.room_result(r);
        }
    }

    /// When [`ShardCore::handle_due`] must next be called: the earlier of
    /// [`ShardCore::next_tick`] and [`ShardCore::poll_timeout`].
    pub fn next_due(&mut self, now: Instant) -> Instant {
        let wake = self.next_tick(now);
        self.poll_timeout().map_or(wake, |t| t.min(wake))
    }

    /// The next UDP datagram (or GSO batch) to send. `buf` receives its bytes.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some((t, data)) = self.responses.pop_front() {
            buf.clear();
            buf.extend_from_slice(&data);
            return Some(self.count_out(t));
        }
        while let Some(&ch) = self.dirty.last() {
            let Some(c) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
                self.dirty.pop();
                continue;
            };
            buf.clear();
            if let Some(t) = c.conn.poll_transmit(now, 1, buf) {
                return Some(self.count_out(t));
            }
            c.dirty = false;
            self.dirty.pop();
            self.after_io(ch);
        }
        None
    }

    /// The next message for another shard.
    pub fn poll_shard_message(&mut self) -> Option<(ShardId, ShardMsg)> {
        let m = self.outbox.pop_front();
        if m.is_some() {
            self.counters.mesh_out += 1;
        }
        m
    }

    /// When [`ShardCore::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// When [`ShardCore::handle_tick`] must next be called: the earliest room deadline or the
    /// next housekeeping pass (hello deadlines, empty rooms, the directory), which runs every
    /// [`HOUSEKEEPING_INTERVAL`].
    pub fn next_tick(&self, now: Instant) -> Instant {
        let housekeeping = self.housekeeping_due.unwrap_or(now);
        self.rooms
            .iter()
            .map(Room::next_due)
            .min()
            .map_or(housekeeping, |r| r.min(housekeeping))
    }

    /// Closes every connection with `code` and `reason` (shutdown).
    pub fn close_all(&mut self, now: Instant, code: u32, reason: &str) {
        for ch in 0..self.conns.len() {
            self.close(ch, now, code, reason);
        }
    }

    /// The next final result of a room that ended here.
    pub fn poll_room_result(&mut self) -> Option<RoomResult> {
        self.results.pop_front()
    }

    /// Carries out an operator's command (see [`Command`]).
    pub fn handle_command(&mut self, now: Instant, cmd: Command) -> Result<(), CommandError> {
        match cmd {
            Command::CloseRoom { room, reason } => {
                let &i = self
                    .room_index
                    .get(&room)
                    .ok_or(CommandError::RoomNotFound)?;
                info!(shard = self.config.shard.0, %room, reason, "closing room");
                self.end_room(i, now, LeaveReason::RoomClosed, RoomEnd::Closed(reason));
                Ok(())
            }
            Command::Kick { player, reason } => {
                let ch = self
                    .local_player(player)
                    .ok_or(CommandError::PlayerNotFound)?;
                info!(shard = self.config.shard.0, %player, reason, "kicking player");
                self.close(ch, now, codes::KICKED, &reason);
                Ok(())
            }
            Command::DrainShard => {
                if self.drain == DrainState::Serving {
                    info!(shard = self.config.shard.0, "shard drain: no new rooms");
                    self.drain = DrainState::NoNewRooms;
                }
                Ok(())
            }
            Command::Drain {
                grace,
                reconnect_hint,
            } => {
                if matches!(self.drain, DrainState::Serving | DrainState::NoNewRooms) {
                    let deadline = now + grace;
                    self.drain = DrainState::Draining { deadline };
                    self.reconnect_hint = reconnect_hint;
                    info!(shard = self.config.shard.0, ?grace, "draining");
                    let notice = self.drain_notice(now, deadline);
                    for ch in 0..self.conns.len() {
                        let ready = self.conns[ch]
                            .as_ref()
                            .is_some_and(|c| c.session.phase == Phase::Ready);
                        if ready {
                            self.send_control(ch, &notice, now);
                        }
                    }
                    // Rooms already empty end now rather than after their grace.
                    self.close_empty_rooms(now);
                }
                Ok(())
            }
            Command::Stop { reason } => {
                if self.drain != DrainState::Stopped {
                    self.stop(now, &reason);
                }
                Ok(())
            }
        }
    }

    // ---- connections ----

    fn insert_conn(&mut self, ch: ConnectionHandle, conn: quinn_proto::Connection, now: Instant) {
        if self.conns.len() <= ch.0 {
            self.conns.resize_with(ch.0 + 1, || None);
        }
        let player = PlayerId::new(self.config.shard, self.next_player);
        self.next_player += 1;
        self.next_generation += 1;
        self.conns[ch.0] = Some(Box::new(Conn {
            generation: self.next_generation,
            conn,
            dirty: false,
            session: Session {
                player,
                phase: Phase::AwaitHello {
                    deadline: now + self.config.hello_timeout,
                },
                control: None,
                frames: FrameDecoder::default(),
                backlog: Vec::new(),
                seat: Seat::None,
                tokens: CONTROL_BURST,
                refilled: now,
                malformed: 0,
            },
        }));
    }

    /// The key of the connection in slot `ch` (which must hold one).
    fn key(&self, ch: usize) -> ConnKey {
        ConnKey {
            slot: ch,
            generation: self.conns[ch].as_ref().map_or(0, |c| c.generation),
        }
    }

    /// The slot of the connection `key` names, if that connection is still there.
    fn live(&self, key: ConnKey) -> Option<usize> {
        match self.conns.get(key.slot).and_then(Option::as_ref) {
            Some(c) if c.generation == key.generation => Some(key.slot),
            _ => None,
        }
    }

    /// The slot of a welcomed player's connection on this shard.
    fn local_player(&self, player: PlayerId) -> Option<usize> {
        self.live(*self.players.get(&player)?)
    }

    fn mark_dirty(&mut self, ch: usize) {
        if let Some(c) = self.conns.get_mut(ch).and_then(Option::as_mut) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(ch);
            }
        }
    }

    fn count_out(&mut self, t: Transmit) -> Transmit {
        self.counters.udp_out += 1;
        self.counters.udp_bytes_out += t.size as u64;
        t
    }

    /// Re-arms the connection's timer and retires it once quinn has drained it.
    fn after_io(&mut self, ch: usize) {
        let Some(c) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        if c.conn.is_drained() {
            self.remove_conn(ch);
            return;
        }
        self.timers.set(ch, c.conn.poll_timeout());
    }

    fn remove_conn(&mut self, ch: usize) {
        if let Some(c) = self.conns[ch].take() {
            self.timers.set(ch, None);
            self.retired_quic.add(&c.conn.stats());
            // The endpoint learns of the drain through the connection's endpoint events,
            // already delivered in `drive`.
            let key = ConnKey {
                slot: ch,
                generation: c.generation,
            };
            if self.players.get(&c.session.player) == Some(&key) {
                self.players.remove(&c.session.player);
            }
        }
    }

    /// Delivers a connection's pending events: endpoint events, then application events.
    fn drive(&mut self, ch: usize, now: Instant) {
        self.drive_after(ch, now, false);
    }

    /// [`ShardCore::drive`]; `received`: after a datagram from the peer. A seated player's
    /// datagram that brought only inputs (or acknowledgements) leaves nothing to send now:
    /// its acknowledgement waits for the snapshot, which the room sends within a tick and which
    /// marks the connection for sending then. Not asking quinn saves a `poll_transmit` that
    /// finds nothing, once per player per tick. Anything else (stream data, a close, the
    /// handshake, a player without a seat) is sent at once.
    fn drive_after(&mut self, ch: usize, now: Instant, received: bool) {
        let mut quiet = received;
        loop {
            let Some(c) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
                return;
            };
            while let Some(ev) = c.conn.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(ConnectionHandle(ch), ev) {
                    c.conn.handle_event(back);
                }
            }
            let Some(ev) = c.conn.poll() else { break };
            quiet &= matches!(ev, Event::DatagramReceived);
            self.on_event(ch, ev, now);
        }
        let seated = self
            .conns
            .get(ch)
            .and_then(Option::as_ref)
            .is_some_and(|c| matches!(c.session.seat, Seat::In(_)));
        if !(quiet && seated) {
            self.mark_dirty(ch);
        }
        self.after_io(ch);
    }

    fn on_event(&mut self, ch: usize, ev: Event, now: Instant) {
        match ev {
            Event::HandshakeDataReady | Event::DatagramsUnblocked => {}
            Event::Connected => {
                debug!(shard = self.config.shard.0, ch, "connected");
                // A draining process accepts the handshake, then closes with DRAINING, so the
                // client learns why (an application code needs the handshake done).
                if self.drain.refuses_connections() {
                    self.counters.refused += 1;
                    self.close(
                        ch,
                        now,
                        codes::DRAINING,
                        "server is draining; connect to another server",
                    );
                }
            }
            Event::ConnectionLost { reason } => {
                debug!(shard = self.config.shard.0, ch, %reason, "connection lost");
                self.end_session(ch, now);
            }
            Event::Stream(StreamEvent::Opened { dir }) => self.on_stream_opened(ch, dir, now),
            Event::Stream(StreamEvent::Readable { id }) => self.on_readable(ch, id, now),
            Event::Stream(StreamEvent::Writable { .. }) => self.flush_backlog(ch, now),
            Event::Stream(StreamEvent::Finished { .. })
            | Event::Stream(StreamEvent::Stopped { .. })
            | Event::Stream(StreamEvent::Available { .. }) => {}
            Event::DatagramReceived => self.on_datagrams(ch, now),
        }
    }

    fn on_stream_opened(&mut self, ch: usize, dir: Dir, now: Instant) {
        let Some(c) = self.conns[ch].as_mut() else {
            return;
        };
        let mut extra = false;
        while let Some(id) = c.conn.streams().accept(dir) {
            if dir == Dir::Uni || c.session.control.is_some() {
                extra = true;
                break;
            }
            c.session.control = Some(id);
        }
        if extra {
            return self.close(
                ch,
                now,
                codes::PROTOCOL_VIOLATION,
                "only one control stream is allowed",
            );
        }
        if let Some(id) = c.session.control {
            self.on_readable(ch, id, now);
        }
    }

    fn on_readable(&mut self, ch: usize, id: StreamId, now: Instant) {
        // Read in bounded slices, handling the frames of each before reading on, so at most
        // two maximal frames are ever buffered and nothing is left unread in quinn.
        loop {
            let Some(c) = self.conns[ch].as_mut() else {
                return;
            };
            if c.session.control != Some(id) || c.session.phase == Phase::Closed {
                return;
            }
            let mut stop = ReadStop::Blocked;
            let mut recv = c.conn.recv_stream(id);
            if let Ok(mut chunks) = recv.read(true) {
                loop {
                    match chunks.next(tickshard_schema::MAX_CONTROL_FRAME) {
                        Ok(Some(chunk)) => c.session.frames.push(&chunk.bytes),
                        Ok(None) => {
                            stop = ReadStop::Finished;
                            break;
                        }
                        // Blocked (nothing more now) or reset by the peer.
                        Err(_) => break,
                    }
                    if c.session.frames.buffered() > 2 * tickshard_schema::MAX_CONTROL_FRAME {
                        stop = ReadStop::Full;
                        break;
                    }
                }
                let _ = chunks.finalize();
            }
            if !self.handle_frames(ch, now) {
                return;
            }
            match stop {
                ReadStop::Full => continue,
                ReadStop::Blocked => return,
                ReadStop::Finished => {
                    return self.close(ch, now, codes::NO_ERROR, "control stream finished");
                }
            }
        }
    }

    /// Handles every complete frame buffered for `ch`; false if the connection was closed.
    fn handle_frames(&mut self, ch: usize, now: Instant) -> bool {
        loop {
            let Some(c) = self.conns[ch].as_mut() else {
                return false;
            };
            if c.session.phase == Phase::Closed {
                return false;
            }
            match c.session.frames.next_frame() {
                Ok(Some(frame)) => {
                    self.frame.clear();
                    self.frame.extend_from_slice(frame);
                }
                Ok(None) => return true,
                Err(FrameError::TooLarge(n)) => {
                    self.counters.malformed_frames += 1;
                    let reason = format!("control frame of {n} bytes exceeds the limit");
                    self.close(ch, now, codes::FRAME_TOO_LARGE, &reason);
                    return false;
                }
                Err(FrameError::Empty) => {
                    self.counters.malformed_frames += 1;
                    self.close(ch, now, codes::MALFORMED_FRAME, "empty control frame");
                    return false;
                }
            }
            // Rate limit control frames.
            let s = &mut c.session;
            s.tokens =
                (s.tokens + (now - s.refilled).as_secs_f64() * CONTROL_RATE).min(CONTROL_BURST);
            s.refilled = now;
            if s.tokens < 1.0 {
                self.close(ch, now, codes::CONTROL_FLOOD, "too many control frames");
                return false;
            }
            s.tokens -= 1.0;
            match ControlMsg::decode(&self.frame) {
                Ok(msg) => self.on_control(ch, msg, now),
                Err(e) => {
                    self.counters.malformed_frames += 1;
                    self.close(
                        ch,
                        now,
                        codes::MALFORMED_FRAME,
                        &format!("bad control frame: {e}"),
                    );
                    return false;
                }
            }
        }
    }

    fn on_control(&mut self, ch: usize, msg: ControlMsg, now: Instant) {
        let Some(c) = self.conns[ch].as_mut() else {
            return;
        };
        let ready = c.session.phase == Phase::Ready;
        let player = c.session.player;
        match msg {
            ControlMsg::Hello {
                protocol_version, ..
            } => {
                if ready {
                    return self.close(ch, now, codes::PROTOCOL_VIOLATION, "second hello");
                }
                if protocol_version != PROTOCOL_VERSION {
                    return self.close(
                        ch,
                        now,
                        codes::UNSUPPORTED_VERSION,
                        &format!("protocol version {protocol_version} is not supported (server speaks {PROTOCOL_VERSION})"),
                    );
                }
                c.session.phase = Phase::Ready;
                let key = ConnKey {
                    slot: ch,
                    generation: c.generation,
                };
                self.players.insert(player, key);
                self.counters.sessions += 1;
                let welcome = ControlMsg::Welcome {
                    player_id: player.0,
                    shard: self.config.shard.0,
                    tick_rate: self.modes[0].tick_rate,
                    server_tick: self
                        .rooms
                        .iter()
                        .map(|r| r.tick_number().0)
                        .max()
                        .unwrap_or(0),
                    resume_token: format!("{:016x}", self.rng.next_u64()),
                    max_datagram: self.config.max_datagram as u16,
                };
                self.send_control(ch, &welcome, now);
                if let DrainState::Draining { deadline } = self.drain {
                    let notice = self.drain_notice(now, deadline);
                    self.send_control(ch, &notice, now);
                }
            }
            _ if !ready => self.close(ch, now, codes::PROTOCOL_VIOLATION, "message before hello"),
            ControlMsg::Join { room_id, mode } => self.on_join(ch, player, room_id, mode, now),
            ControlMsg::Leave => match c.session.seat.clone() {
                Seat::In(room) => {
                    c.session.seat = Seat::None;
                    self.leave_room(player, room, now);
                    self.send_control(
                        ch,
                        &ControlMsg::Left {
                            room_id: room.0,
                            reason: LeaveReason::Requested,
                        },
                        now,
                    );
                }
                _ => self.send_error(ch, codes::NOT_IN_ROOM, "not in a room", now),
            },
            ControlMsg::Chat { text, .. } => match c.session.seat {
                Seat::In(room) if room.shard() == self.config.shard => {
                    self.broadcast_chat(room, player, text, now)
                }
                Seat::In(room) => self
                    .outbox
                    .push_back((room.shard(), ShardMsg::Chat { player, text })),
                _ => self.send_error(ch, codes::NOT_IN_ROOM, "not in a room", now),
            },
            _ => self.close(
                ch,
                now,
                codes::PROTOCOL_VIOLATION,
                "message type is server-to-client only",
            ),
        }
    }

    fn on_join(&mut self, ch: usize, player: PlayerId, room_id: u64, mode: String, now: Instant) {
        let Some(c) = self.conns[ch].as_mut() else {
            return;
        };
        if c.session.seat != Seat::None {
            return self.send_error(ch, codes::ALREADY_IN_ROOM, "already in a room", now);
        }
        if room_id != 0 {
            let room = RoomId(room_id);
            if room.shard() == self.config.shard {
                match self.seat_here(player, Route::Local(self.key(ch)), room) {
                    Ok(joined) => {
                        self.conns[ch].as_mut().expect("checked above").session.seat =
                            Seat::In(room);
                        self.send_control(ch, &joined, now);
                    }
                    Err(code) => self.send_error(ch, code, join_error_text(code), now),
                }
            } else if room.shard().0 < self.config.shards {
                c.session.seat = Seat::Joining {
                    room,
                    quick: None,
                    deadline: now + JOIN_TIMEOUT,
                };
                self.outbox
                    .push_back((room.shard(), ShardMsg::JoinRequest { player, room }));
            } else {
                self.send_error(ch, codes::ROOM_NOT_FOUND, "no such room", now);
            }
            return;
        }
        let mode = if mode.is_empty() {
            self.modes[0].name.clone()
        } else {
            mode
        };
        if !self.modes.iter().any(|m| m.name == mode) {
            return self.send_error(ch, codes::UNKNOWN_MODE, "no such game mode", now);
        }
        // Quick match (see `matchmaking`): the fullest local room with a free seat, else a
        // room another shard advertised, else a new local room.
        let local = self.rooms.iter().map(|r| Candidate {
            room: r.id(),
            mode: &r.mode().name,
            players: r.players(),
            free: r.free_seats(),
        });
        let choice = self.directory.quick_match(&mode, local);
        if let QuickMatch::Local(room) = choice {
            return self.quick_join_local(ch, player, room, now);
        }
        if let QuickMatch::Remote(room) = choice {
            let c = self.conns[ch].as_mut().expect("checked above");
            c.session.seat = Seat::Joining {
                room,
                quick: Some(mode),
                deadline: now + JOIN_TIMEOUT,
            };
            self.outbox
                .push_back((room.shard(), ShardMsg::JoinRequest { player, room }));
            return;
        }
        if self.drain.refuses_rooms() {
            return self.send_error(
                ch,
                codes::SERVER_DRAINING,
                join_error_text(codes::SERVER_DRAINING),
                now,
            );
        }
        let room = self.create_room(&mode, now);
        self.quick_join_local(ch, player, room, now);
    }

    fn quick_join_local(&mut self, ch: usize, player: PlayerId, room: RoomId, now: Instant) {
        match self.seat_here(player, Route::Local(self.key(ch)), room) {
            Ok(joined) => {
                if let Some(c) = self.conns[ch].as_mut() {
                    c.session.seat = Seat::In(room);
                }
                self.send_control(ch, &joined, now);
            }
            Err(code) => self.send_error(ch, code, join_error_text(code), now),
        }
    }

    fn on_join_reply(&mut self, now: Instant, player: PlayerId, result: Result<JoinedInfo, u16>) {
        let Some(ch) = self.local_player(player) else {
            // The player disconnected meanwhile: give the seat back.
            if let Ok(info) = result {
                self.outbox
                    .push_back((info.room.shard(), ShardMsg::Leave { player }));
            }
            return;
        };
        let Some(c) = self.conns[ch].as_mut() else {
            return;
        };
        let Seat::Joining { quick, .. } = c.session.seat.clone() else {
            if let Ok(info) = result {
                self.outbox
                    .push_back((info.room.shard(), ShardMsg::Leave { player }));
            }
            return;
        };
        match result {
            Ok(info) => {
                c.session.seat = Seat::In(info.room);
                self.send_control(ch, &info.msg, now);
            }
            Err(code) => {
                c.session.seat = Seat::None;
                match quick {
                    // The advertised room filled up meanwhile: fall back to a local room.
                    Some(mode) => {
                        let room = self
                            .rooms
                            .iter()
                            .find(|r| r.mode().name == mode && r.free_seats() > 0)
                            .map(Room::id);
                        let room = match room {
                            Some(r) => r,
                            None if self.drain.refuses_rooms() => {
                                return self.send_error(
                                    ch,
                                    codes::SERVER_DRAINING,
                                    join_error_text(codes::SERVER_DRAINING),
                                    now,
                                )
                            }
                            None => self.create_room(&mode, now),
                        };
                        self.quick_join_local(ch, player, room, now);
                    }
                    None => self.send_error(ch, code, join_error_text(code), now),
                }
            }
        }
    }

    /// Seats `player` in local `room`; returns the `Joined` message or a request error code.
    fn seat_here(
        &mut self,
        player: PlayerId,
        route: Route,
        room: RoomId,
    ) -> Result<ControlMsg, u16> {
        let &ri = self.room_index.get(&room).ok_or(codes::ROOM_NOT_FOUND)?;
        let r = &mut self.rooms[ri];
        let entity = r.join(player, route).map_err(|e| match e {
            JoinError::Full => codes::ROOM_FULL,
            JoinError::AlreadyIn => codes::ALREADY_IN_ROOM,
        })?;
        self.directory.mark_changed();
        Ok(ControlMsg::Joined {
            room_id: room.0,
            mode: r.mode().name.clone(),
            shard: self.config.shard.0,
            tick_rate: r.mode().tick_rate,
            entity_id: entity.0,
            capacity: r.mode().capacity,
            players: r.players() as u16,
            server_tick: r.tick_number().0,
        })
    }

    fn create_room(&mut self, mode: &str, now: Instant) -> RoomId {
        let spec = self
            .modes
            .iter()
            .find(|m| m.name == mode)
            .cloned()
            .unwrap_or_else(|| self.modes[0].clone());
        let id = RoomId::new(self.config.shard, self.next_room);
        self.next_room += 1;
        let seed = self.rng.next_u64();
        self.room_index.insert(id, self.rooms.len());
        let mut room = Room::new(id, spec, seed, self.config.max_datagram, now);
        room.offset_schedule(self.free_phase(room.period(), now));
        self.rooms.push(room);
        self.counters.rooms_created += 1;
        self.directory.mark_changed();
        info!(shard = self.config.shard.0, room = %id, mode, "room created");
        id
    }

    /// Where in the tick period a new room ticking every `period` should tick: of
    /// [`PHASE_CANDIDATES`] offsets spread over the period, the one farthest from the ticks of
    /// the rooms already here (ties: the earliest). Rooms created together (a burst of quick
    /// matches) would otherwise tick at the same instant, and the last of them would start
    /// late by the sum of the others' ticks.
    fn free_phase(&self, period: Duration, now: Instant) -> Duration {
        let p = period.as_nanos().max(1);
        // Each room's next tick as an offset into the period from `now`.
        let phases: Vec<u128> = self
            .rooms
            .iter()
            .filter(|r| r.period() == period)
            .map(|r| {
                let due = r.next_due();
                if due >= now {
                    (due - now).as_nanos() % p
                } else {
                    (p - (now - due).as_nanos() % p) % p
                }
            })
            .collect();
        if phases.is_empty() {
            return Duration::ZERO;
        }
        let n = PHASE_CANDIDATES as u128;
        let best = (0..n)
            .map(|k| {
                let o = k * p / n;
                let gap = phases
                    .iter()
                    .map(|&ph| {
                        let d = o.abs_diff(ph);
                        d.min(p - d)
                    })
                    .min()
                    .unwrap_or(p);
                (gap, std::cmp::Reverse(k))
            })
            .max()
            .map_or(0, |(_, std::cmp::Reverse(k))| k);
        Duration::from_nanos((best * p / n) as u64)
    }

    fn leave_room(&mut self, player: PlayerId, room: RoomId, now: Instant) {
        if room.shard() == self.config.shard {
            if let Some(&ri) = self.room_index.get(&room) {
                self.rooms[ri].leave(player, now);
                self.directory.mark_changed();
            }
        } else {
            self.outbox
                .push_back((room.shard(), ShardMsg::Leave { player }));
        }
    }

    fn broadcast_chat(&mut self, room: RoomId, from: PlayerId, text: String, now: Instant) {
        let Some(&ri) = self.room_index.get(&room) else {
            return;
        };
        let msg = ControlMsg::Chat {
            from_player: from.0,
            text,
        };
        let members: Vec<_> = self.rooms[ri].members().collect();
        for (player, route) in members {
            self.send_to_player(route, player, &msg, now);
        }
    }

    fn send_to_player(&mut self, route: Route, player: PlayerId, msg: &ControlMsg, now: Instant) {
        match route {
            Route::Local(key) => {
                if let Some(ch) = self.live(key) {
                    self.send_control(ch, msg, now);
                }
            }
            Route::Remote(shard) => self.outbox.push_back((
                shard,
                ShardMsg::Control {
                    player,
                    msg: msg.clone(),
                },
            )),
        }
    }

    fn end_session(&mut self, ch: usize, now: Instant) {
        let Some(c) = self.conns[ch].as_mut() else {
            return;
        };
        c.session.phase = Phase::Closed;
        let player = c.session.player;
        let key = ConnKey {
            slot: ch,
            generation: c.generation,
        };
        match std::mem::replace(&mut c.session.seat, Seat::None) {
            Seat::In(room) => self.leave_room(player, room, now),
            // The reply will find no player and hand the seat back.
            Seat::Joining { .. } | Seat::None => {}
        }
        if self.players.get(&player) == Some(&key) {
            self.players.remove(&player);
        }
    }

    /// Closes one connection with an application error code and reason.
    fn close(&mut self, ch: usize, now: Instant, code: u32, reason: &str) {
        let Some(c) = self.conns[ch].as_mut() else {
            return;
        };
        if c.session.phase == Phase::Closed {
            return;
        }
        if !matches!(
            code,
            codes::NO_ERROR | codes::SHUTTING_DOWN | codes::DRAINING | codes::KICKED
        ) {
            self.counters.closed_for_bad_input += 1;
            debug!(shard = self.config.shard.0, player = %c.session.player, code, reason, "closing connection");
        }
        c.conn.close(
            now,
            VarInt::from_u32(code),
            Bytes::copy_from_slice(reason.as_bytes()),
        );
        self.end_session(ch, now);
        self.mark_dirty(ch);
    }

    fn send_error(&mut self, ch: usize, code: u16, message: &str, now: Instant) {
        self.send_control(
            ch,
            &ControlMsg::Error {
                code,
                message: message.to_owned(),
            },
            now,
        );
    }

    fn send_control(&mut self, ch: usize, msg: &ControlMsg, now: Instant) {
        let Some(c) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        if c.session.phase == Phase::Closed || c.session.control.is_none() {
            return;
        }
        msg.write_frame(&mut self.fbb, &mut c.session.backlog);
        if c.session.backlog.len() > MAX_CONTROL_BACKLOG {
            return self.close(ch, now, codes::SLOW_CONSUMER, "control stream not read");
        }
        self.flush_backlog(ch, now);
    }

    fn flush_backlog(&mut self, ch: usize, _now: Instant) {
        let Some(c) = self.conns.get_mut(ch).and_then(Option::as_mut) else {
            return;
        };
        let Some(id) = c.session.control else { return };
        if c.session.backlog.is_empty() {
            return;
        }
        match c.conn.send_stream(id).write(&c.session.backlog) {
            Ok(n) => {
                c.session.backlog.drain(..n);
            }
            Err(e) => debug!(%e, "control stream write"),
        }
        self.mark_dirty(ch);
    }

    fn on_datagrams(&mut self, ch: usize, now: Instant) {
        loop {
            let Some(c) = self.conns[ch].as_mut() else {
                return;
            };
            let Some(data) = c.conn.datagrams().recv() else {
                return;
            };
            if c.session.phase != Phase::Ready {
                self.counters.input_not_in_room += 1;
                continue;
            }
            let player = c.session.player;
            match InputDatagram::decode(&data) {
                Ok(input) => match c.session.seat {
                    Seat::In(room) if room.shard() == self.config.shard => {
                        let known = self.room_index.get(&room).is_some_and(|&ri| {
                            self.rooms[ri].handle_input(player, &input, &mut self.counters)
                        });
                        if !known {
                            self.counters.input_not_in_room += 1;
                        }
                    }
                    Seat::In(room) => self
                        .outbox
                        .push_back((room.shard(), ShardMsg::Input { player, input })),
                    _ => self.counters.input_not_in_room += 1,
                },
                Err(e) => {
                    self.counters.malformed_datagrams += 1;
                    c.session.malformed += 1;
                    if c.session.malformed > MAX_MALFORMED_DATAGRAMS {
                        let reason = format!("too many malformed datagrams (last: {e})");
                        return self.close(ch, now, codes::MALFORMED_DATAGRAMS, &reason);
                    }
                }
            }
        }
    }

    // ---- housekeeping ----

    fn expire_hellos(&mut self, now: Instant) {
        for ch in 0..self.conns.len() {
            let Some(c) = self.conns[ch].as_mut() else {
                continue;
            };
            if let Phase::AwaitHello { deadline } = c.session.phase {
                if deadline <= now {
                    self.close(
                        ch,
                        now,
                        codes::HELLO_TIMEOUT,
                        "no hello before the deadline",
                    );
                }
            } else if let Seat::Joining { deadline, .. } = c.session.seat {
                if deadline <= now {
                    // A late reply finds the seat no longer joining and hands the seat back.
                    c.session.seat = Seat::None;
                    self.send_error(
                        ch,
                        codes::SHARD_UNAVAILABLE,
                        "the room's shard did not answer",
                        now,
                    );
                }
            }
        }
    }

    fn close_empty_rooms(&mut self, now: Instant) {
        // A draining shard ends a room as soon as its last player leaves.
        let grace = if matches!(self.drain, DrainState::Draining { .. }) {
            Duration::ZERO
        } else {
            self.config.empty_room_grace
        };
        let mut i = 0;
        while i < self.rooms.len() {
            let expired = self.rooms[i]
                .empty_since()
                .is_some_and(|t| now.saturating_duration_since(t) >= grace);
            if !expired {
                i += 1;
                continue;
            }
            self.remove_room(i, now, RoomEnd::Empty);
        }
    }

    /// Removes room `i` and records its final result.
    fn remove_room(&mut self, i: usize, now: Instant, end: RoomEnd) {
        let room = self.rooms.swap_remove(i);
        self.room_index.remove(&room.id());
        if let Some(moved) = self.rooms.get(i) {
            self.room_index.insert(moved.id(), i);
        }
        let standings: Vec<Standing> = room.final_result();
        info!(
            shard = self.config.shard.0,
            room = %room.id(),
            mode = room.mode().name,
            ticks = room.tick_number().0,
            end = %end,
            players = standings.len(),
            "room ended"
        );
        self.results.push_back(RoomResult {
            room: room.id(),
            mode: room.mode().name.clone(),
            ticks: room.tick_number(),
            age: now.saturating_duration_since(room.created()),
            end,
            standings,
        });
        self.counters.rooms_closed += 1;
        self.directory.mark_changed();
    }

    /// Ends room `i` with its players still seated: each gets `Left` with `reason`, then the
    /// room's result is recorded.
    fn end_room(&mut self, i: usize, now: Instant, reason: LeaveReason, end: RoomEnd) {
        let room_id = self.rooms[i].id();
        let members: Vec<_> = self.rooms[i].members().collect();
        let left = ControlMsg::Left {
            room_id: room_id.0,
            reason,
        };
        for (player, route) in members {
            match route {
                Route::Local(key) => {
                    if let Some(c) = self.live(key).and_then(|ch| self.conns[ch].as_mut()) {
                        if c.session.seat == Seat::In(room_id) {
                            c.session.seat = Seat::None;
                        }
                    }
                }
                Route::Remote(_) => {
                    self.guests.remove(&player);
                }
            }
            // The remote shard clears the seat when it forwards `Left`.
            self.send_to_player(route, player, &left, now);
        }
        self.remove_room(i, now, end);
    }

    /// Cuts everything short: ends every room (results recorded, players told `Left` with
    /// reason Draining) and closes every connection with SHUTTING_DOWN and `reason`.
    fn stop(&mut self, now: Instant, reason: &str) {
        while !self.rooms.is_empty() {
            let i = self.rooms.len() - 1;
            self.end_room(i, now, LeaveReason::Draining, RoomEnd::Shutdown);
        }
        self.close_all(now, codes::SHUTTING_DOWN, reason);
        self.drain = DrainState::Stopped;
    }

    fn drain_notice(&self, now: Instant, deadline: Instant) -> ControlMsg {
        ControlMsg::DrainNotice {
            grace_ms: deadline
                .saturating_duration_since(now)
                .as_millis()
                .min(u32::MAX as u128) as u32,
            reconnect_hint: self.reconnect_hint.clone(),
        }
    }

    fn publish_directory(&mut self, now: Instant) {
        if !self.directory.advertise_due(now) {
            return;
        }
        let rooms: Vec<RoomSummary> = self
            .rooms
            .iter()
            .filter(|r| r.free_seats() > 0)
            .map(|r| RoomSummary {
                room: r.id(),
                mode: r.mode().name.clone(),
                free: r.free_seats() as u16,
            })
            .collect();
        for to in self.directory.peers() {
            self.outbox.push_back((
                to,
                ShardMsg::Directory {
                    from: self.config.shard,
                    rooms: rooms.clone(),
                },
            ));
        }
    }
}

fn join_error_text(code: u16) -> &'static str {
    match code {
        codes::ROOM_NOT_FOUND => "no such room",
        codes::ROOM_FULL => "room is full",
        codes::ALREADY_IN_ROOM => "already in a room",
        codes::UNKNOWN_MODE => "no such game mode",
        codes::SERVER_DRAINING => "server is draining: no new rooms",
        _ => "join failed",
    }
}
