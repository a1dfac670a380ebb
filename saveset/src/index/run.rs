//! One index run: an immutable file of index entries sorted by chunk id, cut into blocks that
//! each carry a checksum, with a blocked Bloom filter before them (each of its blocks checked
//! too) and, after them, what a reader keeps in memory: the run's pack table and the first id
//! prefix of each block (fence keys). A header checksum covers the header and those tables; a
//! block's checksum is checked when it is read. Anything that does not check out makes the run
//! damaged: it is dropped and its packs' index files are read again from the repository. Runs
//! are written as `tmp-*` and renamed, so a reader never sees half a run.
//!
//! ```text
//! header (128 bytes): magic "SPIXRUN2", repository tag (16), entries u64, entries per block
//!     u32, packs u32, filter blocks u64, blocks end u64, checksum (32) of header+tables
//! filter: per filter block 64 bytes of bits (u64 LE words), then blake3 of them (first 8)
//! blocks: per block up to `block` entries of 44 bytes (chunk id 32, pack u32 (in this run's
//!     table), offset u32, sealed length u32, all LE), then blake3 of them (first 8 bytes)
//! pack table: 32 bytes per pack; fences: u64 BE per block
//! ```

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::filter::{self, Block, FilterWriter};
use crate::crypto::{hex, random};
use crate::manifest::{ChunkId, PackId};

const MAGIC: &[u8; 8] = b"SPIXRUN2";
pub(crate) const HEADER: usize = 128;
pub(crate) const ENTRY: usize = 44;
const BLOCK_SUM: usize = 8;
/// Entries per block at least: one block is about one 4 KiB page.
pub(crate) const MIN_BLOCK: u32 = 64;

/// One entry: `id` at `offset` (sealed length `len`) in pack number `pack` of some table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RawEntry {
    pub id: ChunkId,
    pub pack: u32,
    pub offset: u32,
    pub len: u32,
}

impl RawEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.pack.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
    }

    fn decode(b: &[u8]) -> RawEntry {
        let u = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        RawEntry {
            id: ChunkId(b[..32].try_into().expect("32 bytes")),
            pack: u(32),
            offset: u(36),
            len: u(40),
        }
    }
}

fn prefix(id: &ChunkId) -> u64 {
    u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes"))
}

fn block_sum(entries: &[u8]) -> [u8; BLOCK_SUM] {
    blake3::hash(entries).as_bytes()[..BLOCK_SUM].try_into().expect("8 bytes")
}

/// Entries per block so that the fence keys of `entries` take at most `fence_bytes`.
pub(crate) fn block_for(entries: u64, fence_bytes: u64) -> u32 {
    let blocks_allowed = (fence_bytes / 8).max(1);
    let per = entries.div_ceil(blocks_allowed).max(u64::from(MIN_BLOCK)).next_power_of_two();
    u32::try_from(per).unwrap_or(1 << 31)
}

/// Writes a run: entries pushed in id order, then [`RunWriter::finish`].
pub(crate) struct RunWriter {
    tmp: TmpFile,
    out: BufWriter<File>,
    tag: [u8; 16],
    packs: Vec<PackId>,
    block: u32,
    cur: Vec<u8>,
    in_block: u32,
    entries: u64,
    fences: Vec<u64>,
    filter: FilterWriter,
    last: Option<ChunkId>,
}

impl RunWriter {
    /// A run in `dir` over the packs `packs` (entries name them by position), sized for about
    /// `expected` entries (the filter's size is fixed from it: more entries cost precision).
    pub(crate) fn create(
        dir: &Path,
        tag: [u8; 16],
        packs: Vec<PackId>,
        expected: u64,
        fence_bytes: u64,
    ) -> std::io::Result<RunWriter> {
        let (tmp, mut file) = super::private_file(dir, "tmp-", "")?;
        let filter_blocks = filter::blocks_for(expected);
        let blocks_at = HEADER as u64 + filter_blocks * filter::RECORD as u64;
        // The blocks are appended from `blocks_at`; the filter is written before them as it is
        // built, the header last.
        file.seek(SeekFrom::Start(blocks_at))?;
        let out = BufWriter::with_capacity(1 << 20, file);
        let block = block_for(expected, fence_bytes);
        Ok(RunWriter {
            tmp: TmpFile(tmp),
            out,
            tag,
            packs,
            block,
            cur: Vec::with_capacity(block as usize * ENTRY),
            in_block: 0,
            entries: 0,
            fences: Vec::new(),
            filter: FilterWriter::new(filter_blocks, HEADER as u64),
            last: None,
        })
    }

    pub(crate) fn push(&mut self, e: &RawEntry) -> std::io::Result<()> {
        debug_assert!(self.last.is_none_or(|l| l <= e.id), "entries in id order");
        debug_assert!((e.pack as usize) < self.packs.len());
        self.last = Some(e.id);
        if self.in_block == 0 {
            self.fences.push(prefix(&e.id));
        }
        e.encode(&mut self.cur);
        self.filter.insert(self.out.get_ref(), &e.id)?;
        self.in_block += 1;
        self.entries += 1;
        if self.in_block == self.block {
            self.end_block()?;
        }
        Ok(())
    }

    fn end_block(&mut self) -> std::io::Result<()> {
        if self.in_block > 0 {
            self.out.write_all(&self.cur)?;
            self.out.write_all(&block_sum(&self.cur))?;
            self.cur.clear();
            self.in_block = 0;
        }
        Ok(())
    }

    /// Completes the run and renames it into `dir` as `run-<random>`; returns its path. An
    /// empty run is removed instead (`None`).
    pub(crate) fn finish(mut self, dir: &Path) -> std::io::Result<Option<PathBuf>> {
        if self.entries == 0 {
            return Ok(None);
        }
        self.end_block()?;
        // The header is known before the tables, so they are written and hashed as they go.
        let blocks_end = self.out.stream_position()?;
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..24].copy_from_slice(&self.tag);
        header[24..32].copy_from_slice(&self.entries.to_le_bytes());
        header[32..36].copy_from_slice(&self.block.to_le_bytes());
        let packs = u32::try_from(self.packs.len()).expect("fewer than 4 G packs");
        header[36..40].copy_from_slice(&packs.to_le_bytes());
        header[40..48].copy_from_slice(&self.filter.blocks().to_le_bytes());
        header[48..56].copy_from_slice(&blocks_end.to_le_bytes());
        let mut h = blake3::Hasher::new();
        h.update(&header[..56]);
        let mut put = |bytes: &[u8]| -> std::io::Result<()> {
            h.update(bytes);
            self.out.write_all(bytes)
        };
        for p in &self.packs {
            put(&p.0)?;
        }
        for f in &self.fences {
            put(&f.to_be_bytes())?;
        }
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        self.filter.finish(&file)?;
        header[56..88].copy_from_slice(h.finalize().as_bytes());
        file.write_all_at(&header, 0)?;
        let path = dir.join(format!("run-{}", hex(&random::<16>())));
        std::fs::rename(&self.tmp.0, &path)?;
        std::mem::forget(self.tmp);
        Ok(Some(path))
    }
}

/// A run's temp file, removed unless renamed into place: a run given up half way (an error,
/// an empty run) leaves nothing.
struct TmpFile(PathBuf);

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `n` records of `N` bytes at `at`, parsed by `parse`, read in pieces of 64 KiB that also go
/// to `h` (the header checksum covers the tables): a table is never held as bytes and parsed
/// at once. `n` is bounded by the file's length, checked by the caller.
fn read_table<T, const N: usize>(
    file: &File,
    at: u64,
    n: u64,
    h: &mut blake3::Hasher,
    parse: impl Fn(&[u8; N]) -> T,
) -> Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(usize::try_from(n).map_err(|_| "too large")?);
    let mut buf = vec![0u8; (1 << 16) / N * N];
    let mut done = 0u64;
    while done < n {
        let k = usize::try_from((n - done).min((buf.len() / N) as u64)).expect("a piece");
        let piece = &mut buf[..k * N];
        file.read_exact_at(piece, at + done * N as u64).map_err(|e| e.to_string())?;
        h.update(piece);
        out.extend(piece.chunks_exact(N).map(|r| parse(r.try_into().expect("N bytes"))));
        done += k as u64;
    }
    Ok(out)
}

/// An open run: its tables in memory, its filter and blocks on disk (or, when they fit the
/// budget's shares, in memory too).
pub(crate) struct Run {
    pub(crate) path: PathBuf,
    file: File,
    pub(crate) entries: u64,
    block: u32,
    filter_blocks: u64,
    /// Where the blocks start (after the filter).
    blocks_at: u64,
    blocks_end: u64,
    pub(crate) packs: Vec<PackId>,
    fences: Vec<u64>,
    /// The filter's first blocks, checked once, as many as fit the share left to this run (all
    /// of them for the smaller runs); a lookup whose block is not here reads it from the file.
    filter: Vec<Block>,
    /// Every block, checked once, when the run is small enough to keep.
    resident: Option<Vec<u8>>,
    /// Set when a block read fails or does not check out: lookups skip the run from then on.
    dead: AtomicBool,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").field("path", &self.path).field("entries", &self.entries).finish()
    }
}

impl Run {
    /// Opens the run at `path` if it is whole and of the repository `tag`; else why not.
    pub(crate) fn open(path: &Path, tag: [u8; 16]) -> Result<Run, String> {
        let mut file = File::open(path).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut header = [0u8; HEADER];
        file.read_exact(&mut header).map_err(|_| "shorter than its header".to_owned())?;
        if &header[..8] != MAGIC {
            return Err("not an index run of this version".into());
        }
        if header[8..24] != tag {
            return Err("of another repository".into());
        }
        let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8"));
        let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4"));
        let (entries, block, packs, filter_blocks, blocks_end) =
            (u64_at(24), u32_at(32), u32_at(36), u64_at(40), u64_at(48));
        if block == 0 || entries == 0 || filter_blocks == 0 || filter_blocks > len {
            return Err("bad header".into());
        }
        let nblocks = entries.div_ceil(u64::from(block));
        let tables_len = u64::from(packs) * 32 + nblocks * 8;
        let blocks_at = HEADER as u64 + filter_blocks * filter::RECORD as u64;
        let expect_blocks_end = blocks_at + entries * ENTRY as u64 + nblocks * BLOCK_SUM as u64;
        if blocks_end != expect_blocks_end || blocks_end.checked_add(tables_len) != Some(len) {
            return Err(format!("bad length {len}"));
        }
        // The tables are parsed as they are read and checked, a piece at a time. The filter
        // is not read here: `fit` loads it if it fits, its blocks checked one by one.
        let mut h = blake3::Hasher::new();
        h.update(&header[..56]);
        let fences_at = blocks_end + u64::from(packs) * 32;
        let packs =
            read_table(&file, blocks_end, u64::from(packs), &mut h, |p: &[u8; 32]| PackId(*p))?;
        let fences =
            read_table(&file, fences_at, nblocks, &mut h, |f: &[u8; 8]| u64::from_be_bytes(*f))?;
        if h.finalize().as_bytes()[..] != header[56..88] {
            return Err("checksum mismatch".into());
        }
        Ok(Run {
            path: path.to_owned(),
            file,
            entries,
            block,
            filter_blocks,
            blocks_at,
            blocks_end,
            packs,
            fences,
            filter: Vec::new(),
            resident: None,
            dead: AtomicBool::new(false),
        })
    }

    /// Bytes of the blocks (what keeping the run in memory costs).
    pub(crate) fn block_bytes(&self) -> u64 {
        self.blocks_end - self.blocks_at
    }

    /// Bytes of the filter's bits (what keeping the filter in memory costs).
    pub(crate) fn filter_bytes(&self) -> u64 {
        self.filter_blocks * std::mem::size_of::<Block>() as u64
    }

    /// Bytes of the filter held in memory.
    #[cfg(test)]
    pub(crate) fn filter_held(&self) -> u64 {
        self.filter.len() as u64 * std::mem::size_of::<Block>() as u64
    }

    /// Holds the filter's first blocks that fit in `bytes` (reading the missing ones, each
    /// checked, or freeing the ones beyond); a run whose filter fails is damaged.
    pub(crate) fn hold_filter(&mut self, bytes: u64) -> Result<(), String> {
        let want =
            usize::try_from((bytes / std::mem::size_of::<Block>() as u64).min(self.filter_blocks))
                .map_err(|_| "too large")?;
        let have = self.filter.len();
        if want < have {
            self.filter.truncate(want);
            self.filter.shrink_to_fit();
        } else if want > have {
            // Exactly the share, and read straight into it: grown by doubling, or read aside
            // and copied in, it would hold up to twice it.
            self.filter.reserve_exact(want - have);
            let more = (want - have) as u64;
            let read =
                filter::read_range(&self.file, HEADER as u64, have as u64, more, &mut self.filter);
            if let Err(why) = read {
                self.filter = Vec::new();
                return Err(why);
            }
        }
        Ok(())
    }

    /// Bytes this run holds in memory.
    #[cfg(test)]
    pub(crate) fn memory(&self) -> u64 {
        self.fences.len() as u64 * 8
            + self.filter_held()
            + self.packs.len() as u64 * 36
            + self.resident.as_ref().map_or(0, |r| r.len() as u64)
    }

    pub(crate) fn is_resident(&self) -> bool {
        self.resident.is_some()
    }

    pub(crate) fn mark_dead(&self) {
        self.dead.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// Reads every block into memory, checking each; a run that fails is damaged.
    pub(crate) fn make_resident(&mut self) -> Result<(), String> {
        let mut all = vec![0u8; usize::try_from(self.block_bytes()).map_err(|_| "too large")?];
        self.file.read_exact_at(&mut all, self.blocks_at).map_err(|e| e.to_string())?;
        let rec = self.block as usize * ENTRY + BLOCK_SUM;
        for b in 0..self.fences.len() {
            let start = b * rec;
            let n = self.entries_in(b) * ENTRY;
            let (data, sum) = all[start..start + n + BLOCK_SUM].split_at(n);
            if block_sum(data) != sum {
                return Err(format!("block {b}: checksum mismatch"));
            }
        }
        self.resident = Some(all);
        Ok(())
    }

    /// Back to reading block by block (it no longer fits the budget beside smaller runs).
    pub(crate) fn drop_resident(&mut self) {
        self.resident = None;
    }

    /// Frees the filter and the resident blocks of a run being merged away: it is only read
    /// through [`Run::iter`] from then on.
    pub(crate) fn release_memory(&mut self) {
        self.filter = Vec::new();
        self.resident = None;
    }

    fn entries_in(&self, b: usize) -> usize {
        let before = b as u64 * u64::from(self.block);
        usize::try_from((self.entries - before).min(u64::from(self.block))).expect("a block")
    }

    /// Block `b`'s entries (44 bytes each), from memory, from `cache` when it holds that
    /// block, or read into it and checked.
    fn block<'a>(&'a self, b: usize, cache: &'a mut Cached) -> Result<&'a [u8], String> {
        let rec = self.block as usize * ENTRY + BLOCK_SUM;
        let n = self.entries_in(b) * ENTRY;
        if let Some(all) = &self.resident {
            return Ok(&all[b * rec..b * rec + n]);
        }
        if cache.block != Some(b) {
            cache.block = None;
            let buf = &mut cache.buf;
            buf.resize(n + BLOCK_SUM, 0);
            let at = self.blocks_at + (b * rec) as u64;
            let read = self.file.read_exact_at(buf, at);
            let ok = read.is_ok() && block_sum(&buf[..n]) == buf[n..n + BLOCK_SUM];
            if !ok {
                self.dead.store(true, Ordering::Relaxed);
                let why = match read {
                    Err(e) => e.to_string(),
                    Ok(()) => "checksum mismatch".into(),
                };
                return Err(format!("block {b}: {why}"));
            }
            cache.block = Some(b);
        }
        Ok(&cache.buf[..n])
    }

    /// The block where entries for `id` start, and whether the next one may hold some too.
    fn first_block(&self, id: &ChunkId) -> usize {
        let p = prefix(id);
        self.fences.partition_point(|&f| f < p).saturating_sub(1)
    }

    /// False only if `id` is not in this run: from the filter in memory, from `cache` when it
    /// holds the filter block, or read into it and checked.
    fn may_contain(&self, id: &ChunkId, cache: &mut Cached) -> Result<bool, String> {
        let b = filter::block_of(id, self.filter_blocks);
        if let Some(block) = usize::try_from(b).ok().and_then(|b| self.filter.get(b)) {
            return Ok(filter::may_contain(block, id));
        }
        match cache.filter {
            Some((at, block)) if at == b => Ok(filter::may_contain(&block, id)),
            _ => {
                let block = filter::read_block(&self.file, HEADER as u64, b).inspect_err(|_| {
                    self.dead.store(true, Ordering::Relaxed);
                })?;
                cache.filter = Some((b, block));
                Ok(filter::may_contain(&block, id))
            }
        }
    }

    /// Calls `found` with every entry of `id` (pack numbers of this run's table). The filter
    /// answers most misses without a block read. `cache` keeps the last block and filter block
    /// read: ids looked up in sorted order read each once.
    pub(crate) fn lookup(
        &self,
        id: &ChunkId,
        cache: &mut Cached,
        found: &mut dyn FnMut(RawEntry),
    ) -> Result<(), String> {
        if self.is_dead() || !self.may_contain(id, cache)? {
            return Ok(());
        }
        let p = prefix(id);
        let mut b = self.first_block(id);
        loop {
            let entries = self.block(b, cache)?;
            let n = entries.len() / ENTRY;
            let key = |i: usize| &entries[i * ENTRY..i * ENTRY + 32];
            let mut i = partition(n, |i| key(i) < &id.0[..]);
            while i < n && key(i) == &id.0[..] {
                found(RawEntry::decode(&entries[i * ENTRY..(i + 1) * ENTRY]));
                i += 1;
            }
            // Entries of `id` go on in the next block only if this one ended on them or
            // before them and the next block starts with the same prefix.
            if i == n && b + 1 < self.fences.len() && self.fences[b + 1] <= p {
                b += 1;
            } else {
                return Ok(());
            }
        }
    }

    /// Every entry in order, block by block (for merging); a damaged block ends it with an
    /// error.
    pub(crate) fn iter(&self) -> RunIter<'_> {
        RunIter { run: self, block: 0, cache: Cached::default(), at: 0, len: 0 }
    }
}

fn partition(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The entries of a run in order.
pub(crate) struct RunIter<'a> {
    run: &'a Run,
    block: usize,
    cache: Cached,
    at: usize,
    len: usize,
}

/// The last block and filter block a reader read, for the next lookup in them.
#[derive(Default)]
pub(crate) struct Cached {
    block: Option<usize>,
    buf: Vec<u8>,
    filter: Option<(u64, Block)>,
}

impl Iterator for RunIter<'_> {
    type Item = Result<RawEntry, String>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.at == self.len {
            if self.block == self.run.fences.len() {
                return None;
            }
            match self.run.block(self.block, &mut self.cache).map(<[u8]>::len) {
                Ok(len) => {
                    self.len = len;
                    self.at = 0;
                    self.block += 1;
                }
                Err(e) => {
                    self.block = self.run.fences.len();
                    return Some(Err(e));
                }
            }
        }
        let rec = self.run.block as usize * ENTRY + BLOCK_SUM;
        let bytes = match &self.run.resident {
            Some(all) => &all[(self.block - 1) * rec..],
            None => &self.cache.buf[..],
        };
        let e = RawEntry::decode(&bytes[self.at..self.at + ENTRY]);
        self.at += ENTRY;
        Some(Ok(e))
    }
}
