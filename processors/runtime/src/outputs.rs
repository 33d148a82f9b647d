//! Checks of a handler's outputs when it emits them, before they join the transaction.
//!
//! An output the broker would refuse for good (its topic does not exist, its partition is out
//! of range, it is over the topic's `max_message_bytes`) used to fail only when the
//! transactional producer wrote it: the transaction aborted, every partition was rewound, the
//! same input emitted the same output again, and so on forever, while the handler never saw a
//! failure it could dead-letter. Checked here, the same output fails its handler call instead,
//! and the runtime's failure path applies to that input alone (retries with backoff, then the
//! dead-letter topic, the reason in `spool_dlq_error`).
//!
//! # Invariants
//!
//! - Every output of a handler call or a timer is checked before the call's writes join the
//!   open transaction ([`crate::engine::OutputCheck`]): the topic exists, an explicit partition
//!   is below its partition count, and the record fits the topic's `max_message_bytes` in a
//!   batch of its own ([`spool_client::ProducerRecord::batch_size_bound`], uncompressed:
//!   the runtime writes uncompressed batches, and
//!   the transactional producer never packs a record into a batch past its `batch_bytes`). A
//!   failed check fails the call with [`Failure::retry`] naming the topic.
//! - A keyed output gets its partition here (murmur2 over the count it was checked against,
//!   partition 0 without a key), so it is written where it was checked.
//! - Metadata is cached per topic (prefixed name, as written), found or not found, and asked
//!   again when it is [`MAX_AGE`] old, when the set of owned partitions changes
//!   ([`Outputs::forget_all`]: partitions were perhaps added), and when a check would fail on
//!   it (a topic created or grown since is seen). Whatever the reason, a topic is asked about
//!   at most once per [`REFRESH_MIN`] (a handler emitting to a missing topic, or a broker
//!   that does not answer, costs at most one DescribeTopic per topic per second). At most
//!   [`MAX_TOPICS`] topics are cached; past that the cache starts over.
//! - When the broker cannot be asked (any error but an unknown topic) the last metadata known
//!   is used; with none, the output goes unchecked and keyed outputs are left to the
//!   producer: the write decides, and a transient failure aborts and rewinds as any other. A refusal for good that
//!   still comes back from a write (the topic deleted since its check) stops the processor
//!   ([`crate::runtime`]'s `abort_and_rewind`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use spool_client::Client;
use spool_client::partitioner::partition_for_key;

use crate::context::Emit;
use crate::engine::OutputCheck;
use crate::handler::Failure;

/// Metadata older than this is asked again (the transactional producer's and the plain
/// producer's default `metadata_max_age`).
pub(crate) const MAX_AGE: Duration = Duration::from_secs(60);
/// A check that would fail asks the broker again only if what it knows is this old.
pub(crate) const REFRESH_MIN: Duration = Duration::from_secs(1);
/// Topics cached at most.
pub(crate) const MAX_TOPICS: usize = 10_000;

/// What is known of a topic.
#[derive(Clone, Copy, Debug)]
struct Meta {
    /// Its partition count; `None`: the topic does not exist.
    partitions: Option<u32>,
    /// Its `max_message_bytes` (0: the broker did not say; not checked).
    max_bytes: u32,
    /// False: the broker could not be asked and nothing was known (outputs go unchecked).
    known: bool,
    /// When this was described.
    fetched: Instant,
    /// When the broker was last asked (described or failed).
    asked: Instant,
}

/// The output topics' metadata cache (see the module docs).
#[derive(Debug)]
pub(crate) struct Outputs {
    /// Prefix of every topic written (replay mode).
    prefix: String,
    topics: HashMap<String, Meta>,
}

impl Outputs {
    pub(crate) fn new(prefix: &str) -> Outputs {
        Outputs {
            prefix: prefix.to_owned(),
            topics: HashMap::new(),
        }
    }

    /// Forgets every topic (the owned partitions changed: partitions were perhaps added).
    pub(crate) fn forget_all(&mut self) {
        self.topics.clear();
    }

    /// What is known of `topic`: cached unless `refresh` or stale; `None` if the broker
    /// cannot be asked and nothing is known.
    async fn meta(&mut self, client: &Client, topic: &str, refresh: bool) -> Option<Meta> {
        let cached = self.topics.get(topic).copied();
        if let Some(m) = cached
            && (m.asked.elapsed() < REFRESH_MIN
                || (!refresh && m.known && m.fetched.elapsed() < MAX_AGE))
        {
            return m.known.then_some(m);
        }
        let now = Instant::now();
        let m = match client.describe_topic(topic).await {
            Ok(d) => Meta {
                partitions: Some(d.partitions.len() as u32),
                max_bytes: d.config.max_message_bytes,
                known: true,
                fetched: now,
                asked: now,
            },
            Err(spool_client::Error::UnknownTopic { .. }) => Meta {
                partitions: None,
                max_bytes: 0,
                known: true,
                fetched: now,
                asked: now,
            },
            Err(e) => {
                tracing::debug!(topic, error = %e, "describing an output topic failed");
                // The last known metadata, if any, asked again in REFRESH_MIN at the earliest.
                cached.filter(|m| m.known).map_or(
                    Meta {
                        partitions: None,
                        max_bytes: 0,
                        known: false,
                        fetched: now,
                        asked: now,
                    },
                    |m| Meta { asked: now, ..m },
                )
            }
        };
        if self.topics.len() >= MAX_TOPICS && !self.topics.contains_key(topic) {
            self.topics.clear();
        }
        self.topics.insert(topic.to_owned(), m);
        m.known.then_some(m)
    }

    /// Checks `emits` and gives keyed ones their partition (see the module docs).
    pub(crate) async fn check(
        &mut self,
        client: &Client,
        emits: &mut [Emit],
    ) -> Result<(), Failure> {
        for e in emits {
            // No allocation per output unless there is a prefix (replay mode).
            let topic: Cow<'_, str> = if self.prefix.is_empty() {
                Cow::Borrowed(&e.topic)
            } else {
                Cow::Owned(format!("{}{}", self.prefix, e.topic))
            };
            let mut meta = self.meta(client, &topic, false).await;
            if let Some(m) = meta
                && refused(&topic, m, e).is_some()
            {
                // Asked again (at most once per REFRESH_MIN): created or grown since?
                meta = self.meta(client, &topic, true).await;
            }
            let Some(m) = meta else {
                continue; // Unchecked: the broker cannot be asked now.
            };
            if let Some(why) = refused(&topic, m, e) {
                return Err(Failure::retry(why));
            }
            if e.partition.is_none()
                && let Some(n) = m.partitions
            {
                let key = e.record.key.as_deref();
                e.partition = Some(key.map_or(0, |k| partition_for_key(k, n.max(1))));
            }
        }
        Ok(())
    }
}

/// Why the broker would refuse `e` on `topic` as `m` describes it, if it would.
fn refused(topic: &str, m: Meta, e: &Emit) -> Option<String> {
    let Some(n) = m.partitions else {
        return Some(format!("output topic {topic:?} does not exist"));
    };
    if let Some(p) = e.partition
        && p >= n
    {
        return Some(format!(
            "output partition {p} of topic {topic:?} is out of range (the topic has {n})"
        ));
    }
    let size = e.record.batch_size_bound();
    if m.max_bytes > 0 && size > m.max_bytes as usize {
        return Some(format!(
            "output of up to {size} bytes to topic {topic:?} is over its max_message_bytes ({})",
            m.max_bytes
        ));
    }
    None
}

/// [`Outputs`] with the client to ask, as the engine's check of a call's outputs.
pub(crate) struct Gate<'a> {
    pub(crate) outputs: &'a mut Outputs,
    pub(crate) client: &'a Client,
}

impl OutputCheck for Gate<'_> {
    async fn check(&mut self, emits: &mut [Emit]) -> Result<(), Failure> {
        self.outputs.check(self.client, emits).await
    }
}
