//! Runs the checks' tools: no shell, output to a log file in scratch (no pipe to fill), killed
//! with their whole process group at the check's deadline, and a missing tool named with the
//! Debian package that has it.

use std::fmt;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::report::{tail, TAIL_LINES};

/// Why a check failed: one line, and the tools' last output lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub detail: String,
    pub output: Vec<String>,
}

impl Failed {
    pub fn new(detail: impl Into<String>) -> Failed {
        Failed { detail: detail.into(), output: Vec::new() }
    }

    pub fn with_output(detail: impl Into<String>, output: &str) -> Failed {
        Failed { detail: detail.into(), output: tail(output, TAIL_LINES) }
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The Debian package that ships a tool the drill runs, for the "install it" message.
pub fn package_of(tool: &str) -> &'static str {
    match tool {
        "xfs_repair" => "xfsprogs",
        "btrfs" => "btrfs-progs",
        "e2fsck" | "fsck" => "e2fsprogs",
        "losetup" | "mount" | "umount" | "runuser" | "fsck.generic" => "mount / util-linux",
        "sqlite3" => "sqlite3",
        "mariadbd" | "mariadb-install-db" => "mariadb-server",
        "mariadb" | "mariadb-check" | "mariadb-admin" => "mariadb-client",
        "postgres" | "pg_ctl" | "psql" | "pg_amcheck" => {
            "postgresql-15 (or the version of bin_dir)"
        }
        _ => "the package that provides it",
    }
}

/// Where `tool` is: itself when it has a slash, else the first match on `PATH` (and the sbin
/// directories, which a timer's `PATH` may lack); a failure naming the package otherwise.
pub fn find(tool: &str) -> Result<PathBuf, Failed> {
    let missing = |at: &str| {
        let name = Path::new(tool).file_name().and_then(|n| n.to_str()).unwrap_or(tool);
        Failed::new(format!(
            "{name} is not installed{at}: install {} on the drill host",
            package_of(name)
        ))
    };
    if tool.contains('/') {
        return if Path::new(tool).is_file() {
            Ok(tool.into())
        } else {
            Err(missing(&format!(" (no {tool})")))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(missing(""))
}

/// One program to run under a deadline.
pub struct Run<'a> {
    pub program: &'a str,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run as this operating-system user (through `runuser`).
    pub as_user: Option<&'a str>,
    /// Where its stdout and stderr go (appended).
    pub log: &'a Path,
    /// Its stdout alone goes here instead (truncated first), for a query's result.
    pub stdout_to: Option<PathBuf>,
}

/// What a program printed and whether it exited 0.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub status: String,
    pub output: String,
}

impl<'a> Run<'a> {
    pub fn new(program: &'a str, args: &[&str], log: &'a Path) -> Run<'a> {
        Run {
            program,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            as_user: None,
            log,
            stdout_to: None,
        }
    }

    /// The same program run as `user` (through `runuser`).
    pub fn as_user(mut self, user: &'a str) -> Run<'a> {
        self.as_user = Some(user);
        self
    }

    /// Runs it until it exits or `deadline`, when its process group is killed and the check
    /// fails saying so. A program that cannot start is a failure naming its package.
    pub fn run(&self, deadline: Instant) -> Result<Ran, Failed> {
        let program = find(self.program)?;
        let mut command = match self.as_user {
            Some(user) => {
                let mut c = Command::new(find("runuser")?);
                c.args(["-u", user, "--"]).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        command.args(&self.args).envs(self.env.iter().map(|(k, v)| (k, v)));
        let start = std::fs::metadata(self.log).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log)
            .map_err(|e| Failed::new(format!("open {}: {e}", self.log.display())))?;
        let err = log.try_clone().map_err(|e| Failed::new(format!("log: {e}")))?;
        let out = match &self.stdout_to {
            Some(path) => std::fs::File::create(path)
                .map_err(|e| Failed::new(format!("create {}: {e}", path.display())))?,
            None => log,
        };
        let shown = self.shown();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| Failed::new(format!("{shown}: {e}")))?;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    kill_group(child.id());
                    let _ = child.wait();
                    return Err(Failed::with_output(
                        format!("{shown}: timed out (the check's timeout_s), killed"),
                        &self.output_since(start),
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(Failed::new(format!("{shown}: wait: {e}"))),
            }
        };
        Ok(Ran {
            ok: status.success(),
            status: status.to_string(),
            output: self.output_since(start),
        })
    }

    /// Runs it and fails the check, with its output, unless it exits 0.
    pub fn check(&self, deadline: Instant) -> Result<String, Failed> {
        let ran = self.run(deadline)?;
        if ran.ok {
            Ok(ran.output)
        } else {
            Err(Failed::with_output(format!("{}: {}", self.shown(), ran.status), &ran.output))
        }
    }

    /// Runs it, failing the check unless it exits 0, and returns its stdout alone.
    pub fn stdout(mut self, deadline: Instant) -> Result<String, Failed> {
        let path = self.log.with_extension("stdout");
        self.stdout_to = Some(path.clone());
        self.check(deadline)?;
        std::fs::read_to_string(&path)
            .map_err(|e| Failed::new(format!("read {}: {e}", path.display())))
    }

    fn shown(&self) -> String {
        let name = Path::new(self.program).file_name().and_then(|n| n.to_str()).unwrap_or("?");
        name.to_string()
    }

    fn output_since(&self, start: u64) -> String {
        let all = std::fs::read(self.log).unwrap_or_default();
        let from = usize::try_from(start).unwrap_or(usize::MAX).min(all.len());
        String::from_utf8_lossy(&all[from..]).into_owned()
    }
}

/// SIGKILL to a process group we started (`process_group(0)` made its leader's pid its id),
/// through kill(1): `stillpoint-sys` signals single processes only, by design.
fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
