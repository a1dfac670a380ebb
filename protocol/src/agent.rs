//! The agent's decisions as a pure state machine: requests, the lease timer and the results of
//! plug-in calls in, effects (plug-in calls, timers, replies, log lines) out. No IO, no clock, no
//! randomness: `now` and each freeze's fresh token are inputs. `agent/src/backups.rs` executes
//! the effects; the simulation and the model check drive this same machine.
//!
//! One operation runs at a time, one plug-in effect at a time: the executor feeds each effect's
//! result back before the next is decided. Requests that arrive meanwhile wait in the machine.

use std::collections::VecDeque;
use std::fmt;

use crate::coordinator::{CommitReply, PrepareReply, ReleaseReply};
use crate::error::{Error, Result};
use crate::hold::Hold;
use crate::lease::Lease;
use crate::model::{check_artifacts, Artifact, Level, SnapshotRef, Step};

/// How many finished backups the agent remembers, to answer late or duplicate requests.
pub const KEEP_FINISHED: usize = 100;

fn valid_text(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// A backup's id as the listener made it (`20261202T210601Z-3fa9c1`): 1 to 128 of
/// `[A-Za-z0-9._:-]`, not starting with a dot (it names snapshots and journal entries).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackupId(String);

impl BackupId {
    pub fn parse(id: &str) -> Result<BackupId> {
        if valid_text(id) && !id.starts_with('.') {
            Ok(BackupId(id.to_string()))
        } else {
            Err(Error::InvalidBackupId(crate::text::clip(id, 64)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Names one freeze: the prepared reply carries it and Commit must present it back, so a
/// Commit meant for an earlier freeze (before a restart) is refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FreezeToken(String);

impl FreezeToken {
    pub fn parse(token: &str) -> Result<FreezeToken> {
        if valid_text(token) {
            Ok(FreezeToken(token.to_string()))
        } else {
            Err(Error::InvalidFreezeToken(crate::text::clip(token, 64)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FreezeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where one backup stands on this agent, as Status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Quiescers are freezing.
    Preparing,
    /// Every quiescer is frozen until Commit, Abort or the lease's end.
    Frozen,
    Snapshotted,
    /// Snapshotted and still frozen until Release (the thaw barrier) or the lease's end.
    Held,
    /// The lease ran out without a Commit; everything was thawed and nothing snapshotted.
    ThawedExpired,
    Aborted,
    Failed,
    Cleaned,
    /// Never in the machine's table: the executor reports snapshots the provider holds of a
    /// backup the agent does not know (from before a restart) so the listener aborts them.
    Orphan,
}

impl Phase {
    /// The lowercase name logs and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Frozen => "frozen",
            Phase::Snapshotted => "snapshotted",
            Phase::Held => "held",
            Phase::ThawedExpired => "thawed-expired",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
            Phase::Cleaned => "cleaned",
            Phase::Orphan => "orphan",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the machine knows about one quiescer (the executor owns the plug-in itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuiescerInfo {
    pub name: String,
    /// Its freeze time counts as the filesystem freeze in the prepared reply.
    pub freezes_filesystem: bool,
    /// What its freeze holds, and how stillpoint knows.
    pub hold: Hold,
}

/// Which request a reply answers; the executor picks them, unique among pending requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReqId(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Request {
    /// Quiesce and freeze under a lease counted from the request's arrival. `fresh_token`
    /// names the freeze if this request makes one. Refused before anything is armed or frozen
    /// when this agent's hold is below `require`.
    Prepare {
        backup: BackupId,
        lease_ms: u64,
        fresh_token: FreezeToken,
        require: Hold,
    },
    /// Snapshot and thaw; `token`, when given, must name the freeze this agent holds. With
    /// `hold_until_release` it stays frozen after the snapshot until Release or its lease's end.
    Commit {
        backup: BackupId,
        token: Option<FreezeToken>,
        hold_until_release: bool,
    },
    /// Thaw a backup held after its snapshot. Idempotent: a repeat gets the same answer.
    Release {
        backup: BackupId,
    },
    Abort {
        backup: BackupId,
        reason: String,
    },
    Cleanup {
        backup: BackupId,
    },
    /// A copy wants to read the snapshots; answered at once, never queued.
    BeginCopy {
        backup: BackupId,
    },
    /// The daemon stops: thaw everything frozen, then close the guardian.
    Shutdown,
}

/// How the guardian answered a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Released {
    /// The thaw actions are the agent's to run (or the guardian held none, or is gone).
    Released,
    /// The guardian already ran them when the lease ran out: do not thaw again.
    AlreadyThawed,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    Request {
        from: ReqId,
        request: Request,
    },
    /// The lease timer set by [`Effect::SetTimer`] fired.
    LeaseTimer {
        backup: BackupId,
    },
    /// The copy that [`Request::BeginCopy`] started let go of the snapshots.
    CopyEnded {
        backup: BackupId,
    },
    /// [`Effect::EnsureGuardian`]: Err says why no guardian runs.
    GuardianChecked(Result<(), String>),
    /// [`Effect::CheckProvider`]: Ok carries the provider's detail (empty: nothing to report),
    /// Err why the snapshots would not fit.
    ProviderChecked(Result<String, String>),
    Armed {
        quiescer: usize,
        result: Result<(), String>,
    },
    /// Ok carries the quiescer's detail.
    Froze {
        quiescer: usize,
        result: Result<String, String>,
    },
    Disarmed,
    Released(Released),
    /// `artifacts`: what the quiescer handed over after a successful thaw (none after a
    /// failed one).
    Thawed {
        quiescer: usize,
        result: Result<String, String>,
        artifacts: Vec<Artifact>,
    },
    /// [`Effect::Forget`] done.
    Forgotten,
    Snapshotted(Result<Vec<SnapshotRef>, String>),
    Deleted(Result<u32, String>),
    GuardianClosed,
}

/// Why a request was refused, as a caller matches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The agent does not hold what the request names.
    NotFound,
    /// The request cannot run in the backup's current state.
    FailedPrecondition,
    /// The snapshot provider failed where the request needs it.
    Provider,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Failure {
    pub kind: FailureKind,
    pub text: String,
}

impl Failure {
    fn new(kind: FailureKind, text: String) -> Failure {
        Failure { kind, text }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AbortReply {
    pub thawed: bool,
    pub snapshots_deleted: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reply {
    Prepared(PrepareReply),
    Committed(CommitReply),
    Release(Result<ReleaseReply, Failure>),
    Aborted(Result<AbortReply, Failure>),
    /// How many snapshots were deleted.
    CleanedUp(Result<u32, Failure>),
    /// The snapshots to copy; the copy now holds them until [`Input::CopyEnded`].
    CopyBegun(Result<Vec<SnapshotRef>, Failure>),
    ShutDown,
}

/// What started an operation, for the executor's spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    Request(ReqId),
    /// The lease timer: its lines belong to no request.
    LeaseTimer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Prepare,
    Commit,
    Release,
    Abort,
    Cleanup,
    Expire,
    Shutdown,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Prepare => "prepare",
            OpKind::Commit => "commit",
            OpKind::Release => "release",
            OpKind::Abort => "abort",
            OpKind::Cleanup => "cleanup",
            OpKind::Expire => "lease",
            OpKind::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Effect {
    /// An operation starts; the effects after it (up to the next `Begin`) are its own.
    Begin {
        op: OpKind,
        origin: Origin,
        backup: Option<BackupId>,
    },
    /// Make sure a guardian runs (respawn it if it died); answer [`Input::GuardianChecked`].
    EnsureGuardian,
    /// Ask the snapshot provider whether every volume's snapshot can be taken now (space,
    /// pools), before anything freezes; answer [`Input::ProviderChecked`].
    CheckProvider {
        backup: BackupId,
    },
    /// Journal and arm quiescer `quiescer`'s thaw action with the guardian, whose lease ends
    /// at `lease_end_ms` (agent clock); answer [`Input::Armed`].
    Arm {
        backup: BackupId,
        quiescer: usize,
        lease_end_ms: u64,
    },
    Freeze {
        backup: BackupId,
        quiescer: usize,
    },
    /// Forget quiescer `quiescer`'s armed action: its freeze did not happen and must never be
    /// undone. Answer [`Input::Disarmed`].
    Disarm {
        backup: BackupId,
        quiescer: usize,
    },
    /// Take the backup's actions back from the guardian before thawing; [`Input::Released`].
    Release {
        backup: BackupId,
    },
    /// Thaw one quiescer; with `thawed_elsewhere` only tell it the guardian already did.
    /// Answer [`Input::Thawed`].
    Thaw {
        backup: BackupId,
        quiescer: usize,
        thawed_elsewhere: bool,
    },
    /// The backup is thawed: clear its journal entries; answer [`Input::Forgotten`].
    Forget {
        backup: BackupId,
    },
    /// Snapshot every volume; answer [`Input::Snapshotted`].
    Snapshot {
        backup: BackupId,
    },
    /// Delete the backup's snapshots; answer [`Input::Deleted`].
    Delete {
        backup: BackupId,
    },
    /// Feed [`Input::LeaseTimer`] at `at_ms` (agent clock) unless cancelled.
    SetTimer {
        backup: BackupId,
        at_ms: u64,
    },
    CancelTimer {
        backup: BackupId,
    },
    /// Ask the running copy to stop at its next volume.
    StopCopy {
        backup: BackupId,
    },
    /// Stop the guardian for good; answer [`Input::GuardianClosed`].
    CloseGuardian,
    Log {
        level: Level,
        text: String,
    },
    Reply {
        to: ReqId,
        reply: Reply,
    },
}

/// One backup as Status reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackupStatus {
    pub backup: BackupId,
    pub phase: Phase,
    pub lease_remaining_ms: u64,
    pub snapshots: Vec<SnapshotRef>,
    /// Why it failed, was aborted or expired; or that a copy runs.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum State {
    Preparing,
    /// `held_from`: when the first quiescer began to freeze, if any did.
    Frozen {
        lease: Lease,
        held_from: Option<u64>,
    },
    Snapshotted {
        snapshots: Vec<SnapshotRef>,
    },
    /// Snapshotted but still frozen (the thaw barrier): the lease timer and the guardian
    /// still bound it.
    Held {
        lease: Lease,
        held_from: Option<u64>,
        snapshots: Vec<SnapshotRef>,
    },
    ThawedExpired {
        lease_ms: u64,
    },
    Aborted,
    Failed,
    Cleaned,
}

impl State {
    fn phase(&self) -> Phase {
        match self {
            State::Preparing => Phase::Preparing,
            State::Frozen { .. } => Phase::Frozen,
            State::Snapshotted { .. } => Phase::Snapshotted,
            State::Held { .. } => Phase::Held,
            State::ThawedExpired { .. } => Phase::ThawedExpired,
            State::Aborted => Phase::Aborted,
            State::Failed => Phase::Failed,
            State::Cleaned => Phase::Cleaned,
        }
    }

    fn is_active(&self) -> bool {
        matches!(self, State::Preparing | State::Frozen { .. } | State::Held { .. })
    }

    /// Quiescers are frozen: what Abort, Cleanup, the lease and shutdown must thaw.
    fn is_frozen(&self) -> bool {
        matches!(self, State::Frozen { .. } | State::Held { .. })
    }
}

/// A request (or a timer) waiting for the operation before it to end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Queued {
    /// When it arrived: a Prepare's lease counts from here.
    at: u64,
    origin: Origin,
    work: Pending,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Pending {
    Request(Request),
    Expire(BackupId),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Entry {
    id: BackupId,
    state: State,
    detail: String,
    prepared: Option<PrepareReply>,
    committed: Option<CommitReply>,
    /// How a backup held after its snapshot was thawed: Release's answer, or the lease's.
    released: Option<ReleaseReply>,
    /// A copy reads the snapshots.
    copying: bool,
    /// Abort or Cleanup has begun: no new copy may start reading what they will delete.
    closing: bool,
    /// Abort and Cleanup requests waiting for the copy to let go.
    parked: Vec<Queued>,
}

impl Entry {
    fn new(id: BackupId, state: State) -> Entry {
        Entry {
            id,
            state,
            detail: String::new(),
            prepared: None,
            committed: None,
            released: None,
            copying: false,
            closing: false,
            parked: Vec::new(),
        }
    }

    /// Once the snapshots are gone (cleaned up or aborted) their artifacts are of no use: they
    /// stop taking the agent's memory (up to 1 MiB for each backup remembered).
    fn drop_artifacts_once_gone(&mut self) {
        if matches!(self.state, State::Cleaned | State::Aborted) {
            if let Some(c) = &mut self.committed {
                c.artifacts.clear();
            }
            if let Some(r) = &mut self.released {
                r.artifacts.clear();
            }
        }
    }
}

/// Thawing quiescers `0..count` in reverse: release, thaw each, forget.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Thawing {
    count: usize,
    /// Quiescers still to thaw are `0..next`.
    next: usize,
    elsewhere: bool,
    started: u64,
    /// When the effect being waited for was emitted.
    since: u64,
    steps: Vec<Step>,
    stage: ThawStage,
    /// What the quiescers handed over so far, and why some could not be kept.
    kept: Kept,
    /// A quiescer's thaw itself failed (not only its artifacts refused).
    thaw_failed: bool,
}

/// The quiescers' artifacts of one thaw: those kept, and the first reason one was refused (then
/// the snapshot lacks a file its restore needs and the server's part fails).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Kept {
    artifacts: Vec<Artifact>,
    /// The quiescer whose artifacts were refused first, and why.
    refused: Option<(String, String)>,
}

impl Kept {
    /// The refusal as Release reports it: "quiescer pg: artifact ... is ..."; empty if none.
    fn refused_text(&self) -> String {
        self.refused.as_ref().map(|(q, e)| format!("quiescer {q}: {e}")).unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ThawStage {
    Releasing,
    Thawing,
    Forgetting,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Work {
    Prepare {
        lease: Lease,
        token: FreezeToken,
        reply: PrepareReply,
        held_from: Option<u64>,
        since: u64,
        stage: PrepareStage,
    },
    Commit {
        lease: Lease,
        held_from: Option<u64>,
        reply: CommitReply,
        since: u64,
        stage: CommitStage,
        /// Stay frozen after the snapshot until Release.
        hold: bool,
    },
    Release {
        lease: Lease,
        held_from: Option<u64>,
        snapshots: Vec<SnapshotRef>,
        /// The lease had run out when Release came: the barrier broke before it.
        late: bool,
    },
    Expire {
        lease: Lease,
    },
    Abort {
        reason: String,
        thawed: bool,
        stage: CloseStage,
    },
    Cleanup {
        stage: CloseStage,
    },
    Shutdown {
        /// Frozen backups still to thaw; the first is being thawed.
        frozen: Vec<BackupId>,
        closing: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PrepareStage {
    CheckingGuardian,
    /// The provider checks that the snapshots fit; nothing is armed or frozen yet.
    CheckingProvider,
    Arming(usize),
    Freezing(usize),
    /// Quiescer `k`'s freeze failed with `reason`; its armed action is being forgotten.
    Disarming(usize, String),
    /// Thawing after a failure with this reason.
    Failing(String),
    /// Thawing because the lease ran out while quiescing.
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CommitStage {
    /// The lease ran out before the snapshot: thawing.
    Expired,
    Snapshotting,
    /// Thawing after the snapshot, with its result and whether it outlived the lease.
    Thawing {
        created: Result<Vec<SnapshotRef>, String>,
        outlived: bool,
    },
    /// Deleting a snapshot that outlived the lease, or the partial snapshots of a failed one,
    /// or a snapshot whose quiescers' artifacts were refused (`refused`).
    Deleting {
        since: u64,
        failed: Option<String>,
        refused: Option<(String, String)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum CloseStage {
    Thawing,
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Running {
    origin: Origin,
    backup: Option<BackupId>,
    thaw: Option<Thawing>,
    work: Work,
}

/// The agent: every backup it remembers, the operation running and those waiting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Agent {
    server: String,
    quiescers: Vec<QuiescerInfo>,
    /// The snapshot provider's kind, for step reports.
    provider: String,
    /// In the order first seen.
    entries: Vec<Entry>,
    running: Option<Running>,
    queue: VecDeque<Queued>,
}

fn not_prepared(reason: String) -> PrepareReply {
    PrepareReply { prepared: false, reason, ..PrepareReply::default() }
}

fn not_committed(reason: String) -> CommitReply {
    CommitReply { committed: false, reason, ..CommitReply::default() }
}

fn step(name: &str, action: &str, result: &Result<String, String>, took: u64) -> Step {
    let (ok, detail) = match result {
        Ok(d) => (true, d.clone()),
        Err(e) => (false, e.clone()),
    };
    Step { name: name.into(), action: action.into(), ok, duration_ms: took, detail }
}

/// "the artifacts of quiescer pg were refused (artifact backup_label is ...)".
fn refused_text((quiescer, why): &(String, String)) -> String {
    format!("the artifacts of quiescer {quiescer} were refused ({why})")
}

fn log(out: &mut Vec<Effect>, level: Level, text: String) {
    out.push(Effect::Log { level, text });
}

impl Agent {
    /// An agent for `server` that freezes `quiescers` in order and snapshots with a provider
    /// of kind `provider`.
    pub fn new(server: &str, quiescers: Vec<QuiescerInfo>, provider: &str) -> Agent {
        Agent {
            server: server.to_string(),
            quiescers,
            provider: provider.to_string(),
            entries: Vec::new(),
            running: None,
            queue: VecDeque::new(),
        }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// Every backup the agent remembers, oldest first. Never waits on an operation.
    pub fn status(&self, now: u64) -> Vec<BackupStatus> {
        self.entries
            .iter()
            .map(|e| BackupStatus {
                backup: e.id.clone(),
                phase: e.state.phase(),
                lease_remaining_ms: match &e.state {
                    State::Frozen { lease, .. } | State::Held { lease, .. } => lease.remaining(now),
                    _ => 0,
                },
                snapshots: match &e.state {
                    State::Snapshotted { snapshots } | State::Held { snapshots, .. } => {
                        snapshots.clone()
                    }
                    _ => Vec::new(),
                },
                detail: if e.copying && e.detail.is_empty() {
                    "copying into the saveset repository".into()
                } else {
                    e.detail.clone()
                },
            })
            .collect()
    }

    /// The phase of `backup`, if the agent remembers it.
    pub fn phase(&self, backup: &BackupId) -> Option<Phase> {
        self.get(backup).map(|e| e.state.phase())
    }

    /// The backup frozen now (also one held after its snapshot), if any (at most one is).
    pub fn frozen(&self) -> Option<&BackupId> {
        self.entries.iter().find(|e| e.state.is_frozen()).map(|e| &e.id)
    }

    /// What this agent's quiescers hold when they all freeze: the strongest of them, or
    /// storage-only when it has none.
    pub fn hold(&self) -> Hold {
        Hold::strongest(self.quiescers.iter().map(|q| q.hold))
    }

    /// True while an operation runs: its next plug-in effect's result is awaited.
    pub fn busy(&self) -> bool {
        self.running.is_some()
    }

    /// The freeze token of `backup`'s freeze, once prepared.
    pub fn freeze_token(&self, backup: &BackupId) -> Option<&str> {
        let p = self.get(backup)?.prepared.as_ref()?;
        (!p.freeze_token.is_empty()).then_some(p.freeze_token.as_str())
    }

    /// Feeds one input at `now` (monotonic ms of this agent) and returns what to do.
    pub fn handle(&mut self, now: u64, input: Input) -> Vec<Effect> {
        let mut out = Vec::new();
        match input {
            Input::Request { from, request: Request::BeginCopy { backup } } => {
                let reply = Reply::CopyBegun(self.begin_copy(&backup));
                out.push(Effect::Reply { to: from, reply });
            }
            Input::Request { from, request } => self.queue.push_back(Queued {
                at: now,
                origin: Origin::Request(from),
                work: Pending::Request(request),
            }),
            Input::LeaseTimer { backup } => self.queue.push_back(Queued {
                at: now,
                origin: Origin::LeaseTimer,
                work: Pending::Expire(backup),
            }),
            Input::CopyEnded { backup } => {
                if let Some(e) = self.get_mut(&backup) {
                    e.copying = false;
                    let parked = std::mem::take(&mut e.parked);
                    self.queue.extend(parked);
                }
            }
            result => self.advance(now, result, &mut out),
        }
        while self.running.is_none() {
            let Some(next) = self.queue.pop_front() else { break };
            self.start(now, next, &mut out);
        }
        out
    }

    fn get(&self, id: &BackupId) -> Option<&Entry> {
        self.entries.iter().find(|e| e.id == *id)
    }

    fn get_mut(&mut self, id: &BackupId) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.id == *id)
    }

    /// The entry for `id`, created in `state` if it is not there.
    fn entry(&mut self, id: &BackupId, state: impl FnOnce() -> State) -> &mut Entry {
        let at = match self.entries.iter().position(|e| e.id == *id) {
            Some(at) => at,
            None => {
                self.entries.push(Entry::new(id.clone(), state()));
                self.forget_old();
                self.entries.len() - 1
            }
        };
        &mut self.entries[at]
    }

    fn set(&mut self, id: &BackupId, state: State, detail: String) -> &mut Entry {
        let e = self.entry(id, || State::Preparing);
        e.state = state;
        e.detail = detail;
        e.drop_artifacts_once_gone();
        e
    }

    /// Drops the oldest finished entries beyond [`KEEP_FINISHED`]; never one a copy or a
    /// waiting request still needs.
    fn forget_old(&mut self) {
        while self.entries.len() > KEEP_FINISHED {
            let old = self
                .entries
                .iter()
                .position(|e| !e.state.is_active() && !e.copying && e.parked.is_empty());
            match old {
                Some(at) => drop(self.entries.remove(at)),
                None => break,
            }
        }
    }

    fn begin_copy(&mut self, id: &BackupId) -> Result<Vec<SnapshotRef>, Failure> {
        let server = self.server.clone();
        let Some(e) = self.get_mut(id) else {
            return Err(Failure::new(FailureKind::NotFound, format!(
                "backup {id} is not held by agent {server}: it was never committed here, or the agent restarted since (its snapshots, if any, are left for the sweep)"
            )));
        };
        if e.copying {
            return Err(Failure::new(
                FailureKind::FailedPrecondition,
                format!(
                "a copy of backup {id} is already running on agent {server}; refusing a second one"
            ),
            ));
        }
        match &e.state {
            State::Snapshotted { .. } if e.closing => Err(Failure::new(
                FailureKind::FailedPrecondition,
                format!("backup {id} on agent {server} is being aborted or cleaned up; its snapshots are going away"),
            )),
            State::Snapshotted { snapshots } => {
                let snapshots = snapshots.clone();
                e.copying = true;
                Ok(snapshots)
            }
            State::Cleaned | State::Aborted => Err(Failure::new(
                FailureKind::NotFound,
                format!(
                    "backup {id} on agent {server} is {}: its snapshots were deleted",
                    e.state.phase()
                ),
            )),
            state => Err(Failure::new(
                FailureKind::FailedPrecondition,
                format!(
                    "backup {id} on agent {server} is {}: only a committed backup's snapshots can be copied",
                    state.phase()
                ),
            )),
        }
    }

    fn begin(&self, out: &mut Vec<Effect>, op: OpKind, q: &Queued, backup: Option<&BackupId>) {
        out.push(Effect::Begin { op, origin: q.origin, backup: backup.cloned() });
    }

    fn reply(&self, out: &mut Vec<Effect>, origin: Origin, reply: Reply) {
        if let Origin::Request(to) = origin {
            out.push(Effect::Reply { to, reply });
        }
    }

    fn run(&mut self, origin: Origin, backup: Option<&BackupId>, work: Work) {
        self.running = Some(Running { origin, backup: backup.cloned(), thaw: None, work });
    }

    /// Starts thawing quiescers `0..count` of the running operation's backup.
    fn thaw(&mut self, now: u64, count: usize, out: &mut Vec<Effect>) {
        let Some(r) = self.running.as_mut() else { return };
        let Some(backup) = r.backup.clone() else { return };
        r.thaw = Some(Thawing {
            count,
            next: count,
            elsewhere: false,
            started: now,
            since: now,
            steps: Vec::new(),
            stage: ThawStage::Releasing,
            kept: Kept::default(),
            thaw_failed: false,
        });
        out.push(Effect::Release { backup });
    }

    fn start(&mut self, now: u64, q: Queued, out: &mut Vec<Effect>) {
        match q.work.clone() {
            Pending::Expire(backup) => self.start_expire(now, &q, &backup, out),
            Pending::Request(Request::Prepare { backup, lease_ms, fresh_token, require }) => {
                let lease = Lease::new(q.at, lease_ms);
                self.start_prepare(now, &q, &backup, (lease, fresh_token, require), out)
            }
            Pending::Request(Request::Commit { backup, token, hold_until_release }) => {
                self.start_commit(now, &q, &backup, token, hold_until_release, out)
            }
            Pending::Request(Request::Release { backup }) => {
                self.start_release(now, &q, &backup, out)
            }
            Pending::Request(Request::Abort { backup, reason }) => {
                if self.parked_for_copy(&q, &backup, out) {
                    return;
                }
                self.begin(out, OpKind::Abort, &q, Some(&backup));
                let work = Work::Abort { reason, thawed: false, stage: CloseStage::Deleting };
                self.start_close(now, &q, &backup, work, out);
            }
            Pending::Request(Request::Cleanup { backup }) => {
                if self.parked_for_copy(&q, &backup, out) {
                    return;
                }
                self.begin(out, OpKind::Cleanup, &q, Some(&backup));
                self.start_close(
                    now,
                    &q,
                    &backup,
                    Work::Cleanup { stage: CloseStage::Deleting },
                    out,
                );
            }
            Pending::Request(Request::Shutdown) => {
                self.begin(out, OpKind::Shutdown, &q, None);
                let frozen: Vec<BackupId> = self
                    .entries
                    .iter()
                    .filter(|e| e.state.is_frozen())
                    .map(|e| e.id.clone())
                    .collect();
                for id in &frozen {
                    out.push(Effect::CancelTimer { backup: id.clone() });
                }
                self.run(q.origin, None, Work::Shutdown { frozen, closing: false });
                self.shutdown_next(now, out);
            }
            Pending::Request(Request::BeginCopy { backup }) => {
                // Never queued (handled on arrival); answered here all the same.
                let reply = Reply::CopyBegun(self.begin_copy(&backup));
                self.reply(out, q.origin, reply);
            }
        }
    }

    fn start_expire(&mut self, now: u64, q: &Queued, backup: &BackupId, out: &mut Vec<Effect>) {
        let lease = match self.get(backup).map(|e| &e.state) {
            Some(State::Frozen { lease, .. } | State::Held { lease, .. }) => *lease,
            _ => return, // committed, released, aborted or thawed meanwhile
        };
        if !lease.expired(now) {
            out.push(Effect::SetTimer { backup: backup.clone(), at_ms: lease.expires_at() });
            return;
        }
        self.begin(out, OpKind::Expire, q, Some(backup));
        self.run(q.origin, Some(backup), Work::Expire { lease });
        let n = self.quiescers.len();
        self.thaw(now, n, out);
    }

    fn start_prepare(
        &mut self,
        now: u64,
        q: &Queued,
        id: &BackupId,
        (lease, token, require): (Lease, FreezeToken, Hold),
        out: &mut Vec<Effect>,
    ) {
        if let Some(e) = self.get(id) {
            let reply = match (&e.state, &e.prepared) {
                (State::Frozen { .. } | State::Failed, Some(reply)) => reply.clone(),
                (state, _) => not_prepared(format!("backup {id} is already {}", state.phase())),
            };
            self.reply(out, q.origin, Reply::Prepared(reply));
            return;
        }
        let hold = self.hold();
        if hold < require {
            // Fail closed, before anything is armed or frozen: never a silent downgrade.
            let reason = format!(
                "agent {} holds writes only by {hold} ({}); the group requires {require}: refusing before freezing anything",
                self.server,
                hold.explain()
            );
            self.begin(out, OpKind::Prepare, q, Some(id));
            log(out, Level::Warn, format!("prepare refused: {reason}"));
            let reply = PrepareReply { hold: Some(hold), ..not_prepared(reason) };
            self.reply(out, q.origin, Reply::Prepared(reply));
            return;
        }
        if let Some(other) = self.entries.iter().find(|e| e.state.is_active()) {
            let reason = format!("busy with backup {} ({})", other.id, other.state.phase());
            self.begin(out, OpKind::Prepare, q, Some(id));
            log(out, Level::Warn, format!("prepare refused: {reason}"));
            self.reply(out, q.origin, Reply::Prepared(not_prepared(reason)));
            return;
        }
        self.begin(out, OpKind::Prepare, q, Some(id));
        self.entry(id, || State::Preparing);
        let work = Work::Prepare {
            lease,
            token,
            reply: PrepareReply::default(),
            held_from: None,
            since: now,
            stage: PrepareStage::CheckingGuardian,
        };
        self.run(q.origin, Some(id), work);
        out.push(Effect::EnsureGuardian);
    }

    fn start_commit(
        &mut self,
        now: u64,
        q: &Queued,
        id: &BackupId,
        token: Option<FreezeToken>,
        hold: bool,
        out: &mut Vec<Effect>,
    ) {
        let refuse = |this: &Self, out: &mut Vec<Effect>, reply: CommitReply| {
            this.reply(out, q.origin, Reply::Committed(reply));
        };
        let Some(e) = self.get(id) else {
            return refuse(self, out, not_committed(format!("unknown backup {id}")));
        };
        let held = e.prepared.as_ref().map(|p| p.freeze_token.as_str()).unwrap_or("");
        if let Some(token) = token.filter(|t| t.as_str() != held) {
            // Safety across restarts: the listener's Commit belongs to a freeze this agent no
            // longer holds (it restarted and a late Prepare froze it again).
            return refuse(self, out, not_committed(format!(
                "commit names freeze {token} of backup {id}, but this agent holds freeze {held}: it restarted since that prepare; refusing"
            )));
        }
        let (lease, held_from) = match &e.state {
            State::Frozen { lease, held_from } => (*lease, *held_from),
            State::ThawedExpired { lease_ms } => {
                return refuse(
                    self,
                    out,
                    not_committed(format!(
                        "lease expired after {lease_ms}ms; thawed without a snapshot"
                    )),
                )
            }
            state => {
                // A duplicate Commit gets the same answer, but snapshots only while they
                // exist: after Cleanup or Abort they are gone and the answer is no.
                if let Some(reply) = &e.committed {
                    let exist = matches!(state, State::Snapshotted { .. } | State::Held { .. });
                    if !reply.committed || exist {
                        return refuse(self, out, reply.clone());
                    }
                }
                let why =
                    if e.detail.is_empty() { String::new() } else { format!(": {}", e.detail) };
                let reply = not_committed(format!("backup {id} is {}{why}", state.phase()));
                return refuse(self, out, reply);
            }
        };
        self.begin(out, OpKind::Commit, q, Some(id));
        // From here this operation thaws, whatever happens.
        out.push(Effect::CancelTimer { backup: id.clone() });
        let reply = CommitReply::default();
        // The clock first: the timer may not have fired yet.
        if lease.expired(now) {
            let stage = CommitStage::Expired;
            let work = Work::Commit { lease, held_from, reply, since: now, stage, hold };
            self.run(q.origin, Some(id), work);
            let n = self.quiescers.len();
            self.thaw(now, n, out);
            return;
        }
        let stage = CommitStage::Snapshotting;
        let work = Work::Commit { lease, held_from, reply, since: now, stage, hold };
        self.run(q.origin, Some(id), work);
        out.push(Effect::Snapshot { backup: id.clone() });
    }

    fn start_release(&mut self, now: u64, q: &Queued, id: &BackupId, out: &mut Vec<Effect>) {
        let server = self.server.clone();
        let answer = match self.get(id) {
            None => Err(Failure::new(FailureKind::NotFound, format!(
                "backup {id} is not held by agent {server}: it was never committed here, or the agent restarted since"
            ))),
            Some(Entry { state: State::Held { lease, held_from, snapshots }, .. }) => {
                let work = Work::Release {
                    lease: *lease,
                    held_from: *held_from,
                    snapshots: snapshots.clone(),
                    late: lease.expired(now),
                };
                self.begin(out, OpKind::Release, q, Some(id));
                out.push(Effect::CancelTimer { backup: id.clone() });
                self.run(q.origin, Some(id), work);
                let n = self.quiescers.len();
                self.thaw(now, n, out);
                return;
            }
            Some(Entry { released: Some(reply), .. }) => Ok(reply.clone()),
            Some(Entry { state: State::Snapshotted { .. }, .. }) => Ok(ReleaseReply {
                reason: format!("backup {id} was committed without hold_until_release: it thawed right after its own snapshot"),
                ..ReleaseReply::default()
            }),
            Some(e) => {
                let why = if e.detail.is_empty() { String::new() } else { format!(": {}", e.detail) };
                Err(Failure::new(
                    FailureKind::FailedPrecondition,
                    format!("backup {id} on agent {server} is {}{why}: nothing held to release", e.state.phase()),
                ))
            }
        };
        self.reply(out, q.origin, Reply::Release(answer));
    }

    /// Parks an Abort or Cleanup while a copy reads the snapshots: the copy is asked to stop
    /// and no new one may start; the request runs again once it let go. True when parked.
    fn parked_for_copy(&mut self, q: &Queued, id: &BackupId, out: &mut Vec<Effect>) -> bool {
        let Some(e) = self.get_mut(id) else { return false };
        e.closing = true;
        if !e.copying {
            return false;
        }
        e.parked.push(q.clone());
        out.push(Effect::StopCopy { backup: id.clone() });
        log(
            out,
            Level::Info,
            format!("backup {id}: a copy is reading its snapshots: asked it to stop, waiting before deleting"),
        );
        true
    }

    fn start_close(
        &mut self,
        now: u64,
        q: &Queued,
        id: &BackupId,
        work: Work,
        out: &mut Vec<Effect>,
    ) {
        let frozen = self.get(id).is_some_and(|e| e.state.is_frozen());
        let work = match work {
            Work::Abort { reason, .. } => {
                Work::Abort { reason, thawed: frozen, stage: CloseStage::Thawing }
            }
            other => other,
        };
        let cleanup = matches!(work, Work::Cleanup { .. });
        self.run(q.origin, Some(id), work);
        if frozen {
            if cleanup {
                // Cleanup is not meant for a frozen backup, but never leave one frozen.
                log(out, Level::Warn, "cleanup of a frozen backup: thawing first".into());
            }
            out.push(Effect::CancelTimer { backup: id.clone() });
            let n = self.quiescers.len();
            self.thaw(now, n, out);
        } else {
            self.set_close_stage(CloseStage::Deleting);
            out.push(Effect::Delete { backup: id.clone() });
        }
    }

    fn set_close_stage(&mut self, to: CloseStage) {
        if let Some(r) = self.running.as_mut() {
            match &mut r.work {
                Work::Abort { stage, .. } | Work::Cleanup { stage } => *stage = to,
                _ => {}
            }
        }
    }

    /// Thaws the next frozen backup on shutdown, or closes the guardian once none is left.
    fn shutdown_next(&mut self, now: u64, out: &mut Vec<Effect>) {
        let Some(r) = self.running.as_mut() else { return };
        let Work::Shutdown { frozen, closing } = &mut r.work else { return };
        match frozen.first().cloned() {
            Some(id) => {
                r.backup = Some(id);
                let n = self.quiescers.len();
                self.thaw(now, n, out);
            }
            None => {
                *closing = true;
                r.backup = None;
                out.push(Effect::CloseGuardian);
            }
        }
    }

    /// Feeds one effect's result to the running operation.
    fn advance(&mut self, now: u64, input: Input, out: &mut Vec<Effect>) {
        let Some(running) = self.running.as_ref() else { return };
        if running.thaw.is_some() {
            self.advance_thaw(now, input, out);
            return;
        }
        let Some(id) = running.backup.clone() else {
            if let (Work::Shutdown { closing: true, .. }, Input::GuardianClosed) =
                (&running.work, &input)
            {
                let origin = running.origin;
                self.running = None;
                self.reply(out, origin, Reply::ShutDown);
            }
            return;
        };
        match running.work.clone() {
            Work::Prepare { .. } => self.advance_prepare(now, &id, input, out),
            Work::Commit { .. } => self.advance_commit(now, &id, input, out),
            Work::Abort { reason, thawed, stage: CloseStage::Deleting } => {
                let Input::Deleted(deleted) = input else { return };
                let origin = running.origin;
                self.running = None;
                let e = self.entry(&id, || State::Aborted);
                if !matches!(e.state, State::Cleaned) {
                    e.state = State::Aborted;
                    e.detail = format!("aborted: {reason}");
                }
                e.drop_artifacts_once_gone();
                let reply = match deleted {
                    Ok(n) => {
                        log(
                            out,
                            Level::Info,
                            format!("aborted ({reason}): thawed={thawed}, {n} snapshot(s) deleted"),
                        );
                        Ok(AbortReply { thawed, snapshots_deleted: n })
                    }
                    Err(e) => Err(self.delete_failed(&id, &e, out)),
                };
                self.reply(out, origin, Reply::Aborted(reply));
            }
            Work::Cleanup { stage: CloseStage::Deleting } => {
                let Input::Deleted(deleted) = input else { return };
                let origin = running.origin;
                self.running = None;
                let reply = match deleted {
                    Ok(n) => {
                        self.set(&id, State::Cleaned, String::new());
                        log(out, Level::Info, format!("cleaned up: {n} snapshot(s) deleted"));
                        Ok(n)
                    }
                    Err(e) => Err(self.delete_failed(&id, &e, out)),
                };
                self.reply(out, origin, Reply::CleanedUp(reply));
            }
            _ => {}
        }
    }

    fn delete_failed(&self, id: &BackupId, e: &str, out: &mut Vec<Effect>) -> Failure {
        log(out, Level::Error, format!("delete snapshots failed: {e}"));
        Failure::new(FailureKind::Provider, format!("delete snapshots of backup {id}: {e}"))
    }

    fn advance_thaw(&mut self, now: u64, input: Input, out: &mut Vec<Effect>) {
        let Some(r) = self.running.as_mut() else { return };
        let Some(backup) = r.backup.clone() else { return };
        let Some(t) = r.thaw.as_mut() else { return };
        match (t.stage, input) {
            (ThawStage::Releasing, Input::Released(released)) => {
                t.elsewhere = released == Released::AlreadyThawed;
                if t.elsewhere {
                    log(
                        out,
                        Level::Warn,
                        "the guardian already thawed this backup when its lease ran out".into(),
                    );
                }
                t.stage = ThawStage::Thawing;
            }
            (ThawStage::Thawing, Input::Thawed { quiescer, result, mut artifacts })
                if quiescer + 1 == t.next =>
            {
                t.next -= 1;
                let took = if t.elsewhere { 0 } else { now.saturating_sub(t.since) };
                let name = &self.quiescers[quiescer].name;
                if let Err(e) = &result {
                    t.thaw_failed = true;
                    log(out, Level::Error, format!("thaw of quiescer {name} failed: {e}"));
                }
                // The machine knows who handed them over.
                for a in &mut artifacts {
                    a.quiescer.clone_from(name);
                }
                let result = match (result, check_artifacts(&t.kept.artifacts, &artifacts)) {
                    (Ok(detail), Ok(())) => {
                        let said = artifacts.iter().map(Artifact::describe).collect::<Vec<_>>();
                        t.kept.artifacts.extend(artifacts);
                        Ok(match (detail.is_empty(), said.is_empty()) {
                            (_, true) => detail,
                            (true, false) => format!("artifacts: {}", said.join(", ")),
                            (false, false) => format!("{detail}; artifacts: {}", said.join(", ")),
                        })
                    }
                    (Ok(_), Err(e)) => {
                        log(
                            out,
                            Level::Error,
                            format!("thawed, but refused the artifacts of quiescer {name}: {e}"),
                        );
                        let text = format!(
                            "thawed, but its artifacts were refused ({e}): the backup would lack a file its restore needs"
                        );
                        t.kept.refused.get_or_insert((name.clone(), e));
                        Err(text)
                    }
                    (Err(e), _) => Err(e),
                };
                t.steps.push(step(name, "thaw", &result, took));
            }
            (ThawStage::Forgetting, Input::Forgotten) => {
                let Some(t) = r.thaw.take() else { return };
                self.thawed(now, t, out);
                return;
            }
            _ => return, // not what this thaw waits for
        }
        if t.next > 0 {
            t.since = now;
            let quiescer = t.next - 1;
            out.push(Effect::Thaw { backup, quiescer, thawed_elsewhere: t.elsewhere });
        } else {
            t.stage = ThawStage::Forgetting;
            out.push(Effect::Forget { backup });
        }
    }

    /// A thaw of the running operation's backup ended: its steps, what the quiescers handed
    /// over, and whether the guardian had thawed first (the lease ran out).
    fn thawed(&mut self, now: u64, t: Thawing, out: &mut Vec<Effect>) {
        let Some(r) = self.running.as_mut() else { return };
        let Some(id) = r.backup.clone() else { return };
        let origin = r.origin;
        let thaw_ms = now.saturating_sub(t.started);
        // Refused artifacts fail their thaw step, but the thaw itself went through.
        let (steps, kept, elsewhere, thaw_ok) = (t.steps, t.kept, t.elsewhere, !t.thaw_failed);
        match &mut r.work {
            Work::Prepare { lease, reply, stage, .. } => {
                reply.steps.extend(steps);
                let mut reply = std::mem::take(reply);
                let reason = match stage {
                    PrepareStage::Failing(reason) => std::mem::take(reason),
                    _ => {
                        let reason = format!(
                            "lease of {}ms ran out while quiescing ({}ms); thawed",
                            lease.duration_ms, reply.quiesce_ms
                        );
                        log(out, Level::Warn, format!("prepare failed: {reason}"));
                        reason
                    }
                };
                self.running = None;
                reply.prepared = false;
                reply.reason = reason.clone();
                self.set(&id, State::Failed, reason).prepared = Some(reply.clone());
                self.reply(out, origin, Reply::Prepared(reply));
            }
            Work::Commit { lease, held_from, reply, stage, .. } => {
                reply.steps.extend(steps);
                reply.thaw_ms = thaw_ms;
                reply.held_ms = held_from.map_or(0, |h| now.saturating_sub(h));
                let lease = *lease;
                match std::mem::replace(stage, CommitStage::Expired) {
                    CommitStage::Expired => {
                        self.running = None;
                        self.expired(&id, lease, thaw_ok, out);
                        let reason = format!(
                            "lease expired after {}ms; thawed without a snapshot",
                            lease.duration_ms
                        );
                        self.reply(out, origin, Reply::Committed(not_committed(reason)));
                    }
                    CommitStage::Thawing { created, outlived } => {
                        if outlived || created.is_err() || kept.refused.is_some() {
                            // A snapshot without the files its restore needs is no backup.
                            *stage = CommitStage::Deleting {
                                since: now,
                                failed: created.err().filter(|_| !outlived),
                                refused: kept.refused.filter(|_| !outlived),
                            };
                            out.push(Effect::Delete { backup: id });
                            return;
                        }
                        let snapshots = created.unwrap_or_default();
                        let mut reply = std::mem::take(reply);
                        self.running = None;
                        reply.committed = true;
                        reply.snapshots = snapshots.clone();
                        reply.artifacts = kept.artifacts;
                        log(
                            out,
                            Level::Info,
                            format!(
                                "snapshotted and thawed: snapshot {}ms, thaw {}ms, held {}ms",
                                reply.snapshot_ms, reply.thaw_ms, reply.held_ms
                            ),
                        );
                        self.set(&id, State::Snapshotted { snapshots }, String::new()).committed =
                            Some(reply.clone());
                        self.reply(out, origin, Reply::Committed(reply));
                    }
                    other => *stage = other,
                }
            }
            Work::Expire { lease } => {
                let lease = *lease;
                self.running = None;
                if let Some(State::Held { held_from, snapshots, .. }) =
                    self.get(&id).map(|e| e.state.clone())
                {
                    // The barrier broke: thawed before Release. The snapshot was taken while
                    // frozen, so it stays; Release will hear that it was not held.
                    let reason = format!(
                        "lease of {}ms ran out before release; thawed (thaw ok: {thaw_ok}), the snapshot taken while frozen is kept",
                        lease.duration_ms
                    );
                    log(out, Level::Warn, format!("thaw barrier broken: {reason}"));
                    // Kept in the entry until Release reports them.
                    let released = ReleaseReply {
                        held_until_release: false,
                        reason: reason.clone(),
                        held_ms: held_from.map_or(0, |h| now.saturating_sub(h)),
                        thaw_ms,
                        steps,
                        artifacts_refused: kept.refused_text(),
                        artifacts: kept.artifacts,
                    };
                    self.set(&id, State::Snapshotted { snapshots }, reason).released =
                        Some(released);
                    return;
                }
                self.expired(&id, lease, thaw_ok, out);
            }
            Work::Release { lease, held_from, snapshots, late } => {
                let (lease, snapshots) = (*lease, std::mem::take(snapshots));
                let held = !*late && !elsewhere;
                // Thawed by the guardian at the lease's end, at the latest.
                let until = if held { now } else { now.min(lease.expires_at()) };
                let reason = if held {
                    String::new()
                } else {
                    format!(
                        "lease of {}ms ran out before release; thawed then, not at release",
                        lease.duration_ms
                    )
                };
                let reply = ReleaseReply {
                    held_until_release: held,
                    reason: reason.clone(),
                    held_ms: held_from.map_or(0, |h| until.saturating_sub(h)),
                    thaw_ms,
                    steps,
                    artifacts_refused: kept.refused_text(),
                    artifacts: kept.artifacts,
                };
                self.running = None;
                if held {
                    log(
                        out,
                        Level::Info,
                        format!(
                            "released and thawed: held {}ms until every snapshot existed, thaw {}ms",
                            reply.held_ms, reply.thaw_ms
                        ),
                    );
                } else {
                    log(out, Level::Warn, format!("release came too late: {reason}"));
                }
                self.set(&id, State::Snapshotted { snapshots }, reason).released =
                    Some(reply.clone());
                self.reply(out, origin, Reply::Release(Ok(reply)));
            }
            Work::Abort { stage, .. } | Work::Cleanup { stage } => {
                *stage = CloseStage::Deleting;
                out.push(Effect::Delete { backup: id });
            }
            Work::Shutdown { frozen, .. } => {
                frozen.retain(|b| *b != id);
                log(
                    out,
                    Level::Warn,
                    format!("backup {id}: agent shutting down while frozen; thawed (thaw ok: {thaw_ok})"),
                );
                self.set(&id, State::Failed, "agent shut down while frozen; thawed".into());
                self.shutdown_next(now, out);
            }
        }
    }

    /// Marks a frozen backup whose lease ran out as thawed-expired.
    fn expired(&mut self, id: &BackupId, lease: Lease, thaw_ok: bool, out: &mut Vec<Effect>) {
        let detail = format!("lease expired after {}ms without Commit; thawed", lease.duration_ms);
        log(out, Level::Warn, format!("{detail} (thaw ok: {thaw_ok})"));
        self.set(id, State::ThawedExpired { lease_ms: lease.duration_ms }, detail);
    }

    fn advance_prepare(&mut self, now: u64, id: &BackupId, input: Input, out: &mut Vec<Effect>) {
        let n = self.quiescers.len();
        let Some(r) = self.running.as_mut() else { return };
        let origin = r.origin;
        let Work::Prepare { lease, token, reply, held_from, since, stage } = &mut r.work else {
            return;
        };
        match (stage.clone(), input) {
            (PrepareStage::CheckingGuardian, Input::GuardianChecked(Err(e))) => {
                let reason = format!("no freeze guardian is running ({e}); refusing to freeze");
                self.running = None;
                log(out, Level::Warn, format!("prepare refused: {reason}"));
                let reply = not_prepared(reason.clone());
                self.set(id, State::Failed, reason).prepared = Some(reply.clone());
                self.reply(out, origin, Reply::Prepared(reply));
                return;
            }
            (PrepareStage::CheckingGuardian, Input::GuardianChecked(Ok(()))) => {
                log(
                    out,
                    Level::Info,
                    format!("preparing under a lease of {}ms", lease.duration_ms),
                );
                *stage = PrepareStage::CheckingProvider;
                *since = now;
                out.push(Effect::CheckProvider { backup: id.clone() });
                return;
            }
            (PrepareStage::CheckingProvider, Input::ProviderChecked(result)) => {
                let took = now.saturating_sub(*since);
                let provider = self.provider.clone();
                match result {
                    Ok(detail) if detail.is_empty() => {}
                    Ok(detail) => {
                        log(out, Level::Info, format!("snapshot provider {provider}: {detail}"));
                        reply.steps.push(step(&provider, "check", &Ok(detail), took));
                    }
                    Err(e) => {
                        // Refused before anything is armed or frozen: nothing to undo.
                        reply.steps.push(step(&provider, "check", &Err(e.clone()), took));
                        let reason = format!(
                            "snapshot provider {provider}: {e}; refusing before freezing anything"
                        );
                        log(out, Level::Warn, format!("prepare refused: {reason}"));
                        let mut reply = std::mem::take(reply);
                        self.running = None;
                        reply.prepared = false;
                        reply.reason = reason.clone();
                        self.set(id, State::Failed, reason).prepared = Some(reply.clone());
                        self.reply(out, origin, Reply::Prepared(reply));
                        return;
                    }
                }
            }
            (PrepareStage::Arming(k), Input::Armed { quiescer, result }) if quiescer == k => {
                let name = self.quiescers[k].name.clone();
                match result {
                    Ok(()) => {
                        *stage = PrepareStage::Freezing(k);
                        *since = now;
                        held_from.get_or_insert(now);
                        out.push(Effect::Freeze { backup: id.clone(), quiescer: k });
                    }
                    Err(e) => {
                        let took = now.saturating_sub(*since);
                        reply.steps.push(step(&name, "arm", &Err(e.clone()), took));
                        let reason = format!("quiescer {name}: {e}");
                        log(
                            out,
                            Level::Warn,
                            format!(
                                "arming the thaw of quiescer {name} failed; not freezing: {reason}"
                            ),
                        );
                        *stage = PrepareStage::Failing(reason);
                        self.thaw(now, k, out);
                    }
                }
                return;
            }
            (PrepareStage::Freezing(k), Input::Froze { quiescer, result }) if quiescer == k => {
                let q = &self.quiescers[k];
                let took = now.saturating_sub(*since);
                reply.quiesce_ms += took;
                if q.freezes_filesystem {
                    reply.freeze_ms += took;
                }
                reply.steps.push(step(&q.name, "freeze", &result, took));
                if let Err(e) = result {
                    let reason = format!("quiescer {}: {e}", q.name);
                    log(
                        out,
                        Level::Warn,
                        format!(
                            "freeze of quiescer {} failed; thawing the ones before it: {e}",
                            q.name
                        ),
                    );
                    // Its freeze did not happen (EBUSY: someone else's): never undo it.
                    *stage = PrepareStage::Disarming(k, reason);
                    out.push(Effect::Disarm { backup: id.clone(), quiescer: k });
                    return;
                }
            }
            (PrepareStage::Disarming(k, reason), Input::Disarmed) => {
                *stage = PrepareStage::Failing(reason);
                self.thaw(now, k, out);
                return;
            }
            _ => return,
        }
        // Arm the next quiescer, or the freeze is complete.
        let next = match stage {
            PrepareStage::CheckingProvider => 0,
            PrepareStage::Freezing(k) => *k + 1,
            _ => return,
        };
        if next < n {
            *stage = PrepareStage::Arming(next);
            *since = now;
            let lease_end_ms = lease.expires_at();
            out.push(Effect::Arm { backup: id.clone(), quiescer: next, lease_end_ms });
            return;
        }
        if lease.expired(now) {
            *stage = PrepareStage::Expired;
            self.thaw(now, n, out);
            return;
        }
        let (lease, held_from) = (*lease, *held_from);
        reply.prepared = true;
        reply.freeze_token = token.as_str().to_string();
        reply.hold = Some(Hold::strongest(self.quiescers.iter().map(|q| q.hold)));
        let reply = std::mem::take(reply);
        self.running = None;
        out.push(Effect::SetTimer { backup: id.clone(), at_ms: lease.expires_at() });
        self.set(id, State::Frozen { lease, held_from }, String::new()).prepared =
            Some(reply.clone());
        log(
            out,
            Level::Info,
            format!(
                "frozen: quiesce {}ms, freeze {}ms, lease {}ms left",
                reply.quiesce_ms,
                reply.freeze_ms,
                lease.remaining(now)
            ),
        );
        self.reply(out, origin, Reply::Prepared(reply));
    }

    fn advance_commit(&mut self, now: u64, id: &BackupId, input: Input, out: &mut Vec<Effect>) {
        let n = self.quiescers.len();
        let provider = self.provider.clone();
        let Some(r) = self.running.as_mut() else { return };
        let origin = r.origin;
        let Work::Commit { lease, reply, since, stage, hold, held_from } = &mut r.work else {
            return;
        };
        match (stage.clone(), input) {
            (CommitStage::Snapshotting, Input::Snapshotted(created)) => {
                let took = now.saturating_sub(*since);
                // The guardian thaws no earlier than this lease's end: a snapshot that ended
                // before it was taken wholly while frozen; one that did not may hold writes
                // made after a thaw.
                let outlived = lease.expired(now);
                let detail = created
                    .as_ref()
                    .map(|s| format!("{} snapshot(s)", s.len()))
                    .map_err(Clone::clone);
                reply.snapshot_ms = took;
                reply.steps.push(step(&provider, "snapshot", &detail, took));
                if let (true, false, Ok(snapshots)) = (*hold, outlived, &created) {
                    // The thaw barrier: stay frozen, still bounded by the lease timer and the
                    // guardian, until Release.
                    let (lease, held_from) = (*lease, *held_from);
                    let mut reply = std::mem::take(reply);
                    self.running = None;
                    reply.committed = true;
                    reply.still_held = true;
                    reply.snapshots = snapshots.clone();
                    reply.held_ms = held_from.map_or(0, |h| now.saturating_sub(h));
                    out.push(Effect::SetTimer { backup: id.clone(), at_ms: lease.expires_at() });
                    log(
                        out,
                        Level::Info,
                        format!(
                            "snapshotted in {}ms; still frozen until release (lease {}ms left)",
                            reply.snapshot_ms,
                            lease.remaining(now)
                        ),
                    );
                    let state = State::Held { lease, held_from, snapshots: snapshots.clone() };
                    self.set(id, state, String::new()).committed = Some(reply.clone());
                    self.reply(out, origin, Reply::Committed(reply));
                    return;
                }
                *stage = CommitStage::Thawing { created, outlived };
                self.thaw(now, n, out);
            }
            (CommitStage::Deleting { since, failed, refused }, Input::Deleted(deleted)) => {
                let took = now.saturating_sub(since);
                let mut reply = std::mem::take(reply);
                let lease = *lease;
                self.running = None;
                let partial = if failed.is_some() { " partial" } else { "" };
                let done = deleted
                    .as_ref()
                    .map(|n| format!("deleted {n}{partial} snapshot(s)"))
                    .map_err(Clone::clone);
                reply.steps.push(step(&provider, "delete", &done, took));
                reply.reason = match (failed, deleted, refused) {
                    (None, Ok(_), Some(refused)) => format!(
                        "thawed, but {}: a snapshot without them cannot be restored; deleted it",
                        refused_text(&refused)
                    ),
                    (None, Err(d), Some(refused)) => format!(
                        "thawed, but {}: a snapshot without them cannot be restored; deleting it failed: {d}",
                        refused_text(&refused)
                    ),
                    (None, Ok(_), None) => format!(
                        "snapshot took {}ms and outlived the lease of {}ms; deleted",
                        reply.snapshot_ms, lease.duration_ms
                    ),
                    (None, Err(d), None) => format!(
                        "snapshot took {}ms and outlived the lease of {}ms; deleting it failed: {d}",
                        reply.snapshot_ms, lease.duration_ms
                    ),
                    (Some(e), Ok(_), _) => {
                        format!("snapshot failed: {e}; thawed and deleted partial snapshots")
                    }
                    (Some(e), Err(d), _) => format!(
                        "snapshot failed: {e}; thawed, but deleting partial snapshots failed too: {d}"
                    ),
                };
                log(out, Level::Warn, format!("commit failed: {}", reply.reason));
                self.set(id, State::Failed, reply.reason.clone()).committed = Some(reply.clone());
                self.reply(out, origin, Reply::Committed(reply));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
