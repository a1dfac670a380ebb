//! A refusal by the listener as `--json` prints it (`{"error": RefusalView}`), read from the
//! status's rich details (`google.rpc` via tonic-types), never from its message text.

use serde::Serialize;
use tonic_types::StatusExt;

/// The JSON document printed on stdout when the listener refused: `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorDocument {
    pub error: RefusalView,
}

/// What the listener refused and why. `reason` is `ErrorInfo.reason` (e.g. `GROUP_BUSY`);
/// `backup_id` names the backup concerned (the busy one, the unknown one); `fields` the request
/// fields that were wrong.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusalView {
    pub code: String,
    pub message: String,
    pub reason: Option<String>,
    pub backup_id: Option<String>,
    pub group: Option<String>,
    pub fields: Vec<FieldView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldView {
    pub field: String,
    pub description: String,
}

impl From<&tonic::Status> for RefusalView {
    fn from(status: &tonic::Status) -> Self {
        let details = status.get_error_details();
        let info = details.error_info();
        let meta = |key: &str| info.and_then(|i| i.metadata.get(key)).cloned();
        let resource_backup = details
            .resource_info()
            .filter(|r| r.resource_type == "stillpoint.v1.Backup")
            .map(|r| r.resource_name.clone());
        RefusalView {
            code: code_name(status.code()).to_string(),
            message: status.message().to_string(),
            reason: info.map(|i| i.reason.clone()),
            backup_id: meta("backup_id").or(resource_backup),
            group: meta("group"),
            fields: details
                .bad_request()
                .map(|b| {
                    b.field_violations
                        .iter()
                        .map(|v| FieldView {
                            field: v.field.clone(),
                            description: v.description.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// The gRPC code as the spec spells it, e.g. `FAILED_PRECONDITION`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
