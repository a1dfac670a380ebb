//! `--wait snapshotted` (a backup before a risky task) and the backup software's copy report.

use crate::harness::{Cluster, Copy, Spec};

fn no_quiescer(_: &str, _: &std::path::Path) -> String {
    String::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_snapshotted_returns_before_the_copy_and_copied_reports_finish_it() {
    let mut spec = Spec::three(no_quiescer);
    spec.copy = Copy::Report;
    let cluster = Cluster::start(spec).await;
    let (code, backup) =
        cluster.backupctl_json(&["start", "--group", "g", "--wait", "snapshotted"]);
    assert_eq!(code, 0, "{backup:#}");
    let id = backup["backup_id"].as_str().expect("id").to_string();
    assert!(
        ["SNAPSHOTTED", "COPYING"].contains(&backup["state"].as_str().unwrap_or_default()),
        "{backup:#}"
    );
    assert_eq!(
        cluster.array.snapshots(Some(&id)).expect("snapshots").len(),
        3,
        "every snapshot exists"
    );

    // The hook reports copies one by one; each server is cleaned as soon as its copy is safe.
    let out =
        cluster.backupctl("hook", &["copied", &id, "--server", "srv-a", "--detail", "saveset 42"]);
    assert!(out.status.success(), "copied: {}", String::from_utf8_lossy(&out.stderr));
    let out = cluster.backupctl("hook", &["copied", &id, "--server", "srv-a"]);
    assert!(out.status.success(), "a repeated report is taken as a retry");
    let out = cluster.backupctl("hook", &["copied", &id, "--server", "srv-a", "--failed"]);
    assert_eq!(out.status.code(), Some(2), "a report contradicting the first is refused");
    for server in ["srv-b", "srv-c"] {
        let out = cluster.backupctl("hook", &["copied", &id, "--server", server]);
        assert!(out.status.success(), "copied: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out = cluster.backupctl("viewer", &["watch", &id]);
    assert!(
        out.status.success(),
        "watch ends 0 on success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (_, status) = cluster.backupctl_json(&["status", &id]);
    assert_eq!(status["state"], "SUCCEEDED", "{status:#}");
    assert!(cluster.array.snapshots(None).expect("snapshots").is_empty());

    // Agents answer the standard health check for anyone with a certificate of the CA.
    for server in ["srv-a", "srv-b", "srv-c"] {
        let channel = cluster.channel_to_agent(server, "viewer");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        for service in ["", "stillpoint.v1.Agent"] {
            let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
            let reply = health.check(request).await.expect("agent health").into_inner();
            assert_eq!(
                reply.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            );
        }
    }
}
