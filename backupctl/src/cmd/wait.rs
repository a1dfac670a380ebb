//! `wait ID --until snapshotted|finished|settled [--within SECS]`: blocks on the listener's
//! WaitBackup until the backup gets there. Also home of [`until`], the loop `start --wait`
//! shares: each call blocks at most the connection's timeout, so a long wait is a chain of calls
//! that survives a dropped connection or a listener restart.

use std::io::Write;
use std::time::Duration;

use prost::{Message, Name};
use stillpoint_proto::{Backup, WaitBackupRequest, WaitUntil};

use super::watch::{follow, outcome};
use crate::client::{about, Client, Connection};
use crate::error::{Error, Result};
use crate::view::{self, BackupView, Progress};

/// What to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Until {
    /// Every server's snapshot exists (SNAPSHOTTED or later), or the backup ended
    Snapshotted,
    /// The backup SUCCEEDED, FAILED or was ABORTED
    Finished,
    /// Finished, and every server confirmed its cleanup or abort
    Settled,
}

impl Until {
    fn wire(self) -> WaitUntil {
        match self {
            Until::Snapshotted => WaitUntil::Snapshotted,
            Until::Finished => WaitUntil::Finished,
            Until::Settled => WaitUntil::Settled,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Until::Snapshotted => "snapshotted",
            Until::Finished => "finished",
            Until::Settled => "settled",
        }
    }
}

/// Exit 0 when the backup got there, 1 when it ended FAILED or ABORTED or `--within` passed
/// first (with --json the backup as it was is printed either way).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id
    pub id: String,
    /// What to wait for
    #[arg(long, value_enum)]
    pub until: Until,
    /// Give up after this many seconds (default: wait as long as it takes)
    #[arg(long, value_name = "SECS")]
    pub within: Option<u64>,
    /// Progress lines on stderr while waiting
    #[arg(long)]
    pub progress: bool,
    /// Print the backup as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let client = conn.connect()?;
    let within = args.within.map(Duration::from_secs);
    let waited = until(conn, client.clone(), &args.id, args.until, within);
    let waited =
        if args.progress { with_progress(&client, &args.id, waited).await } else { waited.await };
    let (backup, got_there) = match waited {
        Ok(backup) => (backup, true),
        Err(Waited::Gave { backup }) => (*backup, false),
        Err(Waited::Error(e)) => return Err(e),
    };
    if args.json {
        writeln!(out, "{}", view::json(&BackupView::from(&backup)))?;
    } else {
        writeln!(out, "backup {} {}", backup.backup_id, view::state_name(backup.state))?;
    }
    if !got_there {
        return Err(Error::BackupFailed {
            id: backup.backup_id.clone(),
            state: view::state_name(backup.state),
            reason: format!("not {} within {} s", args.until.name(), args.within.unwrap_or(0)),
        });
    }
    outcome(&backup)
}

/// Why [`until`] returned without the backup getting there.
pub(crate) enum Waited {
    /// `within` passed first; the backup as it was then.
    Gave {
        backup: Box<Backup>,
    },
    Error(Error),
}

impl From<Error> for Waited {
    fn from(e: Error) -> Self {
        Waited::Error(e)
    }
}

/// How many times in a row a call that found no listener is repeated.
const RECONNECT: u32 = 5;

/// Calls WaitBackup until `until` holds for backup `id` (or it ends, for `Snapshotted`), or
/// `within` passes. A call whose time ran out returns the backup in its details and the next
/// call goes on waiting; one that found no listener (restarting, a cut link) is repeated.
pub(crate) async fn until(
    conn: &Connection,
    mut client: Client,
    id: &str,
    until: Until,
    within: Option<Duration>,
) -> std::result::Result<Backup, Waited> {
    let what = format!("wait for backup {id} to be {}", until.name());
    let give_up = within.map(|w| tokio::time::Instant::now() + w);
    let mut unreachable = 0u32;
    loop {
        let left = give_up.map(|at| at.saturating_duration_since(tokio::time::Instant::now()));
        // 0 asks for the listener's longest wait; either way the listener ends the call a little
        // before the channel's own timeout, with the backup.
        let timeout_ms =
            left.map_or(0, |l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX).max(1));
        let request =
            WaitBackupRequest { backup_id: id.to_string(), until: until.wire() as i32, timeout_ms };
        let mut request = about(id, request);
        // Tells the listener the call's deadline, so it answers (with the backup) before it.
        request.set_timeout(Duration::from_secs(conn.timeout));
        match client.wait_backup(request).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) => match backup_in(&status) {
                Some(backup) if status.code() == tonic::Code::DeadlineExceeded => {
                    unreachable = 0;
                    if give_up.is_some_and(|at| tokio::time::Instant::now() >= at) {
                        return Err(Waited::Gave { backup: Box::new(backup) });
                    }
                }
                _ if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ) && unreachable < RECONNECT =>
                {
                    unreachable += 1;
                    super::note(&format!("backupctl: {what}: {}; calling again", status.message()));
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(unreachable))).await;
                }
                _ => return Err(Waited::Error(Error::rpc(&what, status))),
            },
        }
    }
}

/// Runs a wait while the backup's live events go to stderr as progress lines; the progress
/// stops, unfinished, when the wait returns (a broken watch only stops the lines).
pub(crate) async fn with_progress<T>(
    client: &Client,
    id: &str,
    waited: impl std::future::Future<Output = T>,
) -> T {
    let mut watcher = client.clone();
    let mut progress = Progress::default();
    let show = async {
        let print = |event: &_| {
            progress.lines(event).iter().for_each(|l| super::note(l));
            Ok(())
        };
        let _ = follow(&mut watcher, id, print, |_| false).await;
        std::future::pending::<std::convert::Infallible>().await
    };
    tokio::select! {
        result = waited => result,
        never = show => match never {},
    }
}

/// The backup a refusal carries in its details (WaitBackup's DEADLINE_EXCEEDED), if any.
pub(crate) fn backup_in(status: &tonic::Status) -> Option<Backup> {
    let rpc = tonic_types::pb::Status::decode(status.details()).ok()?;
    let any = rpc.details.iter().find(|a| a.type_url == Backup::type_url())?;
    any.to_msg::<Backup>().ok()
}
