//! Quiescer artifacts end to end, with real agents: srv-a's exec quiescer has an
//! `artifacts_dir`, and its post_thaw hook writes a file there. The file travels with srv-a's
//! commit to the catalog and into the saveset's backup manifest (the listener copying, and the
//! agents copying), `backupctl status` lists it, `backupctl restore` writes it next to srv-a's
//! restored volume, and `backupctl artifacts` fetches the same bytes from the catalog.

use std::path::Path;

use crate::harness::{Cluster, Copy, Spec};

/// srv-a's hook records which backup it thawed for; the other servers' hooks make nothing.
fn quiescers(server: &str, root: &Path) -> String {
    let dir = root.join("artifacts").join(server);
    let post = "printf 'thawed %s for %s\\n' \"$STILLPOINT_SERVER\" \"$STILLPOINT_BACKUP_ID\" > \"$STILLPOINT_ARTIFACTS_DIR/position\"";
    let post = if server == "srv-a" { post } else { "true" };
    format!(
        "[[quiescer]]\nkind = \"exec\"\nname = \"app\"\ntimeout_ms = 10000\npost_thaw = [\"/bin/sh\", \"-c\", {post:?}]\nartifacts_dir = {dir:?}\n",
        dir = dir.display().to_string(),
    )
}

async fn check(copy: Copy) {
    let mut spec = Spec::three(quiescers);
    spec.copy = copy;
    let cluster = Cluster::start(spec).await;
    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    let id = backup["backup_id"].as_str().expect("backup_id").to_string();
    assert_eq!(code, 0, "backup {id}: {backup:#}\n{}", cluster.listener_log());
    let want = format!("thawed srv-a for {id}\n");
    assert_eq!(
        backup["servers"][0]["artifacts"],
        serde_json::json!([{"quiescer": "app", "name": "position", "size_bytes": want.len()}]),
        "{backup:#}"
    );
    assert_eq!(backup["servers"][1]["artifacts"], serde_json::json!([]));
    assert!(
        !cluster.root().join("artifacts/srv-a").join(&id).exists(),
        "handed over once: the agent removed the backup's directory"
    );

    let status = cluster.backupctl("viewer", &["status", &id]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
            == ["srv-a", "app", "position", &want.len().to_string(), "B"]),
        "{status}"
    );

    let to = cluster.root().join("restored");
    std::fs::create_dir(&to).unwrap();
    let out = cluster.restore(&id, "srv-a", &to);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}\n{}", String::from_utf8_lossy(&out.stderr));
    let file = to.join("srv-a/artifacts/app/position");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), want);
    assert!(
        said.contains(&format!(
            "wrote artifact app/position of srv-a in backup {id} ({} B) to {}",
            want.len(),
            file.display()
        )),
        "{said}"
    );
    let volume = to.join("srv-a-data.img");
    assert_eq!(std::fs::metadata(&volume).unwrap().len(), cluster.spec.lun_bytes);
    println!("restore of srv-a:\n{said}");

    let fetched = cluster.root().join("fetched");
    let out = cluster.backupctl("hook", &["artifacts", &id, "--to", fetched.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(fetched.join("srv-a/artifacts/app/position")).unwrap(),
        want
    );
    assert!(!fetched.join("srv-b").exists() && !fetched.join("srv-c").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_hook_made_is_restored_next_to_the_volume_listener_copy() {
    check(Copy::Saveset { verify: "index" }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_the_hook_made_is_restored_next_to_the_volume_agent_copy() {
    check(Copy::SavesetOnAgent { verify: "index", agent: |_| Some(0) }).await;
}
