//! The shard core: one shard's QUIC endpoint, sessions and rooms, with no I/O of its own.
//!
//! (About 850 lines: the core's state, admission, and its one driver, read together; the
//! sessions, rooms, seats and lifecycle are in the files beside it.)
//!
//! Like quinn-proto's `Connection`, [`ShardCore`] performs no I/O and reads no clock: the
//! caller passes `now` into every call and carries out what the core asks for. In production
//! the glommio loop of `runtime/shard_loop.rs` drives it; in tests a harness with a virtual clock does.
//!
//! Its parts, each in its own file: [`session`] (one connection: the control stream, frames,
//! budgets, inputs, in quinn-proto's `handle_*`/`poll*` style), [`sessions`] (the table of
//! them, with generational keys, timers and the send list), [`rooms`] (the rooms hosted here)
//! and [`room`] (seats, input queues, the tick pipeline), [`snapshot`] (per-viewer delta
//! snapshots), [`mesh`] (messages between shards), [`stats`] (counters and histograms),
//! [`operator`] (commands operators may give a shard, the report it publishes, drain states,
//! room results), [`matchmaking`] (where quick match seats a player, and the directory of
//! other shards' rooms). This file ties them together: what a session's requests do to seats
//! and rooms, what a room's outputs reach, and the drain.
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
//!   [`ShardCore::next_tick`], says when to call [`ShardCore::handle_due`] again. The runtime
//!   and the test harness both drive the core this way and no other.
//!
//! # Sessions
//! A connection's client opens one bidirectional stream, the control stream, and sends
//! `Hello` within the hello timeout; the server answers `Welcome`. From then on the client
//! may `Join` (a room id, or quick match by mode), `Leave` and `Chat`, and sends input
//! datagrams while seated. Every frame and datagram is verified before use. Bad input gets a
//! defined answer (see PROTOCOL.md): ignored and counted, an `Error` message, or the one
//! connection closed with an application error code and reason. Other players never notice.

pub mod lifecycle;
pub mod matchmaking;
pub mod mesh;
pub mod operator;
pub mod room;
pub mod rooms;
pub mod seats;
pub mod session;
pub mod sessions;
pub mod snapshot;
pub mod stats;
pub mod timers;

use crate::game::ModeSpec;
use crate::ids::{ConnKey, PlayerId, RoomId, ShardId};
use crate::net::cid::ShardCidGenerator;
use crate::shard::matchmaking::Directory;
use crate::shard::mesh::{JoinedInfo, ShardMsg};
use crate::shard::operator::{DrainState, RoomResult, ShardReport};
use crate::shard::room::{Room, RoomOutput, Route};
use crate::shard::rooms::Rooms;
use crate::shard::session::{Seat, SessionEvent};
use crate::shard::sessions::Sessions;
use crate::shard::stats::{Counters, QuicStats, TickStats};
use bytes::{Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;
use quinn_proto::{
    ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig, ServerConfig, Transmit,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tickshard_schema::{codes, ControlMsg};
use tracing::debug;

pub use matchmaking::DIRECTORY_INTERVAL;
pub use rooms::{RoomInfo, PHASE_CANDIDATES};
pub use session::{CONTROL_BURST, CONTROL_RATE, MAX_CONTROL_BACKLOG, MAX_MALFORMED_DATAGRAMS};

/// How often hello deadlines, empty rooms and the room directory are checked. Hello
/// deadlines and room grace periods hold to within this.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(50);

/// How long a join may wait for the room's shard to answer before the client gets
/// `SHARD_UNAVAILABLE`. Shards answer within a loop pass; two seconds means one is stuck.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Most welcomed players this shard holds (handshakes and sessions not yet welcomed are
    /// bounded by [`Admission::max_handshakes`] instead).
    pub max_connections: usize,
    /// Who may start a handshake: per-address caps, the handshake budget, address
    /// validation with Retry.
    pub admission: Admission,
    /// A client must send `Hello` this soon after the handshake.
    pub hello_timeout: Duration,
    /// A welcomed client that sits in no room (and joins none) this long is closed with
    /// `LOBBY_TIMEOUT`; zero: never.
    pub lobby_timeout: Duration,
    /// An empty room closes after this long.
    pub empty_room_grace: Duration,
    /// Largest snapshot datagram.
    pub max_datagram: usize,
    /// Seed for everything random on this shard; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// The key stateless resets are signed with, the same on every shard and across restarts
    /// (`net::tls::stateless_reset_key`); `None`: a random key of this shard's own.
    pub reset_key: Option<[u8; crate::net::tls::RESET_KEY_LEN]>,
}

/// QUIC version 1.
const QUIC_V1: u32 = 1;
/// Smallest datagram a client can send that carries a QUIC packet for us (a short header with
/// our 8-byte connection ID, a packet number, a payload byte and the 16-byte AEAD tag).
const MIN_QUIC_DATAGRAM: usize = 1 + crate::net::cid::CID_LEN + 1 + 1 + 16;
/// Smallest datagram carrying a client's Initial packet (RFC 9000 §14.1).
const MIN_INITIAL_DATAGRAM: usize = 1200;

/// A first look at a datagram, before quinn-proto parses it: false when it cannot be a QUIC
/// packet a client sends this shard. Too short; the fixed bit clear (the server does not offer
/// greasing it); a long header of version 1 that is an Initial under 1,200 bytes or a Retry
/// (servers send those); another version under 1,200 bytes (a real client of another
/// version gets quinn's Version Negotiation); a short header whose connection ID does not
/// start with this shard's byte (every ID this shard issues does). Costs a few comparisons.
pub fn could_be_quic(data: &[u8], shard: ShardId) -> bool {
    let Some(&first) = data.first() else {
        return false;
    };
    if data.len() < MIN_QUIC_DATAGRAM || first & 0x40 == 0 {
        return false;
    }
    if first & 0x80 == 0 {
        // Short header: the destination connection ID follows the first byte.
        return u16::from(data[1]) == shard.0;
    }
    let version = u32::from_be_bytes([data[1], data[2], data[3], data[4]]);
    if version != QUIC_V1 {
        return data.len() >= MIN_INITIAL_DATAGRAM;
    }
    match (first >> 4) & 0b11 {
        0b00 => data.len() >= MIN_INITIAL_DATAGRAM,
        0b11 => false,
        _ => true,
    }
}

/// How a shard admits new connections, so that one host (or a flood of spoofed handshakes)
/// cannot take every slot. Checked in order at each new connection:
/// 1. welcomed players at `max_connections`: refused (`full`);
/// 2. this source address already holds `max_per_address` sessions: refused (`per_address`);
/// 3. `retry_above` or more sessions not yet welcomed, and the client's address not yet
///    validated: a QUIC Retry, which a spoofed address never answers (the token is sealed
///    with the key every shard shares, and the new connection ID keeps this shard's byte,
///    so the answer comes back here);
/// 4. `max_handshakes` sessions not yet welcomed: refused (`handshake_budget`);
/// 5. the address has started more than `handshakes_per_second` handshakes a second (with a
///    burst of twice that): the Initial is dropped unanswered (`handshake_rate`); the
///    client's retransmission may find a token again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Most sessions one source IP address may hold on this shard; 0: no cap.
    pub max_per_address: usize,
    /// Most sessions not yet welcomed (handshaking, or awaiting `Hello`) on this shard.
    pub max_handshakes: usize,
    /// Sessions not yet welcomed from which on a new, unvalidated client must answer a
    /// Retry first; 0: always.
    pub retry_above: usize,
    /// Handshakes one IP address may start per second on this shard, with a burst of twice
    /// that; 0: no limit.
    pub handshakes_per_second: u32,
}

/// Handshake tokens of each source address (a token bucket per IP address).
#[derive(Debug, Default)]
pub(crate) struct HandshakeRate {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

/// Most addresses whose buckets are remembered (about 3 MB per shard at most); a new address
/// past it makes the full buckets be forgotten, then all if none was (a flood from that many
/// addresses is the handshake budget's to bound). No periodic walk: memory is bounded by this.
const MAX_RATE_ENTRIES: usize = 65_536;

impl HandshakeRate {
    /// Takes one token of `ip`'s bucket (`per_second` refill, twice that at most); false when
    /// it is empty.
    fn take(&mut self, ip: IpAddr, per_second: u32, now: Instant) -> bool {
        let cap = 2.0 * f64::from(per_second);
        if self.buckets.len() >= MAX_RATE_ENTRIES && !self.buckets.contains_key(&ip) {
            self.forget_full(per_second, now);
            if self.buckets.len() >= MAX_RATE_ENTRIES {
                self.buckets.clear();
            }
        }
        let (tokens, last) = self.buckets.entry(ip).or_insert((cap, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * f64::from(per_second);
        *tokens = (*tokens + refill).min(cap);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets the buckets that have refilled (they would start full anyway).
    fn forget_full(&mut self, per_second: u32, now: Instant) {
        let cap = 2.0 * f64::from(per_second);
        self.buckets.retain(|_, (tokens, last)| {
            *tokens + now.saturating_duration_since(*last).as_secs_f64() * f64::from(per_second)
                < cap
        });
    }
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            max_per_address: 256,
            max_handshakes: 256,
            retry_above: 32,
            handshakes_per_second: 100,
        }
    }
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

/// One shard's state. See the module documentation.
pub struct ShardCore {
    config: ShardConfig,
    modes: Vec<Rc<ModeSpec>>,
    endpoint: Endpoint,
    sessions: Sessions,
    /// Handshakes started per source address (admission's rate).
    handshake_rate: HandshakeRate,
    next_player: u64,
    /// Datagrams the endpoint answers by itself (stateless resets, refusals, version
    /// negotiation).
    responses: VecDeque<(Transmit, Vec<u8>)>,
    rooms: Rooms,
    /// Players from other shards seated here, and their room.
    guests: HashMap<PlayerId, RoomId>,
    directory: Directory,
    outbox: VecDeque<(ShardId, ShardMsg)>,
    rng: ChaCha8Rng,
    fbb: FlatBufferBuilder<'static>,
    /// The datagram being handed out by `poll_outputs`.
    tx_buf: Vec<u8>,
    scratch: Vec<(Route, PlayerId, ControlMsg)>,
    clock: Box<dyn Fn() -> Instant>,
    counters: Counters,
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
        let mut ep = match config.reset_key {
            Some(k) => {
                EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k)))
            }
            None => EndpointConfig::default(),
        };
        ep.cid_generator(move || Box::new(ShardCidGenerator::new(shard, cid_seed)));
        // Clients keep the fixed bit set (RFC 9287 greasing not offered), so datagrams without
        // it are dropped before quinn looks at them (`could_be_quic`).
        ep.grease_quic_bit(false);
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
            sessions: Sessions::default(),
            handshake_rate: HandshakeRate::default(),
            next_player: 1,
            responses: VecDeque::new(),
            rooms: Rooms::new(config.shard),
            guests: HashMap::new(),
            outbox: VecDeque::new(),
            rng,
            fbb: FlatBufferBuilder::with_capacity(1024),
            tx_buf: Vec::with_capacity(2048),
            scratch: Vec::new(),
            clock,
            counters: Counters::default(),
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
        self.sessions.quic_stats()
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
        self.sessions.len()
    }
    /// Players connected to this shard (welcomed sessions).
    pub fn players(&self) -> usize {
        self.sessions.players()
    }
    /// The connection of a welcomed player on this shard, if it is still open.
    pub fn connection_of(&self, player: PlayerId) -> Option<ConnKey> {
        self.sessions.of_player(player)
    }
    /// Rooms hosted here.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        self.rooms.infos((self.clock)())
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
                self.rooms.is_empty() && self.sessions.iter().all(|s| *s.seat() == Seat::None)
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
        self.rooms.get(id)
    }
    /// Bytes held for snapshot deltas across all rooms.
    pub fn history_bytes(&self) -> usize {
        self.rooms.history_bytes()
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
        if !could_be_quic(&data, self.config.shard) {
            self.counters.not_quic += 1;
            return;
        }
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, remote, local_ip, None, data, &mut buf)
        {
            None => {}
            Some(DatagramEvent::Response(t)) => self.responses.push_back((t, buf)),
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(s) = self.sessions.get_mut(ch.0) {
                    s.handle_event(ev);
                    self.drive_after(ch.0, now, true);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                let rule = self.config.admission;
                let ip = incoming.remote_address().ip();
                let pending = self.connections().saturating_sub(self.players());
                let refusal = if self.players() >= self.config.max_connections {
                    Some(&mut self.counters.refused_full)
                } else if rule.max_per_address > 0
                    && self.sessions.from_address(ip) >= rule.max_per_address
                {
                    Some(&mut self.counters.refused_per_address)
                } else if pending >= rule.retry_above && !incoming.remote_address_validated() {
                    match self.endpoint.retry(incoming, &mut buf) {
                        Ok(t) => {
                            self.counters.retries += 1;
                            self.responses.push_back((t, buf));
                        }
                        Err(e) => self.endpoint.ignore(e.into_incoming()),
                    }
                    return;
                } else if pending >= rule.max_handshakes {
                    Some(&mut self.counters.refused_handshakes)
                } else {
                    None
                };
                if let Some(count) = refusal {
                    *count += 1;
                    let t = self.endpoint.refuse(incoming, &mut buf);
                    self.responses.push_back((t, buf));
                    return;
                }
                if rule.handshakes_per_second > 0
                    && !self
                        .handshake_rate
                        .take(ip, rule.handshakes_per_second, now)
                {
                    self.counters.refused_handshake_rate += 1;
                    self.endpoint.ignore(incoming);
                    return;
                }
                match self.endpoint.accept(incoming, now, &mut buf, None) {
                    Ok((ch, conn)) => {
                        self.counters.handshakes += 1;
                        let player = PlayerId::new(self.config.shard, self.next_player);
                        self.next_player += 1;
                        let hello = self.config.hello_timeout;
                        self.sessions.insert(ch.0, conn, player, now, hello);
                        self.drive_after(ch.0, now, false);
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

    /// Runs connection timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(ch) = self.sessions.pop_due(now) {
            let Some(s) = self.sessions.get_mut(ch) else {
                continue;
            };
            s.handle_timeout(now);
            self.drive_after(ch, now, false);
        }
    }

    /// Runs every room tick due at `now`, then housekeeping (empty rooms, the directory).
    pub fn handle_tick(&mut self, now: Instant) {
        for i in 0..self.rooms.len() {
            let room = self.rooms.at_mut(i);
            let mut outputs: Vec<(Route, PlayerId, ControlMsg)> = std::mem::take(&mut self.scratch);
            let sessions = &mut self.sessions;
            let outbox = &mut self.outbox;
            let mut send_errors = 0u64;
            let mut sink = |o: RoomOutput<'_>| match o {
                RoomOutput::Snapshot {
                    route: Route::Local(key),
                    bytes,
                    ..
                } => {
                    if sessions.send_snapshot(key, Bytes::copy_from_slice(bytes)) == Some(false) {
                        send_errors += 1;
                    }
                }
                RoomOutput::Snapshot {
                    route: Route::Remote(shard),
                    player,
                    bytes,
                } => {
                    let bytes = Bytes::copy_from_slice(bytes);
                    outbox.push_back((shard, ShardMsg::Snapshot { player, bytes }));
                }
                RoomOutput::Event {
                    route,
                    player,
                    tick,
                    event,
                } => {
                    let msg = ControlMsg::GameEvent {
                        tick: tick.0,
                        kind: event.kind,
                        a: event.a,
                        b: event.b,
                    };
                    outputs.push((route, player, msg));
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
        }
        self.end_crashed_rooms(now);
        if self.housekeeping_due.is_none_or(|t| t <= now) {
            self.housekeeping_due = Some(now + HOUSEKEEPING_INTERVAL);
            self.expire_deadlines(now);
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
                    if let Some(r) = self.rooms.get_mut(room) {
                        r.handle_input(player, &input, &mut self.counters);
                    }
                }
            }
            ShardMsg::Leave { player } => {
                if let Some(room) = self.guests.remove(&player) {
                    if let Some(r) = self.rooms.get_mut(room) {
                        r.leave(player, now);
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
                if let Some(key) = self.sessions.of_player(player) {
                    if self.sessions.send_snapshot(key, bytes) == Some(false) {
                        self.counters.datagram_send_errors += 1;
                    }
                }
            }
            ShardMsg::Control { player, msg } => {
                if let Some(ch) = self.sessions.slot_of(player) {
                    if let ControlMsg::Left { room_id, .. } = &msg {
                        if let Some(s) = self.sessions.get_mut(ch) {
                            if *s.seat() == Seat::In(RoomId(*room_id)) {
                                s.set_seat(Seat::None, now);
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
        let t = if let Some((t, data)) = self.responses.pop_front() {
            buf.clear();
            buf.extend_from_slice(&data);
            t
        } else {
            self.sessions.poll_transmit(now, buf)?
        };
        self.counters.udp_out += 1;
        self.counters.udp_bytes_out += t.size as u64;
        Some(t)
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
        self.sessions.next_timeout()
    }

    /// When [`ShardCore::handle_tick`] must next be called: the earliest room deadline or the
    /// next housekeeping pass (hello deadlines, empty rooms, the directory), which runs every
    /// [`HOUSEKEEPING_INTERVAL`].
    pub fn next_tick(&self, now: Instant) -> Instant {
        let housekeeping = self.housekeeping_due.unwrap_or(now);
        self.rooms
            .next_due()
            .map_or(housekeeping, |r| r.min(housekeeping))
    }

    /// Closes every connection with `code` and `reason` (shutdown).
    pub fn close_all(&mut self, now: Instant, code: u32, reason: &str) {
        for ch in 0..self.sessions.slots() {
            self.close(ch, now, code, reason);
        }
    }

    /// The next final result of a room that ended here.
    pub fn poll_room_result(&mut self) -> Option<RoomResult> {
        self.results.pop_front()
    }

    // ---- sessions ----

    /// Delivers a session's pending events: endpoint events, then what the session hands up.
    /// `received`: after a datagram from the peer. A seated player's datagram that brought only
    /// inputs (or acknowledgements) leaves nothing to send now: its acknowledgement waits for
    /// the snapshot, which the room sends within a tick and which marks the connection for
    /// sending then. Not asking quinn saves a `poll_transmit` that finds nothing, once per
    /// player per tick. Anything else (stream data, a close, the handshake, a player without a
    /// seat) is sent at once.
    fn drive_after(&mut self, ch: usize, now: Instant, received: bool) {
        loop {
            let Some(s) = self.sessions.get_mut(ch) else {
                return;
            };
            while let Some(ev) = s.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(ConnectionHandle(ch), ev) {
                    s.handle_event(back);
                }
            }
            let Some(ev) = s.poll(now, &mut self.counters) else {
                break;
            };
            self.on_session_event(ch, ev, now);
        }
        let Some(s) = self.sessions.get_mut(ch) else {
            return;
        };
        let busy = s.take_busy();
        if !received || busy || !matches!(s.seat(), Seat::In(_)) {
            self.sessions.mark_dirty(ch);
        }
        self.sessions.after_io(ch);
    }

    fn on_session_event(&mut self, ch: usize, ev: SessionEvent, now: Instant) {
        match ev {
            SessionEvent::Connected => {
                debug!(shard = self.config.shard.0, ch, "connected");
                // A draining process accepts the handshake, then closes with DRAINING, so the
                // client learns why (an application code needs the handshake done).
                if self.drain.refuses_connections() {
                    self.counters.refused_draining += 1;
                    let reason = "server is draining; connect to another server";
                    self.close(ch, now, codes::DRAINING, reason);
                }
            }
            SessionEvent::Hello => self.welcome(ch, now),
            SessionEvent::Request(req) => self.on_request(ch, req, now),
            SessionEvent::Input(input) => self.on_input(ch, input),
            SessionEvent::Close { code, reason } => self.close(ch, now, code, &reason),
            SessionEvent::Lost => self.end_session(ch, now),
        }
    }

    fn welcome(&mut self, ch: usize, now: Instant) {
        let Some(s) = self.sessions.get(ch) else {
            return;
        };
        let player = s.player;
        self.sessions.welcome(ch);
        self.counters.sessions += 1;
        let welcome = ControlMsg::Welcome {
            player_id: player.0,
            shard: self.config.shard.0,
            tick_rate: self.modes[0].tick_rate,
            server_tick: self.rooms.latest_tick(),
            resume_token: format!("{:016x}", self.rng.next_u64()),
            max_datagram: self.config.max_datagram as u16,
        };
        self.send_control(ch, &welcome, now);
        if let DrainState::Draining { deadline } = self.drain {
            let notice = self.drain_notice(now, deadline);
            self.send_control(ch, &notice, now);
        }
    }

    /// The session in `ch` is over: its seat is given back and its player forgotten.
    pub(super) fn end_session(&mut self, ch: usize, now: Instant) {
        let Some(s) = self.sessions.get_mut(ch) else {
            return;
        };
        s.mark_closed();
        let player = s.player;
        match s.set_seat(Seat::None, now) {
            Seat::In(room) => self.leave_room(player, room, now),
            // The reply will find no player and hand the seat back.
            Seat::Joining { .. } | Seat::None => {}
        }
        self.sessions.forget_player(ch);
    }

    /// Closes one connection with an application error code and reason.
    pub(super) fn close(&mut self, ch: usize, now: Instant, code: u32, reason: &str) {
        let Some(s) = self.sessions.get_mut(ch) else {
            return;
        };
        let player = s.player;
        if !s.close(now, code, reason) {
            return;
        }
        if !matches!(
            code,
            codes::NO_ERROR | codes::SHUTTING_DOWN | codes::DRAINING | codes::KICKED
        ) {
            self.counters.closed_for_bad_input += 1;
            debug!(shard = self.config.shard.0, %player, code, reason, "closing connection");
        }
        self.end_session(ch, now);
        self.sessions.mark_dirty(ch);
    }

    /// Sends a request error with the code's standard text.
    pub(super) fn send_error(&mut self, ch: usize, code: u16, now: Instant) {
        let message = error_text(code).to_owned();
        self.send_control(ch, &ControlMsg::Error { code, message }, now);
    }

    pub(super) fn send_control(&mut self, ch: usize, msg: &ControlMsg, now: Instant) {
        let Some(s) = self.sessions.get_mut(ch) else {
            return;
        };
        if s.send_control(&mut self.fbb, msg).is_err() {
            return self.close(ch, now, codes::SLOW_CONSUMER, "control stream not read");
        }
        self.sessions.mark_dirty(ch);
    }

    pub(super) fn send_to_player(
        &mut self,
        route: Route,
        player: PlayerId,
        msg: &ControlMsg,
        now: Instant,
    ) {
        match route {
            Route::Local(key) => {
                if let Some(ch) = self.sessions.live(key) {
                    self.send_control(ch, msg, now);
                }
            }
            Route::Remote(shard) => {
                let msg = msg.clone();
                self.outbox
                    .push_back((shard, ShardMsg::Control { player, msg }));
            }
        }
    }
}

/// The standard text of a request error code (PROTOCOL.md §9).
fn error_text(code: u16) -> &'static str {
    match code {
        codes::ROOM_NOT_FOUND => "no such room",
        codes::ROOM_FULL => "room is full",
        codes::ALREADY_IN_ROOM => "already in a room",
        codes::UNKNOWN_MODE => "no such game mode",
        codes::SERVER_DRAINING => "server is draining: no new rooms",
        codes::NOT_IN_ROOM => "not in a room",
        codes::SHARD_UNAVAILABLE => "the room's shard did not answer",
        _ => "join failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(first: u8, version: u32, len: usize) -> Vec<u8> {
        let mut d = vec![first];
        d.extend_from_slice(&version.to_be_bytes());
        d.resize(len, 0);
        d
    }

    /// What a client can send passes; what it cannot is dropped before quinn-proto.
    #[test]
    fn only_what_could_be_quic_for_this_shard_passes_the_first_look() {
        let shard = ShardId(3);
        let mut short = vec![0x40 | 0x01, 3];
        short.resize(40, 0xab);
        assert!(could_be_quic(&short, shard), "a short header for shard 3");
        short[1] = 4;
        assert!(
            !could_be_quic(&short, shard),
            "a connection ID of another shard"
        );
        short[1] = 3;
        short[0] = 0x01;
        assert!(!could_be_quic(&short, shard), "the fixed bit clear");
        assert!(!could_be_quic(&short[..20], shard), "too short");
        assert!(!could_be_quic(&[], shard));
        assert!(could_be_quic(&long(0xc0, 1, 1200), shard), "an Initial");
        assert!(
            !could_be_quic(&long(0xc0, 1, 1199), shard),
            "a short Initial"
        );
        assert!(
            could_be_quic(&long(0xe0, 1, 60), shard),
            "a Handshake packet"
        );
        assert!(could_be_quic(&long(0xd0, 1, 60), shard), "a 0-RTT packet");
        assert!(
            !could_be_quic(&long(0xf0, 1, 1200), shard),
            "a Retry (servers send those)"
        );
        assert!(
            could_be_quic(&long(0xc0, 0x6b33_43cf, 1200), shard),
            "another version, full size: quinn answers with Version Negotiation"
        );
        assert!(!could_be_quic(&long(0xc0, 0x6b33_43cf, 100), shard));
    }
}
