//! What the agent has armed against its own death: the guardian link and the journal, kept in
//! step. Every thaw action is journalled and handed to the guardian before the freeze it undoes;
//! a thaw first takes the actions back from the guardian so exactly one process runs each.
//! Blocking calls throughout (pipe round trips, fsync): `backups` runs them off the async threads.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::guardian::link::{Link, Program};
use crate::guardian::{Action, Outcome, Request};
use crate::journal::{Entry, Journal};

/// The guardian, the journal and each armed backup's lease deadline.
pub struct Armed {
    link: Link,
    journal: Journal,
    deadlines: HashMap<String, Instant>,
    /// `<state_dir>/<server>.guardian.pid`, rewritten on every (re)spawn.
    pidfile: Option<PathBuf>,
    /// Set on shutdown: no more respawns.
    closed: bool,
}

/// The lease time left at `deadline`, rounded up and one ms more, so the guardian's deadline
/// (counted from when it reads the message) is never before the agent's.
fn lease_left(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = u64::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
    ms.saturating_add(1)
}

impl Armed {
    /// Starts a guardian for `journal` (which should be empty: recovery ran before).
    pub fn start(program: Program, journal: Journal, pidfile: Option<PathBuf>) -> Armed {
        let link = Link::start(program);
        let armed = Armed { link, journal, deadlines: HashMap::new(), pidfile, closed: false };
        if !armed.link.last_error().is_empty() {
            error!(error = %armed.link.last_error(), "guardian did not start");
        }
        armed.write_pidfile();
        armed
    }

    /// The guardian's pid, when it runs as a process.
    pub fn guardian_pid(&self) -> Option<u32> {
        self.link.pid()
    }

    fn write_pidfile(&self) {
        let (Some(path), Some(pid)) = (&self.pidfile, self.link.pid()) else { return };
        if let Err(e) = std::fs::write(path, format!("{pid}\n")) {
            warn!(error = %e, path = %path.display(), "write guardian pidfile");
        }
    }

    /// Makes sure a guardian runs, respawning it and re-arming what is armed if it died.
    /// Err says why none runs.
    pub fn ensure(&mut self) -> Result<(), String> {
        if self.closed {
            return Err("the agent is shutting down".into());
        }
        if self.link.alive() {
            return Ok(());
        }
        let why = self.link.last_error().to_string();
        self.link.respawn().map_err(|e| format!("{e} (before that: {why})"))?;
        self.write_pidfile();
        let entries = self.journal.entries().to_vec();
        warn!(reason = %why, rearmed = entries.len(), pid = ?self.link.pid(), "guardian respawned");
        for e in entries {
            let deadline = self.deadlines.get(&e.backup).copied().unwrap_or_else(Instant::now);
            let request = Request::Arm {
                backup: e.backup.clone(),
                lease_ms: lease_left(deadline),
                key: e.key.clone(),
                action: e.action.clone(),
            };
            match self.link.request(request) {
                Ok(_) => {}
                Err(e) => return Err(format!("re-arm the respawned guardian: {e}")),
            }
        }
        Ok(())
    }

    /// Journals `action` for quiescer `key` of `backup`, then hands it to the guardian, whose
    /// lease for the backup ends at `deadline`. Both happen before the freeze; Err refuses it.
    pub fn arm(
        &mut self,
        backup: &str,
        deadline: Instant,
        key: &str,
        action: Action,
    ) -> Result<(), String> {
        self.ensure().map_err(|e| format!("no freeze guardian is running: {e}"))?;
        let entry = Entry { backup: backup.into(), key: key.into(), action: action.clone() };
        self.journal.arm(entry).map_err(|e| format!("journal: {e}"))?;
        self.deadlines.insert(backup.to_string(), deadline);
        let request = Request::Arm {
            backup: backup.into(),
            lease_ms: lease_left(deadline),
            key: key.into(),
            action,
        };
        match self.link.request(request) {
            Ok(Outcome::Armed) => Ok(()),
            Ok(Outcome::AlreadyThawed) => {
                Err(format!("the guardian already thawed backup {backup}: its lease ran out"))
            }
            Ok(other) => Err(format!("guardian answered {other:?} to arm")),
            Err(e) => Err(format!("guardian: {e}")),
        }
    }

    /// Forgets quiescer `key`'s action: its freeze did not happen and must never be undone.
    pub fn disarm(&mut self, backup: &str, key: &str) {
        if let Err(e) =
            self.link.request(Request::Disarm { backup: backup.into(), key: key.into() })
        {
            warn!(error = %e, "guardian disarm failed");
        }
        if let Err(e) = self.journal.disarm(backup, key) {
            error!(error = %e, "journal disarm failed");
        }
    }

    /// Takes `backup`'s actions back from the guardian before the agent thaws it itself.
    /// `AlreadyThawed`: the guardian ran them; the agent must not run them again.
    pub fn release(&mut self, backup: &str) -> Outcome {
        if !self.journal.entries().iter().any(|e| e.backup == backup) {
            return Outcome::Unknown;
        }
        match self.link.request(Request::Release { backup: backup.into() }) {
            Ok(outcome) => outcome,
            Err(e) => {
                // A dead guardian runs nothing more: thawing here is still the only thaw.
                warn!(error = %e, "guardian release failed; thawing anyway");
                Outcome::Released
            }
        }
    }

    /// `backup` is thawed: clears its journal entries.
    pub fn done(&mut self, backup: &str) {
        self.deadlines.remove(backup);
        if let Err(e) = self.journal.release(backup) {
            error!(error = %e, "journal release failed");
        }
    }

    /// For shutdown, after everything is thawed and released: closes the guardian's stdin,
    /// waits for it to exit and removes the pidfile. No respawn after this.
    pub fn close(&mut self) {
        self.closed = true;
        self.link.close(Duration::from_secs(5));
        if let Some(path) = &self.pidfile {
            let _ = std::fs::remove_file(path);
        }
        info!("guardian stopped");
    }
}
