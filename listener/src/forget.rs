//! Applying retention: reads a group's backups from the catalog, asks the pure
//! `retention::decide`, and forgets what it drops: deletes what this listener stored of it (the
//! saveset manifests, or the IDR image directory), then marks its record expired with a log line
//! naming why. Freeing the packs is a prune's job, not this one's. Runs after each backup of a
//! group with `[group.retention]` ends, and on demand (`ApplyRetention`).

use std::path::PathBuf;
use std::sync::Arc;

use crate::copier::Copier;
use crate::error::{Error, Result};
use crate::model::{BackupRecord, Level, LogEntry};
use crate::retention::{self, Backup, Decision};
use crate::runtime::Runtime;
use crate::store::{Mark, Store};

/// One backup's decision and what applying it did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub decision: Decision,
    pub record: BackupRecord,
    /// Dropped and forgotten by this run.
    pub forgotten: bool,
    /// Dropped but not forgotten: why (the next run tries again).
    pub error: Option<String>,
}

/// The outcome of a run: every backup of the group not forgotten before, newest first, and
/// what forgetting deletes in this copy mode.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub backups: Vec<Applied>,
    pub forgets: String,
}

/// `record` with the pin and expiry the catalog holds (a live backup's task never writes them).
pub fn with_marks(store: &Store, mut record: BackupRecord) -> BackupRecord {
    if let Ok(stored) = store.get(&record.id) {
        record.pinned = stored.pinned;
        record.expired = stored.expired;
    }
    record
}

/// After a backup of `group` ended: applies the group's retention, if it has any, in a task of
/// its own (the backup's task is done; nothing waits for this).
pub fn after_backup(runtime: &Arc<Runtime>, group: &str) {
    let has_rules = runtime.config().group(group).is_ok_and(|g| g.retention.is_some());
    if !has_rules {
        return;
    }
    let (runtime, group) = (Arc::clone(runtime), group.to_string());
    let stop = runtime.shutdown_token();
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            applied = apply(&runtime, &group, false, "retention") => match applied {
                Err(e) => tracing::warn!(group = %group, error = %e, "retention after a backup failed; the next backup or `backupctl retention` tries again"),
                Ok(_) => prune(&runtime, &group).await,
            }
        }
    });
}

/// After retention in saveset mode: a prune, so what retention forgot is freed without anyone
/// running `backupctl repo prune` (packs it marks now go at the first prune after the grace).
async fn prune(runtime: &Arc<Runtime>, group: &str) {
    let Some(saveset) = runtime.copier().saveset().cloned() else { return };
    match tokio::task::spawn_blocking(move || saveset.prune()).await {
        Ok(Ok(r)) => tracing::info!(
            group,
            packs_marked = r.packs_marked,
            bytes_marked = r.bytes_marked,
            packs_repacked = r.packs_repacked,
            packs_deleted = r.packs_deleted,
            bytes_freed = r.bytes_freed,
            waiting = r.waiting.len(),
            "prune after retention"
        ),
        Ok(Err(e)) => {
            tracing::warn!(group, error = %e, "prune after retention failed; the next backup's prune or `backupctl repo prune` tries again")
        }
        Err(e) => tracing::warn!(group, error = %e, "prune after retention did not finish"),
    }
}

/// What forgetting a backup deletes in the listener's copy mode.
pub fn forgets(copier: &Copier) -> String {
    match copier {
        Copier::Saveset { .. } | Copier::SavesetOnAgents { .. } => {
            "its backup manifest, then its volume manifests, from the saveset repository (a prune frees the packs)".into()
        }
        Copier::Image { target } => format!("its image directory under {}", target.display()),
        Copier::Report | Copier::Command { .. } => format!(
            "nothing: in copy mode {} the listener stores no copy; the catalog marks it expired and the copies made elsewhere are not touched",
            copier.mode()
        ),
    }
}

/// Decides every backup of `group` by its rules and, unless `dry_run`, forgets the dropped ones.
/// `by` names who asked (an operator, or `retention` after a backup). One run at a time.
pub async fn apply(
    runtime: &Arc<Runtime>,
    group: &str,
    dry_run: bool,
    by: &str,
) -> Result<Outcome> {
    let config = runtime.config().group(group)?;
    let Some(retention) = &config.retention else {
        return Err(Error::Precondition(format!(
            "group {group} has no [group.retention] rules: it keeps every backup; add them to the listener's config to forget old backups"
        )));
    };
    let rules = retention.rules().map_err(|problems| Error::Config {
        path: format!("group {group} retention"),
        problems: problems.join("; "),
    })?;
    let _one_at_a_time = runtime.retention.lock().await;
    let records: Vec<BackupRecord> = runtime
        .store()
        .list()?
        .into_iter()
        .filter(|r| r.group == group && r.expired.is_none())
        .collect();
    let now = runtime.now();
    let backups: Vec<Backup> = records.iter().map(Backup::of).collect();
    let decisions = retention::decide(&backups, &rules, now);
    let forgets = forgets(runtime.copier());
    let mut out = Vec::with_capacity(decisions.len());
    for decision in decisions {
        let record =
            records.iter().find(|r| r.id == decision.id).cloned().expect("decided from these");
        let mut applied = Applied { decision, record, forgotten: false, error: None };
        if !applied.decision.keep() && !dry_run {
            match forget(runtime, &applied).await {
                Ok(record) => {
                    applied.record = record;
                    applied.forgotten = true;
                }
                Err(e) => {
                    tracing::warn!(backup = %applied.record.id, group = %group, error = %e, "retention could not forget a backup; the next run tries again");
                    applied.error = Some(e);
                }
            }
        }
        out.push(applied);
    }
    let kept = out.iter().filter(|a| a.decision.keep()).count();
    let forgotten = out.iter().filter(|a| a.forgotten).count();
    tracing::info!(group = %group, by = %by, dry_run, kept, forgotten, dropped = out.len() - kept, "retention applied");
    Ok(Outcome { backups: out, forgets })
}

/// Deletes what the listener stored of one dropped backup, then marks it expired with a log
/// line saying why and what was deleted. Repeating it after a crash deletes nothing more.
async fn forget(
    runtime: &Arc<Runtime>,
    applied: &Applied,
) -> std::result::Result<BackupRecord, String> {
    let id = applied.record.id.clone();
    let deleted = match runtime.copier() {
        Copier::Saveset { saveset } | Copier::SavesetOnAgents { saveset, .. } => {
            let saveset = Arc::clone(saveset);
            let blocking_id = id.clone();
            let gone = tokio::task::spawn_blocking(move || saveset.forget_backup(&blocking_id))
                .await
                .map_err(|e| format!("saveset forget: {e}"))??;
            let mut said = format!(
                "saveset: deleted {} backup manifest(s) and {} volume manifest(s)",
                gone.backup_manifests.len(),
                gone.volume_manifests.len()
            );
            if !gone.unreadable.is_empty() {
                said.push_str(&format!(
                    "; {} manifest(s) did not decrypt or parse and were left alone (run `backupctl verify`)",
                    gone.unreadable.len()
                ));
            }
            said
        }
        Copier::Image { target } => {
            let dir: PathBuf = target.join(&id);
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => format!("image directory {} deleted", dir.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    format!(
                        "no image directory {} (none was made, or it was deleted)",
                        dir.display()
                    )
                }
                Err(e) => return Err(format!("delete {}: {e}", dir.display())),
            }
        }
        Copier::Report | Copier::Command { .. } => format!(
            "nothing deleted: in copy mode {} the listener stores no copy",
            runtime.copier().mode()
        ),
    };
    let message = format!("forgotten by retention ({}); {deleted}", applied.decision.explain());
    tracing::info!(backup = %id, group = %applied.record.group, why = %applied.decision.explain(), deleted = %deleted, "backup forgotten");
    let now = runtime.now();
    let entry = LogEntry {
        at: now,
        server: None,
        level: Level::Info,
        message,
        state: applied.record.state.name(),
    };
    runtime.store().mark(&id, Mark::Expire(now), &[entry]).await.map_err(|e| e.to_string())
}
