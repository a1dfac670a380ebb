//! The Agent service over loopback mTLS on the mock SAN with exec quiescers: the protocol's
//! happy path, the lease, failures, idempotency and who may call.

use std::path::Path;
use std::time::Duration;

use stillpoint_agent::config::{QuiescerConfig, SnapshotConfig};
use stillpoint_core::san::Array;
use stillpoint_proto::{
    AbortRequest, CleanupRequest, CommitRequest, HoldClass, PrepareRequest, ReleaseRequest,
    StatusRequest,
};

use crate::support::{config, marker_quiescer, wait_for_phase, Agent, Certs};

/// A mock SAN array in `dir` with LUNs `data` and `logs` for `server`.
fn array(dir: &Path, server: &str) -> Array {
    let array = Array::init(&dir.join("array")).unwrap();
    array.create_lun(server, "data", 1 << 20).unwrap();
    array.create_lun(server, "logs", 1 << 20).unwrap();
    array
}

fn mock_san(dir: &Path) -> SnapshotConfig {
    SnapshotConfig::MockSan { array: dir.join("array"), snapshot_delay_ms: 0 }
}

fn prepare(id: &str, lease_ms: u64) -> PrepareRequest {
    PrepareRequest { backup_id: id.into(), lease_ms, ..Default::default() }
}

fn commit(id: &str) -> CommitRequest {
    CommitRequest { backup_id: id.into(), freeze_token: String::new(), ..Default::default() }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_commit_cleanup_on_the_mock_san_runs_the_app_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let array = array(dir.path(), "srv-a");
    let app = marker_quiescer("app", dir.path());
    let agent =
        Agent::start(config(&certs, &["data", "logs"], vec![app], mock_san(dir.path()))).await;
    let mut client = agent.client(&certs, "listener");

    let p = client.prepare(prepare("b1", 10_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    assert_eq!(read(&dir.path().join("app.pre")), "b1 srv-a pre-freeze");
    assert!(!dir.path().join("app.post").exists());
    let frozen = wait_for_phase(&mut client, "b1", "frozen", Duration::from_secs(1)).await;
    assert!(frozen.lease_remaining_ms > 0 && frozen.lease_remaining_ms <= 10_000);

    let c = client.commit(commit("b1")).await.unwrap().into_inner();
    assert!(c.committed, "{c:?}");
    assert_eq!(read(&dir.path().join("app.post")), "b1 srv-a post-thaw");
    let volumes: Vec<_> = c.snapshots.iter().map(|s| s.volume.as_str()).collect();
    assert_eq!(volumes, ["data", "logs"]);
    for s in &c.snapshots {
        assert_eq!(s.provider, "mock-san");
        assert_eq!(s.size_bytes, 1 << 20);
        assert!(Path::new(&s.locator).is_file(), "{}", s.locator);
    }
    assert_eq!(array.snapshots(Some("b1")).unwrap().len(), 2);
    assert!(c.held_ms >= c.snapshot_ms, "{c:?}");
    let snap = wait_for_phase(&mut client, "b1", "snapshotted", Duration::from_secs(1)).await;
    assert_eq!(snap.snapshots, c.snapshots);

    let cleaned = client.cleanup(CleanupRequest { backup_id: "b1".into() }).await.unwrap();
    assert_eq!(cleaned.into_inner().snapshots_deleted, 2);
    assert!(array.snapshots(None).unwrap().is_empty());
    wait_for_phase(&mut client, "b1", "cleaned", Duration::from_secs(1)).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_thaws_and_a_late_commit_is_refused_without_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let array = array(dir.path(), "srv-a");
    let app = marker_quiescer("app", dir.path());
    let agent = Agent::start(config(&certs, &["data"], vec![app], mock_san(dir.path()))).await;
    let mut client = agent.client(&certs, "listener");

    assert!(client.prepare(prepare("b1", 1500)).await.unwrap().into_inner().prepared);
    let expired = wait_for_phase(&mut client, "b1", "thawed-expired", Duration::from_secs(5)).await;
    assert!(expired.detail.contains("lease expired after 1500ms"), "{expired:?}");
    assert_eq!(read(&dir.path().join("app.post")), "b1 srv-a post-thaw");

    let c = client.commit(commit("b1")).await.unwrap().into_inner();
    assert!(!c.committed);
    assert!(c.reason.contains("lease expired"), "{}", c.reason);
    assert!(array.snapshots(None).unwrap().is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_second_quiescer_thaws_the_first_and_names_itself() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let _array = array(dir.path(), "srv-a");
    let first = marker_quiescer("first", dir.path());
    let second = QuiescerConfig::Exec {
        name: "second".into(),
        pre_freeze: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo cannot flush >&2; exit 3".into(),
        ]),
        post_thaw: None,
        timeout_ms: 10_000,
        artifacts_dir: None,
    };
    let agent =
        Agent::start(config(&certs, &["data"], vec![first, second], mock_san(dir.path()))).await;
    let mut client = agent.client(&certs, "listener");

    let p = client.prepare(prepare("b1", 10_000)).await.unwrap().into_inner();
    assert!(!p.prepared);
    assert!(p.reason.contains("second"), "{}", p.reason);
    assert!(
        p.reason.contains("cannot flush") && p.reason.contains("exit status: 3"),
        "{}",
        p.reason
    );
    assert_eq!(read(&dir.path().join("first.post")), "b1 srv-a post-thaw");
    let steps: Vec<_> =
        p.steps.iter().map(|s| (s.name.as_str(), s.action.as_str(), s.ok)).collect();
    assert_eq!(
        steps,
        [("first", "freeze", true), ("second", "freeze", false), ("first", "thaw", true)]
    );
    wait_for_phase(&mut client, "b1", "failed", Duration::from_secs(1)).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_and_operators_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let _array = array(dir.path(), "srv-a");
    let agent = Agent::start(config(&certs, &["data"], vec![], mock_san(dir.path()))).await;
    for who in ["viewer", "operator"] {
        let mut client = agent.client(&certs, who);
        let err = client.status(StatusRequest {}).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{who}: {err:?}");
        let err = client.prepare(prepare("b1", 10_000)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{who}: {err:?}");
        assert!(err.message().contains(who), "{}", err.message());
    }
    let mut listener = agent.client(&certs, "listener");
    assert!(listener.status(StatusRequest {}).await.unwrap().into_inner().backups.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let _array = array(dir.path(), "srv-a");
    let agent = Agent::start(config(&certs, &["data"], vec![], mock_san(dir.path()))).await;
    let mut client = agent.client(&certs, "listener");
    let err = client.prepare(prepare("../x", 10_000)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("backup_id"), "{}", err.message());
    let err = client.prepare(prepare("b1", 999)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "lease_ms must be between 1000 and 60000");
    let err = client.prepare(prepare("b1", 60_001)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_prepare_and_commit_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let array = array(dir.path(), "srv-a");
    let counter = QuiescerConfig::Exec {
        name: "counter".into(),
        pre_freeze: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("echo x >> {}/freezes", dir.path().display()),
        ]),
        post_thaw: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("echo x >> {}/thaws", dir.path().display()),
        ]),
        timeout_ms: 10_000,
        artifacts_dir: None,
    };
    let agent = Agent::start(config(&certs, &["data"], vec![counter], mock_san(dir.path()))).await;
    let mut client = agent.client(&certs, "listener");

    let p1 = client.prepare(prepare("b1", 10_000)).await.unwrap().into_inner();
    let p2 = client.prepare(prepare("b1", 10_000)).await.unwrap().into_inner();
    assert!(p1.prepared);
    assert_eq!(p1, p2);
    let busy = client.prepare(prepare("b2", 10_000)).await.unwrap().into_inner();
    assert!(!busy.prepared && busy.reason.contains("busy with backup b1"), "{busy:?}");
    let c1 = client.commit(commit("b1")).await.unwrap().into_inner();
    let snap = std::fs::metadata(&c1.snapshots[0].locator).unwrap().modified().unwrap();
    let c2 = client.commit(commit("b1")).await.unwrap().into_inner();
    assert!(c1.committed);
    assert_eq!(c1, c2);
    assert_eq!(std::fs::metadata(&c2.snapshots[0].locator).unwrap().modified().unwrap(), snap);
    assert_eq!(read(&dir.path().join("freezes")), "x");
    assert_eq!(read(&dir.path().join("thaws")), "x");
    assert_eq!(array.snapshots(None).unwrap().len(), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_thaws_deletes_snapshots_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let array = array(dir.path(), "srv-a");
    let app = marker_quiescer("app", dir.path());
    let agent =
        Agent::start(config(&certs, &["data", "logs"], vec![app], mock_san(dir.path()))).await;
    let mut client = agent.client(&certs, "listener");
    let abort = |id: &str| AbortRequest { backup_id: id.into(), reason: "test".into() };

    // Abort while frozen: thaws, nothing to delete.
    assert!(client.prepare(prepare("b1", 10_000)).await.unwrap().into_inner().prepared);
    let a = client.abort(abort("b1")).await.unwrap().into_inner();
    assert!(a.thawed);
    assert_eq!(a.snapshots_deleted, 0);
    assert_eq!(read(&dir.path().join("app.post")), "b1 srv-a post-thaw");

    // Abort after commit: deletes the snapshots, then again does nothing.
    assert!(client.prepare(prepare("b2", 10_000)).await.unwrap().into_inner().prepared);
    assert!(client.commit(commit("b2")).await.unwrap().into_inner().committed);
    assert_eq!(array.snapshots(Some("b2")).unwrap().len(), 2);
    let a = client.abort(abort("b2")).await.unwrap().into_inner();
    assert!(!a.thawed);
    assert_eq!(a.snapshots_deleted, 2);
    assert!(array.snapshots(None).unwrap().is_empty());
    let again = client.abort(abort("b2")).await.unwrap().into_inner();
    assert_eq!((again.thawed, again.snapshots_deleted), (false, 0));
    wait_for_phase(&mut client, "b2", "aborted", Duration::from_secs(1)).await;

    // Unknown backup: fine, nothing done.
    let unknown = client.abort(abort("never-seen")).await.unwrap().into_inner();
    assert_eq!((unknown.thawed, unknown.snapshots_deleted), (false, 0));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_thaws_what_is_still_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let _array = array(dir.path(), "srv-a");
    let app = marker_quiescer("app", dir.path());
    let agent = Agent::start(config(&certs, &["data"], vec![app], mock_san(dir.path()))).await;
    let mut client = agent.client(&certs, "listener");
    assert!(client.prepare(prepare("b1", 60_000)).await.unwrap().into_inner().prepared);
    drop(client);
    agent.stop().await;
    assert_eq!(read(&dir.path().join("app.post")), "b1 srv-a post-thaw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_until_release_thaws_only_at_release_which_says_it_was_held() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let array = array(dir.path(), "srv-a");
    let app = marker_quiescer("app", dir.path());
    let agent =
        Agent::start(config(&certs, &["data", "logs"], vec![app], mock_san(dir.path()))).await;
    let mut client = agent.client(&certs, "listener");
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.hold(), HoldClass::HookUnverified, "an exec hook: {status:?}");

    let p = client.prepare(prepare("b1", 10_000)).await.unwrap().into_inner();
    assert!(p.prepared && p.hold() == HoldClass::HookUnverified, "{p:?}");
    let held = CommitRequest { hold_until_release: true, ..commit("b1") };
    let c = client.commit(held).await.unwrap().into_inner();
    assert!(c.committed && c.still_held && c.thaw_ms == 0, "{c:?}");
    assert_eq!(array.snapshots(Some("b1")).unwrap().len(), 2);
    assert!(!dir.path().join("app.post").exists(), "not thawed before release");
    let h = wait_for_phase(&mut client, "b1", "held", Duration::from_secs(1)).await;
    assert!(h.lease_remaining_ms > 0 && h.snapshots.len() == 2, "{h:?}");

    let release = || ReleaseRequest { backup_id: "b1".into() };
    let r = client.release(release()).await.unwrap().into_inner();
    assert!(r.held_until_release && r.reason.is_empty(), "{r:?}");
    assert!(r.held_ms >= c.held_ms, "{r:?} {c:?}");
    assert_eq!(read(&dir.path().join("app.post")), "b1 srv-a post-thaw");
    assert_eq!(client.release(release()).await.unwrap().into_inner(), r, "idempotent");
    wait_for_phase(&mut client, "b1", "snapshotted", Duration::from_secs(1)).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_requiring_more_than_the_agent_holds_is_refused_before_any_hook_runs() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let _array = array(dir.path(), "srv-a");
    let app = marker_quiescer("app", dir.path());
    let agent =
        Agent::start(config(&certs, &["data", "logs"], vec![app], mock_san(dir.path()))).await;
    let mut client = agent.client(&certs, "listener");
    let strict = PrepareRequest {
        require_hold: HoldClass::FilesystemFreeze.into(),
        ..prepare("b1", 10_000)
    };
    let p = client.prepare(strict).await.unwrap().into_inner();
    assert!(!p.prepared && p.hold() == HoldClass::HookUnverified, "{p:?}");
    assert!(p.reason.contains("requires filesystem-freeze"), "{}", p.reason);
    assert!(!dir.path().join("app.pre").exists(), "the hook never ran");
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(status.backups.is_empty(), "nothing frozen or remembered: {status:?}");
    agent.stop().await;
}
