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
        let (code, backup) =
            cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
        let id = backup["backup_id"].as_str().expect("backup_id").to_string();
        assert_eq!(
            code,
            0,
            "round {round}: backup {id} did not succeed: {backup:#}\n{}",
            cluster.listener_log()
        );
        assert_eq!(backup["state"], "SUCCEEDED");
        assert_eq!(backup["cut"]["consistent"], true, "cut verdict: {}", backup["cut"]["verdict"]);
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
