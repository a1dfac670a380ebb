//! A backup may fail, but it never leaves an application frozen nor a snapshot behind.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{wait_for, Cluster, Spec};

/// An exec quiescer that leaves marker files; on srv-b its pre-freeze fails.
fn marker_quiescer(server: &str, root: &Path) -> String {
    let marks = root.join("control");
    let pre = if server == "srv-b" {
        "echo 'database refused to flush: disk quota exceeded' >&2; exit 3".to_string()
    } else {
        format!("touch {}/{server}.frozen", marks.display())
    };
    let post = format!("touch {}/{server}.thawed", marks.display());
    format!("[[quiescer]]\nkind = \"exec\"\nname = \"app\"\ntimeout_ms = 5000\npre_freeze = [\"/bin/sh\", \"-c\", {pre:?}]\npost_thaw = [\"/bin/sh\", \"-c\", {post:?}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_quiescer_fails_the_backup_and_every_other_server_thaws() {
    let cluster = Cluster::start(Spec::three(marker_quiescer)).await;
    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    assert_eq!(code, 1, "a failed backup exits 1: {backup:#}");
    assert_eq!(backup["state"], "FAILED");
    assert_eq!(backup["failed_phase"], "PREPARING");
    let reason = backup["reason"].as_str().expect("reason");
    assert!(reason.contains("srv-b") && reason.contains("disk quota exceeded"), "reason: {reason}");

    let control = cluster.root().join("control");
    for server in ["srv-a", "srv-c"] {
        let frozen = control.join(format!("{server}.frozen"));
        let thawed = control.join(format!("{server}.thawed"));
        if frozen.exists() {
            wait_for(&format!("{server} to thaw"), Duration::from_secs(5), || {
                thawed.exists().then_some(())
            })
            .await;
        }
    }
    let id = backup["backup_id"].as_str().expect("id");
    let out = cluster.backupctl("viewer", &["log", id]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("srv-b") && log.contains("disk quota exceeded"),
        "log names the server and reason:\n{log}"
    );
    assert!(
        cluster.array.snapshots(None).expect("snapshots").is_empty(),
        "no snapshot left in the array"
    );
}

fn slow_on_c(server: &str, root: &Path) -> String {
    let marks = root.join("control");
    let pre = if server == "srv-c" {
        "sleep 2".to_string()
    } else {
        format!("touch {}/{server}.frozen", marks.display())
    };
    let post = format!("touch {}/{server}.thawed", marks.display());
    format!("[[quiescer]]\nkind = \"exec\"\nname = \"app\"\ntimeout_ms = 5000\npre_freeze = [\"/bin/sh\", \"-c\", {pre:?}]\npost_thaw = [\"/bin/sh\", \"-c\", {post:?}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_never_comes_thaws_every_agent_within_its_lease() {
    let mut spec = Spec::three(slow_on_c);
    spec.lease_ms = 4_000;
    let mut cluster = Cluster::start(spec).await;
    let out = cluster.backupctl("operator", &["start", "--group", "g"]);
    assert!(out.status.success(), "start: {}", String::from_utf8_lossy(&out.stderr));

    // srv-a and srv-b freeze at once; srv-c takes 2 s. Kill the listener while a and b are frozen.
    let control = cluster.root().join("control");
    wait_for("srv-a and srv-b to freeze", Duration::from_secs(5), || {
        (control.join("srv-a.frozen").exists() && control.join("srv-b.frozen").exists())
            .then_some(())
    })
    .await;
    let killed_at = Instant::now();
    cluster.listener.as_mut().expect("listener").kill();

    for server in ["srv-a", "srv-b"] {
        let thawed = control.join(format!("{server}.thawed"));
        wait_for(&format!("{server} to thaw by itself"), Duration::from_secs(8), || {
            thawed.exists().then_some(())
        })
        .await;
        let said = || cluster.agent(server).proc.log_text().contains("lease expired").then_some(());
        wait_for(&format!("{server} to say why it thawed"), Duration::from_secs(3), said).await;
    }
    let waited = killed_at.elapsed();
    assert!(
        waited < Duration::from_millis(4_000 + 3_000),
        "thawed {waited:?} after the listener died"
    );
    assert!(
        cluster.array.snapshots(None).expect("snapshots").is_empty(),
        "no snapshot without a commit"
    );

    // The restarted listener fails the backup it found in flight.
    cluster.start_listener().await;
    let (_, list) = cluster.backupctl_json(&["list"]);
    let backup = &list.as_array().expect("array")[0];
    assert_eq!(backup["state"], "FAILED", "{backup:#}");
    let reason = backup["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("listener restarted"),
        "{reason}\nlistener log:\n{}",
        cluster.listener_log()
    );
}
