//! `watch [ID]`: follows a backup's WatchBackup stream until it ends. Also home of [`follow`],
//! the stream loop `start --wait` and `abort` share, which resubscribes after a dropped stream.

use std::io::Write;
use std::time::Duration;

use stillpoint_proto::{Backup, WatchBackupRequest, WatchEvent};

use crate::client::{self, about, Client, Connection};
use crate::error::{Error, Result};
use crate::view::{self, is_failed, is_terminal, Progress, WatchEventView};

/// Exit 0 when the backup ends SUCCEEDED, 1 when it ends FAILED or ABORTED.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id (default: the newest backup)
    pub id: Option<String>,
    /// One JSON object per event, newline-delimited
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let id = match args.id {
        Some(id) => id,
        None => match client::newest(&mut client).await? {
            Some(b) => b.backup_id,
            None => return Err(Error::Usage("no backups yet: nothing to watch".into())),
        },
    };
    let mut progress = Progress::default();
    let backup = follow(
        &mut client,
        &id,
        |event| {
            if args.json {
                writeln!(out, "{}", view::json(&WatchEventView::from(event)))?;
            } else {
                for line in progress.lines(event) {
                    writeln!(out, "{line}")?;
                }
            }
            out.flush()?;
            Ok(())
        },
        |_| false,
    )
    .await?;
    outcome(&backup)
}

/// `Ok` unless the backup ended FAILED or ABORTED.
pub(crate) fn outcome(backup: &Backup) -> Result<()> {
    if is_failed(backup) {
        return Err(Error::BackupFailed {
            id: backup.backup_id.clone(),
            state: view::state_name(backup.state),
            reason: match (backup.reason.as_str(), backup.failed_phase.as_str()) {
                (reason, "") => reason.to_string(),
                ("", phase) => format!("in {phase}"),
                (reason, phase) => format!("in {phase}: {reason}"),
            },
        });
    }
    Ok(())
}

/// How many times a stream that broke after it had started is resubscribed.
const RESUBSCRIBE: u32 = 5;

/// Feeds every event of backup `id` to `on_event` and returns the backup as of the event where
/// `stop` first held, or as of the stream's end once it is terminal. A stream that breaks or
/// ends early is resubscribed; the log entries it replays are not fed twice.
pub(crate) async fn follow(
    client: &mut Client,
    id: &str,
    mut on_event: impl FnMut(&WatchEvent) -> Result<()>,
    stop: impl Fn(&Backup) -> bool,
) -> Result<Backup> {
    let what = format!("watch backup {id}");
    let mut entries_seen = 0usize;
    let mut last: Option<Backup> = None;
    let mut attempts = 0u32;
    loop {
        let request = about(id, WatchBackupRequest { backup_id: id.to_string() });
        let broken = match client.watch_backup(request).await {
            Err(status) if last.is_none() || attempts >= RESUBSCRIBE => {
                return Err(Error::rpc(&what, status));
            }
            Err(status) => status,
            Ok(reply) => {
                let mut stream = reply.into_inner();
                let mut replayed = 0usize;
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            if event.entry.is_some() {
                                replayed += 1;
                                if replayed <= entries_seen {
                                    continue;
                                }
                                entries_seen += 1;
                            }
                            on_event(&event)?;
                            if let Some(b) = event.backup {
                                let done = stop(&b);
                                last = Some(b);
                                if done {
                                    return Ok(last.expect("just set"));
                                }
                            }
                        }
                        Ok(None) => {
                            if let Some(b) = last.as_ref().filter(|b| is_terminal(b)) {
                                return Ok(b.clone());
                            }
                            break tonic::Status::unavailable(
                                "the stream ended before the backup reached a terminal state",
                            );
                        }
                        Err(status) => break status,
                    }
                }
            }
        };
        attempts += 1;
        if attempts > RESUBSCRIBE {
            return Err(Error::rpc(&what, broken));
        }
        super::note(&format!("backupctl: {what}: {}; resubscribing", broken.message()));
        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempts))).await;
    }
}
