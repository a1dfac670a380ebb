//! An external sort of fixed-size records: inserted in any order, read back sorted and
//! distinct. Memory is bounded by a budget: a full buffer is sorted and spilled as a run file
//! in the cache directory (0600, unlinked as soon as it is made and used through its open
//! handle, so a process that dies leaves none behind: a restore's runs reach gigabytes), and
//! the runs are merged as a stream. Prune's and verify's sets of referenced chunks and
//! restore's locations use it, so they hold a budget's worth, not a record per chunk.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::manifest::ChunkId;

/// Distinct chunk ids, sorted on the way out.
pub(crate) type ExternalSet = ExternalSort<32>;

impl ExternalSet {
    pub(crate) fn insert_id(&mut self, id: ChunkId) -> Result<()> {
        self.insert(id.0)
    }
}

/// Runs merged at once: when this many runs of one level exist they become one run of the next
/// level, so a merge never holds more than this many read buffers (64 KiB each) and every
/// record is rewritten once per level (log base 32 of the runs), whatever the input's size.
const FAN_IN: usize = 32;

/// The budget of one external sort, from the index's: small enough that a 1 GiB volume's
/// chunks already fill it (8 MiB by default), so a step's memory does not grow beyond that
/// size; larger inputs only spill more runs.
pub(crate) fn sort_budget(index_budget: u64) -> u64 {
    index_budget / 16
}

/// Records of `N` bytes, ordered bytewise.
pub(crate) struct ExternalSort<const N: usize> {
    dir: PathBuf,
    buf: Vec<[u8; N]>,
    cap: usize,
    /// Spilled runs and their level (0: a spilled buffer; k + 1: FAN_IN runs of level k).
    runs: Vec<(Spilled, u32)>,
}

impl<const N: usize> ExternalSort<N> {
    /// A sort spilling to `dir` once it holds `budget` bytes of records.
    pub(crate) fn new(dir: &Path, budget: u64) -> Self {
        let cap = usize::try_from(budget / N as u64).unwrap_or(usize::MAX).max(1024);
        ExternalSort { dir: dir.to_owned(), buf: Vec::new(), cap, runs: Vec::new() }
    }

    pub(crate) fn insert(&mut self, rec: [u8; N]) -> Result<()> {
        if self.buf.len() == self.cap {
            self.buf.sort_unstable();
            self.buf.dedup();
            if self.buf.len() > self.cap / 2 {
                self.spill()?;
            }
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.cap);
        }
        self.buf.push(rec);
        Ok(())
    }

    fn spill(&mut self) -> Result<()> {
        let run = Spilled::create(&self.dir)?;
        let mut out = BufWriter::with_capacity(1 << 20, &run.file);
        for rec in self.buf.drain(..) {
            out.write_all(&rec).ctx("write", &run.path)?;
        }
        out.flush().ctx("write", &run.path)?;
        drop(out);
        self.runs.push((run, 0));
        self.compact()
    }

    /// Merges FAN_IN runs of one level into one of the next, as long as some level has that
    /// many.
    fn compact(&mut self) -> Result<()> {
        loop {
            let Some(level) = self
                .runs
                .iter()
                .map(|&(_, l)| l)
                .find(|&l| self.runs.iter().filter(|&&(_, k)| k == l).count() >= FAN_IN)
            else {
                return Ok(());
            };
            let (merging, kept): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.runs).into_iter().partition(|&(_, l)| l == level);
            self.runs = kept;
            let run = Spilled::create(&self.dir)?;
            let mut out = BufWriter::with_capacity(1 << 20, &run.file);
            let merged: Vec<Spilled> = merging.into_iter().map(|(r, _)| r).collect();
            for rec in SortedIter::<N>::over(files(merged)?)? {
                out.write_all(&rec?).ctx("write", &run.path)?;
            }
            out.flush().ctx("write", &run.path)?;
            drop(out);
            self.runs.push((run, level + 1));
        }
    }

    /// Runs written so far (tests: that a budget forces spills).
    #[cfg(test)]
    pub(crate) fn spilled(&self) -> usize {
        self.runs.len()
    }

    /// Every distinct record, in order.
    pub(crate) fn into_sorted_iter(mut self) -> Result<SortedIter<N>> {
        self.buf.sort_unstable();
        self.buf.dedup();
        let runs = std::mem::take(&mut self.runs).into_iter().map(|(r, _)| r).collect();
        let mut sources = files(runs)?;
        sources.push(Source::Mem(std::mem::take(&mut self.buf).into_iter()));
        SortedIter::over(sources)
    }
}

/// A spilled run: a file already unlinked, read and written through its handle; `path` only
/// names it in errors.
struct Spilled {
    file: File,
    path: PathBuf,
}

impl Spilled {
    fn create(dir: &Path) -> Result<Spilled> {
        let path = dir.join(format!("sort-{}", crate::crypto::hex(&crate::crypto::random::<16>())));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .ctx("create a sort run in", dir)?;
        std::fs::remove_file(&path).ctx("unlink", &path)?;
        Ok(Spilled { file, path })
    }
}

/// The runs, each read from its start.
fn files<const N: usize>(runs: Vec<Spilled>) -> Result<Vec<Source<N>>> {
    let mut sources = Vec::with_capacity(runs.len());
    for Spilled { mut file, path } in runs {
        file.rewind().ctx("seek", &path)?;
        sources.push(Source::File(BufReader::with_capacity(64 << 10, file), path));
    }
    Ok(sources)
}

impl<const N: usize> ExternalSort<N> {
    /// Every distinct record, in order, in one file that can be read as often as needed.
    pub(crate) fn into_file(self) -> Result<SortedFile<N>> {
        let (path, file) = super::private_file(&self.dir, "sorted-", "")
            .ctx("create a sorted file in", &self.dir)?;
        // Removed again if anything below fails.
        let mut sorted = SortedFile { path: path.clone(), len: 0 };
        let mut out = BufWriter::with_capacity(1 << 20, file);
        for rec in self.into_sorted_iter()? {
            out.write_all(&rec?).ctx("write", &path)?;
            sorted.len += 1;
        }
        out.flush().ctx("write", &path)?;
        Ok(sorted)
    }
}

/// Sorted, distinct records in a file (removed when dropped).
pub(crate) struct SortedFile<const N: usize> {
    path: PathBuf,
    len: u64,
}

impl<const N: usize> SortedFile<N> {
    /// How many records.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The records, in order.
    pub(crate) fn iter(&self) -> Result<impl Iterator<Item = Result<[u8; N]>>> {
        let file = File::open(&self.path).ctx("open", &self.path)?;
        let mut source = Source::File(BufReader::with_capacity(256 << 10, file), self.path.clone());
        Ok(std::iter::from_fn(move || source.next().transpose()))
    }
}

impl<const N: usize> Drop for SortedFile<N> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

enum Source<const N: usize> {
    File(BufReader<File>, PathBuf),
    Mem(std::vec::IntoIter<[u8; N]>),
}

impl<const N: usize> Source<N> {
    fn next(&mut self) -> Result<Option<[u8; N]>> {
        match self {
            Source::Mem(it) => Ok(it.next()),
            Source::File(r, path) => {
                let mut rec = [0u8; N];
                match r.read_exact(&mut rec) {
                    Ok(()) => Ok(Some(rec)),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(e) => Err(e).ctx("read", path.clone()),
                }
            }
        }
    }
}

/// The merged stream of an [`ExternalSort`].
pub(crate) struct SortedIter<const N: usize> {
    sources: Vec<Source<N>>,
    heap: BinaryHeap<Reverse<([u8; N], usize)>>,
    last: Option<[u8; N]>,
}

impl<const N: usize> SortedIter<N> {
    fn over(sources: Vec<Source<N>>) -> Result<Self> {
        let mut it = SortedIter { sources, heap: BinaryHeap::new(), last: None };
        for k in 0..it.sources.len() {
            if let Some(rec) = it.sources[k].next()? {
                it.heap.push(Reverse((rec, k)));
            }
        }
        Ok(it)
    }
}

impl<const N: usize> Iterator for SortedIter<N> {
    type Item = Result<[u8; N]>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let Reverse((rec, k)) = self.heap.pop()?;
            match self.sources[k].next() {
                Ok(Some(next)) => self.heap.push(Reverse((next, k))),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.last != Some(rec) {
                self.last = Some(rec);
                return Some(Ok(rec));
            }
        }
    }
}
