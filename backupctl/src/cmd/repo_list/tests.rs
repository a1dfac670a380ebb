//! Shortened manifest ids stay unambiguous.

use super::shortest_unique;

#[test]
fn a_shortened_id_is_unique_and_at_least_eight_digits() {
    let all = ["abcdef0123456789", "abcdef0199999999", "ffff000011112222"];
    assert_eq!(shortest_unique(all[0], &all), "abcdef012");
    assert_eq!(shortest_unique(all[1], &all), "abcdef019");
    assert_eq!(shortest_unique(all[2], &all), "ffff0000");
    assert_eq!(shortest_unique("abc", &["abc"]), "abc");
}
