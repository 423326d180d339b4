//! Server connection IDs that name their shard.
//!
//! Every connection ID a shard issues is 8 bytes: the shard number, then 7 bytes from a
//! ChaCha stream seeded per shard. The kernel's steering program reads the first byte of the
//! destination connection ID, so every packet after the handshake, from any client address,
//! reaches the shard that owns the connection. An observer learns the shard number and nothing
//! else: the remaining bytes are unpredictable and unrelated between IDs of one connection
//! (see the warning in quinn-proto's `cid_generator.rs` about linkability).

use crate::ids::ShardId;
use quinn_proto::{ConnectionId, ConnectionIdGenerator};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::time::Duration;

/// Length of every server connection ID.
pub const CID_LEN: usize = 8;

/// Issues connection IDs whose first byte is the shard number.
pub struct ShardCidGenerator {
    shard: u8,
    rng: ChaCha20Rng,
}

impl ShardCidGenerator {
    /// A generator for `shard`. `seed` fixes the sequence (tests); production seeds from the OS.
    pub fn new(shard: ShardId, seed: Option<u64>) -> Self {
        let rng = match seed {
            Some(s) => ChaCha20Rng::seed_from_u64(s ^ ((shard.0 as u64) << 56)),
            None => ChaCha20Rng::from_entropy(),
        };
        ShardCidGenerator {
            shard: shard.0 as u8,
            rng,
        }
    }

    /// The shard named by a connection ID issued by this scheme.
    pub fn shard_of(cid: &[u8]) -> Option<ShardId> {
        cid.first().map(|&b| ShardId(b as u16))
    }
}

impl ConnectionIdGenerator for ShardCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut b = [0u8; CID_LEN];
        b[0] = self.shard;
        self.rng.fill_bytes(&mut b[1..]);
        ConnectionId::new(&b)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_the_shard_and_differ() {
        let mut g = ShardCidGenerator::new(ShardId(3), Some(1));
        let a = g.generate_cid();
        let b = g.generate_cid();
        assert_eq!(a[0], 3);
        assert_eq!(ShardCidGenerator::shard_of(&b), Some(ShardId(3)));
        assert_ne!(a[1..], b[1..]);
    }
}
