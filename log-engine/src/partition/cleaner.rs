//! What the log cleaner ([`crate::compact`]) needs from a partition: a consistent view of its
//! sealed segments and of its last stable offset, which transactions' batches are aborted,
//! and replacing some segments under the writer lock.

use std::path::PathBuf;
use std::sync::Arc;

use crate::batch::BatchHeader;
use crate::config::{Limits, TopicConfig};
use crate::error::{Error, Result};
use crate::segment::Segment;

use super::{Partition, lock};

/// The partition as the cleaner sees it at the start of a pass.
#[derive(Debug)]
pub(crate) struct CleanerView {
    pub(crate) fs: Arc<dyn spool_io::FileSystem>,
    pub(crate) dir: PathBuf,
    pub(crate) config: Arc<TopicConfig>,
    pub(crate) limits: Limits,
    pub(crate) now_ms: i64,
    pub(crate) log_start: u64,
    /// Sealed segments, oldest first (the active one excluded).
    pub(crate) sealed: Vec<Arc<Segment>>,
    /// Base offset of the active segment.
    pub(crate) active_base: u64,
    /// The last stable offset when the view was taken: every transaction below it is decided
    /// (and stays so: the LSO never goes backwards), nothing at or past it may be cleaned.
    pub(crate) last_stable: u64,
}

impl Partition {
    /// The view of a pass; fails if the partition is closed or poisoned.
    pub(crate) fn cleaner_view(&self) -> Result<CleanerView> {
        self.check_writable()?;
        let segs = self.snapshot();
        // Any reading will do: the LSO never goes backwards, so everything below it stays
        // decided for the whole pass.
        let last_stable = self.last_stable_offset();
        let (active, sealed) = segs.split_last().expect("a partition has a segment");
        Ok(CleanerView {
            fs: self.shared.fs.clone(),
            dir: self.dir.clone(),
            config: self.config(),
            limits: self.shared.limits.clone(),
            now_ms: self.shared.clock.now_ms(),
            log_start: self.log_start_offset(),
            sealed: sealed.to_vec(),
            active_base: active.base_offset,
            last_stable,
        })
    }

    /// True when the batch `h` belongs to an aborted transaction (a transactional data batch
    /// whose `(producer id, base offset)` falls in an aborted range). Only meaningful below
    /// the last stable offset: above it a transaction may still be undecided. Entries are
    /// only added for transactions starting at or above the LSO, so the answer for a batch
    /// below a view's `last_stable` does not change during a pass, unless retention prunes
    /// the entry meanwhile; it does so only once the whole transaction and everything before
    /// it are deleted, and then the group holding the batch fails to swap in (its segments
    /// are no longer listed) and whatever the batch's keys shadow in the map is deleted too.
    pub(crate) fn is_aborted_batch(&self, h: &BatchHeader) -> bool {
        h.producer_id >= 0
            && h.is_transactional()
            && !h.is_control()
            && lock(&self.txn).is_aborted(h.producer_id, h.base_offset)
    }

    /// Counts a cleaner pass that stopped because a group's swap was refused.
    pub(crate) fn note_abandoned_pass(&self) {
        self.shared
            .abandoned_passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A name part for the files of a segment the cleaner replaces (see
    /// [`Segment::mark_replaced`]).
    pub(crate) fn next_replace_id(&self) -> String {
        self.shared.next_replace_id()
    }

    /// The mapping of a sealed segment for the cleaner, counted in the map cache.
    pub(crate) fn cleaner_data(&self, seg: &Arc<Segment>) -> Result<bytes::Bytes> {
        let (data, fresh) = seg.data(seg.readable_end())?;
        self.shared.maps.touch(seg, fresh);
        Ok(data)
    }

    /// Replaces the consecutive segments `old` by `new` under the writer lock, and publishes
    /// the new list. Returns false, changing nothing, when `old` is no longer in the segment
    /// list (retention removed part of it) or the partition is closed or poisoned. `swap`
    /// runs the file renames (from the commit point on); if it fails, or returns false (a test
    /// hook stopped it), the partition is poisoned: the files are then between two states that
    /// only the recovery at the next open puts right.
    pub(crate) fn replace_segments(
        &self,
        old: &[Arc<Segment>],
        new: Arc<Segment>,
        swap: impl FnOnce() -> Result<bool>,
    ) -> Result<bool> {
        let _w = lock(&self.writer);
        if self.check_writable().is_err() {
            return Ok(false);
        }
        let segs = self.snapshot();
        let Some(at) = segs.iter().position(|s| Arc::ptr_eq(s, &old[0])) else {
            return Ok(false);
        };
        let still = segs.len() > at + old.len()
            && segs[at..at + old.len()]
                .iter()
                .zip(old)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !still {
            return Ok(false);
        }
        match swap() {
            Ok(true) => {}
            Ok(false) => {
                return Err(self.poison(Error::InvalidConfig(
                    "a compaction swap was stopped half-way (test hook)".into(),
                )));
            }
            Err(e) => return Err(self.poison(e)),
        }
        let mut v = Vec::with_capacity(segs.len() - old.len() + 1);
        v.extend_from_slice(&segs[..at]);
        v.push(new);
        v.extend_from_slice(&segs[at + old.len()..]);
        *self.segments.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
        Ok(true)
    }
}
