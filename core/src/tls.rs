//! Mutual TLS for every connection: a rustls server that demands a client certificate from the
//! deployment's CA (its accept loop, with deadlines and the refusal log, is `tls/accept.rs`), and
//! tonic clients that present their own certificate and pin the name of the server they meant to
//! reach.

mod accept;

pub use accept::{
    incoming, incoming_with, ConnectionLimits, Guarded, HTTP2_KEEPALIVE_INTERVAL,
    HTTP2_KEEPALIVE_TIMEOUT,
};

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TonicIdentity,
};

use crate::{Error, Result};

/// Where one process finds its CA, certificate and key (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Problems with the files, one line each, for a config's `validate()`.
    pub fn problems(&self, owner: &str) -> Vec<String> {
        [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)]
            .into_iter()
            .filter(|(_, p)| !p.is_file())
            .map(|(what, p)| {
                format!("{owner}.{what}: {} does not exist or is not a file", p.display())
            })
            .collect()
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| Error::io(path, e))
}

pub(crate) fn certs_from(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Certificate { path: path.into(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(Error::Certificate {
            path: path.into(),
            reason: "no PEM certificate in file".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn key_from(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| Error::Certificate { path: path.into(), reason: e.to_string() })?
        .ok_or_else(|| Error::Certificate {
            path: path.into(),
            reason: "no PEM private key in file".into(),
        })
}

/// A rustls server config that requires a client certificate issued by `files.ca`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs_from(&files.ca)? {
        roots
            .add(ca)
            .map_err(|e| Error::Certificate { path: files.ca.clone(), reason: e.to_string() })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| Error::Tls(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_from(&files.cert)?, key_from(&files.key)?)
        .map_err(|e| Error::Certificate { path: files.cert.clone(), reason: e.to_string() })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A lazily connecting mTLS channel to `url` (e.g. `https://127.0.0.1:7443`) that only accepts a
/// server certificate for `server_name` issued by our CA.
pub fn channel(
    url: &str,
    server_name: &str,
    files: &TlsFiles,
    timeout: Duration,
) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&files.ca)?))
        .identity(TonicIdentity::from_pem(read(&files.cert)?, read(&files.key)?))
        .domain_name(server_name);
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| Error::Tls(format!("bad address {url:?}: {e}")))?
        .tls_config(tls)
        .map_err(|e| Error::Tls(format!("{url}: {e}")))?
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    Ok(endpoint.connect_lazy())
}

/// Turns a tonic client error into one line a person can act on: the innermost causes of
/// transport failures (refused connection, unknown CA, expired certificate) are what matter.
pub fn explain(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut causes = Vec::new();
    let mut source = status.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !causes.contains(&text) {
            causes.push(text);
        }
        source = e.source();
    }
    let base = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    };
    let mut line = if causes.is_empty() { base } else { format!("{base}: {}", causes.join(": ")) };
    let lower = line.to_lowercase();
    let about_tls = ["certificate", "handshake", "tls", "unknownca", "alert"];
    if about_tls.iter().any(|hint| lower.contains(hint)) {
        line.push_str(" (check that both sides use certificates from the same deployment CA and the right role)");
    } else if ["connection closed", "connection reset", "broken pipe"]
        .iter()
        .any(|hint| lower.contains(hint))
    {
        // TLS 1.3 clients learn of a refused certificate only as a closed connection.
        line.push_str(" (the server closed the connection: if it is running, it may have refused our certificate; check that both sides use certificates from the same deployment CA)");
    }
    line
}

/// The identity (role and name) our own certificate carries, as peers see it: the listener
/// names its saved catalogs with it.
pub fn own_identity(files: &TlsFiles) -> Result<crate::identity::Identity> {
    let certs = certs_from(&files.cert)?;
    crate::identity::Identity::from_der(&certs[0])
        .map_err(|reason| Error::Certificate { path: files.cert.clone(), reason })
}
