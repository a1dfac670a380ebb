//! The zfs provider: `zfs snapshot` of every configured dataset in one command per pool (atomic
//! across the datasets of a pool; pools are taken one after another), each snapshot named
//! `stillpoint-<backup_id>`, tagged with the user property `stillpoint:backup=<id>` and held
//! (`zfs hold stillpoint-<id>`) so nothing else destroys it; deleted with `zfs release` then
//! `zfs destroy`. It runs the `zfs` program and parses `-H -p` output; no libzfs.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, Context};
use serde::Deserialize;
use stillpoint_core::validate_name;
use stillpoint_proto::Snapshot;
use tracing::info;

use super::SnapshotProvider;

const KIND: &str = "zfs";

/// The user property naming the backup a snapshot belongs to.
const PROPERTY: &str = "stillpoint:backup";

/// `[snapshot] provider = "zfs"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZfsConfig {
    /// The `zfs` program: a name looked up in `PATH`, or an absolute path.
    #[serde(default = "default_program")]
    pub program: PathBuf,
}

fn default_program() -> PathBuf {
    PathBuf::from("zfs")
}

impl ZfsConfig {
    /// Problems with the datasets and the program, one line each naming the field; runs nothing.
    pub fn problems(&self, volumes: &[String], out: &mut Vec<String>) {
        for (i, v) in volumes.iter().enumerate() {
            if let Err(e) = dataset_name(v) {
                out.push(format!("volumes[{i}]: {e}"));
            }
        }
        let program = &self.program;
        let found = if program.is_absolute() {
            program.is_file()
        } else {
            std::env::var_os("PATH")
                .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        };
        if !found {
            out.push(format!(
                "snapshot.program: {} not found (install zfsutils, or give the absolute path of zfs)",
                program.display()
            ));
        }
    }
}

/// A dataset name as `zfs` takes it: `pool/fs/...`, no snapshot part.
fn dataset_name(name: &str) -> anyhow::Result<&str> {
    let ok = !name.is_empty()
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains("//")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(anyhow!(
            "{name:?} is not a ZFS dataset name like tank/vm1 (a filesystem or volume, no @snapshot, no leading /)"
        ))
    }
}

fn pool_of(dataset: &str) -> &str {
    dataset.split('/').next().unwrap_or(dataset)
}

/// One row of `zfs list -H -p -t snapshot -o name,used,referenced,stillpoint:backup`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotRow {
    dataset: String,
    snapshot: String,
    referenced: u64,
    /// The property's value, `None` where it is unset (`-`).
    backup: Option<String>,
}

impl SnapshotRow {
    fn full_name(&self) -> String {
        format!("{}@{}", self.dataset, self.snapshot)
    }

    /// Ours for some backup: the property is set and the name is the one we give it.
    fn backup_id(&self) -> Option<&str> {
        let id = self.backup.as_deref()?;
        (self.snapshot == snapshot_name(id)).then_some(id)
    }
}

fn snapshot_name(backup_id: &str) -> String {
    format!("stillpoint-{backup_id}")
}

fn columns<'a>(line: &'a str, n: usize, what: &str) -> anyhow::Result<Vec<&'a str>> {
    let cols: Vec<&str> = line.split('\t').collect();
    if cols.len() == n {
        Ok(cols)
    } else {
        Err(anyhow!("unexpected line from {what} (want {n} tab-separated columns): {line:?}"))
    }
}

fn parse_snapshots(text: &str) -> anyhow::Result<Vec<SnapshotRow>> {
    let what = "zfs list -t snapshot";
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let c = columns(line, 4, what)?;
            let (dataset, snapshot) = c[0]
                .split_once('@')
                .ok_or_else(|| anyhow!("{what} printed {:?}, which is no snapshot", c[0]))?;
            Ok(SnapshotRow {
                dataset: dataset.to_string(),
                snapshot: snapshot.to_string(),
                referenced: c[2]
                    .parse()
                    .with_context(|| format!("{what}: referenced {:?} of {}", c[2], c[0]))?,
                backup: (c[3] != "-").then(|| c[3].to_string()),
            })
        })
        .collect()
}

/// `zfs list -H -p -o name,type,mountpoint`: dataset → (type, mountpoint).
fn parse_datasets(text: &str) -> anyhow::Result<BTreeMap<String, (String, String)>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let c = columns(line, 3, "zfs list -o name,type,mountpoint")?;
            Ok((c[0].to_string(), (c[1].to_string(), c[2].to_string())))
        })
        .collect()
}

/// `zfs holds -H`: the (snapshot, tag) pairs.
fn parse_holds(text: &str) -> anyhow::Result<HashSet<(String, String)>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let c = columns(line, 3, "zfs holds")?;
            Ok((c[0].to_string(), c[1].to_string()))
        })
        .collect()
}

/// Where a copy finds a snapshot: a zvol snapshot's device (with `snapdev=visible`), a mounted
/// filesystem's `.zfs/snapshot` directory, else the ZFS name itself (for `zfs send`).
fn locator(kind: Option<&(String, String)>, row: &SnapshotRow) -> String {
    match kind {
        Some((t, _)) if t == "volume" => format!("/dev/zvol/{}", row.full_name()),
        Some((t, mountpoint)) if t == "filesystem" && mountpoint.starts_with('/') => {
            format!("{}/.zfs/snapshot/{}", mountpoint.trim_end_matches('/'), row.snapshot)
        }
        _ => row.full_name(),
    }
}

/// Snapshots the configured datasets.
pub struct Zfs {
    program: PathBuf,
    datasets: Vec<String>,
}

impl Zfs {
    /// `datasets` are the configured volumes: `list` and `delete` look at their snapshots.
    pub fn new(config: &ZfsConfig, datasets: &[String]) -> Zfs {
        Zfs { program: config.program.clone(), datasets: datasets.to_vec() }
    }

    /// Runs `zfs <args>`: its stdout, or an error with its stderr.
    fn zfs(&self, args: &[&str]) -> anyhow::Result<String> {
        let (stdout, stderr, ok) = self.run(args)?;
        if ok {
            Ok(stdout)
        } else {
            Err(anyhow!("zfs {} failed: {}", args.join(" "), stderr.trim()))
        }
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<(String, String, bool)> {
        let out = Command::new(&self.program)
            .args(args)
            .output()
            .with_context(|| format!("run {} (is zfsutils installed?)", self.program.display()))?;
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        ))
    }

    fn datasets(&self, datasets: &[&str]) -> anyhow::Result<BTreeMap<String, (String, String)>> {
        let mut args = vec!["list", "-H", "-p", "-o", "name,type,mountpoint"];
        args.extend(datasets);
        parse_datasets(&self.zfs(&args)?)
    }

    /// The snapshots of `datasets` (not of their children). With `tolerate_missing`, a dataset
    /// that no longer exists has none instead of failing the whole listing.
    fn snapshots(
        &self,
        datasets: &[&str],
        tolerate_missing: bool,
    ) -> anyhow::Result<Vec<SnapshotRow>> {
        let column = format!("name,used,referenced,{PROPERTY}");
        let mut args = vec!["list", "-H", "-p", "-t", "snapshot", "-o", &column, "-d", "1"];
        args.extend(datasets);
        let (stdout, stderr, ok) = self.run(&args)?;
        let only_missing = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| l.ends_with("dataset does not exist"));
        let tolerated = tolerate_missing && only_missing;
        if !ok && !tolerated {
            return Err(anyhow!("zfs {} failed: {}", args.join(" "), stderr.trim()));
        }
        Ok(parse_snapshots(&stdout)?
            .into_iter()
            .filter(|r| datasets.contains(&r.dataset.as_str()))
            .collect())
    }

    fn configured(&self) -> Vec<&str> {
        self.datasets.iter().map(String::as_str).collect()
    }

    /// Which of `names` carry hold `tag`.
    fn held(&self, names: &[String], tag: &str) -> anyhow::Result<Vec<String>> {
        let mut args = vec!["holds", "-H"];
        args.extend(names.iter().map(String::as_str));
        let holds = parse_holds(&self.zfs(&args)?)?;
        Ok(names
            .iter()
            .filter(|n| holds.contains(&(n.to_string(), tag.to_string())))
            .cloned()
            .collect())
    }
}

impl SnapshotProvider for Zfs {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>> {
        validate_name("backup id", backup_id)?;
        let volumes: Vec<&str> =
            volumes.iter().map(|v| dataset_name(v)).collect::<Result<_, _>>()?;
        let name = snapshot_name(backup_id);
        let kinds = self.datasets(&volumes).context("look up the datasets to snapshot")?;
        let existing: HashSet<String> =
            self.snapshots(&volumes, false)?.iter().map(SnapshotRow::full_name).collect();
        // One command per pool: `zfs snapshot` is atomic across the datasets of one pool only.
        let mut by_pool: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for v in &volumes {
            let full = format!("{v}@{name}");
            if !existing.contains(&full) {
                by_pool.entry(pool_of(v)).or_default().push(full);
            }
        }
        if by_pool.len() > 1 {
            info!(backup = backup_id, pools = by_pool.len(), "datasets in several pools: one atomic zfs snapshot per pool, taken one after another");
        }
        let property = format!("{PROPERTY}={backup_id}");
        for (pool, snaps) in &by_pool {
            let mut args = vec!["snapshot", "-o", &property];
            args.extend(snaps.iter().map(String::as_str));
            self.zfs(&args).with_context(|| format!("snapshot the datasets of pool {pool}"))?;
        }
        let all: Vec<String> = volumes.iter().map(|v| format!("{v}@{name}")).collect();
        let held = self.held(&all, &name)?;
        let unheld: Vec<&str> =
            all.iter().filter(|s| !held.contains(s)).map(String::as_str).collect();
        if !unheld.is_empty() {
            let mut args = vec!["hold", name.as_str()];
            args.extend(unheld);
            self.zfs(&args).context("hold the snapshots")?;
        }
        let rows = self.snapshots(&volumes, false)?;
        volumes
            .iter()
            .map(|v| {
                let row = rows.iter().find(|r| r.dataset == *v && r.snapshot == name).ok_or_else(
                    || anyhow!("snapshot {v}@{name} is missing right after it was made"),
                )?;
                Ok(Snapshot {
                    volume: v.to_string(),
                    provider: KIND.into(),
                    locator: locator(kinds.get(*v), row),
                    size_bytes: row.referenced,
                })
            })
            .collect()
    }

    fn delete(&self, backup_id: &str) -> anyhow::Result<u32> {
        validate_name("backup id", backup_id)?;
        let name = snapshot_name(backup_id);
        let ours: Vec<String> = self
            .snapshots(&self.configured(), true)?
            .iter()
            .filter(|r| r.backup_id() == Some(backup_id))
            .map(SnapshotRow::full_name)
            .collect();
        if ours.is_empty() {
            return Ok(0);
        }
        let held = self.held(&ours, &name)?;
        if !held.is_empty() {
            let mut args = vec!["release", name.as_str()];
            args.extend(held.iter().map(String::as_str));
            self.zfs(&args).context("release the snapshots' holds")?;
        }
        let mut deleted = 0;
        for snap in &ours {
            self.zfs(&["destroy", snap]).with_context(|| format!("destroy {snap}"))?;
            deleted += 1;
        }
        Ok(deleted)
    }

    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
        let configured = self.configured();
        let rows = self.snapshots(&configured, true)?;
        if !rows.iter().any(|r| r.backup_id().is_some()) {
            return Ok(Vec::new());
        }
        let kinds = self.datasets(&configured).unwrap_or_default();
        Ok(rows
            .iter()
            .filter_map(|r| {
                let id = r.backup_id()?;
                let snap = Snapshot {
                    volume: r.dataset.clone(),
                    provider: KIND.into(),
                    locator: locator(kinds.get(&r.dataset), r),
                    size_bytes: r.referenced,
                };
                Some((id.to_string(), snap))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests;
