//! The catalog on disk: history across a reopen, the versioned record, records written by
//! earlier listeners (fixtures of their JSON), and records from a newer one.

use super::*;
use crate::model::{Artifact, Level, ServerEnd, State, StateName};

fn entry(message: &str) -> LogEntry {
    LogEntry {
        at: 5,
        server: None,
        level: Level::Info,
        message: message.into(),
        state: StateName::Pending,
    }
}

/// Puts `body` in the catalog as backup `id`, as another listener version wrote it.
fn put_raw(store: &Store, id: &str, body: &[u8]) {
    let txn = store.db.begin_write().unwrap();
    txn.open_table(BACKUPS).unwrap().insert(id, body).unwrap();
    txn.commit().unwrap();
}

#[tokio::test]
async fn history_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let record = BackupRecord::new("b1", "g", &["a".to_string()], "operator:x", 5);
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.save(&record, &[entry("one"), entry("two")]).await.unwrap(), 2);
        assert_eq!(store.save(&record, &[entry("three")]).await.unwrap(), 3);
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.get("b1").unwrap(), record);
    assert_eq!(store.log("b1", 0).unwrap().len(), 3);
    assert_eq!(store.log("b1", 2).unwrap()[0], (2, entry("three")));
    assert!(matches!(store.get("nope"), Err(Error::UnknownBackup(_))));
    assert!(store.knows("b1").unwrap() && !store.knows("nope").unwrap());
    assert_eq!(store.list().unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_saves_each_get_their_own_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let saves = (0..20).map(|i| {
        let store = store.clone();
        async move {
            let record = BackupRecord::new(&format!("b{}", i % 2), "g", &[], "x", i);
            store.save(&record, &[entry("a"), entry("b")]).await.unwrap()
        }
    });
    let mut nexts = futures::future::join_all(saves).await;
    nexts.sort();
    let want: Vec<u64> = (1..=10).flat_map(|n| [2 * n, 2 * n]).collect();
    assert_eq!(nexts, want);
    assert_eq!(store.log("b0", 0).unwrap().len(), 20);
}

#[tokio::test]
async fn the_catalog_writes_its_own_versioned_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut record = BackupRecord::new("b1", "g", &["a".to_string()], "operator:x", 5);
    record.state = State::Sealing { deadline: 99 };
    record.servers[0].stored = vec!["m1".into()];
    record.servers[0].end = Some(ServerEnd::GaveUp("abort not delivered".into()));
    record.never_judged = Some("never judged".into());
    store.save(&record, &[]).await.unwrap();
    let txn = store.db.begin_read().unwrap();
    let table = txn.open_table(BACKUPS).unwrap();
    let raw: serde_json::Value =
        serde_json::from_slice(table.get("b1").unwrap().unwrap().value()).unwrap();
    assert_eq!(raw["version"], 1, "no artifacts: still readable by listeners that read up to 1");
    assert!(raw["servers"][0].get("artifacts").is_none());
    assert_eq!(raw["state"]["state"], "SEALING");
    assert_eq!(store.get("b1").unwrap(), record, "read back whole");
}

#[tokio::test]
async fn a_record_with_artifacts_is_version_2_and_keeps_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let servers = ["a".to_string(), "b".to_string()];
    let mut record = BackupRecord::new("b1", "g", &servers, "operator:x", 5);
    let bytes: Vec<u8> = (0..=255u8).chain([0, 0xff, b'\n']).collect();
    record.servers[1].artifacts = vec![
        Artifact { quiescer: "pg".into(), name: "backup_label".into(), bytes: bytes.clone() },
        Artifact { quiescer: "pg".into(), name: "tablespace_map".into(), bytes: Vec::new() },
    ];
    store.save(&record, &[]).await.unwrap();
    let txn = store.db.begin_read().unwrap();
    let table = txn.open_table(BACKUPS).unwrap();
    let raw: serde_json::Value =
        serde_json::from_slice(table.get("b1").unwrap().unwrap().value()).unwrap();
    assert_eq!(raw["version"], 2, "no pin: still readable by listeners that read up to 2");
    let stored = &raw["servers"][1]["artifacts"][0];
    assert_eq!(stored["name"], "backup_label");
    assert!(stored["base64"].as_str().unwrap().starts_with("AAECAwQF"), "{stored}");
    assert_eq!(store.get("b1").unwrap(), record, "read back whole, bytes and all");

    drop((table, txn));
    let mut bad = raw.clone();
    bad["servers"][1]["artifacts"][0]["base64"] = "not base64!".into();
    put_raw(&store, "b2", &serde_json::to_vec(&bad).unwrap());
    let Err(e) = store.get("b2") else { panic!("damaged bytes were read") };
    assert!(
        e.to_string().contains("server b: artifact pg/backup_label: its bytes are not base64"),
        "{e}"
    );
}

#[test]
fn records_written_before_the_catalog_had_versions_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let done = include_bytes!("testdata/record-v0-succeeded.json");
    put_raw(&store, "20250301T020000Z-1a2b3c", done);
    let record = store.get("20250301T020000Z-1a2b3c").unwrap();
    assert_eq!(record.state, State::Succeeded);
    assert_eq!(record.started_by, "hook:netbackup");
    assert_eq!(record.servers[0].freeze_token, "4f1c9a");
    assert_eq!(record.servers[1].freeze_token, "", "older still: no token");
    assert_eq!(record.servers[0].cut.steps[0].detail, "pre_freeze exit 0");
    assert!(record.verdict.as_ref().is_some_and(|v| v.consistent));
    // How each server's part ended was not recorded then: said, not invented.
    assert_eq!(record.servers[0].end, Some(ServerEnd::NotRecorded));
    assert_eq!(record.settled, record.finished);

    let copying = include_bytes!("testdata/record-v0-copying.json");
    put_raw(&store, "20250301T030000Z-4d5e6f", copying);
    let record = store.get("20250301T030000Z-4d5e6f").unwrap();
    assert_eq!(record.state, State::Copying { deadline: 1740819600000 });
    assert_eq!(record.servers[0].end, None, "in flight: a restart takes it over");
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn a_record_from_a_newer_listener_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    put_raw(&store, "b9", br#"{"version": 7, "id": "b9", "shape": "unknown"}"#);
    let Err(e) = store.get("b9") else { panic!("a newer record was read") };
    assert!(
        e.to_string()
            .contains("catalog record version 7 is newer than this listener reads (up to 3)"),
        "{e}"
    );
    assert!(store.list().unwrap().is_empty(), "skipped in lists, not fatal");
}

#[tokio::test]
async fn a_dump_imports_into_an_empty_catalog_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("old")).unwrap();
    let mut done = BackupRecord::new("b1", "g", &["a".to_string()], "operator:x", 5);
    done.state = State::Succeeded;
    done.servers[0].artifacts =
        vec![Artifact { quiescer: "pg".into(), name: "label".into(), bytes: vec![0, 1, 255] }];
    store.save(&done, &[entry("one"), entry("two")]).await.unwrap();
    let other = BackupRecord::new("b2", "g", &["a".to_string()], "operator:x", 6);
    store.save(&other, &[entry("three")]).await.unwrap();
    let (bytes, n) = store.dump().unwrap();
    assert_eq!(n, 2);

    let dumped = parse_dump(&bytes).unwrap();
    let fresh = Store::open(&dir.path().join("new")).unwrap();
    fresh.import(&dumped).unwrap();
    assert_eq!(fresh.get("b1").unwrap(), done);
    assert_eq!(fresh.get("b2").unwrap(), other);
    assert_eq!(fresh.log("b1", 0).unwrap(), vec![(0, entry("one")), (1, entry("two"))]);
    // The log goes on after the imported lines.
    assert_eq!(fresh.save(&done, &[entry("four")]).await.unwrap(), 3);
}

#[test]
fn a_dump_line_this_listener_cannot_read_names_its_backup() {
    let line = br#"{"id":"b9","record":{"version":99,"id":"b9"},"log":[]}"#;
    let err = parse_dump(line).unwrap_err();
    assert!(err.contains("backup b9") && err.contains("version 99"), "{err}");
}

#[tokio::test]
async fn a_pin_survives_the_backups_own_saves_and_makes_the_record_version_3() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut record = BackupRecord::new("b1", "g", &["a".to_string()], "operator:x", 5);
    store.save(&record, &[]).await.unwrap();
    let pinned = store.mark("b1", Mark::Pin(true), &[entry("pinned")]).await.unwrap();
    assert!(pinned.pinned);
    // The backup's task saves its own record, which never holds the pin: the pin stays.
    record.state = State::Succeeded;
    assert!(!record.pinned);
    store.save(&record, &[entry("done")]).await.unwrap();
    let read = store.get("b1").unwrap();
    assert!(read.pinned && read.state == State::Succeeded);
    assert_eq!(store.log("b1", 0).unwrap().len(), 2);
    let raw = |store: &Store| -> serde_json::Value {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(BACKUPS).unwrap();
        serde_json::from_slice(table.get("b1").unwrap().unwrap().value()).unwrap()
    };
    assert_eq!(raw(&store)["version"], 3, "an older listener must not rewrite it without the pin");
    store.mark("b1", Mark::Expire(77), &[]).await.unwrap();
    store.mark("b1", Mark::Pin(false), &[]).await.unwrap();
    let read = store.get("b1").unwrap();
    assert_eq!((read.pinned, read.expired), (false, Some(77)));
    store.save(&record, &[]).await.unwrap();
    assert_eq!(store.get("b1").unwrap().expired, Some(77), "an expiry is never undone by a save");
    assert!(matches!(store.mark("nope", Mark::Pin(true), &[]).await, Err(Error::UnknownBackup(_))));
}
