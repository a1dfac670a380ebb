//! `stillpoint-listener --config FILE`: loads the config, binds, serves until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "The stillpoint backup listener")]
struct Args {
    /// Path to the listener's TOML config.
    #[arg(long, env = "STILLPOINT_LISTENER_CONFIG")]
    config: PathBuf,
    /// Log lines as `text` or `json` (one object a line, with the fields of their spans).
    #[arg(long, env = "STILLPOINT_LOG_FORMAT", default_value = "text")]
    log_format: stillpoint_core::logs::LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    stillpoint_core::logs::init(args.log_format);
    let config = match stillpoint_listener::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stillpoint-listener: {e}");
            return ExitCode::from(2);
        }
    };
    let socket = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stillpoint-listener: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(2);
        }
    };
    match stillpoint_listener::run(config, socket, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stillpoint-listener: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else { return std::future::pending().await };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
