//! Notifications end to end: the real listener in-process with scripted agents
//! (`stillpoint_listener::testing`) sends to a real SMTP server (STARTTLS, AUTH) and a real
//! HTTPS receiver on loopback (`stillpoint_notify::testing`): a backup that really failed, one
//! that really succeeded, and a group without a good backup for longer than it allows.

use std::time::Duration;

use stillpoint_listener::testing::{Cluster, Spec, Step};
use stillpoint_notify::testing::{Receiver, TO};
use stillpoint_notify::On;
use stillpoint_proto as pb;
use tonic::transport::Channel;

type Client = pb::listener_client::ListenerClient<Channel>;

/// Reads backup `id` until `done` holds for it (30 s at most).
async fn until(client: &mut Client, id: &str, done: impl Fn(&pb::Backup) -> bool) -> pb::Backup {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let request = pb::GetBackupRequest { backup_id: id.into() };
        let backup = client.get_backup(request).await.expect("get backup").into_inner();
        if done(&backup) {
            return backup;
        }
        assert!(tokio::time::Instant::now() < deadline, "backup never got there: {backup:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state(backup: &pb::Backup) -> pb::BackupState {
    pb::BackupState::try_from(backup.state).unwrap_or(pb::BackupState::Unspecified)
}

async fn start(client: &mut Client, group: &str) -> String {
    let request = pb::StartBackupRequest { group: group.into(), request_id: String::new() };
    client.start_backup(request).await.expect("start").into_inner().backup_id
}

/// Runs a backup of `group` to SUCCEEDED, the backup software reporting every copy.
async fn succeed(client: &mut Client, group: &str, servers: &[&str]) -> pb::Backup {
    let id = start(client, group).await;
    until(client, &id, |b| state(b) == pb::BackupState::Snapshotted).await;
    for server in servers {
        let report = pb::ReportCopyRequest {
            backup_id: id.clone(),
            server: server.to_string(),
            ok: true,
            detail: "copied to tape".into(),
        };
        client.report_copy(report).await.expect("report copy");
    }
    until(client, &id, |b| state(b) == pb::BackupState::Succeeded).await
}

/// The cluster's default groups (g: srv-a, srv-b; h: srv-c), notifying `receiver`, with a
/// short lease so a prepare that never answers fails the backup in half a second.
fn spec(receiver: &Receiver) -> Spec {
    let mut spec = Spec { notify: Some(receiver.config(On::Both)), ..Spec::default() };
    spec.timeouts.lease_ms = 2_000;
    spec.timeouts.snapshot_budget_ms = 1_000;
    spec.timeouts.margin_ms = 500;
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_and_a_succeeded_backup_are_mailed_and_posted() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("receiver"), 0);
    let cluster = Cluster::start(dir.path(), spec(&receiver)).await;
    let mut client = cluster.client("operator");

    // srv-c never answers Prepare: the backup of h fails in PREPARING at the commit cutoff.
    cluster.agent("srv-c").hold(Step::Prepare);
    let id = start(&mut client, "h").await;
    let failed = until(&mut client, &id, |b| state(b) == pb::BackupState::Failed).await;
    cluster.agent("srv-c").release(Step::Prepare);
    assert_eq!(failed.failed_phase, "PREPARING");

    let mail = receiver.mail(|m| m.subject.contains("FAILED")).await;
    assert_eq!(mail.rcpt_tos, TO);
    assert!(mail.tls, "sent after STARTTLS");
    assert!(mail.subject.starts_with("[stillpoint] backup of h FAILED in PREPARING: "), "{mail:?}");
    for needle in [
        "Group:    h\n".to_string(),
        format!("Backup:   {id}\n"),
        "Phase:    PREPARING\n".to_string(),
        format!("Why:      {}\n", failed.reason),
        "  srv-c [".to_string(),
        "freeze window: no freeze window recorded (it never committed)".to_string(),
    ] {
        assert!(mail.body.contains(&needle), "{needle:?} not in:\n{}", mail.body);
    }
    let hook = receiver.hook(|h| h.json()["kind"] == "backup_failed").await.json();
    assert_eq!(hook["version"], 1);
    assert_eq!(hook["group"], "h");
    assert_eq!(hook["backup_id"], id.as_str());
    assert_eq!(hook["phase"], "PREPARING");
    assert_eq!(hook["reason"], failed.reason.as_str());
    assert_eq!(hook["servers"][0]["server"], "srv-c");

    // A backup of g that succeeds: both servers committed and their copies reported.
    let succeeded = succeed(&mut client, "g", &["srv-a", "srv-b"]).await;
    let mail = receiver.mail(|m| m.subject.contains("succeeded")).await;
    assert_eq!(mail.rcpt_tos, TO);
    assert_eq!(mail.subject, "[stillpoint] backup of g succeeded: 2 servers, 2.0 MiB copied");
    for needle in [
        format!("Backup:   {}\n", succeeded.backup_id),
        "Outcome:  SUCCEEDED\n".to_string(),
        "Copied:   2.0 MiB of 2.0 MiB of snapshots\n".to_string(),
        "  srv-a [cleaned]\n    reported by operator:operator: copied to tape\n    freeze window: frozen for 0ms; writes not known to be held (hold: unknown)\n    copied 1.0 MiB of 1.0 MiB\n".to_string(),
        "  srv-b [cleaned]\n".to_string(),
    ] {
        assert!(mail.body.contains(&needle), "{needle:?} not in:\n{}", mail.body);
    }
    let hook = receiver.hook(|h| h.json()["kind"] == "backup_succeeded").await.json();
    assert_eq!(hook["backup_id"], succeeded.backup_id.as_str());
    assert_eq!(hook["outcome"], "succeeded");
    assert_eq!(hook["bytes_copied"], 2u64 << 20);
    assert_eq!(hook["servers"][1]["state"], "cleaned");
    assert_eq!(hook["servers"][1]["frozen_ms"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_without_a_good_backup_alerts_once_per_lapse() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("receiver"), 0);
    let mut spec = spec(&receiver);
    spec.no_good_backup_after = vec![("h".into(), Duration::from_secs(1))];
    let cluster = Cluster::start(dir.path(), spec).await;
    let mut client = cluster.client("operator");

    // h never had a good backup: the lapse counts from the listener's start.
    let alert = |last_good_known: bool| {
        move |h: &stillpoint_notify::testing::Hook| {
            let json = h.json();
            json["kind"] == "no_good_backup" && json["last_good"].is_null() != last_good_known
        }
    };
    let first = receiver.hook(alert(false)).await.json();
    assert_eq!(first["group"], "h");
    assert_eq!(first["limit_ms"], 1_000);
    assert!(first["for_ms"].as_u64().unwrap() >= 1_000, "{first}");
    let mail = receiver.mail(|m| m.subject.contains("ALERT")).await;
    assert!(
        mail.subject.starts_with("[stillpoint] ALERT: group h has had no good backup for "),
        "{mail:?}"
    );
    assert!(mail.body.contains("none since the listener started watching"), "{}", mail.body);
    // g is not watched.
    assert!(receiver.hooks().iter().all(|h| h.json()["group"] != "g"));

    // A good backup ends the lapse; the next lapse alerts again, naming that backup's end.
    let good = succeed(&mut client, "h", &["srv-c"]).await;
    let second = receiver.hook(alert(true)).await.json();
    assert_eq!(second["group"], "h");
    let finished = stillpoint_notify::render::timestamp(good.finished_unix_ms);
    assert_eq!(second["last_good"], finished.as_str());
    // One alert per lapse: the first lapse was not alerted twice before the good backup.
    let before_good = receiver
        .hooks()
        .iter()
        .filter(|h| h.json()["kind"] == "no_good_backup" && h.json()["last_good"].is_null())
        .count();
    assert_eq!(before_good, 1);
}

/// A scheduled run that starts nothing is a failure people hear of: a due time that finds its
/// group busy, and due times missed while the listener was not running, are mailed and posted
/// as `schedule_missed` with why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_that_did_not_run_is_mailed_and_posted() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&dir.path().join("receiver"), 0);
    let mut spec = spec(&receiver);
    spec.timezone = Some("UTC".into());
    spec.schedules = vec![stillpoint_listener::config::ScheduleConfig {
        name: "nightly".into(),
        group: "g".into(),
        cron: "0 22 * * *".into(),
        enabled: None,
    }];
    let cluster = Cluster::start(dir.path(), spec).await;
    let mut client = cluster.client("operator");
    let list = client.list_schedules(pb::ListSchedulesRequest {}).await.unwrap().into_inner();
    let due = list.schedules[0].next_unix_ms;

    // A backup of g still waits for its copies when the schedule falls due: the start is skipped.
    let busy = start(&mut client, "g").await;
    until(&mut client, &busy, |b| state(b) == pb::BackupState::Snapshotted).await;
    cluster.tick_schedules(due).await;
    let hook = receiver.hook(|h| h.json()["kind"] == "schedule_missed").await.json();
    assert_eq!((hook["version"].as_u64(), hook["group"].as_str()), (Some(1), Some("g")));
    assert_eq!(hook["schedule"], "nightly", "{hook}");
    assert!(hook["reason"].as_str().unwrap_or("").contains(&busy), "{hook}");
    let mail = receiver.mail(|m| m.subject.contains("MISSED")).await;
    assert!(
        mail.subject.starts_with("[stillpoint] MISSED: schedule nightly of group g due "),
        "{mail:?}"
    );
    assert!(mail.body.contains(&busy), "{}", mail.body);

    // Two days later without a tick in between (the listener was down): missed, not run late.
    cluster.tick_schedules(due + 2 * 24 * 3600 * 1000 + 3_600_000).await;
    let missed = receiver
        .hook(|h| {
            h.json()["kind"] == "schedule_missed"
                && h.json()["reason"].as_str().is_some_and(|w| w.contains("not run late"))
        })
        .await
        .json();
    assert_eq!(missed["group"], "g");
}
