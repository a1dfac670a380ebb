//! Saved catalogs: a listener's whole catalog of backups as one sealed object,
//! `catalog/<id>`, so a listener whose data directory was lost can rebuild it from the
//! repository. The body is the listener's own bytes (its versioned records); this crate only
//! seals, compresses, lists and deletes them, and never reads a body to decide anything.

use serde::{Deserialize, Serialize};

use crate::crypto;
use crate::error::{Error, Result};
use crate::manifest::CatalogId;
use crate::repo::Repository;

/// What a saved catalog says about itself, readable without its body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogHeader {
    /// The listener that wrote it (its name, as its certificate says).
    pub listener: String,
    /// The host it ran on.
    pub host: String,
    /// When it was written, in Unix milliseconds.
    pub written_unix_ms: u64,
    /// How many backup records the body holds.
    pub records: u64,
}

/// The header as stored: with its kind, so a catalog is never mistaken for another blob.
#[derive(Serialize, Deserialize)]
struct Stored {
    kind: String,
    #[serde(flatten)]
    header: CatalogHeader,
}

const KIND: &str = "catalog";

fn key(id: CatalogId) -> String {
    format!("catalog/{id}")
}

impl Repository {
    /// Writes a catalog (header, then `body` zstd-compressed, sealed) under a fresh random id,
    /// durably and atomically: a crash leaves it whole or absent.
    pub fn write_catalog(&self, header: &CatalogHeader, body: &[u8]) -> Result<CatalogId> {
        let id = CatalogId(crypto::random());
        let stored = Stored { kind: KIND.into(), header: header.clone() };
        let json = serde_json::to_vec(&stored).expect("a catalog header serializes");
        let compress = |bytes: &[u8]| {
            zstd::bulk::compress(bytes, 3).map_err(|source| Error::Io {
                op: "compress",
                path: self.storage.describe(&key(id)),
                source,
            })
        };
        // Room for the nonce, then two zstd frames: the header alone decodes first.
        let mut plain = vec![0u8; 24];
        plain.extend_from_slice(&compress(&json)?);
        plain.extend_from_slice(&compress(body)?);
        let blob = self.key.seal_in_place(key(id).as_bytes(), plain);
        self.storage.put(&key(id), &blob)?;
        Ok(id)
    }

    /// Every saved catalog, newest first by `written_unix_ms`; one that does not open is listed
    /// with what is wrong with it (last).
    pub fn list_catalogs(&self) -> Result<Vec<(CatalogId, Result<CatalogHeader>)>> {
        let mut ids: Vec<CatalogId> = self.list_ids("catalog")?;
        ids.sort();
        let mut out: Vec<(CatalogId, Result<CatalogHeader>)> =
            ids.into_iter().map(|id| (id, self.load_catalog(id).map(|(h, _)| h))).collect();
        out.sort_by_key(|(id, h)| match h {
            Ok(h) => (0, std::cmp::Reverse(h.written_unix_ms), *id),
            Err(_) => (1, std::cmp::Reverse(0), *id),
        });
        Ok(out)
    }

    /// Reads, opens and decompresses a saved catalog.
    pub fn load_catalog(&self, id: CatalogId) -> Result<(CatalogHeader, Vec<u8>)> {
        let key = key(id);
        let path = self.storage.describe(&key);
        let Some(blob) = self.storage.get(&key)? else {
            return Err(Error::UnknownManifest { id: key });
        };
        let damaged =
            |reason: String| Error::Damaged { what: format!("catalog {}", path.display()), reason };
        let plain = self
            .key
            .open_in_place(key.as_bytes(), blob)
            .ok_or_else(|| damaged("does not decrypt".into()))?;
        let first = zstd::zstd_safe::find_frame_compressed_size(&plain)
            .map_err(|_| damaged("does not start with a zstd frame".into()))?;
        let (head, rest) = plain.split_at(first);
        let json = zstd::stream::decode_all(head).map_err(|e| damaged(format!("header: {e}")))?;
        let stored: Stored =
            serde_json::from_slice(&json).map_err(|e| damaged(format!("header: {e}")))?;
        if stored.kind != KIND {
            return Err(damaged(format!("kind {:?} is not {KIND:?}", stored.kind)));
        }
        let body = zstd::stream::decode_all(rest).map_err(|e| damaged(format!("body: {e}")))?;
        Ok((stored.header, body))
    }

    /// Deletes older catalogs of `listener` so that its newest `keep` remain; `written` (the one
    /// just written) is never deleted, so the repository never holds none of a listener's.
    /// Catalogs of other listeners, and any that do not open, are left alone. Returns the ids
    /// deleted.
    pub fn keep_newest_catalogs(
        &self,
        listener: &str,
        keep: usize,
        written: CatalogId,
    ) -> Result<Vec<CatalogId>> {
        let mine: Vec<CatalogId> = self
            .list_catalogs()?
            .into_iter()
            .filter_map(|(id, h)| h.ok().filter(|h| h.listener == listener).map(|_| id))
            .collect();
        let mut deleted = Vec::new();
        for id in mine.into_iter().skip(keep.max(1)).filter(|id| *id != written) {
            self.storage.delete(&key(id))?;
            deleted.push(id);
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests;
