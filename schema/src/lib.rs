//! The tickshard wire schema.
//!
//! (About 1,050 lines, 280 of them tests: every decode limit and its byte-exact test sit
//! together.)
//!
//! Everything tickshard puts on the wire is a FlatBuffer described by the `.fbs` files in
//! `schema/fbs/`. The Rust code generated from them by `schema/generate.sh` (flatc 25.12.19)
//! lives in `src/generated/` and is committed; this crate adds the thin safe layer that every
//! peer must use:
//!
//! - **Verified decoding with explicit limits.** [`decode_control`] and [`decode_snapshot`]
//!   check the size first, then the file identifier, then run the FlatBuffers verifier with
//!   [`Limits`] (depth, table count, apparent size); [`InputDatagram::decode`] checks the size
//!   and the tag, then parses the packed commands strictly. Nothing reads a buffer that has not
//!   passed, so a hostile peer gets a typed [`DecodeError`], never a panic.
//! - **Owned control messages.** [`ControlMsg`] is the decoded form of one control-stream frame,
//!   with string lengths checked; [`ControlMsg::encode`] builds it back.
//! - **Allocation-free datagrams.** [`InputDatagram`] holds up to [`MAX_INPUT_REDUNDANCY`]
//!   commands inline; [`SnapshotWriter`] builds snapshots into a reused builder.
//! - **Control-stream framing.** [`FrameDecoder`] splits a byte stream into frames of at most
//!   [`MAX_CONTROL_FRAME`] bytes, and [`write_frame`] adds the 4-byte little-endian length.
//!
//! A snapshot datagram is named by its FlatBuffers file identifier (`TSSN`, bytes 4..8). An
//! input datagram is not a FlatBuffer (since protocol 3): its first byte is [`INPUT_TAG`] and
//! the packed commands follow, because the FlatBuffers framing was 28 of its 78 bytes on the
//! wire and carried nothing the packed form does not.

#[allow(
    clippy::all,
    unused_imports,
    dead_code,
    missing_docs,
    unsafe_op_in_unsafe_fn
)]
#[path = "generated/tickshard_generated.rs"]
mod tickshard_generated;

use flatbuffers::{FlatBufferBuilder, VerifierOptions, WIPOffset};

pub mod changes;

/// The generated FlatBuffers types (tables, structs, unions), as flatc named them.
#[allow(missing_docs)]
pub mod wire {
    pub use crate::tickshard_generated::tickshard::wire::*;
}

pub use wire::{EntityState, InputCmd, LeaveReason};

/// File identifier of control frames.
pub const CONTROL_IDENTIFIER: &str = "TSCT";
/// First byte of every input datagram (`I`); the packed commands follow (PROTOCOL.md §6).
pub const INPUT_TAG: u8 = b'I';
/// File identifier of snapshot datagrams.
pub const SNAPSHOT_IDENTIFIER: &str = "TSSN";

/// The protocol version a client announces in `Hello`. A server refuses other versions.
pub const PROTOCOL_VERSION: u16 = 3;
/// The ALPN protocol id of tickshard over QUIC.
pub const ALPN: &[u8] = b"tickshard/1";

/// The acknowledgement delay a QUIC peer that hears from the other side every `tick_period`
/// asks for (QUIC's ACK frequency extension): a period and a quarter, so an acknowledgement
/// rides on the next input or snapshot rather than in a packet of its own; at least 25 ms
/// (QUIC's default) and at most 100 ms (the delay adds to the probe timeout, and so to loss
/// recovery on the control stream). PROTOCOL.md explains it for other clients.
pub fn ack_delay_for(tick_period: std::time::Duration) -> std::time::Duration {
    use std::time::Duration;
    (tick_period + tick_period / 4).clamp(Duration::from_millis(25), Duration::from_millis(100))
}

/// The ack-eliciting threshold both sides ask of each other (QUIC's ACK frequency extension):
/// acknowledge at once after more than 3 unacknowledged packets (QUIC's default is 1). With one
/// packet a tick each way the delay, not the count, decides; the threshold only matters in a
/// burst.
pub const ACK_ELICITING_THRESHOLD: u32 = 3;
/// Largest control frame (the FlatBuffer, without its 4-byte length) either side accepts.
/// Control messages are small (the largest is a chat line); 16 KiB leaves room for
/// future messages while bounding what a peer can make the other buffer.
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;
/// Longest chat line in bytes.
pub const MAX_CHAT_LEN: usize = 512;
/// Longest token, name, mode or hint string in bytes.
pub const MAX_SHORT_STRING: usize = 256;
/// How many commands one input datagram may carry (the newest and its predecessors).
/// Eight commands at 30 Hz cover 267 ms of consecutive loss at 12 bytes each.
pub const MAX_INPUT_REDUNDANCY: usize = 8;
/// Largest datagram either side accepts (QUIC datagrams never exceed the path MTU).
pub const MAX_DATAGRAM: usize = 1500;

/// Limits applied to one buffer before any field is read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest buffer in bytes.
    pub max_bytes: usize,
    /// Deepest table nesting.
    pub max_depth: usize,
    /// Most tables in the buffer.
    pub max_tables: usize,
}

impl Limits {
    /// Limits for one control frame.
    pub const CONTROL: Limits = Limits {
        max_bytes: MAX_CONTROL_FRAME,
        max_depth: 4,
        max_tables: 8,
    };
    /// Limits for one datagram.
    pub const DATAGRAM: Limits = Limits {
        max_bytes: MAX_DATAGRAM,
        max_depth: 2,
        max_tables: 4,
    };

    fn verifier(&self) -> VerifierOptions {
        VerifierOptions {
            max_depth: self.max_depth,
            max_tables: self.max_tables,
            max_apparent_size: self.max_bytes * 4,
            ignore_missing_null_terminator: false,
        }
    }
}

/// Why a buffer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer is larger than the limit for its kind.
    #[error("buffer of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The buffer's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The buffer's file identifier is not the expected one.
    #[error("wrong file identifier (expected {expected})")]
    WrongIdentifier {
        /// The expected identifier.
        expected: &'static str,
    },
    /// The datagram's first byte is not the expected tag (or the datagram is empty).
    #[error("wrong datagram tag (expected {expected:#04x})")]
    WrongTag {
        /// The expected tag.
        expected: u8,
    },
    /// The FlatBuffers verifier refused the buffer.
    #[error("flatbuffer verification failed: {0}")]
    Invalid(String),
    /// The buffer verified but a field breaks the protocol's rules.
    #[error("invalid field: {0}")]
    Field(&'static str),
}

fn check<'a>(buf: &'a [u8], limits: &Limits, ident: &'static str) -> Result<&'a [u8], DecodeError> {
    if buf.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            len: buf.len(),
            max: limits.max_bytes,
        });
    }
    // `buffer_has_identifier` asserts on buffers shorter than the identifier; check first.
    if buf.len() < 8 || !flatbuffers::buffer_has_identifier(buf, ident, false) {
        return Err(DecodeError::WrongIdentifier { expected: ident });
    }
    Ok(buf)
}

/// Verifies and opens one control frame.
pub fn decode_control(buf: &[u8]) -> Result<wire::Control<'_>, DecodeError> {
    let buf = check(buf, &Limits::CONTROL, CONTROL_IDENTIFIER)?;
    flatbuffers::root_with_opts::<wire::Control>(&Limits::CONTROL.verifier(), buf)
        .map_err(|e| DecodeError::Invalid(e.to_string()))
}

/// Verifies and opens one snapshot datagram.
pub fn decode_snapshot(buf: &[u8]) -> Result<wire::Snapshot<'_>, DecodeError> {
    let buf = check(buf, &Limits::DATAGRAM, SNAPSHOT_IDENTIFIER)?;
    flatbuffers::root_with_opts::<wire::Snapshot>(&Limits::DATAGRAM.verifier(), buf)
        .map_err(|e| DecodeError::Invalid(e.to_string()))
}

/// An input datagram, decoded without allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InputDatagram {
    /// Newest command's sequence number.
    pub seq: u32,
    /// The client's tick counter.
    pub client_tick: u32,
    /// Newest snapshot tick the client holds (0: none).
    pub ack_snapshot: u32,
    /// Number of valid entries in `cmds`.
    pub len: u8,
    /// Commands, newest first.
    pub cmds: [InputCmd; MAX_INPUT_REDUNDANCY],
}

/// One encoded input datagram, held inline ([`InputDatagram::encode`]).
#[derive(Clone, Copy)]
pub struct EncodedInput {
    buf: [u8; InputDatagram::MAX_LEN],
    len: usize,
}

impl EncodedInput {
    /// The datagram's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl InputDatagram {
    /// Longest datagram: the tag, three 5-byte varints, then 8 commands of 5 bytes, all but the
    /// first behind a gap of up to 5 bytes. Anything longer is refused before it is parsed.
    pub const MAX_LEN: usize =
        1 + 3 * 5 + MAX_INPUT_REDUNDANCY * 5 + (MAX_INPUT_REDUNDANCY - 1) * 5;

    /// Verifies `buf` and copies it out. A missing or wrong tag, more than
    /// [`MAX_INPUT_REDUNDANCY`] commands, commands not in strictly decreasing sequence order,
    /// truncated or trailing bytes are refused.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        if buf.len() > Self::MAX_LEN {
            return Err(DecodeError::TooLarge {
                len: buf.len(),
                max: Self::MAX_LEN,
            });
        }
        let Some((&INPUT_TAG, packed)) = buf.split_first() else {
            return Err(DecodeError::WrongTag {
                expected: INPUT_TAG,
            });
        };
        let mut r = changes::ByteReader::new(packed);
        let mut out = InputDatagram {
            seq: r.varint()?,
            client_tick: r.varint()?,
            ack_snapshot: r.varint()?,
            ..Default::default()
        };
        let mut seq = out.seq;
        while !r.is_empty() {
            let i = out.len as usize;
            if i == MAX_INPUT_REDUNDANCY {
                return Err(DecodeError::Field("too many input commands"));
            }
            if i > 0 {
                let gap = r.varint()?;
                if gap == 0 {
                    return Err(DecodeError::Field("input commands not newest first"));
                }
                seq = seq
                    .checked_sub(gap)
                    .ok_or(DecodeError::Field("input command seq below 0"))?;
            }
            let move_x = r.byte()? as i8;
            let move_y = r.byte()? as i8;
            let buttons = r.byte()?;
            let aim = u16::from_le_bytes([r.byte()?, r.byte()?]);
            out.cmds[i] = InputCmd::new(seq, move_x, move_y, buttons, 0, aim);
            out.len += 1;
        }
        Ok(out)
    }

    /// The valid commands, newest first.
    pub fn cmds(&self) -> &[InputCmd] {
        &self.cmds[..self.len as usize]
    }

    /// Encodes the datagram: the tag, then the packed commands. The commands must be newest
    /// first with strictly decreasing seqs, the first one's equal to `seq` (as
    /// [`InputDatagram::decode`] requires).
    pub fn encode(&self) -> EncodedInput {
        let mut packed = [0u8; Self::MAX_LEN];
        packed[0] = INPUT_TAG;
        let mut n = 1;
        use changes::put_varint_at as put;
        put(&mut packed, &mut n, self.seq);
        put(&mut packed, &mut n, self.client_tick);
        put(&mut packed, &mut n, self.ack_snapshot);
        let mut prev = self.seq;
        for (i, c) in self.cmds().iter().enumerate() {
            debug_assert!(
                if i == 0 {
                    c.seq() == self.seq
                } else {
                    c.seq() < prev
                },
                "commands newest first"
            );
            if i > 0 {
                put(&mut packed, &mut n, prev - c.seq());
            }
            prev = c.seq();
            let aim = c.aim().to_le_bytes();
            for b in [
                c.move_x() as u8,
                c.move_y() as u8,
                c.buttons(),
                aim[0],
                aim[1],
            ] {
                packed[n] = b;
                n += 1;
            }
        }
        EncodedInput {
            buf: packed,
            len: n,
        }
    }
}

/// Fixed part of a snapshot's encoded size (header, vtable, the changes vector's length and
/// padding), used to plan how many entity records fit one datagram. Measured from encoded
/// snapshots with a margin.
pub const SNAPSHOT_OVERHEAD: usize = 64;
/// Size of one entity state in memory (the unpacked form both sides hold).
pub const ENTITY_STATE_SIZE: usize = std::mem::size_of::<EntityState>();

/// Builds snapshot datagrams into a builder that is reused from one snapshot to the next.
pub struct SnapshotWriter {
    fbb: FlatBufferBuilder<'static>,
}

impl Default for SnapshotWriter {
    fn default() -> Self {
        Self {
            fbb: FlatBufferBuilder::with_capacity(2048),
        }
    }
}

impl SnapshotWriter {
    /// Encodes one snapshot and returns its bytes (valid until the next call). `changes` is
    /// the packed delta ([`changes::encode_changes`]).
    pub fn encode(&mut self, tick: u32, baseline: u32, last_input: u32, changes: &[u8]) -> &[u8] {
        let fbb = &mut self.fbb;
        fbb.reset();
        let changes = fbb.create_vector(changes);
        let snap = wire::Snapshot::create(
            fbb,
            &wire::SnapshotArgs {
                tick,
                baseline,
                last_input,
                changes: Some(changes),
            },
        );
        fbb.finish(snap, Some(SNAPSHOT_IDENTIFIER));
        fbb.finished_data()
    }
}

/// One control-stream message, decoded and owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    /// Client's first frame.
    Hello {
        /// Must equal [`PROTOCOL_VERSION`].
        protocol_version: u16,
        /// Optional auth token.
        token: String,
        /// Optional display name.
        client_name: String,
    },
    /// Server's answer to hello.
    Welcome {
        /// The player's id, unique in the process.
        player_id: u64,
        /// The shard that owns the connection.
        shard: u16,
        /// Default tick rate (Hz).
        tick_rate: u16,
        /// The shard's current tick.
        server_tick: u32,
        /// Opaque token for reconnecting.
        resume_token: String,
        /// Largest datagram the server will send.
        max_datagram: u16,
    },
    /// Join a room (`room_id` != 0) or quick match by `mode`.
    Join {
        /// Room id, or 0 for quick match.
        room_id: u64,
        /// Game mode for quick match.
        mode: String,
    },
    /// A seat was granted.
    Joined {
        /// The room.
        room_id: u64,
        /// Its game mode.
        mode: String,
        /// Shard hosting the room.
        shard: u16,
        /// The room's tick rate (Hz).
        tick_rate: u16,
        /// The player's entity.
        entity_id: u32,
        /// Room capacity.
        capacity: u16,
        /// Players in the room, this one included.
        players: u16,
        /// The room's tick at joining.
        server_tick: u32,
    },
    /// Leave the current room.
    Leave,
    /// A seat ended.
    Left {
        /// The room.
        room_id: u64,
        /// Why.
        reason: LeaveReason,
    },
    /// A chat line.
    Chat {
        /// Sender (server to client only).
        from_player: u64,
        /// The text.
        text: String,
    },
    /// A game event.
    GameEvent {
        /// Room tick.
        tick: u32,
        /// Game-defined kind.
        kind: u16,
        /// First argument.
        a: u32,
        /// Second argument.
        b: u32,
    },
    /// The server is draining.
    DrainNotice {
        /// Time left before the server closes, in milliseconds.
        grace_ms: u32,
        /// Where to reconnect (may be empty).
        reconnect_hint: String,
    },
    /// A request failed.
    Error {
        /// Error code (PROTOCOL.md).
        code: u16,
        /// Human-readable reason.
        message: String,
    },
}

fn bounded(s: Option<&str>, max: usize, what: &'static str) -> Result<String, DecodeError> {
    let s = s.unwrap_or("");
    if s.len() > max {
        return Err(DecodeError::Field(what));
    }
    Ok(s.to_owned())
}

impl ControlMsg {
    /// Verifies one frame (without its length prefix) and decodes it.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        use wire::ControlBody as B;
        let c = decode_control(buf)?;
        let missing = DecodeError::Field("control body missing");
        let s = MAX_SHORT_STRING;
        Ok(match c.body_type() {
            B::Hello => {
                let m = c.body_as_hello().ok_or(missing)?;
                ControlMsg::Hello {
                    protocol_version: m.protocol_version(),
                    token: bounded(m.token(), s, "token too long")?,
                    client_name: bounded(m.client_name(), s, "client name too long")?,
                }
            }
            B::Welcome => {
                let m = c.body_as_welcome().ok_or(missing)?;
                ControlMsg::Welcome {
                    player_id: m.player_id(),
                    shard: m.shard(),
                    tick_rate: m.tick_rate(),
                    server_tick: m.server_tick(),
                    resume_token: bounded(m.resume_token(), s, "resume token too long")?,
                    max_datagram: m.max_datagram(),
                }
            }
            B::Join => {
                let m = c.body_as_join().ok_or(missing)?;
                ControlMsg::Join {
                    room_id: m.room_id(),
                    mode: bounded(m.mode(), s, "mode too long")?,
                }
            }
            B::Joined => {
                let m = c.body_as_joined().ok_or(missing)?;
                ControlMsg::Joined {
                    room_id: m.room_id(),
                    mode: bounded(m.mode(), s, "mode too long")?,
                    shard: m.shard(),
                    tick_rate: m.tick_rate(),
                    entity_id: m.entity_id(),
                    capacity: m.capacity(),
                    players: m.players(),
                    server_tick: m.server_tick(),
                }
            }
            B::Leave => ControlMsg::Leave,
            B::Left => {
                let m = c.body_as_left().ok_or(missing)?;
                ControlMsg::Left {
                    room_id: m.room_id(),
                    reason: m.reason(),
                }
            }
            B::Chat => {
                let m = c.body_as_chat().ok_or(missing)?;
                ControlMsg::Chat {
                    from_player: m.from_player(),
                    text: bounded(m.text(), MAX_CHAT_LEN, "chat line too long")?,
                }
            }
            B::GameEvent => {
                let m = c.body_as_game_event().ok_or(missing)?;
                ControlMsg::GameEvent {
                    tick: m.tick(),
                    kind: m.kind(),
                    a: m.a(),
                    b: m.b(),
                }
            }
            B::DrainNotice => {
                let m = c.body_as_drain_notice().ok_or(missing)?;
                ControlMsg::DrainNotice {
                    grace_ms: m.grace_ms(),
                    reconnect_hint: bounded(m.reconnect_hint(), s, "reconnect hint too long")?,
                }
            }
            B::Error => {
                let m = c.body_as_error().ok_or(missing)?;
                ControlMsg::Error {
                    code: m.code(),
                    message: bounded(m.message(), s, "error message too long")?,
                }
            }
            _ => return Err(DecodeError::Field("unknown control body")),
        })
    }

    /// Encodes into `fbb` (reset first) and returns the FlatBuffer bytes, without length prefix.
    pub fn encode<'b>(&self, fbb: &'b mut FlatBufferBuilder<'static>) -> &'b [u8] {
        use wire::ControlBody as B;
        fbb.reset();
        let (kind, body): (B, WIPOffset<flatbuffers::UnionWIPOffset>) = match self {
            ControlMsg::Hello {
                protocol_version,
                token,
                client_name,
            } => {
                let token = Some(fbb.create_string(token));
                let client_name = Some(fbb.create_string(client_name));
                let m = wire::Hello::create(
                    fbb,
                    &wire::HelloArgs {
                        protocol_version: *protocol_version,
                        token,
                        client_name,
                    },
                );
                (B::Hello, m.as_union_value())
            }
            ControlMsg::Welcome {
                player_id,
                shard,
                tick_rate,
                server_tick,
                resume_token,
                max_datagram,
            } => {
                let resume_token = Some(fbb.create_string(resume_token));
                let m = wire::Welcome::create(
                    fbb,
                    &wire::WelcomeArgs {
                        player_id: *player_id,
                        shard: *shard,
                        tick_rate: *tick_rate,
                        server_tick: *server_tick,
                        resume_token,
                        max_datagram: *max_datagram,
                    },
                );
                (B::Welcome, m.as_union_value())
            }
            ControlMsg::Join { room_id, mode } => {
                let mode = Some(fbb.create_string(mode));
                let m = wire::Join::create(
                    fbb,
                    &wire::JoinArgs {
                        room_id: *room_id,
                        mode,
                    },
                );
                (B::Join, m.as_union_value())
            }
            ControlMsg::Joined {
                room_id,
                mode,
                shard,
                tick_rate,
                entity_id,
                capacity,
                players,
                server_tick,
            } => {
                let mode = Some(fbb.create_string(mode));
                let m = wire::Joined::create(
                    fbb,
                    &wire::JoinedArgs {
                        room_id: *room_id,
                        mode,
                        shard: *shard,
                        tick_rate: *tick_rate,
                        entity_id: *entity_id,
                        capacity: *capacity,
                        players: *players,
                        server_tick: *server_tick,
                    },
                );
                (B::Joined, m.as_union_value())
            }
            ControlMsg::Leave => {
                let m = wire::Leave::create(fbb, &wire::LeaveArgs {});
                (B::Leave, m.as_union_value())
            }
            ControlMsg::Left { room_id, reason } => {
                let m = wire::Left::create(
                    fbb,
                    &wire::LeftArgs {
                        room_id: *room_id,
                        reason: *reason,
                    },
                );
                (B::Left, m.as_union_value())
            }
            ControlMsg::Chat { from_player, text } => {
                let text = Some(fbb.create_string(text));
                let m = wire::Chat::create(
                    fbb,
                    &wire::ChatArgs {
                        from_player: *from_player,
                        text,
                    },
                );
                (B::Chat, m.as_union_value())
            }
            ControlMsg::GameEvent { tick, kind, a, b } => {
                let m = wire::GameEvent::create(
                    fbb,
                    &wire::GameEventArgs {
                        tick: *tick,
                        kind: *kind,
                        a: *a,
                        b: *b,
                    },
                );
                (B::GameEvent, m.as_union_value())
            }
            ControlMsg::DrainNotice {
                grace_ms,
                reconnect_hint,
            } => {
                let reconnect_hint = Some(fbb.create_string(reconnect_hint));
                let m = wire::DrainNotice::create(
                    fbb,
                    &wire::DrainNoticeArgs {
                        grace_ms: *grace_ms,
                        reconnect_hint,
                    },
                );
                (B::DrainNotice, m.as_union_value())
            }
            ControlMsg::Error { code, message } => {
                let message = Some(fbb.create_string(message));
                let m = wire::Error::create(
                    fbb,
                    &wire::ErrorArgs {
                        code: *code,
                        message,
                    },
                );
                (B::Error, m.as_union_value())
            }
        };
        let root = wire::Control::create(
            fbb,
            &wire::ControlArgs {
                body_type: kind,
                body: Some(body),
            },
        );
        fbb.finish(root, Some(CONTROL_IDENTIFIER));
        fbb.finished_data()
    }

    /// Encodes with the 4-byte little-endian length prefix, appending to `out`.
    pub fn write_frame(&self, fbb: &mut FlatBufferBuilder<'static>, out: &mut Vec<u8>) {
        write_frame(self.encode(fbb), out);
    }
}

/// Appends `frame` to `out` with its 4-byte little-endian length prefix.
pub fn write_frame(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    out.extend_from_slice(frame);
}

/// Why the control stream's framing failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame announced more than [`MAX_CONTROL_FRAME`] bytes.
    #[error("control frame of {0} bytes exceeds {MAX_CONTROL_FRAME}")]
    TooLarge(usize),
    /// A zero-length frame.
    #[error("empty control frame")]
    Empty,
}

/// Splits a control stream into frames. Buffers at most one frame plus one read.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
}

impl FrameDecoder {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete frame, if any. The slice is valid until the next call.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < 4 {
            self.compact();
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > MAX_CONTROL_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if avail.len() < 4 + len {
            self.compact();
            return Ok(None);
        }
        let start = self.pos + 4;
        self.pos = start + len;
        Ok(Some(&self.buf[start..start + len]))
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fbb() -> FlatBufferBuilder<'static> {
        FlatBufferBuilder::with_capacity(256)
    }

    #[test]
    fn control_round_trip() {
        let msgs = [
            ControlMsg::Hello {
                protocol_version: 1,
                token: "t".into(),
                client_name: "bot".into(),
            },
            ControlMsg::Join {
                room_id: 0,
                mode: "arena".into(),
            },
            ControlMsg::Left {
                room_id: 7,
                reason: LeaveReason::Kicked,
            },
            ControlMsg::Error {
                code: 100,
                message: "room not found".into(),
            },
            ControlMsg::Leave,
        ];
        let mut b = fbb();
        for m in msgs {
            let bytes = m.encode(&mut b).to_vec();
            assert_eq!(ControlMsg::decode(&bytes).unwrap(), m);
        }
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let mut b = fbb();
        let bytes = ControlMsg::Join {
            room_id: 3,
            mode: "arena".into(),
        }
        .encode(&mut b)
        .to_vec();
        let mut refused = 0;
        for cut in 0..bytes.len() {
            // Trailing alignment padding may be cut and still verify; nothing may panic.
            refused += ControlMsg::decode(&bytes[..cut]).is_err() as usize;
        }
        assert!(refused >= bytes.len() - 8, "{refused} of {}", bytes.len());
        assert!(ControlMsg::decode(&[0xff; 64]).is_err());
        assert_eq!(
            InputDatagram::decode(&bytes),
            Err(DecodeError::WrongTag {
                expected: INPUT_TAG
            }),
            "control is not an input"
        );
        let mut flipped = bytes.clone();
        for i in 8..flipped.len() {
            flipped[i] ^= 0xa5;
            let _ = ControlMsg::decode(&flipped); // must not panic
            flipped[i] ^= 0xa5;
        }
    }

    #[test]
    fn long_strings_are_refused() {
        let mut b = fbb();
        let bytes = ControlMsg::Chat {
            from_player: 0,
            text: "x".repeat(MAX_CHAT_LEN + 1),
        }
        .encode(&mut b)
        .to_vec();
        assert_eq!(
            ControlMsg::decode(&bytes),
            Err(DecodeError::Field("chat line too long"))
        );
    }

    #[test]
    fn input_round_trip_and_order_rule() {
        let mut d = InputDatagram {
            seq: 10,
            client_tick: 10,
            ack_snapshot: 4,
            len: 3,
            ..Default::default()
        };
        for i in 0..3 {
            d.cmds[i] = InputCmd::new(10 - i as u32, 1, -1, 0, 0, 9);
        }
        let bytes = d.encode().bytes().to_vec();
        assert_eq!(InputDatagram::decode(&bytes).unwrap(), d);
        // The tag, three 1-byte varints, three commands of 5 bytes and two 1-byte gaps
        // (protocol 1 took 80 bytes for the same datagram, protocol 2 48).
        assert_eq!(bytes.len(), 1 + 3 + 15 + 2);
        // Packed by hand: what a broken or hostile client could send.
        let raw = |packed: &[u8]| [&[INPUT_TAG][..], packed].concat();
        // PROTOCOL.md §6's example.
        let mut ex = InputDatagram {
            seq: 10,
            client_tick: 10,
            ack_snapshot: 4,
            len: 2,
            ..Default::default()
        };
        ex.cmds[0] = InputCmd::new(10, 127, 0, 0, 0, 0);
        ex.cmds[1] = InputCmd::new(9, 127, 0, 1, 0, 9);
        let want = [
            0x0au8, 0x0a, 0x04, 0x7f, 0, 0, 0, 0, 0x01, 0x7f, 0, 0x01, 0x09, 0,
        ];
        assert_eq!(ex.encode().bytes(), &raw(&want)[..]);
        assert_eq!(raw(&want)[0], 0x49);
        let cmd = [1u8, 0xff, 0, 9, 0];
        let ok = [&[10u8, 10, 4][..], &cmd, &[1], &cmd].concat();
        assert_eq!(InputDatagram::decode(&raw(&ok)).unwrap().cmds()[1].seq(), 9);
        let same_seq = [&[10u8, 10, 4][..], &cmd, &[0], &cmd].concat();
        let below_zero = [&[10u8, 10, 4][..], &cmd, &[11], &cmd].concat();
        let truncated = [&[10u8, 10, 4][..], &cmd[..4]].concat();
        let mut nine = vec![20u8, 20, 4];
        nine.extend_from_slice(&cmd);
        for _ in 0..8 {
            nine.push(1);
            nine.extend_from_slice(&cmd);
        }
        for (what, bad) in [
            ("a repeated seq", same_seq),
            ("a seq below 0", below_zero),
            ("a truncated command", truncated),
            ("nine commands", nine),
            ("no header", vec![]),
            (
                "an overlong varint",
                vec![0x80, 0x80, 0x80, 0x80, 0x80, 1, 0, 0],
            ),
        ] {
            assert!(
                InputDatagram::decode(&raw(&bad)).is_err(),
                "{what} accepted"
            );
        }
        // The tag decides: a good body behind another first byte, an empty datagram, and a
        // protocol 2 input (the same body inside a FlatBuffer) are all refused.
        let tag_err = Err(DecodeError::WrongTag {
            expected: INPUT_TAG,
        });
        assert_eq!(InputDatagram::decode(&[&[b'J'][..], &ok].concat()), tag_err);
        assert_eq!(InputDatagram::decode(&[]), tag_err);
        assert_eq!(InputDatagram::decode(&ok), tag_err);
        let mut b = fbb();
        let v = b.create_vector(&want[..]);
        let snap = wire::Snapshot::create(
            &mut b,
            &wire::SnapshotArgs {
                changes: Some(v),
                ..Default::default()
            },
        );
        b.finish(snap, Some(SNAPSHOT_IDENTIFIER));
        assert!(InputDatagram::decode(b.finished_data()).is_err());
        // Longer than any valid input: refused before parsing.
        let long = raw(&[1u8; InputDatagram::MAX_LEN]);
        assert!(matches!(
            InputDatagram::decode(&long),
            Err(DecodeError::TooLarge { .. })
        ));
        // The longest valid input fits MAX_LEN: 8 commands, 5-byte varints and gaps.
        let mut max = InputDatagram {
            seq: u32::MAX,
            client_tick: u32::MAX,
            ack_snapshot: u32::MAX,
            len: 8,
            ..Default::default()
        };
        for i in 0..8 {
            max.cmds[i] = InputCmd::new(u32::MAX - (i as u32) * (1 << 28), 1, 1, 1, 0, 1);
        }
        let enc = max.encode();
        assert_eq!(enc.bytes().len(), InputDatagram::MAX_LEN);
        assert_eq!(InputDatagram::decode(enc.bytes()).unwrap(), max);
    }

    #[test]
    fn frames_split_and_limit() {
        let mut out = Vec::new();
        write_frame(b"abc", &mut out);
        write_frame(b"defg", &mut out);
        let mut d = FrameDecoder::default();
        d.push(&out[..5]);
        assert_eq!(d.next_frame().unwrap(), None);
        d.push(&out[5..]);
        assert_eq!(d.next_frame().unwrap(), Some(&b"abc"[..]));
        assert_eq!(d.next_frame().unwrap(), Some(&b"defg"[..]));
        assert_eq!(d.next_frame().unwrap(), None);
        d.push(&(MAX_CONTROL_FRAME as u32 + 1).to_le_bytes());
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TooLarge(MAX_CONTROL_FRAME + 1))
        );
    }

    #[test]
    fn snapshot_fits_budget() {
        let mut w = SnapshotWriter::default();
        let ents: Vec<EntityState> = (1..=60)
            .map(|i| EntityState::new(i, 2, 3, 0, 0, 100, 0, 5, 0))
            .collect();
        let mut packed = Vec::new();
        changes::encode_changes(&[], &[70, 71, 72], &ents, &mut packed);
        let planned = changes::count_bound(3)
            + 3 * changes::removal_bound(72)
            + ents
                .iter()
                .map(|e| changes::record_bound(None, e))
                .sum::<usize>();
        let bytes = w.encode(1, 0, 0, &packed).to_vec();
        assert!(
            bytes.len() <= SNAPSHOT_OVERHEAD + planned,
            "{} > {} + {planned}",
            bytes.len(),
            SNAPSHOT_OVERHEAD
        );
        let s = decode_snapshot(&bytes).unwrap();
        let mut state = Vec::new();
        changes::apply_changes(s.changes().unwrap().bytes(), &mut state).unwrap();
        assert_eq!(state, ents);
    }
}

/// Application error codes. Close codes end the connection (QUIC `CONNECTION_CLOSE` with this
/// code and a reason); request codes travel in an `Error` control message and the connection
/// stays open. PROTOCOL.md lists each with the situation that produces it.
pub mod codes {
    /// Close: normal end of the session.
    pub const NO_ERROR: u32 = 0;
    /// Close: the peer broke the protocol (a frame before hello, a second hello, a message only
    /// the server sends, a second stream).
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// Close: a control frame failed verification.
    pub const MALFORMED_FRAME: u32 = 2;
    /// Close: a control frame announced more than `MAX_CONTROL_FRAME` bytes.
    pub const FRAME_TOO_LARGE: u32 = 3;
    /// Close: the client's protocol version is not supported.
    pub const UNSUPPORTED_VERSION: u32 = 4;
    /// Close: no hello within the hello timeout.
    pub const HELLO_TIMEOUT: u32 = 5;
    /// Close: too many datagrams failed verification.
    pub const MALFORMED_DATAGRAMS: u32 = 6;
    /// Close: the server is at its connection limit.
    pub const SERVER_FULL: u32 = 7;
    /// Close: the server is draining and admits no one.
    pub const DRAINING: u32 = 8;
    /// Close: an operator removed the player.
    pub const KICKED: u32 = 9;
    /// Close: more control frames than the rate limit allows.
    pub const CONTROL_FLOOD: u32 = 10;
    /// Close: the client does not read its control stream and the server's buffer for it is full.
    pub const SLOW_CONSUMER: u32 = 11;
    /// Close: the server is shutting down.
    pub const SHUTTING_DOWN: u32 = 12;
    /// Close: a welcomed client sat in no room for the lobby timeout.
    pub const LOBBY_TIMEOUT: u32 = 13;

    /// Request: no room with that id.
    pub const ROOM_NOT_FOUND: u16 = 100;
    /// Request: the room has no free seat.
    pub const ROOM_FULL: u16 = 101;
    /// Request: no such game mode.
    pub const UNKNOWN_MODE: u16 = 102;
    /// Request: the client already holds (or is getting) a seat.
    pub const ALREADY_IN_ROOM: u16 = 103;
    /// Request: the client holds no seat.
    pub const NOT_IN_ROOM: u16 = 104;
    /// Request: the room's shard did not answer.
    pub const SHARD_UNAVAILABLE: u16 = 105;
    /// The server is draining and opens no new rooms: a join or quick match that would need
    /// one is refused. Connect to another server (see the drain notice's reconnect hint).
    pub const SERVER_DRAINING: u16 = 106;
}
