//! The agent's rules, each a named test: a tiny interpreter answers the machine's plug-in effects
//! (with scripted failures and durations) and records them as calls, like the agent's fakes.

use std::collections::BTreeMap;

use super::*;
use crate::model::{MAX_ARTIFACTS, MAX_ARTIFACT_BYTES};

const LEASE: u64 = 10_000;

fn id(s: &str) -> BackupId {
    BackupId::parse(s).unwrap()
}

/// The machine over quiescers `q0..qn` and a provider "fake", with the plug-ins scripted.
struct World {
    agent: Agent,
    now: u64,
    next_req: u64,
    calls: Vec<String>,
    replies: BTreeMap<u64, Reply>,
    timers: BTreeMap<BackupId, u64>,
    logs: Vec<String>,
    stops: Vec<BackupId>,
    /// Answers that are not plain success.
    fail_freeze: BTreeMap<usize, String>,
    fail_arm: BTreeMap<usize, String>,
    fail_create: Option<String>,
    fail_delete: Option<String>,
    no_guardian: bool,
    /// The provider check's answer; `Ok("")` (nothing to report) unless set.
    provider_check: Result<String, String>,
    /// The backups the provider was asked to check, and the quiescers armed, in order.
    checked: Vec<BackupId>,
    armed: Vec<usize>,
    guardian_thawed: bool,
    freeze_ms: BTreeMap<usize, u64>,
    create_ms: u64,
    /// Snapshots on "disk" per backup.
    disk: BTreeMap<BackupId, u32>,
    /// The operations' `Begin`s, in order.
    begun: Vec<(OpKind, Origin)>,
    /// What each quiescer hands over after its next successful thaw (then nothing).
    artifacts: BTreeMap<usize, Vec<Artifact>>,
}

fn check(n: usize) -> World {
    let quiescers = (0..n)
        .map(|i| QuiescerInfo {
            name: format!("q{i}"),
            freezes_filesystem: i == n - 1,
            hold: if i == n - 1 { Hold::FilesystemFreeze } else { Hold::HookUnverified },
        })
        .collect();
    World {
        agent: Agent::new("srv-a", quiescers, "fake"),
        now: 1_000,
        next_req: 0,
        calls: Vec::new(),
        replies: BTreeMap::new(),
        timers: BTreeMap::new(),
        logs: Vec::new(),
        stops: Vec::new(),
        fail_freeze: BTreeMap::new(),
        fail_arm: BTreeMap::new(),
        fail_create: None,
        fail_delete: None,
        no_guardian: false,
        provider_check: Ok(String::new()),
        checked: Vec::new(),
        armed: Vec::new(),
        guardian_thawed: false,
        freeze_ms: BTreeMap::new(),
        create_ms: 0,
        disk: BTreeMap::new(),
        begun: Vec::new(),
        artifacts: BTreeMap::new(),
    }
}

impl World {
    /// Sends `request` and runs every effect to the end; returns the request's id.
    fn send(&mut self, request: Request) -> u64 {
        self.next_req += 1;
        let from = ReqId(self.next_req);
        self.feed(Input::Request { from, request });
        self.next_req
    }

    fn feed(&mut self, input: Input) {
        let mut effects: VecDeque<Effect> = self.agent.handle(self.now, input).into();
        while let Some(effect) = effects.pop_front() {
            if let Some(result) = self.execute(effect) {
                effects.extend(self.agent.handle(self.now, result));
            }
        }
    }

    /// Executes one effect; returns the result to feed back, if it has one.
    fn execute(&mut self, effect: Effect) -> Option<Input> {
        let q = |i: usize| format!("q{i}");
        match effect {
            Effect::Begin { op, origin, .. } => {
                self.begun.push((op, origin));
                None
            }
            Effect::EnsureGuardian => Some(Input::GuardianChecked(if self.no_guardian {
                Err("guardian died".into())
            } else {
                Ok(())
            })),
            Effect::CheckProvider { backup } => {
                self.checked.push(backup);
                Some(Input::ProviderChecked(self.provider_check.clone()))
            }
            Effect::Arm { quiescer, .. } => {
                self.armed.push(quiescer);
                let result = self.fail_arm.get(&quiescer).cloned().map_or(Ok(()), Err);
                Some(Input::Armed { quiescer, result })
            }
            Effect::Freeze { backup, quiescer } => {
                self.calls.push(format!("freeze {} {backup}", q(quiescer)));
                self.now += self.freeze_ms.get(&quiescer).copied().unwrap_or(0);
                let result =
                    self.fail_freeze.get(&quiescer).cloned().map_or(Ok(String::new()), Err);
                Some(Input::Froze { quiescer, result })
            }
            Effect::Disarm { backup, quiescer } => {
                self.calls.push(format!("disarm {} {backup}", q(quiescer)));
                Some(Input::Disarmed)
            }
            Effect::Release { .. } => Some(Input::Released(if self.guardian_thawed {
                Released::AlreadyThawed
            } else {
                Released::Released
            })),
            Effect::Thaw { backup, quiescer, thawed_elsewhere } => {
                let verb = if thawed_elsewhere { "thawed-elsewhere" } else { "thaw" };
                self.calls.push(format!("{verb} {} {backup}", q(quiescer)));
                let artifacts = self.artifacts.remove(&quiescer).unwrap_or_default();
                Some(Input::Thawed { quiescer, result: Ok(String::new()), artifacts })
            }
            Effect::Forget { .. } => Some(Input::Forgotten),
            Effect::Snapshot { backup } => {
                self.calls.push(format!("create {backup}"));
                self.now += self.create_ms;
                self.disk.insert(backup.clone(), 2);
                Some(Input::Snapshotted(match &self.fail_create {
                    Some(e) => Err(e.clone()),
                    None => Ok(vec![snap("data", &backup), snap("logs", &backup)]),
                }))
            }
            Effect::Delete { backup } => {
                self.calls.push(format!("delete {backup}"));
                Some(Input::Deleted(match &self.fail_delete {
                    Some(e) => Err(e.clone()),
                    None => Ok(self.disk.remove(&backup).unwrap_or(0)),
                }))
            }
            Effect::SetTimer { backup, at_ms } => {
                self.timers.insert(backup, at_ms);
                None
            }
            Effect::CancelTimer { backup } => {
                self.timers.remove(&backup);
                None
            }
            Effect::StopCopy { backup } => {
                self.stops.push(backup);
                None
            }
            Effect::CloseGuardian => {
                self.calls.push("close guardian".into());
                Some(Input::GuardianClosed)
            }
            Effect::Log { text, .. } => {
                self.logs.push(text);
                None
            }
            Effect::Reply { to, reply } => {
                self.replies.insert(to.0, reply);
                None
            }
        }
    }

    /// Moves the clock to `to` and fires every lease timer due by then.
    fn advance_to(&mut self, to: u64) {
        self.now = to;
        let due: Vec<BackupId> =
            self.timers.iter().filter(|(_, at)| **at <= to).map(|(b, _)| b.clone()).collect();
        for backup in due {
            self.timers.remove(&backup);
            self.feed(Input::LeaseTimer { backup });
        }
    }

    fn prepare(&mut self, backup: &str, lease_ms: u64) -> PrepareReply {
        self.next_req += 1;
        let fresh_token = FreezeToken::parse(&format!("t{}", self.next_req)).unwrap();
        let r = self.send(Request::Prepare {
            backup: id(backup),
            lease_ms,
            fresh_token,
            require: Hold::StorageOnly,
        });
        match self.replies.remove(&r) {
            Some(Reply::Prepared(p)) => p,
            other => panic!("prepare {backup}: {other:?}"),
        }
    }

    fn commit(&mut self, backup: &str, token: Option<&str>) -> CommitReply {
        self.commit_holding(backup, token, false)
    }

    fn commit_holding(&mut self, backup: &str, token: Option<&str>, hold: bool) -> CommitReply {
        let token = token.map(|t| FreezeToken::parse(t).unwrap());
        let r = self.send(Request::Commit { backup: id(backup), token, hold_until_release: hold });
        match self.replies.remove(&r) {
            Some(Reply::Committed(c)) => c,
            other => panic!("commit {backup}: {other:?}"),
        }
    }

    fn release(&mut self, backup: &str) -> Result<ReleaseReply, Failure> {
        let r = self.send(Request::Release { backup: id(backup) });
        match self.replies.remove(&r) {
            Some(Reply::Release(a)) => a,
            other => panic!("release {backup}: {other:?}"),
        }
    }

    fn abort(&mut self, backup: &str) -> Result<AbortReply, Failure> {
        let r = self.send(Request::Abort { backup: id(backup), reason: "test".into() });
        match self.replies.remove(&r) {
            Some(Reply::Aborted(a)) => a,
            other => panic!("abort {backup}: {other:?}"),
        }
    }

    fn cleanup(&mut self, backup: &str) -> Result<u32, Failure> {
        let r = self.send(Request::Cleanup { backup: id(backup) });
        match self.replies.remove(&r) {
            Some(Reply::CleanedUp(c)) => c,
            other => panic!("cleanup {backup}: {other:?}"),
        }
    }

    fn phase(&self, backup: &str) -> Option<Phase> {
        self.agent.phase(&id(backup))
    }

    fn calls_starting(&self, prefix: &str) -> Vec<&str> {
        self.calls.iter().map(String::as_str).filter(|c| c.starts_with(prefix)).collect()
    }
}

fn snap(volume: &str, backup: &BackupId) -> SnapshotRef {
    SnapshotRef {
        volume: volume.into(),
        provider: "fake".into(),
        locator: format!("{backup}/{volume}"),
        size_bytes: 1,
    }
}

#[test]
fn backup_ids_follow_the_listeners_shape_and_nothing_else() {
    for good in ["b1", "20261202T210601Z-3fa9c1", "a.b_c:d-e", &"x".repeat(128)] {
        assert!(BackupId::parse(good).is_ok(), "{good}");
    }
    for bad in ["", ".hidden", "..", "a/b", "a b", "é", &"x".repeat(129)] {
        assert!(BackupId::parse(bad).is_err(), "{bad:?}");
    }
    // A refused value is shown, not echoed whole.
    let huge = BackupId::parse(&"\n".repeat(1 << 20)).unwrap_err().to_string();
    assert!(huge.len() < 300 && huge.contains("(1048576 bytes"), "{huge}");
    assert!(FreezeToken::parse("").is_err());
    assert!(FreezeToken::parse("3fa9c1d2").is_ok());
}

#[test]
fn prepare_freezes_in_order_and_commit_snapshots_then_thaws_in_reverse() {
    let mut w = check(3);
    let p = w.prepare("b1", LEASE);
    assert!(p.prepared && !p.freeze_token.is_empty(), "{p:?}");
    assert_eq!(w.phase("b1"), Some(Phase::Frozen));
    assert_eq!(w.timers.get(&id("b1")), Some(&(1_000 + LEASE)));
    let c = w.commit("b1", Some(&p.freeze_token));
    assert!(c.committed, "{c:?}");
    assert_eq!(c.snapshots.len(), 2);
    assert_eq!(
        w.calls,
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
    assert_eq!(w.phase("b1"), Some(Phase::Snapshotted));
    assert!(w.timers.is_empty(), "the commit cancels the lease timer");
}

#[test]
fn duplicate_prepare_returns_the_same_reply_without_a_second_freeze() {
    let mut w = check(2);
    let first = w.prepare("b1", LEASE);
    let second = w.prepare("b1", LEASE);
    assert!(first.prepared);
    assert_eq!(first, second, "the first freeze token, not the second request's");
    assert_eq!(w.calls_starting("freeze").len(), 2);
}

#[test]
fn prepare_of_another_backup_while_one_is_frozen_is_refused_as_busy() {
    let mut w = check(1);
    assert!(w.prepare("b1", LEASE).prepared);
    let other = w.prepare("b2", LEASE);
    assert!(!other.prepared);
    assert!(other.reason.contains("busy with backup b1 (frozen)"), "{}", other.reason);
    assert_eq!(w.calls_starting("freeze"), ["freeze q0 b1"]);
}

#[test]
fn requests_during_an_operation_wait_for_it_and_status_does_not() {
    let mut agent = Agent::new(
        "srv-a",
        vec![QuiescerInfo {
            name: "q0".into(),
            freezes_filesystem: false,
            hold: Hold::HookUnverified,
        }],
        "fake",
    );
    let first = agent.handle(
        0,
        Input::Request {
            from: ReqId(1),
            request: Request::Prepare {
                backup: id("b1"),
                lease_ms: LEASE,
                fresh_token: FreezeToken::parse("t1").unwrap(),
                require: Hold::StorageOnly,
            },
        },
    );
    assert!(first.contains(&Effect::EnsureGuardian), "{first:?}");
    let queued = agent.handle(
        1,
        Input::Request {
            from: ReqId(2),
            request: Request::Prepare {
                backup: id("b2"),
                lease_ms: LEASE,
                fresh_token: FreezeToken::parse("t2").unwrap(),
                require: Hold::StorageOnly,
            },
        },
    );
    assert!(queued.is_empty(), "a second Prepare waits: {queued:?}");
    let status = agent.status(1);
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].phase, Phase::Preparing);
    // The first ends; the second runs at once and is refused as busy.
    assert_eq!(
        agent.handle(2, Input::GuardianChecked(Ok(()))).last(),
        Some(&Effect::CheckProvider { backup: id("b1") })
    );
    assert_eq!(
        agent.handle(2, Input::ProviderChecked(Ok(String::new()))).last(),
        Some(&Effect::Arm { backup: id("b1"), quiescer: 0, lease_end_ms: LEASE })
    );
    agent.handle(3, Input::Armed { quiescer: 0, result: Ok(()) });
    let done = agent.handle(4, Input::Froze { quiescer: 0, result: Ok(String::new()) });
    let replies: Vec<_> = done
        .iter()
        .filter_map(|e| match e {
            Effect::Reply { to, reply: Reply::Prepared(p) } => {
                Some((to.0, p.prepared, p.reason.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        replies,
        [(1, true, String::new()), (2, false, "busy with backup b1 (frozen)".into())]
    );
}

#[test]
fn failing_quiescer_is_disarmed_thaws_the_earlier_ones_in_reverse_and_fails_the_backup() {
    let mut w = check(3);
    w.fail_freeze.insert(2, "database said no".into());
    let p = w.prepare("b1", LEASE);
    assert!(!p.prepared);
    assert!(p.reason.contains("q2") && p.reason.contains("database said no"), "{}", p.reason);
    assert_eq!(
        w.calls,
        [
            "freeze q0 b1",
            "freeze q1 b1",
            "freeze q2 b1",
            "disarm q2 b1",
            "thaw q1 b1",
            "thaw q0 b1"
        ]
    );
    assert_eq!(w.phase("b1"), Some(Phase::Failed));
    assert!(!p.steps[2].ok && p.steps[2].detail.contains("database said no"));
    assert_eq!(w.prepare("b1", LEASE), p, "idempotent: the same failure again");
    assert_eq!(w.calls.len(), 6, "nothing run twice");
    w.fail_freeze.clear();
    assert!(w.prepare("b2", LEASE).prepared, "a failed backup does not block the next one");
}

#[test]
fn a_thaw_that_cannot_be_armed_is_not_frozen() {
    let mut w = check(2);
    w.fail_arm.insert(1, "journal: disk full".into());
    let p = w.prepare("b1", LEASE);
    assert!(!p.prepared && p.reason.contains("journal: disk full"), "{}", p.reason);
    assert_eq!(w.calls, ["freeze q0 b1", "thaw q0 b1"]);
    let s: Vec<_> = p.steps.iter().map(|s| (s.action.as_str(), s.ok)).collect();
    assert_eq!(s, [("freeze", true), ("arm", false), ("thaw", true)]);
}

#[test]
fn no_guardian_refuses_to_freeze() {
    let mut w = check(1);
    w.no_guardian = true;
    let p = w.prepare("b1", LEASE);
    assert!(
        !p.prepared && p.reason.contains("no freeze guardian is running (guardian died)"),
        "{}",
        p.reason
    );
    assert!(w.calls.is_empty());
    assert_eq!(w.phase("b1"), Some(Phase::Failed));
}

#[test]
fn lease_expiry_thaws_in_reverse_and_marks_thawed_expired() {
    let mut w = check(2);
    assert!(w.prepare("b1", 150).prepared);
    assert_eq!(w.agent.status(w.now + 50)[0].lease_remaining_ms, 100);
    w.advance_to(w.now + 150);
    assert_eq!(w.phase("b1"), Some(Phase::ThawedExpired));
    assert_eq!(w.calls_starting("thaw"), ["thaw q1 b1", "thaw q0 b1"]);
    let c = w.commit("b1", None);
    assert!(!c.committed && c.reason.contains("lease expired after 150ms"), "{}", c.reason);
    assert!(w.calls_starting("create").is_empty());
    assert!(w.begun.contains(&(OpKind::Expire, Origin::LeaseTimer)), "the timer's op is its own");
}

#[test]
fn commit_checks_the_clock_before_the_timer_has_thawed() {
    let mut w = check(1);
    assert!(w.prepare("b1", 100).prepared);
    w.now += 100; // the timer has not fired yet
    let c = w.commit("b1", None);
    assert!(!c.committed);
    assert!(
        c.reason.contains("lease expired after 100ms; thawed without a snapshot"),
        "{}",
        c.reason
    );
    assert!(w.calls_starting("create").is_empty());
    assert!(w.timers.is_empty(), "the commit cancelled the timer");
    w.feed(Input::LeaseTimer { backup: id("b1") }); // a timer that fired anyway
    assert_eq!(w.calls_starting("thaw"), ["thaw q0 b1"], "thawed exactly once");
    assert_eq!(w.phase("b1"), Some(Phase::ThawedExpired));
}

#[test]
fn prepare_whose_lease_runs_out_while_quiescing_thaws_and_fails() {
    let mut w = check(2);
    w.freeze_ms.insert(1, 120);
    let p = w.prepare("b1", 50);
    assert!(!p.prepared && p.reason.contains("ran out while quiescing (120ms)"), "{}", p.reason);
    assert_eq!(w.calls_starting("thaw"), ["thaw q1 b1", "thaw q0 b1"]);
    assert_eq!(w.phase("b1"), Some(Phase::Failed));
}

#[test]
fn prepare_reports_quiesce_and_freeze_time_and_commit_the_time_held() {
    let mut w = check(2);
    w.freeze_ms.insert(0, 40);
    w.freeze_ms.insert(1, 20);
    let p = w.prepare("b1", LEASE);
    assert_eq!((p.quiesce_ms, p.freeze_ms), (60, 20), "q1 freezes the filesystem");
    w.now += 30;
    w.create_ms = 60;
    let c = w.commit("b1", None);
    assert_eq!((c.snapshot_ms, c.held_ms), (60, 60 + 30 + 60));
}

#[test]
fn a_snapshot_that_outlived_the_lease_is_deleted_and_refused() {
    let mut w = check(1);
    w.create_ms = LEASE;
    w.prepare("b1", LEASE);
    let c = w.commit("b1", None);
    assert!(
        !c.committed && c.reason.contains("outlived the lease of 10000ms; deleted"),
        "{}",
        c.reason
    );
    assert_eq!(w.calls[1..], ["create b1", "thaw q0 b1", "delete b1"]);
    assert!(w.disk.is_empty());
    assert_eq!(w.phase("b1"), Some(Phase::Failed));
    assert_eq!(w.commit("b1", None), c, "a duplicate gets the same refusal");
}

#[test]
fn commit_naming_another_freeze_is_refused_and_leaves_the_freeze_alone() {
    let mut w = check(1);
    let p = w.prepare("b1", LEASE);
    let c = w.commit("b1", Some("earlier-freeze"));
    assert!(
        !c.committed && c.reason.contains("commit names freeze earlier-freeze"),
        "{}",
        c.reason
    );
    assert!(c.reason.contains(&p.freeze_token));
    assert_eq!(w.phase("b1"), Some(Phase::Frozen));
    assert!(w.commit("b1", Some(&p.freeze_token)).committed);
}

#[test]
fn duplicate_commit_returns_the_same_snapshots_without_new_ones_while_they_exist() {
    let mut w = check(1);
    w.prepare("b1", LEASE);
    let first = w.commit("b1", None);
    assert_eq!(w.commit("b1", None), first);
    assert_eq!(w.calls_starting("create").len(), 1);
    w.cleanup("b1").unwrap();
    let after = w.commit("b1", None);
    assert!(!after.committed && after.reason.contains("backup b1 is cleaned"), "{}", after.reason);
}

#[test]
fn commit_of_an_unknown_backup_is_refused() {
    let mut w = check(1);
    let c = w.commit("nope", None);
    assert!(!c.committed && c.reason.contains("unknown backup nope"), "{}", c.reason);
    assert!(w.calls.is_empty());
}

#[test]
fn provider_failure_thaws_deletes_partial_snapshots_and_fails() {
    let mut w = check(2);
    w.fail_create = Some("array offline".into());
    w.prepare("b1", LEASE);
    let c = w.commit("b1", None);
    assert!(
        !c.committed
            && c.reason.contains("snapshot failed: array offline; thawed and deleted partial"),
        "{}",
        c.reason
    );
    assert_eq!(w.calls[2..], ["create b1", "thaw q1 b1", "thaw q0 b1", "delete b1"]);
    assert_eq!(w.phase("b1"), Some(Phase::Failed));
    assert_eq!(w.commit("b1", None), c);
}

#[test]
fn the_guardian_thawed_first_so_the_agent_only_tells_its_quiescers() {
    let mut w = check(2);
    w.prepare("b1", LEASE);
    w.guardian_thawed = true;
    w.abort("b1").unwrap();
    assert_eq!(w.calls_starting("thaw"), ["thawed-elsewhere q1 b1", "thawed-elsewhere q0 b1"]);
}

#[test]
fn abort_thaws_a_frozen_backup_and_is_idempotent() {
    let mut w = check(2);
    w.prepare("b1", LEASE);
    let a = w.abort("b1").unwrap();
    assert!(a.thawed);
    assert_eq!(w.calls_starting("thaw"), ["thaw q1 b1", "thaw q0 b1"]);
    assert_eq!(w.phase("b1"), Some(Phase::Aborted));
    assert!(w.timers.is_empty());
    assert_eq!(w.abort("b1").unwrap(), AbortReply { thawed: false, snapshots_deleted: 0 });
    let c = w.commit("b1", None);
    assert!(!c.committed && c.reason.contains("aborted"), "{}", c.reason);
}

#[test]
fn abort_of_an_unknown_backup_refuses_a_late_prepare() {
    let mut w = check(1);
    assert_eq!(w.abort("b9").unwrap(), AbortReply::default());
    let p = w.prepare("b9", LEASE);
    assert!(!p.prepared && p.reason.contains("already aborted"), "{}", p.reason);
    assert!(w.calls_starting("freeze").is_empty());
}

#[test]
fn cleanup_of_a_frozen_backup_thaws_first() {
    let mut w = check(1);
    w.prepare("b1", LEASE);
    assert_eq!(w.cleanup("b1"), Ok(0));
    assert_eq!(w.calls[1..], ["thaw q0 b1", "delete b1"]);
    assert_eq!(w.phase("b1"), Some(Phase::Cleaned));
}

#[test]
fn cleanup_that_cannot_delete_fails_naming_the_backup() {
    let mut w = check(1);
    w.fail_delete = Some("disk gone".into());
    let err = w.cleanup("b1").unwrap_err();
    assert_eq!(err.kind, FailureKind::Provider);
    assert!(err.text.contains("b1") && err.text.contains("disk gone"), "{}", err.text);
}

#[test]
fn abort_and_cleanup_wait_for_a_running_copy_and_no_new_copy_starts() {
    let mut w = check(1);
    w.prepare("b1", LEASE);
    w.commit("b1", None);
    let r = w.send(Request::BeginCopy { backup: id("b1") });
    assert!(matches!(&w.replies[&r], Reply::CopyBegun(Ok(s)) if s.len() == 2));
    let again = w.send(Request::BeginCopy { backup: id("b1") });
    assert!(
        matches!(&w.replies[&again], Reply::CopyBegun(Err(f)) if f.kind == FailureKind::FailedPrecondition)
    );
    let abort = w.send(Request::Abort { backup: id("b1"), reason: "test".into() });
    assert_eq!(w.stops, [id("b1")], "the copy is asked to stop");
    assert!(!w.replies.contains_key(&abort) && w.calls_starting("delete").is_empty());
    // Another backup's operations go on meanwhile.
    assert!(w.prepare("b2", LEASE).prepared);
    w.feed(Input::CopyEnded { backup: id("b1") });
    let late = w.send(Request::BeginCopy { backup: id("b1") });
    assert!(
        matches!(&w.replies[&late], Reply::CopyBegun(Err(f)) if f.kind == FailureKind::NotFound)
    );
    assert_eq!(
        w.replies[&abort],
        Reply::Aborted(Ok(AbortReply { thawed: false, snapshots_deleted: 2 }))
    );
}

#[test]
fn shutdown_thaws_every_frozen_backup_then_closes_the_guardian() {
    let mut w = check(2);
    w.prepare("b1", LEASE);
    let r = w.send(Request::Shutdown);
    assert_eq!(w.replies[&r], Reply::ShutDown);
    assert_eq!(w.calls[2..], ["thaw q1 b1", "thaw q0 b1", "close guardian"]);
    assert_eq!(w.phase("b1"), Some(Phase::Failed));
    assert!(w.timers.is_empty());
}

#[test]
fn finished_backups_are_remembered_up_to_a_bound() {
    let mut w = check(1);
    for i in 0..KEEP_FINISHED + 20 {
        w.abort(&format!("b{i}")).unwrap();
    }
    let status = w.agent.status(w.now);
    assert_eq!(status.len(), KEEP_FINISHED);
    assert_eq!(status[0].backup, id("b20"));
}

#[test]
fn the_prepared_reply_names_the_strongest_hold_of_the_quiescers_that_froze() {
    let mut w = check(2);
    assert_eq!(w.prepare("b1", LEASE).hold, Some(Hold::FilesystemFreeze), "a freeze beside a hook");
    let mut hook_only = check(1);
    hook_only.agent.quiescers[0].hold = Hold::HookUnverified;
    assert_eq!(hook_only.prepare("b1", LEASE).hold, Some(Hold::HookUnverified));
    let mut none = check(0);
    assert_eq!(none.agent.hold(), Hold::StorageOnly);
    let p = none.prepare("b1", LEASE);
    assert!(p.prepared && p.hold == Some(Hold::StorageOnly), "{p:?}");
}

#[test]
fn prepare_below_the_required_hold_is_refused_before_anything_is_armed_or_frozen() {
    let mut w = check(1);
    w.agent.quiescers[0].hold = Hold::HookUnverified;
    w.next_req += 1;
    let r = w.send(Request::Prepare {
        backup: id("b1"),
        lease_ms: LEASE,
        fresh_token: FreezeToken::parse("t1").unwrap(),
        require: Hold::FilesystemFreeze,
    });
    let Some(Reply::Prepared(p)) = w.replies.remove(&r) else { panic!("no prepared reply") };
    assert!(!p.prepared && p.hold == Some(Hold::HookUnverified), "{p:?}");
    assert!(
        p.reason.contains("srv-a holds writes only by hook-unverified")
            && p.reason.contains("requires filesystem-freeze"),
        "{}",
        p.reason
    );
    assert!(w.calls.is_empty(), "nothing frozen: {:?}", w.calls);
    assert!(w.timers.is_empty());
    assert_eq!(w.phase("b1"), None, "nothing held, nothing to remember");
    // At or below its hold, it freezes.
    let r = w.send(Request::Prepare {
        backup: id("b1"),
        lease_ms: LEASE,
        fresh_token: FreezeToken::parse("t2").unwrap(),
        require: Hold::HookUnverified,
    });
    assert!(matches!(w.replies.remove(&r), Some(Reply::Prepared(p)) if p.prepared));
}

#[test]
fn commit_holding_until_release_snapshots_and_stays_frozen_until_release() {
    let mut w = check(2);
    w.prepare("b1", LEASE);
    w.now += 10;
    w.create_ms = 30;
    let c = w.commit_holding("b1", None, true);
    assert!(c.committed && c.still_held && c.snapshots.len() == 2, "{c:?}");
    assert_eq!((c.held_ms, c.thaw_ms), (40, 0));
    assert_eq!(w.calls_starting("thaw"), Vec::<&str>::new(), "not thawed by the commit");
    assert_eq!(w.phase("b1"), Some(Phase::Held));
    assert_eq!(w.timers.get(&id("b1")), Some(&(1_000 + LEASE)), "the lease still bounds it");
    assert_eq!(w.agent.status(w.now)[0].snapshots.len(), 2);
    let other = w.prepare("b2", LEASE);
    assert!(other.reason.contains("busy with backup b1 (held)"), "{}", other.reason);
    assert_eq!(w.commit_holding("b1", None, true), c, "a duplicate commit: same answer");
    w.now += 50;
    let r = w.release("b1").unwrap();
    assert!(r.held_until_release && r.reason.is_empty(), "{r:?}");
    assert_eq!(r.held_ms, 90);
    assert_eq!(w.calls_starting("thaw"), ["thaw q1 b1", "thaw q0 b1"]);
    assert_eq!(w.phase("b1"), Some(Phase::Snapshotted));
    assert!(w.timers.is_empty(), "release cancels the lease timer");
    assert_eq!(w.release("b1").unwrap(), r, "idempotent");
    assert_eq!(w.calls_starting("thaw").len(), 2, "thawed once");
    let copy = w.send(Request::BeginCopy { backup: id("b1") });
    assert!(matches!(&w.replies[&copy], Reply::CopyBegun(Ok(s)) if s.len() == 2));
}

#[test]
fn a_lease_that_runs_out_while_held_thaws_keeps_the_snapshot_and_release_hears_it() {
    let mut w = check(1);
    w.prepare("b1", 500);
    assert!(w.commit_holding("b1", None, true).still_held);
    w.advance_to(1_000 + 500);
    assert_eq!(w.calls_starting("thaw"), ["thaw q0 b1"]);
    assert_eq!(w.phase("b1"), Some(Phase::Snapshotted), "the snapshot was taken while frozen");
    assert_eq!(w.disk.get(&id("b1")), Some(&2));
    let r = w.release("b1").unwrap();
    assert!(
        !r.held_until_release && r.reason.contains("lease of 500ms ran out before release"),
        "{r:?}"
    );
    assert_eq!(w.calls_starting("thaw").len(), 1, "release does not thaw twice");
}

#[test]
fn a_release_after_the_lease_but_before_its_timer_is_not_held() {
    let mut w = check(1);
    w.prepare("b1", 500);
    w.commit_holding("b1", None, true);
    w.now = 1_000 + 600; // the timer has not fired yet; the guardian may have thawed
    let r = w.release("b1").unwrap();
    assert!(!r.held_until_release, "{r:?}");
    assert_eq!(r.held_ms, 500, "held until the lease's end at most");
}

#[test]
fn release_of_what_was_not_held_says_so() {
    let mut w = check(1);
    assert_eq!(w.release("nope").unwrap_err().kind, FailureKind::NotFound);
    w.prepare("b1", LEASE);
    assert_eq!(w.release("b1").unwrap_err().kind, FailureKind::FailedPrecondition);
    w.commit("b1", None);
    let r = w.release("b1").unwrap();
    assert!(!r.held_until_release && r.reason.contains("without hold_until_release"), "{r:?}");
}

#[test]
fn abort_of_a_held_backup_thaws_and_deletes() {
    let mut w = check(2);
    w.prepare("b1", LEASE);
    w.commit_holding("b1", None, true);
    let a = w.abort("b1").unwrap();
    assert_eq!(a, AbortReply { thawed: true, snapshots_deleted: 2 });
    assert_eq!(w.calls[3..], ["thaw q1 b1", "thaw q0 b1", "delete b1"]);
    assert!(w.timers.is_empty());
    assert_eq!(w.release("b1").unwrap_err().kind, FailureKind::FailedPrecondition);
}

#[test]
fn a_held_commit_whose_snapshot_outlived_the_lease_thaws_and_deletes_as_before() {
    let mut w = check(1);
    w.create_ms = LEASE;
    w.prepare("b1", LEASE);
    let c = w.commit_holding("b1", None, true);
    assert!(!c.committed && !c.still_held && c.reason.contains("outlived"), "{c:?}");
    assert_eq!(w.calls[1..], ["create b1", "thaw q0 b1", "delete b1"]);
}

fn artifact(name: &str, bytes: &[u8]) -> Artifact {
    Artifact { quiescer: "whoever".into(), name: name.into(), bytes: bytes.to_vec() }
}

/// As the machine names them: by the quiescer that handed them over.
fn of(quiescer: &str, name: &str, bytes: &[u8]) -> Artifact {
    Artifact { quiescer: quiescer.into(), name: name.into(), bytes: bytes.to_vec() }
}

#[test]
fn artifacts_handed_over_after_the_thaw_travel_in_the_committed_reply() {
    let mut w = check(2);
    w.artifacts.insert(0, vec![artifact("backup_label", b"START WAL LOCATION: 0/2000028")]);
    w.artifacts.insert(1, vec![artifact("position", b"binlog.000003:157")]);
    w.prepare("b1", LEASE);
    let c = w.commit("b1", None);
    assert!(c.committed, "{c:?}");
    // Thawed in reverse: q1 first.
    assert_eq!(
        c.artifacts,
        [
            of("q1", "position", b"binlog.000003:157"),
            of("q0", "backup_label", b"START WAL LOCATION: 0/2000028")
        ]
    );
    let thaw = c.steps.iter().find(|s| s.name == "q0" && s.action == "thaw").unwrap();
    assert!(thaw.ok && thaw.detail.contains("artifacts: q0/backup_label (29 B)"), "{thaw:?}");
    assert_eq!(w.commit("b1", None), c, "a repeated commit: the same artifacts");
    w.cleanup("b1").unwrap();
    let e = w.agent.get(&id("b1")).unwrap();
    assert!(e.committed.as_ref().unwrap().artifacts.is_empty(), "dropped once cleaned up");
}

#[test]
fn under_the_barrier_artifacts_come_with_release_and_a_repeat_returns_them() {
    let mut w = check(1);
    w.artifacts.insert(0, vec![artifact("backup_label", b"label")]);
    w.prepare("b1", LEASE);
    let c = w.commit_holding("b1", None, true);
    assert!(c.still_held && c.artifacts.is_empty(), "not thawed yet: {c:?}");
    let r = w.release("b1").unwrap();
    assert!(r.held_until_release && r.artifacts_refused.is_empty(), "{r:?}");
    assert_eq!(r.artifacts, [of("q0", "backup_label", b"label")]);
    assert_eq!(w.release("b1").unwrap(), r, "idempotent, artifacts included");
}

#[test]
fn artifacts_of_a_lease_thaw_under_the_barrier_wait_in_the_entry_for_release() {
    let mut w = check(1);
    w.artifacts.insert(0, vec![artifact("backup_label", b"label")]);
    w.prepare("b1", 500);
    assert!(w.commit_holding("b1", None, true).still_held);
    w.advance_to(1_000 + 500);
    assert_eq!(w.calls_starting("thaw"), ["thaw q0 b1"]);
    let r = w.release("b1").unwrap();
    assert!(!r.held_until_release, "{r:?}");
    assert_eq!(r.artifacts, [of("q0", "backup_label", b"label")], "kept until reported");
    assert_eq!(w.release("b1").unwrap(), r);
}

#[test]
fn an_artifact_over_the_limit_fails_the_thaw_step_and_the_commit_and_deletes_the_snapshot() {
    let mut w = check(1);
    let big = vec![7u8; MAX_ARTIFACT_BYTES + 1];
    w.artifacts.insert(0, vec![artifact("small", b"ok"), artifact("huge", &big)]);
    w.prepare("b1", LEASE);
    let c = w.commit("b1", None);
    assert!(!c.committed && c.artifacts.is_empty(), "{c:?}");
    assert!(
        c.reason.contains("the artifacts of quiescer q0 were refused (artifact huge is over the limit of 65536 bytes per artifact)")
            && c.reason.contains("deleted it"),
        "{}",
        c.reason
    );
    let thaw = c.steps.iter().find(|s| s.action == "thaw").unwrap();
    assert!(!thaw.ok && thaw.detail.contains("huge is over the limit"), "{thaw:?}");
    assert_eq!(w.calls_starting("delete"), ["delete b1"]);
    assert_eq!(w.phase("b1"), Some(Phase::Failed));
}

#[test]
fn too_many_artifacts_or_a_name_that_is_a_path_are_refused() {
    let many: Vec<Artifact> =
        (0..=MAX_ARTIFACTS).map(|i| artifact(&format!("f{i}"), b"x")).collect();
    let twice = vec![artifact("label", b"1"), artifact("label", b"2")];
    for (given, said) in [
        (many, "17 artifacts in all, over the limit of 16 per server"),
        (vec![artifact("../etc/passwd", b"x")], "is not a plain file name"),
        (vec![artifact(".hidden", b"x")], "is not a plain file name"),
        (twice, "artifact label is handed over twice"),
    ] {
        let mut w = check(1);
        w.artifacts.insert(0, given);
        w.prepare("b1", LEASE);
        let c = w.commit("b1", None);
        assert!(!c.committed && c.reason.contains(said), "{said}: {}", c.reason);
    }
}

#[test]
fn refused_artifacts_at_release_are_reported_and_the_snapshot_stays_for_the_listener() {
    let mut w = check(1);
    w.artifacts.insert(0, vec![artifact("a/b", b"x")]);
    w.prepare("b1", LEASE);
    w.commit_holding("b1", None, true);
    let r = w.release("b1").unwrap();
    assert!(r.artifacts.is_empty(), "{r:?}");
    assert!(
        r.artifacts_refused.starts_with("quiescer q0: artifact \"a/b\" is not a plain file name")
            && r.artifacts_refused.contains("not a plain file name"),
        "{}",
        r.artifacts_refused
    );
    // The listener fails the backup and aborts it: that deletes the snapshot.
    assert_eq!(w.abort("b1").unwrap().snapshots_deleted, 2);
}

#[test]
fn a_lease_thaw_under_the_barrier_whose_artifacts_are_refused_still_logs_the_thaw_as_ok() {
    let mut w = check(1);
    w.artifacts.insert(0, vec![artifact("a/b", b"x")]);
    w.prepare("b1", 500);
    assert!(w.commit_holding("b1", None, true).still_held);
    w.advance_to(1_000 + 500);
    let broken = w.logs.iter().find(|l| l.starts_with("thaw barrier broken")).unwrap();
    assert!(broken.contains("thaw ok: true"), "the thaw went through: {broken}");
    let r = w.release("b1").unwrap();
    assert!(r.artifacts_refused.starts_with("quiescer q0: artifact"), "{r:?}");
}

#[test]
fn a_snapshot_that_outlived_the_lease_and_could_not_be_deleted_does_not_say_deleted() {
    let mut w = check(1);
    w.create_ms = LEASE;
    w.fail_delete = Some("device busy".into());
    w.prepare("b1", LEASE);
    let c = w.commit("b1", None);
    assert!(
        !c.committed
            && c.reason.ends_with("outlived the lease of 10000ms; deleting it failed: device busy"),
        "{}",
        c.reason
    );
}

#[test]
fn a_provider_check_that_fails_refuses_prepare_before_anything_is_armed_or_frozen() {
    let mut w = check(2);
    w.provider_check =
        Err("volume group vg0 has 12.0 MiB free; thick snapshots need 64.0 MiB".into());
    let p = w.prepare("b1", LEASE);
    assert!(
        !p.prepared
            && p.reason.contains("snapshot provider fake: volume group vg0 has 12.0 MiB free")
            && p.reason.contains("refusing before freezing anything"),
        "{}",
        p.reason
    );
    assert_eq!(w.checked, [id("b1")]);
    assert!(w.armed.is_empty() && w.calls.is_empty(), "{:?} {:?}", w.armed, w.calls);
    assert!(w.timers.is_empty(), "no lease timer for what never froze");
    let s: Vec<_> = p.steps.iter().map(|s| (s.name.as_str(), s.action.as_str(), s.ok)).collect();
    assert_eq!(s, [("fake", "check", false)]);
    assert_eq!(w.phase("b1"), Some(Phase::Failed));
    // A repeated Prepare gets the same answer without asking again; a Commit is refused.
    assert_eq!(w.prepare("b1", LEASE), p);
    assert_eq!(w.checked.len(), 1);
    let c = w.commit("b1", None);
    assert!(!c.committed && c.reason.contains("refusing before freezing"), "{}", c.reason);
    assert!(w.calls.is_empty(), "{:?}", w.calls);
}

#[test]
fn the_provider_is_checked_after_the_guardian_and_before_the_first_arm() {
    let mut w = check(2);
    w.provider_check = Ok("vg0: thick snapshots need 64.0 MiB of 180.0 MiB free".into());
    let p = w.prepare("b1", LEASE);
    assert!(p.prepared, "{p:?}");
    assert_eq!(w.checked, [id("b1")]);
    assert_eq!(w.armed, [0, 1]);
    let s: Vec<_> = p.steps.iter().map(|s| format!("{} {}", s.action, s.name)).collect();
    assert_eq!(s, ["check fake", "freeze q0", "freeze q1"]);
    assert!(p.steps[0].detail.contains("64.0 MiB of 180.0 MiB free"));
    assert!(
        w.logs.iter().any(|l| l.contains("snapshot provider fake: vg0: thick")),
        "{:?}",
        w.logs
    );
    // A provider with nothing to say adds no step.
    let mut w = check(1);
    let p = w.prepare("b1", LEASE);
    assert!(p.prepared && p.steps.len() == 1 && p.steps[0].action == "freeze", "{p:?}");
    // No guardian: refused before the provider is even asked.
    let mut w = check(1);
    w.no_guardian = true;
    assert!(!w.prepare("b1", LEASE).prepared);
    assert!(w.checked.is_empty());
}
