//! E-mail over SMTP to the local MTA (Postfix), with lettre's async transport and its
//! connection pool.
//!
//! The Message-ID is `<MAILID@DOMAIN>` ([`crate::ids::message_id`]): Postfix logs it
//! (`cleanup: QID: message-id=<...>`), which is how the bounces processor maps queue ids back
//! to our mails, and a receiver can deduplicate on it. Postfix's queue id is read from the
//! DATA reply (`250 2.0.0 Ok: queued as QID`, lettre's `Response::message()`).
//!
//! The transport speaks plain SMTP to `127.0.0.1` by default (the MTA is on the same host or
//! LAN, as in seed 000); `tls = "starttls"` requires STARTTLS with rustls (ring) and the
//! webpki roots.

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart, header};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};

use super::Outcome;
use crate::events::OutgoingMail;
use crate::ids::message_id;
use crate::postfix::parse::queued_as;

/// SMTP settings (config `[smtp]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// MTA host.
    pub host: String,
    /// MTA port.
    pub port: u16,
    /// `From:` (and envelope sender), `Name <addr>` or `addr`.
    pub from: String,
    /// Domain of our Message-IDs (`<MAILID@domain>`).
    pub message_id_domain: String,
    /// Pooled connections at most.
    pub pool_max: u32,
    /// Per-command timeout, ms.
    pub timeout_ms: u64,
    /// `none` or `starttls`.
    pub tls: String,
    /// Sends in flight at once (each on its own pooled connection, so keep `pool_max` at
    /// least this).
    pub max_in_flight: u32,
    /// Attempts of one mail in all (4xx, connection failures) before it is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the first retry, ms; doubles per attempt.
    pub retry_initial_ms: u64,
    /// Longest delay between retries, ms.
    pub retry_max_ms: u64,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host: "127.0.0.1".into(),
            port: 25,
            from: "BestPrice deals <deals@localhost>".into(),
            message_id_domain: "deals.spool.local".into(),
            pool_max: 8,
            timeout_ms: 10_000,
            tls: "none".into(),
            max_in_flight: 8,
            max_attempts: 6,
            retry_initial_ms: 1_000,
            retry_max_ms: 60_000,
        }
    }
}

impl SmtpConfig {
    /// The delay before attempt `attempt + 1` after attempt `attempt` (1-based) failed.
    pub fn retry_delay_ms(&self, attempt: u32) -> u64 {
        super::backoff_ms(self.retry_initial_ms, self.retry_max_ms, attempt)
    }
}

/// A bad SMTP configuration.
#[derive(Debug, thiserror::Error)]
pub enum SmtpConfigError {
    /// `from` does not parse.
    #[error("smtp.from {0:?}: {1}")]
    From(String, lettre::address::AddressError),
    /// TLS setup.
    #[error("smtp.tls: {0}")]
    Tls(String),
}

/// Sends [`OutgoingMail`] over a pooled async SMTP transport.
#[derive(Clone)]
pub struct SmtpSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    domain: String,
}

impl std::fmt::Debug for SmtpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSender")
            .field("from", &self.from)
            .field("domain", &self.domain)
            .finish()
    }
}

impl SmtpSender {
    /// A sender for `cfg` (connects lazily). Call it inside a Tokio runtime (the pool runs a
    /// cleanup task), and drop it there too.
    pub fn new(cfg: &SmtpConfig) -> Result<SmtpSender, SmtpConfigError> {
        let from: Mailbox = cfg
            .from
            .parse()
            .map_err(|e| SmtpConfigError::From(cfg.from.clone(), e))?;
        let tls = match cfg.tls.as_str() {
            "none" => Tls::None,
            "starttls" => {
                crate::install_crypto_provider();
                Tls::Required(
                    TlsParameters::new(cfg.host.clone())
                        .map_err(|e| SmtpConfigError::Tls(e.to_string()))?,
                )
            }
            other => {
                return Err(SmtpConfigError::Tls(format!(
                    "{other:?} is not none|starttls"
                )));
            }
        };
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(cfg.host.as_str())
            .port(cfg.port)
            .tls(tls)
            .timeout(Some(Duration::from_millis(cfg.timeout_ms)))
            .pool_config(PoolConfig::new().max_size(cfg.pool_max.max(1)))
            .build();
        Ok(SmtpSender {
            transport,
            from,
            domain: cfg.message_id_domain.clone(),
        })
    }

    /// Builds the MIME message (text and HTML alternatives) for a mail.
    pub fn message(&self, mail: &OutgoingMail) -> Result<Message, String> {
        let to: Mailbox = mail
            .to
            .parse()
            .map_err(|e| format!("recipient {:?}: {e}", mail.to))?;
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .message_id(Some(format!(
                "<{}>",
                message_id(&mail.mail_id, &self.domain)
            )))
            .raw_header(header::HeaderValue::new(
                header::HeaderName::new_from_ascii_str("X-Notification-Id"),
                mail.notification.clone(),
            ))
            .multipart(MultiPart::alternative_plain_html(
                mail.text.clone(),
                mail.html.clone(),
            ))
            .map_err(|e| format!("building the message: {e}"))
    }

    /// One attempt to hand `mail` to the MTA.
    pub async fn send(&self, mail: &OutgoingMail) -> Outcome {
        let msg = match self.message(mail) {
            Ok(m) => m,
            Err(e) => return Outcome::Dead(e),
        };
        match self.transport.send(msg).await {
            Ok(resp) => {
                let lines: Vec<&str> = resp.message().collect();
                Outcome::Delivered {
                    queue_id: queued_as(lines.iter().copied()),
                    detail: format!("{} {}", resp.code(), lines.join(" ")),
                }
            }
            Err(e) if e.is_permanent() => Outcome::Dead(format!("smtp: {e}")),
            // 4xx, connection refused/reset, timeouts, TLS hiccups: all worth another try.
            Err(e) => Outcome::Retry(format!("smtp: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::NotificationKind;

    fn mail(to: &str) -> OutgoingMail {
        OutgoingMail {
            mail_id: "0123abcd".into(),
            notification: "0123abcd".into(),
            user: "u1".into(),
            to: to.into(),
            subject: "Deal: ünïcode".into(),
            text: "text body".into(),
            html: "<p>html body</p>".into(),
            kind: NotificationKind::DealAlert,
            at_ms: 0,
        }
    }

    #[tokio::test]
    async fn message_has_our_id_and_both_parts() {
        let s = SmtpSender::new(&SmtpConfig {
            message_id_domain: "d.test".into(),
            ..SmtpConfig::default()
        })
        .unwrap();
        let m = s.message(&mail("alice@localhost")).unwrap();
        let raw = String::from_utf8(m.formatted()).unwrap();
        assert!(raw.contains("Message-ID: <0123abcd@d.test>"), "{raw}");
        assert!(raw.contains("X-Notification-Id: 0123abcd"));
        assert!(raw.contains("multipart/alternative"));
        assert!(raw.contains("text/html"));
        assert!(raw.contains("To: alice@localhost"));
    }

    #[tokio::test]
    async fn bad_addresses_are_dead_letters() {
        let s = SmtpSender::new(&SmtpConfig::default()).unwrap();
        let out = s.send(&mail("not an address")).await;
        assert!(
            matches!(out, Outcome::Dead(ref e) if e.contains("recipient")),
            "{out:?}"
        );
        assert!(
            SmtpSender::new(&SmtpConfig {
                from: "@@".into(),
                ..SmtpConfig::default()
            })
            .is_err()
        );
        assert!(
            SmtpSender::new(&SmtpConfig {
                tls: "ssl3".into(),
                ..SmtpConfig::default()
            })
            .is_err()
        );
    }

    #[tokio::test]
    async fn connection_refused_is_retried() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = SmtpSender::new(&SmtpConfig {
            port,
            timeout_ms: 2_000,
            ..SmtpConfig::default()
        })
        .unwrap();
        let out = s.send(&mail("alice@localhost")).await;
        assert!(matches!(out, Outcome::Retry(_)), "{out:?}");
    }
}
