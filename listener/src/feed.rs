//! WatchBackups: the live events of every backup, or of one group's, as the runtime publishes
//! them, each naming its backup. No history (WatchBackup with `after_seq` has that) and no task
//! of its own: the stream is polled by the connection, so a caller that goes away leaves nothing
//! running. It ends with ABORTED when the caller fell so far behind that events were lost, and
//! when the listener shuts down.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use stillpoint_proto as pb;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::Status;

use crate::convert;
use crate::runtime::Update;

pub type Events = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

/// Live events of every backup, or of `group`'s only, until `stopping` turns true.
pub fn events(
    updates: broadcast::Receiver<Arc<Update>>,
    group: Option<String>,
    stopping: watch::Receiver<bool>,
) -> Events {
    struct Feed {
        updates: broadcast::Receiver<Arc<Update>>,
        group: Option<String>,
        stopping: watch::Receiver<bool>,
        ended: bool,
        /// Events of an update that logged several entries, not yet sent.
        queued: VecDeque<pb::WatchEvent>,
    }
    let feed = Feed { updates, group, stopping, ended: false, queued: VecDeque::new() };
    Box::pin(futures::stream::unfold(feed, |mut feed| async move {
        if let Some(event) = feed.queued.pop_front() {
            return Some((Ok(event), feed));
        }
        if feed.ended {
            return None;
        }
        loop {
            let update = tokio::select! {
                update = feed.updates.recv() => update,
                _ = feed.stopping.wait_for(|stop| *stop) => return None,
            };
            let update = match update {
                Ok(update) => update,
                Err(RecvError::Lagged(missed)) => {
                    feed.ended = true;
                    let status = Status::aborted(format!(
                        "this watch fell {missed} events behind and they are gone; watch again, and resume each backup with WatchBackup after the last seq you saw"
                    ));
                    return Some((Err(status), feed));
                }
                Err(RecvError::Closed) => return None,
            };
            if update.ended || feed.group.as_ref().is_some_and(|g| *g != update.record.group) {
                continue;
            }
            // One event per entry, each with the backup as it is after the change.
            let backup = convert::backup(&update.record);
            let event = |entry: Option<&(u64, crate::model::LogEntry)>| pb::WatchEvent {
                entry: entry.map(|(seq, e)| convert::log_entry(*seq, e)),
                backup: Some(backup.clone()),
                backup_id: update.backup_id.clone(),
            };
            if update.entries.is_empty() {
                return Some((Ok(event(None)), feed));
            }
            feed.queued.extend(update.entries.iter().map(|e| event(Some(e))));
            let first = feed.queued.pop_front().map(Ok);
            return first.map(|event| (event, feed));
        }
    }))
}
