//! The tonic `Agent` service: checks each request's arguments and hands it to the backups
//! table (or, for Copy, to the copier). Who may call is decided before this, by the authorize
//! layer in `run`.

use std::sync::Arc;

use stillpoint_proto::agent_server::Agent;
use stillpoint_proto::{
    AbortRequest, AbortResponse, CleanupRequest, CleanupResponse, CommitRequest, CommitResponse,
    CopyRequest, HoldClass, PrepareRequest, PrepareResponse, ReleaseRequest, ReleaseResponse,
    StatusRequest, StatusResponse,
};
use stillpoint_protocol::agent::{BackupId, FreezeToken};
use stillpoint_saveset::VolumeMeta;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::backups::Backups;
use crate::config::MIN_LEASE_MS;
use crate::convert;
use crate::copy::Saveset;
use crate::Error;

/// The agent's gRPC face.
pub struct AgentService {
    backups: Backups,
    max_lease_ms: u64,
    /// The repository Copy writes into, when `[saveset]` is configured.
    saveset: Option<Arc<Saveset>>,
    /// What Preflight checks.
    config: Arc<crate::Config>,
}

impl AgentService {
    pub fn new(
        backups: Backups,
        config: Arc<crate::Config>,
        saveset: Option<Arc<Saveset>>,
    ) -> AgentService {
        AgentService { backups, max_lease_ms: config.max_lease_ms, saveset, config }
    }
}

/// The request's backup id, parsed once here: past this point it is a [`BackupId`].
fn backup_id(id: &str) -> Result<BackupId, Status> {
    BackupId::parse(id).map_err(|e| Status::invalid_argument(format!("backup_id: {e}")))
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn preflight(
        &self,
        _: Request<stillpoint_proto::AgentPreflightRequest>,
    ) -> Result<Response<stillpoint_proto::AgentPreflightResponse>, Status> {
        use stillpoint_core::preflight::Finding;
        let config = self.config.clone();
        let mut findings = tokio::task::spawn_blocking(move || crate::preflight::local(&config))
            .await
            .map_err(|e| Status::internal(format!("preflight: {e}")))?;
        findings.push(match self.backups.check_provider().await {
            Ok(detail) if detail.is_empty() => Finding::ok("snapshot provider", "check passed"),
            Ok(detail) => Finding::ok("snapshot provider", detail),
            Err(e) => Finding::error("snapshot provider", format!("{e:#}")),
        });
        let guardian = self.backups.guardian_pid().await;
        findings.push(match guardian {
            Some(pid) if std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                Finding::ok("guardian", format!("freeze guardian runs as pid {pid}"))
            }
            _ => Finding::error(
                "guardian",
                "no freeze guardian runs: Prepare is refused until one does (see the agent's log)",
            ),
        });
        let server = self.backups.server().to_string();
        let findings = findings.iter().map(|f| (&f.clone().on(&server)).into()).collect();
        Ok(Response::new(stillpoint_proto::AgentPreflightResponse { findings }))
    }

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
        let (snapshots, hold) = self.backups.begin_copy(&id)?;
        let snapshots = snapshots.into_iter().map(convert::snapshot).collect();
        // A qcow2 snapshot lives inside its disk: exported as a raw file while the copy reads.
        let (snapshots, exports) = crate::copy::exported(snapshots).await?;
        // A refusal here drops the hold: nothing was read.
        let snapshots = crate::copy::readable(snapshots).await?;
        let meta = VolumeMeta {
            backup: id.to_string(),
            server: server.to_string(),
            volume: String::new(),
        };
        let copy = crate::copy::Request { meta, group: req.group, snapshots };
        let events = crate::copy::spawn(saveset.clone(), copy, hold, exports);
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
        // An unknown class number (a newer listener) asks for more than we know: refuse.
        let require =
            HoldClass::try_from(req.require_hold).map(convert::required_hold).map_err(|_| {
                Status::invalid_argument(format!(
                    "require_hold: unknown hold class {}",
                    req.require_hold
                ))
            })?;
        let reply = self.backups.prepare(&id, req.lease_ms, require).await?;
        Ok(Response::new(convert::prepare_response(reply)))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        let req = request.into_inner();
        let id = backup_id(&req.backup_id)?;
        // Empty skips the check (tools and tests only).
        let token = match req.freeze_token.as_str() {
            "" => None,
            t => Some(
                FreezeToken::parse(t)
                    .map_err(|e| Status::invalid_argument(format!("freeze_token: {e}")))?,
            ),
        };
        let reply = self.backups.commit(&id, token.as_ref(), req.hold_until_release).await?;
        Ok(Response::new(convert::commit_response(reply)))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let id = backup_id(&request.into_inner().backup_id)?;
        Ok(Response::new(convert::release_response(self.backups.release(&id).await?)))
    }

    async fn abort(
        &self,
        request: Request<AbortRequest>,
    ) -> Result<Response<AbortResponse>, Status> {
        let req = request.into_inner();
        let id = backup_id(&req.backup_id)?;
        let reason = if req.reason.is_empty() { "no reason given" } else { req.reason.as_str() };
        Ok(Response::new(convert::abort_response(self.backups.abort(&id, reason).await?)))
    }

    async fn cleanup(
        &self,
        request: Request<CleanupRequest>,
    ) -> Result<Response<CleanupResponse>, Status> {
        let req = request.into_inner();
        let snapshots_deleted = self.backups.cleanup(&backup_id(&req.backup_id)?).await?;
        Ok(Response::new(CleanupResponse { snapshots_deleted }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            server: self.backups.server().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            backups: self.backups.report().await.into_iter().map(convert::agent_backup).collect(),
            hold: convert::hold_class(self.backups.hold()).into(),
        }))
    }
}
