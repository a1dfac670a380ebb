//! What is notified: a backup's outcome, a group without a good backup, a missed schedule.
//! Typed values made once from the catalog's record (`Event::from_record`); rendering them
//! is `render`'s job, sending them the `Notifier`'s.

use std::time::Duration;

use stillpoint_protocol::model::{BackupRecord, ServerStep, State};

/// Unix milliseconds, as on the listener's clock.
pub type Millis = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    BackupSucceeded(BackupReport),
    /// Failed, or aborted by an operator (`failure.aborted`).
    BackupFailed(BackupReport),
    NoGoodBackup(NoGoodBackup),
    ScheduleMissed(ScheduleMissed),
    /// A restore drill's result (`backupctl drill --notify`).
    Drill(DrillResult),
}

impl Event {
    /// Whether this is a failure (sent with `on = "failure"`) rather than a success. Alerts
    /// count as failures.
    pub fn is_failure(&self) -> bool {
        match self {
            Event::BackupSucceeded(_) => false,
            Event::Drill(d) => !d.passed,
            _ => true,
        }
    }

    /// The JSON `kind` and the word logs use.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::BackupSucceeded(_) => "backup_succeeded",
            Event::BackupFailed(_) => "backup_failed",
            Event::NoGoodBackup(_) => "no_good_backup",
            Event::ScheduleMissed(_) => "schedule_missed",
            Event::Drill(d) if d.passed => "drill_passed",
            Event::Drill(_) => "drill_failed",
        }
    }

    pub fn group(&self) -> &str {
        match self {
            Event::BackupSucceeded(r) | Event::BackupFailed(r) => &r.group,
            Event::NoGoodBackup(a) => &a.group,
            Event::ScheduleMissed(m) => &m.group,
            Event::Drill(d) => &d.group,
        }
    }

    /// The outcome of a terminal backup; `None` while it is not terminal.
    pub fn from_record(record: &BackupRecord) -> Option<Event> {
        let failure = match &record.state {
            State::Succeeded => None,
            State::Failed { phase, reason } => Some(Failure {
                phase: Some(phase.to_string()),
                reason: reason.clone(),
                aborted: false,
            }),
            State::Aborted { reason } => {
                Some(Failure { phase: None, reason: reason.clone(), aborted: true })
            }
            _ => return None,
        };
        let copy_began = record.servers.iter().any(|s| {
            s.copied_bytes > 0
                || matches!(
                    s.step,
                    ServerStep::Copying | ServerStep::Copied | ServerStep::CopyFailed
                )
                || matches!(
                    s.step,
                    ServerStep::Cleaning | ServerStep::Cleaned | ServerStep::CleanupFailed
                )
        });
        let report = BackupReport {
            group: record.group.clone(),
            backup_id: record.id.clone(),
            started: record.created,
            finished: record.finished,
            servers: record.servers.iter().map(ServerReport::from_record).collect(),
            bytes_copied: copy_began.then(|| record.servers.iter().map(|s| s.copied_bytes).sum()),
            bytes_total: copy_began.then(|| record.servers.iter().map(|s| s.total_bytes).sum()),
            bytes_stored: None,
            cut: record.verdict.as_ref().map(|v| (v.consistent, v.text.clone())),
            failure,
        };
        Some(if report.failure.is_some() {
            Event::BackupFailed(report)
        } else {
            Event::BackupSucceeded(report)
        })
    }
}

/// A terminal backup as people need to hear about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    pub group: String,
    pub backup_id: String,
    pub started: Millis,
    pub finished: Option<Millis>,
    pub servers: Vec<ServerReport>,
    /// Bytes of snapshots copied, once any copy began; `None` when no copy began.
    pub bytes_copied: Option<u64>,
    /// Bytes the snapshots hold (what the copies had to read), once any copy began.
    pub bytes_total: Option<u64>,
    /// Bytes newly stored after dedup and compression; `None`: not known (the catalog does not
    /// record it yet).
    pub bytes_stored: Option<u64>,
    /// Whether the cut was consistent, and the verdict in words; `None` when never judged.
    pub cut: Option<(bool, String)>,
    /// Why it failed; `None` for a success.
    pub failure: Option<Failure>,
}

impl BackupReport {
    pub fn duration(&self) -> Option<Duration> {
        let ms = self.finished?.checked_sub(self.started)?;
        Some(Duration::from_millis(u64::try_from(ms).ok()?))
    }

    /// The servers whose own step failed, first: those are the ones a reader must look at.
    pub fn failed_servers(&self) -> impl Iterator<Item = &ServerReport> {
        self.servers.iter().filter(|s| s.failed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The backup's state when it failed (`PREPARING`, `COPYING`, ...); `None` for an abort.
    pub phase: Option<String>,
    pub reason: String,
    /// An operator (or the backup software) aborted it.
    pub aborted: bool,
}

/// One server's part: where it got to, what it said, how long it was frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReport {
    pub server: String,
    /// Its step as `status` shows it (`cleaned`, `prepare-failed`, ...).
    pub state: String,
    /// Its step failed (prepare, commit, copy or cleanup).
    pub failed: bool,
    pub detail: String,
    /// How long it was frozen (from the agent), once it answered Commit; with `writes_held`
    /// telling whether its hold is known to stop writes, and `hold` the hold in words.
    pub frozen_ms: Option<u64>,
    pub writes_held: bool,
    pub hold: Option<String>,
    pub bytes_copied: u64,
    pub bytes_total: u64,
}

impl ServerReport {
    fn from_record(s: &stillpoint_protocol::model::ServerRecord) -> ServerReport {
        let failed = matches!(
            s.step,
            ServerStep::PrepareFailed
                | ServerStep::CommitFailed
                | ServerStep::CopyFailed
                | ServerStep::CleanupFailed
                | ServerStep::AbortFailed
        );
        ServerReport {
            server: s.server.clone(),
            state: s.step.as_str(),
            failed,
            detail: s.detail.clone(),
            frozen_ms: s.cut.committed.map(|_| s.cut.held_ms),
            writes_held: s.cut.writes_held(),
            hold: s.cut.hold.map(|h| h.to_string()),
            bytes_copied: s.copied_bytes,
            bytes_total: s.total_bytes,
        }
    }
}

/// A group has had no good (SUCCEEDED) backup for `for_how_long`, past its
/// `no_good_backup_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoGoodBackup {
    pub group: String,
    /// When its last good backup finished; `None`: none since the listener started watching
    /// (then `for_how_long` counts from `since`).
    pub last_good: Option<Millis>,
    /// When the lapse began: the last good backup's end, or the listener's start.
    pub since: Millis,
    pub for_how_long: Duration,
    /// The group's `no_good_backup_after`.
    pub limit: Duration,
}

/// A schedule's run did not happen (or did not start) when it was due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleMissed {
    pub schedule: String,
    pub group: String,
    pub due: Millis,
    pub why: String,
}

/// What a restore drill found: the backup it restored, whether every restore and check passed,
/// each failure in a line, and the drill's own report as people read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillResult {
    /// The backup's group; empty when the drill could not tell.
    pub group: String,
    /// The backup restored; empty when the drill failed before choosing one.
    pub backup: String,
    pub passed: bool,
    pub failures: Vec<String>,
    /// The drill's report (or why it could not run).
    pub report: String,
}
