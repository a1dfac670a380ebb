//! The `--json` shapes are pinned key by key so they cannot drift silently (scripts and backup
//! software parse them), and the human renderings of the cut, the list and watch lines are
//! pinned as text.

use serde_json::Value;
use stillpoint_proto::{
    AgentBackup, AgentInfo, Backup, BackupState, Cut, LogEntry, ServerCut, ServerProgress,
    Snapshot, StepReport, WatchEvent,
};

use super::*;

const T0: i64 = 1_714_566_896_789; // 2024-05-01T12:34:56.789Z

fn sample() -> Backup {
    Backup {
        backup_id: "b-1".into(),
        group: "payroll".into(),
        state: BackupState::Succeeded as i32,
        reason: String::new(),
        failed_phase: String::new(),
        created_unix_ms: T0,
        finished_unix_ms: T0 + 12_345,
        started_by: "hook:netbackup".into(),
        servers: vec![ServerProgress {
            server: "srv-a".into(),
            phase: "cleaned".into(),
            detail: String::new(),
            snapshots: vec![Snapshot {
                volume: "data".into(),
                provider: "mock-san".into(),
                locator: "/san/snapshots/b-1/srv-a/data.lun".into(),
                size_bytes: 1 << 20,
            }],
            copied_bytes: 1 << 20,
            total_bytes: 1 << 20,
            artifacts: vec![stillpoint_proto::ArtifactInfo {
                quiescer: "pg".into(),
                name: "backup_label".into(),
                size_bytes: 230,
            }],
        }],
        cut: Some(Cut {
            checked: true,
            consistent: true,
            verdict: "every server was frozen at one instant".into(),
            servers: vec![
                server_cut("srv-a", T0 + 1, [T0 + 15, T0 + 20, T0 + 31]),
                server_cut("srv-b", T0 + 2, [T0 + 18, T0 + 21, T0 + 40]),
            ],
        }),
        settled: true,
        unconfirmed: Vec::new(),
        pinned: false,
        expired_unix_ms: 0,
    }
}

fn server_cut(server: &str, sent: i64, [prepared, commit_sent, committed]: [i64; 3]) -> ServerCut {
    ServerCut {
        server: server.into(),
        prepare_sent_unix_ms: sent,
        prepared_unix_ms: prepared,
        commit_sent_unix_ms: commit_sent,
        committed_unix_ms: committed,
        quiesce_ms: 3,
        freeze_ms: 1,
        held_ms: 17,
        snapshot_ms: 5,
        thaw_ms: 1,
        steps: vec![StepReport {
            name: "fsfreeze".into(),
            action: "freeze".into(),
            ok: true,
            duration_ms: 1,
            detail: String::new(),
        }],
        hold: HoldClass::FilesystemFreeze.into(),
        held_until_release: None,
    }
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> =
        value.as_object().expect("a JSON object").keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

fn to_value<T: serde::Serialize>(view: &T) -> Value {
    serde_json::from_str(&json(view)).unwrap()
}

/// Asserts the object's exact key set (order-insensitive).
fn check_keys(value: &Value, expected: &[&str]) {
    let mut expected = expected.to_vec();
    expected.sort_unstable();
    assert_eq!(keys(value), expected, "in {value}");
}

#[test]
fn backup_json_shape_is_stable() {
    let v = to_value(&BackupView::from(&sample()));
    check_keys(
        &v,
        &[
            "backup_id",
            "group",
            "state",
            "terminal",
            "settled",
            "unconfirmed",
            "reason",
            "failed_phase",
            "started_by",
            "created_unix_ms",
            "created",
            "finished_unix_ms",
            "finished",
            "duration_ms",
            "servers",
            "cut",
            "pinned",
            "expired_unix_ms",
            "expired",
        ],
    );
    check_keys(
        &v["servers"][0],
        &["server", "phase", "detail", "snapshots", "copied_bytes", "total_bytes", "artifacts"],
    );
    check_keys(&v["servers"][0]["snapshots"][0], &["volume", "provider", "locator", "size_bytes"]);
    check_keys(&v["servers"][0]["artifacts"][0], &["quiescer", "name", "size_bytes"]);
    check_keys(&v["cut"], &["checked", "consistent", "verdict", "servers"]);
    check_keys(
        &v["cut"]["servers"][0],
        &[
            "server",
            "prepare_sent_unix_ms",
            "prepare_sent",
            "prepared_unix_ms",
            "prepared",
            "commit_sent_unix_ms",
            "commit_sent",
            "committed_unix_ms",
            "committed",
            "quiesce_ms",
            "freeze_ms",
            "held_ms",
            "snapshot_ms",
            "thaw_ms",
            "steps",
            "hold",
            "writes_held",
            "held_until_release",
        ],
    );
    check_keys(
        &v["cut"]["servers"][0]["steps"][0],
        &["name", "action", "ok", "duration_ms", "detail"],
    );

    assert_eq!(v["state"], "SUCCEEDED");
    assert_eq!(v["terminal"], true);
    assert_eq!(v["reason"], Value::Null);
    assert_eq!(v["created_unix_ms"], T0);
    assert_eq!(v["created"], "2024-05-01T12:34:56.789Z");
    assert_eq!(v["finished"], "2024-05-01T12:35:09.134Z");
    assert_eq!(v["duration_ms"], 12_345);
    assert_eq!(v["servers"][0]["detail"], Value::Null);
    assert_eq!(v["cut"]["servers"][1]["committed"], "2024-05-01T12:34:56.829Z");
}

#[test]
fn unset_times_and_cut_are_null_and_states_are_named() {
    let b = Backup {
        backup_id: "b-2".into(),
        state: BackupState::Failed as i32,
        reason: "srv-b: lease expired after 10000ms".into(),
        failed_phase: "COMMITTING".into(),
        created_unix_ms: T0,
        ..Backup::default()
    };
    let v = to_value(&BackupView::from(&b));
    assert_eq!(v["state"], "FAILED");
    assert_eq!(v["reason"], "srv-b: lease expired after 10000ms");
    assert_eq!(v["failed_phase"], "COMMITTING");
    for key in ["finished_unix_ms", "finished", "duration_ms", "cut", "started_by"] {
        assert_eq!(v[key], Value::Null, "{key}");
    }
    assert_eq!(state_name(0), "UNSPECIFIED");
    assert_eq!(state_name(BackupState::Snapshotted as i32), "SNAPSHOTTED");
    assert_eq!(state_name(99), "UNKNOWN(99)");
}

#[test]
fn log_watch_and_agent_json_shapes_are_stable() {
    let entry = LogEntry {
        unix_ms: T0,
        server: String::new(),
        level: "info".into(),
        message: "backup started".into(),
        state: BackupState::Preparing as i32,
        seq: 1,
    };
    let v = to_value(&LogEntryView::from(&entry));
    check_keys(&v, &["seq", "unix_ms", "time", "server", "level", "message", "state"]);
    assert_eq!((v["server"].clone(), v["state"].clone()), (Value::Null, Value::from("PREPARING")));

    let event = WatchEvent { entry: Some(entry), backup: Some(sample()), backup_id: "b-1".into() };
    let v = to_value(&WatchEventView::from(&event));
    check_keys(&v, &["backup_id", "entry", "backup"]);
    assert_eq!(v["backup"]["backup_id"], "b-1");

    let agent = AgentInfo {
        server: "srv-a".into(),
        address: "https://10.0.0.5:7444".into(),
        groups: vec!["payroll".into()],
        reachable: true,
        error: String::new(),
        version: "0.1.0".into(),
        backups: vec![AgentBackup {
            backup_id: "b-1".into(),
            phase: stillpoint_proto::AgentPhase::Frozen as i32,
            lease_remaining_ms: 9_000,
            snapshots: vec![],
            detail: String::new(),
        }],
    };
    let v = to_value(&AgentView::from(&agent));
    check_keys(&v, &["server", "address", "groups", "reachable", "error", "version", "backups"]);
    check_keys(
        &v["backups"][0],
        &["backup_id", "phase", "lease_remaining_ms", "snapshots", "detail"],
    );
}

#[test]
fn cut_renders_offsets_from_the_first_prepare_sent() {
    let cut = sample().cut.unwrap();
    let expected = "\
cut: consistent: every server was frozen at one instant
SERVER  PREPARE_SENT  PREPARED  COMMIT_SENT  COMMITTED  HELD_MS  QUIESCE_MS  FREEZE_MS  SNAPSHOT_MS  THAW_MS  HOLD
srv-a   +0            +14       +19          +30        17       3           1          5            1        filesystem-freeze
srv-b   +1            +17       +20          +39        17       3           1          5            1        filesystem-freeze
(step times in ms after the first prepare sent, on the listener's clock)
";
    assert_eq!(cut_human(&cut, BackupState::Succeeded as i32), expected);

    let unchecked = Cut { checked: false, ..Cut::default() };
    assert_eq!(cut_human(&unchecked, BackupState::Preparing as i32), "cut: not checked yet\n");
    let torn = Cut {
        checked: true,
        consistent: false,
        verdict: "srv-b thawed before srv-a froze".into(),
        servers: vec![ServerCut { server: "srv-a".into(), ..ServerCut::default() }],
    };
    let torn = cut_human(&torn, BackupState::Succeeded as i32);
    assert!(torn.starts_with("cut: NOT CONSISTENT: srv-b thawed before srv-a froze\n"));
    assert!(torn.contains("\nsrv-a   -             -"));
}

#[test]
fn a_cut_that_will_never_be_judged_says_why_not_that_it_is_pending() {
    for (state, name) in [(BackupState::Failed, "FAILED"), (BackupState::Aborted, "ABORTED")] {
        let mut backup = sample();
        backup.state = state as i32;
        backup.cut = Some(Cut { checked: false, verdict: String::new(), ..sample().cut.unwrap() });
        let text = backup_human(&backup);
        assert!(!text.contains("not checked yet"), "{text}");
        let expected = format!(
            "cut: never judged: the backup ended {name} before every server was snapshotted\n"
        );
        assert!(text.contains(&expected), "{text}");
    }
    // The listener's own words, when it gives them.
    let mut backup = sample();
    backup.state = BackupState::Failed as i32;
    let why = "never judged: the backup failed while PREPARING before every server was snapshotted";
    backup.cut = Some(Cut { checked: false, verdict: why.into(), ..Cut::default() });
    let text = backup_human(&backup);
    assert!(text.contains(&format!("cut: {why}\n")), "{text}");
    assert_eq!(text.matches("never judged").count(), 1, "said once: {text}");
    // In flight, the cut is still to come.
    let mut backup = sample();
    backup.state = BackupState::Preparing as i32;
    backup.cut = Some(Cut { checked: false, ..Cut::default() });
    assert!(backup_human(&backup).contains("cut: not checked yet\n"));
}

#[test]
fn agents_show_as_active_only_what_the_agent_still_holds() {
    let held = |id: &str, phase: &str, snapshots: usize| AgentBackup {
        backup_id: id.into(),
        phase: (0..=8)
            .find(|&n| stillpoint_proto::AgentPhase::try_from(n).is_ok_and(|p| p.label() == phase))
            .expect("a phase name"),
        lease_remaining_ms: 0,
        snapshots: (0..snapshots)
            .map(|_| Snapshot { volume: "data".into(), ..Snapshot::default() })
            .collect(),
        detail: String::new(),
    };
    let mut backups = vec![
        held("b-prep", "preparing", 0),
        held("b-frozen", "frozen", 0),
        held("b-snap", "snapshotted", 1),
        held("b-orphan", "orphan", 1),
        // A failed backup whose snapshots are still there is still held.
        held("b-failed-held", "failed", 1),
    ];
    for (i, phase) in ["thawed-expired", "aborted", "failed", "cleaned"].iter().cycle().enumerate()
    {
        if i == 100 {
            break;
        }
        backups.push(held(&format!("b-done-{i}"), phase, 0));
    }
    let agent = AgentInfo {
        server: "srv-a".into(),
        address: "https://10.0.0.5:7444".into(),
        groups: vec!["payroll".into()],
        reachable: true,
        error: String::new(),
        version: "0.1.0".into(),
        backups,
    };
    let text = agents_human(std::slice::from_ref(&agent));
    let row = text.lines().nth(1).unwrap();
    assert!(
        row.ends_with(
            "b-prep (preparing), b-frozen (frozen), b-snap (snapshotted), b-orphan (orphan), \
             b-failed-held (failed)"
        ),
        "{text}"
    );
    assert!(!text.contains("b-done"), "{text}");

    // An agent holding nothing shows a dash; JSON keeps every entry.
    let idle = AgentInfo { backups: agent.backups[5..].to_vec(), ..agent.clone() };
    assert!(agents_human(&[idle]).lines().nth(1).unwrap().ends_with("  -"));
    assert_eq!(to_value(&AgentView::from(&agent))["backups"].as_array().unwrap().len(), 105);
}

#[test]
fn status_and_list_render() {
    let text = backup_human(&sample());
    assert!(text.starts_with("backup    b-1\ngroup     payroll\nstate     SUCCEEDED\n"), "{text}");
    assert!(text.contains("finished  2024-05-01T12:35:09Z (12.3s)\n"), "{text}");
    assert!(text.contains("srv-a   cleaned  -       data       1.0 MiB/1.0 MiB\n"), "{text}");
    assert!(text.contains("cut: consistent"), "{text}");

    let list = list_human(&[sample()]);
    let expected = "\
ID   GROUP    STATE      CREATED               DURATION  CONSISTENT  REASON
b-1  payroll  SUCCEEDED  2024-05-01T12:34:56Z  12.3s     yes         -
";
    assert_eq!(list, expected);
}

#[test]
fn watch_lines_show_entries_and_phase_changes_only() {
    let mut progress = Progress::default();
    let mut backup = sample();
    backup.servers[0].phase = "frozen".into();
    backup.servers[0].detail = "lease 10s".into();
    let event = |message: &str, backup: &Backup| WatchEvent {
        entry: Some(LogEntry {
            unix_ms: T0,
            server: "srv-a".into(),
            level: "info".into(),
            message: message.into(),
            state: BackupState::Preparing as i32,
            seq: 1,
        }),
        backup: Some(backup.clone()),
        backup_id: backup.backup_id.clone(),
    };
    assert_eq!(
        progress.lines(&event("frozen", &backup)),
        ["12:34:56.789  PREPARING    srv-a  frozen", "  srv-a: frozen (lease 10s)"]
    );
    assert_eq!(
        progress.lines(&event("still frozen", &backup)),
        ["12:34:56.789  PREPARING    srv-a  still frozen"]
    );
}

#[test]
fn sizes_and_durations_read_well() {
    assert_eq!(human_bytes(512), "512 B");
    assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    assert_eq!(human_duration(850), "850ms");
    assert_eq!(human_duration(12_345), "12.3s");
    assert_eq!(human_duration(245_000), "4m05s");
    assert_eq!(human_duration(7_380_000), "2h03m");
    assert_eq!(rfc3339(0), None);
    assert_eq!(clock(T0), "12:34:56.789");
}

#[test]
fn a_server_whose_hold_holds_nothing_is_never_shown_as_holding_writes() {
    let mut cut = sample().cut.unwrap();
    cut.servers[1].hold = HoldClass::HookUnverified.into();
    let text = cut_human(&cut, BackupState::Succeeded as i32);
    assert!(text.contains("17 (not known held)") && text.contains("hook-unverified"), "{text}");
    assert!(text.contains("writes not known to be held on srv-b:"), "{text}");
    assert!(text.starts_with("cut: consistent in message order only: "), "{text}");
    let mut backup = sample();
    backup.cut = Some(cut.clone());
    assert!(list_human(&[backup.clone()]).contains("order only"));
    for s in &mut backup.cut.as_mut().unwrap().servers {
        s.held_until_release = Some(true);
    }
    assert!(list_human(&[backup]).contains("yes"), "the barrier held every server");
    let v = to_value(&CutView::from(&cut));
    assert_eq!(v["servers"][0]["writes_held"], Value::Bool(true));
    assert_eq!(v["servers"][1]["writes_held"], Value::Bool(false));
    assert_eq!(v["servers"][1]["hold"], "hook-unverified");
    cut.servers[1].hold = HoldClass::Unspecified.into();
    let v = to_value(&CutView::from(&cut));
    assert_eq!(v["servers"][1]["hold"], Value::Null, "unknown, not guessed");
}

#[test]
fn status_says_whether_an_ended_backup_is_settled_and_whom_it_gave_up_on() {
    let mut backup = sample();
    assert!(backup_human(&backup).contains("settled   yes\n"), "{}", backup_human(&backup));
    backup.settled = false;
    assert!(backup_human(&backup).contains("settled   not yet"), "{}", backup_human(&backup));
    backup.settled = true;
    backup.unconfirmed = vec!["srv-b: abort never confirmed; it may hold snapshots".into()];
    let text = backup_human(&backup);
    assert!(text.contains("settled   yes, giving up on:\n"), "{text}");
    assert!(text.contains("            srv-b: abort never confirmed"), "{text}");
    let v = to_value(&BackupView::from(&backup));
    assert_eq!(v["settled"], true);
    assert_eq!(v["unconfirmed"][0], "srv-b: abort never confirmed; it may hold snapshots");
    backup.state = BackupState::Copying as i32;
    assert!(!backup_human(&backup).contains("settled"), "a running backup is not judged");
}

#[test]
fn ids_are_shortened_only_where_unambiguous() {
    let ids =
        ["20261203T131500Z-abc123", "20261202T220000Z-0f9e8d", "20261201T220000Z-abc123", "b-1"];
    assert_eq!(
        short_ids(&ids),
        vec![
            "20261203T131500Z-abc123".to_string(),
            "0f9e8d".into(),
            "20261201T220000Z-abc123".into(),
            "b-1".into(),
        ]
    );
    assert!(is_full_id("20261203T131500Z-abc123"));
    assert!(!is_full_id("abc123") && !is_full_id("20261203T131500Z-abc12") && !is_full_id("b-1"));
}
