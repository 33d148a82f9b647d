//! Exponential backoff with jitter, shared by the producer's retries and the consumer's
//! reconnects.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Exponential backoff: `initial`, doubling per attempt up to `max`, each delay scaled by a
/// random factor in `[0.8, 1.2)` so that many clients failing together do not retry together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let base = self.initial.saturating_mul(1u32 << exp).min(self.max);
        // std's RandomState is randomly keyed per process and per instance: enough entropy for
        // jitter without a dependency.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let factor = 0.8 + 0.4 * ((r >> 11) as f64 / (1u64 << 53) as f64);
        base.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let d1 = b.delay(1);
        assert!(
            d1 >= Duration::from_millis(80) && d1 < Duration::from_millis(120),
            "{d1:?}"
        );
        let d3 = b.delay(3);
        assert!(
            d3 >= Duration::from_millis(320) && d3 < Duration::from_millis(480),
            "{d3:?}"
        );
        let d = b.delay(1000);
        assert!(
            d >= Duration::from_millis(800) && d < Duration::from_millis(1200),
            "{d:?}"
        );
    }
}
