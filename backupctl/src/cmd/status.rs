//! `status [ID]`: one backup (default: the newest) with its servers and its consistent cut.

use std::io::Write;

use crate::client::{self, Connection};
use crate::error::Result;
use crate::view::{self, BackupView};

/// Exit 0 whenever the backup was read, whatever its state (a FAILED backup too); use `watch`
/// or `start --wait` for an exit code that follows the outcome. With no backups at all, says so
/// (JSON: `null`) and exits 0.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id (default: the newest backup)
    pub id: Option<String>,
    /// Print the backup as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let backup = client::backup_or_newest(&mut client, args.id.as_deref()).await?;
    match (backup, args.json) {
        (None, true) => writeln!(out, "null")?,
        (None, false) => writeln!(out, "no backups yet")?,
        (Some(b), true) => writeln!(out, "{}", view::json(&BackupView::from(&b)))?,
        (Some(b), false) => write!(out, "{}", view::backup_human(&b))?,
    }
    Ok(())
}
