//! The runtime served in-process over loopback mTLS: Watch streams carry every entry to the
//! last and end with their clients; background tasks end when `serve` returns. The agent is a
//! bare TCP port that counts connections and speaks no TLS, so every agent RPC fails.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stillpoint_core::certs;
use stillpoint_core::identity::Role;
use stillpoint_core::tls::TlsFiles;
use stillpoint_proto as pb;
use stillpoint_proto::listener_client::ListenerClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use super::Runtime;
use crate::config::Config;
use crate::model::{BackupRecord, ServerStep, SnapshotRef, State};

struct Fixture {
    dir: tempfile::TempDir,
    /// Connections the "agent" accepted.
    calls: Arc<AtomicUsize>,
    agent: SocketAddr,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let certs = dir.path().join("certs");
        certs::create_ca(&certs, "runtime test CA", 30).expect("CA");
        let local = ["127.0.0.1".to_string(), "localhost".to_string()];
        certs::issue(&certs, Role::Listener, "listener", &local, 30).expect("listener cert");
        certs::issue(&certs, Role::Operator, "operator", &[], 30).expect("operator cert");
        let socket = TcpListener::bind("127.0.0.1:0").expect("bind agent");
        let agent = socket.local_addr().expect("agent address");
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        std::thread::spawn(move || {
            for connection in socket.incoming() {
                counted.fetch_add(1, Ordering::Relaxed);
                drop(connection);
            }
        });
        Fixture { dir, calls, agent }
    }

    fn tls(&self, name: &str) -> TlsFiles {
        let certs = self.dir.path().join("certs");
        TlsFiles {
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("{name}.pem")),
            key: certs.join(format!("{name}.key")),
        }
    }

    fn config(&self, sweep_interval_ms: u64) -> Config {
        let tls = self.tls("listener");
        let text = format!(
            "data_dir = {data:?}\nlisten = \"127.0.0.1:1\"\n\n[tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\n[timeouts]\nrpc_ms = 300\nsweep_interval_ms = {sweep_interval_ms}\n\n[[server]]\nname = \"fs1\"\naddress = \"{agent}\"\n\n[[group]]\nname = \"g\"\nservers = [\"fs1\"]\n\n[[group]]\nname = \"h\"\nservers = [\"fs1\"]\n\n[copy]\nmode = \"report\"\n",
            data = path(&self.dir.path().join("data")),
            ca = path(&tls.ca),
            cert = path(&tls.cert),
            key = path(&tls.key),
            agent = self.agent,
        );
        let config: Config = toml::from_str(&text).expect("test config");
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        config
    }

    /// Serves `runtime` on a loopback port; returns its address, the stop switch and the task.
    async fn serve(
        &self,
        runtime: &Arc<Runtime>,
    ) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<crate::Result<()>>) {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind listener");
        let addr = socket.local_addr().expect("listener address");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let task = tokio::spawn(crate::serve(Arc::clone(runtime), socket, shutdown));
        (addr, stop, task)
    }

    fn client(&self, addr: SocketAddr) -> ListenerClient<Channel> {
        let url = format!("https://{addr}");
        let channel = stillpoint_core::tls::channel(
            &url,
            "listener",
            &self.tls("operator"),
            Duration::from_secs(5),
        )
        .expect("channel");
        ListenerClient::new(channel)
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A backup of `group` that a previous listener left COPYING in report mode: taken over at
/// start, it waits for the backup software, changing nothing meanwhile.
async fn left_copying(runtime: &Runtime, id: &str, group: &str) {
    let now = runtime.now();
    let mut record = BackupRecord::new(id, group, &["fs1".to_string()], "operator:test", now);
    record.state = State::Copying { deadline: now + 3_600_000 };
    let s = &mut record.servers[0];
    s.step = ServerStep::Copying;
    s.cut.prepare_sent = Some(now);
    s.cut.prepared = Some(now);
    s.cut.commit_sent = Some(now);
    s.cut.committed = Some(now);
    s.snapshots = vec![SnapshotRef {
        volume: "data".into(),
        provider: "mock-san".into(),
        locator: "/array/fs1".into(),
        size_bytes: 4096,
    }];
    runtime.store().save(&record, &[]).await.expect("seed the catalog");
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows a Watch stream to its end; returns its log messages.
async fn watch_to_the_end(client: &mut ListenerClient<Channel>, id: &str) -> Vec<String> {
    let request = pb::WatchBackupRequest { backup_id: id.into(), after_seq: 0 };
    let mut stream = client.watch_backup(request).await.expect("watch").into_inner();
    let mut seen = Vec::new();
    let follow = async {
        while let Some(event) = stream.message().await.expect("watch stream") {
            seen.extend(event.entry.map(|e| e.message));
        }
    };
    tokio::time::timeout(Duration::from_secs(30), follow).await.expect("the watch ends");
    seen
}

async fn log_of(client: &mut ListenerClient<Channel>, id: &str) -> Vec<String> {
    let request = pb::GetLogRequest { backup_id: id.into(), after_seq: 0 };
    let log = client.get_log(request).await.expect("get log").into_inner();
    log.entries.into_iter().map(|e| e.message).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_carries_every_entry_to_the_last() {
    let f = Fixture::new();
    let runtime = Runtime::open(f.config(60_000)).expect("runtime");
    left_copying(&runtime, "b-report", "g").await;
    left_copying(&runtime, "b-abort", "h").await;
    let (addr, _stop, _task) = f.serve(&runtime).await;
    let mut client = f.client(addr);

    // The copy report ends the backup (its cleanup fails: no agent), and lines follow the end.
    let watched = tokio::spawn({
        let mut client = client.clone();
        async move { watch_to_the_end(&mut client, "b-report").await }
    });
    wait_until("the watch to start", Duration::from_secs(5), || runtime.live_watches() == 1).await;
    let report = pb::ReportCopyRequest {
        backup_id: "b-report".into(),
        server: "fs1".into(),
        ok: true,
        detail: String::new(),
    };
    client.report_copy(report).await.expect("report copy");
    let settled = runtime.wait_until("b-report", |r| r.settled.is_some()).await.expect("wait");
    assert_eq!(settled.state, State::Succeeded);
    let watched = watched.await.expect("watch task");
    let log = log_of(&mut client, "b-report").await;
    assert_eq!(watched, log, "the watch saw what the log holds");
    assert!(log.contains(&"backup succeeded".to_string()), "{log:?}");
    assert!(log.last().is_some_and(|l| l.starts_with("settled without confirmation from fs1")));

    // An abort: the abort's own outcome comes after the backup is ABORTED.
    let watched = tokio::spawn({
        let mut client = client.clone();
        async move { watch_to_the_end(&mut client, "b-abort").await }
    });
    wait_until("the watch to start", Duration::from_secs(5), || runtime.live_watches() == 1).await;
    let abort = pb::AbortBackupRequest { backup_id: "b-abort".into(), reason: "test".into() };
    client.abort_backup(abort).await.expect("abort");
    let watched = watched.await.expect("watch task");
    let log = log_of(&mut client, "b-abort").await;
    assert_eq!(watched, log, "the watch saw what the log holds");
    assert!(log.iter().any(|l| l.starts_with("abort not delivered")), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_watch_streams_end_with_their_clients() {
    let f = Fixture::new();
    let runtime = Runtime::open(f.config(60_000)).expect("runtime");
    left_copying(&runtime, "b-idle", "g").await;
    let (addr, _stop, _task) = f.serve(&runtime).await;
    let client = f.client(addr);
    let mut streams = Vec::new();
    for _ in 0..40 {
        let request = pb::WatchBackupRequest { backup_id: "b-idle".into(), after_seq: 0 };
        let mut stream = client.clone().watch_backup(request).await.expect("watch").into_inner();
        stream.message().await.expect("history").expect("a first event");
        streams.push(stream);
    }
    assert_eq!(runtime.live_watches(), 40);
    drop(streams);
    drop(client);
    // The backup does not change: only the clients' going away can end the tasks.
    wait_until("every watch task to end", Duration::from_secs(5), || runtime.live_watches() == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_tasks_end_when_serve_returns() {
    let f = Fixture::new();
    let runtime = Runtime::open(f.config(100)).expect("runtime");
    let (_addr, stop, task) = f.serve(&runtime).await;
    wait_until("a few sweeps", Duration::from_secs(10), || f.calls.load(Ordering::Relaxed) >= 3)
        .await;
    let _ = stop.send(());
    task.await.expect("serve task").expect("serve");
    // A sweep under way may finish its last call.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after_stop = f.calls.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        f.calls.load(Ordering::Relaxed),
        after_stop,
        "the sweeper still calls agents after the listener stopped"
    );
}

/// Records, for every span named `backup`, the name of its parent (`None`: a root span).
#[derive(Clone, Default)]
struct BackupSpans(Arc<std::sync::Mutex<Vec<Option<String>>>>);

impl<S> tracing_subscriber::Layer<S> for BackupSpans
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() != "backup" {
            return;
        }
        let parent = if attrs.is_root() {
            None
        } else if let Some(parent) = attrs.parent() {
            ctx.span(parent).map(|s| s.name().to_string())
        } else {
            ctx.lookup_current().map(|s| s.name().to_string())
        };
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(parent);
    }
}

/// Span callsites cache their interest process-wide, so a test thread's own subscriber can miss
/// spans while other tests run in parallel; this check runs alone, in a child process of this
/// same test binary.
#[test]
fn a_backups_lines_run_in_a_root_span_not_under_the_request_that_started_it() {
    const CHILD: &str = "STILLPOINT_SPAN_CHECK_CHILD";
    if std::env::var_os(CHILD).is_some() {
        root_span_check();
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let name =
        "runtime::tests::a_backups_lines_run_in_a_root_span_not_under_the_request_that_started_it";
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .expect("run the check in a child");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

#[tokio::main(flavor = "current_thread")]
async fn root_span_check() {
    use tracing::Instrument;
    use tracing_subscriber::layer::SubscriberExt;
    let spans = BackupSpans::default();
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let f = Fixture::new();
    let runtime = Runtime::open(f.config(3_600_000)).expect("runtime");
    let rpc = tracing::info_span!("rpc", method = "StartBackup");
    runtime.start("g", "operator:test", None).instrument(rpc).await.expect("start");
    let seen = spans.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(seen, vec![None], "the backup's span has no parent");
}

#[test]
fn one_freeze_per_server_at_a_time_and_copying_does_not_count() {
    use super::registry::Runs;
    let runs = Runs::default();
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let g = BackupRecord::new("bg", "g", &names(&["a", "b"]), "x", 0);
    let h = BackupRecord::new("bh", "h", &names(&["b", "c"]), "x", 0);
    let k = BackupRecord::new("bk", "k", &names(&["c"]), "x", 0);
    for r in [&g, &h, &k] {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert!(runs.insert(r, tx).is_ok());
    }
    assert!(runs.claim_freeze("bg").is_ok());
    let held = runs.claim_freeze("bh").expect_err("b is held by bg");
    assert_eq!((held.by.as_str(), held.servers), ("bg", names(&["b"])));
    assert!(runs.claim_freeze("bk").is_ok(), "c is free");

    let mut g = g;
    g.state = State::Preparing { sent_at: 0, cutoff_at: 10 };
    runs.update(&g);
    assert!(runs.claim_freeze("bh").is_err(), "still freezing");
    g.state = State::Snapshotted { deadline: 100 };
    runs.update(&g);
    let held = runs.claim_freeze("bh").expect_err("c is held by bk");
    assert_eq!(held.by, "bk", "bg let go once its snapshots exist");

    // A backup that failed before its snapshots holds until its aborts are answered.
    let mut k = k;
    k.state = State::Failed { phase: crate::model::StateName::Preparing, reason: "x".into() };
    runs.update(&k);
    assert!(runs.claim_freeze("bh").is_err());
    k.settled = Some(20);
    runs.update(&k);
    assert!(runs.claim_freeze("bh").is_ok());
}
