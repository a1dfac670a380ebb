//! Schedules as a pure state machine: `handle(now, Input) -> Vec<Action>`, time an input. It
//! decides which schedules are due, what a start's outcome means, what was missed while the
//! listener was down, and suspend and resume; `runtime/scheduler.rs` executes its actions
//! (starts backups, saves, publishes events). No clock, no IO here.
//!
//! Missed runs: a due time found up to [`CATCH_UP_MS`] late still runs (once, the latest one);
//! older due times are reported missed in one report, never run late, never a burst.

use std::collections::{BTreeMap, HashMap};

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::Millis;

pub mod cron;

pub use cron::Cron;

/// How late a due time may be found and still run: a listener restarted within five minutes
/// (an upgrade, a crash and systemd's restart) still takes the backup it was about to take.
pub const CATCH_UP_MS: Millis = 5 * 60_000;

/// Missed due times are counted up to this many; a report says "at least" beyond it.
pub const MAX_COUNTED: u32 = 10_000;

/// One `[[schedule]]`: a group backed up at the times a cron expression gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub name: String,
    pub group: String,
    pub cron: Cron,
    /// `enabled = false` in the config: it starts suspended (until resumed).
    pub enabled: bool,
}

/// What a schedule keeps across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The cron expression these times were computed for; another one starts afresh.
    pub cron: String,
    /// Due times after this one are still to come (fired, skipped or missed up to here).
    pub after: Millis,
    pub suspended: bool,
    pub last: Option<LastRun>,
}

/// The last due time a schedule handled, and what came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRun {
    pub due: Millis,
    /// When it was handled (later than `due` when caught up late).
    pub at: Millis,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// The backup was started.
    Started { backup: String },
    /// The group had a backup that was not terminal; nothing was started.
    SkippedBusy { by: String },
    /// The start was refused for another reason.
    Failed { error: String },
    /// Due times passed while the listener was down (or this schedule's task could not run):
    /// `count` of them (at least, when `MAX_COUNTED`), the first at `first_due`.
    Missed { first_due: Millis, count: u32 },
}

impl Outcome {
    /// The outcome as `backupctl schedules` and the log say it.
    pub fn text(&self) -> String {
        match self {
            Outcome::Started { backup } => format!("started {backup}"),
            Outcome::SkippedBusy { by } => format!("skipped: group busy with backup {by}"),
            Outcome::Failed { error } => format!("failed to start: {error}"),
            Outcome::Missed { count, .. } if *count >= MAX_COUNTED => {
                format!("missed at least {count} runs while the listener was down")
            }
            Outcome::Missed { count, .. } => {
                format!("missed {count} run(s) while the listener was down")
            }
        }
    }
}

/// What the notifications see of schedules (`Runtime::subscribe_schedules`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleEvent {
    Fired {
        schedule: String,
        group: String,
        due: Millis,
        backup: String,
    },
    SkippedBusy {
        schedule: String,
        group: String,
        due: Millis,
        by: String,
    },
    /// Due times that passed unrun; `due` is the first, `count` how many (see `MAX_COUNTED`).
    Missed {
        schedule: String,
        group: String,
        due: Millis,
        count: u32,
    },
    /// The start was refused for a reason other than a busy group.
    Failed {
        schedule: String,
        group: String,
        due: Millis,
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Time passed: start what is due.
    Tick,
    /// What came of a [`Action::Start`].
    Started {
        schedule: String,
        due: Millis,
        backup: String,
    },
    Busy {
        schedule: String,
        due: Millis,
        by: String,
    },
    StartFailed {
        schedule: String,
        due: Millis,
        error: String,
    },
    Suspend {
        schedule: String,
    },
    /// Runs again from its next due time after `now`; nothing it skipped while suspended.
    Resume {
        schedule: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a backup of `group`, by `schedule:<schedule>`, for due time `due`; answer with
    /// `Started`, `Busy` or `StartFailed`.
    Start {
        schedule: String,
        group: String,
        due: Millis,
    },
    /// Keep this schedule's state (before telling anyone about it).
    Save {
        schedule: String,
        saved: Saved,
    },
    Publish(ScheduleEvent),
}

/// A schedule as `ListSchedules` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub name: String,
    pub group: String,
    pub cron: String,
    /// `None` while suspended, or when the expression never runs again.
    pub next: Option<Millis>,
    pub suspended: bool,
    pub last: Option<LastRun>,
}

struct Entry {
    schedule: Schedule,
    saved: Saved,
    /// A start is under way for this due time.
    starting: Option<Millis>,
}

/// Every configured schedule and its state.
pub struct Scheduler {
    tz: TimeZone,
    entries: BTreeMap<String, Entry>,
}

fn ts(ms: Millis) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

impl Scheduler {
    /// The configured schedules with what was saved of them. A schedule new to this listener,
    /// or whose expression changed, counts from `now` (nothing missed before it existed); one
    /// `enabled = false` starts suspended; saved state of schedules no longer configured is
    /// dropped.
    pub fn new(
        schedules: Vec<Schedule>,
        mut saved: HashMap<String, Saved>,
        tz: TimeZone,
        now: Millis,
    ) -> Scheduler {
        let entries = schedules
            .into_iter()
            .map(|schedule| {
                let fresh = Saved {
                    cron: schedule.cron.as_str().to_string(),
                    after: now,
                    suspended: !schedule.enabled,
                    last: None,
                };
                let saved = match saved.remove(&schedule.name) {
                    Some(s) if s.cron == fresh.cron => s,
                    // Suspended by an operator stays suspended under a new expression.
                    Some(s) => {
                        Saved { suspended: s.suspended || fresh.suspended, last: s.last, ..fresh }
                    }
                    None => fresh,
                };
                (schedule.name.clone(), Entry { schedule, saved, starting: None })
            })
            .collect();
        Scheduler { tz, entries }
    }

    pub fn time_zone(&self) -> &TimeZone {
        &self.tz
    }

    /// The state to save for every schedule (at start, so new ones count from now).
    pub fn saved(&self) -> HashMap<String, Saved> {
        self.entries.iter().map(|(name, e)| (name.clone(), e.saved.clone())).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn next(&self, entry: &Entry) -> Option<Millis> {
        entry.schedule.cron.next_after(ts(entry.saved.after), &self.tz).map(|t| t.as_millisecond())
    }

    /// When the next tick is needed: the earliest due time of a schedule that is not
    /// suspended and not starting.
    pub fn next_due(&self) -> Option<Millis> {
        self.entries
            .values()
            .filter(|e| !e.saved.suspended && e.starting.is_none())
            .filter_map(|e| self.next(e))
            .min()
    }

    pub fn views(&self) -> Vec<View> {
        self.entries
            .values()
            .map(|e| View {
                name: e.schedule.name.clone(),
                group: e.schedule.group.clone(),
                cron: e.schedule.cron.as_str().to_string(),
                next: if e.saved.suspended { None } else { self.next(e) },
                suspended: e.saved.suspended,
                last: e.saved.last.clone(),
            })
            .collect()
    }

    pub fn view(&self, name: &str) -> Option<View> {
        self.views().into_iter().find(|v| v.name == name)
    }

    pub fn handle(&mut self, now: Millis, input: Input) -> Vec<Action> {
        match input {
            Input::Tick => self.tick(now),
            Input::Started { schedule, due, backup } => {
                let outcome = Outcome::Started { backup: backup.clone() };
                self.finish(now, &schedule, due, outcome, |s, group| ScheduleEvent::Fired {
                    schedule: s,
                    group,
                    due,
                    backup,
                })
            }
            Input::Busy { schedule, due, by } => {
                let outcome = Outcome::SkippedBusy { by: by.clone() };
                self.finish(now, &schedule, due, outcome, |s, group| ScheduleEvent::SkippedBusy {
                    schedule: s,
                    group,
                    due,
                    by,
                })
            }
            Input::StartFailed { schedule, due, error } => {
                let outcome = Outcome::Failed { error: error.clone() };
                self.finish(now, &schedule, due, outcome, |s, group| ScheduleEvent::Failed {
                    schedule: s,
                    group,
                    due,
                    error,
                })
            }
            Input::Suspend { schedule } => {
                let Some(entry) = self.entries.get_mut(&schedule) else { return Vec::new() };
                if entry.saved.suspended {
                    return Vec::new();
                }
                entry.saved.suspended = true;
                vec![Action::Save { schedule, saved: entry.saved.clone() }]
            }
            Input::Resume { schedule } => {
                let Some(entry) = self.entries.get_mut(&schedule) else { return Vec::new() };
                if !entry.saved.suspended {
                    return Vec::new();
                }
                entry.saved.suspended = false;
                // What fell due while suspended is neither run nor missed.
                entry.saved.after = entry.saved.after.max(now);
                vec![Action::Save { schedule, saved: entry.saved.clone() }]
            }
        }
    }

    fn tick(&mut self, now: Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        let tz = self.tz.clone();
        for (name, entry) in &mut self.entries {
            if entry.saved.suspended || entry.starting.is_some() {
                continue;
            }
            let next = |at: Millis| {
                entry.schedule.cron.next_after(ts(at), &tz).map(|t| t.as_millisecond())
            };
            let Some(first) = next(entry.saved.after) else { continue };
            if first > now {
                continue;
            }
            // Every due time up to now: the latest within the catch-up window runs, the rest
            // are missed.
            let window = now - CATCH_UP_MS;
            let mut run = None;
            let mut missed: Option<(Millis, Millis)> = None;
            let mut count = 0u32;
            let mut due = Some(first);
            while let Some(d) = due.filter(|d| *d <= now) {
                if d > window {
                    if let Some(earlier) = run.replace(d) {
                        count += 1;
                        missed = Some((missed.map_or(earlier, |m| m.0), earlier));
                    }
                } else {
                    count += 1;
                    missed = Some((missed.map_or(d, |m| m.0), d));
                }
                due = if count >= MAX_COUNTED && d <= window { next(window) } else { next(d) };
            }
            if let Some((first_due, last_due)) = missed {
                // With nothing to run, every due time up to now was handled.
                let handled = if run.is_some() { last_due } else { now };
                entry.saved.after = entry.saved.after.max(handled);
                entry.saved.last = Some(LastRun {
                    due: first_due,
                    at: now,
                    outcome: Outcome::Missed { first_due, count },
                });
                actions.push(Action::Save { schedule: name.clone(), saved: entry.saved.clone() });
                actions.push(Action::Publish(ScheduleEvent::Missed {
                    schedule: name.clone(),
                    group: entry.schedule.group.clone(),
                    due: first_due,
                    count,
                }));
            }
            if let Some(due) = run {
                entry.starting = Some(due);
                actions.push(Action::Start {
                    schedule: name.clone(),
                    group: entry.schedule.group.clone(),
                    due,
                });
            }
        }
        actions
    }

    /// A start's outcome: saved, then published.
    fn finish(
        &mut self,
        now: Millis,
        name: &str,
        due: Millis,
        outcome: Outcome,
        event: impl FnOnce(String, String) -> ScheduleEvent,
    ) -> Vec<Action> {
        let Some(entry) = self.entries.get_mut(name) else { return Vec::new() };
        if entry.starting != Some(due) {
            return Vec::new();
        }
        entry.starting = None;
        entry.saved.after = entry.saved.after.max(due);
        entry.saved.last = Some(LastRun { due, at: now, outcome });
        vec![
            Action::Save { schedule: name.to_string(), saved: entry.saved.clone() },
            Action::Publish(event(name.to_string(), entry.schedule.group.clone())),
        ]
    }
}

#[cfg(test)]
mod tests;
