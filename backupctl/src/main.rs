//! The `backupctl` binary: parses the command line (clap exits 2 on bad usage) and runs the
//! command on a single-threaded runtime. Everything else is in the library.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    // Large buffers freed go back to the system: peak memory stays flat with the volume.
    stillpoint_core::sys::fix_mmap_threshold();
    let matches = backupctl::Cli::command().get_matches();
    let mut cli = match backupctl::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Err(e) =
        backupctl::profile::apply(&mut cli.connection, &matches, backupctl::profile::path())
    {
        eprintln!("backupctl: {e}");
        return ExitCode::from(backupctl::EXIT_USAGE);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("backupctl: start the async runtime: {e}");
            return ExitCode::from(backupctl::EXIT_USAGE);
        }
    };
    let mut stdout = std::io::stdout().lock();
    ExitCode::from(runtime.block_on(backupctl::run(cli, &mut stdout)))
}
