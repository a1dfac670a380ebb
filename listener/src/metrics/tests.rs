//! The listener's metrics from records as a backup's steps change them: each backup counted
//! once, phases timed on the listener's clock, one freeze window per snapshotted server.

use stillpoint_core::testing::Exposition;

use super::*;
use crate::coordinator::CopyDone;
use crate::model::StateName;

fn tls() -> TlsFiles {
    // Absent files: the expiry series is left out (and logged), nothing else changes.
    TlsFiles {
        ca: "/nonexistent/ca.pem".into(),
        cert: "/nonexistent/l.pem".into(),
        key: "/x".into(),
    }
}

fn scrape(metrics: &Metrics) -> Exposition {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
    Exposition::parse(&text).unwrap()
}

/// Runs one step: `change` turns the record into what the coordinator made of `event`.
fn check(
    metrics: &Metrics,
    record: &mut BackupRecord,
    now: Millis,
    event: Event,
    change: impl FnOnce(&mut BackupRecord),
) {
    let before = metrics.before(record, &event);
    change(record);
    metrics.after(before, now, record);
}

fn backup() -> BackupRecord {
    BackupRecord::new("b1", "g", &["srv-a".into(), "srv-b".into()], "operator", 0)
}

/// Pending at 0, Prepare sent at 1 000, every server frozen at 1 500, snapshots at 1 800
/// (srv-a held 700 ms, srv-b 600 ms), copies, srv-a copied at 5 000.
fn through_copy(metrics: &Metrics, record: &mut BackupRecord) {
    check(metrics, record, 1_000, Event::Start, |r| {
        r.state = State::Preparing { sent_at: 1_000, cutoff_at: 9_000 };
        r.servers.iter_mut().for_each(|s| s.cut.prepare_sent = Some(1_000));
    });
    check(metrics, record, 1_500, Event::Tick, |r| {
        r.state = State::Committing { sent_at: 1_500, deadline: 9_000 };
        r.servers.iter_mut().for_each(|s| s.cut.commit_sent = Some(1_500));
    });
    check(metrics, record, 1_800, Event::Tick, |r| {
        r.state = State::Copying { deadline: 99_000 };
        for (s, held) in r.servers.iter_mut().zip([700, 600]) {
            s.cut.committed = Some(1_800);
            s.cut.held_ms = held;
            s.step = ServerStep::Copying;
        }
    });
    let done = CopyDone { stored_bytes: Some(300), ..CopyDone::said("saveset") };
    let event = Event::Copied { server: "srv-a".into(), result: Ok(done) };
    check(metrics, record, 5_000, event, |r| {
        let s = r.server_mut("srv-a").unwrap();
        s.step = ServerStep::Cleaning;
        s.total_bytes = 4_096;
        s.copied_bytes = 4_096;
    });
}

#[test]
fn a_succeeded_backup_is_counted_once_with_its_phases_and_freeze_windows() {
    let metrics = Metrics::new(&tls(), &[]);
    let mut record = backup();
    through_copy(&metrics, &mut record);
    let mid = scrape(&metrics);
    assert_eq!(mid.get("stillpoint_backups_running", &[("group", "g")]), Some(1.0));
    assert_eq!(mid.get("stillpoint_backups_total", &[("group", "g")]), None);
    assert_eq!(mid.get("stillpoint_copy_bytes_total", &[("server", "srv-a")]), Some(4_096.0));
    assert_eq!(mid.get("stillpoint_stored_bytes_total", &[("server", "srv-a")]), Some(300.0));
    assert_eq!(mid.get("stillpoint_copy_bytes_total", &[("server", "srv-b")]), None);

    check(&metrics, &mut record, 6_000, Event::Tick, |r| r.state = State::Cleaning { deadline: 1 });
    check(&metrics, &mut record, 6_250, Event::Tick, |r| {
        r.state = State::Succeeded;
        r.finished = Some(6_250);
    });
    // A late reply after the end changes nothing.
    check(&metrics, &mut record, 7_000, Event::Tick, |_| {});

    let end = scrape(&metrics);
    let ok = [("group", "g"), ("state", "SUCCEEDED")];
    assert_eq!(end.get("stillpoint_backups_total", &ok), Some(1.0));
    assert_eq!(end.get("stillpoint_backups_running", &[("group", "g")]), Some(0.0));
    assert_eq!(end.get("stillpoint_last_success_timestamp_seconds", &[("group", "g")]), Some(6.0));
    for (phase, seconds) in [("prepare", 0.5), ("commit", 0.3), ("copy", 4.2), ("cleanup", 0.25)] {
        let labels = [("phase", phase)];
        assert_eq!(end.get("stillpoint_phase_seconds_count", &labels), Some(1.0), "{phase}");
        let sum = end.get("stillpoint_phase_seconds_sum", &labels).unwrap();
        assert!((sum - seconds).abs() < 1e-9, "{phase}: {sum}");
    }
    for (server, seconds) in [("srv-a", 0.7), ("srv-b", 0.6)] {
        let labels = [("server", server)];
        assert_eq!(end.get("stillpoint_freeze_window_seconds_count", &labels), Some(1.0));
        let sum = end.get("stillpoint_freeze_window_seconds_sum", &labels).unwrap();
        assert!((sum - seconds).abs() < 1e-9, "{server}: {sum}");
    }
}

#[test]
fn a_failed_prepare_counts_a_failure_and_no_freeze_window() {
    let metrics = Metrics::new(&tls(), &[]);
    let mut record = backup();
    check(&metrics, &mut record, 1_000, Event::Start, |r| {
        r.state = State::Preparing { sent_at: 1_000, cutoff_at: 9_000 };
    });
    check(&metrics, &mut record, 3_000, Event::Tick, |r| {
        r.state = State::Failed { phase: StateName::Preparing, reason: "slow".into() };
        r.finished = Some(3_000);
    });
    let end = scrape(&metrics);
    assert_eq!(end.get("stillpoint_backups_total", &[("state", "FAILED")]), Some(1.0));
    assert_eq!(end.get("stillpoint_backups_total", &[("state", "SUCCEEDED")]), None);
    assert_eq!(end.get("stillpoint_phase_seconds_sum", &[("phase", "prepare")]), Some(2.0));
    assert_eq!(end.matching("stillpoint_freeze_window_seconds_count", &[]).count(), 0);
    assert_eq!(end.get("stillpoint_last_success_timestamp_seconds", &[("group", "g")]), None);
}

#[test]
fn a_backup_taken_over_mid_copy_times_only_what_it_saw() {
    let metrics = Metrics::new(&tls(), &[]);
    let mut record = backup();
    record.state = State::Copying { deadline: 99_000 };
    check(&metrics, &mut record, 50_000, Event::Restarted, |_| {});
    check(&metrics, &mut record, 52_000, Event::Tick, |r| {
        r.state = State::Cleaning { deadline: 1 }
    });
    let seen = scrape(&metrics);
    assert_eq!(seen.get("stillpoint_backups_running", &[("group", "g")]), Some(1.0));
    assert_eq!(
        seen.matching("stillpoint_phase_seconds_count", &[]).count(),
        0,
        "copy began before"
    );
}

#[test]
fn the_last_success_survives_a_restart_through_the_catalog() {
    let mut older = backup();
    older.state = State::Succeeded;
    older.finished = Some(10_000);
    let mut newer = BackupRecord::new("b2", "g", &[], "operator", 0);
    newer.state = State::Succeeded;
    newer.finished = Some(20_000);
    let mut failed = BackupRecord::new("b3", "g", &[], "operator", 0);
    failed.state = State::Aborted { reason: "no".into() };
    failed.finished = Some(30_000);
    let metrics = Metrics::new(&tls(), &[older, newer, failed]);
    let at = scrape(&metrics).get("stillpoint_last_success_timestamp_seconds", &[("group", "g")]);
    assert_eq!(at, Some(20.0));
}

#[test]
fn agents_are_up_as_the_sweep_found_them() {
    let metrics = Metrics::new(&tls(), &[]);
    let info = |server: &str, reachable| pb::AgentInfo {
        server: server.into(),
        reachable,
        ..Default::default()
    };
    metrics.agents(&[info("srv-a", true), info("srv-b", false)]);
    let seen = scrape(&metrics);
    assert_eq!(seen.get("stillpoint_agent_up", &[("server", "srv-a")]), Some(1.0));
    assert_eq!(seen.get("stillpoint_agent_up", &[("server", "srv-b")]), Some(0.0));
    assert_eq!(seen.matching("stillpoint_build_info", &[]).count(), 1);
}
