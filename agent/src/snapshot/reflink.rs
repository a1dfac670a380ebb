//! The reflink provider: a point-in-time clone (FICLONE, shared extents, never a copy) of each
//! image file (VM disk, LUN file) at `<snapshot_dir>/<backup_id>/<basename>`, read-only, on the
//! same XFS or btrfs filesystem. One clone is atomic for its file; several files are cloned one
//! after another, so what makes them consistent with each other is the quiescers.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use serde::Deserialize;
use stillpoint_core::validate_name;
use stillpoint_proto::Snapshot;

use super::{basename, SnapshotProvider};

const KIND: &str = "reflink";

/// A clone being made: renamed to its final name only once complete, so a clone that exists
/// under its final name is whole (an agent killed mid-clone leaves only this, which `delete`
/// removes and `list` ignores).
const PARTIAL: &str = ".partial";

/// `[snapshot] provider = "reflink"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReflinkConfig {
    /// Where clones go, `<snapshot_dir>/<backup_id>/<basename of volume>`; on the same
    /// filesystem (and mount) as every volume.
    pub snapshot_dir: PathBuf,
}

impl ReflinkConfig {
    /// Problems with this provider's part of the config, one line each naming the field. Tries
    /// one probe clone per volume directory: a file of 4 KiB made beside the volume, cloned into
    /// `snapshot_dir`, both removed; nothing else changes.
    pub fn problems(&self, volumes: &[String], frozen_mounts: &[&Path], out: &mut Vec<String>) {
        let dir = &self.snapshot_dir;
        if !dir.is_absolute() || !dir.is_dir() {
            out.push(format!(
                "snapshot.snapshot_dir: {} is not an existing absolute directory",
                dir.display()
            ));
            return;
        }
        let mut names = std::collections::HashSet::new();
        let mut probed = std::collections::HashSet::new();
        for (i, v) in volumes.iter().enumerate() {
            let path = Path::new(v);
            let meta = match std::fs::metadata(path) {
                Ok(m) if path.is_absolute() && m.is_file() => m,
                _ => {
                    out.push(format!(
                        "volumes[{i}]: {v} is not an existing absolute path to a file (an image file to clone)"
                    ));
                    continue;
                }
            };
            match basename(v) {
                Err(e) => out.push(format!("volumes[{i}]: {e:#}")),
                Ok(base) if !names.insert(base.to_string()) => out.push(format!(
                    "volumes[{i}]: another volume is also named {base}; clones are named by basename"
                )),
                Ok(_) => {}
            }
            let parent = path.parent().unwrap_or(Path::new("/"));
            if std::fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev()) {
                out.push(format!(
                    "volumes[{i}]: {v} is on another filesystem than its directory (a bind-mounted file?); give the path on the filesystem that holds it"
                ));
                continue;
            }
            if probed.insert(parent.to_path_buf()) {
                if let Err(e) = probe(parent, dir) {
                    out.push(format!("volumes[{i}]: {e:#}"));
                }
            }
        }
        // FICLONE writes metadata: on a frozen filesystem it would wait for the thaw, which
        // waits for the snapshot.
        let paths = std::iter::once(("snapshot.snapshot_dir", dir.as_path()))
            .chain(volumes.iter().map(|v| ("volumes", Path::new(v.as_str()))));
        for (field, path) in paths {
            let Ok(meta) = std::fs::metadata(path) else { continue };
            for mount in frozen_mounts {
                if std::fs::metadata(mount).is_ok_and(|m| m.dev() == meta.dev()) {
                    out.push(format!(
                        "{field}: {} is on the filesystem that fsfreeze {} freezes; a clone there would wait for the thaw (hold the application with an exec or stop quiescer instead)",
                        path.display(),
                        mount.display()
                    ));
                }
            }
        }
    }
}

/// Clones a probe file made in `volume_dir` into `snapshot_dir`; the error says why reflinks
/// cannot work there and what to do.
fn probe(volume_dir: &Path, snapshot_dir: &Path) -> anyhow::Result<()> {
    let cloned = stillpoint_core::san::image::probe_clone(volume_dir, snapshot_dir)
        .with_context(|| format!("probe clone into snapshot_dir {}", snapshot_dir.display()))?;
    cloned.map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::EXDEV) => "it is on another filesystem or mount than the volumes; put snapshot_dir on the same mount".to_string(),
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTTY) => "the filesystem cannot reflink; use XFS made with reflink=1 (mkfs.xfs -m reflink=1, the default since xfsprogs 5.1) or btrfs".to_string(),
            _ => e.to_string(),
        };
        anyhow!(
            "probe clone from {} into snapshot_dir {} failed: {why}",
            volume_dir.display(),
            snapshot_dir.display()
        )
    })
}

/// Clones image files into `snapshot_dir`.
pub struct Reflink {
    snapshot_dir: PathBuf,
}

impl Reflink {
    pub fn new(config: &ReflinkConfig) -> Reflink {
        Reflink { snapshot_dir: config.snapshot_dir.clone() }
    }

    fn backup_dir(&self, backup_id: &str) -> anyhow::Result<PathBuf> {
        validate_name("backup id", backup_id)?;
        Ok(self.snapshot_dir.join(backup_id))
    }
}

fn snapshot_of(name: &str, path: &Path) -> anyhow::Result<Snapshot> {
    let size = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len();
    Ok(Snapshot {
        volume: name.to_string(),
        provider: KIND.into(),
        locator: path.display().to_string(),
        size_bytes: size,
    })
}

/// Clones `volume` to `<dir>/<name>` through `<name>.partial`: clone, read-only, fsync, rename.
fn clone_to(volume: &str, dir: &Path, name: &str) -> anyhow::Result<()> {
    let (target, partial) = (dir.join(name), dir.join(format!("{name}{PARTIAL}")));
    let src = File::open(volume).with_context(|| format!("open {volume}"))?;
    if !src.metadata().with_context(|| format!("stat {volume}"))?.is_file() {
        return Err(anyhow!("{volume} is not a regular file"));
    }
    let _ = std::fs::remove_file(&partial);
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&partial)
        .with_context(|| format!("create {}", partial.display()))?;
    let made = stillpoint_core::sys::clone_file(&src, &dst)
        .map_err(|e| anyhow!("FICLONE {volume} to {}: {e}", partial.display()))
        .and_then(|()| {
            dst.sync_all().with_context(|| format!("fsync {}", partial.display()))?;
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o400))
                .with_context(|| format!("make {} read-only", partial.display()))?;
            std::fs::rename(&partial, &target)
                .with_context(|| format!("rename {} to {}", partial.display(), target.display()))
        });
    if made.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    made
}

/// The entries of `dir` (none if it does not exist), sorted.
fn entries(dir: &Path) -> anyhow::Result<Vec<(PathBuf, std::fs::FileType)>> {
    let mut out = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                let e = e.with_context(|| format!("list {}", dir.display()))?;
                let t = e.file_type().with_context(|| format!("stat {}", e.path().display()))?;
                out.push((e.path(), t));
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow!("list {}: {e}", dir.display())),
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn is_partial(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.ends_with(PARTIAL))
}

impl SnapshotProvider for Reflink {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>> {
        let dir = self.backup_dir(backup_id)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut out = Vec::new();
        for volume in volumes {
            let name = basename(volume)?;
            if is_partial(Path::new(name)) {
                return Err(anyhow!(
                    "volume {volume}: a name ending in {PARTIAL} is reserved for clones being made"
                ));
            }
            let target = dir.join(name);
            if !target.exists() {
                clone_to(volume, &dir, name).with_context(|| format!("snapshot {volume}"))?;
            }
            out.push(snapshot_of(name, &target)?);
        }
        // The renames are durable once the directory is.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsync {}", dir.display()))?;
        Ok(out)
    }

    fn delete(&self, backup_id: &str) -> anyhow::Result<u32> {
        let dir = self.backup_dir(backup_id)?;
        let mut deleted = 0;
        for (path, kind) in entries(&dir)? {
            if kind.is_dir() {
                return Err(anyhow!(
                    "{} is a directory, which this provider never makes; remove it by hand",
                    path.display()
                ));
            }
            std::fs::remove_file(&path).with_context(|| format!("delete {}", path.display()))?;
            if !is_partial(&path) {
                deleted += 1;
            }
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!("remove {}: {e}", dir.display())),
        }
        Ok(deleted)
    }

    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
        let mut out = Vec::new();
        for (backup_dir, kind) in entries(&self.snapshot_dir)? {
            let backup = backup_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !kind.is_dir() || validate_name("backup id", backup).is_err() {
                continue;
            }
            for (clone, kind) in entries(&backup_dir)? {
                if !kind.is_file() || is_partial(&clone) {
                    continue;
                }
                let name = clone.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                match snapshot_of(name, &clone) {
                    Ok(snap) => out.push((backup.to_string(), snap)),
                    // Deleted since the directory was read: no longer held.
                    Err(_) if !clone.exists() => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }
}
