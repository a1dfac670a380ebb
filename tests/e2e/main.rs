//! End-to-end tests: a real listener and agents as separate processes over loopback mTLS, driven
//! by the real `backupctl`. One binary, one module per area (STYLE 21).

mod harness;

mod agent_copy;
mod apps;
mod apps_cut;
mod artifacts;
mod catalog_dr;
mod cbt;
mod consistency;
mod failures;
mod faults;
mod hostile;
mod metrics;
mod security;
mod truth;
mod wait;
