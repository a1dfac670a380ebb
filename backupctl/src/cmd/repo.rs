//! `repo init|backup` and what every saveset verb shares: the repository options (`--repo`,
//! `--passphrase-file` or `--key-file`), unlocking, and finding a backup's volume manifests.
//! Offline: the repository is a local directory; the secret is read from a file, never printed.

use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;
use stillpoint_saveset::{
    BackupArtifact, BackupStats, BaseKey, BaseStore, Location, ManifestId, ManifestSummary,
    OpenOptions, Progress, Repository, Secret, VolumeMeta, VolumeSummary,
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
    /// MiB the chunk index and each external sort may hold in memory [default: 128]; the
    /// step's own buffers come on top (saveset/FORMAT.md, the memory table)
    #[arg(long, env = "STILLPOINT_MEMORY_BUDGET_MIB", value_name = "MIB",
          value_parser = parse_budget)]
    pub memory_budget_mib: Option<u64>,
}

fn parse_budget(s: &str) -> std::result::Result<u64, String> {
    let mib: u64 = s.parse().map_err(|_| format!("{s:?} is not a whole number of MiB"))?;
    stillpoint_saveset::memory_budget_from_mib(mib)
}

impl RepoOptions {
    /// Reads the secret from the one file named; a usage error when none or both are given.
    pub fn secret(&self) -> Result<Secret> {
        use stillpoint_saveset::SecretFileError as E;
        stillpoint_saveset::secret_from_files(
            self.passphrase_file.as_deref(),
            self.key_file.as_deref(),
        )
        .map_err(|e| match e {
            E::Both => Error::Usage(
                "pass only one of --passphrase-file and --key-file (check \
                 STILLPOINT_REPO_PASSPHRASE_FILE and STILLPOINT_REPO_KEY_FILE)"
                    .into(),
            ),
            E::Neither => Error::Usage(
                "no repository secret: pass --passphrase-file F or --key-file F (or set \
                 STILLPOINT_REPO_PASSPHRASE_FILE or STILLPOINT_REPO_KEY_FILE)"
                    .into(),
            ),
            // An unreadable or empty secret file is the caller's to fix: exit 2, like a usage
            // mistake.
            E::Read { error, .. } => Error::Usage(error.to_string()),
        })
    }

    /// Opens and unlocks the repository.
    pub fn open(&self) -> Result<Repository> {
        let secret = self.secret()?;
        let options = OpenOptions { memory_budget: self.memory_budget_mib, ..Default::default() };
        Ok(Repository::open_with(&Location::Local(self.repo.clone()), &secret, options)?)
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Repo {
    /// Create a new repository in DIR (absent or empty); refuses an existing one
    Init(InitArgs),
    /// Copy one snapshot or image into the repository as a volume of a backup
    Backup(BackupArgs),
    /// List the backups the repository holds (and incomplete ones), without any listener
    List(crate::cmd::repo_list::ListArgs),
    /// Show one backup in the repository: servers, volumes, the cut, artifacts
    Show(crate::cmd::repo_list::ShowArgs),
    /// Free what no manifest references: delete unused packs, repack partly used ones, clear
    /// tmp/ (safe while backups run)
    Prune(crate::cmd::prune::PruneArgs),
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
    /// Keep a reflink clone of the snapshot here as the volume's base, and read only what
    /// changed since the base kept by the previous backup (FIEMAP); same filesystem as the
    /// snapshot, else every backup reads everything
    #[arg(long, value_name = "DIR")]
    pub base_dir: Option<PathBuf>,
    /// The group the base is kept for (with --base-dir)
    #[arg(long, env = "STILLPOINT_GROUP", value_name = "G", default_value = "")]
    pub group: String,
    /// Percent of the chunks skipped thanks to the change map that are re-read and compared
    /// (the sampling verify: at least 64 chunks, at most 64 MiB, all at 100); 0 disables
    #[arg(long, value_name = "PERCENT", default_value_t = stillpoint_saveset::DEFAULT_SAMPLE_PERCENT)]
    pub sample: f64,
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
    /// Without --base-dir: the volume's newest earlier manifest, offered as the parent of the
    /// chunk list (its pages shared or the base of deltas when its size and chunk size match
    /// the volume's; else the list is written whole); none: the volume's first backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    backup: String,
    server: String,
    volume: String,
    /// The saveset's own figures, under their own names.
    #[serde(flatten)]
    stats: BackupStats,
    duration_ms: u64,
}

pub fn run(repo: Repo, out: &mut dyn Write) -> Result<()> {
    match repo {
        Repo::Init(args) => init(args, out),
        Repo::Backup(args) => backup(args, out),
        Repo::List(args) => crate::cmd::repo_list::list(args, out),
        Repo::Show(args) => crate::cmd::repo_list::show(args, out),
        Repo::Prune(args) => crate::cmd::prune::run(args, out),
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
    if !(0.0..=100.0).contains(&args.sample) {
        return Err(Error::Usage(format!("--sample {}: a percentage from 0 to 100", args.sample)));
    }
    let started = std::time::Instant::now();
    // Without a kept base, the volume's newest backup in the repository is still the parent of
    // the chunk list: unchanged pages are shared and changed ones stored as deltas.
    let mut parent = None;
    let done = match &args.base_dir {
        None => {
            parent = repo.latest_volume(&args.server, &args.volume)?;
            repo.backup_volume_child(&args.path, meta, parent, &mut |_: Progress| {})?
        }
        Some(dir) => {
            let bases = BaseStore::open(dir)?.with_sample(args.sample);
            let key = BaseKey {
                group: args.group.clone(),
                server: args.server.clone(),
                volume: args.volume.clone(),
            };
            bases.backup(&mut repo, &key, &args.path, meta, &mut |_: Progress| {})?
        }
    };
    let shown = BackupView {
        manifest: done.id.to_string(),
        parent: parent.map(|p| p.to_string()),
        backup: args.backup,
        server: args.server,
        volume: args.volume,
        stats: done.stats,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    if args.json {
        writeln!(out, "{}", view::json(&shown))?;
    } else {
        writeln!(out, "volume manifest {}", shown.manifest)?;
        writeln!(
            out,
            "backup {} server {} volume {}: {} B in {} ms, read {} B, skipped {} B (change map \
             {}; {} sampled, {} differed); chunks: {} new, {} reused, {} holes; stored {} B in \
             {} packs",
            shown.backup,
            shown.server,
            shown.volume,
            shown.stats.size,
            shown.duration_ms,
            shown.stats.bytes_read,
            shown.stats.bytes_skipped,
            shown.stats.change_map,
            shown.stats.sampled_chunks,
            shown.stats.sample_mismatches,
            shown.stats.new_chunks,
            shown.stats.reused_chunks,
            shown.stats.hole_chunks,
            shown.stats.bytes_stored,
            shown.stats.packs
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
    pub volumes: Vec<(ManifestId, VolumeSummary)>,
    /// Manifests that do not decrypt or parse, so may belong to this backup.
    pub unreadable: Vec<(ManifestId, String)>,
    /// The quiescers' artifacts the newest backup manifest carries (none without one).
    pub artifacts: Vec<BackupArtifact>,
}

impl Found {
    /// Every manifest id this backup consists of.
    pub fn manifest_ids(&self) -> Vec<ManifestId> {
        self.backups.iter().copied().chain(self.volumes.iter().map(|(id, _)| *id)).collect()
    }

    /// The newest volume manifest of each server and volume.
    pub fn latest(&self) -> Vec<&(ManifestId, VolumeSummary)> {
        let mut latest: Vec<&(ManifestId, VolumeSummary)> = Vec::new();
        for entry in &self.volumes {
            let same = |(_, m): &&(ManifestId, VolumeSummary)| {
                (&m.meta.server, &m.meta.volume) == (&entry.1.meta.server, &entry.1.meta.volume)
            };
            if !latest.last().is_some_and(same) {
                latest.push(entry);
            }
        }
        latest
    }

    /// Why the backup cannot be trusted as a whole, naming what the repository does hold; `None`
    /// when a backup manifest names it. The listener writes that manifest, with the cut, only
    /// after every server's copy: without it the volumes are whatever a failed or aborted run
    /// left, and nothing says they were frozen at one instant.
    pub fn incomplete(&self, id: &str) -> Option<String> {
        if !self.backups.is_empty() {
            return None;
        }
        let mut held: Vec<String> = self
            .latest()
            .iter()
            .map(|(_, m)| format!("{}/{}", m.meta.server, m.meta.volume))
            .collect();
        if held.is_empty() {
            held.push("no volumes".into());
        }
        let unreadable = match self.unreadable.len() {
            0 => String::new(),
            n => format!(
                "; {n} manifest{} in the repository do{} not decrypt, and one may be its \
                 backup manifest",
                if n == 1 { "" } else { "s" },
                if n == 1 { "es" } else { "" }
            ),
        };
        Some(format!(
            "backup {id} is incomplete: the repository has no backup manifest for it, so it \
             never finished (it failed or was aborted, its copy is still running, or its \
             volumes were written by `repo backup` alone) and it has no cut: nothing says its \
             volumes were frozen at one instant. The repository holds {}{unreadable}",
            held.join(", ")
        ))
    }

    /// True when the repository holds nothing for the id (not even an unreadable manifest).
    pub fn is_empty(&self) -> bool {
        self.backups.is_empty() && self.volumes.is_empty() && self.unreadable.is_empty()
    }
}

/// Refuses a backup without a backup manifest (exit 1) unless `allow` (`--incomplete`), in
/// which case it warns on stderr; `doing` is the verb (`check`, `restore`). Returns whether
/// the backup is complete.
pub fn require_complete(found: &Found, id: &str, allow: bool, doing: &str) -> Result<bool> {
    match found.incomplete(id) {
        None => Ok(true),
        Some(why) if allow => {
            crate::cmd::note(&format!(
                "backupctl: WARNING: {why}; going on because of --incomplete"
            ));
            Ok(false)
        }
        Some(why) => Err(Error::Incomplete(format!(
            "{why}; pass --incomplete to {doing} what it holds anyway"
        ))),
    }
}

/// The summary of every manifest in `ids`, in order, read by one thread per core.
pub(crate) fn load_summaries(
    repo: &Repository,
    ids: Vec<ManifestId>,
) -> Vec<(ManifestId, stillpoint_saveset::Result<ManifestSummary>)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(ids.len());
    if threads <= 1 {
        return ids.into_iter().map(|id| (id, repo.load_summary(id))).collect();
    }
    let per = ids.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = ids
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter().map(|&id| (id, repo.load_summary(id))).collect::<Vec<_>>()
                })
            })
            .collect();
        parts.into_iter().flat_map(|h| h.join().expect("a summary reader does not panic")).collect()
    })
}

/// Reads every manifest and picks out those of backup `id`.
pub fn find_backup(repo: &Repository, id: &str) -> Result<Found> {
    let mut found = Found::default();
    let mut backups = Vec::new();
    let mut volumes = std::collections::HashMap::new();
    // Summaries only: a repository of many backups is searched without holding every volume's
    // chunk list (33 bytes per chunk) in memory. Each summary still decrypts, decompresses and
    // skims its manifest, so they are read on every core.
    for (mid, summary) in load_summaries(repo, repo.list_manifests()?) {
        match summary {
            Ok(ManifestSummary::Backup(b)) if b.backup == id => {
                backups.push((b.created_unix_ms, mid, b))
            }
            Ok(ManifestSummary::Volume(v)) => {
                volumes.insert(mid, v);
            }
            Ok(ManifestSummary::Backup(_)) => {}
            Err(stillpoint_saveset::Error::Damaged { reason, .. }) => {
                found.unreadable.push((mid, reason))
            }
            Err(e) => return Err(e.into()),
        }
    }
    backups.sort_by_key(|(at, mid, _)| (*at, *mid));
    found.backups = backups.iter().map(|(_, mid, _)| *mid).collect();
    found.artifacts = backups.last().map(|(_, _, b)| b.artifacts.clone()).unwrap_or_default();
    let mut chosen: Vec<(ManifestId, VolumeSummary)> = match backups.last() {
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
