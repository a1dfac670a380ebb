//! The saveset copier running on the agents (`[copy] mode = "saveset"`, `on = "agent"`): each
//! agent copies its own snapshots into the shared repository, the listener relays progress and
//! writes the backup manifest; and an agent without `[saveset]` fails the copy clearly. The
//! SIGKILL-during-copy case is in the fault suite (`faults.rs`).

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use stillpoint_proto as pb;

use crate::harness::{incompressible, wait_for, Cluster, Copy, Spec};

/// Bytes of pseudo-random data written at the start of every LUN (the rest stays a hole),
/// different on each server.
const DATA: usize = 6 << 20;

fn no_quiescers(_: &str, _: &std::path::Path) -> String {
    String::new()
}

/// Writes distinct data into every server's `data` LUN; returns each LUN's whole content.
fn write_luns(cluster: &Cluster) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    for (i, server) in cluster.spec.servers.iter().enumerate() {
        let lun = cluster.array.lun_path(server, "data").expect("lun");
        let file = std::fs::OpenOptions::new().write(true).open(&lun).expect("open LUN");
        file.write_all_at(&incompressible(0x5EED + i as u64, DATA), 0).expect("write LUN");
        file.sync_all().expect("sync LUN");
        out.insert(server.clone(), std::fs::read(&lun).expect("read LUN"));
    }
    out
}

/// Starts a backup of `g` and follows its WatchBackup stream to the end.
async fn start_and_watch(cluster: &Cluster) -> (String, Vec<pb::WatchEvent>) {
    let mut client =
        pb::listener_client::ListenerClient::new(cluster.channel_to_listener("operator"));
    let backup = client
        .start_backup(pb::StartBackupRequest { group: "g".into(), ..Default::default() })
        .await
        .expect("start backup")
        .into_inner();
    let id = backup.backup_id;
    let mut stream = client
        .watch_backup(pb::WatchBackupRequest { backup_id: id.clone(), ..Default::default() })
        .await
        .expect("watch backup")
        .into_inner();
    let mut events = Vec::new();
    let watched = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = stream.message().await.expect("watch stream") {
            events.push(event);
        }
    })
    .await;
    assert!(watched.is_ok(), "backup {id} did not end in 60s:\n{}", cluster.listener_log());
    (id, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saveset_copy_on_the_agents_restores_every_volume_bit_for_bit() {
    let mut spec = Spec::three(no_quiescers);
    // A pause per MiB makes each copy last long enough to report progress on the way.
    spec.copy = Copy::SavesetOnAgent { verify: "read-data", agent: |_| Some(60) };
    let cluster = Cluster::start(spec).await;
    let luns = write_luns(&cluster);

    let (id, events) = start_and_watch(&cluster).await;
    let last = events.iter().rev().find_map(|e| e.backup.clone()).expect("a backup in the events");
    assert_eq!(
        last.state(),
        pb::BackupState::Succeeded,
        "backup {id}: {last:#?}\nlistener log:\n{}",
        cluster.listener_log()
    );

    // Every server's progress came through the events, on the way and at the end, with the
    // LUN's size as the total (the same shapes as the listener's own copy).
    let lun_bytes = cluster.spec.lun_bytes;
    for server in &cluster.spec.servers {
        let seen: Vec<(u64, u64)> = events
            .iter()
            .filter_map(|e| e.backup.as_ref())
            .filter(|b| b.state() == pb::BackupState::Copying)
            .flat_map(|b| b.servers.iter().filter(|s| s.server == *server))
            .map(|s| (s.copied_bytes, s.total_bytes))
            .collect();
        assert!(seen.contains(&(lun_bytes, lun_bytes)), "{server}: progress {seen:?}");
        assert!(
            seen.iter().any(|&(done, total)| total == lun_bytes && done > 0 && done < total),
            "{server}: no progress on the way: {seen:?}"
        );
        let s = last.servers.iter().find(|s| s.server == *server).expect("server in backup");
        assert!(s.detail.contains("saveset: data manifest "), "{server}: {}", s.detail);
    }
    let log: Vec<&str> =
        events.iter().filter_map(|e| e.entry.as_ref()).map(|e| e.message.as_str()).collect();
    for expected in ["backup manifest ", "verify (read-data) ok", "cleaned up"] {
        assert!(log.iter().any(|m| m.contains(expected)), "log lacks {expected:?}: {log:#?}");
    }

    // Each volume restores from the repository exactly as the LUN was when it was snapshotted.
    let restores = tempfile::tempdir().expect("restore dir");
    let files = cluster.restore_from_saveset(&id, restores.path());
    assert_eq!(files.len(), 3);
    for server in &cluster.spec.servers {
        let restored = std::fs::read(restores.path().join(format!("{server}-data.img")))
            .expect("read restored volume");
        assert_eq!(restored.len(), luns[server].len(), "{server}: size");
        assert!(restored == luns[server], "{server}: the restored volume differs from its LUN");
    }
    assert!(cluster.array.snapshots(Some(&id)).expect("snapshots").is_empty(), "cleaned up");
    for agent in &cluster.agents {
        let log = agent.proc.log_text();
        assert!(log.contains("copy done"), "{}: the copy did not run there:\n{log}", agent.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_saveset_fails_the_copy_saying_so() {
    let mut spec = Spec::three(no_quiescers);
    spec.copy =
        Copy::SavesetOnAgent { verify: "index", agent: |server| (server != "srv-b").then_some(0) };
    let cluster = Cluster::start(spec).await;
    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    assert_eq!(code, 1, "{backup:#}");
    assert_eq!(backup["state"], "FAILED", "{backup:#}");
    assert_eq!(backup["failed_phase"], "COPYING", "{backup:#}");
    let reason = backup["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("srv-b")
            && reason.contains("this agent has no [saveset] repository configured"),
        "{reason}"
    );
    // The failure aborted every server: no snapshot is left.
    wait_for("no snapshot left in the array", Duration::from_secs(20), || {
        cluster.array.snapshots(None).expect("snapshots").is_empty().then_some(())
    })
    .await;
}
