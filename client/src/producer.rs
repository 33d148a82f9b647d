//! The batching producer.
//!
//! ```text
//! send() ──► route (key hash / round robin / explicit) ──► wait for buffer bytes (backpressure)
//!        ──► append to the partition's open batch ──► DeliveryFuture
//!
//! sender task: seal batches (full; lingered, if the partition can send; flush; close)
//!              ──► group ready batches into Produce requests
//!                  (≤ max_request_bytes each, ≤ max_in_flight_requests at once)
//!              ──► encode (BatchBuilder::finish: compression + CRC, once per batch)
//!              ──► record_batch fast path ──► complete / retry / fail each batch
//! ```
//!
//! # Guarantees and invariants
//!
//! - **Per-partition order: at most one batch in flight per partition.** A partition's next
//!   batch is sent only once the previous one has completed (acknowledged or finally failed); a
//!   batch to be retried goes back to the *head* of its partition's queue. So, barring the
//!   timeout case below, records of one partition are appended in `send` order, retries
//!   included. Throughput comes instead from large batches, from many partitions per request,
//!   and from several requests in flight (for different partitions).
//!
//!   Why not pipeline one partition's batches: concurrent unary `Produce` calls are separate
//!   HTTP/2 streams handled by separate broker tasks, so nothing orders their appends. The
//!   broker's `ProduceStream` does append in arrival order, which would order the *first*
//!   attempts; but a retry breaks it: if batch N fails with a retriable per-partition error
//!   (disk full, poisoned partition) after N+1 was appended, resending N puts it after N+1.
//!   Now that the broker refuses out-of-sequence batches (idempotence), pipelining could be
//!   made safe; the producer would then move to `ProduceStream`. Not done yet.
//! - **Retries do not duplicate (idempotence, on by default).** A retriable failure
//!   (UNAVAILABLE, a broken connection, a request timeout, a poisoned partition, a full disk, a
//!   broker shutting down) is retried with exponential backoff until `delivery_timeout` has
//!   passed since the record was sent. The producer takes a producer id from the broker
//!   (`InitProducerId`) and stamps each batch, once, with per-partition sequence numbers; the
//!   retry resends the same bytes, so if the first attempt was appended after all, the broker
//!   acknowledges the retry with the original offsets and writes nothing. If a batch fails for
//!   good without being appended, the next batch of that partition is refused as out of
//!   sequence; the producer then continues under a new producer id and re-stamps that batch
//!   (once). With `idempotence: false`, a retry after a timeout can append a batch twice.
//! - **`Acks::None` differs from `Acks::Written` only in the reply**: the broker still replies
//!   once the batch is handed to the log (page cache), successive requests keep their order,
//!   and per-partition write errors are reported (and retried or returned like any other);
//!   the reply just carries no offsets, so [`RecordMetadata::offset`] is `None`
//!   (`docs/protocol.md`, "Acks and durability").
//! - **Bounded memory.** Records hold bytes of a semaphore of `buffer_bytes` from `send` until
//!   their batch completes; `send` waits for room (backpressure) and fails with
//!   [`Error::BufferFull`] after `max_block`. A record larger than the buffer or a request is
//!   refused at once ([`Error::RecordTooLarge`]). Each record is counted by an upper bound of
//!   its encoded size (payload plus the most its varints can take).
//! - **Every `send` is answered**: its [`DeliveryFuture`] resolves with the offset, with the
//!   batch's error, or with [`Error::Closed`] if the producer's task went away.
//!
//! # Closing
//!
//! [`Producer::flush`] sends everything buffered now (ignoring `linger`) and waits until it has
//! completed. [`Producer::close`] refuses new records, flushes, and waits for the background
//! task to end; it can take up to `delivery_timeout` if the broker is unreachable. Dropping
//! the last handle without closing lets the background task deliver what is buffered, then
//! end (the runtime must keep running for that).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use spool_proto::v1;
use spool_record::BatchBuilder;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::Instant;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::partitioner::partition_for_key;
use crate::retry::Backoff;
use crate::types::{ProducerRecord, RecordMetadata};

/// How much durability the producer waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Acks {
    /// Like [`Acks::Written`] (the broker replies once the batch is in the page cache, in
    /// order, with per-partition write errors), but the reply carries no offsets.
    None,
    /// The broker replies once the batch is in the page cache (survives a broker crash, not a
    /// power loss).
    Written,
    /// The broker replies once an fdatasync covered the batch (survives power loss).
    #[default]
    Durable,
}

impl Acks {
    pub(crate) fn to_wire(self) -> v1::Acks {
        match self {
            Acks::None => v1::Acks::None,
            Acks::Written => v1::Acks::Written,
            Acks::Durable => v1::Acks::Durable,
        }
    }
}

/// Batch compression.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// None.
    #[default]
    None,
    /// LZ4 frame format.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    pub(crate) fn engine(self) -> spool_record::Compression {
        match self {
            Compression::None => spool_record::Compression::None,
            Compression::Lz4 => spool_record::Compression::Lz4,
            Compression::Zstd => spool_record::Compression::Zstd,
        }
    }
}

/// Most records in one batch (the broker's default `max_records_per_batch`).
pub const MAX_BATCH_RECORDS: usize = 1 << 20;
/// Bytes kept free in a request for framing around the batches.
const REQUEST_OVERHEAD: usize = 64 << 10;
/// Batches bigger than this are compressed on the blocking pool, not on a runtime worker.
const INLINE_COMPRESS_BYTES: usize = 64 << 10;

/// Producer settings. [`ProducerConfig::default`] is a good start.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// Durability to wait for (default: durable).
    pub acks: Acks,
    /// Batch compression (default: none).
    pub compression: Compression,
    /// How long a batch waits for more records before it is sent (default 5 ms). 0 sends as
    /// soon as the partition has no batch in flight.
    pub linger: Duration,
    /// A batch is sent once its records reach this many bytes (before compression; default
    /// 1 MiB). Keep it below the topic's `max_message_bytes` (8 MiB by default).
    pub batch_bytes: usize,
    /// Bytes of records buffered (not yet acknowledged) across all partitions (default 64 MiB).
    pub buffer_bytes: usize,
    /// Longest time `send` waits for buffer space or topic metadata (default 60 s).
    pub max_block: Duration,
    /// Produce requests in flight at once (default 5). Each carries batches of distinct
    /// partitions.
    pub max_in_flight_requests: usize,
    /// Largest Produce request (default 32 MiB; at most the client's `max_message_bytes`).
    pub max_request_bytes: usize,
    /// Time limit of one Produce request (default: the client's request timeout).
    pub request_timeout: Option<Duration>,
    /// Backoff between retries of a batch.
    pub retry_backoff: Backoff,
    /// A record not acknowledged this long after `send` fails with
    /// [`Error::DeliveryTimeout`] (default 120 s).
    pub delivery_timeout: Duration,
    /// Partition counts are looked up again after this long (default 60 s).
    pub metadata_max_age: Duration,
    /// Idempotence (default on): the producer gets a producer id from the broker and stamps
    /// each batch with per-partition sequence numbers, so a retry of a batch the broker already
    /// appended is acknowledged with the original offsets instead of being appended twice.
    pub idempotence: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::Durable,
            compression: Compression::None,
            linger: Duration::from_millis(5),
            batch_bytes: 1 << 20,
            buffer_bytes: 64 << 20,
            max_block: Duration::from_secs(60),
            max_in_flight_requests: 5,
            max_request_bytes: 32 << 20,
            request_timeout: None,
            retry_backoff: Backoff::default(),
            delivery_timeout: Duration::from_secs(120),
            metadata_max_age: Duration::from_secs(60),
            idempotence: true,
        }
    }
}

/// Counters of a producer's activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// Records acknowledged.
    pub records_acked: u64,
    /// Records failed for good.
    pub records_failed: u64,
    /// Batches sent (retries included).
    pub batches_sent: u64,
    /// Produce requests sent (retries included).
    pub requests_sent: u64,
    /// Batch retries.
    pub retries: u64,
    /// Bytes of records buffered now.
    pub buffered_bytes: u64,
}

/// Resolves to where a sent record landed, or to why it could not be delivered.
#[derive(Debug)]
#[must_use = "a DeliveryFuture does nothing unless awaited; drop it to ignore the outcome"]
pub struct DeliveryFuture {
    rx: oneshot::Receiver<Result<RecordMetadata>>,
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(_)) => Poll::Ready(Err(Error::Closed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A batching, retrying producer. Cheap to clone; clones share the buffer and the background
/// task. See the [module docs](self) for its guarantees.
#[derive(Clone, Debug)]
pub struct Producer {
    handle: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last handle is gone: stop taking records; the task delivers the rest and ends.
        lock(&self.shared.state).closed = true;
        self.shared.wake.notify_one();
    }
}

type Tp = (Arc<str>, u32);

#[derive(Debug)]
struct Pending {
    tx: oneshot::Sender<Result<RecordMetadata>>,
    timestamp_ms: i64,
}

#[derive(Debug)]
struct Batch {
    id: u64,
    topic: Arc<str>,
    partition: u32,
    /// Records until the batch is encoded.
    builder: Option<BatchBuilder>,
    /// The encoded batch, kept for retries.
    encoded: Option<Bytes>,
    pending: Vec<Pending>,
    /// Upper bound of the records' encoded size; also the buffer bytes held.
    bytes: usize,
    permit: Option<OwnedSemaphorePermit>,
    /// When the first record was sent: linger and the delivery deadline count from here.
    created: Instant,
    attempts: u32,
    retry_at: Option<Instant>,
    last_error: Option<Error>,
    /// Idempotence: the producer id and first sequence stamped into the encoded batch.
    stamp: Option<(i64, i32)>,
    /// Set once the batch was re-stamped under a new producer id (done at most once).
    restamped: bool,
}

#[derive(Debug, Default)]
struct PartitionQueue {
    open: Option<Batch>,
    ready: VecDeque<Batch>,
    in_flight: bool,
    /// Idempotence: the producer id this partition's sequence belongs to, and the sequence of
    /// the next batch's first record.
    sequence: Option<(i64, i32)>,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<Tp, PartitionQueue>,
    next_batch_id: u64,
    /// Ids of batches created and not yet completed (flush waits on these).
    incomplete: BTreeSet<u64>,
    requests_in_flight: usize,
    closed: bool,
}

#[derive(Debug)]
struct TopicMeta {
    name: Arc<str>,
    partitions: u32,
    fetched: Instant,
    round_robin: u32,
}

#[derive(Debug, Default)]
struct Counters {
    records_acked: AtomicU64,
    records_failed: AtomicU64,
    batches_sent: AtomicU64,
    requests_sent: AtomicU64,
    retries: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    client: Client,
    config: ProducerConfig,
    state: Mutex<State>,
    /// Wakes the sender task (one permit is stored when it is busy, so no wake-up is lost).
    wake: tokio::sync::Notify,
    /// Bumped whenever a batch completes (flush waits on it).
    progress: watch::Sender<()>,
    buffer: Arc<Semaphore>,
    metadata: Mutex<HashMap<String, TopicMeta>>,
    metadata_refresh: tokio::sync::Mutex<()>,
    /// The idempotent producer id in use (obtained on first need, replaced after an
    /// out-of-sequence refusal).
    producer_id: tokio::sync::Mutex<Option<i64>>,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves consistent data (no multi-step invariants span a
    // panic point), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Producer {
    /// Creates a producer on `client`'s connection and starts its background task (so this
    /// must run inside a tokio runtime). Out-of-range settings are clamped: at least 1 byte
    /// batches, 1 request in flight; requests no bigger than the client's message limit.
    pub fn new(client: Client, mut config: ProducerConfig) -> Producer {
        config.max_in_flight_requests = config.max_in_flight_requests.max(1);
        config.batch_bytes = config.batch_bytes.max(1);
        config.buffer_bytes = config.buffer_bytes.clamp(1, Semaphore::MAX_PERMITS);
        config.max_request_bytes = config
            .max_request_bytes
            .min(client.options().max_message_bytes)
            .max(2 * REQUEST_OVERHEAD);
        let shared = Arc::new(Shared {
            buffer: Arc::new(Semaphore::new(config.buffer_bytes)),
            client,
            config,
            state: Mutex::new(State::default()),
            wake: tokio::sync::Notify::new(),
            progress: watch::Sender::new(()),
            metadata: Mutex::new(HashMap::new()),
            metadata_refresh: tokio::sync::Mutex::new(()),
            producer_id: tokio::sync::Mutex::new(None),
            counters: Counters::default(),
        });
        let task = tokio::spawn(run(shared.clone()));
        Producer {
            handle: Arc::new(Handle {
                shared,
                task: Mutex::new(Some(task)),
            }),
        }
    }

    /// The settings in force (after clamping).
    pub fn config(&self) -> &ProducerConfig {
        &self.handle.shared.config
    }

    /// Sends `record` to `topic`, to the partition its key hashes to (murmur2, as Kafka), or
    /// round robin for a null key.
    ///
    /// Returns once the record is buffered: this is where backpressure applies (the wait for
    /// buffer space and, for a topic not seen yet, for its partition count). The returned
    /// future resolves once the record is acknowledged (with its offset) or has failed.
    ///
    /// Errors now: [`Error::UnknownTopic`], [`Error::RecordTooLarge`], [`Error::BufferFull`],
    /// [`Error::Closed`], or the metadata lookup's error.
    ///
    /// Cancel-safe: dropping the future before it resolves leaves the record unsent. Records
    /// of one partition are appended in the order their `send` calls returned.
    pub async fn send(&self, topic: &str, record: ProducerRecord) -> Result<DeliveryFuture> {
        self.enqueue(topic, None, record).await
    }

    /// Sends `record` to partition `partition` of `topic`. Errors as [`Producer::send`], plus
    /// [`Error::UnknownPartition`].
    pub async fn send_to(
        &self,
        topic: &str,
        partition: u32,
        record: ProducerRecord,
    ) -> Result<DeliveryFuture> {
        self.enqueue(topic, Some(partition), record).await
    }

    /// Sends everything buffered now, without waiting for `linger`, and waits until it has
    /// completed (acknowledged or failed: look at the delivery futures for the outcome).
    /// Records sent while flushing are not waited for.
    pub async fn flush(&self) {
        let shared = &self.handle.shared;
        let mut progress = shared.progress.subscribe();
        let target = {
            let mut st = lock(&shared.state);
            for q in st.queues.values_mut() {
                if let Some(b) = q.open.take() {
                    q.ready.push_back(b);
                }
            }
            st.next_batch_id
        };
        shared.wake.notify_one();
        loop {
            {
                let st = lock(&shared.state);
                if st.incomplete.first().is_none_or(|id| *id >= target) {
                    return;
                }
            }
            // `shared` holds the sender, so this cannot fail while we borrow it.
            let _ = progress.changed().await;
        }
    }

    /// Refuses new records, delivers what is buffered, and waits for the background task to
    /// end. Other clones of this producer see [`Error::Closed`] from then on.
    pub async fn close(&self) {
        let shared = &self.handle.shared;
        lock(&shared.state).closed = true;
        shared.wake.notify_one();
        self.flush().await;
        let task = lock(&self.handle.task).take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::error!(error = %e, "producer task failed");
        }
    }

    /// Activity counters.
    pub fn stats(&self) -> ProducerStats {
        let s = &self.handle.shared;
        let c = &s.counters;
        ProducerStats {
            records_acked: c.records_acked.load(Ordering::Relaxed),
            records_failed: c.records_failed.load(Ordering::Relaxed),
            batches_sent: c.batches_sent.load(Ordering::Relaxed),
            requests_sent: c.requests_sent.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            buffered_bytes: (s.config.buffer_bytes - s.buffer.available_permits()) as u64,
        }
    }

    async fn enqueue(
        &self,
        topic: &str,
        partition: Option<u32>,
        record: ProducerRecord,
    ) -> Result<DeliveryFuture> {
        let shared = &self.handle.shared;
        let cfg = &shared.config;
        if lock(&shared.state).closed {
            return Err(Error::Closed);
        }
        let size = record.encoded_size_bound();
        let limit = cfg
            .buffer_bytes
            .min(cfg.max_request_bytes - REQUEST_OVERHEAD);
        if size > limit {
            return Err(Error::RecordTooLarge { size, limit });
        }
        let deadline = Instant::now() + cfg.max_block;
        let (topic, partition) = shared.route(topic, partition, &record, deadline).await?;
        let permit = match tokio::time::timeout_at(
            deadline,
            shared.buffer.clone().acquire_many_owned(size as u32),
        )
        .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(Error::Closed),
            Err(_) => return Err(Error::BufferFull(cfg.max_block)),
        };
        let timestamp_ms = record.timestamp_ms.unwrap_or_else(now_ms);
        let headers: Vec<(&str, Option<&[u8]>)> = record
            .headers
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_deref()))
            .collect();
        let (tx, rx) = oneshot::channel();
        let mut wake = false;
        {
            let mut st = lock(&shared.state);
            if st.closed {
                return Err(Error::Closed);
            }
            let st = &mut *st;
            let q = st.queues.entry((topic.clone(), partition)).or_default();
            if let Some(open) = &q.open
                && open.bytes + size > cfg.batch_bytes
            {
                q.ready.extend(q.open.take());
                wake = true;
            }
            let batch = q.open.get_or_insert_with(|| {
                let id = st.next_batch_id;
                st.next_batch_id += 1;
                st.incomplete.insert(id);
                wake = true; // arm the linger timer
                Batch {
                    id,
                    topic: topic.clone(),
                    partition,
                    builder: Some(BatchBuilder::with_capacity(
                        cfg.compression.engine(),
                        size.min(cfg.batch_bytes).max(4096),
                    )),
                    encoded: None,
                    pending: Vec::new(),
                    bytes: 0,
                    permit: None,
                    created: Instant::now(),
                    attempts: 0,
                    retry_at: None,
                    last_error: None,
                    stamp: None,
                    restamped: false,
                }
            });
            if let Some(b) = batch.builder.as_mut() {
                b.push(
                    timestamp_ms,
                    record.key.as_deref(),
                    record.value.as_deref(),
                    &headers,
                );
            }
            batch.pending.push(Pending { tx, timestamp_ms });
            batch.bytes += size;
            match batch.permit.as_mut() {
                Some(p) => p.merge(permit),
                None => batch.permit = Some(permit),
            }
            if batch.bytes >= cfg.batch_bytes || batch.pending.len() >= MAX_BATCH_RECORDS {
                q.ready.extend(q.open.take());
                wake = true;
            }
        }
        if wake {
            shared.wake.notify_one();
        }
        Ok(DeliveryFuture { rx })
    }
}

impl Shared {
    /// Picks the partition; returns the interned topic name with it.
    async fn route(
        &self,
        topic: &str,
        explicit: Option<u32>,
        record: &ProducerRecord,
        deadline: Instant,
    ) -> Result<(Arc<str>, u32)> {
        let (name, n) = self.partitions(topic, false, deadline).await?;
        let (name, n) = match explicit {
            Some(p) if p >= n => self.partitions(topic, true, deadline).await?,
            _ => (name, n),
        };
        let p = match (explicit, &record.key) {
            (Some(p), _) if p < n => p,
            (Some(p), _) => {
                return Err(Error::UnknownPartition {
                    topic: topic.to_owned(),
                    partition: p,
                    message: format!("the topic has {n} partitions"),
                });
            }
            (None, Some(key)) => partition_for_key(key, n),
            (None, None) => {
                let mut meta = lock(&self.metadata);
                match meta.get_mut(topic) {
                    Some(m) => {
                        m.round_robin = m.round_robin.wrapping_add(1);
                        m.round_robin % n
                    }
                    None => 0,
                }
            }
        };
        Ok((name, p))
    }

    /// The topic's partition count, from the cache unless it is stale or `refresh` is set.
    /// Retriable lookup failures are retried until `deadline`; a stale count is used if the
    /// broker cannot be asked.
    async fn partitions(
        &self,
        topic: &str,
        refresh: bool,
        deadline: Instant,
    ) -> Result<(Arc<str>, u32)> {
        let cached = |fresh_only: bool| {
            let meta = lock(&self.metadata);
            meta.get(topic).and_then(|m| {
                let fresh = m.fetched.elapsed() < self.config.metadata_max_age;
                (fresh || !fresh_only).then(|| (m.name.clone(), m.partitions, m.fetched))
            })
        };
        if !refresh && let Some((name, n, _)) = cached(true) {
            return Ok((name, n));
        }
        let asked_at = Instant::now();
        let _guard = self.metadata_refresh.lock().await;
        // Someone else may have refreshed while we waited for the lock.
        if let Some((name, n, fetched)) = cached(true)
            && (!refresh || fetched >= asked_at)
        {
            return Ok((name, n));
        }
        let mut attempt = 0;
        loop {
            let timeout = self
                .client
                .options()
                .request_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            let res = match tokio::time::timeout(timeout, self.client.describe_topic(topic)).await {
                Ok(r) => r,
                Err(_) => Err(Error::Timeout(timeout)),
            };
            match res {
                Ok(d) => {
                    let n = d.partitions.len() as u32;
                    if n == 0 {
                        return Err(Error::Protocol(format!(
                            "topic {topic:?} has no partitions"
                        )));
                    }
                    let mut meta = lock(&self.metadata);
                    let m = meta.entry(topic.to_owned()).or_insert_with(|| TopicMeta {
                        name: Arc::from(topic),
                        partitions: n,
                        fetched: Instant::now(),
                        round_robin: 0,
                    });
                    m.partitions = n;
                    m.fetched = Instant::now();
                    return Ok((m.name.clone(), n));
                }
                Err(e) if e.is_retriable() => {
                    if let Some((name, n, _)) = cached(false) {
                        tracing::debug!(topic, error = %e, "metadata refresh failed; using the cached partition count");
                        return Ok((name, n));
                    }
                    attempt += 1;
                    let delay = self.config.retry_backoff.delay(attempt);
                    if Instant::now() + delay >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    if matches!(e, Error::UnknownTopic { .. }) {
                        lock(&self.metadata).remove(topic);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Resolves every record of a batch, releases its buffer bytes and unblocks the
    /// partition. Bookkeeping comes first, so a caller woken by its delivery future sees the
    /// buffer and counters already updated.
    fn complete(&self, mut batch: Batch, outcome: Result<u64>) {
        let n = batch.pending.len() as u64;
        match &outcome {
            Ok(_) => self.counters.records_acked.fetch_add(n, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(topic = &*batch.topic, partition = batch.partition, records = n, error = %e, "batch failed");
                self.counters.records_failed.fetch_add(n, Ordering::Relaxed)
            }
        };
        drop(batch.permit.take());
        {
            let mut st = lock(&self.state);
            st.incomplete.remove(&batch.id);
            if let Some(q) = st.queues.get_mut(&(batch.topic.clone(), batch.partition)) {
                q.in_flight = false;
            }
        }
        for (i, p) in batch.pending.drain(..).enumerate() {
            let r = match &outcome {
                Ok(base) => Ok(RecordMetadata {
                    topic: batch.topic.clone(),
                    partition: batch.partition,
                    offset: (self.config.acks != Acks::None).then_some(base + i as u64),
                    timestamp_ms: p.timestamp_ms,
                }),
                Err(e) => Err(e.clone()),
            };
            let _ = p.tx.send(r); // the caller may have dropped the future
        }
        self.progress.send_replace(());
        self.wake.notify_one();
    }

    /// Puts a batch back at the head of its partition's queue, to be sent at once.
    fn requeue(&self, mut batch: Batch) {
        batch.retry_at = None;
        {
            let mut st = lock(&self.state);
            let q = st
                .queues
                .entry((batch.topic.clone(), batch.partition))
                .or_default();
            q.ready.push_front(batch);
            q.in_flight = false;
        }
        self.wake.notify_one();
    }

    /// A batch's attempt failed with `e`: back to the head of its queue if `e` is retriable
    /// and time is left, else fail it.
    fn failed(&self, mut batch: Batch, e: Error) {
        let deadline = batch.created + self.config.delivery_timeout;
        if e.is_retriable() {
            let delay = self.config.retry_backoff.delay(batch.attempts + 1);
            let at = Instant::now() + delay;
            if at < deadline {
                tracing::debug!(topic = &*batch.topic, partition = batch.partition, attempt = batch.attempts + 1, ?delay, error = %e, "retrying batch");
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                batch.attempts += 1;
                batch.retry_at = Some(at);
                batch.last_error = Some(e);
                {
                    let mut st = lock(&self.state);
                    let q = st
                        .queues
                        .entry((batch.topic.clone(), batch.partition))
                        .or_default();
                    q.ready.push_front(batch);
                    q.in_flight = false;
                }
                self.wake.notify_one();
                return;
            }
            let elapsed = batch.created.elapsed();
            return self.complete(
                batch,
                Err(Error::DeliveryTimeout {
                    elapsed,
                    last_error: Some(Box::new(e)),
                }),
            );
        }
        self.complete(batch, Err(e));
    }
}

/// The sender task: seals, groups, sends; ends once closed and drained.
async fn run(shared: Arc<Shared>) {
    let cfg = &shared.config;
    loop {
        let now = Instant::now();
        let mut next_wake: Option<Instant> = None;
        let mut requests: Vec<Vec<Batch>> = Vec::new();
        let mut expired: Vec<Batch> = Vec::new();
        let done = {
            let mut st = lock(&shared.state);
            let st = &mut *st;
            let mut slots = cfg
                .max_in_flight_requests
                .saturating_sub(st.requests_in_flight);
            let mut current: Vec<Batch> = Vec::new();
            let mut current_bytes = 0usize;
            let mut idle = true;
            for q in st.queues.values_mut() {
                // While the partition cannot send (a batch in flight or queued), its open batch
                // keeps filling up to `batch_bytes` instead of being sealed small at `linger`:
                // the completion that unblocks the partition wakes this loop.
                let blocked = q.in_flight || !q.ready.is_empty();
                if let Some(open) = &q.open {
                    let due = open.created + cfg.linger;
                    if st.closed || (due <= now && !blocked) {
                        q.ready.extend(q.open.take());
                    } else if !blocked {
                        next_wake = Some(next_wake.map_or(due, |w| w.min(due)));
                    }
                }
                if q.open.is_some() || !q.ready.is_empty() || q.in_flight {
                    idle = false;
                }
                if q.in_flight {
                    continue;
                }
                while q
                    .ready
                    .front()
                    .is_some_and(|b| now >= b.created + cfg.delivery_timeout)
                {
                    expired.extend(q.ready.pop_front());
                }
                let Some(head) = q.ready.front() else {
                    continue;
                };
                if let Some(at) = head.retry_at
                    && at > now
                {
                    next_wake = Some(next_wake.map_or(at, |w| w.min(at)));
                    continue;
                }
                let fits = current_bytes + head.bytes <= cfg.max_request_bytes - REQUEST_OVERHEAD;
                if current.is_empty() || !fits {
                    if slots == 0 {
                        continue; // a completion will wake us
                    }
                    if !current.is_empty() {
                        requests.push(std::mem::take(&mut current));
                        current_bytes = 0;
                    }
                    slots -= 1;
                }
                let Some(b) = q.ready.pop_front() else {
                    continue;
                };
                current_bytes += b.bytes;
                current.push(b);
                q.in_flight = true;
            }
            if !current.is_empty() {
                requests.push(current);
            }
            st.requests_in_flight += requests.len();
            st.closed && idle && st.requests_in_flight == 0 && expired.is_empty()
        };
        for b in expired {
            let elapsed = b.created.elapsed();
            let last_error = b.last_error.clone().map(Box::new);
            shared.complete(
                b,
                Err(Error::DeliveryTimeout {
                    elapsed,
                    last_error,
                }),
            );
        }
        for batches in requests {
            tokio::spawn(send_request(shared.clone(), batches));
        }
        if done {
            return;
        }
        match next_wake {
            Some(at) => {
                tokio::select! {
                    () = shared.wake.notified() => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

/// Encodes a batch once (compression and CRC); later attempts resend the same bytes.
async fn encode(b: &mut Batch, compression: Compression) -> Result<Bytes> {
    if let Some(bytes) = &b.encoded {
        return Ok(bytes.clone());
    }
    let builder = b
        .builder
        .take()
        .ok_or_else(|| Error::Protocol("batch lost its records".into()))?;
    let bytes = if compression != Compression::None && b.bytes > INLINE_COMPRESS_BYTES {
        tokio::task::spawn_blocking(move || builder.finish())
            .await
            .map_err(|e| Error::Protocol(format!("encoding task failed: {e}")))??
    } else {
        builder.finish()?
    };
    b.encoded = Some(bytes.clone());
    Ok(bytes)
}

/// The sequence after a batch of `records` records starting at `base` (wrapping past
/// `i32::MAX` to 0, as the broker counts).
fn seq_after(base: i32, records: usize) -> i32 {
    ((base as i64 + records as i64) % (i32::MAX as i64 + 1)) as i32
}

impl Shared {
    /// The producer id to stamp batches with. `stale` is an id the broker refused a sequence
    /// for: if it is still the current one, a new id is obtained (once, whoever asks first).
    async fn producer_id(&self, stale: Option<i64>) -> Result<i64> {
        let mut current = self.producer_id.lock().await;
        if let Some(id) = *current
            && Some(id) != stale
        {
            return Ok(id);
        }
        let id = self.client.init_producer_id().await?;
        tracing::debug!(producer_id = id, replaces = ?stale, "idempotent producer id");
        *current = Some(id);
        Ok(id)
    }

    /// Stamps a not-yet-encoded batch with the producer id and the partition's next sequence.
    async fn stamp(&self, b: &mut Batch) -> Result<()> {
        if !self.config.idempotence || b.encoded.is_some() || b.stamp.is_some() {
            return Ok(());
        }
        let pid = self.producer_id(None).await?;
        let base = self.next_sequence(&b.topic, b.partition, pid, b.pending.len());
        if let Some(builder) = b.builder.as_mut() {
            builder.producer(pid, 0, base);
        }
        b.stamp = Some((pid, base));
        Ok(())
    }

    /// Takes `records` sequence numbers of a partition for producer `pid` (starting again at 0
    /// when the partition's sequence belonged to another id).
    fn next_sequence(&self, topic: &Arc<str>, partition: u32, pid: i64, records: usize) -> i32 {
        let mut st = lock(&self.state);
        let q = st.queues.entry((topic.clone(), partition)).or_default();
        let base = match q.sequence {
            Some((p, next)) if p == pid => next,
            _ => 0,
        };
        q.sequence = Some((pid, seq_after(base, records)));
        base
    }

    /// The broker refused `b`'s sequence: a batch before it failed for good without being
    /// appended, so this partition's sequence has a hole the broker will never fill. Start
    /// again under a new producer id (the broker accepts a new producer's first batch at any
    /// sequence) and re-stamp the batch, once. Returns the batch to retry, or the error.
    async fn restamp(&self, mut b: Batch, e: Error) -> std::result::Result<Batch, (Batch, Error)> {
        let (Some((old, _)), Some(encoded), false) = (b.stamp, b.encoded.clone(), b.restamped)
        else {
            return Err((b, e));
        };
        let pid = match self.producer_id(Some(old)).await {
            Ok(p) => p,
            Err(e) => return Err((b, e)),
        };
        let base = self.next_sequence(&b.topic, b.partition, pid, b.pending.len());
        let mut bytes = encoded.to_vec();
        if let Err(err) = spool_record::restamp_producer(&mut bytes, pid, 0, base) {
            return Err((b, Error::Decode(err)));
        }
        tracing::info!(
            topic = &*b.topic,
            partition = b.partition,
            old,
            new = pid,
            "sequence refused: continuing under a new producer id"
        );
        b.encoded = Some(Bytes::from(bytes));
        b.stamp = Some((pid, base));
        b.restamped = true;
        Ok(b)
    }
}

/// One Produce request: its batches are of distinct partitions, each marked in flight.
async fn send_request(shared: Arc<Shared>, batches: Vec<Batch>) {
    let cfg = &shared.config;
    let mut sendable = Vec::with_capacity(batches.len());
    let mut parts = Vec::with_capacity(batches.len());
    for mut b in batches {
        if let Err(e) = shared.stamp(&mut b).await {
            shared.failed(b, e);
            continue;
        }
        match encode(&mut b, cfg.compression).await {
            Ok(bytes) => {
                parts.push(v1::PartitionProduce {
                    topic: b.topic.to_string(),
                    partition: b.partition,
                    data: Some(v1::partition_produce::Data::RecordBatch(bytes)),
                });
                sendable.push(b);
            }
            Err(e) => shared.complete(b, Err(e)),
        }
    }
    if !sendable.is_empty() {
        let client = &shared.client;
        let timeout = cfg
            .request_timeout
            .unwrap_or(client.options().request_timeout);
        let req = client.request(
            v1::ProduceRequest {
                partitions: parts,
                acks: cfg.acks.to_wire() as i32,
            },
            timeout,
        );
        shared
            .counters
            .requests_sent
            .fetch_add(1, Ordering::Relaxed);
        shared
            .counters
            .batches_sent
            .fetch_add(sendable.len() as u64, Ordering::Relaxed);
        match client
            .unary(timeout, client.produce_stub().produce(req))
            .await
        {
            Ok(resp) if resp.results.len() == sendable.len() => {
                for (b, r) in sendable.into_iter().zip(resp.results) {
                    match &r.error {
                        Some(e) => {
                            let e = Error::from_partition_error(&b.topic, b.partition, None, e);
                            if matches!(e, Error::OutOfOrderSequence { .. }) {
                                match shared.restamp(b, e).await {
                                    Ok(b) => shared.requeue(b),
                                    Err((b, e)) => shared.complete(b, Err(e)),
                                }
                                continue;
                            }
                            shared.failed(b, e);
                        }
                        None => shared.complete(b, Ok(r.base_offset)),
                    }
                }
            }
            Ok(resp) => {
                let e = Error::Protocol(format!(
                    "{} results for {} batches",
                    resp.results.len(),
                    sendable.len()
                ));
                for b in sendable {
                    shared.complete(b, Err(e.clone()));
                }
            }
            Err(e) => {
                for b in sendable {
                    shared.failed(b, e.clone());
                }
            }
        }
    }
    lock(&shared.state).requests_in_flight -= 1;
    shared.wake.notify_one();
}
