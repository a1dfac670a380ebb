//! `backupctl`, the operator and hook CLI of stillpoint: start, watch and inspect backups on the
//! listener over mutual TLS, make the deployment's certificates, drive the mock SAN, and copy,
//! verify and restore volumes in a saveset repository.
//!
//! # Layout
//! `client` builds the mTLS `ListenerClient` from the global options; `cmd/<verb>.rs` holds one
//! verb's arguments and its `run`; `view` converts proto types into the stable `--json` shapes
//! (see `JSON.md`) and renders the human tables; `error` maps every failure to an exit code.
//! Verbs write their results to the `out` they are given (stdout in the binary) and progress and
//! diagnostics to stderr, so stdout stays parseable.

use std::io::Write;

pub mod bar;
pub mod client;
pub mod cmd;
pub mod error;
pub mod live;
pub mod profile;
pub mod view;

pub use client::Connection;
pub use error::{Error, Result, EXIT_AGENT_UNREACHABLE, EXIT_BACKUP_FAILED, EXIT_OK, EXIT_USAGE};

const EXIT_CODES: &str = "\
Exit codes:
  0  the command did what was asked
  1  the backup failed or was aborted (start --wait, wait, watch), or wait --within passed
     first; the repository is damaged, or
     holds only part of the backup: no backup manifest, no cut (verify, restore; pass
     --incomplete to check or restore that part anyway); a drill's restore or check failed
     --incomplete to check or restore that part anyway); preflight found an error
  2  bad usage, no identity, the listener unreachable or refusing, a wrong repository secret,
     a restore target that is not empty, or a local error
  3  agents: the listener answered but one or more agents did not (named on stderr)";

/// The command line: global connection options and one verb.
#[derive(Debug, clap::Parser)]
#[command(
    name = "backupctl",
    version,
    about = "Start, watch and inspect consistent multi-server backups on a stillpoint listener",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: Connection,
    #[command(subcommand)]
    pub command: Command,
}

/// One variant per verb; each verb lives in `cmd/<verb>.rs`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Start a backup of a group; optionally wait until it is snapshotted, complete or settled
    Start(cmd::start::Args),
    /// Show one backup (default: the newest): servers and the consistent cut
    Status(cmd::status::Args),
    /// List backups, newest first
    List(cmd::list::Args),
    /// Follow a backup (default: the newest) live until it ends
    Watch(cmd::watch::Args),
    /// Block until a backup is snapshotted, finished or settled
    Wait(cmd::wait::Args),
    /// Print a backup's event log
    Log(cmd::log::Args),
    /// Abort a running backup: agents thaw and delete its snapshots
    Abort(cmd::abort::Args),
    /// List the agents the listener knows and whether they answer
    Agents(cmd::agents::Args),
    /// Report that external backup software copied (or failed to copy) a server's snapshots
    Copied(cmd::copied::Args),
    /// Report how far external backup software's copy of a server got (or that it is alive)
    Copying(cmd::copying::Args),
    /// Make the deployment's CA and issue certificates (offline)
    #[command(subcommand)]
    Certs(cmd::certs::Certs),
    /// Drive the mock SAN array in a directory (offline)
    #[command(subcommand)]
    San(cmd::san::San),
    /// Create a saveset repository or copy a snapshot or image into it (offline)
    #[command(subcommand)]
    Repo(cmd::repo::Repo),
    /// Check a backup in the saveset repository and name any damage (offline)
    Verify(cmd::verify::Args),
    /// Write a server's volumes of a backup back from the saveset repository (offline)
    Restore(cmd::restore::Args),
    /// Write the files a backup's quiescers made for a restore, from the listener's catalog
    Artifacts(cmd::artifacts::Args),
    /// Show the connection settings in effect and where each came from (flag, environment,
    /// profile, default)
    #[command(subcommand)]
    Config(cmd::config::Config),
    /// Restore a backup into scratch space and check it: fsck, mount, start its databases
    /// (offline)
    Drill(cmd::drill::Args),
    /// List the listener's schedules (next run, last outcome); suspend or resume one
    Schedules(cmd::schedules::Args),
    /// Check a group's agents before its first backup: reachable, tools, privileges, guardian
    Preflight(cmd::preflight::Args),
    /// Pin a backup: retention never forgets it
    Pin(cmd::pin::Args),
    /// Take a backup's pin away: retention decides it by its group's rules again
    Unpin(cmd::pin::Args),
    /// Apply a group's retention rules now (or only show them with --dry-run)
    Retention(cmd::retention::Args),
}

/// Runs one command, writing results to `out` and diagnostics to stderr; returns the exit code.
pub async fn run(cli: Cli, out: &mut dyn Write) -> u8 {
    let listener = cli.connection.listener.clone();
    let result = dispatch(cli, out).await.and_then(|()| out.flush().map_err(Error::from));
    match result {
        Ok(()) => EXIT_OK,
        // A reader that went away (`backupctl watch | head -1`) got what it wanted.
        Err(Error::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_OK,
        Err(e) => {
            let unreachable = matches!(&e, Error::Rpc { status, .. }
                if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded));
            let at = if unreachable { format!(" (listener {listener})") } else { String::new() };
            let _ = writeln!(std::io::stderr(), "backupctl: {e}{at}");
            e.exit_code()
        }
    }
}

async fn dispatch(cli: Cli, out: &mut dyn Write) -> Result<()> {
    let conn = &cli.connection;
    let mut command = cli.command;
    // Short ids (as tables show them) become whole ones before any verb sees them.
    match &mut command {
        Command::Status(a) => resolve_some(conn, &mut a.id).await?,
        Command::Watch(a) => resolve_some(conn, &mut a.id).await?,
        Command::Wait(a) => a.id = client::resolve(conn, &a.id).await?,
        Command::Log(a) => a.id = client::resolve(conn, &a.id).await?,
        Command::Abort(a) => a.id = client::resolve(conn, &a.id).await?,
        Command::Copied(a) => a.id = client::resolve(conn, &a.id).await?,
        Command::Copying(a) => a.id = client::resolve(conn, &a.id).await?,
        Command::Artifacts(a) => a.id = client::resolve(conn, &a.id).await?,
        _ => {}
    }
    match command {
        Command::Start(args) => cmd::start::run(conn, args, out).await,
        Command::Status(args) => cmd::status::run(conn, args, out).await,
        Command::List(args) => cmd::list::run(conn, args, out).await,
        Command::Watch(args) => cmd::watch::run(conn, args, out).await,
        Command::Wait(args) => cmd::wait::run(conn, args, out).await,
        Command::Log(args) => cmd::log::run(conn, args, out).await,
        Command::Abort(args) => cmd::abort::run(conn, args, out).await,
        Command::Agents(args) => cmd::agents::run(conn, args, out).await,
        Command::Copied(args) => cmd::copied::run(conn, args, out).await,
        Command::Copying(args) => cmd::copying::run(conn, args, out).await,
        Command::Certs(certs) => cmd::certs::run(certs, out),
        Command::San(san) => cmd::san::run(san, out),
        Command::Repo(repo) => cmd::repo::run(repo, out),
        Command::Verify(args) => cmd::verify::run(args, out),
        Command::Restore(args) => cmd::restore::run(args, out),
        Command::Artifacts(args) => cmd::artifacts::run(conn, args, out).await,
        Command::Config(config) => cmd::config::run(conn, config, out),
        Command::Drill(args) => cmd::drill::run(args, out).await,
        Command::Schedules(args) => cmd::schedules::run(conn, args, out).await,
        Command::Preflight(args) => cmd::preflight::run(conn, args, out).await,
        Command::Pin(args) => cmd::pin::run(conn, args, true, out).await,
        Command::Unpin(args) => cmd::pin::run(conn, args, false, out).await,
        Command::Retention(args) => cmd::retention::run(conn, args, out).await,
    }
}

async fn resolve_some(conn: &Connection, id: &mut Option<String>) -> Result<()> {
    if let Some(short) = id.as_deref() {
        *id = Some(client::resolve(conn, short).await?);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
