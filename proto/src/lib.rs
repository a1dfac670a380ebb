//! The stillpoint wire contract: generated tonic/prost types for the `Listener` and `Agent`
//! services. Domain types live in the daemons; convert at their edges.
#![allow(clippy::all, missing_docs)]

/// Generated from `proto/stillpoint.proto`.
pub mod v1 {
    tonic::include_proto!("stillpoint.v1");
}

pub use v1::*;

impl BackupState {
    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, BackupState::Succeeded | BackupState::Failed | BackupState::Aborted)
    }
}

impl HoldClass {
    /// The class's kebab-case name (as in configs and logs); "unknown" when unspecified.
    pub fn label(self) -> &'static str {
        match self {
            HoldClass::Unspecified => "unknown",
            HoldClass::StorageOnly => "storage-only",
            HoldClass::HookUnverified => "hook-unverified",
            HoldClass::StoppedProcesses => "stopped-processes",
            HoldClass::FilesystemFreeze => "filesystem-freeze",
            HoldClass::Application => "application",
        }
    }

    /// True when the class is known to stop writes (stopped-processes and stronger).
    pub fn holds_writes(self) -> bool {
        matches!(
            self,
            HoldClass::StoppedProcesses | HoldClass::FilesystemFreeze | HoldClass::Application
        )
    }
}

impl AgentPhase {
    /// The lowercase name operators read and `backupctl --json` prints ("thawed-expired");
    /// "unknown" when the agent did not say.
    pub fn label(self) -> &'static str {
        match self {
            AgentPhase::Unspecified => "unknown",
            AgentPhase::Preparing => "preparing",
            AgentPhase::Frozen => "frozen",
            AgentPhase::Snapshotted => "snapshotted",
            AgentPhase::ThawedExpired => "thawed-expired",
            AgentPhase::Aborted => "aborted",
            AgentPhase::Failed => "failed",
            AgentPhase::Cleaned => "cleaned",
            AgentPhase::Orphan => "orphan",
            AgentPhase::Held => "held",
        }
    }
}

/// Lets a `Backup` travel as a `google.protobuf.Any` in an error's details (WaitBackup's
/// DEADLINE_EXCEEDED carries the backup as it was when the wait ended).
impl prost::Name for Backup {
    const NAME: &'static str = "Backup";
    const PACKAGE: &'static str = "stillpoint.v1";
}
