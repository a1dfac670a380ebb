//! `log ID [--after SEQ]`: a backup's event log so far, one line per entry.

use std::io::Write;

use stillpoint_proto::GetLogRequest;

use crate::client::{about, Connection};
use crate::error::{Error, Result};
use crate::view::{self, LogEntryView};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id
    pub id: String,
    /// Only entries after this seq (the `seq` of the last entry already read)
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    pub after: u64,
    /// Print a JSON array of log entries
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let request =
        about(&args.id, GetLogRequest { backup_id: args.id.clone(), after_seq: args.after });
    let entries = client
        .get_log(request)
        .await
        .map_err(|s| Error::rpc(format!("get log of backup {}", args.id), s))?
        .into_inner()
        .entries;
    if args.json {
        let views: Vec<LogEntryView> = entries.iter().map(LogEntryView::from).collect();
        writeln!(out, "{}", view::json(&views))?;
    } else {
        for entry in &entries {
            writeln!(out, "{}", view::log_line(entry))?;
        }
    }
    Ok(())
}
