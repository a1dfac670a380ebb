//! Retention's rules, each a test named after it, a simulated year of daily backups in Berlin
//! (failures, aborts, pins, both DST changes) asserting the exact kept set, and properties over
//! random histories: the newest good backup, pins and running backups are always kept.

use super::*;
use jiff::civil::{date, Date};
use proptest::prelude::*;

const BERLIN: &str = "Europe/Berlin";

fn zone(name: &str) -> TimeZone {
    TimeZone::get(name).expect("bundled zone")
}

/// 00:30 local time on `day`: in UTC that is the day before, so buckets cut in UTC would differ.
fn at(day: Date) -> Millis {
    day.at(0, 30, 0, 0)
        .to_zoned_datetime(zone(BERLIN))
        .expect("a time that exists")
        .timestamp()
        .as_millisecond()
}

fn backup(id: &str, created: Millis, outcome: Outcome) -> Backup {
    Backup { id: id.into(), created, outcome, pinned: false }
}

fn config(text: &str) -> Result<Rules, Vec<String>> {
    toml::from_str::<RetentionConfig>(text).map_err(|e| vec![e.to_string()])?.rules()
}

/// The decisions kept, as `id: reasons`, newest first.
fn check(backups: &[Backup], rules: &Rules, now: Millis) -> Vec<String> {
    decide(backups, rules, now)
        .into_iter()
        .filter(Decision::keep)
        .map(|d| format!("{}: {}", d.id, d.explain()))
        .collect()
}

fn rules(recent: u32, archive: u32) -> Rules {
    config(&format!("keep_recent = {recent}\nkeep_archive = {archive}")).expect("valid")
}

#[test]
fn recent_is_the_newest_good_and_archive_the_next_failed_never_count() {
    let backups = [
        backup("b1", 1, Outcome::Good),
        backup("b2", 2, Outcome::Good),
        backup("b3", 3, Outcome::Failed),
        backup("b4", 4, Outcome::Good),
        backup("b5", 5, Outcome::Aborted),
        backup("b6", 6, Outcome::Good),
        backup("b7", 7, Outcome::Running),
    ];
    let got = decide(&backups, &rules(2, 1), 10);
    let explain: Vec<(String, String)> = got.iter().map(|d| (d.id.clone(), d.explain())).collect();
    let want = [
        ("b7", "running"),
        ("b6", "last good, recent 1/2"),
        ("b5", "aborted, kept (no failed_keep)"),
        ("b4", "recent 2/2"),
        ("b3", "failed, kept (no failed_keep)"),
        ("b2", "archive 1/1"),
        ("b1", "no rule keeps it"),
    ];
    let want: Vec<(String, String)> =
        want.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(explain, want);
    assert!(!got[6].keep());
}

#[test]
fn failed_and_aborted_go_after_failed_keep_from_their_start() {
    let day = 86_400_000;
    let r = config("keep_recent = 1\nfailed_keep = \"2d\"").expect("valid");
    let backups = [
        backup("old-fail", 0, Outcome::Failed),
        backup("new-abort", day, Outcome::Aborted),
        backup("good", day / 2, Outcome::Good),
    ];
    let got = decide(&backups, &r, 2 * day + 1);
    let by_id = |id: &str| got.iter().find(|d| d.id == id).expect("decided").clone();
    assert!(!by_id("old-fail").keep());
    assert_eq!(
        by_id("old-fail").explain(),
        "failed, kept apart until 1970-01-03 00:00 UTC (failed_keep)"
    );
    assert_eq!(by_id("new-abort").explain(), "aborted, kept until 1970-01-04 00:00 UTC");
    assert_eq!(by_id("good").explain(), "last good, recent 1/1");
}

#[test]
fn pins_keep_what_no_rule_would_even_a_failed_one() {
    let r = config("keep_recent = 1\nfailed_keep = \"1h\"").expect("valid");
    let mut backups = vec![
        backup("a", 1, Outcome::Good),
        backup("b", 2, Outcome::Failed),
        backup("c", 3, Outcome::Good),
    ];
    backups[0].pinned = true;
    backups[1].pinned = true;
    assert_eq!(
        check(&backups, &r, 100 * 3_600_000),
        ["c: last good, recent 1/1", "b: pinned", "a: pinned"]
    );
}

#[test]
fn the_last_good_backup_is_kept_whatever_the_rules_say() {
    // Rules that keep nothing (a config refuses them; the decision still never drops it).
    let nothing = Rules {
        keep_recent: 0,
        keep_archive: 0,
        keep_daily: 0,
        keep_weekly: 0,
        keep_monthly: 0,
        keep_yearly: 0,
        failed_keep: Some(0),
        time_zone: TimeZone::UTC,
    };
    let backups = [
        backup("good-old", 1, Outcome::Good),
        backup("good", 2, Outcome::Good),
        backup("fail", 3, Outcome::Failed),
        backup("abort", 4, Outcome::Aborted),
    ];
    assert_eq!(check(&backups, &nothing, 1_000), ["good: last good"]);
}

#[test]
fn calendar_rules_keep_the_newest_good_backup_of_each_bucket() {
    let r = config("keep_daily = 2\nkeep_weekly = 2\ntime_zone = \"UTC\"").expect("valid");
    let t = |d: Date, h: i8| {
        d.at(h, 0, 0, 0).to_zoned_datetime(TimeZone::UTC).unwrap().timestamp().as_millisecond()
    };
    // 2026-01-05 is a Monday (ISO week 2); 2026-01-04 a Sunday (week 1).
    let backups = [
        backup("mon-9", t(date(2026, 1, 5), 9), Outcome::Good),
        backup("mon-18", t(date(2026, 1, 5), 18), Outcome::Failed),
        backup("mon-12", t(date(2026, 1, 5), 12), Outcome::Good),
        backup("sun-9", t(date(2026, 1, 4), 9), Outcome::Good),
        backup("sun-1", t(date(2026, 1, 4), 1), Outcome::Good),
        backup("sat", t(date(2026, 1, 3), 9), Outcome::Good),
    ];
    assert_eq!(
        check(&backups, &r, t(date(2026, 1, 6), 0)),
        [
            "mon-18: failed, kept (no failed_keep)",
            "mon-12: last good, daily 2026-01-05, weekly 2026-W02",
            "sun-9: daily 2026-01-04, weekly 2026-W01",
        ]
    );
}

#[test]
fn a_config_names_every_problem() {
    let e = config("failed_keep = \"soon\"\ntime_zone = \"Mars/Olympus\"").unwrap_err();
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e[0].starts_with("failed_keep: \"soon\" is not a duration"), "{e:?}");
    assert!(e[1].starts_with("time_zone: unknown zone \"Mars/Olympus\""), "{e:?}");
    assert!(e[2].starts_with("keeps nothing but the newest good backup"), "{e:?}");
    assert!(config("keep_dayly = 3").is_err(), "unknown fields are refused");
    assert_eq!(parse_duration("36h"), Ok(36 * 3_600_000));
    assert_eq!(parse_duration("2w"), Ok(14 * 86_400_000));
    assert!(parse_duration("-1d").is_err() && parse_duration("d").is_err());
}

/// The year's rules, as a group would write them.
const YEAR_RULES: &str = r#"
keep_recent = 4
keep_archive = 2
keep_daily = 7
keep_weekly = 4
keep_monthly = 12
keep_yearly = 3
failed_keep = "14d"
time_zone = "Europe/Berlin"
"#;

/// A year of daily backups at 00:30 Berlin time, 2026-01-01 to 2026-12-31: some fail or are
/// aborted, 02-14 and a failed 04-01 are pinned, and one is running at noon on 12-31.
fn year() -> (Vec<Backup>, Millis) {
    let failed = [
        date(2026, 3, 3),
        date(2026, 4, 1),
        date(2026, 6, 30),
        date(2026, 11, 30),
        date(2026, 12, 31),
    ];
    let aborted = [date(2026, 8, 8), date(2026, 12, 27)];
    let pinned = [date(2026, 2, 14), date(2026, 4, 1)];
    let mut out = Vec::new();
    let mut day = date(2026, 1, 1);
    while day.year() == 2026 {
        let outcome = if failed.contains(&day) {
            Outcome::Failed
        } else if aborted.contains(&day) {
            Outcome::Aborted
        } else {
            Outcome::Good
        };
        let mut b = backup(&day.to_string(), at(day), outcome);
        b.pinned = pinned.contains(&day);
        out.push(b);
        day = day.tomorrow().expect("in range");
    }
    let noon = date(2026, 12, 31).at(12, 0, 0, 0).to_zoned_datetime(zone(BERLIN)).unwrap();
    out.push(backup("running", noon.timestamp().as_millisecond() - 3_600_000, Outcome::Running));
    (out, noon.timestamp().as_millisecond())
}

/// What the rules say for the year, worked out by hand (README "Retention" shows the same).
const YEAR_KEPT: [&str; 25] = [
    "running: running",
    "2026-12-31: failed, kept until 2027-01-14 00:30 CET",
    "2026-12-30: last good, recent 1/4, daily 2026-12-30, weekly 2026-W53, monthly 2026-12, yearly 2026",
    "2026-12-29: recent 2/4, daily 2026-12-29",
    "2026-12-28: recent 3/4, daily 2026-12-28",
    "2026-12-27: aborted, kept until 2027-01-10 00:30 CET",
    "2026-12-26: recent 4/4, daily 2026-12-26, weekly 2026-W52",
    "2026-12-25: archive 1/2, daily 2026-12-25",
    "2026-12-24: archive 2/2, daily 2026-12-24",
    "2026-12-23: daily 2026-12-23",
    "2026-12-20: weekly 2026-W51",
    "2026-12-13: weekly 2026-W50",
    "2026-11-29: monthly 2026-11",
    "2026-10-31: monthly 2026-10",
    "2026-09-30: monthly 2026-09",
    "2026-08-31: monthly 2026-08",
    "2026-07-31: monthly 2026-07",
    "2026-06-29: monthly 2026-06",
    "2026-05-31: monthly 2026-05",
    "2026-04-30: monthly 2026-04",
    "2026-04-01: pinned",
    "2026-03-31: monthly 2026-03",
    "2026-02-28: monthly 2026-02",
    "2026-02-14: pinned",
    "2026-01-31: monthly 2026-01",
];

#[test]
fn a_simulated_year_keeps_exactly_what_the_rules_say() {
    let r = config(YEAR_RULES).expect("valid");
    let (backups, now) = year();
    assert_eq!(check(&backups, &r, now), YEAR_KEPT);
}

#[test]
fn a_year_applied_after_every_backup_ends_where_one_decision_does() {
    // As the listener runs it: after each backup, forget what the rules drop, then go on.
    let r = config(YEAR_RULES).expect("valid");
    let (all, now) = year();
    let mut kept: Vec<Backup> = Vec::new();
    for b in &all {
        kept.push(b.clone());
        let when = if b.outcome == Outcome::Running { now } else { b.created + 3_600_000 };
        let decisions = decide(&kept, &r, when);
        let newest_good =
            kept.iter().filter(|b| b.outcome == Outcome::Good).max_by_key(|b| b.created);
        if let Some(newest) = newest_good {
            let d = decisions.iter().find(|d| d.id == newest.id).expect("decided");
            assert!(d.reasons.contains(&Reason::LastGood), "{} dropped on {}", d.id, b.id);
        }
        let keep: HashSet<String> =
            decisions.iter().filter(|d| d.keep()).map(|d| d.id.clone()).collect();
        kept.retain(|b| keep.contains(&b.id));
    }
    assert_eq!(check(&kept, &r, now), YEAR_KEPT);
}

#[test]
fn buckets_are_cut_in_the_groups_zone_not_utc() {
    let (backups, now) = year();
    let mut r = config(YEAR_RULES).expect("valid");
    r.time_zone = TimeZone::UTC;
    let kept = check(&backups, &r, now);
    // 00:30 in Berlin on 11-01 is 23:30 UTC on 10-31: in UTC it is October's newest.
    assert!(kept.iter().any(|k| k.starts_with("2026-11-01: monthly 2026-10")), "{kept:?}");
    assert!(!kept.iter().any(|k| k.starts_with("2026-10-31")), "{kept:?}");
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => Just(Outcome::Good),
        1 => Just(Outcome::Failed),
        1 => Just(Outcome::Aborted),
        1 => Just(Outcome::Running),
    ]
}

fn history() -> impl Strategy<Value = Vec<Backup>> {
    // Up to three years of backups, at any time of day.
    prop::collection::vec((0i64..3 * 366 * 86_400_000, outcome(), prop::bool::weighted(0.1)), 0..80)
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (t, o, pinned))| Backup {
                    id: format!("b{i:03}"),
                    created: 1_767_225_600_000 + t,
                    outcome: o,
                    pinned,
                })
                .collect()
        })
}

fn any_rules() -> impl Strategy<Value = Rules> {
    (
        (0u32..5, 0u32..5, 0u32..10),
        (0u32..6, 0u32..13, 0u32..3),
        prop::option::of(0i64..30 * 86_400_000),
        prop::sample::select(vec!["UTC", BERLIN, "America/New_York", "Australia/Lord_Howe"]),
    )
        .prop_map(|((recent, archive, daily), (weekly, monthly, yearly), failed_keep, tz)| {
            Rules {
                keep_recent: recent,
                keep_archive: archive,
                keep_daily: daily,
                keep_weekly: weekly,
                keep_monthly: monthly,
                keep_yearly: yearly,
                failed_keep,
                time_zone: zone(tz),
            }
        })
}

proptest! {
    #[test]
    fn the_newest_good_pins_and_running_backups_are_always_kept(
        backups in history(),
        rules in any_rules(),
        after in 0i64..4 * 366 * 86_400_000,
    ) {
        let now = 1_767_225_600_000 + after;
        let decisions = decide(&backups, &rules, now);
        prop_assert_eq!(decisions.len(), backups.len());
        let newest_good = decisions.iter().find(|d| d.outcome == Outcome::Good);
        if let Some(d) = newest_good {
            prop_assert!(d.reasons.contains(&Reason::LastGood));
        }
        for d in &decisions {
            let b = backups.iter().find(|b| b.id == d.id).expect("same ids");
            if b.pinned || b.outcome == Outcome::Running {
                prop_assert!(d.keep(), "{} dropped: {}", d.id, d.dropped);
            }
            if b.outcome != Outcome::Good {
                let counted = d.reasons.iter().any(|r| !matches!(r, Reason::Pinned | Reason::Running | Reason::KeptApart { .. }));
                prop_assert!(!counted, "{} is not good but counted: {}", d.id, d.explain());
            }
            prop_assert_eq!(d.keep(), d.dropped.is_empty());
        }
        let good = decisions.iter().filter(|d| d.outcome == Outcome::Good).count() as u32;
        let count = |f: fn(&Reason) -> bool| decisions.iter().flat_map(|d| &d.reasons).filter(|r| f(r)).count() as u32;
        prop_assert_eq!(count(|r| matches!(r, Reason::Recent { .. })), good.min(rules.keep_recent));
        prop_assert_eq!(
            count(|r| matches!(r, Reason::Archive { .. })),
            good.saturating_sub(rules.keep_recent).min(rules.keep_archive)
        );
        prop_assert!(count(|r| matches!(r, Reason::Daily(_))) <= rules.keep_daily);
        prop_assert!(count(|r| matches!(r, Reason::Monthly(_))) <= rules.keep_monthly);
    }
}
