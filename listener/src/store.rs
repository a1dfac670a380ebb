//! The catalog: backups and their event logs in an embedded redb store in the data directory.
//! A record and the log lines that explain its change are written in one transaction, so the
//! log never claims what the record does not hold, and a restart sees whole decisions only.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use crate::error::{Error, Result};
use crate::model::{BackupRecord, LogEntry};
use crate::requests::CopyReport;

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
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(data_dir)?;
        let file = data_dir.join("catalog.redb");
        let path = file.display().to_string();
        let db = Database::create(&file).map_err(|e| Error::Store {
            path: path.clone(),
            reason: format!("{e} (is another listener using this data_dir?)"),
        })?;
        let store = Store { db: Arc::new(db), path };
        let txn = store.db.begin_write().map_err(|e| store.err(e))?;
        txn.open_table(BACKUPS).map_err(|e| store.err(e))?;
        txn.open_table(LOG).map_err(|e| store.err(e))?;
        txn.commit().map_err(|e| store.err(e))?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Store { path: self.path.clone(), reason: e.to_string() }
    }

    /// Saves `record` and appends `entries` to its log, durably, in one transaction. Returns the
    /// sequence numbers the entries got.
    pub fn save(&self, record: &BackupRecord, entries: &[LogEntry]) -> Result<u64> {
        self.write(&record.id, Some(record), entries)
    }

    /// Appends `entries` to a backup's log and leaves its record as it is.
    pub fn append(&self, id: &str, entries: &[LogEntry]) -> Result<u64> {
        self.write(id, None, entries)
    }

    fn write(&self, id: &str, record: Option<&BackupRecord>, entries: &[LogEntry]) -> Result<u64> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let next = {
            if let Some(record) = record {
                let body = serde_json::to_vec(record).map_err(|e| self.err(e))?;
                let mut backups = txn.open_table(BACKUPS).map_err(|e| self.err(e))?;
                backups.insert(id, body.as_slice()).map_err(|e| self.err(e))?;
            }
            let mut log = txn.open_table(LOG).map_err(|e| self.err(e))?;
            let mut next =
                match log.range((id, 0)..=(id, u64::MAX)).map_err(|e| self.err(e))?.next_back() {
                    Some(last) => last.map_err(|e| self.err(e))?.0.value().1 + 1,
                    None => 0,
                };
            for entry in entries {
                let line = serde_json::to_vec(entry).map_err(|e| self.err(e))?;
                log.insert((id, next), line.as_slice()).map_err(|e| self.err(e))?;
                next += 1;
            }
            next
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(next)
    }

    pub fn get(&self, id: &str) -> Result<BackupRecord> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BACKUPS).map_err(|e| self.err(e))?;
        let value = table
            .get(id)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| Error::UnknownBackup(id.into()))?;
        serde_json::from_slice(value.value()).map_err(|e| self.err(format!("backup {id}: {e}")))
    }

    /// Every backup, newest first.
    pub fn list(&self) -> Result<Vec<BackupRecord>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BACKUPS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (_, value) = row.map_err(|e| self.err(e))?;
            match serde_json::from_slice::<BackupRecord>(value.value()) {
                Ok(record) => out.push(record),
                Err(e) => {
                    tracing::error!(store = %self.path, error = %e, "unreadable backup record skipped")
                }
            }
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.id.cmp(&a.id)));
        Ok(out)
    }

    /// A backup's log from sequence number `from` on.
    pub fn log(&self, id: &str, from: u64) -> Result<Vec<(u64, LogEntry)>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(LOG).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.range((id, from)..=(id, u64::MAX)).map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            let entry = serde_json::from_slice(value.value()).map_err(|e| self.err(e))?;
            out.push((key.value().1, entry));
        }
        Ok(out)
    }
}

/// Idempotency records (`requests.rs`), in tables of their own that are made on first write.
impl Store {
    /// Saves a new backup and, when its Start carried a request id, maps the id to it, in one
    /// transaction: a retry finds the backup whenever the backup exists.
    pub fn save_started(&self, record: &BackupRecord, request_id: Option<&str>) -> Result<()> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let body = serde_json::to_vec(record).map_err(|e| self.err(e))?;
            let mut backups = txn.open_table(BACKUPS).map_err(|e| self.err(e))?;
            backups.insert(record.id.as_str(), body.as_slice()).map_err(|e| self.err(e))?;
            if let Some(request_id) = request_id {
                let mut requests = txn.open_table(REQUESTS).map_err(|e| self.err(e))?;
                requests.insert(request_id, record.id.as_str()).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The backup a Start with `request_id` made, if one did.
    pub fn started_by_request(&self, request_id: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(REQUESTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let found = table.get(request_id).map_err(|e| self.err(e))?;
        Ok(found.map(|id| id.value().to_string()))
    }

    /// Keeps the first copy report for `server` of backup `id`.
    pub fn save_copy_report(&self, id: &str, server: &str, report: &CopyReport) -> Result<()> {
        let body = serde_json::to_vec(report).map_err(|e| self.err(e))?;
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(COPY_REPORTS).map_err(|e| self.err(e))?;
            table.insert((id, server), body.as_slice()).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The first copy report for `server` of backup `id`, if any came.
    pub fn copy_report(&self, id: &str, server: &str) -> Result<Option<CopyReport>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(COPY_REPORTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let Some(found) = table.get((id, server)).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(found.value()).map(Some).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Level, StateName};

    #[test]
    fn history_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let record = BackupRecord::new("b1", "g", &["a".to_string()], "operator:x", 5);
        let entry = LogEntry {
            at: 5,
            server: None,
            level: Level::Info,
            message: "hi".into(),
            state: StateName::Pending,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.save(&record, &[entry.clone(), entry.clone()]).unwrap(), 2);
            assert_eq!(store.save(&record, std::slice::from_ref(&entry)).unwrap(), 3);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get("b1").unwrap(), record);
        assert_eq!(store.log("b1", 0).unwrap().len(), 3);
        assert_eq!(store.log("b1", 2).unwrap()[0].0, 2);
        assert!(matches!(store.get("nope"), Err(Error::UnknownBackup(_))));
        assert_eq!(store.list().unwrap().len(), 1);
    }
}
