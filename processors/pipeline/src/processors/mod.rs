//! The four processors as handlers on the processor runtime (`spool-processor`): each wraps
//! the pure logic of its module in the runtime's context (state stores, emits, effects).
//!
//! | processor | inputs | outputs | state |
//! | --- | --- | --- | --- |
//! | [`deals::Deals`] | `prices` | `deal-transitions` (by product), `deal-broadcast` (a copy per partition) | `products` |
//! | [`matching::Matching`] | `deal-broadcast`, `user-settings`, `address-status` (co-partitioned by number) | `notification-requests`, `timeline` | `m` (settings, index, flags, notified) |
//! | [`notifications::Notifications`] | `notification-requests`, `outgoing-mail` | `outgoing-mail`, `mail-status` | effects (idempotency keys) |
//! | [`bounces::Bounces`] | `postfix-log` | `mail-status`, `delivery-issues`, `address-status` (a copy per partition) | `queue` |
//! | [`imports::Imports`] | `feed-imports` | `import-status` (completed / stuck) | the completion counter `imports` |
//!
//! Matching is partitioned **by user**: each instance holds the settings of its users, and every
//! deal transition reaches every partition (`deal-broadcast`), so a deal with a large audience
//! is fanned out by all instances in parallel. Address flags are replicated the same way
//! (`address-status` has every flag in every partition), because an address's users can live
//! on any partition. See docs/pipeline.md.

pub mod bounces;
pub mod deals;
pub mod imports;
pub mod matching;
pub mod notifications;

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
