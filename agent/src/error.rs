//! The agent library's one error type. Plug-ins (quiescers, snapshot providers) return
//! `anyhow::Result` and the operations fold their failures into replies; this type is for what
//! stops the daemon or refuses a request outright.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read or parsed.
    #[error("config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    /// The config parsed but `validate()` found problems, one line each.
    #[error("config has {} problem(s):\n{}", .0.len(), .0.join("\n"))]
    Invalid(Vec<String>),
    /// A request carried an argument we refuse; becomes INVALID_ARGUMENT.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names something this agent does not hold; becomes NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot run in the agent's current state (no repository configured, a copy
    /// already running, snapshots being deleted); becomes FAILED_PRECONDITION.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A quiescer or snapshot provider could not be built from its config.
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Core(#[from] stillpoint_core::Error),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A snapshot provider failed where the request cannot succeed without it.
    #[error("{0}")]
    Provider(String),
    /// An operation's task died (panicked); the table is left as it was.
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            other => tonic::Status::internal(other.to_string()),
        }
    }
}
