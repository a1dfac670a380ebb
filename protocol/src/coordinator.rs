//! The two-phase protocol for one backup, as a pure state machine: events in (replies, time
//! passing, an operator's abort), commands out (RPCs to send, copies to run, log lines to
//! record). No IO, no clock, no randomness: `now` is an argument, so every transition is
//! unit-tested and replayable. `runtime.rs` persists the record and the log lines before it acts
//! on any command.
//!
//! Safety does not depend on timing: agents refuse a Commit after their own lease ran out. The
//! cutoff here only keeps the listener from committing when a lease might already be gone.

use crate::model::{
    BackupRecord, CutVerdict, Level, Millis, ServerStep, SnapshotRef, State, StateName, Step,
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
    /// How long every server's copy may take.
    pub copy_timeout_ms: u64,
    /// How long cleanup may take before the backup succeeds with a warning.
    pub cleanup_timeout_ms: u64,
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Begin the backup: send Prepare everywhere.
    Start,
    /// An agent answered Prepare (`Err`: the RPC itself failed, with why).
    Prepared {
        server: String,
        reply: Result<PrepareReply, String>,
    },
    Committed {
        server: String,
        reply: Result<CommitReply, String>,
    },
    /// An Abort reached its agent (`Err`: it could not be delivered).
    Aborted {
        server: String,
        result: Result<(), String>,
    },
    CopyProgress {
        server: String,
        done: u64,
        total: u64,
    },
    /// A server's copy finished (`Err`: it failed, with why).
    Copied {
        server: String,
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
    /// The listener restarted while this backup was in flight.
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
    Prepare {
        server: String,
        lease_ms: u64,
    },
    Commit {
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
    Cleanup {
        server: String,
    },
}

/// Drives one backup through the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Coordinator {
    pub record: BackupRecord,
    timeouts: Timeouts,
}

impl Coordinator {
    pub fn new(record: BackupRecord, timeouts: Timeouts) -> Self {
        Coordinator { record, timeouts }
    }

    /// The next instant at which a `Tick` may change something.
    pub fn next_deadline(&self) -> Option<Millis> {
        match &self.record.state {
            State::Preparing { cutoff_at, .. } => Some(*cutoff_at),
            State::Committing { deadline, .. }
            | State::Copying { deadline }
            | State::Cleaning { deadline } => Some(*deadline),
            _ => None,
        }
    }

    pub fn handle(&mut self, now: Millis, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        match event {
            Event::Start => self.start(now, &mut out),
            Event::Prepared { server, reply } => self.on_prepared(now, &server, reply, &mut out),
            Event::Committed { server, reply } => self.on_committed(now, &server, reply, &mut out),
            Event::Aborted { server, result } => self.on_aborted(&server, result, &mut out),
            Event::CopyProgress { server, done, total } => {
                let copying = matches!(self.record.state, State::Copying { .. });
                if let Some(s) = self.record.server_mut(&server).filter(|_| copying) {
                    s.copied_bytes = done;
                    s.total_bytes = total;
                }
            }
            Event::Copied { server, result } => self.on_copied(now, &server, result, &mut out),
            Event::CleanedUp { server, result } => self.on_cleaned(now, &server, result, &mut out),
            Event::AbortRequested { by, reason } => {
                if !self.record.state.is_terminal() {
                    let reason = format!("aborted by {by}: {reason}");
                    self.finish(now, State::Aborted { reason: reason.clone() }, &mut out);
                    self.abort_everyone(&reason, &mut out);
                }
            }
            Event::Restarted => {
                if !self.record.state.is_terminal() {
                    let phase = self.record.state.name();
                    let reason = format!("listener restarted while the backup was {phase}");
                    self.fail(now, phase, reason, &mut out);
                }
            }
            Event::Tick => self.on_tick(now, &mut out),
        }
        out
    }

    fn start(&mut self, now: Millis, out: &mut Vec<Command>) {
        if self.record.state != State::Pending {
            return;
        }
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
            // Late or duplicate. An agent that says it is frozen for a backup we gave up on
            // gets an Abort now rather than waiting out its lease.
            let frozen = matches!(&reply, Ok(r) if r.prepared);
            let needs_abort = frozen && terminal && !s.abort_sent;
            if needs_abort {
                s.abort_sent = true;
            }
            self.log(out, Some(server), Level::Warn, "late prepare reply ignored".into());
            if needs_abort {
                let reason = "backup already ended".to_string();
                out.push(Command::Abort { server: server.to_string(), reason });
            }
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
                s.detail = format!("frozen (quiesce {}ms, freeze {}ms)", r.quiesce_ms, r.freeze_ms);
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
            out.push(Command::Commit { server: s.server.clone() });
        }
    }

    fn on_committed(
        &mut self,
        now: Millis,
        server: &str,
        reply: Result<CommitReply, String>,
        out: &mut Vec<Command>,
    ) {
        let committing = matches!(self.record.state, State::Committing { .. });
        let Some(s) = self.record.server_mut(server) else { return };
        if !committing || s.step != ServerStep::Committing {
            // A snapshot taken for a backup that already ended must not outlive it.
            let took = matches!(&reply, Ok(r) if r.committed);
            if took && self.record.state.is_terminal() {
                let reason = "backup already ended".to_string();
                out.push(Command::Abort { server: server.to_string(), reason });
            }
            self.log(out, Some(server), Level::Warn, "late commit reply ignored".into());
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
                s.detail = format!(
                    "{} snapshot(s), writes held {}ms (snapshot {}ms, thaw {}ms)",
                    r.snapshots.len(),
                    r.held_ms,
                    r.snapshot_ms,
                    r.thaw_ms
                );
                s.snapshots = r.snapshots;
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

    fn copy_if_all_committed(&mut self, now: Millis, out: &mut Vec<Command>) {
        if self.record.servers.iter().any(|s| s.step != ServerStep::Snapshotted) {
            return;
        }
        let verdict = judge_cut(&self.record);
        let level = if verdict.consistent { Level::Info } else { Level::Error };
        self.record.verdict = Some(verdict.clone());
        self.record.state = State::Snapshotted;
        self.log(out, None, level, format!("every snapshot exists; cut {}", verdict.text));
        self.record.state = State::Copying { deadline: now + ms(self.timeouts.copy_timeout_ms) };
        self.log(out, None, Level::Info, "copy phase started".into());
        for s in &mut self.record.servers {
            s.step = ServerStep::Copying;
            out.push(Command::Copy { server: s.server.clone(), snapshots: s.snapshots.clone() });
        }
    }

    fn on_copied(
        &mut self,
        now: Millis,
        server: &str,
        result: Result<String, String>,
        out: &mut Vec<Command>,
    ) {
        let copying = matches!(self.record.state, State::Copying { .. });
        let Some(s) = self.record.server_mut(server) else { return };
        if !copying || s.step != ServerStep::Copying {
            self.log(
                out,
                Some(server),
                Level::Warn,
                "copy report ignored: this server is not copying".into(),
            );
            return;
        }
        match result {
            Ok(detail) => {
                s.step = ServerStep::Cleaning;
                s.copied_bytes = s.total_bytes;
                s.detail = detail.clone();
                let msg = if detail.is_empty() {
                    "copied".to_string()
                } else {
                    format!("copied: {detail}")
                };
                self.log(out, Some(server), Level::Info, format!("{msg}; cleanup sent"));
                out.push(Command::Cleanup { server: server.to_string() });
                if self.record.servers.iter().all(|s| s.step != ServerStep::Copying) {
                    let deadline = now + ms(self.timeouts.cleanup_timeout_ms);
                    self.record.state = State::Cleaning { deadline };
                    self.log(out, None, Level::Info, "every server copied".into());
                    self.succeed_if_all_cleaned(now, out);
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
                self.log(out, Some(server), Level::Info, format!("cleaned up {n} snapshot(s)"));
            }
            Err(e) => {
                s.step = ServerStep::CleanupFailed;
                s.detail = e.clone();
                self.log(
                    out,
                    Some(server),
                    Level::Warn,
                    format!("cleanup failed, the snapshot stays until swept: {e}"),
                );
            }
        }
        self.succeed_if_all_cleaned(now, out);
    }

    fn succeed_if_all_cleaned(&mut self, now: Millis, out: &mut Vec<Command>) {
        if !matches!(self.record.state, State::Cleaning { .. }) {
            return;
        }
        let done = |s: &crate::model::ServerRecord| {
            matches!(s.step, ServerStep::Cleaned | ServerStep::CleanupFailed)
        };
        if self.record.servers.iter().all(done) {
            self.finish(now, State::Succeeded, out);
        }
    }

    fn on_aborted(&mut self, server: &str, result: Result<(), String>, out: &mut Vec<Command>) {
        let Some(s) = self.record.server_mut(server) else { return };
        match result {
            Ok(()) => {
                if s.step == ServerStep::Aborting {
                    s.step = ServerStep::Aborted;
                }
                self.log(
                    out,
                    Some(server),
                    Level::Info,
                    "abort done: thawed and snapshots deleted".into(),
                );
            }
            Err(e) => {
                let msg = format!(
                    "abort not delivered ({e}); the agent thaws by itself when its lease runs out"
                );
                self.log(out, Some(server), Level::Warn, msg);
            }
        }
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
            State::Copying { .. } => {
                let reason = format!(
                    "copy of {} did not finish within {}ms",
                    waiting(ServerStep::Copying),
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
            let settled = matches!(s.step, ServerStep::Cleaned | ServerStep::Aborted);
            if contacted && !settled && !s.abort_sent {
                s.abort_sent = true;
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
        let (level, message) = match &state {
            State::Succeeded => (Level::Info, "backup succeeded".to_string()),
            State::Failed { phase, reason } => {
                (Level::Error, format!("backup failed while {phase}: {reason}"))
            }
            State::Aborted { reason } => (Level::Warn, format!("backup {reason}")),
            _ => (Level::Info, String::new()),
        };
        self.record.state = state;
        self.record.finished = Some(now);
        self.log(out, None, level, message);
    }

    fn log(&self, out: &mut Vec<Command>, server: Option<&str>, level: Level, message: String) {
        out.push(Command::Log { server: server.map(str::to_string), level, message });
    }
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
    if last_prepared <= first_commit {
        let text = format!(
            "all {n} servers were frozen at one instant: the last prepared reply came at +{last_prepared}ms, before the first commit was sent at +{first_commit}ms"
        );
        CutVerdict { consistent: true, text }
    } else {
        let text = format!(
            "a commit was sent at +{first_commit}ms, before the last server prepared at +{last_prepared}ms"
        );
        CutVerdict { consistent: false, text }
    }
}

fn ms(v: u64) -> Millis {
    Millis::try_from(v).unwrap_or(Millis::MAX / 4)
}

#[cfg(test)]
mod tests;
