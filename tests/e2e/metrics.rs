//! The metrics scraped: a real listener and agents with `[metrics]` endpoints run one backup,
//! then each endpoint is scraped over HTTP and its exposition parsed; the values a dashboard
//! and its alerts rely on must hold. The listener logs JSON (`--log-format json`), the agents
//! too (`STILLPOINT_LOG_FORMAT=json`): every line is an object, and a backup's lines carry it.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;

use serde_json::Value;
use stillpoint_core::testing::{http_get, Exposition};

use crate::harness::{incompressible, Cluster, Copy, Spec};

fn app_quiescer(_: &str, _: &std::path::Path) -> String {
    "[[quiescer]]\nkind = \"exec\"\nname = \"app\"\ntimeout_ms = 5000\npre_freeze = [\"/bin/true\"]\npost_thaw = [\"/bin/true\"]\n".into()
}

fn json_agents(_: &str) -> Vec<String> {
    vec!["env".into(), "STILLPOINT_LOG_FORMAT=json".into()]
}

fn unix_seconds() -> f64 {
    (stillpoint_core::unix_ms() / 1000) as f64
}

async fn scrape(at: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || http_get(at, &path))
        .await
        .expect("scrape thread")
        .unwrap_or_else(|e| panic!("scrape {at}: {e}"))
}

async fn metrics(at: SocketAddr) -> Exposition {
    let (status, body) = scrape(at, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    Exposition::parse(&body).unwrap_or_else(|e| panic!("{e}:\n{body}"))
}

/// Every non-empty line of a log is one JSON object; returns them.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect()
}

/// True if some line ran inside a span whose fields include every pair of `fields`.
fn has_span(lines: &[Value], fields: &[(&str, &str)]) -> bool {
    lines
        .iter()
        .filter_map(|l| l["spans"].as_array())
        .flatten()
        .any(|span| fields.iter().all(|(k, v)| span[*k].as_str() == Some(*v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backup_shows_in_the_metrics_scraped_from_the_listener_and_every_agent() {
    let mut spec = Spec::three(app_quiescer);
    spec.copy = Copy::SavesetOnAgent { verify: "index", agent: |_| Some(0) };
    spec.metrics = true;
    spec.json_logs = true;
    spec.agent_wrapper = json_agents;
    let cluster = Cluster::start(spec).await;
    for (i, server) in cluster.spec.servers.iter().enumerate() {
        let lun = cluster.array.lun_path(server, "data").expect("lun");
        let file = std::fs::OpenOptions::new().write(true).open(&lun).expect("open LUN");
        file.write_all_at(&incompressible(0x3E7 + i as u64, 1 << 20), 0).expect("write LUN");
        file.sync_all().expect("sync LUN");
    }
    let listener_at = cluster.listener_metrics.expect("listener metrics endpoint");
    let before = unix_seconds();

    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    assert_eq!(code, 0, "{backup:#}\n{}", cluster.listener_log());
    assert_eq!(backup["state"], "SUCCEEDED", "{backup:#}");
    let id = backup["backup_id"].as_str().expect("backup id").to_string();
    let after = unix_seconds() + 1.0;

    let listener = metrics(listener_at).await;
    let g = [("group", "g")];
    assert_eq!(
        listener.get("stillpoint_backups_total", &[("group", "g"), ("state", "SUCCEEDED")]),
        Some(1.0)
    );
    assert_eq!(listener.matching("stillpoint_backups_total", &g).count(), 1, "no other outcome");
    assert_eq!(listener.get("stillpoint_backups_running", &g), Some(0.0));
    let last = listener.get("stillpoint_last_success_timestamp_seconds", &g).expect("last success");
    assert!((before..=after).contains(&last), "last success {last} not in [{before}, {after}]");
    for phase in ["prepare", "commit", "copy"] {
        let count = listener.get("stillpoint_phase_seconds_count", &[("phase", phase)]);
        assert_eq!(count, Some(1.0), "phase {phase}");
    }
    let windows: f64 =
        listener.matching("stillpoint_freeze_window_seconds_count", &[]).map(|s| s.value).sum();
    assert_eq!(windows, 3.0, "one freeze window per server");
    for server in &cluster.spec.servers {
        let s = [("server", server.as_str())];
        assert_eq!(
            listener.get("stillpoint_freeze_window_seconds_count", &s),
            Some(1.0),
            "{server}"
        );
        assert_eq!(listener.get("stillpoint_agent_up", &s), Some(1.0), "{server}");
        let copied = listener.get("stillpoint_copy_bytes_total", &s);
        assert_eq!(copied, Some(cluster.spec.lun_bytes as f64), "{server}: the whole LUN was read");
        let stored = listener.get("stillpoint_stored_bytes_total", &s).expect("stored bytes");
        assert!(
            stored >= (1 << 20) as f64,
            "{server}: 1 MiB that does not compress, stored {stored}"
        );
    }
    for cert in ["listener", "ca"] {
        let expiry =
            listener.get("stillpoint_certificate_expiry_timestamp_seconds", &[("cert", cert)]);
        assert!(expiry.is_some_and(|at| at > after + 86_400.0), "{cert}: {expiry:?}");
    }
    assert_eq!(listener.matching("stillpoint_build_info", &[]).map(|s| s.value).sum::<f64>(), 1.0);
    assert_eq!(scrape(listener_at, "/").await.0, 404);

    for agent in &cluster.agents {
        let scraped = metrics(agent.metrics.expect("agent metrics endpoint")).await;
        let name = agent.name.as_str();
        assert_eq!(scraped.get("stillpoint_agent_freezes_total", &[]), Some(1.0), "{name}");
        assert_eq!(
            scraped.get("stillpoint_agent_freeze_window_seconds_count", &[]),
            Some(1.0),
            "{name}"
        );
        assert_eq!(scraped.get("stillpoint_agent_lease_expiries_total", &[]), Some(0.0), "{name}");
        let froze = [("action", "freeze"), ("name", "app")];
        assert_eq!(scraped.get("stillpoint_agent_step_seconds_count", &froze), Some(1.0), "{name}");
        let snapshot =
            scraped.matching("stillpoint_agent_step_seconds_count", &[("action", "snapshot")]);
        assert_eq!(snapshot.map(|s| s.value).sum::<f64>(), 1.0, "{name}");
        let read = scraped.get("stillpoint_agent_copy_read_bytes_total", &[]).expect("read bytes");
        assert!(read >= (1 << 20) as f64, "{name}: read {read}");
        let expiry =
            scraped.get("stillpoint_certificate_expiry_timestamp_seconds", &[("cert", "agent")]);
        assert!(expiry.is_some_and(|at| at > after + 86_400.0), "{name}: {expiry:?}");
    }

    // JSON logs: the backup's lines carry its id and group (listener) or id and server (agent).
    let lines = json_lines(&cluster.listener_log());
    assert!(
        has_span(&lines, &[("name", "backup"), ("backup", &id), ("group", "g")]),
        "listener log"
    );
    for agent in &cluster.agents {
        let lines = json_lines(&agent.proc.log_text());
        assert!(
            has_span(&lines, &[("backup", &id), ("server", &agent.name)]),
            "{} log",
            agent.name
        );
    }
}
