//! ListBackups pages newest first with filters; following next_page_token lists every backup
//! once, even while new backups are started between pages.

use stillpoint_listener::config::CopyConfig;
use stillpoint_listener::testing::{Cluster, Spec};
use stillpoint_proto as pb;
use tonic::Code;

use crate::{refused, start, state, Client};

fn list(
    group: &str,
    states: &[pb::BackupState],
    page_size: u32,
    token: &str,
) -> pb::ListBackupsRequest {
    pb::ListBackupsRequest {
        group: group.into(),
        states: states.iter().map(|s| *s as i32).collect(),
        page_size,
        page_token: token.into(),
        ..Default::default()
    }
}

/// Every page of `request`, in order.
async fn pages(client: &mut Client, mut request: pb::ListBackupsRequest) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    loop {
        let reply = client.list_backups(request.clone()).await.unwrap().into_inner();
        out.push(reply.backups.iter().map(|b| b.backup_id.clone()).collect());
        if reply.next_page_token.is_empty() {
            return out;
        }
        request.page_token = reply.next_page_token;
    }
}

/// Runs a backup of `group` to its end: aborted when `abort`, else copied by `/bin/true`.
async fn backup(client: &mut Client, group: &str, abort: bool) -> String {
    let id = client.start_backup(start(group, "")).await.unwrap().into_inner().backup_id;
    if abort {
        let request = pb::AbortBackupRequest { backup_id: id.clone(), reason: "test".into() };
        client.abort_backup(request).await.unwrap();
    }
    let wait = pb::WaitBackupRequest {
        backup_id: id.clone(),
        until: pb::WaitUntil::Settled as i32,
        timeout_ms: 20_000,
    };
    let _ = client.wait_backup(wait).await;
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_list_every_backup_once_newest_first_while_backups_are_added() {
    let dir = tempfile::tempdir().unwrap();
    let spec =
        Spec { copy: CopyConfig::Command { command: vec!["/bin/true".into()] }, ..Spec::default() };
    let cluster = Cluster::start(dir.path(), spec).await;
    let mut client = cluster.client("operator");
    let mut made = Vec::new();
    for i in 0..7 {
        made.push(backup(&mut client, if i % 3 == 2 { "h" } else { "g" }, i % 2 == 1).await);
    }
    made.reverse();
    let everything: Vec<String> = pages(&mut client, list("", &[], 1000, "")).await.concat();
    assert_eq!(everything, made, "newest first");

    // Three a page; a backup started after the first page is not in the later ones.
    let first = client.list_backups(list("", &[], 3, "")).await.unwrap().into_inner();
    assert_eq!(first.backups.len(), 3);
    let newer = backup(&mut client, "g", false).await;
    let mut request = list("", &[], 3, &first.next_page_token);
    let rest = pages(&mut client, request.clone()).await;
    assert_eq!(rest.iter().map(Vec::len).collect::<Vec<_>>(), [3, 1]);
    let mut seen: Vec<String> = first.backups.iter().map(|b| b.backup_id.clone()).collect();
    seen.extend(rest.concat());
    assert_eq!(seen, made, "every backup once, none twice, the new one not among them");
    assert!(!seen.contains(&newer));

    // Filters: group, states, time range, each across pages.
    let g: Vec<String> = pages(&mut client, list("g", &[], 2, "")).await.concat();
    assert_eq!(g.len(), 6);
    let aborted = pages(&mut client, list("", &[pb::BackupState::Aborted], 2, "")).await.concat();
    let want: Vec<String> = made
        .iter()
        .enumerate()
        .filter(|(i, _)| (6 - i) % 2 == 1)
        .map(|(_, id)| id.clone())
        .collect();
    assert_eq!(aborted, want);
    for id in &aborted {
        let b = client
            .get_backup(pb::GetBackupRequest { backup_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&b), pb::BackupState::Aborted);
    }
    let all = client.list_backups(list("", &[], 1000, "")).await.unwrap().into_inner().backups;
    let (newest, oldest) = (all[0].created_unix_ms, all[all.len() - 1].created_unix_ms);
    let since = pb::ListBackupsRequest { created_after_unix_ms: newest, ..list("", &[], 0, "") };
    let since = client.list_backups(since).await.unwrap().into_inner().backups;
    assert!(
        since.iter().all(|b| b.created_unix_ms >= newest)
            && since.iter().any(|b| b.backup_id == newer)
    );
    let before =
        pb::ListBackupsRequest { created_before_unix_ms: oldest + 1, ..list("", &[], 0, "") };
    let before = client.list_backups(before).await.unwrap().into_inner().backups;
    assert!(before.iter().all(|b| b.created_unix_ms <= oldest) && !before.is_empty());

    // A token is for the filters that made it; garbage is named.
    let page = client.list_backups(list("g", &[], 2, "")).await.unwrap().into_inner();
    request.group = "h".into();
    request.page_token = page.next_page_token;
    refused(client.list_backups(request).await, Code::InvalidArgument, "page_token");
    refused(
        client.list_backups(list("", &[], 2, "nonsense")).await,
        Code::InvalidArgument,
        "page_token",
    );
    refused(
        client.list_backups(list("", &[pb::BackupState::Unspecified], 2, "")).await,
        Code::InvalidArgument,
        "states",
    );
}
