//! What callers sent, echoed back in errors: clipped, so a hostile or broken client cannot make
//! an error message (or a log line) as large as its request.

/// At most this many characters of a caller's text are echoed back.
const CLIP_CHARS: usize = 100;

/// `text` cut to [`CLIP_CHARS`] characters, with `…` and the full length when it was longer.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(CLIP_CHARS) {
        None => text.to_string(),
        Some((at, _)) => format!("{}… ({} bytes)", &text[..at], text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_clipped_on_a_character_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(150);
        assert_eq!(clip(&long), format!("{}… (300 bytes)", "é".repeat(100)));
    }
}
