//! Rates and the sources they are counted by, shared by the node's device port and the gateway's provider
//! port: `TokenBucket` (a device link's writes, a device's and a team's pushes) and `source_key` (which
//! addresses count as one client).

use std::net::IpAddr;
use std::time::Instant;

/// The key connections are counted under, on the device port and the provider port alike: a whole IPv4
/// address (an IPv4-mapped IPv6 one included), or the /64 of an IPv6 one (what one subscriber usually gets,
/// so that one host cannot claim a fresh address per connection).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// A token bucket: up to `burst` events at once, refilled at `per_sec` events per second. The device link's
/// write limit and the gateway's per-device and per-team push limits are all this bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    burst: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket (a burst below one is one).
    pub fn new(burst: f64, per_sec: f64, now: Instant) -> Self {
        let burst = burst.max(1.0);
        TokenBucket { burst, per_sec: per_sec.max(0.0), tokens: burst, last: now }
    }

    /// The tokens it would hold at `now`.
    fn tokens_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last);
        (self.tokens + elapsed.as_secs_f64() * self.per_sec).min(self.burst)
    }

    /// Whether it has refilled completely by `now` (so forgetting it changes nothing).
    pub fn is_full(&self, now: Instant) -> bool {
        self.tokens_at(now) >= self.burst
    }

    /// Takes one token if there is one; `false` means the event is over the limit.
    pub fn take(&mut self, now: Instant) -> bool {
        self.tokens = self.tokens_at(now);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(3.0, 2.0, start);
        assert!((0..3).all(|_| bucket.take(start)), "the whole burst at once");
        assert!(!bucket.take(start), "nothing beyond the burst");
        assert!(!bucket.take(start + Duration::from_millis(400)), "0.8 tokens is not one");
        assert!(bucket.take(start + Duration::from_millis(500)), "one token after half a second at 2/s");
        assert!(!bucket.take(start + Duration::from_millis(500)));
        let later = start + Duration::from_secs(3600);
        assert!((0..3).all(|_| bucket.take(later)), "refills up to the burst");
        assert!(!bucket.take(later), "but never beyond it");
    }

    #[test]
    fn the_bucket_survives_time_going_backwards_and_zero_rates() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut bucket = TokenBucket::new(1.0, 0.0, start);
        assert!(bucket.take(start - Duration::from_secs(5)));
        assert!(!bucket.take(start + Duration::from_secs(1_000_000)), "a zero rate never refills");
        let mut bucket = TokenBucket::new(0.0, 1.0, start);
        assert!(bucket.take(start), "a burst of 0 still allows one");
    }

    #[test]
    fn a_source_is_an_ipv4_address_or_an_ipv6_64() {
        let key = |ip: &str| source_key(ip.parse().unwrap());
        assert_eq!(key("192.0.2.7"), key("::ffff:192.0.2.7"), "an IPv4-mapped address is its IPv4 address");
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"), "one /64 is one source");
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }
}
