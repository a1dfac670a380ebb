//! The Prometheus endpoint both daemons serve: `GET /metrics` in the OpenMetrics text format over
//! plain HTTP on an address of its own (`[metrics]`), 404 for any other path, 403 for a peer not
//! in `allow`. What each daemon measures lives in its own `metrics` module; this is only the
//! serving, the config table, and the two series both have (build info, certificate expiry).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::net::TcpListener;

use crate::{Error, Result};

/// The OpenMetrics text format's content type, as Prometheus asks for it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `[metrics]` in either daemon's config: where the endpoint listens and who may scrape it.
/// Absent table: no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Plain HTTP, no TLS: bind it to loopback or a management network.
    pub listen: SocketAddr,
    /// Peer addresses allowed to scrape; empty: every peer.
    #[serde(default)]
    pub allow: Vec<IpAddr>,
}

impl MetricsConfig {
    /// Problems with the table, one line each, for a config's `validate()`: `service` is the
    /// daemon's own gRPC address, which the endpoint cannot share.
    pub fn problems(&self, service: Option<SocketAddr>) -> Vec<String> {
        let mut out = Vec::new();
        if service.is_some_and(|s| s.port() == self.listen.port() && self.listen.port() != 0) {
            out.push(format!(
                "metrics.listen: {} uses the service's own port; give the metrics endpoint a port of its own (e.g. 9464)",
                self.listen
            ));
        }
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabel {
    cert: String,
}

/// `stillpoint_build_info{version} 1`: which build is running.
pub fn register_build_info(registry: &mut Registry, version: &str) {
    let info = Family::<VersionLabel, Gauge>::default();
    info.get_or_create(&VersionLabel { version: version.to_string() }).set(1);
    registry.register(
        "stillpoint_build_info",
        "The running build: always 1, with its version",
        info,
    );
}

/// `stillpoint_certificate_expiry_timestamp_seconds{cert}`: when each named certificate stops
/// being valid (Unix seconds). A certificate that cannot be read is left out and logged, so the
/// series' absence is what an alert sees; nothing is guessed.
pub fn register_certificate_expiry(registry: &mut Registry, certs: &[(&str, &Path)]) {
    let expiry = Family::<CertLabel, Gauge>::default();
    for (name, path) in certs {
        match certificate_expiry(path) {
            Ok(at) => {
                expiry.get_or_create(&CertLabel { cert: name.to_string() }).set(at);
            }
            Err(e) => tracing::warn!(cert = name, error = %e, "certificate expiry not exported"),
        }
    }
    registry.register(
        "stillpoint_certificate_expiry_timestamp_seconds",
        "When the certificate stops being valid (its notAfter), Unix seconds",
        expiry,
    );
}

/// The notAfter of the first certificate in a PEM file, in Unix seconds.
pub fn certificate_expiry(path: &Path) -> Result<i64> {
    Ok(crate::certs::inspect(path)?.not_after.unix_timestamp())
}

/// The endpoint, serving until dropped: dropping it stops the accept loop and every
/// connection it started.
pub struct Endpoint {
    task: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl Endpoint {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `config.listen` and serves `registry` there until the returned [`Endpoint`] is dropped.
/// Fails at once if the address cannot be bound, so a daemon does not start without the
/// endpoint its config asks for.
pub async fn serve(config: &MetricsConfig, registry: Arc<Registry>) -> Result<Endpoint> {
    let socket = TcpListener::bind(config.listen).await.map_err(|e| Error::Io {
        path: format!("metrics.listen {}", config.listen).into(),
        source: e,
    })?;
    let addr = socket.local_addr().map_err(|e| Error::io("metrics.listen", e))?;
    tracing::info!(%addr, "metrics endpoint serving");
    let task = tokio::spawn(accept(socket, registry, config.allow.clone()));
    Ok(Endpoint { task, addr })
}

async fn accept(socket: TcpListener, registry: Arc<Registry>, allow: Vec<IpAddr>) {
    // Dropped with the accept loop, which aborts every connection still open.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let registry = Arc::clone(&registry);
        let allowed = allow.is_empty() || allow.contains(&peer.ip().to_canonical());
        connections.spawn(connection(stream, peer, registry, allowed));
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    registry: Arc<Registry>,
    allowed: bool,
) {
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = respond(request.method(), request.uri().path(), allowed, &registry);
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    // A scrape takes milliseconds; a connection kept open longer than this is cut.
    match tokio::time::timeout(Duration::from_secs(60), served).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics endpoint: connection failed"),
        Err(_) => tracing::debug!(%peer, "metrics endpoint: connection open too long; closed"),
    }
}

/// The answer to one request: the exposition for `GET /metrics` from an allowed peer.
fn respond(
    method: &Method,
    path: &str,
    allowed: bool,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
            response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    let text = "text/plain; charset=utf-8";
    if !allowed {
        return reply(
            StatusCode::FORBIDDEN,
            text,
            "forbidden: this address may not scrape\n".into(),
        );
    }
    if path != "/metrics" {
        return reply(StatusCode::NOT_FOUND, text, "not found: metrics are at /metrics\n".into());
    }
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, text, "use GET\n".into());
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => reply(StatusCode::OK, CONTENT_TYPE, body),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, text, format!("encode: {e}\n")),
    }
}

#[cfg(test)]
mod tests;
