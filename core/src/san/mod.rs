//! The mock SAN: a simulated storage array in a directory that several agents share, so users can
//! try stillpoint without real storage. It holds LUNs (image files) per server, makes
//! point-in-time copies of them by reflink clone (or a sparse-aware copy where the filesystem
//! cannot clone), names and lists snapshots by backup id, and presents a snapshot read-only to a
//! copier. The layout is documented in `deploy/MOCK-SAN.md`; it does not know about backups'
//! states, only about files.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{validate_name, Error, Result};

const MARKER: &str = "stillpoint-array.json";
const LUN_EXT: &str = "lun";

/// How a point-in-time copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMethod {
    /// FICLONE: the copy shares extents with the LUN, made in milliseconds.
    Reflink,
    /// Read and write, skipping all-zero blocks so the copy stays sparse.
    SparseCopy,
}

/// One snapshot of one LUN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunSnapshot {
    pub backup_id: String,
    pub server: String,
    pub lun: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

/// A LUN as the array lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lun {
    pub server: String,
    pub lun: String,
    pub path: PathBuf,
    pub size_bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct ArrayMarker {
    format: u32,
}

/// An array directory.
#[derive(Debug, Clone)]
pub struct Array {
    root: PathBuf,
}

impl Array {
    /// Creates the array's layout in `root` if it is not there yet.
    pub fn init(root: &Path) -> Result<Array> {
        for dir in ["luns", "snapshots"] {
            fs::create_dir_all(root.join(dir)).map_err(|e| Error::io(root.join(dir), e))?;
        }
        let marker = root.join(MARKER);
        if !marker.exists() {
            let body = serde_json::to_vec_pretty(&ArrayMarker { format: 1 })
                .map_err(|e| Error::San(e.to_string()))?;
            fs::write(&marker, body).map_err(|e| Error::io(&marker, e))?;
        }
        Ok(Array { root: root.to_path_buf() })
    }

    /// Opens an existing array; says how to make one when `root` is not an array.
    pub fn open(root: &Path) -> Result<Array> {
        if !root.join(MARKER).is_file() {
            return Err(Error::San(format!(
                "{} is not a mock SAN array (no {MARKER}); create one with `backupctl san init {}`",
                root.display(),
                root.display()
            )));
        }
        Ok(Array { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a server's LUN lives: `luns/<server>/<lun>.lun`.
    pub fn lun_path(&self, server: &str, lun: &str) -> Result<PathBuf> {
        validate_name("server", server)?;
        validate_name("lun", lun)?;
        Ok(self.root.join("luns").join(server).join(format!("{lun}.{LUN_EXT}")))
    }

    fn snapshot_dir(&self, backup_id: &str, server: &str) -> Result<PathBuf> {
        validate_name("backup id", backup_id)?;
        validate_name("server", server)?;
        Ok(self.root.join("snapshots").join(backup_id).join(server))
    }

    /// Where the snapshot of a LUN for a backup lives: `snapshots/<backup>/<server>/<lun>.lun`.
    pub fn snapshot_path(&self, backup_id: &str, server: &str, lun: &str) -> Result<PathBuf> {
        validate_name("lun", lun)?;
        Ok(self.snapshot_dir(backup_id, server)?.join(format!("{lun}.{LUN_EXT}")))
    }

    /// Creates a sparse LUN of `size_bytes`; an existing LUN is left as it is (and its data kept)
    /// unless its size differs, which is an error.
    pub fn create_lun(&self, server: &str, lun: &str, size_bytes: u64) -> Result<Lun> {
        let path = self.lun_path(server, lun)?;
        if let Ok(meta) = fs::metadata(&path) {
            if meta.len() != size_bytes {
                return Err(Error::San(format!(
                    "LUN {server}/{lun} already exists with {} bytes, not {size_bytes}; it was left untouched",
                    meta.len()
                )));
            }
            return Ok(Lun { server: server.into(), lun: lun.into(), path, size_bytes });
        }
        let dir = path.parent().expect("lun path has a parent");
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.set_len(size_bytes).map_err(|e| Error::io(&path, e))?;
        Ok(Lun { server: server.into(), lun: lun.into(), path, size_bytes })
    }

    /// Every LUN of `server` (or of all servers when `None`), sorted.
    pub fn luns(&self, server: Option<&str>) -> Result<Vec<Lun>> {
        let mut out = Vec::new();
        for server_dir in sorted_dirs(&self.root.join("luns"))? {
            let name = file_name(&server_dir);
            if server.is_some_and(|s| s != name) {
                continue;
            }
            for path in sorted_entries(&server_dir)? {
                if path.extension().and_then(|e| e.to_str()) != Some(LUN_EXT) {
                    continue;
                }
                let size_bytes = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
                let lun = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
                out.push(Lun { server: name.clone(), lun, path, size_bytes });
            }
        }
        Ok(out)
    }

    /// Takes a point-in-time copy of one LUN for a backup. Idempotent: an existing snapshot for
    /// the same backup is returned as it is. The copy is written under a temporary name, synced,
    /// made read-only and renamed, so a crash never leaves a half snapshot under the real name.
    pub fn snapshot(
        &self,
        backup_id: &str,
        server: &str,
        lun: &str,
    ) -> Result<(LunSnapshot, CopyMethod)> {
        let source = self.lun_path(server, lun)?;
        let target = self.snapshot_path(backup_id, server, lun)?;
        let snap = |size_bytes| LunSnapshot {
            backup_id: backup_id.into(),
            server: server.into(),
            lun: lun.into(),
            path: target.clone(),
            size_bytes,
        };
        if let Ok(meta) = fs::metadata(&target) {
            return Ok((snap(meta.len()), CopyMethod::Reflink));
        }
        let (size, method) = clone_or_copy(&source, &target, 0o444)?;
        Ok((snap(size), method))
    }

    /// Every snapshot in the array, optionally only one backup's.
    pub fn snapshots(&self, backup_id: Option<&str>) -> Result<Vec<LunSnapshot>> {
        let mut out = Vec::new();
        for backup_dir in sorted_dirs(&self.root.join("snapshots"))? {
            let backup = file_name(&backup_dir);
            if backup_id.is_some_and(|b| b != backup) {
                continue;
            }
            for server_dir in sorted_dirs(&backup_dir)? {
                let server = file_name(&server_dir);
                for path in sorted_entries(&server_dir)? {
                    if path.extension().and_then(|e| e.to_str()) != Some(LUN_EXT) {
                        continue;
                    }
                    let size_bytes = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
                    let lun =
                        path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
                    out.push(LunSnapshot {
                        backup_id: backup.clone(),
                        server: server.clone(),
                        lun,
                        path,
                        size_bytes,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Deletes one server's snapshots of a backup; returns how many LUN snapshots went.
    /// Idempotent: deleting what is not there deletes nothing.
    pub fn delete_snapshots(&self, backup_id: &str, server: &str) -> Result<u32> {
        let dir = self.snapshot_dir(backup_id, server)?;
        let mut deleted = 0;
        if dir.is_dir() {
            for path in sorted_entries(&dir)? {
                if path.extension().and_then(|e| e.to_str()) == Some(LUN_EXT) {
                    deleted += 1;
                }
            }
            fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        // Drop the backup's directory once its last server is gone.
        if let Some(parent) = dir.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(deleted)
    }

    /// Presents a snapshot read-only to a copier: checks it exists and is read-only and returns
    /// the path to read it from. (Attach it as a block device with `losetup --read-only` if the
    /// copier wants one.)
    pub fn present(&self, backup_id: &str, server: &str, lun: &str) -> Result<PathBuf> {
        let path = self.snapshot_path(backup_id, server, lun)?;
        let meta = fs::metadata(&path).map_err(|_| {
            Error::San(format!("no snapshot of {server}/{lun} for backup {backup_id}; list them with `backupctl san list`"))
        })?;
        if meta.permissions().mode() & 0o222 != 0 {
            return Err(Error::San(format!(
                "snapshot {} is writable; refusing to present it",
                path.display()
            )));
        }
        Ok(path)
    }
}

/// Makes `target` a point-in-time copy of `source`: a reflink clone where the filesystem can
/// share extents, else a sparse copy. Written under a temporary name, synced, given `mode` and
/// renamed, so a crash never leaves a half copy under the real name. Used for the array's
/// snapshots and for IDR images (a mountable copy of a server's disk).
pub fn clone_or_copy(source: &Path, target: &Path, mode: u32) -> Result<(u64, CopyMethod)> {
    let src = File::open(source).map_err(|e| Error::io(source, e))?;
    let size = src.metadata().map_err(|e| Error::io(source, e))?.len();
    let dir = target.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("copy");
    let tmp = dir.join(format!(".{name}.partial"));
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    let method = match crate::sys::clone_file(&src, &dst) {
        Ok(()) => CopyMethod::Reflink,
        Err(_) => {
            sparse_copy(&src, &dst, size).map_err(|e| Error::io(&tmp, e))?;
            CopyMethod::SparseCopy
        }
    };
    dst.sync_all().map_err(|e| Error::io(&tmp, e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, target).map_err(|e| Error::io(target, e))?;
    sync_dir(dir)?;
    Ok((size, method))
}

/// Copies `size` bytes, leaving holes where the source has holes (found with SEEK_DATA, so a
/// mostly empty LUN copies in milliseconds) or reads as zeros.
fn sparse_copy(src: &File, dst: &File, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 1 << 20;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut offset = 0u64;
    while offset < size {
        let Some(data) = crate::sys::next_data(src, offset)? else { break };
        let end = crate::sys::next_hole(src, data)?.unwrap_or(size).min(size);
        let mut at = data;
        while at < end {
            let len = usize::try_from((end - at).min(BLOCK)).expect("block fits in usize");
            src.read_exact_at(&mut buf[..len], at)?;
            if !is_zero(&buf[..len]) {
                dst.write_all_at(&buf[..len], at)?;
            }
            at += len as u64;
        }
        offset = end;
    }
    dst.set_len(size)
}

/// Sixteen bytes at a time: this loop is the copy's hot path for preallocated LUNs.
fn is_zero(bytes: &[u8]) -> bool {
    let words = bytes.chunks_exact(16);
    let tail_is_zero = words.remainder().iter().all(|&b| b == 0);
    tail_is_zero
        && words.map(|w| u128::from_ne_bytes(w.try_into().expect("16-byte chunk"))).all(|w| w == 0)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(dir, e)),
    };
    paths.sort();
    Ok(paths)
}

fn sorted_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()).collect())
}

fn file_name(path: &Path) -> String {
    path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests;
