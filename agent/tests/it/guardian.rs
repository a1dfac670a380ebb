//! The freeze guardian and journal against real processes: the agent binary SIGKILLed or
//! SIGSTOPped while an XFS loop mount is frozen, both agent and guardian killed, the stop
//! quiescer, a snapshot slower than the lease, and `replay-journal` (systemd's ExecStopPost). Teardown always thaws and resumes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stillpoint_agent::config::{QuiescerConfig, SnapshotConfig};
use stillpoint_core::san::Array;
use stillpoint_proto::agent_client::AgentClient;
use stillpoint_proto::{AbortRequest, CommitRequest, PrepareRequest, StatusRequest};
use tonic::transport::Channel;

use crate::support::{config, run, write_synced, Agent, Certs, LoopMount};

const BIN: &str = env!("CARGO_BIN_EXE_stillpoint-agent");

/// The real agent binary, its stderr in `log`; SIGCONTed and SIGKILLed on Drop.
pub(crate) struct BinAgent {
    pub(crate) child: Child,
    log: PathBuf,
    port: u16,
    /// Its config file, for `replay-journal --config`.
    pub(crate) config: PathBuf,
}

impl BinAgent {
    pub(crate) async fn start(
        dir: &Path,
        certs: &Certs,
        state: &Path,
        quiescers: &str,
        snapshot: &str,
    ) -> BinAgent {
        let port = stillpoint_core::testing::spare_loopback_port();
        let tls = certs.files(&certs.server);
        let toml = format!(
            "server = {:?}\nlisten = \"127.0.0.1:{port}\"\nvolumes = [\"data\"]\nstate_dir = {:?}\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{quiescers}\n[snapshot]\n{snapshot}\n",
            certs.server, state, tls.ca, tls.cert, tls.key
        );
        let path = dir.join(format!("agent-{port}.toml"));
        std::fs::write(&path, toml).unwrap();
        let log = dir.join(format!("agent-{port}.log"));
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let agent = BinAgent { child, log, port, config: path };
        let mut client = agent.client(certs);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = client.status(StatusRequest {}).await {
            assert!(Instant::now() < deadline, "agent never answered: {e}\n{}", agent.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        agent
    }

    pub(crate) fn client(&self, certs: &Certs) -> AgentClient<Channel> {
        let channel = stillpoint_core::tls::channel(
            &format!("https://127.0.0.1:{}", self.port),
            &certs.server,
            &certs.files("listener"),
            Duration::from_secs(30),
        )
        .unwrap();
        AgentClient::new(channel)
    }

    pub(crate) fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `within` for the log to hold `text`.
    pub(crate) fn wait_log(&self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {text:?} in the agent log:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn kill9(&mut self) {
        run("kill", &["-KILL", &self.pid()]);
        self.child.wait().unwrap();
    }
}

impl Drop for BinAgent {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.pid()]).output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `sleep 1000` whose pid is in a pidfile; resumed and killed on Drop.
struct Sleeper {
    child: Child,
    pidfile: PathBuf,
}

impl Sleeper {
    fn start(dir: &Path) -> Sleeper {
        let child = Command::new("sleep").arg("1000").spawn().unwrap();
        let pidfile = dir.join("app.pid");
        std::fs::write(&pidfile, format!("{}\n", child.id())).unwrap();
        Sleeper { child, pidfile }
    }

    fn state(&self) -> char {
        stillpoint_agent::quiesce::stop::state(self.child.id() as i32).unwrap()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.child.id().to_string()]).output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mock SAN array with an XFS LUN `data` of `server`, mounted under `dir/live`.
fn xfs_lun(dir: &Path, server: &str) -> (Array, LoopMount) {
    let array = Array::init(&dir.join("array")).unwrap();
    let lun = array.create_lun(server, "data", 320 << 20).unwrap();
    run("mkfs.xfs", &["-q", "-f", lun.path.to_str().unwrap()]);
    let live = LoopMount::new(&lun.path, &dir.join("live"), false, "rw");
    (array, live)
}

pub(crate) fn mock_san_toml(array: &Array) -> String {
    format!("provider = \"mock-san\"\narray = {:?}\n", array.root())
}

fn fsfreeze_toml(mount: &Path) -> String {
    format!("[[quiescer]]\nkind = \"fsfreeze\"\nmount = {mount:?}\n")
}

/// Writes and fsyncs a file in `mount` on a thread; the receiver hears when it is done. The
/// thread may be abandoned while the filesystem is frozen (teardown thaws it).
fn write_in_thread(mount: &Path, name: &str) -> mpsc::Receiver<Instant> {
    let (tx, rx) = mpsc::channel();
    let (mount, name) = (mount.to_path_buf(), name.to_string());
    std::thread::spawn(move || {
        write_synced(&mount, &name, "written while frozen");
        let _ = tx.send(Instant::now());
    });
    rx
}

pub(crate) fn prepare(id: &str, lease_ms: u64) -> PrepareRequest {
    PrepareRequest { backup_id: id.into(), lease_ms, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_agent_while_frozen_is_thawed_by_the_guardian_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-k");
    let (array, live) = xfs_lun(dir.path(), "srv-k");
    let state = dir.path().join("state");
    let mut agent = BinAgent::start(
        dir.path(),
        &certs,
        &state,
        &fsfreeze_toml(&live.mount),
        &mock_san_toml(&array),
    )
    .await;
    let p = agent.client(&certs).prepare(prepare("b1", 30_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    let written = write_in_thread(&live.mount, "during");
    assert!(written.recv_timeout(Duration::from_millis(300)).is_err(), "not frozen");

    let killed = Instant::now();
    agent.kill9();
    let done = written.recv_timeout(Duration::from_secs(1)).expect("writable within 1s of SIGKILL");
    let reaction = done.duration_since(killed);
    eprintln!("guardian reaction to SIGKILL: {}ms", reaction.as_millis());
    let expected = format!("guardian: agent gone; thawed {} for backup b1", live.mount.display());
    agent.wait_log(&expected, Duration::from_secs(1));
    drop(agent);
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_the_agent_while_frozen_is_thawed_at_the_lease_and_commit_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-s");
    let (array, live) = xfs_lun(dir.path(), "srv-s");
    let state = dir.path().join("state");
    let agent = BinAgent::start(
        dir.path(),
        &certs,
        &state,
        &fsfreeze_toml(&live.mount),
        &mock_san_toml(&array),
    )
    .await;
    let mut client = agent.client(&certs);
    let sent = Instant::now();
    let p = client.prepare(prepare("b1", 2000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    run("kill", &["-STOP", &agent.pid()]);
    let written = write_in_thread(&live.mount, "during");
    let done = written.recv_timeout(Duration::from_secs(3)).expect("writable within lease + 1s");
    assert!(done.duration_since(sent) >= Duration::from_millis(1900), "thawed before the lease");
    let state_now = stillpoint_agent::quiesce::stop::state(agent.child.id() as i32);
    assert_eq!(state_now, Some('T'), "the agent was not stopped the whole time");
    agent.wait_log("guardian: lease of", Duration::from_secs(1));

    run("kill", &["-CONT", &agent.pid()]);
    let c = client
        .commit(CommitRequest {
            backup_id: "b1".into(),
            freeze_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!c.committed);
    assert!(c.reason.contains("lease expired"), "{}", c.reason);
    assert!(array.snapshots(None).unwrap().is_empty());
    drop(agent);
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_guardian_both_killed_leave_it_frozen_until_the_restart_recovers_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-d");
    let (array, live) = xfs_lun(dir.path(), "srv-d");
    let state = dir.path().join("state");
    let (quiescers, snapshot) = (fsfreeze_toml(&live.mount), mock_san_toml(&array));
    let mut agent = BinAgent::start(dir.path(), &certs, &state, &quiescers, &snapshot).await;
    let p = agent.client(&certs).prepare(prepare("b1", 30_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    let guardian = std::fs::read_to_string(state.join("srv-d.guardian.pid")).unwrap();
    // Stopped first, so it cannot respawn the guardian between the two kills.
    run("kill", &["-STOP", &agent.pid()]);
    run("kill", &["-KILL", guardian.trim()]);
    agent.kill9();
    let written = write_in_thread(&live.mount, "during");
    assert!(
        written.recv_timeout(Duration::from_millis(300)).is_err(),
        "thawed with no agent and no guardian"
    );

    let restarted = Instant::now();
    let again = BinAgent::start(dir.path(), &certs, &state, &quiescers, &snapshot).await;
    let done = written.recv_timeout(Duration::from_secs(5)).expect("the restart thaws it");
    eprintln!(
        "double fault: thawed {}ms after restart",
        done.duration_since(restarted).as_millis()
    );
    let log = again.wait_log(
        &format!("recovered frozen mount {} of backup b1", live.mount.display()),
        Duration::from_secs(1),
    );
    assert!(log.contains("WARN"), "{log}");
    drop(again);
    drop(agent);
    drop(live);
}

fn stop_quiescer(pidfile: &Path) -> QuiescerConfig {
    QuiescerConfig::Stop { name: "avimark".into(), pidfile: pidfile.to_path_buf() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_quiescer_stops_the_app_while_frozen_and_resumes_it_after_commit() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-p");
    let array = Array::init(&dir.path().join("array")).unwrap();
    array.create_lun("srv-p", "data", 1 << 20).unwrap();
    let app = Sleeper::start(dir.path());
    let snapshot =
        SnapshotConfig::MockSan { array: array.root().to_path_buf(), snapshot_delay_ms: 0 };
    let agent =
        Agent::start(config(&certs, &["data"], vec![stop_quiescer(&app.pidfile)], snapshot)).await;
    let mut client = agent.client(&certs, "listener");
    let p = client.prepare(prepare("b1", 10_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    assert_eq!(app.state(), 'T');
    let c = client
        .commit(CommitRequest {
            backup_id: "b1".into(),
            freeze_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.committed, "{c:?}");
    assert_ne!(app.state(), 'T');

    // A missing pidfile is refused with a reason naming it; nothing is stopped.
    std::fs::remove_file(&app.pidfile).unwrap();
    let p = client.prepare(prepare("b2", 10_000)).await.unwrap().into_inner();
    assert!(!p.prepared);
    assert!(p.reason.contains("avimark") && p.reason.contains("app.pid"), "{}", p.reason);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_quiescer_app_is_resumed_by_the_guardian_when_the_agent_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-q");
    let array = Array::init(&dir.path().join("array")).unwrap();
    array.create_lun("srv-q", "data", 1 << 20).unwrap();
    let app = Sleeper::start(dir.path());
    let quiescers =
        format!("[[quiescer]]\nkind = \"stop\"\nname = \"avimark\"\npidfile = {:?}\n", app.pidfile);
    let state = dir.path().join("state");
    let mut agent =
        BinAgent::start(dir.path(), &certs, &state, &quiescers, &mock_san_toml(&array)).await;
    let p = agent.client(&certs).prepare(prepare("b1", 30_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    assert_eq!(app.state(), 'T');
    agent.kill9();
    let deadline = Instant::now() + Duration::from_secs(1);
    while app.state() == 'T' {
        assert!(Instant::now() < deadline, "still stopped 1s after the agent died");
        std::thread::sleep(Duration::from_millis(10));
    }
    agent.wait_log(
        &format!("guardian: agent gone; resumed process {} of quiescer avimark", app.child.id()),
        Duration::from_secs(1),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_outlives_the_lease_is_deleted_and_commit_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-w");
    let array = Array::init(&dir.path().join("array")).unwrap();
    array.create_lun("srv-w", "data", 1 << 20).unwrap();
    let counter = dir.path().join("post-thaw.count");
    let app = QuiescerConfig::Exec {
        name: "app".into(),
        pre_freeze: None,
        post_thaw: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("echo ran >> {}", counter.display()),
        ]),
        timeout_ms: 10_000,
        artifacts_dir: None,
    };
    let snapshot =
        SnapshotConfig::MockSan { array: array.root().to_path_buf(), snapshot_delay_ms: 2500 };
    let agent = Agent::start(config(&certs, &["data"], vec![app], snapshot)).await;
    let mut client = agent.client(&certs, "listener");
    assert!(client.prepare(prepare("b1", 1500)).await.unwrap().into_inner().prepared);
    let c = client
        .commit(CommitRequest {
            backup_id: "b1".into(),
            freeze_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!c.committed, "{c:?}");
    assert!(
        c.reason.contains("outlived the lease of 1500ms; deleted")
            && c.reason.starts_with("snapshot took "),
        "{}",
        c.reason
    );
    assert!(c.snapshots.is_empty());
    assert!(array.snapshots(None).unwrap().is_empty());
    // The guardian thawed at the lease, mid-snapshot; the agent did not run post_thaw again.
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "ran\n");
    let a = client
        .abort(AbortRequest { backup_id: "b1".into(), reason: "test".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.snapshots_deleted, 0);
    agent.stop().await;
}

/// `stillpoint-agent replay-journal --config F`: its exit code and stderr.
fn replay_journal(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["replay-journal", "--config"])
        .arg(config)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The degraded case systemd's `ExecStopPost=` covers: agent and guardian both killed while an
/// XFS mount is frozen. `replay-journal` thaws it at once, without starting an agent, and a
/// second run finds nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_journal_thaws_what_a_killed_agent_and_guardian_left_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-r");
    let (array, live) = xfs_lun(dir.path(), "srv-r");
    let state = dir.path().join("state");
    let (quiescers, snapshot) = (fsfreeze_toml(&live.mount), mock_san_toml(&array));
    let mut agent = BinAgent::start(dir.path(), &certs, &state, &quiescers, &snapshot).await;
    let p = agent.client(&certs).prepare(prepare("b1", 30_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    let guardian = std::fs::read_to_string(state.join("srv-r.guardian.pid")).unwrap();
    run("kill", &["-STOP", &agent.pid()]);
    run("kill", &["-KILL", guardian.trim()]);
    agent.kill9();
    let written = write_in_thread(&live.mount, "during");
    assert!(
        written.recv_timeout(Duration::from_millis(300)).is_err(),
        "thawed with no agent and no guardian"
    );

    let (code, stderr) = replay_journal(&agent.config);
    assert_eq!(code, Some(0), "{stderr}");
    written.recv_timeout(Duration::from_secs(5)).expect("replay-journal thaws it");
    let expected = format!("recovered frozen mount {} of backup b1", live.mount.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("1 thaw action(s) run, nothing left frozen"), "{stderr}");

    let (code, stderr) = replay_journal(&agent.config);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("0 thaw action(s) run, nothing left frozen"), "{stderr}");
    assert!(!stderr.contains("recovered"), "{stderr}");
    drop(agent);
    drop(live);
}

/// Run while the agent lives (a mistaken manual run, or ExecStopPost racing a restart), it
/// leaves the agent's freeze alone and says whose journal it is; the agent's own abort thaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_journal_leaves_a_live_agents_freeze_alone() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-l");
    let (array, live) = xfs_lun(dir.path(), "srv-l");
    let state = dir.path().join("state");
    let agent = BinAgent::start(
        dir.path(),
        &certs,
        &state,
        &fsfreeze_toml(&live.mount),
        &mock_san_toml(&array),
    )
    .await;
    let mut client = agent.client(&certs);
    let p = client.prepare(prepare("b1", 30_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");

    let (code, stderr) = replay_journal(&agent.config);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains(&format!("the agent (pid {}) still runs", agent.pid())), "{stderr}");
    let written = write_in_thread(&live.mount, "during");
    assert!(
        written.recv_timeout(Duration::from_millis(300)).is_err(),
        "replay thawed a live freeze"
    );

    client.abort(AbortRequest { backup_id: "b1".into(), reason: "test".into() }).await.unwrap();
    written.recv_timeout(Duration::from_secs(5)).expect("the agent's abort thaws it");
    drop(agent);
    drop(live);
}
