//! The redis quiescer: a completed save, then `CLIENT PAUSE <pause_ms> WRITE` (Redis 6.2+) until
//! the thaw's `CLIENT UNPAUSE`. The pause is the server's own and ends by itself after
//! `pause_ms` even if the agent and the guardian both die, so the guardian has nothing to undo
//! (no thaw action; a hangup would not end a pause, which belongs to the server, not to our
//! connection). With RDB the save is a BGSAVE: the file holds every write acknowledged before
//! the save began, or with `save_while_paused` every write acknowledged before the pause (the
//! pause comes first and covers the save). With AOF on it is a BGREWRITEAOF: the AOF holds every
//! write acknowledged before the pause (written before the reply; on disk at once with
//! `appendfsync always`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use redis::{ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use serde::Deserialize;
use tracing::{info, warn};

use super::credentials::Source;
use super::{Hold, Quiescer};

/// How often the save's progress is read.
const POLL: Duration = Duration::from_millis(10);

fn default_timeout_ms() -> u64 {
    30_000
}

/// `kind = "redis"`: where the server is, how to log in, and how long a pause may last.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub name: String,
    /// The server's Unix socket. Give this or `host`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// The server's host name or address (TCP, no TLS: use it on loopback or a trusted link).
    #[serde(default)]
    pub host: Option<String>,
    /// The TCP port with `host`; 6379 when unset.
    #[serde(default)]
    pub port: Option<u16>,
    /// An ACL user; without it the password is the `default` user's (`requirepass`).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// How long writes stay paused at most, in milliseconds: the server ends the pause by itself
    /// then, whatever happened to the agent. At most `max_lease_ms`; set it to the group's lease
    /// so a stalled agent's pause ends with its lease, and above freeze + snapshot time, or the
    /// thaw reports that writes may have resumed before the snapshot.
    pub pause_ms: u64,
    /// The bound on connecting and on the save, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Pause writes first and save while paused, so an RDB holds every write acknowledged
    /// before the pause (not only before the save began), at the cost of writes waiting for
    /// the save. Needs `timeout_ms` below `pause_ms`.
    #[serde(default)]
    pub save_while_paused: bool,
}

impl RedisConfig {
    fn source(&self) -> Source {
        Source {
            user: self.user.clone(),
            password_file: self.password_file.clone(),
            password_env: self.password_env.clone(),
            option_file: None,
        }
    }

    /// Where the server is, for messages: the socket path or `host:port`.
    pub fn address(&self) -> String {
        super::credentials::address(self.socket.as_deref(), self.host.as_deref(), self.port, 6379)
    }

    /// Field problems, one line each prefixed with `at`.
    pub fn problems(&self, at: &str, max_lease_ms: u64, out: &mut Vec<String>) {
        if let Err(e) = stillpoint_core::validate_name("quiescer name", &self.name) {
            out.push(format!("{at}.name: {e}"));
        }
        let (socket, host) = (self.socket.as_deref(), self.host.as_deref());
        super::credentials::endpoint_problems(at, socket, host, self.port, out);
        if self.pause_ms == 0 || self.pause_ms > max_lease_ms {
            out.push(format!(
                "{at}.pause_ms: {} is not within 1..={max_lease_ms} (max_lease_ms): the pause must end by itself no later than the longest lease",
                self.pause_ms
            ));
        }
        if self.timeout_ms == 0 {
            out.push(format!("{at}.timeout_ms: must be above 0"));
        }
        if self.save_while_paused && self.timeout_ms >= self.pause_ms {
            out.push(format!(
                "{at}.timeout_ms: {} is not below pause_ms {}: with save_while_paused the pause must outlast the save",
                self.timeout_ms, self.pause_ms
            ));
        }
        self.source().problems(at, out);
    }
}

/// A pause we started, until thawed.
struct Paused {
    backup: String,
    conn: redis::Connection,
    /// When CLIENT PAUSE was sent: the pause ends by itself no earlier than `pause_ms` later.
    sent: Instant,
    /// The server's `run_id` at the freeze: a restart, which ends the pause, changes it.
    run_id: Option<String>,
}

/// Holds a Redis server's writes with a save and a self-ending pause.
pub struct Redis {
    config: RedisConfig,
    paused: Mutex<Option<Paused>>,
}

/// The `field:value` lines of an INFO section.
type Info = HashMap<String, String>;

impl Redis {
    pub fn new(config: RedisConfig) -> Redis {
        Redis { config, paused: Mutex::new(None) }
    }

    fn paused(&self) -> MutexGuard<'_, Option<Paused>> {
        self.paused.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    fn connect(&self) -> anyhow::Result<redis::Connection> {
        let credentials = self.config.source().read()?;
        let address = self.config.address();
        let who = credentials.user.clone().unwrap_or_else(|| "default".into());
        let addr = match (&self.config.socket, &self.config.host) {
            (Some(socket), _) => ConnectionAddr::Unix(socket.clone()),
            (None, host) => ConnectionAddr::Tcp(
                host.clone().unwrap_or_default(),
                self.config.port.unwrap_or(6379),
            ),
        };
        let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
        if let Some(user) = &credentials.user {
            settings = settings.set_username(user);
        }
        if let Some(password) = &credentials.password {
            settings = settings.set_password(password.expose());
        }
        let info = addr
            .into_connection_info()
            .map_err(|e| anyhow!("{address}: {e}"))?
            .set_redis_settings(settings);
        let client = redis::Client::open(info).map_err(|e| anyhow!("{address}: {e}"))?;
        let conn = client.get_connection_with_timeout(self.timeout()).map_err(|e| {
            if e.kind() == redis::ErrorKind::AuthenticationFailed
                || e.code().is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH")
            {
                let from = self.config.source().password_origin();
                anyhow!(
                    "log in to {address} as {who}: {e}; check the user and its password ({from})"
                )
            } else {
                anyhow!("connect to {address}: {e}")
            }
        })?;
        let wait = Some(self.timeout());
        conn.set_read_timeout(wait).map_err(|e| anyhow!("{address}: {e}"))?;
        conn.set_write_timeout(wait).map_err(|e| anyhow!("{address}: {e}"))?;
        Ok(conn)
    }

    /// Runs `BGSAVE` (or `BGREWRITEAOF`) and waits until the server reports it done and good,
    /// by `deadline`. Returns the detail.
    fn save(&self, conn: &mut redis::Connection, deadline: Instant) -> anyhow::Result<String> {
        let persistence = info(conn, "persistence")?;
        let aof = persistence.get("aof_enabled").is_some_and(|v| v == "1");
        let (command, running, scheduled, status) = if aof {
            (
                "BGREWRITEAOF",
                "aof_rewrite_in_progress",
                Some("aof_rewrite_scheduled"),
                "aof_last_bgrewrite_status",
            )
        } else {
            ("BGSAVE", "rdb_bgsave_in_progress", None, "rdb_last_bgsave_status")
        };
        let started = Instant::now();
        // Another save or rewrite may be running: the server refuses ours until it ends.
        loop {
            match redis::cmd(command).query::<String>(conn) {
                Ok(_) => break,
                Err(e) if e.to_string().contains("in progress") && Instant::now() < deadline => {
                    std::thread::sleep(POLL)
                }
                Err(e) => bail!("{command}: {e}"),
            }
        }
        // Started at once (in progress) or scheduled after a running child: done when neither.
        let done = loop {
            let now = info(conn, "persistence")?;
            let busy = |field: &str| now.get(field).is_some_and(|v| v != "0");
            if !busy(running) && !scheduled.is_some_and(busy) {
                break now;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{command} did not finish within timeout_ms {} ({running}:1 after {}ms)",
                    self.config.timeout_ms,
                    started.elapsed().as_millis()
                );
            }
            std::thread::sleep(POLL);
        };
        if done.get(status).map(String::as_str) != Some("ok") {
            bail!(
                "{command} failed ({status}:{}); see the server's log",
                done.get(status).map(String::as_str).unwrap_or("missing")
            );
        }
        if aof && done.get("aof_last_write_status").is_some_and(|v| v != "ok") {
            bail!("the AOF cannot be written (aof_last_write_status:err); see the server's log");
        }
        let ms = started.elapsed().as_millis();
        Ok(if aof {
            format!(
                "AOF rewritten in {ms}ms (the AOF holds every write acknowledged before the pause)"
            )
        } else {
            format!("RDB saved in {ms}ms (it holds every write acknowledged before the save began)")
        })
    }
}

/// One INFO section as a map.
fn info(conn: &mut redis::Connection, section: &str) -> anyhow::Result<Info> {
    let text: String =
        redis::cmd("INFO").arg(section).query(conn).map_err(|e| anyhow!("INFO {section}: {e}"))?;
    Ok(parse_info(&text))
}

fn parse_info(text: &str) -> Info {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// `(major, minor)` of a `redis_version` like `7.0.15`.
fn version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

impl Quiescer for Redis {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn hold(&self) -> Hold {
        Hold::Application
    }

    fn freeze(&self, backup_id: &str) -> anyhow::Result<String> {
        let mut paused = self.paused();
        if let Some(p) = paused.as_ref().filter(|p| p.backup == backup_id) {
            return Ok(format!(
                "writes already paused for backup {backup_id} ({}ms of at most {}ms)",
                p.sent.elapsed().as_millis(),
                self.config.pause_ms
            ));
        }
        let address = self.config.address();
        let deadline = Instant::now() + self.timeout();
        let mut conn = self.connect()?;
        let server = info(&mut conn, "server")?;
        let v = server.get("redis_version").map(String::as_str).unwrap_or("unknown");
        if version(v).is_none_or(|v| v < (6, 2)) {
            bail!("{address}: redis {v} cannot pause writes only (CLIENT PAUSE WRITE needs 6.2 or later)");
        }
        let pause_ms = self.config.pause_ms;
        let pause = |conn: &mut redis::Connection| {
            let sent = Instant::now();
            redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(pause_ms)
                .arg("WRITE")
                .query::<()>(conn)
                .map(|()| sent)
                .map_err(|e| anyhow!("{address}: CLIENT PAUSE {pause_ms} WRITE: {e}"))
        };
        let (sent, detail) = if self.config.save_while_paused {
            let sent = pause(&mut conn)?;
            let saved = match self.save(&mut conn, deadline) {
                Ok(saved) => saved,
                Err(e) => {
                    let unpaused = redis::cmd("CLIENT").arg("UNPAUSE").query::<()>(&mut conn);
                    let tail = match unpaused {
                        Ok(()) => "writes unpaused".to_string(),
                        Err(u) => format!(
                            "CLIENT UNPAUSE: {u}; the pause ends by itself after {pause_ms}ms"
                        ),
                    };
                    bail!("{address}: {e:#}; {tail}");
                }
            };
            let saved = saved.replace("before the save began", "before the pause");
            (sent, format!("redis {v}: writes paused (CLIENT PAUSE WRITE, ends by itself after {pause_ms}ms), then {saved}"))
        } else {
            let saved = self
                .save(&mut conn, deadline)
                .map_err(|e| anyhow!("{address}: {e:#}; nothing is paused"))?;
            let sent = pause(&mut conn)?;
            (sent, format!("redis {v}: {saved}; writes paused (CLIENT PAUSE WRITE, ends by itself after {pause_ms}ms)"))
        };
        info!(quiescer = %self.config.name, backup = backup_id, "{detail}");
        let run_id = server.get("run_id").cloned();
        *paused = Some(Paused { backup: backup_id.to_string(), conn, sent, run_id });
        Ok(detail)
    }

    fn thaw(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut paused = self.paused();
        let Some(mut p) = paused.take_if(|p| p.backup == backup_id) else {
            return Ok(());
        };
        let held = p.sent.elapsed();
        let address = self.config.address();
        let unpause =
            |conn: &mut redis::Connection| redis::cmd("CLIENT").arg("UNPAUSE").query::<()>(conn);
        if let Err(first) = unpause(&mut p.conn) {
            // The held connection failed: on a new one, also ask whether the server restarted
            // (which ended the pause), not only whether it is still up.
            let again = self.connect().and_then(|mut c| {
                let run_id = info(&mut c, "server")?.get("run_id").cloned();
                unpause(&mut c)?;
                Ok(run_id)
            });
            match again {
                Err(e) => bail!(
                    "{address}: CLIENT UNPAUSE: {first}; again on a new connection: {e:#}; the pause ends by itself {}ms after the freeze",
                    self.config.pause_ms
                ),
                Ok(run_id) if run_id != p.run_id => bail!(
                    "{address}: the server restarted during the hold (its run_id changed; the held connection said: {first}), which ended the write pause {}ms or less after the freeze, so writes may have resumed before the snapshot",
                    held.as_millis()
                ),
                Ok(_) => {}
            }
        }
        if held >= Duration::from_millis(self.config.pause_ms) {
            bail!(
                "{address}: the write pause ended by itself after pause_ms {} before this thaw ({}ms after the freeze), so writes may have resumed before the snapshot; raise pause_ms (at most max_lease_ms)",
                self.config.pause_ms,
                held.as_millis()
            );
        }
        info!(quiescer = %self.config.name, backup = backup_id, "writes unpaused after {}ms", held.as_millis());
        Ok(())
    }

    fn thawed_elsewhere(&self, backup_id: &str) -> anyhow::Result<()> {
        // Nothing runs elsewhere for redis (no thaw action), but forget the pause all the same:
        // it ends by itself.
        if self.paused().take_if(|p| p.backup == backup_id).is_some() {
            warn!(quiescer = %self.config.name, backup = backup_id, "forgot the write pause; it ends by itself after {}ms", self.config.pause_ms);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_and_versions() {
        let info = parse_info("# Persistence\r\naof_enabled:1\r\nrdb_last_bgsave_status:ok\r\n");
        assert_eq!(info.get("aof_enabled").map(String::as_str), Some("1"));
        assert_eq!(info.get("rdb_last_bgsave_status").map(String::as_str), Some("ok"));
        assert_eq!(version("7.0.15"), Some((7, 0)));
        assert!(version("6.0.9").is_some_and(|v| v < (6, 2)));
        assert_eq!(version("x"), None);
    }
}
