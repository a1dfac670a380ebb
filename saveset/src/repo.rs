//! The repository on a local directory: config and keys, crash-safe file writes, the chunk index
//! loaded in memory, pack writing and chunk reading. Backup, restore and verify build on these.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufWriter, ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::crypto::{self, hex, unhex_vec, KdfParams, MasterKey, Secret};
use crate::error::{Error, IoContext, Result};
use crate::manifest::{ChunkId, Manifest, ManifestId, PackId};

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

/// Where a chunk is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Location {
    pub pack: PackId,
    pub offset: u64,
    pub len: u32,
}

/// An open, unlocked repository.
pub struct Repository {
    pub(crate) root: PathBuf,
    config: Config,
    pub(crate) key: MasterKey,
    /// Every chunk some index file names, with the first location seen.
    pub(crate) index: HashMap<ChunkId, Location>,
    /// Index files already loaded (index files are named after their pack).
    loaded: HashSet<PackId>,
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
        assert!(
            opts.chunk_size >= 4096 && opts.chunk_size & 4095 == 0,
            "chunk size must be a multiple of 4096"
        );
        fs::create_dir_all(path).ctx("create", path)?;
        if fs::read_dir(path).ctx("read", path)?.next().is_some() {
            return Err(Error::AlreadyExists { path: path.to_owned() });
        }
        for d in ["packs", "index", "manifests", "tmp"] {
            fs::create_dir(path.join(d)).ctx("create", path.join(d))?;
        }
        let master: [u8; 64] = crypto::random();
        let salt: [u8; 16] = crypto::random();
        let kek = crypto::derive_kek(secret, &salt, opts.kdf)?;
        let sealed = crypto::seal_with(&crypto::kek_cipher(&kek), CONFIG_AAD, &master);
        let config = Config {
            version: FORMAT_VERSION,
            chunk_size: opts.chunk_size,
            pack_size: opts.pack_size,
            zstd_level: opts.zstd_level,
            kdf: KdfConfig { algorithm: "argon2id".into(), params: opts.kdf, salt: hex(&salt) },
            master_key: hex(&sealed),
        };
        let repo = Repository {
            root: path.to_owned(),
            config,
            key: MasterKey::from_bytes(&master),
            index: HashMap::new(),
            loaded: HashSet::new(),
        };
        let text = serde_json::to_vec_pretty(&repo.config).expect("config serializes");
        // The config goes last: a directory without it is not yet a repository.
        repo.write_atomic(Path::new(""), "config", &text)?;
        sync_dir(&repo.root)?;
        Ok(repo)
    }

    /// Opens and unlocks the repository in `path`; a wrong secret is [`Error::WrongSecret`].
    pub fn open(path: &Path, secret: &Secret) -> Result<Self> {
        let not_repo = |reason: String| Error::NotARepository { path: path.to_owned(), reason };
        let text = match fs::read(path.join("config")) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(not_repo("no config".into())),
            Err(e) => return Err(e).ctx("read", path.join("config")),
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
        let master = crypto::open_with(&crypto::kek_cipher(&kek), CONFIG_AAD, &sealed)
            .and_then(|m| <[u8; 64]>::try_from(m).ok())
            .ok_or_else(|| Error::WrongSecret { path: path.to_owned() })?;
        let mut repo = Repository {
            root: path.to_owned(),
            config,
            key: MasterKey::from_bytes(&master),
            index: HashMap::new(),
            loaded: HashSet::new(),
        };
        repo.refresh_index()?;
        Ok(repo)
    }

    /// The repository's directory.
    pub fn path(&self) -> &Path {
        &self.root
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
    pub fn refresh_index(&mut self) -> Result<()> {
        for id in self.list_ids("index")? {
            if self.loaded.contains(&id) {
                continue;
            }
            if let Ok(entries) = self.read_index(id) {
                for (chunk, loc) in entries {
                    self.index.entry(chunk).or_insert(loc);
                }
                self.loaded.insert(id);
            }
        }
        Ok(())
    }

    /// Names (ids) of the files in `dir` (`index` or `manifests`), sorted.
    pub(crate) fn list_ids<T: std::str::FromStr>(&self, dir: &str) -> Result<Vec<T>> {
        let path = self.root.join(dir);
        let mut out = Vec::new();
        for entry in fs::read_dir(&path).ctx("read", &path)? {
            let entry = entry.ctx("read", &path)?;
            if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Every pack file present, with its size.
    pub(crate) fn list_packs(&self) -> Result<HashMap<PackId, u64>> {
        let mut out = HashMap::new();
        let packs = self.root.join("packs");
        for sub in fs::read_dir(&packs).ctx("read", &packs)? {
            let sub = sub.ctx("read", &packs)?.path();
            for entry in fs::read_dir(&sub).ctx("read", &sub)? {
                let entry = entry.ctx("read", &sub)?;
                if let Some(id) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                    let len = entry.metadata().ctx("stat", entry.path())?.len();
                    out.insert(id, len);
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn pack_path(&self, id: PackId) -> PathBuf {
        let name = id.to_string();
        self.root.join("packs").join(&name[..2]).join(name)
    }

    /// Reads and decrypts the index file of pack `id`.
    pub(crate) fn read_index(&self, id: PackId) -> Result<Vec<(ChunkId, Location)>> {
        let name = id.to_string();
        let path = self.root.join("index").join(&name);
        let blob = fs::read(&path).ctx("read", &path)?;
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
        Ok(plain
            .chunks_exact(INDEX_ENTRY)
            .map(|e| {
                let chunk = ChunkId(e[..32].try_into().expect("32"));
                let offset = u64::from_le_bytes(e[32..40].try_into().expect("8"));
                let len = u32::from_le_bytes(e[40..44].try_into().expect("4"));
                (chunk, Location { pack: id, offset, len })
            })
            .collect())
    }

    /// Reads and decrypts a manifest.
    pub fn load_manifest(&self, id: ManifestId) -> Result<Manifest> {
        let name = id.to_string();
        let path = self.root.join("manifests").join(&name);
        let blob = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::UnknownManifest { id: name })
            }
            Err(e) => return Err(e).ctx("read", path),
        };
        let damaged = |reason: String| Error::Damaged {
            what: format!("manifest {}", path.display()),
            reason,
        };
        let plain = self
            .key
            .open(format!("manifests/{name}").as_bytes(), &blob)
            .ok_or_else(|| damaged("does not decrypt".into()))?;
        let json = zstd::bulk::decompress(&plain, 1 << 30).map_err(|e| damaged(e.to_string()))?;
        serde_json::from_slice(&json).map_err(|e| damaged(e.to_string()))
    }

    /// Every manifest id in the repository.
    pub fn list_manifests(&self) -> Result<Vec<ManifestId>> {
        let mut ids = self.list_ids("manifests")?;
        ids.sort();
        Ok(ids)
    }

    /// Writes a manifest (sealed, compressed) under a fresh random id, durably.
    pub fn write_manifest(&self, manifest: &Manifest) -> Result<ManifestId> {
        let id = ManifestId(crypto::random());
        let name = id.to_string();
        let json = serde_json::to_vec(manifest).expect("manifests serialize");
        let packed = zstd::bulk::compress(&json, 3).expect("compressing a buffer cannot fail");
        let blob = self.key.seal(format!("manifests/{name}").as_bytes(), &packed);
        self.write_atomic(Path::new("manifests"), &name, &blob)?;
        Ok(id)
    }

    /// Writes `data` to `<root>/<dir>/<name>` so that a crash leaves either no file or the
    /// whole file: temp file in `tmp/`, fsync, rename, fsync the directory.
    pub(crate) fn write_atomic(&self, dir: &Path, name: &str, data: &[u8]) -> Result<()> {
        let tmp = self.tmp_path();
        let mut f = File::create(&tmp).ctx("create", &tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
        drop(f);
        let dir = self.root.join(dir);
        let dest = dir.join(name);
        fs::rename(&tmp, &dest).ctx("rename into", &dest)?;
        sync_dir(&dir)
    }

    fn tmp_path(&self) -> PathBuf {
        self.root.join("tmp").join(hex(&crypto::random::<16>()))
    }

    /// Starts a new pack in `tmp/`.
    pub(crate) fn new_pack(&self) -> Result<PackWriter> {
        let tmp = self.tmp_path();
        let file = File::create(&tmp).ctx("create", &tmp)?;
        Ok(PackWriter {
            id: PackId(crypto::random()),
            tmp,
            file: BufWriter::with_capacity(1 << 20, file),
            len: 0,
            entries: Vec::new(),
            chunks: HashSet::new(),
        })
    }

    /// Makes a pack durable under its final name, then its index, then remembers its chunks.
    /// A crash before the index is written leaves an unreferenced pack, never a dangling index.
    pub(crate) fn finish_pack(&mut self, pack: PackWriter) -> Result<()> {
        let PackWriter { id, tmp, file, entries, .. } = pack;
        let file = file.into_inner().map_err(|e| e.into_error()).ctx("write", &tmp)?;
        file.sync_all().ctx("fsync", &tmp)?;
        drop(file);
        let dest = self.pack_path(id);
        let dir = dest.parent().expect("packs/xx").to_owned();
        if !dir.exists() {
            fs::create_dir_all(&dir).ctx("create", &dir)?;
            sync_dir(&self.root.join("packs"))?;
        }
        fs::rename(&tmp, &dest).ctx("rename into", &dest)?;
        sync_dir(&dir)?;
        let mut plain = Vec::with_capacity(entries.len() * INDEX_ENTRY);
        for (chunk, offset, len) in &entries {
            plain.extend_from_slice(&chunk.0);
            plain.extend_from_slice(&offset.to_le_bytes());
            plain.extend_from_slice(&len.to_le_bytes());
        }
        let name = id.to_string();
        let blob = self.key.seal(format!("index/{name}").as_bytes(), &plain);
        self.write_atomic(Path::new("index"), &name, &blob)?;
        for (chunk, offset, len) in entries {
            self.index.entry(chunk).or_insert(Location { pack: id, offset, len });
        }
        self.loaded.insert(id);
        Ok(())
    }

    /// Compresses and seals one chunk's plaintext for a pack.
    pub(crate) fn encode_chunk(
        &self,
        zc: &mut zstd::bulk::Compressor<'_>,
        id: ChunkId,
        data: &[u8],
    ) -> Vec<u8> {
        let mut plain = Vec::with_capacity(data.len() + 1);
        plain.push(ZSTD);
        let packed = zc.compress(data).expect("compressing a buffer cannot fail");
        if packed.len() < data.len() {
            plain.extend_from_slice(&packed);
        } else {
            plain[0] = RAW;
            plain.extend_from_slice(data);
        }
        self.key.seal(&id.0, &plain)
    }

    /// Opens, decompresses and re-hashes a stored chunk; `Err` says what is wrong with it.
    pub(crate) fn decode_chunk(
        &self,
        id: ChunkId,
        blob: &[u8],
    ) -> std::result::Result<Vec<u8>, &'static str> {
        let plain = self.key.open(&id.0, blob).ok_or("does not decrypt (altered or wrong key)")?;
        let data = match plain.split_first() {
            Some((&RAW, rest)) => rest.to_vec(),
            Some((&ZSTD, rest)) => zstd::bulk::decompress(rest, self.config.chunk_size as usize)
                .map_err(|_| "does not decompress")?,
            _ => return Err("unknown encoding"),
        };
        if self.key.chunk_id(&data) != id.0 {
            return Err("content does not match its id");
        }
        Ok(data)
    }

    /// Reads a chunk's stored bytes from its pack.
    pub(crate) fn read_blob(&self, packs: &mut PackFiles, loc: Location) -> Result<Vec<u8>> {
        let path = self.pack_path(loc.pack);
        let file = packs.get(&path)?;
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset).ctx("read", &path)?;
        Ok(buf)
    }
}

/// Bytes per index entry: chunk id, offset (u64 LE), length (u32 LE).
const INDEX_ENTRY: usize = 32 + 8 + 4;

/// A pack being written in `tmp/`.
pub(crate) struct PackWriter {
    id: PackId,
    tmp: PathBuf,
    file: BufWriter<File>,
    pub(crate) len: u64,
    entries: Vec<(ChunkId, u64, u32)>,
    /// Chunks in this pack, so one backup does not store a chunk twice.
    pub(crate) chunks: HashSet<ChunkId>,
}

impl PackWriter {
    pub(crate) fn append(&mut self, id: ChunkId, blob: &[u8]) -> Result<()> {
        self.file.write_all(blob).ctx("write", &self.tmp)?;
        let len = u32::try_from(blob.len()).expect("a chunk is far below 4 GiB");
        self.entries.push((id, self.len, len));
        self.chunks.insert(id);
        self.len += u64::from(len);
        Ok(())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Abandons the pack (the temp file is removed; best effort).
    pub(crate) fn discard(self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// A few open pack files, reused across reads.
#[derive(Default)]
pub(crate) struct PackFiles {
    open: HashMap<PathBuf, File>,
}

impl PackFiles {
    fn get(&mut self, path: &Path) -> Result<&File> {
        if !self.open.contains_key(path) {
            if self.open.len() >= 64 {
                self.open.clear();
            }
            let f = File::open(path).ctx("open", path)?;
            self.open.insert(path.to_owned(), f);
        }
        Ok(&self.open[path])
    }
}

/// fsyncs a directory so renames into it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).ctx("fsync", dir)
}

/// Now, in Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
