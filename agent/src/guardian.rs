//! The freeze guardian: a tiny second process (`stillpoint-agent guardian`) joined to the agent
//! by a pipe on its stdin. It holds a thaw action for everything the agent froze and runs a
//! backup's actions in reverse order when that backup's lease runs out or when its stdin reaches
//! EOF (the agent died, even by SIGKILL). The kernel never thaws a frozen filesystem by itself.
//!
//! [`Ledger`] is the pure bookkeeping (time is an argument); [`serve`] is the IO loop; `link` is
//! the agent's end of the pipe.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::quiesce::procs::{self, ProcRef};
use crate::sys::{self, Signal};

pub mod link;

/// The ledger's types with this agent's thaw [`Action`]s; the bookkeeping itself is pure and
/// lives in `stillpoint_protocol::ledger`, where the simulation drives it too.
pub type Request = stillpoint_protocol::ledger::Request<Action>;
pub type Held = stillpoint_protocol::ledger::Held<Action>;
pub type Ledger = stillpoint_protocol::ledger::Ledger<Action>;
pub use stillpoint_protocol::ledger::Outcome;

/// What undoes one quiescer's freeze. Each is safe to run twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// FITHAW the filesystem mounted at `mount`; EINVAL (not frozen) counts as done.
    Fithaw { mount: PathBuf },
    /// Run an exec quiescer's post_thaw command with `env` added, killed after `timeout_ms`.
    Run { argv: Vec<String>, env: Vec<(String, String)>, timeout_ms: u64 },
    /// SIGCONT a process the stop quiescer stopped; ESRCH (gone) counts as done.
    Resume { pid: i32 },
    /// End the connection on which a database quiescer holds its application (a backup lock, a
    /// backup mode): socket `fd` of the agent process `pid`, shut down both ways so the server
    /// sees it closed and lets go. `inode` is the socket's, so a reused pid or fd is never hit.
    /// For an agent that is alive but stalled; a dead agent's connections closed with it.
    Hangup { pid: i32, fd: i32, inode: u64 },
    /// SIGKILL a holder process (the sqlite quiescer's held transaction) if the pid still names
    /// the process started at `start`; gone counts as done.
    Kill { pid: i32, start: u64 },
    /// SIGCONT each process the process quiescer stopped that is still the same process.
    ResumeAll { procs: Vec<ProcRef> },
    /// Set `path`'s permission bits back to `mode` (the process quiescer's lock-out).
    RestoreMode { path: PathBuf, mode: u32 },
    /// Run each action in order, every one even when another fails.
    Each { actions: Vec<Action> },
}

impl Action {
    /// What running this action did, in the past tense, for logs: "thawed /mnt/x".
    pub fn done(&self, key: &str) -> String {
        match self {
            Action::Fithaw { mount } => format!("thawed {}", mount.display()),
            Action::Run { .. } => format!("ran post_thaw of quiescer {key}"),
            Action::Resume { pid } => format!("resumed process {pid} of quiescer {key}"),
            Action::Hangup { .. } => format!("closed the connection of quiescer {key}"),
            Action::Kill { pid, .. } => format!("killed holder {pid} of quiescer {key}"),
            Action::ResumeAll { procs } => {
                let pids: Vec<String> = procs.iter().map(|p| p.pid.to_string()).collect();
                format!("resumed processes [{}] of quiescer {key}", pids.join(", "))
            }
            Action::RestoreMode { path, mode } => {
                format!("restored mode {mode:o} of {} for quiescer {key}", path.display())
            }
            Action::Each { actions } => {
                let done: Vec<String> = actions.iter().map(|a| a.done(key)).collect();
                done.join("; ")
            }
        }
    }

    /// Runs the action, blocking; returns a one-line detail.
    pub fn execute(&self) -> anyhow::Result<String> {
        match self {
            Action::Each { actions } => each(actions, Action::execute),
            leaf => leaf.run().map(|ran| ran.detail),
        }
    }

    /// Runs the action, blocking, and says for the log what it undid of quiescer `key`'s freeze:
    /// [`Action::done`] when it did all that says, else its own detail (a process already gone,
    /// a connection already closed), so the log never claims an undo that did not happen.
    pub fn undo(&self, key: &str) -> anyhow::Result<String> {
        match self {
            Action::Each { actions } => each(actions, |a| a.undo(key)),
            leaf => leaf.run().map(|ran| {
                if ran.did {
                    leaf.done(key)
                } else {
                    format!("quiescer {key}: {}", ran.detail)
                }
            }),
        }
    }

    /// Runs one action (an `Each` runs its parts, and counts as not all done).
    fn run(&self) -> anyhow::Result<Ran> {
        let did = |detail: String| Ran { did: true, detail };
        let found = |detail: String| Ran { did: false, detail };
        match self {
            Action::Fithaw { mount } => {
                let dir = File::open(mount)
                    .map_err(|e| anyhow!("thaw {}: open: {e}", mount.display()))?;
                match stillpoint_core::sys::thaw(&dir) {
                    Ok(()) => Ok(did(format!("thawed {}", mount.display()))),
                    Err(e) if e.kind() == ErrorKind::InvalidInput => {
                        Ok(found(format!("{} was not frozen", mount.display())))
                    }
                    Err(e) => Err(anyhow!("thaw {}: {e}", mount.display())),
                }
            }
            Action::Run { argv, env, timeout_ms } => crate::quiesce::exec::run_command(
                "post-thaw",
                argv,
                env,
                Duration::from_millis(*timeout_ms),
            )
            .map(did),
            Action::Resume { pid } => match sys::kill(*pid, Signal::Cont) {
                Ok(()) => Ok(did(format!("resumed process {pid}"))),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                    Ok(found(format!("process {pid} is gone")))
                }
                Err(e) => Err(anyhow!("resume process {pid}: {e}")),
            },
            Action::Hangup { pid, fd, inode } => hangup(*pid, *fd, *inode),
            Action::Kill { pid, start } => {
                let (killed, detail) = procs::kill_once(&ProcRef { pid: *pid, start: *start })?;
                Ok(Ran { did: killed, detail })
            }
            Action::ResumeAll { procs } => {
                let (all, detail) = procs::resume_each(procs)?;
                Ok(Ran { did: all, detail })
            }
            Action::RestoreMode { path, mode } => procs::restore_mode(path, *mode).map(did),
            Action::Each { actions } => each(actions, Action::execute).map(found),
        }
    }

    /// The action that ends this process's connection on socket `fd`, for a quiescer whose
    /// hold lives as long as that connection.
    pub fn hangup_own(fd: BorrowedFd<'_>) -> anyhow::Result<Action> {
        Action::hangup_own_raw(fd.as_raw_fd())
    }

    /// [`Action::hangup_own`] for a client library that shows its socket only as a raw fd.
    pub fn hangup_own_raw(fd: RawFd) -> anyhow::Result<Action> {
        let inode = socket_inode(std::process::id().try_into()?, fd)?
            .ok_or_else(|| anyhow!("file descriptor {fd} is not a socket"))?;
        Ok(Action::Hangup { pid: std::process::id().try_into()?, fd, inode })
    }
}

/// What running one action found: its detail, and whether it did all that [`Action::done`] says.
struct Ran {
    did: bool,
    detail: String,
}

/// Runs every action in order, each even when another fails, joining what `run` says of them.
fn each(
    actions: &[Action],
    run: impl Fn(&Action) -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for a in actions {
        match run(a) {
            Ok(d) => done.push(d),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if failed.is_empty() {
        Ok(done.join("; "))
    } else {
        Err(anyhow!("{} (done: {})", failed.join("; "), done.join("; ")))
    }
}

/// The inode of the socket open as `fd` in process `pid`, `None` when that fd is something else.
fn socket_inode(pid: i32, fd: i32) -> std::io::Result<Option<u64>> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))?;
    let link = link.to_string_lossy();
    Ok(link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|n| n.parse().ok()))
}

/// Shuts down socket `fd` of process `pid` if it is still the socket `inode`.
fn hangup(pid: i32, fd: i32, inode: u64) -> anyhow::Result<Ran> {
    let gone = |what: &str| {
        Ok(Ran { did: false, detail: format!("the connection is already closed ({what})") })
    };
    let pidfd = match sys::pidfd_open(pid) {
        Ok(pidfd) => pidfd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return gone("its process is gone"),
        Err(e) => return Err(anyhow!("open process {pid}: {e}")),
    };
    // Checked after the pidfd pins the process: the same pid, fd and socket inode as armed.
    match socket_inode(pid, fd) {
        Ok(Some(now)) if now == inode => {}
        Ok(_) => return gone("its file descriptor names another file now"),
        Err(e) if e.kind() == ErrorKind::NotFound => return gone("no such descriptor"),
        // Not a sign the connection closed: it may still hold the application.
        Err(e) => return Err(anyhow!("read socket {fd} of process {pid}: {e}")),
    }
    let socket = match sys::pidfd_getfd(&pidfd, fd) {
        Ok(socket) => socket,
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => return gone("no such descriptor"),
        Err(e) => return Err(anyhow!("take socket {fd} of process {pid}: {e}")),
    };
    if socket_inode(std::process::id().try_into()?, socket.as_raw_fd())? != Some(inode) {
        return gone("its file descriptor names another file now");
    }
    match sys::shutdown(&socket) {
        Ok(()) => Ok(Ran {
            did: true,
            detail: format!("closed connection (socket {fd} of process {pid})"),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => gone("not connected"),
        Err(e) => Err(anyhow!("shut down socket {fd} of process {pid}: {e}")),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    seq: u64,
    #[serde(flatten)]
    request: Request,
}

/// The guardian's answer to request `seq`, one JSON line on its stdout.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub seq: u64,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    #[serde(default)]
    pub error: Option<String>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs a backup's actions (already reversed) and logs each as "guardian: <why>; <done>".
fn fire(held: &[Held], why: &str, journal: Option<&Path>) {
    for h in held {
        for (key, action) in &h.actions {
            match action.undo(key) {
                Ok(undone) => warn!("guardian: {why}; {undone} for backup {}", h.backup),
                Err(e) => error!(
                    "guardian: {why}; could not undo quiescer {key} for backup {}: {e:#}",
                    h.backup
                ),
            }
        }
        if let Some(path) = journal {
            if let Err(e) = crate::journal::Journal::forget(path, &h.backup) {
                error!("guardian: journal {}: {e}", path.display());
            }
        }
    }
}

/// The guardian's loop: reads requests from `input`, answers on `output`, fires leases, and on
/// EOF runs everything it holds and returns. `journal`, when given, loses each backup it thaws.
pub fn serve(input: impl Read + Send + 'static, mut output: impl Write, journal: Option<&Path>) {
    let origin = Instant::now();
    let (tx, rx) = mpsc::channel::<(Instant, Option<String>)>();
    std::thread::spawn(move || {
        for line in BufReader::new(input).lines() {
            let Ok(line) = line else { break };
            // Stamped on arrival, so a busy loop does not push a deadline later.
            if tx.send((Instant::now(), Some(line))).is_err() {
                return;
            }
        }
        let _ = tx.send((Instant::now(), None));
    });
    let mut ledger = Ledger::default();
    loop {
        let now = ms(origin.elapsed());
        let got = match ledger.next_deadline() {
            Some(d) => rx.recv_timeout(Duration::from_millis(d.saturating_sub(now))),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match got {
            Ok((at, Some(line))) => {
                let at = ms(at.saturating_duration_since(origin));
                expire(&mut ledger, at, journal);
                let reply = match serde_json::from_str::<Envelope>(&line) {
                    Ok(env) => Reply {
                        seq: env.seq,
                        outcome: Some(ledger.handle(at, env.request)),
                        error: None,
                    },
                    Err(e) => {
                        error!("guardian: unreadable request {line:?}: {e}");
                        let seq = serde_json::from_str::<serde_json::Value>(&line)
                            .ok()
                            .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
                            .unwrap_or(0);
                        Reply {
                            seq,
                            outcome: None,
                            error: Some(format!("unreadable request: {e}")),
                        }
                    }
                };
                if let Ok(text) = serde_json::to_string(&reply) {
                    // A failed reply means the agent is gone; EOF on stdin follows.
                    let _ = writeln!(output, "{text}").and_then(|()| output.flush());
                }
            }
            Err(RecvTimeoutError::Timeout) => expire(&mut ledger, ms(origin.elapsed()), journal),
            Ok((_, None)) | Err(RecvTimeoutError::Disconnected) => {
                fire(&ledger.drain(), "agent gone", journal);
                return;
            }
        }
    }
}

fn expire(ledger: &mut Ledger, now: u64, journal: Option<&Path>) {
    for held in ledger.due(now) {
        let why = format!("lease of {}ms ran out", held.lease_ms);
        fire(std::slice::from_ref(&held), &why, journal);
    }
}

/// The `stillpoint-agent guardian` subcommand: serves stdin/stdout until EOF.
pub fn main(journal: Option<&Path>) {
    serve(std::io::stdin(), std::io::stdout(), journal);
}

#[cfg(test)]
mod tests;
