//! The restored image's filesystem: recognised by its superblock (pure, from the first 68 KiB),
//! its read-only check, and loop mounts as drop guards, so every path out of a check (a
//! failure, a timeout, a panic) unmounts and detaches what it attached.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::exec::{Failed, Run};

/// How many bytes of the image [`detect`] needs (btrfs' superblock sits at 64 KiB).
pub const PROBE_BYTES: usize = 0x10000 + 0x1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Xfs,
    Btrfs,
    /// ext2, ext3 or ext4: one magic, one checker.
    Ext,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
            FsType::Ext => "ext4",
        }
    }

    /// Mount options beyond ro/rw: a restored XFS has the UUID of the filesystem it came from,
    /// which may be mounted on this very host.
    fn mount_options(self) -> &'static str {
        match self {
            FsType::Xfs => ",nouuid",
            FsType::Btrfs | FsType::Ext => "",
        }
    }
}

/// The filesystem whose superblock begins `head` (the image's first [`PROBE_BYTES`]), if one
/// the drill knows. The volume must hold the filesystem itself, not a partition table.
pub fn detect(head: &[u8]) -> Option<FsType> {
    if head.starts_with(b"XFSB") {
        return Some(FsType::Xfs);
    }
    if head.get(0x10040..0x10048) == Some(b"_BHRfS_M".as_slice()) {
        return Some(FsType::Btrfs);
    }
    if head.get(0x438..0x43a) == Some([0x53, 0xef].as_slice()) {
        return Some(FsType::Ext);
    }
    None
}

/// Reads the image's head and names its filesystem, or fails saying what the drill knows.
pub fn detect_image(image: &Path) -> Result<FsType, Failed> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(PROBE_BYTES);
    std::fs::File::open(image)
        .and_then(|f| f.take(PROBE_BYTES as u64).read_to_end(&mut head))
        .map_err(|e| Failed::new(format!("read {}: {e}", image.display())))?;
    detect(&head).ok_or_else(|| {
        Failed::new(format!(
            "{} holds no filesystem the drill knows (xfs, btrfs, ext2/3/4) at its start; a \
             partitioned disk image is not supported",
            image.display()
        ))
    })
}

/// The read-only checker for `fs` on `image`: never writes, exit 0 when clean.
pub fn fsck_command(fs: FsType, image: &Path) -> (&'static str, Vec<String>) {
    let image = image.display().to_string();
    match fs {
        // -f: the target is a file, not a device.
        FsType::Xfs => ("xfs_repair", vec!["-n".into(), "-f".into(), image]),
        FsType::Btrfs => ("btrfs", vec!["check".into(), "--readonly".into(), image]),
        // -f: check even when marked clean.
        FsType::Ext => ("e2fsck", vec!["-n".into(), "-f".into(), image]),
    }
}

/// A loop device attached to an image, detached on drop.
pub struct Loop {
    pub device: String,
}

impl Loop {
    pub fn attach(image: &Path, log: &Path, deadline: Instant) -> Result<Loop, Failed> {
        let image = image.display().to_string();
        let out = Run::new("losetup", &["--find", "--show", &image], log).check(deadline)?;
        let device = out.lines().rev().find(|l| l.starts_with("/dev/")).map(str::to_string);
        device.map(|device| Loop { device }).ok_or_else(|| {
            Failed::with_output(format!("losetup --find --show {image}: no device said"), &out)
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if !quiet("losetup", &["-d", &self.device]) {
            crate::cmd::note(&format!(
                "backupctl: drill: losetup -d {} failed; detach it by hand",
                self.device
            ));
        }
    }
}

/// A filesystem mounted at `root`, unmounted on drop (lazily if busy), then its loop device
/// detached (fields drop in order).
pub struct Mounted {
    pub root: PathBuf,
    _loop: Loop,
}

impl Mounted {
    /// Attaches `image` to a loop device and mounts it at `root` (created), read-only or not.
    /// Read-write is for databases; the image is a scratch copy, never the backup itself.
    pub fn new(
        image: &Path,
        root: &Path,
        read_only: bool,
        log: &Path,
        deadline: Instant,
    ) -> Result<Mounted, Failed> {
        if !stillpoint_core::sys::is_root() {
            return Err(Failed::new("mounting a restored image needs root: run the drill as root"));
        }
        let fs = detect_image(image)?;
        std::fs::create_dir_all(root)
            .map_err(|e| Failed::new(format!("create {}: {e}", root.display())))?;
        let attached = Loop::attach(image, log, deadline)?;
        let options = format!("{}{}", if read_only { "ro" } else { "rw" }, fs.mount_options());
        let target = root.display().to_string();
        Run::new("mount", &["-t", fs.name(), "-o", &options, &attached.device, &target], log)
            .check(deadline)?;
        Ok(Mounted { root: root.into(), _loop: attached })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let root = self.root.display().to_string();
        if !quiet("umount", &[&root]) && !quiet("umount", &["-l", &root]) {
            crate::cmd::note(&format!(
                "backupctl: drill: umount {root} failed; unmount it by hand"
            ));
        }
    }
}

/// Runs a cleanup command with no output; whether it exited 0.
fn quiet(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
