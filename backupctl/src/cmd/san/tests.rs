//! Size parsing and the `san` verbs on a temporary array.

use std::path::Path;

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

#[test]
fn init_create_list_and_present() {
    let dir = tempfile::tempdir().unwrap();
    let root = array(dir.path());
    assert!(check(San::Init { dir: root.clone() }).starts_with("mock SAN array ready at "));
    let lun = check(San::CreateLun(CreateLunArgs {
        array: root.clone(),
        server: "srv-a".into(),
        lun: "data".into(),
        size: 64 << 20,
    }));
    assert_eq!(lun.trim_end(), root.join("luns/srv-a/data.lun").display().to_string());

    let present = |backup: &str| {
        run(
            San::Present(PresentArgs {
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

    Array::open(&root).unwrap().snapshot("b-1", "srv-a", "data").unwrap();
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
        San::Present(PresentArgs {
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
}

#[test]
fn commands_on_a_missing_array_say_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = run(San::List(ListArgs { array: array(dir.path()), json: false }), &mut Vec::new())
        .unwrap_err();
    assert!(err.to_string().contains("backupctl san init"), "{err}");
}
