//! The error type of the shared crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `name` is already quoted and clipped (`text::clip`): it may be anything a client sent.
    #[error("{what} {name} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'")]
    InvalidName { what: String, name: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("certificate {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("tls: {0}")]
    Tls(String),
    #[error("mock SAN: {0}")]
    San(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
