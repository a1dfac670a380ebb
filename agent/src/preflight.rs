//! The agent's own pre-flight checks (the `Preflight` RPC): each quiescer's tool, socket or
//! files present, the snapshot provider's tools and its `check`, the privileges freezing and
//! snapshotting need, the freeze guardian, its own certificate. Changes nothing: it reads files,
//! looks up programs and opens (then closes) TCP connections to local databases.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use stillpoint_core::identity::Role;
use stillpoint_core::preflight::Finding;

use crate::config::{QuiescerConfig, SnapshotConfig};
use crate::Config;

/// How long a database's TCP port may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A Linux capability the agent may need, with its bit in `/proc/self/status`'s `CapEff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    DacOverride = 1,
    DacReadSearch = 2,
    Fowner = 3,
    Kill = 5,
    SysPtrace = 19,
    SysAdmin = 21,
}

impl Cap {
    pub fn name(self) -> &'static str {
        match self {
            Cap::DacOverride => "CAP_DAC_OVERRIDE",
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::Fowner => "CAP_FOWNER",
            Cap::Kill => "CAP_KILL",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
        }
    }
}

/// The capabilities `config` needs, each with the part of the config that needs it; pure.
/// The same set `deploy/systemd/stillpoint-agent.service` bounds the agent to.
pub fn needed_caps(config: &Config) -> Vec<(Cap, String)> {
    let mut out: Vec<(Cap, String)> = Vec::new();
    let mut need = |cap: Cap, why: String| {
        if !out.iter().any(|(c, _)| *c == cap) {
            out.push((cap, why));
        }
    };
    for q in &config.quiescers {
        let name = q.name();
        match q {
            QuiescerConfig::Fsfreeze { .. } => need(Cap::SysAdmin, format!("{name}: FIFREEZE")),
            QuiescerConfig::Stop { .. } => {
                need(Cap::Kill, format!("quiescer {name}: SIGSTOP another user's process"))
            }
            QuiescerConfig::Process(p) => {
                need(Cap::Kill, format!("quiescer {name}: SIGSTOP another user's processes"));
                need(
                    Cap::SysPtrace,
                    format!("quiescer {name}: read other processes' /proc/PID/exe"),
                );
                if p.lockout_executable.is_some() {
                    need(Cap::Fowner, format!("quiescer {name}: chmod the locked-out executable"));
                }
            }
            QuiescerConfig::Postgres(_) | QuiescerConfig::Mysql(_) => need(
                Cap::SysPtrace,
                format!(
                    "quiescer {name}: the guardian's hangup takes the agent's socket (pidfd_getfd)"
                ),
            ),
            QuiescerConfig::Exec { .. } | QuiescerConfig::Sqlite(_) | QuiescerConfig::Redis(_) => {}
        }
    }
    let provider = match &config.snapshot {
        SnapshotConfig::Btrfs { .. } => Some("btrfs subvolume snapshots"),
        SnapshotConfig::Zfs(_) => Some("zfs snapshot, hold and destroy"),
        SnapshotConfig::Lvm(_) => Some("LVM snapshots (device-mapper)"),
        SnapshotConfig::Qcow2(_) => Some("qcow2 exports mounted through FUSE"),
        SnapshotConfig::MockSan { .. } | SnapshotConfig::Reflink(_) => None,
        #[cfg(windows)]
        SnapshotConfig::Vss(_) => None,
    };
    if let Some(why) = provider {
        need(Cap::SysAdmin, format!("snapshot provider: {why}"));
    }
    need(Cap::DacOverride, "read and write volumes, databases and pidfiles of other users".into());
    need(Cap::DacReadSearch, "open directories of other users (volumes, sockets)".into());
    out
}

/// The effective capability mask from `/proc/self/status` text; pure.
pub fn cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The effective uid from `/proc/self/status` text (`Uid:` real, effective, ...); pure.
pub fn euid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// The privileges finding: every needed capability effective (root in the shipped unit has
/// exactly these), or which are missing and why each is needed; pure.
pub fn privileges(needed: &[(Cap, String)], effective: Option<u64>, euid: Option<u32>) -> Finding {
    let euid = euid.map_or_else(|| "unknown".to_string(), |u| u.to_string());
    let Some(mask) = effective else {
        return Finding::warn("privileges", "cannot read CapEff from /proc/self/status");
    };
    let missing: Vec<String> = needed
        .iter()
        .filter(|(cap, _)| mask & (1u64 << (*cap as u32)) == 0)
        .map(|(cap, why)| format!("{} ({why})", cap.name()))
        .collect();
    if missing.is_empty() {
        let names: Vec<&str> = needed.iter().map(|(c, _)| c.name()).collect();
        return Finding::ok("privileges", format!("uid {euid}, has {}", names.join(", ")));
    }
    Finding::error(
        "privileges",
        format!(
            "uid {euid} lacks {}: run the agent as root with the shipped unit's CapabilityBoundingSet",
            missing.join(", ")
        ),
    )
}

/// Whether `mount` is a mount point in `mountinfo` (`/proc/self/mountinfo` text, whose mount
/// point field escapes space, tab, newline and backslash as octal); pure.
pub fn is_mount_point(mountinfo: &str, mount: &Path) -> bool {
    let unescape = |s: &str| {
        s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    };
    mountinfo.lines().filter_map(|l| l.split(' ').nth(4)).any(|m| Path::new(&unescape(m)) == mount)
}

/// `program` as the agent would run it: an absolute path, or found on `PATH`.
fn find_program(program: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| executable(p))
}

fn program_finding(check: &str, what: &str, argv: &[String]) -> Finding {
    let Some(program) = argv.first() else {
        return Finding::error(check, format!("{what} is an empty command"));
    };
    match find_program(program) {
        Some(p) => Finding::ok(check, format!("{what}: {} is executable", p.display())),
        None => Finding::error(
            check,
            format!("{what}: {program} is not an executable file here (nor on PATH): install it or fix the path"),
        ),
    }
}

fn exists_finding(check: &str, what: &str, path: &Path) -> Finding {
    match std::fs::metadata(path) {
        Ok(_) => Finding::ok(check, format!("{what} {} is there", path.display())),
        Err(e) => Finding::error(check, format!("{what} {}: {e}", path.display())),
    }
}

/// A database listening at a Unix socket or a TCP address.
fn endpoint_finding(check: &str, socket: Option<&Path>, host: Option<&str>, port: u16) -> Finding {
    if let Some(socket) = socket {
        return exists_finding(check, "socket", socket);
    }
    let host = host.unwrap_or("127.0.0.1");
    let addr = format!("{host}:{port}");
    let resolved = match addr.to_socket_addrs() {
        Ok(mut addrs) => addrs.next(),
        Err(e) => return Finding::error(check, format!("{addr}: cannot resolve: {e}")),
    };
    let Some(sa) = resolved else {
        return Finding::error(check, format!("{addr}: no address"));
    };
    match TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
        Ok(_) => Finding::ok(check, format!("{addr} accepts connections")),
        Err(e) => Finding::error(check, format!("{addr}: {e}: is the server running there?")),
    }
}

fn pid_alive(pidfile: &Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(pidfile)
        .map_err(|e| format!("pidfile {}: {e}", pidfile.display()))?;
    let pid: u32 =
        text.trim().parse().map_err(|_| format!("pidfile {} holds no pid", pidfile.display()))?;
    if Path::new(&format!("/proc/{pid}")).exists() {
        Ok(pid)
    } else {
        Err(format!("pidfile {} names pid {pid}, which is not running", pidfile.display()))
    }
}

/// One finding per quiescer (an exec hook's two commands each get one).
fn quiescer_findings(q: &QuiescerConfig, mountinfo: &str) -> Vec<Finding> {
    let check = format!("quiescer {}", q.name());
    let check = check.as_str();
    match q {
        QuiescerConfig::Exec { pre_freeze, post_thaw, .. } => {
            let mut out = Vec::new();
            for (what, argv) in [("pre_freeze", pre_freeze), ("post_thaw", post_thaw)] {
                if let Some(argv) = argv {
                    out.push(program_finding(check, what, argv));
                }
            }
            if out.is_empty() {
                out.push(Finding::ok(check, "no commands"));
            }
            out
        }
        QuiescerConfig::Fsfreeze { mount } => vec![if is_mount_point(mountinfo, mount) {
            Finding::ok(check, format!("{} is a mount point", mount.display()))
        } else {
            Finding::error(
                check,
                format!(
                    "{} is not a mount point here: mount its filesystem, or fix mount",
                    mount.display()
                ),
            )
        }],
        QuiescerConfig::Stop { pidfile, .. } => vec![match pid_alive(pidfile) {
            Ok(pid) => Finding::ok(check, format!("process {pid} from {} runs", pidfile.display())),
            Err(e) => Finding::error(check, format!("{e}: a backup now would fail at its freeze")),
        }],
        QuiescerConfig::Postgres(pg) => {
            let socket = pg
                .host
                .starts_with('/')
                .then(|| PathBuf::from(&pg.host).join(format!(".s.PGSQL.{}", pg.port)));
            let mut out = vec![endpoint_finding(check, socket.as_deref(), Some(&pg.host), pg.port)];
            if let Some(f) = &pg.password_file {
                out.push(exists_finding(check, "password_file", f));
            }
            out
        }
        QuiescerConfig::Mysql(m) => {
            let mut out = vec![endpoint_finding(
                check,
                m.socket.as_deref(),
                m.host.as_deref(),
                m.port.unwrap_or(3306),
            )];
            for (what, f) in [("password_file", &m.password_file), ("option_file", &m.option_file)]
            {
                if let Some(f) = f {
                    out.push(exists_finding(check, what, f));
                }
            }
            out
        }
        QuiescerConfig::Redis(r) => {
            let mut out = vec![endpoint_finding(
                check,
                r.socket.as_deref(),
                r.host.as_deref(),
                r.port.unwrap_or(6379),
            )];
            if let Some(f) = &r.password_file {
                out.push(exists_finding(check, "password_file", f));
            }
            out
        }
        QuiescerConfig::Sqlite(s) => {
            s.databases.iter().map(|db| exists_finding(check, "database", db)).collect()
        }
        QuiescerConfig::Process(p) => {
            let mut out = Vec::new();
            if let Some(exe) = &p.exe {
                out.push(exists_finding(check, "exe", exe));
            }
            if let Some(pidfile) = &p.pidfile {
                out.push(match pid_alive(pidfile) {
                    Ok(pid) => Finding::ok(check, format!("process {pid} runs")),
                    Err(e) => Finding::warn(check, format!("{e}: nothing of it to stop now")),
                });
            }
            for (what, argv) in [
                ("notify", &p.notify),
                ("stop_command", &p.stop_command),
                ("lock_command", &p.lock_command),
                ("unlock_command", &p.unlock_command),
            ] {
                if let Some(argv) = argv {
                    out.push(program_finding(check, what, argv));
                }
            }
            if let Some(exe) = &p.lockout_executable {
                out.push(exists_finding(check, "lockout_executable", exe));
            }
            if out.is_empty() {
                out.push(Finding::ok(check, "configured"));
            }
            out
        }
    }
}

/// The programs a provider runs, each with whether it is required.
fn provider_tools(snapshot: &SnapshotConfig) -> Vec<(&'static str, bool)> {
    match snapshot {
        SnapshotConfig::Btrfs { .. } => vec![("btrfs", true)],
        SnapshotConfig::Zfs(_) => vec![("zfs", true)],
        SnapshotConfig::Lvm(_) => vec![("lvm", true)],
        // The export for the agent's own saveset copy only.
        SnapshotConfig::Qcow2(_) => vec![("qemu-img", true), ("qemu-storage-daemon", false)],
        SnapshotConfig::MockSan { .. } | SnapshotConfig::Reflink(_) => vec![],
        #[cfg(windows)]
        SnapshotConfig::Vss(_) => vec![("vssadmin", true)],
    }
}

/// Everything but the provider's `check` and the guardian, which need the running agent's own
/// (`service` adds them); blocking.
pub fn local(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let now = stillpoint_core::unix_ms() / 1000;
    out.push(stillpoint_core::preflight::certificate(
        "certificate",
        &config.tls,
        Role::Agent,
        Some(&config.server),
        now,
    ));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for q in &config.quiescers {
        out.extend(quiescer_findings(q, &mountinfo));
    }
    for (tool, required) in provider_tools(&config.snapshot) {
        out.push(match (find_program(tool), required) {
            (Some(p), _) => Finding::ok("snapshot tools", format!("{} is executable", p.display())),
            (None, true) => {
                Finding::error("snapshot tools", format!("{tool} is not on PATH: install it"))
            }
            (None, false) => Finding::warn(
                "snapshot tools",
                format!(
                    "{tool} is not on PATH: the agent's own saveset copy of a qcow2 disk needs it"
                ),
            ),
        });
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    out.push(privileges(&needed_caps(config), cap_eff(&status), euid(&status)));
    out
}

#[cfg(test)]
mod tests;
