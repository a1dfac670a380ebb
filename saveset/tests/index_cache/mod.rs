//! The local index cache (FORMAT.md, "The index cache"): a cache that is damaged or another
//! repository's is rebuilt from the repository's index files, never trusted, and backups still
//! dedup; a memory budget small enough to force spills and merges gives the same backups,
//! restores and prunes as the default one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use stillpoint_saveset::{Location, OpenOptions, PruneOptions, Repository};

use super::{b3, image, meta, mutated, opts, secret};

fn open(repo: &Path, cache: &Path, budget: Option<u64>) -> Repository {
    let options = OpenOptions { cache_dir: Some(cache.to_owned()), memory_budget: budget };
    Repository::open_with(&Location::Local(repo.to_owned()), &secret(), options).expect("open")
}

/// Every index run under `cache`.
fn runs(cache: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(tags) = std::fs::read_dir(cache.join("index")) else { return out };
    for tag in tags {
        for f in std::fs::read_dir(tag.expect("entry").path()).expect("list") {
            let p = f.expect("entry").path();
            if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("run-")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_damaged_or_foreign_cache_is_rebuilt_and_the_backup_still_dedups() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = image(tmp.path(), "img", 8, 41);
    let (repo_dir, cache) = (tmp.path().join("repo"), tmp.path().join("cache"));
    Repository::init_with(&repo_dir, &secret(), opts()).expect("init");
    let first = open(&repo_dir, &cache, None)
        .backup_volume(&img, meta("b1", "srv"), &mut |_| {})
        .expect("backup");
    assert!(first.stats.new_chunks > 0);
    assert!(!runs(&cache).is_empty(), "the cache holds what the backup stored");
    let again = |name: &str| {
        let repo = open(&repo_dir, &cache, None);
        let b = repo_backup(repo, &img, name);
        assert_eq!(b.new_chunks, 0, "{name}: everything dedups: {b:?}");
        assert_eq!(b.reused_chunks, first.stats.new_chunks + first.stats.reused_chunks);
    };
    again("b2");

    // Damaged: a flipped byte in every run (its tables, or a block).
    for (k, run) in runs(&cache).iter().enumerate() {
        let mut bytes = std::fs::read(run).expect("read");
        let at = if k % 2 == 0 { bytes.len() - 3 } else { 300 };
        bytes[at] ^= 0x40;
        std::fs::write(run, bytes).expect("write");
    }
    again("b3");

    // Foreign: another repository's runs in this repository's cache directory.
    let other_dir = tmp.path().join("other");
    Repository::init_with(&other_dir, &secret(), opts()).expect("init other");
    let other_img = image(tmp.path(), "other-img", 4, 42);
    let other_cache = tmp.path().join("other-cache");
    repo_backup(open(&other_dir, &other_cache, None), &other_img, "o1");
    let ours = runs(&cache)[0].parent().expect("a dir").to_owned();
    for (k, theirs) in runs(&other_cache).iter().enumerate() {
        std::fs::copy(theirs, ours.join(format!("run-foreign{k}"))).expect("copy");
    }
    again("b4");
    assert!(
        runs(&cache).iter().all(|p| !p.to_string_lossy().contains("foreign")),
        "another repository's runs are removed"
    );

    // No cache at all: rebuilt from the index files.
    std::fs::remove_dir_all(&cache).expect("rm");
    again("b5");
    let repo = open(&repo_dir, &cache, None);
    assert!(repo.verify(true).expect("verify").is_ok());
    let target = tmp.path().join("restored");
    repo.restore_volume(first.id, &target, false).expect("restore");
    assert_eq!(b3(&target), b3(&img));
}

fn repo_backup(mut repo: Repository, img: &Path, name: &str) -> stillpoint_saveset::BackupStats {
    repo.backup_volume(img, meta(name, "srv"), &mut |_| {}).expect("backup").stats
}

#[test]
fn a_tiny_memory_budget_gives_the_same_backups_restores_and_prunes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = image(tmp.path(), "base", 12, 43);
    let twin = mutated(&base, "twin", 0.05);
    let mut results = Vec::new();
    // 64 KiB: an in-memory table of ~200 entries, so every few packs spill and runs merge.
    for (name, budget) in [("tiny", Some(64 << 10)), ("default", None)] {
        let repo_dir = tmp.path().join(format!("repo-{name}"));
        let cache = tmp.path().join(format!("cache-{name}"));
        let small_packs = stillpoint_saveset::InitOptions { pack_size: 256 << 10, ..opts() };
        Repository::init_with(&repo_dir, &secret(), small_packs).expect("init");
        let mut repo = open(&repo_dir, &cache, budget);
        let full = repo.backup_volume(&base, meta("full", "srv"), &mut |_| {}).expect("full");
        drop(repo);
        let mut repo = open(&repo_dir, &cache, budget);
        let incr = repo.backup_volume(&twin, meta("incr", "srv"), &mut |_| {}).expect("incr");
        let restored = tmp.path().join(format!("restored-{name}"));
        repo.restore_volume(incr.id, &restored, false).expect("restore");
        assert_eq!(b3(&restored), b3(&twin), "{name}: restored bit for bit");
        // Forget the full backup and prune: what only it used is freed.
        repo.forget_backup("full").expect("forget");
        let prune = PruneOptions { grace: Duration::ZERO, ..PruneOptions::default() };
        let report = repo.prune(&prune, &mut |_| {}).expect("prune");
        let mut repo = open(&repo_dir, &cache, budget);
        assert!(repo.verify(true).expect("verify").is_ok(), "{name}");
        std::fs::remove_file(&restored).expect("rm");
        repo.restore_volume(incr.id, &restored, false).expect("restore after prune");
        assert_eq!(b3(&restored), b3(&twin), "{name}: restored after the prune");
        let after = repo.backup_volume(&twin, meta("again", "srv"), &mut |_| {}).expect("again");
        assert_eq!(after.stats.new_chunks, 0, "{name}: the twin dedups after the prune");
        if name == "tiny" {
            assert!(runs(&cache).len() > 1, "the tiny budget spilled to several runs");
        }
        results.push((
            full.stats,
            incr.stats,
            report.referenced_chunks,
            report.packs_unused + report.packs_repacked,
            report.bytes_rewritten,
        ));
    }
    let (tiny, default) = (&results[0], &results[1]);
    assert_eq!(tiny.0.new_chunks, default.0.new_chunks);
    assert_eq!(tiny.0.reused_chunks, default.0.reused_chunks);
    assert_eq!(tiny.1.new_chunks, default.1.new_chunks);
    assert_eq!(tiny.1.reused_chunks, default.1.reused_chunks);
    assert_eq!(tiny.2, default.2, "the same chunks referenced");
    assert_eq!(tiny.3, default.3, "the same packs freed or repacked");
}
