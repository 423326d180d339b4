//! What a bot does each tick. A bot's actions derive only from (seed, bot index, tick) and
//! what it sees, so the same seed makes the same swarm: against the deterministic harness two
//! runs give the same actions, action for action.

use std::fmt;
use std::str::FromStr;
use tickshard_schema::EntityState;

/// Entity kind of players in the arena (see the server's `arena` module).
pub const KIND_PLAYER: u8 = 0;
/// Entity flag: dead, waiting to respawn.
pub const FLAG_DEAD: u8 = 1;
/// Arena world units per quantised position unit (positions on the wire are `x * 16`).
pub const POS_SCALE: f32 = 16.0;
/// The arena's world size in world units.
pub const WORLD_SIZE: f32 = 1024.0;
/// The arena's maximum player speed in world units per second.
pub const MAX_SPEED: f32 = 160.0;
/// Malformed datagrams a `chaos` bot sends at most: below the server's limit (16), so it
/// exercises the error path without being closed for it.
pub const CHAOS_MALFORMED_BUDGET: u32 = 12;

/// How a bot plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Walks in a direction that changes every two seconds; fires now and then.
    Wander,
    /// Runs at the nearest player it sees and fires when close; wanders when alone.
    Chase,
    /// Stands still (still sends an input every tick).
    Idle,
    /// Wanders, and sends every input three times and a chat line three times a second:
    /// excess traffic the server must absorb (duplicates are ignored, chat stays under the
    /// control rate limit).
    Spam,
    /// Wanders, and now and then sends what a broken or lying client would: garbage and
    /// truncated datagrams (fewer than the server's limit), joins while seated, an input
    /// claiming more than full speed, three commands in one tick, bursts of chat.
    Chaos,
}

impl Behavior {
    /// Every behaviour, for help texts.
    pub const ALL: [Behavior; 5] = [
        Behavior::Wander,
        Behavior::Chase,
        Behavior::Idle,
        Behavior::Spam,
        Behavior::Chaos,
    ];

    /// Whether the bot's own movement must match its commands exactly. `chaos` bots send
    /// more commands than the server applies per tick, so only their speed is checked.
    pub fn exact_movement(self) -> bool {
        self != Behavior::Chaos
    }
}

impl fmt::Display for Behavior {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Behavior::Wander => "wander",
            Behavior::Chase => "chase",
            Behavior::Idle => "idle",
            Behavior::Spam => "spam",
            Behavior::Chaos => "chaos",
        })
    }
}

impl FromStr for Behavior {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Behavior::ALL
            .into_iter()
            .find(|b| b.to_string() == s)
            .ok_or_else(|| format!("unknown behaviour {s:?} (wander, chase, idle, spam, chaos)"))
    }
}

/// One thing a bot does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send an input command (a new sequence number).
    Input {
        /// Movement, x.
        move_x: i8,
        /// Movement, y.
        move_y: i8,
        /// Buttons (bit 0: fire).
        buttons: u8,
        /// Aim angle (0..65536 is a full turn).
        aim: u16,
    },
    /// Send the previous input datagram again, unchanged.
    ResendInput,
    /// Send a chat line.
    Chat(String),
    /// Ask to join a room (while already seated: the server answers with an error).
    Join(u64),
    /// Send these bytes as a QUIC datagram (not a valid input).
    RawDatagram(Vec<u8>),
}

impl Action {
    /// Carries the action out on `client` at `now` (`mode` for joins), telling `check` of
    /// every command sent.
    pub fn perform(
        &self,
        client: &mut crate::Client,
        now: std::time::Instant,
        mode: &str,
        check: &mut crate::MovementCheck,
    ) {
        match self {
            Action::Input {
                move_x,
                move_y,
                buttons,
                aim,
            } => {
                let seq = client.send_input(now, *move_x, *move_y, *buttons, *aim);
                check.sent(seq, *move_x, *move_y);
            }
            Action::ResendInput => client.resend_last_input(),
            Action::Chat(text) => client.chat(text),
            Action::Join(room) => client.join(Some(*room), mode),
            Action::RawDatagram(bytes) => client.send_raw_datagram(bytes),
        }
    }
}

/// The decision-maker of one bot.
#[derive(Debug, Clone)]
pub struct Brain {
    behavior: Behavior,
    seed: u64,
    bot: u64,
    malformed_sent: u32,
}

/// splitmix64 of the inputs: a well-mixed, reproducible 64-bit value.
pub fn mix(seed: u64, bot: u64, tick: u64, salt: u64) -> u64 {
    let mut z = seed
        ^ bot.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ tick.wrapping_mul(0xbf58_476d_1ce4_e5b9)
        ^ salt.wrapping_mul(0x94d0_49bb_1331_11eb);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn angle_to_aim(a: f32) -> u16 {
    (a.rem_euclid(std::f32::consts::TAU) / std::f32::consts::TAU * 65536.0) as u32 as u16
}

impl Brain {
    /// The brain of bot number `bot` in a swarm seeded with `seed`.
    pub fn new(behavior: Behavior, seed: u64, bot: u64) -> Self {
        Brain {
            behavior,
            seed,
            bot,
            malformed_sent: 0,
        }
    }

    /// The behaviour.
    pub fn behavior(&self) -> Behavior {
        self.behavior
    }

    /// The wander walk at `tick`: a direction per two-second window (at 30 Hz), and a shot
    /// about once a second and a half.
    fn wander(&self, tick: u64) -> Action {
        let h = mix(self.seed, self.bot, tick / 60, 1);
        let a = (h % 360) as f32 * std::f32::consts::PI / 180.0;
        let fire = mix(self.seed, self.bot, tick, 2).is_multiple_of(45);
        Action::Input {
            move_x: (a.cos() * 127.0) as i8,
            move_y: (a.sin() * 127.0) as i8,
            buttons: fire as u8,
            aim: angle_to_aim(a),
        }
    }

    /// Appends this tick's actions to `out`. `tick` counts the bot's ticks in its room from
    /// 0; `world` is the visible world (sorted by id) and `me` the bot's own entity id.
    pub fn act(
        &mut self,
        tick: u64,
        world: &[EntityState],
        me: Option<u32>,
        out: &mut Vec<Action>,
    ) {
        match self.behavior {
            Behavior::Idle => out.push(Action::Input {
                move_x: 0,
                move_y: 0,
                buttons: 0,
                aim: 0,
            }),
            Behavior::Wander => out.push(self.wander(tick)),
            Behavior::Chase => out.push(self.chase(tick, world, me)),
            Behavior::Spam => {
                out.push(self.wander(tick));
                out.push(Action::ResendInput);
                out.push(Action::ResendInput);
                if tick.is_multiple_of(10) {
                    let n = 16 + (mix(self.seed, self.bot, tick, 3) % 200) as usize;
                    out.push(Action::Chat(format!("spam {} {}", self.bot, "x".repeat(n))));
                }
            }
            Behavior::Chaos => self.chaos(tick, out),
        }
    }

    fn chase(&self, tick: u64, world: &[EntityState], me: Option<u32>) -> Action {
        let mine = me.and_then(|id| world.iter().find(|e| e.id() == id));
        let Some(mine) = mine else {
            return self.wander(tick);
        };
        let (mx, my) = (mine.x() as f32, mine.y() as f32);
        let target = world
            .iter()
            .filter(|e| {
                e.kind() == KIND_PLAYER && e.id() != mine.id() && e.flags() & FLAG_DEAD == 0
            })
            .map(|e| {
                let (dx, dy) = (e.x() as f32 - mx, e.y() as f32 - my);
                (dx * dx + dy * dy, dx, dy, e.id())
            })
            // Nearest, ties broken by id: the same view gives the same choice.
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.3.cmp(&b.3)));
        let Some((d2, dx, dy, _)) = target else {
            return self.wander(tick);
        };
        let dist = d2.sqrt().max(1e-3);
        let a = dy.atan2(dx);
        let close = dist / POS_SCALE < 200.0;
        Action::Input {
            move_x: (dx / dist * 127.0) as i8,
            move_y: (dy / dist * 127.0) as i8,
            buttons: (close && tick.is_multiple_of(5)) as u8,
            aim: angle_to_aim(a),
        }
    }

    fn chaos(&mut self, tick: u64, out: &mut Vec<Action>) {
        let h = mix(self.seed, self.bot, tick, 4);
        match h % 90 {
            0 | 1 if self.malformed_sent < CHAOS_MALFORMED_BUDGET => {
                self.malformed_sent += 1;
                let len = 1 + (h >> 8) as usize % 200;
                let mut bytes: Vec<u8> = (0..len as u64)
                    .map(|i| mix(self.seed, self.bot, tick, 100 + i) as u8)
                    .collect();
                if h % 90 == 1 {
                    // Looks like an input (right tag), but is cut short inside a varint.
                    bytes = vec![tickshard_schema::INPUT_TAG, 0x85, 0x80];
                }
                out.push(Action::RawDatagram(bytes));
                out.push(self.wander(tick));
            }
            2 => {
                out.push(Action::Join(1 + (h >> 16) % 1000));
                out.push(self.wander(tick));
            }
            3 => out.push(Action::Input {
                // Claims more than full speed on both axes; the server clamps it.
                move_x: 127,
                move_y: -128,
                buttons: 1,
                aim: 0,
            }),
            4 => {
                for _ in 0..3 {
                    out.push(self.wander(tick));
                }
            }
            5 => {
                for i in 0..5 {
                    out.push(Action::Chat(format!("chaos {} burst {i}", self.bot)));
                }
                out.push(self.wander(tick));
            }
            _ => out.push(self.wander(tick)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn player(id: u32, x: u16, y: u16) -> EntityState {
        EntityState::new(id, x, y, KIND_PLAYER, 0, 100, 0, 0, 0)
    }

    #[test]
    fn same_seed_same_actions_and_different_seed_differs() {
        let run = |seed| {
            let mut out = Vec::new();
            for b in Behavior::ALL {
                let mut brain = Brain::new(b, seed, 7);
                for t in 0..600 {
                    brain.act(t, &[], None, &mut out);
                }
            }
            out
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn chase_runs_at_the_nearest_living_player() {
        let mut dead = player(3, 100 * 16, 110 * 16);
        dead = EntityState::new(
            dead.id(),
            dead.x(),
            dead.y(),
            KIND_PLAYER,
            0,
            0,
            FLAG_DEAD,
            0,
            0,
        );
        let world = [
            player(1, 100 * 16, 100 * 16),
            player(2, 300 * 16, 100 * 16),
            dead,
            player(4, 100 * 16, 400 * 16),
        ];
        let mut out = Vec::new();
        Brain::new(Behavior::Chase, 1, 0).act(0, &world, Some(1), &mut out);
        let Action::Input { move_x, move_y, .. } = out[0] else {
            panic!("chase sends an input first")
        };
        assert_eq!(
            (move_x, move_y),
            (127, 0),
            "toward player 2, the nearest living one"
        );
    }

    #[test]
    fn chaos_stays_under_the_malformed_limit() {
        let mut brain = Brain::new(Behavior::Chaos, 9, 1);
        let mut out = Vec::new();
        for t in 0..100_000 {
            brain.act(t, &[], None, &mut out);
        }
        let raw = out
            .iter()
            .filter(|a| matches!(a, Action::RawDatagram(_)))
            .count();
        assert_eq!(raw as u32, CHAOS_MALFORMED_BUDGET);
        assert!(out.iter().any(|a| matches!(a, Action::Join(_))));
    }
}
