//! Chunk list pages (FORMAT.md, "Chunk list pages"): a backup adds metadata in proportion to
//! what changed (nothing for an unchanged volume, a small delta for a few changed blocks), every
//! backup of a chain restores bit for bit however long the chain, and prune keeps every page
//! and base a kept backup needs.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use stillpoint_saveset::{
    BaseKey, InitOptions, ManifestId, Parents, PruneOptions, Repository, VolumeBackup,
};

use super::{b3, image, meta, opts, secret, MIB};

/// Rewrites `blocks` 4 KiB blocks of `path` in place, at offsets drawn from `seed`, each in the
/// first `span` bytes when given (to keep a change inside one page).
fn rewrite(path: &Path, seed: u64, blocks: usize, span: Option<u64>) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let size = span.unwrap_or_else(|| f.metadata().unwrap().len());
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..blocks {
        let block = next() % (size / 4096);
        let data: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
        f.write_all_at(&data, block * 4096).unwrap();
    }
    f.sync_all().unwrap();
}

fn restored(repo: &Repository, id: ManifestId, dir: &Path, name: &str) -> String {
    let out = dir.join(name);
    let _ = fs::remove_file(&out);
    repo.restore_volume(id, &out, false).unwrap();
    let sum = b3(&out);
    fs::remove_file(&out).unwrap();
    sum
}

#[test]
fn metadata_grows_with_the_change_and_every_backup_of_a_chain_restores() {
    let tmp = tempfile::tempdir().unwrap();
    // 64 MiB: four pages of 4096 chunks.
    let img = image(tmp.path(), "disk.img", 64, 1);
    let mut repo = Repository::init_with(&tmp.path().join("repo"), &secret(), opts()).unwrap();
    let first = repo.backup_volume(&img, meta("b0", "srv-a"), &mut |_| {}).unwrap();
    let mut chain: Vec<(VolumeBackup, String)> = vec![(first, b3(&img))];
    let full_list = 4 * (4096 * 32 + 512) as u64;
    assert!(chain[0].0.stats.metadata_bytes < full_list + 4096);

    // Unchanged: the same pages; only the manifest (a few hundred bytes) is new.
    let parent = chain[0].0.id;
    let same = repo.backup_volume_child(&img, meta("b1", "srv-a"), Some(parent), &mut |_| {});
    let same = same.unwrap();
    assert_eq!(same.stats.bytes_stored, 0, "{:?}", same.stats);
    assert!(same.stats.metadata_bytes < 1024, "{:?}", same.stats);
    chain.push((same, b3(&img)));

    // A few blocks in the first page: that page becomes a delta of a few hundred bytes.
    rewrite(&img, 1, 10, Some(16 * MIB));
    let parent = chain.last().unwrap().0.id;
    let few = repo.backup_volume_child(&img, meta("b2", "srv-a"), Some(parent), &mut |_| {});
    let few = few.unwrap();
    assert!(few.stats.metadata_bytes < 2048, "a delta of ten entries: {:?}", few.stats);
    chain.push((few, b3(&img)));

    // A long chain of small scattered changes: each backup's metadata follows its change, and
    // pages whose delta would pass an eighth of the page are written whole again.
    for k in 3..20u64 {
        rewrite(&img, k, 40, None);
        let parent = chain.last().unwrap().0.id;
        let b = repo
            .backup_volume_child(&img, meta(&format!("b{k}"), "srv-a"), Some(parent), &mut |_| {})
            .unwrap();
        assert!(b.stats.metadata_bytes < full_list, "{k}: {:?}", b.stats);
        chain.push((b, b3(&img)));
    }
    let added: u64 = chain[1..].iter().map(|(b, _)| b.stats.metadata_bytes).sum();
    assert!(
        added < 19 * full_list / 3,
        "19 backups of small changes added {added} bytes of metadata; a full list is {full_list}"
    );
    // Every one restores as it was, the first and the last alike.
    for (k, (b, sum)) in chain.iter().enumerate() {
        assert_eq!(&restored(&repo, b.id, tmp.path(), "out.img"), sum, "backup {k}");
    }
    assert!(repo.verify(true).unwrap().is_ok());
}

#[test]
fn prune_keeps_the_pages_and_bases_of_kept_backups_only() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "disk.img", 32, 3);
    let repo_dir = tmp.path().join("repo");
    let small_packs = InitOptions { pack_size: MIB, ..opts() };
    let mut repo = Repository::init_with(&repo_dir, &secret(), small_packs).unwrap();
    let mut ids = vec![repo.backup_volume(&img, meta("b0", "srv-a"), &mut |_| {}).unwrap().id];
    for k in 1..6u64 {
        rewrite(&img, 100 + k, 400, None);
        let b = repo
            .backup_volume_child(
                &img,
                meta(&format!("b{k}"), "srv-a"),
                ids.last().copied(),
                &mut |_| {},
            )
            .unwrap();
        ids.push(b.id);
    }
    let last = b3(&img);
    // Forget every backup but the last: its delta pages still need the first backup's full
    // pages as their bases.
    for id in &ids[..5] {
        fs::remove_file(repo_dir.join("manifests").join(id.to_string())).unwrap();
    }
    let opts = PruneOptions { grace: Duration::ZERO, ..PruneOptions::default() };
    let report = repo.prune(&opts, &mut |_| {}).unwrap();
    assert!(report.bytes_freed > 0, "{report:?}");
    let repo = Repository::open(&repo_dir, &secret()).unwrap();
    assert!(repo.verify(true).unwrap().is_ok());
    assert_eq!(restored(&repo, ids[5], tmp.path(), "out.img"), last);
}

#[test]
fn a_copier_without_a_base_builds_each_chunk_list_against_the_volumes_newest_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path(), "disk.img", 16, 3);
    let other = image(tmp.path(), "other.img", 16, 4);
    let mut repo = Repository::init_with(&tmp.path().join("repo"), &secret(), opts()).unwrap();
    assert_eq!(repo.latest_volume("srv-a", "/dev/vda").unwrap(), None, "an empty repository");
    let parents = Parents::default();
    let key = |server: &str| BaseKey {
        group: "g".into(),
        server: server.into(),
        volume: "/dev/vda".into(),
    };
    let first = parents.backup(&mut repo, &key("srv-a"), &img, meta("b0", "srv-a"), &mut |_| {});
    let first = first.unwrap();
    // Another server's volume of the same name and size is not srv-a's parent.
    let b = parents.backup(&mut repo, &key("srv-b"), &other, meta("b0", "srv-b"), &mut |_| {});
    let b = b.unwrap();
    assert!(b.stats.metadata_bytes > 4096 * 24, "a whole page: {:?}", b.stats);
    assert_eq!(repo.latest_volume("srv-a", "/dev/vda").unwrap(), Some(first.id));
    assert_eq!(repo.latest_volume("srv-b", "/dev/vda").unwrap(), Some(b.id));
    assert_eq!(repo.latest_volume("srv-a", "/dev/vdb").unwrap(), None);

    // Every chunk is read (no change map), but the one changed page is a small delta.
    rewrite(&img, 9, 10, None);
    let second = parents.backup(&mut repo, &key("srv-a"), &img, meta("b1", "srv-a"), &mut |_| {});
    let second = second.unwrap();
    let data_chunks = |s: &stillpoint_saveset::BackupStats| s.new_chunks + s.reused_chunks;
    // (The ten blocks may land in holes: more data chunks, never fewer.)
    assert!(data_chunks(&second.stats) >= data_chunks(&first.stats), "{:?}", second.stats);
    assert_eq!(second.stats.bytes_skipped, 0, "{:?}", second.stats);
    assert_eq!(second.stats.change_map, "none", "no map was asked for: {:?}", second.stats);
    assert!(second.stats.metadata_bytes < 2048, "a delta of ten entries: {:?}", second.stats);
    // A fresh process finds the parent in the repository.
    rewrite(&img, 10, 10, None);
    let third =
        Parents::default().backup(&mut repo, &key("srv-a"), &img, meta("b2", "srv-a"), &mut |_| {});
    let third = third.unwrap();
    assert!(third.stats.metadata_bytes < 2048, "{:?}", third.stats);
    assert_eq!(repo.latest_volume("srv-a", "/dev/vda").unwrap(), Some(third.id));
    assert_eq!(restored(&repo, third.id, tmp.path(), "out.img"), b3(&img));
}
