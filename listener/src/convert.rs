//! Conversions between the catalog's records and the wire types, at the edge only.

use stillpoint_proto as pb;

use crate::coordinator::{CommitReply, PrepareReply};
use crate::model::{BackupRecord, Level, LogEntry, SnapshotRef, State, StateName, Step};

pub fn state(name: StateName) -> pb::BackupState {
    match name {
        StateName::Pending => pb::BackupState::Pending,
        StateName::Preparing => pb::BackupState::Preparing,
        StateName::Committing => pb::BackupState::Committing,
        StateName::Snapshotted => pb::BackupState::Snapshotted,
        StateName::Copying => pb::BackupState::Copying,
        StateName::Cleaning => pb::BackupState::Cleaning,
        StateName::Succeeded => pb::BackupState::Succeeded,
        StateName::Failed => pb::BackupState::Failed,
        StateName::Aborted => pb::BackupState::Aborted,
    }
}

pub fn snapshot(s: &SnapshotRef) -> pb::Snapshot {
    pb::Snapshot {
        volume: s.volume.clone(),
        provider: s.provider.clone(),
        locator: s.locator.clone(),
        size_bytes: s.size_bytes,
    }
}

fn snapshot_ref(s: pb::Snapshot) -> SnapshotRef {
    SnapshotRef {
        volume: s.volume,
        provider: s.provider,
        locator: s.locator,
        size_bytes: s.size_bytes,
    }
}

fn step(s: &Step) -> pb::StepReport {
    pb::StepReport {
        name: s.name.clone(),
        action: s.action.clone(),
        ok: s.ok,
        duration_ms: s.duration_ms,
        detail: s.detail.clone(),
    }
}

fn step_from(s: pb::StepReport) -> Step {
    Step { name: s.name, action: s.action, ok: s.ok, duration_ms: s.duration_ms, detail: s.detail }
}

pub fn backup(r: &BackupRecord) -> pb::Backup {
    let (reason, failed_phase) = match &r.state {
        State::Failed { phase, reason } => (reason.clone(), phase.to_string()),
        State::Aborted { reason } => (reason.clone(), String::new()),
        _ => (String::new(), String::new()),
    };
    let servers = r
        .servers
        .iter()
        .map(|s| pb::ServerProgress {
            server: s.server.clone(),
            phase: s.step.as_str(),
            detail: s.detail.clone(),
            snapshots: s.snapshots.iter().map(snapshot).collect(),
            copied_bytes: s.copied_bytes,
            total_bytes: s.total_bytes,
        })
        .collect();
    let cut_servers = r
        .servers
        .iter()
        .map(|s| pb::ServerCut {
            server: s.server.clone(),
            prepare_sent_unix_ms: s.cut.prepare_sent.unwrap_or_default(),
            prepared_unix_ms: s.cut.prepared.unwrap_or_default(),
            commit_sent_unix_ms: s.cut.commit_sent.unwrap_or_default(),
            committed_unix_ms: s.cut.committed.unwrap_or_default(),
            quiesce_ms: s.cut.quiesce_ms,
            freeze_ms: s.cut.freeze_ms,
            held_ms: s.cut.held_ms,
            snapshot_ms: s.cut.snapshot_ms,
            thaw_ms: s.cut.thaw_ms,
            steps: s.cut.steps.iter().map(step).collect(),
        })
        .collect();
    pb::Backup {
        backup_id: r.id.clone(),
        group: r.group.clone(),
        state: state(r.state.name()) as i32,
        reason,
        failed_phase,
        created_unix_ms: r.created,
        finished_unix_ms: r.finished.unwrap_or_default(),
        started_by: r.started_by.clone(),
        servers,
        cut: Some(pb::Cut {
            checked: r.verdict.is_some(),
            consistent: r.verdict.as_ref().is_some_and(|v| v.consistent),
            verdict: r.verdict.as_ref().map(|v| v.text.clone()).unwrap_or_default(),
            servers: cut_servers,
        }),
    }
}

pub fn log_entry(e: &LogEntry) -> pb::LogEntry {
    pb::LogEntry {
        unix_ms: e.at,
        server: e.server.clone().unwrap_or_default(),
        level: match e.level {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
        .into(),
        message: e.message.clone(),
        state: state(e.state) as i32,
    }
}

pub fn prepare_reply(r: pb::PrepareResponse) -> PrepareReply {
    PrepareReply {
        prepared: r.prepared,
        reason: r.reason,
        freeze_token: r.freeze_token,
        quiesce_ms: r.quiesce_ms,
        freeze_ms: r.freeze_ms,
        steps: r.steps.into_iter().map(step_from).collect(),
    }
}

pub fn commit_reply(r: pb::CommitResponse) -> CommitReply {
    CommitReply {
        committed: r.committed,
        reason: r.reason,
        snapshots: r.snapshots.into_iter().map(snapshot_ref).collect(),
        snapshot_ms: r.snapshot_ms,
        thaw_ms: r.thaw_ms,
        held_ms: r.held_ms,
        steps: r.steps.into_iter().map(step_from).collect(),
    }
}

/// An agent's copy result as the listener's copier reports it; a manifest id that is not hex
/// is an error (the agent is broken or not ours).
pub fn copy_done(done: pb::CopyDone) -> Result<crate::copier::ServerCopy, String> {
    let mut volumes = Vec::with_capacity(done.volumes.len());
    for v in done.volumes {
        let id = v
            .manifest_id
            .parse()
            .map_err(|e| format!("volume {}: bad manifest id: {e}", v.volume))?;
        volumes.push((v.volume, id));
    }
    let s = done.stats.unwrap_or_default();
    let stats = stillpoint_saveset::BackupStats {
        size: s.size,
        bytes_read: s.bytes_read,
        hole_chunks: s.hole_chunks,
        reused_chunks: s.reused_chunks,
        new_chunks: s.new_chunks,
        bytes_stored: s.bytes_stored,
        packs: s.packs,
    };
    Ok(crate::copier::ServerCopy { volumes, stats })
}

/// What WaitBackup waits for; an unset or unknown value names the field.
pub fn wait_until(raw: i32) -> crate::Result<crate::wait::Until> {
    use crate::wait::Until;
    match pb::WaitUntil::try_from(raw) {
        Ok(pb::WaitUntil::Snapshotted) => Ok(Until::Snapshotted),
        Ok(pb::WaitUntil::Finished) => Ok(Until::Finished),
        Ok(pb::WaitUntil::Settled) => Ok(Until::Settled),
        Ok(pb::WaitUntil::Unspecified) | Err(_) => Err(crate::Error::InvalidArgument {
            field: "until",
            reason: format!(
                "{raw} is not a condition to wait for: WAIT_UNTIL_SNAPSHOTTED, WAIT_UNTIL_FINISHED or WAIT_UNTIL_SETTLED"
            ),
        }),
    }
}
