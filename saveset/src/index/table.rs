//! The in-memory table of the entries this process added, until they are spilled to a run.
//!
//! A vector of entries in arrival order and a hash table of their positions (4 bytes a bucket),
//! not a hash map of entries: a spill sorts the vector in place instead of copying the table
//! into a sorted vector beside it, and the position table (and the vector) are reserved for
//! the whole share at the first insert, so the table never rehashes into a second one and the
//! vector never doubles past the share. As a hash map the table peaked at
//! about twice its entries (the map and the sorted copy, or the old and new table while growing);
//! now it holds 44 bytes an entry and 4-9 bytes of positions.

use hashbrown::HashTable;

use super::run::RawEntry;
use crate::manifest::ChunkId;

/// Ids are keyed hashes, uniform: their first 8 bytes are the hash.
fn hash(id: &ChunkId) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes"))
}

/// Positions reserved up front at most: 1 M entries, 10 MiB of buckets.
const RESERVE_MAX: usize = 1 << 20;

#[derive(Default)]
pub(crate) struct MemTable {
    /// In arrival order until [`MemTable::sorted`]; `pack` is the index's pack number.
    entries: Vec<RawEntry>,
    /// Positions in `entries`, by id: one per distinct id.
    at: HashTable<u32>,
}

impl MemTable {
    /// The entry of `id`, if the table has one.
    pub(crate) fn get(&self, id: &ChunkId) -> Option<&RawEntry> {
        let entries = &self.entries;
        self.at.find(hash(id), |&i| entries[i as usize].id == *id).map(|&i| &entries[i as usize])
    }

    /// Adds `e` unless the table has its id already (then `false`: the caller keeps it
    /// elsewhere). The first insert reserves positions for `expected` entries (at most
    /// [`RESERVE_MAX`]: a huge budget's table grows as it fills).
    pub(crate) fn insert(&mut self, e: RawEntry, expected: usize) -> bool {
        if self.at.capacity() == 0 {
            let n = expected.min(RESERVE_MAX);
            self.at.reserve(n, |&i| hash(&self.entries[i as usize].id));
            // Exactly the share: grown by doubling, it reached 131 072 entries (5.8 MB) for
            // 100 000, and held the old and the new buffer while it moved.
            self.entries.reserve_exact(n);
        }
        let entries = &self.entries;
        // One probe: the slot found empty is the one filled.
        match self.at.entry(
            hash(&e.id),
            |&i| entries[i as usize].id == e.id,
            |&j| hash(&entries[j as usize].id),
        ) {
            hashbrown::hash_table::Entry::Occupied(_) => false,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                let i = u32::try_from(self.entries.len())
                    .expect("a table's share is under 2^32 entries");
                slot.insert(i);
                self.entries.push(e);
                true
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Entries the vector has room for.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.entries.capacity()
    }

    /// The entries sorted in place, for a spill; the table is empty again once `clear`ed.
    pub(crate) fn sorted(&mut self) -> &[RawEntry] {
        self.at.clear();
        self.entries.sort_unstable();
        &self.entries
    }

    /// Empties the table and gives its memory back (the next backup may add nothing).
    pub(crate) fn clear(&mut self) {
        *self = MemTable::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u32) -> RawEntry {
        RawEntry {
            id: ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes()),
            pack: n % 7,
            offset: n,
            len: 1,
        }
    }

    #[test]
    fn finds_what_it_holds_refuses_a_second_entry_for_an_id_and_spills_sorted() {
        let mut t = MemTable::default();
        // Past the reserved positions too: the table grows like any other.
        for n in 0..5000 {
            assert!(t.insert(entry(n), 1000));
        }
        let mut again = entry(17);
        again.pack = 99;
        assert!(!t.insert(again, 1000), "one entry per id; repeats go elsewhere");
        assert_eq!(t.len(), 5000);
        for n in 0..5000 {
            assert_eq!(t.get(&entry(n).id), Some(&entry(n)));
        }
        assert_eq!(t.get(&entry(5000).id), None);
        let sorted = t.sorted().to_vec();
        assert_eq!(sorted.len(), 5000);
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        t.clear();
        assert_eq!(t.len(), 0);
        assert_eq!(t.get(&entry(3).id), None);
        assert!(t.insert(entry(3), 10));
        assert_eq!(t.get(&entry(3).id), Some(&entry(3)));
    }
}
