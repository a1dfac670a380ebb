//! `list [--group G] [--limit N]`: the catalog of backups, newest first.

use std::io::Write;

use stillpoint_proto::ListBackupsRequest;

use crate::client::Connection;
use crate::error::{Error, Result};
use crate::view::{self, BackupView};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this group's backups
    #[arg(long, value_name = "G")]
    pub group: Option<String>,
    /// At most this many backups; 0 means all
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub limit: u32,
    /// Print a JSON array of backups
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let request = ListBackupsRequest { group: args.group.unwrap_or_default(), limit: args.limit };
    let backups = client
        .list_backups(request)
        .await
        .map_err(|s| Error::rpc("list backups", s))?
        .into_inner()
        .backups;
    if args.json {
        let views: Vec<BackupView> = backups.iter().map(BackupView::from).collect();
        writeln!(out, "{}", view::json(&views))?;
    } else if backups.is_empty() {
        writeln!(out, "no backups")?;
    } else {
        write!(out, "{}", view::list_human(&backups))?;
    }
    Ok(())
}
