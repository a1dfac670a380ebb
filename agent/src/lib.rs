//! The stillpoint agent: the per-server daemon that quiesces applications, freezes, snapshots
//! and thaws on the listener's orders, and thaws by itself when its freeze lease runs out.
//!
//! # Layout
//! `config` (TOML), `lease` (pure lease math), `quiesce` and `snapshot` (plug-in traits, one
//! file per kind), `backups` (the state table and operations), `service` (gRPC), `testing`
//! (fakes). [`run`] wires them behind mutual TLS; `main.rs` only parses arguments.

pub mod backups;
pub mod config;
pub mod error;
pub mod lease;
pub mod quiesce;
pub mod service;
pub mod snapshot;
pub mod testing;

use std::future::Future;
use std::time::Duration;

use stillpoint_core::identity::Role;
use stillpoint_core::layers::{AuthorizeLayer, TraceLayer};
use stillpoint_proto::agent_server::AgentServer;
use tracing::info;

pub use config::Config;
pub use error::{Error, Result};

/// Only the listener gives agents orders; nobody else may call any Agent method.
fn policy(path: &str, role: Role) -> bool {
    path.starts_with("/stillpoint.v1.Agent/") && role == Role::Listener
}

/// Serves the agent on `listener` (already bound) until `shutdown` completes, then thaws
/// anything still frozen. The config should have passed `validate()`.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let quiescers = quiesce::build(&config);
    let provider = snapshot::build(&config)?;
    let tls = stillpoint_core::tls::server_config(&config.tls)?;
    let backups =
        backups::Backups::new(&config.server, config.volumes.clone(), quiescers, provider);
    let service = service::AgentService::new(backups.clone(), config.max_lease_ms);
    // Long enough for the slowest Prepare (every exec timeout) plus a Commit's snapshots.
    let exec_ms: u64 = config
        .quiescers
        .iter()
        .map(|q| match q {
            config::QuiescerConfig::Exec { timeout_ms, .. } => timeout_ms.saturating_mul(2),
            config::QuiescerConfig::Fsfreeze { .. } => 0,
        })
        .sum();
    let timeout =
        Duration::from_millis(exec_ms.saturating_add(config.max_lease_ms).saturating_add(300_000));

    info!(server = %config.server, addr = ?listener.local_addr().ok(), "agent listening");
    let served = tonic::transport::Server::builder()
        .timeout(timeout)
        .layer(tower::ServiceBuilder::new().layer(AuthorizeLayer::new(policy)).layer(TraceLayer))
        .add_service(AgentServer::new(service))
        .serve_with_incoming_shutdown(stillpoint_core::tls::incoming(listener, tls), shutdown)
        .await;
    backups.shutdown().await;
    info!(server = %config.server, "agent stopped");
    Ok(served?)
}
