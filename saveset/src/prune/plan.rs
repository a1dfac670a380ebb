//! Prune's decisions, free of IO: which chunk copy counts, which packs are unused or partly
//! used, which pending-deletion records are ripe, which packs must be rescued. Time is an
//! input. The steps that act on these are in `mod.rs`; the design is in FORMAT.md, "Prune".

use crate::lock::LockInfo;
use crate::manifest::ChunkId;

/// A pack is repacked when at least this share (percent) of its bytes is not used.
pub(crate) const REPACK_UNUSED_PERCENT: u64 = 20;

/// One index entry: chunk `chunk` at `offset` (sealed length `len`) in pack number `pack`.
/// Ordered by chunk, then pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Entry {
    pub chunk: ChunkId,
    pub pack: u32,
    pub offset: u32,
    pub len: u32,
}

/// What to do with a pack that is not already marked for deletion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    Keep,
    /// No chunk of it counts: mark it for deletion.
    Unused,
    /// Copy the chunks that count into new packs, then mark it.
    Repack,
}

/// Bytes of an entry as an external sort holds it: ordered bytewise as (chunk, pack).
pub(crate) const ENTRY_REC: usize = 44;

impl Entry {
    pub(crate) fn to_rec(self) -> [u8; ENTRY_REC] {
        let mut r = [0u8; ENTRY_REC];
        r[..32].copy_from_slice(&self.chunk.0);
        r[32..36].copy_from_slice(&self.pack.to_be_bytes());
        r[36..40].copy_from_slice(&self.offset.to_be_bytes());
        r[40..44].copy_from_slice(&self.len.to_be_bytes());
        r
    }

    pub(crate) fn from_rec(r: &[u8; ENTRY_REC]) -> Entry {
        let u = |at: usize| u32::from_be_bytes(r[at..at + 4].try_into().expect("4 bytes"));
        Entry {
            chunk: ChunkId(r[..32].try_into().expect("32 bytes")),
            pack: u(32),
            offset: u(36),
            len: u(40),
        }
    }
}

/// Calls `group` with each chunk of `entries` (sorted by chunk, then pack) and all its
/// entries, and whether `referenced` (sorted, distinct) holds it. Both are streams: neither is
/// ever whole in memory.
fn join<E>(
    entries: impl Iterator<Item = Result<Entry, E>>,
    referenced: impl Iterator<Item = Result<ChunkId, E>>,
    group: &mut dyn FnMut(&[Entry], bool),
) -> Result<(), E> {
    let mut referenced = referenced.peekable();
    let mut cur: Vec<Entry> = Vec::new();
    let mut flush =
        |cur: &mut Vec<Entry>, referenced: &mut std::iter::Peekable<_>| -> Result<(), E> {
            let Some(first) = cur.first() else { return Ok(()) };
            let chunk = first.chunk;
            let mut hit = false;
            while referenced
                .next_if(|r: &Result<ChunkId, E>| r.as_ref().is_ok_and(|r| *r < chunk))
                .is_some()
            {}
            match referenced.peek() {
                Some(Ok(r)) => hit = *r == chunk,
                Some(Err(_)) => {
                    if let Some(Err(e)) = referenced.next() {
                        return Err(e);
                    }
                }
                None => {}
            }
            group(cur, hit);
            cur.clear();
            Ok(())
        };
    for e in entries {
        let e = e?;
        if cur.first().is_some_and(|f| f.chunk != e.chunk) {
            flush(&mut cur, &mut referenced)?;
        }
        cur.push(e);
    }
    flush(&mut cur, &mut referenced)
}

/// Calls `counts` with each entry of `entries` (sorted by chunk, then pack) that is the copy
/// that counts: its chunk is in `referenced` (sorted, distinct) and this is its entry in the
/// most recently written pack (`written`, by pack number; ties to the lowest number) that is
/// not `pending`. A chunk held only by pending packs counts nowhere here; the rescue at
/// deletion time keeps one of them if it is still referenced.
///
/// Why the newest: a second copy comes from a repack whose prune stopped before it marked the
/// packs it copied from (or from two writers storing one new chunk). Counting the repack's
/// copy leaves those old packs' copies unused, so the next prune deletes or repacks them and
/// ends where the stopped one would have; counting an old copy instead could keep the new
/// pack, dead copy included, and repack the old one again, leaving two copies for good.
pub(crate) fn counting<E>(
    entries: impl Iterator<Item = Result<Entry, E>>,
    referenced: impl Iterator<Item = Result<ChunkId, E>>,
    pending: &[bool],
    written: &[u64],
    counts: &mut dyn FnMut(&Entry),
) -> Result<(), E> {
    let when = |pack: u32| written.get(pack as usize).copied().unwrap_or(0);
    join(entries, referenced, &mut |group, hit| {
        if hit {
            let live = group.iter().filter(|e| !pending[e.pack as usize]);
            if let Some(e) = live.max_by_key(|e| (when(e.pack), std::cmp::Reverse(e.pack))) {
                counts(e);
            }
        }
    })
}

/// A pack of `size` bytes of which `used` are chunks that count.
pub(crate) fn classify(size: u64, used: u64) -> Class {
    if used == 0 {
        Class::Unused
    } else if size.saturating_sub(used) * 100 >= size * REPACK_UNUSED_PERCENT {
        Class::Repack
    } else {
        Class::Keep
    }
}

/// Whether a lock still holds prune back at `now_ms`: present and refreshed less than
/// `stale_ms` ago, or present and unreadable (it may be a live writer's).
pub(crate) fn lock_is_live(
    lock: &std::result::Result<LockInfo, String>,
    now_ms: u64,
    stale_ms: u64,
) -> bool {
    match lock {
        Ok(info) => now_ms.saturating_sub(info.refreshed_unix_ms) < stale_ms,
        Err(_) => true,
    }
}

/// Why a pending-deletion record cannot be acted on yet, or `None` when it is ripe: its lock
/// list is set, none of `live_locks` (the ids of the locks live now) is in it, and `grace_ms`
/// has passed since it was created.
pub(crate) fn not_ripe(
    created_ms: u64,
    locks: Option<&[String]>,
    live_locks: &[String],
    now_ms: u64,
    grace_ms: u64,
) -> Option<String> {
    let Some(locks) = locks else {
        return Some("the backups running when it was written are not known yet".into());
    };
    let waiting = locks.iter().filter(|l| live_locks.contains(l)).count();
    if waiting > 0 {
        return Some(format!("{waiting} backup(s) running when it was written are still running"));
    }
    let age = now_ms.saturating_sub(created_ms);
    if age < grace_ms {
        return Some(format!("in its grace period for {} s more", (grace_ms - age).div_ceil(1000)));
    }
    None
}

/// The pack numbers to keep although they are `doomed`: for each chunk of `referenced` (sorted,
/// distinct) that has entries (sorted by chunk) and all of them in doomed packs, the pack of its
/// first entry.
pub(crate) fn rescue<E>(
    entries: impl Iterator<Item = Result<Entry, E>>,
    referenced: impl Iterator<Item = Result<ChunkId, E>>,
    doomed: &[bool],
) -> Result<Vec<u32>, E> {
    let mut out = Vec::new();
    join(entries, referenced, &mut |group, hit| {
        if hit && group.iter().all(|e| doomed[e.pack as usize]) {
            out.push(group[0].pack);
        }
    })?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Merges two streams sorted by the same order into one.
pub(crate) fn merge_sorted<T: Ord, E>(
    a: impl Iterator<Item = Result<T, E>>,
    b: impl Iterator<Item = Result<T, E>>,
) -> impl Iterator<Item = Result<T, E>> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(Ok(x)), Some(Ok(y))) => {
            if x <= y {
                a.next()
            } else {
                b.next()
            }
        }
        (Some(Err(_)), _) | (_, None) => a.next(),
        _ => b.next(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(b: u8) -> ChunkId {
        ChunkId([b; 32])
    }

    fn ok<T: Copy>(items: &[T]) -> impl Iterator<Item = Result<T, ()>> + '_ {
        items.iter().map(|&x| Ok(x))
    }

    fn e(chunk: u8, pack: u32) -> Entry {
        Entry { chunk: c(chunk), pack, offset: 0, len: 10 }
    }

    #[test]
    fn a_referenced_chunk_counts_once_in_its_newest_pack_that_is_not_pending() {
        // chunk 1 in packs 0 and 1; chunk 2 in pack 1 (pending) and 2; chunk 3 only pending;
        // chunk 4 unreferenced; chunk 5 in packs 0, 2 and 3, the last two written together.
        let entries =
            [e(1, 0), e(1, 1), e(2, 1), e(2, 2), e(3, 1), e(4, 0), e(5, 0), e(5, 2), e(5, 3)];
        let pending = [false, true, false, false];
        let count = |written: &[u64]| {
            let mut live = Vec::new();
            let refs = [c(1), c(2), c(3), c(5), c(9)];
            counting(ok(&entries), ok(&refs), &pending, written, &mut |e| live.push(*e))
                .expect("no error");
            live
        };
        assert_eq!(count(&[10, 20, 30, 30]), [e(1, 0), e(2, 2), e(5, 2)]);
        // A repack's output (pack 0 written last) holds the copy that counts.
        assert_eq!(count(&[40, 20, 30, 30]), [e(1, 0), e(2, 2), e(5, 0)]);
        // Write times unknown: the first pack.
        assert_eq!(count(&[]), [e(1, 0), e(2, 2), e(5, 0)]);
    }

    #[test]
    fn packs_are_unused_partly_used_or_kept_by_their_unused_share() {
        assert_eq!(classify(1000, 0), Class::Unused);
        assert_eq!(classify(1000, 800), Class::Repack, "20% unused");
        assert_eq!(classify(1000, 801), Class::Keep);
        assert_eq!(classify(1000, 1000), Class::Keep);
    }

    #[test]
    fn locks_are_live_until_stale_and_unreadable_ones_always() {
        let info = |refreshed| LockInfo {
            host: "h".into(),
            pid: 1,
            started_unix_ms: 0,
            refreshed_unix_ms: refreshed,
        };
        assert!(lock_is_live(&Ok(info(1_000)), 1_999, 1_000));
        assert!(!lock_is_live(&Ok(info(1_000)), 2_000, 1_000));
        assert!(lock_is_live(&Ok(info(5_000)), 1_000, 1_000), "refreshed ahead of our clock");
        assert!(lock_is_live(&Err("does not decrypt".into()), u64::MAX, 1));
    }

    #[test]
    fn a_record_is_ripe_once_its_writers_are_gone_and_the_grace_passed() {
        let live = ["a".to_owned()];
        let why = not_ripe(0, None, &[], 10, 0).expect("locks unknown");
        assert!(why.contains("not known"), "{why}");
        let why = not_ripe(0, Some(&["a".into(), "b".into()]), &live, 10, 0).expect("a runs");
        assert!(why.contains("1 backup(s)"), "{why}");
        let why = not_ripe(1_000, Some(&["b".into()]), &live, 1_500, 2_000).expect("young");
        assert!(why.contains("2 s more"), "{why}");
        assert_eq!(not_ripe(1_000, Some(&["b".into()]), &live, 3_000, 2_000), None);
        assert_eq!(not_ripe(1_000, Some(&[]), &live, 1_000, 0), None);
    }

    #[test]
    fn a_chunk_still_referenced_only_in_doomed_packs_rescues_its_first_pack() {
        let entries = [e(1, 0), e(1, 1), e(2, 1), e(2, 2), e(3, 2), e(4, 3)];
        // Packs 0, 1, 2 doomed, 3 stays.
        let doomed = [true, true, true, false];
        assert_eq!(rescue(ok(&entries), ok(&[c(1), c(3), c(4), c(5)]), &doomed), Ok(vec![0, 2]));
        assert_eq!(rescue(ok(&entries), ok(&[c(4)]), &doomed), Ok(vec![]));
    }

    #[test]
    fn merged_streams_stay_sorted_and_entries_survive_their_record_form() {
        let got: Vec<u8> = merge_sorted(ok(&[1u8, 4, 6]), ok(&[2u8, 3, 7]))
            .collect::<Result<_, ()>>()
            .expect("no error");
        assert_eq!(got, [1, 2, 3, 4, 6, 7]);
        let x = Entry { chunk: c(3), pack: 70_000, offset: 5, len: 9 };
        assert_eq!(Entry::from_rec(&x.to_rec()), x);
        assert!(e(1, 300).to_rec() < e(2, 0).to_rec(), "ordered by chunk, then pack");
    }
}
