//! Every transition of the protocol, including the ugly ones, fed as events with explicit time.

use super::*;

const T: Timeouts = Timeouts {
    lease_ms: 10_000,
    commit_cutoff_ms: 6_000,
    commit_timeout_ms: 10_000,
    copy_timeout_ms: 60_000,
    cleanup_timeout_ms: 5_000,
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

fn copying() -> Coordinator {
    let mut c = committing();
    for s in ["a", "b", "c"] {
        committed(&mut c, 40, s);
    }
    assert_eq!(c.record.state.name(), StateName::Copying);
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
    let want: Vec<_> = ["a", "b", "c"].map(|s| Command::Commit { server: s.into() }).into();
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
    assert_eq!(logs(&cmds), vec!["late prepare reply ignored"]);
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
    let cmds = acts(c.handle(50, Event::Copied { server: "b".into(), result: Ok(String::new()) }));
    assert_eq!(
        cmds,
        vec![Command::Cleanup { server: "b".into() }],
        "cleanup as soon as that server's copy is safe"
    );
    c.handle(51, Event::CleanedUp { server: "b".into(), result: Ok(1) });
    c.handle(52, Event::Copied { server: "a".into(), result: Ok(String::new()) });
    c.handle(53, Event::Copied { server: "c".into(), result: Ok(String::new()) });
    assert_eq!(c.record.state.name(), StateName::Cleaning);
    c.handle(54, Event::CleanedUp { server: "a".into(), result: Ok(1) });
    c.handle(55, Event::CleanedUp { server: "c".into(), result: Err("agent gone".into()) });
    assert_eq!(c.record.state, State::Succeeded);
    assert_eq!(c.record.finished, Some(55));
}

#[test]
fn a_failed_copy_fails_the_backup_and_removes_the_snapshots() {
    let mut c = copying();
    let cmds =
        c.handle(60, Event::Copied { server: "a".into(), result: Err("exit status 1".into()) });
    let State::Failed { phase, reason } = &c.record.state else { panic!() };
    assert_eq!(*phase, StateName::Copying);
    assert_eq!(reason, "a: copy failed: exit status 1");
    assert_eq!(acts(cmds).len(), 3);
    let cmds = acts(c.handle(61, Event::Copied { server: "b".into(), result: Ok(String::new()) }));
    assert!(cmds.is_empty(), "no cleanup, no success after failure");
}

#[test]
fn copy_reports_for_servers_not_copying_are_refused() {
    let mut c = committing();
    let cmds = c.handle(40, Event::Copied { server: "a".into(), result: Ok(String::new()) });
    assert!(acts(cmds).is_empty());
    assert_eq!(c.record.state.name(), StateName::Committing);
}

#[test]
fn a_copy_that_takes_too_long_fails() {
    let mut c = copying();
    c.handle(50, Event::Copied { server: "a".into(), result: Ok(String::new()) });
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
}
