//! The btrfs provider: a read-only subvolume snapshot per volume at
//! `<snapshot_dir>/<backup_id>/<basename of volume>`, made and deleted with `btrfs subvolume`.
//! Snapshots are atomic per subvolume, so this provider needs no fsfreeze (and must not have one
//! on the same filesystem: a snapshot of a frozen btrfs would wait for ever).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, Context};
use stillpoint_core::validate_name;
use stillpoint_proto::Snapshot;

use super::{basename, SnapshotProvider};

const KIND: &str = "btrfs";

/// Snapshots subvolumes into `snapshot_dir`.
pub struct Btrfs {
    snapshot_dir: PathBuf,
}

impl Btrfs {
    pub fn new(snapshot_dir: PathBuf) -> Btrfs {
        Btrfs { snapshot_dir }
    }

    fn backup_dir(&self, backup_id: &str) -> anyhow::Result<PathBuf> {
        validate_name("backup id", backup_id)?;
        Ok(self.snapshot_dir.join(backup_id))
    }
}

/// Runs `btrfs <args>`, turning a failure into an error with its stderr.
fn btrfs(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("btrfs")
        .args(args)
        .output()
        .context("run btrfs (is btrfs-progs installed?)")?;
    if out.status.success() {
        Ok(())
    } else {
        Err(anyhow!(
            "btrfs {} failed with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn snapshot_of(volume: String, path: &Path) -> Snapshot {
    Snapshot {
        volume,
        provider: KIND.into(),
        locator: path.display().to_string(),
        // Shared extents make a btrfs snapshot's own size meaningless until it is copied.
        size_bytes: 0,
    }
}

fn subdirs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(anyhow!("list {}: {e}", dir.display())),
    };
    out.sort();
    Ok(out)
}

impl SnapshotProvider for Btrfs {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>> {
        let dir = self.backup_dir(backup_id)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut out = Vec::new();
        for volume in volumes {
            let target = dir.join(basename(volume)?);
            if !target.exists() {
                let target_str =
                    target.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", target.display()))?;
                btrfs(&["subvolume", "snapshot", "-r", volume, target_str])
                    .with_context(|| format!("snapshot {volume}"))?;
            }
            out.push(snapshot_of(basename(volume)?.to_string(), &target));
        }
        Ok(out)
    }

    fn delete(&self, backup_id: &str) -> anyhow::Result<u32> {
        let dir = self.backup_dir(backup_id)?;
        let mut deleted = 0;
        for snap in subdirs(&dir)? {
            let path = snap.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", snap.display()))?;
            btrfs(&["subvolume", "delete", path])
                .with_context(|| format!("delete snapshot {path}"))?;
            deleted += 1;
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!("remove {}: {e}", dir.display())),
        }
        Ok(deleted)
    }

    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
        let mut out = Vec::new();
        for backup_dir in subdirs(&self.snapshot_dir)? {
            let backup = backup_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if validate_name("backup id", backup).is_err() {
                continue;
            }
            for snap in subdirs(&backup_dir)? {
                let volume = snap.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                out.push((backup.to_string(), snapshot_of(volume.to_string(), &snap)));
            }
        }
        Ok(out)
    }
}
