//! Seats: what a welcomed session's requests do. Joins by room id (here, or on the room's
//! shard through the mesh), quick match (see [`super::matchmaking`]), the answer of another
//! shard to a join, leaving, chat to a room, and inputs on to the player's room.
//!
//! These are methods of [`ShardCore`]: a seat ties a [`super::session::Session`] (its
//! [`Seat`]) to a [`super::room::Room`] (its member's [`Route`]), and both change together.

use super::{ShardCore, JOIN_TIMEOUT};
use crate::ids::{PlayerId, RoomId};
use crate::shard::matchmaking::{Candidate, QuickMatch};
use crate::shard::mesh::{JoinedInfo, ShardMsg};
use crate::shard::room::{JoinError, Route};
use crate::shard::session::{Request, Seat};
use std::time::Instant;
use tickshard_schema::{codes, ControlMsg, InputDatagram, LeaveReason};

impl ShardCore {
    pub(super) fn on_request(&mut self, ch: usize, req: Request, now: Instant) {
        let Some(s) = self.sessions.get_mut(ch) else {
            return;
        };
        let player = s.player;
        match req {
            Request::Join { room_id, mode } => self.on_join(ch, player, room_id, mode, now),
            Request::Leave => match *s.seat() {
                Seat::In(room) => {
                    s.set_seat(Seat::None, now);
                    self.leave_room(player, room, now);
                    let reason = LeaveReason::Requested;
                    let left = ControlMsg::Left {
                        room_id: room.0,
                        reason,
                    };
                    self.send_control(ch, &left, now);
                }
                _ => self.send_error(ch, codes::NOT_IN_ROOM, now),
            },
            // Nothing left once cleaned (see `clean_chat`): nothing to say.
            Request::Chat { text } if text.is_empty() => {}
            Request::Chat { text } => match *s.seat() {
                Seat::In(room) if room.shard() == self.config.shard => {
                    self.broadcast_chat(room, player, text, now)
                }
                Seat::In(room) => self
                    .outbox
                    .push_back((room.shard(), ShardMsg::Chat { player, text })),
                _ => self.send_error(ch, codes::NOT_IN_ROOM, now),
            },
        }
    }

    pub(super) fn on_input(&mut self, ch: usize, input: InputDatagram) {
        let Some(s) = self.sessions.get(ch) else {
            return;
        };
        let player = s.player;
        match *s.seat() {
            Seat::In(room) if room.shard() == self.config.shard => {
                let known = self
                    .rooms
                    .get_mut(room)
                    .is_some_and(|r| r.handle_input(player, &input, &mut self.counters));
                if !known {
                    self.counters.input_not_in_room += 1;
                }
            }
            Seat::In(room) => self
                .outbox
                .push_back((room.shard(), ShardMsg::Input { player, input })),
            _ => self.counters.input_not_in_room += 1,
        }
    }

    pub(super) fn on_join(
        &mut self,
        ch: usize,
        player: PlayerId,
        room_id: u64,
        mode: String,
        now: Instant,
    ) {
        let Some(s) = self.sessions.get_mut(ch) else {
            return;
        };
        if *s.seat() != Seat::None {
            return self.send_error(ch, codes::ALREADY_IN_ROOM, now);
        }
        if room_id != 0 {
            let room = RoomId(room_id);
            if room.shard() == self.config.shard {
                self.join_local(ch, player, room, now);
            } else if room.shard().0 < self.config.shards {
                self.join_remote(ch, player, room, None, now);
            } else {
                self.send_error(ch, codes::ROOM_NOT_FOUND, now);
            }
            return;
        }
        let mode = if mode.is_empty() {
            self.modes[0].name.clone()
        } else {
            mode
        };
        if !self.modes.iter().any(|m| m.name == mode) {
            return self.send_error(ch, codes::UNKNOWN_MODE, now);
        }
        // Quick match (see `matchmaking`): the fullest local room with a free seat, else a
        // room another shard advertised, else a new local room.
        let local = self.rooms.iter().map(|r| Candidate {
            room: r.id(),
            mode: &r.mode().name,
            players: r.players(),
            free: r.free_seats(),
        });
        match self.directory.quick_match(&mode, local) {
            QuickMatch::Local(room) => self.join_local(ch, player, room, now),
            QuickMatch::Remote(room) => self.join_remote(ch, player, room, Some(mode), now),
            QuickMatch::New => self.join_new_room(ch, player, &mode, now),
        }
    }

    /// Seats the player of `ch` in local `room` and tells it, or tells it why not.
    pub(super) fn join_local(&mut self, ch: usize, player: PlayerId, room: RoomId, now: Instant) {
        let Some(key) = self.sessions.key(ch) else {
            return;
        };
        match self.seat_here(player, Route::Local(key), room) {
            Ok(joined) => {
                if let Some(s) = self.sessions.get_mut(ch) {
                    s.set_seat(Seat::In(room), now);
                }
                self.send_control(ch, &joined, now);
            }
            Err(code) => self.send_error(ch, code, now),
        }
    }

    /// Asks `room`'s shard to seat the player of `ch`; `quick`: the mode, for a quick match.
    pub(super) fn join_remote(
        &mut self,
        ch: usize,
        player: PlayerId,
        room: RoomId,
        quick: Option<String>,
        now: Instant,
    ) {
        if let Some(s) = self.sessions.get_mut(ch) {
            let deadline = now + JOIN_TIMEOUT;
            s.set_seat(
                Seat::Joining {
                    room,
                    quick,
                    deadline,
                },
                now,
            );
            self.outbox
                .push_back((room.shard(), ShardMsg::JoinRequest { player, room }));
        }
    }

    /// Seats the player of `ch` in a new local room of `mode`, unless the shard is draining.
    pub(super) fn join_new_room(&mut self, ch: usize, player: PlayerId, mode: &str, now: Instant) {
        if self.drain.refuses_rooms() {
            return self.send_error(ch, codes::SERVER_DRAINING, now);
        }
        let room = self.create_room(mode, now);
        self.join_local(ch, player, room, now);
    }

    pub(super) fn on_join_reply(
        &mut self,
        now: Instant,
        player: PlayerId,
        result: Result<JoinedInfo, u16>,
    ) {
        let joining = self.sessions.slot_of(player).and_then(|ch| {
            let s = self.sessions.get_mut(ch)?;
            let Seat::Joining { quick, .. } = s.seat() else {
                return None;
            };
            let quick = quick.clone();
            let seat = match &result {
                Ok(info) => Seat::In(info.room),
                Err(_) => Seat::None,
            };
            s.set_seat(seat, now);
            Some((ch, quick))
        });
        let Some((ch, quick)) = joining else {
            // The player disconnected meanwhile, or its join timed out: give the seat back.
            if let Ok(info) = result {
                self.outbox
                    .push_back((info.room.shard(), ShardMsg::Leave { player }));
            }
            return;
        };
        match (result, quick) {
            (Ok(info), _) => self.send_control(ch, &info.msg, now),
            // The advertised room filled up meanwhile: fall back to a local room.
            (Err(_), Some(mode)) => match self.rooms.with_free_seat(&mode) {
                Some(room) => self.join_local(ch, player, room, now),
                None => self.join_new_room(ch, player, &mode, now),
            },
            (Err(code), None) => self.send_error(ch, code, now),
        }
    }

    /// Seats `player` in local `room`; returns the `Joined` message or a request error code.
    pub(super) fn seat_here(
        &mut self,
        player: PlayerId,
        route: Route,
        room: RoomId,
    ) -> Result<ControlMsg, u16> {
        let r = self.rooms.get_mut(room).ok_or(codes::ROOM_NOT_FOUND)?;
        let entity = r.join(player, route).map_err(|e| match e {
            JoinError::Full => codes::ROOM_FULL,
            JoinError::AlreadyIn => codes::ALREADY_IN_ROOM,
            // The room is ending (its game panicked): as good as gone.
            JoinError::Crashed => codes::ROOM_NOT_FOUND,
        })?;
        self.directory.mark_changed();
        Ok(ControlMsg::Joined {
            room_id: room.0,
            mode: r.mode().name.clone(),
            shard: self.config.shard.0,
            tick_rate: r.mode().tick_rate,
            entity_id: entity.0,
            capacity: r.mode().capacity,
            players: r.players() as u16,
            server_tick: r.tick_number().0,
        })
    }

    pub(super) fn leave_room(&mut self, player: PlayerId, room: RoomId, now: Instant) {
        if room.shard() == self.config.shard {
            if let Some(r) = self.rooms.get_mut(room) {
                r.leave(player, now);
                self.directory.mark_changed();
            }
        } else {
            self.outbox
                .push_back((room.shard(), ShardMsg::Leave { player }));
        }
    }

    pub(super) fn broadcast_chat(
        &mut self,
        room: RoomId,
        from: PlayerId,
        text: String,
        now: Instant,
    ) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let members: Vec<_> = r.members().collect();
        let msg = ControlMsg::Chat {
            from_player: from.0,
            text,
        };
        for (player, route) in members {
            self.send_to_player(route, player, &msg, now);
        }
    }
}
