//! Changed-block tracking on real filesystems (XFS with reflink and btrfs, on loop devices): a
//! chain of 30 incrementals through the base store reading only what FIEMAP says changed, every
//! restore byte-identical; a base that was touched, a forgotten parent and a base directory on
//! another filesystem all fall back to a full read; a wrong change map (the failpoint) is caught
//! by the sampling verify and the backup still restores.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use stillpoint_saveset::{
    changes_between, BaseKey, BaseStore, ChangeMap, ManifestId, MapSource, Parent, Repository,
    VolumeBackup, VolumeMeta, DROP_RANGE, FAILPOINT_ENV,
};

use super::{b3, image, opts, secret, MIB};

const CHUNK: u64 = 4096;

/// A filesystem on a sparse image, loop-mounted for one test; unmounted and removed on drop.
struct LoopFs {
    dir: tempfile::TempDir,
}

impl LoopFs {
    fn new(kind: &str) -> LoopFs {
        let dir = tempfile::Builder::new().prefix("cbt-fs-").tempdir_in("/tmp").unwrap();
        let img = dir.path().join("fs.img");
        fs::File::create(&img).unwrap().set_len(1 << 30).unwrap();
        let mkfs = match kind {
            "xfs" => Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&img).status(),
            "btrfs" => Command::new("mkfs.btrfs").arg("-q").arg(&img).status(),
            other => panic!("no such filesystem kind {other}"),
        };
        assert!(mkfs.unwrap().success(), "mkfs.{kind}");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mounted = Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt).status();
        assert!(mounted.unwrap().success(), "mount {kind} image");
        LoopFs { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let mnt = self.path();
        if !Command::new("umount").arg(&mnt).status().is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        }
    }
}

/// What each test starts from: a filesystem of `kind` on a loop device (kept mounted while the
/// `Site` lives), a LUN image of `mib` MiB from mkimage `seed` on it, a repository and a base
/// store beside it.
struct Site {
    _fs: LoopFs,
    root: PathBuf,
    lun: PathBuf,
    repo: Repository,
    bases: BaseStore,
}

fn site(kind: &str, mib: u64, seed: u32) -> Site {
    let fs = LoopFs::new(kind);
    let root = fs.path();
    let lun = image(&root, "lun.img", mib, seed);
    let repo = Repository::init_with(&root.join("repo"), &secret(), opts()).unwrap();
    let bases = BaseStore::open(&root.join("bases")).unwrap();
    Site { _fs: fs, root, lun, repo, bases }
}

/// Restores backup `id` from `repo` beside `state` and checks it is `state`, bit for bit.
fn restores_as(repo: &Repository, id: ManifestId, state: &Path) {
    let out = state.with_file_name("restored");
    repo.restore_volume(id, &out, false).unwrap();
    assert_eq!(b3(&out), b3(state), "restore of {id} differs from {}", state.display());
    fs::remove_file(&out).unwrap();
}

/// A reflink clone of `src` at `dst` (what the mock SAN's snapshot is).
fn clone(src: &Path, dst: &Path) {
    let ok = Command::new("cp").arg("--reflink=always").arg(src).arg(dst).status().unwrap();
    assert!(ok.success(), "cp --reflink=always {} {}", src.display(), dst.display());
}

/// Rewrites 1% of the LUN's 4 KiB blocks in place, scattered, then 0.2% more in clusters of
/// 16 blocks: fresh random bytes, positions drawn from `seed` (in place, like a writer would).
fn rewrite(lun: &Path, seed: u32) {
    let f = fs::OpenOptions::new().write(true).open(lun).unwrap();
    let blocks = f.metadata().unwrap().len() / CHUNK;
    let mut rng = blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof();
    let mut next = || {
        let mut b = [0u8; 8];
        rng.fill(&mut b);
        u64::from_le_bytes(b)
    };
    let mut data = vec![0u8; 16 * CHUNK as usize];
    let mut write = |block: u64, count: u64, next: &mut dyn FnMut() -> u64| {
        for w in data.chunks_mut(8).take((count * CHUNK / 8) as usize) {
            w.copy_from_slice(&next().to_le_bytes());
        }
        f.write_all_at(&data[..(count * CHUNK) as usize], block * CHUNK).unwrap();
    };
    for _ in 0..blocks / 100 {
        let b = next() % blocks;
        write(b, 1, &mut next);
    }
    for _ in 0..(blocks / 500 / 16).max(1) {
        let b = next() % (blocks - 16);
        write(b, 16, &mut next);
    }
    f.sync_all().unwrap();
}

/// Bytes in 4 KiB chunks that differ between two files of one size.
fn differing_bytes(a: &Path, b: &Path) -> u64 {
    let (fa, fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    let size = fa.metadata().unwrap().len();
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut differ = 0;
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        fa.read_exact_at(&mut x[..n], off).unwrap();
        fb.read_exact_at(&mut y[..n], off).unwrap();
        differ += x[..n]
            .chunks(CHUNK as usize)
            .zip(y[..n].chunks(CHUNK as usize))
            .filter(|(p, q)| p != q)
            .map(|(p, _)| p.len() as u64)
            .sum::<u64>();
        off += n as u64;
    }
    differ
}

fn key() -> BaseKey {
    BaseKey { group: "g".into(), server: "srv".into(), volume: "/dev/vda".into() }
}

fn vmeta(backup: &str) -> VolumeMeta {
    VolumeMeta { backup: backup.into(), server: "srv".into(), volume: "/dev/vda".into() }
}

/// One backup of the LUN's state now, through the base store: a snapshot (reflink clone) is
/// backed up and kept as the state to compare restores with.
fn backup(
    repo: &mut Repository,
    bases: &BaseStore,
    lun: &Path,
    name: &str,
) -> (VolumeBackup, PathBuf) {
    let snap = lun.with_file_name(format!("snap-{name}"));
    clone(lun, &snap);
    let done = bases.backup(repo, &key(), &snap, vmeta(name), &mut |_| {}).unwrap();
    (done, snap)
}

/// The chain: a full, then 30 incrementals after 1% scattered and 0.2% clustered rewrites,
/// each reading only what changed; the first, a middle and the last restore byte-identical.
fn chain_of_30_incrementals(kind: &str) {
    let Site { _fs, root, lun, mut repo, bases } = site(kind, 64, 21);
    let size = fs::metadata(&lun).unwrap().len();
    let repo_dir = root.join("repo");

    let (full, snap) = backup(&mut repo, &bases, &lun, "b00");
    assert_eq!(full.stats.change_map, "none: no base kept yet");
    assert!(full.stats.bytes_read > size / 2, "{:?}", full.stats);
    let mut kept = vec![(full.id, snap.clone())];
    let mut previous = snap;
    for i in 1..=30u32 {
        rewrite(&lun, 100 + i);
        let (done, snap) = backup(&mut repo, &bases, &lun, &format!("b{i:02}"));
        let s = &done.stats;
        assert!(s.change_map.starts_with("fiemap: "), "{kind} backup {i}: {s:?}");
        let changed = differing_bytes(&previous, &snap);
        // Only the changed chunks are read (a chunk can only be read whole), plus a little
        // slack for blocks the filesystem rewrote beside them; never the volume.
        assert!(
            s.bytes_read >= changed,
            "{kind} backup {i}: read {} < changed {changed}",
            s.bytes_read
        );
        assert!(
            s.bytes_read <= changed + 64 * CHUNK,
            "{kind} backup {i}: read {} for {changed} changed bytes: {s:?}",
            s.bytes_read
        );
        assert!(s.bytes_read * 20 < size, "{kind} backup {i}: {s:?}");
        assert!(s.bytes_skipped + s.bytes_read <= size && s.bytes_skipped > size / 2, "{s:?}");
        assert!(s.sampled_chunks >= 64, "{s:?}");
        assert_eq!(s.sample_mismatches, 0, "{s:?}");
        if !kept.iter().any(|(_, k)| *k == previous) {
            fs::remove_file(&previous).unwrap();
        }
        if i == 1 || i == 15 || i == 30 {
            kept.push((done.id, snap.clone()));
        }
        previous = snap;
    }
    let fresh = Repository::open(&repo_dir, &secret()).unwrap();
    for (id, state) in &kept {
        restores_as(&fresh, *id, state);
    }
    let report = fresh.verify(false).unwrap();
    assert!(report.is_ok(), "{:?}", report.damage);
}

#[test]
fn xfs_chain_of_30_incrementals_reads_only_changes_and_restores_byte_identical() {
    chain_of_30_incrementals("xfs");
}

#[test]
fn btrfs_chain_of_30_incrementals_reads_only_changes_and_restores_byte_identical() {
    chain_of_30_incrementals("btrfs");
}

/// A base that was touched, a parent manifest that was forgotten, and a base directory on
/// another filesystem each mean a full read, said in the stats; the backups still restore.
#[test]
fn untrusted_bases_mean_a_full_read() {
    let Site { _fs, root, lun, mut repo, bases } = site("xfs", 32, 22);
    let size = fs::metadata(&lun).unwrap().len();
    let (first, _) = backup(&mut repo, &bases, &lun, "b1");
    let full_read = first.stats.bytes_read;

    // Touched: the identity check refuses it.
    let base = fs::read_dir(root.join("bases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "base"))
        .unwrap();
    let ok = Command::new("touch").arg("-d").arg("2020-01-01").arg(&base).status().unwrap();
    assert!(ok.success());
    rewrite(&lun, 7);
    let (touched, snap) = backup(&mut repo, &bases, &lun, "b2");
    let s = &touched.stats;
    assert!(s.change_map.contains("changed since it was kept (mtime"), "{s:?}");
    assert!(s.bytes_read * 10 > full_read * 9, "{s:?}");
    assert_eq!(s.bytes_skipped, 0);

    // The base kept after that full read is trusted again.
    rewrite(&lun, 8);
    let (again, _) = backup(&mut repo, &bases, &lun, "b3");
    assert!(again.stats.change_map.starts_with("fiemap: "), "{:?}", again.stats);
    assert!(again.stats.bytes_read * 10 < size, "{:?}", again.stats);

    // Forgotten parent: no base.
    repo.forget_backup("b3").unwrap();
    rewrite(&lun, 9);
    let (forgotten, _) = backup(&mut repo, &bases, &lun, "b4");
    assert!(
        forgotten.stats.change_map.contains("is no longer in the repository"),
        "{:?}",
        forgotten.stats
    );
    assert!(forgotten.stats.bytes_read * 10 > full_read * 9, "{:?}", forgotten.stats);

    // A base directory on another filesystem: the clone fails (EXDEV), no base is kept, every
    // backup reads everything and succeeds.
    let elsewhere = tempfile::Builder::new().prefix("cbt-bases-").tempdir_in("/tmp").unwrap();
    let other = BaseStore::open(elsewhere.path()).unwrap();
    let (x1, _) = backup(&mut repo, &other, &lun, "x1");
    rewrite(&lun, 10);
    let (x2, x2_snap) = backup(&mut repo, &other, &lun, "x2");
    assert_eq!(x1.stats.change_map, "none: no base kept yet");
    assert_eq!(x2.stats.change_map, "none: no base kept yet");
    assert!(x2.stats.bytes_read * 10 > full_read * 9, "{:?}", x2.stats);
    assert_eq!(fs::read_dir(elsewhere.path()).unwrap().count(), 0, "nothing left in the base dir");

    restores_as(&repo, touched.id, &snap);
    restores_as(&repo, x2.id, &x2_snap);
}

/// The new base is cloned while the snapshot is read: a backup that fails leaves the old base
/// and its record as they were and no clone behind, and the next backup still reads only what
/// changed since the old base.
#[test]
fn a_failed_backup_keeps_the_old_base_and_leaves_no_clone() {
    let Site { _fs, root, lun, mut repo, bases } = site("xfs", 32, 23);
    let size = fs::metadata(&lun).unwrap().len();
    backup(&mut repo, &bases, &lun, "b1");
    let listing = || {
        let mut files: Vec<(String, Vec<u8>, u64)> = fs::read_dir(root.join("bases"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let meta = fs::metadata(&p).unwrap();
                let json = if p.extension().is_some_and(|e| e == "json") {
                    fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                (p.file_name().unwrap().to_string_lossy().into_owned(), json, meta.ino())
            })
            .collect();
        files.sort();
        files
    };
    let kept = listing();
    assert_eq!(kept.len(), 2, "a base and its record: {kept:?}");

    // Packs cannot be written (their directory is a file now): the backup fails.
    rewrite(&lun, 11);
    let packs = root.join("repo").join("packs");
    fs::rename(&packs, root.join("packs-away")).unwrap();
    fs::write(&packs, b"not a directory").unwrap();
    let snap = lun.with_file_name("snap-b2");
    clone(&lun, &snap);
    let failed = bases.backup(&mut repo, &key(), &snap, vmeta("b2"), &mut |_| {});
    let err = failed.map(|d| d.stats).expect_err("packs cannot be written").to_string();
    assert!(err.contains("packs"), "{err}");
    assert_eq!(listing(), kept, "the old base and record, unchanged, and no clone left");

    fs::remove_file(&packs).unwrap();
    fs::rename(root.join("packs-away"), &packs).unwrap();
    let (again, state) = backup(&mut repo, &bases, &lun, "b3");
    assert!(again.stats.change_map.starts_with("fiemap: "), "{:?}", again.stats);
    assert!(again.stats.bytes_read * 10 < size, "{:?}", again.stats);
    restores_as(&repo, again.id, &state);
}

/// The same wrong map the failpoint makes, given directly: the sampling verify finds it (the
/// dropped range is a rewritten 4 MiB, a sixteenth of the volume, so with 100% sampled it is
/// found for sure), the volume is read whole and restores byte-identical.
#[test]
fn the_sampling_verify_catches_a_dropped_range() {
    let Site { _fs, root, lun, mut repo, .. } = site("xfs", 64, 23);
    let base = root.join("base");
    clone(&lun, &base);
    let first = repo.backup_volume(&base, vmeta("p"), &mut |_| {}).unwrap();
    // Rewrite 4 MiB in the middle, and a few scattered blocks.
    let f = fs::OpenOptions::new().write(true).open(&lun).unwrap();
    f.write_all_at(&vec![0xA5; 4 * MIB as usize], 20 * MIB).unwrap();
    drop(f);
    rewrite(&lun, 31);
    let snap = root.join("snap");
    clone(&lun, &snap);
    let ChangeMap::Ranges { mut ranges, .. } = changes_between(&base, &snap).unwrap() else {
        panic!("XFS clones give a map")
    };
    let largest = (0..ranges.len()).max_by_key(|&i| ranges[i].end - ranges[i].start).unwrap();
    let dropped = ranges.remove(largest);
    assert!(dropped.end - dropped.start >= 4 * MIB, "{dropped:?}");
    for percent in [100.0, 1.0] {
        let parent = Parent {
            manifest: first.id,
            changed: ChangeMap::Ranges { source: MapSource::Fiemap, ranges: ranges.clone() },
            sample_percent: percent,
        };
        let done = repo.backup_volume_with(&snap, vmeta("c"), Some(&parent), &mut |_| {}).unwrap();
        let s = &done.stats;
        assert!(s.sample_mismatches > 0, "{percent}%: {s:?}");
        assert!(s.change_map.contains("sampled chunks differ; whole volume read"), "{s:?}");
        restores_as(&repo, done.id, &snap);
    }
    // 0 disables the sampling verify: the wrong map goes unnoticed (why it is on by default).
    let parent = Parent {
        manifest: first.id,
        changed: ChangeMap::Ranges { source: MapSource::Fiemap, ranges },
        sample_percent: 0.0,
    };
    let done = repo.backup_volume_with(&snap, vmeta("d"), Some(&parent), &mut |_| {}).unwrap();
    assert_eq!((done.stats.sampled_chunks, done.stats.sample_mismatches), (0, 0));
}

const FAILPOINT_CHILD: &str = "SAVESET_FAILPOINT_CHILD";
/// The child's sample, in percent (the default when unset).
const FAILPOINT_SAMPLE: &str = "SAVESET_FAILPOINT_SAMPLE";

/// Not a test on its own: the child of `the_failpoint_is_caught_by_the_default_sample`, run with
/// the failpoint set (the environment is the process's, so not in the parent's threads).
#[test]
fn failpoint_child() {
    let Some(root) = std::env::var_os(FAILPOINT_CHILD) else { return };
    let root = PathBuf::from(root);
    let mut repo = Repository::open(&root.join("repo"), &secret()).unwrap();
    let mut bases = BaseStore::open(&root.join("bases")).unwrap();
    if let Some(percent) = std::env::var(FAILPOINT_SAMPLE).ok().and_then(|p| p.parse().ok()) {
        bases = bases.with_sample(percent);
    }
    let snap = root.join("snap-c");
    let done = bases.backup(&mut repo, &key(), &snap, vmeta("c"), &mut |_| {}).unwrap();
    println!(
        "CHILD-RESULT {} {} {} {}",
        done.id, done.stats.sampled_chunks, done.stats.sample_mismatches, done.stats.change_map
    );
}

/// `STILLPOINT_FAILPOINT=change-map-drop-range` drops the largest range (a rewritten 8 MiB of 64,
/// so the default 1% sample of ~15000 skipped chunks, at least 64, misses it with probability
/// below (7/8)^150 ≈ 2e-9): caught, read whole, restores byte-identical.
#[test]
fn the_failpoint_is_caught_by_the_default_sample() {
    let Site { _fs, root, lun, mut repo, bases } = site("xfs", 64, 24);
    backup(&mut repo, &bases, &lun, "b");
    let f = fs::OpenOptions::new().write(true).open(&lun).unwrap();
    f.write_all_at(&vec![0x5A; 8 * MIB as usize], 30 * MIB).unwrap();
    drop(f);
    rewrite(&lun, 41);
    clone(&lun, &root.join("snap-c"));
    let line = backup_with_failpoint(&root, None);
    let parts: Vec<&str> = line.splitn(4, ' ').collect();
    let (sampled, wrong): (u64, u64) = (parts[1].parse().unwrap(), parts[2].parse().unwrap());
    assert!(sampled >= 64 && wrong > 0, "{line}");
    assert!(parts[3].contains("whole volume read"), "{line}");
    let fresh = Repository::open(&root.join("repo"), &secret()).unwrap();
    restores_as(&fresh, parts[0].parse().unwrap(), &root.join("snap-c"));
}

/// Backs `root/snap-c` up in a child process with the failpoint armed (and `sample` percent
/// sampled, else the default); what the child reports: manifest, sampled, mismatches, map.
fn backup_with_failpoint(root: &Path, sample: Option<f64>) -> String {
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args(["changes::failpoint_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(FAILPOINT_CHILD, root)
        .env(FAILPOINT_ENV, DROP_RANGE)
        .stdout(Stdio::piped());
    if let Some(percent) = sample {
        child.env(FAILPOINT_SAMPLE, percent.to_string());
    }
    let mut child = child.spawn().unwrap();
    let said: Vec<String> =
        BufReader::new(child.stdout.take().unwrap()).lines().map(Result::unwrap).collect();
    let line = said
        .iter()
        .find_map(|l| l.split_once("CHILD-RESULT ").map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("the child reports: {said:?}"));
    assert!(child.wait().unwrap().success());
    line
}

/// The kept base file and its record's text.
fn kept_base(bases: &Path) -> (fs::Metadata, String) {
    let mut base = None;
    let mut record = None;
    for path in fs::read_dir(bases).unwrap().map(|e| e.unwrap().path()) {
        match path.extension().and_then(|e| e.to_str()) {
            Some("base") => base = Some(fs::metadata(&path).unwrap()),
            Some("json") => record = Some(fs::read_to_string(&path).unwrap()),
            _ => panic!("only a base and its record in {}: {}", bases.display(), path.display()),
        }
    }
    (base.expect("a base"), record.expect("a record"))
}

/// An unchanged volume (an empty map, nothing read, the sample matching) keeps its base as it
/// is: the same file, not cloned again (at 16 GiB the clone's fsync and the old base's eviction
/// were a third of the backup), its record naming the new backup. The next backup after a change
/// reads only that change, and every backup restores byte-identical.
#[test]
fn an_unchanged_volume_keeps_its_base_as_it_is() {
    let Site { _fs, root, lun, mut repo, bases } = site("xfs", 32, 25);
    let size = fs::metadata(&lun).unwrap().len();
    backup(&mut repo, &bases, &lun, "b1");
    let (first, _) = kept_base(&root.join("bases"));

    let (same, same_snap) = backup(&mut repo, &bases, &lun, "b2");
    let s = &same.stats;
    assert_eq!(s.change_map, "fiemap: 0 ranges, 0 bytes", "{s:?}");
    assert!(s.read_nothing() && s.sampled_chunks >= 64, "{s:?}");
    let (base, record) = kept_base(&root.join("bases"));
    assert_eq!(
        (base.ino(), base.ctime(), base.ctime_nsec()),
        (first.ino(), first.ctime(), first.ctime_nsec())
    );
    assert!(record.contains(&same.id.to_string()) && record.contains("\"b2\""), "{record}");

    rewrite(&lun, 12);
    let (next, next_snap) = backup(&mut repo, &bases, &lun, "b3");
    assert!(next.stats.change_map.starts_with("fiemap: "), "{:?}", next.stats);
    assert!(next.stats.bytes_read * 10 < size, "{:?}", next.stats);
    assert_ne!(
        kept_base(&root.join("bases")).0.ino(),
        first.ino(),
        "a changed volume's clone kept"
    );
    restores_as(&repo, same.id, &same_snap);
    restores_as(&repo, next.id, &next_snap);
}

/// An empty map that is wrong (the failpoint drops the only changed range) is caught by the
/// sample; the volume is read whole and a new base is cloned and kept: the old base does not
/// hold what the new backup holds.
#[test]
fn a_wrong_empty_map_is_caught_and_a_new_base_kept() {
    let Site { _fs, root, lun, mut repo, bases } = site("xfs", 64, 26);
    let (_, b_snap) = backup(&mut repo, &bases, &lun, "b");
    let (old, _) = kept_base(&root.join("bases"));
    // One contiguous rewrite: one changed range, which the failpoint drops.
    let f = fs::OpenOptions::new().write(true).open(&lun).unwrap();
    f.write_all_at(&vec![0x3C; 2 * MIB as usize], 40 * MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    clone(&lun, &root.join("snap-c"));
    let ChangeMap::Ranges { ranges, .. } = changes_between(&b_snap, &root.join("snap-c")).unwrap()
    else {
        panic!("XFS clones give a map")
    };
    assert_eq!(ranges.len(), 1, "one changed range: {ranges:?}");
    drop(repo);
    let line = backup_with_failpoint(&root, Some(100.0));
    let parts: Vec<&str> = line.splitn(4, ' ').collect();
    assert!(parts[2].parse::<u64>().unwrap() > 0, "{line}");
    assert!(parts[3].starts_with("fiemap: 0 ranges, 0 bytes (wrong: "), "{line}");
    let (base, record) = kept_base(&root.join("bases"));
    assert_ne!(base.ino(), old.ino(), "a new base, not the old one: {record}");
    assert!(record.contains(parts[0]), "the record names the new backup: {record}");
    let mut repo = Repository::open(&root.join("repo"), &secret()).unwrap();
    restores_as(&repo, parts[0].parse().unwrap(), &root.join("snap-c"));
    // The new base is what was backed up: the same volume again is unchanged against it.
    let (again, _) = backup(&mut repo, &bases, &lun, "d");
    assert_eq!(again.stats.change_map, "fiemap: 0 ranges, 0 bytes", "{:?}", again.stats);
    assert!(again.stats.read_nothing(), "{:?}", again.stats);
}
