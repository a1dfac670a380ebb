//! Schedules: a `[[schedule]]` starts backups through StartBackup's path at its due times (the
//! test gives the time: `Cluster::tick_schedules`), skips a busy group, and an operator's
//! suspend and resume hold across a restart.

use stillpoint_listener::config::ScheduleConfig;
use stillpoint_listener::testing::{Cluster, Spec};

use super::*;

fn spec(cron: &str) -> Spec {
    Spec {
        timezone: Some("Europe/Berlin".into()),
        schedules: vec![ScheduleConfig {
            name: "nightly".into(),
            group: "g".into(),
            cron: cron.into(),
            enabled: None,
        }],
        ..Spec::default()
    }
}

async fn schedules(client: &mut Client) -> pb::ListSchedulesResponse {
    client.list_schedules(pb::ListSchedulesRequest {}).await.expect("list schedules").into_inner()
}

async fn nightly(client: &mut Client) -> pb::Schedule {
    let mut list = schedules(client).await.schedules;
    assert_eq!(list.len(), 1, "{list:#?}");
    list.remove(0)
}

async fn backups(client: &mut Client) -> Vec<pb::Backup> {
    let request = pb::ListBackupsRequest::default();
    client.list_backups(request).await.expect("list backups").into_inner().backups
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_starts_a_backup_at_its_time_and_skips_a_busy_group() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), spec("0 22 * * *")).await;
    let mut viewer = cluster.client("viewer");
    let listed = schedules(&mut viewer).await;
    assert_eq!(listed.time_zone, "Europe/Berlin");
    let first = nightly(&mut viewer).await;
    assert_eq!(
        (first.group.as_str(), first.cron.as_str(), first.suspended),
        ("g", "0 22 * * *", false)
    );
    assert!(first.last.is_none(), "{first:#?}");
    assert!(first.next_unix_ms > listed.now_unix_ms, "{first:#?}");
    // A minute before, nothing starts.
    cluster.tick_schedules(first.next_unix_ms - 60_000).await;
    assert!(backups(&mut viewer).await.is_empty());

    cluster.tick_schedules(first.next_unix_ms).await;
    let after = nightly(&mut viewer).await;
    let last = after.last.clone().expect("a last run");
    assert_eq!(
        (last.outcome.as_str(), last.due_unix_ms),
        ("started", first.next_unix_ms),
        "{last:#?}"
    );
    let started = backups(&mut viewer).await;
    assert_eq!(started.len(), 1, "{started:#?}");
    assert_eq!(started[0].backup_id, last.backup_id);
    assert_eq!(started[0].started_by, "schedule:nightly");
    assert_eq!(last.text, format!("started {}", last.backup_id));
    // Next is the following day at 22:00 Berlin time.
    assert_eq!(after.next_unix_ms, first.next_unix_ms + 24 * 3600 * 1000);

    // Copies are reported by the backup software, so the backup waits, SNAPSHOTTED: the group
    // is busy at the next due time, and the start is skipped, naming the backup.
    until(&mut viewer, &last.backup_id, |b| state(b) == pb::BackupState::Snapshotted).await;
    cluster.tick_schedules(after.next_unix_ms).await;
    let skipped = nightly(&mut viewer).await.last.expect("a last run");
    assert_eq!(skipped.outcome, "skipped-busy", "{skipped:#?}");
    assert_eq!(skipped.backup_id, last.backup_id);
    assert_eq!(skipped.text, format!("skipped: group busy with backup {}", last.backup_id));
    assert_eq!(backups(&mut viewer).await.len(), 1, "nothing else started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_and_resume_are_for_operators_and_hold_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), spec("0 */4 * * *")).await;
    let mut viewer = cluster.client("viewer");
    let suspend = || pb::SuspendScheduleRequest { name: "nightly".into() };
    refused(viewer.suspend_schedule(suspend()).await, tonic::Code::PermissionDenied, "");
    let mut operator = cluster.client("operator");
    refused(
        operator.suspend_schedule(pb::SuspendScheduleRequest { name: "weekly".into() }).await,
        tonic::Code::NotFound,
        "unknown schedule \"weekly\"; configured schedules: nightly",
    );
    let due = nightly(&mut viewer).await.next_unix_ms;
    let suspended = operator.suspend_schedule(suspend()).await.expect("suspend").into_inner();
    assert!(suspended.suspended);
    assert_eq!(suspended.next_unix_ms, 0, "a suspended schedule has no next run");
    cluster.tick_schedules(due).await;
    assert!(backups(&mut viewer).await.is_empty(), "a suspended schedule never fires");

    cluster.restart_listener().await;
    let mut viewer = cluster.client("viewer");
    let mut operator = cluster.client("operator");
    assert!(nightly(&mut viewer).await.suspended, "suspended across a restart");
    let resume = pb::ResumeScheduleRequest { name: "nightly".into() };
    let resumed = operator.resume_schedule(resume).await.expect("resume").into_inner();
    assert!(!resumed.suspended);
    let listed = schedules(&mut viewer).await;
    assert!(resumed.next_unix_ms > listed.now_unix_ms - 1000, "{resumed:#?}");
    cluster.tick_schedules(resumed.next_unix_ms).await;
    let last = nightly(&mut viewer).await.last.expect("a last run");
    assert_eq!(last.outcome, "started", "{last:#?}");

    // The last run is kept across a restart too.
    cluster.restart_listener().await;
    let mut viewer = cluster.client("viewer");
    let kept = nightly(&mut viewer).await.last.expect("a last run");
    assert_eq!((kept.outcome, kept.backup_id), (last.outcome, last.backup_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_missed_while_the_listener_was_down_are_reported_once_not_run() {
    let dir = tempfile::tempdir().unwrap();
    // Hourly, half an hour away from now: every due time in the last three hours is well
    // outside the 5-minute catch-up window.
    let now_ms = i64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
    )
    .unwrap();
    let minute = (now_ms / 60_000 + 30) % 60;
    let mut cluster = Cluster::start(dir.path(), spec(&format!("{minute} * * * *"))).await;
    assert!(cluster.shut_down_listener(std::time::Duration::from_secs(30)).await);
    // As if the listener had been down for three hours: the schedule last got to then.
    let file = cluster.config.data_dir.join("schedules.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).expect("the schedules' state")).unwrap();
    state["schedules"]["nightly"]["after"] = serde_json::json!(now_ms - 3 * 3600 * 1000);
    std::fs::write(&file, serde_json::to_vec(&state).unwrap()).unwrap();

    cluster.start_listener().await;
    let mut viewer = cluster.client("viewer");
    // The first tick runs as the listener starts; wait for its report (a few seconds at most).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let last = loop {
        if let Some(last) = nightly(&mut viewer).await.last {
            break last;
        }
        assert!(tokio::time::Instant::now() < deadline, "no report of the missed runs");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!((last.outcome.as_str(), last.missed), ("missed", 3), "{last:#?}");
    assert_eq!(last.text, "missed 3 run(s) while the listener was down");
    assert!(backups(&mut viewer).await.is_empty(), "nothing runs late");
}
