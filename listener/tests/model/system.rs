//! The world the real `Coordinator` runs in, for stateright: model agents that follow the
//! agent's rules (lease, no Commit after thaw, a Commit must name the freeze the agent holds,
//! idempotent Abort and Cleanup, crash = thawed with orphans on disk), a network that loses, duplicates and reorders, the copy jobs, a clock that
//! jumps between deadlines, and ground truth (when each snapshot's server froze) to judge by.
//! The listener side is not modelled: it is `stillpoint_listener::coordinator` itself.

use std::fmt::Write as _;

use stateright::{Model, Property};
use stillpoint_listener::coordinator::{
    Command, CommitReply, Coordinator, Event, PrepareReply, Timeouts,
};
use stillpoint_listener::model::{BackupRecord, Millis, SnapshotRef, State};

pub const SERVERS: [&str; 3] = ["a", "b", "c"];

/// The real shape, scaled down: the cutoff runs from *sending* Prepare and ends before any lease
/// (counted from *receiving* it) can, `commit_cutoff < lease`.
pub const TIMEOUTS: Timeouts = Timeouts {
    lease_ms: 10,
    commit_cutoff_ms: 6,
    commit_timeout_ms: 10,
    copy_timeout_ms: 10,
    cleanup_timeout_ms: 5,
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
}

/// A way to break the agent's rules on purpose.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Flaw {
    /// Snapshots even after its lease ran out.
    SnapshotsAfterLease,
    /// Commits whatever freeze it holds, whatever freeze token the Commit names (the agent
    /// before the freeze token).
    IgnoresFreezeToken,
}

/// A request from the listener to an agent.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Req {
    Prepare {
        lease_ms: u64,
    },
    /// `token`: the freeze token the listener's record held for this server when it emitted
    /// the Commit (0: none).
    Commit {
        token: u8,
    },
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
    /// The RPC failed (lost request or reply, deadline, agent down).
    Failed(ReqKind),
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReqKind {
    Prepare,
    Commit,
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

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Phase {
    /// `froze_after`: how many snapshots (of any server) existed when this freeze began.
    Frozen {
        lease_end: Millis,
        froze_after: u8,
    },
    Snapshotted,
    ThawedExpired,
    Aborted,
    Failed,
    Cleaned,
}

/// The agent's table entry for the one backup (its volatile memory).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Entry {
    pub phase: Phase,
    /// The token of this entry's freeze (0: it never froze).
    pub token: u8,
    pub prepared: Option<bool>,
    pub committed: Option<Option<u8>>,
}

#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct Agent {
    pub entry: Option<Entry>,
    /// Snapshot ids on disk (bit mask): survives a crash.
    pub disk: u32,
    /// Freezes so far, across crashes: the next freeze's token is one more, so every freeze
    /// gets a fresh one (the real agent draws a random one).
    pub freezes: u8,
}

impl Agent {
    fn frozen(&self) -> Option<(Millis, u8)> {
        match self.entry.map(|e| e.phase) {
            Some(Phase::Frozen { lease_end, froze_after }) => Some((lease_end, froze_after)),
            _ => None,
        }
    }

    /// What the agent's status shows the sweep: a freeze, or snapshots on disk (an orphan
    /// after a restart included).
    fn holds(&self) -> bool {
        self.frozen().is_some() || self.disk != 0
    }

    /// Whether a Commit naming `token` may act on this agent's entry: no token (an old
    /// listener), or the token of the freeze it holds.
    fn accepts(&self, token: u8, flaw: Option<Flaw>) -> bool {
        let held = self.entry.map_or(0, |e| e.token);
        token == 0 || token == held || flaw == Some(Flaw::IgnoresFreezeToken)
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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct World {
    pub now: Millis,
    pub coordinator: Coordinator,
    pub agents: Vec<Agent>,
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
                Command::Log { .. } => {}
                Command::Prepare { server, lease_ms } => self.push(Msg::ToAgent {
                    to: server_index(&server),
                    req: Req::Prepare { lease_ms },
                    rpc: true,
                }),
                Command::Commit { server } => {
                    // As the runtime does: the token is the record's when the command is run.
                    let to = server_index(&server);
                    let token = &self.record().servers[usize::from(to)].freeze_token;
                    let token = if token.is_empty() {
                        0
                    } else {
                        token.parse().expect("a model freeze token")
                    };
                    self.push(Msg::ToAgent { to, req: Req::Commit { token }, rpc: true })
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
                    snapshots: vec![SnapshotRef {
                        volume: "data".into(),
                        provider: "model".into(),
                        locator: id.to_string(),
                        size_bytes: 1,
                    }],
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
            Reply::Aborted => Event::Aborted { server, result: Ok(()) },
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
        self.snaps.push(Snap { agent, froze_after, while_frozen });
        self.agents[usize::from(agent)].disk |= 1 << id;
        id
    }

    /// The agent's rules (`agent/src/backups.rs`) for one request; returns its answer.
    fn agent_handles(&mut self, i: u8, req: Req, failing: bool, flaw: Option<Flaw>) -> Reply {
        let broken = flaw == Some(Flaw::SnapshotsAfterLease);
        let now = self.now;
        let snaps_so_far = u8::try_from(self.snaps.len()).expect("few snapshots");
        let a = &mut self.agents[usize::from(i)];
        match req {
            Req::Prepare { lease_ms } => match a.entry {
                // A duplicate gets the first answer again, the same freeze token included.
                Some(e) => match (e.phase, e.prepared) {
                    (Phase::Frozen { .. } | Phase::Failed, Some(p)) => Reply::Prepared(p, e.token),
                    _ => Reply::Prepared(false, 0),
                },
                None if failing => {
                    a.entry = Some(Entry {
                        phase: Phase::Failed,
                        token: 0,
                        prepared: Some(false),
                        committed: None,
                    });
                    Reply::Prepared(false, 0)
                }
                None => {
                    let lease_end = now + Millis::try_from(lease_ms).expect("small lease");
                    let phase = Phase::Frozen { lease_end, froze_after: snaps_so_far };
                    a.freezes += 1;
                    let token = a.freezes;
                    a.entry = Some(Entry { phase, token, prepared: Some(true), committed: None });
                    Reply::Prepared(true, token)
                }
            },
            Req::Commit { token } => {
                let Some(mut e) = a.entry else { return Reply::Committed(None) };
                if !a.accepts(token, flaw) {
                    // Meant for a freeze before a restart: no snapshot, and the freeze it
                    // holds is left to its lease or an Abort.
                    return Reply::Committed(None);
                }
                let reply = match e.phase {
                    Phase::Frozen { lease_end, froze_after } => {
                        if now >= lease_end && !broken {
                            e.phase = Phase::ThawedExpired;
                            Reply::Committed(None)
                        } else if failing {
                            a.disk = 0;
                            e.phase = Phase::Failed;
                            e.committed = Some(None);
                            Reply::Committed(None)
                        } else {
                            let while_frozen = now < lease_end;
                            e.phase = Phase::Snapshotted;
                            let id = self.take_snapshot(i, froze_after, while_frozen);
                            let a = &mut self.agents[usize::from(i)];
                            e.committed = Some(Some(id));
                            a.entry = Some(e);
                            return Reply::Committed(Some(id));
                        }
                    }
                    Phase::ThawedExpired if broken => {
                        e.phase = Phase::Snapshotted;
                        let id = self.take_snapshot(i, snaps_so_far, false);
                        e.committed = Some(Some(id));
                        self.agents[usize::from(i)].entry = Some(e);
                        return Reply::Committed(Some(id));
                    }
                    Phase::ThawedExpired => Reply::Committed(None),
                    _ => Reply::Committed(e.committed.flatten()),
                };
                a.entry = Some(e);
                reply
            }
            Req::Abort => {
                a.disk = 0;
                match &mut a.entry {
                    Some(e) if e.phase == Phase::Cleaned => {}
                    Some(e) => e.phase = Phase::Aborted,
                    None => {
                        a.entry = Some(Entry {
                            phase: Phase::Aborted,
                            token: 0,
                            prepared: None,
                            committed: None,
                        })
                    }
                }
                Reply::Aborted
            }
            Req::Cleanup => {
                let n = u8::try_from(a.disk.count_ones()).expect("few snapshots");
                a.disk = 0;
                match &mut a.entry {
                    Some(e) => e.phase = Phase::Cleaned,
                    None => {
                        a.entry = Some(Entry {
                            phase: Phase::Cleaned,
                            token: 0,
                            prepared: None,
                            committed: None,
                        })
                    }
                }
                Reply::CleanedUp(n)
            }
        }
    }

    /// The next instant at which something is due: the coordinator's deadline or a lease's end.
    fn next_instant(&self) -> Option<Millis> {
        let leases = self.agents.iter().filter_map(|a| a.frozen().map(|(end, _)| end));
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
            let entry = a.entry.map(|e| (e.phase, e.token));
            let _ = write!(out, " | agent (phase, token)={entry:?} disk={:#b}", a.disk);
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
        let record = BackupRecord::new("b1", "g", &servers, "model", 0);
        let mut world = World {
            now: 0,
            coordinator: Coordinator::new(record, TIMEOUTS),
            agents: vec![Agent::default(); self.agents],
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
                Msg::ToAgent { to, req, rpc } => {
                    let agent = &w.agents[usize::from(to)];
                    let e = agent.entry;
                    let can_fail = match req {
                        Req::Prepare { .. } => left.prepare_fails > 0 && e.is_none(),
                        Req::Commit { token } => {
                            left.commit_fails > 0
                                && agent.accepts(token, self.flaw)
                                && matches!(e.map(|e| e.phase), Some(Phase::Frozen { lease_end, .. }) if w.now < lease_end)
                        }
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
            if let Some((lease_end, _)) = a.frozen() {
                if w.now >= lease_end {
                    actions.push(Action::LeaseExpires(i));
                }
            }
            if left.crashes > 0 && a.entry.is_some() {
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
        let lease_due = w.agents.iter().any(|a| a.frozen().is_some_and(|(end, _)| end <= w.now));
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
                        let reply = w.agent_handles(to, req, failing, self.flaw);
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
                    Ok(String::new())
                } else {
                    Err("snapshot gone".to_string())
                };
                w.feed(Event::Copied { server, result });
            }
            Action::LeaseExpires(i) => {
                let e = w.agents[usize::from(i)].entry.as_mut().expect("frozen");
                e.phase = Phase::ThawedExpired;
            }
            Action::AgentCrashes(i) => {
                w.left.crashes -= 1;
                w.agents[usize::from(i)].entry = None;
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
            Property::always(LEASE, |_, w: &World| {
                w.agents.iter().all(|a| a.frozen().is_none_or(|(end, _)| w.now <= end))
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
    }
}

pub const CONSISTENT_VERDICT: &str =
    "1. a consistent verdict means every server was frozen at one instant";
pub const SUCCEEDED_CUT: &str = "1b. every SUCCEEDED backup's snapshots share a frozen instant";
pub const LEASE: &str = "2. no agent stays frozen past its lease";
pub const QUIESCENT_CLEAN: &str =
    "3. when all is quiet, the backup ended and nothing is frozen or left on disk";
pub const SUCCEEDED_COPIED: &str = "4. a SUCCEEDED backup has a copy of every server's snapshots";
pub const NO_SNAPSHOT_AFTER_THAW: &str = "5. no agent snapshots after its own thaw";
pub const SUCCEEDS: &str = "6. a backup can succeed";
pub const FAILS_AFTER_SNAPSHOTS: &str = "6b. a backup can fail after snapshots were taken";
