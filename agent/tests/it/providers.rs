//! Snapshot providers on real storage: one conformance suite (idempotent create, list by backup
//! id, delete safe to repeat, a failure on the third volume leaves nothing behind) run on every
//! provider that works on this machine, each as `snapshot::build` makes it; and the reflink
//! provider's clones on loop-mounted XFS and btrfs while a writer keeps changing the source.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stillpoint_agent::config::{Config, SnapshotConfig};
use stillpoint_agent::snapshot::reflink::ReflinkConfig;
use stillpoint_agent::snapshot::{self, SnapshotProvider};
use stillpoint_core::san::Array;

use crate::support::{run, sparse_image, LoopMount};

/// A config for server `srv-p` snapshotting `volumes` with `snapshot` (its TLS files are never
/// read: only the provider is built from it).
fn agent_config(volumes: &[String], snapshot: SnapshotConfig) -> Config {
    let mut config = Config::parse(
        r#"
server = "srv-p"
listen = "127.0.0.1:0"
volumes = ["placeholder"]
[tls]
ca = "/nonexistent/ca.pem"
cert = "/nonexistent/srv-p.pem"
key = "/nonexistent/srv-p.key"
[snapshot]
provider = "btrfs"
snapshot_dir = "/nonexistent"
"#,
    )
    .unwrap();
    config.volumes = volumes.to_vec();
    config.snapshot = snapshot;
    config
}

/// The provider as the agent builds it.
fn built(volumes: &[String], snapshot: SnapshotConfig) -> Arc<dyn SnapshotProvider> {
    snapshot::build(&agent_config(volumes, snapshot)).unwrap()
}

/// The snapshot problems `validate` finds (TLS problems of the placeholder config left out).
fn snapshot_problems(volumes: &[String], snapshot: SnapshotConfig) -> Vec<String> {
    agent_config(volumes, snapshot)
        .problems()
        .into_iter()
        .filter(|p| !p.starts_with("tls"))
        .collect()
}

/// What every provider promises (the `SnapshotProvider` contract, and all or nothing): `good`
/// are three volumes it can snapshot, `broken` one it cannot. `residue(backup)` lists what the
/// storage still holds of a backup, looked at directly rather than through `list`.
pub fn conformance(
    provider: &dyn SnapshotProvider,
    good: &[String; 3],
    broken: &str,
    residue: &dyn Fn(&str) -> Vec<String>,
) {
    let kind = provider.kind();
    let of = |backup: &str| -> Vec<_> {
        let mut held: Vec<_> = provider
            .list()
            .unwrap()
            .into_iter()
            .filter(|(b, _)| b == backup)
            .map(|(_, s)| s)
            .collect();
        held.sort_by(|a, b| a.volume.cmp(&b.volume));
        held
    };
    let stamp = |locator: &str| {
        std::fs::metadata(locator).ok().map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.ctime()))
    };

    // Create, then create again: the same snapshots, not retaken.
    let first = provider.create("conf-1", good).unwrap();
    assert_eq!(first.len(), 3, "{kind}: one snapshot per volume: {first:?}");
    assert!(first.iter().all(|s| s.provider == kind), "{kind}: {first:?}");
    let stamps: Vec<_> = first.iter().map(|s| stamp(&s.locator)).collect();
    std::thread::sleep(Duration::from_millis(20));
    let again = provider.create("conf-1", good).unwrap();
    assert_eq!(again, first, "{kind}: a repeated create returns what the first made");
    let restamped: Vec<_> = again.iter().map(|s| stamp(&s.locator)).collect();
    assert_eq!(restamped, stamps, "{kind}: a repeated create must not retake a snapshot");

    // List finds them by backup id, beside another backup's.
    let mut sorted = first.clone();
    sorted.sort_by(|a, b| a.volume.cmp(&b.volume));
    assert_eq!(of("conf-1"), sorted, "{kind}: list finds what create made");
    let second = provider.create("conf-2", &good[..2]).unwrap();
    assert_eq!(of("conf-2").len(), 2, "{kind}: {second:?}");
    assert_eq!(of("conf-1").len(), 3, "{kind}: another backup's snapshots are its own");

    // Delete removes all of one backup, and again deletes nothing.
    assert_eq!(provider.delete("conf-1").unwrap(), 3, "{kind}: delete counts what it removed");
    assert!(of("conf-1").is_empty(), "{kind}: list after delete: {:?}", of("conf-1"));
    assert!(residue("conf-1").is_empty(), "{kind}: left behind: {:?}", residue("conf-1"));
    assert_eq!(provider.delete("conf-1").unwrap(), 0, "{kind}: a repeated delete deletes nothing");
    assert_eq!(provider.delete("never-made").unwrap(), 0, "{kind}: unknown backup");
    assert_eq!(of("conf-2").len(), 2, "{kind}: delete touched another backup");

    // A failure on the third volume leaves nothing of that backup behind.
    let volumes = [good[0].clone(), good[1].clone(), broken.to_string(), good[2].clone()];
    let err = provider.create("conf-3", &volumes).unwrap_err();
    let text = format!("{err:#}");
    println!("{kind}: a failure on the third volume: {text}");
    assert!(text.contains(broken), "{kind}: the error names the volume: {text}");
    assert!(text.contains("deleted the 2 snapshot(s)"), "{kind}: says what it cleaned: {text}");
    assert!(of("conf-3").is_empty(), "{kind}: list after a failed create: {:?}", of("conf-3"));
    assert!(residue("conf-3").is_empty(), "{kind}: left behind: {:?}", residue("conf-3"));
    assert_eq!(provider.delete("conf-3").unwrap(), 0, "{kind}");

    assert_eq!(provider.delete("conf-2").unwrap(), 2, "{kind}");
    assert!(provider.list().unwrap().is_empty(), "{kind}: {:?}", provider.list().unwrap());
}

/// The entries under `dir/backup`, if any.
fn dir_residue(dir: &Path, backup: &str) -> Vec<String> {
    match std::fs::read_dir(dir.join(backup)) {
        Ok(rd) => rd.map(|e| e.unwrap().path().display().to_string()).collect(),
        Err(_) if !dir.join(backup).exists() => Vec::new(),
        Err(e) => vec![format!("{}: {e}", dir.join(backup).display())],
    }
}

/// A loop-mounted filesystem image made by the test: `mkfs` is the program and its options.
fn loop_fs(dir: &Path, name: &str, size: u64, mkfs: &[&str]) -> LoopMount {
    let image = dir.join(format!("{name}.img"));
    sparse_image(&image, size);
    let mut args = mkfs[1..].to_vec();
    args.push(image.to_str().unwrap());
    run(mkfs[0], &args);
    LoopMount::new(&image, &dir.join(name), false, "rw")
}

fn xfs(dir: &Path, size: u64) -> LoopMount {
    loop_fs(dir, "xfs", size, &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"])
}

fn btrfs(dir: &Path, size: u64) -> LoopMount {
    loop_fs(dir, "btrfs", size, &["mkfs.btrfs", "-q", "-f"])
}

/// Image files `a.img`, `b.img`, `c.img` of 4 MiB with distinct data in `dir`.
fn image_files(dir: &Path) -> [String; 3] {
    ["a.img", "b.img", "c.img"].map(|n| {
        let path = dir.join(n);
        std::fs::write(&path, &n.repeat(1 << 20).as_bytes()[..4 << 20]).unwrap();
        path.display().to_string()
    })
}

#[test]
fn conformance_reflink_on_xfs_and_btrfs() {
    let dir = tempfile::tempdir().unwrap();
    for fs in [xfs(dir.path(), 512 << 20), btrfs(dir.path(), 512 << 20)] {
        let images = fs.mount.join("images");
        let snapshot_dir = fs.mount.join("snapshots");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&snapshot_dir).unwrap();
        let good = image_files(&images);
        let broken = images.join("missing.img").display().to_string();
        let config = SnapshotConfig::Reflink(ReflinkConfig { snapshot_dir: snapshot_dir.clone() });
        assert_eq!(snapshot_problems(&good, config.clone()), Vec::<String>::new());
        let provider = built(&good, config);
        conformance(&*provider, &good, &broken, &|b| dir_residue(&snapshot_dir, b));
    }
}

#[test]
fn conformance_btrfs() {
    let dir = tempfile::tempdir().unwrap();
    let fs = btrfs(dir.path(), 256 << 20);
    let snapshot_dir = fs.mount.join(".stillpoint");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let good = ["a", "b", "c"].map(|n| {
        let sub = fs.mount.join(n);
        run("btrfs", &["subvolume", "create", sub.to_str().unwrap()]);
        std::fs::write(sub.join("file"), n).unwrap();
        sub.display().to_string()
    });
    // A directory but no subvolume: `btrfs subvolume snapshot` refuses it.
    let broken = fs.mount.join("plain-dir");
    std::fs::create_dir(&broken).unwrap();
    let provider = built(&good, SnapshotConfig::Btrfs { snapshot_dir: snapshot_dir.clone() });
    conformance(&*provider, &good, broken.to_str().unwrap(), &|b| dir_residue(&snapshot_dir, b));
}

#[test]
fn conformance_mock_san() {
    let dir = tempfile::tempdir().unwrap();
    let array = Array::init(&dir.path().join("array")).unwrap();
    let good = ["a", "b", "c"].map(|lun| {
        array.create_lun("srv-p", lun, 1 << 20).unwrap();
        lun.to_string()
    });
    let snapshot =
        SnapshotConfig::MockSan { array: array.root().to_path_buf(), snapshot_delay_ms: 0 };
    let provider = built(&good, snapshot);
    let residue = |b: &str| -> Vec<String> {
        array
            .snapshots(Some(b))
            .unwrap()
            .into_iter()
            .map(|s| s.path.display().to_string())
            .collect()
    };
    conformance(&*provider, &good, "no-such-lun", &residue);
}

/// Block `i` of generation `gen`: every 8 bytes say both, so a block holds exactly one write.
fn block(gen: u64, i: u64, size: usize) -> Vec<u8> {
    let word = (gen << 32 | i).to_le_bytes();
    word.iter().copied().cycle().take(size).collect()
}

const BLOCK: usize = 64 << 10;
const BLOCKS: u64 = 256; // 16 MiB

/// Rewrites the file's blocks in order, generation after generation, until `stop`; `gen` is
/// the generation being written.
fn writer(
    path: PathBuf,
    stop: Arc<AtomicBool>,
    gen: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let file = OpenOptions::new().write(true).open(path).unwrap();
        let mut g = 1;
        while !stop.load(Ordering::SeqCst) {
            gen.store(g, Ordering::SeqCst);
            for i in 0..BLOCKS {
                file.write_all_at(&block(g, i, BLOCK), i * BLOCK as u64).unwrap();
            }
            g += 1;
        }
    })
}

/// The clone is a state the file was in: blocks `0..k` of generation `g + 1` and the rest of
/// `g`, each whole. Returns `g`, after comparing the clone with that state byte for byte.
fn check_point_in_time(clone: &Path) -> (u64, u64) {
    let data = std::fs::read(clone).unwrap();
    assert_eq!(data.len(), BLOCK * BLOCKS as usize);
    let gens: Vec<u64> =
        data.chunks(BLOCK).map(|c| u64::from_le_bytes(c[..8].try_into().unwrap()) >> 32).collect();
    let last = gens[gens.len() - 1];
    let k = gens.iter().take_while(|&&g| g == last + 1).count() as u64;
    let expected: Vec<u8> =
        (0..BLOCKS).flat_map(|i| block(if i < k { last + 1 } else { last }, i, BLOCK)).collect();
    assert!(
        data == expected,
        "the clone is no state the file was in (generations per block: {gens:?})"
    );
    (last, k)
}

/// Clones the image three times while the writer runs; each clone must be a whole state of the
/// file and stay as it was while the source goes on changing.
fn clones_are_point_in_time(fs: &LoopMount) {
    let images = fs.mount.join("images");
    let snapshot_dir = fs.mount.join("snapshots");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&snapshot_dir).unwrap();
    let image = images.join("vm.img");
    let f = File::create(&image).unwrap();
    for i in 0..BLOCKS {
        f.write_all_at(&block(0, i, BLOCK), i * BLOCK as u64).unwrap();
    }
    drop(f);
    let volumes = [image.display().to_string()];
    let config = SnapshotConfig::Reflink(ReflinkConfig { snapshot_dir });
    let provider = built(&volumes, config);

    let (stop, gen) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let w = writer(image.clone(), stop.clone(), gen.clone());
    let mut seen = BTreeSet::new();
    for n in 0..3 {
        while gen.load(Ordering::SeqCst) < 2 + 3 * n {
            std::thread::sleep(Duration::from_millis(1));
        }
        let id = format!("b{n}");
        let snaps = provider.create(&id, &volumes).unwrap();
        let clone = PathBuf::from(&snaps[0].locator);
        assert_eq!(clone, fs.mount.join("snapshots").join(&id).join("vm.img"));
        let mode = std::fs::metadata(&clone).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o400, "clones are read-only");
        let (g, k) = check_point_in_time(&clone);
        println!(
            "{}: clone {id} holds generation {g} with blocks 0..{k} of {}",
            fs.mount.display(),
            g + 1
        );
        seen.insert((g, k));
        // The source keeps changing; the clone does not.
        let before = std::fs::read(&clone).unwrap();
        let at = gen.load(Ordering::SeqCst);
        while gen.load(Ordering::SeqCst) < at + 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(std::fs::read(&clone).unwrap() == before, "the clone changed with its source");
    }
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    assert_eq!(seen.len(), 3, "three clones at three instants: {seen:?}");
    for n in 0..3 {
        assert_eq!(provider.delete(&format!("b{n}")).unwrap(), 1);
    }
}

#[test]
fn reflink_clones_are_point_in_time_on_xfs_while_a_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    clones_are_point_in_time(&xfs(dir.path(), 512 << 20));
}

#[test]
fn reflink_clones_are_point_in_time_on_btrfs_while_a_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    clones_are_point_in_time(&btrfs(dir.path(), 512 << 20));
}

/// How long one clone of `volume` takes, the best of three.
fn clone_time(provider: &dyn SnapshotProvider, volume: &str) -> Duration {
    (0..3)
        .map(|n| {
            let id = format!("t{n}");
            let t = Instant::now();
            provider.create(&id, &[volume.to_string()]).unwrap();
            let took = t.elapsed();
            provider.delete(&id).unwrap();
            took
        })
        .min()
        .unwrap()
}

/// Not a timed assertion: prints the figures. Asserts only that the clone shares extents
/// (the filesystem's free space does not drop by the file's data).
#[test]
fn reflink_create_time_does_not_grow_with_file_size() {
    let dir = tempfile::tempdir().unwrap();
    let fs = xfs(dir.path(), 6 << 30);
    let snapshot_dir = fs.mount.join("snapshots");
    std::fs::create_dir_all(&snapshot_dir).unwrap();
    let small = fs.mount.join("small.img");
    let noise: Vec<u8> =
        (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let f = File::create(&small).unwrap();
    for i in 0..64u64 {
        f.write_all_at(&noise, i << 20).unwrap();
    }
    f.sync_all().unwrap();
    // 4 GiB, sparse, with 256 MiB of data: 1 MiB every 16 MiB.
    let big = fs.mount.join("big.img");
    let f = File::create(&big).unwrap();
    f.set_len(4 << 30).unwrap();
    for i in 0..256u64 {
        f.write_all_at(&noise, i * (16 << 20)).unwrap();
    }
    f.sync_all().unwrap();
    let volumes = [small.display().to_string(), big.display().to_string()];
    let config = SnapshotConfig::Reflink(ReflinkConfig { snapshot_dir });
    let provider = built(&volumes, config);

    let free = || run("df", &["--output=used", "-B1", fs.mount.to_str().unwrap()]);
    let used_before = free();
    let snaps = provider.create("keep", &volumes).unwrap();
    let used_after = free();
    println!("XFS used bytes before and after cloning 320 MiB of data: {used_before:?} -> {used_after:?}");
    assert_eq!(snaps[1].size_bytes, 4 << 30);
    let parse = |s: &str| s.lines().last().unwrap().trim().parse::<u64>().unwrap();
    assert!(
        parse(&used_after) - parse(&used_before) < 32 << 20,
        "the clones took space: they were copied, not reflinked"
    );
    provider.delete("keep").unwrap();

    let t_small = clone_time(&*provider, &volumes[0]);
    let t_big = clone_time(&*provider, &volumes[1]);
    println!(
        "reflink create on XFS: 64 MiB file {:.2} ms, 4 GiB sparse file with 256 MiB of data in 256 extents {:.2} ms",
        t_small.as_secs_f64() * 1e3,
        t_big.as_secs_f64() * 1e3
    );
}

#[test]
fn reflink_config_refuses_another_filesystem_and_one_that_cannot_reflink() {
    let dir = tempfile::tempdir().unwrap();
    let fs = xfs(dir.path(), 512 << 20);
    let image = fs.mount.join("vm.img");
    std::fs::write(&image, b"disk").unwrap();
    let volumes = [image.display().to_string()];

    // snapshot_dir on the machine's root filesystem (ext4 here), not on the XFS mount.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let config = SnapshotConfig::Reflink(ReflinkConfig { snapshot_dir: elsewhere.clone() });
    let problems = snapshot_problems(&volumes, config);
    println!("{problems:#?}");
    assert!(
        problems.len() == 1 && problems[0].contains("another filesystem or mount"),
        "{problems:#?}"
    );

    // Volume and snapshot_dir on one filesystem that cannot reflink (ext4, or XFS without it).
    let flat =
        loop_fs(dir.path(), "noreflink", 512 << 20, &["mkfs.xfs", "-q", "-f", "-m", "reflink=0"]);
    let image = flat.mount.join("vm.img");
    std::fs::write(&image, b"disk").unwrap();
    std::fs::create_dir(flat.mount.join("snapshots")).unwrap();
    let config =
        SnapshotConfig::Reflink(ReflinkConfig { snapshot_dir: flat.mount.join("snapshots") });
    let problems = snapshot_problems(&[image.display().to_string()], config);
    println!("{problems:#?}");
    assert!(
        problems.len() == 1
            && problems[0].contains("cannot reflink")
            && problems[0].contains("reflink=1"),
        "{problems:#?}"
    );
    // The probe files are gone.
    assert_eq!(std::fs::read_dir(flat.mount.join("snapshots")).unwrap().count(), 0);

    // A directory as a volume, a relative snapshot_dir.
    let config = SnapshotConfig::Reflink(ReflinkConfig { snapshot_dir: "snaps".into() });
    let problems = snapshot_problems(&[fs.mount.display().to_string()], config);
    assert!(problems.iter().any(|p| p.starts_with("snapshot.snapshot_dir:")), "{problems:#?}");
}
