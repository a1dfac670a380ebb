//! What a backup records: ids, the per-volume manifest (size and ordered chunks or holes) and the
//! per-backup manifest (the consistent cut, opaque to this crate). Plain data, no IO.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::crypto::{hex, unhex};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &hex(&self.0)[..12])
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                unhex(s).map($name).ok_or_else(|| format!("{s:?} is not 64 hex digits"))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&hex(&self.0))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // A visitor, so an id is parsed from the input without a String of its own.
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("64 lowercase hex digits")
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<$name, E> {
                        s.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

id_type!(
    /// A chunk's content address: blake3 of its plaintext keyed with the repository's id key.
    ChunkId
);
id_type!(
    /// A pack file's random name.
    PackId
);
id_type!(
    /// A manifest file's random name.
    ManifestId
);
id_type!(
    /// A saved catalog's random name (`catalog/<id>`).
    CatalogId
);

/// Who a volume backup belongs to; chosen by the caller (the listener's copy phase).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// The backup id in the listener's catalog.
    pub backup: String,
    /// The server (agent) name.
    pub server: String,
    /// The volume's name on that server.
    pub volume: String,
}

/// One volume as backed up: its size and, per fixed-size chunk, its content or a hole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeManifest {
    pub meta: VolumeMeta,
    /// Logical size in bytes.
    pub size: u64,
    /// Chunk size in bytes; the last chunk is shorter when `size` is not a multiple.
    pub chunk_size: u32,
    /// The chunk list: the entries themselves (formats 1 and 2) or pages of them (format 3).
    pub chunks: ChunkList,
    /// When the backup of this volume finished, in Unix milliseconds.
    pub created_unix_ms: u64,
}

/// A volume's chunk list: one entry per chunk, in order, `None` for a hole (unallocated or all
/// zeros).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ChunkList {
    /// Every entry, in the manifest itself (formats 1 and 2: 32 bytes per data chunk in every
    /// backup, whatever changed).
    Flat(Vec<Option<ChunkId>>),
    /// Format 3: pages of `page_chunks` entries stored as blobs in packs (`pages.rs`), listed by
    /// id; `None` is a page of holes only, stored nowhere.
    Paged { page_chunks: u32, pages: Vec<Option<ChunkId>> },
}

impl VolumeManifest {
    /// How many chunks the volume has.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.chunk_size.max(1)))
    }

    /// Byte offset and length of chunk `i`.
    pub fn extent(&self, i: usize) -> (u64, usize) {
        let off = i as u64 * u64::from(self.chunk_size);
        let len = (self.size - off).min(u64::from(self.chunk_size));
        (off, usize::try_from(len).expect("a chunk fits in memory"))
    }
}

/// A whole backup: the volume manifests it is made of and the cut the listener recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// The backup id in the listener's catalog.
    pub backup: String,
    /// The volume manifests of every server in the backup.
    pub volumes: Vec<ManifestId>,
    /// The consistent cut (servers, freeze and thaw times, quiescer reports) as the listener
    /// records it; stored as given.
    pub cut: serde_json::Value,
    pub created_unix_ms: u64,
    /// The small files the servers' quiescers made that a restore needs beside the volumes
    /// (absent in manifests written before artifacts existed, and when there are none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<BackupArtifact>,
}

/// One server's file from one quiescer (a PostgreSQL backup label, a binary log position),
/// restored as `<server>/artifacts/<quiescer>/<name>`; its bytes are base64 in the JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupArtifact {
    pub server: String,
    pub quiescer: String,
    pub name: String,
    #[serde(rename = "base64", with = "base64_bytes")]
    pub bytes: Vec<u8>,
}

/// Bytes as one standard base64 string (with padding) in JSON.
mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Any manifest file.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Manifest {
    Volume(VolumeManifest),
    Backup(BackupManifest),
}

/// A volume manifest without its chunk list: what finding a backup's volumes needs, in a few
/// dozen bytes instead of 33 per chunk (a repository of many backups can be searched without
/// holding every chunk list in memory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSummary {
    pub meta: VolumeMeta,
    pub size: u64,
    pub chunk_size: u32,
    pub created_unix_ms: u64,
}

/// Any manifest file, with volume manifests summarized.
#[derive(Clone, Debug, PartialEq)]
pub enum ManifestSummary {
    Volume(VolumeSummary),
    Backup(BackupManifest),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Volume,
    Backup,
}

/// Every field of either kind; `C` is how the chunk list is read (kept, or skipped).
#[derive(Deserialize)]
struct Any<C> {
    kind: Kind,
    meta: Option<VolumeMeta>,
    size: Option<u64>,
    chunk_size: Option<u32>,
    chunks: Option<C>,
    /// Format 2: the chunk list is not in the JSON but follows it as a binary zstd frame.
    chunk_count: Option<u64>,
    /// Format 3: the chunk list is in pages of this many entries; the binary frame lists them.
    page_chunks: Option<u32>,
    /// Format 3: how many pages the binary frame lists.
    pages: Option<u64>,
    backup: Option<String>,
    volumes: Option<Vec<ManifestId>>,
    #[serde(default)]
    cut: Option<serde_json::Value>,
    created_unix_ms: Option<u64>,
    #[serde(default)]
    artifacts: Option<Vec<BackupArtifact>>,
}

/// Where a volume manifest keeps its chunk list.
enum Chunks<C> {
    /// In the JSON (format 1), read as `C`.
    Inline(C),
    /// In the binary frame after the JSON (format 2): this many chunks.
    Binary(u64),
    /// In pages (format 3): the binary frame after the JSON lists `pages` page ids.
    Paged { count: u64, page_chunks: u32, pages: u64 },
}

/// A parsed manifest header: a volume's fields and where its chunk list is, or a backup
/// manifest.
enum Parsed<C> {
    Volume(VolumeSummary, Chunks<C>),
    Backup(BackupManifest),
}

/// Reads the same JSON as serde's internally tagged form, but straight into the fields: the
/// derived form first buffers the whole object as generic content (~130 bytes per chunk id, so
/// ~130 MB at the peak of loading a 4 GiB volume's manifest).
fn parse<'de, D: Deserializer<'de>, C: Deserialize<'de>>(d: D) -> Result<Parsed<C>, D::Error> {
    use serde::de::Error as _;
    let a = Any::<C>::deserialize(d)?;
    let created_unix_ms =
        a.created_unix_ms.ok_or_else(|| D::Error::missing_field("created_unix_ms"))?;
    Ok(match a.kind {
        Kind::Volume => Parsed::Volume(
            VolumeSummary {
                meta: a.meta.ok_or_else(|| D::Error::missing_field("meta"))?,
                size: a.size.ok_or_else(|| D::Error::missing_field("size"))?,
                chunk_size: a.chunk_size.ok_or_else(|| D::Error::missing_field("chunk_size"))?,
                created_unix_ms,
            },
            match (a.chunks, a.chunk_count) {
                (Some(inline), None) => Chunks::Inline(inline),
                (None, Some(count)) => match (a.page_chunks, a.pages) {
                    (Some(page_chunks), Some(pages)) => Chunks::Paged { count, page_chunks, pages },
                    (None, None) => Chunks::Binary(count),
                    _ => return Err(D::Error::custom("`page_chunks` without `pages` or back")),
                },
                (Some(_), Some(_)) => {
                    return Err(D::Error::custom("both `chunks` and `chunk_count`"));
                }
                (None, None) => return Err(D::Error::missing_field("chunks")),
            },
        ),
        Kind::Backup => Parsed::Backup(BackupManifest {
            backup: a.backup.ok_or_else(|| D::Error::missing_field("backup"))?,
            volumes: a.volumes.ok_or_else(|| D::Error::missing_field("volumes"))?,
            cut: a.cut.unwrap_or(serde_json::Value::Null),
            created_unix_ms,
            artifacts: a.artifacts.unwrap_or_default(),
        }),
    })
}

/// Reads a manifest header: the first zstd frame of the plaintext, JSON. Streamed, because a
/// format 1 volume manifest keeps its whole chunk list there (~67 bytes of text per chunk).
fn read_header<C: serde::de::DeserializeOwned>(frame: &[u8]) -> Result<Parsed<C>, String> {
    struct Header<C>(Parsed<C>);
    impl<'de, C: Deserialize<'de>> Deserialize<'de> for Header<C> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            parse(d).map(Header)
        }
    }
    let json = zstd::stream::read::Decoder::with_buffer(frame).map_err(|e| e.to_string())?;
    serde_json::from_reader::<_, Header<C>>(std::io::BufReader::with_capacity(1 << 16, json))
        .map(|h| h.0)
        .map_err(|e| e.to_string())
}

/// Splits a manifest's plaintext into its first zstd frame (the JSON header) and the rest (a
/// format 2 volume's chunk list, else nothing).
fn split_header(plain: &[u8]) -> Result<(&[u8], &[u8]), String> {
    let len = zstd::zstd_safe::find_frame_compressed_size(plain).map_err(|code| {
        format!("does not start with a zstd frame ({})", zstd::zstd_safe::get_error_name(code))
    })?;
    Ok(plain.split_at(len))
}

/// Decodes a manifest file's plaintext (the opened seal), either format.
pub(crate) fn decode_manifest(plain: &[u8]) -> Result<Manifest, String> {
    let (header, rest) = split_header(plain)?;
    let (v, chunks) = match read_header::<Vec<Option<ChunkId>>>(header)? {
        Parsed::Backup(b) => return no_trailing(rest).map(|()| Manifest::Backup(b)),
        Parsed::Volume(v, chunks) => (v, chunks),
    };
    let expected = expected_chunks(&v)?;
    let chunks = match chunks {
        Chunks::Inline(chunks) => {
            no_trailing(rest)?;
            if chunks.len() as u64 != expected {
                return Err(format!(
                    "lists {} chunks where a volume of {} bytes in chunks of {} has {expected}",
                    chunks.len(),
                    v.size,
                    v.chunk_size,
                ));
            }
            ChunkList::Flat(chunks)
        }
        // Checked before anything is allocated for it.
        Chunks::Binary(count) if count != expected => {
            return Err(format!("says {count} chunks where its size makes {expected}"));
        }
        Chunks::Binary(count) => ChunkList::Flat(read_chunk_list(rest, count)?),
        Chunks::Paged { count, .. } if count != expected => {
            return Err(format!("says {count} chunks where its size makes {expected}"));
        }
        Chunks::Paged { count, page_chunks, pages } => {
            if page_chunks == 0 || count.div_ceil(u64::from(page_chunks)) != pages {
                return Err(format!(
                    "lists {pages} pages where {count} chunks in pages of {page_chunks} make {}",
                    count.div_ceil(u64::from(page_chunks.max(1)))
                ));
            }
            ChunkList::Paged { page_chunks, pages: read_chunk_list(rest, pages)? }
        }
    };
    Ok(Manifest::Volume(VolumeManifest {
        meta: v.meta,
        size: v.size,
        chunk_size: v.chunk_size,
        chunks,
        created_unix_ms: v.created_unix_ms,
    }))
}

/// Decodes a manifest's plaintext without its chunk list: a format 2 volume manifest's list is
/// not even decompressed, a format 1 list is skipped as it is parsed.
pub(crate) fn decode_summary(plain: &[u8]) -> Result<ManifestSummary, String> {
    let (header, _) = split_header(plain)?;
    Ok(match read_header::<serde::de::IgnoredAny>(header)? {
        Parsed::Volume(v, _) => ManifestSummary::Volume(v),
        Parsed::Backup(b) => ManifestSummary::Backup(b),
    })
}

/// How many chunks a volume of this size has.
fn expected_chunks(v: &VolumeSummary) -> Result<u64, String> {
    if v.chunk_size == 0 {
        return Err("has a chunk size of 0".into());
    }
    Ok(v.size.div_ceil(u64::from(v.chunk_size)))
}

fn no_trailing(rest: &[u8]) -> Result<(), String> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("has {} unexpected bytes after its JSON", rest.len()))
    }
}

/// Reads a format 2 chunk list: one zstd frame holding a bitmap of `count` bits (bit `i % 8`
/// of byte `i / 8` set when chunk `i` holds data) and then the 32-byte id of every data chunk,
/// in order.
fn read_chunk_list(frame: &[u8], count: u64) -> Result<Vec<Option<ChunkId>>, String> {
    use std::io::Read;
    let count =
        usize::try_from(count).map_err(|_| format!("{count} chunks do not fit in memory"))?;
    let short = |e: std::io::Error| format!("chunk list cut short or damaged: {e}");
    let dec = zstd::stream::read::Decoder::with_buffer(frame).map_err(|e| e.to_string())?;
    let mut r = std::io::BufReader::with_capacity(1 << 16, dec);
    let mut bitmap = vec![0u8; count.div_ceil(8)];
    r.read_exact(&mut bitmap).map_err(short)?;
    let mut chunks = Vec::with_capacity(count);
    for i in 0..count {
        if bitmap[i / 8] & (1 << (i % 8)) == 0 {
            chunks.push(None);
        } else {
            let mut id = [0u8; 32];
            r.read_exact(&mut id).map_err(short)?;
            chunks.push(Some(ChunkId(id)));
        }
    }
    if r.read(&mut [0u8; 1]).map_err(short)? != 0 {
        return Err("chunk list has bytes after its last chunk".into());
    }
    Ok(chunks)
}

/// Encodes a manifest's plaintext, appended to `out`: format 2 for a volume (a small JSON
/// header frame, then the binary chunk list frame: 32 bytes per data chunk and a bit per chunk,
/// so loading a 4 GiB volume's list is a copy rather than parsing 70 MB of hex), JSON for a
/// backup manifest.
pub(crate) fn encode_manifest(manifest: &Manifest, out: Vec<u8>) -> Vec<u8> {
    use std::io::Write;
    const LEVEL: i32 = 3;
    let written = "writing to memory cannot fail";
    match manifest {
        Manifest::Backup(_) => {
            let mut enc = zstd::stream::write::Encoder::new(out, LEVEL).expect(written);
            serde_json::to_writer(&mut enc, manifest).expect("manifests serialize");
            enc.finish().expect(written)
        }
        Manifest::Volume(v) => {
            #[derive(Serialize)]
            struct Header<'a> {
                kind: &'static str,
                meta: &'a VolumeMeta,
                size: u64,
                chunk_size: u32,
                chunk_count: u64,
                #[serde(skip_serializing_if = "Option::is_none")]
                page_chunks: Option<u32>,
                #[serde(skip_serializing_if = "Option::is_none")]
                pages: Option<u64>,
                created_unix_ms: u64,
            }
            let (list, page_chunks, chunk_count) = match &v.chunks {
                ChunkList::Flat(chunks) => (chunks, None, chunks.len() as u64),
                ChunkList::Paged { page_chunks, pages } => {
                    (pages, Some(*page_chunks), v.chunk_count())
                }
            };
            let header = Header {
                kind: "volume",
                meta: &v.meta,
                size: v.size,
                chunk_size: v.chunk_size,
                chunk_count,
                page_chunks,
                pages: page_chunks.map(|_| list.len() as u64),
                created_unix_ms: v.created_unix_ms,
            };
            let mut enc = zstd::stream::write::Encoder::new(out, LEVEL).expect(written);
            serde_json::to_writer(&mut enc, &header).expect("manifests serialize");
            let out = enc.finish().expect(written);
            let mut bitmap = vec![0u8; list.len().div_ceil(8)];
            for (i, c) in list.iter().enumerate() {
                if c.is_some() {
                    bitmap[i / 8] |= 1 << (i % 8);
                }
            }
            let mut enc = zstd::stream::write::Encoder::new(out, LEVEL).expect(written);
            enc.write_all(&bitmap).expect(written);
            for id in list.iter().flatten() {
                enc.write_all(&id.0).expect(written);
            }
            enc.finish().expect(written)
        }
    }
}

#[cfg(test)]
mod tests;
