//! Helpers for tests (and nothing else) that start servers as separate processes.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// A free loopback TCP port for a server that a test starts as another process.
///
/// Why not bind port 0 and pass its number on: the kernel picks port 0 from the ephemeral
/// range, the same range it draws every outgoing connection's source port from, so in a busy
/// test run some client connection can take the port between our probe closing it and the child
/// binding it ("Address already in use"). These ports come from just below the ephemeral range,
/// where the kernel never hands out source ports, each at most once per process, and are
/// checked free when handed out.
pub fn spare_loopback_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = ephemeral_low();
    let low = 10_000u32;
    if ephemeral_low <= low + 1_000 {
        return any_free_port();
    }
    let span = ephemeral_low - low;
    // Processes running at the same time start far apart from each other.
    let start = std::process::id().wrapping_mul(7_919) % span;
    loop {
        let taken = NEXT.fetch_add(1, Ordering::Relaxed);
        if taken >= span {
            return any_free_port();
        }
        let port = u16::try_from(low + (start + taken) % span).unwrap_or(0);
        if port != 0 && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768)
}

fn any_free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|socket| socket.local_addr())
        .map(|addr| addr.port())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| spare_loopback_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice: {ports:?}");
        for port in ports {
            assert!(u32::from(port) < ephemeral_low(), "port {port} is in the ephemeral range");
            TcpListener::bind(("127.0.0.1", port)).expect("a handed-out port is free");
        }
    }
}
