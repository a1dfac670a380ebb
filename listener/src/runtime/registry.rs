//! The registry of runs: every backup whose task is alive, with its live record, the sender of
//! its events while it is in flight, and whether it holds its servers' freeze. One std mutex,
//! never held across an await or any IO.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::coordinator::Event;
use crate::model::{BackupRecord, State};

/// What a backup's task receives.
pub enum Envelope {
    /// An event, and where to send the record once it was handled.
    Event(Event, Option<oneshot::Sender<BackupRecord>>),
    /// A helper let go of its `Feed`.
    HelperDone,
}

#[derive(Default)]
pub struct Runs {
    runs: Mutex<HashMap<String, Run>>,
    /// Notified whenever a run lets go of its servers' freeze (or ends).
    pub freed: Notify,
}

struct Run {
    group: String,
    servers: Vec<String>,
    /// `None` once the backup is terminal: its task then only finishes what is under way.
    events: Option<mpsc::UnboundedSender<Envelope>>,
    record: Arc<BackupRecord>,
    /// Between its claim (just before Prepare) and its snapshots (or, if it fails first, its
    /// aborts' answers), the backup holds its servers: no other backup freezes them meanwhile.
    freezing: bool,
}

/// Another backup holds some of the servers mid-freeze.
pub struct Held {
    pub by: String,
    pub servers: Vec<String>,
}

impl Runs {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Run>> {
        // A panic while holding this lock leaves a map that is still whole.
        self.runs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a run; refused (with the backup in flight) when its group already has one.
    pub fn insert(
        &self,
        record: &BackupRecord,
        events: mpsc::UnboundedSender<Envelope>,
    ) -> Result<(), String> {
        let mut runs = self.lock();
        if !record.state.is_terminal() {
            let busy =
                runs.iter().find(|(_, r)| r.group == record.group && !r.record.state.is_terminal());
            if let Some((id, _)) = busy {
                return Err(id.clone());
            }
        }
        let run = Run {
            group: record.group.clone(),
            servers: record.servers.iter().map(|s| s.server.clone()).collect(),
            events: (!record.state.is_terminal()).then_some(events),
            record: Arc::new(record.clone()),
            freezing: false,
        };
        runs.insert(record.id.clone(), run);
        Ok(())
    }

    /// Claims `id`'s servers for its freeze, unless another backup holds some mid-freeze.
    pub fn claim_freeze(&self, id: &str) -> Result<(), Held> {
        let mut runs = self.lock();
        let Some(servers) = runs.get(id).map(|r| r.servers.clone()) else { return Ok(()) };
        for (other, run) in runs.iter() {
            if other == id || !run.freezing {
                continue;
            }
            let shared: Vec<String> =
                servers.iter().filter(|s| run.servers.contains(s)).cloned().collect();
            if !shared.is_empty() {
                return Err(Held { by: other.clone(), servers: shared });
            }
        }
        if let Some(run) = runs.get_mut(id) {
            run.freezing = true;
        }
        Ok(())
    }

    /// The run's record after a change: lets go of the freeze once past it, and of the events
    /// sender once terminal.
    pub fn update(&self, record: &BackupRecord) {
        let mut freed = false;
        {
            let mut runs = self.lock();
            let Some(run) = runs.get_mut(&record.id) else { return };
            run.record = Arc::new(record.clone());
            // A backup that ended before its snapshots may still hold a freeze until its
            // aborts are answered.
            let aborting =
                record.state.is_terminal() && record.settled.is_none() && record.verdict.is_none();
            let holds = aborting
                || matches!(
                    record.state,
                    State::Pending | State::Preparing { .. } | State::Committing { .. }
                );
            if run.freezing && !holds {
                run.freezing = false;
                freed = true;
            }
            if record.state.is_terminal() {
                run.events = None;
            }
        }
        if freed {
            self.freed.notify_waiters();
        }
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
        self.freed.notify_waiters();
    }

    pub fn sender(&self, id: &str) -> Option<mpsc::UnboundedSender<Envelope>> {
        self.lock().get(id).and_then(|r| r.events.clone())
    }

    /// The live record of a backup whose task is alive.
    pub fn record(&self, id: &str) -> Option<Arc<BackupRecord>> {
        self.lock().get(id).map(|r| Arc::clone(&r.record))
    }

    /// Whether `id`'s task is alive (it may still change the backup).
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }
}
