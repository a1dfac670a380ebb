//! Cron expressions: weekdays, steps, chosen days, month ends, shorthands, DST in Berlin and
//! New York, and errors that name the field and what it allows.

use jiff::ZonedDateTime as Zoned;

use super::*;

/// The next `n` runs of `cron` after local time `from` (`2026-12-03T12:00[Europe/Berlin]`), as
/// local times with their offsets.
fn runs(cron: &str, from: &str, n: usize) -> Vec<String> {
    let cron = Cron::parse(cron).expect("a valid expression");
    let from: Zoned = from.parse().expect("a zoned time");
    let tz = from.time_zone().clone();
    let mut at = from.timestamp();
    let mut out = Vec::new();
    for _ in 0..n {
        let Some(next) = cron.next_after(at, &tz) else { break };
        out.push(next.to_zoned_datetime(tz.clone()).strftime("%a %F %H:%M %:z").to_string());
        at = next;
    }
    out
}

fn refused(cron: &str) -> String {
    Cron::parse(cron).expect_err("must be refused")
}

#[test]
fn weekdays_at_22() {
    // 2026-12-03 is a Thursday.
    assert_eq!(
        runs("0 22 * * mon-fri", "2026-12-03T12:00[Europe/Berlin]", 3),
        [
            "Thu 2026-12-03 22:00 +01:00",
            "Fri 2026-12-04 22:00 +01:00",
            "Mon 2026-12-07 22:00 +01:00"
        ]
    );
    // Exactly at a run, the next one is the following run.
    assert_eq!(
        runs("0 22 * * 1-5", "2026-12-04T22:00[Europe/Berlin]", 1),
        ["Mon 2026-12-07 22:00 +01:00"]
    );
}

#[test]
fn every_4_hours() {
    assert_eq!(
        runs("0 */4 * * *", "2026-12-03T09:30[Europe/Berlin]", 4),
        [
            "Thu 2026-12-03 12:00 +01:00",
            "Thu 2026-12-03 16:00 +01:00",
            "Thu 2026-12-03 20:00 +01:00",
            "Fri 2026-12-04 00:00 +01:00"
        ]
    );
    assert_eq!(
        runs("15 2-10/4 * * *", "2026-12-03T00:00[UTC]", 3),
        [
            "Thu 2026-12-03 02:15 +00:00",
            "Thu 2026-12-03 06:15 +00:00",
            "Thu 2026-12-03 10:15 +00:00"
        ]
    );
}

#[test]
fn chosen_days_by_name_and_number() {
    assert_eq!(
        runs("30 1 * * SUN,wed", "2026-12-03T12:00[Europe/Berlin]", 3),
        [
            "Sun 2026-12-06 01:30 +01:00",
            "Wed 2026-12-09 01:30 +01:00",
            "Sun 2026-12-13 01:30 +01:00"
        ]
    );
    assert_eq!(
        runs("0 3 1,15 jan-feb,dec *", "2026-12-03T12:00[Europe/Berlin]", 4),
        [
            "Tue 2026-12-15 03:00 +01:00",
            "Fri 2027-01-01 03:00 +01:00",
            "Fri 2027-01-15 03:00 +01:00",
            "Mon 2027-02-01 03:00 +01:00"
        ]
    );
    // Sunday is 0 and 7.
    assert_eq!(
        runs("0 0 * * 7", "2026-12-03T12:00[UTC]", 1),
        runs("0 0 * * 0", "2026-12-03T12:00[UTC]", 1)
    );
    // Day of month and day of week both restricted: either one will do, as in cron.
    assert_eq!(
        runs("0 0 13 * fri", "2026-12-03T12:00[UTC]", 3),
        [
            "Fri 2026-12-04 00:00 +00:00",
            "Fri 2026-12-11 00:00 +00:00",
            "Sun 2026-12-13 00:00 +00:00"
        ]
    );
}

#[test]
fn month_ends_and_leap_days() {
    assert_eq!(
        runs("0 0 31 * *", "2026-01-31T00:00[Europe/Berlin]", 2),
        ["Tue 2026-03-31 00:00 +02:00", "Sun 2026-05-31 00:00 +02:00"]
    );
    assert_eq!(runs("0 12 29 2 *", "2026-01-01T00:00[UTC]", 1), ["Tue 2028-02-29 12:00 +00:00"]);
    assert_eq!(
        runs("59 23 28-31 * *", "2026-02-27T00:00[UTC]", 2),
        ["Sat 2026-02-28 23:59 +00:00", "Sat 2026-03-28 23:59 +00:00"]
    );
}

#[test]
fn shorthands() {
    let from = "2026-12-03T12:34[Europe/Berlin]";
    assert_eq!(runs("@hourly", from, 1), ["Thu 2026-12-03 13:00 +01:00"]);
    assert_eq!(runs("@daily", from, 1), ["Fri 2026-12-04 00:00 +01:00"]);
    assert_eq!(runs("@weekly", from, 1), ["Sun 2026-12-06 00:00 +01:00"]);
    assert_eq!(runs("@monthly", from, 1), ["Fri 2027-01-01 00:00 +01:00"]);
    assert_eq!(runs("@yearly", from, 1), ["Fri 2027-01-01 00:00 +01:00"]);
}

/// Berlin jumps from 02:00 to 03:00 on 2026-03-29: a time in the gap runs once, at the jump.
#[test]
fn berlin_spring_forward_runs_a_missing_time_once_at_the_jump() {
    assert_eq!(
        runs("30 2 * * *", "2026-03-28T12:00[Europe/Berlin]", 2),
        ["Sun 2026-03-29 03:00 +02:00", "Mon 2026-03-30 02:30 +02:00"]
    );
    // Every quarter hour: 02:00 to 02:45 do not exist; they run once, at 03:00, not four times.
    assert_eq!(
        runs("*/15 * * * *", "2026-03-29T01:40[Europe/Berlin]", 3),
        [
            "Sun 2026-03-29 01:45 +01:00",
            "Sun 2026-03-29 03:00 +02:00",
            "Sun 2026-03-29 03:15 +02:00"
        ]
    );
}

/// Berlin goes back from 03:00 to 02:00 on 2026-10-25: 02:00-02:59 happen twice; each runs
/// once, at its first occurrence.
#[test]
fn berlin_fall_back_runs_a_repeated_time_once_at_its_first_occurrence() {
    assert_eq!(
        runs("30 2 * * *", "2026-10-24T12:00[Europe/Berlin]", 2),
        ["Sun 2026-10-25 02:30 +02:00", "Mon 2026-10-26 02:30 +01:00"]
    );
    assert_eq!(
        runs("0 * * * *", "2026-10-25T01:30[Europe/Berlin]", 3),
        [
            "Sun 2026-10-25 02:00 +02:00",
            "Sun 2026-10-25 03:00 +01:00",
            "Sun 2026-10-25 04:00 +01:00"
        ]
    );
    // From inside the second pass of the repeated hour, its times do not run again.
    assert_eq!(
        runs("45 2 * * *", "2026-10-25T02:30+01:00[Europe/Berlin]", 1),
        ["Mon 2026-10-26 02:45 +01:00"]
    );
}

#[test]
fn new_york_transitions() {
    // 2026-03-08 02:00 -> 03:00.
    assert_eq!(
        runs("30 2 * * *", "2026-03-07T12:00[America/New_York]", 2),
        ["Sun 2026-03-08 03:00 -04:00", "Mon 2026-03-09 02:30 -04:00"]
    );
    // 2026-11-01 02:00 -> 01:00.
    assert_eq!(
        runs("30 1 * * *", "2026-10-31T12:00[America/New_York]", 2),
        ["Sun 2026-11-01 01:30 -04:00", "Mon 2026-11-02 01:30 -05:00"]
    );
}

#[test]
fn errors_name_the_field_and_what_it_allows() {
    let e = refused("0 25 * * *");
    assert!(e.contains("hour field \"25\": 25 is outside 0-23; allowed: 0-23"), "{e}");
    let e = refused("* * * *");
    assert!(
        e.contains("4 field(s); cron needs five: minute hour day-of-month month day-of-week"),
        "{e}"
    );
    let e = refused("0 0 * foo *");
    assert!(
        e.contains("month field \"foo\": \"foo\" is not a number; allowed: 1-12 or jan-dec"),
        "{e}"
    );
    let e = refused("0 0 * * mon-sunday");
    assert!(e.contains("day-of-week field"), "{e}");
    assert!(e.contains("0-7 or sun-sat"), "{e}");
    let e = refused("*/0 * * * *");
    assert!(e.contains("minute field \"*/0\": step \"0\" is not a number above 0"), "{e}");
    let e = refused("0 5-1 * * *");
    assert!(e.contains("hour field \"5-1\": range \"5-1\" runs backwards"), "{e}");
    let e = refused("0 0 30 feb *");
    assert!(e.contains("day-of-month field \"30\" never occurs in month field \"feb\""), "{e}");
    let e = refused("@fortnightly");
    assert!(e.contains("not a known shorthand"), "{e}");
    let e = refused("0 0 1,,2 * *");
    assert!(e.contains("day-of-month field \"1,,2\": an empty list item"), "{e}");
}
