//! Exhaustive model check (stateright) of the two-phase protocol: the real `Coordinator` against
//! model agents, a network that loses, duplicates and reorders, crashes of either side, copies
//! that fail, and a clock that jumps between deadlines. Every reachable state within the fault
//! bounds is visited; a broken property prints the trace that breaks it.

#[path = "model/system.rs"]
mod system;

use std::time::Instant;

use stateright::{Checker, Expectation, HasDiscoveries, Model};
use stillpoint_protocol::agent::Phase;
use system::*;

/// Explores every state of `system`, prints what it found, and returns the checker.
fn explore(label: &str, system: System, threads: usize) -> impl Checker<System> {
    let started = Instant::now();
    let checker = system.clone().checker().threads(threads).spawn_bfs().join();
    println!(
        "{label}: {} unique states ({} generated), max depth {}, {:.1?}",
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    let discoveries = checker.discoveries();
    for p in system.properties() {
        let found = discoveries.contains_key(p.name);
        let verdict = match (p.expectation, found) {
            (Expectation::Sometimes, true) => "example found",
            (Expectation::Sometimes, false) => "NO EXAMPLE",
            (_, false) => "holds",
            (_, true) => "VIOLATED",
        };
        println!("  {verdict:>13}  {}", p.name);
    }
    checker
}

/// The steps to a discovery, each with the world after it.
fn trace(checker: &impl Checker<System>, property: &'static str) -> Option<String> {
    let path = checker.discovery(property)?;
    let model = checker.model();
    let p = model.property(property);
    let mut out = format!("trace to \"{property}\":\n");
    for (world, action) in path.into_vec() {
        out.push_str(&format!("  {}\n", world.describe()));
        let broken = p.expectation == Expectation::Always && !(p.condition)(model, &world);
        if broken {
            out.push_str("  ^ broken here\n");
            break;
        }
        if let Some(action) = action {
            out.push_str(&format!("-> {action:?}\n"));
        }
    }
    Some(out)
}

/// Fails with a trace for every broken `always` and every `sometimes` without an example.
fn assert_all_hold(checker: &impl Checker<System>) {
    let mut failures = Vec::new();
    for p in checker.model().properties() {
        match p.expectation {
            Expectation::Sometimes => {
                if checker.discovery(p.name).is_none() {
                    failures.push(format!("no example of \"{}\": the model is broken", p.name));
                }
            }
            _ => failures.extend(trace(checker, p.name)),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    checker.assert_properties();
}

const NONE: Faults = Faults {
    losses: 0,
    dups: 0,
    crashes: 0,
    restarts: 0,
    prepare_fails: 0,
    commit_fails: 0,
    copy_fails: 0,
    operator_aborts: 0,
};

fn system(agents: usize, faults: Faults) -> System {
    System { agents, faults, sweep: true, flaw: None, barrier: false, hook_only: None }
}

/// Checks every property of `system` exhaustively and that it visited at least `floor` states.
/// Two checker threads each: the big checks then share both cores to the end instead of the
/// last one running alone on one.
fn check(label: &str, system: System, floor: usize) {
    let checker = explore(label, system, 2);
    assert_all_hold(&checker);
    let n = checker.unique_state_count();
    assert!(
        n >= floor,
        "{label}: {n} states, expected at least {floor}: the model stopped exploring"
    );
}

#[test]
fn two_agents_with_lost_delayed_and_duplicated_messages() {
    check(
        "2 agents, 1 loss + 1 duplicate",
        system(2, Faults { losses: 1, dups: 1, ..NONE }),
        700_000,
    );
}

#[test]
fn two_agents_with_agent_crash_listener_restart_and_a_loss() {
    let faults = Faults { crashes: 1, restarts: 1, losses: 1, ..NONE };
    check("2 agents, crash + restart + loss", system(2, faults), 480_000);
}

#[test]
fn two_agents_with_failing_quiescer_snapshot_copy_and_operator_abort() {
    let faults =
        Faults { prepare_fails: 1, commit_fails: 1, copy_fails: 1, operator_aborts: 1, ..NONE };
    check("2 agents, prepare/commit/copy failure + operator abort", system(2, faults), 25_000);
}

#[test]
fn three_agents_with_reordering_and_lease_expiry() {
    check("3 agents, reordering and timing only", system(3, NONE), 450_000);
}

/// Proves the checker can fail: an agent that snapshots after its lease ran out must be caught.
#[test]
fn checker_catches_an_agent_that_snapshots_after_its_lease() {
    let system = System { flaw: Some(Flaw::SnapshotsAfterLease), ..system(2, NONE) };
    let checker = explore("2 broken agents, no fault", system, 1);
    for property in [NO_SNAPSHOT_AFTER_THAW, CONSISTENT_VERDICT] {
        let found = trace(&checker, property);
        let found = found.unwrap_or_else(|| panic!("the checker must break \"{property}\""));
        println!("{found}");
    }
}

/// The re-freeze this model once found: an agent that crashed after freezing forgets the
/// backup; a duplicate Prepare then freezes it again *after* another server already snapshotted
/// and thawed. The listener's Commit names the freeze token of the first freeze, so the agent
/// refuses it instead of snapshotting the late freeze, and no cut that spans the restart can be
/// recorded (nor called consistent).
#[test]
fn a_duplicate_prepare_after_an_agent_restart_cannot_break_the_cut() {
    let faults = Faults { dups: 1, crashes: 1, ..NONE };
    check("2 agents, duplicate + agent crash", system(2, faults), 600_000);
}

/// Proves the check above can fail: an agent that ignores the freeze token (the agent before
/// the fix) commits the late freeze, and the checker finds the inconsistent "consistent" cut.
#[test]
fn checker_catches_an_agent_that_ignores_the_freeze_token() {
    let faults = Faults { dups: 1, crashes: 1, ..NONE };
    let system = System { flaw: Some(Flaw::IgnoresFreezeToken), ..system(2, faults) };
    let stop = HasDiscoveries::AnyOf([CONSISTENT_VERDICT].into_iter().collect());
    let checker = system.checker().threads(1).finish_when(stop).spawn_bfs().join();
    let found = trace(&checker, CONSISTENT_VERDICT).expect("the re-freeze counterexample");
    println!("{found}");
    // It is the re-freeze: some server's snapshot came from a freeze other than the one whose
    // token the listener recorded (and sent with its Commit).
    let end = checker.discovery(CONSISTENT_VERDICT).expect("found").last_state().clone();
    let refrozen = end.agents.iter().zip(&end.coordinator.record.servers).any(|(a, r)| {
        a.phase() == Some(Phase::Snapshotted) && a.token() != Some(r.freeze_token.as_str())
    });
    assert!(refrozen, "expected a snapshot of a later freeze:\n{}", end.describe());
}

/// Property 3 is not vacuous: without the listener's sweep, one lost Cleanup or Abort leaves a
/// snapshot (or an orphan after a crash) on an agent for good.
#[test]
fn without_the_sweep_a_lost_message_leaves_a_snapshot_behind() {
    let system = System { sweep: false, ..system(2, Faults { losses: 1, ..NONE }) };
    let stop = HasDiscoveries::AnyOf([QUIESCENT_CLEAN].into_iter().collect());
    let checker = system.checker().threads(1).finish_when(stop).spawn_bfs().join();
    let found = trace(&checker, QUIESCENT_CLEAN).expect("a leftover without the sweep");
    println!("{found}");
}

#[test]
fn three_agents_with_the_thaw_barrier_and_a_server_that_holds_nothing() {
    let system = System { barrier: true, hook_only: Some(2), ..system(3, NONE) };
    check("3 agents, thaw barrier, srv c holds nothing", system, 900_000);
}

#[test]
fn two_agents_with_the_thaw_barrier_a_loss_and_a_crash() {
    let faults = Faults { losses: 1, crashes: 1, ..NONE };
    let system = System { barrier: true, hook_only: Some(1), ..system(2, faults) };
    check("2 agents, thaw barrier, b holds nothing, loss + crash", system, 300_000);
}
