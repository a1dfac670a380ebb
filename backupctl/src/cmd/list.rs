//! `list [--group G] [--state S]... [--since WHEN] [--limit N]`: the catalog of backups, newest
//! first, following the listener's pages until the limit or the end.

use std::io::Write;
use std::time::Duration;

use stillpoint_proto::{BackupState, ListBackupsRequest};

use crate::client::Connection;
use crate::error::{Error, Result};
use crate::view::{self, BackupView};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this group's backups
    #[arg(long, value_name = "G")]
    pub group: Option<String>,
    /// Only backups in this state (repeat for several), e.g. failed, aborted, succeeded
    #[arg(long, value_name = "S", value_parser = parse_state)]
    pub state: Vec<BackupState>,
    /// Only backups created since: an RFC 3339 time (2024-05-01T00:00:00Z) or a span back from
    /// now (90s, 30m, 24h, 7d)
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<Since>,
    /// At most this many backups; 0 means all
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub limit: u32,
    /// Backups asked for per request (the listener caps it at 1000)
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub page_size: u32,
    /// Print a JSON array of backups
    #[arg(long)]
    pub json: bool,
    /// Also list backups retention forgot (their records stay as history)
    #[arg(long)]
    pub all: bool,
}

/// A lower bound on creation time, as given.
#[derive(Debug, Clone, Copy)]
pub enum Since {
    At(i64),
    Ago(Duration),
}

impl Since {
    fn unix_ms(self) -> i64 {
        match self {
            Since::At(ms) => ms,
            Since::Ago(span) => stillpoint_core::unix_ms()
                .saturating_sub(i64::try_from(span.as_millis()).unwrap_or(i64::MAX))
                .max(1),
        }
    }
}

fn parse_state(text: &str) -> std::result::Result<BackupState, String> {
    match BackupState::from_str_name(&text.to_ascii_uppercase()) {
        Some(BackupState::Unspecified) | None => Err(format!(
            "{text:?} is not a state: pending, preparing, committing, snapshotted, copying, cleaning, succeeded, failed or aborted"
        )),
        Some(state) => Ok(state),
    }
}

fn parse_since(text: &str) -> std::result::Result<Since, String> {
    let span = |n: &str, unit: u64| {
        n.parse::<u64>().ok().map(|n| Since::Ago(Duration::from_secs(n.saturating_mul(unit))))
    };
    let parsed = match text.char_indices().last() {
        Some((at, 's')) => span(&text[..at], 1),
        Some((at, 'm')) => span(&text[..at], 60),
        Some((at, 'h')) => span(&text[..at], 3600),
        Some((at, 'd')) => span(&text[..at], 86_400),
        _ => None,
    };
    parsed
        .or_else(|| {
            let format = time::format_description::well_known::Rfc3339;
            let at = time::OffsetDateTime::parse(text, &format).ok()?;
            i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok().map(Since::At)
        })
        .ok_or_else(|| {
            format!("{text:?} is neither an RFC 3339 time (2024-05-01T00:00:00Z) nor a span like 30m, 24h or 7d")
        })
}

pub async fn run(conn: &Connection, args: Args, out: &mut dyn Write) -> Result<()> {
    let mut client = conn.connect()?;
    let wanted = if args.limit == 0 { usize::MAX } else { args.limit as usize };
    let mut request = ListBackupsRequest {
        group: args.group.unwrap_or_default(),
        states: args.state.iter().map(|s| *s as i32).collect(),
        created_after_unix_ms: args.since.map_or(0, Since::unix_ms),
        include_expired: args.all,
        ..ListBackupsRequest::default()
    };
    let mut backups = Vec::new();
    loop {
        let left = u32::try_from(wanted - backups.len()).unwrap_or(u32::MAX);
        request.page_size = left.min(args.page_size);
        let reply = client
            .list_backups(request.clone())
            .await
            .map_err(|s| Error::rpc("list backups", s))?
            .into_inner();
        backups.extend(reply.backups);
        if reply.next_page_token.is_empty() || backups.len() >= wanted {
            break;
        }
        request.page_token = reply.next_page_token;
    }
    backups.truncate(wanted);
    if args.json {
        let views: Vec<BackupView> = backups.iter().map(BackupView::from).collect();
        writeln!(out, "{}", view::json(&views))?;
    } else if backups.is_empty() {
        writeln!(out, "no backups")?;
    } else {
        write!(out, "{}", view::list_human(&backups))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_times_parse_as_people_write_them() {
        assert_eq!(parse_state("failed"), Ok(BackupState::Failed));
        assert_eq!(parse_state("ABORTED"), Ok(BackupState::Aborted));
        assert!(parse_state("broken").is_err());
        assert!(parse_state("backup_state_unspecified").is_err());
        assert!(
            matches!(parse_since("24h"), Ok(Since::Ago(d)) if d == Duration::from_secs(86_400))
        );
        assert!(matches!(parse_since("90s"), Ok(Since::Ago(d)) if d == Duration::from_secs(90)));
        assert!(matches!(
            parse_since("2024-05-01T12:34:56.789Z"),
            Ok(Since::At(1_714_566_896_789))
        ));
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("5y").is_err());
    }
}
