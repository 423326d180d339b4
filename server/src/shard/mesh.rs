//! Messages between shards.
//!
//! Shards share nothing mutable; they cooperate only by sending these over glommio channels
//! (the mesh). A player's connection always stays on the shard that accepted it; when the
//! player sits in a room hosted elsewhere, the two shards exchange the player's inputs,
//! snapshots and control messages here.

use crate::ids::{PlayerId, RoomId, ShardId};
use bytes::Bytes;
use tickshard_schema::{ControlMsg, InputDatagram};

/// A room with free seats, as advertised to other shards for quick match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room.
    pub room: RoomId,
    /// Its mode.
    pub mode: String,
    /// Free seats when advertised.
    pub free: u16,
}

/// The answer to a cross-shard join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedInfo {
    /// The room.
    pub room: RoomId,
    /// The `Joined` message to pass to the client.
    pub msg: ControlMsg,
}

/// One message from one shard to another.
#[derive(Debug, Clone)]
pub enum ShardMsg {
    /// Seat `player` (connected on `from`) in `room`.
    JoinRequest {
        /// The player.
        player: PlayerId,
        /// The room.
        room: RoomId,
    },
    /// The outcome of a [`ShardMsg::JoinRequest`]: the `Joined` message, or an error code.
    JoinReply {
        /// The player.
        player: PlayerId,
        /// Joined, or a request error code from `tickshard_schema::codes`.
        result: Result<JoinedInfo, u16>,
    },
    /// An input datagram (already verified) for the room hosting `player`.
    Input {
        /// The player.
        player: PlayerId,
        /// The decoded datagram.
        input: InputDatagram,
    },
    /// `player` left its remote room (request, disconnect, or the connection closed).
    Leave {
        /// The player.
        player: PlayerId,
    },
    /// A chat line from `player` for its room.
    Chat {
        /// The player.
        player: PlayerId,
        /// The text.
        text: String,
    },
    /// A snapshot datagram for `player`.
    Snapshot {
        /// The player.
        player: PlayerId,
        /// The encoded datagram.
        bytes: Bytes,
    },
    /// A control message for `player` (chat, game event, `Left`).
    Control {
        /// The player.
        player: PlayerId,
        /// The message.
        msg: ControlMsg,
    },
    /// The sender's rooms with free seats (replaces the previous list from that shard).
    Directory {
        /// The sending shard.
        from: ShardId,
        /// Its rooms with free seats.
        rooms: Vec<RoomSummary>,
    },
}
