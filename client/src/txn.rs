//! A transactional producer: writes to many partitions of many topics, and consumer-group
//! offsets, then commits or aborts all of it at once.
//!
//! ```no_run
//! # async fn demo(client: spool_client::Client) -> spool_client::Result<()> {
//! use spool_client::{ProducerRecord, TransactionalConfig, TransactionalProducer};
//! let mut tx = TransactionalProducer::new(client, TransactionalConfig::new("deals-matcher-0")).await?;
//! tx.begin()?;
//! tx.send("notifications", 0, ProducerRecord::new("mail user 42")).await?;
//! tx.send("audit", 3, ProducerRecord::new("matched deal 7")).await?;
//! match tx.commit().await {
//!     Ok(()) => {}
//!     Err(e) => { tx.abort().await?; return Err(e); }
//! }
//! # Ok(()) }
//! ```
//!
//! Invariants:
//! - One transaction at a time; every batch carries the producer id, the epoch of the current
//!   transaction and per-partition sequence numbers from 0, and the transactional flag. A
//!   retried batch is resent byte for byte (the broker acknowledges a duplicate with its
//!   original offsets).
//! - `commit` sends every buffered batch and waits for all of them before asking the broker
//!   to commit, so a commit never races its own writes. The broker bumps the epoch at every
//!   end; the producer takes the new one (a late write of an ended transaction is fenced).
//! - After any failed write or commit the transaction can only be aborted (`abort` succeeds
//!   even after the broker timed the transaction out, and hands out the next epoch). A
//!   `ProducerFenced` error means a newer epoch exists: the broker aborted the transaction
//!   itself (at a restart or a timeout; `abort` then succeeds and hands out the next
//!   epoch), or another instance took over the transactional id (`abort` is refused too).
//! - Memory: at most `batch_bytes` buffered per partition; a full batch is sent at once. A
//!   partition's batch is capped at `min(batch_bytes, the topic's max_message_bytes)`: a
//!   record that would take the open batch past that cap sends it first, so a batch is at
//!   most the cap or a single record (records that each fit the topic's limit are never
//!   refused for being packed together, whatever the topic's limit). The cap is measured
//!   uncompressed: with `compression` on, data that does not compress can come out a few
//!   bytes larger in lz4 or zstd framing, so a batch at exactly the cap may still be refused
//!   as too large (the processor runtime writes uncompressed).
//!   With `write_behind` it is written in the background while the caller goes on
//!   buffering: at most `max_writes_in_flight` such writes at a time, and at most one per
//!   partition (so a partition's batches reach the broker in sequence order): a full batch
//!   waits for its partition's write in flight and, at the bound, for the oldest write;
//!   `flush`, `commit` and `abort` wait for all of them first, and a failure fails the
//!   transaction there.
//! - `send_keyed` hashes over the topic's partition count as described at most
//!   `metadata_max_age` ago (default 60 s, as [`crate::ProducerConfig::metadata_max_age`]):
//!   a topic grown since is picked up within that bound, never cached forever. Counts and
//!   limits are cached per topic: one DescribeTopic per topic per `metadata_max_age`, and
//!   after a failed one at most one per [`DESCRIBE_RETRY`] (the old values, if any, are used
//!   meanwhile; with none, `send` caps at `batch_bytes` and `send_keyed` fails).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_record::BatchBuilder;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::partitioner::partition_for_key;
use crate::producer::{Acks, Compression, now_ms};
use crate::retry::Backoff;
use crate::types::{OffsetCommit, ProducerRecord, TxnOffsets};

/// Per-step timings of a commit: one debug event per step (`step`, `us`) on this target, read
/// by the pipeline bench's breakdown (`SPOOL_LOG=warn,spool_client::txn::timing=debug`).
macro_rules! step_timing {
    ($step:expr, $started:expr) => {
        tracing::debug!(target: "spool_client::txn::timing", step = $step, us = $started.elapsed().as_micros() as u64)
    };
}

/// Settings of a [`TransactionalProducer`].
#[derive(Clone, Debug)]
pub struct TransactionalConfig {
    /// The stable id of this producer (the same across restarts of the application instance:
    /// a new instance fences the old one).
    pub transactional_id: String,
    /// The broker aborts a transaction open longer than this (default 60 s).
    pub transaction_timeout: Duration,
    /// Compression of batches (default none).
    pub compression: Compression,
    /// A partition's buffered records are sent as one batch when they reach this many bytes
    /// (default 1 MiB).
    pub batch_bytes: usize,
    /// Attempts per batch on retriable errors (default 5).
    pub max_attempts: u32,
    /// Backoff between attempts.
    pub backoff: Backoff,
    /// Write a full batch in the background (default false): `send` returns before the
    /// broker acknowledged it, and its failure fails the next full batch, `flush` or
    /// `commit` instead. For loops that go on producing meanwhile (the processor runtime).
    pub write_behind: bool,
    /// With `write_behind`: full batches written at once, each of a different partition
    /// (default 1). Each write waits for the broker's durable append (an fsync under
    /// `fsync = always`), so with one at a time a loop that fills batches faster than that
    /// waits for every write in turn; the plain producer keeps up to 5 requests in flight.
    pub max_writes_in_flight: usize,
    /// How long `send_keyed` uses a topic's partition count before describing the topic
    /// again (default 60 s, as the plain producer's `metadata_max_age`): the bound on how
    /// long keyed records still hash over the old count after partitions were added.
    pub metadata_max_age: Duration,
}

impl TransactionalConfig {
    /// Defaults for `transactional_id`.
    pub fn new(transactional_id: impl Into<String>) -> TransactionalConfig {
        TransactionalConfig {
            transactional_id: transactional_id.into(),
            transaction_timeout: Duration::from_secs(60),
            compression: Compression::None,
            batch_bytes: 1 << 20,
            max_attempts: 5,
            backoff: Backoff::default(),
            write_behind: false,
            max_writes_in_flight: 1,
            metadata_max_age: Duration::from_secs(60),
        }
    }
}

#[derive(Debug)]
struct PartitionBuf {
    builder: Option<BatchBuilder>,
    next_seq: i32,
}

/// Where the producer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    InTxn,
    /// A write or commit failed: only `abort` is possible.
    MustAbort,
}

/// The producer (see the module docs).
#[derive(Debug)]
pub struct TransactionalProducer {
    client: Client,
    cfg: TransactionalConfig,
    producer: (i64, i16),
    phase: Phase,
    /// Batches by topic, then partition (by topic first so a send finds its buffer without
    /// allocating the topic's name).
    parts: BTreeMap<String, BTreeMap<u32, PartitionBuf>>,
    /// Per topic, its partition count and `max_message_bytes` as last described (refreshed
    /// after `metadata_max_age`), or the last failure to describe it.
    topics: HashMap<String, Described>,
    /// Per partition, the offset after the last record the open transaction wrote there.
    written: BTreeMap<(String, u32), u64>,
    /// The same for the last committed transaction.
    committed_ends: BTreeMap<(String, u32), u64>,
    /// Full batches being written in the background, oldest first, with their partition (at
    /// most `max_writes_in_flight`, at most one per partition).
    in_flight: VecDeque<((String, u32), Writing)>,
    /// Offsets of the open transaction, by group, sent with its commit.
    offsets: Vec<TxnOffsets>,
    /// False once the broker answered CommitTxn with UNIMPLEMENTED (an older broker): the
    /// offsets then go by AddOffsetsToTxn before EndTxn.
    commit_txn: bool,
}

/// After a failed DescribeTopic, the topic is not described again for this long.
pub const DESCRIBE_RETRY: Duration = Duration::from_secs(1);

/// What the producer knows of a topic.
#[derive(Clone, Debug)]
struct Described {
    /// Partition count and `max_message_bytes` (0: not said), when known.
    meta: Option<(u32, u32)>,
    /// When they were described.
    fetched: Instant,
    /// When the broker was last asked, and its error if that failed.
    asked: Instant,
    failed: Option<Error>,
}

/// Headers of a record passed to the batch builder without a heap allocation.
const INLINE_HEADERS: usize = 12;

fn header_view(h: &crate::types::Header) -> (&str, Option<&[u8]>) {
    (h.key.as_str(), h.value.as_deref())
}

/// Per partition, the offset after the last record a write appended.
type Written = Vec<((String, u32), u64)>;

/// A full batch being written in the background.
type Writing = tokio::task::JoinHandle<Result<Written>>;

impl TransactionalProducer {
    /// Registers the transactional id with the broker (fencing older instances and aborting
    /// what they left open).
    pub async fn new(client: Client, cfg: TransactionalConfig) -> Result<TransactionalProducer> {
        let producer = client
            .init_transactional_id(&cfg.transactional_id, cfg.transaction_timeout, None)
            .await?;
        Ok(TransactionalProducer {
            client,
            cfg,
            producer,
            phase: Phase::Idle,
            parts: BTreeMap::new(),
            topics: HashMap::new(),
            written: BTreeMap::new(),
            committed_ends: BTreeMap::new(),
            in_flight: VecDeque::new(),
            offsets: Vec::new(),
            commit_txn: true,
        })
    }

    /// The producer id and epoch of the current (or next) transaction.
    pub fn producer(&self) -> (i64, i16) {
        self.producer
    }

    /// For each partition the last committed transaction wrote to, the offset just after its
    /// last record there (e.g. how far a changelog is known to be applied). Replaced by each
    /// successful [`TransactionalProducer::commit`].
    pub fn last_commit_ends(&self) -> &BTreeMap<(String, u32), u64> {
        &self.committed_ends
    }

    /// Starts a transaction (local: the broker learns of it from the first write).
    pub fn begin(&mut self) -> Result<()> {
        match self.phase {
            Phase::Idle => {
                self.phase = Phase::InTxn;
                Ok(())
            }
            Phase::InTxn => Err(Error::InvalidTxnState {
                message: "a transaction is already open".into(),
            }),
            Phase::MustAbort => Err(Error::InvalidTxnState {
                message: "the last transaction failed: abort it first".into(),
            }),
        }
    }

    fn require_open(&self) -> Result<()> {
        match self.phase {
            Phase::InTxn => Ok(()),
            Phase::Idle => Err(Error::InvalidTxnState {
                message: "no transaction open: call begin".into(),
            }),
            Phase::MustAbort => Err(Error::InvalidTxnState {
                message: "the transaction failed: abort it".into(),
            }),
        }
    }

    /// Adds a record for `topic`/`partition` to the transaction (buffered; a full batch is
    /// sent at once).
    pub async fn send(&mut self, topic: &str, partition: u32, rec: ProducerRecord) -> Result<()> {
        self.require_open()?;
        // A record that would take the open batch past the cap goes into a new one: a batch
        // is at most the cap, or one record alone (see the module docs).
        let cap = self.batch_cap(topic).await;
        let size = rec.encoded_size_bound();
        let overflows = self
            .parts
            .get(topic)
            .and_then(|bufs| bufs.get(&partition))
            .and_then(|buf| buf.builder.as_ref())
            .is_some_and(|b| !b.is_empty() && b.size_bytes() + size > cap);
        if overflows {
            self.ship(topic, partition).await?;
        }
        let now = now_ms();
        let full = {
            if !self.parts.contains_key(topic) {
                self.parts.insert(topic.to_owned(), BTreeMap::new());
            }
            let buf = self
                .parts
                .get_mut(topic)
                .expect("inserted above")
                .entry(partition)
                .or_insert(PartitionBuf {
                    builder: None,
                    next_seq: 0,
                });
            // Sized for a full batch at once: growing it by doubling copied each batch about
            // twice and faulted in fresh memory for every copy.
            let b = buf.builder.get_or_insert_with(|| {
                BatchBuilder::with_capacity(
                    self.cfg.compression.engine(),
                    self.cfg.batch_bytes.saturating_add(16 << 10),
                )
            });
            // The usual few headers are passed from the stack, not a new Vec per record.
            let ts = rec.timestamp_ms.unwrap_or(now);
            let (key, value) = (rec.key.as_deref(), rec.value.as_deref());
            if rec.headers.len() <= INLINE_HEADERS {
                let mut headers = [("", None); INLINE_HEADERS];
                for (slot, h) in headers.iter_mut().zip(&rec.headers) {
                    *slot = header_view(h);
                }
                b.push(ts, key, value, &headers[..rec.headers.len()]);
            } else {
                let headers: Vec<(&str, Option<&[u8]>)> =
                    rec.headers.iter().map(header_view).collect();
                b.push(ts, key, value, &headers);
            }
            b.size_bytes() >= cap
        };
        if full {
            self.ship(topic, partition).await?;
        }
        Ok(())
    }

    /// Sends `topic`/`partition`'s open batch, if any: in the background with
    /// `write_behind`, else at once.
    async fn ship(&mut self, topic: &str, partition: u32) -> Result<()> {
        let batch = self.take_batch(topic, partition)?;
        if let Some(batch) = batch {
            if let Err(e) = self.make_room(topic, partition).await {
                self.phase = Phase::MustAbort;
                return Err(e);
            }
            let (client, attempts, backoff) =
                (self.client.clone(), self.cfg.max_attempts, self.cfg.backoff);
            let write =
                async move { write_batches(&client, attempts, &backoff, vec![batch]).await };
            if self.cfg.write_behind {
                self.in_flight
                    .push_back(((topic.to_owned(), partition), tokio::spawn(write)));
            } else {
                match write.await {
                    Ok(written) => self.note_written(written),
                    Err(e) => {
                        self.phase = Phase::MustAbort;
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Before a background write of `topic`/`partition`: waits for that partition's write in
    /// flight (and the older ones), then for the oldest while `max_writes_in_flight` are.
    async fn make_room(&mut self, topic: &str, partition: u32) -> Result<()> {
        if let Some(i) = self
            .in_flight
            .iter()
            .position(|((t, p), _)| t == topic && *p == partition)
        {
            for _ in 0..=i {
                self.settle_oldest().await?;
            }
        }
        while self.in_flight.len() >= self.cfg.max_writes_in_flight.max(1) {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// Waits for the oldest background write, if any, and notes where it ended.
    async fn settle_oldest(&mut self) -> Result<()> {
        let Some((_, h)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let written = h
            .await
            .map_err(|e| Error::Protocol(format!("batch writer: {e}")))??;
        self.note_written(written);
        Ok(())
    }

    /// Waits for every background write and notes where they ended (the first failure is
    /// returned; the writes after it are still waited for).
    async fn settle_in_flight(&mut self) -> Result<()> {
        let mut first = Ok(());
        while !self.in_flight.is_empty() {
            if let Err(e) = self.settle_oldest().await
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    fn note_written(&mut self, written: Written) {
        for (tp, end) in written {
            let e = self.written.entry(tp).or_insert(0);
            *e = (*e).max(end);
        }
    }

    /// Adds a record to the partition its key hashes to (murmur2, as Kafka's and Spool's
    /// producers); a record without a key goes to partition 0. The topic's partition count
    /// is described again once it is `metadata_max_age` old; if that fails with a retriable
    /// error, the old count is used.
    pub async fn send_keyed(&mut self, topic: &str, rec: ProducerRecord) -> Result<()> {
        let partitions = match self.describe(topic).await {
            Ok((n, _)) => n,
            Err(e) => return Err(e),
        };
        let p = rec
            .key
            .as_deref()
            .map_or(0, |k| partition_for_key(k, partitions.max(1)));
        self.send(topic, p, rec).await
    }

    /// `topic`'s partition count and `max_message_bytes`: cached for `metadata_max_age`; on
    /// a failure, the cached values if any (else the error), and no new DescribeTopic for
    /// [`DESCRIBE_RETRY`].
    async fn describe(&mut self, topic: &str) -> Result<(u32, u32)> {
        if let Some(d) = self.topics.get(topic) {
            let fresh = d.meta.is_some() && d.fetched.elapsed() < self.cfg.metadata_max_age;
            if fresh || (d.failed.is_some() && d.asked.elapsed() < DESCRIBE_RETRY) {
                return match (d.meta, &d.failed) {
                    (Some(m), _) => Ok(m),
                    (None, Some(e)) => Err(e.clone()),
                    (None, None) => Err(Error::Protocol(format!("topic {topic:?} undescribed"))),
                };
            }
        }
        let now = Instant::now();
        match self.client.describe_topic(topic).await {
            Ok(d) => {
                let m = (d.partitions.len() as u32, d.config.max_message_bytes);
                self.topics.insert(
                    topic.to_owned(),
                    Described {
                        meta: Some(m),
                        fetched: now,
                        asked: now,
                        failed: None,
                    },
                );
                Ok(m)
            }
            Err(e) => {
                let kept = self
                    .topics
                    .get(topic)
                    .filter(|_| e.is_retriable())
                    .and_then(|d| d.meta.map(|m| (m, d.fetched)));
                tracing::debug!(topic, error = %e, cached = kept.is_some(), "describing the topic failed");
                self.topics.insert(
                    topic.to_owned(),
                    Described {
                        meta: kept.map(|(m, _)| m),
                        fetched: kept.map_or(now, |(_, at)| at),
                        asked: now,
                        failed: Some(e.clone()),
                    },
                );
                match kept {
                    Some((m, _)) => Ok(m),
                    None => Err(e),
                }
            }
        }
    }

    /// The most a batch of `topic` may hold: `batch_bytes`, or less if the topic's
    /// `max_message_bytes` is smaller (as far as it is known).
    async fn batch_cap(&mut self, topic: &str) -> usize {
        match self.describe(topic).await {
            Ok((_, max)) if max > 0 => self.cfg.batch_bytes.min(max as usize),
            _ => self.cfg.batch_bytes,
        }
    }

    /// Commits `offsets` of `group` with the transaction (the "consume, process, produce"
    /// loop). `member` = (member id, generation) from a [`crate::GroupConsumer`] fences it.
    ///
    /// Kept here and sent with the commit (CommitTxn: one request, one durable record at the
    /// broker, the decision); a later call for the same group and partition replaces the
    /// earlier position. So a fenced member learns it at `commit`, which then fails (abort).
    /// Against a broker without CommitTxn, `commit` sends them by AddOffsetsToTxn first.
    pub async fn send_offsets(
        &mut self,
        group: &str,
        offsets: &[OffsetCommit],
        member: Option<(&str, u64)>,
    ) -> Result<()> {
        self.require_open()?;
        let member = member.map(|(m, g)| (m.to_owned(), g));
        let i = match self.offsets.iter().position(|g| g.group == group) {
            Some(i) => i,
            None => {
                self.offsets.push(TxnOffsets {
                    group: group.to_owned(),
                    ..TxnOffsets::default()
                });
                self.offsets.len() - 1
            }
        };
        let g = &mut self.offsets[i];
        g.member = member;
        for o in offsets {
            match g
                .offsets
                .iter_mut()
                .find(|c| c.topic == o.topic && c.partition == o.partition)
            {
                Some(c) => *c = o.clone(),
                None => g.offsets.push(o.clone()),
            }
        }
        Ok(())
    }

    /// Sends every buffered batch and waits for the broker to acknowledge them, without
    /// ending the transaction. On error the transaction must be aborted.
    pub async fn flush(&mut self) -> Result<()> {
        self.require_open()?;
        let batches = self.take_all()?;
        let sent = match self.settle_in_flight().await {
            Ok(()) => {
                write_batches(
                    &self.client,
                    self.cfg.max_attempts,
                    &self.cfg.backoff,
                    batches,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(written) => {
                self.note_written(written);
                Ok(())
            }
            Err(e) => {
                self.phase = Phase::MustAbort;
                Err(e)
            }
        }
    }

    /// Sends every buffered batch, then commits. On error the transaction must be aborted.
    pub async fn commit(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        self.flush().await?;
        step_timing!("flush", started);
        let ending = std::time::Instant::now();
        match self.end(true).await {
            Ok(()) => {
                step_timing!("end", ending);
                step_timing!("commit", started);
                Ok(())
            }
            Err(e) => {
                self.phase = Phase::MustAbort;
                Err(e)
            }
        }
    }

    /// Drops what is buffered and aborts the transaction.
    pub async fn abort(&mut self) -> Result<()> {
        if self.phase == Phase::Idle {
            return Ok(());
        }
        // Its outcome does not matter (the transaction aborts), only that it is over.
        for (_, h) in self.in_flight.drain(..) {
            let _ = h.await;
        }
        for buf in self.parts.values_mut().flat_map(BTreeMap::values_mut) {
            buf.builder = None;
        }
        self.offsets.clear();
        self.end(false).await
    }

    async fn end(&mut self, commit: bool) -> Result<()> {
        let groups = std::mem::take(&mut self.offsets);
        if commit && !groups.is_empty() {
            if self.commit_txn {
                match self.commit_with_offsets(&groups).await {
                    Err(Error::Rpc {
                        code: tonic::Code::Unimplemented,
                        ..
                    }) => self.commit_txn = false,
                    r => return self.ended(r, commit),
                }
            }
            for g in &groups {
                let started = std::time::Instant::now();
                let member = g.member.as_ref().map(|(m, gen_)| (m.as_str(), *gen_));
                self.client
                    .add_offsets_to_txn(
                        &self.cfg.transactional_id,
                        self.producer,
                        &g.group,
                        &g.offsets,
                        member,
                    )
                    .await?;
                step_timing!("add_offsets", started);
            }
        }
        let mut attempt = 0;
        loop {
            match self
                .client
                .end_txn(&self.cfg.transactional_id, self.producer, commit)
                .await
            {
                // A retry of an EndTxn that went through gets the same answer.
                Err(e) if e.is_retriable() && attempt + 1 < self.cfg.max_attempts => {
                    tokio::time::sleep(self.cfg.backoff.delay(attempt)).await;
                    attempt += 1;
                }
                r => return self.ended(r, commit),
            }
        }
    }

    /// CommitTxn with `groups`, retried on retriable errors (a retry of one that went
    /// through gets the same answer).
    async fn commit_with_offsets(&self, groups: &[TxnOffsets]) -> Result<(i64, i16)> {
        let mut attempt = 0;
        loop {
            match self
                .client
                .commit_txn(&self.cfg.transactional_id, self.producer, groups)
                .await
            {
                Err(e) if e.is_retriable() && attempt + 1 < self.cfg.max_attempts => {
                    tokio::time::sleep(self.cfg.backoff.delay(attempt)).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// The broker's answer to the end of the transaction: on success, the producer for the
    /// next one and (on commit) where this one's writes ended.
    fn ended(&mut self, r: Result<(i64, i16)>, commit: bool) -> Result<()> {
        let next = r?;
        self.producer = next;
        self.parts.clear();
        self.phase = Phase::Idle;
        let written = std::mem::take(&mut self.written);
        if commit {
            self.committed_ends = written;
        }
        Ok(())
    }

    /// The finished batch of one partition, stamped with its sequence. If it cannot be
    /// encoded (compression failed, over 2 GiB), its records are lost and the sequence has
    /// moved past them: the transaction must abort ([`Phase::MustAbort`]), else a commit
    /// would drop records whose `send` returned `Ok`.
    fn take_batch(&mut self, topic: &str, partition: u32) -> Result<Option<(String, u32, Bytes)>> {
        let (pid, epoch) = self.producer;
        let Some(buf) = self
            .parts
            .get_mut(topic)
            .and_then(|bufs| bufs.get_mut(&partition))
        else {
            return Ok(None);
        };
        let Some(mut b) = buf.builder.take() else {
            return Ok(None);
        };
        let n = b.len() as i32;
        b.producer(pid, epoch, buf.next_seq).transactional(true);
        buf.next_seq = buf.next_seq.wrapping_add(n);
        match b.finish() {
            Ok(batch) => Ok(Some((topic.to_owned(), partition, batch))),
            Err(e) => {
                self.phase = Phase::MustAbort;
                Err(e.into())
            }
        }
    }

    fn take_all(&mut self) -> Result<Vec<(String, u32, Bytes)>> {
        let keys: Vec<(String, u32)> = self
            .parts
            .iter()
            .flat_map(|(t, bufs)| bufs.keys().map(move |p| (t.clone(), *p)))
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for (t, p) in keys {
            if let Some(b) = self.take_batch(&t, p)? {
                out.push(b);
            }
        }
        Ok(out)
    }
}

/// Sends batches in one request, resending those that failed with a retriable error (byte
/// for byte: duplicates are recognised by the broker), up to `attempts` times; returns where
/// each write ended.
async fn write_batches(
    client: &Client,
    attempts: u32,
    backoff: &Backoff,
    mut batches: Vec<(String, u32, Bytes)>,
) -> Result<Written> {
    let mut written = Vec::new();
    let mut attempt = 0;
    while !batches.is_empty() {
        let results = match client.produce_batches(batches.clone(), Acks::Durable).await {
            Ok(r) => r,
            Err(e) if e.is_retriable() && attempt + 1 < attempts => {
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut retry = Vec::new();
        for (batch, r) in batches.into_iter().zip(results) {
            match r {
                Ok(a) => written.push(((batch.0, batch.1), a.last_offset + 1)),
                Err(e) if e.is_retriable() && attempt + 1 < attempts => retry.push(batch),
                Err(e) => return Err(naming_partition(e, &batch.0, batch.1)),
            }
        }
        if !retry.is_empty() {
            tokio::time::sleep(backoff.delay(attempt)).await;
            attempt += 1;
        }
        batches = retry;
    }
    Ok(written)
}

/// A per-batch refusal whose error does not name its partition (the broker's `TOO_LARGE` and
/// `INVALID_BATCH` messages say what is wrong, not where), with the partition added to its
/// message: the caller sees which output was refused.
fn naming_partition(e: Error, topic: &str, partition: u32) -> Error {
    match e {
        Error::TooLarge { message } => Error::TooLarge {
            message: format!("batch for {topic}/{partition}: {message}"),
        },
        Error::InvalidBatch { message } => Error::InvalidBatch {
            message: format!("batch for {topic}/{partition}: {message}"),
        },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A producer that has not talked to a broker (nothing here reaches one).
    fn offline() -> TransactionalProducer {
        let client = Client::builder("http://127.0.0.1:9")
            .connect_lazy()
            .expect("a valid address");
        TransactionalProducer {
            client,
            cfg: TransactionalConfig::new("t"),
            producer: (1, 0),
            phase: Phase::Idle,
            parts: BTreeMap::new(),
            topics: HashMap::new(),
            written: BTreeMap::new(),
            committed_ends: BTreeMap::new(),
            in_flight: VecDeque::new(),
            offsets: Vec::new(),
            commit_txn: true,
        }
    }

    #[tokio::test]
    async fn a_batch_that_cannot_be_encoded_fails_the_transaction() {
        let mut p = offline();
        p.begin().unwrap();
        // A builder `finish` refuses (no records): the failure an encode error takes.
        let empty = BatchBuilder::with_capacity(p.cfg.compression.engine(), 64);
        p.parts.entry("out".into()).or_default().insert(
            0,
            PartitionBuf {
                builder: Some(empty),
                next_seq: 0,
            },
        );
        assert!(p.flush().await.is_err());
        assert_eq!(p.phase, Phase::MustAbort);
        assert!(
            matches!(p.commit().await, Err(Error::InvalidTxnState { .. })),
            "a transaction that lost records must not commit"
        );
    }
}
