//! The backup software reports its copies' progress, which also shows it is alive: a copy it
//! says nothing about for `timeouts.report_silence_ms` fails the backup, naming the server and
//! the silence, long before the six-hour copy timeout.

use std::time::Duration;

use stillpoint_listener::testing::{Cluster, Spec};
use stillpoint_proto as pb;
use tonic::Code;

use crate::{refused, start, state, until};

fn progress(id: &str, server: &str, done: u64, total: u64) -> pb::ReportCopyProgressRequest {
    pb::ReportCopyProgressRequest {
        backup_id: id.into(),
        server: server.into(),
        done_bytes: done,
        total_bytes: total,
    }
}

fn spec() -> Spec {
    let mut spec = Spec::default();
    spec.timeouts.report_silence_ms = 1_500;
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_the_backup_software_goes_silent_on_fails_naming_server_and_silence() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), spec()).await;
    let mut hook = cluster.client("hook");
    let id = hook.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;
    // The copy is requested: the backup waits, SNAPSHOTTED, for the backup software's first word.
    until(&mut hook, &id, |b| state(b) == pb::BackupState::Snapshotted).await;

    let backup = hook.report_copy_progress(progress(&id, "srv-a", 512, 1024)).await.unwrap();
    let a = &backup.into_inner().servers[0];
    assert_eq!((a.server.as_str(), a.copied_bytes, a.total_bytes), ("srv-a", 512, 1024));
    refused(
        hook.report_copy_progress(progress(&id, "srv-a", 2048, 1024)).await,
        Code::InvalidArgument,
        "done_bytes",
    );

    // srv-a's copy keeps saying it is alive; srv-b's says nothing.
    let failed = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reply = hook.report_copy_progress(progress(&id, "srv-a", 0, 0)).await;
        match reply {
            Ok(b) if state(b.get_ref()) == pb::BackupState::Copying => continue,
            Ok(b) => break b.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                let get = pb::GetBackupRequest { backup_id: id.clone() };
                break hook.get_backup(get).await.unwrap().into_inner();
            }
        }
    };
    assert_eq!(state(&failed), pb::BackupState::Failed, "{failed:#?}");
    assert_eq!(failed.failed_phase, "COPYING");
    assert!(failed.reason.starts_with("copy of srv-b (last heard "), "{}", failed.reason);
    assert!(failed.reason.contains("reported nothing (no progress, no heartbeat) for 1500ms"));
    assert!(!failed.reason.contains("srv-a"), "{}", failed.reason);
    refused(
        hook.report_copy_progress(progress(&id, "srv-b", 1, 2)).await,
        Code::FailedPrecondition,
        "not copying",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_long_copy_alive_and_a_late_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), spec()).await;
    let mut hook = cluster.client("hook");
    let id = hook.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;
    // The copy is requested: the backup waits, SNAPSHOTTED, for the backup software's first word.
    until(&mut hook, &id, |b| state(b) == pb::BackupState::Snapshotted).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for server in ["srv-a", "srv-b"] {
            let b = hook.report_copy_progress(progress(&id, server, 0, 0)).await.unwrap();
            assert_eq!(
                state(b.get_ref()),
                pb::BackupState::Copying,
                "alive past the silence limit"
            );
        }
    }
    for server in ["srv-a", "srv-b"] {
        let report = pb::ReportCopyRequest {
            backup_id: id.clone(),
            server: server.into(),
            ok: true,
            detail: String::new(),
        };
        hook.report_copy(report).await.unwrap();
    }
    let done = until(&mut hook, &id, |b| state(b) == pb::BackupState::Succeeded).await;
    let late = hook.report_copy_progress(progress(&id, "srv-a", 0, 0)).await.unwrap().into_inner();
    assert_eq!(late, done);
}
