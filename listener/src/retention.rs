//! Retention, as a pure decision: which of a group's backups to keep and every reason why, from
//! the group's rules, the time and the time zone its calendar buckets are cut in. No IO: the
//! listener's `retention/apply.rs` reads the catalog, asks this, and forgets what it drops.
//!
//! Semantics (README "Retention"): only good (SUCCEEDED) backups count toward a rule. Recent =
//! the newest `keep_recent`, Archive = the next `keep_archive` (HotBackup's folders); each
//! calendar rule keeps the newest good backup of each of its `keep_*` newest buckets that hold
//! one (restic's `forget --keep-daily` ...). Pins, running backups and the newest good backup
//! are always kept; failed and aborted ones stay apart until `failed_keep` after they started.

use std::collections::HashSet;
use std::fmt;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::Deserialize;

use crate::model::{BackupRecord, Millis, State};

/// A group's `[group.retention]` as written; [`RetentionConfig::rules`] checks it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(default)]
    pub keep_recent: u32,
    #[serde(default)]
    pub keep_archive: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
    /// How long failed and aborted backups stay, from when they started: `36h`, `14d`, `2w`.
    /// Absent: they are never forgotten by retention.
    #[serde(default)]
    pub failed_keep: Option<String>,
    /// The IANA zone calendar buckets are cut in (`Europe/Berlin`); absent: UTC.
    #[serde(default)]
    pub time_zone: Option<String>,
}

impl RetentionConfig {
    /// The checked rules, or every problem found (each naming its field).
    pub fn rules(&self) -> Result<Rules, Vec<String>> {
        let mut problems = Vec::new();
        let failed_keep = match self.failed_keep.as_deref().map(parse_duration) {
            None => None,
            Some(Ok(ms)) => Some(ms),
            Some(Err(e)) => {
                problems.push(format!("failed_keep: {e}"));
                None
            }
        };
        let time_zone = match self.time_zone.as_deref() {
            None => TimeZone::UTC,
            Some(name) => TimeZone::get(name).unwrap_or_else(|_| {
                problems.push(format!(
                    "time_zone: unknown zone {}; use an IANA name such as \"Europe/Berlin\" or \"UTC\"",
                    stillpoint_protocol::text::clip(name, 40)
                ));
                TimeZone::UTC
            }),
        };
        let rules = Rules {
            keep_recent: self.keep_recent,
            keep_archive: self.keep_archive,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            failed_keep,
            time_zone,
        };
        if rules.counts().iter().all(|n| *n == 0) {
            problems.push(
                "keeps nothing but the newest good backup: set keep_recent, keep_archive or a calendar rule (keep_daily, keep_weekly, keep_monthly, keep_yearly) above 0, or remove [group.retention] to keep everything"
                    .into(),
            );
        }
        if problems.is_empty() {
            Ok(rules)
        } else {
            Err(problems)
        }
    }
}

/// `<n>h`, `<n>d` (24 h) or `<n>w`, in milliseconds.
fn parse_duration(text: &str) -> Result<Millis, String> {
    let bad = || {
        format!(
            "{} is not a duration; write a whole number and h, d or w: \"36h\", \"14d\", \"2w\"",
            stillpoint_protocol::text::clip(text, 40)
        )
    };
    let text = text.trim();
    let unit = text.chars().last().ok_or_else(bad)?;
    let hours: i64 = match unit {
        'h' => 1,
        'd' => 24,
        'w' => 24 * 7,
        _ => return Err(bad()),
    };
    let n: i64 = text[..text.len() - 1].parse().map_err(|_| bad())?;
    n.checked_mul(hours * 3_600_000).filter(|ms| *ms >= 0).ok_or_else(bad)
}

/// Checked retention rules. `failed_keep` in milliseconds; `None`: failed backups stay.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    pub keep_recent: u32,
    pub keep_archive: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    pub failed_keep: Option<Millis>,
    pub time_zone: TimeZone,
}

impl Rules {
    fn counts(&self) -> [u32; 6] {
        [
            self.keep_recent,
            self.keep_archive,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
            self.keep_yearly,
        ]
    }
}

/// How a backup ended, as retention sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Good,
    Failed,
    Aborted,
    /// Not terminal yet: never touched.
    Running,
}

/// One backup of the group, as the decision needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub id: String,
    pub created: Millis,
    pub outcome: Outcome,
    pub pinned: bool,
}

impl Backup {
    pub fn of(record: &BackupRecord) -> Backup {
        let outcome = match record.state {
            State::Succeeded => Outcome::Good,
            State::Failed { .. } => Outcome::Failed,
            State::Aborted { .. } => Outcome::Aborted,
            _ => Outcome::Running,
        };
        Backup { id: record.id.clone(), created: record.created, outcome, pinned: record.pinned }
    }
}

/// Why a backup is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The `n`th newest good backup, of `of` kept as Recent.
    Recent {
        n: u32,
        of: u32,
    },
    /// The `n`th good backup after the Recent ones, of `of` kept as Archive.
    Archive {
        n: u32,
        of: u32,
    },
    /// The newest good backup of its day, week (ISO), month or year.
    Daily(String),
    Weekly(String),
    Monthly(String),
    Yearly(String),
    Pinned,
    /// The newest good backup of the group: never forgotten.
    LastGood,
    Running,
    /// Failed or aborted, kept apart until the time shown (`None`: no `failed_keep`).
    KeptApart {
        outcome: Outcome,
        until: Option<String>,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Recent { n, of } => write!(f, "recent {n}/{of}"),
            Reason::Archive { n, of } => write!(f, "archive {n}/{of}"),
            Reason::Daily(b) => write!(f, "daily {b}"),
            Reason::Weekly(b) => write!(f, "weekly {b}"),
            Reason::Monthly(b) => write!(f, "monthly {b}"),
            Reason::Yearly(b) => write!(f, "yearly {b}"),
            Reason::Pinned => f.write_str("pinned"),
            Reason::LastGood => f.write_str("last good"),
            Reason::Running => f.write_str("running"),
            Reason::KeptApart { outcome, until: Some(t) } => {
                write!(f, "{}, kept until {t}", outcome_word(*outcome))
            }
            Reason::KeptApart { outcome, until: None } => {
                write!(f, "{}, kept (no failed_keep)", outcome_word(*outcome))
            }
        }
    }
}

fn outcome_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Good => "good",
        Outcome::Failed => "failed",
        Outcome::Aborted => "aborted",
        Outcome::Running => "running",
    }
}

/// One backup's fate: kept with every reason, or forgotten with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub created: Millis,
    pub outcome: Outcome,
    /// Empty: the backup is forgotten.
    pub reasons: Vec<Reason>,
    /// Why it is forgotten (empty when kept).
    pub dropped: String,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }

    /// The reasons, comma-separated, or why it goes.
    pub fn explain(&self) -> String {
        if self.keep() {
            self.reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        } else {
            self.dropped.clone()
        }
    }
}

/// Decides every backup of one group at `now`: newest first by `(created, id)`, as `list` shows.
pub fn decide(backups: &[Backup], rules: &Rules, now: Millis) -> Vec<Decision> {
    let mut order: Vec<&Backup> = backups.iter().collect();
    order.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.id.cmp(&a.id)));
    let tz = &rules.time_zone;
    let mut out: Vec<Decision> = order
        .iter()
        .map(|b| Decision {
            id: b.id.clone(),
            created: b.created,
            outcome: b.outcome,
            reasons: Vec::new(),
            dropped: String::new(),
        })
        .collect();
    let mut calendar: [Bucketing; 4] = [
        Bucketing::new(rules.keep_daily, Reason::Daily),
        Bucketing::new(rules.keep_weekly, Reason::Weekly),
        Bucketing::new(rules.keep_monthly, Reason::Monthly),
        Bucketing::new(rules.keep_yearly, Reason::Yearly),
    ];
    let mut good = 0u32;
    for (b, d) in order.iter().zip(out.iter_mut()) {
        if b.pinned {
            d.reasons.push(Reason::Pinned);
        }
        match b.outcome {
            Outcome::Running => d.reasons.push(Reason::Running),
            Outcome::Failed | Outcome::Aborted => match rules.failed_keep {
                None => d.reasons.push(Reason::KeptApart { outcome: b.outcome, until: None }),
                Some(keep) => {
                    let until = b.created.saturating_add(keep);
                    if now < until {
                        d.reasons.push(Reason::KeptApart {
                            outcome: b.outcome,
                            until: Some(show(until, tz)),
                        });
                    } else if d.reasons.is_empty() {
                        d.dropped = format!(
                            "{}, kept apart until {} (failed_keep)",
                            outcome_word(b.outcome),
                            show(until, tz)
                        );
                    }
                }
            },
            Outcome::Good => {
                good += 1;
                if good == 1 {
                    d.reasons.push(Reason::LastGood);
                }
                if good <= rules.keep_recent {
                    d.reasons.push(Reason::Recent { n: good, of: rules.keep_recent });
                } else if good - rules.keep_recent <= rules.keep_archive {
                    d.reasons.push(Reason::Archive {
                        n: good - rules.keep_recent,
                        of: rules.keep_archive,
                    });
                }
                let date = Timestamp::from_millisecond(b.created)
                    .unwrap_or(Timestamp::UNIX_EPOCH)
                    .to_zoned_datetime(tz.clone())
                    .date();
                let week = date.iso_week_date();
                let buckets = [
                    date.strftime("%Y-%m-%d").to_string(),
                    format!("{:04}-W{:02}", week.year(), week.week()),
                    date.strftime("%Y-%m").to_string(),
                    format!("{:04}", date.year()),
                ];
                for (rule, bucket) in calendar.iter_mut().zip(buckets) {
                    if let Some(reason) = rule.offer(bucket) {
                        d.reasons.push(reason);
                    }
                }
                if d.reasons.is_empty() {
                    d.dropped = "no rule keeps it".into();
                }
            }
        }
    }
    out
}

/// One calendar rule: the newest good backup of each of its `left` newest buckets.
struct Bucketing {
    left: u32,
    seen: HashSet<String>,
    reason: fn(String) -> Reason,
}

impl Bucketing {
    fn new(keep: u32, reason: fn(String) -> Reason) -> Bucketing {
        Bucketing { left: keep, seen: HashSet::new(), reason }
    }

    /// Called newest first: the first backup of a bucket not seen yet is its newest.
    fn offer(&mut self, bucket: String) -> Option<Reason> {
        if self.left == 0 || self.seen.contains(&bucket) {
            return None;
        }
        self.left -= 1;
        self.seen.insert(bucket.clone());
        Some((self.reason)(bucket))
    }
}

/// A time as the group's zone shows it: `2026-10-05 02:00 CEST`.
pub fn show(at: Millis, tz: &TimeZone) -> String {
    match Timestamp::from_millisecond(at) {
        Ok(t) => t.to_zoned_datetime(tz.clone()).strftime("%Y-%m-%d %H:%M %Z").to_string(),
        Err(_) => format!("{at} ms"),
    }
}

#[cfg(test)]
mod tests;
