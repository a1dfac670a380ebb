//! What the listener, the agents and `backupctl` share: identities and mutual TLS, the tower
//! layers that authorize and trace every RPC, the mock SAN array, and (re-exported as `sys`) the
//! syscall wrappers of `stillpoint-sys`. No protocol logic lives here: that is `protocol`.

pub mod certs;
pub mod error;
pub mod identity;
pub mod layers;
pub mod logs;
pub mod metrics;
pub mod preflight;
pub mod san;
pub mod testing;
pub mod tls;

pub use error::{Error, Result};
/// How messages show what a client sent (`clip`); it lives in `protocol`, which depends on no
/// other stillpoint crate, so that the values parsed there report their errors the same way.
pub use stillpoint_protocol::text;
/// The syscall wrappers, re-exported so `stillpoint_core::sys::thaw` keeps working where a crate
/// already depends on `core`; crates that need only syscalls depend on `stillpoint-sys`.
pub use stillpoint_sys as sys;

/// The largest request any control RPC accepts (1 MiB): real ones are a few hundred bytes, and
/// a bigger one is refused before it is decoded.
pub const MAX_CONTROL_MESSAGE: usize = 1 << 20;

/// Milliseconds since the Unix epoch on this host's wall clock, for timestamps shown to people.
pub fn unix_ms() -> i64 {
    let since =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Checks a backup id, server or volume name before it becomes part of a path or a key: 1 to
/// 128 characters of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName { what: what.to_string(), name: text::clip(name, 64) })
    }
}
