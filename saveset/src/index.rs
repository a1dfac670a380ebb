//! The in-memory chunk index, compact: a chunk id (32 bytes) maps to a packed location (pack
//! number, offset, sealed length: 3 × u32), 44 bytes per entry in a hash table reserved ahead
//! from the index files' sizes (no doubling peak while loading). Pack ids are numbered once.
//! Chunk ids are keyed blake3 hashes, uniformly distributed and unknown to an attacker without
//! the key, so their first 8 bytes serve as the hash.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::manifest::{ChunkId, PackId};
use crate::repo::ChunkLoc;

/// Hashes an id by its first 8 bytes (ids are already uniform).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        if let Some(head) = bytes.get(..8) {
            self.0 ^= u64::from_le_bytes(head.try_into().expect("8 bytes"));
        } else {
            for &b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(b);
            }
        }
    }

    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
pub(crate) type IdSet<K> = std::collections::HashSet<K, BuildHasherDefault<IdHasher>>;

#[derive(Clone, Copy, Debug)]
struct Slot {
    pack: u32,
    offset: u32,
    len: u32,
}

/// Chunk id → where it is stored, with the first location seen for each id.
#[derive(Default)]
pub(crate) struct Index {
    map: IdMap<ChunkId, Slot>,
    packs: Vec<PackId>,
    numbers: IdMap<PackId, u32>,
}

impl Index {
    pub(crate) fn get(&self, id: &ChunkId) -> Option<ChunkLoc> {
        self.map.get(id).map(|s| ChunkLoc {
            pack: self.packs[s.pack as usize],
            offset: u64::from(s.offset),
            len: s.len,
        })
    }

    pub(crate) fn contains_key(&self, id: &ChunkId) -> bool {
        self.map.contains_key(id)
    }

    /// True once the index of pack `id` has been added.
    pub(crate) fn has_pack(&self, id: &PackId) -> bool {
        self.numbers.contains_key(id)
    }

    /// The packs added, in the order they were added.
    pub(crate) fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// Makes room for `n` more chunks.
    pub(crate) fn reserve(&mut self, n: usize) {
        self.map.reserve(n);
    }

    /// Adds the entries `(chunk, offset, len)` of pack `pack`. Offsets must fit in u32 (packs
    /// are far below 4 GiB; `read_index` refuses larger ones).
    pub(crate) fn add_pack(
        &mut self,
        pack: PackId,
        entries: impl IntoIterator<Item = (ChunkId, u64, u32)>,
    ) {
        let next = u32::try_from(self.packs.len()).expect("fewer than 4 G packs");
        let number = *self.numbers.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            next
        });
        for (chunk, offset, len) in entries {
            let offset = u32::try_from(offset).expect("pack offsets fit in u32");
            self.map.entry(chunk).or_insert(Slot { pack: number, offset, len });
        }
    }
}
