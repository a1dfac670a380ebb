//! The no-good-backup rule with time as an argument: when it alerts, once per lapse.

use std::time::Duration;

use super::Watchdog;

const H: i64 = 3_600_000;

/// Group `g` watched from t=0 with a 26h limit and `last_good`.
fn check(last_good: Option<i64>) -> Watchdog {
    Watchdog::new(0, [("g".to_string(), Duration::from_secs(26 * 3600), last_good)])
}

#[test]
fn a_group_that_never_had_a_good_backup_counts_from_the_start() {
    let mut w = check(None);
    assert_eq!(w.next_check(), Some(26 * H));
    assert!(w.check(26 * H - 1).is_empty());
    let alerts = w.check(26 * H);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].group, "g");
    assert_eq!(alerts[0].last_good, None);
    assert_eq!(alerts[0].since, 0);
    assert_eq!(alerts[0].for_how_long, Duration::from_secs(26 * 3600));
    assert_eq!(alerts[0].limit, Duration::from_secs(26 * 3600));
}

#[test]
fn one_alert_per_lapse_and_another_after_recovery_and_a_new_lapse() {
    let mut w = check(Some(-20 * H));
    assert!(w.check(5 * H).is_empty());
    let first = w.check(6 * H);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].last_good, Some(-20 * H));
    assert_eq!(first[0].for_how_long, Duration::from_secs(26 * 3600));
    // Still lapsed: quiet, and nothing more to wake up for.
    assert!(w.check(7 * H).is_empty());
    assert!(w.check(100 * H).is_empty());
    assert_eq!(w.next_check(), None);
    // Recovery, then a new lapse: one more alert.
    w.succeeded("g", 101 * H);
    assert_eq!(w.next_check(), Some(127 * H));
    assert!(w.check(126 * H).is_empty());
    let second = w.check(130 * H);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].last_good, Some(101 * H));
    assert_eq!(second[0].for_how_long, Duration::from_secs(29 * 3600));
    assert!(w.check(131 * H).is_empty());
}

#[test]
fn a_last_good_older_than_the_limit_at_start_alerts_at_once() {
    let mut w = check(Some(-30 * H));
    assert_eq!(w.check(0).len(), 1);
}

#[test]
fn an_older_success_reported_late_does_not_move_the_last_good_back() {
    let mut w = check(Some(10 * H));
    w.succeeded("g", 5 * H);
    assert_eq!(w.next_check(), Some(36 * H));
}

#[test]
fn groups_without_a_limit_and_unknown_groups_are_not_watched() {
    let mut w = Watchdog::new(0, []);
    w.succeeded("other", 1);
    assert!(w.check(i64::MAX / 2).is_empty());
    assert_eq!(w.next_check(), None);
}
