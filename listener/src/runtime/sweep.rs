//! The sweep, at start and then every `sweep_interval_ms`: asks every agent what it still holds
//! (frozen, or snapshots) and aborts what this listener made and no longer runs: snapshots
//! orphaned by a crash of either side, a lost Cleanup, an abort that was never delivered. What
//! this listener's catalog does not know (another listener's backups, or older than this
//! catalog) is reported once and left alone. The record of a swept backup says what was done.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stillpoint_proto as pb;

use crate::coordinator::{AbortOutcome, Coordinator, Event};
use crate::error::Result;

use super::Runtime;

/// What the sweep remembers between rounds.
#[derive(Default)]
pub struct Sweep {
    /// Leftovers not ours, already reported: (backup, server).
    reported: Mutex<HashSet<(String, String)>>,
}

impl Runtime {
    /// Sweeps now, then every `sweep_interval_ms`, until the runtime stops.
    pub fn spawn_sweeper(self: &Arc<Self>) {
        let this = Arc::clone(self);
        let every = Duration::from_millis(self.config.timeouts.sweep_interval_ms);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = this.sweep() => {}
                    () = stop.cancelled() => return,
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = stop.cancelled() => return,
                }
            }
        });
    }

    /// One sweep over every agent; returns how many leftovers were aborted.
    pub async fn sweep(self: &Arc<Self>) -> usize {
        let mut swept = 0;
        let agents = self.agents.status().await;
        self.metrics.agents(&agents);
        for agent in agents {
            for held in agent.backups {
                let id = held.backup_id.as_str();
                let holds = matches!(held.phase(), pb::AgentPhase::Frozen | pb::AgentPhase::Orphan)
                    || !held.snapshots.is_empty();
                if !holds || self.runs.contains(id) {
                    continue;
                }
                match self.store.knows(id) {
                    Ok(true) => {}
                    Ok(false) => {
                        self.report_stranger(
                            id,
                            &agent.server,
                            held.phase().label(),
                            held.snapshots.len(),
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(backup = %id, error = %e, "sweep: cannot tell whose leftover this is; left alone");
                        continue;
                    }
                }
                let reason = "swept: this backup ended and its listener no longer runs it";
                match self.agents.abort(id, &agent.server, reason).await {
                    Ok(outcome) => {
                        swept += 1;
                        if let Err(e) = self.record_sweep(id, &agent.server, outcome).await {
                            tracing::error!(backup = %id, server = %agent.server, error = %e, "could not record the sweep");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(backup = %id, server = %agent.server, error = %e, "sweep abort failed; will retry next sweep")
                    }
                }
            }
        }
        swept
    }

    /// Once per leftover: what an agent holds for a backup this catalog does not know.
    fn report_stranger(&self, id: &str, server: &str, phase: &str, snapshots: usize) {
        let key = (id.to_string(), server.to_string());
        let new = self.sweep.reported.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
        if new {
            tracing::warn!(
                backup = %id,
                server,
                phase,
                snapshots,
                "leftover held by another listener or made before this catalog; left alone"
            );
        }
    }

    /// The swept server's step in the backup's record: what the agent said it thawed and
    /// deleted, saved with a log line.
    async fn record_sweep(&self, id: &str, server: &str, outcome: AbortOutcome) -> Result<()> {
        let record = self.store.get(id)?;
        let mut coordinator = Coordinator::new(record, self.config.timeouts.protocol());
        let commands =
            coordinator.handle(self.clock.now(), Event::Swept { server: server.into(), outcome });
        if self.save_decision(&coordinator.record, &commands).await {
            Ok(())
        } else {
            Err(crate::error::Error::Store {
                path: "catalog".into(),
                reason: "the sweep's result was not saved".into(),
            })
        }
    }
}
