//! `stillpoint-agent replay-journal`: runs the thaw actions a stopped agent's journal still lists,
//! for systemd's `ExecStopPost=`, so a freeze left by an agent and guardian both killed lasts
//! until systemd notices, not until the next start. It never touches a live agent's freezes.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::journal::{Journal, Replayed};
use crate::{Config, Error, Result};

/// How long to let a guardian that outlived its agent finish: it thaws as soon as it sees the
/// agent's pipe close, in milliseconds, then exits.
pub const GUARDIAN_WAIT: Duration = Duration::from_secs(10);

/// The pid in `pidfile` when it names a running stillpoint process other than this one.
fn live_guardian(pidfile: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (pid != std::process::id() && comm.starts_with("stillpoint-agen")).then_some(pid)
}

/// Replays `config`'s journal. A journal whose agent still runs is left alone
/// (`live_owner`); a guardian that outlived its agent is given up to `guardian_wait` to run its
/// own actions first (it removes them from the journal), then whatever the journal still lists
/// runs here. Every action is safe to repeat (a thawed mount is left alone, a pid is checked by
/// start time, a socket by inode), so a guardian still stuck after the wait does no harm.
pub fn replay_journal(config: &Config, guardian_wait: Duration) -> Result<Replayed> {
    let path = Journal::path(&config.state_dir, &config.server);
    let setup = |e: std::io::Error| Error::Setup(format!("journal {}: {e}", path.display()));
    let found = Journal::open(&path).map_err(setup)?;
    if found.entries().is_empty() {
        return Ok(Replayed::default());
    }
    let pidfile = crate::pidfile(&config.state_dir, &config.server);
    let deadline = Instant::now() + guardian_wait;
    while crate::journal::owner_alive(&found).is_none()
        && live_guardian(&pidfile).is_some()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    crate::journal::replay(&path).map(|(_, replayed)| replayed).map_err(setup)
}
