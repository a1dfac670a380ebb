//! `copied ID --server S [--failed]`: external backup software reports one server's copy.

use std::io::Write;

use stillpoint_proto::ReportCopyRequest;

use crate::client::{about, Connection};
use crate::error::{Error, Result};
use crate::view::{self, BackupView};

/// Exit 0 when the listener took the report (a reported failure too).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id
    pub id: String,
    /// The server whose snapshots were copied
    #[arg(long, value_name = "S")]
    pub server: String,
    /// The copy failed
    #[arg(long)]
    pub failed: bool,
    /// Why the copy failed, or where the copy went
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub detail: String,
    /// Print the backup after the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let request = about(
        &args.id,
        ReportCopyRequest {
            backup_id: args.id.clone(),
            server: args.server.clone(),
            ok: !args.failed,
            detail: args.detail,
        },
    );
    let backup = client
        .report_copy(request)
        .await
        .map_err(|s| {
            Error::rpc(format!("report copy of {} for backup {}", args.server, args.id), s)
        })?
        .into_inner();
    if args.json {
        writeln!(out, "{}", view::json(&BackupView::from(&backup)))?;
    } else {
        let verdict = if args.failed { "failed" } else { "ok" };
        writeln!(
            out,
            "reported copy of {} for backup {}: {verdict}; backup is now {}",
            args.server,
            args.id,
            view::state_name(backup.state)
        )?;
    }
    Ok(())
}
