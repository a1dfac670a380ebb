//! The mysql quiescer (MySQL and MariaDB): over one connection it takes the server's backup lock
//! (`BACKUP STAGE ... BLOCK_COMMIT` on MariaDB 10.4+, `FLUSH TABLES WITH READ LOCK` elsewhere),
//! records the binary log position while commits are blocked, and keeps the connection open as
//! the hold: the lock ends with the connection, so the guardian's `Hangup` (stalled agent) or the
//! kernel closing the socket (dead agent) lets go of it. Every lock wait is bounded by
//! `timeout_ms` through `lock_wait_timeout`; a freeze that fails closes the connection, so it
//! leaves nothing held. It does not flush InnoDB: the snapshot is crash-consistent for InnoDB and
//! consistent for the non-transactional engines, which the lock flushed and blocked.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder, Row};
use serde::Deserialize;
use tracing::{info, warn};

use super::credentials::Source;
use super::{Artifact, Hold, Quiescer};
use crate::guardian::Action;

/// The artifact's file name: where the binary log stood while commits were blocked.
pub const ARTIFACT: &str = "binlog_position";

/// How long past `timeout_ms` a statement's reply may take before the connection is given up
/// on: the server's own `lock_wait_timeout` ends a lock wait first, this only catches a server
/// that stopped answering.
const BACKSTOP: Duration = Duration::from_secs(5);

/// Time left within this much of a whole second counts as that second for `lock_wait_timeout`
/// (so a 2 s timeout gives the first statement 2 s, not 1 s after the few ms already spent).
const ROUNDING: Duration = Duration::from_millis(100);

/// MySQL error 1205, `ER_LOCK_WAIT_TIMEOUT`.
const LOCK_WAIT_TIMEOUT: u16 = 1205;

fn default_timeout_ms() -> u64 {
    30_000
}

/// `kind = "mysql"`: where the server is and how to log in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    pub name: String,
    /// The server's Unix socket, e.g. `/run/mysqld/mysqld.sock`. Give this or `host`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// The server's host name or address (TCP, no TLS: use it on loopback or a trusted link).
    #[serde(default)]
    pub host: Option<String>,
    /// The TCP port with `host`; 3306 when unset.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub option_file: Option<PathBuf>,
    /// The bound on connecting and on every lock wait of one freeze, in milliseconds (whole
    /// seconds are used for `lock_wait_timeout`, rounded down; at least 1000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl MysqlConfig {
    fn source(&self) -> Source {
        Source {
            user: self.user.clone(),
            password_file: self.password_file.clone(),
            password_env: self.password_env.clone(),
            option_file: self.option_file.clone(),
        }
    }

    /// Where the server is, for messages: the socket path or `host:port`.
    pub fn address(&self) -> String {
        super::credentials::address(self.socket.as_deref(), self.host.as_deref(), self.port, 3306)
    }

    /// Field problems, one line each prefixed with `at`.
    pub fn problems(&self, at: &str, max_lease_ms: u64, out: &mut Vec<String>) {
        if let Err(e) = stillpoint_core::validate_name("quiescer name", &self.name) {
            out.push(format!("{at}.name: {e}"));
        }
        let (socket, host) = (self.socket.as_deref(), self.host.as_deref());
        super::credentials::endpoint_problems(at, socket, host, self.port, out);
        if self.timeout_ms < 1000 {
            out.push(format!(
                "{at}.timeout_ms: {} is below 1000 (lock_wait_timeout counts whole seconds)",
                self.timeout_ms
            ));
        } else if self.timeout_ms > max_lease_ms {
            out.push(format!(
                "{at}.timeout_ms: {} is above max_lease_ms {max_lease_ms}; a freeze must fit in a lease",
                self.timeout_ms
            ));
        }
        self.source().problems(at, out);
    }
}

/// What the server is, from `SELECT VERSION()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// As the server says it, e.g. `10.11.6-MariaDB-0+deb12u1`.
    pub version: String,
    pub mariadb: bool,
    pub major: u32,
    pub minor: u32,
    /// The lock this server gets: by version, unless the quiescer was made to use another.
    pub lock: Lock,
}

/// Which lock a server gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// MariaDB 10.4+: `BACKUP STAGE START, FLUSH, BLOCK_DDL, BLOCK_COMMIT` .. `BACKUP STAGE END`.
    /// Blocks DDL, commits and non-transactional writes; waits for no long-running SELECT.
    BackupStage,
    /// Every other server: `FLUSH TABLES WITH READ LOCK` .. `UNLOCK TABLES`. On MySQL 8 too:
    /// `LOCK INSTANCE FOR BACKUP` alone blocks only DDL and leaves commits running, so a
    /// snapshot under it is only crash-consistent; the global read lock blocks commits and
    /// flushes MyISAM tables, for every engine.
    FlushWithReadLock,
}

impl Server {
    /// Parses `SELECT VERSION()`: the leading `major.minor`, MariaDB by name.
    pub fn parse(version: &str) -> anyhow::Result<Server> {
        let mut numbers = version.split(|c: char| !c.is_ascii_digit());
        let mut next = || numbers.next().and_then(|n| n.parse::<u32>().ok());
        let (Some(major), Some(minor)) = (next(), next()) else {
            bail!("cannot read the server version {version:?}");
        };
        let mariadb = version.contains("MariaDB");
        let lock = if mariadb && (major, minor) >= (10, 4) {
            Lock::BackupStage
        } else {
            Lock::FlushWithReadLock
        };
        Ok(Server { version: version.to_string(), mariadb, major, minor, lock })
    }

    pub fn lock(&self) -> Lock {
        self.lock
    }

    fn product(&self) -> &'static str {
        if self.mariadb {
            "MariaDB"
        } else {
            "MySQL"
        }
    }

    /// The statements that take the lock, in order.
    fn freeze_statements(&self) -> &'static [&'static str] {
        match self.lock() {
            Lock::BackupStage => &[
                "BACKUP STAGE START",
                "BACKUP STAGE FLUSH",
                "BACKUP STAGE BLOCK_DDL",
                "BACKUP STAGE BLOCK_COMMIT",
            ],
            Lock::FlushWithReadLock => &["FLUSH TABLES WITH READ LOCK"],
        }
    }

    fn thaw_statement(&self) -> &'static str {
        match self.lock() {
            Lock::BackupStage => "BACKUP STAGE END",
            Lock::FlushWithReadLock => "UNLOCK TABLES",
        }
    }

    /// MySQL 8.2 renamed `SHOW MASTER STATUS` (and 8.4 removed the old name).
    fn binlog_status(&self) -> &'static str {
        if !self.mariadb && (self.major, self.minor) >= (8, 2) {
            "SHOW BINARY LOG STATUS"
        } else {
            "SHOW MASTER STATUS"
        }
    }
}

/// One connection, opened for one backup; the lock lives as long as it.
struct Session {
    backup: String,
    conn: Conn,
    server: Server,
    /// Set once the lock is held: the binlog position text, and when the lock was taken.
    held: Option<(String, Instant)>,
}

#[derive(Default)]
struct State {
    session: Option<Session>,
    /// The binlog position of a thawed backup, until `artifacts` hands it over.
    artifact: Option<(String, String)>,
}

impl State {
    /// Refuses to replace a session that holds the lock for another backup: dropping it would
    /// end that backup's hold while its freeze stands reported as held.
    fn refuse_other(&self, backup_id: &str) -> anyhow::Result<()> {
        match &self.session {
            Some(s) if s.backup != backup_id && s.held.is_some() => bail!(
                "{} still held for backup {}; thaw it first",
                s.server.freeze_statements().last().copied().unwrap_or_default(),
                s.backup
            ),
            _ => Ok(()),
        }
    }
}

/// Holds a MySQL or MariaDB server still through its backup lock.
pub struct Mysql {
    config: MysqlConfig,
    /// A lock other than the one the server's version chooses.
    lock: Option<Lock>,
    state: Mutex<State>,
}

impl Mysql {
    pub fn new(config: MysqlConfig) -> Mysql {
        Mysql { config, lock: None, state: Mutex::new(State::default()) }
    }

    /// A quiescer that takes `lock` whatever the server's version: `FlushWithReadLock` works on
    /// every server, so tests run MySQL's path against MariaDB with it.
    pub fn with_lock(config: MysqlConfig, lock: Lock) -> Mysql {
        Mysql { lock: Some(lock), ..Mysql::new(config) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    /// Opens a connection and asks what the server is.
    fn connect(&self) -> anyhow::Result<(Conn, Server)> {
        let credentials = self.config.source().read()?;
        let who = credentials.user.clone().unwrap_or_else(|| "(the server's default user)".into());
        let wait = Some(self.timeout() + BACKSTOP);
        let mut opts = OptsBuilder::new()
            .user(credentials.user)
            .pass(credentials.password.map(|p| p.expose().to_string()))
            .prefer_socket(false)
            .tcp_connect_timeout(Some(self.timeout()))
            .read_timeout(wait)
            .write_timeout(wait);
        opts = match (&self.config.socket, &self.config.host) {
            (Some(socket), _) => opts.socket(Some(socket.to_string_lossy())),
            (None, host) => {
                opts.ip_or_hostname(host.clone()).tcp_port(self.config.port.unwrap_or(3306))
            }
        };
        let address = self.config.address();
        let mut conn = Conn::new(opts).map_err(|e| match &e {
            mysql::Error::MySqlError(m) if m.code == 1045 || m.code == 1698 => anyhow!(
                "log in to {address} as {who}: {}; check the user and its password ({})",
                show(&e),
                self.config.source().password_origin()
            ),
            _ => anyhow!("connect to {address} as {who}: {}", show(&e)),
        })?;
        let version: String = conn
            .query_first("SELECT VERSION()")
            .map_err(|e| anyhow!("{address}: SELECT VERSION(): {}", show(&e)))?
            .ok_or_else(|| anyhow!("{address}: SELECT VERSION() returned nothing"))?;
        let mut server = Server::parse(&version)?;
        server.lock = self.lock.unwrap_or(server.lock);
        Ok((conn, server))
    }

    /// Takes the lock on `session` within the timeout, then reads the binlog position.
    fn lock(&self, session: &mut Session) -> anyhow::Result<String> {
        let started = Instant::now();
        let deadline = started + self.timeout();
        for statement in session.server.freeze_statements() {
            let left = (deadline.saturating_duration_since(Instant::now()) + ROUNDING).as_secs();
            if left == 0 {
                bail!(
                    "{statement}: no whole second of timeout_ms {} left after {}ms of lock waits",
                    self.config.timeout_ms,
                    started.elapsed().as_millis()
                );
            }
            let conn = &mut session.conn;
            conn.query_drop(format!("SET SESSION lock_wait_timeout = {left}"))
                .map_err(|e| anyhow!("set lock_wait_timeout: {}", show(&e)))?;
            let at = Instant::now();
            if let Err(e) = conn.query_drop(statement) {
                let waited = at.elapsed().as_millis();
                return Err(match &e {
                    mysql::Error::MySqlError(m) if m.code == LOCK_WAIT_TIMEOUT => anyhow!(
                        "{statement}: could not get the lock within {left}s (waited {waited}ms; lock_wait_timeout from timeout_ms {}): a long transaction, a running DDL or another backup lock holds it",
                        self.config.timeout_ms
                    ),
                    mysql::Error::MySqlError(m) if m.code == 1227 => anyhow!(
                        "{statement}: {}; grant the user RELOAD",
                        show(&e)
                    ),
                    _ => anyhow!("{statement} (after {waited}ms): {}", show(&e)),
                });
            }
        }
        let position = binlog_position(&mut session.conn, &session.server)?;
        Ok(position)
    }

    /// Ends a session that failed to lock: the server releases whatever it held with the
    /// connection. A statement the server may still be running (the reply timed out) is killed
    /// from a second connection, so no lock arrives after we gave up. Says what is held now.
    fn abandon(&self, session: Session, reply_timed_out: bool) -> String {
        let id = session.conn.connection_id();
        drop(session);
        let nothing = "closed the connection, so nothing is held".to_string();
        if !reply_timed_out {
            return nothing;
        }
        let killed = self.connect().and_then(|(mut conn, _)| {
            conn.query_drop(format!("KILL {id}")).map_err(|e| anyhow!("{}", show(&e)))
        });
        match killed {
            Ok(()) => nothing,
            Err(e) => {
                warn!(quiescer = %self.config.name, "kill connection {id}: {e:#}");
                format!("closed the connection, but could not kill its statement ({e:#}): the server may still take the lock and hold it until it notices the connection closed")
            }
        }
    }
}

/// A client error as text: the server's own message without the crate's wrapping.
fn show(e: &mysql::Error) -> String {
    match e {
        mysql::Error::MySqlError(m) => m.to_string(),
        other => other.to_string(),
    }
}

/// The binlog position as a small text file: `key: value` lines.
fn binlog_position(conn: &mut Conn, server: &Server) -> anyhow::Result<String> {
    let sql = server.binlog_status();
    let row: Option<Row> = conn.query_first(sql).map_err(|e| match &e {
        mysql::Error::MySqlError(m) if m.code == 1227 => anyhow!(
            "{sql}: {}; grant the user {}",
            show(&e),
            if server.mariadb { "BINLOG MONITOR" } else { "REPLICATION CLIENT" }
        ),
        _ => anyhow!("{sql}: {}", show(&e)),
    })?;
    let mut text = format!("server: {} {}\n", server.product(), server.version);
    text += &format!("lock: {}\n", server.freeze_statements().last().copied().unwrap_or_default());
    match row {
        None => text += "binlog: off\n",
        Some(row) => {
            let file: Option<String> = row.get_opt("File").and_then(Result::ok);
            let position: Option<u64> = row.get_opt("Position").and_then(Result::ok);
            let (Some(file), Some(position)) = (file, position) else {
                bail!("{sql}: no File and Position columns in its answer");
            };
            text += &format!("binlog_file: {file}\nbinlog_position: {position}\n");
            if !server.mariadb {
                let gtids: Option<String> = row.get_opt("Executed_Gtid_Set").and_then(Result::ok);
                if let Some(gtids) = gtids.filter(|g| !g.is_empty()) {
                    text += &format!("executed_gtid_set: {}\n", gtids.replace('\n', ""));
                }
            }
        }
    }
    if server.mariadb {
        let gtid: Option<String> = conn
            .query_first("SELECT @@gtid_binlog_pos")
            .map_err(|e| anyhow!("SELECT @@gtid_binlog_pos: {}", show(&e)))?;
        text += &format!("gtid_binlog_pos: {}\n", gtid.unwrap_or_default());
    }
    Ok(text)
}

/// The position lines on one line, for the freeze detail.
fn one_line(position: &str) -> String {
    position
        .lines()
        .filter(|l| l.starts_with("binlog") || l.starts_with("gtid") || l.starts_with("executed"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Quiescer for Mysql {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn hold(&self) -> Hold {
        Hold::Application
    }

    /// Connects for `backup_id` (so a wrong password refuses the freeze before anything is
    /// held) and returns the hangup of that connection.
    fn thaw_action(&self, backup_id: &str) -> anyhow::Result<Option<Action>> {
        let mut state = self.state();
        state.refuse_other(backup_id)?;
        if let Some(mut old) = state.session.take() {
            if old.backup == backup_id && old.held.is_some() {
                match old.conn.ping() {
                    Ok(()) => {
                        let action = Action::hangup_own_raw(old.conn.as_raw_fd());
                        state.session = Some(old);
                        return action.map(Some);
                    }
                    // The lock went with the connection: connect again for a new freeze.
                    Err(e) => warn!(
                        quiescer = %self.config.name, backup = backup_id,
                        "the connection holding the lock was lost ({}), and the lock with it; connecting again",
                        show(&e)
                    ),
                }
            } else if old.backup != backup_id {
                warn!(quiescer = %self.config.name, "closed a connection left from backup {}", old.backup);
            }
        }
        let (conn, server) = self.connect()?;
        let action = Action::hangup_own_raw(conn.as_raw_fd())?;
        state.session = Some(Session { backup: backup_id.to_string(), conn, server, held: None });
        Ok(Some(action))
    }

    fn freeze(&self, backup_id: &str) -> anyhow::Result<String> {
        let mut state = self.state();
        state.refuse_other(backup_id)?;
        let mut session = match state.session.take() {
            Some(mut s) if s.backup == backup_id => {
                if let Some((position, since)) = s.held.clone() {
                    let statement =
                        s.server.freeze_statements().last().copied().unwrap_or_default();
                    if let Err(e) = s.conn.ping() {
                        // Dropping the session closes what is left of the connection.
                        bail!(
                            "freeze {} at {}: the connection holding {statement} for backup {backup_id} since {}ms ago was lost ({}), and the lock with it; arm and freeze again",
                            self.config.name,
                            self.config.address(),
                            since.elapsed().as_millis(),
                            show(&e)
                        );
                    }
                    let detail = format!(
                        "{statement} already held for backup {backup_id} ({}ms; {})",
                        since.elapsed().as_millis(),
                        one_line(&position)
                    );
                    state.session = Some(s);
                    return Ok(detail);
                }
                s
            }
            _ => {
                let (conn, server) = self.connect()?;
                Session { backup: backup_id.to_string(), conn, server, held: None }
            }
        };
        let started = Instant::now();
        match self.lock(&mut session) {
            Ok(position) => {
                let statement = session.server.freeze_statements().last().copied();
                let detail = format!(
                    "{} {}: {} held after {}ms; {}",
                    session.server.product(),
                    session.server.version,
                    statement.unwrap_or_default(),
                    started.elapsed().as_millis(),
                    one_line(&position)
                );
                info!(quiescer = %self.config.name, backup = backup_id, "{detail}");
                session.held = Some((position, Instant::now()));
                state.session = Some(session);
                Ok(detail)
            }
            Err(e) => {
                let timed_out = started.elapsed() >= self.timeout() + BACKSTOP;
                let held = self.abandon(session, timed_out);
                Err(e.context(format!(
                    "freeze {} at {}; {held}",
                    self.config.name,
                    self.config.address()
                )))
            }
        }
    }

    fn thaw(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut state = self.state();
        let Some(mut session) = state.session.take_if(|s| s.backup == backup_id) else {
            return Ok(());
        };
        let Some((position, since)) = session.held.take() else {
            return Ok(()); // connected for a freeze that never held: closing is all
        };
        let statement = session.server.thaw_statement();
        match session.conn.query_drop(statement) {
            Ok(()) => info!(
                quiescer = %self.config.name, backup = backup_id,
                "{statement} after {}ms held", since.elapsed().as_millis()
            ),
            // The server answered: the lock held until now, and lives only as long as the
            // connection, which this drop closes.
            Err(e @ mysql::Error::MySqlError(_)) => warn!(
                quiescer = %self.config.name, backup = backup_id,
                "{statement}: {}; closed the connection instead, which ends the lock",
                show(&e)
            ),
            // No answer: the connection was lost, and the lock with it, at a time not known
            // (the server killed it, restarted, or timed it out). The snapshot may hold writes
            // from after the lock: the thaw fails, so the backup says its writes are not known
            // to have been held, and the position, read while the lock held, is not handed
            // over as the snapshot's.
            Err(e) => {
                drop(session);
                bail!(
                    "{statement} for backup {backup_id}: {}; the connection holding the lock since {}ms ago was lost, so the lock ended then, maybe before the snapshot",
                    show(&e),
                    since.elapsed().as_millis()
                );
            }
        }
        drop(session);
        state.artifact = Some((backup_id.to_string(), position));
        Ok(())
    }

    fn thawed_elsewhere(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut state = self.state();
        if let Some(session) = state.session.take_if(|s| s.backup == backup_id) {
            if let Some((position, _)) = session.held {
                // The position was read while the lock held; it stays true.
                state.artifact = Some((backup_id.to_string(), position));
            }
        }
        Ok(())
    }

    fn artifacts(&self, backup_id: &str) -> Vec<Artifact> {
        let mut state = self.state();
        match state.artifact.take_if(|(b, _)| b == backup_id) {
            Some((_, text)) => vec![Artifact {
                quiescer: self.config.name.clone(),
                name: ARTIFACT.into(),
                bytes: text.into_bytes(),
            }],
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_by_server() {
        let maria = Server::parse("10.11.6-MariaDB-0+deb12u1").unwrap();
        assert!(maria.mariadb);
        assert_eq!(maria.lock(), Lock::BackupStage);
        assert_eq!(maria.binlog_status(), "SHOW MASTER STATUS");
        let old_maria = Server::parse("10.3.39-MariaDB").unwrap();
        assert_eq!(old_maria.lock(), Lock::FlushWithReadLock);
        let mysql = Server::parse("8.4.2").unwrap();
        assert!(!mysql.mariadb);
        assert_eq!(mysql.lock(), Lock::FlushWithReadLock);
        assert_eq!(mysql.binlog_status(), "SHOW BINARY LOG STATUS");
        assert_eq!(Server::parse("8.0.36-log").unwrap().binlog_status(), "SHOW MASTER STATUS");
        assert!(Server::parse("garbage").is_err());
    }
}
