//! The repository on S3: the same backups, restores and verify against a real S3 server (moto in
//! server mode, installed by `.ci/run`) that each test starts on 127.0.0.1 and kills on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stillpoint_saveset::{Damage, Error, Location, Repository, S3Location, Secret};

use super::{b3, image, meta, mutated, opts, secret};

/// A moto S3 server on a free loopback port, killed (by its pid) when dropped.
pub(crate) struct Moto {
    child: Child,
    pub(crate) endpoint: String,
}

impl Moto {
    pub(crate) fn start() -> Moto {
        let port = stillpoint_core::testing::spare_loopback_port();
        let mut child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with moto[server] (installed by .ci/run)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("moto exited before listening ({status}): is moto[server] installed?");
            }
            assert!(Instant::now() < deadline, "moto did not listen on port {port} within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto { child, endpoint: format!("http://127.0.0.1:{port}") }
    }

    /// Creates a bucket with a plain unsigned PUT (object_store cannot create buckets).
    pub(crate) fn bucket(&self, name: &str) {
        let host = self.endpoint.trim_start_matches("http://");
        let mut s = TcpStream::connect(host).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "create bucket {name}: {reply}");
    }

    pub(crate) fn location(&self, bucket: &str, prefix: &str) -> Location {
        Location::S3(S3Location {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some("testing".into()),
            secret_access_key: Some(Secret::passphrase("testing")),
            ..S3Location::new(bucket, prefix)
        })
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn s3_full_and_incremental_restore_bit_for_bit_and_verify_reads_clean() {
    let moto = Moto::start();
    moto.bucket("backups");
    let loc = moto.location("backups", "site-a/repo");
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 32, 1);
    let twin = mutated(&img, "twin", 0.01);

    let mut repo = Repository::init_at(&loc, &secret(), opts()).unwrap();
    assert_eq!(repo.path(), PathBuf::from("s3://backups/site-a/repo"));
    let full = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |_| {}).unwrap();
    let incr = repo.backup_volume(&twin, meta("b2", "srv-a"), &mut |_| {}).unwrap();
    assert!(
        incr.stats.bytes_stored * 20 < full.stats.bytes_stored,
        "incremental stored {} bytes, full {}",
        incr.stats.bytes_stored,
        full.stats.bytes_stored
    );
    let err = Repository::init_at(&loc, &secret(), opts()).unwrap_err();
    assert!(matches!(err, Error::AlreadyExists { .. }), "{err}");

    let repo = Repository::open_at(&loc, &secret()).unwrap();
    assert_eq!(repo.list_manifests().unwrap().len(), 2);
    for (backup, source) in [(&full, &img), (&incr, &twin)] {
        let out = tmp.path().join(format!("restored-{}", backup.manifest.meta.backup));
        repo.restore_volume(backup.id, &out, false).unwrap();
        assert_eq!(b3(&out), b3(source), "restore of {}", backup.manifest.meta.backup);
    }
    let report = repo.verify(true).unwrap();
    assert!(report.is_ok(), "{:?}", report.damage);
    assert_eq!(report.chunks_read, report.chunks);
    assert!(report.chunks > 1000);
}

#[test]
fn s3_verify_names_a_deleted_pack_and_a_wrong_passphrase_is_refused() {
    let moto = Moto::start();
    moto.bucket("vault");
    let loc = moto.location("vault", "");
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "img", 16, 5);
    let mut repo = Repository::init_at(&loc, &secret(), opts()).unwrap();
    let b = repo.backup_volume(&img, meta("b1", "srv-a"), &mut |_| {}).unwrap();

    let err = Repository::open_at(&loc, &Secret::passphrase("wrong")).unwrap_err();
    assert!(matches!(err, Error::WrongSecret { .. }), "{err}");
    assert_eq!(err.to_string(), "wrong passphrase or key for repository s3://vault");

    let (pack, _) = repo.storage().list("packs/").unwrap().remove(0);
    repo.storage().delete(&pack).unwrap();
    assert!(!repo.storage().exists(&pack).unwrap());
    let report = repo.verify(false).unwrap();
    assert!(!report.damage.is_empty());
    let named = PathBuf::from(format!("s3://vault/{pack}"));
    for d in &report.damage {
        match d {
            Damage::PackMissing { manifest, pack: p, .. } => {
                assert_eq!((*manifest, p), (b.id, &named))
            }
            other => panic!("unexpected damage {other:?}"),
        }
    }
    let err = repo.restore_volume(b.id, &tmp.path().join("out"), false).unwrap_err();
    assert!(err.to_string().contains(&named.display().to_string()), "{err}");
}

#[test]
fn s3_locations_parse_from_urls() {
    let Ok(Location::S3(s)) = "s3://bucket/a/b/".parse::<Location>() else { panic!("s3 url") };
    assert_eq!((s.bucket.as_str(), s.prefix.as_str()), ("bucket", "a/b"));
    assert!(
        matches!("/srv/repo".parse::<Location>(), Ok(Location::Local(p)) if p == Path::new("/srv/repo"))
    );
    assert!("s3://".parse::<Location>().is_err());
}
