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
use stillpoint_agent::snapshot::qcow2;
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
pub fn built(volumes: &[String], snapshot: SnapshotConfig) -> Arc<dyn SnapshotProvider> {
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

/// How many separate runs of data `path` has (SEEK_DATA, SEEK_HOLE).
fn data_runs(path: &Path) -> usize {
    let f = File::open(path).unwrap();
    let (mut at, mut runs) = (0, 0);
    while let Some(data) = stillpoint_core::sys::next_data(&f, at).unwrap() {
        runs += 1;
        at = stillpoint_core::sys::next_hole(&f, data).unwrap().unwrap();
    }
    runs
}

/// Not a timed assertion: prints the figures. Asserts only that the clones share extents
/// (the filesystem's used space does not grow by the files' data).
fn clone_times(fs: &LoopMount, name: &str) {
    let snapshot_dir = fs.mount.join("snapshots");
    std::fs::create_dir_all(&snapshot_dir).unwrap();
    let noise: Vec<u8> =
        (0..(1u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    // (file, size, MiB offsets of 1 MiB of data each)
    let layouts: [(&str, u64, Vec<u64>); 3] = [
        ("small.img", 64 << 20, (0..64).collect()),
        ("big-contiguous.img", 4 << 30, (0..64).collect()),
        ("big-scattered.img", 4 << 30, (0..256).map(|i| i * 16).collect()),
    ];
    let mut volumes = Vec::new();
    for (file, size, mibs) in &layouts {
        let path = fs.mount.join(file);
        let f = File::create(&path).unwrap();
        f.set_len(*size).unwrap();
        for mib in mibs {
            f.write_all_at(&noise, mib << 20).unwrap();
        }
        f.sync_all().unwrap();
        volumes.push(path.display().to_string());
    }
    let config = SnapshotConfig::Reflink(ReflinkConfig { snapshot_dir });
    let provider = built(&volumes, config);

    let used = || {
        let out = run("df", &["--output=used", "-B1", fs.mount.to_str().unwrap()]);
        out.lines().last().unwrap().trim().parse::<u64>().unwrap()
    };
    run("sync", &[]);
    let before = used();
    let snaps = provider.create("keep", &volumes).unwrap();
    run("sync", &[]);
    let after = used();
    println!("{name}: used bytes before and after cloning 384 MiB of data: {before} -> {after}");
    assert_eq!(snaps[2].size_bytes, 4 << 30);
    assert!(
        after.saturating_sub(before) < 32 << 20,
        "{name}: the clones took {} bytes: they were copied, not reflinked",
        after - before
    );
    provider.delete("keep").unwrap();

    for (volume, (file, _, _)) in volumes.iter().zip(&layouts) {
        let t = clone_time(&*provider, volume);
        println!(
            "{name}: reflink create of {file}: {:.2} ms ({} data runs)",
            t.as_secs_f64() * 1e3,
            data_runs(Path::new(volume))
        );
    }
}

#[test]
fn reflink_create_time_does_not_grow_with_file_size() {
    let dir = tempfile::tempdir().unwrap();
    clone_times(&xfs(dir.path(), 6 << 30), "XFS");
    clone_times(&btrfs(dir.path(), 6 << 30), "btrfs");
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

/// Held by every qcow2 test: any qcow2 delete or export ends the exports of agent processes
/// that are gone, which would race with the test that makes one on purpose.
pub static QCOW2: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A qcow2 disk of `size` made with qemu-img.
pub fn qcow2_disk(path: &Path, size: &str) -> String {
    run("qemu-img", &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), size]);
    path.display().to_string()
}

/// Guest writes through qemu-io: `pattern` bytes at `offset`, `len` long.
pub fn guest_write(disk: &str, pattern: u8, offset: &str, len: &str) {
    run("qemu-io", &["-f", "qcow2", "-c", &format!("write -P {pattern} {offset} {len}"), disk]);
}

/// What the guest sees on `disk` (or in its internal snapshot `tag`), as raw bytes.
pub fn guest_view(disk: &str, tag: Option<&str>, out: &Path) -> Vec<u8> {
    let snapshot = tag.map(|t| format!("snapshot.name={t}"));
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    if let Some(s) = &snapshot {
        args.extend(["-l", s]);
    }
    args.extend([disk, out.to_str().unwrap()]);
    run("qemu-img", &args);
    std::fs::read(out).unwrap()
}

pub fn qcow2_tags(disk: &str) -> Vec<String> {
    let info = run("qemu-img", &["info", "-U", "-f", "qcow2", "--output=json", disk]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
    snaps.iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
}

#[test]
fn conformance_qcow2() {
    let _one_at_a_time = QCOW2.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let good = ["a", "b", "c"].map(|n| {
        let disk = qcow2_disk(&dir.path().join(format!("{n}.qcow2")), "8M");
        guest_write(&disk, n.as_bytes()[0], "0", "64k");
        disk
    });
    let broken = dir.path().join("missing.qcow2").display().to_string();
    let config = SnapshotConfig::Qcow2(Default::default());
    assert_eq!(snapshot_problems(&good, config.clone()), Vec::<String>::new());
    // list and delete look inside the configured disks: the broken one is among them.
    let mut volumes = good.to_vec();
    volumes.push(broken.clone());
    let provider = built(&volumes, config);
    let residue = |b: &str| -> Vec<String> {
        good.iter()
            .flat_map(|d| qcow2_tags(d).into_iter().map(move |t| format!("{d}@{t}")))
            .filter(|t| t.ends_with(&format!("@stillpoint-{b}")))
            .collect()
    };
    conformance(&*provider, &good, &broken, &residue);
}

/// A qemu-nbd serving `disk` read-write on `socket`, holding its write lock as a running VM
/// does; waits (up to 10 s) for the socket.
fn running_vm(disk: &str, socket: &Path) -> std::process::Child {
    let _ = std::fs::remove_file(socket);
    let vm = std::process::Command::new("qemu-nbd")
        .args(["--format=qcow2", "--persistent"])
        .arg(format!("--socket={}", socket.display()))
        .arg(disk)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    vm
}

#[test]
fn qcow2_refuses_a_disk_a_running_vm_has_open_and_says_so() {
    let _one_at_a_time = QCOW2.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let disk = qcow2_disk(&dir.path().join("vm.qcow2"), "8M");
    let provider = built(std::slice::from_ref(&disk), SnapshotConfig::Qcow2(Default::default()));
    let socket = dir.path().join("vm.sock");
    let mut vm = running_vm(&disk, &socket);
    let err = provider.create("b1", std::slice::from_ref(&disk));
    let _ = vm.kill();
    let _ = vm.wait();
    let text = format!("{:#}", err.unwrap_err());
    println!("{text}");
    assert!(text.contains("running VM") && text.contains("write lock"), "{text}");
    assert!(qcow2_tags(&disk).is_empty(), "nothing was snapshotted");
    // Once the VM is gone the same disk snapshots.
    let snaps = provider.create("b1", std::slice::from_ref(&disk)).unwrap();
    assert_eq!(qcow2_tags(&disk), ["stillpoint-b1"]);
    // A VM started before the copy keeps the copy from reading the snapshot, and says why.
    let mut vm = running_vm(&disk, &socket);
    let export = qcow2::export_for_copy(snaps);
    let _ = vm.kill();
    let _ = vm.wait();
    let text = format!("{:#}", export.err().expect("no export while a VM writes the disk"));
    println!("{text}");
    assert!(text.contains("running VM"), "{text}");
    assert!(exports_mounted().is_empty(), "{:?}", exports_mounted());
    assert_eq!(provider.delete("b1").unwrap(), 1);
}

/// No FUSE export of ours is mounted.
fn exports_mounted() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("stillpoint-qcow2-export"))
        .map(String::from)
        .collect()
}

/// A qcow2 disk backed up through the agent (Prepare, Commit, the saveset Copy on the agent)
/// while the guest keeps writing after the snapshot restores to exactly what the guest saw at
/// the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_backup_through_the_agent_restores_bit_identical_guest_data() {
    let _one_at_a_time = QCOW2.lock().await;
    use stillpoint_proto::{
        copy_event, CleanupRequest, CommitRequest, CopyRequest, PrepareRequest,
    };
    use stillpoint_saveset::{Manifest, ManifestId, Repository, Secret};

    let dir = tempfile::tempdir().unwrap();
    let disk = qcow2_disk(&dir.path().join("web.qcow2"), "64M");
    guest_write(&disk, 0xaa, "0", "1M");
    guest_write(&disk, 0x11, "10M", "512k");
    guest_write(&disk, 0x5c, "40M", "3M");
    let at_snapshot = guest_view(&disk, None, &dir.path().join("at-snapshot.raw"));

    let repo = dir.path().join("repo");
    let certs = crate::support::Certs::new("srv-q");
    let mut c = crate::support::config(
        &certs,
        &[disk.as_str()],
        Vec::new(),
        SnapshotConfig::Qcow2(Default::default()),
    );
    c.saveset = Some(crate::support::saveset_repo(dir.path(), "qcow2 words"));
    let agent = crate::support::Agent::start(c).await;
    let mut client = agent.client(&certs, "listener");
    let p = client
        .prepare(PrepareRequest { backup_id: "b1".into(), lease_ms: 10_000, ..Default::default() })
        .await;
    assert!(p.unwrap().into_inner().prepared);
    let committed = client
        .commit(CommitRequest { backup_id: "b1".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(committed.committed, "{committed:?}");
    assert_eq!(committed.snapshots[0].locator, format!("{disk}@stillpoint-b1"));
    assert_eq!(committed.snapshots[0].size_bytes, 64 << 20);

    // The guest goes on writing after the snapshot.
    guest_write(&disk, 0xbb, "0", "2M");
    guest_write(&disk, 0xcc, "41M", "1M");
    let now = guest_view(&disk, None, &dir.path().join("now.raw"));
    assert!(now != at_snapshot, "the guest's later writes changed the disk");

    let mut stream = client
        .copy(CopyRequest { backup_id: "b1".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let done = loop {
        match stream.message().await.unwrap().expect("a result").event {
            Some(copy_event::Event::Done(done)) => break done,
            Some(copy_event::Event::Progress(_)) | None => {}
        }
    };
    let stats = done.stats.unwrap();
    println!("qcow2 copy through the raw export: {stats:?}");
    assert_eq!(stats.size, 64 << 20);
    assert!(
        exports_mounted().is_empty(),
        "the export ended with the copy: {:?}",
        exports_mounted()
    );

    let repo = Repository::open(&repo, &Secret::passphrase("qcow2 words")).unwrap();
    let id: ManifestId = done.volumes[0].manifest_id.parse().unwrap();
    let Manifest::Volume(m) = repo.load_manifest(id).unwrap() else { panic!("not a volume") };
    assert_eq!(m.meta.volume, "web.qcow2");
    let restored = dir.path().join("restored.raw");
    repo.restore_volume(id, &restored, false).unwrap();
    let restored = std::fs::read(&restored).unwrap();
    assert!(restored == at_snapshot, "the restore differs from what the guest saw at the snapshot");
    let reference = guest_view(&disk, Some("stillpoint-b1"), &dir.path().join("ref.raw"));
    assert!(restored == reference, "the restore differs from qemu-img's view of the snapshot");

    // The export let go of the disk's lock: the cleanup deletes the internal snapshot.
    let cleaned = client.cleanup(CleanupRequest { backup_id: "b1".into() }).await.unwrap();
    assert_eq!(cleaned.into_inner().snapshots_deleted, 1);
    assert!(qcow2_tags(&disk).is_empty(), "{:?}", qcow2_tags(&disk));
    agent.stop().await;
}

/// An agent killed during a copy leaves its export's daemons running, holding the disk's lock;
/// the next delete (or export) ends them, and the snapshot goes.
#[test]
fn qcow2_delete_ends_an_export_a_killed_agent_left() {
    let _one_at_a_time = QCOW2.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let disk = qcow2_disk(&dir.path().join("vm.qcow2"), "8M");
    let provider = built(std::slice::from_ref(&disk), SnapshotConfig::Qcow2(Default::default()));
    provider.create("b1", std::slice::from_ref(&disk)).unwrap();

    // The export of an agent process that is gone, made as `Export::start` makes it.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let export = std::env::temp_dir().join(format!("stillpoint-qcow2-export-{pid}-0"));
    std::fs::create_dir_all(&export).unwrap();
    let file = export.join("vm.qcow2.raw");
    File::create(&file).unwrap();
    let at = |f: &str| export.join(f).display().to_string();
    run(
        "qemu-nbd",
        &[
            "--read-only",
            "--format=qcow2",
            "--fork",
            "--load-snapshot=snapshot.name=stillpoint-b1",
            &format!("--socket={}", at("nbd.sock")),
            &format!("--pid-file={}", at("nbd.pid")),
            &disk,
        ],
    );
    run(
        "qemu-storage-daemon",
        &[
            "--blockdev",
            &format!(
                "driver=nbd,node-name=snap,server.type=unix,server.path={},read-only=on",
                at("nbd.sock")
            ),
            "--export",
            &format!("type=fuse,id=raw,node-name=snap,mountpoint={},writable=off", file.display()),
            "--daemonize",
            &format!("--pidfile={}", at("fuse.pid")),
        ],
    );
    let fuse_pid = std::fs::read_to_string(at("fuse.pid")).unwrap().trim().to_string();
    // While it runs nobody gets the write lock (unless another test's qcow2 call ended it).
    let locked = std::process::Command::new("qemu-img")
        .args(["snapshot", "-c", "x", &disk])
        .output()
        .unwrap();
    assert!(!locked.status.success() || !export.exists(), "the stale export held no lock");

    assert_eq!(provider.delete("b1").unwrap(), 1);
    assert!(qcow2_tags(&disk).is_empty(), "{:?}", qcow2_tags(&disk));
    assert!(!export.exists(), "the stale export's directory is gone");
    // Gone, or a zombie its parent has yet to reap (it holds no file, so no lock).
    let stat = std::fs::read_to_string(format!("/proc/{fuse_pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().chars().next());
    assert!(matches!(state, None | Some(Some('Z' | 'X'))), "its daemon is gone: {stat}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&export.display().to_string()), "{mounts}");
}
