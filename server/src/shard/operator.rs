//! What shards tell operators and what operators tell shards: reports, commands, drain state
//! and room results. Plain data, no I/O: the sans-IO core produces and consumes these, the
//! runtime carries them between threads (see `runtime/` and `ops/admin.rs`).
//!
//! # The drain state machine (per shard)
//! ```text
//!   Serving --(shard drain)--> NoNewRooms
//!      |                           |
//!      +------(process drain)------+--> Draining { deadline } --(no rooms, nobody seated)--> drained
//!                                              |                                         |
//!                                   (deadline or second SIGTERM)                    (process stops)
//!                                              v                                         v
//!                                           Stopped  <-----------------------------------+
//! ```
//! `NoNewRooms` opens no rooms but keeps accepting connections (its players join rooms on
//! other shards). `Draining` also closes new connections with DRAINING (8) once their
//! handshake completes, told every client a `DrainNotice`, ends each room as soon as its last
//! player leaves, and at the deadline ends the rest and closes every connection with
//! SHUTTING_DOWN (12). Every ended room leaves a [`RoomResult`].

use crate::game::Standing;
use crate::ids::{PlayerId, RoomId, ShardId, Tick};
use crate::shard::stats::{Counters, TickStats};
use crate::shard::RoomInfo;
use std::fmt;
use std::time::{Duration, Instant};

/// Whether a shard takes new rooms and connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    /// Normal service.
    Serving,
    /// An operator drained this shard: no new rooms here; the process serves on.
    NoNewRooms,
    /// The process is draining: no new connections or rooms; rooms end by `deadline`.
    Draining {
        /// When what remains is closed.
        deadline: Instant,
    },
    /// Everything was closed (drain deadline, second signal, or process stop).
    Stopped,
}

impl DrainState {
    /// True when a new room may not be opened.
    pub fn refuses_rooms(self) -> bool {
        !matches!(self, DrainState::Serving)
    }
    /// True when new connections are closed with DRAINING.
    pub fn refuses_connections(self) -> bool {
        matches!(self, DrainState::Draining { .. } | DrainState::Stopped)
    }
    /// True for any kind of drain (shard or process).
    pub fn is_draining(self) -> bool {
        !matches!(self, DrainState::Serving)
    }
}

/// An operator's command for one shard, carried out in its housekeeping.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// End a room: its players get `Left` (RoomClosed); its result is recorded.
    CloseRoom {
        /// The room.
        room: RoomId,
        /// Why (logged and recorded in the result).
        reason: String,
    },
    /// Close a player's connection with KICKED (9) and `reason` (the client sees it).
    Kick {
        /// The player.
        player: PlayerId,
        /// Why.
        reason: String,
    },
    /// Open no new rooms on this shard.
    DrainShard,
    /// The process drains: see the module documentation.
    Drain {
        /// How long rooms have to end.
        grace: Duration,
        /// Where clients should reconnect (sent in the drain notice).
        reconnect_hint: String,
    },
    /// End every room and close every connection with SHUTTING_DOWN and `reason`.
    Stop {
        /// The close reason.
        reason: String,
    },
}

/// Why a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No such room on that shard.
    #[error("no such room")]
    RoomNotFound,
    /// No such player connected to that shard.
    #[error("no such player")]
    PlayerNotFound,
}

/// How a room ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomEnd {
    /// Its last player left (and the empty-room grace passed, unless draining).
    Empty,
    /// An operator closed it, with this reason.
    Closed(String),
    /// The drain deadline, a second signal or the process stopping cut it short.
    Shutdown,
    /// Its game panicked: the call and the panic's message.
    Crashed(String),
}

impl fmt::Display for RoomEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoomEnd::Empty => f.write_str("empty"),
            RoomEnd::Closed(r) => write!(f, "closed: {r}"),
            RoomEnd::Shutdown => f.write_str("shutdown"),
            RoomEnd::Crashed(why) => write!(f, "crashed: {why}"),
        }
    }
}

/// A room's final result.
#[derive(Debug, Clone)]
pub struct RoomResult {
    /// The room.
    pub room: RoomId,
    /// Its mode.
    pub mode: String,
    /// Ticks it ran.
    pub ticks: Tick,
    /// How long it ran.
    pub age: Duration,
    /// How it ended.
    pub end: RoomEnd,
    /// Every player's standing (see [`crate::Game::final_result`]).
    pub standings: Vec<Standing>,
}

impl RoomResult {
    /// The result as one JSON object (one line of the results file).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "room": self.room.0,
            "shard": self.room.shard().0,
            "mode": self.mode,
            "ticks": self.ticks.0,
            "age_seconds": self.age.as_secs_f64(),
            "end": self.end.to_string(),
            "players": self.standings.iter().map(|s| serde_json::json!({
                "player": s.player.0,
                "entity": s.entity.0,
                "score": s.score,
                "kills": s.kills,
                "deaths": s.deaths,
                "present": s.present,
            })).collect::<Vec<_>>(),
        })
    }
}

/// One shard's figures as published for operators every few hundred milliseconds.
#[derive(Clone)]
pub struct ShardReport {
    /// The shard.
    pub shard: ShardId,
    /// Its counters.
    pub counters: Counters,
    /// Its tick histograms.
    pub ticks: TickStats,
    /// Its rooms.
    pub rooms: Vec<RoomInfo>,
    /// Welcomed players connected here.
    pub players: usize,
    /// Open QUIC connections.
    pub connections: usize,
    /// Its drain state.
    pub drain: DrainState,
    /// Whether a process drain has finished here ([`crate::ShardCore::is_drained`]).
    pub drained: bool,
    /// CPU time of the shard's thread, in seconds (filled in by the runtime).
    pub cpu_seconds: f64,
}
