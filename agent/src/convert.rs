//! The agent's domain values to and from the wire (`stillpoint_proto`): replies, status and
//! snapshots. The machine and the executor never see a proto type but the plug-ins' snapshots.

use stillpoint_proto::{
    AbortResponse, AgentBackup, AgentPhase, CommitResponse, PrepareResponse, Snapshot, StepReport,
};
use stillpoint_protocol::agent::{AbortReply, BackupStatus, Phase};
use stillpoint_protocol::coordinator::{CommitReply, PrepareReply};
use stillpoint_protocol::model::{SnapshotRef, Step};

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
    }
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
    }
}
