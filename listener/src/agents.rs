//! The listener's side of the Agent service: one mTLS client per server of the inventory, each
//! RPC with its deadline (Prepare and Commit once, bounded by the protocol; Abort and Cleanup
//! retried, being idempotent), and replies turned into the coordinator's terms. It decides
//! nothing about a backup.

use std::collections::HashMap;
use std::time::Duration;

use stillpoint_core::layers::{BACKUP_HEADER, SERVER_HEADER};
use stillpoint_proto as pb;
use stillpoint_proto::agent_client::AgentClient;
use tonic::transport::Channel;

use crate::config::Config;
use crate::convert;
use crate::coordinator::{AbortOutcome, CommitReply, PrepareReply, ReleaseReply};
use crate::error::Result;
use stillpoint_protocol::hold::Hold;

/// How many times an idempotent call is tried, 200 ms then 400 ms apart.
pub const TRIES: u32 = 3;

pub struct Agents {
    clients: HashMap<String, AgentClient<Channel>>,
    /// Deadline of Abort, Cleanup and Status calls.
    rpc_ms: u64,
    /// Deadline of Prepare: an answer after the commit cutoff is useless.
    prepare_ms: u64,
    commit_ms: u64,
    /// Servers and the groups they are in, in inventory order (for `status`).
    inventory: Vec<(String, String, Vec<String>)>,
}

impl Agents {
    /// Makes a channel per server; nothing connects until the first call.
    pub fn new(config: &Config) -> Result<Agents> {
        let t = &config.timeouts;
        let channel_timeout = Duration::from_millis(t.lease_ms.max(t.rpc_ms));
        let mut clients = HashMap::new();
        let mut inventory = Vec::new();
        for s in &config.servers {
            let url = format!("https://{}", s.address);
            let channel =
                stillpoint_core::tls::channel(&url, &s.name, &config.tls, channel_timeout)?;
            clients.insert(s.name.clone(), AgentClient::new(channel));
            let groups = config
                .groups
                .iter()
                .filter(|g| g.servers.contains(&s.name))
                .map(|g| g.name.clone())
                .collect();
            inventory.push((s.name.clone(), s.address.clone(), groups));
        }
        Ok(Agents {
            clients,
            rpc_ms: t.rpc_ms,
            prepare_ms: t.commit_cutoff_ms(),
            commit_ms: t.protocol().commit_timeout_ms,
            inventory,
        })
    }

    pub fn client(&self, server: &str) -> std::result::Result<AgentClient<Channel>, String> {
        self.clients
            .get(server)
            .cloned()
            .ok_or_else(|| format!("server {server} is not in the inventory"))
    }

    /// What holds a server's writes, from its Status, once, within the RPC deadline.
    pub async fn inspect(
        &self,
        backup_id: &str,
        server: &str,
    ) -> std::result::Result<Hold, String> {
        let request = request(backup_id, server, pb::StatusRequest {}, self.rpc_ms);
        let status = self.call_once(server, |mut c| async move { c.status(request).await }).await?;
        convert::hold(status.hold())
            .ok_or_else(|| "the agent did not say what holds its writes (an older agent?)".into())
    }

    /// Prepare, once: its deadline is the protocol's commit cutoff. The agent refuses when its
    /// hold is below `require`.
    pub async fn prepare(
        &self,
        backup_id: &str,
        server: &str,
        (lease_ms, require): (u64, Hold),
    ) -> std::result::Result<PrepareReply, String> {
        let message = pb::PrepareRequest {
            backup_id: backup_id.into(),
            lease_ms,
            require_hold: convert::hold_class(require).into(),
        };
        let request = request(backup_id, server, message, self.prepare_ms);
        self.call_once(server, |mut c| async move { c.prepare(request).await })
            .await
            .map(convert::prepare_reply)
    }

    /// Commit, once: an agent answers within its snapshot budget, and refuses past its lease.
    pub async fn commit(
        &self,
        backup_id: &str,
        server: &str,
        (freeze_token, hold_until_release): (String, bool),
    ) -> std::result::Result<CommitReply, String> {
        let message =
            pb::CommitRequest { backup_id: backup_id.into(), freeze_token, hold_until_release };
        let request = request(backup_id, server, message, self.commit_ms);
        self.call_once(server, |mut c| async move { c.commit(request).await })
            .await
            .map(convert::commit_reply)
    }

    /// Abort, retried ([`TRIES`]); the error says how many tries failed and the last reason.
    pub async fn abort(
        &self,
        backup_id: &str,
        server: &str,
        reason: &str,
    ) -> std::result::Result<AbortOutcome, String> {
        let rpc_ms = self.rpc_ms;
        self.call_idempotent(server, |mut c| {
            let message =
                pb::AbortRequest { backup_id: backup_id.to_string(), reason: reason.to_string() };
            let request = request(backup_id, server, message, rpc_ms);
            async move { c.abort(request).await.map(tonic::Response::into_inner) }
        })
        .await
        .map(|r| AbortOutcome { thawed: r.thawed, snapshots_deleted: r.snapshots_deleted })
    }

    /// Release (the thaw barrier's end), retried ([`TRIES`]).
    pub async fn release(
        &self,
        backup_id: &str,
        server: &str,
    ) -> std::result::Result<ReleaseReply, String> {
        let rpc_ms = self.rpc_ms;
        self.call_idempotent(server, |mut c| {
            let message = pb::ReleaseRequest { backup_id: backup_id.to_string() };
            let request = request(backup_id, server, message, rpc_ms);
            async move { c.release(request).await.map(tonic::Response::into_inner) }
        })
        .await
        .map(convert::release_reply)
    }

    /// Cleanup, retried ([`TRIES`]); returns how many snapshots the agent deleted.
    pub async fn cleanup(&self, backup_id: &str, server: &str) -> std::result::Result<u32, String> {
        let rpc_ms = self.rpc_ms;
        self.call_idempotent(server, |mut c| {
            let message = pb::CleanupRequest { backup_id: backup_id.to_string() };
            let request = request(backup_id, server, message, rpc_ms);
            async move { c.cleanup(request).await.map(|r| r.into_inner().snapshots_deleted) }
        })
        .await
    }

    /// Asks every agent in the inventory for its status, in parallel.
    pub async fn status(&self) -> Vec<pb::AgentInfo> {
        let rpc_ms = self.rpc_ms.min(3_000);
        let calls = self.inventory.iter().map(|(server, address, groups)| {
            let mut info = pb::AgentInfo {
                server: server.clone(),
                address: address.clone(),
                groups: groups.clone(),
                ..Default::default()
            };
            async move {
                let request = request("", &info.server, pb::StatusRequest {}, rpc_ms);
                match self
                    .call_once(&info.server, |mut c| async move { c.status(request).await })
                    .await
                {
                    Ok(status) => {
                        info.reachable = true;
                        info.version = status.version;
                        info.backups = status.backups;
                    }
                    Err(e) => info.error = e,
                }
                info
            }
        });
        futures::future::join_all(calls).await
    }

    /// Calls an agent RPC once and returns the reply or why it failed, in words.
    async fn call_once<T, F, Fut>(&self, server: &str, call: F) -> std::result::Result<T, String>
    where
        F: FnOnce(AgentClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client(server)?;
        call(client).await.map(tonic::Response::into_inner).map_err(|s| explain(&s))
    }

    /// Calls an idempotent agent RPC up to [`TRIES`] times, 200 ms then 400 ms apart.
    async fn call_idempotent<T, F, Fut>(
        &self,
        server: &str,
        call: F,
    ) -> std::result::Result<T, String>
    where
        F: Fn(AgentClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let client = self.client(server)?;
        let mut delay = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 0..TRIES {
            if attempt > 0 {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            match call(client.clone()).await {
                Ok(v) => return Ok(v),
                Err(status) => last = explain(&status),
            }
        }
        Err(format!("{TRIES} tries: {last}"))
    }
}

/// A request naming the backup and server for the agent's trace, with a deadline.
pub fn request<T>(backup_id: &str, server: &str, message: T, timeout_ms: u64) -> tonic::Request<T> {
    let mut request = untimed_request(backup_id, server, message);
    request.set_timeout(Duration::from_millis(timeout_ms.max(1)));
    request
}

/// A request naming the backup and server for the agent's trace, with no overall deadline
/// (for the Copy stream, which is bounded by silence instead).
pub fn untimed_request<T>(backup_id: &str, server: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(v) = backup_id.parse() {
        request.metadata_mut().insert(BACKUP_HEADER, v);
    }
    if let Ok(v) = server.parse() {
        request.metadata_mut().insert(SERVER_HEADER, v);
    }
    request
}

pub fn explain(status: &tonic::Status) -> String {
    stillpoint_core::tls::explain(status)
}
