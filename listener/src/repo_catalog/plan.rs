//! What a rebuilt catalog holds, decided without IO: the saved catalog's backups, those it
//! held unfinished made terminal (no listener runs them any more), and the backups the
//! repository sealed after that catalog was saved, as records recovered from their backup
//! manifests. Every record it returns is terminal, so the runtime never takes one over and the
//! sweep only removes what agents still hold of them.

use crate::model::{
    Artifact, BackupRecord, CutRecord, Level, LogEntry, Millis, ServerEnd, ServerRecord,
    ServerStep, State,
};
use crate::store::Dumped;

/// Who started a backup the rebuild found only in the repository.
pub const RECOVERED_BY: &str = "recovered from the repository";

/// A backup manifest, as the rebuild needs it.
#[derive(Debug, Clone)]
pub struct Sealed {
    /// The backup manifest's id.
    pub manifest: String,
    pub backup: String,
    pub created_unix_ms: Millis,
    /// The cut the listener sealed into it; `Err` says why it cannot be read.
    pub cut: Result<CutRecord, String>,
    /// Per server, the quiescers' artifacts.
    pub artifacts: Vec<(String, Artifact)>,
}

/// The saved catalog the rebuild starts from.
#[derive(Debug, Clone)]
pub struct Saved {
    pub backups: Vec<Dumped>,
    pub written_unix_ms: Millis,
}

/// The rebuilt catalog, and what was done to get it.
#[derive(Debug, Default)]
pub struct Plan {
    pub backups: Vec<Dumped>,
    /// Backups the saved catalog held unfinished, now terminal.
    pub closed: Vec<String>,
    /// Backups recovered from their backup manifests alone.
    pub added: Vec<String>,
    /// Backup manifests left out, each with why.
    pub skipped: Vec<String>,
}

/// Rebuilds from `saved` and the repository's backup manifests `sealed`. A manifest is added
/// only when it was sealed after the catalog was saved and its group is one of `groups` (this
/// listener's): an older one the catalog lacks, or another group's, is another listener's.
pub fn plan(saved: Saved, sealed: &[Sealed], groups: &[String], now: Millis) -> Plan {
    let mut out = Plan::default();
    let sealed_of = |id: &str| sealed.iter().find(|s| s.backup == id);
    for mut b in saved.backups {
        if !b.record.state.is_terminal() {
            out.closed.push(b.record.id.clone());
            let found = sealed_of(&b.record.id);
            let line = close(&mut b.record, found, saved.written_unix_ms, now);
            b.log.push(line);
        }
        out.backups.push(b);
    }
    for s in sealed {
        if out.backups.iter().any(|b| b.record.id == s.backup) {
            continue;
        }
        let why = match &s.cut {
            _ if s.created_unix_ms < saved.written_unix_ms => {
                Some("sealed before the saved catalog, which does not hold it: not this listener's")
            }
            Err(_) => Some("its cut cannot be read"),
            Ok(cut) if !groups.contains(&cut.group) => {
                Some("its group is not one of this listener's")
            }
            Ok(_) => None,
        };
        if let Some(why) = why {
            out.skipped.push(format!("backup {} (manifest {}): {why}", s.backup, s.manifest));
            continue;
        }
        if let Ok(cut) = &s.cut {
            out.added.push(s.backup.clone());
            out.backups.push(recovered(s, cut, saved.written_unix_ms));
        }
    }
    out.backups
        .sort_by(|a, b| (a.record.created, &a.record.id).cmp(&(b.record.created, &b.record.id)));
    out
}

/// Ends a backup the saved catalog held unfinished: SUCCEEDED when the repository holds its
/// backup manifest (every copy was in and it was sealed), else FAILED in the phase it was in.
fn close(
    record: &mut BackupRecord,
    sealed: Option<&Sealed>,
    written: Millis,
    now: Millis,
) -> LogEntry {
    let was = record.state.name();
    let message = match sealed {
        Some(s) => {
            record.state = State::Succeeded;
            format!(
                "catalog rebuilt from the repository: this backup was {was} when the catalog was \
                 saved (at {written} ms), and the repository holds its backup manifest {} \
                 (sealed at {} ms), so every copy was in; the verify after the seal and the \
                 cleanup of its snapshots are not known (the sweep deletes snapshots an agent \
                 still holds)",
                s.manifest, s.created_unix_ms
            )
        }
        None => {
            let reason = format!(
                "the listener's catalog was lost while this backup was {was}; the catalog \
                 rebuilt from the repository has no later news of it and the repository no \
                 backup manifest"
            );
            record.state = State::Failed { phase: was, reason: reason.clone() };
            format!(
                "catalog rebuilt from the repository: {reason}, so it failed (the sweep deletes \
                 snapshots an agent still holds)"
            )
        }
    };
    record.finished.get_or_insert(now);
    not_recorded(&mut record.servers);
    record.settled = Some(now);
    LogEntry { at: now, server: None, level: Level::Warn, message, state: record.state.name() }
}

/// A backup the repository sealed after the catalog was saved: SUCCEEDED (a backup manifest is
/// written only once every server copied), with the manifest's cut, verdict and artifacts.
fn recovered(s: &Sealed, cut: &CutRecord, written: Millis) -> Dumped {
    let mut record = BackupRecord::new(&s.backup, &cut.group, &[], RECOVERED_BY, cut.created);
    record.state = State::Succeeded;
    record.finished = Some(s.created_unix_ms);
    record.verdict = cut.verdict.clone();
    record.servers = cut
        .servers
        .iter()
        .map(|c| {
            let mut server = ServerRecord::new(&c.server);
            server.step = ServerStep::Copied;
            server.detail = format!("recovered from backup manifest {}", s.manifest);
            server.cut = c.cut.clone();
            server.snapshots = c.snapshots.clone();
            server.total_bytes = c.snapshots.iter().map(|x| x.size_bytes).sum();
            server.copied_bytes = server.total_bytes;
            server.artifacts = s
                .artifacts
                .iter()
                .filter(|(n, _)| *n == c.server)
                .map(|(_, a)| a.clone())
                .collect();
            server
        })
        .collect();
    not_recorded(&mut record.servers);
    record.settled = Some(s.created_unix_ms);
    let line = LogEntry {
        at: s.created_unix_ms,
        server: None,
        level: Level::Warn,
        message: format!(
            "recovered from the repository: backup manifest {} was sealed (at {} ms) after the \
             last saved catalog (written at {written} ms), so this record is rebuilt from it: \
             its servers, cut, verdict and artifacts are the manifest's; its log before the \
             seal, the verify after it and the cleanup of its snapshots are not known (the \
             sweep deletes snapshots an agent still holds)",
            s.manifest, s.created_unix_ms
        ),
        state: record.state.name(),
    };
    Dumped { record, log: vec![line] }
}

/// Servers contacted whose end was not recorded: nobody will ask them again.
fn not_recorded(servers: &mut [ServerRecord]) {
    for s in servers {
        if s.end.is_none() {
            s.end = Some(ServerEnd::NotRecorded);
        }
    }
}
