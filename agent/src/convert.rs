//! The agent's domain values to and from the wire (`stillpoint_proto`): replies, status and
//! snapshots. The machine and the executor never see a proto type but the plug-ins' snapshots.

use stillpoint_proto::{
    AbortResponse, AgentBackup, AgentPhase, CommitResponse, HoldClass, PrepareResponse,
    ReleaseResponse, Snapshot, StepReport,
};
use stillpoint_protocol::agent::{AbortReply, BackupStatus, Phase};
use stillpoint_protocol::coordinator::{CommitReply, PrepareReply, ReleaseReply};
use stillpoint_protocol::hold::Hold;
use stillpoint_protocol::model::{Artifact, SnapshotRef, Step};

pub fn snapshot_ref(s: Snapshot) -> SnapshotRef {
    SnapshotRef {
        volume: s.volume,
        provider: s.provider,
        locator: s.locator,
        size_bytes: s.size_bytes,
    }
}

pub fn snapshot(s: SnapshotRef) -> Snapshot {
    Snapshot {
        volume: s.volume,
        provider: s.provider,
        locator: s.locator,
        size_bytes: s.size_bytes,
    }
}

fn step(s: Step) -> StepReport {
    StepReport {
        name: s.name,
        action: s.action,
        ok: s.ok,
        duration_ms: s.duration_ms,
        detail: s.detail,
    }
}

pub fn prepare_response(r: PrepareReply) -> PrepareResponse {
    PrepareResponse {
        prepared: r.prepared,
        reason: r.reason,
        quiesce_ms: r.quiesce_ms,
        freeze_ms: r.freeze_ms,
        steps: r.steps.into_iter().map(step).collect(),
        freeze_token: r.freeze_token,
        hold: r.hold.map_or(HoldClass::Unspecified, hold_class).into(),
    }
}

pub fn hold_class(h: Hold) -> HoldClass {
    match h {
        Hold::StorageOnly => HoldClass::StorageOnly,
        Hold::HookUnverified => HoldClass::HookUnverified,
        Hold::StoppedProcesses => HoldClass::StoppedProcesses,
        Hold::FilesystemFreeze => HoldClass::FilesystemFreeze,
        Hold::Application => HoldClass::Application,
    }
}

/// A group's required hold from the wire; unspecified (an older listener) requires nothing.
pub fn required_hold(h: HoldClass) -> Hold {
    match h {
        HoldClass::Unspecified | HoldClass::StorageOnly => Hold::StorageOnly,
        HoldClass::HookUnverified => Hold::HookUnverified,
        HoldClass::StoppedProcesses => Hold::StoppedProcesses,
        HoldClass::FilesystemFreeze => Hold::FilesystemFreeze,
        HoldClass::Application => Hold::Application,
    }
}

pub fn release_response(r: ReleaseReply) -> ReleaseResponse {
    ReleaseResponse {
        held_until_release: r.held_until_release,
        reason: r.reason,
        held_ms: r.held_ms,
        thaw_ms: r.thaw_ms,
        steps: r.steps.into_iter().map(step).collect(),
        artifacts: r.artifacts.into_iter().map(artifact).collect(),
        artifacts_refused: r.artifacts_refused,
    }
}

fn artifact(a: Artifact) -> stillpoint_proto::Artifact {
    stillpoint_proto::Artifact { quiescer: a.quiescer, name: a.name, content: a.bytes }
}

pub fn commit_response(r: CommitReply) -> CommitResponse {
    CommitResponse {
        committed: r.committed,
        reason: r.reason,
        snapshots: r.snapshots.into_iter().map(snapshot).collect(),
        snapshot_ms: r.snapshot_ms,
        thaw_ms: r.thaw_ms,
        held_ms: r.held_ms,
        steps: r.steps.into_iter().map(step).collect(),
        still_held: r.still_held,
        artifacts: r.artifacts.into_iter().map(artifact).collect(),
    }
}

pub fn abort_response(r: AbortReply) -> AbortResponse {
    AbortResponse { thawed: r.thawed, snapshots_deleted: r.snapshots_deleted }
}

pub fn agent_backup(b: BackupStatus) -> AgentBackup {
    AgentBackup {
        backup_id: b.backup.to_string(),
        phase: agent_phase(b.phase) as i32,
        lease_remaining_ms: b.lease_remaining_ms,
        snapshots: b.snapshots.into_iter().map(snapshot).collect(),
        detail: b.detail,
    }
}

pub fn agent_phase(p: Phase) -> AgentPhase {
    match p {
        Phase::Preparing => AgentPhase::Preparing,
        Phase::Frozen => AgentPhase::Frozen,
        Phase::Snapshotted => AgentPhase::Snapshotted,
        Phase::ThawedExpired => AgentPhase::ThawedExpired,
        Phase::Aborted => AgentPhase::Aborted,
        Phase::Failed => AgentPhase::Failed,
        Phase::Cleaned => AgentPhase::Cleaned,
        Phase::Orphan => AgentPhase::Orphan,
        Phase::Held => AgentPhase::Held,
    }
}
