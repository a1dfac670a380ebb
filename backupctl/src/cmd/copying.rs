//! `copying ID --server S [--progress DONE/TOTAL]`: external backup software reports how far its
//! copy of one server's snapshots got, or with no figures, that it is still copying. Either
//! keeps the copy from failing for silence (the listener's `timeouts.report_silence_ms`).

use std::io::Write;

use stillpoint_proto::ReportCopyProgressRequest;

use crate::client::{about, Connection};
use crate::error::{Error, Result};
use crate::view::{self, BackupView};

/// Exit 0 when the listener took the report.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id
    pub id: String,
    /// The server whose snapshots are being copied
    #[arg(long, value_name = "S")]
    pub server: String,
    /// Bytes copied so far and in all, e.g. 536870912/1073741824 (default: a heartbeat alone)
    #[arg(long, value_name = "DONE/TOTAL", value_parser = parse_progress)]
    pub progress: Option<(u64, u64)>,
    /// Print the backup after the report as JSON
    #[arg(long)]
    pub json: bool,
}

fn parse_progress(text: &str) -> std::result::Result<(u64, u64), String> {
    let bad = || format!("{text:?} is not DONE/TOTAL in bytes, e.g. 512/1024");
    let (done, total) = text.split_once('/').ok_or_else(bad)?;
    let (done, total): (u64, u64) =
        (done.trim().parse().map_err(|_| bad())?, total.trim().parse().map_err(|_| bad())?);
    if done > total {
        return Err(format!("{text:?}: more bytes done than in all"));
    }
    Ok((done, total))
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let (done, total) = args.progress.unwrap_or((0, 0));
    let request = ReportCopyProgressRequest {
        backup_id: args.id.clone(),
        server: args.server.clone(),
        done_bytes: done,
        total_bytes: total,
    };
    let backup = client
        .report_copy_progress(about(&args.id, request))
        .await
        .map_err(|s| {
            Error::rpc(format!("report copy progress of {} for backup {}", args.server, args.id), s)
        })?
        .into_inner();
    if args.json {
        writeln!(out, "{}", view::json(&BackupView::from(&backup)))?;
    } else {
        let what = match args.progress {
            Some((done, total)) => format!("{done}/{total} bytes"),
            None => "still copying".to_string(),
        };
        writeln!(
            out,
            "reported copy of {} for backup {}: {what}; backup is now {}",
            args.server,
            args.id,
            view::state_name(backup.state)
        )?;
    }
    Ok(())
}
