//! The Copy RPC over loopback mTLS on the mock SAN: progress then every volume's manifest, a
//! restore that matches the LUN, one copy at a time, Abort waiting for a running copy before it
//! deletes, and the refusals (no `[saveset]`, unknown or uncommitted backup, wrong role).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use stillpoint_agent::config::{SavesetConfig, SnapshotConfig};
use stillpoint_core::san::Array;
use stillpoint_proto::agent_client::AgentClient;
use stillpoint_proto::{
    copy_event, AbortRequest, CleanupRequest, CommitRequest, CopyDone, CopyRequest, PrepareRequest,
};
use stillpoint_saveset::{Manifest, ManifestId, Repository, Secret};
use tonic::transport::Channel;

use crate::support::{config, Agent, Certs};

const PASSPHRASE: &str = "agent copy words";

/// A mock SAN with `data` and `logs` LUNs of 1 MiB for srv-a, each with distinct bytes in its
/// first half, and a saveset repository; returns the array and the `[saveset]` table.
fn setup(dir: &Path, delay_ms_per_mib: u64) -> (Array, SavesetConfig) {
    let array = Array::init(&dir.join("array")).unwrap();
    for (i, lun) in ["data", "logs"].into_iter().enumerate() {
        let created = array.create_lun("srv-a", lun, 1 << 20).unwrap();
        let bytes: Vec<u8> = (0..512 << 10).map(|j: u32| (j * 7 + i as u32 * 13) as u8).collect();
        let file = std::fs::OpenOptions::new().write(true).open(&created.path).unwrap();
        file.write_all_at(&bytes, 0).unwrap();
    }
    let saveset = SavesetConfig {
        copy_delay_ms_per_mib: delay_ms_per_mib,
        ..crate::support::saveset_repo(dir, PASSPHRASE)
    };
    (array, saveset)
}

async fn start(dir: &Path, certs: &Certs, saveset: Option<SavesetConfig>) -> Agent {
    let snapshot = SnapshotConfig::MockSan { array: dir.join("array"), snapshot_delay_ms: 0 };
    let mut c = config(certs, &["data", "logs"], Vec::new(), snapshot);
    c.saveset = saveset;
    Agent::start(c).await
}

async fn snapshot(client: &mut AgentClient<Channel>, id: &str) {
    let p = client
        .prepare(PrepareRequest { backup_id: id.into(), lease_ms: 10_000, ..Default::default() })
        .await;
    assert!(p.unwrap().into_inner().prepared);
    let c = client.commit(CommitRequest {
        backup_id: id.into(),
        freeze_token: String::new(),
        ..Default::default()
    });
    assert!(c.await.unwrap().into_inner().committed);
}

/// Follows a Copy stream to its end: the progress seen, then the result.
async fn follow(
    client: &mut AgentClient<Channel>,
    id: &str,
) -> (Vec<(u64, u64)>, Result<CopyDone, tonic::Status>) {
    let mut stream = client
        .copy(CopyRequest { backup_id: id.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut progress = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(event)) => match event.event {
                Some(copy_event::Event::Progress(p)) => {
                    progress.push((p.done_bytes, p.total_bytes))
                }
                Some(copy_event::Event::Done(done)) => return (progress, Ok(done)),
                None => {}
            },
            Ok(None) => panic!("the stream ended without a result"),
            Err(status) => return (progress, Err(status)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_streams_progress_then_manifests_that_restore_the_luns() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let (array, saveset) = setup(dir.path(), 200);
    let agent = start(dir.path(), &certs, Some(saveset)).await;
    let mut client = agent.client(&certs, "listener");
    snapshot(&mut client, "b1").await;

    let (progress, done) = follow(&mut client, "b1").await;
    let done = done.unwrap();
    assert_eq!(progress.first(), Some(&(0, 2 << 20)), "{progress:?}");
    assert_eq!(progress.last(), Some(&(2 << 20, 2 << 20)), "{progress:?}");
    assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0), "{progress:?}");
    let volumes: Vec<_> = done.volumes.iter().map(|v| v.volume.as_str()).collect();
    assert_eq!(volumes, ["data", "logs"]);
    let stats = done.stats.unwrap();
    assert_eq!(stats.size, 2 << 20);
    assert_eq!(stats.bytes_read, 1 << 20);
    assert!(stats.new_chunks > 0 && stats.hole_chunks > 0, "{stats:?}");

    let repo = Repository::open(&dir.path().join("repo"), &Secret::passphrase(PASSPHRASE)).unwrap();
    for v in &done.volumes {
        let id: ManifestId = v.manifest_id.parse().unwrap();
        let Manifest::Volume(m) = repo.load_manifest(id).unwrap() else { panic!("not a volume") };
        assert_eq!((m.meta.backup.as_str(), m.meta.server.as_str()), ("b1", "srv-a"));
        assert_eq!(m.meta.volume, v.volume);
        let target = dir.path().join(format!("{}.img", v.volume));
        repo.restore_volume(id, &target, false).unwrap();
        let lun = array.lun_path("srv-a", &v.volume).unwrap();
        assert!(std::fs::read(&target).unwrap() == std::fs::read(lun).unwrap(), "{}", v.volume);
    }
    client.cleanup(CleanupRequest { backup_id: "b1".into() }).await.unwrap();
    // Once cleaned up there is nothing to copy.
    let status = client
        .copy(CopyRequest { backup_id: "b1".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_a_copy_waits_for_it_to_let_go_before_deleting() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    // 600 ms paused inside each volume: the Abort lands while the first one is read.
    let (array, saveset) = setup(dir.path(), 600);
    let agent = start(dir.path(), &certs, Some(saveset)).await;
    let mut client = agent.client(&certs, "listener");
    snapshot(&mut client, "b1").await;

    let mut stream = client
        .copy(CopyRequest { backup_id: "b1".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    // One copy of a backup at a time.
    let second = client
        .copy(CopyRequest { backup_id: "b1".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(second.code(), tonic::Code::FailedPrecondition, "{second:?}");
    assert!(second.message().contains("already running"), "{second:?}");

    let mut aborter = client.clone();
    let abort = tokio::spawn(async move {
        let reply = aborter.abort(AbortRequest { backup_id: "b1".into(), reason: "test".into() });
        let reply = reply.await.unwrap().into_inner();
        (Instant::now(), reply)
    });
    let ended = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a result"),
            Err(status) => break (Instant::now(), status),
        }
    };
    let (aborted_at, reply) = abort.await.unwrap();
    assert_eq!(ended.1.code(), tonic::Code::Aborted, "{:?}", ended.1);
    assert!(ended.1.message().contains("asked to stop"), "{:?}", ended.1);
    // The Abort was sent as the first volume's 600 ms read began: an Abort that did not wait
    // would return about 600 ms before the copy ended. The two replies reach this process on
    // two streams whose tasks may wake in either order, and the copy lets go of its hold just
    // before its stream's last message is sent, so a few ms either way are no evidence.
    assert!(
        aborted_at + Duration::from_millis(200) >= ended.0,
        "the abort returned {:?} before the copy let go",
        ended.0 - aborted_at
    );
    assert_eq!(reply.snapshots_deleted, 2);
    assert!(array.snapshots(None).unwrap().is_empty());
    // The stopped copy left the repository valid.
    let repo = Repository::open(&dir.path().join("repo"), &Secret::passphrase(PASSPHRASE)).unwrap();
    assert!(repo.verify(true).unwrap().is_ok());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let (_array, saveset) = setup(dir.path(), 0);

    let agent = start(dir.path(), &certs, None).await;
    let mut client = agent.client(&certs, "listener");
    snapshot(&mut client, "b1").await;
    let status = client
        .copy(CopyRequest { backup_id: "b1".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("this agent has no [saveset] repository configured"),
        "{status:?}"
    );
    client.abort(AbortRequest { backup_id: "b1".into(), reason: "test".into() }).await.unwrap();
    agent.stop().await;

    let agent = start(dir.path(), &certs, Some(saveset)).await;
    let mut client = agent.client(&certs, "listener");
    let status = client
        .copy(CopyRequest { backup_id: "nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let p = client
        .prepare(PrepareRequest { backup_id: "b2".into(), lease_ms: 10_000, ..Default::default() })
        .await;
    assert!(p.unwrap().into_inner().prepared);
    let status = client
        .copy(CopyRequest { backup_id: "b2".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("frozen"), "{status:?}");
    for who in ["operator", "viewer"] {
        let mut other = agent.client(&certs, who);
        let status = other
            .copy(CopyRequest { backup_id: "b2".into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{who}: {status:?}");
    }
    client.abort(AbortRequest { backup_id: "b2".into(), reason: "test".into() }).await.unwrap();
    agent.stop().await;
}

#[test]
fn a_wrong_saveset_secret_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let (_array, mut saveset) = setup(dir.path(), 0);
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not the words").unwrap();
    saveset.passphrase_file = Some(wrong);
    let snapshot =
        SnapshotConfig::MockSan { array: dir.path().join("array"), snapshot_delay_ms: 0 };
    let mut c = config(&certs, &["data"], Vec::new(), snapshot);
    c.saveset = Some(saveset);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_stillpoint-agent"));
            let never = std::future::pending::<()>();
            tokio::time::timeout(
                Duration::from_secs(10),
                stillpoint_agent::run_with_guardian(c, listener, never, bin),
            )
            .await
        })
        .expect("the agent stopped at once")
        .unwrap_err()
        .to_string();
    assert!(err.contains("saveset.repository: wrong passphrase or key"), "{err}");
    assert!(!err.contains("not the words"), "{err}");
}
