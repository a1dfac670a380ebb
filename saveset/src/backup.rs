//! Backing up one volume (a file or block device, typically a snapshot): fixed-size chunks,
//! holes from SEEK_DATA/SEEK_HOLE and all-zero chunks, dedup against the index, packs, then the
//! manifest. A pipeline: this thread reads and hashes, `WORKERS` threads compress and seal new
//! chunks, one thread assembles and stores packs; bounded channels keep memory bounded. With a
//! parent and a change map, chunks outside the changed ranges are taken from the parent
//! unread, and a random sample of them is re-read and compared (the sampling verify).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stillpoint_sys::{advise, next_data, next_hole, Advice};

use crate::changes::ChangeMap;
use crate::chunklist::{PageBuilder, ParentEntries};
use crate::claims::{Claimed, Claims, CopyToken};
use crate::error::{Error, IoContext, Result};
use crate::index::IdSet;
use crate::lock::{WriterLock, LOCK_REFRESH};
use crate::manifest::{ChunkId, ChunkList, Manifest, ManifestId, VolumeManifest, VolumeMeta};
use crate::repo::{now_ms, PackWriter, Repository};

/// The share of skipped chunks the sampling verify re-reads by default, in percent.
pub const DEFAULT_SAMPLE_PERCENT: f64 = 1.0;
/// The sampling verify reads at least this many chunks (or every skipped one, if fewer)...
const SAMPLE_MIN_CHUNKS: u64 = 64;
/// ...and at most this many bytes, unless asked for 100%.
const SAMPLE_MAX_BYTES: u64 = 64 << 20;

/// Threads compressing and sealing new chunks.
const WORKERS: usize = 2;
/// Chunks per message between the stages.
const BATCH: usize = 32;
/// Messages queued per channel: with 4 KiB chunks, 256 KiB of plaintext and as much sealed.
/// Kept short so that what progress reports is close to what is durable (plus the open pack).
const IN_FLIGHT: usize = 2;
/// Bytes read from the source by one read (data regions only).
const READ_WINDOW: usize = 1 << 20;
/// How long a copy waits, before writing its manifest, for chunks a sibling copy claimed to be
/// written (`claims.rs`); then it stores what is still missing itself.
const SIBLING_WAIT: Duration = Duration::from_secs(10);
/// Chunks this backup sent for storing are remembered until the index has them (their pack is
/// stored); the set is trimmed to those still in flight when it reaches this size (or twice
/// what the last trim left), so it holds a few packs' worth, not the whole volume's new chunks.
/// It is rebuilt at each trim, sized for the next: a set trimmed in place keeps its
/// tombstones, and with as many entries as a 16 GiB backup's trims leave it doubled to 8.7 MB.
const SENT_TRIM: usize = 1 << 15;
/// With a change map, bytes of changed ranges the kernel is asked to read ahead of the reader
/// (`POSIX_FADV_WILLNEED`), so scattered small ranges are read with many requests in flight
/// rather than one at a time; and the sampled chunks the sampling verify reads next.
const PREFETCH_BYTES: u64 = 8 << 20;
/// The largest piece asked for at once: a large changed range is asked for as it comes near.
const PREFETCH_PIECE: u64 = 1 << 20;

/// Chunks between the stages, back to back in one buffer: from the reader their plaintexts,
/// from the workers the same chunks compressed and sealed. One allocation per batch, not three
/// per chunk.
#[derive(Default)]
struct Batch {
    ids: Vec<ChunkId>,
    /// Each chunk's length in `bytes`, in order.
    lens: Vec<u32>,
    bytes: Vec<u8>,
}

impl Batch {
    fn with_capacity(chunks: usize, bytes: usize) -> Self {
        Batch {
            ids: Vec::with_capacity(chunks),
            lens: Vec::with_capacity(chunks),
            bytes: Vec::with_capacity(bytes),
        }
    }

    fn push(&mut self, id: ChunkId, data: &[u8]) {
        self.ids.push(id);
        self.lens.push(u32::try_from(data.len()).expect("a chunk is far below 4 GiB"));
        self.bytes.extend_from_slice(data);
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    /// The chunks: `(id, bytes)` in order.
    fn iter(&self) -> impl Iterator<Item = (ChunkId, &[u8])> {
        let mut at = 0usize;
        self.ids.iter().zip(&self.lens).map(move |(&id, &len)| {
            let chunk = &self.bytes[at..at + len as usize];
            at += len as usize;
            (id, chunk)
        })
    }
}

/// How far a backup has got, in logical bytes of the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// What one volume backup read and stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BackupStats {
    /// Logical size of the volume.
    pub size: u64,
    /// Bytes actually read to back it up (holes and chunks taken from the parent are not; the
    /// sampling verify's re-reads are counted in `sampled_chunks`, not here).
    pub bytes_read: u64,
    /// Bytes not read because the change map said they had not changed since the parent.
    pub bytes_skipped: u64,
    /// The change map used: `fiemap: N ranges, X bytes` or `qcow2: ...` (the map's source),
    /// `unknown: why` or `none` (with why when a base was expected); several volumes' joined
    /// by `; `.
    pub change_map: String,
    /// Skipped chunks re-read by the sampling verify.
    pub sampled_chunks: u64,
    /// Of those, how many differed from the parent: the map was wrong (the volume was then
    /// read whole).
    pub sample_mismatches: u64,
    /// Chunks recorded as holes (unallocated or all zeros).
    pub hole_chunks: u64,
    /// Chunks already in the repository (or earlier in this backup).
    pub reused_chunks: u64,
    /// Chunks stored by this backup.
    pub new_chunks: u64,
    /// Bytes written to packs (compressed, sealed).
    pub bytes_stored: u64,
    /// Packs written.
    pub packs: u64,
    /// Bytes of metadata this backup added: its chunk list pages (plaintext) and its manifest
    /// file. A backup of an unchanged volume adds its manifest only (FORMAT.md, "Chunk list
    /// pages").
    pub metadata_bytes: u64,
}

impl BackupStats {
    /// Whether every chunk was taken from the parent unread and the sample matched: the
    /// volume holds exactly what the parent holds.
    pub fn read_nothing(&self) -> bool {
        self.bytes_read == 0 && self.sample_mismatches == 0 && self.bytes_skipped == self.size
    }
}

impl std::ops::AddAssign<&BackupStats> for BackupStats {
    /// Sums the stats of several volumes (a server's copy).
    fn add_assign(&mut self, one: &BackupStats) {
        self.size += one.size;
        self.bytes_read += one.bytes_read;
        self.bytes_skipped += one.bytes_skipped;
        self.sampled_chunks += one.sampled_chunks;
        self.sample_mismatches += one.sample_mismatches;
        if self.change_map.is_empty() {
            self.change_map.clone_from(&one.change_map);
        } else if !one.change_map.is_empty() {
            self.change_map = format!("{}; {}", self.change_map, one.change_map);
        }
        self.hole_chunks += one.hole_chunks;
        self.reused_chunks += one.reused_chunks;
        self.new_chunks += one.new_chunks;
        self.bytes_stored += one.bytes_stored;
        self.packs += one.packs;
        self.metadata_bytes += one.metadata_bytes;
    }
}

/// A volume's previous backup and what may have changed since: chunks outside `changed` are
/// taken from `manifest` without being read.
#[derive(Clone, Debug)]
pub struct Parent {
    /// The parent's volume manifest: what the base the map was computed against holds.
    pub manifest: ManifestId,
    pub changed: ChangeMap,
    /// Percent of the skipped chunks re-read and compared with the parent (at least 64
    /// chunks, at most 64 MiB, all of them at 100); 0 disables the sampling verify.
    pub sample_percent: f64,
}

impl Parent {
    /// A parent with the default sampling verify.
    pub fn new(manifest: ManifestId, changed: ChangeMap) -> Self {
        Parent { manifest, changed, sample_percent: DEFAULT_SAMPLE_PERCENT }
    }

    /// A parent only for the chunk list: its pages are shared or diffed against, but no change
    /// map was asked for, so everything is read and the stats say `none` (not `unknown`).
    pub fn pages_only(manifest: ManifestId) -> Self {
        Parent::new(manifest, ChangeMap::Unknown(String::new()))
    }

    /// Whether this is [`Parent::pages_only`]: an unknown map with no reason.
    fn is_pages_only(&self) -> bool {
        matches!(&self.changed, ChangeMap::Unknown(why) if why.is_empty())
    }
}

/// Chunks a sibling copy is storing: (id, offset, length), made sure of before the manifest.
type Deferred = Vec<(ChunkId, u64, usize)>;

/// What a pass with a parent skips: the changed chunk ranges and the parent's entries.
struct Skip<'a> {
    /// Sorted, disjoint ranges of chunk indices to read.
    changed: &'a [Range<u64>],
    entries: ParentEntries<'a>,
    sample: Sampler,
    /// Reads the changed ranges ahead of the reader (`None` when every chunk is read).
    prefetch: Option<Prefetch<'a>>,
}

/// Asks the kernel to read a change map's ranges ahead of the reader, at most
/// [`PREFETCH_BYTES`] beyond it, and turns the file's readahead off: a map of scattered 4 KiB
/// changes read one `pread` at a time waits for each on the device, and readahead would read
/// around each what the map says did not change. Hints only: their errors are ignored.
struct Prefetch<'a> {
    file: &'a File,
    ahead: Ahead<'a>,
    chunk_size: u64,
    pieces: Vec<Range<u64>>,
}

impl<'a> Prefetch<'a> {
    fn new(file: &'a File, ranges: &'a [Range<u64>], chunks: u64, chunk_size: u32) -> Self {
        let _ = advise(file, 0, 0, Advice::Random);
        let chunk_size = u64::from(chunk_size.max(1));
        let ahead =
            Ahead::new(ranges, chunks, PREFETCH_BYTES / chunk_size, PREFETCH_PIECE / chunk_size);
        Prefetch { file, ahead, chunk_size, pieces: Vec::new() }
    }

    /// The reader is at chunk `reader`: asks for what follows, up to the limit.
    fn advance(&mut self, reader: u64) {
        self.ahead.next(reader, &mut self.pieces);
        for p in self.pieces.drain(..) {
            let (off, len) = (p.start * self.chunk_size, (p.end - p.start) * self.chunk_size);
            let _ = advise(self.file, off, len, Advice::WillNeed);
        }
    }

    /// Back to the kernel's usual readahead (for a pass that reads every chunk).
    fn finish(self) {
        let _ = advise(self.file, 0, 0, Advice::Normal);
    }
}

/// Which changed chunks to ask for next (pure, for [`Prefetch`]): pieces of the map's ranges,
/// in order, each asked for once, none behind the reader, at most `limit` chunks ahead of it.
struct Ahead<'a> {
    /// Sorted, disjoint ranges of chunk indices (the map's).
    ranges: &'a [Range<u64>],
    chunks: u64,
    limit: u64,
    piece: u64,
    /// The next range to ask for, and the first chunk of it not asked for yet.
    at: usize,
    from: u64,
    /// Changed chunks asked for (or passed by the reader first) so far.
    asked: u64,
    /// The first range the reader has not passed, and the changed chunks before it.
    passed: usize,
    passed_chunks: u64,
}

impl<'a> Ahead<'a> {
    fn new(ranges: &'a [Range<u64>], chunks: u64, limit: u64, piece: u64) -> Self {
        Ahead {
            ranges,
            chunks,
            limit: limit.max(1),
            piece: piece.max(1),
            at: 0,
            from: 0,
            asked: 0,
            passed: 0,
            passed_chunks: 0,
        }
    }

    fn len(&self, r: &Range<u64>) -> u64 {
        r.end.min(self.chunks).saturating_sub(r.start)
    }

    /// The reader is at chunk `reader`: adds the pieces to ask for now to `out`.
    fn next(&mut self, reader: u64, out: &mut Vec<Range<u64>>) {
        while let Some(r) = self.ranges.get(self.passed).filter(|r| r.end <= reader) {
            self.passed_chunks += self.len(r);
            self.passed += 1;
        }
        let inside = self
            .ranges
            .get(self.passed)
            .map_or(0, |r| reader.saturating_sub(r.start).min(self.len(r)));
        let read = self.passed_chunks + inside;
        while self.asked.saturating_sub(read) < self.limit {
            let Some(r) = self.ranges.get(self.at) else { return };
            let end = r.end.min(self.chunks);
            let lo = r.start.max(self.from);
            let room = self.limit - self.asked.saturating_sub(read);
            let hi = end.min(lo + self.piece.min(room));
            // Chunks the reader already passed are not asked for, but count as asked.
            let ask = lo.max(reader);
            if ask < hi {
                out.push(ask..hi);
            }
            self.asked += hi.saturating_sub(lo);
            if hi >= end {
                self.at += 1;
                self.from = 0;
            } else {
                self.from = hi;
            }
        }
    }
}

/// A uniform random sample of the skipped chunks, drawn while reading, in memory bounded by its
/// size: reservoir sampling with skips (Li's algorithm L), so that a run of skipped chunks costs
/// a few random draws, not one per chunk (an unchanged 16 GiB volume is 4 M chunks).
struct Sampler {
    want: usize,
    /// Items offered so far.
    seen: u64,
    /// (offset, length, the parent's entry).
    picked: Vec<(u64, usize, Option<ChunkId>)>,
    rng: u64,
    /// Algorithm L's state once the reservoir is full: `w`, and the number of the next item
    /// that goes in (counted from 1, like `seen`).
    w: f64,
    next: u64,
}

impl Sampler {
    fn new(want: usize) -> Self {
        let seed = u64::from_le_bytes(crate::crypto::random::<8>());
        Sampler::seeded(want, seed)
    }

    fn seeded(want: usize, seed: u64) -> Self {
        let picked = Vec::with_capacity(want.min(1 << 16));
        Sampler { want, seen: 0, picked, rng: seed, w: 1.0, next: u64::MAX }
    }

    fn offer(&mut self, item: (u64, usize, Option<ChunkId>)) {
        self.offer_run(1, |_| item);
    }

    /// Offers `count` items at once, `item(k)` the k-th; only those that go in are made.
    #[allow(clippy::cast_precision_loss)]
    fn offer_run(&mut self, count: usize, item: impl Fn(usize) -> (u64, usize, Option<ChunkId>)) {
        if self.want == 0 {
            return;
        }
        let mut k = 0;
        while k < count && self.picked.len() < self.want {
            self.picked.push(item(k));
            self.seen += 1;
            k += 1;
            if self.picked.len() == self.want {
                self.w = (self.uniform().ln() / self.want as f64).exp();
                self.skip_ahead();
            }
        }
        while k < count {
            let left = (count - k) as u64;
            if self.next > self.seen + left {
                self.seen += left;
                return;
            }
            k += usize::try_from(self.next - self.seen - 1).expect("inside the run");
            self.seen = self.next;
            let slot = usize::try_from(self.next_u64() % self.want as u64).expect("a slot");
            self.picked[slot] = item(k);
            k += 1;
            self.w *= (self.uniform().ln() / self.want as f64).exp();
            self.skip_ahead();
        }
    }

    /// Draws how many items pass before the next one goes in.
    fn skip_ahead(&mut self) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let skip = (self.uniform().ln() / (1.0 - self.w).ln()).floor() as u64;
        self.next = self.seen.saturating_add(skip).saturating_add(1);
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let x = (self.next_u64() >> 11) as f64;
        (x + 0.5) / (1u64 << 53) as f64
    }

    /// splitmix64: statistical quality is all a sample needs.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// How many skipped chunks to sample out of `skipped`.
fn sample_size(skipped: u64, percent: f64, chunk_size: u32) -> u64 {
    if percent.is_nan() || percent <= 0.0 || skipped == 0 {
        return 0;
    }
    if percent >= 100.0 {
        return skipped;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let share = (skipped as f64 * percent / 100.0).ceil() as u64;
    let most = (SAMPLE_MAX_BYTES / u64::from(chunk_size.max(1))).max(SAMPLE_MIN_CHUNKS);
    share.max(SAMPLE_MIN_CHUNKS).min(most).min(skipped)
}

/// The result of [`Repository::backup_volume`].
#[derive(Clone, Debug)]
pub struct VolumeBackup {
    pub id: ManifestId,
    pub manifest: VolumeManifest,
    pub stats: BackupStats,
}

impl Repository {
    /// Backs up `source` (a regular file or block device) and writes its volume manifest.
    ///
    /// Packs and their index files are durable before the manifest that references them is
    /// written, so a crash at any point leaves a valid repository, and a rerun reuses every
    /// chunk whose pack was completed. `progress` is called after every chunk, on this thread.
    pub fn backup_volume(
        &mut self,
        source: &Path,
        meta: VolumeMeta,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<VolumeBackup> {
        self.backup_volume_with(source, meta, None, progress)
    }

    /// [`Repository::backup_volume`] as the next backup of the volume whose previous backup is
    /// the volume manifest `parent`, with no change map: every chunk is read, and the chunk
    /// list's pages are shared with the parent's or written as deltas against them (FORMAT.md,
    /// "Chunk list pages").
    pub fn backup_volume_child(
        &mut self,
        source: &Path,
        meta: VolumeMeta,
        parent: Option<ManifestId>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<VolumeBackup> {
        // No map asked for (an empty reason): the stats say `none`, as without a parent.
        let parent = parent.map(Parent::pages_only);
        self.backup_volume_with(source, meta, parent.as_ref(), progress)
    }

    /// [`Repository::backup_volume`], reading only what `parent`'s change map says may have
    /// changed and taking every other chunk from the parent's manifest. The parent is ignored
    /// (and the stats say why) when its map is unknown, its manifest cannot be read, or its
    /// size or chunk size differ. Then a sample of the skipped chunks is re-read: if any differs
    /// from the parent, the map was wrong and the volume is read again whole, so the manifest
    /// is right either way. With or without a map, the chunk list's pages are shared with the
    /// parent's where they did not change (FORMAT.md, "Chunk list pages").
    pub fn backup_volume_with(
        &mut self,
        source: &Path,
        meta: VolumeMeta,
        parent: Option<&Parent>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<VolumeBackup> {
        // Held from before the index is loaded until the manifest is written: a prune deletes
        // no pack this backup may have deduplicated against meanwhile (FORMAT.md, "Prune").
        let lock = WriterLock::take(Arc::clone(&self.storage), &self.key, LOCK_REFRESH)?;
        self.refresh_index()?;
        let mut file = File::open(source).ctx("open", source)?;
        let size = file.seek(SeekFrom::End(0)).ctx("seek", source)?;
        let mut manifest = VolumeManifest {
            meta,
            size,
            chunk_size: self.chunk_size(),
            chunks: ChunkList::Flat(Vec::new()),
            created_unix_ms: 0,
        };
        let n = manifest.chunk_count();
        let mut stats = BackupStats { size, change_map: "none".into(), ..BackupStats::default() };
        let claim = self.claims.clone().map(|claims| ClaimGuard { token: claims.begin(), claims });
        let token = claim.as_ref().map(|g| (&*g.claims, g.token));
        // Chunks a sibling copy is storing: referenced now, made sure of before the manifest.
        let mut deferred = Vec::new();
        let usable = match parent {
            Some(p) => self.usable_parent(p, size, source),
            None => Err("none".to_string()),
        };
        // The parent's manifest, loaded once: its pages are shared where nothing changed,
        // whether or not its change map is usable.
        let (usable, page_parent) = match usable {
            Ok((p, m, changed)) => (Ok((p, changed)), Some(m)),
            Err(why) => {
                let loaded = parent.and_then(|p| match self.load_manifest(p.manifest) {
                    Ok(Manifest::Volume(m))
                        if m.size == size && m.chunk_size == manifest.chunk_size =>
                    {
                        Some(m)
                    }
                    _ => None,
                });
                (Err(why), loaded)
            }
        };
        let mut pages = PageBuilder::new(n, page_parent.as_ref());
        let mut whole = true;
        match usable {
            Err(why) => stats.change_map = why,
            Ok((p, changed)) => {
                let parent_manifest = page_parent.as_ref().expect("a usable parent was loaded");
                stats.change_map = p.changed.describe();
                let read: u64 = changed.iter().map(|r| r.end.min(n) - r.start.min(n)).sum();
                let want = sample_size(n - read, p.sample_percent, manifest.chunk_size);
                let entries = ParentEntries::new(self, parent_manifest);
                let failed = entries.failed();
                let mut skip = Skip {
                    changed: &changed,
                    entries,
                    sample: Sampler::new(usize::try_from(want).unwrap_or(usize::MAX)),
                    prefetch: Some(Prefetch::new(&file, &changed, n, manifest.chunk_size)),
                };
                self.read_pass(
                    &file,
                    source,
                    &manifest,
                    &mut pages,
                    &mut stats,
                    (token, &mut deferred),
                    Some(&mut skip),
                    progress,
                )?;
                let mut picked = std::mem::take(&mut skip.sample.picked);
                picked.sort_unstable_by_key(|&(off, _, _)| off);
                let wrong = self.sample_differs(&file, source, &picked)?;
                if let Some(prefetch) = skip.prefetch.take() {
                    prefetch.finish();
                }
                stats.sampled_chunks = picked.len() as u64;
                stats.sample_mismatches = wrong;
                let unread = failed.take();
                whole = wrong > 0 || unread.is_some();
                if let Some(why) = unread {
                    tracing::warn!(
                        source = %source.display(),
                        parent = %p.manifest,
                        "the parent's chunk list did not read ({why}); read the whole volume"
                    );
                    stats.change_map = format!(
                        "{} (parent's list did not read; whole volume read)",
                        stats.change_map
                    );
                } else if wrong > 0 {
                    tracing::warn!(
                        source = %source.display(),
                        parent = %p.manifest,
                        "change map wrong: {wrong} of {} sampled chunks differ; read the whole volume",
                        picked.len()
                    );
                    stats.change_map = format!(
                        "{} (wrong: {wrong} of {} sampled chunks differ; whole volume read)",
                        stats.change_map,
                        picked.len()
                    );
                }
            }
        }
        if whole {
            // Without a usable map, or again after a wrong one: chunks the first pass stored
            // are found in the index now, so they count as new once, not twice.
            let first = std::mem::take(&mut stats);
            let first_pages = pages.stored_bytes;
            pages = PageBuilder::new(n, page_parent.as_ref());
            pages.stored_bytes = first_pages;
            let mut fresh = BackupStats { size, ..BackupStats::default() };
            // Every chunk is read; each one the parent holds at the same place needs no lookup.
            let all = 0..n;
            let everything = std::slice::from_ref(&all);
            let mut same = page_parent.as_ref().map(|m| Skip {
                changed: everything,
                entries: ParentEntries::new(self, m),
                sample: Sampler::new(0),
                prefetch: None,
            });
            self.read_pass(
                &file,
                source,
                &manifest,
                &mut pages,
                &mut fresh,
                (token, &mut deferred),
                same.as_mut(),
                progress,
            )?;
            fresh.reused_chunks = fresh.reused_chunks.saturating_sub(first.new_chunks);
            fresh.new_chunks += first.new_chunks;
            fresh.bytes_read += first.bytes_read;
            fresh.bytes_stored += first.bytes_stored;
            fresh.packs += first.packs;
            fresh.change_map = first.change_map;
            fresh.sampled_chunks = first.sampled_chunks;
            fresh.sample_mismatches = first.sample_mismatches;
            stats = fresh;
        }
        if let Some(guard) = &claim {
            if !deferred.is_empty() {
                // Once per chunk, wherever it repeats.
                deferred.sort_unstable_by_key(|&(id, off, _)| (id, off));
                deferred.dedup_by_key(|&mut (id, _, _)| id);
                let ids: Vec<ChunkId> = deferred.iter().map(|&(id, _, _)| id).collect();
                let missing: IdSet<ChunkId> = guard
                    .claims
                    .wait(&ids, Instant::now() + SIBLING_WAIT, |id| self.index.contains_key(id))
                    .into_iter()
                    .collect();
                deferred.retain(|(id, _, _)| missing.contains(id));
                self.store_again(&file, source, &deferred, &mut stats)?;
            }
        }
        stats.metadata_bytes = pages.stored_bytes;
        manifest.chunks = pages.finish();
        manifest.created_unix_ms = now_ms();
        let whole = Manifest::Volume(manifest);
        lock.check()?;
        let (id, manifest_bytes) = self.write_manifest_sized(&whole)?;
        stats.metadata_bytes += manifest_bytes;
        drop(lock);
        let Manifest::Volume(manifest) = whole else { unreachable!("built as a volume manifest") };
        tracing::debug!(manifest = %id, source = %source.display(), ?stats, "volume backed up");
        Ok(VolumeBackup { id, manifest, stats })
    }

    /// The parent's manifest and its changed chunk ranges, or why it cannot be used (the
    /// `change_map` text then).
    fn usable_parent<'p>(
        &self,
        parent: &'p Parent,
        size: u64,
        source: &Path,
    ) -> std::result::Result<(&'p Parent, VolumeManifest, Vec<Range<u64>>), String> {
        let ignored = |why: String| {
            tracing::info!(source = %source.display(), parent = %parent.manifest, "change map not used: {why}; reading the whole volume");
            why
        };
        let Some(changed) = parent.changed.chunk_ranges(self.chunk_size()) else {
            if parent.is_pages_only() {
                return Err("none".to_string());
            }
            return Err(ignored(parent.changed.describe()));
        };
        let manifest = match self.load_manifest(parent.manifest) {
            Ok(Manifest::Volume(m)) => m,
            Ok(Manifest::Backup(_)) => {
                return Err(ignored(format!(
                    "none: parent {} is a backup manifest",
                    parent.manifest
                )))
            }
            Err(e) => return Err(ignored(format!("none: parent {}: {e}", parent.manifest))),
        };
        if manifest.size != size || manifest.chunk_size != self.chunk_size() {
            return Err(ignored(format!(
                "none: parent {} has size {} and chunk size {}, the volume {} and {}",
                parent.manifest,
                manifest.size,
                manifest.chunk_size,
                size,
                self.chunk_size()
            )));
        }
        Ok((parent, manifest, changed))
    }

    /// Reads the sampled chunks again and counts those that differ from the parent's entry
    /// (an id, or `None` for a chunk that must read as zeros).
    fn sample_differs(
        &self,
        file: &File,
        source: &Path,
        picked: &[(u64, usize, Option<ChunkId>)],
    ) -> Result<u64> {
        let mut data = vec![0u8; self.chunk_size() as usize];
        let mut wrong = 0;
        // Each `PREFETCH_BYTES` of the sample is asked for while the one before is read.
        let batch = usize::try_from(PREFETCH_BYTES / u64::from(self.chunk_size().max(1)))
            .unwrap_or(usize::MAX)
            .max(1);
        let ask = |from: usize| {
            for &(off, len, _) in picked.iter().skip(from).take(batch) {
                let _ = advise(file, off, len as u64, Advice::WillNeed);
            }
        };
        ask(0);
        for (i, &(off, len, entry)) in picked.iter().enumerate() {
            if i % batch == 0 {
                ask(i + batch);
            }
            let data = &mut data[..len];
            file.read_exact_at(data, off).ctx("read", source)?;
            let now = if is_zero(data) { None } else { Some(ChunkId(self.key.chunk_id(data))) };
            if now != entry {
                wrong += 1;
            }
        }
        Ok(wrong)
    }

    /// One pass of the reader over the volume with its pipeline; the packs it stored are
    /// indexed (as each became durable) even when reading failed.
    #[allow(clippy::too_many_arguments)]
    fn read_pass(
        &self,
        file: &File,
        source: &Path,
        manifest: &VolumeManifest,
        pages: &mut PageBuilder<'_>,
        stats: &mut BackupStats,
        (token, deferred): (Option<(&Claims, CopyToken)>, &mut Deferred),
        skip: Option<&mut Skip<'_>>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let (read, stored) = self.pipeline(|feed| {
            self.read_chunks(
                file, source, manifest, pages, stats, token, deferred, skip, feed, progress,
            )
        });
        let (packs, bytes_stored) = stored?;
        stats.packs += packs;
        stats.bytes_stored += bytes_stored;
        // Stored packs are valid and reusable even when reading failed: the storer indexed each
        // as soon as it was durable.
        read
    }

    /// Runs the pipeline behind a reader: `WORKERS` threads seal the chunks `feed` pushes (the
    /// last partial batch is sent when it returns), a packer stores packs. Returns what `feed`
    /// returned and the stored packs (with their bytes).
    fn pipeline<R>(&self, feed: impl FnOnce(&mut Feed) -> R) -> (R, Result<(u64, u64)>) {
        std::thread::scope(|s| {
            let (job_tx, job_rx) = sync_channel::<Batch>(IN_FLIGHT);
            let (sealed_tx, sealed_rx) = sync_channel::<Batch>(IN_FLIGHT);
            let job_rx = Arc::new(Mutex::new(job_rx));
            for _ in 0..WORKERS {
                let (rx, tx) = (Arc::clone(&job_rx), sealed_tx.clone());
                s.spawn(move || self.seal_batches(&rx, &tx));
            }
            drop(sealed_tx);
            let packer = s.spawn(move || self.store_packs(sealed_rx));
            let mut chunks = Feed::new(job_tx, self.chunk_size() as usize);
            let fed = feed(&mut chunks);
            chunks.finish();
            let stored = packer.join().expect("the pack writer does not panic");
            (fed, stored)
        })
    }

    /// Stores chunks a sibling copy had claimed but not stored in time (it failed, or still
    /// holds them in an unwritten pack): read again from `source`, whose content must not have
    /// changed (it is a snapshot).
    fn store_again(
        &mut self,
        file: &File,
        source: &Path,
        chunks: &[(ChunkId, u64, usize)],
        stats: &mut BackupStats,
    ) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let (fed, stored) = self.pipeline(|feed| -> Result<()> {
            let mut data = vec![0u8; self.chunk_size() as usize];
            for &(id, off, len) in chunks {
                file.read_exact_at(&mut data[..len], off).ctx("read", source)?;
                if ChunkId(self.key.chunk_id(&data[..len])) != id {
                    return Err(Error::Damaged {
                        what: format!("{} at offset {off}", source.display()),
                        reason: "changed while it was being copied (a snapshot cannot)".into(),
                    });
                }
                if !feed.push(id, &data[..len]) {
                    break;
                }
            }
            Ok(())
        });
        let (packs, bytes) = stored?;
        fed?;
        stats.packs += packs;
        stats.bytes_stored += bytes;
        stats.new_chunks += chunks.len() as u64;
        stats.reused_chunks -= chunks.len() as u64;
        Ok(())
    }

    /// The reader: walks the source's data regions, hashes every chunk, records holes and ids
    /// in the manifest, and sends chunks no index, earlier batch or sibling copy has to the
    /// workers; chunks a sibling is storing go to `deferred` (id, offset, length). Stops early
    /// (`Ok`) if the pipeline behind it has stopped; the packer reports why.
    #[allow(clippy::too_many_arguments)]
    fn read_chunks(
        &self,
        file: &File,
        source: &Path,
        manifest: &VolumeManifest,
        pages: &mut PageBuilder<'_>,
        stats: &mut BackupStats,
        claim: Option<(&Claims, CopyToken)>,
        deferred: &mut Vec<(ChunkId, u64, usize)>,
        mut skip: Option<&mut Skip<'_>>,
        feed: &mut Feed,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<()> {
        let cs = manifest.chunk_size as usize;
        // With a parent: the next changed range, and each chunk's entry taken unread (`Some`).
        let mut changed_at = 0usize;
        let mut taken: Vec<Option<Option<ChunkId>>> = vec![None; (READ_WINDOW / cs).max(1)];
        let n = manifest.size.div_ceil(cs as u64);
        let mut extents = Extents { file, size: manifest.size, seg: None, supported: true };
        // A kept manifest's chunks are all stored (prune keeps them, verify checks it): while no
        // pack is excluded from dedup, the parent's entries are referenced without an index
        // lookup, which costs a block read once the index no longer fits in memory.
        let trusted = !self.index.any_excluded();
        // The parent's entry at each chunk of the window, when a parent is given.
        let mut parent_at: Vec<Option<ChunkId>> = vec![None; (READ_WINDOW / cs).max(1)];
        let per_window = (READ_WINDOW / cs).max(1);
        let mut buf = vec![0u8; per_window * cs];
        let mut has_data = vec![false; per_window];
        let mut sent: IdSet<ChunkId> =
            IdSet::with_capacity_and_hasher(SENT_TRIM, Default::default());
        let mut sent_trim = SENT_TRIM;
        let mut first = 0u64;
        while first < n {
            let count = per_window.min(usize::try_from(n - first).expect("a window is small"));
            if let Some(prefetch) = skip.as_deref_mut().and_then(|s| s.prefetch.as_mut()) {
                prefetch.advance(first);
            }
            let base = first * cs as u64;
            let end = manifest.size.min(base + (count * cs) as u64);
            // A window the map says did not change at all is the parent's, taken whole.
            if let Some(skip) = skip.as_deref_mut().filter(|_| trusted) {
                while skip.changed.get(changed_at).is_some_and(|r| r.end <= first) {
                    changed_at += 1;
                }
                let window = first..first + count as u64;
                if skip.changed.get(changed_at).is_none_or(|r| r.start >= window.end) {
                    let got = skip.entries.fill(&mut parent_at[..count]);
                    parent_at[got..count].fill(None);
                    let entries = &parent_at[..count];
                    let holes = entries.iter().filter(|e| e.is_none()).count() as u64;
                    stats.hole_chunks += holes;
                    stats.reused_chunks += count as u64 - holes;
                    stats.bytes_skipped += end - base;
                    skip.sample.offer_run(count, |k| {
                        let off = base + (k * cs) as u64;
                        let len = usize::try_from(end.min(off + cs as u64) - off).expect("a chunk");
                        (off, len, entries[k])
                    });
                    if !pages.extend(self, entries, &mut |id, page| feed.push(id, page))? {
                        return Ok(());
                    }
                    progress(Progress { done: end, total: manifest.size });
                    first = window.end;
                    continue;
                }
            }
            // Which chunks the parent gives unread, which hold data, then one read per run.
            for (j, h) in has_data[..count].iter_mut().enumerate() {
                let off = base + (j * cs) as u64;
                parent_at[j] = None;
                taken[j] = skip.as_deref_mut().and_then(|skip| {
                    let i = first + j as u64;
                    let entry = skip.entries.next().flatten();
                    parent_at[j] = entry;
                    while skip.changed.get(changed_at).is_some_and(|r| r.end <= i) {
                        changed_at += 1;
                    }
                    if skip.changed.get(changed_at).is_some_and(|r| r.start <= i) {
                        return None;
                    }
                    // A parent's chunk the index lacks (its pack marked by a prune) is read.
                    let known = entry.is_none_or(|id| trusted || self.index.contains_key(&id));
                    known.then_some(entry)
                });
                *h = taken[j].is_none() && extents.has_data(off, end.min(off + cs as u64));
            }
            let mut j = 0;
            while j < count {
                if !has_data[j] {
                    j += 1;
                    continue;
                }
                let k = (j..count).find(|&k| !has_data[k]).unwrap_or(count);
                let from = base + (j * cs) as u64;
                let to = end.min(base + (k * cs) as u64);
                let len = usize::try_from(to - from).expect("inside the window");
                file.read_exact_at(&mut buf[j * cs..j * cs + len], from).ctx("read", source)?;
                stats.bytes_read += len as u64;
                j = k;
            }
            for (j, &h) in has_data[..count].iter().enumerate() {
                let off = base + (j * cs) as u64;
                let len = usize::try_from(end.min(off + cs as u64) - off).expect("a chunk");
                let data = &buf[j * cs..j * cs + len];
                let entry = if let Some(entry) = taken[j] {
                    stats.bytes_skipped += len as u64;
                    if entry.is_some() {
                        stats.reused_chunks += 1;
                    } else {
                        stats.hole_chunks += 1;
                    }
                    if let Some(skip) = skip.as_deref_mut() {
                        skip.sample.offer((off, len, entry));
                    }
                    entry
                } else if !h || is_zero(data) {
                    stats.hole_chunks += 1;
                    None
                } else {
                    let id = ChunkId(self.key.chunk_id(data));
                    // With a pool, its claims also remember what this copy sent.
                    let claimed = if trusted && parent_at[j] == Some(id) {
                        // What the parent holds at this place: stored, no lookup needed.
                        Claimed::Stored
                    } else if self.index.contains_key(&id) {
                        Claimed::Stored
                    } else if let Some((claims, token)) = claim {
                        claims.claim(id, token)
                    } else if sent.insert(id) {
                        if sent.len() >= sent_trim {
                            // The old table is freed before the new one is made. Looked up
                            // in id order, each index block holding them is read once (one
                            // lookup each read a block of a run on disk per id).
                            let mut ids: Vec<ChunkId> =
                                std::mem::take(&mut sent).into_iter().collect();
                            ids.sort_unstable();
                            let mut lookup = self.index.sorted();
                            let keep: Vec<ChunkId> =
                                ids.into_iter().filter(|id| !lookup.contains_key(id)).collect();
                            drop(lookup);
                            sent_trim = (keep.len() * 2).max(SENT_TRIM);
                            sent = IdSet::with_capacity_and_hasher(sent_trim, Default::default());
                            sent.extend(keep);
                        }
                        Claimed::Mine
                    } else {
                        Claimed::Again
                    };
                    if claimed != Claimed::Mine {
                        stats.reused_chunks += 1;
                        if claimed == Claimed::Pending {
                            deferred.push((id, off, len));
                        }
                    } else {
                        stats.new_chunks += 1;
                        if !feed.push(id, data) {
                            return Ok(());
                        }
                    }
                    Some(id)
                };
                if !pages.push(self, entry, &mut |id, page| feed.push(id, page))? {
                    return Ok(());
                }
                progress(Progress { done: off + len as u64, total: manifest.size });
            }
            first += count as u64;
        }
        Ok(())
    }

    /// A worker: compresses and seals batches until the reader is done or the packer stopped.
    fn seal_batches(&self, jobs: &Mutex<Receiver<Batch>>, sealed: &SyncSender<Batch>) {
        let mut zc = zstd::bulk::Compressor::new(self.zstd_level())
            .expect("a zstd level within 1..=22 is valid");
        let mut sealer = self.key.chunk_sealer();
        loop {
            let Ok(batch) = jobs.lock().expect("no worker panics holding it").recv() else {
                return;
            };
            let mut out = Batch::with_capacity(batch.len(), batch.bytes.len() + batch.len() * 64);
            for (id, data) in batch.iter() {
                let at = out.bytes.len();
                self.encode_chunk_into(&mut zc, &mut sealer, id, data, &mut out.bytes);
                out.ids.push(id);
                out.lens
                    .push(u32::try_from(out.bytes.len() - at).expect("a sealed chunk is small"));
            }
            if sealed.send(out).is_err() {
                return;
            }
        }
    }

    /// The packer: appends sealed chunks to packs and hands each pack that reaches
    /// `pack_size` (and the last one when the workers are done) to a storer thread, which
    /// stores it (then its index) while the next one fills: fsync/PUT overlaps compression.
    /// Returns the stored packs and the bytes of chunks in them; on an error it stops, which
    /// stops the pipeline.
    fn store_packs(&self, sealed: Receiver<Batch>) -> Result<(u64, u64)> {
        std::thread::scope(|s| {
            // A full pack is handed over when the storer is free (a rendezvous): one pack being
            // stored while the next fills, two pack buffers in all (a queued third bought no
            // speed and cost 17 MiB of peak memory). Stored packs' buffers come back for reuse.
            let (full_tx, full_rx) = sync_channel::<PackWriter>(0);
            let (empty_tx, empty_rx) = sync_channel::<Vec<u8>>(1);
            let storer = s.spawn(move || -> Result<u64> {
                let mut stored = 0u64;
                for pack in full_rx {
                    let (pack, buf) = self.store_pack(pack)?;
                    // Durable now: later chunks (and sibling copies) dedup against it.
                    self.index.add_pack(pack.id, pack.entries())?;
                    if let Some(claims) = &self.claims {
                        claims.stored(pack.chunk_ids());
                    }
                    // Only counted: its entries (48 bytes a chunk) are in the index now.
                    stored += 1;
                    let _ = empty_tx.try_send(buf);
                }
                Ok(stored)
            });
            let mut bytes = 0u64;
            // The next pack's buffer is taken only once the full one is handed over: by then
            // the storer has given back the buffer of the pack before (taking one earlier
            // allocated a third while the full pack waited for the storer).
            let mut pack = Some(self.new_pack(None));
            'batches: for batch in sealed {
                for (id, blob) in batch.iter() {
                    let filling =
                        pack.get_or_insert_with(|| self.new_pack(empty_rx.try_recv().ok()));
                    filling.append(id, blob);
                    bytes += blob.len() as u64;
                    if filling.len >= self.pack_size() {
                        let full = pack.take().expect("just filled");
                        if full_tx.send(full).is_err() {
                            break 'batches;
                        }
                    }
                }
            }
            if let Some(pack) = pack.filter(|p| !p.is_empty()) {
                let _ = full_tx.send(pack);
            }
            drop(full_tx);
            let stored = storer.join().expect("the pack storer does not panic")?;
            Ok((stored, bytes))
        })
    }
}

#[cfg(test)]
mod tests;

/// New chunks on their way to the sealing workers, a batch at a time.
struct Feed {
    jobs: SyncSender<Batch>,
    batch: Batch,
    chunk_size: usize,
}

impl Feed {
    fn new(jobs: SyncSender<Batch>, chunk_size: usize) -> Self {
        Feed { jobs, batch: Batch::with_capacity(BATCH, BATCH * chunk_size), chunk_size }
    }

    /// Adds a chunk; `false` once the pipeline behind has stopped (the packer reports why).
    fn push(&mut self, id: ChunkId, data: &[u8]) -> bool {
        self.batch.push(id, data);
        if self.batch.len() < BATCH {
            return true;
        }
        let next = Batch::with_capacity(BATCH, BATCH * self.chunk_size);
        self.jobs.send(std::mem::replace(&mut self.batch, next)).is_ok()
    }

    /// Sends the last, partial batch.
    fn finish(self) {
        if self.batch.len() > 0 {
            let _ = self.jobs.send(self.batch);
        }
    }
}

/// A copy's registration with its pool's claims, ended however the copy ends: its pending
/// claims are released so that siblings waiting on them store those chunks themselves.
struct ClaimGuard {
    claims: Arc<Claims>,
    token: CopyToken,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.claims.end(self.token);
    }
}

/// The source's data regions, from SEEK_DATA/SEEK_HOLE (everything is data where unsupported).
struct Extents<'a> {
    file: &'a File,
    size: u64,
    /// The data region at or after the last query: `[start, end)`.
    seg: Option<(u64, u64)>,
    supported: bool,
}

impl Extents<'_> {
    /// Whether any byte of `[off, end)` is allocated.
    fn has_data(&mut self, off: u64, end: u64) -> bool {
        if !self.supported {
            return true;
        }
        if self.seg.is_none_or(|(_, e)| e <= off) {
            self.seg = match next_data(self.file, off) {
                Ok(Some(start)) => {
                    let end = next_hole(self.file, start).ok().flatten().unwrap_or(self.size);
                    Some((start, end.max(start + 1)))
                }
                Ok(None) => Some((self.size, u64::MAX)),
                Err(_) => {
                    self.supported = false;
                    return true;
                }
            };
        }
        let (start, _) = self.seg.expect("just set");
        start < end
    }
}

fn is_zero(data: &[u8]) -> bool {
    // Eight bytes at a time; the compiler vectorizes this.
    let mut words = data.chunks_exact(8);
    words.all(|w| w == [0u8; 8]) && words.remainder().iter().all(|&b| b == 0)
}
