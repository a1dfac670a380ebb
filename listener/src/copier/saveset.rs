//! The built-in copier: every snapshot of a server into the saveset repository (chunking, dedup,
//! holes and encryption are the format's business), and the seal once every server of the
//! backup is in: the backup manifest with the cut, then a verify. Blocking code, run on blocking
//! tasks; it neither talks to agents nor decides anything about the backup.

use std::path::Path;
use std::time::{Duration, Instant};

use stillpoint_saveset::{
    BackupArtifact, BackupManifest, BackupStats, BaseKey, BaseStore, Manifest, ManifestId, Parents,
    Pool, Progress, Repository, VolumeMeta,
};

use crate::config::{SavesetConfig, VerifyMode};
use crate::coordinator::CopyDone;
use crate::model::{Artifact, CutRecord, SnapshotRef};

/// How often, at most, a copy reports its progress (to watchers; the catalog saves it only with
/// the backup's next change).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The repository the listener copies into, unlocked at start.
pub struct Saveset {
    config: SavesetConfig,
    /// Copies of different servers write concurrently, each through a handle of its own.
    pool: Pool,
    /// Held while a catalog is dumped and saved (`crate::repo_catalog`), so the newest saved
    /// catalog is always the newest dump.
    catalog: std::sync::Mutex<()>,
    /// Each volume's kept base, with `base_dir` (change tracking).
    bases: Option<BaseStore>,
    /// Without `base_dir`: each volume's last backup, the parent of its chunk list.
    parents: Parents,
}

impl std::fmt::Debug for Saveset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saveset").field("repository", &self.config.repository).finish()
    }
}

/// What one server's copy stored.
#[derive(Debug, Clone, Default)]
pub struct ServerCopy {
    /// Volume name and its manifest, in the snapshots' order.
    pub volumes: Vec<(String, ManifestId)>,
    /// Summed over the server's volumes.
    pub stats: BackupStats,
}

impl ServerCopy {
    /// One line for the backup's log, naming every volume manifest.
    pub fn detail(&self) -> String {
        let volumes: Vec<String> =
            self.volumes.iter().map(|(v, id)| format!("{v} manifest {id}")).collect();
        let s = &self.stats;
        format!(
            "saveset: {}; {} bytes read, {} stored ({} new chunks, {} reused, {} holes){}",
            volumes.join(", "),
            s.bytes_read,
            s.bytes_stored,
            s.new_chunks,
            s.reused_chunks,
            s.hole_chunks,
            changes(s)
        )
    }

    /// The copy as the coordinator records it: the log line, and the volume manifests the seal
    /// names.
    pub fn done(self) -> CopyDone {
        let detail = self.detail();
        CopyDone {
            detail,
            stored: self.volumes.iter().map(|(_, id)| id.to_string()).collect(),
            stored_bytes: Some(self.stats.bytes_stored),
        }
    }
}

impl Saveset {
    /// Reads the secret and unlocks the repository once, so a wrong secret stops the start.
    pub fn open(config: &SavesetConfig) -> Result<Saveset, String> {
        Self::open_in(config, None)
    }

    /// [`Saveset::open`] with the repository's index cache in `cache_dir`.
    pub fn open_in(config: &SavesetConfig, cache_dir: Option<&Path>) -> Result<Saveset, String> {
        let pool = config.open_in(cache_dir)?;
        tracing::info!(repository = %config.repository.display(), verify = ?config.verify, "saveset repository unlocked");
        let bases = match &config.base_dir {
            None => None,
            Some(dir) => Some(
                BaseStore::open(dir)
                    .map_err(|e| format!("copy.base_dir: {e}"))?
                    .with_sample(config.sample),
            ),
        };
        Ok(Saveset {
            config: config.clone(),
            pool,
            catalog: std::sync::Mutex::default(),
            bases,
            parents: Parents::default(),
        })
    }

    /// Runs `f` on one of the pool's unlocked handles.
    pub fn with_repo<T>(
        &self,
        f: impl FnOnce(&mut Repository) -> Result<T, String>,
    ) -> Result<T, String> {
        self.pool.with_repo(|e| format!("copy.repository: {e}"), f)
    }

    /// Runs `save` (dump the catalog, write it) with no other catalog save running at once.
    pub fn saving_catalog<T>(&self, save: impl FnOnce() -> T) -> T {
        let _one = self.catalog.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        save()
    }

    /// Frees what no manifest references, with prune's default grace (FORMAT.md, "Prune"):
    /// packs forgotten now are marked, and deleted by a prune at least the grace later, once no
    /// copy that could still use them runs. Safe beside copies here and on the agents.
    pub fn prune(&self) -> Result<stillpoint_saveset::PruneReport, String> {
        let opts = stillpoint_saveset::PruneOptions::default();
        self.with_repo(|repo| repo.prune(&opts, &mut |_| {}).map_err(|e| e.to_string()))
    }

    /// Deletes backup `backup_id`'s manifests (retention's forget; the packs wait for a prune).
    pub fn forget_backup(&self, backup_id: &str) -> Result<stillpoint_saveset::Forgotten, String> {
        self.with_repo(|repo| repo.forget_backup(backup_id).map_err(|e| e.to_string()))
    }

    /// Backs up every snapshot of `server` (its locator is read as a file or block device).
    /// `progress(done, total)` is called with bytes of the whole server, at most every
    /// [`PROGRESS_EVERY`] and once at the end with `done == total`. `stop` is asked between
    /// volumes: a backup that ended meanwhile gets no more volumes.
    pub fn copy_server(
        &self,
        (backup_id, group): (&str, &str),
        server: &str,
        snapshots: &[SnapshotRef],
        progress: &mut dyn FnMut(u64, u64),
        stop: &dyn Fn() -> bool,
    ) -> Result<ServerCopy, String> {
        let mut sizes = Vec::with_capacity(snapshots.len());
        for snap in snapshots {
            sizes.push(readable_size(snap)?);
        }
        let total: u64 = sizes.iter().sum();
        let mut throttle = Throttle::default();
        progress(0, total);
        let mut copy = ServerCopy::default();
        let mut base = 0;
        self.with_repo(|repo| {
            for (snap, size) in snapshots.iter().zip(&sizes) {
                if stop() {
                    return Err("the backup ended; copy stopped".to_string());
                }
                let meta = VolumeMeta {
                    backup: backup_id.to_string(),
                    server: server.to_string(),
                    volume: snap.volume.clone(),
                };
                let mut report = |p: Progress| {
                    if throttle.ready(Instant::now()) {
                        progress((base + p.done).min(total), total);
                    }
                };
                let source = Path::new(&snap.locator);
                let key = BaseKey {
                    group: group.to_string(),
                    server: server.to_string(),
                    volume: snap.volume.clone(),
                };
                let done = match &self.bases {
                    None => self.parents.backup(repo, &key, source, meta, &mut report),
                    Some(bases) => bases.backup(repo, &key, source, meta, &mut report),
                }
                .map_err(|e| format!("volume {}: {e}", snap.volume))?;
                if self.bases.is_some() {
                    tracing::info!(volume = %snap.volume, bytes_read = done.stats.bytes_read, bytes_skipped = done.stats.bytes_skipped, change_map = %done.stats.change_map, "volume copied");
                }
                copy.stats += &done.stats;
                copy.volumes.push((snap.volume.clone(), done.id));
                base += size;
            }
            Ok(())
        })?;
        progress(total, total);
        Ok(copy)
    }

    /// Seals a backup whose every server copied: `stored` are the volume manifests' ids as
    /// [`ServerCopy::done`] gave them. See [`Saveset::finish_backup`].
    pub fn seal(
        &self,
        backup_id: &str,
        stored: &[String],
        (cut, artifacts): (&CutRecord, &[(String, Vec<Artifact>)]),
    ) -> Result<String, String> {
        let mut volumes = Vec::with_capacity(stored.len());
        for id in stored {
            volumes.push(id.parse().map_err(|e| format!("volume manifest id {id:?}: {e}"))?);
        }
        let cut = serde_json::to_value(cut).map_err(|e| format!("the cut as JSON: {e}"))?;
        let artifacts = artifacts
            .iter()
            .flat_map(|(server, list)| {
                list.iter().map(move |a| BackupArtifact {
                    server: server.clone(),
                    quiescer: a.quiescer.clone(),
                    name: a.name.clone(),
                    bytes: a.bytes.clone(),
                })
            })
            .collect();
        self.finish_backup(backup_id, volumes, cut, artifacts)
    }

    /// Writes the backup manifest (every volume manifest, the cut and the quiescers'
    /// artifacts), then runs the configured verify; damage is an `Err` naming it. Returns a
    /// line for the log.
    pub fn finish_backup(
        &self,
        backup_id: &str,
        volumes: Vec<ManifestId>,
        cut: serde_json::Value,
        artifacts: Vec<BackupArtifact>,
    ) -> Result<String, String> {
        let kept = match artifacts.len() {
            0 => String::new(),
            n => format!(" with {n} artifact(s)"),
        };
        let manifest = Manifest::Backup(BackupManifest {
            backup: backup_id.to_string(),
            volumes,
            cut,
            created_unix_ms: u64::try_from(stillpoint_core::unix_ms()).unwrap_or(0),
            artifacts,
        });
        let verify = self.config.verify;
        self.with_repo(|repo| {
            let id = repo.write_manifest(&manifest).map_err(|e| format!("backup manifest: {e}"))?;
            let read_data = match verify {
                VerifyMode::None => return Ok(format!("backup manifest {id}{kept}")),
                VerifyMode::Index => false,
                VerifyMode::ReadData => true,
            };
            // This backup only: the check does not grow with the repository.
            let report =
                repo.verify_manifests(&[id], read_data).map_err(|e| format!("verify: {e}"))?;
            if !report.is_ok() {
                let shown: Vec<String> =
                    report.damage.iter().take(5).map(|d| d.to_string()).collect();
                return Err(format!(
                    "backup manifest {id} written, but verify found {} problem(s): {}",
                    report.damage.len(),
                    shown.join("; ")
                ));
            }
            Ok(format!(
                "backup manifest {id}{kept}; verify ({}) ok: {} manifests, {} chunks",
                if read_data { "read-data" } else { "index" },
                report.manifests,
                report.chunks
            ))
        })
    }
}

/// The change-tracking part of a copy's log line: empty without a change map.
pub fn changes(s: &BackupStats) -> String {
    if s.change_map.is_empty() || (s.bytes_skipped == 0 && s.change_map == "none") {
        return String::new();
    }
    format!(
        "; {} bytes skipped, change map {}, {} sampled, {} differed",
        s.bytes_skipped, s.change_map, s.sampled_chunks, s.sample_mismatches
    )
}

/// The bytes a snapshot's copy will read: its file's length (a block device's reported size).
fn readable_size(snap: &SnapshotRef) -> Result<u64, String> {
    let path = Path::new(&snap.locator);
    let meta = std::fs::metadata(path).map_err(|e| {
        format!(
            "volume {}: cannot read snapshot {} here ({} provider): {e}",
            snap.volume, snap.locator, snap.provider
        )
    })?;
    if meta.is_dir() {
        return Err(format!(
            "volume {}: snapshot {} is a directory ({} provider); the saveset copier reads block images",
            snap.volume, snap.locator, snap.provider
        ));
    }
    Ok(if meta.is_file() { meta.len() } else { snap.size_bytes })
}

/// Lets a report through at most every [`PROGRESS_EVERY`].
#[derive(Debug, Default)]
pub struct Throttle {
    last: Option<Instant>,
}

impl Throttle {
    pub fn ready(&mut self, now: Instant) -> bool {
        match self.last {
            Some(at) if now.duration_since(at) < PROGRESS_EVERY => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests;
