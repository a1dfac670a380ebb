//! What a drill found, as `DrillReport` (serde both ways, so the notifier can carry it and
//! `--json` prints it) and as the human text. Pure: the drill fills it in, this renders it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// How many of a failed step's last output lines a report keeps.
pub const TAIL_LINES: usize = 20;

/// One drill of one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillReport {
    pub backup: String,
    /// The group the backup manifest's cut names (`null` without a backup manifest).
    pub group: Option<String>,
    pub repository: String,
    /// A backup manifest names the backup (false only with `--incomplete`).
    pub complete: bool,
    pub started_unix_ms: u64,
    pub duration_ms: u64,
    /// The scratch directory the volumes were restored into.
    pub scratch: String,
    /// Whether the scratch directory is still there (`--keep`).
    pub scratch_kept: bool,
    pub servers: Vec<ServerReport>,
    /// Every volume restored and every check passed.
    pub passed: bool,
}

/// One server: its volumes' restores, then its checks in the configured order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerReport {
    pub server: String,
    pub volumes: Vec<VolumeReport>,
    pub checks: Vec<CheckReport>,
}

/// One volume restored from the repository into scratch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeReport {
    pub volume: String,
    pub image: String,
    pub size: u64,
    pub bytes_written: u64,
    pub duration_ms: u64,
    /// Why the restore failed (damage named by chunk and pack); `null` when it worked.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Passed,
    Failed,
    /// Not run, because the restore it needs failed; the report counts it as not passed.
    Skipped,
}

/// One check: what it ran, how it ended, and on failure the last lines its tools printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// `fsck`, `mount`, `postgres`, `mysql`, `sqlite` or `command`.
    pub check: String,
    pub volume: String,
    pub outcome: Outcome,
    pub duration_ms: u64,
    /// One line: what passed (`xfs: no problems`) or what failed (`pg_amcheck: exit 2`).
    pub detail: String,
    /// The last lines of the tools' output when it failed (at most [`TAIL_LINES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output: Vec<String>,
}

impl ServerReport {
    pub fn passed(&self) -> bool {
        self.volumes.iter().all(|v| v.error.is_none())
            && self.checks.iter().all(|c| c.outcome == Outcome::Passed)
    }
}

impl DrillReport {
    /// What failed, for one line on stderr and the exit: `db1: restore of data, postgres`.
    pub fn failures(&self) -> Vec<String> {
        let mut failed = Vec::new();
        for s in &self.servers {
            let mut what: Vec<String> = s
                .volumes
                .iter()
                .filter(|v| v.error.is_some())
                .map(|v| format!("restore of {}", v.volume))
                .collect();
            what.extend(
                s.checks
                    .iter()
                    .filter(|c| c.outcome == Outcome::Failed)
                    .map(|c| format!("{} check", c.check)),
            );
            if !what.is_empty() {
                failed.push(format!("{}: {}", s.server, what.join(", ")));
            }
        }
        failed
    }

    /// The human report, one block per server.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let incomplete = if self.complete { "" } else { "INCOMPLETE " };
        let group = self.group.as_deref().map(|g| format!(" (group {g})")).unwrap_or_default();
        let _ = writeln!(
            text,
            "drill of {incomplete}backup {}{group} from {}: {} in {}",
            self.backup,
            self.repository,
            if self.passed { "PASSED" } else { "FAILED" },
            ms(self.duration_ms)
        );
        for s in &self.servers {
            let _ =
                writeln!(text, "{}: {}", s.server, if s.passed() { "passed" } else { "FAILED" });
            for v in &s.volumes {
                match &v.error {
                    None => {
                        let _ = writeln!(
                            text,
                            "  restore {:<10} ok      {:>8}  {} B ({} B written) to {}",
                            v.volume,
                            ms(v.duration_ms),
                            v.size,
                            v.bytes_written,
                            v.image
                        );
                    }
                    Some(e) => {
                        let _ = writeln!(
                            text,
                            "  restore {:<10} FAILED  {:>8}  {e}",
                            v.volume,
                            ms(v.duration_ms)
                        );
                    }
                }
            }
            for c in &s.checks {
                let said = match c.outcome {
                    Outcome::Passed => "ok",
                    Outcome::Failed => "FAILED",
                    Outcome::Skipped => "skipped",
                };
                let _ = writeln!(
                    text,
                    "  {:<8} {:<10} {said:<7} {:>8}  {}",
                    c.check,
                    c.volume,
                    ms(c.duration_ms),
                    c.detail
                );
                for line in &c.output {
                    let _ = writeln!(text, "    | {line}");
                }
            }
        }
        let kept = if self.scratch_kept { "kept" } else { "removed" };
        let _ = writeln!(text, "scratch {} {kept}", self.scratch);
        text
    }
}

/// The last `n` non-empty lines of a tool's output, each cut to 300 characters.
pub fn tail(output: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    let from = lines.len().saturating_sub(n);
    lines[from..]
        .iter()
        .map(|l| {
            let mut l = (*l).to_string();
            if let Some((cut, _)) = l.char_indices().nth(300) {
                l.truncate(cut);
                l.push('…');
            }
            l
        })
        .collect()
}

/// `850ms`, `12.3s`, `4m05s`.
pub fn ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
    }
}
