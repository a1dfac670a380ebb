//! Mock SAN behaviour on whatever filesystem the temp dir is on (reflink or sparse copy).

use std::io::{Seek, SeekFrom, Write};

use super::*;

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn snapshot_is_point_in_time_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let array = Array::init(dir.path()).unwrap();
    let lun = array.create_lun("srv-a", "data", 8 << 20).unwrap();
    write_at(&lun.path, 4096, b"before");
    let (snap, _) = array.snapshot("b1", "srv-a", "data").unwrap();
    write_at(&lun.path, 4096, b"after!");
    let bytes = fs::read(&snap.path).unwrap();
    assert_eq!(&bytes[4096..4102], b"before");
    assert_eq!(bytes.len(), 8 << 20);
    assert_eq!(array.present("b1", "srv-a", "data").unwrap(), snap.path);
    assert!(fs::metadata(&snap.path).unwrap().permissions().readonly());
}

#[test]
fn snapshot_is_idempotent_and_delete_is_too() {
    let dir = tempfile::tempdir().unwrap();
    let array = Array::init(dir.path()).unwrap();
    array.create_lun("srv-a", "data", 1 << 20).unwrap();
    array.create_lun("srv-a", "logs", 1 << 20).unwrap();
    array.snapshot("b1", "srv-a", "data").unwrap();
    array.snapshot("b1", "srv-a", "data").unwrap();
    array.snapshot("b1", "srv-a", "logs").unwrap();
    assert_eq!(array.snapshots(Some("b1")).unwrap().len(), 2);
    assert_eq!(array.delete_snapshots("b1", "srv-a").unwrap(), 2);
    assert_eq!(array.delete_snapshots("b1", "srv-a").unwrap(), 0);
    assert!(array.snapshots(None).unwrap().is_empty());
}

#[test]
fn sparse_copy_keeps_data_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src");
    let dst_path = dir.path().join("dst");
    let src = File::create(&src_path).unwrap();
    src.set_len(16 << 20).unwrap();
    write_at(&src_path, 5 << 20, b"payload");
    let src = File::open(&src_path).unwrap();
    let dst = File::create(&dst_path).unwrap();
    sparse_copy(&src, &dst, 16 << 20).unwrap();
    assert_eq!(fs::read(&src_path).unwrap(), fs::read(&dst_path).unwrap());
    use std::os::unix::fs::MetadataExt;
    assert!(fs::metadata(&dst_path).unwrap().blocks() * 512 < 4 << 20, "copy should stay sparse");
}

#[test]
fn bad_names_and_missing_arrays_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let err = Array::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("is not a mock SAN array"), "{err}");
    let array = Array::init(dir.path()).unwrap();
    let err = array.create_lun("../etc", "x", 10).unwrap_err().to_string();
    assert!(err.contains("not a valid name"), "{err}");
    array.create_lun("srv-a", "data", 10).unwrap();
    let err = array.create_lun("srv-a", "data", 20).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    let err = array.present("b9", "srv-a", "data").unwrap_err().to_string();
    assert!(err.contains("no snapshot"), "{err}");
}

#[test]
fn clone_or_copy_makes_a_whole_copy_with_the_mode_asked() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.img");
    File::create(&src).unwrap().set_len(4 << 20).unwrap();
    write_at(&src, 1 << 20, b"server data");
    let dst = dir.path().join("idr").join("srv-a-data.img");
    let (size, _) = clone_or_copy(&src, &dst, 0o640).unwrap();
    assert_eq!(size, 4 << 20);
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    assert_eq!(fs::metadata(&dst).unwrap().permissions().mode() & 0o777, 0o640);
    assert!(!dir.path().join("idr").join(".srv-a-data.img.partial").exists());
}
