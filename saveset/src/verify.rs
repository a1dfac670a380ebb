//! Checking a repository: every chunk every manifest references is indexed and inside a pack
//! that exists; with `read_data`, every such chunk decrypts and matches its id. Reports damage
//! by name (manifest, chunk, pack file, offset); never repairs.

use std::cell::RefCell;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::IoContext;
use crate::index::{sort_budget, ExternalSet, ExternalSort, IdSet, Index};
use crate::jobs;
use crate::manifest::{ChunkId, Manifest, ManifestId, PackId};
use crate::repo::{runs, ChunkLoc, Repository};

/// Chunks read per segment of the sorted stream (a segment's runs are shared out at once).
const SEGMENT: usize = 1 << 16;
/// A chunk by location: pack (32), offset (8, BE), sealed length (4), id (32): ordered
/// bytewise as (pack, offset, id).
const LOC_REC: usize = 76;

fn loc_rec(loc: ChunkLoc, chunk: ChunkId) -> [u8; LOC_REC] {
    let mut r = [0u8; LOC_REC];
    r[..32].copy_from_slice(&loc.pack.0);
    r[32..40].copy_from_slice(&loc.offset.to_be_bytes());
    r[40..44].copy_from_slice(&loc.len.to_be_bytes());
    r[44..].copy_from_slice(&chunk.0);
    r
}

fn from_loc_rec(r: &[u8; LOC_REC]) -> (ChunkLoc, ChunkId) {
    let loc = ChunkLoc {
        pack: PackId(r[..32].try_into().expect("32")),
        offset: u64::from_be_bytes(r[32..40].try_into().expect("8")),
        len: u32::from_be_bytes(r[40..44].try_into().expect("4")),
    };
    (loc, ChunkId(r[44..].try_into().expect("32")))
}

/// What `verify` found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Manifests checked.
    pub manifests: usize,
    /// Distinct chunks referenced by them.
    pub chunks: usize,
    /// Chunks read, decrypted and re-hashed (`read_data` only).
    pub chunks_read: usize,
    /// Everything found wrong, in a stable order.
    pub damage: Vec<Damage>,
}

impl Report {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.damage.is_empty()
    }
}

/// One problem, naming what is damaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// An index file that does not decrypt or parse; the chunks it listed look missing.
    Index { path: PathBuf, reason: String },
    /// A manifest that does not decrypt or parse.
    Manifest { manifest: ManifestId, reason: String },
    /// A backup manifest names a volume manifest that is not there.
    VolumeManifestMissing { backup: ManifestId, volume: ManifestId },
    /// A referenced chunk that no index lists.
    ChunkNotIndexed { manifest: ManifestId, chunk: ChunkId },
    /// The pack holding a referenced chunk is missing, or too short to hold it.
    PackMissing { manifest: ManifestId, chunk: ChunkId, pack: PathBuf, offset: u64 },
    /// A chunk that does not decrypt, decompress or match its id.
    ChunkCorrupt {
        manifest: ManifestId,
        chunk: ChunkId,
        pack: PathBuf,
        offset: u64,
        reason: String,
    },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::Index { path, reason } => write!(f, "index {}: {reason}", path.display()),
            Damage::Manifest { manifest, reason } => write!(f, "manifest {manifest}: {reason}"),
            Damage::VolumeManifestMissing { backup, volume } => {
                write!(f, "manifest {backup}: volume manifest {volume} is missing")
            }
            Damage::ChunkNotIndexed { manifest, chunk } => {
                write!(f, "manifest {manifest}: chunk {chunk} is in no index")
            }
            Damage::PackMissing { manifest, chunk, pack, offset } => write!(
                f,
                "manifest {manifest}: chunk {chunk}: pack {} at offset {offset} is missing",
                pack.display()
            ),
            Damage::ChunkCorrupt { manifest, chunk, pack, offset, reason } => write!(
                f,
                "manifest {manifest}: chunk {chunk} in pack {} at offset {offset} {reason}",
                pack.display()
            ),
        }
    }
}

/// How far a verify that reads the data has come, reported after every ranged read (from
/// several threads: `done` only grows, but two reports may arrive out of order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyProgress {
    /// Bytes of stored (sealed) chunks read and checked so far.
    pub done: u64,
    /// Bytes of stored chunks to read.
    pub total: u64,
}

/// What one verify worker keeps from run to run.
struct VerifyScratch<'k> {
    dc: zstd::bulk::Decompressor<'static>,
    out: Vec<u8>,
    opener: crate::crypto::ChunkOpener<'k>,
    read: Vec<u8>,
    corrupt: Vec<(ChunkId, ChunkLoc, String)>,
}

impl Repository {
    /// Checks every manifest against the index files and packs on disk now (not the index
    /// loaded at open), and with `read_data` reads each referenced chunk once.
    pub fn verify(&self, read_data: bool) -> crate::Result<Report> {
        self.check(None, read_data, &|_| {})
    }

    /// [`Repository::verify`] of the manifests `ids` only, and of the volume manifests that the
    /// backup manifests among them name: what restoring those backups needs. Its cost grows
    /// with them, not with the repository, so verify-after-write stays as fast on the
    /// thousandth backup as on the first. Index files are still all checked to decrypt.
    pub fn verify_manifests(&self, ids: &[ManifestId], read_data: bool) -> crate::Result<Report> {
        self.check(Some(ids), read_data, &|_| {})
    }

    /// [`Repository::verify_manifests`], reporting how much of the data it has read.
    pub fn verify_manifests_with(
        &self,
        ids: &[ManifestId],
        read_data: bool,
        progress: &(dyn Fn(VerifyProgress) + Sync),
    ) -> crate::Result<Report> {
        self.check(Some(ids), read_data, progress)
    }

    fn check(
        &self,
        scope: Option<&[ManifestId]>,
        read_data: bool,
        progress: &(dyn Fn(VerifyProgress) + Sync),
    ) -> crate::Result<Report> {
        let mut report = Report::default();
        // The index files on disk now. When they are exactly the ones loaded at open and all
        // still decrypt, the loaded index is theirs: use it rather than hold a second copy.
        let mut index_ids: Vec<PackId> = self.list_ids("index")?;
        index_ids.sort();
        let mut good = Vec::with_capacity(index_ids.len());
        for &id in &index_ids {
            match self.read_index(id) {
                Ok(_) => good.push(id),
                Err(e) => report.damage.push(Damage::Index {
                    path: self.storage.describe(&format!("index/{id}")),
                    reason: e.to_string(),
                }),
            }
        }
        let same =
            good.len() == self.index.packs().len() && good.iter().all(|id| self.index.has_pack(id));
        let fresh;
        let index = if same {
            &*self.index
        } else {
            // In a private temp dir of its own, removed when done: it holds the same budget.
            let idx = Index::temporary(self.cache_tag(), self.index.budget())?;
            for &id in &good {
                if let Ok(entries) = self.read_index(id) {
                    idx.add_pack(id, entries.into_iter().map(|(c, l)| (c, l.offset, l.len)))?;
                }
            }
            fresh = idx;
            &fresh
        };
        let packs = self.list_packs()?;
        let manifest_ids = self.list_manifests()?;
        // One manifest at a time: each distinct chunk it references is checked against the
        // index and the packs; the present ones go to an external set (sorted, distinct, its
        // memory bounded by the budget) for reading.
        let scratch_dir = self.index.scratch_dir()?;
        let budget = self.index.budget();
        let mut referenced = ExternalSet::new(&scratch_dir, sort_budget(budget));
        let mut missing: Vec<ChunkId> = Vec::new();
        let mut chunk_damage: Vec<(ChunkId, Damage)> = Vec::new();
        // The manifests to check: all, or the scope plus the volumes its backups name.
        let mut todo: Vec<ManifestId> = scope.map_or_else(|| manifest_ids.clone(), <[_]>::to_vec);
        todo.reverse(); // popped from the end: checked in the order given
        let mut checked: Vec<ManifestId> = Vec::with_capacity(todo.len());
        let mut seen = std::collections::BTreeSet::new();
        // Chunk list pages already listed (backups of one volume share most of them), and the
        // largest blob a list may reference (pages are larger than chunks).
        let mut pages = IdSet::default();
        let mut max_blob = self.chunk_size() as usize;
        while let Some(mid) = todo.pop() {
            if !seen.insert(mid) {
                continue;
            }
            checked.push(mid);
            report.manifests += 1;
            match self.load_manifest(mid) {
                Ok(Manifest::Volume(m)) => {
                    max_blob = max_blob.max(self.max_blob_len(&m));
                    // Pages that would not read: checked like chunks (not indexed, pack
                    // missing) and, when their blob is there, reported as corrupt.
                    let unread: RefCell<Vec<(ChunkId, String)>> = RefCell::new(Vec::new());
                    let mut bad = |blob, e: crate::Error| {
                        unread.borrow_mut().push((blob, e.to_string()));
                    };
                    // The manifest's chunks sorted and distinct (an external sort, so a
                    // volume of any size costs its budget), then looked up in id order: each
                    // index block is read once, whatever the volume's size.
                    let mut refs = ExternalSet::new(&scratch_dir, sort_budget(budget) / 4);
                    let mut failed: Option<crate::Error> = None;
                    let add = |c: ChunkId| {
                        if failed.is_none() {
                            failed = refs.insert_id(c).err();
                        }
                    };
                    self.for_each_reference(index, &m, &mut pages, add, &mut bad);
                    let unread = unread.into_inner();
                    for (c, _) in &unread {
                        if failed.is_none() {
                            failed = refs.insert_id(*c).err();
                        }
                    }
                    if let Some(e) = failed {
                        return Err(e);
                    }
                    let corrupt = |chunk: &ChunkId| {
                        unread.iter().find(|(c, _)| c == chunk).map(|(_, why)| why.clone())
                    };
                    let mut lookup = index.sorted();
                    for chunk in refs.into_sorted_iter()? {
                        let chunk = ChunkId(chunk?);
                        let Some(loc) = lookup.get(&chunk) else {
                            missing.push(chunk);
                            chunk_damage
                                .push((chunk, Damage::ChunkNotIndexed { manifest: mid, chunk }));
                            continue;
                        };
                        let fits = packs
                            .get(&loc.pack)
                            .is_some_and(|&n| loc.offset + u64::from(loc.len) <= n);
                        if !fits {
                            missing.push(chunk);
                            chunk_damage.push((
                                chunk,
                                Damage::PackMissing {
                                    manifest: mid,
                                    chunk,
                                    pack: self.pack_path(loc.pack),
                                    offset: loc.offset,
                                },
                            ));
                            continue;
                        }
                        if let Some(reason) = corrupt(&chunk) {
                            missing.push(chunk);
                            chunk_damage.push((
                                chunk,
                                Damage::ChunkCorrupt {
                                    manifest: mid,
                                    chunk,
                                    pack: self.pack_path(loc.pack),
                                    offset: loc.offset,
                                    reason,
                                },
                            ));
                            continue;
                        }
                        referenced.insert_id(chunk)?;
                    }
                }
                Ok(Manifest::Backup(b)) => {
                    for v in b.volumes {
                        if manifest_ids.binary_search(&v).is_err() {
                            report
                                .damage
                                .push(Damage::VolumeManifestMissing { backup: mid, volume: v });
                        } else if scope.is_some() {
                            todo.push(v);
                        }
                    }
                }
                Err(e) => {
                    report.damage.push(Damage::Manifest { manifest: mid, reason: e.to_string() })
                }
            }
        }
        missing.sort_unstable();
        missing.dedup();
        report.chunks = missing.len();
        drop(missing);
        // By chunk, then manifest order (the pushes were in manifest order; the sort is stable).
        chunk_damage.sort_by_key(|(c, _)| *c);
        report.damage.extend(chunk_damage.into_iter().map(|(_, d)| d));
        // The referenced chunks by location (pack, offset), through a second external sort:
        // looked up in id order, so each index block is read once whatever the volume's size.
        if !read_data {
            for chunk in referenced.into_sorted_iter()? {
                chunk?;
                report.chunks += 1;
            }
            return Ok(report);
        }
        let mut by_loc: ExternalSort<LOC_REC> =
            ExternalSort::new(&scratch_dir, sort_budget(budget));
        let mut total = 0u64;
        let mut lookup = index.sorted();
        for chunk in referenced.into_sorted_iter()? {
            let chunk = ChunkId(chunk?);
            report.chunks += 1;
            if let Some(loc) = lookup.get(&chunk) {
                total += u64::from(loc.len);
                by_loc.insert(loc_rec(loc, chunk))?;
            }
        }
        drop(lookup);
        // Pack by pack (in id order), each referenced chunk at the location the index chose,
        // in offset order, runs of neighbours with one read; runs are shared out to two workers
        // per core (one decodes while another waits on a read), a segment of the sorted stream
        // at a time. A damaged chunk is attributed to its manifests afterwards.
        let done = AtomicU64::new(0);
        let mut sorted = by_loc.into_sorted_iter()?;
        // Only what was found damaged outlives a segment (not its workers' read buffers).
        let mut corrupt: Vec<(ChunkId, ChunkLoc, String)> = Vec::new();
        loop {
            let mut chunks: Vec<(ChunkLoc, ChunkId)> = Vec::with_capacity(SEGMENT);
            for rec in sorted.by_ref() {
                let (loc, chunk) = from_loc_rec(&rec?);
                // A segment ends between packs, so a run is never cut in two.
                let pack_ends = chunks.last().is_some_and(|(l, _)| l.pack != loc.pack);
                chunks.push((loc, chunk));
                if chunks.len() >= SEGMENT && pack_ends {
                    break;
                }
            }
            if chunks.is_empty() {
                break;
            }
            let locs: Vec<ChunkLoc> = chunks.iter().map(|&(loc, _)| loc).collect();
            let all_runs = runs(&locs, 64 << 10, 8 << 20);
            let new_scratch = || -> crate::Result<VerifyScratch<'_>> {
                Ok(VerifyScratch {
                    dc: zstd::bulk::Decompressor::new().ctx("decompress", self.root.clone())?,
                    out: vec![0u8; max_blob],
                    opener: self.key.chunk_opener(),
                    read: Vec::new(),
                    corrupt: Vec::new(),
                })
            };
            let read_run = |_worker, scratch: &mut VerifyScratch<'_>, i: usize| {
                let run = all_runs[i].clone();
                let (first, last) = (locs[run.start], locs[run.end - 1]);
                let end = last.offset + u64::from(last.len);
                let got = self.read_pack_into(first.pack, first.offset..end, &mut scratch.read);
                for &(loc, chunk) in &chunks[run.clone()] {
                    let reason = match &got {
                        Ok(r) => {
                            let at = r.start
                                + usize::try_from(loc.offset - first.offset)
                                    .expect("inside the run");
                            let blob = &mut scratch.read[at..at + loc.len as usize];
                            self.decode_chunk_into(
                                &mut scratch.opener,
                                chunk,
                                blob,
                                &mut scratch.out,
                                &mut scratch.dc,
                            )
                            .err()
                            .map(str::to_owned)
                        }
                        Err(e) => Some(e.to_string()),
                    };
                    if let Some(reason) = reason {
                        scratch.corrupt.push((chunk, loc, reason));
                    }
                }
                let bytes: u64 = locs[run].iter().map(|l| u64::from(l.len)).sum();
                let done = done.fetch_add(bytes, Ordering::Relaxed) + bytes;
                progress(VerifyProgress { done, total });
                Ok(())
            };
            let got = jobs::share_out(all_runs.len(), jobs::io_workers(), new_scratch, read_run)?;
            report.chunks_read += chunks.len();
            corrupt.extend(got.into_iter().flat_map(|s| s.corrupt));
        }

        // In (pack, offset) order, as a single reader would have found them.
        corrupt.sort_by_key(|&(chunk, loc, _)| (loc.pack, loc.offset, chunk));
        if corrupt.is_empty() {
            return Ok(report);
        }
        let mut users: Vec<Vec<ManifestId>> = vec![Vec::new(); corrupt.len()];
        let mut by_chunk: Vec<(ChunkId, usize)> =
            corrupt.iter().enumerate().map(|(i, (c, _, _))| (*c, i)).collect();
        by_chunk.sort_unstable();
        for &mid in &checked {
            if let Ok(Manifest::Volume(m)) = self.load_manifest(mid) {
                let mut ids: Vec<ChunkId> = Vec::new();
                // A page that does not read was reported with its manifest; its users are
                // named from what could be read.
                self.for_each_reference(
                    index,
                    &m,
                    &mut IdSet::default(),
                    |c| ids.push(c),
                    &mut |_, _| {},
                );
                ids.sort_unstable();
                ids.dedup();
                for chunk in ids {
                    if let Ok(k) = by_chunk.binary_search_by_key(&chunk, |&(c, _)| c) {
                        users[by_chunk[k].1].push(mid);
                    }
                }
            }
        }
        for ((chunk, loc, reason), ms) in corrupt.into_iter().zip(users) {
            for manifest in ms {
                report.damage.push(Damage::ChunkCorrupt {
                    manifest,
                    chunk,
                    pack: self.pack_path(loc.pack),
                    offset: loc.offset,
                    reason: reason.clone(),
                });
            }
        }
        Ok(report)
    }
}
