//! The catalog in the repository. After each backup ends (saveset mode) the listener saves its
//! whole catalog there (`catalog/<id>`, the store's own versioned records and log lines) and
//! keeps the newest few; a listener that starts without `catalog.redb` rebuilds it from the
//! newest one, plus the backups sealed after it (`plan.rs` decides; this module reads and
//! writes). Saving never fails or delays a backup: it runs after the backup's task ended and
//! only logs when it cannot.

use std::path::Path;
use std::sync::Arc;

use stillpoint_saveset::{CatalogHeader, CatalogId, ManifestSummary, Repository};

use crate::config::{Config, CopyConfig};
use crate::copier::Saveset;
use crate::error::{Error, Result};
use crate::model::{Artifact, CutRecord, Millis};
use crate::store::{parse_dump, Store};

mod plan;

pub use plan::{Plan, Saved, Sealed, RECOVERED_BY};

/// How many saved catalogs of this listener the repository keeps.
pub const KEEP: usize = 3;

/// The catalog file in the data directory.
pub fn catalog_file(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("catalog.redb")
}

/// Who writes the catalogs: the listener's certificate name, and its host.
#[derive(Debug, Clone)]
pub struct Writer {
    pub listener: String,
    pub host: String,
}

impl Writer {
    /// The name in the listener's certificate (the same on a rebuilt host that got its
    /// certificate back), else `listener`.
    pub fn of(config: &Config) -> Writer {
        let listener = stillpoint_core::tls::own_identity(&config.tls)
            .map_or_else(|_| "listener".to_string(), |id| id.name);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        Writer { listener, host }
    }
}

/// Saves the whole catalog into the repository, then deletes this listener's older saved
/// catalogs beyond [`KEEP`]. Blocking. Returns a line for the log.
pub fn save(
    store: &Store,
    saveset: &Saveset,
    writer: &Writer,
) -> std::result::Result<String, String> {
    saveset.saving_catalog(|| {
        let (body, records) = store.dump().map_err(|e| e.to_string())?;
        let header = CatalogHeader {
            listener: writer.listener.clone(),
            host: writer.host.clone(),
            written_unix_ms: u64::try_from(stillpoint_core::unix_ms()).unwrap_or(0),
            records,
        };
        saveset.with_repo(
            |repo| {
                let id = repo.write_catalog(&header, &body).map_err(|e| e.to_string())?;
                let deleted = repo
                    .keep_newest_catalogs(&writer.listener, KEEP, id)
                    .map_err(|e| format!("catalog {id} saved, but deleting older ones: {e}"))?;
                Ok(format!(
                    "catalog saved in the repository as catalog/{id}: {records} backup(s), {} bytes; {} older one(s) deleted",
                    body.len(),
                    deleted.len()
                ))
            },
        )
    })
}

/// Saves the catalog on a blocking thread after a backup ended; a failure is a warning.
pub fn save_in_background(store: Store, saveset: Arc<Saveset>, writer: Writer, backup: String) {
    tokio::task::spawn_blocking(move || match save(&store, &saveset, &writer) {
        Ok(line) => tracing::info!(backup = %backup, "{line}"),
        Err(e) => {
            tracing::warn!(backup = %backup, error = %e, "could not save the catalog in the repository; the backup is not affected, the next one tries again")
        }
    });
}

/// What a rebuild did, in words.
#[derive(Debug)]
pub struct Rebuilt {
    pub from: CatalogId,
    pub header: CatalogHeader,
    pub plan: Plan,
}

impl std::fmt::Display for Rebuilt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = &self.header;
        write!(
            f,
            "catalog rebuilt from the repository: {} backup(s) from saved catalog catalog/{} (written by listener {} on host {} at {}, {} record(s)); {} unfinished one(s) closed{}; {} sealed after it recovered from backup manifests{}",
            self.plan.backups.len(),
            self.from,
            h.listener,
            h.host,
            rfc3339(h.written_unix_ms),
            h.records,
            self.plan.closed.len(),
            listed(&self.plan.closed),
            self.plan.added.len(),
            listed(&self.plan.added),
        )?;
        if !self.plan.skipped.is_empty() {
            write!(f, "; left out: {}", self.plan.skipped.join("; "))?;
        }
        Ok(())
    }
}

fn listed(ids: &[String]) -> String {
    if ids.is_empty() {
        String::new()
    } else {
        format!(" ({})", ids.join(", "))
    }
}

fn rfc3339(unix_ms: u64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{unix_ms} ms"))
}

/// Rebuilds an empty catalog from this listener's newest readable saved catalog (an older one
/// when the newest does not open) and the backups sealed after it. `Ok(None)`: the repository
/// holds no saved catalog of this listener. Blocking.
pub fn rebuild(
    store: &Store,
    saveset: &Saveset,
    config: &Config,
    now: Millis,
) -> std::result::Result<Option<Rebuilt>, String> {
    let writer = Writer::of(config);
    let groups: Vec<String> = config.groups.iter().map(|g| g.name.clone()).collect();
    saveset.with_repo(|repo| {
        let Some((from, header, saved)) = newest_saved(repo, &writer)? else {
            return Ok(None);
        };
        let sealed = sealed(repo)?;
        let written = i64::try_from(header.written_unix_ms).unwrap_or(i64::MAX);
        let plan =
            plan::plan(Saved { backups: saved, written_unix_ms: written }, &sealed, &groups, now);
        store.import(&plan.backups).map_err(|e| e.to_string())?;
        Ok(Some(Rebuilt { from, header, plan }))
    })
}

/// This listener's newest saved catalog that opens and parses, with its backups.
fn newest_saved(
    repo: &Repository,
    writer: &Writer,
) -> std::result::Result<Option<(CatalogId, CatalogHeader, Vec<crate::store::Dumped>)>, String> {
    let mut others = Vec::new();
    for (id, header) in repo.list_catalogs().map_err(|e| e.to_string())? {
        match header {
            Ok(h) if h.listener != writer.listener => others.push(h.listener),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(catalog = %id, error = %e, "saved catalog does not open; trying an older one");
                continue;
            }
        }
        let (header, body) = match repo.load_catalog(id) {
            Ok(loaded) if loaded.0.listener == writer.listener => loaded,
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(catalog = %id, error = %e, "saved catalog does not open; trying an older one");
                continue;
            }
        };
        match parse_dump(&body) {
            Ok(backups) => return Ok(Some((id, header, backups))),
            Err(e) => {
                tracing::warn!(catalog = %id, error = %e, "saved catalog cannot be read by this listener; trying an older one");
            }
        }
    }
    if !others.is_empty() {
        others.sort();
        others.dedup();
        tracing::warn!(listener = %writer.listener, others = %others.join(", "), "the repository holds saved catalogs of other listeners only; not rebuilding from them");
    }
    Ok(None)
}

/// Every backup manifest, summarized (volume manifests' chunk lists are never read).
fn sealed(repo: &Repository) -> std::result::Result<Vec<Sealed>, String> {
    let mut out = Vec::new();
    for id in repo.list_manifests().map_err(|e| e.to_string())? {
        let b = match repo.load_summary(id) {
            Ok(ManifestSummary::Backup(b)) => b,
            Ok(ManifestSummary::Volume(_)) => continue,
            Err(e) => {
                tracing::warn!(manifest = %id, error = %e, "manifest unreadable; a backup it seals is not recovered");
                continue;
            }
        };
        let cut = serde_json::from_value::<CutRecord>(b.cut).map_err(|e| e.to_string());
        out.push(Sealed {
            manifest: id.to_string(),
            backup: b.backup,
            created_unix_ms: i64::try_from(b.created_unix_ms).unwrap_or(i64::MAX),
            cut,
            artifacts: b
                .artifacts
                .into_iter()
                .map(|a| {
                    (a.server, Artifact { quiescer: a.quiescer, name: a.name, bytes: a.bytes })
                })
                .collect(),
        });
    }
    Ok(out)
}

/// At start, for a catalog that did not exist before this start: rebuilds it from the
/// repository when the listener copies into one and it holds a saved catalog of this listener.
pub fn rebuild_at_start(store: &Store, saveset: Option<&Saveset>, config: &Config) -> Result<()> {
    let Some(saveset) = saveset else { return Ok(()) };
    let now = stillpoint_core::unix_ms();
    match rebuild(store, saveset, config, now) {
        Ok(Some(done)) => {
            tracing::warn!(
                backups = done.plan.backups.len(),
                "no catalog in the data directory: {done}"
            );
            Ok(())
        }
        Ok(None) => {
            tracing::info!("new catalog: the repository holds no saved catalog of this listener");
            Ok(())
        }
        Err(reason) => Err(Error::Store {
            path: catalog_file(&config.data_dir).display().to_string(),
            reason: format!("rebuilding the catalog from the repository failed: {reason}"),
        }),
    }
}

/// `stillpoint-listener --rebuild-catalog`: rebuilds the catalog offline and says what it did.
/// Refuses an existing catalog unless `force`, which moves it aside first. Blocking.
pub fn rebuild_command(config: &Config, force: bool) -> Result<String> {
    let file = catalog_file(&config.data_dir);
    let refuse = |reason: String| Error::Precondition(reason);
    let CopyConfig::Saveset(c) = &config.copy else {
        return Err(refuse(
            "--rebuild-catalog needs [copy] mode = \"saveset\": only a saveset repository holds saved catalogs".into(),
        ));
    };
    let mut aside = None;
    if file.exists() {
        if !force {
            return Err(refuse(format!(
                "{} exists; a rebuild would replace it: pass --force to move it aside and rebuild",
                file.display()
            )));
        }
        // Refused while a listener serves from it (redb locks the file): renaming an open
        // catalog would leave two that both go on.
        drop(Store::open(&config.data_dir)?);
        let to = file.with_extension(format!("redb.replaced-{}", stillpoint_core::unix_ms()));
        std::fs::rename(&file, &to)?;
        aside = Some(to);
    }
    let result = Saveset::open_in(c, Some(&config.data_dir.join("cache")))
        .map_err(|problems| format!("copy.repository {}: {problems}", c.repository.display()))
        .and_then(|saveset| {
            let store = Store::open(&config.data_dir).map_err(|e| e.to_string())?;
            rebuild(&store, &saveset, config, stillpoint_core::unix_ms())
        });
    let failed = |reason: String| {
        // Nothing half-built stays, and a catalog moved aside comes back.
        let _ = std::fs::remove_file(&file);
        if let Some(aside) = &aside {
            let _ = std::fs::rename(aside, &file);
        }
        Error::Store { path: file.display().to_string(), reason }
    };
    match result {
        Ok(Some(done)) => Ok(match &aside {
            Some(to) => format!("{done}; the old catalog was moved to {}", to.display()),
            None => done.to_string(),
        }),
        Ok(None) => Err(failed(format!(
            "repository {} holds no saved catalog of listener {}; nothing to rebuild from",
            c.repository.display(),
            Writer::of(config).listener
        ))),
        Err(reason) => Err(failed(format!("rebuild failed: {reason}"))),
    }
}

#[cfg(test)]
mod tests;
