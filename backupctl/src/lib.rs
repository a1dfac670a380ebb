//! backupctl library.
