//! Changed-block tracking through the product: the mock SAN (snapshots are reflink clones) with
//! the listener's saveset copy and `base_dir`; backups after the LUN was rewritten in place read
//! only what changed (the copy's log line says so) and restore byte-identical; with the
//! `change-map-drop-range` failpoint in the listener's environment the sampling verify catches
//! the wrong map, the listener logs it, and the backup still restores byte-identical. The same
//! on the agents (`[copy] on = "agent"`, `[saveset] base_dir`): the agent keeps a base per group
//! and volume and its copy report carries the change map to the listener.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::harness::{incompressible, Cluster, Copy, Spec};

const LUN: u64 = 32 << 20;

fn no_quiescer(_: &str, _: &Path) -> String {
    String::new()
}

fn spec(failpoint: bool) -> Spec {
    let mut spec = Spec::three(no_quiescer);
    spec.servers = vec!["srv-a".to_string()];
    spec.lun_bytes = LUN;
    spec.copy = Copy::Saveset { verify: "index" };
    spec.saveset_base_dir = true;
    if failpoint {
        spec.listener_env =
            vec![("STILLPOINT_FAILPOINT".to_string(), "change-map-drop-range".to_string())];
    }
    spec
}

/// Writes `blocks` runs of `run` 4 KiB blocks of fresh bytes in place, spread over the LUN.
fn rewrite(lun: &Path, seed: u64, blocks: u64, run: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(lun).expect("open LUN");
    let span = LUN / 4096 - run;
    for i in 0..blocks {
        let at = (seed * 7919 + i * 104_729) % span * 4096;
        let data = incompressible(seed * 1000 + i, (run * 4096) as usize);
        file.write_all_at(&data, at).expect("write LUN");
    }
    file.sync_all().expect("sync LUN");
}

/// A backup of group g; returns its id and srv-a's copy detail.
fn backup(cluster: &Cluster) -> (String, String) {
    backup_of(cluster, "g")
}

fn backup_of(cluster: &Cluster, group: &str) -> (String, String) {
    let (code, backup) = cluster.backupctl_json(&["start", "--group", group, "--wait", "complete"]);
    let id = backup["backup_id"].as_str().expect("backup_id").to_string();
    assert_eq!(code, 0, "backup {id}: {backup:#}\n{}", cluster.listener_log());
    let detail = backup["servers"][0]["detail"].as_str().unwrap_or_default().to_string();
    (id, detail)
}

/// `N bytes read` from a copy's detail.
fn bytes_read(detail: &str) -> u64 {
    let (before, _) = detail.split_once(" bytes read").expect("bytes read in the detail");
    before.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("a number")
}

/// Fills the whole LUN with incompressible bytes drawn from `seed`.
fn fill(lun: &Path, seed: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(lun)
        .and_then(|f| f.write_all_at(&incompressible(seed, LUN as usize), 0))
        .expect("fill LUN");
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read") == std::fs::read(b).expect("read")
}

/// The chain on the mock SAN: a full backup, then 30 incrementals, each after 416 KiB of
/// the 32 MiB LUN was rewritten in place (40 scattered blocks and 4 runs of 16). Each reads only
/// what changed (the change map's ranges and the sample), and each restores byte-identical to the
/// LUN as it was snapshotted (nothing writes it between the rewrite and the backup). At the end the
/// full and a backup from the middle of the chain are restored again, byte-identical to copies
/// kept when they were taken: the backups after them did not disturb what they reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_30_mock_san_incrementals_reads_only_what_changed_and_every_backup_restores() {
    const ROUNDS: u64 = 30;
    let cluster = Cluster::start(spec(false)).await;
    let lun = cluster.array.lun_path("srv-a", "data").expect("lun");
    let restored = tempfile::tempdir().expect("restore dir");
    // Restores backup `id` into its own directory and checks it holds `taken`, bit for bit.
    let restores_as = |id: &str, dir: &str, taken: &[u8]| {
        let files = cluster.restore_from_saveset(id, &restored.path().join(dir));
        assert_eq!(files.len(), 1, "{dir}: one volume");
        let got = std::fs::read(&files[0]).expect("read the restored image");
        assert!(got == taken, "{dir}: backup {id} restores as the LUN was when it was taken");
        std::fs::remove_file(&files[0]).expect("remove the restored image");
    };
    fill(&lun, 1);
    let (full, first) = backup(&cluster);
    assert!(first.contains("change map none: no base kept yet"), "{first}");
    assert!(bytes_read(&first) >= LUN, "{first}");
    // Nothing writes the LUN between a backup's snapshot and this read: it is what was taken.
    let full_bytes = std::fs::read(&lun).expect("read LUN");
    restores_as(&full, "full", &full_bytes);
    let (mut middle, mut middle_bytes) = (String::new(), Vec::new());
    for round in 1..=ROUNDS {
        rewrite(&lun, round, 40, 1);
        rewrite(&lun, round + 100, 4, 16);
        let (id, detail) = backup(&cluster);
        assert!(detail.contains("change map fiemap: "), "round {round}: {detail}");
        assert!(detail.contains(", 0 differed"), "round {round}: {detail}");
        // The 104 rewritten blocks (fewer where runs overlap) and the sample's 64 chunks.
        let read = bytes_read(&detail);
        assert!(read > 0 && read <= 104 * 4096 + 64 * 4096, "round {round}: {detail}");
        let taken = std::fs::read(&lun).expect("read LUN");
        restores_as(&id, &round.to_string(), &taken);
        if round == ROUNDS / 2 {
            (middle, middle_bytes) = (id, taken);
        }
    }
    let log = cluster.listener_log();
    assert!(log.contains("volume copied") && log.contains("change_map=fiemap"), "{log}");
    // Again after the whole chain: the backups after them did not disturb what they reference.
    restores_as(&full, "full-again", &full_bytes);
    restores_as(&middle, "middle-again", &middle_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_range_is_caught_by_the_sampling_verify_and_the_backup_still_restores() {
    let cluster = Cluster::start(spec(true)).await;
    let lun = cluster.array.lun_path("srv-a", "data").expect("lun");
    fill(&lun, 2);
    backup(&cluster);
    // One run of 8 MiB (a quarter of the LUN, the largest range: the one dropped), so the
    // default sample (at least 64 of the ~6000 skipped chunks) misses it with probability
    // below (3/4)^64 ≈ 1e-8; and a few scattered blocks.
    rewrite(&lun, 5, 1, 2048);
    rewrite(&lun, 6, 20, 1);
    let (id, detail) = backup(&cluster);
    assert!(detail.contains("sampled chunks differ; whole volume read"), "{detail}");
    let log = cluster.listener_log();
    assert!(log.contains("failpoint: dropped the largest changed range"), "{log}");
    assert!(log.contains("change map wrong: "), "{log}");
    let restored = tempfile::tempdir().expect("restore dir");
    let files = cluster.restore_from_saveset(&id, restored.path());
    assert!(same_bytes(&files[0], &lun), "the backup restores byte-identical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_copier_reads_only_what_changed_keeping_a_base_per_group() {
    let mut spec = spec(false);
    spec.copy = Copy::SavesetOnAgent { verify: "index", agent: |_| Some(0) };
    spec.listener_extra = "[[group]]\nname = \"h\"\nservers = [\"srv-a\"]\n".to_string();
    let cluster = Cluster::start(spec).await;
    let lun = cluster.array.lun_path("srv-a", "data").expect("lun");
    fill(&lun, 3);
    let (_, first) = backup(&cluster);
    assert!(first.contains("change map none: no base kept yet"), "{first}");
    rewrite(&lun, 7, 40, 1);
    let (_, second) = backup(&cluster);
    assert!(second.contains("change map fiemap: "), "{second}");
    assert!(second.contains(", 0 differed"), "{second}");
    let read = bytes_read(&second);
    assert!(read > 0 && read <= 40 * 4096 + 64 * 4096, "{second}");
    // Group h has no base of its own yet: it reads the whole volume, then keeps one.
    let (_, other) = backup_of(&cluster, "h");
    assert!(other.contains("change map none: no base kept yet"), "{other}");
    assert!(bytes_read(&other) >= LUN, "{other}");
    rewrite(&lun, 8, 20, 1);
    let (last, third) = backup(&cluster);
    assert!(third.contains("change map fiemap: "), "{third}");
    assert!(bytes_read(&third) <= 60 * 4096 + 64 * 4096, "{third}");
    let restored = tempfile::tempdir().expect("restore dir");
    let files = cluster.restore_from_saveset(&last, restored.path());
    assert!(same_bytes(&files[0], &lun), "the last backup restores byte-identical");
}
