//! Log entries are numbered and a broken watch resumes after the last one it delivered, with
//! nothing repeated or left out; WatchBackups follows every backup (or one group's) live.

use std::time::Duration;

use stillpoint_listener::testing::{Cluster, Spec};
use stillpoint_proto as pb;
use tonic::Code;

use crate::{refused, start, state, until};

fn report(id: &str, server: &str) -> pb::ReportCopyRequest {
    pb::ReportCopyRequest {
        backup_id: id.into(),
        server: server.into(),
        ok: true,
        detail: String::new(),
    }
}

/// The next event of `stream`, within 10 s.
async fn next(stream: &mut tonic::Streaming<pb::WatchEvent>) -> Option<pb::WatchEvent> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("a healthy stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_after_its_last_seq_repeats_nothing_and_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), Spec::default()).await;
    let mut client = cluster.client("hook");
    let id = client.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;
    until(&mut client, &id, |b| state(b) == pb::BackupState::Snapshotted).await;

    // Read the first three entries, then drop the stream.
    let request = pb::WatchBackupRequest { backup_id: id.clone(), after_seq: 0 };
    let mut stream = client.watch_backup(request).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = next(&mut stream).await.expect("more");
        assert_eq!(event.backup_id, id);
        seen.extend(event.entry.map(|e| e.seq));
    }
    drop(stream);

    // More happens while nobody watches; then resume after the last seq seen.
    client.report_copy(report(&id, "srv-a")).await.unwrap();
    let request =
        pb::WatchBackupRequest { backup_id: id.clone(), after_seq: *seen.last().unwrap() };
    let mut stream = client.watch_backup(request).await.unwrap().into_inner();
    let mut reported = false;
    while let Some(event) = next(&mut stream).await {
        seen.extend(event.entry.map(|e| e.seq));
        if !reported {
            client.report_copy(report(&id, "srv-b")).await.unwrap();
            reported = true;
        }
    }
    let log = client.get_log(pb::GetLogRequest { backup_id: id.clone(), after_seq: 0 }).await;
    let log: Vec<u64> = log.unwrap().into_inner().entries.iter().map(|e| e.seq).collect();
    assert_eq!(log, (1..=log.len() as u64).collect::<Vec<_>>(), "numbered from 1 without gaps");
    assert_eq!(seen, log, "the two streams together deliver the log once, in order");
    let backup = client.get_backup(pb::GetBackupRequest { backup_id: id.clone() }).await.unwrap();
    assert_eq!(state(&backup.into_inner()), pb::BackupState::Succeeded);

    // GetLog resumes the same way; a watch resumed at the end sends the backup only, and ends.
    let tail = client.get_log(pb::GetLogRequest { backup_id: id.clone(), after_seq: 2 }).await;
    assert_eq!(tail.unwrap().into_inner().entries[0].seq, 3);
    let request = pb::WatchBackupRequest { backup_id: id.clone(), after_seq: log.len() as u64 };
    let mut stream = client.watch_backup(request).await.unwrap().into_inner();
    let only = next(&mut stream).await.expect("the backup");
    assert!(only.entry.is_none() && only.backup.is_some());
    assert!(next(&mut stream).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_backups_follows_every_backup_or_one_group_and_ends_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), Spec::default()).await;
    let mut viewer = cluster.client("viewer");
    let mut hook = cluster.client("hook");
    let feed = |group: &str| pb::WatchBackupsRequest { group: group.into() };
    let mut all = viewer.watch_backups(feed("")).await.unwrap().into_inner();
    let mut h = viewer.watch_backups(feed("h")).await.unwrap().into_inner();
    refused(viewer.watch_backups(feed("nope")).await, Code::NotFound, "nope");

    let in_g = hook.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;
    let in_h = hook.start_backup(start("h", "")).await.unwrap().into_inner().backup_id;
    until(&mut hook, &in_h, |b| state(b) == pb::BackupState::Snapshotted).await;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let event = next(&mut all).await.expect("live events");
        assert_eq!(
            event.backup.as_ref().map(|b| b.backup_id.as_str()),
            Some(event.backup_id.as_str())
        );
        seen.insert(event.backup_id);
    }
    assert_eq!(seen, [in_g.clone(), in_h.clone()].into_iter().collect());
    // The group's feed sees only its own backup, through to SNAPSHOTTED.
    loop {
        let event = next(&mut h).await.expect("live events");
        assert_eq!(event.backup_id, in_h);
        if event.backup.as_ref().is_some_and(|b| state(b) == pb::BackupState::Snapshotted) {
            break;
        }
    }

    // A feed never ends by itself, but it does not hold up the listener's shutdown.
    assert!(cluster.shut_down_listener(Duration::from_secs(10)).await, "shutdown waited on a feed");
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = all.message().await {}
    });
    assert!(drained.await.is_ok(), "the feed ends with the listener");
}
