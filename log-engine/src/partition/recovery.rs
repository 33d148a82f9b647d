//! Opening a partition: find its segments, trust what the recovery point covers, check the
//! rest, and cut a torn tail.
//!
//! Steps:
//! 1. Remove leftovers: `*.deleted` (retention that had renamed but not unlinked) and `*.tmp`.
//! 2. Read the recovery point. Segments before its segment are sealed and trusted; nothing is
//!    read from them now (their indexes load lazily, and are rebuilt if damaged).
//! 3. From the recovery point on, every batch is CRC-checked and its offset must follow the
//!    previous one. A bad batch in the **last** segment past the point is a torn tail: the file
//!    is truncated there (and fdatasync'd), and the cut is reported. A bad batch anywhere else
//!    — in a sealed segment, or before the recovery point — is [`Error::Corruption`]: nothing is
//!    cut, the partition does not open. On an `fsync = always` partition of a log that zeroes
//!    ahead (`LogOptions::zero_ahead_bytes`), zeros from the bad batch to the end of the
//!    **last** segment, no longer than zeroing writes (`config::max_zero_tail`), are not a torn
//!    tail but the active segment's zero tail (`writer.rs`): end-of-data, cut without being
//!    kept aside, reported apart ([`RecoveryReport::bytes_zero_tail`]) and logged as a warning
//!    with its position. Anything else, a bad batch followed by zeros included, is a torn
//!    tail, as without zeroing.
//!
//!    Decided, not an oversight: a zero tail a crash left while zeroing was on, opened by a
//!    log with zeroing off (or on an `fsync` policy other than `always` after an alter), is a
//!    torn tail, copied into `<segment>.torn-<pos>` before the cut. Nothing is lost (every
//!    batch before the zeros stays; the copy holds only zeros, at most the window plus one
//!    small sync), and it keeps the rule that a zero run is end-of-data only where this log's
//!    zeroing could have written it: telling the two apart by content alone would also take
//!    acknowledged batches that a disk fault or a lost write-back turned into zeros for
//!    end-of-data, silently and without a copy. The warning for a torn tail of zeros only (of
//!    any length) says the copy holds only zeros and names both causes that leave one (zeros
//!    written ahead that this open does not take for a zero tail: this, or a smaller window
//!    now; and appended bytes a crash or a disk fault left as zeros): recovery cannot tell
//!    which it was.
//! 4. The last segment's in-memory index is rebuilt by walking its batch headers (without
//!    CRC) up to the recovery point and from the CRC scan beyond it. Only the last segment is
//!    walked, never the whole partition.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use spool_io::{FileHandle, FileSystem, OpenMode};

use crate::checkpoint::Checkpoint;
use crate::config::TopicConfig;
use crate::error::{Error, Result};
use crate::notify::Watch;
use crate::producer::ProducerStates;
use crate::segment::{self, IndexBuilder, Segment};
use crate::txn::TxnIndex;

use super::writer::Writer;
use super::{CommitState, Partition, Shared};

/// The warning for a torn tail that holds only zeros (kept aside as any torn tail, whatever
/// its length). It names both causes that leave one, since recovery cannot tell them apart:
/// zeros written ahead (`zero_ahead_bytes`) that this open does not take for a zero tail
/// (zeroing off now, a smaller window, or the topic no longer `fsync = always`; module docs),
/// and appended bytes that a crash or a disk fault left as zeros (an extended file whose data
/// never reached the disk reads back as zeros).
const ZEROS_ONLY_TORN_TAIL: &str = "truncating a torn tail of zeros only past the recovery \
    point; the kept copy holds only zeros, no batch: zeros written ahead (zero_ahead_bytes) \
    that this open does not take for a zero tail (zeroing off or a smaller window now, or the \
    topic no longer fsync = always), or appended bytes a crash or a disk fault left as zeros";

/// What opening a partition found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments found.
    pub segments: usize,
    /// Bytes CRC-checked because they lay past the recovery point.
    pub bytes_scanned: u64,
    /// Bytes of torn tail cut from the last segment.
    pub bytes_truncated: u64,
    /// Bytes of zero tail cut from the last segment: zeros past its last batch, no longer than
    /// zeroing ahead of the writer (`fsync = always`) leaves, taken for end-of-data (module
    /// docs: acknowledged batches past the recovery point that a disk fault turned into zeros
    /// would look the same); not counted in
    /// `bytes_truncated` and not quarantined.
    pub bytes_zero_tail: u64,
    /// True when a valid recovery point was found.
    pub had_recovery_point: bool,
    /// Files holding the bytes cut from torn tails (`<segment>.log.torn-<position>`, or
    /// `…-<n>` when an earlier cut at that position kept one: never overwritten), kept for
    /// inspection; nothing reads them.
    pub quarantined: Vec<std::path::PathBuf>,
}

/// At most this many kept copies of torn tails cut at the same position of one segment
/// (`<segment>.torn-<pos>`, then `-1` … `-999`); past it the open fails rather than overwrite
/// one (an operator removes the copies they have looked at).
const MAX_TORN_COPIES: u32 = 1000;

/// Copies `file[pos..len]` to a new file `<segment>.torn-<pos>` next to it (`-<n>` appended,
/// with the first `n` free, when an earlier cut at the same position kept one: appends resume
/// at the cut, so a second tear there is possible, and its copy must not replace the first,
/// which may hold the only copy of acknowledged batches), durably, and returns its path.
fn quarantine(
    fs: &dyn FileSystem,
    dir: &Path,
    path: &Path,
    file: &dyn FileHandle,
    pos: u64,
    len: u64,
) -> Result<std::path::PathBuf> {
    let mut n = 0;
    let (dst, out) = loop {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".torn-{pos}"));
        if n > 0 {
            name.push(format!("-{n}"));
        }
        let dst = std::path::PathBuf::from(name);
        match fs.open(&dst, OpenMode::CreateNew) {
            Ok(out) => break (dst, out),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n + 1 < MAX_TORN_COPIES => {
                n += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::io(
                    "create",
                    &dst,
                    std::io::Error::new(
                        e.kind(),
                        format!(
                            "{MAX_TORN_COPIES} copies of torn tails cut at position {pos} are \
                             kept already: remove those inspected"
                        ),
                    ),
                ));
            }
            Err(e) => return Err(Error::io("create", &dst, e)),
        }
    };
    let copied = (|| {
        let mut buf = vec![0u8; (len - pos).min(1 << 20) as usize];
        let mut at = pos;
        while at < len {
            let n = buf.len().min((len - at) as usize);
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|e| Error::io("read", path, e))?;
            out.write_all_at(&buf[..n], at - pos)
                .map_err(|e| Error::io("copy torn tail", &dst, e))?;
            at += n as u64;
        }
        out.sync_data()
            .map_err(|e| Error::io("fdatasync", &dst, e))?;
        crate::fsutil::sync_dir(fs, dir)
    })();
    if let Err(e) = copied {
        // This attempt's own file, and the open fails before the cut: every byte it holds is
        // still in the segment. Left behind, each failing open (a full disk) would add one
        // more copy of the same tail, up to the cap, and then the partition could not open.
        drop(out);
        let _ = fs.remove_file(&dst);
        return Err(e);
    }
    Ok(dst)
}

fn list_segments(fs: &dyn FileSystem, dir: &Path) -> Result<Vec<(u64, u64)>> {
    let mut bases = Vec::new();
    let mut entries = fs
        .read_dir(dir)
        .map_err(|e| Error::io("read directory", dir, e))?;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    for entry in entries {
        let p = dir.join(&entry.name);
        if entry.name.ends_with(".deleted") || entry.name.ends_with(".tmp") {
            fs.remove_file(&p).map_err(|e| Error::io("remove", &p, e))?;
            continue;
        }
        if let Some(base) = segment::parse_log_name(&entry.name) {
            let len = fs.metadata(&p).map_err(|e| Error::io("stat", &p, e))?.len;
            bases.push((base, len));
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

impl Partition {
    /// Lays out an empty partition in the new directory `dir`: an empty first segment and a
    /// recovery-point file holding the point `(0, 0, 0)` (not synced: it covers nothing), with
    /// the directory's entries synced (its own entry in the parent is the caller's to sync).
    /// [`Partition::open`] of the result (without `create`) then finds its point already
    /// there and writes nothing (unless a crash lost that unsynced point: it then writes it,
    /// as for any partition), and nothing stays open here.
    pub(crate) fn create_empty(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
        fs.create_dir(dir)
            .map_err(|e| Error::io("create directory", dir, e))?;
        let log = dir.join(segment::log_name(0));
        fs.open(&log, OpenMode::CreateNew)
            .map_err(|e| Error::io("create", &log, e))?;
        let point = dir.join(crate::checkpoint::FILE_NAME);
        let file = fs
            .open(&point, OpenMode::CreateNew)
            .map_err(|e| Error::io("create", &point, e))?;
        crate::checkpoint::write_initial(file.as_ref(), &point)?;
        crate::fsutil::sync_dir(fs, dir)
    }

    /// Opens (or creates, if `create`) the partition in `dir`.
    pub(crate) fn open(
        topic: &str,
        id: u32,
        dir: &Path,
        config: Arc<TopicConfig>,
        shared: Arc<Shared>,
        create: bool,
    ) -> Result<(Partition, RecoveryReport)> {
        let fs = &shared.fs;
        if create {
            crate::fsutil::create_dir_durable(fs.as_ref(), dir)?;
        }
        // Finish or undo an interrupted compaction swap first; segments below `sparse_below`
        // may have been compacted (offsets with gaps).
        let sparse_below = crate::compact::recover_dir(fs.as_ref(), dir)?;
        let mut found = list_segments(fs.as_ref(), dir)?;
        let (checkpoint, point) = Checkpoint::open(fs.as_ref(), dir)?;
        let mut checkpoint = Some(checkpoint);
        let mut report = RecoveryReport {
            segments: found.len(),
            had_recovery_point: point.is_some(),
            ..RecoveryReport::default()
        };
        if found.is_empty() {
            if point.is_some_and(|p| p.next_offset > 0) {
                return Err(Error::corruption(
                    dir,
                    0,
                    point.map(|p| p.next_offset),
                    "no segment files, but the recovery point says data was written",
                ));
            }
            let path = dir.join(segment::log_name(0));
            fs.open(&path, OpenMode::CreateTruncate)
                .map_err(|e| Error::io("create", &path, e))?;
            crate::fsutil::sync_dir(fs.as_ref(), dir)?;
            found.push((0, 0));
        }
        // Where trusted data ends: (index into `found`, byte position, next offset).
        let start = match point {
            None => {
                if found.iter().any(|&(_, len)| len > 0) {
                    tracing::warn!(dir = %dir.display(), "no valid recovery point: checking every segment");
                }
                (0, 0, found[0].0)
            }
            Some(p) => match found.iter().position(|&(b, _)| b == p.segment_base) {
                Some(i) => (i, p.position, p.next_offset),
                None if p.segment_base < found[0].0 => (0, 0, found[0].0),
                None => {
                    return Err(Error::corruption(
                        dir.join(segment::log_name(p.segment_base)),
                        p.position,
                        Some(p.next_offset),
                        "the segment named by the recovery point is missing",
                    ));
                }
            },
        };
        let last = found.len() - 1;
        let interval = config.index_interval_bytes;
        // Producer state below the last segment: the snapshot, plus the headers of any sealed
        // segment it does not cover. The last segment's headers are added by the walk below.
        let (mut producers, mut txn) = producer_state_before(dir, &found, &shared, sparse_below)?;
        let now = shared.clock.now_ms();
        let mut segments = Vec::with_capacity(found.len());
        for &(base, len) in &found[..start.0] {
            segments.push(Arc::new(Segment::sealed(fs, dir, base, len, interval)));
        }
        let mut next = start.2;
        for (i, &(base, len)) in found.iter().enumerate().skip(start.0) {
            let path = dir.join(segment::log_name(base));
            let trusted = if i == start.0 { start.1 } else { 0 };
            let gap_ok = i > 0 && found[i - 1].0 < sparse_below;
            if i > start.0 && (base < next || (base != next && !gap_ok)) {
                return Err(Error::corruption(
                    &path,
                    0,
                    Some(next),
                    format!("segment starts at offset {base}, the previous one ends at {next}"),
                ));
            }
            if trusted > len {
                return Err(Error::corruption(
                    &path,
                    len,
                    Some(next),
                    format!("file is {len} bytes, shorter than the recovery point {trusted}"),
                ));
            }
            let mode = if i == last {
                OpenMode::Write
            } else {
                OpenMode::Read
            };
            let file = fs
                .open(&path, mode)
                .map_err(|e| Error::io("open", &path, e))?;
            let data = file
                .map(len as usize, Box::new(()))
                .map_err(|e| Error::io("mmap", &path, e))?;
            let mut builder = IndexBuilder::new(base, interval);
            let (mut offsets, mut times) = (Vec::new(), Vec::new());
            let mut add = |pos: u64, h: &crate::batch::BatchHeader| {
                if let Some(e) = builder.observe(pos, h) {
                    e.push_to(&mut offsets, &mut times);
                }
                if i == last {
                    producers.record_seen(h, h.base_offset, h.max_timestamp, now);
                    txn.record(h, &data[pos as usize..], h.base_offset, u64::MAX);
                }
            };
            // Trusted prefix (only the last segment needs its index rebuilt from it).
            let mut seg_next = base;
            if i == last && trusted > 0 {
                let w = segment::walk(&data, 0, trusted, base, false, &mut add);
                if let Some((pos, reason)) = w.stopped {
                    return Err(Error::corruption(
                        &path,
                        pos,
                        Some(w.next_offset),
                        format!("before the recovery point: {reason}"),
                    ));
                }
                if w.end != trusted || w.next_offset != start.2 {
                    return Err(Error::corruption(
                        &path,
                        w.end,
                        Some(w.next_offset),
                        format!(
                            "batches end at byte {} offset {}, the recovery point says byte {trusted} offset {}",
                            w.end, w.next_offset, start.2
                        ),
                    ));
                }
                seg_next = w.next_offset;
            } else if trusted > 0 {
                seg_next = next;
            }
            // Untrusted part: CRC-checked.
            let chain = crate::compact::chain_of(&found, i, sparse_below);
            let w = segment::walk_chain(&data, trusted, len, seg_next, chain, true, &mut add);
            report.bytes_scanned += w.end - trusted;
            // Only zeros from where the batches stop to the end, no longer than zeroing writes,
            // on a partition this log zeroes: the active segment's zero tail (module docs).
            let zeroing =
                config.fsync == crate::config::FsyncPolicy::Always && shared.zero_ahead_bytes > 0;
            let zero_tail = i == last
                && zeroing
                && w.stopped.is_some()
                && segment::is_zero_tail(
                    &data[..len as usize],
                    w.end,
                    crate::config::max_zero_tail(shared.zero_ahead_bytes),
                );
            // A torn tail of zeros only: zeros written ahead that this open does not take for a
            // zero tail, or appended bytes a crash or a disk fault left as zeros. Still a torn tail
            // (module docs), but the warning says so, naming both causes, so an operator knows
            // the kept copy holds no batch.
            // Any length: the bound matters only where zeros are taken for end-of-data.
            let zeros_only = i == last
                && !zero_tail
                && w.stopped.is_some()
                && segment::is_zero_tail(&data[..len as usize], w.end, u64::MAX);
            drop(data);
            let mut end = len;
            if let Some((pos, reason)) = w.stopped {
                if i != last {
                    return Err(Error::corruption(
                        &path,
                        pos,
                        Some(w.next_offset),
                        format!("in a sealed segment: {reason}"),
                    ));
                }
                if zero_tail {
                    tracing::warn!(segment = %path.display(), position = pos, cut = len - pos, "cutting the zero tail after the last batch, taken for end-of-data (zeros only, no longer than zero ahead leaves; acknowledged batches past the recovery point that a disk fault turned into zeros would look the same)");
                    report.bytes_zero_tail += len - pos;
                } else {
                    let saved = quarantine(fs.as_ref(), dir, &path, file.as_ref(), pos, len)?;
                    if zeros_only {
                        tracing::warn!(segment = %path.display(), position = pos, cut = len - pos, saved = %saved.display(), "{ZEROS_ONLY_TORN_TAIL}");
                    } else {
                        tracing::warn!(segment = %path.display(), position = pos, cut = len - pos, saved = %saved.display(), reason = %reason, "truncating torn tail past the recovery point");
                    }
                    report.quarantined.push(saved);
                    report.bytes_truncated += len - pos;
                }
                file.set_len(pos)
                    .map_err(|e| Error::io("truncate", &path, e))?;
                file.sync_data()
                    .map_err(|e| Error::io("fdatasync", &path, e))?;
                end = pos;
            }
            next = w.next_offset;
            if i == last {
                // What recovery accepted is visible to readers at once, so make it durable now
                // (after kill -9 it may still be only in the page cache) and record the point.
                // When the recovery point already covers everything (a clean shutdown), all of
                // it is durable already: skip both flushes, which dominate opening many
                // partitions.
                let reached = crate::checkpoint::Point {
                    segment_base: base,
                    position: end,
                    next_offset: next,
                };
                let mut checkpoint = checkpoint.take().expect("the last segment is reached once");
                if checkpoint.last() != Some(reached) {
                    file.sync_data()
                        .map_err(|e| Error::io("fdatasync", &path, e))?;
                    checkpoint.write(reached)?;
                }
                let seg = Arc::new(Segment::active(
                    fs,
                    dir,
                    base,
                    interval,
                    file.clone(),
                    end,
                    offsets,
                    times,
                    builder.max_timestamp,
                ));
                segments.push(seg.clone());
                producers.expire(shared.clock.now_ms());
                txn.prune(segments[0].base_offset);
                crate::compact::mark_sparse(&segments, sparse_below);
                let writer = Writer {
                    active: seg,
                    file,
                    position: end,
                    next_offset: next,
                    index: builder,
                    first_append_ms: None,
                    producers,
                    writeback_from: end,
                    zero: Default::default(),
                };
                return Ok((
                    Self::assemble(
                        topic, id, dir, config, shared, segments, writer, txn, checkpoint,
                    ),
                    report,
                ));
            }
            segments.push(Arc::new(Segment::sealed(fs, dir, base, end, interval)));
        }
        unreachable!("the loop returns at the last segment")
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        topic: &str,
        id: u32,
        dir: &Path,
        config: Arc<TopicConfig>,
        shared: Arc<Shared>,
        segments: Vec<Arc<Segment>>,
        writer: Writer,
        txn: TxnIndex,
        checkpoint: Checkpoint,
    ) -> Partition {
        let log_start = segments[0].base_offset;
        let next = writer.next_offset;
        let now = shared.clock.now_ms().max(0) as u64;
        Partition {
            topic: topic.to_owned(),
            id,
            dir: dir.to_path_buf(),
            shared,
            config: RwLock::new(config),
            segments: RwLock::new(Arc::new(segments)),
            writer: Mutex::new(writer),
            txn: Mutex::new(txn),
            commit: Mutex::new(CommitState {
                durable_next: next,
                syncing: false,
                requested: next,
                looping: false,
                next_syncer: false,
            }),
            commit_cv: Condvar::new(),
            durable: Arc::new(Watch::new(next)),
            checkpoint: Mutex::new(checkpoint),
            watch: Arc::new(Watch::new(next)),
            log_start: AtomicU64::new(log_start),
            leader_epoch: AtomicI32::new(0),
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
            sync_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
            cleaning: Mutex::new(()),
            deleted: AtomicBool::new(false),
            last_flush_ms: AtomicU64::new(now),
            fsync_latency: crate::stats::Latency::default(),
            me: std::sync::OnceLock::new(),
        }
    }
}

/// The producer state and transactions covering every segment of `found` but the last: the
/// snapshot if it covers exactly that, else the snapshot (or nothing) plus a header walk of
/// the sealed segments it misses. Sealed segments are trusted here; the main recovery pass checks what it
/// must.
fn producer_state_before(
    dir: &Path,
    found: &[(u64, u64)],
    shared: &Shared,
    sparse_below: u64,
) -> Result<(ProducerStates, TxnIndex)> {
    let (max, expiry, max_aborted) = (
        shared.limits.max_producers_per_partition,
        shared.limits.producer_expiration_ms,
        shared.limits.max_aborted_txns_per_partition,
    );
    let last_base = found[found.len() - 1].0;
    let now = shared.clock.now_ms();
    let fresh = || (ProducerStates::new(max, expiry), TxnIndex::default());
    let fs = shared.fs.as_ref();
    let ((mut state, mut txn), from) = match ProducerStates::read_snapshot(
        fs,
        dir,
        max,
        expiry,
        max_aborted,
    ) {
        Some((s, t, covers)) if covers <= last_base && found.iter().any(|&(b, _)| b == covers) => {
            ((s, t), covers)
        }
        Some((_, _, covers)) => {
            tracing::warn!(dir = %dir.display(), covers, "producer snapshot does not match the segments: rebuilding from the log");
            (fresh(), found[0].0)
        }
        None => (fresh(), found[0].0),
    };
    for (i, &(base, len)) in found[..found.len() - 1].iter().enumerate() {
        if base < from || len == 0 {
            continue;
        }
        let path = dir.join(segment::log_name(base));
        let file = fs
            .open(&path, OpenMode::Read)
            .map_err(|e| Error::io("open", &path, e))?;
        let data = file
            .map(len as usize, Box::new(()))
            .map_err(|e| Error::io("mmap", &path, e))?;
        let chain = crate::compact::chain_of(found, i, sparse_below);
        let w = segment::walk_chain(&data, 0, len, base, chain, false, |pos, h| {
            state.record_seen(h, h.base_offset, h.max_timestamp, now);
            txn.record(h, &data[pos as usize..], h.base_offset, u64::MAX);
        });
        if let Some((pos, reason)) = w.stopped {
            return Err(Error::corruption(
                &path,
                pos,
                Some(w.next_offset),
                format!("in a sealed segment: {reason}"),
            ));
        }
    }
    Ok((state, txn))
}
