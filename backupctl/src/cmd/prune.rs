//! `repo prune`: frees what no manifest references (saveset's `Repository::prune`, FORMAT.md
//! "Prune"), prints what went (or, with `--dry-run`, what would go) and notes each change on
//! stderr.

use std::io::Write;
use std::time::Duration;

use serde::Serialize;
use stillpoint_saveset::{PruneOptions, PruneReport};

use crate::cmd::repo::RepoOptions;
use crate::error::{Error, Result};
use crate::view;

/// Tests only: stop (sleep) just before change N, after noting it, so a test can SIGKILL a
/// prune at a known point.
const STALL_ENV: &str = "STILLPOINT_PRUNE_TEST_STALL_AT";

#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoOptions,
    /// Show what would be deleted and rewritten, and change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// How old marked packs, tmp/ files and packs without index must be before they are
    /// deleted: N followed by s, m, h or d (0 frees at once when no backup is running)
    #[arg(long, default_value = "1h", value_parser = parse_grace, value_name = "DURATION")]
    pub grace: Duration,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// `30s`, `10m`, `1h`, `2d`, or `0`.
pub fn parse_grace(s: &str) -> std::result::Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration: write N followed by s, m, h or d (e.g. 30m)");
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" if n == 0 => 0,
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs))
}

#[derive(Serialize)]
struct PruneView<'a> {
    repo: String,
    #[serde(flatten)]
    report: &'a PruneReport,
    duration_ms: u64,
}

pub fn run(args: PruneArgs, out: &mut dyn Write) -> Result<()> {
    let mut repo = args.repo.open()?;
    let stall: Option<usize> = std::env::var(STALL_ENV).ok().and_then(|v| v.parse().ok());
    let opts = PruneOptions { dry_run: args.dry_run, grace: args.grace, ..Default::default() };
    let started = std::time::Instant::now();
    let mut note = |line: &str| {
        crate::cmd::note(&format!("prune: {line}"));
        let step = line.split_once(':').and_then(|(h, _)| h.rsplit(' ').next()?.parse().ok());
        if stall.is_some() && step == stall {
            crate::cmd::note("prune: stalled (test)");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    };
    let report = repo.prune(&opts, &mut note).map_err(Error::from)?;
    let shown = PruneView {
        repo: repo.path().display().to_string(),
        report: &report,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    if args.json {
        writeln!(out, "{}", view::json(&shown))?;
        return Ok(());
    }
    let r = &report;
    let (would, deleted) = if r.dry_run { ("would be ", "would delete") } else { ("", "deleted") };
    writeln!(
        out,
        "{}scanned {} manifests, {} packs ({} B), {} chunks in use",
        if r.dry_run { "dry run, nothing changed: " } else { "" },
        r.manifests,
        r.packs,
        r.pack_bytes,
        r.referenced_chunks
    )?;
    writeln!(
        out,
        "{deleted}: {} packs and {} index files, {} packs without index, {} tmp files: {} B freed",
        r.packs_deleted,
        r.index_files_deleted,
        r.orphan_packs_deleted,
        r.tmp_files_deleted,
        r.bytes_freed
    )?;
    writeln!(
        out,
        "repacked: {} partly used packs into {} new packs, {} B {would}rewritten",
        r.packs_repacked, r.packs_written, r.bytes_rewritten
    )?;
    writeln!(
        out,
        "marked for deletion: {} packs ({} unused, {} repacked), {} B",
        r.packs_marked, r.packs_unused, r.packs_repacked, r.bytes_marked
    )?;
    if r.packs_rescued > 0 {
        writeln!(out, "kept: {} marked packs a backup written meanwhile uses", r.packs_rescued)?;
    }
    for w in &r.waiting {
        writeln!(out, "waiting: {w}")?;
    }
    for l in &r.locks {
        writeln!(out, "running backup: {l}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_takes_a_number_and_a_unit() {
        assert_eq!(parse_grace("0"), Ok(Duration::ZERO));
        assert_eq!(parse_grace("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_grace("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_grace("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_grace("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "h", "5", "1.5h", "-1h", "10 m"] {
            assert!(parse_grace(bad).unwrap_err().contains("not a duration"), "{bad}");
        }
    }
}
