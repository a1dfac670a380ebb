//! WaitBackup blocks until the backup is snapshotted, finished or settled and returns it at once
//! when it gets there; when its time runs out first, DEADLINE_EXCEEDED carries the backup.

use std::time::{Duration, Instant};

use prost::{Message, Name};
use stillpoint_listener::testing::{Cluster, Spec, Step};
use stillpoint_proto as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{refused, start, state, until, Client};

fn wait(id: &str, until: pb::WaitUntil, timeout_ms: u64) -> pb::WaitBackupRequest {
    pb::WaitBackupRequest { backup_id: id.into(), until: until as i32, timeout_ms }
}

/// The backup a DEADLINE_EXCEEDED carries in its details.
fn carried(status: &tonic::Status) -> pb::Backup {
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "WAIT_TIMED_OUT");
    let rpc = tonic_types::pb::Status::decode(status.details()).expect("google.rpc.Status");
    let any = rpc.details.iter().find(|a| a.type_url == pb::Backup::type_url()).expect("Backup");
    any.to_msg::<pb::Backup>().expect("a Backup")
}

/// Starts WaitBackup in the background; returns how long it blocked and what it returned.
fn waiting(
    client: &Client,
    request: pb::WaitBackupRequest,
) -> tokio::task::JoinHandle<(Duration, Result<pb::Backup, tonic::Status>)> {
    let mut client = client.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let result = client.wait_backup(request).await.map(tonic::Response::into_inner);
        (started.elapsed(), result)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_when_snapshotted_finished_and_settled_or_carries_the_backup_on_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::default();
    spec.timeouts.cleanup_timeout_ms = 300;
    let cluster = Cluster::start(dir.path(), spec).await;
    cluster.agent("srv-a").hold(Step::Commit);
    cluster.agent("srv-a").hold(Step::Cleanup);
    let mut client = cluster.client("hook");
    let id = client.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;
    until(&mut client, &id, |b| state(b) == pb::BackupState::Committing).await;

    let status = client.wait_backup(wait(&id, pb::WaitUntil::Snapshotted, 200)).await.unwrap_err();
    let then = carried(&status);
    assert_eq!((then.backup_id.as_str(), state(&then)), (id.as_str(), pb::BackupState::Committing));

    // Blocked, it returns as soon as the snapshots exist.
    let snapshotted = waiting(&client, wait(&id, pb::WaitUntil::Snapshotted, 20_000));
    let finished = waiting(&client, wait(&id, pb::WaitUntil::Finished, 20_000));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!snapshotted.is_finished(), "the commit is still held");
    cluster.agent("srv-a").release(Step::Commit);
    let (took, result) = snapshotted.await.unwrap();
    let backup = result.expect("snapshotted");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        state(&backup),
        pb::BackupState::Snapshotted,
        "report mode: SNAPSHOTTED until the backup software's first report"
    );

    // Finished once every copy is reported and cleanup is over (srv-a's is given up on after
    // 300 ms); settled only once srv-a's cleanup answers.
    for server in ["srv-a", "srv-b"] {
        let report = pb::ReportCopyRequest {
            backup_id: id.clone(),
            server: server.into(),
            ok: true,
            detail: String::new(),
        };
        client.report_copy(report).await.unwrap();
    }
    let (_, result) = finished.await.unwrap();
    assert_eq!(state(&result.expect("finished")), pb::BackupState::Succeeded);
    let status = client.wait_backup(wait(&id, pb::WaitUntil::Settled, 200)).await.unwrap_err();
    let then = carried(&status);
    assert_eq!(state(&then), pb::BackupState::Succeeded);
    assert_eq!(then.servers[0].phase, "cleaning", "{then:#?}");
    let settled = waiting(&client, wait(&id, pb::WaitUntil::Settled, 20_000));
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.agent("srv-a").release(Step::Cleanup);
    let (_, result) = settled.await.unwrap();
    let backup = result.expect("settled");
    assert!(backup.servers.iter().all(|s| s.phase == "cleaned"), "{backup:#?}");

    // A backup that ends first ends a wait for its snapshots too: the caller gets it, ended.
    cluster.agent("srv-c").hold(Step::Prepare);
    let other = client.start_backup(start("h", "")).await.unwrap().into_inner().backup_id;
    let snapshotted = waiting(&client, wait(&other, pb::WaitUntil::Snapshotted, 20_000));
    let abort = pb::AbortBackupRequest { backup_id: other.clone(), reason: "test".into() };
    client.abort_backup(abort).await.unwrap();
    let (_, result) = snapshotted.await.unwrap();
    assert_eq!(state(&result.expect("ended")), pb::BackupState::Aborted);
    cluster.agent("srv-c").release(Step::Prepare);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ends_before_the_callers_deadline_and_refuses_what_it_cannot_wait_for() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), Spec::default()).await;
    cluster.agent("srv-a").hold(Step::Prepare);
    let mut client = cluster.client("viewer");
    let mut hook = cluster.client("hook");
    let id = hook.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;

    // No timeout of its own: the wait ends inside the call's 1 s deadline, with the backup.
    let mut request = tonic::Request::new(wait(&id, pb::WaitUntil::Finished, 0));
    request.set_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let status = client.wait_backup(request).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(state(&carried(&status)), pb::BackupState::Preparing);

    let unset = wait(&id, pb::WaitUntil::Unspecified, 10);
    let status = refused(client.wait_backup(unset).await, Code::InvalidArgument, "until");
    assert_eq!(status.get_details_bad_request().unwrap().field_violations[0].field, "until");
    let missing = wait("20200101T000000Z-000000", pb::WaitUntil::Finished, 10);
    refused(client.wait_backup(missing).await, Code::NotFound, "unknown backup");
    cluster.agent("srv-a").release(Step::Prepare);
}
