//! The saveset copier on the agent, behind the Copy RPC: this server's snapshots go into the
//! repository of `[saveset]`, encrypted here, so snapshots only this host can read never leave
//! it readable. Blocking work runs on blocking threads; which snapshots may be read, and for
//! how long, is `backups`' business (the copy holds a `CopyHold`). With `base_dir`, a qcow2
//! volume is compared with its group's base snapshot inside the disk, an LVM thin volume with
//! its group's base thin snapshot in the pool (the agent keeps both; `base_dir` holds their
//! records), other volumes with a reflink clone kept in `base_dir`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stillpoint_proto::{
    copy_event, CopiedVolume, CopyDone, CopyEvent, CopyProgress, CopyStats, Snapshot,
};
use stillpoint_saveset::{
    BackupStats, BaseKey, BaseStore, ChangeMap, Parent, Parents, Pool, Progress, RecordedBase,
    Repository, VolumeBackup, VolumeMeta,
};
use tokio::sync::{mpsc, watch};
use tonic::Status;
use tracing::{info, warn, Instrument};

use crate::backups::CopyHold;
use crate::config::SavesetConfig;
use crate::snapshot::lvm;
use crate::snapshot::qcow2::{self, Export};
use crate::{Error, Result};

/// How often, at most, progress goes out (the listener writes each one to its catalog).
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// How long the stream may go without a message while a copy runs: progress is resent this
/// often even when unchanged (a volume's last pack being written, a slow store), so the
/// listener can tell a live copy from a dead link.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// The repository this agent copies into, unlocked at start.
pub struct Saveset {
    /// Concurrent copies of different backups each write through a handle of their own.
    pool: Pool,
    /// `copy_delay_ms_per_mib`: zero but in tests.
    delay_per_mib: Duration,
    /// Each volume's kept base per group, with `base_dir` (change tracking).
    bases: Option<BaseStore>,
    /// Without `base_dir`: each volume's last backup, the parent of its chunk list.
    parents: Parents,
}

impl std::fmt::Debug for Saveset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saveset").field("repository", &self.pool.location().to_string()).finish()
    }
}

impl Saveset {
    /// Reads the secret and unlocks the repository once, so a wrong secret stops the start.
    pub fn open(config: &SavesetConfig, cache_dir: Option<&std::path::Path>) -> Result<Saveset> {
        let pool = config.open_in(cache_dir).map_err(Error::Setup)?;
        info!(repository = %pool.location(), "saveset repository unlocked");
        let bases = match &config.base_dir {
            None => None,
            Some(dir) => Some(
                BaseStore::open(dir)
                    .map_err(|e| Error::Setup(format!("saveset.base_dir: {e}")))?
                    .with_sample(config.sample),
            ),
        };
        Ok(Saveset {
            pool,
            delay_per_mib: Duration::from_millis(config.copy_delay_ms_per_mib),
            bases,
            parents: Parents::default(),
        })
    }

    fn with_repo<T>(
        &self,
        f: impl FnOnce(&mut Repository) -> Result<T, String>,
    ) -> Result<T, String> {
        self.pool.with_repo(|e| format!("saveset.repository: {e}"), f)
    }

    /// Copies `request` on this thread and keeps the new bases, as a Copy RPC does without
    /// qcow2 exports, progress or a caller that can go away: for tests and tools that drive the
    /// copier directly (the LVM VM test has no network to serve the RPC on).
    pub fn copy_now(&self, request: &Request) -> Result<CopyDone, String> {
        let (done, pending) = self.copy_server(request, &[], &|_| {}, &AtomicBool::new(false))?;
        self.keep_bases(pending);
        Ok(done)
    }

    /// Backs up every snapshot in turn; `progress(done, total)` after every chunk, in bytes of
    /// the whole server. `stop` is asked between volumes (one volume's read cannot be cut).
    /// Returns, besides, the qcow2 and LVM thin bases to keep once `exports` let go of their
    /// disks.
    fn copy_server(
        &self,
        request: &Request,
        exports: &[Export],
        progress: &dyn Fn(u64),
        stop: &AtomicBool,
    ) -> Result<(CopyDone, Vec<PendingBase>), String> {
        let Request { meta, group, snapshots } = request;
        let mut done = CopyDone::default();
        let mut pending = Vec::new();
        let mut stats = BackupStats::default();
        let mut base = 0;
        let mut paused_at = 0;
        self.with_repo(|repo| {
            for (snap, size) in snapshots {
                if stop.load(Ordering::SeqCst) {
                    return Err("asked to stop (the backup is being aborted or cleaned up, or the listener went away)".into());
                }
                let meta = VolumeMeta { volume: snap.volume.clone(), ..meta.clone() };
                let mut report = |p: Progress| {
                    let done = base + p.done;
                    if !self.delay_per_mib.is_zero() && done >= paused_at + (1 << 20) {
                        paused_at = done;
                        std::thread::sleep(self.delay_per_mib);
                    }
                    progress(done);
                };
                let source = Path::new(&snap.locator);
                let key = BaseKey {
                    group: group.clone(),
                    server: meta.server.clone(),
                    volume: snap.volume.clone(),
                };
                let export = exports.iter().find(|e| e.file == source);
                // Where the next backup's base comes from, if one is to be kept.
                let mut keep = None;
                let volume = match (&self.bases, export) {
                    (None, _) => self.parents.backup(repo, &key, source, meta, &mut report),
                    (Some(bases), Some(export)) => {
                        keep = Some(KeptBy::Qcow2 {
                            disk: export.disk.clone(),
                            tag: export.tag.clone(),
                        });
                        self.backup_qcow2(bases, repo, &key, export, meta, &mut report)
                    }
                    (Some(bases), None) if snap.provider == lvm::KIND => {
                        let (done, thin) =
                            self.backup_lvm(bases, repo, &key, snap, meta, &mut report);
                        if thin {
                            keep = Some(KeptBy::LvmThin { snapshot: snap.clone() });
                        }
                        done
                    }
                    (Some(bases), None) => bases.backup(repo, &key, source, meta, &mut report),
                }
                .map_err(|e| format!("volume {}: {e}", snap.volume))?;
                if let Some(by) = keep {
                    pending.push(PendingBase {
                        key: key.clone(),
                        by,
                        backup: volume.manifest.meta.backup.clone(),
                        manifest: volume.id,
                    });
                }
                stats += &volume.stats;
                done.volumes.push(CopiedVolume {
                    volume: snap.volume.clone(),
                    manifest_id: volume.id.to_string(),
                });
                base += size;
                let s = &volume.stats;
                info!(volume = %snap.volume, manifest = %volume.id, bytes_read = s.bytes_read, bytes_skipped = s.bytes_skipped, change_map = %s.change_map, sampled = s.sampled_chunks, sample_mismatches = s.sample_mismatches, "volume copied");
            }
            Ok(())
        })?;
        done.stats = Some(CopyStats {
            size: stats.size,
            bytes_read: stats.bytes_read,
            bytes_stored: stats.bytes_stored,
            new_chunks: stats.new_chunks,
            reused_chunks: stats.reused_chunks,
            hole_chunks: stats.hole_chunks,
            packs: stats.packs,
            bytes_skipped: stats.bytes_skipped,
            change_map: if self.bases.is_some() { stats.change_map } else { String::new() },
            sampled_chunks: stats.sampled_chunks,
            sample_mismatches: stats.sample_mismatches,
            metadata_bytes: stats.metadata_bytes,
        });
        Ok((done, pending))
    }

    /// Backs up a qcow2 snapshot (read through `export`) against its group's base snapshot in
    /// the disk, if one is recorded and still the one kept: only the guest clusters the two map
    /// differently are read. Otherwise everything is read and the stats say why (`none: why`);
    /// the recorded (or last) manifest is still the chunk list's parent.
    fn backup_qcow2(
        &self,
        bases: &BaseStore,
        repo: &mut Repository,
        key: &BaseKey,
        export: &Export,
        meta: VolumeMeta,
        report: &mut dyn FnMut(Progress),
    ) -> stillpoint_saveset::Result<VolumeBackup> {
        let recorded = bases.recorded(key).map_err(|why| match qcow2::mappable(&export.disk) {
            // No base, and none can be kept for an image no map can be made of: say that.
            Ok(()) => why,
            Err(cannot) => format!("unknown: {cannot}"),
        });
        let changes = |identity: &str| {
            qcow2::changes_since_base(&export.disk, &key.group, identity, &export.tag)
        };
        self.backup_against(bases, repo, key, recorded, changes, &export.file, meta, report)
    }

    /// Backs up an LVM snapshot: a thin one against its group's base thin snapshot, if one is
    /// recorded and still the one kept (only the blocks `thin_delta` does not prove shared are
    /// read); a thick one, or a thin one without a trusted base, whole, the stats saying why.
    /// The recorded (or last) manifest is still the chunk list's parent. Also says whether the
    /// snapshot is thin (a base is then kept after the copy).
    fn backup_lvm(
        &self,
        bases: &BaseStore,
        repo: &mut Repository,
        key: &BaseKey,
        snap: &Snapshot,
        meta: VolumeMeta,
        report: &mut dyn FnMut(Progress),
    ) -> (stillpoint_saveset::Result<VolumeBackup>, bool) {
        let thin = lvm::thin::mappable(snap);
        let recorded = thin.clone().and_then(|()| bases.recorded(key));
        let changes = |identity: &str| lvm::thin::changes_since_base(snap, &key.group, identity);
        let source = Path::new(&snap.locator);
        let done = self.backup_against(bases, repo, key, recorded, changes, source, meta, report);
        (done, thin.is_ok())
    }

    /// Backs up `source` against its group's base `recorded`: with one (still the one kept,
    /// which `changes` checks), only what `changes` says may differ is read; without, or when
    /// `changes` cannot tell, everything, and the stats say why (`none: why` / `unknown: why`).
    /// The recorded (or last) manifest is still the chunk list's parent.
    #[allow(clippy::too_many_arguments)]
    fn backup_against(
        &self,
        bases: &BaseStore,
        repo: &mut Repository,
        key: &BaseKey,
        recorded: std::result::Result<RecordedBase, String>,
        changes: impl FnOnce(&str) -> std::result::Result<ChangeMap, String>,
        source: &Path,
        meta: VolumeMeta,
        report: &mut dyn FnMut(Progress),
    ) -> stillpoint_saveset::Result<VolumeBackup> {
        let (parent, why) = match recorded {
            Err(why) => (self.parents.parent(repo, key).map(Parent::pages_only), Some(why)),
            Ok(RecordedBase { manifest, identity, .. }) => match changes(&identity) {
                Ok(changed) => (
                    Some(Parent { manifest, changed, sample_percent: bases.sample_percent() }),
                    None,
                ),
                Err(why) => (Some(Parent::pages_only(manifest)), Some(why)),
            },
        };
        if let Some(why) = &why {
            info!(group = %key.group, volume = %key.volume, "no change map: {why}; reading the whole volume");
        }
        let mut done = repo.backup_volume_with(source, meta, parent.as_ref(), report)?;
        if let Some(why) = why {
            done.stats.change_map = why;
        }
        Ok(done)
    }

    /// Keeps each copied volume's new base (after the exports ended: a qcow2 snapshot needs the
    /// disk's write lock; an LVM one is taken before the cleanup deletes the backup's snapshot).
    /// The old record goes first, so a failure or a crash midway leaves no record, never a
    /// wrong one; a base not kept is logged with what the next backup will do: read the volume
    /// whole, or (when forgetting the old record failed) use the last base kept if it still
    /// matches its record.
    fn keep_bases(&self, pending: Vec<PendingBase>) {
        let Some(bases) = &self.bases else { return };
        for p in pending {
            let (kind, of) = match &p.by {
                KeptBy::Qcow2 { disk, .. } => ("qcow2", disk.as_str()),
                KeptBy::LvmThin { snapshot } => ("lvm-thin", snapshot.locator.as_str()),
            };
            if let Err(e) = bases.forget(&p.key) {
                warn!(volume = %p.key.volume, kind, of, error = %e, "new base not kept (forgetting the old record failed); the next backup of this volume uses the last base kept if it still matches its record, else reads the volume whole");
                continue;
            }
            let kept = match &p.by {
                KeptBy::Qcow2 { disk, tag } => qcow2::keep_base(disk, &p.key.group, tag),
                KeptBy::LvmThin { snapshot } => lvm::thin::keep_base(snapshot, &p.key.group),
            }
            .and_then(|identity| {
                let base = RecordedBase { backup: p.backup, manifest: p.manifest, identity };
                Ok(bases.record(&p.key, &base)?)
            });
            match kept {
                Ok(()) => {
                    info!(volume = %p.key.volume, kind, of, "base kept for the next backup's change map")
                }
                Err(e) => {
                    warn!(volume = %p.key.volume, kind, of, error = %format!("{e:#}"), "base not kept; the next backup of this volume reads it whole")
                }
            }
        }
    }
}

/// A copied volume whose base is kept once the copy's reads end.
struct PendingBase {
    key: BaseKey,
    by: KeptBy,
    backup: String,
    manifest: stillpoint_saveset::ManifestId,
}

/// Where a base is kept: a qcow2 internal snapshot of the disk, or a thin snapshot of the LVM
/// snapshot just copied.
enum KeptBy {
    Qcow2 { disk: String, tag: String },
    LvmThin { snapshot: Snapshot },
}

/// Each snapshot with the bytes its copy will read. A directory (a btrfs subvolume snapshot)
/// is refused: the block copier reads images, and a subvolume's copy is `btrfs send`'s job.
pub async fn readable(snapshots: Vec<Snapshot>) -> Result<Vec<(Snapshot, u64)>> {
    let mut out = Vec::with_capacity(snapshots.len());
    for snap in snapshots {
        let meta = tokio::fs::metadata(&snap.locator).await.map_err(|e| {
            Error::FailedPrecondition(format!(
                "volume {}: cannot read snapshot {} ({} provider): {e}",
                snap.volume, snap.locator, snap.provider
            ))
        })?;
        if meta.is_dir() {
            return Err(Error::FailedPrecondition(format!(
                "volume {}: snapshot {} is a directory ({} provider); the saveset block copier reads block images: for btrfs use [copy] mode = \"command\" (e.g. btrfs send)",
                snap.volume, snap.locator, snap.provider
            )));
        }
        let size = if meta.is_file() { meta.len() } else { snap.size_bytes };
        out.push((snap, size));
    }
    Ok(out)
}

/// Exports each qcow2 snapshot as a raw file for the copy (`snapshot::qcow2::Export`); other
/// snapshots pass unchanged. The exports must live until the copy's reads end.
pub async fn exported(snapshots: Vec<Snapshot>) -> Result<(Vec<Snapshot>, Vec<Export>)> {
    tokio::task::spawn_blocking(move || crate::snapshot::qcow2::export_for_copy(snapshots))
        .await
        .map_err(|e| Error::Internal(format!("qcow2 export: {e}")))?
        .map_err(|e| Error::FailedPrecondition(format!("{e:#}")))
}

/// What one Copy RPC copies: the backup and server (`meta`, its volume empty), the backup's
/// group (which kept base each volume is compared with) and the snapshots with their sizes.
#[derive(Debug)]
pub struct Request {
    pub meta: VolumeMeta,
    pub group: String,
    pub snapshots: Vec<(Snapshot, u64)>,
}

/// One Copy RPC's stream of events; the sender half is fed by [`spawn`].
pub type Events = mpsc::Receiver<Result<CopyEvent, Status>>;

fn progress_event(done: u64, total: u64) -> Result<CopyEvent, Status> {
    Ok(CopyEvent {
        event: Some(copy_event::Event::Progress(CopyProgress {
            done_bytes: done.min(total),
            total_bytes: total,
        })),
    })
}

/// Runs the copy of `backup`'s snapshots on a blocking thread and streams its progress (at
/// most every [`PROGRESS_EVERY`], at least every [`HEARTBEAT_EVERY`]) then its result. The
/// hold moves into the blocking thread: the snapshots stay until the reader is done with them,
/// even if the caller went away first (it is then asked to stop at its next volume).
pub fn spawn(
    saveset: Arc<Saveset>,
    request: Request,
    hold: CopyHold,
    exports: Vec<Export>,
) -> Events {
    let (tx, rx) = mpsc::channel(8);
    let span = tracing::info_span!("copy", backup = %request.meta.backup, server = %request.meta.server, group = %request.group);
    let total: u64 = request.snapshots.iter().map(|(_, size)| size).sum();
    let (progress_tx, mut progress_rx) = watch::channel(0u64);
    let stop = hold.stop_flag();
    let stopped = hold.stop_flag();
    let metrics = hold.metrics();
    let blocking_span = span.clone();
    let mut blocking = tokio::task::spawn_blocking(move || {
        let _span = blocking_span.enter();
        let _hold = hold;
        let progress = |done: u64| {
            progress_tx.send_replace(done);
        };
        let copied = saveset.copy_server(&request, &exports, &progress, &stop);
        // Dropped before the hold and before the bases are kept: a qcow2 export holds the
        // disk's lock, which a snapshot or a delete needs.
        drop(exports);
        copied.map(|(done, pending)| {
            saveset.keep_bases(pending);
            done
        })
    });
    tokio::spawn(
        async move {
            info!(total_bytes = total, "copy started");
            let started = Instant::now();
            let mut last_sent = Instant::now();
            if tx.send(progress_event(0, total)).await.is_err() {
                stopped.store(true, Ordering::SeqCst);
                return;
            }
            let result = loop {
                tokio::select! {
                    joined = &mut blocking => {
                        break joined.unwrap_or_else(|e| Err(format!("copier thread failed: {e}")));
                    }
                    () = tokio::time::sleep(PROGRESS_EVERY) => {
                        let changed = progress_rx.has_changed().unwrap_or(false);
                        if !changed && last_sent.elapsed() < HEARTBEAT_EVERY {
                            continue;
                        }
                        let done = *progress_rx.borrow_and_update();
                        if tx.send(progress_event(done, total)).await.is_err() {
                            // The listener went away: nobody will use this copy.
                            warn!("the caller went away; asking the copy to stop at its next volume");
                            stopped.store(true, Ordering::SeqCst);
                            return;
                        }
                        last_sent = Instant::now();
                    }
                }
            };
            let event = match result {
                Ok(done) => {
                    let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    info!(took_ms, "copy done");
                    let (read, stored) =
                        done.stats.as_ref().map_or((0, 0), |s| (s.bytes_read, s.bytes_stored));
                    metrics.copied(read, stored);
                    let _ = tx.send(progress_event(total, total)).await;
                    Ok(CopyEvent { event: Some(copy_event::Event::Done(done)) })
                }
                Err(e) if stopped.load(Ordering::SeqCst) => {
                    warn!(error = %e, "copy stopped");
                    Err(Status::aborted(e))
                }
                Err(e) => {
                    warn!(error = %e, "copy failed");
                    Err(Status::internal(e))
                }
            };
            let _ = tx.send(event).await;
        }
        .instrument(span),
    );
    rx
}
