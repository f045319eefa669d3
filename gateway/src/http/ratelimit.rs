//! Rate limits on pushes: per device token (a provider flooding one device) and per provider team. The
//! caller chooses the key; the device limit is keyed by what an opened token names, never by its text.
//!
//! Each is a token bucket: `burst` pushes at once, refilled at `per_sec`. A push over either limit is
//! answered 429 `TooManyRequests` and counted in `courier_gateway_rate_limited_total{scope}`. Buckets
//! live in this gateway's memory only: with N gateways behind a load balancer a device can receive up to
//! N times the rate, which is the trade a stateless gateway makes. The tables are bounded; when one is
//! full, buckets that have refilled completely (idle keys) are forgotten, and if none has, the whole
//! table is, which errs towards letting pushes through.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

use courier_core::rate::TokenBucket;

/// Keys one limiter tracks at most.
const MAX_KEYS: usize = 100_000;

/// A limit: `burst` at once, `per_sec` sustained. `per_sec == 0` turns it off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub per_sec: f64,
    pub burst: f64,
}

/// Token buckets keyed by `K`.
pub struct RateLimiter<K> {
    limit: Limit,
    /// The label of `courier_gateway_rate_limited_total` this limiter counts under.
    scope: &'static str,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(scope: &'static str, limit: Limit) -> Self {
        RateLimiter { limit, scope, buckets: Mutex::new(HashMap::new()) }
    }

    pub fn enabled(&self) -> bool {
        self.limit.per_sec > 0.0
    }

    /// Takes one push from `key`'s bucket at `now`; false when the bucket is empty.
    pub fn admit(&self, key: &K, now: Instant) -> bool {
        if !self.enabled() {
            return true;
        }
        let Limit { per_sec, burst } = self.limit;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            buckets.retain(|_, b| !b.is_full(now));
            if buckets.len() >= MAX_KEYS {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key.clone()).or_insert_with(|| TokenBucket::new(burst, per_sec, now));
        if bucket.take(now) {
            true
        } else {
            metrics::counter!("courier_gateway_rate_limited_total", "scope" => self.scope).increment(1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::new("device", Limit { per_sec: 10.0, burst: 3.0 });
        let t = Instant::now();
        assert!((0..3).all(|_| limiter.admit(&1u32, t)));
        assert!(!limiter.admit(&1u32, t));
        assert!(limiter.admit(&2u32, t), "another key has its own bucket");
        assert!(limiter.admit(&1u32, t + Duration::from_millis(100)));
        assert!(!limiter.admit(&1u32, t + Duration::from_millis(100)));
        assert!((0..3).all(|_| limiter.admit(&1u32, t + Duration::from_secs(60))), "refills up to the burst");
        assert!(!limiter.admit(&1u32, t + Duration::from_secs(60)));
    }

    #[test]
    fn zero_rate_is_off() {
        let limiter = RateLimiter::new("team", Limit { per_sec: 0.0, burst: 0.0 });
        assert!((0..10_000).all(|_| limiter.admit(&"team", Instant::now())));
    }
}
