//! The agent's Prometheus metrics, read from its machine around each input ([`Metrics::before`],
//! [`Metrics::after`]): freezes, freeze windows, lease expiries, the guardian's thaws, the
//! quiescers' and the provider's step durations; plus its copies' bytes and the certificates'
//! expiry (read once at start). `core::metrics` serves the registry. Labels are quiescer and
//! provider names and actions from the config: never backup ids.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use stillpoint_protocol::agent::{Agent, BackupId, Effect, Input, Phase, Released, Reply};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    /// `arm`, `freeze`, `check`, `snapshot`, `thaw`, `delete`.
    action: String,
    /// The quiescer's name, or the provider's kind.
    name: String,
}

/// The agent's metric set; every metric is a handle on shared counters.
pub struct Metrics {
    registry: Arc<Registry>,
    freezes: Counter,
    freeze_window_seconds: Histogram,
    lease_expiries: Counter,
    guardian_thaws: Counter,
    step_seconds: Family<StepLabel, Histogram>,
    copy_bytes_read: Counter,
    copy_bytes_stored: Counter,
}

/// The phases of the machine's backups before an input, and whether the input is the
/// guardian saying it already thawed.
pub struct Before {
    phases: HashMap<BackupId, Phase>,
    guardian_thawed: bool,
}

fn step_histogram() -> Histogram {
    // 1 ms to about 65 s: a freeze takes milliseconds, a database's quiesce seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    /// Registers every metric, with the expiry of each named certificate (`agent`, `ca`).
    pub fn new(certs: &[(&str, &Path)]) -> Metrics {
        let mut registry = Registry::default();
        stillpoint_core::metrics::register_build_info(&mut registry, env!("CARGO_PKG_VERSION"));
        stillpoint_core::metrics::register_certificate_expiry(&mut registry, certs);
        let metrics = Metrics {
            registry: Arc::new(Registry::default()),
            freezes: Counter::default(),
            // 5 ms to about 80 s: the lease bounds it.
            freeze_window_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            lease_expiries: Counter::default(),
            guardian_thaws: Counter::default(),
            step_seconds: Family::new_with_constructor(step_histogram),
            copy_bytes_read: Counter::default(),
            copy_bytes_stored: Counter::default(),
        };
        registry.register(
            "stillpoint_agent_freezes",
            "Backups this agent froze (every quiescer frozen)",
            metrics.freezes.clone(),
        );
        registry.register(
            "stillpoint_agent_freeze_window_seconds",
            "From the first freeze to the end of the thaw, as reported to the listener",
            metrics.freeze_window_seconds.clone(),
        );
        registry.register(
            "stillpoint_agent_lease_expiries",
            "Freezes the agent thawed because their lease ran out before Commit or Release",
            metrics.lease_expiries.clone(),
        );
        registry.register(
            "stillpoint_agent_guardian_thaws",
            "Freezes the guardian process had already thawed at the lease's end when the agent came to it",
            metrics.guardian_thaws.clone(),
        );
        registry.register(
            "stillpoint_agent_step_seconds",
            "How long each quiescer and provider step took (arm, freeze, check, snapshot, thaw, delete)",
            metrics.step_seconds.clone(),
        );
        registry.register(
            "stillpoint_agent_copy_read_bytes",
            "Bytes of snapshots this agent's saveset copies read",
            metrics.copy_bytes_read.clone(),
        );
        registry.register(
            "stillpoint_agent_copy_stored_bytes",
            "Bytes this agent's saveset copies added to the repository",
            metrics.copy_bytes_stored.clone(),
        );
        Metrics { registry: Arc::new(registry), ..metrics }
    }

    /// The registry the endpoint serves.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// What [`Metrics::after`] compares with: read just before `input` goes to the machine.
    pub fn before(&self, machine: &Agent, input: &Input) -> Before {
        Before {
            phases: phases(machine),
            guardian_thawed: matches!(input, Input::Released(Released::AlreadyThawed)),
        }
    }

    /// Takes in what one input did to the machine: phase changes, and the replies that
    /// ended an operation. A reply repeated for a retried request changes no phase and is
    /// not counted again.
    pub fn after(&self, before: Before, machine: &Agent, effects: &[Effect]) {
        if before.guardian_thawed {
            self.guardian_thaws.inc();
        }
        let after = phases(machine);
        let mut changed = false;
        let mut thawed = false;
        let mut unfrozen_by_lease = false;
        for (backup, now) in &after {
            let was = before.phases.get(backup).copied();
            if was == Some(*now) {
                continue;
            }
            changed = true;
            let was_frozen = matches!(was, Some(Phase::Frozen | Phase::Held));
            if was == Some(Phase::Preparing) && *now == Phase::Frozen {
                self.freezes.inc();
            }
            if was_frozen && *now == Phase::ThawedExpired {
                self.lease_expiries.inc();
            }
            if was_frozen && !matches!(now, Phase::Frozen | Phase::Held) {
                thawed = true;
                // Held until release, then thawed with no Release reply: the lease did it.
                unfrozen_by_lease = was == Some(Phase::Held)
                    && !effects
                        .iter()
                        .any(|e| matches!(e, Effect::Reply { reply: Reply::Release(_), .. }));
            }
        }
        if unfrozen_by_lease {
            self.lease_expiries.inc();
        }
        if !changed {
            return;
        }
        for effect in effects {
            let Effect::Reply { reply, .. } = effect else { continue };
            let (steps, held_ms) = match reply {
                Reply::Prepared(p) => (&p.steps, None),
                Reply::Committed(c) => {
                    (&c.steps, (c.committed && !c.still_held).then_some(c.held_ms))
                }
                Reply::Release(Ok(r)) => (&r.steps, Some(r.held_ms)),
                _ => continue,
            };
            for step in steps {
                let label = StepLabel { action: step.action.clone(), name: step.name.clone() };
                self.step_seconds.get_or_create(&label).observe(step.duration_ms as f64 / 1000.0);
            }
            if let Some(held_ms) = held_ms.filter(|_| thawed) {
                self.freeze_window_seconds.observe(held_ms as f64 / 1000.0);
            }
        }
    }

    /// A saveset copy on this agent finished.
    pub fn copied(&self, bytes_read: u64, bytes_stored: u64) {
        self.copy_bytes_read.inc_by(bytes_read);
        self.copy_bytes_stored.inc_by(bytes_stored);
    }
}

fn phases(machine: &Agent) -> HashMap<BackupId, Phase> {
    machine.status(0).into_iter().map(|s| (s.backup, s.phase)).collect()
}

#[cfg(test)]
mod tests;
