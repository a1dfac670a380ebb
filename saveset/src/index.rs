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
    /// By pack number: packs a prune marked for deletion, or whose index file is gone. New
    /// backups do not dedup against their chunks (FORMAT.md, "Prune").
    excluded: Vec<bool>,
}

impl Index {
    pub(crate) fn get(&self, id: &ChunkId) -> Option<ChunkLoc> {
        self.map.get(id).map(|s| ChunkLoc {
            pack: self.packs[s.pack as usize],
            offset: u64::from(s.offset),
            len: s.len,
        })
    }

    /// True when a backup may reference `id` without storing it: it is indexed in a pack that
    /// is neither marked for deletion nor gone.
    pub(crate) fn contains_key(&self, id: &ChunkId) -> bool {
        self.map.get(id).is_some_and(|s| !self.is_excluded(s.pack))
    }

    fn is_excluded(&self, number: u32) -> bool {
        self.excluded.get(number as usize).copied().unwrap_or(false)
    }

    /// Marks exactly the packs for which `excluded` is true as excluded from dedup (the others
    /// are included again, as after a prune rescued them).
    pub(crate) fn set_excluded(&mut self, excluded: impl Fn(&PackId) -> bool) {
        self.excluded = self.packs.iter().map(excluded).collect();
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
        let excluded = &self.excluded;
        let gone = |n: u32| excluded.get(n as usize).copied().unwrap_or(false);
        for (chunk, offset, len) in entries {
            let offset = u32::try_from(offset).expect("pack offsets fit in u32");
            let slot = Slot { pack: number, offset, len };
            // A location in a pack marked for deletion gives way to one that stays.
            self.map
                .entry(chunk)
                .and_modify(|s| {
                    if gone(s.pack) && !gone(number) {
                        *s = slot;
                    }
                })
                .or_insert(slot);
        }
    }
}
