//! The only unsafe code in stillpoint: thin wrappers over the Linux syscalls we need (the
//! FIFREEZE, FITHAW and FICLONE ioctls, SEEK_DATA/SEEK_HOLE, fallocate, kill). Each returns the
//! raw `io::Error` so callers can tell EBUSY (someone else's freeze), EINVAL (not frozen) and
//! ESRCH (no such process) apart. Depends on `libc` alone, so any crate may use it.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

// _IOWR('X', 119, int), _IOWR('X', 120, int), _IOW(0x94, 9, int) from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
const FICLONE: libc::c_ulong = 0x4004_9409;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Freezes the filesystem mounted at the directory `mount` is open on. EBUSY: already frozen.
pub fn freeze(mount: &File) -> io::Result<()> {
    // SAFETY: FIFREEZE takes an int argument that the kernel ignores; the fd is valid for the call.
    check(unsafe { libc::ioctl(mount.as_raw_fd(), FIFREEZE as _, 0) })
}

/// Thaws the filesystem at `mount`. EINVAL: it was not frozen.
pub fn thaw(mount: &File) -> io::Result<()> {
    // SAFETY: as for `freeze`.
    check(unsafe { libc::ioctl(mount.as_raw_fd(), FITHAW as _, 0) })
}

/// The next offset at or after `from` that holds data (SEEK_DATA), or `None` past the last
/// data. Filesystems without hole tracking report everything as data.
pub fn next_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    seek(file, from, libc::SEEK_DATA)
}

/// The next hole at or after `from` (SEEK_HOLE); the end of the file counts as a hole.
pub fn next_hole(file: &File, from: u64) -> io::Result<Option<u64>> {
    seek(file, from, libc::SEEK_HOLE)
}

fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from =
        libc::off_t::try_from(from).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a valid fd has no memory-safety preconditions; the fd's offset is not
    // used by our readers, which read at explicit offsets.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if at >= 0 {
        return Ok(u64::try_from(at).ok());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// Makes `dst` share `src`'s extents (a reflink clone). EOPNOTSUPP/EXDEV/EINVAL: not possible here.
pub fn clone_file(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd by value; both fds are valid for the call.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) })
}

/// Allocates `len` bytes of `file` at `offset` as unwritten extents, without changing its size
/// (`fallocate(2)`, mode 0 inside the file). Errors such as EOPNOTSUPP mean the filesystem
/// cannot; callers that only want speed ignore them.
pub fn preallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscall on a valid fd with integer arguments.
    check(unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) })
}

/// What `fstatfs(2)` says of the filesystem a file or directory is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStat {
    /// The filesystem's magic number (`f_type`), e.g. 0xEF53 for ext2/3/4, 0x58465342 for XFS.
    pub magic: u64,
    /// Bytes an unprivileged user may still write (`f_bavail * f_bsize`).
    pub available_bytes: u64,
}

/// The filesystem under `file` (`fstatfs(2)`).
pub fn fs_stat(file: &File) -> io::Result<FsStat> {
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes one `struct statfs` into the buffer we own; the fd is valid.
    check(unsafe { libc::fstatfs(file.as_raw_fd(), buf.as_mut_ptr()) })?;
    // SAFETY: the call succeeded, so the kernel filled the struct (and it was zeroed before).
    let st = unsafe { buf.assume_init() };
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let (magic, avail, bsize) = (st.f_type as u64, u64::from(st.f_bavail), st.f_bsize as u64);
    Ok(FsStat { magic, available_bytes: avail.saturating_mul(bsize) })
}

/// Whether this process runs with effective user id 0 (what mounting a filesystem needs).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The signals the agent sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Stop,
    Cont,
}

/// Sends `signal` to process `pid` (never a group: `pid` must be positive). ESRCH: no such process.
pub fn kill(pid: i32, signal: Signal) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} is not a process"),
        ));
    }
    let sig = match signal {
        Signal::Stop => libc::SIGSTOP,
        Signal::Cont => libc::SIGCONT,
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours; a positive pid names
    // one process, never a process group.
    check(unsafe { libc::kill(pid, sig) })
}
