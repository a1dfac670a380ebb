//! Snapshot providers: the storage back ends that take, list and delete point-in-time copies of
//! this server's volumes. One file per back end; they know nothing of leases or quiescers.

use std::sync::Arc;

use stillpoint_proto::Snapshot;

use crate::config::{Config, SnapshotConfig};
use crate::Result;

mod all_or_nothing;
pub mod btrfs;
pub mod lvm;
pub mod mock_san;
pub mod qcow2;
pub mod reflink;
#[cfg(windows)]
pub mod vss;
pub mod zfs;

pub use all_or_nothing::all_or_nothing;

/// Takes and removes point-in-time copies of volumes, named by backup id.
///
/// Contract: methods are synchronous and may block (the caller runs them on a blocking thread).
/// `create` snapshots every volume for the backup and is idempotent: a snapshot that already
/// exists for that backup is returned as it is, never retaken. `delete` removes every snapshot
/// of the backup and returns how many went; deleting what is not there deletes nothing, so it is
/// safe to repeat. A provider never writes into a filesystem that a quiescer has frozen.
pub trait SnapshotProvider: Send + Sync {
    /// The provider kind reported in each `Snapshot`, e.g. "mock-san".
    fn kind(&self) -> &'static str;
    /// Whether a snapshot of every volume can be taken now (room in the volume group, a thin
    /// pool below its limit), asked before anything freezes: Ok with a one-line detail for the
    /// step report (empty: nothing to report), or Err saying what does not fit and what to do.
    fn check(&self, _volumes: &[String]) -> anyhow::Result<String> {
        Ok(String::new())
    }
    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>>;
    fn delete(&self, backup_id: &str) -> anyhow::Result<u32>;
    /// Every snapshot this provider holds for this server, with its backup id.
    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>>;
}

/// The file name a volume's snapshot is named by (btrfs, reflink, qcow2), checked as a name.
pub(crate) fn basename(volume: &str) -> anyhow::Result<&str> {
    let base = std::path::Path::new(volume)
        .file_name()
        .and_then(|b| b.to_str())
        .ok_or_else(|| anyhow::anyhow!("volume {volume}: has no basename"))?;
    stillpoint_core::validate_name("volume basename", base)?;
    Ok(base)
}

/// Builds the configured provider, all or nothing: a `create` failing part-way deletes what it
/// made before returning the error (`all_or_nothing.rs`).
pub fn build(config: &Config) -> Result<Arc<dyn SnapshotProvider>> {
    Ok(all_or_nothing(match &config.snapshot {
        SnapshotConfig::MockSan { array, snapshot_delay_ms } => Arc::new(
            mock_san::MockSan::open(array, &config.server)?
                .with_delay(std::time::Duration::from_millis(*snapshot_delay_ms)),
        ),
        SnapshotConfig::Btrfs { snapshot_dir } => Arc::new(btrfs::Btrfs::new(snapshot_dir.clone())),
        SnapshotConfig::Reflink(c) => Arc::new(reflink::Reflink::new(c)),
        SnapshotConfig::Zfs(c) => Arc::new(zfs::Zfs::new(c, &config.volumes)),
        SnapshotConfig::Qcow2(c) => Arc::new(qcow2::Qcow2::new(c, &config.volumes)),
        #[cfg(windows)]
        SnapshotConfig::Vss(c) => Arc::new(vss::Vss::new(c)),
        SnapshotConfig::Lvm(lvm) => Arc::new(
            lvm::Lvm::new(lvm, &config.volumes)
                .map_err(|e| crate::Error::Setup(format!("snapshot: {e:#}")))?,
        ),
    }))
}
