//! The stillpoint listener binary.
fn main() {}
