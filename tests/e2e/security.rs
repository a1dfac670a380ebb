//! mTLS and roles: a viewer can watch but not act; agents obey only the listener; foreign
//! certificates are refused with a clear message.

use stillpoint_core::certs;
use stillpoint_core::identity::Role;
use stillpoint_core::tls::TlsFiles;
use stillpoint_proto as pb;

use crate::harness::{writer_quiescer, Cluster, Spec};

fn no_quiescer(_: &str, _: &std::path::Path) -> String {
    String::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_can_watch_but_not_start_or_abort() {
    let cluster = Cluster::start(Spec::three(no_quiescer)).await;
    let out = cluster.backupctl("viewer", &["start", "--group", "g"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("viewer:viewer may not call") && stderr.contains("StartBackup"),
        "stderr: {stderr}"
    );
    let out = cluster.backupctl("viewer", &["list"]);
    assert!(out.status.success(), "a viewer may list: {}", String::from_utf8_lossy(&out.stderr));
    let out = cluster.backupctl("viewer", &["abort", "20260101T000000Z-abcdef"]);
    assert_eq!(out.status.code(), Some(2));
    let (code, list) = cluster.backupctl_json(&["list"]);
    assert_eq!((code, list.as_array().map(Vec::len)), (0, Some(0)), "nothing was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_obeys_only_the_listener() {
    let cluster = Cluster::start(Spec::three(writer_quiescer)).await;
    for identity in ["operator", "hook", "viewer", "srv-b"] {
        let mut client =
            pb::agent_client::AgentClient::new(cluster.channel_to_agent("srv-a", identity));
        let err = client
            .prepare(pb::PrepareRequest {
                backup_id: "rogue".into(),
                lease_ms: 5_000,
                ..Default::default()
            })
            .await
            .expect_err("only the listener may prepare");
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{identity}: {err:?}");
        assert!(err.message().contains("may not call"), "{identity}: {}", err.message());
    }
    assert!(cluster.array.snapshots(None).expect("snapshots").is_empty());
    assert!(!cluster.root().join("control").join("pause-srv-a").exists(), "nothing was quiesced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let cluster = Cluster::start(Spec::three(no_quiescer)).await;
    let foreign = cluster.root().join("foreign");
    certs::create_ca(&foreign, "someone else's CA", 30).expect("foreign CA");
    certs::issue(&foreign, Role::Operator, "mallory", &[], 30).expect("foreign cert");
    // Mallory trusts our CA (to reach the listener) but her certificate is from her own.
    let files = TlsFiles {
        ca: cluster.certs.join("ca.pem"),
        cert: foreign.join("mallory.pem"),
        key: foreign.join("mallory.key"),
    };
    let url = format!("https://{}", cluster.listener_addr);
    let channel =
        stillpoint_core::tls::channel(&url, "listener", &files, std::time::Duration::from_secs(5))
            .expect("channel");
    let err = pb::listener_client::ListenerClient::new(channel)
        .start_backup(pb::StartBackupRequest { group: "g".into(), ..Default::default() })
        .await
        .expect_err("foreign certificate");
    let text = stillpoint_core::tls::explain(&err);
    assert!(text.contains("same deployment CA"), "clear message: {text}");
    let said = || cluster.listener_log().contains("refused TLS connection").then_some(());
    crate::harness::wait_for(
        "the listener to say why it refused",
        std::time::Duration::from_secs(5),
        said,
    )
    .await;
    let (_, list) = cluster.backupctl_json(&["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0));
}
