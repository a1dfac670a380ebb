//! Chunks that copies sharing one [`Pool`](crate::Pool) are storing right now.
//!
//! Each copy checks its own snapshot of the index, so two servers cloned from one template and
//! copied at the same time would each store the template's blocks: the index only learns of a
//! chunk once its pack is written. Claims close that window inside one process (the listener
//! copying many servers off a SAN): the first copy to meet a new chunk claims it and stores it;
//! a sibling that meets it while the claim is pending references it without storing it, and
//! before writing its manifest waits until every such chunk is durable (its pack and index
//! written). If the claimant fails, or is still holding the chunk in an unwritten pack when the
//! wait runs out, the sibling stores the chunk itself: a manifest never references a chunk
//! that is not durable, and at worst a chunk is stored twice, as without claims.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::index::IdMap;
use crate::manifest::ChunkId;

/// One copy in progress, as its claims are marked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CopyToken(u64);

/// What [`Claims::claim`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claimed {
    /// Nobody had it: this copy stores it.
    Mine,
    /// This copy claimed it before (a repeat within the volume): already on its way.
    Again,
    /// Another copy is storing it: reference it and [`Claims::wait`] before the manifest.
    Pending,
    /// Stored durably (the index has it): just reference it. Claims never answer this: a
    /// stored chunk is the index's to know.
    Stored,
}

#[derive(Clone, Copy)]
enum State {
    Pending(CopyToken),
}

#[derive(Default)]
pub(crate) struct Claims {
    inner: Mutex<Inner>,
    changed: Condvar,
}

#[derive(Default)]
struct Inner {
    chunks: IdMap<ChunkId, State>,
    next_token: u64,
    /// Copies in progress; the map is emptied when the last one ends (their chunks are then
    /// in the index files every later copy loads).
    active: usize,
}

impl Claims {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy starts.
    pub(crate) fn begin(&self) -> CopyToken {
        let mut inner = self.lock();
        inner.active += 1;
        inner.next_token += 1;
        CopyToken(inner.next_token)
    }

    /// `copy` meets chunk `id`, which its index does not have.
    pub(crate) fn claim(&self, id: ChunkId, copy: CopyToken) -> Claimed {
        let mut inner = self.lock();
        match inner.chunks.get(&id) {
            None => {
                inner.chunks.insert(id, State::Pending(copy));
                Claimed::Mine
            }
            Some(State::Pending(owner)) if *owner == copy => Claimed::Again,
            Some(State::Pending(_)) => Claimed::Pending,
        }
    }

    /// These chunks are durable: their pack and its index are written, and the pool's shared
    /// index has them, so the claims forget them (they hold only chunks in flight, not every
    /// chunk the pool's copies stored).
    pub(crate) fn stored(&self, ids: impl IntoIterator<Item = ChunkId>) {
        let mut inner = self.lock();
        for id in ids {
            inner.chunks.remove(&id);
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// `copy` ended (done or failed): its claims still pending will never be stored by it.
    pub(crate) fn end(&self, copy: CopyToken) {
        let mut inner = self.lock();
        inner.active = inner.active.saturating_sub(1);
        if inner.active == 0 {
            inner.chunks = IdMap::default();
        } else {
            inner
                .chunks
                .retain(|_, state| !matches!(state, State::Pending(owner) if *owner == copy));
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// Waits until no chunk of `ids` is pending any more, or `deadline`; returns those not
    /// `durable` (their claimant failed, or has not written them yet): the caller stores them.
    /// `durable` (the shared index) is asked after the claims' lock is let go.
    pub(crate) fn wait(
        &self,
        ids: &[ChunkId],
        deadline: Instant,
        durable: impl Fn(&ChunkId) -> bool,
    ) -> Vec<ChunkId> {
        let mut inner = self.lock();
        loop {
            let pending =
                ids.iter().any(|id| matches!(inner.chunks.get(id), Some(State::Pending(_))));
            let now = Instant::now();
            if !pending || now >= deadline {
                drop(inner);
                return ids.iter().filter(|id| !durable(id)).copied().collect();
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn id(b: u8) -> ChunkId {
        ChunkId([b; 32])
    }

    #[test]
    fn the_first_copy_stores_a_chunk_and_the_others_wait_for_it() {
        let claims = Claims::default();
        let (a, b) = (claims.begin(), claims.begin());
        assert_eq!(claims.claim(id(1), a), Claimed::Mine);
        assert_eq!(claims.claim(id(1), a), Claimed::Again);
        assert_eq!(claims.claim(id(1), b), Claimed::Pending);
        std::thread::scope(|s| {
            let durable = |c: &ChunkId| *c == id(1); // the index has it once stored
            let claims = &claims;
            let waiter = s.spawn(move || {
                claims.wait(&[id(1)], Instant::now() + Duration::from_secs(30), durable)
            });
            std::thread::sleep(Duration::from_millis(20));
            claims.stored([id(1)]);
            assert!(waiter.join().expect("no panic").is_empty(), "stored, so nothing missing");
        });
        assert_eq!(claims.claim(id(3), b), Claimed::Mine);
        claims.stored([id(3)]);
        assert!(claims.lock().chunks.is_empty(), "stored chunks are the index's, not held here");
    }

    #[test]
    fn a_failed_claimant_releases_its_chunks_and_a_slow_one_runs_out_the_wait() {
        let claims = Claims::default();
        let (a, b) = (claims.begin(), claims.begin());
        claims.claim(id(1), a);
        claims.claim(id(2), a);
        assert_eq!(claims.claim(id(2), b), Claimed::Pending);
        // Still pending at the deadline: the waiter stores it itself.
        let start = Instant::now();
        let none = |_: &ChunkId| false;
        assert_eq!(claims.wait(&[id(2)], start + Duration::from_millis(50), none), vec![id(2)]);
        assert!(start.elapsed() >= Duration::from_millis(50));
        // `a` fails: the wait returns as soon as it does, long before its deadline.
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                claims.wait(&[id(1), id(2)], Instant::now() + Duration::from_secs(30), none)
            });
            std::thread::sleep(Duration::from_millis(20));
            claims.end(a);
            assert_eq!(waiter.join().expect("no panic").len(), 2);
        });
        // Released chunks can be claimed again.
        assert_eq!(claims.claim(id(1), b), Claimed::Mine);
        claims.end(b);
        assert_eq!(claims.claim(id(1), claims.begin()), Claimed::Mine, "emptied when all ended");
    }
}
