//! The transaction coordinator: transactional ids, their producers, and their transactions,
//! recorded in the internal topic `__transaction_state` (compacted, one record per id:
//! key = the id, value = [`TxnMeta`] as JSON).
//!
//! Protocol (docs/protocol.md, "Transactions"):
//! 1. `InitProducerId(transactional_id)` ends whatever the id's previous producer left open
//!    (abort), bumps the epoch and records it durably before replying, so a zombie of an
//!    older epoch is refused from then on, across restarts too.
//! 2. A transactional batch reaches `add_partitions` (from the produce path) before it is
//!    appended: the partition joins the open transaction, in memory, and the id stays locked
//!    until the batch is appended ([`TxnHold`]): an end of the transaction (EndTxn, a new
//!    instance's InitProducerId, the timeout pass) cannot run between the two and leave the
//!    batch to land after the markers, at the fenced epoch, opening a transaction no one
//!    tracks on its partition (its last stable offset stuck). Nothing needs to be
//!    durable here: after a crash every transaction without a decision is aborted anyway, and
//!    the partitions holding its batches are found in the log (each partition knows its open
//!    transactions). `AddOffsetsToTxn` does record the transaction (`Ongoing`) durably before
//!    its reply: offsets live nowhere else, and a restart must abort such a transaction (and
//!    bump the epoch) rather than let its producer commit it without them. `CommitTxn`
//!    carries the offsets in the commit itself: they are added in memory under the id's lock
//!    and recorded durably only with the decision (one fsync'ed record instead of two; if
//!    the decision is never recorded, neither is anything the request asked for).
//! 3. `EndTxn` records the decision (`Prepare*`, with the partitions, the offsets and the
//!    bumped epoch) **durably before any marker is written**; then appends a marker to every
//!    partition and waits until they are as durable as their topics' fsync policy says (in
//!    parallel, and on a commit beside the fsync of its offsets, which become visible only
//!    once both are durable), and records `Complete*` without waiting for it to be durable
//!    (lost, the restart carries the decision out again, which changes nothing: markers are
//!    idempotent and the offsets are re-applied only where nobody committed since the
//!    decision, `offsets_since`). Without offsets the reply goes out once the markers are
//!    appended, and the rest runs after it while the id stays locked (`end_pipelined`): the
//!    producer prepares its next transaction meanwhile.
//! 4. At start, before serving: every `Prepare*` is carried out again (markers are
//!    idempotent: a partition without the producer's open transaction, or with only a later
//!    one of the marker's own epoch, writes nothing). Its `offsets_since` is first clamped to
//!    the recovered end of `__consumer_offsets` and the clamp recorded durably: the position
//!    counted commits still in flight, a power cut can lose them, and the positions they
//!    held go to commits newer than the decision. Then every transaction recorded
//!    `Ongoing` or still open in any partition is aborted, with a bumped epoch. A decision
//!    that cannot be carried out yet (a marker's write fails) owns its producer's open
//!    transactions below its epoch; one at its epoch (the producer's next transaction, kept
//!    by a cut that lost `Complete*`) is aborted as soon as the decision is carried out
//!    (`TxnMeta::later_open`; if that abort cannot be recorded, it is left open under its
//!    timeout, as an undecided transaction whose abort fails at the start is).
//! 5. A background task aborts transactions open past their timeout (bumping the epoch: the
//!    producer gets `TRANSACTION_TIMED_OUT`) and retries decisions whose markers failed.
//!
//! Invariants: one operation at a time per transactional id (an async mutex each, held until
//! a decision is completed); a decision, once durable, is always carried out; a newer record
//! of an id is never appended before the previous decision's markers are durable; the reply
//! to EndTxn goes out only after every marker is written (and, with offsets, durable and the
//! offsets durable and applied); nothing a request carries is acknowledged before the record
//! holding it is durable.

pub(crate) mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use spool_log_engine::{
    BatchBuilder, CleanupPolicy, Compression, Error as EngineError, FsyncPolicy, Log, Marker,
    Partition, TopicConfig,
};
use spool_proto::v1;
use tokio::sync::watch;

use crate::config::TransactionsConfig;
use crate::error::BrokerError;
use crate::groups::Groups;
use crate::offsets::OffsetStore;
use crate::producer_ids::ProducerIds;
use state::{EndPlan, Phase, Tp, TxnMeta};

/// Name of the internal topic.
pub const TXN_STATE_TOPIC: &str = "__transaction_state";

/// The target of the per-step timings of the commit path: one debug event per step
/// (`step`, `us`, and what the step did), read by the pipeline bench's breakdown
/// (`SPOOL_LOG=warn,spool_broker::txn::timing=debug`). Off by default: an event costs a
/// level check.
macro_rules! step_timing {
    ($step:expr, $started:expr) => {
        tracing::debug!(target: "spool_broker::txn::timing", step = $step, us = $started.elapsed().as_micros() as u64)
    };
    ($step:expr, $started:expr, $($fields:tt)+) => {
        tracing::debug!(target: "spool_broker::txn::timing", step = $step, us = $started.elapsed().as_micros() as u64, $($fields)+)
    };
}

/// Longest transactional id (as Kafka's group ids).
const MAX_ID_LEN: usize = 249;

type Entry = Arc<tokio::sync::Mutex<TxnMeta>>;

/// A producer (id, epoch) and the partitions its batches of one request go to.
pub(crate) type ProducerPartitions = ((i64, i16), Vec<Tp>);

/// A transactional id locked from [`Transactions::add_partitions`] until its batches are
/// appended (dropped then): nothing ends the transaction in between.
#[must_use = "hold it until the batches are appended"]
pub(crate) struct TxnHold(#[allow(dead_code)] tokio::sync::OwnedMutexGuard<TxnMeta>);

impl std::fmt::Debug for TxnHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TxnHold")
    }
}

/// The coordinator.
#[derive(Debug)]
pub(crate) struct Transactions {
    log: Arc<Log>,
    offsets: Arc<OffsetStore>,
    groups: Arc<Groups>,
    producer_ids: Arc<ProducerIds>,
    cfg: TransactionsConfig,
    ids: Mutex<HashMap<String, Entry>>,
    by_pid: Mutex<HashMap<i64, String>>,
    /// A negative control of the power-cut loop (`powerloss/`): a commit's offsets applied
    /// before its decision is recorded, the bug its transactions' offsets check must catch.
    #[cfg(test)]
    pub(crate) offsets_before_decision: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The internal topic's configuration: compacted, fsync on every write.
fn topic_config() -> TopicConfig {
    TopicConfig {
        partitions: 1,
        cleanup: CleanupPolicy::Compact,
        fsync: FsyncPolicy::Always,
        segment_bytes: 64 << 20,
        ..TopicConfig::default()
    }
}

/// Checks a transactional id's shape.
pub(crate) fn validate_id(id: &str) -> Result<(), BrokerError> {
    if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(|c| c.is_control()) {
        return Err(BrokerError::InvalidRequest(format!(
            "a transactional id is 1 to {MAX_ID_LEN} printable characters"
        )));
    }
    Ok(())
}

fn to_tp(t: &(String, u32)) -> v1::TopicPartition {
    v1::TopicPartition {
        topic: t.0.clone(),
        partition: t.1,
    }
}

impl Transactions {
    /// Wall-clock milliseconds from the broker's one clock (the log's, see `Broker::open_with_clock`).
    fn now_ms(&self) -> i64 {
        self.log.clock().now_ms()
    }

    /// Opens the coordinator: loads `__transaction_state`, carries out every recorded
    /// decision, and aborts every transaction left open in any partition. Blocking; runs
    /// before the broker serves.
    pub(crate) fn open(
        log: Arc<Log>,
        offsets: Arc<OffsetStore>,
        groups: Arc<Groups>,
        producer_ids: Arc<ProducerIds>,
        cfg: TransactionsConfig,
    ) -> Result<Transactions, BrokerError> {
        if log.topic_config(TXN_STATE_TOPIC).is_err() {
            log.create_topic(TXN_STATE_TOPIC, topic_config())?;
        }
        let metas = Self::load(&log)?;
        let t = Transactions {
            log,
            offsets,
            groups,
            producer_ids,
            cfg,
            ids: Mutex::new(HashMap::new()),
            by_pid: Mutex::new(HashMap::new()),
            #[cfg(test)]
            offsets_before_decision: std::sync::atomic::AtomicBool::new(false),
        };
        let (mut finished, mut aborted) = (0, 0);
        // Undecided transactions, by id: recorded `Ongoing` (offsets were added), or open in
        // some partition. All are aborted below, with the epoch bumped.
        let mut undecided: BTreeMap<String, (i16, BTreeSet<Tp>)> = BTreeMap::new();
        // Ids whose decision could not be carried out now (a partition refusing writes), by
        // producer id, with the decision's (the markers') epoch: the sweeper retries them;
        // their open transactions of an older epoch are the decision's, not orphans.
        let mut pending: HashMap<i64, (String, i16)> = HashMap::new();
        // Decisions with offsets are carried out in the order they were recorded (by
        // `offsets_since`), each clamped to the end as it is then: a later decision's offsets
        // land after an earlier one's, so a re-run never puts an older decision's offsets over
        // a newer one's (the clamp cannot tell them apart otherwise).
        let mut metas: Vec<(String, TxnMeta)> = metas.into_iter().collect();
        metas.sort_by(|a, b| (a.1.offsets_since, &a.0).cmp(&(b.1.offsets_since, &b.0)));
        for (id, mut meta) in metas {
            if meta.is_preparing() {
                // A power cut can leave the decision's `offsets_since` past the recovered end
                // of `__consumer_offsets` (it counted commits still in flight): positions it
                // covers are reused from now on, by commits newer than the decision.
                let end = t.offsets.next_position()?;
                if meta.clamp_since(end) {
                    tracing::info!(transactional_id = %id, offsets_since = end, "a recorded decision's offsets position lay past the recovered end of the offsets topic: clamped");
                }
                match t.finish_blocking(&id, &mut meta) {
                    Ok(()) => finished += 1,
                    Err(e) => {
                        tracing::warn!(transactional_id = %id, error = %e, "completing a recorded decision failed; retrying later");
                        pending.insert(meta.pid, (id.clone(), meta.epoch));
                    }
                }
            }
            if meta.is_ongoing() {
                undecided.insert(id.clone(), (meta.epoch, meta.partitions.clone()));
            }
            lock(&t.by_pid).insert(meta.pid, id.clone());
            lock(&t.ids).insert(id, Arc::new(tokio::sync::Mutex::new(meta)));
        }
        // Whatever is still open in a partition has no decision.
        let mut orphans: BTreeMap<i64, (i16, BTreeSet<Tp>)> = BTreeMap::new();
        for topic in t.log.topics() {
            for p in t.log.partitions(&topic)? {
                for o in p.open_transactions() {
                    let tp = (topic.clone(), p.id());
                    if let Some((id, decided)) = pending.get(&o.producer_id) {
                        // Below the decision's epoch: the decided transaction itself, ended
                        // by its markers once they can be written. At it: the producer's next
                        // transaction, begun once `Complete*` was appended and kept by a cut
                        // that lost `Complete*`; nothing decided it, so it is aborted once
                        // the decision is carried out ([`TxnMeta::later_open`]).
                        if o.epoch >= *decided {
                            let entry = lock(&t.ids)[id].clone();
                            entry
                                .try_lock()
                                .expect("nobody else runs yet")
                                .later_open
                                .insert(tp);
                        }
                        continue;
                    }
                    let e = orphans.entry(o.producer_id).or_default();
                    e.0 = e.0.max(o.epoch);
                    e.1.insert(tp);
                }
            }
        }
        for (pid, (epoch, partitions)) in orphans {
            match lock(&t.by_pid).get(&pid).cloned() {
                Some(id) => {
                    let e = undecided.entry(id).or_default();
                    e.0 = e.0.max(epoch);
                    e.1.extend(partitions);
                }
                None => {
                    // Not a transactional id's producer (data written without the
                    // coordinator, e.g. by an embedding program): abort it all the same.
                    let marker_epoch = epoch.saturating_add(1);
                    for (topic, partition) in &partitions {
                        let done = t
                            .log
                            .partition(topic, *partition)
                            .and_then(|p| p.write_marker(pid, marker_epoch, Marker::Abort, 0));
                        if let Err(e) = done {
                            tracing::warn!(producer_id = pid, topic, partition, error = %e, "aborting a transaction of an unknown producer failed (retried at the next start)");
                        }
                    }
                    aborted += 1;
                }
            }
        }
        for (id, (epoch, partitions)) in undecided {
            let entry = lock(&t.ids)[&id].clone();
            let mut meta = entry.try_lock().expect("nobody else runs yet").clone();
            meta.phase = Phase::Ongoing;
            meta.partitions = partitions;
            meta.epoch = meta.epoch.max(epoch);
            let open = meta.clone();
            meta.prepare(false, false);
            // Failures are left for the sweeper: a recorded abort (`Prepare*`) is retried; one
            // that could not be recorded stays open, and is aborted once its timeout passes.
            match t.persist(&id, &meta, true) {
                Err(e) => {
                    tracing::warn!(transactional_id = %id, error = %e, "recording the abort of an undecided transaction failed; retrying at its timeout");
                    meta = open;
                    meta.started_ms = t.now_ms();
                }
                Ok(()) => {
                    if let Err(e) = t.finish_blocking(&id, &mut meta) {
                        tracing::warn!(transactional_id = %id, error = %e, "aborting an undecided transaction failed; retrying later");
                    }
                }
            }
            *entry.try_lock().expect("nobody else runs yet") = meta;
            aborted += 1;
        }
        tracing::info!(
            transactional_ids = lock(&t.ids).len(),
            finished,
            aborted,
            "transaction coordinator ready"
        );
        Ok(t)
    }

    /// The latest record of every id in `__transaction_state`.
    fn load(log: &Log) -> Result<BTreeMap<String, TxnMeta>, BrokerError> {
        let p = log.partition(TXN_STATE_TOPIC, 0)?;
        let mut out = BTreeMap::new();
        let mut offset = p.log_start_offset();
        let limits = spool_log_engine::DecodeLimits::default();
        while offset < p.high_watermark() {
            let r = p.read(offset, 1 << 20)?;
            if r.data.is_empty() {
                break;
            }
            for batch in r.batches() {
                for rec in batch?.records(&limits)? {
                    let rec = rec?;
                    let Some(key) = rec.key.as_deref() else {
                        continue;
                    };
                    let id = String::from_utf8_lossy(key).into_owned();
                    match rec.value.as_deref() {
                        None => {
                            out.remove(&id);
                        }
                        Some(v) => {
                            let meta: TxnMeta = serde_json::from_slice(v).map_err(|e| {
                                BrokerError::Engine(EngineError::Corruption {
                                    path: p.dir().to_path_buf(),
                                    position: 0,
                                    offset: Some(rec.offset),
                                    reason: format!(
                                        "a {TXN_STATE_TOPIC} record does not parse: {e}"
                                    ),
                                })
                            })?;
                            out.insert(id, meta);
                        }
                    }
                }
            }
            offset = r.next_offset;
        }
        Ok(out)
    }

    /// Appends `meta` as `id`'s latest state (waiting for the fsync when `durable`).
    fn persist(&self, id: &str, meta: &TxnMeta, durable: bool) -> Result<(), BrokerError> {
        let started = std::time::Instant::now();
        let value = serde_json::to_vec(meta)
            .map_err(|e| BrokerError::Internal(format!("serializing transaction state: {e}")))?;
        let mut b = BatchBuilder::new(Compression::None);
        b.push(self.now_ms(), Some(id.as_bytes()), Some(&value), &[]);
        let p = self.log.partition(TXN_STATE_TOPIC, 0)?;
        let info = p.append_nowait(&b.finish()?)?;
        if durable {
            p.wait_durable(info.last_offset + 1)?;
        }
        step_timing!("persist", started, phase = ?meta.phase, durable = durable);
        Ok(())
    }

    /// Carries out `meta`'s recorded decision (it is `Prepare*`): a clamped `offsets_since`
    /// recorded (durably) first, then markers (durable), offsets, then `Complete*`. On
    /// failure `meta` stays `Prepare*` (retried later). Blocking.
    fn finish_blocking(&self, id: &str, meta: &mut TxnMeta) -> Result<(), BrokerError> {
        if meta.since_unrecorded {
            // The clamp made at start ([`TxnMeta::clamp_since`]) is recorded before any of
            // the decision is carried out: a later start must not load the old position (past
            // commits made meanwhile), whether `Complete*` (not waited for) survives or not.
            self.persist(id, meta, true)?;
            meta.since_unrecorded = false;
        }
        let mut markers = Some(self.write_markers(meta)?);
        // A commit's offsets are made durable beside the markers (two fsyncs at once, not
        // one after the other); they become visible only once both are durable.
        let applied = self.apply_offsets(meta, &mut || match markers.take() {
            Some(written) => Self::settle_markers(written),
            None => Ok(()),
        });
        if let Some(written) = markers.take() {
            Self::settle_markers(written)?;
        }
        applied?;
        self.complete_blocking(id, meta)?;
        // The decision is carried out whatever happens to this abort (its failure is left
        // for the sweeper, as the start leaves one).
        if let Err(e) = self.abort_later_open(id, meta) {
            tracing::warn!(transactional_id = %id, error = %e, "aborting a transaction left open by a power cut after its producer's decision failed; retrying later");
        }
        Ok(())
    }

    /// After a decision left pending at start is carried out: aborts the producer's later
    /// transaction found open at start ([`TxnMeta::later_open`]) as the start aborts an
    /// undecided one (decision recorded durably, epoch bumped, markers). On failure it is
    /// left as the start leaves one: a recorded abort is retried by the sweeper, an
    /// unrecorded one stays `Ongoing` and is aborted at its timeout.
    fn abort_later_open(&self, id: &str, meta: &mut TxnMeta) -> Result<(), BrokerError> {
        let later = std::mem::take(&mut meta.later_open);
        if later.is_empty() {
            return Ok(());
        }
        let Some(last) = meta.last_end.filter(|e| e.pid == meta.pid) else {
            // The decision handed out a new producer id (epoch exhausted): the transaction
            // is the old id's, which nothing can use any more; abort it directly.
            let (pid, marker_epoch) = match meta.last_end {
                Some(e) => (e.pid, e.epoch.saturating_add(2)),
                None => return Ok(()),
            };
            for (topic, partition) in &later {
                self.log
                    .partition(topic, *partition)
                    .and_then(|p| p.write_marker(pid, marker_epoch, Marker::Abort, 0))?;
            }
            return Ok(());
        };
        debug_assert!(last.epoch < meta.epoch);
        meta.phase = Phase::Ongoing;
        meta.partitions = later;
        meta.started_ms = self.now_ms();
        let open = meta.clone();
        meta.prepare(false, false);
        if let Err(e) = self.persist(id, meta, true) {
            *meta = open;
            return Err(e);
        }
        self.finish_blocking(id, meta)
    }

    /// Applies a decided commit's offsets (nothing for an abort): durable, then visible.
    /// `beside` (the markers' wait) runs at most once, beside the first group's fsync, and
    /// its failure fails this before anything becomes visible. Blocking.
    fn apply_offsets(
        &self,
        meta: &TxnMeta,
        beside: &mut (dyn FnMut() -> Result<(), BrokerError> + Send),
    ) -> Result<(), BrokerError> {
        if meta.phase != Phase::PrepareCommit || meta.groups.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let now = self.now_ms();
        for (group, g) in &meta.groups {
            let offsets: Vec<v1::OffsetCommit> = g
                .offsets
                .iter()
                .flat_map(|(topic, parts)| {
                    parts
                        .iter()
                        .map(|(&partition, (offset, metadata))| v1::OffsetCommit {
                            topic: topic.clone(),
                            partition,
                            offset: *offset,
                            metadata: metadata.clone(),
                        })
                })
                .collect();
            // Decided: written whatever the group's state is now, except over commits that
            // came after the decision.
            self.offsets
                .commit_decided(group, &offsets, now, meta.offsets_since, &mut *beside)?;
        }
        step_timing!("offsets", started, groups = meta.groups.len());
        Ok(())
    }

    /// Appends the decision's marker to each of `meta`'s partitions (page cache); returns,
    /// per partition, the offset its marker must be durable below. A partition that no longer
    /// exists, or no longer has the transaction open (a marker written before a crash),
    /// needs none.
    fn write_markers(&self, meta: &TxnMeta) -> Result<Vec<(Arc<Partition>, u64)>, BrokerError> {
        crate::failpoint::hit("txn-after-prepare");
        let started = std::time::Instant::now();
        let marker = if meta.phase == Phase::PrepareCommit {
            Marker::Commit
        } else {
            Marker::Abort
        };
        let mut written = Vec::with_capacity(meta.partitions.len());
        for (topic, partition) in &meta.partitions {
            match self.log.partition(topic, *partition) {
                Ok(p) => match p.write_marker_nowait(meta.pid, meta.epoch, marker, 0) {
                    Ok(Some(info)) => {
                        crate::failpoint::hit("txn-mid-markers");
                        written.push((p, info.last_offset + 1));
                    }
                    Ok(None) => {}
                    // Deleted since it was looked up: like a missing topic, it needs no
                    // marker, and the decision stands.
                    Err(EngineError::TopicDeleted { .. }) => {}
                    Err(e) => return Err(e.into()),
                },
                Err(EngineError::TopicNotFound(_) | EngineError::PartitionNotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        step_timing!("markers_write", started, partitions = written.len());
        Ok(written)
    }

    /// Waits until every marker of `written` is as durable as its topic's fsync policy says
    /// (in parallel: one fdatasync per partition, joining each one's group commit).
    fn settle_markers(written: Vec<(Arc<Partition>, u64)>) -> Result<(), BrokerError> {
        let started = std::time::Instant::now();
        let waits: Vec<_> = written
            .into_iter()
            .filter(|(p, _)| p.fsync_policy() == FsyncPolicy::Always)
            .collect();
        // The crate's own tests (the power-cut loops, src/powerloss/) wait one partition at a
        // time, so that a seed's disk operations come in one order on every run; the order
        // matters to nothing else (the caller goes on only once every wait returned).
        // A partition deleted since its marker was written needs the marker no more.
        let durable = |p: &Arc<Partition>, next: u64| match p.wait_durable(next) {
            Err(EngineError::TopicDeleted { .. }) => Ok(()),
            r => r,
        };
        let res = if waits.len() <= 1 || cfg!(test) {
            waits
                .iter()
                .try_for_each(|(p, next)| durable(p, *next))
                .map_err(BrokerError::from)
        } else {
            let chunk = waits.len().div_ceil(8);
            std::thread::scope(|s| {
                let handles: Vec<_> = waits
                    .chunks(chunk)
                    .map(|c| s.spawn(move || c.iter().try_for_each(|(p, next)| durable(p, *next))))
                    .collect();
                handles.into_iter().try_for_each(|h| {
                    // A panic is the broker's own failure, not a shutdown.
                    h.join()
                        .map_err(|_| {
                            BrokerError::Internal(
                                "a thread waiting for the markers' fdatasync panicked".into(),
                            )
                        })?
                        .map_err(BrokerError::from)
                })
            })
        };
        step_timing!("markers_durable", started, partitions = waits.len());
        crate::failpoint::hit("txn-after-markers");
        res
    }

    /// After the markers and the offsets ([`Transactions::apply_offsets`]): records
    /// `Complete*`, durably only when the next producer id changes or the decision lacks
    /// `offsets_since` (see the comment at the write).
    fn complete_blocking(&self, id: &str, meta: &mut TxnMeta) -> Result<(), BrokerError> {
        let commit = meta.phase == Phase::PrepareCommit;
        let new_pid = if meta.needs_new_pid() {
            Some(self.producer_ids.allocate(self.now_ms())?)
        } else {
            None
        };
        crate::failpoint::hit("txn-before-complete");
        let mut next = meta.clone();
        next.complete(new_pid);
        // Not waited for: losing it (a power cut) leaves the decision recorded, and a restart
        // carries it out again, which changes nothing (markers are idempotent; the offsets are
        // committed only where nobody committed since `offsets_since`, and these were). Made
        // durable when a decision recorded without that position (an older broker's) would
        // re-apply its offsets over newer commits, and when the reply hands out a new
        // producer id (a restart must know it).
        let legacy_offsets = commit && !meta.groups.is_empty() && meta.offsets_since.is_none();
        self.persist(id, &next, legacy_offsets || new_pid.is_some())?;
        if let Some(pid) = new_pid {
            lock(&self.by_pid).insert(pid, id.to_owned());
        }
        *meta = next;
        Ok(())
    }

    fn entry(&self, id: &str) -> Result<Entry, BrokerError> {
        lock(&self.ids)
            .get(id)
            .cloned()
            .ok_or_else(|| BrokerError::InvalidTxnState {
                txn_id: id.to_owned(),
                reason: "unknown transactional id: call InitProducerId with it first".into(),
            })
    }

    /// Runs `f` on the blocking pool with `self`.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Transactions) -> Result<T, BrokerError> + Send + 'static,
    ) -> Result<T, BrokerError> {
        let this = self.clone();
        crate::blocking_task(move || f(&this)).await?
    }

    /// Runs one request's work to its end even when the caller stops waiting for it.
    ///
    /// Every request below records its step on disk (on the blocking pool) and then updates
    /// memory under the id's lock. tonic drops a handler's future when its client goes away;
    /// dropped between those two, memory would stay behind the disk (a recorded decision
    /// the in-memory state does not know, so a retry or the timeout pass decides again) and
    /// the id's lock would be released while a blocking task the future started still
    /// writes, racing the next request for the same id (a stale completion record could
    /// overwrite a newer transaction's). Spawned, the work finishes and only its reply is
    /// lost, exactly as if the reply had been lost on the wire.
    async fn detached<T: Send + 'static>(
        work: impl std::future::Future<Output = Result<T, BrokerError>> + Send + 'static,
    ) -> Result<T, BrokerError> {
        // As `blocking_task`: the panic's text stays in the log.
        tokio::spawn(work).await.map_err(|e| {
            if e.is_cancelled() {
                BrokerError::ShuttingDown
            } else {
                tracing::error!(error = %e, "a transaction's task panicked");
                BrokerError::Internal("a worker failed inside the broker; see its log".into())
            }
        })?
    }

    /// Records the decision to end `meta`'s open transaction, then carries it out.
    async fn end_locked(
        self: &Arc<Self>,
        id: &str,
        meta: &mut TxnMeta,
        commit: bool,
        timed_out: bool,
    ) -> Result<(), BrokerError> {
        let mut next = meta.clone();
        next.prepare(commit, timed_out);
        let idc = id.to_owned();
        let next = self
            .blocking(move |t| {
                if commit && !next.groups.is_empty() {
                    // Commits acknowledged from here on are newer than this decision.
                    next.offsets_since = Some(t.offsets.next_position()?);
                    #[cfg(test)]
                    if t.offsets_before_decision
                        .load(std::sync::atomic::Ordering::Relaxed)
                    {
                        t.apply_offsets(&next, &mut || Ok(()))?;
                    }
                }
                t.persist(&idc, &next, true)?;
                Ok(next)
            })
            .await?;
        *meta = next;
        self.finish(id, meta).await
    }

    /// [`Transactions::finish_blocking`] from async code.
    async fn finish(self: &Arc<Self>, id: &str, meta: &mut TxnMeta) -> Result<(), BrokerError> {
        let (idc, mut m) = (id.to_owned(), meta.clone());
        let (res, m) = self
            .blocking(move |t| {
                let r = t.finish_blocking(&idc, &mut m);
                Ok((r, m))
            })
            .await?;
        *meta = m;
        res
    }

    /// InitProducerId for a transactional id: returns the producer id and epoch to use.
    /// Runs to its end even if the caller stops waiting ([`Transactions::detached`]).
    pub(crate) async fn init(
        self: &Arc<Self>,
        id: &str,
        timeout_ms: u32,
        expected: Option<(i64, i16)>,
    ) -> Result<(i64, i16), BrokerError> {
        let (this, id) = (self.clone(), id.to_owned());
        Self::detached(async move { this.init_attached(&id, timeout_ms, expected).await }).await
    }

    async fn init_attached(
        self: &Arc<Self>,
        id: &str,
        timeout_ms: u32,
        expected: Option<(i64, i16)>,
    ) -> Result<(i64, i16), BrokerError> {
        validate_id(id)?;
        let timeout_ms = if timeout_ms == 0 {
            self.cfg.default_timeout_ms
        } else {
            timeout_ms
        };
        if timeout_ms > self.cfg.max_timeout_ms {
            return Err(BrokerError::InvalidRequest(format!(
                "transaction timeout {timeout_ms} ms is over the broker's maximum of {} ms",
                self.cfg.max_timeout_ms
            )));
        }
        let existing = lock(&self.ids).get(id).cloned();
        let entry = match existing {
            Some(e) => e,
            None => {
                if lock(&self.ids).len() >= self.cfg.max_transactional_ids {
                    return Err(BrokerError::InvalidRequest(format!(
                        "the broker already keeps {} transactional ids (transactions.max_transactional_ids)",
                        self.cfg.max_transactional_ids
                    )));
                }
                if expected.is_some() {
                    return Err(self.entry(id).unwrap_err());
                }
                let idc = id.to_owned();
                let meta = self
                    .blocking(move |t| {
                        let meta = TxnMeta::new(t.producer_ids.allocate(t.now_ms())?, timeout_ms);
                        t.persist(&idc, &meta, true)?;
                        Ok(meta)
                    })
                    .await?;
                // Two first calls at once: the first one in wins; the other bumps below.
                let e = {
                    let mut ids = lock(&self.ids);
                    ids.entry(id.to_owned())
                        .or_insert_with(|| {
                            lock(&self.by_pid).insert(meta.pid, id.to_owned());
                            Arc::new(tokio::sync::Mutex::new(meta.clone()))
                        })
                        .clone()
                };
                let current = e.lock().await;
                if *current == meta {
                    return Ok((meta.pid, meta.epoch));
                }
                drop(current);
                e
            }
        };
        let mut meta = entry.lock().await;
        if let Some((pid, epoch)) = expected
            && !meta.expected_ok(pid, epoch)
        {
            return Err(BrokerError::TxnProducerFenced {
                txn_id: id.to_owned(),
                producer_id: pid,
                epoch,
                current_epoch: meta.epoch,
            });
        }
        if meta.is_preparing() {
            self.finish(id, &mut meta).await?;
        }
        if meta.is_ongoing() {
            self.end_locked(id, &mut meta, false, false).await?;
        }
        let mut next = meta.clone();
        let new_pid = if next.needs_new_pid() {
            let ids = self.producer_ids.clone();
            Some(self.blocking(move |t| ids.allocate(t.now_ms())).await?)
        } else {
            None
        };
        next.bump(new_pid, timeout_ms);
        let (idc, nextc) = (id.to_owned(), next.clone());
        self.blocking(move |t| t.persist(&idc, &nextc, true))
            .await?;
        if let Some(pid) = new_pid {
            lock(&self.by_pid).insert(pid, id.to_owned());
        }
        *meta = next;
        Ok((meta.pid, meta.epoch))
    }

    /// Adds `tps` to the open transaction of producer `pid` at `epoch` (opening one if none
    /// is). Blocking (the id's lock): call from the blocking pool. The returned hold keeps
    /// the id locked: drop it once the batches are appended, not before (module docs, 2).
    /// One producer only (the power-cut loop's); a request's batches go through
    /// [`Transactions::add_partitions_all`].
    #[cfg(test)]
    pub(crate) fn add_partitions(
        &self,
        pid: i64,
        epoch: i16,
        tps: Vec<Tp>,
    ) -> Result<TxnHold, BrokerError> {
        let (mut results, mut holds) = self.add_partitions_all(vec![((pid, epoch), tps)]);
        results.pop().expect("one result per producer")?;
        Ok(holds.pop().expect("a hold for an added producer"))
    }

    /// [`Transactions::add_partitions`] for each `(pid, epoch)` of one request: a result per
    /// entry, in order, and the holds of the ids locked (drop them once the batches are
    /// appended). Each transactional id is locked once, in ascending id order (two requests
    /// lock the ids they share in the same order), and every entry of that id is checked
    /// under that one lock: a request naming one producer at two epochs (a pre-encoded
    /// batch of a stale epoch beside a current one) would otherwise wait, on its own thread,
    /// for the lock it already held, keeping the id locked for good.
    pub(crate) fn add_partitions_all(
        &self,
        wants: Vec<ProducerPartitions>,
    ) -> (Vec<Result<(), BrokerError>>, Vec<TxnHold>) {
        let mut results: Vec<Result<(), BrokerError>> = Vec::with_capacity(wants.len());
        let mut by_id: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        {
            let by_pid = lock(&self.by_pid);
            for (i, ((pid, _), _)) in wants.iter().enumerate() {
                match by_pid.get(pid) {
                    Some(id) => {
                        by_id.entry(id.clone()).or_default().push(i);
                        results.push(Ok(()));
                    }
                    None => results.push(Err(BrokerError::InvalidTxnState {
                        txn_id: String::new(),
                        reason: format!(
                            "producer id {pid} is not a transactional producer's (call InitProducerId with a transactional_id)"
                        ),
                    })),
                }
            }
        }
        let mut wants: Vec<Option<ProducerPartitions>> = wants.into_iter().map(Some).collect();
        let mut holds = Vec::with_capacity(by_id.len());
        for (id, entries) in by_id {
            let Ok(entry) = self.entry(&id) else {
                // Its producer ids outlived it (cannot happen while ids are never removed;
                // answered as `entry` would).
                for i in entries {
                    results[i] = self.entry(&id).map(drop);
                }
                continue;
            };
            let mut meta = entry.blocking_lock_owned();
            let mut added = false;
            for i in entries {
                let ((pid, epoch), tps) = wants[i].take().expect("each entry once");
                results[i] = meta.add_partitions(
                    &id,
                    pid,
                    epoch,
                    tps,
                    self.now_ms(),
                    self.cfg.max_partitions_per_txn,
                );
                added |= results[i].is_ok();
            }
            if added {
                holds.push(TxnHold(meta));
            }
        }
        (results, holds)
    }

    /// Checks that a transaction's offsets for `group` may be committed now: fenced by the
    /// member and generation, or (without a member id) refused while the group has members.
    async fn check_group(
        &self,
        group: &str,
        member_id: &str,
        generation: u64,
        offsets: Vec<v1::OffsetCommit>,
    ) -> Result<(), BrokerError> {
        if member_id.is_empty() {
            return self
                .groups
                .require_empty(group, "a transaction's plain offset commit");
        }
        self.groups
            .check_commit(group, member_id.to_owned(), generation, offsets)
            .await
            .map_err(|s| BrokerError::FencedMember {
                group: group.to_owned(),
                member: member_id.to_owned(),
                reason: s.message().to_owned(),
            })
    }

    /// AddOffsetsToTxn. Runs to its end even if the caller stops waiting
    /// ([`Transactions::detached`]).
    pub(crate) async fn add_offsets(
        self: &Arc<Self>,
        req: v1::AddOffsetsToTxnRequest,
    ) -> Result<(), BrokerError> {
        let this = self.clone();
        Self::detached(async move { this.add_offsets_attached(req).await }).await
    }

    async fn add_offsets_attached(
        self: &Arc<Self>,
        req: v1::AddOffsetsToTxnRequest,
    ) -> Result<(), BrokerError> {
        let started = std::time::Instant::now();
        crate::offsets::validate_group(&req.group)?;
        for c in &req.offsets {
            crate::offsets::validate_commit(c)?;
            self.log.partition(&c.topic, c.partition)?;
        }
        let entry = self.entry(&req.transactional_id)?;
        let mut meta = entry.lock().await;
        let epoch = epoch_of(req.producer_epoch)?;
        meta.check(&req.transactional_id, req.producer_id, epoch)?;
        self.check_group(
            &req.group,
            &req.member_id,
            req.generation,
            req.offsets.clone(),
        )
        .await?;
        let mut next = meta.clone();
        next.add_offsets(
            &req.transactional_id,
            req.producer_id,
            epoch,
            &req.group,
            &req.member_id,
            req.generation,
            req.offsets
                .into_iter()
                .map(|c| ((c.topic, c.partition), c.offset, c.metadata)),
            self.now_ms(),
        )?;
        // Recorded durably before the reply: a transaction may hold offsets and nothing in
        // any partition yet, and a restart must still abort it (bumping the epoch) rather
        // than let the producer commit it without them.
        let (id, nextc) = (req.transactional_id.clone(), next.clone());
        self.blocking(move |t| t.persist(&id, &nextc, true)).await?;
        *meta = next;
        step_timing!("add_offsets", started);
        Ok(())
    }

    /// EndTxn: returns the producer id and epoch for the next transaction. Runs to its end
    /// even if the caller stops waiting ([`Transactions::detached`]).
    pub(crate) async fn end(
        self: &Arc<Self>,
        id: &str,
        pid: i64,
        epoch: i32,
        commit: bool,
    ) -> Result<(i64, i16), BrokerError> {
        let (this, id) = (self.clone(), id.to_owned());
        let started = std::time::Instant::now();
        let r =
            Self::detached(
                async move { this.end_attached(&id, pid, epoch, commit, Vec::new()).await },
            )
            .await;
        step_timing!("end_txn", started, commit = commit, groups = 0);
        r
    }

    /// CommitTxn: EndTxn(commit) with the groups' offsets added first, in memory under the
    /// id's lock; the decision (`PrepareCommit`) is their one durable record. A retry of a
    /// CommitTxn that already ended its transaction adds nothing and gets EndTxn's answer.
    /// Runs to its end even if the caller stops waiting ([`Transactions::detached`]).
    pub(crate) async fn commit_with_offsets(
        self: &Arc<Self>,
        req: v1::CommitTxnRequest,
    ) -> Result<(i64, i16), BrokerError> {
        for g in &req.groups {
            crate::offsets::validate_group(&g.group)?;
            for c in &g.offsets {
                crate::offsets::validate_commit(c)?;
                self.log.partition(&c.topic, c.partition)?;
            }
        }
        let this = self.clone();
        let started = std::time::Instant::now();
        let groups = req.groups.len();
        let r = Self::detached(async move {
            this.end_attached(
                &req.transactional_id,
                req.producer_id,
                req.producer_epoch,
                true,
                req.groups,
            )
            .await
        })
        .await;
        step_timing!("end_txn", started, commit = true, groups = groups);
        r
    }

    async fn end_attached(
        self: &Arc<Self>,
        id: &str,
        pid: i64,
        epoch: i32,
        commit: bool,
        offsets: Vec<v1::TxnGroupOffsets>,
    ) -> Result<(i64, i16), BrokerError> {
        let entry = self.entry(id)?;
        let started = std::time::Instant::now();
        let mut meta = entry.lock_owned().await;
        step_timing!("end_txn_lock", started);
        let epoch = epoch_of(epoch)?;
        let retry = meta
            .last_end
            .is_some_and(|e| e.pid == pid && e.epoch == epoch);
        if !offsets.is_empty() && !retry {
            // CommitTxn: what AddOffsetsToTxn would have added. Only in memory: the decision
            // below records them; if it is never recorded, neither is the commit.
            let now = self.now_ms();
            for g in offsets {
                meta.add_offsets(
                    id,
                    pid,
                    epoch,
                    &g.group,
                    &g.member_id,
                    g.generation,
                    g.offsets
                        .into_iter()
                        .map(|c| ((c.topic, c.partition), c.offset, c.metadata)),
                    now,
                )?;
            }
        }
        match meta.plan_end(id, pid, epoch, commit)? {
            EndPlan::Reply => {}
            EndPlan::Finish => self.finish(id, &mut meta).await?,
            EndPlan::Run => {
                crate::failpoint::hit("txn-end-received");
                if commit {
                    let groups: Vec<_> = meta
                        .groups
                        .iter()
                        .map(|(g, o)| {
                            let offsets = o
                                .offsets
                                .iter()
                                .flat_map(|(t, ps)| {
                                    ps.keys().map(|&partition| v1::OffsetCommit {
                                        topic: t.clone(),
                                        partition,
                                        ..Default::default()
                                    })
                                })
                                .collect();
                            (g.clone(), o.member_id.clone(), o.generation, offsets)
                        })
                        .collect();
                    for (group, member, generation, offsets) in groups {
                        if let Err(e) = self.check_group(&group, &member, generation, offsets).await
                        {
                            // The offsets may not be committed any more: nothing is.
                            self.end_locked(id, &mut meta, false, false).await?;
                            return Err(e);
                        }
                    }
                }
                let mut next = meta.clone();
                next.prepare(commit, false);
                if !meta.groups.is_empty() || next.needs_new_pid() {
                    // Offsets are applied before the reply (a consumer that takes over the
                    // partitions must find them), and a new producer id must be in it.
                    self.end_locked(id, &mut meta, commit, false).await?;
                } else {
                    return self.end_pipelined(id, meta, next).await;
                }
            }
        }
        Ok((meta.pid, meta.epoch))
    }

    /// Ends a transaction without offsets: replies once the decision is durable and every
    /// marker is written, and makes the markers durable and records the completion after
    /// the reply, still holding the id (so nothing about it, not even the next transaction's
    /// first write, goes on until that is done). Read-committed readers see the transaction
    /// once its markers are durable, moments after the reply; a crash before that completes
    /// the recorded decision at restart. This takes the markers' fsyncs off the producer's
    /// path: it prepares its next transaction meanwhile.
    async fn end_pipelined(
        self: &Arc<Self>,
        id: &str,
        mut meta: tokio::sync::OwnedMutexGuard<TxnMeta>,
        next: TxnMeta,
    ) -> Result<(i64, i16), BrokerError> {
        let (idc, nextc) = (id.to_owned(), next.clone());
        self.blocking(move |t| t.persist(&idc, &nextc, true))
            .await?;
        *meta = next;
        let m = meta.clone();
        // On failure the decision stays recorded (`Prepare*`): the sweeper carries it out.
        let written = self.blocking(move |t| t.write_markers(&m)).await?;
        let reply = (meta.pid, meta.epoch);
        let (this, id) = (self.clone(), id.to_owned());
        tokio::task::spawn_blocking(move || {
            let done =
                Self::settle_markers(written).and_then(|()| this.complete_blocking(&id, &mut meta));
            if let Err(e) = done {
                tracing::warn!(transactional_id = %id, error = %e, "completing a transaction failed; retrying later");
            }
        });
        Ok(reply)
    }

    /// ListTransactions.
    pub(crate) async fn list(&self) -> Vec<v1::TransactionDescription> {
        let entries: Vec<(String, Entry)> = lock(&self.ids)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::with_capacity(entries.len());
        for (id, e) in entries {
            let m = e.lock().await;
            out.push(v1::TransactionDescription {
                transactional_id: id,
                producer_id: m.pid,
                producer_epoch: i32::from(m.epoch),
                state: match m.phase {
                    Phase::Empty => v1::TxnState::Empty,
                    Phase::Ongoing => v1::TxnState::Ongoing,
                    Phase::PrepareCommit => v1::TxnState::PrepareCommit,
                    Phase::PrepareAbort => v1::TxnState::PrepareAbort,
                    Phase::CompleteCommit => v1::TxnState::CompleteCommit,
                    Phase::CompleteAbort => v1::TxnState::CompleteAbort,
                } as i32,
                partitions: m.partitions.iter().map(to_tp).collect(),
                started_ms: m.started_ms,
                timeout_ms: m.timeout_ms,
            });
        }
        out.sort_by(|a, b| a.transactional_id.cmp(&b.transactional_id));
        out
    }

    /// Starts the task that aborts timed-out transactions and retries decisions whose
    /// markers could not be written.
    pub(crate) fn start(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let this = self.clone();
        let every = Duration::from_millis(self.cfg.abort_check_interval_ms);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = shutdown.changed() => return,
                }
                if *shutdown.borrow() {
                    return;
                }
                this.sweep().await;
            }
        });
    }

    /// One pass of that task (the power-cut loops run it at chosen steps).
    pub(crate) async fn sweep(self: &Arc<Self>) {
        let mut entries: Vec<(String, Entry)> = lock(&self.ids)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // In id order, not the map's (random) order: a pass does the same writes in the same
        // order every time (the power-cut loops replay a seed exactly).
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let now = self.now_ms();
        for (id, e) in entries {
            // Busy ids are in the middle of something: look again next time.
            let Ok(mut meta) = e.try_lock() else {
                continue;
            };
            let res = if meta.expired(now) {
                tracing::info!(transactional_id = %id, producer_id = meta.pid, epoch = meta.epoch, timeout_ms = meta.timeout_ms, "aborting a transaction past its timeout");
                self.end_locked(&id, &mut meta, false, true).await
            } else if meta.is_preparing() {
                self.finish(&id, &mut meta).await
            } else {
                Ok(())
            };
            if let Err(e) = res {
                tracing::warn!(transactional_id = %id, error = %e, "ending a transaction failed; retrying later");
            }
        }
    }
}

/// A wire epoch as the batch header's i16.
fn epoch_of(epoch: i32) -> Result<i16, BrokerError> {
    i16::try_from(epoch)
        .map_err(|_| BrokerError::InvalidRequest(format!("producer epoch {epoch} is not an i16")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use spool_log_engine::{LogOptions, TopicConfig};

    /// A marker's partition deleted while the decision waits for its fdatasync needs it no
    /// more: the wait succeeds (the decision stands and the transaction completes) instead of
    /// failing the EndTxn with UNKNOWN_TOPIC, which a client does not retry although the
    /// commit happened. (Before the engine told a deleted partition apart, this was
    /// `Closed`, answered SHUTTING_DOWN and retried.)
    #[test]
    fn a_marker_of_a_deleted_partition_needs_no_fdatasync() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogOptions::default()).unwrap();
        log.create_topic(
            "t",
            TopicConfig {
                partitions: 1,
                fsync: FsyncPolicy::Always,
                ..TopicConfig::default()
            },
        )
        .unwrap();
        let p = log.partition("t", 0).unwrap();
        log.delete_topic("t").unwrap();
        assert!(matches!(
            p.wait_durable(1),
            Err(EngineError::TopicDeleted { .. })
        ));
        Transactions::settle_markers(vec![(p, 1)]).expect("nothing left to wait for");
    }
}
