//! The saveset repository: encrypted, deduplicated, sparse block-level backups of volumes,
//! shared by many servers and backups, with verify and restore. Synchronous and local-directory
//! only; the listener's copy phase, S3 and the CLI wrap it. The on-disk format is in FORMAT.md.
//!
//! # Layout
//! - `repo.rs`: config and keys, crash-safe writes, the in-memory index, packs.
//! - `backup.rs`, `restore.rs`, `verify.rs`: the three operations on volumes.
//! - `manifest.rs`: ids and manifests (plain data); `crypto.rs`: KDF, sealing, chunk ids.

mod backup;
mod crypto;
mod error;
mod manifest;
mod repo;
mod restore;
mod verify;

pub use backup::{BackupStats, Progress, VolumeBackup};
pub use crypto::{KdfParams, Secret};
pub use error::{Error, Result};
pub use manifest::{
    BackupManifest, ChunkId, Manifest, ManifestId, PackId, VolumeManifest, VolumeMeta,
};
pub use repo::{InitOptions, Repository, FORMAT_VERSION};
pub use restore::RestoreStats;
pub use verify::{Damage, Report};
