//! The service's clocks: the wall clock in the API's unit, and the lease clock.

pub use podnet_control_client::clock::now_ms;

/// The service's clock for leases and heartbeats: the wall clock read once at start, then
/// advanced by the monotonic clock.
///
/// Heartbeat times are stored, so they must be Unix times that mean something after a
/// restart; but lease expiry must not follow the wall clock while the service runs. A VM
/// whose clock is stepped forward by NTP after boot would otherwise see every lease lapse at
/// the next sweep and withdraw every node from every agent; a clock stepped back would keep
/// dead nodes in the tables for as long as the step. Between restarts this clock differs from
/// the wall clock by the steps taken since start (slewing moves both alike); a restart
/// re-reads the wall clock and gives every live node a fresh lease anyway.
#[derive(Clone, Copy, Debug)]
pub struct LeaseClock {
    start_ms: u64,
    start: tokio::time::Instant,
}

impl LeaseClock {
    /// A clock that reads `unix_ms` now.
    pub fn starting_at(unix_ms: u64) -> LeaseClock {
        LeaseClock {
            start_ms: unix_ms,
            start: tokio::time::Instant::now(),
        }
    }

    /// Unix milliseconds on this clock.
    pub fn now_ms(&self) -> u64 {
        self.start_ms
            .saturating_add(self.start.elapsed().as_millis() as u64)
    }
}
