//! The mock SAN: a simulated storage array in a directory that several agents share, so users can
//! try stillpoint without real storage. It holds LUNs (image files) per server, makes
//! point-in-time copies of them by reflink clone only (like a real array, a snapshot never copies
//! the LUN, so it takes milliseconds whatever the LUN's size), names and lists snapshots by backup
//! id, and presents a snapshot read-only to a copier. `create` puts the array where it can clone
//! (`image.rs`: an XFS image when its directory cannot). The layout is documented in
//! `deploy/MOCK-SAN.md`; it does not know about backups' states, only about files.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{validate_name, Error, Result};

pub mod image;

pub use image::ImageMount;

const MARKER: &str = "stillpoint-array.json";
const LUN_EXT: &str = "lun";

/// How [`clone_or_copy`] made a copy.
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
    /// The XFS image the array lives in, when `create` made one (mounted at the array's root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<PathBuf>,
}

/// What `Array::create` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Init {
    /// The array was already there (and its filesystem clones).
    Existing,
    /// The array was made in the directory, whose filesystem clones.
    Directory,
    /// The directory's filesystem cannot clone: the array was made in a new XFS image,
    /// loop-mounted at the directory.
    Image(ImageMount),
    /// The array's image was there but not mounted (after a reboot): it was mounted again.
    Mounted(ImageMount),
}

/// Where `Array::create` puts an XFS image when it needs one.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// The image file; by default `<dir>.img` beside the array's directory.
    pub image: Option<PathBuf>,
    /// Its size (sparse); by default 64 GiB, or the space left where the image lives if less.
    pub image_size: Option<u64>,
}

/// An array directory.
#[derive(Debug, Clone)]
pub struct Array {
    root: PathBuf,
    image: Option<ImageMount>,
    /// Set by [`Array::init`] when it mounted the array's image: unmounts it once the last clone
    /// of this handle goes.
    mounted: Option<std::sync::Arc<MountGuard>>,
}

/// Unmounts an image when dropped (the loop device goes with it).
#[derive(Debug)]
struct MountGuard(ImageMount);

impl Drop for MountGuard {
    fn drop(&mut self) {
        self.0.unmount_for_cleanup();
    }
}

impl Array {
    /// Makes an array at `root` for as long as the returned handle lives, as [`Array::create`]
    /// makes it with the default options (so its image is `<root>.img`): an image it had to
    /// mount is unmounted once the last clone of the handle goes, so tests and tools leave no
    /// mount behind. `backupctl san init` uses `create`, which leaves the image mounted.
    pub fn init(root: &Path) -> Result<Array> {
        let (mut array, how) = Array::create(root, &InitOptions::default())?;
        if let Init::Image(mount) | Init::Mounted(mount) = how {
            array.mounted = Some(std::sync::Arc::new(MountGuard(mount)));
        }
        Ok(array)
    }

    /// Makes an array at `root` whose snapshots are reflink clones, or opens the one there.
    /// When `root`'s filesystem can reflink the array lives in it; else, as root, in a new
    /// sparse XFS image (`mkfs.xfs -m reflink=1`) loop-mounted at `root`, which stays mounted;
    /// else this refuses, saying why and what to do. An image-backed array found unmounted is
    /// mounted again.
    pub fn create(root: &Path, options: &InitOptions) -> Result<(Array, Init)> {
        if root.join(MARKER).is_file() {
            let array = Array::open(root)?;
            array.check_clones()?;
            return Ok((array, Init::Existing));
        }
        if let Some(mount) = ImageMount::read_note(root)? {
            mount.mount()?;
            let array = Array::open(root)?;
            array.check_clones()?;
            return Ok((array, Init::Mounted(mount)));
        }
        fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let root = fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
        if image::can_reflink(&root)? {
            return Ok((Array::make_layout(&root, None)?, Init::Directory));
        }
        let fs_name = image::fs_name(&root);
        if !crate::sys::is_root() {
            return Err(Error::San(format!(
                "{} is on {fs_name}, which cannot reflink, and making an XFS image for the array \
                 needs root: run `backupctl san init {}` as root, or give a directory on XFS \
                 (mkfs.xfs -m reflink=1) or btrfs",
                root.display(),
                root.display()
            )));
        }
        if fs::read_dir(&root).map_err(|e| Error::io(&root, e))?.next().is_some() {
            return Err(Error::San(format!(
                "{} is on {fs_name}, which cannot reflink, and is not empty: the array's XFS \
                 image would be mounted over its files. Give an empty or new directory",
                root.display()
            )));
        }
        let mount = ImageMount { image: image_path(&root, options)?, mount: root.clone() };
        let size = match options.image_size {
            Some(size) => size,
            None => {
                let dir = mount.image.parent().unwrap_or(Path::new("/"));
                let available = image::available_bytes(dir)?;
                let size = image::DEFAULT_IMAGE_BYTES.min(available) & !((1 << 30) - 1);
                if size < image::MIN_IMAGE_BYTES {
                    return Err(Error::San(format!(
                        "only {} MiB free in {} for the array's image: free some space or give \
                         another place (--image)",
                        available >> 20,
                        dir.display()
                    )));
                }
                size
            }
        };
        image::make_xfs_image(&mount.image, size)?;
        let made = mount.write_note().and_then(|()| mount.mount()).and_then(|()| {
            let array = Array::make_layout(&root, Some(&mount))?;
            array.check_clones()?;
            Ok(array)
        });
        match made {
            Ok(array) => Ok((array, Init::Image(mount))),
            Err(e) => {
                mount.unmount_for_cleanup();
                let _ = fs::remove_file(root.join(image::MOUNT_NOTE));
                let _ = fs::remove_file(&mount.image);
                Err(e)
            }
        }
    }

    /// Mounts the image of the image-backed array at `root` again (after a reboot); returns the
    /// array and whether it mounted anything (an array already mounted is fine).
    pub fn mount(root: &Path) -> Result<(Array, bool)> {
        if root.join(MARKER).is_file() {
            let array = Array::open(root)?;
            return match array.image() {
                Some(_) => Ok((array, false)),
                None => Err(Error::San(format!(
                    "the array at {} lives in its directory, not in an image: nothing to mount",
                    root.display()
                ))),
            };
        }
        let Some(mount) = ImageMount::read_note(root)? else {
            return Err(Error::San(format!(
                "{} is not the mount point of a mock SAN array's image (no {}); make an array \
                 with `backupctl san init {}`",
                root.display(),
                image::MOUNT_NOTE,
                root.display()
            )));
        };
        mount.mount()?;
        Ok((Array::open(root)?, true))
    }

    /// Unmounts the image of the image-backed array at `root` (its loop device goes too);
    /// returns whether it was mounted. Refuses while something has a file in it open.
    pub fn unmount(root: &Path) -> Result<bool> {
        if let Some(mount) = ImageMount::read_note(root)? {
            if !mount.is_mounted() {
                return Ok(false);
            }
        }
        let array = Array::open(root)?;
        let Some(mount) = array.image() else {
            return Err(Error::San(format!(
                "the array at {} lives in its directory, not in an image: nothing to unmount",
                root.display()
            )));
        };
        mount.unmount()?;
        Ok(true)
    }

    /// Creates the array's layout in `root` if it is not there yet.
    fn make_layout(root: &Path, image: Option<&ImageMount>) -> Result<Array> {
        for dir in ["luns", "snapshots"] {
            fs::create_dir_all(root.join(dir)).map_err(|e| Error::io(root.join(dir), e))?;
        }
        let marker = root.join(MARKER);
        if !marker.exists() {
            let body = serde_json::to_vec_pretty(&ArrayMarker {
                format: 1,
                image: image.map(|m| m.image.clone()),
            })
            .map_err(|e| Error::San(e.to_string()))?;
            fs::write(&marker, body).map_err(|e| Error::io(&marker, e))?;
        }
        Array::open(root)
    }

    /// Opens an existing array (whatever its filesystem: listing, presenting and deleting work
    /// anywhere; [`Array::check_clones`] says whether it can take snapshots); says how to make
    /// one when `root` is not an array, and how to mount it when its image is not mounted.
    pub fn open(root: &Path) -> Result<Array> {
        let marker = root.join(MARKER);
        let body = match fs::read(&marker) {
            Ok(body) => body,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(absent(root)),
            Err(e) => return Err(Error::io(&marker, e)),
        };
        let marker: ArrayMarker = serde_json::from_slice(&body)
            .map_err(|e| Error::San(format!("{}: {e}", root.join(MARKER).display())))?;
        let image = marker.image.map(|image| ImageMount { image, mount: absolute(root) });
        Ok(Array { root: root.to_path_buf(), image, mounted: None })
    }

    /// Errors unless the array is still at its root. An array whose image was unmounted under
    /// this handle (or whose directory was emptied) would otherwise look empty: a delete would
    /// report nothing deleted while the snapshots sit in the unmounted image, a list would show
    /// none, and a new LUN would land on the filesystem under the mount point.
    fn here(&self) -> Result<()> {
        if self.root.join(MARKER).is_file() {
            return Ok(());
        }
        Err(absent(&self.root))
    }

    /// Whether the array can take snapshots: its filesystem must reflink, since a snapshot
    /// never copies a LUN (a copy would hold the servers' writes for as long as it takes). The
    /// error says why and how to move the array to where it can.
    pub fn check_clones(&self) -> Result<()> {
        if image::can_reflink(&self.root)? {
            return Ok(());
        }
        Err(self.cannot_clone())
    }

    fn cannot_clone(&self) -> Error {
        Error::San(format!(
            "the array at {} is on {}, which cannot reflink, so a snapshot would copy each whole \
             LUN while its server's writes are held; the array takes no copy snapshots. Make the \
             array where it clones (`backupctl san init DIR` as root makes it in an XFS image; or \
             a DIR on XFS with reflink or btrfs) and move the LUNs there (deploy/MOCK-SAN.md, \
             \"Moving an array\")",
            self.root.display(),
            image::fs_name(&self.root)
        ))
    }

    /// The XFS image this array lives in, when `create` made one.
    pub fn image(&self) -> Option<&ImageMount> {
        self.image.as_ref()
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
        self.here()?;
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
        self.here()?;
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

    /// Takes a point-in-time copy of one LUN for a backup: a reflink clone, never a copy (where
    /// the filesystem cannot clone this fails, saying so). Idempotent: an existing snapshot for
    /// the same backup is returned as it is. The clone is made under a temporary name, synced,
    /// made read-only and renamed, so a crash never leaves a half snapshot under the real name.
    pub fn snapshot(&self, backup_id: &str, server: &str, lun: &str) -> Result<LunSnapshot> {
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
            return Ok(snap(meta.len()));
        }
        let src = File::open(&source).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                if let Err(absent) = self.here() {
                    return absent;
                }
                Error::San(format!(
                    "no LUN {server}/{lun} at {}; create it with `backupctl san create-lun`",
                    source.display()
                ))
            } else {
                Error::io(&source, e)
            }
        })?;
        let size = src.metadata().map_err(|e| Error::io(&source, e))?.len();
        let written = write_atomically(&target, 0o444, |dst, tmp| {
            crate::sys::clone_file(&src, dst).map_err(|e| {
                if image::cannot_reflink(&e) {
                    self.cannot_clone()
                } else {
                    Error::San(format!("clone {} to {}: {e}", source.display(), tmp.display()))
                }
            })
        });
        written.map(|()| snap(size))
    }

    /// Every snapshot in the array, optionally only one backup's.
    pub fn snapshots(&self, backup_id: Option<&str>) -> Result<Vec<LunSnapshot>> {
        self.here()?;
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
        self.here()?;
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
            if let Err(absent) = self.here() {
                return absent;
            }
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

/// Makes `target` a copy of `source`: a reflink clone where the filesystem can share extents,
/// else a sparse copy that takes as long as the data. Written under a temporary name, synced,
/// given `mode` and renamed, so a crash never leaves a half copy under the real name. For IDR
/// images (a mountable copy of a server's disk, made after the freeze), never for snapshots.
pub fn clone_or_copy(source: &Path, target: &Path, mode: u32) -> Result<(u64, CopyMethod)> {
    let src = File::open(source).map_err(|e| Error::io(source, e))?;
    let size = src.metadata().map_err(|e| Error::io(source, e))?.len();
    let mut method = CopyMethod::Reflink;
    write_atomically(target, mode, |dst, tmp| {
        if crate::sys::clone_file(&src, dst).is_err() {
            sparse_copy(&src, dst, size).map_err(|e| Error::io(tmp, e))?;
            method = CopyMethod::SparseCopy;
        }
        Ok(())
    })?;
    Ok((size, method))
}

/// Fills `target` through `fill` under a temporary name beside it, then syncs it, gives it
/// `mode` and renames it into place; on failure the temporary file is removed.
fn write_atomically(
    target: &Path,
    mode: u32,
    fill: impl FnOnce(&File, &Path) -> Result<()>,
) -> Result<()> {
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
    let done = fill(&dst, &tmp)
        .and_then(|()| dst.sync_all().map_err(|e| Error::io(&tmp, e)))
        .and_then(|()| {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io(&tmp, e))
        })
        .and_then(|()| fs::rename(&tmp, target).map_err(|e| Error::io(target, e)));
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
        return done;
    }
    sync_dir(dir)
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

/// Why `root` holds no array: its image is not mounted (with how to mount it), or it is not an
/// array at all (with how to make one).
fn absent(root: &Path) -> Error {
    match ImageMount::read_note(root) {
        Ok(Some(mount)) => Error::San(format!(
            "the array at {} lives in the image {}, which is not mounted: \
             mount it with `backupctl san mount {}` (at boot: the fstab line `{}`)",
            root.display(),
            mount.image.display(),
            root.display(),
            mount.fstab_line()
        )),
        Ok(None) => Error::San(format!(
            "{} is not a mock SAN array (no {MARKER}); create one with `backupctl san init {}`",
            root.display(),
            root.display()
        )),
        Err(e) => e,
    }
}

/// `path` made absolute against the working directory (without resolving links).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Where `init` puts the image: the option, else `<dir>.img` beside the directory.
fn image_path(root: &Path, options: &InitOptions) -> Result<PathBuf> {
    if let Some(image) = &options.image {
        return Ok(absolute(image));
    }
    let name = root.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        Error::San(format!("{} has no name to name its image after; give --image", root.display()))
    })?;
    Ok(root.with_file_name(format!("{name}.img")))
}

fn file_name(path: &Path) -> String {
    path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests;
