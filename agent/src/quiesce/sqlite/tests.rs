//! The sqlite holder's loop in-process on real databases (WAL and rollback journal) and the
//! config checks; the holder as a real child process is tested in agent/tests/it/sqlite.rs.

use std::io::Cursor;

use super::*;

/// A WAL database with `rows` rows left in its WAL by the connection returned (kept open: the
/// last connection to close checkpoints and removes the WAL).
fn wal_db(dir: &Path, rows: i64) -> (PathBuf, Connection) {
    let path = dir.join("app.db");
    let conn = Connection::open(&path).unwrap();
    conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get::<_, String>(0)).unwrap();
    conn.execute_batch("PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY)")
        .unwrap();
    for i in 0..rows {
        conn.execute("INSERT INTO t(id) VALUES (?1)", [i]).unwrap();
    }
    (path, conn)
}

/// Runs the holder's loop in this process on `input`, returning what it printed.
fn check(databases: &[PathBuf], input: &str) -> (anyhow::Result<()>, String) {
    let mut out = Vec::new();
    let result = serve(databases, Duration::from_secs(2), Cursor::new(input.to_string()), &mut out);
    (result, String::from_utf8(out).unwrap())
}

#[test]
fn the_holder_checkpoints_holds_and_rolls_back_on_eof() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _writer) = wal_db(dir.path(), 20);
    let (result, out) = check(std::slice::from_ref(&db), "hold\n");
    result.unwrap();
    let mut lines = out.lines();
    let held: Vec<HeldDb> =
        serde_json::from_str(lines.next().unwrap().strip_prefix("held ").unwrap()).unwrap();
    assert_eq!(lines.next(), Some("released"));
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].journal_mode, "wal");
    let (busy, log, done) = held[0].checkpoint.unwrap();
    assert_eq!(busy, 0);
    assert!(log >= 20 && done == log, "{:?}", held[0]);
    assert_eq!(held[0].truncated, Some(true));
    assert_eq!(held[0].under_hold, Some((0, 0, 0)));
    let text = held[0].describe();
    assert!(text.contains("the database file holds every committed transaction"), "{text}");
    // Nothing was written: the rows are all still there.
    let conn = Connection::open(&db).unwrap();
    assert_eq!(conn.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)).unwrap(), 20);
}

#[test]
fn the_holder_does_nothing_when_the_agent_goes_before_the_freeze() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _writer) = wal_db(dir.path(), 1);
    let (result, out) = check(&[db], "");
    result.unwrap();
    assert_eq!(out, "");
}

#[test]
fn a_missing_database_is_an_error_and_never_created() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let (result, _) = check(std::slice::from_ref(&missing), "hold\n");
    let e = format!("{:#}", result.unwrap_err());
    assert!(e.contains("missing.db") && e.contains("open"), "{e}");
    assert!(!missing.exists());
}

#[test]
fn a_rollback_journal_database_is_held_without_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.db");
    Connection::open(&path).unwrap().execute_batch("CREATE TABLE t(x)").unwrap();
    let (result, out) = check(std::slice::from_ref(&path), "hold\nrelease\n");
    result.unwrap();
    let held: Vec<HeldDb> =
        serde_json::from_str(out.lines().next().unwrap().strip_prefix("held ").unwrap()).unwrap();
    assert_eq!(held[0].checkpoint, None);
    assert_eq!(held[0].describe(), format!("{} (delete journal)", path.display()));
}

#[test]
fn config_problems_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _writer) = wal_db(dir.path(), 0);
    let config = |databases: Vec<PathBuf>, timeout_ms| SqliteConfig {
        name: "clinic".into(),
        databases,
        timeout_ms,
    };
    let problems = |c: SqliteConfig| {
        let mut out = Vec::new();
        c.problems("quiescer[0]", &mut out);
        out
    };
    assert!(problems(config(vec![db.clone()], 1000)).is_empty());
    assert_eq!(
        problems(config(vec![], 0)),
        vec![
            "quiescer[0].databases: list at least one database file".to_string(),
            "quiescer[0].timeout_ms: must be above 0".to_string()
        ]
    );
    let found =
        problems(config(vec!["rel.db".into(), dir.path().join("no.db"), db.clone(), db], 5));
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(found[0].contains("databases[0]: rel.db is not an absolute path"), "{found:?}");
    assert!(found[1].contains("databases[1]") && found[1].contains("not an existing file"));
    assert!(found[2].contains("databases[3]") && found[2].contains("appears twice"));
}

#[test]
fn the_deploy_example_parses_into_this_config() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent-sqlite-process.example.toml");
    let config = crate::Config::load(&path).unwrap();
    let found = config.quiescers.iter().find_map(|q| match q {
        crate::config::QuiescerConfig::Sqlite(c) => Some(c.clone()),
        _ => None,
    });
    let c = found.expect("a sqlite quiescer in the example");
    assert_eq!(c.name, "records");
    assert_eq!(c.databases.len(), 2);
    assert_eq!(c.timeout_ms, 10_000);
    // An unknown field is refused, naming it.
    let bad =
        std::fs::read_to_string(&path).unwrap().replace("timeout_ms = 10000 ", "timout_ms = 1 ");
    let e = crate::Config::parse(&bad).unwrap_err();
    assert!(e.contains("timout_ms"), "{e}");
}

#[test]
fn a_database_on_a_filesystem_frozen_before_it_is_a_config_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _writer) = wal_db(dir.path(), 0);
    let quiescers = |first: &str, second: &str| {
        let fsfreeze = format!("[[quiescer]]\nkind = \"fsfreeze\"\nmount = {:?}\n", dir.path());
        let sqlite =
            format!("[[quiescer]]\nkind = \"sqlite\"\nname = \"db\"\ndatabases = [{db:?}]\n");
        let pick = |k: &str| if k == "fsfreeze" { fsfreeze.clone() } else { sqlite.clone() };
        format!(
            "server = \"fs1\"\nlisten = \"127.0.0.1:7501\"\nvolumes = [\"data\"]\n\
             [tls]\nca = \"/x\"\ncert = \"/x\"\nkey = \"/x\"\n{}{}[snapshot]\nprovider = \"btrfs\"\nsnapshot_dir = \"/x\"\n",
            pick(first),
            pick(second)
        )
    };
    let ours = |text: String| -> Vec<String> {
        let config = crate::Config::parse(&text).unwrap();
        config.problems().into_iter().filter(|p| p.contains("list this quiescer before")).collect()
    };
    let found = ours(quiescers("fsfreeze", "sqlite"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0]
        .starts_with(&format!("quiescer[1]: {} is on the filesystem that fsfreeze", db.display())));
    assert!(ours(quiescers("sqlite", "fsfreeze")).is_empty());
}

/// Frames counted before an untruncated WAL are not said to be "more" committed before the hold.
#[test]
fn a_wal_not_truncated_is_described_without_more_frames() {
    let db = |truncated, under_hold| HeldDb {
        path: "/d/app.db".into(),
        journal_mode: "wal".into(),
        checkpoint: Some((0, 30, 30)),
        truncated: Some(truncated),
        under_hold: Some(under_hold),
    };
    let kept = db(false, (0, 34, 34)).describe();
    assert!(
        kept.contains("not truncated")
            && kept.contains("then 34 of 34 checkpointed under the hold"),
        "{kept}"
    );
    let cut = db(true, (0, 4, 4)).describe();
    assert!(cut.contains("wal truncated, then 4 more committed before the hold"), "{cut}");
}
