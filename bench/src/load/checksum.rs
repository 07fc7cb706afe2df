//! Stream checksum shared by the stream client and server.
//!
//! Four independent multiply-xorshift lanes over 32-byte blocks: the lanes let the CPU overlap
//! the multiplies so hashing keeps up with loopback TCP, and every lane step is a bijection of
//! the lane state, so no input can wipe out what was hashed before it. Not cryptographic: it
//! catches lost, duplicated, reordered or corrupted bytes, not an adversary.

const BLOCK: usize = 32;
const LANE_SEEDS: [u64; 4] = [
    0xcbf2_9ce4_8422_2325,
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
];
const MULTIPLIER: u64 = 0xff51_afd7_ed55_8ccd;

fn mix(state: u64, word: u64) -> u64 {
    let x = (state ^ word).wrapping_mul(MULTIPLIER);
    x ^ (x >> 32)
}

/// Running checksum of a byte stream; the result does not depend on how the stream was split
/// into `update` calls, because TCP reads and writes never line up on the two ends.
#[derive(Debug, Clone)]
pub struct Checksum {
    lanes: [u64; 4],
    pending: [u8; BLOCK],
    pending_len: usize,
    bytes: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    #[must_use]
    pub fn new() -> Self {
        Self {
            lanes: LANE_SEEDS,
            pending: [0; BLOCK],
            pending_len: 0,
            bytes: 0,
        }
    }

    /// Counts `len` bytes without hashing them: the digest then vouches for the length only
    /// (see [`Check::Length`](super::Check::Length)).
    pub fn count(&mut self, len: usize) {
        self.bytes += len as u64;
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        if self.pending_len > 0 {
            let take = (BLOCK - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < BLOCK {
                return;
            }
            let block = self.pending;
            self.absorb(&block);
            self.pending_len = 0;
        }
        let mut blocks = data.chunks_exact(BLOCK);
        for block in &mut blocks {
            self.absorb(block);
        }
        let rest = blocks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    fn absorb(&mut self, block: &[u8]) {
        for (lane, word) in self.lanes.iter_mut().zip(block.chunks_exact(8)) {
            *lane = mix(
                *lane,
                u64::from_le_bytes(word.try_into().expect("8-byte chunk")),
            );
        }
    }

    #[must_use]
    pub fn digest(&self) -> Digest {
        let mut lanes = self.lanes;
        // Zero padding of the tail cannot collide with real zero bytes: the length goes in too.
        for (lane, chunk) in lanes
            .iter_mut()
            .zip(self.pending[..self.pending_len].chunks(8))
        {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            *lane = mix(*lane, u64::from_le_bytes(word));
        }
        let checksum = lanes
            .iter()
            .fold(mix(LANE_SEEDS[0], self.bytes), |h, &lane| mix(h, lane));
        Digest {
            checksum,
            bytes: self.bytes,
        }
    }
}

/// What the stream server sends back after EOF, and what the client compares it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub checksum: u64,
    pub bytes: u64,
}

impl Digest {
    pub const WIRE_LEN: usize = 16;

    /// Checksum then byte count, both little-endian.
    #[must_use]
    pub fn to_wire(self) -> [u8; Self::WIRE_LEN] {
        let mut wire = [0; Self::WIRE_LEN];
        wire[..8].copy_from_slice(&self.checksum.to_le_bytes());
        wire[8..].copy_from_slice(&self.bytes.to_le_bytes());
        wire
    }

    #[must_use]
    pub fn from_wire(wire: [u8; Self::WIRE_LEN]) -> Self {
        let (checksum, bytes) = wire.split_at(8);
        Self {
            checksum: u64::from_le_bytes(checksum.try_into().expect("8 bytes")),
            bytes: u64::from_le_bytes(bytes.try_into().expect("8 bytes")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Checksum, Digest};
    use crate::load::prng::SplitMix64;

    fn digest_of(parts: &[&[u8]]) -> Digest {
        let mut sum = Checksum::new();
        for part in parts {
            sum.update(part);
        }
        sum.digest()
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        SplitMix64::new(7).fill(&mut data);
        data
    }

    #[test]
    fn splitting_does_not_change_the_digest() {
        let data = sample(10_000);
        let whole = digest_of(&[&data]);
        let mut rng = SplitMix64::new(99);
        for _ in 0..200 {
            let mut sum = Checksum::new();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let take = rng.in_range(0, rest.len().min(100));
                sum.update(&rest[..take]);
                rest = &rest[take..];
            }
            assert_eq!(sum.digest(), whole);
        }
        assert_eq!(whole.bytes, 10_000);
    }

    #[test]
    fn any_single_byte_change_is_detected() {
        let data = sample(257);
        let original = digest_of(&[&data]);
        for i in 0..data.len() {
            let mut corrupted = data.clone();
            corrupted[i] ^= 1;
            assert_ne!(digest_of(&[&corrupted]), original, "flip at {i}");
        }
    }

    #[test]
    fn order_and_length_matter() {
        let data = sample(96);
        let original = digest_of(&[&data]);
        assert_ne!(digest_of(&[&data[32..], &data[..32]]), original);
        let mut swapped = data.clone();
        swapped.swap(0, 8);
        assert_ne!(digest_of(&[&swapped]), original);
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(digest_of(&[&longer]).checksum, original.checksum);
        assert_ne!(digest_of(&[&[0; 5]]), digest_of(&[&[0; 6]]));
        assert_ne!(digest_of(&[]).checksum, digest_of(&[&[0]]).checksum);
    }

    #[test]
    fn digest_wire_format_round_trips() {
        let digest = Digest {
            checksum: 0x0102_0304_0506_0708,
            bytes: 42,
        };
        let wire = digest.to_wire();
        assert_eq!(wire[0], 0x08);
        assert_eq!(wire[8], 42);
        assert_eq!(Digest::from_wire(wire), digest);
    }
}
