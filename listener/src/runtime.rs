//! Drives coordinators: one task per in-flight backup feeds it events (RPC replies, copy results,
//! deadlines, operators' requests) and executes the commands it returns. Every decision is saved
//! to the store *before* it is acted on; if saving fails, only Aborts go out (aborting never hurts
//! consistency) and the agents' leases do the rest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stillpoint_core::layers::{BACKUP_HEADER, SERVER_HEADER};
use stillpoint_proto as pb;
use stillpoint_proto::agent_client::AgentClient;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tonic::transport::Channel;
use tracing::Instrument;

use crate::config::{Config, CopyConfig, CopyOn};
use crate::convert;
use crate::coordinator::{Command, Coordinator, Event};
use crate::copier::{Gather, Saveset, ServerCopy};
use crate::error::{Error, Result};
use crate::model::{BackupRecord, LogEntry, Millis};
use crate::requests::RequestId;
use crate::store::Store;

/// The listener's clock: Unix time read once, advanced by the monotonic clock.
#[derive(Clone, Copy)]
pub struct Clock {
    unix_at_start: Millis,
    start: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock { unix_at_start: stillpoint_core::unix_ms(), start: Instant::now() }
    }

    pub fn now(&self) -> Millis {
        self.unix_at_start + Millis::try_from(self.start.elapsed().as_millis()).unwrap_or(0)
    }

    fn instant_of(&self, at: Millis) -> tokio::time::Instant {
        let offset = u64::try_from(at - self.unix_at_start).unwrap_or(0);
        tokio::time::Instant::from_std(self.start + Duration::from_millis(offset))
    }
}

/// A change to a backup, as watchers see it.
#[derive(Debug, Clone)]
pub struct Update {
    pub backup_id: String,
    /// The log entry's sequence number and the entry, when the change added one.
    pub entry: Option<(u64, LogEntry)>,
    pub record: BackupRecord,
}

type Envelope = (Event, Option<oneshot::Sender<BackupRecord>>);

struct Run {
    group: String,
    events: mpsc::UnboundedSender<Envelope>,
}

pub struct Runtime {
    config: Config,
    store: Store,
    clock: Clock,
    agents: HashMap<String, AgentClient<Channel>>,
    runs: Mutex<HashMap<String, Run>>,
    updates: broadcast::Sender<Arc<Update>>,
    /// The unlocked repository, in saveset copy mode.
    saveset: Option<Arc<Saveset>>,
}

impl Runtime {
    pub fn new(config: Config, store: Store) -> Result<Arc<Runtime>> {
        let t = &config.timeouts;
        let channel_timeout = Duration::from_millis(t.lease_ms.max(t.rpc_ms));
        let mut agents = HashMap::new();
        for s in &config.servers {
            let url = format!("https://{}", s.address);
            let channel =
                stillpoint_core::tls::channel(&url, &s.name, &config.tls, channel_timeout)?;
            agents.insert(s.name.clone(), AgentClient::new(channel));
        }
        let (updates, _) = broadcast::channel(1024);
        let saveset = match &config.copy {
            CopyConfig::Saveset(c) => Some(Arc::new(Saveset::open(c).map_err(|problems| {
                Error::Config { path: c.repository.display().to_string(), problems }
            })?)),
            CopyConfig::Command { .. } | CopyConfig::Report | CopyConfig::Image { .. } => None,
        };
        Ok(Arc::new(Runtime {
            config,
            store,
            clock: Clock::start(),
            agents,
            runs: Mutex::new(HashMap::new()),
            updates,
            saveset,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Update>> {
        self.updates.subscribe()
    }

    /// Fails every backup a previous listener left in flight and aborts it on its agents.
    pub fn recover(self: &Arc<Self>) -> Result<usize> {
        let mut n = 0;
        for record in self.store.list()? {
            if !record.state.is_terminal() {
                tracing::warn!(backup = %record.id, state = %record.state.name(), "recovering backup left in flight");
                self.spawn_run(record, Event::Restarted, None);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Asks every agent, every `sweep_interval_ms`, for backups it still holds (frozen or with
    /// snapshots) that no backup in flight accounts for, and aborts them: snapshots orphaned by
    /// a crash of either side, a lost Cleanup or a partition are deleted once the agent is
    /// reachable again.
    pub fn spawn_sweeper(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let every = Duration::from_millis(self.config.timeouts.sweep_interval_ms);
        tokio::spawn(async move {
            loop {
                this.sweep().await;
                tokio::time::sleep(every).await;
            }
        });
    }

    /// One sweep over every agent; returns how many leftovers were aborted.
    pub async fn sweep(self: &Arc<Self>) -> usize {
        let mut swept = 0;
        for agent in self.agents().await {
            for held in agent.backups {
                let in_flight =
                    self.runs.lock().expect("runs lock poisoned").contains_key(&held.backup_id);
                let holds = matches!(held.phase(), pb::AgentPhase::Frozen | pb::AgentPhase::Orphan)
                    || !held.snapshots.is_empty();
                if in_flight || !holds {
                    continue;
                }
                let message = format!(
                    "swept leftover on {} (agent phase {}, {} snapshot(s)): abort sent",
                    agent.server,
                    held.phase().label(),
                    held.snapshots.len()
                );
                tracing::warn!(backup = %held.backup_id, server = %agent.server, "{message}");
                self.note(&held.backup_id, &agent.server, message);
                let reason = "swept: no backup in flight holds this";
                let result = self.abort_agent(&held.backup_id, &agent.server, reason).await;
                match result {
                    Ok(r) => {
                        swept += 1;
                        let text = format!(
                            "sweep on {}: thawed {}, {} snapshot(s) deleted",
                            agent.server, r.thawed, r.snapshots_deleted
                        );
                        self.note(&held.backup_id, &agent.server, text);
                    }
                    Err(e) => {
                        tracing::warn!(backup = %held.backup_id, server = %agent.server, error = %e, "sweep abort failed; will retry next sweep")
                    }
                }
            }
        }
        swept
    }

    /// Appends a line to a finished backup's log without changing it (no-op for unknown ids).
    fn note(&self, backup_id: &str, server: &str, message: String) {
        let Ok(record) = self.store.get(backup_id) else { return };
        let entry = LogEntry {
            at: self.clock.now(),
            server: Some(server.to_string()),
            level: crate::model::Level::Warn,
            message,
            state: record.state.name(),
        };
        if let Err(e) = self.store.append(backup_id, &[entry]) {
            tracing::error!(backup = %backup_id, error = %e, "could not log the sweep");
        }
    }

    /// Starts a backup of `group`; returns once Prepare has gone out. A `request_id` an
    /// earlier Start used returns that Start's backup as it is now (`requests::replay`).
    pub async fn start(
        self: &Arc<Self>,
        group: &str,
        started_by: &str,
        request_id: Option<&RequestId>,
    ) -> Result<BackupRecord> {
        let group_config = self.config.group(group)?;
        let record = {
            let runs = self.runs.lock().expect("runs lock poisoned");
            if let Some(request_id) = request_id {
                if let Some(earlier) = crate::requests::replay(&self.store, request_id, group)? {
                    return Ok(earlier);
                }
            }
            if let Some((id, _)) = runs.iter().find(|(_, r)| r.group == group) {
                return Err(Error::Busy { group: group.into(), backup: id.clone() });
            }
            let now = self.clock.now();
            let record = BackupRecord::new(
                &new_backup_id(now),
                group,
                &group_config.servers,
                started_by,
                now,
            );
            self.store.save_started(&record, request_id.map(RequestId::as_str))?;
            record
        };
        let (tx, rx) = oneshot::channel();
        self.spawn_run(record, Event::Start, Some(tx));
        rx.await.map_err(|_| Error::Store {
            path: "runtime".into(),
            reason: "backup task ended early".into(),
        })
    }

    /// Sends an event to an in-flight backup and returns the record once it was handled.
    pub async fn send(&self, backup_id: &str, event: Event) -> Result<BackupRecord> {
        let (tx, rx) = oneshot::channel();
        let sent = {
            let runs = self.runs.lock().expect("runs lock poisoned");
            runs.get(backup_id)
                .map(|run| run.events.send((event, Some(tx))).is_ok())
                .unwrap_or(false)
        };
        if !sent {
            return self.store.get(backup_id);
        }
        match rx.await {
            Ok(record) => Ok(record),
            Err(_) => self.store.get(backup_id),
        }
    }

    fn spawn_run(
        self: &Arc<Self>,
        record: BackupRecord,
        first: Event,
        reply: Option<oneshot::Sender<BackupRecord>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = record.id.clone();
        self.runs
            .lock()
            .expect("runs lock poisoned")
            .insert(id.clone(), Run { group: record.group.clone(), events: tx.clone() });
        let weak = tx.downgrade();
        let _ = tx.send((first, reply));
        drop(tx);
        let coordinator = Coordinator::new(record, self.config.timeouts.protocol());
        let this = Arc::clone(self);
        let span = tracing::info_span!("backup", backup = %id);
        tokio::spawn(async move { this.drive(coordinator, rx, weak).await }.instrument(span));
    }

    async fn drive(
        self: Arc<Self>,
        mut coordinator: Coordinator,
        mut rx: mpsc::UnboundedReceiver<Envelope>,
        tx: mpsc::WeakUnboundedSender<Envelope>,
    ) {
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let id = coordinator.record.id.clone();
        let mut gather = None;
        loop {
            let deadline = coordinator.next_deadline().map(|d| self.clock.instant_of(d));
            // Events already queued go before a deadline that has passed (a recovered backup's
            // first event is `Restarted`, even though its old deadlines are long gone).
            let (event, reply) = tokio::select! {
                biased;
                received = rx.recv() => match received {
                    Some(envelope) => envelope,
                    None => break,
                },
                () = sleep_until(deadline) => (Event::Tick, None),
            };
            let commands = coordinator.handle(self.clock.now(), event);
            self.apply(&coordinator.record, commands, &tx, &cancel_rx, &mut gather);
            if let Some(reply) = reply {
                let _ = reply.send(coordinator.record.clone());
            }
            if coordinator.record.state.is_terminal() {
                // Stop copies still running and stop taking new events; replies already on the
                // way (abort results, late replies) are still handled until every sender is gone.
                let _ = cancel_tx.send(true);
                self.runs.lock().expect("runs lock poisoned").remove(&id);
            }
        }
        tracing::debug!(state = %coordinator.record.state.name(), "backup task done");
    }

    fn apply(
        self: &Arc<Self>,
        record: &BackupRecord,
        commands: Vec<Command>,
        tx: &mpsc::WeakUnboundedSender<Envelope>,
        cancel: &watch::Receiver<bool>,
        gather: &mut Option<Arc<Mutex<Gather>>>,
    ) {
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
        let saved = match self.store.save(record, &entries) {
            Ok(next) => {
                let first = next - entries.len() as u64;
                for (i, entry) in entries.iter().enumerate() {
                    trace_entry(entry);
                    let _ = self.updates.send(Arc::new(Update {
                        backup_id: record.id.clone(),
                        entry: Some((first + i as u64, entry.clone())),
                        record: record.clone(),
                    }));
                }
                if entries.is_empty() {
                    let _ = self.updates.send(Arc::new(Update {
                        backup_id: record.id.clone(),
                        entry: None,
                        record: record.clone(),
                    }));
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "could not persist the backup's state; only aborts will be sent");
                false
            }
        };
        let Some(tx) = tx.upgrade() else { return };
        for command in commands {
            match command {
                Command::Log { .. } => {}
                Command::Abort { server, reason } => {
                    self.spawn_abort(&record.id, server, reason, tx.clone())
                }
                _ if !saved => {}
                Command::Prepare { server, lease_ms } => {
                    self.spawn_prepare(&record.id, server, lease_ms, tx.clone())
                }
                Command::Commit { server } => {
                    let token = record
                        .servers
                        .iter()
                        .find(|s| s.server == server)
                        .map(|s| s.freeze_token.clone())
                        .unwrap_or_default();
                    self.spawn_commit(&record.id, server, token, tx.clone())
                }
                Command::Copy { server, snapshots } => match &self.saveset {
                    Some(saveset) => {
                        // Every server copies, so the gather of a backup is made at its first
                        // Copy and knows them all.
                        let gather = gather.get_or_insert_with(|| {
                            let servers = record.servers.iter().map(|s| s.server.clone());
                            Arc::new(Mutex::new(Gather::new(servers)))
                        });
                        let copy = SavesetCopy {
                            saveset: Arc::clone(saveset),
                            gather: Arc::clone(gather),
                            backup_id: record.id.clone(),
                            cut: crate::copier::cut_json(record),
                            server,
                            snapshots,
                        };
                        let on = match &self.config.copy {
                            CopyConfig::Saveset(c) => c.on,
                            CopyConfig::Command { .. }
                            | CopyConfig::Report
                            | CopyConfig::Image { .. } => CopyOn::Listener,
                        };
                        match on {
                            CopyOn::Listener => {
                                spawn_saveset_copy(copy, tx.clone(), cancel.clone())
                            }
                            CopyOn::Agent => {
                                self.spawn_agent_copy(copy, tx.clone(), cancel.clone())
                            }
                        }
                    }
                    None => {
                        self.spawn_copy(&record.id, server, snapshots, tx.clone(), cancel.clone())
                    }
                },
                Command::Cleanup { server } => self.spawn_cleanup(&record.id, server, tx.clone()),
            }
        }
    }

    fn client(&self, server: &str) -> std::result::Result<AgentClient<Channel>, String> {
        self.agents
            .get(server)
            .cloned()
            .ok_or_else(|| format!("server {server} is not in the inventory"))
    }

    fn request<T>(backup_id: &str, server: &str, message: T, timeout_ms: u64) -> tonic::Request<T> {
        let mut request = Self::untimed_request(backup_id, server, message);
        request.set_timeout(Duration::from_millis(timeout_ms.max(1)));
        request
    }

    /// A request naming the backup and server for the agent's trace, with no overall deadline
    /// (for the Copy stream, which is bounded by silence instead).
    fn untimed_request<T>(backup_id: &str, server: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(v) = backup_id.parse() {
            request.metadata_mut().insert(BACKUP_HEADER, v);
        }
        if let Ok(v) = server.parse() {
            request.metadata_mut().insert(SERVER_HEADER, v);
        }
        request
    }

    fn spawn_prepare(
        self: &Arc<Self>,
        backup_id: &str,
        server: String,
        lease_ms: u64,
        tx: mpsc::UnboundedSender<Envelope>,
    ) {
        // An answer after the cutoff is useless: the coordinator has failed the backup by then.
        let timeout = self.config.timeouts.commit_cutoff_ms();
        let message = pb::PrepareRequest { backup_id: backup_id.into(), lease_ms };
        let request = Self::request(backup_id, &server, message, timeout);
        let this = Arc::clone(self);
        tokio::spawn(
            async move {
                let reply = this
                    .call_once(&server, |mut c| async move { c.prepare(request).await })
                    .await
                    .map(convert::prepare_reply);
                let _ = tx.send((Event::Prepared { server, reply }, None));
            }
            .in_current_span(),
        );
    }

    fn spawn_commit(
        self: &Arc<Self>,
        backup_id: &str,
        server: String,
        freeze_token: String,
        tx: mpsc::UnboundedSender<Envelope>,
    ) {
        let timeout = self.config.timeouts.protocol().commit_timeout_ms;
        let message = pb::CommitRequest { backup_id: backup_id.into(), freeze_token };
        let request = Self::request(backup_id, &server, message, timeout);
        let this = Arc::clone(self);
        tokio::spawn(
            async move {
                let reply = this
                    .call_once(&server, |mut c| async move { c.commit(request).await })
                    .await
                    .map(convert::commit_reply);
                let _ = tx.send((Event::Committed { server, reply }, None));
            }
            .in_current_span(),
        );
    }

    /// Calls an agent RPC once (Prepare and Commit are not retried: their deadlines are the
    /// protocol's) and returns the reply or why it failed, in words.
    async fn call_once<T, F, Fut>(&self, server: &str, call: F) -> std::result::Result<T, String>
    where
        F: FnOnce(AgentClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client(server)?;
        call(client).await.map(tonic::Response::into_inner).map_err(|s| explain(&s))
    }

    /// Abort is idempotent, so it is retried with backoff until it lands or we give up (the
    /// agent's lease thaws it regardless).
    fn spawn_abort(
        self: &Arc<Self>,
        backup_id: &str,
        server: String,
        reason: String,
        tx: mpsc::UnboundedSender<Envelope>,
    ) {
        let this = Arc::clone(self);
        let backup_id = backup_id.to_string();
        tokio::spawn(
            async move {
                let result = this.abort_agent(&backup_id, &server, &reason).await.map(|_| ());
                let _ = tx.send((Event::Aborted { server, result }, None));
            }
            .in_current_span(),
        );
    }

    fn spawn_cleanup(
        self: &Arc<Self>,
        backup_id: &str,
        server: String,
        tx: mpsc::UnboundedSender<Envelope>,
    ) {
        let this = Arc::clone(self);
        let backup_id = backup_id.to_string();
        tokio::spawn(
            async move {
                let rpc_ms = this.config.timeouts.rpc_ms;
                let result = this
                    .call_idempotent(&server, |mut c| {
                        let message = pb::CleanupRequest { backup_id: backup_id.clone() };
                        let request = Self::request(&backup_id, &server, message, rpc_ms);
                        async move { c.cleanup(request).await.map(|r| r.into_inner().snapshots_deleted) }
                    })
                    .await;
                let _ = tx.send((Event::CleanedUp { server, result }, None));
            }
            .in_current_span(),
        );
    }

    async fn abort_agent(
        &self,
        backup_id: &str,
        server: &str,
        reason: &str,
    ) -> std::result::Result<pb::AbortResponse, String> {
        let rpc_ms = self.config.timeouts.rpc_ms;
        self.call_idempotent(server, |mut c| {
            let message =
                pb::AbortRequest { backup_id: backup_id.to_string(), reason: reason.to_string() };
            let request = Self::request(backup_id, server, message, rpc_ms);
            async move { c.abort(request).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Calls an idempotent agent RPC: three tries, 200 ms then 400 ms apart.
    async fn call_idempotent<T, F, Fut>(
        &self,
        server: &str,
        call: F,
    ) -> std::result::Result<T, String>
    where
        F: Fn(AgentClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let client = self.client(server)?;
        retry(|| call(client.clone())).await
    }

    fn spawn_copy(
        self: &Arc<Self>,
        backup_id: &str,
        server: String,
        snapshots: Vec<crate::model::SnapshotRef>,
        tx: mpsc::UnboundedSender<Envelope>,
        mut cancel: watch::Receiver<bool>,
    ) {
        if let CopyConfig::Image { target } = &self.config.copy {
            let (target, backup_id) = (target.clone(), backup_id.to_string());
            tokio::spawn(
                async move {
                    let progress_tx = tx.clone();
                    let progress_server = server.clone();
                    let copy_server = server.clone();
                    let copy = tokio::task::spawn_blocking(move || {
                        crate::copier::copy_images(&target, &backup_id, &copy_server, &snapshots, |done, total| {
                            let event = Event::CopyProgress { server: progress_server.clone(), done, total };
                            let _ = progress_tx.send((event, None));
                        })
                    });
                    let result = tokio::select! {
                        joined = copy => joined.unwrap_or_else(|e| Err(format!("image copy task: {e}"))),
                        _ = cancel.wait_for(|stop| *stop) => return,
                    };
                    let _ = tx.send((Event::Copied { server, result }, None));
                }
                .in_current_span(),
            );
            return;
        }
        let CopyConfig::Command { command } = &self.config.copy else {
            // Report mode: the backup software calls ReportCopy when it is done.
            tracing::info!(server = %server, "waiting for the backup software to report this server's copy");
            return;
        };
        let command = command.clone();
        let backup_id = backup_id.to_string();
        tokio::spawn(
            async move {
                let progress_tx = tx.clone();
                let progress_server = server.clone();
                let copy = crate::copier::run_command(
                    &command,
                    &backup_id,
                    &server,
                    &snapshots,
                    move |done, total| {
                        let event =
                            Event::CopyProgress { server: progress_server.clone(), done, total };
                        let _ = progress_tx.send((event, None));
                    },
                );
                // Dropping the copy future kills its command when the backup ends.
                let result = tokio::select! {
                    result = copy => result,
                    _ = cancel.wait_for(|stop| *stop) => return,
                };
                let _ = tx.send((Event::Copied { server, result }, None));
            }
            .in_current_span(),
        );
    }

    /// Runs one server's saveset copy on its agent (the Copy stream), relaying progress as the
    /// local copy does; the copy that completes the backup then writes the backup manifest and
    /// verifies here, as in [`spawn_saveset_copy`].
    fn spawn_agent_copy(
        self: &Arc<Self>,
        copy: SavesetCopy,
        tx: mpsc::UnboundedSender<Envelope>,
        mut cancel: watch::Receiver<bool>,
    ) {
        let this = Arc::clone(self);
        let span = tracing::info_span!("agent_copy", server = %copy.server);
        tokio::spawn(
            async move {
                let server = copy.server.clone();
                // Dropping the stream when the backup ends tells the agent to stop.
                let streamed = tokio::select! {
                    result = this.copy_on_agent(&copy.backup_id, &server, &tx) => result,
                    _ = cancel.wait_for(|stop| *stop) => return,
                };
                let result = match streamed {
                    Ok(done) => {
                        let stopped = cancel.clone();
                        let span = tracing::Span::current();
                        let finish = tokio::task::spawn_blocking(move || {
                            let _span = span.enter();
                            finish_server(&copy, done, &|| *stopped.borrow())
                        });
                        tokio::select! {
                            joined = finish => joined.unwrap_or_else(|e| Err(format!("copier task failed: {e}"))),
                            _ = cancel.wait_for(|stop| *stop) => return,
                        }
                    }
                    Err(e) => Err(e),
                };
                let _ = tx.send((Event::Copied { server, result }, None));
            }
            .instrument(span),
        );
    }

    /// Calls Copy on `server`'s agent and follows its stream to the result. There is no overall
    /// deadline (a copy may take hours); the stream fails if it goes silent for
    /// `timeouts.agent_copy_silence_ms` or breaks (the agent died, the link was cut).
    async fn copy_on_agent(
        &self,
        backup_id: &str,
        server: &str,
        tx: &mpsc::UnboundedSender<Envelope>,
    ) -> std::result::Result<ServerCopy, String> {
        let mut client = self.client(server)?;
        let message = pb::CopyRequest { backup_id: backup_id.to_string() };
        let request = Self::untimed_request(backup_id, server, message);
        let mut stream = client
            .copy(request)
            .await
            .map_err(|s| format!("copy on agent {server}: {}", explain(&s)))?
            .into_inner();
        tracing::info!("copying on the agent");
        let mut last = None;
        let silence = Duration::from_millis(self.config.timeouts.agent_copy_silence_ms);
        loop {
            let message = tokio::time::timeout(silence, stream.message())
                .await
                .map_err(|_| {
                    format!(
                        "copy on agent {server}: no progress or heartbeat for {} ms; the agent or the link is gone",
                        silence.as_millis()
                    )
                })?
                .map_err(|s| stream_error(server, &s, last))?;
            let Some(event) = message else {
                return Err(format!("copy on agent {server}: the stream ended without a result"));
            };
            match event.event {
                Some(pb::copy_event::Event::Progress(p)) => {
                    // Heartbeats repeat the last progress; only changes are news.
                    let now = (p.done_bytes, p.total_bytes);
                    if last != Some(now) {
                        last = Some(now);
                        let event = Event::CopyProgress {
                            server: server.to_string(),
                            done: p.done_bytes,
                            total: p.total_bytes,
                        };
                        let _ = tx.send((event, None));
                    }
                }
                Some(pb::copy_event::Event::Done(done)) => {
                    return convert::copy_done(done)
                        .map_err(|e| format!("copy on agent {server}: {e}"));
                }
                None => {}
            }
        }
    }

    /// Asks every agent in the inventory for its status, in parallel.
    pub async fn agents(&self) -> Vec<pb::AgentInfo> {
        let rpc_ms = self.config.timeouts.rpc_ms.min(3_000);
        let calls = self.config.servers.iter().map(|s| {
            let groups: Vec<String> = self
                .config
                .groups
                .iter()
                .filter(|g| g.servers.contains(&s.name))
                .map(|g| g.name.clone())
                .collect();
            let mut info = pb::AgentInfo {
                server: s.name.clone(),
                address: s.address.clone(),
                groups,
                ..Default::default()
            };
            async move {
                let request = Self::request("", &info.server, pb::StatusRequest {}, rpc_ms);
                match self
                    .call_once(&info.server, |mut c| async move { c.status(request).await })
                    .await
                {
                    Ok(status) => {
                        info.reachable = true;
                        info.version = status.version;
                        info.backups = status.backups;
                    }
                    Err(e) => info.error = e,
                }
                info
            }
        });
        futures::future::join_all(calls).await
    }
}

/// One server's copy into the saveset repository, and what the last one needs to finish.
struct SavesetCopy {
    saveset: Arc<Saveset>,
    gather: Arc<Mutex<Gather>>,
    backup_id: String,
    /// The record's cut and verdict as JSON, fixed before any copy starts.
    cut: serde_json::Value,
    server: String,
    snapshots: Vec<crate::model::SnapshotRef>,
}

/// Runs a saveset copy on a blocking task, reporting progress at most every 250 ms. The copy
/// that completes the backup writes its manifest and verifies before its Copied goes out, so
/// the backup succeeds only once the manifest with the cut is in the repository.
fn spawn_saveset_copy(
    copy: SavesetCopy,
    tx: mpsc::UnboundedSender<Envelope>,
    mut cancel: watch::Receiver<bool>,
) {
    let server = copy.server.clone();
    let progress_tx = tx.clone();
    let stopped = cancel.clone();
    let span = tracing::Span::current();
    let blocking = tokio::task::spawn_blocking(move || {
        let _span = span.enter();
        let stop = || *stopped.borrow();
        let mut progress = |done, total| {
            let event = Event::CopyProgress { server: copy.server.clone(), done, total };
            let _ = progress_tx.send((event, None));
        };
        let done = copy.saveset.copy_server(
            &copy.backup_id,
            &copy.server,
            &copy.snapshots,
            &mut progress,
            &stop,
        )?;
        finish_server(&copy, done, &stop)
    });
    tokio::spawn(
        async move {
            // A blocking copy cannot be interrupted mid-volume; once the backup ended its result
            // is dropped (and it stops before the next volume).
            let result = tokio::select! {
                joined = blocking => joined.unwrap_or_else(|e| Err(format!("copier task failed: {e}"))),
                _ = cancel.wait_for(|stop| *stop) => return,
            };
            let _ = tx.send((Event::Copied { server, result }, None));
        }
        .in_current_span(),
    );
}

/// Records one server's copied volumes; the server that completes the backup writes the backup
/// manifest (with the cut) and verifies. Blocking. Returns the line for the log.
fn finish_server(
    copy: &SavesetCopy,
    done: ServerCopy,
    stop: &dyn Fn() -> bool,
) -> std::result::Result<String, String> {
    let mut detail = done.detail();
    let ids = done.volumes.iter().map(|(_, id)| *id).collect();
    let all = copy.gather.lock().expect("gather lock poisoned").complete(&copy.server, ids);
    if let Some(volumes) = all {
        if stop() {
            return Err("the backup ended before its manifest was written".to_string());
        }
        let line = copy.saveset.finish_backup(&copy.backup_id, volumes, copy.cut.clone())?;
        detail = format!("{detail}; {line}");
    }
    Ok(detail)
}

/// Why a Copy stream failed, in words: the agent's own refusal or failure as it said it, or a
/// broken link (the agent died, the network failed) with how far the copy had got.
fn stream_error(server: &str, status: &tonic::Status, progress: Option<(u64, u64)>) -> String {
    use tonic::Code;
    match status.code() {
        Code::Unknown | Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            let (done, total) = progress.unwrap_or((0, 0));
            format!(
                "copy on agent {server} broke off at {done} of {total} bytes: the agent died or the link to it failed ({})",
                status.message()
            )
        }
        _ => format!("copy on agent {server}: {}", status.message()),
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Three tries, 200 ms then 400 ms apart; only for idempotent calls.
async fn retry<T, F, Fut>(mut call: F) -> std::result::Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
{
    let mut delay = Duration::from_millis(200);
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        match call().await {
            Ok(v) => return Ok(v),
            Err(status) => last = explain(&status),
        }
    }
    Err(last)
}

fn explain(status: &tonic::Status) -> String {
    stillpoint_core::tls::explain(status)
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

/// A sortable, readable id: UTC time of creation plus 6 random hex digits.
fn new_backup_id(now: Millis) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(now / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let stamp = at.format(&format).unwrap_or_default();
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{stamp}-{}", &random[..6])
}
