//! The postgres quiescer in the real agent binary, against a private PostgreSQL 15: an agent
//! SIGSTOPped while it holds backup mode loses it at the lease (the guardian hangs up its
//! connection), and a SIGKILLed one at once (the kernel closes it).

use std::path::Path;
use std::time::{Duration, Instant};

use stillpoint_core::san::Array;

use crate::guardian::{mock_san_toml, prepare, BinAgent};
use crate::support::{run, Certs};

#[path = "../../src/quiesce/postgres/tests/cluster.rs"]
#[allow(dead_code)]
mod cluster;
use cluster::Cluster;

const SESSIONS: &str =
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'stillpoint'";

/// A cluster that archives nowhere (enough to be allowed backup mode), and an agent holding it
/// through its socket, its snapshots on a mock SAN LUN nothing writes to.
async fn setup(dir: &Path, certs: &Certs) -> (Cluster, Array, BinAgent) {
    let pg = Cluster::archiving(dir);
    let array = Array::init(&dir.join("array")).expect("array");
    array.create_lun(&certs.server, "data", 4 << 20).expect("lun");
    let quiescer = format!(
        "[[quiescer]]\nkind = \"postgres\"\nname = \"pg\"\nhost = {:?}\nport = {}\n",
        pg.socket_dir, pg.port
    );
    let agent =
        BinAgent::start(dir, certs, &dir.join("state"), &quiescer, &mock_san_toml(&array)).await;
    (pg, array, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_agent_loses_backup_mode_at_its_lease() {
    if let Some(why) = cluster::missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::new("srv-pg");
    let (pg, _array, agent) = setup(dir.path(), &certs).await;
    let mut client = agent.client(&certs);
    let sent = Instant::now();
    let p = client.prepare(prepare("b1", 2000)).await.expect("prepare").into_inner();
    assert!(p.prepared, "{p:?}");
    assert_eq!(pg.psql(SESSIONS), "1", "backup mode is held on the agent's connection");
    run("kill", &["-STOP", &agent.pid()]);
    // The lease plus the 3 s the fault suite allows a loaded machine.
    pg.wait_for(SESSIONS, "0", Duration::from_secs(5)).expect("the session ended at the lease");
    let ended = sent.elapsed();
    eprintln!("backup mode ended {}ms after Prepare with a 2000ms lease", ended.as_millis());
    assert!(ended >= Duration::from_millis(1900), "ended before the lease");
    assert_eq!(
        stillpoint_agent::quiesce::stop::state(agent.child.id() as i32),
        Some('T'),
        "the agent was stopped the whole time"
    );
    let log = agent.wait_log("closed the connection of quiescer pg", Duration::from_secs(5));
    assert!(log.contains("guardian: lease of"), "{log}");
    assert!(
        pg.log_text()
            .contains("aborting backup due to backend exiting before pg_backup_stop was called"),
        "{}",
        pg.log_text()
    );
    run("kill", &["-CONT", &agent.pid()]);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_loses_backup_mode_at_once() {
    if let Some(why) = cluster::missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = Certs::new("srv-pk");
    let (pg, _array, agent) = setup(dir.path(), &certs).await;
    let p = agent.client(&certs).prepare(prepare("b1", 30_000)).await.expect("prepare");
    assert!(p.into_inner().prepared);
    assert_eq!(pg.psql(SESSIONS), "1");
    let killed = Instant::now();
    run("kill", &["-KILL", &agent.pid()]);
    // Well inside the 30 s lease, so not the guardian's doing; a loaded machine may be slow.
    pg.wait_for(SESSIONS, "0", Duration::from_secs(10)).expect("the session ended with the agent");
    eprintln!("backup mode ended {}ms after SIGKILL", killed.elapsed().as_millis());
    drop(agent);
}
