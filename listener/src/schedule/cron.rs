//! A cron expression (`minute hour day-of-month month day-of-week`, or `@daily` and friends)
//! and when it next runs in a time zone. Pure: no clock, no IO; the time zone is an argument.
//!
//! Daylight saving time: a local time that occurs twice (fall back) runs once, at its first
//! occurrence; a local time that does not exist (spring forward) runs once, at the instant the
//! clock jumps (02:30 on the day Berlin jumps from 02:00 to 03:00 runs at 03:00).

use std::fmt;

use jiff::civil::{Date, DateTime};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::Timestamp;

/// How far ahead `next_after` looks: a leap day on a given weekday recurs within 28 years, but
/// nobody schedules that; eight years cover every Feb 29.
const HORIZON_DAYS: i32 = 8 * 366;

/// A parsed cron expression: each field as the set of values it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    text: String,
    minutes: u64,
    hours: u32,
    /// Bits 1..=31.
    days: u32,
    /// Bits 1..=12.
    months: u16,
    /// Bits 0..=6, Sunday 0.
    weekdays: u8,
    /// Day-of-month was `*`: only the weekday restricts the day.
    any_day: bool,
    /// Day-of-week was `*`: only the day of the month restricts the day.
    any_weekday: bool,
}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Field = Field { name: "minute", min: 0, max: 59, names: &[] };
const HOUR: Field = Field { name: "hour", min: 0, max: 23, names: &[] };
const DAY: Field = Field { name: "day-of-month", min: 1, max: 31, names: &[] };
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
};
/// 7 is Sunday too, as in every cron.
const WEEKDAY: Field = Field {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

impl Field {
    fn allowed(&self) -> String {
        let mut s = format!("{}-{}", self.min, self.max);
        if let (Some(first), Some(last)) = (self.names.first(), self.names.last()) {
            s.push_str(&format!(" or {first}-{last}"));
        }
        s.push_str(", with lists (a,b), ranges (a-b) and steps (*/n, a-b/n)");
        s
    }

    fn value(&self, text: &str) -> Result<u32, String> {
        let lower = text.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(self.min + i as u32);
        }
        let v: u32 = text.parse().map_err(|_| format!("{text:?} is not a number"))?;
        if v < self.min || v > self.max {
            return Err(format!("{v} is outside {}-{}", self.min, self.max));
        }
        Ok(v)
    }

    /// The field's values as a bit set.
    fn parse(&self, text: &str) -> Result<u64, String> {
        let mut bits = 0u64;
        for item in text.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => {
                    let step: u32 = step
                        .parse()
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| format!("step {step:?} is not a number above 0"))?;
                    (range, step)
                }
                None => (item, 1),
            };
            let (low, high) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a)?, self.value(b)?);
                if a > b {
                    return Err(format!("range {range:?} runs backwards"));
                }
                (a, b)
            } else if range.is_empty() {
                return Err("an empty list item".into());
            } else {
                let a = self.value(range)?;
                // `a/n` is `a-max/n`.
                (a, if item.contains('/') { self.max } else { a })
            };
            let mut v = low;
            while v <= high {
                bits |= 1 << v;
                v += step;
            }
        }
        Ok(bits)
    }
}

impl Cron {
    /// Parses a 5-field expression or `@hourly`, `@daily` (`@midnight`), `@weekly`,
    /// `@monthly`, `@yearly` (`@annually`). The error names the field and what it allows.
    pub fn parse(text: &str) -> Result<Cron, String> {
        let trimmed = text.trim();
        let expanded = match trimmed {
            "@hourly" => "0 * * * *",
            "@daily" | "@midnight" => "0 0 * * *",
            "@weekly" => "0 0 * * 0",
            "@monthly" => "0 0 1 * *",
            "@yearly" | "@annually" => "0 0 1 1 *",
            other if other.starts_with('@') => {
                return Err(format!(
                    "{other:?} is not a known shorthand; use @hourly, @daily, @weekly, @monthly, @yearly or five fields"
                ))
            }
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "{} field(s); cron needs five: minute hour day-of-month month day-of-week (e.g. \"0 22 * * mon-fri\")",
                fields.len()
            ));
        }
        let one = |field: &Field, text: &str| {
            field.parse(text).map_err(|e| {
                format!("{} field {text:?}: {e}; allowed: {}", field.name, field.allowed())
            })
        };
        let weekdays = one(&WEEKDAY, fields[4])?;
        // Sunday is 0 and 7.
        let weekdays = ((weekdays | (weekdays >> 7)) & 0x7f) as u8;
        let cron = Cron {
            text: trimmed.to_string(),
            minutes: one(&MINUTE, fields[0])?,
            hours: one(&HOUR, fields[1])? as u32,
            days: one(&DAY, fields[2])? as u32,
            months: one(&MONTH, fields[3])? as u16,
            weekdays,
            any_day: fields[2] == "*",
            any_weekday: fields[4] == "*",
        };
        // "30 2 *" (February 30) would never run: refuse it now, not at 02:00 on no day.
        if !cron.any_weekday && !cron.any_day {
            return Ok(cron);
        }
        let longest = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        let possible = (1..=12)
            .any(|m| cron.months & (1 << m) != 0 && cron.days.trailing_zeros() <= longest[m - 1]);
        if !possible {
            return Err(format!(
                "day-of-month field {:?} never occurs in month field {:?}",
                fields[2], fields[3]
            ));
        }
        Ok(cron)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn runs_on(&self, date: Date) -> bool {
        if self.months & (1 << date.month()) == 0 {
            return false;
        }
        let day = self.days & (1 << date.day()) != 0;
        let weekday = self.weekdays & (1 << date.weekday().to_sunday_zero_offset()) != 0;
        // As in cron: with both restricted, either one will do.
        match (self.any_day, self.any_weekday) {
            (true, true) => true,
            (true, false) => weekday,
            (false, true) => day,
            (false, false) => day || weekday,
        }
    }

    /// The first run strictly after `after`, in `tz`; `None` if none within eight years.
    pub fn next_after(&self, after: Timestamp, tz: &TimeZone) -> Option<Timestamp> {
        // Every local time at or before `after`'s own resolves to an instant at or before
        // `after` (see `instant`: the mapping is monotonic), so the search starts there.
        let start = tz.to_datetime(after);
        let mut date = start.date();
        for _ in 0..HORIZON_DAYS {
            if self.runs_on(date) {
                let first_day = date == start.date();
                for hour in 0..24i8 {
                    if self.hours & (1 << hour) == 0 || (first_day && hour < start.hour()) {
                        continue;
                    }
                    for minute in 0..60i8 {
                        if self.minutes & (1 << minute) == 0 {
                            continue;
                        }
                        let local = date.at(hour, minute, 0, 0);
                        if let Some(at) = instant(local, tz).filter(|at| *at > after) {
                            return Some(at);
                        }
                    }
                }
            }
            date = date.tomorrow().ok()?;
        }
        None
    }
}

/// The instant a local time runs at: its first occurrence in a fold, the end of the gap
/// (the instant the clock jumps) for a time that does not exist. Monotonic in `local`.
fn instant(local: DateTime, tz: &TimeZone) -> Option<Timestamp> {
    let ambiguous = tz.to_ambiguous_timestamp(local);
    match ambiguous.offset() {
        AmbiguousOffset::Gap { after, .. } => {
            // Read with the offset after the jump, the local time is an instant before it.
            let before_jump = after.to_timestamp(local).ok()?;
            tz.following(before_jump).next().map(|t| t.timestamp())
        }
        AmbiguousOffset::Unambiguous { .. } | AmbiguousOffset::Fold { .. } => {
            ambiguous.earlier().ok()
        }
    }
}

impl fmt::Display for Cron {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests;
