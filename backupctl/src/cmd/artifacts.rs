//! `artifacts ID [--server S] --to DIR [--force]`: fetches the files a backup's quiescers made
//! for a restore (a PostgreSQL backup label, a binary log position) from the listener's catalog
//! and writes each as `DIR/<server>/artifacts/<quiescer>/<name>`: for copies made by the backup
//! software or a copy command, whose repository holds no backup manifest to carry them.
//! [`write`] is shared with `restore`, which takes them from the backup manifest.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use stillpoint_proto::{GetArtifactsRequest, GetBackupRequest};

use crate::client::{about, Connection};
use crate::error::{Error, Result};
use crate::view;

/// Exit 0 when every artifact was written (or the backup has none, which is said).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id
    pub id: String,
    /// Only this server's artifacts
    #[arg(long, value_name = "S")]
    pub server: Option<String>,
    /// Directory that receives `<server>/artifacts/<quiescer>/<name>`
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Overwrite artifact files that exist with other contents
    #[arg(long)]
    pub force: bool,
    /// Print what was written as JSON
    #[arg(long)]
    pub json: bool,
}

/// One artifact to write: whose, from which quiescer, its name and bytes.
pub struct Artifact<'a> {
    pub server: &'a str,
    pub quiescer: &'a str,
    pub name: &'a str,
    pub bytes: &'a [u8],
}

/// One artifact written, as `artifacts --json` and `restore --json` print it.
#[derive(Debug, Serialize)]
pub struct WrittenView {
    pub server: String,
    pub quiescer: String,
    pub name: String,
    pub path: String,
    pub size_bytes: u64,
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    // One call per server that has any, so no reply carries more than one server's (1 MiB).
    let servers: Vec<String> = match &args.server {
        Some(s) => vec![s.clone()],
        None => {
            let request = about(&args.id, GetBackupRequest { backup_id: args.id.clone() });
            let backup = client
                .get_backup(request)
                .await
                .map_err(|s| Error::rpc(format!("get backup {}", args.id), s))?
                .into_inner();
            backup
                .servers
                .into_iter()
                .filter(|s| !s.artifacts.is_empty())
                .map(|s| s.server)
                .collect()
        }
    };
    let mut fetched = Vec::new();
    for server in &servers {
        let request = about(
            &args.id,
            GetArtifactsRequest { backup_id: args.id.clone(), server: server.clone() },
        );
        let reply = client
            .get_artifacts(request)
            .await
            .map_err(|s| {
                Error::rpc(format!("get the artifacts of {server} in backup {}", args.id), s)
            })?
            .into_inner();
        fetched.extend(reply.servers);
    }
    let list: Vec<Artifact<'_>> = fetched
        .iter()
        .flat_map(|s| {
            s.artifacts.iter().map(|a| Artifact {
                server: &s.server,
                quiescer: &a.quiescer,
                name: &a.name,
                bytes: &a.content,
            })
        })
        .collect();
    let written = write(&args.to, &list, args.force)?;
    if args.json {
        writeln!(out, "{}", view::json(&written))?;
        return Ok(());
    }
    if written.is_empty() {
        let whose = args.server.as_deref().map_or(String::new(), |s| format!(" of {s}"));
        writeln!(out, "the catalog holds no artifacts of backup {}{whose}", args.id)?;
    }
    for w in &written {
        writeln!(out, "{}", said(&args.id, w))?;
    }
    Ok(())
}

/// "wrote artifact pg/backup_label of srv-a in backup B (230 B) to PATH".
pub fn said(backup: &str, w: &WrittenView) -> String {
    format!(
        "wrote artifact {}/{} of {} in backup {backup} ({} B) to {}",
        w.quiescer, w.name, w.server, w.size_bytes, w.path
    )
}

/// Writes each artifact as `<dir>/<server>/artifacts/<quiescer>/<name>` (temp file, fsync,
/// rename). Every name must be a plain file name, checked before anything is written; a file
/// that exists with other contents is refused unless `force`.
pub fn write(dir: &Path, artifacts: &[Artifact<'_>], force: bool) -> Result<Vec<WrittenView>> {
    let paths = check(dir, artifacts, force)?;
    let mut written = Vec::with_capacity(artifacts.len());
    for (a, path) in artifacts.iter().zip(paths) {
        write_file(&path, a.bytes)
            .map_err(|e| Error::Usage(format!("write artifact {}: {e}", path.display())))?;
        written.push(WrittenView {
            server: a.server.to_string(),
            quiescer: a.quiescer.to_string(),
            name: a.name.to_string(),
            path: path.display().to_string(),
            size_bytes: a.bytes.len() as u64,
        });
    }
    Ok(written)
}

/// Where each artifact goes, once every name is a plain file name and no file there holds
/// other contents (unless `force`); writes nothing.
pub fn check(dir: &Path, artifacts: &[Artifact<'_>], force: bool) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::with_capacity(artifacts.len());
    for a in artifacts {
        for (what, name) in [("server", a.server), ("quiescer", a.quiescer), ("artifact", a.name)] {
            stillpoint_core::validate_name(what, name).map_err(|e| {
                Error::Usage(format!("refusing to write artifacts of {}: {e}", a.server))
            })?;
        }
        let path = dir.join(a.server).join("artifacts").join(a.quiescer).join(a.name);
        let same = std::fs::read(&path).ok().map(|old| old == a.bytes);
        if same == Some(false) && !force {
            return Err(Error::Usage(format!(
                "artifact {} exists with other contents; pass --force to overwrite it",
                path.display()
            )));
        }
        paths.push(path);
    }
    Ok(paths)
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let temp = parent.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}
