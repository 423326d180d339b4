//! The `Game` trait: what a studio implements to run its own game on tickshard.
//!
//! The server owns everything around the game: sessions, seats, input ordering and rate
//! limiting, the tick schedule, area-of-interest snapshots with delta compression, and the
//! wire. A game only sees players joining and leaving, one [`PlayerInput`] at a time in
//! sequence order, a `step` per tick, and a request to list what one viewer can see.
//!
//! A game must be deterministic given its [`GameSetup::seed`] and the sequence of calls it
//! receives: no clocks, no thread-local randomness, no iteration over hash maps. The test
//! harness replays runs and compares snapshot streams byte for byte.
//!
//! [`arena`] is the built-in game, a top-down arena shooter, and the example to copy: it
//! implements every method, keeps its state in flat vectors, and quantises what it shows.

pub mod arena;
pub mod faulty;

use crate::ids::{EntityId, PlayerId, Tick};
use tickshard_schema::EntityState;

/// One player command for one tick, as the client sent it (already ordered and deduplicated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlayerInput {
    /// The command's sequence number.
    pub seq: u32,
    /// Movement direction, x (-127..=127). The game must clamp the direction's length.
    pub move_x: i8,
    /// Movement direction, y (-127..=127).
    pub move_y: i8,
    /// Button bits (the arena: bit 0 fires).
    pub buttons: u8,
    /// Aim angle in 1/65536 turns.
    pub aim: u16,
}

/// One entity a viewer can see, with its priority for the snapshot (lower is more important;
/// the viewer's own entity should be 0).
#[derive(Debug, Clone, Copy)]
pub struct ViewEntity {
    /// Quantised state as it goes on the wire.
    pub state: EntityState,
    /// Lower values are sent first when a snapshot does not fit one datagram.
    pub priority: u32,
}

/// Something that happened in a tick that players should be told about reliably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GameEvent {
    /// Game-defined kind.
    pub kind: u16,
    /// First argument.
    pub a: u32,
    /// Second argument.
    pub b: u32,
}

/// A player's final standing when a room ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayerResult {
    /// The player.
    pub player: PlayerId,
    /// The game's score.
    pub score: i64,
}

/// One player's line in a room's final result: what the results file and the log record when
/// a room ends (last player gone, closed by an operator, or cut short by shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The player.
    pub player: PlayerId,
    /// The entity the player controlled.
    pub entity: EntityId,
    /// The game's score.
    pub score: i64,
    /// Kills, if the game counts them.
    pub kills: Option<u32>,
    /// Deaths, if the game counts them.
    pub deaths: Option<u32>,
    /// Whether the player was still seated when the room ended (false: left earlier).
    pub present: bool,
}

/// What a game is created with.
#[derive(Debug, Clone, Copy)]
pub struct GameSetup {
    /// Seed for all of the game's randomness.
    pub seed: u64,
    /// Ticks per second.
    pub tick_rate: u16,
    /// Most players the room will hold.
    pub capacity: u16,
}

/// A game's reason to refuse a player.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefused {
    /// The game has no room for another player.
    #[error("game is full")]
    Full,
}

/// A game running in one room. See the module documentation for the contract.
pub trait Game {
    /// A player takes a seat; returns the entity the player controls.
    fn join(&mut self, player: PlayerId) -> Result<EntityId, JoinRefused>;
    /// A player leaves; its entity goes away.
    fn leave(&mut self, player: PlayerId);
    /// Applies one command. Called in sequence order, at most a few times per player per tick.
    fn apply_input(&mut self, player: PlayerId, input: &PlayerInput);
    /// Advances the world by one tick, pushing events players should hear about.
    fn step(&mut self, tick: Tick, events: &mut Vec<GameEvent>);
    /// Lists the entities `viewer` can see into `out` (cleared by the caller).
    fn view(&self, viewer: PlayerId, out: &mut Vec<ViewEntity>);
    /// The current standings (called when the room ends, and by operators).
    fn results(&self) -> Vec<PlayerResult>;
    /// The room's final result, called once when the room ends: every player who played in
    /// it, including those who left earlier (a room usually ends when its last player leaves,
    /// so a game that wants a result must remember departed players), one line per player
    /// however often it left and rejoined. What a game remembers must be bounded: players come
    /// and go without end in a long-lived room (the arena keeps the latest 4 × capacity).
    /// Default: empty.
    fn final_result(&self) -> Vec<Standing> {
        Vec::new()
    }
}

/// Creates a game for a new room.
pub type GameFactory = fn(GameSetup) -> Box<dyn Game>;

/// A game mode: what quick match looks for, with its room size and tick rate.
#[derive(Clone)]
pub struct ModeSpec {
    /// The mode's name, as clients ask for it.
    pub name: String,
    /// Seats per room.
    pub capacity: u16,
    /// Ticks per second.
    pub tick_rate: u16,
    /// Creates the game of a new room.
    pub factory: GameFactory,
}

impl std::fmt::Debug for ModeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModeSpec")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("tick_rate", &self.tick_rate)
            .finish()
    }
}
