//! The two-phase protocol for one backup, as a pure state machine: events in (replies, time
//! passing, an operator's abort), commands out (RPCs to send, copies to run, the seal, log lines
//! to record). No IO, no clock, no randomness: `now` is an argument, so every transition is
//! unit-tested and replayable. The listener's runtime persists the record and the log lines
//! before it acts on any command.
//!
//! Safety does not depend on timing: agents refuse a Commit after their own lease ran out. The
//! cutoff here only keeps the listener from committing when a lease might already be gone.

use crate::hold::Hold;
use crate::model::{
    check_artifacts, Artifact, BackupRecord, CutRecord, CutVerdict, Level, Millis, ServerEnd,
    ServerRecord, ServerStep, SnapshotRef, State, StateName, Step,
};

/// The protocol's time budget, all in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timeouts {
    /// How long an agent may stay frozen without Commit (`L`).
    pub lease_ms: u64,
    /// Latest moment, after *sending* Prepare, at which Commit may still be sent (`C = L - S - M`).
    pub commit_cutoff_ms: u64,
    /// How long agents have to answer Commit.
    pub commit_timeout_ms: u64,
    /// How long every server's copy (and the seal) may take.
    pub copy_timeout_ms: u64,
    /// How long cleanup may take before the backup succeeds with a warning.
    pub cleanup_timeout_ms: u64,
    /// How long agents have to say what holds their writes (the pre-flight of a group that
    /// requires a hold): the RPC timeout.
    pub inspect_timeout_ms: u64,
}

/// A reply to Prepare.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PrepareReply {
    pub prepared: bool,
    pub reason: String,
    /// Names the agent's freeze; Commit presents it back.
    pub freeze_token: String,
    pub quiesce_ms: u64,
    pub freeze_ms: u64,
    pub steps: Vec<Step>,
    /// What held the server's writes: the strongest hold of the quiescers that froze. `None`
    /// when the agent did not say (an older agent): unknown, never assumed.
    pub hold: Option<Hold>,
}

/// A reply to Commit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct CommitReply {
    pub committed: bool,
    pub reason: String,
    pub snapshots: Vec<SnapshotRef>,
    pub snapshot_ms: u64,
    pub thaw_ms: u64,
    pub held_ms: u64,
    pub steps: Vec<Step>,
    /// The snapshot exists and the server is still frozen, waiting for Release (the thaw
    /// barrier); `held_ms` is the time held so far and `thaw_ms` is 0.
    pub still_held: bool,
    /// What the quiescers handed over after their thaw (none while still held: Release
    /// carries them then).
    pub artifacts: Vec<Artifact>,
}

/// A reply to Release (the thaw barrier's end).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ReleaseReply {
    /// The server was still frozen when Release came: its writes (as far as its hold holds
    /// them) stayed stopped until every snapshot existed. False when its lease ran out first.
    pub held_until_release: bool,
    /// Why it was not held until release, when it was not.
    pub reason: String,
    /// From the first freeze to the end of the thaw.
    pub held_ms: u64,
    pub thaw_ms: u64,
    pub steps: Vec<Step>,
    /// What the quiescers handed over after their thaw (at Release, or at the lease's end).
    pub artifacts: Vec<Artifact>,
    /// Why the quiescers' artifacts could not be kept (too big, too many): the snapshot lacks
    /// files its restore needs, so the backup fails. Empty when all were kept.
    pub artifacts_refused: String,
}

/// What an agent said it did for an Abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AbortOutcome {
    /// It was frozen and thawed.
    pub thawed: bool,
    pub snapshots_deleted: u32,
}

impl AbortOutcome {
    /// "thawed, 1 snapshot deleted", "nothing was frozen, no snapshot to delete".
    pub fn describe(&self) -> String {
        let thaw = if self.thawed { "thawed" } else { "nothing was frozen" };
        let deleted = match self.snapshots_deleted {
            0 => "no snapshot to delete".to_string(),
            1 => "1 snapshot deleted".to_string(),
            n => format!("{n} snapshots deleted"),
        };
        format!("{thaw}, {deleted}")
    }
}

/// A server's finished copy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyDone {
    /// A line for the log: what was copied where.
    pub detail: String,
    /// What the copy stored that the seal must name (saveset: each volume manifest's id).
    pub stored: Vec<String>,
    /// Bytes the copy added to the repository, where the copier knows (saveset): for the
    /// listener's metrics only; the coordinator neither decides on it nor records it.
    pub stored_bytes: Option<u64>,
}

impl CopyDone {
    pub fn said(detail: impl Into<String>) -> CopyDone {
        CopyDone { detail: detail.into(), stored: Vec::new(), stored_bytes: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Begin the backup: send Prepare everywhere (or, when the group requires a hold, first
    /// ask every server what holds its writes).
    Start,
    /// The backup cannot freeze yet: `servers` are mid-freeze for backup `other`. It stays
    /// PENDING until a `Start` (or `GaveUpWaiting`).
    Waiting {
        other: String,
        servers: Vec<String>,
    },
    /// The servers stayed busy for too long: the backup fails before freezing anything.
    GaveUpWaiting {
        other: String,
        servers: Vec<String>,
        waited_ms: u64,
    },
    /// A server said what holds its writes (`Err`: it could not be asked, with why).
    Inspected {
        server: String,
        result: Result<Hold, String>,
    },
    /// An agent answered Prepare (`Err`: the RPC itself failed, with why).
    Prepared {
        server: String,
        reply: Result<PrepareReply, String>,
    },
    Committed {
        server: String,
        reply: Result<CommitReply, String>,
    },
    /// A Release answered (`Err`: it could not be delivered, after retries).
    Released {
        server: String,
        reply: Result<ReleaseReply, String>,
    },
    /// An Abort reached its agent and this is what it did (`Err`: it could not be delivered,
    /// retries included).
    Aborted {
        server: String,
        result: Result<AbortOutcome, String>,
    },
    /// The sweep aborted a leftover of this (ended) backup on `server`.
    Swept {
        server: String,
        outcome: AbortOutcome,
    },
    CopyProgress {
        server: String,
        done: u64,
        total: u64,
    },
    /// The backup software says `server`'s copy is still going, with no new figures.
    CopyHeartbeat {
        server: String,
    },
    /// A server's copy finished (`Err`: it failed, with why).
    Copied {
        server: String,
        result: Result<CopyDone, String>,
    },
    /// The copier sealed the backup (`Ok`: a line for the log) or could not.
    Sealed {
        result: Result<String, String>,
    },
    CleanedUp {
        server: String,
        result: Result<u32, String>,
    },
    /// An operator or the backup software aborted the backup.
    AbortRequested {
        by: String,
        reason: String,
    },
    /// A new listener process took this backup over from one that stopped.
    Restarted,
    /// Time passed: check deadlines.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Append a line to the backup's log (persisted with the record before anything is sent).
    Log {
        server: Option<String>,
        level: Level,
        message: String,
    },
    /// Ask a server what holds its writes (the agent's Status), before anything freezes.
    Inspect {
        server: String,
    },
    /// Prepare carries the record's `require_hold`; the agent refuses below it.
    Prepare {
        server: String,
        lease_ms: u64,
    },
    /// Commit the freeze the agent named in its prepared reply.
    /// Carries the record's `thaw_barrier` as `hold_until_release`.
    Commit {
        server: String,
        freeze_token: String,
    },
    /// Thaw a server held after its snapshot (the thaw barrier); retried like Abort.
    Release {
        server: String,
    },
    Abort {
        server: String,
        reason: String,
    },
    Copy {
        server: String,
        snapshots: Vec<SnapshotRef>,
    },
    /// Every server copied: write what makes the copies one backup (saveset: the backup
    /// manifest naming `stored` with the cut and each server's artifacts), then check it;
    /// answer with `Sealed`.
    Seal {
        stored: Vec<String>,
        cut: CutRecord,
        /// Per server, what its quiescers handed over for a restore.
        artifacts: Vec<(String, Vec<Artifact>)>,
    },
    Cleanup {
        server: String,
    },
}

/// Drives one backup through the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Coordinator {
    pub record: BackupRecord,
    timeouts: Timeouts,
    /// Whether the copier seals a backup once every server copied (saveset mode).
    seal: bool,
    /// With copies reported by the backup software: how long a copying server may go unheard
    /// (no progress, no heartbeat) before its copy fails.
    report_silence_ms: Option<u64>,
    /// When each copying server was last heard of (its copy started, progress, a heartbeat);
    /// kept only with a report silence.
    heard: std::collections::BTreeMap<String, Millis>,
}

impl Coordinator {
    pub fn new(record: BackupRecord, timeouts: Timeouts) -> Self {
        Coordinator {
            record,
            timeouts,
            seal: false,
            report_silence_ms: None,
            heard: Default::default(),
        }
    }

    /// A backup whose copies are sealed (`Command::Seal`) before it can succeed.
    pub fn sealed_by_copier(mut self, seal: bool) -> Self {
        self.seal = seal;
        self
    }

    /// Fails a copy the backup software has said nothing about for `ms`, rather than waiting
    /// out the whole copy timeout.
    pub fn with_report_silence(mut self, ms: u64) -> Self {
        self.report_silence_ms = Some(ms);
        self
    }

    /// The next instant at which a `Tick` may change something.
    pub fn next_deadline(&self) -> Option<Millis> {
        match &self.record.state {
            State::Inspecting { deadline } => Some(*deadline),
            State::Preparing { cutoff_at, .. } => Some(*cutoff_at),
            State::Snapshotted { deadline } | State::Copying { deadline } => {
                Some(self.silent_from().map_or(*deadline, |at| at.min(*deadline)))
            }
            State::Committing { deadline, .. }
            | State::Releasing { deadline }
            | State::Sealing { deadline }
            | State::Cleaning { deadline } => Some(*deadline),
            _ => None,
        }
    }

    /// The earliest instant a copying server will have been unheard for too long.
    fn silent_from(&self) -> Option<Millis> {
        let limit = ms(self.report_silence_ms?);
        self.copying().filter_map(|s| self.heard.get(s)).map(|at| at + limit).min()
    }

    fn copying(&self) -> impl Iterator<Item = &str> {
        self.record
            .servers
            .iter()
            .filter(|s| s.step == ServerStep::Copying)
            .map(|s| s.server.as_str())
    }

    /// A sign of life from `server`'s copy.
    fn hear(&mut self, now: Millis, server: &str) {
        if self.copy_event_for(server) && self.heard.contains_key(server) {
            self.heard.insert(server.to_string(), now);
        }
    }

    pub fn handle(&mut self, now: Millis, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        let was_terminal = self.record.state.is_terminal();
        match event {
            Event::Start => self.start(now, &mut out),
            Event::Waiting { other, servers } => {
                if self.record.state == State::Pending {
                    let message = format!(
                        "waiting to freeze: {} mid-freeze for backup {other}",
                        servers_are(&servers)
                    );
                    self.log(&mut out, None, Level::Info, message);
                }
            }
            Event::GaveUpWaiting { other, servers, waited_ms } => {
                if self.record.state == State::Pending {
                    let reason = format!(
                        "{} still mid-freeze for backup {other} after {waited_ms}ms; nothing was frozen for this backup",
                        servers_are(&servers)
                    );
                    self.fail(now, StateName::Pending, reason, &mut out);
                }
            }
            Event::Inspected { server, result } => {
                self.on_inspected(now, &server, result, &mut out)
            }
            Event::Prepared { server, reply } => self.on_prepared(now, &server, reply, &mut out),
            Event::Committed { server, reply } => self.on_committed(now, &server, reply, &mut out),
            Event::Released { server, reply } => self.on_released(now, &server, reply, &mut out),
            Event::Aborted { server, result } => self.on_aborted(&server, result, &mut out),
            Event::Swept { server, outcome } => self.on_swept(&server, outcome, &mut out),
            Event::CopyProgress { server, done, total } => {
                if self.copy_event_for(&server) {
                    self.copy_started(&server, &mut out);
                    if let Some(s) = self.record.server_mut(&server) {
                        s.copied_bytes = done;
                        s.total_bytes = total;
                    }
                }
                self.hear(now, &server);
            }
            Event::CopyHeartbeat { server } => {
                if self.copy_event_for(&server) {
                    self.copy_started(&server, &mut out);
                }
                self.hear(now, &server);
            }
            Event::Copied { server, result } => self.on_copied(now, &server, result, &mut out),
            Event::Sealed { result } => self.on_sealed(now, result, &mut out),
            Event::CleanedUp { server, result } => self.on_cleaned(now, &server, result, &mut out),
            Event::AbortRequested { by, reason } => {
                if !self.record.state.is_terminal() {
                    let reason = format!("aborted by {by}: {reason}");
                    self.finish(now, State::Aborted { reason: reason.clone() }, &mut out);
                    self.abort_everyone(&reason, &mut out);
                }
            }
            Event::Restarted => self.on_restarted(now, &mut out),
            Event::Tick => self.on_tick(now, &mut out),
        }
        self.settle(now, was_terminal, &mut out);
        out
    }

    fn start(&mut self, now: Millis, out: &mut Vec<Command>) {
        if self.record.state != State::Pending {
            return;
        }
        let require = self.record.require_hold;
        if require > Hold::StorageOnly {
            // Fail closed: learn every server's hold before anything freezes.
            let deadline = now + ms(self.timeouts.inspect_timeout_ms);
            self.record.state = State::Inspecting { deadline };
            self.log(
                out,
                None,
                Level::Info,
                format!(
                    "the group requires {require} ({}): asking {} servers what holds their writes before any prepare",
                    require.explain(),
                    self.record.servers.len()
                ),
            );
            for s in &self.record.servers {
                out.push(Command::Inspect { server: s.server.clone() });
            }
            return;
        }
        self.send_prepare(now, out);
    }

    fn on_inspected(
        &mut self,
        now: Millis,
        server: &str,
        result: Result<Hold, String>,
        out: &mut Vec<Command>,
    ) {
        let inspecting = matches!(self.record.state, State::Inspecting { .. });
        let require = self.record.require_hold;
        let Some(s) = self.record.server_mut(server).filter(|_| inspecting) else {
            self.log(out, Some(server), Level::Warn, "late hold answer ignored".into());
            return;
        };
        match result {
            Ok(hold) => {
                s.cut.hold = Some(hold);
                let text = s.cut.hold_text();
                self.log(out, Some(server), Level::Info, format!("holds writes by {text}"));
            }
            Err(e) => {
                let reason = format!(
                    "{server}: could not learn what holds its writes ({e}); the group requires {require}, so nothing was frozen"
                );
                self.fail(now, StateName::Pending, reason, out);
                return;
            }
        }
        if self.record.servers.iter().any(|s| s.cut.hold.is_none()) {
            return;
        }
        let below: Vec<String> = self
            .record
            .servers
            .iter()
            .filter(|s| s.cut.hold.is_some_and(|h| h < require))
            .map(|s| format!("{} ({})", s.server, s.cut.hold_text()))
            .collect();
        if below.is_empty() {
            self.send_prepare(now, out);
        } else {
            let reason = format!(
                "the group requires {require}; below it: {}; nothing was frozen",
                below.join(", ")
            );
            self.fail(now, StateName::Pending, reason, out);
        }
    }

    fn send_prepare(&mut self, now: Millis, out: &mut Vec<Command>) {
        let lease_ms = self.timeouts.lease_ms;
        let cutoff_at = now + ms(self.timeouts.commit_cutoff_ms);
        self.record.state = State::Preparing { sent_at: now, cutoff_at };
        self.log(
            out,
            None,
            Level::Info,
            format!(
                "prepare sent to {} servers (lease {lease_ms}ms, commit cutoff {}ms)",
                self.record.servers.len(),
                self.timeouts.commit_cutoff_ms
            ),
        );
        for s in &mut self.record.servers {
            s.step = ServerStep::Preparing;
            s.cut.prepare_sent = Some(now);
            out.push(Command::Prepare { server: s.server.clone(), lease_ms });
        }
    }

    fn on_prepared(
        &mut self,
        now: Millis,
        server: &str,
        reply: Result<PrepareReply, String>,
        out: &mut Vec<Command>,
    ) {
        let preparing = matches!(self.record.state, State::Preparing { .. });
        let terminal = self.record.state.is_terminal();
        let Some(s) = self.record.server_mut(server) else {
            self.log(
                out,
                None,
                Level::Warn,
                format!("ignored prepare reply from unknown server {server}"),
            );
            return;
        };
        if !preparing || s.step != ServerStep::Preparing {
            let message = if !terminal {
                "duplicate prepare reply ignored".to_string()
            } else {
                // An agent that says it is frozen for a backup that ended gets an Abort now
                // rather than waiting out its lease (one is enough: the agent refuses a Prepare
                // for a backup it was told to abort).
                let covered = s.abort_sent;
                let abort = if covered { "the abort already sent covers it" } else { "abort sent" };
                let message = match &reply {
                    Ok(r) if r.prepared => format!("prepared after the backup ended; {abort}"),
                    Ok(r) => format!("prepare refused after the backup ended: {}", r.reason),
                    Err(e) => {
                        format!("prepare to {server} failed after the backup ended: {e}; {abort}")
                    }
                };
                let may_hold = !matches!(&reply, Ok(r) if !r.prepared);
                if may_hold && !covered {
                    s.abort_sent = true;
                    let reason = "backup already ended".to_string();
                    out.push(Command::Abort { server: server.to_string(), reason });
                }
                message
            };
            self.log(out, Some(server), Level::Warn, message);
            return;
        }
        match reply {
            Ok(r) if r.prepared => {
                s.step = ServerStep::Frozen;
                s.freeze_token = r.freeze_token;
                s.cut.prepared = Some(now);
                s.cut.quiesce_ms = r.quiesce_ms;
                s.cut.freeze_ms = r.freeze_ms;
                s.cut.steps.extend(r.steps);
                s.cut.hold = r.hold;
                s.detail = format!(
                    "frozen (quiesce {}ms, freeze {}ms; {})",
                    r.quiesce_ms,
                    r.freeze_ms,
                    s.cut.hold_text()
                );
                let detail = s.detail.clone();
                self.log(out, Some(server), Level::Info, format!("prepared: {detail}"));
                self.commit_if_all_prepared(now, out);
            }
            Ok(r) => {
                s.step = ServerStep::PrepareFailed;
                s.cut.steps.extend(r.steps);
                s.detail = r.reason.clone();
                let reason = format!("{server}: prepare failed: {}", r.reason);
                self.fail(now, StateName::Preparing, reason, out);
            }
            Err(e) => {
                s.step = ServerStep::PrepareFailed;
                s.detail = e.clone();
                let reason = format!("{server}: prepare failed: {e}");
                self.fail(now, StateName::Preparing, reason, out);
            }
        }
    }

    fn commit_if_all_prepared(&mut self, now: Millis, out: &mut Vec<Command>) {
        let State::Preparing { cutoff_at, .. } = self.record.state else { return };
        if self.record.servers.iter().any(|s| s.step != ServerStep::Frozen) {
            return;
        }
        if now >= cutoff_at {
            let reason = format!(
                "every server prepared, but only after the commit cutoff of {}ms: a lease might already have run out",
                self.timeouts.commit_cutoff_ms
            );
            self.fail(now, StateName::Preparing, reason, out);
            return;
        }
        let deadline = now + ms(self.timeouts.commit_timeout_ms);
        self.record.state = State::Committing { sent_at: now, deadline };
        self.log(out, None, Level::Info, "every server is frozen; commit sent".into());
        for s in &mut self.record.servers {
            s.step = ServerStep::Committing;
            s.cut.commit_sent = Some(now);
            let freeze_token = s.freeze_token.clone();
            out.push(Command::Commit { server: s.server.clone(), freeze_token });
        }
    }

    fn on_committed(
        &mut self,
        now: Millis,
        server: &str,
        mut reply: Result<CommitReply, String>,
        out: &mut Vec<Command>,
    ) {
        // What the agent should have refused is refused here too: these become file names.
        if let Ok(r) = &mut reply {
            if let (true, Err(e)) = (r.committed, check_artifacts(&[], &r.artifacts)) {
                r.committed = false;
                r.reason = format!("the agent sent artifacts that break the rules ({e})");
            }
        }
        let committing = matches!(self.record.state, State::Committing { .. });
        let terminal = self.record.state.is_terminal();
        let Some(s) = self.record.server_mut(server) else { return };
        if !committing || s.step != ServerStep::Committing {
            let message = if !terminal {
                "duplicate commit reply ignored".to_string()
            } else {
                match &reply {
                    Ok(r) if r.committed => {
                        // A snapshot taken for a backup that already ended must not outlive it.
                        s.abort_sent = true;
                        let reason = "backup already ended".to_string();
                        out.push(Command::Abort { server: server.to_string(), reason });
                        format!(
                            "{} snapshot(s) taken after the backup ended; abort sent to delete them",
                            r.snapshots.len()
                        )
                    }
                    Ok(r) => format!("commit refused after the backup ended: {}", r.reason),
                    Err(e) => {
                        let abort = if s.abort_sent {
                            "the abort sent when the backup ended covers whatever it took"
                        } else {
                            s.abort_sent = true;
                            let reason = "backup already ended".to_string();
                            out.push(Command::Abort { server: server.to_string(), reason });
                            "abort sent"
                        };
                        format!("commit to {server} failed after the backup ended: {e}; {abort}")
                    }
                }
            };
            self.log(out, Some(server), Level::Warn, message);
            return;
        }
        match reply {
            Ok(r) if r.committed => {
                s.step = ServerStep::Snapshotted;
                s.cut.committed = Some(now);
                s.cut.snapshot_ms = r.snapshot_ms;
                s.cut.thaw_ms = r.thaw_ms;
                s.cut.held_ms = r.held_ms;
                s.cut.steps.extend(r.steps);
                s.total_bytes = r.snapshots.iter().map(|x| x.size_bytes).sum();
                if r.still_held {
                    s.detail = format!(
                        "{} snapshot(s) (snapshot {}ms); still frozen until every snapshot exists",
                        r.snapshots.len(),
                        r.snapshot_ms
                    );
                    s.snapshots = r.snapshots;
                    let detail = s.detail.clone();
                    self.log(out, Some(server), Level::Info, format!("committed: {detail}"));
                    self.release_if_all_committed(now, out);
                    return;
                }
                s.detail = format!(
                    "{} snapshot(s), {} (snapshot {}ms, thaw {}ms){}",
                    r.snapshots.len(),
                    s.cut.held_text(r.held_ms),
                    r.snapshot_ms,
                    r.thaw_ms,
                    artifacts_text(&r.artifacts)
                );
                s.snapshots = r.snapshots;
                s.artifacts = r.artifacts;
                let detail = s.detail.clone();
                self.log(out, Some(server), Level::Info, format!("committed and thawed: {detail}"));
                self.copy_if_all_committed(now, out);
            }
            Ok(r) => {
                s.step = ServerStep::CommitFailed;
                s.detail = r.reason.clone();
                let reason = format!("{server}: commit failed: {}", r.reason);
                self.fail(now, StateName::Committing, reason, out);
            }
            Err(e) => {
                s.step = ServerStep::CommitFailed;
                s.detail = e.clone();
                let reason = format!("{server}: commit failed: {e}");
                self.fail(now, StateName::Committing, reason, out);
            }
        }
    }

    /// The thaw barrier: once every snapshot exists, release every server.
    fn release_if_all_committed(&mut self, now: Millis, out: &mut Vec<Command>) {
        if self.record.servers.iter().any(|s| s.step != ServerStep::Snapshotted) {
            return;
        }
        let deadline = now + ms(self.timeouts.commit_timeout_ms);
        self.record.state = State::Releasing { deadline };
        self.log(
            out,
            None,
            Level::Info,
            "every snapshot exists with every server still frozen; release sent".into(),
        );
        for s in &mut self.record.servers {
            s.step = ServerStep::Releasing;
            out.push(Command::Release { server: s.server.clone() });
        }
    }

    fn on_released(
        &mut self,
        now: Millis,
        server: &str,
        mut reply: Result<ReleaseReply, String>,
        out: &mut Vec<Command>,
    ) {
        if let Ok(r) = &mut reply {
            if let (true, Err(e)) =
                (r.artifacts_refused.is_empty(), check_artifacts(&[], &r.artifacts))
            {
                r.artifacts_refused =
                    format!("the agent sent artifacts that break the rules ({e})");
            }
        }
        let releasing = matches!(self.record.state, State::Releasing { .. });
        let Some(s) = self.record.server_mut(server) else { return };
        if !releasing || s.step != ServerStep::Releasing {
            self.log(out, Some(server), Level::Warn, "late release reply ignored".into());
            return;
        }
        s.step = ServerStep::Snapshotted;
        let (level, message) = match reply {
            Ok(r) if !r.artifacts_refused.is_empty() => {
                s.cut.held_until_release = Some(r.held_until_release);
                s.cut.held_ms = r.held_ms;
                s.cut.thaw_ms = r.thaw_ms;
                s.cut.steps.extend(r.steps);
                s.step = ServerStep::CommitFailed;
                // Thawed at Release only if held until it; else when its lease ran out.
                let thawed = if r.held_until_release {
                    "released and thawed".to_string()
                } else {
                    format!("not held until every snapshot existed: {}", r.reason)
                };
                s.detail = format!(
                    "{thawed}, but its quiescers' artifacts were refused: {}",
                    r.artifacts_refused
                );
                let reason = format!(
                    "{server}: the snapshot lacks files its restore needs: {}",
                    r.artifacts_refused
                );
                self.fail(now, StateName::Snapshotted, reason, out);
                return;
            }
            Ok(r) => {
                s.cut.held_until_release = Some(r.held_until_release);
                s.cut.held_ms = r.held_ms;
                s.cut.thaw_ms = r.thaw_ms;
                s.cut.steps.extend(r.steps);
                s.artifacts = r.artifacts;
                let held = s.cut.held_text(r.held_ms);
                s.detail = if r.held_until_release {
                    format!(
                        "{} snapshot(s), {held} until every snapshot existed (thaw {}ms){}",
                        s.snapshots.len(),
                        r.thaw_ms,
                        artifacts_text(&s.artifacts)
                    )
                } else {
                    format!(
                        "{} snapshot(s), not held until every snapshot existed: {}{}",
                        s.snapshots.len(),
                        r.reason,
                        artifacts_text(&s.artifacts)
                    )
                };
                let level = if r.held_until_release { Level::Info } else { Level::Warn };
                (level, format!("released and thawed: {}", s.detail))
            }
            Err(e) => {
                s.detail = format!(
                    "release not confirmed ({e}); whether it stayed frozen until every snapshot existed is unknown (its lease thaws it)"
                );
                (Level::Warn, s.detail.clone())
            }
        };
        self.log(out, Some(server), level, message);
        self.copy_if_all_committed(now, out);
    }

    /// Every snapshot exists: judge the cut and ask every server's copy. The backup stays
    /// SNAPSHOTTED, where a client can see it, until the first copy reports.
    fn copy_if_all_committed(&mut self, now: Millis, out: &mut Vec<Command>) {
        if self.record.servers.iter().any(|s| s.step != ServerStep::Snapshotted) {
            return;
        }
        let verdict = judge_cut(&self.record);
        let level = if verdict.consistent { Level::Info } else { Level::Error };
        self.record.verdict = Some(verdict.clone());
        let deadline = now + ms(self.timeouts.copy_timeout_ms);
        self.record.state = State::Snapshotted { deadline };
        self.log(out, None, level, format!("every snapshot exists; cut {}", verdict.text));
        let n = self.record.servers.len();
        self.log(out, None, Level::Info, format!("copy requested for {n} servers"));
        for s in &mut self.record.servers {
            s.step = ServerStep::Copying;
            out.push(Command::Copy { server: s.server.clone(), snapshots: s.snapshots.clone() });
            if self.report_silence_ms.is_some() {
                self.heard.insert(s.server.clone(), now);
            }
        }
    }

    /// Whether a copy event about `server` is news: the backup waits for copies and this
    /// server's is among them.
    fn copy_event_for(&self, server: &str) -> bool {
        matches!(self.record.state, State::Snapshotted { .. } | State::Copying { .. })
            && self
                .record
                .servers
                .iter()
                .any(|s| s.server == server && s.step == ServerStep::Copying)
    }

    /// The first word from any copy moves the backup from SNAPSHOTTED to COPYING.
    fn copy_started(&mut self, server: &str, out: &mut Vec<Command>) {
        if let State::Snapshotted { deadline } = self.record.state {
            self.record.state = State::Copying { deadline };
            self.log(out, None, Level::Info, format!("copy phase started ({server} first)"));
        }
    }

    fn on_copied(
        &mut self,
        now: Millis,
        server: &str,
        result: Result<CopyDone, String>,
        out: &mut Vec<Command>,
    ) {
        if !self.copy_event_for(server) {
            if self.record.server_mut(server).is_some() {
                let message = "copy report ignored: this server is not copying".to_string();
                self.log(out, Some(server), Level::Warn, message);
            }
            return;
        }
        self.copy_started(server, out);
        let Some(s) = self.record.server_mut(server) else { return };
        match result {
            Ok(done) => {
                s.step = ServerStep::Cleaning;
                s.copied_bytes = s.total_bytes;
                s.detail = done.detail.clone();
                s.stored = done.stored;
                let msg = if done.detail.is_empty() {
                    "copied".to_string()
                } else {
                    format!("copied: {}", done.detail)
                };
                self.log(out, Some(server), Level::Info, format!("{msg}; cleanup sent"));
                out.push(Command::Cleanup { server: server.to_string() });
                if self.record.servers.iter().all(|s| s.step != ServerStep::Copying) {
                    self.all_copied(now, out);
                }
            }
            Err(e) => {
                s.step = ServerStep::CopyFailed;
                s.detail = e.clone();
                let reason = format!("{server}: copy failed: {e}");
                self.fail(now, StateName::Copying, reason, out);
            }
        }
    }

    fn all_copied(&mut self, now: Millis, out: &mut Vec<Command>) {
        let (State::Copying { deadline } | State::Sealing { deadline }) = self.record.state else {
            return;
        };
        if self.seal {
            self.record.state = State::Sealing { deadline };
            let message =
                "every server copied; sealing the backup (its manifest with the cut, then verify)";
            self.log(out, None, Level::Info, message.into());
            out.push(self.seal_command());
        } else {
            self.log(out, None, Level::Info, "every server copied".into());
            self.clean_up(now, out);
        }
    }

    fn seal_command(&self) -> Command {
        let stored = self.record.servers.iter().flat_map(|s| s.stored.iter().cloned()).collect();
        let artifacts = self
            .record
            .servers
            .iter()
            .filter(|s| !s.artifacts.is_empty())
            .map(|s| (s.server.clone(), s.artifacts.clone()))
            .collect();
        Command::Seal { stored, cut: self.record.cut(), artifacts }
    }

    fn on_sealed(&mut self, now: Millis, result: Result<String, String>, out: &mut Vec<Command>) {
        if !matches!(self.record.state, State::Sealing { .. }) {
            let message =
                format!("seal result ignored: the backup is {}", self.record.state.name());
            self.log(out, None, Level::Warn, message);
            return;
        }
        match result {
            Ok(detail) => {
                self.log(out, None, Level::Info, format!("sealed: {detail}"));
                self.clean_up(now, out);
            }
            Err(e) => self.fail(now, StateName::Copying, format!("seal failed: {e}"), out),
        }
    }

    /// Every copy is safe: wait for the cleanups still running, for at most the cleanup timeout.
    fn clean_up(&mut self, now: Millis, out: &mut Vec<Command>) {
        let deadline = now + ms(self.timeouts.cleanup_timeout_ms);
        self.record.state = State::Cleaning { deadline };
        self.succeed_if_all_cleaned(now, out);
    }

    fn on_cleaned(
        &mut self,
        now: Millis,
        server: &str,
        result: Result<u32, String>,
        out: &mut Vec<Command>,
    ) {
        let Some(s) = self.record.server_mut(server) else { return };
        if s.step != ServerStep::Cleaning {
            return;
        }
        match result {
            Ok(n) => {
                s.step = ServerStep::Cleaned;
                let text = format!("cleaned up {n} snapshot(s)");
                s.end = Some(ServerEnd::Confirmed(text.clone()));
                self.log(out, Some(server), Level::Info, text);
            }
            Err(e) => {
                s.step = ServerStep::CleanupFailed;
                s.detail = e.clone();
                let text = format!("cleanup failed, the snapshot stays until swept: {e}");
                s.end = Some(ServerEnd::GaveUp(text.clone()));
                self.log(out, Some(server), Level::Warn, text);
            }
        }
        self.succeed_if_all_cleaned(now, out);
    }

    fn succeed_if_all_cleaned(&mut self, now: Millis, out: &mut Vec<Command>) {
        if !matches!(self.record.state, State::Cleaning { .. }) {
            return;
        }
        let done =
            |s: &ServerRecord| matches!(s.step, ServerStep::Cleaned | ServerStep::CleanupFailed);
        if self.record.servers.iter().all(done) {
            self.finish(now, State::Succeeded, out);
        }
    }

    fn on_aborted(
        &mut self,
        server: &str,
        result: Result<AbortOutcome, String>,
        out: &mut Vec<Command>,
    ) {
        let lease_ms = self.timeouts.lease_ms;
        let barrier = self.record.thaw_barrier;
        let Some(s) = self.record.server_mut(server) else { return };
        match result {
            Ok(outcome) => {
                if matches!(s.step, ServerStep::Aborting | ServerStep::AbortFailed) {
                    s.step = ServerStep::Aborted;
                }
                let text = format!("abort done: {}", outcome.describe());
                s.end = Some(ServerEnd::Confirmed(text.clone()));
                self.log(out, Some(server), Level::Info, text);
            }
            Err(e) => {
                let text = undelivered(s, &e, lease_ms, barrier);
                if matches!(s.end, Some(ServerEnd::Confirmed(_))) {
                    // A repeated abort failed; the first one was confirmed.
                    let message = format!("{text} (an earlier abort was confirmed)");
                    self.log(out, Some(server), Level::Warn, message);
                    return;
                }
                if s.step == ServerStep::Aborting {
                    s.step = ServerStep::AbortFailed;
                }
                s.end = Some(ServerEnd::GaveUp(text.clone()));
                self.log(out, Some(server), Level::Warn, text);
            }
        }
    }

    /// The sweep deleted what the agent still held of this backup after it ended.
    fn on_swept(&mut self, server: &str, outcome: AbortOutcome, out: &mut Vec<Command>) {
        if !self.record.state.is_terminal() {
            let message = "sweep result ignored: the backup is still in flight".to_string();
            self.log(out, Some(server), Level::Warn, message);
            return;
        }
        let Some(s) = self.record.server_mut(server) else { return };
        let text = format!("swept: abort done: {}", outcome.describe());
        s.step = ServerStep::Aborted;
        s.detail = text.clone();
        s.end = Some(ServerEnd::Confirmed(text.clone()));
        self.log(out, Some(server), Level::Info, text);
    }

    /// A new listener process takes the backup over. Before the snapshots exist a freeze may
    /// have outlived its lease while no one was listening, so the backup fails and is aborted;
    /// past the freeze nothing is at risk, so the copies, the seal and the cleanups still owed
    /// are asked again (all idempotent) and the backup goes on.
    fn on_restarted(&mut self, now: Millis, out: &mut Vec<Command>) {
        let phase = self.record.state.name();
        match self.record.state.clone() {
            State::Pending
            | State::Inspecting { .. }
            | State::Preparing { .. }
            | State::Committing { .. } => {
                let reason = format!("listener restarted while the backup was {phase}");
                self.fail(now, phase, reason, out);
            }
            State::Releasing { .. } => {
                // Every snapshot exists; Release is idempotent and its answer still says
                // whether each server stayed frozen until then.
                let deadline = now + ms(self.timeouts.commit_timeout_ms);
                self.record.state = State::Releasing { deadline };
                let mut again = Vec::new();
                for s in &self.record.servers {
                    if s.step == ServerStep::Releasing {
                        again.push(s.server.clone());
                        out.push(Command::Release { server: s.server.clone() });
                    }
                }
                let message =
                    format!("listener restarted; release sent again to {}", again.join(", "));
                self.log(out, None, Level::Warn, message);
            }
            State::Snapshotted { .. } | State::Copying { .. } | State::Sealing { .. } => {
                let mut copies = Vec::new();
                for s in &mut self.record.servers {
                    if s.step == ServerStep::Copying {
                        s.copied_bytes = 0;
                        copies.push(s.server.clone());
                        let snapshots = s.snapshots.clone();
                        out.push(Command::Copy { server: s.server.clone(), snapshots });
                    }
                }
                if self.report_silence_ms.is_some() {
                    // The silence is counted afresh from the new process's first moment.
                    self.heard.extend(copies.iter().map(|c| (c.clone(), now)));
                }
                let cleanups = self.cleanups_again(out);
                let mut said = format!(
                    "listener restarted while the backup was {phase}; its snapshots were kept"
                );
                if !copies.is_empty() {
                    said += &format!(": copy requested again for {}", copies.join(", "));
                }
                if matches!(self.record.state, State::Sealing { .. }) {
                    said += ": seal started again";
                    out.push(self.seal_command());
                }
                if !cleanups.is_empty() {
                    said += &format!("; cleanup sent again to {}", cleanups.join(", "));
                }
                self.log(out, None, Level::Warn, said);
            }
            State::Cleaning { .. } => {
                let cleanups = self.cleanups_again(out);
                let said = format!(
                    "listener restarted while the backup was CLEANING; cleanup sent again to {}",
                    cleanups.join(", ")
                );
                self.log(out, None, Level::Warn, said);
            }
            State::Succeeded | State::Failed { .. } | State::Aborted { .. } => {
                let succeeded = self.record.state == State::Succeeded;
                let mut asked = Vec::new();
                for s in &mut self.record.servers {
                    if s.cut.prepare_sent.is_none() || s.end.is_some() {
                        continue;
                    }
                    asked.push(s.server.clone());
                    if succeeded && s.step == ServerStep::Cleaning {
                        out.push(Command::Cleanup { server: s.server.clone() });
                    } else {
                        s.abort_sent = true;
                        let reason = "backup already ended".to_string();
                        out.push(Command::Abort { server: s.server.clone(), reason });
                    }
                }
                if !asked.is_empty() {
                    let said = format!(
                        "listener restarted before {} confirmed the backup's end; asked again",
                        asked.join(", ")
                    );
                    self.log(out, None, Level::Warn, said);
                }
            }
        }
    }

    /// Cleanup again for every server that copied and has not confirmed its cleanup.
    fn cleanups_again(&mut self, out: &mut Vec<Command>) -> Vec<String> {
        let mut again = Vec::new();
        for s in &self.record.servers {
            if s.step == ServerStep::Cleaning && s.end.is_none() {
                again.push(s.server.clone());
                out.push(Command::Cleanup { server: s.server.clone() });
            }
        }
        again
    }

    fn on_tick(&mut self, now: Millis, out: &mut Vec<Command>) {
        let Some(deadline) = self.next_deadline() else { return };
        if now < deadline {
            return;
        }
        let waiting = |step: ServerStep| -> String {
            self.record
                .servers
                .iter()
                .filter(|s| s.step == step)
                .map(|s| s.server.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.record.state.clone() {
            State::Inspecting { .. } => {
                let silent: Vec<&str> = self
                    .record
                    .servers
                    .iter()
                    .filter(|s| s.cut.hold.is_none())
                    .map(|s| s.server.as_str())
                    .collect();
                let reason = format!(
                    "{} did not say what holds its writes within {}ms; the group requires {}, so nothing was frozen",
                    silent.join(", "),
                    self.timeouts.inspect_timeout_ms,
                    self.record.require_hold
                );
                self.fail(now, StateName::Pending, reason, out);
            }
            State::Preparing { .. } => {
                let reason = format!(
                    "{} did not prepare within the commit cutoff of {}ms",
                    waiting(ServerStep::Preparing),
                    self.timeouts.commit_cutoff_ms
                );
                self.fail(now, StateName::Preparing, reason, out);
            }
            State::Committing { .. } => {
                let reason = format!(
                    "{} did not answer commit within {}ms",
                    waiting(ServerStep::Committing),
                    self.timeouts.commit_timeout_ms
                );
                self.fail(now, StateName::Committing, reason, out);
            }
            State::Releasing { .. } => {
                let silent = waiting(ServerStep::Releasing);
                self.log(
                    out,
                    None,
                    Level::Warn,
                    format!("{silent} did not answer release in time: not known to have stayed frozen until every snapshot existed"),
                );
                for s in &mut self.record.servers {
                    if s.step == ServerStep::Releasing {
                        s.step = ServerStep::Snapshotted;
                    }
                }
                self.copy_if_all_committed(now, out);
            }
            State::Snapshotted { deadline } | State::Copying { deadline } => {
                let limit = self.report_silence_ms.map(ms);
                let silent: Vec<String> = self
                    .copying()
                    .filter_map(|s| Some((s, *self.heard.get(s)?)))
                    .filter(|(_, at)| limit.is_some_and(|limit| now >= at + limit))
                    .map(|(s, at)| format!("{s} (last heard {}ms ago)", now - at))
                    .collect();
                if let (false, Some(limit)) = (silent.is_empty(), limit) {
                    let reason = format!(
                        "copy of {}: the backup software reported nothing (no progress, no heartbeat) for {limit}ms",
                        silent.join(", ")
                    );
                    self.fail(now, StateName::Copying, reason, out);
                } else if now >= deadline {
                    let reason = format!(
                        "copy of {} did not finish within {}ms",
                        waiting(ServerStep::Copying),
                        self.timeouts.copy_timeout_ms
                    );
                    self.fail(now, StateName::Copying, reason, out);
                }
            }
            State::Sealing { .. } => {
                let reason = format!(
                    "the seal did not finish within the copy timeout of {}ms",
                    self.timeouts.copy_timeout_ms
                );
                self.fail(now, StateName::Copying, reason, out);
            }
            State::Cleaning { .. } => {
                let slow = waiting(ServerStep::Cleaning);
                self.log(
                    out,
                    None,
                    Level::Warn,
                    format!("cleanup of {slow} did not answer in time; the copies are safe"),
                );
                self.finish(now, State::Succeeded, out);
            }
            _ => {}
        }
    }

    /// Fails the backup and aborts it on every server, so no agent stays frozen or keeps a
    /// snapshot of a backup that will never be good.
    fn fail(&mut self, now: Millis, phase: StateName, reason: String, out: &mut Vec<Command>) {
        self.finish(now, State::Failed { phase, reason: reason.clone() }, out);
        self.abort_everyone(&reason, out);
    }

    fn abort_everyone(&mut self, reason: &str, out: &mut Vec<Command>) {
        for s in &mut self.record.servers {
            let contacted = s.cut.prepare_sent.is_some();
            let confirmed = matches!(s.end, Some(ServerEnd::Confirmed(_)));
            if contacted && !confirmed && !s.abort_sent {
                s.abort_sent = true;
                // Asked again: whatever was given up on is open until this abort answers.
                s.end = None;
                if !matches!(
                    s.step,
                    ServerStep::PrepareFailed | ServerStep::CommitFailed | ServerStep::CopyFailed
                ) {
                    s.step = ServerStep::Aborting;
                }
                out.push(Command::Abort { server: s.server.clone(), reason: reason.to_string() });
            }
        }
    }

    fn finish(&mut self, now: Millis, state: State, out: &mut Vec<Command>) {
        let was = self.record.state.name();
        let (level, message) = match &state {
            State::Succeeded => (Level::Info, "backup succeeded".to_string()),
            State::Failed { phase, reason } => {
                (Level::Error, format!("backup failed while {phase}: {reason}"))
            }
            State::Aborted { reason } => (Level::Warn, format!("backup {reason}")),
            _ => (Level::Info, String::new()),
        };
        if self.record.verdict.is_none() {
            let how = match &state {
                State::Failed { phase, .. } => format!("failed while {phase}"),
                _ => format!("was aborted while {was}"),
            };
            self.record.never_judged =
                Some(format!("never judged: the backup {how} before every server was snapshotted"));
        }
        self.record.state = state;
        self.record.finished = Some(now);
        self.log(out, None, level, message);
    }

    /// Marks the backup settled once it is terminal and every server it contacted confirmed its
    /// end or was given up on. Said in the log when it comes after the end, or without every
    /// confirmation.
    fn settle(&mut self, now: Millis, was_terminal: bool, out: &mut Vec<Command>) {
        if self.record.settled.is_some() || !self.record.is_settled() {
            return;
        }
        self.record.settled = Some(now);
        let unconfirmed = self.record.unconfirmed();
        if !unconfirmed.is_empty() {
            let message = format!("settled without confirmation from {}", unconfirmed.join("; "));
            self.log(out, None, Level::Warn, message);
        } else if was_terminal {
            self.log(out, None, Level::Info, "settled: every server confirmed its end".into());
        }
    }

    fn log(&self, out: &mut Vec<Command>, server: Option<&str>, level: Level, message: String) {
        out.push(Command::Log { server: server.map(str::to_string), level, message });
    }
}

/// What is known about a server whose Abort never landed, in words: what may still be frozen
/// and until when, what snapshots stay and who deletes them. Under the thaw barrier a server
/// that took its snapshots stays frozen until Release or its lease, so it may still be frozen.
fn undelivered(s: &ServerRecord, error: &str, lease_ms: u64, barrier: bool) -> String {
    let server = &s.server;
    let mut text = format!("abort not delivered ({error})");
    let guardian = "its guardian thaws it then (if the guardian is alive)";
    match (s.cut.prepared, s.cut.commit_sent, s.cut.committed) {
        (Some(prepared), _, Some(_)) if barrier && s.cut.held_until_release.is_none() => {
            let ends = clock_time(prepared + ms(lease_ms));
            text += &format!(
                "; it took its {} snapshot(s) and, held for the thaw barrier, may still be frozen: its lease ends by {ends} and {guardian}; the snapshots stay until the sweep deletes them once {server} is reachable",
                s.snapshots.len()
            );
        }
        (_, _, Some(_)) => {
            text += &format!(
                "; it thawed when it took its {} snapshot(s), which stay until the sweep deletes them once {server} is reachable",
                s.snapshots.len()
            );
        }
        (Some(prepared), commit_sent, None) => {
            let ends = clock_time(prepared + ms(lease_ms));
            text +=
                &format!("; if {server} is still frozen, its lease ends by {ends} and {guardian}");
            if commit_sent.is_some() {
                text += &format!(
                    "; a snapshot it may have taken stays until the sweep deletes it once {server} is reachable"
                );
            }
        }
        (None, _, None) => {
            if let Some(sent) = s.cut.prepare_sent {
                text += &format!(
                    "; if {server} froze, its lease ends {lease_ms}ms after Prepare reached it (sent at {}) and {guardian}",
                    clock_time(sent)
                );
            }
        }
    }
    text
}

/// "; artifacts: pg/backup_label (230 B), ..." or nothing.
fn artifacts_text(artifacts: &[Artifact]) -> String {
    if artifacts.is_empty() {
        return String::new();
    }
    let list: Vec<String> = artifacts.iter().map(Artifact::describe).collect();
    format!("; artifacts: {}", list.join(", "))
}

/// "a, b are" / "a is".
fn servers_are(servers: &[String]) -> String {
    match servers {
        [one] => format!("{one} is"),
        many => format!("{} are", many.join(", ")),
    }
}

/// The time of day of a listener-clock instant, UTC, to the millisecond: `14:03:07.250 UTC`.
pub fn clock_time(at: Millis) -> String {
    let day_ms = at.rem_euclid(86_400_000);
    let (h, m, s, milli) =
        (day_ms / 3_600_000, day_ms / 60_000 % 60, day_ms / 1000 % 60, day_ms % 1000);
    format!("{h:02}:{m:02}:{s:02}.{milli:03} UTC")
}

/// Every server was frozen at one common instant iff every *prepared* reply arrived before the
/// first Commit was sent: then all were frozen throughout `[last prepared, first commit sent]`.
/// Offsets in the text are from the first Prepare sent, on the listener's clock.
pub fn judge_cut(record: &BackupRecord) -> CutVerdict {
    let prepared: Vec<Millis> = record.servers.iter().filter_map(|s| s.cut.prepared).collect();
    let commits: Vec<Millis> = record.servers.iter().filter_map(|s| s.cut.commit_sent).collect();
    if prepared.len() != record.servers.len() || commits.len() != record.servers.len() {
        let text = "incomplete: not every server prepared and was sent commit".to_string();
        return CutVerdict { consistent: false, text };
    }
    let origin = record.servers.iter().filter_map(|s| s.cut.prepare_sent).min().unwrap_or_default();
    let last_prepared = prepared.iter().copied().max().unwrap_or_default() - origin;
    let first_commit = commits.iter().copied().min().unwrap_or_default() - origin;
    let n = record.servers.len();
    let order = format!(
        "the last prepared reply came at +{last_prepared}ms, before the first commit was sent at +{first_commit}ms"
    );
    let (held, not_held): (Vec<_>, Vec<_>) =
        record.servers.iter().partition(|s| s.cut.writes_held());
    if record.thaw_barrier && last_prepared <= first_commit {
        return judge_barrier(record, &order, &held, &not_held);
    }
    if last_prepared <= first_commit && not_held.is_empty() {
        let text =
            format!("all {n} servers were frozen at one instant and held their writes: {order}");
        CutVerdict { consistent: true, text }
    } else if last_prepared <= first_commit {
        // The order proves every server said "frozen" before any commit; it does not prove
        // that a server whose hold holds nothing stopped writing.
        let why = not_held
            .iter()
            .map(|s| format!("{}: {}", s.server, s.cut.hold_text()))
            .collect::<Vec<_>>()
            .join("; ");
        let held = if held.is_empty() { "none".to_string() } else { names(&held) };
        let text = format!(
            "the message order is a consistent cut ({order}); writes were held on {held}; on {} they were not known to be held ({why})",
            names(&not_held)
        );
        CutVerdict { consistent: true, text }
    } else {
        let text = format!(
            "a commit was sent at +{first_commit}ms, before the last server prepared at +{last_prepared}ms"
        );
        CutVerdict { consistent: false, text }
    }
}

fn names(v: &[&ServerRecord]) -> String {
    v.iter().map(|s| s.server.as_str()).collect::<Vec<_>>().join(", ")
}

/// The cut under the thaw barrier, whose message order holds: it is consistent only if every
/// server confirmed it stayed frozen until every snapshot existed; then every server that holds
/// writes was frozen at every snapshot instant. One server that does not hold them is then
/// consistent with all the others; between two such servers (snapshots taken at different
/// instants) the cut rests on their hooks, and the text says so.
fn judge_barrier(
    record: &BackupRecord,
    order: &str,
    held: &[&ServerRecord],
    not_held: &[&ServerRecord],
) -> CutVerdict {
    let unconfirmed: Vec<String> = record
        .servers
        .iter()
        .filter(|s| s.cut.held_until_release != Some(true))
        .map(|s| match s.cut.held_until_release {
            Some(_) => format!("{} (its lease ran out first)", s.server),
            None => format!("{} (no answer)", s.server),
        })
        .collect();
    if !unconfirmed.is_empty() {
        let text = format!(
            "the message order is a consistent cut ({order}), but {} did not confirm staying frozen until every snapshot existed: whether the snapshots form a consistent cut is not known",
            unconfirmed.join(", ")
        );
        return CutVerdict { consistent: false, text };
    }
    let held = if held.is_empty() { "none".to_string() } else { names(held) };
    let barrier = format!(
        "every server stayed frozen until every snapshot existed (thaw barrier) and {order}; writes were held on {held}"
    );
    match not_held {
        [] => CutVerdict { consistent: true, text: barrier },
        [one] => CutVerdict {
            consistent: true,
            text: format!(
                "{barrier}; on {} they were not known to be held ({}), but its snapshot was taken while every other server was held",
                one.server,
                one.cut.hold_text()
            ),
        },
        many => CutVerdict {
            consistent: true,
            text: format!(
                "{barrier}; on {} they were not known to be held: their snapshots were taken at different instants, so the cut between them holds only as far as their hooks held their writes",
                names(many)
            ),
        },
    }
}

fn ms(v: u64) -> Millis {
    Millis::try_from(v).unwrap_or(Millis::MAX / 4)
}

#[cfg(test)]
mod tests;
