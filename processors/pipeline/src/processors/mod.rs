//! The four processors as handlers on the processor runtime (`spool-processor`): each wraps
//! the pure logic of its module in the runtime's context (state stores, emits, effects).
//!
//! | processor | inputs | outputs | state |
//! | --- | --- | --- | --- |
//! | [`deals::Deals`] | `prices` | `deal-transitions` (by product), `deal-broadcast` (a copy per partition) | `products` |
//! | [`matching::Matching`] | `deal-broadcast`, `user-settings`, `address-status` (co-partitioned by number) | `notification-requests`, `timeline` | `m` (settings, index, flags, notified) |
//! | [`notifications::Notifications`] | `notification-requests`, `outgoing-mail`, `campaign-requests` | `outgoing-mail`, `mail-status`, `campaign-requests`, `address-status` (a recipient refused at SMTP time with 5.1.x; a copy per partition) | effects (idempotency keys), pending-send timers |
//! | [`bounces::Bounces`] | `postfix-log` | `mail-status`, `delivery-issues`, `address-status` (a copy per partition) | `queue` |
//! | [`imports::Imports`] | `feed-imports` | `import-status` (completed / stuck) | the completion counter `imports` |
//!
//! Matching is partitioned **by user**: each instance holds the settings of its users, and every
//! deal transition reaches every partition (`deal-broadcast`), so a deal with a large audience
//! is fanned out by all instances in parallel. Address flags are replicated the same way
//! (`address-status` has every flag in every partition), because an address's users can live
//! on any partition. See docs/pipeline.md.
//!
//! # Broadcast partition counts
//!
//! A processor that writes a copy to every partition (deals to `deal-broadcast`, bounces and
//! notifications to `address-status`) must write to exactly as many partitions as the topic has: fewer starve
//! matching's other partitions silently (their users are never alerted, their flags never
//! arrive), more fail each such output's check (the input is retried, then dead-lettered).
//! Invariant: the count a handler broadcasts over is the topic's count read from the broker
//! at start ([`resolve_broadcast_partitions`]): the setting (`broadcast_partitions`,
//! `address_partitions`) is 0 (take the topic's count) or the count expected, and a topic
//! with another count, or none, stops the start with a message naming both. A topic grown
//! while the processor runs is seen at its next start (matching, which reads these topics,
//! stops when its inputs grow unless told otherwise: see docs/processors.md).

pub mod bounces;
pub mod deals;
pub mod imports;
pub mod matching;
pub mod notifications;

use spool_client::Client;
use spool_processor::{Context, Failure};

use crate::events::Event as Payload;

/// The CloudEvent for a payload: type, key and subject from the payload, `source`
/// `/bestprice/<processor>`, time = the payload's event time, a deterministic `id`.
pub fn envelope<T: Payload + Clone>(
    processor: &str,
    id: impl Into<String>,
    data: &T,
    at_ms: i64,
) -> spool_processor::Event<T> {
    envelope_owned(processor, id, data.clone(), at_ms)
}

/// [`envelope`] taking the payload by value: no copy of it (matching emits three events per
/// user of a deal's audience, each already built for that one output).
pub fn envelope_owned<T: Payload>(
    processor: &str,
    id: impl Into<String>,
    data: T,
    at_ms: i64,
) -> spool_processor::Event<T> {
    let (subject, key) = (data.subject(), data.key());
    spool_processor::Event::new(T::TYPE, format!("/bestprice/{processor}"), id, data)
        .subject(subject)
        .key(key.into_bytes())
        .time_ms(at_ms)
}

/// Emits a payload to its topic, partitioned by its key.
pub fn emit<T: Payload + Clone>(
    ctx: &mut Context<'_>,
    id: impl Into<String>,
    data: &T,
    at_ms: i64,
) -> Result<(), Failure> {
    emit_owned(ctx, id, data.clone(), at_ms)
}

/// [`emit`] taking the payload by value (no copy of it).
pub fn emit_owned<T: Payload>(
    ctx: &mut Context<'_>,
    id: impl Into<String>,
    data: T,
    at_ms: i64,
) -> Result<(), Failure> {
    let r = envelope_owned(ctx.processor(), id, data, at_ms)
        .into_record()
        .map_err(|e| Failure::fatal(e.to_string()))?;
    ctx.emit(T::TOPIC, r);
    Ok(())
}

/// Emits a copy of a payload to each of `partitions` partitions of `topic`.
pub fn broadcast<T: Payload + Clone>(
    ctx: &mut Context<'_>,
    topic: &str,
    partitions: u32,
    id: impl Into<String>,
    data: &T,
    at_ms: i64,
) -> Result<(), Failure> {
    let e = envelope(ctx.processor(), id, data, at_ms);
    let r = e.to_record().map_err(|e| Failure::fatal(e.to_string()))?;
    for p in 0..partitions {
        ctx.emit_to(topic, p, r.clone());
    }
    Ok(())
}

/// Why a broadcast's partition count was refused at start ([`resolve_broadcast_partitions`]).
#[derive(Debug, thiserror::Error)]
pub enum PartitionsError {
    /// The topic does not exist.
    #[error(
        "{topic} does not exist: create the pipeline's topics before starting this processor \
         (docs/operations.md, \"Topics first\"); [app] {setting} = {configured}"
    )]
    Missing {
        /// The topic.
        topic: String,
        /// The setting's name.
        setting: &'static str,
        /// Its value.
        configured: u32,
    },
    /// The topic has another count than the setting.
    #[error(
        "{topic} has {actual} partitions but [app] {setting} = {configured}: every record is \
         copied to each of {topic}'s partitions, so they must agree; set {setting} = {actual} \
         (or 0 to take {topic}'s count at start)"
    )]
    Mismatch {
        /// The topic.
        topic: String,
        /// The setting's name.
        setting: &'static str,
        /// Its value.
        configured: u32,
        /// The topic's partition count.
        actual: u32,
    },
    /// The broker could not be asked.
    #[error("describing {topic}: {source}")]
    Broker {
        /// The topic.
        topic: String,
        /// The client's error.
        source: spool_client::Error,
    },
}

/// The partition count to broadcast over `topic`: its count on the broker, which must equal
/// `configured` (the `[app]` setting named `setting`) unless that is 0 (take the topic's).
pub async fn resolve_broadcast_partitions(
    client: &Client,
    topic: &str,
    setting: &'static str,
    configured: u32,
) -> Result<u32, PartitionsError> {
    let actual = match client.describe_topic(topic).await {
        Ok(d) => d.partitions.len() as u32,
        Err(spool_client::Error::UnknownTopic { .. }) => {
            return Err(PartitionsError::Missing {
                topic: topic.to_owned(),
                setting,
                configured,
            });
        }
        Err(source) => {
            return Err(PartitionsError::Broker {
                topic: topic.to_owned(),
                source,
            });
        }
    };
    if configured != 0 && configured != actual {
        return Err(PartitionsError::Mismatch {
            topic: topic.to_owned(),
            setting,
            configured,
            actual,
        });
    }
    Ok(actual)
}

/// [`resolve_broadcast_partitions`] for a binary's start, before its runtime exists: connects
/// with the processor's configuration on a runtime of its own. A mismatch ends the process
/// here with [`spool_processor::app::MISCONFIGURED_EXIT_CODE`] (the message on stderr), which
/// the systemd unit does not restart: every start would stop the same way until an operator
/// changes the setting or the topic. A missing topic or an unreachable broker is an error
/// (exit 1, restarted: the topic may be created meanwhile).
pub fn resolve_broadcast_partitions_blocking(
    cfg: &spool_processor::config::ProcessorConfig,
    topic: &str,
    setting: &'static str,
    configured: u32,
) -> anyhow::Result<u32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = cfg.connect().await?;
        match resolve_broadcast_partitions(&client, topic, setting, configured).await {
            Ok(n) => {
                tracing::info!(topic, partitions = n, "broadcasting to every partition");
                Ok(n)
            }
            Err(e @ PartitionsError::Mismatch { .. }) => {
                eprintln!("Error: {e}");
                std::process::exit(spool_processor::app::MISCONFIGURED_EXIT_CODE);
            }
            Err(e) => Err(e.into()),
        }
    })
}
