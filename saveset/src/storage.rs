//! Where a repository's objects live: the `Storage` seam (atomic put, ranged get, list, delete,
//! exists, all keyed by `/`-separated names like `packs/ab/<id>`) with a local-directory and an
//! S3 implementation. Knows nothing of sealing, packs or manifests.

use std::fs::{self, File};
use std::io::{self, ErrorKind, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use crate::crypto::{self, hex, Secret};
use crate::direct;
use crate::error::{Error, IoContext, Result};

/// Where a repository is: a local directory, or a bucket and prefix on S3-compatible storage.
#[derive(Clone, Debug)]
pub enum Location {
    /// A directory on a local filesystem (the default).
    Local(PathBuf),
    /// A prefix in an S3 bucket.
    S3(S3Location),
}

/// A repository on S3-compatible object storage. Credentials and region left `None` come from
/// the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`).
#[derive(Clone, Debug)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    /// The service's URL, e.g. `http://127.0.0.1:9000`; `None` is AWS itself.
    pub endpoint: Option<String>,
    /// Defaults to `us-east-1` when neither this nor the environment sets one.
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
}

impl S3Location {
    /// `bucket` and `prefix` with the endpoint from `STILLPOINT_S3_ENDPOINT` (if set) and
    /// everything else from the environment.
    pub fn new(bucket: impl Into<String>, prefix: &str) -> Self {
        S3Location {
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').to_owned(),
            endpoint: std::env::var("STILLPOINT_S3_ENDPOINT").ok().filter(|e| !e.is_empty()),
            region: None,
            access_key_id: None,
            secret_access_key: None,
        }
    }

    fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

impl FromStr for Location {
    type Err = Error;

    /// `s3://bucket[/prefix]` (see [`S3Location::new`]) or a local path.
    fn from_str(s: &str) -> Result<Self> {
        let Some(rest) = s.strip_prefix("s3://") else {
            return Ok(Location::Local(PathBuf::from(s)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::NotARepository {
                path: PathBuf::from(s),
                reason: "no bucket in the URL".into(),
            });
        }
        Ok(Location::S3(S3Location::new(bucket, prefix)))
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3(s) => f.write_str(&s.url()),
        }
    }
}

/// A flat namespace of objects under `/`-separated keys (`config`, `index/<id>`,
/// `packs/ab/<id>`). Every method is safe to call from several threads; `put` is atomic (a
/// reader or a crash sees the whole object or none) and durable when it returns; `delete` of an
/// absent key succeeds. Errors are [`Error::Io`] naming the object. The repository reaches it
/// through [`crate::Repository::storage`] (tests use it to damage a repository on purpose).
pub trait Storage: Send + Sync {
    /// Stores `data` under `key`, replacing any object there.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// The whole object; `Ok(None)` if it does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Bytes `range` of the object; an error if it is missing or shorter.
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>>;
    /// [`Storage::get_range`] into `buf`, which is reused between calls (large reads into fresh
    /// memory cost a page fault per 4 KiB); returns where in `buf` the bytes are.
    fn get_range_into(
        &self,
        key: &str,
        range: Range<u64>,
        buf: &mut Vec<u8>,
    ) -> Result<Range<usize>> {
        let bytes = self.get_range(key, range)?;
        buf.clear();
        buf.extend_from_slice(&bytes);
        Ok(0..buf.len())
    }
    /// Every object whose key starts with `prefix`, with its size, in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>>;
    /// [`Storage::list`] with each object's last modification time (prune's grace period).
    fn list_dated(&self, prefix: &str) -> Result<Vec<(String, u64, SystemTime)>>;
    /// Files in `tmp/` (local repositories only; S3 has none), as keys `tmp/<name>` that
    /// [`Storage::delete`] takes, with size and modification time.
    fn list_tmp(&self) -> Result<Vec<(String, u64, SystemTime)>> {
        Ok(Vec::new())
    }
    fn delete(&self, key: &str) -> Result<()>;
    fn exists(&self, key: &str) -> Result<bool>;
    /// How messages and [`crate::Damage`] name the object.
    fn describe(&self, key: &str) -> PathBuf;
}

/// A repository directory: each object a file, written `tmp/<random>` → fsync → rename →
/// fsync the directory.
pub(crate) struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Prepares an absent or empty directory for a new repository.
    pub(crate) fn create(root: &Path) -> Result<Self> {
        fs::create_dir_all(root).ctx("create", root)?;
        if fs::read_dir(root).ctx("read", root)?.next().is_some() {
            return Err(Error::AlreadyExists { path: root.to_owned() });
        }
        for d in ["packs", "index", "manifests", "tmp"] {
            fs::create_dir(root.join(d)).ctx("create", root.join(d))?;
        }
        sync_dir(root)?;
        Ok(LocalStorage { root: root.to_owned() })
    }

    pub(crate) fn open(root: &Path) -> Self {
        LocalStorage { root: root.to_owned() }
    }

    fn walk(&self, dir: &Path, out: &mut Vec<(String, u64, SystemTime)>) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).ctx("read", dir),
        };
        for entry in entries {
            let entry = entry.ctx("read", dir)?;
            let path = entry.path();
            let meta = entry.metadata().ctx("stat", &path)?;
            if meta.is_dir() {
                self.walk(&path, out)?;
            } else if let Some(key) = path
                .strip_prefix(&self.root)
                .ok()
                .and_then(|k| k.to_str())
                .filter(|k| !k.starts_with("tmp/"))
            {
                let modified = meta.modified().ctx("stat", &path)?;
                out.push((key.to_owned(), meta.len(), modified));
            }
        }
        Ok(())
    }
}

impl Storage for LocalStorage {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let tmp = self.root.join("tmp").join(hex(&crypto::random::<16>()));
        write_file(&tmp, data)?;
        let dest = self.root.join(key);
        let dir = dest.parent().expect("a key names a file under the root").to_owned();
        if !dir.exists() {
            fs::create_dir_all(&dir).ctx("create", &dir)?;
            sync_dir(dir.parent().expect("below the root"))?;
        }
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(e).ctx("rename into", &dest);
        }
        sync_dir(&dir)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.root.join(key);
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("read", path),
        }
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>> {
        let path = self.root.join(key);
        let file = File::open(&path).ctx("open", &path)?;
        let len = usize::try_from(range.end - range.start).expect("a range fits in memory");
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, range.start).ctx("read", &path)?;
        Ok(buf)
    }

    /// Large ranges (pack reads by restore and verify) are read with direct IO: no page-cache
    /// pages are filled (and evicted) for data read once.
    fn get_range_into(
        &self,
        key: &str,
        range: Range<u64>,
        buf: &mut Vec<u8>,
    ) -> Result<Range<usize>> {
        let path = self.root.join(key);
        let len = usize::try_from(range.end - range.start).expect("a range fits in memory");
        if len >= DIRECT_MIN {
            if let Some(f) = direct::open_read(&path).ctx("open", &path)? {
                match direct::read_range(&f, range.start, range.end, buf) {
                    Ok(r) => return Ok(r),
                    Err(e) if direct::refused(&e) => {}
                    Err(e) => return Err(e).ctx("read", path),
                }
            }
        }
        let file = File::open(&path).ctx("open", &path)?;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        file.read_exact_at(&mut buf[..len], range.start).ctx("read", &path)?;
        Ok(0..len)
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        Ok(self.list_dated(prefix)?.into_iter().map(|(k, n, _)| (k, n)).collect())
    }

    fn list_dated(&self, prefix: &str) -> Result<Vec<(String, u64, SystemTime)>> {
        // Walk the deepest directory the prefix names, then filter.
        let dir = match prefix.rfind('/') {
            Some(i) => self.root.join(&prefix[..i]),
            None => self.root.clone(),
        };
        let mut out = Vec::new();
        self.walk(&dir, &mut out)?;
        out.retain(|(k, _, _)| k.starts_with(prefix));
        Ok(out)
    }

    fn list_tmp(&self) -> Result<Vec<(String, u64, SystemTime)>> {
        let dir = self.root.join("tmp");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx("read", dir),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.ctx("read", &dir)?;
            let path = entry.path();
            // A temp file renamed into place meanwhile is not an error.
            let Ok(meta) = entry.metadata() else { continue };
            let (Ok(modified), Some(name)) = (meta.modified(), path.file_name()) else { continue };
            if meta.is_file() {
                out.push((format!("tmp/{}", name.to_string_lossy()), meta.len(), modified));
            }
        }
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.root.join(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(e).ctx("delete", path),
            _ => Ok(()),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.root.join(key);
        path.try_exists().ctx("stat", path)
    }

    fn describe(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

/// Objects at least this large (packs) are written with direct IO; see `direct.rs`.
const DIRECT_MIN: usize = 256 << 10;

/// Creates `path` (absent) holding `data`, durably: large objects with direct IO where the
/// filesystem allows it, the rest (and any refused direct write) through the page cache.
fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    if data.len() >= DIRECT_MIN {
        if let Some(f) = direct::open(path, true).ctx("create", path)? {
            match direct::write_whole(&f, data) {
                Ok(()) => return f.sync_all().ctx("fsync", path),
                Err(e) if direct::refused(&e) => {}
                Err(e) => return Err(e).ctx("write", path),
            }
        }
    }
    let mut f = File::create(path).ctx("create", path)?;
    f.write_all(data).ctx("write", path)?;
    f.sync_all().ctx("fsync", path)
}

/// fsyncs a directory so renames into it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).ctx("fsync", dir)
}

/// Objects under a prefix of an S3 bucket, through `object_store`. S3 PUTs are atomic, so no
/// temp objects. The async client runs on a runtime owned here, so every method blocks: call
/// it from a plain or blocking thread, never from inside an async task.
pub(crate) struct S3Storage {
    rt: tokio::runtime::Runtime,
    store: object_store::aws::AmazonS3,
    prefix: String,
    url: String,
}

impl S3Storage {
    pub(crate) fn connect(loc: &S3Location) -> Result<Self> {
        use object_store::aws::AmazonS3Builder;
        let url = loc.url();
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&loc.bucket);
        if let Some(e) = &loc.endpoint {
            // Path-style requests and plain HTTP, as local S3 servers need.
            b = b
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let region = loc.region.clone().or_else(|| {
            ["AWS_REGION", "AWS_DEFAULT_REGION"].iter().find_map(|v| std::env::var(v).ok())
        });
        b = b.with_region(region.unwrap_or_else(|| "us-east-1".into()));
        if let Some(k) = &loc.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &loc.secret_access_key {
            b = b.with_secret_access_key(String::from_utf8_lossy(s.expose()));
        }
        let store = b.build().map_err(|e| Error::NotARepository {
            path: PathBuf::from(&url),
            reason: format!("s3 configuration: {e}"),
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx("start runtime for", &url)?;
        let prefix = loc.prefix.clone();
        Ok(S3Storage { rt, store, prefix, url })
    }

    fn path(&self, key: &str) -> object_store::path::Path {
        if self.prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{}/{key}", self.prefix))
        }
    }

    fn err(&self, op: &'static str, key: &str, e: object_store::Error) -> Error {
        let kind = match e {
            object_store::Error::NotFound { .. } => ErrorKind::NotFound,
            _ => ErrorKind::Other,
        };
        Error::Io { op, path: self.describe(key), source: io::Error::new(kind, e) }
    }
}

impl Storage for S3Storage {
    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        use object_store::ObjectStore;
        let payload = object_store::PutPayload::from(data.to_vec());
        self.rt
            .block_on(self.store.put(&self.path(key), payload))
            .map(drop)
            .map_err(|e| self.err("put", key, e))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        use object_store::ObjectStore;
        let got = self.rt.block_on(async {
            let r = self.store.get(&self.path(key)).await?;
            r.bytes().await
        });
        match got {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("get", key, e)),
        }
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>> {
        use object_store::ObjectStore;
        let want = range.end - range.start;
        let b = self
            .rt
            .block_on(self.store.get_range(&self.path(key), range))
            .map_err(|e| self.err("get", key, e))?;
        if b.len() as u64 != want {
            let short = io::Error::new(ErrorKind::UnexpectedEof, "object is shorter");
            return Err(Error::Io { op: "get", path: self.describe(key), source: short });
        }
        Ok(b.to_vec())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        Ok(self.list_dated(prefix)?.into_iter().map(|(k, n, _)| (k, n)).collect())
    }

    fn list_dated(&self, prefix: &str) -> Result<Vec<(String, u64, SystemTime)>> {
        use futures::TryStreamExt;
        use object_store::ObjectStore;
        // object_store lists whole path segments: list the prefix's directory, then filter.
        let dir = match prefix.rfind('/') {
            Some(i) => self.path(&prefix[..i]),
            None if self.prefix.is_empty() => object_store::path::Path::default(),
            None => object_store::path::Path::from(self.prefix.as_str()),
        };
        let metas: Vec<_> = self
            .rt
            .block_on(self.store.list(Some(&dir)).try_collect())
            .map_err(|e| self.err("list", prefix, e))?;
        let strip = if self.prefix.is_empty() { 0 } else { self.prefix.len() + 1 };
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let key = m.location.as_ref().get(strip..)?.to_owned();
                key.starts_with(prefix).then_some((key, m.size, SystemTime::from(m.last_modified)))
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        use object_store::ObjectStore;
        match self.rt.block_on(self.store.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool> {
        use object_store::ObjectStore;
        match self.rt.block_on(self.store.head(&self.path(key))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("stat", key, e)),
        }
    }

    fn describe(&self, key: &str) -> PathBuf {
        PathBuf::from(format!("{}/{key}", self.url))
    }
}

/// Opens the storage at `loc`; `create` also prepares an empty location for `init`.
pub(crate) fn connect(loc: &Location, create: bool) -> Result<Box<dyn Storage>> {
    match loc {
        Location::Local(p) if create => Ok(Box::new(LocalStorage::create(p)?)),
        Location::Local(p) => Ok(Box::new(LocalStorage::open(p))),
        Location::S3(s) => {
            let storage = S3Storage::connect(s)?;
            if create && !storage.list("")?.is_empty() {
                return Err(Error::AlreadyExists { path: PathBuf::from(s.url()) });
            }
            Ok(Box::new(storage))
        }
    }
}
