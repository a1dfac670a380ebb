//! The product's promise: under a workload that writes causally linked records across three
//! servers, every backup is a consistent cut, and the copies prove it.

use std::time::Duration;

use serde_json::Value;
use stillpoint_tests::records::{check_chain, read_records};

use crate::harness::{writer_quiescer, Cluster, Spec};

fn held_ms(backup: &Value) -> Vec<u64> {
    backup["cut"]["servers"]
        .as_array()
        .expect("cut servers")
        .iter()
        .map(|s| s["held_ms"].as_u64().expect("held_ms"))
        .collect()
}

/// Runs one backup of group `g` to the end; it must succeed with a consistent cut.
fn consistent_backup(cluster: &Cluster, round: usize) -> (String, Value) {
    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    let id = backup["backup_id"].as_str().expect("backup_id").to_string();
    assert_eq!(
        code,
        0,
        "round {round}: backup {id} did not succeed: {backup:#}\n{}",
        cluster.listener_log()
    );
    assert_eq!(backup["state"], "SUCCEEDED");
    assert_eq!(backup["cut"]["consistent"], true, "cut verdict: {}", backup["cut"]["verdict"]);
    (id, backup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_under_causal_load_are_consistent_cuts() {
    let mut cluster = Cluster::start(Spec::three(writer_quiescer)).await;
    cluster.start_writer();
    // Let the chain grow before the first cut.
    let lun = cluster.array.lun_path("srv-c", "data").expect("lun");
    crate::harness::wait_for("the writer to reach srv-c", Duration::from_secs(20), || {
        read_records(&lun).ok().filter(|r| r.len() > 20)
    })
    .await;

    let mut held = Vec::new();
    let mut previous_links = 0;
    for round in 0..4 {
        let (id, backup) = consistent_backup(&cluster, round);
        held.extend(held_ms(&backup));

        // Read back every server's copy and follow every link across servers.
        let images: Vec<_> = ["srv-a", "srv-b", "srv-c"]
            .iter()
            .map(|s| {
                read_records(&cluster.copies_of(&id).join(format!("{s}-data.img")))
                    .expect("read copy")
            })
            .collect();
        let links = check_chain(&images).unwrap_or_else(|e| panic!("backup {id} is torn: {e}"));
        assert!(
            links > previous_links,
            "round {round}: the writer kept writing ({links} links vs {previous_links})"
        );
        previous_links = links;

        // Cleanup removed the snapshots once copied.
        assert!(cluster.array.snapshots(Some(&id)).expect("list snapshots").is_empty());
    }
    assert!(
        cluster.writer.as_mut().expect("writer").child.try_wait().expect("writer status").is_none(),
        "writer died"
    );

    held.sort_unstable();
    let median = held[held.len() / 2];
    let max = held[held.len() - 1];
    eprintln!(
        "freeze window per server over {} server-backups: median {median}ms, max {max}ms",
        held.len()
    );

    // The catalog lists every backup, newest first, and the log tells the whole story.
    let (code, list) = cluster.backupctl_json(&["list"]);
    assert_eq!(code, 0);
    let list = list.as_array().expect("list is an array");
    assert_eq!(list.len(), 4);
    assert!(list.iter().all(|b| b["state"] == "SUCCEEDED"));
    let newest = list[0]["backup_id"].as_str().expect("id");
    let out = cluster.backupctl("viewer", &["log", newest]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "log: {}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "prepare sent",
        "commit sent",
        "committed and thawed",
        "copied",
        "cleaned up",
        "backup succeeded",
    ] {
        assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
    }
}

/// Where the base image starts in every LUN: above the causal writer's records, which fill the
/// LUN from its start far slower than a test runs.
const BASE_AT: usize = 4 << 20;

/// 4 MiB of incompressible bytes, the same on every server, like a common OS image.
fn base_image() -> Vec<u8> {
    crate::harness::incompressible(0x9E37_79B9_7F4A_7C15, 4 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_under_causal_load_restore_consistently_from_the_saveset() {
    let mut spec = Spec::three(writer_quiescer);
    spec.copy = crate::harness::Copy::Saveset { verify: "read-data" };
    let mut cluster = Cluster::start(spec).await;
    let base = base_image();
    for s in ["srv-a", "srv-b", "srv-c"] {
        use std::os::unix::fs::FileExt;
        let lun = cluster.array.lun_path(s, "data").expect("lun");
        let file = std::fs::OpenOptions::new().write(true).open(lun).expect("open LUN");
        file.write_all_at(&base, BASE_AT as u64).expect("write base image");
        file.sync_all().expect("sync LUN");
    }
    cluster.start_writer();
    let lun = cluster.array.lun_path("srv-c", "data").expect("lun");
    crate::harness::wait_for("the writer to reach srv-c", Duration::from_secs(20), || {
        read_records(&lun).ok().filter(|r| r.len() > 20)
    })
    .await;

    let restores = tempfile::tempdir().expect("restore dir");
    let mut previous_links = 0;
    let mut stored = Vec::new();
    for round in 0..3 {
        let (id, backup) = consistent_backup(&cluster, round);
        for s in backup["servers"].as_array().expect("servers") {
            // Progress came from the copier (the total is the LUN's size) and reached it.
            assert_eq!(s["total_bytes"], 8 << 20, "{s:#}");
            assert_eq!(s["copied_bytes"], s["total_bytes"], "{s:#}");
            let detail = s["detail"].as_str().unwrap_or_default();
            assert!(detail.contains("saveset: data manifest "), "{detail}");
        }
        stored.push(cluster.saveset_stored_bytes());

        // Restore every server's volume from the repository: the base image comes back bit for
        // bit, and every link of the records is followed.
        let files = cluster.restore_from_saveset(&id, &restores.path().join(&id));
        let names: Vec<_> =
            files.iter().map(|f| f.file_name().expect("name").to_string_lossy()).collect();
        assert_eq!(names, ["srv-a-data.img", "srv-b-data.img", "srv-c-data.img"]);
        for f in &files {
            let restored = std::fs::read(f).expect("read restored volume");
            assert!(restored[BASE_AT..] == base[..], "{}: the base image differs", f.display());
        }
        let images: Vec<_> =
            files.iter().map(|f| read_records(f).expect("read restored volume")).collect();
        let links = check_chain(&images).unwrap_or_else(|e| panic!("backup {id} is torn: {e}"));
        assert!(
            links > previous_links,
            "round {round}: the writer kept writing ({links} links vs {previous_links})"
        );
        previous_links = links;
        // Cleanup removed the snapshots once copied.
        assert!(cluster.array.snapshots(Some(&id)).expect("list snapshots").is_empty());
    }
    assert!(
        cluster.writer.as_mut().expect("writer").child.try_wait().expect("writer status").is_none(),
        "writer died"
    );

    // Incremental forever: later backups store only the records written since. The three
    // servers copy at once through one pool, whose claims let only one of them store each
    // chunk of the shared 4 MiB base, so even the first backup stores it once.
    let first = stored[0];
    let later: Vec<u64> = stored.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("saveset stored {first} bytes in the first backup, then {later:?}");
    assert!(first < 6 << 20, "the shared base image was stored more than once: {first} bytes");
    assert!(later.iter().all(|&n| n < first / 10), "not incremental: {first} then {later:?}");

    // The log names the manifests and the verify that ran before the backup succeeded.
    let (code, list) = cluster.backupctl_json(&["list"]);
    assert_eq!(code, 0);
    let newest = list[0]["backup_id"].as_str().expect("id");
    let out = cluster.backupctl("viewer", &["log", newest]);
    let log = String::from_utf8_lossy(&out.stdout);
    for expected in ["copied: saveset:", "backup manifest ", "verify (read-data) ok", "cleaned up"]
    {
        assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
    }
}

/// A read-only loop device over an image, detached on drop.
struct Attached(String);

impl Attached {
    fn read_only(image: &std::path::Path) -> Attached {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(image)
            .output()
            .expect("run losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Attached(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idr_images_are_consistent_disks_that_attach_as_they_are() {
    let mut spec = Spec::three(writer_quiescer);
    spec.copy = crate::harness::Copy::Image;
    let mut cluster = Cluster::start(spec).await;
    cluster.start_writer();
    let lun = cluster.array.lun_path("srv-c", "data").expect("lun");
    crate::harness::wait_for("the writer to reach srv-c", Duration::from_secs(20), || {
        read_records(&lun).ok().filter(|r| r.len() > 20)
    })
    .await;
    for round in 0..2 {
        let (code, backup) =
            cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
        let id = backup["backup_id"].as_str().expect("backup_id").to_string();
        assert_eq!(code, 0, "round {round}: {backup:#}");
        let dir = cluster.root().join("idr").join(&id);
        // Attach each image as a read-only block device and read the records from the device.
        let images: Vec<_> = ["srv-a", "srv-b", "srv-c"]
            .iter()
            .map(|s| {
                let device = Attached::read_only(&dir.join(format!("{s}-data.img")));
                read_records(std::path::Path::new(&device.0)).expect("read the attached image")
            })
            .collect();
        let links =
            check_chain(&images).unwrap_or_else(|e| panic!("IDR images of {id} are torn: {e}"));
        assert!(links > 0, "the images hold the workload");
        assert!(
            cluster.array.snapshots(Some(&id)).expect("snapshots").is_empty(),
            "snapshots cleaned up"
        );
        for server in backup["servers"].as_array().expect("servers") {
            assert_eq!(server["copied_bytes"], server["total_bytes"], "{server}");
        }
    }
}

/// An exec quiescer that leaves `<root>/<server>.froze` when its hook runs: a hook that holds
/// nothing (hook-unverified).
fn marker_hook(server: &str, root: &std::path::Path) -> String {
    let marker = root.join(format!("{server}.froze"));
    format!(
        "[[quiescer]]\nkind = \"exec\"\nname = \"marker\"\ntimeout_ms = 5000\npre_freeze = [\"touch\", {m:?}]\npost_thaw = [\"true\"]\n",
        m = marker.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_requiring_a_filesystem_freeze_fails_hook_only_servers_before_anything_freezes() {
    let mut spec = Spec::three(marker_hook);
    spec.group_extra = "require_hold = \"filesystem-freeze\"\n";
    let cluster = Cluster::start(spec).await;
    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    assert_eq!(code, 1, "{backup:#}");
    assert_eq!(backup["state"], "FAILED");
    assert_eq!(backup["failed_phase"], "PENDING", "{backup:#}");
    let reason = backup["reason"].as_str().unwrap_or_default();
    for server in ["srv-a", "srv-b", "srv-c"] {
        assert!(
            reason.contains(&format!(
                "{server} (hook-unverified: a hook ran; whether it held writes cannot be seen)"
            )),
            "{reason}"
        );
    }
    assert!(reason.contains("the group requires filesystem-freeze"), "{reason}");
    // No freeze ever happened: no hook ran, no agent heard a Prepare, nothing is held.
    for server in ["srv-a", "srv-b", "srv-c"] {
        assert!(!cluster.root().join(format!("{server}.froze")).exists(), "{server}'s hook ran");
        let log = cluster.agent(server).proc.log_text();
        assert!(!log.contains("prepare"), "{server} heard a prepare:\n{log}");
    }
    let id = backup["backup_id"].as_str().expect("id");
    let out = cluster.backupctl("viewer", &["log", id]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("asking 3 servers what holds their writes"), "{log}");
    assert!(!log.contains("prepare sent"), "{log}");
    let (code, agents) = cluster.backupctl_json(&["agents"]);
    assert_eq!(code, 0);
    for agent in agents.as_array().expect("agents") {
        assert_eq!(agent["backups"], serde_json::json!([]), "{agent:#}");
    }
}

/// srv-a and srv-b pause the causal writer; srv-c's quiescer is a hook that does nothing.
fn writer_but_c_does_nothing(server: &str, root: &std::path::Path) -> String {
    if server == "srv-c" {
        "[[quiescer]]\nkind = \"exec\"\nname = \"nothing\"\ntimeout_ms = 5000\npre_freeze = [\"true\"]\npost_thaw = [\"true\"]\n".into()
    } else {
        writer_quiescer(server, root)
    }
}

/// srv-c's snapshot takes 1.5 s: without the barrier srv-a and srv-b thaw long before it.
fn slow_c_snapshot(server: &str) -> String {
    if server == "srv-c" {
        "snapshot_delay_ms = 1500".into()
    } else {
        String::new()
    }
}

/// Runs `rounds` backups of a cluster whose srv-c holds nothing; returns, per backup, whether
/// its copies' links all hold, with the backup, and the held_ms of every server.
async fn backups_with_a_server_holding_nothing(
    group_extra: &'static str,
    rounds: usize,
) -> (Vec<(Result<usize, String>, Value)>, Vec<(String, u64)>) {
    let mut spec = Spec::three(writer_but_c_does_nothing);
    spec.provider_extra = slow_c_snapshot;
    spec.group_extra = group_extra;
    let mut cluster = Cluster::start(spec).await;
    cluster.start_writer();
    let lun = cluster.array.lun_path("srv-c", "data").expect("lun");
    crate::harness::wait_for("the writer to reach srv-c", Duration::from_secs(20), || {
        read_records(&lun).ok().filter(|r| r.len() > 20)
    })
    .await;
    let mut out = Vec::new();
    let mut held = Vec::new();
    for round in 0..rounds {
        let (code, backup) =
            cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
        assert_eq!(code, 0, "round {round}: {backup:#}\n{}", cluster.listener_log());
        let id = backup["backup_id"].as_str().expect("backup_id").to_string();
        for s in backup["cut"]["servers"].as_array().expect("cut servers") {
            let name = s["server"].as_str().expect("server").to_string();
            held.push((name, s["held_ms"].as_u64().expect("held_ms")));
        }
        let images: Vec<_> = ["srv-a", "srv-b", "srv-c"]
            .iter()
            .map(|s| {
                read_records(&cluster.copies_of(&id).join(format!("{s}-data.img")))
                    .expect("read copy")
            })
            .collect();
        out.push((check_chain(&images), backup));
    }
    (out, held)
}

fn window(held: &[(String, u64)], servers: &[&str]) -> String {
    let mut ms: Vec<u64> =
        held.iter().filter(|(s, _)| servers.contains(&s.as_str())).map(|(_, ms)| *ms).collect();
    ms.sort_unstable();
    format!("median {}ms, max {}ms over {}", ms[ms.len() / 2], ms[ms.len() - 1], ms.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_holds_nothing_tears_the_cut_unless_the_thaw_barrier_holds_the_others() {
    // Without the barrier: srv-a and srv-b thaw after their own snapshots, the writer writes
    // into srv-b and then srv-c before srv-c's slow snapshot: a record on srv-c names one that
    // srv-b's snapshot lacks. The backup must not claim srv-c's writes were held.
    let (plain, plain_held) = backups_with_a_server_holding_nothing("", 3).await;
    for (links, backup) in &plain {
        let text = backup["cut"]["verdict"].as_str().unwrap_or_default();
        assert!(links.is_err(), "expected a broken link without the barrier: {links:?}\n{text}");
        assert!(
            text.contains("on srv-c they were not known to be held")
                || text.contains("srv-c they were not known to be held"),
            "{text}"
        );
        assert!(!text.contains("frozen at one instant"), "{text}");
        let c = &backup["cut"]["servers"][2];
        assert_eq!(
            (c["hold"].clone(), c["writes_held"].clone()),
            (Value::from("hook-unverified"), Value::Bool(false))
        );
        assert_eq!(c["held_until_release"], Value::Null);
    }
    // With the barrier nobody thaws until srv-c's snapshot exists: no link breaks.
    let (barrier, barrier_held) =
        backups_with_a_server_holding_nothing("thaw = \"after-every-snapshot\"\n", 3).await;
    for (links, backup) in &barrier {
        let text = backup["cut"]["verdict"].as_str().unwrap_or_default();
        let links =
            links.as_ref().unwrap_or_else(|e| panic!("torn under the barrier: {e}\n{text}"));
        assert!(*links > 0);
        assert_eq!(backup["cut"]["consistent"], true, "{text}");
        assert!(
            text.starts_with("every server stayed frozen until every snapshot existed"),
            "{text}"
        );
        for s in backup["cut"]["servers"].as_array().expect("servers") {
            assert_eq!(s["held_until_release"], true, "{s:#}");
        }
    }
    eprintln!(
        "freeze window of srv-a and srv-b (srv-c's snapshot takes 1.5 s): after own snapshot {}; after every snapshot {}",
        window(&plain_held, &["srv-a", "srv-b"]),
        window(&barrier_held, &["srv-a", "srv-b"])
    );
    eprintln!(
        "srv-c frozen: after own snapshot {}; after every snapshot {}",
        window(&plain_held, &["srv-c"]),
        window(&barrier_held, &["srv-c"])
    );
}
