//! "No good backup for too long", as a pure machine: time is an argument, so every rule is a
//! unit test without sleeping. One alert per lapse: a group alerts when its last good backup
//! (or, never having had one, the watch's start) is `after` old, then stays quiet until a
//! good backup ends the lapse.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::event::{Millis, NoGoodBackup};

#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    after: Duration,
    last_good: Option<Millis>,
    /// This lapse was alerted.
    alerted: bool,
}

/// The groups watched, each with its `no_good_backup_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watchdog {
    started: Millis,
    groups: BTreeMap<String, Group>,
}

impl Watchdog {
    /// Watches from `started` (the listener's start). `groups`: each group's name, its limit
    /// and when its last good backup finished, if it had one.
    pub fn new(
        started: Millis,
        groups: impl IntoIterator<Item = (String, Duration, Option<Millis>)>,
    ) -> Watchdog {
        let groups = groups
            .into_iter()
            .map(|(name, after, last_good)| (name, Group { after, last_good, alerted: false }))
            .collect();
        Watchdog { started, groups }
    }

    /// A good backup of `group` finished at `at`: its lapse, if any, is over.
    pub fn succeeded(&mut self, group: &str, at: Millis) {
        if let Some(g) = self.groups.get_mut(group) {
            if g.last_good.is_none_or(|last| at >= last) {
                g.last_good = Some(at);
                g.alerted = false;
            }
        }
    }

    /// The alerts due at `now`, each once per lapse.
    pub fn check(&mut self, now: Millis) -> Vec<NoGoodBackup> {
        let started = self.started;
        let mut alerts = Vec::new();
        for (name, g) in &mut self.groups {
            let since = g.last_good.unwrap_or(started);
            let due = since.saturating_add(millis(g.after));
            if g.alerted || now < due {
                continue;
            }
            g.alerted = true;
            alerts.push(NoGoodBackup {
                group: name.clone(),
                last_good: g.last_good,
                since,
                for_how_long: Duration::from_millis(u64::try_from(now - since).unwrap_or(0)),
                limit: g.after,
            });
        }
        alerts
    }

    /// When the next alert may fall due, if no good backup comes first; `None`: every lapse
    /// was alerted (only a success can change that).
    pub fn next_check(&self) -> Option<Millis> {
        self.groups
            .values()
            .filter(|g| !g.alerted)
            .map(|g| g.last_good.unwrap_or(self.started).saturating_add(millis(g.after)))
            .min()
    }
}

fn millis(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

#[cfg(test)]
mod tests;
