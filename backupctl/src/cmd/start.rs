//! `start --group G [--wait none|snapshotted|complete]`: StartBackup, then optionally follow the
//! backup until its snapshots exist (the "backup before a risky task" call) or until it ends.

use std::io::Write;

use stillpoint_proto::StartBackupRequest;

use super::watch::{follow, outcome};
use crate::client::Connection;
use crate::error::{Error, Result};
use crate::view::{self, is_snapshotted, is_terminal, BackupView, Progress};

/// What `start` waits for before it returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Wait {
    /// Return as soon as the listener accepted the backup
    #[default]
    None,
    /// Until every server's snapshot exists (SNAPSHOTTED or later)
    Snapshotted,
    /// Until the backup SUCCEEDED, FAILED or was ABORTED
    Complete,
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
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let request = StartBackupRequest { group: args.group.clone() };
    let backup = client
        .start_backup(request)
        .await
        .map_err(|s| Error::rpc(format!("start backup of group {}", args.group), s))?
        .into_inner();
    let id = backup.backup_id.clone();
    if !args.json {
        writeln!(out, "{id}")?;
        out.flush()?;
    }
    let backup = if args.wait == Wait::None || is_terminal(&backup) {
        backup
    } else {
        let mut progress = Progress::default();
        let stop: fn(&stillpoint_proto::Backup) -> bool = match args.wait {
            Wait::Snapshotted => |b| is_snapshotted(b) || is_terminal(b),
            Wait::None | Wait::Complete => is_terminal,
        };
        follow(
            &mut client,
            &id,
            |event| {
                if !args.json {
                    progress.lines(event).iter().for_each(|l| super::note(l));
                }
                Ok(())
            },
            stop,
        )
        .await?
    };
    if args.json {
        writeln!(out, "{}", view::json(&BackupView::from(&backup)))?;
    } else if args.wait != Wait::None && !view::is_failed(&backup) {
        super::note(&format!("backup {id} {}", view::state_name(backup.state)));
    }
    outcome(&backup)
}
