//! The freeze journal: a small JSON file in `state_dir` mirroring the thaw actions armed with
//! the guardian, written (temp, fsync, rename, fsync dir) before the freeze it protects and
//! cleared once thawed. A restarted agent runs what it finds before serving: this covers the
//! agent and its guardian both killed. One file per server name.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use tracing::{error, warn};

use crate::guardian::Action;

/// One armed thaw action: quiescer `key` of `backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub backup: String,
    pub key: String,
    pub action: Action,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Content {
    /// The agent process that wrote it, so a second agent sharing the directory is noticed.
    owner_pid: u32,
    armed: Vec<Entry>,
}

/// The journal file and what it holds, in arming order.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    owner_pid: u32,
    entries: Vec<Entry>,
}

impl Journal {
    /// Where the journal of `server` lives in `state_dir`.
    pub fn path(state_dir: &Path, server: &str) -> PathBuf {
        state_dir.join(format!("{server}.journal.json"))
    }

    /// Reads the journal at `path`; a missing file is an empty journal.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let content = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice::<Content>(&bytes).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Content::default(),
            Err(e) => return Err(e),
        };
        Ok(Journal { path: path.into(), owner_pid: content.owner_pid, entries: content.armed })
    }

    /// An empty journal at `path` owned by this process; nothing is written until a change.
    pub fn new(path: &Path) -> Journal {
        Journal { path: path.into(), owner_pid: std::process::id(), entries: Vec::new() }
    }

    pub fn path_of(&self) -> &Path {
        &self.path
    }

    /// The process that last wrote the file (0 when there was none).
    pub fn owner_pid(&self) -> u32 {
        self.owner_pid
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Records `entry` durably (replacing the same backup and key); on failure nothing changes.
    pub fn arm(&mut self, entry: Entry) -> io::Result<()> {
        let before = self.entries.clone();
        self.entries.retain(|e| !(e.backup == entry.backup && e.key == entry.key));
        self.entries.push(entry);
        self.save_or(before)
    }

    /// Drops one entry durably.
    pub fn disarm(&mut self, backup: &str, key: &str) -> io::Result<()> {
        let before = self.entries.clone();
        self.entries.retain(|e| !(e.backup == backup && e.key == key));
        self.save_or(before)
    }

    /// Drops every entry of `backup` durably (it is thawed).
    pub fn release(&mut self, backup: &str) -> io::Result<()> {
        if !self.entries.iter().any(|e| e.backup == backup) {
            return Ok(());
        }
        let before = self.entries.clone();
        self.entries.retain(|e| e.backup != backup);
        self.save_or(before)
    }

    /// Drops every entry, durably.
    pub fn clear(&mut self) -> io::Result<()> {
        let before = std::mem::take(&mut self.entries);
        self.save_or(before)
    }

    /// Removes `backup` from the file at `path` (the guardian, after thawing it).
    pub fn forget(path: &Path, backup: &str) -> io::Result<()> {
        let mut journal = Journal::open(path)?;
        journal.release(backup)
    }

    fn save_or(&mut self, before: Vec<Entry>) -> io::Result<()> {
        let saved = self.save();
        if saved.is_err() {
            self.entries = before;
        }
        saved
    }

    /// Write a temp file, fsync it, rename it over the journal, fsync the directory.
    fn save(&self) -> io::Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("journal");
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let content = Content { owner_pid: self.owner_pid, armed: self.entries.clone() };
        let bytes = serde_json::to_vec_pretty(&content).map_err(io::Error::other)?;
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}

/// True when `pid` is another running stillpoint agent (its comm is cut to 15 bytes).
fn other_agent_alive(pid: u32) -> bool {
    pid != 0
        && pid != std::process::id()
        && std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.starts_with("stillpoint-agen"))
}

/// The running agent that wrote `journal`, if it still runs (then its entries are its own).
pub fn owner_alive(journal: &Journal) -> Option<u32> {
    other_agent_alive(journal.owner_pid).then_some(journal.owner_pid)
}

/// What [`replay`] found and did.
#[derive(Debug, Default)]
pub struct Replayed {
    /// The running agent that owns the journal: nothing was run.
    pub live_owner: Option<u32>,
    /// One line per action that ran (or found nothing left to undo), for the log.
    pub undone: Vec<String>,
    /// One line per action that failed: what may still be frozen or stopped.
    pub failed: Vec<String>,
}

/// Runs every thaw action a previous agent journalled at `path` (newest backup first, actions
/// in reverse order), logs each, and returns the journal emptied and owned by this process.
/// A journal whose writer still runs is not ours to replay: it is left alone, with a warning.
pub fn recover(path: &Path) -> io::Result<Journal> {
    replay(path).map(|(journal, _)| journal)
}

/// [`recover`], also saying what it did: `stillpoint-agent replay-journal` prints it.
pub fn replay(path: &Path) -> io::Result<(Journal, Replayed)> {
    let found = Journal::open(path)?;
    let mut replayed = Replayed::default();
    if found.entries.is_empty() {
        return Ok((Journal::new(path), replayed));
    }
    if other_agent_alive(found.owner_pid) {
        warn!(
            journal = %path.display(),
            owner = found.owner_pid,
            "journal belongs to a running agent; not replaying it (give each agent its own state_dir)"
        );
        replayed.live_owner = Some(found.owner_pid);
        return Ok((Journal::new(path), replayed));
    }
    let mut backups: Vec<&str> = Vec::new();
    for e in &found.entries {
        if !backups.contains(&e.backup.as_str()) {
            backups.push(&e.backup);
        }
    }
    for backup in backups.iter().rev() {
        for e in found.entries.iter().rev().filter(|e| e.backup == *backup) {
            match (&e.action, e.action.undo(&e.key)) {
                (Action::Fithaw { mount }, Ok(undone)) if undone == e.action.done(&e.key) => {
                    let line =
                        format!("recovered frozen mount {} of backup {backup}", mount.display());
                    warn!("{line}");
                    replayed.undone.push(line);
                }
                (_, Ok(undone)) => {
                    let line = format!("{undone} for backup {backup}");
                    warn!("{line}");
                    replayed.undone.push(line);
                }
                (_, Err(err)) => {
                    let line = format!(
                        "recovery: could not undo quiescer {} of backup {backup}: {err:#}",
                        e.key
                    );
                    error!("{line}");
                    replayed.failed.push(line);
                }
            }
        }
    }
    let mut journal = Journal::new(path);
    journal.entries = found.entries;
    journal.clear()?;
    Ok((journal, replayed))
}

#[cfg(test)]
mod tests;
