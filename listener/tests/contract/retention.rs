//! Retention through the real listener with a saveset repository: after each backup the
//! group's rules forget what they drop (its manifests deleted, its record kept as expired),
//! kept backups still restore bit for bit, a pinned one survives, and a dry run changes nothing.

use std::path::Path;
use std::time::Duration;

use stillpoint_listener::config::{CopyConfig, CopyOn, SavesetConfig, VerifyMode};
use stillpoint_listener::retention::RetentionConfig;
use stillpoint_listener::testing::{Cluster, Spec};
use stillpoint_proto as pb;
use stillpoint_saveset::{InitOptions, KdfParams, Manifest, ManifestSummary, Repository, Secret};
use tonic::Code;

use crate::{refused, start, state, Client};

const PASSPHRASE: &str = "correct horse";

/// Runs a backup of `group` until its task ended; it must succeed.
async fn backup(client: &mut Client, group: &str) -> String {
    let id = client.start_backup(start(group, "")).await.expect("start").into_inner().backup_id;
    let wait = pb::WaitBackupRequest {
        backup_id: id.clone(),
        until: pb::WaitUntil::Settled as i32,
        timeout_ms: 20_000,
    };
    let done = client.wait_backup(wait).await.expect("wait").into_inner();
    assert_eq!(state(&done), pb::BackupState::Succeeded, "{done:#?}");
    id
}

async fn get(client: &mut Client, id: &str) -> pb::Backup {
    let request = pb::GetBackupRequest { backup_id: id.into() };
    client.get_backup(request).await.expect("get backup").into_inner()
}

/// Every backup id the repository holds a manifest of (backup or volume), with its kind.
fn stored(repository: &Path) -> Vec<(String, &'static str)> {
    let repo = Repository::open(repository, &Secret::passphrase(PASSPHRASE)).expect("open repo");
    let mut out: Vec<(String, &'static str)> = repo
        .list_manifests()
        .expect("list manifests")
        .into_iter()
        .map(|id| match repo.load_summary(id).expect("readable manifest") {
            ManifestSummary::Backup(b) => (b.backup, "backup"),
            ManifestSummary::Volume(v) => (v.meta.backup, "volume"),
        })
        .collect();
    out.sort();
    out
}

fn both(ids: &[&str]) -> Vec<(String, &'static str)> {
    let mut out: Vec<(String, &'static str)> = ids
        .iter()
        .flat_map(|id| [(id.to_string(), "backup"), (id.to_string(), "volume")])
        .collect();
    out.sort();
    out
}

async fn retention(client: &mut Client, group: &str, dry_run: bool) -> pb::ApplyRetentionResponse {
    let request = pb::ApplyRetentionRequest { group: group.into(), dry_run };
    client.apply_retention(request).await.expect("apply retention").into_inner()
}

/// `id: reasons` or `id: dropped` per decision, newest first.
fn explained(reply: &pb::ApplyRetentionResponse) -> Vec<String> {
    reply
        .decisions
        .iter()
        .map(|d| {
            let why = if d.keep { d.reasons.join(", ") } else { d.dropped.clone() };
            format!("{}: {why}{}", d.backup_id, if d.forgotten { " [forgotten]" } else { "" })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_forgets_what_the_rules_drop_and_kept_backups_still_restore() {
    let dir = tempfile::tempdir().unwrap();
    let repository = dir.path().join("repo");
    let opts = InitOptions {
        kdf: KdfParams { m_cost_kib: 1024, t_cost: 1, p_cost: 1 },
        ..InitOptions::default()
    };
    Repository::init_with(&repository, &Secret::passphrase(PASSPHRASE), opts).expect("init repo");
    let passphrase_file = dir.path().join("passphrase");
    std::fs::write(&passphrase_file, format!("{PASSPHRASE}\n")).unwrap();
    let snapshots = dir.path().join("snapshots");
    std::fs::create_dir(&snapshots).unwrap();
    let spec = Spec {
        copy: CopyConfig::Saveset(SavesetConfig {
            on: CopyOn::Listener,
            repository: repository.clone(),
            passphrase_file: Some(passphrase_file),
            key_file: None,
            verify: VerifyMode::Index,
            base_dir: None,
            sample: stillpoint_saveset::DEFAULT_SAMPLE_PERCENT,
            memory_budget_mib: None,
        }),
        retention: vec![(
            "h".into(),
            RetentionConfig { keep_recent: 2, ..RetentionConfig::default() },
        )],
        ..Spec::default()
    };
    let cluster = Cluster::start(dir.path(), spec).await;
    cluster.agent("srv-c").write_snapshots_in(&snapshots);
    let mut client = cluster.client("operator");

    // b1 is pinned; after b4 the rules (2 recent) drop b2, which is forgotten on its own.
    let b1 = backup(&mut client, "h").await;
    let pinned = client.pin_backup(pb::PinBackupRequest { backup_id: b1.clone() }).await;
    assert!(pinned.expect("pin").into_inner().pinned);
    let b2 = backup(&mut client, "h").await;
    let b3 = backup(&mut client, "h").await;
    let b4 = backup(&mut client, "h").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while get(&mut client, &b2).await.expired_unix_ms == 0 {
        assert!(tokio::time::Instant::now() < deadline, "retention never forgot {b2}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored(&repository), both(&[&b1, &b3, &b4]), "b2's manifests are gone");
    let log = client.get_log(pb::GetLogRequest { backup_id: b2.clone(), after_seq: 0 }).await;
    let last = log.unwrap().into_inner().entries.pop().expect("a log line");
    assert_eq!(
        last.message,
        "forgotten by retention (no rule keeps it); saveset: deleted 1 backup manifest(s) and 1 volume manifest(s)"
    );

    // The prune after retention marked b2's pack for deletion (freed by a prune after the grace).
    let marked = || std::fs::read_dir(repository.join("pending")).map(|d| d.count()).unwrap_or(0);
    while marked() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no prune marked b2's data");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // What is left is whole, and a kept backup restores bit for bit.
    let repo = Repository::open(&repository, &Secret::passphrase(PASSPHRASE)).unwrap();
    assert!(repo.verify(true).unwrap().is_ok());
    let b3_volume = repo
        .list_manifests()
        .unwrap()
        .into_iter()
        .find(
            |id| matches!(repo.load_manifest(*id), Ok(Manifest::Volume(v)) if v.meta.backup == b3),
        )
        .expect("b3's volume");
    let restored = dir.path().join("b3.img");
    repo.restore_volume(b3_volume, &restored, false).unwrap();
    let original = snapshots.join(format!("{b3}-srv-c.img"));
    assert_eq!(std::fs::read(&restored).unwrap(), std::fs::read(&original).unwrap());

    // `list` hides the forgotten backup unless asked; its record stays as history.
    let list = |include_expired| pb::ListBackupsRequest {
        group: "h".into(),
        include_expired,
        ..Default::default()
    };
    let ids = |reply: pb::ListBackupsResponse| -> Vec<String> {
        reply.backups.into_iter().map(|b| b.backup_id).collect()
    };
    let shown = ids(client.list_backups(list(false)).await.unwrap().into_inner());
    assert_eq!(shown, [b4.clone(), b3.clone(), b1.clone()]);
    let all = ids(client.list_backups(list(true)).await.unwrap().into_inner());
    assert_eq!(all, [b4.clone(), b3.clone(), b2.clone(), b1.clone()]);

    // Unpinned, b1 is dropped: a dry run says so and changes nothing.
    let unpinned = client.unpin_backup(pb::UnpinBackupRequest { backup_id: b1.clone() }).await;
    assert!(!unpinned.expect("unpin").into_inner().pinned);
    let dry = retention(&mut client, "h", true).await;
    let want = [
        format!("{b4}: last good, recent 1/2"),
        format!("{b3}: recent 2/2"),
        format!("{b1}: no rule keeps it"),
    ];
    assert_eq!(explained(&dry), want, "the forgotten b2 is no longer decided");
    assert_eq!(stored(&repository), both(&[&b1, &b3, &b4]), "a dry run deletes nothing");
    assert_eq!(get(&mut client, &b1).await.expired_unix_ms, 0, "nor marks anything");
    assert!(
        dry.forgets.starts_with("its backup manifest, then its volume manifests"),
        "{}",
        dry.forgets
    );

    let applied = retention(&mut client, "h", false).await;
    assert_eq!(explained(&applied)[2], format!("{b1}: no rule keeps it [forgotten]"));
    assert_eq!(stored(&repository), both(&[&b3, &b4]));
    assert!(get(&mut client, &b1).await.expired_unix_ms > 0);

    // A forgotten backup cannot be pinned back; rules-less groups and viewers are refused.
    let again = client.pin_backup(pb::PinBackupRequest { backup_id: b2.clone() }).await;
    refused(again, Code::FailedPrecondition, "was forgotten by retention");
    let none =
        client.apply_retention(pb::ApplyRetentionRequest { group: "g".into(), dry_run: true });
    refused(none.await, Code::FailedPrecondition, "group g has no [group.retention] rules");
    let mut viewer = cluster.client("viewer");
    let denied =
        viewer.apply_retention(pb::ApplyRetentionRequest { group: "h".into(), dry_run: true });
    assert_eq!(denied.await.expect_err("viewers only read").code(), Code::PermissionDenied);
}
