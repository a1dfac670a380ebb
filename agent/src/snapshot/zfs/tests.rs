//! The zfs provider against a fake `zfs` (`testdata/fake-zfs`; there is no ZFS on the test
//! machine): each test gives the fake its answers, call by call, and checks the exact commands
//! it ran and what the provider made of the answers.
//!
//! Where the answers come from: they were written by hand in the exact format OpenZFS 2.x
//! prints, not captured from a live pool. `zfs list -H` separates columns with one tab and
//! prints no header; `-p` prints sizes as exact byte counts; an unset user property prints `-`.
//! `zfs holds -H` prints `NAME<TAB>TAG<TAB>TIMESTAMP` with the time as `%a %b %e %H:%M %Y` (we
//! read only the first two columns). Errors are libzfs's `cannot open '<name>': dataset does not
//! exist` and `cannot create snapshot '<name>': out of space`, with exit status 1.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::snapshot::all_or_nothing;

const ID: &str = "20250301T020000Z-1a2b3c";
const SNAP: &str = "stillpoint-20250301T020000Z-1a2b3c";
const LIST_SNAPSHOTS: &str =
    "zfs list -H -p -t snapshot -o name,used,referenced,stillpoint:backup -d 1";

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/snapshot/zfs/testdata").join(name)
}

/// One answer of the fake: a stdout fixture (or none), a stderr fixture (or none), the status.
type Answer<'a> = (Option<&'a str>, Option<&'a str>, i32);

const OK: Answer = (None, None, 0);

fn out(fixture: &str) -> Answer<'_> {
    (Some(fixture), None, 0)
}

/// The fake `zfs` in a directory of its own, answering `answers` in order.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new(answers: &[Answer]) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(testdata("fake-zfs"), dir.path().join("zfs")).unwrap();
        for (i, (stdout, stderr, rc)) in answers.iter().enumerate() {
            let n = i + 1;
            if let Some(f) = stdout {
                std::fs::copy(testdata(f), dir.path().join(format!("{n}.out"))).unwrap();
            }
            if let Some(f) = stderr {
                std::fs::copy(testdata(f), dir.path().join(format!("{n}.err"))).unwrap();
            }
            std::fs::write(dir.path().join(format!("{n}.rc")), rc.to_string()).unwrap();
        }
        Fake { dir }
    }

    fn provider(&self, datasets: &[&str]) -> Zfs {
        let datasets: Vec<String> = datasets.iter().map(|d| d.to_string()).collect();
        Zfs::new(&ZfsConfig { program: self.dir.path().join("zfs") }, &datasets)
    }

    /// Every command the fake ran, in order.
    fn argv(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("argv.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

const THREE: [&str; 3] = ["tank/vm1", "tank/db", "backup/logs"];

fn volumes() -> Vec<String> {
    THREE.iter().map(|v| v.to_string()).collect()
}

fn snaps(datasets: &[&str]) -> String {
    datasets.iter().map(|d| format!("{d}@{SNAP}")).collect::<Vec<_>>().join(" ")
}

#[test]
fn create_snapshots_each_pool_in_one_command_tags_and_holds() {
    let fake = Fake::new(&[
        out("datasets.txt"),
        out("snapshots-before.txt"),
        OK,
        OK,
        OK, // no holds yet: `zfs holds -H` prints nothing
        OK,
        out("snapshots-after.txt"),
    ]);
    let made = fake.provider(&THREE).create(ID, &volumes()).unwrap();
    assert_eq!(
        fake.argv(),
        [
            "zfs list -H -p -o name,type,mountpoint tank/vm1 tank/db backup/logs".to_string(),
            format!("{LIST_SNAPSHOTS} tank/vm1 tank/db backup/logs"),
            format!("zfs snapshot -o stillpoint:backup={ID} {}", snaps(&["backup/logs"])),
            format!("zfs snapshot -o stillpoint:backup={ID} {}", snaps(&["tank/vm1", "tank/db"])),
            format!("zfs holds -H {}", snaps(&THREE)),
            format!("zfs hold {SNAP} {}", snaps(&THREE)),
            format!("{LIST_SNAPSHOTS} tank/vm1 tank/db backup/logs"),
        ]
    );
    let got: Vec<_> =
        made.iter().map(|s| (s.volume.as_str(), s.locator.as_str(), s.size_bytes)).collect();
    assert_eq!(
        got,
        [
            ("tank/vm1", format!("/dev/zvol/tank/vm1@{SNAP}").as_str(), 21_474_836_480),
            ("tank/db", format!("/srv/db/.zfs/snapshot/{SNAP}").as_str(), 5_368_709_120),
            ("backup/logs", format!("/backup/logs/.zfs/snapshot/{SNAP}").as_str(), 1_073_741_824),
        ]
    );
    assert!(made.iter().all(|s| s.provider == "zfs"));
}

#[test]
fn create_again_retakes_nothing_and_holds_nothing_twice() {
    let fake = Fake::new(&[
        out("datasets.txt"),
        out("snapshots-after.txt"),
        out("holds-ours.txt"),
        out("snapshots-after.txt"),
    ]);
    let made = fake.provider(&THREE).create(ID, &volumes()).unwrap();
    assert_eq!(made.len(), 3);
    assert_eq!(
        fake.argv(),
        [
            "zfs list -H -p -o name,type,mountpoint tank/vm1 tank/db backup/logs".to_string(),
            format!("{LIST_SNAPSHOTS} tank/vm1 tank/db backup/logs"),
            format!("zfs holds -H {}", snaps(&THREE)),
            format!("{LIST_SNAPSHOTS} tank/vm1 tank/db backup/logs"),
        ]
    );
}

#[test]
fn list_finds_ours_by_property_and_name_and_nothing_else() {
    // snapshots-after.txt also holds an autosnap, a `stillpoint-manual` without the property and
    // an older backup of ours.
    let fake = Fake::new(&[out("snapshots-after.txt"), out("datasets.txt")]);
    let mut got: Vec<_> = fake
        .provider(&THREE)
        .list()
        .unwrap()
        .into_iter()
        .map(|(b, s)| (b, s.volume, s.locator))
        .collect();
    got.sort();
    let older = "20250228T020000Z-9f8e7d";
    assert_eq!(
        got,
        [
            (
                older.to_string(),
                "backup/logs".to_string(),
                format!("/backup/logs/.zfs/snapshot/stillpoint-{older}")
            ),
            (ID.into(), "backup/logs".into(), format!("/backup/logs/.zfs/snapshot/{SNAP}")),
            (ID.into(), "tank/db".into(), format!("/srv/db/.zfs/snapshot/{SNAP}")),
            (ID.into(), "tank/vm1".into(), format!("/dev/zvol/tank/vm1@{SNAP}")),
        ]
    );
}

#[test]
fn delete_releases_our_holds_then_destroys_and_a_repeat_deletes_nothing() {
    let fake = Fake::new(&[
        out("snapshots-after.txt"),
        out("holds-ours.txt"),
        OK,
        OK,
        OK,
        OK,
        out("snapshots-before.txt"),
    ]);
    let zfs = fake.provider(&THREE);
    assert_eq!(zfs.delete(ID).unwrap(), 3);
    assert_eq!(zfs.delete(ID).unwrap(), 0);
    assert_eq!(
        fake.argv(),
        [
            format!("{LIST_SNAPSHOTS} tank/vm1 tank/db backup/logs"),
            format!("zfs holds -H {}", snaps(&THREE)),
            format!("zfs release {SNAP} {}", snaps(&THREE)),
            format!("zfs destroy tank/vm1@{SNAP}"),
            format!("zfs destroy tank/db@{SNAP}"),
            format!("zfs destroy backup/logs@{SNAP}"),
            format!("{LIST_SNAPSHOTS} tank/vm1 tank/db backup/logs"),
        ]
    );
}

#[test]
fn delete_releases_only_our_tag_and_says_which_snapshot_another_hold_keeps() {
    // tank/db's snapshot lost our hold and carries another program's: nothing of ours to
    // release there, and ZFS refuses to destroy it while the other hold stays.
    let fake = Fake::new(&[
        out("snapshots-half.txt"),
        out("holds-foreign.txt"),
        OK,
        (None, Some("err-busy.txt"), 1),
    ]);
    let err = fake.provider(&THREE).delete(ID).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("destroy tank/db@{SNAP}")) && text.contains("dataset is busy"),
        "{text}"
    );
    assert_eq!(
        fake.argv(),
        [
            format!("{LIST_SNAPSHOTS} tank/vm1 tank/db backup/logs"),
            format!("zfs holds -H {}", snaps(&["tank/vm1", "tank/db"])),
            format!("zfs destroy tank/vm1@{SNAP}"),
            format!("zfs destroy tank/db@{SNAP}"),
        ]
    );
}

#[test]
fn a_second_pool_failing_deletes_what_the_first_pool_made() {
    // As the agent builds it (all or nothing). Pools go in name order: backup's snapshot is
    // made, then tank's command fails, and the provider deletes backup's before answering.
    let fake = Fake::new(&[
        out("datasets.txt"),
        out("snapshots-before.txt"),
        OK,
        (None, Some("err-out-of-space.txt"), 1),
        // all or nothing: the provider's own delete of what was made
        out("snapshots-one-pool.txt"),
        OK, // no holds were taken yet
        OK,
    ]);
    let zfs = all_or_nothing(Arc::new(fake.provider(&THREE)));
    let err = zfs.create(ID, &volumes()).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("snapshot the datasets of pool tank") && text.contains("out of space"),
        "{text}"
    );
    assert!(text.contains("deleted the 1 snapshot(s)"), "{text}");
    assert_eq!(
        fake.argv(),
        [
            "zfs list -H -p -o name,type,mountpoint tank/vm1 tank/db backup/logs".to_string(),
            format!("{LIST_SNAPSHOTS} tank/vm1 tank/db backup/logs"),
            format!("zfs snapshot -o stillpoint:backup={ID} {}", snaps(&["backup/logs"])),
            format!("zfs snapshot -o stillpoint:backup={ID} {}", snaps(&["tank/vm1", "tank/db"])),
            format!("{LIST_SNAPSHOTS} tank/vm1 tank/db backup/logs"),
            format!("zfs holds -H {}", snaps(&["backup/logs"])),
            format!("zfs destroy backup/logs@{SNAP}"),
        ]
    );
}

#[test]
fn a_missing_dataset_fails_before_any_snapshot_naming_it() {
    let fake = Fake::new(&[(Some("datasets.txt"), Some("err-missing-dataset.txt"), 1)]);
    let err = fake.provider(&["tank/missing"]).create(ID, &["tank/missing".into()]).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("cannot open 'tank/missing': dataset does not exist"), "{text}");
    assert_eq!(fake.argv().len(), 1, "{:?}", fake.argv());
}

#[test]
fn list_and_delete_skip_a_dataset_that_no_longer_exists() {
    let fake = Fake::new(&[(Some("snapshots-before.txt"), Some("err-missing-dataset.txt"), 1)]);
    let zfs = fake.provider(&["tank/vm1", "tank/db", "tank/missing"]);
    assert!(zfs.list().unwrap().is_empty());
}

#[test]
fn output_not_in_the_expected_format_is_an_error_naming_the_line() {
    let fake = Fake::new(&[out("datasets.txt")]);
    // datasets.txt has three columns where the snapshot listing wants four.
    let err = fake.provider(&THREE).list().unwrap_err();
    assert!(format!("{err:#}").contains("want 4 tab-separated columns"), "{err:#}");
}

#[test]
fn dataset_names_are_checked() {
    for bad in ["", "/tank/vm1", "tank/vm1@snap", "tank//vm1", "tank/vm 1", "tank/"] {
        assert!(dataset_name(bad).is_err(), "{bad:?}");
    }
    for good in ["tank", "tank/vm1", "backup/logs.2025:a_b-c"] {
        assert!(dataset_name(good).is_ok(), "{good:?}");
    }
}
