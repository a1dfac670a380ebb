//! Claims between sibling copies: a chunk a sibling claimed and never stored is stored by the
//! copy that waited for it, so its manifest never references a chunk that is not durable.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::*;
use crate::crypto::{KdfParams, Secret};
use crate::repo::InitOptions;

#[test]
fn chunks_a_failed_sibling_claimed_are_stored_by_the_copy_that_waited() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = dir.path().join("image");
    // 64 distinct incompressible chunks.
    let mut image = vec![0u8; 64 * 4096];
    blake3::Hasher::new().update(b"sibling").finalize_xof().fill(&mut image);
    File::create(&source).and_then(|f| f.write_all_at(&image, 0)).expect("write image");
    let opts = InitOptions {
        kdf: KdfParams { m_cost_kib: 8 * 1024, t_cost: 1, p_cost: 1 },
        ..InitOptions::default()
    };
    let secret = Secret::passphrase("siblings");
    let mut repo = Repository::init_with(&dir.path().join("repo"), &secret, opts).expect("init");
    let claims = Arc::new(Claims::default());
    repo.claims = Some(Arc::clone(&claims));
    // A sibling claims every chunk of the image, then fails without storing any.
    let sibling = claims.begin();
    for chunk in image.chunks(4096) {
        assert_eq!(claims.claim(ChunkId(repo.key.chunk_id(chunk)), sibling), Claimed::Mine);
    }
    let backup = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            claims.end(sibling);
        });
        let meta = VolumeMeta { backup: "b".into(), server: "s".into(), volume: "v".into() };
        repo.backup_volume(&source, meta, &mut |_| {}).expect("backup")
    });
    assert_eq!(backup.stats.new_chunks, 64, "{:?}", backup.stats);
    assert_eq!(backup.stats.reused_chunks, 0, "{:?}", backup.stats);
    let fresh = Repository::open(&dir.path().join("repo"), &secret).expect("open");
    let report = fresh.verify(true).expect("verify");
    assert!(report.is_ok(), "{:?}", report.damage);
    let target = dir.path().join("restored");
    fresh.restore_volume(backup.id, &target, false).expect("restore");
    assert!(std::fs::read(&target).expect("read back") == image);
}
