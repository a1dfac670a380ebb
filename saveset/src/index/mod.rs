//! The chunk index: chunk id → where it is stored, with memory bounded by a budget, not by the
//! repository. The repository's `index/<pack>` files are the truth; this is a local cache of
//! them (FORMAT.md, "The index cache"): sorted immutable runs on disk (`run.rs`) with fence
//! keys and a Bloom filter each in memory (`filter.rs`), plus a bounded in-memory table of the
//! entries this process added, spilled to a new run when full and when the index is dropped.
//! Runs are merged once there are more than [`MAX_RUNS`]. The cache knows which packs it
//! covers, so `refresh_index` reads only the index files it lacks. Chunk ids are keyed blake3
//! hashes, uniformly distributed and unknown to an attacker without the key, so their own
//! bytes serve as hashes.
//!
//! `&self` everywhere (a read-write lock inside): a backup's pack storer adds each pack it
//! stored while the reader looks chunks up.

mod external;
mod filter;
mod run;
mod table;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

pub(crate) use external::{sort_budget, ExternalSet, ExternalSort, SortedFile, SortedIter};
use run::{Cached, RawEntry, Run, RunWriter};
use table::MemTable;

use crate::crypto::{hex, random};
use crate::error::{Error, IoContext, Result};
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

/// Runs beyond which the smallest are merged: a lookup that passes the filters costs one block
/// read per run holding the id.
pub(crate) const MAX_RUNS: usize = 8;
/// Ids [`Index::get_many_of`] sorts at once (40 bytes each with their position).
const LOOKUP_BATCH: usize = 1 << 16;
/// The default memory budget of the index (its in-memory table, filters, fence keys and runs
/// kept in memory); the external sets of prune and verify take as much again.
pub const DEFAULT_MEMORY_BUDGET: u64 = 128 << 20;
/// Bytes one in-memory entry costs: 44 in the table's vector, at most 12 in its positions (4
/// bytes a bucket, at least 3/8 of them used; `table.rs`).
const MEM_ENTRY_COST: u64 = 56;
/// Temp files of a run being written by a process that died are removed after this.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// What a budget buys.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) budget: u64,
    /// Entries in the in-memory table before it is spilled: a twenty-fourth of the budget (5.3
    /// MiB, about 100 000 entries by default), which a 1 GiB full backup already fills, so a
    /// backup's memory does not grow beyond that size (larger ones spill more runs).
    mem_entries: usize,
    /// Filters kept in memory (smallest first, the first that does not fit in part): a
    /// thirty-second of the budget (4 MiB by default, the filters of about 2.8 M chunks).
    /// Beyond, a lookup reads the 64-byte block it needs from the run's file (the page cache),
    /// so memory stops growing with the repository there and the filters never lose precision.
    filter_bytes: u64,
    /// Fence keys of one run being written.
    fence_bytes: u64,
    /// Runs read whole into memory (smallest first): a thirty-second of the budget (4 MiB by
    /// default, a run of about 90 k entries), so memory stops growing with the repository
    /// there; larger runs are read a block per lookup that passes their filter. A block in
    /// memory saves a read only for a chunk found (a repeat), and most of a large
    /// repository's blocks are on disk whatever the share, so the budget goes to filters,
    /// which save a read for every new chunk.
    resident_bytes: u64,
}

impl Limits {
    pub(crate) fn new(budget: u64) -> Limits {
        let budget = budget.max(64 << 10);
        Limits {
            budget,
            mem_entries: usize::try_from(budget / 24 / MEM_ENTRY_COST)
                .unwrap_or(usize::MAX)
                .max(64),
            filter_bytes: budget / 32,
            fence_bytes: budget / 64,
            resident_bytes: budget / 32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    pack: u32,
    offset: u32,
    len: u32,
}

/// The cache directory of one repository; a private temp one is removed when dropped.
#[derive(Debug)]
struct CacheDir {
    path: PathBuf,
    temporary: bool,
}

impl Drop for CacheDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Creates `path` and its missing parents as 0700, and makes `path` itself 0700.
pub(crate) fn private_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).ctx("create", path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).ctx("chmod", path)
}

/// Creates a new file `<prefix><32 random hex digits><suffix>` in `dir`, mode 0600, never an
/// existing one: runs, sort spills and kept bases are private and named so that concurrent
/// writers never meet.
pub(crate) fn private_file(
    dir: &Path,
    prefix: &str,
    suffix: &str,
) -> std::io::Result<(PathBuf, std::fs::File)> {
    let path =
        dir.join(format!("{prefix}{}{suffix}", crate::crypto::hex(&crate::crypto::random::<16>())));
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    Ok((path, file))
}

/// A run and where its pack numbers go in the index's numbering.
struct Live {
    run: Run,
    remap: Vec<u32>,
}

/// Chunk id → where it is stored, preferring a location in a pack that is not excluded, then
/// the first pack seen.
pub(crate) struct Index {
    inner: RwLock<Inner>,
}

struct Inner {
    /// `None` until something must be written, for an index that was given no directory.
    dir: Option<CacheDir>,
    tag: [u8; 16],
    limits: Limits,
    packs: Vec<PackId>,
    numbers: IdMap<PackId, u32>,
    /// By pack number: packs a prune marked for deletion, or whose index file is gone. New
    /// backups do not dedup against their chunks (FORMAT.md, "Prune").
    excluded: Vec<bool>,
    /// By pack number: packs whose index file is gone; merges drop their entries.
    gone: Vec<bool>,
    /// By pack number: packs whose whole index is in a run or the in-memory table.
    covered: Vec<bool>,
    runs: Vec<Live>,
    mem: MemTable,
    /// Further locations of ids `mem` has (rare: a chunk two writers stored, a repack).
    dups: IdMap<ChunkId, Vec<Slot>>,
    /// Pack numbers with entries in `mem`.
    mem_packs: Vec<u32>,
}

impl Default for Index {
    /// An empty index with no cache directory (one is made in the temp dir if it must spill).
    fn default() -> Self {
        Index::with_inner(Inner::new(None, [0; 16], Limits::new(DEFAULT_MEMORY_BUDGET)))
    }
}

impl Index {
    fn with_inner(inner: Inner) -> Index {
        Index { inner: RwLock::new(inner) }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The index cached in `root/<tag>` (`None`: a private temp dir, removed on drop), for the
    /// repository whose cache tag is `tag`. Runs that are damaged or of another repository are
    /// removed (their packs are read from the repository again).
    pub(crate) fn open(root: Option<&Path>, tag: [u8; 16], budget: u64) -> Result<Index> {
        let dir = match root {
            Some(root) => {
                let path = root.join(hex(&tag));
                private_dir(root)?;
                private_dir(&path)?;
                CacheDir { path, temporary: false }
            }
            None => temp_cache_dir()?,
        };
        let mut inner = Inner::new(Some(dir), tag, Limits::new(budget));
        inner.scan()?;
        Ok(Index::with_inner(inner))
    }

    /// An index in a private temp dir, for a one-off full load (verify's check of the files on
    /// disk now).
    pub(crate) fn temporary(tag: [u8; 16], budget: u64) -> Result<Index> {
        Index::open(None, tag, budget)
    }

    /// The locations of `ids` (any order, repeats allowed), looked up in id order so that each
    /// block of a run is read once however many of the ids it holds (tests: a step's ids go
    /// through an external sort and [`Index::sorted`]).
    #[cfg(test)]
    pub(crate) fn get_many(&self, ids: &[ChunkId]) -> Vec<Option<ChunkLoc>> {
        let mut order: Vec<(ChunkId, usize)> = ids.iter().copied().zip(0..).collect();
        order.sort_unstable();
        let mut out = vec![None; ids.len()];
        let mut lookup = self.sorted();
        for (id, i) in order {
            out[i] = lookup.get(&id);
        }
        out
    }

    /// [`Index::get_many`] of the ids `id_at(0..n)` (`None`: no id there, a hole), each
    /// location handed to `put` with its position, sorted a batch of [`LOOKUP_BATCH`] at a
    /// time: a small volume's restore segment, without copying its ids.
    pub(crate) fn get_many_of(
        &self,
        n: usize,
        id_at: impl Fn(usize) -> Option<ChunkId>,
        mut put: impl FnMut(usize, Option<ChunkLoc>),
    ) {
        let mut order: Vec<(ChunkId, usize)> = Vec::new();
        let mut at = 0;
        while at < n {
            let end = n.min(at + LOOKUP_BATCH);
            order.clear();
            order.extend((at..end).filter_map(|i| Some((id_at(i)?, i))));
            order.sort_unstable();
            let mut lookup = self.sorted();
            for &(id, i) in &order {
                put(i, lookup.get(&id));
            }
            at = end;
        }
    }

    /// A lookup for ids in ascending order: it keeps the last block read of each run, so a
    /// sorted stream of any length reads each block at most once (any order still answers
    /// right, only slower). It holds the index's read lock: nothing may be added meanwhile
    /// (an `add_pack` on another thread waits for it to be dropped; on this one it would
    /// deadlock).
    pub(crate) fn sorted(&self) -> SortedLookup<'_> {
        let inner = self.read();
        let caches = inner.runs.iter().map(|_| Cached::default()).collect();
        SortedLookup { inner, caches, last: None }
    }

    /// The location of one id (a chunk list page, a chunk).
    pub(crate) fn get(&self, id: &ChunkId) -> Option<ChunkLoc> {
        let inner = self.read();
        inner.best(id).map(|s| inner.loc(s))
    }

    /// True when a backup may reference `id` without storing it: it is indexed in a pack that
    /// is neither marked for deletion nor gone.
    pub(crate) fn contains_key(&self, id: &ChunkId) -> bool {
        let inner = self.read();
        inner.best(id).is_some_and(|s| !inner.is_excluded(s.pack))
    }

    /// True when some pack is excluded from dedup (marked by a prune, or its index file gone).
    pub(crate) fn any_excluded(&self) -> bool {
        self.read().excluded.iter().any(|&e| e)
    }

    /// Marks exactly the packs for which `excluded` is true as excluded from dedup (the others
    /// are included again, as after a prune rescued them).
    pub(crate) fn set_excluded(&self, excluded: impl Fn(&PackId) -> bool) {
        let mut inner = self.write();
        inner.excluded = inner.packs.iter().map(excluded).collect();
    }

    /// Marks the packs whose index file is gone: merges drop their entries.
    pub(crate) fn set_gone(&self, gone: impl Fn(&PackId) -> bool) {
        let mut inner = self.write();
        inner.gone = inner.packs.iter().map(gone).collect();
    }

    /// True once the index of pack `id` is held (in a run or in memory).
    pub(crate) fn has_pack(&self, id: &PackId) -> bool {
        let inner = self.read();
        inner.numbers.get(id).is_some_and(|&n| inner.covered[n as usize])
    }

    /// The packs held whose index file was not found gone.
    pub(crate) fn packs(&self) -> Vec<PackId> {
        let inner = self.read();
        (0..inner.packs.len())
            .filter(|&n| inner.covered[n] && !inner.gone.get(n).copied().unwrap_or(false))
            .map(|n| inner.packs[n])
            .collect()
    }

    /// Adds the entries `(chunk, offset, len)` of pack `pack`, unless its index is held
    /// already. Offsets must fit in u32 (packs are far below 4 GiB; `read_index` refuses
    /// larger ones). Spills the in-memory table to a run when it is full.
    pub(crate) fn add_pack(
        &self,
        pack: PackId,
        entries: impl IntoIterator<Item = (ChunkId, u64, u32)>,
    ) -> Result<()> {
        let mut inner = self.write();
        let number = inner.number(pack);
        if inner.covered[number as usize] {
            return Ok(());
        }
        // A pack's entries go in whole (a run covers whole packs): spilled first when they would
        // not fit, so the table stays within its share, where spilling after the pack that
        // crossed it grew the table's vector to twice the share (8.8 MB at 16 GiB).
        let entries = entries.into_iter();
        let mem_len = inner.mem_len();
        if mem_len > 0 && mem_len + entries.size_hint().0 > inner.limits.mem_entries {
            inner.make_room()?;
        }
        for (chunk, offset, len) in entries {
            let offset = u32::try_from(offset).expect("pack offsets fit in u32");
            let expected = inner.limits.mem_entries;
            if !inner.mem.insert(RawEntry { id: chunk, pack: number, offset, len }, expected) {
                inner.dups.entry(chunk).or_default().push(Slot { pack: number, offset, len });
            }
        }
        inner.covered[number as usize] = true;
        inner.mem_packs.push(number);
        // A pack larger than the whole share (size hints are exact here) goes out at once.
        if inner.mem_len() >= inner.limits.mem_entries {
            inner.make_room()?;
        }
        Ok(())
    }

    /// Writes what this process added to the cache (a run), takes in runs other processes
    /// wrote meanwhile, drops damaged runs (their packs are no longer held, so the next
    /// refresh reads their index files again), and merges runs beyond [`MAX_RUNS`].
    pub(crate) fn sync(&self) -> Result<()> {
        let mut inner = self.write();
        inner.spill()?;
        inner.scan()?;
        inner.merge_if_needed()
    }

    /// The memory budget this index was given.
    pub(crate) fn budget(&self) -> u64 {
        self.read().limits.budget
    }

    /// Where spilled sets of this repository go (the cache directory).
    pub(crate) fn scratch_dir(&self) -> Result<PathBuf> {
        let mut inner = self.write();
        Ok(inner.dir()?.path.clone())
    }

    /// Bytes the index holds in memory now (tables, filters, fences, runs kept whole).
    #[cfg(test)]
    pub(crate) fn memory(&self) -> u64 {
        let inner = self.read();
        inner.mem_len() as u64 * MEM_ENTRY_COST
            + inner.runs.iter().map(|r| r.run.memory()).sum::<u64>()
    }

    #[cfg(test)]
    pub(crate) fn run_count(&self) -> usize {
        self.read().runs.len()
    }
}

/// [`Index::sorted`]: lookups in id order, each block of a run read once.
pub(crate) struct SortedLookup<'a> {
    inner: RwLockReadGuard<'a, Inner>,
    caches: Vec<Cached>,
    /// The last id looked up and its answer (a volume repeats ids: zeros, copies).
    last: Option<(ChunkId, Option<ChunkLoc>)>,
}

impl SortedLookup<'_> {
    /// True when a backup may reference `id` without storing it (as [`Index::contains_key`]
    /// answers).
    pub(crate) fn contains_key(&mut self, id: &ChunkId) -> bool {
        self.inner.best_with(id, &mut self.caches).is_some_and(|s| !self.inner.is_excluded(s.pack))
    }

    /// Where `id` is stored (as [`Index::get`] answers).
    pub(crate) fn get(&mut self, id: &ChunkId) -> Option<ChunkLoc> {
        if let Some((prev, loc)) = self.last {
            if prev == *id {
                return loc;
            }
        }
        let loc = self.inner.best_with(id, &mut self.caches).map(|s| self.inner.loc(s));
        self.last = Some((*id, loc));
        loc
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        if inner.mem_len() > 0 && inner.dir.as_ref().is_some_and(|d| !d.temporary) {
            if let Err(e) = inner.spill() {
                tracing::warn!(error = %e, "index cache: could not save this process's entries");
            }
        }
    }
}

fn temp_cache_dir() -> Result<CacheDir> {
    let path = std::env::temp_dir().join(format!("stillpoint-index-{}", hex(&random::<8>())));
    private_dir(&path)?;
    Ok(CacheDir { path, temporary: true })
}

impl Inner {
    fn new(dir: Option<CacheDir>, tag: [u8; 16], limits: Limits) -> Inner {
        Inner {
            dir,
            tag,
            limits,
            packs: Vec::new(),
            numbers: IdMap::default(),
            excluded: Vec::new(),
            gone: Vec::new(),
            covered: Vec::new(),
            runs: Vec::new(),
            mem: MemTable::default(),
            dups: IdMap::default(),
            mem_packs: Vec::new(),
        }
    }

    /// Spills the in-memory table, merges past [`MAX_RUNS`] and fits the runs to the budget.
    fn make_room(&mut self) -> Result<()> {
        self.spill()?;
        self.merge_if_needed()?;
        self.fit();
        Ok(())
    }

    /// Entries added since the last spill: the table's and the repeats beside it.
    fn mem_len(&self) -> usize {
        self.mem.len() + self.dups.values().map(Vec::len).sum::<usize>()
    }

    fn dir(&mut self) -> Result<&CacheDir> {
        if self.dir.is_none() {
            self.dir = Some(temp_cache_dir()?);
        }
        Ok(self.dir.as_ref().expect("just set"))
    }

    fn number(&mut self, pack: PackId) -> u32 {
        if let Some(&n) = self.numbers.get(&pack) {
            return n;
        }
        let n = u32::try_from(self.packs.len()).expect("fewer than 4 G packs");
        self.packs.push(pack);
        self.numbers.insert(pack, n);
        self.covered.push(false);
        n
    }

    fn is_excluded(&self, number: u32) -> bool {
        self.excluded.get(number as usize).copied().unwrap_or(false)
    }

    fn loc(&self, s: Slot) -> ChunkLoc {
        ChunkLoc { pack: self.packs[s.pack as usize], offset: u64::from(s.offset), len: s.len }
    }

    /// A lone lookup: at most a block or two read per run (a cache each: block numbers are
    /// per run).
    fn best(&self, id: &ChunkId) -> Option<Slot> {
        let mut best = None;
        self.mem_slots(id, &mut |s| self.consider(&mut best, s));
        for live in &self.runs {
            let mut cache = Cached::default();
            self.run_slots(live, id, &mut cache, &mut |s| self.consider(&mut best, s));
        }
        best
    }

    fn best_with(&self, id: &ChunkId, caches: &mut [Cached]) -> Option<Slot> {
        let mut best = None;
        self.mem_slots(id, &mut |s| self.consider(&mut best, s));
        for (live, cache) in self.runs.iter().zip(caches) {
            self.run_slots(live, id, cache, &mut |s| self.consider(&mut best, s));
        }
        best
    }

    /// Keeps the better of `best` and `s`: not excluded first, then the first pack seen.
    fn consider(&self, best: &mut Option<Slot>, s: Slot) {
        let key = |s: &Slot| (self.is_excluded(s.pack), s.pack);
        if best.is_none_or(|b| key(&s) < key(&b)) {
            *best = Some(s);
        }
    }

    fn mem_slots(&self, id: &ChunkId, f: &mut dyn FnMut(Slot)) {
        if let Some(e) = self.mem.get(id) {
            f(Slot { pack: e.pack, offset: e.offset, len: e.len });
            if let Some(more) = self.dups.get(id) {
                more.iter().for_each(|&s| f(s));
            }
        }
    }

    fn run_slots(&self, live: &Live, id: &ChunkId, cache: &mut Cached, f: &mut dyn FnMut(Slot)) {
        let got = live.run.lookup(id, cache, &mut |e| {
            if let Some(&pack) = live.remap.get(e.pack as usize) {
                f(Slot { pack, offset: e.offset, len: e.len });
            }
        });
        if let Err(why) = got {
            tracing::warn!(
                run = %live.run.path.display(),
                "index cache run damaged ({why}): no longer used; its packs' index files are \
                 read again at the next refresh"
            );
        }
    }

    /// Writes the in-memory table as a new run (not read back into memory: at drop nobody
    /// will look it up).
    fn spill(&mut self) -> Result<()> {
        let total = self.mem_len();
        if total == 0 {
            return Ok(());
        }
        let mut packs = std::mem::take(&mut self.mem_packs);
        packs.sort_unstable();
        packs.dedup();
        let local =
            |n: u32| u32::try_from(packs.binary_search(&n).expect("a pack in mem")).expect("u32");
        // The table sorts in place; the rare repeats are merged in as the run is written.
        let mut more: Vec<RawEntry> = Vec::new();
        for (id, slots) in self.dups.drain() {
            more.extend(slots.into_iter().map(|s| RawEntry {
                id,
                pack: s.pack,
                offset: s.offset,
                len: s.len,
            }));
        }
        more.sort_unstable();
        let table: Vec<PackId> = packs.iter().map(|&n| self.packs[n as usize]).collect();
        let (tag, limits) = (self.tag, self.limits);
        let dir = self.dir()?.path.clone();
        let io = |e: std::io::Error| Error::Io {
            op: "write index cache run in",
            path: dir.clone(),
            source: e,
        };
        let mut w =
            RunWriter::create(&dir, tag, table, total as u64, limits.fence_bytes).map_err(io)?;
        let (mut a, mut b) = (self.mem.sorted().iter().peekable(), more.iter().peekable());
        while let Some(&e) = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if y < x => b.next(),
            (Some(_), _) => a.next(),
            (None, _) => b.next(),
        } {
            w.push(&RawEntry { pack: local(e.pack), ..e }).map_err(io)?;
        }
        self.mem.clear();
        if let Some(path) = w.finish(&dir).map_err(io)? {
            match Run::open(&path, tag) {
                Ok(run) => self.runs.push(Live { run, remap: packs }),
                Err(why) => {
                    return Err(Error::Damaged {
                        what: format!("index cache run {}", path.display()),
                        reason: format!("just written, {why}"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Takes in runs in the directory not open yet (another process wrote them), removes
    /// damaged or foreign ones and stale temp files, drops runs found damaged since.
    fn scan(&mut self) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let path = dir.path.clone();
        let before = self.runs.len();
        self.runs.retain(|l| {
            if l.run.is_dead() {
                let _ = std::fs::remove_file(&l.run.path);
            }
            !l.run.is_dead()
        });
        let mut dropped = self.runs.len() != before;
        let known: std::collections::HashSet<PathBuf> =
            self.runs.iter().map(|l| l.run.path.clone()).collect();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&path).ctx("list", &path)? {
            let entry = entry.ctx("list", &path)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let p = entry.path();
            if name.starts_with("tmp-") {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > STALE_TMP);
                if old {
                    let _ = std::fs::remove_file(&p);
                }
            } else if name.starts_with("run-") && !known.contains(&p) {
                found.push(p);
            }
        }
        found.sort();
        for p in found {
            match Run::open(&p, self.tag) {
                Ok(run) => {
                    let remap = run.packs.iter().map(|&id| self.number(id)).collect();
                    self.runs.push(Live { run, remap });
                }
                // Merged away by another process between the listing and the open.
                Err(why) if !p.exists() => {
                    tracing::debug!(run = %p.display(), "index cache run gone: {why}");
                }
                Err(why) => {
                    tracing::debug!(
                        run = %p.display(),
                        "index cache run not used ({why}): removed, its packs' index files are \
                         read from the repository again"
                    );
                    let _ = std::fs::remove_file(&p);
                    dropped = true;
                }
            }
        }
        if dropped || self.runs.len() != known.len() {
            self.recover_coverage();
        }
        self.fit();
        Ok(())
    }

    /// `covered` from the runs and the in-memory table.
    fn recover_coverage(&mut self) {
        self.covered = vec![false; self.packs.len()];
        for l in &self.runs {
            for &n in &l.remap {
                self.covered[n as usize] = true;
            }
        }
        for &n in &self.mem_packs {
            self.covered[n as usize] = true;
        }
    }

    /// Keeps the runs' memory within the budget: filters kept in memory, smallest first, while
    /// they fit their share, the first that does not fit in part (the rest are read a block per
    /// lookup, never made less precise: a lookup of a new chunk reads one block per run whose
    /// block is not held), then runs kept whole in memory, smallest first, while they fit.
    fn fit(&mut self) {
        let mut order: Vec<usize> = (0..self.runs.len()).collect();
        order.sort_by_key(|&i| self.runs[i].run.filter_bytes());
        let mut room = self.limits.filter_bytes;
        for &i in &order {
            let run = &mut self.runs[i].run;
            if run.is_dead() {
                continue;
            }
            let held = run.filter_bytes().min(room);
            room -= held;
            if let Err(why) = run.hold_filter(held) {
                tracing::warn!(run = %run.path.display(), "index cache run damaged ({why})");
                run.mark_dead();
            }
        }
        let mut order: Vec<usize> = (0..self.runs.len()).collect();
        order.sort_by_key(|&i| self.runs[i].run.block_bytes());
        let mut room = self.limits.resident_bytes;
        for i in order {
            let run = &mut self.runs[i].run;
            let bytes = run.block_bytes();
            if bytes > room {
                // This one and every larger one: on disk (a merge may have left one resident).
                room = 0;
                run.drop_resident();
                continue;
            }
            if run.is_resident() {
                room -= bytes;
                continue;
            }
            match run.make_resident() {
                Ok(()) => room -= bytes,
                Err(why) => {
                    tracing::warn!(run = %run.path.display(), "index cache run damaged ({why})");
                    run.mark_dead();
                }
            }
        }
    }

    /// Merges the smallest runs into one once there are more than [`MAX_RUNS`], unless another
    /// process is merging in this directory right now. Entries of packs whose index file is
    /// gone are left out; exact repeats (two processes cached the same pack) once.
    fn merge_if_needed(&mut self) -> Result<()> {
        if self.runs.len() <= MAX_RUNS {
            return Ok(());
        }
        let dir = self.dir()?.path.clone();
        let lock_path = dir.join("merge.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .ctx("open", &lock_path)?;
        if lock.try_lock().is_err() {
            return Ok(());
        }
        self.runs.sort_by_key(|l| l.run.entries);
        let take = self.runs.len() - MAX_RUNS / 2 + 1;
        let mut inputs: Vec<Live> = self.runs.drain(..take).collect();
        // Nothing looks the inputs up now (they are out of `runs`, under the write lock): their
        // filters and resident blocks go before the output's filter is built, so a merge does
        // not hold the inputs' and the output's filters at once.
        for l in &mut inputs {
            l.run.release_memory();
        }
        match self.merge(&dir, &inputs) {
            Ok(Some(live)) => {
                for l in &inputs {
                    let _ = std::fs::remove_file(&l.run.path);
                }
                self.runs.push(live);
            }
            Ok(None) => {
                for l in &inputs {
                    let _ = std::fs::remove_file(&l.run.path);
                }
            }
            Err(why) => {
                // A damaged input (marked dead by the read that failed) is removed now, and its
                // packs' index files are read from the repository again; the others stay,
                // opened again for their filters.
                tracing::warn!(dir = %dir.display(), "index cache merge failed: {why}");
                for l in inputs {
                    let reopened = if l.run.is_dead() {
                        Err("damaged".to_owned())
                    } else {
                        Run::open(&l.run.path, self.tag)
                    };
                    match reopened {
                        Ok(run) => self.runs.push(Live { run, remap: l.remap }),
                        Err(why) => {
                            tracing::debug!(
                                run = %l.run.path.display(),
                                "index cache run not used ({why}): removed"
                            );
                            let _ = std::fs::remove_file(&l.run.path);
                        }
                    }
                }
            }
        }
        drop(lock);
        self.recover_coverage();
        self.fit();
        Ok(())
    }

    fn merge(&self, dir: &Path, inputs: &[Live]) -> std::result::Result<Option<Live>, String> {
        let gone = |n: u32| self.gone.get(n as usize).copied().unwrap_or(false);
        let mut packs: Vec<u32> =
            inputs.iter().flat_map(|l| l.remap.iter().copied()).filter(|&n| !gone(n)).collect();
        packs.sort_unstable();
        packs.dedup();
        let table: Vec<PackId> = packs.iter().map(|&n| self.packs[n as usize]).collect();
        let expected: u64 = inputs.iter().map(|l| l.run.entries).sum();
        let io = |e: std::io::Error| e.to_string();
        let mut w = RunWriter::create(dir, self.tag, table, expected, self.limits.fence_bytes)
            .map_err(io)?;
        let mut iters: Vec<_> = inputs.iter().map(|l| l.run.iter()).collect();
        let mut heap = std::collections::BinaryHeap::new();
        let global =
            |k: usize, e: RawEntry| RawEntry { pack: inputs[k].remap[e.pack as usize], ..e };
        for (k, it) in iters.iter_mut().enumerate() {
            if let Some(e) = it.next() {
                heap.push(std::cmp::Reverse((global(k, e?), k)));
            }
        }
        let mut last: Option<RawEntry> = None;
        while let Some(std::cmp::Reverse((e, k))) = heap.pop() {
            if let Some(next) = iters[k].next() {
                heap.push(std::cmp::Reverse((global(k, next?), k)));
            }
            if gone(e.pack) || last == Some(e) {
                continue;
            }
            last = Some(e);
            let pack = u32::try_from(packs.binary_search(&e.pack).map_err(|_| "a pack")?)
                .map_err(|_| "u32")?;
            w.push(&RawEntry { pack, ..e }).map_err(io)?;
        }
        let Some(path) = w.finish(dir).map_err(io)? else { return Ok(None) };
        let run = Run::open(&path, self.tag)?;
        Ok(Some(Live { run, remap: packs }))
    }
}

#[cfg(test)]
mod tests;
