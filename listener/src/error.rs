//! The listener's error type, and how it reaches gRPC callers.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config {path}: {problems}")]
    Config { path: String, problems: String },
    #[error("store {path}: {reason}")]
    Store { path: String, reason: String },
    #[error("unknown backup {0:?}; list backups with `backupctl list`")]
    UnknownBackup(String),
    #[error("unknown group {group:?}; configured groups: {known}")]
    UnknownGroup { group: String, known: String },
    #[error("unknown server {server:?} in backup {backup}")]
    UnknownServer { backup: String, server: String },
    #[error("group {group} already has backup {backup} in flight; wait for it or abort it")]
    Busy { group: String, backup: String },
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
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
            Error::Busy { .. } => tonic::Status::failed_precondition(msg),
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}
