//! client-sim: a tickshard client for Rust games, and the engine of the bot swarm.
//!
//! (About 900 lines: the client's whole session, from handshake to leave, in one state
//! machine, as quinn-proto keeps a connection in one; its parts live in `link`, `trust`,
//! `check` and the schema crate.)
//!
//! [`Client`] is a sans-IO client, in the style of quinn-proto (on which it is built): it
//! performs no I/O and reads no clock. Feed it UDP datagrams with
//! [`Client::handle_datagram`] and deadlines with [`Client::handle_timeout`]; send what
//! [`Client::poll_transmit`] returns; react to [`Client::poll_event`]. The same client runs
//! over a real socket (the `client-sim` binary, [`drive`]) and inside the deterministic test
//! harness.
//!
//! What it does for a game:
//! - connects with ALPN `tickshard/1`, trusting the server by certificate file, SHA-256 pin,
//!   or (loudly) not at all ([`Trust`]);
//! - sends `Hello` on its control stream as soon as it connects, then `Join`, `Leave`, `Chat`;
//! - sends inputs with redundancy: every input datagram carries the commands the server has
//!   not yet confirmed, up to [`tickshard_schema::MAX_INPUT_REDUNDANCY`], so a lost datagram
//!   costs nothing;
//! - rebuilds the visible world from delta snapshots and acknowledges the newest one in each
//!   input, tracks the last input the server applied (for prediction) and the RTT.
//!
//! ```no_run
//! use client_sim::{drive::UdpClient, ClientConfig, ClientEvent, Trust};
//! use std::time::{Duration, Instant};
//!
//! let trust = Trust::from_cert_file(".tickshard/dev-cert.der".as_ref()).unwrap();
//! let config = ClientConfig::new(trust, "localhost");
//! let mut c = UdpClient::connect("127.0.0.1:4433".parse().unwrap(), &config, None).unwrap();
//! c.client.join(None, "arena");
//! let end = Instant::now() + Duration::from_secs(2);
//! while Instant::now() < end {
//!     c.client.send_input(Instant::now(), 127, 0, 0, 0); // move right
//!     c.run_for(Duration::from_millis(33)).unwrap();
//!     while let Some(ev) = c.client.poll_event() {
//!         if let ClientEvent::Joined { room_id, .. } = ev {
//!             println!("joined room {room_id}");
//!         }
//!     }
//! }
//! println!("I am at {:?}", c.client.own_entity().map(|e| (e.x(), e.y())));
//! ```

pub mod behavior;
pub mod check;
pub mod drive;
pub mod link;
pub mod swarm;
pub mod trust;

pub use behavior::{Action, Behavior, Brain};
pub use check::MovementCheck;
pub use link::{Conditioner, Link};
pub use trust::Trust;

use bytes::{Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;
use quinn_proto::{
    ClientConfig as QuicClientConfig, ConnectionHandle, ConnectionId, ConnectionIdGenerator,
    DatagramEvent, Dir, Endpoint, EndpointConfig, Event, StreamEvent, StreamId, Transmit,
    TransportConfig, VarInt,
};
use rand::{RngCore, SeedableRng};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tickshard_schema::{
    changes::apply_changes_to, codes, decode_snapshot, ControlMsg, EntityState, FrameDecoder,
    InputCmd, InputDatagram, LeaveReason, MAX_INPUT_REDUNDANCY, PROTOCOL_VERSION,
};

/// How many reconstructed snapshots the client keeps as possible delta baselines. The server
/// keeps 16; keeping more means the client always holds whatever baseline the server picks.
pub const CLIENT_HISTORY: usize = 32;

/// Length of the connection IDs a client issues.
pub const CLIENT_CID_LEN: usize = 8;

/// Inputs remembered for input-to-acknowledgement latency (by sequence number modulo this).
const SENT_RING: usize = 64;

/// Issues client connection IDs that start with a 4-byte tag (little-endian), then 4 random
/// bytes. Many clients can then share one UDP socket: the server addresses each client's
/// packets to one of its IDs, and [`cid_tag`] reads the tag back to find the client.
struct TaggedCidGenerator {
    tag: u32,
    rng: rand_chacha::ChaCha8Rng,
}

impl ConnectionIdGenerator for TaggedCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut b = [0u8; CLIENT_CID_LEN];
        b[..4].copy_from_slice(&self.tag.to_le_bytes());
        self.rng.fill_bytes(&mut b[4..]);
        ConnectionId::new(&b)
    }

    fn cid_len(&self) -> usize {
        CLIENT_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }

    /// Only IDs with our tag are ours: a packet for another client on the same socket (or a
    /// stateless reset, whose ID is random) is never answered with a reset of our own.
    fn validate(&self, cid: &ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() == CLIENT_CID_LEN && cid[..4] == self.tag.to_le_bytes() {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }
}

/// The tag of the client a QUIC packet from the server is addressed to, when its destination
/// connection ID was issued by [`Client::connect_tagged`]. `None` for anything else.
pub fn cid_tag(packet: &[u8]) -> Option<u32> {
    let first = *packet.first()?;
    let cid = if first & 0x80 == 0 {
        // Short header: the destination ID follows the first byte; its length is ours.
        packet.get(1..1 + CLIENT_CID_LEN)?
    } else {
        // Long header: version (4 bytes), then the destination ID's length and bytes.
        let len = *packet.get(5)? as usize;
        if len != CLIENT_CID_LEN {
            return None;
        }
        packet.get(6..6 + len)?
    };
    Some(u32::from_le_bytes(cid[..4].try_into().ok()?))
}

/// How to reach and trust a server.
#[derive(Clone)]
pub struct ClientConfig {
    quic: QuicClientConfig,
    /// The TLS server name (the development certificate covers `localhost`).
    pub server_name: String,
    /// Name sent in hello.
    pub client_name: String,
    /// Token sent in hello.
    pub token: String,
    /// Send hello as soon as the connection opens (tests of the server's error paths turn
    /// this off and send their own frames).
    pub auto_hello: bool,
}

impl ClientConfig {
    /// A configuration trusting the server as `trust` says, for `server_name`.
    pub fn new(trust: Trust, server_name: &str) -> Self {
        let tls = trust.rustls_config();
        let quic_tls = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls)
            .expect("TLS 1.3 with an initial cipher suite is always configured");
        let mut quic = QuicClientConfig::new(Arc::new(quic_tls));
        quic.transport_config(Arc::new(transport(DEFAULT_TICK_PERIOD)));
        ClientConfig {
            quic,
            server_name: server_name.to_owned(),
            client_name: "client-sim".into(),
            token: String::new(),
            auto_hello: true,
        }
    }
}

/// The tick period assumed until [`ClientConfig::tick_period`] says otherwise (30 Hz).
pub const DEFAULT_TICK_PERIOD: Duration = Duration::from_nanos(1_000_000_000 / 30);

/// The client's QUIC transport settings for a game that sends every `tick_period`.
fn transport(tick_period: Duration) -> TransportConfig {
    let mut transport = TransportConfig::default();
    // The server sends a snapshot each tick: ask it to hold acknowledgements that long, so they
    // ride on snapshots instead of packets of their own (and accept the same from it).
    let mut ack = quinn_proto::AckFrequencyConfig::default();
    ack.max_ack_delay(Some(tickshard_schema::ack_delay_for(tick_period)))
        .ack_eliciting_threshold(VarInt::from_u32(tickshard_schema::ACK_ELICITING_THRESHOLD))
        .max_ack_delay_above_rtt(true);
    transport
        // The server opens no streams: a stream budget for it would only cost memory (quinn
        // prepares state for every stream the peer may open).
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(2)))
        .max_idle_timeout(Some(VarInt::from_u32(10_000).into()))
        .datagram_receive_buffer_size(Some(256 * 1024))
        .ack_frequency_config(Some(ack));
    transport
}

impl ClientConfig {
    /// Fits the QUIC acknowledgement delay to a game ticking every `period` (the client sends
    /// one input a tick, so the server's acknowledgements can wait for it, and the other way
    /// round).
    pub fn tick_period(&mut self, period: Duration) -> &mut Self {
        self.quic.transport_config(Arc::new(transport(period)));
        self
    }
}

/// Why a connection could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// quinn-proto refused to start the connection.
    #[error("connect: {0}")]
    Quic(#[from] quinn_proto::ConnectError),
}

/// Where the session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// QUIC handshake, or hello sent and no welcome yet.
    Connecting,
    /// Welcomed, not in a room.
    Lobby,
    /// Join sent.
    Joining,
    /// Holding a seat.
    InRoom {
        /// The room.
        room_id: u64,
        /// Our entity.
        entity_id: u32,
    },
    /// The connection ended.
    Closed {
        /// Why.
        reason: CloseReason,
    },
}

/// Why a connection ended: plain data, for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The server closed it with an application code and reason.
    Server {
        /// The application error code (`tickshard_schema::codes`).
        code: u64,
        /// The server's reason.
        reason: String,
    },
    /// We closed it.
    Local,
    /// No answer within the idle timeout.
    TimedOut,
    /// A transport-level failure (TLS, protocol).
    Transport(String),
}

/// Something the application should know about.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The server answered hello.
    Welcome {
        /// Our player id.
        player_id: u64,
        /// The shard holding our connection.
        shard: u16,
        /// Default tick rate.
        tick_rate: u16,
    },
    /// We hold a seat.
    Joined {
        /// The room.
        room_id: u64,
        /// Its shard.
        shard: u16,
        /// Our entity.
        entity_id: u32,
        /// The room's tick rate.
        tick_rate: u16,
        /// Players in the room, us included.
        players: u16,
    },
    /// We no longer hold a seat.
    Left {
        /// The room.
        room_id: u64,
        /// Why.
        reason: LeaveReason,
    },
    /// A chat line.
    Chat {
        /// Sender.
        from_player: u64,
        /// Text.
        text: String,
    },
    /// A game event.
    GameEvent {
        /// Tick.
        tick: u32,
        /// Kind.
        kind: u16,
        /// First argument.
        a: u32,
        /// Second argument.
        b: u32,
    },
    /// The server is draining.
    Drain {
        /// Time left.
        grace_ms: u32,
        /// Where to go.
        reconnect_hint: String,
    },
    /// A request failed.
    Error {
        /// Code.
        code: u16,
        /// Message.
        message: String,
    },
    /// A snapshot was applied.
    Snapshot {
        /// Its tick.
        tick: u32,
        /// Its size in bytes.
        bytes: usize,
    },
    /// The server applied our input `seq` (the newest it applied), `latency` after we sent
    /// it: input-to-acknowledgement latency, as the player feels it.
    InputApplied {
        /// The input's sequence number.
        seq: u32,
        /// From sending the input to the snapshot saying it was applied.
        latency: Duration,
    },
    /// The connection ended.
    Closed(CloseReason),
}

/// Figures one client keeps.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    /// Snapshots applied.
    pub snapshots: u64,
    /// Snapshot bytes received.
    pub snapshot_bytes: u64,
    /// Snapshots that arrived after a newer one (ignored).
    pub snapshots_late: u64,
    /// Snapshots that failed verification or named a baseline we do not hold.
    pub decode_errors: u64,
    /// Input datagrams sent.
    pub inputs_sent: u64,
    /// Every snapshot applied, as (tick, bytes), when recording is on.
    pub recorded: Vec<(u32, Vec<u8>)>,
}

/// A sans-IO tickshard client. See the crate documentation.
pub struct Client {
    endpoint: Endpoint,
    ch: ConnectionHandle,
    conn: quinn_proto::Connection,
    server: SocketAddr,
    state: SessionState,
    control: Option<StreamId>,
    frames: FrameDecoder,
    backlog: Vec<u8>,
    fbb: FlatBufferBuilder<'static>,
    responses: VecDeque<(Transmit, Vec<u8>)>,
    events: VecDeque<ClientEvent>,
    player_id: u64,
    history: VecDeque<(u32, Vec<EntityState>)>,
    spare: Vec<EntityState>,
    sent_at: [(u32, Option<Instant>); SENT_RING],
    latest: u32,
    last_applied: u32,
    next_seq: u32,
    client_tick: u32,
    unconfirmed: VecDeque<InputCmd>,
    last_input: Option<Bytes>,
    stats: ClientStats,
    record: bool,
    hello: ControlMsg,
}

impl Client {
    /// Starts connecting to `server`. `seed` fixes quinn's randomness (tests).
    pub fn connect(
        now: Instant,
        config: &ClientConfig,
        server: SocketAddr,
        seed: Option<[u8; 32]>,
    ) -> Result<Self, ConnectError> {
        Self::connect_tagged(now, config, server, seed, None)
    }

    /// Like [`Client::connect`], but every connection ID this client issues starts with
    /// `tag`, so that many clients can share one UDP socket: [`cid_tag`] tells which client a
    /// datagram is for.
    pub fn connect_tagged(
        now: Instant,
        config: &ClientConfig,
        server: SocketAddr,
        seed: Option<[u8; 32]>,
        tag: Option<u32>,
    ) -> Result<Self, ConnectError> {
        let mut endpoint_config = EndpointConfig::default();
        if let Some(tag) = tag {
            let rng_seed = seed.map_or_else(rand::random, |s| {
                u64::from_le_bytes(s[..8].try_into().expect("8 bytes")) ^ u64::from(tag)
            });
            endpoint_config.cid_generator(move || {
                Box::new(TaggedCidGenerator {
                    tag,
                    rng: rand_chacha::ChaCha8Rng::seed_from_u64(rng_seed),
                })
            });
        }
        let mut endpoint = Endpoint::new(Arc::new(endpoint_config), None, true, seed);
        let (ch, conn) = endpoint.connect(now, config.quic.clone(), server, &config.server_name)?;
        let mut c = Client {
            endpoint,
            ch,
            conn,
            server,
            state: SessionState::Connecting,
            control: None,
            frames: FrameDecoder::default(),
            backlog: Vec::new(),
            fbb: FlatBufferBuilder::with_capacity(1024),
            responses: VecDeque::new(),
            events: VecDeque::new(),
            player_id: 0,
            history: VecDeque::with_capacity(CLIENT_HISTORY),
            spare: Vec::new(),
            sent_at: [(0, None); SENT_RING],
            latest: 0,
            last_applied: 0,
            next_seq: 1,
            client_tick: 0,
            unconfirmed: VecDeque::with_capacity(MAX_INPUT_REDUNDANCY),
            last_input: None,
            stats: ClientStats::default(),
            record: false,
            hello: ControlMsg::Hello {
                protocol_version: PROTOCOL_VERSION,
                token: config.token.clone(),
                client_name: config.client_name.clone(),
            },
        };
        // Queue hello now; the control stream opens once the handshake tells us the server's
        // stream limit, and the queued frames go out then.
        if config.auto_hello {
            let hello = c.hello.clone();
            c.send_control(&hello);
        }
        Ok(c)
    }

    // ---- getters ----

    /// The session state.
    pub fn state(&self) -> &SessionState {
        &self.state
    }
    /// Our player id (0 before welcome).
    pub fn player_id(&self) -> u64 {
        self.player_id
    }
    /// Our entity, if seated.
    pub fn entity_id(&self) -> Option<u32> {
        match self.state {
            SessionState::InRoom { entity_id, .. } => Some(entity_id),
            _ => None,
        }
    }
    /// The visible world after the newest snapshot, sorted by entity id.
    pub fn world(&self) -> &[EntityState] {
        self.history
            .back()
            .map(|(_, s)| s.as_slice())
            .unwrap_or(&[])
    }
    /// Our own entity's latest state.
    pub fn own_entity(&self) -> Option<&EntityState> {
        let id = self.entity_id()?;
        self.world().iter().find(|e| e.id() == id)
    }
    /// Tick of the newest snapshot.
    pub fn latest_tick(&self) -> u32 {
        self.latest
    }
    /// Sequence number of the last input the server applied.
    pub fn last_applied_input(&self) -> u32 {
        self.last_applied
    }
    /// Sequence number of the last input sent.
    pub fn last_sent_input(&self) -> u32 {
        self.next_seq - 1
    }
    /// Smoothed RTT.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }
    /// Figures.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }
    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }
    /// Whether quinn has fully finished with the connection.
    pub fn is_drained(&self) -> bool {
        self.conn.is_drained()
    }
    /// Keep every snapshot's bytes in [`ClientStats::recorded`] (tests).
    pub fn record_snapshots(&mut self, on: bool) {
        self.record = on;
    }

    // ---- commands ----

    /// Joins room `room_id`, or quick-matches `mode` when `None`.
    pub fn join(&mut self, room_id: Option<u64>, mode: &str) {
        if self.state == SessionState::Lobby {
            self.state = SessionState::Joining;
        }
        self.send_control(&ControlMsg::Join {
            room_id: room_id.unwrap_or(0),
            mode: mode.to_owned(),
        });
    }

    /// Leaves the current room.
    pub fn leave(&mut self) {
        self.send_control(&ControlMsg::Leave);
    }

    /// Sends a chat line to the room.
    pub fn chat(&mut self, text: &str) {
        self.send_control(&ControlMsg::Chat {
            from_player: 0,
            text: text.to_owned(),
        });
    }

    /// Sends this tick's command, with the unconfirmed earlier ones for redundancy.
    /// Returns the command's sequence number.
    pub fn send_input(
        &mut self,
        now: Instant,
        move_x: i8,
        move_y: i8,
        buttons: u8,
        aim: u16,
    ) -> u32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent_at[seq as usize % SENT_RING] = (seq, Some(now));
        self.client_tick += 1;
        while self
            .unconfirmed
            .front()
            .is_some_and(|c| c.seq() <= self.last_applied)
        {
            self.unconfirmed.pop_front();
        }
        if self.unconfirmed.len() == MAX_INPUT_REDUNDANCY {
            self.unconfirmed.pop_front();
        }
        self.unconfirmed
            .push_back(InputCmd::new(seq, move_x, move_y, buttons, 0, aim));
        let mut d = InputDatagram {
            seq,
            client_tick: self.client_tick,
            ack_snapshot: self.latest,
            len: self.unconfirmed.len() as u8,
            ..Default::default()
        };
        for (i, c) in self.unconfirmed.iter().rev().enumerate() {
            d.cmds[i] = *c;
        }
        let bytes = Bytes::copy_from_slice(d.encode().bytes());
        self.last_input = Some(bytes.clone());
        if self.conn.datagrams().send(bytes, true).is_ok() {
            self.stats.inputs_sent += 1;
        }
        seq
    }

    /// Sends the previous input datagram again, byte for byte (the server must ignore the
    /// duplicate commands). Does nothing before the first input.
    pub fn resend_last_input(&mut self) {
        if let Some(bytes) = self.last_input.clone() {
            if self.conn.datagrams().send(bytes, true).is_ok() {
                self.stats.inputs_sent += 1;
            }
        }
    }

    /// Sends one control message as is, whatever the session state (testing the server).
    pub fn send_control_msg(&mut self, msg: &ControlMsg) {
        self.send_control(msg);
    }

    /// Sends raw bytes on the control stream (testing the server's error paths).
    pub fn send_raw_control(&mut self, bytes: &[u8]) {
        self.backlog.extend_from_slice(bytes);
        self.flush_backlog();
    }

    /// Sends a raw datagram (testing the server's error paths).
    pub fn send_raw_datagram(&mut self, bytes: &[u8]) {
        let _ = self
            .conn
            .datagrams()
            .send(Bytes::copy_from_slice(bytes), true);
    }

    /// Closes the connection.
    pub fn close(&mut self, now: Instant) {
        self.conn.close(
            now,
            VarInt::from_u32(codes::NO_ERROR),
            Bytes::from_static(b"bye"),
        );
        if !matches!(self.state, SessionState::Closed { .. }) {
            self.state = SessionState::Closed {
                reason: CloseReason::Local,
            };
        }
    }

    // ---- inputs ----

    /// Processes one UDP datagram from the network.
    pub fn handle_datagram(&mut self, now: Instant, remote: SocketAddr, data: BytesMut) {
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, remote, None, None, data, &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) if ch == self.ch => {
                self.conn.handle_event(ev);
                self.drive(now);
            }
            Some(DatagramEvent::Response(t)) => self.responses.push_back((t, buf)),
            _ => {}
        }
    }

    /// Offers a datagram that names no client (its connection ID carries no tag): a stateless
    /// reset has a random ID and is told apart only by its last 16 bytes, the reset token of
    /// one connection. Returns whether it was this client's reset (the connection is then
    /// lost, `Closed` follows). Nothing is ever sent in answer.
    pub fn handle_stray(&mut self, now: Instant, remote: SocketAddr, data: &[u8]) -> bool {
        // A reset looks like a short-header packet of at least 21 bytes (RFC 9000 §10.3).
        if data.len() < 21 || data[0] & 0x80 != 0 {
            return false;
        }
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, remote, None, None, BytesMut::from(data), &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) if ch == self.ch => {
                self.conn.handle_event(ev);
                self.drive(now);
                true
            }
            _ => false,
        }
    }

    /// Runs timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.conn.poll_timeout().is_some_and(|t| t <= now) {
            self.conn.handle_timeout(now);
            self.drive(now);
        }
    }

    // ---- outputs ----

    /// The next datagram to send; its bytes are in `buf`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        if let Some((t, data)) = self.responses.pop_front() {
            buf.clear();
            buf.extend_from_slice(&data);
            return Some(t);
        }
        buf.clear();
        let t = self.conn.poll_transmit(now, 1, buf);
        self.drive_endpoint();
        t
    }

    /// When [`Client::handle_timeout`] must next be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    // ---- internals ----

    fn drive_endpoint(&mut self) {
        while let Some(ev) = self.conn.poll_endpoint_events() {
            if let Some(back) = self.endpoint.handle_event(self.ch, ev) {
                self.conn.handle_event(back);
            }
        }
    }

    fn drive(&mut self, now: Instant) {
        self.drive_endpoint();
        while let Some(ev) = self.conn.poll() {
            match ev {
                Event::Connected => {
                    self.control = self.conn.streams().open(Dir::Bi);
                    self.flush_backlog();
                }
                Event::Stream(StreamEvent::Readable { id }) if Some(id) == self.control => {
                    self.read_control()
                }
                Event::Stream(StreamEvent::Writable { .. }) => self.flush_backlog(),
                Event::DatagramReceived => {
                    while let Some(d) = self.conn.datagrams().recv() {
                        self.on_snapshot(now, &d);
                    }
                }
                Event::ConnectionLost { reason } => {
                    let reason = match reason {
                        quinn_proto::ConnectionError::ApplicationClosed(c) => CloseReason::Server {
                            code: c.error_code.into_inner(),
                            reason: String::from_utf8_lossy(&c.reason).into_owned(),
                        },
                        quinn_proto::ConnectionError::TimedOut => CloseReason::TimedOut,
                        quinn_proto::ConnectionError::LocallyClosed => CloseReason::Local,
                        other => CloseReason::Transport(other.to_string()),
                    };
                    self.state = SessionState::Closed {
                        reason: reason.clone(),
                    };
                    self.events.push_back(ClientEvent::Closed(reason));
                }
                _ => {}
            }
        }
        self.drive_endpoint();
    }

    fn send_control(&mut self, msg: &ControlMsg) {
        msg.write_frame(&mut self.fbb, &mut self.backlog);
        self.flush_backlog();
    }

    fn flush_backlog(&mut self) {
        let Some(id) = self.control else { return };
        if self.backlog.is_empty() {
            return;
        }
        if let Ok(n) = self.conn.send_stream(id).write(&self.backlog) {
            self.backlog.drain(..n);
        }
    }

    fn read_control(&mut self) {
        let Some(id) = self.control else { return };
        let mut recv = self.conn.recv_stream(id);
        if let Ok(mut chunks) = recv.read(true) {
            while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
                self.frames.push(&chunk.bytes);
            }
            let _ = chunks.finalize();
        }
        loop {
            let msg = match self.frames.next_frame() {
                Ok(Some(f)) => ControlMsg::decode(f),
                Ok(None) => break,
                Err(_) => {
                    self.stats.decode_errors += 1;
                    break;
                }
            };
            match msg {
                Ok(m) => self.on_control(m),
                Err(_) => self.stats.decode_errors += 1,
            }
        }
    }

    fn on_control(&mut self, msg: ControlMsg) {
        let ev = match msg {
            ControlMsg::Welcome {
                player_id,
                shard,
                tick_rate,
                ..
            } => {
                self.player_id = player_id;
                if self.state == SessionState::Connecting {
                    self.state = SessionState::Lobby;
                }
                ClientEvent::Welcome {
                    player_id,
                    shard,
                    tick_rate,
                }
            }
            ControlMsg::Joined {
                room_id,
                shard,
                entity_id,
                tick_rate,
                players,
                ..
            } => {
                // Snapshots of the new seat may overtake `Joined` (datagrams are not ordered
                // with the stream), so the history is cleared when a seat ends, not here.
                self.state = SessionState::InRoom { room_id, entity_id };
                ClientEvent::Joined {
                    room_id,
                    shard,
                    entity_id,
                    tick_rate,
                    players,
                }
            }
            ControlMsg::Left { room_id, reason } => {
                self.state = SessionState::Lobby;
                self.history.clear();
                self.latest = 0;
                ClientEvent::Left { room_id, reason }
            }
            ControlMsg::Chat { from_player, text } => ClientEvent::Chat { from_player, text },
            ControlMsg::GameEvent { tick, kind, a, b } => {
                ClientEvent::GameEvent { tick, kind, a, b }
            }
            ControlMsg::DrainNotice {
                grace_ms,
                reconnect_hint,
            } => ClientEvent::Drain {
                grace_ms,
                reconnect_hint,
            },
            ControlMsg::Error { code, message } => {
                if self.state == SessionState::Joining {
                    self.state = SessionState::Lobby;
                }
                ClientEvent::Error { code, message }
            }
            _ => {
                self.stats.decode_errors += 1;
                return;
            }
        };
        self.events.push_back(ev);
    }

    fn on_snapshot(&mut self, now: Instant, data: &[u8]) {
        let Ok(s) = decode_snapshot(data) else {
            self.stats.decode_errors += 1;
            return;
        };
        let tick = s.tick();
        if tick <= self.latest {
            self.stats.snapshots_late += 1;
            return;
        }
        // Rebuild the world into a recycled buffer (sorted by entity id): no allocation per
        // snapshot once the history is full.
        let baseline = s.baseline();
        let mut state = std::mem::take(&mut self.spare);
        let base: &[EntityState] = if baseline == 0 {
            &[]
        } else {
            match self.history.iter().find(|(t, _)| *t == baseline) {
                Some((_, st)) => st,
                None => {
                    self.stats.decode_errors += 1;
                    self.spare = state;
                    return;
                }
            }
        };
        // No changes vector: nothing changed (no removals, no records).
        let changes = s.changes().map_or(&[0u8][..], |c| c.bytes());
        if apply_changes_to(changes, base, &mut state).is_err() {
            self.stats.decode_errors += 1;
            self.spare = state;
            return;
        }
        if self.history.len() == CLIENT_HISTORY {
            if let Some((_, old)) = self.history.pop_front() {
                self.spare = old;
            }
        }
        self.history.push_back((tick, state));
        let last_input = s.last_input();
        if last_input > self.last_applied {
            if let (seq, Some(at)) = self.sent_at[last_input as usize % SENT_RING] {
                if seq == last_input {
                    self.events.push_back(ClientEvent::InputApplied {
                        seq,
                        latency: now.saturating_duration_since(at),
                    });
                }
            }
        }
        self.latest = tick;
        self.last_applied = self.last_applied.max(s.last_input());
        self.stats.snapshots += 1;
        self.stats.snapshot_bytes += data.len() as u64;
        if self.record {
            self.stats.recorded.push((tick, data.to_vec()));
        }
        self.events.push_back(ClientEvent::Snapshot {
            tick,
            bytes: data.len(),
        });
    }
}
