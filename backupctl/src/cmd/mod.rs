//! One module per verb: its clap `Args` and its `run`. Remote verbs get the global
//! [`Connection`](crate::Connection); `certs`, `san` and the saveset verbs (`repo`, `verify`,
//! `restore`) work on local directories only; `artifacts` writes what the listener returns.

pub mod abort;
pub mod agents;
pub mod artifacts;
pub mod certs;
pub mod config;
pub mod copied;
pub mod copying;
pub mod drill;
pub mod list;
pub mod log;
pub mod pin;
pub mod preflight;
pub mod prune;
pub mod repo;
pub mod repo_list;
pub mod restore;
pub mod retention;
pub mod san;
pub mod schedules;
pub mod start;
pub mod status;
pub mod verify;
pub mod wait;
pub mod watch;

/// Progress and notes for people go to stderr so stdout stays parseable; a closed stderr is not
/// worth failing a backup over.
pub(crate) fn note(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}
