//! Drives coordinators. The runtime is the listener's one owner of backups in flight: it starts
//! them (`start`), routes operators' and the backup software's requests to them (`send`), takes
//! over those a previous process left unfinished (`recover`), serves their live records and
//! Watch streams, and runs the sweep. Its background tasks stop with it (`stop`).
//!
//! Layout: `clock.rs` the listener's clock; `registry.rs` the runs alive; `run.rs` one task per
//! backup (persist, then act); `sweep.rs` the sweep; `watch.rs` Watch streams. Agent RPCs are in
//! `crate::agents`, copies in `crate::copier`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use stillpoint_proto as pb;
use tokio::sync::{broadcast, oneshot};
use tokio_util::sync::CancellationToken;

use crate::agents::Agents;
use crate::config::Config;
use crate::coordinator::Event;
use crate::copier::Copier;
use crate::error::{Error, Result};
use crate::model::{BackupRecord, LogEntry, Millis};
use crate::requests::RequestId;
use crate::store::Store;

mod clock;
mod notify;
mod registry;
mod run;
mod scheduler;
mod sweep;
mod watch;

pub use clock::Clock;
pub use notify::Notifications;
pub use run::{start_wait, Feed, PROGRESS_SAVE_EVERY};
pub use watch::Watched;

/// A change to a backup, as watchers see it.
#[derive(Debug, Clone)]
pub struct Update {
    pub backup_id: String,
    /// The log entries the change added, with their sequence numbers, in order.
    pub entries: Vec<(u64, LogEntry)>,
    /// The backup as it is after the change.
    pub record: Arc<BackupRecord>,
    /// The backup's task ended: nothing more will happen to it (until a restart takes over a
    /// backup it had to leave unfinished).
    pub ended: bool,
}

pub struct Runtime {
    config: Config,
    store: Store,
    clock: Clock,
    agents: Arc<Agents>,
    copier: Copier,
    runs: registry::Runs,
    updates: broadcast::Sender<Arc<Update>>,
    /// Cancelled when the listener stops: every background task of the runtime ends.
    shutdown: CancellationToken,
    /// Watch streams being served (their tasks alive).
    watchers: AtomicUsize,
    sweep: sweep::Sweep,
    /// `[notify]`'s senders and watchdog; `None` without targets.
    notify: Option<Arc<Notifications>>,
    schedules: scheduler::Schedules,
    metrics: crate::metrics::Metrics,
    /// One retention run at a time (`forget.rs`).
    pub(crate) retention: tokio::sync::Mutex<()>,
}

impl Runtime {
    /// Opens the catalog in the data directory and builds the runtime. Blocking (the store, and
    /// in saveset mode unlocking the repository).
    pub fn open(config: Config) -> Result<Arc<Runtime>> {
        // A catalog made by this start is rebuilt from the repository's saved one, if any.
        let file = crate::repo_catalog::catalog_file(&config.data_dir);
        let fresh = !file.exists();
        let store = Store::open(&config.data_dir)?;
        let opened = Runtime::new(config, store).and_then(|rt| {
            if fresh {
                crate::repo_catalog::rebuild_at_start(
                    &rt.store,
                    rt.copier.saveset().map(|s| &**s),
                    &rt.config,
                )?;
            }
            Ok(rt)
        });
        if fresh && opened.is_err() {
            // So the next start rebuilds again, rather than serve an empty catalog.
            let _ = std::fs::remove_file(&file);
        }
        opened
    }

    pub fn new(config: Config, store: Store) -> Result<Arc<Runtime>> {
        let agents = Arc::new(Agents::new(&config)?);
        let copier = Copier::open(&config, Arc::clone(&agents))?;
        let (updates, _) = broadcast::channel(1024);
        let clock = Clock::start();
        let notify = Notifications::open(&config, &store, clock.now())?;
        let schedules = scheduler::Schedules::open(&config, clock.now())?;
        let metrics = crate::metrics::Metrics::new(&config.tls, &store.list()?);
        Ok(Arc::new(Runtime {
            config,
            store,
            clock,
            agents,
            copier,
            runs: registry::Runs::default(),
            updates,
            shutdown: CancellationToken::new(),
            watchers: AtomicUsize::new(0),
            sweep: sweep::Sweep::default(),
            notify,
            schedules,
            metrics,
            retention: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn copier(&self) -> &Copier {
        &self.copier
    }

    /// Cancelled when the listener stops, for tasks started outside the runtime.
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Every change to every backup, as it happens.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Update>> {
        self.updates.subscribe()
    }

    /// Stops every background task: the sweeper, backups' tasks and their helpers, Watch
    /// streams. Backups in flight are left as a crash would leave them, for `recover`.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// A guard that calls [`Runtime::stop`] when dropped.
    pub fn stop_on_drop(&self) -> tokio_util::sync::DropGuard {
        self.shutdown.clone().drop_guard()
    }

    /// How many Watch streams are being served.
    pub fn live_watches(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }

    /// Takes over the backups a previous listener process left unfinished: those before their
    /// snapshots fail and are aborted, those past them go on (`Event::Restarted`), and ended
    /// backups whose servers had not all confirmed are asked again.
    pub fn recover(self: &Arc<Self>) -> Result<usize> {
        let mut n = 0;
        for record in self.store.list()? {
            let unsettled = record.state.is_terminal() && record.settled.is_none();
            if !record.state.is_terminal() || unsettled {
                tracing::warn!(backup = %record.id, state = %record.state.name(), "taking over a backup left unfinished");
                match self.register(&record) {
                    Ok(registered) => self.spawn_run(record, registered, run::Begin::Restarted),
                    Err(other) => {
                        tracing::error!(backup = %record.id, other = %other, "two unfinished backups of one group; this one is left as it is");
                        continue;
                    }
                }
                n += 1;
            }
        }
        Ok(n)
    }

    /// Starts a backup of `group`; returns once Prepare has gone out, or once the backup waits
    /// in PENDING for servers another backup is freezing. A `request_id` an earlier Start used
    /// returns that Start's backup as it is now (`requests::replay`).
    pub async fn start(
        self: &Arc<Self>,
        group: &str,
        started_by: &str,
        request_id: Option<&RequestId>,
    ) -> Result<BackupRecord> {
        let group_config = self.config.group(group)?;
        if let Some(request_id) = request_id {
            if let Some(earlier) = crate::requests::replay(&self.store, request_id, group)? {
                return self.backup(&earlier.id);
            }
        }
        let now = self.clock.now();
        let id = new_backup_id(now);
        let mut record = BackupRecord::new(&id, group, &group_config.servers, started_by, now);
        record.require_hold = group_config.require_hold();
        record.thaw_barrier = group_config.thaw_barrier();
        let registered =
            self.register(&record).map_err(|backup| Error::Busy { group: group.into(), backup })?;
        // Saved before its task exists, so the catalog knows every backup an agent may hold;
        // with the request id, so a retry finds the backup whenever it exists.
        let request_id = request_id.map(RequestId::as_str);
        if let Err(e) = self.store.save_started(&record, request_id).await {
            self.runs.remove(&id);
            return Err(e);
        }
        let (reply, started) = oneshot::channel();
        self.spawn_run(record, registered, run::Begin::Start(reply));
        started.await.map_err(|_| Error::Store {
            path: "runtime".into(),
            reason: "backup task ended early".into(),
        })
    }

    /// Sends an event to an in-flight backup and returns the record once it was handled (the
    /// record as it is, for a backup no longer in flight).
    pub async fn send(&self, backup_id: &str, event: Event) -> Result<BackupRecord> {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .runs
            .sender(backup_id)
            .is_some_and(|s| s.send(registry::Envelope::Event(event, Some(tx))).is_ok());
        if !sent {
            return self.backup(backup_id);
        }
        match rx.await {
            Ok(record) => Ok(record),
            Err(_) => self.backup(backup_id),
        }
    }

    /// A backup as it is now: live (with copy progress not yet saved) while its task is alive,
    /// else from the catalog.
    pub fn backup(&self, backup_id: &str) -> Result<BackupRecord> {
        match self.runs.record(backup_id) {
            // A pin is written to the catalog only, never by the backup's task.
            Some(record) => Ok(crate::forget::with_marks(&self.store, (*record).clone())),
            None => self.store.get(backup_id),
        }
    }

    /// Waits until backup `id` satisfies `until`, or until nothing more can change it (its task
    /// ended, or the listener stops); returns the record as it is then. For callers that wait
    /// for a state, e.g. settled (`record.settled.is_some()`).
    pub async fn wait_until(
        &self,
        id: &str,
        until: impl Fn(&BackupRecord) -> bool,
    ) -> Result<BackupRecord> {
        // Subscribe first, so no change falls between the look and the wait.
        let mut updates = self.updates.subscribe();
        loop {
            let live = self.runs.contains(id);
            let record = self.backup(id)?;
            if until(&record) || !live {
                return Ok(record);
            }
            loop {
                let update = tokio::select! {
                    update = updates.recv() => update,
                    () = self.shutdown.cancelled() => return self.backup(id),
                };
                match update {
                    Ok(u) if u.backup_id == id && (u.ended || until(&u.record)) => {
                        return Ok((*u.record).clone());
                    }
                    Ok(_) => {}
                    // Missed some: look again.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return self.backup(id),
                }
            }
        }
    }

    /// Refuses a copy report (`ReportCopy`) unless this listener's copies are reported: in any
    /// other mode its own copier makes, seals and verifies them.
    pub fn check_copy_report(&self, backup_id: &str) -> Result<()> {
        if self.copier.takes_reports() {
            return Ok(());
        }
        Err(Error::CopyMode { backup: backup_id.to_string(), mode: self.copier.mode() })
    }

    /// Asks every agent in the inventory for its status, in parallel.
    pub async fn agents(&self) -> Vec<pb::AgentInfo> {
        self.agents.status().await
    }
}

/// A sortable, readable id: UTC time of creation plus 6 random hex digits.
fn new_backup_id(now: Millis) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(now / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let stamp = at.format(&format).unwrap_or_default();
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{stamp}-{}", &random[..6])
}

#[cfg(test)]
mod tests;
