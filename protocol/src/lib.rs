//! The stillpoint protocol as pure state machines, free of IO: the listener's [`coordinator`]
//! (one backup's two phases), the [`agent`]'s decisions and its [`lease`], the guardian's
//! [`ledger`], the records they work on ([`model`]), and what held a server's writes ([`hold`]);
//! [`text`] shows a rejected value in a message without echoing all of it.
//! Time is always an argument. The daemons execute what these decide; the simulation
//! (`tests/sim`) and the model check (`listener/tests/model`) drive the same code.
//!
//! No tokio, tonic, prost or filesystem here (a tidy test holds the dependency rule).

pub mod agent;
pub mod coordinator;
pub mod error;
pub mod hold;
pub mod lease;
pub mod ledger;
pub mod model;
pub mod text;
