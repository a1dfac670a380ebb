//! Snapshot providers: the storage back ends that take, list and delete point-in-time copies of
//! this server's volumes. One file per back end; they know nothing of leases or quiescers.

use std::sync::Arc;

use stillpoint_proto::Snapshot;

use crate::config::{Config, SnapshotConfig};
use crate::Result;

pub mod btrfs;
pub mod lvm;
pub mod mock_san;

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

/// Builds the configured provider.
pub fn build(config: &Config) -> Result<Arc<dyn SnapshotProvider>> {
    Ok(match &config.snapshot {
        SnapshotConfig::MockSan { array, snapshot_delay_ms } => Arc::new(
            mock_san::MockSan::open(array, &config.server)?
                .with_delay(std::time::Duration::from_millis(*snapshot_delay_ms)),
        ),
        SnapshotConfig::Btrfs { snapshot_dir } => Arc::new(btrfs::Btrfs::new(snapshot_dir.clone())),
        SnapshotConfig::Lvm(lvm) => Arc::new(
            lvm::Lvm::new(lvm, &config.volumes)
                .map_err(|e| crate::Error::Setup(format!("snapshot: {e:#}")))?,
        ),
    })
}
