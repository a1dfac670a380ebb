//! The `stillpoint-agent` binary: parses arguments, sets up logging, loads and validates the
//! config, binds, and runs the agent until SIGINT or SIGTERM. Exit codes: 0 ok, 1 failed, 2 usage.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use stillpoint_agent::Config;
use tokio::signal::unix::{signal, SignalKind};

/// The stillpoint agent: quiesces, freezes, snapshots and thaws this server on the listener's orders.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The agent's TOML config file.
    #[arg(long)]
    config: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let config = match Config::load(&args.config).and_then(|c| c.validate().map(|()| c)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("stillpoint-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = serve(config).await {
        eprintln!("stillpoint-agent: {e:#}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
    };
    Ok(stillpoint_agent::run(config, listener, shutdown).await?)
}
