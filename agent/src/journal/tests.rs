//! The journal file: round trip, atomic replace, recovery runs and clears what it finds.

use super::*;

fn entry(backup: &str, key: &str) -> Entry {
    Entry { backup: backup.into(), key: key.into(), action: Action::Resume { pid: 999_999 } }
}

fn check() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = Journal::path(dir.path(), "srv-a");
    (dir, path)
}

#[test]
fn what_is_armed_survives_a_reopen() {
    let (_dir, path) = check();
    let mut j = Journal::new(&path);
    j.arm(entry("b1", "app")).unwrap();
    j.arm(entry("b1", "fs")).unwrap();
    j.arm(entry("b1", "app")).unwrap();
    let again = Journal::open(&path).unwrap();
    assert_eq!(again.entries(), [entry("b1", "fs"), entry("b1", "app")]);
    assert_eq!(again.owner_pid(), std::process::id());
    j.disarm("b1", "fs").unwrap();
    assert_eq!(Journal::open(&path).unwrap().entries(), [entry("b1", "app")]);
    j.release("b1").unwrap();
    assert!(Journal::open(&path).unwrap().entries().is_empty());
}

#[test]
fn saves_replace_the_file_whole_and_leave_no_temp_files() {
    let (dir, path) = check();
    let mut j = Journal::new(&path);
    for i in 0..20 {
        j.arm(entry(&format!("b{i}"), "app")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "torn: {text}");
    }
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, [std::ffi::OsString::from("srv-a.journal.json")]);
    // A failed save changes nothing in memory.
    std::fs::remove_dir_all(dir.path()).unwrap();
    assert!(j.arm(entry("late", "app")).is_err());
    assert_eq!(j.entries().len(), 20);
}

#[test]
fn a_missing_file_is_empty_and_a_garbled_one_an_error_naming_it() {
    let (_dir, path) = check();
    assert!(Journal::open(&path).unwrap().entries().is_empty());
    std::fs::write(&path, "{not json").unwrap();
    let err = Journal::open(&path).unwrap_err().to_string();
    assert!(err.contains("srv-a.journal.json"), "{err}");
}

#[test]
fn recovery_runs_every_entry_and_clears_the_file() {
    let (dir, path) = check();
    let marker = dir.path().join("ran");
    let mut j = Journal::new(&path);
    j.owner_pid = 0; // as if written by an agent that is gone
    for n in ["one", "two"] {
        let action = Action::Run {
            argv: vec!["/bin/sh".into(), "-c".into(), format!("echo {n} >> {}", marker.display())],
            env: vec![],
            timeout_ms: 5000,
        };
        j.arm(Entry { backup: "b1".into(), key: n.into(), action }).unwrap();
    }
    Journal::forget(&path, "other").unwrap();
    let recovered = recover(&path).unwrap();
    assert!(recovered.entries().is_empty());
    assert!(Journal::open(&path).unwrap().entries().is_empty());
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "two\none\n");
}
