//! `repo list` and `repo show`: the backups a saveset repository holds, from the repository
//! alone (no listener): backup manifests and volume manifest *summaries*, never a volume's chunk
//! list, so memory follows the number of manifests, not the size of the volumes. Volumes
//! without a backup manifest are listed as incomplete backups.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;
use serde_json::Value;
use stillpoint_saveset::{BackupManifest, ManifestId, ManifestSummary, VolumeSummary};

use crate::cmd::repo::{load_summaries, RepoOptions};
use crate::error::{Error, Result};
use crate::view;

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub repo: RepoOptions,
    /// Print the backups as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub repo: RepoOptions,
    /// Backup id, or an unambiguous start of one (or of its backup manifest's id)
    #[arg(value_name = "ID")]
    pub id: String,
    /// Print the backup as JSON
    #[arg(long)]
    pub json: bool,
}

/// One backup in `repo list --json`.
#[derive(Debug, Clone, Serialize)]
pub struct BackupLine {
    pub backup: String,
    /// The backup manifest; absent for an incomplete backup.
    pub manifest: Option<String>,
    /// From the cut; absent for an incomplete backup.
    pub group: Option<String>,
    pub created_unix_ms: u64,
    pub servers: Vec<String>,
    pub volumes: usize,
    /// Sum of the volumes' sizes (holes included).
    pub logical_bytes: u64,
    /// `true`: a backup manifest names it; `false`: volumes only, no cut.
    pub complete: bool,
    /// The cut's verdict: consistent or not; absent when never judged or incomplete.
    pub consistent: Option<bool>,
    pub verdict: String,
    pub artifacts: usize,
}

/// One backup in `repo show --json`.
#[derive(Debug, Serialize)]
pub struct BackupShown {
    #[serde(flatten)]
    pub line: BackupLine,
    pub volume_list: Vec<VolumeShown>,
    pub cut: Vec<ServerShown>,
}

#[derive(Debug, Serialize)]
pub struct VolumeShown {
    pub server: String,
    pub volume: String,
    pub size: u64,
    pub manifest: String,
}

#[derive(Debug, Serialize)]
pub struct ServerShown {
    pub server: String,
    pub hold: Option<String>,
    /// Listener clock, Unix ms: the prepared reply (frozen) and the committed reply (thawed or
    /// held) came back.
    pub prepared_unix_ms: Option<i64>,
    pub committed_unix_ms: Option<i64>,
    pub freeze_ms: u64,
    pub held_ms: u64,
    pub artifacts: Vec<ArtifactShown>,
}

#[derive(Debug, Serialize)]
pub struct ArtifactShown {
    pub quiescer: String,
    pub name: String,
    pub size: usize,
}

/// What the repository holds, read once.
struct Contents {
    backups: Vec<(ManifestId, BackupManifest)>,
    volumes: BTreeMap<ManifestId, VolumeSummary>,
    unreadable: usize,
}

fn read(opts: &RepoOptions) -> Result<Contents> {
    let repo = opts.open()?;
    let mut out = Contents { backups: Vec::new(), volumes: BTreeMap::new(), unreadable: 0 };
    for (id, summary) in load_summaries(&repo, repo.list_manifests()?) {
        match summary {
            Ok(ManifestSummary::Backup(b)) => out.backups.push((id, b)),
            Ok(ManifestSummary::Volume(v)) => {
                out.volumes.insert(id, v);
            }
            Err(stillpoint_saveset::Error::Damaged { .. }) => out.unreadable += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Every backup, oldest first: complete ones from their backup manifests (the newest one when
/// a backup was sealed twice), then the backups only volume manifests name.
fn lines(c: &Contents) -> Vec<(BackupLine, Vec<(ManifestId, &VolumeSummary)>)> {
    let mut newest: BTreeMap<&str, &(ManifestId, BackupManifest)> = BTreeMap::new();
    for b in &c.backups {
        let keep = newest
            .get(b.1.backup.as_str())
            .is_none_or(|o| (o.1.created_unix_ms, o.0) < (b.1.created_unix_ms, b.0));
        if keep {
            newest.insert(&b.1.backup, b);
        }
    }
    let mut out = Vec::new();
    for (id, b) in newest.values() {
        let vols: Vec<(ManifestId, &VolumeSummary)> =
            b.volumes.iter().filter_map(|v| c.volumes.get(v).map(|s| (*v, s))).collect();
        let verdict = b.cut.get("verdict");
        let consistent = verdict.and_then(|v| v.get("consistent")).and_then(Value::as_bool);
        let mut servers: Vec<String> = match b.cut.get("servers").and_then(Value::as_array) {
            Some(list) => list.iter().filter_map(|s| text(s, "server")).collect(),
            None => Vec::new(),
        };
        if servers.is_empty() {
            servers = vols.iter().map(|(_, v)| v.meta.server.clone()).collect();
            servers.dedup();
        }
        let line = BackupLine {
            backup: b.backup.clone(),
            manifest: Some(id.to_string()),
            group: text(&b.cut, "group"),
            created_unix_ms: b.created_unix_ms,
            servers,
            volumes: vols.len(),
            logical_bytes: vols.iter().map(|(_, v)| v.size).sum(),
            complete: true,
            consistent,
            verdict: match (consistent, verdict.and_then(|v| text(v, "text"))) {
                (Some(true), _) => "consistent".into(),
                (Some(false), Some(t)) => format!("NOT consistent: {t}"),
                (Some(false), None) => "NOT consistent".into(),
                (None, _) => "never judged".into(),
            },
            artifacts: b.artifacts.len(),
        };
        out.push((line, vols));
    }
    // Volumes no backup manifest names, by the backup they say they belong to.
    let named: std::collections::HashSet<&ManifestId> =
        c.backups.iter().flat_map(|(_, b)| &b.volumes).collect();
    let mut loose: BTreeMap<&str, Vec<(ManifestId, &VolumeSummary)>> = BTreeMap::new();
    for (id, v) in &c.volumes {
        if !named.contains(id) && !newest.contains_key(v.meta.backup.as_str()) {
            loose.entry(&v.meta.backup).or_default().push((*id, v));
        }
    }
    for (backup, vols) in loose {
        let mut servers: Vec<String> = vols.iter().map(|(_, v)| v.meta.server.clone()).collect();
        servers.sort();
        servers.dedup();
        out.push((
            BackupLine {
                backup: backup.to_string(),
                manifest: None,
                group: None,
                created_unix_ms: vols.iter().map(|(_, v)| v.created_unix_ms).min().unwrap_or(0),
                servers,
                volumes: vols.len(),
                logical_bytes: vols.iter().map(|(_, v)| v.size).sum(),
                complete: false,
                consistent: None,
                verdict: "INCOMPLETE: no backup manifest, no cut".into(),
                artifacts: 0,
            },
            vols,
        ));
    }
    out.sort_by(|(a, _), (b, _)| {
        (a.created_unix_ms, &a.backup).cmp(&(b.created_unix_ms, &b.backup))
    });
    out
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// The shortest start of `id` (at least 8 characters) that no other id in `all` shares.
pub fn shortest_unique(id: &str, all: &[&str]) -> String {
    let mut len = 8.min(id.len());
    while len < id.len() && all.iter().any(|o| *o != id && o.starts_with(&id[..len])) {
        len += 1;
    }
    id[..len].to_string()
}

/// Local time, to the second, with its offset.
fn local(unix_ms: u64) -> String {
    i64::try_from(unix_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map(|t| {
            t.to_zoned_datetime(jiff::tz::TimeZone::system())
                .strftime("%Y-%m-%d %H:%M:%S %z")
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

pub fn list(args: ListArgs, out: &mut dyn Write) -> Result<()> {
    let contents = read(&args.repo)?;
    let lines: Vec<BackupLine> = lines(&contents).into_iter().map(|(l, _)| l).collect();
    if args.json {
        writeln!(out, "{}", view::json(&lines))?;
        return Ok(());
    }
    let manifests: Vec<&str> = lines.iter().filter_map(|l| l.manifest.as_deref()).collect();
    writeln!(
        out,
        "{:<24} {:<10} {:<12} {:<25} {:<20} {:>4} {:>10}  VERDICT",
        "BACKUP", "MANIFEST", "GROUP", "CREATED", "SERVERS", "VOLS", "SIZE"
    )?;
    for l in &lines {
        writeln!(
            out,
            "{:<24} {:<10} {:<12} {:<25} {:<20} {:>4} {:>10}  {}",
            l.backup,
            l.manifest.as_deref().map_or_else(|| "-".into(), |m| shortest_unique(m, &manifests)),
            l.group.as_deref().unwrap_or("-"),
            local(l.created_unix_ms),
            l.servers.join(","),
            l.volumes,
            view::human_bytes(l.logical_bytes),
            l.verdict
        )?;
    }
    let incomplete = lines.iter().filter(|l| !l.complete).count();
    writeln!(
        out,
        "{} backup(s), {incomplete} of them incomplete{}",
        lines.len(),
        match contents.unreadable {
            0 => String::new(),
            n => format!("; {n} manifest(s) do not decrypt or parse (run `backupctl verify`)"),
        }
    )?;
    Ok(())
}

pub fn show(args: ShowArgs, out: &mut dyn Write) -> Result<()> {
    let contents = read(&args.repo)?;
    let all = lines(&contents);
    let exact: Vec<_> = all.iter().filter(|(l, _)| l.backup == args.id).collect();
    let matching: Vec<_> = if exact.is_empty() {
        all.iter()
            .filter(|(l, _)| {
                l.backup.starts_with(&args.id)
                    || l.manifest.as_deref().is_some_and(|m| m.starts_with(&args.id))
            })
            .collect()
    } else {
        exact
    };
    let (line, vols) = match matching.as_slice() {
        [one] => *one,
        [] => {
            return Err(Error::Usage(format!(
                "the repository holds no backup {:?}; list them with `backupctl repo list`",
                args.id
            )))
        }
        many => {
            let ids: Vec<&str> = many.iter().map(|(l, _)| l.backup.as_str()).collect();
            return Err(Error::Usage(format!(
                "{:?} is the start of several backups: {}",
                args.id,
                ids.join(", ")
            )));
        }
    };
    let manifest = contents
        .backups
        .iter()
        .filter(|(id, _)| Some(id.to_string()) == line.manifest)
        .map(|(_, b)| b)
        .next();
    let cut = manifest.map(servers_shown).unwrap_or_default();
    let shown = BackupShown {
        line: line.clone(),
        volume_list: vols
            .iter()
            .map(|(id, v)| VolumeShown {
                server: v.meta.server.clone(),
                volume: v.meta.volume.clone(),
                size: v.size,
                manifest: id.to_string(),
            })
            .collect(),
        cut,
    };
    if args.json {
        writeln!(out, "{}", view::json(&shown))?;
        return Ok(());
    }
    let l = &shown.line;
    writeln!(out, "backup    {}", l.backup)?;
    writeln!(out, "manifest  {}", l.manifest.as_deref().unwrap_or("- (none: incomplete)"))?;
    writeln!(out, "group     {}", l.group.as_deref().unwrap_or("-"))?;
    writeln!(out, "created   {}", local(l.created_unix_ms))?;
    writeln!(out, "verdict   {}", l.verdict)?;
    writeln!(out, "volumes   {} ({})", l.volumes, view::human_bytes(l.logical_bytes))?;
    for v in &shown.volume_list {
        writeln!(
            out,
            "  {}/{}  {}  manifest {}",
            v.server,
            v.volume,
            view::human_bytes(v.size),
            &v.manifest[..12]
        )?;
    }
    if !shown.cut.is_empty() {
        writeln!(out, "cut")?;
    }
    for s in &shown.cut {
        let at = |ms: Option<i64>| {
            ms.and_then(|m| u64::try_from(m).ok())
                .map_or_else(|| "-".into(), |m| view::clock(m as i64))
        };
        writeln!(
            out,
            "  {}  hold {}  frozen {} .. committed {}  freeze {}  held {}",
            s.server,
            s.hold.as_deref().unwrap_or("unknown"),
            at(s.prepared_unix_ms),
            at(s.committed_unix_ms),
            view::human_duration(i64::try_from(s.freeze_ms).unwrap_or(i64::MAX)),
            view::human_duration(i64::try_from(s.held_ms).unwrap_or(i64::MAX)),
        )?;
        for a in &s.artifacts {
            writeln!(
                out,
                "    artifact {}/{}  {}",
                a.quiescer,
                a.name,
                view::human_bytes(u64::try_from(a.size).unwrap_or(u64::MAX))
            )?;
        }
    }
    Ok(())
}

fn servers_shown(b: &BackupManifest) -> Vec<ServerShown> {
    let Some(list) = b.cut.get("servers").and_then(Value::as_array) else { return Vec::new() };
    list.iter()
        .filter_map(|s| {
            let server = text(s, "server")?;
            let cut = s.get("cut").cloned().unwrap_or(Value::Null);
            let ms = |k: &str| cut.get(k).and_then(Value::as_u64).unwrap_or(0);
            Some(ServerShown {
                hold: text(&cut, "hold"),
                prepared_unix_ms: cut.get("prepared").and_then(Value::as_i64),
                committed_unix_ms: cut.get("committed").and_then(Value::as_i64),
                freeze_ms: ms("freeze_ms"),
                held_ms: ms("held_ms"),
                artifacts: b
                    .artifacts
                    .iter()
                    .filter(|a| a.server == server)
                    .map(|a| ArtifactShown {
                        quiescer: a.quiescer.clone(),
                        name: a.name.clone(),
                        size: a.bytes.len(),
                    })
                    .collect(),
                server,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
