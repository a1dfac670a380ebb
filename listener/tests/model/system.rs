//! The world the real `Coordinator` and the real agent machines run in, for stateright: each
//! agent's effects executed at once by a small interpreter (the guardian, the disk, a crash =
//! a new machine, thawed, orphans on disk), a network that loses, duplicates and reorders, the
//! copy jobs, a clock that jumps between deadlines, and ground truth (when each server froze and
//! thawed, when each snapshot was taken) to judge by. Neither side's rules are modelled here.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use stateright::{Model, Property};
use stillpoint_listener::coordinator::{
    AbortOutcome, Command, CommitReply, Coordinator, CopyDone, Event, PrepareReply, ReleaseReply,
    Timeouts,
};
use stillpoint_listener::model::{BackupRecord, Millis, SnapshotRef, State};
use stillpoint_protocol::agent::{
    self, BackupId, Effect, FreezeToken, Input, Phase, QuiescerInfo, Released, ReqId, Request,
};

pub const SERVERS: [&str; 3] = ["a", "b", "c"];

/// The real shape, scaled down: the cutoff runs from *sending* Prepare and ends before any lease
/// (counted from *receiving* it) can, `commit_cutoff < lease`.
pub const TIMEOUTS: Timeouts = Timeouts {
    lease_ms: 10,
    commit_cutoff_ms: 6,
    commit_timeout_ms: 10,
    copy_timeout_ms: 10,
    cleanup_timeout_ms: 5,
    inspect_timeout_ms: 5,
};

/// How many faults of each kind one run of the model may suffer (the bound that keeps it finite
/// and small enough to explore every interleaving).
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct Faults {
    /// An RPC that fails for the listener (request lost or timed out, reply lost).
    pub losses: u8,
    /// A request or reply delivered twice.
    pub dups: u8,
    /// An agent killed and restarted: its table is gone, its freeze thawed by the guardian,
    /// its snapshots stay on disk as orphans.
    pub crashes: u8,
    /// The listener restarted: `Event::Restarted`, replies to the old process are gone.
    pub restarts: u8,
    /// A quiescer fails Prepare.
    pub prepare_fails: u8,
    /// The snapshot provider fails Commit.
    pub commit_fails: u8,
    /// A copy fails.
    pub copy_fails: u8,
    /// An operator aborts the backup.
    pub operator_aborts: u8,
}

/// The model: which world to explore.
#[derive(Clone, Debug)]
pub struct System {
    pub agents: usize,
    pub faults: Faults,
    /// The listener's periodic sweep aborts what agents hold for a backup no longer in flight.
    pub sweep: bool,
    /// A deliberately broken agent (to prove the checker can fail), or `None` for the real rules.
    pub flaw: Option<Flaw>,
    /// The group's thaw barrier (`thaw = "after-every-snapshot"`).
    pub barrier: bool,
    /// A server whose quiescer holds nothing (an exec hook that does nothing): its "freeze"
    /// stops no writes.
    pub hook_only: Option<u8>,
}

/// A way to break the agent on purpose: a perturbation of the real machine's world, never a
/// second copy of its rules.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Flaw {
    /// The agent's clock stands still, so its machine never sees the lease run out (the
    /// guardian still thaws on time): it snapshots after the thaw.
    SnapshotsAfterLease,
    /// The freeze token never reaches the machine, so it commits whatever freeze it holds
    /// (the agent before the freeze token).
    IgnoresFreezeToken,
}

/// A request from the listener to an agent.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Req {
    Prepare {
        lease_ms: u64,
    },
    /// `token`: the freeze token the listener's record held for this server when it emitted
    /// the Commit (0: none); `hold`: stay frozen until Release (the thaw barrier).
    Commit {
        token: u8,
        hold: bool,
    },
    Release,
    Abort,
    Cleanup,
}

/// What the listener hears back about one RPC.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reply {
    /// Prepared or not, and the freeze token (0 when not frozen).
    Prepared(bool, u8),
    /// `Some(snapshot id)` when the agent committed.
    Committed(Option<u8>),
    Aborted,
    CleanedUp(u8),
    /// `Some(held until release)`, or `None` when the agent refused (nothing held).
    Released(Option<bool>),
    /// The RPC failed (lost request or reply, deadline, agent down).
    Failed(ReqKind),
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReqKind {
    Prepare,
    Commit,
    Release,
    Abort,
    Cleanup,
}

/// A message in flight. The network is a sorted multiset of these.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Msg {
    /// `rpc`: the listener still waits for this request's answer (false: a duplicate, a sweep's
    /// Abort, or one the listener already gave up on; its answer goes nowhere).
    ToAgent {
        to: u8,
        req: Req,
        rpc: bool,
    },
    ToListener {
        from: u8,
        reply: Reply,
    },
}

/// A copy of one server's snapshots the listener is running.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct CopyJob {
    pub agent: u8,
    /// Snapshot ids (bit mask).
    pub snaps: u32,
}

/// The freeze a server is physically in (ground truth, not any process's belief): its
/// quiescer holds writes and the guardian holds the thaw, which it runs at `lease_end`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Freeze {
    pub lease_end: Millis,
    /// How many snapshots (of any server) existed when this freeze began.
    pub froze_after: u8,
}

/// One server: the real agent machine (its volatile memory), its disk and its freeze.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Agent {
    pub machine: agent::Agent,
    /// Snapshot ids on disk (bit mask): survives a crash.
    pub disk: u32,
    pub frozen: Option<Freeze>,
    /// Freezes so far, across crashes: the next freeze's token is one more, so every freeze
    /// gets a fresh one (the real agent draws a random one).
    pub freezes: u8,
    /// Its quiescer holds nothing.
    pub hook: bool,
}

impl Agent {
    fn new(i: usize, hook: bool) -> Agent {
        Agent { machine: machine(i, hook), disk: 0, frozen: None, freezes: 0, hook }
    }

    /// What the sweep sees in Status (a freeze, snapshots, orphans on disk), and any freeze.
    fn holds(&self) -> bool {
        self.frozen.is_some() || self.disk != 0 || self.machine.frozen().is_some()
    }

    /// The machine's phase for the model's one backup.
    pub fn phase(&self) -> Option<Phase> {
        self.machine.phase(&b1())
    }

    /// The token of the freeze the machine holds for it.
    pub fn token(&self) -> Option<&str> {
        self.machine.freeze_token(&b1())
    }
}

fn machine(i: usize, hook: bool) -> agent::Agent {
    use stillpoint_protocol::hold::Hold;
    let hold = if hook { Hold::HookUnverified } else { Hold::FilesystemFreeze };
    let q = QuiescerInfo { name: "q".into(), freezes_filesystem: true, hold };
    agent::Agent::new(SERVERS[i], vec![q], "model")
}

/// The model's one backup.
fn b1() -> BackupId {
    BackupId::parse("b1").expect("a valid backup id")
}

/// A value shared between states with its hash computed once: the checker clones and hashes
/// every state it generates, and most actions leave the agents (real machines, with their
/// strings and replies) alone.
#[derive(Clone, Debug)]
pub struct Hashed<T> {
    value: Arc<T>,
    hash: u64,
}

impl<T: Hash> Hashed<T> {
    fn new(value: T) -> Hashed<T> {
        let mut h = DefaultHasher::new();
        value.hash(&mut h);
        Hashed { value: Arc::new(value), hash: h.finish() }
    }
}

impl<T> Deref for Hashed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Hashed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && (Arc::ptr_eq(&self.value, &other.value) || *self.value == *other.value)
    }
}

impl<T: Eq> Eq for Hashed<T> {}

impl<T> Hash for Hashed<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Ground truth about one snapshot ever taken; its id is its index in `World::snaps`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Snap {
    pub agent: u8,
    /// How many snapshots existed when this server froze for it: every snapshot with a smaller
    /// id was taken (its server thawed) before this server froze.
    pub froze_after: u8,
    pub while_frozen: bool,
    /// The servers whose quiescer holds writes that were physically frozen at this instant
    /// (bit mask).
    pub holders_frozen: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct World {
    pub now: Millis,
    pub coordinator: Coordinator,
    pub agents: Vec<Hashed<Agent>>,
    pub net: Vec<Msg>,
    pub copies: Vec<CopyJob>,
    pub snaps: Vec<Snap>,
    /// Snapshot ids copied while they were on disk (bit mask).
    pub copied: u32,
    pub left: Faults,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Action {
    Deliver(Msg),
    /// Deliver a Prepare whose quiescer fails, or a Commit whose snapshot fails.
    DeliverFailing(Msg),
    /// The listener's RPC fails: a request is lost or times out (it may still arrive later), or
    /// a reply is lost.
    Fail(Msg),
    /// A request nobody waits for any more is lost for good.
    Drop(Msg),
    Duplicate(Msg),
    CopyDone(CopyJob),
    CopyFails(CopyJob),
    LeaseExpires(u8),
    AgentCrashes(u8),
    ListenerRestarts,
    OperatorAborts,
    Sweep(u8),
    Tick,
    AdvanceTo(Millis),
}

fn server_index(name: &str) -> u8 {
    let i = SERVERS.iter().position(|s| *s == name).expect("a model server");
    u8::try_from(i).expect("few servers")
}

/// Snapshot `id` as the agent reports it: the id is its locator.
fn snapshot_ref(id: u8) -> SnapshotRef {
    SnapshotRef {
        volume: "data".into(),
        provider: "model".into(),
        locator: id.to_string(),
        size_bytes: 1,
    }
}

fn snap_ids(refs: &[SnapshotRef]) -> u32 {
    refs.iter().map(|r| 1u32 << r.locator.parse::<u32>().expect("a model snapshot id")).sum()
}

impl World {
    fn record(&self) -> &BackupRecord {
        &self.coordinator.record
    }

    fn terminal(&self) -> bool {
        self.record().state.is_terminal()
    }

    fn push(&mut self, msg: Msg) {
        let at = self.net.partition_point(|m| *m <= msg);
        self.net.insert(at, msg);
    }

    fn take(&mut self, msg: &Msg) {
        let at = self.net.iter().position(|m| m == msg).expect("message in flight");
        self.net.remove(at);
    }

    /// Feeds one event to the real coordinator and turns its commands into messages and jobs.
    fn feed(&mut self, event: Event) {
        let commands = self.coordinator.handle(self.now, event);
        for command in commands {
            match command {
                // The modelled group requires no hold and has no thaw barrier.
                Command::Log { .. } | Command::Inspect { .. } => {}
                Command::Release { server } => self.push(Msg::ToAgent {
                    to: server_index(&server),
                    req: Req::Release,
                    rpc: true,
                }),
                Command::Prepare { server, lease_ms } => self.push(Msg::ToAgent {
                    to: server_index(&server),
                    req: Req::Prepare { lease_ms },
                    rpc: true,
                }),
                Command::Commit { server, freeze_token: token } => {
                    let to = server_index(&server);
                    let token = if token.is_empty() {
                        0
                    } else {
                        token.parse().expect("a model freeze token")
                    };
                    let hold = self.coordinator.record.thaw_barrier;
                    self.push(Msg::ToAgent { to, req: Req::Commit { token, hold }, rpc: true })
                }
                Command::Abort { server, .. } => self.push(Msg::ToAgent {
                    to: server_index(&server),
                    req: Req::Abort,
                    rpc: true,
                }),
                Command::Cleanup { server } => self.push(Msg::ToAgent {
                    to: server_index(&server),
                    req: Req::Cleanup,
                    rpc: true,
                }),
                // Sealing is off (`Coordinator::new`): no Seal comes.
                Command::Seal { .. } => {}
                Command::Copy { server, snapshots } => {
                    let job = CopyJob { agent: server_index(&server), snaps: snap_ids(&snapshots) };
                    let at = self.copies.partition_point(|c| *c <= job);
                    self.copies.insert(at, job);
                }
            }
        }
        if self.terminal() {
            // The runtime stops the copies of a backup that ended.
            self.copies.clear();
        }
    }

    fn event_for(&self, from: u8, reply: Reply) -> Event {
        let server = SERVERS[usize::from(from)].to_string();
        let failed = "rpc failed".to_string();
        match reply {
            Reply::Prepared(prepared, token) => {
                let reason = if prepared { String::new() } else { "refused".into() };
                let freeze_token = if token == 0 { String::new() } else { token.to_string() };
                Event::Prepared {
                    server,
                    reply: Ok(PrepareReply {
                        prepared,
                        reason,
                        freeze_token,
                        ..Default::default()
                    }),
                }
            }
            Reply::Committed(Some(id)) => Event::Committed {
                server,
                reply: Ok(CommitReply {
                    committed: true,
                    snapshots: vec![snapshot_ref(id)],
                    ..Default::default()
                }),
            },
            Reply::Committed(None) => Event::Committed {
                server,
                reply: Ok(CommitReply {
                    committed: false,
                    reason: "refused".into(),
                    ..Default::default()
                }),
            },
            Reply::Aborted => Event::Aborted { server, result: Ok(AbortOutcome::default()) },
            Reply::Released(Some(held)) => Event::Released {
                server,
                reply: Ok(ReleaseReply { held_until_release: held, ..Default::default() }),
            },
            Reply::Released(None) => Event::Released { server, reply: Err("refused".into()) },
            Reply::Failed(ReqKind::Release) => Event::Released { server, reply: Err(failed) },
            Reply::CleanedUp(n) => Event::CleanedUp { server, result: Ok(u32::from(n)) },
            Reply::Failed(ReqKind::Prepare) => Event::Prepared { server, reply: Err(failed) },
            Reply::Failed(ReqKind::Commit) => Event::Committed { server, reply: Err(failed) },
            Reply::Failed(ReqKind::Abort) => Event::Aborted { server, result: Err(failed) },
            Reply::Failed(ReqKind::Cleanup) => Event::CleanedUp { server, result: Err(failed) },
        }
    }

    fn take_snapshot(&mut self, agent: u8, froze_after: u8, while_frozen: bool) -> u8 {
        let id = u8::try_from(self.snaps.len()).expect("few snapshots");
        assert!(id < 32, "snapshot ids must fit the bit mask");
        let now = self.now;
        let mut holders_frozen = 0;
        for (j, a) in self.agents.iter().enumerate() {
            // The snapshotting agent's own freeze is `while_frozen` (its state is being changed).
            let frozen = if usize::from(agent) == j {
                while_frozen
            } else {
                a.frozen.is_some_and(|f| now < f.lease_end)
            };
            if frozen && !a.hook {
                holders_frozen |= 1 << j;
            }
        }
        self.snaps.push(Snap { agent, froze_after, while_frozen, holders_frozen });
        id
    }

    /// True when every server whose quiescer holds writes was frozen at every instant at which
    /// a snapshot of `ids` was taken.
    pub fn holders_frozen_at_every_snapshot(&self, ids: u32) -> bool {
        let holders: u8 = self
            .agents
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.hook)
            .map(|(j, _)| 1u8 << j)
            .fold(0, |x, y| x | y);
        self.snaps
            .iter()
            .enumerate()
            .filter(|(id, _)| ids & (1 << id) != 0)
            .all(|(_, s)| s.holders_frozen & holders == holders)
    }

    /// Delivers `req` to agent `i`'s real machine; returns its answer, or None when `failing`
    /// asked for a failure that could not happen (nothing froze, or nothing was snapshotted).
    fn agent_handles(
        &mut self,
        i: u8,
        req: Req,
        failing: bool,
        flaw: Option<Flaw>,
    ) -> Option<Reply> {
        let freezes = self.agents[usize::from(i)].freezes;
        let request = match req {
            Req::Prepare { lease_ms } => {
                let token = (u16::from(freezes) + 1).to_string();
                let fresh_token = FreezeToken::parse(&token).expect("a valid token");
                let require = stillpoint_protocol::hold::Hold::StorageOnly;
                Request::Prepare { backup: b1(), lease_ms, fresh_token, require }
            }
            Req::Commit { token, hold } => {
                let token = (token != 0 && flaw != Some(Flaw::IgnoresFreezeToken))
                    .then(|| FreezeToken::parse(&token.to_string()).expect("a valid token"));
                Request::Commit { backup: b1(), token, hold_until_release: hold }
            }
            Req::Release => Request::Release { backup: b1() },
            Req::Abort => Request::Abort { backup: b1(), reason: "model".into() },
            Req::Cleanup => Request::Cleanup { backup: b1() },
        };
        let (reply, failed) =
            self.run_agent(i, Input::Request { from: ReqId(0), request }, failing, flaw);
        if failing && !failed {
            return None;
        }
        let reply = reply.expect("the machine answers at once: nothing else runs on it");
        Some(match reply {
            agent::Reply::Prepared(p) => {
                Reply::Prepared(p.prepared, p.freeze_token.parse().unwrap_or(0))
            }
            agent::Reply::Committed(c) => Reply::Committed(c.committed.then(|| {
                u8::try_from(snap_ids(&c.snapshots).trailing_zeros()).expect("few snapshots")
            })),
            agent::Reply::Aborted(_) => Reply::Aborted,
            agent::Reply::Release(r) => Reply::Released(r.ok().map(|r| r.held_until_release)),
            agent::Reply::CleanedUp(n) => {
                Reply::CleanedUp(u8::try_from(n.unwrap_or(0)).expect("few snapshots"))
            }
            other => panic!("agent answered {other:?} to {req:?}"),
        })
    }

    /// Feeds `input` to agent `i`'s machine and runs every effect it leads to at once (the
    /// real agent runs them one after another; nothing in the model interleaves with them).
    /// `failing`: the quiescer's freeze or the snapshot fails. Returns the reply, and whether
    /// such a failure happened.
    fn run_agent(
        &mut self,
        i: u8,
        input: Input,
        failing: bool,
        flaw: Option<Flaw>,
    ) -> (Option<agent::Reply>, bool) {
        let now = u64::try_from(self.now).expect("model time is not negative");
        // The flawed agent's clock stands still.
        let clock = if flaw == Some(Flaw::SnapshotsAfterLease) { 0 } else { now };
        let ix = usize::from(i);
        let (mut reply, mut failed, mut lease_end) = (None, false, self.now);
        let mut a = Agent::clone(&self.agents[ix]);
        let mut effects: VecDeque<Effect> = a.machine.handle(clock, input).into();
        while let Some(effect) = effects.pop_front() {
            let snaps_so_far = u8::try_from(self.snaps.len()).expect("few snapshots");
            let result = match effect {
                Effect::EnsureGuardian => Some(Input::GuardianChecked(Ok(()))),
                // A refused check is a Prepare refused before freezing: the guardian-missing
                // path already explores that, so the model's provider always has room.
                Effect::CheckProvider { .. } => Some(Input::ProviderChecked(Ok(String::new()))),
                Effect::Arm { quiescer, lease_end_ms, .. } => {
                    // The guardian's lease is what is left of the agent's, on the real clock.
                    let left = lease_end_ms.saturating_sub(clock);
                    lease_end = self.now + Millis::try_from(left).expect("small lease");
                    Some(Input::Armed { quiescer, result: Ok(()) })
                }
                Effect::Freeze { quiescer, .. } if failing => {
                    failed = true;
                    Some(Input::Froze { quiescer, result: Err("quiescer failed".into()) })
                }
                Effect::Freeze { quiescer, .. } => {
                    a.frozen = Some(Freeze { lease_end, froze_after: snaps_so_far });
                    a.freezes += 1;
                    Some(Input::Froze { quiescer, result: Ok(String::new()) })
                }
                Effect::Disarm { .. } => Some(Input::Disarmed),
                Effect::Release { .. } => Some(Input::Released(if a.frozen.is_some() {
                    Released::Released
                } else {
                    Released::AlreadyThawed
                })),
                Effect::Thaw { quiescer, thawed_elsewhere, .. } => {
                    if !thawed_elsewhere {
                        a.frozen = None;
                    }
                    Some(Input::Thawed {
                        quiescer,
                        result: Ok(String::new()),
                        artifacts: Vec::new(),
                    })
                }
                Effect::Forget { .. } => Some(Input::Forgotten),
                Effect::Snapshot { .. } if failing => {
                    failed = true;
                    Some(Input::Snapshotted(Err("snapshot failed".into())))
                }
                Effect::Snapshot { .. } => {
                    let now = self.now;
                    let while_frozen = a.frozen.is_some_and(|f| now < f.lease_end);
                    let froze_after = a.frozen.map_or(snaps_so_far, |f| f.froze_after);
                    let id = self.take_snapshot(i, froze_after, while_frozen);
                    a.disk |= 1 << id;
                    Some(Input::Snapshotted(Ok(vec![snapshot_ref(id)])))
                }
                Effect::Delete { .. } => {
                    let n = a.disk.count_ones();
                    a.disk = 0;
                    Some(Input::Deleted(Ok(n)))
                }
                Effect::Reply { reply: r, .. } => {
                    reply = Some(r);
                    None
                }
                // The lease timer is the `LeaseExpires` action; no copies run on agents here.
                Effect::Begin { .. }
                | Effect::Log { .. }
                | Effect::SetTimer { .. }
                | Effect::CancelTimer { .. }
                | Effect::StopCopy { .. } => None,
                Effect::CloseGuardian => Some(Input::GuardianClosed),
            };
            if let Some(input) = result {
                effects.extend(a.machine.handle(clock, input));
            }
        }
        self.agents[ix] = Hashed::new(a);
        (reply, failed)
    }

    /// The next instant at which something is due: the coordinator's deadline or a lease's end.
    fn next_instant(&self) -> Option<Millis> {
        let leases = self.agents.iter().filter_map(|a| a.frozen.map(|f| f.lease_end));
        self.coordinator.next_deadline().into_iter().chain(leases).filter(|t| *t > self.now).min()
    }

    /// True when every server was frozen at one common instant for the snapshots `ids` (one
    /// per server): each was taken while frozen, and none was taken before another's freeze.
    pub fn common_frozen_instant(&self, ids: u32) -> bool {
        let chosen: Vec<(usize, &Snap)> =
            self.snaps.iter().enumerate().filter(|(id, _)| ids & (1 << id) != 0).collect();
        let Some(first) = chosen.iter().map(|(id, _)| *id).min() else { return false };
        chosen.iter().all(|(_, s)| s.while_frozen && usize::from(s.froze_after) <= first)
    }

    /// The snapshot ids the record holds, if every server has some.
    pub fn recorded_snaps(&self) -> Option<u32> {
        let servers = &self.record().servers;
        let all = servers.iter().all(|s| !s.snapshots.is_empty());
        all.then(|| servers.iter().map(|s| snap_ids(&s.snapshots)).fold(0, |a, b| a | b))
    }

    /// One line per part of the world, for traces.
    pub fn describe(&self) -> String {
        let mut out = format!("t={} listener: {:?}", self.now, self.record().state);
        for (s, r) in self.record().servers.iter().enumerate() {
            let _ = write!(
                out,
                "\n    {} step={} snaps={:?}",
                SERVERS[s],
                r.step.as_str(),
                snap_ids(&r.snapshots)
            );
            let _ = write!(out, " token={:?}", r.freeze_token);
            let a = &self.agents[s];
            let _ = write!(
                out,
                " | agent phase={:?} token={:?} frozen={:?} disk={:#b}",
                a.phase(),
                a.token(),
                a.frozen,
                a.disk
            );
        }
        if let Some(v) = &self.record().verdict {
            let _ = write!(out, "\n    verdict consistent={}: {}", v.consistent, v.text);
        }
        let _ = write!(
            out,
            "\n    net={:?} copies={:?} copied={:#b}",
            self.net, self.copies, self.copied
        );
        let _ = write!(
            out,
            "\n    snaps(id: agent, froze_after, while_frozen)={:?}",
            self.snaps
                .iter()
                .enumerate()
                .map(|(i, s)| (i, s.agent, s.froze_after, s.while_frozen))
                .collect::<Vec<_>>()
        );
        out
    }
}

impl Model for System {
    type State = World;
    type Action = Action;

    fn init_states(&self) -> Vec<World> {
        let servers: Vec<String> = SERVERS[..self.agents].iter().map(|s| s.to_string()).collect();
        let mut record = BackupRecord::new("b1", "g", &servers, "model", 0);
        record.thaw_barrier = self.barrier;
        let mut world = World {
            now: 0,
            coordinator: Coordinator::new(record, TIMEOUTS),
            agents: (0..self.agents)
                .map(|i| Hashed::new(Agent::new(i, self.hook_only == u8::try_from(i).ok())))
                .collect(),
            net: Vec::new(),
            copies: Vec::new(),
            snaps: Vec::new(),
            copied: 0,
            left: self.faults,
        };
        world.feed(Event::Start);
        vec![world]
    }

    fn actions(&self, w: &World, actions: &mut Vec<Action>) {
        let left = w.left;
        let mut last = None;
        for &m in &w.net {
            if last == Some(m) {
                continue; // the same message twice offers the same choices
            }
            last = Some(m);
            actions.push(Action::Deliver(m));
            match m {
                Msg::ToAgent { req, rpc, .. } => {
                    // Offered whenever failures are left; `next_state` drops it when the
                    // machine would neither freeze nor snapshot.
                    let can_fail = match req {
                        Req::Prepare { .. } => left.prepare_fails > 0,
                        Req::Commit { .. } => left.commit_fails > 0,
                        _ => false,
                    };
                    if can_fail {
                        actions.push(Action::DeliverFailing(m));
                    }
                    if rpc && left.losses > 0 {
                        actions.push(Action::Fail(m));
                    }
                    if !rpc {
                        actions.push(Action::Drop(m));
                    }
                }
                Msg::ToListener { reply, .. } => {
                    if left.losses > 0 && !matches!(reply, Reply::Failed(_)) {
                        actions.push(Action::Fail(m));
                    }
                }
            }
            if left.dups > 0 {
                actions.push(Action::Duplicate(m));
            }
        }
        for &job in &w.copies {
            actions.push(Action::CopyDone(job));
            if left.copy_fails > 0 {
                actions.push(Action::CopyFails(job));
            }
        }
        for (i, a) in w.agents.iter().enumerate() {
            let i = u8::try_from(i).expect("few agents");
            if a.frozen.is_some_and(|f| w.now >= f.lease_end) {
                actions.push(Action::LeaseExpires(i));
            }
            if left.crashes > 0 && a.machine.phase(&b1()).is_some() {
                actions.push(Action::AgentCrashes(i));
            }
            let sweeping = w
                .net
                .iter()
                .any(|m| matches!(m, Msg::ToAgent { to, req: Req::Abort, .. } if *to == i));
            if self.sweep && w.terminal() && a.holds() && !sweeping {
                actions.push(Action::Sweep(i));
            }
        }
        if left.restarts > 0 {
            actions.push(Action::ListenerRestarts);
        }
        if left.operator_aborts > 0 && !w.terminal() {
            actions.push(Action::OperatorAborts);
        }
        if w.coordinator.next_deadline().is_some_and(|d| d <= w.now) {
            actions.push(Action::Tick);
        }
        // A lease's end is not skipped: the guardian thaws at that instant.
        let lease_due = w.agents.iter().any(|a| a.frozen.is_some_and(|f| f.lease_end <= w.now));
        if let (false, Some(t)) = (lease_due, w.next_instant()) {
            actions.push(Action::AdvanceTo(t));
        }
    }

    fn next_state(&self, w: &World, action: Action) -> Option<World> {
        let mut w = w.clone();
        match action {
            Action::Deliver(m) | Action::DeliverFailing(m) => {
                w.take(&m);
                let failing = matches!(action, Action::DeliverFailing(_));
                match m {
                    Msg::ToAgent { to, req, rpc } => {
                        if failing {
                            match req {
                                Req::Prepare { .. } => w.left.prepare_fails -= 1,
                                _ => w.left.commit_fails -= 1,
                            }
                        }
                        let reply = w.agent_handles(to, req, failing, self.flaw)?;
                        if rpc {
                            w.push(Msg::ToListener { from: to, reply });
                        }
                    }
                    Msg::ToListener { from, reply } => {
                        let event = w.event_for(from, reply);
                        w.feed(event);
                    }
                }
            }
            Action::Fail(m) => {
                w.left.losses -= 1;
                w.take(&m);
                match m {
                    Msg::ToAgent { to, req, .. } => {
                        w.push(Msg::ToAgent { to, req, rpc: false });
                        w.push(Msg::ToListener { from: to, reply: Reply::Failed(kind(req)) });
                    }
                    Msg::ToListener { from, reply } => {
                        let req = match reply {
                            Reply::Prepared(..) => ReqKind::Prepare,
                            Reply::Committed(_) => ReqKind::Commit,
                            Reply::Aborted => ReqKind::Abort,
                            Reply::CleanedUp(_) => ReqKind::Cleanup,
                            Reply::Released(_) => ReqKind::Release,
                            Reply::Failed(k) => k,
                        };
                        w.push(Msg::ToListener { from, reply: Reply::Failed(req) });
                    }
                }
            }
            Action::Drop(m) => w.take(&m),
            Action::Duplicate(m) => {
                w.left.dups -= 1;
                let copy = match m {
                    Msg::ToAgent { to, req, .. } => Msg::ToAgent { to, req, rpc: false },
                    other => other,
                };
                w.push(copy);
            }
            Action::CopyDone(job) | Action::CopyFails(job) => {
                let at = w.copies.iter().position(|c| *c == job).expect("copy running");
                w.copies.remove(at);
                let on_disk = w.agents[usize::from(job.agent)].disk;
                let server = SERVERS[usize::from(job.agent)].to_string();
                let result = if matches!(action, Action::CopyFails(_)) {
                    w.left.copy_fails -= 1;
                    Err("copy failed".to_string())
                } else if job.snaps != 0 && job.snaps & !on_disk == 0 {
                    w.copied |= job.snaps;
                    Ok(CopyDone::default())
                } else {
                    Err("snapshot gone".to_string())
                };
                w.feed(Event::Copied { server, result });
            }
            Action::LeaseExpires(i) => {
                // The guardian thaws at the lease's end; the agent's timer fires then too.
                let mut a = Agent::clone(&w.agents[usize::from(i)]);
                a.frozen = None;
                w.agents[usize::from(i)] = Hashed::new(a);
                w.run_agent(i, Input::LeaseTimer { backup: b1() }, false, self.flaw);
            }
            Action::AgentCrashes(i) => {
                w.left.crashes -= 1;
                // Its memory is gone; the guardian reads EOF and thaws; the disk stays.
                let mut a = Agent::clone(&w.agents[usize::from(i)]);
                a.machine = machine(usize::from(i), a.hook);
                a.frozen = None;
                w.agents[usize::from(i)] = Hashed::new(a);
            }
            Action::ListenerRestarts => {
                w.left.restarts -= 1;
                w.net = w
                    .net
                    .iter()
                    .filter_map(|m| match *m {
                        Msg::ToAgent { to, req, .. } => Some(Msg::ToAgent { to, req, rpc: false }),
                        Msg::ToListener { .. } => None,
                    })
                    .collect();
                w.net.sort();
                w.copies.clear();
                w.feed(Event::Restarted);
            }
            Action::OperatorAborts => {
                w.left.operator_aborts -= 1;
                w.feed(Event::AbortRequested { by: "operator".into(), reason: "model".into() });
            }
            Action::Sweep(i) => w.push(Msg::ToAgent { to: i, req: Req::Abort, rpc: false }),
            Action::Tick => w.feed(Event::Tick),
            Action::AdvanceTo(t) => w.now = t,
        }
        Some(w)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(CONSISTENT_VERDICT, |_, w: &World| {
                let claimed = w.record().verdict.as_ref().is_some_and(|v| v.consistent);
                !claimed || w.recorded_snaps().is_some_and(|ids| w.common_frozen_instant(ids))
            }),
            Property::always(SUCCEEDED_CUT, |_, w: &World| {
                w.record().state != State::Succeeded
                    || w.recorded_snaps().is_some_and(|ids| w.common_frozen_instant(ids))
            }),
            Property::always(BARRIER_HOLDS, |m: &System, w: &World| {
                let claimed = w.record().verdict.as_ref().is_some_and(|v| v.consistent);
                !m.barrier
                    || !claimed
                    || w.recorded_snaps().is_some_and(|ids| w.holders_frozen_at_every_snapshot(ids))
            }),
            Property::always(LEASE, |_, w: &World| {
                w.agents.iter().all(|a| a.frozen.is_none_or(|f| w.now <= f.lease_end))
            }),
            Property::always(QUIESCENT_CLEAN, |m, w: &World| {
                if !w.net.is_empty() || !w.copies.is_empty() {
                    return true; // something can still be delivered or finish
                }
                let mut next = Vec::new();
                m.actions(w, &mut next);
                !next.is_empty() || (w.terminal() && w.agents.iter().all(|a| !a.holds()))
            }),
            Property::always(SUCCEEDED_COPIED, |_, w: &World| {
                w.record().state != State::Succeeded
                    || w.record().servers.iter().all(|s| {
                        let ids = snap_ids(&s.snapshots);
                        ids != 0 && ids & !w.copied == 0
                    })
            }),
            Property::always(NO_SNAPSHOT_AFTER_THAW, |_, w: &World| {
                w.snaps.iter().all(|s| s.while_frozen)
            }),
            Property::sometimes(SUCCEEDS, |_, w: &World| w.record().state == State::Succeeded),
            Property::sometimes(FAILS_AFTER_SNAPSHOTS, |_, w: &World| {
                matches!(w.record().state, State::Failed { .. } | State::Aborted { .. })
                    && !w.snaps.is_empty()
            }),
        ]
    }
}

fn kind(req: Req) -> ReqKind {
    match req {
        Req::Prepare { .. } => ReqKind::Prepare,
        Req::Commit { .. } => ReqKind::Commit,
        Req::Abort => ReqKind::Abort,
        Req::Cleanup => ReqKind::Cleanup,
        Req::Release => ReqKind::Release,
    }
}

pub const CONSISTENT_VERDICT: &str =
    "1. a consistent verdict means every server was frozen at one instant";
pub const SUCCEEDED_CUT: &str = "1b. every SUCCEEDED backup's snapshots share a frozen instant";
pub const BARRIER_HOLDS: &str = "1c. with the thaw barrier, a consistent verdict means every server that holds writes was frozen at every snapshot instant";
pub const LEASE: &str = "2. no agent stays frozen past its lease";
pub const QUIESCENT_CLEAN: &str =
    "3. when all is quiet, the backup ended and nothing is frozen or left on disk";
pub const SUCCEEDED_COPIED: &str = "4. a SUCCEEDED backup has a copy of every server's snapshots";
pub const NO_SNAPSHOT_AFTER_THAW: &str = "5. no agent snapshots after its own thaw";
pub const SUCCEEDS: &str = "6. a backup can succeed";
pub const FAILS_AFTER_SNAPSHOTS: &str = "6b. a backup can fail after snapshots were taken";
