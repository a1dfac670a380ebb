//! What the listener says and does is true with real processes: SNAPSHOTTED is seen, a restart
//! past the freeze resumes the backup, copy reports are refused where the listener copies,
//! `--wait complete` waits for every server's answer, two groups sharing a server take turns,
//! and a second listener leaves the first one's snapshots alone.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{bin, wait_for, Cluster, Copy, Proc, Spec};

fn no_quiescer(_: &str, _: &std::path::Path) -> String {
    String::new()
}

fn status(cluster: &Cluster, id: &str) -> Value {
    cluster.backupctl_json(&["status", id]).1
}

fn copied(cluster: &Cluster, id: &str, server: &str) {
    let out = cluster.backupctl("hook", &["copied", id, "--server", server]);
    assert!(
        out.status.success(),
        "copied {server}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.listener_log()
    );
}

fn log_of(cluster: &Cluster, id: &str) -> String {
    let out = cluster.backupctl("viewer", &["log", id]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_state(cluster: &Cluster, id: &str, state: &str) -> Value {
    wait_for(&format!("backup {id} to be {state}"), Duration::from_secs(30), || {
        let backup = status(cluster, id);
        (backup["state"] == state).then_some(backup)
    })
    .await
}

fn start_snapshotted(cluster: &Cluster) -> String {
    let (code, backup) =
        cluster.backupctl_json(&["start", "--group", "g", "--wait", "snapshotted"]);
    assert_eq!(code, 0, "{backup:#}\n{}", cluster.listener_log());
    backup["backup_id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_listener_resumes_a_backup_past_the_freeze() {
    let mut spec = Spec::three(no_quiescer);
    spec.copy = Copy::Report;
    spec.sweep_interval_ms = 500;
    let mut cluster = Cluster::start(spec).await;
    let (code, backup) =
        cluster.backupctl_json(&["start", "--group", "g", "--wait", "snapshotted"]);
    assert_eq!(code, 0, "{backup:#}");
    assert_eq!(backup["state"], "SNAPSHOTTED", "seen until the backup software's first report");
    let id = backup["backup_id"].as_str().expect("id").to_string();
    copied(&cluster, &id, "srv-a");
    assert_eq!(status(&cluster, &id)["state"], "COPYING");

    cluster.restart_listener().await;
    wait_for("the new listener to take the backup over", Duration::from_secs(10), || {
        log_of(&cluster, &id)
            .contains("listener restarted while the backup was COPYING")
            .then_some(())
    })
    .await;
    // Several sweeps of the new listener pass: they leave a backup it runs alone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&cluster, &id)["state"], "COPYING", "{}", cluster.listener_log());
    let held = cluster.array.snapshots(Some(&id)).expect("snapshots");
    assert_eq!(held.len(), 2, "srv-b's and srv-c's snapshots wait for their copies: {held:?}");

    copied(&cluster, &id, "srv-b");
    copied(&cluster, &id, "srv-c");
    wait_state(&cluster, &id, "SUCCEEDED").await;
    let log = log_of(&cluster, &id);
    assert!(
        log.contains("listener restarted while the backup was COPYING; its snapshots were kept: copy requested again for srv-b, srv-c"),
        "{log}"
    );
    wait_for("every snapshot cleaned up", Duration::from_secs(10), || {
        cluster.array.snapshots(None).expect("snapshots").is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_report_is_refused_where_the_listener_copies() {
    let mut spec = Spec::three(no_quiescer);
    // Slow copies on the agents, so the report comes while they run.
    spec.copy = Copy::SavesetOnAgent { verify: "index", agent: |_| Some(300) };
    let cluster = Cluster::start(spec).await;
    let id = start_snapshotted(&cluster);
    let out = cluster.backupctl("hook", &["copied", &id, "--server", "srv-a"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "refused: {stderr}");
    assert!(
        stderr.contains("copy mode saveset on the agents")
            && stderr.contains("only for copy mode report"),
        "{stderr}"
    );
    let backup = wait_for("the backup to end", Duration::from_secs(60), || {
        let b = status(&cluster, &id);
        ["SUCCEEDED", "FAILED"].contains(&b["state"].as_str().unwrap_or_default()).then_some(b)
    })
    .await;
    assert_eq!(backup["state"], "SUCCEEDED", "{backup:#}\n{}", cluster.listener_log());
    let log = log_of(&cluster, &id);
    assert!(log.contains("sealed: backup manifest"), "the backup is sealed: {log}");
    let restored = cluster.restore_from_saveset(&id, &cluster.root().join("restored"));
    assert_eq!(restored.len(), 3, "every server's volume is in the backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_complete_returns_once_every_server_answered_and_names_the_silent_one() {
    let mut spec = Spec::three(no_quiescer);
    spec.lease_ms = 6_000;
    let cluster = Cluster::start(spec).await;
    // srv-c hears nothing: its Prepare fails at the cutoff, its Abort never lands.
    cluster.agent("srv-c").proc.signal("STOP");
    let out = cluster.backupctl("operator", &["start", "--group", "g", "--wait", "complete"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let id = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string();
    assert!(
        stderr.contains("no confirmation from srv-c: abort not delivered"),
        "{stderr}\n{}",
        cluster.listener_log()
    );
    // By the time it returned, every server's answer (or the giving up) was in the log.
    let log = log_of(&cluster, &id);
    for line in ["srv-a", "srv-b"] {
        assert!(
            log.lines().any(|l| l.contains(line) && l.contains("abort done: ")),
            "{line} confirmed its abort before --wait complete returned:\n{log}"
        );
    }
    assert!(log.contains("settled without confirmation from srv-c"), "{log}");
    assert!(!log.contains("thaws by itself"), "{log}");
    cluster.agent("srv-c").proc.signal("CONT");
}

/// srv-b takes 1.5 s to quiesce, so group g holds srv-a mid-freeze that long.
fn slow_on_b(server: &str, _: &std::path::Path) -> String {
    if server != "srv-b" {
        return String::new();
    }
    "[[quiescer]]\nkind = \"exec\"\nname = \"slow\"\ntimeout_ms = 5000\npre_freeze = [\"/bin/sh\", \"-c\", \"sleep 1.5\"]\npost_thaw = [\"/bin/true\"]\n".into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_sharing_a_server_take_turns_and_both_succeed() {
    let mut spec = Spec::three(slow_on_b);
    spec.listener_extra = "[[group]]\nname = \"h\"\nservers = [\"srv-a\"]\n".into();
    let cluster = Cluster::start(spec).await;
    let out = cluster.backupctl("operator", &["start", "--group", "g"]);
    assert!(out.status.success(), "start g: {}", String::from_utf8_lossy(&out.stderr));
    let g = String::from_utf8_lossy(&out.stdout).trim().to_string();
    wait_state(&cluster, &g, "PREPARING").await;
    let (code, h) = cluster.backupctl_json(&["start", "--group", "h", "--wait", "complete"]);
    assert_eq!(code, 0, "{h:#}\n{}", cluster.listener_log());
    let h = h["backup_id"].as_str().expect("id").to_string();
    assert_eq!(wait_state(&cluster, &g, "SUCCEEDED").await["state"], "SUCCEEDED");
    let log = log_of(&cluster, &h);
    assert!(
        log.contains(&format!("waiting to freeze: srv-a is mid-freeze for backup {g}")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_listener_leaves_the_first_listeners_snapshots_alone() {
    let mut spec = Spec::three(no_quiescer);
    spec.copy = Copy::Report;
    let cluster = Cluster::start(spec).await;
    let id = start_snapshotted(&cluster);
    copied(&cluster, &id, "srv-a");
    assert_eq!(status(&cluster, &id)["state"], "COPYING");

    // Listener B: the same agents, its own catalog, sweeping twice a second.
    let port = stillpoint_core::testing::spare_loopback_port();
    let config = std::fs::read_to_string(&cluster.listener_config).expect("listener config");
    let config = config
        .replace("listener-data", "listener-b-data")
        .replace(&cluster.listener_addr.to_string(), &format!("127.0.0.1:{port}"))
        .replace("sweep_interval_ms = 60000", "sweep_interval_ms = 500");
    let path = cluster.root().join("listener-b.toml");
    std::fs::write(&path, config).expect("write listener B config");
    let mut command = Command::new(bin("stillpoint-listener"));
    command.arg("--config").arg(&path).env("RUST_LOG", "info");
    let b = Proc::spawn(command, cluster.root().join("listener-b.log"));
    wait_for("listener B to serve", Duration::from_secs(20), || {
        b.log_text().contains("listener serving").then_some(())
    })
    .await;
    // Five of B's sweeps.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let held = cluster.array.snapshots(Some(&id)).expect("snapshots");
    assert_eq!(held.len(), 2, "listener A's snapshots are still there: {held:?}\n{}", b.log_text());
    let stranger = "leftover held by another listener or made before this catalog; left alone";
    let said = b.log_text().matches(stranger).count();
    assert_eq!(said, 2, "each leftover reported once, not every sweep:\n{}", b.log_text());

    copied(&cluster, &id, "srv-b");
    copied(&cluster, &id, "srv-c");
    wait_state(&cluster, &id, "SUCCEEDED").await;
}
