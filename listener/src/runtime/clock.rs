//! The listener's clock: Unix time read once at start, advanced by the monotonic clock, so
//! deadlines and the cut never go backwards while the process runs.

use std::time::{Duration, Instant};

use crate::model::Millis;

#[derive(Clone, Copy)]
pub struct Clock {
    unix_at_start: Millis,
    start: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock { unix_at_start: stillpoint_core::unix_ms(), start: Instant::now() }
    }

    pub fn now(&self) -> Millis {
        self.unix_at_start + Millis::try_from(self.start.elapsed().as_millis()).unwrap_or(0)
    }

    /// The tokio instant of a listener-clock instant (for sleeping until a deadline).
    pub fn instant_of(&self, at: Millis) -> tokio::time::Instant {
        let offset = u64::try_from(at - self.unix_at_start).unwrap_or(0);
        tokio::time::Instant::from_std(self.start + Duration::from_millis(offset))
    }
}
