//! Watch streams: a backup's log so far, then every change as it happens, until nothing more
//! can happen to it (its task ended). Each stream is one task that ends as soon as its client
//! goes away, not at the backup's next change.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;

use super::Runtime;
use crate::error::Result;
use crate::model::{BackupRecord, LogEntry};

/// One item of a Watch stream: a log entry (with its sequence number) and/or the backup as it
/// is after it.
#[derive(Debug, Clone)]
pub struct Watched {
    pub entry: Option<(u64, LogEntry)>,
    pub record: Option<Arc<BackupRecord>>,
}

/// Counts a Watch task for as long as it lives.
struct Counted(Arc<Runtime>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Streams backup `id`: every log entry from sequence number `from` on, each batch with the
    /// backup as it is after it; ends once the backup's task has ended (it is terminal and every
    /// server it contacted answered), so the last entries are never cut off.
    pub fn watch(self: &Arc<Self>, id: &str, from: u64) -> Result<mpsc::Receiver<Watched>> {
        // Subscribe before reading the store so nothing falls between history and live updates.
        let mut updates = self.updates.subscribe();
        let live = self.runs.contains(id);
        let record = Arc::new(self.backup(id)?);
        let history = self.store.log(id, from)?;
        let (tx, rx) = mpsc::channel(64);
        self.watchers.fetch_add(1, Ordering::Relaxed);
        let counted = Counted(Arc::clone(self));
        let (this, id) = (Arc::clone(self), id.to_string());
        tokio::spawn(async move {
            let _counted = counted;
            let mut next = history.last().map_or(from, |(seq, _)| seq + 1);
            if !send_batch(&tx, history, Some(record)).await || !live {
                return;
            }
            loop {
                let update = tokio::select! {
                    () = tx.closed() => return,
                    () = this.shutdown.cancelled() => return,
                    update = updates.recv() => update,
                };
                let update = match update {
                    Ok(update) => update,
                    Err(RecvError::Lagged(_)) => {
                        // Too slow to follow live: catch up from the store.
                        let ended = !this.runs.contains(&id);
                        let (Ok(record), Ok(missed)) =
                            (this.backup(&id), this.store.log(&id, next))
                        else {
                            return;
                        };
                        if let Some((seq, _)) = missed.last() {
                            next = seq + 1;
                        }
                        if !send_batch(&tx, missed, Some(Arc::new(record))).await || ended {
                            return;
                        }
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                if update.backup_id != id {
                    continue;
                }
                if update.ended {
                    return;
                }
                let fresh: Vec<(u64, LogEntry)> =
                    update.entries.iter().filter(|(seq, _)| *seq >= next).cloned().collect();
                if let Some((seq, _)) = fresh.last() {
                    next = seq + 1;
                } else if !update.entries.is_empty() {
                    continue;
                }
                if !send_batch(&tx, fresh, Some(Arc::clone(&update.record))).await {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

/// Sends `entries`, the record with the last of them (alone if there are none); `false` once
/// the client is gone.
async fn send_batch(
    tx: &mpsc::Sender<Watched>,
    entries: Vec<(u64, LogEntry)>,
    record: Option<Arc<BackupRecord>>,
) -> bool {
    if entries.is_empty() {
        return tx.send(Watched { entry: None, record }).await.is_ok();
    }
    let last = entries.len() - 1;
    for (i, entry) in entries.into_iter().enumerate() {
        let record = if i == last { record.clone() } else { None };
        if tx.send(Watched { entry: Some(entry), record }).await.is_err() {
            return false;
        }
    }
    true
}
