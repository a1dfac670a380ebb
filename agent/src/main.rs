//! The `stillpoint-agent` binary: parses arguments, sets up logging, loads and validates the
//! config, replays the freeze journal, binds, and runs the agent until SIGINT or SIGTERM. The
//! hidden `guardian` subcommand is the agent's own thaw guardian; `hold-sqlite` holds the
//! sqlite quiescer's transactions. `replay-journal` (systemd's `ExecStopPost=`) thaws what a
//! stopped agent's journal still lists. Exit codes: 0 ok, 1 failed, 2 usage.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use stillpoint_agent::Config;
use tokio::signal::unix::{signal, SignalKind};

/// The stillpoint agent: quiesces, freezes, snapshots and thaws this server on the listener's orders.
#[derive(Parser)]
#[command(version, subcommand_negates_reqs = true)]
struct Args {
    /// The agent's TOML config file.
    #[arg(long, required = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    guardian: Option<Sub>,
    /// Log lines as `text` or `json` (one object a line, with the fields of their spans).
    #[arg(long, global = true, env = "STILLPOINT_LOG_FORMAT", default_value = "text")]
    log_format: stillpoint_core::logs::LogFormat,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// Started by the agent itself: thaws what it froze if it dies or its lease runs out.
    #[command(hide = true)]
    Guardian {
        #[arg(long)]
        journal: Option<std::path::PathBuf>,
    },
    /// Started by the sqlite quiescer: holds write transactions on these databases until its
    /// stdin closes.
    #[command(hide = true)]
    HoldSqlite {
        #[arg(long)]
        timeout_ms: u64,
        #[arg(required = true)]
        databases: Vec<std::path::PathBuf>,
    },
    /// Runs every thaw action this agent's journal still lists (a stopped or killed agent and
    /// guardian left them), then exits: 0 when nothing is left frozen. A running agent's
    /// journal is left alone. For systemd's ExecStopPost=.
    ReplayJournal {
        /// The agent's TOML config file (its server name and state_dir).
        #[arg(long)]
        config: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    // Large buffers freed go back to the system: peak memory stays flat with the volume.
    stillpoint_core::sys::fix_mmap_threshold();
    let args = Args::parse();
    stillpoint_core::logs::init(args.log_format);
    match args.guardian {
        Some(Sub::Guardian { journal }) => {
            stillpoint_agent::guardian::main(journal.as_deref());
            return ExitCode::SUCCESS;
        }
        Some(Sub::HoldSqlite { timeout_ms, databases }) => {
            return stillpoint_agent::quiesce::sqlite::hold_main(&databases, timeout_ms);
        }
        Some(Sub::ReplayJournal { config }) => return replay_journal(&config),
        None => {}
    }
    let config = match args.config.map(|p| Config::load(&p).and_then(|c| c.validate().map(|()| c)))
    {
        Some(Ok(config)) => config,
        Some(Err(e)) => {
            eprintln!("stillpoint-agent: {e}");
            return ExitCode::from(2);
        }
        None => return ExitCode::from(2),
    };
    let served = tokio::runtime::Runtime::new()
        .context("start tokio")
        .and_then(|rt| rt.block_on(serve(config)));
    if let Err(e) = served {
        eprintln!("stillpoint-agent: {e:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Parses (not validates: a config broken since the start must not stop the thaw) and replays.
fn replay_journal(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("stillpoint-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let replayed =
        stillpoint_agent::replay::replay_journal(&config, stillpoint_agent::replay::GUARDIAN_WAIT);
    match replayed {
        Err(e) => {
            eprintln!("stillpoint-agent: replay-journal: {e}");
            ExitCode::FAILURE
        }
        Ok(stillpoint_agent::journal::Replayed { live_owner: Some(pid), .. }) => {
            eprintln!("stillpoint-agent: the agent (pid {pid}) still runs; its journal is its own");
            ExitCode::SUCCESS
        }
        // Each action was logged as it ran; this line sums them up.
        Ok(r) if r.failed.is_empty() => {
            eprintln!(
                "stillpoint-agent: journal of {}: {} thaw action(s) run, nothing left frozen",
                config.server,
                r.undone.len()
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!(
                "stillpoint-agent: journal of {}: {} of {} thaw action(s) failed (logged above): \
                 what they hold may still be frozen or stopped",
                config.server,
                r.failed.len(),
                r.failed.len() + r.undone.len()
            );
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Thaw what a killed agent and guardian left frozen before anyone can reach us.
    stillpoint_agent::recover(&config)?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
    };
    Ok(stillpoint_agent::run(config, listener, shutdown).await?)
}
