//! The pipeline's topics: names and the settings the bring-up creates them with.
//!
//! Partition counts are defaults for one box; production sizes them to the instances
//! (`docs/pipeline.md`). Compacted topics carry the latest value per key (settings, address
//! status); the rest are time-retained streams.

/// Product price updates, keyed by product.
pub const PRICES: &str = "prices";
/// Deal transitions, keyed by product.
pub const DEAL_TRANSITIONS: &str = "deal-transitions";
/// Deal transitions again, every transition copied to every partition: matching's input
/// (matching is partitioned by user, so each partition needs every deal).
pub const DEAL_BROADCAST: &str = "deal-broadcast";
/// Users' alert settings, compacted, keyed by user.
pub const USER_SETTINGS: &str = "user-settings";
/// Address status (unreachable flags), compacted, keyed by address; every flag is written to
/// every partition (matching's users of an address can be on any partition).
pub const ADDRESS_STATUS: &str = "address-status";
/// Notification requests (deal alerts), keyed by user.
pub const NOTIFICATION_REQUESTS: &str = "notification-requests";
/// Campaign notification requests (the low-priority lane), keyed by user.
pub const CAMPAIGN_REQUESTS: &str = "campaign-requests";
/// Timeline adds and removes, keyed by user.
pub const TIMELINE: &str = "timeline";
/// Rendered e-mails to send, keyed by mail id.
pub const OUTGOING_MAIL: &str = "outgoing-mail";
/// Mail status, keyed by mail id.
pub const MAIL_STATUS: &str = "mail-status";
/// Delivery issues, keyed by mail id.
pub const DELIVERY_ISSUES: &str = "delivery-issues";
/// Parsed Postfix log lines, keyed by queue id (written by the tailer with its position).
pub const POSTFIX_LOG: &str = "postfix-log";
/// The tailers' durable positions in Postfix's logs (compacted, one key per tailer instance
/// and log path: `<instance id>:<log path>`).
pub const POSTFIX_LOG_POSITION: &str = "postfix-log-position";
/// Feed import runs (started, merchant done), keyed by import id.
pub const FEED_IMPORTS: &str = "feed-imports";
/// Import runs completed or stuck (the completion counter's events), keyed by import id.
pub const IMPORT_STATUS: &str = "import-status";

/// How a topic is cleaned up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    /// Time retention.
    Delete,
    /// Latest value per key.
    Compact,
}

/// One topic's creation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSpec {
    /// Name.
    pub name: &'static str,
    /// Partitions on one box (the bring-up's default).
    pub partitions: u32,
    /// Cleanup policy.
    pub cleanup: Cleanup,
    /// Retention (time-retained topics), ms.
    pub retention_ms: Option<u64>,
}

const DAY_MS: u64 = 24 * 3600 * 1000;

/// Every topic of the pipeline, as `docs/pipeline.md` lists them.
pub const ALL: &[TopicSpec] = &[
    TopicSpec {
        name: PRICES,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(7 * DAY_MS),
    },
    TopicSpec {
        name: DEAL_TRANSITIONS,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(30 * DAY_MS),
    },
    TopicSpec {
        name: DEAL_BROADCAST,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(7 * DAY_MS),
    },
    TopicSpec {
        name: USER_SETTINGS,
        partitions: 4,
        cleanup: Cleanup::Compact,
        retention_ms: None,
    },
    TopicSpec {
        name: ADDRESS_STATUS,
        partitions: 4,
        cleanup: Cleanup::Compact,
        retention_ms: None,
    },
    TopicSpec {
        name: NOTIFICATION_REQUESTS,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(7 * DAY_MS),
    },
    TopicSpec {
        name: CAMPAIGN_REQUESTS,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(7 * DAY_MS),
    },
    TopicSpec {
        name: TIMELINE,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(30 * DAY_MS),
    },
    TopicSpec {
        name: OUTGOING_MAIL,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(7 * DAY_MS),
    },
    TopicSpec {
        name: MAIL_STATUS,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(30 * DAY_MS),
    },
    TopicSpec {
        name: DELIVERY_ISSUES,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(30 * DAY_MS),
    },
    TopicSpec {
        name: POSTFIX_LOG,
        partitions: 4,
        cleanup: Cleanup::Delete,
        retention_ms: Some(7 * DAY_MS),
    },
    TopicSpec {
        name: POSTFIX_LOG_POSITION,
        partitions: 1,
        cleanup: Cleanup::Compact,
        retention_ms: None,
    },
    TopicSpec {
        name: FEED_IMPORTS,
        partitions: 1,
        cleanup: Cleanup::Delete,
        retention_ms: Some(7 * DAY_MS),
    },
    TopicSpec {
        name: IMPORT_STATUS,
        partitions: 1,
        cleanup: Cleanup::Delete,
        retention_ms: Some(30 * DAY_MS),
    },
];
