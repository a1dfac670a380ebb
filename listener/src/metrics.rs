//! The listener's Prometheus metrics: what its backups did, read from their records around
//! each coordinator step ([`Metrics::before`], [`Metrics::after`]), what the sweep's Status
//! calls found, and the certificates' expiry (read once at start). `core::metrics` serves the
//! registry. Labels are groups, servers, states and phases: never backup ids.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use stillpoint_proto as pb;

use crate::coordinator::Event;
use crate::model::{BackupRecord, Millis, ServerStep, State};
use stillpoint_core::tls::TlsFiles;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupState {
    group: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    server: String,
}

/// The backup's phases as the phase histogram names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Prepare sent, until every server is frozen (or the backup fails).
    Prepare,
    /// Commit sent, until every snapshot exists and (with the thaw barrier) every server thawed.
    Commit,
    /// From the snapshots until every copy (and the seal) is done.
    Copy,
    /// The last servers' cleanups, after every copy.
    Cleanup,
}

impl Phase {
    fn of(state: &State) -> Option<Phase> {
        match state {
            State::Preparing { .. } => Some(Phase::Prepare),
            State::Committing { .. } | State::Releasing { .. } => Some(Phase::Commit),
            State::Snapshotted { .. } | State::Copying { .. } | State::Sealing { .. } => {
                Some(Phase::Copy)
            }
            State::Cleaning { .. } => Some(Phase::Cleanup),
            State::Pending
            | State::Inspecting { .. }
            | State::Succeeded
            | State::Failed { .. }
            | State::Aborted { .. } => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Commit => "commit",
            Phase::Copy => "copy",
            Phase::Cleanup => "cleanup",
        }
    }

    /// When the phase began by the record's own timestamps (the first Prepare or Commit sent),
    /// for a backup this process took over mid-phase; the copy and cleanup have none.
    fn began(self, record: &BackupRecord) -> Option<Millis> {
        let first = |at: fn(&crate::model::ServerCut) -> Option<Millis>| {
            record.servers.iter().filter_map(|s| at(&s.cut)).min()
        };
        match self {
            Phase::Prepare => first(|c| c.prepare_sent),
            Phase::Commit => first(|c| c.commit_sent),
            Phase::Copy | Phase::Cleanup => None,
        }
    }
}

/// A backup's state before a step, and the copy the step reports (server, stored bytes) if
/// that server was copying.
pub struct Before {
    state: State,
    copied: Option<(String, Option<u64>)>,
}

/// What the metrics remember of one backup in flight: its phase and when it began.
struct InFlight {
    group: String,
    phase: Option<Phase>,
    since: Option<Millis>,
}

/// The listener's metric set; cheap to share (every metric is a handle on shared counters).
pub struct Metrics {
    registry: Arc<Registry>,
    backups: Family<GroupState, Counter>,
    running: Family<GroupLabel, Gauge>,
    phase_seconds: Family<PhaseLabel, Histogram>,
    freeze_window_seconds: Family<ServerLabel, Histogram>,
    copy_bytes: Family<ServerLabel, Counter>,
    stored_bytes: Family<ServerLabel, Counter>,
    last_success: Family<GroupLabel, Gauge>,
    agent_up: Family<ServerLabel, Gauge>,
    in_flight: Mutex<HashMap<String, InFlight>>,
}

/// Seconds, from a tenth of a second to about 3 hours: a prepare takes milliseconds to
/// seconds, a copy minutes to hours.
fn phase_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.1, 3.0, 12))
}

/// Seconds, from 5 ms to about 80 s: the freeze window is what the lease bounds.
fn freeze_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15))
}

impl Metrics {
    /// Registers every metric; `history` (the catalog's backups) gives each group its last
    /// success, so a restart does not reset it.
    pub fn new(tls: &TlsFiles, history: &[BackupRecord]) -> Metrics {
        let mut registry = Registry::default();
        stillpoint_core::metrics::register_build_info(&mut registry, env!("CARGO_PKG_VERSION"));
        stillpoint_core::metrics::register_certificate_expiry(
            &mut registry,
            &[("listener", &tls.cert), ("ca", &tls.ca)],
        );
        let metrics = Metrics {
            registry: Arc::new(Registry::default()),
            backups: Family::default(),
            running: Family::default(),
            phase_seconds: Family::new_with_constructor(phase_histogram),
            freeze_window_seconds: Family::new_with_constructor(freeze_histogram),
            copy_bytes: Family::default(),
            stored_bytes: Family::default(),
            last_success: Family::default(),
            agent_up: Family::default(),
            in_flight: Mutex::new(HashMap::new()),
        };
        registry.register(
            "stillpoint_backups",
            "Backups that ended, by group and final state (SUCCEEDED, FAILED, ABORTED)",
            metrics.backups.clone(),
        );
        registry.register(
            "stillpoint_backups_running",
            "Backups in flight (pending included), by group",
            metrics.running.clone(),
        );
        registry.register(
            "stillpoint_phase_seconds",
            "How long backups spent in each phase: prepare, commit, copy, cleanup",
            metrics.phase_seconds.clone(),
        );
        registry.register(
            "stillpoint_freeze_window_seconds",
            "How long each server was frozen for its snapshot, from the cut the agent reported",
            metrics.freeze_window_seconds.clone(),
        );
        registry.register(
            "stillpoint_copy_bytes",
            "Bytes of snapshots copied by copies that succeeded, by server",
            metrics.copy_bytes.clone(),
        );
        registry.register(
            "stillpoint_stored_bytes",
            "Bytes copies added to the saveset repository after dedup and compression, by server (saveset copies only)",
            metrics.stored_bytes.clone(),
        );
        registry.register(
            "stillpoint_last_success_timestamp_seconds",
            "When the group's last backup succeeded (Unix seconds); absent until one has",
            metrics.last_success.clone(),
        );
        registry.register(
            "stillpoint_agent_up",
            "1 if the server's agent answered the last sweep's Status call, else 0",
            metrics.agent_up.clone(),
        );
        for (group, at) in last_successes(history) {
            metrics.last_success.get_or_create(&GroupLabel { group }).set(at / 1000);
        }
        Metrics { registry: Arc::new(registry), ..metrics }
    }

    /// The registry the endpoint serves.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// What [`Metrics::after`] needs of a step, read before the coordinator handles `event`.
    pub fn before(&self, record: &BackupRecord, event: &Event) -> Before {
        let copied = match event {
            Event::Copied { server, result: Ok(done) } => record
                .servers
                .iter()
                .find(|s| s.server == *server && s.step == ServerStep::Copying)
                .map(|_| (server.clone(), done.stored_bytes)),
            _ => None,
        };
        Before { state: record.state.clone(), copied }
    }

    /// Takes in one coordinator step: `record` is the backup after it, at `now` on the
    /// listener's clock. Each backup is counted once, when it turns terminal.
    pub fn after(&self, before: Before, now: Millis, record: &BackupRecord) {
        if before.state.is_terminal() {
            // Late replies to an ended backup: nothing here changes what it did.
            return;
        }
        if let Some((server, stored)) = before.copied {
            self.copied(record, &server, stored);
        }
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let backup = in_flight.entry(record.id.clone()).or_insert_with(|| {
            self.running.get_or_create(&group(record)).inc();
            // Taken over mid-phase (a restart): that phase's start is the record's, if any.
            InFlight { group: record.group.clone(), phase: Phase::of(&before.state), since: None }
        });
        let now_phase = Phase::of(&record.state);
        if now_phase != backup.phase {
            if let Some(left) = backup.phase {
                if let Some(began) = backup.since.or_else(|| left.began(record)) {
                    let seconds = (now - began).max(0) as f64 / 1000.0;
                    let label = PhaseLabel { phase: left.label().into() };
                    self.phase_seconds.get_or_create(&label).observe(seconds);
                }
                if left == Phase::Commit {
                    self.freeze_windows(record);
                }
            }
            backup.phase = now_phase;
            backup.since = Some(now);
        }
        if record.state.is_terminal() {
            self.running.get_or_create(&GroupLabel { group: backup.group.clone() }).dec();
            in_flight.remove(&record.id);
            let state = record.state.name().to_string();
            self.backups.get_or_create(&GroupState { group: record.group.clone(), state }).inc();
            if record.state == State::Succeeded {
                let at = record.finished.unwrap_or(now) / 1000;
                self.last_success.get_or_create(&group(record)).set(at);
            }
        }
    }

    /// A server's copy succeeded (the coordinator took the report: the server is cleaning):
    /// its bytes, where the copier reported them.
    fn copied(&self, record: &BackupRecord, server: &str, stored: Option<u64>) {
        let Some(s) = record.servers.iter().find(|s| s.server == server) else { return };
        if s.step != ServerStep::Cleaning {
            return;
        }
        let label = ServerLabel { server: server.to_string() };
        if s.copied_bytes > 0 {
            self.copy_bytes.get_or_create(&label).inc_by(s.copied_bytes);
        }
        if let Some(stored) = stored {
            self.stored_bytes.get_or_create(&label).inc_by(stored);
        }
    }

    /// One observation per server whose snapshot was taken: how long it was frozen.
    fn freeze_windows(&self, record: &BackupRecord) {
        for s in record.servers.iter().filter(|s| s.cut.committed.is_some()) {
            let label = ServerLabel { server: s.server.clone() };
            self.freeze_window_seconds.get_or_create(&label).observe(s.cut.held_ms as f64 / 1000.0);
        }
    }

    /// Takes in what the sweep's Status calls found.
    pub fn agents(&self, agents: &[pb::AgentInfo]) {
        for agent in agents {
            let label = ServerLabel { server: agent.server.clone() };
            self.agent_up.get_or_create(&label).set(i64::from(agent.reachable));
        }
    }
}

fn group(record: &BackupRecord) -> GroupLabel {
    GroupLabel { group: record.group.clone() }
}

/// Each group's latest success in the catalog, in listener-clock milliseconds.
fn last_successes(history: &[BackupRecord]) -> HashMap<String, Millis> {
    let mut last = HashMap::new();
    for record in history.iter().filter(|r| r.state == State::Succeeded) {
        let Some(at) = record.finished else { continue };
        let entry = last.entry(record.group.clone()).or_insert(at);
        *entry = (*entry).max(at);
    }
    last
}

#[cfg(test)]
mod tests;
