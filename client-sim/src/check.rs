//! Each bot checks what it sees: its own entity must follow the movement it commanded, within
//! the arena's rules. Between two observed snapshots the server applied the bot's commands
//! numbered (last applied in the first, last applied in the second]; replaying them from the
//! first position (each command moves one step of `MAX_SPEED / tick rate` in its direction,
//! clamped to length 1, then to the world) must give the second position, up to the wire's
//! quantisation. A mismatch is a divergence: the server moved the player somewhere its rules
//! do not allow (or reordered the player's commands).
//!
//! One rule lets the server skip a command: a seat's input queue is bounded, and when a client
//! has sent more than the queue holds (its clock ran ahead of the room's, or the server
//! stalled) the oldest queued command is dropped (and counted by the server). A replay that
//! matches with one or two commands left out is therefore counted as skipped commands, not
//! as a divergence.

use crate::behavior::{MAX_SPEED, POS_SCALE, WORLD_SIZE};

/// Commands remembered for replay, by sequence number modulo this.
const RING: usize = 256;
/// Allowed difference per axis, world units: quantisation of both positions (1/32 each) and
/// float rounding over a replay.
const TOLERANCE: f32 = 0.2;

/// Replays a bot's commands against what the server says its entity did.
#[derive(Debug, Clone)]
pub struct MovementCheck {
    step: f32,
    exact: bool,
    cmds: Vec<(u32, i8, i8)>,
    base: Option<(u32, f32, f32)>,
    /// Observations compared with a replay.
    pub checked: u64,
    /// Observations that did not match.
    pub divergences: u64,
    /// Commands the server skipped (queue overflow), as inferred from replays.
    pub skipped: u64,
    /// The first divergence, described.
    pub first: Option<String>,
}

fn direction(x: i8, y: i8) -> (f32, f32) {
    let (mut dx, mut dy) = (x.max(-127) as f32 / 127.0, y.max(-127) as f32 / 127.0);
    let len = (dx * dx + dy * dy).sqrt();
    if len > 1.0 {
        dx /= len;
        dy /= len;
    }
    (dx, dy)
}

impl MovementCheck {
    /// A check for a room ticking at `tick_rate`. `exact`: the replay must match; otherwise
    /// only the distance is bounded (for bots that send more commands than are applied).
    pub fn new(tick_rate: u16, exact: bool) -> Self {
        MovementCheck {
            step: MAX_SPEED / tick_rate.max(1) as f32,
            exact,
            cmds: vec![(0, 0, 0); RING],
            base: None,
            checked: 0,
            divergences: 0,
            skipped: 0,
            first: None,
        }
    }

    /// Records a command sent with sequence number `seq`.
    pub fn sent(&mut self, seq: u32, move_x: i8, move_y: i8) {
        self.cmds[seq as usize % RING] = (seq, move_x, move_y);
    }

    /// Forgets the base position (a new room, a respawn).
    pub fn reset(&mut self) {
        self.base = None;
    }

    /// Compares an observed state of the bot's own entity (quantised position, dead or not)
    /// with the replay of its commands up to `last_applied`.
    pub fn observe(&mut self, last_applied: u32, qx: u16, qy: u16, dead: bool) {
        let (x, y) = (qx as f32 / POS_SCALE, qy as f32 / POS_SCALE);
        if dead {
            // Dead players do not move and respawn elsewhere: start again once alive.
            self.base = None;
            return;
        }
        let Some((from, bx, by)) = self.base else {
            self.base = Some((last_applied, x, y));
            return;
        };
        if last_applied < from {
            self.base = Some((last_applied, x, y));
            return;
        }
        let n = last_applied - from;
        if n as usize >= RING
            || (from + 1..=last_applied).any(|s| self.cmds[s as usize % RING].0 != s)
        {
            // Too far apart to replay (or commands we never sent): start again here.
            self.base = Some((last_applied, x, y));
            return;
        }
        self.checked += 1;
        let ok = if self.exact {
            let replay = |skip: &[u32]| {
                let (mut ex, mut ey) = (bx, by);
                for s in from + 1..=last_applied {
                    if skip.contains(&s) {
                        continue;
                    }
                    let (_, mx, my) = self.cmds[s as usize % RING];
                    let (dx, dy) = direction(mx, my);
                    ex = (ex + dx * self.step).clamp(0.0, WORLD_SIZE);
                    ey = (ey + dy * self.step).clamp(0.0, WORLD_SIZE);
                }
                (ex, ey)
            };
            let near =
                |(ex, ey): (f32, f32)| (ex - x).abs() <= TOLERANCE && (ey - y).abs() <= TOLERANCE;
            let (ex, ey) = replay(&[]);
            let mut ok = near((ex, ey));
            if !ok && n <= 32 {
                // One or two commands dropped by a full input queue.
                let cmds = from + 1..=last_applied;
                if let Some(_s) = cmds.clone().find(|&s| near(replay(&[s]))) {
                    self.skipped += 1;
                    ok = true;
                } else if cmds.clone().any(|a| {
                    cmds.clone()
                        .filter(|&b| b > a)
                        .any(|b| near(replay(&[a, b])))
                }) {
                    self.skipped += 2;
                    ok = true;
                }
            }
            if !ok && self.first.is_none() {
                self.first = Some(format!(
                    "after inputs {}..={last_applied} expected ({ex:.2}, {ey:.2}) from ({bx:.2}, {by:.2}), server says ({x:.2}, {y:.2})",
                    from + 1
                ));
            }
            ok
        } else {
            let d = ((x - bx).powi(2) + (y - by).powi(2)).sqrt();
            let max = n as f32 * self.step + TOLERANCE;
            let ok = d <= max;
            if !ok && self.first.is_none() {
                self.first = Some(format!(
                    "moved {d:.2} units over {n} inputs, at most {max:.2} allowed"
                ));
            }
            ok
        };
        if !ok {
            self.divergences += 1;
        }
        self.base = Some((last_applied, x, y));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: f32) -> u16 {
        (v * POS_SCALE).round() as u16
    }

    #[test]
    fn replay_matches_the_rules_and_catches_a_teleport() {
        let mut c = MovementCheck::new(30, true);
        c.observe(0, q(500.0), q(500.0), false);
        let step = MAX_SPEED / 30.0;
        for s in 1..=3 {
            c.sent(s, 127, 0);
        }
        c.observe(3, q(500.0 + 3.0 * step), q(500.0), false);
        assert_eq!((c.checked, c.divergences), (1, 0));
        // Diagonal at full deflection is clamped to length 1.
        c.sent(4, 127, 127);
        let d = step / 2f32.sqrt();
        c.observe(4, q(500.0 + 3.0 * step + d), q(500.0 + d), false);
        assert_eq!(c.divergences, 0);
        // A jump the commands do not explain.
        c.sent(5, 0, 0);
        c.observe(5, q(600.0), q(500.0), false);
        assert_eq!(c.divergences, 1);
        assert!(c.first.is_some());
    }

    #[test]
    fn a_command_dropped_by_a_full_queue_is_counted_as_skipped() {
        let mut c = MovementCheck::new(30, true);
        c.observe(0, q(500.0), q(500.0), false);
        let step = MAX_SPEED / 30.0;
        c.sent(1, 127, 0);
        c.sent(2, 0, 127);
        c.sent(3, 127, 0);
        // The server applied 1 and 3 (2 was dropped), and says it applied up to 3.
        c.observe(3, q(500.0 + 2.0 * step), q(500.0), false);
        assert_eq!((c.divergences, c.skipped), (0, 1));
    }

    #[test]
    fn walls_clamp_and_death_resets() {
        let mut c = MovementCheck::new(30, true);
        c.observe(0, q(1023.0), q(10.0), false);
        for s in 1..=10 {
            c.sent(s, 127, 0);
        }
        c.observe(10, q(1024.0), q(10.0), false);
        assert_eq!(c.divergences, 0);
        c.observe(11, q(1024.0), q(10.0), true);
        c.sent(11, 0, 0);
        c.sent(12, 0, 0);
        // Respawned elsewhere: no divergence, a new base.
        c.observe(12, q(10.0), q(900.0), false);
        assert_eq!((c.checked, c.divergences), (1, 0));
    }

    #[test]
    fn bounded_mode_only_limits_speed() {
        let mut c = MovementCheck::new(30, false);
        c.observe(0, q(100.0), q(100.0), false);
        for s in 1..=4 {
            c.sent(s, 127, 0);
        }
        // Two of four commands applied (the server dropped excess): fine when bounded.
        c.observe(4, q(100.0 + 2.0 * MAX_SPEED / 30.0), q(100.0), false);
        assert_eq!(c.divergences, 0);
        c.sent(5, 127, 0);
        c.observe(5, q(200.0), q(100.0), false);
        assert_eq!(c.divergences, 1);
    }
}
