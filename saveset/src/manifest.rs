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
    /// One entry per chunk, in order; `None` is a hole (unallocated or all zeros).
    pub chunks: Vec<Option<ChunkId>>,
    /// When the backup of this volume finished, in Unix milliseconds.
    pub created_unix_ms: u64,
}

impl VolumeManifest {
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
    backup: Option<String>,
    volumes: Option<Vec<ManifestId>>,
    #[serde(default)]
    cut: Option<serde_json::Value>,
    created_unix_ms: Option<u64>,
}

/// A parsed manifest: a volume's fields with its chunk list as `C`, or a backup manifest.
enum Parsed<C> {
    Volume(VolumeSummary, C),
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
            a.chunks.ok_or_else(|| D::Error::missing_field("chunks"))?,
        ),
        Kind::Backup => Parsed::Backup(BackupManifest {
            backup: a.backup.ok_or_else(|| D::Error::missing_field("backup"))?,
            volumes: a.volumes.ok_or_else(|| D::Error::missing_field("volumes"))?,
            cut: a.cut.unwrap_or(serde_json::Value::Null),
            created_unix_ms,
        }),
    })
}

impl<'de> Deserialize<'de> for Manifest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match parse::<D, Vec<Option<ChunkId>>>(d)? {
            Parsed::Volume(v, chunks) => Manifest::Volume(VolumeManifest {
                meta: v.meta,
                size: v.size,
                chunk_size: v.chunk_size,
                chunks,
                created_unix_ms: v.created_unix_ms,
            }),
            Parsed::Backup(b) => Manifest::Backup(b),
        })
    }
}

impl<'de> Deserialize<'de> for ManifestSummary {
    /// Skips the chunk list as it reads it: nothing of it is kept.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match parse::<D, serde::de::IgnoredAny>(d)? {
            Parsed::Volume(v, _) => ManifestSummary::Volume(v),
            Parsed::Backup(b) => ManifestSummary::Backup(b),
        })
    }
}
