//! `thin_delta` output as thin-provisioning-tools 0.9.0 wrote it in the test VM, and the ways a
//! reader could be misled: each refusal names why, and only `<same>` ranges are ever skipped.

use super::*;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// Recorded in the VM (agent/tests/lvm_vm.rs): an 8 MiB thin LV in a pool of 64 KiB blocks, base
/// (thin id 3) and a later snapshot (4) after 4 KiB writes at blocks 100-102 and 1000-1039.
const RECORDED: &str = r#"<superblock uuid="" time="3" transaction="4" data_block_size="128" nr_data_blocks="0">
  <diff left="3" right="4">
    <same begin="0" length="6"/>
    <different begin="6" length="1"/>
    <same begin="7" length="55"/>
    <different begin="62" length="3"/>
    <same begin="65" length="63"/>
  </diff>
</superblock>
"#;

/// The changed byte ranges `text` gives for devices 3 and 4 of `size` bytes, or the refusal.
fn check(text: &str, size: u64) -> Result<Vec<Range<u64>>, String> {
    parse(text, 3, 4, size).map(|d| d.changed)
}

/// A document of one diff of devices 3 and 4 with `body` in it, 64 KiB blocks.
fn doc(body: &str) -> String {
    format!(
        "<superblock uuid=\"\" time=\"3\" transaction=\"4\" data_block_size=\"128\" nr_data_blocks=\"0\">\n  <diff left=\"3\" right=\"4\">\n{body}  </diff>\n</superblock>\n"
    )
}

#[test]
fn only_different_blocks_of_the_recorded_output_are_changed() {
    let d = parse(RECORDED, 3, 4, 8 * MIB).unwrap();
    assert_eq!(d.block_bytes, 64 * KIB);
    assert_eq!(d.transaction, 4);
    // 4 KiB blocks 100-102 are in 64 KiB block 6; 1000-1039 in blocks 62-64.
    assert_eq!(d.changed, vec![6 * 64 * KIB..7 * 64 * KIB, 62 * 64 * KIB..65 * 64 * KIB]);
}

#[test]
fn left_only_right_only_and_blocks_not_named_are_changed_too() {
    let body = "    <same begin=\"0\" length=\"2\"/>\n    <left_only begin=\"2\" length=\"1\"/>\n    <right_only begin=\"3\" length=\"1\"/>\n    <same begin=\"4\" length=\"1\"/>\n    <same begin=\"8\" length=\"1\"/>\n";
    // Blocks 5-7 and 9-15 are named by nothing: unmapped in both, or dropped by the tool.
    let b = 64 * KIB;
    assert_eq!(check(&doc(body), 16 * b), Ok(vec![2 * b..4 * b, 5 * b..8 * b, 9 * b..16 * b]));
    // An empty diff proves nothing: everything is changed.
    let everything: Vec<Range<u64>> = std::iter::once(0..16 * b).collect();
    assert_eq!(check(&doc(""), 16 * b), Ok(everything));
}

#[test]
fn a_size_not_a_multiple_of_the_block_cuts_the_last_block() {
    let b = 64 * KIB;
    let size = 3 * b + 4 * KIB;
    // Four blocks, the last one mostly past the end.
    let body = "    <same begin=\"0\" length=\"1\"/>\n    <different begin=\"1\" length=\"1\"/>\n    <same begin=\"2\" length=\"1\"/>\n    <right_only begin=\"3\" length=\"1\"/>\n";
    assert_eq!(check(&doc(body), size), Ok(vec![b..2 * b, 3 * b..size]));
    let all_same = "    <same begin=\"0\" length=\"4\"/>\n";
    assert_eq!(check(&doc(all_same), size), Ok(vec![]));
    // A fifth block is past the device.
    let past = "    <same begin=\"0\" length=\"5\"/>\n";
    let e = check(&doc(past), size).unwrap_err();
    assert!(e.contains("reaches past the device's 4 blocks of 65536 bytes"), "{e}");
}

#[test]
fn ranges_out_of_order_overlapping_or_empty_are_refused() {
    for (body, why) in [
        (
            "<same begin=\"4\" length=\"2\"/><same begin=\"0\" length=\"2\"/>",
            "overlaps or goes back",
        ),
        (
            "<same begin=\"0\" length=\"4\"/><different begin=\"3\" length=\"2\"/>",
            "overlaps or goes back",
        ),
        ("<same begin=\"0\" length=\"0\"/>", "of length 0"),
    ] {
        let e = check(&doc(body), 16 * 64 * KIB).unwrap_err();
        assert!(e.contains(why), "{body}: {e}");
    }
}

#[test]
fn numbers_that_overflow_or_are_not_decimal_are_refused() {
    let huge = u64::MAX.to_string();
    for (text, why) in [
        (doc(&format!("<same begin=\"{huge}\" length=\"1\"/>")), "overflows"),
        (doc("<same begin=\"99999999999999999999999\" length=\"1\"/>"), "overflows"),
        (doc("<same begin=\"-1\" length=\"1\"/>"), "is not a number"),
        (doc("<same begin=\"0x10\" length=\"1\"/>"), "is not a number"),
        (doc("<same begin=\" 1\" length=\"1\"/>"), "is not a number"),
        (
            RECORDED.replace("data_block_size=\"128\"", &format!("data_block_size=\"{huge}\"")),
            "overflows",
        ),
        (
            RECORDED.replace("data_block_size=\"128\"", "data_block_size=\"0\""),
            "data_block_size is 0",
        ),
    ] {
        let e = check(&text, u64::MAX).unwrap_err();
        assert!(e.contains(why), "{text}: {e}");
    }
}

#[test]
fn unknown_elements_attributes_text_and_the_verbose_form_are_refused() {
    for (text, why) in [
        (doc("<moved begin=\"0\" length=\"1\"/>"), "unknown element <moved>"),
        (doc("<same begin=\"0\" length=\"1\" data_begin=\"5\"/>"), "unknown attribute data_begin"),
        (doc("<same>\n<range begin=\"0\" data_begin=\"9\" length=\"1\"/>\n</same>"), "--verbose"),
        (doc("<same begin=\"0\" length=\"1\"/> stray"), "text outside a tag"),
        (doc("<same begin=\"0\" length=\"1\" begin=\"2\"/>"), "twice"),
        (doc("<same begin=0 length=\"1\"/>"), "not quoted"),
        (doc("<same begin=\"&#48;\" length=\"1\"/>"), "entities"),
        (RECORDED.replace(" uuid=\"\"", " colour=\"red\""), "unknown attribute colour"),
        (
            RECORDED.replace("<diff left=\"3\"", "<diff left=\"3\" verbose=\"1\""),
            "unknown attribute verbose",
        ),
        (format!("<?xml version=\"1.0\"?>\n{RECORDED}"), "not an element or attribute name"),
        (format!("{RECORDED}<superblock>"), "after </superblock>"),
        (RECORDED.replace("</superblock>\n", ""), "without </superblock>"),
        (RECORDED.replace("  </diff>\n", ""), "</superblock> inside <diff>"),
        (RECORDED.replace("</superblock>", "</superblock"), "is not closed"),
        (String::new(), "no <superblock>"),
        ("Unable to find mapping tree for snap2 (9)".into(), "text outside a tag"),
    ] {
        let e = check(&text, 8 * MIB).unwrap_err();
        assert!(e.contains(why), "{text:?}: {e}");
    }
}

#[test]
fn a_diff_of_other_devices_is_refused() {
    let e = parse(RECORDED, 3, 5, 8 * MIB).unwrap_err();
    assert_eq!(e, "the diff is of devices 3 and 4, not 3 and 5");
    let e = parse(RECORDED, 4, 3, 8 * MIB).unwrap_err();
    assert_eq!(e, "the diff is of devices 3 and 4, not 4 and 3");
}

#[test]
fn other_block_sizes_are_in_sectors_of_512_bytes() {
    // 1 MiB blocks (2048 sectors): block 2 changed in a 4 MiB device.
    let text = RECORDED
        .replace("data_block_size=\"128\"", "data_block_size=\"2048\"")
        .replace(
            "    <same begin=\"0\" length=\"6\"/>\n    <different begin=\"6\" length=\"1\"/>\n    <same begin=\"7\" length=\"55\"/>\n    <different begin=\"62\" length=\"3\"/>\n    <same begin=\"65\" length=\"63\"/>\n",
            "    <same begin=\"0\" length=\"2\"/>\n    <different begin=\"2\" length=\"1\"/>\n    <same begin=\"3\" length=\"1\"/>\n",
        );
    let d = parse(&text, 3, 4, 4 * MIB).unwrap();
    assert_eq!(d.block_bytes, MIB);
    assert_eq!(d.changed, vec![2 * MIB..3 * MIB]);
}
