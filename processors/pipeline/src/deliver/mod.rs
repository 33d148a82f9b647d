//! Delivering notifications: e-mail over SMTP ([`smtp`]) and webhook/push over HTTP
//! ([`http`]), each call classified into an [`Outcome`] the notifications processor acts on:
//! delivered (record the idempotency key), retry later (the retry topics), or dead (the
//! dead-letter topic).
//!
//! | failure | outcome |
//! | --- | --- |
//! | SMTP 4xx, connection refused/reset, timeout | retry |
//! | SMTP 5xx, an address that does not parse | dead |
//! | HTTP 5xx, 408, 429, connect error, timeout | retry |
//! | HTTP other 4xx and 3xx, a URL that does not parse | dead |

pub mod http;
pub mod inflight;
pub mod smtp;

/// The delay after failed attempt `attempt` (1-based): `initial` doubling per attempt, at most
/// `max`.
pub fn backoff_ms(initial: u64, max: u64, attempt: u32) -> u64 {
    let doublings = attempt.saturating_sub(1).min(32);
    initial.saturating_mul(1u64 << doublings).min(max)
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the next hop.
    Delivered {
        /// Postfix's queue id (SMTP only), from `250 ... queued as QID`.
        queue_id: Option<String>,
        /// The reply (status line or SMTP text).
        detail: String,
    },
    /// A temporary failure: try again later.
    Retry(String),
    /// A permanent failure: dead-letter it.
    Dead(String),
}

impl Outcome {
    /// Whether it was delivered.
    pub fn delivered(&self) -> bool {
        matches!(self, Outcome::Delivered { .. })
    }
}
