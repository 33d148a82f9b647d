//! Offline inspection of a data directory: what `spool inspect` shows and checks.
//!
//! Everything here is **read-only**: no recovery runs, nothing is truncated, no recovery point
//! or index is written, and the directory lock is not taken (inspect a copy, or a log that is
//! closed, for a stable answer). Every batch of every segment is CRC-checked and its offset
//! must continue the previous one; segments must continue each other; index files are checked
//! against their CRCs and the segment they describe. Findings say exactly where: file, byte
//! position and offset.

use spool_io::{FileSystem, RealFs};
use std::path::{Path, PathBuf};

use crate::batch::{Batch, BatchHeader};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::index::{self, Kind};
use crate::segment::{self, walk_chain};

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Derived data that opening the log rebuilds (a stale or damaged index).
    Repairable,
    /// A bad tail past the recovery point that opening the log would cut (a torn write, most
    /// likely; the cut bytes are kept aside).
    TornTail,
    /// Damage to data that must be intact: opening the log refuses to proceed.
    Corruption,
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// How serious.
    pub severity: Severity,
    /// The file.
    pub path: PathBuf,
    /// Byte position in the file.
    pub position: u64,
    /// The offset expected there, when known.
    pub offset: Option<u64>,
    /// What is wrong.
    pub problem: String,
}

/// One segment's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The `.log` file.
    pub path: PathBuf,
    /// Base offset (from the file name).
    pub base_offset: u64,
    /// Offset after the last good batch.
    pub next_offset: u64,
    /// Bytes of batches and of any damage after them: the file's size less a zero tail.
    pub bytes: u64,
    /// Zeros after the last batch of the last segment, past the recovery point, at most
    /// `MAX_ZERO_AHEAD_BYTES + ZERO_AHEAD_MAX_SYNC_BYTES` long: the active segment's zero tail
    /// (zeros written ahead of the writer under `fsync = always`; the same run can also be
    /// appended bytes a crash or a disk fault left as zeros, which no reader can tell apart);
    /// not a finding. Opening the log cuts it, as end-of-data when the log zeroes ahead (and
    /// the run is within its window), else as a torn tail. Zeros anywhere else stay findings.
    pub zero_tail_bytes: u64,
    /// Good batches.
    pub batches: u64,
    /// Records in the good batches (from their headers).
    pub records: u64,
    /// Largest timestamp of the good batches (-1 if none).
    pub max_timestamp: i64,
}

/// What inspecting one partition found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionInspection {
    /// The partition directory.
    pub dir: PathBuf,
    /// Segments, oldest first.
    pub segments: Vec<SegmentInfo>,
    /// The recovery point `(segment base, position, next offset)`, if a valid one exists.
    pub recovery_point: Option<(u64, u64, u64)>,
    /// Problems, in file order.
    pub findings: Vec<Finding>,
}

impl PartitionInspection {
    /// The worst finding's severity, if any.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }
}

/// Inspects one partition directory (read-only).
pub fn inspect_partition(dir: &Path) -> Result<PartitionInspection> {
    let fs: &dyn FileSystem = &RealFs;
    let mut bases = Vec::new();
    let mut swaps = Vec::new();
    for entry in fs
        .read_dir(dir)
        .map_err(|e| Error::io("read directory", dir, e))?
    {
        let name = entry.name;
        if let Some(base) = segment::parse_log_name(&name) {
            bases.push(base);
        } else if name.ends_with(".swap") || name.ends_with(".cleaned") {
            swaps.push(dir.join(name));
        }
    }
    bases.sort_unstable();
    let point = checkpoint::read_point(fs, dir)?;
    // Segments below it may have been compacted: offsets may skip (see `crate::compact`).
    let sparse_below = crate::compact::state::State::read(fs, dir)?.sparse_below;
    let found: Vec<(u64, u64)> = bases.iter().map(|&b| (b, 0)).collect();
    let mut out = PartitionInspection {
        dir: dir.to_path_buf(),
        recovery_point: point.map(|p| (p.segment_base, p.position, p.next_offset)),
        ..PartitionInspection::default()
    };
    swaps.sort();
    for path in swaps {
        out.findings.push(Finding {
            severity: Severity::Repairable,
            path,
            position: 0,
            offset: None,
            problem: "left by an interrupted compaction swap: opening the log finishes it \
                      (.swap) or removes it (.cleaned)"
                .into(),
        });
    }
    let mut expect_next: Option<u64> = None;
    for (i, &base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        let path = dir.join(segment::log_name(base));
        let gap_ok = i > 0 && bases[i - 1] < sparse_below;
        if let Some(n) = expect_next.filter(|&n| n > base || (n != base && !gap_ok)) {
            out.findings.push(Finding {
                severity: Severity::Corruption,
                path: path.clone(),
                position: 0,
                offset: Some(n),
                problem: format!("segment starts at offset {base}, the previous one ends at {n}"),
            });
        }
        let data = segment::read_segment_file(fs, &path)?;
        let len = data.len() as u64;
        let (mut batches, mut records, mut max_ts) = (0u64, 0u64, -1i64);
        let chain = crate::compact::chain_of(&found, i, sparse_below);
        let w = walk_chain(&data, 0, len, base, chain, true, |_, h| {
            batches += 1;
            records += h.records_count.max(0) as u64;
            max_ts = max_ts.max(h.max_timestamp);
        });
        // Past the recovery point, in the last segment, a bad tail is what recovery cuts.
        let past_point = |pos: u64| match point {
            None => true,
            Some(p) => base > p.segment_base || (base == p.segment_base && pos >= p.position),
        };
        let mut zero_tail_bytes = 0;
        if let Some((pos, _)) = w.stopped
            && last
            && past_point(pos)
            && segment::is_zero_tail(&data, pos, crate::config::MAX_ZERO_TAIL_ANY_WINDOW)
        {
            zero_tail_bytes = len - pos;
        } else if let Some((pos, reason)) = w.stopped {
            let past_point = past_point(pos);
            let severity = if last && past_point {
                Severity::TornTail
            } else {
                Severity::Corruption
            };
            out.findings.push(Finding {
                severity,
                path: path.clone(),
                position: pos,
                offset: Some(w.next_offset),
                problem: format!("{reason} ({} bytes from here to the end)", len - pos),
            });
        }
        if !last {
            check_indexes(fs, &path, base, len, &mut out.findings);
        }
        out.segments.push(SegmentInfo {
            path,
            base_offset: base,
            next_offset: w.next_offset,
            bytes: len - zero_tail_bytes,
            zero_tail_bytes,
            batches,
            records,
            max_timestamp: max_ts,
        });
        expect_next = Some(w.next_offset);
    }
    Ok(out)
}

fn check_indexes(
    fs: &dyn FileSystem,
    log: &Path,
    base: u64,
    size: u64,
    findings: &mut Vec<Finding>,
) {
    for (ext, kind) in [("index", Kind::Offset), ("timeindex", Kind::Time)] {
        let path = log.with_extension(ext);
        let max = segment::max_index_file_bytes(size);
        let problem = match fs.read_at_most(&path, max) {
            Ok(data) if data.len() > max => Some(format!(
                "index file larger than any index of this segment ({max} bytes)"
            )),
            Ok(data) => index::decode_file(&path, kind, &data, base, size)
                .err()
                .map(|e| e.to_string()),
            Err(e) => Some(format!("cannot read: {e}")),
        };
        if let Some(problem) = problem {
            findings.push(Finding {
                severity: Severity::Repairable,
                path,
                position: 0,
                offset: Some(base),
                problem: format!("{problem} (rebuilt from the segment when needed)"),
            });
        }
    }
}

/// Every partition under a log's root directory: `(topic, partition, inspection)`, sorted.
pub fn inspect_log(root: &Path) -> Result<Vec<(String, u32, PartitionInspection)>> {
    let fs: &dyn FileSystem = &RealFs;
    let mut out = Vec::new();
    let mut topics: Vec<_> = fs
        .read_dir(root)
        .map_err(|e| Error::io("read directory", root, e))?
        .into_iter()
        .filter(|e| {
            fs.metadata(&root.join(&e.name).join("topic.json"))
                .is_ok_and(|m| !m.is_dir)
        })
        .map(|e| e.name)
        .filter(|n| !n.starts_with('.'))
        .collect();
    topics.sort();
    for topic in topics {
        let tdir = root.join(&topic);
        let mut parts: Vec<u32> = fs
            .read_dir(&tdir)
            .map_err(|e| Error::io("read directory", &tdir, e))?
            .into_iter()
            .filter_map(|e| e.name.parse().ok())
            .collect();
        parts.sort_unstable();
        for p in parts {
            out.push((
                topic.clone(),
                p,
                inspect_partition(&tdir.join(p.to_string()))?,
            ));
        }
    }
    Ok(out)
}

/// A zero tail where [`dump_segment`] stopped: zeros from `position` to the end of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroTail {
    /// Byte position of the first zero after the last batch.
    pub position: u64,
    /// Zero bytes from there to the end of the file.
    pub bytes: u64,
}

/// Calls `each(position, batch)` for every batch of a segment file, in order, stopping at the
/// first bad one (returned as an error naming the file and position).
///
/// Zeros from a batch boundary to the end of the file end the walk, returned as a
/// [`ZeroTail`], only where [`inspect_partition`] takes them for the active segment's zero
/// tail: in the last segment of its partition directory, past the recovery point, at most
/// `MAX_ZERO_AHEAD_BYTES + ZERO_AHEAD_MAX_SYNC_BYTES` long. Anywhere else (a sealed segment,
/// data the recovery point covers, a file outside a partition directory) zeros where a batch
/// should start are corruption, as `verify` reports them: an error naming the position.
/// For `spool inspect dump`.
pub fn dump_segment(path: &Path, mut each: impl FnMut(u64, &Batch)) -> Result<Option<ZeroTail>> {
    let fs: &dyn FileSystem = &RealFs;
    let data = bytes::Bytes::from(segment::read_segment_file(fs, path)?);
    let tail_from = zero_tail_from(fs, path)?;
    let mut pos = 0usize;
    while pos < data.len() {
        if segment::is_zero_tail(&data, pos as u64, crate::config::MAX_ZERO_TAIL_ANY_WINDOW) {
            let zero = ZeroTail {
                position: pos as u64,
                bytes: (data.len() - pos) as u64,
            };
            if tail_from.is_some_and(|from| zero.position >= from) {
                return Ok(Some(zero));
            }
            return Err(Error::corruption(
                path,
                zero.position,
                None,
                format!(
                    "{} zero bytes from here to the end of the file where a batch should \
                     start: zeros end only the last segment's data, past its recovery point",
                    zero.bytes
                ),
            ));
        }
        let rest = &data[pos..];
        let h = BatchHeader::parse(rest)
            .map_err(|e| Error::corruption(path, pos as u64, None, e.to_string()))?;
        if h.total_len() > rest.len() {
            return Err(Error::corruption(
                path,
                pos as u64,
                Some(h.base_offset),
                "batch runs past the end of the file",
            ));
        }
        crate::batch::check_crc(&rest[..h.total_len()], &h)
            .map_err(|e| Error::corruption(path, pos as u64, Some(h.base_offset), e.to_string()))?;
        each(
            pos as u64,
            &Batch::from_parts(h, data.slice(pos..pos + h.total_len())),
        );
        pos += h.total_len();
    }
    Ok(None)
}

/// Where a zero tail may start in the segment file `path`: `None` unless it is the last
/// segment of its directory; else its recovery point's position in it (0 if the point is in
/// an earlier segment or there is none).
fn zero_tail_from(fs: &dyn FileSystem, path: &Path) -> Result<Option<u64>> {
    let Some(base) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(segment::parse_log_name)
    else {
        return Ok(None);
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let later = fs
        .read_dir(dir)
        .map_err(|e| Error::io("read directory", dir, e))?
        .into_iter()
        .filter_map(|e| segment::parse_log_name(&e.name))
        .any(|b| b > base);
    if later {
        return Ok(None);
    }
    Ok(Some(match checkpoint::read_point(fs, dir)? {
        Some(p) if p.segment_base == base => p.position,
        Some(p) if p.segment_base > base => return Ok(None),
        _ => 0,
    }))
}
