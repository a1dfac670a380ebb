//! The only unsafe code in stillpoint: thin wrappers over the Linux syscalls we need (the
//! FIFREEZE, FITHAW, FICLONE, FIEMAP and btrfs FS_INFO ioctls, SEEK_DATA/SEEK_HOLE, fallocate,
//! posix_fadvise, fstatfs, geteuid, kill, pidfds, shutdown, and glibc's mallopt). Each returns
//! the raw `io::Error` so callers can tell EBUSY (someone else's freeze), EINVAL (not frozen)
//! and ESRCH (no such process) apart. Depends on `libc` alone, so any crate may use it.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

// _IOWR('X', 119, int), _IOWR('X', 120, int), _IOW(0x94, 9, int) from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
const FICLONE: libc::c_ulong = 0x4004_9409;
// _IOWR('f', 11, struct fiemap) from linux/fs.h (struct fiemap is 32 bytes without extents).
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
// _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args) from linux/btrfs.h (1024 bytes).
const BTRFS_IOC_FS_INFO: libc::c_ulong = 0x8400_941F;

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

/// One extent of a file as FIEMAP reports it (`struct fiemap_extent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FiemapExtent {
    /// Byte offset in the file.
    pub logical: u64,
    /// Byte address on the device (btrfs: in the filesystem's own address space).
    pub physical: u64,
    pub length: u64,
    /// `FIEMAP_EXTENT_*` bits.
    pub flags: u32,
}

/// `FIEMAP_EXTENT_*` flags from linux/fiemap.h.
pub mod fiemap_flags {
    /// The last extent of the file.
    pub const LAST: u32 = 0x0001;
    /// The data's location is not known yet.
    pub const UNKNOWN: u32 = 0x0002;
    /// Delayed allocation: no location yet (implies UNKNOWN).
    pub const DELALLOC: u32 = 0x0004;
    /// Not readable as is (compressed, for instance).
    pub const ENCODED: u32 = 0x0008;
    pub const DATA_ENCRYPTED: u32 = 0x0080;
    /// Not block aligned.
    pub const NOT_ALIGNED: u32 = 0x0100;
    /// Data stored with the metadata, no address of its own.
    pub const DATA_INLINE: u32 = 0x0200;
    /// Several files' tails packed together.
    pub const DATA_TAIL: u32 = 0x0400;
    /// Allocated but not written: reads as zeros.
    pub const UNWRITTEN: u32 = 0x0800;
    /// Made of several blocks merged (the filesystem has no extents).
    pub const MERGED: u32 = 0x1000;
    /// Shared with another file (reflink, snapshot).
    pub const SHARED: u32 = 0x2000;
}

/// Appends to `out` the extents of `file` that overlap `[start, start + len)`, at most `max` of
/// them (`FS_IOC_FIEMAP`, with `FIEMAP_FLAG_SYNC` so dirty data has a place first). Returns how
/// many it appended: fewer than `max` (or one flagged `LAST`) means there are no more in the
/// range; otherwise ask again from the end of the last one. EOPNOTSUPP: the filesystem cannot.
pub fn fiemap(
    file: &File,
    start: u64,
    len: u64,
    max: u32,
    out: &mut Vec<FiemapExtent>,
) -> io::Result<usize> {
    // struct fiemap: fm_start, fm_length (u64), fm_flags, fm_mapped_extents, fm_extent_count,
    // fm_reserved (u32), then fm_extent_count struct fiemap_extent of 56 bytes each: logical,
    // physical, length, 2 reserved (u64), flags, 3 reserved (u32). Built in u64 words so it is
    // aligned for the kernel's reads.
    const HEAD: usize = 4;
    const EXTENT: usize = 7;
    let count = usize::try_from(max).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u64; HEAD + count * EXTENT];
    buf[0] = start;
    buf[1] = len;
    // fm_flags = FIEMAP_FLAG_SYNC (1), fm_mapped_extents = 0: the low and high halves of word 2
    // in the machine's byte order; fm_extent_count, fm_reserved = 0 in word 3 likewise.
    buf[2] = u64::from_ne_bytes(pack_u32s(1, 0));
    buf[3] = u64::from_ne_bytes(pack_u32s(max, 0));
    // SAFETY: the buffer holds a struct fiemap followed by room for `max` extents, as
    // fm_extent_count says; the kernel writes no further. The fd is valid for the call.
    check(unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, buf.as_mut_ptr()) })?;
    let (_, mapped) = unpack_u32s(buf[2].to_ne_bytes());
    let mapped = usize::try_from(mapped).unwrap_or(usize::MAX).min(count);
    for e in buf[HEAD..].chunks_exact(EXTENT).take(mapped) {
        let (flags, _) = unpack_u32s(e[5].to_ne_bytes());
        out.push(FiemapExtent { logical: e[0], physical: e[1], length: e[2], flags });
    }
    Ok(mapped)
}

/// Two u32 fields laid out as in a C struct: `first` at the lower address.
fn pack_u32s(first: u32, second: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&first.to_ne_bytes());
    b[4..].copy_from_slice(&second.to_ne_bytes());
    b
}

fn unpack_u32s(b: [u8; 8]) -> (u32, u32) {
    let first = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let second = u32::from_ne_bytes([b[4], b[5], b[6], b[7]]);
    (first, second)
}

/// The id of the btrfs filesystem `file` is on (`BTRFS_IOC_FS_INFO`'s fsid): the same for
/// every subvolume of it, where `st_dev` differs per subvolume. ENOTTY: not btrfs.
pub fn btrfs_fsid(file: &File) -> io::Result<[u8; 16]> {
    // struct btrfs_ioctl_fs_info_args: max_id, num_devices (u64), then fsid[16]: 1024 bytes.
    let mut buf = vec![0u64; 128];
    // SAFETY: the ioctl writes one 1024-byte struct into the buffer we own; the fd is valid.
    check(unsafe { libc::ioctl(file.as_raw_fd(), BTRFS_IOC_FS_INFO as _, buf.as_mut_ptr()) })?;
    let mut fsid = [0u8; 16];
    fsid[..8].copy_from_slice(&buf[2].to_ne_bytes());
    fsid[8..].copy_from_slice(&buf[3].to_ne_bytes());
    Ok(fsid)
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

/// How a file will be read, for the kernel's page cache (`posix_fadvise(2)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// The kernel's usual readahead.
    Normal,
    /// Reads jump about: no readahead beyond what each read asks.
    Random,
    /// These bytes will be read soon: start reading them now, without waiting.
    WillNeed,
}

/// Tells the kernel how `len` bytes of `file` at `offset` will be read (`len` 0: to the end).
/// Only a hint: callers that only want speed ignore errors.
pub fn advise(file: &File, offset: u64, len: u64, advice: Advice) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let advice = match advice {
        Advice::Normal => libc::POSIX_FADV_NORMAL,
        Advice::Random => libc::POSIX_FADV_RANDOM,
        Advice::WillNeed => libc::POSIX_FADV_WILLNEED,
    };
    // SAFETY: plain syscall on a valid fd with integer arguments.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, advice) };
    // posix_fadvise returns the error number instead of setting errno.
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
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

/// Allocations of at least this many bytes get pages of their own, returned to the system when
/// freed (see [`fix_mmap_threshold`]).
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`]; the binaries call it first thing.
/// Why: by default glibc raises the threshold each time a large mmapped block is freed (up to
/// 32 MiB), after which buffers of a few MiB (restore windows and read buffers, a segment's
/// tables, sort buffers) come from the heap instead, whose freed space stays resident and
/// fragments. Measured: a 16 GiB restore peaked at 154 MiB of RSS with the default and 118 MiB
/// with this (1 GiB: 120 and 111), at the same speed. False when the C library refused it;
/// true and nothing done on other C libraries.
pub fn fix_mmap_threshold() -> bool {
    #[cfg(target_env = "gnu")]
    {
        let bytes = libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets one of malloc's tuning parameters (thread-safe in glibc).
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    true
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
    /// SIGKILL: ends a holder process whose lock must go with it.
    Kill,
    /// The polite signals an application may be asked to stop (or flush) with.
    Term,
    Int,
    Hup,
    Quit,
    Usr1,
    Usr2,
}

impl Signal {
    fn number(self) -> libc::c_int {
        match self {
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
            Signal::Kill => libc::SIGKILL,
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Hup => libc::SIGHUP,
            Signal::Quit => libc::SIGQUIT,
            Signal::Usr1 => libc::SIGUSR1,
            Signal::Usr2 => libc::SIGUSR2,
        }
    }
}

/// Sends `signal` to process `pid` (never a group: `pid` must be positive). ESRCH: no such process.
pub fn kill(pid: i32, signal: Signal) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} is not a process"),
        ));
    }
    // SAFETY: kill(2) takes two integers and touches no memory of ours; a positive pid names
    // one process, never a process group.
    check(unsafe { libc::kill(pid, signal.number()) })
}

/// A file descriptor naming process `pid` itself (`pidfd_open(2)`): signals sent through it
/// never reach another process that later gets the same pid. ESRCH: no such process.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pid {pid} is not a process"),
        ));
    }
    // SAFETY: pidfd_open takes a pid and flags (0) and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` to the process `pidfd` names (`pidfd_send_signal(2)`). ESRCH: it has exited.
pub fn pidfd_send_signal(pidfd: &OwnedFd, signal: Signal) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number, no siginfo (NULL) and flags 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal.number(),
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A duplicate, in this process, of file descriptor `fd` of the process `pidfd` names
/// (`pidfd_getfd(2)`; the caller needs ptrace access to it). EBADF: that process has no such fd.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two fds and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Shuts a socket down both ways (`shutdown(2)`, SHUT_RDWR): the connection ends for every
/// process that shares it, so the peer sees it closed. ENOTCONN: it was not connected.
pub fn shutdown(socket: &impl AsFd) -> io::Result<()> {
    // SAFETY: shutdown(2) on a valid fd with an integer flag; no memory is passed.
    check(unsafe { libc::shutdown(socket.as_fd().as_raw_fd(), libc::SHUT_RDWR) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_fixed_mmap_threshold() {
        assert!(super::fix_mmap_threshold());
    }
}
