//! The mock SAN provider: snapshots this server's LUNs in a `stillpoint_core::san::Array`, by
//! reflink clone only (an array that cannot clone is refused when the provider is built). The
//! volume is the LUN name and the locator is the snapshot file's path. An optional delay before
//! each snapshot plays a slow array (a test and demo knob).

use std::path::Path;

use anyhow::Context;
use stillpoint_core::san::Array;
use stillpoint_proto::Snapshot;

use super::SnapshotProvider;

const KIND: &str = "mock-san";

/// One server's view of a mock SAN array.
pub struct MockSan {
    array: Array,
    server: String,
    delay: std::time::Duration,
}

impl MockSan {
    /// Opens the array and checks it can clone, so an agent on an array whose snapshots would
    /// copy the LUNs inside the freeze refuses to start instead of failing every backup.
    pub fn open(root: &Path, server: &str) -> crate::Result<MockSan> {
        let array = Array::open(root)?;
        array.check_clones()?;
        Ok(MockSan { array, server: server.to_string(), delay: std::time::Duration::ZERO })
    }

    /// Sleeps `delay` before creating each snapshot.
    pub fn with_delay(mut self, delay: std::time::Duration) -> MockSan {
        self.delay = delay;
        self
    }
}

impl SnapshotProvider for MockSan {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>> {
        volumes
            .iter()
            .map(|lun| {
                std::thread::sleep(self.delay);
                let snap = self
                    .array
                    .snapshot(backup_id, &self.server, lun)
                    .with_context(|| format!("snapshot LUN {}/{lun}", self.server))?;
                Ok(Snapshot {
                    volume: lun.clone(),
                    provider: KIND.into(),
                    locator: snap.path.display().to_string(),
                    size_bytes: snap.size_bytes,
                })
            })
            .collect()
    }

    fn delete(&self, backup_id: &str) -> anyhow::Result<u32> {
        self.array
            .delete_snapshots(backup_id, &self.server)
            .with_context(|| format!("delete snapshots of backup {backup_id}"))
    }

    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
        let snaps = self.array.snapshots(None).context("list snapshots")?;
        Ok(snaps
            .into_iter()
            .filter(|s| s.server == self.server)
            .map(|s| {
                let snap = Snapshot {
                    volume: s.lun,
                    provider: KIND.into(),
                    locator: s.path.display().to_string(),
                    size_bytes: s.size_bytes,
                };
                (s.backup_id, snap)
            })
            .collect())
    }
}
