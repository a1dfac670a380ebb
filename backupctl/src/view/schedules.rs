//! `schedules`: the listener's schedules as the stable `--json` shape (`JSON.md`) and as a
//! table whose times are in the listener's time zone, the one cron expressions are read in.

use serde::Serialize;
use stillpoint_proto::{ListSchedulesResponse, Schedule, ScheduleRun};

use super::{ms, rfc3339, table, text};

#[derive(Debug, Serialize)]
pub struct ScheduleView {
    pub name: String,
    pub group: String,
    pub cron: String,
    /// The listener's time zone, which `cron` is read in.
    pub time_zone: String,
    pub suspended: bool,
    pub next_unix_ms: Option<i64>,
    pub next: Option<String>,
    pub last: Option<ScheduleRunView>,
}

#[derive(Debug, Serialize)]
pub struct ScheduleRunView {
    pub due_unix_ms: Option<i64>,
    pub due: Option<String>,
    pub at_unix_ms: Option<i64>,
    pub at: Option<String>,
    /// `started`, `skipped-busy`, `failed` or `missed`.
    pub outcome: String,
    pub backup_id: Option<String>,
    pub text: String,
    pub missed: u32,
}

impl ScheduleView {
    pub fn new(s: &Schedule, time_zone: &str) -> ScheduleView {
        ScheduleView {
            name: s.name.clone(),
            group: s.group.clone(),
            cron: s.cron.clone(),
            time_zone: time_zone.to_string(),
            suspended: s.suspended,
            next_unix_ms: ms(s.next_unix_ms),
            next: rfc3339(s.next_unix_ms),
            last: s.last.as_ref().map(ScheduleRunView::from),
        }
    }
}

impl From<&ScheduleRun> for ScheduleRunView {
    fn from(r: &ScheduleRun) -> Self {
        ScheduleRunView {
            due_unix_ms: ms(r.due_unix_ms),
            due: rfc3339(r.due_unix_ms),
            at_unix_ms: ms(r.at_unix_ms),
            at: rfc3339(r.at_unix_ms),
            outcome: r.outcome.clone(),
            backup_id: text(&r.backup_id),
            text: r.text.clone(),
            missed: r.missed,
        }
    }
}

/// `Thu 2026-12-03 22:00 CET` in `tz` (UTC when this host does not know the zone).
pub fn local_time(unix_ms: i64, tz: &jiff::tz::TimeZone) -> String {
    match jiff::Timestamp::from_millisecond(unix_ms) {
        Ok(t) => t.to_zoned_datetime(tz.clone()).strftime("%a %F %H:%M %Z").to_string(),
        Err(_) => "-".into(),
    }
}

/// How far ahead `at` is: `in 3h 12m`, `in 2d 4h`, `in 5m`, `due now`.
pub fn from_now(at: i64, now: i64) -> String {
    let minutes = (at - now).div_euclid(60_000);
    match minutes {
        i64::MIN..=-1 => "due now".into(),
        0 => "in <1m".into(),
        1..=59 => format!("in {minutes}m"),
        60..=1439 => format!("in {}h {}m", minutes / 60, minutes % 60),
        _ => format!("in {}d {}h", minutes / 1440, (minutes % 1440) / 60),
    }
}

/// The table `backupctl schedules` prints, under a line naming the time zone.
pub fn schedules_human(list: &ListSchedulesResponse) -> String {
    let tz = jiff::tz::TimeZone::get(&list.time_zone).unwrap_or(jiff::tz::TimeZone::UTC);
    let rows: Vec<Vec<String>> = list
        .schedules
        .iter()
        .map(|s| {
            let next = if s.suspended {
                "- (suspended)".to_string()
            } else if s.next_unix_ms <= 0 {
                "never".to_string()
            } else {
                format!(
                    "{} ({})",
                    local_time(s.next_unix_ms, &tz),
                    from_now(s.next_unix_ms, list.now_unix_ms)
                )
            };
            let (last, outcome) = match &s.last {
                Some(r) => (local_time(r.due_unix_ms, &tz), r.text.clone()),
                None => ("-".into(), "-".into()),
            };
            let suspended = if s.suspended { "yes" } else { "no" };
            vec![
                s.name.clone(),
                s.group.clone(),
                s.cron.clone(),
                next,
                last,
                outcome,
                suspended.to_string(),
            ]
        })
        .collect();
    let mut out = format!("time zone: {}\n", list.time_zone);
    out.push_str(&table(
        &["NAME", "GROUP", "CRON", "NEXT RUN", "LAST RUN", "OUTCOME", "SUSPENDED"],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests;
