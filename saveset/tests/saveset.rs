//! Integration tests of the saveset repository on real (small) mkimage disk images: restores
//! bit for bit, dedup, holes, verify naming damage, wrong secrets, crashes and concurrent writers;
//! `s3/` runs the same against a real S3 server on loopback; `changes/` changed-block tracking.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod changes;
mod index_cache;
mod pages;
mod prune;
mod s3;

use stillpoint_saveset::{
    BackupManifest, Damage, Error, InitOptions, KdfParams, Location, Manifest, ManifestSummary,
    Pool, Repository, Secret, VerifyProgress, VolumeManifest, VolumeMeta, VolumeSummary,
};

const MIB: u64 = 1 << 20;

fn mkimage() -> PathBuf {
    std::env::var_os("STILLPOINT_MKIMAGE").map(PathBuf::from).unwrap_or_else(|| {
        let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/mkimage.py");
        if beside.exists() {
            beside
        } else {
            PathBuf::from("/work/shared/bench/mkimage.py")
        }
    })
}

/// A deterministic mkimage disk image of `mib` MiB.
fn image(dir: &Path, name: &str, mib: u64, seed: u32) -> PathBuf {
    let path = dir.join(name);
    let ok = Command::new("python3")
        .arg(mkimage())
        .args(["create", path.to_str().unwrap(), "--size", &format!("{mib}M")])
        .args(["--seed", &seed.to_string()])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkimage create failed");
    path
}

/// A sparse copy of `src` with `fraction` of its 4 KiB blocks rewritten.
fn mutated(src: &Path, name: &str, fraction: f64) -> PathBuf {
    let dst = src.with_file_name(name);
    assert!(Command::new("cp")
        .args(["--sparse=always", src.to_str().unwrap(), dst.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    let ok = Command::new("python3")
        .arg(mkimage())
        .args(["mutate", dst.to_str().unwrap(), "--seed", "2", "--fraction", &fraction.to_string()])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkimage mutate failed");
    dst
}

fn b3(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

/// Cheap KDF settings: the tests open repositories many times.
fn opts() -> InitOptions {
    InitOptions {
        kdf: KdfParams { m_cost_kib: 8 * 1024, t_cost: 1, p_cost: 1 },
        ..InitOptions::default()
    }
}

fn secret() -> Secret {
    Secret::passphrase("correct horse battery staple")
}

fn meta(backup: &str, server: &str) -> VolumeMeta {
    VolumeMeta { backup: backup.into(), server: server.into(), volume: "/dev/vda".into() }
}

fn packs(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in fs::read_dir(repo.join("packs")).unwrap() {
        for p in fs::read_dir(sub.unwrap().path()).unwrap() {
            out.push(p.unwrap().path());
        }
    }
    out.sort();
    out
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn full_and_incremental_restore_bit_for_bit_and_incremental_stores_little() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 48, 1);
    let twin = mutated(&img, "twin", 0.01);
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), opts()).unwrap();

    let mut last = None;
    let full = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |p| last = Some(p)).unwrap();
    let last = last.unwrap();
    assert_eq!((last.done, last.total), (48 * MIB, 48 * MIB));
    let incr = repo.backup_volume(&twin, meta("b2", "srv-a"), &mut |_| {}).unwrap();
    assert!(
        incr.stats.bytes_stored * 20 < full.stats.bytes_stored,
        "incremental stored {} bytes, full {}",
        incr.stats.bytes_stored,
        full.stats.bytes_stored
    );

    let repo = Repository::open(&repo_dir, &secret()).unwrap();
    for (backup, source) in [(&full, &img), (&incr, &twin)] {
        let out = tmp.path().join(format!("restored-{}", backup.manifest.meta.backup));
        repo.restore_volume(backup.id, &out, false).unwrap();
        assert_eq!(b3(&out), b3(source), "restore of {}", backup.manifest.meta.backup);
    }
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{:?}", report.damage);
    assert_eq!(report.manifests, 2);
    // Nothing readable is stored: a 32-byte run of the image's text appears in no pack.
    let text = fs::read(&img).unwrap();
    let readable = |w: &[u8]| w.iter().all(|b| b.is_ascii_alphanumeric() || *b == b' ');
    let needle = text.windows(32).find(|w| readable(w)).unwrap();
    for p in packs(&repo_dir) {
        let data = fs::read(&p).unwrap();
        assert!(!data.windows(32).any(|w| w == needle), "plaintext in {}", p.display());
    }
}

#[test]
fn holes_stay_holes_on_backup_and_restore() {
    let tmp = tempfile::tempdir().unwrap();
    // 64 MiB: a hole, 1 MiB of data, a hole, 4 KiB of zeros written out, a hole.
    let src = tmp.path().join("sparse");
    let f = fs::File::create(&src).unwrap();
    f.set_len(64 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![7u8; MIB as usize], 10 * MIB).unwrap();
    f.write_all_at(&[0u8; 4096], 40 * MIB).unwrap();
    drop(f);
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), opts()).unwrap();
    let b = repo.backup_volume(&src, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    assert_eq!(b.stats.bytes_read, MIB + 4096, "holes are not read");
    let list = repo.chunk_list(&b.manifest).unwrap();
    assert!(list.iter().filter(|c| c.is_some()).count() as u64 <= MIB / 4096);
    let out = tmp.path().join("out");
    repo.restore_volume(b.id, &out, false).unwrap();
    assert_eq!(b3(&out), b3(&src));
    assert!(allocated(&out) <= MIB + 64 * 1024, "restored allocates {}", allocated(&out));

    // The mkimage image's holes too.
    let img = image(tmp.path(), "img", 32, 3);
    let b = repo.backup_volume(&img, meta("b2", "srv-a"), &mut |_| {}).unwrap();
    let out = tmp.path().join("out-img");
    repo.restore_volume(b.id, &out, false).unwrap();
    assert_eq!(b3(&out), b3(&img));
    // Slack for filesystem metadata: parallel direct writes can cost the file an extent-tree
    // block (4 KiB, counted in st_blocks) that the image, written in order, does not need.
    let slack = 64 * 1024;
    assert!(
        allocated(&out) <= allocated(&img) + slack,
        "{} > {}",
        allocated(&out),
        allocated(&img)
    );
    assert!(allocated(&out) < 32 * MIB * 95 / 100);
}

#[test]
fn verify_read_data_names_a_flipped_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 16, 4);
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), opts()).unwrap();
    let b = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    let pack = packs(&repo_dir).remove(0);
    let mut data = fs::read(&pack).unwrap();
    let pos = data.len() / 2;
    data[pos] ^= 0x40;
    fs::write(&pack, &data).unwrap();

    assert!(repo.verify(false).unwrap().is_ok(), "metadata checks do not read data");
    let report = repo.verify(true).unwrap();
    assert_eq!(report.damage.len(), 1, "{:?}", report.damage);
    match &report.damage[0] {
        Damage::ChunkCorrupt { manifest, chunk, pack: p, offset, .. } => {
            assert_eq!(*manifest, b.id);
            assert_eq!(p, &pack);
            assert!(*offset <= pos as u64);
            let list = repo.chunk_list(&b.manifest).unwrap_or_default();
            let pages = repo.page_blobs(&b.manifest).unwrap_or_default();
            assert!(list.contains(&Some(*chunk)) || pages.contains(chunk));
            let text = report.damage[0].to_string();
            assert!(
                text.contains(&pack.display().to_string()) && text.contains(&chunk.to_string())
            );
        }
        other => panic!("unexpected damage {other:?}"),
    }
    let err = repo.restore_volume(b.id, &tmp.path().join("out"), false).unwrap_err();
    assert!(matches!(err, Error::Damaged { .. }), "{err}");
}

#[test]
fn verify_finds_a_deleted_pack() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 16, 5);
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), opts()).unwrap();
    let b = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    let pack = packs(&repo_dir).remove(0);
    fs::remove_file(&pack).unwrap();
    let report = repo.verify(false).unwrap();
    assert!(!report.damage.is_empty());
    for d in &report.damage {
        match d {
            Damage::PackMissing { manifest, pack: p, .. } => {
                assert_eq!((*manifest, p), (b.id, &pack));
            }
            other => panic!("unexpected damage {other:?}"),
        }
    }
}

#[test]
fn verify_of_one_backup_checks_only_what_it_references() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (image(tmp.path(), "one", 8, 11), image(tmp.path(), "two", 8, 12));
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), opts()).unwrap();
    let a = repo.backup_volume(&one, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    let before = packs(&repo_dir);
    let b = repo.backup_volume(&two, meta("b2", "srv-a"), &mut |_| {}).unwrap();
    let backup = BackupManifest {
        backup: "b2".into(),
        volumes: vec![b.id],
        cut: serde_json::json!({}),
        created_unix_ms: 1,
        artifacts: Vec::new(),
    };
    let backup_id = repo.write_manifest(&Manifest::Backup(backup)).unwrap();
    // Damage only b2: one of its own packs loses a byte.
    let theirs: Vec<PathBuf> =
        packs(&repo_dir).into_iter().filter(|p| !before.contains(p)).collect();
    let mut data = fs::read(&theirs[0]).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 1;
    fs::write(&theirs[0], &data).unwrap();

    let reports = std::sync::Mutex::new(Vec::new());
    let progress = |p: VerifyProgress| reports.lock().unwrap().push(p);
    let mine = repo.verify_manifests_with(&[a.id], true, &progress).unwrap();
    assert!(mine.is_ok(), "b1 is whole: {:?}", mine.damage);
    // Progress counts b1's stored bytes up to their total, which is what its packs hold for it.
    let reports = reports.into_inner().unwrap();
    let total = reports.first().map(|p| p.total).unwrap_or(0);
    assert!(total > 0 && reports.iter().all(|p| p.total == total && p.done <= total));
    assert_eq!(reports.iter().map(|p| p.done).max(), Some(total));
    assert!(total <= before.iter().map(|p| fs::metadata(p).unwrap().len()).sum::<u64>());
    assert_eq!(mine.manifests, 1);
    let distinct = |m: &VolumeManifest| {
        let mut ids: Vec<_> = repo.chunk_list(m).unwrap().into_iter().flatten().collect();
        ids.extend(repo.page_blobs(m).unwrap());
        ids.sort();
        ids.dedup();
        ids.len()
    };
    assert_eq!(mine.chunks_read, distinct(&a.manifest), "reads b1's chunks and no others");

    // Through the backup manifest: it and the volume it names are checked; the damage is found.
    let theirs = repo.verify_manifests(&[backup_id], true).unwrap();
    assert_eq!(theirs.manifests, 2);
    assert!(
        theirs
            .damage
            .iter()
            .any(|d| matches!(d, Damage::ChunkCorrupt { manifest, .. } if *manifest == b.id)),
        "{:?}",
        theirs.damage
    );
}

#[test]
fn summaries_carry_everything_but_the_chunk_list() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 8, 13);
    let mut repo = Repository::init_with(&tmp.path().join("repo"), &secret(), opts()).unwrap();
    let b = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    let backup = BackupManifest {
        backup: "b1".into(),
        volumes: vec![b.id],
        cut: serde_json::json!({"servers": ["srv-a"]}),
        created_unix_ms: 7,
        artifacts: Vec::new(),
    };
    let backup_id = repo.write_manifest(&Manifest::Backup(backup.clone())).unwrap();
    let m = &b.manifest;
    let want = VolumeSummary {
        meta: m.meta.clone(),
        size: m.size,
        chunk_size: m.chunk_size,
        created_unix_ms: m.created_unix_ms,
    };
    assert_eq!(repo.load_summary(b.id).unwrap(), ManifestSummary::Volume(want));
    assert_eq!(repo.load_summary(backup_id).unwrap(), ManifestSummary::Backup(backup));
}

#[test]
fn wrong_passphrase_or_key_is_refused_clearly_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    Repository::init_with(&repo_dir, &secret(), opts()).unwrap();
    let config = fs::read(repo_dir.join("config")).unwrap();
    let err = Repository::open(&repo_dir, &Secret::passphrase("wrong")).unwrap_err();
    assert!(matches!(err, Error::WrongSecret { .. }));
    assert_eq!(
        err.to_string(),
        format!("wrong passphrase or key for repository {}", repo_dir.display())
    );
    assert_eq!(fs::read(repo_dir.join("config")).unwrap(), config);
    Repository::open(&repo_dir, &secret()).unwrap();

    // A key file works the same way.
    let key = tmp.path().join("key");
    fs::write(&key, [0x5a; 32]).unwrap();
    let keyed = tmp.path().join("keyed");
    Repository::init_with(&keyed, &Secret::from_key_file(&key).unwrap(), opts()).unwrap();
    Repository::open(&keyed, &Secret::from_key_file(&key).unwrap()).unwrap();
    let err = Repository::open(&keyed, &secret()).unwrap_err();
    assert!(matches!(err, Error::WrongSecret { .. }), "{err}");
    assert_eq!(format!("{:?}", secret()), "Secret(<redacted>)");
}

#[test]
fn restore_refuses_a_non_empty_target_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 8, 6);
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), opts()).unwrap();
    let b = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    let target = tmp.path().join("target");
    fs::write(&target, b"precious").unwrap();
    let err = repo.restore_volume(b.id, &target, false).unwrap_err();
    assert!(matches!(err, Error::TargetNotEmpty { .. }), "{err}");
    assert_eq!(fs::read(&target).unwrap(), b"precious");
    repo.restore_volume(b.id, &target, true).unwrap();
    assert_eq!(b3(&target), b3(&img));
    // An empty existing file is fine without force.
    let empty = tmp.path().join("empty");
    fs::write(&empty, b"").unwrap();
    repo.restore_volume(b.id, &empty, false).unwrap();
    assert_eq!(b3(&empty), b3(&img));
}

#[test]
fn restore_to_a_filesystem_too_small_fails_before_writing_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 8, 6);
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), opts()).unwrap();
    let b = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    // A 1 MiB tmpfs for an image with several MiB of data.
    let small = tmp.path().join("small");
    fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", small.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a 1 MiB tmpfs (the suite runs as root)");
    let err = repo.restore_volume(b.id, &small.join("disk.img"), false);
    let left = small.join("disk.img").exists();
    assert!(Command::new("umount").arg(&small).status().unwrap().success());
    let err = err.unwrap_err().to_string();
    assert!(err.contains("allocate") && err.contains("No space left"), "{err}");
    // Refused before any data was written, and the file it had created is gone, so a retry
    // somewhere with room needs no --force.
    assert!(!left, "the failed restore left its target behind");
    // The repository is untouched and still restores elsewhere.
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{report:?}");
}

#[test]
fn backup_manifest_records_the_cut_and_the_artifacts_as_given() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 4, 7);
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), opts()).unwrap();
    let v = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    let cut = serde_json::json!({"servers": [{"name": "srv-a", "frozen_ms": 1, "thawed_ms": 9,
        "quiescers": [{"app": "postgres", "report": "checkpoint ok"}]}]});
    let m = Manifest::Backup(BackupManifest {
        backup: "b1".into(),
        volumes: vec![v.id],
        cut,
        created_unix_ms: 42,
        artifacts: vec![stillpoint_saveset::BackupArtifact {
            server: "srv-a".into(),
            quiescer: "postgres".into(),
            name: "backup_label".into(),
            bytes: b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n".to_vec(),
        }],
    });
    let id = repo.write_manifest(&m).unwrap();
    let repo = Repository::open(&repo_dir, &secret()).unwrap();
    assert_eq!(repo.load_manifest(id).unwrap(), m);
    assert!(repo.verify(true).unwrap().is_ok());
    fs::remove_file(repo_dir.join("manifests").join(v.id.to_string())).unwrap();
    let report = repo.verify(false).unwrap();
    assert_eq!(report.damage, vec![Damage::VolumeManifestMissing { backup: id, volume: v.id }]);
}

#[test]
fn forget_backup_deletes_its_manifests_backup_manifest_first_and_leaves_others_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (image(tmp.path(), "one", 4, 21), image(tmp.path(), "two", 4, 22));
    let repo_dir = tmp.path().join("repo");
    let mut repo = Repository::init_with(&repo_dir, &secret(), opts()).unwrap();
    let a = repo.backup_volume(&one, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    let b = repo.backup_volume(&two, meta("b1", "srv-b"), &mut |_| {}).unwrap();
    let c = repo.backup_volume(&one, meta("b2", "srv-a"), &mut |_| {}).unwrap();
    let sealed = |backup: &str, volumes| BackupManifest {
        backup: backup.into(),
        volumes,
        cut: serde_json::json!({}),
        created_unix_ms: 1,
        artifacts: Vec::new(),
    };
    let b1 = repo.write_manifest(&Manifest::Backup(sealed("b1", vec![a.id, b.id]))).unwrap();
    let b2 = repo.write_manifest(&Manifest::Backup(sealed("b2", vec![c.id]))).unwrap();

    let gone = repo.forget_backup("b1").unwrap();
    assert_eq!(gone.backup_manifests, vec![b1]);
    let mut volumes = gone.volume_manifests.clone();
    volumes.sort();
    let mut want = vec![a.id, b.id];
    want.sort();
    assert_eq!(volumes, want);
    assert!(gone.unreadable.is_empty());
    let mut left = repo.list_manifests().unwrap();
    left.sort();
    let mut want = vec![c.id, b2];
    want.sort();
    assert_eq!(left, want, "only b2's manifests remain");
    // What is left is a valid repository and b2 still restores bit for bit.
    assert!(repo.verify(true).unwrap().is_ok());
    let out = tmp.path().join("restored");
    repo.restore_volume(c.id, &out, false).unwrap();
    assert_eq!(b3(&out), b3(&one));
    // Again: nothing more to forget.
    assert_eq!(repo.forget_backup("b1").unwrap(), Default::default());
}

const CRASH_ENV: &str = "SAVESET_CRASH_CHILD";

/// Not a test on its own: the child process of `sigkill_mid_backup_leaves_a_valid_repository`.
#[test]
fn crash_child() {
    let Some(args) = std::env::var_os(CRASH_ENV) else { return };
    let args = args.into_string().unwrap();
    let (repo_dir, img) = args.split_once('\n').unwrap();
    let mut repo = Repository::open(Path::new(repo_dir), &secret()).unwrap();
    let mut said = false;
    let _ = repo.backup_volume(Path::new(img), meta("crashed", "srv-a"), &mut |p| {
        if !said && p.done * 10 >= p.total * 6 {
            said = true;
            let mut out = std::io::stdout();
            writeln!(out, "SAVESET-HALF").unwrap();
            out.flush().unwrap();
            // Wait here for the SIGKILL, mid-pack, with earlier packs committed.
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    });
}

#[test]
fn sigkill_mid_backup_leaves_a_valid_repository_and_the_rerun_reuses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 32, 8);
    let small_packs = InitOptions { pack_size: MIB, ..opts() };
    let repo_dir = tmp.path().join("repo");
    Repository::init_with(&repo_dir, &secret(), small_packs.clone()).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CRASH_ENV, format!("{}\n{}", repo_dir.display(), img.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("SAVESET-HALF")), "child never got half-way");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let mut repo = Repository::open(&repo_dir, &secret()).unwrap();
    assert!(repo.list_manifests().unwrap().is_empty(), "the killed backup wrote no manifest");
    assert!(repo.verify(true).unwrap().is_ok());
    assert!(!packs(&repo_dir).is_empty(), "packs from before the kill remain");
    let rerun = repo.backup_volume(&img, meta("rerun", "srv-a"), &mut |_| {}).unwrap();

    let fresh_dir = tmp.path().join("fresh");
    let mut fresh = Repository::init_with(&fresh_dir, &secret(), small_packs).unwrap();
    let full = fresh.backup_volume(&img, meta("fresh", "srv-a"), &mut |_| {}).unwrap();
    assert!(
        rerun.stats.bytes_stored * 10 < full.stats.bytes_stored * 6,
        "rerun stored {} of a full {}",
        rerun.stats.bytes_stored,
        full.stats.bytes_stored
    );
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{:?}", report.damage);
    let out = tmp.path().join("out");
    repo.restore_volume(rerun.id, &out, false).unwrap();
    assert_eq!(b3(&out), b3(&img));
}

#[test]
fn two_concurrent_writers_to_one_repository_both_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let a = image(tmp.path(), "a", 24, 9);
    let b = mutated(&a, "b", 0.05);
    let repo_dir = tmp.path().join("repo");
    Repository::init_with(&repo_dir, &secret(), InitOptions { pack_size: MIB, ..opts() }).unwrap();
    let backups: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = [(&a, "srv-a"), (&b, "srv-b")]
            .into_iter()
            .map(|(img, server)| {
                let repo_dir = &repo_dir;
                s.spawn(move || {
                    let mut repo = Repository::open(repo_dir, &secret()).unwrap();
                    repo.backup_volume(img, meta("b1", server), &mut |_| {}).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let repo = Repository::open(&repo_dir, &secret()).unwrap();
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{:?}", report.damage);
    assert_eq!(report.manifests, 2);
    for (backup, source) in backups.iter().zip([&a, &b]) {
        let out = tmp.path().join(format!("out-{}", backup.manifest.meta.server));
        repo.restore_volume(backup.id, &out, false).unwrap();
        assert_eq!(b3(&out), b3(source));
    }
}

#[test]
fn concurrent_copies_of_similar_disks_through_one_pool_store_each_chunk_once() {
    let tmp = tempfile::tempdir().unwrap();
    // Two servers cloned from one template, copied at the same time (the listener copying a
    // SAN): without claims each would store the template.
    let a = image(tmp.path(), "a", 24, 10);
    let b = mutated(&a, "b", 0.02);
    let repo_dir = tmp.path().join("repo");
    Repository::init_with(&repo_dir, &secret(), InitOptions { pack_size: MIB, ..opts() }).unwrap();
    let pool = Pool::open(Location::Local(repo_dir.clone()), secret()).unwrap();
    let start = std::sync::Barrier::new(2);
    let backups: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = [(&a, "srv-a"), (&b, "srv-b")]
            .into_iter()
            .map(|(img, server)| {
                let (pool, start) = (&pool, &start);
                s.spawn(move || {
                    pool.with_repo(
                        |e| e,
                        |repo| {
                            start.wait();
                            repo.backup_volume(img, meta("b1", server), &mut |_| {})
                        },
                    )
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each distinct data chunk of the two disks was stored by exactly one of the copies.
    let repo = Repository::open(&repo_dir, &secret()).unwrap();
    let mut distinct = std::collections::HashSet::new();
    for backup in &backups {
        distinct.extend(repo.chunk_list(&backup.manifest).unwrap().into_iter().flatten());
    }
    let new: u64 = backups.iter().map(|b| b.stats.new_chunks).sum();
    assert_eq!(
        new,
        distinct.len() as u64,
        "{:?}",
        backups.iter().map(|b| b.stats.clone()).collect::<Vec<_>>()
    );
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{:?}", report.damage);
    for (backup, source) in backups.iter().zip([&a, &b]) {
        let out = tmp.path().join(format!("out-{}", backup.manifest.meta.server));
        repo.restore_volume(backup.id, &out, false).unwrap();
        assert_eq!(b3(&out), b3(source));
    }
}
