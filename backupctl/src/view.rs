//! What `backupctl` shows: the stable `--json` shapes (documented in `JSON.md`) converted from
//! the proto types, and the human tables and lines. Pure functions, no IO, so tests pin both.
//! Free text that may be absent (reason, detail, error, version) is `null` when empty; a time is
//! `null` when unset (0), else given twice: `*_unix_ms` and an RFC 3339 UTC string.

use std::collections::BTreeMap;

use serde::Serialize;
use stillpoint_proto::{
    AgentBackup, AgentInfo, Backup, BackupState, Cut, HoldClass, LogEntry, ServerCut,
    ServerProgress, Snapshot, StepReport, WatchEvent,
};
use time::macros::format_description;
use time::OffsetDateTime;

/// A backup as `--json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackupView {
    pub backup_id: String,
    pub group: String,
    pub state: String,
    pub terminal: bool,
    /// Every server the backup contacted confirmed its cleanup or abort, or was given up on
    /// (named in `unconfirmed`); nothing more will happen to it.
    pub settled: bool,
    /// Servers given up on, each with what may still be left there.
    pub unconfirmed: Vec<String>,
    pub reason: Option<String>,
    pub failed_phase: Option<String>,
    pub started_by: Option<String>,
    pub created_unix_ms: Option<i64>,
    pub created: Option<String>,
    pub finished_unix_ms: Option<i64>,
    pub finished: Option<String>,
    pub duration_ms: Option<i64>,
    pub servers: Vec<ServerView>,
    pub cut: Option<CutView>,
    /// Pinned by an operator: retention never forgets it.
    pub pinned: bool,
    /// When retention forgot it (its stored copy deleted); null while kept.
    pub expired_unix_ms: Option<i64>,
    pub expired: Option<String>,
}

/// One server's progress within a backup.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerView {
    pub server: String,
    pub phase: String,
    pub detail: Option<String>,
    pub snapshots: Vec<SnapshotView>,
    pub copied_bytes: u64,
    pub total_bytes: u64,
    /// What its quiescers made for a restore, without the bytes (`backupctl artifacts`).
    pub artifacts: Vec<ArtifactView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArtifactView {
    pub quiescer: String,
    pub name: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotView {
    pub volume: String,
    pub provider: String,
    pub locator: String,
    pub size_bytes: u64,
}

/// The consistent cut: the verdict and, per server, when each protocol step happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CutView {
    pub checked: bool,
    pub consistent: bool,
    pub verdict: Option<String>,
    pub servers: Vec<ServerCutView>,
}

/// Listener-clock times of one server's protocol steps plus the agent's own durations (ms).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServerCutView {
    pub server: String,
    pub prepare_sent_unix_ms: Option<i64>,
    pub prepare_sent: Option<String>,
    pub prepared_unix_ms: Option<i64>,
    pub prepared: Option<String>,
    pub commit_sent_unix_ms: Option<i64>,
    pub commit_sent: Option<String>,
    pub committed_unix_ms: Option<i64>,
    pub committed: Option<String>,
    pub quiesce_ms: u64,
    pub freeze_ms: u64,
    pub held_ms: u64,
    pub snapshot_ms: u64,
    pub thaw_ms: u64,
    pub steps: Vec<StepView>,
    /// What held the server's writes (`filesystem-freeze`, `hook-unverified`, ...); `null`
    /// when the listener does not know.
    pub hold: Option<String>,
    /// True only when the hold is known to stop writes; `held_ms` is then a hold of writes,
    /// otherwise only how long the server was frozen.
    pub writes_held: bool,
    /// With the thaw barrier: the agent confirmed it stayed frozen until every snapshot
    /// existed; `null` without the barrier or when it did not answer.
    pub held_until_release: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepView {
    pub name: String,
    pub action: String,
    pub ok: bool,
    pub duration_ms: u64,
    pub detail: Option<String>,
}

/// One entry of a backup's event log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntryView {
    /// The entry's place in its backup's log, from 1; `watch` resumes after it.
    pub seq: u64,
    pub unix_ms: i64,
    pub time: Option<String>,
    pub server: Option<String>,
    pub level: String,
    pub message: String,
    pub state: String,
}

/// One line of `watch --json`: the log entry and the backup as it is after it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchEventView {
    pub backup_id: String,
    pub entry: Option<LogEntryView>,
    pub backup: Option<BackupView>,
}

/// One agent as the listener sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentView {
    pub server: String,
    pub address: String,
    pub groups: Vec<String>,
    pub reachable: bool,
    pub error: Option<String>,
    pub version: Option<String>,
    pub backups: Vec<AgentBackupView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentBackupView {
    pub backup_id: String,
    pub phase: String,
    pub lease_remaining_ms: u64,
    pub snapshots: Vec<SnapshotView>,
    pub detail: Option<String>,
}

/// `san list --json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SanListView {
    pub luns: Vec<LunView>,
    pub snapshots: Vec<LunSnapshotView>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LunView {
    pub server: String,
    pub lun: String,
    pub path: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LunSnapshotView {
    pub backup_id: String,
    pub server: String,
    pub lun: String,
    pub path: String,
    pub size_bytes: u64,
}

/// `certs init|issue --json`: the files written (`cert` is null for `init`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CertFilesView {
    pub ca: String,
    pub cert: Option<String>,
    pub key: String,
}

fn text(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn ms(unix_ms: i64) -> Option<i64> {
    (unix_ms > 0).then_some(unix_ms)
}

/// The uppercase name of a state, e.g. `SUCCEEDED`; `UNKNOWN(n)` for a value from a newer
/// listener.
pub fn state_name(state: i32) -> String {
    match BackupState::try_from(state) {
        Ok(BackupState::Unspecified) => "UNSPECIFIED".into(),
        Ok(s) => s.as_str_name().into(),
        Err(_) => format!("UNKNOWN({state})"),
    }
}

fn state_of(state: i32) -> BackupState {
    BackupState::try_from(state).unwrap_or(BackupState::Unspecified)
}

/// Whether a backup's state never changes again.
pub fn is_terminal(backup: &Backup) -> bool {
    state_of(backup.state).is_terminal()
}

/// Whether a backup ended FAILED or ABORTED.
pub fn is_failed(backup: &Backup) -> bool {
    matches!(state_of(backup.state), BackupState::Failed | BackupState::Aborted)
}

/// Whether every snapshot exists: SNAPSHOTTED, COPYING, CLEANING or SUCCEEDED.
pub fn is_snapshotted(backup: &Backup) -> bool {
    matches!(
        state_of(backup.state),
        BackupState::Snapshotted
            | BackupState::Copying
            | BackupState::Cleaning
            | BackupState::Succeeded
    )
}

/// RFC 3339 UTC with milliseconds, e.g. `2024-05-01T12:34:56.789Z`; `None` when unset (<= 0).
pub fn rfc3339(unix_ms: i64) -> Option<String> {
    let t = utc(unix_ms)?;
    t.format(format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .ok()
}

/// RFC 3339 UTC to the second, for tables, e.g. `2024-05-01T12:34:56Z`; `-` when unset.
pub fn short_time(unix_ms: i64) -> String {
    utc(unix_ms)
        .and_then(|t| {
            t.format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z")).ok()
        })
        .unwrap_or_else(|| "-".into())
}

/// `HH:MM:SS.mmm` UTC, for watch lines.
pub fn clock(unix_ms: i64) -> String {
    utc(unix_ms)
        .and_then(|t| {
            t.format(format_description!("[hour]:[minute]:[second].[subsecond digits:3]")).ok()
        })
        .unwrap_or_else(|| "--:--:--.---".into())
}

fn utc(unix_ms: i64) -> Option<OffsetDateTime> {
    if unix_ms <= 0 {
        return None;
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000).ok()
}

impl From<&Snapshot> for SnapshotView {
    fn from(s: &Snapshot) -> Self {
        SnapshotView {
            volume: s.volume.clone(),
            provider: s.provider.clone(),
            locator: s.locator.clone(),
            size_bytes: s.size_bytes,
        }
    }
}

impl From<&ServerProgress> for ServerView {
    fn from(p: &ServerProgress) -> Self {
        ServerView {
            server: p.server.clone(),
            phase: p.phase.clone(),
            detail: text(&p.detail),
            snapshots: p.snapshots.iter().map(SnapshotView::from).collect(),
            copied_bytes: p.copied_bytes,
            total_bytes: p.total_bytes,
            artifacts: p
                .artifacts
                .iter()
                .map(|a| ArtifactView {
                    quiescer: a.quiescer.clone(),
                    name: a.name.clone(),
                    size_bytes: a.size_bytes,
                })
                .collect(),
        }
    }
}

impl From<&StepReport> for StepView {
    fn from(s: &StepReport) -> Self {
        StepView {
            name: s.name.clone(),
            action: s.action.clone(),
            ok: s.ok,
            duration_ms: s.duration_ms,
            detail: text(&s.detail),
        }
    }
}

impl From<&ServerCut> for ServerCutView {
    fn from(c: &ServerCut) -> Self {
        ServerCutView {
            server: c.server.clone(),
            prepare_sent_unix_ms: ms(c.prepare_sent_unix_ms),
            prepare_sent: rfc3339(c.prepare_sent_unix_ms),
            prepared_unix_ms: ms(c.prepared_unix_ms),
            prepared: rfc3339(c.prepared_unix_ms),
            commit_sent_unix_ms: ms(c.commit_sent_unix_ms),
            commit_sent: rfc3339(c.commit_sent_unix_ms),
            committed_unix_ms: ms(c.committed_unix_ms),
            committed: rfc3339(c.committed_unix_ms),
            quiesce_ms: c.quiesce_ms,
            freeze_ms: c.freeze_ms,
            held_ms: c.held_ms,
            snapshot_ms: c.snapshot_ms,
            thaw_ms: c.thaw_ms,
            steps: c.steps.iter().map(StepView::from).collect(),
            hold: (c.hold() != HoldClass::Unspecified).then(|| c.hold().label().to_string()),
            writes_held: c.hold().holds_writes(),
            held_until_release: c.held_until_release,
        }
    }
}

impl From<&Cut> for CutView {
    fn from(c: &Cut) -> Self {
        CutView {
            checked: c.checked,
            consistent: c.consistent,
            verdict: text(&c.verdict),
            servers: c.servers.iter().map(ServerCutView::from).collect(),
        }
    }
}

impl From<&Backup> for BackupView {
    fn from(b: &Backup) -> Self {
        let duration_ms = (b.created_unix_ms > 0 && b.finished_unix_ms > 0)
            .then(|| (b.finished_unix_ms - b.created_unix_ms).max(0));
        BackupView {
            backup_id: b.backup_id.clone(),
            group: b.group.clone(),
            state: state_name(b.state),
            terminal: is_terminal(b),
            settled: b.settled,
            unconfirmed: b.unconfirmed.clone(),
            reason: text(&b.reason),
            failed_phase: text(&b.failed_phase),
            started_by: text(&b.started_by),
            created_unix_ms: ms(b.created_unix_ms),
            created: rfc3339(b.created_unix_ms),
            finished_unix_ms: ms(b.finished_unix_ms),
            finished: rfc3339(b.finished_unix_ms),
            duration_ms,
            servers: b.servers.iter().map(ServerView::from).collect(),
            cut: b.cut.as_ref().map(CutView::from),
            pinned: b.pinned,
            expired_unix_ms: ms(b.expired_unix_ms),
            expired: rfc3339(b.expired_unix_ms),
        }
    }
}

impl From<&LogEntry> for LogEntryView {
    fn from(e: &LogEntry) -> Self {
        LogEntryView {
            seq: e.seq,
            unix_ms: e.unix_ms,
            time: rfc3339(e.unix_ms),
            server: text(&e.server),
            level: e.level.clone(),
            message: e.message.clone(),
            state: state_name(e.state),
        }
    }
}

impl From<&WatchEvent> for WatchEventView {
    fn from(e: &WatchEvent) -> Self {
        WatchEventView {
            backup_id: e.backup_id.clone(),
            entry: e.entry.as_ref().map(LogEntryView::from),
            backup: e.backup.as_ref().map(BackupView::from),
        }
    }
}

impl From<&AgentBackup> for AgentBackupView {
    fn from(b: &AgentBackup) -> Self {
        AgentBackupView {
            backup_id: b.backup_id.clone(),
            phase: b.phase().label().to_string(),
            lease_remaining_ms: b.lease_remaining_ms,
            snapshots: b.snapshots.iter().map(SnapshotView::from).collect(),
            detail: text(&b.detail),
        }
    }
}

impl From<&AgentInfo> for AgentView {
    fn from(a: &AgentInfo) -> Self {
        AgentView {
            server: a.server.clone(),
            address: a.address.clone(),
            groups: a.groups.clone(),
            reachable: a.reachable,
            error: text(&a.error),
            version: text(&a.version),
            backups: a.backups.iter().map(AgentBackupView::from).collect(),
        }
    }
}

impl From<&stillpoint_core::san::Lun> for LunView {
    fn from(l: &stillpoint_core::san::Lun) -> Self {
        LunView {
            server: l.server.clone(),
            lun: l.lun.clone(),
            path: l.path.display().to_string(),
            size_bytes: l.size_bytes,
        }
    }
}

impl From<&stillpoint_core::san::LunSnapshot> for LunSnapshotView {
    fn from(s: &stillpoint_core::san::LunSnapshot) -> Self {
        LunSnapshotView {
            backup_id: s.backup_id.clone(),
            server: s.server.clone(),
            lun: s.lun.clone(),
            path: s.path.display().to_string(),
            size_bytes: s.size_bytes,
        }
    }
}

/// One compact JSON document (one line) for any view.
pub fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("views serialize: plain structs of strings and numbers")
}

// ---------------------------------------------------------------------------------------------
// Human rendering
// ---------------------------------------------------------------------------------------------

/// Left-aligned columns two spaces apart, header first; trailing spaces trimmed.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let header: Vec<String> = headers.iter().map(|h| (*h).to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            line.push_str(&format!("{cell:<width$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `64.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Precision loss is fine: one decimal is shown.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration for tables: `850ms`, `12.3s`, `4m05s`, `2h03m`.
pub fn human_duration(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{}.{}s", ms / 1000, (ms % 1000) / 100),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000),
    }
}

fn duration_of(b: &Backup) -> String {
    if b.created_unix_ms > 0 && b.finished_unix_ms > 0 {
        human_duration(b.finished_unix_ms - b.created_unix_ms)
    } else {
        "-".into()
    }
}

fn consistent_of(b: &Backup) -> &'static str {
    match &b.cut {
        Some(cut) if cut.checked => {
            if cut.consistent && order_only(cut) {
                "order only"
            } else if cut.consistent {
                "yes"
            } else {
                "no"
            }
        }
        _ => "-",
    }
}

/// A consistent cut in message order with a server whose writes were not known to be held
/// and no thaw barrier that every server confirmed: the order proves nothing about its writes.
fn order_only(cut: &Cut) -> bool {
    let barrier_held = cut.servers.iter().all(|s| s.held_until_release == Some(true));
    cut.servers.iter().any(|s| !s.hold().holds_writes()) && !barrier_held
}

/// The line `watch` ends its table with: the outcome, how long it took and the cut's verdict.
pub fn verdict_line(b: &Backup) -> String {
    let mut line = format!("{} after {}", state_name(b.state), duration_of(b));
    match (b.failed_phase.as_str(), b.reason.as_str()) {
        ("", "") => {}
        ("", reason) => line.push_str(&format!(": {reason}")),
        (phase, reason) => line.push_str(&format!(" in {phase}: {reason}")),
    }
    let cut = match consistent_of(b) {
        "-" => "not judged",
        judged => judged,
    };
    line.push_str(&format!("; consistent cut: {cut}"));
    line
}

/// `status`: the backup, its servers' progress and its cut.
pub fn backup_human(b: &Backup) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| out.push_str(&format!("{name:<10}{value}\n"));
    field("backup", b.backup_id.clone());
    field("group", b.group.clone());
    field("state", state_name(b.state));
    if !b.reason.is_empty() || !b.failed_phase.is_empty() {
        let phase = if b.failed_phase.is_empty() {
            String::new()
        } else {
            format!(" (in {})", b.failed_phase)
        };
        field("reason", format!("{}{phase}", or_dash(&b.reason)));
    }
    field("started", or_dash(&b.started_by));
    field("created", short_time(b.created_unix_ms));
    field("finished", format!("{} ({})", short_time(b.finished_unix_ms), duration_of(b)));
    if is_terminal(b) {
        let settled = match (b.settled, b.unconfirmed.is_empty()) {
            (true, true) => "yes",
            (true, false) => "yes, giving up on:",
            (false, _) => "not yet: a server has not confirmed its cleanup or abort",
        };
        field("settled", settled.to_string());
    }
    for line in &b.unconfirmed {
        field("", format!("  {line}"));
    }
    if b.pinned {
        field("pinned", "yes: retention never forgets it (`backupctl unpin` to undo)".into());
    }
    if b.expired_unix_ms > 0 {
        field(
            "expired",
            format!("{}: forgotten by retention, its copy deleted", short_time(b.expired_unix_ms)),
        );
    }
    if !b.servers.is_empty() {
        out.push('\n');
        out.push_str(&servers_human(&b.servers));
    }
    if b.servers.iter().any(|s| !s.artifacts.is_empty()) {
        out.push('\n');
        out.push_str(&artifacts_human(&b.servers));
    }
    if let Some(cut) = &b.cut {
        out.push('\n');
        out.push_str(&cut_human(cut, b.state));
    }
    out
}

/// The per-server progress table.
pub fn servers_human(servers: &[ServerProgress]) -> String {
    let rows: Vec<Vec<String>> = servers
        .iter()
        .map(|s| {
            let snapshots: Vec<&str> = s.snapshots.iter().map(|v| v.volume.as_str()).collect();
            let copied = if s.total_bytes == 0 && s.copied_bytes == 0 {
                "-".into()
            } else {
                format!("{}/{}", human_bytes(s.copied_bytes), human_bytes(s.total_bytes))
            };
            vec![
                s.server.clone(),
                or_dash(&s.phase),
                or_dash(&s.detail),
                or_dash(&snapshots.join(",")),
                copied,
            ]
        })
        .collect();
    table(&["SERVER", "PHASE", "DETAIL", "SNAPSHOTS", "COPIED/TOTAL"], &rows)
}

/// The files the servers' quiescers made for a restore, one row each, and where they go.
pub fn artifacts_human(servers: &[ServerProgress]) -> String {
    let rows: Vec<Vec<String>> = servers
        .iter()
        .flat_map(|s| {
            s.artifacts.iter().map(|a| {
                vec![
                    s.server.clone(),
                    a.quiescer.clone(),
                    a.name.clone(),
                    human_bytes(a.size_bytes),
                ]
            })
        })
        .collect();
    let mut out = table(&["SERVER", "QUIESCER", "ARTIFACT", "SIZE"], &rows);
    out.push_str(
        "(restored beside the volumes as <server>/artifacts/<quiescer>/<name>; `backupctl artifacts ID --to DIR` fetches them from the catalog)\n",
    );
    out
}

/// The cut of a backup in `state`: the verdict, then per server each protocol step as an offset
/// in ms from the first Prepare sent (listener clock) and the agent-measured durations. The
/// listener judges the cut when the last snapshot exists, so an unjudged cut of a backup that
/// ended FAILED or ABORTED will never be judged.
pub fn cut_human(cut: &Cut, state: i32) -> String {
    let verdict = if cut.verdict.is_empty() { String::new() } else { format!(": {}", cut.verdict) };
    let ended = matches!(state_of(state), BackupState::Failed | BackupState::Aborted);
    let mut out = match (cut.checked, cut.consistent) {
        // The listener says why in its own words ("never judged: the backup failed while ...").
        (false, _) if ended && !cut.verdict.is_empty() => format!("cut: {}\n", cut.verdict),
        (false, _) if ended => format!(
            "cut: never judged: the backup ended {} before every server was snapshotted{verdict}\n",
            state_name(state)
        ),
        (false, _) => format!("cut: not checked yet{verdict}\n"),
        (true, true) if order_only(cut) => {
            format!("cut: consistent in message order only{verdict}\n")
        }
        (true, true) => format!("cut: consistent{verdict}\n"),
        (true, false) => format!("cut: NOT CONSISTENT{verdict}\n"),
    };
    if cut.servers.is_empty() {
        return out;
    }
    let origin = cut.servers.iter().map(|s| s.prepare_sent_unix_ms).filter(|&t| t > 0).min();
    let offset = |t: i64| match origin {
        Some(o) if t > 0 => format!("+{}", t - o),
        _ => "-".into(),
    };
    let rows: Vec<Vec<String>> = cut
        .servers
        .iter()
        .map(|s| {
            vec![
                s.server.clone(),
                offset(s.prepare_sent_unix_ms),
                offset(s.prepared_unix_ms),
                offset(s.commit_sent_unix_ms),
                offset(s.committed_unix_ms),
                if s.hold().holds_writes() {
                    s.held_ms.to_string()
                } else {
                    format!("{} (not known held)", s.held_ms)
                },
                s.quiesce_ms.to_string(),
                s.freeze_ms.to_string(),
                s.snapshot_ms.to_string(),
                s.thaw_ms.to_string(),
                s.hold().label().to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SERVER",
            "PREPARE_SENT",
            "PREPARED",
            "COMMIT_SENT",
            "COMMITTED",
            "HELD_MS",
            "QUIESCE_MS",
            "FREEZE_MS",
            "SNAPSHOT_MS",
            "THAW_MS",
            "HOLD",
        ],
        &rows,
    ));
    let not_held: Vec<&str> = cut
        .servers
        .iter()
        .filter(|s| !s.hold().holds_writes())
        .map(|s| s.server.as_str())
        .collect();
    if !not_held.is_empty() {
        out.push_str(&format!(
            "writes not known to be held on {}: frozen, but nothing seen stopped their writes\n",
            not_held.join(", ")
        ));
    }
    out.push_str("(step times in ms after the first prepare sent, on the listener's clock)\n");
    out
}

/// Whether `id` has the listener's shape, `20240501T123456Z-1a2b3c`: such an id is used as it
/// is; anything else is a short id to look up.
pub fn is_full_id(id: &str) -> bool {
    let Some((stamp, random)) = id.split_once('-') else { return false };
    stamp.len() == 16
        && stamp.as_bytes()[8] == b'T'
        && stamp.ends_with('Z')
        && random.len() == 6
        && random.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Ids as a table shows them: the 6 random hex digits where no other id shown shares them (the
/// time is in its own column), the whole id otherwise. Every verb taking an id accepts both.
pub fn short_ids(ids: &[&str]) -> Vec<String> {
    let tail = |id: &str| id.rsplit_once('-').map(|(_, r)| r.to_string());
    ids.iter()
        .map(|id| match tail(id) {
            Some(t)
                if is_full_id(id)
                    && ids.iter().filter(|o| tail(o).as_ref() == Some(&t)).count() == 1 =>
            {
                t
            }
            _ => id.to_string(),
        })
        .collect()
}

/// `list`: one row per backup, newest first as the listener returns them.
pub fn list_human(backups: &[Backup]) -> String {
    let ids: Vec<&str> = backups.iter().map(|b| b.backup_id.as_str()).collect();
    let short = short_ids(&ids);
    let rows: Vec<Vec<String>> = backups
        .iter()
        .zip(short)
        .map(|(b, id)| {
            vec![
                id,
                b.group.clone(),
                state_with_marks(b),
                short_time(b.created_unix_ms),
                duration_of(b),
                consistent_of(b).into(),
                or_dash(&b.reason),
            ]
        })
        .collect();
    table(&["ID", "GROUP", "STATE", "CREATED", "DURATION", "CONSISTENT", "REASON"], &rows)
}

/// The state, with `pinned` or `expired` beside it when retention has a say.
fn state_with_marks(b: &Backup) -> String {
    match (b.pinned, b.expired_unix_ms > 0) {
        (_, true) => format!("{} (expired)", state_name(b.state)),
        (true, false) => format!("{} (pinned)", state_name(b.state)),
        (false, false) => state_name(b.state),
    }
}

/// `log`: `2024-05-01T12:34:56.789Z  info   srv-a  message`.
pub fn log_line(e: &LogEntry) -> String {
    let time = rfc3339(e.unix_ms).unwrap_or_else(|| "-".into());
    format!("{time}  {:<5}  {}  {}", e.level, or_dash(&e.server), e.message)
}

/// Whether the agent still holds something of a backup: a freeze (or one being made), snapshots,
/// or an orphan snapshot. An agent's Status also lists the backups it has finished with
/// (`thawed-expired`, `aborted`, `failed`, `cleaned`), up to a hundred of them.
fn still_held(b: &AgentBackup) -> bool {
    use stillpoint_proto::AgentPhase as P;
    matches!(b.phase(), P::Preparing | P::Frozen | P::Snapshotted | P::Held | P::Orphan)
        || !b.snapshots.is_empty()
}

/// `agents`: one row per agent; ACTIVE lists only what the agent still holds (`--json` lists
/// every backup it remembers).
pub fn agents_human(agents: &[AgentInfo]) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let status = if a.reachable {
                or_dash(&a.version)
            } else {
                format!("error: {}", or_dash(&a.error))
            };
            let active: Vec<String> = a
                .backups
                .iter()
                .filter(|b| still_held(b))
                .map(|b| format!("{} ({})", b.backup_id, b.phase().label()))
                .collect();
            vec![
                a.server.clone(),
                or_dash(&a.address),
                or_dash(&a.groups.join(",")),
                if a.reachable { "yes" } else { "no" }.into(),
                status,
                or_dash(&active.join(", ")),
            ]
        })
        .collect();
    table(&["SERVER", "ADDRESS", "GROUPS", "REACHABLE", "VERSION/ERROR", "ACTIVE"], &rows)
}

/// Turns a stream of watch events into human lines: one per log entry, then one per server
/// whose phase changed since the previous event.
#[derive(Debug, Default)]
pub struct Progress {
    phases: BTreeMap<String, String>,
}

impl Progress {
    pub fn lines(&mut self, event: &WatchEvent) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(e) = &event.entry {
            lines.push(format!(
                "{}  {:<11}  {}  {}",
                clock(e.unix_ms),
                state_name(e.state),
                or_dash(&e.server),
                e.message
            ));
        }
        for s in event.backup.iter().flat_map(|b| &b.servers) {
            if self.phases.get(&s.server) == Some(&s.phase) {
                continue;
            }
            self.phases.insert(s.server.clone(), s.phase.clone());
            let detail =
                if s.detail.is_empty() { String::new() } else { format!(" ({})", s.detail) };
            lines.push(format!("  {}: {}{detail}", s.server, or_dash(&s.phase)));
        }
        lines
    }
}

mod refusal;
pub mod schedules;
pub use refusal::{code_name, ErrorDocument, FieldView, RefusalView};

#[cfg(test)]
mod tests;
