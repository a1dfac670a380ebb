//! Tower layers wrapped around every tonic service: `Authorize` proves who the caller is from its
//! verified certificate and checks the method against a role policy before any handler runs;
//! `Trace` opens one span per RPC carrying the method, the caller, the backup id and the server.
//! Handlers read the caller from the request's extensions and never repeat these checks.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::identity::{Identity, Role};

/// Metadata key the caller sets to name the backup an RPC is about, for tracing.
pub const BACKUP_HEADER: &str = "x-stillpoint-backup";
/// Metadata key naming the server (agent) an RPC is about, for tracing.
pub const SERVER_HEADER: &str = "x-stillpoint-server";

/// Which roles may call a gRPC method, given its full path (`/stillpoint.v1.Agent/Prepare`).
pub type Policy = fn(path: &str, role: Role) -> bool;

/// Whether `path` is a method of the standard gRPC health service (`grpc.health.v1.Health`),
/// which policies grant to every authenticated caller: load balancers and monitors probe it
/// without knowing our roles.
pub fn is_health_check(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// Reads the verified client certificate and enforces a [`Policy`].
#[derive(Clone, Copy)]
pub struct AuthorizeLayer {
    policy: Policy,
}

impl AuthorizeLayer {
    pub fn new(policy: Policy) -> Self {
        AuthorizeLayer { policy }
    }
}

impl<S> Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authorize { inner, policy: self.policy }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    policy: Policy,
}

/// The caller of the current request, from its certificate.
pub fn caller_of(extensions: &http::Extensions) -> Result<Identity, String> {
    let info = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .ok_or("connection is not TLS: a client certificate is required")?;
    let certs = info.peer_certs().ok_or("no client certificate presented")?;
    let leaf = certs.first().ok_or("no client certificate presented")?;
    Identity::from_der(leaf.as_ref())
}

impl<S, B, R> Service<http::Request<B>> for Authorize<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let verdict = match caller_of(request.extensions()) {
            Err(reason) => Err(tonic::Status::unauthenticated(reason)),
            Ok(id) if (self.policy)(&path, id.role) => Ok(id),
            Ok(id) => Err(tonic::Status::permission_denied(format!(
                "{id} may not call {path}: the {} role lacks this right",
                id.role
            ))),
        };
        match verdict {
            Ok(identity) => {
                request.extensions_mut().insert(identity);
                // Take the clone that was driven ready and leave a fresh one behind.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(request).await })
            }
            Err(status) => {
                tracing::warn!(method = %path, reason = status.message(), "rpc refused");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// Opens an `rpc` span per request with the method, caller, backup and server.
#[derive(Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Trace { inner }
    }
}

#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for Trace<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let header = |key: &str| {
            request.headers().get(key).and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
        };
        let caller =
            request.extensions().get::<Identity>().map(ToString::to_string).unwrap_or_default();
        let span = tracing::info_span!(
            "rpc",
            method = %request.uri().path(),
            caller = %caller,
            backup = %header(BACKUP_HEADER),
            server = %header(SERVER_HEADER),
        );
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { inner.call(request).await }.instrument(span))
    }
}
