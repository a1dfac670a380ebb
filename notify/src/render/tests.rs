//! What a reader of the e-mail and a webhook receiver get: names, phase, why, freeze window,
//! sizes in human units, and the versioned JSON.

use std::time::Duration;

use stillpoint_protocol::hold::Hold;
use stillpoint_protocol::model::{BackupRecord, CutVerdict, ServerStep, State, StateName};

use super::*;
use crate::event::Event;

const T0: i64 = 1_764_770_400_000; // 2025-12-03T14:00:00Z

fn record(state: State) -> BackupRecord {
    let servers = ["srv-a".to_string(), "srv-b".to_string()];
    let mut r = BackupRecord::new("20251203T140000Z-abcdef", "g", &servers, "operator", T0);
    r.state = state;
    r.finished = Some(T0 + 83_000);
    r
}

#[test]
fn a_failure_names_group_server_phase_and_why() {
    let mut r = record(State::Failed {
        phase: StateName::Preparing,
        reason: "srv-b did not prepare: quiescer postgres: connection refused".into(),
    });
    r.servers[1].step = ServerStep::PrepareFailed;
    r.servers[1].detail = "quiescer postgres: connection refused".into();
    r.servers[0].step = ServerStep::Aborted;
    let m = Message::of(&Event::from_record(&r).unwrap());
    assert_eq!(m.kind, "backup_failed");
    assert_eq!(
        m.subject,
        "[stillpoint] backup of g FAILED in PREPARING: srv-b: srv-b did not prepare: quiescer postgres: connection refused"
    );
    for needle in [
        "Group:    g\n",
        "Backup:   20251203T140000Z-abcdef\n",
        "Outcome:  FAILED\n",
        "Phase:    PREPARING\n",
        "Why:      srv-b did not prepare",
        "Started:  2025-12-03T14:00:00Z\n",
        "Finished: 2025-12-03T14:01:23Z (took 1m 23s)\n",
        "Copied:   nothing (no copy began)\n",
        "  srv-b [prepare-failed]\n    quiescer postgres: connection refused\n",
        "no freeze window recorded (it never committed)",
    ] {
        assert!(m.text.contains(needle), "{needle:?} not in:\n{}", m.text);
    }
    // The failed server is listed first.
    assert!(m.text.find("srv-b [").unwrap() < m.text.find("srv-a [").unwrap());
    let j = &m.json;
    assert_eq!(j["version"], 1);
    assert_eq!(j["kind"], "backup_failed");
    assert_eq!(j["outcome"], "failed");
    assert_eq!(j["phase"], "PREPARING");
    assert_eq!(j["failed_servers"], serde_json::json!(["srv-b"]));
    assert_eq!(j["duration_ms"], 83_000);
    assert_eq!(j["bytes_copied"], serde_json::Value::Null);
    assert_eq!(j["servers"][1]["state"], "prepare-failed");
    assert_eq!(j["subject"], m.subject);
}

#[test]
fn a_success_says_the_freeze_window_and_the_size() {
    let mut r = record(State::Succeeded);
    r.verdict = Some(CutVerdict { consistent: true, text: "every server frozen at once".into() });
    for (s, hold) in r.servers.iter_mut().zip([Hold::FilesystemFreeze, Hold::StorageOnly]) {
        s.step = ServerStep::Cleaned;
        s.cut.committed = Some(T0 + 900);
        s.cut.held_ms = 412;
        s.cut.hold = Some(hold);
        s.copied_bytes = 3 << 29;
        s.total_bytes = 3 << 29;
    }
    let m = Message::of(&Event::from_record(&r).unwrap());
    assert_eq!(m.subject, "[stillpoint] backup of g succeeded: 2 servers, 3.0 GiB copied");
    for needle in [
        "Outcome:  SUCCEEDED\n",
        "Copied:   3.0 GiB of 3.0 GiB of snapshots\n",
        "Stored:   not known",
        "Cut:      consistent: every server frozen at once\n",
        "  srv-a [cleaned]\n    freeze window: writes held 412ms\n    copied 1.5 GiB of 1.5 GiB\n",
        "freeze window: frozen for 412ms; writes not known to be held (hold: storage-only)",
    ] {
        assert!(m.text.contains(needle), "{needle:?} not in:\n{}", m.text);
    }
    let j = &m.json;
    assert_eq!(j["outcome"], "succeeded");
    assert_eq!(j["reason"], serde_json::Value::Null);
    assert_eq!(j["bytes_copied"], 3u64 << 30);
    assert_eq!(j["bytes_stored"], serde_json::Value::Null);
    assert_eq!(j["cut_consistent"], true);
    assert_eq!(j["servers"][0]["frozen_ms"], 412);
    assert_eq!(j["servers"][0]["writes_held"], true);
    assert_eq!(j["servers"][1]["hold"], "storage-only");
    assert_eq!(j["servers"][1]["writes_held"], false);
}

#[test]
fn an_abort_is_a_failure_without_a_phase() {
    let r = record(State::Aborted { reason: "aborted by operator".into() });
    let event = Event::from_record(&r).unwrap();
    assert!(event.is_failure());
    let m = Message::of(&event);
    assert_eq!(m.subject, "[stillpoint] backup of g FAILED in aborted: aborted by operator");
    assert_eq!(m.json["outcome"], "aborted");
    assert_eq!(m.json["phase"], serde_json::Value::Null);
}

#[test]
fn a_backup_in_flight_is_no_event() {
    assert_eq!(Event::from_record(&record(State::Pending)), None);
    assert_eq!(Event::from_record(&record(State::Copying { deadline: 0 })), None);
}

#[test]
fn an_alert_says_since_when_and_how_long() {
    let event = Event::NoGoodBackup(crate::NoGoodBackup {
        group: "db".into(),
        last_good: None,
        since: T0,
        for_how_long: Duration::from_secs(26 * 3600 + 180),
        limit: Duration::from_secs(26 * 3600),
    });
    let m = Message::of(&event);
    assert_eq!(m.subject, "[stillpoint] ALERT: group db has had no good backup for 1d 2h");
    assert!(m.text.contains("longer than its no_good_backup_after (1d 2h)"), "{}", m.text);
    assert!(m.text.contains("none since the listener started watching at 2025-12-03T14:00:00Z"));
    assert_eq!(m.json["kind"], "no_good_backup");
    assert_eq!(m.json["last_good"], serde_json::Value::Null);
    assert_eq!(m.json["for_ms"], (26 * 3600 + 180) * 1000);
}

#[test]
fn a_missed_schedule_says_which_when_and_why() {
    let event = Event::ScheduleMissed(crate::ScheduleMissed {
        schedule: "nightly".into(),
        group: "db".into(),
        due: T0,
        why: "the listener was down".into(),
    });
    assert!(event.is_failure());
    let m = Message::of(&event);
    assert_eq!(
        m.subject,
        "[stillpoint] MISSED: schedule nightly of group db due 2025-12-03T14:00:00Z"
    );
    assert!(m.text.contains("Why: the listener was down"));
    assert_eq!(m.json["kind"], "schedule_missed");
    assert_eq!(m.json["due"], "2025-12-03T14:00:00Z");
    assert_eq!(m.json["reason"], "the listener was down");
}

#[test]
fn human_units() {
    assert_eq!(bytes(0), "0 B");
    assert_eq!(bytes(1023), "1023 B");
    assert_eq!(bytes(1536), "1.5 KiB");
    assert_eq!(bytes(1 << 20), "1.0 MiB");
    assert_eq!(duration(Duration::from_millis(850)), "850ms");
    assert_eq!(duration(Duration::from_millis(12_340)), "12.3s");
    assert_eq!(duration(Duration::from_secs(250)), "4m 10s");
    assert_eq!(duration(Duration::from_secs(3600)), "1h");
    assert_eq!(duration(Duration::from_secs(26 * 3600)), "1d 2h");
}
