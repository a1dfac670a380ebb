//! The fsfreeze quiescer: FIFREEZE on a mounted filesystem so its on-disk state is consistent
//! and no write reaches it until FITHAW. It remembers whether the freeze is its own and never
//! thaws one another process made.

use std::fs::File;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{anyhow, Context};
use stillpoint_core::sys;

use super::Quiescer;
use crate::guardian::Action;

/// Freezes the filesystem mounted at `mount`.
pub struct FsFreeze {
    name: String,
    mount: PathBuf,
    /// The directory we froze through, while the freeze is ours.
    ours: Mutex<Option<File>>,
}

impl FsFreeze {
    pub fn new(name: String, mount: PathBuf) -> FsFreeze {
        FsFreeze { name, mount, ours: Mutex::new(None) }
    }
}

impl Quiescer for FsFreeze {
    fn name(&self) -> &str {
        &self.name
    }

    fn hold(&self) -> super::Hold {
        super::Hold::FilesystemFreeze
    }

    fn freezes_filesystem(&self) -> bool {
        true
    }

    fn freeze(&self, _backup_id: &str) -> anyhow::Result<String> {
        let mount = self.mount.display();
        let mut ours = self.ours.lock().unwrap_or_else(|p| p.into_inner());
        if ours.is_some() {
            return Ok(format!("{mount} already frozen by stillpoint"));
        }
        let dir = File::open(&self.mount).with_context(|| format!("freeze {mount}: open"))?;
        match sys::freeze(&dir) {
            Ok(()) => {
                *ours = Some(dir);
                Ok(format!("froze {mount}"))
            }
            Err(e) if e.kind() == ErrorKind::ResourceBusy => Err(anyhow!(
                "freeze {mount}: already frozen by another process; stillpoint did not touch it"
            )),
            Err(e) => Err(anyhow!("freeze {mount}: {e}")),
        }
    }

    fn thaw(&self, _backup_id: &str) -> anyhow::Result<()> {
        let mut ours = self.ours.lock().unwrap_or_else(|p| p.into_inner());
        let Some(dir) = ours.as_ref() else { return Ok(()) };
        match sys::thaw(dir) {
            // EINVAL: someone else thawed it already; either way it is no longer frozen.
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::InvalidInput => {}
            Err(e) => return Err(anyhow!("thaw {}: {e}", self.mount.display())),
        }
        *ours = None;
        Ok(())
    }

    fn thaw_action(&self, _backup_id: &str) -> anyhow::Result<Option<Action>> {
        Ok(Some(Action::Fithaw { mount: self.mount.clone() }))
    }

    fn thawed_elsewhere(&self, _backup_id: &str) -> anyhow::Result<()> {
        *self.ours.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }
}
