//! Bad input: malformed, oversized, out-of-order and replayed requests, unknown ids, and
//! certificates that are expired, from another CA or of the wrong role. Each gets a clear error
//! naming what was wrong, and a backup run afterwards still succeeds: nothing was disturbed.

use std::time::Duration;

use stillpoint_core::certs;
use stillpoint_core::identity::Role;
use stillpoint_core::tls::TlsFiles;
use stillpoint_proto as pb;
use tonic::Code;

use crate::harness::{Cluster, Spec};

fn no_quiescer(_: &str, _: &std::path::Path) -> String {
    String::new()
}

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, says: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{:?} lacks {says:?}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_clearly_and_disturb_nothing() {
    let cluster = Cluster::start(Spec::three(no_quiescer)).await;
    let mut listener =
        pb::listener_client::ListenerClient::new(cluster.channel_to_listener("operator"));
    let mut agent =
        pb::agent_client::AgentClient::new(cluster.channel_to_agent("srv-a", "listener"));

    // The listener.
    let unknown_group = listener
        .start_backup(pb::StartBackupRequest { group: "nope".into(), ..Default::default() })
        .await;
    assert_status(unknown_group, Code::NotFound, "unknown group \"nope\"; configured groups: g");
    for id in ["../etc/passwd", "a\0b", &"x".repeat(4096), ""] {
        let get = listener.get_backup(pb::GetBackupRequest { backup_id: id.to_string() }).await;
        assert_status(get, Code::InvalidArgument, "backup_id");
    }
    let missing = listener
        .get_backup(pb::GetBackupRequest { backup_id: "20200101T000000Z-000000".into() })
        .await;
    assert_status(missing, Code::NotFound, "unknown backup");
    let huge = listener
        .start_backup(pb::StartBackupRequest { group: "g".repeat(5 << 20), ..Default::default() })
        .await;
    assert_eq!(huge.expect_err("5 MiB request").code(), Code::OutOfRange);
    // Under the request limit, a 1 MB name is refused in a short message that says how long it
    // was: the whole name would overflow the client's limit on a status header.
    let big = listener
        .start_backup(pb::StartBackupRequest { group: "g".repeat(1_000_000), ..Default::default() })
        .await;
    let status = big.expect_err("unknown 1 MB group");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().len() < 1024, "{} bytes", status.message().len());
    assert!(status.message().contains("…\" (1000000 bytes"), "{}", status.message());
    let get = listener.get_backup(pb::GetBackupRequest { backup_id: "\u{1b}".repeat(500_000) });
    let status = get.await.expect_err("1 MB id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().len() < 1024 && !status.message().contains('\u{1b}'), "{status:?}");
    let report = pb::ReportCopyRequest {
        backup_id: "20200101T000000Z-000000".into(),
        server: "srv-a".into(),
        ok: true,
        detail: String::new(),
    };
    assert_status(listener.report_copy(report).await, Code::NotFound, "unknown backup");

    // An agent, called with the listener's own certificate.
    for lease_ms in [0, 999, 3_600_000] {
        let prepare = agent
            .prepare(pb::PrepareRequest {
                backup_id: "b-lease".into(),
                lease_ms,
                ..Default::default()
            })
            .await;
        assert_status(prepare, Code::InvalidArgument, "lease_ms");
    }
    let prepare = agent
        .prepare(pb::PrepareRequest {
            backup_id: "../../x".into(),
            lease_ms: 5_000,
            ..Default::default()
        })
        .await;
    assert_status(prepare, Code::InvalidArgument, "backup");
    let huge = "\u{1b}".repeat(500_000);
    let prepare = agent
        .prepare(pb::PrepareRequest {
            backup_id: huge.clone(),
            lease_ms: 5_000,
            ..Default::default()
        })
        .await;
    let status = prepare.expect_err("1 MB id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().len() < 1024 && status.message().contains("(500000 bytes"),
        "{status:?}"
    );
    let commit = agent
        .commit(pb::CommitRequest {
            backup_id: "b".into(),
            freeze_token: huge,
            ..Default::default()
        })
        .await;
    let status = commit.expect_err("1 MB token");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().len() < 1024, "{status:?}");
    let early = agent
        .commit(pb::CommitRequest {
            backup_id: "never-prepared".into(),
            freeze_token: String::new(),
            ..Default::default()
        })
        .await
        .expect("answer");
    assert!(
        !early.get_ref().committed,
        "a commit before any prepare is refused: {:?}",
        early.get_ref()
    );
    let cleanup = agent.cleanup(pb::CleanupRequest { backup_id: "never-seen".into() }).await;
    assert_eq!(cleanup.expect("cleanup of nothing is fine").into_inner().snapshots_deleted, 0);

    // Nothing was disturbed: a real backup still runs to the end.
    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    assert_eq!(code, 0, "{backup:#}");
    let (_, list) = cluster.backupctl_json(&["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "only the real backup is in the catalog");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_wrong_role_certificates_are_refused() {
    let cluster = Cluster::start(Spec::three(no_quiescer)).await;
    // Expired yesterday.
    certs::issue(&cluster.certs, Role::Operator, "expired", &[], -2).expect("expired cert");
    let url = format!("https://{}", cluster.listener_addr);
    let channel = stillpoint_core::tls::channel(
        &url,
        "listener",
        &cluster.tls("expired"),
        Duration::from_secs(5),
    )
    .expect("channel");
    let err = pb::listener_client::ListenerClient::new(channel)
        .health(pb::HealthRequest {})
        .await
        .expect_err("expired");
    let text = stillpoint_core::tls::explain(&err);
    assert!(text.contains("deployment CA") || text.to_lowercase().contains("expired"), "{text}");
    let said = || cluster.listener_log().contains("refused TLS connection").then_some(());
    crate::harness::wait_for("the listener to say why it refused", Duration::from_secs(5), said)
        .await;

    // An agent's certificate may not drive the listener.
    let mut as_agent =
        pb::listener_client::ListenerClient::new(cluster.channel_to_listener("srv-a"));
    assert_status(
        as_agent
            .start_backup(pb::StartBackupRequest { group: "g".into(), ..Default::default() })
            .await,
        Code::PermissionDenied,
        "agent:srv-a may not call",
    );
    assert!(as_agent.health(pb::HealthRequest {}).await.is_ok(), "but may ask for health");

    // Dialling srv-a's address while expecting srv-b: the pinned name does not match.
    let files: TlsFiles = cluster.tls("listener");
    let wrong = format!("https://{}", cluster.agent("srv-a").addr);
    let channel = stillpoint_core::tls::channel(&wrong, "srv-b", &files, Duration::from_secs(5))
        .expect("channel");
    let err = pb::agent_client::AgentClient::new(channel)
        .status(pb::StatusRequest {})
        .await
        .expect_err("wrong SAN");
    let text = stillpoint_core::tls::explain(&err);
    assert!(text.contains("certificate"), "{text}");

    let (_, list) = cluster.backupctl_json(&["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0));
}
