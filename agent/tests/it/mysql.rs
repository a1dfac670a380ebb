//! The mysql quiescer against private MariaDB servers (their own datadir, socket and loopback
//! port; a `stillpoint` user with only the documented grants): through the agent with a btrfs
//! snapshot while a writer commits (commits wait, the snapshot starts as a server whose tables
//! check and hold every row committed before the freeze), the guardian's hangup, the binlog
//! artifact, a wrong password, a lock that cannot be had in time, and the agent binary stalled
//! (its guardian hangs up at the lease) or killed (the kernel closes the connection).

use std::path::Path;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use stillpoint_agent::config::{QuiescerConfig, SnapshotConfig};
use stillpoint_agent::quiesce::mysql::{Lock, Mysql, MysqlConfig};
use stillpoint_agent::quiesce::Quiescer;
use stillpoint_proto::{CleanupRequest, CommitRequest};

use crate::guardian::{mock_san_toml, prepare, BinAgent};
use crate::mariadb::{install, Mariadb, STILLPOINT_PASSWORD};
use crate::support::{config, password_file, run, sparse_image, Agent, Certs, LoopMount, Writer};

/// A writer committing rows as `app`: row `i` into the InnoDB table, then into the Aria one,
/// each in autocommit; what it acknowledges is the last `i` whose both inserts were.
fn writer(mut conn: mysql::Conn) -> Writer {
    Writer::start(move |i| {
        conn.exec_drop("INSERT INTO app.t (n) VALUES (?)", (i,))
            .and_then(|()| conn.exec_drop("INSERT INTO app.a (n) VALUES (?)", (i,)))
            .map(|()| i)
            .map_err(|e| format!("row {i}: {e}"))
    })
}

/// `n` values of `table` on `server`, sorted.
fn values(server: &Mariadb, table: &str) -> Vec<u64> {
    let text = server.sql(&format!("SELECT n FROM {table} ORDER BY n"));
    text.lines().map(|l| l.parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_commits_wait_while_held_and_the_btrfs_snapshot_restores_every_row_committed_before(
) {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-db");
    let image = dir.path().join("btrfs.img");
    sparse_image(&image, 1 << 30);
    run("mkfs.btrfs", &["-q", "-f", image.to_str().unwrap()]);
    let fs = LoopMount::new(&image, &dir.path().join("pool"), false, "rw");
    let volume = fs.mount.join("db");
    run("btrfs", &["subvolume", "create", volume.to_str().unwrap()]);
    let snapshot_dir = fs.mount.join(".stillpoint");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let datadir = volume.join("data");
    install(&datadir);
    let server = Mariadb::start(&datadir, &dir.path().join("run"));
    server.setup();

    let quiescer = server.quiescer(&password_file(dir.path(), STILLPOINT_PASSWORD), 10_000);
    let snapshot = SnapshotConfig::Btrfs { snapshot_dir: snapshot_dir.clone() };
    let cfg = config(
        &certs,
        &[volume.to_str().unwrap()],
        vec![QuiescerConfig::Mysql(quiescer)],
        snapshot,
    );
    let agent = Agent::start(cfg).await;
    let mut client = agent.client(&certs, "listener");

    let writer = writer(server.app());
    writer.wait_for(50, Duration::from_secs(30));

    let p = client.prepare(prepare("b1", 30_000)).await.unwrap().into_inner();
    let at_freeze = writer.acked();
    let frozen = Instant::now();
    assert!(p.prepared, "{p:?}");
    let detail = &p.steps[0].detail;
    assert!(detail.contains("BACKUP STAGE BLOCK_COMMIT held"), "{detail}");
    assert!(detail.contains("binlog_file: mysql-bin.000001"), "{detail}");
    println!("freeze: {detail}");

    // Commits wait while held: no new row is acknowledged, the writer's statement waits, and
    // nothing failed.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let waiting = writer.waiting();
    assert!(writer.acked() <= at_freeze + 1, "rows committed while held: {}", writer.acked());
    assert!(waiting.is_some_and(|w| w >= Duration::from_millis(500)), "{waiting:?}");
    assert!(writer.errors().is_empty(), "{:?}", writer.errors());

    let c = client
        .commit(CommitRequest {
            backup_id: "b1".into(),
            freeze_token: p.freeze_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.committed, "{c:?}");
    let thawed = c.steps.iter().find(|s| s.name == "mariadb" && s.action == "thaw");
    assert!(thawed.is_some_and(|s| s.ok), "{:?}", c.steps);
    // The writer goes on.
    writer.wait_for(at_freeze + 2, Duration::from_secs(10));
    println!("commits waited {:?}, from the freeze to the thaw", frozen.elapsed());
    writer.wait_for(at_freeze + 20, Duration::from_secs(10));
    let errors = writer.stop();
    assert!(errors.is_empty(), "{errors:?}");

    // A server started on a writable copy of the snapshot recovers, checks clean and has every
    // row committed before the freeze, and none committed after it.
    let snap = Path::new(&c.snapshots[0].locator);
    assert_eq!(snap, snapshot_dir.join("b1").join("db"));
    let copy = fs.mount.join("restored");
    run("btrfs", &["subvolume", "snapshot", snap.to_str().unwrap(), copy.to_str().unwrap()]);
    let restored = Mariadb::start(&copy.join("data"), &dir.path().join("run-restored"));
    let tables = restored.sql(
        "SELECT CONCAT(TABLE_SCHEMA, '.', TABLE_NAME) FROM information_schema.TABLES
         WHERE TABLE_TYPE = 'BASE TABLE'
           AND TABLE_SCHEMA NOT IN ('information_schema', 'performance_schema')",
    );
    let tables: Vec<&str> = tables.lines().collect();
    assert!(tables.contains(&"app.t") && tables.contains(&"app.a"), "{tables:?}");
    for table in &tables {
        let checked = restored.sql(&format!("CHECK TABLE {table}"));
        let status: Vec<&str> = checked.lines().filter(|l| l.contains("\tstatus\t")).collect();
        assert!(!status.is_empty() && status.iter().all(|l| l.ends_with("\tOK")), "{checked}");
    }
    println!("CHECK TABLE ok on {} tables", tables.len());
    for table in ["app.t", "app.a"] {
        let rows = values(&restored, table);
        let expected: Vec<u64> = (1..=at_freeze).collect();
        assert!(rows.len() as u64 <= at_freeze + 1, "{table}: rows after the freeze: {rows:?}");
        assert_eq!(rows[..at_freeze as usize], expected[..], "{table}");
    }
    drop(restored);

    let cleaned = client.cleanup(CleanupRequest { backup_id: "b1".into() }).await.unwrap();
    assert_eq!(cleaned.into_inner().snapshots_deleted, 1);
    agent.stop().await;
    run("btrfs", &["subvolume", "delete", copy.to_str().unwrap()]);
    drop(server);
    drop(fs);
}

#[test]
fn mariadb_hold_ends_with_the_guardians_hangup_and_the_binlog_position_is_an_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("data");
    install(&datadir);
    let server = Mariadb::start(&datadir, &dir.path().join("run"));
    server.setup();

    // A wrong password: refused before anything is held, the password nowhere in the error.
    let wrong = "not-the-password-93";
    let bad = Mysql::new(server.quiescer(&password_file(dir.path(), wrong), 5_000));
    let err = format!("{:#}", bad.thaw_action("b0").unwrap_err());
    assert!(err.contains("Access denied for user 'stillpoint'@'localhost'"), "{err}");
    assert!(err.contains("check the user and its password (password_file "), "{err}");
    assert!(!err.contains(wrong) && !err.contains(STILLPOINT_PASSWORD), "{err}");
    let err = format!("{:#}", bad.freeze("b0").unwrap_err());
    assert!(err.contains("Access denied") && !err.contains(wrong), "{err}");
    println!("wrong password: {err}");

    // The user and password from a MySQL option file's [client] section.
    let option_file = dir.path().join("stillpoint.cnf");
    let cnf = format!("[mysqld]\nuser = mysql\n[client]\nuser = stillpoint\npassword = \"{STILLPOINT_PASSWORD}\"\n");
    std::fs::write(&option_file, cnf).unwrap();
    let q = Mysql::new(MysqlConfig {
        user: None,
        password_file: None,
        option_file: Some(option_file),
        ..server.quiescer(Path::new("/unused"), 5_000)
    });
    let mut app = server.app();
    app.query_drop("INSERT INTO app.t (n) VALUES (1)").unwrap();
    let action = q.thaw_action("b1").unwrap().expect("a hangup");
    assert!(matches!(action, stillpoint_agent::guardian::Action::Hangup { .. }), "{action:?}");
    let detail = q.freeze("b1").unwrap();
    assert!(q.freeze("b1").unwrap().contains("already held"), "freeze is idempotent");

    // While held the binary log does not move: its file is as long as the recorded position.
    let position = server.sql("SHOW MASTER STATUS");
    let mut fields = position.split('\t');
    let (file, offset) = (fields.next().unwrap(), fields.next().unwrap());
    assert!(detail.contains(&format!("binlog_position: {offset}")), "{detail} vs {position}");
    let len = std::fs::metadata(datadir.join(file)).unwrap().len();
    assert_eq!(len.to_string(), offset, "binlog {file} length while held");

    // A commit in another session waits...
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    let blocked = std::thread::spawn(move || {
        let r = app.query_drop("INSERT INTO app.t (n) VALUES (2)").map_err(|e| e.to_string());
        tx.send(started.elapsed()).unwrap();
        r
    });
    assert!(rx.recv_timeout(Duration::from_millis(700)).is_err(), "a commit went through");
    // ...until the guardian hangs up our connection (as it does for a stalled agent).
    let done = action.execute().unwrap();
    assert!(done.starts_with("closed connection"), "{done}");
    let waited = rx.recv_timeout(Duration::from_secs(10)).expect("the commit went through");
    blocked.join().unwrap().unwrap();
    println!("commit waited {waited:?}, released by the hangup");
    assert_eq!(values(&server, "app.t"), vec![1, 2]);

    // The agent hears that the guardian thawed (its hangup is the thaw), and the artifact says
    // where the binlog stood.
    q.thawed_elsewhere("b1").unwrap();
    q.thaw("b1").unwrap();
    let artifacts = q.artifacts("b1");
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert_eq!(artifacts[0].name, "binlog_position");
    let text = String::from_utf8(artifacts[0].bytes.clone()).unwrap();
    assert!(text.contains(&format!("binlog_file: {file}\nbinlog_position: {offset}\n")), "{text}");
    assert!(text.contains("gtid_binlog_pos: "), "{text}");
    assert!(q.artifacts("b1").is_empty(), "handed over once");
    println!("artifact:\n{text}");

    // MySQL's path, FLUSH TABLES WITH READ LOCK, on the same server: commits wait until the
    // thaw's UNLOCK TABLES.
    let config = server.quiescer(&password_file(dir.path(), STILLPOINT_PASSWORD), 5_000);
    let q = Mysql::with_lock(config, Lock::FlushWithReadLock);
    let detail = q.freeze("b2").unwrap();
    assert!(detail.contains("FLUSH TABLES WITH READ LOCK held"), "{detail}");
    let (tx, rx) = std::sync::mpsc::channel();
    let mut app = server.app();
    let blocked = std::thread::spawn(move || {
        let r = app.query_drop("INSERT INTO app.a (n) VALUES (3)").map_err(|e| e.to_string());
        tx.send(()).unwrap();
        r
    });
    assert!(rx.recv_timeout(Duration::from_millis(700)).is_err(), "a write went through");
    q.thaw("b2").unwrap();
    rx.recv_timeout(Duration::from_secs(5)).expect("the write went through after the thaw");
    blocked.join().unwrap().unwrap();
    let text = String::from_utf8(q.artifacts("b2").remove(0).bytes).unwrap();
    assert!(text.contains("lock: FLUSH TABLES WITH READ LOCK\n"), "{text}");
}

/// A repeated freeze says "already held" only while the connection holding the lock lives:
/// after a hangup it fails and says the lock went with it, and a new arm connects again.
#[test]
fn mariadb_repeated_freeze_after_the_connection_died_says_the_lock_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("data");
    install(&datadir);
    let server = Mariadb::start(&datadir, &dir.path().join("run"));
    server.setup();
    let q = Mysql::new(server.quiescer(&password_file(dir.path(), STILLPOINT_PASSWORD), 5_000));
    let action = q.thaw_action("b1").unwrap().expect("a hangup");
    q.freeze("b1").unwrap();
    assert!(action.execute().unwrap().starts_with("closed connection"));
    let err = format!("{:#}", q.freeze("b1").unwrap_err());
    assert!(err.contains("was lost") && err.contains("and the lock with it"), "{err}");
    q.thaw_action("b1").unwrap().expect("armed on a new connection");
    assert!(q.freeze("b1").unwrap().contains("held after"), "a new lock");
    // Another backup never takes the connection that holds this one's lock.
    let err = format!("{:#}", q.thaw_action("b2").unwrap_err());
    assert!(err.contains("still held for backup b1; thaw it first"), "{err}");
    let err = format!("{:#}", q.freeze("b2").unwrap_err());
    assert!(err.contains("still held for backup b1"), "{err}");
    assert!(q.freeze("b1").unwrap().contains("already held"), "b1 still holds");
    q.thaw("b1").unwrap();
    assert_eq!(q.artifacts("b1").len(), 1);
}

/// A lock whose connection the server killed ended then, maybe before the snapshot: the thaw
/// fails and says so (the backup then reports that server's writes as not known to be held),
/// and hands over no binlog position as the snapshot's.
#[test]
fn mariadb_thaw_after_the_server_killed_the_connection_fails_and_says_the_lock_may_have_ended_early(
) {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("data");
    install(&datadir);
    let server = Mariadb::start(&datadir, &dir.path().join("run"));
    server.setup();
    let q = Mysql::new(server.quiescer(&password_file(dir.path(), STILLPOINT_PASSWORD), 5_000));
    q.thaw_action("b1").unwrap().expect("a hangup");
    q.freeze("b1").unwrap();
    let id = server.sql("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = 'stillpoint'");
    server.sql(&format!("KILL {id}"));
    let err = format!("{:#}", q.thaw("b1").unwrap_err());
    assert!(err.contains("was lost, so the lock ended then, maybe before the snapshot"), "{err}");
    assert!(q.artifacts("b1").is_empty(), "no position handed over");
    q.thaw("b1").unwrap();
    // The next backup arms and freezes on a new connection.
    q.thaw_action("b2").unwrap().expect("a hangup");
    assert!(q.freeze("b2").unwrap().contains("held after"), "a new lock");
    q.thaw("b2").unwrap();
    assert_eq!(q.artifacts("b2").len(), 1);
}

#[test]
fn mariadb_freeze_gives_up_at_its_timeout_and_leaves_nothing_held() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("data");
    install(&datadir);
    let server = Mariadb::start(&datadir, &dir.path().join("run"));
    server.setup();
    let q = Mysql::new(server.quiescer(&password_file(dir.path(), STILLPOINT_PASSWORD), 2_000));

    // Another session's table lock keeps the backup lock from being granted.
    let mut blocker = server.app();
    blocker.query_drop("LOCK TABLES app.t WRITE").unwrap();
    q.thaw_action("b1").unwrap();
    let started = Instant::now();
    let err = format!("{:#}", q.freeze("b1").unwrap_err());
    let took = started.elapsed();
    println!("gave up after {took:?}: {err}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(5), "{took:?}");
    assert!(err.contains("could not get the lock within 2s"), "{err}");
    assert!(err.contains("nothing is held"), "{err}");
    q.thaw("b1").unwrap();

    // Nothing of ours is left: no stillpoint connection, and commits go through.
    blocker.query_drop("UNLOCK TABLES").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while server
        .sql("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = 'stillpoint'")
        != "0"
    {
        assert!(Instant::now() < deadline, "the quiescer's connection is still open");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    server.app().query_drop("INSERT INTO app.t (n) VALUES (1)").unwrap();
    // Held, it would wait until lock_wait_timeout; a loaded machine may take a moment anyway.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert!(q.artifacts("b1").is_empty());
}

/// Runs one INSERT as `app` on a thread; the receiver hears when it was acknowledged.
fn insert_in_thread(server: &Mariadb, n: u64) -> std::sync::mpsc::Receiver<Instant> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut app = server.app();
    std::thread::spawn(move || {
        if app.exec_drop("INSERT INTO app.t (n) VALUES (?)", (n,)).is_ok() {
            let _ = tx.send(Instant::now());
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_held_by_a_stalled_agent_is_released_at_the_lease_and_by_a_dead_agent_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let datadir = dir.path().join("data");
    install(&datadir);
    let server = Mariadb::start(&datadir, &dir.path().join("run"));
    server.setup();
    let certs = Certs::new("srv-m");
    let quiescer = format!(
        "[[quiescer]]\nkind = \"mysql\"\nname = \"mariadb\"\nsocket = {:?}\nuser = \"stillpoint\"\npassword_file = {:?}\ntimeout_ms = 5000\n",
        server.socket,
        password_file(dir.path(), STILLPOINT_PASSWORD)
    );
    let array = stillpoint_core::san::Array::init(&dir.path().join("array")).unwrap();
    array.create_lun(&certs.server, "data", 1 << 20).unwrap();
    let state = dir.path().join("state");
    let agent =
        BinAgent::start(dir.path(), &certs, &state, &quiescer, &mock_san_toml(&array)).await;
    let mut client = agent.client(&certs);

    // SIGSTOP: the agent cannot thaw; its guardian hangs up the connection at the lease.
    let sent = Instant::now();
    let p = client.prepare(prepare("b1", 2000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    run("kill", &["-STOP", &agent.pid()]);
    let committed = insert_in_thread(&server, 1);
    // The lease plus the 3 s the fault suite allows a loaded machine: released at the lease.
    let at = committed.recv_timeout(Duration::from_secs(5)).expect("committed after the lease");
    let waited = at.duration_since(sent);
    println!("stalled agent: the commit went through {waited:?} after Prepare (lease 2000ms)");
    assert!(waited >= Duration::from_millis(1900), "released before the lease: {waited:?}");
    agent.wait_log(
        "closed the connection of quiescer mariadb for backup b1",
        Duration::from_secs(2),
    );
    run("kill", &["-CONT", &agent.pid()]);
    let c = client
        .commit(CommitRequest {
            backup_id: "b1".into(),
            freeze_token: p.freeze_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!c.committed && c.reason.contains("lease expired"), "{c:?}");

    // SIGKILL: the kernel closes the agent's socket and the server lets go at once.
    let p = client.prepare(prepare("b2", 30_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    let committed = insert_in_thread(&server, 2);
    assert!(committed.recv_timeout(Duration::from_millis(500)).is_err(), "not held");
    let killed = Instant::now();
    run("kill", &["-KILL", &agent.pid()]);
    // Well inside the 30 s lease, so not the guardian's doing; a loaded machine may be slow.
    let at =
        committed.recv_timeout(Duration::from_secs(10)).expect("committed once the agent died");
    println!("dead agent: the commit went through {:?} after SIGKILL", at.duration_since(killed));
    assert_eq!(values(&server, "app.t"), vec![1, 2]);
    drop(agent);
}
