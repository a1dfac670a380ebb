//! The stillpoint agent binary.
fn main() {}
