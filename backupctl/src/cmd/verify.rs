//! `verify ID [--read-data]`: checks the saveset repository and reports, by name, the damage
//! that concerns backup ID (its manifests, and anything global such as an unreadable index or
//! manifest). Exit 0 clean, 1 damaged or incomplete (no backup manifest: refused unless
//! `--incomplete`), 2 usage or secret errors. Never repairs.

use std::collections::HashSet;
use std::io::Write;

use serde::Serialize;
use stillpoint_saveset::{Damage, ManifestId, VerifyProgress};

use crate::cmd::repo::{find_backup, require_complete, RepoOptions};
use crate::error::{Error, Result};
use crate::view;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backup id
    pub id: String,
    #[command(flatten)]
    pub repo: RepoOptions,
    /// Also read every chunk, decrypt it and check its hash (reads all the data)
    #[arg(long)]
    pub read_data: bool,
    /// Check a backup that has no backup manifest (it failed, was aborted or is still copying):
    /// its volumes are checked, the report says it is incomplete and has no cut
    #[arg(long)]
    pub incomplete: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// `verify --json`.
#[derive(Debug, Serialize)]
pub struct VerifyView {
    pub backup: String,
    /// No damage concerns the backup's manifests.
    pub ok: bool,
    /// A backup manifest names the backup: every server was copied and the cut is recorded.
    /// False only with `--incomplete`.
    pub complete: bool,
    pub read_data: bool,
    /// The backup's manifests: backup manifests first, then `server/volume` volume manifests.
    pub manifests: Vec<ManifestView>,
    /// Manifests checked in the whole repository.
    pub manifests_checked: usize,
    /// Distinct chunks referenced in the whole repository, and how many were read.
    pub chunks: usize,
    pub chunks_read: usize,
    pub damage: Vec<DamageView>,
    /// Problems that concern only other backups (not listed).
    pub other_damage: usize,
}

#[derive(Debug, Serialize)]
pub struct ManifestView {
    pub id: String,
    pub kind: &'static str,
    pub server: Option<String>,
    pub volume: Option<String>,
}

/// One problem with every name it carries; `message` is the human line.
#[derive(Debug, Serialize)]
pub struct DamageView {
    pub kind: &'static str,
    pub manifest: Option<String>,
    pub chunk: Option<String>,
    pub pack: Option<String>,
    pub offset: Option<u64>,
    pub index: Option<String>,
    pub message: String,
}

pub fn run(args: Args, out: &mut dyn Write) -> Result<()> {
    let repo = args.repo.open()?;
    let found = find_backup(&repo, &args.id)?;
    if found.is_empty() {
        return Err(Error::Usage(format!(
            "backup {}: no manifest in repository {}",
            args.id,
            args.repo.repo.display()
        )));
    }
    let complete = require_complete(&found, &args.id, args.incomplete, "check")?;
    // Only this backup's manifests and the chunks they need: the cost does not grow with the
    // repository.
    // Reading the data of a large backup takes minutes. The bar appears with the first read,
    // when the total is known.
    let bar = std::sync::OnceLock::new();
    let progress = |p: VerifyProgress| {
        let bar = bar.get_or_init(|| crate::bar::bytes(args.json, "verify".into(), p.total));
        if let Some(bar) = bar {
            bar.set_position(p.done);
        }
    };
    let report = repo.verify_manifests_with(&found.manifest_ids(), args.read_data, &progress);
    if let Some(Some(bar)) = bar.get() {
        bar.finish_and_clear();
    }
    let report = report?;
    let ours: HashSet<ManifestId> = found.manifest_ids().into_iter().collect();
    let (damage, other): (Vec<&Damage>, Vec<&Damage>) =
        report.damage.iter().partition(|d| concerns(d, &ours));
    let mut manifests: Vec<ManifestView> = found
        .backups
        .iter()
        .map(|id| ManifestView { id: id.to_string(), kind: "backup", server: None, volume: None })
        .collect();
    manifests.extend(found.volumes.iter().map(|(id, m)| ManifestView {
        id: id.to_string(),
        kind: "volume",
        server: Some(m.meta.server.clone()),
        volume: Some(m.meta.volume.clone()),
    }));
    let shown = VerifyView {
        backup: args.id.clone(),
        ok: damage.is_empty(),
        complete,
        read_data: args.read_data,
        manifests,
        manifests_checked: report.manifests,
        chunks: report.chunks,
        chunks_read: report.chunks_read,
        damage: damage.iter().map(|d| damage_view(d)).collect(),
        other_damage: other.len(),
    };
    if args.json {
        writeln!(out, "{}", view::json(&shown))?;
    } else {
        render(&shown, out)?;
    }
    if shown.ok {
        Ok(())
    } else {
        let n = shown.damage.len();
        Err(Error::Damaged(format!(
            "backup {}: damaged ({n} problem{})",
            args.id,
            if n == 1 { "" } else { "s" }
        )))
    }
}

/// Damage naming one of `ours`, plus what is global or cannot be attributed: an index that
/// does not open (its chunks look missing everywhere) and a manifest that does not decrypt.
fn concerns(damage: &Damage, ours: &HashSet<ManifestId>) -> bool {
    match damage {
        Damage::Index { .. } | Damage::Manifest { .. } => true,
        Damage::VolumeManifestMissing { backup: manifest, .. }
        | Damage::ChunkNotIndexed { manifest, .. }
        | Damage::PackMissing { manifest, .. }
        | Damage::ChunkCorrupt { manifest, .. } => ours.contains(manifest),
    }
}

fn damage_view(damage: &Damage) -> DamageView {
    let mut v = DamageView {
        kind: "",
        manifest: None,
        chunk: None,
        pack: None,
        offset: None,
        index: None,
        message: damage.to_string(),
    };
    match damage {
        Damage::Index { path, .. } => {
            v.kind = "index_unreadable";
            v.index = Some(path.display().to_string());
        }
        Damage::Manifest { manifest, .. } => {
            v.kind = "manifest_unreadable";
            v.manifest = Some(manifest.to_string());
        }
        Damage::VolumeManifestMissing { backup, .. } => {
            v.kind = "volume_manifest_missing";
            v.manifest = Some(backup.to_string());
        }
        Damage::ChunkNotIndexed { manifest, chunk } => {
            v.kind = "chunk_not_indexed";
            v.manifest = Some(manifest.to_string());
            v.chunk = Some(chunk.to_string());
        }
        Damage::PackMissing { manifest, chunk, pack, offset } => {
            v.kind = "pack_missing";
            v.manifest = Some(manifest.to_string());
            v.chunk = Some(chunk.to_string());
            v.pack = Some(pack.display().to_string());
            v.offset = Some(*offset);
        }
        Damage::ChunkCorrupt { manifest, chunk, pack, offset, .. } => {
            v.kind = "chunk_corrupt";
            v.manifest = Some(manifest.to_string());
            v.chunk = Some(chunk.to_string());
            v.pack = Some(pack.display().to_string());
            v.offset = Some(*offset);
        }
    }
    v
}

fn render(v: &VerifyView, out: &mut dyn Write) -> Result<()> {
    for m in &v.manifests {
        match (&m.server, &m.volume) {
            (Some(server), Some(volume)) => {
                writeln!(out, "{} manifest {} ({server}/{volume})", m.kind, m.id)?
            }
            _ => writeln!(out, "{} manifest {}", m.kind, m.id)?,
        }
    }
    let read = if v.read_data { format!(", {} read and hashed", v.chunks_read) } else { "".into() };
    writeln!(
        out,
        "checked {} manifests and {} chunks in the repository{read}",
        v.manifests_checked, v.chunks
    )?;
    for d in &v.damage {
        writeln!(out, "DAMAGED {}", d.message)?;
    }
    if v.other_damage > 0 {
        writeln!(out, "{} more problems concern other backups only", v.other_damage)?;
    }
    match (v.ok, v.complete) {
        (true, true) => writeln!(out, "backup {}: ok", v.backup)?,
        (true, false) => writeln!(
            out,
            "backup {}: INCOMPLETE (no backup manifest, no cut); the volumes above are undamaged",
            v.backup
        )?,
        (false, _) => {}
    }
    Ok(())
}
