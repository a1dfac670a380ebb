//! The tonic `Agent` service: checks each request's arguments and hands it to the backups
//! table (or, for Copy, to the copier). Who may call is decided before this, by the authorize
//! layer in `run`.

use std::sync::Arc;

use stillpoint_core::validate_name;
use stillpoint_proto::agent_server::Agent;
use stillpoint_proto::{
    AbortRequest, AbortResponse, CleanupRequest, CleanupResponse, CommitRequest, CommitResponse,
    CopyRequest, PrepareRequest, PrepareResponse, StatusRequest, StatusResponse,
};
use stillpoint_saveset::VolumeMeta;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::backups::Backups;
use crate::config::MIN_LEASE_MS;
use crate::copy::Saveset;
use crate::Error;

/// The agent's gRPC face.
pub struct AgentService {
    backups: Backups,
    max_lease_ms: u64,
    /// The repository Copy writes into, when `[saveset]` is configured.
    saveset: Option<Arc<Saveset>>,
}

impl AgentService {
    pub fn new(backups: Backups, max_lease_ms: u64, saveset: Option<Arc<Saveset>>) -> AgentService {
        AgentService { backups, max_lease_ms, saveset }
    }
}

fn backup_id(id: &str) -> Result<&str, Status> {
    validate_name("backup_id", id).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(id)
}

#[tonic::async_trait]
impl Agent for AgentService {
    type CopyStream = ReceiverStream<Result<stillpoint_proto::CopyEvent, Status>>;

    async fn copy(
        &self,
        request: Request<CopyRequest>,
    ) -> Result<Response<Self::CopyStream>, Status> {
        let req = request.into_inner();
        let id = backup_id(&req.backup_id)?;
        let server = self.backups.server();
        let Some(saveset) = &self.saveset else {
            return Err(Error::FailedPrecondition(format!(
                "this agent has no [saveset] repository configured (server {server}); add [saveset] with repository and passphrase_file or key_file to its config, or copy on the listener ([copy] on = \"listener\")"
            ))
            .into());
        };
        let (snapshots, hold) = self.backups.begin_copy(id)?;
        // A refusal here drops the hold: nothing was read.
        let snapshots = crate::copy::readable(snapshots).await?;
        let meta = VolumeMeta {
            backup: id.to_string(),
            server: server.to_string(),
            volume: String::new(),
        };
        let events = crate::copy::spawn(saveset.clone(), meta, snapshots, hold);
        Ok(Response::new(ReceiverStream::new(events)))
    }

    async fn prepare(
        &self,
        request: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        let req = request.into_inner();
        let id = backup_id(&req.backup_id)?;
        if !(MIN_LEASE_MS..=self.max_lease_ms).contains(&req.lease_ms) {
            return Err(Error::InvalidArgument(format!(
                "lease_ms must be between {MIN_LEASE_MS} and {}",
                self.max_lease_ms
            ))
            .into());
        }
        Ok(Response::new(self.backups.prepare(id, req.lease_ms).await?))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        let req = request.into_inner();
        let token = Some(req.freeze_token.as_str()).filter(|t| !t.is_empty());
        Ok(Response::new(self.backups.commit(backup_id(&req.backup_id)?, token).await?))
    }

    async fn abort(
        &self,
        request: Request<AbortRequest>,
    ) -> Result<Response<AbortResponse>, Status> {
        let req = request.into_inner();
        let id = backup_id(&req.backup_id)?;
        let reason = if req.reason.is_empty() { "no reason given" } else { req.reason.as_str() };
        Ok(Response::new(self.backups.abort(id, reason).await?))
    }

    async fn cleanup(
        &self,
        request: Request<CleanupRequest>,
    ) -> Result<Response<CleanupResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(self.backups.cleanup(backup_id(&req.backup_id)?).await?))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            server: self.backups.server().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            backups: self.backups.report().await,
        }))
    }
}
