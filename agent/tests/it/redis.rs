//! The redis quiescer against private redis-servers (own dir, loopback port; an ACL user with
//! only the documented commands): with RDB and with AOF, a writer's INCRs wait while paused, a
//! copy of the files restores every write the documented guarantee promises; the pause ends by
//! itself; a failed save fails the freeze and pauses nothing; a wrong password.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stillpoint_agent::quiesce::redis::{Redis, RedisConfig};
use stillpoint_agent::quiesce::Quiescer;

use crate::guardian::prepare;
use crate::support::{password_file, Writer};

const PASSWORD: &str = "redis-Secret-2718";

/// What the quiescer's ACL user may run: the documented privileges and nothing else.
const ACL: &str = "on resetkeys -@all +info +bgsave +bgrewriteaof +client|pause +client|unpause";

/// A private redis-server; killed on Drop.
struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Server {
    /// Starts a server on `dir` (no save points; `aof` turns on the AOF with fsync always).
    fn start(dir: &Path, aof: bool) -> Server {
        Server::start_on(dir, aof, stillpoint_core::testing::spare_loopback_port())
    }

    /// [`Server::start`] on `port` (to start it again where a quiescer points).
    fn start_on(dir: &Path, aof: bool, port: u16) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", dir.to_str().unwrap(), "--save", ""])
            .args(["--appendonly", if aof { "yes" } else { "no" }, "--appendfsync", "always"])
            .args(["--logfile", dir.join("redis.log").to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let server = Server { child, port, dir: dir.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ping = server
                .try_connect()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).map_err(Into::into));
            match ping {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => panic!("redis-server did not answer: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let mut admin = server.connect();
        let mut acl = redis::cmd("ACL");
        acl.arg("SETUSER").arg("stillpoint").arg(format!(">{PASSWORD}"));
        for rule in ACL.split_whitespace() {
            acl.arg(rule);
        }
        acl.query::<()>(&mut admin).unwrap();
        server
    }

    fn try_connect(&self) -> anyhow::Result<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        Ok(client.get_connection_with_timeout(Duration::from_secs(5))?)
    }

    /// A connection as the default user (the application).
    fn connect(&self) -> redis::Connection {
        self.try_connect().expect("connect to redis")
    }

    fn quiescer(&self, password_file: &Path, pause_ms: u64) -> RedisConfig {
        RedisConfig {
            name: "cache".into(),
            socket: None,
            host: Some("127.0.0.1".into()),
            port: Some(self.port),
            user: Some("stillpoint".into()),
            password_file: Some(password_file.to_path_buf()),
            password_env: None,
            pause_ms,
            timeout_ms: 5_000,
            save_while_paused: false,
        }
    }

    fn get(&self, key: &str) -> u64 {
        redis::cmd("GET").arg(key).query::<Option<u64>>(&mut self.connect()).unwrap().unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A writer running `INCR counter` as fast as answers come; it acknowledges the value answered.
fn writer(mut conn: redis::Connection) -> Writer {
    Writer::start(move |_| {
        redis::cmd("INCR").arg("counter").query::<u64>(&mut conn).map_err(|e| e.to_string())
    })
}

/// Copies `from` into `to` recursively (the server's files, as a snapshot would hold them).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "redis.log" {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Freeze with a writer running, check writes wait, copy the files, thaw, check writes go on;
/// returns (acked before the freeze began, acked when it returned, value in the restored copy).
fn freeze_copy_thaw_restore(aof: bool, save_while_paused: bool) -> (u64, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("live"), aof);
    let config = server.quiescer(&password_file(dir.path(), PASSWORD), 10_000);
    let q = Redis::new(RedisConfig { save_while_paused, ..config });
    assert!(q.thaw_action("b1").unwrap().is_none(), "the pause ends by itself");
    let writer = writer(server.connect());
    writer.wait_for(1_000, Duration::from_secs(10));

    let before = writer.acked();
    let detail = q.freeze("b1").unwrap();
    let at_freeze = writer.acked();
    println!("freeze ({}): {detail}", if aof { "AOF" } else { "RDB" });
    let saved = if aof { "AOF rewritten in" } else { "RDB saved in" };
    assert!(detail.contains(saved) && detail.contains("ends by itself after 10000ms"), "{detail}");
    assert!(q.freeze("b1").unwrap().contains("already paused"));

    // Writes wait: the INCR sent now has no answer yet, and nothing was acknowledged.
    std::thread::sleep(Duration::from_millis(500));
    let waiting = writer.waiting();
    assert!(waiting.is_some_and(|w| w >= Duration::from_millis(400)), "{waiting:?}");
    assert!(writer.acked() <= at_freeze + 1, "acked while paused: {}", writer.acked());

    let copy = dir.path().join("copy");
    copy_dir(&server.dir, &copy);

    q.thaw("b1").unwrap();
    q.thaw("b1").unwrap();
    let resumed = writer.wait_for(at_freeze + 100, Duration::from_secs(5));
    println!("writes went on {resumed:?} after the thaw");
    let errors = writer.stop();
    assert!(errors.is_empty(), "{errors:?}");

    drop(server);
    let restored = Server::start(&copy, aof);
    let value = restored.get("counter");
    (before, at_freeze, value)
}

#[test]
fn redis_rdb_copy_holds_every_write_acknowledged_before_the_save_began() {
    let (before, at_freeze, restored) = freeze_copy_thaw_restore(false, false);
    println!("RDB: acked {before} before the freeze, {at_freeze} at its end; restored {restored}");
    assert!(restored >= before, "lost writes acknowledged before the save: {restored} < {before}");
    assert!(restored <= at_freeze + 1, "{restored} > {at_freeze} + 1");
}

#[test]
fn redis_aof_copy_holds_every_write_acknowledged_before_the_pause() {
    let (before, at_freeze, restored) = freeze_copy_thaw_restore(true, false);
    println!("AOF: acked {before} before the freeze, {at_freeze} at its end; restored {restored}");
    assert!(restored >= at_freeze, "lost writes acknowledged before the pause");
    assert!(restored <= at_freeze + 1, "{restored} > {at_freeze} + 1");
}

#[test]
fn redis_rdb_saved_while_paused_holds_every_write_acknowledged_before_the_pause() {
    let (before, at_freeze, restored) = freeze_copy_thaw_restore(false, true);
    println!("RDB saved while paused: acked {before} before the freeze, {at_freeze} at its end; restored {restored}");
    assert!(restored >= at_freeze, "lost writes acknowledged before the pause");
    assert!(restored <= at_freeze + 1, "{restored} > {at_freeze} + 1");
}

#[test]
fn redis_pause_ends_by_itself_and_a_late_thaw_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("live"), false);
    let q = Redis::new(server.quiescer(&password_file(dir.path(), PASSWORD), 700));
    let writer = writer(server.connect());
    writer.wait_for(100, Duration::from_secs(10));
    // Timed from before the freeze: the pause cannot start earlier, while the freeze's return
    // can come late on a loaded machine, which would shorten the pause as measured from it.
    let paused = Instant::now();
    q.freeze("b1").unwrap();
    let at_freeze = writer.acked();
    // Never thawed: the server lets writes go by itself once pause_ms has passed.
    writer.wait_for(at_freeze + 2, Duration::from_secs(5));
    let waited = paused.elapsed();
    println!("writes resumed by themselves {waited:?} after the pause");
    assert!(waited >= Duration::from_millis(600), "{waited:?}");
    let err = format!("{:#}", q.thaw("b1").unwrap_err());
    assert!(err.contains("ended by itself after pause_ms 700 before this thaw"), "{err}");
    assert!(q.thaw("b1").is_ok(), "nothing left to thaw");
    assert!(writer.stop().is_empty());
}

/// A server restarted during the hold lost the pause with it: the thaw says so, even though
/// unpausing on a new connection works.
#[test]
fn redis_restarted_during_the_hold_fails_the_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("live"), false);
    let q = Redis::new(server.quiescer(&password_file(dir.path(), PASSWORD), 10_000));
    q.freeze("b1").unwrap();
    let port = server.port;
    drop(server);
    let _again = Server::start_on(&dir.path().join("live"), false, port);
    let err = format!("{:#}", q.thaw("b1").unwrap_err());
    assert!(err.contains("the server restarted during the hold"), "{err}");
    assert!(q.thaw("b1").is_ok(), "nothing left to thaw");
}

#[test]
fn redis_failed_save_fails_the_freeze_and_pauses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("live"), false);
    // The server's dir vanishes: its BGSAVE child cannot write the RDB.
    std::fs::remove_dir_all(&server.dir).unwrap();
    for save_while_paused in [false, true] {
        let config = server.quiescer(&password_file(dir.path(), PASSWORD), 10_000);
        let q = Redis::new(RedisConfig { save_while_paused, ..config });
        let err = format!("{:#}", q.freeze("b1").unwrap_err());
        println!("{err}");
        assert!(err.contains("BGSAVE failed (rdb_last_bgsave_status:err)"), "{err}");
        let tail = if save_while_paused { "writes unpaused" } else { "nothing is paused" };
        assert!(err.ends_with(tail), "{err}");
        // Writes are not paused.
        let started = Instant::now();
        redis::cmd("INCR").arg("counter").query::<u64>(&mut server.connect()).unwrap();
        // Paused, it would wait the 10 s pause; a loaded machine may take a moment anyway.
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        q.thaw("b1").unwrap();
    }
}

#[test]
fn redis_wrong_password_is_refused_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("live"), false);
    let wrong = "not-it-1618";
    let q = Redis::new(server.quiescer(&password_file(dir.path(), wrong), 10_000));
    let err = format!("{:#}", q.freeze("b1").unwrap_err());
    println!("{err}");
    assert!(err.contains("log in to 127.0.0.1:"), "{err}");
    assert!(err.contains("as stillpoint") && err.contains("check the user and its password"));
    assert!(!err.contains(wrong) && !err.contains(PASSWORD), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_through_the_agent_pauses_writes_from_prepare_to_commit() {
    use stillpoint_agent::config::{QuiescerConfig, SnapshotConfig};
    use stillpoint_proto::CommitRequest;

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("live"), false);
    let certs = crate::support::Certs::new("srv-r");
    let array = stillpoint_core::san::Array::init(&dir.path().join("array")).unwrap();
    array.create_lun("srv-r", "data", 1 << 20).unwrap();
    let quiescer =
        QuiescerConfig::Redis(server.quiescer(&password_file(dir.path(), PASSWORD), 20_000));
    let snapshot =
        SnapshotConfig::MockSan { array: array.root().to_path_buf(), snapshot_delay_ms: 0 };
    let agent = crate::support::Agent::start(crate::support::config(
        &certs,
        &["data"],
        vec![quiescer],
        snapshot,
    ))
    .await;
    let mut client = agent.client(&certs, "listener");
    let writer = writer(server.connect());
    writer.wait_for(100, Duration::from_secs(10));

    let p = client.prepare(prepare("b1", 30_000)).await.unwrap().into_inner();
    assert!(p.prepared, "{p:?}");
    let at_freeze = writer.acked();
    assert_eq!(p.steps[0].name, "cache");
    assert!(p.steps[0].detail.contains("writes paused (CLIENT PAUSE WRITE"), "{:?}", p.steps);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(writer.acked() <= at_freeze + 1, "writes went on while paused");

    let c = client
        .commit(CommitRequest {
            backup_id: "b1".into(),
            freeze_token: p.freeze_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.committed, "{c:?}");
    assert!(
        c.steps.iter().any(|s| s.name == "cache" && s.action == "thaw" && s.ok),
        "{:?}",
        c.steps
    );
    writer.wait_for(at_freeze + 100, Duration::from_secs(5));
    assert!(writer.stop().is_empty());
    agent.stop().await;
}
