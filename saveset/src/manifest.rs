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
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Manifest {
    Volume(VolumeManifest),
    Backup(BackupManifest),
}
