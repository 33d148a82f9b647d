//! Webhook and push over HTTP(S) with reqwest (rustls with the ring provider, pooled
//! connections, a connect and a total timeout on every request).
//!
//! Each call is a `POST` of a JSON body with an `Idempotency-Key` header (the notification
//! id), so a receiver can drop the duplicate a crash between its `2xx` and our commit can
//! cause.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Outcome;

/// HTTP settings (config `[http]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Connect timeout, ms.
    pub connect_timeout_ms: u64,
    /// Whole-request timeout, ms.
    pub timeout_ms: u64,
    /// Idle pooled connections per host.
    pub pool_idle_per_host: usize,
    /// Calls in flight at once (webhook and push together).
    pub max_in_flight: u32,
    /// Calls waiting for one of those slots beside the processor's loop; only when this many
    /// wait does reading stop until one starts (backpressure).
    pub max_waiting: u32,
    /// Attempts of one call in all (5xx, 408, 429, timeouts, connect errors) before it is
    /// dead-lettered.
    pub max_attempts: u32,
    /// Delay before the first retry, ms; doubles per attempt.
    pub retry_initial_ms: u64,
    /// Longest delay between retries, ms.
    pub retry_max_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connect_timeout_ms: 2_000,
            timeout_ms: 5_000,
            pool_idle_per_host: 16,
            max_in_flight: 8,
            max_waiting: 256,
            max_attempts: 6,
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
        }
    }
}

impl HttpConfig {
    /// The delay before attempt `attempt + 1`.
    pub fn retry_delay_ms(&self, attempt: u32) -> u64 {
        super::backoff_ms(self.retry_initial_ms, self.retry_max_ms, attempt)
    }
}

/// Posts JSON notifications.
#[derive(Debug, Clone)]
pub struct HttpSender {
    client: reqwest::Client,
}

impl HttpSender {
    /// A sender with `cfg`'s timeouts.
    pub fn new(cfg: &HttpConfig) -> Result<HttpSender, reqwest::Error> {
        crate::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .pool_max_idle_per_host(cfg.pool_idle_per_host)
            .user_agent(concat!("spool-notifications/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpSender { client })
    }

    /// One attempt to POST `body` to `url`.
    pub async fn post(
        &self,
        url: &str,
        body: &serde_json::Value,
        idempotency_key: &str,
    ) -> Outcome {
        let url = match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => u,
            Ok(u) => {
                return Outcome::Dead(format!("url {url:?}: scheme {} is not http(s)", u.scheme()));
            }
            Err(e) => return Outcome::Dead(format!("url {url:?}: {e}")),
        };
        let resp = self
            .client
            .post(url)
            .header("Idempotency-Key", idempotency_key)
            .json(body)
            .send()
            .await;
        match resp {
            Ok(r) => classify(r.status()),
            Err(e) if e.is_builder() => Outcome::Dead(format!("http: {e}")),
            Err(e) => Outcome::Retry(format!("http: {e}")),
        }
    }
}

/// The outcome of a response status.
pub fn classify(status: reqwest::StatusCode) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        Outcome::Delivered {
            queue_id: None,
            detail: status.to_string(),
        }
    } else if status.is_server_error() || code == 408 || code == 429 {
        Outcome::Retry(format!("http {status}"))
    } else {
        Outcome::Dead(format!("http {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        use reqwest::StatusCode as S;
        assert!(classify(S::OK).delivered());
        assert!(classify(S::NO_CONTENT).delivered());
        for s in [
            S::INTERNAL_SERVER_ERROR,
            S::BAD_GATEWAY,
            S::SERVICE_UNAVAILABLE,
            S::REQUEST_TIMEOUT,
            S::TOO_MANY_REQUESTS,
        ] {
            assert!(matches!(classify(s), Outcome::Retry(_)), "{s}");
        }
        for s in [S::BAD_REQUEST, S::NOT_FOUND, S::GONE, S::FOUND] {
            assert!(matches!(classify(s), Outcome::Dead(_)), "{s}");
        }
    }

    #[test]
    fn bad_urls_are_dead_and_refused_connections_retried() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let h = HttpSender::new(&HttpConfig::default()).unwrap();
        let body = serde_json::json!({"text": "x"});
        assert!(matches!(
            rt.block_on(h.post("not a url", &body, "k")),
            Outcome::Dead(_)
        ));
        assert!(matches!(
            rt.block_on(h.post("ftp://x/", &body, "k")),
            Outcome::Dead(_)
        ));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = rt.block_on(h.post(&format!("http://127.0.0.1:{port}/hook"), &body, "k"));
        assert!(matches!(out, Outcome::Retry(_)), "{out:?}");
    }
}
