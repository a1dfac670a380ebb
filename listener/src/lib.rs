//! The stillpoint listener library.
