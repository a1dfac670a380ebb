//! The listener's TOML config: data directory, bind address, TLS files, the inventory of servers
//! and groups, the protocol's timeouts and the copy step. `validate()` reports every problem at
//! once, each naming its field; in saveset mode that includes reading the secret and unlocking
//! the repository.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use std::str::FromStr;
use stillpoint_core::tls::TlsFiles;

use stillpoint_saveset::{Location, Pool, Repository, Secret};

use crate::coordinator::Timeouts;
use crate::error::{Error, Result};
use stillpoint_protocol::hold::Hold;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the catalog (an embedded redb store) lives.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    #[serde(rename = "server", default)]
    pub servers: Vec<ServerConfig>,
    #[serde(rename = "group", default)]
    pub groups: Vec<GroupConfig>,
    pub copy: CopyConfig,
    /// `[notify]`: e-mail and webhooks on failure, success or both, and alerts.
    #[serde(default)]
    pub notify: Option<stillpoint_notify::NotifyConfig>,
    /// The IANA time zone schedules run in (`Europe/Berlin`); absent: the system's local zone.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Backups started at the times of a cron expression (`crate::schedule`).
    #[serde(rename = "schedule", default)]
    pub schedules: Vec<ScheduleConfig>,
    /// `[metrics]`: the Prometheus endpoint; absent, there is none.
    #[serde(default)]
    pub metrics: Option<stillpoint_core::metrics::MetricsConfig>,
}

/// One `[[schedule]]`: back up `group` at the times `cron` gives, in `timezone`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Unique; backups it starts say `started_by = "schedule:<name>"`.
    pub name: String,
    pub group: String,
    /// `minute hour day-of-month month day-of-week`, or `@hourly`, `@daily`, `@weekly`,
    /// `@monthly`, `@yearly`.
    pub cron: String,
    /// `false`: starts suspended until `backupctl schedules resume NAME`.
    #[serde(default)]
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The agent's name; its certificate must carry it as a DNS name.
    pub name: String,
    /// `host:port` of the agent.
    pub address: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    pub servers: Vec<String>,
    /// The weakest hold class every server must have (`filesystem-freeze`, ...); a backup with
    /// a server below it fails before anything freezes. Absent: `storage-only`, no requirement.
    #[serde(default)]
    pub require_hold: Option<String>,
    /// `after-own-snapshot` (the default: each server thaws once its own snapshot exists) or
    /// `after-every-snapshot` (the thaw barrier: none thaws before every snapshot exists).
    #[serde(default)]
    pub thaw: Option<String>,
    /// Alert (`[notify]`) once this group has had no good backup for this long ("26h"); a
    /// group that never had one counts from the listener's start.
    #[serde(default)]
    pub no_good_backup_after: Option<stillpoint_notify::Period>,
    /// Which backups to keep (`[group.retention]`, README "Retention"); absent: every backup
    /// is kept, nothing is forgotten.
    #[serde(default)]
    pub retention: Option<crate::retention::RetentionConfig>,
}

/// The group's `thaw` values.
pub const THAW_AFTER_OWN: &str = "after-own-snapshot";
pub const THAW_AFTER_EVERY: &str = "after-every-snapshot";

impl GroupConfig {
    /// The required hold; storage-only (none) when absent (an unknown name is a `problems()`
    /// entry, so a validated config never reaches the default by mistake).
    pub fn require_hold(&self) -> Hold {
        self.require_hold.as_deref().and_then(|h| h.parse().ok()).unwrap_or_default()
    }

    pub fn thaw_barrier(&self) -> bool {
        self.thaw.as_deref() == Some(THAW_AFTER_EVERY)
    }
}

/// Milliseconds unless the name says otherwise. See FAULTS.md for where the defaults come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// `L`: how long an agent may stay frozen waiting for Commit.
    pub lease_ms: u64,
    /// `S`: what a snapshot may take inside the lease.
    pub snapshot_budget_ms: u64,
    /// `M`: margin for the network and scheduling.
    pub margin_ms: u64,
    /// Deadline for Abort, Cleanup and Status calls.
    pub rpc_ms: u64,
    /// How long all copies of one backup may take.
    pub copy_timeout_s: u64,
    pub cleanup_timeout_ms: u64,
    /// How often every agent is asked for leftovers (frozen or snapshotted backups the listener
    /// no longer runs) to abort. The first sweep runs at start.
    pub sweep_interval_ms: u64,
    /// How long a copy on an agent (`[copy] on = "agent"`) may go without a message before the
    /// listener fails it: the agent sends progress or a heartbeat at least every 5 s, so longer
    /// silence means the agent hangs or the link is gone even if TCP has not noticed.
    pub agent_copy_silence_ms: u64,
    /// With `[copy] mode = "report"`: how long the backup software may say nothing about a
    /// server's copy (no ReportCopyProgress, no ReportCopy) before that copy fails, instead of
    /// waiting out `copy_timeout_s`.
    pub report_silence_ms: u64,
}

/// The smallest `agent_copy_silence_ms`: twice the agent's heartbeat period (5 s).
pub const MIN_AGENT_COPY_SILENCE_MS: u64 = 10_000;

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            lease_ms: 10_000,
            snapshot_budget_ms: 3_000,
            margin_ms: 1_000,
            rpc_ms: 5_000,
            copy_timeout_s: 6 * 3600,
            cleanup_timeout_ms: 60_000,
            sweep_interval_ms: 60_000,
            agent_copy_silence_ms: 30_000,
            report_silence_ms: 15 * 60_000,
        }
    }
}

impl TimeoutConfig {
    /// `C = L - S - M`, measured from when Prepare was sent.
    pub fn commit_cutoff_ms(&self) -> u64 {
        self.lease_ms.saturating_sub(self.snapshot_budget_ms + self.margin_ms)
    }

    pub fn protocol(&self) -> Timeouts {
        Timeouts {
            lease_ms: self.lease_ms,
            commit_cutoff_ms: self.commit_cutoff_ms(),
            // An agent answers Commit within its snapshot budget; past the lease it refuses anyway.
            commit_timeout_ms: self.lease_ms,
            copy_timeout_ms: self.copy_timeout_s.saturating_mul(1000),
            cleanup_timeout_ms: self.cleanup_timeout_ms,
            inspect_timeout_ms: self.rpc_ms,
        }
    }
}

/// How snapshots are copied.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CopyConfig {
    /// Run `command` once per snapshot, with the snapshot's locator in its environment
    /// (`STILLPOINT_SNAPSHOT`); exit 0 means copied.
    Command { command: Vec<String> },
    /// Wait for the backup software to say `backupctl copied ID --server S`.
    Report,
    /// The built-in block-level copier: every snapshot into a saveset repository.
    Saveset(SavesetConfig),
    /// IDR: a mountable copy of each server's disk, `<target>/<backup>/<server>-<volume>.img`,
    /// a reflink clone where the target's filesystem shares extents with the snapshot, else a
    /// sparse copy. Attach it with `losetup` and use it as it is.
    Image { target: PathBuf },
}

/// `[copy] mode = "saveset"`: where the repository is and what unlocks it. With `on =
/// "listener"` the listener reads each snapshot's locator as a file, so it must see the
/// snapshots (the mock SAN's array); with `on = "agent"` each agent copies its own snapshots
/// into the same repository (its `[saveset]`) and the listener only writes the backup manifest
/// and verifies, so it still unlocks the repository.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavesetConfig {
    /// Where the copy runs.
    #[serde(default)]
    pub on: CopyOn,
    /// The repository's directory (made with `backupctl repo init` or `Repository::init`).
    pub repository: PathBuf,
    /// A file holding the passphrase; one trailing newline is not part of it.
    pub passphrase_file: Option<PathBuf>,
    /// A key file, used whole as the secret. Give this or `passphrase_file`, not both.
    pub key_file: Option<PathBuf>,
    /// What to check after each backup's manifest is written.
    #[serde(default)]
    pub verify: VerifyMode,
    /// Where the copier keeps each volume's base (a reflink clone of the snapshot it last
    /// backed up), so the next backup reads only what changed (FIEMAP); on the snapshots'
    /// filesystem. Absent: no change tracking, every backup reads everything.
    pub base_dir: Option<PathBuf>,
    /// Percent of the chunks skipped thanks to a change map that are re-read and compared
    /// with the parent (the sampling verify; at least 64, at most 64 MiB); 0 disables.
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// MiB the chunk index and each external sort may hold in memory (default 128); a copy's
    /// own buffers come on top (saveset/FORMAT.md, the memory table).
    pub memory_budget_mib: Option<u64>,
}

fn default_sample() -> f64 {
    stillpoint_saveset::DEFAULT_SAMPLE_PERCENT
}

/// Which host reads the snapshots and writes them into the repository.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyOn {
    /// The listener reads every snapshot itself (it must see them: a shared array).
    #[default]
    Listener,
    /// Each server's agent copies its own snapshots (the Copy RPC), for snapshots only that
    /// host can read; the data is encrypted before it leaves the host.
    Agent,
}

/// The check run after every backup in saveset mode; damage fails the backup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyMode {
    None,
    /// Every referenced chunk is indexed and inside a pack that exists.
    #[default]
    Index,
    /// Also read, decrypt and re-hash every referenced chunk.
    ReadData,
}

impl SavesetConfig {
    /// Reads the secret from its file. Never logged: `Secret`'s `Debug` is redacted.
    pub fn secret(&self) -> std::result::Result<Secret, String> {
        use stillpoint_saveset::SecretFileError as E;
        stillpoint_saveset::secret_from_files(
            self.passphrase_file.as_deref(),
            self.key_file.as_deref(),
        )
        .map_err(|e| match e {
            E::Both => "copy: give passphrase_file or key_file, not both".to_string(),
            E::Neither => {
                "copy: saveset mode needs passphrase_file or key_file to unlock the repository"
                    .to_string()
            }
            E::Read { field, error } => format!("copy.{field}: {error}"),
        })
    }

    pub fn open(&self) -> std::result::Result<Pool, String> {
        self.open_in(None)
    }

    /// [`SavesetConfig::open`] with the index cache in `cache_dir` (the listener's
    /// `<data_dir>/cache`; `None`: the user's default cache directory).
    pub fn open_in(&self, cache_dir: Option<&Path>) -> std::result::Result<Pool, String> {
        let (location, secret) = self.location_and_secret()?;
        let memory_budget = self
            .memory_budget_mib
            .map(stillpoint_saveset::memory_budget_from_mib)
            .transpose()
            .map_err(|e| format!("copy.memory_budget_mib: {e}"))?;
        let options = stillpoint_saveset::OpenOptions {
            cache_dir: cache_dir.map(Path::to_path_buf),
            memory_budget,
        };
        Pool::open_with(location, secret, options).map_err(|e| format!("copy.repository: {e}"))
    }

    /// Checks that the secret unlocks the repository, without loading its index: the listener
    /// opens it for real when it starts.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(0.0..=100.0).contains(&self.sample) {
            return Err(format!("copy.sample: {} is not a percentage from 0 to 100", self.sample));
        }
        if let Some(Err(e)) = self.memory_budget_mib.map(stillpoint_saveset::memory_budget_from_mib)
        {
            return Err(format!("copy.memory_budget_mib: {e}"));
        }
        let (location, secret) = self.location_and_secret()?;
        Repository::check_secret(&location, &secret).map_err(|e| format!("copy.repository: {e}"))
    }

    fn location_and_secret(&self) -> std::result::Result<(Location, Secret), String> {
        let secret = self.secret()?;
        let location = Location::from_str(&self.repository.to_string_lossy())
            .map_err(|e| format!("copy.repository: {e}"))?;
        Ok((location, secret))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.display().to_string(),
            problems: e.to_string(),
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.display().to_string(),
            problems: e.to_string(),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Error::Config { path: path.display().to_string(), problems: problems.join("; ") })
        }
    }

    /// Every problem in the config, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.tls.problems("tls");
        if let Some(metrics) = &self.metrics {
            out.extend(metrics.problems(Some(self.listen)));
        }
        let mut names = HashSet::new();
        for s in &self.servers {
            if let Err(e) = stillpoint_core::validate_name("server", &s.name) {
                out.push(format!("server.name: {e}"));
            }
            if s.name == "listener" {
                out.push(
                    "server.name: \"listener\" is reserved for the listener's own certificate"
                        .into(),
                );
            }
            if !names.insert(s.name.as_str()) {
                out.push(format!("server.name: {:?} is listed twice", s.name));
            }
            if !s.address.contains(':') {
                out.push(format!("server {}: address {:?} must be host:port", s.name, s.address));
            }
        }
        let mut groups = HashSet::new();
        for g in &self.groups {
            if let Err(e) = stillpoint_core::validate_name("group", &g.name) {
                out.push(format!("group.name: {e}"));
            }
            if !groups.insert(g.name.as_str()) {
                out.push(format!("group.name: {:?} is listed twice", g.name));
            }
            if g.servers.is_empty() {
                out.push(format!("group {}: has no servers", g.name));
            }
            for s in &g.servers {
                if !names.contains(s.as_str()) {
                    out.push(format!(
                        "group {}: server {s:?} is not in the inventory ([[server]])",
                        g.name
                    ));
                }
            }
            if let Some(Err(e)) = g.require_hold.as_deref().map(str::parse::<Hold>) {
                out.push(format!("group {}: require_hold: {e}", g.name));
            }
            if let Some(thaw) =
                g.thaw.as_deref().filter(|t| ![THAW_AFTER_OWN, THAW_AFTER_EVERY].contains(t))
            {
                out.push(format!(
                    "group {}: thaw: unknown value {}; one of: {THAW_AFTER_OWN}, {THAW_AFTER_EVERY}",
                    g.name,
                    stillpoint_protocol::text::clip(thaw, 40)
                ));
            }
            if let Some(Err(problems)) = g.retention.as_ref().map(|r| r.rules()) {
                for p in problems {
                    out.push(format!("group {}: retention: {p}", g.name));
                }
            }
            let unique: HashSet<_> = g.servers.iter().collect();
            if unique.len() != g.servers.len() {
                out.push(format!("group {}: a server is listed twice", g.name));
            }
        }
        if let Some(notify) = &self.notify {
            out.extend(notify.problems());
        }
        let alerts = self.notify.as_ref().is_some_and(|n| n.has_targets() && n.on.sends(true));
        for g in self.groups.iter().filter(|g| g.no_good_backup_after.is_some() && !alerts) {
            out.push(format!(
                "group {}: no_good_backup_after needs [notify] with an [[notify.email]] or [[notify.webhook]] and on = \"failure\" or \"both\"",
                g.name
            ));
        }
        if self.groups.is_empty() {
            out.push("group: no groups configured; add a [[group]] with name and servers".into());
        }
        let t = &self.timeouts;
        if !(2_000..=60_000).contains(&t.lease_ms) {
            out.push(format!("timeouts.lease_ms: {} is outside 2000..=60000", t.lease_ms));
        }
        if t.commit_cutoff_ms() < 500 {
            out.push(format!(
                "timeouts: lease_ms ({}) - snapshot_budget_ms ({}) - margin_ms ({}) leaves {}ms to gather prepares; it must leave at least 500ms",
                t.lease_ms, t.snapshot_budget_ms, t.margin_ms, i128::from(t.lease_ms) - i128::from(t.snapshot_budget_ms) - i128::from(t.margin_ms)
            ));
        }
        if t.rpc_ms == 0
            || t.copy_timeout_s == 0
            || t.cleanup_timeout_ms == 0
            || t.sweep_interval_ms == 0
        {
            out.push(
                "timeouts: rpc_ms, copy_timeout_s, cleanup_timeout_ms and sweep_interval_ms must be above 0".into(),
            );
        }
        if t.report_silence_ms < 1_000 {
            out.push(format!(
                "timeouts.report_silence_ms: {} is below 1000; the backup software needs time to report",
                t.report_silence_ms
            ));
        }
        if t.agent_copy_silence_ms < MIN_AGENT_COPY_SILENCE_MS {
            out.push(format!(
                "timeouts.agent_copy_silence_ms: {} is below {MIN_AGENT_COPY_SILENCE_MS} (agents send a heartbeat every 5 s; give them at least two)",
                t.agent_copy_silence_ms
            ));
        }
        match &self.copy {
            CopyConfig::Command { command } if command.is_empty() => {
                out.push("copy.command: empty; give the program and its arguments".into());
            }
            CopyConfig::Saveset(saveset) => {
                if let Err(e) = saveset.check() {
                    out.push(e);
                }
            }
            CopyConfig::Image { target } if !target.is_dir() => {
                out.push(format!(
                    "copy.target: {} is not a directory; create it (on the same filesystem as the snapshots for reflink clones)",
                    target.display()
                ));
            }
            CopyConfig::Command { .. } | CopyConfig::Report | CopyConfig::Image { .. } => {}
        }
        self.schedule_problems(&mut out);
        out
    }

    /// The time zone schedules run in: `timezone`, or the system's (UTC when it has none).
    pub fn time_zone(&self) -> std::result::Result<jiff::tz::TimeZone, String> {
        match &self.timezone {
            Some(name) => jiff::tz::TimeZone::get(name).map_err(|e| {
                format!(
                    "timezone: {}: {e}; use an IANA name such as \"Europe/Berlin\" or \"UTC\"",
                    stillpoint_protocol::text::clip(name, 40)
                )
            }),
            None => Ok(jiff::tz::TimeZone::system()),
        }
    }

    /// The schedules, parsed (a validated config has none that fail; those are left out).
    pub fn schedules(&self) -> Vec<crate::schedule::Schedule> {
        self.schedules
            .iter()
            .filter_map(|s| {
                let cron = crate::schedule::Cron::parse(&s.cron).ok()?;
                Some(crate::schedule::Schedule {
                    name: s.name.clone(),
                    group: s.group.clone(),
                    cron,
                    enabled: s.enabled.unwrap_or(true),
                })
            })
            .collect()
    }

    fn schedule_problems(&self, out: &mut Vec<String>) {
        if let Err(e) = self.time_zone() {
            out.push(e);
        }
        let mut names = HashSet::new();
        for s in &self.schedules {
            if let Err(e) = stillpoint_core::validate_name("schedule", &s.name) {
                out.push(format!("schedule.name: {e}"));
            }
            if !names.insert(s.name.as_str()) {
                out.push(format!("schedule.name: {:?} is listed twice", s.name));
            }
            if !self.groups.iter().any(|g| g.name == s.group) {
                out.push(format!(
                    "schedule {}: group {} is not configured ([[group]])",
                    s.name,
                    stillpoint_protocol::text::clip(&s.group, 40)
                ));
            }
            if let Err(e) = crate::schedule::Cron::parse(&s.cron) {
                out.push(format!("schedule {}: cron: {e}", s.name));
            }
        }
    }

    pub fn group(&self, name: &str) -> Result<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name).ok_or_else(|| Error::UnknownGroup {
            group: name.to_string(),
            known: self.groups.iter().map(|g| g.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }
}
