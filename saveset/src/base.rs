//! The copier's kept base per (group, server, volume): after a volume's backup succeeds, a
//! reflink clone of the snapshot it read, with a sidecar naming the volume manifest it went into
//! and the clone's identity. The next backup of that volume trusts the base only if its identity
//! and the manifest are unchanged, and reads only what changed since. Kept by the copier, not the
//! provider: the base must be exactly what the manifest holds and outlive the provider's cleanup.
//! A base the provider keeps itself (a qcow2 internal snapshot) is only recorded here
//! ([`RecordedBase`]): its identity is the caller's text, compared by the caller.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::backup::{Parent, DEFAULT_SAMPLE_PERCENT};
use crate::changes::changes_between_files;
use crate::crypto::hex;
use crate::error::{Error, IoContext, Result};
use crate::manifest::{ManifestId, ManifestSummary, VolumeMeta};
use crate::{Progress, Repository, VolumeBackup};

/// Which volume a base belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BaseKey {
    pub group: String,
    pub server: String,
    pub volume: String,
}

/// What a kept base file must still be: any difference means someone touched it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    mode: u32,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Identity {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode() & 0o7777,
        }
    }

    /// The first field that differs, for the log.
    fn differs(&self, now: &Identity) -> Option<String> {
        let fields = [
            ("device", self.dev.to_string(), now.dev.to_string()),
            ("inode", self.ino.to_string(), now.ino.to_string()),
            ("size", self.size.to_string(), now.size.to_string()),
            ("mtime", self.mtime_ns.to_string(), now.mtime_ns.to_string()),
            ("ctime", self.ctime_ns.to_string(), now.ctime_ns.to_string()),
            ("mode", format!("{:o}", self.mode), format!("{:o}", now.mode)),
        ];
        fields.into_iter().find(|(_, a, b)| a != b).map(|(f, a, b)| format!("{f} {a}, now {b}"))
    }
}

/// The sidecar record of a kept base (`<name>.json`, written temp+rename after the base).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Sidecar {
    #[serde(flatten)]
    key: BaseKey,
    /// The backup and the volume manifest the base's content went into.
    backup: String,
    manifest: ManifestId,
    identity: Identity,
}

/// The record of a base kept outside this store (`<key>.kept.json`): a provider's own snapshot,
/// e.g. a qcow2 internal snapshot. `identity` is the caller's text (what the base must still be);
/// the caller compares it with the base it finds, and computes the change map itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedBase {
    /// The backup and the volume manifest the base's content went into.
    pub backup: String,
    pub manifest: ManifestId,
    pub identity: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct KeptSidecar {
    #[serde(flatten)]
    key: BaseKey,
    #[serde(flatten)]
    base: RecordedBase,
}

/// Reads the base record at `path`, which must be `key`'s (`key_of` says whose it is); or why
/// there is none (`none: why`), for the stats.
fn read_record<T: serde::de::DeserializeOwned>(
    path: &Path,
    key: &BaseKey,
    key_of: impl Fn(&T) -> &BaseKey,
) -> std::result::Result<T, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("none: no base kept yet".into())
        }
        Err(e) => return Err(format!("none: base record {}: {e}", path.display())),
    };
    let record: T = serde_json::from_slice(&text)
        .map_err(|e| format!("none: base record {}: {e}", path.display()))?;
    if key_of(&record) != key {
        return Err(format!("none: base record {} is another volume's", path.display()));
    }
    Ok(record)
}

/// A directory of kept bases, on the same filesystem as the snapshots (a reflink clone cannot
/// cross filesystems: then no base is kept, once logged, and every backup reads everything).
#[derive(Debug)]
pub struct BaseStore {
    dir: PathBuf,
    sample_percent: f64,
    /// Set once a clone was refused, so the reason is logged once, not per volume.
    refused_logged: AtomicBool,
}

/// A clone of a snapshot in a temp file of the base store ([`BaseStore::clone_snapshot`]),
/// removed when dropped unless it was renamed into place.
#[derive(Debug)]
struct ClonedBase {
    tmp: PathBuf,
    file: File,
    kept: bool,
}

impl Drop for ClonedBase {
    fn drop(&mut self) {
        if !self.kept {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl BaseStore {
    /// Opens (creating, mode 0700) the base directory; temp files a crash left are removed.
    pub fn open(dir: &Path) -> Result<BaseStore> {
        std::fs::create_dir_all(dir).ctx("create", dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).ctx("chmod", dir)?;
        for entry in std::fs::read_dir(dir).ctx("list", dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with("tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(BaseStore {
            dir: dir.to_path_buf(),
            sample_percent: DEFAULT_SAMPLE_PERCENT,
            refused_logged: AtomicBool::new(false),
        })
    }

    /// The share of skipped chunks the sampling verify re-reads, in percent (0: none).
    #[must_use]
    pub fn with_sample(mut self, percent: f64) -> Self {
        self.sample_percent = percent;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The share of skipped chunks the sampling verify re-reads, in percent.
    pub fn sample_percent(&self) -> f64 {
        self.sample_percent
    }

    fn kept_path(&self, key: &BaseKey) -> PathBuf {
        self.paths(key).1.with_extension("kept.json")
    }

    /// The record of `key`'s base kept outside this store, or why there is none (`none: why`).
    pub fn recorded(&self, key: &BaseKey) -> std::result::Result<RecordedBase, String> {
        let record = read_record(&self.kept_path(key), key, |r: &KeptSidecar| &r.key)?;
        Ok(record.base)
    }

    /// Records `base` as `key`'s base kept outside this store (temp+fsync+rename). Record only
    /// after the base exists, holds what `base.manifest` holds and was checked.
    pub fn record(&self, key: &BaseKey, base: &RecordedBase) -> Result<()> {
        let record = KeptSidecar { key: key.clone(), base: base.clone() };
        let text = serde_json::to_vec_pretty(&record).expect("a record serializes");
        self.write_sidecar(&self.kept_path(key), &text)
    }

    /// Forgets the record of `key`'s base kept outside this store (before that base is
    /// replaced, so a crash midway leaves no record rather than a wrong one).
    pub fn forget(&self, key: &BaseKey) -> Result<()> {
        let path = self.kept_path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => File::open(&self.dir).and_then(|d| d.sync_all()).ctx("fsync", &self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("remove", &path),
        }
    }

    /// Writes `text` to `path` by temp+fsync+rename, then fsyncs the directory.
    fn write_sidecar(&self, path: &Path, text: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!("tmp-{}.json", hex(&crate::crypto::random::<8>())));
        let written = (|| {
            let mut f = File::create(&tmp).ctx("create", &tmp)?;
            f.write_all(text).ctx("write", &tmp)?;
            f.sync_all().ctx("fsync", &tmp)?;
            std::fs::rename(&tmp, path).ctx("rename", path)?;
            File::open(&self.dir).and_then(|d| d.sync_all()).ctx("fsync", &self.dir)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    fn paths(&self, key: &BaseKey) -> (PathBuf, PathBuf) {
        let mut h = blake3::Hasher::new();
        for part in [&key.group, &key.server, &key.volume] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let name = hex(&h.finalize().as_bytes()[..16]);
        (self.dir.join(format!("{name}.base")), self.dir.join(format!("{name}.json")))
    }

    /// The parent to back `snapshot` up against: the kept base's manifest and the change map
    /// between the base and `snapshot`; or why there is none (`none: why`), then everything is
    /// read. A base is trusted only if its identity is the one recorded and its manifest is
    /// still in `repo` with the snapshot's size and the repository's chunk size.
    pub fn find(
        &self,
        repo: &Repository,
        key: &BaseKey,
        snapshot: &Path,
    ) -> std::result::Result<Parent, String> {
        self.find_record(repo, key, snapshot).map(|(parent, _)| parent)
    }

    /// [`BaseStore::find`], with the record the base was trusted by.
    fn find_record(
        &self,
        repo: &Repository,
        key: &BaseKey,
        snapshot: &Path,
    ) -> std::result::Result<(Parent, Sidecar), String> {
        let (base, sidecar) = self.paths(key);
        let record = read_record(&sidecar, key, |r: &Sidecar| &r.key)?;
        let file = File::open(&base).map_err(|e| format!("none: base {}: {e}", base.display()))?;
        let now = file.metadata().map_err(|e| format!("none: base {}: {e}", base.display()))?;
        if let Some(what) = record.identity.differs(&Identity::of(&now)) {
            return Err(format!(
                "none: base {} changed since it was kept ({what})",
                base.display()
            ));
        }
        let snap =
            File::open(snapshot).map_err(|e| format!("none: {}: {e}", snapshot.display()))?;
        let size = snap.metadata().map_err(|e| format!("none: {}: {e}", snapshot.display()))?.len();
        match repo.load_summary(record.manifest) {
            Ok(ManifestSummary::Volume(v)) if v.size == size && v.chunk_size == repo.chunk_size() => {}
            Ok(ManifestSummary::Volume(v)) => {
                return Err(format!(
                    "none: parent manifest {} has size {} and chunk size {}, the snapshot {size} and the repository {}",
                    record.manifest, v.size, v.chunk_size, repo.chunk_size()
                ))
            }
            Ok(ManifestSummary::Backup(_)) => {
                return Err(format!("none: parent {} is not a volume manifest", record.manifest))
            }
            Err(Error::UnknownManifest { .. }) => {
                return Err(format!(
                    "none: parent manifest {} (backup {}) is no longer in the repository",
                    record.manifest, record.backup
                ))
            }
            Err(e) => return Err(format!("none: parent manifest {}: {e}", record.manifest)),
        }
        let changed = changes_between_files((&file, &base), (&snap, snapshot))
            .map_err(|e| format!("none: change map: {e}"))?;
        let parent =
            Parent { manifest: record.manifest, changed, sample_percent: self.sample_percent };
        Ok((parent, record))
    }

    /// A read-only clone of `snapshot` in a temp file of the store, removed when dropped unless
    /// kept. A snapshot does not change, so the clone can be made while it is being read.
    fn clone_snapshot(&self, snapshot: &Path) -> Result<ClonedBase> {
        let src = File::open(snapshot).ctx("open", snapshot)?;
        let (tmp, file) = crate::index::private_file(&self.dir, "tmp-", ".base")
            .ctx("create a base in", &self.dir)?;
        let clone = ClonedBase { tmp, file, kept: false };
        stillpoint_sys::clone_file(&src, &clone.file).ctx("clone (FICLONE) into", &clone.tmp)?;
        clone
            .file
            .set_permissions(std::fs::Permissions::from_mode(0o400))
            .ctx("chmod", &clone.tmp)?;
        Ok(clone)
    }

    /// Makes `clone` the base of `key`: fsync, renamed over the old base, then the sidecar
    /// (temp+rename). A crash between leaves a sidecar whose identity no longer matches: a full
    /// read, never a wrong base. Errors say why no base was kept (the backup itself succeeded).
    fn keep_clone(
        &self,
        key: &BaseKey,
        mut clone: ClonedBase,
        backup: &VolumeBackup,
    ) -> Result<()> {
        let (base, _) = self.paths(key);
        clone.file.sync_all().ctx("fsync", &clone.tmp)?;
        std::fs::rename(&clone.tmp, &base).ctx("rename", &base)?;
        clone.kept = true;
        // After the rename, which may change the ctime.
        let identity = Identity::of(&clone.file.metadata().ctx("stat", &base)?);
        self.write_record(key, identity, backup)
    }

    /// Records `backup` as what the unchanged base of `key` holds, where the backup read
    /// nothing: an empty change map, every chunk taken from the parent, the sample matching.
    /// The base then holds exactly what the new manifest holds, and stays as it is (no clone,
    /// no fsync of a new base, no eviction of the old one: a third of an unchanged volume's
    /// backup at 16 GiB). It must still be what `old` recorded (nothing touched it meanwhile).
    fn keep_unchanged(&self, key: &BaseKey, old: &Sidecar, backup: &VolumeBackup) -> Result<()> {
        let (base, _) = self.paths(key);
        let now = Identity::of(&std::fs::metadata(&base).ctx("stat", &base)?);
        if let Some(what) = old.identity.differs(&now) {
            let changed = std::io::Error::other(format!("changed during the backup ({what})"));
            return Err(changed).ctx("keep the unchanged base", &base);
        }
        self.write_record(key, old.identity, backup)
    }

    /// Writes the sidecar of `key`'s base: `identity`, holding what `backup` holds.
    fn write_record(&self, key: &BaseKey, identity: Identity, backup: &VolumeBackup) -> Result<()> {
        let record = Sidecar {
            key: key.clone(),
            backup: backup.manifest.meta.backup.clone(),
            manifest: backup.id,
            identity,
        };
        let text = serde_json::to_vec_pretty(&record).expect("a sidecar serializes");
        self.write_sidecar(&self.paths(key).1, &text)
    }

    /// Backs `snapshot` up as `meta`'s volume against the kept base of `key` (if any can be
    /// trusted), then keeps `snapshot` as the new base. Why no base was used is in the stats'
    /// `change_map` and a log line; failing to keep the new base is logged and leaves the old
    /// one, which still matches its own manifest. The new base is cloned while the snapshot is
    /// read (a clone of a large file with many extents takes a while on btrfs).
    pub fn backup(
        &self,
        repo: &mut Repository,
        key: &BaseKey,
        snapshot: &Path,
        meta: VolumeMeta,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<VolumeBackup> {
        let found = match self.find_record(repo, key, snapshot) {
            Ok(found) => found,
            Err(why) => {
                tracing::info!(group = %key.group, server = %key.server, volume = %key.volume, "no change map: {why}; reading the whole volume");
                let mut done = self.backup_and_keep(repo, key, snapshot, meta, None, progress)?;
                done.stats.change_map = why;
                return Ok(done);
            }
        };
        self.backup_and_keep(repo, key, snapshot, meta, Some(&found), progress)
    }

    fn backup_and_keep(
        &self,
        repo: &mut Repository,
        key: &BaseKey,
        snapshot: &Path,
        meta: VolumeMeta,
        found: Option<&(Parent, Sidecar)>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<VolumeBackup> {
        // With an empty map the base may stay as it is: no clone unless the backup read something.
        let unchanged = found.filter(|(parent, _)| parent.changed.is_empty());
        std::thread::scope(|s| {
            let cloning = unchanged.is_none().then(|| s.spawn(|| self.clone_snapshot(snapshot)));
            let done = repo.backup_volume_with(snapshot, meta, found.map(|(p, _)| p), progress);
            // A failed backup drops the clone (its temp file is removed).
            let cloned = cloning.map(|c| c.join().expect("cloning does not panic"));
            let done = done?;
            let kept = match (cloned, unchanged) {
                (Some(cloned), _) => cloned.and_then(|clone| self.keep_clone(key, clone, &done)),
                (None, Some((_, old))) if done.stats.read_nothing() => {
                    self.keep_unchanged(key, old, &done)
                }
                (None, _) => self
                    .clone_snapshot(snapshot)
                    .and_then(|clone| self.keep_clone(key, clone, &done)),
            };
            self.log_not_kept(key, kept);
            Ok(done)
        })
    }

    fn log_not_kept(&self, key: &BaseKey, kept: Result<()>) {
        let Err(e) = kept else { return };
        let refused = matches!(&e, Error::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL)));
        if !refused {
            tracing::warn!(volume = %key.volume, error = %e, "new base not kept; the next backup of this volume uses the last base kept if its record still matches it, else reads the volume whole");
        } else if !self.refused_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.dir.display(),
                error = %e,
                "base dir cannot reflink-clone these snapshots (another filesystem, or one without reflink): no change tracking, every backup reads everything"
            );
        }
    }
}

/// The parent of each volume's chunk list for copiers that keep no base (no `base_dir`): the
/// volume's last backup by this process, else the newest in the repository, looked up once per
/// volume ([`Repository::latest_volume`]). Unchanged chunk list pages are then shared and
/// changed ones stored as deltas, so an incremental adds metadata in proportion to the change
/// even when every chunk is read.
#[derive(Debug, Default)]
pub struct Parents {
    /// The last backup this process wrote of each volume, per group.
    last: std::sync::Mutex<std::collections::HashMap<BaseKey, ManifestId>>,
    /// The repository's newest backup of each (server, volume), from one search, made at the
    /// first backup of a volume this process has not backed up yet.
    found: std::sync::OnceLock<std::collections::HashMap<(String, String), ManifestId>>,
}

impl Parents {
    /// The parent for `key`'s next backup (`None`: its first, or the repository could not be
    /// searched; then the chunk list is written whole, which costs only metadata).
    pub fn parent(&self, repo: &Repository, key: &BaseKey) -> Option<ManifestId> {
        let last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(id) = last.get(key) {
            return Some(*id);
        }
        drop(last);
        // Searched without the lock held (concurrent copies of other servers go on); two
        // first copies may both search, and one result is kept.
        let found = self.found.get_or_init(|| {
            repo.latest_volumes().unwrap_or_else(|e| {
                tracing::warn!("no parents for chunk lists: the repository's manifests could not be listed: {e}");
                std::collections::HashMap::new()
            })
        });
        found.get(&(key.server.clone(), key.volume.clone())).copied()
    }

    /// Records `id` as `key`'s newest backup.
    pub fn backed_up(&self, key: &BaseKey, id: ManifestId) {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        last.insert(key.clone(), id);
    }

    /// Backs `source` up as the next backup of `key`, its chunk list against the parent.
    pub fn backup(
        &self,
        repo: &mut Repository,
        key: &BaseKey,
        source: &Path,
        meta: VolumeMeta,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<VolumeBackup> {
        let parent = self.parent(repo, key);
        let done = repo.backup_volume_child(source, meta, parent, progress)?;
        self.backed_up(key, done.id);
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{ChunkList, VolumeManifest};

    /// An unchanged volume's base is recorded as holding the new backup only if it is still
    /// what its record says: touched meanwhile, it is not recorded (the old record stays, and
    /// names an identity the base no longer has, so the next backup reads everything).
    #[test]
    fn a_base_touched_during_an_unchanged_backup_is_not_recorded_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = BaseStore::open(dir.path()).expect("open store");
        let key = BaseKey { group: "g".into(), server: "s".into(), volume: "v".into() };
        let (base, sidecar) = store.paths(&key);
        std::fs::write(&base, b"the base").expect("write base");
        let old = Sidecar {
            key: key.clone(),
            backup: "b1".into(),
            manifest: ManifestId([1; 32]),
            identity: Identity::of(&std::fs::metadata(&base).expect("stat")),
        };
        let text = serde_json::to_vec_pretty(&old).expect("serializes");
        store.write_sidecar(&sidecar, &text).expect("record");
        let meta = VolumeMeta { backup: "b2".into(), server: "s".into(), volume: "v".into() };
        let manifest = VolumeManifest {
            meta,
            size: 8,
            chunk_size: 4096,
            chunks: ChunkList::Flat(Vec::new()),
            created_unix_ms: 0,
        };
        let backup = VolumeBackup { id: ManifestId([2; 32]), manifest, stats: Default::default() };

        // Untouched: recorded as holding b2, with the identity it had.
        store.keep_unchanged(&key, &old, &backup).expect("kept");
        let now: Sidecar =
            serde_json::from_slice(&std::fs::read(&sidecar).expect("read")).expect("a record");
        assert_eq!((now.backup.as_str(), now.manifest), ("b2", ManifestId([2; 32])));
        assert_eq!(now.identity, old.identity);

        // Touched (its mode changed): refused, and the record is left as it was.
        let before = std::fs::read(&sidecar).expect("read");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let backup3 = VolumeBackup { id: ManifestId([3; 32]), ..backup };
        let err = store.keep_unchanged(&key, &old, &backup3).expect_err("touched").to_string();
        assert!(err.contains("changed during the backup (") && err.contains(".base"), "{err}");
        assert_eq!(std::fs::read(&sidecar).expect("read"), before);
    }
}
