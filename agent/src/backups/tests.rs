//! The safety rules of the backups table, each a named test, driven through the fakes.

use std::time::Duration;

use super::*;
use crate::guardian::link::Program;
use crate::journal::Journal;
use crate::testing::{Calls, FakeProvider, FakeQuiescer};

struct Fixture {
    backups: Backups,
    calls: Calls,
    quiescers: Vec<Arc<FakeQuiescer>>,
    provider: Arc<FakeProvider>,
    state: tempfile::TempDir,
}

/// A table over fake quiescers `q0..qn` (in that order) and a fake provider of two volumes.
fn check(n: usize) -> Fixture {
    let calls = Calls::default();
    let quiescers: Vec<_> = (0..n).map(|i| FakeQuiescer::new(&format!("q{i}"), &calls)).collect();
    let provider = FakeProvider::new(&calls);
    let dyn_q = quiescers.iter().map(|q| q.clone() as Arc<dyn Quiescer>).collect();
    let state = tempfile::tempdir().unwrap();
    let armed = thread_armed(state.path());
    let volumes = vec!["data".into(), "logs".into()];
    let backups = Backups::new("srv-a", volumes, dyn_q, provider.clone(), armed);
    Fixture { backups, calls, quiescers, provider, state }
}

/// A guardian on a thread of this process and a journal in `dir`.
fn thread_armed(dir: &std::path::Path) -> Armed {
    Armed::start(Program::Thread, Journal::new(&dir.join("srv-a.journal.json")), None)
}

impl Fixture {
    fn phase(&self, id: &str) -> String {
        self.backups
            .status()
            .into_iter()
            .find(|b| b.backup.as_str() == id)
            .map(|b| b.phase.as_str().to_string())
            .unwrap_or_else(|| "absent".into())
    }
}

const LEASE: u64 = 10_000;

fn id(s: &str) -> BackupId {
    BackupId::parse(s).unwrap()
}

fn tok(s: &str) -> FreezeToken {
    FreezeToken::parse(s).unwrap()
}

#[tokio::test]
async fn prepare_freezes_in_order_and_commit_snapshots_then_thaws_in_reverse() {
    let f = check(3);
    let p = f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    assert!(p.prepared, "{p:?}");
    assert_eq!(f.phase("b1"), "frozen");
    let c = f.backups.commit(&id("b1"), None, false).await.unwrap();
    assert!(c.committed, "{c:?}");
    assert_eq!(c.snapshots.len(), 2);
    assert_eq!(
        f.calls.all(),
        [
            "freeze q0 b1",
            "freeze q1 b1",
            "freeze q2 b1",
            "create b1",
            "thaw q2 b1",
            "thaw q1 b1",
            "thaw q0 b1"
        ]
    );
    let actions: Vec<_> = c.steps.iter().map(|s| format!("{} {}", s.action, s.name)).collect();
    assert_eq!(actions, ["snapshot fake", "thaw q2", "thaw q1", "thaw q0"]);
    assert_eq!(f.phase("b1"), "snapshotted");
}

#[tokio::test]
async fn duplicate_prepare_returns_the_same_reply_without_a_second_freeze() {
    let f = check(2);
    let first = f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    let second = f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    assert!(first.prepared);
    assert_eq!(first, second);
    assert_eq!(f.calls.starting("freeze").len(), 2);
}

#[tokio::test]
async fn prepare_of_another_backup_while_one_is_frozen_is_refused_as_busy() {
    let f = check(1);
    assert!(f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap().prepared);
    let other = f.backups.prepare(&id("b2"), LEASE, Hold::StorageOnly).await.unwrap();
    assert!(!other.prepared);
    assert!(other.reason.contains("busy with backup b1"), "{}", other.reason);
    assert_eq!(f.calls.starting("freeze"), ["freeze q0 b1"]);
}

#[tokio::test]
async fn prepare_of_another_backup_while_one_is_preparing_is_refused_as_busy() {
    let f = check(1);
    f.quiescers[0].freeze_delay(Duration::from_millis(200));
    let slow = tokio::spawn({
        let b = f.backups.clone();
        async move { b.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(f.phase("b1"), "preparing");
    let other = f.backups.prepare(&id("b2"), LEASE, Hold::StorageOnly).await.unwrap();
    assert!(other.reason.contains("busy with backup b1"), "{}", other.reason);
    assert!(slow.await.unwrap().prepared);
}

#[tokio::test]
async fn failing_quiescer_thaws_the_earlier_ones_in_reverse_and_fails_the_backup() {
    let f = check(3);
    f.quiescers[2].fail_freeze(Some("database said no"));
    let p = f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    assert!(!p.prepared);
    assert!(p.reason.contains("q2") && p.reason.contains("database said no"), "{}", p.reason);
    assert_eq!(
        f.calls.all(),
        ["freeze q0 b1", "freeze q1 b1", "freeze q2 b1", "thaw q1 b1", "thaw q0 b1"]
    );
    assert_eq!(f.phase("b1"), "failed");
    assert!(!p.steps[2].ok && p.steps[2].detail.contains("database said no"));
    // Idempotent: the same failure again, nothing run twice.
    assert_eq!(f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap(), p);
    assert_eq!(f.calls.all().len(), 5);
    // A failed backup does not block the next one.
    f.quiescers[2].fail_freeze(None);
    assert!(f.backups.prepare(&id("b2"), LEASE, Hold::StorageOnly).await.unwrap().prepared);
}

/// Waits up to 10 s for `backup` to reach `phase`, then asserts it: polled, not slept, since a
/// loaded machine may run a lease timer late.
async fn wait_phase(f: &Fixture, backup: &str, phase: &str) {
    let started = std::time::Instant::now();
    while f.phase(backup) != phase && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.phase(backup), phase);
}

#[tokio::test]
async fn lease_expiry_thaws_in_reverse_and_marks_thawed_expired() {
    let f = check(2);
    assert!(f.backups.prepare(&id("b1"), 1000, Hold::StorageOnly).await.unwrap().prepared);
    let remaining = f.backups.status()[0].lease_remaining_ms;
    assert!(remaining > 0 && remaining <= 1000, "{remaining}");
    wait_phase(&f, "b1", "thawed-expired").await;
    assert_eq!(f.calls.starting("thaw"), ["thaw q1 b1", "thaw q0 b1"]);
    let c = f.backups.commit(&id("b1"), None, false).await.unwrap();
    assert!(!c.committed);
    assert!(c.reason.contains("lease expired after 1000ms"), "{}", c.reason);
    assert!(f.calls.starting("create").is_empty());
    assert!(f.provider.held().is_empty());
}

#[tokio::test]
async fn commit_checks_the_clock_before_the_timer_has_thawed() {
    let f = check(1);
    // A lease a slow journal fsync cannot use up inside the Prepare on a loaded machine.
    assert!(f.backups.prepare(&id("b1"), 1000, Hold::StorageOnly).await.unwrap().prepared);
    // A slow cleanup of another backup holds the operations lock past the lease; the Commit
    // queued before the timer must see the lease ran out by the clock alone.
    f.provider.delete_delay(Duration::from_millis(1600));
    let cleanup = tokio::spawn({
        let b = f.backups.clone();
        async move { b.cleanup(&id("b0")).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let c = f.backups.commit(&id("b1"), None, false).await.unwrap();
    cleanup.await.unwrap();
    assert!(!c.committed);
    assert!(
        c.reason.contains("lease expired after 1000ms; thawed without a snapshot"),
        "{}",
        c.reason
    );
    assert!(f.calls.starting("create").is_empty());
    wait_phase(&f, "b1", "thawed-expired").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.calls.starting("thaw"), ["thaw q0 b1"], "thawed exactly once");
}

#[tokio::test]
async fn prepare_whose_lease_runs_out_while_quiescing_thaws_and_fails() {
    let f = check(2);
    f.quiescers[1].freeze_delay(Duration::from_millis(120));
    let p = f.backups.prepare(&id("b1"), 50, Hold::StorageOnly).await.unwrap();
    assert!(!p.prepared);
    assert!(p.reason.contains("ran out while quiescing"), "{}", p.reason);
    assert_eq!(f.calls.starting("thaw"), ["thaw q1 b1", "thaw q0 b1"]);
    assert_eq!(f.phase("b1"), "failed");
}

#[tokio::test]
async fn commit_reports_held_snapshot_and_thaw_times() {
    let f = check(1);
    f.provider.create_delay(Duration::from_millis(60));
    f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let c = f.backups.commit(&id("b1"), None, false).await.unwrap();
    assert!(c.snapshot_ms >= 60, "{c:?}");
    assert!(c.held_ms >= 90 && c.held_ms >= c.snapshot_ms + c.thaw_ms, "{c:?}");
}

#[tokio::test]
async fn prepare_reports_quiesce_and_freeze_time() {
    let calls = Calls::default();
    let app = FakeQuiescer::new("app", &calls);
    let fs = FakeQuiescer::filesystem("fs", &calls);
    // Far apart, so a loaded machine cannot make the filesystem's 20 ms look like the app's.
    app.freeze_delay(Duration::from_millis(400));
    fs.freeze_delay(Duration::from_millis(20));
    let quiescers: Vec<Arc<dyn Quiescer>> = vec![app, fs];
    let state = tempfile::tempdir().unwrap();
    let backups = Backups::new(
        "srv-a",
        vec!["data".into()],
        quiescers,
        FakeProvider::new(&calls),
        thread_armed(state.path()),
    );
    let p = backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    assert!(p.freeze_ms >= 20 && p.freeze_ms < 400, "only the filesystem's freeze: {p:?}");
    assert!(p.quiesce_ms >= 420, "{p:?}");
    let names: Vec<_> =
        p.steps.iter().map(|s| (s.name.as_str(), s.action.as_str(), s.ok)).collect();
    assert_eq!(names, [("app", "freeze", true), ("fs", "freeze", true)]);
}

#[tokio::test]
async fn duplicate_commit_returns_the_same_snapshots_without_new_ones() {
    let f = check(1);
    f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    let first = f.backups.commit(&id("b1"), None, false).await.unwrap();
    let second = f.backups.commit(&id("b1"), None, false).await.unwrap();
    assert!(first.committed);
    assert_eq!(first, second);
    assert_eq!(f.calls.starting("create").len(), 1);
    assert_eq!(f.calls.starting("thaw").len(), 1);
}

#[tokio::test]
async fn commit_of_an_unknown_backup_is_refused() {
    let f = check(1);
    let c = f.backups.commit(&id("nope"), None, false).await.unwrap();
    assert!(!c.committed);
    assert!(c.reason.contains("unknown backup"), "{}", c.reason);
    assert!(f.calls.all().is_empty());
}

#[tokio::test]
async fn provider_failure_thaws_deletes_partial_snapshots_and_fails() {
    let f = check(2);
    f.provider.fail_create(Some("array offline"));
    f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    let c = f.backups.commit(&id("b1"), None, false).await.unwrap();
    assert!(!c.committed);
    assert!(c.reason.contains("array offline"), "{}", c.reason);
    assert_eq!(f.calls.all()[2..], ["create b1", "thaw q1 b1", "thaw q0 b1", "delete b1"]);
    assert!(f.provider.held().is_empty(), "partial snapshot left: {:?}", f.provider.held());
    assert_eq!(f.phase("b1"), "failed");
    assert_eq!(f.backups.commit(&id("b1"), None, false).await.unwrap(), c);
}

#[tokio::test]
async fn abort_thaws_a_frozen_backup_and_is_idempotent() {
    let f = check(2);
    f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    let a = f.backups.abort(&id("b1"), "operator").await.unwrap();
    assert!(a.thawed);
    assert_eq!(f.calls.starting("thaw"), ["thaw q1 b1", "thaw q0 b1"]);
    assert_eq!(f.phase("b1"), "aborted");
    let again = f.backups.abort(&id("b1"), "operator").await.unwrap();
    assert!(!again.thawed);
    assert_eq!(again.snapshots_deleted, 0);
    assert_eq!(f.calls.starting("thaw").len(), 2);
    let c = f.backups.commit(&id("b1"), None, false).await.unwrap();
    assert!(!c.committed && c.reason.contains("aborted"), "{}", c.reason);
}

#[tokio::test]
async fn abort_deletes_snapshots_of_a_committed_backup() {
    let f = check(1);
    f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    f.backups.commit(&id("b1"), None, false).await.unwrap();
    let a = f.backups.abort(&id("b1"), "copy failed").await.unwrap();
    assert!(!a.thawed);
    assert_eq!(a.snapshots_deleted, 2);
    assert!(f.provider.held().is_empty());
    assert_eq!(f.phase("b1"), "aborted");
}

#[tokio::test]
async fn abort_of_an_unknown_backup_is_ok_and_refuses_a_late_prepare() {
    let f = check(1);
    let a = f.backups.abort(&id("b9"), "listener gave up").await.unwrap();
    assert!(!a.thawed);
    assert_eq!(a.snapshots_deleted, 0);
    let p = f.backups.prepare(&id("b9"), LEASE, Hold::StorageOnly).await.unwrap();
    assert!(!p.prepared && p.reason.contains("aborted"), "{}", p.reason);
    assert!(f.calls.starting("freeze").is_empty());
}

#[tokio::test]
async fn abort_racing_commit_has_exactly_one_outcome() {
    for abort_first in [false, true] {
        let f = check(2);
        f.provider.create_delay(Duration::from_millis(50));
        f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
        let (b1, b2) = (f.backups.clone(), f.backups.clone());
        let commit = tokio::spawn(async move { b1.commit(&id("b1"), None, false).await.unwrap() });
        let abort = tokio::spawn(async move { b2.abort(&id("b1"), "race").await.unwrap() });
        let (c, a) = if abort_first {
            let a = abort.await.unwrap();
            (commit.await.unwrap(), a)
        } else {
            (commit.await.unwrap(), abort.await.unwrap())
        };
        assert_eq!(f.calls.starting("thaw").len(), 2, "each quiescer thawed once");
        assert!(f.provider.held().is_empty(), "nothing left snapshotted");
        assert_eq!(f.phase("b1"), "aborted");
        if c.committed {
            assert_eq!(a.snapshots_deleted, 2);
            assert!(!a.thawed);
        } else {
            assert!(a.thawed);
            assert!(f.calls.starting("create").is_empty());
        }
    }
}

#[tokio::test]
async fn cleanup_deletes_snapshots_and_is_idempotent() {
    let f = check(1);
    f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    f.backups.commit(&id("b1"), None, false).await.unwrap();
    assert_eq!(f.backups.cleanup(&id("b1")).await.unwrap(), 2);
    assert_eq!(f.phase("b1"), "cleaned");
    assert_eq!(f.backups.cleanup(&id("b1")).await.unwrap(), 0);
    assert_eq!(f.phase("b1"), "cleaned");
    assert_eq!(f.backups.cleanup(&id("b-unknown")).await.unwrap(), 0);
}

#[tokio::test]
async fn cleanup_that_cannot_delete_is_an_error_naming_the_backup() {
    let f = check(1);
    f.provider.fail_delete(Some("disk gone"));
    let err = f.backups.cleanup(&id("b1")).await.unwrap_err().to_string();
    assert!(err.contains("b1") && err.contains("disk gone"), "{err}");
}

#[tokio::test]
async fn shutdown_thaws_every_frozen_backup() {
    let f = check(2);
    f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    f.backups.shutdown().await;
    assert_eq!(f.calls.starting("thaw"), ["thaw q1 b1", "thaw q0 b1"]);
    assert_eq!(f.phase("b1"), "failed");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(f.calls.starting("thaw").len(), 2);
}

#[tokio::test]
async fn finished_backups_are_remembered_up_to_a_bound() {
    let f = check(1);
    for i in 0..KEEP_FINISHED + 20 {
        f.backups.abort(&id(&format!("b{i}")), "test").await.unwrap();
    }
    let status = f.backups.status();
    assert_eq!(status.len(), KEEP_FINISHED);
    assert_eq!(status[0].backup.as_str(), "b20");
}

#[tokio::test]
async fn status_reports_snapshots_of_backups_the_table_does_not_know_as_orphans() {
    let f = check(1);
    f.provider.create("from-before-restart", &["data".into()]).unwrap();
    assert!(f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap().prepared);
    assert!(f.backups.commit(&id("b1"), None, false).await.unwrap().committed);
    let report = f.backups.report().await;
    let phases: Vec<_> = report.iter().map(|b| (b.backup.as_str(), b.phase.as_str())).collect();
    assert_eq!(phases, [("b1", "snapshotted"), ("from-before-restart", "orphan")]);
    assert_eq!(report[1].snapshots.len(), 1);
    let a = f.backups.abort(&id("from-before-restart"), "orphan").await.unwrap();
    assert_eq!(a.snapshots_deleted, 1);
    assert!(f.backups.report().await.iter().all(|b| b.phase != Phase::Orphan));
}

#[tokio::test]
async fn a_thaw_action_runs_once_when_the_agent_and_the_guardian_reach_the_lease_together() {
    let f = check(1);
    let marker = f.state.path().join("ran");
    f.quiescers[0].set_thaw_action(Some(crate::guardian::Action::Run {
        argv: vec!["/bin/sh".into(), "-c".into(), format!("echo x >> {}", marker.display())],
        env: vec![],
        timeout_ms: 5000,
    }));
    assert!(f.backups.prepare(&id("b1"), 1000, Hold::StorageOnly).await.unwrap().prepared);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(f.phase("b1"), "thawed-expired");
    // Either the guardian ran it (and the agent only recorded the thaw) or the agent took it
    // back first; never both.
    let ran = std::fs::read_to_string(&marker).unwrap_or_default();
    let agent_thawed = f.calls.starting("thaw q0").len();
    assert_eq!(ran.lines().count() + agent_thawed, 1, "ran {ran:?}, agent thawed {agent_thawed}");
}

#[tokio::test]
async fn commit_for_another_freeze_of_the_same_backup_is_refused() {
    let f = check(1);
    let p = f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    assert!(p.prepared && !p.freeze_token.is_empty());
    let again = f.backups.prepare(&id("b1"), LEASE, Hold::StorageOnly).await.unwrap();
    assert_eq!(again.freeze_token, p.freeze_token, "a duplicate prepare names the same freeze");
    let wrong = f.backups.commit(&id("b1"), Some(&tok("an-earlier-freeze")), false).await.unwrap();
    assert!(
        !wrong.committed && wrong.reason.contains("restarted since that prepare"),
        "{}",
        wrong.reason
    );
    assert!(f.provider.held().is_empty(), "no snapshot for a commit meant for another freeze");
    assert_eq!(f.phase("b1"), "frozen", "the freeze stays under its lease (or an abort)");
    let right = f.backups.commit(&id("b1"), Some(&tok(&p.freeze_token)), false).await.unwrap();
    assert!(right.committed, "{}", right.reason);
}

/// A span's name and its parent's name (None for a root span).
type Nesting = (String, Option<String>);

/// Records how every span nests.
#[derive(Clone, Default)]
struct Parents(Arc<Mutex<Vec<Nesting>>>);

impl<S> tracing_subscriber::Layer<S> for Parents
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let name = |s: tracing_subscriber::registry::SpanRef<'_, S>| s.name().to_string();
        let parent = if let Some(p) = attrs.parent() {
            ctx.span(p).map(name)
        } else if attrs.is_contextual() {
            ctx.lookup_current().map(name)
        } else {
            None
        };
        lock(&self.0).push((attrs.metadata().name().to_string(), parent));
    }
}

/// The defect: the lease timer's lines nested under the Prepare RPC that froze, so a
/// log viewer showed an expiry seconds later as part of that Prepare.
#[tokio::test]
async fn the_lease_lines_do_not_nest_under_the_prepare_that_froze() {
    use tracing_subscriber::layer::SubscriberExt;
    let parents = Parents::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(parents.clone()));
    // Other tests' threads, with no subscriber, may have cached "never" for these span
    // callsites before this thread's subscriber existed; ask every callsite again.
    tracing::callsite::rebuild_interest_cache();
    let f = check(1);
    let rpc = tracing::info_span!("rpc");
    assert!(
        f.backups
            // Long enough that even a slow journal fsync on a loaded machine does not use it up
            // inside the Prepare, so the expiry comes from the timer.
            .prepare(&id("b1"), 1500, Hold::StorageOnly)
            .instrument(rpc)
            .await
            .unwrap()
            .prepared
    );
    wait_phase(&f, "b1", "thawed-expired").await;
    let spans = lock(&parents.0).clone();
    assert!(spans.contains(&("op".into(), Some("rpc".into()))), "{spans:?}");
    let lease: Vec<_> = spans.iter().filter(|(n, _)| n == "lease").collect();
    assert!(!lease.is_empty() && lease.iter().all(|(_, p)| p.is_none()), "{spans:?}");
}
