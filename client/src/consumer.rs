//! The streaming consumer.
//!
//! A [`Consumer`] follows a set of partitions over one `Subscribe` stream: the broker pushes
//! data as it is appended and a heartbeat (with the high watermarks) when idle. Records come
//! out decoded, in offset order per partition, from [`Consumer::next`] or as a `Stream`
//! ([`Consumer::into_stream`]).
//!
//! # Positions
//!
//! The consumer keeps a *position* per partition: the offset of the next record it will
//! return. Start positions are resolved on the client ([`StartAt`] → `ListOffsets` /
//! `FetchOffsets`) before subscribing, so the position is exact from the start: committing
//! before any record arrived, or reconnecting, never skips or repeats records. A position
//! advances when [`Consumer::next`] *returns* a record, so [`Consumer::commit`] commits exactly
//! what the caller has been given (at-least-once processing: commit after processing).
//!
//! # Failures
//!
//! - Retriable failures (broken connection, broker restarting, no message — not even a
//!   heartbeat — for three heartbeat intervals) make the consumer resubscribe from its
//!   positions after a backoff; `next` returns the error only after `max_reconnect_attempts`
//!   consecutive failures (and tries again if called again). The backoff is a deadline kept
//!   in the consumer, not a sleep inside one call: a `next` cancelled while waiting (by
//!   `tokio::time::timeout` or `select!`) neither restarts the wait nor counts a failure, so
//!   the next call waits out what is left, and `max_reconnect_attempts` counts attempts
//!   actually made, however often the caller polls.
//! - A position outside the partition's log (deleted by retention, an explicit offset past the
//!   end, a topic deleted and recreated) is handled by `offset_reset`: move to the earliest or
//!   latest offset, or return [`Error::OffsetOutOfRange`] with the partition's bounds. Positions
//!   are checked when assigned, when the broker reports one out of range, and before every
//!   resubscription after a failure.
//! - A subscribed topic deleted under the consumer (the broker ends the subscription with
//!   UNKNOWN_TOPIC) is retried like a broken connection: it may come back, re-created, and
//!   then the positions are checked against its new log (`offset_reset`, above); `next`
//!   returns [`Error::UnknownTopic`] after `max_reconnect_attempts` consecutive failures.
//!   (Kafka's consumer, too, retries a partition whose topic is unknown for a while.)
//! - Other errors (corrupt data, …) are returned as they are.
//!
//! # Limits
//!
//! The consumer decodes one broker message (at most `max_bytes` of batches, decompressed
//! within the client's `decode_limits`) at a time and asks for the next only when the
//! records of the previous one have all been returned; HTTP/2 flow control then holds the
//! broker back. So memory is bounded by one decoded message plus the HTTP/2 window.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use spool_proto::v1;
use tonic::Streaming;

use crate::client::Client;
use crate::decode::decode_batches;
use crate::error::{Error, OutOfRange, Result};
use crate::retry::Backoff;
use crate::types::{OffsetCommit, OffsetSpec, Record, StartAt, TopicPartition};

/// ListOffsets queries per request, at most: well under the broker's default
/// `max_partitions_per_request` (10 000), so assigning or checking many partitions is split
/// into requests rather than refused.
const MAX_QUERIES_PER_REQUEST: usize = 4096;

/// What to do when a position is outside the log, or `StartAt::Committed` finds no commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OffsetReset {
    /// Move to the first offset still in the log (default: never skips retained data).
    #[default]
    Earliest,
    /// Move to the high watermark (skips everything up to now).
    Latest,
    /// Return [`Error::OffsetOutOfRange`] (or [`Error::NoCommittedOffset`]).
    Error,
}

/// Consumer settings.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// The consumer group whose offsets [`Consumer::commit`] and `StartAt::Committed` use.
    pub group: Option<String>,
    /// Largest amount of data per broker message (default 1 MiB; the broker caps it at its
    /// `max_fetch_bytes`, 16 MiB by default).
    pub max_bytes: u32,
    /// Heartbeat interval asked of the broker when idle (default 5 s, minimum 100 ms). No
    /// message for three intervals counts as a dead connection.
    pub heartbeat_interval: Duration,
    /// Out-of-range / no-commit policy (default: earliest).
    pub offset_reset: OffsetReset,
    /// Backoff between reconnects.
    pub reconnect_backoff: Backoff,
    /// Consecutive failed (re)connects before `next` returns the error (default 10).
    pub max_reconnect_attempts: u32,
    /// What the consumer sees (default: read committed: only committed transactions'
    /// records, and nothing past a partition's last stable offset).
    pub isolation: crate::Isolation,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group: None,
            max_bytes: 1 << 20,
            heartbeat_interval: Duration::from_secs(5),
            offset_reset: OffsetReset::Earliest,
            reconnect_backoff: Backoff::default(),
            max_reconnect_attempts: 10,
            isolation: crate::Isolation::ReadCommitted,
        }
    }
}

impl ConsumerConfig {
    /// Default settings with a consumer group.
    pub fn with_group(group: impl Into<String>) -> ConsumerConfig {
        ConsumerConfig {
            group: Some(group.into()),
            ..ConsumerConfig::default()
        }
    }
}

#[derive(Debug)]
struct Assignment {
    topic: Arc<str>,
    partition: u32,
    /// Next offset to return.
    position: u64,
    /// Last known high watermark.
    high_watermark: Option<u64>,
    /// What the group has committed, as far as this consumer knows.
    committed: Option<u64>,
}

#[derive(Debug)]
enum Item {
    Record(usize, Record),
    /// Move a position past offsets that hold no record to return: the gaps compaction
    /// leaves (and, later, transaction markers).
    Advance(usize, u64),
}

/// Follows partitions and returns their records. See the [module docs](self).
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    assigned: Vec<Assignment>,
    index: HashMap<TopicPartition, usize>,
    stream: Option<Streaming<v1::SubscribeResponse>>,
    buffer: VecDeque<Item>,
    /// Consecutive failures of the subscription (attempts made, not calls of `next`).
    failures: u32,
    /// The last of those failures, while they are being retried ([`Consumer::retrying`]).
    last_failure: Option<String>,
    /// After a retriable failure: no new attempt before this instant (the backoff). Kept
    /// across cancelled `next` calls; cleared when the wait is over.
    retry_at: Option<tokio::time::Instant>,
    /// Positions were checked against the logs since the last failure.
    validated: bool,
    /// Subscriptions dropped with data on the way ([`Consumer::stream_resets`]).
    resets: u64,
    /// Buffered records dropped by those ([`Consumer::dropped_records`]).
    dropped: u64,
}

impl Consumer {
    /// A consumer on `client`'s connection with nothing assigned yet.
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer {
            client,
            config,
            assigned: Vec::new(),
            index: HashMap::new(),
            stream: None,
            buffer: VecDeque::new(),
            failures: 0,
            last_failure: None,
            retry_at: None,
            validated: true,
            resets: 0,
            dropped: 0,
        }
    }

    /// The client this consumer uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The settings in force.
    pub fn config(&self) -> &ConsumerConfig {
        &self.config
    }

    /// Follows (or moves) partitions from the given start positions, resolved now. Partitions
    /// already assigned keep their position unless listed here.
    ///
    /// Errors: [`Error::UnknownTopic`] / [`Error::UnknownPartition`], [`Error::NoGroup`] for
    /// `StartAt::Committed` without a group, and per `offset_reset`:
    /// [`Error::OffsetOutOfRange`] / [`Error::NoCommittedOffset`].
    pub async fn assign(&mut self, partitions: &[(TopicPartition, StartAt)]) -> Result<()> {
        let positions = self.resolve(partitions).await?;
        for ((tp, _), (position, committed)) in partitions.iter().zip(positions) {
            match self.index.get(tp) {
                Some(&i) => {
                    let a = &mut self.assigned[i];
                    a.position = position;
                    if committed.is_some() {
                        a.committed = committed;
                    }
                }
                None => {
                    self.index.insert(tp.clone(), self.assigned.len());
                    self.assigned.push(Assignment {
                        topic: Arc::from(tp.topic.as_str()),
                        partition: tp.partition,
                        position,
                        high_watermark: None,
                        committed,
                    });
                }
            }
        }
        self.validated = true;
        self.reset_stream();
        Ok(())
    }

    /// Follows one partition from `start`.
    pub async fn subscribe(&mut self, topic: &str, partition: u32, start: StartAt) -> Result<()> {
        self.assign(&[(TopicPartition::new(topic, partition), start)])
            .await
    }

    /// Follows every partition of `topic` (as many as it has now) from `start`.
    pub async fn subscribe_topic(&mut self, topic: &str, start: StartAt) -> Result<()> {
        let d = self.client.describe_topic(topic).await?;
        let wants: Vec<_> = d
            .partitions
            .iter()
            .map(|p| (TopicPartition::new(topic, p.partition), start))
            .collect();
        self.assign(&wants).await
    }

    /// Moves one assigned (or new) partition to `start`.
    pub async fn seek(&mut self, topic: &str, partition: u32, start: StartAt) -> Result<()> {
        self.subscribe(topic, partition, start).await
    }

    /// Stops following a partition. Returns false if it was not assigned.
    pub fn unassign(&mut self, topic: &str, partition: u32) -> bool {
        let Some(i) = self.index.remove(&TopicPartition::new(topic, partition)) else {
            return false;
        };
        self.assigned.remove(i);
        for (n, a) in self.assigned.iter().enumerate().skip(i) {
            self.index
                .insert(TopicPartition::new(&*a.topic, a.partition), n);
        }
        self.reset_stream();
        true
    }

    /// The assigned partitions and their positions (next offset to return).
    pub fn positions(&self) -> Vec<(TopicPartition, u64)> {
        self.assigned
            .iter()
            .map(|a| (TopicPartition::new(&*a.topic, a.partition), a.position))
            .collect()
    }

    /// Whether any partition is assigned.
    pub fn has_assignment(&self) -> bool {
        !self.assigned.is_empty()
    }

    /// The position of one partition, if assigned.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        let i = *self.index.get(&TopicPartition::new(topic, partition))?;
        Some(self.assigned[i].position)
    }

    /// Records between the position and the last high watermark the broker reported (data
    /// or heartbeat); `None` before the first report.
    pub fn lag(&self, topic: &str, partition: u32) -> Option<u64> {
        let a = &self.assigned[*self.index.get(&TopicPartition::new(topic, partition))?];
        Some(a.high_watermark?.saturating_sub(a.position))
    }

    /// Commits the positions of all assigned partitions that moved since the last commit (or
    /// since they were resolved) to the group. Durable when it returns.
    pub async fn commit(&mut self) -> Result<()> {
        let group = self.config.group.clone().ok_or(Error::NoGroup)?;
        let changed: Vec<usize> = (0..self.assigned.len())
            .filter(|&i| self.assigned[i].committed != Some(self.assigned[i].position))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let offsets: Vec<OffsetCommit> = changed
            .iter()
            .map(|&i| {
                let a = &self.assigned[i];
                OffsetCommit {
                    topic: a.topic.to_string(),
                    partition: a.partition,
                    offset: a.position,
                    metadata: String::new(),
                }
            })
            .collect();
        self.client.commit_offsets(&group, &offsets).await?;
        for (i, c) in changed.into_iter().zip(offsets) {
            self.assigned[i].committed = Some(c.offset);
        }
        Ok(())
    }

    /// The next record: waits for one if none is buffered. `None` when nothing is assigned.
    /// See the [module docs](self) for what is retried and what is returned.
    ///
    /// Cancel-safe: dropping the future (e.g. in `tokio::time::timeout` or `select!`) loses
    /// nothing, since a position only moves when a record is returned.
    pub async fn next(&mut self) -> Option<Result<Record>> {
        loop {
            while let Some(item) = self.buffer.pop_front() {
                match item {
                    Item::Record(i, r) => {
                        self.assigned[i].position = r.offset + 1;
                        return Some(Ok(r));
                    }
                    Item::Advance(i, next) => {
                        let a = &mut self.assigned[i];
                        a.position = a.position.max(next);
                    }
                }
            }
            if self.assigned.is_empty() {
                return None;
            }
            if let Some(at) = self.retry_at {
                // Cancel-safe: dropped here, the deadline stays and the next call resumes.
                tokio::time::sleep_until(at).await;
                self.retry_at = None;
            }
            if let Err(e) = self.receive().await
                && let Some(e) = self.recover(e).await
            {
                return Some(Err(e));
            }
        }
    }

    /// Opens the subscription now if it is not open, so that records are on their way before
    /// the next [`Consumer::next`] (used to read several consumers in priority order). Does
    /// nothing while the consumer is backing off after a failure: [`Consumer::next`] makes the
    /// next attempt when the backoff is over.
    pub async fn ensure_open(&mut self) -> Result<()> {
        let backing_off = self
            .retry_at
            .is_some_and(|at| at > tokio::time::Instant::now());
        if self.stream.is_none()
            && !self.assigned.is_empty()
            && self.buffer.is_empty()
            && !backing_off
        {
            if !self.validated {
                self.check_positions(None).await?;
            }
            let s = self.open().await?;
            self.stream = Some(s);
        }
        Ok(())
    }

    /// While the subscription is failing and being retried: the consecutive failed attempts
    /// so far and the last one's error. `None` once a message (data or heartbeat) arrives
    /// again, or after `next` returned the error. For callers that retry for a long time
    /// (`max_reconnect_attempts` large) and should tell someone they are stuck: a deleted
    /// topic or a broker that keeps answering a retriable error is retried like a restart.
    pub fn retrying(&self) -> Option<(u32, &str)> {
        self.last_failure.as_deref().map(|e| (self.failures, e))
    }

    /// The records as a `Stream` (each item is what [`Consumer::next`] returns).
    pub fn into_stream(self) -> impl Stream<Item = Result<Record>> + Send + 'static {
        futures_util::stream::unfold(self, |mut c| async move { c.next().await.map(|r| (r, c)) })
    }

    /// How many times an open subscription (or buffered records) was dropped because the
    /// assignment or a position changed ([`Consumer::assign`], [`Consumer::seek`],
    /// [`Consumer::unassign`], a position reset): each costs a new `Subscribe` and fetching
    /// again what the old one had delivered or had on its way. Failures of the stream are
    /// not counted.
    pub fn stream_resets(&self) -> u64 {
        self.resets
    }

    /// Decoded records dropped by those resets before they were returned (they are fetched
    /// again).
    pub fn dropped_records(&self) -> u64 {
        self.dropped
    }

    fn reset_stream(&mut self) {
        if self.stream.is_some() || !self.buffer.is_empty() {
            self.resets += 1;
            self.dropped += self
                .buffer
                .iter()
                .filter(|i| matches!(i, Item::Record(..)))
                .count() as u64;
        }
        self.stream = None;
        self.buffer.clear();
    }

    /// Opens the stream if needed, then waits for one message and buffers its records.
    async fn receive(&mut self) -> Result<()> {
        let liveness = self.heartbeat() * 3 + Duration::from_secs(1);
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                if !self.validated {
                    self.check_positions(None).await?;
                }
                let s = self.open().await?;
                self.stream.insert(s)
            }
        };
        let msg = match tokio::time::timeout(liveness, stream.message()).await {
            Ok(Ok(Some(msg))) => msg,
            Ok(Ok(None)) => {
                self.stream = None;
                return Err(Error::Unavailable {
                    message: "the broker ended the subscription".into(),
                });
            }
            Ok(Err(status)) => {
                self.stream = None;
                return Err(Error::from_status(&status));
            }
            Err(_) => {
                self.stream = None;
                return Err(Error::Timeout(liveness));
            }
        };
        self.failures = 0;
        self.last_failure = None;
        match msg.message {
            Some(v1::subscribe_response::Message::Data(d)) => self.take_data(d),
            Some(v1::subscribe_response::Message::Heartbeat(h)) => {
                for (a, hwm) in self.assigned.iter_mut().zip(h.high_watermarks) {
                    a.high_watermark = Some(hwm);
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn take_data(&mut self, d: v1::PartitionData) -> Result<()> {
        let Some(&i) = self
            .index
            .get(&TopicPartition::new(d.topic.as_str(), d.partition))
        else {
            return Err(Error::Protocol(format!(
                "data for {}/{}, which is not subscribed",
                d.topic, d.partition
            )));
        };
        if let Some(e) = &d.error {
            self.stream = None;
            let position = self.assigned[i].position;
            return Err(Error::from_partition_error(
                &d.topic,
                d.partition,
                Some(position),
                e,
            ));
        }
        let a = &mut self.assigned[i];
        a.high_watermark = Some(d.high_watermark);
        let mut records = Vec::new();
        if let Err(e) = decode_batches(
            &a.topic,
            a.partition,
            &d.record_batches,
            a.position,
            &self.client.options().decode_limits,
            &mut records,
        ) {
            // Resubscribing would get the same bytes: stop here, the caller decides.
            self.stream = None;
            return Err(e);
        }
        self.buffer
            .extend(records.into_iter().map(|r| Item::Record(i, r)));
        self.buffer.push_back(Item::Advance(i, d.next_offset));
        Ok(())
    }

    fn heartbeat(&self) -> Duration {
        self.config
            .heartbeat_interval
            .max(Duration::from_millis(100))
    }

    async fn open(&self) -> Result<Streaming<v1::SubscribeResponse>> {
        let req = v1::SubscribeRequest {
            partitions: self
                .assigned
                .iter()
                .map(|a| v1::SubscribePartition {
                    topic: a.topic.to_string(),
                    partition: a.partition,
                    start: Some(v1::StartPosition {
                        position: Some(v1::start_position::Position::Offset(a.position)),
                    }),
                })
                .collect(),
            max_bytes: self.config.max_bytes,
            decode_records: false,
            heartbeat_interval_ms: u32::try_from(self.heartbeat().as_millis()).unwrap_or(u32::MAX),
            isolation_level: crate::client::isolation_to_wire(self.config.isolation),
        };
        // No deadline on the request: it would bound the whole stream. Only opening is timed.
        let timeout = self.client.options().request_timeout;
        let req = self.client.stream_request(req);
        self.client
            .unary(timeout, self.client.consume_stub().subscribe(req))
            .await
    }

    /// Deals with a failure of `receive`: `None` to go on (after the backoff, which `next`
    /// waits out through `retry_at`, or a reset), or the error to return.
    async fn recover(&mut self, e: Error) -> Option<Error> {
        self.validated = false;
        // A topic deleted under the subscription may be re-created: retried as a broken
        // connection is (module docs).
        let gone = matches!(
            e,
            Error::UnknownTopic { .. } | Error::UnknownPartition { .. }
        );
        if e.is_retriable() || gone {
            self.failures = self.failures.saturating_add(1);
            if self.failures > self.config.max_reconnect_attempts {
                self.failures = 0;
                self.last_failure = None;
                return Some(e);
            }
            // Bounded: an error's text is the broker's bounded message plus our context.
            self.last_failure = Some(e.to_string());
            let delay = self.config.reconnect_backoff.delay(self.failures);
            tracing::debug!(error = %e, ?delay, attempt = self.failures, "subscription failed; resubscribing");
            // Not a sleep here: a cancelled `next` would lose it and retry at once (module docs).
            self.retry_at = Some(tokio::time::Instant::now() + delay);
            return None;
        }
        if matches!(e, Error::OffsetOutOfRange(_)) {
            let failed = self.check_positions(Some(&e)).await.err();
            if failed.is_some() {
                // Returned to the caller: no longer "retrying" (`retrying`'s docs).
                self.last_failure = None;
            }
            return failed;
        }
        self.last_failure = None;
        Some(e)
    }

    /// Checks every position against its partition's log (one `ListOffsets`) and applies
    /// `offset_reset` to those outside it. Runs before resubscribing after a failure (the
    /// broker's Subscribe waits silently at an offset past the end, e.g. after the topic was
    /// recreated) and when the broker reports a position out of range (without saying which,
    /// on the Subscribe stream). `cause` is the broker's error, if any.
    async fn check_positions(&mut self, cause: Option<&Error>) -> Result<()> {
        let tps: Vec<TopicPartition> = self
            .assigned
            .iter()
            .map(|a| TopicPartition::new(&*a.topic, a.partition))
            .collect();
        let bounds = self.bounds(&tps).await?;
        let mut found = false;
        for (i, (start, end)) in bounds.into_iter().enumerate() {
            let a = &mut self.assigned[i];
            if (start..=end).contains(&a.position) {
                continue;
            }
            found = true;
            a.position = match self.config.offset_reset {
                OffsetReset::Earliest => start,
                OffsetReset::Latest => end,
                OffsetReset::Error => {
                    let message = match cause {
                        Some(e) => e.to_string(),
                        None => format!(
                            "position {} is outside [{start}, {end}] of {}/{}",
                            a.position, a.topic, a.partition
                        ),
                    };
                    return Err(Error::OffsetOutOfRange(Box::new(OutOfRange {
                        topic: Some(a.topic.to_string()),
                        partition: Some(a.partition),
                        offset: Some(a.position),
                        log_start_offset: Some(start),
                        high_watermark: Some(end),
                        message,
                    })));
                }
            };
            tracing::info!(topic = &*a.topic, partition = a.partition, position = a.position, policy = ?self.config.offset_reset, "position was out of range; reset");
        }
        if let (Some(e), false) = (cause, found) {
            tracing::debug!(error = %e, "out of range, but every position is in range now; resubscribing");
        }
        self.validated = true;
        self.reset_stream();
        Ok(())
    }

    /// `(log_start_offset, high_watermark)` of each partition, in requests of at most
    /// [`MAX_QUERIES_PER_REQUEST`] queries.
    async fn bounds(&self, tps: &[TopicPartition]) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::with_capacity(tps.len());
        for chunk in tps.chunks(MAX_QUERIES_PER_REQUEST / 2) {
            let queries: Vec<_> = chunk
                .iter()
                .flat_map(|tp| {
                    [
                        (tp.clone(), OffsetSpec::Earliest),
                        (tp.clone(), OffsetSpec::Latest),
                    ]
                })
                .collect();
            let answers = self.client.list_offsets(&queries).await?;
            let mut it = answers.into_iter();
            while let (Some(start), Some(end)) = (it.next(), it.next()) {
                out.push((start?.offset, end?.offset));
            }
        }
        Ok(out)
    }

    /// Resolves start positions to offsets, with the committed offset where one was read.
    async fn resolve(
        &self,
        wants: &[(TopicPartition, StartAt)],
    ) -> Result<Vec<(u64, Option<u64>)>> {
        let committed_tps: Vec<TopicPartition> = wants
            .iter()
            .filter(|(_, s)| *s == StartAt::Committed)
            .map(|(tp, _)| tp.clone())
            .collect();
        let mut committed: HashMap<TopicPartition, Option<u64>> = HashMap::new();
        if !committed_tps.is_empty() {
            let group = self.config.group.as_deref().ok_or(Error::NoGroup)?;
            for c in self.client.fetch_offsets(group, &committed_tps).await? {
                committed.insert(TopicPartition::new(c.topic, c.partition), c.offset);
            }
        }
        let tps: Vec<TopicPartition> = wants.iter().map(|(tp, _)| tp.clone()).collect();
        let bounds = self.bounds(&tps).await?;
        let ts_queries: Vec<_> = wants
            .iter()
            .filter_map(|(tp, s)| match s {
                StartAt::Timestamp(ts) => Some((tp.clone(), OffsetSpec::Timestamp(*ts))),
                _ => None,
            })
            .collect();
        let mut by_time = Vec::with_capacity(ts_queries.len());
        for chunk in ts_queries.chunks(MAX_QUERIES_PER_REQUEST) {
            by_time.extend(self.client.list_offsets(chunk).await?);
        }
        let mut by_time = by_time.into_iter();
        let mut out = Vec::with_capacity(wants.len());
        for ((tp, start), (log_start, hwm)) in wants.iter().zip(bounds) {
            let reset = |what: Error| match self.config.offset_reset {
                OffsetReset::Earliest => Ok(log_start),
                OffsetReset::Latest => Ok(hwm),
                OffsetReset::Error => Err(what),
            };
            let out_of_range = |offset: u64| {
                Error::OffsetOutOfRange(Box::new(OutOfRange {
                    topic: Some(tp.topic.clone()),
                    partition: Some(tp.partition),
                    offset: Some(offset),
                    log_start_offset: Some(log_start),
                    high_watermark: Some(hwm),
                    message: format!(
                        "offset {offset} is outside [{log_start}, {hwm}] of {}/{}",
                        tp.topic, tp.partition
                    ),
                }))
            };
            let mut commit = None;
            let candidate = match start {
                StartAt::Earliest => log_start,
                StartAt::Latest => hwm,
                StartAt::Offset(o) => *o,
                StartAt::Timestamp(_) => match by_time.next() {
                    Some(r) => r?.offset,
                    None => return Err(Error::Protocol("missing timestamp answer".into())),
                },
                StartAt::Committed => match committed.get(tp).copied().flatten() {
                    Some(o) => {
                        commit = Some(o);
                        o
                    }
                    None => {
                        out.push((
                            reset(Error::NoCommittedOffset {
                                topic: tp.topic.clone(),
                                partition: tp.partition,
                            })?,
                            None,
                        ));
                        continue;
                    }
                },
            };
            let position = if (log_start..=hwm).contains(&candidate) {
                candidate
            } else {
                reset(out_of_range(candidate))?
            };
            out.push((position, commit));
        }
        Ok(out)
    }
}
