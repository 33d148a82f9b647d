//! ConsumeService: Fetch (long poll), Subscribe (push), ListOffsets.
//!
//! Data is served as it is stored: `record_batches` are zero-copy slices of the log's mapped
//! segments, never decoded, unless the request asks for decoded records. Waiting for new data
//! awaits the partitions' append notifiers; nothing polls.
//!
//! Subscribe flow control: each subscription has a channel of capacity 1 towards its HTTP/2
//! stream, and reads the next chunk only when the previous one was taken, so a slow reader
//! holds at most about two messages of `max_bytes` in the broker.
//!
//! Where reads run: on the blocking pool (a read may touch disk), except a **tail read**: the
//! first read of each partition after a subscription woke up because new data was published
//! while it waited at the end of the log, and the next read of a partition whose previous
//! read reached what was readable then (a subscription keeping up with the writer, which
//! finds more data each time it has pushed a chunk). Either reads bytes appended since (in
//! the page cache), at most [`TAIL_READ_MAX_BYTES`] (or one batch), not decoded, and runs on
//! the subscription's own task, which saves two thread hand-offs between an append (or,
//! under `fsync = always`, its fdatasync) and the push to the consumer. A subscription that
//! falls behind (a read that stops short of the readable end) reads on the blocking pool
//! again, with its whole `max_bytes`; so does a tail read that had to wait for reply memory
//! (backpressure) first, since after a long wait its bytes may no longer be in the page cache.
//!
//! A read that panics (a bug; on the blocking pool it comes back as a `JoinError`, on the
//! subscription's task it is caught there) ends that subscription with INTERNAL naming the
//! partition, logged once; the broker and its other streams go on.
//!
//! A subscription holds its partitions (`Arc<Partition>`), not their names. When a topic is
//! deleted its partitions are closed, which wakes their waiters; the subscription then ends
//! with the partition's `closed_error`: UNKNOWN_TOPIC (`NOT_FOUND`) for a deleted topic, even
//! if a topic of that name was created since (that is another topic: subscribe again), and
//! SHUTTING_DOWN if the log closed. So it never waits on, or heartbeats the high watermark of,
//! a partition that will get no more data. A Fetch long poll wakes the same way, and its read
//! of a deleted partition answers UNKNOWN_TOPIC for that partition.
//!
//! Every status a subscription ends with is built through `error.rs`, with its `ErrorInfo`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::select_all;
use spool_log_engine::{Isolation, Partition};
use spool_proto::v1::{self, consume_service_server::ConsumeService};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::check_count;
use crate::auth::{Action, principal};
use crate::budget::{Charge, ChargedStream, Ledger};
use crate::error::{BrokerError, partition_error, partition_status};
use crate::metrics::timed;
use crate::reply::{self, Assembled, Shape, Target};
use crate::{State, blocking};

/// Heartbeat interval of a subscription that does not choose one.
const DEFAULT_HEARTBEAT_MS: u32 = 5000;

/// Default per-partition fetch size when a request says 0.
const DEFAULT_MAX_BYTES: u32 = 1 << 20;

/// A subscription's read at the end of the log, of data appended while it waited, runs on its
/// own task up to this many bytes (one batch if larger; see the module docs): a CRC check and
/// a slice of a mapped page-cache file of some microseconds. The rest goes through the
/// blocking pool like any other read.
const TAIL_READ_MAX_BYTES: u32 = 64 << 10;

/// A Fetch short of reply memory waits at least this long for it (its own `max_wait_ms` if
/// longer; at most half the request timeout) before RESOURCE_EXHAUSTED.
const MIN_MEMORY_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(crate) struct Consume {
    state: Arc<State>,
}

impl Consume {
    pub(crate) fn new(state: Arc<State>) -> Consume {
        Consume { state }
    }

    /// The reply shape for a request asking for `max_bytes` of reply (0: no wish): at most
    /// tonic's encode limit.
    fn shape(&self, max_bytes: u32, decode: bool, isolation: Isolation) -> Shape {
        let limit = self.state.config.limits.max_request_bytes;
        Shape {
            decode,
            isolation,
            max_reply: match max_bytes {
                0 => limit,
                n => (n as usize).min(limit),
            },
            hard_max_reply: limit,
        }
    }

    /// Assembles a Fetch reply within `shape`, waiting for reply memory until
    /// `memory_deadline` if there is none for its first data.
    async fn assemble(
        &self,
        targets: &Arc<Vec<Target>>,
        shape: Shape,
        mut charge: Charge,
        (started, memory_deadline): (Instant, Instant),
    ) -> Result<(Vec<v1::PartitionData>, Charge), Status> {
        let mut waited = false;
        loop {
            let t = targets.clone();
            let limits = self.state.limits.decode();
            let (assembled, back) = blocking(move || {
                let a = reply::assemble(&t, shape, &limits, &mut charge);
                (a, charge)
            })
            .await?;
            charge = back;
            let need = match assembled {
                Assembled::Done(parts) => return Ok((parts, charge)),
                Assembled::NeedMemory(n) => n,
            };
            let metrics = self.state.memory.metrics();
            if !waited {
                metrics.waits.inc();
                waited = true;
            }
            let wanted = charge.bytes() + need;
            if !charge.fits_at_all(wanted)
                || tokio::time::timeout_at(memory_deadline, charge.grow(need))
                    .await
                    .is_err()
            {
                metrics.refusals.inc();
                return Err(charge.exhausted(wanted, started.elapsed()).into());
            }
        }
    }

    fn clamp_bytes(&self, max_bytes: u32) -> u32 {
        let limit = self.state.config.limits.max_fetch_bytes;
        if max_bytes == 0 {
            DEFAULT_MAX_BYTES.min(limit)
        } else {
            max_bytes.min(limit)
        }
    }
}

/// The isolation level a request asks for (unset: read uncommitted).
fn isolation(level: i32) -> Isolation {
    match v1::IsolationLevel::try_from(level) {
        Ok(v1::IsolationLevel::ReadCommitted) => Isolation::ReadCommitted,
        _ => Isolation::ReadUncommitted,
    }
}

/// Where a reader at `isolation` can read up to.
fn readable_end(p: &Partition, isolation: Isolation) -> u64 {
    match isolation {
        Isolation::ReadCommitted => p.last_stable_offset(),
        Isolation::ReadUncommitted => p.high_watermark(),
    }
}

/// Counts data actually sent to a consumer in the metrics.
fn count_served(state: &State, d: &v1::PartitionData) {
    state
        .metrics
        .consumed(&d.topic, &d.record_batches, d.records.len(), data_len(d));
}

fn data_len(d: &v1::PartitionData) -> usize {
    d.record_batches.len()
        + d.records
            .iter()
            .map(|r| r.value.as_ref().map_or(0, |v| v.len()))
            .sum::<usize>()
}

/// Resolves when any partition's high watermark passes its threshold.
async fn any_new_data(waits: &[(Arc<Partition>, u64)]) {
    if waits.is_empty() {
        return std::future::pending().await;
    }
    let futs: Vec<_> = waits
        .iter()
        .map(|(p, after)| Box::pin(p.data_available(*after)))
        .collect();
    select_all(futs).await;
}

#[tonic::async_trait]
impl ConsumeService for Consume {
    async fn fetch(
        &self,
        req: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        timed(&self.state.metrics, "Fetch", async move {
            let who = principal(&req);
            let ledger = Ledger::of(&req).unwrap_or_else(|| self.state.memory.detached_ledger());
            let req = req.into_inner();
            let limits = &self.state.config.limits;
            check_count(&self.state, req.partitions.len(), "partitions")?;
            let wait =
                Duration::from_millis(u64::from(req.max_wait_ms.min(limits.max_fetch_wait_ms)));
            let started = Instant::now();
            let deadline = started + wait;
            let memory_wait =
                MIN_MEMORY_WAIT.min(Duration::from_millis(limits.request_timeout_ms / 2));
            let memory_deadline = deadline.max(started + memory_wait);
            let targets: Vec<Target> = req
                .partitions
                .iter()
                .map(|pf| Target {
                    partition: who
                        .require(Action::Consume, &pf.topic)
                        .and_then(|()| Ok(self.state.log.partition(&pf.topic, pf.partition)?))
                        .map_err(partition_error),
                    topic: pf.topic.clone(),
                    id: pf.partition,
                    offset: pf.offset,
                    max_bytes: self.clamp_bytes(pf.max_bytes),
                })
                .collect();
            let shape = self.shape(
                req.max_bytes,
                req.decode_records,
                isolation(req.isolation_level),
            );
            let entries = reply::entries_reserve(&targets);
            if entries > shape.hard_max_reply {
                return Err(BrokerError::InvalidRequest(format!(
                    "the reply's {} partition entries alone could take {entries} bytes, over \
                     limits.max_request_bytes = {}: ask for fewer partitions per fetch",
                    targets.len(),
                    shape.hard_max_reply
                ))
                .into());
            }
            let targets = Arc::new(targets);
            let mut shutdown = self.state.shutdown.clone();
            let mut charge = ledger.charge();
            loop {
                let (results, back) = self
                    .assemble(&targets, shape, charge, (started, memory_deadline))
                    .await?;
                charge = back;
                let total: usize = results.iter().map(data_len).sum();
                let any_error = results.iter().any(|r| r.error.is_some());
                if total >= req.min_bytes.max(1) as usize
                    || any_error
                    || Instant::now() >= deadline
                    || *shutdown.borrow()
                {
                    for r in &results {
                        count_served(&self.state, r);
                    }
                    // Held until the reply is written (budget.rs).
                    ledger.hand_over(charge);
                    return Ok(Response::new(v1::FetchResponse {
                        partitions: results,
                    }));
                }
                let waits: Vec<_> = targets
                    .iter()
                    .zip(&results)
                    .filter_map(|(t, r)| {
                        t.partition
                            .as_ref()
                            .ok()
                            .map(|p| (p.clone(), r.high_watermark))
                    })
                    .collect();
                drop(results);
                charge.shrink_to(0);
                tokio::select! {
                    () = any_new_data(&waits) => {}
                    () = tokio::time::sleep_until(deadline) => {}
                    _ = shutdown.changed() => {}
                }
            }
        })
        .await
    }

    type SubscribeStream = ChargedStream<v1::SubscribeResponse>;

    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        timed(&self.state.metrics, "Subscribe", async move {
            let who = principal(&req);
            let ledger = Ledger::of(&req).unwrap_or_else(|| self.state.memory.detached_ledger());
            let req = req.into_inner();
            let limits = &self.state.config.limits;
            if req.partitions.is_empty() || req.partitions.len() > limits.max_partitions_per_request
            {
                return Err(BrokerError::InvalidRequest(format!(
                    "subscribe to 1 to {} partitions",
                    limits.max_partitions_per_request
                ))
                .into());
            }
            let iso = isolation(req.isolation_level);
            let mut followed = Vec::with_capacity(req.partitions.len());
            for sp in &req.partitions {
                who.require(Action::Consume, &sp.topic)?;
                let p = self
                    .state
                    .log
                    .partition(&sp.topic, sp.partition)
                    .map_err(BrokerError::from)?;
                let start = resolve_start(&p, sp.start.as_ref(), iso)?;
                followed.push((p, start));
            }
            let max_bytes = self.clamp_bytes(req.max_bytes);
            // At least every half idle timeout, so an idle subscription keeps its connection.
            let longest = u32::try_from(limits.idle_timeout_ms / 2).unwrap_or(u32::MAX);
            let asked = if req.heartbeat_interval_ms == 0 {
                DEFAULT_HEARTBEAT_MS
            } else {
                req.heartbeat_interval_ms
            };
            let heartbeat = Duration::from_millis(u64::from(asked.min(longest).max(100)));
            let (tx, rx) = mpsc::channel(1);
            let state = self.state.clone();
            let shape = self.shape(0, req.decode_records, iso);
            tokio::spawn(follow(
                state,
                followed,
                (max_bytes, shape),
                heartbeat,
                ledger.clone(),
                tx,
            ));
            Ok(Response::new(ChargedStream::new(rx, ledger)))
        })
        .await
    }

    async fn list_offsets(
        &self,
        req: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        timed(&self.state.metrics, "ListOffsets", async move {
            let who = principal(&req);
            let req = req.into_inner();
            check_count(&self.state, req.queries.len(), "queries")?;
            let state = self.state.clone();
            let iso = isolation(req.isolation_level);
            let answers = blocking(move || {
                req.queries
                    .into_iter()
                    .map(|q| {
                        let mut a = v1::OffsetAnswer {
                            topic: q.topic.clone(),
                            partition: q.partition,
                            ..Default::default()
                        };
                        let res = who.require(Action::Describe, &q.topic).and_then(|()| {
                            let p = state.log.partition(&q.topic, q.partition)?;
                            Ok(
                                match v1::OffsetSpec::try_from(q.spec)
                                    .unwrap_or(v1::OffsetSpec::Latest)
                                {
                                    v1::OffsetSpec::Earliest => (p.log_start_offset(), true),
                                    v1::OffsetSpec::Unspecified | v1::OffsetSpec::Latest => {
                                        (readable_end(&p, iso), true)
                                    }
                                    v1::OffsetSpec::Timestamp => {
                                        match p.offset_for_timestamp(q.timestamp_ms)? {
                                            Some(o) => (o, true),
                                            None => (p.high_watermark(), false),
                                        }
                                    }
                                },
                            )
                        });
                        match res {
                            Ok((offset, found)) => {
                                a.offset = offset;
                                a.found = found;
                            }
                            Err(e) => a.error = Some(partition_error(e)),
                        }
                        a
                    })
                    .collect()
            })
            .await?;
            Ok(Response::new(v1::ListOffsetsResponse { answers }))
        })
        .await
    }
}

fn resolve_start(
    p: &Partition,
    start: Option<&v1::StartPosition>,
    isolation: Isolation,
) -> Result<u64, BrokerError> {
    use v1::start_position::Position;
    Ok(match start.and_then(|s| s.position) {
        None | Some(Position::Latest(_)) => readable_end(p, isolation),
        Some(Position::Earliest(_)) => p.log_start_offset(),
        Some(Position::Offset(o)) => {
            // Like Fetch: an offset outside the log is an error now, not a silent wait.
            let (log_start, high_watermark) = (p.log_start_offset(), p.high_watermark());
            if o < log_start || o > high_watermark {
                return Err(BrokerError::Engine(
                    spool_log_engine::Error::OffsetOutOfRange {
                        requested: o,
                        log_start,
                        high_watermark,
                    },
                ));
            }
            o
        }
        Some(Position::TimestampMs(ts)) => p
            .offset_for_timestamp(ts)?
            .unwrap_or_else(|| p.high_watermark()),
    })
}

/// The body of one subscription: push data as it is appended, heartbeats when idle.
/// Read-committed: data up to the last stable offset; when a partition has nothing more to
/// give, it waits for the high watermark to move past what it was (a marker moving the last
/// stable offset is itself an append).
async fn follow(
    state: Arc<State>,
    followed: Vec<(Arc<Partition>, u64)>,
    (max_bytes, shape): (u32, Shape),
    heartbeat: Duration,
    ledger: Ledger,
    tx: Outbox,
) {
    let mut next: Vec<u64> = followed.iter().map(|(_, o)| *o).collect();
    // Per partition: the high watermark to wait past when nothing is readable.
    let mut wait_past: Vec<u64> = next.clone();
    let parts: Vec<Arc<Partition>> = followed.into_iter().map(|(p, _)| p).collect();
    let mut shutdown = state.shutdown.clone();
    let mut idle_since = Instant::now();
    let iso = shape.isolation;
    // True right after new data woke the subscription at the end of the log: the next read of
    // each partition is a tail read (module docs).
    let mut woke = false;
    // Per partition: its last read reached what was readable then, so what follows was
    // appended since and its next read is a tail read too (module docs).
    let mut at_end = vec![false; parts.len()];
    loop {
        if *shutdown.borrow() {
            let _ = tx.send((Err(BrokerError::ShuttingDown.into()), None)).await;
            return;
        }
        // A partition closed under the subscription: its topic was deleted (this handle is
        // the old topic's, even if one of the name exists again), or the log closed. Nothing
        // more will come from it; its waiter returned at the close, so this is prompt.
        if let Some((p, e)) = parts.iter().find_map(|p| p.closed_error().map(|e| (p, e))) {
            let status = partition_status(p.topic(), p.id(), &partition_error(e));
            let _ = tx.send((Err(status), None)).await;
            return;
        }
        let mut sent = false;
        let woken = std::mem::take(&mut woke);
        for (i, p) in parts.iter().enumerate() {
            let tail = (woken || at_end[i]) && !shape.decode;
            let hwm = p.high_watermark();
            wait_past[i] = next[i].max(hwm);
            if next[i] >= readable_end(p, iso) {
                continue;
            }
            let target = Target {
                partition: Ok(p.clone()),
                topic: p.topic().to_owned(),
                id: p.id(),
                offset: next[i],
                max_bytes: if tail {
                    max_bytes.min(TAIL_READ_MAX_BYTES)
                } else {
                    max_bytes
                },
            };
            let read = (target, shape, tail);
            let Some((data, charge)) =
                read_chunk(&state, read, ledger.charge(), &tx, &mut shutdown).await
            else {
                return;
            };
            if let Some(err) = &data.error {
                let status = partition_status(&data.topic, data.partition, err);
                let _ = tx.send((Err(status), None)).await;
                return;
            }
            if data.next_offset == next[i] {
                continue; // nothing readable after all (the LSO had not moved)
            }
            next[i] = data.next_offset;
            at_end[i] = data.next_offset
                >= match iso {
                    Isolation::ReadCommitted => data.last_stable_offset,
                    Isolation::ReadUncommitted => data.high_watermark,
                };
            count_served(&state, &data);
            let msg = v1::SubscribeResponse {
                message: Some(v1::subscribe_response::Message::Data(data)),
            };
            if tx.send((Ok(msg), Some(charge))).await.is_err() {
                return; // the client went away
            }
            sent = true;
        }
        if sent {
            idle_since = Instant::now();
            continue;
        }
        let waits: Vec<_> = parts
            .iter()
            .zip(&wait_past)
            .map(|(p, n)| (p.clone(), *n))
            .collect();
        #[cfg(test)]
        tests::hook::on_wait(parts[0].topic());
        tokio::select! {
            () = any_new_data(&waits) => woke = true,
            () = tokio::time::sleep_until(idle_since + heartbeat) => {
                let hwms = parts.iter().map(|p| p.high_watermark()).collect();
                let msg = v1::SubscribeResponse { message: Some(v1::subscribe_response::Message::Heartbeat(v1::Heartbeat { high_watermarks: hwms })) };
                if tx.send((Ok(msg), None)).await.is_err() {
                    return;
                }
                idle_since = Instant::now();
            }
            _ = shutdown.changed() => {}
            () = tx.closed() => return,
        }
    }
}

/// What a subscription sends its stream: a message and the reply memory it holds.
type Outbox = mpsc::Sender<(Result<v1::SubscribeResponse, Status>, Option<Charge>)>;

/// Reads a subscription's next chunk of one partition within reply memory, waiting for memory
/// when there is none (backpressure): on this task for a tail read (`(target, shape, tail)`,
/// see the module docs), else on the blocking pool. `None`: the subscription ends (the client
/// went away; or the broker shuts down, or the read panicked, and the client was told).
async fn read_chunk(
    state: &Arc<State>,
    (target, shape, tail): (Target, Shape, bool),
    mut charge: Charge,
    tx: &Outbox,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<(v1::PartitionData, Charge)> {
    let targets = [target];
    let mut waited = false;
    let mut targets = Some(targets);
    loop {
        let t = targets.take()?;
        let limits = state.limits.decode();
        // After a wait for reply memory the tail read goes to the blocking pool too: the wait
        // can be long (another subscriber's slow client holds the memory), and by then the
        // bytes may be in a sealed segment whose pages were evicted, whose faults must not
        // stall the runtime's thread (module docs).
        // On failure: the partition's name (for the status) and the pool's error, if any.
        let read = if tail && !waited {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assemble_one(&t, shape, &limits, &mut charge)
            }))
            .map_err(|_| (t[0].topic.clone(), t[0].id, None))
            .map(|a| (a, t, charge))
        } else {
            // The pool keeps `t` if the read fails: its name is taken first (this path is a
            // thread hop already; the tail path above copies nothing unless it fails).
            let (topic, id) = (t[0].topic.clone(), t[0].id);
            tokio::task::spawn_blocking(move || {
                let a = assemble_one(&t, shape, &limits, &mut charge);
                (a, t, charge)
            })
            .await
            .map_err(|e| (topic, id, Some(e)))
        };
        let (assembled, t, back) = match read {
            Ok(r) => r,
            Err((topic, id, join)) => {
                let status = match join {
                    // The runtime is shutting down (it cancels what it has not started).
                    Some(e) if e.is_cancelled() => BrokerError::ShuttingDown.into(),
                    e => read_failed(&topic, id, e.as_ref()),
                };
                let _ = tx.send((Err(status), None)).await;
                return None;
            }
        };
        charge = back;
        targets = Some(t);
        let need = match assembled {
            Assembled::Done(mut parts) => return Some((parts.pop()?, charge)),
            Assembled::NeedMemory(n) => n,
        };
        if !waited {
            state.memory.metrics().waits.inc();
            waited = true;
        }
        tokio::select! {
            () = charge.grow(need) => {}
            _ = shutdown.changed() => {
                let _ = tx.send((Err(BrokerError::ShuttingDown.into()), None)).await;
                return None;
            }
            () = tx.closed() => return None,
        }
    }
}

/// Assembles one subscription read, on whichever thread calls it (the subscription's task for
/// a tail read, a blocking-pool thread otherwise).
fn assemble_one(
    t: &[Target; 1],
    shape: Shape,
    limits: &spool_log_engine::batch::DecodeLimits,
    charge: &mut Charge,
) -> Assembled {
    #[cfg(test)]
    tests::hook::on_assemble(&t[0].topic);
    reply::assemble(t, shape, limits, charge)
}

/// The status that ends a subscription whose read of `topic`/`partition` panicked (a bug: a
/// panic on the blocking pool comes back as a `JoinError`, `join`; one on the subscription's
/// task is caught there): INTERNAL, naming the partition, logged once here with the panic
/// (which the client is not sent). Only this subscription ends; the broker and its other
/// streams go on (the panic unwound that read alone, and the reply memory it held was given
/// back as its charge was dropped).
fn read_failed(topic: &str, partition: u32, join: Option<&tokio::task::JoinError>) -> Status {
    match join {
        Some(e) => {
            tracing::error!(topic, partition, error = %e, "a subscription's read panicked: ending it")
        }
        None => tracing::error!(
            topic,
            partition,
            "a subscription's read panicked on its task: ending it"
        ),
    }
    let e = v1::PartitionError {
        code: v1::ErrorCode::Internal as i32,
        message: "the broker failed reading this partition (a read panicked): subscribe again"
            .into(),
        ..Default::default()
    };
    partition_status(topic, partition, &e)
}

#[cfg(test)]
pub(crate) mod tests {
    //! Subscriptions driven in-process (the service called directly, no network), with a
    //! fault hook compiled only under `cfg(test)`: it records the thread of each read and can
    //! make one read panic.

    use futures_util::StreamExt;
    use spool_log_engine::TopicConfig;
    use spool_proto::v1::start_position::Position;

    use super::*;
    use crate::Broker;
    use crate::config::Config;

    /// The test-only hook [`assemble_one`] calls: keyed by topic, so tests running at once in
    /// this process do not see each other's reads.
    pub(crate) mod hook {
        use std::sync::{Mutex, PoisonError};
        use std::thread::ThreadId;

        /// Every read so far: its topic and the thread it ran on.
        static READS: Mutex<Vec<(String, ThreadId)>> = Mutex::new(Vec::new());
        /// Topics whose next read panics (once each).
        static PANIC_NEXT: Mutex<Vec<String>> = Mutex::new(Vec::new());
        /// Every wait of a subscription for new data: the topic of its first partition.
        static WAITS: Mutex<Vec<String>> = Mutex::new(Vec::new());

        pub(crate) fn on_wait(topic: &str) {
            WAITS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(topic.to_owned());
        }

        /// How many times subscriptions to `topic` waited for new data.
        pub(crate) fn waits(topic: &str) -> usize {
            WAITS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|t| *t == topic)
                .count()
        }

        pub(crate) fn on_assemble(topic: &str) {
            READS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((topic.to_owned(), std::thread::current().id()));
            let armed = {
                let mut p = PANIC_NEXT.lock().unwrap_or_else(PoisonError::into_inner);
                p.iter()
                    .position(|t| t == topic)
                    .map(|i| p.remove(i))
                    .is_some()
            };
            assert!(!armed, "test fault: this read of {topic} panics");
        }

        pub(crate) fn panic_next(topic: &str) {
            PANIC_NEXT
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(topic.to_owned());
        }

        /// The threads `topic`'s reads ran on, in order.
        pub(crate) fn reads(topic: &str) -> Vec<ThreadId> {
            READS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|(t, _)| t == topic)
                .map(|(_, id)| *id)
                .collect()
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    /// A broker opened as spoold opens it (not serving), with `topic` (one partition,
    /// `fsync = never`) holding `batches` one-record batches.
    fn broker_with(topic: &str, batches: usize) -> (tempfile::TempDir, Broker) {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        })
        .unwrap();
        let log = &broker.state.log;
        log.create_topic(
            topic,
            TopicConfig {
                partitions: 1,
                fsync: spool_log_engine::FsyncPolicy::Never,
                ..TopicConfig::default()
            },
        )
        .unwrap();
        for _ in 0..batches {
            append(&broker, topic);
        }
        (dir, broker)
    }

    fn append(broker: &Broker, topic: &str) {
        let p = broker.state.log.partition(topic, 0).unwrap();
        p.append_records(
            spool_log_engine::Compression::None,
            [(1000, None, Some(&b"v"[..]))],
        )
        .unwrap();
    }

    async fn subscribe(
        broker: &Broker,
        topic: &str,
        start: Position,
    ) -> ChargedStream<v1::SubscribeResponse> {
        Consume::new(broker.state.clone())
            .subscribe(Request::new(v1::SubscribeRequest {
                partitions: vec![v1::SubscribePartition {
                    topic: topic.into(),
                    partition: 0,
                    start: Some(v1::StartPosition {
                        position: Some(start),
                    }),
                }],
                heartbeat_interval_ms: 60_000,
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
    }

    /// The next data message, or the error that ended the stream.
    async fn next_data(
        s: &mut ChargedStream<v1::SubscribeResponse>,
    ) -> Result<v1::PartitionData, Status> {
        loop {
            let msg = tokio::time::timeout(WAIT, s.next())
                .await
                .expect("a message in time")
                .expect("the stream ended without a status")?;
            if let Some(v1::subscribe_response::Message::Data(d)) = msg.message {
                return Ok(d);
            }
        }
    }

    fn assert_read_failed(status: &Status, topic: &str) {
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(
            !status.message().contains("test fault"),
            "the panic's text stays in the log: {status:?}"
        );
        assert!(
            status.message().starts_with(&format!("{topic}/0: ")),
            "{status:?}"
        );
        let info = tonic_types::StatusExt::get_details_error_info(status).expect("ErrorInfo");
        assert_eq!(info.reason, "ERROR_CODE_INTERNAL");
        assert_eq!(info.metadata["topic"], topic);
        assert_eq!(info.metadata["partition"], "0");
    }

    /// A read that panics ends its subscription with INTERNAL naming the partition (before:
    /// the stream just ended, as if the broker had nothing more to say), on the blocking pool
    /// (a JoinError) and on the subscription's task (a tail read); the broker serves on.
    #[tokio::test]
    async fn a_read_that_panics_ends_the_subscription_with_internal() {
        let runtime_thread = std::thread::current().id();
        let pool = "panic-on-the-pool";
        let (_dir, broker) = broker_with(pool, 1);
        // From the start: not a tail read, so on the blocking pool.
        hook::panic_next(pool);
        let mut s = subscribe(&broker, pool, Position::Earliest(true)).await;
        let status = next_data(&mut s).await.expect_err("the read panicked");
        assert_read_failed(&status, pool);
        assert!(
            tokio::time::timeout(WAIT, s.next())
                .await
                .unwrap()
                .is_none(),
            "the subscription ended"
        );
        assert_eq!(hook::reads(pool).len(), 1);
        assert_ne!(hook::reads(pool)[0], runtime_thread, "read on the pool");
        // The broker serves on: the same partition again.
        let mut again = subscribe(&broker, pool, Position::Earliest(true)).await;
        assert_eq!(next_data(&mut again).await.unwrap().next_offset, 1);

        // At the end of the log, woken by an append: a tail read, on this task.
        let tail = "panic-on-the-task";
        let log = &broker.state.log;
        log.create_topic(
            tail,
            TopicConfig {
                partitions: 1,
                fsync: spool_log_engine::FsyncPolicy::Never,
                ..TopicConfig::default()
            },
        )
        .unwrap();
        let mut s = subscribe(&broker, tail, Position::Latest(true)).await;
        // Let the subscription reach its wait at the end of the (empty) log (its task runs on
        // this thread when this one yields).
        let deadline = Instant::now() + WAIT;
        while hook::waits(tail) == 0 {
            assert!(Instant::now() < deadline, "the subscription never waited");
            tokio::task::yield_now().await;
        }
        hook::panic_next(tail);
        append(&broker, tail);
        let status = next_data(&mut s).await.expect_err("the read panicked");
        assert_read_failed(&status, tail);
        assert_eq!(hook::reads(tail), vec![runtime_thread], "a tail read");
        let mut again = subscribe(&broker, tail, Position::Earliest(true)).await;
        assert_eq!(next_data(&mut again).await.unwrap().next_offset, 1);
    }

    /// A subscription's blocking-pool read cancelled because the runtime is shutting down
    /// ends the stream with UNAVAILABLE ("the broker is shutting down"), not INTERNAL as a
    /// read that panicked (29a0a7c). As when spoold's runtime is dropped (after `serve`
    /// returns) while a subscription's task still runs: the task's read is spawned onto a
    /// blocking pool that has shut down, which cancels it before it starts. Here the
    /// subscription's body runs (on a thread of its own) in the context of a runtime that was
    /// shut down first, so every read it spawns is cancelled: deterministic, no timing.
    #[tokio::test]
    async fn a_read_cancelled_at_shutdown_answers_unavailable() {
        let topic = "read-cancelled-at-shutdown";
        let (_dir, broker) = broker_with(topic, 1);
        let state = broker.state.clone();
        let p = state.log.partition(topic, 0).unwrap();
        let shape = Consume::new(state.clone()).shape(0, false, Isolation::ReadUncommitted);
        let ledger = state.memory.detached_ledger();
        let (tx, mut rx) = mpsc::channel(1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        runtime.shutdown_background();
        // From the start: not a tail read, so a read on the (shut down) blocking pool.
        let body = follow(
            state.clone(),
            vec![(p, 0)],
            (DEFAULT_MAX_BYTES, shape),
            Duration::from_secs(60),
            ledger,
            tx,
        );
        // The subscription's body ends by itself (nothing here waits on a timer); bounded, so
        // a regression that makes it wait fails instead of hanging.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            handle.block_on(body);
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(WAIT)
            .expect("the subscription ended after its cancelled read");
        assert!(
            !*state.shutdown.borrow(),
            "the broker's own shutdown signal was not sent: the status comes from the read"
        );
        let (msg, charge) = rx.try_recv().expect("the subscription sent a status");
        assert!(charge.is_none(), "a status holds no reply memory");
        let status = msg.expect_err("the read was cancelled");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), "the broker is shutting down");
        // Built through error.rs like every status: with its ErrorInfo (it had none).
        let info = tonic_types::StatusExt::get_details_error_info(&status).expect("ErrorInfo");
        assert_eq!(info.reason, "ERROR_CODE_SHUTTING_DOWN");
        assert!(
            matches!(rx.try_recv(), Err(mpsc::error::TryRecvError::Disconnected)),
            "the subscription ended after the status"
        );
        assert!(
            hook::reads(topic).is_empty(),
            "the cancelled read never ran"
        );
    }

    /// A tail read that had to wait for reply memory runs on the blocking pool (b0c27a2), the
    /// same tail read without a wait on the subscription's task. Driven by reply memory held
    /// by the test, not by timing: with a current-thread runtime, the subscription's task runs
    /// on this test's thread.
    #[tokio::test]
    async fn a_tail_read_that_waited_for_memory_runs_on_the_blocking_pool() {
        let runtime_thread = std::thread::current().id();
        let topic = "tail-after-a-memory-wait";
        let (_dir, broker) = broker_with(topic, 1);
        let memory = broker.state.memory.clone();
        let mut s = subscribe(&broker, topic, Position::Earliest(true)).await;
        // The first read reaches the end of what is readable: the next one is a tail read.
        assert_eq!(next_data(&mut s).await.unwrap().next_offset, 1);
        // Every byte of reply memory left taken: the tail read must wait.
        let mut hog = memory.detached_ledger().charge();
        let free = memory.global().limit() - memory.global().used();
        assert!(hog.try_grow(free));
        append(&broker, topic);
        let deadline = Instant::now() + WAIT;
        while memory.metrics().waits.get() == 0 {
            assert!(Instant::now() < deadline, "the tail read never waited");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let before = hook::reads(topic);
        assert_eq!(
            before.len(),
            2,
            "the first read, then the tail read that waits"
        );
        assert_ne!(
            before[0], runtime_thread,
            "the first read is not a tail read"
        );
        assert_eq!(before[1], runtime_thread, "the tail read runs on the task");
        drop(hog);
        assert_eq!(next_data(&mut s).await.unwrap().next_offset, 2);
        let after = hook::reads(topic);
        assert_eq!(after.len(), 3, "one read after the wait");
        assert_ne!(
            after[2], runtime_thread,
            "after a wait for memory the tail read runs on the blocking pool"
        );
    }
}
