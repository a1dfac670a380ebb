//! Disaster recovery of the listener's catalog, with real processes: two backups into a saveset
//! repository, the listener stopped and its data directory deleted, then the catalog rebuilt
//! from the repository, by `--rebuild-catalog` and by a plain start (with the newest saved
//! catalog gone too, so the second backup comes back from its backup manifest alone). After
//! each, `backupctl list` knows both backups, `artifacts` fetches their files and `backupctl
//! restore` writes them bit for bit; `backupctl repo list` shows them with no listener at all,
//! and volumes without a backup manifest as an incomplete backup.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{bin, incompressible, wait_for, Cluster, Copy, Spec};

/// srv-a's hook leaves an artifact naming the backup; srv-b has no quiescer.
fn quiescers(server: &str, root: &Path) -> String {
    if server != "srv-a" {
        return String::new();
    }
    let post = "printf 'thawed for %s\\n' \"$STILLPOINT_BACKUP_ID\" > \"$STILLPOINT_ARTIFACTS_DIR/position\"";
    format!(
        "[[quiescer]]\nkind = \"exec\"\nname = \"app\"\ntimeout_ms = 10000\npost_thaw = [\"/bin/sh\", \"-c\", {post:?}]\nartifacts_dir = {dir:?}\n",
        dir = root.join("artifacts").display().to_string(),
    )
}

/// Writes `seed`'s bytes at `offset` of srv-a's LUN and returns the whole LUN as it is then.
fn write_lun(cluster: &Cluster, seed: u64, offset: u64) -> Vec<u8> {
    let lun = cluster.array.lun_path("srv-a", "data").expect("lun path");
    let mut f = fs::OpenOptions::new().write(true).open(&lun).expect("open LUN");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&incompressible(seed, 1 << 20)).expect("write LUN");
    f.sync_all().expect("sync LUN");
    fs::read(&lun).expect("read LUN")
}

fn backup(cluster: &Cluster) -> String {
    let (code, b) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    assert_eq!(code, 0, "{b:#}\n{}", cluster.listener_log());
    b["backup_id"].as_str().expect("backup_id").to_string()
}

/// Waits until the repository holds a saved catalog of `records` backups.
async fn saved_with(cluster: &Cluster, records: u64) {
    wait_for(&format!("a saved catalog of {records} backups"), Duration::from_secs(30), || {
        let repo = cluster.saveset();
        let list = repo.list_catalogs().expect("list catalogs");
        list.iter().any(|(_, h)| h.as_ref().is_ok_and(|h| h.records == records)).then_some(())
    })
    .await;
}

fn repo_args(cluster: &Cluster) -> [String; 4] {
    [
        "--repo".into(),
        cluster.root().join("saveset").display().to_string(),
        "--passphrase-file".into(),
        cluster.root().join("saveset.pass").display().to_string(),
    ]
}

fn rebuild(cluster: &Cluster, force: bool) -> std::process::Output {
    let mut c = Command::new(bin("stillpoint-listener"));
    c.arg("--config").arg(&cluster.listener_config).arg("--rebuild-catalog");
    if force {
        c.arg("--force");
    }
    c.output().expect("run stillpoint-listener --rebuild-catalog")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The listener knows both backups as SUCCEEDED, and restores `id`'s srv-a volume as `want`.
fn check_listener(cluster: &Cluster, ids: &[&str; 2], restore: (&str, &[u8])) {
    let (code, list) = cluster.backupctl_json(&["list"]);
    assert_eq!(code, 0, "{list:#}");
    let all = list.as_array().cloned().or_else(|| list["backups"].as_array().cloned());
    let all = all.unwrap_or_else(|| panic!("list --json: {list:#}"));
    for id in ids {
        let b = all.iter().find(|b| b["backup_id"] == *id);
        let b =
            b.unwrap_or_else(|| panic!("{id} not listed: {list:#}\n{}", cluster.listener_log()));
        assert_eq!(b["state"], "SUCCEEDED", "{b:#}");
    }
    let (code, status) = cluster.backupctl_json(&["status", ids[0]]);
    assert_eq!(code, 0, "{status:#}");
    // The artifacts come back from the catalog, for a backup from the saved catalog and for
    // one recovered from its backup manifest alike.
    for id in ids {
        let to = cluster.root().join(format!("fetched-{id}-{}", restore.0));
        let out = cluster.backupctl("hook", &["artifacts", id, "--to", to.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        let got = fs::read_to_string(to.join("srv-a/artifacts/app/position")).unwrap();
        assert_eq!(got, format!("thawed for {id}\n"));
    }
    let (id, want) = restore;
    let to = cluster.root().join(format!("restored-{id}-{}", want.len() ^ id.len()));
    let _ = fs::remove_dir_all(&to);
    fs::create_dir_all(&to).expect("restore dir");
    let out = cluster.restore(id, "srv-a", &to);
    assert!(out.status.success(), "{}", text(&out));
    assert!(fs::read(to.join("srv-a-data.img")).expect("restored volume") == want, "{id} differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_is_rebuilt_from_the_repository_after_its_data_directory_was_deleted() {
    let mut spec = Spec::three(quiescers);
    spec.servers = vec!["srv-a".into(), "srv-b".into()];
    spec.copy = Copy::Saveset { verify: "index" };
    let mut cluster = Cluster::start(spec).await;

    let first_image = write_lun(&cluster, 1, 0);
    let first = backup(&cluster);
    saved_with(&cluster, 1).await;
    let second_image = write_lun(&cluster, 2, 3 << 20);
    let second = backup(&cluster);
    saved_with(&cluster, 2).await;
    let ids = [first.as_str(), second.as_str()];

    // The listener host is lost: no process, no data directory.
    cluster.listener.take();
    let data = cluster.root().join("listener-data");
    fs::remove_dir_all(&data).expect("delete the data dir");

    // The repository alone lists both.
    let mut args: Vec<String> = vec!["repo".into(), "list".into()];
    args.extend(repo_args(&cluster));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, listed) = cluster.backupctl_json(&refs);
    assert_eq!(code, 0, "{listed:#}");
    let listed = listed.as_array().expect("repo list --json is an array").clone();
    assert_eq!(listed.len(), 2, "{listed:#?}");
    for (line, id) in listed.iter().zip(ids) {
        assert_eq!(line["backup"], id);
        assert_eq!(line["group"], "g");
        assert_eq!(line["complete"], true);
        assert_eq!(line["servers"], serde_json::json!(["srv-a", "srv-b"]));
        assert_eq!(line["logical_bytes"], 2 * cluster.spec.lun_bytes);
    }
    let human = cluster.backupctl("viewer", &refs);
    assert!(human.status.success(), "{}", text(&human));
    println!("backupctl repo list:\n{}", String::from_utf8_lossy(&human.stdout));
    let mut show: Vec<String> = vec!["repo".into(), "show".into(), second.clone()];
    show.extend(repo_args(&cluster));
    let show: Vec<&str> = show.iter().map(String::as_str).collect();
    let (code, shown) = cluster.backupctl_json(&show);
    assert_eq!(code, 0, "{shown:#}");
    assert_eq!(shown["volume_list"].as_array().map(Vec::len), Some(2), "{shown:#}");
    assert_eq!(shown["cut"].as_array().map(Vec::len), Some(2), "{shown:#}");

    // 1: the offline command.
    let out = rebuild(&cluster, false);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rebuilt from the repository: 2 backup(s)"),
        "{}",
        text(&out)
    );
    let again = rebuild(&cluster, false);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"), "{}", text(&again));
    let forced = rebuild(&cluster, true);
    assert!(forced.status.success(), "{}", text(&forced));
    assert!(String::from_utf8_lossy(&forced.stdout).contains("moved to"), "{}", text(&forced));
    cluster.start_listener().await;
    check_listener(&cluster, &ids, (&first, &first_image));

    // 2: a plain start, with the newest saved catalog lost as well: the second backup comes
    // back from its backup manifest.
    cluster.listener.take();
    fs::remove_dir_all(&data).expect("delete the data dir");
    let repo = cluster.saveset();
    for (id, header) in repo.list_catalogs().expect("list catalogs") {
        if header.expect("catalog opens").records != 1 {
            fs::remove_file(cluster.root().join("saveset/catalog").join(id.to_string()))
                .expect("delete a saved catalog");
        }
    }
    cluster.start_listener().await;
    let log = cluster.listener_log();
    assert!(log.contains("catalog rebuilt from the repository: 2 backup(s)"), "{log}");
    check_listener(&cluster, &ids, (&second, &second_image));
    let out = cluster.backupctl("viewer", &["log", &second]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("recovered from the repository"), "{said}");

    // Volumes no backup manifest names are listed as an incomplete backup.
    let lun = cluster.array.lun_path("srv-b", "data").expect("lun path");
    let mut args: Vec<String> =
        ["repo", "backup", "--backup", "loose", "--server", "srv-b"].map(String::from).into();
    args.extend(["--volume".into(), "data".into(), lun.display().to_string()]);
    args.extend(repo_args(&cluster));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cluster.backupctl("operator", &refs);
    assert!(out.status.success(), "{}", text(&out));
    let mut args: Vec<String> = vec!["repo".into(), "list".into()];
    args.extend(repo_args(&cluster));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_, listed) = cluster.backupctl_json(&refs);
    let loose = listed.as_array().and_then(|l| l.iter().find(|b| b["backup"] == "loose"));
    let loose = loose.unwrap_or_else(|| panic!("{listed:#}"));
    assert_eq!(loose["complete"], false, "{loose:#}");
    assert_eq!(loose["servers"], serde_json::json!(["srv-b"]));
    let human = cluster.backupctl("viewer", &refs);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("INCOMPLETE") && human.contains("3 backup(s), 1 of them incomplete"),
        "{human}"
    );
}
