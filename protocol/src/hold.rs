//! What held a server's writes while it was frozen, and how stillpoint knows: the consistency
//! class reported beside the cut. The cut proves the order of messages; only a hold proves that
//! writes stopped, so "writes held" is said only for the classes that really hold them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A server's hold, weakest first: the derived order is the order of strength, so a group's
/// requirement is met by any class at or above it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Hold {
    /// Nothing held writes; only the storage's own snapshot is atomic (per volume, or per
    /// array). Across servers this is crash-consistent at best.
    #[default]
    StorageOnly,
    /// A hook ran before the freeze, but stillpoint cannot see whether it held anything.
    HookUnverified,
    /// The application's processes were stopped, and the kernel confirmed them stopped.
    StoppedProcesses,
    /// The filesystem was frozen (FIFREEZE): the kernel blocked every writer.
    FilesystemFreeze,
    /// The application itself confirmed it holds its files consistent (e.g. a database lock
    /// held on a connection for the whole freeze).
    Application,
}

impl Hold {
    pub const ALL: [Hold; 5] = [
        Hold::StorageOnly,
        Hold::HookUnverified,
        Hold::StoppedProcesses,
        Hold::FilesystemFreeze,
        Hold::Application,
    ];

    /// True when stillpoint knows the server's writes stopped from freeze to thaw.
    pub fn holds_writes(self) -> bool {
        self >= Hold::StoppedProcesses
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hold::StorageOnly => "storage-only",
            Hold::HookUnverified => "hook-unverified",
            Hold::StoppedProcesses => "stopped-processes",
            Hold::FilesystemFreeze => "filesystem-freeze",
            Hold::Application => "application",
        }
    }

    /// How stillpoint knows, in words, for logs and `status`.
    pub fn explain(self) -> &'static str {
        match self {
            Hold::StorageOnly => "nothing held writes; only the storage snapshot is atomic",
            Hold::HookUnverified => "a hook ran; whether it held writes cannot be seen",
            Hold::StoppedProcesses => "the application's processes were stopped",
            Hold::FilesystemFreeze => "the filesystem was frozen by the kernel",
            Hold::Application => "the application confirmed its hold",
        }
    }

    /// The strongest of several holds on one server (a filesystem freeze beside a hook holds
    /// writes, whatever the hook did); `StorageOnly` when there are none.
    pub fn strongest(holds: impl IntoIterator<Item = Hold>) -> Hold {
        holds.into_iter().max().unwrap_or_default()
    }
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown class name, with the known ones so the message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hold class {0:?}; one of: storage-only, hook-unverified, stopped-processes, filesystem-freeze, application")]
pub struct UnknownHold(pub String);

impl FromStr for Hold {
    type Err = UnknownHold;

    fn from_str(s: &str) -> Result<Hold, UnknownHold> {
        Hold::ALL.into_iter().find(|h| h.as_str() == s).ok_or_else(|| {
            let shown: String = s.chars().take(40).collect();
            UnknownHold(shown)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Hold;

    #[test]
    fn only_stopped_processes_and_stronger_hold_writes() {
        let holding: Vec<Hold> = Hold::ALL.into_iter().filter(|h| h.holds_writes()).collect();
        assert_eq!(holding, [Hold::StoppedProcesses, Hold::FilesystemFreeze, Hold::Application]);
    }

    #[test]
    fn a_freeze_beside_a_hook_is_a_freeze() {
        assert_eq!(
            Hold::strongest([Hold::HookUnverified, Hold::FilesystemFreeze]),
            Hold::FilesystemFreeze
        );
        assert_eq!(Hold::strongest([]), Hold::StorageOnly);
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for h in Hold::ALL {
            assert_eq!(h.as_str().parse::<Hold>(), Ok(h));
            assert_eq!(serde_json::to_value(h).ok(), Some(serde_json::json!(h.as_str())));
        }
        let err = "crash".parse::<Hold>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("\"crash\"") && err.contains("filesystem-freeze"), "{err}");
    }
}
