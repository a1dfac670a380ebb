//! The repository over a [`Storage`]: config and keys, the chunk index loaded in memory, pack
//! writing and chunk reading. Backup, restore and verify build on these; where the bytes live
//! (a directory, an S3 prefix) is `storage.rs`'s business.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::claims::Claims;
use crate::crypto::{self, hex, unhex_vec, ChunkOpener, ChunkSealer, KdfParams, MasterKey, Secret};
use crate::direct;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::manifest::{self, ChunkId, Manifest, ManifestId, ManifestSummary, PackId};
use crate::storage::{self, Location, Storage};

/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 1;
const CONFIG_AAD: &[u8] = b"stillpoint-saveset config v1";
const RAW: u8 = 0;
const ZSTD: u8 = 1;

/// Choices fixed when a repository is created.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Fixed chunk size in bytes, a multiple of 4096 (`init` panics otherwise); see FORMAT.md
    /// for why 4 KiB.
    pub chunk_size: u32,
    /// A pack is closed once it reaches this many bytes.
    pub pack_size: u64,
    /// zstd level for chunks (1-3 is the useful range for throughput).
    pub zstd_level: i32,
    /// Cost of deriving the key-encryption key from the secret.
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: 4096,
            pack_size: 16 * 1024 * 1024,
            zstd_level: 1,
            kdf: KdfParams::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    version: u32,
    chunk_size: u32,
    pack_size: u64,
    zstd_level: i32,
    kdf: KdfConfig,
    /// The 64-byte master key sealed under the argon2id-derived key, hex.
    master_key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KdfConfig {
    algorithm: String,
    #[serde(flatten)]
    params: KdfParams,
    salt: String,
}

/// How a repository is opened: where its local index cache lives and how much memory the index
/// may use. Today's [`Repository::open`] and [`Repository::open_at`] use the default.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The cache directory (the index cache goes in `<dir>/index/<repository tag>`). `None`:
    /// [`OpenOptions::default_cache_dir`], or a private temp dir removed when the repository
    /// is dropped when there is none.
    pub cache_dir: Option<PathBuf>,
    /// Bytes the index may hold in memory (default [`crate::DEFAULT_MEMORY_BUDGET`]); prune's and
    /// verify's sets of referenced chunks get as much again.
    pub memory_budget: Option<u64>,
}

/// A memory budget configured in MiB (`memory_budget_mib`, `--memory-budget-mib`), in bytes:
/// from 1 MiB to 1 TiB; the error says what was wrong, for the caller to name the field.
pub fn memory_budget_from_mib(mib: u64) -> std::result::Result<u64, String> {
    if (1..=1 << 20).contains(&mib) {
        Ok(mib << 20)
    } else {
        Err(format!(
            "{mib} is not a memory budget in MiB: give 1 to 1048576 (the default is {})",
            crate::index::DEFAULT_MEMORY_BUDGET >> 20
        ))
    }
}

impl OpenOptions {
    /// Options with this cache directory.
    pub fn with_cache_dir(dir: impl Into<PathBuf>) -> Self {
        OpenOptions { cache_dir: Some(dir.into()), memory_budget: None }
    }

    /// `$STILLPOINT_CACHE_DIR`, else `$XDG_CACHE_HOME/stillpoint`, else `~/.cache/stillpoint`.
    pub fn default_cache_dir() -> Option<PathBuf> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        var("STILLPOINT_CACHE_DIR")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("stillpoint")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("stillpoint")))
    }

    fn index(&self, key: &MasterKey) -> Result<Index> {
        let tag = cache_tag(key);
        let budget = self.memory_budget.unwrap_or(crate::index::DEFAULT_MEMORY_BUDGET);
        let root = self.cache_dir.clone().or_else(Self::default_cache_dir);
        match root {
            Some(root) => match Index::open(Some(&root.join("index")), tag, budget) {
                Ok(index) => Ok(index),
                // An unusable cache directory costs speed, not the backup: a private one.
                Err(e) => {
                    tracing::warn!(error = %e, "index cache unusable; using a temporary one");
                    Index::open(None, tag, budget)
                }
            },
            None => Index::open(None, tag, budget),
        }
    }
}

/// Names the repository's index cache: a keyed hash, so another repository (another key)
/// never takes this one's cache for its own.
fn cache_tag(key: &MasterKey) -> [u8; 16] {
    key.chunk_id(b"stillpoint index cache v1")[..16].try_into().expect("16 bytes")
}

/// Where a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ChunkLoc {
    pub pack: PackId,
    pub offset: u64,
    pub len: u32,
}

/// An open, unlocked repository.
pub struct Repository {
    /// How messages name the repository: its directory or `s3://bucket/prefix`.
    pub(crate) root: PathBuf,
    pub(crate) storage: Arc<dyn Storage>,
    config: Config,
    pub(crate) key: MasterKey,
    /// Every chunk some index file names, with the first location seen, and the index files
    /// already loaded (index files are named after their pack).
    pub(crate) index: Arc<Index>,
    /// How it was opened (a pool opens more handles the same way).
    pub(crate) options: OpenOptions,
    /// Shared with the other handles of the same [`crate::Pool`]: chunks their copies are
    /// storing right now (`claims.rs`). `None` for a handle of its own.
    pub(crate) claims: Option<Arc<Claims>>,
    /// The chunk list pages read last, decoded (`chunklist.rs`).
    pub(crate) pages: crate::chunklist::PageCache,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository").field("root", &self.root).finish_non_exhaustive()
    }
}

impl Repository {
    /// Creates a repository in `path` (absent or an empty directory), locked by `secret`.
    pub fn init(path: &Path, secret: &Secret) -> Result<Self> {
        Self::init_with(path, secret, InitOptions::default())
    }

    /// [`Repository::init`] with explicit chunking, pack and KDF choices.
    pub fn init_with(path: &Path, secret: &Secret, opts: InitOptions) -> Result<Self> {
        Self::init_at(&Location::Local(path.to_owned()), secret, opts)
    }

    /// Creates a repository at `location` (an absent or empty directory, or an S3 prefix
    /// holding no objects; the bucket must exist).
    pub fn init_at(location: &Location, secret: &Secret, opts: InitOptions) -> Result<Self> {
        assert!(
            opts.chunk_size >= 4096 && opts.chunk_size & 4095 == 0,
            "chunk size must be a multiple of 4096"
        );
        let storage: Arc<dyn Storage> = storage::connect(location, true)?.into();
        let master: [u8; 64] = crypto::random();
        let salt: [u8; 16] = crypto::random();
        let kek = crypto::derive_kek(secret, &salt, opts.kdf)?;
        let sealed = crypto::Cipher::new(kek).seal(CONFIG_AAD, &master);
        let config = Config {
            version: FORMAT_VERSION,
            chunk_size: opts.chunk_size,
            pack_size: opts.pack_size,
            zstd_level: opts.zstd_level,
            kdf: KdfConfig { algorithm: "argon2id".into(), params: opts.kdf, salt: hex(&salt) },
            master_key: hex(&sealed),
        };
        let key = MasterKey::from_bytes(&master);
        let options = OpenOptions::default();
        let repo = Repository {
            root: PathBuf::from(location.to_string()),
            storage,
            config,
            index: Arc::new(options.index(&key)?),
            key,
            options,
            claims: None,
            pages: crate::chunklist::PageCache::default(),
        };
        let text = serde_json::to_vec_pretty(&repo.config).expect("config serializes");
        // The config goes last: a location without it is not yet a repository.
        repo.storage.put("config", &text)?;
        Ok(repo)
    }

    /// Opens and unlocks the repository in `path`; a wrong secret is [`Error::WrongSecret`].
    pub fn open(path: &Path, secret: &Secret) -> Result<Self> {
        Self::open_at(&Location::Local(path.to_owned()), secret)
    }

    /// Opens and unlocks the repository at `location`; see [`Repository::open`].
    pub fn open_at(location: &Location, secret: &Secret) -> Result<Self> {
        Self::open_with(location, secret, OpenOptions::default())
    }

    /// [`Repository::open_at`] with the index cache and memory budget of `options`.
    pub fn open_with(location: &Location, secret: &Secret, options: OpenOptions) -> Result<Self> {
        let mut repo = Self::unlock_at(location, secret)?;
        repo.index = Arc::new(options.index(&repo.key)?);
        repo.options = options;
        repo.refresh_index()?;
        Ok(repo)
    }

    /// Another handle to a repository, sharing the index `index` of the first (a pool's).
    pub(crate) fn open_shared(
        location: &Location,
        secret: &Secret,
        options: &OpenOptions,
        index: Arc<Index>,
    ) -> Result<Self> {
        let mut repo = Self::unlock_at(location, secret)?;
        repo.index = index;
        repo.options = options.clone();
        repo.refresh_index()?;
        Ok(repo)
    }

    /// Checks that `secret` unlocks the repository at `location` (the errors of
    /// [`Repository::open`]) without loading its index: for validating a configuration, whose
    /// owner opens the repository for real afterwards.
    pub fn check_secret(location: &Location, secret: &Secret) -> Result<()> {
        Self::unlock_at(location, secret).map(drop)
    }

    /// Reads the config and unwraps the master key; the index is left empty.
    fn unlock_at(location: &Location, secret: &Secret) -> Result<Self> {
        let path = PathBuf::from(location.to_string());
        let path = path.as_path();
        let not_repo = |reason: String| Error::NotARepository { path: path.to_owned(), reason };
        let storage: Arc<dyn Storage> = storage::connect(location, false)?.into();
        let text = match storage.get("config") {
            Ok(Some(t)) => t,
            Ok(None) => return Err(not_repo("no config".into())),
            Err(e) => return Err(e),
        };
        let config: Config =
            serde_json::from_slice(&text).map_err(|e| not_repo(format!("config: {e}")))?;
        if config.version != FORMAT_VERSION {
            return Err(not_repo(format!("format version {} is not supported", config.version)));
        }
        if config.kdf.algorithm != "argon2id" {
            return Err(not_repo(format!("kdf {:?} is not supported", config.kdf.algorithm)));
        }
        let salt = unhex_vec(&config.kdf.salt).ok_or_else(|| not_repo("config: salt".into()))?;
        let sealed =
            unhex_vec(&config.master_key).ok_or_else(|| not_repo("config: master_key".into()))?;
        let kek = crypto::derive_kek(secret, &salt, config.kdf.params)?;
        let master = crypto::Cipher::new(kek)
            .open(CONFIG_AAD, &sealed)
            .and_then(|m| <[u8; 64]>::try_from(m).ok())
            .ok_or_else(|| Error::WrongSecret { path: path.to_owned() })?;
        Ok(Repository {
            root: path.to_owned(),
            storage,
            config,
            key: MasterKey::from_bytes(&master),
            index: Arc::new(Index::default()),
            options: OpenOptions::default(),
            claims: None,
            pages: crate::chunklist::PageCache::default(),
        })
    }

    /// The tag of this repository's index cache.
    pub(crate) fn cache_tag(&self) -> [u8; 16] {
        cache_tag(&self.key)
    }

    /// The repository's directory, or its `s3://bucket/prefix` URL.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The objects the repository is made of.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
    }

    /// The fixed chunk size new backups use.
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    pub(crate) fn pack_size(&self) -> u64 {
        self.config.pack_size
    }

    pub(crate) fn zstd_level(&self) -> i32 {
        self.config.zstd_level
    }

    /// Loads index files written since the last call (by this or another writer). An index
    /// file that does not decrypt is skipped here; `verify` reports it.
    ///
    /// Packs a prune marked for deletion (`pending/`) and packs whose index file is gone are
    /// excluded from dedup, and their index files are loaded after the others so that a chunk
    /// also stored elsewhere is read from the copy that stays. Pending records are listed
    /// before the index files: a record deleted in between had its packs' index files deleted
    /// before it (FORMAT.md, "Prune").
    ///
    /// The index is a local cache (FORMAT.md, "The index cache"): only index files it does not
    /// hold yet are read; what was read is written to the cache before this returns. Takes
    /// `&self`: the index is shared behind a lock, so a restore refreshes it too.
    pub fn refresh_index(&self) -> Result<()> {
        let pending = crate::prune::pending_packs(self)?;
        let mut new = Vec::new();
        let mut listed = crate::index::IdSet::default();
        for (key, _) in self.storage.list("index/")? {
            let Ok(id) = key["index/".len()..].parse::<PackId>() else { continue };
            listed.insert(id);
            if !self.index.has_pack(&id) {
                new.push(id);
            }
        }
        let excluded = |id: &PackId| pending.contains(id) || !listed.contains(id);
        self.index.set_excluded(excluded);
        // Packs that stay first, so that their locations win.
        new.sort_by_key(|id| pending.contains(id));
        for id in new {
            if let Ok(entries) = self.read_index(id) {
                self.index.add_pack(id, entries.into_iter().map(|(c, l)| (c, l.offset, l.len)))?;
            }
        }
        self.index.sync()?;
        self.index.set_excluded(excluded);
        self.index.set_gone(|id| !listed.contains(id));
        Ok(())
    }

    /// Names (ids) of the files in `dir` (`index` or `manifests`), sorted.
    pub(crate) fn list_ids<T: std::str::FromStr>(&self, dir: &str) -> Result<Vec<T>> {
        let listed = self.storage.list(&format!("{dir}/"))?;
        Ok(listed.into_iter().filter_map(|(key, _)| key[dir.len() + 1..].parse().ok()).collect())
    }

    /// Every pack file present, with its size.
    pub(crate) fn list_packs(&self) -> Result<HashMap<PackId, u64>> {
        let listed = self.storage.list("packs/")?;
        Ok(listed
            .into_iter()
            .filter_map(|(key, len)| Some((key.rsplit('/').next()?.parse().ok()?, len)))
            .collect())
    }

    /// How messages and damage reports name a pack.
    pub(crate) fn pack_path(&self, id: PackId) -> PathBuf {
        self.storage.describe(&pack_key(id))
    }

    /// Reads and decrypts the index file of pack `id`.
    pub(crate) fn read_index(&self, id: PackId) -> Result<Vec<(ChunkId, ChunkLoc)>> {
        let name = id.to_string();
        let key = format!("index/{name}");
        let path = self.storage.describe(&key);
        let Some(blob) = self.storage.get(&key)? else {
            let gone = std::io::Error::new(ErrorKind::NotFound, "no such object");
            return Err(Error::Io { op: "read", path, source: gone });
        };
        let damaged = |reason: &str| Error::Damaged {
            what: format!("index file {}", path.display()),
            reason: reason.into(),
        };
        let plain = self
            .key
            .open(format!("index/{name}").as_bytes(), &blob)
            .ok_or_else(|| damaged("does not decrypt"))?;
        if plain.len() % INDEX_ENTRY != 0 {
            return Err(damaged("bad length"));
        }
        // The in-memory index holds offsets as u32 (packs are closed at pack_size, far less).
        if plain.chunks_exact(INDEX_ENTRY).any(|e| e[36..40] != [0; 4]) {
            return Err(damaged("offset beyond 4 GiB"));
        }
        Ok(plain
            .chunks_exact(INDEX_ENTRY)
            .map(|e| {
                let chunk = ChunkId(e[..32].try_into().expect("32"));
                let offset = u64::from_le_bytes(e[32..40].try_into().expect("8"));
                let len = u32::from_le_bytes(e[40..44].try_into().expect("4"));
                (chunk, ChunkLoc { pack: id, offset, len })
            })
            .collect())
    }

    /// Reads and decrypts a manifest.
    pub fn load_manifest(&self, id: ManifestId) -> Result<Manifest> {
        self.load_manifest_as(id, manifest::decode_manifest)
    }

    /// Reads a manifest without keeping a volume's chunk list: a few dozen bytes per manifest
    /// however large the volume, for searching a repository of many backups.
    pub fn load_summary(&self, id: ManifestId) -> Result<ManifestSummary> {
        self.load_manifest_as(id, manifest::decode_summary)
    }

    fn load_manifest_as<T>(
        &self,
        id: ManifestId,
        decode: fn(&[u8]) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let name = id.to_string();
        let key = format!("manifests/{name}");
        let path = self.storage.describe(&key);
        let Some(blob) = self.storage.get(&key)? else {
            return Err(Error::UnknownManifest { id: name });
        };
        let damaged = |reason: String| Error::Damaged {
            what: format!("manifest {}", path.display()),
            reason,
        };
        let plain = self
            .key
            .open_in_place(format!("manifests/{name}").as_bytes(), blob)
            .ok_or_else(|| damaged("does not decrypt".into()))?;
        decode(&plain).map_err(damaged)
    }

    /// Every manifest id in the repository.
    pub fn list_manifests(&self) -> Result<Vec<ManifestId>> {
        let mut ids = self.list_ids("manifests")?;
        ids.sort();
        Ok(ids)
    }

    /// The newest volume manifest (by creation time) of `server`'s `volume`: the parent a backup
    /// without a kept base shares chunk list pages with (as restic picks its parent snapshot by
    /// host and path). Reads each manifest's summary, one small read each; manifests that do
    /// not read are passed over (verify reports them).
    pub fn latest_volume(&self, server: &str, volume: &str) -> Result<Option<ManifestId>> {
        let key = (server.to_owned(), volume.to_owned());
        Ok(self.latest_volumes()?.remove(&key))
    }

    /// [`Repository::latest_volume`] of every (server, volume) in one pass over the manifests.
    pub fn latest_volumes(&self) -> Result<HashMap<(String, String), ManifestId>> {
        let mut newest: HashMap<(String, String), (u64, ManifestId)> = HashMap::new();
        for id in self.list_manifests()? {
            let Ok(ManifestSummary::Volume(v)) = self.load_summary(id) else { continue };
            let at = v.created_unix_ms;
            let slot = newest.entry((v.meta.server, v.meta.volume)).or_insert((at, id));
            if at >= slot.0 {
                *slot = (at, id);
            }
        }
        Ok(newest.into_iter().map(|(k, (_, id))| (k, id)).collect())
    }

    /// Writes a manifest (sealed, compressed) under a fresh random id, durably.
    pub fn write_manifest(&self, manifest: &Manifest) -> Result<ManifestId> {
        self.write_manifest_sized(manifest).map(|(id, _)| id)
    }

    /// [`Repository::write_manifest`], also returning the file's size.
    pub(crate) fn write_manifest_sized(&self, manifest: &Manifest) -> Result<(ManifestId, u64)> {
        let id = ManifestId(crypto::random());
        let name = id.to_string();
        // Encoded after room for the nonce, then sealed in place: the blob exists once.
        let packed = manifest::encode_manifest(manifest, vec![0u8; 24]);
        let blob = self.key.seal_in_place(format!("manifests/{name}").as_bytes(), packed);
        self.storage.put(&format!("manifests/{name}"), &blob)?;
        Ok((id, blob.len() as u64))
    }

    /// Starts a new pack, held in memory until [`Repository::store_pack`], in `recycled` (the
    /// buffer of a stored pack) if given: a fresh 16 MiB buffer costs a page fault per 4 KiB.
    pub(crate) fn new_pack(&self, recycled: Option<Vec<u8>>) -> PackWriter {
        // Room for a full pack, the chunk that closes it, and an aligned start (direct IO).
        let room = usize::try_from(self.pack_size()).unwrap_or(0).min(64 << 20) + (1 << 20);
        let mut buf = recycled.unwrap_or_else(|| Vec::with_capacity(room + direct::ALIGN));
        buf.clear();
        let start = buf.as_ptr().align_offset(direct::ALIGN).min(direct::ALIGN);
        buf.resize(start, 0);
        PackWriter { id: PackId(crypto::random()), buf, start, len: 0, entries: Vec::new() }
    }

    /// Stores a pack (atomically, durably), then its index; returns the pack's id and entries
    /// (for the chunk index), and its buffer for [`Repository::new_pack`]. A crash before
    /// the index is written leaves an unreferenced pack, never a dangling index.
    pub(crate) fn store_pack(&self, pack: PackWriter) -> Result<(StoredPack, Vec<u8>)> {
        let PackWriter { id, buf, start, entries, .. } = pack;
        self.storage.put(&pack_key(id), &buf[start..])?;
        let mut plain = Vec::with_capacity(entries.len() * INDEX_ENTRY);
        for (chunk, offset, len) in &entries {
            plain.extend_from_slice(&chunk.0);
            plain.extend_from_slice(&offset.to_le_bytes());
            plain.extend_from_slice(&len.to_le_bytes());
        }
        let name = id.to_string();
        let blob = self.key.seal(format!("index/{name}").as_bytes(), &plain);
        self.storage.put(&format!("index/{name}"), &blob)?;
        Ok((StoredPack { id, entries }, buf))
    }

    /// Compresses and seals one chunk's plaintext, appending the blob to `out`.
    pub(crate) fn encode_chunk_into(
        &self,
        zc: &mut zstd::bulk::Compressor<'_>,
        sealer: &mut ChunkSealer,
        id: ChunkId,
        data: &[u8],
        out: &mut Vec<u8>,
    ) {
        // nonce room (24) || encoding (1) || body; sealed in place.
        let at = out.len();
        let body = at + 25;
        out.resize(body + zstd::zstd_safe::compress_bound(data.len()), 0);
        let packed = zc.compress_to_buffer(data, &mut out[body..]);
        match packed {
            Ok(n) if n < data.len() => {
                out[body - 1] = ZSTD;
                out.truncate(body + n);
            }
            _ => {
                out[body - 1] = RAW;
                out.truncate(body);
                out.extend_from_slice(data);
            }
        }
        sealer.seal_at(&id.0, out, at);
    }

    /// Opens (in place), decompresses (into `out`, at least the chunk's length) and re-hashes a
    /// stored chunk; returns its length, or what is wrong with it.
    pub(crate) fn decode_chunk_into(
        &self,
        opener: &mut ChunkOpener<'_>,
        id: ChunkId,
        blob: &mut [u8],
        out: &mut [u8],
        dc: &mut zstd::bulk::Decompressor<'_>,
    ) -> std::result::Result<usize, &'static str> {
        let plain =
            opener.open_in_place(&id.0, blob).ok_or("does not decrypt (altered or wrong key)")?;
        let n = match plain.split_first() {
            Some((&RAW, rest)) => {
                let dst = out.get_mut(..rest.len()).ok_or("longer than the chunk size")?;
                dst.copy_from_slice(rest);
                rest.len()
            }
            Some((&ZSTD, rest)) => {
                dc.decompress_to_buffer(rest, out).map_err(|_| "does not decompress")?
            }
            _ => return Err("unknown encoding"),
        };
        if self.key.chunk_id(&out[..n]) != id.0 {
            return Err("content does not match its id");
        }
        Ok(n)
    }

    /// Reads bytes `range` of pack `pack` into `buf` (reused); returns where they are in it.
    pub(crate) fn read_pack_into(
        &self,
        pack: PackId,
        range: Range<u64>,
        buf: &mut Vec<u8>,
    ) -> Result<Range<usize>> {
        self.storage.get_range_into(&pack_key(pack), range, buf)
    }
}

/// The object key of a pack: `packs/<first 2 hex digits>/<id>`.
pub(crate) fn pack_key(id: PackId) -> String {
    let name = id.to_string();
    format!("packs/{}/{name}", &name[..2])
}

/// Groups chunk locations (in the order given) into runs that one ranged read can fetch:
/// same pack, each starting at most `gap` bytes after the previous one ends, at most `max`
/// bytes in all. Yields index ranges into `locs`.
pub(crate) fn runs(locs: &[ChunkLoc], gap: u64, max: u64) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=locs.len() {
        let split = i == locs.len() || {
            let (first, prev, next) = (locs[start], locs[i - 1], locs[i]);
            let end = prev.offset + u64::from(prev.len);
            next.pack != first.pack
                || next.offset < end
                || next.offset > end + gap
                || next.offset + u64::from(next.len) - first.offset > max
        };
        if split && i > start {
            out.push(start..i);
            start = i;
        }
    }
    out
}

/// Bytes per index entry: chunk id, offset (u64 LE), length (u32 LE).
pub(crate) const INDEX_ENTRY: usize = 32 + 8 + 4;

/// A pack being assembled in memory (at most `pack_size` plus one chunk), in `buf[start..]`.
pub(crate) struct PackWriter {
    id: PackId,
    buf: Vec<u8>,
    start: usize,
    pub(crate) len: u64,
    entries: Vec<(ChunkId, u64, u32)>,
}

/// A pack and its index, durable in the repository.
pub(crate) struct StoredPack {
    pub(crate) id: PackId,
    entries: Vec<(ChunkId, u64, u32)>,
}

impl StoredPack {
    /// The chunks in this pack: `(id, offset, sealed length)`.
    pub(crate) fn entries_vec(self) -> Vec<(ChunkId, u64, u32)> {
        self.entries
    }

    /// The chunks in this pack: `(id, offset, sealed length)`.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (ChunkId, u64, u32)> + '_ {
        self.entries.iter().copied()
    }

    /// The chunks in this pack.
    pub(crate) fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.entries.iter().map(|(id, _, _)| *id)
    }
}

impl PackWriter {
    pub(crate) fn append(&mut self, id: ChunkId, blob: &[u8]) {
        self.buf.extend_from_slice(blob);
        let len = u32::try_from(blob.len()).expect("a chunk is far below 4 GiB");
        self.entries.push((id, self.len, len));
        self.len += u64::from(len);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Now, in Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
