//! The remote verbs against an in-process fake listener over real loopback mTLS: exit codes,
//! what goes to stdout, `start --wait` returning as soon as the snapshots exist, and the
//! server's words on a permission refusal. The real listener is exercised by `tests/` at the
//! workspace root.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backupctl::Cli;
use clap::Parser;
use stillpoint_core::certs::{create_ca, issue};
use stillpoint_core::identity::Role;
use stillpoint_core::tls::{incoming, server_config, TlsFiles};
use stillpoint_proto::listener_server::{Listener, ListenerServer};
use stillpoint_proto::*;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Scripted backups by group: `good` succeeds, `bad` fails in COMMITTING, `hang` reaches
/// SNAPSHOTTED and then never ends, `denied` is refused, `flaky`'s first try of each request id
/// is UNAVAILABLE.
#[derive(Default, Clone)]
struct Fake {
    backups: Arc<Mutex<HashMap<String, Backup>>>,
    headers: Arc<Mutex<Vec<String>>>,
    /// The request id of every StartBackup, in order.
    request_ids: Arc<Mutex<Vec<String>>>,
    /// What ListAgents answers.
    agents: Arc<Mutex<Vec<AgentInfo>>>,
}

fn backup(id: &str, group: &str, state: BackupState) -> Backup {
    Backup {
        backup_id: id.into(),
        group: group.into(),
        state: state as i32,
        created_unix_ms: 1_714_566_896_789,
        servers: vec![ServerProgress {
            server: "srv-a".into(),
            phase: format!("{state:?}").to_lowercase(),
            ..ServerProgress::default()
        }],
        ..Backup::default()
    }
}

fn script(group: &str) -> Vec<BackupState> {
    use BackupState::*;
    match group {
        "good" => vec![Preparing, Committing, Snapshotted, Copying, Cleaning, Succeeded],
        "bad" => vec![Preparing, Committing, Failed],
        _ => vec![Preparing, Committing, Snapshotted],
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

impl Fake {
    fn record<T>(&self, request: &Request<T>) {
        let header = request.metadata().get(stillpoint_core::layers::BACKUP_HEADER);
        let header = header.and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        self.headers.lock().unwrap().push(header);
    }

    fn get(&self, id: &str) -> Result<Backup, Status> {
        let backups = self.backups.lock().unwrap();
        backups.get(id).cloned().ok_or_else(|| Status::not_found(format!("no backup {id}")))
    }
}

#[tonic::async_trait]
impl Listener for Fake {
    async fn start_backup(
        &self,
        r: Request<StartBackupRequest>,
    ) -> Result<Response<Backup>, Status> {
        let StartBackupRequest { group, request_id } = r.into_inner();
        let first_try = {
            let mut ids = self.request_ids.lock().unwrap();
            ids.push(request_id.clone());
            !ids[..ids.len() - 1].contains(&request_id)
        };
        if group == "flaky" && first_try {
            // As if the listener started the backup but the reply was lost.
            return Err(Status::unavailable("connection reset"));
        }
        if group == "denied" {
            return Err(Status::permission_denied("viewer:vic may not call StartBackup"));
        }
        let id = format!("b-{group}");
        let b = backup(&id, &group, BackupState::Pending);
        self.backups.lock().unwrap().insert(id, b.clone());
        Ok(Response::new(b))
    }

    async fn get_backup(&self, r: Request<GetBackupRequest>) -> Result<Response<Backup>, Status> {
        self.record(&r);
        self.get(&r.into_inner().backup_id).map(Response::new)
    }

    async fn wait_backup(&self, r: Request<WaitBackupRequest>) -> Result<Response<Backup>, Status> {
        use prost::{Message, Name};
        self.record(&r);
        let request = r.into_inner();
        let current = self.get(&request.backup_id)?;
        let script = script(&current.group);
        let snapshots = |s: &BackupState| {
            matches!(s, BackupState::Snapshotted | BackupState::Copying | BackupState::Cleaning)
        };
        let reached = script.iter().find(|s| match WaitUntil::try_from(request.until) {
            Ok(WaitUntil::Snapshotted) => snapshots(s) || s.is_terminal(),
            _ => s.is_terminal(),
        });
        if let Some(state) = reached {
            return Ok(Response::new(backup(&current.backup_id, &current.group, *state)));
        }
        // As the listener does when the time runs out: the backup as it is, in the details.
        tokio::time::sleep(Duration::from_millis(request.timeout_ms.min(200))).await;
        let last = script.last().copied().unwrap_or(BackupState::Pending);
        let now = backup(&current.backup_id, &current.group, last);
        let details = tonic_types::pb::Status {
            code: tonic::Code::DeadlineExceeded as i32,
            message: "not yet".into(),
            details: vec![prost_types::Any {
                type_url: Backup::type_url(),
                value: now.encode_to_vec(),
            }],
        };
        Err(Status::with_details(
            tonic::Code::DeadlineExceeded,
            "not yet",
            details.encode_to_vec().into(),
        ))
    }

    async fn list_backups(
        &self,
        _: Request<ListBackupsRequest>,
    ) -> Result<Response<ListBackupsResponse>, Status> {
        let backups = self.backups.lock().unwrap().values().cloned().collect();
        Ok(Response::new(ListBackupsResponse { backups, next_page_token: String::new() }))
    }

    async fn get_log(&self, _: Request<GetLogRequest>) -> Result<Response<GetLogResponse>, Status> {
        Ok(Response::new(GetLogResponse::default()))
    }

    type WatchBackupStream = Events;

    async fn watch_backup(
        &self,
        r: Request<WatchBackupRequest>,
    ) -> Result<Response<Events>, Status> {
        self.record(&r);
        let request = r.into_inner();
        let current = self.get(&request.backup_id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            for (i, state) in script(&current.group).into_iter().enumerate() {
                let seq = u64::try_from(i).unwrap() + 1;
                if seq <= request.after_seq {
                    continue;
                }
                let b = backup(&current.backup_id, &current.group, state);
                let entry = LogEntry {
                    unix_ms: b.created_unix_ms + i64::try_from(i).unwrap(),
                    server: "srv-a".into(),
                    level: "info".into(),
                    message: format!("now {state:?}"),
                    state: state as i32,
                    seq,
                };
                let event = WatchEvent {
                    entry: Some(entry),
                    backup: Some(b),
                    backup_id: current.backup_id.clone(),
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if current.group == "hang" {
                // Holds the stream open as a backup that is still copying would.
                tx.closed().await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    type WatchBackupsStream = Events;

    async fn watch_backups(
        &self,
        _: Request<WatchBackupsRequest>,
    ) -> Result<Response<Events>, Status> {
        Err(Status::unimplemented("the fake follows one backup at a time"))
    }

    async fn abort_backup(
        &self,
        r: Request<AbortBackupRequest>,
    ) -> Result<Response<Backup>, Status> {
        self.record(&r);
        let id = r.into_inner().backup_id;
        let mut b = self.get(&id)?;
        b.state = BackupState::Aborted as i32;
        self.backups.lock().unwrap().insert(id, b.clone());
        Ok(Response::new(b))
    }

    async fn list_agents(
        &self,
        _: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        Ok(Response::new(ListAgentsResponse { agents: self.agents.lock().unwrap().clone() }))
    }

    async fn report_copy(&self, r: Request<ReportCopyRequest>) -> Result<Response<Backup>, Status> {
        self.record(&r);
        self.get(&r.into_inner().backup_id).map(Response::new)
    }

    async fn report_copy_progress(
        &self,
        r: Request<ReportCopyProgressRequest>,
    ) -> Result<Response<Backup>, Status> {
        self.record(&r);
        self.get(&r.into_inner().backup_id).map(Response::new)
    }

    async fn get_artifacts(
        &self,
        r: Request<GetArtifactsRequest>,
    ) -> Result<Response<GetArtifactsResponse>, Status> {
        self.record(&r);
        self.get(&r.into_inner().backup_id)?;
        Ok(Response::new(GetArtifactsResponse::default()))
    }

    async fn list_schedules(
        &self,
        _: Request<stillpoint_proto::ListSchedulesRequest>,
    ) -> Result<Response<stillpoint_proto::ListSchedulesResponse>, Status> {
        Ok(Response::new(stillpoint_proto::ListSchedulesResponse::default()))
    }

    async fn suspend_schedule(
        &self,
        _: Request<stillpoint_proto::SuspendScheduleRequest>,
    ) -> Result<Response<stillpoint_proto::Schedule>, Status> {
        Err(Status::not_found("the fake listener has no schedules"))
    }

    async fn resume_schedule(
        &self,
        _: Request<stillpoint_proto::ResumeScheduleRequest>,
    ) -> Result<Response<stillpoint_proto::Schedule>, Status> {
        Err(Status::not_found("the fake listener has no schedules"))
    }

    async fn preflight(
        &self,
        _: Request<PreflightRequest>,
    ) -> Result<Response<PreflightResponse>, Status> {
        Err(Status::unimplemented("fake listener"))
    }

    async fn pin_backup(
        &self,
        r: Request<stillpoint_proto::PinBackupRequest>,
    ) -> Result<Response<Backup>, Status> {
        self.record(&r);
        self.get(&r.into_inner().backup_id).map(Response::new)
    }

    async fn unpin_backup(
        &self,
        r: Request<stillpoint_proto::UnpinBackupRequest>,
    ) -> Result<Response<Backup>, Status> {
        self.record(&r);
        self.get(&r.into_inner().backup_id).map(Response::new)
    }

    async fn apply_retention(
        &self,
        _: Request<stillpoint_proto::ApplyRetentionRequest>,
    ) -> Result<Response<stillpoint_proto::ApplyRetentionResponse>, Status> {
        Err(Status::unimplemented("the fake keeps everything"))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse::default()))
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    certs: String,
    url: String,
    fake: Fake,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    create_ca(&certs, "test CA", 1).unwrap();
    let listener = issue(&certs, Role::Listener, "listener", &["127.0.0.1".into()], 1).unwrap();
    issue(&certs, Role::Operator, "op", &[], 1).unwrap();
    let files = TlsFiles { ca: listener.ca, cert: listener.cert, key: listener.key };
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", tcp.local_addr().unwrap());
    let fake = Fake::default();
    let service = ListenerServer::new(fake.clone());
    let stream = incoming(tcp, server_config(&files).unwrap());
    tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(stream),
    );
    Harness { _dir: dir, certs: path(&certs), url, fake }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

impl Harness {
    /// Runs `backupctl ARGS` as operator `op`; returns the exit code and stdout.
    async fn run(&self, args: &[&str]) -> (u8, String) {
        let global =
            ["backupctl", "--listener", &self.url, "--certs", &self.certs, "--identity", "op"];
        let cli = Cli::try_parse_from(global.iter().chain(args)).unwrap();
        let mut out = Vec::new();
        let code = tokio::time::timeout(Duration::from_secs(20), backupctl::run(cli, &mut out))
            .await
            .unwrap_or_else(|_| panic!("backupctl {args:?} did not return"));
        (code, String::from_utf8(out).unwrap())
    }
}

#[tokio::test]
async fn start_without_wait_prints_the_id() {
    let h = harness().await;
    assert_eq!(h.run(&["start", "--group", "good"]).await, (0, "b-good\n".into()));
}

#[tokio::test]
async fn start_retries_once_with_the_same_request_id() {
    let h = harness().await;
    assert_eq!(h.run(&["start", "--group", "flaky"]).await, (0, "b-flaky\n".into()));
    let ids = h.fake.request_ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], ids[1], "the retry carries the first try's request id");
    assert_eq!(ids[0].len(), 36, "a fresh UUID: {ids:?}");
    h.run(&["start", "--group", "good", "--request-id", "nightly-2024-05-01"]).await;
    h.run(&["start", "--group", "good"]).await;
    let ids = h.fake.request_ids.lock().unwrap().clone();
    assert_eq!(ids[2], "nightly-2024-05-01");
    assert!(!ids[..3].contains(&ids[3]), "every start gets a fresh id: {ids:?}");
}

#[tokio::test]
async fn start_wait_snapshotted_returns_once_snapshots_exist() {
    let h = harness().await;
    let (code, out) = h.run(&["start", "--group", "hang", "--wait", "snapshotted", "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "SNAPSHOTTED");
    assert!(h.fake.headers.lock().unwrap().contains(&"b-hang".to_string()));
}

#[tokio::test]
async fn start_wait_complete_exits_1_when_the_backup_fails() {
    let h = harness().await;
    assert_eq!(h.run(&["start", "--group", "good", "--wait", "complete"]).await.0, 0);
    assert_eq!(
        h.run(&["start", "--group", "bad", "--wait", "complete"]).await,
        (1, "b-bad\n".into())
    );
    assert_eq!(h.run(&["start", "--group", "bad", "--wait", "snapshotted"]).await.0, 1);
}

#[tokio::test]
async fn watch_prints_entries_and_follows_the_outcome() {
    let h = harness().await;
    h.run(&["start", "--group", "good"]).await;
    let (code, out) = h.run(&["watch", "b-good"]).await;
    assert_eq!(code, 0);
    assert!(
        out.starts_with("12:34:56.789  PREPARING    srv-a  now Preparing\n  srv-a: preparing\n"),
        "{out}"
    );
    assert!(out.contains("SUCCEEDED    srv-a  now Succeeded\n"), "{out}");

    h.run(&["start", "--group", "bad"]).await;
    let (code, out) = h.run(&["watch", "b-bad", "--json"]).await;
    assert_eq!(code, 1);
    let lines: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["backup"]["state"], "FAILED");
    assert_eq!(lines[2]["entry"]["state"], "FAILED");
}

#[tokio::test]
async fn abort_and_status_exit_0() {
    let h = harness().await;
    h.run(&["start", "--group", "hang"]).await;
    assert_eq!(h.run(&["abort", "b-hang"]).await, (0, "backup b-hang ABORTED\n".into()));
    let (code, out) = h.run(&["abort", "b-hang"]).await;
    assert_eq!(
        (code, out.as_str()),
        (0, "backup b-hang had already ended ABORTED; nothing to abort\n")
    );
    let (code, out) = h.run(&["status", "b-hang", "--json"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("\"state\":\"ABORTED\""), "{out}");
}

#[tokio::test]
async fn refusals_and_unknown_backups_exit_2() {
    let h = harness().await;
    assert_eq!(h.run(&["start", "--group", "denied"]).await.0, 2);
    assert_eq!(h.run(&["status", "nope"]).await.0, 2);
    assert_eq!(h.run(&["status", "--json"]).await, (0, "null\n".into()));
    assert_eq!(h.run(&["agents"]).await, (0, "no agents\n".into()));
}

#[tokio::test]
async fn agents_exits_3_naming_every_agent_that_does_not_answer() {
    let h = harness().await;
    let agent = |server: &str, reachable: bool, error: &str| AgentInfo {
        server: server.into(),
        address: format!("{server}:7501"),
        reachable,
        error: error.into(),
        ..AgentInfo::default()
    };
    *h.fake.agents.lock().unwrap() = vec![agent("srv-a", true, ""), agent("srv-b", true, "")];
    assert_eq!(h.run(&["agents"]).await.0, 0);
    h.fake.agents.lock().unwrap()[1] = agent("srv-b", false, "connection refused");
    let (code, out) = h.run(&["agents"]).await;
    assert_eq!(code, backupctl::EXIT_AGENT_UNREACHABLE, "{out}");
    // The table still lists both, saying which one does not answer.
    assert!(
        out.lines().any(|l| l.starts_with("srv-b") && l.contains("connection refused")),
        "{out}"
    );
    let (code, out) = h.run(&["agents", "--json"]).await;
    assert_eq!(code, 3);
    assert!(out.contains("\"reachable\":false"), "{out}");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_a_connection_error() {
    let h = harness().await;
    let other = tempfile::tempdir().unwrap();
    create_ca(other.path(), "other CA", 1).unwrap();
    issue(other.path(), Role::Operator, "op", &[], 1).unwrap();
    let certs = path(other.path());
    let args = ["backupctl", "--listener", &h.url, "--certs", &certs, "--identity", "op", "list"];
    let mut out = Vec::new();
    assert_eq!(backupctl::run(Cli::try_parse_from(args).unwrap(), &mut out).await, 2);
}

#[tokio::test]
async fn watch_streams_outlive_the_request_timeout() {
    let h = harness().await;
    h.run(&["start", "--group", "hang"]).await;
    let args = ["backupctl", "--listener", &h.url, "--certs", &h.certs, "--identity", "op"];
    let cli =
        Cli::try_parse_from(args.iter().chain(&["--timeout", "1", "watch", "b-hang"])).unwrap();
    let mut out = Vec::new();
    let watching =
        tokio::time::timeout(Duration::from_secs(3), backupctl::run(cli, &mut out)).await;
    assert!(watching.is_err(), "watch of an unfinished backup returned {watching:?}");
}
