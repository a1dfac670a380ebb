//! The fault suite (FAULTS.md): each case injects one fault into a running backup of three real
//! agents, then asserts the same things: no application left frozen (every freeze of the exec
//! quiescer was followed by its thaw), the backup's final state and reason, no snapshot left in
//! the array once the sweep has run, and the earlier good backup still listed and intact.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use stillpoint_tests::proxy::Mode;

use crate::harness::{wait_for, Cluster, Copy, Spec};

/// An exec quiescer whose behaviour the test steers with files in the control dir:
/// `delay-S` (seconds to take before freezing), `fail-S` (fail the freeze). Every freeze appends
/// `F` to `S.events`, every thaw `T`, each with the time since boot (`/proc/uptime`, a clock a
/// wall-clock step cannot move, unlike `date`).
pub fn steerable(server: &str, root: &Path) -> String {
    let d = root.join("control").display().to_string();
    let pre = format!(
        "if [ -f {d}/fail-{server} ]; then echo 'injected failure on {server}' >&2; exit 3; fi; \
         if [ -f {d}/delay-{server} ]; then sleep $(cat {d}/delay-{server}); fi; read up _ < /proc/uptime; echo F $up >> {d}/{server}.events"
    );
    let post = format!("read up _ < /proc/uptime; echo T $up >> {d}/{server}.events");
    format!(
        "[[quiescer]]\nkind = \"exec\"\nname = \"app\"\ntimeout_ms = 4000\npre_freeze = [\"/bin/sh\", \"-c\", {pre:?}]\npost_thaw = [\"/bin/sh\", \"-c\", {post:?}]\n"
    )
}

const LEASE_MS: u64 = 6_000;

/// How long to wait for a thaw that only the lease brings.
const PAST_THE_LEASE: Duration = Duration::from_millis(LEASE_MS + 4_000);

fn spec() -> Spec {
    stalls::watch();
    let mut spec = Spec::three(steerable);
    // Short enough to keep the suite fast, long enough that a loaded 2-core CI box gathers
    // every prepare within the cutoff (C = L - L/4 - L/8 = 3.75 s).
    spec.lease_ms = LEASE_MS;
    spec.sweep_interval_ms = 1_000;
    spec.probes = true;
    spec
}

fn control(cluster: &Cluster, file: &str) -> PathBuf {
    cluster.root().join("control").join(file)
}

fn set(cluster: &Cluster, file: &str, value: &str) {
    fs::write(control(cluster, file), value).expect("write control file");
}

/// The server's freeze (`F`) and thaw (`T`) events with their milliseconds since boot.
fn events(cluster: &Cluster, server: &str) -> Vec<(char, u64)> {
    let text =
        fs::read_to_string(control(cluster, &format!("{server}.events"))).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (kind, secs) = line.split_once(' ')?;
            Some((kind.chars().next()?, uptime_ms(secs)?))
        })
        .collect()
}

/// `/proc/uptime`'s seconds ("1234.56") as milliseconds.
fn uptime_ms(secs: &str) -> Option<u64> {
    let (whole, frac) = secs.trim().split_once('.')?;
    let frac = format!("{frac:0<3}");
    Some(whole.parse::<u64>().ok()? * 1000 + frac.get(..3)?.parse::<u64>().ok()?)
}

/// `true` while the server's application is frozen: its last event is a freeze.
fn froze(cluster: &Cluster, server: &str) -> bool {
    events(cluster, server).last().is_some_and(|(kind, _)| *kind == 'F')
}

/// Every freeze was followed by a thaw.
fn thawed(cluster: &Cluster, server: &str) -> bool {
    !froze(cluster, server)
}

/// How long the server's last freeze lasted, from its freeze to the thaw after it.
fn last_hold_ms(cluster: &Cluster, server: &str) -> u64 {
    let events = events(cluster, server);
    let Some(f) = events.iter().rposition(|(kind, _)| *kind == 'F') else { return 0 };
    let thaw = events[f..].iter().find(|(kind, _)| *kind == 'T');
    thaw.map_or(0, |(_, t)| t.saturating_sub(events[f].1))
}

/// The longest time the server's application was held, from a freeze to the thaw after it,
/// not counting the time this whole machine was stalled meanwhile (no process ran, so no
/// lease timer could either); with that stall, in milliseconds.
fn longest_hold_ms(cluster: &Cluster, server: &str) -> (u64, u64) {
    let mut longest = (0, 0);
    let mut frozen_at = None;
    for (kind, ms) in events(cluster, server) {
        match kind {
            'F' => frozen_at = frozen_at.or(Some(ms)),
            _ => {
                if let Some(at) = frozen_at.take() {
                    let stalled = stalls::stalled_ms(at, ms);
                    let held = ms.saturating_sub(at).saturating_sub(stalled);
                    longest = longest.max((held, stalled));
                }
            }
        }
    }
    longest
}

/// Whether the machine itself stopped running processes (a paused VM, a starved host): a thread
/// that wakes every 50 ms records every gap over a second between its wakes, on the same
/// clock as the events. A freeze that outlived its lease only because nothing ran is not the
/// product's doing, and the bound says so rather than fail.
mod stalls {
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    static GAPS: OnceLock<Mutex<Vec<(u64, u64)>>> = OnceLock::new();

    fn now_ms() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/uptime").ok()?;
        super::uptime_ms(text.split_whitespace().next()?)
    }

    /// Starts the watcher once per test binary.
    pub fn watch() {
        GAPS.get_or_init(|| {
            std::thread::spawn(|| {
                let mut last = now_ms();
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    let now = now_ms();
                    if let (Some(a), Some(b)) = (last, now) {
                        if b.saturating_sub(a) > 1_000 {
                            if let Some(gaps) = GAPS.get() {
                                gaps.lock().unwrap_or_else(|p| p.into_inner()).push((a, b));
                            }
                        }
                    }
                    last = now;
                }
            });
            Mutex::new(Vec::new())
        });
    }

    /// How much of `from..to` fell in recorded gaps, less the 50 ms the watcher sleeps anyway.
    pub fn stalled_ms(from: u64, to: u64) -> u64 {
        let Some(gaps) = GAPS.get() else { return 0 };
        let gaps = gaps.lock().unwrap_or_else(|p| p.into_inner());
        gaps.iter().map(|&(a, b)| b.min(to).saturating_sub(a.max(from)).saturating_sub(50)).sum()
    }
}

struct Good {
    id: String,
    copies: HashMap<PathBuf, Vec<u8>>,
}

/// A good backup first, whose catalog entry and copies the fault must not disturb.
fn good_backup(cluster: &Cluster) -> Good {
    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    assert_eq!(code, 0, "the baseline backup must succeed: {backup:#}\n{}", cluster.listener_log());
    let id = backup["backup_id"].as_str().expect("id").to_string();
    let mut copies = HashMap::new();
    if let Ok(dir) = fs::read_dir(cluster.copies_of(&id)) {
        for entry in dir.flatten() {
            copies.insert(entry.path(), fs::read(entry.path()).expect("read copy"));
        }
    }
    Good { id, copies }
}

pub(crate) fn start(cluster: &Cluster) -> String {
    let out = cluster.backupctl("operator", &["start", "--group", "g"]);
    assert!(out.status.success(), "start: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn status(cluster: &Cluster, id: &str) -> Value {
    cluster.backupctl_json(&["status", id]).1
}

pub(crate) async fn wait_state(
    cluster: &Cluster,
    id: &str,
    states: &[&str],
    timeout: Duration,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let backup = status(cluster, id);
        if states.contains(&backup["state"].as_str().unwrap_or_default()) {
            return backup;
        }
        assert!(
            Instant::now() < deadline,
            "backup {id} never reached {states:?}: {backup:#}\n{}",
            cluster.listener_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_frozen(cluster: &Cluster, server: &str) {
    wait_for(&format!("{server} to freeze"), Duration::from_secs(10), || {
        froze(cluster, server).then_some(())
    })
    .await;
}

/// The checks every case ends with.
async fn assert_clean(
    cluster: &Cluster,
    good: &Good,
    id: &str,
    state: &str,
    reason: &str,
) -> Value {
    let backup =
        wait_state(cluster, id, &["SUCCEEDED", "FAILED", "ABORTED"], Duration::from_secs(30)).await;
    assert_eq!(backup["state"], state, "{backup:#}\nlistener log:\n{}", cluster.listener_log());
    let got = backup["reason"].as_str().unwrap_or_default();
    assert!(got.contains(reason), "reason {got:?} lacks {reason:?}");
    for server in &cluster.spec.servers {
        wait_for(&format!("{server} to be thawed"), Duration::from_secs(10), || {
            thawed(cluster, server).then_some(())
        })
        .await;
    }
    if let Some(probe) = &cluster.probe {
        let stopped = || (!probe.app_stopped()).then_some(());
        wait_for("the probe application to run again", Duration::from_secs(5), stopped).await;
        assert!(!probe.was_left_frozen(), "LEFT FROZEN: srv-a's probe filesystem was still frozen");
    }
    let worst = cluster.spec.servers.iter().map(|s| (longest_hold_ms(cluster, s), s)).max();
    if let Some(((ms, stalled), server)) = worst {
        eprintln!("longest freeze in this case: {ms}ms on {server}");
        if stalled > 0 {
            eprintln!("(not counting {stalled}ms in which the stall watcher, due every 50 ms, did not get to run)");
        }
        // FAULTS.md's grace for scheduling noise on the 2-core box.
        let bound = cluster.spec.lease_ms + 3_000;
        assert!(
            ms <= bound,
            "{server} was frozen {ms}ms, past its lease of {}ms\nevents: {:?}\nagent log:\n{}\nlistener log:\n{}",
            cluster.spec.lease_ms,
            events(cluster, server),
            cluster.agent(server).proc.log_text(),
            cluster.listener_log()
        );
    }
    wait_for("the sweep to leave no snapshot in the array", Duration::from_secs(20), || {
        cluster.array.snapshots(None).expect("list snapshots").is_empty().then_some(())
    })
    .await;
    let (_, list) = cluster.backupctl_json(&["list", "--limit", "0"]);
    let listed =
        list.as_array().expect("list").iter().find(|b| b["backup_id"] == good.id.as_str()).cloned();
    assert_eq!(
        listed.map(|b| b["state"].clone()),
        Some(Value::from("SUCCEEDED")),
        "the good backup is still listed"
    );
    for (path, bytes) in &good.copies {
        assert!(
            fs::read(path).ok().as_ref() == Some(bytes),
            "copy {} of the good backup changed",
            path.display()
        );
    }
    backup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_preparing() {
    let mut cluster = Cluster::start(spec()).await;
    let good = good_backup(&cluster);
    set(&cluster, "delay-srv-b", "2");
    let id = start(&cluster);
    wait_frozen(&cluster, "srv-a").await;
    cluster.kill_agent("srv-b");
    let backup = assert_clean(&cluster, &good, &id, "FAILED", "srv-b").await;
    assert_eq!(backup["failed_phase"], "PREPARING");
    cluster.restart_agent("srv-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_frozen() {
    let mut cluster = Cluster::start(spec()).await;
    let good = good_backup(&cluster);
    set(&cluster, "delay-srv-c", "1");
    let id = start(&cluster);
    wait_frozen(&cluster, "srv-a").await;
    let killed = Instant::now();
    // The probes are really held: the application is stopped (the last quiescer to freeze).
    let probe = cluster.probe.as_ref().expect("probes");
    wait_for("srv-a's probe application to stop", Duration::from_secs(5), || {
        probe.app_stopped().then_some(())
    })
    .await;
    cluster.kill_agent("srv-a");
    wait_for("srv-a thawed by its guardian", Duration::from_secs(3), || {
        thawed(&cluster, "srv-a").then_some(())
    })
    .await;
    eprintln!("srv-a thawed {:?} after its agent was SIGKILLed", killed.elapsed());
    assert_clean(&cluster, &good, &id, "FAILED", "srv-a").await;
    cluster.restart_agent("srv-a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_snapshotting() {
    let mut s = spec();
    s.provider_extra =
        |server| if server == "srv-a" { "snapshot_delay_ms = 1500".into() } else { String::new() };
    let mut cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let id = start(&cluster);
    wait_state(&cluster, &id, &["COMMITTING"], Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill_agent("srv-a");
    assert_clean(&cluster, &good, &id, "FAILED", "srv-a").await;
    cluster.restart_agent("srv-a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_copying_leaves_its_snapshot_to_the_sweep() {
    let mut s = spec();
    s.copy = Copy::Command { before: "sleep 1".into(), dest: None };
    let mut cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let id = start(&cluster);
    wait_state(&cluster, &id, &["COPYING"], Duration::from_secs(10)).await;
    cluster.kill_agent("srv-a");
    // The copy reads the shared array, so it completes; only srv-a's cleanup cannot.
    let backup = wait_state(&cluster, &id, &["SUCCEEDED", "FAILED"], Duration::from_secs(30)).await;
    assert_eq!(backup["state"], "SUCCEEDED", "{backup:#}");
    assert_eq!(
        cluster.array.snapshots(Some(&id)).expect("snapshots").len(),
        1,
        "srv-a's snapshot waits for the sweep"
    );
    cluster.restart_agent("srv-a").await;
    assert_clean(&cluster, &good, &id, "SUCCEEDED", "").await;
    // The sweep says what it did, in the backup's log and in srv-a's step.
    let out = cluster.backupctl("viewer", &["log", &id]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.lines().any(|l| l.contains("srv-a")
            && l.contains("swept: abort done: ")
            && l.contains("1 snapshot deleted")),
        "{log}"
    );
    let backup = status(&cluster, &id);
    let srv_a =
        backup["servers"].as_array().and_then(|s| s.iter().find(|s| s["server"] == "srv-a"));
    assert_eq!(srv_a.map(|s| s["phase"].clone()), Some(Value::from("aborted")), "{backup:#}");
}

/// Saveset copies on the agents, srv-a's slow (8 MiB at 400 ms per MiB) so a fault lands mid-copy.
fn slow_copy_on_srv_a_agent() -> Spec {
    let mut s = spec();
    s.copy = Copy::SavesetOnAgent {
        verify: "index",
        agent: |server| Some(if server == "srv-a" { 400 } else { 0 }),
    };
    s
}

/// Waits until srv-a's agent has copied some but not all of its volume.
async fn copy_under_way_on_srv_a(cluster: &Cluster, id: &str) {
    let lun_bytes = cluster.spec.lun_bytes;
    wait_for("srv-a's copy on its agent to be under way", Duration::from_secs(20), || {
        let backup = status(cluster, id);
        let servers = backup["servers"].as_array()?;
        let a = servers.iter().find(|s| s["server"] == "srv-a")?;
        let done = a["copied_bytes"].as_u64()?;
        (backup["state"] == "COPYING" && done > 0 && done < lun_bytes).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_copying_on_the_agent() {
    let s = slow_copy_on_srv_a_agent();
    let mut cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let id = start(&cluster);
    copy_under_way_on_srv_a(&cluster, &id).await;
    cluster.kill_agent("srv-a");
    let backup = wait_state(&cluster, &id, &["SUCCEEDED", "FAILED"], Duration::from_secs(30)).await;
    assert_eq!(backup["state"], "FAILED", "{backup:#}");
    assert_eq!(backup["failed_phase"], "COPYING", "{backup:#}");
    let reason = backup["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("srv-a") && reason.contains("copy"), "{reason}");
    eprintln!("the backup failed as: {reason}");
    assert_eq!(
        cluster.array.snapshots(Some(&id)).expect("snapshots").len(),
        1,
        "srv-a's snapshot waits for its agent and the sweep"
    );
    cluster.restart_agent("srv-a").await;
    assert_clean(&cluster, &good, &id, "FAILED", "srv-a").await;
    let out = cluster.backupctl("viewer", &["log", &id]);
    let log = String::from_utf8_lossy(&out.stdout);
    // Whichever came first once the agent was back: the backup's retried Abort or the sweep.
    let deleted = log.lines().any(|l| l.contains("srv-a") && l.contains("abort done"));
    assert!(deleted, "srv-a's snapshot was not deleted by the abort or the sweep:\n{log}");
    // The copy cut short did no damage: the whole repository still verifies, data included.
    let report = cluster.saveset().verify(true).expect("verify the repository");
    assert!(report.is_ok(), "the repository is damaged: {:?}", report.damage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_hung_while_copying_on_the_agent() {
    let mut s = slow_copy_on_srv_a_agent();
    // The smallest silence allowed (two heartbeats), so the case stays short.
    s.agent_copy_silence_ms = 10_000;
    let cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let id = start(&cluster);
    copy_under_way_on_srv_a(&cluster, &id).await;
    // Hung, not dead: the TCP connection stays up, so only the silence bound can end the copy.
    cluster.agent("srv-a").proc.signal("STOP");
    let hung_at = Instant::now();
    let backup = wait_state(&cluster, &id, &["SUCCEEDED", "FAILED"], Duration::from_secs(40)).await;
    eprintln!("the copy was failed {:?} after srv-a's agent hung", hung_at.elapsed());
    cluster.agent("srv-a").proc.signal("CONT");
    assert_eq!(backup["state"], "FAILED", "{backup:#}");
    assert_eq!(backup["failed_phase"], "COPYING", "{backup:#}");
    let reason = backup["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("srv-a") && reason.contains("no progress or heartbeat"), "{reason}");
    // Once the agent runs again, the sweep (or the retried abort) deletes its snapshot.
    assert_clean(&cluster, &good, &id, "FAILED", "srv-a").await;
    let report = cluster.saveset().verify(true).expect("verify the repository");
    assert!(report.is_ok(), "the repository is damaged: {:?}", report.damage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_cleaning() {
    let mut s = spec();
    // The copy of srv-a kills srv-a's agent as it finishes: its Cleanup finds no one.
    s.copy = Copy::Command { before: String::new(), dest: None };
    let mut cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let pid = cluster.agent("srv-a").proc.child.id();
    fs::write(
        cluster.root().join("control").join("kill-on-copy"),
        format!("[ \"$STILLPOINT_SERVER\" = srv-a ] && kill -9 {pid}\n"),
    )
    .expect("write hook");
    let hook = cluster.root().join("control").join("kill-on-copy");
    let listener_config = fs::read_to_string(&cluster.listener_config).expect("listener config");
    let patched =
        listener_config.replacen("mkdir -p", &format!(". {}; mkdir -p", hook.display()), 1);
    fs::write(&cluster.listener_config, patched).expect("patch listener config");
    cluster.restart_listener().await;
    let id = start(&cluster);
    let backup = wait_state(&cluster, &id, &["SUCCEEDED", "FAILED"], Duration::from_secs(30)).await;
    assert_eq!(backup["state"], "SUCCEEDED", "{backup:#}");
    cluster.restart_agent("srv-a").await;
    assert_clean(&cluster, &good, &id, "SUCCEEDED", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_killed_while_preparing() {
    let mut cluster = Cluster::start(spec()).await;
    let good = good_backup(&cluster);
    set(&cluster, "delay-srv-c", "2");
    let id = start(&cluster);
    wait_frozen(&cluster, "srv-a").await;
    cluster.restart_listener().await;
    assert_clean(
        &cluster,
        &good,
        &id,
        "FAILED",
        "listener restarted while the backup was PREPARING",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_killed_while_snapshotting() {
    let mut s = spec();
    s.provider_extra = |_| "snapshot_delay_ms = 1000".into();
    let mut cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let id = start(&cluster);
    wait_state(&cluster, &id, &["COMMITTING"], Duration::from_secs(10)).await;
    cluster.restart_listener().await;
    assert_clean(
        &cluster,
        &good,
        &id,
        "FAILED",
        "listener restarted while the backup was COMMITTING",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_killed_while_copying_resumes_the_copies() {
    let mut s = spec();
    s.copy = Copy::Command { before: "sleep 2".into(), dest: None };
    let mut cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let id = start(&cluster);
    wait_state(&cluster, &id, &["COPYING"], Duration::from_secs(10)).await;
    cluster.restart_listener().await;
    // Past the freeze nothing is at risk: the new listener copies again and the backup succeeds.
    assert_clean(&cluster, &good, &id, "SUCCEEDED", "").await;
    let log = cluster.backupctl("viewer", &["log", &id]);
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.contains("listener restarted while the backup was COPYING; its snapshots were kept: copy requested again for"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_stopped_past_the_lease_while_frozen() {
    let cluster = Cluster::start(spec()).await;
    let good = good_backup(&cluster);
    set(&cluster, "delay-srv-c", "1");
    let id = start(&cluster);
    wait_frozen(&cluster, "srv-a").await;
    let listener = cluster.listener.as_ref().expect("listener");
    listener.signal("STOP");
    let stopped = Instant::now();
    for server in ["srv-a", "srv-b"] {
        wait_for(&format!("{server} to thaw at its lease"), PAST_THE_LEASE, || {
            thawed(&cluster, server).then_some(())
        })
        .await;
    }
    eprintln!(
        "agents thawed {:?} after the listener stopped (lease {LEASE_MS} ms)",
        stopped.elapsed()
    );
    cluster.listener.as_ref().expect("listener").signal("CONT");
    assert_clean(&cluster, &good, &id, "FAILED", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_stopped_briefly_while_copying_still_succeeds() {
    let mut s = spec();
    s.copy = Copy::Command { before: "sleep 1".into(), dest: None };
    let cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let id = start(&cluster);
    wait_state(&cluster, &id, &["COPYING"], Duration::from_secs(10)).await;
    cluster.listener.as_ref().expect("listener").signal("STOP");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.listener.as_ref().expect("listener").signal("CONT");
    assert_clean(&cluster, &good, &id, "SUCCEEDED", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_to_one_agent_cut_before_prepare() {
    let mut s = spec();
    s.proxied = true;
    let cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    cluster.agent("srv-b").proxy.as_ref().expect("proxy").set(Mode::Blackhole);
    let id = start(&cluster);
    let backup = wait_state(&cluster, &id, &["FAILED"], Duration::from_secs(10)).await;
    assert!(backup["reason"].as_str().unwrap_or_default().contains("srv-b"), "{backup:#}");
    for server in ["srv-a", "srv-c"] {
        wait_for(&format!("{server} thawed by Abort"), Duration::from_secs(5), || {
            thawed(&cluster, server).then_some(())
        })
        .await;
    }
    // Their freeze ended with the listener's Abort at the cutoff, not at their own lease.
    let cutoff_ms = LEASE_MS - LEASE_MS / 4 - LEASE_MS / 8;
    for server in ["srv-a", "srv-c"] {
        let held = last_hold_ms(&cluster, server);
        assert!(
            held < LEASE_MS,
            "{server} was held {held}ms: the unreachable peer stretched it to the lease"
        );
        eprintln!("{server} held {held}ms (cutoff {cutoff_ms}ms) while srv-b was unreachable");
    }
    cluster.agent("srv-b").proxy.as_ref().expect("proxy").set(Mode::Pass);
    assert_clean(&cluster, &good, &id, "FAILED", "srv-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_to_one_agent_cut_while_frozen() {
    let mut s = spec();
    s.proxied = true;
    let cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    set(&cluster, "delay-srv-c", "1");
    let id = start(&cluster);
    wait_frozen(&cluster, "srv-b").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.agent("srv-b").proxy.as_ref().expect("proxy").set(Mode::Blackhole);
    wait_for("srv-b to thaw at its lease", PAST_THE_LEASE, || {
        thawed(&cluster, "srv-b").then_some(())
    })
    .await;
    let backup = wait_state(&cluster, &id, &["FAILED"], Duration::from_secs(15)).await;
    assert!(backup["reason"].as_str().unwrap_or_default().contains("srv-b"), "{backup:#}");
    cluster.agent("srv-b").proxy.as_ref().expect("proxy").set(Mode::Pass);
    assert_clean(&cluster, &good, &id, "FAILED", "srv-b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_to_one_agent_cut_during_copy() {
    let mut s = spec();
    s.proxied = true;
    s.copy = Copy::Command { before: "sleep 1".into(), dest: None };
    let cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let id = start(&cluster);
    wait_state(&cluster, &id, &["COPYING"], Duration::from_secs(10)).await;
    cluster.agent("srv-b").proxy.as_ref().expect("proxy").set(Mode::Reset);
    let backup = wait_state(&cluster, &id, &["SUCCEEDED", "FAILED"], Duration::from_secs(30)).await;
    assert_eq!(
        backup["state"], "SUCCEEDED",
        "copies are safe, only srv-b's cleanup failed: {backup:#}"
    );
    cluster.agent("srv-b").proxy.as_ref().expect("proxy").set(Mode::Pass);
    assert_clean(&cluster, &good, &id, "SUCCEEDED", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiescer_that_hangs_fails_prepare_in_time() {
    let cluster = Cluster::start(spec()).await;
    let good = good_backup(&cluster);
    set(&cluster, "delay-srv-b", "60");
    let id = start(&cluster);
    let backup = assert_clean(&cluster, &good, &id, "FAILED", "srv-b").await;
    assert_eq!(backup["failed_phase"], "PREPARING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiescer_that_fails_thaws_the_others() {
    let cluster = Cluster::start(spec()).await;
    let good = good_backup(&cluster);
    set(&cluster, "fail-srv-c", "");
    let id = start(&cluster);
    assert_clean(&cluster, &good, &id, "FAILED", "injected failure on srv-c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_fails_half_way_through_two_volumes() {
    let mut s = spec();
    s.volumes = |server| {
        if server == "srv-b" {
            vec!["data".into(), "logs".into()]
        } else {
            vec!["data".into()]
        }
    };
    let cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    fs::remove_file(cluster.array.lun_path("srv-b", "logs").expect("path")).expect("remove LUN");
    let id = start(&cluster);
    let backup = assert_clean(&cluster, &good, &id, "FAILED", "srv-b").await;
    assert_eq!(backup["failed_phase"], "COMMITTING");
}

/// A tmpfs of 1 MiB as the copy target, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(path: PathBuf) -> SmallDisk {
        fs::create_dir_all(&path).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount")
            .success();
        assert!(ok, "mount a 1 MiB tmpfs at {} (the suite runs as root)", path.display());
        SmallDisk(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_the_copy_target() {
    let root = tempfile::tempdir().expect("tempdir");
    let disk = SmallDisk::mount(root.path().join("full"));
    let mut s = spec();
    s.copy = Copy::Command { before: String::new(), dest: Some(disk.0.clone()) };
    let mut cluster = Cluster::start(s).await;
    // The baseline goes to the tiny disk too while the LUNs are still empty (sparse copies fit).
    let good = good_backup(&cluster);
    let lun = cluster.array.lun_path("srv-a", "data").expect("lun");
    let noise: Vec<u8> =
        (0..(3u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    fs::write(&lun, [noise.as_slice(), &vec![0u8; (8 << 20) - noise.len()]].concat())
        .expect("fill LUN");
    let id = start(&cluster);
    let backup = assert_clean(&cluster, &good, &id, "FAILED", "No space left").await;
    assert_eq!(backup["failed_phase"], "COPYING");
    cluster.writer.take();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backups_of_one_group_at_once() {
    let mut s = spec();
    s.copy = Copy::Command { before: "sleep 1".into(), dest: None };
    let cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let id = start(&cluster);
    let out = cluster.backupctl("operator", &["start", "--group", "g"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already has backup") && stderr.contains(&id), "{stderr}");
    assert_clean(&cluster, &good, &id, "SUCCEEDED", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_another_monotonic_clock() {
    let mut s = spec();
    s.agent_wrapper = |server| {
        if server == "srv-b" {
            [
                "unshare",
                "--time",
                "--fork",
                "--kill-child",
                "--monotonic",
                "86400",
                "--boottime",
                "86400",
            ]
            .map(String::from)
            .into()
        } else {
            Vec::new()
        }
    };
    let cluster = Cluster::start(s).await;
    let good = good_backup(&cluster);
    let (code, backup) = cluster.backupctl_json(&["start", "--group", "g", "--wait", "complete"]);
    assert_eq!(code, 0, "{backup:#}");
    assert_eq!(backup["cut"]["consistent"], true);
    let id = backup["backup_id"].as_str().expect("id").to_string();
    assert_clean(&cluster, &good, &id, "SUCCEEDED", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_stale_requests_to_an_agent() {
    use stillpoint_proto as pb;
    let cluster = Cluster::start(spec()).await;
    let good = good_backup(&cluster);
    let mut agent =
        pb::agent_client::AgentClient::new(cluster.channel_to_agent("srv-a", "listener"));
    let prepare =
        || pb::PrepareRequest { backup_id: "dup-1".into(), lease_ms: 4_000, ..Default::default() };
    let first = agent.prepare(prepare()).await.expect("prepare").into_inner();
    let second = agent.prepare(prepare()).await.expect("prepare again").into_inner();
    assert!(first.prepared && second.prepared);
    let events = fs::read_to_string(control(&cluster, "srv-a.events")).unwrap_or_default();
    assert_eq!(
        events.matches('F').count(),
        2,
        "one freeze for the baseline, one for dup-1: {events:?}"
    );
    let commit = || pb::CommitRequest {
        backup_id: "dup-1".into(),
        freeze_token: String::new(),
        ..Default::default()
    };
    let c1 = agent.commit(commit()).await.expect("commit").into_inner();
    let c2 = agent.commit(commit()).await.expect("commit again").into_inner();
    assert!(c1.committed && c2.committed);
    assert_eq!(c1.snapshots, c2.snapshots, "the second commit takes no new snapshot");
    let stale = agent
        .commit(pb::CommitRequest {
            backup_id: good.id.clone(),
            freeze_token: String::new(),
            ..Default::default()
        })
        .await;
    assert!(stale.map(|r| !r.into_inner().committed).unwrap_or(true), "a stale commit is refused");
    let unknown = agent
        .commit(pb::CommitRequest {
            backup_id: "never-prepared".into(),
            freeze_token: String::new(),
            ..Default::default()
        })
        .await
        .expect("answer");
    assert!(
        !unknown.get_ref().committed && unknown.get_ref().reason.contains("unknown"),
        "{:?}",
        unknown.get_ref()
    );
    agent
        .abort(pb::AbortRequest { backup_id: "never-seen".into(), reason: "test".into() })
        .await
        .expect("abort unknown");
    let bad = agent
        .prepare(pb::PrepareRequest {
            backup_id: "../etc".into(),
            lease_ms: 4_000,
            ..Default::default()
        })
        .await;
    assert_eq!(bad.expect_err("bad id").code(), tonic::Code::InvalidArgument);
    agent.cleanup(pb::CleanupRequest { backup_id: "dup-1".into() }).await.expect("cleanup");
    assert!(thawed(&cluster, "srv-a"));
    assert!(cluster.array.snapshots(None).expect("snapshots").is_empty());
    let (_, list) = cluster.backupctl_json(&["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "nothing reached the catalog");
}
