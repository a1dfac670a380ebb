//! `san init|create-lun|list|present`: the mock SAN array in a directory, via
//! `stillpoint_core::san::Array`. Offline; it knows files, not backups' states.

use std::io::Write;
use std::path::PathBuf;

use stillpoint_core::san::Array;

use crate::error::Result;
use crate::view::{self, human_bytes, LunSnapshotView, LunView, SanListView};

#[derive(Debug, clap::Subcommand)]
pub enum San {
    /// Create an array's layout in DIR (idempotent)
    Init {
        /// Array directory
        dir: PathBuf,
    },
    /// Create a sparse LUN for a server (an existing LUN of the same size is kept)
    CreateLun(CreateLunArgs),
    /// List the array's LUNs and snapshots
    List(ListArgs),
    /// Check a backup's snapshot of a LUN is there and read-only; print its path
    Present(PresentArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateLunArgs {
    /// Array directory
    #[arg(long, value_name = "DIR")]
    pub array: PathBuf,
    #[arg(long, value_name = "S")]
    pub server: String,
    #[arg(long, value_name = "L")]
    pub lun: String,
    /// Bytes, or with a binary suffix: 4096, 64K, 64M, 1G, 1T (also 64MiB)
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: u64,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Array directory
    #[arg(long, value_name = "DIR")]
    pub array: PathBuf,
    /// Print {"luns": [...], "snapshots": [...]} as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PresentArgs {
    /// Array directory
    #[arg(long, value_name = "DIR")]
    pub array: PathBuf,
    #[arg(long, value_name = "B")]
    pub backup: String,
    #[arg(long, value_name = "S")]
    pub server: String,
    #[arg(long, value_name = "L")]
    pub lun: String,
}

/// A size in bytes: digits and an optional binary unit, `K`, `M`, `G` or `T` (case-insensitive,
/// optionally followed by `iB` or `B`). Zero is refused: a LUN must hold something.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let bad = || format!("invalid size {s:?}: use bytes or a number with K, M, G or T, e.g. 64M");
    let number: u64 = number.parse().map_err(|_| bad())?;
    let unit = unit.to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))?;
    if bytes == 0 {
        return Err(format!("invalid size {s:?}: must be more than 0 bytes"));
    }
    Ok(bytes)
}

pub fn run(san: San, out: &mut dyn Write) -> Result<()> {
    match san {
        San::Init { dir } => {
            let array = Array::init(&dir)?;
            writeln!(out, "mock SAN array ready at {}", array.root().display())?;
        }
        San::CreateLun(args) => {
            let lun = Array::open(&args.array)?.create_lun(&args.server, &args.lun, args.size)?;
            writeln!(out, "{}", lun.path.display())?;
        }
        San::List(args) => {
            let array = Array::open(&args.array)?;
            let list = SanListView {
                luns: array.luns(None)?.iter().map(LunView::from).collect(),
                snapshots: array.snapshots(None)?.iter().map(LunSnapshotView::from).collect(),
            };
            if args.json {
                writeln!(out, "{}", view::json(&list))?;
            } else {
                write!(out, "{}", list_human(&list))?;
            }
        }
        San::Present(args) => {
            let path = Array::open(&args.array)?.present(&args.backup, &args.server, &args.lun)?;
            writeln!(out, "{}", path.display())?;
        }
    }
    Ok(())
}

fn list_human(list: &SanListView) -> String {
    let luns: Vec<Vec<String>> = list
        .luns
        .iter()
        .map(|l| vec![l.server.clone(), l.lun.clone(), human_bytes(l.size_bytes), l.path.clone()])
        .collect();
    let snapshots: Vec<Vec<String>> = list
        .snapshots
        .iter()
        .map(|s| {
            let size = human_bytes(s.size_bytes);
            vec![s.backup_id.clone(), s.server.clone(), s.lun.clone(), size, s.path.clone()]
        })
        .collect();
    let mut out = String::from("LUNs:\n");
    out.push_str(&if luns.is_empty() {
        "  none\n".into()
    } else {
        view::table(&["SERVER", "LUN", "SIZE", "PATH"], &luns)
    });
    out.push_str("\nsnapshots:\n");
    out.push_str(&if snapshots.is_empty() {
        "  none\n".into()
    } else {
        view::table(&["BACKUP", "SERVER", "LUN", "SIZE", "PATH"], &snapshots)
    });
    out
}

#[cfg(test)]
mod tests;
