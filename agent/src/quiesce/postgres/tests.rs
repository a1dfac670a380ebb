//! The postgres quiescer against real PostgreSQL 15 clusters the tests start: backups under
//! pgbench that restore, the failures a user meets, and the guardian's Hangup.

use std::path::Path;
use std::time::Duration;

use super::{Checkpoint, Mode, Postgres, PostgresConfig};
use crate::guardian::Action;
use crate::quiesce::{Hold, Quiescer};

mod cluster;
use cluster::{give_to_postgres, Cluster, Mounted, PASSWORD};

/// Skips (saying why) when the machine lacks PostgreSQL 15; on this project's machines it has it.
macro_rules! require_postgres {
    () => {
        if let Some(why) = cluster::missing() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

fn config(text: &str) -> PostgresConfig {
    toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
}

/// A quiescer over TCP as the `stillpoint` role, its password in a file.
fn over_tcp(cluster: &Cluster, dir: &Path, mode: &str) -> Postgres {
    let file = dir.join("pg-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).expect("password file");
    Postgres::new(config(&format!(
        "host = \"127.0.0.1\"\nport = {}\npassword_file = \"{}\"\nmode = \"{mode}\"\ntimeout_ms = 20000",
        cluster.port,
        file.display()
    )))
}

/// An archiving cluster (see `Cluster::archiving`) in a fresh temp dir.
fn archiving_cluster() -> (tempfile::TempDir, Cluster) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::archiving(dir.path());
    (dir, cluster)
}

fn problems(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    config(text).problems("quiescer[0]", &mut out);
    out
}

#[test]
fn defaults_are_a_fast_backup_over_the_local_socket() {
    let c = config("");
    assert_eq!(c.name, "postgres");
    assert_eq!(c.endpoint(), "socket /var/run/postgresql/.s.PGSQL.5432");
    assert_eq!((c.mode, c.checkpoint.unwrap_or_default()), (Mode::Backup, Checkpoint::Fast));
    assert!(c.wait_for_archive());
    assert_eq!(config("host = \"db1\"\nport = 6432").endpoint(), "db1:6432");
    assert_eq!(Postgres::new(c).hold(), Hold::StorageOnly, "backup mode holds no write");
    assert_eq!(Postgres::new(config("mode = \"atomic\"")).hold(), Hold::StorageOnly);
}

#[test]
fn config_problems_name_each_field() {
    let p = problems(
        "name = \"a b\"\nhost = \"/no/such/dir\"\npassword_file = \"rel\"\ntimeout_ms = 0",
    );
    for want in [
        "quiescer[0].name",
        "quiescer[0].host: /no/such/dir",
        "quiescer[0].password_file: rel",
        "quiescer[0].timeout_ms",
    ] {
        assert!(p.iter().any(|l| l.starts_with(want)), "{want} missing from {p:?}");
    }
    let p = problems("password_file = \"/x\"\npassword_env = \"PW\"");
    assert!(p[0].contains("give at most one of password_file, password_env"), "{p:?}");
    let p = problems("host = \"db\"\nmode = \"atomic\"\ncheckpoint = \"spread\"");
    assert!(p[0].starts_with("quiescer[0].checkpoint: applies to mode = \"backup\""), "{p:?}");
    assert!(problems("host = \"127.0.0.1\"").is_empty());
    assert!(toml::from_str::<PostgresConfig>("mode = \"exclusive\"").is_err());
    assert!(toml::from_str::<PostgresConfig>("password = \"x\"").is_err(), "no inline password");
}

/// Backup mode under pgbench: a reflink copy of the data directory made while held (not atomic:
/// backup mode is what makes it restorable), the label written in, recovery from the archive
/// to the backup's end point; then every row committed before the thaw is there and
/// pg_amcheck passes.
#[test]
fn a_copy_taken_in_backup_mode_restores_with_every_committed_row() {
    require_postgres!();
    let dir = tempfile::tempdir().expect("tempdir");
    give_to_postgres(dir.path());
    let fs = Mounted::new(
        &dir.path().join("xfs.img"),
        &dir.path().join("xfs"),
        600,
        &["mkfs.xfs", "-q", "-m", "reflink=1"],
    );
    let archive = dir.path().join("archive");
    std::fs::create_dir(&archive).expect("archive dir");
    give_to_postgres(&archive);
    let source = Cluster::init(
        &fs.mount.join("pg/data"),
        &dir.path().join("sock"),
        &format!("archive_mode = on\narchive_command = 'cp %p {}/%f'", archive.display()),
    );
    source.pgbench_init(5);
    let bench = source.pgbench(30);
    std::thread::sleep(Duration::from_millis(500));
    source.mark(1, 1000);
    let history: u64 = source.psql("SELECT count(*) FROM pgbench_history").parse().expect("count");
    assert!(history > 0, "pgbench is running");

    let pg = over_tcp(&source, dir.path(), "backup");
    let action = pg.thaw_action("b1").expect("an action").expect("backup mode arms one");
    assert!(matches!(action, Action::Hangup { .. }), "{action:?}");
    let detail = pg.freeze("b1").expect("freeze");
    eprintln!("freeze: {detail}");
    assert!(
        detail.contains("fast checkpoint and backup start")
            && detail.contains("backup mode started at LSN"),
        "{detail}"
    );
    assert_eq!(
        pg.freeze("b1").expect("again"),
        format!("backup mode already started at LSN {} for backup b1", lsn(&detail))
    );
    // A copy as slow as a real one can be, in the worst order: the data files first; then
    // commits and a checkpoint; then pg_control and pg_wal. Recovery without the backup label
    // would start at that later checkpoint and miss the commits in between.
    let copy = fs.mount.join("pg/copy");
    let (src, dst) = (source.data.display().to_string(), copy.display().to_string());
    cluster::run("cp", &["--reflink=always", "-a", &src, &dst]).expect("reflink copy");
    source.mark(1001, 1100);
    source.psql("CHECKPOINT");
    cluster::run("rm", &["-r", &format!("{dst}/pg_wal"), &format!("{dst}/global/pg_control")])
        .expect("rm");
    cluster::run("cp", &["--reflink=always", "-a", &format!("{src}/pg_wal"), &dst]).expect("cp");
    cluster::run("cp", &["-a", &format!("{src}/global/pg_control"), &format!("{dst}/global/")])
        .expect("cp");
    source.mark(1101, 1200);
    pg.thaw("b1").expect("thaw");
    let artifacts = pg.artifacts("b1");
    let names: Vec<&str> = artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["backup_label"], "no tablespaces, so no tablespace_map");
    let label = String::from_utf8_lossy(&artifacts[0].bytes).into_owned();
    assert!(
        label.contains("LABEL: stillpoint b1")
            && label.contains(&format!("START WAL LOCATION: {}", lsn(&detail))),
        "{label}"
    );
    assert_eq!(artifacts[0].quiescer, "postgres");
    assert!(pg.artifacts("b1").is_empty(), "handed over once");
    pg.thaw("b1").expect("a second thaw does nothing");
    drop(bench);

    let mut restored = Cluster::on_copy(&copy, &dir.path().join("sock2"));
    restored.put("backup_label", &artifacts[0].bytes);
    restored.put("recovery.signal", b"");
    restored.configure(&format!(
        "restore_command = 'cp {}/%f %p'\nrecovery_target = 'immediate'\nrecovery_target_action = 'promote'\n",
        archive.display()
    ));
    restored.start().expect("the copy recovers");
    restored
        .wait_for("SELECT pg_is_in_recovery()", "f", Duration::from_secs(60))
        .expect("promoted");
    let log = restored.log_text();
    assert!(log.contains("consistent recovery state reached"), "{log}");
    restored.check_restored(1200, history);
}

/// Atomic mode: CHECKPOINT, then a btrfs snapshot of the subvolume holding data and pg_wal (one
/// instant); the snapshot starts by crash recovery with every committed row.
#[test]
fn an_atomic_snapshot_of_data_and_wal_recovers_with_every_committed_row() {
    require_postgres!();
    let dir = tempfile::tempdir().expect("tempdir");
    give_to_postgres(dir.path());
    let fs = Mounted::new(
        &dir.path().join("btrfs.img"),
        &dir.path().join("btrfs"),
        600,
        &["mkfs.btrfs", "-q"],
    );
    let vol = fs.mount.join("vol");
    cluster::run("btrfs", &["-q", "subvolume", "create", &vol.display().to_string()])
        .expect("subvolume");
    let source = Cluster::init(&vol.join("data"), &dir.path().join("sock"), "");
    source.pgbench_init(5);
    let bench = source.pgbench(30);
    std::thread::sleep(Duration::from_millis(500));
    source.mark(1, 1000);
    let history: u64 = source.psql("SELECT count(*) FROM pgbench_history").parse().expect("count");

    // Over the socket as the stillpoint role: pg_checkpoint is all it needs.
    let pg = Postgres::new(config(&format!(
        "host = \"{}\"\nport = {}\nmode = \"atomic\"",
        source.socket_dir.display(),
        source.port
    )));
    assert_eq!(pg.thaw_action("a1").expect("no action"), None);
    let before = source.psql("SELECT pg_current_wal_lsn()");
    let detail = pg.freeze("a1").expect("freeze");
    let redo = format!("SELECT redo_lsn >= '{before}'::pg_lsn FROM pg_control_checkpoint()");
    assert_eq!(source.psql(&redo), "t", "the freeze checkpointed");
    eprintln!("freeze: {detail}");
    assert!(detail.starts_with("checkpoint ") && detail.contains("nothing held"), "{detail}");
    let snap = fs.mount.join("snap");
    cluster::run(
        "btrfs",
        &["-q", "subvolume", "snapshot", &vol.display().to_string(), &snap.display().to_string()],
    )
    .expect("snapshot");
    pg.thaw("a1").expect("thaw");
    assert!(pg.artifacts("a1").is_empty());
    drop(bench);

    let mut restored = Cluster::on_copy(&snap.join("data"), &dir.path().join("sock2"));
    restored.start().expect("the snapshot recovers");
    assert!(
        restored
            .log_text()
            .contains("database system was not properly shut down; automatic recovery in progress"),
        "{}",
        restored.log_text()
    );
    restored.check_restored(1000, history);

    // Backup mode on this server is refused: nothing archives the WAL its restore would need.
    let backup = over_tcp(&source, dir.path(), "backup");
    let err = backup.freeze("b2").map(|_| ()).expect_err("refused").to_string();
    assert!(err.contains("WAL archiving is off") && err.contains("mode = \"atomic\""), "{err}");
    source
        .wait_for(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'stillpoint'",
            "0",
            Duration::from_secs(10),
        )
        .expect("the refused freeze left no connection");
}

#[test]
fn a_wrong_password_says_so_without_showing_it() {
    require_postgres!();
    let (dir, source) = archiving_cluster();
    let file = dir.path().join("wrong");
    std::fs::write(&file, "not-the-Secret-42\n").expect("password file");
    let pg = Postgres::new(config(&format!(
        "host = \"127.0.0.1\"\nport = {}\npassword_file = \"{}\"",
        source.port,
        file.display()
    )));
    let err = format!("{:#}", pg.freeze("w1").map(|_| ()).expect_err("refused"));
    eprintln!("{err}");
    assert!(err.contains("password authentication failed for user \"stillpoint\""), "{err}");
    assert!(err.contains(&format!("check the password in {}", file.display())), "{err}");
    assert!(!err.contains("not-the-Secret-42") && !err.contains(PASSWORD), "{err}");

    // From the environment (a variable every process has, so no test changes the environment
    // while others read it): it is sent, it is wrong, and the message names the variable.
    let pg = Postgres::new(config(&format!(
        "host = \"127.0.0.1\"\nport = {}\npassword_env = \"PATH\"",
        source.port
    )));
    let err = format!("{:#}", pg.freeze("w2").map(|_| ()).expect_err("refused"));
    assert!(
        err.contains("password authentication failed")
            && err.ends_with("check the password in $PATH"),
        "{err}"
    );
    assert!(!err.contains(&std::env::var("PATH").unwrap_or_default()), "{err}");
    let pg =
        Postgres::new(config("host = \"127.0.0.1\"\npassword_env = \"STILLPOINT_TEST_PG_UNSET\""));
    let err = format!("{:#}", pg.freeze("w3").map(|_| ()).expect_err("no password"));
    assert_eq!(
        err,
        "password_env: the agent's environment has no variable STILLPOINT_TEST_PG_UNSET"
    );
}

#[test]
fn a_server_that_is_down_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = stillpoint_core::testing::spare_loopback_port();
    let pg = Postgres::new(config(&format!("host = \"127.0.0.1\"\nport = {port}")));
    let err = format!("{:#}", pg.freeze("d1").map(|_| ()).expect_err("down"));
    assert!(
        err.starts_with(&format!("connect to postgres at 127.0.0.1:{port}: "))
            && err.contains("refused")
            && err.ends_with("is PostgreSQL running and listening there?"),
        "{err}"
    );
    let pg = Postgres::new(config(&format!("host = \"{}\"\nport = {port}", dir.path().display())));
    let err = format!("{:#}", pg.thaw_action("d2").map(|_| ()).expect_err("down"));
    let socket = dir.path().join(format!(".s.PGSQL.{port}"));
    assert!(
        err.starts_with(&format!("connect to postgres at socket {}: ", socket.display())),
        "{err}"
    );
    pg.thaw("d2").expect("nothing to thaw");
}

/// The connection holding backup mode dies (an administrator's pg_terminate_backend): the
/// thaw fails saying the snapshot is not restorable, once; the next backup works.
#[test]
fn a_connection_killed_while_held_fails_the_thaw_clearly() {
    require_postgres!();
    let (dir, source) = archiving_cluster();
    let pg = over_tcp(&source, dir.path(), "backup");
    pg.thaw_action("k1").expect("armed");
    let detail = pg.freeze("k1").expect("freeze");
    let killed = source.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'stillpoint'");
    assert_eq!(killed, "1");
    let err = format!("{:#}", pg.thaw("k1").expect_err("the label is lost"));
    eprintln!("{err}");
    assert!(
        err.starts_with("backup k1: the connection holding backup mode was lost before the thaw"),
        "{err}"
    );
    assert!(
        err.contains(&format!("(started at LSN {})", lsn(&detail)))
            && err.contains("not restorable as a base backup"),
        "{err}"
    );
    assert!(pg.artifacts("k1").is_empty());
    pg.thaw("k1").expect("nothing is held any more");
    pg.freeze("k2").expect("the next backup starts backup mode again");
    pg.thaw("k2").expect("and ends it");
    assert_eq!(pg.artifacts("k2").len(), 1);
}

/// The guardian's Hangup (run here in-process, as the guardian runs it: pidfd_getfd of the
/// agent's socket, then shutdown) ends the session and so the backup mode on the server.
#[test]
fn the_guardians_hangup_ends_backup_mode_on_the_server() {
    require_postgres!();
    let (dir, source) = archiving_cluster();
    let pg = over_tcp(&source, dir.path(), "backup");
    let action = pg.thaw_action("h1").expect("an action").expect("armed");
    pg.freeze("h1").expect("freeze");
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'stillpoint'";
    assert_eq!(source.psql(sessions), "1");
    let done = action.execute().expect("hangup");
    assert!(done.starts_with("closed connection (socket"), "{done}");
    source.wait_for(sessions, "0", Duration::from_secs(10)).expect("the server ended the session");
    assert!(
        source
            .log_text()
            .contains("aborting backup due to backend exiting before pg_backup_stop was called"),
        "{}",
        source.log_text()
    );
    // The guardian's undo cost the backup its label, and the thaw step says so.
    let lost = format!("{:#}", pg.thawed_elsewhere("h1").unwrap_err());
    assert!(lost.contains("without a backup label"), "{lost}");
    pg.thawed_elsewhere("h1").expect("told once; nothing more to say");
    pg.thaw("h1").expect("nothing left to thaw");
    assert!(pg.artifacts("h1").is_empty());
    // A new backup mode starts, on a new connection.
    source.psql("SELECT pg_backup_start('after hangup', true); SELECT pg_backup_stop(false);");
    pg.freeze("h2").expect("freeze again");
    pg.thaw("h2").expect("thaw");
}

/// The LSN in a freeze detail ("... at LSN 0/5000028 (...").
fn lsn(detail: &str) -> &str {
    detail.split("at LSN ").nth(1).and_then(|s| s.split(' ').next()).unwrap_or_default()
}

/// A repeated freeze says "already started" only while the connection holding backup mode
/// lives; once the server ended it, the freeze fails and says backup mode went with it.
#[test]
fn a_repeated_freeze_after_the_connection_died_says_backup_mode_was_lost() {
    require_postgres!();
    let dir = tempfile::tempdir().expect("tempdir");
    give_to_postgres(dir.path());
    let source = Cluster::init(
        &dir.path().join("pg/data"),
        &dir.path().join("sock"),
        "archive_mode = on\narchive_command = '/bin/true'",
    );
    let pg = over_tcp(&source, dir.path(), "backup");
    pg.thaw_action("d1").expect("an action").expect("armed");
    pg.freeze("d1").expect("freeze");
    source.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'stillpoint'",
    );
    let err = format!("{:#}", pg.freeze("d1").expect_err("backup mode is gone"));
    assert!(err.contains("was lost") && err.contains("left backup mode"), "{err}");
    pg.thaw("d1").expect("nothing left to thaw");
    pg.thaw_action("d1").expect("an action").expect("armed again");
    pg.freeze("d1").expect("a new backup mode");
    pg.thaw("d1").expect("thaw");
    assert_eq!(pg.artifacts("d1").len(), 1);
}
