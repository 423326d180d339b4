//! tickshard: a thread-per-core authoritative multiplayer game server on QUIC.
//!
//! One glommio executor pinned to each core is a **shard**. A shard owns its UDP socket, its
//! QUIC endpoint (quinn-proto, driven directly, no per-connection tasks), its connections,
//! sessions and rooms, and shares nothing mutable with other shards: the hot path takes no
//! locks and touches no atomics. Shards cooperate only by messages ([`mesh`]).
//!
//! # Guarantees
//! - Every room ticks at a fixed rate (deadline `start + n * period`), as a numbered, timed
//!   pipeline; overruns skip deadlines and are counted ([`room`]).
//! - Every byte from the network is verified before use; bad input gets a defined answer and
//!   never affects other players ([`shard`], PROTOCOL.md).
//! - The shard's logic is sans-IO ([`shard::ShardCore`]): it takes `now` and gives outputs,
//!   so tests drive it with a virtual clock and seeded network faults, and a seed replays.
//!
//! # Layout
//! - [`ids`]: `ShardId`, `PlayerId`, `RoomId`, `Tick`.
//! - [`game`]: the `Game` trait a studio implements; [`arena`]: the built-in game.
//! - [`room`]: seats, input ordering and rate limiting, the tick pipeline.
//! - [`snapshot`]: per-viewer delta snapshots with priorities.
//! - [`shard`]: the sans-IO shard core (endpoint, sessions, rooms, cross-shard joins).
//! - [`mesh`]: messages between shards.
//! - [`cid`]: connection IDs that name their shard; [`net`]: sockets and kernel steering.
//! - [`tls`]: certificates and QUIC configuration; [`stats`]: counters and histograms.
//! - [`runtime`]: the thin glommio layer that runs shards on cores, and the supervisor
//!   (signals, drain, results file, fleet hook).
//! - [`ops`]: reports, operator commands, drain state, room results; [`admin`]: the admin
//!   HTTP thread (metrics, status, actions); [`config`]: settings from flags, env and TOML.
//! - [`watchdog`]: notices a shard whose clock stopped (no housekeeping pass for 2 s), for
//!   the supervisor's log, `/healthz` and the drain.
//! - [`agones`]: the Agones SDK client (health, Ready, capacity, allocation, shutdown) on
//!   threads of its own, used when `AGONES_SDK_HTTP_PORT` is set.

pub mod admin;
pub mod agones;
pub mod arena;
pub mod cid;
pub mod config;
pub mod ctl;
pub mod game;
pub mod ids;
pub mod mesh;
pub mod net;
pub mod ops;
pub mod room;
pub mod runtime;
pub mod shard;
pub mod snapshot;
pub mod stats;
pub mod supervisor;
pub mod tls;
pub mod watchdog;

pub use game::{Game, ModeSpec};
pub use ids::{ConnKey, EntityId, PlayerId, RoomId, ShardId, Tick};
pub use shard::{ShardConfig, ShardCore};

/// The built-in modes: `arena` with the given room capacity and tick rate.
pub fn builtin_modes(capacity: u16, tick_rate: u16) -> Vec<ModeSpec> {
    vec![ModeSpec {
        name: "arena".into(),
        capacity,
        tick_rate,
        factory: arena::create,
    }]
}
