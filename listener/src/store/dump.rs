//! The catalog as one byte string and back: every backup's record and log lines in the store's
//! own versioned formats, one JSON line per backup (`{"id", "record", "log": [..]}`), for the
//! copy saved in the repository (`crate::repo_catalog`). The idempotency tables are left out:
//! a retried Start of a backup long over has nothing to find.

use redb::ReadableTable;
use serde::Deserialize;

use super::{record, Store, BACKUPS, LOG};
use crate::error::Result;
use crate::model::{BackupRecord, LogEntry};

/// One backup of a dump, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Dumped {
    pub record: BackupRecord,
    pub log: Vec<LogEntry>,
}

impl Store {
    /// Every backup and its log, as the store holds them (records it cannot read included,
    /// byte for byte); returns the bytes and how many backups they hold. Blocking.
    pub fn dump(&self) -> Result<(Vec<u8>, u64)> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let backups = txn.open_table(BACKUPS).map_err(|e| self.err(e))?;
        let log = txn.open_table(LOG).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let mut n = 0;
        for row in backups.iter().map_err(|e| self.err(e))? {
            let (key, value) = row.map_err(|e| self.err(e))?;
            let id = key.value();
            let id_json = serde_json::to_vec(id).map_err(|e| self.err(e))?;
            out.extend_from_slice(b"{\"id\":");
            out.extend_from_slice(&id_json);
            out.extend_from_slice(b",\"record\":");
            out.extend_from_slice(value.value());
            out.extend_from_slice(b",\"log\":[");
            for (i, line) in
                log.range((id, 0)..=(id, u64::MAX)).map_err(|e| self.err(e))?.enumerate()
            {
                let (_, entry) = line.map_err(|e| self.err(e))?;
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(entry.value());
            }
            out.extend_from_slice(b"]}\n");
            n += 1;
        }
        Ok((out, n))
    }

    /// Writes backups (records and their whole logs) into this catalog in one transaction,
    /// replacing a record of the same id. For a rebuild into an empty catalog. Blocking.
    pub fn import(&self, backups: &[Dumped]) -> Result<()> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(BACKUPS).map_err(|e| self.err(e))?;
            let mut log = txn.open_table(LOG).map_err(|e| self.err(e))?;
            for b in backups {
                let id = b.record.id.as_str();
                let body = self.encode(&b.record)?;
                table.insert(id, body.as_slice()).map_err(|e| self.err(e))?;
                for (seq, entry) in (0u64..).zip(&b.log) {
                    let line = record::encode_entry(entry).map_err(|e| self.err(e))?;
                    log.insert((id, seq), line.as_slice()).map_err(|e| self.err(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }
}

/// Reads a dump; a line this listener cannot read is an error naming the backup, so a rebuild
/// never silently loses one.
pub fn parse_dump(bytes: &[u8]) -> std::result::Result<Vec<Dumped>, String> {
    #[derive(Deserialize)]
    struct Line {
        id: String,
        record: serde_json::Value,
        log: Vec<serde_json::Value>,
    }
    let mut out = Vec::new();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line: Line =
            serde_json::from_slice(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let again = |v: &serde_json::Value| serde_json::to_vec(v).map_err(|e| e.to_string());
        let record = record::decode(&again(&line.record)?)
            .map_err(|e| format!("backup {}: {e}", line.id))?;
        let mut log = Vec::with_capacity(line.log.len());
        for entry in &line.log {
            log.push(
                record::decode_entry(&again(entry)?)
                    .map_err(|e| format!("backup {}: log line: {e}", line.id))?,
            );
        }
        out.push(Dumped { record, log });
    }
    Ok(out)
}
