//! `abort ID [--reason R]`: AbortBackup, then follow the backup until it has ended.

use std::io::Write;

use stillpoint_proto::{AbortBackupRequest, Backup};

use super::watch::follow;
use crate::client::{self, about, Connection};
use crate::error::{Error, Result};
use crate::view::{self, is_terminal, BackupView, Progress};

/// Exit 0 once the backup has ended: ABORTED, or already over before the abort (which is said).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id
    pub id: String,
    /// Why, for the backup's log and catalog
    #[arg(long, value_name = "R", default_value = "")]
    pub reason: String,
    /// Print the backup as it ended as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let id = args.id.as_str();
    let current = client::get(&mut client, id).await?;
    if is_terminal(&current) {
        return report(out, &current, args.json, true);
    }
    let request =
        about(id, AbortBackupRequest { backup_id: id.into(), reason: args.reason.clone() });
    let backup = match client.abort_backup(request).await {
        Ok(reply) => reply.into_inner(),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            // It ended between our read and the abort.
            let now = client::get(&mut client, id).await?;
            if is_terminal(&now) {
                return report(out, &now, args.json, true);
            }
            return Err(Error::rpc(format!("abort backup {id}"), status));
        }
        Err(status) => return Err(Error::rpc(format!("abort backup {id}"), status)),
    };
    let backup = if is_terminal(&backup) {
        backup
    } else {
        let mut progress = Progress::default();
        let note = |event: &_| {
            if !args.json {
                progress.lines(event).iter().for_each(|l| super::note(l));
            }
            Ok(())
        };
        follow(&mut client, id, note, is_terminal).await?
    };
    report(out, &backup, args.json, false)
}

fn report(out: &mut dyn Write, backup: &Backup, json: bool, already: bool) -> Result<()> {
    let state = view::state_name(backup.state);
    let id = &backup.backup_id;
    if json {
        writeln!(out, "{}", view::json(&BackupView::from(backup)))?;
    }
    let line = match (already, state.as_str()) {
        (true, _) => format!("backup {id} had already ended {state}; nothing to abort"),
        (false, "ABORTED") => format!("backup {id} ABORTED"),
        (false, _) => format!("backup {id} ended {state} before the abort took effect"),
    };
    if json {
        super::note(&line);
    } else {
        writeln!(out, "{line}")?;
    }
    Ok(())
}
