//! The pipeline's events: one payload type per CloudEvents `type`, serialized as JSON (the
//! record value), with the envelope's attributes (`ce_id`, `ce_source`, `ce_type`,
//! `ce_subject`, `ce_time`) carried as headers by the processor runtime.
//!
//! Invariants:
//! - Money is integer minor units (cents) and percentages are basis points (1/100 %), so every
//!   decision is exact and reproducible by an independent oracle (no floats anywhere).
//! - Every event says which topic it belongs on and which key partitions it ([`Event::key`]):
//!   events about one product (one user, one mail, one address) stay in order on one partition.
//! - Unknown JSON fields are refused (`deny_unknown_fields`), so a producer/consumer version
//!   mismatch is a clear decode error (dead letter), never a silently dropped field.
//!
//! The full catalogue, with partitioning, cleanup policies and retention, is `docs/pipeline.md`.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::topics;

/// Price in minor units (cents).
pub type Cents = u64;
/// A percentage in basis points: 2_000 = 20.00 %.
pub type BasisPoints = u32;

/// What every pipeline payload knows about itself.
pub trait Event: Serialize + DeserializeOwned {
    /// The CloudEvents `type` (`ce_type` header).
    const TYPE: &'static str;
    /// The topic the event is written to (before any replay prefix).
    const TOPIC: &'static str;
    /// The record key: the partitioning key of [`Event::TOPIC`] (and the compaction key of
    /// compacted topics).
    fn key(&self) -> String;
    /// The CloudEvents `subject` (what the event is about); defaults to the key.
    fn subject(&self) -> String {
        self.key()
    }
    /// Encodes the payload (the record value).
    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("pipeline events serialize infallibly")
    }
    /// Decodes a payload; a malformed one is an error (the runtime dead-letters it).
    fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

macro_rules! event {
    ($t:ty, $ty:expr, $topic:expr, |$s:ident| $key:expr) => {
        impl Event for $t {
            const TYPE: &'static str = $ty;
            const TOPIC: &'static str = $topic;
            fn key(&self) -> String {
                let $s = self;
                $key
            }
        }
    };
}

/// One merchant's offer for one product changed price (`prices`, keyed by product).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceUpdate {
    /// Product id (`p000042`).
    pub product: String,
    /// Merchant id (`m007`).
    pub merchant: String,
    /// The product's category (`video-games`).
    pub category: String,
    /// The product's display name (used in notifications).
    pub name: String,
    /// The merchant's new price, or `None` when the merchant no longer offers it.
    pub price: Option<Cents>,
    /// The import run this update belongs to (`import-000003`), if any.
    pub import: Option<String>,
    /// Event time, ms since the epoch (the feed's clock, not the processing time).
    pub at_ms: i64,
}
event!(
    PriceUpdate,
    "bestprice.price.updated.v1",
    topics::PRICES,
    |s| s.product.clone()
);

/// A product moved into or out of "deal" (`deal-transitions`, keyed by product).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DealTransition {
    /// `{product}:{episode}`: the same for a deal's entry and its exit; the basis of every
    /// notification id derived from it.
    pub id: String,
    /// Product id.
    pub product: String,
    /// Which deal of this product (1, 2, ...).
    pub episode: u32,
    /// Entering or leaving.
    pub kind: TransitionKind,
    /// The product's category.
    pub category: String,
    /// The product's display name.
    pub name: String,
    /// The best price across merchants that caused the transition.
    pub price: Cents,
    /// The reference ("regular") price the drop is measured against.
    pub reference: Cents,
    /// `(reference - price) / reference` in basis points (0 when leaving above the reference).
    pub drop_bp: BasisPoints,
    /// The merchant offering [`DealTransition::price`].
    pub merchant: String,
    /// Event time of the price update that caused it.
    pub at_ms: i64,
}
event!(
    DealTransition,
    "bestprice.deal.transition.v1",
    topics::DEAL_TRANSITIONS,
    |s| s.product.clone()
);

/// Into or out of "deal".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionKind {
    /// The product became a deal.
    Entered,
    /// The product is no longer a deal.
    Left,
}

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// E-mail through the outgoing mail topic and SMTP.
    Email,
    /// A Slack-style incoming webhook (HTTP POST of JSON).
    Webhook,
    /// A push notification (HTTP POST to the push gateway).
    Push,
}

impl Channel {
    /// All channels, in a fixed order.
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::Webhook, Channel::Push];
    /// The lowercase name used in ids and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Webhook => "webhook",
            Channel::Push => "push",
        }
    }
}

/// A user's deal-alert settings (`user-settings`, compacted, keyed by user; a tombstone
/// deletes the user).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSettings {
    /// User id (`u000017`).
    pub user: String,
    /// Display name for greetings.
    pub name: String,
    /// Categories of interest (empty: no alerts).
    pub categories: Vec<String>,
    /// Minimum drop to be alerted, in basis points.
    pub min_drop_bp: BasisPoints,
    /// Channels to notify on.
    pub channels: Vec<Channel>,
    /// E-mail address (for [`Channel::Email`]).
    pub email: Option<String>,
    /// Slack-style webhook URL (for [`Channel::Webhook`]).
    pub webhook_url: Option<String>,
    /// Push endpoint/token URL (for [`Channel::Push`]).
    pub push_url: Option<String>,
    /// IANA time zone name (`Europe/Athens`), for quiet hours.
    pub time_zone: String,
    /// Quiet hours, if any: campaigns wait until they end (deal alerts do not).
    pub quiet_hours: Option<QuietHours>,
    /// Event time of this version of the settings.
    pub at_ms: i64,
}
event!(
    AlertSettings,
    "bestprice.user.alert_settings.v1",
    topics::USER_SETTINGS,
    |s| s.user.clone()
);

/// A daily window in the user's time zone, `[start, end)` in minutes after local midnight; it
/// wraps past midnight when `start > end` (22:00-07:00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// Start, minutes after local midnight (0..1440).
    pub start_min: u16,
    /// End, minutes after local midnight (0..1440).
    pub end_min: u16,
}

/// Whether an address can be mailed (`address-status`, compacted, keyed by the lowercased
/// address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressStatus {
    /// The address, lowercased.
    pub address: String,
    /// `true`: flagged unreachable, never mailed again until cleared.
    pub unreachable: bool,
    /// Why (the bounce's DSN and text), for the user-facing warning.
    pub reason: String,
    /// Our mail id whose bounce flagged it.
    pub mail_id: Option<String>,
    /// Event time.
    pub at_ms: i64,
}
event!(
    AddressStatus,
    "bestprice.address.status.v1",
    topics::ADDRESS_STATUS,
    |s| s.address.clone()
);

/// One notification to deliver: one per user per channel (`notification-requests`, keyed by
/// user, so one user's notifications keep their order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationRequest {
    /// Deterministic id: [`crate::ids::notification_id`] of (transition, user, channel), or of
    /// (campaign, user, channel). The idempotency key of the delivery.
    pub id: String,
    /// What it is about.
    pub kind: NotificationKind,
    /// Recipient user.
    pub user: String,
    /// The user's display name.
    pub user_name: String,
    /// Channel.
    pub channel: Channel,
    /// Address on that channel (e-mail address or URL).
    pub address: String,
    /// The user's time zone and quiet hours (campaigns honour them).
    pub time_zone: String,
    /// Quiet hours, if any.
    pub quiet_hours: Option<QuietHours>,
    /// The deal, for deal alerts.
    pub deal: Option<DealInfo>,
    /// The campaign, for marketing messages.
    pub campaign: Option<CampaignInfo>,
    /// Event time of the cause (the transition or the campaign start).
    pub at_ms: i64,
}
event!(
    NotificationRequest,
    "bestprice.notification.requested.v1",
    topics::NOTIFICATION_REQUESTS,
    |s| s.user.clone()
);

/// Deal alert or campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// A product entered "deal" (the alerts lane: full speed, any hour).
    DealAlert,
    /// A marketing broadcast (the campaigns lane: throttled, quiet hours, pausable).
    Campaign,
}

/// The deal a notification is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DealInfo {
    /// The entering transition's id.
    pub transition: String,
    /// Product id.
    pub product: String,
    /// Product name.
    pub name: String,
    /// Category.
    pub category: String,
    /// Deal price.
    pub price: Cents,
    /// Reference price.
    pub reference: Cents,
    /// Drop in basis points.
    pub drop_bp: BasisPoints,
    /// Merchant with the deal price.
    pub merchant: String,
}

/// The campaign a notification belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignInfo {
    /// Campaign id.
    pub id: String,
    /// Subject / title.
    pub title: String,
    /// Body text (plain; escaped when rendered into HTML).
    pub body: String,
}

/// A user's notifications timeline (`timeline`, keyed by user): what the tray shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineEvent {
    /// User.
    pub user: String,
    /// Add or remove.
    pub op: TimelineOp,
    /// The entry: the entering transition's id (one entry per user per deal).
    pub entry: String,
    /// Product id.
    pub product: String,
    /// For adds: the deal shown.
    pub deal: Option<DealInfo>,
    /// Event time of the cause.
    pub at_ms: i64,
}
event!(
    TimelineEvent,
    "bestprice.timeline.changed.v1",
    topics::TIMELINE,
    |s| s.user.clone()
);

/// Timeline operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimelineOp {
    /// Show the entry.
    Add,
    /// Remove the entry (the deal ended).
    Remove,
}

/// A rendered e-mail to send (`outgoing-mail`, keyed by mail id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutgoingMail {
    /// Our mail id; the Message-ID is `<{mail_id}@{domain}>`.
    pub mail_id: String,
    /// The notification it delivers.
    pub notification: String,
    /// Recipient user.
    pub user: String,
    /// Recipient address.
    pub to: String,
    /// Subject.
    pub subject: String,
    /// Plain-text body.
    pub text: String,
    /// HTML body.
    pub html: String,
    /// Alert or campaign (the sending lane).
    pub kind: NotificationKind,
    /// Event time of the cause.
    pub at_ms: i64,
}
event!(
    OutgoingMail,
    "bestprice.mail.outgoing.v1",
    topics::OUTGOING_MAIL,
    |s| s.mail_id.clone()
);

/// What happened to one of our mails (`mail-status`, keyed by mail id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailStatus {
    /// Our mail id.
    pub mail_id: String,
    /// Postfix's queue id, once known.
    pub queue_id: Option<String>,
    /// Recipient.
    pub to: String,
    /// The status.
    pub status: MailState,
    /// DSN (`5.1.1`) or SMTP reply code, when there is one.
    pub dsn: Option<String>,
    /// Human-readable detail (Postfix's text or the error).
    pub detail: String,
    /// Event time.
    pub at_ms: i64,
}
event!(
    MailStatus,
    "bestprice.mail.status.v1",
    topics::MAIL_STATUS,
    |s| s.mail_id.clone()
);

/// A mail's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailState {
    /// Accepted by Postfix (`250 ... queued as QID`).
    Queued,
    /// Delivered (`status=sent`).
    Sent,
    /// Temporarily failed; Postfix retries (`status=deferred`).
    Deferred,
    /// Permanently failed at the recipient (`status=bounced`): the address is flagged.
    Bounced,
    /// Given up: refused by our SMTP server with 5xx, or expired in Postfix's queue.
    Failed,
}

/// A delivery problem worth a look (`delivery-issues`, keyed by mail id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryIssue {
    /// Our mail id.
    pub mail_id: String,
    /// Postfix's queue id.
    pub queue_id: String,
    /// Recipient.
    pub to: String,
    /// Deferred, bounced or expired.
    pub kind: IssueKind,
    /// DSN.
    pub dsn: String,
    /// Postfix's text.
    pub detail: String,
    /// Event time.
    pub at_ms: i64,
}
event!(
    DeliveryIssue,
    "bestprice.mail.delivery_issue.v1",
    topics::DELIVERY_ISSUES,
    |s| s.mail_id.clone()
);

/// Kinds of delivery issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// A temporary failure (4.x.x); Postfix retries.
    Deferred,
    /// A permanent failure (5.x.x): hard bounce.
    Bounced,
    /// Postfix gave up after deferrals (queue lifetime): soft bounce, not flagged.
    Expired,
}

/// Feed import bookkeeping (`feed-imports`, keyed by import id): the start of an import run
/// (how many merchants) and each merchant's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportEvent {
    /// Import run id (`import-000003`).
    pub import: String,
    /// Started (with the parts) or one merchant done.
    pub kind: ImportEventKind,
    /// Event time.
    pub at_ms: i64,
}
event!(
    ImportEvent,
    "bestprice.feed.import.v1",
    topics::FEED_IMPORTS,
    |s| s.import.clone()
);

/// Import run events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportEventKind {
    /// A run started with these merchants (one part each).
    Started {
        /// The merchants (parts).
        merchants: Vec<String>,
    },
    /// One merchant's updates are all produced.
    MerchantDone {
        /// The merchant.
        merchant: String,
        /// How many price updates it produced.
        updates: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refuse_unknown_fields() {
        let t = DealTransition {
            id: "p1:2".into(),
            product: "p1".into(),
            episode: 2,
            kind: TransitionKind::Entered,
            category: "books".into(),
            name: "A book".into(),
            price: 750,
            reference: 1000,
            drop_bp: 2500,
            merchant: "m1".into(),
            at_ms: 5,
        };
        let bytes = t.to_json();
        assert_eq!(DealTransition::from_json(&bytes).unwrap(), t);
        assert_eq!(t.key(), "p1");
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["surprise"] = 1.into();
        let err = DealTransition::from_json(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("surprise"), "{err}");
        assert!(DealTransition::from_json(b"{not json").is_err());
    }

    #[test]
    fn import_events_are_tagged() {
        let e = ImportEvent {
            import: "import-1".into(),
            kind: ImportEventKind::MerchantDone {
                merchant: "m1".into(),
                updates: 3,
            },
            at_ms: 0,
        };
        let json = String::from_utf8(e.to_json()).unwrap();
        assert!(
            json.contains(r#""merchant_done":{"merchant":"m1","updates":3}"#),
            "{json}"
        );
        assert_eq!(ImportEvent::from_json(json.as_bytes()).unwrap(), e);
    }
}
