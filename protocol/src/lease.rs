//! The freeze lease: how long an agent may stay frozen waiting for Commit. Pure arithmetic on
//! monotonic milliseconds that the caller passes in; the timer that acts on it lives in
//! `backups`.

/// A lease granted at `granted_at` (monotonic ms) for `duration_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub granted_at: u64,
    pub duration_ms: u64,
}

impl Lease {
    pub fn new(granted_at: u64, duration_ms: u64) -> Lease {
        Lease { granted_at, duration_ms }
    }

    /// The monotonic millisecond at which the lease runs out.
    pub fn expires_at(&self) -> u64 {
        self.granted_at.saturating_add(self.duration_ms)
    }

    /// True from the expiry instant on: a lease of 1000 ms granted at 0 is expired at 1000.
    pub fn expired(&self, now: u64) -> bool {
        now >= self.expires_at()
    }

    /// Milliseconds left, 0 once expired.
    pub fn remaining(&self, now: u64) -> u64 {
        self.expires_at().saturating_sub(now)
    }
}

#[cfg(test)]
mod tests;
