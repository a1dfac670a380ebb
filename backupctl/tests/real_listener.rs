//! The remote verbs against the real listener, served in-process over loopback mutual TLS with
//! scripted agents (`stillpoint_listener::testing`): what backup software relies on, end to end
//! through the contract.

use std::time::Duration;

use backupctl::Cli;
use clap::Parser;
use stillpoint_listener::testing::{Cluster, Spec};

struct Real {
    _dir: tempfile::TempDir,
    cluster: Cluster,
}

impl Real {
    async fn start(spec: Spec) -> Real {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path(), spec).await;
        Real { _dir: dir, cluster }
    }

    /// Runs `backupctl ARGS` as `identity`; returns the exit code and stdout.
    async fn run(&self, identity: &str, args: &[&str]) -> (u8, String) {
        let url = self.cluster.url();
        let certs = self.cluster.certs.display().to_string();
        let global = ["backupctl", "--listener", &url, "--certs", &certs, "--identity", identity];
        let cli = Cli::try_parse_from(global.iter().chain(args)).unwrap();
        let mut out = Vec::new();
        let code = tokio::time::timeout(Duration::from_secs(60), backupctl::run(cli, &mut out))
            .await
            .unwrap_or_else(|_| panic!("backupctl {args:?} did not return"));
        (code, String::from_utf8(out).unwrap())
    }
}

impl Real {
    /// Runs `backupctl ARGS` as `identity` for `span` (for verbs that never end by themselves);
    /// returns what it printed by then.
    async fn run_for(&self, identity: &str, args: &[&str], span: Duration) -> String {
        let url = self.cluster.url();
        let certs = self.cluster.certs.display().to_string();
        let global = ["backupctl", "--listener", &url, "--certs", &certs, "--identity", identity];
        let cli = Cli::try_parse_from(global.iter().chain(args)).unwrap();
        let mut out = Vec::new();
        let ended = tokio::time::timeout(span, backupctl::run(cli, &mut out)).await;
        assert!(ended.is_err(), "backupctl {args:?} ended early: {ended:?}");
        String::from_utf8(out).unwrap()
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_start_names_the_backup_in_flight() {
    let real = Real::start(Spec::default()).await;
    let (code, out) = real.run("hook", &["start", "--group", "g"]).await;
    assert_eq!(code, 0);
    let busy = out.trim().to_string();
    let (code, out) = real.run("hook", &["start", "--group", "g", "--json"]).await;
    assert_eq!(code, 2);
    let error = &json(&out)["error"];
    assert_eq!(error["code"], "FAILED_PRECONDITION");
    assert_eq!(error["reason"], "GROUP_BUSY");
    assert_eq!(error["backup_id"], busy.as_str());
    assert_eq!(error["group"], "g");

    let (code, out) =
        real.run("hook", &["start", "--group", "g", "--request-id", "a b", "--json"]).await;
    assert_eq!(code, 2);
    let error = &json(&out)["error"];
    assert_eq!(error["code"], "INVALID_ARGUMENT");
    assert_eq!(error["fields"][0]["field"], "request_id");
    assert!(error["reason"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_wait_blocks_on_the_listener_until_snapshotted_and_wait_chains_calls() {
    use stillpoint_listener::testing::Step;
    let real = Real::start(Spec::default()).await;
    real.cluster.agent("srv-a").hold(Step::Commit);
    let started = std::time::Instant::now();
    let release = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        real.cluster.agent("srv-a").release(Step::Commit);
    };
    let ((code, out), ()) = tokio::join!(
        real.run("hook", &["start", "--group", "g", "--wait", "snapshotted", "--json"]),
        release
    );
    assert_eq!(code, 0, "{out}");
    assert!(started.elapsed() >= Duration::from_millis(500), "returned before the snapshots");
    let backup = json(&out);
    // Report mode: SNAPSHOTTED until the backup software's first report.
    assert_eq!(backup["state"], "SNAPSHOTTED");
    let id = backup["backup_id"].as_str().unwrap().to_string();

    // Each call lasts at most the 1 s connection timeout; the wait goes on across calls and
    // gives up after 3 s with the backup as it is.
    let started = std::time::Instant::now();
    let (code, out) = real
        .run(
            "viewer",
            &["--timeout", "1", "wait", &id, "--until", "finished", "--within", "3", "--json"],
        )
        .await;
    assert_eq!(code, 1, "{out}");
    assert!(started.elapsed() >= Duration::from_secs(3), "{:?}", started.elapsed());
    assert_eq!(json(&out)["state"], "SNAPSHOTTED");

    for server in ["srv-a", "srv-b"] {
        assert_eq!(real.run("hook", &["copied", &id, "--server", server]).await.0, 0);
    }
    let (code, out) = real.run("viewer", &["wait", &id, "--until", "settled", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let backup = json(&out);
    assert_eq!(backup["state"], "SUCCEEDED");
    assert!(backup["servers"].as_array().unwrap().iter().all(|s| s["phase"] == "cleaned"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_follows_pages_and_filters_by_state_and_time() {
    let real = Real::start(Spec::default()).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let (code, out) = real.run("hook", &["start", "--group", "g"]).await;
        assert_eq!(code, 0);
        let id = out.trim().to_string();
        assert_eq!(real.run("hook", &["abort", &id]).await.0, 0);
        ids.push(id);
    }
    let (code, out) = real.run("hook", &["start", "--group", "g", "--wait", "snapshotted"]).await;
    assert_eq!(code, 0);
    ids.push(out.trim().to_string());
    ids.reverse();
    let listed = |out: &str| -> Vec<String> {
        json(out)
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["backup_id"].as_str().unwrap().to_string())
            .collect()
    };

    // Two a page, every page followed; --limit stops early.
    let (code, out) =
        real.run("viewer", &["list", "--limit", "0", "--page-size", "2", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(listed(&out), ids);
    let (_, out) =
        real.run("viewer", &["list", "--limit", "3", "--page-size", "2", "--json"]).await;
    assert_eq!(listed(&out), ids[..3]);
    let (_, out) =
        real.run("viewer", &["list", "--state", "aborted", "--page-size", "2", "--json"]).await;
    assert_eq!(listed(&out), ids[1..]);
    let (_, out) = real
        .run("viewer", &["list", "--state", "snapshotted", "--state", "failed", "--json"])
        .await;
    assert_eq!(listed(&out), ids[..1]);
    let (_, out) = real.run("viewer", &["list", "--since", "1h", "--json"]).await;
    assert_eq!(listed(&out).len(), 6);
    let (_, out) = real.run("viewer", &["list", "--since", "2999-01-01T00:00:00Z", "--json"]).await;
    assert_eq!(out.trim(), "[]");
    assert!(Cli::try_parse_from(["backupctl", "list", "--state", "broken"]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_all_and_watch_group_follow_every_backup_live() {
    let real = Real::start(Spec::default()).await;
    let started = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, g) = real.run("hook", &["start", "--group", "g", "--wait", "snapshotted"]).await;
        let (_, h) = real.run("hook", &["start", "--group", "h", "--wait", "snapshotted"]).await;
        (g.trim().to_string(), h.trim().to_string())
    };
    let span = Duration::from_secs(4);
    let (all, group, (g, h)) = tokio::join!(
        real.run_for("viewer", &["watch", "--all"], span),
        real.run_for("viewer", &["watch", "--group", "h", "--json"], span),
        started
    );
    assert!(
        all.lines().any(|l| l.starts_with(&format!("{g}  ")) && l.contains("SNAPSHOTTED")),
        "{all}"
    );
    assert!(all.lines().any(|l| l.starts_with(&format!("{h}  "))), "{all}");
    let events: Vec<serde_json::Value> = group.lines().map(json).collect();
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| e["backup_id"] == h.as_str()), "{group}");
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["entry"]["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "every entry once, in order: {seqs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copying_reports_progress_and_heartbeats() {
    let real = Real::start(Spec::default()).await;
    let (code, out) = real.run("hook", &["start", "--group", "g", "--wait", "snapshotted"]).await;
    assert_eq!(code, 0);
    let id = out.trim().to_string();
    let (code, out) = real
        .run("hook", &["copying", &id, "--server", "srv-b", "--progress", "512/1024", "--json"])
        .await;
    assert_eq!(code, 0, "{out}");
    let backup = json(&out);
    assert_eq!(
        (
            backup["servers"][1]["copied_bytes"].as_u64(),
            backup["servers"][1]["total_bytes"].as_u64()
        ),
        (Some(512), Some(1024))
    );
    let (code, out) = real.run("hook", &["copying", &id, "--server", "srv-b"]).await;
    assert_eq!(
        (code, out.as_str()),
        (
            0,
            format!(
                "reported copy of srv-b for backup {id}: still copying; backup is now COPYING\n"
            )
            .as_str()
        )
    );
    assert_eq!(
        real.run("viewer", &["copying", &id, "--server", "srv-b"]).await.0,
        2,
        "viewers may not"
    );
    assert!(Cli::try_parse_from([
        "backupctl",
        "copying",
        "x",
        "--server",
        "s",
        "--progress",
        "5/2"
    ])
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_artifacts_and_artifacts_writes_them_from_the_catalog() {
    let real = Real::start(Spec::default()).await;
    real.cluster.agent("srv-b").hand_over(&[("pg", "backup_label", b"START WAL LOCATION")]);
    let (code, out) = real.run("hook", &["start", "--group", "g", "--wait", "snapshotted"]).await;
    assert_eq!(code, 0, "{out}");
    let id = out.lines().next().unwrap().split_whitespace().next().unwrap().to_string();

    let (code, out) = real.run("viewer", &["status", &id]).await;
    assert_eq!(code, 0);
    let row = out
        .lines()
        .find(|l| l.starts_with("srv-b") && l.contains(" pg "))
        .unwrap_or_else(|| panic!("{out}"));
    let words: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(words, ["srv-b", "pg", "backup_label", "18", "B"], "{out}");
    let (_, out) = real.run("viewer", &["status", &id, "--json"]).await;
    let servers = &json(&out)["servers"];
    assert_eq!(
        servers[1]["artifacts"],
        serde_json::json!([{"quiescer": "pg", "name": "backup_label", "size_bytes": 18}])
    );
    assert_eq!(servers[0]["artifacts"], serde_json::json!([]));

    let to = real._dir.path().join("fetched");
    let to = to.to_str().unwrap();
    let (code, out) = real.run("hook", &["artifacts", &id, "--to", to]).await;
    assert_eq!(code, 0, "{out}");
    let file = format!("{to}/srv-b/artifacts/pg/backup_label");
    assert_eq!(std::fs::read(&file).unwrap(), b"START WAL LOCATION");
    assert_eq!(
        out.trim(),
        format!("wrote artifact pg/backup_label of srv-b in backup {id} (18 B) to {file}")
    );
    let (code, out) = real.run("hook", &["artifacts", &id, "--server", "srv-a", "--to", to]).await;
    assert_eq!(
        (code, out.trim()),
        (0, format!("the catalog holds no artifacts of backup {id} of srv-a").as_str())
    );
    let (code, _) = real.run("viewer", &["artifacts", &id, "--to", to]).await;
    assert_eq!(code, 2, "a viewer may not read their bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shows_short_ids_and_every_verb_takes_them() {
    let real = Real::start(Spec::default()).await;
    let (code, id) = real.run("hook", &["start", "--group", "h"]).await;
    assert_eq!(code, 0);
    let id = id.trim().to_string();
    let short = id.rsplit_once('-').map(|(_, r)| r.to_string()).unwrap();
    let (_, list) = real.run("viewer", &["list"]).await;
    assert!(list.lines().any(|l| l.starts_with(&format!("{short} "))), "{list}");
    let (code, status) = real.run("viewer", &["status", &short, "--json"]).await;
    assert_eq!(code, 0, "{status}");
    assert_eq!(json(&status)["backup_id"], id.as_str());
    let (code, log) = real.run("viewer", &["log", &short]).await;
    assert_eq!(code, 0);
    assert!(!log.is_empty());
    // Whole ids in --json, always.
    let (_, list) = real.run("viewer", &["list", "--json"]).await;
    assert_eq!(json(&list)[0]["backup_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_shows_next_and_last_run_and_operators_suspend_and_resume() {
    let spec = Spec {
        timezone: Some("Europe/Berlin".into()),
        schedules: vec![stillpoint_listener::config::ScheduleConfig {
            name: "nightly".into(),
            group: "g".into(),
            cron: "0 22 * * *".into(),
            enabled: None,
        }],
        ..Spec::default()
    };
    let real = Real::start(spec).await;
    let (code, out) = real.run("viewer", &["schedules", "--json"]).await;
    assert_eq!(code, 0);
    let listed = json(&out);
    let next = listed[0]["next_unix_ms"].as_i64().expect("a next run");
    assert_eq!(listed[0]["time_zone"], "Europe/Berlin");
    assert!(listed[0]["last"].is_null());
    // The schedule fires at its time (the test gives the time), by StartBackup's path.
    real.cluster.tick_schedules(next).await;
    let (code, out) = real.run("viewer", &["schedules"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("time zone: Europe/Berlin\nNAME "), "{out}");
    let row = out.lines().nth(2).expect("a row");
    assert!(row.starts_with("nightly  g      0 22 * * *"), "{out}");
    assert!(row.contains(" 22:00 CET (in ") || row.contains(" 22:00 CEST (in "), "{out}");
    assert!(row.contains("  started "), "{out}");
    assert!(row.ends_with("  no"), "{out}");
    let (code, out) = real.run("viewer", &["list", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(json(&out)[0]["started_by"], "schedule:nightly");

    let (code, _) = real.run("viewer", &["schedules", "suspend", "nightly"]).await;
    assert_eq!(code, 2, "viewers may not suspend");
    let (code, out) = real.run("operator", &["schedules", "suspend", "nightly"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "schedule nightly suspended: it starts nothing until resumed\n")
    );
    let (code, out) = real.run("operator", &["schedules", "resume", "nightly", "--json"]).await;
    assert_eq!(code, 0);
    let resumed = json(&out);
    assert_eq!(resumed["suspended"], false);
    assert!(resumed["next_unix_ms"].as_i64().is_some(), "{resumed}");
    let (code, _) = real.run("operator", &["schedules", "resume", "weekly"]).await;
    assert_eq!(code, 2, "an unknown schedule is refused");
}

/// `backupctl preflight GROUP` goes through the listener to every agent of the group: each is
/// reached with the certificate of its name and its own findings come back under its name; an
/// unknown group and a viewer are refused (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_reaches_each_agent_of_the_group_by_name_for_operators_only() {
    let real = Real::start(Spec::default()).await;
    let (code, out) = real.run("operator", &["preflight", "g"]).await;
    assert_eq!(code, 0, "{out}");
    // The default group `g` is srv-a and srv-b; srv-c is in the inventory but not asked.
    assert!(!out.contains("srv-c"), "{out}");
    for server in ["srv-a", "srv-b"] {
        let reachable = out
            .lines()
            .find(|l| l.contains(server) && l.contains("reachable"))
            .unwrap_or_else(|| panic!("no reachable line for {server}:\n{out}"));
        assert!(reachable.starts_with("ok "), "{reachable}");
        assert!(reachable.contains(&format!("with the certificate of {server}")), "{reachable}");
        assert!(out.lines().any(|l| l.contains(server) && l.contains("a scripted agent")), "{out}");
    }
    assert!(out.ends_with("4 ok, 0 warning(s), 0 error(s)\n"), "{out}");

    let (code, out) = real.run("operator", &["preflight", "g", "--json"]).await;
    assert_eq!(code, 0);
    let rows = json(&out);
    assert_eq!(rows.as_array().unwrap().len(), 4, "{out}");
    assert_eq!(rows[0]["level"], "ok");

    assert_eq!(real.run("operator", &["preflight", "nope"]).await.0, 2);
    assert_eq!(real.run("viewer", &["preflight", "g"]).await.0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_forgets_after_a_backup_and_pin_list_status_retention_say_so() {
    use stillpoint_listener::config::CopyConfig;
    use stillpoint_listener::retention::RetentionConfig;
    let spec = Spec {
        copy: CopyConfig::Command { command: vec!["/bin/true".into()] },
        retention: vec![("h".into(), RetentionConfig { keep_recent: 1, ..Default::default() })],
        ..Spec::default()
    };
    let real = Real::start(spec).await;
    let (code, b1) = real.run("operator", &["start", "--group", "h", "--wait", "complete"]).await;
    assert_eq!(code, 0, "{b1}");
    let b1 = b1.trim().to_string();
    let (code, b2) = real.run("operator", &["start", "--group", "h", "--wait", "complete"]).await;
    assert_eq!(code, 0, "{b2}");
    let b2 = b2.trim().to_string();

    // After b2 ended, the group's rules (1 recent) forgot b1 by themselves.
    let mut client = real.cluster.client("operator");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let request = stillpoint_proto::GetBackupRequest { backup_id: b1.clone() };
        if client.get_backup(request).await.unwrap().into_inner().expired_unix_ms > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "retention never forgot {b1}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, out) = real.run("operator", &["retention", "h", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        format!(
            "keep       {b2}  SUCCEEDED  last good, recent 1/1\n\
             dry run: 0 backup(s) would be forgotten, nothing changed; forgetting deletes nothing: in copy mode command the listener stores no copy; the catalog marks it expired and the copies made elsewhere are not touched\n"
        )
    );
    // Tables show the ids' random tails (README "Watching a backup").
    let tail = |id: &str| id.rsplit_once('-').map(|(_, t)| t.to_string()).unwrap_or_default();
    let (_, listed) = real.run("viewer", &["list", "--group", "h"]).await;
    assert!(listed.contains(&tail(&b2)) && !listed.contains(&tail(&b1)), "{listed}");
    let (_, listed) = real.run("viewer", &["list", "--group", "h", "--all"]).await;
    assert!(listed.contains(&tail(&b1)) && listed.contains("SUCCEEDED (expired)"), "{listed}");
    let (_, status) = real.run("viewer", &["status", &b1]).await;
    assert!(status.contains("forgotten by retention, its copy deleted"), "{status}");

    let (code, out) = real.run("operator", &["pin", &b2]).await;
    assert_eq!((code, out), (0, format!("backup {b2} pinned: retention never forgets it\n")));
    let (_, listed) = real.run("viewer", &["list", "--group", "h"]).await;
    assert!(listed.contains("SUCCEEDED (pinned)"), "{listed}");
    let (code, out) = real.run("operator", &["pin", &b2, "--json"]).await;
    assert_eq!((code, json(&out)["pinned"].as_bool()), (0, Some(true)), "pinning twice is fine");
    let (code, _) = real.run("operator", &["pin", &b1]).await;
    assert_eq!(code, 2, "a forgotten backup cannot be pinned");
    let (code, _) = real.run("viewer", &["unpin", &b2]).await;
    assert_eq!(code, 2, "operators only");
    let (code, out) = real.run("operator", &["unpin", &b2]).await;
    assert_eq!(code, 0);
    assert_eq!(out, format!("backup {b2} not pinned: retention decides it by its group's rules\n"));
}
