//! `watch ID` on a terminal: the backup as one table, a row per server, redrawn in place as
//! events arrive and four times a second between them, so a frozen server's lease counts down
//! and a copy's rate and ETA move. `Screen` is pure (events and clock readings in, lines out);
//! `draw` only moves the cursor back over what it drew last.
//!
//! Times on the listener's clock are read against ours through the smallest offset seen
//! between a log entry's time and its arrival. That offset includes the network's delay, so the
//! listener's "now" is never overestimated and a lease left is never shown shorter than it is:
//! the countdown is an upper bound, shown as `≤`.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;

use stillpoint_proto::{Backup, WatchEvent};

use crate::view::{self, human_bytes, human_duration, state_name};

/// How many of the newest log lines are shown under the table.
const RECENT: usize = 4;

/// What the table shows; fed by [`Screen::observe`], read by [`Screen::render`].
#[derive(Debug, Default)]
pub struct Screen {
    /// The lease every freeze runs under, from the listener's Health; `None` if it did not say.
    lease_ms: Option<u64>,
    backup: Option<Backup>,
    /// Our clock minus the listener's, plus the smallest delay seen (see the module doc).
    offset_ms: Option<i64>,
    rates: BTreeMap<String, Rate>,
    recent: VecDeque<String>,
}

/// A server's copy rate: bytes per second, smoothed over the progress reports seen.
#[derive(Debug, Default, Clone, Copy)]
struct Rate {
    bytes: u64,
    at_ms: i64,
    per_s: Option<f64>,
}

impl Screen {
    pub fn new(lease_ms: Option<u64>) -> Self {
        Screen { lease_ms: lease_ms.filter(|&l| l > 0), ..Screen::default() }
    }

    /// Takes in one event that arrived at `now_ms` on our clock.
    pub fn observe(&mut self, event: &WatchEvent, now_ms: i64) {
        if let Some(entry) = &event.entry {
            if entry.unix_ms > 0 {
                let offset = now_ms - entry.unix_ms;
                self.offset_ms = Some(self.offset_ms.map_or(offset, |o| o.min(offset)));
            }
            self.recent.push_back(format!(
                "{}  {}  {}",
                view::clock(entry.unix_ms),
                if entry.server.is_empty() { "-" } else { &entry.server },
                entry.message
            ));
            while self.recent.len() > RECENT {
                self.recent.pop_front();
            }
        }
        let Some(backup) = &event.backup else { return };
        for s in &backup.servers {
            let rate = self.rates.entry(s.server.clone()).or_default();
            if rate.at_ms == 0 || s.copied_bytes < rate.bytes {
                *rate = Rate { bytes: s.copied_bytes, at_ms: now_ms, per_s: None };
                continue;
            }
            let (dt, db) = (now_ms - rate.at_ms, s.copied_bytes - rate.bytes);
            // Reports closer than 200 ms say more about the stream than about the copy.
            if db > 0 && dt >= 200 {
                #[allow(clippy::cast_precision_loss)]
                let sample = db as f64 * 1000.0 / dt as f64;
                let per_s = rate.per_s.map_or(sample, |r| 0.7 * r + 0.3 * sample);
                *rate = Rate { bytes: s.copied_bytes, at_ms: now_ms, per_s: Some(per_s) };
            }
        }
        self.backup = Some(backup.clone());
    }

    /// The listener's clock now, never later than it really is (see the module doc).
    fn listener_now(&self, now_ms: i64) -> i64 {
        now_ms - self.offset_ms.unwrap_or(0)
    }

    /// The table as lines, at `now_ms` on our clock.
    pub fn render(&self, now_ms: i64) -> Vec<String> {
        let Some(b) = &self.backup else {
            return vec!["waiting for the listener's first event...".into()];
        };
        let at = self.listener_now(now_ms);
        let elapsed = if b.finished_unix_ms > 0 {
            b.finished_unix_ms - b.created_unix_ms
        } else {
            at - b.created_unix_ms
        };
        let mut lines = vec![format!(
            "backup {}  group {}  {}  {}",
            b.backup_id,
            b.group,
            state_name(b.state),
            human_duration(elapsed)
        )];
        let rows: Vec<Vec<String>> = b.servers.iter().map(|s| self.row(b, s, at)).collect();
        let table = view::table(&["SERVER", "PHASE", "LEASE LEFT", "COPIED", "RATE", "ETA"], &rows);
        lines.extend(table.lines().map(str::to_string));
        if !b.reason.is_empty() {
            lines.push(format!("reason: {}", b.reason));
        }
        lines.push(String::new());
        lines.extend(self.recent.iter().cloned());
        lines
    }

    fn row(&self, b: &Backup, s: &stillpoint_proto::ServerProgress, at: i64) -> Vec<String> {
        let lease = match s.phase.as_str() {
            // Frozen and waiting for Commit (or committing, or held until Release under the
            // thaw barrier): the agent's lease began before it answered prepared, so it ends
            // by prepared + lease.
            "frozen" | "committing" | "releasing" => {
                let prepared = b
                    .cut
                    .iter()
                    .flat_map(|c| &c.servers)
                    .find(|c| c.server == s.server)
                    .map_or(0, |c| c.prepared_unix_ms);
                match (self.lease_ms, prepared) {
                    (None, _) => "unknown".to_string(),
                    (Some(_), 0) => "-".to_string(),
                    #[allow(clippy::cast_possible_wrap)]
                    (Some(lease), p) => {
                        let left = p + lease as i64 - at;
                        if left > 0 {
                            format!("≤{}", human_duration(left))
                        } else {
                            "ran out".to_string()
                        }
                    }
                }
            }
            _ => "-".to_string(),
        };
        let copied = if s.total_bytes == 0 && s.copied_bytes == 0 {
            "-".to_string()
        } else {
            format!("{}/{}", human_bytes(s.copied_bytes), human_bytes(s.total_bytes))
        };
        let copying = s.phase == "copying";
        let per_s = self.rates.get(&s.server).and_then(|r| r.per_s).filter(|_| copying);
        let rate = per_s.map_or("-".to_string(), |r| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let r = r as u64;
            format!("{}/s", human_bytes(r))
        });
        let eta = match per_s {
            Some(r) if r > 0.0 && s.total_bytes > s.copied_bytes => {
                #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
                let ms = ((s.total_bytes - s.copied_bytes) as f64 / r * 1000.0) as i64;
                human_duration(ms)
            }
            _ => "-".to_string(),
        };
        let phase = if s.phase.is_empty() { "-".to_string() } else { s.phase.clone() };
        vec![s.server.clone(), phase, lease, copied, rate, eta]
    }
}

/// Draws `lines` over the `drawn` lines drawn last (cursor up, clear to the end of the screen),
/// each cut to `width` columns so none wraps; returns how many lines are now drawn.
pub fn draw(
    out: &mut dyn Write,
    lines: &[String],
    drawn: usize,
    width: usize,
) -> std::io::Result<usize> {
    let mut frame = String::new();
    if drawn > 0 {
        frame.push_str(&format!("\r\x1b[{drawn}A"));
    }
    frame.push_str("\x1b[J");
    for line in lines {
        let cut: String = line.chars().take(width.max(20)).collect();
        frame.push_str(&cut);
        frame.push('\n');
    }
    out.write_all(frame.as_bytes())?;
    out.flush()?;
    Ok(lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use stillpoint_proto::{Cut, LogEntry, ServerCut, ServerProgress};

    fn backup(phase_a: &str, copied: u64) -> Backup {
        Backup {
            backup_id: "20261203T131500Z-abc123".into(),
            group: "clinic".into(),
            state: 2,
            created_unix_ms: 1_000_000,
            servers: vec![ServerProgress {
                server: "srv-a".into(),
                phase: phase_a.into(),
                copied_bytes: copied,
                total_bytes: 10 << 30,
                ..ServerProgress::default()
            }],
            cut: Some(Cut {
                servers: vec![ServerCut {
                    server: "srv-a".into(),
                    prepared_unix_ms: 1_000_500,
                    ..ServerCut::default()
                }],
                ..Cut::default()
            }),
            ..Backup::default()
        }
    }

    fn event(b: Backup, at: i64) -> WatchEvent {
        WatchEvent {
            entry: Some(LogEntry { unix_ms: at, message: "m".into(), ..LogEntry::default() }),
            backup_id: b.backup_id.clone(),
            backup: Some(b),
        }
    }

    #[test]
    fn a_frozen_servers_lease_counts_down_on_the_listeners_clock() {
        let mut screen = Screen::new(Some(10_000));
        // Our clock is 5 s ahead of the listener's, with 20 ms of network delay.
        screen.observe(&event(backup("frozen", 0), 1_000_600), 1_005_620);
        let row = |screen: &Screen, now| {
            screen.render(now).into_iter().find(|l| l.starts_with("srv-a")).unwrap_or_default()
        };
        // Listener now ≈ 1_000_600 + (now - 1_005_620); lease ends at 1_010_500.
        assert!(row(&screen, 1_005_620).contains("≤9.9s"), "{}", row(&screen, 1_005_620));
        assert!(row(&screen, 1_010_620).contains("≤4.9s"), "{}", row(&screen, 1_010_620));
        assert!(row(&screen, 1_016_000).contains("ran out"));
        // A faster arrival tightens the offset: the countdown never runs ahead of the truth.
        screen.observe(&event(backup("frozen", 0), 1_000_700), 1_005_705);
        assert!(row(&screen, 1_005_705).contains("≤9.8s"), "{}", row(&screen, 1_005_705));
    }

    #[test]
    fn an_unknown_lease_is_said_and_not_guessed() {
        let mut screen = Screen::new(None);
        screen.observe(&event(backup("frozen", 0), 1_000_600), 1_000_600);
        let lines = screen.render(1_000_700);
        assert!(lines.iter().any(|l| l.starts_with("srv-a") && l.contains("unknown")), "{lines:?}");
    }

    #[test]
    fn a_copy_shows_its_rate_and_eta() {
        let mut screen = Screen::new(Some(10_000));
        screen.observe(&event(backup("copying", 0), 1_001_000), 1_001_000);
        screen.observe(&event(backup("copying", 1 << 30), 1_002_000), 1_002_000);
        let lines = screen.render(1_002_000);
        let row = lines.iter().find(|l| l.starts_with("srv-a")).cloned().unwrap_or_default();
        assert!(row.contains("1.0 GiB/10.0 GiB"), "{row}");
        assert!(row.contains("1.0 GiB/s"), "{row}");
        assert!(row.contains("9.0s"), "{row}");
    }

    #[test]
    fn draw_moves_back_over_what_it_drew() {
        let mut out = Vec::new();
        let lines = vec!["a".to_string(), "bb".to_string()];
        let drawn = draw(&mut out, &lines, 0, 80).unwrap_or(0);
        assert_eq!(drawn, 2);
        draw(&mut out, &lines, drawn, 80).unwrap_or(0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("\x1b[Ja\nbb\n\r\x1b[2A\x1b[J"), "{text:?}");
    }
}
