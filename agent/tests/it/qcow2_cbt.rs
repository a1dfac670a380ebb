//! qcow2 change maps through the agent (Prepare, Commit, the saveset Copy on the agent with
//! `base_dir`, Cleanup): a chain of incrementals reads only the guest clusters written since the
//! group's base snapshot and every backup restores byte-identical to qemu's view of its
//! snapshot; a base deleted or made again is not trusted (a full read that says why); a wrong
//! map is caught by the sampling verify.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use stillpoint_agent::config::{SavesetConfig, SnapshotConfig};
use stillpoint_proto::agent_client::AgentClient;
use stillpoint_proto::{
    copy_event, CleanupRequest, CommitRequest, CopyRequest, CopyStats, PrepareRequest,
};
use stillpoint_saveset::{ManifestId, Repository, Secret};
use tonic::transport::Channel;

use crate::providers::{built, guest_view, qcow2_disk, qcow2_tags, QCOW2};
use crate::support::{run, Agent, Certs};

const SIZE: u64 = 64 << 20;
const CLUSTER: u64 = 64 << 10;
const WORDS: &str = "qcow2 cbt words";
const GROUP: &str = "g";
const BASE: &str = "stillpoint.base.g";

/// One disk, one repository, one agent with `base_dir`.
struct Rig {
    dir: PathBuf,
    disk: String,
    repo: PathBuf,
    agent: Agent,
    client: AgentClient<Channel>,
    _certs: Certs,
}

impl Rig {
    async fn start(dir: &Path, sample: f64) -> Rig {
        let disk = qcow2_disk(&dir.join("vm.qcow2"), "64M");
        Rig::start_on(dir, sample, disk).await
    }

    /// The rig on an existing disk.
    async fn start_on(dir: &Path, sample: f64, disk: String) -> Rig {
        let repo = dir.join("repo");
        let certs = Certs::new("srv-q");
        let mut c = crate::support::config(
            &certs,
            &[disk.as_str()],
            Vec::new(),
            SnapshotConfig::Qcow2(Default::default()),
        );
        c.saveset = Some(SavesetConfig {
            base_dir: Some(dir.join("bases")),
            sample,
            ..crate::support::saveset_repo(dir, WORDS)
        });
        let agent = Agent::start(c).await;
        let client = agent.client(&certs, "listener");
        Rig { dir: dir.to_path_buf(), disk, repo, agent, client, _certs: certs }
    }

    /// Guest writes through qemu-io, in one process: `(pattern, offset, len)`, pattern 0 for a
    /// discard.
    fn write(&self, writes: &[(u8, u64, u64)]) {
        if writes.is_empty() {
            return;
        }
        let commands: Vec<String> = writes
            .iter()
            .map(|&(p, off, len)| match p {
                0 => format!("discard {off} {len}"),
                p => format!("write -P {p} {off} {len}"),
            })
            .collect();
        let mut args = vec!["-f", "qcow2"];
        for c in &commands {
            args.extend(["-c", c.as_str()]);
        }
        args.push(&self.disk);
        run("qemu-io", &args);
    }

    /// Prepare and Commit backup `id`.
    async fn snapshot(&mut self, id: &str) {
        let p = self
            .client
            .prepare(PrepareRequest {
                backup_id: id.into(),
                lease_ms: 10_000,
                ..Default::default()
            })
            .await;
        assert!(p.unwrap().into_inner().prepared, "{id}");
        let c = self
            .client
            .commit(CommitRequest { backup_id: id.into(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(c.committed, "{id}: {c:?}");
    }

    /// Copies backup `id` as group g's: its stats and volume manifest.
    async fn copy(&mut self, id: &str) -> (CopyStats, ManifestId) {
        let request = CopyRequest { backup_id: id.into(), group: GROUP.into() };
        let mut stream = self.client.copy(request).await.unwrap().into_inner();
        let done = loop {
            match stream.message().await.unwrap().expect("a result").event {
                Some(copy_event::Event::Done(done)) => break done,
                Some(copy_event::Event::Progress(_)) | None => {}
            }
        };
        (done.stats.unwrap(), done.volumes[0].manifest_id.parse().unwrap())
    }

    async fn cleanup(&mut self, id: &str) {
        let cleaned = self.client.cleanup(CleanupRequest { backup_id: id.into() }).await.unwrap();
        assert_eq!(cleaned.into_inner().snapshots_deleted, 1, "{id}");
    }

    /// Snapshot, copy, check the restore against qemu's view of the snapshot, clean up.
    async fn backup(&mut self, id: &str) -> (CopyStats, ManifestId) {
        self.snapshot(id).await;
        let (stats, manifest) = self.copy(id).await;
        let tag = format!("stillpoint-{id}");
        let reference = guest_view(&self.disk, Some(&tag), &self.dir.join("reference.raw"));
        assert!(self.restore(manifest) == reference, "{id}: the restore differs from {tag}");
        self.cleanup(id).await;
        (stats, manifest)
    }

    fn restore(&self, manifest: ManifestId) -> Vec<u8> {
        let repo = Repository::open(&self.repo, &Secret::passphrase(WORDS)).unwrap();
        let out = self.dir.join("restored.raw");
        let _ = std::fs::remove_file(&out);
        repo.restore_volume(manifest, &out, false).unwrap();
        std::fs::read(&out).unwrap()
    }
}

/// The change map text a set of changed clusters gives: adjacent clusters are one range.
fn map_text(clusters: &BTreeSet<u64>) -> String {
    let mut ranges = 0;
    let mut last = None;
    for &c in clusters {
        if last.is_none_or(|l| l + 1 != c) {
            ranges += 1;
        }
        last = Some(c);
    }
    format!("qcow2: {ranges} ranges, {} bytes", clusters.len() as u64 * CLUSTER)
}

/// A small deterministic generator, so a failing round can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 =
            self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// A full backup, then 30 incrementals each after scattered 4 KiB rewrites of about 1% of the
/// disk's clusters, a clustered run, and now and then a discard or no change at all: each reads
/// exactly the clusters written since the last backup (the map the test expects from its own
/// writes), skips the rest, its sample finds nothing, and it restores byte-identical to
/// `qemu-img convert -l snapshot.name=stillpoint-<id>`; the base is the one snapshot left
/// between backups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_30_qcow2_incrementals_reads_what_changed_and_restores_byte_identical() {
    let _one_at_a_time = QCOW2.lock().await;
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::start(dir.path(), stillpoint_saveset::DEFAULT_SAMPLE_PERCENT).await;
    // Data over the first 48 MiB here and there, and a band at 48-56 MiB the discards take
    // from; 56-64 MiB is never written.
    let mut init: Vec<(u8, u64, u64)> =
        (0..24).map(|i| (0x10 + i as u8, i * (2 << 20), 1 << 20)).collect();
    init.push((0x77, 48 << 20, 8 << 20));
    rig.write(&init);

    let (full, mut last) = rig.backup("b00").await;
    println!("full: {full:?}");
    assert_eq!(full.change_map, "none: no base kept yet");
    assert_eq!(full.bytes_skipped, 0);
    assert_eq!(qcow2_tags(&rig.disk), [BASE], "only the base stays after the cleanup");

    let mut rng = Rng(7);
    let mut discarded = 0;
    for round in 1..=30u64 {
        let mut writes = Vec::new();
        if round != 10 {
            // About 1% of the 1024 clusters, 4 KiB each, anywhere in the first 48 MiB.
            for _ in 0..10 {
                let block = rng.below((48 << 20) / 4096);
                writes.push((0x80 + (round as u8 % 64), block * 4096, 4096));
            }
            // A clustered run of 192-448 KiB.
            let len = (3 + rng.below(5)) * CLUSTER;
            let at = rng.below(((48 << 20) - len) / 4096) * 4096;
            writes.push((0x40 + round as u8, at, len));
        }
        if round % 7 == 3 {
            writes.push((0, (48 << 20) + discarded * CLUSTER, CLUSTER));
            discarded += 1;
        }
        let clusters: BTreeSet<u64> = writes
            .iter()
            .flat_map(|&(_, off, len)| off / CLUSTER..(off + len).div_ceil(CLUSTER))
            .collect();
        rig.write(&writes);
        let id = format!("b{round:02}");
        let (s, manifest) = rig.backup(&id).await;
        last = manifest;
        let expected = clusters.len() as u64 * CLUSTER;
        assert_eq!(s.change_map, map_text(&clusters), "{id}: {s:?}");
        assert_eq!(s.bytes_skipped, SIZE - expected, "{id}: {s:?}");
        assert!(s.bytes_read <= expected, "{id}: read more than changed: {s:?}");
        assert_eq!(s.sample_mismatches, 0, "{id}: {s:?}");
        assert!(s.sampled_chunks > 0, "{id}: the skipped chunks were sampled: {s:?}");
        assert_eq!(qcow2_tags(&rig.disk), [BASE], "{id}");
    }
    // The last backup restores what the guest sees now (nothing wrote since its snapshot).
    let now = guest_view(&rig.disk, None, &dir.path().join("now.raw"));
    assert!(rig.restore(last) == now, "the last restore differs from the disk");
    println!("31 qcow2 backups in {:?}", started.elapsed());
    rig.agent.stop().await;
}

/// A base someone deleted, or deleted and made again under the same name, is not trusted: the
/// next backup reads everything and says why, restores byte-identical, and keeps a new base the
/// backup after uses. A backup whose disk was written after its snapshot keeps no base. The
/// provider's `list` never reports a base as a backup's snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_base_deleted_or_made_again_is_not_trusted() {
    let _one_at_a_time = QCOW2.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::start(dir.path(), stillpoint_saveset::DEFAULT_SAMPLE_PERCENT).await;
    rig.write(&[(0x11, 0, 4 << 20), (0x12, 20 << 20, 1 << 20)]);
    rig.backup("c0").await;
    rig.write(&[(0x13, 1 << 20, 4096)]);
    let (s, _) = rig.backup("c1").await;
    assert_eq!(s.change_map, "qcow2: 1 ranges, 65536 bytes", "{s:?}");
    let provider =
        built(std::slice::from_ref(&rig.disk), SnapshotConfig::Qcow2(Default::default()));
    assert_eq!(provider.list().unwrap(), vec![], "the base is no backup's snapshot");

    // Deleted.
    run("qemu-img", &["snapshot", "-d", BASE, &rig.disk]);
    rig.write(&[(0x14, 2 << 20, 4096)]);
    let (s, _) = rig.backup("c2").await;
    println!("{s:?}");
    assert!(
        s.change_map.starts_with("none: base snapshot in ")
            && s.change_map.contains("no snapshot named stillpoint.base.g"),
        "{s:?}"
    );
    assert_eq!(s.bytes_skipped, 0, "{s:?}");
    let (s, _) = rig.backup("c3").await;
    assert_eq!(s.change_map, "qcow2: 0 ranges, 0 bytes", "the base is kept again: {s:?}");

    // Deleted and made again under its name: another identity.
    run("qemu-img", &["snapshot", "-d", BASE, &rig.disk]);
    run("qemu-img", &["snapshot", "-c", BASE, &rig.disk]);
    let (s, _) = rig.backup("c4").await;
    println!("{s:?}");
    assert!(s.change_map.contains("is not the one kept"), "{s:?}");
    assert_eq!(s.bytes_skipped, 0, "{s:?}");

    // Written after the snapshot, before the copy (the provider's rule broken): the backup holds
    // the snapshot, but no base is kept from the disk's later state.
    rig.snapshot("c5").await;
    rig.write(&[(0x15, 3 << 20, 4096)]);
    let (_, manifest) = rig.copy("c5").await;
    let reference = guest_view(&rig.disk, Some("stillpoint-c5"), &dir.path().join("c5.raw"));
    assert!(rig.restore(manifest) == reference, "c5 restores its snapshot");
    rig.cleanup("c5").await;
    assert!(qcow2_tags(&rig.disk).is_empty(), "no base: {:?}", qcow2_tags(&rig.disk));
    let (s, _) = rig.backup("c6").await;
    assert_eq!(s.change_map, "none: no base kept yet", "{s:?}");
    rig.agent.stop().await;
}

/// A disk with a backing file (its unallocated clusters read from another image) gets no map
/// and no base: every backup reads everything, says why, and restores byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_overlay_is_read_whole_and_says_why() {
    let _one_at_a_time = QCOW2.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let backing = qcow2_disk(&dir.path().join("template.qcow2"), "64M");
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x31 0 8M", &backing]);
    let overlay = dir.path().join("vm.qcow2").display().to_string();
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &backing, &overlay]);
    let mut rig =
        Rig::start_on(dir.path(), stillpoint_saveset::DEFAULT_SAMPLE_PERCENT, overlay).await;
    for (i, id) in ["o0", "o1"].iter().enumerate() {
        rig.write(&[(0x40 + i as u8, (i as u64 + 1) << 20, 4096)]);
        let (s, _) = rig.backup(id).await;
        assert!(
            s.change_map.starts_with("unknown: ") && s.change_map.contains("backing file"),
            "{id}: {s:?}"
        );
        assert_eq!(s.bytes_skipped, 0, "{id}: {s:?}");
        assert!(qcow2_tags(&rig.disk).is_empty(), "{id}: no base: {:?}", qcow2_tags(&rig.disk));
    }
    rig.agent.stop().await;
}

const FAILPOINT_CHILD: &str = "QCOW2_FAILPOINT_CHILD";

/// With `STILLPOINT_FAILPOINT=change-map-drop-range` the qcow2 map loses its largest range; the
/// sampling verify (100% here, so surely) finds the difference, the volume is read whole and
/// restores byte-identical. Run in a child process: the failpoint is the process's environment.
#[test]
fn the_sampling_verify_catches_a_dropped_qcow2_range() {
    let _one_at_a_time = QCOW2.blocking_lock();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "qcow2_cbt::failpoint_child", "--nocapture", "--test-threads=1"])
        .env(FAILPOINT_CHILD, "1")
        .env(stillpoint_saveset::FAILPOINT_ENV, stillpoint_saveset::DROP_RANGE)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("CHILD-CAUGHT"), "the child ran: {text}");
}

/// Not a test on its own: the child of `the_sampling_verify_catches_a_dropped_qcow2_range`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failpoint_child() {
    if std::env::var_os(FAILPOINT_CHILD).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rig = Rig::start(dir.path(), 100.0).await;
    rig.write(&[(0x21, 0, 8 << 20)]);
    rig.backup("f0").await;
    rig.write(&[(0x22, 2 << 20, 2 << 20), (0x23, 30 << 20, 4096)]);
    let (s, _) = rig.backup("f1").await;
    println!("{s:?}");
    assert!(s.sample_mismatches > 0, "{s:?}");
    assert!(s.change_map.starts_with("qcow2: 1 ranges, 65536 bytes (wrong: "), "{s:?}");
    assert!(s.change_map.contains("whole volume read"), "{s:?}");
    println!("CHILD-CAUGHT");
    rig.agent.stop().await;
}
