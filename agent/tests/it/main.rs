//! The agent's integration tests: the real gRPC service in-process over loopback mutual TLS,
//! on the mock SAN and on real XFS and btrfs loop filesystems. One binary, a module per area.

mod bin;
mod copy;
mod fs;
mod grpc;
mod guardian;
mod mariadb;
mod mysql;
mod postgres;
mod process;
mod providers;
mod qcow2_cbt;
mod redis;
mod sqlite;
mod support;
