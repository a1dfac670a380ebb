//! Restoring a volume manifest to a file or block device: bit for bit, holes left unallocated
//! on regular files. Refuses a target that holds data unless forced.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::crypto::ChunkOpener;
use crate::direct::{self, AlignedBuf};
use crate::error::{Error, IoContext, Result};
use crate::index::{sort_budget, ExternalSort, IdMap, SortedIter};
use crate::jobs;
use crate::manifest::{ChunkId, Manifest, ManifestId, PackId, VolumeManifest};
use crate::repo::{runs, ChunkLoc, Repository};

/// At most this many bytes of a pack are fetched by one read (a window's chunks compress to
/// less; a worker's read buffer grows to at most this).
const READ_RUN: u64 = 4 << 20;
/// Bytes of the volume one restore worker assembles and writes at a time: with
/// `jobs::restore_workers` of them, 8 on 2 cores, 2 MiB windows hold what 4 workers' 4 MiB did.
const WINDOW: usize = 2 << 20;
/// Bytes of decoded chunks kept for their next use further on in the volume (`cache.rs`):
/// in the benchmark, 48 MiB serve 18% of the data chunks and cut restore CPU by 10%, for 55 MiB
/// of peak memory (restore then peaks below a backup's 200 MiB).
const REPEAT_CACHE: usize = 48 << 20;
/// Chunks of the volume in one segment (512 MiB of volume in 4 KiB chunks: 4 MiB of ids,
/// 1.5 MiB of locations): a restore walks the volume a segment at a time, the next one
/// prepared while the workers restore this one, so two are held and its memory stops growing
/// at 512 MiB volumes. The repeat cache plans within a segment. (Until 2026-12-04: 2^18
/// chunks, prepared while the workers waited; the overlap made a cold 4 GiB restore 7%
/// faster, and half the size kept the memory.)
const SEGMENT: u64 = 1 << 17;
/// Volumes of more chunks than this (4 GiB of 4 KiB chunks) find their locations in one
/// sorted pass over the index ([`Repository::locate`]); smaller ones look each segment's up
/// by itself, in sorted batches, while the workers restore the segment before. Per segment,
/// the lookups of a volume of n batches of 64 k ids read the index's blocks at most n times:
/// 16 at most here, a constant, not a cost that grows with the square of the volume; and they
/// overlap the restore, where the sorted pass runs before it starts (at 4 GiB, 0.2-0.4 s
/// more of a 4.3 s restore, measured).
const SORTED_ABOVE: u64 = 1 << 20;
/// A chunk id and its position in the volume (big-endian, after the id): the volume's data
/// chunks sorted by id, to be looked up in one pass over the index.
const ID_REC: usize = 40;
/// A position in the volume (big-endian, first, so records sort by it), then where the chunk
/// there is stored: pack number in the restore's pack table, offset, sealed length.
const LOC_REC: usize = 20;

mod cache;
#[cfg(test)]
mod tests;
use cache::RepeatCache;

/// What a restore wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Logical size of the restored volume.
    pub size: u64,
    /// Bytes of data written (holes on a regular file are not written).
    pub bytes_written: u64,
    /// Of those, bytes copied from a chunk this restore had already decoded (a repeat in the
    /// same window or kept in the repeat cache) instead of read and decoded again.
    pub bytes_reused: u64,
}

/// How far a restore has come, reported each time a window of the volume is on its way to the
/// disk (every 2 MiB of the volume, from several threads: `done` only grows, but two reports
/// may arrive out of order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreProgress {
    /// Bytes of the volume restored so far, data and holes.
    pub done: u64,
    /// The volume's size.
    pub size: u64,
}

impl Repository {
    /// Restores the volume manifest `id` to `target`; see [`Repository::restore_manifest`].
    pub fn restore_volume(
        &self,
        id: ManifestId,
        target: &Path,
        force: bool,
    ) -> Result<RestoreStats> {
        self.restore_volume_with(id, target, force, &|_| {})
    }

    /// [`Repository::restore_volume`], reporting its progress.
    pub fn restore_volume_with(
        &self,
        id: ManifestId,
        target: &Path,
        force: bool,
        progress: &(dyn Fn(RestoreProgress) + Sync),
    ) -> Result<RestoreStats> {
        match self.load_manifest(id)? {
            Manifest::Volume(m) => self.restore_manifest(&m, target, force, progress),
            Manifest::Backup(_) => Err(Error::Damaged {
                what: format!("manifest {id}"),
                reason: "is a backup manifest, not a volume manifest".into(),
            }),
        }
    }

    /// Writes the volume back to `target`, a regular file (created if absent, left sparse) or a
    /// block device (holes written as zeros). A non-empty file, or any block device, is
    /// refused with [`Error::TargetNotEmpty`] unless `force`. A file the restore created is
    /// removed again if the restore fails, so that a retry needs no `force`.
    pub fn restore_manifest(
        &self,
        manifest: &VolumeManifest,
        target: &Path,
        force: bool,
        progress: &(dyn Fn(RestoreProgress) + Sync),
    ) -> Result<RestoreStats> {
        // A long-lived handle (a pool's) may hold locations in packs a prune has since
        // repacked and deleted, in this process or another: the index is brought up to date
        // first (the deleted packs gone, the repacked ones in).
        self.refresh_index()?;
        let (file, sparse, created) = open_target(target, manifest.size, force)?;
        let sizes = (REPEAT_CACHE, SEGMENT, SORTED_ABOVE);
        let restored = self.write_volume(manifest, &file, sparse, target, sizes, progress);
        if restored.is_err() && created {
            drop(file);
            let _ = fs::remove_file(target);
        }
        restored
    }

    /// Writes every chunk of `manifest` into the opened target, a segment (of about `segment`
    /// chunks) at a time, with a repeat cache of `cache_budget` bytes; the locations found in
    /// one sorted pass for volumes of more than `sorted_above` chunks, else a segment at a time.
    fn write_volume(
        &self,
        manifest: &VolumeManifest,
        file: &File,
        sparse: bool,
        target: &Path,
        (cache_budget, segment, sorted_above): (usize, u64, u64),
        progress: &(dyn Fn(RestoreProgress) + Sync),
    ) -> Result<RestoreStats> {
        let count = manifest.chunk_count();
        let located =
            self.locate(manifest, sparse.then_some(file), target, count > sorted_above)?;
        // A second handle for direct writes of whole aligned runs (most of the volume).
        let direct = direct::open(target, false).ctx("open", target)?;
        let out = Out { file, direct: direct.as_ref(), target, sparse };
        let done = AtomicU64::new(0);
        let mut stats = RestoreStats { size: manifest.size, ..RestoreStats::default() };
        let per_window = (WINDOW / manifest.chunk_size.max(1) as usize).max(1) as u64;
        // Whole windows per segment, so windows never straddle two.
        let segment = (segment / per_window).max(1) * per_window;
        // A segment's chunk entries (pages read) and locations (taken from the sorted stream,
        // or looked up), prepared on a thread of its own while the workers restore the one
        // before: otherwise every worker waits for it at each segment boundary.
        let prepare = |first: u64| -> Result<Prepared> {
            let end = count.min(first + segment);
            let chunks = self.chunk_entries(manifest, first..end)?;
            let locs = match &located {
                Some(located) => located.take(first, chunks.len())?,
                None => Locations::of(self, &chunks),
            };
            Ok(Prepared { first, chunks, locs })
        };
        std::thread::scope(|scope| -> Result<()> {
            let mut next = if count > 0 { Some(prepare(0)?) } else { None };
            while let Some(Prepared { first, chunks, locs }) = next.take() {
                let end = first + chunks.len() as u64;
                let ahead = (end < count).then(|| scope.spawn(move || prepare(end)));
                let seg = Segment { manifest, first, chunks: &chunks, locs: &locs };
                let (written, reused) =
                    self.write_segment(seg, out, cache_budget, &done, progress)?;
                stats.bytes_written += written;
                stats.bytes_reused += reused;
                if let Some(ahead) = ahead {
                    // A panic there is a bug: it goes on as one here.
                    let prepared = ahead.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                    next = Some(prepared?);
                }
            }
            Ok(())
        })?;
        file.sync_all().ctx("fsync", target)?;
        Ok(stats)
    }

    /// Writes one segment: cut into windows of WINDOW bytes; each worker takes the next
    /// window, reads its chunks (neighbours in a pack with one read), decodes them into one
    /// buffer and writes each run of data (or, on a block device, the whole window) with one
    /// positional write. Holes in a regular file are skipped: they stay holes. Returns the data
    /// bytes written and how many of them were copies.
    fn write_segment(
        &self,
        seg: Segment<'_>,
        out: Out<'_>,
        cache_budget: usize,
        done: &AtomicU64,
        progress: &(dyn Fn(RestoreProgress) + Sync),
    ) -> Result<(u64, u64)> {
        let manifest = seg.manifest;
        let per_window = (WINDOW / manifest.chunk_size.max(1) as usize).max(1);
        let windows = seg.chunks.len().div_ceil(per_window);
        let workers = jobs::restore_workers().min(windows.max(1));
        let cache = RepeatCache::new(seg.chunks, manifest.chunk_size, cache_budget);
        // The first chunk of the window each worker is restoring (usize::MAX: none).
        let in_progress: Vec<AtomicUsize> =
            (0..workers).map(|_| AtomicUsize::new(usize::MAX)).collect();
        let repeats = Repeats { cache: cache.as_ref(), in_progress: &in_progress };
        let new_scratch = || -> Result<Scratch<'_>> {
            Ok(Scratch {
                window: AlignedBuf::new(per_window * manifest.chunk_size as usize),
                read: Vec::new(),
                opener: self.key.chunk_opener(),
                dc: zstd::bulk::Decompressor::new().ctx("decompress", out.target)?,
                written: 0,
                reused: 0,
            })
        };
        let scratches = jobs::share_out(windows, workers, new_scratch, |worker, scratch, w| {
            let first = w * per_window;
            let last = (first + per_window).min(seg.chunks.len());
            in_progress[worker].store(first, Ordering::Relaxed);
            self.restore_window(seg, first..last, scratch, out, repeats)?;
            in_progress[worker].store(usize::MAX, Ordering::Relaxed);
            let (from, _) = seg.extent(first);
            let (end, end_len) = seg.extent(last - 1);
            let bytes = end + end_len as u64 - from;
            let done = done.fetch_add(bytes, Ordering::Relaxed) + bytes;
            progress(RestoreProgress { done, size: manifest.size });
            Ok(())
        })?;
        Ok((scratches.iter().map(|s| s.written).sum(), scratches.iter().map(|s| s.reused).sum()))
    }

    /// Finds where every data chunk of `manifest` is stored, for the segments to take in
    /// order, in passes whose cost grows with the volume, not with its square: the chunk list
    /// is read once, its (id, position) pairs sorted by id (an external sort, so memory stays
    /// within the index's sort budget), looked up in that order (each index block read at most
    /// once, however large the volume), and the locations sorted back by position. Looking a
    /// segment's ids up by themselves would read most blocks of the index once per segment:
    /// at 1 TiB, thousands of passes over gigabytes of index.
    ///
    /// Without `sort` (a small volume, [`SORTED_ABOVE`]) only the preallocation is done, and
    /// `None` returned. With `file` (a fresh sparse file), the pass over the chunk list
    /// allocates every run of data chunks before the workers write, leaving the holes unallocated. Why: ext4 (and
    /// others) serialize direct writes that allocate blocks under the inode's exclusive lock,
    /// one write at a time, while writes into allocated (unwritten) extents run in parallel.
    /// A full filesystem is reported here, before gigabytes are written; a filesystem that
    /// cannot preallocate is written as it is.
    fn locate(
        &self,
        manifest: &VolumeManifest,
        file: Option<&File>,
        target: &Path,
        sort: bool,
    ) -> Result<Option<Located>> {
        let dir = self.index.scratch_dir()?;
        let budget = sort_budget(self.index.budget());
        let mut by_id: ExternalSort<ID_REC> = ExternalSort::new(&dir, budget);
        // The run of data chunks still open from the previous page: [start, end).
        let mut open: Option<(u64, u64)> = None;
        let mut supported = file.is_some();
        let mut allocate = |from: u64, to: u64| -> Result<()> {
            let Some(file) = file.filter(|_| supported) else { return Ok(()) };
            let (start, _) = manifest.extent(to_usize(from));
            let (last, last_len) = manifest.extent(to_usize(to - 1));
            match stillpoint_sys::preallocate(file, start, last + last_len as u64 - start) {
                Ok(()) => Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                    Err(e).ctx("allocate space for the restored volume in", target)
                }
                Err(_) => {
                    supported = false;
                    Ok(())
                }
            }
        };
        self.for_each_page(manifest, |first, entries, _| {
            for (k, e) in entries.iter().enumerate() {
                let i = first + k as u64;
                let Some(id) = e else { continue };
                if sort {
                    let mut rec = [0u8; ID_REC];
                    rec[..32].copy_from_slice(&id.0);
                    rec[32..].copy_from_slice(&i.to_be_bytes());
                    by_id.insert(rec)?;
                }
                match open {
                    Some((s, end)) if end == i => open = Some((s, i + 1)),
                    _ => {
                        if let Some((s, end)) = open.take() {
                            allocate(s, end)?;
                        }
                        open = Some((i, i + 1));
                    }
                }
            }
            Ok(())
        })?;
        if let Some((s, end)) = open {
            allocate(s, end)?;
        }
        if !sort {
            return Ok(None);
        }
        // A quarter of the budget: its last buffer is held while the workers restore.
        let mut by_pos: ExternalSort<LOC_REC> = ExternalSort::new(&dir, budget / 4);
        let mut packs: Vec<PackId> = Vec::new();
        let mut numbers: IdMap<PackId, u32> = IdMap::default();
        let mut lookup = self.index.sorted();
        for rec in by_id.into_sorted_iter()? {
            let rec = rec?;
            let id = ChunkId(rec[..32].try_into().expect("32 bytes"));
            // A chunk no index has stays out: the worker that meets it says so.
            let Some(loc) = lookup.get(&id) else { continue };
            let n = *numbers.entry(loc.pack).or_insert_with(|| {
                packs.push(loc.pack);
                u32::try_from(packs.len() - 1).expect("fewer than 4 G packs")
            });
            let offset = u32::try_from(loc.offset).expect("pack offsets fit in u32");
            let mut out = [0u8; LOC_REC];
            out[..8].copy_from_slice(&rec[32..]);
            out[8..12].copy_from_slice(&n.to_be_bytes());
            out[12..16].copy_from_slice(&offset.to_be_bytes());
            out[16..].copy_from_slice(&loc.len.to_be_bytes());
            by_pos.insert(out)?;
        }
        drop(lookup);
        let by_pos = Mutex::new(by_pos.into_sorted_iter()?.peekable());
        Ok(Some(Located { packs, by_pos }))
    }

    /// Restores chunks `range` of `manifest` (one window) through a worker's scratch, adding
    /// the bytes of data written, and how many of them were copies of chunks already decoded,
    /// to its counts.
    fn restore_window(
        &self,
        seg: Segment<'_>,
        range: Range<usize>,
        scratch: &mut Scratch<'_>,
        out: Out<'_>,
        repeats: Repeats<'_>,
    ) -> Result<()> {
        let Scratch { window, read, opener, dc, written, reused } = scratch;
        let buf = window.as_mut_slice();
        let sparse = out.sparse;
        let base = seg.extent(range.start).0;
        let mut data_chunks = Vec::with_capacity(range.len());
        for i in range.clone() {
            match &seg.chunks[i] {
                Some(id) => {
                    let loc = seg.loc(i).ok_or_else(|| Error::Damaged {
                        what: format!("chunk {id}"),
                        reason: "not in any index".into(),
                    })?;
                    data_chunks.push((i, *id, loc));
                }
                None if !sparse => {
                    let (off, len) = seg.extent(i);
                    let at = usize::try_from(off - base).expect("inside the window");
                    buf[at..at + len].fill(0);
                }
                None => {}
            }
        }
        // Read order: by pack and offset, so each pack range is fetched once.
        data_chunks.sort_by_key(|&(i, _, loc)| (loc.pack, loc.offset, i));
        // A chunk that repeats inside the window is decoded once and copied (duplicate extents
        // are common in disk images); `copies` holds (to, from) chunk numbers.
        let mut copies = Vec::new();
        data_chunks.dedup_by(|later, first| {
            let same = later.2 == first.2;
            if same {
                copies.push((later.0, first.0));
            }
            same
        });
        // Chunks an earlier window decoded and kept for this use are copied, not read.
        if let Some(cache) = repeats.cache {
            data_chunks.retain(|&(i, id, _)| {
                let (off, len) = seg.extent(i);
                let to = usize::try_from(off - base).expect("inside the window");
                let next = cache.next_use_from(i, range.end);
                let hit = cache.take(&id, next, &mut buf[to..to + len]);
                if hit {
                    *written += len as u64;
                    *reused += len as u64;
                }
                !hit
            });
        }
        let locs: Vec<_> = data_chunks.iter().map(|&(_, _, loc)| loc).collect();
        for run in runs(&locs, 64 << 10, READ_RUN) {
            let first = locs[run.start];
            let last = locs[run.end - 1];
            let end = locs[run.clone()]
                .iter()
                .map(|l| l.offset + u64::from(l.len))
                .max()
                .unwrap_or(last.offset + u64::from(last.len));
            let got = self.read_pack_into(first.pack, first.offset..end, read)?;
            let bytes = &mut read[got];
            for &(i, id, loc) in &data_chunks[run] {
                let at = usize::try_from(loc.offset - first.offset).expect("inside the run");
                let blob = &mut bytes[at..at + loc.len as usize];
                let (off, len) = seg.extent(i);
                let to = usize::try_from(off - base).expect("inside the window");
                let n = self
                    .decode_chunk_into(opener, id, blob, &mut buf[to..to + len], dc)
                    .map_err(|reason| Error::Damaged {
                        what: format!(
                            "chunk {id} in pack {} at offset {}",
                            self.pack_path(loc.pack).display(),
                            loc.offset
                        ),
                        reason: reason.into(),
                    })?;
                if n != len {
                    return Err(Error::Damaged {
                        what: format!("chunk {id}"),
                        reason: format!("{n} bytes where the manifest expects {len}"),
                    });
                }
                *written += len as u64;
                if let Some(cache) = repeats.cache {
                    if let Some(next) = cache.next_use_from(i, range.end) {
                        cache.offer(&id, next, repeats.low_water(), &buf[to..to + len]);
                    }
                }
            }
        }
        for (to, from) in copies {
            let (to_off, len) = seg.extent(to);
            let (from_off, from_len) = seg.extent(from);
            if len != from_len {
                return Err(Error::Damaged {
                    what: format!("manifest chunk {to}"),
                    reason: format!("{len} bytes where the same chunk at {from} has {from_len}"),
                });
            }
            let to = usize::try_from(to_off - base).expect("inside the window");
            let from = usize::try_from(from_off - base).expect("inside the window");
            buf.copy_within(from..from + len, to);
            *written += len as u64;
            *reused += len as u64;
        }
        // Write: the whole window on a device, each run of data chunks on a sparse file.
        let writes = if sparse { data_runs(seg.chunks, range) } else { vec![range] };
        for run in writes {
            let (from, _) = seg.extent(run.start);
            let (last_off, last_len) = seg.extent(run.end - 1);
            let a = usize::try_from(from - base).expect("inside the window");
            let b = usize::try_from(last_off - base).expect("inside the window") + last_len;
            out.write_at(&buf[a..b], from)?;
        }
        Ok(())
    }
}

/// What one restore worker keeps from window to window: the window being assembled (aligned
/// for direct writes), the pack read buffer, the chunk opener, the zstd context, and its counts
/// of data bytes written and of those copied from chunks already decoded.
struct Scratch<'k> {
    window: AlignedBuf,
    read: Vec<u8>,
    opener: ChunkOpener<'k>,
    dc: zstd::bulk::Decompressor<'static>,
    written: u64,
    reused: u64,
}

/// The cache of repeated chunks and where the workers are, so it can tell stale entries.
#[derive(Clone, Copy)]
struct Repeats<'a> {
    cache: Option<&'a RepeatCache>,
    in_progress: &'a [AtomicUsize],
}

impl Repeats<'_> {
    /// The first chunk any worker is still restoring.
    fn low_water(&self) -> usize {
        self.in_progress.iter().map(|w| w.load(Ordering::Relaxed)).min().unwrap_or(usize::MAX)
    }
}

/// Where a restore writes: the open target (and a direct-IO handle to it, where the filesystem
/// allows), its path for messages, and whether holes are skipped (a regular file) or written as
/// zeros (a block device).
#[derive(Clone, Copy)]
struct Out<'a> {
    file: &'a File,
    direct: Option<&'a File>,
    target: &'a Path,
    sparse: bool,
}

impl Out<'_> {
    /// Writes `buf` at `offset`: directly when aligned (whole chunks from an aligned window),
    /// through the page cache otherwise (the volume's short last chunk) or when refused.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(d) = self.direct.filter(|_| direct::aligned(buf, offset)) {
            match d.write_all_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) if direct::refused(&e) => {}
                Err(e) => return Err(e).ctx("write", self.target),
            }
        }
        self.file.write_all_at(buf, offset).ctx("write", self.target)
    }
}

/// Part of a volume being restored: chunks `first..first + chunks.len()` of `manifest`, with
/// their entries and where each data chunk is stored; positions in a segment count from its
/// first chunk.
#[derive(Clone, Copy)]
struct Segment<'a> {
    manifest: &'a VolumeManifest,
    first: u64,
    chunks: &'a [Option<ChunkId>],
    locs: &'a Locations,
}

/// A segment ready to restore: its chunks' ids and locations, from chunk `first` of the volume.
struct Prepared {
    first: u64,
    chunks: Vec<Option<ChunkId>>,
    locs: Locations,
}

/// Where a volume's data chunks are stored ([`Repository::locate`]): the packs they are in, and
/// the locations in position order, taken a segment at a time.
struct Located {
    packs: Vec<PackId>,
    by_pos: Mutex<std::iter::Peekable<SortedIter<LOC_REC>>>,
}

impl Located {
    /// The locations of chunks `first..first + len`: segments must be taken in order.
    fn take(&self, first: u64, len: usize) -> Result<Locations> {
        let mut at = vec![(NOWHERE, 0, 0); len];
        // The segment's own pack table, numbered as it meets them.
        let mut packs: Vec<PackId> = Vec::new();
        let mut numbers: IdMap<u32, u32> = IdMap::default();
        let end = first + len as u64;
        let position = |rec: &[u8; LOC_REC]| u64::from_be_bytes(rec[..8].try_into().expect("8"));
        let word = |rec: &[u8; LOC_REC], k: usize| {
            u32::from_be_bytes(rec[k..k + 4].try_into().expect("4 bytes"))
        };
        let mut by_pos = self.by_pos.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match by_pos.peek() {
                None => break,
                Some(Ok(rec)) if position(rec) >= end => break,
                Some(_) => {}
            }
            let rec = by_pos.next().expect("peeked")?;
            // Positions come in order, each once: none lies before this segment.
            if let Some(i) = position(&rec).checked_sub(first) {
                let global = word(&rec, 8);
                let n = *numbers.entry(global).or_insert_with(|| {
                    packs.push(self.packs[global as usize]);
                    u32::try_from(packs.len() - 1).expect("fewer than 4 G packs")
                });
                at[to_usize(i)] = (n, word(&rec, 12), word(&rec, 16));
            }
        }
        Ok(Locations { packs, at })
    }
}

/// Where a segment's data chunks are stored, 12 bytes per chunk (a location in full is 48): a
/// pack number in the segment's pack table, the offset and the sealed length.
struct Locations {
    packs: Vec<PackId>,
    /// Per chunk: (pack number, offset, length); `NOWHERE` as the pack: a hole, or not indexed.
    at: Vec<(u32, u32, u32)>,
}

const NOWHERE: u32 = u32::MAX;

impl Segment<'_> {
    /// Byte offset in the volume and length of the segment's chunk `i`.
    fn extent(&self, i: usize) -> (u64, usize) {
        self.manifest.extent(to_usize(self.first) + i)
    }

    /// Where chunk `i` of the segment is stored; `None` for a hole or a chunk no index has.
    fn loc(&self, i: usize) -> Option<ChunkLoc> {
        let (n, offset, len) = self.locs.at[i];
        (n != NOWHERE).then(|| ChunkLoc {
            pack: self.locs.packs[n as usize],
            offset: u64::from(offset),
            len,
        })
    }
}

impl Locations {
    /// Looks up every data chunk of a segment (a small volume's: [`SORTED_ABOVE`]) in sorted
    /// batches.
    fn of(repo: &Repository, chunks: &[Option<ChunkId>]) -> Locations {
        let mut packs: Vec<PackId> = Vec::new();
        let mut numbers: IdMap<PackId, u32> = IdMap::default();
        let mut at = vec![(NOWHERE, 0, 0); chunks.len()];
        repo.index.get_many_of(
            chunks.len(),
            |i| chunks[i],
            |i, loc| {
                let Some(loc) = loc else { return };
                let n = *numbers.entry(loc.pack).or_insert_with(|| {
                    packs.push(loc.pack);
                    u32::try_from(packs.len() - 1).expect("fewer than 4 G packs")
                });
                let offset = u32::try_from(loc.offset).expect("pack offsets fit in u32");
                at[i] = (n, offset, loc.len);
            },
        );
        Locations { packs, at }
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("a chunk number fits in memory")
}

/// The runs of consecutive data chunks (not holes) among `chunks[range]`.
fn data_runs(chunks: &[Option<ChunkId>], range: Range<usize>) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut i = range.start;
    while i < range.end {
        if chunks[i].is_none() {
            i += 1;
            continue;
        }
        let start = i;
        while i < range.end && chunks[i].is_some() {
            i += 1;
        }
        runs.push(start..i);
    }
    runs
}

/// Opens the target, sized and empty; whether it is a regular file (holes stay holes) and
/// whether this call created it.
fn open_target(target: &Path, size: u64, force: bool) -> Result<(File, bool, bool)> {
    let refuse = || Err(Error::TargetNotEmpty { path: target.to_owned() });
    match fs::metadata(target) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let f = OpenOptions::new().write(true).create_new(true).open(target);
            let f = f.ctx("create", target)?;
            if let Err(e) = f.set_len(size) {
                drop(f);
                let _ = fs::remove_file(target);
                return Err(e).ctx("truncate", target);
            }
            Ok((f, true, true))
        }
        Err(e) => Err(e).ctx("stat", target),
        Ok(m) if m.file_type().is_block_device() => {
            if !force {
                return refuse();
            }
            Ok((OpenOptions::new().write(true).open(target).ctx("open", target)?, false, false))
        }
        Ok(m) if m.is_file() => {
            if m.len() > 0 && !force {
                return refuse();
            }
            let f = OpenOptions::new().write(true).open(target).ctx("open", target)?;
            // Emptying first makes every hole in the restored volume a real hole.
            f.set_len(0).ctx("truncate", target)?;
            f.set_len(size).ctx("truncate", target)?;
            Ok((f, true, false))
        }
        Ok(_) => Err(Error::Io {
            op: "restore to",
            path: target.to_owned(),
            source: std::io::Error::new(ErrorKind::InvalidInput, "not a file or block device"),
        }),
    }
}
