//! The sqlite quiescer: for each database, a WAL checkpoint and then a held write transaction
//! (`BEGIN IMMEDIATE`) from freeze to thaw, so no writer changes the files while the snapshot is
//! taken. The transaction lives in a small child process (`stillpoint-agent hold-sqlite`), never
//! in the agent: its locks are the kernel's POSIX locks, which end with their process, so the
//! guardian can end the hold (SIGKILL) and the hold ends by itself if the agent dies (EOF).
//! It never writes to a database: thaw rolls the empty transaction back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use super::procs::ProcRef;
use super::{Hold, Quiescer};
use crate::guardian::Action;

/// `[[quiescer]] kind = "sqlite"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteConfig {
    pub name: String,
    /// The database files to hold, absolute paths; each must exist.
    pub databases: Vec<PathBuf>,
    /// How long the checkpoints and `BEGIN IMMEDIATE` may wait for other connections' locks
    /// (the busy timeout), in total.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

impl SqliteConfig {
    /// Field problems, one line each, prefixed with `at` (`quiescer[2]`).
    pub fn problems(&self, at: &str, out: &mut Vec<String>) {
        if let Err(e) = stillpoint_core::validate_name("quiescer name", &self.name) {
            out.push(format!("{at}.name: {e}"));
        }
        if self.databases.is_empty() {
            out.push(format!("{at}.databases: list at least one database file"));
        }
        for (i, db) in self.databases.iter().enumerate() {
            if !db.is_absolute() {
                out.push(format!("{at}.databases[{i}]: {} is not an absolute path", db.display()));
            } else if !db.is_file() {
                out.push(format!("{at}.databases[{i}]: {} is not an existing file", db.display()));
            } else if self.databases[..i].contains(db) {
                out.push(format!("{at}.databases[{i}]: {} appears twice", db.display()));
            }
        }
        if self.timeout_ms == 0 {
            out.push(format!("{at}.timeout_ms: must be above 0"));
        }
    }
}

/// How long the holder may take beyond its busy timeouts to say it holds (start, open).
const HOLD_SLACK: Duration = Duration::from_secs(3);
/// How long a released holder may take to roll back and exit before it is killed.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Holds write transactions on SQLite databases through a child process.
pub struct Sqlite {
    name: String,
    databases: Vec<PathBuf>,
    timeout: Duration,
    /// The agent's executable, run as `<exe> hold-sqlite`.
    exe: PathBuf,
    holder: Mutex<Option<Holder>>,
}

/// One holder process, started by `thaw_action` and told to hold by `freeze`.
struct Holder {
    backup: String,
    proc: ProcRef,
    child: Child,
    /// Closing it (EOF) tells the holder to roll back and exit.
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    held: bool,
}

impl Holder {
    /// Closes its stdin and waits for it to exit, killing it after `within`. Says how it ended.
    fn end(mut self, within: Duration) -> String {
        drop(self.stdin.take());
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return format!("{status}"),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) | Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return format!("killed after {}ms", within.as_millis());
                }
            }
        }
    }
}

/// What the holder did to one database, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDb {
    pub path: PathBuf,
    pub journal_mode: String,
    /// In WAL mode, `PRAGMA wal_checkpoint(PASSIVE)` before the hold: (busy, frames in the
    /// WAL, frames checkpointed), then whether `wal_checkpoint(TRUNCATE)` emptied the WAL.
    pub checkpoint: Option<(i64, i64, i64)>,
    pub truncated: Option<bool>,
    /// `PRAGMA wal_checkpoint(PASSIVE)` on a second connection under the hold: what writers
    /// committed between the checkpoint and `BEGIN IMMEDIATE` is folded in too.
    pub under_hold: Option<(i64, i64, i64)>,
}

impl HeldDb {
    fn describe(&self) -> String {
        let path = self.path.display();
        match (self.checkpoint, self.truncated, self.under_hold) {
            (Some((_, log, done)), Some(truncated), Some((_, log2, done2))) => {
                // After a truncation the WAL holds only what was committed since; otherwise it
                // still holds the frames counted before, so none of them is "more".
                let (truncated, then) = if truncated {
                    ("wal truncated", format!("then {done2} more committed before the hold"))
                } else {
                    (
                        "wal not truncated (readers or writers kept it busy)",
                        format!("then {done2} of {log2} checkpointed under the hold"),
                    )
                };
                let left = log2 - done2;
                let left = if left == 0 {
                    "the database file holds every committed transaction".to_string()
                } else {
                    format!("{left} frames only in {path}-wal (a reader pinned them)")
                };
                format!(
                    "{path} (wal: checkpointed {done} of {log} frames, {truncated}, {then}; {left})"
                )
            }
            _ => format!("{path} ({} journal)", self.journal_mode),
        }
    }
}

impl Sqlite {
    pub fn new(config: &SqliteConfig, exe: PathBuf) -> Sqlite {
        Sqlite {
            name: config.name.clone(),
            databases: config.databases.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
            exe,
            holder: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Holder>> {
        self.holder.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a holder process that waits for `hold` on its stdin.
    fn spawn(&self, backup: &str) -> anyhow::Result<Holder> {
        let mut child = Command::new(&self.exe)
            .arg("hold-sqlite")
            .arg("--timeout-ms")
            .arg(self.timeout.as_millis().to_string())
            .arg("--")
            .args(&self.databases)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own process group: a Ctrl-C meant for the agent does not end the hold early.
            .process_group(0)
            .spawn()
            .with_context(|| {
                format!("start the sqlite holder {} hold-sqlite", self.exe.display())
            })?;
        let pid = i32::try_from(child.id()).unwrap_or(0);
        let (Some(stdin), Some(stdout), Some(proc)) =
            (child.stdin.take(), child.stdout.take(), ProcRef::of(pid))
        else {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(anyhow!("the sqlite holder exited at once ({status})"));
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Holder {
            backup: backup.to_string(),
            proc,
            child,
            stdin: Some(stdin),
            lines,
            held: false,
        })
    }

    fn names(&self) -> String {
        let names: Vec<String> = self.databases.iter().map(|d| d.display().to_string()).collect();
        names.join(", ")
    }
}

impl Quiescer for Sqlite {
    fn name(&self) -> &str {
        &self.name
    }

    fn hold(&self) -> Hold {
        Hold::Application
    }

    fn thaw_action(&self, backup_id: &str) -> anyhow::Result<Option<Action>> {
        let mut slot = self.lock();
        if let Some(h) = slot.as_ref() {
            if h.held && h.backup == backup_id {
                return Ok(Some(Action::Kill { pid: h.proc.pid, start: h.proc.start }));
            }
            if h.held {
                return Err(anyhow!(
                    "still holding {} for backup {}; thaw it first",
                    self.names(),
                    h.backup
                ));
            }
        }
        // A holder started for an arm that never froze holds nothing: end it.
        if let Some(old) = slot.take() {
            old.end(Duration::ZERO);
        }
        let holder = self.spawn(backup_id)?;
        let action = Action::Kill { pid: holder.proc.pid, start: holder.proc.start };
        *slot = Some(holder);
        Ok(Some(action))
    }

    fn freeze(&self, backup_id: &str) -> anyhow::Result<String> {
        let started = Instant::now();
        let mut slot = self.lock();
        let Some(holder) = slot.as_mut().filter(|h| h.backup == backup_id) else {
            return Err(anyhow!(
                "no holder process was armed with the guardian for backup {backup_id}; not holding {}",
                self.names()
            ));
        };
        if holder.held {
            return Ok(format!("already holding {} for backup {backup_id}", self.names()));
        }
        let told = holder
            .stdin
            .as_mut()
            .map(|s| s.write_all(b"hold\n").and_then(|()| s.flush()))
            .unwrap_or_else(|| Err(std::io::ErrorKind::BrokenPipe.into()));
        let wait = self.timeout + HOLD_SLACK;
        let answer = match told {
            Ok(()) => holder.lines.recv_timeout(wait).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => {
                    format!("the holder did not say it held within {}ms", wait.as_millis())
                }
                mpsc::RecvTimeoutError::Disconnected => "the holder exited".to_string(),
            }),
            Err(e) => Err(format!("tell the holder to hold: {e}")),
        };
        let failure = match answer {
            Ok(line) => match line.strip_prefix("held ") {
                Some(json) => match serde_json::from_str::<Vec<HeldDb>>(json) {
                    Ok(dbs) => {
                        holder.held = true;
                        let each: Vec<String> = dbs.iter().map(HeldDb::describe).collect();
                        return Ok(format!(
                            "held a write transaction on {} database{} in {}ms (holder pid {}): {}",
                            dbs.len(),
                            if dbs.len() == 1 { "" } else { "s" },
                            started.elapsed().as_millis(),
                            holder.proc.pid,
                            each.join("; ")
                        ));
                    }
                    Err(e) => format!("unreadable answer from the holder {line:?}: {e}"),
                },
                None => line.strip_prefix("error ").unwrap_or(&line).to_string(),
            },
            Err(e) => e,
        };
        if let Some(h) = slot.take() {
            h.end(Duration::ZERO);
        }
        Err(anyhow!("hold {}: {failure}", self.names()))
    }

    fn thaw(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut slot = self.lock();
        if slot.as_ref().is_none_or(|h| h.backup != backup_id) {
            return Ok(());
        }
        let Some(holder) = slot.take() else { return Ok(()) };
        let (held, pid) = (holder.held, holder.proc.pid);
        let early = !holder.proc.alive();
        let ended = holder.end(RELEASE_TIMEOUT);
        if held && early {
            // Said as a failed thaw step: the freeze's claim did not hold to the end.
            return Err(anyhow!(
                "the hold on {} ended before the thaw (holder process {pid} exited: {ended}); writes may not have been held for the whole freeze, so the snapshot of these databases is only crash-consistent",
                self.names()
            ));
        }
        Ok(())
    }

    fn thawed_elsewhere(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut slot = self.lock();
        if slot.as_ref().is_some_and(|h| h.backup == backup_id) {
            if let Some(h) = slot.take() {
                // The guardian killed it; this only reaps it.
                h.end(Duration::from_secs(1));
            }
        }
        Ok(())
    }
}

/// The `stillpoint-agent hold-sqlite` subcommand: waits for `hold` on stdin, then checkpoints
/// and begins a write transaction on each database, says `held <json>` on stdout, and holds
/// until stdin says `release` or closes (the agent thawed or died); then rolls back and exits.
/// Exit code 1 (after `error <why>` on stdout) when it could not hold.
pub fn hold_main(databases: &[PathBuf], timeout_ms: u64) -> ExitCode {
    let mut out = std::io::stdout();
    match serve(databases, Duration::from_millis(timeout_ms), std::io::stdin().lock(), &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(out, "error {e:#}").and_then(|()| out.flush());
            ExitCode::FAILURE
        }
    }
}

fn serve(
    databases: &[PathBuf],
    timeout: Duration,
    mut input: impl BufRead,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 || line.trim() != "hold" {
        return Ok(()); // the agent went away (or thawed) before the freeze
    }
    let deadline = Instant::now() + timeout;
    let mut held = Vec::new();
    let mut report = Vec::new();
    for db in databases {
        let (conn, what) = hold_one(db, deadline).with_context(|| format!("{}", db.display()))?;
        held.push(conn);
        report.push(what);
    }
    writeln!(out, "held {}", serde_json::to_string(&report)?)?;
    out.flush()?;
    // Hold until told to release or until the agent's end of the pipe closes.
    loop {
        line.clear();
        if input.read_line(&mut line).unwrap_or(0) == 0 || line.trim() == "release" {
            break;
        }
    }
    for conn in &held {
        conn.execute_batch("ROLLBACK")?;
    }
    drop(held);
    writeln!(out, "released")?;
    out.flush()?;
    Ok(())
}

/// The busy timeout left before `deadline`, at least 1 ms so SQLite still tries once.
fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

fn open(db: &Path) -> rusqlite::Result<Connection> {
    // Never create: a missing database is an error, not a new empty file.
    Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
}

/// Checkpoints `db` (in WAL mode) and begins a write transaction on it, within `deadline`.
fn hold_one(db: &Path, deadline: Instant) -> anyhow::Result<(Connection, HeldDb)> {
    let conn = open(db).context("open")?;
    conn.busy_timeout(left(deadline))?;
    let journal_mode: String =
        conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).context("read journal_mode")?;
    let wal = journal_mode.eq_ignore_ascii_case("wal");
    let (counted, truncated) = if wal {
        // Half the time left: the rest is for the write lock itself. PASSIVE first, since
        // TRUNCATE reports an emptied WAL as 0 frames.
        conn.busy_timeout(left(deadline) / 2)?;
        let counts = checkpoint(&conn, "PASSIVE").context("wal_checkpoint(PASSIVE)")?;
        let (busy, _, _) = checkpoint(&conn, "TRUNCATE").context("wal_checkpoint(TRUNCATE)")?;
        (Some(counts), Some(busy == 0))
    } else {
        (None, None)
    };
    conn.busy_timeout(left(deadline))?;
    conn.execute_batch("BEGIN IMMEDIATE").map_err(|e| match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy) => {
            anyhow!("BEGIN IMMEDIATE: another connection kept the write lock past the timeout")
        }
        _ => anyhow!("BEGIN IMMEDIATE: {e}"),
    })?;
    let under_hold = if wal {
        // A checkpoint cannot run on a connection inside a transaction: use a second one.
        let aux = open(db).context("open a second connection")?;
        aux.busy_timeout(left(deadline))?;
        Some(checkpoint(&aux, "PASSIVE").context("wal_checkpoint(PASSIVE) under the hold")?)
    } else {
        None
    };
    Ok((
        conn,
        HeldDb { path: db.to_path_buf(), journal_mode, checkpoint: counted, truncated, under_hold },
    ))
}

#[cfg(test)]
mod tests;
