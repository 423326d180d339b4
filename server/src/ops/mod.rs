//! Operations: what an operator and the process see of the shards, and how the process ends.
//!
//! Everything here runs on threads of its own, away from the shard cores; a shard touches
//! this layer only through the `Hub` (one report slot and one command queue per shard, a few
//! times a second) and the results channel, so nothing an operator does can stall a tick.
//!
//! - [`config`]: every setting, from flags, environment and a TOML file, in that order of
//!   precedence; `--print-config` writes the resolved settings back as TOML.
//! - [`admin`]: the admin HTTP thread: `/healthz`, `/status`, `/metrics` ([`metrics`]:
//!   OpenMetrics text through prometheus-client),
//!   and the operator actions (close a room, kick a player, drain a shard or the process),
//!   with an optional bearer token. Its `Hub` is where shards publish and take commands.
//! - [`supervisor`]: the process's drain as a sans-IO state machine: when to drain, to cut
//!   the drain short and to stop, and what the fleet hook hears.
//! - [`watchdog`]: notices a shard whose clock stopped (no housekeeping pass for 2 s), for
//!   the supervisor's log, `/healthz` and the drain.
//! - [`ctl`]: `tickshard ctl`, the fleet tools over many servers' admin endpoints.
//!
//! What a shard can be asked and what it reports (commands, reports, drain states, room
//! results) is the shard's own interface, in [`crate::shard::operator`]: this layer depends
//! on the shard, never the other way round.

pub mod admin;
pub mod config;
pub mod ctl;
pub mod metrics;
pub mod supervisor;
pub mod watchdog;
