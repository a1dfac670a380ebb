//! Notifications: a backup's outcome, a group with no good backup for too long, a missed
//! schedule, as e-mail over SMTP and as webhooks (JSON, `"version": 1`). Shared by the listener
//! and `backupctl`; no gRPC here.
//!
//! `event` the typed events (made from the catalog's record); `render` their subject, text
//! and JSON (pure); `watchdog` the no-good-backup rule (pure, time as an argument);
//! `notifier` the queue with retries that never blocks a caller; `email` and `webhook` deliver.

pub mod config;
pub mod email;
pub mod error;
pub mod event;
pub mod notifier;
pub mod render;
pub mod watchdog;
pub mod webhook;

#[cfg(feature = "testing")]
pub mod testing;

pub use config::{NotifyConfig, On, Period};
pub use error::{Error, Result};
pub use event::{
    BackupReport, DrillResult, Event, Failure, NoGoodBackup, ScheduleMissed, ServerReport,
};
pub use notifier::{send_and_wait, Delivery, Notifier, Workers};
pub use render::Message;
pub use watchdog::Watchdog;

/// A value from config or a peer, quoted and cut short for a message.
fn clip(s: &str) -> String {
    stillpoint_protocol::text::clip(s, 64)
}
