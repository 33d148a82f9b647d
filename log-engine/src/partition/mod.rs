//! A partition: an ordered list of segments with one writer and many readers.
//!
//! Invariants:
//! - Offsets are assigned here, at append, under the writer lock, one after the other, and
//!   never reused. They are dense as written; compaction later removes records without
//!   renumbering the survivors, so sealed segments of compacted topics have gaps (and a read
//!   of a removed offset returns the next surviving batch).
//! - Readers never take the writer lock. They load the published high watermark (`watch`),
//!   then a snapshot of the segment list, then each segment's `readable_end`; the writer
//!   publishes in the opposite order, so a reader sees only complete batches, and never a
//!   batch at or past the high watermark.
//! - Under `fsync = always` the high watermark is the durable end: readers see only data an
//!   fdatasync has covered, and `append` returns only once its batch is covered.
//! - A failed write that could not be rolled back, or any failed fsync, poisons the
//!   partition: every later write fails with [`Error::Poisoned`] until the log is reopened.
//! - Every fdatasync of the active segment's handle (group commit, flush, close, roll) runs
//!   under `sync_lock`, and a sync publishes nothing unless the partition is still unpoisoned
//!   once it has returned, checked under that lock. Linux reports a write-back error once per
//!   file description: of two overlapping fdatasyncs of one handle, the one that checks second
//!   can return success for pages that failed. One at a time, with the poison set before the
//!   lock is released, the later call sees the poison instead (fsyncgate; docs/durability.md).
//! - Segment-list changes (roll, retention) happen under the writer lock.
//! - Once a partition is closed, neither retention nor the cleaner (what renames, writes and
//!   removes files of the directory on its own) acts on its files by name: retention checks
//!   `closed` under the writer lock, the cleaner before each batch and each write under the
//!   `cleaning` lock, and deleting the topic takes both locks after closing, before the
//!   directory is moved away (a topic of the same name may be created there next). Still by
//!   name, and harmless for acknowledged data: a read already under way (or a timestamp
//!   lookup) opening a segment or index it had not opened yet, and the unlink of a segment
//!   retention retired before the delete, when its last mapping drops.
//! - Under `fsync = always` the active segment's file may run past the written data, by zeros
//!   written ahead of the writer (`writer.rs`, "Zero ahead"): zeros are written only under the
//!   writer lock at or past its position, their fdatasync goes through `sync_handle` and
//!   publishes nothing, and roll, close and recovery cut them. The data's end is always the
//!   writer's position (`Segment::written_end`), never the file's size.
//! - Transactions ([`crate::txn`]): the writer updates the partition's transaction index
//!   under the writer lock, before it publishes the batch; readers load the high watermark,
//!   then ask the index for the last stable offset (a short lock of its own, never the
//!   writer's), so a read-committed reader never sees an undecided batch.

pub(crate) mod cleaner;
mod recovery;
mod writer;

pub use recovery::RecoveryReport;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::Bytes;

use crate::batch::{self, Batch, BatchError, BatchHeader, Compression};
use crate::checkpoint::Checkpoint;
use crate::config::{Clock, FsyncPolicy, Limits, TopicConfig};
use crate::error::{Error, Result};
use crate::mapcache::MapCache;
use crate::notify::{DataAvailable, Watch};
use crate::segment::{self, Segment};
use crate::txn::{self, Isolation, Marker, OpenTxn, TxnIndex};

use writer::Writer;

/// Source of the zeros written ahead of the writer (one piece).
static ZEROS: [u8; writer::ZERO_PIECE] = [0; writer::ZERO_PIECE];

/// Where a walk of `seg` (mapped as `data`, readable to `end`) starts: `(base offset, position)`
/// as `lookup` finds it in the index, checked against the log. An entry whose position is not
/// inside the readable bytes, or does not hold a batch with the base offset the index names,
/// does not belong to this log (the load checks cannot see that): the index of a sealed
/// segment is then rebuilt from the log and looked up once more. What still disagrees is left
/// to the walk, which reports it as corruption (never a silent skip).
fn checked_start(
    seg: &Segment,
    data: &[u8],
    end: u64,
    lookup: impl Fn() -> Result<(u64, u64)>,
) -> Result<(u64, u64)> {
    let matches = |(base, pos): (u64, u64)| {
        pos == 0
            || (pos < end
                && data
                    .get(pos as usize..end as usize)
                    .and_then(|rest| BatchHeader::parse(rest).ok())
                    .is_some_and(|h| h.base_offset == base))
    };
    let found = lookup()?;
    if matches(found) || !seg.reindex_from_log()? {
        return Ok(found);
    }
    lookup()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Engine-wide context shared by all partitions of a log.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Every file operation goes through it.
    pub(crate) fs: Arc<dyn spool_io::FileSystem>,
    /// Tells apart the `.deleted` names of successive replaced generations of a segment:
    /// the clock when the log was opened (so that files a reader of an earlier open of the
    /// directory still holds keep their own names), and a counter.
    pub(crate) replaced: (i64, AtomicU64),
    pub(crate) limits: Limits,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) verify_reads: bool,
    pub(crate) maps: MapCache,
    /// Early write-back hints, and zeroing ahead, run on the log's write-back thread.
    pub(crate) writeback: crate::writeback::WriteBack,
    /// [`crate::LogOptions::zero_ahead_bytes`] (0: off).
    pub(crate) zero_ahead_bytes: u64,
    /// Zeroing ahead is queued by the writer for the write-back thread (with
    /// `background_maintenance`); otherwise [`crate::Log::run_maintenance`] runs what is due.
    pub(crate) zero_in_background: bool,
    /// Cleaner passes that stopped because retention removed part of a group meanwhile (or
    /// the partition was poisoned)
    /// ([`crate::CleanReport::abandoned`]), over every partition of the log since it opened.
    pub(crate) abandoned_passes: AtomicU64,
}

impl Shared {
    /// A name part no other segment replacement of this directory used.
    pub(crate) fn next_replace_id(&self) -> String {
        let n = self.replaced.1.fetch_add(1, Ordering::Relaxed);
        format!("{}-{}-{n}", std::process::id(), self.replaced.0)
    }
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset given to the first record.
    pub base_offset: u64,
    /// Offset given to the last record.
    pub last_offset: u64,
    /// Wall-clock time of the append (ms since the epoch). For a duplicate found after a
    /// restart, the batch's max timestamp (the append time is not stored).
    pub log_append_time_ms: i64,
    /// True when the batch was a retry of one already in the log (idempotent producer): it was
    /// not written again, and the offsets are the original ones.
    pub duplicate: bool,
}

/// The result of a read: whole batches, as one zero-copy slice of a segment.
#[derive(Clone, Debug)]
pub struct ReadResult {
    /// Concatenated batches, exactly as stored (empty when there was nothing to read).
    pub data: Bytes,
    /// Offset after the last batch returned (the offset to read next).
    pub next_offset: u64,
    /// The high watermark when the read ran.
    pub high_watermark: u64,
    /// The first offset still in the partition.
    pub log_start_offset: u64,
    /// The last stable offset when the read ran (see [`crate::txn`]).
    pub last_stable_offset: u64,
}

impl ReadResult {
    /// The batches of `data`, each checked.
    pub fn batches(&self) -> impl Iterator<Item = Result<Batch, BatchError>> + '_ {
        batch::split_batches(&self.data)
    }
}

/// Counters describing a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionStats {
    /// First offset still present.
    pub log_start_offset: u64,
    /// Next offset readers will see.
    pub high_watermark: u64,
    /// Last stable offset (read-committed readers see below it; see [`crate::txn`]).
    pub last_stable_offset: u64,
    /// Bytes in all segments.
    pub size_bytes: u64,
    /// Number of segments, the active one included.
    pub segments: usize,
}

/// What [`Partition::collect`] found in one segment.
enum Collected {
    /// Batches to return, and the offset after them.
    Data(Bytes, u64),
    /// Only left-out (aborted) batches, up to this offset.
    Skipped(u64),
    /// Nothing at or after the offset.
    Nothing,
}

#[derive(Debug)]
struct CommitState {
    durable_next: u64,
    syncing: bool,
    /// The highest offset asked for by [`Partition::request_sync`] or
    /// [`Partition::sync_behind`] (everything below it is to be made durable by the sync loop
    /// or by the next sync).
    requested: u64,
    /// A sync loop ([`Partition::run_requested_syncs`]) is running or about to.
    looping: bool,
    /// A [`Partition::sync_behind`] caller waits for the running sync to end in order to run
    /// the next one, which covers everything requested meanwhile: later callers leave at once.
    next_syncer: bool,
}

/// Future returned by [`Partition::durable`].
#[derive(Debug)]
pub struct Durable {
    partition: Arc<Partition>,
    waiter: crate::notify::Waiter,
    next_offset: u64,
}

impl std::future::Future for Durable {
    type Output = Result<()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        // As `wait_durable`: a partition that refuses writes answers with its error, even for
        // offsets already durable.
        this.partition.check_writable()?;
        if this.partition.durable.get() >= this.next_offset {
            return Poll::Ready(Ok(()));
        }
        match this.waiter.poll(cx) {
            Poll::Ready(_) => Poll::Ready(this.partition.check_writable()),
            // Poisoning sets its flag before it wakes waiters: a registration that came after
            // that wake-up sees the flag here.
            Poll::Pending => match this.partition.check_writable() {
                Err(e) => Poll::Ready(Err(e)),
                Ok(()) => Poll::Pending,
            },
        }
    }
}

/// One partition of a topic.
#[derive(Debug)]
pub struct Partition {
    topic: String,
    id: u32,
    dir: PathBuf,
    shared: Arc<Shared>,
    config: RwLock<Arc<TopicConfig>>,
    segments: RwLock<Arc<Vec<Arc<Segment>>>>,
    writer: Mutex<Writer>,
    /// Transactions (see [`crate::txn`]); changed only under the writer lock.
    txn: Mutex<TxnIndex>,
    commit: Mutex<CommitState>,
    commit_cv: Condvar,
    /// `CommitState::durable_next`, for async waiters ([`Partition::durable`]).
    durable: Arc<Watch>,
    checkpoint: Mutex<Checkpoint>,
    watch: Arc<Watch>,
    log_start: AtomicU64,
    leader_epoch: AtomicI32,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
    /// Held across every fdatasync of a segment handle (module docs). Taken after the writer
    /// lock when both are held (a roll), never before it.
    sync_lock: Mutex<()>,
    closed: AtomicBool,
    /// Held by a cleaner pass for its whole run ([`Partition::cleaning`]). Taken, once
    /// `closed` is set, by [`Partition::close_deleted`], so that no pass of a deleted topic's
    /// partition still works, by path, in a directory a re-created topic of the same name
    /// will use.
    cleaning: Mutex<()>,
    /// Set (before `closed`) when the partition's topic is deleted: its errors then say so
    /// ([`Error::TopicDeleted`]) instead of [`Error::Closed`].
    deleted: AtomicBool,
    last_flush_ms: AtomicU64,
    fsync_latency: crate::stats::Latency,
    /// This partition, for jobs run on the log's write-back thread (set by
    /// [`Partition::into_arc`]; unset, no zeroing ahead is asked for).
    me: std::sync::OnceLock<std::sync::Weak<Partition>>,
}

impl Partition {
    /// Shares the partition, and lets it queue jobs for itself (zeroing ahead).
    pub(crate) fn into_arc(self) -> Arc<Partition> {
        let p = Arc::new(self);
        let _ = p.me.set(Arc::downgrade(&p));
        p
    }

    /// Queues a zeroing ahead of the writer on the log's write-back thread; true if queued.
    /// Called by the writer, under the writer lock.
    fn ask_zero_ahead(&self) -> bool {
        self.me
            .get()
            .is_some_and(|me| self.shared.writeback.zero_ahead(me.clone()))
    }

    /// Runs [`Partition::zero_ahead`] now if the writer would ask for it (for
    /// [`crate::Log::run_maintenance`] when there is no background maintenance).
    pub(crate) fn zero_ahead_if_due(&self) {
        {
            let mut w = lock(&self.writer);
            let cfg = self.config();
            if self.check_writable().is_err()
                || !w.zero_ahead_due(self.shared.zero_ahead_bytes, &cfg)
            {
                return;
            }
            w.zero.queued = true;
        }
        self.zero_ahead();
    }

    /// Writes zeros ahead of the writer's position in the active segment, up to
    /// [`crate::LogOptions::zero_ahead_bytes`] past it (not past the segment's size limit),
    /// then fdatasyncs them through `sync_handle` (`writer.rs`, "Zero ahead"). Runs on the log's
    /// write-back thread. Publishes nothing: it only makes later group commits cheaper. Out of
    /// space: the zeros are cut off and zeroing stops for this segment; any other write error,
    /// or a failed fdatasync, poisons the partition.
    pub(crate) fn zero_ahead(&self) {
        let window = self.shared.zero_ahead_bytes;
        // (segment, where the zeros end) once the first piece is decided.
        let mut job: Option<(Arc<Segment>, u64)> = None;
        let mut wrote = false;
        let synced = loop {
            let mut w = lock(&self.writer);
            let cfg = self.config();
            let stop = self.check_writable().is_err()
                || w.zero.stopped
                || cfg.fsync != FsyncPolicy::Always
                || job
                    .as_ref()
                    .is_some_and(|(seg, _)| !Arc::ptr_eq(seg, &w.active));
            if stop {
                w.zero.queued = false;
                return;
            }
            let (_, target) = job.get_or_insert_with(|| {
                (
                    w.active.clone(),
                    (w.position + window)
                        .next_multiple_of(4096)
                        .min(cfg.segment_bytes),
                )
            });
            let target = *target;
            let start = w.zero.end.max(w.position);
            if start >= target {
                if !wrote {
                    // Nothing to zero (the writer caught up, or the segment is full): no sync.
                    w.zero.queued = false;
                    return;
                }
                break (w.file.clone(), w.active.clone(), start);
            }
            let len = (target - start).min(writer::ZERO_PIECE as u64);
            if let Err(e) = w.file.write_all_at(&ZEROS[..len as usize], start) {
                w.zero.queued = false;
                let out_of_space = spool_io::is_out_of_space(&e);
                let err = Error::io("write zeros", w.active.log_path(), e);
                // `start` is at or past the writer's position: cutting there removes only
                // zeros. Out of space: zeroing stops for this segment, appends go on.
                if out_of_space && w.file.set_len(start).is_ok() {
                    tracing::warn!(topic = %self.topic, partition = self.id, error = %err, "disk full: no zeroing ahead in this segment");
                    w.zero.stopped = true;
                } else {
                    self.poison(err);
                }
                return;
            }
            w.zero.end = start + len;
            wrote = true;
        };
        let (file, seg, end) = synced;
        // An error poisons (inside); nothing is published either way.
        let _ = self.sync_handle_as(file.as_ref(), &seg, false);
        tracing::trace!(topic = %self.topic, partition = self.id, end, "zeroed ahead");
        lock(&self.writer).zero.queued = false;
    }

    /// Topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The partition's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The topic's fsync policy, as currently configured.
    pub fn fsync_policy(&self) -> FsyncPolicy {
        self.config().fsync
    }

    pub(crate) fn config(&self) -> Arc<TopicConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_config(&self, cfg: Arc<TopicConfig>) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = cfg;
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Segment>>> {
        self.segments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The leader epoch stamped into appended batches (0 until replication exists).
    pub fn leader_epoch(&self) -> i32 {
        self.leader_epoch.load(Ordering::Acquire)
    }

    /// Sets the leader epoch stamped into batches appended from now on.
    pub fn set_leader_epoch(&self, epoch: i32) {
        self.leader_epoch.store(epoch, Ordering::Release);
    }

    /// Next offset readers will see (everything below it is readable).
    pub fn high_watermark(&self) -> u64 {
        self.watch.get()
    }

    /// First offset still in the partition.
    pub fn log_start_offset(&self) -> u64 {
        self.log_start.load(Ordering::Acquire)
    }

    /// The last stable offset: below it every transaction is decided (see [`crate::txn`]).
    pub fn last_stable_offset(&self) -> u64 {
        let hwm = self.watch.get();
        lock(&self.txn).last_stable(hwm)
    }

    /// The transactions open on this partition, oldest first.
    pub fn open_transactions(&self) -> Vec<OpenTxn> {
        lock(&self.txn).open_txns()
    }

    /// Writes a transaction marker ending `producer_id`'s open transaction on this partition
    /// (the transaction coordinator's job) and returns once it is as durable as the topic's
    /// fsync policy says. The marker's epoch must be newer than the transaction's (the
    /// coordinator bumps it at every end). Returns `None`, writing nothing, when the producer
    /// has no open transaction here (a marker already written, e.g. before a crash) or only
    /// one of the marker's own epoch (a later transaction). An older epoch is fenced.
    pub fn write_marker(
        &self,
        producer_id: i64,
        epoch: i16,
        marker: Marker,
        coordinator_epoch: i32,
    ) -> Result<Option<AppendInfo>> {
        let info = self.write_marker_nowait(producer_id, epoch, marker, coordinator_epoch)?;
        if let Some(info) = info
            && self.config().fsync == FsyncPolicy::Always
        {
            self.wait_durable(info.last_offset + 1)?;
        }
        Ok(info)
    }

    /// [`Partition::write_marker`] that returns once the marker is written (page cache),
    /// whatever the fsync policy; as with [`Partition::append_nowait`], under `fsync = always`
    /// readers see it (and the last stable offset moves) only once
    /// [`Partition::wait_durable`] covers it.
    pub fn write_marker_nowait(
        &self,
        producer_id: i64,
        epoch: i16,
        marker: Marker,
        coordinator_epoch: i32,
    ) -> Result<Option<AppendInfo>> {
        let cfg = self.config();
        let now = self.shared.clock.now_ms();
        let batch = txn::marker_batch(producer_id, epoch, marker, coordinator_epoch, now);
        let h = BatchHeader::parse(&batch)?;
        let info = {
            let mut w = lock(&self.writer);
            self.check_writable()?;
            let Some(open) = lock(&self.txn).open_txn(producer_id) else {
                return Ok(None);
            };
            if epoch < open.epoch {
                return Err(Error::ProducerFenced {
                    producer_id,
                    epoch,
                    current_epoch: open.epoch,
                });
            }
            if epoch == open.epoch {
                // The coordinator ends a transaction with the next epoch: an open transaction
                // of the marker's own epoch is a later one (a decision re-run after a crash
                // must not end it).
                return Ok(None);
            }
            w.append(self, &cfg, &batch, &h, now)?
        };
        Ok(Some(info))
    }

    /// True once a failure has poisoned the partition.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    fn check_writable(&self) -> Result<()> {
        if let Some(e) = self.closed_error() {
            return Err(e);
        }
        self.check_not_poisoned()
    }

    /// `None` while the partition is open; once it is closed, the error its writes (and
    /// durability waits) get: [`Error::TopicDeleted`] if its topic was deleted, else
    /// [`Error::Closed`] (the log was closed).
    pub fn closed_error(&self) -> Option<Error> {
        if !self.closed.load(Ordering::Acquire) {
            return None;
        }
        Some(if self.deleted.load(Ordering::Acquire) {
            self.deleted_error()
        } else {
            Error::Closed
        })
    }

    fn deleted_error(&self) -> Error {
        Error::TopicDeleted {
            topic: self.topic.clone(),
            partition: self.id,
        }
    }

    /// Marks the partition poisoned by `err` and returns the [`Error::Poisoned`] that the
    /// operation which failed reports, like every later write: its caller must not take a bare
    /// I/O error for a retriable one (an fsync is never retried). `err` is its cause.
    fn poison(&self, err: Error) -> Error {
        let cause = {
            let mut cause = lock(&self.poison_cause);
            if cause.is_none() {
                tracing::error!(topic = %self.topic, partition = self.id, error = %err, "partition poisoned: refusing writes until reopened");
                *cause = Some(err.to_string());
            }
            cause.clone().unwrap_or_default()
        };
        self.poisoned.store(true, Ordering::Release);
        {
            let _guard = lock(&self.commit);
            self.commit_cv.notify_all();
        }
        self.durable.wake_all();
        Error::Poisoned {
            topic: self.topic.clone(),
            partition: self.id,
            cause,
        }
    }

    /// Appends one encoded RecordBatch v2 (see [`crate::BatchBuilder`]) and returns the
    /// offsets given to it. Returns once the batch is as durable as the topic's fsync policy
    /// says. The batch is checked first (CRC, structure, limits); a bad batch writes nothing.
    pub fn append(&self, batch: &[u8]) -> Result<AppendInfo> {
        let info = self.append_nowait(batch)?;
        if self.config().fsync == FsyncPolicy::Always {
            self.wait_durable(info.last_offset + 1)?;
        }
        Ok(info)
    }

    /// Appends like [`Partition::append`] but returns as soon as the batch is written (page
    /// cache), whatever the fsync policy. Under `fsync = always` readers see the batch only once
    /// an fdatasync covers it, so the caller must then call [`Partition::wait_durable`] (or
    /// have it called, e.g. on a background task) with `last_offset + 1`.
    pub fn append_nowait(&self, batch: &[u8]) -> Result<AppendInfo> {
        let cfg = self.config();
        let h = self.check_batch(&cfg, batch)?;
        let mut w = lock(&self.writer);
        self.append_locked(&mut w, &cfg, batch, &h, self.shared.clock.now_ms())
    }

    /// [`Partition::append_nowait`] only when it cannot block for long: `None` (nothing
    /// written) when another thread holds the partition's writer lock (an append, a roll,
    /// retention, a compaction swap, a sync capturing its end, a zeroing ahead writing a piece)
    /// or when this batch would make
    /// the active segment roll (a roll fdatasyncs the sealed segment). What is left is a write
    /// into the page cache (a write-back it makes due is only queued for the log's write-back
    /// thread, `crate::writeback`). Meant for callers on an async runtime's thread, which fall back to
    /// `append_nowait` on a thread that may block when this says `None`. A batch that fails its
    /// checks is refused (`Some(Err)`) whatever the lock.
    pub fn try_append_nowait(&self, batch: &[u8]) -> Option<Result<AppendInfo>> {
        let cfg = self.config();
        let h = match self.check_batch(&cfg, batch) {
            Ok(h) => h,
            Err(e) => return Some(Err(e)),
        };
        let mut w = match self.writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let now = self.shared.clock.now_ms();
        if w.roll_due(&cfg, batch.len() as u64, &h, now) {
            return None;
        }
        Some(self.append_locked(&mut w, &cfg, batch, &h, now))
    }

    /// The checks every appended batch passes before the writer lock.
    fn check_batch(&self, cfg: &TopicConfig, batch: &[u8]) -> Result<BatchHeader> {
        let h = batch::validate_batch(batch, cfg.max_batch_bytes, &self.shared.limits.decode())?;
        if cfg.cleanup.compacts() {
            crate::compact::check_compactable(batch, &h, &self.shared.limits)?;
        }
        if h.is_control() {
            return Err(BatchError::Unsupported(
                "control batches (only the transaction coordinator writes markers)",
            )
            .into());
        }
        Ok(h)
    }

    /// The rest of an append, under the writer lock: producer and transaction checks, then
    /// the write (or the original offsets of a duplicate).
    fn append_locked(
        &self,
        w: &mut Writer,
        cfg: &TopicConfig,
        batch: &[u8],
        h: &BatchHeader,
        now: i64,
    ) -> Result<AppendInfo> {
        self.check_writable()?;
        let h = *h;
        match w.producers.check(&h)? {
            crate::producer::Check::Append => {
                if h.producer_id >= 0 || h.is_transactional() {
                    let max_aborted = self.shared.limits.max_aborted_txns_per_partition;
                    lock(&self.txn).check(&h, max_aborted)?;
                }
                w.append(self, cfg, batch, &h, now)
            }
            crate::producer::Check::Duplicate {
                base_offset,
                last_offset,
                append_ms,
            } => Ok(AppendInfo {
                base_offset,
                last_offset,
                log_append_time_ms: append_ms,
                duplicate: true,
            }),
        }
    }

    /// Encodes `records` (timestamp, key, value) into one batch and appends it.
    pub fn append_records<'a>(
        &self,
        compression: Compression,
        records: impl IntoIterator<Item = (i64, Option<&'a [u8]>, Option<&'a [u8]>)>,
    ) -> Result<AppendInfo> {
        let mut b = batch::BatchBuilder::new(compression);
        for (ts, k, v) in records {
            b.push(ts, k, v, &[]);
        }
        let bytes = b.finish()?;
        self.append(&bytes)
    }

    /// Blocks until every offset below `next_offset` is durable, whatever the fsync policy
    /// (group commit: one caller runs fdatasync for everyone waiting meanwhile), and
    /// published to readers.
    pub fn wait_durable(&self, next_offset: u64) -> Result<()> {
        let mut st = lock(&self.commit);
        loop {
            // Durable first: `durable_next` only advances after a successful fdatasync that
            // found the partition unpoisoned, so a batch it covers is durable even if a later
            // sync failed meanwhile; failing it would report a write that survives a restart as
            // lost (a client would retry it, and replay would show it twice).
            if st.durable_next >= next_offset {
                return Ok(());
            }
            self.check_writable()?;
            if st.syncing {
                st = self.commit_cv.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let res;
            (st, res) = self.sync_unlocked(st);
            res?;
        }
    }

    /// Makes everything below `next_offset` durable soon, holding the calling thread only
    /// when it is needed to run a sync (group commit with at most two threads per partition):
    /// - no sync running: runs one now (and again while more was asked meanwhile and nobody
    ///   waits to do it), as [`Partition::wait_durable`] would;
    /// - a sync running and nobody waiting to run the next one: waits for it to end and runs
    ///   the next one, which covers every batch appended before that sync starts;
    /// - a sync running and another caller already waiting to run the next one: returns at
    ///   once, leaving this batch to that next sync (it starts after this call, so it covers
    ///   every batch appended before the call).
    ///
    /// For a caller whose batch is already acknowledged and must only become durable, and so
    /// visible under `fsync = always`, soon (`acks = written | none`); nothing waits on its
    /// result. Where [`Partition::wait_durable`] parks every caller until a sync covers it,
    /// this parks one, so a burst of appends during a slow fdatasync does not hold (and then
    /// wake) a thread per append. Returns the partition's error once it is poisoned or closed.
    pub fn sync_behind(&self, next_offset: u64) -> Result<()> {
        let mut st = lock(&self.commit);
        st.requested = st.requested.max(next_offset);
        // True while this caller holds the `next_syncer` place.
        let mut next_in_line = false;
        let release = |st: &mut CommitState, held: bool| {
            if held {
                st.next_syncer = false;
            }
        };
        loop {
            if let Err(e) = self.check_writable() {
                release(&mut st, next_in_line);
                return Err(e);
            }
            if st.durable_next >= st.requested {
                release(&mut st, next_in_line);
                return Ok(());
            }
            if st.syncing {
                if !next_in_line {
                    if st.next_syncer {
                        return Ok(());
                    }
                    st.next_syncer = true;
                    next_in_line = true;
                }
                st = self.commit_cv.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            release(&mut st, next_in_line);
            next_in_line = false;
            let res;
            (st, res) = self.sync_unlocked(st);
            res?;
            if st.next_syncer {
                // Someone waits to run the next sync: what was asked meanwhile is theirs.
                return Ok(());
            }
        }
    }

    /// The part of [`Partition::sync_behind`] that needs no thread: true when everything below
    /// `next_offset` is durable already, or a sync is running and another caller already waits
    /// to run the next one (that next sync starts after this call, so it covers every batch
    /// appended before it; what is asked here is recorded for it). False: the caller must run
    /// `sync_behind(next_offset)` on a thread that may block, or the batch may never be
    /// synced. Also false once the partition refuses writes (`sync_behind` then returns the
    /// error). Lets a caller on an async runtime skip the hand-off to a blocking thread for the
    /// many batches a running group commit will cover anyway.
    pub fn sync_behind_covered(&self, next_offset: u64) -> bool {
        let mut st = lock(&self.commit);
        if self.check_writable().is_err() {
            return false;
        }
        if st.durable_next >= next_offset {
            return true;
        }
        if st.syncing && st.next_syncer {
            st.requested = st.requested.max(next_offset);
            return true;
        }
        false
    }

    /// Asks for everything below `next_offset` to be made durable soon, without waiting
    /// (group commit without a thread per request). Returns true when the caller must now run
    /// [`Partition::run_requested_syncs`] on a thread that may block: no sync loop is running
    /// for this partition. False when nothing is needed (already durable, or the partition
    /// refuses writes: a waiter then gets the error from [`Partition::durable`]) or a running
    /// loop will cover it: a loop re-checks what was asked before it stops, under the same
    /// lock, so a request is never left without a sync.
    pub fn request_sync(&self, next_offset: u64) -> bool {
        let mut st = lock(&self.commit);
        if st.durable_next >= next_offset || self.check_writable().is_err() {
            return false;
        }
        st.requested = st.requested.max(next_offset);
        !std::mem::replace(&mut st.looping, true)
    }

    /// The sync loop started by [`Partition::request_sync`] returning true: runs group commits
    /// ([`Partition::wait_durable`]) until everything requested meanwhile is durable, then
    /// returns. An error (the partition is then poisoned or closed) ends the loop; waiters see
    /// it through [`Partition::durable`].
    pub fn run_requested_syncs(&self) -> Result<()> {
        loop {
            let target = {
                let mut st = lock(&self.commit);
                if st.durable_next >= st.requested {
                    st.looping = false;
                    return Ok(());
                }
                st.requested
            };
            if let Err(e) = self.wait_durable(target) {
                lock(&self.commit).looping = false;
                return Err(e);
            }
        }
    }

    /// A future (for any async runtime) that resolves like [`Partition::wait_durable`]
    /// returns, without running a sync itself: `Ok` once an fdatasync covering every offset
    /// below `next_offset` has completed (and the partition still takes writes), the
    /// partition's error once it is poisoned or closed. Someone must make the sync happen
    /// ([`Partition::request_sync`]).
    pub fn durable(self: &Arc<Self>, next_offset: u64) -> Durable {
        Durable {
            partition: self.clone(),
            waiter: crate::notify::Waiter::new(self.durable.clone(), next_offset.saturating_sub(1)),
            next_offset,
        }
    }

    /// Records that everything below `next` is durable (used by roll and by flushes).
    fn advance_durable(&self, next: u64) {
        let mut st = lock(&self.commit);
        st.durable_next = st.durable_next.max(next);
        self.durable.publish(st.durable_next);
        self.commit_cv.notify_all();
    }

    /// fdatasyncs the active segment now; publishes what it covered to readers and advances
    /// the recovery point when due. Returns the next offset now durable.
    pub fn flush(&self) -> Result<u64> {
        self.check_writable()?;
        let next = self.sync_now()?;
        self.advance_durable(next);
        Ok(next)
    }

    /// Runs one sync with the commit state unlocked and marked `syncing` meanwhile (so no
    /// other caller starts one), then publishes the new durable end and wakes every waiter.
    /// Returns the state locked again, and the sync's result.
    fn sync_unlocked<'a>(
        &'a self,
        mut st: MutexGuard<'a, CommitState>,
    ) -> (MutexGuard<'a, CommitState>, Result<()>) {
        st.syncing = true;
        drop(st);
        let res = self.sync_now();
        let mut st = lock(&self.commit);
        st.syncing = false;
        let res = res.map(|next| {
            st.durable_next = st.durable_next.max(next);
            self.durable.publish(st.durable_next);
        });
        self.commit_cv.notify_all();
        (st, res)
    }

    /// fdatasyncs `file` (a handle of `seg`) under `sync_lock`: a failure poisons the
    /// partition before the lock is released, and a success counts only if no sync failed
    /// before it (module docs). The caller must not hold `sync_lock`.
    fn sync_handle(&self, file: &dyn spool_io::FileHandle, seg: &Segment) -> Result<()> {
        self.sync_handle_as(file, seg, true)
    }

    /// [`Partition::sync_handle`]; `timed`: counted in [`Partition::fsync_latency`] (the
    /// zeroing ahead's syncs are not: that figure is what appends and flushes wait for).
    fn sync_handle_as(
        &self,
        file: &dyn spool_io::FileHandle,
        seg: &Segment,
        timed: bool,
    ) -> Result<()> {
        let _one_at_a_time = lock(&self.sync_lock);
        let started = std::time::Instant::now();
        let synced = file.sync_data();
        if timed {
            self.fsync_latency.record(started.elapsed());
        }
        if let Err(e) = synced {
            return Err(self.poison(Error::io("fdatasync", seg.log_path(), e)));
        }
        self.check_not_poisoned()
    }

    /// `Err(Poisoned)` once the partition is poisoned (closed or not).
    fn check_not_poisoned(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::Poisoned {
                topic: self.topic.clone(),
                partition: self.id,
                cause: lock(&self.poison_cause).clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    fn sync_now(&self) -> Result<u64> {
        let (file, seg, point) = lock(&self.writer).capture();
        self.sync_handle(file.as_ref(), &seg)?;
        seg.publish_readable(point.position);
        self.watch.publish(point.next_offset);
        self.last_flush_ms
            .store(self.shared.clock.now_ms().max(0) as u64, Ordering::Release);
        let cfg = self.config();
        let mut cp = lock(&self.checkpoint);
        let due = cp.last().is_none_or(|l| {
            l.segment_base != point.segment_base
                || point.position.saturating_sub(l.position) >= cfg.recovery_checkpoint_bytes
        });
        if due {
            cp.write(point).map_err(|e| self.poison(e))?;
        }
        Ok(point.next_offset)
    }

    /// Reads whole batches starting with the one that contains `offset`, up to about
    /// `max_bytes` (at least one batch is returned even if larger, so readers always make
    /// progress). Data comes from one segment per call, as a zero-copy slice. Reads
    /// uncommitted data (see [`Partition::read_with`]).
    ///
    /// Damaged data ([`Error::Corruption`]) found after intact batches ends the read there:
    /// the intact prefix is returned, its `next_offset` is the damaged batch's, and a read
    /// from there fails. A read whose first batch is damaged fails.
    pub fn read(&self, offset: u64, max_bytes: usize) -> Result<ReadResult> {
        self.read_with(offset, max_bytes, Isolation::ReadUncommitted)
    }

    /// [`Partition::read`] at an isolation level. Read-committed stops at the last stable
    /// offset and leaves out batches of aborted transactions: the data returned is the
    /// contiguous run of batches after any left out at its start (so `next_offset` can move
    /// past offsets with no data returned); control batches are kept.
    pub fn read_with(
        &self,
        mut offset: u64,
        max_bytes: usize,
        isolation: Isolation,
    ) -> Result<ReadResult> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(self.deleted_error());
        }
        let hwm = self.watch.get();
        let lso = lock(&self.txn).last_stable(hwm);
        let segs = self.snapshot();
        let log_start = self.log_start_offset();
        let committed = isolation == Isolation::ReadCommitted;
        let limit = if committed { lso } else { hwm };
        let empty = |next| ReadResult {
            data: Bytes::new(),
            next_offset: next,
            high_watermark: hwm,
            log_start_offset: log_start,
            last_stable_offset: lso,
        };
        if offset < log_start || offset > hwm {
            return Err(Error::OffsetOutOfRange {
                requested: offset,
                log_start,
                high_watermark: hwm,
            });
        }
        if offset >= limit {
            return Ok(empty(offset));
        }
        let first = segs
            .partition_point(|s| s.base_offset <= offset)
            .saturating_sub(1);
        for seg in segs.iter().skip(first) {
            if offset >= limit {
                break;
            }
            let end = seg.readable_end();
            if end == 0 {
                continue;
            }
            let (data, fresh) = seg.data(end)?;
            self.shared.maps.touch(seg, fresh);
            let (start_base, start_pos) = if offset > seg.base_offset {
                checked_start(seg, &data, end, || seg.floor(offset))?
            } else {
                (seg.base_offset, 0)
            };
            if start_pos > 0 && start_pos >= end {
                // The batch the entry names lies below the high watermark, so inside the
                // readable part: an entry past it is damage, not a race. Going on with the
                // next segment would skip `[offset, its base)` silently.
                return Err(Error::corruption(
                    seg.log_path(),
                    start_pos,
                    Some(offset),
                    format!("index points at position {start_pos}, past the readable end {end}"),
                ));
            }
            let from = (start_pos, start_base);
            match self.collect(seg, &data, from, end, offset, limit, committed, max_bytes)? {
                Collected::Data(data, next_offset) => {
                    return Ok(ReadResult {
                        data,
                        next_offset,
                        ..empty(offset)
                    });
                }
                Collected::Skipped(next) => offset = next,
                Collected::Nothing => {}
            }
        }
        Ok(empty(offset))
    }

    /// Walks `data[pos..end]` to the batch containing `offset` and gathers whole batches
    /// below `limit` (leaving out aborted transactions' batches when `committed`).
    /// `from` is `(pos, base offset of the batch at pos)`; every batch walked must continue
    /// the offsets from there, because the CRC does not cover the base offset: a damaged one
    /// would otherwise make the walk skip or mislabel batches.
    #[allow(clippy::too_many_arguments)]
    fn collect(
        &self,
        seg: &Segment,
        data: &Bytes,
        from: (u64, u64),
        end: u64,
        offset: u64,
        limit: u64,
        committed: bool,
        max_bytes: usize,
    ) -> Result<Collected> {
        let corrupt =
            |pos: u64, reason: String| Error::corruption(seg.log_path(), pos, Some(offset), reason);
        let (mut pos, mut expect) = from;
        // A position from the index (anything but the segment's start) must hold exactly the
        // batch the index names there. The chain check alone lets a sparse (compacted)
        // segment's batch start later than expected, so an entry pointing at a later batch
        // would skip offsets silently. (Entries of sealed segments are also checked against
        // the file when loaded, `index::decode_file`.)
        let exact = (from.0 > 0).then_some(from);
        let mut start = None;
        let mut next = offset;
        // Damage past intact batches already gathered ends the read there: the caller gets
        // the intact prefix, and the next read (which starts at the damaged batch) the error.
        macro_rules! damaged {
            ($err:expr) => {{
                if start.is_some() {
                    break;
                }
                return Err($err);
            }};
        }
        while pos < end {
            let rest = &data[pos as usize..end as usize];
            let h = match BatchHeader::parse(rest) {
                Ok(h) => h,
                Err(e) => damaged!(corrupt(pos, e.to_string())),
            };
            if h.total_len() > rest.len() {
                damaged!(corrupt(
                    pos,
                    format!("batch of {} bytes runs past the end", h.total_len()),
                ));
            }
            if exact.is_some_and(|(at, base)| at == pos && h.base_offset != base) {
                damaged!(corrupt(
                    pos,
                    format!(
                        "index names offset {expect} at this position, the batch has {}",
                        h.base_offset
                    ),
                ));
            }
            if seg.chain().check(&h, expect).is_some() || h.last_offset_delta < 0 {
                damaged!(corrupt(
                    pos,
                    format!(
                        "batch has base offset {} (last offset delta {}), expected {expect}",
                        h.base_offset, h.last_offset_delta
                    ),
                ));
            }
            expect = h.next_offset();
            if h.base_offset >= limit {
                break;
            }
            if h.next_offset() <= offset {
                pos += h.total_len() as u64;
                continue;
            }
            if committed
                && h.is_transactional()
                && !h.is_control()
                && lock(&self.txn).is_aborted(h.producer_id, h.base_offset)
            {
                if start.is_some() {
                    break;
                }
                next = h.next_offset();
                pos += h.total_len() as u64;
                continue;
            }
            if let Some(s) = start
                && (pos - s) as usize + h.total_len() > max_bytes
            {
                break;
            }
            if self.shared.verify_reads
                && let Err(e) = batch::check_crc(&rest[..h.total_len()], &h)
            {
                let err = corrupt(pos, e.to_string());
                if start.is_none() {
                    // Logged once, by the read that starts at the damaged batch.
                    tracing::error!(error = %err, "corrupt batch refused to a reader");
                }
                damaged!(err);
            }
            start.get_or_insert(pos);
            next = h.next_offset();
            pos += h.total_len() as u64;
        }
        Ok(match start {
            Some(s) => Collected::Data(data.slice(s as usize..pos as usize), next),
            None if next > offset => Collected::Skipped(next),
            None => Collected::Nothing,
        })
    }

    /// The earliest offset whose batch has a timestamp at or after `ts`, or `None` when every
    /// readable record is older. The batch found is decoded to return the first record with
    /// such a timestamp (a batch that cannot be decoded, e.g. gzip, gives its first offset).
    ///
    /// Only data batches count: a transaction marker carries the wall-clock time it was
    /// written, not an event time, so counting it would land a lookup for an event time on
    /// the first marker written after it on the wall clock (a replay from event time T would
    /// start right after the first transaction ended, wherever its records were).
    pub fn offset_for_timestamp(&self, ts: i64) -> Result<Option<u64>> {
        // Like a read: a handle that outlived its topic must not open files by name in a
        // directory a re-created topic of the same name may be using.
        if self.deleted.load(Ordering::Acquire) {
            return Err(self.deleted_error());
        }
        let hwm = self.watch.get();
        let log_start = self.log_start_offset();
        for seg in self.snapshot().iter() {
            let end = seg.readable_end();
            if end == 0 {
                continue;
            }
            let lookup = seg.time_floor(ts)?; // (loads the index, which knows the segment's max timestamp)
            if seg.max_timestamp_hint().is_some_and(|m| m < ts) {
                continue;
            }
            let (data, fresh) = seg.data(end)?;
            self.shared.maps.touch(seg, fresh);
            let first = std::cell::Cell::new(Some(lookup));
            let (start_base, start_pos) = checked_start(seg, &data, end, || {
                let lookup = match first.take() {
                    Some(l) => l,
                    None => seg.time_floor(ts)?,
                };
                Ok(match lookup {
                    Some(rel) => seg.floor(seg.base_offset + u64::from(rel))?,
                    None => (seg.base_offset, 0),
                })
            })?;
            let mut pos = start_pos;
            while pos < end {
                let rest = &data[pos as usize..end as usize];
                let h = BatchHeader::parse(rest)
                    .map_err(|e| Error::corruption(seg.log_path(), pos, None, e.to_string()))?;
                if pos == start_pos && start_pos > 0 && h.base_offset != start_base {
                    // An index entry must point at the batch it names (see `collect`).
                    return Err(Error::corruption(
                        seg.log_path(),
                        pos,
                        None,
                        format!(
                            "index names offset {start_base} here, the batch has {}",
                            h.base_offset
                        ),
                    ));
                }
                if h.total_len() > rest.len() || h.base_offset >= hwm {
                    break;
                }
                if !h.is_control() && h.max_timestamp >= ts && h.next_offset() > log_start {
                    let b = Batch::from_parts(
                        h,
                        data.slice(pos as usize..pos as usize + h.total_len()),
                    );
                    // Like Kafka, look inside the batch (decompressing if needed, within
                    // the limits) for the first record at or after `ts`.
                    let exact = b
                        .records(&self.shared.limits.decode())
                        .ok()
                        .and_then(|mut rs| rs.find_map(|r| r.ok().filter(|r| r.timestamp >= ts)))
                        .map(|r| r.offset);
                    return Ok(Some(exact.unwrap_or(h.base_offset).max(log_start)));
                }
                pos += h.total_len() as u64;
            }
        }
        Ok(None)
    }

    /// Blocks until the high watermark exceeds `offset`, `timeout` passes or the partition is
    /// closed; returns it.
    pub fn wait_for_data(&self, offset: u64, timeout: Duration) -> u64 {
        self.watch.wait_beyond(offset, timeout)
    }

    /// A future (for any async runtime) that resolves when the high watermark exceeds
    /// `offset`, with the new high watermark, or once the partition is closed (no data will
    /// come: [`Partition::closed_error`] says why), with the high watermark as it is then.
    pub fn data_available(&self, offset: u64) -> DataAvailable {
        DataAvailable::new(self.watch.clone(), offset)
    }

    /// Sizes and offsets.
    pub fn stats(&self) -> PartitionStats {
        let segs = self.snapshot();
        PartitionStats {
            log_start_offset: self.log_start_offset(),
            high_watermark: self.high_watermark(),
            last_stable_offset: self.last_stable_offset(),
            size_bytes: segs.iter().map(|s| s.written_end()).sum(),
            segments: segs.len(),
        }
    }

    /// Latency of the fdatasyncs run for appends and flushes since open.
    pub fn fsync_latency(&self) -> crate::stats::LatencySnapshot {
        self.fsync_latency.snapshot()
    }

    /// Base offsets of the segments, oldest first.
    pub fn segment_bases(&self) -> Vec<u64> {
        self.snapshot().iter().map(|s| s.base_offset).collect()
    }

    /// Rolls the active segment now if it holds data (for tests and operators).
    pub fn roll(&self) -> Result<()> {
        let mut w = lock(&self.writer);
        self.check_writable()?;
        if w.position() > 0 {
            w.roll(self)?;
        }
        Ok(())
    }

    /// Deletes sealed segments past the retention limits (time by their newest record,
    /// size by the partition total). Returns the number of segments removed (none once the
    /// partition is closed).
    pub fn enforce_retention(&self) -> Result<usize> {
        let cfg = self.config();
        if !cfg.cleanup.deletes() || (cfg.retention_ms.is_none() && cfg.retention_bytes.is_none()) {
            return Ok(0);
        }
        let now = self.shared.clock.now_ms();
        let _w = lock(&self.writer);
        if self.is_closed() {
            // Checked under the writer lock, which `close` takes after setting `closed`: a
            // handle that outlived its topic must not rename files by name in a directory a
            // re-created topic of the same name may be using now.
            return Ok(0);
        }
        let segs = self.snapshot();
        let sealed = &segs[..segs.len() - 1];
        let mut total: u64 = segs.iter().map(|s| s.written_end()).sum();
        let mut doomed = 0;
        for seg in sealed {
            let by_bytes = cfg.retention_bytes.is_some_and(|limit| {
                total.saturating_sub(seg.written_end()) >= limit && total > limit
            });
            let by_time = match cfg.retention_ms {
                Some(ms) => {
                    if seg.max_timestamp_hint().is_none() {
                        seg.time_floor(i64::MIN)?;
                    }
                    seg.max_timestamp_hint()
                        .is_some_and(|t| t < now.saturating_sub(ms as i64))
                }
                None => false,
            };
            if !(by_bytes || by_time) {
                break;
            }
            total -= seg.written_end();
            doomed += 1;
        }
        if doomed == 0 {
            return Ok(0);
        }
        for seg in &segs[..doomed] {
            seg.mark_deleted()?;
        }
        crate::fsutil::sync_dir(self.shared.fs.as_ref(), &self.dir)?;
        let remaining: Vec<_> = segs[doomed..].to_vec();
        let new_start = remaining[0].base_offset;
        *self.segments.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(remaining);
        let old_start = self.log_start.fetch_max(new_start, Ordering::AcqRel);
        // Aborted transactions that ended below the *previous* log start: the segments they
        // were in went at an earlier pass, so no reader still holding an older segment list
        // can reach their batches (pruning those of the segments deleted just now could let
        // such a reader serve an aborted batch).
        lock(&self.txn).prune(old_start);
        tracing::info!(topic = %self.topic, partition = self.id, deleted = doomed, log_start = new_start, "retention deleted segments");
        Ok(doomed)
    }

    /// Runs the interval flush when due. Returns true if it flushed.
    pub(crate) fn flush_if_due(&self) -> Result<bool> {
        let FsyncPolicy::Interval { interval_ms } = self.config().fsync else {
            return Ok(false);
        };
        let now = self.shared.clock.now_ms().max(0) as u64;
        if now.saturating_sub(self.last_flush_ms.load(Ordering::Acquire)) < interval_ms {
            return Ok(false);
        }
        if self.is_poisoned() || self.closed.load(Ordering::Acquire) {
            return Ok(false);
        }
        // Nothing written since the last flush: no fdatasync (an idle partition would
        // otherwise pay one every interval).
        // (Two separate locks, never nested here: the writer lock is taken before the commit
        // lock elsewhere.)
        let written = lock(&self.writer).next_offset;
        if lock(&self.commit).durable_next >= written {
            self.last_flush_ms.store(now, Ordering::Release);
            return Ok(false);
        }
        self.flush()?;
        Ok(true)
    }

    /// Flushes and writes a final recovery point so the next open scans nothing, then refuses
    /// further writes.
    pub(crate) fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Waiters for data or durability return now: none will come.
        self.watch.close();
        self.durable.close();
        if self.is_poisoned() {
            return Ok(());
        }
        let (file, seg, point) = {
            let mut w = lock(&self.writer);
            // The file ends on its last batch again before the final sync (zero ahead).
            w.trim_zero_tail().map_err(|e| self.poison(e))?;
            w.capture()
        };
        self.sync_handle(file.as_ref(), &seg)?;
        seg.publish_readable(point.position);
        self.watch.publish(point.next_offset);
        lock(&self.checkpoint).write(point)
    }

    /// [`Partition::close`] for a partition whose topic is being deleted: from here on its
    /// reads, writes and durability waits fail with [`Error::TopicDeleted`], and its waiters
    /// return.
    ///
    /// When it returns, nothing of this handle acts on the partition's directory by name any
    /// more, so the caller may move the directory away and a topic of the same name may be
    /// created there: retention (which checks `closed` under the writer lock) and any cleaner
    /// pass (which checks it before each batch and each write, under the `cleaning` lock)
    /// have finished, and later ones see `closed` and do nothing.
    pub(crate) fn close_deleted(&self) -> Result<()> {
        self.deleted.store(true, Ordering::Release);
        let res = self.close();
        // Barriers (a poisoned partition's close takes no lock). The writer lock first, then
        // the cleaning lock, never both: a pass holds `cleaning` and takes the writer lock
        // to swap.
        drop(lock(&self.writer));
        drop(lock(&self.cleaning));
        res
    }

    /// True once the partition is closed (the log closed, or its topic was deleted).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The lock a cleaner pass holds while it runs (see [`Partition::close_deleted`]).
    pub(crate) fn cleaning(&self) -> MutexGuard<'_, ()> {
        lock(&self.cleaning)
    }

    /// True once the partition's topic was deleted (this handle outlived it).
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Path of the active segment's log file.
    pub fn active_segment_path(&self) -> PathBuf {
        let segs = self.snapshot();
        segs.last()
            .map(|s| s.log_path().to_path_buf())
            .unwrap_or_default()
    }

    pub(crate) fn segment_file_name(base: u64) -> String {
        segment::log_name(base)
    }
}
