//! The protocol crate's one error type: a value from outside (the wire, a user) that breaks the
//! rules of its type. Parsed once at the edge; the machines only ever see valid values.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A backup id that is empty, too long, starts with a dot or holds a character outside
    /// `[A-Za-z0-9._:-]`; it holds the id quoted and clipped (`text::clip`).
    #[error("invalid backup id {0}: use 1 to 128 of A-Z a-z 0-9 . _ : - (not starting with '.')")]
    InvalidBackupId(String),
    /// A freeze token with the same faults.
    #[error("invalid freeze token {0}: use 1 to 128 of A-Z a-z 0-9 . _ : -")]
    InvalidFreezeToken(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
