//! The records the coordinator works on: a backup, its per-server progress and cut, and its
//! event log. The listener's store keeps its own versioned copy of them (so changing these is
//! not a data migration) and the wire types are made from them at the gRPC edge.

use serde::{Deserialize, Serialize};

use crate::hold::Hold;

/// Milliseconds on the listener's clock: Unix time anchored once at start and advanced by the
/// monotonic clock, so it never steps backwards while the process runs.
pub type Millis = i64;

/// Where a backup is. Variants carry only what is valid in that state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Pending,
    /// The group requires a hold: every server was asked what holds its writes, before any
    /// Prepare; answers are due by `deadline`. Shown as PENDING: nothing is frozen yet.
    Inspecting {
        deadline: Millis,
    },
    /// Prepare went out at `sent_at`; Commit may be sent only before `cutoff_at`.
    Preparing {
        sent_at: Millis,
        cutoff_at: Millis,
    },
    /// Commit went out; every agent must answer before `deadline`.
    Committing {
        sent_at: Millis,
        deadline: Millis,
    },
    /// Every snapshot exists and every server is still frozen (the thaw barrier): Release
    /// went out; answers are due by `deadline`. Shown as SNAPSHOTTED.
    Releasing {
        deadline: Millis,
    },
    /// Every snapshot exists and every server was asked to copy; no copy has reported yet (in
    /// report mode: the backup software has not reported). Copies must end by `deadline`.
    Snapshotted {
        deadline: Millis,
    },
    Copying {
        deadline: Millis,
    },
    /// Every server copied; the copier seals the backup (saveset: the backup manifest with the
    /// cut, then a verify of that backup) by the copy `deadline`. Shown as COPYING.
    Sealing {
        deadline: Millis,
    },
    Cleaning {
        deadline: Millis,
    },
    Succeeded,
    Failed {
        phase: StateName,
        reason: String,
    },
    Aborted {
        reason: String,
    },
}

/// A state's name without its data, as shown to people and stored with log entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StateName {
    Pending,
    Preparing,
    Committing,
    Snapshotted,
    Copying,
    Cleaning,
    Succeeded,
    Failed,
    Aborted,
}

impl State {
    pub fn name(&self) -> StateName {
        match self {
            State::Pending | State::Inspecting { .. } => StateName::Pending,
            State::Preparing { .. } => StateName::Preparing,
            State::Committing { .. } => StateName::Committing,
            State::Snapshotted { .. } => StateName::Snapshotted,
            State::Copying { .. } | State::Sealing { .. } => StateName::Copying,
            State::Releasing { .. } => StateName::Snapshotted,
            State::Cleaning { .. } => StateName::Cleaning,
            State::Succeeded => StateName::Succeeded,
            State::Failed { .. } => StateName::Failed,
            State::Aborted { .. } => StateName::Aborted,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, State::Succeeded | State::Failed { .. } | State::Aborted { .. })
    }
}

impl std::fmt::Display for StateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// One server's step in the backup, at finer grain than the backup's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerStep {
    Waiting,
    Preparing,
    Frozen,
    PrepareFailed,
    Committing,
    Snapshotted,
    /// Release (the thaw barrier's end) was sent; back to `Snapshotted` once it answered.
    Releasing,
    CommitFailed,
    Copying,
    Copied,
    CopyFailed,
    Cleaning,
    Cleaned,
    CleanupFailed,
    Aborting,
    Aborted,
    /// The abort was never confirmed: the listener gave up asking (see the server's `end`).
    AbortFailed,
}

impl ServerStep {
    pub fn as_str(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// A snapshot as an agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub volume: String,
    pub provider: String,
    pub locator: String,
    pub size_bytes: u64,
}

/// A small file a quiescer produced for its backup that a restore needs beside the volumes
/// (PostgreSQL's backup label and tablespace map, MariaDB's binary log position): it travels
/// with the server's snapshots to the catalog and the repository.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Artifact {
    /// The quiescer that made it.
    pub quiescer: String,
    /// A file name (no directories), e.g. `backup_label`.
    pub name: String,
    pub bytes: Vec<u8>,
}

/// At most this many bytes per artifact: a label or a log position, not data.
pub const MAX_ARTIFACT_BYTES: usize = 64 * 1024;
/// At most this many artifacts per server and backup.
pub const MAX_ARTIFACTS: usize = 16;

impl Artifact {
    /// `quiescer/name (N B)`, as logs and details show it.
    pub fn describe(&self) -> String {
        format!("{}/{} ({} B)", self.quiescer, self.name, self.bytes.len())
    }

    /// Why `name` cannot name an artifact's file (or its quiescer's directory) on restore:
    /// 1 to 128 of `[A-Za-z0-9._-]`, not starting with a dot, so it is never a path.
    pub fn bad_name(name: &str) -> Option<String> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        (!ok).then(|| {
            format!(
                "{} is not a plain file name (1 to 128 of letters, digits, '.', '_', '-'; not starting with '.')",
                crate::text::clip(name, 64)
            )
        })
    }
}

/// Checks one quiescer's artifacts against what the server already has: plain names, no name
/// twice, at most [`MAX_ARTIFACT_BYTES`] each and [`MAX_ARTIFACTS`] in all. The error says
/// which artifact broke which rule.
pub fn check_artifacts(have: &[Artifact], new: &[Artifact]) -> Result<(), String> {
    for (i, a) in new.iter().enumerate() {
        for (what, name) in [("quiescer", &a.quiescer), ("artifact", &a.name)] {
            if let Some(why) = Artifact::bad_name(name) {
                return Err(format!("{what} {why}"));
            }
        }
        if a.bytes.len() > MAX_ARTIFACT_BYTES {
            // No size: a plug-in may read no more of a larger file than shows it is too large.
            return Err(format!(
                "artifact {} is over the limit of {MAX_ARTIFACT_BYTES} bytes per artifact",
                a.name
            ));
        }
        let seen = have.iter().chain(&new[..i]);
        if seen.into_iter().any(|b| b.quiescer == a.quiescer && b.name == a.name) {
            return Err(format!("artifact {} is handed over twice", a.name));
        }
    }
    if have.len() + new.len() > MAX_ARTIFACTS {
        return Err(format!(
            "{} artifacts in all, over the limit of {MAX_ARTIFACTS} per server",
            have.len() + new.len()
        ));
    }
    Ok(())
}

/// What one quiescer or provider step reported.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub action: String,
    pub ok: bool,
    pub duration_ms: u64,
    pub detail: String,
}

/// One server's part of the cut: listener-clock instants and the agent's own durations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ServerCut {
    pub prepare_sent: Option<Millis>,
    pub prepared: Option<Millis>,
    pub commit_sent: Option<Millis>,
    pub committed: Option<Millis>,
    pub quiesce_ms: u64,
    pub freeze_ms: u64,
    pub held_ms: u64,
    pub snapshot_ms: u64,
    pub thaw_ms: u64,
    pub steps: Vec<Step>,
    /// What held this server's writes, from its prepared reply. `None`: unknown (the agent
    /// did not say, or the record is older than hold classes); never assumed.
    #[serde(default)]
    pub hold: Option<Hold>,
    /// With the thaw barrier: the agent confirmed it was still frozen when Release came.
    /// `None` without the barrier, or while no answer came (then nobody knows).
    #[serde(default)]
    pub held_until_release: Option<bool>,
}

impl ServerCut {
    /// True only when stillpoint knows this server's writes stopped while it was frozen, and
    /// no thaw failed: a failed thaw may mean the hold ended at a time not known (a database
    /// connection holding a lock was lost), maybe before the snapshot.
    pub fn writes_held(&self) -> bool {
        self.hold.is_some_and(Hold::holds_writes) && self.failed_thaw().is_none()
    }

    /// The first of this server's thaw steps that failed.
    pub fn failed_thaw(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.action == "thaw" && !s.ok)
    }

    /// The hold in words, for logs and details: `filesystem-freeze (the filesystem was
    /// frozen by the kernel)`, or that it is unknown; and a failed thaw, which makes it not
    /// known to have lasted.
    pub fn hold_text(&self) -> String {
        let hold = match self.hold {
            Some(h) => format!("{h}: {}", h.explain()),
            None => "hold unknown: the agent did not say what held its writes".into(),
        };
        match self.failed_thaw() {
            Some(t) => format!(
                "{hold}; but the thaw of {} failed ({}), so whether the hold lasted until the snapshot is not known",
                t.name, t.detail
            ),
            None => hold,
        }
    }

    /// "writes held Nms" only where the hold holds writes; otherwise how long it was frozen
    /// and that its writes were not known to be held, with why.
    pub fn held_text(&self, held_ms: u64) -> String {
        if self.writes_held() {
            format!("writes held {held_ms}ms")
        } else {
            format!("frozen for {held_ms}ms; writes not known to be held ({})", self.hold_text())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServerRecord {
    pub server: String,
    pub step: ServerStep,
    pub detail: String,
    pub snapshots: Vec<SnapshotRef>,
    pub cut: ServerCut,
    pub copied_bytes: u64,
    pub total_bytes: u64,
    /// Abort was sent to this server (so a late prepared reply needs no second one).
    pub abort_sent: bool,
    /// The agent's name for its freeze, from the prepared reply; Commit carries it back.
    #[serde(default)]
    pub freeze_token: String,
    /// What this server's copy stored that the seal names (saveset: its volume manifests).
    #[serde(default)]
    pub stored: Vec<String>,
    /// How this server's part ended, once it has: `None` while the listener still expects its
    /// agent to confirm a cleanup or an abort (or the server was never contacted).
    #[serde(default)]
    pub end: Option<ServerEnd>,
    /// What its quiescers handed over for a restore, from the reply that ended its part
    /// (Commit, or Release under the thaw barrier).
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
}

/// How one server's part of a backup ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerEnd {
    /// The agent confirmed it holds nothing more of this backup; what it said.
    Confirmed(String),
    /// The listener stopped asking; why. What the agent still holds is not known: the sweep
    /// deletes it once the agent is reachable.
    GaveUp(String),
    /// The listener that ran this backup did not record how it ended (an earlier version).
    NotRecorded,
}

impl ServerRecord {
    pub fn new(server: &str) -> Self {
        ServerRecord {
            server: server.to_string(),
            step: ServerStep::Waiting,
            detail: String::new(),
            snapshots: Vec::new(),
            cut: ServerCut::default(),
            copied_bytes: 0,
            total_bytes: 0,
            abort_sent: false,
            freeze_token: String::new(),
            stored: Vec::new(),
            end: None,
            artifacts: Vec::new(),
        }
    }
}

/// The stored verdict on whether every server was frozen at one common instant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CutVerdict {
    pub consistent: bool,
    pub text: String,
}

/// A backup as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackupRecord {
    pub id: String,
    pub group: String,
    pub state: State,
    pub created: Millis,
    pub finished: Option<Millis>,
    pub started_by: String,
    pub servers: Vec<ServerRecord>,
    pub verdict: Option<CutVerdict>,
    /// Why the cut will never be judged (the backup ended before every snapshot existed).
    #[serde(default)]
    pub never_judged: Option<String>,
    /// When the backup settled: it is terminal and every server it contacted confirmed its end
    /// or was given up on, so nothing more will happen to it.
    #[serde(default)]
    pub settled: Option<Millis>,
    /// The weakest hold the group accepts; storage-only is no requirement.
    #[serde(default)]
    pub require_hold: Hold,
    /// The group's thaw barrier: no server thaws before every snapshot exists.
    #[serde(default)]
    pub thaw_barrier: bool,
    /// Pinned by an operator: retention never forgets it. The catalog writes it only on a pin
    /// or unpin, never from the coordinator's saves.
    #[serde(default)]
    pub pinned: bool,
    /// When retention forgot the backup (its stored copy deleted); the record stays as history.
    #[serde(default)]
    pub expired: Option<Millis>,
}

impl BackupRecord {
    pub fn new(id: &str, group: &str, servers: &[String], started_by: &str, now: Millis) -> Self {
        BackupRecord {
            id: id.to_string(),
            group: group.to_string(),
            state: State::Pending,
            created: now,
            finished: None,
            started_by: started_by.to_string(),
            servers: servers.iter().map(|s| ServerRecord::new(s)).collect(),
            verdict: None,
            require_hold: Hold::StorageOnly,
            thaw_barrier: false,
            never_judged: None,
            settled: None,
            pinned: false,
            expired: None,
        }
    }

    /// Terminal, and every server it contacted confirmed its end or was given up on.
    pub fn is_settled(&self) -> bool {
        self.state.is_terminal()
            && self.servers.iter().all(|s| s.cut.prepare_sent.is_none() || s.end.is_some())
    }

    /// The servers given up on or whose end was not recorded, each with why.
    pub fn unconfirmed(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter_map(|s| match &s.end {
                Some(ServerEnd::GaveUp(why)) => Some(format!("{}: {why}", s.server)),
                Some(ServerEnd::NotRecorded) => Some(format!(
                    "{}: not recorded by the listener version that ran this backup",
                    s.server
                )),
                Some(ServerEnd::Confirmed(_)) | None => None,
            })
            .collect()
    }

    /// The cut as a backup manifest stores it.
    pub fn cut(&self) -> CutRecord {
        CutRecord {
            backup: self.id.clone(),
            group: self.group.clone(),
            created: self.created,
            verdict: self.verdict.clone(),
            servers: self
                .servers
                .iter()
                .map(|s| ServerCutRecord {
                    server: s.server.clone(),
                    cut: s.cut.clone(),
                    snapshots: s.snapshots.clone(),
                })
                .collect(),
        }
    }

    pub fn server_mut(&mut self, server: &str) -> Option<&mut ServerRecord> {
        self.servers.iter_mut().find(|s| s.server == server)
    }
}

/// The cut as the backup manifest stores it: the verdict and, per server, the listener-clock
/// instants, the agent's durations and quiescer steps, and the snapshots taken.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CutRecord {
    pub backup: String,
    pub group: String,
    pub created: Millis,
    pub verdict: Option<CutVerdict>,
    pub servers: Vec<ServerCutRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServerCutRecord {
    pub server: String,
    pub cut: ServerCut,
    pub snapshots: Vec<SnapshotRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// One timestamped line of a backup's event log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LogEntry {
    pub at: Millis,
    pub server: Option<String>,
    pub level: Level,
    pub message: String,
    pub state: StateName,
}
