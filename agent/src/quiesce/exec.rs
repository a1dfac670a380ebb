//! The exec quiescer: runs an application's own command before the freeze (flush and hold) and
//! another after the thaw (resume), each under a timeout that kills it. Commands see
//! STILLPOINT_BACKUP_ID, STILLPOINT_SERVER and STILLPOINT_PHASE in their environment, and with
//! `artifacts_dir` STILLPOINT_ARTIFACTS_DIR: the regular files they leave there become the
//! backup's artifacts after the thaw.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

use super::{Artifact, Quiescer};
use crate::guardian::Action;
use stillpoint_protocol::model::MAX_ARTIFACT_BYTES;

/// How much of a failed command's stderr goes into the error.
const STDERR_TAIL: usize = 400;

/// Runs `pre_freeze` on freeze and `post_thaw` on thaw.
pub struct Exec {
    name: String,
    server: String,
    pre_freeze: Option<Vec<String>>,
    post_thaw: Option<Vec<String>>,
    timeout: Duration,
    /// The backup whose freeze ran and whose thaw has not yet succeeded.
    frozen_for: Mutex<Option<String>>,
    /// Each backup gets `<artifacts_dir>/<backup id>/`, made empty before the freeze.
    artifacts_dir: Option<PathBuf>,
}

impl Exec {
    pub fn new(
        name: String,
        server: &str,
        pre_freeze: Option<Vec<String>>,
        post_thaw: Option<Vec<String>>,
        timeout: Duration,
    ) -> Exec {
        Exec {
            name,
            server: server.to_string(),
            pre_freeze,
            post_thaw,
            timeout,
            frozen_for: Mutex::new(None),
            artifacts_dir: None,
        }
    }

    /// The commands' files in a per-backup directory under `dir` become artifacts.
    pub fn with_artifacts_dir(mut self, dir: Option<PathBuf>) -> Exec {
        self.artifacts_dir = dir;
        self
    }

    /// Where this backup's commands leave their artifacts (the id is a plain name).
    fn artifacts_for(&self, backup_id: &str) -> Option<PathBuf> {
        self.artifacts_dir.as_ref().map(|d| d.join(backup_id))
    }

    fn env(&self, phase: &str, backup_id: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("STILLPOINT_BACKUP_ID".into(), backup_id.into()),
            ("STILLPOINT_SERVER".into(), self.server.clone()),
            ("STILLPOINT_PHASE".into(), phase.into()),
        ];
        if let Some(dir) = self.artifacts_for(backup_id) {
            env.push(("STILLPOINT_ARTIFACTS_DIR".into(), dir.display().to_string()));
        }
        env
    }
}

/// Runs `argv` with `env` added to completion or until `timeout` kills it; returns the last
/// stdout line. Shared with the guardian, which runs post_thaw commands the agent armed.
pub fn run_command(
    phase: &str,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> anyhow::Result<String> {
    let (program, args) = argv.split_first().ok_or_else(|| anyhow!("{phase}: empty command"))?;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{phase}: start {program}"))?;
    let stdout = tail_of(child.stdout.take());
    let stderr = tail_of(child.stderr.take());
    let started = Instant::now();
    let mut nap = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().with_context(|| format!("{phase}: wait"))? {
            break status;
        }
        if started.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(anyhow!(
                "{phase}: {program} timed out after {}ms and was killed{}",
                timeout.as_millis(),
                stderr_suffix(&collect(&stderr))
            ));
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    if !status.success() {
        return Err(anyhow!(
            "{phase}: {program} failed with {status}{}",
            stderr_suffix(&collect(&stderr))
        ));
    }
    let out = collect(&stdout);
    let last = out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    Ok(if last.is_empty() {
        format!("{phase} ok in {}ms", started.elapsed().as_millis())
    } else {
        format!("{phase} ok in {}ms: {last}", started.elapsed().as_millis())
    })
}

impl Quiescer for Exec {
    fn name(&self) -> &str {
        &self.name
    }

    fn hold(&self) -> super::Hold {
        super::Hold::HookUnverified
    }

    fn freeze(&self, backup_id: &str) -> anyhow::Result<String> {
        if let Some(dir) = self.artifacts_for(backup_id) {
            // Nothing an earlier attempt left may pass for this backup's.
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e)
                        .with_context(|| format!("artifacts_dir: clear {}", dir.display()))
                }
                _ => {}
            }
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("artifacts_dir: create {}", dir.display()))?;
        }
        let detail = match &self.pre_freeze {
            Some(argv) => {
                run_command("pre-freeze", argv, &self.env("pre-freeze", backup_id), self.timeout)?
            }
            None => "no pre_freeze command".to_string(),
        };
        *self.frozen_for.lock().unwrap_or_else(|p| p.into_inner()) = Some(backup_id.to_string());
        Ok(detail)
    }

    fn thaw(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut frozen_for = self.frozen_for.lock().unwrap_or_else(|p| p.into_inner());
        if frozen_for.as_deref() != Some(backup_id) {
            return Ok(());
        }
        if let Some(argv) = &self.post_thaw {
            run_command("post-thaw", argv, &self.env("post-thaw", backup_id), self.timeout)?;
        }
        *frozen_for = None;
        Ok(())
    }

    fn thaw_action(&self, backup_id: &str) -> anyhow::Result<Option<Action>> {
        Ok(self.post_thaw.as_ref().map(|argv| Action::Run {
            argv: argv.clone(),
            env: self.env("post-thaw", backup_id),
            timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    fn thawed_elsewhere(&self, backup_id: &str) -> anyhow::Result<()> {
        let mut frozen_for = self.frozen_for.lock().unwrap_or_else(|p| p.into_inner());
        if frozen_for.as_deref() == Some(backup_id) {
            *frozen_for = None;
        }
        Ok(())
    }

    /// The regular files directly in the backup's directory, by name; the directory goes
    /// with them, so they are handed over once. Anything else there is logged and left out.
    fn artifacts(&self, backup_id: &str) -> Vec<Artifact> {
        let Some(dir) = self.artifacts_for(backup_id) else { return Vec::new() };
        let artifacts = read_artifacts(&self.name, &dir);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove the artifacts directory");
            }
        }
        artifacts
    }
}

/// Reads `dir`'s regular files, sorted by name. A file over the limit is read only far enough to
/// show it is (the agent's machine refuses it and says why); its real size is logged here.
fn read_artifacts(quiescer: &str, dir: &Path) -> Vec<Artifact> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot list the artifacts directory; no artifacts kept");
            return Vec::new();
        }
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => {
                tracing::error!(file = %path.display(), "not a regular file: left out of the artifacts");
                continue;
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read: left out of the artifacts");
                continue;
            }
        };
        if meta.len() > MAX_ARTIFACT_BYTES as u64 {
            tracing::warn!(file = %path.display(), size = meta.len(), limit = MAX_ARTIFACT_BYTES, "artifact over the limit");
        }
        let mut bytes = Vec::new();
        let read = std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_ARTIFACT_BYTES as u64 + 1).read_to_end(&mut bytes));
        match read {
            Ok(_) => out.push(Artifact { quiescer: quiescer.to_string(), name, bytes }),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read: left out of the artifacts");
            }
        }
    }
    out
}

/// Reads a pipe to its end on a thread, keeping only the last bytes.
fn tail_of<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut tail = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            let _ = tx.send(tail);
        });
    }
    rx
}

/// What a reader thread kept; a grandchild still holding the pipe open does not block us long.
fn collect(rx: &mpsc::Receiver<Vec<u8>>) -> String {
    let tail = rx.recv_timeout(Duration::from_millis(500)).unwrap_or_default();
    let start = tail.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&tail[start..]).into_owned()
}

fn stderr_suffix(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; stderr: {stderr}")
    }
}

#[cfg(test)]
mod tests;
