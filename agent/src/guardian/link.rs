//! The agent's end of the guardian pipe: starts the guardian (a child in its own process group,
//! or a thread for unit tests), sends one request at a time and waits for its reply. A write
//! that fails, a reply that does not come or a closed pipe marks the guardian dead; the owner
//! respawns it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Envelope, Outcome, Reply, Request};

/// How long a reply may take before the guardian counts as hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// How to start a guardian.
#[derive(Debug, Clone)]
pub enum Program {
    /// `<exe> guardian --journal <journal>`: the real thing, a separate process.
    Exe { exe: PathBuf, journal: PathBuf },
    /// [`super::serve`] on a thread of this process: survives nothing, for unit tests.
    Thread,
}

struct Conn {
    child: Option<Child>,
    thread: Option<JoinHandle<()>>,
    to: Box<dyn Write + Send>,
    replies: mpsc::Receiver<Reply>,
}

/// A running (or dead) guardian.
pub struct Link {
    program: Program,
    conn: Option<Conn>,
    seq: u64,
    /// Why the last start or request failed.
    last_error: String,
}

impl Link {
    /// Starts a guardian; a failure is kept and reported by [`Link::request`] and `alive`.
    pub fn start(program: Program) -> Link {
        let mut link = Link { program, conn: None, seq: 0, last_error: String::new() };
        if let Err(e) = link.respawn() {
            link.last_error = e;
        }
        link
    }

    /// The guardian's pid, when it is a process and running.
    pub fn pid(&self) -> Option<u32> {
        self.conn.as_ref().and_then(|c| c.child.as_ref()).map(Child::id)
    }

    /// Why the guardian is not running, if it is not.
    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    /// True while the guardian runs; reaps it (and says why) once it has exited.
    pub fn alive(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else { return false };
        let exited = match (&mut conn.child, &conn.thread) {
            (Some(child), _) => match child.try_wait() {
                Ok(Some(status)) => Some(format!("guardian exited with {status}")),
                Ok(None) => None,
                Err(e) => Some(format!("guardian: wait: {e}")),
            },
            (None, Some(thread)) if thread.is_finished() => Some("guardian thread ended".into()),
            _ => None,
        };
        match exited {
            Some(why) => {
                self.conn = None;
                self.last_error = why;
                false
            }
            None => true,
        }
    }

    /// Starts a new guardian, killing any old one first. It holds nothing until re-armed.
    pub fn respawn(&mut self) -> Result<(), String> {
        self.kill();
        let conn = match &self.program {
            Program::Exe { exe, journal } => {
                let mut child = Command::new(exe)
                    .arg("guardian")
                    .arg("--journal")
                    .arg(journal)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    // Its own process group: a Ctrl-C meant for the agent does not reach it.
                    .process_group(0)
                    .spawn()
                    .map_err(|e| format!("start guardian {}: {e}", exe.display()))?;
                let (Some(to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err("start guardian: no pipes".into());
                };
                Conn {
                    child: Some(child),
                    thread: None,
                    to: Box::new(to),
                    replies: read_replies(from),
                }
            }
            Program::Thread => {
                let pair = || UnixStream::pair().map_err(|e| format!("guardian socket: {e}"));
                let ((to, their_in), (their_out, from)) = (pair()?, pair()?);
                let thread = std::thread::spawn(move || super::serve(their_in, their_out, None));
                Conn {
                    child: None,
                    thread: Some(thread),
                    to: Box::new(to),
                    replies: read_replies(from),
                }
            }
        };
        self.conn = Some(conn);
        self.last_error.clear();
        Ok(())
    }

    /// Sends `request` and waits for the guardian's outcome. Any failure marks it dead.
    pub fn request(&mut self, request: Request) -> Result<Outcome, String> {
        let result = self.exchange(request);
        if let Err(e) = &result {
            self.last_error = e.clone();
            self.kill();
        }
        result
    }

    fn exchange(&mut self, request: Request) -> Result<Outcome, String> {
        self.seq += 1;
        let seq = self.seq;
        let Some(conn) = self.conn.as_mut() else {
            return Err(if self.last_error.is_empty() {
                "no guardian is running".into()
            } else {
                self.last_error.clone()
            });
        };
        let line = serde_json::to_string(&Envelope { seq, request })
            .map_err(|e| format!("guardian request: {e}"))?;
        writeln!(conn.to, "{line}")
            .and_then(|()| conn.to.flush())
            .map_err(|e| format!("write to guardian: {e}"))?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match conn.replies.recv_timeout(left) {
                Ok(reply) if reply.seq < seq => continue,
                Ok(Reply { outcome: Some(outcome), .. }) => return Ok(outcome),
                Ok(Reply { error, .. }) => {
                    return Err(format!(
                        "guardian refused a request: {}",
                        error.unwrap_or_default()
                    ))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "guardian did not answer within {}ms",
                        REPLY_TIMEOUT.as_millis()
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("guardian closed its pipe".into())
                }
            }
        }
    }

    /// Closes the guardian's stdin (it runs whatever it still holds, then exits) and waits up
    /// to `within` for it to go.
    pub fn close(&mut self, within: Duration) {
        let Some(mut conn) = self.conn.take() else { return };
        drop(conn.to);
        let deadline = Instant::now() + within;
        if let Some(child) = conn.child.as_mut() {
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(thread) = conn.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Ends a hung or replaced guardian at once (it is our own child).
    fn kill(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            if let Some(child) = conn.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // EOF makes the guardian thaw what it still holds and exit; do not wait for it here.
        if let Some(conn) = self.conn.take() {
            drop(conn.to);
        }
    }
}

/// Reads reply lines on a thread; the channel closes when the guardian's end does.
fn read_replies(from: impl Read + Send + 'static) -> mpsc::Receiver<Reply> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Reply>(&line) {
                Ok(reply) => {
                    if tx.send(reply).is_err() {
                        break;
                    }
                }
                Err(e) => tracing::error!("guardian reply {line:?} unreadable: {e}"),
            }
        }
    });
    rx
}
