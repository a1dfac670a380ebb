//! The one error type of `backupctl` and the exit code each variant maps to. A backup that ended
//! FAILED or ABORTED is reported through [`Error::BackupFailed`] so every verb returns `Result`.

/// Exit code: the command did what was asked.
pub const EXIT_OK: u8 = 0;
/// Exit code: the backup failed or was aborted (or did not reach the state waited for), or a
/// repository is damaged or holds only part of the backup (`verify`, `restore`).
pub const EXIT_BACKUP_FAILED: u8 = 1;
/// Exit code: bad usage, missing identity, or the listener could not be reached or refused.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the listener answered but an agent did not (`agents`), named on stderr.
pub const EXIT_AGENT_UNREACHABLE: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line or environment is incomplete or contradictory.
    #[error("{0}")]
    Usage(String),
    /// An RPC failed: transport, TLS, permission or a refusal by the listener.
    #[error("{what}: {}", describe(.status))]
    Rpc { what: String, status: tonic::Status },
    /// Certificates or the mock SAN refused or failed.
    #[error(transparent)]
    Core(#[from] stillpoint_core::Error),
    /// Writing to stdout failed.
    #[error("write output: {0}")]
    Output(#[from] std::io::Error),
    /// A saveset repository could not be opened or read (a wrong secret, not a repository, IO);
    /// a damaged chunk or manifest met during a restore exits 1, everything else 2.
    #[error(transparent)]
    Repository(#[from] stillpoint_saveset::Error),
    /// `verify` found damage concerning the backup; the problems were printed on stdout.
    #[error("{0}")]
    Damaged(String),
    /// `verify` or `restore` of a backup the repository holds only part of (no backup
    /// manifest), without `--incomplete`.
    #[error("{0}")]
    Incomplete(String),
    /// `drill` ran and a restore or a check failed (the report was printed).
    #[error("{0}")]
    DrillFailed(String),
    /// The backup ended FAILED or ABORTED, or the watch ended before the state waited for.
    #[error("backup {id} {state}{}", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    BackupFailed { id: String, state: String, reason: String },
    /// `certs check`: a certificate expires soon (the table was printed).
    #[error("{0}")]
    CertsExpiring(String),
    /// `agents`: the listener could not reach these agents (the table was printed).
    #[error("{0}")]
    AgentsUnreachable(String),
    /// `preflight` found an error; the findings were printed on stdout.
    #[error("{0}")]
    Preflight(String),
    /// `retention` dropped backups it could not forget (each printed with why).
    #[error("{0}")]
    NotForgotten(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::BackupFailed { .. }
            | Error::Damaged(_)
            | Error::Incomplete(_)
            | Error::CertsExpiring(_)
            | Error::DrillFailed(_)
            | Error::Preflight(_)
            | Error::NotForgotten(_) => EXIT_BACKUP_FAILED,
            Error::Repository(stillpoint_saveset::Error::Damaged { .. }) => EXIT_BACKUP_FAILED,
            Error::Repository(_) => EXIT_USAGE,
            Error::AgentsUnreachable(_) => EXIT_AGENT_UNREACHABLE,
            Error::Usage(_) | Error::Rpc { .. } | Error::Core(_) | Error::Output(_) => EXIT_USAGE,
        }
    }

    /// Wraps a failed RPC with what was being attempted, e.g. `get backup b-1`.
    pub fn rpc(what: impl Into<String>, status: tonic::Status) -> Self {
        Error::Rpc { what: what.into(), status }
    }
}

/// A permission refusal carries the server's own words (which role lacks which right); every
/// other failure goes through `tls::explain`, which digs out transport and TLS causes.
fn describe(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::PermissionDenied => format!("permission denied: {}", status.message()),
        _ => stillpoint_core::tls::explain(status),
    }
}
