//! The rebuild's decisions: every record terminal, unfinished ones closed by what the
//! repository says, backups sealed after the save added, other listeners' left out.

use super::plan::{plan, Saved, Sealed, RECOVERED_BY};
use crate::model::{
    Artifact, BackupRecord, CutRecord, CutVerdict, ServerCutRecord, ServerEnd, State, StateName,
};
use crate::store::Dumped;

fn record(id: &str, state: State, created: i64) -> Dumped {
    let mut record = BackupRecord::new(id, "g", &["a".to_string()], "operator:x", created);
    record.state = state;
    record.servers[0].cut.prepare_sent = Some(created);
    Dumped { record, log: Vec::new() }
}

fn sealed(id: &str, group: &str, at: i64) -> Sealed {
    let cut = CutRecord {
        backup: id.into(),
        group: group.into(),
        created: at - 10,
        verdict: Some(CutVerdict { consistent: true, text: "consistent".into() }),
        servers: vec![ServerCutRecord {
            server: "a".into(),
            cut: crate::model::ServerCut::default(),
            snapshots: Vec::new(),
        }],
    };
    let label = Artifact { quiescer: "pg".into(), name: "label".into(), bytes: b"x".to_vec() };
    Sealed {
        manifest: format!("m-{id}"),
        backup: id.into(),
        created_unix_ms: at,
        cut: Ok(cut),
        artifacts: vec![("a".into(), label)],
    }
}

#[test]
fn every_rebuilt_record_is_terminal_and_settled() {
    let saved = Saved {
        backups: vec![
            record("done", State::Succeeded, 1),
            record("copying", State::Copying { deadline: 9 }, 2),
            record("preparing", State::Preparing { sent_at: 3, cutoff_at: 4 }, 3),
        ],
        written_unix_ms: 100,
    };
    let p = plan(saved, &[sealed("copying", "g", 90)], &["g".into()], 500);
    assert_eq!(p.closed, ["copying", "preparing"]);
    for b in &p.backups {
        assert!(b.record.state.is_terminal(), "{} is {:?}", b.record.id, b.record.state);
    }
    let copying = &p.backups.iter().find(|b| b.record.id == "copying").unwrap();
    assert_eq!(copying.record.state, State::Succeeded, "its backup manifest says it was sealed");
    assert!(copying.log[0].message.contains("m-copying"));
    let preparing = &p.backups.iter().find(|b| b.record.id == "preparing").unwrap();
    assert!(matches!(
        &preparing.record.state,
        State::Failed { phase: StateName::Preparing, reason } if reason.contains("catalog was lost")
    ));
    assert_eq!(preparing.record.settled, Some(500));
    assert_eq!(preparing.record.servers[0].end, Some(ServerEnd::NotRecorded));
    // A finished backup is kept as it was.
    let done = &p.backups.iter().find(|b| b.record.id == "done").unwrap();
    assert_eq!(done.record, record("done", State::Succeeded, 1).record);
}

#[test]
fn a_backup_sealed_after_the_save_is_recovered_from_its_manifest() {
    let saved = Saved { backups: vec![record("old", State::Succeeded, 1)], written_unix_ms: 100 };
    let all = [sealed("old", "g", 50), sealed("new", "g", 200)];
    let p = plan(saved, &all, &["g".into()], 500);
    assert_eq!(p.added, ["new"]);
    let new = &p.backups.last().unwrap();
    assert_eq!(new.record.id, "new");
    assert_eq!(new.record.state, State::Succeeded);
    assert_eq!(new.record.started_by, RECOVERED_BY);
    assert_eq!(new.record.created, 190);
    assert_eq!(new.record.settled, Some(200));
    assert_eq!(new.record.verdict.as_ref().map(|v| v.consistent), Some(true));
    assert_eq!(new.record.servers[0].artifacts[0].name, "label");
    assert!(new.log[0].message.contains("recovered from the repository"), "{}", new.log[0].message);
}

#[test]
fn other_listeners_backups_are_left_out() {
    let saved = Saved { backups: Vec::new(), written_unix_ms: 100 };
    let mut unreadable = sealed("broken", "g", 300);
    unreadable.cut = Err("no".into());
    let all = [sealed("before", "g", 50), sealed("elsewhere", "h", 200), unreadable];
    let p = plan(saved, &all, &["g".into()], 500);
    assert!(p.backups.is_empty() && p.added.is_empty());
    assert_eq!(p.skipped.len(), 3, "{:?}", p.skipped);
}
