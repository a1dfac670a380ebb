//! One task per backup: feeds its coordinator events (replies, copy results, deadlines,
//! operators' requests) and executes the commands it returns, each decision saved to the store
//! *before* it is acted on. The task lives until nothing more can happen to the backup: it is
//! terminal and every RPC and copy it started has answered.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::registry::Envelope;
use super::{Runtime, Update};
use crate::coordinator::{Command, Coordinator, Event};
use crate::model::{BackupRecord, LogEntry, State};
use stillpoint_protocol::hold::Hold;

/// How often a backup whose only news is copy progress is saved anyway. Progress goes to
/// watchers as it comes; the catalog keeps it with the backup's next change or at this pace,
/// so a restart loses at most this much of it (the copies start over anyway).
pub const PROGRESS_SAVE_EVERY: Duration = Duration::from_secs(30);

/// How long a backup waits in PENDING for its servers to be free of another backup's freeze:
/// three leases. One freeze phase lasts at most the commit cutoff plus the commit timeout (one
/// lease each), so this outlasts any other backup's freeze with a lease to spare.
pub fn start_wait(lease_ms: u64) -> Duration {
    Duration::from_millis(lease_ms.saturating_mul(3))
}

/// Where the helpers of a backup (RPCs, copies, the seal) send what happened. Each helper
/// holds one while it works: the backup's task ends once it is terminal and no helper holds
/// one any more (every RPC answered, every copy stopped).
#[derive(Clone)]
pub struct Feed {
    tx: mpsc::UnboundedSender<Envelope>,
    /// Counts the helpers at work (plus the task's own handle).
    helpers: Arc<()>,
}

impl Feed {
    pub fn send(&self, event: Event) {
        let _ = self.tx.send(Envelope::Event(event, None));
    }
}

impl Drop for Feed {
    /// Wakes the task, which checks whether this was the last helper.
    fn drop(&mut self) {
        let _ = self.tx.send(Envelope::HelperDone);
    }
}

/// A backup's channel of events, once registered.
pub struct Registered {
    rx: mpsc::UnboundedReceiver<Envelope>,
    tx: mpsc::UnboundedSender<Envelope>,
}

/// How a run begins.
pub enum Begin {
    /// A new backup: freeze once its servers are free, then answer `reply`.
    Start(oneshot::Sender<BackupRecord>),
    /// A backup a previous listener process left unfinished.
    Restarted,
}

impl Runtime {
    /// Registers `record`'s backup as alive; refused (with the backup in flight) when its group
    /// already has one in flight.
    pub(super) fn register(&self, record: &BackupRecord) -> Result<Registered, String> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.runs.insert(record, tx.clone())?;
        Ok(Registered { rx, tx })
    }

    /// Spawns the task of a registered backup, under a span of its own (not the span of the
    /// request that started it).
    pub(super) fn spawn_run(
        self: &Arc<Self>,
        record: BackupRecord,
        registered: Registered,
        begin: Begin,
    ) {
        let span =
            tracing::info_span!(parent: None, "backup", backup = %record.id, group = %record.group);
        let coordinator = crate::requests::coordinator(&self.config, record)
            .sealed_by_copier(self.copier.seals());
        let this = Arc::clone(self);
        tokio::spawn(
            async move { this.drive(coordinator, registered, begin).await }.instrument(span),
        );
    }

    async fn drive(
        self: Arc<Self>,
        mut coordinator: Coordinator,
        registered: Registered,
        begin: Begin,
    ) {
        let id = coordinator.record.id.clone();
        let Registered { mut rx, tx } = registered;
        let mut run = RunState {
            feed: Feed { tx, helpers: Arc::new(()) },
            copies: self.shutdown.child_token(),
            dirty: false,
            saved_at: tokio::time::Instant::now(),
        };
        let mut start = match begin {
            Begin::Start(reply) => Some(Starting {
                reply: Some(reply),
                said_waiting: false,
                give_up: tokio::time::Instant::now() + start_wait(self.config.timeouts.lease_ms),
            }),
            Begin::Restarted => {
                self.step(&mut coordinator, &mut run, Event::Restarted, None).await;
                None
            }
        };
        loop {
            if run.done(&coordinator) {
                // No helper is left, but what they sent may still be queued: that goes first.
                match rx.try_recv() {
                    Ok(Envelope::Event(event, reply)) => {
                        self.step(&mut coordinator, &mut run, event, reply).await;
                        continue;
                    }
                    Ok(Envelope::HelperDone) => continue,
                    Err(_) => break,
                }
            }
            // A new backup freezes once no other backup holds its servers mid-freeze.
            let freed = self.runs.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(starting) = start.as_mut() {
                if coordinator.record.state != State::Pending {
                    start = None;
                } else {
                    match self.runs.claim_freeze(&id) {
                        Ok(()) => {
                            let reply = starting.reply.take();
                            self.step(&mut coordinator, &mut run, Event::Start, reply).await;
                            start = None;
                            continue;
                        }
                        Err(held) if !starting.said_waiting => {
                            starting.said_waiting = true;
                            let event = Event::Waiting { other: held.by, servers: held.servers };
                            let reply = starting.reply.take();
                            self.step(&mut coordinator, &mut run, event, reply).await;
                            continue;
                        }
                        Err(_) => {}
                    }
                }
            }
            let deadline = coordinator.next_deadline().map(|d| self.clock.instant_of(d));
            let give_up = start.as_ref().map(|s| s.give_up);
            let save_progress = run.dirty.then_some(run.saved_at + PROGRESS_SAVE_EVERY);
            // Events already queued go before a deadline that has passed (a recovered backup's
            // first event is `Restarted`, even though its old deadlines are long gone).
            let (event, reply) = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return,
                received = rx.recv() => match received {
                    Some(Envelope::Event(event, reply)) => (event, reply),
                    Some(Envelope::HelperDone) => continue,
                    // The task holds a sender itself: the channel never closes under it.
                    None => break,
                },
                () = &mut freed, if start.is_some() => continue,
                () = sleep_until(give_up) => {
                    // Free at the last moment: the top of the loop starts it.
                    let Err(held) = self.runs.claim_freeze(&id) else { continue };
                    let waited_ms = self.config.timeouts.lease_ms.saturating_mul(3);
                    (Event::GaveUpWaiting { other: held.by, servers: held.servers, waited_ms }, None)
                }
                () = sleep_until(deadline) => (Event::Tick, None),
                () = sleep_until(save_progress) => {
                    self.save_progress(&coordinator.record, &mut run).await;
                    continue;
                }
            };
            self.step(&mut coordinator, &mut run, event, reply).await;
        }
        if run.dirty {
            self.save_progress(&coordinator.record, &mut run).await;
        }
        self.runs.remove(&id);
        if let Some(saveset) = self.copier.saveset() {
            let writer = crate::repo_catalog::Writer::of(&self.config);
            crate::repo_catalog::save_in_background(
                self.store.clone(),
                Arc::clone(saveset),
                writer,
                id.clone(),
            );
        }
        crate::forget::after_backup(&self, &coordinator.record.group);
        let record = Arc::new(coordinator.record);
        let _ = self.updates.send(Arc::new(Update {
            backup_id: id,
            entries: Vec::new(),
            record,
            ended: true,
        }));
        tracing::debug!("backup task done");
    }

    /// Handles one event: the coordinator decides, the decision is saved, then acted on.
    async fn step(
        self: &Arc<Self>,
        coordinator: &mut Coordinator,
        run: &mut RunState,
        event: Event,
        reply: Option<oneshot::Sender<BackupRecord>>,
    ) {
        let progress = matches!(event, Event::CopyProgress { .. });
        let was_terminal = coordinator.record.state.is_terminal();
        let before = self.metrics.before(&coordinator.record, &event);
        let commands = coordinator.handle(self.clock.now(), event);
        self.metrics.after(before, self.clock.now(), &coordinator.record);
        self.apply(&coordinator.record, commands, progress, run).await;
        if !was_terminal && coordinator.record.state.is_terminal() {
            self.notify_ended(&coordinator.record);
        }
        if coordinator.record.state.is_terminal() {
            // Copies and the seal stop; replies already on the way (abort results, late
            // replies) are still handled until no helper is left.
            run.copies.cancel();
        }
        if let Some(reply) = reply {
            let _ = reply.send(coordinator.record.clone());
        }
    }

    /// Persist, then act. Every decision comes with commands (at least a log line) and is
    /// saved with its log lines before any of them is acted on; if saving fails only Aborts go
    /// out (aborting never harms consistency). Copy progress decides nothing: it goes to
    /// watchers now and to the catalog with the next save.
    async fn apply(
        self: &Arc<Self>,
        record: &BackupRecord,
        commands: Vec<Command>,
        progress: bool,
        run: &mut RunState,
    ) {
        let saved = if !commands.is_empty() {
            let saved = self.save_decision(record, &commands).await;
            if saved {
                run.dirty = false;
                run.saved_at = tokio::time::Instant::now();
            }
            saved
        } else {
            if progress {
                run.dirty = true;
                self.broadcast(record, Vec::new());
            }
            true
        };
        self.runs.update(record);
        let feed = &run.feed;
        let id = record.id.as_str();
        for command in commands {
            match command {
                Command::Log { .. } => {}
                Command::Abort { server, reason } => self.spawn_abort(id, server, reason, feed),
                // Like Abort, a Release only thaws: it goes out even if saving failed.
                Command::Release { server } => self.spawn_release(id, server, feed),
                _ if !saved => {}
                Command::Inspect { server } => self.spawn_inspect(id, server, feed),
                Command::Prepare { server, lease_ms } => {
                    self.spawn_prepare(id, server, (lease_ms, record.require_hold), feed)
                }
                Command::Commit { server, freeze_token } => {
                    let hold = record.thaw_barrier;
                    self.spawn_commit(id, server, (freeze_token, hold), feed)
                }
                Command::Copy { server, snapshots } => {
                    let ids = (id, record.group.as_str());
                    self.copier.start(ids, server, snapshots, feed.clone(), run.copies.clone())
                }
                Command::Seal { stored, cut, artifacts } => {
                    let sealed = (cut, artifacts);
                    self.copier.seal(id, stored, sealed, feed.clone(), run.copies.clone())
                }
                Command::Cleanup { server } => self.spawn_cleanup(id, server, feed),
            }
        }
    }

    /// Saves the record with the log lines among `commands`, then tells watchers; `false` if
    /// it could not be saved.
    pub(super) async fn save_decision(&self, record: &BackupRecord, commands: &[Command]) -> bool {
        let now = self.clock.now();
        let entries: Vec<LogEntry> = commands
            .iter()
            .filter_map(|c| match c {
                Command::Log { server, level, message } => Some(LogEntry {
                    at: now,
                    server: server.clone(),
                    level: *level,
                    message: message.clone(),
                    state: record.state.name(),
                }),
                _ => None,
            })
            .collect();
        match self.store.save(record, &entries).await {
            Ok(next) => {
                let first = next - entries.len() as u64;
                let numbered: Vec<(u64, LogEntry)> =
                    entries.into_iter().enumerate().map(|(i, e)| (first + i as u64, e)).collect();
                numbered.iter().for_each(|(_, e)| trace_entry(e));
                self.broadcast(record, numbered);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "could not persist the backup's state; only aborts will be sent");
                false
            }
        }
    }

    async fn save_progress(&self, record: &BackupRecord, run: &mut RunState) {
        match self.store.save(record, &[]).await {
            Ok(_) => {
                run.dirty = false;
                run.saved_at = tokio::time::Instant::now();
            }
            Err(e) => tracing::warn!(error = %e, "could not save the copy progress"),
        }
    }

    fn broadcast(&self, record: &BackupRecord, entries: Vec<(u64, LogEntry)>) {
        let update = Update {
            backup_id: record.id.clone(),
            entries,
            record: Arc::new(record.clone()),
            ended: false,
        };
        let _ = self.updates.send(Arc::new(update));
    }

    /// Asks a server what holds its writes (its Status), for a group that requires a hold.
    fn spawn_inspect(self: &Arc<Self>, id: &str, server: String, feed: &Feed) {
        let (this, id, feed) = (Arc::clone(self), id.to_string(), feed.clone());
        self.spawn_helper(async move {
            let result = this.agents.inspect(&id, &server).await;
            feed.send(Event::Inspected { server, result });
        });
    }

    fn spawn_prepare(self: &Arc<Self>, id: &str, server: String, lease: (u64, Hold), feed: &Feed) {
        let (this, id, feed) = (Arc::clone(self), id.to_string(), feed.clone());
        self.spawn_helper(async move {
            let reply = this.agents.prepare(&id, &server, lease).await;
            feed.send(Event::Prepared { server, reply });
        });
    }

    /// Release is idempotent: retried like Abort; the agent's lease thaws it regardless.
    fn spawn_release(self: &Arc<Self>, id: &str, server: String, feed: &Feed) {
        let (this, id, feed) = (Arc::clone(self), id.to_string(), feed.clone());
        self.spawn_helper(async move {
            let reply = this.agents.release(&id, &server).await;
            feed.send(Event::Released { server, reply });
        });
    }

    fn spawn_commit(
        self: &Arc<Self>,
        id: &str,
        server: String,
        token: (String, bool),
        feed: &Feed,
    ) {
        let (this, id, feed) = (Arc::clone(self), id.to_string(), feed.clone());
        self.spawn_helper(async move {
            let reply = this.agents.commit(&id, &server, token).await;
            feed.send(Event::Committed { server, reply });
        });
    }

    /// Abort is idempotent: retried with backoff until it lands or the tries run out.
    fn spawn_abort(self: &Arc<Self>, id: &str, server: String, reason: String, feed: &Feed) {
        let (this, id, feed) = (Arc::clone(self), id.to_string(), feed.clone());
        self.spawn_helper(async move {
            let result = this.agents.abort(&id, &server, &reason).await;
            feed.send(Event::Aborted { server, result });
        });
    }

    fn spawn_cleanup(self: &Arc<Self>, id: &str, server: String, feed: &Feed) {
        let (this, id, feed) = (Arc::clone(self), id.to_string(), feed.clone());
        self.spawn_helper(async move {
            let result = this.agents.cleanup(&id, &server).await;
            feed.send(Event::CleanedUp { server, result });
        });
    }

    /// Runs an RPC helper under the backup's span until it is done or the listener stops.
    fn spawn_helper(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let stop = self.shutdown.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = work => {}
                    () = stop.cancelled() => {}
                }
            }
            .in_current_span(),
        );
    }
}

/// What a backup's task keeps between events.
struct RunState {
    /// The task's own handle; helpers get clones.
    feed: Feed,
    /// Cancelled when the backup ends (or the listener stops): copies and the seal stop.
    copies: CancellationToken,
    /// Copy progress not yet saved.
    dirty: bool,
    saved_at: tokio::time::Instant,
}

impl RunState {
    /// Nothing more can start: the backup is terminal and no helper is at work (what they sent
    /// may still be queued).
    fn done(&self, coordinator: &Coordinator) -> bool {
        coordinator.record.state.is_terminal() && Arc::strong_count(&self.feed.helpers) == 1
    }
}

/// A new backup not yet started.
struct Starting {
    reply: Option<oneshot::Sender<BackupRecord>>,
    said_waiting: bool,
    give_up: tokio::time::Instant,
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn trace_entry(entry: &LogEntry) {
    let server = entry.server.as_deref().unwrap_or("");
    match entry.level {
        crate::model::Level::Info => {
            tracing::info!(server, state = %entry.state, "{}", entry.message)
        }
        crate::model::Level::Warn => {
            tracing::warn!(server, state = %entry.state, "{}", entry.message)
        }
        crate::model::Level::Error => {
            tracing::error!(server, state = %entry.state, "{}", entry.message)
        }
    }
}
