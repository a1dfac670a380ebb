//! Notifications from the runtime (`[notify]`, the `stillpoint-notify` crate): a backup that
//! reaches a terminal state is sent as an event once, and a watchdog task alerts once per
//! lapse when a group has had no good backup for its `no_good_backup_after`. Sending never
//! waits: the notifier queues. Nothing here changes a backup.

use std::sync::{Arc, Mutex};

use stillpoint_notify::{Event, Notifier, ScheduleMissed, Watchdog, Workers};
use tokio_util::sync::CancellationToken;

use super::{Clock, Runtime};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::{BackupRecord, Millis, State};
use crate::store::Store;

/// The longest the watchdog sleeps between two checks.
const RECHECK_MS: Millis = 3_600_000;

/// The notifier and the no-good-backup watchdog of one listener process.
pub struct Notifications {
    notifier: Notifier,
    /// Taken by `spawn`; messages sent before wait in the queues.
    workers: Mutex<Option<Workers>>,
    watchdog: Mutex<Watchdog>,
    /// Wakes the watchdog task when a good backup may have moved its next deadline.
    wake: tokio::sync::Notify,
}

impl Notifications {
    /// Reads `[notify]`'s secrets and the catalog's last good backup of every watched group;
    /// `None` when nothing is to be sent. The watch counts from `now` for a group that never
    /// had a good backup. Blocking (the catalog).
    pub fn open(config: &Config, store: &Store, now: Millis) -> Result<Option<Arc<Notifications>>> {
        let Some(notify) = config.notify.as_ref().filter(|n| n.has_targets()) else {
            return Ok(None);
        };
        let (notifier, workers) = Notifier::new(notify)
            .map_err(|e| Error::Config { path: "[notify]".into(), problems: e.to_string() })?;
        let watched: Vec<_> = config
            .groups
            .iter()
            .filter_map(|g| g.no_good_backup_after.map(|after| (g.name.clone(), after.0)))
            .collect();
        let records = if watched.is_empty() { Vec::new() } else { store.list()? };
        let groups = watched.into_iter().map(|(group, after)| {
            let last_good = records
                .iter()
                .filter(|r| r.group == group && r.state == State::Succeeded)
                .filter_map(|r| r.finished)
                .max();
            (group, after, last_good)
        });
        Ok(Some(Arc::new(Notifications {
            notifier,
            workers: Mutex::new(Some(workers)),
            watchdog: Mutex::new(Watchdog::new(now, groups)),
            wake: tokio::sync::Notify::new(),
        })))
    }

    /// Sends the outcome of a backup that just became terminal; a good one ends its group's
    /// lapse.
    pub fn backup_ended(&self, record: &BackupRecord, now: Millis) {
        let Some(event) = Event::from_record(record) else { return };
        if record.state == State::Succeeded {
            self.lock().succeeded(&record.group, record.finished.unwrap_or(now));
            self.wake.notify_one();
        }
        self.notifier.send(&event);
    }

    /// Sends a missed-schedule alert (for the scheduler).
    pub fn schedule_missed(&self, missed: ScheduleMissed) {
        self.notifier.send(&Event::ScheduleMissed(missed));
    }

    /// Starts the senders and the watchdog; they stop with `stop`.
    fn spawn(self: &Arc<Self>, clock: Clock, stop: CancellationToken) {
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(workers) = workers else { return };
        workers.spawn(stop.clone());
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                // Armed before the check, so a success during it is not missed.
                let woken = this.wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let now = clock.now();
                let (alerts, next) = {
                    let mut watchdog = this.lock();
                    (watchdog.check(now), watchdog.next_check())
                };
                for alert in alerts {
                    tracing::warn!(group = %alert.group, for_ms = alert.for_how_long.as_millis() as u64, "no good backup for longer than no_good_backup_after");
                    this.notifier.send(&Event::NoGoodBackup(alert));
                }
                // At most an hour at a time: a far deadline is no instant to overflow.
                let at = next.unwrap_or(Millis::MAX).min(now.saturating_add(RECHECK_MS));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = &mut woken => {}
                    () = tokio::time::sleep_until(clock.instant_of(at)) => {}
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watchdog> {
        self.watchdog.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Runtime {
    /// Starts the notification senders and the no-good-backup watchdog, which stop with the
    /// runtime like the sweep.
    pub fn spawn_notify(&self) {
        if let Some(notify) = &self.notify {
            notify.spawn(self.clock, self.shutdown.clone());
        }
    }

    /// Tells `[notify]` that a scheduled backup did not run when due. For the scheduler; does
    /// nothing without `[notify]` targets, and never waits.
    pub fn notify_schedule_missed(&self, missed: ScheduleMissed) {
        if let Some(notify) = &self.notify {
            notify.schedule_missed(missed);
        }
    }

    /// A backup just became terminal.
    pub(super) fn notify_ended(&self, record: &BackupRecord) {
        if let Some(notify) = &self.notify {
            notify.backup_ended(record, self.clock.now());
        }
    }
}
