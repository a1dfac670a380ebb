//! Processes as the kernel shows them in /proc: a pid together with its start time names one
//! process for good, so a signal sent later (by the agent, its guardian or a restarted agent)
//! never reaches another process that got the same pid. Finding processes by name or executable
//! lives here too; stopping and resuming them is the quiescers' business.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sys::{self, Signal};

/// One process: its pid and its start time (clock ticks after boot, field 22 of
/// /proc/<pid>/stat). Together they never name another process, even after the pid is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcRef {
    pub pid: i32,
    pub start: u64,
}

/// What /proc/<pid>/stat says about a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// `comm`: the executable's name, cut by the kernel to 15 bytes.
    pub comm: String,
    /// The state letter: `R`, `S`, `D`, `T` (stopped), `t`, `Z` (zombie), ...
    pub state: char,
    pub start: u64,
    /// A kernel thread (PF_KTHREAD): never one of ours to signal.
    pub kernel_thread: bool,
}

const PF_KTHREAD: u64 = 0x0020_0000;

/// Parses one /proc/<pid>/stat (or /proc/<pid>/task/<tid>/stat) line.
pub fn parse_stat(text: &str) -> Option<Stat> {
    // "pid (comm) S ...": comm may hold spaces and parentheses, so split at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state), so field n is rest[n - 3].
    let state = rest.first()?.chars().next()?;
    let flags: u64 = rest.get(9 - 3)?.parse().ok()?;
    let start: u64 = rest.get(22 - 3)?.parse().ok()?;
    Some(Stat { comm, state, start, kernel_thread: flags & PF_KTHREAD != 0 })
}

/// The stat of process `pid`, `None` if there is none.
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The executable process `pid` runs, without the " (deleted)" the kernel adds once the file
/// was replaced.
pub fn exe(pid: i32) -> Option<PathBuf> {
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let text = link.to_str()?;
    Some(PathBuf::from(text.strip_suffix(" (deleted)").unwrap_or(text)))
}

impl ProcRef {
    /// Process `pid` as it is now, `None` if it does not exist or has exited (a zombie).
    pub fn of(pid: i32) -> Option<ProcRef> {
        let s = stat(pid)?;
        (!matches!(s.state, 'Z' | 'X')).then_some(ProcRef { pid, start: s.start })
    }

    /// True while this very process runs (not exited, pid not reused).
    pub fn alive(&self) -> bool {
        ProcRef::of(self.pid) == Some(*self)
    }

    /// Sends `signal` to this process through a pidfd, only if the pid still names it.
    /// `Ok(false)`: it is gone (exited, or its pid now names another process).
    pub fn signal(&self, signal: Signal) -> io::Result<bool> {
        let fd = match sys::pidfd_open(self.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
            Err(e) => return Err(e),
        };
        // The fd names whatever had the pid when opened; if that is still our process now, it
        // was then too (a pid is not reused while its process lives), so the fd names it.
        if !self.alive() {
            return Ok(false);
        }
        match sys::pidfd_send_signal(&fd, signal) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `Some(true)` when this process and every one of its threads shows the stopped state
    /// `T` in /proc; `None` when it is gone.
    pub fn stopped(&self) -> Option<bool> {
        let s = stat(self.pid).filter(|s| s.start == self.start)?;
        if matches!(s.state, 'Z' | 'X') {
            return None;
        }
        if s.state != 'T' {
            return Some(false);
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return None;
        };
        for task in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(task.path().join("stat")) else { continue };
            if parse_stat(&text).is_some_and(|t| !matches!(t.state, 'T' | 'Z' | 'X')) {
                return Some(false);
            }
        }
        Some(true)
    }

    /// How many threads the process has now (0 when gone).
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid)).map(|d| d.count()).unwrap_or(0)
    }
}

/// Which processes a quiescer means: any process whose comm is `comm`, or whose executable is
/// `exe`, or whose pid is in `pidfile` (read each time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matcher {
    pub comm: Option<String>,
    pub exe: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
}

impl Matcher {
    /// Every live process it names now, sorted by pid, never this process nor a kernel thread.
    /// A pidfile that cannot be read or does not hold a pid is an error naming it.
    pub fn find(&self) -> anyhow::Result<Vec<(ProcRef, String)>> {
        let mut found = Vec::new();
        if let Some(pidfile) = &self.pidfile {
            let text = std::fs::read_to_string(pidfile)
                .map_err(|e| anyhow::anyhow!("read pidfile {}: {e}", pidfile.display()))?;
            let pid: i32 = text.trim().parse().ok().filter(|p| *p > 0).ok_or_else(|| {
                anyhow::anyhow!("pidfile {}: {:?} is not a pid", pidfile.display(), text.trim())
            })?;
            if let (Some(p), Some(s)) = (ProcRef::of(pid), stat(pid)) {
                found.push((p, s.comm));
            }
        }
        if self.comm.is_some() || self.exe.is_some() {
            let me = i32::try_from(std::process::id()).unwrap_or(0);
            let dir = std::fs::read_dir("/proc").map_err(|e| anyhow::anyhow!("read /proc: {e}"))?;
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                if pid == me {
                    continue;
                }
                let Some(s) = stat(pid) else { continue };
                if s.kernel_thread || matches!(s.state, 'Z' | 'X') {
                    continue;
                }
                let by_comm = self.comm.as_ref().is_some_and(|c| *c == s.comm);
                let by_exe = !by_comm
                    && self.exe.as_ref().is_some_and(|e| exe(pid).as_deref() == Some(e.as_path()));
                if by_comm || by_exe {
                    found.push((ProcRef { pid, start: s.start }, s.comm));
                }
            }
        }
        found.sort_by_key(|(p, _)| p.pid);
        found.dedup_by_key(|(p, _)| *p);
        Ok(found)
    }

    /// How this matcher reads in a detail: `comm "avimark" or exe /opt/x or pidfile /run/x.pid`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(c) = &self.comm {
            parts.push(format!("comm {c:?}"));
        }
        if let Some(e) = &self.exe {
            parts.push(format!("exe {}", e.display()));
        }
        if let Some(p) = &self.pidfile {
            parts.push(format!("pidfile {}", p.display()));
        }
        parts.join(" or ")
    }
}

/// SIGCONTs each process that is still the one stopped; for the guardian and the journal.
pub fn resume_all(procs: &[ProcRef]) -> anyhow::Result<String> {
    resume_each(procs).map(|(_, detail)| detail)
}

/// [`resume_all`], also saying whether every process was resumed (none was gone).
pub fn resume_each(procs: &[ProcRef]) -> anyhow::Result<(bool, String)> {
    let (mut resumed, mut gone, mut failed) = (Vec::new(), 0, Vec::new());
    for p in procs {
        match p.signal(Signal::Cont) {
            Ok(true) => resumed.push(p.pid.to_string()),
            Ok(false) => gone += 1,
            Err(e) => failed.push(format!("{}: {e}", p.pid)),
        }
    }
    if !failed.is_empty() {
        return Err(anyhow::anyhow!("resume processes: {}", failed.join(", ")));
    }
    Ok((gone == 0, format!("resumed processes [{}] ({gone} gone)", resumed.join(", "))))
}

/// SIGKILLs a holder process if it is still the one started; gone counts as done.
pub fn kill(p: &ProcRef) -> anyhow::Result<String> {
    kill_once(p).map(|(_, detail)| detail)
}

/// [`kill`], also saying whether this call killed it (not already gone).
pub fn kill_once(p: &ProcRef) -> anyhow::Result<(bool, String)> {
    match p.signal(Signal::Kill) {
        Ok(true) => Ok((true, format!("killed holder process {}", p.pid))),
        Ok(false) => Ok((false, format!("holder process {} is gone", p.pid))),
        Err(e) => Err(anyhow::anyhow!("kill holder process {}: {e}", p.pid)),
    }
}

/// Sets `path`'s permission bits back to `mode` (a lock-out's undo); safe to repeat.
pub fn restore_mode(path: &Path, mode: u32) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| anyhow::anyhow!("restore mode {mode:o} of {}: {e}", path.display()))?;
    Ok(format!("restored mode {mode:o} of {}", path.display()))
}

#[cfg(test)]
mod tests;
