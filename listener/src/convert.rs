//! Conversions between the catalog's records and the wire types, at the edge only.

use stillpoint_proto as pb;

use crate::coordinator::{CommitReply, PrepareReply, ReleaseReply};
use crate::model::{Artifact, BackupRecord, Level, LogEntry, SnapshotRef, State, StateName, Step};
use stillpoint_protocol::hold::Hold;

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
            artifacts: s
                .artifacts
                .iter()
                .map(|a| pb::ArtifactInfo {
                    quiescer: a.quiescer.clone(),
                    name: a.name.clone(),
                    size_bytes: a.bytes.len() as u64,
                })
                .collect(),
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
            hold: s.cut.hold.map_or(pb::HoldClass::Unspecified, hold_class).into(),
            held_until_release: s.cut.held_until_release,
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
            verdict: match (&r.verdict, &r.never_judged) {
                (Some(v), _) => v.text.clone(),
                (None, Some(why)) => why.clone(),
                (None, None) => String::new(),
            },
            servers: cut_servers,
        }),
        settled: r.settled.is_some(),
        unconfirmed: r.unconfirmed(),
        pinned: r.pinned,
        expired_unix_ms: r.expired.unwrap_or_default(),
    }
}

/// A log entry with its store sequence number; on the wire `seq` counts from 1, so 0 can mean
/// "from the start" in `after_seq`.
pub fn log_entry(seq: u64, e: &LogEntry) -> pb::LogEntry {
    pb::LogEntry {
        seq: seq + 1,
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
    let held_by = hold(r.hold());
    PrepareReply {
        prepared: r.prepared,
        reason: r.reason,
        freeze_token: r.freeze_token,
        quiesce_ms: r.quiesce_ms,
        freeze_ms: r.freeze_ms,
        steps: r.steps.into_iter().map(step_from).collect(),
        hold: held_by,
    }
}

/// A hold from the wire; unspecified (an older agent) is unknown, not assumed.
pub fn hold(h: pb::HoldClass) -> Option<Hold> {
    match h {
        pb::HoldClass::Unspecified => None,
        pb::HoldClass::StorageOnly => Some(Hold::StorageOnly),
        pb::HoldClass::HookUnverified => Some(Hold::HookUnverified),
        pb::HoldClass::StoppedProcesses => Some(Hold::StoppedProcesses),
        pb::HoldClass::FilesystemFreeze => Some(Hold::FilesystemFreeze),
        pb::HoldClass::Application => Some(Hold::Application),
    }
}

pub fn hold_class(h: Hold) -> pb::HoldClass {
    match h {
        Hold::StorageOnly => pb::HoldClass::StorageOnly,
        Hold::HookUnverified => pb::HoldClass::HookUnverified,
        Hold::StoppedProcesses => pb::HoldClass::StoppedProcesses,
        Hold::FilesystemFreeze => pb::HoldClass::FilesystemFreeze,
        Hold::Application => pb::HoldClass::Application,
    }
}

pub fn release_reply(r: pb::ReleaseResponse) -> ReleaseReply {
    ReleaseReply {
        held_until_release: r.held_until_release,
        reason: r.reason,
        held_ms: r.held_ms,
        thaw_ms: r.thaw_ms,
        steps: r.steps.into_iter().map(step_from).collect(),
        artifacts: r.artifacts.into_iter().map(artifact_from).collect(),
        artifacts_refused: r.artifacts_refused,
    }
}

fn artifact_from(a: pb::Artifact) -> Artifact {
    Artifact { quiescer: a.quiescer, name: a.name, bytes: a.content }
}

fn artifact(a: &Artifact) -> pb::Artifact {
    pb::Artifact { quiescer: a.quiescer.clone(), name: a.name.clone(), content: a.bytes.clone() }
}

/// A backup's artifacts with their bytes: one server's, or every server's that has any.
pub fn artifacts(
    r: &BackupRecord,
    server: Option<&str>,
) -> crate::Result<pb::GetArtifactsResponse> {
    if let Some(server) = server.filter(|want| !r.servers.iter().any(|s| s.server == *want)) {
        return Err(crate::Error::unknown_server(r, server));
    }
    let servers = r
        .servers
        .iter()
        .filter(|s| server.is_none_or(|want| s.server == want) && !s.artifacts.is_empty())
        .map(|s| pb::ServerArtifacts {
            server: s.server.clone(),
            artifacts: s.artifacts.iter().map(artifact).collect(),
        })
        .collect();
    Ok(pb::GetArtifactsResponse { servers })
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
        still_held: r.still_held,
        artifacts: r.artifacts.into_iter().map(artifact_from).collect(),
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
        bytes_skipped: s.bytes_skipped,
        change_map: s.change_map,
        sampled_chunks: s.sampled_chunks,
        sample_mismatches: s.sample_mismatches,
        metadata_bytes: s.metadata_bytes,
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

/// A ListBackups request as the query it asks for; each bad field is named.
pub fn list_query(r: &pb::ListBackupsRequest) -> crate::Result<crate::pages::Query> {
    use crate::pages::{Filter, Query, DEFAULT_PAGE, MAX_PAGE};
    use crate::Error;
    let group = if r.group.is_empty() {
        None
    } else {
        crate::details::name("group", &r.group)?;
        Some(r.group.clone())
    };
    let mut states = Vec::with_capacity(r.states.len());
    for raw in &r.states {
        states.push(state_name(*raw).ok_or_else(|| Error::InvalidArgument {
            field: "states",
            reason: format!("{raw} is not a backup state (PENDING .. ABORTED)"),
        })?);
    }
    let time = |field: &'static str, t: i64| match t {
        0 => Ok(None),
        t if t < 0 => Err(Error::InvalidArgument {
            field,
            reason: format!("{t} is before 1970; give Unix milliseconds, or 0 for no bound"),
        }),
        t => Ok(Some(t)),
    };
    let filter = Filter {
        group,
        states,
        created_from: time("created_after_unix_ms", r.created_after_unix_ms)?,
        created_before: time("created_before_unix_ms", r.created_before_unix_ms)?,
    };
    if let (Some(from), Some(before)) = (filter.created_from, filter.created_before) {
        if from >= before {
            return Err(Error::InvalidArgument {
                field: "created_before_unix_ms",
                reason: format!(
                    "{before} is not after created_after_unix_ms {from}: nothing could match"
                ),
            });
        }
    }
    let asked = if r.page_size > 0 { r.page_size } else { r.limit };
    let page_size = match usize::try_from(asked).unwrap_or(MAX_PAGE) {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let after = match r.page_token.as_str() {
        "" => None,
        token => Some(crate::pages::parse_token(token, &filter)?),
    };
    Ok(Query { filter, page_size, after })
}

/// A wire state as the record's state name; `None` for UNSPECIFIED or a value we do not know.
fn state_name(raw: i32) -> Option<StateName> {
    Some(match pb::BackupState::try_from(raw).ok()? {
        pb::BackupState::Unspecified => return None,
        pb::BackupState::Pending => StateName::Pending,
        pb::BackupState::Preparing => StateName::Preparing,
        pb::BackupState::Committing => StateName::Committing,
        pb::BackupState::Snapshotted => StateName::Snapshotted,
        pb::BackupState::Copying => StateName::Copying,
        pb::BackupState::Cleaning => StateName::Cleaning,
        pb::BackupState::Succeeded => StateName::Succeeded,
        pb::BackupState::Failed => StateName::Failed,
        pb::BackupState::Aborted => StateName::Aborted,
    })
}

/// A schedule as `ListSchedules` shows it.
pub fn schedule(v: &crate::schedule::View) -> pb::Schedule {
    use crate::schedule::Outcome;
    pb::Schedule {
        name: v.name.clone(),
        group: v.group.clone(),
        cron: v.cron.clone(),
        next_unix_ms: v.next.unwrap_or(0),
        suspended: v.suspended,
        last: v.last.as_ref().map(|last| {
            let (outcome, backup_id, missed) = match &last.outcome {
                Outcome::Started { backup } => ("started", backup.clone(), 0),
                Outcome::SkippedBusy { by } => ("skipped-busy", by.clone(), 0),
                Outcome::Failed { .. } => ("failed", String::new(), 0),
                Outcome::Missed { count, .. } => ("missed", String::new(), *count),
            };
            pb::ScheduleRun {
                due_unix_ms: last.due,
                at_unix_ms: last.at,
                outcome: outcome.into(),
                backup_id,
                text: last.outcome.text(),
                missed,
            }
        }),
    }
}

/// A retention run as ApplyRetention answers it.
pub fn retention(outcome: &crate::forget::Outcome) -> pb::ApplyRetentionResponse {
    pb::ApplyRetentionResponse {
        decisions: outcome
            .backups
            .iter()
            .map(|a| pb::RetentionDecision {
                backup_id: a.record.id.clone(),
                state: state(a.record.state.name()) as i32,
                created_unix_ms: a.record.created,
                keep: a.decision.keep(),
                reasons: a.decision.reasons.iter().map(ToString::to_string).collect(),
                dropped: a.decision.dropped.clone(),
                forgotten: a.forgotten,
                error: a.error.clone().unwrap_or_default(),
            })
            .collect(),
        forgets: outcome.forgets.clone(),
    }
}
