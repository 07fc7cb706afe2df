//! Seeded generator for message sizes and payloads, so a run can be repeated byte for byte.

/// `SplitMix64` (Steele, Lea, Flood 2014): tiny, fast and statistically fine for load shaping.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `min..=max`, by Lemire's multiply-shift; the bias is below 2^-40 for any
    /// range a message size can have.
    pub fn in_range(&mut self, min: usize, max: usize) -> usize {
        debug_assert!(min <= max);
        let span = (max - min) as u128 + 1;
        min + ((u128::from(self.next_u64()) * span) >> 64) as usize
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes()[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn same_seed_same_sequence() {
        let mut a = SplitMix64::new(5);
        let mut b = SplitMix64::new(5);
        let mut c = SplitMix64::new(6);
        let xs: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..16).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn in_range_is_inclusive_and_bounded() {
        let mut rng = SplitMix64::new(1);
        let draws: Vec<usize> = (0..1000).map(|_| rng.in_range(3, 6)).collect();
        assert!(draws.iter().all(|&d| (3..=6).contains(&d)));
        for v in 3..=6 {
            assert!(draws.contains(&v), "{v} never drawn");
        }
        assert_eq!(rng.in_range(9, 9), 9);
        assert!(rng.in_range(usize::MAX - 1, usize::MAX) >= usize::MAX - 1);
        // The widest span must not overflow.
        rng.in_range(0, usize::MAX);
    }

    #[test]
    fn fill_covers_odd_lengths_with_non_zero_data() {
        let mut buf = [0u8; 13];
        SplitMix64::new(0).fill(&mut buf);
        assert!(buf[..8].iter().any(|&b| b != 0));
        assert!(buf[8..].iter().any(|&b| b != 0));
    }
}
