//! Log compaction: keep the latest record of each key in the sealed segments of topics whose
//! cleanup policy is `compact` (or `compact,delete`), as Kafka's log cleaner does.
//!
//! # What a pass does
//!
//! A partition's offsets below `first_dirty` (kept in the `cleaner-state` file, see
//! [`state`]) form the *clean* section: a completed pass left at most one record per key
//! there. The *dirty* section runs from `first_dirty` to the end of the *cleanable* segments:
//! the sealed segments whose newest record is at least `min_compaction_lag_ms` old (the active
//! segment is never touched), cut at the partition's last stable offset if that is lower
//! (`cleanable_end`; see [Transactions](#transactions)). A pass:
//!
//! 1. **maps** the dirty section: for each record, in offset order, `hash(key) → offset` in a
//!    fixed-capacity map ([`CleanerOptions::dedupe_buffer_bytes`], 24 bytes per key; markers
//!    and records of aborted transactions are left out). When a new key does not fit, the map
//!    stops there (`map_end`): only the prefix of the dirty section whose keys fit is cleaned,
//!    the next pass goes on from `map_end`. Memory never depends on the size of the
//!    partition, and at most one batch is decoded at a time.
//! 2. **rewrites** every cleanable segment below `map_end`, oldest first, in groups of
//!    consecutive segments of at most `segment_bytes` together (so small cleaned segments
//!    merge), each group into one new segment named after its first one. A record survives
//!    unless
//!    - a later record of the same key is in the map (it is superseded),
//!    - it has no key (Kafka drops those too; appends of keyless records to a compacted topic
//!      are refused, so only data written before the topic became compacted has them),
//!    - it belongs to an aborted transaction (its whole batch goes, as in Kafka), or
//!    - it is a tombstone (null value) below `map_end` whose batch's delete horizon has
//!      passed. The horizon is set the first time a pass keeps the tombstone, to that pass's
//!      time plus `delete_retention_ms` (Kafka's KIP-534: attribute bit 6, the horizon in
//!      `base_timestamp`). A consumer that reads the whole partition within
//!      `delete_retention_ms` of the first pass therefore sees the deletion.
//!
//!    Markers (control batches) and every batch at or past `cleanable_end` are copied byte
//!    for byte, whatever the map says. Batches whose records all survive are copied byte for
//!    byte too; others are rewritten with their original base offset, `last_offset_delta`,
//!    producer fields and timestamps (see [`records`]), with a new CRC. **Offsets never
//!    change**; they become sparse: a read of an offset that is gone returns the next batch
//!    that is still there.
//! 3. **swaps** each group's output in, crash-safely (protocol in [`swap`]), publishing the
//!    new segment list under the writer lock. Readers holding the old segments keep reading
//!    their files (renamed to `*.deleted`, unlinked when the last mapping drops).
//! 4. records `first_dirty = map_end` and the earliest delete horizon still pending, but only
//!    when every group was swapped in (or left as it was because nothing in it changed). A
//!    group whose swap is refused (retention deleted part of it while the pass ran, or the
//!    partition closed) ends the pass at once and nothing more is written: its segments and
//!    the later ones were not deduplicated, so they must stay dirty.
//!
//! A partition is cleaned when its dirty section is at least `min_cleanable_dirty_percent` of
//! its cleanable bytes, or when a kept tombstone's horizon has passed.
//!
//! # Transactions
//!
//! Transactional batches and markers ([`crate::txn`]) follow Kafka's cleaner:
//!
//! - **Nothing at or past the last stable offset (LSO) is cleaned.** The view of a pass reads
//!   the LSO once; `cleanable_end` is at most that. Past it a transaction may be undecided, so
//!   its records may neither supersede others (they are not mapped) nor be changed (their
//!   batches, like everything else there, are copied as they are, even inside a segment that
//!   is rewritten). The LSO never goes backwards, so what was decided when the pass started
//!   stays decided.
//! - **Markers are kept, all of them**: never mapped (their 4-byte keys would otherwise
//!   supersede each other), never removed. Kafka removes a marker once its transaction's data
//!   is gone and the marker's own delete horizon has passed; Spool does not (yet), so a
//!   compacted partition keeps one small batch per transaction and partition.
//! - **Records of aborted transactions are removed** and are never mapped, so they never
//!   shadow a committed record of the same key (a read-committed reader would lose the
//!   committed value). A batch is aborted when it is transactional, not a marker, below the
//!   LSO, and the partition's aborted index says so for `(producer id, base offset)`.
//!   Read-uncommitted readers stop seeing aborted data once it is cleaned, as in Kafka.
//! - **The transaction state rebuilt at open stays the same.** Recovery walks batch headers
//!   (and markers) when the producer snapshot is missing: a marker for a producer with no open
//!   transaction is ignored, so when the cleaner removed every batch of an aborted transaction
//!   the rebuilt index simply has no entry for it (there is nothing left to hide), and when it
//!   removed only some of them (the rest lie at or past the LSO of that pass), the first batch
//!   left reopens the transaction and its marker aborts it again, from that offset. Markers
//!   are never removed, so every transaction that still has data is closed again by its own
//!   marker, and open transactions are past the LSO, untouched. The in-memory index and the
//!   snapshot keep the entries of aborted transactions whose data is gone (harmless, and
//!   readers holding a segment list from before a swap still need them): they count towards
//!   [`crate::Limits::max_aborted_txns_per_partition`] until retention passes them.
//!
//! # Safety argument
//!
//! A record is removed only if a later record with the same key stays (superseded; only
//! committed records below the LSO supersede), if it belongs to an aborted transaction (below
//! the LSO, so decided for good), or if it is a tombstone that is the latest record of its key
//! in the deduplicated part and every older record of its key has been removed: in the same
//! pass (all groups below `map_end` are rewritten in offset order, so older records go first,
//! aborted ones included), or by an earlier one (the clean section holds at most one record
//! per key: `first_dirty` only moves past segments that a pass rewrote, or found nothing to
//! remove in, with the whole map; a pass that abandons a group records nothing, step 4).
//! Groups swapped in before an abandoned one stay correct: what superseded their removed
//! records lies later in the log and stays, unless retention deleted it together with
//! everything before it. A batch the cleaner cannot decode (a corrupt
//! compressed payload) is kept as it is, and no tombstone is removed in a pass that met one,
//! since it could hide an older value of the tombstone's key. Every input batch's CRC is
//! checked before it is used, so the cleaner never launders damaged data into a batch with a
//! fresh CRC.
//!
//! # Not (yet) done, compared with Kafka
//!
//! No I/O throttling (`log.cleaner.io.max.bytes.per.second`); one cleaner thread; the last
//! batch of an idempotent producer is not kept specially (Kafka keeps it, even empty, so that
//! producer state can be rebuilt from the log: Spool rebuilds it from the producer snapshot
//! written at every roll, and only a lost snapshot makes a live producer's next batch fail
//! with an unknown-producer or sequence error; such a lost snapshot also forgets the epoch of
//! a transactional producer whose batches were all removed, so a zombie of an older epoch is
//! not fenced on that partition until the producer writes again); markers and aborted-index
//! entries are never removed (see [Transactions](#transactions)).

mod map;
mod records;
pub(crate) mod state;
pub(crate) mod swap;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::batch::{BatchError, BatchHeader};
use crate::config::{CleanerOptions, Limits, MAX_BATCH_BYTES, MAX_SEGMENT_BYTES};
use crate::error::{Error, Result};
use crate::partition::Partition;
use crate::partition::cleaner::CleanerView;
use crate::segment::{Chain, Segment};

use map::{OffsetMap, key_hash};
use records::{Rec, records_region, scan};
use state::State;
use swap::Output;

pub(crate) use swap::recover_dir;

/// Checks a batch appended to a compacted topic: every record has a key (else
/// [`BatchError::KeyRequired`]), and the cleaner can read it.
pub(crate) fn check_compactable(
    batch: &[u8],
    h: &BatchHeader,
    limits: &Limits,
) -> Result<(), BatchError> {
    records::check_compactable(batch, h, limits)
}

/// The offset rule of segment `i` of `found` (`(base, size)`, oldest first): sparse with the
/// next segment's base as limit if it may have been compacted, dense otherwise (always for the
/// last, active segment).
pub(crate) fn chain_of(found: &[(u64, u64)], i: usize, sparse_below: u64) -> Chain {
    match found.get(i + 1) {
        Some(&(next, _)) if found[i].0 < sparse_below => Chain::Sparse { limit: next },
        _ => Chain::Dense,
    }
}

/// Marks the sealed segments of `segs` below `sparse_below` as possibly compacted.
pub(crate) fn mark_sparse(segs: &[Arc<Segment>], sparse_below: u64) {
    for pair in segs.windows(2) {
        if pair[0].base_offset < sparse_below {
            pair[0].set_sparse(pair[1].base_offset);
        }
    }
}

/// The steps of a cleaning pass, in order, as seen by a test hook ([`Cleaner::set_hook`]).
/// "After" each step, everything it did is on disk (fsynced where the protocol says so).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// The key → offset map of the dirty section is built (nothing written yet).
    MapBuilt,
    /// `cleaner-state` records which segments may become sparse.
    StateSaved,
    /// The first batch of a group's output went to `NNN.log.cleaned` (not synced).
    OutputStarted,
    /// The group's `.cleaned` files are written and fdatasync'd.
    OutputWritten,
    /// Committed: `NNN.log.cleaned` renamed to `NNN.log.swap`, directory fsynced.
    Committed,
    /// The first old segment's files renamed to `*.deleted`.
    OldRenamed,
    /// All old segments renamed away, the new files renamed into place (directory not yet
    /// fsynced).
    Installed,
    /// The directory fsynced after the renames (the new list not yet published).
    Synced,
    /// The new segment list is published to readers.
    Published,
    /// The pass is over and `cleaner-state` records where the dirty section starts now.
    Finished,
}

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// True when a pass ran (it was due, or forced).
    pub ran: bool,
    /// Where the dirty section started.
    pub first_dirty: u64,
    /// Where the map stopped: offsets below it are deduplicated now.
    pub map_end: u64,
    /// End of what may be cleaned: the end of the cleanable segments, or the partition's last
    /// stable offset if lower (nothing at or past it is mapped or changed).
    pub cleanable_end: u64,
    /// Bytes of the cleanable segments.
    pub cleanable_bytes: u64,
    /// Bytes of the cleanable segments holding dirty data.
    pub dirty_bytes: u64,
    /// Distinct keys put in the map.
    pub keys: usize,
    /// Keys the map could hold in this pass.
    pub map_capacity: usize,
    /// True when the map filled up before the end of the dirty section.
    pub map_full: bool,
    /// Segments read and rewritten.
    pub segments_in: usize,
    /// Groups swapped in (a group whose records all survived is left as it was).
    pub groups_swapped: usize,
    /// Bytes of the segments rewritten (the input).
    pub bytes_in: u64,
    /// Bytes of what replaced them (unchanged groups counted as they are).
    pub bytes_out: u64,
    /// Records read by the rewrite.
    pub records_in: u64,
    /// Records removed (superseded, expired tombstones, keyless, aborted).
    pub records_removed: u64,
    /// Of which expired tombstones.
    pub tombstones_removed: u64,
    /// Of which records of aborted transactions.
    pub aborted_removed: u64,
    /// Batches rewritten (not copied as they were).
    pub batches_rewritten: u64,
    /// Batches the cleaner could not decode and kept as they were.
    pub batches_opaque: u64,
    /// The step at which a test hook stopped the pass, if it did.
    pub stopped_at: Option<Step>,
    /// True when the pass stopped early because the log is closing (or the partition's topic
    /// was deleted).
    pub interrupted: bool,
    /// True when a group could not be swapped in because retention removed part of it while
    /// the pass ran (or the partition was poisoned meanwhile): the pass stopped there without
    /// recording its progress in `cleaner-state` (the segments of that group and after it were
    /// not deduplicated), so the next pass maps them again. Logged at info level and counted
    /// ([`crate::Log::abandoned_cleaner_passes`]).
    pub abandoned: bool,
    /// Wall time of the pass.
    pub duration: Duration,
    /// Of which building the key map.
    pub map_duration: Duration,
    /// Of which making outputs durable and swapping them in (fdatasyncs, renames, directory
    /// fsyncs).
    pub sync_duration: Duration,
}

type Hook = Box<dyn FnMut(Step) -> bool + Send>;

/// Why a pass ends early.
enum Halt {
    /// A test hook said stop: leave everything as it is (a simulated crash).
    Hook(Step),
    /// The log is closing, or the partition's topic was deleted: clean up and return, writing
    /// nothing more.
    Shutdown,
    /// A group's swap (of the group starting at this base offset) was refused because its
    /// segments are no longer all listed (retention deleted some meanwhile) or the partition
    /// was poisoned: stop without recording progress (see the safety argument).
    Abandoned(u64),
    Failed(Error),
}

impl From<Error> for Halt {
    fn from(e: Error) -> Halt {
        Halt::Failed(e)
    }
}

/// Scratch buffers reused across batches.
#[derive(Debug, Default)]
struct Bufs {
    decompressed: Vec<u8>,
    body: Vec<u8>,
    out: Vec<u8>,
    /// Per record of a batch: `(hash of its key, offset)`.
    hashes: Vec<(u128, u64)>,
    /// Per record of a batch: the map's latest offset for its key (`None` for no key, or a
    /// key not in the map: see `write_group`).
    latest: Vec<Option<u64>>,
}

/// The log cleaner: one key → offset map (allocated on first use, then reused) and the
/// passes that use it. [`crate::Log`] runs one on its cleaner thread; tests and embedders can
/// run their own.
pub struct Cleaner {
    opts: CleanerOptions,
    map: Option<OffsetMap>,
    bufs: Bufs,
    hook: Option<Hook>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Cleaner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cleaner")
            .field("opts", &self.opts)
            .field("map_slots", &self.map.as_ref().map(OffsetMap::slots))
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

struct Pass<'a> {
    p: &'a Partition,
    v: &'a CleanerView,
    map_end: u64,
    /// Batches at or past it (the last stable offset) are copied as they are.
    cleanable_end: u64,
    /// True once the pass met a batch it cannot decode: no tombstone goes after that.
    saw_opaque: bool,
    next_horizon: i64,
}

impl Cleaner {
    /// A cleaner with these options. The map's memory is allocated by the first pass.
    pub fn new(opts: CleanerOptions) -> Cleaner {
        Cleaner {
            opts,
            map: None,
            bufs: Bufs::default(),
            hook: None,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Calls `hook` after each [`Step`] of every pass; when it returns false the pass stops
    /// right there and leaves the files as they are, as a crash would (for crash tests). A
    /// stop after [`Step::Committed`] also poisons the partition, which must then be reopened.
    /// The hook runs on the pass's thread while the pass holds the partition's cleaning lock:
    /// it must not delete the partition's topic there (the delete waits for the pass, which
    /// would wait for the hook: a deadlock); do that from another thread.
    pub fn set_hook(&mut self, hook: impl FnMut(Step) -> bool + Send + 'static) {
        self.hook = Some(Box::new(hook));
    }

    /// A flag that, once set, makes a running pass stop at the next batch.
    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Runs a pass on `p` if it is due (see the module docs); a partition of a topic that is
    /// not compacted is left alone.
    pub fn clean(&mut self, p: &Partition) -> Result<CleanReport> {
        self.run(p, false)
    }

    /// Runs a pass on `p` now, due or not (if its topic is compacted).
    pub fn clean_now(&mut self, p: &Partition) -> Result<CleanReport> {
        self.run(p, true)
    }

    fn run(&mut self, p: &Partition, force: bool) -> Result<CleanReport> {
        let started = Instant::now();
        let mut report = CleanReport::default();
        let res = self.pass(p, force, &mut report);
        report.duration = started.elapsed();
        match res {
            Ok(()) => Ok(report),
            Err(Halt::Hook(step)) => {
                report.stopped_at = Some(step);
                Ok(report)
            }
            Err(Halt::Shutdown) => {
                report.interrupted = true;
                Ok(report)
            }
            Err(Halt::Abandoned(group)) => {
                report.abandoned = true;
                p.note_abandoned_pass();
                tracing::info!(
                    topic = p.topic(),
                    partition = p.id(),
                    group_base = group,
                    "cleaner pass abandoned: retention removed part of a group while it was rewritten (or the partition was poisoned); the next pass maps it again"
                );
                Ok(report)
            }
            Err(Halt::Failed(e)) => Err(e),
        }
    }

    fn step(hook: &mut Option<Hook>, s: Step) -> Result<(), Halt> {
        if hook.as_mut().is_none_or(|h| h(s)) {
            Ok(())
        } else {
            Err(Halt::Hook(s))
        }
    }

    fn pass(&mut self, p: &Partition, force: bool, report: &mut CleanReport) -> Result<(), Halt> {
        // Held for the whole pass: deleting the topic waits for it (after closing `p`, which
        // makes the pass stop at its next check), so no pass of this handle outlives the
        // directory it works in (`Partition::close_deleted`).
        let _cleaning = p.cleaning();
        let v = p.cleaner_view()?;
        if !v.config.cleanup.compacts() {
            return Ok(());
        }
        let mut state = State::read(v.fs.as_ref(), &v.dir)?;
        let first_dirty = state.first_dirty.max(v.log_start);
        let end_of = |i: usize| v.sealed.get(i + 1).map_or(v.active_base, |s| s.base_offset);
        // The cleanable segments: sealed, old enough, and starting below the last stable
        // offset (a segment holding it is cleaned only below it).
        let lag = v.config.min_compaction_lag_ms as i64;
        let mut n = 0;
        for seg in &v.sealed {
            if seg.base_offset >= v.last_stable {
                break;
            }
            if lag > 0 {
                if seg.max_timestamp_hint().is_none() {
                    seg.time_floor(i64::MIN)?;
                }
                let newest = seg.max_timestamp_hint().unwrap_or(i64::MAX);
                if newest > v.now_ms.saturating_sub(lag) {
                    break;
                }
            }
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        let cleanable = &v.sealed[..n];
        let cleanable_end = end_of(n - 1).min(v.last_stable);
        for (i, s) in cleanable.iter().enumerate() {
            let size = s.written_end();
            report.cleanable_bytes += size;
            if end_of(i) > first_dirty {
                report.dirty_bytes += size;
            }
        }
        report.first_dirty = first_dirty;
        report.cleanable_end = cleanable_end;
        let pct = u64::from(v.config.min_cleanable_dirty_percent);
        let dirty_due = first_dirty < cleanable_end
            && report.dirty_bytes > 0
            && report.dirty_bytes * 100 >= report.cleanable_bytes * pct;
        if !(force || dirty_due || state.next_horizon <= v.now_ms) {
            return Ok(());
        }
        report.ran = true;

        // 1. The map of the dirty section, sized for its record count (from the batch headers)
        // so that a small pass touches a small table.
        let map_started = Instant::now();
        let mut dirty_records = 0u64;
        for (i, seg) in cleanable.iter().enumerate() {
            if end_of(i) <= first_dirty {
                continue;
            }
            check_halt(&self.stop, p)?;
            let data = p.cleaner_data(seg)?;
            for b in headers(seg, &data) {
                if b.next_offset() > first_dirty {
                    dirty_records += b.records_count.max(0) as u64;
                }
            }
        }
        let map = self
            .map
            .get_or_insert_with(|| OffsetMap::with_memory(self.opts.dedupe_buffer_bytes));
        map.reset(usize::try_from(dirty_records).unwrap_or(usize::MAX));
        report.map_capacity = map.capacity();
        let mut map_end = cleanable_end;
        'segments: for (i, seg) in cleanable.iter().enumerate() {
            if end_of(i) <= first_dirty {
                continue;
            }
            check_halt(&self.stop, p)?;
            let data = p.cleaner_data(seg)?;
            for b in batches(seg, &data) {
                check_halt(&self.stop, p)?;
                let (_, h, batch) = b?;
                if h.next_offset() <= first_dirty {
                    continue;
                }
                if h.base_offset >= cleanable_end {
                    // Past the last stable offset: transactions there may be undecided.
                    break 'segments;
                }
                // Markers are never deduplicated; records of aborted transactions must not
                // shadow committed ones (they are removed below).
                if h.is_control() || p.is_aborted_batch(&h) {
                    continue;
                }
                let Ok(region) = records_region(batch, &h, &v.limits, &mut self.bufs.decompressed)
                else {
                    continue;
                };
                // Hash every key of the batch first, then insert: the map's cache misses
                // then overlap instead of waiting for each other.
                let hashes = &mut self.bufs.hashes;
                hashes.clear();
                let scanned = scan(region, h.records_count, &v.limits).try_for_each(|r| {
                    let r = r?;
                    let offset = h.base_offset.wrapping_add(r.offset_delta as u64);
                    if let Some(key) = r.key
                        && offset >= first_dirty
                    {
                        hashes.push((key_hash(key), offset));
                    }
                    Ok::<_, BatchError>(())
                });
                if scanned.is_err() {
                    continue;
                }
                for &(hash, offset) in hashes.iter() {
                    if !map.insert(hash, offset) {
                        map_end = offset;
                        report.map_full = true;
                        break 'segments;
                    }
                }
            }
        }
        report.keys = map.len();
        report.map_end = map_end;
        report.map_duration = map_started.elapsed();
        Self::step(&mut self.hook, Step::MapBuilt)?;

        // 2. The segments to rewrite, in groups, and which of them may become sparse.
        let m = cleanable
            .iter()
            .take_while(|s| s.base_offset < map_end)
            .count();
        let max_group = v.config.segment_bytes.min(MAX_SEGMENT_BYTES);
        let groups = group(&cleanable[..m], &end_of, max_group);
        let groups_end = end_of(m.max(1) - 1);
        if state.sparse_below < groups_end {
            state.sparse_below = groups_end;
            check_halt(&self.stop, p)?;
            state.write(v.fs.as_ref(), &v.dir)?;
        }
        Self::step(&mut self.hook, Step::StateSaved)?;

        let mut pass = Pass {
            p,
            v: &v,
            map_end,
            cleanable_end,
            saw_opaque: false,
            next_horizon: i64::MAX,
        };
        for g in groups {
            let limit = end_of(g.end - 1);
            self.clean_group(&mut pass, &cleanable[g], limit, report)?;
        }

        // 4. Where the dirty section starts now.
        state.first_dirty = map_end;
        state.next_horizon = pass.next_horizon;
        check_halt(&self.stop, p)?;
        state.write(v.fs.as_ref(), &v.dir)?;
        Self::step(&mut self.hook, Step::Finished)?;
        tracing::debug!(
            topic = p.topic(),
            partition = p.id(),
            map_end,
            keys = report.keys,
            removed = report.records_removed,
            bytes_in = report.bytes_in,
            bytes_out = report.bytes_out,
            "cleaned partition"
        );
        Ok(())
    }

    fn clean_group(
        &mut self,
        pass: &mut Pass<'_>,
        segs: &[Arc<Segment>],
        limit: u64,
        report: &mut CleanReport,
    ) -> Result<(), Halt> {
        let v = pass.v;
        let base = segs[0].base_offset;
        let interval = v.config.index_interval_bytes;
        let mut out = Output::create(&v.fs, &v.dir, base, interval)?;
        let written = self.write_group(pass, segs, &mut out, report);
        let changed = match written {
            Ok(changed) => changed,
            Err(Halt::Hook(s)) => return Err(Halt::Hook(s)),
            Err(e) => {
                drop(out);
                swap::discard(v.fs.as_ref(), &v.dir, base);
                return Err(e);
            }
        };
        report.segments_in += segs.len();
        let bytes_in: u64 = segs.iter().map(|s| s.written_end()).sum();
        report.bytes_in += bytes_in;
        if !changed {
            drop(out);
            swap::discard(v.fs.as_ref(), &v.dir, base);
            report.bytes_out += bytes_in;
            return Ok(());
        }
        let sync_started = Instant::now();
        let fin = match out.finish() {
            Ok(f) => f,
            Err(e) => {
                swap::discard(v.fs.as_ref(), &v.dir, base);
                return Err(e.into());
            }
        };
        Self::step(&mut self.hook, Step::OutputWritten)?;
        let new = Arc::new(Segment::sealed(&v.fs, &v.dir, base, fin.size, interval));
        new.set_sparse(limit);
        new.note_timestamp(fin.max_timestamp);
        let dir = &v.dir;
        let fs = v.fs.as_ref();
        let hook = &mut self.hook;
        let mut stopped = None;
        let mut at = |s: Step| {
            let go = hook.as_mut().is_none_or(|h| h(s));
            if !go {
                stopped = Some(s);
            }
            go
        };
        let swapped = pass.p.replace_segments(segs, new, || {
            swap::commit(fs, dir, base)?;
            if !at(Step::Committed) {
                return Ok(false);
            }
            for (i, s) in segs.iter().enumerate() {
                s.mark_replaced(&pass.p.next_replace_id())?;
                if i == 0 && !at(Step::OldRenamed) {
                    return Ok(false);
                }
            }
            swap::install(fs, dir, base)?;
            if !at(Step::Installed) {
                return Ok(false);
            }
            crate::fsutil::sync_dir(fs, dir)?;
            Ok(at(Step::Synced))
        });
        report.sync_duration += sync_started.elapsed();
        if let Some(s) = stopped {
            return Err(Halt::Hook(s));
        }
        if !swapped? {
            // Retention removed part of the group meanwhile, or the partition closed. Either
            // way the pass stops here, before `first_dirty` moves past segments that were
            // never deduplicated: a later pass would otherwise give a tombstone there a
            // horizon and remove it while an older value of its key stays (finding 1 of
            // review-audit-engine).
            swap::discard(v.fs.as_ref(), &v.dir, base);
            report.bytes_out += bytes_in;
            return Err(if pass.p.closed_error().is_some() {
                Halt::Shutdown
            } else {
                Halt::Abandoned(base)
            });
        }
        report.groups_swapped += 1;
        report.bytes_out += fin.size;
        Self::step(&mut self.hook, Step::Published)
    }

    /// Writes the survivors of `segs` to `out`; true if anything changed.
    fn write_group(
        &mut self,
        pass: &mut Pass<'_>,
        segs: &[Arc<Segment>],
        out: &mut Output,
        report: &mut CleanReport,
    ) -> Result<bool, Halt> {
        let v = pass.v;
        let map = self.map.as_ref().expect("built by the pass");
        let now = v.now_ms;
        let mut changed = false;
        let mut started = false;
        for seg in segs {
            check_halt(&self.stop, pass.p)?;
            let data = pass.p.cleaner_data(seg)?;
            for b in batches(seg, &data) {
                check_halt(&self.stop, pass.p)?;
                let (_, h, batch) = b?;
                report.records_in += h.records_count.max(0) as u64;
                if h.base_offset >= pass.cleanable_end || h.is_control() {
                    // Past the last stable offset (undecided transactions, or data a
                    // read-committed reader cannot see yet), or a marker: kept as it is.
                    out.append(batch, &h)?;
                    if !started {
                        started = true;
                        Self::step(&mut self.hook, Step::OutputStarted)?;
                    }
                    continue;
                }
                if pass.p.is_aborted_batch(&h) {
                    // Below the LSO, so its transaction is decided: aborted for good.
                    let n = h.records_count.max(0) as u64;
                    report.records_removed += n;
                    report.aborted_removed += n;
                    changed = true;
                    continue;
                }
                let bufs = &mut self.bufs;
                let region = match records_region(batch, &h, &v.limits, &mut bufs.decompressed) {
                    Ok(r) => r,
                    Err(_) => {
                        pass.saw_opaque = true;
                        report.batches_opaque += 1;
                        out.append(batch, &h)?;
                        continue;
                    }
                };
                let mut recs: Vec<Rec<'_>> = Vec::with_capacity(h.records_count.max(0) as usize);
                let parsed = scan(region, h.records_count, &v.limits)
                    .try_for_each(|r| r.map(|r| recs.push(r)));
                if parsed.is_err() || recs.iter().any(|r| r.offset_delta < 0) {
                    pass.saw_opaque = true;
                    report.batches_opaque += 1;
                    out.append(batch, &h)?;
                    continue;
                }
                let horizon = h.delete_horizon();
                let n = recs.len();
                // The map's answers for the whole batch first (overlapping cache misses).
                bufs.latest.clear();
                bufs.latest.extend(
                    recs.iter()
                        .map(|r| r.key.and_then(|k| map.get(key_hash(k)))),
                );
                let (mut tombstones, mut expired) = (false, 0u64);
                let mut latest = bufs.latest.iter();
                recs.retain(|r| {
                    let latest = latest.next().copied().flatten();
                    if r.key.is_none() {
                        return false;
                    }
                    let offset = h.base_offset + r.offset_delta as u64;
                    if latest.is_some_and(|m| m > offset) {
                        return false;
                    }
                    if r.tombstone {
                        let gone = offset < pass.map_end
                            && !pass.saw_opaque
                            && horizon.is_some_and(|t| now >= t);
                        if gone {
                            expired += 1;
                            return false;
                        }
                        tombstones = true;
                    }
                    true
                });
                report.records_removed += (n - recs.len()) as u64;
                report.tombstones_removed += expired;
                if recs.is_empty() {
                    changed = true;
                    continue;
                }
                let new_horizon = (tombstones && horizon.is_none())
                    .then(|| now.saturating_add(v.config.delete_retention_ms as i64));
                if tombstones
                    && let Some(t) = new_horizon.or(horizon)
                    && !(pass.saw_opaque && t <= now)
                {
                    pass.next_horizon = pass.next_horizon.min(t);
                }
                if recs.len() == n && new_horizon.is_none() {
                    out.append(batch, &h)?;
                } else {
                    records::rebuild(batch, &h, &recs, new_horizon, &mut bufs.body, &mut bufs.out)
                        .map_err(Error::from)?;
                    if bufs.out.len() > MAX_BATCH_BYTES as usize {
                        // Re-encoding grew it past what readers accept: keep it as it was.
                        out.append(batch, &h)?;
                    } else {
                        let nh = BatchHeader::parse(&bufs.out).map_err(Error::from)?;
                        out.append(&bufs.out, &nh)?;
                        report.batches_rewritten += 1;
                        changed = true;
                    }
                }
                if !started {
                    started = true;
                    Self::step(&mut self.hook, Step::OutputStarted)?;
                }
            }
        }
        Ok(changed)
    }
}

/// Ends a pass when the log is closing (`stop`) or `p` is closed. A closed partition's topic
/// may have been deleted, and a topic of the same name re-created in the same directory: the
/// pass must not read or write anything there by name (a stale `cleaner-state` would make the
/// new partition skip deduplication and its segment-chain checks).
fn check_halt(stop: &AtomicBool, p: &Partition) -> Result<(), Halt> {
    if stop.load(Ordering::Relaxed) || p.is_closed() {
        Err(Halt::Shutdown)
    } else {
        Ok(())
    }
}

/// Splits `segs` into runs of consecutive segments of at most `max_bytes` together (a larger
/// segment alone), each spanning at most `i32::MAX` offsets (index entries are relative to
/// the first segment's base).
fn group(
    segs: &[Arc<Segment>],
    end_of: &dyn Fn(usize) -> u64,
    max_bytes: u64,
) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < segs.len() {
        let start = i;
        let mut size = segs[i].written_end();
        i += 1;
        while i < segs.len()
            && size + segs[i].written_end() <= max_bytes
            && end_of(i) - segs[start].base_offset <= i32::MAX as u64
        {
            size += segs[i].written_end();
            i += 1;
        }
        out.push(start..i);
    }
    out
}

/// The headers of a sealed segment's batches, unchecked, up to the first that does not parse:
/// for estimates only.
fn headers<'a>(seg: &'a Segment, data: &'a [u8]) -> impl Iterator<Item = BatchHeader> + 'a {
    let end = (seg.readable_end() as usize).min(data.len());
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let h = BatchHeader::parse(data.get(pos..end)?).ok()?;
        pos = pos.checked_add(h.total_len())?;
        Some(h)
    })
}

/// The batches of a sealed segment, each checked: header, bounds, offsets (the segment's
/// chain) and CRC. A bad one is [`Error::Corruption`]: the cleaner stops rather than copy
/// damage into a batch with a fresh CRC.
fn batches<'a>(
    seg: &'a Segment,
    data: &'a [u8],
) -> impl Iterator<Item = Result<(u64, BatchHeader, &'a [u8])>> + 'a {
    let end = (seg.readable_end() as usize).min(data.len());
    let chain = seg.chain();
    let mut pos = 0usize;
    let mut next = seg.base_offset;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || pos >= end {
            return None;
        }
        let rest = &data[pos..end];
        let res = BatchHeader::parse(rest)
            .map_err(|e| e.to_string())
            .and_then(|h| {
                if h.total_len() > rest.len() {
                    return Err(format!(
                        "batch of {} bytes runs past the end",
                        h.total_len()
                    ));
                }
                if let Some(p) = chain.check(&h, next) {
                    return Err(p);
                }
                if h.records_count <= 0 || h.last_offset_delta < 0 {
                    return Err(format!(
                        "batch has {} records, last offset delta {}",
                        h.records_count, h.last_offset_delta
                    ));
                }
                crate::batch::check_crc(&rest[..h.total_len()], &h).map_err(|e| e.to_string())?;
                Ok(h)
            });
        Some(match res {
            Ok(h) => {
                let at = pos as u64;
                let batch = &rest[..h.total_len()];
                pos += h.total_len();
                next = h.next_offset();
                Ok((at, h, batch))
            }
            Err(reason) => {
                failed = true;
                Err(Error::corruption(
                    seg.log_path(),
                    pos as u64,
                    Some(next),
                    reason,
                ))
            }
        })
    })
}
