//! `spool-notifications`: delivers notification requests.
//!
//! - `notification-requests`, e-mail: renders the templates into an [`OutgoingMail`] on
//!   `outgoing-mail` (pure: the same request always renders the same mail id);
//! - `notification-requests`, webhook/push: POSTs the rendered JSON (effect key = the
//!   notification id);
//! - `outgoing-mail`: hands the mail to the MTA over SMTP (effect key = the mail id) and emits
//!   `mail-status` *queued* with Postfix's queue id.
//!
//! An effect already recorded as done (a committed transaction said so) is never repeated;
//! one done but not yet committed when the process died is repeated once (the window is one
//! commit interval; the Message-ID / `Idempotency-Key` let the receiver drop it). Temporary
//! failures are retried with backoff ([retry] in the processor config); permanent ones go to
//! the dead-letter topic with the reason (SMTP 5xx, HTTP 4xx, a malformed request).

use serde::Deserialize;
use spool_processor::{AsyncHandler, Context, EffectStatus, Failure, Input};

use crate::deliver::Outcome;
use crate::deliver::http::{HttpConfig, HttpSender};
use crate::deliver::smtp::{SmtpConfig, SmtpSender};
use crate::events::{Channel, MailState, MailStatus, NotificationRequest, OutgoingMail};
use crate::processors::emit;
use crate::render::Renderer;
use crate::topics;

/// `[app]` of `spool-notifications`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsSettings {
    /// Site URL for links.
    pub site: String,
    /// A directory of templates overriding the built-in ones ("" = built-in only).
    pub templates_dir: String,
    /// SMTP.
    pub smtp: SmtpConfig,
    /// HTTP.
    pub http: HttpConfig,
}

impl Default for NotificationsSettings {
    fn default() -> Self {
        NotificationsSettings {
            site: "https://www.bestprice.example".into(),
            templates_dir: String::new(),
            smtp: SmtpConfig::default(),
            http: HttpConfig::default(),
        }
    }
}

/// The notifications processor.
#[derive(Debug)]
pub struct Notifications {
    renderer: Renderer,
    smtp_config: SmtpConfig,
    /// Made on first use, inside the runtime (lettre's pool runs a task).
    smtp: Option<SmtpSender>,
    http: HttpSender,
}

impl Notifications {
    /// A processor with these settings (the settings are checked now; SMTP connects later).
    pub fn new(s: &NotificationsSettings) -> anyhow::Result<Notifications> {
        let renderer = if s.templates_dir.is_empty() {
            Renderer::builtin(&s.site)
        } else {
            Renderer::with_overrides(&s.site, std::path::Path::new(&s.templates_dir))?
        };
        let _: lettre::message::Mailbox = s
            .smtp
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("[app.smtp] from {:?}: {e}", s.smtp.from))?;
        anyhow::ensure!(
            matches!(s.smtp.tls.as_str(), "none" | "starttls"),
            "[app.smtp] tls must be none or starttls"
        );
        Ok(Notifications {
            renderer,
            smtp_config: s.smtp.clone(),
            smtp: None,
            http: HttpSender::new(&s.http)?,
        })
    }
}

fn outcome(o: Outcome) -> Result<Outcome, Failure> {
    match o {
        Outcome::Delivered { .. } => Ok(o),
        Outcome::Retry(why) => Err(Failure::retry(why)),
        Outcome::Dead(why) => Err(Failure::dead_letter(why)),
    }
}

impl AsyncHandler for Notifications {
    async fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        match &*input.topic {
            topics::NOTIFICATION_REQUESTS | topics::CAMPAIGN_REQUESTS => {
                let n: NotificationRequest = input.event::<NotificationRequest>()?.data;
                match n.channel {
                    Channel::Email => {
                        let mail = self
                            .renderer
                            .outgoing_mail(&n)
                            .map_err(|e| Failure::dead_letter(e.to_string()))?;
                        emit(ctx, mail.mail_id.clone(), &mail, n.at_ms)
                    }
                    Channel::Webhook | Channel::Push => {
                        if ctx.effect(&n.id)? != EffectStatus::Todo {
                            return Ok(()); // done before, or a replay
                        }
                        let body = if n.channel == Channel::Webhook {
                            self.renderer.webhook_body(&n)
                        } else {
                            self.renderer.push_body(&n)
                        }
                        .map_err(|e| Failure::dead_letter(e.to_string()))?;
                        outcome(self.http.post(&n.address, &body, &n.id).await)?;
                        ctx.effect_done(&n.id);
                        Ok(())
                    }
                }
            }
            topics::OUTGOING_MAIL => {
                let m: OutgoingMail = input.event::<OutgoingMail>()?.data;
                if ctx.effect(&m.mail_id)? != EffectStatus::Todo {
                    return Ok(());
                }
                if self.smtp.is_none() {
                    self.smtp = Some(
                        SmtpSender::new(&self.smtp_config)
                            .map_err(|e| Failure::fatal(e.to_string()))?,
                    );
                }
                let smtp = self.smtp.as_ref().expect("set above");
                let Outcome::Delivered { queue_id, detail } = outcome(smtp.send(&m).await)? else {
                    unreachable!("outcome() returns Delivered or an error")
                };
                ctx.effect_done(&m.mail_id);
                let status = MailStatus {
                    mail_id: m.mail_id.clone(),
                    queue_id,
                    to: m.to.clone(),
                    status: MailState::Queued,
                    dsn: None,
                    detail,
                    at_ms: ctx.now_ms(),
                };
                emit(ctx, format!("{}:queued", m.mail_id), &status, status.at_ms)
            }
            other => Err(Failure::dead_letter(format!(
                "notifications does not read {other}"
            ))),
        }
    }
}
