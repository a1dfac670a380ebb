//! The vss provider (Windows only, `#[cfg(windows)]`): a Volume Shadow Copy per volume through
//! `vssadmin create shadow /for=<volume>` (Windows Server), recorded in
//! `<state_dir>/<backup_id>.vss` so list and delete find them by backup id. Neither compiled nor
//! tested on the Linux machines stillpoint is built and tested on; see README.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, Context};
use serde::Deserialize;
use stillpoint_core::validate_name;
use stillpoint_proto::Snapshot;

use super::SnapshotProvider;

const KIND: &str = "vss";

/// `[snapshot] provider = "vss"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VssConfig {
    /// Where the record of each backup's shadow copies is kept.
    pub state_dir: PathBuf,
}

impl VssConfig {
    pub fn problems(&self, volumes: &[String], out: &mut Vec<String>) {
        if !self.state_dir.is_absolute() || !self.state_dir.is_dir() {
            out.push(format!(
                "snapshot.state_dir: {} is not an existing absolute directory",
                self.state_dir.display()
            ));
        }
        for (i, v) in volumes.iter().enumerate() {
            if !(v.len() == 2 && v.ends_with(':') && v.as_bytes()[0].is_ascii_alphabetic()) {
                out.push(format!("volumes[{i}]: {v:?} is not a drive like C:"));
            }
        }
    }
}

/// One shadow copy: the volume, its shadow copy id, its device path (what a copy reads).
struct Shadow {
    volume: String,
    id: String,
    device: String,
}

pub struct Vss {
    state_dir: PathBuf,
}

impl Vss {
    pub fn new(config: &VssConfig) -> Vss {
        Vss { state_dir: config.state_dir.clone() }
    }

    fn record(&self, backup_id: &str) -> anyhow::Result<PathBuf> {
        validate_name("backup id", backup_id)?;
        Ok(self.state_dir.join(format!("{backup_id}.vss")))
    }
}

fn read_record(path: &Path) -> anyhow::Result<Vec<Shadow>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow!("read {}: {e}", path.display())),
    };
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            match (f.next(), f.next(), f.next()) {
                (Some(volume), Some(id), Some(device)) => {
                    Ok(Shadow { volume: volume.into(), id: id.into(), device: device.into() })
                }
                _ => Err(anyhow!("{}: unreadable line {l:?}", path.display())),
            }
        })
        .collect()
}

fn write_record(path: &Path, shadows: &[Shadow]) -> anyhow::Result<()> {
    let text: String =
        shadows.iter().map(|s| format!("{}\t{}\t{}\n", s.volume, s.id, s.device)).collect();
    let tmp = path.with_extension("vss.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename {}", tmp.display()))
}

fn vssadmin(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("vssadmin").args(args).output().context("run vssadmin")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(anyhow!("vssadmin {} failed with {}: {}", args.join(" "), out.status, stdout.trim()))
    }
}

/// The value after `label:` on the first line that has it (vssadmin's English output).
fn field(text: &str, label: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(|v| v.trim_start_matches(':').trim().to_string())
}

fn snapshot_of(s: &Shadow) -> Snapshot {
    Snapshot {
        volume: s.volume.clone(),
        provider: KIND.into(),
        locator: s.device.clone(),
        size_bytes: 0,
    }
}

impl SnapshotProvider for Vss {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>> {
        let path = self.record(backup_id)?;
        let mut shadows = read_record(&path)?;
        for volume in volumes {
            if shadows.iter().any(|s| &s.volume == volume) {
                continue;
            }
            let out = vssadmin(&["create", "shadow", &format!("/for={volume}")])
                .with_context(|| format!("snapshot {volume}"))?;
            let id = field(&out, "Shadow Copy ID")
                .ok_or_else(|| anyhow!("vssadmin printed no Shadow Copy ID: {out}"))?;
            let device = field(&out, "Shadow Copy Volume Name")
                .ok_or_else(|| anyhow!("vssadmin printed no Shadow Copy Volume Name: {out}"))?;
            shadows.push(Shadow { volume: volume.clone(), id, device });
            // Recorded at once, so a failure on the next volume can still delete this one.
            write_record(&path, &shadows)?;
        }
        Ok(volumes
            .iter()
            .filter_map(|v| shadows.iter().find(|s| &s.volume == v))
            .map(snapshot_of)
            .collect())
    }

    fn delete(&self, backup_id: &str) -> anyhow::Result<u32> {
        let path = self.record(backup_id)?;
        let mut shadows = read_record(&path)?;
        let mut deleted = 0;
        // One at a time, the record rewritten after each, so a repeat after a failure does not
        // ask vssadmin for a shadow copy that is already gone.
        while let Some(s) = shadows.pop() {
            vssadmin(&["delete", "shadows", &format!("/shadow={}", s.id), "/quiet"])
                .with_context(|| format!("delete shadow copy {} of {}", s.id, s.volume))?;
            deleted += 1;
            write_record(&path, &shadows)?;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!("remove {}: {e}", path.display())),
        }
        Ok(deleted)
    }

    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.state_dir) {
            Ok(e) => e,
            Err(e) => return Err(anyhow!("list {}: {e}", self.state_dir.display())),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(id) =
                path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".vss"))
            else {
                continue;
            };
            for s in read_record(&path)? {
                out.push((id.to_string(), snapshot_of(&s)));
            }
        }
        Ok(out)
    }
}
