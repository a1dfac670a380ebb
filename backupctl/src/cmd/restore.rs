//! `restore ID --server S [--volume V] --to PATH [--force]`: writes a server's volumes of backup
//! ID back from the saveset repository, bit for bit and sparse. Refuses a target that holds data
//! unless `--force`, and a backup without a backup manifest unless `--incomplete`; checks every
//! target before writing any. The server's quiescer artifacts (a backup label) from the backup
//! manifest go beside the volumes, as `<dir>/<server>/artifacts/<quiescer>/<name>`.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use stillpoint_saveset::{ManifestId, RestoreProgress, VolumeSummary};

use crate::cmd::artifacts::{self, Artifact};
use crate::cmd::repo::{find_backup, require_complete, RepoOptions};
use crate::error::{Error, Result};
use crate::view;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id
    pub id: String,
    #[command(flatten)]
    pub repo: RepoOptions,
    /// The server whose volumes to restore
    #[arg(long, value_name = "S")]
    pub server: String,
    /// Only this volume; without it and with several volumes, --to is a directory
    #[arg(long, value_name = "V")]
    pub volume: Option<String>,
    /// Target file or block device; a directory receives `<server>-<volume>.img` per volume.
    /// The server's artifacts go to `<server>/artifacts/` in that directory (or in the target
    /// file's)
    #[arg(long, value_name = "PATH")]
    pub to: PathBuf,
    /// Overwrite a target that holds data
    #[arg(long)]
    pub force: bool,
    /// Restore from a backup that has no backup manifest (it failed, was aborted or is still
    /// copying): its volumes may not be consistent with the other servers', there is no cut
    #[arg(long)]
    pub incomplete: bool,
    /// Print what was restored as JSON
    #[arg(long)]
    pub json: bool,
}

/// One restored volume, as `restore --json` prints it (an array of these).
#[derive(Debug, Serialize)]
pub struct RestoredView {
    pub manifest: String,
    pub server: String,
    pub volume: String,
    pub target: String,
    pub size: u64,
    pub bytes_written: u64,
    /// A backup manifest names the backup (false only with `--incomplete`).
    pub complete: bool,
    /// Where the server's quiescer artifacts were written (`<dir>/<server>/artifacts`, one
    /// file per `<quiescer>/<name>`); `null` when the backup manifest carries none.
    pub artifacts_dir: Option<String>,
}

pub fn run(args: Args, out: &mut dyn Write) -> Result<()> {
    let repo = args.repo.open()?;
    let found = find_backup(&repo, &args.id)?;
    let latest = found.latest();
    let of_server: Vec<&(ManifestId, VolumeSummary)> =
        latest.into_iter().filter(|(_, m)| m.meta.server == args.server).collect();
    let chosen: Vec<&(ManifestId, VolumeSummary)> = match &args.volume {
        Some(v) => of_server.iter().copied().filter(|(_, m)| &m.meta.volume == v).collect(),
        None => of_server.clone(),
    };
    if chosen.is_empty() {
        return Err(Error::Usage(not_found(&args, &found.volumes, &of_server)));
    }
    let complete = require_complete(&found, &args.id, args.incomplete, "restore")?;
    let into_dir = chosen.len() > 1 || args.to.is_dir();
    if into_dir {
        std::fs::create_dir_all(&args.to)
            .map_err(|e| Error::Usage(format!("create {}: {e}", args.to.display())))?;
    }
    let targets: Vec<PathBuf> = chosen
        .iter()
        .map(|(_, m)| {
            if into_dir {
                args.to.join(file_name(&m.meta.server, &m.meta.volume))
            } else {
                args.to.clone()
            }
        })
        .collect();
    if !args.force {
        for target in &targets {
            if holds_data(target) {
                return Err(refused(target));
            }
        }
    }
    // The artifacts' names are checked, and existing files compared, before any volume is
    // written; they are written after the volumes.
    let artifacts: Vec<Artifact<'_>> = found
        .artifacts
        .iter()
        .filter(|a| a.server == args.server)
        .map(|a| Artifact {
            server: &a.server,
            quiescer: &a.quiescer,
            name: &a.name,
            bytes: &a.bytes,
        })
        .collect();
    let beside = if into_dir {
        args.to.clone()
    } else {
        args.to.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    };
    if !artifacts.is_empty() {
        artifacts::check(&beside, &artifacts, args.force)?;
    }
    let mut restored = Vec::new();
    for ((id, manifest), target) in chosen.iter().zip(&targets) {
        // Restoring a large volume takes minutes.
        let prefix = format!("{}/{}", manifest.meta.server, manifest.meta.volume);
        let bar = crate::bar::bytes(args.json, prefix, manifest.size);
        let progress = |p: RestoreProgress| {
            if let Some(bar) = &bar {
                bar.set_position(p.done);
            }
        };
        let result = repo.restore_volume_with(*id, target, args.force, &progress);
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let stats = match result {
            Err(stillpoint_saveset::Error::TargetNotEmpty { path }) => return Err(refused(&path)),
            other => other?,
        };
        let shown = RestoredView {
            manifest: id.to_string(),
            server: manifest.meta.server.clone(),
            volume: manifest.meta.volume.clone(),
            target: target.display().to_string(),
            size: stats.size,
            bytes_written: stats.bytes_written,
            complete,
            artifacts_dir: None,
        };
        if !args.json {
            writeln!(
                out,
                "restored {}/{} of {}backup {} to {}: {} B ({} B of data written, the rest holes)",
                shown.server,
                shown.volume,
                if complete { "" } else { "INCOMPLETE " },
                args.id,
                shown.target,
                shown.size,
                shown.bytes_written
            )?;
        }
        restored.push(shown);
    }
    let written = artifacts::write(&beside, &artifacts, args.force)?;
    if args.json {
        let dir = (!written.is_empty())
            .then(|| beside.join(&args.server).join("artifacts").display().to_string());
        for r in &mut restored {
            r.artifacts_dir.clone_from(&dir);
        }
        writeln!(out, "{}", view::json(&restored))?;
        return Ok(());
    }
    for w in &written {
        writeln!(out, "{}", artifacts::said(&args.id, w))?;
    }
    if written.is_empty() && complete {
        writeln!(out, "backup {}'s manifest carries no artifacts of {}", args.id, args.server)?;
    } else if !complete {
        writeln!(
            out,
            "no backup manifest, so no artifacts from the repository; `backupctl artifacts {} --server {} --to DIR` fetches any from the listener's catalog",
            args.id, args.server
        )?;
    }
    Ok(())
}

/// `<server>-<volume>.img`, with path separators in a volume name (`/srv/data`) made safe.
fn file_name(server: &str, volume: &str) -> String {
    let safe = |s: &str| s.trim_matches('/').replace(['/', '\\'], "_");
    format!("{}-{}.img", safe(server), safe(volume))
}

/// A regular file with bytes in it, or any block device (its old contents are unknowable).
fn holds_data(target: &Path) -> bool {
    std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device() || m.len() > 0)
}

fn refused(target: &Path) -> Error {
    Error::Usage(format!(
        "restore to {}: target is not empty; pass --force to overwrite it",
        target.display()
    ))
}

/// Says what the repository does hold for the backup, so the operator can correct the flags.
fn not_found(
    args: &Args,
    all: &[(ManifestId, VolumeSummary)],
    of_server: &[&(ManifestId, VolumeSummary)],
) -> String {
    let what = match &args.volume {
        Some(v) => format!("server {} volume {v}", args.server),
        None => format!("server {}", args.server),
    };
    let mut have: Vec<String> =
        all.iter().map(|(_, m)| format!("{}/{}", m.meta.server, m.meta.volume)).collect();
    have.dedup();
    let have = if of_server.is_empty() && have.is_empty() {
        "no volumes at all".to_string()
    } else {
        format!("volumes {}", have.join(", "))
    };
    format!(
        "backup {}: no {what} in repository {} (it has {have})",
        args.id,
        args.repo.repo.display()
    )
}
