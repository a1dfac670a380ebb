//! The scheduler machine, time an input: due starts, a busy group's skip, suspend and resume
//! without a burst, runs missed while the listener was down as one report, the catch-up window.

use super::*;

/// Unix ms of a UTC time written `2026-12-03T22:00`.
fn at(utc: &str) -> Millis {
    let dt: jiff::civil::DateTime = utc.parse().expect("a civil time");
    dt.to_zoned_datetime(TimeZone::UTC).expect("in range").timestamp().as_millisecond()
}

fn schedule(name: &str, group: &str, cron: &str) -> Schedule {
    Schedule {
        name: name.into(),
        group: group.into(),
        cron: Cron::parse(cron).expect("valid cron"),
        enabled: true,
    }
}

/// A scheduler of `schedules` in UTC that first saw them at `now`.
fn check(schedules: Vec<Schedule>, now: &str) -> Scheduler {
    Scheduler::new(schedules, HashMap::new(), TimeZone::UTC, at(now))
}

fn start(name: &str, group: &str, due: &str) -> Action {
    Action::Start { schedule: name.into(), group: group.into(), due: at(due) }
}

fn starts(actions: &[Action]) -> Vec<&Action> {
    actions.iter().filter(|a| matches!(a, Action::Start { .. })).collect()
}

fn published(actions: &[Action]) -> Vec<ScheduleEvent> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_due_schedule_starts_once_and_its_outcome_is_saved_then_published() {
    let mut s = check(vec![schedule("nightly", "g", "0 22 * * *")], "2026-12-03T12:00");
    assert_eq!(s.handle(at("2026-12-03T21:59"), Input::Tick), []);
    assert_eq!(s.next_due(), Some(at("2026-12-03T22:00")));
    let actions = s.handle(at("2026-12-03T22:00"), Input::Tick);
    assert_eq!(actions, [start("nightly", "g", "2026-12-03T22:00")]);
    // While it starts, another tick starts nothing.
    assert_eq!(s.handle(at("2026-12-03T22:00"), Input::Tick), []);
    let done = s.handle(
        at("2026-12-03T22:00"),
        Input::Started {
            schedule: "nightly".into(),
            due: at("2026-12-03T22:00"),
            backup: "b1".into(),
        },
    );
    let last = LastRun {
        due: at("2026-12-03T22:00"),
        at: at("2026-12-03T22:00"),
        outcome: Outcome::Started { backup: "b1".into() },
    };
    assert_eq!(
        done,
        [
            Action::Save {
                schedule: "nightly".into(),
                saved: Saved {
                    cron: "0 22 * * *".into(),
                    after: at("2026-12-03T22:00"),
                    suspended: false,
                    last: Some(last.clone()),
                },
            },
            Action::Publish(ScheduleEvent::Fired {
                schedule: "nightly".into(),
                group: "g".into(),
                due: at("2026-12-03T22:00"),
                backup: "b1".into(),
            }),
        ]
    );
    assert_eq!(s.handle(at("2026-12-03T22:01"), Input::Tick), []);
    let view = s.view("nightly").expect("listed");
    assert_eq!(view.next, Some(at("2026-12-04T22:00")));
    assert_eq!(view.last, Some(last));
}

#[test]
fn a_busy_group_skips_the_start_and_says_which_backup() {
    let mut s = check(vec![schedule("every-4h", "g", "0 */4 * * *")], "2026-12-03T07:00");
    assert_eq!(
        s.handle(at("2026-12-03T08:00"), Input::Tick),
        [start("every-4h", "g", "2026-12-03T08:00")]
    );
    let actions = s.handle(
        at("2026-12-03T08:00"),
        Input::Busy { schedule: "every-4h".into(), due: at("2026-12-03T08:00"), by: "b0".into() },
    );
    assert_eq!(
        published(&actions),
        [ScheduleEvent::SkippedBusy {
            schedule: "every-4h".into(),
            group: "g".into(),
            due: at("2026-12-03T08:00"),
            by: "b0".into(),
        }]
    );
    let view = s.view("every-4h").expect("listed");
    assert_eq!(
        view.last.map(|l| l.outcome.text()).as_deref(),
        Some("skipped: group busy with backup b0")
    );
    // Skipped is done with: not retried, the next run is the next due time.
    assert_eq!(view.next, Some(at("2026-12-03T12:00")));
    assert_eq!(s.handle(at("2026-12-03T08:30"), Input::Tick), []);
}

#[test]
fn a_suspended_schedule_never_fires_and_resumes_without_a_burst() {
    let mut s = check(vec![schedule("hourly", "g", "@hourly")], "2026-12-03T07:30");
    let suspend = s.handle(at("2026-12-03T07:40"), Input::Suspend { schedule: "hourly".into() });
    assert!(matches!(&suspend[..], [Action::Save { saved, .. }] if saved.suspended));
    assert_eq!(s.next_due(), None);
    assert_eq!(s.view("hourly").expect("listed").next, None);
    for hour in ["08", "09", "10", "11"] {
        assert_eq!(s.handle(at(&format!("2026-12-03T{hour}:00")), Input::Tick), []);
    }
    // Suspending twice changes nothing.
    assert_eq!(s.handle(at("2026-12-03T11:10"), Input::Suspend { schedule: "hourly".into() }), []);
    let resume = s.handle(at("2026-12-03T11:20"), Input::Resume { schedule: "hourly".into() });
    assert!(
        matches!(&resume[..], [Action::Save { saved, .. }] if !saved.suspended && saved.after == at("2026-12-03T11:20"))
    );
    // Nothing of what fell due while suspended runs or counts as missed.
    assert_eq!(s.handle(at("2026-12-03T11:21"), Input::Tick), []);
    assert_eq!(s.next_due(), Some(at("2026-12-03T12:00")));
    assert_eq!(
        s.handle(at("2026-12-03T12:00"), Input::Tick),
        [start("hourly", "g", "2026-12-03T12:00")]
    );
}

#[test]
fn runs_missed_while_down_are_one_report_and_never_run_late() {
    let mut first = check(vec![schedule("hourly", "g", "0 * * * *")], "2026-12-03T07:30");
    let saved = first.saved();
    // The listener was down from 07:30 to 11:30: 08:00 to 11:00 passed.
    let mut s = Scheduler::new(
        vec![schedule("hourly", "g", "0 * * * *")],
        saved,
        TimeZone::UTC,
        at("2026-12-03T11:30"),
    );
    let actions = s.handle(at("2026-12-03T11:30"), Input::Tick);
    assert_eq!(starts(&actions), Vec::<&Action>::new(), "nothing runs late");
    assert_eq!(
        published(&actions),
        [ScheduleEvent::Missed {
            schedule: "hourly".into(),
            group: "g".into(),
            due: at("2026-12-03T08:00"),
            count: 4,
        }]
    );
    // One report, not one per run, and not again.
    assert_eq!(s.handle(at("2026-12-03T11:31"), Input::Tick), []);
    let view = s.view("hourly").expect("listed");
    assert_eq!(
        view.last.map(|l| l.outcome.text()).as_deref(),
        Some("missed 4 run(s) while the listener was down")
    );
    assert_eq!(view.next, Some(at("2026-12-03T12:00")));
    // The first scheduler is untouched by the second's decisions (state is its own).
    assert_eq!(first.handle(at("2026-12-03T07:31"), Input::Tick), []);
}

#[test]
fn a_run_found_within_the_catch_up_window_still_runs_once() {
    let saved = check(vec![schedule("every-minute", "g", "* * * * *")], "2026-12-03T21:50").saved();
    // Back at 22:03: 21:51 to 21:58 are older than five minutes (missed), 21:59 to 22:02 are
    // within the window but only the latest, 22:03, runs; the others count as missed too.
    let mut s = Scheduler::new(
        vec![schedule("every-minute", "g", "* * * * *")],
        saved,
        TimeZone::UTC,
        at("2026-12-03T22:03"),
    );
    let actions = s.handle(at("2026-12-03T22:03"), Input::Tick);
    assert_eq!(starts(&actions), [&start("every-minute", "g", "2026-12-03T22:03")]);
    assert_eq!(
        published(&actions),
        [ScheduleEvent::Missed {
            schedule: "every-minute".into(),
            group: "g".into(),
            due: at("2026-12-03T21:51"),
            count: 12,
        }]
    );
    // A nightly backup whose listener restarted over 22:00 runs at 22:04.
    let saved = check(vec![schedule("nightly", "g", "0 22 * * *")], "2026-12-03T21:00").saved();
    let mut s = Scheduler::new(
        vec![schedule("nightly", "g", "0 22 * * *")],
        saved,
        TimeZone::UTC,
        at("2026-12-03T22:04"),
    );
    let actions = s.handle(at("2026-12-03T22:04"), Input::Tick);
    assert_eq!(actions, [start("nightly", "g", "2026-12-03T22:00")]);
}

#[test]
fn a_new_or_changed_schedule_counts_from_now_and_a_disabled_one_starts_suspended() {
    let saved = check(vec![schedule("s", "g", "0 * * * *")], "2026-12-03T07:30").saved();
    // The expression changed while the listener was down: nothing is missed under the new one.
    let mut s = Scheduler::new(
        vec![schedule("s", "g", "30 * * * *")],
        saved,
        TimeZone::UTC,
        at("2026-12-03T11:45"),
    );
    assert_eq!(s.handle(at("2026-12-03T11:45"), Input::Tick), []);
    assert_eq!(s.next_due(), Some(at("2026-12-03T12:30")));
    let mut off = schedule("off", "g", "* * * * *");
    off.enabled = false;
    let mut s = check(vec![off], "2026-12-03T07:30");
    assert_eq!(s.handle(at("2026-12-03T08:00"), Input::Tick), []);
    assert!(s.view("off").expect("listed").suspended);
}

#[test]
fn a_failed_start_is_reported_and_the_schedule_goes_on() {
    let mut s = check(vec![schedule("s", "g", "0 * * * *")], "2026-12-03T07:30");
    s.handle(at("2026-12-03T08:00"), Input::Tick);
    let actions = s.handle(
        at("2026-12-03T08:00"),
        Input::StartFailed {
            schedule: "s".into(),
            due: at("2026-12-03T08:00"),
            error: "store: disk full".into(),
        },
    );
    assert!(
        matches!(&published(&actions)[..], [ScheduleEvent::Failed { error, .. }] if error == "store: disk full")
    );
    assert_eq!(
        s.handle(at("2026-12-03T09:00"), Input::Tick),
        [start("s", "g", "2026-12-03T09:00")]
    );
}

#[test]
fn schedules_follow_the_listeners_time_zone() {
    let berlin = TimeZone::get("Europe/Berlin").expect("tzdata has Europe/Berlin");
    // 21:00 UTC is 22:00 in Berlin in December.
    let mut s = Scheduler::new(
        vec![schedule("nightly", "g", "0 22 * * *")],
        HashMap::new(),
        berlin,
        at("2026-12-03T12:00"),
    );
    assert_eq!(s.next_due(), Some(at("2026-12-03T21:00")));
    assert_eq!(
        s.handle(at("2026-12-03T21:00"), Input::Tick),
        [start("nightly", "g", "2026-12-03T21:00")]
    );
}
