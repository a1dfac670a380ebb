//! `pin ID` / `unpin ID`: PinBackup / UnpinBackup. A pinned backup is never forgotten by
//! retention; repeating either changes nothing.

use std::io::Write;

use stillpoint_proto::{PinBackupRequest, UnpinBackupRequest};

use crate::client::{about, Connection};
use crate::error::{Error, Result};
use crate::view::{self, BackupView};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id
    pub id: String,
    /// Print the backup as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(conn: &Connection, args: Args, on: bool, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let id = args.id.as_str();
    let reply = if on {
        client.pin_backup(about(id, PinBackupRequest { backup_id: id.into() })).await
    } else {
        client.unpin_backup(about(id, UnpinBackupRequest { backup_id: id.into() })).await
    };
    let verb = if on { "pin" } else { "unpin" };
    let backup = reply.map_err(|s| Error::rpc(format!("{verb} backup {id}"), s))?.into_inner();
    if args.json {
        writeln!(out, "{}", view::json(&BackupView::from(&backup)))?;
    } else if backup.pinned {
        writeln!(out, "backup {id} pinned: retention never forgets it")?;
    } else {
        writeln!(out, "backup {id} not pinned: retention decides it by its group's rules")?;
    }
    Ok(())
}
