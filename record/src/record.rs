//! Records inside a batch: decoding (zero-copy slices of the batch when uncompressed) and the
//! structural check run on append.
//!
//! ```text
//! Format (Kafka record, varints zig-zag):
//! { length varint | attributes i8 | timestamp_delta varlong | offset_delta varint
//!   | key_length varint (-1 = null) | key | value_length varint (-1 = null) | value
//!   | header_count varint | { key_length varint | key (UTF-8) | value_length varint | value }* }
//! ```
//!
//! Each length is checked against the bytes left in the record before it is used; a header
//! count is bounded by the bytes left (each header takes at least two bytes) and by
//! [`DecodeLimits::max_headers_per_record`], so no input can make the decoder allocate more than the
//! batch it came in.

use std::io::BufRead;
use std::ops::Range;

use bytes::Bytes;

use super::varint::{get_i32, get_i64};
use super::{BatchError, BatchHeader, Compression, HEADER_LEN};
use crate::DecodeLimits;

/// One record header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header name (UTF-8).
    pub key: String,
    /// Header value; `None` is Kafka's null.
    pub value: Option<Bytes>,
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Absolute offset.
    pub offset: u64,
    /// Timestamp in milliseconds since the epoch.
    pub timestamp: i64,
    /// Key; `None` is Kafka's null key.
    pub key: Option<Bytes>,
    /// Value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers in order.
    pub headers: Vec<Header>,
}

/// Positions of one record's parts inside the records region (logical positions when the
/// region is streamed).
struct Parsed {
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<Range<usize>>,
    value: Option<Range<usize>>,
    headers_start: usize,
    header_count: u32,
    end: usize,
}

fn bad(index: u32, reason: impl Into<String>) -> BatchError {
    BatchError::BadRecord {
        index,
        reason: reason.into(),
    }
}

/// Where the record walker reads from: a slice (an uncompressed batch, or one decompressed in
/// full for decoding) or a stream (a compressed batch checked on append without holding its
/// records). The structural rules live once, in [`parse_one`] and [`check_records_from`].
trait Source {
    /// Bytes consumed so far.
    fn pos(&self) -> usize;
    /// Bytes left, when known (a slice). A stream finds out on read.
    fn left(&self) -> Option<usize>;
    /// True when nothing is left.
    fn at_end(&mut self) -> Result<bool, BatchError>;
    /// A zig-zag varint that must end at or before `end`.
    fn varint(&mut self, end: usize) -> Result<i32, BatchError>;
    /// A zig-zag varlong that must end at or before `end`.
    fn varlong(&mut self, end: usize) -> Result<i64, BatchError>;
    /// Skips `n` bytes the caller knows are inside the current record.
    fn skip(&mut self, n: usize) -> Result<(), BatchError>;
}

/// A records region in memory.
struct SliceSource<'a> {
    buf: &'a [u8],
    pos: usize,
}

// Inlined into the record walk: it runs once per field of every record appended.
impl Source for SliceSource<'_> {
    #[inline]
    fn pos(&self) -> usize {
        self.pos
    }
    #[inline]
    fn left(&self) -> Option<usize> {
        Some(self.buf.len() - self.pos)
    }
    #[inline]
    fn at_end(&mut self) -> Result<bool, BatchError> {
        Ok(self.pos >= self.buf.len())
    }
    #[inline]
    fn varint(&mut self, end: usize) -> Result<i32, BatchError> {
        get_i32(&self.buf[..end.min(self.buf.len())], &mut self.pos)
    }
    #[inline]
    fn varlong(&mut self, end: usize) -> Result<i64, BatchError> {
        get_i64(&self.buf[..end.min(self.buf.len())], &mut self.pos)
    }
    #[inline]
    fn skip(&mut self, n: usize) -> Result<(), BatchError> {
        if n > self.buf.len() - self.pos {
            return Err(BatchError::Truncated("record"));
        }
        self.pos += n;
        Ok(())
    }
}

/// A records region decoded as it is read (a compressed batch), of at most `limit` bytes.
struct StreamSource<R> {
    r: R,
    pos: usize,
    limit: usize,
}

impl<R: BufRead> StreamSource<R> {
    fn fill(&mut self) -> Result<&[u8], BatchError> {
        self.r
            .fill_buf()
            .map_err(|e| BatchError::Decompress(e.to_string()))
    }

    fn consume(&mut self, n: usize) -> Result<(), BatchError> {
        self.r.consume(n);
        self.pos += n;
        if self.pos > self.limit {
            return Err(BatchError::Limit {
                what: "decompressed batch size",
                limit: self.limit as u64,
                actual: self.pos as u64,
            });
        }
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, BatchError> {
        let b = *self
            .fill()?
            .first()
            .ok_or(BatchError::Truncated("varint"))?;
        self.consume(1)?;
        Ok(b)
    }

    /// Reads an unsigned varint of at most `max_bytes` bytes ending at or before `end`.
    fn raw_varint(&mut self, end: usize, max_bytes: usize) -> Result<u64, BatchError> {
        let mut v: u64 = 0;
        for i in 0..max_bytes {
            if self.pos >= end {
                return Err(BatchError::Truncated("varint"));
            }
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(BatchError::BadVarint)
    }
}

impl<R: BufRead> Source for StreamSource<R> {
    fn pos(&self) -> usize {
        self.pos
    }
    fn left(&self) -> Option<usize> {
        None
    }
    fn at_end(&mut self) -> Result<bool, BatchError> {
        Ok(self.fill()?.is_empty())
    }
    fn varint(&mut self, end: usize) -> Result<i32, BatchError> {
        let raw = self.raw_varint(end, 5)?;
        if raw > u64::from(u32::MAX) {
            return Err(BatchError::BadVarint);
        }
        let raw = raw as u32;
        Ok(((raw >> 1) as i32) ^ -((raw & 1) as i32))
    }
    fn varlong(&mut self, end: usize) -> Result<i64, BatchError> {
        let raw = self.raw_varint(end, 10)?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }
    fn skip(&mut self, mut n: usize) -> Result<(), BatchError> {
        while n > 0 {
            let k = self.fill()?.len().min(n);
            if k == 0 {
                return Err(BatchError::Truncated("record"));
            }
            self.consume(k)?;
            n -= k;
        }
        Ok(())
    }
}

/// Reads a nullable length-prefixed field ending at most at `end`.
#[inline]
fn nullable(
    src: &mut impl Source,
    end: usize,
    index: u32,
    what: &str,
) -> Result<Option<Range<usize>>, BatchError> {
    let len = src.varint(end)?;
    // Kafka's readers take any negative length as null; so do we.
    if len < 0 {
        return Ok(None);
    }
    let pos = src.pos();
    if len as usize > end - pos {
        return Err(bad(
            index,
            format!("{what} length {len} with {} bytes left", end - pos),
        ));
    }
    src.skip(len as usize)?;
    Ok(Some(pos..pos + len as usize))
}

fn parse_one(
    src: &mut impl Source,
    index: u32,
    limits: &DecodeLimits,
) -> Result<Parsed, BatchError> {
    let len = src.varint(usize::MAX)?;
    let left = src.left();
    if len < 0 || left.is_some_and(|left| len as usize > left) {
        return Err(bad(
            index,
            match left {
                Some(left) => format!("length {len} with {left} bytes left"),
                None => format!("length {len}"),
            },
        ));
    }
    if len as u32 > limits.max_record_bytes {
        return Err(BatchError::Limit {
            what: "record size",
            limit: u64::from(limits.max_record_bytes),
            actual: len as u64,
        });
    }
    let end = src.pos() + len as usize;
    if src.pos() >= end {
        return Err(bad(index, "empty record"));
    }
    src.skip(1)?; // attributes, unused in v2
    let timestamp_delta = src.varlong(end)?;
    let offset_delta = src.varint(end)?;
    let key = nullable(src, end, index, "key")?;
    if let Some(k) = &key
        && k.len() > limits.max_key_bytes as usize
    {
        return Err(BatchError::Limit {
            what: "key size",
            limit: u64::from(limits.max_key_bytes),
            actual: k.len() as u64,
        });
    }
    let value = nullable(src, end, index, "value")?;
    let header_count = src.varint(end)?;
    if header_count < 0
        || header_count as u32 > limits.max_headers_per_record
        || header_count as usize > (end - src.pos()) / 2
    {
        return Err(bad(index, format!("header count {header_count}")));
    }
    let headers_start = src.pos();
    for _ in 0..header_count {
        if nullable(src, end, index, "header key")?.is_none() {
            return Err(bad(index, "null header key"));
        }
        nullable(src, end, index, "header value")?;
    }
    if src.pos() != end {
        return Err(bad(index, format!("{} trailing bytes", end - src.pos())));
    }
    Ok(Parsed {
        timestamp_delta,
        offset_delta,
        key,
        value,
        headers_start,
        header_count: header_count as u32,
        end,
    })
}

/// Walks the records of an uncompressed batch without allocating: count, lengths, strictly
/// increasing offset deltas ending at `last_offset_delta`, no trailing bytes.
pub(super) fn check_records(
    buf: &[u8],
    h: &BatchHeader,
    limits: &DecodeLimits,
) -> Result<(), BatchError> {
    check_records_from(&mut SliceSource { buf, pos: 0 }, h, limits)
}

/// The same walk over a compressed batch's records, decompressed as they are read (never
/// held whole): memory is the codec's state and a small buffer, whatever the batch claims;
/// work stops at `max_decompressed_bytes` of output.
pub(super) fn check_compressed_records(
    body: &[u8],
    compression: Compression,
    h: &BatchHeader,
    limits: &DecodeLimits,
) -> Result<(), BatchError> {
    let r = compression.reader(body, limits.max_decompressed_bytes)?;
    let mut src = StreamSource {
        r,
        pos: 0,
        limit: limits.max_decompressed_bytes as usize,
    };
    check_records_from(&mut src, h, limits)
}

fn check_records_from(
    src: &mut impl Source,
    h: &BatchHeader,
    limits: &DecodeLimits,
) -> Result<(), BatchError> {
    let mut prev_delta: i64 = -1;
    for index in 0..h.records_count as u32 {
        if src.at_end()? {
            return Err(BatchError::BadRecordCount(format!(
                "header says {} records, found {index}",
                h.records_count
            )));
        }
        let p = parse_one(src, index, limits)?;
        if i64::from(p.offset_delta) <= prev_delta {
            return Err(bad(
                index,
                format!("offset delta {} not increasing", p.offset_delta),
            ));
        }
        prev_delta = i64::from(p.offset_delta);
    }
    if !src.at_end()? {
        return Err(BatchError::BadRecordCount(match src.left() {
            Some(left) => format!("{left} bytes after the last of {} records", h.records_count),
            None => format!("bytes after the last of {} records", h.records_count),
        }));
    }
    if prev_delta != i64::from(h.last_offset_delta) {
        return Err(BatchError::BadRecordCount(format!(
            "last record has offset delta {prev_delta}, header says {}",
            h.last_offset_delta
        )));
    }
    Ok(())
}

/// Iterator over the records of one batch.
#[derive(Debug)]
pub struct Records {
    buf: Bytes,
    pos: usize,
    remaining: u32,
    index: u32,
    base_offset: u64,
    base_timestamp: i64,
    /// With LogAppendTime, every record's timestamp is the batch's max timestamp.
    log_append_time: Option<i64>,
    limits: DecodeLimits,
}

impl Records {
    pub(super) fn new(
        h: &BatchHeader,
        batch: &Bytes,
        limits: &DecodeLimits,
    ) -> Result<Records, BatchError> {
        if batch.len() < h.total_len() || h.total_len() < HEADER_LEN {
            return Err(BatchError::Truncated("batch"));
        }
        let body = batch.slice(HEADER_LEN..h.total_len());
        let buf = match h.compression()? {
            Compression::None => body,
            c => Bytes::from(c.decompress(&body, limits.max_decompressed_bytes)?),
        };
        if h.records_count < 0 || h.records_count as u32 > limits.max_records_per_batch {
            return Err(BatchError::BadRecordCount(h.records_count.to_string()));
        }
        Ok(Records {
            buf,
            pos: 0,
            remaining: h.records_count as u32,
            index: 0,
            base_offset: h.base_offset,
            base_timestamp: h.base_timestamp,
            log_append_time: h.is_log_append_time().then_some(h.max_timestamp),
            limits: *limits,
        })
    }

    /// Bytes of the buffer the records are slices of: the decompressed data, or the batch's
    /// own bytes when it is not compressed (what the decoded records keep alive).
    pub fn buffer_len(&self) -> usize {
        self.buf.len()
    }

    fn decode_next(&mut self) -> Result<Record, BatchError> {
        let mut src = SliceSource {
            buf: &self.buf,
            pos: self.pos,
        };
        let p = parse_one(&mut src, self.index, &self.limits)?;
        let mut headers = Vec::with_capacity(p.header_count as usize);
        let mut hsrc = SliceSource {
            buf: &self.buf,
            pos: p.headers_start,
        };
        for _ in 0..p.header_count {
            let k = nullable(&mut hsrc, p.end, self.index, "header key")?
                .ok_or_else(|| bad(self.index, "null header key"))?;
            // Kafka decodes header names as UTF-8 without failing; so do we (lossily).
            let key = String::from_utf8_lossy(&self.buf[k]).into_owned();
            let value =
                nullable(&mut hsrc, p.end, self.index, "header value")?.map(|r| self.buf.slice(r));
            headers.push(Header { key, value });
        }
        self.pos = p.end;
        self.index += 1;
        Ok(Record {
            offset: self.base_offset.wrapping_add(p.offset_delta as u64),
            timestamp: self
                .log_append_time
                .unwrap_or_else(|| self.base_timestamp.wrapping_add(p.timestamp_delta)),
            key: p.key.map(|r| self.buf.slice(r)),
            value: p.value.map(|r| self.buf.slice(r)),
            headers,
        })
    }
}

impl Iterator for Records {
    type Item = Result<Record, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let r = self.decode_next();
        if r.is_err() {
            self.remaining = 0;
        }
        Some(r)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining as usize))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{BatchBuilder, HEADER_LEN};

    /// Records of a few shapes, uncompressed, with one byte changed (or not), and a header
    /// count that is true or off by one.
    fn region() -> impl Strategy<Value = (Vec<u8>, i32)> {
        (
            prop::collection::vec(
                (
                    prop::option::of(prop::collection::vec(any::<u8>(), 0..6)),
                    prop::option::of(prop::collection::vec(any::<u8>(), 0..10)),
                    0usize..3,
                ),
                1..5,
            ),
            any::<prop::sample::Index>(),
            any::<u8>(),
            any::<bool>(),
            -1i32..=1,
        )
            .prop_map(|(records, at, byte, mutate, count_off)| {
                let mut b = BatchBuilder::new(Compression::None);
                for (k, v, headers) in &records {
                    let hs = vec![("h", Some(&b"x"[..])); *headers];
                    b.push(0, k.as_deref(), v.as_deref(), &hs);
                }
                let mut body = b.finish().unwrap()[HEADER_LEN..].to_vec();
                if mutate {
                    let i = at.index(body.len());
                    body[i] = byte;
                }
                (body, records.len() as i32 + count_off)
            })
    }

    fn header(count: i32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            batch_length: 0,
            partition_leader_epoch: 0,
            crc: 0,
            attributes: 0,
            last_offset_delta: count - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            records_count: count,
        }
    }

    proptest! {
        /// The streaming walk (compressed batches, on append) and the in-memory walk
        /// (uncompressed batches) accept exactly the same records regions.
        #[test]
        fn streamed_and_in_memory_checks_agree((body, count) in region(), zstd in any::<bool>()) {
            let h = header(count.max(0));
            let limits = DecodeLimits::default();
            let in_memory = check_records(&body, &h, &limits);
            let codec = if zstd { Compression::Zstd } else { Compression::Lz4 };
            let mut packed = Vec::new();
            codec.compress(&body, &mut packed).unwrap();
            let streamed = check_compressed_records(&packed, codec, &h, &limits);
            prop_assert_eq!(in_memory.is_ok(), streamed.is_ok(), "{:?} vs {:?}", in_memory, streamed);
        }

        /// The streaming walk stops at `max_decompressed_bytes` of output.
        #[test]
        fn streamed_check_stops_at_the_decompressed_limit((body, count) in region()) {
            let h = header(count.max(0));
            let limits = DecodeLimits { max_decompressed_bytes: body.len() as u32 - 1, ..DecodeLimits::default() };
            let mut packed = Vec::new();
            Compression::Zstd.compress(&body, &mut packed).unwrap();
            prop_assert!(check_compressed_records(&packed, Compression::Zstd, &h, &limits).is_err());
        }
    }
}
