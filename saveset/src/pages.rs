//! Chunk lists in pages (volume manifest format 3, FORMAT.md "Chunk list pages"): pure encoding,
//! decoding and diffing, no IO.
//!
//! A volume's chunk list is cut into pages of `page_chunks` entries. Each page is stored as a
//! blob in a pack, named like a chunk by the keyed hash of its bytes, so a page that did not
//! change between two backups is the same blob and is stored once, and the manifest only lists
//! page ids. A page that differs from its parent's in few entries is stored as a *delta* against
//! the parent's *full* page (its base): at most one level, so a reader needs at most two blobs
//! per page however many backups came before.

use crate::manifest::ChunkId;

/// A full page: `b'F' || count (u32 LE) || bitmap of count bits || the id of each data chunk`.
const FULL: u8 = b'F';
/// A delta page: `b'D' || count (u32 LE) || base page id (32) || n (u32 LE) || n entries of
/// (index in page (u32 LE), 0 for a hole or 1 and an id (32))`, indexes strictly increasing.
const DELTA: u8 = b'D';
/// Pages hold at least this many chunks (16 MiB of volume in 4 KiB chunks)...
pub(crate) const MIN_PAGE_CHUNKS: u32 = 4096;
/// ...and a volume has at most this many pages (larger volumes get larger pages), so a manifest
/// lists at most 4096 page ids (128 KiB) whatever the volume's size.
pub(crate) const MAX_PAGES: u64 = 4096;
/// A page is a delta when it differs from its base in at most 1/`DELTA_SHARE` of its entries.
pub(crate) const DELTA_SHARE: usize = 8;

/// The page size for a volume of `chunk_count` chunks: a power of two, at least
/// [`MIN_PAGE_CHUNKS`], enough that the volume has at most [`MAX_PAGES`] pages.
pub(crate) fn page_chunks_for(chunk_count: u64) -> u32 {
    let need = chunk_count.div_ceil(MAX_PAGES).max(u64::from(MIN_PAGE_CHUNKS));
    u32::try_from(need.next_power_of_two()).unwrap_or(1 << 31)
}

/// The largest a page of `page_chunks` entries can be once encoded (a full page of data).
pub(crate) fn max_page_len(page_chunks: u32) -> usize {
    let n = page_chunks as usize;
    5 + n.div_ceil(8) + 32 * n
}

/// One decoded page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Page {
    /// Every entry: `None` is a hole.
    Full(Vec<Option<ChunkId>>),
    /// The entries of page `base` (a full page) with `changes` applied.
    Delta { base: ChunkId, count: u32, changes: Vec<(u32, Option<ChunkId>)> },
}

/// Encodes a full page into `out` (cleared first).
pub(crate) fn encode_full(entries: &[Option<ChunkId>], out: &mut Vec<u8>) {
    out.clear();
    out.push(FULL);
    out.extend_from_slice(&count_of(entries.len()).to_le_bytes());
    let at = out.len();
    out.resize(at + entries.len().div_ceil(8), 0);
    for (i, e) in entries.iter().enumerate() {
        if e.is_some() {
            out[at + i / 8] |= 1 << (i % 8);
        }
    }
    for id in entries.iter().flatten() {
        out.extend_from_slice(&id.0);
    }
}

/// Encodes a delta page of `count` entries against `base` into `out` (cleared first).
pub(crate) fn encode_delta(
    count: usize,
    base: &ChunkId,
    changes: &[(u32, Option<ChunkId>)],
    out: &mut Vec<u8>,
) {
    out.clear();
    out.push(DELTA);
    out.extend_from_slice(&count_of(count).to_le_bytes());
    out.extend_from_slice(&base.0);
    out.extend_from_slice(&count_of(changes.len()).to_le_bytes());
    for (i, e) in changes {
        out.extend_from_slice(&i.to_le_bytes());
        match e {
            None => out.push(0),
            Some(id) => {
                out.push(1);
                out.extend_from_slice(&id.0);
            }
        }
    }
}

fn count_of(n: usize) -> u32 {
    u32::try_from(n).expect("a page holds fewer than 4 G entries")
}

/// Decodes a page; `expected` is how many entries the manifest says it has.
pub(crate) fn decode(plain: &[u8], expected: usize) -> Result<Page, String> {
    let mut r = Reader(plain);
    let kind = r.take(1)?[0];
    let count = r.u32()? as usize;
    if count != expected {
        return Err(format!("holds {count} entries where the manifest expects {expected}"));
    }
    let page = match kind {
        FULL => {
            let bitmap = r.take(count.div_ceil(8))?;
            let mut entries = Vec::with_capacity(count);
            for i in 0..count {
                entries.push(if bitmap[i / 8] & (1 << (i % 8)) == 0 {
                    None
                } else {
                    Some(r.id()?)
                });
            }
            Page::Full(entries)
        }
        DELTA => {
            let base = r.id()?;
            let n = r.u32()? as usize;
            if n > count {
                return Err(format!("a delta of {n} changes to a page of {count}"));
            }
            let mut changes = Vec::with_capacity(n);
            for _ in 0..n {
                let i = r.u32()?;
                if i as usize >= count || changes.last().is_some_and(|&(p, _)| p >= i) {
                    return Err(format!("a change at {i} out of order or outside the page"));
                }
                let e = match r.take(1)?[0] {
                    0 => None,
                    1 => Some(r.id()?),
                    k => return Err(format!("unknown entry kind {k}")),
                };
                changes.push((i, e));
            }
            Page::Delta { base, count: count_of(count), changes }
        }
        k => return Err(format!("unknown page kind {k}")),
    };
    if !r.0.is_empty() {
        return Err(format!("{} bytes after its last entry", r.0.len()));
    }
    Ok(page)
}

/// The entries of a delta page: its full base's entries with the changes applied.
pub(crate) fn apply(
    base: &[Option<ChunkId>],
    count: u32,
    changes: &[(u32, Option<ChunkId>)],
) -> Result<Vec<Option<ChunkId>>, String> {
    if base.len() != count as usize {
        return Err(format!(
            "its base page has {} entries where the delta has {count}",
            base.len()
        ));
    }
    let mut entries = base.to_vec();
    for &(i, e) in changes {
        entries[i as usize] = e;
    }
    Ok(entries)
}

/// The entries where `new` differs from `base` (same length), in order; `None` once there are
/// more than `limit` (a full page is then smaller or near enough).
pub(crate) fn diff(
    base: &[Option<ChunkId>],
    new: &[Option<ChunkId>],
    limit: usize,
) -> Option<Vec<(u32, Option<ChunkId>)>> {
    if base.len() != new.len() {
        return None;
    }
    let mut changes = Vec::new();
    for (i, (b, n)) in base.iter().zip(new).enumerate() {
        if b != n {
            if changes.len() == limit {
                return None;
            }
            changes.push((count_of(i), *n));
        }
    }
    Some(changes)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("cut short".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn id(&mut self) -> Result<ChunkId, String> {
        Ok(ChunkId(self.take(32)?.try_into().expect("32 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Option<ChunkId> {
        Some(ChunkId([n; 32]))
    }

    #[test]
    fn a_full_page_round_trips_with_holes() {
        let entries = vec![id(1), None, None, id(2), id(1), None, id(9), None, None, id(3)];
        let mut out = Vec::new();
        encode_full(&entries, &mut out);
        assert_eq!(out.len(), 5 + 2 + 5 * 32);
        assert_eq!(decode(&out, 10), Ok(Page::Full(entries)));
        assert!(decode(&out, 11).unwrap_err().contains("expects 11"));
        assert!(decode(&out[..out.len() - 1], 10).is_err());
        let mut longer = out.clone();
        longer.push(0);
        assert!(decode(&longer, 10).unwrap_err().contains("after its last entry"));
    }

    #[test]
    fn a_delta_page_round_trips_and_applies_to_its_base() {
        let base = vec![id(1), id(2), None, id(4)];
        let new = vec![id(1), None, id(7), id(4)];
        let changes = diff(&base, &new, 2).expect("two changes fit");
        assert_eq!(changes, vec![(1, None), (2, id(7))]);
        let mut out = Vec::new();
        encode_delta(4, &ChunkId([5; 32]), &changes, &mut out);
        let Ok(Page::Delta { base: b, count, changes: got }) = decode(&out, 4) else {
            panic!("a delta page");
        };
        assert_eq!((b, count), (ChunkId([5; 32]), 4));
        assert_eq!(apply(&base, count, &got), Ok(new));
        assert!(apply(&base[..3], count, &got).is_err());
    }

    #[test]
    fn a_diff_past_its_limit_gives_up() {
        let base = vec![id(1); 16];
        let new = vec![id(2); 16];
        assert_eq!(diff(&base, &new, 15), None);
        assert_eq!(diff(&base, &new, 16).map(|c| c.len()), Some(16));
        assert_eq!(diff(&base, &base, 0), Some(vec![]));
    }

    #[test]
    fn a_delta_out_of_order_or_outside_the_page_is_refused() {
        let mut out = Vec::new();
        encode_delta(4, &ChunkId([5; 32]), &[(2, None), (1, None)], &mut out);
        assert!(decode(&out, 4).unwrap_err().contains("out of order"));
        encode_delta(4, &ChunkId([5; 32]), &[(4, None)], &mut out);
        assert!(decode(&out, 4).unwrap_err().contains("outside the page"));
    }

    #[test]
    fn pages_grow_with_the_volume_so_a_manifest_lists_at_most_4096() {
        assert_eq!(page_chunks_for(0), MIN_PAGE_CHUNKS);
        assert_eq!(page_chunks_for(1 << 20), MIN_PAGE_CHUNKS); // 4 GiB
        assert_eq!(page_chunks_for(1 << 24), 4096); // 64 GiB: 4096 pages of 4096
        assert_eq!(page_chunks_for((1 << 24) + 1), 8192);
        assert_eq!(page_chunks_for(1 << 28), 1 << 16); // 1 TiB
        let one_tib = 1u64 << 28;
        assert!(one_tib.div_ceil(u64::from(page_chunks_for(one_tib))) <= MAX_PAGES);
        assert_eq!(max_page_len(8), 5 + 1 + 256);
    }
}
