//! `spool-notifications`: delivers notification requests.
//!
//! - `notification-requests`, e-mail (a deal alert): renders the templates into an
//!   [`OutgoingMail`] on `outgoing-mail` (pure: the same request always renders the same mail
//!   id) **and starts its send at once** (below, "Alerts: rendered and sent in one step");
//! - `campaign-requests`, e-mail: renders the mail onto `outgoing-mail` only; it is sent when
//!   that record is read;
//! - `notification-requests`, webhook/push: POSTs the rendered JSON (effect key = the
//!   notification id), up to `[app.http] max_in_flight` calls at once, settled the same way
//!   as mail (below): the idempotency key; or, for a 4xx/3xx or `max_attempts` used up, the
//!   dead letter; or a retry after a backoff (5xx, 408, 429, timeouts), without holding back
//!   the partition;
//! - `outgoing-mail`: hands the mail to the MTA over SMTP, up to `[app.smtp] max_in_flight`
//!   mails at once and `max_waiting` more queued for a slot beside the loop
//!   ([`crate::deliver::inflight`]: the loop never waits for a free slot), and settles each one in a later
//!   transaction: the idempotency key (effect key = the mail id) with `mail-status` *queued*
//!   and Postfix's queue id; or, for a permanent refusal (SMTP 5xx, or `max_attempts` used
//!   up), `mail-status` *failed* with the dead letter; or a retry after a backoff (SMTP 4xx,
//!   connection failures), without holding back the partition. A permanent refusal whose
//!   enhanced status code says the recipient's address is bad ([`address_refused`]: 5.1.1,
//!   5.1.2, 5.1.3, 5.1.6, 5.1.10; typically Postfix's RCPT-time `550 5.1.1 ... Recipient
//!   address rejected`, which never reaches its log as a bounce) also flags the address
//!   unreachable, in the same transaction: an [`AddressStatus`] on every partition of
//!   `address-status` (`[app] address_partitions`, the topic's count, checked at start), as
//!   `spool-bounces` does for a hard bounce. Other 5xx (policy 5.7.x, size 5.3.4, the
//!   sender's 5.1.7/5.1.8, none) flag nothing.
//!
//! # Sends in flight (how the contract is kept with several sends at once)
//!
//! The record's transaction stores a **pending timer** (wall clock, key `smtp/<mail id>` or
//! `http/<notification id>`, the record as payload) with its offset, and the send starts at
//! once (SMTP and HTTP each have their own bounded set, [`InFlight`]). Every runtime tick
//! (100 ms) the timers of pending mails fire: a finished send is settled (the timer removed,
//! the key recorded, the status emitted, in one transaction), a running one sets its timer
//! again. So inside the log everything stays exactly once (the offset and the pending timer
//! commit together; the settlement commits once), and the mail itself is sent at least once:
//!
//! - a crash before the record's transaction commits: the record is read again and the mail
//!   sent again (window: one commit interval plus the send);
//! - a crash after it, before the settlement commits: the timer fires after the restart,
//!   finds no result and sends again (window: from the `250` to the next tick's commit,
//!   about one tick plus one commit interval, 0.1 to 0.3 s with the defaults);
//! - an aborted transaction (no crash) repeats nothing: the results of this process's sends
//!   stay in memory by mail id and are settled from there; a failure's result too (it is
//!   marked given up when settled, not dropped), so an aborted `failed` settlement is settled
//!   again, not sent again. Only a record read anew after its failure was settled (a redriven
//!   dead letter; or, for a campaign mail or a webhook, the record's own transaction aborted
//!   together with its settlement) drops that result and is sent once more;
//! - a clean stop (SIGTERM) repeats nothing: [`AsyncHandler::drain`] starts no more sends,
//!   waits for those running (each bounded by its timeout), and the runtime settles them in
//!   its last transaction; sends that were still waiting for a slot were never handed over
//!   and go after the restart.
//!
//! # Alerts: rendered and sent in one step
//!
//! A deal alert's mail is not sent one commit later, when its `outgoing-mail` record is read
//! back, but as it is rendered: the request's transaction holds the `outgoing-mail` record
//! and the mail's pending timer (its payload is that record, with the request's partition
//! and offset), and the send starts at once, exactly as if the record had been read. The
//! record carries the header [`SENT_INLINE_HEADER`], and reading it back **never sends it**:
//! the pending timer committed with it is what sends it, retries it after a crash and
//! settles it, and whatever it came to (queued, or `failed` with the dead letter, which
//! records no idempotency key) is final. (Before the header, the read-back relied on the
//! pending timer or the key, and an alert refused with a 5xx, settled before its record was
//! read back, found neither and was sent again.) The record is written to **the request's
//! partition** (not by its key's hash), the task holding the pending timer. This takes one transaction (a commit and a read-back,
//! ~10-20 ms at p50) off the path from a price update to Postfix (docs/benchmarks.md). The
//! repeat window is the same shape as before: a crash before the request's transaction
//! commits reads the request again and sends again. `outgoing-mail` must have as many
//! partitions as `notification-requests` (as `publish::ensure_topics` creates them); records
//! written there by others, without the header (a redriven dead letter: `dead_letter`
//! leaves the header out; an older version), are sent when read.
//!
//! After the settlement commits, the mail (or call) is never sent again (within the
//! `[effects]` retention). The Message-ID (`<mail id@domain>`) and the `Idempotency-Key`
//! header (the notification id) let a receiver drop a repeat.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use spool_client::Header;
use spool_processor::{
    AsyncHandler, Attempt, Context, EffectStatus, Failure, Input, Timer, TimerKind,
};

use crate::deliver::Outcome;
use crate::deliver::http::{HttpConfig, HttpSender};
use crate::deliver::inflight::{InFlight, SendState};
use crate::deliver::smtp::{SmtpConfig, SmtpSender};
use crate::events::{
    AddressStatus, Channel, MailState, MailStatus, NotificationRequest, OutgoingMail,
};
use crate::processors::{broadcast, emit, envelope};
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
    /// Partitions of `address-status` (= matching's), where an address refused at SMTP time
    /// is flagged: 0 (the default) takes the topic's count at start; another value is the
    /// count expected, and the start is refused if the topic has another
    /// ([`crate::processors::resolve_broadcast_partitions`]).
    pub address_partitions: u32,
}

impl Default for NotificationsSettings {
    fn default() -> Self {
        NotificationsSettings {
            site: "https://www.bestprice.example".into(),
            templates_dir: String::new(),
            smtp: SmtpConfig::default(),
            http: HttpConfig::default(),
            address_partitions: 0,
        }
    }
}

/// The notifications processor.
#[derive(Debug)]
pub struct Notifications {
    renderer: Renderer,
    smtp_config: SmtpConfig,
    /// Made on first use (only a processor that reads `outgoing-mail` needs it).
    smtp: Option<SmtpSender>,
    /// Mails being handed to the MTA, and their results until settled.
    inflight: InFlight,
    http_config: HttpConfig,
    /// Webhook and push calls running, and their results until settled.
    http_inflight: InFlight,
    http: HttpSender,
    /// `address-status`'s partition count (resolved at start).
    address_partitions: u32,
}

impl Notifications {
    /// A processor with these settings (the settings are checked now; SMTP connects later).
    /// `address_partitions` is the count resolved at start (the binary asks the broker), so
    /// at least 1.
    pub fn new(s: &NotificationsSettings) -> anyhow::Result<Notifications> {
        anyhow::ensure!(
            s.address_partitions >= 1,
            "[app] address_partitions must be at least 1 (address-status's partition count, \
             resolved from the broker at start)"
        );
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
        anyhow::ensure!(
            (1..=1024).contains(&s.smtp.max_in_flight),
            "[app.smtp] max_in_flight must be 1..=1024"
        );
        anyhow::ensure!(
            s.smtp.max_waiting <= 65_536 && s.http.max_waiting <= 65_536,
            "[app.smtp] and [app.http] max_waiting must be at most 65536"
        );
        anyhow::ensure!(
            s.smtp.max_attempts >= 1 && s.smtp.retry_initial_ms >= 1,
            "[app.smtp] max_attempts and retry_initial_ms must be at least 1"
        );
        anyhow::ensure!(
            (1..=1024).contains(&s.http.max_in_flight),
            "[app.http] max_in_flight must be 1..=1024"
        );
        anyhow::ensure!(
            s.http.max_attempts >= 1 && s.http.retry_initial_ms >= 1,
            "[app.http] max_attempts and retry_initial_ms must be at least 1"
        );
        Ok(Notifications {
            renderer,
            smtp_config: s.smtp.clone(),
            smtp: None,
            inflight: InFlight::new(s.smtp.max_in_flight as usize, s.smtp.max_waiting as usize),
            http_config: s.http,
            http_inflight: InFlight::new(
                s.http.max_in_flight as usize,
                s.http.max_waiting as usize,
            ),
            http: HttpSender::new(&s.http)?,
            address_partitions: s.address_partitions,
        })
    }
}

impl AsyncHandler for Notifications {
    async fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        match &*input.topic {
            topics::NOTIFICATION_REQUESTS | topics::CAMPAIGN_REQUESTS => {
                let n: NotificationRequest = input.event::<NotificationRequest>()?.data;
                if &*input.topic == topics::CAMPAIGN_REQUESTS && wait_for_quiet_end(ctx, input, &n)?
                {
                    return Ok(());
                }
                match n.channel {
                    Channel::Email => {
                        let mail = self
                            .renderer
                            .outgoing_mail(&n)
                            .map_err(|e| Failure::dead_letter(e.to_string()))?;
                        if &*input.topic == topics::NOTIFICATION_REQUESTS {
                            self.render_and_send(ctx, input, mail, n.at_ms).await
                        } else {
                            // Campaign mail (throttled: latency does not matter) is sent
                            // when its `outgoing-mail` record is read.
                            emit(ctx, mail.mail_id.clone(), &mail, n.at_ms)
                        }
                    }
                    Channel::Webhook | Channel::Push => {
                        if ctx.effect(&n.id)? != EffectStatus::Todo {
                            return Ok(()); // done before, or a replay
                        }
                        let key = [HTTP_PREFIX, n.id.as_bytes()].concat();
                        if ctx.timer(TimerKind::Wall, &key)?.is_some() {
                            return Ok(()); // the same call is already pending
                        }
                        let call = self.call(&n)?;
                        let pending = Pending::of(input);
                        ctx.set_timer(TimerKind::Wall, &key, ctx.now_ms(), pending.payload()?)?;
                        // A failure of this id settled before (a redriven dead letter): anew.
                        self.http_inflight.forget_given_up(&n.id);
                        self.http_inflight.start(&n.id, call).await;
                        Ok(())
                    }
                }
            }
            topics::OUTGOING_MAIL => {
                if sent_inline(input) {
                    // A deal alert's own record: its pending timer committed with it (in the
                    // request's transaction) sends and settles it, whatever came of it.
                    return Ok(());
                }
                let m: OutgoingMail = input.event::<OutgoingMail>()?.data;
                if ctx.effect(&m.mail_id)? != EffectStatus::Todo {
                    return Ok(()); // sent before, or a replay
                }
                let key = [PENDING_PREFIX, m.mail_id.as_bytes()].concat();
                if ctx.timer(TimerKind::Wall, &key)?.is_some() {
                    return Ok(()); // the same mail is already pending
                }
                let pending = Pending::of(input);
                ctx.set_timer(TimerKind::Wall, &key, ctx.now_ms(), pending.payload()?)?;
                let smtp = self.smtp()?;
                let id = m.mail_id.clone();
                // A failure of this id settled before (a redriven dead letter): sent anew.
                self.inflight.forget_given_up(&id);
                self.inflight
                    .start(&id, async move { smtp.send(&m).await })
                    .await;
                Ok(())
            }
            other => Err(Failure::dead_letter(format!(
                "notifications does not read {other}"
            ))),
        }
    }

    /// A clean stop: no more sends start; the running ones (each bounded by its timeout) are
    /// waited for, and then [`RECHECK_MS`] more, so that every pending timer is due when the
    /// runtime fires the due wall timers in its last transaction: each result is settled
    /// (idempotency key, `mail-status`) and a restart does not send it again.
    async fn drain(&mut self) {
        let t = tokio::time::Instant::now();
        let (mails, calls) = (self.inflight.running(), self.http_inflight.running());
        tokio::join!(self.inflight.drain(), self.http_inflight.drain());
        tokio::time::sleep_until(t + std::time::Duration::from_millis(RECHECK_MS as u64 + 2)).await;
        tracing::info!(
            waited_ms = t.elapsed().as_millis() as u64,
            mails,
            calls,
            "sends in flight finished; settling them before the last commit"
        );
    }

    async fn on_timer(&mut self, ctx: &mut Context<'_>, timer: &Timer) -> Result<(), Failure> {
        if timer.kind == TimerKind::Wall && timer.key.starts_with(QUIET_PREFIX) {
            return quiet_ended(ctx, timer);
        }
        let http = timer.key.starts_with(HTTP_PREFIX);
        if timer.kind != TimerKind::Wall || !(http || timer.key.starts_with(PENDING_PREFIX)) {
            return Ok(());
        }
        let pending: Pending = serde_json::from_slice(&timer.payload)
            .map_err(|e| Failure::fatal(format!("pending send timer does not decode: {e}")))?;
        let d = if http {
            Delivery::Call(pending.request()?)
        } else {
            Delivery::Mail(pending.mail()?)
        };
        self.settle(ctx, timer, pending, d)
    }
}

/// Prefix of the timers of campaign messages waiting for their user's quiet hours to end
/// (`quiet/<notification id>`).
const QUIET_PREFIX: &[u8] = b"quiet/";

/// A campaign message inside its user's quiet hours waits: a wall-clock timer at the window's
/// end holds the record (true). A time zone that does not resolve is a dead letter.
fn wait_for_quiet_end(
    ctx: &mut Context<'_>,
    input: &Input,
    n: &NotificationRequest,
) -> Result<bool, Failure> {
    let now = jiff::Timestamp::from_millisecond(ctx.now_ms())
        .map_err(|e| Failure::fatal(format!("clock: {e}")))?;
    let until = crate::quiet::next_allowed(&n.time_zone, n.quiet_hours, now)
        .map_err(|e| Failure::dead_letter(e.to_string()))?;
    let Some(until) = until else { return Ok(false) };
    let key = [QUIET_PREFIX, n.id.as_bytes()].concat();
    ctx.set_timer(
        TimerKind::Wall,
        &key,
        until.as_millisecond(),
        Pending::of(input).payload()?,
    )?;
    Ok(true)
}

/// A campaign message's quiet hours ended: the record goes back to the end of
/// `campaign-requests` (same partition), so it passes the campaigns lane's throttle and
/// pause like any other.
fn quiet_ended(ctx: &mut Context<'_>, timer: &Timer) -> Result<(), Failure> {
    let p: Pending = serde_json::from_slice(&timer.payload)
        .map_err(|e| Failure::fatal(format!("quiet-hours timer does not decode: {e}")))?;
    let input = p.input();
    let record = spool_client::ProducerRecord {
        key: input.key,
        value: input.value,
        headers: input.headers,
        timestamp_ms: Some(ctx.now_ms()),
    };
    ctx.emit_to(topics::CAMPAIGN_REQUESTS, timer.partition, record);
    Ok(())
}

/// Header on a deal alert's `outgoing-mail` record, whose send started as it was rendered
/// (value `1`): reading the record back never sends it (see "Alerts: rendered and sent in one
/// step"). Its dead letter does not carry it, so a redrive sends.
pub const SENT_INLINE_HEADER: &str = "bestprice_sent_inline";

/// Whether `input` is a deal alert's own `outgoing-mail` record ([`SENT_INLINE_HEADER`]).
fn sent_inline(input: &Input) -> bool {
    input
        .headers
        .iter()
        .any(|h| h.key == SENT_INLINE_HEADER && h.value.as_deref() == Some(b"1"))
}

/// Prefix of the pending-mail timers' keys (`smtp/<mail id>`).
const PENDING_PREFIX: &[u8] = b"smtp/";
/// Prefix of the pending webhook/push calls' timer keys (`http/<notification id>`).
const HTTP_PREFIX: &[u8] = b"http/";
/// How soon a pending send that is still running is looked at again (the runtime's tick,
/// 100 ms, is the real granularity).
const RECHECK_MS: i64 = 20;

/// What a pending timer delivers.
enum Delivery {
    /// An e-mail, over SMTP.
    Mail(OutgoingMail),
    /// A webhook or push notification, over HTTP.
    Call(NotificationRequest),
}

impl Delivery {
    /// The idempotency key (and the in-flight id).
    fn id(&self) -> &str {
        match self {
            Delivery::Mail(m) => &m.mail_id,
            Delivery::Call(n) => &n.id,
        }
    }
}

/// A record held in a timer (the payload): a pending mail (the `outgoing-mail` record as it
/// was read, so that a send can be started again after a restart and the dead letter carries
/// the original record, and the failed attempts so far), or a campaign message waiting for
/// the end of its user's quiet hours.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    topic: String,
    partition: u32,
    offset: u64,
    timestamp_ms: i64,
    key: Option<String>,
    /// The value (the event's JSON payload).
    value: String,
    /// Headers as text (the CloudEvents attributes are text).
    headers: Vec<(String, Option<String>)>,
    /// The attempt running or due (1-based).
    attempt: u32,
    history: Vec<Attempt>,
}

impl Pending {
    fn of(input: &Input) -> Pending {
        Pending::new(
            input.topic.to_string(),
            input,
            input.timestamp_ms,
            input.key.as_deref(),
            input.value.as_deref(),
            &input.headers,
        )
    }

    /// A record this handler emits to `topic` while handling `input` (an alert's
    /// `outgoing-mail`, sent at once): the input's partition and offset (the record's own
    /// offset is known only once it is written), the record's key, value and headers.
    fn of_record(topic: &str, input: &Input, r: &spool_client::ProducerRecord) -> Pending {
        Pending::new(
            topic.to_owned(),
            input,
            r.timestamp_ms.unwrap_or(input.timestamp_ms),
            r.key.as_deref(),
            r.value.as_deref(),
            &r.headers,
        )
    }

    /// A first attempt at `topic`, positioned at `input`'s partition and offset, with the
    /// given record parts (bytes kept as lossy UTF-8 text).
    fn new(
        topic: String,
        input: &Input,
        timestamp_ms: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[spool_client::Header],
    ) -> Pending {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Pending {
            topic,
            partition: input.partition,
            offset: input.offset,
            timestamp_ms,
            key: key.map(text),
            value: value.map(text).unwrap_or_default(),
            headers: headers
                .iter()
                .map(|h| (h.key.clone(), h.value.as_deref().map(text)))
                .collect(),
            attempt: 1,
            history: Vec::new(),
        }
    }

    fn payload(&self) -> Result<Vec<u8>, Failure> {
        serde_json::to_vec(self).map_err(|e| Failure::fatal(e.to_string()))
    }

    fn mail(&self) -> Result<OutgoingMail, Failure> {
        serde_json::from_str(&self.value)
            .map_err(|e| Failure::fatal(format!("pending mail does not decode: {e}")))
    }

    fn request(&self) -> Result<NotificationRequest, Failure> {
        serde_json::from_str(&self.value)
            .map_err(|e| Failure::fatal(format!("pending call does not decode: {e}")))
    }

    /// The record as an input again (for its dead letter).
    fn input(&self) -> Input {
        let topic: Arc<str> = Arc::from(self.topic.as_str());
        Input {
            topic: topic.clone(),
            partition: self.partition,
            offset: self.offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.clone().map(Bytes::from),
            value: Some(Bytes::from(self.value.clone())),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| Header {
                    key: k.clone(),
                    value: v.clone().map(Bytes::from),
                })
                .collect(),
            attempt: self.attempt,
            lane: topic,
        }
    }
}

impl Notifications {
    /// A deal alert's e-mail: its `outgoing-mail` record (written to the request's own
    /// partition, so this task is the one that reads it back), and the send started now,
    /// pending in this transaction like one started from that record, instead of one
    /// commit later when the record is read (which then finds the pending timer, or the
    /// idempotency key once settled, and sends nothing). See "Alerts: rendered and sent in
    /// one step" in the module docs.
    async fn render_and_send(
        &mut self,
        ctx: &mut Context<'_>,
        input: &Input,
        mail: OutgoingMail,
        at_ms: i64,
    ) -> Result<(), Failure> {
        let mut record = envelope(ctx.processor(), mail.mail_id.clone(), &mail, at_ms)
            .to_record()
            .map_err(|e| Failure::fatal(e.to_string()))?;
        record.headers.push(Header {
            key: SENT_INLINE_HEADER.to_owned(),
            value: Some(Bytes::from_static(b"1")),
        });
        ctx.emit_to(topics::OUTGOING_MAIL, input.partition, record.clone());
        if ctx.effect(&mail.mail_id)? != EffectStatus::Todo {
            return Ok(()); // sent before, or a replay (effects disabled): the record only
        }
        let key = [PENDING_PREFIX, mail.mail_id.as_bytes()].concat();
        if ctx.timer(TimerKind::Wall, &key)?.is_some() {
            return Ok(()); // the same mail is already pending
        }
        let pending = Pending::of_record(topics::OUTGOING_MAIL, input, &record);
        ctx.set_timer(TimerKind::Wall, &key, ctx.now_ms(), pending.payload()?)?;
        let smtp = self.smtp()?;
        let id = mail.mail_id.clone();
        self.inflight
            .start(&id, async move { smtp.send(&mail).await })
            .await;
        Ok(())
    }

    /// Mails being handed to the MTA now (holding an SMTP slot): a send's result is recorded
    /// before its slot is freed.
    pub fn mails_in_flight(&self) -> usize {
        self.inflight.running()
    }

    fn smtp(&mut self) -> Result<SmtpSender, Failure> {
        if self.smtp.is_none() {
            self.smtp = Some(
                SmtpSender::new(&self.smtp_config).map_err(|e| Failure::fatal(e.to_string()))?,
            );
        }
        Ok(self.smtp.clone().expect("set above"))
    }

    /// The HTTP call of a webhook or push notification (its body rendered now: a template
    /// error is a dead letter).
    fn call(
        &self,
        n: &NotificationRequest,
    ) -> Result<impl std::future::Future<Output = Outcome> + Send + use<>, Failure> {
        let body = if n.channel == Channel::Webhook {
            self.renderer.webhook_body(n)
        } else {
            self.renderer.push_body(n)
        }
        .map_err(|e| Failure::dead_letter(e.to_string()))?;
        let (http, url, key) = (self.http.clone(), n.address.clone(), n.id.clone());
        Ok(async move { http.post(&url, &body, &key).await })
    }

    /// Starts a pending send again if a slot is free (after a restart, a move of the
    /// partition, or a retry's delay); a busy set leaves it to a later tick.
    fn start_again(&mut self, d: &Delivery) -> Result<(), Failure> {
        match d {
            Delivery::Mail(m) => {
                let smtp = self.smtp()?;
                let mail = m.clone();
                self.inflight
                    .try_start(&m.mail_id, async move { smtp.send(&mail).await });
            }
            Delivery::Call(n) => {
                let call = self.call(n)?;
                self.http_inflight.try_start(&n.id, call);
            }
        }
        Ok(())
    }

    /// Settles a pending send from its result (see the module docs).
    fn settle(
        &mut self,
        ctx: &mut Context<'_>,
        timer: &Timer,
        mut pending: Pending,
        d: Delivery,
    ) -> Result<(), Failure> {
        let id = d.id().to_owned();
        let (inflight, max_attempts) = match d {
            Delivery::Mail(_) => (self.inflight.clone(), self.smtp_config.max_attempts),
            Delivery::Call(_) => (self.http_inflight.clone(), self.http_config.max_attempts),
        };
        let now = ctx.now_ms();
        if ctx.effect(&id)? != EffectStatus::Todo {
            inflight.forget(&id);
            return Ok(());
        }
        let again = |ctx: &mut Context<'_>, at: i64, p: &Pending| {
            ctx.set_timer(TimerKind::Wall, &timer.key, at, p.payload()?)
                .map_err(Failure::from)
        };
        match inflight.state(&id) {
            SendState::Running => again(ctx, now + RECHECK_MS, &pending),
            SendState::Absent => {
                self.start_again(&d)?;
                again(ctx, now + RECHECK_MS, &pending)
            }
            SendState::Finished {
                outcome: Outcome::Delivered { queue_id, detail },
                at_ms,
            } => {
                // The result stays in memory (an abort of this transaction settles it again
                // from there) until its TTL.
                ctx.effect_done(&id);
                let Delivery::Mail(m) = &d else {
                    return Ok(());
                };
                let status = MailStatus {
                    mail_id: m.mail_id.clone(),
                    queue_id,
                    to: m.to.clone(),
                    status: MailState::Queued,
                    dsn: None,
                    detail,
                    at_ms,
                };
                emit(ctx, format!("{}:queued", m.mail_id), &status, at_ms)
            }
            SendState::Finished {
                outcome: Outcome::Retry(why),
                at_ms,
            } if pending.attempt < max_attempts => {
                pending.history.push(Attempt {
                    attempt: pending.attempt,
                    at_ms,
                    reason: why,
                });
                let delay = match d {
                    Delivery::Mail(_) => self.smtp_config.retry_delay_ms(pending.attempt),
                    Delivery::Call(_) => self.http_config.retry_delay_ms(pending.attempt),
                };
                pending.attempt += 1;
                inflight.forget(&id);
                again(ctx, now + delay as i64, &pending)
            }
            SendState::Finished {
                outcome: Outcome::Retry(why) | Outcome::Dead(why),
                at_ms,
            } => {
                pending.history.push(Attempt {
                    attempt: pending.attempt,
                    at_ms,
                    reason: why.clone(),
                });
                // Kept, not forgotten: if this transaction aborts, the timer fires again and
                // settles from the same result instead of sending again.
                inflight.give_up(&id);
                if let Delivery::Mail(m) = &d {
                    let refused = address_refused(&why).map(str::to_owned);
                    failed(ctx, m, why, now)?;
                    if let Some(code) = refused {
                        self.flag_refused(ctx, m, &code, now)?;
                    }
                }
                dead_letter(ctx, &pending, now);
                Ok(())
            }
        }
    }
}

impl Notifications {
    /// The MTA refused `m`'s recipient for good with an address-class code: the address is
    /// flagged unreachable on every partition of `address-status` (in the settling
    /// transaction, beside the `failed` status and the dead letter), so matching stops
    /// alerting it by e-mail and the site can warn its user.
    fn flag_refused(
        &self,
        ctx: &mut Context<'_>,
        m: &OutgoingMail,
        code: &str,
        now: i64,
    ) -> Result<(), Failure> {
        let flag = AddressStatus {
            address: m.to.trim().to_ascii_lowercase(),
            unreachable: true,
            reason: format!("refused by the MTA with {code} (SMTP, mail {})", m.mail_id),
            mail_id: Some(m.mail_id.clone()),
            at_ms: now,
        };
        broadcast(
            ctx,
            topics::ADDRESS_STATUS,
            self.address_partitions,
            format!("{}:refused", m.mail_id),
            &flag,
            now,
        )
    }
}

/// The enhanced status code of a permanent SMTP refusal (lettre's `permanent error (5NN):
/// X.Y.Z text`) when it says the recipient's address is bad (RFC 3463): 5.1.1 bad mailbox,
/// 5.1.2 bad system (domain), 5.1.3 bad address syntax, 5.1.6 mailbox moved, 5.1.10 null MX.
/// `None` for every other refusal: 5.1.7/5.1.8 are about *our* sender address, 5.1.0/5.1.4/
/// 5.1.5 say nothing certain, 5.7.x is policy (spam, relay, DMARC), 5.2.x/5.3.x mailbox or
/// system state, and a reply without an enhanced code is not classified. One recipient per
/// transaction, so the code is about that recipient whatever the SMTP stage.
pub fn address_refused(why: &str) -> Option<&str> {
    let at = why.find("permanent error (5")?;
    let rest = &why[at + "permanent error (".len()..];
    let rest = rest.get(3..)?.strip_prefix("): ")?;
    let code = rest.split_whitespace().next()?;
    let mut parts = code.split('.');
    let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || class != "5" || subject != "1" {
        return None;
    }
    matches!(detail, "1" | "2" | "3" | "6" | "10").then_some(code)
}

/// A mail given up on: `mail-status` `failed` (its dead letter follows in the settling
/// transaction). The idempotency key is not recorded: a redriven dead letter is sent.
fn failed(ctx: &mut Context<'_>, m: &OutgoingMail, why: String, now: i64) -> Result<(), Failure> {
    let status = MailStatus {
        mail_id: m.mail_id.clone(),
        queue_id: None,
        to: m.to.clone(),
        status: MailState::Failed,
        dsn: smtp_code(&why),
        detail: why,
        at_ms: now,
    };
    emit(ctx, format!("{}:failed", m.mail_id), &status, now)
}

/// The dead letter of a pending send's record (with its attempts), in the settling
/// transaction. An alert's [`SENT_INLINE_HEADER`] is left out: a redriven dead letter is
/// sent when read.
fn dead_letter(ctx: &mut Context<'_>, pending: &Pending, now: i64) {
    let mut input = pending.input();
    input.headers.retain(|h| h.key != SENT_INLINE_HEADER);
    let group = ctx.processor().to_owned();
    let (topic, record) = spool_processor::dead_letter_for(&input, &group, &pending.history, now);
    ctx.emit_to(topic, input.partition, record);
}

/// The SMTP reply code in an error text (`... (550) ...` as lettre writes it), if any.
fn smtp_code(why: &str) -> Option<String> {
    let open = why.find('(')?;
    let code = why.get(open + 1..open + 4)?;
    (code.bytes().all(|b| b.is_ascii_digit()) && why.get(open + 4..open + 5) == Some(")"))
        .then(|| code.to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spool_processor::testing::{TestDriver, TestRecord};

    use super::*;
    use crate::events::{CampaignInfo, NotificationKind, QuietHours};
    use crate::processors::envelope;

    fn campaign(user: &str) -> NotificationRequest {
        NotificationRequest {
            id: format!("{user}-c1"),
            kind: NotificationKind::Campaign,
            user: user.into(),
            user_name: "Eleni".into(),
            channel: Channel::Email,
            address: format!("{user}@localhost"),
            time_zone: "Europe/Athens".into(),
            // 22:00–07:00 local; the driver starts at 2024-01-01T00:00Z = 02:00 in Athens.
            quiet_hours: Some(QuietHours {
                start_min: 22 * 60,
                end_min: 7 * 60,
            }),
            deal: None,
            campaign: Some(CampaignInfo {
                id: "c1".into(),
                title: "Spring sale".into(),
                body: "Everything & more".into(),
            }),
            at_ms: 1_704_067_200_000,
        }
    }

    #[test]
    fn only_recipient_address_codes_flag() {
        let e = |reply: &str| format!("smtp: permanent error ({reply}");
        for (reply, want) in [
            (
                "550): 5.1.1 <x@y>: Recipient address rejected: User unknown",
                Some("5.1.1"),
            ),
            (
                "550): 5.1.2 <x@nope>: Recipient address rejected: Domain not found",
                Some("5.1.2"),
            ),
            ("553): 5.1.3 bad address syntax", Some("5.1.3")),
            ("550): 5.1.10 null MX", Some("5.1.10")),
            (
                "553): 5.1.8 <deals@x>: Sender address rejected: Domain not found",
                None,
            ),
            ("550): 5.1.7 bad sender", None),
            ("554): 5.7.1 <x@y>: Relay access denied", None),
            ("552): 5.3.4 Message size exceeds fixed limit", None),
            ("550): 5.1.1x odd", None),
            ("550): Recipient unknown", None),
        ] {
            assert_eq!(address_refused(&e(reply)), want, "{reply}");
        }
        assert_eq!(
            address_refused("smtp: transient error (450): 4.1.1 try later"),
            None
        );
        assert_eq!(
            address_refused("recipient \"not an address\": invalid"),
            None
        );
        let zero = NotificationsSettings {
            address_partitions: 0,
            ..NotificationsSettings::default()
        };
        assert!(
            Notifications::new(&zero).is_err(),
            "unresolved partitions refused"
        );
    }

    #[tokio::test]
    async fn campaigns_wait_for_the_end_of_quiet_hours_and_go_back_through_their_lane() {
        let h = Notifications::new(&NotificationsSettings {
            address_partitions: 1,
            ..NotificationsSettings::default()
        })
        .unwrap();
        let mut d = TestDriver::new("notifications", h);
        let c = campaign("u1");
        d.pipe_event_async(
            topics::CAMPAIGN_REQUESTS,
            &envelope("c", &c.id, &c, c.at_ms),
        )
        .await;
        assert!(
            d.read_output(topics::OUTGOING_MAIL).is_empty(),
            "quiet: held"
        );
        // 07:00 in Athens is 05:00Z: nothing a minute before.
        d.advance_wall_clock_async(Duration::from_secs(5 * 3600 - 60))
            .await;
        assert!(d.read_output(topics::CAMPAIGN_REQUESTS).is_empty());
        // At the end the record goes back to the end of campaign-requests (the lane's throttle
        // and pause apply to it again), and then it is delivered.
        d.advance_wall_clock_async(Duration::from_secs(120)).await;
        let back = d.read_output(topics::CAMPAIGN_REQUESTS);
        assert_eq!(back.len(), 1);
        let again: NotificationRequest = back[0].event().unwrap().data;
        assert_eq!(again, c);
        d.pipe_record_async(TestRecord {
            topic: topics::CAMPAIGN_REQUESTS.into(),
            key: back[0].key.clone(),
            value: back[0].value.clone(),
            headers: back[0].headers.clone(),
            ..TestRecord::default()
        })
        .await;
        let mails = d.read_events::<OutgoingMail>(topics::OUTGOING_MAIL);
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].data.subject, "Spring sale");
        // Outside quiet hours a campaign message is delivered at once.
        let c2 = campaign("u2");
        d.pipe_event_async(
            topics::CAMPAIGN_REQUESTS,
            &envelope("c", &c2.id, &c2, c2.at_ms),
        )
        .await;
        assert_eq!(d.read_output(topics::OUTGOING_MAIL).len(), 1);
        // A time zone that does not resolve is the record's problem: a dead letter.
        let mut bad = campaign("u3");
        bad.time_zone = "Mars/Olympus".into();
        d.pipe_event_async(
            topics::CAMPAIGN_REQUESTS,
            &envelope("c", &bad.id, &bad, bad.at_ms),
        )
        .await;
        assert_eq!(d.dead_letters(topics::CAMPAIGN_REQUESTS).len(), 1);
    }
}
