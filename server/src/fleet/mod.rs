//! Fleets: where a fleet manager plugs into the server.
//!
//! A studio rarely runs one server process: it runs fleets of them, and something (Agones on
//! Kubernetes, or the studio's own scheduler) starts them, sends players to the ones with
//! room, and stops them when the fleet shrinks. That something needs to hear three things
//! from each process: that it is ready to take players, whether it is still healthy, and how
//! much room it has; and it needs to be told when the process has drained and is about to
//! exit, so it can replace it.
//!
//! [`Fleet`] is that hook. The supervisor thread (`runtime/supervise.rs`, deciding through
//! [`crate::ops::supervisor`]) calls it from its own thread, never from a shard core, so a
//! slow fleet manager can delay nothing but other fleet calls. Without a fleet manager the
//! server uses a hook that does nothing.
//!
//! [`agones`] is the one plug-in so far: the Agones SDK sidecar's REST API, used when
//! `AGONES_SDK_HTTP_PORT` is set. It lives below this module and depends on it, never the
//! other way round: the server does not know which fleet manager it reports to.

pub mod agones;

/// Process-wide capacity, computed from the shard reports for the fleet hook.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capacity {
    /// Rooms open.
    pub rooms: usize,
    /// Rooms the process could hold (player capacity over room size).
    pub rooms_capacity: usize,
    /// Players connected.
    pub players: usize,
    /// Players the process could hold (shards times connections per shard).
    pub players_capacity: usize,
    /// The open rooms' ids, in decimal.
    pub room_ids: Vec<String>,
}

/// Where a fleet manager (Agones) plugs in. The supervisor calls these from its own thread:
/// `ready` once every shard serves, `set_capacity` once a second, `shutdown` after the drain
/// finished and the results are written, just before `serve` returns.
pub trait Fleet: Send {
    /// Every shard serves.
    fn ready(&mut self) {}
    /// Whether every shard is alive: false while the watchdog finds one stalled or dead
    /// (called when that changes; the process starts healthy).
    fn set_healthy(&mut self, _healthy: bool) {}
    /// The process's capacity now.
    fn set_capacity(&mut self, _capacity: &Capacity) {}
    /// The drain finished; the process is about to exit.
    fn shutdown(&mut self) {}
    /// What the fleet manager says of this server, for `/status` (asked once a second).
    fn status(&mut self) -> Option<serde_json::Value> {
        None
    }
}

/// The hook used when no fleet manager is present: it does nothing.
pub struct NoFleet;

impl Fleet for NoFleet {}
