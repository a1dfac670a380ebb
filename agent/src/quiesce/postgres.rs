//! The postgres quiescer. `mode = "backup"`: a non-exclusive `pg_backup_start` held on one
//! connection across the snapshot, ended by `pg_backup_stop` at the thaw, whose backup label
//! (and tablespace map) become the backup's artifacts. `mode = "atomic"`: a CHECKPOINT only, for
//! data and WAL on one atomic snapshot. It does not restore, archive WAL or speak TLS.

use std::future::Future;
use std::net::ToSocketAddrs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use stillpoint_core::validate_name;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use tracing::info;

use super::credentials::{Password, Source};
use super::{Artifact, Hold, Quiescer};
use crate::guardian::Action;

/// The oldest server whose non-exclusive backup functions take `wait_for_archive` (10).
const MIN_VERSION_NUM: i32 = 100_000;
/// How long the client waits beyond the server-side `statement_timeout` before it gives up on a
/// silent server (the server's own timeout answers first when the server is alive).
const CLIENT_GRACE: Duration = Duration::from_secs(5);
/// How long a closing connection may take to say goodbye (Terminate) before it is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// `[[quiescer]] kind = "postgres"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    #[serde(default = "default_name")]
    pub name: String,
    /// An absolute directory holding the server's Unix socket, or a host name or address (TCP).
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default = "default_dbname")]
    pub dbname: String,
    /// A file holding the password; one trailing newline is not part of it.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable of the agent holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// Backup mode only: pg_backup_start's `fast` flag (default fast).
    #[serde(default)]
    pub checkpoint: Option<Checkpoint>,
    /// Backup mode only: pg_backup_stop's `wait_for_archive` (default true).
    #[serde(default)]
    pub wait_for_archive: Option<bool>,
    /// Bounds connecting and every statement (`statement_timeout`, `lock_timeout`).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// What the freeze does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// pg_backup_start held on a connection until the thaw's pg_backup_stop.
    #[default]
    Backup,
    /// A CHECKPOINT, nothing held: data and WAL on one atomic snapshot.
    Atomic,
}

/// How pg_backup_start checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Checkpoint {
    /// An immediate checkpoint: the freeze waits for its I/O only.
    #[default]
    Fast,
    /// A spread checkpoint (up to checkpoint_timeout × checkpoint_completion_target): gentle on
    /// the disks, but the freeze waits for it, bounded by timeout_ms.
    Spread,
}

fn default_name() -> String {
    "postgres".into()
}
fn default_host() -> String {
    "/var/run/postgresql".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "stillpoint".into()
}
fn default_dbname() -> String {
    "postgres".into()
}
fn default_timeout_ms() -> u64 {
    30_000
}

impl PostgresConfig {
    /// Where the password comes from (the user is the config's own `user`).
    fn credentials(&self) -> Source {
        Source {
            user: None,
            password_file: self.password_file.clone(),
            password_env: self.password_env.clone(),
            option_file: None,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn wait_for_archive(&self) -> bool {
        self.wait_for_archive.unwrap_or(true)
    }

    fn socket_dir(&self) -> Option<&Path> {
        Some(Path::new(&self.host)).filter(|p| p.is_absolute())
    }

    /// Where the server is, for messages: the socket's path or host:port.
    pub fn endpoint(&self) -> String {
        match self.socket_dir() {
            Some(dir) => {
                format!("socket {}", dir.join(format!(".s.PGSQL.{}", self.port)).display())
            }
            None if self.host.contains(':') => format!("[{}]:{}", self.host, self.port),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    /// Every problem with this table, one line each naming the field under `at`.
    pub fn problems(&self, at: &str, out: &mut Vec<String>) {
        if let Err(e) = validate_name("quiescer name", &self.name) {
            out.push(format!("{at}.name: {e}"));
        }
        if self.host.trim().is_empty() {
            out.push(format!("{at}.host: empty; give the socket directory (e.g. /var/run/postgresql) or a host name"));
        } else if let Some(dir) = self.socket_dir() {
            if !dir.is_dir() {
                out.push(format!(
                    "{at}.host: {} is not a directory (the directory of the server's Unix socket)",
                    dir.display()
                ));
            }
        }
        if self.port == 0 {
            out.push(format!("{at}.port: must be above 0"));
        }
        for (field, value) in [("user", &self.user), ("dbname", &self.dbname)] {
            if value.is_empty() {
                out.push(format!("{at}.{field}: empty"));
            }
        }
        self.credentials().problems(at, out);
        if self.mode == Mode::Atomic {
            for (field, set) in [
                ("checkpoint", self.checkpoint.is_some()),
                ("wait_for_archive", self.wait_for_archive.is_some()),
            ] {
                if set {
                    out.push(format!("{at}.{field}: applies to mode = \"backup\" only (atomic mode runs a plain CHECKPOINT)"));
                }
            }
        }
        if self.timeout_ms == 0 {
            out.push(format!("{at}.timeout_ms: must be above 0"));
        }
    }
}

/// The task driving a connection's IO; it ends with the connection.
type Driver = JoinHandle<Result<(), tokio_postgres::Error>>;

/// PostgreSQL's startup handshake over `stream` within `timeout`, then the connection driven on
/// `runtime`. Err(None): no handshake in time; Err(Some(e)): the server's answer.
fn start_up<S>(
    runtime: &Runtime,
    config: &tokio_postgres::Config,
    stream: S,
    timeout: Duration,
) -> Result<(Client, Driver), Option<tokio_postgres::Error>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = runtime
        .block_on(async { tokio::time::timeout(timeout, config.connect_raw(stream, NoTls)).await })
        .map_err(|_| None)?
        .map_err(Some)?;
    Ok((client, runtime.spawn(connection)))
}

/// One open connection and the runtime that drives it.
struct Session {
    backup: String,
    runtime: Option<Runtime>,
    client: Option<Client>,
    connection: Option<Driver>,
    /// A duplicate of the connection's socket, for the guardian's Hangup (shutting down a
    /// duplicate ends the one connection: both name the same socket).
    socket: OwnedFd,
    /// Set once backup mode is on: the LSN it started at and the server's version number.
    started: Option<(String, i32)>,
}

impl Session {
    fn client(&self) -> &Client {
        self.client.as_ref().expect("a session's client lives until it closes")
    }

    /// Runs one request on the connection, bounded beyond the server's own timeout.
    fn run<T>(
        &self,
        timeout: Duration,
        what: &str,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> anyhow::Result<T> {
        let runtime = self.runtime.as_ref().expect("a session's runtime lives until it closes");
        match runtime.block_on(async { tokio::time::timeout(timeout + CLIENT_GRACE, fut).await }) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(anyhow!("{what}: {}", describe(&e))),
            Err(_) => Err(anyhow!(
                "{what}: no answer within {}ms; the server may be overloaded or unreachable",
                (timeout + CLIENT_GRACE).as_millis()
            )),
        }
    }

    /// True when the connection is gone (closed by the server, killed, or hung up).
    fn is_closed(&self) -> bool {
        self.client.as_ref().is_none_or(Client::is_closed)
    }
}

impl Session {
    /// Ends the connection politely (Terminate), waiting a moment. Blocks: only from the
    /// quiescer's own methods, which run on blocking threads.
    fn close(mut self) {
        drop(self.client.take());
        if let (Some(runtime), Some(connection)) = (self.runtime.as_ref(), self.connection.take()) {
            let _ = runtime.block_on(async { tokio::time::timeout(CLOSE_WAIT, connection).await });
        }
    }
}

impl Drop for Session {
    /// Never blocks, so a session dropped on an async thread (`thawed_elsewhere`, agent
    /// shutdown) is safe: the runtime's tasks and both descriptors of the socket just close.
    fn drop(&mut self) {
        drop(self.client.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Holds PostgreSQL consistent for a snapshot; see the module doc.
pub struct Postgres {
    config: PostgresConfig,
    session: Mutex<Option<Session>>,
    /// The backup label (and tablespace map) of the last thawed backup, until handed over.
    artifacts: Mutex<Option<(String, Vec<Artifact>)>>,
}

impl Postgres {
    pub fn new(config: PostgresConfig) -> Postgres {
        Postgres { config, session: Mutex::new(None), artifacts: Mutex::new(None) }
    }

    fn label(backup_id: &str) -> String {
        format!("stillpoint {backup_id}")
    }

    /// The password, read now (at every connect, so a rotated password is picked up).
    fn password(&self) -> anyhow::Result<Option<Password>> {
        Ok(self.config.credentials().read()?.password)
    }

    /// Opens a connection for `backup`: our own socket (so its fd is known), then the startup
    /// handshake over it with the timeouts set.
    fn connect(&self, backup: &str) -> anyhow::Result<Session> {
        let c = &self.config;
        let endpoint = c.endpoint();
        let timeout = c.timeout();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the postgres quiescer's runtime")?;
        let mut config = tokio_postgres::Config::new();
        config.user(&c.user).dbname(&c.dbname).application_name("stillpoint");
        // Bounded by our timeout, and never ended by the server's idle timeouts mid-hold.
        let ms = c.timeout_ms;
        config.options(format!(
            "-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout=0"
        ));
        if let Some(password) = self.password()? {
            config.password(password.expose());
        }
        let refused = |e: std::io::Error| {
            anyhow!("connect to postgres at {endpoint}: {e}; is PostgreSQL running and listening there?")
        };
        let handshake = |e: tokio_postgres::Error| {
            let why = describe(&e);
            let hint = match e.code() {
                Some(code) if *code == tokio_postgres::error::SqlState::INVALID_PASSWORD => {
                    match (&c.password_file, &c.password_env) {
                        (Some(file), _) => format!("; check the password in {}", file.display()),
                        (_, Some(var)) => format!("; check the password in ${var}"),
                        _ => "; the server wants a password: set password_file or password_env"
                            .into(),
                    }
                }
                Some(code)
                    if *code
                        == tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
                {
                    format!("; allow user {} in pg_hba.conf", c.user)
                }
                _ => String::new(),
            };
            anyhow!("connect to postgres at {endpoint} as user {}: {why}{hint}", c.user)
        };
        let within = |what: &str| {
            anyhow!("connect to postgres at {endpoint}: {what} within {}ms", timeout.as_millis())
        };
        let (client, connection, socket) = match c.socket_dir() {
            Some(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", c.port));
                let stream = std::os::unix::net::UnixStream::connect(&path).map_err(refused)?;
                let socket = OwnedFd::from(stream.try_clone().context("duplicate the socket")?);
                stream.set_nonblocking(true).context("make the socket non-blocking")?;
                let stream =
                    runtime.block_on(async { tokio::net::UnixStream::from_std(stream) })?;
                let (client, connection) = start_up(&runtime, &config, stream, timeout)
                    .map_err(|e| e.map_or_else(|| within("no handshake"), handshake))?;
                (client, connection, socket)
            }
            None => {
                let addrs: Vec<_> = (c.host.as_str(), c.port)
                    .to_socket_addrs()
                    .map_err(|e| {
                        anyhow!("connect to postgres at {endpoint}: resolve {}: {e}", c.host)
                    })?
                    .collect();
                let mut last = None;
                let mut stream = None;
                for addr in addrs {
                    match std::net::TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let stream = match (stream, last) {
                    (Some(s), _) => s,
                    (None, Some(e)) => return Err(refused(e)),
                    (None, None) => {
                        bail!("connect to postgres at {endpoint}: {} has no address", c.host)
                    }
                };
                let _ = stream.set_nodelay(true);
                let socket = OwnedFd::from(stream.try_clone().context("duplicate the socket")?);
                stream.set_nonblocking(true).context("make the socket non-blocking")?;
                let stream = runtime.block_on(async { tokio::net::TcpStream::from_std(stream) })?;
                let (client, connection) = start_up(&runtime, &config, stream, timeout)
                    .map_err(|e| e.map_or_else(|| within("no handshake"), handshake))?;
                (client, connection, socket)
            }
        };
        Ok(Session {
            backup: backup.to_string(),
            runtime: Some(runtime),
            client: Some(client),
            connection: Some(connection),
            socket,
            started: None,
        })
    }

    /// The session for `backup`, connecting if there is none (a session left by another
    /// backup that never started backup mode is replaced; one in backup mode is an error).
    fn session_for<'a>(
        &self,
        slot: &'a mut Option<Session>,
        backup: &str,
    ) -> anyhow::Result<&'a mut Session> {
        if let Some(s) = slot.as_ref() {
            if s.backup != backup {
                if let Some((lsn, _)) = &s.started {
                    bail!(
                        "backup mode of backup {} (started at LSN {lsn}) is still held; thaw it first",
                        s.backup
                    );
                }
                if let Some(old) = slot.take() {
                    old.close();
                }
            } else if s.is_closed() {
                *slot = None;
            }
        }
        if slot.is_none() {
            *slot = Some(self.connect(backup)?);
        }
        Ok(slot.as_mut().expect("set just above"))
    }

    fn freeze_backup(&self, slot: &mut Option<Session>, backup: &str) -> anyhow::Result<String> {
        let c = &self.config;
        let timeout = c.timeout();
        let session = self.session_for(slot, backup)?;
        let row = session.run(
            timeout,
            "read the server's version and archive_mode",
            session.client().query_one(
                "SELECT current_setting('server_version_num')::int, current_setting('server_version'), current_setting('archive_mode'), pg_is_in_recovery()",
                &[],
            ),
        )?;
        let (num, version, archive_mode, recovery): (i32, String, String, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let version = short_version(&version);
        if num < MIN_VERSION_NUM {
            bail!("PostgreSQL {version} is too old: backup mode needs PostgreSQL 10 or newer; use mode = \"atomic\" if data and WAL are on one snapshot");
        }
        // Recovery from a snapshot taken in backup mode replays WAL up to pg_backup_stop's
        // record, written after the snapshot: without an archive that WAL is nowhere.
        let archiving = if recovery { archive_mode == "always" } else { archive_mode != "off" };
        if !archiving {
            bail!(
                "WAL archiving is off on this server (archive_mode = {archive_mode}{}): a snapshot taken in backup mode restores only with the WAL written until pg_backup_stop, which is not in the snapshot; turn on archive_mode with an archive_command, or use mode = \"atomic\" with data and WAL on one snapshot",
                if recovery { ", and it is a standby: it needs always" } else { "" }
            );
        }
        if num >= 140_000 {
            session.run(
                timeout,
                "turn off idle_session_timeout for this session",
                session.client().batch_execute("SET idle_session_timeout = 0"),
            )?;
        }
        let fast = c.checkpoint.unwrap_or_default() == Checkpoint::Fast;
        let label = Self::label(backup);
        let sql = if num >= 150_000 {
            "SELECT pg_backup_start($1, $2)::text"
        } else {
            "SELECT pg_start_backup($1, $2, false)::text"
        };
        let started = Instant::now();
        let row = session.run(
            timeout,
            "start backup mode",
            session.client().query_one(sql, &[&label, &fast]),
        )?;
        let lsn: String = row.get(0);
        let took = started.elapsed().as_millis();
        session.started = Some((lsn.clone(), num));
        let kind = if fast { "fast" } else { "spread" };
        Ok(format!("{kind} checkpoint and backup start {took}ms; backup mode started at LSN {lsn} (PostgreSQL {version}, archive_mode {archive_mode})"))
    }

    fn freeze_atomic(&self, backup: &str) -> anyhow::Result<String> {
        let timeout = self.config.timeout();
        let session = self.connect(backup)?;
        let row = session.run(
            timeout,
            "read the server's version",
            session.client().query_one("SELECT current_setting('server_version')", &[]),
        )?;
        let version: String = row.get(0);
        let version = short_version(&version);
        let started = Instant::now();
        session.run(
            timeout,
            "CHECKPOINT (the role needs pg_checkpoint on PostgreSQL 15, superuser before)",
            session.client().batch_execute("CHECKPOINT"),
        )?;
        let took = started.elapsed().as_millis();
        session.close();
        Ok(format!("checkpoint {took}ms (PostgreSQL {version}); nothing held: data and WAL must be on one atomic snapshot, restored by crash recovery"))
    }

    /// Ends backup mode for the session in `slot`; the label is kept for `artifacts`.
    fn stop_backup(&self, session: Session) -> anyhow::Result<()> {
        let timeout = self.config.timeout();
        let Some((start_lsn, num)) = session.started.clone() else {
            return Ok(()); // connected for the guardian's action, never started
        };
        let backup = session.backup.clone();
        let lost = |why: String| {
            anyhow!(
                "backup {backup}: {why}; PostgreSQL has left backup mode (started at LSN {start_lsn}) and its backup label is lost, so this server's snapshot is not restorable as a base backup: run the backup again"
            )
        };
        if session.is_closed() {
            let why = connection_end(session);
            return Err(lost(format!(
                "the connection holding backup mode was lost before the thaw{why}"
            )));
        }
        let wait = self.config.wait_for_archive();
        let sql = if num >= 150_000 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop($1)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, $1)"
        };
        let started = Instant::now();
        let row =
            match session.run(timeout, "pg_backup_stop", session.client().query_one(sql, &[&wait]))
            {
                Ok(row) => row,
                Err(e) if session.is_closed() => {
                    let why = connection_end(session);
                    return Err(lost(format!(
                        "the connection holding backup mode was lost before the thaw ({e:#}){why}"
                    )));
                }
                // Closing the session ends backup mode on the server.
                Err(e) => {
                    session.close();
                    return Err(lost(format!("{e:#}; the connection was closed")));
                }
            };
        let (stop_lsn, label, map): (String, Option<String>, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        session.close();
        let label = label.unwrap_or_default();
        if label.is_empty() {
            return Err(lost("pg_backup_stop returned no backup label".into()));
        }
        let mut files = vec![Artifact {
            quiescer: self.config.name.clone(),
            name: "backup_label".into(),
            bytes: label.into_bytes(),
        }];
        if let Some(map) = map.filter(|m| !m.is_empty()) {
            files.push(Artifact {
                quiescer: self.config.name.clone(),
                name: "tablespace_map".into(),
                bytes: map.into_bytes(),
            });
        }
        info!(
            quiescer = %self.config.name,
            backup = %backup,
            "backup mode ended at LSN {stop_lsn} after {}ms (wait_for_archive {wait}); kept {}",
            started.elapsed().as_millis(),
            files.iter().map(|f| format!("{} ({} bytes)", f.name, f.bytes.len())).collect::<Vec<_>>().join(" and ")
        );
        *self.artifacts.lock().unwrap_or_else(|p| p.into_inner()) = Some((backup, files));
        Ok(())
    }
}

/// Why the connection ended, as the connection task saw it (", the server said: ...").
fn connection_end(mut session: Session) -> String {
    let (Some(runtime), Some(handle)) = (session.runtime.as_ref(), session.connection.take())
    else {
        return String::new();
    };
    match runtime.block_on(async { tokio::time::timeout(CLOSE_WAIT, handle).await }) {
        Ok(Ok(Err(e))) if !e.is_closed() => format!(" ({})", describe(&e)),
        _ => String::new(),
    }
}

/// "15.20" of "15.20 (Debian 15.20-0+deb12u1)".
fn short_version(version: &str) -> &str {
    version.split_whitespace().next().unwrap_or(version)
}

/// A tokio-postgres error in words: the server's message when it sent one, else the chain.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{}: {}", db.severity(), db.message());
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

impl Quiescer for Postgres {
    fn name(&self) -> &str {
        &self.config.name
    }

    /// Storage-only in both modes: neither holds a write. Backup mode lets every commit through
    /// (measured by `tests/e2e/apps_cut.rs`: only an fsfreeze after it stopped them), and its
    /// label restores to the backup's end, `pg_backup_stop` after the thaw, so claiming writes
    /// held (application) was false. Atomic mode holds nothing: the snapshot's atomicity is all
    /// there is.
    fn hold(&self) -> Hold {
        Hold::StorageOnly
    }

    fn thaw_action(&self, backup_id: &str) -> anyhow::Result<Option<Action>> {
        if self.config.mode == Mode::Atomic {
            return Ok(None);
        }
        let mut slot = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let session = self.session_for(&mut slot, backup_id)?;
        Ok(Some(Action::hangup_own(session.socket.as_fd())?))
    }

    fn freeze(&self, backup_id: &str) -> anyhow::Result<String> {
        if self.config.mode == Mode::Atomic {
            return self.freeze_atomic(backup_id);
        }
        let mut slot = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_ref().filter(|s| s.backup == backup_id) {
            if let Some((lsn, _)) = s.started.clone() {
                // Backup mode lives as long as its connection: say "started" only while it runs.
                let check = s.client().simple_query("SELECT 1");
                let alive = s.run(self.config.timeout(), "check the connection", check);
                let e = match alive {
                    Ok(_) => {
                        return Ok(format!(
                            "backup mode already started at LSN {lsn} for backup {backup_id}"
                        ))
                    }
                    Err(e) => e,
                };
                let s = slot.take().expect("matched just above");
                let held = format!("backup mode of backup {backup_id} (started at LSN {lsn})");
                if s.is_closed() {
                    let why = connection_end(s);
                    bail!(
                        "the connection holding {held} was lost ({e:#}){why}, and PostgreSQL left backup mode with it; arm and freeze again"
                    );
                }
                s.close(); // which ends backup mode on the server
                bail!(
                    "the connection holding {held} did not answer ({e:#}); closed it, which ends backup mode; arm and freeze again"
                );
            }
        }
        let result = self.freeze_backup(&mut slot, backup_id);
        if result.is_err() && slot.as_ref().is_some_and(|s| s.backup == backup_id) {
            // Closing the connection ends whatever backup mode a failed start left.
            if let Some(old) = slot.take() {
                old.close();
            }
        }
        result
    }

    fn thaw(&self, backup_id: &str) -> anyhow::Result<()> {
        let session = {
            let mut slot = self.session.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_ref() {
                Some(s) if s.backup == backup_id => slot.take(),
                _ => None,
            }
        };
        match session {
            Some(session) => self.stop_backup(session),
            None => Ok(()),
        }
    }

    fn thawed_elsewhere(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut slot = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let Some(session) = slot.take_if(|s| s.backup == backup_id) else { return Ok(()) };
        match &session.started {
            // The thaw step fails with this, so the backup says its label is missing.
            Some((lsn, _)) => bail!(
                "the guardian closed the connection holding backup mode (started at LSN {lsn}): PostgreSQL left backup mode without a backup label, so this server's snapshot is not restorable as a base backup (only by crash recovery, where data and WAL are on one snapshot)"
            ),
            None => Ok(()),
        }
    }

    fn artifacts(&self, backup_id: &str) -> Vec<Artifact> {
        let mut kept = self.artifacts.lock().unwrap_or_else(|p| p.into_inner());
        match kept.take() {
            Some((b, files)) if b == backup_id => files,
            other => {
                *kept = other;
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests;
