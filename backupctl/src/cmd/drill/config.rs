//! The drill's TOML: which servers to restore and the checks to run on each, parsed once with
//! unknown fields refused, then `problems()` listing every mistake at once. No IO beyond the
//! caller reading the file.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A check's time limit when neither it nor the file sets one.
pub const DEFAULT_TIMEOUT_S: u64 = 600;

/// The whole drill file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// Every check's time limit unless it sets its own, in seconds.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// The servers to restore; none means every server of the backup, without checks.
    #[serde(default, rename = "server")]
    pub servers: Vec<ServerConfig>,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_S
}

/// One server: restored whole (every volume), then its checks in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub name: String,
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckConfig>,
}

/// One check of a restored server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct CheckConfig {
    /// The volume (as the backup names it) the check works on; may be left out when the
    /// server has one volume.
    pub volume: Option<String>,
    /// This check's time limit in seconds (default: the file's `timeout_s`).
    pub timeout_s: Option<u64>,
    pub kind: CheckKind,
}

/// What a check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// Read-only filesystem check of the restored image, by the filesystem found in it.
    Fsck,
    /// Loop-mount the image read-only and list its top directory.
    Mount,
    /// Start a private PostgreSQL on the data directory inside the image, `pg_amcheck --all`,
    /// then the optional query, which must return a row.
    Postgres(PostgresCheck),
    /// Start a private MariaDB on the data directory inside the image, `mariadb-check
    /// --all-databases`, then the optional query, which must return a row.
    Mysql(MysqlCheck),
    /// `PRAGMA integrity_check` on a database file inside the image.
    Sqlite(SqliteCheck),
    /// The operator's own command; exit 0 passes.
    Command(CommandCheck),
}

/// A check as written: `kind`, the common fields, then the kind's own, which refuse unknown
/// fields (serde cannot refuse them beside a flattened or tagged struct, so split by hand).
impl TryFrom<toml::Table> for CheckConfig {
    type Error = String;

    fn try_from(mut table: toml::Table) -> Result<Self, String> {
        const KINDS: &str = "fsck, mount, postgres, mysql, sqlite or command";
        let kind = match table.remove("kind") {
            Some(toml::Value::String(kind)) => kind,
            Some(other) => return Err(format!("kind: {other} is not one of {KINDS}")),
            None => return Err(format!("a check needs `kind = ...` ({KINDS})")),
        };
        let volume = match table.remove("volume") {
            Some(v) => Some(v.try_into::<String>().map_err(|e| format!("volume: {e}"))?),
            None => None,
        };
        let timeout_s = match table.remove("timeout_s") {
            Some(v) => Some(v.try_into::<u64>().map_err(|e| format!("timeout_s: {e}"))?),
            None => None,
        };
        let own = |what: &str| format!("{what} check: ");
        let rest = toml::Value::Table(table);
        let kind = match kind.as_str() {
            "fsck" | "mount" => {
                if let toml::Value::Table(t) = &rest {
                    if let Some(field) = t.keys().next() {
                        return Err(format!("{kind} check: unknown field `{field}`"));
                    }
                }
                if kind == "fsck" {
                    CheckKind::Fsck
                } else {
                    CheckKind::Mount
                }
            }
            "postgres" => {
                CheckKind::Postgres(rest.try_into().map_err(|e| own("postgres") + &e.to_string())?)
            }
            "mysql" => {
                CheckKind::Mysql(rest.try_into().map_err(|e| own("mysql") + &e.to_string())?)
            }
            "sqlite" => {
                CheckKind::Sqlite(rest.try_into().map_err(|e| own("sqlite") + &e.to_string())?)
            }
            "command" => {
                CheckKind::Command(rest.try_into().map_err(|e| own("command") + &e.to_string())?)
            }
            other => return Err(format!("kind: {other:?} is not one of {KINDS}")),
        };
        Ok(CheckConfig { volume, timeout_s, kind })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresCheck {
    /// The data directory, relative to the image's root (`pg/data`, `postgresql/15/main`).
    pub data_dir: PathBuf,
    /// Where `postgres`, `pg_ctl`, `psql` and `pg_amcheck` are.
    #[serde(default = "default_pg_bin")]
    pub bin_dir: PathBuf,
    /// The operating-system user the server runs as (PostgreSQL refuses root).
    #[serde(default = "default_pg_user")]
    pub os_user: String,
    /// The database role the checks connect as.
    #[serde(default = "default_pg_user")]
    pub role: String,
    /// The database the query runs in.
    #[serde(default = "default_pg_user")]
    pub database: String,
    /// SQL whose result must be non-empty (`SELECT 1 FROM orders LIMIT 1`).
    #[serde(default)]
    pub query: Option<String>,
    /// The WAL archive on this host: with it and the backup's `backup_label` artifact, the
    /// server recovers from the label (to the backup's end) instead of by crash recovery.
    #[serde(default)]
    pub wal_archive: Option<PathBuf>,
}

fn default_pg_bin() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

fn default_pg_user() -> String {
    "postgres".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlCheck {
    /// The data directory, relative to the image's root (`mysql`, `mariadb`).
    pub data_dir: PathBuf,
    /// The operating-system user the server runs as.
    #[serde(default = "default_mysql_user")]
    pub os_user: String,
    /// SQL whose result must be non-empty.
    #[serde(default)]
    pub query: Option<String>,
}

fn default_mysql_user() -> String {
    "mysql".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteCheck {
    /// The database file, relative to the image's root.
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandCheck {
    /// The program and its arguments, run without a shell.
    pub command: Vec<String>,
    /// Mount the image (read-write, it is a scratch copy) at `$STILLPOINT_DRILL_ROOT` first.
    #[serde(default = "yes")]
    pub mount: bool,
}

fn yes() -> bool {
    true
}

impl CheckKind {
    /// The name a report shows: `fsck`, `postgres`, ...
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Fsck => "fsck",
            CheckKind::Mount => "mount",
            CheckKind::Postgres(_) => "postgres",
            CheckKind::Mysql(_) => "mysql",
            CheckKind::Sqlite(_) => "sqlite",
            CheckKind::Command(_) => "command",
        }
    }

    /// Whether the check loop-mounts the image (which needs root).
    pub fn mounts(&self) -> bool {
        match self {
            CheckKind::Fsck => false,
            CheckKind::Command(c) => c.mount,
            _ => true,
        }
    }
}

impl CheckConfig {
    pub fn timeout(&self, config: &DrillConfig) -> Duration {
        Duration::from_secs(self.timeout_s.unwrap_or(config.timeout_s))
    }
}

impl DrillConfig {
    /// Parses the file's text; the error says where and what.
    pub fn parse(text: &str) -> Result<DrillConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Every mistake the types cannot rule out, one line each, naming the field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.timeout_s == 0 {
            problems.push("timeout_s: must be at least 1 second".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, server) in self.servers.iter().enumerate() {
            let at = format!("server[{i}]");
            if server.name.trim().is_empty() {
                problems.push(format!("{at}.name: empty"));
            } else if !seen.insert(server.name.as_str()) {
                problems.push(format!("{at}.name: server {:?} is named twice", server.name));
            }
            for (j, check) in server.checks.iter().enumerate() {
                let at = format!("{at}.check[{j}] ({})", check.kind.name());
                if check.timeout_s == Some(0) {
                    problems.push(format!("{at}.timeout_s: must be at least 1 second"));
                }
                match &check.kind {
                    CheckKind::Postgres(pg) => {
                        inside(&mut problems, &at, "data_dir", &pg.data_dir);
                        if pg.os_user == "root" {
                            problems
                                .push(format!("{at}.os_user: PostgreSQL refuses to run as root"));
                        }
                        if pg.query.as_deref().is_some_and(|q| q.trim().is_empty()) {
                            problems.push(format!("{at}.query: empty; leave it out instead"));
                        }
                        if pg.wal_archive.as_deref().is_some_and(|p| !p.is_absolute()) {
                            problems.push(format!("{at}.wal_archive: must be an absolute path"));
                        }
                    }
                    CheckKind::Mysql(my) => {
                        inside(&mut problems, &at, "data_dir", &my.data_dir);
                        if my.query.as_deref().is_some_and(|q| q.trim().is_empty()) {
                            problems.push(format!("{at}.query: empty; leave it out instead"));
                        }
                    }
                    CheckKind::Sqlite(s) => inside(&mut problems, &at, "path", &s.path),
                    CheckKind::Command(c) => {
                        if c.command.first().is_none_or(|p| p.trim().is_empty()) {
                            problems.push(format!("{at}.command: needs at least the program"));
                        }
                    }
                    CheckKind::Fsck | CheckKind::Mount => {}
                }
            }
        }
        problems
    }
}

/// A path inside the image: relative and never climbing out with `..`.
fn inside(problems: &mut Vec<String>, at: &str, field: &str, path: &Path) {
    let climbs = path.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
    if path.as_os_str().is_empty() || climbs {
        problems.push(format!(
            "{at}.{field}: {:?} must be a relative path inside the image, without `..`",
            path.display().to_string()
        ));
    }
}
