//! The listener's error type, and how it reaches gRPC callers. What a client sent is shown
//! clipped (`stillpoint_core::text::clip`): a status message travels in a header.

use stillpoint_core::text::clip;

/// How much of a client's name or id an error message shows.
const SHOWN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {problems}")]
    Config { path: String, problems: String },
    #[error("store {path}: {reason}")]
    Store { path: String, reason: String },
    #[error("unknown backup {}; list backups with `backupctl list`", clip(.0, SHOWN))]
    UnknownBackup(String),
    #[error("unknown group {}; configured groups: {known}", clip(.group, SHOWN))]
    UnknownGroup { group: String, known: String },
    #[error("backup {backup} has no server {}; its servers: {known}", clip(.server, SHOWN))]
    UnknownServer { backup: String, server: String, known: String },
    #[error("group {group} already has backup {backup} in flight; wait for it or abort it")]
    Busy { group: String, backup: String },
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The request contradicts what the backup already is or was told; nothing was changed.
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Core(#[from] stillpoint_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::UnknownBackup(_) | Error::UnknownGroup { .. } | Error::UnknownServer { .. } => {
                tonic::Status::not_found(msg)
            }
            Error::Busy { .. } | Error::Precondition(_) => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}
