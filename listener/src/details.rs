//! Rich error details on the listener's refusals (`google.rpc` messages through tonic-types),
//! and what callers sent, checked and clipped before an error echoes it back: a hostile or
//! broken client cannot make an error message (or a log line) as large as its request.

use prost::{Message, Name};
use stillpoint_core::text::clip;
use stillpoint_proto as pb;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `ErrorInfo.domain` of every stillpoint error.
pub const DOMAIN: &str = "stillpoint";
/// `ErrorInfo.reason` when a group already has a backup in flight.
pub const GROUP_BUSY: &str = "GROUP_BUSY";
/// `ErrorInfo.reason` when WaitBackup's timeout passed before its condition held.
pub const WAIT_TIMED_OUT: &str = "WAIT_TIMED_OUT";
/// `ResourceInfo.resource_type` naming a backup.
pub const BACKUP_RESOURCE: &str = "stillpoint.v1.Backup";

/// How much of a caller's text an error shows (`stillpoint_core::text::clip`).
pub const SHOWN: usize = 64;

/// A caller's name or id for a detail field: as it is when it is a valid name (short, plain),
/// else clipped and quoted, so a detail (which travels in a header) stays small.
pub fn shown(name: &str) -> String {
    match stillpoint_core::validate_name("name", name) {
        Ok(()) => name.to_string(),
        Err(_) => clip(name, SHOWN),
    }
}

/// Checks a name from a request (`backup_id`, `group`), echoing at most a clipped copy of it.
pub fn name(field: &'static str, value: &str) -> crate::Result<()> {
    stillpoint_core::validate_name(field, value).map_err(|_| crate::Error::InvalidArgument {
        field,
        reason: format!(
            "{} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', not starting with '.'",
            clip(value, SHOWN)
        ),
    })
}

/// A status with `details` and, when given, `backup` as one more detail (an `Any` of
/// `stillpoint.v1.Backup`), so a caller gets the backup as it is along with the refusal.
pub fn status(
    code: Code,
    message: String,
    details: Option<ErrorDetails>,
    backup: Option<&pb::Backup>,
) -> Status {
    let with_details = match details {
        Some(details) => Status::with_error_details(code, message, details),
        None => Status::new(code, message),
    };
    let Some(backup) = backup else { return with_details };
    // tonic-types writes only the standard details: add the backup to the google.rpc.Status
    // it encoded (or to an empty one).
    let mut rpc = tonic_types::pb::Status::decode(with_details.details()).unwrap_or_else(|_| {
        tonic_types::pb::Status {
            code: code as i32,
            message: with_details.message().into(),
            details: Vec::new(),
        }
    });
    rpc.details
        .push(prost_types::Any { type_url: pb::Backup::type_url(), value: backup.encode_to_vec() });
    Status::with_details(code, with_details.message(), rpc.encode_to_vec().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_show_as_they_are_and_anything_else_clipped() {
        assert_eq!(shown("srv-a"), "srv-a");
        let long = shown(&"x".repeat(1_000_000));
        assert!(long.len() < 200 && long.contains("(1000000 bytes"), "{long}");
        assert_eq!(shown("a b"), "\"a b\"");
    }

    #[test]
    fn a_backup_rides_beside_the_standard_details() {
        let backup = pb::Backup { backup_id: "b-1".into(), ..Default::default() };
        let details = ErrorDetails::with_error_info(WAIT_TIMED_OUT, DOMAIN, []);
        let status = status(Code::DeadlineExceeded, "late".into(), Some(details), Some(&backup));
        assert_eq!(status.get_details_error_info().map(|i| i.reason), Some(WAIT_TIMED_OUT.into()));
        let rpc = tonic_types::pb::Status::decode(status.details()).unwrap();
        let any = rpc.details.iter().find(|a| a.type_url == pb::Backup::type_url()).unwrap();
        assert_eq!(any.to_msg::<pb::Backup>().unwrap(), backup);
    }
}
