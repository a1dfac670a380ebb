//! Events as people and programs read them: an e-mail subject and plain-text body in human
//! units, and the webhook's JSON body (`"version": 1`, documented in the README). Pure.

use std::time::Duration;

use serde_json::{json, Value};

use crate::event::{
    BackupReport, DrillResult, Event, Millis, NoGoodBackup, ScheduleMissed, ServerReport,
};

/// The webhook body's version; a change that breaks readers gets a new one.
pub const JSON_VERSION: u32 = 1;

/// One event, rendered once for every target.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub kind: &'static str,
    pub group: String,
    pub subject: String,
    pub text: String,
    pub json: Value,
}

impl Message {
    pub fn of(event: &Event) -> Message {
        let (subject, text) = match event {
            Event::BackupSucceeded(r) | Event::BackupFailed(r) => backup_text(r),
            Event::NoGoodBackup(a) => no_good_text(a),
            Event::ScheduleMissed(m) => missed_text(m),
            Event::Drill(d) => drill_text(d),
        };
        let mut json = match event {
            Event::BackupSucceeded(r) | Event::BackupFailed(r) => backup_json(r),
            Event::NoGoodBackup(a) => no_good_json(a),
            Event::ScheduleMissed(m) => missed_json(m),
            Event::Drill(d) => json!({
                "group": d.group,
                "backup_id": d.backup,
                "passed": d.passed,
                "failures": d.failures,
                "report": d.report,
            }),
        };
        if let Value::Object(map) = &mut json {
            map.insert("version".into(), json!(JSON_VERSION));
            map.insert("kind".into(), json!(event.kind()));
            map.insert("subject".into(), json!(subject));
            map.insert("text".into(), json!(text));
        }
        Message { kind: event.kind(), group: event.group().to_string(), subject, text, json }
    }
}

const PREFIX: &str = "[stillpoint]";

fn backup_text(r: &BackupReport) -> (String, String) {
    let mut body = String::new();
    let subject = match &r.failure {
        None => {
            let size = r.bytes_copied.map(|b| format!(", {} copied", bytes(b))).unwrap_or_default();
            format!(
                "{PREFIX} backup of {} succeeded: {} server{}{size}",
                r.group,
                r.servers.len(),
                if r.servers.len() == 1 { "" } else { "s" }
            )
        }
        Some(f) => {
            let first = r.failed_servers().next().map(|s| format!("{}: ", s.server));
            let why = match (&f.phase, f.aborted) {
                (_, true) => format!("aborted: {}", f.reason),
                (Some(phase), false) => {
                    format!("{phase}: {}{}", first.unwrap_or_default(), f.reason)
                }
                (None, false) => f.reason.clone(),
            };
            format!("{PREFIX} backup of {} FAILED in {}", r.group, one_line(&why, 160))
        }
    };
    let line = |body: &mut String, label: &str, value: &str| {
        body.push_str(&format!("{label:<10}{value}\n"));
    };
    line(&mut body, "Group:", &r.group);
    line(&mut body, "Backup:", &r.backup_id);
    match &r.failure {
        None => line(&mut body, "Outcome:", "SUCCEEDED"),
        Some(f) if f.aborted => line(&mut body, "Outcome:", "ABORTED"),
        Some(_) => line(&mut body, "Outcome:", "FAILED"),
    }
    if let Some(f) = &r.failure {
        if let Some(phase) = &f.phase {
            line(&mut body, "Phase:", phase);
        }
        line(&mut body, "Why:", &f.reason);
    }
    line(&mut body, "Started:", &timestamp(r.started));
    match (r.finished, r.duration()) {
        (Some(at), Some(took)) => {
            line(&mut body, "Finished:", &format!("{} (took {})", timestamp(at), duration(took)))
        }
        _ => line(&mut body, "Finished:", "not recorded"),
    }
    match (r.bytes_copied, r.bytes_total) {
        (Some(copied), Some(total)) => line(
            &mut body,
            "Copied:",
            &format!("{} of {} of snapshots", bytes(copied), bytes(total)),
        ),
        _ => line(&mut body, "Copied:", "nothing (no copy began)"),
    }
    match r.bytes_stored {
        Some(b) => line(&mut body, "Stored:", &bytes(b)),
        None => line(&mut body, "Stored:", "not known (the catalog does not record it)"),
    }
    match &r.cut {
        Some((true, text)) => line(&mut body, "Cut:", &format!("consistent: {text}")),
        Some((false, text)) => line(&mut body, "Cut:", &format!("NOT consistent: {text}")),
        None => line(&mut body, "Cut:", "not judged (the backup ended before every snapshot)"),
    }
    body.push_str("\nServers:\n");
    // The servers that failed first: those are the ones a reader must look at.
    let (failed, rest): (Vec<&ServerReport>, Vec<&ServerReport>) =
        r.servers.iter().partition(|s| s.failed);
    for s in failed.into_iter().chain(rest) {
        body.push_str(&format!("  {} [{}]\n", s.server, s.state));
        if !s.detail.is_empty() {
            body.push_str(&format!("    {}\n", s.detail));
        }
        let frozen = match s.frozen_ms {
            Some(ms) if s.writes_held => format!("writes held {}", duration_ms(ms)),
            Some(ms) => format!(
                "frozen for {}; writes not known to be held (hold: {})",
                duration_ms(ms),
                s.hold.as_deref().unwrap_or("unknown")
            ),
            None => "no freeze window recorded (it never committed)".to_string(),
        };
        body.push_str(&format!("    freeze window: {frozen}\n"));
        if s.bytes_total > 0 || s.bytes_copied > 0 {
            body.push_str(&format!(
                "    copied {} of {}\n",
                bytes(s.bytes_copied),
                bytes(s.bytes_total)
            ));
        }
    }
    body.push_str(&format!("\nSee it with: backupctl status {}\n", r.backup_id));
    (subject, body)
}

fn backup_json(r: &BackupReport) -> Value {
    let servers: Vec<Value> = r
        .servers
        .iter()
        .map(|s| {
            json!({
                "server": s.server,
                "state": s.state,
                "failed": s.failed,
                "detail": s.detail,
                "frozen_ms": s.frozen_ms,
                "writes_held": s.writes_held,
                "hold": s.hold,
                "bytes_copied": s.bytes_copied,
                "bytes_total": s.bytes_total,
            })
        })
        .collect();
    let (outcome, phase, reason) = match &r.failure {
        None => ("succeeded", None, None),
        Some(f) if f.aborted => ("aborted", f.phase.clone(), Some(f.reason.clone())),
        Some(f) => ("failed", f.phase.clone(), Some(f.reason.clone())),
    };
    json!({
        "group": r.group,
        "backup_id": r.backup_id,
        "outcome": outcome,
        "phase": phase,
        "reason": reason,
        "failed_servers": r.failed_servers().map(|s| s.server.clone()).collect::<Vec<_>>(),
        "started": timestamp(r.started),
        "finished": r.finished.map(timestamp),
        "duration_ms": r.duration().map(|d| d.as_millis() as u64),
        "bytes_copied": r.bytes_copied,
        "bytes_total": r.bytes_total,
        "bytes_stored": r.bytes_stored,
        "cut_consistent": r.cut.as_ref().map(|(c, _)| *c),
        "cut": r.cut.as_ref().map(|(_, t)| t.clone()),
        "servers": servers,
    })
}

fn no_good_text(a: &NoGoodBackup) -> (String, String) {
    let subject = format!(
        "{PREFIX} ALERT: group {} has had no good backup for {}",
        a.group,
        duration(a.for_how_long)
    );
    let mut body = format!(
        "Group {} has had no good (SUCCEEDED) backup for {}, longer than its no_good_backup_after ({}).\n\n",
        a.group,
        duration(a.for_how_long),
        duration(a.limit)
    );
    match a.last_good {
        Some(at) => body.push_str(&format!("Last good backup: finished {}\n", timestamp(at))),
        None => body.push_str(&format!(
            "Last good backup: none since the listener started watching at {}\n",
            timestamp(a.since)
        )),
    }
    body.push_str(
        "\nThis alert is sent once; another comes only after a good backup and a new lapse.\nSee the group's backups with: backupctl list --group ",
    );
    body.push_str(&a.group);
    body.push('\n');
    (subject, body)
}

fn no_good_json(a: &NoGoodBackup) -> Value {
    json!({
        "group": a.group,
        "last_good": a.last_good.map(timestamp),
        "since": timestamp(a.since),
        "for_ms": a.for_how_long.as_millis() as u64,
        "limit_ms": a.limit.as_millis() as u64,
    })
}

fn missed_text(m: &ScheduleMissed) -> (String, String) {
    let subject = format!(
        "{PREFIX} MISSED: schedule {} of group {} due {}",
        m.schedule,
        m.group,
        timestamp(m.due)
    );
    let body = format!(
        "Schedule {} of group {} was due at {} and did not run.\nWhy: {}\n",
        m.schedule,
        m.group,
        timestamp(m.due),
        m.why
    );
    (subject, body)
}

fn missed_json(m: &ScheduleMissed) -> Value {
    json!({
        "schedule": m.schedule,
        "group": m.group,
        "due": timestamp(m.due),
        "reason": m.why,
    })
}

fn drill_text(d: &DrillResult) -> (String, String) {
    let what =
        if d.group.is_empty() { "a backup".to_string() } else { format!("group {}", d.group) };
    let subject = if d.passed {
        format!("{PREFIX} drill of {what} passed: backup {} restored and checked", d.backup)
    } else {
        format!(
            "{PREFIX} DRILL FAILED for {what}: {}",
            d.failures.first().map_or("", String::as_str)
        )
    };
    let mut body = String::new();
    if !d.passed {
        body.push_str("What failed:\n");
        for f in &d.failures {
            body.push_str(&format!("  - {f}\n"));
        }
        body.push('\n');
    }
    body.push_str(&d.report);
    (subject, body)
}

/// RFC 3339 in UTC, to the second: `2026-12-03T14:05:09Z`.
pub fn timestamp(at: Millis) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(at.div_euclid(1000))
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| format!("{at} ms after 1970"))
}

/// Bytes in binary units: `512 B`, `1.0 MiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration as people say it: `850ms`, `12.3s`, `4m 10s`, `26h 3m`, `3d 2h`.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => join(s / 60, "m", s % 60, "s"),
        3600..86400 => join(s / 3600, "h", (s % 3600) / 60, "m"),
        _ => join(s / 86400, "d", (s % 86400) / 3600, "h"),
    }
}

fn duration_ms(ms: u64) -> String {
    duration(Duration::from_millis(ms))
}

fn join(big: u64, big_unit: &str, small: u64, small_unit: &str) -> String {
    if small == 0 {
        format!("{big}{big_unit}")
    } else {
        format!("{big}{big_unit} {small}{small_unit}")
    }
}

/// `s` on one line (a subject), cut at `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let cut: String = flat.chars().take(max).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests;
