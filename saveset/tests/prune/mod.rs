//! Prune (FORMAT.md, "Prune"): it frees exactly what no kept manifest references and repacks
//! partly used packs; a dry run changes nothing; a prune stopped after any change leaves a
//! repository that verifies and restores; prunes racing backups in another process (locally
//! and on S3) and in this one (through a `Pool`, as the listener and the agents copy) lose
//! nothing.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use stillpoint_saveset::{
    Error, InitOptions, Location, ManifestId, OpenOptions, Pool, PruneOptions, PruneReport,
    Repository, S3Location, Secret,
};

use super::s3::Moto;
use super::{b3, image, meta, mutated, opts, secret, MIB};

fn small_packs() -> InitOptions {
    InitOptions { pack_size: MIB, ..opts() }
}

fn now() -> PruneOptions {
    PruneOptions { grace: Duration::ZERO, ..PruneOptions::default() }
}

/// What `forget` does to a backup: its manifest goes, nothing else.
fn forget(repo: &Repository, id: ManifestId) {
    repo.storage().delete(&format!("manifests/{id}")).unwrap();
}

/// Every object under `dir/` with its size.
fn listing(repo: &Repository, dir: &str) -> BTreeMap<String, u64> {
    repo.storage().list(dir).unwrap().into_iter().collect()
}

fn bytes(repo: &Repository, dir: &str) -> u64 {
    listing(repo, dir).values().sum()
}

fn everything(root: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_owned()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                out.insert(e.path(), e.metadata().unwrap().len());
            }
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    assert!(Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap().success());
}

fn prune(repo: &mut Repository, opts: &PruneOptions) -> stillpoint_saveset::Result<PruneReport> {
    repo.prune(opts, &mut |_| {})
}

/// Verify reading all data is clean, and every `(manifest, source)` restores bit for bit.
fn assert_intact(repo: &Repository, kept: &[(ManifestId, PathBuf)], out_dir: &Path) {
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{:?}", report.damage);
    for (i, (id, source)) in kept.iter().enumerate() {
        let out = out_dir.join(format!("restored-{i}"));
        let _ = fs::remove_file(&out);
        repo.restore_volume(*id, &out, false).unwrap();
        assert_eq!(b3(&out), b3(source), "restore of {id} from {}", source.display());
        fs::remove_file(&out).unwrap();
    }
}

/// A repository where a pruned state is known exactly: `base` (kept) and `twin` (`base` with
/// 40% of its blocks rewritten, forgotten), backed up twin first, so that the twin's packs are
/// each ~40% unused (repacked) and the base's own packs fully used. Returns the kept manifest
/// and the pack bytes a fresh repository holding only `base` has. The fresh one has the same
/// key (a copy of the repository before its first backup, with a cache of its own), so its
/// chunk ids, and with them the chunk list page and how well it compresses, are the same.
fn forgotten_twin(dir: &Path) -> (PathBuf, ManifestId, PathBuf, u64) {
    let base = image(dir, "base", 8, 21);
    let twin = mutated(&base, "twin", 0.4);
    let other = image(dir, "other", 4, 22);
    let repo_dir = dir.join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), small_packs()).unwrap();
    let fresh_dir = dir.join("fresh");
    copy_dir(&repo_dir, &fresh_dir);
    let t = repo.backup_volume(&twin, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    let b = repo.backup_volume(&base, meta("b2", "srv-a"), &mut |_| {}).unwrap();
    let o = repo.backup_volume(&other, meta("b3", "srv-b"), &mut |_| {}).unwrap();
    forget(&repo, t.id);
    forget(&repo, o.id);
    // Junk a killed writer left: a temp file (old enough with grace 0).
    let junk = repo_dir.join("tmp/deadbeef");
    fs::write(&junk, b"half a pack").unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    fs::File::options().write(true).open(&junk).unwrap().set_modified(hour_ago).unwrap();
    let cache = OpenOptions::with_cache_dir(dir.join("fresh-cache"));
    let mut fresh = Repository::open_with(&Location::Local(fresh_dir), &secret(), cache).unwrap();
    fresh.backup_volume(&base, meta("b2", "srv-a"), &mut |_| {}).unwrap();
    let fresh_bytes = bytes(&fresh, "packs/");
    (repo_dir, b.id, base, fresh_bytes)
}

#[test]
fn prune_frees_exactly_the_unreferenced_data_and_a_dry_run_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo_dir, kept, base, fresh_bytes) = forgotten_twin(tmp.path());
    let mut repo = Repository::open(&repo_dir, &secret()).unwrap();
    let before = bytes(&repo, "packs/");
    assert!(before > fresh_bytes * 3 / 2, "{before} vs {fresh_bytes}: the forgotten data");

    let files = everything(&repo_dir);
    let dry = prune(&mut repo, &PruneOptions { dry_run: true, ..now() }).unwrap();
    assert_eq!(everything(&repo_dir), files, "a dry run changes nothing");
    assert!(dry.packs_unused > 0 && dry.packs_repacked > 0, "{dry:?}");

    let mut notes = Vec::new();
    let done = repo.prune(&now(), &mut |n| notes.push(n.to_owned())).unwrap();
    assert!(notes.iter().any(|n| n.starts_with("step 1: ")), "{notes:?}");
    // What the dry run announced is what the run did.
    for (what, d, r) in [
        ("packs deleted", dry.packs_deleted, done.packs_deleted),
        ("packs repacked", dry.packs_repacked, done.packs_repacked),
        ("packs written", dry.packs_written, done.packs_written),
        ("index files", dry.index_files_deleted, done.index_files_deleted),
        ("tmp files", dry.tmp_files_deleted, done.tmp_files_deleted),
        ("steps", dry.steps, done.steps),
    ] {
        assert_eq!(d, r, "{what}: dry run {dry:?}\nrun {done:?}");
    }
    assert_eq!((dry.bytes_freed, dry.bytes_rewritten), (done.bytes_freed, done.bytes_rewritten));
    assert_eq!(done.tmp_files_deleted, 1);
    assert_eq!(done.packs_rescued, 0);
    assert_eq!(done.packs_deleted, done.packs_marked, "no backup ran: all go in this run");
    assert!(!repo_dir.join("tmp/deadbeef").exists(), "an old temp file goes");
    assert!(listing(&repo, "pending/").is_empty(), "the record is gone with its packs");

    // The kept backup's chunks remain, each once: as much as a repository that only ever held
    // it (with the same key: with another, the chunk list page holds other ids, and whether
    // zstd finds its few repeats, 2 KB, depends on them).
    let after = bytes(&repo, "packs/");
    assert_eq!(after, fresh_bytes, "before {before}, report {done:?}");
    // Freed: the packs' bytes, plus the index files and the temp file (11 bytes).
    let packs_freed = before + done.bytes_rewritten - after;
    let index_before = bytes(&repo, "index/");
    assert!(done.bytes_freed > packs_freed + 11, "{done:?}");
    assert!(done.bytes_freed < packs_freed + 11 + index_before + MIB, "{done:?}");
    let repo = Repository::open(&repo_dir, &secret()).unwrap();
    assert_intact(&repo, &[(kept, base.clone())], tmp.path());

    // Nothing is left to do, and the repository takes new backups that dedup as before.
    let mut repo = repo;
    let again = prune(&mut repo, &now()).unwrap();
    assert_eq!((again.steps, again.bytes_freed), (0, 0), "{again:?}");
    let rerun = repo.backup_volume(&base, meta("b4", "srv-a"), &mut |_| {}).unwrap();
    assert_eq!(rerun.stats.new_chunks, 0, "every chunk of the kept backup is still indexed");
}

#[test]
fn a_prune_with_a_tiny_memory_budget_repacks_in_segments_and_frees_exactly_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo_dir, kept, base, fresh_bytes) = forgotten_twin(tmp.path());
    // 1 MiB: its sorts hold 64 KiB, so the repack takes a few hundred chunks at a time.
    let options =
        OpenOptions { cache_dir: Some(tmp.path().join("tiny-cache")), memory_budget: Some(MIB) };
    let location = Location::Local(repo_dir.clone());
    let mut repo = Repository::open_with(&location, &secret(), options).unwrap();
    let mut notes = Vec::new();
    let done = repo.prune(&now(), &mut |n| notes.push(n.to_owned())).unwrap();
    let repacked: u64 = notes
        .iter()
        .find_map(|n| n.strip_prefix("repacking ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no repack in {notes:?}"));
    assert!(repacked > 1000, "{repacked} chunks: several segments of a few hundred");
    assert!(done.packs_repacked > 0 && done.packs_written > 0, "{done:?}");
    assert_eq!(bytes(&repo, "packs/"), fresh_bytes, "{done:?}");
    // Through the same handle: its index follows what the prune deleted and wrote.
    assert_intact(&repo, &[(kept, base)], tmp.path());
}

#[test]
fn a_handle_loaded_before_another_handles_prune_restores_from_the_repacked_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo_dir, kept, base, _) = forgotten_twin(tmp.path());
    let location = Location::Local(repo_dir);
    let open = |cache: &str| {
        let options = OpenOptions::with_cache_dir(tmp.path().join(cache));
        Repository::open_with(&location, &secret(), options).unwrap()
    };
    // A long-lived handle (as a pool's), its index loaded before the prune; the prune through
    // another (as another process's, with its own cache) repacks and deletes at once.
    let long_lived = open("cache-a");
    let mut other = open("cache-b");
    let done = prune(&mut other, &now()).unwrap();
    assert!(done.packs_repacked > 0 && done.packs_deleted > 0, "{done:?}");
    // The kept backup's chunks it shared with the forgotten twin were in packs now deleted.
    let out = tmp.path().join("restored");
    long_lived.restore_volume(kept, &out, false).unwrap();
    assert_eq!(b3(&out), b3(&base));
}

#[test]
fn a_prune_stopped_after_any_change_leaves_a_repository_that_verifies_and_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let (template, kept, base, fresh_bytes) = forgotten_twin(tmp.path());
    let steps = {
        let mut repo = Repository::open(&template, &secret()).unwrap();
        prune(&mut repo, &PruneOptions { dry_run: true, ..now() }).unwrap().steps
    };
    assert!(steps >= 8, "{steps} changes");
    for n in 0..steps {
        let dir = tmp.path().join(format!("stopped-{n}"));
        copy_dir(&template, &dir);
        let mut repo = Repository::open(&dir, &secret()).unwrap();
        let err = prune(&mut repo, &PruneOptions { stop_after: Some(n), ..now() }).unwrap_err();
        assert!(matches!(err, Error::PruneStopped { step } if step == n), "{err}");
        let repo = Repository::open(&dir, &secret()).unwrap();
        assert_intact(&repo, &[(kept, base.clone())], tmp.path());
        // Reruns finish the job: the same end state as an uninterrupted run. (A stop between
        // the repack and the mark leaves two copies of chunks; the repack's, the newer,
        // count, so the rerun deletes the old packs rather than repack them again.)
        let mut repo = repo;
        let mut runs = 0;
        while prune(&mut repo, &now()).unwrap().steps > 0 {
            runs += 1;
            assert!(runs < 4, "still changing after {runs} reruns (stop at {n})");
        }
        assert_eq!(bytes(&repo, "packs/"), fresh_bytes, "after a stop at {n} and reruns");
        assert!(listing(&repo, "pending/").is_empty());
        let repo = Repository::open(&dir, &secret()).unwrap();
        assert_intact(&repo, &[(kept, base.clone())], tmp.path());
        fs::remove_dir_all(&dir).unwrap();
    }
}

const RACE_ENV: &str = "SAVESET_PRUNE_RACE_CHILD";

fn location_arg(loc: &Location) -> String {
    match loc {
        Location::Local(p) => format!("local\n{}", p.display()),
        Location::S3(s) => {
            format!("s3\n{}\n{}\n{}", s.endpoint.as_deref().unwrap(), s.bucket, s.prefix)
        }
    }
}

fn location_from(arg: &str) -> (Location, Vec<PathBuf>) {
    let mut lines = arg.lines();
    let loc = match lines.next().unwrap() {
        "local" => Location::Local(PathBuf::from(lines.next().unwrap())),
        _ => {
            let (endpoint, bucket, prefix) =
                (lines.next().unwrap(), lines.next().unwrap(), lines.next().unwrap());
            Location::S3(S3Location {
                endpoint: Some(endpoint.into()),
                region: Some("us-east-1".into()),
                access_key_id: Some("testing".into()),
                secret_access_key: Some(Secret::passphrase("testing")),
                ..S3Location::new(bucket, prefix)
            })
        }
    };
    (loc, lines.map(PathBuf::from).collect())
}

/// Not a test on its own: the backup process racing the prunes. Backs up the images it is
/// given in turn, `ROUNDS` times, printing `manifest-id image-index` after each.
#[test]
fn prune_race_child() {
    let Some(arg) = std::env::var_os(RACE_ENV) else { return };
    let (loc, images) = location_from(arg.to_str().unwrap());
    let mut repo = Repository::open_at(&loc, &secret()).unwrap();
    let mut out = std::io::stdout();
    for round in 0..ROUNDS {
        let i = round % images.len();
        let b = repo.backup_volume(&images[i], meta(&format!("c{round}"), "srv-c"), &mut |_| {});
        // On its own line: libtest has written `test ... ` without a newline before.
        writeln!(out, "\nRACE {} {i}", b.unwrap().id).unwrap();
        out.flush().unwrap();
    }
}

const ROUNDS: usize = 9;

/// Backups in another process (and, through a `Pool`, in this one) write while this process
/// forgets every other backup as soon as it is written and prunes with no grace, over and over:
/// backups dedup against packs the prunes find unused. Then nothing kept is lost.
fn race(loc: Location, dir: &Path) {
    let a = image(dir, "a", 6, 31);
    let b = mutated(&a, "b", 0.3);
    let c = image(dir, "c", 6, 32);
    let images = [a.clone(), b.clone(), c.clone()];
    Repository::init_at(&loc, &secret(), small_packs()).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["prune::prune_race_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(
            RACE_ENV,
            format!(
                "{}\n{}",
                location_arg(&loc),
                images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join("\n")
            ),
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel::<(ManifestId, usize)>();
    let reader = std::thread::spawn(move || {
        for line in lines.map_while(|l| l.ok()) {
            if let Some((id, i)) = line.strip_prefix("RACE ").and_then(|l| l.split_once(' ')) {
                if let (Ok(id), Ok(i)) = (id.parse(), i.parse()) {
                    let _ = tx.send((id, i));
                }
            }
        }
    });
    let pool = Pool::open(loc.clone(), secret()).unwrap();
    let mut kept: Vec<(ManifestId, PathBuf)> = Vec::new();
    let mut forgotten = 0;
    let mut seen = 0;
    let mut totals = PruneReport::default();
    let mut pruner = Repository::open_at(&loc, &secret()).unwrap();
    std::thread::scope(|s| {
        // An in-process copy through a pool, as the listener and the agents run them.
        let pooled = s.spawn(|| {
            (0..3)
                .map(|round| {
                    let img = &images[(round + 1) % 3];
                    let m = meta(&format!("p{round}"), "srv-p");
                    let done = pool
                        .with_repo(|e| e, |repo| repo.backup_volume(img, m, &mut |_| {}))
                        .unwrap();
                    (done.id, img.clone())
                })
                .collect::<Vec<_>>()
        });
        let mut finished = false;
        while !finished {
            finished = child.try_wait().unwrap().is_some();
            for (id, i) in rx.try_iter() {
                seen += 1;
                let repo = Repository::open_at(&loc, &secret()).unwrap();
                if seen % 2 == 0 {
                    forget(&repo, id);
                    forgotten += 1;
                } else {
                    kept.push((id, images[i].clone()));
                }
            }
            let r = prune(&mut pruner, &now()).unwrap();
            totals.packs_deleted += r.packs_deleted;
            totals.packs_rescued += r.packs_rescued;
            totals.packs_repacked += r.packs_repacked;
            totals.bytes_freed += r.bytes_freed;
        }
        kept.extend(pooled.join().unwrap());
    });
    assert!(child.wait().unwrap().success(), "the racing backup process failed");
    reader.join().unwrap();
    for (id, i) in rx.try_iter() {
        seen += 1;
        kept.push((id, images[i].clone()));
    }
    assert_eq!(seen, ROUNDS, "every backup of the other process reported");
    assert!(forgotten >= 3, "{forgotten}");
    // The prunes did free data while the backups ran.
    assert!(totals.packs_deleted > 0, "{totals:?}");
    let mut repo = Repository::open_at(&loc, &secret()).unwrap();
    prune(&mut repo, &now()).unwrap();
    let repo = Repository::open_at(&loc, &secret()).unwrap();
    assert_eq!(repo.list_manifests().unwrap().len(), kept.len());
    assert!(repo.storage().list("locks/").unwrap().is_empty(), "every backup dropped its lock");
    assert_intact(&repo, &kept, dir);
    // A backup of every image again stores nothing new: nothing kept lost a chunk's index.
    let mut repo = repo;
    for img in &images {
        let again = repo.backup_volume(img, meta("z", "srv-z"), &mut |_| {}).unwrap();
        assert_eq!(again.stats.new_chunks, 0, "{}: {:?}", img.display(), again.stats);
    }
}

#[test]
fn prunes_racing_backups_in_another_process_and_a_pool_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    race(Location::Local(tmp.path().join("repo")), tmp.path());
}

#[test]
fn s3_prunes_racing_backups_in_another_process_and_a_pool_lose_nothing() {
    let moto = Moto::start();
    moto.bucket("race");
    let tmp = tempfile::tempdir().unwrap();
    race(moto.location("race", "repo"), tmp.path());
}

#[test]
fn a_marked_pack_waits_for_the_backups_running_when_it_was_marked_and_is_rescued_if_used() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 4, 41);
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), small_packs()).unwrap();
    let first = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    forget(&repo, first.id);
    // A backup of the same image is running (its lock is live) and has loaded the index:
    // it will reference the forgotten backup's chunks without storing them.
    let mut writer = Repository::open(&repo_dir, &secret()).unwrap();
    let mut pruner = Repository::open(&repo_dir, &secret()).unwrap();
    let mut marked = None;
    let second = writer
        .backup_volume(&img, meta("b2", "srv-a"), &mut |p| {
            if marked.is_none() && p.done == p.total {
                let r = prune(&mut pruner, &now()).unwrap();
                marked = Some(r);
            }
        })
        .unwrap();
    let r = marked.unwrap();
    assert!(r.packs_marked > 0 && r.packs_deleted == 0, "{r:?}");
    assert_eq!(r.locks.len(), 1, "{r:?}");
    assert!(r.waiting[0].contains("1 backup(s) running"), "{:?}", r.waiting);
    assert_eq!(second.stats.new_chunks, 0, "it deduplicated against the marked packs");
    // The backup is done: the next prune finds its manifest and keeps what it uses.
    let rescued = prune(&mut pruner, &now()).unwrap();
    assert_eq!((rescued.packs_deleted, rescued.packs_rescued), (0, r.packs_marked), "{rescued:?}");
    assert!(listing(&repo, "pending/").is_empty());
    let repo = Repository::open(&repo_dir, &secret()).unwrap();
    assert_intact(&repo, &[(second.id, img.clone())], tmp.path());
    // A backup started after a mark does not dedup against the marked packs.
    forget(&repo, second.id);
    let r = prune(&mut pruner, &PruneOptions::default()).unwrap();
    assert!(r.packs_marked > 0 && r.packs_deleted == 0, "in the grace period: {r:?}");
    assert!(r.waiting[0].contains("grace"), "{:?}", r.waiting);
    let third = writer.backup_volume(&img, meta("b3", "srv-a"), &mut |_| {}).unwrap();
    assert_eq!(third.stats.reused_chunks, 0, "{:?}", third.stats);
    assert!(third.stats.new_chunks > 0, "{:?}", third.stats);
    let repo = Repository::open(&repo_dir, &secret()).unwrap();
    assert_intact(&repo, &[(third.id, img)], tmp.path());
}
