//! The contract backup software builds on, against the real listener served in-process over
//! loopback mutual TLS with scripted agents (`stillpoint_listener::testing`): one module per
//! promise, the helpers they share here.

use std::time::Duration;

use stillpoint_proto as pb;
use tonic::transport::Channel;

#[path = "contract/artifacts.rs"]
mod artifacts;
#[path = "contract/details.rs"]
mod details;
#[path = "contract/health.rs"]
mod health;
#[path = "contract/idempotency.rs"]
mod idempotency;
#[path = "contract/pages.rs"]
mod pages;
#[path = "contract/progress.rs"]
mod progress;
#[path = "contract/retention.rs"]
mod retention;
#[path = "contract/schedules.rs"]
mod schedules;
#[path = "contract/wait.rs"]
mod wait;
#[path = "contract/watch.rs"]
mod watch;

type Client = pb::listener_client::ListenerClient<Channel>;

/// Reads backup `id` until `done` holds for it (30 s at most).
async fn until(client: &mut Client, id: &str, done: impl Fn(&pb::Backup) -> bool) -> pb::Backup {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let request = pb::GetBackupRequest { backup_id: id.into() };
        let backup = client.get_backup(request).await.expect("get backup").into_inner();
        if done(&backup) {
            return backup;
        }
        assert!(tokio::time::Instant::now() < deadline, "backup never got there: {backup:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state(backup: &pb::Backup) -> pb::BackupState {
    pb::BackupState::try_from(backup.state).unwrap_or(pb::BackupState::Unspecified)
}

fn start(group: &str, request_id: &str) -> pb::StartBackupRequest {
    pb::StartBackupRequest { group: group.into(), request_id: request_id.into() }
}

/// The refusal `result` must be, with `says` in its message.
fn refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    says: &str,
) -> tonic::Status {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{:?} lacks {says:?}", status.message());
    status
}
