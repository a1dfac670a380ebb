//! The backup listener: inventory of servers and groups, the two-phase coordinator, the copy and
//! cleanup phases, and the catalog of backups with their event logs.
//!
//! `coordinator` is the protocol as a pure state machine; `runtime` drives it (persist, then act);
//! `agents` calls the agents, `copier` copies; `service` is the gRPC face; `store` the catalog;
//! `preflight` the checks of `--check` and `backupctl preflight`.

pub mod agents;
pub mod config;
pub mod convert;
pub mod copier;
pub mod details;
pub mod error;
pub mod feed;
pub mod forget;
pub mod metrics;
pub mod pages;
pub mod pins;
pub mod preflight;
pub mod repo_catalog;
pub mod requests;
pub mod retention;
pub mod runtime;
pub mod schedule;
pub mod service;
pub mod store;
pub mod testing;
pub mod wait;

/// The protocol's pure core, re-exported under the names the listener's modules use.
pub use stillpoint_protocol::{coordinator, model};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use stillpoint_core::layers::{AuthorizeLayer, TraceLayer};
use stillpoint_proto::listener_server::ListenerServer;
use tokio::net::TcpListener;

pub use config::Config;
pub use error::{Error, Result};

/// Serves the listener on an already-bound socket until `shutdown` resolves: opens the catalog,
/// then [`serve`]s.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let runtime = tokio::task::spawn_blocking(move || runtime::Runtime::open(config))
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
    serve(runtime, listener, shutdown).await
}

/// Serves `runtime` on an already-bound socket until `shutdown` resolves. Backups a previous run
/// left unfinished are taken over first; the sweep starts. When this returns, every background
/// task of the runtime has been told to stop.
pub async fn serve(
    runtime: Arc<runtime::Runtime>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let _stop = runtime.stop_on_drop();
    let config = runtime.config();
    let tls = stillpoint_core::tls::server_config(&config.tls)?;
    let _metrics = match &config.metrics {
        Some(m) => Some(stillpoint_core::metrics::serve(m, runtime.metrics().registry()).await?),
        None => None,
    };
    // Long enough for the longest WaitBackup; every other handler is bounded by the RPCs it
    // makes (rpc_ms, lease_ms).
    let rpc_timeout = Duration::from_millis(config.timeouts.rpc_ms.max(config.timeouts.lease_ms))
        .max(wait::MAX_WAIT + Duration::from_secs(5));
    let recovered = runtime.recover()?;
    if recovered > 0 {
        tracing::warn!(recovered, "took over backups left unfinished by the previous run");
    }
    runtime.spawn_sweeper();
    runtime.spawn_notify();
    runtime.spawn_scheduler();
    // The standard probe beside our own Health: "" and the Listener serve once recovery is done.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ListenerServer<service::ListenerService>>().await;
    tracing::info!(addr = %listener.local_addr()?, "listener serving");
    // Streams that never end by themselves (WatchBackups, a Watch of a backup in flight) end
    // when shutdown begins, so it does not wait on them; so do the runtime's tasks.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stopped = Arc::clone(&runtime);
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
        stopped.stop();
    };
    let layers =
        tower::ServiceBuilder::new().layer(AuthorizeLayer::new(service::policy)).layer(TraceLayer);
    tonic::transport::Server::builder()
        .timeout(rpc_timeout)
        // Pings answered are reads: a quiet Watch or Copy stays under the accept loop's idle limit.
        .http2_keepalive_interval(Some(stillpoint_core::tls::HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(stillpoint_core::tls::HTTP2_KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(100))
        .concurrency_limit_per_connection(32)
        .layer(layers)
        .add_service(
            ListenerServer::new(service::ListenerService::new(Arc::clone(&runtime), stopping))
                .max_decoding_message_size(stillpoint_core::MAX_CONTROL_MESSAGE),
        )
        .add_service(health_service)
        .serve_with_incoming_shutdown(stillpoint_core::tls::incoming(listener, tls), shutdown)
        .await?;
    Ok(())
}
