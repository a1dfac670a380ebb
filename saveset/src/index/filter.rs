//! A Bloom filter over chunk ids, in a power of two of bits so that it can be halved (folded)
//! when the filters of all runs together outgrow the memory budget: a larger repository then
//! costs more false positives (a block read that finds nothing), never more memory. Chunk ids
//! are keyed hashes, uniform and unknown to an attacker, so their own bytes are the hashes.

use crate::manifest::ChunkId;

/// Probes per id: near the optimum for 8-16 bits per entry.
pub(crate) const PROBES: u32 = 7;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    /// `words.len() * 64` bits, a power of two.
    words: Vec<u64>,
}

fn probes(id: &ChunkId) -> (u64, u64) {
    let h1 = u64::from_le_bytes(id.0[8..16].try_into().expect("8 bytes"));
    let h2 = u64::from_le_bytes(id.0[16..24].try_into().expect("8 bytes")) | 1;
    (h1, h2)
}

impl Filter {
    /// A filter of `bits` bits (rounded up to a power of two, at least 64).
    pub(crate) fn with_bits(bits: u64) -> Self {
        let bits = bits.max(64).next_power_of_two();
        Filter { words: vec![0; usize::try_from(bits / 64).expect("a filter fits in memory")] }
    }

    /// The bits to give `entries` ids: the power of two nearest to 12 per id (8.5 to 17 per id,
    /// 12.2 on average, where rounding up gave 12 to 24, 17.3 on average; a false positive rate
    /// of 0.05-1.7% instead of 0.007-0.3%, each a block read, most of them from memory), at
    /// most `max_bits` (rounded down to a power of two), at least 64.
    pub(crate) fn bits_for(entries: u64, max_bits: u64) -> u64 {
        let want = entries.saturating_mul(12).max(64);
        let up = want.next_power_of_two();
        // Down when `want` is below the geometric middle of the two powers (want^2 < up^2 / 2).
        let nearest = if up > want && u128::from(want).pow(2) * 2 < u128::from(up).pow(2) {
            up / 2
        } else {
            up
        };
        let cap = if max_bits < 64 { 64 } else { 1 << (63 - max_bits.leading_zeros()) };
        nearest.max(64).min(cap)
    }

    pub(crate) fn from_words(words: Vec<u64>) -> Option<Self> {
        (!words.is_empty() && words.len().is_power_of_two()).then_some(Filter { words })
    }

    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }

    fn mask(&self) -> u64 {
        self.words.len() as u64 * 64 - 1
    }

    pub(crate) fn insert(&mut self, id: &ChunkId) {
        let (h1, h2) = probes(id);
        let mask = self.mask();
        for i in 0..u64::from(PROBES) {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) & mask;
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    /// False only if `id` was never inserted.
    pub(crate) fn may_contain(&self, id: &ChunkId) -> bool {
        let (h1, h2) = probes(id);
        let mask = self.mask();
        (0..u64::from(PROBES)).all(|i| {
            let bit = h1.wrapping_add(i.wrapping_mul(h2)) & mask;
            self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
        })
    }

    /// Halves the filter: bit `b` of the result is set when bit `b` or `b + half` was, which is
    /// exactly the filter the same ids would have built at half the size.
    pub(crate) fn fold(&mut self) -> bool {
        if self.words.len() < 2 {
            return false;
        }
        let half = self.words.len() / 2;
        for i in 0..half {
            self.words[i] |= self.words[i + half];
        }
        self.words.truncate(half);
        self.words.shrink_to_fit();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    #[test]
    fn inserted_ids_are_always_found_and_others_rarely() {
        let mut f = Filter::with_bits(Filter::bits_for(10_000, u64::MAX));
        for n in 0..10_000 {
            f.insert(&id(n));
        }
        assert!((0..10_000).all(|n| f.may_contain(&id(n))));
        let false_pos = (10_000..110_000).filter(|&n| f.may_contain(&id(n))).count();
        assert!(false_pos < 2_000, "{false_pos} false positives in 100k at 8.5+ bits per id");
    }

    #[test]
    fn a_folded_filter_is_the_filter_built_at_half_the_size_and_keeps_every_id() {
        let mut big = Filter::with_bits(1 << 16);
        let mut small = Filter::with_bits(1 << 15);
        for n in 0..5_000 {
            big.insert(&id(n));
            small.insert(&id(n));
        }
        assert!(big.fold());
        assert_eq!(big, small);
        assert!((0..5_000).all(|n| big.may_contain(&id(n))));
    }

    #[test]
    fn the_size_follows_the_entries_up_to_the_budget() {
        assert_eq!(Filter::bits_for(0, u64::MAX), 64);
        assert_eq!(Filter::bits_for(1000, u64::MAX), 16384, "12000 bits: nearer 16384 than 8192");
        assert_eq!(Filter::bits_for(1 << 20, u64::MAX), 1 << 24, "12.6 M bits: nearer 16 M");
        assert_eq!(Filter::bits_for(600_000, u64::MAX), 1 << 23, "7.2 M bits: nearer 8 M");
        assert_eq!(Filter::bits_for(700_000, u64::MAX), 1 << 23, "8.4 M bits: nearer 8 M");
        assert_eq!(Filter::bits_for(1_000_000, u64::MAX), 1 << 24, "12 M bits: nearer 16 M");
        assert_eq!(Filter::bits_for(1 << 30, 1 << 20), 1 << 20, "capped: more false positives");
        assert_eq!(Filter::bits_for(1 << 30, (1 << 20) + 5), 1 << 20);
    }
}
