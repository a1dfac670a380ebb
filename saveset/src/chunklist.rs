//! Reading and writing volume chunk lists in pages (`pages.rs` is the encoding): the page blobs
//! are stored in packs like chunks, so reading a page is an index lookup, a ranged read and a
//! chunk decode. Readers take the list a page at a time, so their memory follows the page, not
//! the volume.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::index::{IdSet, Index};
use crate::manifest::{ChunkId, ChunkList, VolumeManifest};
use crate::pages::{self, Page};
use crate::repo::Repository;

/// One page's entries and the blobs they were read from (the page, and its base for a delta).
pub(crate) struct PageEntries {
    pub entries: Vec<Option<ChunkId>>,
    pub blobs: Vec<ChunkId>,
}

/// How many decoded page blobs [`PageCache`] keeps: a backup's walk reads its parent's page
/// (and, for a delta, that page's base) once for its entries and again to compare the page it
/// built, and reads the next page only after both. At most [`pages::MAX_PAGES`] pages cut any
/// volume, so a page is 4096 entries (135 KB decoded) up to 16 GiB and grows with the volume
/// past that (2 MiB at 1 TiB).
const RECENT_PAGES: usize = 2;

/// The page blobs decoded last, and what decoding takes (buffers and a zstd context, made once
/// rather than per page). Blobs are named by the keyed hash of their plaintext and checked when
/// decoded, so a kept page is the page its id names.
#[derive(Default)]
pub(crate) struct PageCache {
    inner: std::sync::Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    /// Most recently used last.
    recent: std::collections::VecDeque<(ChunkId, Arc<Page>)>,
    read: Vec<u8>,
    out: Vec<u8>,
    dc: Option<zstd::bulk::Decompressor<'static>>,
}

impl PageCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Repository {
    /// Reads and decodes the page blob `id` of `count` entries.
    pub(crate) fn load_page(&self, id: ChunkId, count: usize) -> Result<Arc<Page>> {
        self.load_page_in(&self.index, id, count)
    }

    /// [`Repository::load_page`], locating the blob through `index`.
    fn load_page_in(&self, index: &Index, id: ChunkId, count: usize) -> Result<Arc<Page>> {
        let damaged =
            |reason: String| Error::Damaged { what: format!("chunk list page {id}"), reason };
        // Buffers are taken out of the cache while decoding, so another thread reading a page
        // meanwhile is not held up (it makes buffers of its own).
        let (mut read, mut out, dc) = {
            let mut cache = self.pages.lock();
            if let Some(at) = cache.recent.iter().position(|(k, _)| *k == id) {
                let hit = cache.recent.remove(at).expect("found just now");
                let page = Arc::clone(&hit.1);
                cache.recent.push_back(hit);
                return Ok(page);
            }
            (std::mem::take(&mut cache.read), std::mem::take(&mut cache.out), cache.dc.take())
        };
        let mut dc = match dc {
            Some(dc) => dc,
            None => zstd::bulk::Decompressor::new().map_err(|e| damaged(e.to_string()))?,
        };
        let decoded = (|| {
            let loc = index.get(&id).ok_or_else(|| damaged("not in any index".into()))?;
            let at = self.read_pack_into(
                loc.pack,
                loc.offset..loc.offset + u64::from(loc.len),
                &mut read,
            )?;
            out.resize(pages::max_page_len(count_u32(count)), 0);
            let mut opener = self.key.chunk_opener();
            let n = self
                .decode_chunk_into(&mut opener, id, &mut read[at], &mut out, &mut dc)
                .map_err(|r| {
                    damaged(format!(
                        "in pack {} at offset {}: {r}",
                        self.pack_path(loc.pack).display(),
                        loc.offset
                    ))
                })?;
            pages::decode(&out[..n], count).map_err(damaged)
        })();
        let mut cache = self.pages.lock();
        (cache.read, cache.out, cache.dc) = (read, out, Some(dc));
        let page = Arc::new(decoded?);
        if cache.recent.len() >= RECENT_PAGES {
            cache.recent.pop_front();
        }
        cache.recent.push_back((id, Arc::clone(&page)));
        Ok(page)
    }

    /// The entries of page `p` of a paged list (`page_chunks` per page, `count` chunks in all),
    /// a delta resolved against its base.
    pub(crate) fn page_entries(
        &self,
        page_chunks: u32,
        pages: &[Option<ChunkId>],
        count: u64,
        p: usize,
    ) -> Result<PageEntries> {
        self.page_entries_or_blob(&self.index, page_chunks, pages, count, p).map_err(|(_, e)| e)
    }

    /// [`Repository::page_entries`], a failure naming the blob that would not read (the page,
    /// or its base).
    fn page_entries_or_blob(
        &self,
        index: &Index,
        page_chunks: u32,
        pages: &[Option<ChunkId>],
        count: u64,
        p: usize,
    ) -> std::result::Result<PageEntries, (ChunkId, Error)> {
        let len = page_len(page_chunks, count, p);
        let Some(id) = pages[p] else {
            return Ok(PageEntries { entries: vec![None; len], blobs: Vec::new() });
        };
        match &*self.load_page_in(index, id, len).map_err(|e| (id, e))? {
            Page::Full(entries) => Ok(PageEntries { entries: entries.clone(), blobs: vec![id] }),
            Page::Delta { base, count, changes } => {
                let (base, count) = (*base, *count);
                let base_page = self.load_page_in(index, base, len).map_err(|e| (base, e))?;
                let Page::Full(base_entries) = &*base_page else {
                    return Err((
                        id,
                        Error::Damaged {
                            what: format!("chunk list page {id}"),
                            reason: format!("its base {base} is itself a delta"),
                        },
                    ));
                };
                let entries = pages::apply(base_entries, count, changes).map_err(|reason| {
                    (id, Error::Damaged { what: format!("chunk list page {id}"), reason })
                })?;
                Ok(PageEntries { entries, blobs: vec![id, base] })
            }
        }
    }

    /// The entries of chunks `range` of `manifest`, reading only the pages that cover them.
    pub(crate) fn chunk_entries(
        &self,
        manifest: &VolumeManifest,
        range: Range<u64>,
    ) -> Result<Vec<Option<ChunkId>>> {
        let count = manifest.chunk_count();
        let range = range.start.min(count)..range.end.min(count);
        match &manifest.chunks {
            ChunkList::Flat(chunks) => {
                let at = |i: u64| usize::try_from(i).expect("a flat list is in memory");
                Ok(chunks[at(range.start)..at(range.end)].to_vec())
            }
            ChunkList::Paged { page_chunks, pages } => {
                let per = u64::from(*page_chunks);
                let mut out =
                    Vec::with_capacity(usize::try_from(range.end - range.start).unwrap_or(0));
                let mut p = range.start / per;
                while p * per < range.end {
                    let page = self.page_entries(*page_chunks, pages, count, to_usize(p))?;
                    let first = p * per;
                    let from = range.start.max(first) - first;
                    let to = range.end.min(first + per) - first;
                    out.extend_from_slice(&page.entries[to_usize(from)..to_usize(to)]);
                    p += 1;
                }
                Ok(out)
            }
        }
    }

    /// Calls `f` with each page of `manifest` in order: the index of its first chunk, its
    /// entries, and the page blobs read for it (none for a flat list, which is cut into pieces
    /// of the minimum page size).
    pub(crate) fn for_each_page(
        &self,
        manifest: &VolumeManifest,
        mut f: impl FnMut(u64, &[Option<ChunkId>], &[ChunkId]) -> Result<()>,
    ) -> Result<()> {
        match &manifest.chunks {
            ChunkList::Flat(chunks) => {
                for (k, piece) in chunks.chunks(pages::MIN_PAGE_CHUNKS as usize).enumerate() {
                    f(k as u64 * u64::from(pages::MIN_PAGE_CHUNKS), piece, &[])?;
                }
                Ok(())
            }
            ChunkList::Paged { page_chunks, pages } => {
                let count = manifest.chunk_count();
                for p in 0..pages.len() {
                    let page = self.page_entries(*page_chunks, pages, count, p)?;
                    f(p as u64 * u64::from(*page_chunks), &page.entries, &page.blobs)?;
                }
                Ok(())
            }
        }
    }

    /// Every blob `manifest` references: the page blobs and each page's data chunks, skipping
    /// pages whose id is in `seen` (already done for another manifest: backups of one volume
    /// share most of their pages) and adding the others to it. What prune keeps and verify
    /// checks. `f` may see an id more than once. A page that does not read goes to `bad` with
    /// the blob that failed (the page or its base), and the walk goes on. Blobs are located
    /// through `index` (verify's may be fresher than the one loaded at open).
    pub(crate) fn for_each_reference(
        &self,
        index: &Index,
        manifest: &VolumeManifest,
        seen: &mut IdSet<ChunkId>,
        mut f: impl FnMut(ChunkId),
        bad: &mut dyn FnMut(ChunkId, Error),
    ) {
        match &manifest.chunks {
            ChunkList::Flat(chunks) => chunks.iter().flatten().copied().for_each(f),
            ChunkList::Paged { page_chunks, pages } => {
                let count = manifest.chunk_count();
                for (p, id) in pages.iter().enumerate() {
                    let Some(id) = id else { continue };
                    if !seen.insert(*id) {
                        continue;
                    }
                    match self.page_entries_or_blob(index, *page_chunks, pages, count, p) {
                        Ok(page) => {
                            page.blobs.iter().copied().for_each(&mut f);
                            page.entries.iter().flatten().copied().for_each(&mut f);
                        }
                        Err((blob, e)) => {
                            // Not done: a retry (after the index is refreshed) reads it again.
                            seen.remove(id);
                            bad(blob, e);
                        }
                    }
                }
            }
        }
    }

    /// The whole chunk list of `manifest`, one entry per chunk (`None`: a hole), all in memory
    /// (33 bytes per chunk): for tools and tests. Restore, verify and prune read it a page at a
    /// time.
    pub fn chunk_list(&self, manifest: &VolumeManifest) -> Result<Vec<Option<ChunkId>>> {
        self.chunk_entries(manifest, 0..manifest.chunk_count())
    }

    /// The chunk list page blobs `manifest` references (each page, and a delta's base), in
    /// page order; none for a format 1 or 2 manifest.
    pub fn page_blobs(&self, manifest: &VolumeManifest) -> Result<Vec<ChunkId>> {
        let mut blobs = Vec::new();
        self.for_each_page(manifest, |_, _, b| {
            blobs.extend_from_slice(b);
            Ok(())
        })?;
        Ok(blobs)
    }

    /// The largest blob a manifest's list may hold: its pages, or a chunk.
    pub(crate) fn max_blob_len(&self, manifest: &VolumeManifest) -> usize {
        let chunk = manifest.chunk_size as usize;
        match &manifest.chunks {
            ChunkList::Flat(_) => chunk,
            ChunkList::Paged { page_chunks, .. } => chunk.max(pages::max_page_len(*page_chunks)),
        }
    }
}

/// A parent's entries in chunk order, its pages read one at a time as they are reached. A page
/// that does not read ends the entries as holes and is recorded in [`ParentEntries::failed`]:
/// the caller must then not use what it took from the parent.
pub(crate) struct ParentEntries<'r> {
    repo: &'r Repository,
    manifest: &'r VolumeManifest,
    next_page: usize,
    /// The page being taken, and how many of its entries were taken.
    page: Vec<Option<ChunkId>>,
    at: usize,
    failed: std::rc::Rc<std::cell::Cell<Option<String>>>,
}

impl<'r> ParentEntries<'r> {
    pub(crate) fn new(repo: &'r Repository, manifest: &'r VolumeManifest) -> Self {
        ParentEntries {
            repo,
            manifest,
            next_page: 0,
            page: Vec::new(),
            at: 0,
            failed: std::rc::Rc::default(),
        }
    }

    /// Where a page that did not read is recorded (why), shared with the caller.
    pub(crate) fn failed(&self) -> std::rc::Rc<std::cell::Cell<Option<String>>> {
        std::rc::Rc::clone(&self.failed)
    }

    /// Copies the next entries into `out`, as many as fit; returns how many (fewer only past
    /// the parent's last entry). For a run of chunks taken whole, without a call per entry.
    pub(crate) fn fill(&mut self, out: &mut [Option<ChunkId>]) -> usize {
        let mut k = 0;
        while k < out.len() {
            if self.at == self.page.len() && !self.next_page() {
                break;
            }
            let n = (self.page.len() - self.at).min(out.len() - k);
            out[k..k + n].copy_from_slice(&self.page[self.at..self.at + n]);
            self.at += n;
            k += n;
        }
        k
    }

    /// Reads the next page; `false` when there is none.
    fn next_page(&mut self) -> bool {
        let (per, pages) = match &self.manifest.chunks {
            ChunkList::Flat(chunks) => (chunks.len().max(1), 1),
            ChunkList::Paged { page_chunks, pages } => (*page_chunks as usize, pages.len()),
        };
        if self.next_page >= pages {
            return false;
        }
        let p = self.next_page;
        self.next_page += 1;
        let first = (p * per) as u64;
        let last = self.manifest.chunk_count().min(first + per as u64);
        self.page = match self.repo.chunk_entries(self.manifest, first..last) {
            Ok(entries) => entries,
            Err(e) => {
                self.failed.set(Some(e.to_string()));
                vec![None; usize::try_from(last - first).unwrap_or(0)]
            }
        };
        self.at = 0;
        true
    }
}

impl Iterator for ParentEntries<'_> {
    type Item = Option<ChunkId>;

    fn next(&mut self) -> Option<Option<ChunkId>> {
        let mut one = [None];
        (self.fill(&mut one) == 1).then_some(one[0])
    }
}

/// How many entries page `p` holds (the last one may be short).
pub(crate) fn page_len(page_chunks: u32, count: u64, p: usize) -> usize {
    let first = p as u64 * u64::from(page_chunks);
    to_usize(count.saturating_sub(first).min(u64::from(page_chunks)))
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("a page index fits in memory")
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).expect("a page holds fewer than 4 G entries")
}

/// Builds a backup's chunk list page by page as the reader walks the volume: each finished page
/// is compared with the parent backup's page at the same place and becomes the parent's page id
/// (unchanged: nothing stored), a delta against the parent's full base page (few changes), or a
/// new full page; new page blobs go into the backup's packs through `store`.
pub(crate) struct PageBuilder<'p> {
    page_chunks: u32,
    count: u64,
    /// The parent's page list, when it has the same size, chunk size and page size.
    parent: Option<&'p [Option<ChunkId>]>,
    current: Vec<Option<ChunkId>>,
    pages: Vec<Option<ChunkId>>,
    sent: IdSet<ChunkId>,
    plain: Vec<u8>,
    /// Plaintext bytes of the page blobs this backup stores.
    pub stored_bytes: u64,
}

impl<'p> PageBuilder<'p> {
    /// A builder for a volume of `count` chunks; `parent` is the parent backup's manifest.
    pub(crate) fn new(count: u64, parent: Option<&'p VolumeManifest>) -> Self {
        let page_chunks = pages::page_chunks_for(count);
        let parent = parent.and_then(|m| match &m.chunks {
            ChunkList::Paged { page_chunks: pc, pages }
                if *pc == page_chunks && m.chunk_count() == count =>
            {
                Some(pages.as_slice())
            }
            _ => None,
        });
        PageBuilder {
            page_chunks,
            count,
            parent,
            current: Vec::with_capacity(page_len(page_chunks, count, 0)),
            pages: Vec::with_capacity(to_usize(count.div_ceil(u64::from(page_chunks)))),
            sent: IdSet::default(),
            plain: Vec::new(),
            stored_bytes: 0,
        }
    }

    /// Adds the next chunk's entry; a page that fills up is finished (`store` gets its blob if
    /// it is new: `false` from `store` means the pipeline stopped, and so does the builder).
    pub(crate) fn push(
        &mut self,
        repo: &Repository,
        entry: Option<ChunkId>,
        store: &mut dyn FnMut(ChunkId, &[u8]) -> bool,
    ) -> Result<bool> {
        self.extend(repo, std::slice::from_ref(&entry), store)
    }

    /// [`PageBuilder::push`] for each of `entries`, in order (a run of chunks taken whole).
    pub(crate) fn extend(
        &mut self,
        repo: &Repository,
        mut entries: &[Option<ChunkId>],
        store: &mut dyn FnMut(ChunkId, &[u8]) -> bool,
    ) -> Result<bool> {
        while !entries.is_empty() {
            let want = page_len(self.page_chunks, self.count, self.pages.len());
            let n = want.saturating_sub(self.current.len()).min(entries.len()).max(1);
            self.current.extend_from_slice(&entries[..n]);
            entries = &entries[n..];
            if self.current.len() >= want && !self.finish_page(repo, store)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn finish_page(
        &mut self,
        repo: &Repository,
        store: &mut dyn FnMut(ChunkId, &[u8]) -> bool,
    ) -> Result<bool> {
        let p = self.pages.len();
        let entries = std::mem::take(&mut self.current);
        self.current = Vec::with_capacity(page_len(self.page_chunks, self.count, p + 1));
        if entries.iter().all(Option::is_none) {
            self.pages.push(None);
            return Ok(true);
        }
        // The parent's page here, and the full page it is (or is a delta of): reused as it is
        // when nothing changed, the base of a delta when little did. Only blobs new backups may
        // dedup against (not marked by a prune) are referenced again.
        let mut base = None;
        if let Some(Some(parent_id)) = self.parent.and_then(|pages| pages.get(p).copied()) {
            if repo.index.contains_key(&parent_id) {
                let parent = repo.page_entries(
                    self.page_chunks,
                    self.parent.unwrap_or_default(),
                    self.count,
                    p,
                )?;
                if parent.entries == entries {
                    self.pages.push(Some(parent_id));
                    return Ok(true);
                }
                let base_id = *parent.blobs.last().expect("a stored page has a blob");
                if repo.index.contains_key(&base_id) {
                    let base_entries = if parent.blobs.len() == 1 {
                        parent.entries
                    } else {
                        match &*repo.load_page(base_id, entries.len())? {
                            Page::Full(e) => e.clone(),
                            Page::Delta { .. } => {
                                return Err(Error::Damaged {
                                    what: format!("chunk list page {base_id}"),
                                    reason: "a delta's base is itself a delta".into(),
                                })
                            }
                        }
                    };
                    base = Some((base_id, base_entries));
                }
            }
        }
        let limit = entries.len() / pages::DELTA_SHARE;
        match base.and_then(|(id, b)| Some((id, pages::diff(&b, &entries, limit)?))) {
            Some((base_id, changes)) => {
                pages::encode_delta(entries.len(), &base_id, &changes, &mut self.plain)
            }
            None => pages::encode_full(&entries, &mut self.plain),
        }
        let id = ChunkId(repo.key.chunk_id(&self.plain));
        self.pages.push(Some(id));
        if !repo.index.contains_key(&id) && self.sent.insert(id) {
            self.stored_bytes += self.plain.len() as u64;
            return Ok(store(id, &self.plain));
        }
        Ok(true)
    }

    /// The chunk list, once every chunk was pushed.
    pub(crate) fn finish(self) -> ChunkList {
        ChunkList::Paged { page_chunks: self.page_chunks, pages: self.pages }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::crypto::{KdfParams, Secret};
    use crate::manifest::VolumeMeta;
    use crate::repo::InitOptions;
    use crate::VolumeBackup;

    /// A repository in `dir` and the backup of a volume of `size` bytes, holes but for a 4 KiB
    /// chunk at each of `offsets` (the k-th all bytes k + 1).
    fn backed_up(dir: &std::path::Path, size: u64, offsets: &[u64]) -> (Repository, VolumeBackup) {
        let source = dir.join("image");
        let image = File::create(&source).expect("create image");
        image.set_len(size).expect("size image");
        for (k, off) in offsets.iter().enumerate() {
            image.write_all_at(&[k as u8 + 1; 4096], *off).expect("write");
        }
        let opts = InitOptions {
            kdf: KdfParams { m_cost_kib: 8 * 1024, t_cost: 1, p_cost: 1 },
            ..InitOptions::default()
        };
        let secret = Secret::passphrase("pages");
        let mut repo = Repository::init_with(&dir.join("repo"), &secret, opts).expect("init");
        let meta = VolumeMeta { backup: "b".into(), server: "s".into(), volume: "v".into() };
        let done = repo.backup_volume(&source, meta, &mut |_| {}).expect("backup");
        (repo, done)
    }

    #[test]
    fn the_pages_read_last_are_decoded_once_and_older_ones_read_again_and_the_same() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Four pages of 4096 chunks, one data chunk in each (the rest holes).
        let page = u64::from(pages::MIN_PAGE_CHUNKS) * 4096;
        let offsets: Vec<u64> = (0..4).map(|p| p * page + 8192).collect();
        let (repo, done) = backed_up(dir.path(), 4 * page, &offsets);
        let ChunkList::Paged { page_chunks, pages: ids } = &done.manifest.chunks else {
            panic!("a new backup's list is paged")
        };
        assert_eq!(ids.len(), 4);
        let ids: Vec<ChunkId> = ids.iter().map(|id| id.expect("every page holds data")).collect();
        let n = *page_chunks as usize;
        let first = repo.load_page(ids[0], n).expect("page 0");
        assert!(Arc::ptr_eq(&first, &repo.load_page(ids[0], n).expect("page 0 again")));
        let second = repo.load_page(ids[1], n).expect("page 1");
        assert!(Arc::ptr_eq(&first, &repo.load_page(ids[0], n).expect("page 0, kept")));
        // Two more pages push the first two out: read again, decoded anew, the same entries.
        for id in &ids[2..] {
            repo.load_page(*id, n).expect("pages 2 and 3");
        }
        let again = repo.load_page(ids[0], n).expect("page 0, read again");
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(*first, *again);
        assert_ne!(*first, *second);
        let Page::Full(entries) = &*again else { panic!("a first backup's pages are full") };
        assert_eq!(entries.iter().flatten().count(), 1);
        assert!(entries[2].is_some(), "the data chunk at 8 KiB");
    }

    /// A run of entries taken whole (a window no change touched) gives what one at a time
    /// gives: `ParentEntries::fill` the iterator's entries, `PageBuilder::extend` the pages
    /// `push` builds, whatever the runs' lengths against the pages'.
    #[test]
    fn entries_taken_in_runs_are_the_ones_taken_one_at_a_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let page = u64::from(pages::MIN_PAGE_CHUNKS) * 4096;
        let offsets = [0, 4096 * 4095, page, 2 * page + 4096, 3 * page + 4 * 4096];
        let (repo, done) = backed_up(dir.path(), 3 * page + 5 * 4096, &offsets);
        let m = &done.manifest;
        let one_by_one: Vec<Option<ChunkId>> = ParentEntries::new(&repo, m).collect();
        assert_eq!(one_by_one.len() as u64, m.chunk_count());
        let mut runs = ParentEntries::new(&repo, m);
        let mut got = Vec::new();
        for len in [1, 4094, 3, 7000, 5000, 9].into_iter().cycle() {
            let mut buf = vec![Some(ChunkId([9; 32])); len];
            let n = runs.fill(&mut buf);
            got.extend_from_slice(&buf[..n]);
            if n < len {
                break;
            }
        }
        assert_eq!(got, one_by_one);

        // The same entries pushed, or extended in runs: the parent's pages, shared.
        let n = m.chunk_count();
        let mut store = |_: ChunkId, _: &[u8]| true;
        let mut pushed = PageBuilder::new(n, Some(m));
        for e in &one_by_one {
            assert!(pushed.push(&repo, *e, &mut store).expect("push"));
        }
        let mut extended = PageBuilder::new(n, Some(m));
        for piece in one_by_one.chunks(3000) {
            assert!(extended.extend(&repo, piece, &mut store).expect("extend"));
        }
        let (pushed, extended) = (pushed.finish(), extended.finish());
        assert_eq!(pushed, extended);
        assert_eq!(extended, m.chunks, "nothing changed: every page the parent's");
        // One entry changed: its page is no longer the parent's, the others still are.
        let mut changed = one_by_one.clone();
        changed[2 * pages::MIN_PAGE_CHUNKS as usize + 1] = None;
        let mut extended = PageBuilder::new(n, Some(m));
        for piece in changed.chunks(777) {
            assert!(extended.extend(&repo, piece, &mut store).expect("extend"));
        }
        let (ChunkList::Paged { pages: now, .. }, ChunkList::Paged { pages: then, .. }) =
            (extended.finish(), &m.chunks)
        else {
            panic!("paged lists")
        };
        let same: Vec<bool> = now.iter().zip(then).map(|(a, b)| a == b).collect();
        assert_eq!(same, [true, true, false, true]);
    }
}
