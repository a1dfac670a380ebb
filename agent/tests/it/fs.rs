//! Real filesystems on loop devices: fsfreeze on XFS inside a mock SAN LUN (writes wait for the
//! thaw, the snapshot holds exactly what came before the freeze) and btrfs subvolume snapshots.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stillpoint_agent::config::{QuiescerConfig, SnapshotConfig};
use stillpoint_core::san::Array;
use stillpoint_proto::{CleanupRequest, CommitRequest, PrepareRequest};

use crate::support::{config, run, sparse_image, write_synced, Agent, Certs, LoopMount};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsfreeze_on_xfs_in_a_mock_san_lun_holds_writes_until_commit() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-x");
    let array = Array::init(&dir.path().join("array")).unwrap();
    let lun = array.create_lun("srv-x", "data", 320 << 20).unwrap();
    run("mkfs.xfs", &["-q", "-f", lun.path.to_str().unwrap()]);
    let live = LoopMount::new(&lun.path, &dir.path().join("live"), false, "rw");
    write_synced(&live.mount, "before", "written before the freeze");

    let quiescers = vec![QuiescerConfig::Fsfreeze { mount: live.mount.clone() }];
    let snapshot =
        SnapshotConfig::MockSan { array: array.root().to_path_buf(), snapshot_delay_ms: 0 };
    let agent = Agent::start(config(&certs, &["data"], quiescers, snapshot)).await;
    let mut client = agent.client(&certs, "listener");

    let p = client
        .prepare(PrepareRequest { backup_id: "b1".into(), lease_ms: 30_000, ..Default::default() })
        .await;
    let p = p.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    assert_eq!(p.steps[0].name, format!("fsfreeze {}", live.mount.display()));

    // A write while frozen must wait for the thaw.
    let (tx, rx) = mpsc::channel();
    let mount = live.mount.clone();
    let writer = std::thread::spawn(move || {
        write_synced(&mount, "during", "written while frozen");
        let _ = tx.send(Instant::now());
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "a write completed while the filesystem was frozen"
    );
    let c = client
        .commit(CommitRequest {
            backup_id: "b1".into(),
            freeze_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.committed, "{c:?}");
    rx.recv_timeout(Duration::from_secs(10)).expect("the write completes after the thaw");
    writer.join().unwrap();
    assert!(c.held_ms >= 500, "held {}ms, but the writer waited 500ms", c.held_ms);
    write_synced(&live.mount, "after", "written after the thaw");

    let snap = Path::new(&c.snapshots[0].locator);
    let copy = LoopMount::new(snap, &dir.path().join("snap"), true, "ro,norecovery,nouuid");
    assert_eq!(
        std::fs::read_to_string(copy.mount.join("before")).unwrap(),
        "written before the freeze"
    );
    assert!(!copy.mount.join("during").exists(), "a write held by the freeze is in the snapshot");
    assert!(!copy.mount.join("after").exists(), "a write after the thaw is in the snapshot");
    drop(copy);
    agent.stop().await;
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsfreeze_of_a_filesystem_someone_else_froze_is_refused_and_left_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-y");
    let array = Array::init(&dir.path().join("array")).unwrap();
    let lun = array.create_lun("srv-y", "data", 320 << 20).unwrap();
    run("mkfs.xfs", &["-q", "-f", lun.path.to_str().unwrap()]);
    let live = LoopMount::new(&lun.path, &dir.path().join("live"), false, "rw");
    run("fsfreeze", &["--freeze", live.mount.to_str().unwrap()]);

    let quiescers = vec![QuiescerConfig::Fsfreeze { mount: live.mount.clone() }];
    let snapshot =
        SnapshotConfig::MockSan { array: array.root().to_path_buf(), snapshot_delay_ms: 0 };
    let agent = Agent::start(config(&certs, &["data"], quiescers, snapshot)).await;
    let mut client = agent.client(&certs, "listener");
    let p = client
        .prepare(PrepareRequest { backup_id: "b1".into(), lease_ms: 30_000, ..Default::default() })
        .await;
    let p = p.unwrap().into_inner();
    assert!(!p.prepared);
    let expected = format!(
        "freeze {}: already frozen by another process; stillpoint did not touch it",
        live.mount.display()
    );
    assert!(p.reason.contains(&expected), "{}", p.reason);
    agent.stop().await;
    // Still frozen: thawing it now succeeds (EINVAL would mean someone thawed it).
    run("fsfreeze", &["--unfreeze", live.mount.to_str().unwrap()]);
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_snapshot_holds_what_came_before_and_cleanup_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-b");
    let image = dir.path().join("btrfs.img");
    sparse_image(&image, 256 << 20);
    run("mkfs.btrfs", &["-q", "-f", image.to_str().unwrap()]);
    let fs = LoopMount::new(&image, &dir.path().join("pool"), false, "rw");
    let data = fs.mount.join("data");
    run("btrfs", &["subvolume", "create", data.to_str().unwrap()]);
    let snapshot_dir = fs.mount.join(".stillpoint");
    std::fs::create_dir(&snapshot_dir).unwrap();
    write_synced(&data, "before", "written before the snapshot");

    let snapshot = SnapshotConfig::Btrfs { snapshot_dir: snapshot_dir.clone() };
    let agent = Agent::start(config(&certs, &[data.to_str().unwrap()], vec![], snapshot)).await;
    let mut client = agent.client(&certs, "listener");
    let p = client
        .prepare(PrepareRequest { backup_id: "b1".into(), lease_ms: 30_000, ..Default::default() })
        .await;
    assert!(p.unwrap().into_inner().prepared);
    let c = client
        .commit(CommitRequest {
            backup_id: "b1".into(),
            freeze_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.committed, "{c:?}");
    write_synced(&data, "after", "written after the snapshot");

    assert_eq!(c.snapshots.len(), 1);
    assert_eq!(c.snapshots[0].provider, "btrfs");
    assert_eq!(c.snapshots[0].volume, "data");
    let snap = Path::new(&c.snapshots[0].locator);
    assert_eq!(snap, snapshot_dir.join("b1").join("data"));
    assert_eq!(
        std::fs::read_to_string(snap.join("before")).unwrap(),
        "written before the snapshot"
    );
    assert!(!snap.join("after").exists());
    let ro = run("btrfs", &["property", "get", "-ts", snap.to_str().unwrap(), "ro"]);
    assert_eq!(ro, "ro=true");

    let cleaned = client.cleanup(CleanupRequest { backup_id: "b1".into() }).await.unwrap();
    assert_eq!(cleaned.into_inner().snapshots_deleted, 1);
    assert!(!snap.exists());
    assert!(!snapshot_dir.join("b1").exists());
    let again = client.cleanup(CleanupRequest { backup_id: "b1".into() }).await.unwrap();
    assert_eq!(again.into_inner().snapshots_deleted, 0);
    agent.stop().await;
    drop(fs);
}
