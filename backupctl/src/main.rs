//! backupctl binary.
fn main() {}
