//! The single writer of a partition: appends batches to the active segment and rolls it.
//!
//! Only code holding the partition's writer lock reaches this module. An append writes the
//! batch with its offsets assigned (16 patched header bytes, then the caller's bytes as they
//! are), updates the in-memory index and, unless `fsync = always`, publishes the new end to
//! readers. A write that fails for lack of space is rolled back by truncating to the previous
//! end; any other failed write, or a failed rollback, poisons the partition.
//!
//! Roll protocol (each step completes before the next starts):
//! 1. fdatasync the active log;
//! 2. write and fdatasync its `.index` and `.timeindex` (temp file + rename);
//! 3. create the next segment's `.log`;
//! 4. fsync the partition directory (makes 2 and 3 durable);
//! 5. publish the new segment list and mark everything durable;
//! 6. write the recovery point `(new base, 0, new base)`;
//! 7. write the producer-state snapshot (with the partition's transactions) covering
//!    everything below the new base (expired producers dropped first), so reopening walks only
//!    the active segment's headers. It is derived data: losing it costs a longer walk at open,
//!    never correctness, so failing to write it (a full disk) is logged and does not fail the
//!    roll (a failed roll poisons the partition).
//!
//! Early write-back: unless `fsync = always` (whose group commits keep little dirty), every
//! [`WRITEBACK_BYTES`] appended to the active segment the writer hands those bytes to the log's
//! write-back thread (`crate::writeback`), which asks the kernel to start writing them back
//! (`FileHandle::start_writeback`, which does not wait for the write and makes nothing
//! durable). Without it a 1 GiB segment of `fsync = never` was written back all at once by
//! the roll's fdatasync (step 1), under the writer lock: a 0.55–0.65 s stall of every append
//! once per segment on this project's test VM (docs/benchmarks.md, issue 14). It runs on that
//! thread, not the writer's, because submitting the write-back takes 0.4 ms and up to ~10 ms
//! when the disk is busy, which held the writer lock and the appending request. The durability
//! promises are unchanged: only `sync_data` ever makes data durable or publishes it as such.
//!
//! Zero ahead (`fsync = always` only; docs/durability.md, "Zero ahead"): an fdatasync that
//! grows the file also writes its size and newly allocated blocks (a journal commit on ext4),
//! about twice the cost of one that overwrites blocks already written and durable. So while
//! group commits are small ([`crate::config::ZERO_AHEAD_MAX_SYNC_BYTES`]), the writer asks the
//! log's write-back thread to write zeros past its end, up to
//! [`crate::LogOptions::zero_ahead_bytes`] ahead, and fdatasync them
//! (`Partition::zero_ahead`). Rules:
//! - zeros are written only under the writer lock and only at or past `position` (never over a
//!   byte the writer wrote or is writing), in pieces of at most [`ZERO_PIECE`] bytes so the lock
//!   is held briefly; the writer appends into zeroed bytes as into fresh ones (or past them,
//!   when it outruns the zeroing: a plain append);
//! - the zeroing's fdatasync goes through `Partition::sync_handle` like every other (an error
//!   poisons), publishes nothing and advances no recovery point: only group commits, flushes,
//!   rolls and closes do;
//! - a zero tail is end-of-data: recovery cuts it (reported apart from a torn tail), and roll
//!   and close truncate the file to `position` before their fdatasync, so a sealed segment ends
//!   on its last batch as before;
//! - out of space while zeroing: the zeros are cut off again and zeroing stops for this
//!   segment; any other write error poisons, like a failed append.

use std::sync::Arc;

use spool_io::{FileHandle, OpenMode};

use crate::batch::{self, BatchHeader};
use crate::checkpoint::Point;
use crate::config::{FsyncPolicy, TopicConfig};
use crate::error::{Error, Result};
use crate::producer::ProducerStates;
use crate::segment::{IndexBuilder, Segment};

use super::{AppendInfo, Partition, lock};

/// Unless `fsync = always`, write-back of the active segment is started every this many
/// appended bytes (module docs). Small enough that a roll's fdatasync finds at most a few
/// MiB dirty; large enough that the hint costs one system call per several requests.
pub(super) const WRITEBACK_BYTES: u64 = 4 << 20;

/// Zeros are written in pieces of at most this many bytes, the writer lock taken for each.
pub(super) const ZERO_PIECE: usize = 256 << 10;

/// What zeroing ahead of the writer has done in the active segment (module docs).
#[derive(Debug, Default)]
pub(super) struct ZeroAhead {
    /// The file's bytes `[position, end)` hold zeros written by the zeroing (the file is at
    /// least this long); `end <= position` when nothing is zeroed ahead.
    pub(super) end: u64,
    /// A zeroing job is queued or running (at most one per partition).
    pub(super) queued: bool,
    /// Zeroing stopped for this segment (the disk was full).
    pub(super) stopped: bool,
    /// `position` when the last sync captured it.
    pub(super) captured: u64,
    /// Bytes the last sync covered (appended between the two captures before it); `None`
    /// until one sync was measured (no zeroing before that).
    pub(super) bytes_per_sync: Option<u64>,
}

#[derive(Debug)]
pub(super) struct Writer {
    pub(super) active: Arc<Segment>,
    pub(super) file: Arc<dyn FileHandle>,
    pub(super) position: u64,
    pub(super) next_offset: u64,
    pub(super) index: IndexBuilder,
    /// Wall-clock time of the first append to the active segment since open.
    pub(super) first_append_ms: Option<i64>,
    /// Idempotent producers' state (checked before each append, updated after it).
    pub(super) producers: ProducerStates,
    /// Position in the active segment from which no write-back was started yet (module docs).
    pub(super) writeback_from: u64,
    /// Zeroing ahead of `position` (module docs).
    pub(super) zero: ZeroAhead,
}

impl Writer {
    pub(super) fn position(&self) -> u64 {
        self.position
    }

    /// What a sync started now would cover.
    pub(super) fn capture(&mut self) -> (Arc<dyn FileHandle>, Arc<Segment>, Point) {
        // For zeroing's adaptivity: how much the syncs cover.
        self.zero.bytes_per_sync = Some(self.position.saturating_sub(self.zero.captured));
        self.zero.captured = self.position;
        (
            self.file.clone(),
            self.active.clone(),
            Point {
                segment_base: self.active.base_offset,
                position: self.position,
                next_offset: self.next_offset,
            },
        )
    }

    /// True when appending a batch of `len` bytes with header `h` at time `now` must roll
    /// the active segment first.
    pub(super) fn roll_due(&self, cfg: &TopicConfig, len: u64, h: &BatchHeader, now: i64) -> bool {
        let too_big = self.position + len > cfg.segment_bytes;
        // Index entries hold offsets relative to the segment base as u32; like Kafka, roll
        // before a segment's offsets would span more than i32::MAX.
        let too_many = self.next_offset + h.last_offset_delta.max(0) as u64
            - self.active.base_offset
            > i32::MAX as u64;
        let too_old = self
            .first_append_ms
            .is_some_and(|t| now.saturating_sub(t) >= cfg.segment_ms as i64);
        self.position > 0 && (too_big || too_old || too_many)
    }

    /// True when appending `len` more bytes would start write-back of the active segment.
    pub(super) fn writeback_due(&self, cfg: &TopicConfig, len: u64) -> bool {
        cfg.fsync != FsyncPolicy::Always
            && (self.position + len).saturating_sub(self.writeback_from) >= WRITEBACK_BYTES
    }

    /// True when the writer should ask for zeros ahead of it (module docs): `fsync = always`,
    /// zeroing on and not stopped or already asked for, small syncs, less than half the window
    /// zeroed ahead, and room left in the segment.
    pub(super) fn zero_ahead_due(&self, window: u64, cfg: &TopicConfig) -> bool {
        window > 0
            && cfg.fsync == FsyncPolicy::Always
            && !self.zero.queued
            && !self.zero.stopped
            && self
                .zero
                .bytes_per_sync
                .is_some_and(|b| b <= crate::config::ZERO_AHEAD_MAX_SYNC_BYTES)
            && self.zero.end.saturating_sub(self.position) <= window / 2
            && self.zero.end.max(self.position) < cfg.segment_bytes
    }

    /// Cuts a zero tail off the active segment's file (roll and close do this before their
    /// fdatasync, so the file ends on its last batch). Under the writer lock.
    pub(super) fn trim_zero_tail(&mut self) -> Result<()> {
        if self.zero.end > self.position {
            self.file
                .set_len(self.position)
                .map_err(|e| Error::io("truncate", self.active.log_path(), e))?;
        }
        self.zero.end = self.position;
        Ok(())
    }

    /// Has write-back of what was appended since the last start started, when due (module
    /// docs), by the log's write-back thread: nothing here waits for the block layer.
    fn start_writeback_if_due(&mut self, p: &Partition, cfg: &TopicConfig) {
        if !self.writeback_due(cfg, 0) {
            return;
        }
        let from = self.writeback_from;
        p.shared
            .writeback
            .hint(&self.file, from, self.position - from);
        self.writeback_from = self.position;
    }

    /// Appends a validated batch at time `now` (the append time it records, and what the
    /// segment's age is judged by); returns what was assigned.
    pub(super) fn append(
        &mut self,
        p: &Partition,
        cfg: &TopicConfig,
        batch: &[u8],
        h: &BatchHeader,
        now: i64,
    ) -> Result<AppendInfo> {
        if self.roll_due(cfg, batch.len() as u64, h, now) {
            self.roll(p)?;
        }
        let len = batch.len() as u64;
        let base = self.next_offset;
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&batch[..16]);
        batch::assign(&mut prefix, base, p.leader_epoch());
        let pos = self.position;
        // One `pwritev` of the rewritten prefix and the rest of the batch (one system call
        // per append on the real file system).
        let written = self.file.write_pair_at(&prefix, &batch[16..], pos);
        if let Err(e) = written {
            let out_of_space = spool_io::is_out_of_space(&e);
            let err = Error::io("write", self.active.log_path(), e);
            // Out of space: nothing reached the disk that matters. Roll the partial write back
            // so the file ends on a batch boundary again; the partition stays usable (nothing
            // was published) and writes resume once space is freed. Any other write error, or
            // a failed rollback, poisons the partition.
            // (The rollback also cuts any zeros zeroed ahead of `pos`.)
            self.zero.end = self.zero.end.min(pos);
            return Err(if out_of_space && self.file.set_len(pos).is_ok() {
                err
            } else {
                p.poison(err)
            });
        }
        let stored = BatchHeader {
            base_offset: base,
            ..*h
        };
        self.position += len;
        self.next_offset = stored.next_offset();
        if let Some(entry) = self.index.observe(pos, &stored) {
            self.active.push_index(entry);
        }
        self.active.note_timestamp(h.max_timestamp);
        self.active.publish_written(self.position);
        self.start_writeback_if_due(p, cfg);
        if p.shared.zero_in_background && self.zero_ahead_due(p.shared.zero_ahead_bytes, cfg) {
            self.zero.queued = p.ask_zero_ahead();
        }
        self.first_append_ms.get_or_insert(now);
        self.producers.record(&stored, base, now);
        if h.producer_id >= 0 && h.is_transactional() {
            // Under `fsync = always` readers see the batch only once synced; otherwise now.
            let visible = if cfg.fsync == FsyncPolicy::Always {
                p.watch.get()
            } else {
                self.next_offset
            };
            lock(&p.txn).record(&stored, batch, base, visible);
        }
        if cfg.fsync != FsyncPolicy::Always {
            self.active.publish_readable(self.position);
            p.watch.publish(self.next_offset);
        }
        Ok(AppendInfo {
            base_offset: base,
            last_offset: stored.last_offset(),
            log_append_time_ms: now,
            duplicate: false,
        })
    }

    /// Seals the active segment and starts a new one (protocol in the module docs). Any
    /// failure poisons the partition: the on-disk state is then repaired by reopening. (The
    /// derived files, indexes and the producer snapshot, are not failures: see the module
    /// docs.)
    pub(super) fn roll(&mut self, p: &Partition) -> Result<()> {
        self.try_roll(p).map_err(|e| p.poison(e))
    }

    fn try_roll(&mut self, p: &Partition) -> Result<()> {
        let old = self.active.clone();
        // A zero tail is cut first: the sealed file ends on its last batch (module docs).
        self.trim_zero_tail()?;
        // Through the partition's sync lock, like every fdatasync of a segment handle: a group
        // commit or a flush may be about to sync this handle (they release the writer lock to
        // sync); a failure here poisons before the lock is released, and a success after
        // theirs failed does not count (fsyncgate; module docs of `partition`).
        p.sync_handle(self.file.as_ref(), &old)?;
        old.seal(self.next_offset.saturating_sub(1))?;
        let base = self.next_offset;
        let path = p.dir.join(Partition::segment_file_name(base));
        let fs = &p.shared.fs;
        let file = fs
            .open(&path, OpenMode::CreateNew)
            .map_err(|e| Error::io("create", &path, e))?;
        crate::fsutil::sync_dir(fs.as_ref(), &p.dir)?;
        let interval = p.config().index_interval_bytes;
        let seg = Arc::new(Segment::active(
            fs,
            &p.dir,
            base,
            interval,
            file.clone(),
            0,
            Vec::new(),
            Vec::new(),
            -1,
        ));
        {
            let mut segs = p.segments.write().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<_> = segs.as_ref().clone();
            v.push(seg.clone());
            *segs = Arc::new(v);
        }
        p.watch.publish(base);
        p.advance_durable(base);
        self.active = seg;
        self.file = file;
        self.position = 0;
        self.writeback_from = 0;
        // `queued` stays: a job not started yet zeroes the new segment, one already writing
        // sees the segment change and stops (the next append asks again).
        self.zero = ZeroAhead {
            queued: self.zero.queued,
            bytes_per_sync: self.zero.bytes_per_sync,
            ..ZeroAhead::default()
        };
        self.index = IndexBuilder::new(base, interval);
        self.first_append_ms = None;
        lock(&p.checkpoint).write(Point {
            segment_base: base,
            position: 0,
            next_offset: base,
        })?;
        self.producers.expire(p.shared.clock.now_ms());
        // No directory fsync: a snapshot that did not survive only makes the next open walk
        // more headers (from an older snapshot, or from the first segment). For the same
        // reason a snapshot that cannot be written (typically a full disk: the steps above
        // need no new data blocks) does not fail the roll, which would poison the partition
        // until a restart even once retention frees space: `write_replace` removed its
        // temporary file, and the previous snapshot still names an older segment, from which
        // the next open walks the headers.
        let txn = lock(&p.txn);
        if let Err(e) = self
            .producers
            .write_snapshot(fs.as_ref(), &txn, &p.dir, base)
        {
            tracing::warn!(topic = %p.topic, partition = p.id, base, error = %e, "producer snapshot not written; the next open walks more batch headers");
        }
        tracing::debug!(topic = %p.topic, partition = p.id, base, "rolled segment");
        Ok(())
    }
}
