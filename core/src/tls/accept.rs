//! The accept loop both daemons serve on: mutual-TLS handshakes under a deadline, connections
//! closed once their peer goes silent, and refused handshakes logged with their real reason,
//! at most once a minute per peer address. It knows nothing of gRPC but the keepalive it needs.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// How often the daemons' gRPC servers ping every connection (HTTP/2 PING). A live client
/// answers, so a connection with a quiet long-lived stream (a Watch, a Copy) is read from at
/// least this often and never reaches [`ConnectionLimits::idle`].
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a keepalive ping may go unanswered before the server closes the connection.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Deadlines on a server's connections, so that a peer that connects and then says nothing
/// does not hold a socket and a task forever. [`Default`] is what the daemons use; tests pass
/// shorter ones to [`incoming_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The TLS handshake must finish within this, counted from the TCP accept.
    pub handshake: Duration,
    /// After the handshake, the first bytes (the HTTP/2 preface) must arrive within this.
    pub first_read: Duration,
    /// After that, a connection on which nothing at all is read for this long is closed. Must
    /// be well above [`HTTP2_KEEPALIVE_INTERVAL`]: the answers to pings are reads.
    pub idle: Duration,
    /// At most one refusal warning per peer address per this long; the others are counted and
    /// reported in one line.
    pub refusal_log_every: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshake: Duration::from_secs(10),
            first_read: Duration::from_secs(10),
            idle: Duration::from_secs(600),
            refusal_log_every: Duration::from_secs(60),
        }
    }
}

/// [`incoming_with`] under the default limits.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<io::Result<Guarded<TlsStream<TcpStream>>>> {
    incoming_with(listener, config, ConnectionLimits::default())
}

/// Accepts TCP connections on `listener` and yields the ones that complete a mutual-TLS
/// handshake within `limits.handshake`, each closed once it goes silent (see
/// [`ConnectionLimits`]). Refusals are logged with the peer and the reason, throttled per peer
/// address. The accept loop ends when the returned stream is dropped (the server shut down).
pub fn incoming_with(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: ConnectionLimits,
) -> ReceiverStream<io::Result<Guarded<TlsStream<TcpStream>>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let refusals = Arc::new(Mutex::new(Refusals::new(limits.refusal_log_every)));
    tokio::spawn(async move {
        // Counts of suppressed refusals are written once their peer's minute is over, even if
        // that peer never comes back.
        let mut flush = tokio::time::interval(limits.refusal_log_every.max(Duration::from_secs(1)));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                _ = flush.tick() => {
                    let notes = lock(&refusals).flush(Instant::now());
                    notes.iter().for_each(Note::log);
                    continue;
                }
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let why = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(Guarded::new(stream, peer, limits))).await;
                        return;
                    }
                    Ok(Err(e)) => classify(&e),
                    Err(_) => Refusal::TimedOut(limits.handshake),
                };
                let notes = lock(&refusals).refused(Instant::now(), peer, why);
                notes.iter().for_each(Note::log);
            });
        }
    });
    ReceiverStream::new(rx)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The log's counters stay usable even if a thread panicked while holding them.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An accepted connection that fails its next read once nothing has been read from it for
/// [`ConnectionLimits::first_read`] after the handshake, then [`ConnectionLimits::idle`]; the
/// server then drops it. Writes pass through untouched.
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    peer: SocketAddr,
    limits: ConnectionLimits,
    /// When the handshake finished, then when bytes were last read.
    last_read: tokio::time::Instant,
    read_any: bool,
    /// Fires at or before the deadline; re-armed lazily, so a busy connection costs no timer
    /// update per read.
    timer: Pin<Box<Sleep>>,
}

impl<S> Guarded<S> {
    fn new(inner: S, peer: SocketAddr, limits: ConnectionLimits) -> Self {
        let now = tokio::time::Instant::now();
        Guarded {
            inner,
            peer,
            limits,
            last_read: now,
            read_any: false,
            timer: Box::pin(tokio::time::sleep_until(now + limits.first_read)),
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        let limit = if self.read_any { self.limits.idle } else { self.limits.first_read };
        self.last_read + limit
    }

    fn silence(&self) -> io::Error {
        let what = if self.read_any {
            format!("nothing read for {:?}", self.limits.idle)
        } else {
            format!("no request within {:?} of the TLS handshake", self.limits.first_read)
        };
        tracing::info!(peer = %self.peer, "closed connection: {what}");
        io::Error::new(io::ErrorKind::TimedOut, format!("{}: {what}", self.peer))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.read_any = true;
                    this.last_read = tokio::time::Instant::now();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        // Nothing to read: the timer wakes this task at the deadline.
        while this.timer.as_mut().poll(cx).is_ready() {
            let deadline = this.deadline();
            if tokio::time::Instant::now() >= deadline {
                return Poll::Ready(Err(this.silence()));
            }
            this.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The RPC layers find the peer's certificate in the connection info, as without the guard.
impl<S: Connected> Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Why a TLS connection was refused, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The client presented no certificate.
    NoCertificate,
    /// A certificate that this deployment's CA did not issue.
    UnknownIssuer,
    /// Issued by our CA but unusable: expired, not yet valid, revoked, wrong purpose.
    BadCertificate(String),
    /// The client ended the handshake with an alert (typically: it does not trust our
    /// certificate).
    ClientAlert(String),
    /// Not TLS at all (plain HTTP, a scanner) or TLS gone wrong.
    Protocol(String),
    /// The TCP connection closed before the handshake finished: a port probe, a health check.
    Closed,
    TimedOut(Duration),
    Other(String),
}

impl Refusal {
    /// The short name refusals are counted under while their warnings are suppressed.
    fn kind(&self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no client certificate",
            Refusal::UnknownIssuer => "a certificate from another CA",
            Refusal::BadCertificate(_) => "an unusable certificate",
            Refusal::ClientAlert(_) => "the client ended the handshake",
            Refusal::Protocol(_) => "not TLS or a protocol error",
            Refusal::Closed => "closed before the handshake",
            Refusal::TimedOut(_) => "handshake timed out",
            Refusal::Other(_) => "other errors",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoCertificate => write!(
                f,
                "no client certificate (a client must present one issued by this deployment's CA)"
            ),
            Refusal::UnknownIssuer => {
                write!(f, "a client certificate from another CA, not this deployment's")
            }
            Refusal::BadCertificate(e) => write!(f, "an unusable client certificate: {e}"),
            Refusal::ClientAlert(alert) => write!(
                f,
                "the client ended the handshake with alert {alert} (does it trust this \
                 deployment's CA?)"
            ),
            Refusal::Protocol(e) => write!(f, "not TLS, or a TLS protocol error: {e}"),
            Refusal::Closed => write!(
                f,
                "the connection closed before the TLS handshake finished (plain TCP, e.g. a \
                 port probe)"
            ),
            Refusal::TimedOut(limit) => {
                write!(f, "the TLS handshake did not finish within {limit:?}")
            }
            Refusal::Other(e) => write!(f, "{e}"),
        }
    }
}

/// Reads the reason out of the error of a failed server handshake: tokio-rustls wraps rustls'
/// own error in an `io::Error`.
pub(crate) fn classify(e: &io::Error) -> Refusal {
    use rustls::{CertificateError, Error as Tls};
    if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Tls>()) {
        return match tls {
            Tls::NoCertificatesPresented => Refusal::NoCertificate,
            Tls::InvalidCertificate(CertificateError::UnknownIssuer) => Refusal::UnknownIssuer,
            Tls::InvalidCertificate(c) => Refusal::BadCertificate(c.to_string()),
            Tls::AlertReceived(alert) => Refusal::ClientAlert(format!("{alert:?}")),
            other => Refusal::Protocol(other.to_string()),
        };
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Refusal::Closed,
        _ => Refusal::Other(e.to_string()),
    }
}

/// One line for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Note {
    Refused {
        peer: SocketAddr,
        why: Refusal,
    },
    /// Refusals from `ip` not logged one by one, by kind, most frequent first.
    Suppressed {
        ip: IpAddr,
        secs: u64,
        kinds: Vec<(&'static str, u64)>,
    },
}

impl Note {
    fn log(&self) {
        match self {
            Note::Refused { peer, .. } => tracing::warn!(peer = %peer.ip(), "{self}"),
            Note::Suppressed { ip, .. } => tracing::warn!(peer = %ip, "{self}"),
        }
    }
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::Refused { peer, why } => write!(f, "refused TLS connection from {peer}: {why}"),
            Note::Suppressed { ip, secs, kinds } => {
                let count: u64 = kinds.iter().map(|(_, n)| n).sum();
                let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} ({n})")).collect();
                write!(
                    f,
                    "refused {count} more TLS connection{} from {ip} in the last {secs} s: {}",
                    if count == 1 { "" } else { "s" },
                    kinds.join(", ")
                )
            }
        }
    }
}

/// The refusal log's throttle: one warning per peer address per `every`, the rest counted and
/// summed up in one line when that time is over. Pure: time is passed in.
#[derive(Debug)]
pub(crate) struct Refusals {
    every: Duration,
    /// Peers warned about within the last `every` (or with counts still to report).
    peers: HashMap<IpAddr, Peer>,
}

#[derive(Debug)]
struct Peer {
    logged_at: Instant,
    suppressed: BTreeMap<&'static str, u64>,
}

impl Peer {
    fn summary(&mut self, ip: IpAddr, now: Instant) -> Option<Note> {
        if self.suppressed.is_empty() {
            return None;
        }
        let mut kinds: Vec<(&'static str, u64)> =
            std::mem::take(&mut self.suppressed).into_iter().collect();
        kinds.sort_by_key(|(kind, n)| (std::cmp::Reverse(*n), *kind));
        let secs = now.saturating_duration_since(self.logged_at).as_secs();
        self.logged_at = now;
        Some(Note::Suppressed { ip, secs, kinds })
    }
}

impl Refusals {
    pub(crate) fn new(every: Duration) -> Self {
        Refusals { every, peers: HashMap::new() }
    }

    /// Records a refusal at `now`; returns what to log: the refusal itself (after the count of
    /// the ones suppressed before it, if any), or nothing while its peer's warning is recent.
    pub(crate) fn refused(&mut self, now: Instant, peer: SocketAddr, why: Refusal) -> Vec<Note> {
        let ip = peer.ip();
        let mut notes = Vec::new();
        if let Some(p) = self.peers.get_mut(&ip) {
            if now.saturating_duration_since(p.logged_at) < self.every {
                *p.suppressed.entry(why.kind()).or_default() += 1;
                return notes;
            }
            notes.extend(p.summary(ip, now));
        }
        self.peers.insert(ip, Peer { logged_at: now, suppressed: BTreeMap::new() });
        notes.push(Note::Refused { peer, why });
        notes
    }

    /// Counts of suppressed refusals whose peer's time is over; forgets peers quiet for that
    /// long, so the table holds only recent peers.
    pub(crate) fn flush(&mut self, now: Instant) -> Vec<Note> {
        let mut notes = Vec::new();
        let every = self.every;
        self.peers.retain(|ip, p| {
            if now.saturating_duration_since(p.logged_at) < every {
                return true;
            }
            match p.summary(*ip, now) {
                Some(note) => {
                    notes.push(note);
                    true
                }
                None => false,
            }
        });
        notes
    }
}

#[cfg(test)]
mod tests;
