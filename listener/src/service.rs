//! The `Listener` gRPC service: thin handlers over the runtime and the store. Who may call what
//! is decided by `policy`, enforced by the authorize layer before any handler runs.

use std::pin::Pin;
use std::sync::Arc;

use stillpoint_core::identity::{Identity, Role};
use stillpoint_proto as pb;
use stillpoint_proto::listener_server::Listener;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::convert;
use crate::details;
use crate::error::Error;
use crate::feed;
use crate::pages;
use crate::requests::{self, Reports, RequestId};
use crate::runtime::Runtime;
use crate::wait;

/// Which roles may call which Listener method. Anyone authenticated may probe the standard
/// health service.
pub fn policy(path: &str, role: Role) -> bool {
    if stillpoint_core::layers::is_health_check(path) {
        return true;
    }
    let Some(method) = path.strip_prefix("/stillpoint.v1.Listener/") else { return false };
    let read = matches!(
        method,
        "GetBackup"
            | "WaitBackup"
            | "ListBackups"
            | "GetLog"
            | "WatchBackup"
            | "WatchBackups"
            | "ListAgents"
            | "Health"
            | "ListSchedules"
    );
    match role {
        Role::Operator => true,
        Role::Hook => {
            read || matches!(
                method,
                "StartBackup"
                    | "AbortBackup"
                    | "ReportCopy"
                    | "ReportCopyProgress"
                    | "GetArtifacts"
            )
        }
        Role::Viewer => read,
        Role::Listener | Role::Agent => method == "Health",
    }
}

pub struct ListenerService {
    runtime: Arc<Runtime>,
    reports: Reports,
    /// Turns true when the listener shuts down: streams that never end by themselves end then.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl ListenerService {
    pub fn new(runtime: Arc<Runtime>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        ListenerService { runtime, reports: Reports::default(), stopping }
    }
}

fn caller<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<Identity>()
        .map(ToString::to_string)
        .unwrap_or_else(|| "unknown".into())
}

fn backup_id(id: &str) -> Result<(), Error> {
    details::name("backup_id", id)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Listener for ListenerService {
    async fn start_backup(
        &self,
        request: Request<pb::StartBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let by = caller(&request);
        let request = request.into_inner();
        let request_id = RequestId::parse(&request.request_id)?;
        let record = self.runtime.start(&request.group, &by, request_id.as_ref()).await?;
        Ok(Response::new(convert::backup(&record)))
    }

    async fn get_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let id = request.into_inner().backup_id;
        backup_id(&id)?;
        Ok(Response::new(convert::backup(&self.runtime.backup(&id)?)))
    }

    async fn preflight(
        &self,
        request: Request<pb::PreflightRequest>,
    ) -> Result<Response<pb::PreflightResponse>, Status> {
        let group = request.into_inner().group;
        let found = crate::preflight::group(self.runtime.config(), &group).await?;
        Ok(Response::new(pb::PreflightResponse {
            findings: found.iter().map(Into::into).collect(),
        }))
    }

    async fn get_artifacts(
        &self,
        request: Request<pb::GetArtifactsRequest>,
    ) -> Result<Response<pb::GetArtifactsResponse>, Status> {
        let request = request.into_inner();
        backup_id(&request.backup_id)?;
        let record = self.runtime.backup(&request.backup_id)?;
        let server = (!request.server.is_empty()).then_some(request.server.as_str());
        Ok(Response::new(convert::artifacts(&record, server)?))
    }

    async fn wait_backup(
        &self,
        request: Request<pb::WaitBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let budget = wait::budget(request.get_ref().timeout_ms, request.metadata());
        let request = request.into_inner();
        backup_id(&request.backup_id)?;
        let until = convert::wait_until(request.until)?;
        let record = wait::wait(&self.runtime, &request.backup_id, until, budget).await?;
        Ok(Response::new(convert::backup(&record)))
    }

    async fn list_backups(
        &self,
        request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let query = convert::list_query(request.get_ref())?;
        let mut all = self.runtime.store().list()?;
        // Forgotten backups stay as history, listed only when asked for.
        all.retain(|r| request.get_ref().include_expired || r.expired.is_none());
        let (page, next) = pages::page(all, &query);
        Ok(Response::new(pb::ListBackupsResponse {
            backups: page.iter().map(convert::backup).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_log(
        &self,
        request: Request<pb::GetLogRequest>,
    ) -> Result<Response<pb::GetLogResponse>, Status> {
        let request = request.into_inner();
        let id = request.backup_id;
        backup_id(&id)?;
        self.runtime.store().get(&id)?;
        // Wire seq N is store sequence number N - 1: entries after N start at store seq N.
        let entries = self
            .runtime
            .store()
            .log(&id, request.after_seq)?
            .iter()
            .map(|(seq, e)| convert::log_entry(*seq, e))
            .collect();
        Ok(Response::new(pb::GetLogResponse { entries }))
    }

    type WatchBackupStream = WatchStream;

    async fn watch_backup(
        &self,
        request: Request<pb::WatchBackupRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let request = request.into_inner();
        let id = request.backup_id;
        backup_id(&id)?;
        // Wire seq N is store sequence number N - 1: resuming after N starts at store seq N.
        let watched = self.runtime.watch(&id, request.after_seq)?;
        let events = tokio_stream::wrappers::ReceiverStream::new(watched).map(move |w| {
            Ok(pb::WatchEvent {
                entry: w.entry.map(|(seq, e)| convert::log_entry(seq, &e)),
                backup: w.record.map(|r| convert::backup(&r)),
                backup_id: id.clone(),
            })
        });
        Ok(Response::new(Box::pin(events)))
    }

    type WatchBackupsStream = feed::Events;

    async fn watch_backups(
        &self,
        request: Request<pb::WatchBackupsRequest>,
    ) -> Result<Response<feed::Events>, Status> {
        let group = request.into_inner().group;
        let group = if group.is_empty() {
            None
        } else {
            self.runtime.config().group(&group)?;
            Some(group)
        };
        let updates = self.runtime.subscribe();
        Ok(Response::new(feed::events(updates, group, self.stopping.clone())))
    }

    async fn abort_backup(
        &self,
        request: Request<pb::AbortBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let by = caller(&request);
        let request = request.into_inner();
        backup_id(&request.backup_id)?;
        let reason =
            if request.reason.is_empty() { "no reason given".to_string() } else { request.reason };
        let record = requests::abort(&self.runtime, &request.backup_id, by, reason).await?;
        Ok(Response::new(convert::backup(&record)))
    }

    async fn list_agents(
        &self,
        _: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        Ok(Response::new(pb::ListAgentsResponse { agents: self.runtime.agents().await }))
    }

    async fn report_copy(
        &self,
        request: Request<pb::ReportCopyRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let by = caller(&request);
        let request = request.into_inner();
        backup_id(&request.backup_id)?;
        // An unknown backup is NOT_FOUND, whatever the copy mode.
        self.runtime.backup(&request.backup_id)?;
        self.runtime.check_copy_report(&request.backup_id)?;
        let record = self
            .reports
            .report(
                &self.runtime,
                &request.backup_id,
                &request.server,
                request.ok,
                &by,
                &request.detail,
            )
            .await?;
        Ok(Response::new(convert::backup(&record)))
    }

    async fn report_copy_progress(
        &self,
        request: Request<pb::ReportCopyProgressRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let request = request.into_inner();
        backup_id(&request.backup_id)?;
        // An unknown backup is NOT_FOUND, whatever the copy mode.
        self.runtime.backup(&request.backup_id)?;
        self.runtime.check_copy_report(&request.backup_id)?;
        let record = requests::progress(
            &self.runtime,
            &request.backup_id,
            &request.server,
            request.done_bytes,
            request.total_bytes,
        )
        .await?;
        Ok(Response::new(convert::backup(&record)))
    }

    async fn list_schedules(
        &self,
        _: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let (views, time_zone) = self.runtime.schedules();
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: views.iter().map(convert::schedule).collect(),
            time_zone,
            now_unix_ms: self.runtime.now(),
        }))
    }

    async fn suspend_schedule(
        &self,
        request: Request<pb::SuspendScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let name = request.into_inner().name;
        let view = self.runtime.suspend_schedule(&name, true).await?;
        Ok(Response::new(convert::schedule(&view)))
    }

    async fn resume_schedule(
        &self,
        request: Request<pb::ResumeScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let name = request.into_inner().name;
        let view = self.runtime.suspend_schedule(&name, false).await?;
        Ok(Response::new(convert::schedule(&view)))
    }

    async fn pin_backup(
        &self,
        request: Request<pb::PinBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let by = caller(&request);
        let id = request.into_inner().backup_id;
        backup_id(&id)?;
        Ok(Response::new(convert::backup(&crate::pins::pin(&self.runtime, &id, true, &by).await?)))
    }

    async fn unpin_backup(
        &self,
        request: Request<pb::UnpinBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let by = caller(&request);
        let id = request.into_inner().backup_id;
        backup_id(&id)?;
        Ok(Response::new(convert::backup(&crate::pins::pin(&self.runtime, &id, false, &by).await?)))
    }

    async fn apply_retention(
        &self,
        request: Request<pb::ApplyRetentionRequest>,
    ) -> Result<Response<pb::ApplyRetentionResponse>, Status> {
        let by = caller(&request);
        let request = request.into_inner();
        let outcome =
            crate::forget::apply(&self.runtime, &request.group, request.dry_run, &by).await?;
        Ok(Response::new(convert::retention(&outcome)))
    }

    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        Ok(Response::new(pb::HealthResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            caller: caller(&request),
            lease_ms: self.runtime.config().timeouts.lease_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_read_operators_act_agents_only_probe() {
        let path = |m: &str| format!("/stillpoint.v1.Listener/{m}");
        assert!(policy(&path("WatchBackup"), Role::Viewer));
        assert!(!policy(&path("StartBackup"), Role::Viewer));
        assert!(!policy(&path("AbortBackup"), Role::Viewer));
        assert!(!policy(&path("ReportCopy"), Role::Viewer));
        assert!(policy(&path("StartBackup"), Role::Hook));
        assert!(policy(&path("ReportCopy"), Role::Hook));
        assert!(policy(&path("ReportCopyProgress"), Role::Hook));
        assert!(!policy(&path("ReportCopyProgress"), Role::Viewer));
        assert!(policy(&path("GetArtifacts"), Role::Hook), "the backup software needs them");
        assert!(policy(&path("GetArtifacts"), Role::Operator));
        assert!(!policy(&path("GetArtifacts"), Role::Viewer), "they are data, not status");
        assert!(policy(&path("AbortBackup"), Role::Operator));
        for retention in ["PinBackup", "UnpinBackup", "ApplyRetention"] {
            assert!(policy(&path(retention), Role::Operator));
            assert!(!policy(&path(retention), Role::Hook), "{retention}: operators only");
            assert!(!policy(&path(retention), Role::Viewer), "{retention}: operators only");
        }
        assert!(!policy(&path("StartBackup"), Role::Agent));
        assert!(policy(&path("Health"), Role::Agent));
        assert!(!policy("/stillpoint.v1.Agent/Prepare", Role::Operator));
        assert!(policy("/grpc.health.v1.Health/Check", Role::Agent));
        assert!(policy("/grpc.health.v1.Health/Watch", Role::Viewer));
        assert!(policy(&path("ListSchedules"), Role::Viewer));
        assert!(policy(&path("SuspendSchedule"), Role::Operator));
        assert!(policy(&path("ResumeSchedule"), Role::Operator));
        for role in [Role::Viewer, Role::Hook, Role::Agent] {
            assert!(!policy(&path("SuspendSchedule"), role), "{role:?} must not suspend");
            assert!(!policy(&path("ResumeSchedule"), role), "{role:?} must not resume");
        }
    }
}
