//! The catalog's records: a backup, its per-server progress and cut, and its event log. These are
//! what the store persists (as JSON) and what the coordinator mutates; the wire types are made
//! from them in `convert.rs`.

use serde::{Deserialize, Serialize};

/// Milliseconds on the listener's clock: Unix time anchored once at start and advanced by the
/// monotonic clock, so it never steps backwards while the process runs.
pub type Millis = i64;

/// Where a backup is. Variants carry only what is valid in that state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Pending,
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
    /// Every snapshot exists; the copy phase starts next.
    Snapshotted,
    Copying {
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
            State::Pending => StateName::Pending,
            State::Preparing { .. } => StateName::Preparing,
            State::Committing { .. } => StateName::Committing,
            State::Snapshotted => StateName::Snapshotted,
            State::Copying { .. } => StateName::Copying,
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
    CommitFailed,
    Copying,
    Copied,
    CopyFailed,
    Cleaning,
    Cleaned,
    CleanupFailed,
    Aborting,
    Aborted,
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
        }
    }

    pub fn server_mut(&mut self, server: &str) -> Option<&mut ServerRecord> {
        self.servers.iter_mut().find(|s| s.server == server)
    }
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
