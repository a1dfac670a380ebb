//! `backupctl drill` as the real binary, as root, on real things: an XFS image holding a
//! PostgreSQL 15 data directory with rows (stopped by a crash) and an SQLite database, copied
//! with `repo backup` and sealed with a backup manifest of group `g1`; then drilled with fsck,
//! mount, postgres and sqlite checks. It passes; a query with no rows and a flipped byte in a
//! pack each fail it with exit 1 naming what failed; nothing stays mounted or attached.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use stillpoint_saveset::{BackupManifest, Manifest, ManifestId, Repository, Secret};

#[allow(dead_code)]
#[path = "../../agent/src/quiesce/postgres/tests/cluster.rs"]
mod pg;

use stillpoint_notify::testing::Receiver;

const BIN: &str = env!("CARGO_BIN_EXE_backupctl");
const PASSPHRASE: &str = "drill passphrase";

fn backupctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("STILLPOINT_REPO", dir.join("repo"))
        .env("STILLPOINT_REPO_PASSPHRASE_FILE", dir.join("pass"))
        .env_remove("STILLPOINT_REPO_KEY_FILE")
        .output()
        .unwrap()
}

/// A `[notify]` file sending to `receiver`, failures only (as a clinic would set a weekly drill).
fn notify_file(dir: &Path, receiver: &Receiver) -> String {
    let config = receiver.config(stillpoint_notify::On::Failure);
    let (email, hook) = (&config.email[0], &config.webhook[0]);
    let path =
        |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let text = format!(
        "[notify]\non = \"failure\"\ntries = 3\nbackoff = \"100ms\"\n\
         [[notify.email]]\nserver = \"127.0.0.1\"\nport = {}\ntls = \"starttls\"\nuser = \"{}\"\n\
         password_file = \"{}\"\nca_file = \"{}\"\nfrom = \"{}\"\nto = [\"{}\"]\n\
         [[notify.webhook]]\nurl = \"{}\"\nbearer_token_file = \"{}\"\nca_file = \"{}\"\n",
        email.port.unwrap_or(0),
        email.user.clone().unwrap_or_default(),
        path(&email.password_file),
        path(&email.ca_file),
        email.from,
        email.to[0],
        hook.url,
        path(&hook.bearer_token_file),
        path(&hook.ca_file),
    );
    let file = dir.join("notify.toml");
    fs::write(&file, text).unwrap();
    file.display().to_string()
}

fn said(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Neither a mount nor a loop device refers to anything under `dir` any more.
fn nothing_left_under(dir: &Path) {
    let dir = dir.display().to_string();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&dir), "still mounted under {dir}:\n{mounts}");
    let loops = pg::run("losetup", &["-a"]).unwrap();
    assert!(!loops.contains(&dir), "loop devices still attached under {dir}:\n{loops}");
}

/// The image: XFS with `pg/data` (table `marks`, ids 1..=100, server killed, not stopped) and
/// `app/app.db` (SQLite, 3 rows).
fn make_image(dir: &Path, image: &Path) {
    let mount = dir.join("mnt");
    let mounted = pg::Mounted::new(image, &mount, 300, &["mkfs.xfs", "-q"]);
    let cluster = pg::Cluster::init(&mount.join("pg/data"), &dir.join("sock"), "");
    cluster.psql("CREATE TABLE marks (id int PRIMARY KEY)");
    cluster.mark(1, 100);
    // Dropping the cluster stops it with `-m immediate`: the drill's server starts by crash
    // recovery.
    drop(cluster);
    fs::create_dir(mount.join("app")).unwrap();
    let db = mount.join("app/app.db").display().to_string();
    pg::run(
        "sqlite3",
        &[&db, "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1),(2),(3);"],
    )
    .unwrap();
    drop(mounted);
}

fn drill_config(dir: &Path, name: &str, query: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(
        &path,
        format!(
            r#"
timeout_s = 120
[[server]]
name = "db1"
[[server.check]]
kind = "fsck"
[[server.check]]
kind = "mount"
[[server.check]]
kind = "postgres"
data_dir = "pg/data"
query = "{query}"
[[server.check]]
kind = "sqlite"
path = "app/app.db"
"#
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_drill_restores_starts_and_checks_and_fails_on_a_bad_query_or_damage() {
    if let Some(why) = pg::missing() {
        panic!("this test needs PostgreSQL 15: {why}");
    }
    assert!(stillpoint_core::sys::is_root(), "the drill test loop-mounts: run it as root");
    let temp = tempfile::tempdir().unwrap();
    let d = temp.path();
    // The postgres user must reach the sockets and data directories below.
    pg::give_to_postgres(d);
    fs::write(d.join("pass"), PASSPHRASE).unwrap();
    let image = d.join("db1-data.img");
    make_image(d, &image);

    let out = backupctl(d, &["repo", "init"]);
    assert!(out.status.success(), "{}", said(&out));
    let image_s = image.display().to_string();
    let args = ["repo", "backup", "--backup", "b-1", "--server", "db1", "--volume", "data"];
    let out = backupctl(d, &[&args[..], &["--json", &image_s]].concat());
    assert!(out.status.success(), "{}", said(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let volume: ManifestId = v["manifest"].as_str().unwrap().parse().unwrap();
    // The seal the listener writes, with its cut naming the group.
    let repo = Repository::open(&d.join("repo"), &Secret::passphrase(PASSPHRASE)).unwrap();
    repo.write_manifest(&Manifest::Backup(BackupManifest {
        backup: "b-1".into(),
        volumes: vec![volume],
        cut: serde_json::json!({"backup": "b-1", "group": "g1", "servers": []}),
        created_unix_ms: 1,
        artifacts: Vec::new(),
    }))
    .unwrap();
    drop(repo);
    let scratch = d.join("scratch");
    fs::create_dir(&scratch).unwrap();
    let scratch_s = scratch.display().to_string();

    // The drill passes: every check, in order, and the rows are there.
    let good = drill_config(d, "good.toml", "SELECT id FROM marks WHERE id = 100");
    let good_s = good.display().to_string();
    let run = ["drill", "--latest", "--group", "g1", "--scratch", &scratch_s, "--config"];
    let out = backupctl(d, &[&run[..], &[&good_s, "--json"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["backup"], "b-1");
    assert_eq!(report["group"], "g1");
    assert_eq!(report["passed"], true);
    let server = &report["servers"][0];
    assert_eq!(server["server"], "db1");
    assert!(server["volumes"][0]["error"].is_null(), "{server}");
    let checks: Vec<(&str, &str)> = server["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["check"].as_str().unwrap(), c["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        checks,
        [("fsck", "passed"), ("mount", "passed"), ("postgres", "passed"), ("sqlite", "passed")],
        "{server}"
    );
    let detail = server["checks"][2]["detail"].as_str().unwrap();
    assert!(
        detail.contains("crash recovery") && detail.contains("pg_amcheck --all ok"),
        "{detail}"
    );
    assert!(detail.contains("query returned 1 row(s)"), "{detail}");
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 0, "the scratch directory was removed");
    nothing_left_under(&scratch);

    // A query that finds nothing fails the drill (exit 1), naming the check; human report.
    // Also: a command sees the mounted image, and one that outlives its timeout is killed.
    let bad = drill_config(d, "bad.toml", "SELECT id FROM marks WHERE id = 1000");
    let mut text = fs::read_to_string(&bad).unwrap();
    text.push_str(
        r#"
[[server.check]]
kind = "command"
command = ["sh", "-c", "test -f \"$STILLPOINT_DRILL_ROOT/pg/data/PG_VERSION\" && test \"$STILLPOINT_SERVER\" = db1"]
[[server.check]]
kind = "command"
command = ["sleep", "60"]
timeout_s = 1
[[server]]
name = "db9"
"#,
    );
    fs::write(&bad, text).unwrap();
    let bad_s = bad.display().to_string();
    // The failure is mailed and posted to a real SMTP server and HTTPS receiver on loopback.
    let receiver = Receiver::start(&d.join("receiver"), 0);
    let notify = notify_file(d, &receiver);
    let run_bad =
        ["drill", "b-1", "--scratch", &scratch_s, "--config", &bad_s, "--notify", &notify];
    let out = backupctl(d, &run_bad);
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let waiter = tokio::runtime::Runtime::new().unwrap();
    let mail = waiter.block_on(receiver.mail(|m| m.subject.contains("DRILL FAILED")));
    assert!(
        mail.subject.starts_with("[stillpoint] DRILL FAILED for group g1: db1: postgres"),
        "{mail:?}"
    );
    assert!(mail.body.contains("query returned no rows"), "{}", mail.body);
    let hook = waiter.block_on(receiver.hook(|h| h.json()["kind"] == "drill_failed")).json();
    assert_eq!((hook["group"].as_str(), hook["backup_id"].as_str()), (Some("g1"), Some("b-1")));
    assert_eq!(hook["passed"], false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(stdout.starts_with("drill of backup b-1 (group g1)"), "{}", said(&out));
    let line = stdout.lines().find(|l| l.trim_start().starts_with("postgres")).unwrap();
    assert!(line.contains("FAILED") && line.contains("query returned no rows"), "{line}");
    let lines: Vec<&str> =
        stdout.lines().filter(|l| l.trim_start().starts_with("command")).collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].contains(" ok ") && lines[0].contains("sh exited 0"), "{lines:?}");
    assert!(lines[1].contains("FAILED") && lines[1].contains("sleep: timed out"), "{lines:?}");
    assert!(
        stderr_has(
            &out,
            "drill of backup b-1 failed: db1: postgres check, command check; db9: restore of *"
        ),
        "{}",
        said(&out)
    );
    assert!(stdout.contains("the backup has no volume of server db9 (it has db1)"), "{stdout}");
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 0, "removed after a failure too");
    nothing_left_under(&scratch);

    // A flipped byte in a pack: the restore fails, the checks are skipped, exit 1; --keep
    // leaves the scratch directory, still with nothing mounted.
    let pack = walk(&d.join("repo/packs")).pop().expect("a pack was written");
    let mut bytes = fs::read(&pack).unwrap();
    bytes[100] ^= 0x40;
    fs::write(&pack, bytes).unwrap();
    let out = backupctl(d, &[&run[..], &[&good_s, "--json", "--keep"]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], false);
    let server = &report["servers"][0];
    let error = server["volumes"][0]["error"].as_str().unwrap_or_else(|| panic!("{server}"));
    assert!(error.contains("damaged"), "{error}");
    assert!(server["checks"].as_array().unwrap().iter().all(|c| c["outcome"] == "skipped"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("db1: restore of data"), "{stderr}");
    assert_eq!(report["scratch_kept"], true);
    assert!(Path::new(report["scratch"].as_str().unwrap()).is_dir());
    nothing_left_under(&scratch);
}

/// A snapshot taken in PostgreSQL's backup mode (fsfreeze around the copy), its `backup_label`
/// sealed into the backup manifest as the quiescer's artifact: with `wal_archive` the drill
/// recovers from the label to the backup's end, so rows committed after the snapshot but
/// before `pg_backup_stop` are there; without it, crash recovery ends at the snapshot and the
/// same query fails, the report saying the label was not used.
#[test]
fn a_postgres_drill_recovers_from_the_backup_label_and_the_archive() {
    use std::io::{Read as _, Write as _};
    if let Some(why) = pg::missing() {
        panic!("this test needs PostgreSQL 15: {why}");
    }
    let temp = tempfile::tempdir().unwrap();
    let d = temp.path();
    pg::give_to_postgres(d);
    fs::write(d.join("pass"), PASSPHRASE).unwrap();
    let archive = d.join("archive");
    fs::create_dir(&archive).unwrap();
    pg::give_to_postgres(&archive);
    let (image, copy) = (d.join("live.img"), d.join("db1-data.img"));
    let mount = d.join("mnt");
    let mounted = pg::Mounted::new(&image, &mount, 300, &["mkfs.xfs", "-q"]);
    let extra = format!("archive_mode = on\narchive_command = 'cp %p {}/%f'", archive.display());
    let cluster = pg::Cluster::init(&mount.join("pg/data"), &d.join("sock"), &extra);
    cluster.psql("CREATE TABLE marks (id int PRIMARY KEY)");
    cluster.mark(1, 100);
    // Backup mode on one session, as the quiescer holds it.
    let mut session = Command::new(format!("{}/psql", pg::BIN))
        .args(["-h", &cluster.socket_dir.display().to_string(), "-p", &cluster.port.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = session.stdin.take().unwrap();
    input.write_all(b"SELECT pg_backup_start('drill', true);\n").unwrap();
    input.flush().unwrap();
    cluster
        .wait_for(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_backup_start%' \
             AND state = 'idle' AND pid <> pg_backend_pid()",
            "1",
            std::time::Duration::from_secs(60),
        )
        .unwrap();
    let mount_s = mount.display().to_string();
    pg::run("fsfreeze", &["-f", &mount_s]).unwrap();
    let copied = pg::run(
        "cp",
        &["--sparse=always", &image.display().to_string(), &copy.display().to_string()],
    );
    pg::run("fsfreeze", &["-u", &mount_s]).unwrap();
    copied.unwrap();
    // Committed after the snapshot, before the backup's end: only the label's recovery has it.
    cluster.mark(101, 300);
    input.write_all(b"SELECT labelfile FROM pg_backup_stop(true);\n").unwrap();
    drop(input);
    let mut stopped = String::new();
    session.stdout.take().unwrap().read_to_string(&mut stopped).unwrap();
    assert!(session.wait().unwrap().success(), "{stopped}");
    let start =
        stopped.find("START WAL LOCATION").unwrap_or_else(|| panic!("no label in {stopped:?}"));
    let label = format!("{}\n", stopped[start..].trim_end());
    drop(cluster);
    drop(mounted);

    assert!(backupctl(d, &["repo", "init"]).status.success());
    let args = ["repo", "backup", "--backup", "b-3", "--server", "db1", "--volume", "data"];
    let out = backupctl(d, &[&args[..], &["--json", &copy.display().to_string()]].concat());
    assert!(out.status.success(), "{}", said(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let repo = Repository::open(&d.join("repo"), &Secret::passphrase(PASSPHRASE)).unwrap();
    repo.write_manifest(&Manifest::Backup(BackupManifest {
        backup: "b-3".into(),
        volumes: vec![v["manifest"].as_str().unwrap().parse().unwrap()],
        cut: serde_json::json!({"backup": "b-3", "group": "g3", "servers": []}),
        created_unix_ms: 1,
        artifacts: vec![stillpoint_saveset::BackupArtifact {
            server: "db1".into(),
            quiescer: "pg".into(),
            name: "backup_label".into(),
            bytes: label.into_bytes(),
        }],
    }))
    .unwrap();
    drop(repo);
    let scratch = d.join("scratch");
    fs::create_dir(&scratch).unwrap();
    let scratch_s = scratch.display().to_string();
    let config = |name: &str, archive_line: &str| {
        let path = d.join(name);
        let text = format!(
            "[[server]]\nname = \"db1\"\n[[server.check]]\nkind = \"postgres\"\n\
             data_dir = \"pg/data\"\nquery = \"SELECT id FROM marks WHERE id = 300\"\n\
             timeout_s = 120\n{archive_line}\n"
        );
        fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let run = ["drill", "b-3", "--scratch", &scratch_s, "--config"];

    let with = config("label.toml", &format!("wal_archive = \"{}\"", archive.display()));
    let out = backupctl(d, &[&run[..], &[&with]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(stdout.contains("recovery from pg's backup_label and the WAL archive"), "{stdout}");
    nothing_left_under(&scratch);

    let without = config("crash.toml", "");
    let out = backupctl(d, &[&run[..], &[&without]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(stdout.contains("query returned no rows"), "{stdout}");
    assert!(
        stdout.contains("the backup_label artifact was not used: no wal_archive set"),
        "{stdout}"
    );
    nothing_left_under(&scratch);
}

/// A MariaDB data directory on XFS (table `app.t`, 3 rows; the server killed, not stopped),
/// backed up by `repo backup` and drilled by id with `--incomplete`: mariadb-check passes every
/// table and the query finds its row; a query that finds none fails the drill.
#[test]
fn a_mariadb_drill_checks_every_table() {
    assert!(stillpoint_core::sys::is_root(), "the drill test loop-mounts: run it as root");
    let temp = tempfile::tempdir().unwrap();
    let d = temp.path();
    fs::write(d.join("pass"), PASSPHRASE).unwrap();
    let image = d.join("db2-data.img");
    let mount = d.join("mnt");
    let mounted = pg::Mounted::new(&image, &mount, 300, &["mkfs.xfs", "-q"]);
    let data = mount.join("mariadb");
    let run_dir = d.join("run");
    fs::create_dir_all(&run_dir).unwrap();
    pg::run(
        "mariadb-install-db",
        &[
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            "--user=root",
            "--skip-test-db",
            &format!("--tmpdir={}", run_dir.display()),
        ],
    )
    .unwrap();
    let socket = run_dir.join("mysqld.sock");
    let mut server = Command::new("mariadbd")
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg("--user=root")
        .arg(format!("--socket={}", socket.display()))
        .arg("--skip-networking")
        .arg(format!("--log-error={}", run_dir.join("error.log").display()))
        .arg(format!("--tmpdir={}", run_dir.display()))
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sql = |q: &str| {
        pg::run(
            "mariadb",
            &["--no-defaults", "-uroot", &format!("--socket={}", socket.display()), "-e", q],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sql("SELECT 1").is_err() {
        assert!(std::time::Instant::now() < deadline, "mariadbd did not answer within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    sql("CREATE DATABASE app; CREATE TABLE app.t (id INT PRIMARY KEY) ENGINE=InnoDB; \
         INSERT INTO app.t VALUES (1),(2),(3);")
    .unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    drop(mounted);

    assert!(backupctl(d, &["repo", "init"]).status.success());
    let image_s = image.display().to_string();
    let args = ["repo", "backup", "--backup", "b-2", "--server", "db2", "--volume", "data"];
    let out = backupctl(d, &[&args[..], &[&image_s]].concat());
    assert!(out.status.success(), "{}", said(&out));
    let scratch = d.join("scratch");
    fs::create_dir(&scratch).unwrap();
    let scratch_s = scratch.display().to_string();
    let config = |name: &str, query: &str| {
        let path = d.join(name);
        let text = format!(
            "[[server]]\nname = \"db2\"\n[[server.check]]\nkind = \"mysql\"\n\
             data_dir = \"mariadb\"\nquery = \"{query}\"\ntimeout_s = 120\n"
        );
        fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let run = ["drill", "b-2", "--incomplete", "--scratch", &scratch_s, "--config"];

    let good = config("good.toml", "SELECT id FROM app.t WHERE id = 3");
    let out = backupctl(d, &[&run[..], &[&good]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(stdout.starts_with("drill of INCOMPLETE backup b-2"), "{stdout}");
    let line = stdout.lines().find(|l| l.trim_start().starts_with("mysql")).unwrap();
    assert!(line.contains(" ok ") && line.contains("query returned 1 row(s)"), "{line}");
    assert!(!line.contains(" 0 table(s)"), "mariadb-check checked the tables: {line}");
    nothing_left_under(&scratch);

    let bad = config("bad.toml", "SELECT id FROM app.t WHERE id = 4");
    let out = backupctl(d, &[&run[..], &[&bad]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", said(&out));
    assert!(stderr_has(&out, "db2: mysql check"), "{}", said(&out));
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 0, "scratch removed");
    nothing_left_under(&scratch);
}

fn stderr_has(out: &Output, text: &str) -> bool {
    String::from_utf8_lossy(&out.stderr).contains(text)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}
