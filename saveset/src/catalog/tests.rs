//! Saved catalogs: written whole, read back, listed newest first, older ones of the same
//! listener deleted and never the newest.

use super::CatalogHeader;
use crate::{Repository, Secret};

fn repo(dir: &std::path::Path) -> Repository {
    let opts = crate::InitOptions {
        kdf: crate::KdfParams { m_cost_kib: 8 * 1024, t_cost: 1, p_cost: 1 },
        ..Default::default()
    };
    Repository::init_with(&dir.join("repo"), &Secret::passphrase("pw"), opts).unwrap()
}

fn header(listener: &str, at: u64, records: u64) -> CatalogHeader {
    CatalogHeader { listener: listener.into(), host: "h".into(), written_unix_ms: at, records }
}

#[test]
fn a_catalog_reads_back_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let body = b"{\"id\":\"b1\"}\n".repeat(1000);
    let id = repo.write_catalog(&header("l", 5, 1000), &body).unwrap();
    let (h, got) = repo.load_catalog(id).unwrap();
    assert_eq!(h, header("l", 5, 1000));
    assert_eq!(got, body);
    // Sealed: the body's text is nowhere in the file.
    let raw = std::fs::read(dir.path().join("repo/catalog").join(id.to_string())).unwrap();
    assert!(!raw.windows(6).any(|w| w == b"\"id\":\""));
}

#[test]
fn the_newest_few_are_kept_per_listener() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let other = repo.write_catalog(&header("other", 1, 0), b"").unwrap();
    let mut mine = Vec::new();
    for at in 10..15 {
        mine.push(repo.write_catalog(&header("l", at, 0), b"").unwrap());
    }
    let deleted = repo.keep_newest_catalogs("l", 3, mine[4]).unwrap();
    assert_eq!(deleted.len(), 2);
    let left: Vec<_> = repo.list_catalogs().unwrap().into_iter().map(|(id, _)| id).collect();
    assert_eq!(left, vec![mine[4], mine[3], mine[2], other]);
}

#[test]
fn a_damaged_catalog_is_named_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let repo = repo(dir.path());
    let good = repo.write_catalog(&header("l", 1, 0), b"x").unwrap();
    let bad = repo.write_catalog(&header("l", 2, 0), b"y").unwrap();
    let path = dir.path().join("repo/catalog").join(bad.to_string());
    let mut raw = std::fs::read(&path).unwrap();
    raw[30] ^= 1;
    std::fs::write(&path, raw).unwrap();
    let listed = repo.list_catalogs().unwrap();
    assert_eq!(listed[0].0, good);
    let err = listed[1].1.as_ref().unwrap_err().to_string();
    assert!(err.contains("does not decrypt"), "{err}");
    assert!(repo.keep_newest_catalogs("l", 1, good).unwrap().is_empty());
}
