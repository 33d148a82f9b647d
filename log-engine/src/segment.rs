//! One segment: a `NNN.log` file of concatenated batches plus its two sparse indexes.
//!
//! Invariants:
//! - The file name's 20-digit number is the base offset of the first batch; batches inside
//!   are contiguous, their offsets dense and increasing.
//!   After compaction ([`crate::compact`]) a sealed segment is *sparse*: offsets still
//!   increase, but whole batches (and records inside batches) may be missing; such a segment
//!   knows it ([`Segment::chain`]) and every offset in it stays below the next segment's base.
//! - Readers never look past `readable_end`, which the writer publishes (Release) only after the
//!   bytes below it are complete (and, under `fsync = always`, durable).
//! - While a segment is active, only the partition writer appends to its file (and, under
//!   `fsync = always`, writes zeros past its end: the file may be longer than the data, whose
//!   end is `written_end`, never the file's size); once sealed (cut to its last batch first),
//!   the file is never modified again (the cleaner replaces it whole by a new file). A
//!   retention-deleted or cleaner-replaced segment's files are renamed to `*.deleted` and
//!   unlinked only when the last mapping of them is dropped.
//! - Every length taken from the file is checked against the bytes present and against
//!   [`crate::config::MAX_BATCH_BYTES`] before use.
//! - Reads of the active segment go through one map made past the file's end
//!   ([`spool_io::FileHandle::map_ahead`], [`MAP_AHEAD_BYTES`] at a time) and re-sliced as the
//!   file grows, never past `written_end`: a tail reader that follows the writer does not
//!   map, fault in and unmap the whole file again after every append.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use bytes::Bytes;
use spool_io::{FileHandle, FileSystem, MapAhead, OpenMode};

use crate::batch::{self, BatchHeader};
use crate::config::MAX_BATCH_BYTES;
use crate::error::{Error, Result};
use crate::index::{self, Kind, SegmentSummary};

/// Name of a segment's log file.
pub(crate) fn log_name(base: u64) -> String {
    format!("{base:020}.log")
}

/// The bytes of the segment file `path`, for the offline tools: refused (`Corruption`), before
/// anything is allocated for them, when the file is longer than any segment can be
/// ([`crate::config::MAX_SEGMENT_FILE_BYTES`]).
pub(crate) fn read_segment_file(fs: &dyn FileSystem, path: &Path) -> Result<Vec<u8>> {
    let max = crate::config::MAX_SEGMENT_FILE_BYTES;
    let too_large = || {
        Err(Error::corruption(
            path,
            max,
            None,
            format!("segment file larger than any segment can be ({max} bytes)"),
        ))
    };
    // The size first (the bound is large: reading it to find out would cost gigabytes), then
    // a read that stays bounded even if the file grew meanwhile.
    let size = fs
        .metadata(path)
        .map_err(|e| Error::io("stat", path, e))?
        .len;
    if size > max {
        return too_large();
    }
    let data = fs
        .read_at_most(path, max as usize)
        .map_err(|e| Error::io("read", path, e))?;
    if data.len() as u64 > max {
        return too_large();
    }
    Ok(data)
}

/// The largest an index file of a segment of `log_size` bytes can be: one entry (at most 12
/// bytes) per batch (at least 61 bytes), after the header. Longer ones are refused unread.
pub(crate) fn max_index_file_bytes(log_size: u64) -> usize {
    usize::try_from(index::HEADER_LEN as u64 + log_size).unwrap_or(usize::MAX - 1)
}

/// Parses `NNNNNNNNNNNNNNNNNNNN.log` into its base offset.
pub(crate) fn parse_log_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Paths of a segment's files; unlinks them on drop once retention (or the cleaner) marked
/// them deleted.
#[derive(Debug)]
pub(crate) struct SegmentFiles {
    fs: Arc<dyn FileSystem>,
    pub(crate) log: PathBuf,
    pub(crate) index: PathBuf,
    pub(crate) timeindex: PathBuf,
    deleted: AtomicBool,
    /// What the files were renamed with: `.deleted` (retention) or `.<n>.deleted` (the cleaner,
    /// whose replacement file takes the same name, so a later replacement must not collide).
    /// Set before `deleted`.
    deleted_suffix: OnceLock<String>,
}

fn deleted_name(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl SegmentFiles {
    fn new(fs: Arc<dyn FileSystem>, dir: &Path, base: u64) -> SegmentFiles {
        SegmentFiles {
            fs,
            log: dir.join(log_name(base)),
            index: dir.join(format!("{base:020}.index")),
            timeindex: dir.join(format!("{base:020}.timeindex")),
            deleted: AtomicBool::new(false),
            deleted_suffix: OnceLock::new(),
        }
    }

    /// Where the file `p` (one of the three) is now: renamed once deleted.
    fn current(&self, p: &Path) -> PathBuf {
        if self.deleted.load(Ordering::Acquire) {
            deleted_name(
                p,
                self.deleted_suffix.get().map_or(".deleted", String::as_str),
            )
        } else {
            p.to_path_buf()
        }
    }

    fn current_log_path(&self) -> PathBuf {
        self.current(&self.log)
    }
}

impl Drop for SegmentFiles {
    fn drop(&mut self) {
        if *self.deleted.get_mut() {
            let suffix = self.deleted_suffix.get().map_or(".deleted", String::as_str);
            for p in [&self.log, &self.index, &self.timeindex] {
                let d = deleted_name(p, suffix);
                if let Err(e) = self.fs.remove_file(&d)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %d.display(), error = %e, "could not remove deleted segment file");
                }
            }
        }
    }
}

/// Index state of a segment.
#[derive(Debug)]
enum IndexState {
    /// Sealed, not loaded yet (or evicted).
    Unloaded,
    /// In memory: the active segment, appended by the writer.
    Mem { offsets: Vec<u8>, times: Vec<u8> },
    /// Sealed and memory-mapped.
    Mapped { offsets: Bytes, times: Bytes },
}

/// Index entries due after one batch: an offset entry `(relative offset, position)` and, when
/// the maximum timestamp grew, a time entry `(max timestamp so far, relative offset)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entries {
    pub(crate) offset: (u32, u32),
    pub(crate) time: Option<(i64, u32)>,
}

impl Entries {
    /// Appends the entries to in-memory index buffers.
    pub(crate) fn push_to(self, offsets: &mut Vec<u8>, times: &mut Vec<u8>) {
        index::push_offset(offsets, self.offset.0, self.offset.1);
        if let Some((ts, rel)) = self.time {
            index::push_time(times, ts, rel);
        }
    }
}

/// Bookkeeping that decides where index entries go; used by the writer on append and by
/// recovery and rebuilds while scanning.
#[derive(Clone, Debug)]
pub(crate) struct IndexBuilder {
    base: u64,
    interval: u64,
    last_indexed_pos: Option<u64>,
    pub(crate) max_timestamp: i64,
    last_time_ts: i64,
}

impl IndexBuilder {
    pub(crate) fn new(base: u64, interval: u32) -> IndexBuilder {
        IndexBuilder {
            base,
            interval: u64::from(interval),
            last_indexed_pos: None,
            max_timestamp: -1,
            last_time_ts: i64::MIN,
        }
    }

    /// Accounts for the batch `h` written at `pos`; returns entries to add, if any.
    pub(crate) fn observe(&mut self, pos: u64, h: &BatchHeader) -> Option<Entries> {
        self.max_timestamp = self.max_timestamp.max(h.max_timestamp);
        let due = self
            .last_indexed_pos
            .is_none_or(|last| pos - last >= self.interval);
        if !due {
            return None;
        }
        self.last_indexed_pos = Some(pos);
        let rel = (h.base_offset - self.base) as u32;
        let time = (self.max_timestamp > self.last_time_ts).then(|| {
            self.last_time_ts = self.max_timestamp;
            (self.max_timestamp, rel)
        });
        Some(Entries {
            offset: (rel, pos as u32),
            time,
        })
    }
}

/// Result of walking the batches of a byte range.
#[derive(Debug)]
pub(crate) struct Walk {
    /// Position after the last good batch.
    pub(crate) end: u64,
    /// Offset after the last good batch.
    pub(crate) next_offset: u64,
    /// Why the walk stopped early, with the position of the bad batch.
    pub(crate) stopped: Option<(u64, String)>,
}

/// How the offsets of consecutive batches must follow each other in a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Chain {
    /// Each batch starts at the offset after the previous one: every segment that was never
    /// compacted.
    Dense,
    /// A segment the cleaner may have rewritten: batches may skip offsets (whole batches were
    /// removed) but never go back, and every offset stays below `limit` (the next segment's
    /// base offset).
    Sparse {
        /// The next segment's base offset.
        limit: u64,
    },
}

impl Chain {
    /// Why a batch `h` cannot follow when `next_offset` is expected, if it cannot.
    pub(crate) fn check(self, h: &BatchHeader, next_offset: u64) -> Option<String> {
        match self {
            Chain::Dense if h.base_offset != next_offset => Some(format!(
                "batch has base offset {}, expected {next_offset}",
                h.base_offset
            )),
            Chain::Sparse { .. } if h.base_offset < next_offset => Some(format!(
                "batch has base offset {}, expected at least {next_offset}",
                h.base_offset
            )),
            Chain::Sparse { limit } if h.last_offset_delta >= 0 && h.next_offset() > limit => {
                Some(format!(
                    "batch ends at offset {}, past the next segment's base {limit}",
                    h.last_offset()
                ))
            }
            _ => None,
        }
    }
}

/// True when `data[from..]` is not empty, at most `max_len` bytes long and holds only zeros:
/// after the last batch of the active segment, past the recovery point, with zeroing on and
/// within `max_len`, its zero tail (zeros written ahead of the writer under `fsync = always`,
/// `partition/writer.rs`), which is end-of-data rather than a torn write. The same bytes can
/// also be appended data a crash or a disk fault left as zeros: content cannot tell the two
/// apart, so the callers decide the rest (last segment, past the recovery point, zeroing
/// possible, the length bound; recovery also calls this with no bound only to word its
/// warning); a sealed segment is cut to its last batch before it is sealed.
pub(crate) fn is_zero_tail(data: &[u8], from: u64, max_len: u64) -> bool {
    usize::try_from(from)
        .ok()
        .and_then(|f| data.get(f..))
        .is_some_and(|t| !t.is_empty() && t.len() as u64 <= max_len && t.iter().all(|&b| b == 0))
}

/// Walks batches in `data[from..end]`, expecting the first to start at `next_offset`,
/// optionally verifying CRCs, and feeding each to `each`. Stops at the first bad batch.
pub(crate) fn walk(
    data: &[u8],
    from: u64,
    end: u64,
    next_offset: u64,
    verify_crc: bool,
    each: impl FnMut(u64, &BatchHeader),
) -> Walk {
    walk_chain(data, from, end, next_offset, Chain::Dense, verify_crc, each)
}

/// [`walk`] with the offset rule of `chain`: for a sparse segment, `next_offset` is the lowest
/// offset the first batch may start at.
pub(crate) fn walk_chain(
    data: &[u8],
    from: u64,
    end: u64,
    mut next_offset: u64,
    chain: Chain,
    verify_crc: bool,
    mut each: impl FnMut(u64, &BatchHeader),
) -> Walk {
    let mut pos = from;
    let end = end.min(data.len() as u64);
    while pos < end {
        let rest = &data[pos as usize..end as usize];
        let h = match BatchHeader::parse(rest) {
            Ok(h) => h,
            Err(e) => {
                return Walk {
                    end: pos,
                    next_offset,
                    stopped: Some((pos, e.to_string())),
                };
            }
        };
        let problem = if h.total_len() > rest.len() {
            Some(format!(
                "batch of {} bytes runs past the end ({} bytes left)",
                h.total_len(),
                rest.len()
            ))
        } else if h.total_len() > MAX_BATCH_BYTES as usize {
            Some(format!(
                "batch length {} over the hard limit",
                h.total_len()
            ))
        } else if let Some(p) = chain.check(&h, next_offset) {
            Some(p)
        } else if h.records_count <= 0 || h.last_offset_delta < 0 {
            Some(format!(
                "batch has {} records, last offset delta {}",
                h.records_count, h.last_offset_delta
            ))
        } else if verify_crc {
            batch::check_crc(&rest[..h.total_len()], &h)
                .err()
                .map(|e| e.to_string())
        } else {
            None
        };
        if let Some(p) = problem {
            return Walk {
                end: pos,
                next_offset,
                stopped: Some((pos, p)),
            };
        }
        each(pos, &h);
        next_offset = h.next_offset();
        pos += h.total_len() as u64;
    }
    Walk {
        end: pos,
        next_offset,
        stopped: None,
    }
}

/// Both sparse indexes of a segment, built by walking its batches as the writer indexed them
/// when appending (same [`IndexBuilder`], same interval), so that an intact segment gets back
/// byte-identical index files.
#[derive(Debug)]
pub(crate) struct BuiltIndex {
    /// What both index headers record.
    pub(crate) summary: SegmentSummary,
    /// Offset entries.
    pub(crate) offsets: Vec<u8>,
    /// Time entries.
    pub(crate) times: Vec<u8>,
    /// Batches walked.
    pub(crate) batches: u64,
    /// Records in them (from the batch headers).
    pub(crate) records: u64,
}

impl BuiltIndex {
    /// The two index files' images, `(.index, .timeindex)`.
    pub(crate) fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        (
            index::encode_file(Kind::Offset, &self.summary, &self.offsets),
            index::encode_file(Kind::Time, &self.summary, &self.times),
        )
    }
}

/// Builds the indexes of a whole segment image `data` (base offset `base`, offsets following
/// `chain`), optionally CRC-checking every batch. A bad batch anywhere is an error naming
/// `path`, the position and the offset expected there: an index must describe every byte of
/// the segment (its header records the file size), so it is never built for part of one.
pub(crate) fn build_index(
    path: &Path,
    data: &[u8],
    base: u64,
    interval: u32,
    chain: Chain,
    verify_crc: bool,
) -> Result<BuiltIndex> {
    let size = u32::try_from(data.len())
        .map_err(|_| Error::corruption(path, 0, Some(base), "segment is larger than 4 GiB"))?;
    let mut b = IndexBuilder::new(base, interval);
    let (mut offsets, mut times) = (Vec::new(), Vec::new());
    let (mut batches, mut records) = (0u64, 0u64);
    let w = walk_chain(
        data,
        0,
        data.len() as u64,
        base,
        chain,
        verify_crc,
        |pos, h| {
            batches += 1;
            records += h.records_count.max(0) as u64;
            if let Some(e) = b.observe(pos, h) {
                e.push_to(&mut offsets, &mut times);
            }
        },
    );
    if let Some((pos, reason)) = w.stopped {
        return Err(Error::corruption(path, pos, Some(w.next_offset), reason));
    }
    Ok(BuiltIndex {
        summary: SegmentSummary {
            base_offset: base,
            last_offset: w.next_offset.saturating_sub(1),
            max_timestamp: b.max_timestamp,
            log_size: size,
        },
        offsets,
        times,
        batches,
        records,
    })
}

/// The active segment's mapping is made this far ahead of what is written, rounded up to a
/// multiple of it: one `mmap` per 64 MiB appended instead of one per read of new data. Address
/// space only; pages are faulted in as readers touch written bytes.
pub(crate) const MAP_AHEAD_BYTES: u64 = 64 << 20;

/// A segment's mappings: what readers get, and (active segment only) the map ahead it is a view
/// of.
#[derive(Debug, Default)]
struct Maps {
    /// The file's bytes `[0, data.len())`; empty when not mapped.
    data: Bytes,
    /// Active segment: the map past the end that `data` is a view of (module docs).
    ahead: Option<MapAhead>,
}

/// A segment shared by the writer and readers.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: u64,
    /// The topic's `index_interval_bytes` when the segment was opened: a rebuilt index uses it,
    /// as the writer did.
    index_interval: u32,
    files: Arc<SegmentFiles>,
    /// Bytes readers may read.
    readable_end: AtomicU64,
    /// Bytes written to the file (>= readable_end).
    written_end: AtomicU64,
    /// Largest record timestamp; `i64::MIN` while unknown (sealed, index not loaded).
    max_timestamp: AtomicI64,
    /// Write handle while active; `None` once sealed.
    active_file: Mutex<Option<Arc<dyn FileHandle>>>,
    map: Mutex<Maps>,
    index: RwLock<IndexState>,
    /// LRU tick of the last mapping use.
    pub(crate) last_used: AtomicU64,
    /// 0 for a dense segment; for one the cleaner may have rewritten (sparse offsets), the
    /// next segment's base offset, below which all its offsets lie. See [`Chain`].
    sparse_limit: AtomicU64,
}

impl Segment {
    /// A sealed segment found on disk (`size` bytes); nothing is opened until first use.
    pub(crate) fn sealed(
        fs: &Arc<dyn FileSystem>,
        dir: &Path,
        base: u64,
        size: u64,
        index_interval: u32,
    ) -> Segment {
        Segment {
            base_offset: base,
            index_interval,
            files: Arc::new(SegmentFiles::new(fs.clone(), dir, base)),
            readable_end: AtomicU64::new(size),
            written_end: AtomicU64::new(size),
            max_timestamp: AtomicI64::new(i64::MIN),
            active_file: Mutex::new(None),
            map: Mutex::new(Maps::default()),
            index: RwLock::new(IndexState::Unloaded),
            last_used: AtomicU64::new(0),
            sparse_limit: AtomicU64::new(0),
        }
    }

    /// The active segment, with the writer's file handle and its in-memory index.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn active(
        fs: &Arc<dyn FileSystem>,
        dir: &Path,
        base: u64,
        index_interval: u32,
        file: Arc<dyn FileHandle>,
        size: u64,
        offsets: Vec<u8>,
        times: Vec<u8>,
        max_timestamp: i64,
    ) -> Segment {
        Segment {
            base_offset: base,
            index_interval,
            files: Arc::new(SegmentFiles::new(fs.clone(), dir, base)),
            readable_end: AtomicU64::new(size),
            written_end: AtomicU64::new(size),
            max_timestamp: AtomicI64::new(max_timestamp),
            active_file: Mutex::new(Some(file)),
            map: Mutex::new(Maps::default()),
            index: RwLock::new(IndexState::Mem { offsets, times }),
            last_used: AtomicU64::new(0),
            sparse_limit: AtomicU64::new(0),
        }
    }

    /// Marks a sealed segment as possibly compacted: its offsets may skip, and all of them
    /// lie below `limit`, the next segment's base offset.
    pub(crate) fn set_sparse(&self, limit: u64) {
        self.sparse_limit.store(limit.max(1), Ordering::Release);
    }

    /// The offset rule of this segment's batches.
    pub(crate) fn chain(&self) -> Chain {
        match self.sparse_limit.load(Ordering::Acquire) {
            0 => Chain::Dense,
            limit => Chain::Sparse { limit },
        }
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.files.log
    }

    pub(crate) fn readable_end(&self) -> u64 {
        self.readable_end.load(Ordering::Acquire)
    }

    pub(crate) fn written_end(&self) -> u64 {
        self.written_end.load(Ordering::Acquire)
    }

    pub(crate) fn publish_written(&self, end: u64) {
        self.written_end.fetch_max(end, Ordering::AcqRel);
    }

    pub(crate) fn publish_readable(&self, end: u64) {
        self.readable_end.fetch_max(end, Ordering::AcqRel);
    }

    pub(crate) fn note_timestamp(&self, ts: i64) {
        self.max_timestamp.fetch_max(ts, Ordering::AcqRel);
    }

    /// Largest timestamp, if known without loading anything.
    pub(crate) fn max_timestamp_hint(&self) -> Option<i64> {
        let t = self.max_timestamp.load(Ordering::Acquire);
        (t != i64::MIN).then_some(t)
    }

    pub(crate) fn is_mapped(&self) -> bool {
        !lock(&self.map).data.is_empty()
    }

    /// Drops the mapping and a mapped index (sealed segments only); readers holding slices
    /// keep their own reference.
    pub(crate) fn unmap(&self) {
        if lock(&self.active_file).is_some() {
            return;
        }
        *lock(&self.map) = Maps::default();
        let mut idx = self.index.write().unwrap_or_else(|p| p.into_inner());
        if matches!(*idx, IndexState::Mapped { .. }) {
            *idx = IndexState::Unloaded;
        }
    }

    /// Returns a mapping covering at least `need` bytes (for the grown active file, a longer
    /// view of its map ahead, or a new map ahead once it is outgrown). The second value is
    /// true when a new mapping was made.
    pub(crate) fn data(&self, need: u64) -> Result<(Bytes, bool)> {
        let mut map = lock(&self.map);
        if map.data.len() as u64 >= need {
            return Ok((map.data.clone(), false));
        }
        let len = self.written_end().max(need);
        // The active segment: a view of the map ahead when it reaches that far (no system
        // call), else a new map ahead. `len` bytes are written (`written_end` is published
        // after the write), so the view never reaches past the file's end.
        if let Some(ahead) = map.ahead.as_ref().filter(|a| a.capacity() as u64 >= len) {
            map.data = ahead.view(len as usize);
            return Ok((map.data.clone(), false));
        }
        let active = lock(&self.active_file).clone();
        if let Some(f) = &active {
            let capacity = len.div_ceil(MAP_AHEAD_BYTES).max(1) * MAP_AHEAD_BYTES;
            let ahead = usize::try_from(capacity)
                .ok()
                .map(|c| f.map_ahead(c, Box::new(self.files.clone())))
                .transpose()
                .map_err(|e| Error::io("mmap", self.log_path(), e))?
                .flatten();
            if let Some(ahead) = ahead {
                map.data = ahead.view(len as usize);
                map.ahead = Some(ahead);
                return Ok((map.data.clone(), true));
            }
        }
        let file = match active {
            Some(f) => f,
            None => {
                let path = self.files.current_log_path();
                let fs = &self.files.fs;
                let f = fs
                    .open(&path, OpenMode::Read)
                    .or_else(|e| {
                        if e.kind() == std::io::ErrorKind::NotFound {
                            fs.open(&self.files.current_log_path(), OpenMode::Read)
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| Error::io("open", &path, e))?;
                // Opened by name: never map past its end (touching a mapped page past a
                // file's end is SIGBUS). A sealed segment's file holds `written_end` bytes,
                // so a shorter one is not this segment's file any more (damaged, or replaced
                // under the same name).
                let size = f.size().map_err(|e| Error::io("stat", &path, e))?;
                if size < len {
                    return Err(Error::corruption(
                        &path,
                        size,
                        None,
                        format!("segment file holds {size} bytes, {len} expected"),
                    ));
                }
                f
            }
        };
        let bytes = file
            .map(len as usize, Box::new(self.files.clone()))
            .map_err(|e| Error::io("mmap", self.log_path(), e))?;
        map.data = bytes.clone();
        Ok((bytes, true))
    }

    /// Where to start scanning for `offset`, from the sparse index: `(base offset of the batch
    /// there, position)`.
    pub(crate) fn floor(&self, offset: u64) -> Result<(u64, u64)> {
        let rel = (offset - self.base_offset).min(u64::from(u32::MAX)) as u32;
        self.with_index(|offsets, _| {
            let (rel, pos) = index::floor_entry(offsets, rel);
            (self.base_offset + u64::from(rel), u64::from(pos))
        })
    }

    /// Relative offset to start scanning for a timestamp, from the time index.
    pub(crate) fn time_floor(&self, ts: i64) -> Result<Option<u32>> {
        self.with_index(|_, times| index::time_floor(times, ts))
    }

    /// Adds entries to the in-memory index of the active segment.
    pub(crate) fn push_index(&self, entries: Entries) {
        let mut idx = self.index.write().unwrap_or_else(|p| p.into_inner());
        if let IndexState::Mem { offsets, times } = &mut *idx {
            entries.push_to(offsets, times);
        }
    }

    fn with_index<R>(&self, f: impl Fn(&[u8], &[u8]) -> R) -> Result<R> {
        {
            let idx = self.index.read().unwrap_or_else(|p| p.into_inner());
            match &*idx {
                IndexState::Mem { offsets, times } => return Ok(f(offsets, times)),
                IndexState::Mapped { offsets, times } => return Ok(f(offsets, times)),
                IndexState::Unloaded => {}
            }
        }
        let mut idx = self.index.write().unwrap_or_else(|p| p.into_inner());
        if matches!(*idx, IndexState::Unloaded) {
            let (offsets, times) = self.load_index()?;
            *idx = IndexState::Mapped { offsets, times };
        }
        match &*idx {
            IndexState::Mem { offsets, times } => Ok(f(offsets, times)),
            IndexState::Mapped { offsets, times } => Ok(f(offsets, times)),
            IndexState::Unloaded => unreachable!("index was just loaded"),
        }
    }

    /// Loads the sealed indexes from disk, or rebuilds them from the log when missing or
    /// damaged (the index is derived data; the log is the truth).
    fn load_index(&self) -> Result<(Bytes, Bytes)> {
        let size = self.readable_end();
        // Under the index lock, which `mark_deleted` also takes: the paths stay right.
        let (index_path, time_path) = (
            self.files.current(&self.files.index),
            self.files.current(&self.files.timeindex),
        );
        let load = |path: &Path, kind: Kind| -> Result<(SegmentSummary, Bytes)> {
            let fs = &self.files.fs;
            let f = fs
                .open(path, OpenMode::Read)
                .map_err(|e| Error::io("open", path, e))?;
            let len = f.size().map_err(|e| Error::io("stat", path, e))?;
            let data = f
                .map(len as usize, Box::new(()))
                .map_err(|e| Error::io("mmap", path, e))?;
            let (summary, range) = index::decode_file(path, kind, &data, self.base_offset, size)?;
            Ok((summary, data.slice(range)))
        };
        match (
            load(&index_path, Kind::Offset),
            load(&time_path, Kind::Time),
        ) {
            (Ok((s, offsets)), Ok((_, times))) => {
                self.note_timestamp(s.max_timestamp);
                Ok((offsets, times))
            }
            (a, b) => {
                let why = a
                    .err()
                    .or(b.err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                tracing::warn!(segment = %self.log_path().display(), reason = %why, "rebuilding segment index");
                self.rebuild_index()
            }
        }
    }

    /// Replaces a sealed segment's indexes by ones rebuilt from its log, after a lookup found
    /// an entry that does not name the batch at its position (an index that passed the load
    /// checks yet belongs to another log of the same base and size, say). False, doing
    /// nothing, for the active segment: its in-memory index is the writer's own.
    pub(crate) fn reindex_from_log(&self) -> Result<bool> {
        let mut idx = self.index.write().unwrap_or_else(|p| p.into_inner());
        if matches!(*idx, IndexState::Mem { .. }) {
            return Ok(false);
        }
        tracing::warn!(segment = %self.log_path().display(), "an index entry does not match the log: rebuilding the index");
        let (offsets, times) = self.rebuild_index()?;
        *idx = IndexState::Mapped { offsets, times };
        Ok(true)
    }

    /// Rebuilds both indexes by walking the batch headers and writes them back.
    pub(crate) fn rebuild_index(&self) -> Result<(Bytes, Bytes)> {
        let size = self.readable_end();
        let (data, _) = self.data(size)?;
        let built = build_index(
            self.log_path(),
            data.get(..size as usize).unwrap_or(&data[..]),
            self.base_offset,
            self.index_interval,
            self.chain(),
            false,
        )?;
        self.note_timestamp(built.summary.max_timestamp);
        // A deleted (or replaced) segment's names may belong to its replacement now: keep the
        // rebuilt index in memory only.
        if self.files.deleted.load(Ordering::Acquire) {
            return Ok((Bytes::from(built.offsets), Bytes::from(built.times)));
        }
        if let Err(e) = write_index_files(&self.files, &built.summary, &built.offsets, &built.times)
        {
            tracing::warn!(segment = %self.log_path().display(), error = %e, "could not write rebuilt index");
        }
        Ok((Bytes::from(built.offsets), Bytes::from(built.times)))
    }

    /// Seals the active segment: writes and fdatasyncs both index files (the caller has
    /// already fdatasync'd the log and fsyncs the directory afterwards) and drops the write
    /// handle. From now on the indexes are read from their files (or rebuilt from the log if
    /// they could not be written).
    pub(crate) fn seal(&self, last_offset: u64) -> Result<()> {
        let size = self.written_end();
        let summary = {
            let idx = self.index.read().unwrap_or_else(|p| p.into_inner());
            let IndexState::Mem { offsets, times } = &*idx else {
                return Ok(());
            };
            let summary = SegmentSummary {
                base_offset: self.base_offset,
                last_offset,
                max_timestamp: self.max_timestamp.load(Ordering::Acquire).max(-1),
                log_size: size as u32,
            };
            // The indexes are derived data: if they cannot be written (typically a full
            // disk), the segment is sealed without them and they are rebuilt from the log on
            // first use. Failing the roll here would poison the partition for no gain.
            if let Err(e) = write_index_files(&self.files, &summary, offsets, times) {
                tracing::warn!(segment = %self.log_path().display(), error = %e, "sealing without index files; they will be rebuilt");
                // (`write_replace` removed its temporary file.)
            }
            summary
        };
        debug_assert_eq!(u64::from(summary.log_size), size);
        self.publish_readable(size);
        *lock(&self.active_file) = None;
        *lock(&self.map) = Maps::default();
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = IndexState::Unloaded;
        Ok(())
    }

    /// Renames the files to `*.deleted`; they are unlinked when the last mapping drops.
    /// The caller fsyncs the directory.
    pub(crate) fn mark_deleted(&self) -> Result<()> {
        self.rename_away(".deleted".to_owned())
    }

    /// Renames the files to `*.<n>.deleted`, a name no other generation of this segment uses,
    /// so that the cleaner can put a rewritten segment under the original names (`id` is
    /// unique, see `Shared::next_replace_id`). Readers that hold this segment keep
    /// reading the old files until they let go.
    pub(crate) fn mark_replaced(&self, id: &str) -> Result<()> {
        self.rename_away(format!(".{id}.deleted"))
    }

    fn rename_away(&self, suffix: String) -> Result<()> {
        // Both locks are held across the renames (in the order `with_index` takes them), so
        // that a reader opening the log or index file by name opens either the file before the
        // rename or its renamed path, never a replacement that took the old name.
        let _index = self.index.write().unwrap_or_else(|p| p.into_inner());
        let mut map = lock(&self.map);
        if self.files.deleted.load(Ordering::Acquire) {
            return Ok(());
        }
        let suffix = self.files.deleted_suffix.get_or_init(|| suffix).clone();
        for p in [&self.files.log, &self.files.index, &self.files.timeindex] {
            match self.files.fs.rename(p, &deleted_name(p, &suffix)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && p != &self.files.log => {}
                Err(e) => return Err(Error::io("rename", p, e)),
            }
        }
        self.files.deleted.store(true, Ordering::Release);
        *map = Maps::default();
        Ok(())
    }
}

fn write_index_files(
    files: &SegmentFiles,
    s: &SegmentSummary,
    offsets: &[u8],
    times: &[u8],
) -> Result<()> {
    let fs = files.fs.as_ref();
    crate::fsutil::write_replace(
        fs,
        &files.index,
        &index::encode_file(Kind::Offset, s, offsets),
    )?;
    crate::fsutil::write_replace(
        fs,
        &files.timeindex,
        &index::encode_file(Kind::Time, s, times),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_tails() {
        assert!(is_zero_tail(&[1, 2, 0, 0], 2, 2));
        assert!(
            !is_zero_tail(&[1, 2, 0, 0], 2, 1),
            "longer than zeroing writes"
        );
        assert!(!is_zero_tail(&[1, 2, 0, 1], 2, 2), "garbage after zeros");
        assert!(!is_zero_tail(&[1, 2], 2, 2), "nothing after the batches");
        assert!(!is_zero_tail(&[1, 2], 3, 2));
        assert!(is_zero_tail(&[0; 4096], 0, 4096));
    }

    #[test]
    fn names() {
        assert_eq!(log_name(42), "00000000000000000042.log");
        assert_eq!(parse_log_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_log_name("0000000000000000042.log"), None);
        assert_eq!(parse_log_name("00000000000000000042.index"), None);
        assert_eq!(parse_log_name("0000000000000000004x.log"), None);
    }

    /// An active segment on `fs` in `dir`, with its write handle.
    fn active_on(fs: Arc<dyn FileSystem>, dir: &Path) -> (Segment, Arc<dyn FileHandle>) {
        let file = fs
            .open(&dir.join(log_name(0)), OpenMode::CreateNew)
            .unwrap();
        let seg = Segment::active(&fs, dir, 0, 4096, file.clone(), 0, vec![], vec![], -1);
        (seg, file)
    }

    /// Appends `bytes` at the segment's end as the writer does (write, then publish).
    fn append(seg: &Segment, file: &Arc<dyn FileHandle>, bytes: &[u8]) {
        let end = seg.written_end();
        file.write_all_at(bytes, end).unwrap();
        seg.publish_written(end + bytes.len() as u64);
    }

    #[test]
    fn a_tail_reader_of_the_active_segment_reuses_one_map_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, file) = active_on(spool_io::real(), dir.path());
        append(&seg, &file, b"first");
        let (a, fresh) = seg.data(5).unwrap();
        assert!(fresh, "the first read maps");
        assert_eq!(&a[..], b"first");
        let mut expect = b"first".to_vec();
        for i in 0..100u8 {
            let chunk = [i; 700];
            append(&seg, &file, &chunk);
            expect.extend_from_slice(&chunk);
            let (d, fresh) = seg.data(seg.written_end()).unwrap();
            assert!(!fresh, "read {i} of grown data made a new map");
            assert_eq!(&d[..], &expect[..], "read {i}");
        }
        // Views handed out earlier still hold what they held.
        assert_eq!(&a[..], b"first");
        // Sealing drops the map ahead; a sealed segment maps exactly what was written.
        seg.seal(0).unwrap();
        assert!(!seg.is_mapped());
        let (d, fresh) = seg.data(seg.written_end()).unwrap();
        assert!(fresh);
        assert_eq!(&d[..], &expect[..]);
    }

    #[test]
    fn without_a_map_ahead_the_active_segment_is_mapped_again_as_it_grows() {
        let fs: Arc<dyn FileSystem> = Arc::new(spool_io::sim::SimFs::new());
        fs.create_dir_all(Path::new("/p")).unwrap();
        let (seg, file) = active_on(fs, Path::new("/p"));
        append(&seg, &file, b"first");
        assert_eq!(&seg.data(5).unwrap().0[..], b"first");
        append(&seg, &file, b"second");
        let (d, fresh) = seg.data(seg.written_end()).unwrap();
        assert!(
            fresh,
            "the simulated disk copies on map: a grown file is mapped again"
        );
        assert_eq!(&d[..], b"firstsecond");
    }
}
