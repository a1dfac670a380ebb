//! Executes the schedules' machine (`crate::schedule`): one background task sleeps until the
//! next due time on the runtime's clock and ticks it; starts go through `Runtime::start` (the
//! StartBackup path), by `schedule:<name>`, with the request id `schedule.<name>.<due>` so a
//! restart that fires the same due time again gets the same backup. State is kept in
//! `<data_dir>/schedules.json` (see `Saved`), events go to a broadcast for notifications.
//!
//! Why a file and not the catalog: it is a handful of rows, written once per run or operator
//! action, and has no transaction to share with backups (the request id ties a start to its
//! backup); a file keeps it out of the catalog's writer and readable by an operator.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Notify};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::Millis;
use crate::requests::RequestId;
use crate::schedule::{Action, Input, Saved, ScheduleEvent, Scheduler, View};

use super::Runtime;

/// The file schedules' state is kept in, in the data directory.
pub const FILE: &str = "schedules.json";

/// The longest the task sleeps without looking again (a due time is never more than this late
/// because of a missed wake-up).
const LOOK_AGAIN: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    schedules: HashMap<String, Saved>,
}

/// The runtime's schedules: the machine, where its state is kept, and its events.
pub struct Schedules {
    machine: Mutex<Scheduler>,
    file: PathBuf,
    /// One save at a time, each writing the machine's whole state as it is then.
    saving: tokio::sync::Mutex<()>,
    events: broadcast::Sender<ScheduleEvent>,
    /// Wakes the task when a suspend or resume changed the next due time.
    wake: Notify,
}

impl Schedules {
    /// The configured schedules with their saved state. Blocking (reads the file). A file that
    /// cannot be read is an error: starting afresh would forget suspensions.
    pub fn open(config: &Config, now: Millis) -> Result<Schedules> {
        let file = config.data_dir.join(FILE);
        let saved = load(&file)?;
        let tz = config.time_zone().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "schedules run in UTC");
            jiff::tz::TimeZone::UTC
        });
        let machine = Scheduler::new(config.schedules(), saved, tz, now);
        let (events, _) = broadcast::channel(256);
        Ok(Schedules {
            machine: Mutex::new(machine),
            file,
            saving: tokio::sync::Mutex::new(()),
            events,
            wake: Notify::new(),
        })
    }

    fn machine(&self) -> MutexGuard<'_, Scheduler> {
        // Never held across an await; a panic while holding it leaves a whole machine.
        self.machine.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn save(&self) -> Result<()> {
        let _one = self.saving.lock().await;
        let body = File { version: 1, schedules: self.machine().saved() };
        let body = serde_json::to_vec_pretty(&body).map_err(|e| store_error(&self.file, &e))?;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || write_atomically(&file, &body))
            .await
            .map_err(|e| store_error(&self.file, &e))?
            .map_err(|e| store_error(&self.file, &e))
    }
}

fn store_error(file: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::Store { path: file.display().to_string(), reason: e.to_string() }
}

fn load(file: &Path) -> Result<HashMap<String, Saved>> {
    let body = match std::fs::read(file) {
        Ok(body) => body,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(store_error(file, &e)),
    };
    let parsed: File = serde_json::from_slice(&body)
        .map_err(|e| store_error(file, &format!("{e}; fix or remove the file")))?;
    if parsed.version != 1 {
        return Err(store_error(
            file,
            &format!("version {} was written by a newer listener", parsed.version),
        ));
    }
    Ok(parsed.schedules)
}

/// Temp file, fsync, rename, fsync the directory: a crash leaves the old state or the new.
fn write_atomically(file: &Path, body: &[u8]) -> std::io::Result<()> {
    let temp = file.with_extension("json.tmp");
    let mut f = std::fs::File::create(&temp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&temp, file)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Runtime {
    /// Saves the schedules' state (new schedules count from now), ticks at once (reporting
    /// what was missed while the listener was down), then at every due time, until the
    /// runtime stops.
    pub fn spawn_scheduler(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = this.schedules.save().await {
                tracing::error!(error = %e, "could not save the schedules' state");
            }
            loop {
                tokio::select! {
                    () = this.tick_schedules(this.now()) => {}
                    () = stop.cancelled() => return,
                }
                let now = this.now();
                let next = this.schedules.machine().next_due();
                let wake_at = next.map_or(now + LOOK_AGAIN.as_millis() as Millis, |due| {
                    due.min(now + LOOK_AGAIN.as_millis() as Millis)
                });
                let wake = this.schedules.wake.notified();
                tokio::select! {
                    () = tokio::time::sleep_until(this.clock.instant_of(wake_at)) => {}
                    () = wake => {}
                    () = stop.cancelled() => return,
                }
            }
        });
    }

    /// Starts what is due at `now` and records what came of it. The background task calls it
    /// with the runtime's clock; tests call it with the time they want.
    pub async fn tick_schedules(self: &Arc<Self>, now: Millis) {
        let actions = self.schedules.machine().handle(now, Input::Tick);
        self.execute_schedules(now, actions).await;
    }

    async fn execute_schedules(self: &Arc<Self>, now: Millis, actions: Vec<Action>) {
        let mut queue = VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Start { schedule, group, due } => {
                    let input = self.start_scheduled(&schedule, &group, due).await;
                    queue.extend(self.schedules.machine().handle(now, input));
                }
                Action::Save { schedule, .. } => {
                    if let Err(e) = self.schedules.save().await {
                        tracing::error!(schedule, error = %e, "could not save the schedule's state");
                    }
                }
                Action::Publish(event) => {
                    log(&event);
                    if let Some(missed) = not_run(&event) {
                        self.notify_schedule_missed(missed);
                    }
                    // Nobody listening is fine.
                    let _ = self.schedules.events.send(event);
                }
            }
        }
    }

    async fn start_scheduled(self: &Arc<Self>, schedule: &str, group: &str, due: Millis) -> Input {
        let by = format!("schedule:{schedule}");
        let request_id = RequestId::parse(&format!("schedule.{schedule}.{due}")).ok().flatten();
        let (schedule, due) = (schedule.to_string(), due);
        match self.start(group, &by, request_id.as_ref()).await {
            Ok(record) => Input::Started { schedule, due, backup: record.id },
            Err(Error::Busy { backup, .. }) => Input::Busy { schedule, due, by: backup },
            Err(e) => Input::StartFailed { schedule, due, error: e.to_string() },
        }
    }

    /// Every schedule as it is now, and the time zone they run in.
    pub fn schedules(&self) -> (Vec<View>, String) {
        let machine = self.schedules.machine();
        let tz = machine.time_zone();
        let name = tz.iana_name().map_or_else(|| format!("{tz:?}"), str::to_string);
        (machine.views(), name)
    }

    /// Suspends (or with `suspend` false, resumes) schedule `name`; saved before it returns.
    pub async fn suspend_schedule(self: &Arc<Self>, name: &str, suspend: bool) -> Result<View> {
        let now = self.now();
        let actions = {
            let mut machine = self.schedules.machine();
            if !machine.contains(name) {
                let known = machine.views().into_iter().map(|v| v.name).collect::<Vec<_>>();
                return Err(Error::UnknownSchedule {
                    schedule: name.into(),
                    known: known.join(", "),
                });
            }
            let schedule = name.to_string();
            let input =
                if suspend { Input::Suspend { schedule } } else { Input::Resume { schedule } };
            machine.handle(now, input)
        };
        if !actions.is_empty() {
            let done = if suspend { "suspended" } else { "resumed" };
            self.schedules.save().await.map_err(|e| Error::Store {
                path: self.schedules.file.display().to_string(),
                reason: format!(
                    "schedule {name} is {done} until the listener restarts, but could not be saved: {e}"
                ),
            })?;
            tracing::info!(
                schedule = name,
                suspended = suspend,
                "schedule {}",
                if suspend { "suspended" } else { "resumed" }
            );
        }
        self.schedules.wake.notify_one();
        let view = self.schedules.machine().view(name);
        view.ok_or_else(|| Error::UnknownSchedule { schedule: name.into(), known: String::new() })
    }

    /// Every schedule event from now on: fired, skipped because the group was busy, missed,
    /// failed to start.
    pub fn subscribe_schedules(&self) -> broadcast::Receiver<ScheduleEvent> {
        self.schedules.events.subscribe()
    }
}

/// A due time that started no backup, as `[notify]` tells people: a busy group, a start refused,
/// runs missed while the listener was down. A schedule that never ran is a failure too.
fn not_run(event: &ScheduleEvent) -> Option<stillpoint_notify::ScheduleMissed> {
    let (schedule, group, due, why) = match event {
        ScheduleEvent::Fired { .. } => return None,
        ScheduleEvent::SkippedBusy { schedule, group, due, by } => {
            (schedule, group, *due, format!("the group was busy with backup {by}; skipped"))
        }
        ScheduleEvent::Missed { schedule, group, due, count } => (
            schedule,
            group,
            *due,
            format!(
                "{count} run(s) found more than 5 minutes late (the listener was not running, or stalled); not run late"
            ),
        ),
        ScheduleEvent::Failed { schedule, group, due, error } => {
            (schedule, group, *due, format!("the start was refused: {error}"))
        }
    };
    Some(stillpoint_notify::ScheduleMissed {
        schedule: schedule.clone(),
        group: group.clone(),
        due,
        why,
    })
}

fn log(event: &ScheduleEvent) {
    match event {
        ScheduleEvent::Fired { schedule, group, due, backup } => {
            tracing::info!(schedule, group, due, backup, "schedule started a backup")
        }
        ScheduleEvent::SkippedBusy { schedule, group, due, by } => {
            tracing::warn!(
                schedule,
                group,
                due,
                busy_with = by,
                "schedule skipped: group busy with backup {by}"
            )
        }
        ScheduleEvent::Missed { schedule, group, due, count } => {
            tracing::warn!(
                schedule,
                group,
                first_due = due,
                count,
                "schedule found {count} run(s) more than 5 minutes late (listener down or stalled); not run late"
            )
        }
        ScheduleEvent::Failed { schedule, group, due, error } => {
            tracing::error!(schedule, group, due, error, "schedule could not start a backup")
        }
    }
}
