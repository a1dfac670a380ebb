//! WaitBackup: blocks until a backup is where the caller waits for it (snapshotted, finished or
//! settled) or its time is up. It follows the runtime's updates after reading the store, so no
//! change falls between the two; what it returns is always a saved record.

use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tonic::metadata::MetadataMap;

use crate::error::{Error, Result};
use crate::model::{BackupRecord, State};
use crate::runtime::Runtime;

/// The longest one WaitBackup call blocks; the server's handler deadline is set above it.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// What a wait waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Every snapshot exists (SNAPSHOTTED or later), or the backup ended.
    Snapshotted,
    /// The backup is terminal.
    Finished,
    /// Terminal, and every server the backup reached confirmed its end or was given up on.
    Settled,
}

impl Until {
    pub fn holds(self, record: &BackupRecord) -> bool {
        match self {
            Until::Snapshotted => matches!(
                record.state,
                State::Snapshotted { .. }
                    | State::Copying { .. }
                    | State::Sealing { .. }
                    | State::Cleaning { .. }
                    | State::Succeeded
                    | State::Failed { .. }
                    | State::Aborted { .. }
            ),
            Until::Finished => record.state.is_terminal(),
            Until::Settled => settled(record),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Until::Snapshotted => "snapshotted",
            Until::Finished => "finished",
            Until::Settled => "settled",
        }
    }
}

/// Terminal, and every server the backup contacted confirmed its end (its cleanup, or its
/// abort) or was given up on, as the record says (`BackupRecord::settled`; the given up ones are
/// named in the backup's `unconfirmed`).
fn settled(record: &BackupRecord) -> bool {
    record.settled.is_some()
}

/// How long this call may block: `timeout_ms` (0 or above the limit: [`MAX_WAIT`]), ending a
/// little before the caller's own deadline so it gets the backup, not a bare deadline error.
pub fn budget(timeout_ms: u64, metadata: &MetadataMap) -> Duration {
    let asked = match timeout_ms {
        0 => MAX_WAIT,
        ms => Duration::from_millis(ms).min(MAX_WAIT),
    };
    match client_deadline(metadata) {
        // Leave a tenth of the caller's deadline, at most half a second, for the reply.
        Some(deadline) => asked.min(deadline - (deadline / 10).min(Duration::from_millis(500))),
        None => asked,
    }
}

/// The caller's deadline from its `grpc-timeout` header ("100m", "5S", ...), if it sent one.
fn client_deadline(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The backup as soon as `until` holds for it, or [`Error::WaitTimedOut`] with the backup as it
/// is once `budget` has passed.
pub async fn wait(
    runtime: &Runtime,
    id: &str,
    until: Until,
    budget: Duration,
) -> Result<BackupRecord> {
    // Subscribe before reading the store, so no change falls between the two.
    let mut updates = runtime.subscribe();
    let mut record = runtime.store().get(id)?;
    let start = tokio::time::Instant::now();
    let deadline = start + budget;
    let timed_out = |record: BackupRecord| Error::WaitTimedOut {
        record: Box::new(record),
        until: until.name(),
        waited_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    loop {
        if until.holds(&record) {
            return Ok(record);
        }
        match tokio::time::timeout_at(deadline, updates.recv()).await {
            Err(_elapsed) => return Err(timed_out(runtime.store().get(id)?)),
            Ok(Ok(update)) if update.backup_id == id => record = (*update.record).clone(),
            Ok(Ok(_)) => {}
            // Too slow to follow, or the runtime is going away: the store has the truth.
            Ok(Err(RecvError::Lagged(_))) => record = runtime.store().get(id)?,
            Ok(Err(RecvError::Closed)) => {
                let record = runtime.store().get(id)?;
                return if until.holds(&record) { Ok(record) } else { Err(timed_out(record)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        metadata
    }

    #[test]
    fn the_wait_ends_before_the_callers_deadline_and_within_the_limit() {
        let none = MetadataMap::new();
        assert_eq!(budget(0, &none), MAX_WAIT);
        assert_eq!(budget(1_000_000_000, &none), MAX_WAIT);
        assert_eq!(budget(2_000, &none), Duration::from_millis(2_000));
        assert_eq!(budget(0, &with_timeout("10S")), Duration::from_millis(9_500));
        assert_eq!(budget(60_000, &with_timeout("1000m")), Duration::from_millis(900));
        assert_eq!(budget(200, &with_timeout("1M")), Duration::from_millis(200));
        assert_eq!(budget(0, &with_timeout("bogus")), MAX_WAIT);
    }
}
