//! Rate limits: a token bucket per SPIFFE ID, and per SPIFFE ID × model/tool. The settings
//! come from the proxy's configuration, or from the signed policy bundle when it carries
//! `rate_limits` (same keys).
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::ResourceRateLimit;

/// What the limits are: the configuration keys `rate_limit_per_sec`, `rate_limit_burst` and
/// `[[resource_rate_limits]]`, also the shape of a policy bundle's `rate_limits`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Requests per second per identity (0 = unlimited).
    #[serde(default)]
    pub rate_limit_per_sec: f64,
    /// Burst per identity.
    #[serde(default = "default_burst")]
    pub rate_limit_burst: f64,
    /// Per identity × model/tool.
    #[serde(default)]
    pub resource_rate_limits: Vec<ResourceRateLimit>,
}

fn default_burst() -> f64 {
    20.0
}

impl LimitSettings {
    /// Checks the values; `Err((key, message))`.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if !(self.rate_limit_per_sec >= 0.0 && self.rate_limit_per_sec.is_finite()) {
            return Err(("rate_limit_per_sec", "must be a number >= 0"));
        }
        if !(self.rate_limit_burst >= 1.0 && self.rate_limit_burst.is_finite()) {
            return Err(("rate_limit_burst", "must be a number >= 1"));
        }
        let key = "resource_rate_limits";
        let mut seen = std::collections::HashSet::new();
        for l in &self.resource_rate_limits {
            if !matches!(l.resource_type.as_str(), "Model" | "Tool") {
                return Err((key, "resource_type must be Model or Tool"));
            }
            if l.resource_id.is_empty() {
                return Err((key, "resource_id must not be empty"));
            }
            if !(l.per_sec > 0.0 && l.per_sec.is_finite()) {
                return Err((key, "per_sec must be a number > 0"));
            }
            if !(l.burst >= 1.0 && l.burst.is_finite()) {
                return Err((key, "burst must be a number >= 1"));
            }
            if !seen.insert((&l.resource_type, &l.resource_id)) {
                return Err((key, "a resource is listed twice"));
            }
        }
        Ok(())
    }

    /// The settings of a policy bundle's `rate_limits` value, checked.
    pub fn from_bundle(v: &serde_json::Value) -> Result<Self, BundleLimitsError> {
        // serde would also read a struct from an array of its fields in order: only a table.
        if !v.is_object() {
            return Err(BundleLimitsError::NotATable);
        }
        let s: Self = serde_json::from_value(v.clone()).map_err(BundleLimitsError::Malformed)?;
        s.validate()
            .map_err(|(key, message)| BundleLimitsError::Invalid { key, message })?;
        Ok(s)
    }
}

/// Why a policy bundle's `rate_limits` value was refused (and the bundle with it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleLimitsError {
    /// Not a table (serde would read an array of the fields in order; that is refused).
    #[error(
        "rate_limits: must be a table of rate_limit_per_sec, rate_limit_burst, resource_rate_limits"
    )]
    NotATable,
    /// A table that does not read as the settings (an unknown key, a wrong type).
    #[error("rate_limits: {0}")]
    Malformed(serde_json::Error),
    /// Settings that read but do not check: `key` is the setting at fault.
    #[error("rate_limits: {key}: {message}")]
    Invalid {
        key: &'static str,
        message: &'static str,
    },
}

/// The limiters in force; swapped whole when the settings change.
pub struct Limits {
    pub settings: LimitSettings,
    pub per_identity: RateLimiter,
    /// Keyed by (resource type, resource id).
    pub resources: HashMap<(String, String), RateLimiter>,
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            per_identity: RateLimiter::new(settings.rate_limit_per_sec, settings.rate_limit_burst),
            resources: settings
                .resource_rate_limits
                .iter()
                .map(|l| {
                    (
                        (l.resource_type.clone(), l.resource_id.clone()),
                        RateLimiter::new(l.per_sec, l.burst),
                    )
                })
                .collect(),
            settings,
        }
    }
}

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
        self.take(who, 1, now)
    }

    /// Takes `n` tokens for `who` at `now` (a JSON-RPC batch costs one per call), all or
    /// none; `Err(wait)` if fewer are left (more than the burst never fit: refused).
    pub fn take(&self, who: &str, n: usize, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 || n == 0 {
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
        // A known caller's bucket is found without copying its name (every request).
        let (tokens, at) = match map.get_mut(who) {
            Some(b) => b,
            None => map.entry(who.to_owned()).or_insert((self.burst, now)),
        };
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        // Bounded by the burst (at most 100,000 calls fit a body); exact in f64.
        let n = n as f64;
        if *tokens >= n {
            *tokens -= n;
            Ok(())
        } else {
            let short = (n.min(self.burst) - *tokens).max(0.0);
            Err(Duration::from_secs_f64(short / self.rate).max(Duration::from_millis(1)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_settings_are_checked() {
        let ok = serde_json::json!({
            "rate_limit_per_sec": 5,
            "resource_rate_limits": [{"resource_type": "Tool", "resource_id": "t", "per_sec": 1}]
        });
        let s = LimitSettings::from_bundle(&ok).unwrap();
        assert_eq!((s.rate_limit_per_sec, s.rate_limit_burst), (5.0, 20.0));
        let l = Limits::new(s);
        assert!(
            l.resources
                .contains_key(&("Tool".to_owned(), "t".to_owned()))
        );
        for bad in [
            serde_json::json!({"rate_limit_per_sec": -1}),
            serde_json::json!({"rate_limit_burst": 0}),
            serde_json::json!({"resource_rate_limits": [{"resource_type": "Model", "resource_id": "m", "per_sec": 0}]}),
        ] {
            assert!(
                matches!(
                    LimitSettings::from_bundle(&bad),
                    Err(BundleLimitsError::Invalid { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            LimitSettings::from_bundle(&serde_json::json!({"unknown": 1})),
            Err(BundleLimitsError::Malformed(_))
        ));
        assert!(matches!(
            LimitSettings::from_bundle(&serde_json::json!([1])),
            Err(BundleLimitsError::NotATable)
        ));
    }

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
        // A batch takes one token per call, all or none.
        let t2 = t1 + Duration::from_secs(10);
        assert!(rl.take("a", 4, t2).is_err(), "more than the burst");
        rl.take("a", 2, t2).unwrap();
        assert!(rl.take("a", 2, t2).is_err(), "one left, two asked");
        rl.take("a", 1, t2).unwrap();
        // Unlimited when rate is 0.
        let off = RateLimiter::new(0.0, 0.0);
        for _ in 0..1000 {
            off.check("a", t0).unwrap();
        }
    }
}
