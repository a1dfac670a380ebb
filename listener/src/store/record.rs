//! The catalog's own record of a backup, versioned (`CatalogRecord { version: 1, .. }`), and of
//! a log line, converted by hand from and to the coordinator's `model`, so a change to the
//! coordinator is a change here, never a data migration. Reads the unversioned JSON that earlier
//! listeners wrote (the coordinator's record itself) as version 0; refuses newer versions.
//! Version 2 is written only for a record that holds quiescer artifacts, so a listener that
//! reads up to 1 refuses it (and never rewrites it without them) while every other record stays
//! readable by it. Version 3 likewise only for a record pinned or expired by retention, so an
//! older listener never rewrites it without its pin.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use stillpoint_protocol::hold::Hold;

use crate::model::{
    Artifact, BackupRecord, CutVerdict, Level, LogEntry, Millis, ServerCut, ServerEnd,
    ServerRecord, ServerStep, SnapshotRef, State, StateName, Step,
};

/// The newest version this listener writes and reads.
pub const VERSION: u32 = 3;
/// The version of a record with artifacts but neither pin nor expiry.
const VERSION_WITH_ARTIFACTS: u32 = 2;
/// The version of a record without artifacts.
const VERSION_WITHOUT_ARTIFACTS: u32 = 1;

/// A backup as the catalog stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRecord {
    /// Absent (0) in records written before the catalog kept its own format.
    #[serde(default)]
    pub version: u32,
    pub id: String,
    pub group: String,
    pub state: StoredState,
    pub created: Millis,
    pub finished: Option<Millis>,
    pub started_by: String,
    pub servers: Vec<StoredServer>,
    pub verdict: Option<StoredVerdict>,
    #[serde(default)]
    pub never_judged: Option<String>,
    #[serde(default)]
    pub settled: Option<Millis>,
    /// The group's required hold class by name; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_hold: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub thaw_barrier: bool,
    /// Since version 3: an operator's pin (retention never forgets it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// Since version 3: when retention forgot the backup's stored copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StoredState {
    Pending,
    Inspecting {
        deadline: Millis,
    },
    Releasing {
        deadline: Millis,
    },
    Preparing {
        sent_at: Millis,
        cutoff_at: Millis,
    },
    Committing {
        sent_at: Millis,
        deadline: Millis,
    },
    Snapshotted {
        #[serde(default)]
        deadline: Millis,
    },
    Copying {
        deadline: Millis,
    },
    Sealing {
        deadline: Millis,
    },
    Cleaning {
        deadline: Millis,
    },
    Succeeded,
    Failed {
        phase: StoredPhase,
        reason: String,
    },
    Aborted {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StoredPhase {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoredStep {
    Waiting,
    Preparing,
    Frozen,
    PrepareFailed,
    Committing,
    Snapshotted,
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
    AbortFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredServer {
    pub server: String,
    pub step: StoredStep,
    pub detail: String,
    pub snapshots: Vec<StoredSnapshot>,
    pub cut: StoredCut,
    pub copied_bytes: u64,
    pub total_bytes: u64,
    pub abort_sent: bool,
    #[serde(default)]
    pub freeze_token: String,
    #[serde(default)]
    pub stored: Vec<String>,
    #[serde(default)]
    pub end: Option<StoredEnd>,
    /// Since version 2.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<StoredArtifact>,
}

/// A quiescer's artifact; its bytes in standard base64 (with padding).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredArtifact {
    pub quiescer: String,
    pub name: String,
    pub base64: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoredEnd {
    Confirmed(String),
    GaveUp(String),
    NotRecorded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub volume: String,
    pub provider: String,
    pub locator: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredStepReport {
    pub name: String,
    pub action: String,
    pub ok: bool,
    pub duration_ms: u64,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCut {
    pub prepare_sent: Option<Millis>,
    pub prepared: Option<Millis>,
    pub commit_sent: Option<Millis>,
    pub committed: Option<Millis>,
    pub quiesce_ms: u64,
    pub freeze_ms: u64,
    pub held_ms: u64,
    pub snapshot_ms: u64,
    pub thaw_ms: u64,
    pub steps: Vec<StoredStepReport>,
    /// The hold class's name (`filesystem-freeze`, ...); absent when not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until_release: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVerdict {
    pub consistent: bool,
    pub text: String,
}

/// One log line as the catalog stores it (the same JSON since the first version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEntry {
    pub at: Millis,
    pub server: Option<String>,
    pub level: StoredLevel,
    pub message: String,
    pub state: StoredPhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredLevel {
    Info,
    Warn,
    Error,
}

/// The record's bytes, as this version writes them.
pub fn encode(record: &BackupRecord) -> Result<Vec<u8>, String> {
    serde_json::to_vec(&CatalogRecord::from(record)).map_err(|e| e.to_string())
}

fn artifact_to(a: &Artifact) -> StoredArtifact {
    StoredArtifact {
        quiescer: a.quiescer.clone(),
        name: a.name.clone(),
        base64: BASE64.encode(&a.bytes),
    }
}

fn artifact_from(a: StoredArtifact) -> Result<Artifact, String> {
    let bytes = BASE64.decode(&a.base64).map_err(|e| {
        format!("artifact {}/{}: its bytes are not base64: {e}", a.quiescer, a.name)
    })?;
    Ok(Artifact { quiescer: a.quiescer, name: a.name, bytes })
}

/// A record as any version up to [`VERSION`] wrote it.
pub fn decode(bytes: &[u8]) -> Result<BackupRecord, String> {
    #[derive(Deserialize)]
    struct Version {
        #[serde(default)]
        version: u32,
    }
    let Version { version } = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if version > VERSION {
        return Err(format!(
            "catalog record version {version} is newer than this listener reads (up to {VERSION}); run the listener version that wrote it"
        ));
    }
    let mut stored: CatalogRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut artifacts = Vec::with_capacity(stored.servers.len());
    for s in &mut stored.servers {
        let decoded: Result<Vec<Artifact>, String> =
            std::mem::take(&mut s.artifacts).into_iter().map(artifact_from).collect();
        artifacts.push(decoded.map_err(|e| format!("server {}: {e}", s.server))?);
    }
    let mut record = BackupRecord::from(stored);
    for (s, artifacts) in record.servers.iter_mut().zip(artifacts) {
        s.artifacts = artifacts;
    }
    if version == 0 && record.state.is_terminal() {
        // Earlier listeners did not record how each server's part ended: say so rather than
        // ask every agent again about backups long over.
        for s in &mut record.servers {
            if s.cut.prepare_sent.is_some() && s.end.is_none() {
                s.end = Some(ServerEnd::NotRecorded);
            }
        }
        record.settled = record.finished;
    }
    Ok(record)
}

/// What only an operator or retention changes on a record, never the coordinator's saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Pin(bool),
    Expire(Millis),
}

/// `new` (a record as the coordinator saves it) with the pin and expiry `old` holds, so a save
/// racing a pin never undoes it.
pub fn carry_marks(old: &[u8], new: &[u8]) -> Result<Vec<u8>, String> {
    #[derive(Deserialize)]
    struct Marks {
        #[serde(default)]
        pinned: bool,
        #[serde(default)]
        expired: Option<Millis>,
    }
    let Ok(Marks { pinned, expired }) = serde_json::from_slice(old) else {
        return Ok(new.to_vec());
    };
    if !pinned && expired.is_none() {
        return Ok(new.to_vec());
    }
    let mut record = decode(new)?;
    record.pinned = pinned;
    record.expired = expired;
    encode(&record)
}

/// `old` with `mark` applied.
pub fn apply_mark(old: &[u8], mark: Mark) -> Result<Vec<u8>, String> {
    let mut record = decode(old)?;
    match mark {
        Mark::Pin(on) => record.pinned = on,
        Mark::Expire(at) => record.expired = Some(at),
    }
    encode(&record)
}

pub fn encode_entry(entry: &LogEntry) -> Result<Vec<u8>, String> {
    let stored = StoredEntry {
        at: entry.at,
        server: entry.server.clone(),
        level: match entry.level {
            Level::Info => StoredLevel::Info,
            Level::Warn => StoredLevel::Warn,
            Level::Error => StoredLevel::Error,
        },
        message: entry.message.clone(),
        state: phase_to(entry.state),
    };
    serde_json::to_vec(&stored).map_err(|e| e.to_string())
}

pub fn decode_entry(bytes: &[u8]) -> Result<LogEntry, String> {
    let e: StoredEntry = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(LogEntry {
        at: e.at,
        server: e.server,
        level: match e.level {
            StoredLevel::Info => Level::Info,
            StoredLevel::Warn => Level::Warn,
            StoredLevel::Error => Level::Error,
        },
        message: e.message,
        state: phase_from(e.state),
    })
}

impl From<&BackupRecord> for CatalogRecord {
    fn from(r: &BackupRecord) -> Self {
        let has_artifacts = r.servers.iter().any(|s| !s.artifacts.is_empty());
        CatalogRecord {
            version: if r.pinned || r.expired.is_some() {
                VERSION
            } else if has_artifacts {
                VERSION_WITH_ARTIFACTS
            } else {
                VERSION_WITHOUT_ARTIFACTS
            },
            id: r.id.clone(),
            group: r.group.clone(),
            state: match &r.state {
                State::Pending => StoredState::Pending,
                State::Inspecting { deadline } => StoredState::Inspecting { deadline: *deadline },
                State::Releasing { deadline } => StoredState::Releasing { deadline: *deadline },
                State::Preparing { sent_at, cutoff_at } => {
                    StoredState::Preparing { sent_at: *sent_at, cutoff_at: *cutoff_at }
                }
                State::Committing { sent_at, deadline } => {
                    StoredState::Committing { sent_at: *sent_at, deadline: *deadline }
                }
                State::Snapshotted { deadline } => StoredState::Snapshotted { deadline: *deadline },
                State::Copying { deadline } => StoredState::Copying { deadline: *deadline },
                State::Sealing { deadline } => StoredState::Sealing { deadline: *deadline },
                State::Cleaning { deadline } => StoredState::Cleaning { deadline: *deadline },
                State::Succeeded => StoredState::Succeeded,
                State::Failed { phase, reason } => {
                    StoredState::Failed { phase: phase_to(*phase), reason: reason.clone() }
                }
                State::Aborted { reason } => StoredState::Aborted { reason: reason.clone() },
            },
            created: r.created,
            finished: r.finished,
            started_by: r.started_by.clone(),
            servers: r.servers.iter().map(server_to).collect(),
            verdict: r
                .verdict
                .as_ref()
                .map(|v| StoredVerdict { consistent: v.consistent, text: v.text.clone() }),
            never_judged: r.never_judged.clone(),
            settled: r.settled,
            require_hold: (r.require_hold != Hold::StorageOnly)
                .then(|| r.require_hold.as_str().to_string()),
            thaw_barrier: r.thaw_barrier,
            pinned: r.pinned,
            expired: r.expired,
        }
    }
}

impl From<CatalogRecord> for BackupRecord {
    fn from(r: CatalogRecord) -> Self {
        BackupRecord {
            id: r.id,
            group: r.group,
            state: match r.state {
                StoredState::Pending => State::Pending,
                StoredState::Inspecting { deadline } => State::Inspecting { deadline },
                StoredState::Releasing { deadline } => State::Releasing { deadline },
                StoredState::Preparing { sent_at, cutoff_at } => {
                    State::Preparing { sent_at, cutoff_at }
                }
                StoredState::Committing { sent_at, deadline } => {
                    State::Committing { sent_at, deadline }
                }
                StoredState::Snapshotted { deadline } => State::Snapshotted { deadline },
                StoredState::Copying { deadline } => State::Copying { deadline },
                StoredState::Sealing { deadline } => State::Sealing { deadline },
                StoredState::Cleaning { deadline } => State::Cleaning { deadline },
                StoredState::Succeeded => State::Succeeded,
                StoredState::Failed { phase, reason } => {
                    State::Failed { phase: phase_from(phase), reason }
                }
                StoredState::Aborted { reason } => State::Aborted { reason },
            },
            created: r.created,
            finished: r.finished,
            started_by: r.started_by,
            servers: r.servers.into_iter().map(server_from).collect(),
            verdict: r.verdict.map(|v| CutVerdict { consistent: v.consistent, text: v.text }),
            never_judged: r.never_judged,
            settled: r.settled,
            // A class this listener does not know cannot be required by it: the strongest it
            // knows, so a record never asks for less than it said.
            require_hold: r
                .require_hold
                .as_deref()
                .map_or(Hold::StorageOnly, |h| h.parse().unwrap_or(Hold::Application)),
            thaw_barrier: r.thaw_barrier,
            pinned: r.pinned,
            expired: r.expired,
        }
    }
}

fn server_to(s: &ServerRecord) -> StoredServer {
    StoredServer {
        server: s.server.clone(),
        step: step_to(s.step),
        detail: s.detail.clone(),
        snapshots: s
            .snapshots
            .iter()
            .map(|x| StoredSnapshot {
                volume: x.volume.clone(),
                provider: x.provider.clone(),
                locator: x.locator.clone(),
                size_bytes: x.size_bytes,
            })
            .collect(),
        cut: StoredCut {
            hold: s.cut.hold.map(|h| h.as_str().to_string()),
            held_until_release: s.cut.held_until_release,
            prepare_sent: s.cut.prepare_sent,
            prepared: s.cut.prepared,
            commit_sent: s.cut.commit_sent,
            committed: s.cut.committed,
            quiesce_ms: s.cut.quiesce_ms,
            freeze_ms: s.cut.freeze_ms,
            held_ms: s.cut.held_ms,
            snapshot_ms: s.cut.snapshot_ms,
            thaw_ms: s.cut.thaw_ms,
            steps: s
                .cut
                .steps
                .iter()
                .map(|x| StoredStepReport {
                    name: x.name.clone(),
                    action: x.action.clone(),
                    ok: x.ok,
                    duration_ms: x.duration_ms,
                    detail: x.detail.clone(),
                })
                .collect(),
        },
        copied_bytes: s.copied_bytes,
        total_bytes: s.total_bytes,
        abort_sent: s.abort_sent,
        freeze_token: s.freeze_token.clone(),
        stored: s.stored.clone(),
        artifacts: s.artifacts.iter().map(artifact_to).collect(),
        end: s.end.as_ref().map(|e| match e {
            ServerEnd::Confirmed(what) => StoredEnd::Confirmed(what.clone()),
            ServerEnd::GaveUp(why) => StoredEnd::GaveUp(why.clone()),
            ServerEnd::NotRecorded => StoredEnd::NotRecorded,
        }),
    }
}

fn server_from(s: StoredServer) -> ServerRecord {
    ServerRecord {
        server: s.server,
        step: step_from(s.step),
        detail: s.detail,
        snapshots: s
            .snapshots
            .into_iter()
            .map(|x| SnapshotRef {
                volume: x.volume,
                provider: x.provider,
                locator: x.locator,
                size_bytes: x.size_bytes,
            })
            .collect(),
        cut: ServerCut {
            // A name this listener does not know is not a hold it can vouch for.
            hold: s.cut.hold.as_deref().and_then(|h| h.parse().ok()),
            held_until_release: s.cut.held_until_release,
            prepare_sent: s.cut.prepare_sent,
            prepared: s.cut.prepared,
            commit_sent: s.cut.commit_sent,
            committed: s.cut.committed,
            quiesce_ms: s.cut.quiesce_ms,
            freeze_ms: s.cut.freeze_ms,
            held_ms: s.cut.held_ms,
            snapshot_ms: s.cut.snapshot_ms,
            thaw_ms: s.cut.thaw_ms,
            steps: s
                .cut
                .steps
                .into_iter()
                .map(|x| Step {
                    name: x.name,
                    action: x.action,
                    ok: x.ok,
                    duration_ms: x.duration_ms,
                    detail: x.detail,
                })
                .collect(),
        },
        copied_bytes: s.copied_bytes,
        total_bytes: s.total_bytes,
        abort_sent: s.abort_sent,
        freeze_token: s.freeze_token,
        stored: s.stored,
        // Decoded by `decode`, which can say what is wrong with them.
        artifacts: Vec::new(),
        end: s.end.map(|e| match e {
            StoredEnd::Confirmed(what) => ServerEnd::Confirmed(what),
            StoredEnd::GaveUp(why) => ServerEnd::GaveUp(why),
            StoredEnd::NotRecorded => ServerEnd::NotRecorded,
        }),
    }
}

fn phase_to(p: StateName) -> StoredPhase {
    match p {
        StateName::Pending => StoredPhase::Pending,
        StateName::Preparing => StoredPhase::Preparing,
        StateName::Committing => StoredPhase::Committing,
        StateName::Snapshotted => StoredPhase::Snapshotted,
        StateName::Copying => StoredPhase::Copying,
        StateName::Cleaning => StoredPhase::Cleaning,
        StateName::Succeeded => StoredPhase::Succeeded,
        StateName::Failed => StoredPhase::Failed,
        StateName::Aborted => StoredPhase::Aborted,
    }
}

fn phase_from(p: StoredPhase) -> StateName {
    match p {
        StoredPhase::Pending => StateName::Pending,
        StoredPhase::Preparing => StateName::Preparing,
        StoredPhase::Committing => StateName::Committing,
        StoredPhase::Snapshotted => StateName::Snapshotted,
        StoredPhase::Copying => StateName::Copying,
        StoredPhase::Cleaning => StateName::Cleaning,
        StoredPhase::Succeeded => StateName::Succeeded,
        StoredPhase::Failed => StateName::Failed,
        StoredPhase::Aborted => StateName::Aborted,
    }
}

fn step_to(s: ServerStep) -> StoredStep {
    match s {
        ServerStep::Waiting => StoredStep::Waiting,
        ServerStep::Preparing => StoredStep::Preparing,
        ServerStep::Frozen => StoredStep::Frozen,
        ServerStep::PrepareFailed => StoredStep::PrepareFailed,
        ServerStep::Committing => StoredStep::Committing,
        ServerStep::Snapshotted => StoredStep::Snapshotted,
        ServerStep::Releasing => StoredStep::Releasing,
        ServerStep::CommitFailed => StoredStep::CommitFailed,
        ServerStep::Copying => StoredStep::Copying,
        ServerStep::Copied => StoredStep::Copied,
        ServerStep::CopyFailed => StoredStep::CopyFailed,
        ServerStep::Cleaning => StoredStep::Cleaning,
        ServerStep::Cleaned => StoredStep::Cleaned,
        ServerStep::CleanupFailed => StoredStep::CleanupFailed,
        ServerStep::Aborting => StoredStep::Aborting,
        ServerStep::Aborted => StoredStep::Aborted,
        ServerStep::AbortFailed => StoredStep::AbortFailed,
    }
}

fn step_from(s: StoredStep) -> ServerStep {
    match s {
        StoredStep::Waiting => ServerStep::Waiting,
        StoredStep::Preparing => ServerStep::Preparing,
        StoredStep::Frozen => ServerStep::Frozen,
        StoredStep::PrepareFailed => ServerStep::PrepareFailed,
        StoredStep::Committing => ServerStep::Committing,
        StoredStep::Snapshotted => ServerStep::Snapshotted,
        StoredStep::Releasing => ServerStep::Releasing,
        StoredStep::CommitFailed => ServerStep::CommitFailed,
        StoredStep::Copying => ServerStep::Copying,
        StoredStep::Copied => ServerStep::Copied,
        StoredStep::CopyFailed => ServerStep::CopyFailed,
        StoredStep::Cleaning => ServerStep::Cleaning,
        StoredStep::Cleaned => ServerStep::Cleaned,
        StoredStep::CleanupFailed => ServerStep::CleanupFailed,
        StoredStep::Aborting => ServerStep::Aborting,
        StoredStep::Aborted => ServerStep::Aborted,
        StoredStep::AbortFailed => ServerStep::AbortFailed,
    }
}
