//! The agent's TOML config: which server it is, where it listens, its certificates, the
//! quiescers to run in order, the snapshot provider, and the optional saveset repository it
//! copies its own snapshots into. `validate()` reports every problem at once, one line each
//! naming the field; nothing here acts on the system (the repository is unlocked by `run`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use stillpoint_core::tls::TlsFiles;
use stillpoint_core::validate_name;
use stillpoint_saveset::{Location, Pool, Secret};

use crate::{Error, Result};

/// The shortest lease a Prepare may ask for, in milliseconds.
pub const MIN_LEASE_MS: u64 = 1000;

/// One agent's configuration, passed explicitly to [`crate::run`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This server's name, as the listener and the certificates know it.
    pub server: String,
    /// Address to listen on, e.g. `0.0.0.0:7501`.
    pub listen: String,
    /// Prepare is refused when it asks for a lease outside `MIN_LEASE_MS..=max_lease_ms`.
    #[serde(default = "default_max_lease_ms")]
    pub max_lease_ms: u64,
    /// What the provider snapshots: LUN names for mock-san, subvolume paths for btrfs, image
    /// file paths for reflink and qcow2, datasets for zfs, `vg/lv` for lvm.
    pub volumes: Vec<String>,
    pub tls: TlsFiles,
    /// Quiescers, frozen in this order and thawed in reverse.
    #[serde(default, rename = "quiescer")]
    pub quiescers: Vec<QuiescerConfig>,
    pub snapshot: SnapshotConfig,
    /// Where the freeze journal and the guardian's pidfile live; created if missing.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The repository the Copy RPC writes this server's snapshots into, for a listener whose
    /// `[copy] mode = "saveset"` runs `on = "agent"`; without it Copy is refused.
    #[serde(default)]
    pub saveset: Option<SavesetConfig>,
    /// `[metrics]`: the Prometheus endpoint; absent, there is none.
    #[serde(default)]
    pub metrics: Option<stillpoint_core::metrics::MetricsConfig>,
}

/// `[saveset]`: where the repository is and what unlocks it. The copy runs on this host, so
/// snapshots only this host can read (local providers) are encrypted before anything leaves it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavesetConfig {
    /// An absolute directory, or `s3://bucket[/prefix]` (endpoint and credentials from the
    /// environment, as for `backupctl repo`). Made with `backupctl repo init`.
    pub repository: String,
    /// A file holding the passphrase; one trailing newline is not part of it.
    pub passphrase_file: Option<PathBuf>,
    /// A key file, used whole as the secret. Give this or `passphrase_file`, not both.
    pub key_file: Option<PathBuf>,
    /// Test and demo knob: pause this long after every MiB copied, like a slow disk, so a
    /// test can act while a copy runs.
    #[serde(default)]
    pub copy_delay_ms_per_mib: u64,
    /// Change tracking: where the copier keeps each volume's base (a reflink clone of the
    /// snapshot it last backed up, on the snapshots' filesystem), so the next backup reads only
    /// what changed (FIEMAP). For qcow2 volumes the base is an internal snapshot
    /// `stillpoint.base.<group>` in the disk itself, for LVM thin volumes a thin snapshot
    /// `<lv>.stillpoint.base.<group>` in the pool, and this directory holds only its record
    /// (the manifest it went into, its identity); the map comes from the image's cluster
    /// tables or the pool's mappings (`thin_delta`). Absent: no change tracking, every backup
    /// reads everything.
    pub base_dir: Option<PathBuf>,
    /// Percent of the chunks skipped thanks to a change map that are re-read and compared
    /// (the sampling verify; at least 64, at most 64 MiB); 0 disables.
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// MiB the chunk index and each external sort may hold in memory (default 128); a copy's
    /// own buffers come on top (saveset/FORMAT.md, the memory table).
    pub memory_budget_mib: Option<u64>,
}

fn default_sample() -> f64 {
    stillpoint_saveset::DEFAULT_SAMPLE_PERCENT
}

impl SavesetConfig {
    /// Where the repository is; an error names the field.
    pub fn location(&self) -> Result<Location, String> {
        if self.repository.trim().is_empty() {
            return Err(
                "saveset.repository: empty; give an absolute directory or s3://bucket/prefix"
                    .into(),
            );
        }
        let location: Location =
            self.repository.parse().map_err(|e| format!("saveset.repository: {e}"))?;
        if let Location::Local(path) = &location {
            if !path.is_absolute() {
                return Err(format!(
                    "saveset.repository: {} is not an absolute path (or s3://bucket/prefix)",
                    path.display()
                ));
            }
        }
        Ok(location)
    }

    /// Reads the secret from its file. Never logged: `Secret`'s `Debug` is redacted.
    pub fn secret(&self) -> Result<Secret, String> {
        use stillpoint_saveset::SecretFileError as E;
        stillpoint_saveset::secret_from_files(
            self.passphrase_file.as_deref(),
            self.key_file.as_deref(),
        )
        .map_err(|e| match e {
            E::Both => "saveset: give passphrase_file or key_file, not both".to_string(),
            E::Neither => {
                "saveset: give passphrase_file or key_file to unlock the repository".to_string()
            }
            E::Read { field, error } => format!("saveset.{field}: {error}"),
        })
    }

    /// Reads the secret and unlocks the repository (one argon2id run); a wrong secret is an
    /// error naming the repository, never the secret.
    pub fn open(&self) -> Result<Pool, String> {
        self.open_in(None)
    }

    /// [`SavesetConfig::open`] with the index cache in `cache_dir` (the agent's
    /// `<state_dir>/cache`; `None`: the user's default cache directory).
    pub fn open_in(&self, cache_dir: Option<&std::path::Path>) -> Result<Pool, String> {
        let location = self.location()?;
        let secret = self.secret()?;
        let memory_budget = self
            .memory_budget_mib
            .map(stillpoint_saveset::memory_budget_from_mib)
            .transpose()
            .map_err(|e| format!("saveset.memory_budget_mib: {e}"))?;
        let options = stillpoint_saveset::OpenOptions {
            cache_dir: cache_dir.map(std::path::Path::to_path_buf),
            memory_budget,
        };
        Pool::open_with(location, secret, options).map_err(|e| format!("saveset.repository: {e}"))
    }

    /// Field problems, without touching the repository (`run` unlocks it once at start).
    fn problems(&self, out: &mut Vec<String>) {
        if !(0.0..=100.0).contains(&self.sample) {
            out.push(format!("saveset.sample: {} is not a percentage from 0 to 100", self.sample));
        }
        if let Some(Err(e)) = self.memory_budget_mib.map(stillpoint_saveset::memory_budget_from_mib)
        {
            out.push(format!("saveset.memory_budget_mib: {e}"));
        }
        if let Err(e) = self.location() {
            out.push(e);
        }
        if let Err(e) = self.secret() {
            out.push(e);
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/stillpoint-agent")
}

fn default_max_lease_ms() -> u64 {
    60_000
}

fn default_timeout_ms() -> u64 {
    30_000
}

/// One `[[quiescer]]` table, by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum QuiescerConfig {
    /// Runs a command before the freeze and another after the thaw.
    Exec {
        name: String,
        #[serde(default)]
        pre_freeze: Option<Vec<String>>,
        #[serde(default)]
        post_thaw: Option<Vec<String>>,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Files the commands write to `$STILLPOINT_ARTIFACTS_DIR` (a fresh directory per
        /// backup under this one) become the backup's artifacts, restored beside the volumes.
        #[serde(default)]
        artifacts_dir: Option<PathBuf>,
    },
    /// Freezes the filesystem mounted at `mount` (FIFREEZE).
    Fsfreeze { mount: PathBuf },
    /// For applications without hooks: SIGSTOPs the process whose pid is in `pidfile` (read at
    /// freeze time) and SIGCONTs it on thaw.
    Stop { name: String, pidfile: PathBuf },
    /// Holds PostgreSQL in backup mode on a connection (or checkpoints it, in atomic mode).
    Postgres(crate::quiesce::postgres::PostgresConfig),
    /// Holds a write transaction on SQLite databases from freeze to thaw (`quiesce::sqlite`).
    Sqlite(crate::quiesce::sqlite::SqliteConfig),
    /// Stops an application's processes found by name, executable or pidfile, with a lock-out
    /// (`quiesce::process`).
    Process(crate::quiesce::process::ProcessConfig),
    /// MySQL or MariaDB: the server's backup lock on one connection, held until the thaw.
    Mysql(crate::quiesce::mysql::MysqlConfig),
    /// Redis: a completed save, then writes paused for at most `pause_ms`.
    Redis(crate::quiesce::redis::RedisConfig),
}

impl QuiescerConfig {
    /// The name steps and reasons use for this quiescer.
    pub fn name(&self) -> String {
        match self {
            QuiescerConfig::Exec { name, .. } | QuiescerConfig::Stop { name, .. } => name.clone(),
            QuiescerConfig::Sqlite(c) => c.name.clone(),
            QuiescerConfig::Process(c) => c.name.clone(),
            QuiescerConfig::Fsfreeze { mount } => format!("fsfreeze {}", mount.display()),
            QuiescerConfig::Postgres(pg) => pg.name.clone(),
            QuiescerConfig::Mysql(c) => c.name.clone(),
            QuiescerConfig::Redis(c) => c.name.clone(),
        }
    }
}

/// The `[snapshot]` table, by `provider`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "provider", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SnapshotConfig {
    /// The mock SAN array in `array`; LUNs are `luns/<server>/<volume>.lun`.
    MockSan {
        array: PathBuf,
        /// Test and demo knob: sleep this long before each snapshot, like a slow array.
        #[serde(default)]
        snapshot_delay_ms: u64,
    },
    /// btrfs read-only snapshots at `<snapshot_dir>/<backup_id>/<basename of volume>`.
    Btrfs { snapshot_dir: PathBuf },
    /// Reflink clones of image files at `<snapshot_dir>/<backup_id>/<basename of volume>`.
    Reflink(crate::snapshot::reflink::ReflinkConfig),
    /// ZFS snapshots of datasets, one atomic `zfs snapshot` per pool.
    Zfs(crate::snapshot::zfs::ZfsConfig),
    /// Internal snapshots of qcow2 disk files no VM has open for writing.
    Qcow2(crate::snapshot::qcow2::Qcow2Config),
    /// Windows Volume Shadow Copies through vssadmin; Windows only, not built here.
    #[cfg(windows)]
    Vss(crate::snapshot::vss::VssConfig),
    /// LVM snapshots of `vg/lv` volumes, thick or thin as `lvs` says.
    Lvm(crate::snapshot::lvm::LvmConfig),
}

impl Config {
    /// Reads and parses a config file; does not validate it.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config { path: path.into(), reason: e.to_string() })?;
        Config::parse(&text).map_err(|reason| Error::Config { path: path.into(), reason })
    }

    /// Parses config text; the error is toml's message, which names the line and field.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Every problem with this config, one line each naming the field; empty when it is usable.
    /// Checks files and directories exist, but changes nothing (the reflink provider's probe
    /// clone is made and removed at once).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = validate_name("server", &self.server) {
            out.push(format!("server: {e}"));
        }
        if let Err(e) = self.listen.parse::<SocketAddr>() {
            out.push(format!("listen: {:?} is not an address like 0.0.0.0:7501: {e}", self.listen));
        }
        if self.max_lease_ms < MIN_LEASE_MS {
            out.push(format!(
                "max_lease_ms: {} is below the minimum {MIN_LEASE_MS}",
                self.max_lease_ms
            ));
        }
        if self.volumes.is_empty() {
            out.push("volumes: list at least one volume to snapshot".into());
        }
        if !self.state_dir.is_absolute() {
            out.push(format!("state_dir: {} is not an absolute path", self.state_dir.display()));
        }
        out.extend(self.tls.problems("tls"));
        self.quiescer_problems(&mut out);
        self.snapshot_problems(&mut out);
        if let Some(saveset) = &self.saveset {
            saveset.problems(&mut out);
        }
        if let Some(metrics) = &self.metrics {
            out.extend(metrics.problems(self.listen.parse().ok()));
        }
        out
    }

    /// Like [`Config::problems`], as an error when there are any.
    pub fn validate(&self) -> Result<()> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(problems))
        }
    }

    fn quiescer_problems(&self, out: &mut Vec<String>) {
        let mut names = HashSet::new();
        for (i, q) in self.quiescers.iter().enumerate() {
            let at = format!("quiescer[{i}]");
            if !names.insert(q.name()) {
                out.push(format!("{at}: {:?} appears twice", q.name()));
            }
            match q {
                QuiescerConfig::Exec { name, pre_freeze, post_thaw, timeout_ms, artifacts_dir } => {
                    if let Err(e) = validate_name("quiescer name", name) {
                        out.push(format!("{at}.name: {e}"));
                    }
                    if artifacts_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
                        out.push(format!("{at}.artifacts_dir: give an absolute path"));
                    }
                    if pre_freeze.is_none() && post_thaw.is_none() {
                        out.push(format!(
                            "{at}: exec quiescer {name} has neither pre_freeze nor post_thaw"
                        ));
                    }
                    for (field, argv) in [("pre_freeze", pre_freeze), ("post_thaw", post_thaw)] {
                        if argv.as_ref().is_some_and(|a| a.is_empty() || a[0].is_empty()) {
                            out.push(format!("{at}.{field}: give the program and its arguments, e.g. [\"/bin/sh\", \"-c\", \"...\"]"));
                        }
                    }
                    if *timeout_ms == 0 {
                        out.push(format!("{at}.timeout_ms: must be above 0"));
                    }
                }
                QuiescerConfig::Stop { name, pidfile } => {
                    if let Err(e) = validate_name("quiescer name", name) {
                        out.push(format!("{at}.name: {e}"));
                    }
                    if !pidfile.is_absolute() {
                        out.push(format!(
                            "{at}.pidfile: {} is not an absolute path",
                            pidfile.display()
                        ));
                    }
                }
                QuiescerConfig::Postgres(pg) => pg.problems(&at, out),
                QuiescerConfig::Sqlite(c) => {
                    c.problems(&at, out);
                    let paths: Vec<&Path> = c.databases.iter().map(PathBuf::as_path).collect();
                    out.extend(self.after_fsfreeze(i, &at, &paths));
                }
                QuiescerConfig::Process(c) => {
                    c.problems(&at, self.max_lease_ms, out);
                    let paths: Vec<&Path> =
                        c.lockout_executable.iter().map(PathBuf::as_path).collect();
                    out.extend(self.after_fsfreeze(i, &at, &paths));
                }
                QuiescerConfig::Mysql(c) => c.problems(&at, self.max_lease_ms, out),
                QuiescerConfig::Redis(c) => c.problems(&at, self.max_lease_ms, out),
                QuiescerConfig::Fsfreeze { mount } => {
                    if !mount.is_absolute() {
                        out.push(format!(
                            "{at}.mount: {} is not an absolute path",
                            mount.display()
                        ));
                    } else if !mount.is_dir() {
                        out.push(format!("{at}.mount: {} is not a directory", mount.display()));
                    }
                }
            }
        }
    }

    /// Problems for quiescer `i` when one of `paths` lies on a filesystem an fsfreeze quiescer
    /// before it freezes: its own freeze would then write there and wait for a thaw that waits
    /// for it. For the sqlite (checkpoints) and process (chmod lock-out) quiescers.
    fn after_fsfreeze(&self, i: usize, at: &str, paths: &[&Path]) -> Vec<String> {
        let mut out = Vec::new();
        for q in self.quiescers.iter().take(i) {
            let QuiescerConfig::Fsfreeze { mount } = q else { continue };
            let Ok(frozen) = std::fs::metadata(mount) else { continue };
            for path in paths {
                if std::fs::metadata(path).is_ok_and(|m| m.dev() == frozen.dev()) {
                    out.push(format!(
                        "{at}: {} is on the filesystem that fsfreeze {} freezes before it; list this quiescer before the fsfreeze (its freeze writes there)",
                        path.display(),
                        mount.display()
                    ));
                }
            }
        }
        out
    }

    /// The mounts that fsfreeze quiescers freeze.
    fn frozen_mounts(&self) -> Vec<&Path> {
        self.quiescers
            .iter()
            .filter_map(|q| match q {
                QuiescerConfig::Fsfreeze { mount } => Some(mount.as_path()),
                _ => None,
            })
            .collect()
    }

    fn snapshot_problems(&self, out: &mut Vec<String>) {
        match &self.snapshot {
            SnapshotConfig::Reflink(c) => c.problems(&self.volumes, &self.frozen_mounts(), out),
            SnapshotConfig::Zfs(c) => c.problems(&self.volumes, out),
            SnapshotConfig::Qcow2(c) => c.problems(&self.volumes, out),
            #[cfg(windows)]
            SnapshotConfig::Vss(c) => c.problems(&self.volumes, out),
            SnapshotConfig::Lvm(lvm) => lvm.problems(&self.volumes, out),
            SnapshotConfig::MockSan { array, .. } => {
                for (i, v) in self.volumes.iter().enumerate() {
                    if let Err(e) = validate_name("volume", v) {
                        out.push(format!("volumes[{i}]: {e}"));
                    }
                }
                match stillpoint_core::san::Array::open(array) {
                    Err(e) => out.push(format!("snapshot.array: {e}")),
                    Ok(a) => {
                        if let Err(e) = a.check_clones() {
                            out.push(format!("snapshot.array: {e}"));
                        }
                        for v in &self.volumes {
                            match a.lun_path(&self.server, v) {
                                Ok(p) if !p.is_file() => out.push(format!(
                                    "volumes: LUN {v} of server {} does not exist at {}",
                                    self.server,
                                    p.display()
                                )),
                                _ => {}
                            }
                        }
                    }
                }
            }
            SnapshotConfig::Btrfs { snapshot_dir } => {
                if !snapshot_dir.is_absolute() || !snapshot_dir.is_dir() {
                    out.push(format!(
                        "snapshot.snapshot_dir: {} is not an existing absolute directory",
                        snapshot_dir.display()
                    ));
                }
                let mut bases = HashSet::new();
                for (i, v) in self.volumes.iter().enumerate() {
                    let path = Path::new(v);
                    let base = path.file_name().and_then(|b| b.to_str()).unwrap_or_default();
                    if !path.is_absolute() || !path.is_dir() {
                        out.push(format!("volumes[{i}]: {v} is not an existing absolute directory (a btrfs subvolume)"));
                    } else if let Err(e) = validate_name("volume basename", base) {
                        out.push(format!("volumes[{i}]: {e}"));
                    } else if !bases.insert(base.to_string()) {
                        out.push(format!("volumes[{i}]: another volume is also named {base}; snapshots are named by basename"));
                    }
                }
                // A btrfs snapshot of a frozen btrfs waits for the thaw that waits for it.
                let frozen: Vec<(u64, &Path)> = self
                    .frozen_mounts()
                    .into_iter()
                    .filter_map(|m| Some((std::fs::metadata(m).ok()?.dev(), m)))
                    .collect();
                let paths = std::iter::once(("snapshot.snapshot_dir", snapshot_dir.as_path()))
                    .chain(self.volumes.iter().map(|v| ("volumes", Path::new(v.as_str()))));
                for (field, path) in paths {
                    let Ok(meta) = std::fs::metadata(path) else { continue };
                    for (dev, mount) in &frozen {
                        if meta.dev() == *dev {
                            out.push(format!(
                                "{field}: {} is on the filesystem that fsfreeze {} freezes; a btrfs snapshot there would deadlock (btrfs snapshots are consistent without fsfreeze)",
                                path.display(),
                                mount.display()
                            ));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
