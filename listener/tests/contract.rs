//! The contract backup software builds on, against the real listener served in-process over
//! loopback mutual TLS with scripted agents (`stillpoint_listener::testing`): one module per
//! promise.

#[path = "contract/health.rs"]
mod health;
