//! Echoing untrusted input in messages: quoted, control characters escaped, and cut short, so an
//! error about a 1 MB name is still a short line (a gRPC status message travels in a header,
//! and clients refuse headers of more than a few KiB). Here, below every other crate, because
//! the values parsed at the edge report their own errors; `stillpoint_core::text` re-exports it.

/// `s` quoted and escaped as `{:?}` would show it, cut after `max_chars` characters of that
/// escaped form; a cut value says how long the whole was: `"aaaa…" (1048576 bytes)`.
pub fn clip(s: &str, max_chars: usize) -> String {
    let mut shown = String::new();
    let mut count = 0;
    for (at, c) in s.char_indices() {
        let escaped: String = c.escape_debug().collect();
        let n = escaped.chars().count();
        if count + n > max_chars {
            return format!("\"{shown}…\" ({} bytes, {} not shown)", s.len(), s.len() - at);
        }
        shown.push_str(&escaped);
        count += n;
    }
    format!("\"{shown}\"")
}

#[cfg(test)]
mod tests;
