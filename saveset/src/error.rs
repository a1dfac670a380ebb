//! The crate's one error type. Variants exist where a caller matches on them (a wrong secret, a
//! non-empty restore target); everything else is an IO error or damage that names its file.

use std::io;
use std::path::PathBuf;

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The passphrase or key file does not unlock the repository; nothing was changed.
    #[error("wrong passphrase or key for repository {}", path.display())]
    WrongSecret { path: PathBuf },
    /// `init` on a directory that already holds a repository (or other files).
    #[error("init {}: directory is not empty", path.display())]
    AlreadyExists { path: PathBuf },
    /// `open` on a directory without a readable `config`.
    #[error("open {}: not a saveset repository ({reason})", path.display())]
    NotARepository { path: PathBuf, reason: String },
    /// A restore target that holds data, without `force`.
    #[error("restore to {}: target is not empty (use force to overwrite it)", path.display())]
    TargetNotEmpty { path: PathBuf },
    /// No manifest with this id in the repository.
    #[error("manifest {id}: not found")]
    UnknownManifest { id: String },
    /// A stored file or chunk fails to decrypt, decode or match its hash.
    #[error("{what}: damaged ({reason})")]
    Damaged { what: String, reason: String },
    /// A backup could not refresh its writer lock for too long, so a prune may have taken it
    /// for dead: it writes no manifest (rerun it).
    #[error("lock {}: not refreshed for {secs} s (the repository was unreachable?), so a prune may \
             have deleted what this backup references; no manifest was written, rerun the backup", lock.display())]
    LockLost { lock: PathBuf, secs: u64 },
    /// A prune stopped on purpose after step `step` (tests' failpoint).
    #[error("prune stopped after step {step} (failpoint)")]
    PruneStopped { step: usize },
    /// A filesystem operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Attaches the operation and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io { op, path: path.into(), source })
    }
}
