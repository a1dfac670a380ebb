//! The stillpoint agent: the per-server daemon that quiesces applications, freezes, snapshots
//! and thaws on the listener's orders, and thaws by itself when its freeze lease runs out.
//!
//! # Layout
//! `config` (TOML), `lease` (pure lease math), `quiesce` and `snapshot` (plug-in traits, one
//! file per kind), `backups` (the state table and operations), `guardian` (the second process
//! that thaws when the agent cannot) with `journal` and `armed`, `copy` (the saveset copier
//! behind Copy), `replay` (the journal replayed after a stop), `preflight` (the agent's own
//! checks), `service` (gRPC), `sys` (`kill(2)`, from `stillpoint-sys`), `testing` (fakes).
//! [`run`] wires them behind mutual TLS; `main.rs` only parses arguments.

pub mod armed;
pub mod backups;
pub mod config;
pub mod convert;
pub mod copy;
pub mod error;
pub mod guardian;
pub mod journal;
pub mod metrics;
pub mod preflight;
pub mod quiesce;
pub mod replay;
pub mod service;
pub mod snapshot;
pub mod sys;
pub mod testing;

/// The pure lease math, shared with the simulation.
pub use stillpoint_protocol::lease;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use stillpoint_core::identity::Role;
use stillpoint_core::layers::{AuthorizeLayer, TraceLayer};
use stillpoint_proto::agent_server::AgentServer;
use tracing::info;

pub use config::Config;
pub use error::{Error, Result};

/// Only the listener gives agents orders; nobody else may call any Agent method. Anyone
/// authenticated may probe the standard health service.
fn policy(path: &str, role: Role) -> bool {
    stillpoint_core::layers::is_health_check(path)
        || (path.starts_with("/stillpoint.v1.Agent/") && role == Role::Listener)
}

/// Creates `state_dir` and runs every thaw action a previous agent left in its journal (the
/// agent and its guardian were both killed while frozen). Call before listening; [`run`] calls
/// it again, which then finds nothing.
pub fn recover(config: &Config) -> Result<journal::Journal> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| Error::Setup(format!("state_dir {}: {e}", config.state_dir.display())))?;
    let path = journal::Journal::path(&config.state_dir, &config.server);
    journal::recover(&path).map_err(|e| Error::Setup(format!("journal: {e}")))
}

pub(crate) fn pidfile(state_dir: &Path, server: &str) -> PathBuf {
    state_dir.join(format!("{server}.guardian.pid"))
}

/// Serves the agent on `listener` (already bound) until `shutdown` completes, then thaws
/// anything still frozen and stops the guardian. The guardian is this same executable. The
/// config should have passed `validate()`.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Setup(format!("find the agent executable to run the guardian: {e}")))?;
    run_with_guardian(config, listener, shutdown, exe).await
}

/// Like [`run`], with the guardian started as `<guardian_exe> guardian` (for tests, whose own
/// executable is not the agent).
pub async fn run_with_guardian(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    guardian_exe: PathBuf,
) -> Result<()> {
    // Unlock the repository first: a wrong secret stops the start before anything runs.
    let saveset = match config.saveset.clone() {
        Some(c) => Some(std::sync::Arc::new({
            let cache = config.state_dir.join("cache");
            tokio::task::spawn_blocking(move || copy::Saveset::open(&c, Some(&cache)))
                .await
                .map_err(|e| Error::Internal(format!("unlock the saveset repository: {e}")))??
        })),
        None => None,
    };
    let recovered = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || recover(&config))
            .await
            .map_err(|e| Error::Internal(format!("recovery: {e}")))??
    };
    let quiescers = quiesce::build(&config, &guardian_exe);
    let provider = snapshot::build(&config)?;
    let tls = stillpoint_core::tls::server_config(&config.tls)?;
    let program = guardian::link::Program::Exe {
        exe: guardian_exe,
        journal: recovered.path_of().to_path_buf(),
    };
    let pidfile = pidfile(&config.state_dir, &config.server);
    let armed =
        tokio::task::spawn_blocking(move || armed::Armed::start(program, recovered, Some(pidfile)))
            .await
            .map_err(|e| Error::Internal(format!("start guardian: {e}")))?;
    let certs = [("agent", config.tls.cert.as_path()), ("ca", config.tls.ca.as_path())];
    let backups =
        backups::Backups::new(&config.server, config.volumes.clone(), quiescers, provider, armed)
            .with_metrics(std::sync::Arc::new(metrics::Metrics::new(&certs)));
    let _metrics = match &config.metrics {
        Some(m) => Some(stillpoint_core::metrics::serve(m, backups.metrics().registry()).await?),
        None => None,
    };
    let guardian_pid = backups.guardian_pid().await;
    info!(?guardian_pid, "freeze guardian running");
    let watch = tokio::spawn({
        let backups = backups.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                backups.check_guardian().await;
            }
        }
    });
    let service =
        service::AgentService::new(backups.clone(), std::sync::Arc::new(config.clone()), saveset);
    // Long enough for the slowest Prepare (every exec timeout) plus a Commit's snapshots.
    let exec_ms: u64 = config
        .quiescers
        .iter()
        .map(|q| match q {
            config::QuiescerConfig::Exec { timeout_ms, .. } => timeout_ms.saturating_mul(2),
            // Connect, read settings, start backup mode; stop it at the thaw.
            config::QuiescerConfig::Postgres(pg) => pg.timeout_ms.saturating_mul(4),
            config::QuiescerConfig::Sqlite(c) => c.timeout_ms.saturating_add(3000),
            config::QuiescerConfig::Process(c) => c.worst_case_ms(),
            config::QuiescerConfig::Mysql(c) => c.timeout_ms.saturating_mul(2),
            config::QuiescerConfig::Redis(c) => c.timeout_ms.saturating_mul(2),
            config::QuiescerConfig::Fsfreeze { .. } | config::QuiescerConfig::Stop { .. } => 0,
        })
        .sum();
    let timeout =
        Duration::from_millis(exec_ms.saturating_add(config.max_lease_ms).saturating_add(300_000));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<service::AgentService>>().await;
    info!(server = %config.server, addr = ?listener.local_addr().ok(), "agent listening");
    let served = tonic::transport::Server::builder()
        .timeout(timeout)
        // Pings answered are reads: a quiet Watch or Copy stays under the accept loop's idle limit.
        .http2_keepalive_interval(Some(stillpoint_core::tls::HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(stillpoint_core::tls::HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(100))
        .concurrency_limit_per_connection(32)
        .layer(tower::ServiceBuilder::new().layer(AuthorizeLayer::new(policy)).layer(TraceLayer))
        .add_service(
            AgentServer::new(service)
                .max_decoding_message_size(stillpoint_core::MAX_CONTROL_MESSAGE),
        )
        .add_service(health_service)
        .serve_with_incoming_shutdown(stillpoint_core::tls::incoming(listener, tls), shutdown)
        .await;
    watch.abort();
    backups.shutdown().await;
    info!(server = %config.server, "agent stopped");
    Ok(served?)
}
