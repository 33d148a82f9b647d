//! ProduceService: appends, unary and streamed.
//!
//! A pre-encoded batch is appended exactly as received (the engine checks it; nothing is
//! re-encoded). A record list is encoded into one batch here. Durability follows `acks`,
//! independently of the topic's fsync policy:
//! - `none`: the reply goes out once the batch is written (page cache), without offsets;
//! - `written`: reply after the page-cache write; under `fsync = always` a background group
//!   commit then makes the batch durable (and visible to readers);
//! - `durable` (default): reply after an fdatasync covered the batch, whatever the policy.
//!
//! Every produce runs in two phases: **write** (check, then `append_nowait` for each
//! partition, in request order) and **settle** (wait for durability as `acks` asks). On a
//! `ProduceStream` the write phase of each request runs in arrival order, one request at a
//! time, so per-partition order is the stream's order; settle phases overlap (at most
//! `MAX_IN_FLIGHT` per stream), and replies carry the request id, possibly out of order. A
//! stream has two tasks: a reader that receives and checks requests (up to `READ_AHEAD`
//! ahead) and a writer that runs their write phases in that order, so the next request is
//! decoded while the previous one is appended.
//!
//! Two ways to run the phases, chosen per request ([`blocking_path`]):
//! - a request to any `fsync = always` partition (the default policy) takes the **blocking
//!   path**: the write phase on the blocking pool, the settle phase on a blocking-pool
//!   thread that runs `Partition::wait_durable` itself (one group commit per partition among
//!   all the threads waiting). Under `acks = written | none` the thread that appended hands
//!   the results back (the reply goes out meanwhile) and then runs `Partition::sync_behind`
//!   itself, which makes the batch durable, and so visible, right behind its append (no
//!   hand-off to another thread between the append and its fdatasync) when no sync runs, and
//!   otherwise leaves it to the next sync, so at most two threads per partition wait for an
//!   fdatasync whatever the request rate. A `ProduceStream` request of that kind that is
//!   small ([`INLINE_MAX_BYTES`], pre-encoded, not transactional) is written on the runtime
//!   thread instead when its partitions take it without blocking (else on the blocking pool,
//!   in order), its reply goes out from the stream's task, and a blocking-pool thread is asked
//!   to run `sync_behind` only when no running group commit will cover the batch
//!   (`Partition::sync_behind_covered`: a sync runs and a thread already waits to run the
//!   next one, which starts after the append). The same syncs, the same visibility rule, no
//!   thread hop for the append and the reply. (The async path was
//!   measured on these partitions too: records became visible later, cause not found, see
//!   docs/benchmarks.md, issue 14.)
//! - every other request takes the **async path**, which holds no thread while it waits: the
//!   write phase on the runtime thread for small requests whose partitions take them without
//!   blocking ([`INLINE_MAX_BYTES`]), otherwise on the blocking pool; the settle phase asks the
//!   partition for a sync (`Partition::request_sync`: one blocking-pool thread runs the
//!   partition's group commits for as long as requests keep asking, not one per request) and,
//!   with `acks = durable`, awaits `Partition::durable`, which resolves only once an
//!   fdatasync covering the batch has completed (or with the partition's error). A reply
//!   that waits for no fdatasync is sent from the stream's own task.
//!
//! Transactional batches: before any is appended, the transaction coordinator adds its
//! partition to the producer's open transaction (and refuses a zombie's or an ended
//! transaction's batch); the partition then checks the batch against its own transaction
//! state.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use spool_log_engine::{AppendInfo, BatchHeader, Compression, Durable, FsyncPolicy, Partition};
use spool_proto::v1::{self, produce_service_server::ProduceService};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{check_count, check_user_topic, receive_error};
use crate::auth::{Action, Principal, principal};
use crate::convert::encode_records;
use crate::error::{BrokerError, partition_error};
use crate::metrics::timed;
use crate::txn::TxnHold;
use crate::{State, blocking};

/// Requests of one `ProduceStream` whose replies are pending.
const MAX_IN_FLIGHT: usize = 64;

/// Requests of one `ProduceStream` received and checked ahead of the one being written: the
/// stream's reader decodes the next request (tonic copies it out of the HTTP/2 frames) while
/// the writer appends the previous one, instead of one after the other. Bounded by
/// [`MAX_IN_FLIGHT`] too.
const READ_AHEAD: usize = 2;

/// A request of pre-encoded, uncompressed, non-transactional batches of at most this many
/// bytes in all is appended on the runtime thread that received it when its partitions take
/// it without blocking (`Partition::try_append_nowait`: writer lock free, no roll due), on
/// the async path and for `ProduceStream` requests that wait for no fdatasync; larger ones,
/// and the rest, on the blocking pool. 64 KiB is a copy into the page cache of some
/// microseconds. Compressed batches never are: their check decompresses them (up to
/// `max_decompressed_bytes`, 64 MiB by default), milliseconds a 64 KiB request could cost
/// every connection on the thread.
const INLINE_MAX_BYTES: usize = 64 << 10;

#[derive(Debug)]
pub(crate) struct Produce {
    state: Arc<State>,
}

impl Produce {
    pub(crate) fn new(state: Arc<State>) -> Produce {
        Produce { state }
    }
}

/// Checks one partition's part of a request: where it goes, and the batch bytes.
fn prepare(
    state: &State,
    who: &Principal,
    pp: v1::PartitionProduce,
    now: i64,
) -> Result<(Arc<Partition>, Bytes), BrokerError> {
    check_user_topic(&pp.topic)?;
    who.require(Action::Produce, &pp.topic)?;
    let partition = state.log.partition(&pp.topic, pp.partition)?;
    let batch = match pp.data {
        Some(v1::partition_produce::Data::RecordBatch(b)) => b,
        Some(v1::partition_produce::Data::Records(list)) => {
            encode_records(&list, now, state.config.limits.max_records_per_request)?
        }
        None => {
            return Err(BrokerError::InvalidRequest(
                "no data: set record_batch or records".into(),
            ));
        }
    };
    Ok((partition, batch))
}

/// A request after its write phase.
struct Written {
    acks: v1::Acks,
    results: Vec<v1::PartitionProduceResult>,
    /// (index into results, partition, what was appended, bytes), for the settle phase.
    appended: Vec<(usize, Arc<Partition>, AppendInfo, usize)>,
}

/// Checks a request (anything wrong with the request as a whole is an error status).
fn check(state: &State, partitions: usize, acks: i32) -> Result<v1::Acks, BrokerError> {
    if *state.shutdown.borrow() {
        return Err(BrokerError::ShuttingDown);
    }
    check_count(state, partitions, "partitions")?;
    v1::Acks::try_from(acks).map_err(|_| BrokerError::InvalidRequest("unknown acks".into()))
}

/// One part of a request, checked and ready to append: (index into results, partition, batch).
type Job = (usize, Arc<Partition>, Bytes);

/// Checks every part of a request (where it goes, the caller's rights, the data; record lists
/// are encoded here) and registers transactional batches with their transactions. Returns the
/// results (errors set for refused parts) and the parts to append, in request order.
fn prepare_all(
    state: &State,
    who: &Principal,
    parts: Vec<v1::PartitionProduce>,
) -> (Vec<v1::PartitionProduceResult>, Vec<Job>, Vec<TxnHold>) {
    let now = state.now_ms();
    let mut results = Vec::with_capacity(parts.len());
    let mut jobs = Vec::with_capacity(parts.len());
    for (i, pp) in parts.into_iter().enumerate() {
        let mut r = v1::PartitionProduceResult {
            topic: pp.topic.clone(),
            partition: pp.partition,
            ..Default::default()
        };
        match prepare(state, who, pp, now) {
            Ok((p, batch)) => jobs.push((i, p, batch)),
            Err(e) => r.error = Some(partition_error(e)),
        }
        results.push(r);
    }
    let (jobs, holds) = register_transactional(state, jobs, &mut results);
    (results, jobs, holds)
}

/// Appends `jobs` in order (blocking). Appends happen in request order for every acks level
/// (acks = none too, so that successive requests keep their order); only what happens after
/// differs (settle).
fn append_all(jobs: Vec<Job>, w: &mut Written) {
    for (i, p, batch) in jobs {
        match p.append_nowait(&batch) {
            Ok(info) => w.appended.push((i, p, info, batch.len())),
            Err(e) => w.results[i].error = Some(partition_error(e)),
        }
    }
}

/// Write phase (blocking): check each part and append it without waiting for durability.
fn write(
    state: &State,
    who: &Principal,
    parts: Vec<v1::PartitionProduce>,
    acks: v1::Acks,
) -> Written {
    let (results, jobs, holds) = prepare_all(state, who, parts);
    let mut w = Written {
        acks,
        appended: Vec::with_capacity(jobs.len()),
        results,
    };
    if !holds.is_empty() {
        crate::failpoint::delay_at("produce-txn-before-append");
    }
    append_all(jobs, &mut w);
    // Only now may the transactions end (their markers then cover these batches).
    drop(holds);
    w
}

/// True when a request may be written on the runtime thread: every part a pre-encoded batch
/// (no record list to encode), uncompressed (no decompression in its check), none
/// transactional (no coordinator call), at most [`INLINE_MAX_BYTES`] in all. A batch whose
/// header does not parse may be: its check refuses it at once.
fn inline_ok(parts: &[v1::PartitionProduce]) -> bool {
    let mut total = 0usize;
    parts.iter().all(|pp| match &pp.data {
        Some(v1::partition_produce::Data::RecordBatch(b)) => {
            total += b.len();
            total <= INLINE_MAX_BYTES
                && BatchHeader::parse(b).map_or(true, |h| {
                    !h.is_transactional() && matches!(h.compression(), Ok(Compression::None))
                })
        }
        _ => false,
    })
}

/// Write phase on the runtime thread for a small request: checks, then `try_append_nowait`
/// for each part in order. Returns the parts from the first one whose partition declined
/// (writer busy, or a roll due), which must be appended on a thread that may block, in order.
fn write_inline(
    state: &State,
    who: &Principal,
    parts: Vec<v1::PartitionProduce>,
    acks: v1::Acks,
) -> (Written, Vec<Job>) {
    let (results, jobs, holds) = prepare_all(state, who, parts);
    // `inline_ok` lets no transactional batch here: nothing is held.
    debug_assert!(holds.is_empty());
    drop(holds);
    let mut w = Written {
        acks,
        appended: Vec::with_capacity(jobs.len()),
        results,
    };
    let mut jobs = jobs.into_iter();
    while let Some((i, p, batch)) = jobs.next() {
        match p.try_append_nowait(&batch) {
            Some(Ok(info)) => w.appended.push((i, p, info, batch.len())),
            Some(Err(e)) => w.results[i].error = Some(partition_error(e)),
            None => {
                let mut rest = vec![(i, p, batch)];
                rest.extend(jobs);
                return (w, rest);
            }
        }
    }
    (w, Vec::new())
}

/// Runs the write phase of a request that waits for no fdatasync (the async path, and
/// `ProduceStream`'s `acks = written | none` requests to `fsync = always` partitions): on
/// this (runtime) thread when the request is small and its partitions take it without blocking (handing a write of a few kilobytes into the page
/// cache to another thread costs more than the write), otherwise on the blocking pool.
async fn write_phase(
    state: &Arc<State>,
    who: Principal,
    parts: Vec<v1::PartitionProduce>,
    acks: v1::Acks,
) -> Result<Written, Status> {
    if inline_ok(&parts) {
        let (mut w, rest) = write_inline(state, &who, parts, acks);
        if rest.is_empty() {
            return Ok(w);
        }
        return blocking(move || {
            append_all(rest, &mut w);
            w
        })
        .await;
    }
    let st = state.clone();
    blocking(move || write(&st, &who, parts, acks)).await
}

/// Adds the partitions of transactional batches to their producers' open transactions
/// (one coordinator call per producer); returns the jobs that may be appended, having set
/// the error of the others.
fn register_transactional(
    state: &State,
    jobs: Vec<Job>,
    results: &mut [v1::PartitionProduceResult],
) -> (Vec<Job>, Vec<TxnHold>) {
    let mut by_producer: std::collections::BTreeMap<(i64, i16), Vec<usize>> = Default::default();
    for (j, (_, _, batch)) in jobs.iter().enumerate() {
        if let Ok(h) = BatchHeader::parse(batch)
            && h.is_transactional()
        {
            by_producer
                .entry((h.producer_id, h.producer_epoch))
                .or_default()
                .push(j);
        }
    }
    if by_producer.is_empty() {
        return (jobs, Vec::new());
    }
    let mut refused = vec![false; jobs.len()];
    let (producers, wants): (Vec<Vec<usize>>, Vec<_>) = by_producer
        .into_iter()
        .map(|((pid, epoch), js)| {
            let tps = js
                .iter()
                .map(|&j| (jobs[j].1.topic().to_owned(), jobs[j].1.id()))
                .collect();
            (js, ((pid, epoch), tps))
        })
        .unzip();
    // Each transactional id locked once, in id order, held until the appends are done.
    let (added, holds) = state.txns.add_partitions_all(wants);
    for (js, r) in producers.into_iter().zip(added) {
        if let Err(e) = r {
            let err = partition_error(e);
            for j in js {
                refused[j] = true;
                results[jobs[j].0].error = Some(err.clone());
            }
        }
    }
    let jobs = jobs
        .into_iter()
        .zip(refused)
        .filter_map(|(job, no)| (!no).then_some(job))
        .collect();
    (jobs, holds)
}

/// True when a request takes the blocking path: one of its parts goes to an existing
/// `fsync = always` partition. (A part whose partition does not exist is refused by the write
/// phase on either path.)
fn blocking_path(state: &State, parts: &[v1::PartitionProduce]) -> bool {
    parts.iter().any(|pp| {
        state
            .log
            .partition(&pp.topic, pp.partition)
            .is_ok_and(|p| p.fsync_policy() == FsyncPolicy::Always)
    })
}

/// Fills in one part's result once the durability its reply waits for is settled.
fn fill(
    state: &State,
    acks: v1::Acks,
    r: &mut v1::PartitionProduceResult,
    info: &AppendInfo,
    bytes: usize,
    outcome: spool_log_engine::Result<()>,
) {
    match outcome {
        Ok(()) => {
            // A duplicate wrote nothing: it is not counted as produced.
            if !info.duplicate {
                state
                    .metrics
                    .produced(&r.topic, bytes, info.last_offset - info.base_offset + 1);
            }
            r.duplicate = info.duplicate;
            if acks == v1::Acks::None {
                return; // no offsets, as the contract says
            }
            r.base_offset = info.base_offset;
            r.last_offset = info.last_offset;
            r.log_append_time_ms = info.log_append_time_ms;
        }
        Err(e) => r.error = Some(partition_error(e)),
    }
}

/// Settle phase of the blocking path (blocking): waits for the durability `acks` asks for,
/// running the partition's group commit on this thread; fills in the results. Returns them
/// and, when the reply waits for no fdatasync (`acks = written | none`), the `fsync = always`
/// partitions whose batches an fdatasync must still cover before readers see them, with the
/// offset to cover: the caller runs [`sync_for_readers`] on them once the reply is on its way.
fn settle_blocking(state: &State, w: Written) -> (Vec<v1::PartitionProduceResult>, Syncs) {
    let Written {
        acks,
        mut results,
        appended,
    } = w;
    let mut syncs = Vec::new();
    for (i, p, info, bytes) in appended {
        let next = info.last_offset + 1;
        let outcome = if acks != v1::Acks::Durable && acks != v1::Acks::Unspecified {
            if p.fsync_policy() == FsyncPolicy::Always {
                syncs.push((p, next));
            }
            Ok(())
        } else {
            p.wait_durable(next)
        };
        fill(state, acks, &mut results[i], &info, bytes, outcome);
    }
    (results, syncs)
}

/// Partitions and the offset below which an fdatasync must cover their batches.
type Syncs = Vec<(Arc<Partition>, u64)>;

/// Makes batches acknowledged before their fdatasync visible to readers (blocking): joins
/// each partition's group commit through `Partition::sync_behind`, which runs the sync on
/// this thread when none runs, waits to run the next one when nobody else does, and
/// otherwise returns at once (that next sync covers the batch): at most two threads per
/// partition are held, not one per request. A failed sync poisons the partition (later
/// writes and waiters get its error); it is logged here.
fn sync_for_readers(syncs: Syncs) {
    for (p, next) in syncs {
        match p.sync_behind(next) {
            // The log closed (shutdown) or the topic was deleted: nothing to sync.
            Ok(())
            | Err(spool_log_engine::Error::Closed | spool_log_engine::Error::TopicDeleted { .. }) =>
                {}
            Err(e) => {
                tracing::error!(topic = p.topic(), partition = p.id(), error = %e, "background sync failed")
            }
        }
    }
}

/// [`sync_for_readers`] for the runtime thread: the batches a running group commit will
/// cover anyway (`Partition::sync_behind_covered`: a sync runs and another thread already
/// waits to run the next one) need no thread; the rest go to one blocking-pool thread, which
/// runs `sync_behind` for them. Under a steady stream of small requests most batches take the
/// first way, so the runtime thread neither wakes nor hands off to a pool thread per request.
fn sync_behind_off_thread(syncs: Syncs) {
    let rest: Syncs = syncs
        .into_iter()
        .filter(|(p, next)| !p.sync_behind_covered(*next))
        .collect();
    if !rest.is_empty() {
        tokio::task::spawn_blocking(move || sync_for_readers(rest));
    }
}

/// A blocking-path request on one blocking-pool thread: write, settle, hand the results back
/// (the caller replies meanwhile), then, on the same thread, [`sync_for_readers`] for batches
/// acknowledged before their fdatasync, so that sync starts right behind the append instead
/// of after a hand-off to another thread.
async fn run_blocking_path(
    state: &Arc<State>,
    who: Principal,
    parts: Vec<v1::PartitionProduce>,
    acks: v1::Acks,
) -> Result<Vec<v1::PartitionProduceResult>, Status> {
    let (done, results) = tokio::sync::oneshot::channel();
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        let w = write(&st, &who, parts, acks);
        let (results, syncs) = settle_blocking(&st, w);
        // The reply does not wait for these syncs: a caller gone meanwhile changes nothing.
        let _ = done.send(results);
        sync_for_readers(syncs);
    });
    results
        .await
        .map_err(|_| BrokerError::Internal("the worker failed before answering".into()).into())
}

/// Makes everything below `next` on `p` durable soon: joins the partition's running sync loop,
/// or starts one on the blocking pool when none runs (one thread per burst of requests, not
/// one per request).
fn request_sync(p: &Arc<Partition>, next: u64) {
    if p.request_sync(next) {
        let p = p.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = p.run_requested_syncs()
                && !matches!(
                    e,
                    spool_log_engine::Error::Closed | spool_log_engine::Error::TopicDeleted { .. }
                )
            {
                tracing::error!(topic = p.topic(), partition = p.id(), error = %e, "background sync failed");
            }
        });
    }
}

/// A request whose appends are done, waiting for the durability `acks` asks for.
struct Settling {
    acks: v1::Acks,
    results: Vec<v1::PartitionProduceResult>,
    /// (index into results, what was appended, bytes, the durability to wait for).
    parts: Vec<(usize, AppendInfo, usize, Option<Durable>)>,
}

/// Settle phase of the async path, started: asks for the syncs `acks` and the fsync policy
/// need. Under
/// `fsync = always` a batch acknowledged before its fdatasync (`acks = written | none`) still
/// gets one soon (readers see it only once synced); `acks = durable` waits for one, whatever
/// the policy. Runs on the runtime: nothing here blocks.
fn settle(w: Written) -> Settling {
    let Written {
        acks,
        results,
        appended,
    } = w;
    let wait = acks == v1::Acks::Durable || acks == v1::Acks::Unspecified;
    let parts = appended
        .into_iter()
        .map(|(i, p, info, bytes)| {
            let next = info.last_offset + 1;
            let durable = if wait {
                request_sync(&p, next);
                Some(p.durable(next))
            } else {
                if p.fsync_policy() == FsyncPolicy::Always {
                    request_sync(&p, next);
                }
                None
            };
            (i, info, bytes, durable)
        })
        .collect();
    Settling {
        acks,
        results,
        parts,
    }
}

impl Settling {
    /// True when the reply must wait for an fdatasync.
    fn waits(&self) -> bool {
        self.parts.iter().any(|(.., d)| d.is_some())
    }

    /// Waits (holding no thread) for the durability asked for; fills in the results.
    async fn finish(self, state: &State) -> Vec<v1::PartitionProduceResult> {
        let Settling {
            acks,
            mut results,
            parts,
        } = self;
        for (i, info, bytes, durable) in parts {
            let outcome = match durable {
                Some(d) => d.await,
                None => Ok(()),
            };
            fill(state, acks, &mut results[i], &info, bytes, outcome);
        }
        results
    }
}

/// A `ProduceStream` request received and checked, waiting for its write phase.
struct Pending {
    id: u64,
    acks: v1::Acks,
    parts: Vec<v1::PartitionProduce>,
    /// Its place among the stream's [`MAX_IN_FLIGHT`] requests, freed once the reply is queued.
    permit: OwnedSemaphorePermit,
}

/// Sends a reply; false when the reply stream is gone.
async fn reply(
    tx: &mpsc::Sender<Result<v1::ProduceStreamResponse, Status>>,
    request_id: u64,
    results: Result<Vec<v1::PartitionProduceResult>, Status>,
) -> bool {
    let r = results.map(|results| v1::ProduceStreamResponse {
        request_id,
        results,
    });
    tx.send(r).await.is_ok()
}

/// Runs one `ProduceStream` request's write phase and starts (or, when it waits for no
/// fdatasync, finishes) its settle phase, whose reply then goes out on `tx` (a settle phase
/// that waits runs as a task in `settling`). Returns `Ok(false)` when the stream must stop
/// because the reply stream is gone, and `Err` with the status that ends the stream when the
/// request failed as a whole; the caller sends that status once `settling` is empty.
async fn write_one(
    state: &Arc<State>,
    who: &Principal,
    p: Pending,
    tx: &mpsc::Sender<Result<v1::ProduceStreamResponse, Status>>,
    settling: &mut SettleTasks,
) -> Result<bool, Status> {
    let Pending {
        id,
        acks,
        parts,
        permit,
    } = p;
    let waits = acks == v1::Acks::Durable || acks == v1::Acks::Unspecified;
    if blocking_path(state, &parts) {
        if !waits && inline_ok(&parts) {
            // A small request that waits for no fdatasync: written on this thread when its
            // partitions take it without blocking (else on the blocking pool, in order), the
            // reply sent from here, and a blocking thread asked to run the sync only when no
            // running group commit will cover the batch (`sync_behind_off_thread`).
            let written = write_phase(state, who.clone(), parts, acks).await?;
            // Nothing here blocks: with `acks = written | none` it only collects the syncs.
            let (results, syncs) = settle_blocking(state, written);
            // The sync is asked for before the reply is queued: a client that reads no
            // replies (the reply channel full) must not hold back the batch's visibility.
            sync_behind_off_thread(syncs);
            let sent = reply(tx, id, Ok(results)).await;
            drop(permit);
            return Ok(sent);
        }
        if !waits {
            // Nothing to wait for: write and settle on one thread, which then runs the sync
            // that makes the batch visible (`run_blocking_path`); the reply goes out from here.
            let results = run_blocking_path(state, who.clone(), parts, acks).await?;
            let sent = reply(tx, id, Ok(results)).await;
            drop(permit);
            return Ok(sent);
        }
        let (st, who) = (state.clone(), who.clone());
        let written = match tokio::task::spawn_blocking(move || write(&st, &who, parts, acks)).await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "a ProduceStream write failed on the blocking pool");
                return Err(BrokerError::Internal(
                    "the write of this request failed inside the broker; see its log".into(),
                )
                .into());
            }
        };
        // Settle phases overlap; the reply carries the request id. A settle phase that fails
        // sends no status itself (tonic would end the stream there, cutting off the others'
        // replies): it hands the status to the writer, which sends it after them.
        let (st, tx) = (state.clone(), tx.clone());
        settling.0.spawn(async move {
            let results = blocking(move || {
                let (results, syncs) = settle_blocking(&st, written);
                sync_for_readers(syncs); // none: `acks = durable` waited above
                results
            })
            .await;
            let failed = match results {
                Ok(results) => {
                    reply(&tx, id, Ok(results)).await;
                    None
                }
                Err(status) => Some(status),
            };
            drop(permit);
            failed
        });
        return Ok(true);
    }
    let written = write_phase(state, who.clone(), parts, acks).await?;
    // A reply that waits for no fdatasync goes out from here, without a task of its own.
    let waiting = settle(written);
    if !waiting.waits() {
        let results = waiting.finish(state).await;
        let sent = reply(tx, id, Ok(results)).await;
        drop(permit);
        return Ok(sent);
    }
    let (st, tx) = (state.clone(), tx.clone());
    settling.0.spawn(async move {
        let results = waiting.finish(&st).await;
        reply(&tx, id, Ok(results)).await;
        drop(permit);
        None
    });
    Ok(true)
}

/// A `ProduceStream`'s settle phases still waiting for their fdatasync, each with a reply to
/// send (at most `MAX_IN_FLIGHT`: each holds its request's permit); a task's output is the
/// status that must end the stream, if it failed. Dropped (the writer's task panicked), it
/// detaches them rather than aborting them, so their replies still go out.
struct SettleTasks(JoinSet<Option<Status>>);

impl SettleTasks {
    /// Notes a finished settle phase's failure as the status that ends the stream.
    fn note(end: &mut Option<Status>, done: Result<Option<Status>, tokio::task::JoinError>) {
        match done {
            Ok(None) => {}
            Ok(Some(status)) => Self::end_with(end, status),
            Err(e) => {
                tracing::error!(error = %e, "a ProduceStream settle phase failed");
                Self::end_with(
                    end,
                    BrokerError::Internal(
                        "settling a request failed inside the broker; see its log".into(),
                    )
                    .into(),
                );
            }
        }
    }

    /// The status that ends the stream: the first one, except that INTERNAL (something may
    /// have been appended that no reply reports) replaces a refusal (nothing was written).
    fn end_with(end: &mut Option<Status>, status: Status) {
        let internal = |s: &Status| s.code() == tonic::Code::Internal;
        if end
            .as_ref()
            .is_none_or(|e| internal(&status) && !internal(e))
        {
            *end = Some(status);
        }
    }
}

impl Drop for SettleTasks {
    fn drop(&mut self) {
        self.0.detach_all();
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<v1::ProduceStreamResponse, Status>> + Send>>;

/// Spawns one of a `ProduceStream`'s two tasks (`what`: its reader or its writer). If it
/// panics, `ends` receives INTERNAL: the writer's channel (for the reader), which ends the
/// stream with it after the replies of what was written; the reply channel (for the
/// writer), which ends the stream with it at once (settle phases still waiting are detached:
/// a reply that comes after the status is lost, so the client takes their outcome as
/// unknown, as INTERNAL says). Without this, a panic dropped the task's sender and the
/// client saw a clean end of the stream with its last requests unanswered. One watching task
/// per stream, not per request.
fn spawn_ending_on_panic<T: Send + 'static>(
    task: impl Future<Output = ()> + Send + 'static,
    ends: mpsc::Sender<Result<T, Status>>,
    what: &'static str,
) {
    let task = tokio::spawn(task);
    tokio::spawn(async move {
        if let Err(e) = task.await
            && e.is_panic()
        {
            tracing::error!(error = %e, "a ProduceStream {what} task panicked");
            let status = BrokerError::Internal(format!(
                "the stream's {what} failed inside the broker (see its log); the outcome of \
                 its unanswered requests is unknown"
            ));
            let _ = ends.send(Err(status.into())).await;
        }
    });
}

#[tonic::async_trait]
impl ProduceService for Produce {
    async fn produce(
        &self,
        req: Request<v1::ProduceRequest>,
    ) -> Result<Response<v1::ProduceResponse>, Status> {
        timed(&self.state.metrics, "Produce", async move {
            let who = principal(&req);
            let req = req.into_inner();
            let acks = check(&self.state, req.partitions.len(), req.acks)?;
            let results = if blocking_path(&self.state, &req.partitions) {
                run_blocking_path(&self.state, who, req.partitions, acks).await?
            } else {
                let w = write_phase(&self.state, who, req.partitions, acks).await?;
                settle(w).finish(&self.state).await
            };
            Ok(Response::new(v1::ProduceResponse { results }))
        })
        .await
    }

    async fn init_producer_id(
        &self,
        req: Request<v1::InitProducerIdRequest>,
    ) -> Result<Response<v1::InitProducerIdResponse>, Status> {
        timed(&self.state.metrics, "InitProducerId", async move {
            if !principal(&req).may_produce_somewhere() {
                return Err(BrokerError::NotAuthorized(
                    "a producer id needs the right to produce to some topic".into(),
                )
                .into());
            }
            let req = req.into_inner();
            if !req.transactional_id.is_empty() {
                let expected = match (req.expected_producer_id, req.expected_producer_epoch) {
                    (Some(pid), Some(epoch)) => Some((
                        pid,
                        i16::try_from(epoch).map_err(|_| {
                            BrokerError::InvalidRequest(
                                "expected_producer_epoch is not an i16".into(),
                            )
                        })?,
                    )),
                    (None, None) => None,
                    _ => {
                        return Err(BrokerError::InvalidRequest(
                            "set both expected_producer_id and expected_producer_epoch, or neither"
                                .into(),
                        )
                        .into());
                    }
                };
                let (producer_id, epoch) = self
                    .state
                    .txns
                    .init(&req.transactional_id, req.transaction_timeout_ms, expected)
                    .await?;
                return Ok(Response::new(v1::InitProducerIdResponse {
                    producer_id,
                    producer_epoch: i32::from(epoch),
                }));
            }
            let state = self.state.clone();
            let producer_id =
                blocking(move || state.producer_ids.allocate(state.now_ms())).await??;
            Ok(Response::new(v1::InitProducerIdResponse {
                producer_id,
                producer_epoch: 0,
            }))
        })
        .await
    }

    type ProduceStreamStream = ReplyStream;

    async fn produce_stream(
        &self,
        req: Request<Streaming<v1::ProduceStreamRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let _timer = self.state.metrics.rpc("ProduceStream");
        let who = principal(&req);
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<v1::ProduceStreamResponse, Status>>(MAX_IN_FLIGHT);
        let (to_writer, mut writes) = mpsc::channel::<Result<Pending, Status>>(READ_AHEAD);
        let state = self.state.clone();
        // The reader: receives (tonic decodes) and checks requests, in arrival order.
        let mut shutdown = self.state.shutdown.clone();
        let reader_panic = to_writer.clone();
        let reader = async move {
            let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            // At shutdown an open stream ends (UNAVAILABLE, after the replies of what was
            // written) rather than wait for its next request: hyper's graceful shutdown waits
            // for every open stream, so an idle producer's stream would hold the broker up to
            // `shutdown_timeout_ms`. One waiter for the stream's life, not one per request.
            let stopping = async move { drop(shutdown.wait_for(|s| *s).await) };
            tokio::pin!(stopping);
            loop {
                let msg = tokio::select! {
                    biased;
                    msg = incoming.next() => msg,
                    () = &mut stopping => {
                        let _ = to_writer.send(Err(BrokerError::ShuttingDown.into())).await;
                        break;
                    }
                };
                let Some(msg) = msg else { break };
                crate::failpoint::panic_at("produce-stream-reader");
                let msg = match msg {
                    Ok(m) => m,
                    Err(status) => {
                        // A request that could not be received (over
                        // `limits.max_request_bytes`, not decodable, malformed framing) ends
                        // the stream with its status (`receive_error`), after the replies of
                        // the requests before it, as a request refused by `check` does. A
                        // broken connection gives an error too: its status reaches no one.
                        tracing::debug!(%status, "a ProduceStream request could not be received");
                        let _ = to_writer.send(Err(receive_error(status))).await;
                        break;
                    }
                };
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let next = check(&state, msg.partitions.len(), msg.acks).map(|acks| Pending {
                    id: msg.request_id,
                    acks,
                    parts: msg.partitions,
                    permit,
                });
                let refused = next.is_err();
                // The writer stopped (the reply stream is gone, or a request failed): stop reading.
                if to_writer.send(next.map_err(Status::from)).await.is_err() || refused {
                    break;
                }
            }
        };
        spawn_ending_on_panic(reader, reader_panic, "reader");
        // The writer: write phases one at a time, in arrival order (what keeps per-partition
        // order), while the reader decodes the next request.
        let state = self.state.clone();
        let writer_panic = tx.clone();
        let writer = async move {
            let mut settling = SettleTasks(JoinSet::new());
            let mut end = None;
            loop {
                // A settle phase that ends (a failure must end the stream now, not when the
                // next request comes), or the next request.
                let next = tokio::select! {
                    biased;
                    Some(done) = settling.0.join_next(), if !settling.0.is_empty() => {
                        SettleTasks::note(&mut end, done);
                        if end.is_some() {
                            break;
                        }
                        continue;
                    }
                    next = writes.recv() => match next {
                        Some(next) => next,
                        None => break,
                    },
                };
                crate::failpoint::panic_at("produce-stream-writer");
                let outcome = match next {
                    Ok(p) => write_one(&state, &who, p, &tx, &mut settling).await,
                    Err(status) => Err(status),
                };
                match outcome {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(status) => SettleTasks::end_with(&mut end, status),
                }
                break;
            }
            // Nothing more is written: the reader stops at once.
            drop(writes);
            // tonic ends the reply stream at its first error: the requests written before the
            // one that failed get their replies first (their data is in the log, durable once
            // their settle phase ends; a client that never heard of them would send them
            // again), then the status.
            while let Some(done) = settling.0.join_next().await {
                SettleTasks::note(&mut end, done);
            }
            if let Some(status) = end {
                let _ = tx.send(Err(status)).await;
            }
        };
        spawn_ending_on_panic(writer, writer_panic, "writer");
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as ReplyStream
        ))
    }
}
