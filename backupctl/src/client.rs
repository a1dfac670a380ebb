//! Where the listener is and who we are: the global connection options, the mTLS channel and
//! `ListenerClient` built from them, and the request metadata naming the backup an RPC is about.
//! Only the verbs that talk to the listener touch this; `certs` and `san` work offline.

use std::path::PathBuf;
use std::time::Duration;

use stillpoint_core::layers::BACKUP_HEADER;
use stillpoint_core::tls::{self, TlsFiles};
use stillpoint_proto::listener_client::ListenerClient;
use stillpoint_proto::{Backup, GetBackupRequest, ListBackupsRequest};
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// The listener client every remote verb uses.
pub type Client = ListenerClient<Channel>;

/// Global options: which listener to reach and which identity to present. Explicit
/// `--ca/--cert/--key` win over the files named by `--certs DIR --identity NAME`.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Connection (global)")]
pub struct Connection {
    /// Listener URL
    #[arg(
        long,
        global = true,
        env = "STILLPOINT_LISTENER",
        default_value = "https://127.0.0.1:7443",
        value_name = "URL"
    )]
    pub listener: String,
    /// DNS name pinned in the listener's certificate
    #[arg(
        long,
        global = true,
        env = "STILLPOINT_LISTENER_NAME",
        default_value = "listener",
        value_name = "NAME"
    )]
    pub listener_name: String,
    /// Certificate directory: ca.pem, NAME.pem and NAME.key (with --identity)
    #[arg(long, global = true, env = "STILLPOINT_CERTS", value_name = "DIR")]
    pub certs: Option<PathBuf>,
    /// Identity name inside --certs DIR
    #[arg(long, global = true, env = "STILLPOINT_IDENTITY", value_name = "NAME")]
    pub identity: Option<String>,
    /// CA certificate (PEM); overrides DIR/ca.pem
    #[arg(long, global = true, env = "STILLPOINT_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM); overrides DIR/NAME.pem
    #[arg(long, global = true, env = "STILLPOINT_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM); overrides DIR/NAME.key
    #[arg(long, global = true, env = "STILLPOINT_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Seconds to wait for a connection or a reply (streams are not cut off)
    #[arg(
        long,
        global = true,
        env = "STILLPOINT_TIMEOUT",
        default_value_t = 10,
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout: u64,
    /// Profile to read the options above from (see `backupctl config show`)
    #[arg(long, global = true, env = "STILLPOINT_PROFILE", value_name = "NAME")]
    pub profile: Option<String>,
    /// Where each option came from, once `profile::apply` resolved them.
    #[arg(skip)]
    pub sources: Vec<(&'static str, crate::profile::Source)>,
}

const IDENTITY_HELP: &str = "pass --certs DIR --identity NAME (or set STILLPOINT_CERTS and \
     STILLPOINT_IDENTITY), or --ca FILE --cert FILE --key FILE (or STILLPOINT_CA, \
     STILLPOINT_CERT, STILLPOINT_KEY)";

impl Connection {
    /// The CA, certificate and key to use; a usage error naming the flags when one is missing.
    pub fn tls_files(&self) -> Result<TlsFiles> {
        let in_dir = |file: String| self.certs.as_ref().map(|d| d.join(file));
        let named =
            |ext: &str| self.identity.as_ref().and_then(|name| in_dir(format!("{name}.{ext}")));
        let ca = self.ca.clone().or_else(|| in_dir(stillpoint_core::certs::CA_CERT.into()));
        let cert = self.cert.clone().or_else(|| named("pem"));
        let key = self.key.clone().or_else(|| named("key"));
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Ok(TlsFiles { ca, cert, key }),
            (ca, cert, key) => {
                let missing: Vec<&str> =
                    [("CA", ca.is_none()), ("certificate", cert.is_none()), ("key", key.is_none())]
                        .into_iter()
                        .filter_map(|(what, gone)| gone.then_some(what))
                        .collect();
                Err(Error::Usage(format!(
                    "no client identity (missing {}): {IDENTITY_HELP}",
                    missing.join(", ")
                )))
            }
        }
    }

    /// A lazily connecting client: transport and TLS failures surface on the first RPC.
    pub fn connect(&self) -> Result<Client> {
        let files = self.tls_files()?;
        for (what, path) in [("CA", &files.ca), ("certificate", &files.cert), ("key", &files.key)] {
            if !path.is_file() {
                return Err(Error::Usage(format!(
                    "{what} {}: no such file ({IDENTITY_HELP})",
                    path.display()
                )));
            }
        }
        warn_if_expiring(&files.cert);
        let timeout = Duration::from_secs(self.timeout);
        let channel = tls::channel(&self.listener, &self.listener_name, &files, timeout)?;
        Ok(ListenerClient::new(channel))
    }
}

/// Says on stderr when our own certificate expires within `certs check`'s warning window, so
/// a person renews it before the listener starts refusing the hook at 2 a.m.
fn warn_if_expiring(cert: &std::path::Path) {
    let Ok(info) = stillpoint_core::certs::inspect(cert) else { return };
    let left = info.days_left(time::OffsetDateTime::now_utc());
    if left < crate::cmd::certs::WARN_DAYS {
        let when = if left < 0 { "expired".to_string() } else { format!("expires in {left} days") };
        crate::cmd::note(&format!(
            "backupctl: warning: certificate {} {when} ({}); renew it with `backupctl certs renew --dir DIR --name {}` on the CA's host",
            cert.display(),
            info.not_after.date(),
            info.name
        ));
    }
}

/// A request carrying `x-stillpoint-backup: <id>` so the listener's trace names the backup.
pub fn about<T>(backup_id: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = backup_id.parse() {
        request.metadata_mut().insert(BACKUP_HEADER, value);
    }
    request
}

/// The newest backup of any group, or `None` when there is none yet.
pub async fn newest(client: &mut Client) -> Result<Option<Backup>> {
    let request = ListBackupsRequest { page_size: 1, ..ListBackupsRequest::default() };
    let reply =
        client.list_backups(request).await.map_err(|s| Error::rpc("list backups", s))?.into_inner();
    Ok(reply.backups.into_iter().next())
}

/// The backup `id`, or the newest one when `id` is `None`.
pub async fn backup_or_newest(client: &mut Client, id: Option<&str>) -> Result<Option<Backup>> {
    match id {
        None => newest(client).await,
        Some(id) => get(client, id).await.map(Some),
    }
}

/// The backup `id` as the listener has it now.
pub async fn get(client: &mut Client, id: &str) -> Result<Backup> {
    let request = about(id, GetBackupRequest { backup_id: id.into() });
    let reply = client.get_backup(request).await;
    Ok(reply.map_err(|s| Error::rpc(format!("get backup {id}"), s))?.into_inner())
}

/// The whole id a person meant by `id`: itself when it has the listener's shape, else the one
/// backup whose id ends with `-ID` or starts with `ID` (as `list` shows them). None matching is
/// left to the listener to refuse; several is a usage error naming them.
pub async fn resolve(conn: &Connection, id: &str) -> Result<String> {
    if crate::view::is_full_id(id) || id.is_empty() {
        return Ok(id.to_string());
    }
    let mut client = conn.connect()?;
    let mut found = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListBackupsRequest {
            page_size: 500,
            page_token: page_token.clone(),
            ..ListBackupsRequest::default()
        };
        let reply = client
            .list_backups(request)
            .await
            .map_err(|s| Error::rpc(format!("look up backup {id}"), s))?
            .into_inner();
        found.extend(
            reply
                .backups
                .into_iter()
                .map(|b| b.backup_id)
                .filter(|b| b == id || b.ends_with(&format!("-{id}")) || b.starts_with(id)),
        );
        if reply.next_page_token.is_empty() || found.len() > 5 {
            break;
        }
        page_token = reply.next_page_token;
    }
    match found.len() {
        0 => Ok(id.to_string()),
        1 => Ok(found.remove(0)),
        _ => Err(Error::Usage(format!(
            "{id:?} names several backups ({}{}): give more of the id",
            found.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if found.len() > 5 { ", ..." } else { "" }
        ))),
    }
}
