//! Where an array can clone: the reflink probe, the filesystem's name for messages, and the XFS
//! image an array lives in when its directory's filesystem cannot reflink (a sparse file,
//! `mkfs.xfs -m reflink=1`, loop-mounted at the array's directory by `mount(8)`). Runs
//! `mkfs.xfs`, `mount` and `umount`; knows nothing of LUNs or snapshots.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The mount options an array's image is mounted with: `loop` (mount(8) sets up a loop device
/// that is detached again at unmount) and `discard` (deleted snapshots give their space back
/// to the filesystem that holds the image, which stays sparse).
pub const MOUNT_OPTIONS: &str = "loop,discard";

/// An image smaller than this is refused: `mkfs.xfs` wants 300 MiB, and LUNs need room.
pub const MIN_IMAGE_BYTES: u64 = 512 << 20;

/// The image size when none is given: sparse, so it costs only what the LUNs fill, but never
/// more than the space left where the image lives (past that the loop device would fail writes).
pub const DEFAULT_IMAGE_BYTES: u64 = 64 << 30;

/// The note left in the array's directory *under* the mount, so an array whose image is not
/// mounted (after a reboot) says which image to mount there.
pub(crate) const MOUNT_NOTE: &str = "stillpoint-array-image.json";

/// An array's XFS image and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMount {
    /// The image file (absolute).
    pub image: PathBuf,
    /// The array's directory, where the image is mounted (absolute).
    pub mount: PathBuf,
}

impl ImageMount {
    /// The `/etc/fstab` line that mounts the array at boot (`nofail`: a missing image does not
    /// stop the boot; the agents then refuse to start, naming the array).
    pub fn fstab_line(&self) -> String {
        format!("{} {} xfs {MOUNT_OPTIONS},nofail 0 0", self.image.display(), self.mount.display())
    }

    /// Whether the image is mounted at its directory now (per `/proc/self/mountinfo`).
    pub fn is_mounted(&self) -> bool {
        is_mount_point(&self.mount)
    }

    /// Loop-mounts the image at its directory. Mounting what is already mounted there is a
    /// no-op.
    pub fn mount(&self) -> Result<()> {
        if self.is_mounted() {
            return Ok(());
        }
        if !self.image.is_file() {
            return Err(Error::San(format!(
                "the array's image {} is missing; it cannot be mounted at {}",
                self.image.display(),
                self.mount.display()
            )));
        }
        run(Command::new("mount")
            .args(["-t", "xfs", "-o", MOUNT_OPTIONS])
            .arg(&self.image)
            .arg(&self.mount))
    }

    /// Unmounts the array (the loop device goes with it). Unmounting what is not mounted is a
    /// no-op. Fails while something has a file open in it, saying so.
    pub fn unmount(&self) -> Result<()> {
        if !self.is_mounted() {
            return Ok(());
        }
        run(Command::new("umount").arg(&self.mount)).map_err(|e| {
            Error::San(format!(
                "{e}; stop the agents and whatever else has a LUN open (`fuser -vm {}` lists them), then unmount again",
                self.mount.display()
            ))
        })
    }

    /// Unmounts even while something still has a file open, for cleanup after tests: tries a
    /// few times, then detaches it lazily (the kernel frees the loop device once the last
    /// user lets go).
    pub fn unmount_for_cleanup(&self) {
        for _ in 0..40 {
            if self.unmount().is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mount).output();
    }

    /// Writes the note under the (not yet mounted) directory.
    pub(crate) fn write_note(&self) -> Result<()> {
        let path = self.mount.join(MOUNT_NOTE);
        let body = serde_json::to_vec_pretty(self).map_err(|e| Error::San(e.to_string()))?;
        fs::write(&path, body).map_err(|e| Error::io(&path, e))
    }

    /// The note in `dir`, when `dir` is the mount point of an array's image that is not mounted.
    pub(crate) fn read_note(dir: &Path) -> Result<Option<ImageMount>> {
        let path = dir.join(MOUNT_NOTE);
        match fs::read(&path) {
            Ok(body) => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| Error::San(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

/// Makes a sparse image of `size_bytes` at `image` with an XFS filesystem that can reflink.
/// Refuses an existing file, and removes what it made when `mkfs.xfs` fails.
pub(crate) fn make_xfs_image(image: &Path, size_bytes: u64) -> Result<()> {
    if size_bytes < MIN_IMAGE_BYTES {
        return Err(Error::San(format!(
            "an array image of {size_bytes} bytes is too small: give at least {} MiB",
            MIN_IMAGE_BYTES >> 20
        )));
    }
    let file = OpenOptions::new().write(true).create_new(true).open(image).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::San(format!(
                "{} already exists; give another image path (--image) or remove it",
                image.display()
            ))
        } else {
            Error::io(image, e)
        }
    })?;
    let made = file.set_len(size_bytes).map_err(|e| Error::io(image, e)).and_then(|()| {
        drop(file);
        run(Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(image))
    });
    if made.is_err() {
        let _ = fs::remove_file(image);
    }
    made
}

/// Whether files in `dir` can share extents (FICLONE works there): a one-block file cloned and
/// both removed. `Ok(false)` when the filesystem says it cannot; other errors (a full or
/// read-only filesystem) are errors.
pub fn can_reflink(dir: &Path) -> Result<bool> {
    match probe_clone(dir, dir)? {
        Ok(()) => Ok(true),
        Err(e) if cannot_reflink(&e) => Ok(false),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Clones a 4 KiB probe file made in `from` into a new file in `to`, then removes both. The
/// outer error: a probe file could not be made or written (it names which); the inner one is
/// FICLONE's own, whose errno says why (EXDEV: another filesystem or mount; EOPNOTSUPP, EINVAL,
/// ENOTTY: this filesystem cannot share extents).
pub fn probe_clone(from: &Path, to: &Path) -> Result<std::io::Result<()>> {
    static PROBES: AtomicU32 = AtomicU32::new(0);
    let n = PROBES.fetch_add(1, Ordering::Relaxed);
    let base = format!(".stillpoint-reflink-probe-{}-{n}", std::process::id());
    let (src_path, dst_path) = (from.join(&base), to.join(format!("{base}.clone")));
    let result = (|| {
        let mut src = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&src_path)
            .map_err(|e| Error::io(&src_path, e))?;
        src.write_all(&[0x5a; 4096]).map_err(|e| Error::io(&src_path, e))?;
        let dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&dst_path)
            .map_err(|e| Error::io(&dst_path, e))?;
        Ok(crate::sys::clone_file(&src, &dst))
    })();
    let _ = fs::remove_file(&src_path);
    let _ = fs::remove_file(&dst_path);
    result
}

/// The errors FICLONE gives where the filesystem cannot share extents at all (EOPNOTSUPP, EXDEV,
/// EINVAL, ENOTTY, ENOSYS), as opposed to a failure of this one clone (ENOSPC, EIO).
pub(crate) fn cannot_reflink(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(95 | 18 | 22 | 25 | 38))
}

/// The filesystem under `path` by name (`ext2/3/4`, `tmpfs`, `xfs`...), for messages.
pub fn fs_name(path: &Path) -> String {
    let Ok(stat) = File::open(path).and_then(|f| crate::sys::fs_stat(&f)) else {
        return "an unknown filesystem".into();
    };
    match stat.magic {
        0xEF53 => "ext2/3/4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6969 => "nfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0xFF53_4D42 | 0xFE53_4D42 => "cifs/smb".into(),
        0x6573_5546 => "a FUSE filesystem".into(),
        other => format!("a filesystem of type {other:#x}"),
    }
}

/// Bytes that may still be written on the filesystem under `path`.
pub(crate) fn available_bytes(path: &Path) -> Result<u64> {
    File::open(path)
        .and_then(|f| crate::sys::fs_stat(&f))
        .map(|s| s.available_bytes)
        .map_err(|e| Error::io(path, e))
}

/// Whether `dir` is a mount point now (a line of `/proc/self/mountinfo` mounts there).
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(dir) = fs::canonicalize(dir) else { return false };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines().filter_map(|line| line.split(' ').nth(4)).any(|at| unescape(at) == dir)
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
pub(crate) fn unescape(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Runs a command; its failure is an error quoting what it printed.
fn run(command: &mut Command) -> Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let shown = std::iter::once(program.clone())
        .chain(command.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = command.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            let package = if program == "mkfs.xfs" { "xfsprogs" } else { "util-linux (mount)" };
            Error::San(format!("{program} not found: install {package}"))
        } else {
            Error::San(format!("{shown}: {e}"))
        }
    })?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    let said = said.trim();
    Err(Error::San(format!(
        "`{shown}` failed ({}){}{said}",
        out.status,
        if said.is_empty() { "" } else { ": " }
    )))
}
