//! Lease arithmetic at and around its edges.

use super::Lease;

fn check(granted_at: u64, duration_ms: u64, now: u64, expired: bool, remaining: u64) {
    let lease = Lease::new(granted_at, duration_ms);
    assert_eq!(lease.expired(now), expired, "{lease:?} expired at {now}");
    assert_eq!(lease.remaining(now), remaining, "{lease:?} remaining at {now}");
}

#[test]
fn lease_runs_until_its_duration_has_passed() {
    check(100, 1000, 100, false, 1000);
    check(100, 1000, 600, false, 500);
    check(100, 1000, 1099, false, 1);
}

#[test]
fn lease_is_expired_at_and_after_its_end() {
    check(100, 1000, 1100, true, 0);
    check(100, 1000, 5000, true, 0);
}

#[test]
fn clock_before_grant_counts_as_full_lease() {
    check(100, 1000, 50, false, 1050);
}

#[test]
fn huge_values_do_not_overflow() {
    check(u64::MAX - 5, 1000, u64::MAX - 1, false, 1);
    assert_eq!(Lease::new(u64::MAX - 5, 1000).expires_at(), u64::MAX);
}
