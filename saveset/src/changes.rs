//! Change maps: which byte ranges of a snapshot may differ from the base it is compared with.
//! Made here from the two files' FIEMAP extent lists (reflink clones share an extent, at the same
//! offset, exactly where the data was not rewritten between them), or given by a provider that
//! knows (the agent's qcow2 metadata reader, its reader of LVM thin's `thin_delta`). The
//! comparison is pure and streams both lists; anything it cannot prove shared is changed, and
//! anything surprising is Unknown.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use stillpoint_sys::{fiemap, fiemap_flags as ff, FiemapExtent};

use crate::error::{IoContext, Result};

/// The environment variable naming failpoints (tests inject faults through the real binaries).
pub const FAILPOINT_ENV: &str = "STILLPOINT_FAILPOINT";
/// The failpoint that makes [`changes_between`] drop its largest range: a wrong change map the
/// sampling verify must catch.
pub const DROP_RANGE: &str = "change-map-drop-range";

/// Extents asked of the kernel per FIEMAP call.
const BATCH: u32 = 512;

/// Flags under which an extent's address proves nothing: no address yet, data stored elsewhere
/// or transformed (a compressed btrfs extent's address is the whole compressed extent's).
const UNTRUSTED: u32 = ff::UNKNOWN
    | ff::DELALLOC
    | ff::ENCODED
    | ff::DATA_ENCRYPTED
    | ff::NOT_ALIGNED
    | ff::DATA_INLINE
    | ff::DATA_TAIL;

/// Who said which bytes changed: the first word of [`ChangeMap::describe`], so stats and logs
/// name the source they trust.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapSource {
    /// The base's and the snapshot's FIEMAP extents (reflink clones).
    Fiemap,
    /// Two internal snapshots' cluster mappings in a qcow2 image (the agent's reader).
    Qcow2,
    /// Two thin LVs' block mappings in their pool (`thin_delta`, read by the agent).
    LvmThin,
}

impl MapSource {
    fn name(self) -> &'static str {
        match self {
            MapSource::Fiemap => "fiemap",
            MapSource::Qcow2 => "qcow2",
            MapSource::LvmThin => "lvm-thin",
        }
    }
}

/// Which bytes of a snapshot may differ from its base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeMap {
    /// Sorted, disjoint, non-empty byte ranges; every byte outside them is the base's.
    Ranges { source: MapSource, ranges: Vec<Range<u64>> },
    /// Nothing is known (no FIEMAP, files of different sizes or filesystems...): read all.
    Unknown(String),
}

impl ChangeMap {
    /// A short text for stats and logs: `fiemap: N ranges, X bytes` (or `qcow2: ...`,
    /// `lvm-thin: ...`, after the map's source) or `unknown: why`.
    pub fn describe(&self) -> String {
        match self {
            ChangeMap::Ranges { source, ranges } => {
                format!("{}: {} ranges, {} bytes", source.name(), ranges.len(), self.bytes())
            }
            ChangeMap::Unknown(why) => format!("unknown: {why}"),
        }
    }

    /// Whether the map says nothing changed (an unknown map is not empty).
    pub fn is_empty(&self) -> bool {
        matches!(self, ChangeMap::Ranges { ranges, .. } if ranges.iter().all(|r| r.end <= r.start))
    }

    /// Bytes inside the changed ranges (0 when unknown).
    pub fn bytes(&self) -> u64 {
        match self {
            ChangeMap::Ranges { ranges, .. } => ranges.iter().map(|r| r.end - r.start).sum(),
            ChangeMap::Unknown(_) => 0,
        }
    }

    /// The changed ranges widened to whole chunks, as sorted, disjoint ranges of chunk
    /// indices (a chunk with any changed byte is read whole); `None` when unknown.
    pub fn chunk_ranges(&self, chunk_size: u32) -> Option<Vec<Range<u64>>> {
        let ChangeMap::Ranges { ranges, .. } = self else { return None };
        let cs = u64::from(chunk_size.max(1));
        let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges.iter().filter(|r| r.end > r.start) {
            let (first, end) = (r.start / cs, r.end.div_ceil(cs));
            match out.last_mut() {
                Some(last) if last.end >= first => last.end = last.end.max(end),
                _ => out.push(first..end),
            }
        }
        Some(out)
    }
}

/// Compares the FIEMAP extent lists of `base` and `new` (files of `size` bytes, each list in
/// logical order): the ranges that may differ, or why nothing can be said. A byte is unchanged
/// when it is a hole in both, or inside an extent of each at the same physical address with
/// neither extent's address untrusted and both written or both unwritten.
pub fn compare_extents<A, B>(
    size: u64,
    base: A,
    new: B,
) -> std::result::Result<Vec<Range<u64>>, String>
where
    A: IntoIterator<Item = io::Result<FiemapExtent>>,
    B: IntoIterator<Item = io::Result<FiemapExtent>>,
{
    let mut a = Cursor::new(base.into_iter());
    let mut b = Cursor::new(new.into_iter());
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let (ka, ea) = a.at(at).map_err(|e| format!("base: {e}"))?;
        let (kb, eb) = b.at(at).map_err(|e| format!("snapshot: {e}"))?;
        let end = ea.min(eb).min(size);
        let same = match (ka, kb) {
            (Place::Hole, Place::Hole) => true,
            (Place::Data { physical: pa, flags: fa }, Place::Data { physical: pb, flags: fb }) => {
                pa == pb
                    && pa != 0
                    && (fa | fb) & UNTRUSTED == 0
                    && fa & ff::UNWRITTEN == fb & ff::UNWRITTEN
            }
            _ => false,
        };
        if !same {
            match out.last_mut() {
                Some(last) if last.end == at => last.end = end,
                _ => out.push(at..end),
            }
        }
        at = end;
    }
    Ok(out)
}

/// What a file holds at an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Hole,
    Data { physical: u64, flags: u32 },
}

/// Walks one file's extents in logical order, checking they are ordered and disjoint.
struct Cursor<I> {
    extents: I,
    current: Option<FiemapExtent>,
    /// End of the last extent taken: the next must not start before it.
    taken_end: u64,
    done: bool,
}

impl<I: Iterator<Item = io::Result<FiemapExtent>>> Cursor<I> {
    fn new(extents: I) -> Self {
        Cursor { extents, current: None, taken_end: 0, done: false }
    }

    /// What is at `at` and where that ends (always after `at`); `at` never goes backwards.
    fn at(&mut self, at: u64) -> std::result::Result<(Place, u64), String> {
        loop {
            if let Some(e) = self.current {
                let end = e.logical.saturating_add(e.length);
                if end > at {
                    if e.logical > at {
                        return Ok((Place::Hole, e.logical));
                    }
                    let physical = e.physical.wrapping_add(at - e.logical);
                    return Ok((Place::Data { physical, flags: e.flags }, end));
                }
            }
            if self.done {
                return Ok((Place::Hole, u64::MAX));
            }
            match self.extents.next() {
                None => {
                    self.done = true;
                    self.current = None;
                }
                Some(Err(e)) => return Err(format!("fiemap: {e}")),
                Some(Ok(e)) => {
                    if e.length == 0 {
                        continue;
                    }
                    if e.logical < self.taken_end {
                        return Err(format!(
                            "extents out of order or overlapping at offset {}",
                            e.logical
                        ));
                    }
                    self.taken_end = e.logical.saturating_add(e.length);
                    self.current = Some(e);
                }
            }
        }
    }
}

/// A file's extents fetched from the kernel a batch at a time.
struct Extents<'a> {
    file: &'a File,
    size: u64,
    next_from: u64,
    batch: std::vec::IntoIter<FiemapExtent>,
    done: bool,
}

impl<'a> Extents<'a> {
    fn new(file: &'a File, size: u64) -> Self {
        Extents { file, size, next_from: 0, batch: Vec::new().into_iter(), done: false }
    }
}

impl Iterator for Extents<'_> {
    type Item = io::Result<FiemapExtent>;

    fn next(&mut self) -> Option<io::Result<FiemapExtent>> {
        loop {
            if let Some(e) = self.batch.next() {
                return Some(Ok(e));
            }
            if self.done || self.next_from >= self.size {
                return None;
            }
            let mut got = Vec::with_capacity(BATCH as usize);
            let len = self.size - self.next_from;
            match fiemap(self.file, self.next_from, len, BATCH, &mut got) {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(n) => {
                    let last = got.last().copied();
                    self.done = n < BATCH as usize
                        || last.is_none_or(|e| e.flags & ff::LAST != 0 || e.length == 0);
                    if let Some(e) = last {
                        let end = e.logical.saturating_add(e.length);
                        if end <= self.next_from {
                            self.done = true;
                        }
                        self.next_from = end;
                    }
                    self.batch = got.into_iter();
                }
            }
        }
    }
}

/// Which byte ranges of snapshot `new` may differ from `base`, from their shared extents.
/// Errors only when a file cannot be opened or examined; everything else that stops a proof
/// (no FIEMAP, different sizes or filesystems, odd extent lists) is [`ChangeMap::Unknown`].
pub fn changes_between(base: &Path, new: &Path) -> Result<ChangeMap> {
    let b = File::open(base).ctx("open", base)?;
    let n = File::open(new).ctx("open", new)?;
    changes_between_files((&b, base), (&n, new))
}

/// [`changes_between`] on files already open (the base store checks the identity of the very
/// file it compares); the paths are for messages.
pub fn changes_between_files(base: (&File, &Path), new: (&File, &Path)) -> Result<ChangeMap> {
    let bm = base.0.metadata().ctx("stat", base.1)?;
    let nm = new.0.metadata().ctx("stat", new.1)?;
    if !bm.is_file() || !nm.is_file() {
        return Ok(ChangeMap::Unknown("not regular files (FIEMAP maps files)".into()));
    }
    if bm.len() != nm.len() {
        return Ok(ChangeMap::Unknown(format!(
            "sizes differ: base {} bytes, snapshot {} bytes",
            bm.len(),
            nm.len()
        )));
    }
    if bm.dev() != nm.dev() && !same_btrfs(base.0, new.0) {
        return Ok(ChangeMap::Unknown("base and snapshot are on different filesystems".into()));
    }
    let size = nm.len();
    let map = match compare_extents(size, Extents::new(base.0, size), Extents::new(new.0, size)) {
        Ok(ranges) => ChangeMap::Ranges { source: MapSource::Fiemap, ranges },
        Err(why) => ChangeMap::Unknown(why),
    };
    Ok(failpoint(map))
}

/// Two subvolumes of one btrfs filesystem have different `st_dev` but one address space.
fn same_btrfs(a: &File, b: &File) -> bool {
    match (stillpoint_sys::btrfs_fsid(a), stillpoint_sys::btrfs_fsid(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// `STILLPOINT_FAILPOINT=change-map-drop-range`: the largest range is dropped (a wrong map).
/// Every maker of maps passes its maps through here, so one failpoint tests them all.
pub fn failpoint(map: ChangeMap) -> ChangeMap {
    let armed =
        std::env::var(FAILPOINT_ENV).is_ok_and(|v| v.split(',').any(|f| f.trim() == DROP_RANGE));
    match map {
        ChangeMap::Ranges { source, mut ranges } if armed && !ranges.is_empty() => {
            let (i, _) =
                ranges.iter().enumerate().max_by_key(|(_, r)| r.end - r.start).expect("not empty");
            let dropped = ranges.remove(i);
            tracing::warn!(
                failpoint = DROP_RANGE,
                start = dropped.start,
                end = dropped.end,
                "failpoint: dropped the largest changed range from the change map"
            );
            ChangeMap::Ranges { source, ranges }
        }
        map => map,
    }
}

#[cfg(test)]
mod tests;
