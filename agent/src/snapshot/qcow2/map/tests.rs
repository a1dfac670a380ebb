//! The reader on images made by the real `qemu-img` and `qemu-io`, and on headers and tables
//! broken by hand: the expected ranges exactly, clear errors, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

const K64: u64 = 64 << 10;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect("run qemu tool");
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A fresh qcow2 image of `size` (qemu-img size syntax) with `options` (`-o`).
fn image(dir: &Path, name: &str, size: &str, options: &str) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().unwrap();
    if options.is_empty() {
        run("qemu-img", &["create", "-q", "-f", "qcow2", p, size]);
    } else {
        run("qemu-img", &["create", "-q", "-f", "qcow2", "-o", options, p, size]);
    }
    path
}

/// Runs qemu-io commands (`write -P 1 0 64k`, `discard ...`) against the active layer.
fn io(path: &Path, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(path.to_str().unwrap());
    run("qemu-io", &args);
}

fn snapshot(path: &Path, tag: &str) {
    run("qemu-img", &["snapshot", "-c", tag, path.to_str().unwrap()]);
}

/// The comparison of snapshots `a` and `b` of the image's bytes: what every test checks.
fn check(bytes: &[u8], a: &str, b: &str) -> Result<Vec<Range<u64>>, Why> {
    let image = Image::open(bytes)?;
    let (a, b) = (image.snapshot(a)?, image.snapshot(b)?);
    image.changes(a, b)
}

/// One changed range, as the comparison returns it.
fn just(range: Range<u64>) -> Result<Vec<Range<u64>>, Why> {
    Ok(vec![range])
}

fn changes(path: &Path, a: &str, b: &str) -> Result<Vec<Range<u64>>, Why> {
    check(&std::fs::read(path).unwrap(), a, b)
}

#[test]
fn snapshots_of_an_unchanged_disk_have_no_changed_range() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.qcow2", "16M", "");
    io(&img, &["write -P 1 0 1M", "write -P 2 5M 64k"]);
    snapshot(&img, "a");
    snapshot(&img, "b");
    assert_eq!(changes(&img, "a", "b"), Ok(vec![]));
    // An empty disk too, and a snapshot against itself.
    let empty = image(dir.path(), "e.qcow2", "16M", "");
    snapshot(&empty, "a");
    snapshot(&empty, "b");
    assert_eq!(changes(&empty, "a", "b"), Ok(vec![]));
    assert_eq!(changes(&img, "a", "a"), Ok(vec![]));
}

#[test]
fn rewritten_clusters_are_exactly_the_changed_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.qcow2", "16M", "");
    io(&img, &["write -P 1 0 2M", "write -P 3 8M 1M"]);
    snapshot(&img, "a");
    io(
        &img,
        &[
            // 4 KiB inside cluster 16: the whole cluster is copied, so it is the range.
            "write -P 9 1052672 4k",
            // Clusters 20 and 21, adjacent: one range.
            "write -P 9 1310720 128k",
            // Never written before (was unallocated).
            "write -P 9 12M 64k",
            // Discarded data reads as zeros now: changed.
            "discard 8M 64k",
            // Zeros written where nothing was: still zeros, unchanged.
            "write -z 14M 128k",
        ],
    );
    snapshot(&img, "b");
    let expected = vec![
        16 * K64..17 * K64,
        20 * K64..22 * K64,
        (8 << 20)..(8 << 20) + K64,
        (12 << 20)..(12 << 20) + K64,
    ];
    let mut want = expected.clone();
    want.sort_by_key(|r| r.start);
    assert_eq!(changes(&img, "a", "b"), Ok(want.clone()));
    // The same ranges whichever way round.
    assert_eq!(changes(&img, "b", "a"), Ok(want));
    // Zeros over data are a change.
    io(&img, &["write -z 0 64k"]);
    snapshot(&img, "c");
    assert_eq!(changes(&img, "b", "c"), just(0..K64));
}

#[test]
fn a_version_2_image_and_small_clusters_compare_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "v2.qcow2", "4M", "compat=0.10,cluster_size=4096");
    io(&img, &["write -P 1 0 1M"]);
    snapshot(&img, "a");
    // 1 MiB at 4 KiB per cluster is 256 L2 entries; 4 KiB clusters hold 512 per table, so a
    // write at 3 MiB lands in the second L2 table.
    io(&img, &["write -P 2 8k 4k", "write -P 2 3M 8k"]);
    snapshot(&img, "b");
    assert_eq!(changes(&img, "a", "b"), Ok(vec![8192..12288, (3 << 20)..(3 << 20) + 8192]));
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(Image::open(&bytes[..]).unwrap().header.version, 2);
}

#[test]
fn compressed_clusters_are_the_same_only_with_the_same_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "c.qcow2", "4M", "");
    io(&img, &["write -c -P 1 0 64k", "write -c -P 2 1M 64k"]);
    snapshot(&img, "a");
    snapshot(&img, "b");
    assert_eq!(changes(&img, "a", "b"), Ok(vec![]));
    // qemu writes compressed only where nothing is allocated: discard first.
    io(&img, &["discard 1M 64k", "write -c -P 3 1M 64k"]);
    snapshot(&img, "c");
    assert_eq!(changes(&img, "b", "c"), just((1 << 20)..(1 << 20) + K64));
}

#[test]
fn a_tail_shorter_than_a_cluster_ends_the_last_range() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "t.qcow2", "1000k", "");
    snapshot(&img, "a");
    io(&img, &["write -P 1 960k 40k"]);
    snapshot(&img, "b");
    assert_eq!(changes(&img, "a", "b"), just(15 * K64..1000 * 1024));
}

#[test]
fn what_cannot_be_compared_says_why() {
    let dir = tempfile::tempdir().unwrap();
    // A resized disk: the snapshots' virtual sizes differ.
    let img = image(dir.path(), "r.qcow2", "4M", "");
    snapshot(&img, "a");
    run("qemu-img", &["resize", "-q", img.to_str().unwrap(), "8M"]);
    snapshot(&img, "b");
    let err = changes(&img, "a", "b").unwrap_err();
    assert!(err.contains("virtual sizes differ"), "{err}");
    // Names: missing, or twice.
    snapshot(&img, "b");
    assert!(changes(&img, "a", "nope").unwrap_err().contains("no snapshot named nope"));
    assert!(changes(&img, "a", "b").unwrap_err().contains("several snapshots are named b"));
    // An overlay reads unallocated clusters from its backing file.
    let over = dir.path().join("over.qcow2");
    let (base, o) = (img.to_str().unwrap(), over.to_str().unwrap());
    run("qemu-img", &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, o]);
    let err = Image::open(&std::fs::read(&over).unwrap()[..]).err().unwrap();
    assert!(err.contains("backing file"), "{err}");
    // Subclusters are not compared.
    let ext = image(dir.path(), "x.qcow2", "4M", "extended_l2=on");
    let err = Image::open(&std::fs::read(&ext).unwrap()[..]).err().unwrap();
    assert!(err.contains("extended L2"), "{err}");
    // Encryption is refused by its header field (`broken_headers_...`): qemu-img's LUKS
    // creation times its key derivation, which fails on a loaded machine.
}

/// Sets big-endian `value` of `width` bytes at `at`.
fn poke(bytes: &mut [u8], at: usize, value: u64, width: usize) {
    bytes[at..at + width].copy_from_slice(&value.to_be_bytes()[8 - width..]);
}

#[test]
fn broken_headers_and_tables_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.qcow2", "4M", "");
    io(&img, &["write -P 1 0 256k"]);
    snapshot(&img, "a");
    io(&img, &["write -P 2 0 64k"]);
    snapshot(&img, "b");
    let good = std::fs::read(&img).unwrap();
    assert_eq!(check(&good, "a", "b"), just(0..K64));
    let broken = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = good.clone();
        f(&mut bytes);
        check(&bytes, "a", "b").unwrap_err()
    };
    type Break = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Break)> = vec![
        ("bad magic", Box::new(|b| b[0] = b'X')),
        ("qcow2 version 4", Box::new(|b| poke(b, 4, 4, 4))),
        ("cluster_bits 40", Box::new(|b| poke(b, 20, 40, 4))),
        ("the dirty flag", Box::new(|b| poke(b, 72, DIRTY, 8))),
        ("the corrupt flag", Box::new(|b| poke(b, 72, CORRUPT, 8))),
        ("external data file", Box::new(|b| poke(b, 72, EXTERNAL_DATA, 8))),
        ("unknown incompatible features 0x100", Box::new(|b| poke(b, 72, 0x100, 8))),
        ("header_length 8", Box::new(|b| poke(b, 100, 8, 4))),
        ("backing file", Box::new(|b| poke(b, 8, 512, 8))),
        ("encrypted", Box::new(|b| poke(b, 32, 1, 4))),
        ("100000 snapshots", Box::new(|b| poke(b, 60, 100_000, 4))),
        ("snapshot table offset", Box::new(|b| poke(b, 64, 1 << 40, 8))),
        ("header: unexpected end of file", Box::new(|b| b.truncate(40))),
    ];
    for (want, f) in cases {
        let err = broken(&*f);
        assert!(err.contains(want), "want {want:?}, got {err:?}");
    }
    // The snapshot table: a's entry's L1 offset and size, then the whole table cut short.
    let image = Image::open(&good[..]).unwrap();
    let table = image.header.snapshots_offset as usize;
    let err = broken(&|b| poke(b, table, 1 << 40, 8));
    assert!(err.contains("truncated") && err.contains("L1 table"), "{err}");
    let err = broken(&|b| poke(b, table, 4096, 8));
    assert!(err.contains("not cluster-aligned"), "{err}");
    let err = broken(&|b| poke(b, table + 8, 0, 4));
    assert!(err.contains("its L1 table has 0 entries"), "{err}");
    let err = broken(&|b| b.truncate(table + 20));
    assert!(err.contains("snapshot table entry 0"), "{err}");
    // a's L1 entry: reserved bits, then an L2 table past the end.
    let l1 = image.snapshot("a").unwrap().l1_offset as usize;
    let err = broken(&|b| poke(b, l1, 1 << 60, 8));
    assert!(err.contains("reserved bits"), "{err}");
    let err = broken(&|b| poke(b, l1, 1 << 40, 8));
    assert!(err.contains("L2 table") && err.contains("truncated"), "{err}");
    // An L2 entry of b's (cluster 0 was rewritten, so b has its own L2 table): reserved bits,
    // an unaligned host offset, a host offset past the end.
    let l1b = image.snapshot("b").unwrap().l1_offset as usize;
    let l2 = (be64(&good, l1b) & L1_OFFSET) as usize;
    let err = broken(&|b| poke(b, l2 + 8, 0x1_0000 | 2, 8));
    assert!(err.contains("reserved bits"), "{err}");
    let err = broken(&|b| poke(b, l2 + 8, 0x1_0200, 8));
    assert!(err.contains("not cluster-aligned"), "{err}");
    let err = broken(&|b| poke(b, l2 + 8, 1 << 50, 8));
    assert!(err.contains("past the end"), "{err}");
}

/// Every byte of the metadata flipped in turn: an answer or an error, never a panic.
#[test]
fn flipped_metadata_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.qcow2", "2M", "cluster_size=4096");
    io(&img, &["write -P 1 0 64k", "write -c -P 2 1M 8k"]);
    snapshot(&img, "a");
    io(&img, &["write -P 3 0 4k"]);
    snapshot(&img, "b");
    let good = std::fs::read(&img).unwrap();
    let image = Image::open(&good[..]).unwrap();
    let table = image.header.snapshots_offset as usize;
    let l1a = image.snapshot("a").unwrap().l1_offset as usize;
    let l1b = image.snapshot("b").unwrap().l1_offset as usize;
    let l2b = (be64(&good, l1b) & L1_OFFSET) as usize;
    let regions = [0..512, table..table + 256, l1a..l1a + 16, l1b..l1b + 16, l2b..l2b + 512];
    let mut answered = 0;
    for region in regions {
        for at in region.start.min(good.len())..region.end.min(good.len()) {
            for mask in [0xff, 0x01, 0x80] {
                let mut bytes = good.clone();
                bytes[at] ^= mask;
                if check(&bytes, "a", "b").is_ok() {
                    answered += 1;
                }
            }
        }
    }
    assert!(answered > 0, "some flips (in data-free places) still compare");
}
