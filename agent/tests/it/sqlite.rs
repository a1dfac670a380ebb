//! The sqlite quiescer against a real writer: a thread inserting rows into a WAL database with a
//! busy timeout, the holder run as the real `stillpoint-agent hold-sqlite`, a copy taken while
//! held checked by the `sqlite3` tool, and the hold ended by thaw, by killing the holder, by
//! dropping the quiescer and by a real guardian at the lease.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use stillpoint_agent::guardian::link::{Link, Program};
use stillpoint_agent::guardian::{Action, Outcome, Request};
use stillpoint_agent::quiesce::procs::ProcRef;
use stillpoint_agent::quiesce::sqlite::{Sqlite, SqliteConfig};
use stillpoint_agent::quiesce::Quiescer;

use crate::guardian::{mock_san_toml, prepare, BinAgent};
use crate::support::{self, run, Certs};

const BIN: &str = env!("CARGO_BIN_EXE_stillpoint-agent");

use stillpoint_core::san::Array;

/// A thread inserting numbered rows into `rows` of a WAL database, one transaction each, with
/// a 30 s busy timeout: a held write lock blocks it, never fails it. Stopped on Drop.
struct Writer {
    db: PathBuf,
    rows: support::Writer,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        let db = dir.join("clinic.db");
        let conn = Connection::open(&db).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch("CREATE TABLE rows(id INTEGER PRIMARY KEY, at TEXT NOT NULL)").unwrap();
        conn.busy_timeout(Duration::from_secs(30)).unwrap();
        let rows = support::Writer::start(move |id| {
            // A breath between transactions, so others get the write lock.
            std::thread::sleep(Duration::from_millis(1));
            conn.execute(
                "INSERT INTO rows(id, at) VALUES (?1, strftime('%Y-%m-%d %H:%M:%f','now'))",
                [id],
            )
            .map(|_| id)
            .map_err(|e| format!("insert {id}: {e}"))
        });
        let writer = Writer { db, rows };
        writer.wait_for(50, Duration::from_secs(10));
        writer
    }

    /// The id of the last row whose commit returned.
    fn committed(&self) -> u64 {
        self.rows.acked()
    }

    fn error(&self) -> Option<String> {
        self.rows.errors().into_iter().next()
    }

    /// Waits until at least `rows` rows are committed.
    fn wait_for(&self, rows: u64, within: Duration) -> Duration {
        self.rows.wait_for(rows, within)
    }

    /// Asserts the writer commits nothing for `pause` (it is blocked) and has not failed.
    fn assert_blocked(&self, pause: Duration) -> u64 {
        // A commit that returned just before the hold has stored its id by now.
        std::thread::sleep(Duration::from_millis(50));
        let before = self.committed();
        std::thread::sleep(pause);
        assert_eq!(self.committed(), before, "the writer committed while held");
        assert_eq!(self.error(), None, "the writer failed instead of waiting");
        before
    }

    /// The main file and the WAL, as bytes.
    fn files(&self) -> (Vec<u8>, Vec<u8>) {
        let wal = PathBuf::from(format!("{}-wal", self.db.display()));
        (std::fs::read(&self.db).unwrap(), std::fs::read(wal).unwrap_or_default())
    }
}

fn quiescer(db: &Path, timeout_ms: u64) -> Sqlite {
    let config = SqliteConfig { name: "clinic".into(), databases: vec![db.into()], timeout_ms };
    Sqlite::new(&config, BIN.into())
}

fn holder_of(action: &Option<Action>) -> ProcRef {
    match action {
        Some(Action::Kill { pid, start }) => ProcRef { pid: *pid, start: *start },
        other => panic!("expected a Kill action, got {other:?}"),
    }
}

#[test]
fn a_held_sqlite_database_stays_still_blocks_the_writer_and_snapshots_every_committed_row() {
    let dir = tempfile::tempdir().unwrap();
    let writer = Writer::start(dir.path());
    let q = quiescer(&writer.db, 5000);
    let holder = holder_of(&q.thaw_action("b1").unwrap());
    assert!(holder.alive());
    let before = writer.committed();
    let detail = q.freeze("b1").unwrap();
    eprintln!("freeze: {detail}");
    assert!(detail.starts_with("held a write transaction on 1 database in "), "{detail}");
    assert!(detail.contains("the database file holds every committed transaction"), "{detail}");

    let held = writer.assert_blocked(Duration::from_millis(100));
    assert!(held >= before);
    let first = writer.files();
    std::thread::sleep(Duration::from_millis(500));
    assert!(writer.files() == first, "the database files changed while held");
    assert_eq!(writer.committed(), held);
    // The snapshot: the main file alone, copied while held.
    let copy = dir.path().join("snapshot.db");
    std::fs::write(&copy, &first.0).unwrap();
    let checked = run(
        "sqlite3",
        &[
            copy.to_str().unwrap(),
            "PRAGMA integrity_check; SELECT count(*), min(id), max(id) FROM rows;",
        ],
    );
    assert_eq!(checked, format!("ok\n{held}|1|{held}"), "the copy lacks committed rows");

    let thawed = Instant::now();
    q.thaw("b1").unwrap();
    let resumed = writer.wait_for(held + 1, Duration::from_secs(5));
    eprintln!(
        "sqlite hold: {held} rows in the snapshot; writer resumed {}ms after thaw, its longest insert {}ms",
        resumed.as_millis(),
        writer.rows.longest().as_millis()
    );
    assert!(writer.rows.longest() >= Duration::from_millis(600), "the writer was never blocked");
    // Not released, the writer would wait out its 30 s busy timeout and fail.
    assert!(thawed.elapsed() < Duration::from_secs(5), "{:?}", thawed.elapsed());
    wait_gone(&holder);
    // Thaw again: nothing left to do.
    q.thaw("b1").unwrap();
    assert_eq!(writer.error(), None);
}

fn wait_gone(p: &ProcRef) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.alive() {
        assert!(Instant::now() < deadline, "holder {} still runs", p.pid);
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_sqlite_hold_ends_when_its_holder_is_killed_or_the_agent_side_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let writer = Writer::start(dir.path());
    let q = quiescer(&writer.db, 5000);

    // SIGKILL of the holder: the kernel drops its locks.
    let holder = holder_of(&q.thaw_action("b1").unwrap());
    q.freeze("b1").unwrap();
    let held = writer.assert_blocked(Duration::from_millis(200));
    run("kill", &["-KILL", &holder.pid.to_string()]);
    // Well inside the writer's 30 s busy timeout; a loaded machine may be slow.
    let took = writer.wait_for(held + 1, Duration::from_secs(5));
    eprintln!("writer resumed {}ms after SIGKILL of the holder", took.as_millis());
    // The thaw says the hold broke: the freeze's claim did not last.
    let e = q.thaw("b1").unwrap_err().to_string();
    assert!(e.contains("ended before the thaw") && e.contains("only crash-consistent"), "{e}");
    q.thaw("b1").unwrap();

    // The agent's end dropped (as when the agent dies): the holder reads EOF and rolls back.
    let holder = holder_of(&q.thaw_action("b2").unwrap());
    q.freeze("b2").unwrap();
    let held = writer.assert_blocked(Duration::from_millis(200));
    drop(q);
    let took = writer.wait_for(held + 1, Duration::from_secs(5));
    eprintln!("writer resumed {}ms after the quiescer was dropped", took.as_millis());
    wait_gone(&holder);
    assert_eq!(writer.error(), None);
}

#[test]
fn the_guardian_ends_the_sqlite_hold_at_the_lease() {
    let dir = tempfile::tempdir().unwrap();
    let writer = Writer::start(dir.path());
    let q = quiescer(&writer.db, 5000);
    let journal = dir.path().join("journal.json");
    let mut guardian = Link::start(Program::Exe { exe: BIN.into(), journal });
    let action = q.thaw_action("b1").unwrap().unwrap();
    let holder = holder_of(&Some(action.clone()));
    let armed = Instant::now();
    let arm = Request::Arm { backup: "b1".into(), lease_ms: 800, key: "clinic".into(), action };
    assert_eq!(guardian.request(arm).unwrap(), Outcome::Armed);
    q.freeze("b1").unwrap();
    let held = writer.assert_blocked(Duration::from_millis(300));
    writer.wait_for(held + 1, Duration::from_secs(3));
    let after = armed.elapsed();
    eprintln!("guardian ended the hold {}ms after arming a lease of 800ms", after.as_millis());
    assert!(after >= Duration::from_millis(750), "released before the lease: {after:?}");
    wait_gone(&holder);
    q.thawed_elsewhere("b1").unwrap();
    q.thaw("b1").unwrap();
    guardian.close(Duration::from_secs(2));
    assert_eq!(writer.error(), None);
}

#[test]
fn a_write_lock_held_past_the_timeout_fails_the_freeze_and_leaves_no_holder() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("busy.db");
    let other = Connection::open(&db).unwrap();
    other.execute_batch("CREATE TABLE t(x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1)").unwrap();
    let q = quiescer(&db, 300);
    let holder = holder_of(&q.thaw_action("b1").unwrap());
    let started = Instant::now();
    let e = format!("{:#}", q.freeze("b1").unwrap_err());
    assert!(e.contains("busy.db") && e.contains("kept the write lock past the timeout"), "{e}");
    // Without its 300 ms timeout the freeze would wait until `other` commits, after this check.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    wait_gone(&holder);
    other.execute_batch("COMMIT").unwrap();
    q.thaw("b1").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_cannot_hold_the_database_past_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-sq");
    let array = Array::init(&dir.path().join("array")).unwrap();
    array.create_lun("srv-sq", "data", 1 << 20).unwrap();
    let writer = Writer::start(dir.path());
    let quiescers = format!(
        "[[quiescer]]\nkind = \"sqlite\"\nname = \"clinic\"\ndatabases = [{:?}]\ntimeout_ms = 5000\n",
        writer.db
    );
    let state = dir.path().join("state");
    let agent =
        BinAgent::start(dir.path(), &certs, &state, &quiescers, &mock_san_toml(&array)).await;
    let sent = Instant::now();
    let p = agent.client(&certs).prepare(prepare("b1", 2000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    let step = p.steps.iter().find(|s| s.name == "clinic").expect("a step for the quiescer");
    assert!(step.detail.starts_with("held a write transaction on 1 database"), "{step:?}");
    run("kill", &["-STOP", &agent.pid()]);
    let held = writer.assert_blocked(Duration::from_millis(500));
    writer.wait_for(held + 1, Duration::from_secs(4));
    let after = sent.elapsed();
    eprintln!(
        "agent stopped: the writer went on {}ms after Prepare (lease 2000ms)",
        after.as_millis()
    );
    assert!(after >= Duration::from_millis(1900), "released before the lease: {after:?}");
    agent.wait_log("guardian: lease of", Duration::from_secs(1));
    run("kill", &["-CONT", &agent.pid()]);
    assert_eq!(writer.error(), None);
    drop(agent);
}
