//! A private MariaDB server for tests (its own datadir, socket, loopback port and temporary
//! directory; stopped on drop), shared by the agent's mysql tests and the e2e test of real
//! applications (`tests/e2e/apps_cut.rs` includes this file by path).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stillpoint_agent::quiesce::mysql::MysqlConfig;

/// Runs a command; panics with its stderr when it fails.
fn run_ok(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect("run a MariaDB tool");
    assert!(
        out.status.success(),
        "{program} {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub const STILLPOINT_PASSWORD: &str = "sp-Secret-4711";
pub const APP_PASSWORD: &str = "app-pw";

/// A private mariadbd on `datadir`; stopped (TERM, then KILL) on Drop.
pub struct Mariadb {
    child: Child,
    pub socket: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

/// A fresh datadir with the system tables; root logs in over the socket as the OS root. Its
/// temporary tables go to a directory of its own beside the datadir: installs running at once
/// in the shared /tmp removed each other's.
pub fn install(datadir: &Path) {
    let tmpdir = datadir.with_extension("tmp");
    std::fs::create_dir_all(&tmpdir).unwrap();
    run_ok(
        "mariadb-install-db",
        &[
            "--no-defaults",
            &format!("--datadir={}", datadir.display()),
            "--user=root",
            "--auth-root-authentication-method=socket",
            "--skip-test-db",
            &format!("--tmpdir={}", tmpdir.display()),
        ],
    );
}

impl Mariadb {
    /// Starts a server on `datadir` with its socket, pid file and log in `run_dir`, binary log
    /// on (in the datadir), and waits until root can run a statement.
    pub fn start(datadir: &Path, run_dir: &Path) -> Mariadb {
        std::fs::create_dir_all(run_dir).unwrap();
        let port = stillpoint_core::testing::spare_loopback_port();
        let socket = run_dir.join("mysqld.sock");
        let log = run_dir.join("error.log");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg("--user=root")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--pid-file={}", run_dir.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", log.display()))
            .arg(format!("--tmpdir={}", run_dir.display()))
            .arg("--log-bin=mysql-bin")
            .arg("--server-id=1")
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--skip-name-resolve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        let server = Mariadb { child, socket, port, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match server.try_sql("SELECT 1") {
                Ok(_) => return server,
                Err(e) if Instant::now() > deadline => panic!(
                    "mariadbd on {} did not answer within 60s: {e}\n{}",
                    datadir.display(),
                    std::fs::read_to_string(&server.log).unwrap_or_default()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Runs `sql` as root with the command-line client; tab-separated rows, no headers.
    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-N", "-B"])
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-e", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The app schema (an InnoDB and an Aria table), the writer's user over TCP, and the
    /// quiescer's user with only the documented grants.
    pub fn setup(&self) {
        self.sql(&format!(
            "CREATE DATABASE app;
             CREATE TABLE app.t (id INT PRIMARY KEY AUTO_INCREMENT, n BIGINT NOT NULL) ENGINE=InnoDB;
             CREATE TABLE app.a (id INT PRIMARY KEY AUTO_INCREMENT, n BIGINT NOT NULL) ENGINE=Aria;
             CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY '{APP_PASSWORD}';
             GRANT ALL ON app.* TO 'app'@'127.0.0.1';
             CREATE USER 'stillpoint'@'localhost' IDENTIFIED BY '{STILLPOINT_PASSWORD}';
             GRANT RELOAD, BINLOG MONITOR ON *.* TO 'stillpoint'@'localhost';"
        ));
    }

    /// A connection as the app user over TCP.
    pub fn app(&self) -> mysql::Conn {
        app_conn(self.port).expect("connect as app")
    }

    /// The quiescer's config: the socket, user `stillpoint`, the password in `password_file`.
    pub fn quiescer(&self, password_file: &Path, timeout_ms: u64) -> MysqlConfig {
        MysqlConfig {
            name: "mariadb".into(),
            socket: Some(self.socket.clone()),
            host: None,
            port: None,
            user: Some("stillpoint".into()),
            password_file: Some(password_file.to_path_buf()),
            password_env: None,
            option_file: None,
            timeout_ms,
        }
    }
}

/// A connection as the app user to the test server on loopback `port`.
pub fn app_conn(port: u16) -> Result<mysql::Conn, String> {
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some("127.0.0.1"))
        .tcp_port(port)
        .user(Some("app"))
        .pass(Some(APP_PASSWORD))
        .prefer_socket(false);
    mysql::Conn::new(opts).map_err(|e| format!("mariadb on port {port}: {e}"))
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).output();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
