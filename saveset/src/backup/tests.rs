//! Claims between sibling copies: a chunk a sibling claimed and never stored is stored by the
//! copy that waited for it, so its manifest never references a chunk that is not durable. What
//! a change map's reader asks the kernel to read ahead.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::*;
use crate::crypto::{KdfParams, Secret};
use crate::repo::InitOptions;

#[test]
fn chunks_a_failed_sibling_claimed_are_stored_by_the_copy_that_waited() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("image");
    // 64 distinct incompressible chunks.
    let mut image = vec![0u8; 64 * 4096];
    blake3::Hasher::new().update(b"sibling").finalize_xof().fill(&mut image);
    File::create(&source).and_then(|f| f.write_all_at(&image, 0)).expect("write image");
    let opts = InitOptions {
        kdf: KdfParams { m_cost_kib: 8 * 1024, t_cost: 1, p_cost: 1 },
        ..InitOptions::default()
    };
    let secret = Secret::passphrase("siblings");
    let mut repo = Repository::init_with(&dir.path().join("repo"), &secret, opts).expect("init");
    let claims = Arc::new(Claims::default());
    repo.claims = Some(Arc::clone(&claims));
    // A sibling claims every chunk of the image, then fails without storing any.
    let sibling = claims.begin();
    for chunk in image.chunks(4096) {
        assert_eq!(claims.claim(ChunkId(repo.key.chunk_id(chunk)), sibling), Claimed::Mine);
    }
    let backup = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            claims.end(sibling);
        });
        let meta = VolumeMeta { backup: "b".into(), server: "s".into(), volume: "v".into() };
        repo.backup_volume(&source, meta, &mut |_| {}).expect("backup")
    });
    assert_eq!(backup.stats.new_chunks, 64, "{:?}", backup.stats);
    assert_eq!(backup.stats.reused_chunks, 0, "{:?}", backup.stats);
    let fresh = Repository::open(&dir.path().join("repo"), &secret).expect("open");
    let report = fresh.verify(true).expect("verify");
    assert!(report.is_ok(), "{:?}", report.damage);
    let target = dir.path().join("restored");
    fresh.restore_volume(backup.id, &target, false).expect("restore");
    assert!(std::fs::read(&target).expect("read back") == image);
}

/// Walks a reader over `chunks` in windows of `window`, as `read_chunks` does, and returns what
/// `Ahead` asked for; checks at each step that nothing asked for is behind the reader or more
/// than `limit` changed chunks ahead of it.
fn walk(
    ranges: &[Range<u64>],
    chunks: u64,
    window: u64,
    limit: u64,
    piece: u64,
) -> Vec<Range<u64>> {
    let mut ahead = Ahead::new(ranges, chunks, limit, piece);
    let mut all: Vec<Range<u64>> = Vec::new();
    let mut reader = 0;
    while reader < chunks {
        let mut out = Vec::new();
        ahead.next(reader, &mut out);
        for p in &out {
            assert!(p.start >= reader && p.start < p.end && p.end <= chunks, "{p:?} at {reader}");
            assert!(p.end - p.start <= piece, "{p:?} larger than a piece");
        }
        all.extend(out);
        // Changed chunks asked for at or after the reader: within the limit.
        let pending: u64 = all.iter().map(|p| p.end.saturating_sub(p.start.max(reader))).sum();
        assert!(pending <= limit, "{pending} chunks asked ahead of {reader}, limit {limit}");
        reader += window;
    }
    all
}

/// The chunks inside `ranges` (below `chunks`), one by one.
fn chunks_in(ranges: &[Range<u64>], chunks: u64) -> Vec<u64> {
    ranges.iter().flat_map(|r| r.start.min(chunks)..r.end.min(chunks)).collect()
}

#[test]
fn every_changed_chunk_is_asked_for_once_in_order_and_never_far_ahead_of_the_reader() {
    // Scattered single chunks, a cluster, a range larger than the limit, one past the end.
    let mut ranges: Vec<Range<u64>> = (0..200).map(|i| i * 37 + 5..i * 37 + 6).collect();
    ranges.push(8000..8016);
    ranges.push(9000..12000);
    ranges.push(12500..20000);
    let chunks = 13000;
    for (window, limit, piece) in [(256, 2048, 256), (1, 3, 2), (7, 1, 1), (256, 100_000, 64)] {
        let asked = walk(&ranges, chunks, window, limit, piece);
        let mut got = chunks_in(&asked, chunks);
        let want = chunks_in(&ranges, chunks);
        // In order and once each; a chunk is only left out when the reader had passed it
        // before it could be asked for (the limit was full).
        assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order or twice: {window} {limit}");
        got.retain(|c| want.binary_search(c).is_ok());
        assert_eq!(got.len(), chunks_in(&asked, chunks).len(), "asked outside the map");
        if limit >= window * 2 {
            assert_eq!(got, want, "window {window}, limit {limit}: some changed chunk never asked");
        }
    }
}

#[test]
fn nothing_is_asked_for_without_changes_and_all_of_a_small_map_at_once() {
    let mut out = Vec::new();
    Ahead::new(&[], 1000, 64, 16).next(0, &mut out);
    assert!(out.is_empty());
    let ranges = [3..4, 10..12, 500..501];
    Ahead::new(&ranges, 1000, 64, 16).next(0, &mut out);
    assert_eq!(out, vec![3..4, 10..12, 500..501]);
}

/// The sampling verify's sample: exactly `want` distinct skipped chunks (all of them when
/// fewer), each as likely as any other, whether offered one at a time or in runs (a window
/// taken whole offers 256 at once). Seeded, so the counts are the same every run.
#[test]
fn the_sample_is_uniform_and_as_large_as_asked_one_by_one_or_in_runs() {
    let item = |i: usize| (i as u64 * 4096, 4096, None);
    let (n, want, trials) = (10_000usize, 100usize, 1_000u64);
    for runs in [false, true] {
        // Picks per tenth of the items, over all trials.
        let mut tenths = [0u64; 10];
        for t in 0..trials {
            let mut s = Sampler::seeded(want, t * 7919 + u64::from(runs));
            let mut at = 0;
            while at < n {
                // Runs of 1 to 600 items, the length drawn from the trial.
                let len = if runs { (1 + (at * 31 + t as usize) % 600).min(n - at) } else { 1 };
                s.offer_run(len, |k| item(at + k));
                at += len;
            }
            assert_eq!(s.seen, n as u64);
            let mut offs: Vec<u64> = s.picked.iter().map(|&(off, _, _)| off).collect();
            offs.sort_unstable();
            offs.dedup();
            assert_eq!(offs.len(), want, "distinct and as many as asked");
            for off in offs {
                tenths[(off / 4096) as usize * 10 / n] += 1;
            }
        }
        // Expected 10 000 per tenth; a binomial's standard deviation is about 95.
        for (k, &c) in tenths.iter().enumerate() {
            assert!(
                (9_600..=10_400).contains(&c),
                "runs {runs}: tenth {k} picked {c} times: {tenths:?}"
            );
        }
    }
    let mut few = Sampler::seeded(50, 1);
    few.offer_run(20, item);
    few.offer(item(20));
    assert_eq!(few.picked.len(), 21, "fewer than asked: all of them");
    let mut none = Sampler::seeded(0, 1);
    none.offer_run(1000, item);
    assert!(none.picked.is_empty());
}
