//! `repo init|backup` and what every saveset verb shares: the repository options (`--repo`,
//! `--passphrase-file` or `--key-file`), unlocking, and finding a backup's volume manifests.
//! Offline: the repository is a local directory; the secret is read from a file, never printed.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use stillpoint_saveset::{
    Manifest, ManifestId, Progress, Repository, Secret, VolumeManifest, VolumeMeta,
};

use crate::error::{Error, Result};
use crate::view;

/// Where the repository is and what unlocks it. Exactly one of the two secrets.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Repository")]
pub struct RepoOptions {
    /// Repository directory
    #[arg(long, env = "STILLPOINT_REPO", value_name = "DIR")]
    pub repo: PathBuf,
    /// File holding the passphrase (one trailing newline is ignored)
    #[arg(long, env = "STILLPOINT_REPO_PASSPHRASE_FILE", value_name = "F")]
    pub passphrase_file: Option<PathBuf>,
    /// Key file: its whole contents are the secret
    #[arg(long, env = "STILLPOINT_REPO_KEY_FILE", value_name = "F")]
    pub key_file: Option<PathBuf>,
}

impl RepoOptions {
    /// Reads the secret from the one file named; a usage error when none or both are given.
    pub fn secret(&self) -> Result<Secret> {
        match (&self.passphrase_file, &self.key_file) {
            (Some(_), Some(_)) => Err(Error::Usage(
                "pass only one of --passphrase-file and --key-file (check \
                 STILLPOINT_REPO_PASSPHRASE_FILE and STILLPOINT_REPO_KEY_FILE)"
                    .into(),
            )),
            (None, None) => Err(Error::Usage(
                "no repository secret: pass --passphrase-file F or --key-file F (or set \
                 STILLPOINT_REPO_PASSPHRASE_FILE or STILLPOINT_REPO_KEY_FILE)"
                    .into(),
            )),
            (Some(path), None) => read_passphrase(path),
            (None, Some(path)) => Ok(Secret::from_key_file(path)?),
        }
    }

    /// Opens and unlocks the repository.
    pub fn open(&self) -> Result<Repository> {
        let secret = self.secret()?;
        Ok(Repository::open(&self.repo, &secret)?)
    }
}

fn read_passphrase(path: &Path) -> Result<Secret> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Usage(format!("read passphrase file {}: {e}", path.display())))?;
    let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if text.is_empty() {
        return Err(Error::Usage(format!("passphrase file {} is empty", path.display())));
    }
    Ok(Secret::passphrase(text))
}

#[derive(Debug, clap::Subcommand)]
pub enum Repo {
    /// Create a new repository in DIR (absent or empty); refuses an existing one
    Init(InitArgs),
    /// Copy one snapshot or image into the repository as a volume of a backup
    Backup(BackupArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub repo: RepoOptions,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// The volume's owner can come from the environment the listener gives its external copy
/// command, so `copy.command = ["backupctl", "repo", "backup"]` needs no arguments.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub repo: RepoOptions,
    /// Backup id this volume belongs to
    #[arg(long, env = "STILLPOINT_BACKUP_ID", value_name = "ID")]
    pub backup: String,
    /// Server the volume belongs to
    #[arg(long, env = "STILLPOINT_SERVER", value_name = "S")]
    pub server: String,
    /// Volume name on that server
    #[arg(long, env = "STILLPOINT_VOLUME", value_name = "V")]
    pub volume: String,
    /// Print the manifest id and stats as JSON
    #[arg(long)]
    pub json: bool,
    /// The snapshot or image: a regular file or block device
    #[arg(env = "STILLPOINT_SNAPSHOT", value_name = "PATH")]
    pub path: PathBuf,
}

/// `repo init --json`.
#[derive(Debug, Serialize)]
struct InitView {
    repo: String,
    chunk_size: u32,
}

/// `repo backup --json`: the volume manifest written and what the copy read and stored.
#[derive(Debug, Serialize)]
struct BackupView {
    manifest: String,
    backup: String,
    server: String,
    volume: String,
    size: u64,
    bytes_read: u64,
    hole_chunks: u64,
    reused_chunks: u64,
    new_chunks: u64,
    bytes_stored: u64,
    packs: u64,
    duration_ms: u64,
}

pub fn run(repo: Repo, out: &mut dyn Write) -> Result<()> {
    match repo {
        Repo::Init(args) => init(args, out),
        Repo::Backup(args) => backup(args, out),
    }
}

fn init(args: InitArgs, out: &mut dyn Write) -> Result<()> {
    let secret = args.repo.secret()?;
    let repo = Repository::init(&args.repo.repo, &secret)?;
    let shown = InitView { repo: repo.path().display().to_string(), chunk_size: repo.chunk_size() };
    if args.json {
        writeln!(out, "{}", view::json(&shown))?;
    } else {
        writeln!(out, "initialized repository {} ({} B chunks)", shown.repo, shown.chunk_size)?;
    }
    Ok(())
}

fn backup(args: BackupArgs, out: &mut dyn Write) -> Result<()> {
    let mut repo = args.repo.open()?;
    let meta = VolumeMeta {
        backup: args.backup.clone(),
        server: args.server.clone(),
        volume: args.volume.clone(),
    };
    let started = std::time::Instant::now();
    let done = repo.backup_volume(&args.path, meta, &mut |_: Progress| {})?;
    let s = done.stats;
    let shown = BackupView {
        manifest: done.id.to_string(),
        backup: args.backup,
        server: args.server,
        volume: args.volume,
        size: s.size,
        bytes_read: s.bytes_read,
        hole_chunks: s.hole_chunks,
        reused_chunks: s.reused_chunks,
        new_chunks: s.new_chunks,
        bytes_stored: s.bytes_stored,
        packs: s.packs,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    if args.json {
        writeln!(out, "{}", view::json(&shown))?;
    } else {
        writeln!(out, "volume manifest {}", shown.manifest)?;
        writeln!(
            out,
            "backup {} server {} volume {}: {} B in {} ms, read {} B; chunks: {} new, {} reused, \
             {} holes; stored {} B in {} packs",
            shown.backup,
            shown.server,
            shown.volume,
            shown.size,
            shown.duration_ms,
            shown.bytes_read,
            shown.new_chunks,
            shown.reused_chunks,
            shown.hole_chunks,
            shown.bytes_stored,
            shown.packs
        )?;
    }
    Ok(())
}

/// What the repository holds for one backup id.
#[derive(Debug, Default)]
pub struct Found {
    /// The backup manifests for the id (normally one), oldest first.
    pub backups: Vec<ManifestId>,
    /// The volume manifests of the backup, sorted by server and volume, newest first: those
    /// the newest backup manifest names, or without a backup manifest every volume manifest
    /// whose `backup` field is the id.
    pub volumes: Vec<(ManifestId, VolumeManifest)>,
    /// Manifests that do not decrypt or parse, so may belong to this backup.
    pub unreadable: Vec<(ManifestId, String)>,
}

impl Found {
    /// Every manifest id this backup consists of.
    pub fn manifest_ids(&self) -> Vec<ManifestId> {
        self.backups.iter().copied().chain(self.volumes.iter().map(|(id, _)| *id)).collect()
    }

    /// The newest volume manifest of each server and volume.
    pub fn latest(&self) -> Vec<&(ManifestId, VolumeManifest)> {
        let mut latest: Vec<&(ManifestId, VolumeManifest)> = Vec::new();
        for entry in &self.volumes {
            let same = |(_, m): &&(ManifestId, VolumeManifest)| {
                (&m.meta.server, &m.meta.volume) == (&entry.1.meta.server, &entry.1.meta.volume)
            };
            if !latest.last().is_some_and(same) {
                latest.push(entry);
            }
        }
        latest
    }

    /// True when the repository holds nothing for the id (not even an unreadable manifest).
    pub fn is_empty(&self) -> bool {
        self.backups.is_empty() && self.volumes.is_empty() && self.unreadable.is_empty()
    }
}

/// Reads every manifest and picks out those of backup `id`.
pub fn find_backup(repo: &Repository, id: &str) -> Result<Found> {
    let mut found = Found::default();
    let mut backups = Vec::new();
    let mut volumes = std::collections::HashMap::new();
    for mid in repo.list_manifests()? {
        match repo.load_manifest(mid) {
            Ok(Manifest::Backup(b)) if b.backup == id => backups.push((b.created_unix_ms, mid, b)),
            Ok(Manifest::Volume(v)) => {
                volumes.insert(mid, v);
            }
            Ok(Manifest::Backup(_)) => {}
            Err(stillpoint_saveset::Error::Damaged { reason, .. }) => {
                found.unreadable.push((mid, reason))
            }
            Err(e) => return Err(e.into()),
        }
    }
    backups.sort_by_key(|(at, mid, _)| (*at, *mid));
    found.backups = backups.iter().map(|(_, mid, _)| *mid).collect();
    let mut chosen: Vec<(ManifestId, VolumeManifest)> = match backups.last() {
        // A volume the backup manifest names but the repository lacks is verify's to report.
        Some((_, _, b)) => b.volumes.iter().filter_map(|v| volumes.remove_entry(v)).collect(),
        None => volumes.into_iter().filter(|(_, v)| v.meta.backup == id).collect(),
    };
    // By server and volume, newest first (a copy rerun by hand writes another manifest).
    chosen.sort_by(|(ia, a), (ib, b)| {
        (&a.meta.server, &a.meta.volume, std::cmp::Reverse(a.created_unix_ms), ia).cmp(&(
            &b.meta.server,
            &b.meta.volume,
            std::cmp::Reverse(b.created_unix_ms),
            ib,
        ))
    });
    found.volumes = chosen;
    Ok(found)
}
