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
    #[error("unknown schedule {}; configured schedules: {known}", clip(.schedule, SHOWN))]
    UnknownSchedule { schedule: String, known: String },
    #[error("backup {backup} has no server {}; its servers: {known}", clip(.server, SHOWN))]
    UnknownServer { backup: String, server: String, known: String },
    #[error("group {group} already has backup {backup} in flight; wait for it or abort it")]
    Busy { group: String, backup: String },
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// WaitBackup's time ran out first; `record` is the backup as it was then.
    #[error("backup {} is {}, not {until} after {waited_ms} ms; wait again to go on waiting", record.id, record.state.name())]
    WaitTimedOut { record: Box<crate::model::BackupRecord>, until: &'static str, waited_ms: u64 },
    /// The request contradicts what the backup already is or was told; nothing was changed.
    #[error("{0}")]
    Precondition(String),
    #[error("backup {backup}: this listener copies with copy mode {mode}, which makes, seals and verifies its own copies; ReportCopy is only for copy mode report")]
    CopyMode { backup: String, mode: &'static str },
    #[error(transparent)]
    Core(#[from] stillpoint_core::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Error {
    /// `server` is not one of `record`'s servers; the error names those it has.
    pub fn unknown_server(record: &crate::model::BackupRecord, server: &str) -> Error {
        let known = record.servers.iter().map(|s| s.server.as_str()).collect::<Vec<_>>();
        Error::UnknownServer {
            backup: record.id.clone(),
            server: server.to_string(),
            known: known.join(", "),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every refusal carries rich details (`google.rpc`, read with `tonic_types::StatusExt`):
/// `ResourceInfo` naming what is unknown, `BadRequest` naming the field, and for a busy group
/// `ErrorInfo { reason: "GROUP_BUSY", domain: "stillpoint", metadata: {backup_id, group} }`
/// plus the busy backup as `ResourceInfo`; WaitBackup's timeout carries the backup itself.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use crate::details::{self, BACKUP_RESOURCE};
        use tonic::Code;
        use tonic_types::ErrorDetails;
        let message = e.to_string();
        let (code, details) = match e {
            Error::UnknownBackup(id) => (
                Code::NotFound,
                Some(ErrorDetails::with_resource_info(
                    BACKUP_RESOURCE,
                    details::shown(&id),
                    "",
                    "no such backup in the catalog",
                )),
            ),
            Error::UnknownGroup { group, known } => (
                Code::NotFound,
                Some(ErrorDetails::with_resource_info(
                    "group",
                    details::shown(&group),
                    "",
                    format!("not configured; configured groups: {known}"),
                )),
            ),
            Error::UnknownSchedule { schedule, known } => (
                Code::NotFound,
                Some(ErrorDetails::with_resource_info(
                    "schedule",
                    details::shown(&schedule),
                    "",
                    format!("not configured; configured schedules: {known}"),
                )),
            ),
            Error::UnknownServer { backup, server, known } => (
                Code::NotFound,
                Some(ErrorDetails::with_resource_info(
                    "server",
                    details::shown(&server),
                    "",
                    format!("not in backup {backup}; its servers: {known}"),
                )),
            ),
            Error::Busy { group, backup } => {
                let metadata = std::collections::HashMap::from([
                    ("backup_id".to_string(), backup.clone()),
                    ("group".to_string(), group.clone()),
                ]);
                let mut d =
                    ErrorDetails::with_error_info(details::GROUP_BUSY, details::DOMAIN, metadata);
                d.set_resource_info(
                    BACKUP_RESOURCE,
                    backup,
                    "",
                    format!("in flight in group {group}"),
                );
                (Code::FailedPrecondition, Some(d))
            }
            Error::InvalidArgument { field, reason } => (
                Code::InvalidArgument,
                Some(ErrorDetails::with_bad_request_violation(field, reason)),
            ),
            Error::WaitTimedOut { record, until, .. } => {
                let metadata = std::collections::HashMap::from([
                    ("backup_id".to_string(), record.id.clone()),
                    ("state".to_string(), record.state.name().to_string()),
                    ("until".to_string(), until.to_string()),
                ]);
                let details = ErrorDetails::with_error_info(
                    details::WAIT_TIMED_OUT,
                    details::DOMAIN,
                    metadata,
                );
                let backup = crate::convert::backup(&record);
                return details::status(
                    Code::DeadlineExceeded,
                    message,
                    Some(details),
                    Some(&backup),
                );
            }
            Error::Precondition(_) | Error::CopyMode { .. } => (Code::FailedPrecondition, None),
            Error::Config { .. }
            | Error::Store { .. }
            | Error::Core(_)
            | Error::Io(_)
            | Error::Transport(_) => (Code::Internal, None),
        };
        details::status(code, message, details, None)
    }
}
