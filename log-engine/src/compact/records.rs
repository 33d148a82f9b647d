//! Reading the records of a batch without allocating, and rewriting a batch with some of its
//! records removed.
//!
//! A rewritten batch keeps everything Kafka's cleaner keeps (`MemoryRecords.filterTo` for
//! magic 2): the base offset, `last_offset_delta` (so the producer's last sequence number is
//! unchanged), the partition leader epoch, the producer id, epoch and base sequence, the
//! compression codec, the timestamp type and `max_timestamp`; every surviving record keeps its
//! offset delta, key, value, headers and timestamp. What changes: `records_count`, the records
//! region (recompressed with the same codec), `batch_length` and the CRC-32C, and, when the
//! cleaner first passes a batch holding tombstones, the delete horizon (attribute bit 6, with
//! the horizon in `base_timestamp`; each record's timestamp delta is re-encoded against it, so
//! record timestamps do not change).

use crate::batch::varint::{get_i32, get_i64, len_i32, len_i64, put_i32, put_i64};
use crate::batch::{
    ATTR_DELETE_HORIZON, BatchError, BatchHeader, CRC_START, Compression, HEADER_LEN, LOG_OVERHEAD,
};
use crate::config::Limits;

/// One record of a batch, as slices of the records region.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rec<'a> {
    /// Offset relative to the batch's base offset.
    pub(crate) offset_delta: i32,
    /// Timestamp relative to the batch's `base_timestamp`.
    pub(crate) timestamp_delta: i64,
    /// The key (`None`: a null key).
    pub(crate) key: Option<&'a [u8]>,
    /// True for a null value: a tombstone.
    pub(crate) tombstone: bool,
    /// The attributes byte.
    pub(crate) attributes: u8,
    /// The whole record, its length prefix included.
    pub(crate) raw: &'a [u8],
    /// The record from its key length on (key, value, headers): what a re-encode copies.
    pub(crate) tail: &'a [u8],
}

fn bad(index: u32, reason: &str) -> BatchError {
    BatchError::BadRecord {
        index,
        reason: reason.to_owned(),
    }
}

/// Iterator over the records of an (uncompressed) records region.
#[derive(Debug)]
pub(crate) struct Scan<'a> {
    buf: &'a [u8],
    pos: usize,
    index: u32,
    remaining: u32,
    max_record: u32,
}

/// The records of `buf`, the (decompressed) records region of a batch of `count` records.
pub(crate) fn scan<'a>(buf: &'a [u8], count: i32, limits: &Limits) -> Scan<'a> {
    Scan {
        buf,
        pos: 0,
        index: 0,
        remaining: count.max(0) as u32,
        max_record: limits.max_record_bytes,
    }
}

impl<'a> Scan<'a> {
    fn next_record(&mut self) -> Result<Rec<'a>, BatchError> {
        let index = self.index;
        let buf = self.buf;
        let start = self.pos;
        let mut pos = start;
        let len = get_i32(buf, &mut pos)?;
        if len <= 0 || len as usize > buf.len() - pos {
            return Err(bad(index, "record length out of bounds"));
        }
        if len as u32 > self.max_record {
            return Err(BatchError::Limit {
                what: "record size",
                limit: u64::from(self.max_record),
                actual: len as u64,
            });
        }
        let end = pos + len as usize;
        let rec = &buf[..end];
        let attributes = rec[pos];
        pos += 1;
        let timestamp_delta = get_i64(rec, &mut pos)?;
        let offset_delta = get_i32(rec, &mut pos)?;
        let tail_start = pos;
        let key_len = get_i32(rec, &mut pos)?;
        let key = if key_len < 0 {
            None
        } else {
            let k = rec
                .get(pos..pos + key_len as usize)
                .ok_or_else(|| bad(index, "key runs past the record"))?;
            pos += key_len as usize;
            Some(k)
        };
        let value_len = get_i32(rec, &mut pos)?;
        if value_len > 0 && value_len as usize > end - pos {
            return Err(bad(index, "value runs past the record"));
        }
        self.pos = end;
        self.index += 1;
        Ok(Rec {
            offset_delta,
            timestamp_delta,
            key,
            tombstone: value_len < 0,
            attributes,
            raw: &buf[start..end],
            tail: &buf[tail_start..end],
        })
    }
}

impl<'a> Iterator for Scan<'a> {
    type Item = Result<Rec<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let r = self.next_record();
        if r.is_err() {
            self.remaining = 0;
        }
        Some(r)
    }
}

/// The records region of `batch` (header `h`): borrowed when uncompressed, else decompressed
/// into `scratch` (within `limits`). gzip and snappy are `Unsupported`.
pub(crate) fn records_region<'a>(
    batch: &'a [u8],
    h: &BatchHeader,
    limits: &Limits,
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], BatchError> {
    let body = batch
        .get(HEADER_LEN..h.total_len())
        .ok_or(BatchError::Truncated("batch"))?;
    match h.compression()? {
        Compression::None => Ok(body),
        c => {
            c.decompress_into(body, limits.max_decompressed_bytes, scratch)?;
            Ok(&scratch[..])
        }
    }
}

/// Checks, at append to a compacted topic, that every record of the (already validated)
/// `batch` has a key, and that the batch is one the cleaner can read: not gzip or snappy
/// (Spool cannot decode them, so their keys are unknown) and without the delete-horizon
/// attribute (set only by the cleaner).
pub(crate) fn check_compactable(
    batch: &[u8],
    h: &BatchHeader,
    limits: &Limits,
) -> Result<(), BatchError> {
    if h.delete_horizon().is_some() {
        return Err(BatchError::Unsupported(
            "the delete-horizon attribute (bit 6) in a produced batch: only the log cleaner sets it",
        ));
    }
    if matches!(h.compression()?, Compression::Gzip | Compression::Snappy) {
        return Err(BatchError::Unsupported(
            "gzip and snappy batches on a compacted topic (the cleaner cannot read their keys)",
        ));
    }
    let mut scratch = Vec::new();
    let region = records_region(batch, h, limits, &mut scratch)?;
    for (index, r) in scan(region, h.records_count, limits).enumerate() {
        if r?.key.is_none() {
            return Err(BatchError::KeyRequired {
                index: index as u32,
            });
        }
    }
    Ok(())
}

/// Encodes into `out` (cleared first) the batch `orig` (header `h`) keeping only `kept`, its
/// records in order. With `horizon`, the batch gets that delete horizon (attribute bit 6,
/// `base_timestamp` = horizon) and every record's timestamp delta is re-encoded against it;
/// `body` is scratch space.
pub(crate) fn rebuild(
    orig: &[u8],
    h: &BatchHeader,
    kept: &[Rec<'_>],
    horizon: Option<i64>,
    body: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(), BatchError> {
    let compression = h.compression()?;
    out.clear();
    out.extend_from_slice(&orig[..HEADER_LEN]);
    let direct = compression == Compression::None;
    let dst: &mut Vec<u8> = if direct {
        out
    } else {
        body.clear();
        body
    };
    let base_ts = horizon.unwrap_or(h.base_timestamp);
    for r in kept {
        match horizon {
            None => dst.extend_from_slice(r.raw),
            Some(new_base) => {
                // Same timestamp, new base: ts = old base + old delta = new base + new delta.
                let ts = h.base_timestamp.wrapping_add(r.timestamp_delta);
                let delta = ts.wrapping_sub(new_base);
                let len = 1 + len_i64(delta) + len_i32(r.offset_delta) + r.tail.len();
                put_i32(dst, len as i32);
                dst.push(r.attributes);
                put_i64(dst, delta);
                put_i32(dst, r.offset_delta);
                dst.extend_from_slice(r.tail);
            }
        }
    }
    if !direct {
        compression.compress(body, out)?;
    }
    let batch_length = i32::try_from(out.len() - LOG_OVERHEAD)
        .map_err(|_| BatchError::Unsupported("batch larger than 2 GiB"))?;
    out[8..12].copy_from_slice(&batch_length.to_be_bytes());
    let mut attributes = h.attributes;
    if horizon.is_some() {
        attributes |= ATTR_DELETE_HORIZON;
    }
    out[21..23].copy_from_slice(&attributes.to_be_bytes());
    out[27..35].copy_from_slice(&base_ts.to_be_bytes());
    out[57..61].copy_from_slice(&(kept.len() as i32).to_be_bytes());
    let crc = crc32c::crc32c(&out[CRC_START..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, split_batches};
    use bytes::Bytes;

    fn sample(c: Compression) -> Bytes {
        let mut b = BatchBuilder::new(c);
        b.producer(7, 2, 100);
        b.push(1000, Some(b"a"), Some(b"1"), &[("h", Some(b"x"))]);
        b.push(1005, Some(b"b"), None, &[]);
        b.push(990, Some(b"c"), Some(b"3"), &[("h2", None)]);
        b.push(1010, Some(b"a"), Some(b"4"), &[]);
        let mut v = b.finish().unwrap().to_vec();
        v[0..8].copy_from_slice(&500i64.to_be_bytes());
        Bytes::from(v)
    }

    #[test]
    fn rebuild_keeps_offsets_timestamps_and_producer_fields() {
        let limits = Limits::default();
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            for horizon in [None, Some(5_000_000)] {
                let orig = sample(c);
                let h = BatchHeader::parse(&orig).unwrap();
                let mut scratch = Vec::new();
                let region = records_region(&orig, &h, &limits, &mut scratch).unwrap();
                let recs: Vec<Rec> = scan(region, h.records_count, &limits)
                    .collect::<Result<_, _>>()
                    .unwrap();
                assert_eq!(recs.len(), 4);
                assert!(recs[1].tombstone && !recs[0].tombstone);
                let kept = [recs[1], recs[2]];
                let (mut body, mut out) = (Vec::new(), Vec::new());
                rebuild(&orig, &h, &kept, horizon, &mut body, &mut out).unwrap();
                // Not `Batch::new`: it insists on records_count = last_offset_delta + 1, which
                // a compacted batch (like Kafka's) no longer meets.
                let bytes = Bytes::from(out.clone());
                let mut all = split_batches(&bytes);
                let b = all.next().unwrap().unwrap();
                assert!(all.next().is_none());
                let nh = *b.header();
                assert_eq!(nh.base_offset, 500);
                assert_eq!(nh.last_offset_delta, 3);
                assert_eq!(nh.records_count, 2);
                assert_eq!(
                    (nh.producer_id, nh.producer_epoch, nh.base_sequence),
                    (7, 2, 100)
                );
                assert_eq!(nh.max_timestamp, h.max_timestamp);
                assert_eq!(nh.delete_horizon(), horizon);
                let got: Vec<_> = b
                    .records(&limits.decode())
                    .unwrap()
                    .map(|r| r.unwrap())
                    .collect();
                assert_eq!(
                    got.iter()
                        .map(|r| (r.offset, r.timestamp, r.value.is_none()))
                        .collect::<Vec<_>>(),
                    vec![(501, 1005, true), (502, 990, false)],
                    "{c:?} {horizon:?}"
                );
                assert_eq!(got[1].headers.len(), 1);
            }
        }
    }

    #[test]
    fn keyless_records_are_refused_for_compaction() {
        let limits = Limits::default();
        let mut b = BatchBuilder::new(Compression::Lz4);
        b.push(1, Some(b"k"), Some(b"v"), &[]);
        b.push(2, None, Some(b"v"), &[]);
        let batch = b.finish().unwrap();
        let h = BatchHeader::parse(&batch).unwrap();
        assert_eq!(
            check_compactable(&batch, &h, &limits),
            Err(BatchError::KeyRequired { index: 1 })
        );
        let mut b = BatchBuilder::new(Compression::None);
        b.push(1, Some(b"k"), None, &[]);
        let batch = b.finish().unwrap();
        let h = BatchHeader::parse(&batch).unwrap();
        check_compactable(&batch, &h, &limits).unwrap();
    }
}
