//! Quiescers: what makes one application (or filesystem) safe to snapshot and lets it go again.
//! One file per kind; the operations in `backups` call them in config order and thaw in reverse.

use std::sync::Arc;

use crate::config::{Config, QuiescerConfig};
use crate::guardian::Action;
pub use stillpoint_protocol::hold::Hold;
pub use stillpoint_protocol::model::Artifact;

pub mod credentials;
pub mod exec;
pub mod fsfreeze;
pub mod mysql;
pub mod postgres;
pub mod process;
pub mod procs;
pub mod redis;
pub mod sqlite;
pub mod stop;

/// Makes one application or filesystem hold still for a snapshot.
///
/// Contract: methods are synchronous and may block (the caller runs them on a blocking thread);
/// `freeze` returns only once the thing is quiesced, with a one-line detail for the step report,
/// or an error saying what failed (the caller adds which quiescer). `thaw` undoes this
/// quiescer's own `freeze` for that backup and must be safe to call again, after a failed
/// `freeze` or with nothing frozen: then it does nothing and returns `Ok`. A quiescer never thaws
/// what another process froze, and never writes into a filesystem it has frozen.
pub trait Quiescer: Send + Sync {
    /// The name used in step reports and failure reasons, unique within one agent.
    fn name(&self) -> &str;
    /// True when `freeze` stops a filesystem's writes (its time counts as `freeze_ms`).
    fn freezes_filesystem(&self) -> bool {
        false
    }
    /// What this quiescer's freeze holds, as stillpoint can know it: reported per server beside
    /// the cut, and checked against a group's requirement before anything freezes.
    fn hold(&self) -> Hold;
    fn freeze(&self, backup_id: &str) -> anyhow::Result<String>;
    fn thaw(&self, backup_id: &str) -> anyhow::Result<()>;
    /// What the guardian must do to undo this quiescer's freeze for `backup_id` if the agent
    /// cannot; asked just before `freeze` (an error refuses the freeze). `None`: nothing to undo.
    fn thaw_action(&self, _backup_id: &str) -> anyhow::Result<Option<Action>> {
        Ok(None)
    }
    /// The guardian (or a restarted agent) already ran this quiescer's thaw action for
    /// `backup_id`: forget the freeze without undoing it again. An error says what that undo
    /// cost the backup (a backup label lost with the connection), and fails the thaw step.
    fn thawed_elsewhere(&self, _backup_id: &str) -> anyhow::Result<()> {
        Ok(())
    }
    /// Files a restore of `backup_id` needs that this quiescer's freeze or thaw produced (a
    /// backup label), handed over once after a successful `thaw`; later calls return nothing.
    fn artifacts(&self, _backup_id: &str) -> Vec<Artifact> {
        Vec::new()
    }
}

/// Builds the configured quiescers, in config order. `agent_exe` is the agent's own executable,
/// which runs the helper processes some quiescers need (`hold-sqlite`).
pub fn build(config: &Config, agent_exe: &std::path::Path) -> Vec<Arc<dyn Quiescer>> {
    config
        .quiescers
        .iter()
        .map(|q| -> Arc<dyn Quiescer> {
            match q {
                QuiescerConfig::Exec { name, pre_freeze, post_thaw, timeout_ms, artifacts_dir } => {
                    Arc::new(
                        exec::Exec::new(
                            name.clone(),
                            &config.server,
                            pre_freeze.clone(),
                            post_thaw.clone(),
                            std::time::Duration::from_millis(*timeout_ms),
                        )
                        .with_artifacts_dir(artifacts_dir.clone()),
                    )
                }
                QuiescerConfig::Fsfreeze { mount } => {
                    Arc::new(fsfreeze::FsFreeze::new(q.name(), mount.clone()))
                }
                QuiescerConfig::Stop { name, pidfile } => {
                    Arc::new(stop::Stop::new(name.clone(), pidfile.clone()))
                }
                QuiescerConfig::Postgres(pg) => Arc::new(postgres::Postgres::new(pg.clone())),
                QuiescerConfig::Sqlite(c) => Arc::new(sqlite::Sqlite::new(c, agent_exe.into())),
                QuiescerConfig::Process(c) => {
                    Arc::new(process::Process::new(c.clone(), &config.server))
                }
                QuiescerConfig::Mysql(c) => Arc::new(self::mysql::Mysql::new(c.clone())),
                QuiescerConfig::Redis(c) => Arc::new(self::redis::Redis::new(c.clone())),
            }
        })
        .collect()
}

/// What an agent with these quiescers holds: the strongest of them, or storage-only with none.
pub fn hold_of(quiescers: &[Arc<dyn Quiescer>]) -> Hold {
    Hold::strongest(quiescers.iter().map(|q| q.hold()))
}
