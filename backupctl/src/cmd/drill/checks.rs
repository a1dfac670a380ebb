//! Runs one check on one restored image. Every mount, loop device and database server is a
//! drop guard held on the check's stack, so it goes on every way out: pass, failure, timeout.
//! Databases run private to the drill: a socket in scratch, no TCP, their own client auth.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stillpoint_saveset::BackupArtifact;

use super::config::{CheckKind, CommandCheck, MysqlCheck, PostgresCheck, SqliteCheck};
use super::exec::{find, Failed, Run};
use super::fs::{detect_image, fsck_command, Mounted};

/// What one check works on.
pub struct Target<'a> {
    pub backup: &'a str,
    pub server: &'a str,
    pub volume: &'a str,
    pub image: &'a Path,
    /// A directory of the server's own in scratch, for mount points, sockets and logs.
    pub work: &'a Path,
    /// The server's artifacts from the backup manifest, and where they were written.
    pub artifacts: &'a [BackupArtifact],
    pub artifacts_dir: Option<&'a Path>,
    /// Where this check's tools write their output.
    pub log: &'a Path,
    pub deadline: Instant,
}

/// Runs the check; on success one line saying what passed.
pub fn run(kind: &CheckKind, t: &Target<'_>) -> Result<String, Failed> {
    match kind {
        CheckKind::Fsck => fsck(t),
        CheckKind::Mount => mount(t),
        CheckKind::Postgres(pg) => postgres(pg, t),
        CheckKind::Mysql(my) => mysql(my, t),
        CheckKind::Sqlite(sq) => sqlite(sq, t),
        CheckKind::Command(c) => command(c, t),
    }
}

fn fsck(t: &Target<'_>) -> Result<String, Failed> {
    let fs = detect_image(t.image)?;
    let (program, args) = fsck_command(fs, t.image);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Run::new(program, &args, t.log).check(t.deadline)?;
    Ok(format!("{}: {program} found no problems", fs.name()))
}

fn mount(t: &Target<'_>) -> Result<String, Failed> {
    let mounted = Mounted::new(t.image, &t.work.join("mount"), true, t.log, t.deadline)?;
    let entries = std::fs::read_dir(&mounted.root)
        .map_err(|e| Failed::new(format!("list {}: {e}", mounted.root.display())))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let shown = names.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    let more = if names.len() > 8 { ", ..." } else { "" };
    Ok(format!("mounted read-only, {} entries at its root: {shown}{more}", names.len()))
}

fn sqlite(sq: &SqliteCheck, t: &Target<'_>) -> Result<String, Failed> {
    find("sqlite3")?;
    // Read-write: a database in WAL mode needs its -shm beside it; the image is scratch.
    let mounted = Mounted::new(t.image, &t.work.join("sqlite"), false, t.log, t.deadline)?;
    let file = mounted.root.join(&sq.path);
    if !file.is_file() {
        return Err(Failed::new(format!("no file {} in the image", sq.path.display())));
    }
    let file = file.display().to_string();
    let said =
        Run::new("sqlite3", &[&file, "PRAGMA integrity_check;"], t.log).stdout(t.deadline)?;
    if said.trim() == "ok" {
        Ok(format!("{}: integrity_check ok", sq.path.display()))
    } else {
        Err(Failed::with_output(
            format!("{}: integrity_check found damage", sq.path.display()),
            &said,
        ))
    }
}

fn command(c: &CommandCheck, t: &Target<'_>) -> Result<String, Failed> {
    let mounted = match c.mount {
        true => Some(Mounted::new(t.image, &t.work.join("root"), false, t.log, t.deadline)?),
        false => None,
    };
    let args: Vec<&str> = c.command[1..].iter().map(String::as_str).collect();
    let mut run = Run::new(&c.command[0], &args, t.log);
    let mut env = vec![
        ("STILLPOINT_BACKUP_ID", t.backup.to_string()),
        ("STILLPOINT_SERVER", t.server.to_string()),
        ("STILLPOINT_VOLUME", t.volume.to_string()),
        ("STILLPOINT_DRILL_IMAGE", t.image.display().to_string()),
        ("STILLPOINT_DRILL_SCRATCH", t.work.display().to_string()),
    ];
    if let Some(m) = &mounted {
        env.push(("STILLPOINT_DRILL_ROOT", m.root.display().to_string()));
    }
    if let Some(dir) = t.artifacts_dir {
        env.push(("STILLPOINT_DRILL_ARTIFACTS", dir.display().to_string()));
    }
    run.env = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let ran = run.run(t.deadline)?;
    let name = Path::new(&c.command[0]).file_name().and_then(|n| n.to_str()).unwrap_or("command");
    if ran.ok {
        Ok(format!("{name} exited 0"))
    } else {
        Err(Failed::with_output(format!("{name}: {}", ran.status), &ran.output))
    }
}

/// Hands `path` (recursively) to `user`, so a server started as that user owns its restored
/// data wherever the uid differed on the backed-up host.
fn give_to(user: &str, path: &Path, t: &Target<'_>) -> Result<(), Failed> {
    let path = path.display().to_string();
    Run::new("chown", &["-R", &format!("{user}:"), &path], t.log).check(t.deadline).map(drop)
}

/// A directory in scratch only `user` uses (sockets, the server's log).
fn private_dir(path: &Path, user: &str, t: &Target<'_>) -> Result<PathBuf, Failed> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| Failed::new(format!("create {}: {e}", path.display())))?;
    give_to(user, path, t)?;
    Ok(path.into())
}

fn secs_left(deadline: Instant) -> u64 {
    deadline.saturating_duration_since(Instant::now()).as_secs().max(1)
}

/// A private PostgreSQL, stopped (immediate: the data is scratch) on drop.
struct PgServer {
    pg_ctl: String,
    data: String,
    user: String,
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let stopped = Command::new("runuser")
            .args(["-u", &self.user, "--", &self.pg_ctl, "-D", &self.data])
            .args(["-m", "immediate", "-w", "-t", "60", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !stopped.is_ok_and(|s| s.success()) {
            crate::cmd::note(&format!(
                "backupctl: drill: pg_ctl stop -D {} failed; the private server may still run",
                self.data
            ));
        }
    }
}

fn postgres(pg: &PostgresCheck, t: &Target<'_>) -> Result<String, Failed> {
    let bin = |tool: &str| pg.bin_dir.join(tool).display().to_string();
    for tool in ["postgres", "pg_ctl", "psql", "pg_amcheck"] {
        find(&bin(tool))?;
    }
    let mounted = Mounted::new(t.image, &t.work.join("pg"), false, t.log, t.deadline)?;
    let data = mounted.root.join(&pg.data_dir);
    if !data.join("PG_VERSION").is_file() {
        return Err(Failed::new(format!(
            "no PostgreSQL data directory at {} in the image (no PG_VERSION)",
            pg.data_dir.display()
        )));
    }
    let sock = private_dir(&t.work.join("pg-run"), &pg.os_user, t)?;
    let server_log = sock.join("server.log");
    // The snapshot of a running server holds its pid file; its pid means nothing here.
    let _ = std::fs::remove_file(data.join("postmaster.pid"));
    // Debian keeps the configuration in /etc: start from defaults then.
    if !data.join("postgresql.conf").exists() {
        std::fs::write(data.join("postgresql.conf"), "")
            .map_err(|e| Failed::new(format!("write postgresql.conf: {e}")))?;
    }
    // Only the drill reaches the server (a socket in a directory private to its user), so it
    // trusts that socket whatever the restored pg_hba.conf demands.
    let hba = sock.join("drill_hba.conf");
    std::fs::write(&hba, "local all all trust\n")
        .map_err(|e| Failed::new(format!("write {}: {e}", hba.display())))?;
    let label = t.artifacts.iter().find(|a| a.name == "backup_label");
    let mut options = vec![
        "-c listen_addresses=''".to_string(),
        format!("-c unix_socket_directories='{}'", sock.display()),
        "-c port=5432".into(),
        format!("-c hba_file='{}'", hba.display()),
        // Never archive into the production archive from a drill.
        "-c archive_mode=off".into(),
    ];
    let recovery = match (label, &pg.wal_archive) {
        (Some(label), Some(archive)) => {
            for a in t
                .artifacts
                .iter()
                .filter(|a| a.name == "backup_label" || a.name == "tablespace_map")
            {
                std::fs::write(data.join(&a.name), &a.bytes).map_err(|e| {
                    Failed::new(format!("write {} into the data directory: {e}", a.name))
                })?;
            }
            std::fs::write(data.join("recovery.signal"), "")
                .map_err(|e| Failed::new(format!("write recovery.signal: {e}")))?;
            options.push(format!("-c restore_command='cp {}/%f %p'", archive.display()));
            options.push("-c recovery_target=immediate".into());
            options.push("-c recovery_target_action=promote".into());
            format!("recovery from {}'s backup_label and the WAL archive", label.quiescer)
        }
        (Some(_), None) => {
            "crash recovery (the backup_label artifact was not used: no wal_archive set)".into()
        }
        (None, _) => "crash recovery".into(),
    };
    give_to(&pg.os_user, &data, t)?;
    let (pg_ctl, data_s) = (bin("pg_ctl"), data.display().to_string());
    let started = Instant::now();
    let (log_s, options, wait) =
        (server_log.display().to_string(), options.join(" "), secs_left(t.deadline).to_string());
    let start = Run::new(
        &pg_ctl,
        &["-D", &data_s, "-l", &log_s, "-o", &options, "-w", "-t", &wait, "start"],
        t.log,
    )
    .as_user(&pg.os_user);
    let server =
        PgServer { pg_ctl: pg_ctl.clone(), data: data_s.clone(), user: pg.os_user.clone() };
    if let Err(mut e) = start.check(t.deadline) {
        let log = std::fs::read_to_string(&server_log).unwrap_or_default();
        e.detail = format!("PostgreSQL did not start ({recovery}): {}", e.detail);
        e.output = super::report::tail(&log, super::report::TAIL_LINES);
        return Err(e);
    }
    let (psql_bin, sock_s) = (bin("psql"), sock.display().to_string());
    let psql = |sql: &str| {
        let args = ["-h", &sock_s, "-p", "5432", "-U", &pg.role, "-d", &pg.database];
        let quiet = ["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql];
        Run::new(&psql_bin, &[&args[..], &quiet[..]].concat(), t.log)
            .as_user(&pg.os_user)
            .stdout(t.deadline)
            .map(|s| s.trim().to_string())
    };
    // Recovery to the label's end ends in a promotion; wait for it.
    while psql("SELECT pg_is_in_recovery()")? != "f" {
        if Instant::now() >= t.deadline {
            let log = std::fs::read_to_string(&server_log).unwrap_or_default();
            return Err(Failed::with_output("PostgreSQL still in recovery at the timeout", &log));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready = started.elapsed();
    let amcheck = bin("pg_amcheck");
    let check = Run::new(
        &amcheck,
        &["-h", &sock_s, "-p", "5432", "-U", &pg.role, "--all", "--install-missing"],
        t.log,
    )
    .as_user(&pg.os_user);
    // A failure from here on says how the server came up: a missing row after crash recovery
    // may be the unused label's, not the backup's.
    let context = |mut f: Failed| {
        f.detail = format!("{} (PostgreSQL up by {recovery})", f.detail);
        f
    };
    check.check(t.deadline).map_err(context)?;
    let mut detail = format!(
        "PostgreSQL up by {recovery} in {}; pg_amcheck --all ok",
        super::report::ms(u64::try_from(ready.as_millis()).unwrap_or(u64::MAX))
    );
    if let Some(query) = &pg.query {
        let rows = psql(query).map_err(context)?;
        if rows.is_empty() {
            return Err(context(Failed::new(format!("query returned no rows: {query}"))));
        }
        detail.push_str(&format!("; query returned {} row(s)", rows.lines().count()));
    }
    drop(server);
    Ok(detail)
}

/// A private MariaDB, asked to stop (SIGTERM) on drop, killed if it has not within 60 s.
struct MariaServer(Child);

impl Drop for MariaServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mysql(my: &MysqlCheck, t: &Target<'_>) -> Result<String, Failed> {
    let mariadbd = find("mariadbd")?;
    find("mariadb-check")?;
    find("mariadb")?;
    let mounted = Mounted::new(t.image, &t.work.join("mysql"), false, t.log, t.deadline)?;
    let data = mounted.root.join(&my.data_dir);
    if !data.join("mysql").is_dir() {
        return Err(Failed::new(format!(
            "no MariaDB data directory at {} in the image (no mysql/ schema)",
            my.data_dir.display()
        )));
    }
    let run_dir = private_dir(&t.work.join("mysql-run"), &my.os_user, t)?;
    give_to(&my.os_user, &data, t)?;
    let socket = run_dir.join("mysqld.sock");
    let server_log = run_dir.join("server.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(t.log)
        .map_err(|e| Failed::new(format!("open {}: {e}", t.log.display())))?;
    let started = Instant::now();
    // No network, a socket in scratch and no grant tables: only the drill reaches it.
    let child = Command::new(&mariadbd)
        .arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--user={}", my.os_user))
        .arg(format!("--socket={}", socket.display()))
        .arg("--skip-networking")
        .arg("--skip-grant-tables")
        .arg(format!("--pid-file={}", run_dir.join("mysqld.pid").display()))
        .arg(format!("--log-error={}", server_log.display()))
        .arg(format!("--tmpdir={}", run_dir.display()))
        .arg("--innodb-buffer-pool-size=64M")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| Failed::new(format!("log: {e}")))?)
        .stderr(log)
        .spawn()
        .map_err(|e| Failed::new(format!("mariadbd: {e}")))?;
    let mut server = MariaServer(child);
    let sock = format!("--socket={}", socket.display());
    let client = |sql: &str| {
        Run::new("mariadb", &["--no-defaults", &sock, "-N", "-B", "-e", sql], t.log)
            .stdout(t.deadline)
    };
    loop {
        if let Ok(Some(status)) = server.0.try_wait() {
            let said = std::fs::read_to_string(&server_log).unwrap_or_default();
            return Err(Failed::with_output(format!("mariadbd exited at start: {status}"), &said));
        }
        if socket.exists() && client("SELECT 1").is_ok() {
            break;
        }
        if Instant::now() >= t.deadline {
            let said = std::fs::read_to_string(&server_log).unwrap_or_default();
            return Err(Failed::with_output("mariadbd not ready at the timeout", &said));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready = started.elapsed();
    let checked =
        Run::new("mariadb-check", &["--no-defaults", &sock, "--all-databases", "--check"], t.log)
            .stdout(t.deadline)?;
    let bad: Vec<&str> = checked
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("error") || l.contains("corrupt")
        })
        .collect();
    if !bad.is_empty() {
        return Err(Failed::with_output("mariadb-check found damage", &bad.join("\n")));
    }
    let tables = checked.lines().filter(|l| l.trim_end().ends_with("OK")).count();
    let mut detail = format!(
        "MariaDB up by crash recovery in {}; mariadb-check: {tables} table(s) OK",
        super::report::ms(u64::try_from(ready.as_millis()).unwrap_or(u64::MAX))
    );
    if let Some(query) = &my.query {
        let rows = client(query)?;
        if rows.trim().is_empty() {
            return Err(Failed::new(format!("query returned no rows: {query}")));
        }
        detail.push_str(&format!("; query returned {} row(s)", rows.trim().lines().count()));
    }
    drop(server);
    Ok(detail)
}
