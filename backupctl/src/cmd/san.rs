//! `san init|mount|umount|create-lun|list|present|snapshot|delete`: the mock SAN array in a
//! directory (or in an XFS image mounted there), via `stillpoint_core::san::Array`. Offline; it
//! knows files, not backups' states.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use stillpoint_core::san::{Array, Init, InitOptions};

use crate::error::Result;
use crate::view::{self, human_bytes, LunSnapshotView, LunView, SanListView};

#[derive(Debug, clap::Subcommand)]
pub enum San {
    /// Make an array in DIR whose snapshots are reflink clones (idempotent). Where DIR's
    /// filesystem cannot reflink, as root: in a sparse XFS image loop-mounted at DIR
    Init(InitArgs),
    /// Mount the XFS image of an array at DIR again (after a reboot)
    Mount {
        /// Array directory
        dir: PathBuf,
    },
    /// Unmount the XFS image of the array at DIR (stop its agents first)
    Umount {
        /// Array directory
        dir: PathBuf,
    },
    /// Create a sparse LUN for a server (an existing LUN of the same size is kept)
    CreateLun(CreateLunArgs),
    /// List the array's LUNs and snapshots
    List(ListArgs),
    /// Check a backup's snapshot of a LUN is there and read-only; print its path
    Present(LunSnapshotArgs),
    /// Take a snapshot of a LUN now, as an agent does inside a freeze (to try the array or time
    /// it); prints its path and how long it took
    Snapshot(SnapshotArgs),
    /// Delete a server's snapshots of a backup (what an agent's cleanup does)
    Delete(DeleteArgs),
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Array directory
    pub dir: PathBuf,
    /// Where to make the XFS image if one is needed [default: DIR.img beside DIR]
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// The image's size (sparse: it takes space only as LUNs fill) [default: 64G, or the free
    /// space where the image goes if less]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub image_size: Option<u64>,
}

/// One backup's snapshot of one LUN in an array (`san snapshot`, `san present`).
#[derive(Debug, clap::Args)]
pub struct LunSnapshotArgs {
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

#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub of: LunSnapshotArgs,
    /// Print {"path", "size_bytes", "took_us", "existed"} as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Array directory
    #[arg(long, value_name = "DIR")]
    pub array: PathBuf,
    #[arg(long, value_name = "B")]
    pub backup: String,
    #[arg(long, value_name = "S")]
    pub server: String,
}

/// What `san snapshot --json` prints.
#[derive(Debug, Serialize)]
struct SnapshotTaken {
    path: String,
    size_bytes: u64,
    /// Microseconds the array's snapshot call took (clone, sync, rename), as inside a freeze;
    /// only a lookup when the snapshot `existed`.
    took_us: u64,
    /// The backup had this snapshot already: it was returned as it was, nothing was cloned.
    existed: bool,
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
        San::Init(args) => {
            let asked_image = args.image.is_some() || args.image_size.is_some();
            let options = InitOptions { image: args.image, image_size: args.image_size };
            let (array, how) = Array::create(&args.dir, &options)?;
            write!(out, "{}", init_human(&array, &how))?;
            if asked_image && !matches!(how, Init::Image(_)) {
                writeln!(out, "(no image made: --image and --image-size apply only where the directory cannot reflink)")?;
            }
        }
        San::Mount { dir } => {
            let (array, mounted) = Array::mount(&dir)?;
            let image = array.image().map(|m| m.image.display().to_string()).unwrap_or_default();
            let how = if mounted { "mounted" } else { "already mounted" };
            writeln!(out, "mock SAN array at {} {how} (image {image})", array.root().display())?;
        }
        San::Umount { dir } => {
            let was = Array::unmount(&dir)?;
            let how = if was { "unmounted" } else { "was not mounted" };
            writeln!(
                out,
                "mock SAN array at {} {how}; `backupctl san mount {}` mounts it again",
                dir.display(),
                dir.display()
            )?;
        }
        San::Snapshot(SnapshotArgs { of, json }) => {
            let array = Array::open(&of.array)?;
            // The array returns an existing snapshot as it is: say so rather than time a clone.
            let existed = array.snapshot_path(&of.backup, &of.server, &of.lun)?.is_file();
            let started = Instant::now();
            let snap = array.snapshot(&of.backup, &of.server, &of.lun)?;
            let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let taken = SnapshotTaken {
                path: snap.path.display().to_string(),
                size_bytes: snap.size_bytes,
                took_us,
                existed,
            };
            let size = human_bytes(taken.size_bytes);
            if json {
                writeln!(out, "{}", view::json(&taken))?;
            } else if existed {
                writeln!(
                    out,
                    "{} ({size}, taken before for this backup; nothing cloned)",
                    taken.path
                )?;
            } else {
                #[allow(clippy::cast_precision_loss)]
                let ms = took_us as f64 / 1000.0;
                writeln!(out, "{} ({size}, reflink clone in {ms:.1} ms)", taken.path)?;
            }
        }
        San::Delete(args) => {
            let deleted = Array::open(&args.array)?.delete_snapshots(&args.backup, &args.server)?;
            writeln!(
                out,
                "deleted {deleted} snapshot(s) of {} for backup {}",
                args.server, args.backup
            )?;
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
        San::Present(of) => {
            let path = Array::open(&of.array)?.present(&of.backup, &of.server, &of.lun)?;
            writeln!(out, "{}", path.display())?;
        }
    }
    Ok(())
}

/// What `san init` did, and for an image how to mount it at boot and unmount it.
fn init_human(array: &Array, how: &Init) -> String {
    let root = array.root().display();
    let fs = stillpoint_core::san::image::fs_name(array.root());
    match how {
        Init::Existing => format!(
            "mock SAN array ready at {root} (it was there; {fs}: snapshots are reflink clones)\n"
        ),
        Init::Directory => {
            format!("mock SAN array ready at {root} ({fs}: snapshots are reflink clones)\n")
        }
        Init::Image(mount) | Init::Mounted(mount) => {
            let size =
                std::fs::metadata(&mount.image).map(|m| human_bytes(m.len())).unwrap_or_default();
            let what = if matches!(how, Init::Image(_)) {
                format!("its filesystem cannot reflink, so the array lives in a new XFS image with reflink, {} ({size}, sparse), loop-mounted there", mount.image.display())
            } else {
                format!(
                    "its XFS image {} ({size}) was not mounted; mounted it again",
                    mount.image.display()
                )
            };
            format!(
                "mock SAN array ready at {root}: {what}.\n\
                 To mount it at boot, add this line to /etc/fstab:\n  {fstab}\n\
                 (or run `backupctl san mount {root}` after a reboot); `backupctl san umount {root}` unmounts it.\n",
                fstab = mount.fstab_line()
            )
        }
    }
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
