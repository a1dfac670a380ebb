//! `backupctl schedules`: the table (local times in the listener's zone, "in 3h 12m") pinned
//! as text, and the `--json` shape pinned key by key.

use stillpoint_proto::{ListSchedulesResponse, Schedule, ScheduleRun};

use super::*;

/// 2026-12-03T18:48:00Z, a Thursday: 19:48 in Berlin.
const NOW: i64 = 1_796_323_680_000;

fn list() -> ListSchedulesResponse {
    ListSchedulesResponse {
        schedules: vec![
            Schedule {
                name: "weeknights".into(),
                group: "meditech".into(),
                cron: "0 22 * * mon-fri".into(),
                // 21:00Z = 22:00 Berlin.
                next_unix_ms: NOW + (2 * 60 + 12) * 60_000,
                suspended: false,
                last: Some(ScheduleRun {
                    due_unix_ms: NOW + (2 * 60 + 12) * 60_000 - 86_400_000,
                    at_unix_ms: NOW + (2 * 60 + 12) * 60_000 - 86_400_000,
                    outcome: "skipped-busy".into(),
                    backup_id: "b-1".into(),
                    text: "skipped: group busy with backup b-1".into(),
                    missed: 0,
                }),
            },
            Schedule {
                name: "daytime".into(),
                group: "meditech".into(),
                cron: "0 8-20/4 * * *".into(),
                next_unix_ms: 0,
                suspended: true,
                last: None,
            },
        ],
        time_zone: "Europe/Berlin".into(),
        now_unix_ms: NOW,
    }
}

#[test]
fn the_table_shows_local_times_how_soon_and_the_last_outcome() {
    assert_eq!(
        schedules_human(&list()),
        "\
time zone: Europe/Berlin
NAME        GROUP     CRON              NEXT RUN                              LAST RUN                  OUTCOME                              SUSPENDED
weeknights  meditech  0 22 * * mon-fri  Thu 2026-12-03 22:00 CET (in 2h 12m)  Wed 2026-12-02 22:00 CET  skipped: group busy with backup b-1  no
daytime     meditech  0 8-20/4 * * *    - (suspended)                         -                         -                                    yes
"
    );
}

#[test]
fn how_soon_reads_in_minutes_hours_and_days() {
    assert_eq!(from_now(NOW + 30_000, NOW), "in <1m");
    assert_eq!(from_now(NOW + 5 * 60_000, NOW), "in 5m");
    assert_eq!(from_now(NOW + 192 * 60_000, NOW), "in 3h 12m");
    assert_eq!(from_now(NOW + (2 * 1440 + 4 * 60) * 60_000, NOW), "in 2d 4h");
    assert_eq!(from_now(NOW - 1, NOW), "due now");
}

#[test]
fn the_json_shape_is_pinned() {
    let l = list();
    let view = ScheduleView::new(&l.schedules[0], &l.time_zone);
    let json: serde_json::Value = serde_json::from_str(&crate::view::json(&view)).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "name": "weeknights", "group": "meditech", "cron": "0 22 * * mon-fri",
            "time_zone": "Europe/Berlin", "suspended": false,
            "next_unix_ms": 1_796_331_600_000_i64, "next": "2026-12-03T21:00:00.000Z",
            "last": {
                "due_unix_ms": 1_796_245_200_000_i64, "due": "2026-12-02T21:00:00.000Z",
                "at_unix_ms": 1_796_245_200_000_i64, "at": "2026-12-02T21:00:00.000Z",
                "outcome": "skipped-busy", "backup_id": "b-1",
                "text": "skipped: group busy with backup b-1", "missed": 0
            }
        })
    );
    let suspended = ScheduleView::new(&l.schedules[1], &l.time_zone);
    let json: serde_json::Value = serde_json::from_str(&crate::view::json(&suspended)).unwrap();
    assert_eq!(json["next_unix_ms"], serde_json::Value::Null);
    assert_eq!(json["last"], serde_json::Value::Null);
}
