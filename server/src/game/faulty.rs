//! `faulty-arena`: the arena with a fault on demand, to prove that a game's panic ends only
//! its own room.
//!
//! It plays exactly as the arena until a player presses [`FAULT_BUTTON`] (button bit 7): the
//! next `step` panics, as a studio's bug would. The server catches it, ends that room with
//! `Left{reason: RoomCrashed}` and a result recorded as crashed, and serves every other room
//! on. Offered only when an operator lists it in `--modes` (never by default).

use crate::game::arena::Arena;
use crate::game::{
    Game, GameEvent, GameSetup, JoinRefused, PlayerInput, PlayerResult, Standing, ViewEntity,
};
use crate::ids::{EntityId, PlayerId, Tick};

/// The button bit that makes the next step panic.
pub const FAULT_BUTTON: u8 = 0x80;

/// Creates a faulty arena.
pub fn create(setup: GameSetup) -> Box<dyn Game> {
    Box::new(Faulty {
        arena: Arena::new(setup),
        armed: false,
    })
}

/// The arena and whether the fault was asked for.
struct Faulty {
    arena: Arena,
    armed: bool,
}

impl Game for Faulty {
    fn join(&mut self, player: PlayerId) -> Result<EntityId, JoinRefused> {
        self.arena.join(player)
    }

    fn leave(&mut self, player: PlayerId) {
        self.arena.leave(player)
    }

    fn apply_input(&mut self, player: PlayerId, input: &PlayerInput) {
        if input.buttons & FAULT_BUTTON != 0 {
            self.armed = true;
        }
        self.arena.apply_input(player, input)
    }

    fn step(&mut self, tick: Tick, events: &mut Vec<GameEvent>) {
        assert!(
            !self.armed,
            "faulty-arena: a player pressed the fault button (tick {})",
            tick.0
        );
        self.arena.step(tick, events)
    }

    fn view(&self, viewer: PlayerId, out: &mut Vec<ViewEntity>) {
        self.arena.view(viewer, out)
    }

    fn results(&self) -> Vec<PlayerResult> {
        self.arena.results()
    }

    fn final_result(&self) -> Vec<Standing> {
        self.arena.final_result()
    }
}
