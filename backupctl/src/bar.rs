//! Progress bars for long local operations (restoring or reading a saveset), drawn on standard
//! error only when a person is watching: it is a terminal and the output is not `--json`.
//! Nothing is drawn into pipes or logs.

use std::io::IsTerminal;

/// A bar of `total` bytes named `prefix`, or `None` when nobody is watching.
pub fn bytes(json: bool, prefix: String, total: u64) -> Option<indicatif::ProgressBar> {
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .map(|style| style.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar.set_prefix(prefix);
    Some(bar)
}
