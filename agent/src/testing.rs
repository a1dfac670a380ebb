//! Fakes for the plug-in traits, for tests here and in other crates (feature `testing`): a
//! quiescer and a snapshot provider that record every call in one shared log and can be told to
//! fail or to take their time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use stillpoint_proto::Snapshot;

use crate::guardian::Action;
use crate::quiesce::Quiescer;
use crate::snapshot::SnapshotProvider;

/// Calls in the order they happened, e.g. `"freeze app b1"`, `"thaw app b1"`, `"create b1"`.
#[derive(Clone, Default)]
pub struct Calls(Arc<Mutex<Vec<String>>>);

impl Calls {
    pub fn push(&self, call: String) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(call);
    }

    /// Every call so far.
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The calls whose text starts with `prefix`.
    pub fn starting(&self, prefix: &str) -> Vec<String> {
        self.all().into_iter().filter(|c| c.starts_with(prefix)).collect()
    }
}

/// What a fake does when called: wait `delay`, then fail with `fail` if set.
#[derive(Default)]
struct Behaviour {
    delay: Duration,
    fail: Option<String>,
}

impl Behaviour {
    fn act(cell: &Mutex<Behaviour>) -> anyhow::Result<()> {
        let (delay, fail) = {
            let b = cell.lock().unwrap_or_else(|p| p.into_inner());
            (b.delay, b.fail.clone())
        };
        std::thread::sleep(delay);
        match fail {
            Some(msg) => Err(anyhow!(msg)),
            None => Ok(()),
        }
    }
}

/// A quiescer that records calls; thaw is recorded every time it is called.
pub struct FakeQuiescer {
    name: String,
    calls: Calls,
    filesystem: bool,
    freeze: Mutex<Behaviour>,
    thaw: Mutex<Behaviour>,
    thaw_action: Mutex<Option<Action>>,
}

impl FakeQuiescer {
    pub fn new(name: &str, calls: &Calls) -> Arc<FakeQuiescer> {
        Arc::new(FakeQuiescer {
            name: name.into(),
            calls: calls.clone(),
            filesystem: false,
            freeze: Mutex::default(),
            thaw: Mutex::default(),
            thaw_action: Mutex::default(),
        })
    }

    /// Like `new`, but counts as a filesystem freeze (its time is `freeze_ms`).
    pub fn filesystem(name: &str, calls: &Calls) -> Arc<FakeQuiescer> {
        Arc::new(FakeQuiescer {
            name: name.into(),
            calls: calls.clone(),
            filesystem: true,
            freeze: Mutex::default(),
            thaw: Mutex::default(),
            thaw_action: Mutex::default(),
        })
    }

    pub fn fail_freeze(&self, msg: Option<&str>) {
        self.freeze.lock().unwrap_or_else(|p| p.into_inner()).fail = msg.map(Into::into);
    }

    pub fn fail_thaw(&self, msg: Option<&str>) {
        self.thaw.lock().unwrap_or_else(|p| p.into_inner()).fail = msg.map(Into::into);
    }

    /// What `thaw_action` hands the guardian (default none).
    pub fn set_thaw_action(&self, action: Option<Action>) {
        *self.thaw_action.lock().unwrap_or_else(|p| p.into_inner()) = action;
    }

    pub fn freeze_delay(&self, delay: Duration) {
        self.freeze.lock().unwrap_or_else(|p| p.into_inner()).delay = delay;
    }
}

impl Quiescer for FakeQuiescer {
    fn name(&self) -> &str {
        &self.name
    }

    fn hold(&self) -> crate::quiesce::Hold {
        if self.filesystem {
            crate::quiesce::Hold::FilesystemFreeze
        } else {
            crate::quiesce::Hold::HookUnverified
        }
    }

    fn freezes_filesystem(&self) -> bool {
        self.filesystem
    }

    fn freeze(&self, backup_id: &str) -> anyhow::Result<String> {
        self.calls.push(format!("freeze {} {backup_id}", self.name));
        Behaviour::act(&self.freeze)?;
        Ok(format!("{} frozen", self.name))
    }

    fn thaw(&self, backup_id: &str) -> anyhow::Result<()> {
        self.calls.push(format!("thaw {} {backup_id}", self.name));
        Behaviour::act(&self.thaw)
    }

    fn thaw_action(&self, _backup_id: &str) -> anyhow::Result<Option<Action>> {
        Ok(self.thaw_action.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A provider that keeps snapshots in memory. With `fail_create` set it snapshots the first
/// volume and then fails, to leave a partial snapshot behind.
pub struct FakeProvider {
    calls: Calls,
    snapshots: Mutex<BTreeMap<String, Vec<Snapshot>>>,
    create: Mutex<Behaviour>,
    delete: Mutex<Behaviour>,
}

impl FakeProvider {
    pub fn new(calls: &Calls) -> Arc<FakeProvider> {
        Arc::new(FakeProvider {
            calls: calls.clone(),
            snapshots: Mutex::default(),
            create: Mutex::default(),
            delete: Mutex::default(),
        })
    }

    pub fn fail_create(&self, msg: Option<&str>) {
        self.create.lock().unwrap_or_else(|p| p.into_inner()).fail = msg.map(Into::into);
    }

    pub fn create_delay(&self, delay: Duration) {
        self.create.lock().unwrap_or_else(|p| p.into_inner()).delay = delay;
    }

    pub fn fail_delete(&self, msg: Option<&str>) {
        self.delete.lock().unwrap_or_else(|p| p.into_inner()).fail = msg.map(Into::into);
    }

    pub fn delete_delay(&self, delay: Duration) {
        self.delete.lock().unwrap_or_else(|p| p.into_inner()).delay = delay;
    }

    /// Snapshots held now, by backup.
    pub fn held(&self) -> BTreeMap<String, Vec<Snapshot>> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn fake_snapshot(backup_id: &str, volume: &str) -> Snapshot {
    Snapshot {
        volume: volume.into(),
        provider: "fake".into(),
        locator: format!("fake://{backup_id}/{volume}"),
        size_bytes: 1024,
    }
}

impl SnapshotProvider for FakeProvider {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn create(&self, backup_id: &str, volumes: &[String]) -> anyhow::Result<Vec<Snapshot>> {
        self.calls.push(format!("create {backup_id}"));
        let result = Behaviour::act(&self.create);
        let mut held = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let snaps = held.entry(backup_id.to_string()).or_default();
        let upto = if result.is_err() { volumes.len().min(1) } else { volumes.len() };
        for volume in &volumes[..upto] {
            if !snaps.iter().any(|s| &s.volume == volume) {
                snaps.push(fake_snapshot(backup_id, volume));
            }
        }
        result.map(|()| snaps.clone())
    }

    fn delete(&self, backup_id: &str) -> anyhow::Result<u32> {
        self.calls.push(format!("delete {backup_id}"));
        Behaviour::act(&self.delete)?;
        let removed = self.snapshots.lock().unwrap_or_else(|p| p.into_inner()).remove(backup_id);
        Ok(removed.map_or(0, |s| u32::try_from(s.len()).unwrap_or(u32::MAX)))
    }

    fn list(&self) -> anyhow::Result<Vec<(String, Snapshot)>> {
        Ok(self
            .held()
            .into_iter()
            .flat_map(|(b, snaps)| snaps.into_iter().map(move |s| (b.clone(), s)))
            .collect())
    }
}
