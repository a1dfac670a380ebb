//! Every provider, all or nothing: a `create` that fails part-way deletes the snapshots it made
//! for that backup before it returns the error. The agent's machine sends a Delete after a
//! failed snapshot too, but that Delete never comes if the agent dies first; this layer does
//! the same inside the one call, so no provider has to remember.

use std::sync::Arc;

use anyhow::anyhow;

use stillpoint_proto::Snapshot;
use tracing::warn;

use super::SnapshotProvider;

/// Wraps `inner` so that a failed `create` leaves nothing of that backup behind.
pub fn all_or_nothing(inner: Arc<dyn SnapshotProvider>) -> Arc<dyn SnapshotProvider> {
    Arc::new(AllOrNothing(inner))
}

struct AllOrNothing(Arc<dyn SnapshotProvider>);

impl SnapshotProvider for AllOrNothing {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn check(&self, volumes: &[String]) -> anyhow::Result<String> {
        self.0.check(volumes)
    }

    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>> {
        let err = match self.0.create(backup_id, volumes) {
            Ok(snapshots) => return Ok(snapshots),
            Err(e) => e,
        };
        match self.0.delete(backup_id) {
            Ok(0) => Err(anyhow!("{err:#}; no snapshot of this backup was left")),
            Ok(n) => Err(anyhow!(
                "{err:#}; deleted the {n} snapshot(s) of this backup made before the failure"
            )),
            Err(d) => {
                warn!(backup = backup_id, error = %format!("{d:#}"), "deleting a failed snapshot's partial snapshots failed");
                Err(anyhow!(
                    "{err:#}; deleting the snapshots made before the failure failed too ({d:#}); the agent's Delete or the listener's sweep will try again"
                ))
            }
        }
    }

    fn delete(&self, backup_id: &str) -> anyhow::Result<u32> {
        self.0.delete(backup_id)
    }

    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
        self.0.list()
    }
}

#[cfg(test)]
mod tests;
