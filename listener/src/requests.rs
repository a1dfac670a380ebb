//! Idempotency for backup software that retries. A StartBackup carrying a request id returns the
//! backup the first Start with that id made (the mapping is saved with the backup, so it holds
//! across a restart); a repeated copy report or abort returns the backup unchanged, and one that
//! contradicts what came first is refused, naming it. Decisions only: the runtime and the store
//! do the work.

use serde::{Deserialize, Serialize};

use crate::config::{Config, CopyConfig};
use crate::coordinator::{Coordinator, CopyDone, Event};
use crate::error::{Error, Result};
use crate::model::{BackupRecord, Millis, ServerStep, State};
use crate::runtime::Runtime;
use crate::store::Store;

/// A client-chosen id for one StartBackup (a UUID, say): 1-128 letters, digits, '.', '_' or
/// '-', not starting with '.'.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// `None` for an empty id: the caller asked for no idempotency.
    pub fn parse(raw: &str) -> Result<Option<RequestId>> {
        if raw.is_empty() {
            return Ok(None);
        }
        stillpoint_core::validate_name("request_id", raw).map_err(|_| Error::InvalidArgument {
            field: "request_id",
            reason: format!(
                "{} is not a request id: use 1-128 letters, digits, '.', '_' or '-' (a UUID, say)",
                stillpoint_core::text::clip(raw, crate::details::SHOWN)
            ),
        })?;
        Ok(Some(RequestId(raw.to_string())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The backup an earlier Start with `request_id` made, if one did. The same id for another
/// group is a client bug (two requests under one id), so it is refused rather than guessed at.
pub fn replay(store: &Store, request_id: &RequestId, group: &str) -> Result<Option<BackupRecord>> {
    let Some(id) = store.started_by_request(request_id.as_str())? else { return Ok(None) };
    let record = store.get(&id)?;
    if record.group != group {
        return Err(Error::InvalidArgument {
            field: "request_id",
            reason: format!(
                "{} already started backup {} of group {}; use a new request id to back up group {group}",
                request_id.as_str(),
                record.id,
                record.group
            ),
        });
    }
    Ok(Some(record))
}

/// The first copy report for one server of one backup, kept so a repeat can be recognised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReport {
    pub ok: bool,
    /// The caller's identity, e.g. `hook:netbackup`.
    pub by: String,
    pub at: Millis,
    pub detail: String,
}

impl CopyReport {
    fn verdict(ok: bool) -> &'static str {
        if ok {
            "copied"
        } else {
            "failed"
        }
    }
}

/// Takes copy reports one at a time, so a report and its repeat cannot both pass as the first.
#[derive(Default)]
pub struct Reports {
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reports {
    /// Feeds the first report for a copying server to its backup; a repeat (same `ok`) returns
    /// the backup unchanged; a contradiction, or a report for a server that is not copying, is
    /// refused and changes nothing.
    pub async fn report(
        &self,
        runtime: &Runtime,
        backup_id: &str,
        server: &str,
        ok: bool,
        by: &str,
        detail: &str,
    ) -> Result<BackupRecord> {
        let _turn = self.one_at_a_time.lock().await;
        let store = runtime.store();
        let record = store.get(backup_id)?;
        let Some(current) = record.servers.iter().find(|s| s.server == server) else {
            return Err(Error::unknown_server(&record, server));
        };
        if let Some(first) = store.copy_report(backup_id, server)? {
            if first.ok == ok {
                return Ok(record);
            }
            return Err(Error::Precondition(format!(
                "backup {backup_id} server {server}: its copy was already reported {} by {} (at {} ms since the epoch); a report cannot be taken back, nothing was changed",
                CopyReport::verdict(first.ok),
                first.by,
                first.at
            )));
        }
        if current.step != ServerStep::Copying {
            return Err(Error::Precondition(format!(
                "backup {backup_id} server {server} is {} (backup {}), not copying; nothing was changed",
                current.step.as_str(),
                record.state.name()
            )));
        }
        let report = CopyReport {
            ok,
            by: by.to_string(),
            at: runtime.clock().now(),
            detail: detail.to_string(),
        };
        store.save_copy_report(backup_id, server, &report).await?;
        let text = if detail.is_empty() {
            format!("reported by {by}")
        } else {
            format!("reported by {by}: {detail}")
        };
        let result = if ok { Ok(CopyDone::said(text)) } else { Err(text) };
        runtime.send(backup_id, Event::Copied { server: server.to_string(), result }).await
    }
}

/// The coordinator for a backup: when the backup software copies (report mode), a copy it says
/// nothing about for `timeouts.report_silence_ms` fails.
pub fn coordinator(config: &Config, record: BackupRecord) -> Coordinator {
    let coordinator = Coordinator::new(record, config.timeouts.protocol());
    match config.copy {
        CopyConfig::Report => coordinator.with_report_silence(config.timeouts.report_silence_ms),
        CopyConfig::Command { .. } | CopyConfig::Saveset(_) | CopyConfig::Image { .. } => {
            coordinator
        }
    }
}

/// Takes the backup software's progress on one server's copy (a heartbeat when both figures are
/// 0). Progress for a copy already reported done or failed (a late heartbeat) returns the
/// backup unchanged; for a server that is not copying it is refused.
pub async fn progress(
    runtime: &Runtime,
    backup_id: &str,
    server: &str,
    done: u64,
    total: u64,
) -> Result<BackupRecord> {
    let record = runtime.store().get(backup_id)?;
    let Some(current) = record.servers.iter().find(|s| s.server == server) else {
        return Err(Error::unknown_server(&record, server));
    };
    if runtime.store().copy_report(backup_id, server)?.is_some() {
        return Ok(record);
    }
    if current.step != ServerStep::Copying {
        return Err(Error::Precondition(format!(
            "backup {backup_id} server {server} is {} (backup {}), not copying; nothing was changed",
            current.step.as_str(),
            record.state.name()
        )));
    }
    if done > total {
        return Err(Error::InvalidArgument {
            field: "done_bytes",
            reason: format!("{done} is more than total_bytes {total}"),
        });
    }
    let event = if (done, total) == (0, 0) {
        Event::CopyHeartbeat { server: server.to_string() }
    } else {
        Event::CopyProgress { server: server.to_string(), done, total }
    };
    runtime.send(backup_id, event).await
}

/// Aborts a backup. Aborting one that is already ABORTED returns it unchanged; one that ended
/// otherwise (SUCCEEDED, FAILED) is refused: the abort did not happen, and saying OK would claim
/// it had.
pub async fn abort(
    runtime: &Runtime,
    backup_id: &str,
    by: String,
    reason: String,
) -> Result<BackupRecord> {
    let record = runtime.send(backup_id, Event::AbortRequested { by, reason }).await?;
    match &record.state {
        State::Succeeded | State::Failed { .. } => Err(Error::Precondition(format!(
            "backup {backup_id} already ended {}; nothing to abort",
            record.state.name()
        ))),
        _ => Ok(record),
    }
}
