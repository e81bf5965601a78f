//! A token bucket driven by the caller's clock: the ICMP error limit and the drop watch's
//! per-reason sample limit.
//!
//! The forwarding core never reads the clock (quinn-proto's rule): the shell that owns a
//! bucket calls [`TokenBucket::tick`] with the time in milliseconds, and [`TokenBucket::take`]
//! is one atomic operation, so the hot path takes no lock and the behaviour is the same in a
//! test that passes made-up times.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// `burst` tokens at most, refilled at `rate` per second as [`tick`](Self::tick) reports time.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u32,
    burst: u32,
    tokens: AtomicU32,
    /// The time up to which refills were credited, in ms (`u64::MAX`: never ticked).
    credited_ms: AtomicU64,
}

impl TokenBucket {
    /// A full bucket.
    pub const fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: AtomicU32::new(burst),
            credited_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// Credits the tokens earned up to `now_ms` (the caller's monotonic clock). The first tick
    /// only sets the clock. Time that has not yet earned a whole token is kept for the next
    /// tick, so ticking often loses nothing; a reading from before the last one earns nothing.
    pub fn tick(&self, now_ms: u64) {
        let last = self.credited_ms.load(Relaxed);
        if last == u64::MAX {
            let _ = self
                .credited_ms
                .compare_exchange(u64::MAX, now_ms, Relaxed, Relaxed);
            return;
        }
        if self.rate == 0 {
            return;
        }
        let elapsed = now_ms.saturating_sub(last);
        let earned = elapsed.saturating_mul(u64::from(self.rate)) / 1000;
        if earned == 0 {
            return;
        }
        // Credit exactly the time those tokens took, and only once if ticks race.
        let spent = earned * 1000 / u64::from(self.rate);
        if self
            .credited_ms
            .compare_exchange(last, last + spent, Relaxed, Relaxed)
            .is_err()
        {
            return;
        }
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        let _ = self.tokens.fetch_update(Relaxed, Relaxed, |n| {
            Some(n.saturating_add(earned).min(self.burst))
        });
    }

    /// Takes a token if there is one. Under a flood (none left) this is one relaxed load.
    #[inline]
    pub fn take(&self) -> bool {
        self.tokens.load(Relaxed) != 0
            && self
                .tokens
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }

    /// Tokens left now.
    pub fn available(&self) -> u32 {
        self.tokens.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(b: &TokenBucket) -> usize {
        (0..1000).take_while(|_| b.take()).count()
    }

    #[test]
    fn a_burst_then_the_rate_and_never_more_than_the_burst() {
        let b = TokenBucket::new(1000, 50);
        assert_eq!(drain(&b), 50, "starts full");
        b.tick(1_000);
        assert_eq!(drain(&b), 0, "the first tick only sets the clock");
        b.tick(1_010);
        assert_eq!(drain(&b), 10, "10 ms at 1000/s");
        b.tick(6_010);
        assert_eq!(drain(&b), 50, "five seconds fill the burst, no more");
        // A reading from the past earns nothing.
        b.tick(1_500);
        assert_eq!(drain(&b), 0);
    }

    #[test]
    fn frequent_ticks_lose_no_time() {
        // 20 per second: a token every 50 ms; ticks every 7 ms must still earn them all.
        let b = TokenBucket::new(20, 20);
        drain(&b);
        b.tick(0);
        for t in (7..=1_001).step_by(7) {
            b.tick(t);
        }
        assert_eq!(drain(&b), 20, "one second at 20/s");
        assert_eq!(b.available(), 0);
    }
}
