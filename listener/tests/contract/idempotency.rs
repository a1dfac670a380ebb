//! Retries are safe: a Start with a request id already used returns the backup it made (across
//! a restart too), a repeated copy report or abort returns the backup unchanged, and a
//! contradictory repeat is refused saying what came first.

use stillpoint_listener::testing::{Cluster, Spec, Step};
use stillpoint_proto as pb;
use tonic::Code;

use crate::{refused, start, state, until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_retried_with_its_request_id_returns_the_same_backup_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), Spec::default()).await;
    let mut client = cluster.client("hook");
    let first = client.start_backup(start("g", "req-1")).await.unwrap().into_inner();
    assert_eq!(state(&first), pb::BackupState::Preparing, "returned once Prepare went out");
    let again = client.start_backup(start("g", "req-1")).await.unwrap().into_inner();
    assert_eq!(again.backup_id, first.backup_id);
    assert_eq!(again.started_by, "hook:hook");

    // Without a request id a second start is refused as busy, as before.
    refused(client.start_backup(start("g", "")).await, Code::FailedPrecondition, "in flight");
    // The same request id for another group, or a malformed one, is a client bug.
    refused(client.start_backup(start("h", "req-1")).await, Code::InvalidArgument, "request_id");
    let bad = refused(
        client.start_backup(start("h", "no spaces")).await,
        Code::InvalidArgument,
        "request_id",
    );
    assert!(bad.message().contains("\"no spaces\""), "{}", bad.message());
    let long = "x".repeat(10_000);
    let bad =
        refused(client.start_backup(start("h", &long)).await, Code::InvalidArgument, "request_id");
    assert!(bad.message().len() < 400, "the id is clipped, not echoed whole: {}", bad.message());

    // The mapping is in the catalog: after a restart (which fails the backup if it was still
    // freezing, and lets it go on past its snapshots) the retry still finds the backup and
    // starts nothing.
    cluster.restart_listener().await;
    let mut client = cluster.client("hook");
    let after = client.start_backup(start("g", "req-1")).await.unwrap().into_inner();
    assert_eq!(after.backup_id, first.backup_id);
    let list = client.list_backups(pb::ListBackupsRequest::default()).await.unwrap().into_inner();
    assert_eq!(list.backups.len(), 1, "{list:#?}");
    // Once it ended, another request id starts another backup.
    let abort = pb::AbortBackupRequest { backup_id: first.backup_id.clone(), reason: "t".into() };
    let _ = client.abort_backup(abort).await;
    let other = client.start_backup(start("g", "req-2")).await.unwrap().into_inner();
    assert_ne!(other.backup_id, first.backup_id);
}

fn report(id: &str, server: &str, ok: bool) -> pb::ReportCopyRequest {
    pb::ReportCopyRequest {
        backup_id: id.into(),
        server: server.into(),
        ok,
        detail: if ok { "tape 7".into() } else { "tape jammed".into() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_copy_reports_and_aborts_change_nothing_and_contradictions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), Spec::default()).await;
    // srv-a's cleanup waits, so nothing moves between a report and its repeat.
    cluster.agent("srv-a").hold(Step::Cleanup);
    let mut hook = cluster.client("hook");
    let id = hook.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;
    // Report mode: SNAPSHOTTED until the backup software's first report.
    until(&mut hook, &id, |b| state(b) == pb::BackupState::Snapshotted).await;

    let first = hook.report_copy(report(&id, "srv-a", true)).await.unwrap().into_inner();
    assert_eq!(first.servers[0].phase, "cleaning", "{first:#?}");
    let repeat = hook.report_copy(report(&id, "srv-a", true)).await.unwrap().into_inner();
    assert_eq!(repeat, first, "a repeat changes nothing");
    refused(
        hook.report_copy(report(&id, "srv-a", false)).await,
        Code::FailedPrecondition,
        "already reported copied by hook:hook",
    );
    refused(hook.report_copy(report(&id, "srv-z", true)).await, Code::NotFound, "srv-a, srv-b");

    // srv-b's copy failed: the backup fails; the same report again is fine, its opposite not,
    // and srv-a's report stays what it was.
    let failed = hook.report_copy(report(&id, "srv-b", false)).await.unwrap().into_inner();
    assert_eq!(state(&failed), pb::BackupState::Failed, "{failed:#?}");
    let repeat = hook.report_copy(report(&id, "srv-b", false)).await.unwrap().into_inner();
    assert_eq!(state(&repeat), pb::BackupState::Failed);
    refused(
        hook.report_copy(report(&id, "srv-b", true)).await,
        Code::FailedPrecondition,
        "already reported failed",
    );
    hook.report_copy(report(&id, "srv-a", true)).await.unwrap();

    // An abort of a backup that ended otherwise did not happen; of an aborted one, it did.
    let abort = |id: &str| pb::AbortBackupRequest { backup_id: id.into(), reason: "test".into() };
    refused(hook.abort_backup(abort(&id)).await, Code::FailedPrecondition, "already ended FAILED");
    let id = hook.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;
    let aborted = hook.abort_backup(abort(&id)).await.unwrap().into_inner();
    assert_eq!(state(&aborted), pb::BackupState::Aborted);
    // Once the agents confirmed (they answer on their own time), a repeat changes nothing.
    let aborted = until(&mut hook, &id, |b| b.servers.iter().all(|s| s.phase == "aborted")).await;
    let again = hook.abort_backup(abort(&id)).await.unwrap().into_inner();
    // The outcome is what stays the same; the servers' steps go on from aborting to aborted as
    // their agents answer, between the two calls or not.
    let outcome = |b: &pb::Backup| (b.state, b.reason.clone(), b.finished_unix_ms);
    assert_eq!(outcome(&again), outcome(&aborted));
}
