//! Restores through the repeat cache, from none to one that holds every repeat.

use std::os::unix::fs::FileExt;

use super::*;
use crate::crypto::{KdfParams, Secret};
use crate::manifest::VolumeMeta;
use crate::repo::InitOptions;

/// A 4 KiB block of pseudo-random (incompressible) bytes, different for every `n`.
fn block(n: u32) -> Vec<u8> {
    let mut out = vec![0u8; 4096];
    blake3::Hasher::new().update(&n.to_le_bytes()).finalize_xof().fill(&mut out);
    out
}

/// A volume of 96 MiB whose chunks repeat across windows, in a different order in each 4 MiB,
/// with unique blocks and holes between: what exercises the repeat cache.
fn repeating_image(path: &Path) -> Vec<u8> {
    const CHUNKS: u32 = 24 * 1024;
    let mut image = vec![0u8; CHUNKS as usize * 4096];
    for i in 0..CHUNKS {
        let window = i / 1024;
        let data = match i % 7 {
            // 100 shared blocks, visited in a different order in every window.
            0 | 3 => Some(block(1_000_000 + (i * (window * 2 + 1) + window) % 100)),
            5 => None,
            _ => Some(block(i)),
        };
        if let Some(data) = data {
            image[i as usize * 4096..][..4096].copy_from_slice(&data);
        }
    }
    let file = File::create(path).expect("create image");
    file.write_all_at(&image, 0).expect("write image");
    image
}

#[test]
fn a_restore_is_bit_for_bit_whatever_the_repeat_cache_holds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("image");
    let image = repeating_image(&source);
    let opts = InitOptions {
        kdf: KdfParams { m_cost_kib: 8 * 1024, t_cost: 1, p_cost: 1 },
        ..InitOptions::default()
    };
    let secret = Secret::passphrase("repeat");
    let mut repo = Repository::init_with(&dir.path().join("repo"), &secret, opts).expect("init");
    let meta = VolumeMeta { backup: "b".into(), server: "s".into(), volume: "v".into() };
    let backup = repo.backup_volume(&source, meta, &mut |_| {}).expect("backup");
    let manifest = backup.manifest;
    // No cache, a cache of 3 chunks (always full: evictions and stale entries), 16 chunks,
    // and one that holds every repeated chunk; in segments of 2 and 4 windows (each looked up
    // and planned on its own) and of the whole volume.
    let mut reused = Vec::new();
    // Locations found in one sorted pass (0) or a segment at a time (u64::MAX).
    for (budget, segment, sorted_above) in [
        (0, SEGMENT, 0),
        (3 * 4096, 2048, u64::MAX),
        (16 * 4096, 5000, 0),
        (48 << 20, SEGMENT, u64::MAX),
    ] {
        let target = dir.path().join(format!("restored-{budget}"));
        let (file, sparse, _) = open_target(&target, manifest.size, false).expect("target");
        let reports = std::sync::Mutex::new(Vec::new());
        let progress = |p: RestoreProgress| reports.lock().expect("not poisoned").push(p.done);
        let stats = repo
            .write_volume(
                &manifest,
                &file,
                sparse,
                &target,
                (budget, segment, sorted_above),
                &progress,
            )
            .expect("restore");
        assert_eq!(stats.size, image.len() as u64);
        assert!(fs::read(&target).expect("read back") == image, "budget {budget}: differs");
        reused.push(stats.bytes_reused);
        // One report per window, the last one the whole volume.
        let mut reports = reports.into_inner().expect("not poisoned");
        reports.sort_unstable();
        let windows: Vec<u64> =
            (1..=(image.len() / WINDOW) as u64).map(|w| w * WINDOW as u64).collect();
        assert_eq!(reports, windows, "budget {budget}");
    }
    // Without a cache only repeats inside a window are copies. A cache serves more; one that
    // holds all 100 shared blocks serves them in every window after the first few (workers
    // start that many windows at once, before anything is cached): of more than 23 × 100
    // repeats across windows, at least 1000.
    eprintln!("bytes reused per cache budget: {reused:?}");
    assert!(reused[1] >= reused[0] && reused[2] > reused[0], "{reused:?}");
    assert!(reused[3] >= reused[0] + 1000 * 4096, "{reused:?}");

    // A memory budget so small that both sorts of the volume's locations (by id, then back by
    // position) spill many runs and merge them, taken by segments of 2048 chunks; and the same
    // budget looking each segment up by itself.
    drop(repo);
    let options = crate::repo::OpenOptions {
        cache_dir: Some(dir.path().join("tiny-cache")),
        memory_budget: Some(64 << 10),
    };
    let location = crate::storage::Location::Local(dir.path().join("repo"));
    let repo = Repository::open_with(&location, &secret, options).expect("open");
    for sorted_above in [0, u64::MAX] {
        let target = dir.path().join(format!("restored-tiny-{sorted_above}"));
        let (file, sparse, _) = open_target(&target, manifest.size, false).expect("target");
        let sizes = (0, 2048, sorted_above);
        repo.write_volume(&manifest, &file, sparse, &target, sizes, &|_| {}).expect("restore");
        assert!(fs::read(&target).expect("read back") == image, "tiny budget: differs");
    }
}
