//! The catalog: backups and their event logs in an embedded redb store in the data directory.
//! A record and the log lines that explain its change are written in one transaction, so the
//! log never claims what the record does not hold, and a restart sees whole decisions only.
//! Records are the catalog's own, versioned (`record.rs`), not the coordinator's. Writes (each
//! a durable commit, an fsync) run on one writer thread, never on an async worker; waiting
//! writes share a commit.

use std::path::Path;
use std::sync::{mpsc, Arc};

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::model::{BackupRecord, LogEntry};
use crate::requests::CopyReport;

mod dump;
mod record;

pub use dump::{parse_dump, Dumped};

pub use record::{CatalogRecord, Mark, VERSION};

const BACKUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("backups");
const LOG: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("log");
/// A StartBackup's request id -> the backup it started (see `requests.rs`).
const REQUESTS: TableDefinition<&str, &str> = TableDefinition::new("requests");
/// (backup, server) -> the first copy report the backup software sent, as JSON.
const COPY_REPORTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("copy_reports");

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    path: String,
    writes: mpsc::Sender<Write>,
}

/// One write for the writer thread: a record (encoded) and log lines for one backup, and the
/// idempotency records that go with them.
struct Write {
    id: String,
    record: Option<Vec<u8>>,
    entries: Vec<Vec<u8>>,
    /// The request id of the Start that made this backup.
    request_id: Option<String>,
    /// A server's first copy report, as JSON.
    copy_report: Option<(String, Vec<u8>)>,
    /// A pin, unpin or expiry of the record already stored.
    mark: Option<Mark>,
    done: oneshot::Sender<std::result::Result<u64, String>>,
}

impl Write {
    fn new(id: &str, record: Option<Vec<u8>>, entries: Vec<Vec<u8>>) -> Write {
        let (done, _) = oneshot::channel();
        Write {
            id: id.to_string(),
            record,
            entries,
            request_id: None,
            copy_report: None,
            mark: None,
            done,
        }
    }

    fn with_answer(mut self) -> (Write, oneshot::Receiver<std::result::Result<u64, String>>) {
        let (done, answer) = oneshot::channel();
        self.done = done;
        (self, answer)
    }
}

impl Store {
    /// Opens (or creates) the catalog and starts its writer thread, which ends once every
    /// handle is dropped. Blocking.
    pub fn open(data_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(data_dir)?;
        let file = data_dir.join("catalog.redb");
        let path = file.display().to_string();
        let db = Database::create(&file).map_err(|e| Error::Store {
            path: path.clone(),
            reason: format!("{e} (is another listener using this data_dir?)"),
        })?;
        let db = Arc::new(db);
        let err =
            |e: &dyn std::fmt::Display| Error::Store { path: path.clone(), reason: e.to_string() };
        let txn = db.begin_write().map_err(|e| err(&e))?;
        txn.open_table(BACKUPS).map_err(|e| err(&e))?;
        txn.open_table(LOG).map_err(|e| err(&e))?;
        txn.open_table(REQUESTS).map_err(|e| err(&e))?;
        txn.open_table(COPY_REPORTS).map_err(|e| err(&e))?;
        txn.commit().map_err(|e| err(&e))?;
        let (writes, queue) = mpsc::channel();
        // Weak: the database closes when the last handle goes, not when this thread notices.
        let writer = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("catalog-writer".into())
            .spawn(move || write_all(&writer, &queue))?;
        Ok(Store { db, path, writes })
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Store { path: self.path.clone(), reason: e.to_string() }
    }

    /// Saves `record` and appends `entries` to its log, durably, in one transaction. Returns the
    /// sequence number after the last entry (the next one to be given).
    pub async fn save(&self, record: &BackupRecord, entries: &[LogEntry]) -> Result<u64> {
        let mut lines = Vec::with_capacity(entries.len());
        for entry in entries {
            lines.push(record::encode_entry(entry).map_err(|e| self.err(e))?);
        }
        self.write(Write::new(&record.id, Some(self.encode(record)?), lines)).await
    }

    /// Saves a new backup and, when its Start carried a request id, maps the id to it, in one
    /// transaction: a retry finds the backup whenever the backup exists.
    pub async fn save_started(
        &self,
        record: &BackupRecord,
        request_id: Option<&str>,
    ) -> Result<()> {
        let mut write = Write::new(&record.id, Some(self.encode(record)?), Vec::new());
        write.request_id = request_id.map(str::to_string);
        self.write(write).await.map(|_| ())
    }

    /// Keeps the first copy report for `server` of backup `id`.
    pub async fn save_copy_report(
        &self,
        id: &str,
        server: &str,
        report: &CopyReport,
    ) -> Result<()> {
        let body = serde_json::to_vec(report).map_err(|e| self.err(e))?;
        let mut write = Write::new(id, None, Vec::new());
        write.copy_report = Some((server.to_string(), body));
        self.write(write).await.map(|_| ())
    }

    /// Pins, unpins or expires backup `id` and appends `entries` to its log, in one transaction.
    /// Only these writes change a pin or an expiry: every other save of the record keeps them.
    pub async fn mark(&self, id: &str, mark: Mark, entries: &[LogEntry]) -> Result<BackupRecord> {
        self.get(id)?;
        let mut lines = Vec::with_capacity(entries.len());
        for entry in entries {
            lines.push(record::encode_entry(entry).map_err(|e| self.err(e))?);
        }
        let mut write = Write::new(id, None, lines);
        write.mark = Some(mark);
        self.write(write).await?;
        self.get(id)
    }

    fn encode(&self, record: &BackupRecord) -> Result<Vec<u8>> {
        record::encode(record).map_err(|e| self.err(format!("backup {}: {e}", record.id)))
    }

    async fn write(&self, write: Write) -> Result<u64> {
        let (write, answer) = write.with_answer();
        self.writes.send(write).map_err(|_| self.err("the catalog's writer thread is gone"))?;
        answer
            .await
            .map_err(|_| self.err("the catalog's writer thread is gone"))?
            .map_err(|e| self.err(e))
    }

    pub fn get(&self, id: &str) -> Result<BackupRecord> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BACKUPS).map_err(|e| self.err(e))?;
        let value = table
            .get(id)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| Error::UnknownBackup(id.into()))?;
        record::decode(value.value()).map_err(|e| self.err(format!("backup {id}: {e}")))
    }

    /// Whether the catalog holds backup `id` (a backup this listener made).
    pub fn knows(&self, id: &str) -> Result<bool> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BACKUPS).map_err(|e| self.err(e))?;
        Ok(table.get(id).map_err(|e| self.err(e))?.is_some())
    }

    /// Every backup, newest first. A record this listener cannot read is skipped and logged.
    pub fn list(&self) -> Result<Vec<BackupRecord>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BACKUPS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            match record::decode(value.value()) {
                Ok(record) => out.push(record),
                Err(e) => {
                    tracing::error!(store = %self.path, backup = %key.value(), error = %e, "unreadable backup record skipped")
                }
            }
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.id.cmp(&a.id)));
        Ok(out)
    }

    /// The backup a Start with `request_id` made, if one did.
    pub fn started_by_request(&self, request_id: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(REQUESTS).map_err(|e| self.err(e))?;
        let found = table.get(request_id).map_err(|e| self.err(e))?;
        Ok(found.map(|id| id.value().to_string()))
    }

    /// The first copy report for `server` of backup `id`, if any came.
    pub fn copy_report(&self, id: &str, server: &str) -> Result<Option<CopyReport>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(COPY_REPORTS).map_err(|e| self.err(e))?;
        let Some(found) = table.get((id, server)).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(found.value()).map(Some).map_err(|e| self.err(e))
    }

    /// A backup's log from sequence number `from` on.
    pub fn log(&self, id: &str, from: u64) -> Result<Vec<(u64, LogEntry)>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(LOG).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.range((id, from)..=(id, u64::MAX)).map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            let entry = record::decode_entry(value.value()).map_err(|e| self.err(e))?;
            out.push((key.value().1, entry));
        }
        Ok(out)
    }
}

/// The writer thread: takes every write waiting, commits them in one transaction, answers each.
fn write_all(db: &std::sync::Weak<Database>, queue: &mpsc::Receiver<Write>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter());
        let Some(open) = db.upgrade() else { return };
        let result = commit(&open, &batch);
        // Let go before answering: the answer may be what lets the last handle go.
        drop(open);
        match result {
            Ok(next) => {
                for (write, next) in batch.into_iter().zip(next) {
                    let _ = write.done.send(Ok(next));
                }
            }
            Err(e) => {
                for write in batch {
                    let _ = write.done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One transaction for `batch`; returns, per write, the sequence number after its entries.
fn commit(db: &Database, batch: &[Write]) -> std::result::Result<Vec<u64>, String> {
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let txn = db.begin_write().map_err(|e| s(&e))?;
    let mut nexts = Vec::with_capacity(batch.len());
    {
        let mut backups = txn.open_table(BACKUPS).map_err(|e| s(&e))?;
        let mut log = txn.open_table(LOG).map_err(|e| s(&e))?;
        let mut requests = txn.open_table(REQUESTS).map_err(|e| s(&e))?;
        let mut reports = txn.open_table(COPY_REPORTS).map_err(|e| s(&e))?;
        for write in batch {
            let id = write.id.as_str();
            if let Some(body) = &write.record {
                let old = backups.get(id).map_err(|e| s(&e))?.map(|v| v.value().to_vec());
                let body = match old {
                    Some(old) => {
                        record::carry_marks(&old, body).map_err(|e| format!("backup {id}: {e}"))?
                    }
                    None => body.clone(),
                };
                backups.insert(id, body.as_slice()).map_err(|e| s(&e))?;
            }
            if let Some(mark) = write.mark {
                // The record exists (checked before the write; records are never deleted).
                let old = backups.get(id).map_err(|e| s(&e))?.map(|v| v.value().to_vec());
                if let Some(old) = old {
                    let body =
                        record::apply_mark(&old, mark).map_err(|e| format!("backup {id}: {e}"))?;
                    backups.insert(id, body.as_slice()).map_err(|e| s(&e))?;
                }
            }
            if let Some(request_id) = &write.request_id {
                requests.insert(request_id.as_str(), id).map_err(|e| s(&e))?;
            }
            if let Some((server, body)) = &write.copy_report {
                reports.insert((id, server.as_str()), body.as_slice()).map_err(|e| s(&e))?;
            }
            let mut next = match log.range((id, 0)..=(id, u64::MAX)).map_err(|e| s(&e))?.next_back()
            {
                Some(last) => last.map_err(|e| s(&e))?.0.value().1 + 1,
                None => 0,
            };
            for line in &write.entries {
                log.insert((id, next), line.as_slice()).map_err(|e| s(&e))?;
                next += 1;
            }
            nexts.push(next);
        }
    }
    txn.commit().map_err(|e| s(&e))?;
    Ok(nexts)
}

#[cfg(test)]
mod tests;
