//! E-mail over SMTP to the local MTA (Postfix), with lettre's async SMTP connection and a
//! small pool of our own.
//!
//! Why not lettre's transport and pool: they do not set `TCP_NODELAY`, and lettre ends DATA
//! with a separate small write (`\r\n.\r\n`) after the body. Nagle's algorithm holds that
//! write until the MTA acknowledges the body, and the MTA, which has nothing to answer before
//! the final dot, delays that ACK (~40 ms on Linux): every mail waited ~40 ms for nothing
//! (measured: one send at a time reached only ~20 mails/s against a local Postfix). Our pool
//! connects with `TCP_NODELAY`, keeps at most `pool_max` idle connections, and checks one
//! with `NOOP` only when it has been idle a while (lettre checked every reuse: one more round
//! trip per mail).
//!
//! The Message-ID is `<MAILID@DOMAIN>` ([`crate::ids::message_id`]): Postfix logs it
//! (`cleanup: QID: message-id=<...>`), which is how the bounces processor maps queue ids back
//! to our mails, and a receiver can deduplicate on it. Postfix's queue id is read from the
//! DATA reply (`250 2.0.0 Ok: queued as QID`, lettre's `Response::message()`).
//!
//! A reply lost after the final `.` (RFC 1047's window): an attempt whose `250` does not
//! arrive within `timeout_ms`, or whose connection drops while waiting for it, is a
//! [`Outcome::Retry`], but the MTA may have queued the message already, so the retry hands
//! over a second copy (no crash needed; bounded by `max_attempts`). The Message-ID lets a
//! receiver drop it; docs/pipeline.md's duplicate window states it.
//!
//! The transport speaks plain SMTP to `127.0.0.1` by default (the MTA is on the same host or
//! LAN, as in seed 000); `tls = "starttls"` requires STARTTLS with rustls (ring) and the
//! webpki roots.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use lettre::Message;
use lettre::message::{Mailbox, MultiPart, header};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
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
    /// Timeout of one attempt (connecting, or handing one mail over), ms.
    pub timeout_ms: u64,
    /// `none` or `starttls`.
    pub tls: String,
    /// Sends in flight at once (each on its own pooled connection, so keep `pool_max` at
    /// least this).
    pub max_in_flight: u32,
    /// Mails waiting for one of those slots beside the processor's loop (so one slow send
    /// does not stop it reading); only when this many wait does reading stop until one
    /// starts (backpressure).
    pub max_waiting: u32,
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
            max_waiting: 256,
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

/// Sends [`OutgoingMail`] over pooled SMTP connections.
#[derive(Clone)]
pub struct SmtpSender {
    pool: Arc<Pool>,
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
    /// A sender for `cfg` (connects lazily, inside a Tokio runtime).
    pub fn new(cfg: &SmtpConfig) -> Result<SmtpSender, SmtpConfigError> {
        let from: Mailbox = cfg
            .from
            .parse()
            .map_err(|e| SmtpConfigError::From(cfg.from.clone(), e))?;
        let starttls = match cfg.tls.as_str() {
            "none" => None,
            "starttls" => {
                crate::install_crypto_provider();
                Some(
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
        let pool = Arc::new(Pool {
            host: cfg.host.clone(),
            port: cfg.port,
            starttls,
            hello: ClientId::default(),
            timeout: Duration::from_millis(cfg.timeout_ms),
            max_idle: cfg.pool_max.max(1) as usize,
            idle: Mutex::new(Vec::new()),
        });
        Ok(SmtpSender {
            pool,
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
        match self.pool.send(&msg).await {
            Ok(resp) => {
                let lines: Vec<&str> = resp.message().collect();
                Outcome::Delivered {
                    queue_id: queued_as(lines.iter().copied()),
                    detail: format!("{} {}", resp.code(), lines.join(" ")),
                }
            }
            Err(SendError::Smtp(e)) if e.is_permanent() => Outcome::Dead(format!("smtp: {e}")),
            // 4xx, connection refused/reset, timeouts, TLS hiccups: all worth another try.
            Err(e) => Outcome::Retry(format!("smtp: {e}")),
        }
    }
}

/// A connection idle longer than this is checked with `NOOP` before it carries a mail (the
/// MTA may have closed it: Postfix's `smtpd_timeout` is 300 s).
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(5);
/// A connection idle longer than this is closed rather than reused.
const MAX_IDLE: Duration = Duration::from_secs(60);

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("{0}")]
    Smtp(lettre::transport::smtp::Error),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Connections to the MTA: idle ones (at most `max_idle`, the most recently used last), taken
/// by one send at a time; a connection that saw an error is dropped.
struct Pool {
    host: String,
    port: u16,
    starttls: Option<TlsParameters>,
    hello: ClientId,
    timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
}

impl Pool {
    /// One attempt to hand `msg` over, within the timeout.
    async fn send(&self, msg: &Message) -> Result<Response, SendError> {
        let attempt = async {
            let mut c = self.get().await?;
            let r = c.send(msg.envelope(), &msg.formatted()).await;
            // lettre aborts (QUITs) a connection on any error; only a clean one goes back.
            if r.is_ok() && !c.has_broken() {
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                if idle.len() < self.max_idle {
                    idle.push((c, Instant::now()));
                }
            }
            r.map_err(SendError::Smtp)
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .unwrap_or(Err(SendError::Timeout(self.timeout)))
    }

    /// An idle connection that still works, or a new one.
    async fn get(&self) -> Result<AsyncSmtpConnection, SendError> {
        loop {
            let next = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let Some((mut c, since)) = next else { break };
            let idle = since.elapsed();
            if idle < CHECK_AFTER_IDLE || (idle < MAX_IDLE && c.test_connected().await) {
                return Ok(c);
            }
        }
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(SendError::Connect)?;
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        let mut c = AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello)
            .await
            .map_err(SendError::Smtp)?;
        if let Some(tls) = &self.starttls {
            c.starttls(tls.clone(), &self.hello)
                .await
                .map_err(SendError::Smtp)?;
        }
        Ok(c)
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
