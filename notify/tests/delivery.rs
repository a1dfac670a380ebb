//! Delivery against real servers on loopback (`stillpoint_notify::testing`): an SMTP server
//! requiring STARTTLS and AUTH, and an HTTPS receiver requiring a bearer token. What people
//! and programs receive for a failure, a success, a no-good-backup alert and a missed schedule.

use std::time::Duration;

use stillpoint_notify::email::EmailTarget;
use stillpoint_notify::testing::{Receiver, FROM, TO, USER};
use stillpoint_notify::{Event, Message, NoGoodBackup, Notifier, On, ScheduleMissed};
use stillpoint_protocol::model::{BackupRecord, ServerStep, State, StateName};
use tokio_util::sync::CancellationToken;

const T0: i64 = 1_764_770_400_000; // 2025-12-03T14:00:00Z

fn backup(state: State) -> Event {
    let servers = ["db-1".to_string(), "app-1".to_string()];
    let mut r = BackupRecord::new("20251203T140000Z-abcdef", "prod", &servers, "operator", T0);
    let failed = matches!(state, State::Failed { .. });
    r.state = state;
    r.finished = Some(T0 + 65_000);
    for s in &mut r.servers {
        s.step = if failed { ServerStep::Aborted } else { ServerStep::Cleaned };
        s.cut.committed = (!failed).then_some(T0 + 1_000);
        s.cut.held_ms = 250;
        s.copied_bytes = if failed { 0 } else { 5 << 20 };
        s.total_bytes = s.copied_bytes;
    }
    if failed {
        r.servers[0].step = ServerStep::PrepareFailed;
        r.servers[0].detail = "quiescer postgres: connection refused".into();
    }
    Event::from_record(&r).expect("terminal")
}

fn failure() -> Event {
    backup(State::Failed {
        phase: StateName::Preparing,
        reason: "db-1 did not prepare: quiescer postgres: connection refused".into(),
    })
}

fn alert() -> Event {
    Event::NoGoodBackup(NoGoodBackup {
        group: "prod".into(),
        last_good: Some(T0),
        since: T0,
        for_how_long: Duration::from_secs(27 * 3600),
        limit: Duration::from_secs(26 * 3600),
    })
}

fn missed() -> Event {
    Event::ScheduleMissed(ScheduleMissed {
        schedule: "nightly".into(),
        group: "prod".into(),
        due: T0,
        why: "the listener was not running at 14:00".into(),
    })
}

fn start(receiver: &Receiver, on: On) -> (Notifier, CancellationToken) {
    let (notifier, workers) = Notifier::new(&receiver.config(on)).expect("notifier");
    let stop = CancellationToken::new();
    workers.spawn(stop.clone());
    (notifier, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_a_success_an_alert_and_a_missed_schedule_reach_every_recipient_and_the_webhook()
{
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 0);
    let (notifier, _stop) = start(&receiver, On::Both);
    for event in [failure(), backup(State::Succeeded), alert(), missed()] {
        notifier.send(&event);
    }

    let mail = receiver.mail(|m| m.subject.contains("FAILED")).await;
    assert_eq!(mail.rcpt_tos, TO);
    assert_eq!(mail.to, TO.join(", "));
    assert_eq!(mail.from, FROM);
    assert!(mail.tls, "sent after STARTTLS");
    assert_eq!(mail.login.as_deref(), Some(USER));
    assert_eq!(
        mail.subject,
        "[stillpoint] backup of prod FAILED in PREPARING: db-1: db-1 did not prepare: quiescer postgres: connection refused"
    );
    for needle in [
        "Group:    prod",
        "Phase:    PREPARING",
        "Why:      db-1 did not prepare: quiescer postgres: connection refused",
        "db-1 [prepare-failed]\n    quiescer postgres: connection refused",
        "freeze window: no freeze window recorded",
    ] {
        assert!(mail.body.contains(needle), "{needle:?} not in:\n{}", mail.body);
    }

    let mail = receiver.mail(|m| m.subject.contains("succeeded")).await;
    assert_eq!(mail.rcpt_tos, TO);
    assert_eq!(mail.subject, "[stillpoint] backup of prod succeeded: 2 servers, 10.0 MiB copied");
    for needle in [
        "Outcome:  SUCCEEDED",
        "Finished: 2025-12-03T14:01:05Z (took 1m 5s)",
        "Copied:   10.0 MiB of 10.0 MiB of snapshots",
        "db-1 [cleaned]\n    freeze window: frozen for 250ms; writes not known to be held (hold: unknown)",
    ] {
        assert!(mail.body.contains(needle), "{needle:?} not in:\n{}", mail.body);
    }

    let mail = receiver.mail(|m| m.subject.contains("ALERT")).await;
    assert_eq!(mail.subject, "[stillpoint] ALERT: group prod has had no good backup for 1d 3h");
    assert!(mail.body.contains("Last good backup: finished 2025-12-03T14:00:00Z"), "{}", mail.body);
    let mail = receiver.mail(|m| m.subject.contains("MISSED")).await;
    assert_eq!(
        mail.subject,
        "[stillpoint] MISSED: schedule nightly of group prod due 2025-12-03T14:00:00Z"
    );
    assert!(mail.body.contains("Why: the listener was not running at 14:00"), "{}", mail.body);

    let kinds = ["backup_failed", "backup_succeeded", "no_good_backup", "schedule_missed"];
    for kind in kinds {
        let hook = receiver.hook(|h| h.json()["kind"] == kind).await;
        assert_eq!(hook.status, 200);
        assert_eq!(hook.path, "/hook");
        assert_eq!(hook.authorization.as_deref(), Some("Bearer webhook-token-123"));
        assert_eq!(hook.content_type.as_deref(), Some("application/json"));
        let json = hook.json();
        assert_eq!(json["version"], 1);
        assert_eq!(json["group"], "prod");
    }
    let failed = receiver.hook(|h| h.json()["kind"] == "backup_failed").await.json();
    assert_eq!(failed["phase"], "PREPARING");
    assert_eq!(failed["failed_servers"], serde_json::json!(["db-1"]));
    assert_eq!(failed["servers"][0]["detail"], "quiescer postgres: connection refused");
    let succeeded = receiver.hook(|h| h.json()["kind"] == "backup_succeeded").await.json();
    assert_eq!(succeeded["bytes_copied"], 10u64 << 20);
    assert_eq!(succeeded["servers"][1]["frozen_ms"], 250);
    assert_eq!(succeeded["duration_ms"], 65_000);
    let alert = receiver.hook(|h| h.json()["kind"] == "no_good_backup").await.json();
    assert_eq!(alert["last_good"], "2025-12-03T14:00:00Z");
    assert_eq!(alert["for_ms"], 27 * 3600 * 1000);
    let missed = receiver.hook(|h| h.json()["kind"] == "schedule_missed").await.json();
    assert_eq!(missed["schedule"], "nightly");
    assert_eq!(missed["due"], "2025-12-03T14:00:00Z");
    // Exactly one of each, to each target.
    assert_eq!(receiver.mails().len(), 4);
    assert_eq!(receiver.hooks().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_sends_no_success() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 0);
    let (notifier, _stop) = start(&receiver, On::Failure);
    // In this order: each target's queue is first in, first out, so once the failure arrived
    // a success sent would have arrived before it.
    notifier.send(&backup(State::Succeeded));
    notifier.send(&failure());
    receiver.mail(|m| m.subject.contains("FAILED")).await;
    receiver.hook(|h| h.json()["kind"] == "backup_failed").await;
    assert_eq!(receiver.mails().len(), 1, "{:#?}", receiver.mails());
    assert_eq!(receiver.hooks().len(), 1, "{:#?}", receiver.hooks());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_answering_503_is_tried_again_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 2);
    let (notifier, _stop) = start(&receiver, On::Failure);
    notifier.send(&failure());
    receiver.hook(|h| h.status == 200).await;
    let statuses: Vec<u16> = receiver.hooks().iter().map(|h| h.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
    // The same body each time.
    let bodies: Vec<String> = receiver.hooks().iter().map(|h| h.body.clone()).collect();
    assert!(bodies.iter().all(|b| *b == bodies[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_for_good_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 0);
    let mut config = receiver.config(On::Both);
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    config.email[0].password_file = Some(wrong);
    let target = EmailTarget::new(&config.email[0]).expect("target");
    let error = target.deliver(&Message::of(&failure())).await.expect_err("refused");
    assert!(!error.is_retryable(), "{error}");
    let text = error.to_string();
    assert!(text.starts_with("email 127.0.0.1:"), "{text}");
    assert!(text.contains("535"), "the server's answer is shown: {text}");
    assert!(!text.contains("not-the-password"), "no secret in errors: {text}");
    assert!(receiver.mails().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_our_ca_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 0);
    let mut config = receiver.config(On::Both);
    config.email[0].ca_file = None;
    let target = EmailTarget::new(&config.email[0]).expect("target");
    let error = target.deliver(&Message::of(&failure())).await.expect_err("untrusted");
    assert!(error.to_string().to_lowercase().contains("certificate"), "{error}");
    assert!(receiver.mails().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_does_not_hold_up_the_email() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 0);
    let mut config = receiver.config(On::Failure);
    // A port nobody listens on: every try is refused, with backoff between them.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    config.webhook[0].url = format!("https://{closed}/hook");
    config.tries = 100;
    config.backoff = stillpoint_notify::Period(Duration::from_secs(60));
    let (notifier, workers) = Notifier::new(&config).expect("notifier");
    let stop = CancellationToken::new();
    workers.spawn(stop.clone());
    notifier.send(&failure());
    notifier.send(&alert());
    receiver.mail(|m| m.subject.contains("FAILED")).await;
    receiver.mail(|m| m.subject.contains("ALERT")).await;
    assert!(receiver.hooks().is_empty());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_sender_waits_for_every_target() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path(), 1);
    let config = receiver.config(On::Failure);
    let success = stillpoint_notify::send_and_wait(&config, &backup(State::Succeeded)).await;
    assert!(success.expect("config").is_empty(), "on = failure sends no success");
    let sent = stillpoint_notify::send_and_wait(&config, &missed()).await.expect("config");
    let results: Vec<_> =
        sent.iter().map(|d| (d.target.as_str(), d.result.as_ref().ok())).collect();
    let email = format!("email 127.0.0.1:{}", receiver.smtp_port);
    let webhook = format!("webhook https://127.0.0.1:{}/hook", receiver.http_port);
    // The webhook's first try is answered 503: it took two.
    assert_eq!(results, [(email.as_str(), Some(&1)), (webhook.as_str(), Some(&2))]);
    // The receiver records each request on a thread of its own, so what the sender was told
    // can come back before it is recorded: wait for the records, then check them.
    receiver.mail(|_| true).await;
    receiver.hook(|h| h.status == 200).await;
    assert_eq!(receiver.mails().len(), 1);
    assert_eq!(receiver.hooks().iter().map(|h| h.status).collect::<Vec<_>>(), [503, 200]);
}
