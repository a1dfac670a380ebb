//! The agent's table of backups and the operations on it: Prepare, Commit, Abort, Cleanup,
//! the lease timer and the thaw on shutdown. One tokio mutex serializes every operation, so an
//! Abort racing a Commit has exactly one outcome; each operation runs in its own task, so a
//! dropped RPC never leaves a freeze half done. Each quiescer's thaw action is armed (journal and
//! guardian, see `armed`) before it freezes, and taken back before the agent thaws it itself.
//! A copy of committed snapshots holds them (`CopyHold`) so Abort and Cleanup delete only once
//! it has let go. No gRPC here: `service` maps requests to calls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use stillpoint_proto::{
    AbortResponse, AgentBackup, CleanupResponse, CommitResponse, PrepareResponse, Snapshot,
    StepReport,
};
use tokio::task::AbortHandle;
use tracing::{error, info, warn, Instrument};

use crate::armed::Armed;
use crate::guardian::Outcome;
use crate::lease::Lease;
use crate::quiesce::Quiescer;
use crate::snapshot::SnapshotProvider;
use crate::{Error, Result};

/// How many finished backups the table remembers, to answer late or duplicate requests.
pub const KEEP_FINISHED: usize = 100;

/// Where one backup stands on this agent; each variant holds only what is valid then.
enum Phase {
    /// Quiescers are running (only ever seen by Status: the operation holds the lock).
    Preparing,
    /// Every quiescer is frozen until Commit, Abort or the lease's end.
    Frozen {
        lease: Lease,
        held_from: Option<Instant>,
        timer: AbortHandle,
    },
    Snapshotted {
        snapshots: Vec<Snapshot>,
    },
    /// The lease ran out without a Commit; everything was thawed and nothing snapshotted.
    ThawedExpired {
        lease_ms: u64,
    },
    Aborted,
    Failed,
    Cleaned,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Frozen { .. } => "frozen",
            Phase::Snapshotted { .. } => "snapshotted",
            Phase::ThawedExpired { .. } => "thawed-expired",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
            Phase::Cleaned => "cleaned",
        }
    }

    fn is_active(&self) -> bool {
        matches!(self, Phase::Preparing | Phase::Frozen { .. })
    }
}

struct Entry {
    phase: Phase,
    /// Why it failed, was aborted or expired; shown by Status.
    detail: String,
    prepared: Option<PrepareResponse>,
    committed: Option<CommitResponse>,
    /// The copy reading this backup's snapshots, while one runs.
    copy: Option<CopyRun>,
    /// Abort or Cleanup has begun: no new copy may start reading what they will delete.
    closing: bool,
}

impl Entry {
    fn new(phase: Phase) -> Entry {
        Entry {
            phase,
            detail: String::new(),
            prepared: None,
            committed: None,
            copy: None,
            closing: false,
        }
    }
}

/// A running copy as the table sees it: Abort and Cleanup ask it to stop, then wait for it.
struct CopyRun {
    stop: Arc<AtomicBool>,
    /// Never sent on; closed when the copy's [`CopyHold`] is dropped.
    done: tokio::sync::watch::Receiver<()>,
}

/// Held by a running copy for as long as it reads a backup's snapshots: until it is dropped,
/// Abort and Cleanup of that backup wait instead of deleting them. Dropping it (the copy ended,
/// failed or panicked) lets them go on.
pub struct CopyHold {
    inner: Arc<Inner>,
    id: String,
    stop: Arc<AtomicBool>,
    _done: tokio::sync::watch::Sender<()>,
}

impl CopyHold {
    /// Set once Abort or Cleanup asked the copy to stop (the copier may set it too, when its
    /// caller went away); the copier polls it between volumes, as one volume's read cannot be
    /// interrupted.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

impl Drop for CopyHold {
    fn drop(&mut self) {
        let mut table = self.inner.table();
        if let Some((_, e)) = table.entries.iter_mut().find(|(b, _)| *b == self.id) {
            e.copy = None;
        }
        // `_done` drops after this, waking whoever waits to delete.
    }
}

/// Backups in the order they were first seen.
#[derive(Default)]
struct Table {
    entries: Vec<(String, Entry)>,
}

impl Table {
    fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|(b, _)| b == id).map(|(_, e)| e)
    }

    /// The entry for `id`, created in `phase` if it is not there.
    fn entry(&mut self, id: &str, phase: impl FnOnce() -> Phase) -> &mut Entry {
        let at = match self.entries.iter().position(|(b, _)| b == id) {
            Some(at) => at,
            None => {
                self.entries.push((id.to_string(), Entry::new(phase())));
                self.forget_old();
                self.entries.len() - 1
            }
        };
        &mut self.entries[at].1
    }

    fn set(&mut self, id: &str, phase: Phase, detail: String) -> &mut Entry {
        let entry = self.entry(id, || Phase::Preparing);
        entry.phase = phase;
        entry.detail = detail;
        entry
    }

    fn active(&self) -> Option<(&str, &Entry)> {
        self.entries.iter().find(|(_, e)| e.phase.is_active()).map(|(b, e)| (b.as_str(), e))
    }

    fn forget_old(&mut self) {
        while self.entries.len() > KEEP_FINISHED {
            match self.entries.iter().position(|(_, e)| !e.phase.is_active()) {
                Some(at) => drop(self.entries.remove(at)),
                None => break,
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
    /// Zero of the monotonic milliseconds that leases are measured in.
    origin: Instant,
    /// Held for the whole of every operation.
    ops: tokio::sync::Mutex<()>,
    /// Held only briefly, never across an await, so Status never waits on an operation.
    table: Mutex<Table>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn step(name: &str, action: &str, result: &anyhow::Result<String>, took: Duration) -> StepReport {
    let (ok, detail) = match result {
        Ok(detail) => (true, detail.clone()),
        Err(e) => (false, format!("{e:#}")),
    };
    StepReport { name: name.into(), action: action.into(), ok, duration_ms: ms(took), detail }
}

/// Runs a blocking plug-in call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("plug-in call died: {e}")))
}

fn not_prepared(reason: String) -> PrepareResponse {
    PrepareResponse { prepared: false, reason, ..PrepareResponse::default() }
}

fn not_committed(reason: String) -> CommitResponse {
    CommitResponse { committed: false, reason, ..CommitResponse::default() }
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
        Backups {
            inner: Arc::new(Inner {
                server: server.to_string(),
                volumes,
                quiescers,
                provider,
                armed: Arc::new(Mutex::new(armed)),
                origin: Instant::now(),
                ops: tokio::sync::Mutex::new(()),
                table: Mutex::new(Table::default()),
            }),
        }
    }

    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// Runs one operation in its own task under a span naming the backup and server, so that
    /// a caller who stops waiting does not cut it short.
    async fn run<T, F>(
        &self,
        op: &'static str,
        id: &str,
        f: impl FnOnce(Arc<Inner>) -> F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let span = tracing::info_span!("op", op, backup = %id, server = %self.inner.server);
        tokio::spawn(f(self.inner.clone()).instrument(span))
            .await
            .map_err(|e| Error::Internal(format!("{op} {id}: {e}")))?
    }

    /// Quiesces and freezes for `id` under a lease of `lease_ms` counted from now. Idempotent:
    /// a repeated Prepare gets the first one's reply.
    pub async fn prepare(&self, id: &str, lease_ms: u64) -> Result<PrepareResponse> {
        let arrived = self.inner.now_ms();
        let id_owned = id.to_string();
        self.run("prepare", id, move |inner| async move {
            Ok(inner.prepare(&id_owned, Lease::new(arrived, lease_ms)).await)
        })
        .await
    }

    /// Snapshots and thaws `id` if its lease still runs. Idempotent.
    /// Snapshots and thaws. `freeze_token`, when given, must name the freeze this agent holds
    /// for `id` (from its prepared reply); a Commit meant for another freeze is refused.
    pub async fn commit(&self, id: &str, freeze_token: Option<&str>) -> Result<CommitResponse> {
        let id_owned = id.to_string();
        let token = freeze_token.map(str::to_string);
        self.run("commit", id, move |inner| async move {
            Ok(inner.commit(&id_owned, token.as_deref()).await)
        })
        .await
    }

    /// Thaws and deletes whatever `id` holds. Idempotent; an unknown id is remembered as
    /// aborted so a late Prepare for it is refused.
    pub async fn abort(&self, id: &str, reason: &str) -> Result<AbortResponse> {
        let (id_owned, reason) = (id.to_string(), reason.to_string());
        self.run("abort", id, move |inner| async move { inner.abort(&id_owned, &reason).await })
            .await
    }

    /// Deletes `id`'s snapshots. Idempotent.
    pub async fn cleanup(&self, id: &str) -> Result<CleanupResponse> {
        let id_owned = id.to_string();
        self.run("cleanup", id, move |inner| async move { inner.cleanup(&id_owned).await }).await
    }

    /// Starts a copy of `id`'s snapshots: returns them and the hold that keeps Abort and
    /// Cleanup from deleting them while the copy reads. Only a committed backup whose
    /// snapshots still exist can be copied, by one copy at a time (a second is refused, not
    /// queued: the listener never runs two, so a second one is a mistake to report).
    pub fn begin_copy(&self, id: &str) -> Result<(Vec<Snapshot>, CopyHold)> {
        let server = &self.inner.server;
        // The table lock alone suffices: Abort and Cleanup mark the entry closing, and look
        // for a copy, under it too, so either this sees them or they see this copy.
        let mut table = self.inner.table();
        let Some((_, e)) = table.entries.iter_mut().find(|(b, _)| b == id) else {
            return Err(Error::NotFound(format!(
                "backup {id} is not held by agent {server}: it was never committed here, or the agent restarted since (its snapshots, if any, are left for the sweep)"
            )));
        };
        if e.copy.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "a copy of backup {id} is already running on agent {server}; refusing a second one"
            )));
        }
        let snapshots = match &e.phase {
            Phase::Snapshotted { .. } if e.closing => {
                return Err(Error::FailedPrecondition(format!(
                    "backup {id} on agent {server} is being aborted or cleaned up; its snapshots are going away"
                )))
            }
            Phase::Snapshotted { snapshots } => snapshots.clone(),
            Phase::Cleaned | Phase::Aborted => {
                return Err(Error::NotFound(format!(
                    "backup {id} on agent {server} is {}: its snapshots were deleted",
                    e.phase.name()
                )))
            }
            phase => {
                return Err(Error::FailedPrecondition(format!(
                    "backup {id} on agent {server} is {}: only a committed backup's snapshots can be copied",
                    phase.name()
                )))
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = tokio::sync::watch::channel(());
        e.copy = Some(CopyRun { stop: stop.clone(), done: done_rx });
        drop(table);
        let hold = CopyHold { inner: self.inner.clone(), id: id.to_string(), stop, _done: done_tx };
        Ok((snapshots, hold))
    }

    /// Every backup the table remembers, oldest first. Never waits on an operation.
    pub fn status(&self) -> Vec<AgentBackup> {
        let now = self.inner.now_ms();
        let table = self.inner.table();
        table
            .entries
            .iter()
            .map(|(id, e)| AgentBackup {
                backup_id: id.clone(),
                phase: e.phase.name().into(),
                lease_remaining_ms: match &e.phase {
                    Phase::Frozen { lease, .. } => lease.remaining(now),
                    _ => 0,
                },
                snapshots: match &e.phase {
                    Phase::Snapshotted { snapshots } => snapshots.clone(),
                    _ => Vec::new(),
                },
                detail: if e.copy.is_some() && e.detail.is_empty() {
                    "copying into the saveset repository".into()
                } else {
                    e.detail.clone()
                },
            })
            .collect()
    }

    /// Like [`Backups::status`], plus an "orphan" entry for every backup the provider holds
    /// snapshots of but the table does not know (e.g. from before a restart), so the listener
    /// can Abort them.
    pub async fn report(&self) -> Vec<AgentBackup> {
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
            if out.iter().any(|b| b.backup_id == backup && b.phase != "orphan") {
                continue;
            }
            match out.iter_mut().find(|b| b.backup_id == backup) {
                Some(b) => b.snapshots.push(snapshot),
                None => out.push(AgentBackup {
                    backup_id: backup,
                    phase: "orphan".into(),
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

    /// The guardian's pid, when it runs.
    pub async fn guardian_pid(&self) -> Option<u32> {
        self.inner.with_armed(|a| Ok(a.guardian_pid())).await.ok().flatten()
    }

    /// Thaws every frozen backup and marks it failed, then stops the guardian (each backup was
    /// released first, so it runs nothing twice); for the daemon's shutdown.
    pub async fn shutdown(&self) {
        let inner = self.inner.clone();
        let span = tracing::info_span!("shutdown", server = %inner.server);
        let _ = tokio::spawn(
            async move {
                inner.thaw_everything().await;
                let _ = inner
                    .with_armed(|a| {
                        a.close();
                        Ok(())
                    })
                    .await;
            }
            .instrument(span),
        )
        .await;
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        ms(self.origin.elapsed())
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the armed state off the async threads.
    async fn with_armed<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Armed) -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let armed = self.armed.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| f(&mut armed.lock().unwrap_or_else(|p| p.into_inner())))
        })
        .await
        .unwrap_or_else(|e| Err(format!("guardian call died: {e}")))
    }

    /// Arms quiescer `q`'s thaw action for `id` (journal, then guardian) before it freezes.
    async fn arm(&self, id: &str, lease: Lease, q: &Arc<dyn Quiescer>) -> anyhow::Result<String> {
        let (q2, id2) = (q.clone(), id.to_string());
        let Some(action) = blocking(move || q2.thaw_action(&id2)).await? else {
            return Ok("nothing to arm".into());
        };
        let deadline = self.origin + Duration::from_millis(lease.expires_at());
        let (id2, key) = (id.to_string(), q.name().to_string());
        let what = action.done(&key);
        self.with_armed(move |a| a.arm(&id2, deadline, &key, action))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(format!("armed: the guardian {what} if the agent cannot"))
    }

    async fn prepare(self: &Arc<Self>, id: &str, lease: Lease) -> PrepareResponse {
        let _ops = self.ops.lock().await;
        {
            let mut table = self.table();
            if let Some(e) = table.get(id) {
                return match (&e.phase, &e.prepared) {
                    (Phase::Frozen { .. } | Phase::Failed, Some(reply)) => reply.clone(),
                    (phase, _) => not_prepared(format!("backup {id} is already {}", phase.name())),
                };
            }
            if let Some((other, e)) = table.active() {
                let reason = format!("busy with backup {other} ({})", e.phase.name());
                warn!(%reason, "prepare refused");
                return not_prepared(reason);
            }
            table.entry(id, || Phase::Preparing);
        }
        if let Err(e) = self.with_armed(|a| a.ensure()).await {
            let reason = format!("no freeze guardian is running ({e}); refusing to freeze");
            warn!(%reason, "prepare refused");
            return self.fail_prepare(id, PrepareResponse::default(), reason);
        }
        info!(lease_ms = lease.duration_ms, "preparing");

        let mut reply = PrepareResponse::default();
        let mut held_from = None;
        for (k, q) in self.quiescers.iter().enumerate() {
            let started = Instant::now();
            let armed = self.arm(id, lease, q).await;
            if let Err(e) = armed {
                reply.steps.push(step(
                    q.name(),
                    "arm",
                    &Err(anyhow::anyhow!("{e:#}")),
                    started.elapsed(),
                ));
                let reason = format!("quiescer {}: {e:#}", q.name());
                warn!(quiescer = q.name(), %reason, "arming the thaw failed; not freezing");
                let (steps, _) = self.thaw(id, &self.quiescers[..k]).await;
                reply.steps.extend(steps);
                return self.fail_prepare(id, reply, reason);
            }
            let started = Instant::now();
            held_from.get_or_insert(started);
            let (q2, id2) = (q.clone(), id.to_string());
            let result = blocking(move || q2.freeze(&id2)).await;
            let took = started.elapsed();
            reply.quiesce_ms += ms(took);
            if q.freezes_filesystem() {
                reply.freeze_ms += ms(took);
            }
            reply.steps.push(step(q.name(), "freeze", &result, took));
            if let Err(e) = result {
                let reason = format!("quiescer {}: {e:#}", q.name());
                warn!(quiescer = q.name(), error = %format!("{e:#}"), "freeze failed; thawing the ones before it");
                // Its freeze did not happen (EBUSY: someone else's): never undo it.
                let (id2, key) = (id.to_string(), q.name().to_string());
                let _ = self
                    .with_armed(move |a| {
                        a.disarm(&id2, &key);
                        Ok(())
                    })
                    .await;
                let (steps, _) = self.thaw(id, &self.quiescers[..k]).await;
                reply.steps.extend(steps);
                return self.fail_prepare(id, reply, reason);
            }
        }
        let now = self.now_ms();
        if lease.expired(now) {
            let (steps, _) = self.thaw(id, &self.quiescers).await;
            reply.steps.extend(steps);
            let reason = format!(
                "lease of {}ms ran out while quiescing ({}ms); thawed",
                lease.duration_ms, reply.quiesce_ms
            );
            warn!(%reason, "prepare failed");
            return self.fail_prepare(id, reply, reason);
        }
        reply.prepared = true;
        reply.freeze_token = uuid::Uuid::new_v4().simple().to_string();
        let timer = self.start_lease_timer(id, lease);
        self.table().set(id, Phase::Frozen { lease, held_from, timer }, String::new()).prepared =
            Some(reply.clone());
        info!(
            quiesce_ms = reply.quiesce_ms,
            freeze_ms = reply.freeze_ms,
            lease_remaining_ms = lease.remaining(now),
            "frozen"
        );
        reply
    }

    fn fail_prepare(
        &self,
        id: &str,
        mut reply: PrepareResponse,
        reason: String,
    ) -> PrepareResponse {
        reply.prepared = false;
        reply.reason = reason.clone();
        self.table().set(id, Phase::Failed, reason).prepared = Some(reply.clone());
        reply
    }

    /// One task per frozen backup: when the lease runs out it thaws everything. It only waits
    /// on the clock and the operations lock, never on the network.
    fn start_lease_timer(self: &Arc<Self>, id: &str, lease: Lease) -> AbortHandle {
        let inner = self.clone();
        let id = id.to_string();
        let task = async move {
            let wait = lease.remaining(inner.now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let _ops = inner.ops.lock().await;
            if !matches!(inner.table().get(&id).map(|e| &e.phase), Some(Phase::Frozen { .. })) {
                return;
            }
            inner.expire(&id, lease).await;
        };
        tokio::spawn(task.instrument(tracing::Span::current())).abort_handle()
    }

    /// Thaws a frozen backup whose lease ran out. The caller holds the operations lock.
    async fn expire(&self, id: &str, lease: Lease) {
        let (steps, _) = self.thaw(id, &self.quiescers).await;
        let detail = format!("lease expired after {}ms without Commit; thawed", lease.duration_ms);
        warn!(lease_ms = lease.duration_ms, thaw_ok = steps.iter().all(|s| s.ok), "{detail}");
        self.table().set(id, Phase::ThawedExpired { lease_ms: lease.duration_ms }, detail);
    }

    /// Thaws `quiescers` in reverse order, every one even when some fail; returns the steps
    /// and the time it took.
    async fn thaw(&self, id: &str, quiescers: &[Arc<dyn Quiescer>]) -> (Vec<StepReport>, u64) {
        let all = Instant::now();
        let mut steps = Vec::new();
        // Take the actions back from the guardian first, so exactly one of us runs each.
        let id2 = id.to_string();
        let released = self.with_armed(move |a| Ok(a.release(&id2))).await;
        if released == Ok(Outcome::AlreadyThawed) {
            warn!("the guardian already thawed this backup when its lease ran out");
            for q in quiescers.iter().rev() {
                q.thawed_elsewhere(id);
                let by: anyhow::Result<String> = Ok("thawed by the guardian".into());
                steps.push(step(q.name(), "thaw", &by, Duration::ZERO));
            }
        }
        let todo = if released == Ok(Outcome::AlreadyThawed) { &[][..] } else { quiescers };
        for q in todo.iter().rev() {
            let started = Instant::now();
            let (q2, id2) = (q.clone(), id.to_string());
            let result = blocking(move || q2.thaw(&id2).map(|()| String::new())).await;
            if let Err(e) = &result {
                error!(quiescer = q.name(), error = %format!("{e:#}"), "thaw failed");
            }
            steps.push(step(q.name(), "thaw", &result, started.elapsed()));
        }
        let id2 = id.to_string();
        let _ = self
            .with_armed(move |a| {
                a.done(&id2);
                Ok(())
            })
            .await;
        (steps, ms(all.elapsed()))
    }

    async fn commit(&self, id: &str, freeze_token: Option<&str>) -> CommitResponse {
        let _ops = self.ops.lock().await;
        let now = self.now_ms();
        let (lease, held_from) = {
            let table = self.table();
            let Some(e) = table.get(id) else {
                return not_committed(format!("unknown backup {id}"));
            };
            let held = e.prepared.as_ref().map(|p| p.freeze_token.as_str()).unwrap_or("");
            if let Some(token) = freeze_token.filter(|t| *t != held) {
                // Safety across restarts: the listener's Commit belongs to a freeze this agent
                // no longer holds (it restarted and a late Prepare froze it again).
                return not_committed(format!(
                    "commit names freeze {token} of backup {id}, but this agent holds freeze {held}: it restarted since that prepare; refusing"
                ));
            }
            match &e.phase {
                Phase::Frozen { lease, held_from, timer } => {
                    // From here this operation thaws, whatever happens.
                    timer.abort();
                    (*lease, *held_from)
                }
                Phase::ThawedExpired { lease_ms } => {
                    return not_committed(format!(
                        "lease expired after {lease_ms}ms; thawed without a snapshot"
                    ))
                }
                phase => {
                    // A duplicate Commit gets the same answer, but snapshots only while they
                    // exist: after Cleanup or Abort they are gone and the answer is no.
                    if let Some(reply) = &e.committed {
                        if !reply.committed || matches!(phase, Phase::Snapshotted { .. }) {
                            return reply.clone();
                        }
                    }
                    let why =
                        if e.detail.is_empty() { String::new() } else { format!(": {}", e.detail) };
                    return not_committed(format!("backup {id} is {}{why}", phase.name()));
                }
            }
        };
        // The clock first: the timer task may not have run yet.
        if lease.expired(now) {
            self.expire(id, lease).await;
            return not_committed(format!(
                "lease expired after {}ms; thawed without a snapshot",
                lease.duration_ms
            ));
        }

        let started = Instant::now();
        let (provider, id2, volumes) =
            (self.provider.clone(), id.to_string(), self.volumes.clone());
        let created = blocking(move || provider.create(&id2, &volumes)).await;
        let snapshot_took = started.elapsed();
        // The guardian thaws no earlier than this lease's end: a snapshot that ended before it
        // was taken wholly while frozen; one that did not may hold writes made after a thaw.
        let outlived = lease.expired(self.now_ms());
        let detail = created
            .as_ref()
            .map(|s| format!("{} snapshot(s)", s.len()))
            .map_err(|e| anyhow::anyhow!("{e:#}"));
        let mut reply = CommitResponse {
            snapshot_ms: ms(snapshot_took),
            steps: vec![step(self.provider.kind(), "snapshot", &detail, snapshot_took)],
            ..CommitResponse::default()
        };
        let (steps, thaw_ms) = self.thaw(id, &self.quiescers).await;
        reply.steps.extend(steps);
        reply.thaw_ms = thaw_ms;
        reply.held_ms = held_from.map_or(0, |h| ms(h.elapsed()));

        if outlived {
            let reason = format!(
                "snapshot took {}ms and outlived the lease of {}ms; deleted",
                reply.snapshot_ms, lease.duration_ms
            );
            let started = Instant::now();
            let (provider, id2) = (self.provider.clone(), id.to_string());
            let deleted = blocking(move || provider.delete(&id2)).await;
            let deleted = deleted.map(|n| format!("deleted {n} snapshot(s)"));
            reply.steps.push(step(self.provider.kind(), "delete", &deleted, started.elapsed()));
            reply.reason = match &deleted {
                Ok(_) => reason,
                Err(d) => format!("{reason}, but deleting failed: {d:#}"),
            };
            warn!(reason = %reply.reason, "commit refused");
            self.table().set(id, Phase::Failed, reply.reason.clone()).committed =
                Some(reply.clone());
            return reply;
        }
        match created {
            Ok(snapshots) => {
                reply.committed = true;
                reply.snapshots = snapshots.clone();
                info!(
                    snapshot_ms = reply.snapshot_ms,
                    thaw_ms,
                    held_ms = reply.held_ms,
                    "snapshotted and thawed"
                );
                self.table().set(id, Phase::Snapshotted { snapshots }, String::new()).committed =
                    Some(reply.clone());
            }
            Err(e) => {
                let started = Instant::now();
                let (provider, id2) = (self.provider.clone(), id.to_string());
                let deleted = blocking(move || provider.delete(&id2)).await;
                let deleted = deleted.map(|n| format!("deleted {n} partial snapshot(s)"));
                reply.steps.push(step(self.provider.kind(), "delete", &deleted, started.elapsed()));
                reply.reason = match &deleted {
                    Ok(_) => format!("snapshot failed: {e:#}; thawed and deleted partial snapshots"),
                    Err(d) => format!("snapshot failed: {e:#}; thawed, but deleting partial snapshots failed too: {d:#}"),
                };
                warn!(reason = %reply.reason, "commit failed");
                self.table().set(id, Phase::Failed, reply.reason.clone()).committed =
                    Some(reply.clone());
            }
        }
        reply
    }

    /// The operations lock, once no copy reads `id`'s snapshots. A running copy is asked to
    /// stop (it stops at its next volume) and waited for without holding the lock, so other
    /// backups' operations and lease timers go on meanwhile; no new copy of `id` starts after.
    async fn ops_after_copy(&self, id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        loop {
            let ops = self.ops.lock().await;
            let running = {
                let mut table = self.table();
                table.entries.iter_mut().find(|(b, _)| b == id).and_then(|(_, e)| {
                    e.closing = true;
                    e.copy.as_ref().map(|c| {
                        c.stop.store(true, Ordering::SeqCst);
                        c.done.clone()
                    })
                })
            };
            let Some(mut done) = running else { return ops };
            drop(ops);
            info!("a copy is reading this backup's snapshots: asked it to stop, waiting before deleting");
            // Resolves (with an error) when the copy's hold is dropped.
            let _ = done.changed().await;
        }
    }

    async fn abort(&self, id: &str, reason: &str) -> Result<AbortResponse> {
        let _ops = self.ops_after_copy(id).await;
        let frozen = self.stop_timer(id);
        if frozen {
            self.thaw(id, &self.quiescers).await;
        }
        let deleted = self.delete(id).await;
        let mut table = self.table();
        let entry = table.entry(id, || Phase::Aborted);
        if !matches!(entry.phase, Phase::Cleaned) {
            entry.phase = Phase::Aborted;
            entry.detail = format!("aborted: {reason}");
        }
        let deleted = deleted?;
        info!(thawed = frozen, snapshots_deleted = deleted, %reason, "aborted");
        Ok(AbortResponse { thawed: frozen, snapshots_deleted: deleted })
    }

    async fn cleanup(&self, id: &str) -> Result<CleanupResponse> {
        let _ops = self.ops_after_copy(id).await;
        if self.stop_timer(id) {
            // Cleanup is not meant for a frozen backup, but never leave one frozen.
            warn!("cleanup of a frozen backup: thawing first");
            self.thaw(id, &self.quiescers).await;
        }
        let deleted = self.delete(id).await?;
        self.table().set(id, Phase::Cleaned, String::new());
        info!(snapshots_deleted = deleted, "cleaned up");
        Ok(CleanupResponse { snapshots_deleted: deleted })
    }

    /// Stops `id`'s lease timer if it is frozen; true when it was. The caller then thaws.
    fn stop_timer(&self, id: &str) -> bool {
        match self.table().get(id).map(|e| &e.phase) {
            Some(Phase::Frozen { timer, .. }) => {
                timer.abort();
                true
            }
            _ => false,
        }
    }

    async fn delete(&self, id: &str) -> Result<u32> {
        let (provider, id2) = (self.provider.clone(), id.to_string());
        blocking(move || provider.delete(&id2)).await.map_err(|e| {
            error!(error = %format!("{e:#}"), "delete snapshots failed");
            Error::Provider(format!("delete snapshots of backup {id}: {e:#}"))
        })
    }

    async fn thaw_everything(&self) {
        let _ops = self.ops.lock().await;
        let frozen: Vec<String> = {
            let table = self.table();
            table
                .entries
                .iter()
                .filter_map(|(id, e)| match &e.phase {
                    Phase::Frozen { timer, .. } => {
                        timer.abort();
                        Some(id.clone())
                    }
                    _ => None,
                })
                .collect()
        };
        for id in frozen {
            let (steps, _) = self.thaw(&id, &self.quiescers).await;
            warn!(backup = %id, thaw_ok = steps.iter().all(|s| s.ok), "agent shutting down while frozen; thawed");
            self.table().set(&id, Phase::Failed, "agent shut down while frozen; thawed".into());
        }
    }
}

#[cfg(test)]
mod tests;
