//! What people see of hostile input: bounded, escaped, and honest about what was cut.

use super::clip;

#[test]
fn short_input_reads_as_debug_would_show_it() {
    assert_eq!(clip("nope", 64), "\"nope\"");
    assert_eq!(clip("", 64), "\"\"");
    assert_eq!(clip("a\"b\\c", 64), format!("{:?}", "a\"b\\c"));
}

#[test]
fn control_characters_are_escaped_not_sent_to_a_terminal() {
    assert_eq!(clip("a\0b\n\u{1b}[2J", 64), "\"a\\0b\\n\\u{1b}[2J\"");
}

#[test]
fn long_input_is_cut_and_says_how_long_it_was() {
    let huge = "a".repeat(1 << 20);
    let shown = clip(&huge, 8);
    assert_eq!(shown, "\"aaaaaaaa…\" (1048576 bytes, 1048568 not shown)");
    // Escapes count as what they show, and are never cut in half.
    assert_eq!(clip("\0\0\0", 5), "\"\\0\\0…\" (3 bytes, 1 not shown)");
    // Multi-byte characters are counted as characters and never split.
    assert_eq!(clip("ééé", 2), "\"éé…\" (6 bytes, 2 not shown)");
    assert!(clip(&"\u{1b}".repeat(100_000), 64).len() < 120);
}
