//! The refusal throttle's arithmetic with time passed in, the reason named for each way a real
//! handshake fails, and, against a real tonic server over loopback mTLS with short limits: a
//! silent connection is closed, a quiet gRPC stream whose client answers pings is not.

use std::net::Ipv4Addr;
use std::path::Path;

use stillpoint_proto::agent_client::AgentClient;
use stillpoint_proto::agent_server::{Agent, AgentServer};
use stillpoint_proto::{
    AbortRequest, AbortResponse, CleanupRequest, CleanupResponse, CommitRequest, CommitResponse,
    CopyEvent, CopyRequest, PrepareRequest, PrepareResponse, StatusRequest, StatusResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

use super::*;
use crate::certs::{self, IssuedFiles};
use crate::identity::Role;
use crate::tls::{certs_from, key_from, provider, server_config, TlsFiles};

const MINUTE: Duration = Duration::from_secs(60);

fn peer(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, 0, last), port))
}

fn lines(notes: &[Note]) -> Vec<String> {
    notes.iter().map(ToString::to_string).collect()
}

#[test]
fn refusals_warn_once_per_peer_a_minute_then_count_the_rest() {
    let t0 = Instant::now();
    let mut log = Refusals::new(MINUTE);
    assert_eq!(
        lines(&log.refused(t0, peer(5, 1000), Refusal::NoCertificate)),
        ["refused TLS connection from 10.0.0.5:1000: no client certificate (a client must \
          present one issued by this deployment's CA)"]
    );
    // The same address again within the minute, from any port: counted, not logged.
    for i in 0..30 {
        assert!(log
            .refused(t0 + Duration::from_secs(1), peer(5, 1001 + i), Refusal::NoCertificate)
            .is_empty());
    }
    for _ in 0..7 {
        let late = Refusal::TimedOut(Duration::from_secs(10));
        assert!(log.refused(t0 + Duration::from_secs(59), peer(5, 2000), late).is_empty());
    }
    // Another address has its own minute.
    assert_eq!(log.refused(t0 + Duration::from_secs(2), peer(6, 1), Refusal::Closed).len(), 1);

    // After the minute: the count first, then the refusal that ended the quiet.
    let notes = log.refused(t0 + Duration::from_secs(61), peer(5, 3000), Refusal::UnknownIssuer);
    assert_eq!(
        lines(&notes),
        [
            "refused 37 more TLS connections from 10.0.0.5 in the last 61 s: no client \
             certificate (30), handshake timed out (7)",
            "refused TLS connection from 10.0.0.5:3000: a client certificate from another CA, \
             not this deployment's",
        ]
    );
    assert!(log.refused(t0 + Duration::from_secs(62), peer(5, 3001), Refusal::Closed).is_empty());
}

#[test]
fn counts_are_reported_when_the_minute_ends_and_quiet_peers_are_forgotten() {
    let t0 = Instant::now();
    let mut log = Refusals::new(MINUTE);
    log.refused(t0, peer(5, 1), Refusal::NoCertificate);
    log.refused(t0 + Duration::from_secs(10), peer(5, 2), Refusal::Closed);
    log.refused(t0, peer(6, 1), Refusal::NoCertificate);
    assert!(log.flush(t0 + Duration::from_secs(59)).is_empty());
    assert_eq!(
        lines(&log.flush(t0 + Duration::from_secs(70))),
        ["refused 1 more TLS connection from 10.0.0.5 in the last 70 s: closed before the \
          handshake (1)"]
    );
    // 10.0.0.6 had nothing to report and was forgotten; 10.0.0.5's count restarted its minute.
    assert_eq!(log.peers.len(), 1);
    assert!(log.refused(t0 + Duration::from_secs(100), peer(5, 3), Refusal::Closed).is_empty());
    assert_eq!(log.refused(t0 + Duration::from_secs(100), peer(6, 3), Refusal::Closed).len(), 1);
    assert_eq!(log.flush(t0 + Duration::from_secs(200)).len(), 1);
    assert!(log.flush(t0 + Duration::from_secs(300)).is_empty());
    assert!(log.peers.is_empty(), "{:?}", log.peers);
}

#[test]
fn default_limits_leave_room_for_the_keepalive() {
    let limits = ConnectionLimits::default();
    // A live client answers a ping well before its connection counts as silent.
    assert!(HTTP2_KEEPALIVE_INTERVAL + HTTP2_KEEPALIVE_TIMEOUT < limits.idle / 4);
    assert!(limits.handshake <= Duration::from_secs(10));
    assert!(limits.first_read <= Duration::from_secs(10));
}

/// Our CA with an agent (the server) and a listener (the client), and another CA's listener.
struct Pki {
    _dir: tempfile::TempDir,
    server: IssuedFiles,
    client: IssuedFiles,
    stranger: IssuedFiles,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let theirs = dir.path().join("theirs");
    certs::create_ca(&ours, "ours", 2).unwrap();
    certs::create_ca(&theirs, "theirs", 2).unwrap();
    Pki {
        server: certs::issue(&ours, Role::Agent, "srv-a", &[], 2).unwrap(),
        client: certs::issue(&ours, Role::Listener, "listener", &[], 2).unwrap(),
        stranger: certs::issue(&theirs, Role::Listener, "listener", &[], 2).unwrap(),
        _dir: dir,
    }
}

fn files(f: &IssuedFiles) -> TlsFiles {
    TlsFiles { ca: f.ca.clone(), cert: f.cert.clone(), key: f.key.clone() }
}

/// A TLS client trusting the CA at `trust`, presenting `identity` if any.
fn connector(trust: &Path, identity: Option<&IssuedFiles>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs_from(trust).unwrap() {
        roots.add(ca).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(certs_from(&id.cert).unwrap(), key_from(&id.key).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn server_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("srv-a").unwrap()
}

#[derive(Debug, Clone, Copy)]
enum Client {
    NoCertificate,
    OtherCaCertificate,
    DistrustsTheServer,
    PlainHttp,
    HangsUp,
}

/// What the server side of a real handshake with `client` is refused for.
async fn refusal(pki: &Pki, client: Client) -> Refusal {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&files(&pki.server)).unwrap());
    let ours = pki.server.ca.clone();
    let (client_cert, stranger) = (pki.client.clone(), pki.stranger.clone());
    let client = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let tls = match client {
            Client::NoCertificate => connector(&ours, None),
            Client::OtherCaCertificate => connector(&ours, Some(&stranger)),
            Client::DistrustsTheServer => connector(&stranger.ca, Some(&client_cert)),
            Client::PlainHttp => {
                tcp.write_all(b"GET / HTTP/1.1\r\nHost: srv-a\r\n\r\n").await.unwrap();
                let _ = tcp.read(&mut [0u8; 64]).await;
                return;
            }
            Client::HangsUp => return,
        };
        if let Ok(mut stream) = tls.connect(server_name(), tcp).await {
            // TLS 1.3: the client learns of the refusal only when it reads.
            let _ = stream.read(&mut [0u8; 64]).await;
        }
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let Err(error) = acceptor.accept(tcp).await else { panic!("the handshake is accepted") };
    client.await.unwrap();
    classify(&error)
}

#[tokio::test]
async fn a_refused_handshake_is_logged_with_its_real_reason() {
    let pki = pki();
    assert_eq!(refusal(&pki, Client::NoCertificate).await, Refusal::NoCertificate);
    assert_eq!(refusal(&pki, Client::OtherCaCertificate).await, Refusal::UnknownIssuer);
    assert!(
        matches!(refusal(&pki, Client::DistrustsTheServer).await, Refusal::ClientAlert(ref a) if a.contains("UnknownCA")),
    );
    assert!(matches!(refusal(&pki, Client::PlainHttp).await, Refusal::Protocol(_)));
    assert_eq!(refusal(&pki, Client::HangsUp).await, Refusal::Closed);
}

/// An agent whose Copy streams one event after `copy_after` and whose other RPCs are refused.
struct QuietAgent {
    copy_after: Duration,
}

#[tonic::async_trait]
impl Agent for QuietAgent {
    async fn prepare(
        &self,
        _: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn commit(&self, _: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn release(
        &self,
        _: Request<stillpoint_proto::ReleaseRequest>,
    ) -> Result<Response<stillpoint_proto::ReleaseResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn abort(&self, _: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn cleanup(
        &self,
        _: Request<CleanupRequest>,
    ) -> Result<Response<CleanupResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }
    async fn preflight(
        &self,
        _: Request<stillpoint_proto::AgentPreflightRequest>,
    ) -> Result<Response<stillpoint_proto::AgentPreflightResponse>, Status> {
        Err(Status::unimplemented("test agent"))
    }

    type CopyStream = ReceiverStream<Result<CopyEvent, Status>>;

    async fn copy(&self, _: Request<CopyRequest>) -> Result<Response<Self::CopyStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let after = self.copy_after;
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(Ok(CopyEvent::default())).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

const SHORT: ConnectionLimits = ConnectionLimits {
    handshake: Duration::from_millis(500),
    first_read: Duration::from_millis(500),
    idle: Duration::from_millis(1000),
    refusal_log_every: Duration::from_secs(60),
};

/// Serves [`QuietAgent`] on loopback through [`incoming_with`] under `limits`, pinging every
/// `keepalive` if given; returns its address. The server stops with the test's runtime.
async fn serve(pki: &Pki, limits: ConnectionLimits, keepalive: Option<Duration>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = incoming_with(listener, server_config(&files(&pki.server)).unwrap(), limits);
    let copy_after = limits.idle * 3;
    tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(Some(limits.idle))
            .add_service(AgentServer::new(QuietAgent { copy_after }))
            .serve_with_incoming(incoming),
    );
    addr
}

/// Reads until the server closes the connection (end of stream or an error); the time taken.
async fn until_closed(mut read: impl AsyncRead + Unpin) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let wait = tokio::time::timeout(Duration::from_secs(10), async {
        while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    wait.await.expect("the server closes a silent connection");
    started.elapsed()
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_within_the_limit() {
    let pki = pki();
    let addr = serve(&pki, SHORT, Some(Duration::from_millis(200))).await;

    // Plain TCP that never starts a handshake.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let took = until_closed(tcp).await;
    assert!(took >= SHORT.handshake - Duration::from_millis(50) && took < 3 * SHORT.handshake);

    // A client with a valid certificate that completes the handshake, then says nothing.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector(&pki.server.ca, Some(&pki.client)).connect(server_name(), tcp).await;
    let took = until_closed(tls.expect("a valid client is accepted")).await;
    assert!(
        took >= SHORT.first_read - Duration::from_millis(50) && took < 3 * SHORT.first_read,
        "closed after {took:?}"
    );
}

/// Opens Copy on a server under `SHORT` limits and waits for its one event, sent after three
/// idle limits of silence.
async fn quiet_copy(keepalive: Option<Duration>) -> Result<Option<CopyEvent>, Status> {
    let pki = pki();
    let addr = serve(&pki, SHORT, keepalive).await;
    let channel = crate::tls::channel(
        &format!("https://{addr}"),
        "srv-a",
        &files(&pki.client),
        Duration::from_secs(30),
    )
    .unwrap();
    let mut stream = AgentClient::new(channel).copy(CopyRequest::default()).await?.into_inner();
    stream.message().await
}

#[tokio::test]
async fn a_quiet_grpc_stream_whose_client_answers_pings_stays_open() {
    let event = quiet_copy(Some(Duration::from_millis(200))).await;
    assert!(matches!(event, Ok(Some(_))), "{event:?}");
    // Without the server's pings the same quiet stream is cut: the pings are what keep it.
    let event = quiet_copy(None).await;
    assert!(event.is_err(), "{event:?}");
}
