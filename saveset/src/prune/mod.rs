//! Prune: frees packs no manifest references, repacks partly used ones and clears `tmp/`,
//! safely while backups in this and other processes write to the same repository. Packs are
//! first marked in a pending-deletion record and deleted once every backup that might not have
//! seen the mark has finished, after re-checking the manifests (FORMAT.md, "Prune"). Decisions
//! are in `plan.rs`; this module lists, reads and executes, one numbered mutation at a time.

mod plan;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::crypto::{self, hex};
use crate::error::{Error, Result};
use crate::index::{sort_budget, ExternalSet, ExternalSort, IdSet, SortedFile};
use crate::lock::{self, WriterLock, LOCK_REFRESH, LOCK_STALE};

/// `tmp/` files younger than this stay whatever the grace: a write in flight (a lock's, a
/// backup manifest's, which no lock covers) takes seconds.
const TMP_MIN_AGE: Duration = Duration::from_secs(15 * 60);
use crate::manifest::{ChunkId, Manifest, ManifestId, PackId};
use crate::repo::{now_ms, pack_key, runs, ChunkLoc, Repository};
use plan::{Class, Entry, ENTRY_REC};

/// A sorted file of chunk ids as a stream.
fn chunk_stream(f: &SortedFile<32>) -> Result<impl Iterator<Item = Result<ChunkId>> + '_> {
    Ok(f.iter()?.map(|r| r.map(ChunkId)))
}

/// A sorted file of index entries as a stream.
fn entry_stream(f: &SortedFile<ENTRY_REC>) -> Result<impl Iterator<Item = Result<Entry>> + '_> {
    Ok(f.iter()?.map(|r| r.map(|r| Entry::from_rec(&r))))
}

/// A chunk to repack by location: pack number (BE), offset (BE), sealed length, id; ordered
/// bytewise as (pack, offset).
const LOC_REC: usize = 44;

fn loc_rec(e: &Entry) -> [u8; LOC_REC] {
    let mut r = [0u8; LOC_REC];
    r[..4].copy_from_slice(&e.pack.to_be_bytes());
    r[4..8].copy_from_slice(&e.offset.to_be_bytes());
    r[8..12].copy_from_slice(&e.len.to_be_bytes());
    r[12..].copy_from_slice(&e.chunk.0);
    r
}

fn from_loc_rec(r: &[u8; LOC_REC]) -> (u32, u64, u32, ChunkId) {
    let u32_at = |at: usize| u32::from_be_bytes(r[at..at + 4].try_into().expect("4"));
    (u32_at(0), u64::from(u32_at(4)), u32_at(8), ChunkId(r[12..].try_into().expect("32")))
}

/// Chunks repacked per segment: what an external sort of the same budget holds (a chunk costs
/// its record, its location and its entry in the pack being filled, about 170 bytes), at
/// least 256.
fn repack_segment(sort_budget: u64) -> usize {
    usize::try_from(sort_budget / 170).unwrap_or(usize::MAX).max(256)
}

/// How a prune runs.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// How old a pending-deletion record, a `tmp/` file or a pack without index must be before
    /// it is deleted (FORMAT.md, "Prune").
    pub grace: Duration,
    /// Tests only: fail with [`Error::PruneStopped`] once this many changes are made.
    #[doc(hidden)]
    pub stop_after: Option<usize>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions { dry_run: false, grace: Duration::from_secs(3600), stop_after: None }
    }
}

/// What a prune did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Manifests read.
    pub manifests: usize,
    /// Packs in the repository when it started, and their bytes.
    pub packs: usize,
    pub pack_bytes: u64,
    /// Distinct chunks the manifests reference.
    pub referenced_chunks: usize,
    /// Packs none of whose chunks is used, found by this run (marked for deletion).
    pub packs_unused: usize,
    /// Packs partly used: their used chunks copied into new packs, then marked.
    pub packs_repacked: usize,
    /// Bytes copied into new packs by the repack, and the packs written.
    pub bytes_rewritten: u64,
    pub packs_written: usize,
    /// Packs marked for deletion by this run, and their bytes.
    pub packs_marked: usize,
    pub bytes_marked: u64,
    /// Packs deleted (with their index files), and their bytes.
    pub packs_deleted: usize,
    pub index_files_deleted: usize,
    /// Marked packs kept because a manifest written meanwhile uses them.
    pub packs_rescued: usize,
    /// Packs without an index (a dead writer's, or a killed prune's) deleted.
    pub orphan_packs_deleted: usize,
    pub tmp_files_deleted: usize,
    /// Bytes of everything deleted: packs, index files, temp files.
    pub bytes_freed: u64,
    /// Pending-deletion records left for a later run, each with why.
    pub waiting: Vec<String>,
    /// Live writer locks seen, as `host pid N, started T` (or why unreadable).
    pub locks: Vec<String>,
    /// Changes made (or, in a dry run, that would be made).
    pub steps: usize,
}

/// A pending-deletion record, `pending/<id>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    created_unix_ms: u64,
    packs: Vec<PackId>,
    /// The writer locks live once the record was durable; `None` until listed.
    locks: Option<Vec<String>>,
}

fn read_record(repo: &Repository, name: &str) -> Result<Option<Record>> {
    let key = format!("pending/{name}");
    let Some(blob) = repo.storage.get(&key)? else { return Ok(None) };
    let damaged = |reason: String| Error::Damaged {
        what: format!("pending-deletion record {}", repo.storage.describe(&key).display()),
        reason,
    };
    let plain =
        repo.key.open(key.as_bytes(), &blob).ok_or_else(|| damaged("does not decrypt".into()))?;
    serde_json::from_slice(&plain).map(Some).map_err(|e| damaged(e.to_string()))
}

/// Every pending-deletion record: name → record. One that does not decrypt is an error (its
/// packs would otherwise be dedup candidates again).
fn read_records(repo: &Repository) -> Result<Vec<(String, Record)>> {
    let mut out = Vec::new();
    for (key, _) in repo.storage.list("pending/")? {
        let name = key["pending/".len()..].to_owned();
        if let Some(r) = read_record(repo, &name)? {
            out.push((name, r));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The packs some pending-deletion record names: writers do not dedup against them.
pub(crate) fn pending_packs(repo: &Repository) -> Result<IdSet<PackId>> {
    Ok(read_records(repo)?.into_iter().flat_map(|(_, r)| r.packs).collect())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One run's state: the counter of changes (the failpoint) and the report.
struct Run<'a> {
    opts: &'a PruneOptions,
    /// This prune's own lock (it writes packs when it repacks), not waited for.
    own_lock: Option<String>,
    note: &'a mut dyn FnMut(&str),
    report: PruneReport,
}

impl Run<'_> {
    /// Before each change: counts it, notes it, stops at the failpoint. False in a dry run
    /// (the change is only counted).
    fn act(&mut self, what: &str) -> Result<bool> {
        if self.opts.stop_after == Some(self.report.steps) {
            return Err(Error::PruneStopped { step: self.report.steps });
        }
        self.report.steps += 1;
        let verb = if self.opts.dry_run { "would" } else { "step" };
        (self.note)(&format!("{verb} {}: {what}", self.report.steps));
        Ok(!self.opts.dry_run)
    }
}

impl Repository {
    /// Frees what no manifest references (FORMAT.md, "Prune"): marks unused packs (and
    /// partly used ones, after copying their used chunks into new packs) for deletion, deletes
    /// the packs of marks made earlier (or in this run) once every backup that was running is
    /// done and the grace period passed, and clears old `tmp/` files and packs without index.
    /// Safe while backups write, in this or any other process; a kill at any point leaves a
    /// valid repository. `note` receives progress lines (one per change, and phases).
    pub fn prune(
        &mut self,
        opts: &PruneOptions,
        note: &mut dyn FnMut(&str),
    ) -> Result<PruneReport> {
        // Held like a backup's: another prune must not take the packs it repacks into, before
        // their index is written, for a dead writer's.
        let lock = if opts.dry_run {
            None
        } else {
            Some(WriterLock::take(std::sync::Arc::clone(&self.storage), &self.key, LOCK_REFRESH)?)
        };
        let mut run = Run {
            opts,
            own_lock: lock.as_ref().map(|l| l.name().to_owned()),
            note,
            report: PruneReport { dry_run: opts.dry_run, ..Default::default() },
        };
        let now = now_ms();
        let grace = ms(opts.grace);
        // The index chunk list pages are read through, brought up to date: a pack a prune
        // deleted since this handle loaded it is gone, and locations in packs that stay win.
        self.refresh_index()?;
        // 1. Scan: records, packs (before index files: a pack listed without index is an
        // orphan candidate only), index files, manifests.
        let mut records = read_records(self)?;
        let pending: IdSet<PackId> = records.iter().flat_map(|(_, r)| r.packs.clone()).collect();
        let mut packs: HashMap<PackId, (u64, SystemTime)> = HashMap::new();
        for (key, len, at) in self.storage.list_dated("packs/")? {
            if let Some(id) = key.rsplit('/').next().and_then(|n| n.parse().ok()) {
                packs.insert(id, (len, at));
            }
        }
        let index_ids: Vec<PackId> = self.list_ids("index")?;
        let indexed: IdSet<PackId> = index_ids.iter().copied().collect();
        run.report.packs = packs.len();
        run.report.pack_bytes = packs.values().map(|(n, _)| n).sum();
        (run.note)(&format!(
            "scanning {} packs ({} bytes), {} index files",
            packs.len(),
            run.report.pack_bytes,
            index_ids.len()
        ));
        // Every referenced chunk and every index entry go through external sorts in the
        // cache directory: prune holds a budget's worth of them, not the repository's.
        let dir = self.index.scratch_dir()?;
        let budget = sort_budget(self.index.budget());
        let mut seen_manifests: IdSet<ManifestId> = IdSet::default();
        let mut refs = ExternalSet::new(&dir, budget);
        let manifests = self.list_manifests()?;
        self.read_referenced(&manifests, &mut seen_manifests, &mut refs)?;
        let referenced = refs.into_file()?;
        run.report.manifests = seen_manifests.len();
        run.report.referenced_chunks = usize::try_from(referenced.len()).unwrap_or(usize::MAX);
        // Every index entry, by pack number; packs whose index does not decrypt are left alone.
        let mut numbers: Vec<PackId> = Vec::new();
        let mut sort: ExternalSort<ENTRY_REC> = ExternalSort::new(&dir, budget);
        for &id in &index_ids {
            let Ok(list) = self.read_index(id) else {
                tracing::warn!(pack = %id, "index file does not decrypt; its pack is kept");
                continue;
            };
            let n = u32::try_from(numbers.len()).expect("fewer than 4 G packs");
            numbers.push(id);
            for (chunk, l) in list {
                let offset = u32::try_from(l.offset).unwrap_or(u32::MAX);
                sort.insert(Entry { chunk, pack: n, offset, len: l.len }.to_rec())?;
            }
        }
        let entries = sort.into_file()?;
        // 2. Classify the packs that are not pending already.
        let is_pending: Vec<bool> = numbers.iter().map(|id| pending.contains(id)).collect();
        // When each pack was written (ns; 0 unknown): of two copies of a chunk, the newer counts.
        let nanos = |at: SystemTime| {
            at.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(0))
        };
        let written: Vec<u64> =
            numbers.iter().map(|id| packs.get(id).map_or(0, |&(_, at)| nanos(at))).collect();
        let mut used = vec![0u64; numbers.len()];
        plan::counting(
            entry_stream(&entries)?,
            chunk_stream(&referenced)?,
            &is_pending,
            &written,
            &mut |e| used[e.pack as usize] += u64::from(e.len),
        )?;
        let mut mark: Vec<PackId> = Vec::new();
        let mut repack: Vec<u32> = Vec::new();
        for (n, id) in numbers.iter().enumerate() {
            // An index without its pack is damage for verify to report, not prune's to touch.
            let Some(&(size, _)) = packs.get(id) else { continue };
            if is_pending[n] {
                continue;
            }
            match plan::classify(size, used[n]) {
                Class::Keep => {}
                Class::Unused => {
                    run.report.packs_unused += 1;
                    mark.push(*id);
                }
                Class::Repack => {
                    run.report.packs_repacked += 1;
                    repack.push(u32::try_from(n).expect("a pack number"));
                }
            }
        }
        // 3. Repack: the counting chunks of partly used packs into new packs, taken in location
        // order from an external sort, a segment at a time (a prune holds a budget's worth of
        // them, however much it repacks). The new packs' entries go to a second sort, joined to
        // the sorted ones for the rescue below.
        let mut extra: ExternalSort<ENTRY_REC> = ExternalSort::new(&dir, budget);
        if !repack.is_empty() {
            let mut chosen = vec![false; numbers.len()];
            repack.iter().for_each(|&n| chosen[n as usize] = true);
            let mut todo: ExternalSort<LOC_REC> = ExternalSort::new(&dir, budget);
            let (mut chunks, mut bytes, mut spilled) = (0u64, 0u64, Ok(()));
            plan::counting(
                entry_stream(&entries)?,
                chunk_stream(&referenced)?,
                &is_pending,
                &written,
                &mut |e| {
                    if chosen[e.pack as usize] && spilled.is_ok() {
                        chunks += 1;
                        bytes += u64::from(e.len);
                        spilled = todo.insert(loc_rec(e));
                    }
                },
            )?;
            spilled?;
            (run.note)(&format!(
                "repacking {chunks} chunks ({bytes} bytes) of {} packs",
                repack.len()
            ));
            let segment = repack_segment(budget);
            self.repack(&mut run, todo, segment, &mut numbers, &mut extra)?;
            mark.extend(repack.iter().map(|&n| numbers[n as usize]));
        }
        let extra = extra.into_file()?;
        // 4. Mark: the record, then the locks live once it is durable, then the record again.
        if !mark.is_empty() {
            mark.sort();
            run.report.packs_marked = mark.len();
            run.report.bytes_marked = mark.iter().filter_map(|p| packs.get(p)).map(|p| p.0).sum();
            let name = hex(&crypto::random::<32>());
            let record = Record { created_unix_ms: now, packs: mark, locks: None };
            if run
                .act(&format!("mark {} packs for deletion in pending/{name}", record.packs.len()))?
            {
                self.put_record(&name, &record)?;
            }
            records.push((name, record));
        }
        let live_locks = self.live_locks(now, run.own_lock.as_deref(), &mut run.report)?;
        for (name, record) in &mut records {
            if record.locks.is_none() {
                record.locks = Some(live_locks.clone());
                let what =
                    format!("record the {} running backups in pending/{name}", live_locks.len());
                if run.act(&what)? {
                    self.put_record(name, record)?;
                }
            }
        }
        // 5. Check: the ripe records' packs, after re-reading manifests written meanwhile.
        let mut ripe: Vec<&(String, Record)> = Vec::new();
        for r in &records {
            let (name, record) = r;
            match plan::not_ripe(
                record.created_unix_ms,
                record.locks.as_deref(),
                &live_locks,
                now,
                grace,
            ) {
                None => ripe.push(r),
                Some(why) => run
                    .report
                    .waiting
                    .push(format!("pending/{name}: {} packs wait: {why}", record.packs.len())),
            }
        }
        let doomed_ids: IdSet<PackId> =
            ripe.iter().flat_map(|(_, r)| r.packs.iter().copied()).collect();
        let mut doomed: Vec<bool> = numbers.iter().map(|id| doomed_ids.contains(id)).collect();
        if doomed.iter().any(|&d| d) {
            let mut more = ExternalSet::new(&dir, budget);
            let manifests = self.list_manifests()?;
            self.read_referenced(&manifests, &mut seen_manifests, &mut more)?;
            let more = more.into_file()?;
            let all_refs = plan::merge_sorted(chunk_stream(&referenced)?, chunk_stream(&more)?);
            let all_entries = plan::merge_sorted(entry_stream(&entries)?, entry_stream(&extra)?);
            for n in plan::rescue(all_entries, all_refs, &doomed)? {
                doomed[n as usize] = false;
                run.report.packs_rescued += 1;
                (run.note)(&format!(
                    "rescued pack {}: a manifest uses it again",
                    numbers[n as usize]
                ));
            }
        }
        // 6. Delete: each index file before its pack, then the records.
        for (n, id) in numbers.iter().enumerate() {
            if !doomed[n] || !indexed.contains(id) {
                continue;
            }
            let key = format!("index/{id}");
            let index_len = self.storage.list(&key)?.first().map_or(0, |(_, len)| *len);
            if run.act(&format!("delete {key}"))? {
                self.storage.delete(&key)?;
            }
            run.report.index_files_deleted += 1;
            run.report.bytes_freed += index_len;
            let pack_len = packs.get(id).map_or(0, |p| p.0);
            if run.act(&format!("delete {} ({pack_len} bytes)", pack_key(*id)))? {
                self.storage.delete(&pack_key(*id))?;
            }
            run.report.packs_deleted += 1;
            run.report.bytes_freed += pack_len;
        }
        for (name, _) in &ripe {
            if run.act(&format!("delete pending/{name}"))? {
                self.storage.delete(&format!("pending/{name}"))?;
            }
        }
        // 7. Packs without an index, and temp files, older than the grace.
        self.orphans(&mut run, &packs, &indexed, now, grace)?;
        drop(lock);
        Ok(run.report)
    }

    /// Adds what manifest `id` references to `referenced`, the pages not in `pages`.
    /// `Some(page)`: a page the index does not know (refresh the index and retry).
    fn list_references(
        &self,
        id: ManifestId,
        pages: &mut IdSet<ChunkId>,
        referenced: &mut ExternalSet,
    ) -> Result<Option<ChunkId>> {
        let Manifest::Volume(m) = self.load_manifest(id)? else { return Ok(None) };
        let mut failed = None;
        let mut unknown = None;
        let mut bad = |blob, e| {
            if self.index.get(&blob).is_none() {
                unknown.get_or_insert(blob);
            } else {
                failed.get_or_insert(e);
            }
        };
        let mut spill = Ok(());
        let insert = |c| {
            if spill.is_ok() {
                spill = referenced.insert_id(c);
            }
        };
        self.for_each_reference(&self.index, &m, pages, insert, &mut bad);
        spill?;
        failed.map_or(Ok(unknown), Err)
    }

    /// Adds the chunks of the volume manifests in `ids` not in `seen` to `referenced`. A
    /// manifest that cannot be read stops the prune: what it references is unknown, so nothing
    /// could be deleted safely.
    fn read_referenced(
        &mut self,
        ids: &[ManifestId],
        seen: &mut IdSet<ManifestId>,
        referenced: &mut ExternalSet,
    ) -> Result<()> {
        let mut pages = IdSet::default();
        for &id in ids {
            if !seen.insert(id) {
                continue;
            }
            let mut listed = self.list_references(id, &mut pages, referenced);
            if let Ok(Some(_)) = listed {
                // Its pages are in packs written since this prune read the index files.
                self.refresh_index()?;
                listed = self.list_references(id, &mut pages, referenced);
            }
            let listed = listed.and_then(|unknown| match unknown {
                None => Ok(()),
                Some(blob) => Err(Error::Damaged {
                    what: format!("chunk list page {blob}"),
                    reason: "not in any index".into(),
                }),
            });
            match listed {
                Ok(()) => {}
                // Forgotten meanwhile: it references nothing any more.
                Err(Error::UnknownManifest { .. }) => {}
                Err(e) => {
                    return Err(Error::Damaged {
                        what: format!("prune: manifest {id}"),
                        reason: format!(
                            "{e}; what it references is unknown, so nothing was deleted (run \
                             verify, and forget or restore that manifest first)"
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// The ids of the writer locks live now; fills `report.locks`.
    fn live_locks(
        &self,
        now: u64,
        own: Option<&str>,
        report: &mut PruneReport,
    ) -> Result<Vec<String>> {
        let mut live = Vec::new();
        report.locks.clear();
        for (key, _) in self.storage.list("locks/")? {
            let name = &key["locks/".len()..];
            if Some(name) == own {
                continue;
            }
            let Some(lock) = lock::read(&*self.storage, &self.key, name)? else { continue };
            if plan::lock_is_live(&lock, now, ms(LOCK_STALE)) {
                report.locks.push(match &lock {
                    Ok(l) => format!(
                        "locks/{name}: host {} pid {}, started {} ms ago",
                        l.host,
                        l.pid,
                        now.saturating_sub(l.started_unix_ms)
                    ),
                    Err(e) => format!(
                        "locks/{name}: {e} (counted as a running backup; delete it if none runs)"
                    ),
                });
                live.push(name.to_owned());
            }
        }
        live.sort();
        Ok(live)
    }

    fn put_record(&self, name: &str, record: &Record) -> Result<()> {
        let key = format!("pending/{name}");
        let json = serde_json::to_vec(record).expect("a record serializes");
        self.storage.put(&key, &self.key.seal(key.as_bytes(), &json))
    }

    /// Copies the chunks `todo` (the counting chunks of partly used packs, by location) into
    /// new packs, sealed blobs as they are, `segment` chunks at a time; each new pack takes the
    /// next number in `numbers` and its entries go to `extra`.
    fn repack(
        &self,
        run: &mut Run<'_>,
        todo: ExternalSort<LOC_REC>,
        segment: usize,
        numbers: &mut Vec<PackId>,
        extra: &mut ExternalSort<ENTRY_REC>,
    ) -> Result<()> {
        let mut sorted = todo.into_sorted_iter()?;
        let mut buf = Vec::new();
        let mut pack = self.new_pack(None);
        // The chunks of the pack being filled (a dry run fills none, but counts the same).
        let mut filled: Vec<(ChunkId, u64, u32)> = Vec::new();
        let mut filled_len = 0u64;
        let mut chunks: Vec<(ChunkLoc, ChunkId)> = Vec::with_capacity(segment);
        loop {
            chunks.clear();
            for rec in sorted.by_ref() {
                let (n, offset, len, chunk) = from_loc_rec(&rec?);
                chunks.push((ChunkLoc { pack: numbers[n as usize], offset, len }, chunk));
                if chunks.len() >= segment {
                    break;
                }
            }
            if chunks.is_empty() {
                break;
            }
            let locs: Vec<ChunkLoc> = chunks.iter().map(|&(l, _)| l).collect();
            for r in runs(&locs, 64 << 10, 8 << 20) {
                let (first, last) = (locs[r.start], locs[r.end - 1]);
                let range = first.offset..last.offset + u64::from(last.len);
                let got = if run.opts.dry_run {
                    None
                } else {
                    Some(self.read_pack_into(first.pack, range, &mut buf)?)
                };
                for &(loc, chunk) in &chunks[r] {
                    if let Some(got) = &got {
                        let at = got.start
                            + usize::try_from(loc.offset - first.offset).expect("in the run");
                        pack.append(chunk, &buf[at..at + loc.len as usize]);
                    }
                    filled.push((chunk, filled_len, loc.len));
                    filled_len += u64::from(loc.len);
                    run.report.bytes_rewritten += u64::from(loc.len);
                }
                if filled_len >= self.pack_size() {
                    let full = std::mem::replace(&mut pack, self.new_pack(None));
                    let list = std::mem::take(&mut filled);
                    self.store_repacked(run, full, list, filled_len, numbers, extra)?;
                    filled_len = 0;
                }
            }
        }
        if !filled.is_empty() {
            self.store_repacked(run, pack, filled, filled_len, numbers, extra)?;
        }
        Ok(())
    }

    /// Stores one repacked pack (in a dry run, counts it under a made-up id), numbered next in
    /// `numbers`, its entries into `extra`.
    fn store_repacked(
        &self,
        run: &mut Run<'_>,
        pack: crate::repo::PackWriter,
        chunks: Vec<(ChunkId, u64, u32)>,
        len: u64,
        numbers: &mut Vec<PackId>,
        extra: &mut ExternalSort<ENTRY_REC>,
    ) -> Result<()> {
        run.report.packs_written += 1;
        let (id, list) =
            if run.act(&format!("write a repacked pack ({len} bytes) and its index"))? {
                let (stored, _) = self.store_pack(pack)?;
                (stored.id, stored.entries_vec())
            } else {
                (PackId(crypto::random()), chunks)
            };
        let n = u32::try_from(numbers.len()).expect("fewer than 4 G packs");
        numbers.push(id);
        for (chunk, offset, len) in list {
            let offset = u32::try_from(offset).unwrap_or(u32::MAX);
            extra.insert(Entry { chunk, pack: n, offset, len }.to_rec())?;
        }
        Ok(())
    }

    /// Step 7: packs listed without an index and older than the grace (if no backup is
    /// running, or they are older than a lock stays live), and `tmp/` files older than it.
    fn orphans(
        &self,
        run: &mut Run<'_>,
        packs: &HashMap<PackId, (u64, SystemTime)>,
        indexed: &IdSet<PackId>,
        now: u64,
        grace: u64,
    ) -> Result<()> {
        let old = |at: SystemTime, age: u64| now.saturating_sub(unix_ms(at)) >= age;
        let mut candidates: Vec<(PackId, u64, SystemTime)> = packs
            .iter()
            .filter(|(id, (_, at))| !indexed.contains(id) && old(*at, grace))
            .map(|(id, &(n, at))| (*id, n, at))
            .collect();
        candidates.sort_by_key(|c| c.0);
        if !candidates.is_empty() {
            let mut scratch = PruneReport::default();
            let writing = !self.live_locks(now, run.own_lock.as_deref(), &mut scratch)?.is_empty();
            for (id, len, at) in candidates {
                // A running writer stores a pack's index right after the pack.
                if writing && !old(at, ms(LOCK_STALE)) {
                    continue;
                }
                if self.storage.exists(&format!("index/{id}"))? {
                    continue;
                }
                if run.act(&format!("delete {} ({len} bytes, no index)", pack_key(id)))? {
                    self.storage.delete(&pack_key(id))?;
                }
                run.report.orphan_packs_deleted += 1;
                run.report.bytes_freed += len;
            }
        }
        let mut tmp = self.storage.list_tmp()?;
        tmp.sort();
        for (key, len, at) in tmp {
            if !old(at, grace.max(ms(TMP_MIN_AGE))) {
                continue;
            }
            if run.act(&format!("delete {key} ({len} bytes)"))? {
                self.storage.delete(&key)?;
            }
            run.report.tmp_files_deleted += 1;
            run.report.bytes_freed += len;
        }
        Ok(())
    }
}
