//! `arena`: the built-in reference game and the default mode.
//!
//! A square 2D world. Players move at a server-enforced maximum speed (the input is only a
//! direction, clamped to length 1, so a lying client cannot move faster or teleport), aim and
//! fire projectiles. A hit costs health; at zero the player dies, the shooter scores, and the
//! player respawns at a random spot after a delay. All randomness comes from the room's seed.
//!
//! Area of interest uses a uniform grid rebuilt each step: `view` visits only the cells within
//! the view radius, so its cost grows with what a player can see, not with the room's size.

use crate::game::{
    Game, GameEvent, GameSetup, JoinRefused, PlayerInput, PlayerResult, Standing, ViewEntity,
};
use crate::ids::{EntityId, PlayerId, Tick};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use tickshard_schema::EntityState;

/// Side of the square world in world units.
pub const WORLD_SIZE: f32 = 1024.0;
/// Quantisation of positions on the wire: 1/16 world unit (fits u16 for a 4096-unit world).
pub const POS_SCALE: f32 = 16.0;
/// Maximum player speed in world units per second.
pub const MAX_SPEED: f32 = 160.0;
/// How far a player sees.
pub const VIEW_RADIUS: f32 = 320.0;
/// Grid cell side; a view radius spans about three cells each way.
const CELL: f32 = 128.0;
const GRID: usize = (WORLD_SIZE / CELL) as usize;
const PROJECTILE_SPEED: f32 = 480.0;
const PROJECTILE_LIFE_S: f32 = 1.0;
const FIRE_COOLDOWN_S: f32 = 0.3;
const HIT_RADIUS: f32 = 14.0;
const DAMAGE: u8 = 25;
const MAX_HEALTH: u8 = 100;
const RESPAWN_S: f32 = 2.0;

/// Entity kind of a player on the wire.
pub const KIND_PLAYER: u8 = 0;
/// Entity kind of a projectile on the wire.
pub const KIND_PROJECTILE: u8 = 1;
/// Event: `a` hit `b`.
pub const EVENT_HIT: u16 = 1;
/// Event: `a` killed `b`.
pub const EVENT_KILL: u16 = 2;
/// Event: entity `a` respawned.
pub const EVENT_RESPAWN: u16 = 3;
/// Entity flag: dead, waiting to respawn.
pub const FLAG_DEAD: u8 = 1;

struct Player {
    id: PlayerId,
    entity: u32,
    x: f32,
    y: f32,
    aim: u16,
    health: u8,
    score: i64,
    kills: u32,
    deaths: u32,
    cooldown: u32,
    respawn_in: u32,
}

struct Projectile {
    entity: u32,
    owner: u32,
    x: f32,
    y: f32,
    vx: f32,
    vy: f32,
    life: u32,
}

/// The arena game state of one room.
pub struct Arena {
    rng: ChaCha8Rng,
    dt: f32,
    tick_rate: f32,
    capacity: usize,
    players: Vec<Player>,
    index: HashMap<PlayerId, usize>,
    projectiles: Vec<Projectile>,
    next_entity: u32,
    /// Entity indices per grid cell: players as `i`, projectiles as `PROJ_BIT | i`.
    grid: Vec<Vec<u32>>,
    /// What each cell's entities look like on the wire, quantised once per step for every
    /// viewer, with their world position for the view radius.
    visible: Vec<Vec<(EntityState, f32, f32)>>,
    /// Standings of players who left, for the final result: one entry per player (a player
    /// who leaves again adds to it), at most [`Arena::max_departed`], oldest dropped first.
    departed: std::collections::VecDeque<Standing>,
}

const PROJ_BIT: u32 = 1 << 31;

/// The arena's [`crate::game::GameFactory`].
pub fn create(setup: GameSetup) -> Box<dyn Game> {
    Box::new(Arena::new(setup))
}

impl Arena {
    /// A new, empty arena.
    pub fn new(setup: GameSetup) -> Self {
        let rate = setup.tick_rate.max(1) as f32;
        Arena {
            rng: ChaCha8Rng::seed_from_u64(setup.seed),
            dt: 1.0 / rate,
            tick_rate: rate,
            capacity: setup.capacity as usize,
            players: Vec::with_capacity(setup.capacity as usize),
            index: HashMap::with_capacity(setup.capacity as usize),
            projectiles: Vec::new(),
            next_entity: 1,
            grid: vec![Vec::new(); GRID * GRID],
            visible: vec![Vec::new(); GRID * GRID],
            departed: std::collections::VecDeque::new(),
        }
    }

    /// Most departed players the final result remembers: four rooms' worth, at least 64.
    fn max_departed(&self) -> usize {
        (4 * self.capacity).max(64)
    }

    /// Position of a player's entity in world units, if the player is in the game.
    pub fn position(&self, player: PlayerId) -> Option<(f32, f32)> {
        self.index
            .get(&player)
            .map(|&i| (self.players[i].x, self.players[i].y))
    }

    fn spawn_point(&mut self) -> (f32, f32) {
        (
            self.rng.gen_range(32.0..WORLD_SIZE - 32.0),
            self.rng.gen_range(32.0..WORLD_SIZE - 32.0),
        )
    }

    fn alloc_entity(&mut self) -> u32 {
        let e = self.next_entity;
        self.next_entity = self.next_entity.wrapping_add(1).max(1);
        e
    }

    fn secs_to_ticks(&self, s: f32) -> u32 {
        (s * self.tick_rate).round() as u32
    }

    fn cell_of(x: f32, y: f32) -> usize {
        let cx = ((x / CELL) as usize).min(GRID - 1);
        let cy = ((y / CELL) as usize).min(GRID - 1);
        cy * GRID + cx
    }

    /// Entities in the cell of (x, y) and the eight around it.
    fn neighbours(&self, x: f32, y: f32) -> impl Iterator<Item = u32> + '_ {
        let cx = ((x / CELL) as usize).min(GRID - 1);
        let cy = ((y / CELL) as usize).min(GRID - 1);
        let xs = cx.saturating_sub(1)..=(cx + 1).min(GRID - 1);
        let ys = cy.saturating_sub(1)..=(cy + 1).min(GRID - 1);
        ys.flat_map(move |y| xs.clone().map(move |x| y * GRID + x))
            .flat_map(move |c| self.grid[c].iter().copied())
    }

    fn rebuild_grid(&mut self) {
        for c in &mut self.grid {
            c.clear();
        }
        for c in &mut self.visible {
            c.clear();
        }
        for (i, p) in self.players.iter().enumerate() {
            let cell = Self::cell_of(p.x, p.y);
            self.grid[cell].push(i as u32);
            let flags = if p.respawn_in > 0 { FLAG_DEAD } else { 0 };
            let score = p.score.clamp(0, u16::MAX as i64) as u16;
            let state = EntityState::new(
                p.entity,
                quantise(p.x),
                quantise(p.y),
                KIND_PLAYER,
                (p.aim >> 8) as u8,
                p.health,
                flags,
                score,
                0,
            );
            self.visible[cell].push((state, p.x, p.y));
        }
        for (i, p) in self.projectiles.iter().enumerate() {
            let cell = Self::cell_of(p.x, p.y);
            self.grid[cell].push(PROJ_BIT | i as u32);
            let angle = (p.vy.atan2(p.vx) / std::f32::consts::TAU * 256.0) as i32 as u8;
            let state = EntityState::new(
                p.entity,
                quantise(p.x),
                quantise(p.y),
                KIND_PROJECTILE,
                angle,
                0,
                0,
                0,
                0,
            );
            self.visible[cell].push((state, p.x, p.y));
        }
    }
}

/// Quantises a world coordinate for the wire.
pub fn quantise(v: f32) -> u16 {
    (v * POS_SCALE).round().clamp(0.0, u16::MAX as f32) as u16
}

/// Turns a quantised coordinate back into world units.
pub fn dequantise(q: u16) -> f32 {
    q as f32 / POS_SCALE
}

/// How far one input may move a player at `tick_rate`, in world units.
pub fn max_step(tick_rate: u16) -> f32 {
    MAX_SPEED / tick_rate.max(1) as f32
}

impl Game for Arena {
    fn join(&mut self, player: PlayerId) -> Result<EntityId, JoinRefused> {
        if self.players.len() >= self.capacity {
            return Err(JoinRefused::Full);
        }
        let (x, y) = self.spawn_point();
        let entity = self.alloc_entity();
        self.index.insert(player, self.players.len());
        self.players.push(Player {
            id: player,
            entity,
            x,
            y,
            aim: 0,
            health: MAX_HEALTH,
            score: 0,
            kills: 0,
            deaths: 0,
            cooldown: 0,
            respawn_in: 0,
        });
        self.rebuild_grid();
        Ok(EntityId(entity))
    }

    fn leave(&mut self, player: PlayerId) {
        if let Some(i) = self.index.remove(&player) {
            let p = self.players.remove(i);
            let s = standing(&p, false);
            match self.departed.iter_mut().find(|d| d.player == p.id) {
                Some(d) => add_up(d, &s),
                None => {
                    if self.departed.len() >= self.max_departed() {
                        self.departed.pop_front();
                    }
                    self.departed.push_back(s);
                }
            }
            for (j, p) in self.players.iter().enumerate().skip(i) {
                self.index.insert(p.id, j);
            }
            self.rebuild_grid();
        }
    }

    fn apply_input(&mut self, player: PlayerId, input: &PlayerInput) {
        let Some(&i) = self.index.get(&player) else {
            return;
        };
        let step = MAX_SPEED * self.dt;
        let fire_cooldown = self.secs_to_ticks(FIRE_COOLDOWN_S);
        let life = self.secs_to_ticks(PROJECTILE_LIFE_S);
        let p = &mut self.players[i];
        if p.respawn_in > 0 {
            return;
        }
        // The input is a direction; its length is clamped to 1 so speed never exceeds MAX_SPEED.
        let (mut dx, mut dy) = (
            input.move_x.max(-127) as f32 / 127.0,
            input.move_y.max(-127) as f32 / 127.0,
        );
        let len = (dx * dx + dy * dy).sqrt();
        if len > 1.0 {
            dx /= len;
            dy /= len;
        }
        p.x = (p.x + dx * step).clamp(0.0, WORLD_SIZE);
        p.y = (p.y + dy * step).clamp(0.0, WORLD_SIZE);
        p.aim = input.aim;
        if input.buttons & 1 != 0 && p.cooldown == 0 {
            p.cooldown = fire_cooldown;
            let a = input.aim as f32 / 65536.0 * std::f32::consts::TAU;
            let (owner, x, y) = (p.entity, p.x, p.y);
            let entity = self.alloc_entity();
            self.projectiles.push(Projectile {
                entity,
                owner,
                x,
                y,
                vx: a.cos() * PROJECTILE_SPEED,
                vy: a.sin() * PROJECTILE_SPEED,
                life,
            });
        }
    }

    fn step(&mut self, tick: Tick, events: &mut Vec<GameEvent>) {
        let _ = tick;
        let dt = self.dt;
        let respawn = self.secs_to_ticks(RESPAWN_S);
        for i in 0..self.players.len() {
            let p = &mut self.players[i];
            p.cooldown = p.cooldown.saturating_sub(1);
            if p.respawn_in > 0 {
                p.respawn_in -= 1;
                if p.respawn_in == 0 {
                    let (x, y) = self.spawn_point();
                    let p = &mut self.players[i];
                    p.x = x;
                    p.y = y;
                    p.health = MAX_HEALTH;
                    events.push(GameEvent {
                        kind: EVENT_RESPAWN,
                        a: p.entity,
                        b: 0,
                    });
                }
            }
        }
        self.rebuild_grid();
        let mut k = 0;
        while k < self.projectiles.len() {
            let pr = &mut self.projectiles[k];
            pr.x += pr.vx * dt;
            pr.y += pr.vy * dt;
            pr.life = pr.life.saturating_sub(1);
            let (x, y, owner) = (pr.x, pr.y, pr.owner);
            let mut gone = pr.life == 0
                || !(0.0..=WORLD_SIZE).contains(&x)
                || !(0.0..=WORLD_SIZE).contains(&y);
            if !gone {
                // A target within the hit radius may sit in a neighbouring cell.
                let hit = self.neighbours(x, y).find(|&e| {
                    if e & PROJ_BIT != 0 {
                        return false;
                    }
                    let t = &self.players[e as usize];
                    t.entity != owner
                        && t.respawn_in == 0
                        && (t.x - x).powi(2) + (t.y - y).powi(2) <= HIT_RADIUS * HIT_RADIUS
                });
                if let Some(target) = hit {
                    let t = &mut self.players[target as usize];
                    t.health = t.health.saturating_sub(DAMAGE);
                    let victim = t.entity;
                    events.push(GameEvent {
                        kind: EVENT_HIT,
                        a: owner,
                        b: victim,
                    });
                    if t.health == 0 {
                        t.respawn_in = respawn;
                        t.deaths += 1;
                        events.push(GameEvent {
                            kind: EVENT_KILL,
                            a: owner,
                            b: victim,
                        });
                        if let Some(s) = self.players.iter_mut().find(|p| p.entity == owner) {
                            s.score += 1;
                            s.kills += 1;
                        }
                    }
                    gone = true;
                }
            }
            if gone {
                self.projectiles.swap_remove(k);
            } else {
                k += 1;
            }
        }
        self.rebuild_grid();
    }

    fn view(&self, viewer: PlayerId, out: &mut Vec<ViewEntity>) {
        let Some(&vi) = self.index.get(&viewer) else {
            return;
        };
        let v = &self.players[vi];
        let r2 = VIEW_RADIUS * VIEW_RADIUS;
        let lo = |c: f32| (((c - VIEW_RADIUS) / CELL).floor().max(0.0)) as usize;
        let hi = |c: f32| ((((c + VIEW_RADIUS) / CELL).floor()) as usize).min(GRID - 1);
        for cy in lo(v.y)..=hi(v.y) {
            for cx in lo(v.x)..=hi(v.x) {
                for &(state, x, y) in &self.visible[cy * GRID + cx] {
                    let d2 = (x - v.x).powi(2) + (y - v.y).powi(2);
                    if d2 > r2 {
                        continue;
                    }
                    let priority = if state.id() == v.entity {
                        0
                    } else {
                        1 + d2 as u32
                    };
                    out.push(ViewEntity { state, priority });
                }
            }
        }
    }

    fn final_result(&self) -> Vec<Standing> {
        // One line per player: a present player's earlier stints are added to its standing.
        let mut out: Vec<Standing> = self
            .departed
            .iter()
            .filter(|d| !self.index.contains_key(&d.player))
            .cloned()
            .collect();
        for p in &self.players {
            let mut s = standing(p, true);
            if let Some(d) = self.departed.iter().find(|d| d.player == p.id) {
                add_up(&mut s, d);
            }
            out.push(s);
        }
        out
    }

    fn results(&self) -> Vec<PlayerResult> {
        self.players
            .iter()
            .map(|p| PlayerResult {
                player: p.id,
                score: p.score,
            })
            .collect()
    }
}

/// Adds `more`'s score, kills and deaths to `to`, which keeps its presence. A departed `to`
/// takes `more`'s entity (the later stint's); a present one keeps its own.
fn add_up(to: &mut Standing, more: &Standing) {
    to.score += more.score;
    to.kills = Some(to.kills.unwrap_or(0) + more.kills.unwrap_or(0));
    to.deaths = Some(to.deaths.unwrap_or(0) + more.deaths.unwrap_or(0));
    if !to.present {
        to.entity = more.entity;
    }
}

fn standing(p: &Player, present: bool) -> Standing {
    Standing {
        player: p.id,
        entity: EntityId(p.entity),
        score: p.score,
        kills: Some(p.kills),
        deaths: Some(p.deaths),
        present,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena() -> Arena {
        Arena::new(GameSetup {
            seed: 7,
            tick_rate: 30,
            capacity: 64,
        })
    }

    #[test]
    fn speed_is_clamped() {
        let mut a = arena();
        let p = PlayerId(1);
        a.join(p).unwrap();
        let (x0, y0) = a.position(p).unwrap();
        a.apply_input(
            p,
            &PlayerInput {
                seq: 1,
                move_x: 127,
                move_y: 127,
                ..Default::default()
            },
        );
        let (x1, y1) = a.position(p).unwrap();
        let d = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt();
        assert!(d <= max_step(30) + 1e-3, "moved {d}");
        a.apply_input(
            p,
            &PlayerInput {
                seq: 2,
                move_x: -128,
                move_y: 0,
                ..Default::default()
            },
        );
    }

    #[test]
    fn view_is_limited_to_radius() {
        let mut a = arena();
        for i in 0..64 {
            a.join(PlayerId(i)).unwrap();
        }
        a.step(Tick(1), &mut Vec::new());
        let mut out = Vec::new();
        a.view(PlayerId(0), &mut out);
        assert!(out.iter().any(|e| e.priority == 0), "sees itself");
        assert!(out.len() < 64, "sees {} of 64", out.len());
        let (vx, vy) = a.position(PlayerId(0)).unwrap();
        for e in &out {
            let d = ((dequantise(e.state.x()) - vx).powi(2)
                + (dequantise(e.state.y()) - vy).powi(2))
            .sqrt();
            assert!(d <= VIEW_RADIUS + 1.0);
        }
    }

    #[test]
    fn shooting_kills_and_scores() {
        let mut a = arena();
        let (s, t) = (PlayerId(1), PlayerId(2));
        a.join(s).unwrap();
        a.join(t).unwrap();
        // Put them next to each other, the target straight to the shooter's right.
        a.players[0].x = 100.0;
        a.players[0].y = 100.0;
        a.players[1].x = 140.0;
        a.players[1].y = 100.0;
        let mut events = Vec::new();
        for tick in 1..200 {
            a.apply_input(
                s,
                &PlayerInput {
                    seq: tick,
                    buttons: 1,
                    aim: 0,
                    ..Default::default()
                },
            );
            a.step(Tick(tick), &mut events);
            if events.iter().any(|e| e.kind == EVENT_KILL) {
                break;
            }
            a.players[1].x = 140.0;
            a.players[1].y = 100.0;
        }
        assert!(events.iter().any(|e| e.kind == EVENT_KILL), "{events:?}");
        assert_eq!(a.results()[0].score, 1);
    }

    /// The final result has one line per player however often it leaves and rejoins, with
    /// its stints added up; players who left are remembered up to a bound, oldest first out.
    #[test]
    fn final_result_is_one_line_per_player_and_bounded() {
        let mut a = arena();
        let stay = PlayerId(1);
        let hop = PlayerId(2);
        a.join(stay).unwrap();
        for _ in 0..600 {
            a.join(hop).unwrap();
            a.players[a.index[&hop]].score += 1;
            a.players[a.index[&hop]].kills += 1;
            a.leave(hop);
        }
        a.join(hop).unwrap();
        a.players[a.index[&hop]].score += 5;
        let r = a.final_result();
        assert_eq!(r.len(), 2, "{r:?}");
        let h = r.iter().find(|s| s.player == hop).unwrap();
        assert!(h.present);
        assert_eq!((h.score, h.kills), (605, Some(600)));
        a.leave(hop);
        let r = a.final_result();
        let h = r.iter().find(|s| s.player == hop).unwrap();
        assert!(!h.present);
        assert_eq!(h.score, 605);
        // 1,000 different players pass through: only the latest max_departed are kept.
        for k in 0..1000u64 {
            let p = PlayerId(100 + k);
            a.join(p).unwrap();
            a.leave(p);
        }
        let r = a.final_result();
        assert_eq!(
            r.len(),
            a.max_departed() + 1,
            "departed bound plus the one present"
        );
        assert!(
            r.iter().any(|s| s.player == PlayerId(1099)),
            "the latest is kept"
        );
        assert!(!r.iter().any(|s| s.player == hop), "the oldest went first");
    }
}
