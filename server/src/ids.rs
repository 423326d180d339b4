//! Identifier newtypes. Player and room ids carry the shard that created them in their top 16
//! bits, so any shard can tell where a room lives from its id alone.

use std::fmt;

/// One shard: an executor pinned to one core. Also the first byte of every server connection ID.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

/// A player: one session on one connection, unique within the process.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlayerId(pub u64);

/// A room: one running match, unique within the process.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(pub u64);

/// A room's tick number. Tick 0 is never sent, so 0 can mean "none" on the wire.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Tick(pub u32);

/// An entity inside one room's game.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityId(pub u32);

/// A connection on one shard, as the rest of the shard refers to it: its slot in the
/// shard's connection table and the generation it was accepted in. Slots are reused; a key is
/// not. A key kept after its connection is gone (a room's seat, a routing table) finds nothing,
/// even when the slot holds another player's connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Index into the shard's connection table (quinn's connection handle).
    pub slot: usize,
    /// Which connection in that slot: unique per shard for the process's life.
    pub generation: u64,
}

const SHARD_SHIFT: u32 = 48;

impl PlayerId {
    /// The `seq`-th player created on `shard`.
    pub fn new(shard: ShardId, seq: u64) -> Self {
        PlayerId(((shard.0 as u64) << SHARD_SHIFT) | (seq & ((1 << SHARD_SHIFT) - 1)))
    }
    /// The shard that owns this player's connection.
    pub fn shard(self) -> ShardId {
        ShardId((self.0 >> SHARD_SHIFT) as u16)
    }
}

impl RoomId {
    /// The `seq`-th room created on `shard`.
    pub fn new(shard: ShardId, seq: u64) -> Self {
        RoomId(((shard.0 as u64) << SHARD_SHIFT) | (seq & ((1 << SHARD_SHIFT) - 1)))
    }
    /// The shard hosting this room.
    pub fn shard(self) -> ShardId {
        ShardId((self.0 >> SHARD_SHIFT) as u16)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}
impl fmt::Display for PlayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p{}.{}",
            self.0 >> SHARD_SHIFT,
            self.0 & ((1 << SHARD_SHIFT) - 1)
        )
    }
}
impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "r{}.{}",
            self.0 >> SHARD_SHIFT,
            self.0 & ((1 << SHARD_SHIFT) - 1)
        )
    }
}

impl Tick {
    /// The tick after this one.
    pub fn next(self) -> Tick {
        Tick(self.0.wrapping_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_their_shard() {
        let p = PlayerId::new(ShardId(3), 42);
        assert_eq!(p.shard(), ShardId(3));
        assert_eq!(p.to_string(), "p3.42");
        assert_eq!(RoomId::new(ShardId(1), 7).shard(), ShardId(1));
    }
}
