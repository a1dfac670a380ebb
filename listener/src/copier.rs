//! The copiers, one [`Copier`] built once from the config: the backup software's report (no
//! code: it waits for `ReportCopy`), an external command run once per snapshot with the
//! snapshot's locator in its environment, IDR images, and the built-in saveset copier on the
//! listener (`saveset.rs`) or on each agent (`agent.rs`, the Copy stream). Each copy and the
//! seal run on their own task and answer the backup's task with events; none decides anything
//! about the backup.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::agents::Agents;
use crate::config::{Config, CopyConfig, CopyOn};
use crate::coordinator::{CopyDone, Event};
use crate::error::{Error, Result};
use crate::model::{Artifact, CutRecord, SnapshotRef};
use crate::runtime::Feed;

mod agent;
mod saveset;

pub use saveset::{Saveset, ServerCopy, Throttle, PROGRESS_EVERY};

/// How this listener's backups are copied.
pub enum Copier {
    /// The backup software copies and says so (`ReportCopy`).
    Report,
    /// A command of the operator's, once per snapshot.
    Command { command: Vec<String> },
    /// IDR: a mountable image per snapshot under `target`.
    Image { target: PathBuf },
    /// The built-in copier, reading every snapshot here.
    Saveset { saveset: Arc<Saveset> },
    /// The built-in copier on each agent (the Copy stream); the listener seals.
    SavesetOnAgents { saveset: Arc<Saveset>, agents: Arc<Agents>, silence: Duration },
}

impl Copier {
    /// Builds the copier of `config`; in saveset mode this unlocks the repository, so a wrong
    /// secret stops the start.
    pub fn open(config: &Config, agents: Arc<Agents>) -> Result<Copier> {
        Ok(match &config.copy {
            CopyConfig::Report => Copier::Report,
            CopyConfig::Command { command } => Copier::Command { command: command.clone() },
            CopyConfig::Image { target } => Copier::Image { target: target.clone() },
            CopyConfig::Saveset(c) => {
                let cache = config.data_dir.join("cache");
                let saveset = Arc::new(Saveset::open_in(c, Some(&cache)).map_err(|problems| {
                    Error::Config { path: c.repository.display().to_string(), problems }
                })?);
                match c.on {
                    CopyOn::Listener => Copier::Saveset { saveset },
                    CopyOn::Agent => Copier::SavesetOnAgents {
                        saveset,
                        agents,
                        silence: Duration::from_millis(config.timeouts.agent_copy_silence_ms),
                    },
                }
            }
        })
    }

    /// The mode's name, as `[copy] mode` (and `on`) say it.
    pub fn mode(&self) -> &'static str {
        match self {
            Copier::Report => "report",
            Copier::Command { .. } => "command",
            Copier::Image { .. } => "image",
            Copier::Saveset { .. } => "saveset",
            Copier::SavesetOnAgents { .. } => "saveset on the agents",
        }
    }

    /// The saveset repository this listener copies into, if it does.
    pub fn saveset(&self) -> Option<&Arc<Saveset>> {
        match self {
            Copier::Saveset { saveset } | Copier::SavesetOnAgents { saveset, .. } => Some(saveset),
            Copier::Report | Copier::Command { .. } | Copier::Image { .. } => None,
        }
    }

    /// Whether a backup's copies are sealed into one backup (the saveset's backup manifest).
    pub fn seals(&self) -> bool {
        matches!(self, Copier::Saveset { .. } | Copier::SavesetOnAgents { .. })
    }

    /// Whether the backup software reports copies (`ReportCopy`): only in report mode, where
    /// no copier of the listener's runs. Elsewhere a report would end a copy nothing made.
    pub fn takes_reports(&self) -> bool {
        matches!(self, Copier::Report)
    }

    /// Starts `server`'s copy: progress and the result come back through `feed`. When `stop`
    /// is cancelled (the backup ended, the listener stops) the copy stops and says nothing.
    pub fn start(
        &self,
        (backup_id, group): (&str, &str),
        server: String,
        snapshots: Vec<SnapshotRef>,
        feed: Feed,
        stop: CancellationToken,
    ) {
        let span = tracing::info_span!("copy", server = %server);
        let backup_id = backup_id.to_string();
        let progress = {
            let (feed, server) = (feed.clone(), server.clone());
            move |done, total| {
                feed.send(Event::CopyProgress { server: server.clone(), done, total })
            }
        };
        let entered = span.enter();
        let copy: futures::future::BoxFuture<'static, std::result::Result<CopyDone, String>> =
            match self {
                Copier::Report => {
                    tracing::info!("waiting for the backup software to report this server's copy");
                    return;
                }
                Copier::Command { command } => {
                    let command = command.clone();
                    let server = server.clone();
                    Box::pin(async move {
                        run_command(&command, &backup_id, &server, &snapshots, progress)
                            .await
                            .map(CopyDone::said)
                    })
                }
                Copier::Image { target } => {
                    let (target, server) = (target.clone(), server.clone());
                    blocking(move || {
                        copy_images(&target, &backup_id, &server, &snapshots, progress)
                            .map(CopyDone::said)
                    })
                }
                Copier::Saveset { saveset } => {
                    let (saveset, server) = (Arc::clone(saveset), server.clone());
                    let (stopped, group) = (stop.clone(), group.to_string());
                    blocking(move || {
                        let mut progress = progress;
                        let stop = || stopped.is_cancelled();
                        let ids = (backup_id.as_str(), group.as_str());
                        saveset
                            .copy_server(ids, &server, &snapshots, &mut progress, &stop)
                            .map(ServerCopy::done)
                    })
                }
                Copier::SavesetOnAgents { agents, silence, .. } => {
                    let (agents, silence, server) = (Arc::clone(agents), *silence, server.clone());
                    let group = group.to_string();
                    Box::pin(async move {
                        let ids = (backup_id.as_str(), group.as_str());
                        agent::copy(&agents, ids, &server, silence, progress)
                            .await
                            .map(ServerCopy::done)
                    })
                }
            };
        drop(entered);
        tokio::spawn(
            async move {
                // Dropping the copy stops it: a command is killed, the agent's stream closed;
                // a blocking copy stops before its next volume.
                let result = tokio::select! {
                    result = copy => result,
                    () = stop.cancelled() => return,
                };
                feed.send(Event::Copied { server, result });
            }
            .instrument(span),
        );
    }

    /// Seals the backup: the backup manifest naming every volume manifest in `stored`, with
    /// the cut and each server's artifacts, then the configured verify of that backup. Answers `Sealed` through `feed`.
    pub fn seal(
        &self,
        backup_id: &str,
        stored: Vec<String>,
        (cut, artifacts): (CutRecord, Vec<(String, Vec<Artifact>)>),
        feed: Feed,
        stop: CancellationToken,
    ) {
        let saveset = match self {
            Copier::Saveset { saveset } | Copier::SavesetOnAgents { saveset, .. } => {
                Arc::clone(saveset)
            }
            Copier::Report | Copier::Command { .. } | Copier::Image { .. } => {
                let mode = self.mode();
                feed.send(Event::Sealed {
                    result: Err(format!("copy mode {mode} has nothing to seal a backup with")),
                });
                return;
            }
        };
        let backup_id = backup_id.to_string();
        let seal = blocking(move || saveset.seal(&backup_id, &stored, (&cut, &artifacts)));
        tokio::spawn(
            async move {
                let result = tokio::select! {
                    result = seal => result,
                    () = stop.cancelled() => return,
                };
                feed.send(Event::Sealed { result });
            }
            .in_current_span(),
        );
    }
}

/// Runs `work` on a blocking thread, under the caller's span.
fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
) -> futures::future::BoxFuture<'static, std::result::Result<T, String>> {
    let span = tracing::Span::current();
    let task = tokio::task::spawn_blocking(move || span.in_scope(work));
    Box::pin(async move { task.await.unwrap_or_else(|e| Err(format!("copier task failed: {e}"))) })
}

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
