//! The agent's metrics as its table runs real operations over the fakes: a freeze counted once
//! however often the listener retries, its window as reported, and a lease's expiry.

use std::sync::Arc;
use std::time::Duration;

use stillpoint_core::testing::Exposition;
use stillpoint_protocol::hold::Hold;

use crate::armed::Armed;
use crate::backups::Backups;
use crate::guardian::link::Program;
use crate::journal::Journal;
use crate::quiesce::Quiescer;
use crate::testing::{Calls, FakeProvider, FakeQuiescer};

use super::*;

/// A table over two fake quiescers and a fake provider, counting into its own metrics.
fn check() -> (Backups, tempfile::TempDir) {
    let calls = Calls::default();
    let quiescers: Vec<Arc<dyn Quiescer>> =
        (0..2).map(|i| FakeQuiescer::new(&format!("q{i}"), &calls) as Arc<dyn Quiescer>).collect();
    let provider = FakeProvider::new(&calls);
    let state = tempfile::tempdir().unwrap();
    let journal = Journal::new(&state.path().join("srv-a.journal.json"));
    let armed = Armed::start(Program::Thread, journal, None);
    let backups = Backups::new("srv-a", vec!["data".into()], quiescers, provider, armed)
        .with_metrics(Arc::new(Metrics::new(&[])));
    (backups, state)
}

fn scrape(backups: &Backups) -> Exposition {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &backups.metrics().registry()).unwrap();
    Exposition::parse(&text).unwrap()
}

fn id(s: &str) -> BackupId {
    BackupId::parse(s).unwrap()
}

#[tokio::test]
async fn a_freeze_is_counted_once_with_its_window_and_steps() {
    let (backups, _state) = check();
    for _ in 0..2 {
        assert!(backups.prepare(&id("b1"), 10_000, Hold::StorageOnly).await.unwrap().prepared);
    }
    let mut held_ms = 0;
    for _ in 0..2 {
        let c = backups.commit(&id("b1"), None, false).await.unwrap();
        assert!(c.committed, "{c:?}");
        held_ms = c.held_ms;
    }
    let seen = scrape(&backups);
    assert_eq!(seen.get("stillpoint_agent_freezes_total", &[]), Some(1.0));
    assert_eq!(seen.get("stillpoint_agent_freeze_window_seconds_count", &[]), Some(1.0));
    let sum = seen.get("stillpoint_agent_freeze_window_seconds_sum", &[]).unwrap();
    assert!((sum - held_ms as f64 / 1000.0).abs() < 1e-9, "{sum} vs {held_ms}ms");
    assert_eq!(seen.get("stillpoint_agent_lease_expiries_total", &[]), Some(0.0));
    for (action, name) in [("freeze", "q0"), ("freeze", "q1"), ("snapshot", "fake"), ("thaw", "q0")]
    {
        let labels = [("action", action), ("name", name)];
        let count = seen.get("stillpoint_agent_step_seconds_count", &labels);
        assert_eq!(count, Some(1.0), "{action} {name}");
    }
}

#[tokio::test]
async fn a_lease_that_runs_out_is_counted_as_an_expiry_with_no_window() {
    let (backups, _state) = check();
    assert!(backups.prepare(&id("b1"), 1_000, Hold::StorageOnly).await.unwrap().prepared);
    let started = std::time::Instant::now();
    let expired = || backups.status().iter().any(|b| b.phase.as_str() == "thawed-expired");
    while !expired() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(expired(), "{:?}", backups.status());
    let seen = scrape(&backups);
    assert_eq!(seen.get("stillpoint_agent_freezes_total", &[]), Some(1.0));
    assert_eq!(seen.get("stillpoint_agent_lease_expiries_total", &[]), Some(1.0));
    assert_eq!(seen.get("stillpoint_agent_freeze_window_seconds_count", &[]), Some(0.0));
}
