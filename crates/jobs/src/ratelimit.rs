//! QEMU's rate limiter: time is cut into 100 ms slices with a quota of
//! `speed / 10` bytes each; a caller asks for the delay before its next chunk, and
//! bytes beyond the quota stretch the current slice.

use std::time::{Duration, Instant};

/// Length of one slice.
pub const SLICE: Duration = Duration::from_millis(100);

/// A rate limiter in bytes per second (0 = unlimited).
#[derive(Debug, Clone)]
pub struct RateLimit {
    speed: u64,
    quota: u64,
    slice_start: Instant,
    slice_end: Instant,
    dispatched: u64,
}

impl RateLimit {
    /// A limiter at `speed` bytes/s.
    pub fn new(speed: u64) -> Self {
        let now = Instant::now();
        let mut r = RateLimit {
            speed: 0,
            quota: 0,
            slice_start: now,
            slice_end: now,
            dispatched: 0,
        };
        r.set_speed(speed);
        r
    }

    /// Changes the speed; takes effect for the next request.
    pub fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
        self.quota = (speed / 10).max(1);
    }

    /// The current speed.
    pub fn speed(&self) -> u64 {
        self.speed
    }

    /// Accounts `n` bytes and returns how long to wait before sending more.
    pub fn calculate_delay(&mut self, n: u64) -> Duration {
        self.calculate_delay_at(n, Instant::now())
    }

    /// [`RateLimit::calculate_delay`] at a given instant (for tests).
    pub fn calculate_delay_at(&mut self, n: u64, now: Instant) -> Duration {
        if self.speed == 0 {
            return Duration::ZERO;
        }
        if self.slice_end < now {
            self.slice_start = now;
            self.slice_end = now + SLICE;
            self.dispatched = 0;
        }
        self.dispatched += n;
        if self.dispatched < self.quota {
            return Duration::ZERO;
        }
        let slices = self.dispatched as f64 / self.quota as f64;
        self.slice_end = self.slice_start + SLICE.mul_f64(slices);
        self.slice_end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_chunk_passes_then_waits() {
        let mut r = RateLimit::new(1 << 20);
        let t0 = Instant::now();
        assert_eq!(r.calculate_delay_at(0, t0), Duration::ZERO);
        // 1 MiB at 1 MiB/s is ten slices' quota: the next request waits about a second.
        r.calculate_delay_at(1 << 20, t0);
        let d = r.calculate_delay_at(0, t0);
        assert!(
            d >= Duration::from_millis(990) && d <= Duration::from_millis(1010),
            "{d:?}"
        );
    }

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimit::new(0);
        assert_eq!(r.calculate_delay(u64::MAX / 2), Duration::ZERO);
    }
}
