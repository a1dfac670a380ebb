//! The saveset repository: encrypted, deduplicated, sparse block-level backups of volumes,
//! shared by many servers and backups, with verify and restore, in a local directory or on
//! S3-compatible storage. Synchronous (S3 runs on a private runtime); the listener's copy phase
//! and the CLI wrap it. The format is in FORMAT.md.
//!
//! # Layout
//! - `storage.rs`: the `Storage` seam (atomic put, ranged get, list) and its local and S3 sides.
//! - `repo.rs`: config and keys, the in-memory index, packs.
//! - `backup.rs`, `restore.rs`, `verify.rs`: the three operations on volumes.
//! - `changes.rs`: change maps (from FIEMAP, or a provider's); `base.rs`: the copier's kept base
//!   per volume, or the record of a base a provider keeps (qcow2).
//! - `prune.rs` (`prune/`): freeing what no manifest references; `lock.rs`: writer locks.
//! - `manifest.rs`: ids and manifests (plain data); `crypto.rs`: KDF, sealing, chunk ids.

mod backup;
mod base;
mod catalog;
mod changes;
mod chunklist;
mod claims;
mod crypto;
mod direct;
mod error;
mod forget;
mod index;
mod jobs;
mod lock;
mod manifest;
mod pages;
mod pool;
mod prune;
mod repo;
mod restore;
mod storage;
mod verify;

pub use backup::{BackupStats, Parent, Progress, VolumeBackup, DEFAULT_SAMPLE_PERCENT};
pub use base::{BaseKey, BaseStore, Parents, RecordedBase};
pub use catalog::CatalogHeader;
pub use changes::{changes_between, failpoint, ChangeMap, MapSource, DROP_RANGE, FAILPOINT_ENV};
pub use crypto::{KdfParams, Secret};
pub use error::{Error, Result};
pub use forget::Forgotten;
pub use index::DEFAULT_MEMORY_BUDGET;
pub use manifest::{
    BackupArtifact, BackupManifest, CatalogId, ChunkId, ChunkList, Manifest, ManifestId,
    ManifestSummary, PackId, VolumeManifest, VolumeMeta, VolumeSummary,
};
pub use pool::{secret_from_files, Pool, SecretFileError};
pub use prune::{PruneOptions, PruneReport};
pub use repo::{memory_budget_from_mib, InitOptions, OpenOptions, Repository, FORMAT_VERSION};
pub use restore::{RestoreProgress, RestoreStats};
pub use storage::{Location, S3Location, Storage};
pub use verify::{Damage, Report, VerifyProgress};
