//! The saveset copier against a real repository in a temp dir (with a cheap KDF): copies,
//! the backup manifest with its cut, dedup across backups, verify failing on damage, secrets.

use std::path::{Path, PathBuf};

use stillpoint_saveset::{InitOptions, KdfParams, Secret};

use super::*;
use crate::model::{BackupRecord, ServerStep};

struct Fixture {
    dir: tempfile::TempDir,
    config: SavesetConfig,
}

fn fixture(verify: VerifyMode) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret_file = dir.path().join("passphrase");
    std::fs::write(&secret_file, "correct horse\n").expect("write passphrase");
    let repository = dir.path().join("repo");
    let opts = InitOptions {
        kdf: KdfParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 },
        ..InitOptions::default()
    };
    Repository::init_with(&repository, &Secret::passphrase("correct horse"), opts)
        .expect("init repository");
    let config = SavesetConfig {
        on: crate::config::CopyOn::Listener,
        repository,
        passphrase_file: Some(secret_file),
        key_file: None,
        verify,
        base_dir: None,
        sample: stillpoint_saveset::DEFAULT_SAMPLE_PERCENT,
        memory_budget_mib: Some(16),
    };
    Fixture { dir, config }
}

impl Fixture {
    /// A snapshot file of `blocks` 4 KiB blocks, block `i` filled with `fill(i)`.
    fn snapshot(&self, name: &str, blocks: u64, fill: impl Fn(u64) -> u8) -> SnapshotRef {
        let path = self.dir.path().join(name);
        let data: Vec<u8> = (0..blocks).flat_map(|i| vec![fill(i); 4096]).collect();
        std::fs::write(&path, &data).expect("write snapshot");
        SnapshotRef {
            volume: "data".into(),
            provider: "mock-san".into(),
            locator: path.display().to_string(),
            size_bytes: data.len() as u64,
        }
    }

    fn packs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for dir in std::fs::read_dir(self.config.repository.join("packs")).expect("packs") {
            for f in std::fs::read_dir(dir.expect("entry").path()).expect("pack dir") {
                out.push(f.expect("entry").path());
            }
        }
        out
    }
}

/// Copies one server and returns the copy and every progress report.
fn check_copy(
    saveset: &Saveset,
    backup: &str,
    server: &str,
    snaps: &[SnapshotRef],
) -> (ServerCopy, Vec<(u64, u64)>) {
    let mut reports = Vec::new();
    let copy = saveset
        .copy_server((backup, "g"), server, snaps, &mut |d, t| reports.push((d, t)), &|| false)
        .expect("copy");
    (copy, reports)
}

fn record(servers: &[&str]) -> BackupRecord {
    let names: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
    let mut r = BackupRecord::new("b1", "g", &names, "operator:test", 5);
    for s in &mut r.servers {
        s.step = ServerStep::Copying;
        s.cut.prepared = Some(7);
    }
    r.verdict = Some(crate::model::CutVerdict { consistent: true, text: "consistent".into() });
    r
}

#[test]
fn a_backup_is_its_volumes_plus_a_manifest_holding_the_cut() {
    let f = fixture(VerifyMode::ReadData);
    let saveset = Saveset::open(&f.config).expect("open");
    let a = f.snapshot("a.img", 64, |i| (i % 7) as u8 + 1);
    let b = f.snapshot("b.img", 64, |i| if i % 2 == 0 { 0 } else { 9 });
    let (copy_a, reports) = check_copy(&saveset, "b1", "srv-a", std::slice::from_ref(&a));
    assert_eq!(reports.first(), Some(&(0, a.size_bytes)));
    assert_eq!(reports.last(), Some(&(a.size_bytes, a.size_bytes)));
    assert!(copy_a.detail().contains(&copy_a.volumes[0].1.to_string()), "{}", copy_a.detail());
    let (copy_b, _) = check_copy(&saveset, "b1", "srv-b", &[b]);
    assert_eq!(copy_b.stats.hole_chunks, 32);

    let volumes = vec![copy_a.volumes[0].1, copy_b.volumes[0].1];
    let mut stored = copy_a.clone().done().stored;
    stored.extend(copy_b.done().stored);
    let label = Artifact { quiescer: "pg".into(), name: "backup_label".into(), bytes: vec![1, 2] };
    let artifacts = vec![("srv-b".to_string(), vec![label])];
    let cut = record(&["srv-a", "srv-b"]).cut();
    let line = saveset.seal("b1", &stored, (&cut, &artifacts)).expect("seal");
    assert!(line.contains("with 1 artifact(s); verify (read-data) ok"), "{line}");

    let repo = Repository::open(&f.config.repository, &Secret::passphrase("correct horse"))
        .expect("reopen");
    let backup = repo
        .list_manifests()
        .expect("list")
        .into_iter()
        .find_map(|id| match repo.load_manifest(id) {
            Ok(Manifest::Backup(m)) => Some(m),
            _ => None,
        })
        .expect("a backup manifest");
    assert_eq!(backup.backup, "b1");
    assert_eq!(backup.volumes, volumes);
    assert_eq!(backup.cut["verdict"]["consistent"], true);
    assert_eq!(backup.cut["servers"][1]["server"], "srv-b");
    assert_eq!(backup.cut["servers"][0]["cut"]["prepared"], 7);
    let kept = &backup.artifacts[..];
    assert!(
        matches!(kept, [a] if a.server == "srv-b" && a.quiescer == "pg" && a.name == "backup_label" && a.bytes == [1, 2]),
        "{kept:?}"
    );

    let target = f.dir.path().join("restored.img");
    repo.restore_volume(copy_a.volumes[0].1, &target, false).expect("restore");
    assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&a.locator).unwrap());
}

#[test]
fn an_unchanged_volume_stores_nothing_the_second_time() {
    let f = fixture(VerifyMode::None);
    let saveset = Saveset::open(&f.config).expect("open");
    let a = f.snapshot("a.img", 128, |i| (i % 251) as u8 + 1);
    let (first, _) = check_copy(&saveset, "b1", "srv-a", std::slice::from_ref(&a));
    let (second, _) = check_copy(&saveset, "b2", "srv-a", &[a]);
    assert_eq!(first.stats.new_chunks, 128);
    assert_eq!(second.stats.new_chunks, 0);
    assert_eq!(second.stats.bytes_stored, 0);
}

#[test]
fn verify_after_the_backup_fails_it_naming_the_damage() {
    let f = fixture(VerifyMode::Index);
    let saveset = Saveset::open(&f.config).expect("open");
    let a = f.snapshot("a.img", 16, |i| i as u8 + 1);
    let (copy, _) = check_copy(&saveset, "b1", "srv-a", &[a]);
    for pack in f.packs() {
        std::fs::remove_file(pack).expect("remove pack");
    }
    let err = saveset
        .finish_backup("b1", vec![copy.volumes[0].1], serde_json::json!({}), Vec::new())
        .expect_err("damage fails the backup");
    assert!(err.contains("verify found") && err.contains("is missing"), "{err}");
}

#[test]
fn a_snapshot_the_listener_cannot_read_is_named() {
    let f = fixture(VerifyMode::Index);
    let saveset = Saveset::open(&f.config).expect("open");
    let gone = SnapshotRef {
        volume: "data".into(),
        provider: "btrfs".into(),
        locator: "/nonexistent/snap".into(),
        size_bytes: 1,
    };
    let err = saveset
        .copy_server(("b1", "g"), "srv-a", &[gone], &mut |_, _| {}, &|| false)
        .expect_err("unreadable");
    assert!(err.contains("volume data: cannot read snapshot /nonexistent/snap"), "{err}");
}

#[test]
fn secrets_come_from_one_file_and_a_wrong_one_is_refused() {
    let f = fixture(VerifyMode::Index);
    let wrong = f.dir.path().join("wrong");
    std::fs::write(&wrong, "battery staple").expect("write");
    let check = |passphrase_file: Option<&Path>, key_file: Option<&Path>| {
        let config = SavesetConfig {
            passphrase_file: passphrase_file.map(Path::to_path_buf),
            key_file: key_file.map(Path::to_path_buf),
            ..f.config.clone()
        };
        config.open().map(|_| ()).expect_err("refused")
    };
    let err = check(Some(&wrong), None);
    assert!(err.starts_with("copy.repository: wrong passphrase or key"), "{err}");
    assert!(!err.contains("battery"), "{err}");
    let err = check(Some(Path::new("/nonexistent/pass")), None);
    assert!(err.contains("copy.passphrase_file: read passphrase file /nonexistent/pass"), "{err}");
    let err = check(None, Some(Path::new("/nonexistent/key")));
    assert!(err.starts_with("copy.key_file:") && err.contains("/nonexistent/key"), "{err}");
    assert!(check(Some(&wrong), Some(&wrong)).contains("not both"));
    assert!(check(None, None).contains("needs passphrase_file or key_file"));
}

#[test]
fn throttle_lets_one_report_through_per_period() {
    let mut t = Throttle::default();
    let start = Instant::now();
    assert!(t.ready(start));
    assert!(!t.ready(start + PROGRESS_EVERY / 2));
    assert!(t.ready(start + PROGRESS_EVERY));
    assert!(!t.ready(start + PROGRESS_EVERY + Duration::from_millis(1)));
}

#[test]
fn the_manifests_cut_carries_each_servers_hold() {
    let mut r = record(&["srv-a", "srv-c"]);
    r.servers[0].cut.hold = Some(stillpoint_protocol::hold::Hold::FilesystemFreeze);
    r.servers[1].cut.hold = Some(stillpoint_protocol::hold::Hold::HookUnverified);
    r.servers[1].cut.held_until_release = Some(false);
    let cut = serde_json::to_value(r.cut()).expect("the cut as JSON");
    assert_eq!(cut["servers"][0]["cut"]["hold"], "filesystem-freeze");
    assert_eq!(cut["servers"][1]["cut"]["hold"], "hook-unverified");
    assert_eq!(cut["servers"][1]["cut"]["held_until_release"], false);
}
