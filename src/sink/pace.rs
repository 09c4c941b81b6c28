//! Per-destination pacing: a requests/s and an events/s limit (GCRA token
//! buckets, a burst of one second's worth), and a throttle that a 429 (or a
//! vendor's throttle code) tightens until requests succeed again.
//!
//! A throttle pauses every request for the vendor's Retry-After (1 s without
//! one), takes away the buckets' saved-up burst (so the pause does not end
//! in a burst), and halves the share of the configured rates used; each
//! successful request gives back an eighth of the full rate (AIMD).
//! Without configured rates only the pause applies.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::config::RateLimitSettings;

/// The lowest share of the configured rates a burst of 429s can lead to.
const MIN_SHARE: f64 = 1.0 / 16.0;
/// The share each successful request gives back.
const RECOVERY_STEP: f64 = 1.0 / 8.0;
/// The pause after a 429 that carries no Retry-After.
const DEFAULT_THROTTLE_PAUSE: Duration = Duration::from_secs(1);

/// The generic cell rate algorithm as a reservation schedule: a request
/// costing `c` units moves the theoretical arrival time `tat` on by `c`
/// intervals and may start once `tat` is at most one burst window ahead.
struct Gcra {
    interval: Duration,
    /// `burst` intervals.
    window: Duration,
    tat: Instant,
}

impl Gcra {
    fn new(per_second: NonZeroU32, burst: u32) -> Gcra {
        let interval = Duration::from_secs(1) / per_second.get();
        Gcra {
            interval,
            window: interval * burst.max(1),
            tat: Instant::now(),
        }
    }

    /// Reserves a slot for `cost` units and returns when it starts.
    fn reserve(&mut self, now: Instant, cost: f64) -> Instant {
        self.tat = self.tat.max(now) + self.interval.mul_f64(cost);
        self.tat.checked_sub(self.window).unwrap_or(now).max(now)
    }

    /// Nothing starts before `until`, and no burst is saved up by then.
    fn hold_until(&mut self, until: Instant) {
        self.tat = self.tat.max(until + self.window - self.interval);
    }
}

struct State {
    requests: Option<Gcra>,
    events: Option<Gcra>,
    blocked_until: Option<Instant>,
    /// The share of the configured rates in use, MIN_SHARE..=1.
    share: f64,
}

pub struct Pace {
    state: Mutex<State>,
}

impl Pace {
    pub fn new(settings: &RateLimitSettings, batch_max_events: usize) -> Pace {
        let burst_events = u32::try_from(batch_max_events).unwrap_or(u32::MAX);
        Pace {
            state: Mutex::new(State {
                requests: settings.requests_per_second.map(|r| Gcra::new(r, r.get())),
                // A full batch must fit in one burst.
                events: settings
                    .events_per_second
                    .map(|r| Gcra::new(r, r.get().max(burst_events))),
                blocked_until: None,
                share: 1.0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a request with `events` events may go out.
    pub async fn acquire(&self, events: usize) {
        loop {
            let (at, reserved) = {
                let mut s = self.lock();
                let now = Instant::now();
                match s.blocked_until {
                    Some(u) if u > now => (u, false),
                    _ => {
                        let share = s.share;
                        let mut start = now;
                        if let Some(r) = &mut s.requests {
                            start = start.max(r.reserve(now, 1.0 / share));
                        }
                        if let Some(e) = &mut s.events {
                            start = start.max(e.reserve(now, events.max(1) as f64 / share));
                        }
                        (start, true)
                    }
                }
            };
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
            // A throttle during the wait holds a reserved request too (its
            // slot is spent: conservative, never faster than the limit).
            let blocked = self
                .lock()
                .blocked_until
                .is_some_and(|u| u > Instant::now());
            if reserved && !blocked {
                return;
            }
        }
    }

    /// The vendor said "slow down": nobody sends before `after` has passed
    /// (at most `max_pause`: the vendor's number pauses the whole
    /// destination, and a year-long or overflowing one must not freeze it;
    /// each event still waits out its own Retry-After), and the rate drops to
    /// half of what it was.
    pub fn throttled(&self, after: Option<Duration>, max_pause: Duration) {
        let mut s = self.lock();
        let pause = after.unwrap_or(DEFAULT_THROTTLE_PAUSE).min(max_pause);
        let until = Instant::now() + pause;
        let until = s.blocked_until.map_or(until, |old| old.max(until));
        s.blocked_until = Some(until);
        s.share = (s.share / 2.0).max(MIN_SHARE);
        if let Some(r) = &mut s.requests {
            r.hold_until(until);
        }
        if let Some(e) = &mut s.events {
            e.hold_until(until);
        }
    }

    pub fn succeeded(&self) {
        let mut s = self.lock();
        s.share = (s.share + RECOVERY_STEP).min(1.0);
    }

    /// The share of the configured rates in use (1 = full speed).
    pub fn share(&self) -> f64 {
        self.lock().share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rps: Option<u32>, eps: Option<u32>) -> RateLimitSettings {
        RateLimitSettings {
            requests_per_second: rps.and_then(NonZeroU32::new),
            events_per_second: eps.and_then(NonZeroU32::new),
        }
    }

    /// Start times of `n` requests of `events` events each, relative to the first.
    async fn starts(pace: &Pace, n: usize, events: usize) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            pace.acquire(events).await;
            out.push(t0.elapsed());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_of_burst_then_the_configured_rate() {
        let pace = Pace::new(&limits(Some(10), None), 100);
        let s = starts(&pace, 30, 1).await;
        assert!(s[9] < Duration::from_millis(1), "burst of 10: {s:?}");
        for w in s[10..].windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_millis(100), "{s:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_per_second_counts_the_events_of_each_request() {
        let pace = Pace::new(&limits(None, Some(100)), 10);
        let s = starts(&pace, 20, 10).await;
        // 100 events of burst, then 10 events every 100 ms.
        assert!(s[9] < Duration::from_millis(1));
        assert_eq!(s[19] - s[10], Duration::from_millis(900));
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_pauses_drops_the_rate_and_success_restores_it() {
        let pace = Pace::new(&limits(Some(10), None), 100);
        starts(&pace, 20, 1).await; // burst spent, at the steady rate
        let t0 = Instant::now();
        pace.throttled(Some(Duration::from_millis(300)), Duration::from_secs(60));
        pace.throttled(Some(Duration::from_millis(100)), Duration::from_secs(60));
        assert_eq!(pace.share(), 0.25);
        // Retry-After (the longer pause) wins; then no burst is left, and a
        // request at a quarter of the rate costs four intervals.
        pace.acquire(1).await;
        assert!(
            t0.elapsed().as_millis().abs_diff(600) <= 2,
            "{:?}",
            t0.elapsed()
        );
        pace.acquire(1).await;
        assert!(
            t0.elapsed().as_millis().abs_diff(1000) <= 2,
            "{:?}",
            t0.elapsed()
        );
        // Each success gives back an eighth: gaps shrink back to 100 ms.
        let mut gaps = Vec::new();
        let mut last = Instant::now();
        for _ in 0..8 {
            pace.succeeded();
            pace.acquire(1).await;
            gaps.push((Instant::now() - last).as_millis());
            last = Instant::now();
        }
        for (gap, want) in gaps.iter().zip([267, 200, 160, 133, 114, 100, 100, 100]) {
            assert!(gap.abs_diff(want) <= 2, "{gaps:?}");
        }
        assert_eq!(pace.share(), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_configured_rates_only_the_pause_applies() {
        let pace = Pace::new(&RateLimitSettings::default(), 10);
        let t0 = Instant::now();
        pace.acquire(1).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        pace.throttled(None, Duration::from_secs(60));
        pace.acquire(1).await;
        pace.acquire(1).await;
        assert_eq!(t0.elapsed(), DEFAULT_THROTTLE_PAUSE);
    }
}
