//! Shared pieces of the end-to-end tests: the causal workload's record format and checker, and a
//! chaos TCP proxy. The `Cluster` harness lives with the tests in `e2e/`.

pub mod proxy;
pub mod records;
