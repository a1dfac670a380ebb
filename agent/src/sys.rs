//! The signals the stop quiescer and the guardian send, re-exported from `stillpoint-sys` (where
//! all of the workspace's unsafe code lives) so the agent's call sites name `crate::sys`.
pub use stillpoint_sys::{kill, pidfd_getfd, pidfd_open, pidfd_send_signal, shutdown, Signal};
