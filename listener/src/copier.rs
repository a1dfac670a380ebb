//! The copiers: here the external one, which runs the configured command once per snapshot with
//! the snapshot's locator in its environment and its exit status as the verdict; the built-in
//! one, into a saveset repository, is in `saveset.rs`. (The report mode, waiting for
//! `backupctl copied`, needs no code here.)

use std::process::Stdio;

use tokio::io::AsyncReadExt;

use crate::model::SnapshotRef;

mod saveset;

pub use saveset::{cut_json, Gather, Saveset, ServerCopy, Throttle, PROGRESS_EVERY};

/// Copies every snapshot of one server in turn; `progress(done, total)` after each one.
pub async fn run_command(
    command: &[String],
    backup_id: &str,
    server: &str,
    snapshots: &[SnapshotRef],
    mut progress: impl FnMut(u64, u64),
) -> Result<String, String> {
    let Some((program, args)) = command.split_first() else {
        return Err("copy.command is empty".into());
    };
    let total: u64 = snapshots.iter().map(|s| s.size_bytes).sum();
    let mut done = 0;
    progress(0, total);
    for snap in snapshots {
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env("STILLPOINT_BACKUP_ID", backup_id)
            .env("STILLPOINT_SERVER", server)
            .env("STILLPOINT_VOLUME", &snap.volume)
            .env("STILLPOINT_PROVIDER", &snap.provider)
            .env("STILLPOINT_SNAPSHOT", &snap.locator)
            .env("STILLPOINT_SIZE", snap.size_bytes.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("volume {}: cannot run {program}: {e}", snap.volume))?;
        let mut stderr = Vec::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_end(&mut stderr).await;
        }
        let status = child.wait().await.map_err(|e| format!("volume {}: {e}", snap.volume))?;
        if !status.success() {
            let text = String::from_utf8_lossy(&stderr);
            let tail: String =
                text.trim().chars().rev().take(400).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(format!("volume {}: copy command {status}: {tail}", snap.volume));
        }
        done += snap.size_bytes;
        progress(done, total);
    }
    Ok(format!("{} snapshot(s), {done} bytes, by copy command", snapshots.len()))
}

/// IDR: makes a mountable image of each snapshot under `<target>/<backup>/<server>-<volume>.img`
/// (a reflink clone where possible, else a sparse copy), written under a temporary name and
/// renamed, so a half image never carries the real name.
pub fn copy_images(
    target: &std::path::Path,
    backup_id: &str,
    server: &str,
    snapshots: &[SnapshotRef],
    mut progress: impl FnMut(u64, u64),
) -> Result<String, String> {
    let total: u64 = snapshots.iter().map(|s| s.size_bytes).sum();
    let mut done = 0;
    let mut made = Vec::new();
    progress(0, total);
    for snap in snapshots {
        let volume = snap.volume.replace('/', "_");
        let image = target.join(backup_id).join(format!("{server}-{volume}.img"));
        let (size, method) =
            stillpoint_core::san::clone_or_copy(std::path::Path::new(&snap.locator), &image, 0o640)
                .map_err(|e| format!("volume {}: image copy: {e}", snap.volume))?;
        done += size;
        progress(done, total);
        made.push(format!("{} ({method:?})", image.display()));
    }
    Ok(format!("IDR image(s): {}", made.join(", ")))
}
