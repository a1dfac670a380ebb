//! A private PostgreSQL 15 for the tests: `initdb` and `pg_ctl` run as the `postgres` user (the
//! server refuses root) in a directory the test owns, on a loopback port and a socket directory
//! of its own; stopped on drop. Also loop-mounted XFS and btrfs images, unmounted on drop.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// The password of the `stillpoint` role the clusters make.
pub const PASSWORD: &str = "s3cret-Pg-pass";

/// The machine lacks something a real test needs: say what and skip.
pub fn missing() -> Option<String> {
    for tool in ["initdb", "pg_ctl", "psql", "pgbench", "pg_amcheck"] {
        if !Path::new(BIN).join(tool).exists() {
            return Some(format!("{BIN}/{tool} is not installed (apt-get install postgresql-15)"));
        }
    }
    if run("id", &["-u", "postgres"]).is_err() {
        return Some("there is no postgres user to run the server as".into());
    }
    None
}

/// Runs a program; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// Runs one of PostgreSQL's programs as the postgres user.
fn as_postgres(tool: &str, args: &[&str]) -> Result<String, String> {
    let program = format!("{BIN}/{tool}");
    let mut all = vec!["-u", "postgres", "--", program.as_str()];
    all.extend_from_slice(args);
    run("runuser", &all)
}

/// Hands `path` to the postgres user.
pub fn give_to_postgres(path: &Path) {
    run("chown", &["-R", "postgres:postgres", &path.display().to_string()]).expect("chown");
}

/// One running cluster.
pub struct Cluster {
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

impl Cluster {
    /// A new cluster in `dir` (given to postgres), archiving nowhere: enough to be allowed
    /// backup mode.
    pub fn archiving(dir: &Path) -> Cluster {
        give_to_postgres(dir);
        Cluster::init(
            &dir.join("pg/data"),
            &dir.join("sock"),
            "archive_mode = on\narchive_command = '/bin/true'",
        )
    }

    /// A new cluster in `data` (which must not exist yet, under a directory postgres can
    /// reach), sockets in `socket_dir`, with `extra` lines added to its configuration.
    pub fn init(data: &Path, socket_dir: &Path, extra: &str) -> Cluster {
        std::fs::create_dir_all(socket_dir).expect("socket dir");
        give_to_postgres(socket_dir);
        let parent = data.parent().expect("data has a parent");
        std::fs::create_dir_all(parent).expect("data's parent");
        give_to_postgres(parent);
        let d = data.display().to_string();
        as_postgres("initdb", &["-D", &d, "-U", "postgres", "-A", "trust", "--no-sync"])
            .expect("initdb");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
        )
        .expect("pg_hba.conf");
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = on\nmax_wal_size = 64MB\n{extra}\n",
            socket_dir.display()
        );
        append(&data.join("postgresql.conf"), &conf);
        let mut cluster = Cluster {
            data: data.into(),
            socket_dir: socket_dir.into(),
            port: stillpoint_core::testing::spare_loopback_port(),
            log: parent
                .join(format!("{}.log", data.file_name().and_then(|n| n.to_str()).unwrap_or("pg"))),
        };
        cluster.start().expect("the new cluster starts");
        cluster.psql(&format!(
            "CREATE ROLE stillpoint LOGIN PASSWORD '{PASSWORD}';
             GRANT pg_checkpoint TO stillpoint;
             GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO stillpoint;
             GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO stillpoint;"
        ));
        cluster
    }

    /// A cluster on a copy of another one's data directory; not started.
    pub fn on_copy(data: &Path, socket_dir: &Path) -> Cluster {
        std::fs::create_dir_all(socket_dir).expect("socket dir");
        give_to_postgres(socket_dir);
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        // The copy must not archive into the original's archive.
        append(
            &data.join("postgresql.conf"),
            &format!("unix_socket_directories = '{}'\narchive_mode = off\n", socket_dir.display()),
        );
        Cluster {
            data: data.into(),
            socket_dir: socket_dir.into(),
            port: stillpoint_core::testing::spare_loopback_port(),
            log: data.with_extension("log"),
        }
    }

    /// `pg_ctl start`, waiting up to 60 s; the error holds the server's log.
    pub fn start(&mut self) -> Result<(), String> {
        let port = format!("-p {}", self.port);
        let started = as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data.display().to_string(),
                "-l",
                &self.log.display().to_string(),
                "-o",
                &port,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        started.map(drop).map_err(|e| format!("{e}\nserver log:\n{}", self.log_text()))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs SQL as the superuser over the socket; the rows, `|`-separated.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let args = self.superuser_args(&[
            "-d",
            "postgres",
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&format!("{BIN}/psql"), &args).map(|s| s.trim().to_string())
    }

    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| panic!("psql: {e}"))
    }

    /// pgbench tables at `scale`, and a table `marks` the tests write known ids into.
    pub fn pgbench_init(&self, scale: u32) {
        let args = self.bench_args(&["-i", "-q", "-s", &scale.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&format!("{BIN}/pgbench"), &args).expect("pgbench -i");
        self.psql("CREATE TABLE marks (id int PRIMARY KEY)");
    }

    /// Arguments to reach the cluster as the superuser over its socket, then `extra`.
    fn superuser_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "-h".into(),
            self.socket_dir.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            "postgres".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// pgbench's arguments: `extra`, then the database.
    fn bench_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = self.superuser_args(extra);
        args.push("postgres".into());
        args
    }

    /// pgbench with 4 clients for `seconds`, in the background until dropped.
    pub fn pgbench(&self, seconds: u32) -> Bench {
        self.pgbench_with(&["-c", "4", "-T", &seconds.to_string(), "-n"])
    }

    /// pgbench with these options (clients, duration, a rate), in the background until dropped.
    pub fn pgbench_with(&self, options: &[&str]) -> Bench {
        let args = self.bench_args(options);
        let child = Command::new(format!("{BIN}/pgbench"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pgbench starts");
        Bench(child)
    }

    /// Inserts ids `from..=to` into `marks`, committed when this returns.
    pub fn mark(&self, from: u32, to: u32) {
        self.psql(&format!("INSERT INTO marks SELECT generate_series({from}, {to})"));
    }

    /// Checks what a restored copy must hold: every id `1..=marked` in `marks`, pgbench's
    /// balances agreeing (each pgbench transaction changes all four tables at once), at least
    /// `history` rows of pgbench_history, and `pg_amcheck --all` passing.
    pub fn check_restored(&self, marked: u32, history: u64) {
        let got = self.psql(&format!("SELECT count(*) FROM marks WHERE id BETWEEN 1 AND {marked}"));
        assert_eq!(got, marked.to_string(), "every id committed before the thaw is restored");
        let sums = self.psql(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches), (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
        );
        let parts: Vec<&str> = sums.split('|').collect();
        assert_eq!(parts.len(), 4, "{sums}");
        assert!(parts.iter().all(|p| *p == parts[0]), "pgbench's balances disagree: {sums}");
        let rows: u64 = self.psql("SELECT count(*) FROM pgbench_history").parse().expect("a count");
        assert!(
            rows >= history,
            "restored {rows} pgbench transactions, {history} were committed before the freeze"
        );
        let args = self.superuser_args(&["--all", "--install-missing", "--heapallindexed"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&format!("{BIN}/pg_amcheck"), &args)
            .expect("pg_amcheck --all passes on the restored copy");
    }

    /// Writes a file into the data directory, owned by postgres and private to it.
    pub fn put(&self, name: &str, bytes: &[u8]) {
        let path = self.data.join(name);
        std::fs::write(&path, bytes).expect("write into the data directory");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        give_to_postgres(&path);
    }

    /// Appends settings to the cluster's postgresql.conf.
    pub fn configure(&self, lines: &str) {
        append(&self.data.join("postgresql.conf"), lines);
    }

    /// Polls `sql` until it returns `want`, for at most `within`.
    pub fn wait_for(&self, sql: &str, want: &str, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.try_psql(sql)?;
            if got == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{sql}: still {got:?} after {within:?}, want {want:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            "pg_ctl",
            &["-D", &self.data.display().to_string(), "-m", "immediate", "-w", "stop"],
        );
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file =
        std::fs::OpenOptions::new().append(true).open(path).expect("open the configuration");
    file.write_all(text.as_bytes()).expect("append to the configuration");
}

/// A background pgbench, killed on drop.
pub struct Bench(Child);

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A filesystem image loop-mounted at `mount`, unmounted (and its loop device freed) on drop.
pub struct Mounted {
    pub mount: PathBuf,
}

impl Mounted {
    /// A `size_mib` image at `image` made by `mkfs` (its arguments before the image path),
    /// mounted at `mount`.
    pub fn new(image: &Path, mount: &Path, size_mib: u64, mkfs: &[&str]) -> Mounted {
        let file = std::fs::File::create(image).expect("create the image");
        file.set_len(size_mib << 20).expect("size the image");
        drop(file);
        let mut args: Vec<&str> = mkfs[1..].to_vec();
        let path = image.display().to_string();
        args.push(&path);
        run(mkfs[0], &args).expect("mkfs");
        std::fs::create_dir_all(mount).expect("mount point");
        run("mount", &["-o", "loop", &path, &mount.display().to_string()]).expect("mount");
        Mounted { mount: mount.into() }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let m = self.mount.display().to_string();
        if run("umount", &[&m]).is_err() {
            let _ = run("umount", &["-l", &m]);
        }
    }
}
