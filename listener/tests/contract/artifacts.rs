//! The files a server's quiescers made for a restore (a backup label) reach the catalog with its
//! commit: the backup lists them without their bytes, GetArtifacts gives the bytes to the backup
//! software and operators (not viewers), and they survive a listener restart.

use stillpoint_listener::testing::{Cluster, Spec};
use stillpoint_proto as pb;
use tonic::Code;

use crate::{refused, start, state, until};

fn ask(id: &str, server: &str) -> pb::GetArtifactsRequest {
    pb::GetArtifactsRequest { backup_id: id.into(), server: server.into() }
}

/// `(server, quiescer, name, bytes)` of every artifact in a reply.
fn flat(reply: &pb::GetArtifactsResponse) -> Vec<(String, String, String, Vec<u8>)> {
    reply
        .servers
        .iter()
        .flat_map(|s| {
            s.artifacts
                .iter()
                .map(|a| (s.server.clone(), a.quiescer.clone(), a.name.clone(), a.content.clone()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_artifacts_are_listed_on_the_backup_and_fetched_with_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), Spec::default()).await;
    let label = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n";
    cluster
        .agent("srv-a")
        .hand_over(&[("pg", "backup_label", label), ("pg", "tablespace_map", b"")]);
    let mut hook = cluster.client("hook");
    let id = hook.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;
    let backup = until(&mut hook, &id, |b| state(b) == pb::BackupState::Snapshotted).await;

    let listed: Vec<(&str, &str, u64)> = backup.servers[0]
        .artifacts
        .iter()
        .map(|a| (a.quiescer.as_str(), a.name.as_str(), a.size_bytes))
        .collect();
    assert_eq!(listed, [("pg", "backup_label", label.len() as u64), ("pg", "tablespace_map", 0)]);
    assert!(backup.servers[1].artifacts.is_empty(), "srv-b's quiescers made none");
    assert!(
        backup.servers[0]
            .detail
            .contains("artifacts: pg/backup_label (62 B), pg/tablespace_map (0 B)"),
        "{}",
        backup.servers[0].detail
    );

    let all = hook.get_artifacts(ask(&id, "")).await.unwrap().into_inner();
    let want = vec![
        ("srv-a".to_string(), "pg".to_string(), "backup_label".to_string(), label.to_vec()),
        ("srv-a".to_string(), "pg".to_string(), "tablespace_map".to_string(), Vec::new()),
    ];
    assert_eq!(flat(&all), want);
    assert_eq!(all.servers.len(), 1, "a server without artifacts is left out");
    let b = hook.get_artifacts(ask(&id, "srv-b")).await.unwrap().into_inner();
    assert!(b.servers.is_empty(), "{b:?}");
    let mut operator = cluster.client("operator");
    assert_eq!(flat(&operator.get_artifacts(ask(&id, "srv-a")).await.unwrap().into_inner()), want);

    let mut viewer = cluster.client("viewer");
    refused(viewer.get_artifacts(ask(&id, "")).await, Code::PermissionDenied, "GetArtifacts");
    refused(hook.get_artifacts(ask(&id, "srv-z")).await, Code::NotFound, "has no server");
    refused(hook.get_artifacts(ask("20990101T000000Z-000000", "")).await, Code::NotFound, "");
    refused(hook.get_artifacts(ask("../x", "")).await, Code::InvalidArgument, "backup_id");

    // The catalog has them: a new listener process serves them the same.
    cluster.restart_listener().await;
    let mut hook = cluster.client("hook");
    assert_eq!(flat(&hook.get_artifacts(ask(&id, "")).await.unwrap().into_inner()), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_an_agent_should_have_refused_fail_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), Spec::default()).await;
    cluster.agent("srv-b").hand_over(&[("pg", "../../etc/cron.d/x", b"* * * * * root sh")]);
    let mut hook = cluster.client("hook");
    let id = hook.start_backup(start("g", "")).await.unwrap().into_inner().backup_id;
    let failed = until(&mut hook, &id, |b| state(b) == pb::BackupState::Failed).await;
    assert_eq!(failed.failed_phase, "COMMITTING");
    assert!(
        failed.reason.starts_with("srv-b: commit failed: the agent sent artifacts that break the rules (artifact \"../../etc/cron.d/x\" is not a plain file name"),
        "{}",
        failed.reason
    );
    let none = hook.get_artifacts(ask(&id, "")).await.unwrap().into_inner();
    assert!(none.servers.is_empty(), "nothing of a refused commit is kept: {none:?}");
}
