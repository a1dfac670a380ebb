//! The `stillpoint-agent` binary itself: a bad config exits 2 naming every problem (an array
//! whose snapshots would copy is one); a good one serves until SIGTERM, thaws what it froze,
//! and exits 0.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use stillpoint_core::san::Array;
use stillpoint_proto::{PrepareRequest, StatusRequest};

use crate::support::{run, Certs};

const BIN: &str = env!("CARGO_BIN_EXE_stillpoint-agent");

#[test]
fn a_bad_config_exits_2_naming_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "server = \"../x\"\nlisten = \"nope\"\nvolumes = []\ntls = { ca = \"/a\", cert = \"/b\", key = \"/c\" }\n[snapshot]\nprovider = \"mock-san\"\narray = \"/nonexistent\"\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for field in ["server:", "listen:", "volumes:", "tls.ca:", "snapshot.array:"] {
        assert!(stderr.contains(field), "no {field} in {stderr}");
    }
}

/// A mock SAN array made before snapshots had to clone, on a filesystem that cannot (a tmpfs):
/// the agent refuses to start, saying why and what to do, before any backup could hold the
/// server's writes through a copy of its LUNs.
#[test]
fn an_array_that_cannot_clone_stops_the_start_saying_how_to_move_it() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = dir.path().join("tmpfs");
    std::fs::create_dir_all(&tmpfs).unwrap();
    run("mount", &["-t", "tmpfs", "-o", "size=64m", "tmpfs", tmpfs.to_str().unwrap()]);
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).output();
        }
    }
    let _unmount = Unmount(&tmpfs);
    let array = tmpfs.join("array");
    std::fs::create_dir_all(array.join("luns/srv-a")).unwrap();
    std::fs::create_dir_all(array.join("snapshots")).unwrap();
    std::fs::write(array.join("stillpoint-array.json"), "{\"format\": 1}").unwrap();
    std::fs::File::create(array.join("luns/srv-a/data.lun")).unwrap().set_len(1 << 20).unwrap();
    let certs = Certs::new("srv-a");
    let tls = certs.files("srv-a");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "server = \"srv-a\"\nlisten = \"127.0.0.1:1\"\nvolumes = [\"data\"]\nstate_dir = {:?}\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[snapshot]\nprovider = \"mock-san\"\narray = {array:?}\n",
            dir.path().join("state"),
            tls.ca,
            tls.cert,
            tls.key,
        ),
    )
    .unwrap();
    let out = Command::new(BIN).arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "snapshot.array: mock SAN: the array at {} is on tmpfs, which cannot reflink",
        array.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("backupctl san init DIR"), "{stderr}");
    assert_eq!(stderr.matches("snapshot.array:").count(), 1, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_until_sigterm_and_thaws_on_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::new("srv-a");
    let array = Array::init(&dir.path().join("array")).unwrap();
    array.create_lun("srv-a", "data", 1 << 20).unwrap();
    let port = stillpoint_core::testing::spare_loopback_port();
    let tls = certs.files("srv-a");
    let marker = |suffix: &str| {
        let script = format!(
            "echo \"$STILLPOINT_BACKUP_ID $STILLPOINT_SERVER $STILLPOINT_PHASE\" > {}/app.{suffix}",
            dir.path().display()
        );
        Some(vec!["/bin/sh".to_string(), "-c".to_string(), script])
    };
    let (pre_freeze, post_thaw) = (marker("pre"), marker("post"));
    let quote = |argv: Option<Vec<String>>| format!("{:?}", argv.unwrap());
    let config = format!(
        "server = \"srv-a\"\nlisten = \"127.0.0.1:{port}\"\nvolumes = [\"data\"]\nstate_dir = {:?}\n\
         [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
         [[quiescer]]\nkind = \"exec\"\nname = \"app\"\npre_freeze = {}\npost_thaw = {}\n\
         [snapshot]\nprovider = \"mock-san\"\narray = {:?}\n",
        dir.path().join("state"),
        tls.ca,
        tls.cert,
        tls.key,
        quote(pre_freeze),
        quote(post_thaw),
        array.root()
    );
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let channel = stillpoint_core::tls::channel(
        &format!("https://127.0.0.1:{port}"),
        "srv-a",
        &certs.files("listener"),
        Duration::from_secs(5),
    )
    .unwrap();
    let mut client = stillpoint_proto::agent_client::AgentClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = client.status(StatusRequest {}).await {
        assert!(Instant::now() < deadline, "agent never answered: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = client
        .prepare(PrepareRequest { backup_id: "b1".into(), lease_ms: 60_000, ..Default::default() })
        .await;
    assert!(p.unwrap().into_inner().prepared);

    let pidfile = dir.path().join("state").join("srv-a.guardian.pid");
    let guardian = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
    assert!(Path::new("/proc").join(&guardian).exists());
    run("kill", &["-TERM", &child.id().to_string()]);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    // The guardian was released, then closed: it ran nothing twice and is gone.
    assert!(!Path::new("/proc").join(&guardian).exists(), "guardian {guardian} still runs");
    assert!(!pidfile.exists());
    let post = std::fs::read_to_string(dir.path().join("app.post")).unwrap();
    assert_eq!(post.trim(), "b1 srv-a post-thaw");
}
