//! `stillpoint-listener --config FILE`: loads the config, binds, serves until SIGINT or SIGTERM;
//! with `--rebuild-catalog [--force]` rebuilds the catalog from the repository and exits.
//! With `--check` it runs the pre-flight checks instead, prints them and exits 0, or 1 on an error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "The stillpoint backup listener")]
struct Args {
    /// Path to the listener's TOML config.
    #[arg(long, env = "STILLPOINT_LISTENER_CONFIG")]
    config: PathBuf,
    /// Rebuild the catalog from the saveset repository's saved one, then exit.
    #[arg(long)]
    rebuild_catalog: bool,
    /// With --rebuild-catalog: move an existing catalog aside instead of refusing.
    #[arg(long, requires = "rebuild_catalog")]
    force: bool,
    /// Check the config, certificate, directories, copy target and every agent, print what was
    /// found (ok / warn / error, with what to do), and exit: 0 if nothing is an error, else 1.
    #[arg(long, conflicts_with = "rebuild_catalog")]
    check: bool,
    /// Log lines as `text` or `json` (one object a line, with the fields of their spans).
    #[arg(long, env = "STILLPOINT_LOG_FORMAT", default_value = "text")]
    log_format: stillpoint_core::logs::LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Large buffers freed go back to the system: peak memory stays flat with the volume.
    stillpoint_core::sys::fix_mmap_threshold();
    let args = Args::parse();
    stillpoint_core::logs::init(args.log_format);
    if args.check {
        let findings = stillpoint_listener::preflight::check(&args.config).await;
        print!("{}", stillpoint_core::preflight::render(&findings));
        return if stillpoint_core::preflight::has_error(&findings) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let config = match stillpoint_listener::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stillpoint-listener: {e}");
            return ExitCode::from(2);
        }
    };
    if args.rebuild_catalog {
        let force = args.force;
        let rebuilt = tokio::task::spawn_blocking(move || {
            stillpoint_listener::repo_catalog::rebuild_command(&config, force)
        });
        return match rebuilt.await {
            Ok(Ok(done)) => {
                println!("{done}");
                ExitCode::SUCCESS
            }
            Ok(Err(e)) => {
                eprintln!("stillpoint-listener: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("stillpoint-listener: rebuild: {e}");
                ExitCode::FAILURE
            }
        };
    }
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
