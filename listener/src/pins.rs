//! Pins: an operator's mark that retention never forgets a backup. Written to the catalog only
//! (`Store::mark`), with a log line naming who pinned it; the backup's own saves keep it.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::{BackupRecord, Level, LogEntry};
use crate::runtime::Runtime;
use crate::store::Mark;

/// Pins (`on`) or unpins backup `id` for `by`. Repeating it changes nothing and logs nothing.
/// A backup retention already forgot cannot be pinned: its copy is gone.
pub async fn pin(runtime: &Arc<Runtime>, id: &str, on: bool, by: &str) -> Result<BackupRecord> {
    let record = runtime.backup(id)?;
    if let (true, Some(at)) = (on, record.expired) {
        return Err(Error::Precondition(format!(
            "backup {id} was forgotten by retention at {}: what was stored of it is deleted, so a pin cannot keep it; `backupctl log {id}` says why",
            crate::retention::show(at, &jiff::tz::TimeZone::UTC)
        )));
    }
    if record.pinned == on {
        return Ok(record);
    }
    let entry = LogEntry {
        at: runtime.now(),
        server: None,
        level: Level::Info,
        message: if on {
            format!("pinned by {by}: retention never forgets it")
        } else {
            format!("unpinned by {by}: retention decides it by the group's rules")
        },
        state: record.state.name(),
    };
    runtime.store().mark(id, Mark::Pin(on), &[entry]).await?;
    tracing::info!(backup = %id, by = %by, pinned = on, "backup pin changed");
    runtime.backup(id)
}
