//! Per-destination pacing: token buckets for requests/s and events/s, and a
//! throttle that a 429 (or a vendor's throttle code) tightens until requests
//! succeed again.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;

use super::config::RateLimitSettings;

/// How much a burst of 429s may slow the request rate down.
const MAX_SLOWDOWN: u32 = 16;
/// The pause after a 429 that carries no Retry-After.
const DEFAULT_THROTTLE_PAUSE: Duration = Duration::from_secs(1);

struct Bucket {
    limiter: DefaultDirectRateLimiter,
    burst: NonZeroU32,
}

impl Bucket {
    fn new(per_second: NonZeroU32, burst: u32) -> Bucket {
        let burst = NonZeroU32::new(burst.max(per_second.get())).unwrap_or(per_second);
        Bucket {
            limiter: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
            burst,
        }
    }

    async fn take(&self, n: u32) {
        let n = NonZeroU32::new(n.min(self.burst.get())).unwrap_or(NonZeroU32::MIN);
        // `n` never exceeds the burst, so capacity is always sufficient.
        let _ = self.limiter.until_n_ready(n).await;
    }
}

pub struct Pace {
    requests: Option<Bucket>,
    events: Option<Bucket>,
    blocked_until: Mutex<Option<Instant>>,
    /// Each request costs this many request tokens; doubles on a throttle
    /// signal and halves on success.
    slowdown: AtomicU32,
}

impl Pace {
    pub fn new(settings: &RateLimitSettings, batch_max_events: usize) -> Pace {
        Pace {
            requests: settings
                .requests_per_second
                .map(|r| Bucket::new(r, MAX_SLOWDOWN)),
            events: settings
                .events_per_second
                .map(|r| Bucket::new(r, u32::try_from(batch_max_events).unwrap_or(u32::MAX))),
            blocked_until: Mutex::new(None),
            slowdown: AtomicU32::new(1),
        }
    }

    /// Waits until a request with `events` events may go out.
    pub async fn acquire(&self, events: usize) {
        loop {
            let until = *self.blocked_until.lock().expect("pace lock");
            match until {
                Some(u) if u > Instant::now() => tokio::time::sleep_until(u).await,
                _ => break,
            }
        }
        if let Some(r) = &self.requests {
            r.take(self.slowdown.load(Ordering::Relaxed)).await;
        }
        if let Some(e) = &self.events {
            e.take(u32::try_from(events).unwrap_or(u32::MAX)).await;
        }
    }

    /// The vendor said "slow down": nobody sends before `after` has passed.
    pub fn throttled(&self, after: Option<Duration>) {
        let until = Instant::now() + after.unwrap_or(DEFAULT_THROTTLE_PAUSE);
        let mut b = self.blocked_until.lock().expect("pace lock");
        *b = Some(b.map_or(until, |old| old.max(until)));
        let _ = self
            .slowdown
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((s * 2).min(MAX_SLOWDOWN))
            });
    }

    pub fn succeeded(&self) {
        let _ = self
            .slowdown
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some((s / 2).max(1))
            });
    }

    pub fn slowdown(&self) -> u32 {
        self.slowdown.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_throttle_blocks_everyone_for_retry_after() {
        let pace = Pace::new(&RateLimitSettings::default(), 10);
        let t0 = Instant::now();
        pace.acquire(1).await;
        assert!(t0.elapsed() < Duration::from_millis(50));
        pace.throttled(Some(Duration::from_millis(300)));
        pace.throttled(Some(Duration::from_millis(100)));
        pace.acquire(1).await;
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(pace.slowdown(), 4);
        pace.succeeded();
        pace.succeeded();
        pace.succeeded();
        assert_eq!(pace.slowdown(), 1);
    }

    #[test]
    fn slowdown_costs_more_request_tokens() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let settings = RateLimitSettings {
                requests_per_second: NonZeroU32::new(50),
                events_per_second: None,
            };
            let pace = Pace::new(&settings, 10);
            // Drain the burst, then time 10 requests at full pace and slowed down.
            for _ in 0..50 {
                pace.acquire(1).await;
            }
            let t = std::time::Instant::now();
            for _ in 0..10 {
                pace.acquire(1).await;
            }
            let normal = t.elapsed();
            pace.slowdown.store(4, Ordering::Relaxed);
            let t = std::time::Instant::now();
            for _ in 0..10 {
                pace.acquire(1).await;
            }
            let slow = t.elapsed();
            assert!(normal >= Duration::from_millis(150), "{normal:?}");
            assert!(slow >= normal * 3, "{slow:?} vs {normal:?}");
        });
    }
}
