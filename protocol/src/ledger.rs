//! The freeze guardian's bookkeeping: which thaw actions it holds for which backup and when each
//! lease runs out. Pure: time is an argument and the actions are opaque (`A`); the guardian
//! process (`agent/src/guardian.rs`) runs them, and the simulation drives this same ledger.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// How many thawed backups the guardian remembers, to answer a late release or arm.
const KEEP_THAWED: usize = 100;

/// A message from the agent, one JSON line each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request<A> {
    /// Hold `action` (named `key`, the quiescer) for `backup`. The first arm of a backup starts
    /// its lease of `lease_ms`, counted from when the guardian reads it.
    Arm { backup: String, lease_ms: u64, key: String, action: A },
    /// Forget one action: its freeze did not happen (e.g. EBUSY, someone else's freeze).
    Disarm { backup: String, key: String },
    /// Hand every action of `backup` back to the agent, which thaws it itself.
    Release { backup: String },
}

/// What the guardian did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Armed,
    Disarmed,
    /// The actions are the agent's again: it must run them.
    Released,
    /// The guardian already ran this backup's actions (its lease ran out): do not run them again.
    AlreadyThawed,
    /// The guardian holds nothing for this backup.
    Unknown,
}

/// The thaw actions held for one backup, in the order they were armed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held<A> {
    pub backup: String,
    pub lease_ms: u64,
    /// Guardian milliseconds at which the lease runs out.
    pub deadline: u64,
    pub actions: Vec<(String, A)>,
}

/// The guardian's bookkeeping: what it holds and when each lease runs out. No IO, no clock.
#[derive(Debug)]
pub struct Ledger<A> {
    held: Vec<Held<A>>,
    thawed: VecDeque<String>,
}

impl<A> Default for Ledger<A> {
    fn default() -> Self {
        Ledger { held: Vec::new(), thawed: VecDeque::new() }
    }
}

impl<A> Ledger<A> {
    /// Applies one request received at `now` (ms).
    pub fn handle(&mut self, now: u64, request: Request<A>) -> Outcome {
        match request {
            Request::Arm { backup, lease_ms, key, action } => {
                if self.thawed.contains(&backup) {
                    return Outcome::AlreadyThawed;
                }
                match self.held.iter_mut().find(|h| h.backup == backup) {
                    Some(h) => {
                        h.actions.retain(|(k, _)| *k != key);
                        h.actions.push((key, action));
                    }
                    None => self.held.push(Held {
                        backup,
                        lease_ms,
                        deadline: now.saturating_add(lease_ms),
                        actions: vec![(key, action)],
                    }),
                }
                Outcome::Armed
            }
            Request::Disarm { backup, key } => {
                match self.held.iter_mut().find(|h| h.backup == backup) {
                    Some(h) if h.actions.iter().any(|(k, _)| *k == key) => {
                        h.actions.retain(|(k, _)| *k != key);
                        Outcome::Disarmed
                    }
                    _ if self.thawed.contains(&backup) => Outcome::AlreadyThawed,
                    _ => Outcome::Unknown,
                }
            }
            Request::Release { backup } => {
                match self.held.iter().position(|h| h.backup == backup) {
                    Some(at) => {
                        self.held.remove(at);
                        Outcome::Released
                    }
                    None if self.thawed.contains(&backup) => Outcome::AlreadyThawed,
                    None => Outcome::Unknown,
                }
            }
        }
    }

    /// The earliest lease end among held backups.
    pub fn next_deadline(&self) -> Option<u64> {
        self.held.iter().map(|h| h.deadline).min()
    }

    /// Takes the backups whose lease ran out by `now`, each with its actions in reverse order
    /// (the order to run them), and remembers them as thawed.
    pub fn due(&mut self, now: u64) -> Vec<Held<A>> {
        let (due, keep): (Vec<Held<A>>, Vec<Held<A>>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| now >= h.deadline);
        self.held = keep;
        due.into_iter().map(|h| self.thawing(h)).collect()
    }

    /// Takes everything held (the agent is gone), newest backup first, actions reversed.
    pub fn drain(&mut self) -> Vec<Held<A>> {
        let all = std::mem::take(&mut self.held);
        all.into_iter().rev().map(|h| self.thawing(h)).collect()
    }

    fn thawing(&mut self, mut held: Held<A>) -> Held<A> {
        held.actions.reverse();
        self.thawed.push_back(held.backup.clone());
        while self.thawed.len() > KEEP_THAWED {
            self.thawed.pop_front();
        }
        held
    }
}
