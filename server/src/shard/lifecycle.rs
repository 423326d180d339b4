//! A shard's rooms and its life: operators' commands, rooms created and ended (with their
//! results), the housekeeping pass (hello and join deadlines, empty rooms, the directory), and
//! the drain: no new rooms, then a notice and a grace, then everything cut short.
//!
//! These are methods of [`ShardCore`]: ending a room or draining touches every seat and
//! session it concerns.

use super::ShardCore;
use crate::game::Standing;
use crate::ids::RoomId;
use crate::shard::mesh::ShardMsg;
use crate::shard::operator::{Command, CommandError, DrainState, RoomEnd, RoomResult};
use crate::shard::room::{Room, Route};
use crate::shard::session::{Phase, Seat};
use rand::RngCore;
use std::time::{Duration, Instant};
use tickshard_schema::{codes, ControlMsg, LeaveReason};
use tracing::{error, info};

impl ShardCore {
    /// Carries out an operator's command (see [`Command`]).
    pub fn handle_command(&mut self, now: Instant, cmd: Command) -> Result<(), CommandError> {
        let shard = self.config.shard.0;
        match cmd {
            Command::CloseRoom { room, reason } => {
                self.rooms.get(room).ok_or(CommandError::RoomNotFound)?;
                info!(shard, %room, reason, "closing room");
                self.end_room(room, now, LeaveReason::RoomClosed, RoomEnd::Closed(reason));
            }
            Command::Kick { player, reason } => {
                let ch = self
                    .sessions
                    .slot_of(player)
                    .ok_or(CommandError::PlayerNotFound)?;
                info!(shard, %player, reason, "kicking player");
                self.close(ch, now, codes::KICKED, &reason);
            }
            Command::DrainShard => {
                if self.drain == DrainState::Serving {
                    info!(shard, "shard drain: no new rooms");
                    self.drain = DrainState::NoNewRooms;
                }
            }
            Command::Drain {
                grace,
                reconnect_hint,
            } => {
                if matches!(self.drain, DrainState::Serving | DrainState::NoNewRooms) {
                    let deadline = now + grace;
                    self.drain = DrainState::Draining { deadline };
                    self.reconnect_hint = reconnect_hint;
                    info!(shard, ?grace, "draining");
                    let notice = self.drain_notice(now, deadline);
                    for ch in 0..self.sessions.slots() {
                        if self.sessions.get(ch).is_some_and(|s| s.is_ready()) {
                            self.send_control(ch, &notice, now);
                        }
                    }
                    // Rooms already empty end now rather than after their grace.
                    self.close_empty_rooms(now);
                }
            }
            Command::Stop { reason } => {
                if self.drain != DrainState::Stopped {
                    self.stop(now, &reason);
                }
            }
        }
        Ok(())
    }

    pub(super) fn create_room(&mut self, mode: &str, now: Instant) -> RoomId {
        let spec = self
            .modes
            .iter()
            .find(|m| m.name == mode)
            .cloned()
            .unwrap_or_else(|| self.modes[0].clone());
        let seed = self.rng.next_u64();
        let id = self.rooms.create(spec, seed, self.config.max_datagram, now);
        self.counters.rooms_created += 1;
        self.directory.mark_changed();
        info!(shard = self.config.shard.0, room = %id, mode, "room created");
        id
    }

    /// Removes `room` and records its final result.
    pub(super) fn remove_room(&mut self, room: RoomId, now: Instant, end: RoomEnd) {
        let Some(mut room) = self.rooms.remove(room) else {
            return;
        };
        let standings: Vec<Standing> = room.final_result();
        if let RoomEnd::Crashed(why) = &end {
            self.counters.rooms_crashed += 1;
            error!(
                shard = self.config.shard.0,
                room = %room.id(),
                mode = room.mode().name,
                why = why.as_str(),
                "the room's game panicked: the room ends, the shard goes on"
            );
        }
        info!(
            shard = self.config.shard.0,
            room = %room.id(),
            mode = room.mode().name,
            ticks = room.tick_number().0,
            end = %end,
            players = standings.len(),
            "room ended"
        );
        self.results.push_back(RoomResult {
            room: room.id(),
            mode: room.mode().name.clone(),
            ticks: room.tick_number(),
            age: now.saturating_duration_since(room.created()),
            end,
            standings,
        });
        self.counters.rooms_closed += 1;
        self.directory.mark_changed();
    }

    /// Ends `room` with its players still seated: each gets `Left` with `reason`, then the
    /// room's result is recorded.
    pub(super) fn end_room(
        &mut self,
        room: RoomId,
        now: Instant,
        reason: LeaveReason,
        end: RoomEnd,
    ) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let members: Vec<_> = r.members().collect();
        let left = ControlMsg::Left {
            room_id: room.0,
            reason,
        };
        for (player, route) in members {
            match route {
                Route::Local(key) => {
                    if let Some(s) = self.sessions.by_key_mut(key) {
                        if *s.seat() == Seat::In(room) {
                            s.set_seat(Seat::None, now);
                        }
                    }
                }
                Route::Remote(_) => {
                    self.guests.remove(&player);
                }
            }
            // The remote shard clears the seat when it forwards `Left`.
            self.send_to_player(route, player, &left, now);
        }
        self.remove_room(room, now, end);
    }

    /// Ends every room whose game panicked (in a tick, a join or a leave): its players get
    /// `Left` with reason RoomCrashed, its result is recorded as crashed. A crashed room never
    /// ticks again, so its deadline stays due and this runs at the next tick pass.
    pub(super) fn end_crashed_rooms(&mut self, now: Instant) {
        let crashed: Vec<(RoomId, String)> = (0..self.rooms.len())
            .filter_map(|i| {
                let room = self.rooms.at_mut(i);
                room.crashed().map(|why| (room.id(), why.to_owned()))
            })
            .collect();
        for (room, why) in crashed {
            self.end_room(room, now, LeaveReason::RoomCrashed, RoomEnd::Crashed(why));
        }
    }

    // ---- housekeeping and the drain ----

    /// Closes sessions that sent no hello in time or stayed in the lobby too long, and gives
    /// up joins no shard answered.
    pub(super) fn expire_deadlines(&mut self, now: Instant) {
        let lobby = self.config.lobby_timeout;
        for ch in 0..self.sessions.slots() {
            let Some(s) = self.sessions.get_mut(ch) else {
                continue;
            };
            if let Phase::AwaitHello { deadline } = s.phase() {
                if deadline <= now {
                    let reason = "no hello before the deadline";
                    self.close(ch, now, codes::HELLO_TIMEOUT, reason);
                }
            } else if let Seat::Joining { deadline, .. } = *s.seat() {
                if deadline <= now {
                    // A late reply finds the seat no longer joining and hands the seat back.
                    s.set_seat(Seat::None, now);
                    self.send_error(ch, codes::SHARD_UNAVAILABLE, now);
                }
            } else if let Some(since) = s.lobby_since() {
                if !lobby.is_zero() && since + lobby <= now {
                    let reason = "no room joined before the lobby timeout";
                    self.close(ch, now, codes::LOBBY_TIMEOUT, reason);
                }
            }
        }
    }

    pub(super) fn close_empty_rooms(&mut self, now: Instant) {
        // A draining shard ends a room as soon as its last player leaves.
        let grace = if matches!(self.drain, DrainState::Draining { .. }) {
            Duration::ZERO
        } else {
            self.config.empty_room_grace
        };
        while let Some(room) = self.rooms.empty_for(grace, now) {
            self.remove_room(room, now, RoomEnd::Empty);
        }
    }

    /// Cuts everything short: ends every room (results recorded, players told `Left` with
    /// reason Draining) and closes every connection with SHUTTING_DOWN and `reason`.
    pub(super) fn stop(&mut self, now: Instant, reason: &str) {
        while let Some(room) = self.rooms.iter().last().map(Room::id) {
            self.end_room(room, now, LeaveReason::Draining, RoomEnd::Shutdown);
        }
        self.close_all(now, codes::SHUTTING_DOWN, reason);
        self.drain = DrainState::Stopped;
    }

    pub(super) fn drain_notice(&self, now: Instant, deadline: Instant) -> ControlMsg {
        ControlMsg::DrainNotice {
            grace_ms: deadline
                .saturating_duration_since(now)
                .as_millis()
                .min(u32::MAX as u128) as u32,
            reconnect_hint: self.reconnect_hint.clone(),
        }
    }

    pub(super) fn publish_directory(&mut self, now: Instant) {
        if !self.directory.advertise_due(now) {
            return;
        }
        let rooms = self.rooms.summaries();
        for to in self.directory.peers() {
            let from = self.config.shard;
            let rooms = rooms.clone();
            self.outbox
                .push_back((to, ShardMsg::Directory { from, rooms }));
        }
    }
}
