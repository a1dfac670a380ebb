//! Test helpers: a CA with listener, agent, operator and viewer certificates; an agent served
//! in-process on 127.0.0.1:0; clients by role; loop-mounted filesystems that are thawed,
//! unmounted and detached on Drop, even after a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stillpoint_agent::config::{QuiescerConfig, SavesetConfig, SnapshotConfig};
use stillpoint_agent::Config;
use stillpoint_core::certs;
use stillpoint_core::identity::Role;
use stillpoint_core::tls::TlsFiles;
use stillpoint_proto::agent_client::AgentClient;
use stillpoint_proto::{AgentBackup, StatusRequest};
use stillpoint_saveset::{InitOptions, KdfParams, Repository, Secret};
use tonic::transport::Channel;

/// A saveset repository made in `dir/repo` (a cheap KDF: the tests open it often) with its
/// passphrase `words` in `dir/pass`, as the agent's `[saveset]` table: no copy delay, no
/// `base_dir`, the default sampling verify.
pub fn saveset_repo(dir: &Path, words: &str) -> SavesetConfig {
    let repo = dir.join("repo");
    let opts = InitOptions {
        kdf: KdfParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 },
        ..InitOptions::default()
    };
    Repository::init_with(&repo, &Secret::passphrase(words), opts).unwrap();
    let pass = dir.join("pass");
    std::fs::write(&pass, format!("{words}\n")).unwrap();
    SavesetConfig {
        repository: repo.display().to_string(),
        passphrase_file: Some(pass),
        key_file: None,
        copy_delay_ms_per_mib: 0,
        base_dir: None,
        sample: stillpoint_saveset::DEFAULT_SAMPLE_PERCENT,
        memory_budget_mib: None,
    }
}

/// A deployment CA in a temp dir with one certificate per role.
pub struct Certs {
    dir: tempfile::TempDir,
    pub server: String,
}

impl Certs {
    pub fn new(server: &str) -> Certs {
        let dir = tempfile::tempdir().unwrap();
        certs::create_ca(dir.path(), "test CA", 1).unwrap();
        let hosts = ["127.0.0.1".to_string(), "localhost".to_string()];
        certs::issue(dir.path(), Role::Agent, server, &hosts, 1).unwrap();
        certs::issue(dir.path(), Role::Listener, "listener", &[], 1).unwrap();
        certs::issue(dir.path(), Role::Operator, "operator", &[], 1).unwrap();
        certs::issue(dir.path(), Role::Viewer, "viewer", &[], 1).unwrap();
        Certs { dir, server: server.to_string() }
    }

    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles {
            ca: self.dir.path().join(certs::CA_CERT),
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}.key")),
        }
    }
}

/// A config for `certs.server` with the given quiescers and provider.
pub fn config(
    certs: &Certs,
    volumes: &[&str],
    quiescers: Vec<QuiescerConfig>,
    snapshot: SnapshotConfig,
) -> Config {
    Config {
        server: certs.server.clone(),
        listen: "127.0.0.1:0".into(),
        max_lease_ms: 60_000,
        volumes: volumes.iter().map(|v| v.to_string()).collect(),
        tls: certs.files(&certs.server),
        quiescers,
        snapshot,
        state_dir: certs.dir.path().join("state"),
        saveset: None,
        metrics: None,
    }
}

/// An exec quiescer whose commands leave marker files `<dir>/<name>.pre` and `.post` holding
/// the backup id, server and phase they saw.
pub fn marker_quiescer(name: &str, dir: &Path) -> QuiescerConfig {
    let script = |suffix: &str| {
        vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!(
                "echo \"$STILLPOINT_BACKUP_ID $STILLPOINT_SERVER $STILLPOINT_PHASE\" > {}/{name}.{suffix}",
                dir.display()
            ),
        ]
    };
    QuiescerConfig::Exec {
        name: name.into(),
        pre_freeze: Some(script("pre")),
        post_thaw: Some(script("post")),
        timeout_ms: 10_000,
        artifacts_dir: None,
    }
}

/// An agent served in-process; shut down (and so thawed) on `stop` or Drop.
pub struct Agent {
    pub port: u16,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<stillpoint_agent::Result<()>>>,
}

impl Agent {
    pub async fn start(config: Config) -> Agent {
        config.validate().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            let _ = rx.await;
        };
        let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_stillpoint-agent"));
        let task =
            tokio::spawn(stillpoint_agent::run_with_guardian(config, listener, shutdown, bin));
        Agent { port, shutdown: Some(tx), task: Some(task) }
    }

    /// A client presenting `name`'s certificate.
    pub fn client(&self, certs: &Certs, name: &str) -> AgentClient<Channel> {
        let channel = stillpoint_core::tls::channel(
            &format!("https://127.0.0.1:{}", self.port),
            &certs.server,
            &certs.files(name),
            Duration::from_secs(30),
        )
        .unwrap();
        AgentClient::new(channel)
    }

    /// Stops serving and waits for the agent to thaw and return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Polls Status until `backup` reaches `phase`, or panics after `within`.
pub async fn wait_for_phase(
    client: &mut AgentClient<Channel>,
    backup: &str,
    phase: &str,
    within: Duration,
) -> AgentBackup {
    let deadline = Instant::now() + within;
    loop {
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        let found = status.backups.into_iter().find(|b| b.backup_id == backup);
        match found {
            Some(b) if b.phase().label() == phase => return b,
            other if Instant::now() > deadline => {
                panic!("backup {backup} did not reach {phase} within {within:?}: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Runs a command; panics with its stderr when it fails. Returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An image file attached to a loop device and mounted. On Drop: FITHAW (so nothing is left
/// frozen), unmount (lazily if still busy), detach.
pub struct LoopMount {
    pub device: String,
    pub mount: PathBuf,
}

impl LoopMount {
    /// Attaches `image` and mounts it at `mount` (created) with `options`.
    pub fn new(image: &Path, mount: &Path, read_only: bool, options: &str) -> LoopMount {
        std::fs::create_dir_all(mount).unwrap();
        let image = image.to_str().unwrap();
        let device = if read_only {
            run("losetup", &["--find", "--show", "--read-only", image])
        } else {
            run("losetup", &["--find", "--show", image])
        };
        // Own the device from here, so a failed mount still detaches it.
        let lm = LoopMount { device, mount: PathBuf::new() };
        run("mount", &["-o", options, &lm.device, mount.to_str().unwrap()]);
        LoopMount { device: lm.release(), mount: mount.to_path_buf() }
    }

    fn release(mut self) -> String {
        std::mem::take(&mut self.device)
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if !self.mount.as_os_str().is_empty() {
            if let Ok(dir) = std::fs::File::open(&self.mount) {
                let _ = stillpoint_core::sys::thaw(&dir);
            }
            let quiet = |args: &[&str]| Command::new("umount").args(args).output();
            let mount = self.mount.to_str().unwrap_or_default();
            if !quiet(&[mount]).is_ok_and(|o| o.status.success()) {
                let _ = quiet(&["-l", mount]);
            }
        }
        if !self.device.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.device]).output();
        }
    }
}

/// A sparse image file of `size` bytes.
pub fn sparse_image(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// A file `dir/password` holding `password`, as a quiescer's `password_file` reads it.
pub fn password_file(dir: &Path, password: &str) -> PathBuf {
    let path = dir.join("password");
    std::fs::write(&path, format!("{password}\n")).unwrap();
    path
}

/// Writes `name` with `body` in `dir` and fsyncs it.
pub fn write_synced(dir: &Path, name: &str, body: &str) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    f.write_all(body.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

/// A thread making one acknowledged write after another against an application under test:
/// `write(i)` makes write `i` (1, 2, ...) and returns what to record as acknowledged, or an
/// error that ends the thread. Tests watch whether writes wait (not fail) while frozen.
pub struct Writer {
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// When the write now running was sent, if one is.
    waiting_since: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
    /// The longest a single write took.
    longest: std::sync::Arc<std::sync::Mutex<Duration>>,
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(mut write: impl FnMut(u64) -> Result<u64, String> + Send + 'static) -> Writer {
        use std::sync::atomic::Ordering;
        let mut writer = Writer {
            acked: Default::default(),
            waiting_since: Default::default(),
            longest: Default::default(),
            errors: Default::default(),
            stop: Default::default(),
            thread: None,
        };
        let (acked, waiting_since, longest, errors, stop) = (
            writer.acked.clone(),
            writer.waiting_since.clone(),
            writer.longest.clone(),
            writer.errors.clone(),
            writer.stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let began = Instant::now();
                *waiting_since.lock().unwrap() = Some(began);
                let done = write(i);
                *waiting_since.lock().unwrap() = None;
                let took = began.elapsed();
                let mut held = longest.lock().unwrap();
                *held = (*held).max(took);
                drop(held);
                match done {
                    Ok(value) => acked.store(value, Ordering::SeqCst),
                    Err(e) => {
                        errors.lock().unwrap().push(e);
                        return;
                    }
                }
            }
        });
        writer.thread = Some(thread);
        writer
    }

    /// The last value acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `at_least` is acknowledged; how long that took. Fails on a write error or
    /// after `within`.
    pub fn wait_for(&self, at_least: u64, within: Duration) -> Duration {
        let started = Instant::now();
        while self.acked() < at_least {
            assert!(self.errors.lock().unwrap().is_empty(), "{:?}", self.errors.lock().unwrap());
            assert!(started.elapsed() < within, "the writer stalled at {}", self.acked());
            std::thread::sleep(Duration::from_millis(2));
        }
        started.elapsed()
    }

    /// The errors met so far (a write error ends the thread).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// The longest a single write has taken so far.
    pub fn longest(&self) -> Duration {
        *self.longest.lock().unwrap()
    }

    /// How long the write now running has waited.
    pub fn waiting(&self) -> Option<Duration> {
        self.waiting_since.lock().unwrap().map(|t| t.elapsed())
    }

    /// Stops the thread; the errors it met.
    pub fn stop(mut self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.errors.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
