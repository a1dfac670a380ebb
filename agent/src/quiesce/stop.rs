//! The stop quiescer, for applications with no hooks of their own: SIGSTOP the process named by
//! a pidfile (read at freeze time) and wait until the kernel shows it stopped; SIGCONT on thaw.
//! It never signals a process it did not stop itself.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use super::Quiescer;
use crate::guardian::Action;
use crate::sys::{self, Signal};

/// How long a SIGSTOPped process may take to show state `T`.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops the process whose pid is in `pidfile`.
pub struct Stop {
    name: String,
    pidfile: PathBuf,
    /// The pid read for a backup by `thaw_action`, then stopped by `freeze`.
    pid: Mutex<Option<(String, i32)>>,
    /// The backup and process we stopped, until thawed.
    stopped: Mutex<Option<(String, i32)>>,
}

impl Stop {
    pub fn new(name: String, pidfile: PathBuf) -> Stop {
        Stop { name, pidfile, pid: Mutex::new(None), stopped: Mutex::new(None) }
    }

    /// The running process named by the pidfile.
    fn read_pid(&self) -> anyhow::Result<i32> {
        let file = self.pidfile.display();
        let text = std::fs::read_to_string(&self.pidfile)
            .with_context(|| format!("read pidfile {file}"))?;
        let pid: i32 = text
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| anyhow!("pidfile {file}: {:?} is not a pid", text.trim()))?;
        if state(pid).is_none() {
            return Err(anyhow!("process {pid} from pidfile {file} is not running"));
        }
        Ok(pid)
    }
}

/// The state letter of process `pid` in /proc/<pid>/stat (`R`, `S`, `T`...), `None` if gone.
pub fn state(pid: i32) -> Option<char> {
    let stat =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // "pid (comm) S ...": comm may hold spaces and parentheses, so look after the last ')'.
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

impl Quiescer for Stop {
    fn name(&self) -> &str {
        &self.name
    }

    fn hold(&self) -> super::Hold {
        super::Hold::StoppedProcesses
    }

    fn thaw_action(&self, backup_id: &str) -> anyhow::Result<Option<Action>> {
        let pid = self.read_pid()?;
        *self.pid.lock().unwrap_or_else(|p| p.into_inner()) = Some((backup_id.to_string(), pid));
        Ok(Some(Action::Resume { pid }))
    }

    fn freeze(&self, backup_id: &str) -> anyhow::Result<String> {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((b, pid)) = stopped.as_ref().filter(|(b, _)| b == backup_id) {
            return Ok(format!("process {pid} already stopped for backup {b}"));
        }
        // The pid the guardian was armed with; read now if nobody asked for the action.
        let armed = self.pid.lock().unwrap_or_else(|p| p.into_inner()).take();
        let pid = match armed {
            Some((b, pid)) if b == backup_id => pid,
            _ => self.read_pid()?,
        };
        sys::kill(pid, Signal::Stop).with_context(|| format!("stop process {pid}"))?;
        *stopped = Some((backup_id.to_string(), pid));
        let started = Instant::now();
        loop {
            match state(pid) {
                Some('T' | 't') => {
                    return Ok(format!(
                        "stopped process {pid} in {}ms",
                        started.elapsed().as_millis()
                    ))
                }
                None => {
                    *stopped = None;
                    return Err(anyhow!("process {pid} exited while being stopped"));
                }
                Some(_) if started.elapsed() > STOP_TIMEOUT => {
                    let _ = sys::kill(pid, Signal::Cont);
                    *stopped = None;
                    return Err(anyhow!(
                        "process {pid} did not stop within {}ms; resumed it",
                        STOP_TIMEOUT.as_millis()
                    ));
                }
                Some(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }

    fn thaw(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, pid)) = stopped.as_ref().filter(|(b, _)| b == backup_id) else {
            return Ok(());
        };
        match sys::kill(*pid, Signal::Cont) {
            Ok(()) => {}
            // ESRCH: the process is gone; nothing is stopped any more.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(anyhow!("resume process {pid}: {e}")),
        }
        *stopped = None;
        Ok(())
    }

    fn thawed_elsewhere(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        if stopped.as_ref().is_some_and(|(b, _)| b == backup_id) {
            *stopped = None;
        }
        Ok(())
    }
}
