//! Shared pieces of the end-to-end tests: the causal workload's record format and checker. The
//! `Cluster` harness lives with the tests in `e2e/`.

pub mod records;
