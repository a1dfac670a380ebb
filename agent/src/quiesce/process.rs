//! The process quiescer, for applications with no hooks: finds them by `comm`, executable or
//! pidfile; on freeze tells users (an optional command such as `wall`), locks the program out
//! (chmod a-x of its executable and/or a lock command), asks it to stop (a signal or command),
//! waits a grace period, then SIGSTOPs every matching process left until /proc shows all their
//! threads stopped. Thaw resumes exactly the processes it stopped and undoes the lock-out. The
//! guardian holds the undo of all of it, armed before anything is stopped or locked.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::Deserialize;

use super::exec::run_command;
use super::procs::{Matcher, ProcRef};
use super::{Hold, Quiescer};
use crate::guardian::Action;
use crate::sys::Signal;

/// `[[quiescer]] kind = "process"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    pub name: String,
    /// Processes whose name (`comm`, as `ps -o comm` shows it, at most 15 bytes) is this.
    #[serde(default)]
    pub comm: Option<String>,
    /// Processes running this executable (absolute path, as /proc/<pid>/exe shows it).
    #[serde(default)]
    pub exe: Option<PathBuf>,
    /// The process whose pid is in this file (read at each freeze).
    #[serde(default)]
    pub pidfile: Option<PathBuf>,
    /// Run first, to tell logged-in users, e.g. `["wall", "Backup: AVImark pauses now"]`.
    #[serde(default)]
    pub notify: Option<Vec<String>>,
    /// The polite stop: a signal sent to every matching process (`TERM`, `INT`, `HUP`, `QUIT`,
    /// `USR1`, `USR2`) ...
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// ... or a command (not both).
    #[serde(default)]
    pub stop_command: Option<Vec<String>>,
    /// How long to wait after notify and the polite stop before SIGSTOP, in milliseconds; it
    /// ends early once every matching process has exited. Counts against the lease.
    #[serde(default)]
    pub grace_ms: u64,
    /// Lock-out: this file loses its execute bits while frozen (so nobody, root included, can
    /// start it) and gets its exact mode back at thaw, by the agent or its guardian.
    #[serde(default)]
    pub lockout_executable: Option<PathBuf>,
    /// Lock-out by command, e.g. `["systemctl", "mask", "--runtime", "app"]`; needs
    /// `unlock_command`, run at thaw and by the guardian (so it must be safe to repeat, and to
    /// run when nothing is locked: the guardian may run it for a freeze that never happened).
    #[serde(default)]
    pub lock_command: Option<Vec<String>>,
    #[serde(default)]
    pub unlock_command: Option<Vec<String>>,
    /// Each command's time limit, and how long stopped processes may take to show `T`.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// The kernel keeps this many bytes of a process's name.
const COMM_MAX: usize = 15;

/// `TERM`, `SIGTERM`, `term`: the polite signals a config may name.
pub fn parse_signal(name: &str) -> Option<Signal> {
    let upper = name.trim().to_ascii_uppercase();
    Some(match upper.strip_prefix("SIG").unwrap_or(&upper) {
        "TERM" => Signal::Term,
        "INT" => Signal::Int,
        "HUP" => Signal::Hup,
        "QUIT" => Signal::Quit,
        "USR1" => Signal::Usr1,
        "USR2" => Signal::Usr2,
        _ => return None,
    })
}

impl ProcessConfig {
    fn matcher(&self) -> Matcher {
        Matcher { comm: self.comm.clone(), exe: self.exe.clone(), pidfile: self.pidfile.clone() }
    }

    /// Field problems, one line each, prefixed with `at` (`quiescer[2]`).
    pub fn problems(&self, at: &str, max_lease_ms: u64, out: &mut Vec<String>) {
        if let Err(e) = stillpoint_core::validate_name("quiescer name", &self.name) {
            out.push(format!("{at}.name: {e}"));
        }
        if self.comm.is_none() && self.exe.is_none() && self.pidfile.is_none() {
            out.push(format!("{at}: say which processes: comm, exe or pidfile"));
        }
        if let Some(comm) = &self.comm {
            if comm.is_empty() || comm.len() > COMM_MAX {
                out.push(format!(
                    "{at}.comm: {comm:?} is not a process name the kernel shows (1 to {COMM_MAX} bytes; for a longer name give exe)"
                ));
            }
        }
        for (field, path) in [
            ("exe", &self.exe),
            ("pidfile", &self.pidfile),
            ("lockout_executable", &self.lockout_executable),
        ] {
            if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                out.push(format!(
                    "{at}.{field}: {} is not an absolute path",
                    path.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
                ));
            }
        }
        if let Some(exe) = self.lockout_executable.as_ref().filter(|p| p.is_absolute()) {
            if !exe.is_file() {
                out.push(format!(
                    "{at}.lockout_executable: {} is not an existing file",
                    exe.display()
                ));
            }
        }
        if let Some(sig) = &self.stop_signal {
            if parse_signal(sig).is_none() {
                out.push(format!(
                    "{at}.stop_signal: {sig:?} is not one of TERM, INT, HUP, QUIT, USR1, USR2"
                ));
            }
        }
        if self.stop_signal.is_some() && self.stop_command.is_some() {
            out.push(format!("{at}: give stop_signal or stop_command, not both"));
        }
        if self.lock_command.is_some() != self.unlock_command.is_some() {
            out.push(format!(
                "{at}: lock_command and unlock_command go together (the guardian runs unlock_command if the agent cannot)"
            ));
        }
        for (field, argv) in [
            ("notify", &self.notify),
            ("stop_command", &self.stop_command),
            ("lock_command", &self.lock_command),
            ("unlock_command", &self.unlock_command),
        ] {
            if argv.as_ref().is_some_and(|a| a.is_empty() || a[0].is_empty()) {
                out.push(format!(
                    "{at}.{field}: give the program and its arguments, e.g. [\"/usr/bin/wall\", \"...\"]"
                ));
            }
        }
        if self.timeout_ms == 0 {
            out.push(format!("{at}.timeout_ms: must be above 0"));
        }
        if self.grace_ms >= max_lease_ms {
            out.push(format!(
                "{at}.grace_ms: {} leaves no time of the longest lease ({max_lease_ms}ms) for the snapshot",
                self.grace_ms
            ));
        }
    }

    /// The most a freeze may take: commands, grace and the wait for stopped processes.
    pub fn worst_case_ms(&self) -> u64 {
        let commands = [&self.notify, &self.stop_command, &self.lock_command]
            .iter()
            .filter(|c| c.is_some())
            .count() as u64;
        self.timeout_ms.saturating_mul(commands + 1).saturating_add(self.grace_ms)
    }
}

/// Stops an application's processes; see the module doc.
pub struct Process {
    config: ProcessConfig,
    server: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// What `thaw_action` found and armed, for the freeze that follows.
    armed: Option<Armed>,
    /// What a freeze changed, until thaw undoes it.
    frozen: Option<Frozen>,
}

struct Armed {
    backup: String,
    procs: Vec<(ProcRef, String)>,
    /// Matching processes someone else had already stopped: never ours to resume.
    foreign: Vec<ProcRef>,
    /// The lock-out executable's mode before the freeze.
    mode: Option<u32>,
}

#[derive(Default)]
struct Frozen {
    backup: String,
    /// Processes this quiescer SIGSTOPped, to SIGCONT at thaw.
    stopped: Vec<ProcRef>,
    /// The lock-out executable and the mode to give back.
    locked: Option<(PathBuf, u32)>,
    /// The lock command ran: run unlock_command at thaw.
    lock_ran: bool,
}

impl Process {
    pub fn new(config: ProcessConfig, server: &str) -> Process {
        Process { config, server: server.to_string(), state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    fn env(&self, phase: &str, backup_id: &str) -> Vec<(String, String)> {
        vec![
            ("STILLPOINT_BACKUP_ID".into(), backup_id.into()),
            ("STILLPOINT_SERVER".into(), self.server.clone()),
            ("STILLPOINT_PHASE".into(), phase.into()),
        ]
    }

    /// The guardian's undo: resume the processes, give the mode back, run unlock_command.
    fn action(&self, backup_id: &str, armed: &Armed) -> Action {
        let mut actions =
            vec![Action::ResumeAll { procs: armed.procs.iter().map(|(p, _)| *p).collect() }];
        if let (Some(path), Some(mode)) = (&self.config.lockout_executable, armed.mode) {
            actions.push(Action::RestoreMode { path: path.clone(), mode });
        }
        if let Some(argv) = &self.config.unlock_command {
            actions.push(Action::Run {
                argv: argv.clone(),
                env: self.env("post-thaw", backup_id),
                timeout_ms: self.config.timeout_ms,
            });
        }
        if actions.len() == 1 {
            actions.remove(0)
        } else {
            Action::Each { actions }
        }
    }

    /// Undoes what `frozen` says was done, dropping each part once it is undone.
    fn undo(&self, frozen: &mut Frozen) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        let mut still = Vec::new();
        for p in std::mem::take(&mut frozen.stopped) {
            if let Err(e) = p.signal(Signal::Cont) {
                failed.push(format!("resume process {}: {e}", p.pid));
                still.push(p);
            }
        }
        frozen.stopped = still;
        if let Some((path, mode)) = frozen.locked.take() {
            if let Err(e) = super::procs::restore_mode(&path, mode) {
                failed.push(format!("{e:#}"));
                frozen.locked = Some((path, mode));
            }
        }
        if frozen.lock_ran {
            if let Some(argv) = &self.config.unlock_command {
                let env = self.env("post-thaw", &frozen.backup);
                match run_command("unlock_command", argv, &env, self.timeout()) {
                    Ok(_) => frozen.lock_ran = false,
                    Err(e) => failed.push(format!("{e:#}")),
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("{}", failed.join("; ")))
        }
    }

    /// The freeze itself; on error `frozen` says what to undo.
    fn freeze_armed(
        &self,
        backup_id: &str,
        armed: &Armed,
        frozen: &mut Frozen,
    ) -> anyhow::Result<String> {
        let started = Instant::now();
        let mut notes = Vec::new();
        if let Some(argv) = &self.config.notify {
            match run_command("notify", argv, &self.env("notify", backup_id), self.timeout()) {
                Ok(_) => notes.push(format!("told users ({})", argv[0])),
                // Telling users is a courtesy: the freeze goes on, and says so.
                Err(e) => notes.push(format!("could not tell users: {e:#}")),
            }
        }
        if let (Some(path), Some(mode)) = (&self.config.lockout_executable, armed.mode) {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o111))
                .with_context(|| format!("lock out {}: chmod a-x", path.display()))?;
            frozen.locked = Some((path.clone(), mode));
            notes.push(format!(
                "locked out {} (mode {mode:o}, execute bits removed)",
                path.display()
            ));
        }
        if let Some(argv) = &self.config.lock_command {
            // Undone even if it fails half-way: unlock_command must be safe to run regardless.
            frozen.lock_ran = true;
            run_command("lock_command", argv, &self.env("lock", backup_id), self.timeout())?;
            notes.push(format!("ran lock_command ({})", argv[0]));
        }
        let alive = |procs: &[(ProcRef, String)]| procs.iter().filter(|(p, _)| p.alive()).count();
        if let Some((text, sig)) =
            self.config.stop_signal.as_deref().and_then(|t| Some((t, parse_signal(t)?)))
        {
            let name = text.trim().to_ascii_uppercase();
            let name = if name.starts_with("SIG") { name } else { format!("SIG{name}") };
            let mut sent = 0;
            for (p, _) in &armed.procs {
                if p.signal(sig).with_context(|| format!("signal process {}", p.pid))? {
                    sent += 1;
                }
            }
            notes.push(format!("sent {name} to {sent} process{}", plural(sent)));
        }
        if let Some(argv) = &self.config.stop_command {
            run_command("stop_command", argv, &self.env("stop", backup_id), self.timeout())?;
            notes.push(format!("ran stop_command ({})", argv[0]));
        }
        if self.config.grace_ms > 0 {
            let grace = Duration::from_millis(self.config.grace_ms);
            let since = Instant::now();
            while since.elapsed() < grace && alive(&armed.procs) > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            let gone = armed.procs.len() - alive(&armed.procs);
            notes.push(format!(
                "waited {}ms of a {}ms grace; {gone} of {} exited",
                since.elapsed().as_millis(),
                grace.as_millis(),
                armed.procs.len()
            ));
        }
        let stopping = Instant::now();
        let mut foreign = armed.foreign.len();
        for (p, _) in &armed.procs {
            // Stopped by someone else since arming: theirs to resume, not ours.
            if p.stopped() == Some(true) {
                foreign += 1;
                continue;
            }
            if p.signal(Signal::Stop).with_context(|| format!("stop process {}", p.pid))? {
                frozen.stopped.push(*p);
            }
        }
        if foreign > 0 {
            notes.push(format!(
                "left {foreign} process{} that someone else had stopped as {} was",
                plural(foreign),
                if foreign == 1 { "it" } else { "they" }
            ));
        }
        for p in &frozen.stopped {
            while p.stopped() == Some(false) {
                if stopping.elapsed() > self.timeout() {
                    return Err(anyhow!(
                        "process {} did not show every thread stopped within {}ms",
                        p.pid,
                        self.config.timeout_ms
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let stopped_in = stopping.elapsed();
        // Stopped processes cannot start others: anything matching that was not armed now
        // would run on while the guardian could not resume it if we stopped it.
        let known: HashSet<ProcRef> =
            armed.procs.iter().map(|(p, _)| *p).chain(armed.foreign.iter().copied()).collect();
        let newcomers: Vec<String> = self
            .config
            .matcher()
            .find()?
            .into_iter()
            .filter(|(p, _)| !known.contains(p))
            .map(|(p, comm)| format!("{} ({comm})", p.pid))
            .collect();
        if !newcomers.is_empty() {
            return Err(anyhow!(
                "{} started after the guardian was armed: {}; not freezing what the guardian could not resume (a lock-out keeps new ones from starting)",
                if newcomers.len() == 1 { "a matching process" } else { "matching processes" },
                newcomers.join(", ")
            ));
        }
        let each: Vec<String> = frozen
            .stopped
            .iter()
            .map(|p| {
                let comm = armed.procs.iter().find(|(q, _)| q == p).map(|(_, c)| c.as_str());
                let threads = p.threads();
                let s = if threads == 1 { "" } else { "s" };
                format!("{} {} ({threads} thread{s})", p.pid, comm.unwrap_or("?"))
            })
            .collect();
        let n = frozen.stopped.len();
        notes.push(if n == 0 {
            format!("no process matching {} was running", self.config.matcher().describe())
        } else {
            format!(
                "stopped {n} process{} [{}] in {}ms",
                plural(n),
                each.join(", "),
                stopped_in.as_millis()
            )
        });
        Ok(format!("{} (in {}ms)", notes.join("; "), started.elapsed().as_millis()))
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "es"
    }
}

impl Quiescer for Process {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn hold(&self) -> Hold {
        Hold::StoppedProcesses
    }

    fn thaw_action(&self, backup_id: &str) -> anyhow::Result<Option<Action>> {
        let mut state = self.lock();
        if let Some(frozen) = &state.frozen {
            if frozen.backup != backup_id {
                return Err(anyhow!("still frozen for backup {}; thaw it first", frozen.backup));
            }
        }
        if let Some(armed) = state.armed.as_ref().filter(|a| a.backup == backup_id) {
            return Ok(Some(self.action(backup_id, armed)));
        }
        let (foreign, procs): (Vec<_>, Vec<_>) =
            self.config.matcher().find()?.into_iter().partition(|(p, _)| p.stopped() == Some(true));
        let foreign = foreign.into_iter().map(|(p, _)| p).collect();
        let mode = match &self.config.lockout_executable {
            Some(path) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)
                    .with_context(|| format!("lockout_executable {}", path.display()))?
                    .permissions()
                    .mode()
                    & 0o7777;
                if mode & 0o111 == 0 {
                    return Err(anyhow!(
                        "lockout_executable {} has no execute bit (mode {mode:o}): an earlier lock-out may never have been undone; give it back its mode (chmod +x) and try again",
                        path.display()
                    ));
                }
                Some(mode)
            }
            None => None,
        };
        let armed = Armed { backup: backup_id.to_string(), procs, foreign, mode };
        let action = self.action(backup_id, &armed);
        state.armed = Some(armed);
        Ok(Some(action))
    }

    fn freeze(&self, backup_id: &str) -> anyhow::Result<String> {
        let mut state = self.lock();
        if state.frozen.as_ref().is_some_and(|f| f.backup == backup_id) {
            return Ok(format!("already frozen for backup {backup_id}"));
        }
        let Some(armed) = state.armed.take_if(|a| a.backup == backup_id) else {
            return Err(anyhow!(
                "nothing was armed with the guardian for backup {backup_id}; not stopping anything"
            ));
        };
        let mut frozen = Frozen { backup: backup_id.to_string(), ..Frozen::default() };
        let result = self.freeze_armed(backup_id, &armed, &mut frozen);
        state.armed = Some(armed);
        match result {
            Ok(detail) => {
                state.frozen = Some(frozen);
                Ok(detail)
            }
            Err(e) => {
                // A failed freeze is disarmed, never thawed: undo what it did now.
                let locked_out = frozen.locked.is_some() || frozen.lock_ran;
                match self.undo(&mut frozen) {
                    Ok(()) => Err(anyhow!(
                        "{e:#}; resumed what it had stopped{}",
                        if locked_out { ", undid the lock-out" } else { "" }
                    )),
                    Err(u) => {
                        state.frozen = Some(frozen);
                        Err(anyhow!("{e:#}; and undoing it failed: {u:#}"))
                    }
                }
            }
        }
    }

    fn thaw(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut state = self.lock();
        if state.armed.as_ref().is_some_and(|a| a.backup == backup_id) {
            state.armed = None;
        }
        let Some(mut frozen) = state.frozen.take() else { return Ok(()) };
        if frozen.backup != backup_id {
            state.frozen = Some(frozen);
            return Ok(());
        }
        // Resumed by someone else before the thaw: the freeze's claim did not last.
        let broken: Vec<String> = frozen
            .stopped
            .iter()
            .filter(|p| p.stopped() == Some(false))
            .map(|p| p.pid.to_string())
            .collect();
        let undone = self.undo(&mut frozen);
        if undone.is_err() {
            state.frozen = Some(frozen);
        }
        // Both are said when both happened: a failed undo must not hide a broken hold.
        let broken = (!broken.is_empty()).then(|| {
            format!(
                "process{} [{}] ran again before the thaw (someone else resumed {}); writes were not held for the whole freeze, so its files in the snapshot are only crash-consistent",
                plural(broken.len()),
                broken.join(", "),
                if broken.len() == 1 { "it" } else { "them" }
            )
        });
        match (undone, broken) {
            (Ok(()), None) => Ok(()),
            (Ok(()), Some(broken)) => Err(anyhow!("{broken}")),
            (Err(e), None) => Err(e),
            (Err(e), Some(broken)) => Err(anyhow!("{e:#}; and {broken}")),
        }
    }

    fn thawed_elsewhere(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut state = self.lock();
        if state.armed.as_ref().is_some_and(|a| a.backup == backup_id) {
            state.armed = None;
        }
        if state.frozen.as_ref().is_some_and(|f| f.backup == backup_id) {
            state.frozen = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
