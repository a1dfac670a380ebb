//! Mock SAN behaviour on arrays made as `backupctl san init` makes them (in the temp dir where it
//! can reflink, else in a loop-mounted XFS image, unmounted when the test's handle goes), and its
//! refusals on a filesystem that cannot clone (a tmpfs mounted for the test).

use std::io::{Seek, SeekFrom, Write};
use std::process::Command;

use super::*;

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

#[test]
fn snapshot_is_point_in_time_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let array = Array::init(&dir.path().join("array")).unwrap();
    let lun = array.create_lun("srv-a", "data", 8 << 20).unwrap();
    write_at(&lun.path, 4096, b"before");
    let snap = array.snapshot("b1", "srv-a", "data").unwrap();
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
    let array = Array::init(&dir.path().join("array")).unwrap();
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
    let array = Array::init(&dir.path().join("array")).unwrap();
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

/// A tmpfs mounted for one test: a filesystem that cannot reflink, whatever `/tmp` is.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4g", "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs { dir: dir.to_path_buf() }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}

/// Unmounts an array's image when the test ends, even on failure.
struct Unmount(Option<ImageMount>);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Some(mount) = &self.0 {
            mount.unmount_for_cleanup();
        }
    }
}

#[test]
fn an_array_where_the_filesystem_cannot_reflink_refuses_to_copy_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&dir.path().join("tmpfs"));
    assert!(!image::can_reflink(&tmpfs.dir).unwrap(), "tmpfs should not reflink");
    // An array made before snapshots had to clone: the layout alone, on tmpfs.
    let array = Array::make_layout(&tmpfs.dir.join("array"), None).unwrap();
    let lun = array.create_lun("srv-a", "data", 8 << 20).unwrap();
    write_at(&lun.path, 0, b"data");
    let err = array.snapshot("b1", "srv-a", "data").unwrap_err().to_string();
    for words in [
        "is on tmpfs, which cannot reflink",
        "takes no copy snapshots",
        "backupctl san init DIR",
        "Moving an array",
    ] {
        assert!(err.contains(words), "{words:?} missing from: {err}");
    }
    assert_eq!(array.check_clones().unwrap_err().to_string(), err);
    assert!(array.snapshots(None).unwrap().is_empty());
    let leftovers: Vec<_> =
        fs::read_dir(array.root().join("snapshots/b1/srv-a")).unwrap().collect();
    assert!(leftovers.is_empty(), "a failed snapshot left {leftovers:?}");
    // Listing still works on it, so an operator can see what to move.
    assert_eq!(array.luns(None).unwrap().len(), 1);
    // `init` on it refuses too, rather than mounting over its LUNs.
    let err = Array::create(array.root(), &InitOptions::default()).unwrap_err().to_string();
    assert!(err.contains("cannot reflink"), "{err}");
}

#[test]
fn init_makes_an_xfs_image_where_the_directory_cannot_reflink_and_mounts_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&dir.path().join("tmpfs"));
    let root = tmpfs.dir.join("array");
    let (array, how) = Array::create(&root, &InitOptions::default()).unwrap();
    let Init::Image(mount) = how else { panic!("expected an image, got {how:?}") };
    let _unmount = Unmount(Some(mount.clone()));
    assert_eq!(mount.image, tmpfs.dir.join("array.img"), "the default image sits beside the dir");
    assert_eq!(array.image(), Some(&mount));
    assert!(mount.is_mounted());
    assert_eq!(image::fs_name(&root), "xfs");
    // Sparse: 64 GiB, or the tmpfs's 4 GiB rounded down to whole GiB.
    assert_eq!(fs::metadata(&mount.image).unwrap().len(), 4 << 30);
    assert_eq!(
        mount.fstab_line(),
        format!("{} {} xfs loop,discard,nofail 0 0", mount.image.display(), root.display())
    );

    let lun = array.create_lun("srv-a", "data", 1 << 30).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..64u64 {
        write_at(&lun.path, i * (16 << 20), &chunk);
    }
    // A reflink clone, not a copy: the 64 MiB written are shared, not written again (a copy
    // would take 64 MiB of the image's space; a clone takes a few blocks of metadata).
    let free = || {
        let dir = fs::File::open(&root).unwrap();
        crate::sys::fs_stat(&dir).unwrap().available_bytes
    };
    let before = free();
    let snap = array.snapshot("b1", "srv-a", "data").unwrap();
    let used = before.saturating_sub(free());
    assert!(used < 8 << 20, "the clone of 64 MiB of data took {used} bytes of space");
    assert_eq!(fs::read(&snap.path).unwrap(), fs::read(&lun.path).unwrap());
    // Idempotent on a mounted image-backed array.
    let (_, again) = Array::create(&root, &InitOptions::default()).unwrap();
    assert_eq!(again, Init::Existing);

    mount.unmount().unwrap();
    assert!(!mount.is_mounted());
    let err = Array::open(&root).unwrap_err().to_string();
    assert!(err.contains("which is not mounted"), "{err}");
    assert!(err.contains(&format!("backupctl san mount {}", root.display())), "{err}");
    assert!(err.contains(&mount.fstab_line()), "{err}");
    // A handle opened while it was mounted says so too, rather than reporting an empty array:
    // no "deleted 0" while the snapshot sits in the image, no LUN made under the mount point.
    let unmounted = |e: Error| assert!(e.to_string().contains("which is not mounted"), "{e}");
    unmounted(array.delete_snapshots("b1", "srv-a").unwrap_err());
    unmounted(array.snapshots(None).unwrap_err());
    unmounted(array.luns(None).unwrap_err());
    unmounted(array.snapshot("b2", "srv-a", "data").unwrap_err());
    unmounted(array.present("b1", "srv-a", "data").unwrap_err());
    unmounted(array.create_lun("srv-a", "more", 1 << 20).unwrap_err());
    assert!(!root.join("luns").exists() && !root.join("snapshots").exists());

    // After a "reboot", init (like `san mount`) mounts it again, with the LUN and snapshot.
    let (array, how) = Array::create(&root, &InitOptions::default()).unwrap();
    assert_eq!(how, Init::Mounted(mount.clone()));
    assert_eq!(array.snapshots(None).unwrap().len(), 1);
    let mut start = vec![0u8; 4];
    use std::os::unix::fs::FileExt;
    File::open(&lun.path).unwrap().read_exact_at(&mut start, 0).unwrap();
    assert_eq!(start, [0xa5; 4]);
}

#[test]
fn init_refuses_to_mount_over_files_or_make_a_tiny_image() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&dir.path().join("tmpfs"));
    let busy = tmpfs.dir.join("busy");
    fs::create_dir_all(&busy).unwrap();
    fs::write(busy.join("precious"), b"x").unwrap();
    let err = Array::create(&busy, &InitOptions::default()).unwrap_err().to_string();
    assert!(err.contains("is not empty"), "{err}");
    assert!(busy.join("precious").is_file());

    let small = InitOptions { image: None, image_size: Some(100 << 20) };
    let err = Array::create(&tmpfs.dir.join("small"), &small).unwrap_err().to_string();
    assert!(err.contains("too small"), "{err}");
    assert!(!tmpfs.dir.join("small.img").exists());
    assert!(!image::is_mount_point(&tmpfs.dir.join("small")));
}

#[test]
fn mount_points_are_read_from_mountinfo_with_its_escapes() {
    assert_eq!(image::unescape(r"/srv/a\040b\134c"), PathBuf::from(r"/srv/a b\c"));
    assert_eq!(image::unescape(r"/srv/x\9"), PathBuf::from(r"/srv/x\9"));
    assert!(image::is_mount_point(Path::new("/")));
    let dir = tempfile::tempdir().unwrap();
    assert!(!image::is_mount_point(dir.path()));
}

#[test]
fn init_unmounts_the_image_it_mounted_once_the_last_handle_goes() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(&dir.path().join("tmpfs"));
    let root = tmpfs.dir.join("array");
    let array = Array::init(&root).unwrap();
    let mount = array.image().cloned().expect("tmpfs cannot reflink: init made an image");
    let _unmount = Unmount(Some(mount.clone()));
    let clone = array.clone();
    let opened = Array::open(&root).unwrap();
    drop(array);
    assert!(mount.is_mounted(), "a clone still holds it");
    drop(opened);
    assert!(mount.is_mounted(), "a handle from open does not own the mount");
    drop(clone);
    assert!(!mount.is_mounted(), "the last handle from init unmounted it");
    assert!(mount.image.is_file(), "the image stays, with its LUNs");
    let (_, how) = Array::create(&root, &InitOptions::default()).unwrap();
    assert_eq!(how, Init::Mounted(mount.clone()));
    assert!(mount.is_mounted(), "create leaves it mounted");
}
