//! Size parsing and the `san` verbs on a temporary array: `init` in a temp dir (an XFS image
//! where `/tmp` cannot reflink, as on this project's machines), then the rest on it.

use std::path::Path;

use stillpoint_core::san::ImageMount;

use super::*;

#[test]
fn sizes_parse_with_binary_units() {
    for (text, bytes) in [
        ("4096", 4096),
        ("4096B", 4096),
        ("64K", 64 << 10),
        ("64M", 64 << 20),
        ("64m", 64 << 20),
        ("64MiB", 64 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
    ] {
        assert_eq!(parse_size(text), Ok(bytes), "{text}");
    }
    for (text, why) in [
        ("", "invalid size"),
        ("M", "invalid size"),
        ("1.5G", "invalid size"),
        ("64Q", "invalid size"),
        ("-1", "invalid size"),
        ("0", "more than 0"),
        ("99999999999T", "too large"),
    ] {
        let err = parse_size(text).unwrap_err();
        assert!(err.contains(why), "{text}: {err}");
    }
}

fn check(san: San) -> String {
    let mut out = Vec::new();
    run(san, &mut out).unwrap_or_else(|e| panic!("san: {e}"));
    String::from_utf8(out).unwrap()
}

fn array(dir: &Path) -> PathBuf {
    dir.join("array")
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

fn init(root: &Path) -> (String, Unmount) {
    let args = InitArgs { dir: root.into(), image: None, image_size: Some(1 << 30) };
    let out = check(San::Init(args));
    let mount = Array::open(root).unwrap().image().cloned();
    (out, Unmount(mount))
}

#[test]
fn init_create_list_snapshot_present_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let root = array(dir.path());
    let (said, _unmount) = init(&root);
    assert!(said.starts_with(&format!("mock SAN array ready at {}", root.display())), "{said}");
    let again = check(San::Init(InitArgs { dir: root.clone(), image: None, image_size: None }));
    assert!(again.contains("it was there") && again.contains("reflink clones"), "{again}");
    assert!(!again.contains("no image made"), "{again}");
    let sized =
        check(San::Init(InitArgs { dir: root.clone(), image: None, image_size: Some(1 << 30) }));
    assert!(sized.contains("(no image made: --image and --image-size apply only where"), "{sized}");
    let lun = check(San::CreateLun(CreateLunArgs {
        array: root.clone(),
        server: "srv-a".into(),
        lun: "data".into(),
        size: 64 << 20,
    }));
    assert_eq!(lun.trim_end(), root.join("luns/srv-a/data.lun").display().to_string());

    let present = |backup: &str| {
        run(
            San::Present(LunSnapshotArgs {
                array: root.clone(),
                backup: backup.into(),
                server: "srv-a".into(),
                lun: "data".into(),
            }),
            &mut Vec::new(),
        )
    };
    let err = present("b-1").unwrap_err();
    assert_eq!(err.exit_code(), crate::EXIT_USAGE);
    assert!(err.to_string().contains("no snapshot of srv-a/data for backup b-1"), "{err}");

    let snapshot = |backup: &str, json| {
        San::Snapshot(SnapshotArgs {
            of: LunSnapshotArgs {
                array: root.clone(),
                backup: backup.into(),
                server: "srv-a".into(),
                lun: "data".into(),
            },
            json,
        })
    };
    let taken: serde_json::Value = serde_json::from_str(&check(snapshot("b-1", true))).unwrap();
    assert_eq!(taken["path"], root.join("snapshots/b-1/srv-a/data.lun").display().to_string());
    assert_eq!(taken["size_bytes"], 64 << 20);
    assert!(taken["took_us"].as_u64().unwrap() < 1_000_000, "{taken}");
    assert_eq!(taken["existed"], false);
    let human = check(snapshot("b-0", false));
    assert!(human.contains("(64.0 MiB, reflink clone in "), "{human}");
    // Taken again for the same backup: the array returns it as it is, and nothing is cloned.
    let again = check(snapshot("b-1", false));
    assert!(again.contains("(64.0 MiB, taken before for this backup; nothing cloned)"), "{again}");
    let again: serde_json::Value = serde_json::from_str(&check(snapshot("b-1", true))).unwrap();
    assert_eq!(again["existed"], true);
    check(San::Delete(DeleteArgs {
        array: root.clone(),
        backup: "b-0".into(),
        server: "srv-a".into(),
    }));
    let json = check(San::List(ListArgs { array: root.clone(), json: true }));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["luns"][0]["size_bytes"], 64 << 20);
    assert_eq!(v["snapshots"][0]["backup_id"], "b-1");
    assert_eq!(v["snapshots"][0]["lun"], "data");
    let human = check(San::List(ListArgs { array: root.clone(), json: false }));
    assert!(human.contains("srv-a   data  64.0 MiB"), "{human}");
    assert!(human.contains("b-1     srv-a   data"), "{human}");

    let mut out = Vec::new();
    run(
        San::Present(LunSnapshotArgs {
            array: root.clone(),
            backup: "b-1".into(),
            server: "srv-a".into(),
            lun: "data".into(),
        }),
        &mut out,
    )
    .unwrap();
    let path = String::from_utf8(out).unwrap();
    assert_eq!(path.trim_end(), root.join("snapshots/b-1/srv-a/data.lun").display().to_string());

    let delete = || {
        check(San::Delete(DeleteArgs {
            array: root.clone(),
            backup: "b-1".into(),
            server: "srv-a".into(),
        }))
    };
    assert_eq!(delete(), "deleted 1 snapshot(s) of srv-a for backup b-1\n");
    assert_eq!(delete(), "deleted 0 snapshot(s) of srv-a for backup b-1\n");
}

/// On this machine `/tmp` is ext4: init makes the image, prints the fstab line, and umount and
/// mount take the array away and bring it back with its LUNs.
#[test]
fn init_in_an_image_prints_the_fstab_line_and_umount_and_mount_work() {
    let dir = tempfile::tempdir().unwrap();
    let root = array(dir.path());
    if stillpoint_core::san::image::can_reflink(dir.path()).unwrap() {
        eprintln!("skipped: {} can reflink, so init makes no image there", dir.path().display());
        return;
    }
    let (said, _unmount) = init(&root);
    let image = dir.path().join("array.img");
    assert!(
        said.contains(&format!(
            "new XFS image with reflink, {} (1.0 GiB, sparse)",
            image.display()
        )),
        "{said}"
    );
    let fstab = format!("{} {} xfs loop,discard,nofail 0 0", image.display(), root.display());
    assert!(said.contains(&format!("add this line to /etc/fstab:\n  {fstab}\n")), "{said}");
    Array::open(&root).unwrap().create_lun("srv-a", "data", 1 << 20).unwrap();

    let umount = check(San::Umount { dir: root.clone() });
    assert!(umount.contains("unmounted"), "{umount}");
    let err = run(San::List(ListArgs { array: root.clone(), json: false }), &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not mounted") && err.contains("backupctl san mount"), "{err}");
    assert!(check(San::Umount { dir: root.clone() }).contains("was not mounted"));
    assert!(check(San::Mount { dir: root.clone() }).contains(" mounted (image "));
    assert!(check(San::Mount { dir: root.clone() }).contains("already mounted"));
    let list = check(San::List(ListArgs { array: root.clone(), json: true }));
    assert!(list.contains("\"server\":\"srv-a\""), "{list}");
}

#[test]
fn commands_on_a_missing_array_say_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = run(San::List(ListArgs { array: array(dir.path()), json: false }), &mut Vec::new())
        .unwrap_err();
    assert!(err.to_string().contains("backupctl san init"), "{err}");
}
