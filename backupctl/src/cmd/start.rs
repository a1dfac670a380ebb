//! `start --group G [--wait none|snapshotted|complete|settled]`: StartBackup, then optionally
//! wait (WaitBackup) until its snapshots exist (the "backup before a risky task" call), until it
//! ends, or until every server confirmed its end; live progress on stderr meanwhile.

use std::io::Write;

use stillpoint_proto::StartBackupRequest;

use super::wait::{self, with_progress, Until, Waited};
use super::watch::outcome;
use crate::client::Connection;
use crate::error::{Error, Result};
use crate::view::{self, is_terminal, BackupView, ErrorDocument, RefusalView};

/// What `start` waits for before it returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Wait {
    /// Return as soon as the listener accepted the backup
    #[default]
    None,
    /// Until every server's snapshot exists (SNAPSHOTTED or later)
    Snapshotted,
    /// Until the backup SUCCEEDED, FAILED or was ABORTED and every server confirmed its
    /// cleanup or abort (or was given up on, which is said): nothing of it is still running
    Complete,
    /// The same as complete
    Settled,
}

/// Prints the backup id on stdout at once (or, with --json, the backup as of the return). Exit
/// 0 when the wait was met, 1 when the backup ended FAILED or ABORTED first.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The group of servers to back up
    #[arg(long, value_name = "G")]
    pub group: String,
    /// What to wait for; progress goes to stderr
    #[arg(long, value_enum, default_value_t = Wait::None)]
    pub wait: Wait,
    /// Print the backup as JSON instead of its id (no progress lines)
    #[arg(long)]
    pub json: bool,
    /// Names this start so a retry returns the same backup instead of starting another (1-128
    /// letters, digits, '.', '_' or '-'); default: a fresh UUID. A start that found the
    /// listener unreachable or timed out is retried once with it
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let request_id =
        args.request_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().hyphenated().to_string());
    let request = StartBackupRequest { group: args.group.clone(), request_id };
    let what = format!("start backup of group {}", args.group);
    // The first call may have started the backup even if its reply never came: the retry
    // carries the same request id, so it returns that backup rather than starting another.
    let started = match client.start_backup(request.clone()).await {
        Err(status) if retryable(&status) => {
            super::note(&format!("backupctl: {what}: {}; retrying once", status.message()));
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            client.start_backup(request).await
        }
        result => result,
    };
    let backup = match started {
        Ok(reply) => reply.into_inner(),
        Err(status) => return Err(refused(out, args.json, &what, status)),
    };
    let id = backup.backup_id.clone();
    if !args.json {
        writeln!(out, "{id}")?;
        out.flush()?;
    }
    let until = match args.wait {
        Wait::None => None,
        Wait::Snapshotted => Some(Until::Snapshotted),
        // A FAILED backup may still be aborting on a server: complete means settled.
        Wait::Complete | Wait::Settled => Some(Until::Settled),
    };
    let backup = match until {
        Some(until) if !is_terminal(&backup) || until == Until::Settled => {
            let waited = wait::until(conn, client.clone(), &id, until, None);
            let waited =
                if args.json { waited.await } else { with_progress(&client, &id, waited).await };
            match waited {
                Ok(backup) => backup,
                Err(Waited::Error(e)) => return Err(e),
                Err(Waited::Gave { backup }) => *backup,
            }
        }
        _ => backup,
    };
    if matches!(args.wait, Wait::Complete | Wait::Settled) {
        settle_notes(&backup);
    }
    if args.json {
        writeln!(out, "{}", view::json(&BackupView::from(&backup)))?;
    } else if args.wait != Wait::None && !view::is_failed(&backup) {
        super::note(&format!("backup {id} {}", view::state_name(backup.state)));
    }
    outcome(&backup)
}

/// Whether a failed start may have been lost on the way (and is worth one retry).
fn retryable(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded)
}

/// A refusal, said from its details: `--json` prints `{"error": ...}` on stdout (so a script
/// reads the busy backup's id or the wrong field there), people get the busy backup's id on
/// stderr. Transport failures stay on stderr only.
fn refused(out: &mut dyn Write, json: bool, what: &str, status: tonic::Status) -> Error {
    let answered = !matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    );
    let refusal = RefusalView::from(&status);
    if json && answered {
        let _ = writeln!(out, "{}", view::json(&ErrorDocument { error: refusal }));
    } else if let (Some("GROUP_BUSY"), Some(busy)) = (refusal.reason.as_deref(), &refusal.backup_id)
    {
        super::note(&format!(
            "backupctl: busy with backup {busy}; follow it: backupctl watch {busy}"
        ));
    }
    Error::rpc(what, status)
}

/// Says which servers never confirmed the backup's end, or have not yet.
fn settle_notes(backup: &stillpoint_proto::Backup) {
    let id = &backup.backup_id;
    for line in &backup.unconfirmed {
        super::note(&format!("backup {id}: no confirmation from {line}"));
    }
    if is_terminal(backup) && !backup.settled {
        let open: Vec<&str> = backup
            .servers
            .iter()
            .filter(|s| matches!(s.phase.as_str(), "aborting" | "cleaning"))
            .map(|s| s.server.as_str())
            .collect();
        super::note(&format!(
            "backup {id} ended {} but is not settled: {} not confirmed yet",
            view::state_name(backup.state),
            if open.is_empty() { "some servers".to_string() } else { open.join(", ") }
        ));
    }
}
