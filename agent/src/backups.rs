//! The executor of the agent's machine (`stillpoint_protocol::agent`): it owns the plug-ins
//! (quiescers, snapshot provider, the armed guardian and journal), feeds requests and the lease
//! timer to the machine, runs each effect (blocking plug-in calls on `spawn_blocking`) and feeds
//! its result back. The machine decides and serializes; this file only acts. Each request's
//! effects run in their own task, so a dropped RPC never leaves a freeze half done, and Status
//! reads the machine's state without waiting on an operation. No gRPC here: `service` converts.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use stillpoint_protocol::agent::{
    AbortReply, Agent, BackupId, BackupStatus, Effect, Failure, FailureKind, FreezeToken, Input,
    OpKind, Origin, Phase, QuiescerInfo, Released, Reply, ReqId, Request,
};
use stillpoint_protocol::coordinator::{CommitReply, PrepareReply, ReleaseReply};
use stillpoint_protocol::hold::Hold;
use stillpoint_protocol::model::{Level, SnapshotRef};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tracing::{error, info, warn, Instrument, Span};

use crate::armed::Armed;
use crate::convert::snapshot_ref;
use crate::guardian::Outcome;
use crate::quiesce::Quiescer;
use crate::snapshot::SnapshotProvider;
use crate::{Error, Result};

pub use stillpoint_protocol::agent::KEEP_FINISHED;

/// Held by a running copy for as long as it reads a backup's snapshots: until it is dropped,
/// Abort and Cleanup of that backup wait instead of deleting them. Dropping it (the copy ended,
/// failed or panicked) lets them go on.
pub struct CopyHold {
    inner: Arc<Inner>,
    id: BackupId,
    stop: Arc<AtomicBool>,
}

impl CopyHold {
    /// Set once Abort or Cleanup asked the copy to stop (the copier may set it too, when its
    /// caller went away); the copier polls it between volumes, as one volume's read cannot be
    /// interrupted.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Where the copy counts its bytes.
    pub fn metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.inner.metrics.clone()
    }
}

impl Drop for CopyHold {
    fn drop(&mut self) {
        lock(&self.inner.copies).remove(&self.id);
        let effects = self.inner.handle(Input::CopyEnded { backup: self.id.clone() });
        if effects.is_empty() {
            return;
        }
        // A waiting Abort or Cleanup goes on; it needs a task to run its effects.
        match tokio::runtime::Handle::try_current().ok().or_else(|| self.inner.runtime.clone()) {
            Some(rt) => drop(rt.spawn(self.inner.clone().drive(effects, Span::current()))),
            None => {
                error!(backup = %self.id, "no runtime to run the operations waiting for this copy")
            }
        }
    }
}

/// The backups this agent knows about and the plug-ins that act on them. Cheap to clone.
#[derive(Clone)]
pub struct Backups {
    inner: Arc<Inner>,
}

struct Inner {
    server: String,
    volumes: Vec<String>,
    quiescers: Vec<Arc<dyn Quiescer>>,
    provider: Arc<dyn SnapshotProvider>,
    /// The guardian and journal; behind a std mutex, used only on blocking threads.
    armed: Arc<Mutex<Armed>>,
    /// Zero of the monotonic milliseconds the machine counts in.
    origin: Instant,
    /// Held only for one `handle` call (pure, quick), never across an await.
    machine: Mutex<Agent>,
    next_req: AtomicU64,
    /// Who waits for each request's reply, and the span its operation runs in.
    waiting: Mutex<HashMap<ReqId, (oneshot::Sender<Reply>, Span)>>,
    timers: Mutex<HashMap<BackupId, AbortHandle>>,
    /// The stop flag of each running copy.
    copies: Mutex<HashMap<BackupId, Arc<AtomicBool>>>,
    runtime: Option<tokio::runtime::Handle>,
    /// Read around every input the machine takes.
    metrics: Arc<crate::metrics::Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs a blocking plug-in call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let span = Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("plug-in call died: {e}")))
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f.kind {
            FailureKind::NotFound => Error::NotFound(f.text),
            FailureKind::FailedPrecondition => Error::FailedPrecondition(f.text),
            FailureKind::Provider => Error::Provider(f.text),
        }
    }
}

fn unexpected(op: &str, reply: Reply) -> Error {
    Error::Internal(format!("{op}: the agent's machine answered {reply:?}"))
}

impl Backups {
    /// A table for `server` that freezes `quiescers` in order and snapshots `volumes`, arming
    /// every thaw with `armed` first.
    pub fn new(
        server: &str,
        volumes: Vec<String>,
        quiescers: Vec<Arc<dyn Quiescer>>,
        provider: Arc<dyn SnapshotProvider>,
        armed: Armed,
    ) -> Backups {
        let info = quiescers
            .iter()
            .map(|q| QuiescerInfo {
                name: q.name().to_string(),
                freezes_filesystem: q.freezes_filesystem(),
                hold: q.hold(),
            })
            .collect();
        let machine = Agent::new(server, info, provider.kind());
        Backups {
            inner: Arc::new(Inner {
                server: server.to_string(),
                volumes,
                quiescers,
                provider,
                armed: Arc::new(Mutex::new(armed)),
                origin: Instant::now(),
                machine: Mutex::new(machine),
                next_req: AtomicU64::new(1),
                waiting: Mutex::new(HashMap::new()),
                timers: Mutex::new(HashMap::new()),
                copies: Mutex::new(HashMap::new()),
                runtime: tokio::runtime::Handle::try_current().ok(),
                metrics: Arc::new(crate::metrics::Metrics::new(&[])),
            }),
        }
    }

    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The same table, counting into `metrics` (the daemon's, with its certificates) instead
    /// of a set of its own. Call before the table is shared.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Backups {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.metrics = metrics,
            None => warn!("metrics given to a table already shared; they count nothing"),
        }
        self
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    /// What this agent's quiescers hold when they freeze (configured, not measured).
    pub fn hold(&self) -> Hold {
        lock(&self.inner.machine).hold()
    }

    /// Hands `request` to the machine in a task of its own, under a span naming the backup and
    /// server, and waits for its reply; a caller who stops waiting does not cut it short.
    async fn request(&self, op: OpKind, id: Option<&BackupId>, request: Request) -> Result<Reply> {
        let server = &self.inner.server;
        let span = match id {
            Some(id) => tracing::info_span!("op", op = op.as_str(), backup = %id, server = %server),
            None => tracing::info_span!("op", op = op.as_str(), server = %server),
        };
        let from = ReqId(self.inner.next_req.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.waiting).insert(from, (tx, span.clone()));
        let inner = self.inner.clone();
        tokio::spawn(
            async move { inner.feed(Input::Request { from, request }).await }.instrument(span),
        );
        rx.await.map_err(|_| Error::Internal(format!("{} ended without a reply", op.as_str())))
    }

    /// Quiesces and freezes `id` under a lease of `lease_ms` counted from now, unless this
    /// agent's hold is below `require` (then it refuses before touching anything). Idempotent:
    /// a repeated Prepare gets the first one's reply.
    pub async fn prepare(
        &self,
        id: &BackupId,
        lease_ms: u64,
        require: Hold,
    ) -> Result<PrepareReply> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let fresh_token = FreezeToken::parse(&token).map_err(|e| Error::Internal(e.to_string()))?;
        let request = Request::Prepare { backup: id.clone(), lease_ms, fresh_token, require };
        match self.request(OpKind::Prepare, Some(id), request).await? {
            Reply::Prepared(reply) => Ok(reply),
            other => Err(unexpected("prepare", other)),
        }
    }

    /// Snapshots and thaws `id` if its lease still runs. `freeze_token`, when given, must name
    /// the freeze this agent holds for `id` (from its prepared reply); a Commit meant for
    /// another freeze is refused. With `hold_until_release` it stays frozen after the snapshot
    /// until [`Backups::release`] or its lease's end. Idempotent.
    pub async fn commit(
        &self,
        id: &BackupId,
        freeze_token: Option<&FreezeToken>,
        hold_until_release: bool,
    ) -> Result<CommitReply> {
        let token = freeze_token.cloned();
        let request = Request::Commit { backup: id.clone(), token, hold_until_release };
        match self.request(OpKind::Commit, Some(id), request).await? {
            Reply::Committed(reply) => Ok(reply),
            other => Err(unexpected("commit", other)),
        }
    }

    /// Thaws `id` held after its snapshot; says whether it was still held when this came.
    /// Idempotent.
    pub async fn release(&self, id: &BackupId) -> Result<ReleaseReply> {
        let request = Request::Release { backup: id.clone() };
        match self.request(OpKind::Release, Some(id), request).await? {
            Reply::Release(result) => Ok(result?),
            other => Err(unexpected("release", other)),
        }
    }

    /// Thaws and deletes whatever `id` holds. Idempotent; an unknown id is remembered as
    /// aborted so a late Prepare for it is refused.
    pub async fn abort(&self, id: &BackupId, reason: &str) -> Result<AbortReply> {
        let request = Request::Abort { backup: id.clone(), reason: reason.to_string() };
        match self.request(OpKind::Abort, Some(id), request).await? {
            Reply::Aborted(result) => Ok(result?),
            other => Err(unexpected("abort", other)),
        }
    }

    /// Deletes `id`'s snapshots (thawing first if it is still frozen). Idempotent.
    pub async fn cleanup(&self, id: &BackupId) -> Result<u32> {
        let request = Request::Cleanup { backup: id.clone() };
        match self.request(OpKind::Cleanup, Some(id), request).await? {
            Reply::CleanedUp(result) => Ok(result?),
            other => Err(unexpected("cleanup", other)),
        }
    }

    /// Starts a copy of `id`'s snapshots: returns them and the hold that keeps Abort and
    /// Cleanup from deleting them while the copy reads. Only a committed backup whose
    /// snapshots still exist can be copied, by one copy at a time (a second is refused, not
    /// queued: the listener never runs two, so a second one is a mistake to report).
    pub fn begin_copy(&self, id: &BackupId) -> Result<(Vec<SnapshotRef>, CopyHold)> {
        let stop = Arc::new(AtomicBool::new(false));
        // Registered first, so a StopCopy from an Abort right after finds it.
        let earlier = lock(&self.inner.copies).insert(id.clone(), stop.clone());
        let from = ReqId(self.inner.next_req.fetch_add(1, Ordering::Relaxed));
        let effects = self
            .inner
            .handle(Input::Request { from, request: Request::BeginCopy { backup: id.clone() } });
        let mut answer = None;
        for effect in effects {
            match effect {
                Effect::Reply { to, reply: Reply::CopyBegun(result) } if to == from => {
                    answer = Some(result)
                }
                other => warn!(effect = ?other, "begin copy: unexpected effect"),
            }
        }
        match answer {
            Some(Ok(snapshots)) => {
                let hold = CopyHold { inner: self.inner.clone(), id: id.clone(), stop };
                Ok((snapshots, hold))
            }
            refused => {
                // The running copy (if any) keeps its own flag.
                let mut copies = lock(&self.inner.copies);
                match earlier {
                    Some(flag) => drop(copies.insert(id.clone(), flag)),
                    None => drop(copies.remove(id)),
                }
                Err(match refused {
                    Some(Err(failure)) => failure.into(),
                    _ => Error::Internal(format!("begin copy of {id}: no answer")),
                })
            }
        }
    }

    /// Every backup the agent remembers, oldest first. Never waits on an operation.
    pub fn status(&self) -> Vec<BackupStatus> {
        let now = self.inner.now_ms();
        lock(&self.inner.machine).status(now)
    }

    /// Like [`Backups::status`], plus an orphan entry for every backup the provider holds
    /// snapshots of but the agent does not know (e.g. from before a restart), so the listener
    /// can Abort them.
    pub async fn report(&self) -> Vec<BackupStatus> {
        let mut out = self.status();
        let provider = self.inner.provider.clone();
        let held = match blocking(move || provider.list()).await {
            Ok(held) => held,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "list snapshots for status");
                return out;
            }
        };
        for (backup, snapshot) in held {
            let Ok(backup) = BackupId::parse(&backup) else {
                warn!(backup = %backup.escape_debug(), "the provider holds a snapshot whose backup id is not valid; ignored");
                continue;
            };
            if out.iter().any(|b| b.backup == backup && b.phase != Phase::Orphan) {
                continue;
            }
            let snapshot = snapshot_ref(snapshot);
            match out.iter_mut().find(|b| b.backup == backup) {
                Some(b) => b.snapshots.push(snapshot),
                None => out.push(BackupStatus {
                    backup,
                    phase: Phase::Orphan,
                    lease_remaining_ms: 0,
                    snapshots: vec![snapshot],
                    detail: "snapshots of a backup this agent does not know (from before a restart?); Abort deletes them".into(),
                }),
            }
        }
        out
    }

    /// Makes sure a guardian runs, respawning it if it died. For a watch task in `run`.
    pub async fn check_guardian(&self) {
        let result = self.inner.with_armed(|a| a.ensure()).await;
        if let Err(e) = result {
            error!(error = %e, "no freeze guardian is running");
        }
    }

    /// The provider's own check (the budget: room for every snapshot), as a Prepare would ask
    /// it, for the pre-flight; nothing is armed or frozen.
    pub async fn check_provider(&self) -> anyhow::Result<String> {
        let (provider, volumes) = (self.inner.provider.clone(), self.inner.volumes.clone());
        blocking(move || provider.check(&volumes)).await
    }

    /// The guardian's pid, when it runs.
    pub async fn guardian_pid(&self) -> Option<u32> {
        self.inner.with_armed(|a| Ok(a.guardian_pid())).await.ok().flatten()
    }

    /// Thaws every frozen backup and marks it failed, then stops the guardian (each backup was
    /// released first, so it runs nothing twice); for the daemon's shutdown.
    pub async fn shutdown(&self) {
        if let Err(e) = self.request(OpKind::Shutdown, None, Request::Shutdown).await {
            error!(error = %e, "shutdown");
        }
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        ms(self.origin.elapsed())
    }

    /// One input to the machine, at the agent's clock.
    fn handle(&self, input: Input) -> Vec<Effect> {
        let now = self.now_ms();
        let mut machine = lock(&self.machine);
        let before = self.metrics.before(&machine, &input);
        let effects = machine.handle(now, input);
        self.metrics.after(before, &machine, &effects);
        effects
    }

    async fn feed(self: &Arc<Self>, input: Input) {
        let effects = self.handle(input);
        self.clone().drive(effects, Span::current()).await;
    }

    /// Runs `effects` and everything their results lead to, each operation's in its span.
    async fn drive(self: Arc<Self>, effects: Vec<Effect>, mut span: Span) {
        let mut effects: VecDeque<Effect> = effects.into();
        while let Some(effect) = effects.pop_front() {
            if let Effect::Begin { op, origin, backup } = &effect {
                span = self.span_for(*op, *origin, backup.as_ref());
                continue;
            }
            if let Some(result) = self.execute(effect).instrument(span.clone()).await {
                effects.extend(self.handle(result));
            }
        }
    }

    /// The span an operation's effects run in: its request's, or for the lease timer a root
    /// span of its own (its lines belong to no RPC).
    fn span_for(&self, op: OpKind, origin: Origin, backup: Option<&BackupId>) -> Span {
        let server = &self.server;
        match origin {
            Origin::Request(r) => match lock(&self.waiting).get(&r) {
                Some((_, span)) => span.clone(),
                None => tracing::info_span!("op", op = op.as_str(), server = %server),
            },
            Origin::LeaseTimer => match backup {
                Some(id) => {
                    tracing::info_span!(parent: None, "lease", backup = %id, server = %server)
                }
                None => tracing::info_span!(parent: None, "lease", server = %server),
            },
        }
    }

    /// Runs `f` on the armed state off the async threads.
    async fn with_armed<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Armed) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let armed = self.armed.clone();
        let span = Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| f(&mut lock(&armed))))
            .await
            .unwrap_or_else(|e| Err(format!("guardian call died: {e}")))
    }

    /// Executes one effect; returns the result to feed back, if it has one.
    async fn execute(self: &Arc<Self>, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Begin { .. } => None,
            Effect::EnsureGuardian => {
                Some(Input::GuardianChecked(self.with_armed(|a| a.ensure()).await))
            }
            Effect::Arm { backup, quiescer, lease_end_ms } => {
                let result = self.arm(&backup, quiescer, lease_end_ms).await;
                Some(Input::Armed { quiescer, result })
            }
            Effect::Freeze { backup, quiescer } => {
                let q = self.quiescers.get(quiescer)?.clone();
                let result = blocking(move || q.freeze(backup.as_str())).await;
                Some(Input::Froze { quiescer, result: result.map_err(|e| format!("{e:#}")) })
            }
            Effect::Disarm { backup, quiescer } => {
                let key = self.quiescers.get(quiescer)?.name().to_string();
                let _ = self
                    .with_armed(move |a| {
                        a.disarm(backup.as_str(), &key);
                        Ok(())
                    })
                    .await;
                Some(Input::Disarmed)
            }
            Effect::Release { backup } => {
                let released = self.with_armed(move |a| Ok(a.release(backup.as_str()))).await;
                Some(Input::Released(if released == Ok(Outcome::AlreadyThawed) {
                    Released::AlreadyThawed
                } else {
                    Released::Released
                }))
            }
            Effect::Thaw { backup, quiescer, thawed_elsewhere } => {
                let q = self.quiescers.get(quiescer)?.clone();
                // After a successful thaw (ours or the guardian's) the quiescer hands over what
                // a restore needs.
                let thawed = blocking(move || {
                    if thawed_elsewhere {
                        q.thawed_elsewhere(backup.as_str())?;
                    } else {
                        q.thaw(backup.as_str())?;
                    }
                    Ok(q.artifacts(backup.as_str()))
                })
                .await;
                let done = if thawed_elsewhere { "thawed by the guardian" } else { "" };
                let (result, artifacts) = match thawed {
                    Ok(artifacts) => (Ok(done.to_string()), artifacts),
                    Err(e) => (Err(format!("{e:#}")), Vec::new()),
                };
                Some(Input::Thawed { quiescer, result, artifacts })
            }
            Effect::Forget { backup } => {
                let _ = self
                    .with_armed(move |a| {
                        a.done(backup.as_str());
                        Ok(())
                    })
                    .await;
                Some(Input::Forgotten)
            }
            Effect::CheckProvider { .. } => {
                let (provider, volumes) = (self.provider.clone(), self.volumes.clone());
                let checked = blocking(move || provider.check(&volumes)).await;
                Some(Input::ProviderChecked(checked.map_err(|e| format!("{e:#}"))))
            }
            Effect::Snapshot { backup } => {
                let (provider, volumes) = (self.provider.clone(), self.volumes.clone());
                let created = blocking(move || provider.create(backup.as_str(), &volumes)).await;
                Some(Input::Snapshotted(
                    created
                        .map(|s| s.into_iter().map(snapshot_ref).collect())
                        .map_err(|e| format!("{e:#}")),
                ))
            }
            Effect::Delete { backup } => {
                let provider = self.provider.clone();
                let deleted = blocking(move || provider.delete(backup.as_str())).await;
                Some(Input::Deleted(deleted.map_err(|e| format!("{e:#}"))))
            }
            Effect::SetTimer { backup, at_ms } => {
                self.set_timer(backup, at_ms);
                None
            }
            Effect::CancelTimer { backup } => {
                if let Some(timer) = lock(&self.timers).remove(&backup) {
                    timer.abort();
                }
                None
            }
            Effect::StopCopy { backup } => {
                if let Some(stop) = lock(&self.copies).get(&backup) {
                    stop.store(true, Ordering::SeqCst);
                }
                None
            }
            Effect::CloseGuardian => {
                let _ = self
                    .with_armed(|a| {
                        a.close();
                        Ok(())
                    })
                    .await;
                Some(Input::GuardianClosed)
            }
            Effect::Log { level, text } => {
                match level {
                    Level::Info => info!("{text}"),
                    Level::Warn => warn!("{text}"),
                    Level::Error => error!("{text}"),
                }
                None
            }
            Effect::Reply { to, reply } => {
                if let Some((tx, _)) = lock(&self.waiting).remove(&to) {
                    let _ = tx.send(reply);
                }
                None
            }
        }
    }

    /// Arms quiescer `quiescer`'s thaw action for `backup` (journal, then guardian).
    async fn arm(
        &self,
        backup: &BackupId,
        quiescer: usize,
        lease_end_ms: u64,
    ) -> Result<(), String> {
        let Some(q) = self.quiescers.get(quiescer).cloned() else {
            return Err(format!("no quiescer {quiescer}"));
        };
        let id = backup.to_string();
        let Some(action) =
            blocking(move || q.thaw_action(&id)).await.map_err(|e| format!("{e:#}"))?
        else {
            return Ok(()); // nothing to arm
        };
        let deadline = self.origin + Duration::from_millis(lease_end_ms);
        let (id, key) = (backup.to_string(), self.quiescers[quiescer].name().to_string());
        self.with_armed(move |a| a.arm(&id, deadline, &key, action)).await
    }

    /// One task per frozen backup: at the lease's end it feeds the timer to the machine. It
    /// waits only on the clock, never on the network, and logs in a root span of its own.
    fn set_timer(self: &Arc<Self>, backup: BackupId, at_ms: u64) {
        let inner = self.clone();
        let span =
            tracing::info_span!(parent: None, "lease", backup = %backup, server = %self.server);
        let id = backup.clone();
        let task = async move {
            let wait = at_ms.saturating_sub(inner.now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let me = tokio::task::id();
            lock(&inner.timers).retain(|b, t| !(*b == id && t.id() == me));
            // Its own task: cancelling this timer must never cut an operation short.
            let input = Input::LeaseTimer { backup: id };
            tokio::spawn(async move { inner.feed(input).await }.instrument(Span::current()));
        };
        let timer = tokio::spawn(task.instrument(span)).abort_handle();
        if let Some(earlier) = lock(&self.timers).insert(backup, timer) {
            earlier.abort();
        }
    }
}

#[cfg(test)]
mod tests;
