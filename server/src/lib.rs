//! tickshard: a thread-per-core authoritative multiplayer game server on QUIC.
//!
//! One glommio executor pinned to each core is a **shard**. A shard owns its UDP socket, its
//! QUIC endpoint (quinn-proto, driven directly, no per-connection tasks), its connections,
//! sessions and rooms, and shares nothing mutable with other shards: the hot path takes no
//! locks and touches no atomics. Shards cooperate only by messages ([`shard::mesh`]).
//!
//! # Guarantees
//! - Every room ticks at a fixed rate (deadline `start + n * period`), as a numbered, timed
//!   pipeline; overruns skip deadlines and are counted ([`shard::room`]).
//! - Every byte from the network is verified before use; bad input gets a defined answer and
//!   never affects other players ([`shard`], PROTOCOL.md).
//! - The shard's logic is sans-IO ([`shard::ShardCore`]): it takes `now` and gives outputs,
//!   so tests drive it with a virtual clock and seeded network faults, and a seed replays.
//!
//! # Layout
//! The folders follow the layers, each depending only on those listed before it:
//! - [`ids`]: `ShardId`, `PlayerId`, `RoomId`, `ConnKey`, `Tick`.
//! - [`game`]: the `Game` trait a studio implements, and [`game::arena`], the built-in game.
//! - [`shard`]: the sans-IO shard core (endpoint, sessions, matchmaking, cross-shard joins)
//!   and its parts: [`shard::room`] (seats, input ordering and rate limiting, the tick
//!   pipeline), [`shard::snapshot`] (per-viewer delta snapshots), [`shard::mesh`] (messages
//!   between shards), [`shard::stats`] (counters and histograms), [`shard::operator`] (what
//!   operators may ask of a shard and what it reports).
//! - [`net`]: sockets and kernel steering, [`net::cid`] (connection IDs that name their
//!   shard), [`net::tls`] (certificates and QUIC configuration).
//! - [`fleet`]: the hook a fleet manager plugs into, and `fleet::agones` (feature `agones`), the Agones
//!   plug-in, used when `AGONES_SDK_GRPC_PORT` is set.
//! - [`ops`]: settings, the admin HTTP thread, the supervisor's drain state machine, the
//!   watchdog, `tickshard ctl`.
//! - [`runtime`]: the thin glommio layer that runs shards on cores, and the supervisor thread
//!   that feeds [`ops::supervisor`] and carries out its decisions.

pub mod fleet;
pub mod game;
pub mod ids;
pub mod net;
pub mod ops;
pub mod runtime;
pub mod shard;

pub use game::{Game, ModeSpec};
pub use ids::{ConnKey, EntityId, PlayerId, RoomId, ShardId, Tick};
pub use shard::{ShardConfig, ShardCore};

/// The modes an operator can offer (`--modes`), with their games.
pub const KNOWN_MODES: &[(&str, game::GameFactory)] = &[
    ("arena", game::arena::create),
    // The arena with a panic on demand (game::faulty): for failure-isolation tests.
    ("faulty-arena", game::faulty::create),
];

/// The built-in modes: `arena` with the given room capacity and tick rate.
pub fn builtin_modes(capacity: u16, tick_rate: u16) -> Vec<ModeSpec> {
    modes(&["arena"], capacity, tick_rate).unwrap_or_default()
}

/// The modes named (from [`KNOWN_MODES`]), each with the given room capacity and tick rate;
/// an error names the first unknown one.
pub fn modes<S: AsRef<str>>(
    names: &[S],
    capacity: u16,
    tick_rate: u16,
) -> Result<Vec<ModeSpec>, String> {
    names
        .iter()
        .map(|name| {
            let name = name.as_ref();
            let (_, factory) = KNOWN_MODES
                .iter()
                .find(|(known, _)| *known == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = KNOWN_MODES.iter().map(|(n, _)| *n).collect();
                    format!("unknown mode `{name}` (known: {})", known.join(", "))
                })?;
            Ok(ModeSpec {
                name: name.to_owned(),
                capacity,
                tick_rate,
                factory: *factory,
            })
        })
        .collect()
}
