//! Every transition of the protocol, including the ugly ones, fed as events with explicit time.

use super::*;
use crate::hold::Hold;

const T: Timeouts = Timeouts {
    lease_ms: 10_000,
    commit_cutoff_ms: 6_000,
    commit_timeout_ms: 10_000,
    copy_timeout_ms: 60_000,
    cleanup_timeout_ms: 5_000,
    inspect_timeout_ms: 5_000,
};

fn new_backup() -> Coordinator {
    let servers = ["a", "b", "c"].map(String::from);
    Coordinator::new(BackupRecord::new("b1", "g", &servers, "operator:test", 0), T)
}

/// The commands that are not log lines, for exact comparison.
fn acts(cmds: Vec<Command>) -> Vec<Command> {
    cmds.into_iter().filter(|c| !matches!(c, Command::Log { .. })).collect()
}

fn logs(cmds: &[Command]) -> Vec<String> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Log { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

fn ok_prepare() -> Result<PrepareReply, String> {
    Ok(PrepareReply { prepared: true, quiesce_ms: 3, freeze_ms: 2, ..Default::default() })
}

fn ok_commit(server: &str) -> Result<CommitReply, String> {
    Ok(CommitReply {
        committed: true,
        snapshots: vec![SnapshotRef {
            volume: "data".into(),
            provider: "mock-san".into(),
            locator: format!("/array/{server}"),
            size_bytes: 100,
        }],
        held_ms: 20,
        ..Default::default()
    })
}

fn prepared(c: &mut Coordinator, now: Millis, server: &str) -> Vec<Command> {
    c.handle(now, Event::Prepared { server: server.into(), reply: ok_prepare() })
}

fn committed(c: &mut Coordinator, now: Millis, server: &str) -> Vec<Command> {
    c.handle(now, Event::Committed { server: server.into(), reply: ok_commit(server) })
}

fn aborts(servers: &[&str], reason: &str) -> Vec<Command> {
    servers
        .iter()
        .map(|s| Command::Abort { server: s.to_string(), reason: reason.into() })
        .collect()
}

/// A backup where every server is frozen and commit has been sent at t=30.
fn committing() -> Coordinator {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    for (i, s) in ["a", "b", "c"].iter().enumerate() {
        prepared(&mut c, 10 + 10 * i as Millis, s);
    }
    assert_eq!(c.record.state.name(), StateName::Committing);
    c
}

fn snapshotted() -> Coordinator {
    let mut c = committing();
    for s in ["a", "b", "c"] {
        committed(&mut c, 40, s);
    }
    assert_eq!(c.record.state.name(), StateName::Snapshotted);
    c
}

#[test]
fn start_sends_prepare_with_the_lease_to_every_server() {
    let mut c = new_backup();
    let cmds = acts(c.handle(0, Event::Start));
    let want: Vec<_> =
        ["a", "b", "c"].map(|s| Command::Prepare { server: s.into(), lease_ms: 10_000 }).into();
    assert_eq!(cmds, want);
    assert_eq!(c.record.state, State::Preparing { sent_at: 0, cutoff_at: 6_000 });
    assert_eq!(c.next_deadline(), Some(6_000));
    assert!(acts(c.handle(1, Event::Start)).is_empty(), "a second start does nothing");
}

#[test]
fn commit_only_after_every_server_prepared() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    assert!(acts(prepared(&mut c, 10, "a")).is_empty());
    assert!(acts(prepared(&mut c, 20, "b")).is_empty());
    let cmds = acts(prepared(&mut c, 30, "c"));
    let want: Vec<_> = ["a", "b", "c"]
        .map(|s| Command::Commit { server: s.into(), freeze_token: String::new() })
        .into();
    assert_eq!(cmds, want);
    assert!(c.record.servers.iter().all(|s| s.cut.commit_sent == Some(30)));
}

#[test]
fn commit_only_while_every_lease_runs() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    prepared(&mut c, 10, "a");
    prepared(&mut c, 20, "b");
    let cmds = prepared(&mut c, 6_000, "c");
    assert!(!cmds.iter().any(|c| matches!(c, Command::Commit { .. })), "no commit past the cutoff");
    assert!(matches!(c.record.state, State::Failed { phase: StateName::Preparing, .. }));
    assert_eq!(acts(cmds).len(), 3, "everyone is aborted");
}

#[test]
fn a_failed_prepare_fails_the_backup_and_thaws_everyone() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    prepared(&mut c, 10, "a");
    let reply = Ok(PrepareReply {
        prepared: false,
        reason: "quiescer app: exit 3".into(),
        ..Default::default()
    });
    let cmds = c.handle(20, Event::Prepared { server: "b".into(), reply });
    let State::Failed { phase, reason } = &c.record.state else {
        panic!("not failed: {:?}", c.record.state)
    };
    assert_eq!(*phase, StateName::Preparing);
    assert_eq!(reason, "b: prepare failed: quiescer app: exit 3");
    assert_eq!(acts(cmds), aborts(&["a", "b", "c"], reason));
    assert!(logs(&c.handle(30, Event::Tick)).is_empty(), "a failed backup has no deadlines");
}

#[test]
fn an_unreachable_agent_fails_prepare() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    let cmds = c
        .handle(5, Event::Prepared { server: "c".into(), reply: Err("connection refused".into()) });
    assert!(
        matches!(&c.record.state, State::Failed { reason, .. } if reason.contains("connection refused"))
    );
    assert_eq!(acts(cmds).len(), 3);
}

#[test]
fn a_prepare_that_never_answers_fails_at_the_cutoff() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    prepared(&mut c, 10, "a");
    prepared(&mut c, 10, "c");
    assert!(c.handle(5_999, Event::Tick).is_empty());
    let cmds = c.handle(6_000, Event::Tick);
    let State::Failed { reason, .. } = &c.record.state else { panic!() };
    assert_eq!(reason, "b did not prepare within the commit cutoff of 6000ms");
    assert_eq!(acts(cmds), aborts(&["a", "b", "c"], reason));
}

#[test]
fn a_late_prepared_reply_after_failure_is_aborted_at_once() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    c.handle(6_000, Event::Tick);
    // Abort already went to everyone; a late "prepared" needs no second Abort.
    assert!(acts(prepared(&mut c, 6_100, "b")).is_empty());
    assert_eq!(c.record.state.name(), StateName::Failed);
}

#[test]
fn duplicate_replies_are_ignored() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    prepared(&mut c, 10, "a");
    let cmds = prepared(&mut c, 11, "a");
    assert!(acts(cmds.clone()).is_empty());
    assert_eq!(logs(&cmds), vec!["duplicate prepare reply ignored"]);
    assert_eq!(c.record.servers[0].cut.prepared, Some(10));
    let mut c = committing();
    committed(&mut c, 40, "a");
    assert!(acts(committed(&mut c, 41, "a")).is_empty());
    assert_eq!(c.record.servers[0].cut.committed, Some(40));
}

#[test]
fn a_commit_after_the_lease_ran_out_fails_and_deletes_every_snapshot() {
    let mut c = committing();
    committed(&mut c, 40, "a");
    let reply = Ok(CommitReply {
        committed: false,
        reason: "lease expired after 10000ms; thawed without a snapshot".into(),
        ..Default::default()
    });
    let cmds = c.handle(50, Event::Committed { server: "b".into(), reply });
    let State::Failed { phase, reason } = &c.record.state else { panic!() };
    assert_eq!(*phase, StateName::Committing);
    assert!(reason.contains("lease expired"));
    assert_eq!(acts(cmds), aborts(&["a", "b", "c"], reason));
}

#[test]
fn a_commit_that_never_answers_fails() {
    let mut c = committing();
    committed(&mut c, 40, "a");
    committed(&mut c, 40, "b");
    let cmds = c.handle(30 + 10_000, Event::Tick);
    let State::Failed { reason, .. } = &c.record.state else { panic!() };
    assert_eq!(reason, "c did not answer commit within 10000ms");
    assert_eq!(acts(cmds).len(), 3);
}

#[test]
fn abort_racing_commit_ends_aborted_and_the_late_snapshot_is_deleted() {
    let mut c = committing();
    let cmds =
        c.handle(35, Event::AbortRequested { by: "operator:x".into(), reason: "risky".into() });
    assert_eq!(c.record.state, State::Aborted { reason: "aborted by operator:x: risky".into() });
    assert_eq!(acts(cmds).len(), 3);
    let cmds = acts(committed(&mut c, 40, "a"));
    assert_eq!(cmds, aborts(&["a"], "backup already ended"));
    assert_eq!(c.record.state.name(), StateName::Aborted, "terminal states never change");
    assert!(acts(c.handle(50, Event::AbortRequested { by: "x".into(), reason: "again".into() }))
        .is_empty());
}

#[test]
fn every_snapshot_then_copy_then_cleanup_per_server_then_success() {
    let mut c = committing();
    committed(&mut c, 40, "a");
    committed(&mut c, 41, "b");
    let cmds = acts(committed(&mut c, 42, "c"));
    assert_eq!(cmds.len(), 3);
    assert!(
        matches!(&cmds[2], Command::Copy { server, snapshots } if server == "c" && snapshots[0].locator == "/array/c")
    );
    let verdict = c.record.verdict.clone().unwrap();
    assert!(verdict.consistent, "{}", verdict.text);
    let cmds =
        acts(c.handle(50, Event::Copied { server: "b".into(), result: Ok(CopyDone::default()) }));
    assert_eq!(
        cmds,
        vec![Command::Cleanup { server: "b".into() }],
        "cleanup as soon as that server's copy is safe"
    );
    c.handle(51, Event::CleanedUp { server: "b".into(), result: Ok(1) });
    c.handle(52, Event::Copied { server: "a".into(), result: Ok(CopyDone::default()) });
    c.handle(53, Event::Copied { server: "c".into(), result: Ok(CopyDone::default()) });
    assert_eq!(c.record.state.name(), StateName::Cleaning);
    c.handle(54, Event::CleanedUp { server: "a".into(), result: Ok(1) });
    c.handle(55, Event::CleanedUp { server: "c".into(), result: Err("agent gone".into()) });
    assert_eq!(c.record.state, State::Succeeded);
    assert_eq!(c.record.finished, Some(55));
}

#[test]
fn a_failed_copy_fails_the_backup_and_removes_the_snapshots() {
    let mut c = snapshotted();
    let cmds =
        c.handle(60, Event::Copied { server: "a".into(), result: Err("exit status 1".into()) });
    let State::Failed { phase, reason } = &c.record.state else { panic!() };
    assert_eq!(*phase, StateName::Copying);
    assert_eq!(reason, "a: copy failed: exit status 1");
    assert_eq!(acts(cmds).len(), 3);
    let cmds =
        acts(c.handle(61, Event::Copied { server: "b".into(), result: Ok(CopyDone::default()) }));
    assert!(cmds.is_empty(), "no cleanup, no success after failure");
}

#[test]
fn copy_reports_for_servers_not_copying_are_refused() {
    let mut c = committing();
    let cmds = c.handle(40, Event::Copied { server: "a".into(), result: Ok(CopyDone::default()) });
    assert!(acts(cmds).is_empty());
    assert_eq!(c.record.state.name(), StateName::Committing);
}

#[test]
fn a_copy_that_takes_too_long_fails() {
    let mut c = snapshotted();
    c.handle(50, Event::Copied { server: "a".into(), result: Ok(CopyDone::default()) });
    c.handle(40 + 60_000, Event::Tick);
    assert!(
        matches!(&c.record.state, State::Failed { reason, .. } if reason == "copy of b, c did not finish within 60000ms")
    );
}

#[test]
fn a_restart_fails_what_was_in_flight_and_aborts_it() {
    let mut c = committing();
    let cmds = c.handle(100, Event::Restarted);
    assert!(
        matches!(&c.record.state, State::Failed { phase: StateName::Committing, reason } if reason.contains("listener restarted"))
    );
    assert_eq!(acts(cmds).len(), 3);
}

#[test]
fn judge_cut_names_an_inconsistent_cut() {
    let mut c = committing();
    c.record.servers[2].cut.prepared = Some(31);
    let verdict = judge_cut(&c.record);
    assert!(!verdict.consistent);
    assert_eq!(
        verdict.text,
        "a commit was sent at +30ms, before the last server prepared at +31ms"
    );
}

#[test]
fn the_freeze_token_of_the_first_prepared_reply_is_kept_for_commit() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    let reply = |token: &str| {
        Ok(PrepareReply { prepared: true, freeze_token: token.into(), ..Default::default() })
    };
    c.handle(5, Event::Prepared { server: "a".into(), reply: reply("first") });
    // A late duplicate (say from a re-freeze after the agent restarted) does not replace it.
    c.handle(6, Event::Prepared { server: "a".into(), reply: reply("second") });
    assert_eq!(c.record.servers[0].freeze_token, "first");
    c.handle(7, Event::Prepared { server: "b".into(), reply: reply("b's") });
    let cmds = acts(c.handle(8, Event::Prepared { server: "c".into(), reply: reply("c's") }));
    let token = |t: &str| t.to_string();
    assert_eq!(
        cmds,
        vec![
            Command::Commit { server: "a".into(), freeze_token: token("first") },
            Command::Commit { server: "b".into(), freeze_token: token("b's") },
            Command::Commit { server: "c".into(), freeze_token: token("c's") },
        ],
        "each Commit carries the freeze it commits"
    );
}

fn copied(c: &mut Coordinator, now: Millis, server: &str, stored: &[&str]) -> Vec<Command> {
    let done = CopyDone {
        detail: format!("{server} copied"),
        stored: stored.iter().map(|s| s.to_string()).collect(),
        stored_bytes: None,
    };
    c.handle(now, Event::Copied { server: server.into(), result: Ok(done) })
}

fn aborted(c: &mut Coordinator, now: Millis, server: &str, thawed: bool, deleted: u32) {
    let outcome = AbortOutcome { thawed, snapshots_deleted: deleted };
    c.handle(now, Event::Aborted { server: server.into(), result: Ok(outcome) });
}

#[test]
fn snapshotted_is_visible_until_the_first_copy_reports() {
    let mut c = snapshotted();
    assert_eq!(c.record.state, State::Snapshotted { deadline: 40 + 60_000 });
    assert!(c.record.servers.iter().all(|s| s.step == ServerStep::Copying));
    let progress = Event::CopyProgress { server: "b".into(), done: 0, total: 100 };
    let cmds = c.handle(41, progress);
    assert_eq!(logs(&cmds), vec!["copy phase started (b first)"], "a state change is logged");
    assert_eq!(c.record.state, State::Copying { deadline: 40 + 60_000 }, "same deadline");
    let progress = Event::CopyProgress { server: "b".into(), done: 50, total: 100 };
    assert!(c.handle(42, progress).is_empty(), "progress alone decides nothing");
    assert_eq!(c.record.servers[1].copied_bytes, 50);

    // In report mode the first word is the backup software's first report.
    let mut c = snapshotted();
    copied(&mut c, 50, "c", &[]);
    assert_eq!(c.record.state.name(), StateName::Copying);
}

#[test]
fn the_last_copy_is_sealed_before_the_backup_can_succeed() {
    let mut c = snapshotted().sealed_by_copier(true);
    copied(&mut c, 50, "a", &["va"]);
    c.handle(51, Event::CleanedUp { server: "a".into(), result: Ok(1) });
    copied(&mut c, 52, "b", &["vb1", "vb2"]);
    c.handle(53, Event::CleanedUp { server: "b".into(), result: Ok(1) });
    let cmds = acts(copied(&mut c, 54, "c", &["vc"]));
    let cut = c.record.cut();
    assert_eq!(
        cmds,
        vec![
            Command::Cleanup { server: "c".into() },
            Command::Seal {
                stored: ["va", "vb1", "vb2", "vc"].map(String::from).into(),
                cut,
                artifacts: Vec::new()
            },
        ],
        "every server's volumes in the backup's server order, with the cut"
    );
    assert_eq!(c.record.state, State::Sealing { deadline: 40 + 60_000 });
    assert_eq!(c.record.state.name(), StateName::Copying, "clients see COPYING");
    c.handle(55, Event::CleanedUp { server: "c".into(), result: Ok(1) });
    assert_eq!(c.record.state.name(), StateName::Copying, "no success before the seal");
    let cmds = c.handle(56, Event::Sealed { result: Ok("backup manifest m1; verify ok".into()) });
    assert_eq!(logs(&cmds), vec!["sealed: backup manifest m1; verify ok", "backup succeeded"]);
    assert_eq!(c.record.state, State::Succeeded);
    assert_eq!(c.record.settled, Some(56));
}

#[test]
fn a_seal_that_fails_fails_the_backup() {
    let mut c = snapshotted().sealed_by_copier(true);
    for s in ["a", "b", "c"] {
        copied(&mut c, 50, s, &["v"]);
    }
    let cmds = c.handle(60, Event::Sealed { result: Err("verify found 1 problem(s)".into()) });
    let State::Failed { phase, reason } = &c.record.state else { panic!("{:?}", c.record.state) };
    assert_eq!(
        (*phase, reason.as_str()),
        (StateName::Copying, "seal failed: verify found 1 problem(s)")
    );
    assert_eq!(acts(cmds), aborts(&["a", "b", "c"], reason), "the snapshots still held go");
}

#[test]
fn a_seal_that_never_answers_fails_at_the_copy_deadline() {
    let mut c = snapshotted().sealed_by_copier(true);
    for s in ["a", "b", "c"] {
        copied(&mut c, 50, s, &["v"]);
    }
    c.handle(40 + 60_000, Event::Tick);
    assert!(
        matches!(&c.record.state, State::Failed { reason, .. } if reason == "the seal did not finish within the copy timeout of 60000ms")
    );
}

#[test]
fn abort_done_says_what_the_agent_did() {
    let mut c = snapshotted();
    c.handle(50, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    let outcome = AbortOutcome { thawed: false, snapshots_deleted: 1 };
    let cmds = c.handle(51, Event::Aborted { server: "a".into(), result: Ok(outcome) });
    assert_eq!(logs(&cmds), vec!["abort done: nothing was frozen, 1 snapshot deleted"]);
    assert_eq!(c.record.servers[0].step, ServerStep::Aborted);
    let outcome = AbortOutcome { thawed: true, snapshots_deleted: 0 };
    assert_eq!(outcome.describe(), "thawed, no snapshot to delete");
}

#[test]
fn an_undelivered_abort_says_what_is_known_not_that_the_agent_thaws_itself() {
    // b is frozen (prepared at t=20) when a fails; b's abort never lands.
    let mut c = new_backup();
    c.handle(1_000, Event::Start);
    prepared(&mut c, 1_020, "b");
    c.handle(1_030, Event::Prepared { server: "a".into(), reply: Err("refused".into()) });
    let cmds =
        c.handle(3_000, Event::Aborted { server: "b".into(), result: Err("unreachable".into()) });
    assert_eq!(
        logs(&cmds),
        vec!["abort not delivered (unreachable); if b is still frozen, its lease ends by 00:00:11.020 UTC and its guardian thaws it then (if the guardian is alive)"]
    );
    assert_eq!(c.record.servers[1].step, ServerStep::AbortFailed);
    // c never answered Prepare: whether it froze is not known.
    let cmds =
        c.handle(3_001, Event::Aborted { server: "c".into(), result: Err("unreachable".into()) });
    assert!(logs(&cmds)[0].ends_with("if c froze, its lease ends 10000ms after Prepare reached it (sent at 00:00:01.000 UTC) and its guardian thaws it then (if the guardian is alive)"), "{:?}", logs(&cmds));

    // A server that holds snapshots: no lease removes them, the sweep does.
    let mut c = snapshotted();
    c.handle(50, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    let cmds =
        c.handle(51, Event::Aborted { server: "a".into(), result: Err("unreachable".into()) });
    assert_eq!(
        logs(&cmds),
        vec!["abort not delivered (unreachable); it thawed when it took its 1 snapshot(s), which stay until the sweep deletes them once a is reachable"]
    );
}

#[test]
fn a_commit_that_failed_after_the_end_is_said_as_it_happened() {
    let mut c = committing();
    c.handle(35, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    let cmds = c.handle(
        10_100,
        Event::Committed { server: "a".into(), reply: Err("deadline exceeded".into()) },
    );
    assert_eq!(
        logs(&cmds),
        vec!["commit to a failed after the backup ended: deadline exceeded; the abort sent when the backup ended covers whatever it took"]
    );
    assert!(acts(cmds).is_empty());
}

#[test]
fn a_backup_settles_once_every_contacted_server_confirmed_or_was_given_up() {
    let mut c = snapshotted();
    c.handle(50, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    assert!(c.record.state.is_terminal());
    assert_eq!(c.record.settled, None, "terminal, but the aborts are not confirmed yet");
    aborted(&mut c, 51, "a", false, 1);
    aborted(&mut c, 52, "b", false, 1);
    assert_eq!(c.record.settled, None);
    let cmds =
        c.handle(60, Event::Aborted { server: "c".into(), result: Err("unreachable".into()) });
    assert_eq!(c.record.settled, Some(60));
    let unconfirmed = c.record.unconfirmed();
    assert_eq!(unconfirmed.len(), 1);
    assert!(unconfirmed[0].starts_with("c: abort not delivered (unreachable)"), "{unconfirmed:?}");
    assert!(logs(&cmds)[1].starts_with("settled without confirmation from c: abort not delivered"));

    // Every one confirmed after the end: said once, as the last line.
    let mut c = snapshotted();
    c.handle(50, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    aborted(&mut c, 51, "a", false, 1);
    aborted(&mut c, 52, "b", false, 1);
    let outcome = AbortOutcome { thawed: false, snapshots_deleted: 1 };
    let cmds = c.handle(53, Event::Aborted { server: "c".into(), result: Ok(outcome) });
    assert_eq!(
        logs(&cmds),
        vec![
            "abort done: nothing was frozen, 1 snapshot deleted",
            "settled: every server confirmed its end"
        ]
    );

    // Never contacted: nothing to wait for.
    let mut c = new_backup();
    c.handle(0, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    assert_eq!(c.record.settled, Some(0));
}

#[test]
fn a_restart_past_the_freeze_resumes_the_backup() {
    let mut c = snapshotted();
    copied(&mut c, 50, "a", &[]);
    c.handle(51, Event::CopyProgress { server: "b".into(), done: 50, total: 100 });
    let cmds = c.handle(100, Event::Restarted);
    assert_eq!(c.record.state, State::Copying { deadline: 40 + 60_000 }, "still copying");
    let snapshot = |s: &str| {
        vec![SnapshotRef {
            volume: "data".into(),
            provider: "mock-san".into(),
            locator: format!("/array/{s}"),
            size_bytes: 100,
        }]
    };
    assert_eq!(
        acts(cmds.clone()),
        vec![
            Command::Copy { server: "b".into(), snapshots: snapshot("b") },
            Command::Copy { server: "c".into(), snapshots: snapshot("c") },
            Command::Cleanup { server: "a".into() },
        ]
    );
    assert_eq!(
        logs(&cmds),
        vec!["listener restarted while the backup was COPYING; its snapshots were kept: copy requested again for b, c; cleanup sent again to a"]
    );
    assert_eq!(c.record.servers[1].copied_bytes, 0, "the copy starts over");
    for s in ["b", "c"] {
        copied(&mut c, 110, s, &[]);
    }
    for s in ["a", "b", "c"] {
        c.handle(120, Event::CleanedUp { server: s.into(), result: Ok(1) });
    }
    assert_eq!(c.record.state, State::Succeeded);

    // Sealing: the seal again.
    let mut c = snapshotted().sealed_by_copier(true);
    for s in ["a", "b", "c"] {
        copied(&mut c, 50, s, &["v"]);
    }
    let cmds = acts(c.handle(100, Event::Restarted));
    assert!(matches!(cmds.last(), Some(Command::Seal { .. })), "{cmds:?}");
    assert_eq!(c.record.state.name(), StateName::Copying);
}

#[test]
fn a_restart_of_an_ended_backup_asks_again_what_was_not_confirmed() {
    let mut c = snapshotted();
    c.handle(50, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    aborted(&mut c, 51, "a", false, 1);
    let cmds = c.handle(100, Event::Restarted);
    assert_eq!(acts(cmds), aborts(&["b", "c"], "backup already ended"));
    aborted(&mut c, 101, "b", false, 1);
    aborted(&mut c, 102, "c", false, 1);
    assert_eq!(c.record.settled, Some(102));
}

#[test]
fn a_cut_that_will_never_be_judged_says_why() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    c.handle(6_000, Event::Tick);
    assert_eq!(c.record.verdict, None);
    assert_eq!(
        c.record.never_judged.as_deref(),
        Some("never judged: the backup failed while PREPARING before every server was snapshotted")
    );
    let mut c = snapshotted();
    c.handle(50, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    assert_eq!(c.record.never_judged, None, "judged at the snapshot");
}

#[test]
fn the_sweep_of_an_ended_backup_updates_its_server() {
    let mut c = snapshotted();
    c.handle(50, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    c.handle(51, Event::Aborted { server: "a".into(), result: Err("unreachable".into()) });
    assert_eq!(c.record.servers[0].step, ServerStep::AbortFailed);
    let outcome = AbortOutcome { thawed: false, snapshots_deleted: 1 };
    let cmds = c.handle(5_000, Event::Swept { server: "a".into(), outcome });
    assert_eq!(logs(&cmds), vec!["swept: abort done: nothing was frozen, 1 snapshot deleted"]);
    assert_eq!(c.record.servers[0].step, ServerStep::Aborted);
    assert!(matches!(&c.record.servers[0].end, Some(ServerEnd::Confirmed(_))));
}

#[test]
fn a_backup_waits_in_pending_for_servers_mid_freeze_or_gives_up() {
    let mut c = new_backup();
    let busy = Event::Waiting { other: "b0".into(), servers: vec!["a".into()] };
    let cmds = c.handle(0, busy);
    assert_eq!(logs(&cmds), vec!["waiting to freeze: a is mid-freeze for backup b0"]);
    assert_eq!(c.record.state, State::Pending);
    assert_eq!(acts(c.handle(10, Event::Start)).len(), 3, "then it starts");

    let mut c = new_backup();
    let gave_up = Event::GaveUpWaiting {
        other: "b0".into(),
        servers: vec!["a".into(), "b".into()],
        waited_ms: 30_000,
    };
    let cmds = c.handle(30_000, gave_up);
    assert!(acts(cmds).is_empty(), "nothing was contacted");
    assert_eq!(
        c.record.state,
        State::Failed {
            phase: StateName::Pending,
            reason: "a, b are still mid-freeze for backup b0 after 30000ms; nothing was frozen for this backup".into()
        }
    );
    assert_eq!(c.record.settled, Some(30_000));
}

/// Snapshotted (copies requested) at t=40 with a 1000 ms report silence: the backup software must say something
/// about each server's copy (progress or a heartbeat) at least every second.
fn reported_copying() -> Coordinator {
    let mut c = committing().with_report_silence(1_000);
    for s in ["a", "b", "c"] {
        committed(&mut c, 40, s);
    }
    c
}

#[test]
fn a_reported_copy_that_goes_silent_fails_naming_the_server_and_the_silence() {
    let mut c = reported_copying();
    assert_eq!(c.record.state.name(), StateName::Snapshotted);
    assert_eq!(c.next_deadline(), Some(1_040), "each copy is heard of when it is requested");
    c.handle(500, Event::CopyProgress { server: "a".into(), done: 10, total: 100 });
    assert_eq!(c.record.state.name(), StateName::Copying, "the first word starts the copy phase");
    c.handle(900, Event::CopyHeartbeat { server: "b".into() });
    assert_eq!(c.next_deadline(), Some(1_040), "c is still unheard since 40");
    assert!(acts(c.handle(1_039, Event::Tick)).is_empty());
    c.handle(1_000, Event::Copied { server: "c".into(), result: Ok(CopyDone::said("tape 7")) });
    assert_eq!(c.next_deadline(), Some(1_500), "a copied server is no longer waited on; a is next");
    c.handle(1_400, Event::CopyHeartbeat { server: "a".into() });
    let cmds = c.handle(1_900, Event::Tick);
    let State::Failed { phase, reason } = &c.record.state else {
        panic!("not failed: {:?}", c.record.state)
    };
    assert_eq!(*phase, StateName::Copying);
    assert_eq!(
        reason,
        "copy of b (last heard 1000ms ago): the backup software reported nothing (no progress, no heartbeat) for 1000ms"
    );
    assert_eq!(acts(cmds), aborts(&["a", "b", "c"], reason));
}

#[test]
fn without_a_report_silence_only_the_copy_timeout_ends_a_quiet_copy() {
    let mut c = snapshotted();
    c.handle(500, Event::CopyHeartbeat { server: "a".into() });
    assert_eq!(c.next_deadline(), Some(60_040));
    assert!(acts(c.handle(59_000, Event::Tick)).is_empty());
    c.handle(60_040, Event::Tick);
    assert!(
        matches!(&c.record.state, State::Failed { reason, .. } if reason.contains("did not finish within 60000ms"))
    );
}

fn prepare_holding(hold: Option<Hold>) -> Result<PrepareReply, String> {
    Ok(PrepareReply { prepared: true, hold, ..Default::default() })
}

#[test]
fn writes_held_is_claimed_only_where_the_hold_holds_writes() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    let holds = [("a", Some(Hold::FilesystemFreeze)), ("b", Some(Hold::StoppedProcesses))];
    for (server, hold) in holds {
        c.handle(5, Event::Prepared { server: server.into(), reply: prepare_holding(hold) });
    }
    let last = c.handle(
        6,
        Event::Prepared { server: "c".into(), reply: prepare_holding(Some(Hold::HookUnverified)) },
    );
    assert!(
        logs(&last).iter().any(|l| l.contains("hook-unverified: a hook ran")),
        "{:?}",
        logs(&last)
    );
    let mut lines = Vec::new();
    for server in ["a", "b", "c"] {
        lines.extend(logs(&committed(&mut c, 10, server)));
    }
    let record = &c.record;
    assert_eq!(record.servers[2].cut.hold, Some(Hold::HookUnverified), "recorded in the cut");
    assert!(record.servers[0].detail.contains("writes held 20ms"), "{}", record.servers[0].detail);
    let srv_c = &record.servers[2].detail;
    assert!(
        srv_c.contains("frozen for 20ms; writes not known to be held (hook-unverified: a hook ran; whether it held writes cannot be seen)")
            && !srv_c.contains("writes held"),
        "{srv_c}"
    );
    let verdict = record.verdict.clone().unwrap();
    assert!(
        verdict.text.starts_with("the message order is a consistent cut")
            && verdict
                .text
                .contains("writes were held on a, b; on c they were not known to be held"),
        "{}",
        verdict.text
    );
    assert!(!verdict.text.contains("frozen at one instant"), "{}", verdict.text);
    assert!(lines.iter().any(|l| l.contains("cut the message order is a consistent cut")));
    assert!(!lines.iter().any(|l| l.contains("c:") && l.contains("writes held")), "{lines:?}");
}

/// A thaw that failed (a database connection holding its lock was lost before the thaw) may
/// mean the hold ended before the snapshot: that server's writes are not known to be held.
#[test]
fn a_failed_thaw_makes_that_servers_writes_not_known_to_be_held() {
    let mut c = new_backup();
    c.handle(0, Event::Start);
    for server in ["a", "b", "c"] {
        c.handle(
            1,
            Event::Prepared {
                server: server.into(),
                reply: prepare_holding(Some(Hold::Application)),
            },
        );
    }
    committed(&mut c, 2, "a");
    committed(&mut c, 2, "c");
    let mut reply = ok_commit("b").unwrap();
    let lost = "UNLOCK TABLES for backup x: connection lost; the connection holding the lock since 40ms ago was lost, so the lock ended then, maybe before the snapshot";
    reply.steps.push(Step {
        name: "db".into(),
        action: "thaw".into(),
        ok: false,
        duration_ms: 1,
        detail: lost.into(),
    });
    let lines = logs(&c.handle(3, Event::Committed { server: "b".into(), reply: Ok(reply) }));
    let srv_b = &c.record.servers[1];
    assert!(!srv_b.cut.writes_held());
    assert!(
        srv_b.detail.contains("writes not known to be held")
            && srv_b.detail.contains("the thaw of db failed")
            && srv_b.detail.contains("maybe before the snapshot"),
        "{}",
        srv_b.detail
    );
    let verdict = c.record.verdict.clone().unwrap();
    assert!(
        verdict.text.contains("writes were held on a, c; on b they were not known to be held")
            && verdict.text.contains("whether the hold lasted until the snapshot is not known"),
        "{}",
        verdict.text
    );
    assert!(!verdict.text.contains("frozen at one instant"), "{}", verdict.text);
    assert!(!lines.iter().any(|l| l.contains("b:") && l.contains("writes held 20ms")), "{lines:?}");
}

#[test]
fn a_hold_the_agent_did_not_report_is_unknown_not_assumed() {
    let mut c = snapshotted(); // replies without a hold
    let verdict = c.record.verdict.clone().unwrap();
    assert!(verdict.text.contains("writes were held on none"), "{}", verdict.text);
    assert!(verdict.text.contains("hold unknown"), "{}", verdict.text);
    assert!(c.record.servers[0].detail.contains("writes not known to be held"));
    let every =
        [("a", Hold::Application), ("b", Hold::FilesystemFreeze), ("c", Hold::FilesystemFreeze)];
    c = new_backup();
    c.handle(0, Event::Start);
    for (server, hold) in every {
        c.handle(1, Event::Prepared { server: server.into(), reply: prepare_holding(Some(hold)) });
    }
    for server in ["a", "b", "c"] {
        committed(&mut c, 2, server);
    }
    let verdict = c.record.verdict.clone().unwrap();
    assert!(
        verdict.consistent
            && verdict
                .text
                .starts_with("all 3 servers were frozen at one instant and held their writes"),
        "{}",
        verdict.text
    );
}

fn requiring(hold: Hold) -> Coordinator {
    let mut c = new_backup();
    c.record.require_hold = hold;
    c
}

fn inspected(c: &mut Coordinator, now: Millis, server: &str, hold: Hold) -> Vec<Command> {
    c.handle(now, Event::Inspected { server: server.into(), result: Ok(hold) })
}

fn prepares() -> Vec<Command> {
    ["a", "b", "c"].map(|s| Command::Prepare { server: s.into(), lease_ms: T.lease_ms }).to_vec()
}

#[test]
fn a_group_requiring_a_hold_asks_every_server_before_any_prepare() {
    let mut c = requiring(Hold::FilesystemFreeze);
    let start = c.handle(0, Event::Start);
    let inspect = ["a", "b", "c"].map(|s| Command::Inspect { server: s.into() }).to_vec();
    assert_eq!(acts(start), inspect);
    assert_eq!(c.record.state, State::Inspecting { deadline: 5_000 });
    assert_eq!(c.record.state.name(), StateName::Pending, "PENDING on the wire");
    assert!(acts(inspected(&mut c, 10, "a", Hold::Application)).is_empty());
    assert!(acts(inspected(&mut c, 11, "b", Hold::FilesystemFreeze)).is_empty());
    assert_eq!(acts(inspected(&mut c, 12, "c", Hold::FilesystemFreeze)), prepares());
    assert!(matches!(c.record.state, State::Preparing { sent_at: 12, .. }));
}

#[test]
fn a_server_below_the_required_hold_fails_the_backup_before_anything_freezes() {
    let mut c = requiring(Hold::FilesystemFreeze);
    c.handle(0, Event::Start);
    inspected(&mut c, 10, "a", Hold::FilesystemFreeze);
    inspected(&mut c, 10, "b", Hold::StoppedProcesses);
    let last = inspected(&mut c, 11, "c", Hold::HookUnverified);
    assert!(acts(last.clone()).is_empty(), "no Prepare and nothing to abort: {last:?}");
    let State::Failed { phase, reason } = &c.record.state else { panic!("{:?}", c.record.state) };
    assert_eq!(*phase, StateName::Pending);
    assert_eq!(
        reason,
        "the group requires filesystem-freeze; below it: b (stopped-processes: the application's processes were stopped), c (hook-unverified: a hook ran; whether it held writes cannot be seen); nothing was frozen"
    );
    assert!(c.record.servers.iter().all(|s| s.cut.prepare_sent.is_none()));
}

#[test]
fn a_server_that_cannot_say_its_hold_fails_closed() {
    let mut c = requiring(Hold::StoppedProcesses);
    c.handle(0, Event::Start);
    let out =
        c.handle(3, Event::Inspected { server: "b".into(), result: Err("unreachable".into()) });
    assert!(acts(out).is_empty());
    let State::Failed { reason, .. } = &c.record.state else { panic!("{:?}", c.record.state) };
    assert!(
        reason.starts_with("b: could not learn what holds its writes (unreachable)"),
        "{reason}"
    );

    let mut c = requiring(Hold::StoppedProcesses);
    c.handle(0, Event::Start);
    inspected(&mut c, 10, "a", Hold::Application);
    assert_eq!(c.next_deadline(), Some(5_000));
    assert!(acts(c.handle(4_999, Event::Tick)).is_empty());
    assert_eq!(c.record.state.name(), StateName::Pending);
    assert!(acts(c.handle(5_000, Event::Tick)).is_empty());
    let State::Failed { reason, .. } = &c.record.state else { panic!("{:?}", c.record.state) };
    assert!(reason.starts_with("b, c did not say what holds its writes within 5000ms"), "{reason}");
}

#[test]
fn without_a_requirement_prepare_goes_out_at_once() {
    let mut c = new_backup();
    assert_eq!(acts(c.handle(0, Event::Start)), prepares());
}

fn held_commit(server: &str) -> Result<CommitReply, String> {
    ok_commit(server).map(|r| CommitReply { still_held: true, ..r })
}

fn release_ok(held: bool) -> Result<ReleaseReply, String> {
    Ok(ReleaseReply { held_until_release: held, held_ms: 70, thaw_ms: 2, ..Default::default() })
}

/// A barrier backup where a and b hold writes by a filesystem freeze and c by `c_hold`, every
/// server prepared; Commit sent at 30.
fn barrier(c_hold: Hold) -> Coordinator {
    let mut c = new_backup();
    c.record.thaw_barrier = true;
    c.handle(0, Event::Start);
    for (server, hold) in
        [("a", Hold::FilesystemFreeze), ("b", Hold::FilesystemFreeze), ("c", c_hold)]
    {
        c.handle(30, Event::Prepared { server: server.into(), reply: prepare_holding(Some(hold)) });
    }
    c
}

fn releasing(c_hold: Hold) -> Coordinator {
    let mut c = barrier(c_hold);
    for server in ["a", "b", "c"] {
        c.handle(40, Event::Committed { server: server.into(), reply: held_commit(server) });
    }
    c
}

fn released(
    c: &mut Coordinator,
    server: &str,
    reply: Result<ReleaseReply, String>,
) -> Vec<Command> {
    c.handle(50, Event::Released { server: server.into(), reply })
}

#[test]
fn with_the_barrier_no_server_is_released_before_every_snapshot_exists() {
    let mut c = barrier(Hold::HookUnverified);
    for server in ["a", "b"] {
        let out =
            c.handle(40, Event::Committed { server: server.into(), reply: held_commit(server) });
        assert!(acts(out).is_empty(), "nothing released while a snapshot is missing");
    }
    let last = c.handle(41, Event::Committed { server: "c".into(), reply: held_commit("c") });
    let release = ["a", "b", "c"].map(|s| Command::Release { server: s.into() }).to_vec();
    assert_eq!(acts(last), release);
    assert_eq!(c.record.state, State::Releasing { deadline: 41 + 10_000 });
    assert_eq!(c.record.state.name(), StateName::Snapshotted);
    assert!(c.record.verdict.is_none(), "judged only once every server answered");
    assert!(acts(released(&mut c, "a", release_ok(true))).is_empty());
    assert!(acts(released(&mut c, "b", release_ok(true))).is_empty());
    let copies = acts(released(&mut c, "c", release_ok(true)));
    assert!(copies.iter().all(|x| matches!(x, Command::Copy { .. })) && copies.len() == 3);
    let verdict = c.record.verdict.clone().unwrap();
    assert!(verdict.consistent, "{}", verdict.text);
    assert!(
        verdict
            .text
            .starts_with("every server stayed frozen until every snapshot existed (thaw barrier)")
            && verdict.text.contains(
                "writes were held on a, b; on c they were not known to be held (hook-unverified"
            ),
        "{}",
        verdict.text
    );
    assert_eq!(c.record.servers[0].cut.held_until_release, Some(true));
    assert_eq!((c.record.servers[0].cut.held_ms, c.record.servers[0].cut.thaw_ms), (70, 2));
    assert!(c.record.servers[2].detail.contains("frozen for 70ms; writes not known to be held"));
}

#[test]
fn an_unconfirmed_release_means_the_cut_is_not_claimed() {
    let mut c = releasing(Hold::FilesystemFreeze);
    released(&mut c, "a", release_ok(true));
    released(&mut c, "b", release_ok(false));
    released(&mut c, "c", Err("unreachable".into()));
    let verdict = c.record.verdict.clone().unwrap();
    assert!(!verdict.consistent);
    assert!(
        verdict.text.contains("but b (its lease ran out first), c (no answer) did not confirm staying frozen until every snapshot existed: whether the snapshots form a consistent cut is not known"),
        "{}",
        verdict.text
    );
    assert_eq!(c.record.servers[2].cut.held_until_release, None, "unknown, not guessed");
    assert_eq!(c.record.state.name(), StateName::Snapshotted, "the copies are still asked for");
}

#[test]
fn a_release_that_never_answers_is_unknown_at_the_deadline() {
    let mut c = releasing(Hold::FilesystemFreeze);
    released(&mut c, "a", release_ok(true));
    released(&mut c, "b", release_ok(true));
    assert!(acts(c.handle(10_039, Event::Tick)).is_empty());
    let out = c.handle(10_040, Event::Tick);
    assert_eq!(acts(out).len(), 3, "the copy starts");
    let verdict = c.record.verdict.clone().unwrap();
    assert!(!verdict.consistent && verdict.text.contains("c (no answer)"), "{}", verdict.text);
    let late = released(&mut c, "c", release_ok(true));
    assert!(acts(late).is_empty());
    assert_eq!(c.record.servers[2].cut.held_until_release, None);
}

#[test]
fn with_two_servers_that_hold_nothing_the_verdict_says_the_cut_rests_on_their_hooks() {
    let mut c = new_backup();
    c.record.thaw_barrier = true;
    c.handle(0, Event::Start);
    for (server, hold) in
        [("a", Hold::FilesystemFreeze), ("b", Hold::HookUnverified), ("c", Hold::StorageOnly)]
    {
        c.handle(30, Event::Prepared { server: server.into(), reply: prepare_holding(Some(hold)) });
    }
    for server in ["a", "b", "c"] {
        c.handle(40, Event::Committed { server: server.into(), reply: held_commit(server) });
    }
    for server in ["a", "b", "c"] {
        released(&mut c, server, release_ok(true));
    }
    let verdict = c.record.verdict.clone().unwrap();
    assert!(verdict.consistent, "{}", verdict.text);
    assert!(
        verdict.text.contains("on b, c they were not known to be held: their snapshots were taken at different instants, so the cut between them holds only as far as their hooks held their writes"),
        "{}",
        verdict.text
    );
}

#[test]
fn abort_while_held_thaws_and_deletes_everywhere() {
    let mut c = releasing(Hold::FilesystemFreeze);
    let out =
        c.handle(45, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    assert_eq!(acts(out), aborts(&["a", "b", "c"], "aborted by operator:x: stop"));
    assert!(acts(released(&mut c, "a", release_ok(true))).is_empty(), "late release ignored");
}

#[test]
fn an_undelivered_abort_of_a_held_server_says_it_may_still_be_frozen() {
    let mut c = releasing(Hold::FilesystemFreeze);
    c.handle(45, Event::AbortRequested { by: "operator:x".into(), reason: "stop".into() });
    let cmds =
        c.handle(46, Event::Aborted { server: "a".into(), result: Err("unreachable".into()) });
    let line = &logs(&cmds)[0];
    assert!(line.contains("may still be frozen: its lease ends by"), "{line}");
    assert!(!line.contains("it thawed"), "{line}");
}

fn label(quiescer: &str, name: &str, bytes: &[u8]) -> Artifact {
    Artifact { quiescer: quiescer.into(), name: name.into(), bytes: bytes.to_vec() }
}

#[test]
fn each_servers_artifacts_are_recorded_from_its_commit_and_sealed_with_the_backup() {
    let mut c = committing().sealed_by_copier(true);
    let with = |server: &str, artifacts: Vec<Artifact>| {
        ok_commit(server).map(|r| CommitReply { artifacts, ..r })
    };
    let a = vec![label("pg", "backup_label", b"START WAL"), label("pg", "tablespace_map", b"")];
    let cmds = c.handle(40, Event::Committed { server: "a".into(), reply: with("a", a.clone()) });
    assert!(
        logs(&cmds)[0].ends_with("; artifacts: pg/backup_label (9 B), pg/tablespace_map (0 B)"),
        "{cmds:?}"
    );
    committed(&mut c, 41, "b");
    let c_art = vec![label("mysql", "binlog_position", b"binlog.000003:157")];
    c.handle(42, Event::Committed { server: "c".into(), reply: with("c", c_art.clone()) });
    assert_eq!(c.record.servers[0].artifacts, a);
    assert!(c.record.servers[1].artifacts.is_empty());
    copied(&mut c, 50, "a", &["va"]);
    copied(&mut c, 51, "b", &["vb"]);
    let seal = acts(copied(&mut c, 52, "c", &["vc"])).pop();
    let Some(Command::Seal { artifacts, .. }) = seal else { panic!("a seal: {seal:?}") };
    assert_eq!(artifacts, vec![("a".to_string(), a), ("c".to_string(), c_art)]);
}

#[test]
fn under_the_barrier_artifacts_come_from_the_release_reply() {
    let mut c = releasing(Hold::FilesystemFreeze);
    let art = vec![label("pg", "backup_label", b"x")];
    let reply = release_ok(true).map(|r| ReleaseReply { artifacts: art.clone(), ..r });
    released(&mut c, "a", reply);
    assert_eq!(c.record.servers[0].artifacts, art);
    assert!(c.record.servers[0].detail.ends_with("; artifacts: pg/backup_label (1 B)"));
}

#[test]
fn artifacts_refused_at_release_fail_the_backup_and_abort_everyone() {
    let mut c = releasing(Hold::FilesystemFreeze);
    released(&mut c, "a", release_ok(true));
    let reply = release_ok(true).map(|r| ReleaseReply {
        artifacts_refused: "quiescer pg: artifact backup_label is 70000 bytes, over the limit"
            .into(),
        ..r
    });
    let cmds = released(&mut c, "b", reply);
    let why = "b: the snapshot lacks files its restore needs: quiescer pg: artifact backup_label is 70000 bytes, over the limit";
    assert_eq!(c.record.state, State::Failed { phase: StateName::Snapshotted, reason: why.into() });
    assert_eq!(acts(cmds), aborts(&["a", "b", "c"], why));
    assert_eq!(c.record.servers[1].step, ServerStep::CommitFailed);
}

#[test]
fn artifacts_refused_after_a_lease_thaw_do_not_say_released_and_thawed() {
    let mut c = releasing(Hold::FilesystemFreeze);
    let reply = release_ok(false).map(|r| ReleaseReply {
        reason: "lease of 500ms ran out before release; thawed then, not at release".into(),
        artifacts_refused: "quiescer pg: artifact a/b is not a plain file name".into(),
        ..r
    });
    released(&mut c, "b", reply);
    let detail = &c.record.servers[1].detail;
    assert!(!detail.contains("released"), "it thawed at its lease's end: {detail}");
    assert!(
        detail.starts_with("not held until every snapshot existed: lease of 500ms ran out")
            && detail.ends_with(
                "artifacts were refused: quiescer pg: artifact a/b is not a plain file name"
            ),
        "{detail}"
    );
}
