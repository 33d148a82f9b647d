//! Sparse indexes of a segment: offset → file position and max timestamp → offset.
//!
//! The active segment's indexes live in memory (appended by the writer, read under a short
//! read lock, never the writer's lock); when a segment is sealed they are written to
//! `NNN.index` and `NNN.timeindex`, fdatasync'd, and from then on memory-mapped.
//!
//! ```text
//! Format (little-endian), both files:
//! header (48 bytes):
//! { magic u32 = "SPIX" | version u16 = 1 | kind u16 (1 offset, 2 time) | base_offset u64
//!   | last_offset u64 | max_timestamp i64 | entry_count u32 | log_size u32
//!   | entries_crc u32 (CRC-32 of the entries) | header_crc u32 (CRC-32 of bytes 0..44) }
//! offset entries (8 bytes):  { relative_offset u32 | position u32 }
//! time entries   (12 bytes): { max_timestamp_so_far i64 | relative_offset u32 }
//! ```
//!
//! An index file is trusted only if both CRCs match, it names the right base offset, its
//! `log_size` equals the segment file's size, and its entries are sound: strictly increasing
//! in both columns, relative offsets within the segment, positions inside the file (checked
//! at load, [`decode_file`]); otherwise it is rebuilt from the segment (the index is derived
//! data).

use crate::error::{Error, Result};
use std::path::Path;

/// Bytes of an index file header.
pub(crate) const HEADER_LEN: usize = 48;
/// Bytes of one offset entry.
pub(crate) const OFFSET_ENTRY: usize = 8;
/// Bytes of one time entry.
pub(crate) const TIME_ENTRY: usize = 12;
const MAGIC: u32 = u32::from_le_bytes(*b"SPIX");
const VERSION: u16 = 1;

const _: () = assert!(OFFSET_ENTRY == 2 * size_of::<u32>());
const _: () = assert!(TIME_ENTRY == size_of::<i64>() + size_of::<u32>());

/// Which index a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Offset = 1,
    Time = 2,
}

impl Kind {
    fn entry_len(self) -> usize {
        match self {
            Kind::Offset => OFFSET_ENTRY,
            Kind::Time => TIME_ENTRY,
        }
    }
}

/// Summary of a sealed segment kept in its index headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentSummary {
    pub(crate) base_offset: u64,
    pub(crate) last_offset: u64,
    pub(crate) max_timestamp: i64,
    pub(crate) log_size: u32,
}

#[inline]
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
#[inline]
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Appends an offset entry.
#[inline]
pub(crate) fn push_offset(buf: &mut Vec<u8>, rel: u32, position: u32) {
    buf.extend_from_slice(&rel.to_le_bytes());
    buf.extend_from_slice(&position.to_le_bytes());
}

/// Appends a time entry.
#[inline]
pub(crate) fn push_time(buf: &mut Vec<u8>, max_ts: i64, rel: u32) {
    buf.extend_from_slice(&max_ts.to_le_bytes());
    buf.extend_from_slice(&rel.to_le_bytes());
}

/// Largest offset entry with `relative_offset <= rel`, as `(relative offset, position)`, or
/// `(0, 0)` (the start of the segment) when there is none.
pub(crate) fn floor_entry(entries: &[u8], rel: u32) -> (u32, u32) {
    let n = entries.len() / OFFSET_ENTRY;
    // Binary search for the first entry with key > rel.
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if le_u32(entries, mid * OFFSET_ENTRY) <= rel {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == 0 {
        (0, 0)
    } else {
        let at = (lo - 1) * OFFSET_ENTRY;
        (le_u32(entries, at), le_u32(entries, at + 4))
    }
}

/// Largest time entry with `max_timestamp_so_far < ts`: returns its relative offset. All
/// records up to and including that batch are older than `ts`, so a scan may start there.
pub(crate) fn time_floor(entries: &[u8], ts: i64) -> Option<u32> {
    let n = entries.len() / TIME_ENTRY;
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if (le_u64(entries, mid * TIME_ENTRY) as i64) < ts {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    (lo > 0).then(|| le_u32(entries, (lo - 1) * TIME_ENTRY + 8))
}

/// Encodes a complete index file.
pub(crate) fn encode_file(kind: Kind, summary: &SegmentSummary, entries: &[u8]) -> Vec<u8> {
    debug_assert_eq!(entries.len() % kind.entry_len(), 0);
    let mut out = Vec::with_capacity(HEADER_LEN + entries.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&summary.base_offset.to_le_bytes());
    out.extend_from_slice(&summary.last_offset.to_le_bytes());
    out.extend_from_slice(&summary.max_timestamp.to_le_bytes());
    out.extend_from_slice(&((entries.len() / kind.entry_len()) as u32).to_le_bytes());
    out.extend_from_slice(&summary.log_size.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(entries).to_le_bytes());
    let header_crc = crc32fast::hash(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);
    out.extend_from_slice(entries);
    out
}

/// Checks an index file image; returns its summary and the entries' byte range on success.
pub(crate) fn decode_file(
    path: &Path,
    kind: Kind,
    data: &[u8],
    base_offset: u64,
    log_size: u64,
) -> Result<(SegmentSummary, std::ops::Range<usize>)> {
    let bad = |reason: String| Err(Error::corruption(path, 0, Some(base_offset), reason));
    if data.len() < HEADER_LEN {
        return bad(format!(
            "index file of {} bytes is shorter than its header",
            data.len()
        ));
    }
    if le_u32(data, 44) != crc32fast::hash(&data[..44]) {
        return bad("index header CRC mismatch".into());
    }
    if le_u32(data, 0) != MAGIC
        || u16::from_le_bytes([data[4], data[5]]) != VERSION
        || u16::from_le_bytes([data[6], data[7]]) != kind as u16
    {
        return bad("bad index magic, version or kind".into());
    }
    let summary = SegmentSummary {
        base_offset: le_u64(data, 8),
        last_offset: le_u64(data, 16),
        max_timestamp: le_u64(data, 24) as i64,
        log_size: le_u32(data, 36),
    };
    let count = le_u32(data, 32) as usize;
    if summary.base_offset != base_offset || u64::from(summary.log_size) != log_size {
        return bad(format!(
            "index describes base {} size {}, segment is base {base_offset} size {log_size}",
            summary.base_offset, summary.log_size
        ));
    }
    let want = count
        .checked_mul(kind.entry_len())
        .and_then(|n| n.checked_add(HEADER_LEN));
    if want != Some(data.len()) {
        return bad(format!(
            "index holds {} bytes for {count} entries",
            data.len()
        ));
    }
    if le_u32(data, 40) != crc32fast::hash(&data[HEADER_LEN..]) {
        return bad("index entries CRC mismatch".into());
    }
    if let Err(reason) = check_entries(kind, &data[HEADER_LEN..], &summary) {
        return bad(reason);
    }
    Ok((summary, HEADER_LEN..data.len()))
}

/// The entries' own rules, which the CRCs cannot vouch for (an index whose CRCs were
/// recomputed, or a valid one left next to a different segment of the same base and size):
/// both columns strictly increasing, every relative offset within the segment
/// (`<= last_offset - base`), and every position inside the file (`< log_size`). A position at
/// or past the end would make a read find nothing in this segment and silently go on with the
/// next one, skipping offsets.
fn check_entries(
    kind: Kind,
    entries: &[u8],
    s: &SegmentSummary,
) -> std::result::Result<(), String> {
    let max_rel = s.last_offset.checked_sub(s.base_offset);
    let mut prev: Option<(u32, i64)> = None;
    for (i, e) in entries.chunks_exact(kind.entry_len()).enumerate() {
        // (relative offset, the other column: a position or a timestamp)
        let (rel, other) = match kind {
            Kind::Offset => {
                let pos = le_u32(e, 4);
                if u64::from(pos) >= u64::from(s.log_size) {
                    return Err(format!(
                        "index entry {i} points at position {pos}, the segment holds {} bytes",
                        s.log_size
                    ));
                }
                (le_u32(e, 0), i64::from(pos))
            }
            Kind::Time => (le_u32(e, 8), le_u64(e, 0) as i64),
        };
        if max_rel.is_none_or(|m| u64::from(rel) > m) {
            return Err(format!(
                "index entry {i} names relative offset {rel}, past the segment's last offset {}",
                s.last_offset
            ));
        }
        if let Some((r, o)) = prev
            && (rel <= r || other <= o)
        {
            return Err(format!("index entry {i} does not increase"));
        }
        prev = Some((rel, other));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_lookups() {
        let mut e = Vec::new();
        for (rel, pos) in [(0u32, 0u32), (10, 4096), (25, 8200)] {
            push_offset(&mut e, rel, pos);
        }
        assert_eq!(floor_entry(&e, 0), (0, 0));
        assert_eq!(floor_entry(&e, 9), (0, 0));
        assert_eq!(floor_entry(&e, 10), (10, 4096));
        assert_eq!(floor_entry(&e, 24), (10, 4096));
        assert_eq!(floor_entry(&e, 1000), (25, 8200));
        assert_eq!(floor_entry(&[], 5), (0, 0));

        let mut t = Vec::new();
        for (ts, rel) in [(100i64, 0u32), (200, 10), (300, 25)] {
            push_time(&mut t, ts, rel);
        }
        assert_eq!(time_floor(&t, 100), None);
        assert_eq!(time_floor(&t, 101), Some(0));
        assert_eq!(time_floor(&t, 300), Some(10));
        assert_eq!(time_floor(&t, 301), Some(25));
    }

    #[test]
    fn file_roundtrip_and_every_bit_flip_detected() {
        let mut e = Vec::new();
        for i in 0..20u32 {
            push_offset(&mut e, i * 3, i * 5000);
        }
        let s = SegmentSummary {
            base_offset: 42,
            last_offset: 100,
            max_timestamp: 7,
            log_size: 123_456,
        };
        let file = encode_file(Kind::Offset, &s, &e);
        let p = Path::new("x.index");
        let (got, range) = decode_file(p, Kind::Offset, &file, 42, 123_456).unwrap();
        assert_eq!(got, s);
        assert_eq!(&file[range], &e[..]);
        for bit in 0..file.len() * 8 {
            let mut f = file.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_file(p, Kind::Offset, &f, 42, 123_456).is_err(),
                "flip of bit {bit} undetected"
            );
        }
        assert!(decode_file(p, Kind::Offset, &file, 42, 123_457).is_err());
        assert!(decode_file(p, Kind::Time, &file, 42, 123_456).is_err());
    }

    /// Entries with valid CRCs that break the entries' rules are refused (review-audit-engine
    /// finding 6).
    #[test]
    fn unsound_entries_are_refused() {
        let s = SegmentSummary {
            base_offset: 100,
            last_offset: 150,
            max_timestamp: 7,
            log_size: 10_000,
        };
        let p = Path::new("x.index");
        let offsets = |es: &[(u32, u32)]| {
            let mut e = Vec::new();
            for &(rel, pos) in es {
                push_offset(&mut e, rel, pos);
            }
            decode_file(
                p,
                Kind::Offset,
                &encode_file(Kind::Offset, &s, &e),
                100,
                10_000,
            )
        };
        assert!(offsets(&[(0, 0), (10, 4000), (50, 9999)]).is_ok());
        assert!(offsets(&[]).is_ok());
        assert!(
            offsets(&[(0, 0), (10, 10_000)]).is_err(),
            "position at the end"
        );
        assert!(
            offsets(&[(0, 0), (51, 4000)]).is_err(),
            "past the last offset"
        );
        assert!(
            offsets(&[(0, 0), (10, 4000), (10, 5000)]).is_err(),
            "rel repeats"
        );
        assert!(
            offsets(&[(0, 0), (10, 4000), (20, 3000)]).is_err(),
            "position goes back"
        );
        let times = |es: &[(i64, u32)]| {
            let mut e = Vec::new();
            for &(ts, rel) in es {
                push_time(&mut e, ts, rel);
            }
            decode_file(p, Kind::Time, &encode_file(Kind::Time, &s, &e), 100, 10_000)
        };
        assert!(times(&[(-1, 0), (5, 10), (7, 50)]).is_ok());
        assert!(times(&[(1, 0), (5, 51)]).is_err(), "past the last offset");
        assert!(times(&[(1, 0), (1, 10)]).is_err(), "timestamp repeats");
        assert!(times(&[(1, 10), (5, 3)]).is_err(), "offset goes back");
    }
}
