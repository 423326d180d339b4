//! One connection's session: its quinn `Connection` and everything the protocol keeps per
//! client (PROTOCOL.md §2-§4, §9).
//!
//! A [`Session`] is driven like quinn-proto's `Connection`, which it owns: the shard feeds it
//! (`handle_event`, `handle_timeout`) and asks it for what follows ([`Session::poll`] for the
//! client's verified requests, `poll_transmit`, `poll_timeout`). It knows the protocol's rules
//! that concern one client alone:
//! - the control stream: exactly one bidirectional stream, read in bounded slices into a frame
//!   decoder, so at most two maximal frames are ever buffered;
//! - the control budget ([`CONTROL_RATE`], [`CONTROL_BURST`]) and the backlog of control bytes
//!   the client has not read yet ([`MAX_CONTROL_BACKLOG`]);
//! - hello before anything else, one hello, the protocol version, messages the client may send;
//! - input datagrams decoded and checked; a client sending malformed ones is closed after
//!   [`MAX_MALFORMED_DATAGRAMS`].
//!
//! What needs the rest of the shard (seats, rooms, other shards, the drain) it hands up as a
//! [`SessionEvent`]; a session never closes itself: it asks with [`SessionEvent::Close`] and
//! the shard closes it, so the shard's bookkeeping (the seat, the player table) has one path.

use crate::ids::{PlayerId, RoomId};
use crate::shard::stats::Counters;
use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;
use quinn_proto::{
    Connection, ConnectionEvent, Dir, EndpointEvent, Event, StreamEvent, StreamId, Transmit, VarInt,
};
use std::time::{Duration, Instant};
use tickshard_schema::{
    codes, ControlMsg, FrameDecoder, FrameError, InputDatagram, MAX_CONTROL_FRAME, PROTOCOL_VERSION,
};
use tracing::debug;

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

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Handshake or waiting for the control stream and hello, until the deadline.
    AwaitHello {
        /// When the session is closed with `HELLO_TIMEOUT` if no hello came.
        deadline: Instant,
    },
    /// Welcomed.
    Ready,
    /// Closed by us or the peer; waiting for quinn to drain.
    Closed,
}

/// Where a session's player sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seat {
    /// Nowhere.
    None,
    /// A join was sent to another shard; `quick` holds the mode if it was a quick match.
    Joining {
        /// The room asked for.
        room: RoomId,
        /// The mode, if this is a quick match (a refusal then falls back to a local room).
        quick: Option<String>,
        /// When the join gives up with `SHARD_UNAVAILABLE`.
        deadline: Instant,
    },
    /// Seated in a room (here or on another shard).
    In(RoomId),
}

/// A welcomed client's request, verified and within its control budget.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Join a room by id, or quick match (`room_id` 0) in `mode` (empty: the first mode).
    Join {
        /// The room, or 0.
        room_id: u64,
        /// The mode for quick match.
        mode: String,
    },
    /// Leave the room.
    Leave,
    /// Say something to the room.
    Chat {
        /// The text.
        text: String,
    },
}

/// What a session hands the shard, from [`Session::poll`].
#[derive(Debug)]
pub enum SessionEvent {
    /// The QUIC handshake completed.
    Connected,
    /// The client said hello in our protocol version: the session is now welcomed and the
    /// shard answers `Welcome`.
    Hello,
    /// A request from a welcomed client.
    Request(Request),
    /// An input datagram from a welcomed client.
    Input(InputDatagram),
    /// The client broke a rule (or finished its control stream): the shard closes the session
    /// with this code and reason.
    Close {
        /// Application error code (PROTOCOL.md §9).
        code: u32,
        /// Reason for the client.
        reason: String,
    },
    /// The connection is gone (the peer closed it, or it timed out).
    Lost,
}

/// The client has left more than [`MAX_CONTROL_BACKLOG`] bytes of control messages unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlogged;

/// Why a read of the control stream stopped.
enum ReadStop {
    /// Nothing more to read now.
    Blocked,
    /// The client finished the stream.
    Finished,
    /// The frame buffer is at its bound; handle frames, then read on.
    Full,
}

/// One connection and its session. See the module documentation.
pub struct Session {
    /// Which connection this is, of all that used its slot (see [`crate::ids::ConnKey`]).
    pub(super) generation: u64,
    /// The player this session is (welcomed or not yet).
    pub(super) player: PlayerId,
    /// The IP address the connection was admitted from (what the per-address cap counts,
    /// whatever address the connection migrates to later).
    admitted_from: std::net::IpAddr,
    /// Where the player sits.
    seat: Seat,
    /// Since when a welcomed player has had no seat (and no join under way).
    lobby_since: Option<Instant>,
    /// On the shard's list of connections to poll for transmits.
    pub(super) dirty: bool,
    conn: Connection,
    phase: Phase,
    control: Option<StreamId>,
    frames: FrameDecoder,
    /// The control stream has data quinn has not handed over yet.
    unread: bool,
    /// The client finished its control stream; close once its frames are handled.
    finished: bool,
    /// quinn announced datagrams not taken yet.
    datagrams: bool,
    /// A quinn event other than a datagram was handled since [`Session::take_busy`].
    busy: bool,
    backlog: Vec<u8>,
    tokens: f64,
    refilled: Instant,
    malformed: u32,
}

impl Session {
    /// A new session of `player` on `conn`, which must say hello within `hello_timeout`.
    pub fn new(
        generation: u64,
        conn: Connection,
        player: PlayerId,
        now: Instant,
        hello_timeout: Duration,
    ) -> Self {
        Session {
            generation,
            player,
            admitted_from: conn.remote_address().ip(),
            seat: Seat::None,
            lobby_since: None,
            dirty: false,
            conn,
            phase: Phase::AwaitHello {
                deadline: now + hello_timeout,
            },
            control: None,
            frames: FrameDecoder::default(),
            unread: false,
            finished: false,
            datagrams: false,
            busy: false,
            backlog: Vec::new(),
            tokens: CONTROL_BURST,
            refilled: now,
            malformed: 0,
        }
    }

    // ---- state ----

    /// Where the session is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }
    /// Where the player sits.
    pub fn seat(&self) -> &Seat {
        &self.seat
    }
    /// Since when a welcomed player has sat nowhere with no join under way, if it has.
    pub fn lobby_since(&self) -> Option<Instant> {
        self.lobby_since
    }
    /// Moves the player to `seat` at `now`; returns where it sat.
    pub fn set_seat(&mut self, seat: Seat, now: Instant) -> Seat {
        self.lobby_since = match (&seat, self.phase) {
            (Seat::None, Phase::Ready) => Some(self.lobby_since.unwrap_or(now)),
            _ => None,
        };
        std::mem::replace(&mut self.seat, seat)
    }
    /// Welcomed and not closed.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }
    /// The IP address the connection was admitted from.
    pub fn admitted_from(&self) -> std::net::IpAddr {
        self.admitted_from
    }
    /// quinn's statistics of this connection.
    pub fn stats(&self) -> quinn_proto::ConnectionStats {
        self.conn.stats()
    }
    /// True once quinn has nothing left to do for this connection: it may be forgotten.
    pub fn is_drained(&self) -> bool {
        self.conn.is_drained()
    }
    /// True if something other than a datagram happened since the last call: an answer may
    /// be due at once.
    pub fn take_busy(&mut self) -> bool {
        std::mem::take(&mut self.busy)
    }

    // ---- inputs ----

    /// An event from the endpoint for this connection (a datagram, mostly).
    pub fn handle_event(&mut self, ev: ConnectionEvent) {
        self.conn.handle_event(ev);
    }
    /// quinn's timer for this connection fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.conn.handle_timeout(now);
    }

    // ---- outputs ----

    /// The next event for the endpoint (connection IDs, the drain).
    pub fn poll_endpoint_events(&mut self) -> Option<EndpointEvent> {
        self.conn.poll_endpoint_events()
    }
    /// The next datagram for this connection's peer.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        self.conn.poll_transmit(now, 1, buf)
    }
    /// When [`Session::handle_timeout`] is next due.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.conn.poll_timeout()
    }

    /// The next thing the shard must act on, if any. Takes quinn's events in order and does
    /// what concerns this client alone; frames and datagrams one event each, so the shard can
    /// act on each before the next is read. Call until `None` after every input.
    pub fn poll(&mut self, now: Instant, counters: &mut Counters) -> Option<SessionEvent> {
        loop {
            if self.phase != Phase::Closed {
                if self.frames.buffered() > 0 {
                    if let Some(ev) = self.next_request(now, counters) {
                        return Some(ev);
                    }
                }
                if self.unread {
                    // Whatever stopped the read, the frames it buffered are handled first.
                    match self.read_control() {
                        ReadStop::Full => {}
                        ReadStop::Blocked => self.unread = false,
                        ReadStop::Finished => {
                            self.unread = false;
                            self.finished = true;
                        }
                    }
                    continue;
                }
                if self.finished {
                    self.finished = false;
                    return Some(close(codes::NO_ERROR, "control stream finished"));
                }
            }
            if self.datagrams {
                if let Some(ev) = self.next_input(counters) {
                    return Some(ev);
                }
                self.datagrams = false;
            }
            let ev = self.conn.poll()?;
            if !matches!(ev, Event::DatagramReceived) {
                self.busy = true;
            }
            match ev {
                Event::HandshakeDataReady | Event::DatagramsUnblocked => {}
                Event::Connected => return Some(SessionEvent::Connected),
                Event::ConnectionLost { reason } => {
                    debug!(player = %self.player, %reason, "connection lost");
                    return Some(SessionEvent::Lost);
                }
                Event::Stream(StreamEvent::Opened { dir }) => {
                    if let Some(ev) = self.accept_streams(dir) {
                        return Some(ev);
                    }
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    if self.control == Some(id) {
                        self.unread = true;
                    }
                }
                Event::Stream(StreamEvent::Writable { .. }) => self.flush_backlog(),
                Event::Stream(StreamEvent::Finished { .. })
                | Event::Stream(StreamEvent::Stopped { .. })
                | Event::Stream(StreamEvent::Available { .. }) => {}
                Event::DatagramReceived => self.datagrams = true,
            }
        }
    }

    /// Queues a control message for the client. Dropped if the session is closed or has no
    /// control stream yet; `Err` if the client has left more than [`MAX_CONTROL_BACKLOG`]
    /// unread (the shard then closes it with `SLOW_CONSUMER`).
    pub fn send_control(
        &mut self,
        fbb: &mut FlatBufferBuilder<'static>,
        msg: &ControlMsg,
    ) -> Result<(), Backlogged> {
        if self.phase == Phase::Closed || self.control.is_none() {
            return Ok(());
        }
        msg.write_frame(fbb, &mut self.backlog);
        if self.backlog.len() > MAX_CONTROL_BACKLOG {
            return Err(Backlogged);
        }
        self.flush_backlog();
        Ok(())
    }

    /// Queues a snapshot datagram; a newer snapshot supersedes older ones, so if quinn's send
    /// buffer is full it drops the oldest. False if quinn refused it (too large, or the peer
    /// takes no datagrams).
    pub fn send_snapshot(&mut self, bytes: Bytes) -> bool {
        self.conn.datagrams().send(bytes, true).is_ok()
    }

    /// Closes the connection with an application error code and reason. False if it was
    /// closed already.
    pub fn close(&mut self, now: Instant, code: u32, reason: &str) -> bool {
        if self.phase == Phase::Closed {
            return false;
        }
        self.conn.close(
            now,
            VarInt::from_u32(code),
            Bytes::copy_from_slice(reason.as_bytes()),
        );
        self.mark_closed();
        true
    }

    /// The connection is gone (lost, or closed): nothing more is read or sent.
    pub fn mark_closed(&mut self) {
        self.phase = Phase::Closed;
        self.lobby_since = None;
    }

    // ---- the control stream ----

    fn accept_streams(&mut self, dir: Dir) -> Option<SessionEvent> {
        while let Some(id) = self.conn.streams().accept(dir) {
            if dir == Dir::Uni || self.control.is_some() {
                return Some(close(
                    codes::PROTOCOL_VIOLATION,
                    "only one control stream is allowed",
                ));
            }
            self.control = Some(id);
            self.unread = true;
        }
        None
    }

    /// Reads the control stream into the frame decoder, in slices, until blocked, finished,
    /// or two maximal frames are buffered.
    fn read_control(&mut self) -> ReadStop {
        let Some(id) = self.control else {
            return ReadStop::Blocked;
        };
        let mut stop = ReadStop::Blocked;
        let mut recv = self.conn.recv_stream(id);
        if let Ok(mut chunks) = recv.read(true) {
            loop {
                match chunks.next(MAX_CONTROL_FRAME) {
                    Ok(Some(chunk)) => self.frames.push(&chunk.bytes),
                    Ok(None) => {
                        stop = ReadStop::Finished;
                        break;
                    }
                    // Blocked (nothing more now) or reset by the peer.
                    Err(_) => break,
                }
                if self.frames.buffered() > 2 * MAX_CONTROL_FRAME {
                    stop = ReadStop::Full;
                    break;
                }
            }
            let _ = chunks.finalize();
        }
        stop
    }

    /// The next buffered control frame, verified: a request, hello, or a reason to close.
    fn next_request(&mut self, now: Instant, counters: &mut Counters) -> Option<SessionEvent> {
        let frame = match self.frames.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return None,
            Err(FrameError::TooLarge(n)) => {
                counters.malformed_frames += 1;
                let reason = format!("control frame of {n} bytes exceeds the limit");
                return Some(SessionEvent::Close {
                    code: codes::FRAME_TOO_LARGE,
                    reason,
                });
            }
            Err(FrameError::Empty) => {
                counters.malformed_frames += 1;
                return Some(close(codes::MALFORMED_FRAME, "empty control frame"));
            }
        };
        self.tokens =
            (self.tokens + (now - self.refilled).as_secs_f64() * CONTROL_RATE).min(CONTROL_BURST);
        self.refilled = now;
        if self.tokens < 1.0 {
            return Some(close(codes::CONTROL_FLOOD, "too many control frames"));
        }
        self.tokens -= 1.0;
        let msg = match ControlMsg::decode(frame) {
            Ok(msg) => msg,
            Err(e) => {
                counters.malformed_frames += 1;
                return Some(SessionEvent::Close {
                    code: codes::MALFORMED_FRAME,
                    reason: format!("bad control frame: {e}"),
                });
            }
        };
        let ready = self.phase == Phase::Ready;
        Some(match msg {
            ControlMsg::Hello { .. } if ready => close(codes::PROTOCOL_VIOLATION, "second hello"),
            ControlMsg::Hello {
                protocol_version, ..
            } if protocol_version != PROTOCOL_VERSION => SessionEvent::Close {
                code: codes::UNSUPPORTED_VERSION,
                reason: format!(
                    "protocol version {protocol_version} is not supported (server speaks {PROTOCOL_VERSION})"
                ),
            },
            ControlMsg::Hello { .. } => {
                self.phase = Phase::Ready;
                self.lobby_since = Some(now);
                SessionEvent::Hello
            }
            _ if !ready => close(codes::PROTOCOL_VIOLATION, "message before hello"),
            ControlMsg::Join { room_id, mode } => {
                SessionEvent::Request(Request::Join { room_id, mode })
            }
            ControlMsg::Leave => SessionEvent::Request(Request::Leave),
            ControlMsg::Chat { text, .. } => SessionEvent::Request(Request::Chat {
                text: clean_chat(&text),
            }),
            _ => close(
                codes::PROTOCOL_VIOLATION,
                "message type is server-to-client only",
            ),
        })
    }

    fn flush_backlog(&mut self) {
        let Some(id) = self.control else { return };
        if self.backlog.is_empty() {
            return;
        }
        match self.conn.send_stream(id).write(&self.backlog) {
            Ok(n) => {
                self.backlog.drain(..n);
            }
            Err(e) => debug!(%e, "control stream write"),
        }
    }

    // ---- datagrams ----

    /// The next verified input datagram, or a reason to close; `None` once quinn has none.
    fn next_input(&mut self, counters: &mut Counters) -> Option<SessionEvent> {
        loop {
            let data = self.conn.datagrams().recv()?;
            if self.phase != Phase::Ready {
                counters.input_not_in_room += 1;
                continue;
            }
            match InputDatagram::decode(&data) {
                Ok(input) => return Some(SessionEvent::Input(input)),
                Err(e) => {
                    counters.malformed_datagrams += 1;
                    self.malformed += 1;
                    if self.malformed > MAX_MALFORMED_DATAGRAMS {
                        return Some(SessionEvent::Close {
                            code: codes::MALFORMED_DATAGRAMS,
                            reason: format!("too many malformed datagrams (last: {e})"),
                        });
                    }
                }
            }
        }
    }
}

/// Chat text as other players may see it: control characters (line breaks, escapes) and the
/// characters that reorder text (bidirectional embeddings, overrides, isolates and marks, which
/// can make a message show something other than what it says) are removed, and the ends
/// trimmed. Empty text is not sent on.
pub fn clean_chat(text: &str) -> String {
    let reorders = |c: char| matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    let kept: String = text
        .chars()
        .filter(|&c| !c.is_control() && !reorders(c))
        .collect();
    kept.trim().to_string()
}

fn close(code: u32, reason: &str) -> SessionEvent {
    SessionEvent::Close {
        code,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::clean_chat;

    #[test]
    fn chat_loses_control_and_reordering_characters() {
        assert_eq!(clean_chat("gg, well played"), "gg, well played");
        assert_eq!(clean_chat("héllo 世界 👋"), "héllo 世界 👋");
        assert_eq!(
            clean_chat("line\nbreak\r\tand \u{1b}[31mred"),
            "linebreakand [31mred"
        );
        // "evil.exe" shown as "exe.live" by a right-to-left override, and isolates.
        assert_eq!(clean_chat("file\u{202E}exe.live"), "fileexe.live");
        assert_eq!(clean_chat("\u{2067}x\u{2069} \u{200F}y\u{061C}"), "x y");
        assert_eq!(clean_chat(" \u{202A}\u{0007} "), "");
    }
}
