//! The stillpoint agent library.
