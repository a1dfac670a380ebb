//! The JSON log line's shape: what a log pipeline relies on to find a backup's lines.

use std::io::Write;
use std::sync::{Arc, Mutex};

use super::*;

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for Captured {
    type Writer = Captured;
    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

fn check(format: LogFormat) -> String {
    let captured = Captured::default();
    let subscriber = subscriber(format, EnvFilter::new("info"), captured.clone(), false);
    tracing::subscriber::with_default(subscriber, || {
        let backup = tracing::info_span!("backup", backup = "b-1", group = "db");
        let _in_backup = backup.enter();
        let rpc = tracing::info_span!("rpc", method = "Prepare", server = "db1");
        let _in_rpc = rpc.enter();
        tracing::warn!(lease_ms = 30_000u64, "prepare failed");
    });
    let bytes = captured.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn json_lines_carry_every_enclosing_spans_fields() {
    let out = check(LogFormat::Json);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one event, one line: {out}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).expect("each line is JSON");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["fields"]["message"], "prepare failed");
    assert_eq!(line["fields"]["lease_ms"], 30_000);
    assert!(line["timestamp"].as_str().is_some_and(|t| !t.is_empty()), "{line}");
    // The innermost span, and every span outermost first with its fields.
    assert_eq!(line["span"]["name"], "rpc");
    assert_eq!(line["span"]["server"], "db1");
    let spans = line["spans"].as_array().expect("a span list");
    assert_eq!(spans.len(), 2, "{line}");
    assert_eq!(spans[0]["name"], "backup");
    assert_eq!(spans[0]["backup"], "b-1");
    assert_eq!(spans[0]["group"], "db");
    assert_eq!(spans[1]["method"], "Prepare");
}

#[test]
fn text_lines_stay_human() {
    let out = check(LogFormat::Text);
    assert!(serde_json::from_str::<serde_json::Value>(out.trim()).is_err(), "{out}");
    assert!(out.contains("prepare failed"), "{out}");
    assert!(out.contains("backup=\"b-1\"") || out.contains("backup=b-1"), "{out}");
}

#[test]
fn formats_are_parsed_by_name() {
    assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
    assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
    let refused = "yaml".parse::<LogFormat>().unwrap_err();
    assert!(refused.contains("\"yaml\"") && refused.contains("use text or json"), "{refused}");
}
