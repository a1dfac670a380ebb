//! For tests only, the listener's and backupctl's: the real listener served in-process on
//! loopback mutual TLS (on a runtime of its own, so a restart drops everything it ran, like a
//! crash), beside scripted agents that answer as a test tells them. The daemon never uses this.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stillpoint_core::certs;
use stillpoint_core::identity::Role;
use stillpoint_core::tls::{self, TlsFiles};
use stillpoint_proto as pb;
use stillpoint_proto::agent_server::{Agent, AgentServer};
use stillpoint_proto::listener_client::ListenerClient;
use tokio::sync::{oneshot, watch};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::{Config, CopyConfig, GroupConfig, ScheduleConfig, ServerConfig, TimeoutConfig};

/// What a test cluster is made of. The default: servers `srv-a`, `srv-b`, `srv-c`; group `g`
/// of `srv-a` and `srv-b`, group `h` of `srv-c`; the backup software reports copies.
pub struct Spec {
    pub servers: Vec<String>,
    /// Each group's name and servers.
    pub groups: Vec<(String, Vec<String>)>,
    pub copy: CopyConfig,
    pub timeouts: TimeoutConfig,
    /// `[notify]`, and each group's `no_good_backup_after` by name.
    pub notify: Option<stillpoint_notify::NotifyConfig>,
    pub no_good_backup_after: Vec<(String, std::time::Duration)>,
    /// The listener's `timezone` (none: the system's) and its `[[schedule]]`s (none).
    pub timezone: Option<String>,
    pub schedules: Vec<ScheduleConfig>,
    /// Groups with `[group.retention]`, by name; the others keep everything.
    pub retention: Vec<(String, crate::retention::RetentionConfig)>,
}

impl Default for Spec {
    fn default() -> Self {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Spec {
            servers: names(&["srv-a", "srv-b", "srv-c"]),
            groups: vec![("g".into(), names(&["srv-a", "srv-b"])), ("h".into(), names(&["srv-c"]))],
            copy: CopyConfig::Report,
            // No sweep during a test: scripted agents hold nothing.
            timeouts: TimeoutConfig { sweep_interval_ms: 3_600_000, ..TimeoutConfig::default() },
            notify: None,
            no_good_backup_after: Vec::new(),
            timezone: None,
            schedules: Vec::new(),
            retention: Vec::new(),
        }
    }
}

/// A step of the protocol a scripted agent can be told to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prepare = 0,
    Commit = 1,
    Cleanup = 2,
}

/// An `Agent` service that prepares, commits (one 1 MiB snapshot, volume `data`), aborts and
/// cleans up at once, unless a step is held; it records every call as `"<rpc> <backup>"`.
/// Commit (and Release) hand over the artifacts a test gave it.
#[derive(Clone)]
pub struct ScriptedAgent {
    server: String,
    calls: Arc<Mutex<Vec<String>>>,
    gates: Arc<[watch::Sender<bool>; 3]>,
    artifacts: Arc<Mutex<Vec<pb::Artifact>>>,
    /// Where Commit writes each snapshot as a real file (its locator); none: a made-up locator.
    snapshot_dir: Arc<Mutex<Option<PathBuf>>>,
}

impl ScriptedAgent {
    fn new(server: &str) -> Self {
        ScriptedAgent {
            server: server.to_string(),
            calls: Arc::default(),
            gates: Arc::new([0, 1, 2].map(|_| watch::channel(true).0)),
            artifacts: Arc::default(),
            snapshot_dir: Arc::default(),
        }
    }

    /// From now on Commit writes each snapshot as a real 1 MiB file in `dir`,
    /// `<backup>-<server>.img` (its bytes name both), so a copier on the listener can read it.
    pub fn write_snapshots_in(&self, dir: &Path) {
        *self.snapshot_dir.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.to_path_buf());
    }

    fn snapshot_locator(&self, id: &str) -> Result<String, Status> {
        let dir = self.snapshot_dir.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(dir) = dir else { return Ok(format!("/scripted/{id}/{}", self.server)) };
        let path = dir.join(format!("{id}-{}.img", self.server));
        let line = format!("{id} {} ", self.server);
        let bytes: Vec<u8> = line.bytes().cycle().take(1 << 20).collect();
        std::fs::write(&path, bytes)
            .map_err(|e| Status::internal(format!("snapshot file: {e}")))?;
        Ok(path.display().to_string())
    }

    /// What its quiescers hand over from now on: `(quiescer, name, bytes)`.
    pub fn hand_over(&self, artifacts: &[(&str, &str, &[u8])]) {
        *self.artifacts.lock().unwrap_or_else(|p| p.into_inner()) = artifacts
            .iter()
            .map(|(quiescer, name, bytes)| pb::Artifact {
                quiescer: quiescer.to_string(),
                name: name.to_string(),
                content: bytes.to_vec(),
            })
            .collect();
    }

    fn artifacts(&self) -> Vec<pb::Artifact> {
        self.artifacts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Calls to `step` wait (without answering) until [`release`](Self::release).
    pub fn hold(&self, step: Step) {
        self.gates[step as usize].send_replace(false);
    }

    pub fn release(&self, step: Step) {
        self.gates[step as usize].send_replace(true);
    }

    /// Every call so far, e.g. `"abort 20240501T123456Z-1a2b3c"`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn record(&self, rpc: &str, backup_id: &str) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{rpc} {backup_id}"));
    }

    async fn pass(&self, step: Step) {
        let mut gate = self.gates[step as usize].subscribe();
        let _ = gate.wait_for(|open| *open).await;
    }
}

type CopyEvents = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::CopyEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for ScriptedAgent {
    /// One ok finding naming the agent, so a pre-flight through the listener can be followed.
    async fn preflight(
        &self,
        _: Request<pb::AgentPreflightRequest>,
    ) -> Result<Response<pb::AgentPreflightResponse>, Status> {
        let finding = stillpoint_core::preflight::Finding::ok("scripted", "a scripted agent")
            .on(&self.server);
        Ok(Response::new(pb::AgentPreflightResponse { findings: vec![(&finding).into()] }))
    }

    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let id = request.into_inner().backup_id;
        self.record("prepare", &id);
        self.pass(Step::Prepare).await;
        Ok(Response::new(pb::PrepareResponse {
            prepared: true,
            freeze_token: format!("freeze-{id}"),
            ..Default::default()
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        let id = request.into_inner().backup_id;
        self.record("commit", &id);
        self.pass(Step::Commit).await;
        let snapshot = pb::Snapshot {
            volume: "data".into(),
            provider: "scripted".into(),
            locator: self.snapshot_locator(&id)?,
            size_bytes: 1 << 20,
        };
        Ok(Response::new(pb::CommitResponse {
            committed: true,
            snapshots: vec![snapshot],
            artifacts: self.artifacts(),
            ..Default::default()
        }))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        self.record("abort", &request.into_inner().backup_id);
        Ok(Response::new(pb::AbortResponse { thawed: true, snapshots_deleted: 0 }))
    }

    async fn cleanup(
        &self,
        request: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupResponse>, Status> {
        self.record("cleanup", &request.into_inner().backup_id);
        self.pass(Step::Cleanup).await;
        Ok(Response::new(pb::CleanupResponse { snapshots_deleted: 1 }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            server: self.server.clone(),
            version: "scripted".into(),
            backups: Vec::new(),
            hold: pb::HoldClass::StorageOnly.into(),
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.record("release", &request.into_inner().backup_id);
        Ok(Response::new(pb::ReleaseResponse {
            held_until_release: true,
            artifacts: self.artifacts(),
            ..Default::default()
        }))
    }

    type CopyStream = CopyEvents;

    async fn copy(&self, _: Request<pb::CopyRequest>) -> Result<Response<CopyEvents>, Status> {
        Err(Status::unimplemented("a scripted agent does not copy"))
    }
}

/// The listener on a thread and runtime of its own; dropping it stops both.
struct Running {
    /// Ends the listener at once (a crash).
    stop: Option<oneshot::Sender<()>>,
    /// Resolves `run`'s shutdown future (a SIGTERM).
    graceful: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The real listener and its scripted agents, with certificates for `operator`, `viewer`,
/// `hook` and each agent in `<root>/certs`.
pub struct Cluster {
    pub root: PathBuf,
    pub certs: PathBuf,
    pub config: Config,
    pub agents: Vec<ScriptedAgent>,
    listener: Option<Running>,
    /// The running listener's runtime and the tokio runtime it runs on (weak: a restart drops
    /// it as a crash would).
    live: Arc<Mutex<Option<Live>>>,
}

impl Cluster {
    /// Makes certificates, serves the scripted agents on this runtime and starts the listener;
    /// returns once the listener answers the standard health check.
    pub async fn start(root: &Path, spec: Spec) -> Cluster {
        let certs = root.join("certs");
        certs::create_ca(&certs, "stillpoint test CA", 1).expect("create the test CA");
        let local = ["127.0.0.1".to_string()];
        let listener_files =
            certs::issue(&certs, Role::Listener, "listener", &local, 1).expect("listener cert");
        for (role, name) in
            [(Role::Operator, "operator"), (Role::Viewer, "viewer"), (Role::Hook, "hook")]
        {
            certs::issue(&certs, role, name, &[], 1).expect("client cert");
        }
        let mut agents = Vec::new();
        let mut servers = Vec::new();
        for server in &spec.servers {
            let files = certs::issue(&certs, Role::Agent, server, &local, 1).expect("agent cert");
            let files = TlsFiles { ca: files.ca, cert: files.cert, key: files.key };
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind an agent");
            let address = tcp.local_addr().expect("agent address").to_string();
            let agent = ScriptedAgent::new(server);
            let incoming = tls::incoming(tcp, tls::server_config(&files).expect("agent TLS"));
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(AgentServer::new(agent.clone()))
                    .serve_with_incoming(incoming),
            );
            agents.push(agent);
            servers.push(ServerConfig { name: server.clone(), address });
        }
        let config = Config {
            data_dir: root.join("listener-data"),
            // The port is chosen when the listener first binds, and kept across restarts.
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: TlsFiles {
                ca: listener_files.ca,
                cert: listener_files.cert,
                key: listener_files.key,
            },
            timeouts: spec.timeouts,
            servers,
            groups: spec
                .groups
                .into_iter()
                .map(|(name, servers)| GroupConfig {
                    no_good_backup_after: (spec.no_good_backup_after.iter())
                        .find(|(group, _)| *group == name)
                        .map(|(_, after)| stillpoint_notify::Period(*after)),
                    retention: spec
                        .retention
                        .iter()
                        .find(|(g, _)| *g == name)
                        .map(|(_, r)| r.clone()),
                    name,
                    servers,
                    require_hold: None,
                    thaw: None,
                })
                .collect(),
            copy: spec.copy,
            notify: spec.notify,
            timezone: spec.timezone,
            schedules: spec.schedules,
            metrics: None,
        };
        let mut cluster = Cluster {
            root: root.to_path_buf(),
            certs,
            config,
            agents,
            listener: None,
            live: Arc::default(),
        };
        cluster.start_listener().await;
        cluster
    }

    pub fn addr(&self) -> SocketAddr {
        self.config.listen
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.config.listen)
    }

    pub fn agent(&self, server: &str) -> &ScriptedAgent {
        self.agents.iter().find(|a| a.server == server).expect("no such scripted agent")
    }

    /// The CA, certificate and key of `identity` (`operator`, `viewer`, `hook` or a server).
    pub fn tls(&self, identity: &str) -> TlsFiles {
        TlsFiles {
            ca: self.certs.join(certs::CA_CERT),
            cert: self.certs.join(format!("{identity}.pem")),
            key: self.certs.join(format!("{identity}.key")),
        }
    }

    /// A channel to the listener as `identity`.
    pub fn channel(&self, identity: &str) -> Channel {
        tls::channel(&self.url(), "listener", &self.tls(identity), Duration::from_secs(20))
            .expect("channel to the listener")
    }

    pub fn client(&self, identity: &str) -> ListenerClient<Channel> {
        ListenerClient::new(self.channel(identity))
    }

    /// Starts the listener on the data directory and port of the config.
    pub async fn start_listener(&mut self) {
        let socket = std::net::TcpListener::bind(self.config.listen).expect("bind the listener");
        socket.set_nonblocking(true).expect("nonblocking listener socket");
        self.config.listen = socket.local_addr().expect("listener address");
        let config = self.config.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (graceful, terminated) = oneshot::channel::<()>();
        let live = Arc::clone(&self.live);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("the listener's runtime");
            runtime.block_on(async move {
                let (mut stopped, mut terminated) = (stopped, terminated);
                // After a restart the previous process's catalog writer may still be letting go
                // of the file for a moment: opening it is tried again, briefly.
                for attempt in 0..50 {
                    let socket = socket.try_clone().expect("clone the listener socket");
                    let socket =
                        tokio::net::TcpListener::from_std(socket).expect("listener socket");
                    let shutdown = async {
                        let _ = (&mut terminated).await;
                    };
                    tokio::select! {
                        result = run_keeping(config.clone(), socket, shutdown, &live) => match result {
                            Err(crate::Error::Store { .. }) if attempt < 49 => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "test listener stopped");
                                return;
                            }
                            Ok(()) => return,
                        },
                        _ = &mut stopped => return,
                    }
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(5));
        });
        self.listener =
            Some(Running { stop: Some(stop), graceful: Some(graceful), thread: Some(thread) });
        self.wait_serving().await;
    }

    /// Drops the listener and everything it ran (as a crash would: nothing is finished) and
    /// starts it again on the same data directory and port.
    pub async fn restart_listener(&mut self) {
        let running = self.listener.take();
        tokio::task::spawn_blocking(move || drop(running)).await.expect("stop the listener");
        self.start_listener().await;
    }

    /// Asks the listener to shut down as SIGTERM does; whether it stopped within `within`.
    pub async fn shut_down_listener(&mut self, within: Duration) -> bool {
        let Some(mut running) = self.listener.take() else { return true };
        if let Some(graceful) = running.graceful.take() {
            let _ = graceful.send(());
        }
        let Some(thread) = running.thread.take() else { return true };
        let joined = tokio::task::spawn_blocking(move || thread.join());
        let stopped = tokio::time::timeout(within, joined).await.is_ok();
        // If it did not stop, dropping `running` now ends it the hard way.
        drop(running);
        stopped
    }

    /// Ticks the listener's schedules at `now` (Unix ms) as its scheduler task would at that
    /// time, on the listener's own runtime: time is an input, a test need not wait for it.
    pub async fn tick_schedules(&self, now: i64) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (runtime, handle) = live.expect("the listener is running");
        let runtime = runtime.upgrade().expect("the listener's runtime is alive");
        handle.spawn(async move { runtime.tick_schedules(now).await }).await.expect("the tick ran");
    }

    async fn wait_serving(&self) {
        use tonic_health::pb::health_client::HealthClient;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut client = HealthClient::new(self.channel("operator"));
        loop {
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            if client.check(request).await.is_ok() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "the listener did not serve in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A running listener's runtime (weak) and the tokio runtime it runs on.
type Live = (std::sync::Weak<crate::runtime::Runtime>, tokio::runtime::Handle);

/// `crate::run`, keeping a weak handle on the runtime for [`Cluster::tick_schedules`].
async fn run_keeping(
    config: Config,
    socket: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
    live: &Mutex<Option<Live>>,
) -> crate::Result<()> {
    let runtime = tokio::task::spawn_blocking(move || crate::runtime::Runtime::open(config))
        .await
        .map_err(|e| crate::Error::Io(std::io::Error::other(e)))??;
    *live.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((Arc::downgrade(&runtime), tokio::runtime::Handle::current()));
    crate::serve(runtime, socket, shutdown).await
}
