//! The only unsafe code in stillpoint: thin wrappers over the Linux syscalls we need (the
//! FIFREEZE, FITHAW and FICLONE ioctls, SEEK_DATA/SEEK_HOLE, fallocate, fstatfs, geteuid, kill,
//! pidfds and shutdown). Each returns the raw `io::Error` so callers can tell EBUSY (someone
//! else's freeze), EINVAL (not frozen) and ESRCH (no such process) apart. Depends on `libc`
//! alone, so any crate may use it.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

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
