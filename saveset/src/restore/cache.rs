//! Decoded chunks a restore will need again, kept for their next use.
//!
//! Disk images repeat blocks far apart (the same file in two places, copies of libraries): in
//! the benchmark image 36% of the data chunks repeat one from an earlier window. Each
//! repeat would otherwise be read, opened, decompressed and re-hashed again. The manifest says
//! exactly where every chunk is used next, so the cache follows Belady's rule: it keeps only
//! chunks that will be used again and, when full, drops the one whose next use is farthest
//! (the best any cache of that size can do; 48 MiB serve 18% of the benchmark's data bytes).
//! Workers take windows nearly in order but not exactly, so an entry whose next use a worker
//! has already passed (it missed because another worker had not yet offered the chunk) is stale
//! and goes first.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::index::IdMap;
use crate::manifest::ChunkId;

/// No later use.
const NEVER: u32 = u32::MAX;

pub(super) struct RepeatCache {
    /// For each chunk position, the position of the next chunk with the same id, or `NEVER`.
    next_use: Vec<u32>,
    chunk_size: usize,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Decoded chunks, `chunk_size` bytes each, allocated as the cache fills.
    slots: Vec<Box<[u8]>>,
    free: Vec<u32>,
    entries: IdMap<ChunkId, Entry>,
    /// (next use, id) of every entry, to find the nearest (stale) and the farthest.
    by_next: BTreeSet<(u32, ChunkId)>,
}

#[derive(Clone, Copy)]
struct Entry {
    slot: u32,
    next: u32,
}

impl RepeatCache {
    /// A cache of at most `budget` bytes for restoring `chunks` (a segment of a volume in
    /// chunks of `chunk_size`), or `None` when no chunk repeats (nothing to keep) or the
    /// segment is too large to number its chunks in 32 bits.
    pub(super) fn new(chunks: &[Option<ChunkId>], chunk_size: u32, budget: usize) -> Option<Self> {
        let chunk_size = chunk_size as usize;
        let capacity = budget / chunk_size.max(1);
        let n = u32::try_from(chunks.len()).ok().filter(|&n| n < NEVER)?;
        if capacity == 0 {
            return None;
        }
        // Every data chunk as one u64, the id's first bits above its position, sorted: equal ids
        // end up adjacent and in position order. 8 bytes per chunk for a moment, where a map
        // from id to position took five times that. Ids are uniform, so a shortened id rarely
        // collides, and a collision only costs a miss: entries are looked up by whole id.
        let position_bits = u32::BITS - (n - 1).max(1).leading_zeros();
        let mut keyed: Vec<u64> = chunks
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let head = u64::from_le_bytes(c.as_ref()?.0[..8].try_into().expect("8 bytes"));
                Some(head << position_bits | i as u64)
            })
            .collect();
        keyed.sort_unstable();
        let position = |k: u64| (k & ((1u64 << position_bits) - 1)) as u32;
        let mut next_use = vec![NEVER; n as usize];
        let mut repeats = false;
        for pair in keyed.windows(2) {
            if pair[0] >> position_bits == pair[1] >> position_bits {
                next_use[position(pair[0]) as usize] = position(pair[1]);
                repeats = true;
            }
        }
        drop(keyed);
        repeats.then(|| RepeatCache {
            next_use,
            chunk_size,
            capacity,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The next use of the chunk at `position` at or after `end` (the end of the window being
    /// restored: uses inside it are copies within the window).
    pub(super) fn next_use_from(&self, position: usize, end: usize) -> Option<u32> {
        let mut at = self.next_use[position];
        while at != NEVER && (at as usize) < end {
            at = self.next_use[at as usize];
        }
        (at != NEVER).then_some(at)
    }

    /// Copies the chunk `id` into `out` if it is cached; `next` is its next use after this
    /// window (`None`: never again, so its slot is freed).
    pub(super) fn take(&self, id: &ChunkId, next: Option<u32>, out: &mut [u8]) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = inner.entries.get(id).copied() else {
            return false;
        };
        // Equal ids mean equal content, so equal length: `out` is the chunk's extent.
        out.copy_from_slice(&inner.slots[entry.slot as usize][..out.len()]);
        inner.by_next.remove(&(entry.next, *id));
        match next {
            Some(next) => {
                inner.by_next.insert((next, *id));
                inner.entries.insert(*id, Entry { slot: entry.slot, next });
            }
            None => {
                inner.entries.remove(id);
                inner.free.push(entry.slot);
            }
        }
        true
    }

    /// Offers the decoded chunk `id`, next used at `next`; `low_water` is the first position
    /// any worker is still restoring (entries due before it are stale).
    pub(super) fn offer(&self, id: &ChunkId, next: u32, low_water: usize, data: &[u8]) {
        if data.len() > self.chunk_size {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        if let Some(entry) = inner.entries.get_mut(id) {
            // Another worker offered it too; the later next use is the one still to come.
            if next > entry.next {
                inner.by_next.remove(&(entry.next, *id));
                entry.next = next;
                inner.by_next.insert((next, *id));
            }
            return;
        }
        let slot = if let Some(slot) = inner.free.pop() {
            slot
        } else if inner.slots.len() < self.capacity {
            inner.slots.push(vec![0u8; self.chunk_size].into_boxed_slice());
            u32::try_from(inner.slots.len() - 1).expect("fewer slots than chunks")
        } else {
            let stale = inner.by_next.first().copied().filter(|&(at, _)| (at as usize) < low_water);
            let Some(victim) = stale.or_else(|| inner.by_next.last().copied()) else {
                return;
            };
            if stale.is_none() && victim.0 <= next {
                return; // everything cached is needed sooner than this chunk
            }
            inner.by_next.remove(&victim);
            inner.entries.remove(&victim.1).expect("every ordered entry is in the map").slot
        };
        inner.slots[slot as usize][..data.len()].copy_from_slice(data);
        inner.entries.insert(*id, Entry { slot, next });
        inner.by_next.insert((next, *id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(chunks: Vec<Option<u8>>) -> Vec<Option<ChunkId>> {
        chunks.into_iter().map(|c| c.map(|b| ChunkId([b; 32]))).collect()
    }

    fn id(b: u8) -> ChunkId {
        ChunkId([b; 32])
    }

    #[test]
    fn next_uses_skip_the_current_window_and_holes() {
        let m = manifest(vec![Some(1), Some(2), Some(1), None, Some(1), Some(3)]);
        let c = RepeatCache::new(&m, 4, 16).expect("chunk 1 repeats");
        assert_eq!(c.next_use_from(0, 1), Some(2));
        assert_eq!(c.next_use_from(0, 3), Some(4));
        assert_eq!(c.next_use_from(0, 5), None);
        assert_eq!(c.next_use_from(1, 2), None);
        assert!(RepeatCache::new(&manifest(vec![Some(1), None, Some(2)]), 4, 16).is_none());
    }

    #[test]
    fn a_full_cache_keeps_the_chunks_needed_soonest_and_drops_stale_ones() {
        // Chunk 0 repeats, so there is a cache; 8 bytes hold two chunks of 4.
        let m = manifest((0..100).map(|i| Some(i as u8 % 99)).collect());
        let c = RepeatCache::new(&m, 4, 8).expect("chunk 0 repeats");
        c.offer(&id(1), 50, 0, b"aaaa");
        c.offer(&id(2), 20, 0, b"bbbb");
        // Full: 3 is needed at 30, sooner than 1 (50), so 1 goes.
        c.offer(&id(3), 30, 0, b"cccc");
        let mut out = [0u8; 4];
        assert!(!c.take(&id(1), None, &mut out));
        // 4 is needed at 90, later than everything cached: not kept.
        c.offer(&id(4), 90, 0, b"dddd");
        assert!(!c.take(&id(4), None, &mut out));
        // Once workers are past 20, chunk 2's entry is stale and makes room even for 4.
        c.offer(&id(4), 90, 25, b"dddd");
        assert!(c.take(&id(4), Some(95), &mut out));
        assert_eq!(&out, b"dddd");
        assert!(c.take(&id(3), None, &mut out));
        assert_eq!(&out, b"cccc");
        // Taken with no later use, 3's slot was freed: 5 fits without evicting 4.
        c.offer(&id(5), 99, 25, b"eeee");
        assert!(c.take(&id(4), None, &mut out) && c.take(&id(5), None, &mut out));
        assert_eq!(&out, b"eeee");
    }
}
