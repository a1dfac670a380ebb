//! Forgetting a backup: deleting its backup manifest, then its volume manifests, so a
//! repository interrupted midway never holds a backup manifest naming a missing volume. The
//! packs stay until a prune finds nothing references their chunks (not done here).

use crate::error::{Error, Result};
use crate::manifest::{ManifestId, ManifestSummary};
use crate::repo::Repository;

/// What [`Repository::forget_backup`] deleted and what it could not read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forgotten {
    pub backup_manifests: Vec<ManifestId>,
    pub volume_manifests: Vec<ManifestId>,
    /// Manifests that did not decrypt or parse: not known to be this backup's, left alone.
    pub unreadable: Vec<ManifestId>,
}

impl Repository {
    /// Deletes every manifest of backup `backup` (the listener's id): its backup manifests
    /// first, then the volume manifests whose `meta.backup` names it. Safe to repeat: a second
    /// call finds nothing. A backup with no manifest (never copied here) forgets nothing.
    pub fn forget_backup(&self, backup: &str) -> Result<Forgotten> {
        let mut out = Forgotten::default();
        for id in self.list_manifests()? {
            match self.load_summary(id) {
                Ok(ManifestSummary::Backup(m)) if m.backup == backup => {
                    out.backup_manifests.push(id)
                }
                Ok(ManifestSummary::Volume(v)) if v.meta.backup == backup => {
                    out.volume_manifests.push(id)
                }
                Ok(_) => {}
                // Deleted meanwhile (a concurrent forget of the same backup): nothing to do.
                Err(Error::UnknownManifest { .. }) => {}
                Err(Error::Damaged { .. }) => out.unreadable.push(id),
                Err(e) => return Err(e),
            }
        }
        // The backup manifest names the volumes: it goes first, so no restore can find a
        // backup whose volumes are half gone.
        for id in out.backup_manifests.iter().chain(&out.volume_manifests) {
            self.storage().delete(&format!("manifests/{id}"))?;
        }
        Ok(out)
    }
}
