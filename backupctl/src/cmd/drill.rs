//! `drill --repo REPO (ID | --latest [--group G]) --config DRILL.toml [--scratch DIR] [--keep]
//! [--json]`: restores a backup's servers from the saveset repository into a fresh scratch
//! directory, runs each server's checks there (fsck, mount, a private PostgreSQL or MariaDB,
//! sqlite, a command), prints a [`DrillReport`] and exits 0 only if everything passed. Offline:
//! only the repository is needed, so it runs on a spare host. With `--notify FILE` (a file
//! with a `[notify]` table, the listener's own config will do) the result is mailed and posted
//! as the listener notifies backups, a drill that could not run included.

pub mod checks;
pub mod config;
pub mod exec;
pub mod fs;
pub mod report;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use stillpoint_saveset::{BackupArtifact, ManifestId, ManifestSummary, Repository, VolumeSummary};

use crate::cmd::artifacts::{self, Artifact};
use crate::cmd::repo::{find_backup, require_complete, RepoOptions};
use crate::error::{Error, Result};
use crate::view;

pub use config::{CheckKind, DrillConfig};
pub use report::{CheckReport, DrillReport, Outcome, ServerReport, VolumeReport};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "latest"])))]
pub struct Args {
    /// Backup id
    pub id: Option<String>,
    /// The newest backup the repository holds a backup manifest for
    #[arg(long, conflicts_with = "id")]
    pub latest: bool,
    /// With --latest: the newest backup of this group
    #[arg(long, value_name = "G", requires = "latest")]
    pub group: Option<String>,
    #[command(flatten)]
    pub repo: RepoOptions,
    /// The drill file: servers and their checks (see README, "Restore drills")
    #[arg(long, value_name = "DRILL.toml")]
    pub config: PathBuf,
    /// Where the scratch directory is made (it needs room for every restored volume)
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub scratch: PathBuf,
    /// Leave the scratch directory (restored images, logs) for a look; removed otherwise,
    /// whether the drill passed or not
    #[arg(long)]
    pub keep: bool,
    /// Drill a backup that has no backup manifest (failed, aborted, or written by `repo
    /// backup` alone): its volumes may not be consistent with each other
    #[arg(long)]
    pub incomplete: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
    /// Mail and post the result to the targets of FILE's `[notify]` table (the listener's
    /// config will do), as `on` there says: a failed drill is a failure
    #[arg(long, value_name = "FILE")]
    pub notify: Option<PathBuf>,
}

pub async fn run(args: Args, out: &mut dyn Write) -> Result<()> {
    let notify = match &args.notify {
        Some(file) => Some(notify_config(file)?),
        None => None,
    };
    // A CLI on one thread: nothing else runs while the drill does.
    let executed = execute(&args);
    if let Some(config) = &notify {
        let result = match &executed {
            Ok(report) => stillpoint_notify::DrillResult {
                group: report.group.clone().unwrap_or_default(),
                backup: report.backup.clone(),
                passed: report.passed,
                failures: report.failures(),
                report: report.render(),
            },
            Err(e) => stillpoint_notify::DrillResult {
                group: args.group.clone().unwrap_or_default(),
                backup: args.id.clone().unwrap_or_default(),
                passed: false,
                failures: vec![format!("the drill could not run: {e}")],
                report: format!("The drill could not run: {e}\n"),
            },
        };
        let event = stillpoint_notify::Event::Drill(result);
        match stillpoint_notify::send_and_wait(config, &event).await {
            Ok(deliveries) => {
                for d in deliveries {
                    if let Err((tries, e)) = d.result {
                        super::note(&format!(
                            "backupctl: drill: notifying {} failed after {tries} tries: {e}",
                            d.target
                        ));
                    }
                }
            }
            Err(e) => super::note(&format!("backupctl: drill: notifying failed: {e}")),
        }
    }
    let report = executed?;
    if args.json {
        writeln!(out, "{}", view::json(&report))?;
    } else {
        write!(out, "{}", report.render())?;
    }
    if report.passed {
        Ok(())
    } else {
        Err(Error::DrillFailed(format!(
            "drill of backup {} failed: {}",
            report.backup,
            report.failures().join("; ")
        )))
    }
}

/// Runs the drill and returns its report (whether it passed or not); `Err` only for what stops
/// a drill before it starts: the drill file, the repository, no such backup, not root.
/// The `[notify]` table of `file`; other tables (a whole listener config) are ignored.
fn notify_config(file: &Path) -> Result<stillpoint_notify::NotifyConfig> {
    #[derive(serde::Deserialize)]
    struct WithNotify {
        notify: Option<stillpoint_notify::NotifyConfig>,
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Usage(format!("--notify {}: {e}", file.display())))?;
    let parsed: WithNotify = toml::from_str(&text)
        .map_err(|e| Error::Usage(format!("--notify {}: {e}", file.display())))?;
    parsed.notify.ok_or_else(|| {
        Error::Usage(format!("--notify {}: no [notify] table in it", file.display()))
    })
}

pub fn execute(args: &Args) -> Result<DrillReport> {
    let config = load_config(&args.config)?;
    let repo = args.repo.open()?;
    let (id, group) = match (&args.id, args.latest) {
        (Some(id), _) => (id.clone(), None),
        (None, _) => latest(&repo, args.group.as_deref())?,
    };
    let found = find_backup(&repo, &id)?;
    if found.is_empty() {
        return Err(Error::Usage(format!(
            "backup {id}: the repository {} holds nothing of it",
            args.repo.repo.display()
        )));
    }
    let complete = require_complete(&found, &id, args.incomplete, "drill")?;
    let group = group.or_else(|| group_of(&repo, found.backups.last().copied()));
    let volumes = found.latest();
    let plan = plan(&config, &volumes)?;
    if !stillpoint_core::sys::is_root()
        && config.servers.iter().flat_map(|s| &s.checks).any(|c| c.kind.mounts())
    {
        return Err(Error::Usage(
            "the drill's checks loop-mount restored images: run it as root".into(),
        ));
    }
    let scratch = make_scratch(&args.scratch, &id)?;
    let started_unix_ms = u64::try_from(stillpoint_core::unix_ms()).unwrap_or(0);
    let started = Instant::now();
    let mut servers = Vec::new();
    for (server, checks) in &plan {
        servers.push(drill_server(
            &repo,
            &id,
            server,
            checks,
            &volumes,
            &found.artifacts,
            &config,
            &scratch,
        ));
    }
    let passed = servers.iter().all(ServerReport::passed);
    if !args.keep {
        if let Err(e) = std::fs::remove_dir_all(&scratch) {
            crate::cmd::note(&format!(
                "backupctl: drill: remove scratch {}: {e}; remove it by hand",
                scratch.display()
            ));
        }
    }
    Ok(DrillReport {
        backup: id,
        group,
        repository: args.repo.repo.display().to_string(),
        complete,
        started_unix_ms,
        duration_ms: millis(started),
        scratch: scratch.display().to_string(),
        scratch_kept: args.keep,
        servers,
        passed,
    })
}

fn load_config(path: &Path) -> Result<DrillConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Usage(format!("read drill config {}: {e}", path.display())))?;
    let config = DrillConfig::parse(&text)
        .map_err(|e| Error::Usage(format!("drill config {}: {e}", path.display())))?;
    let problems = config.problems();
    if !problems.is_empty() {
        return Err(Error::Usage(format!(
            "drill config {}: {}",
            path.display(),
            problems.join("; ")
        )));
    }
    Ok(config)
}

/// The newest backup manifest (of `group`, as its cut says): its backup id and group.
fn latest(repo: &Repository, group: Option<&str>) -> Result<(String, Option<String>)> {
    let mut newest: Option<(u64, String, Option<String>)> = None;
    for mid in repo.list_manifests()? {
        // A damaged manifest is verify's to report; the drill of the others goes on.
        let Ok(ManifestSummary::Backup(b)) = repo.load_summary(mid) else { continue };
        let its_group = b.cut.get("group").and_then(|g| g.as_str()).map(str::to_string);
        if group.is_some_and(|g| its_group.as_deref() != Some(g)) {
            continue;
        }
        if newest.as_ref().is_none_or(|(at, _, _)| b.created_unix_ms > *at) {
            newest = Some((b.created_unix_ms, b.backup, its_group));
        }
    }
    newest.map(|(_, id, group)| (id, group)).ok_or_else(|| {
        Error::Usage(match group {
            Some(g) => format!("no backup of group {g} in the repository (none has a backup manifest whose cut names that group)"),
            None => "no backup in the repository has a backup manifest; name one by id (with --incomplete)".into(),
        })
    })
}

fn group_of(repo: &Repository, manifest: Option<ManifestId>) -> Option<String> {
    match repo.load_summary(manifest?) {
        Ok(ManifestSummary::Backup(b)) => b.cut.get("group")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Each server to drill and its checks: the config's servers, or every server of the backup
/// (no checks) when it names none. A server the config names but the backup lacks stays in the
/// plan: its report says so and fails the drill (a backup that lost a server is what a drill
/// is for), while a check naming a volume the server lacks is a mistake in the file (exit 2).
fn plan(
    config: &DrillConfig,
    volumes: &[&(ManifestId, VolumeSummary)],
) -> Result<Vec<(String, Vec<config::CheckConfig>)>> {
    let mut in_backup: Vec<&str> = volumes.iter().map(|(_, v)| v.meta.server.as_str()).collect();
    in_backup.dedup();
    if config.servers.is_empty() {
        return Ok(in_backup.iter().map(|s| (s.to_string(), Vec::new())).collect());
    }
    let mut plan = Vec::new();
    for s in &config.servers {
        if !in_backup.contains(&s.name.as_str()) {
            plan.push((s.name.clone(), s.checks.clone()));
            continue;
        }
        let server_volumes: Vec<&str> = volumes
            .iter()
            .filter(|(_, v)| v.meta.server == s.name)
            .map(|(_, v)| v.meta.volume.as_str())
            .collect();
        for c in &s.checks {
            match &c.volume {
                Some(v) if !server_volumes.contains(&v.as_str()) => {
                    return Err(Error::Usage(format!(
                        "drill config: server {} has no volume {v} in the backup (it has {})",
                        s.name,
                        server_volumes.join(", ")
                    )));
                }
                None if server_volumes.len() > 1 => {
                    return Err(Error::Usage(format!(
                        "drill config: server {}'s {} check must say `volume =` (it has {})",
                        s.name,
                        c.kind.name(),
                        server_volumes.join(", ")
                    )));
                }
                _ => {}
            }
        }
        plan.push((s.name.clone(), s.checks.clone()));
    }
    Ok(plan)
}

/// A fresh directory `stillpoint-drill-<id>-<random>` in `parent`, traversable by the database
/// users the checks run servers as but not listable.
fn make_scratch(parent: &Path, id: &str) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let safe: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let random = uuid::Uuid::new_v4().simple().to_string();
    let dir = parent.join(format!("stillpoint-drill-{safe}-{}", &random[..8]));
    std::fs::DirBuilder::new()
        .mode(0o711)
        .create(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)))
        .map_err(|e| Error::Usage(format!("create scratch {}: {e}", dir.display())))?;
    Ok(dir)
}

#[allow(clippy::too_many_arguments)]
fn drill_server(
    repo: &Repository,
    backup: &str,
    server: &str,
    checks: &[config::CheckConfig],
    volumes: &[&(ManifestId, VolumeSummary)],
    artifacts: &[BackupArtifact],
    config: &DrillConfig,
    scratch: &Path,
) -> ServerReport {
    let work = scratch.join(safe_name(server));
    let mut report =
        ServerReport { server: server.into(), volumes: Vec::new(), checks: Vec::new() };
    if let Err(e) = std::fs::create_dir_all(&work) {
        report.volumes.push(VolumeReport {
            volume: "*".into(),
            image: work.display().to_string(),
            size: 0,
            bytes_written: 0,
            duration_ms: 0,
            error: Some(format!("create {}: {e}", work.display())),
        });
        return report;
    }
    let mut images = Vec::new();
    if !volumes.iter().any(|(_, v)| v.meta.server == server) {
        let mut has: Vec<&str> = volumes.iter().map(|(_, v)| v.meta.server.as_str()).collect();
        has.dedup();
        report.volumes.push(VolumeReport {
            volume: "*".into(),
            image: String::new(),
            size: 0,
            bytes_written: 0,
            duration_ms: 0,
            error: Some(format!(
                "the backup has no volume of server {server} (it has {})",
                has.join(", ")
            )),
        });
    }
    for (mid, v) in volumes.iter().filter(|(_, v)| v.meta.server == server) {
        let image = work.join(format!("{}.img", safe_name(&v.meta.volume)));
        let started = Instant::now();
        crate::cmd::note(&format!("drill: restoring {server}/{} ({} B)", v.meta.volume, v.size));
        let result = repo.restore_volume_with(*mid, &image, false, &|_| {});
        let (size, bytes_written, error) = match result {
            Ok(stats) => (stats.size, stats.bytes_written, None),
            Err(e) => (v.size, 0, Some(e.to_string())),
        };
        if error.is_none() {
            images.push((v.meta.volume.clone(), image.clone()));
        }
        report.volumes.push(VolumeReport {
            volume: v.meta.volume.clone(),
            image: image.display().to_string(),
            size,
            bytes_written,
            duration_ms: millis(started),
            error,
        });
    }
    let own: Vec<BackupArtifact> =
        artifacts.iter().filter(|a| a.server == server).cloned().collect();
    let artifacts_dir = write_artifacts(&work, &own);
    for (i, check) in checks.iter().enumerate() {
        let volume = match &check.volume {
            Some(v) => v.clone(),
            None => report.volumes.first().map(|v| v.volume.clone()).unwrap_or_default(),
        };
        let name = check.kind.name();
        let Some((_, image)) = images.iter().find(|(v, _)| *v == volume) else {
            report.checks.push(CheckReport {
                check: name.into(),
                volume,
                outcome: Outcome::Skipped,
                duration_ms: 0,
                detail: "not run: the volume did not restore".into(),
                output: Vec::new(),
            });
            continue;
        };
        let log = work.join(format!("check-{i}-{name}.log"));
        let check_dir = work.join(format!("check-{i}-{name}"));
        let started = Instant::now();
        crate::cmd::note(&format!("drill: {server}: {name} check of {volume}"));
        let target = checks::Target {
            backup,
            server,
            volume: &volume,
            image,
            work: &check_dir,
            artifacts: &own,
            artifacts_dir: artifacts_dir.as_deref(),
            log: &log,
            deadline: started + check.timeout(config),
        };
        let result = std::fs::create_dir_all(&check_dir)
            .map_err(|e| exec::Failed::new(format!("create {}: {e}", check_dir.display())))
            .and_then(|()| checks::run(&check.kind, &target));
        let (outcome, detail, output) = match result {
            Ok(detail) => (Outcome::Passed, detail, Vec::new()),
            Err(f) => (Outcome::Failed, f.detail, f.output),
        };
        report.checks.push(CheckReport {
            check: name.into(),
            volume,
            outcome,
            duration_ms: millis(started),
            detail,
            output,
        });
    }
    report
}

/// Writes the server's artifacts as `<work>/artifacts/<quiescer>/<name>` for command checks;
/// where they went, or `None` when there are none or writing failed (said on stderr).
fn write_artifacts(work: &Path, own: &[BackupArtifact]) -> Option<PathBuf> {
    if own.is_empty() {
        return None;
    }
    let list: Vec<Artifact<'_>> = own
        .iter()
        .map(|a| Artifact {
            server: &a.server,
            quiescer: &a.quiescer,
            name: &a.name,
            bytes: &a.bytes,
        })
        .collect();
    // `write` puts them under `<dir>/<server>/artifacts`.
    let dir = work.parent()?;
    match artifacts::write(dir, &list, true) {
        Ok(_) => Some(dir.join(&own[0].server).join("artifacts")),
        Err(e) => {
            crate::cmd::note(&format!("backupctl: drill: write artifacts: {e}"));
            None
        }
    }
}

fn safe_name(s: &str) -> String {
    s.trim_matches('/').replace(['/', '\\'], "_")
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
