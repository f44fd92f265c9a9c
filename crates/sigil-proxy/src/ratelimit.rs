//! Rate limits per identity: a token bucket per SPIFFE ID.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets by identity. `rate` tokens per second, at most `burst` saved up.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

/// Most identities tracked before idle (full) buckets are dropped.
const MAX_TRACKED: usize = 100_000;

impl RateLimiter {
    /// A limiter; `rate == 0` means unlimited.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `who` at `now`; `Err(wait)` if none is left.
    pub fn check(&self, who: &str, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        // A poisoned lock only means another request panicked mid-update: fail closed.
        let Ok(mut map) = self.buckets.lock() else {
            return Err(Duration::from_secs(1));
        };
        if map.len() >= MAX_TRACKED && !map.contains_key(who) {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = map.entry(who.to_owned()).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_per_identity() {
        let rl = RateLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            rl.check("a", t0).unwrap();
        }
        let wait = rl.check("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        // Another identity has its own bucket.
        rl.check("b", t0).unwrap();
        // Half a second later one token is back, not two.
        let t1 = t0 + Duration::from_millis(500);
        rl.check("a", t1).unwrap();
        assert!(rl.check("a", t1).is_err());
        // Unlimited when rate is 0.
        let off = RateLimiter::new(0.0, 0.0);
        for _ in 0..1000 {
            off.check("a", t0).unwrap();
        }
    }
}
