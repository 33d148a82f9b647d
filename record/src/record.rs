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

/// Positions of one record's parts inside the records buffer.
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

/// Reads a nullable length-prefixed field ending at most at `end`.
fn nullable(
    buf: &[u8],
    pos: &mut usize,
    end: usize,
    index: u32,
    what: &str,
) -> Result<Option<Range<usize>>, BatchError> {
    let len = get_i32(&buf[..end], pos)?;
    // Kafka's readers take any negative length as null; so do we.
    if len < 0 {
        return Ok(None);
    }
    if len as usize > end - *pos {
        return Err(bad(
            index,
            format!("{what} length {len} with {} bytes left", end - *pos),
        ));
    }
    let r = *pos..*pos + len as usize;
    *pos = r.end;
    Ok(Some(r))
}

fn parse_one(
    buf: &[u8],
    start: usize,
    index: u32,
    limits: &DecodeLimits,
) -> Result<Parsed, BatchError> {
    let mut pos = start;
    let len = get_i32(buf, &mut pos)?;
    if len < 0 || len as usize > buf.len() - pos {
        return Err(bad(
            index,
            format!("length {len} with {} bytes left", buf.len() - pos),
        ));
    }
    if len as u32 > limits.max_record_bytes {
        return Err(BatchError::Limit {
            what: "record size",
            limit: u64::from(limits.max_record_bytes),
            actual: len as u64,
        });
    }
    let end = pos + len as usize;
    if pos >= end {
        return Err(bad(index, "empty record"));
    }
    pos += 1; // attributes, unused in v2
    let rec = &buf[..end];
    let timestamp_delta = get_i64(rec, &mut pos)?;
    let offset_delta = get_i32(rec, &mut pos)?;
    let key = nullable(buf, &mut pos, end, index, "key")?;
    if let Some(k) = &key
        && k.len() > limits.max_key_bytes as usize
    {
        return Err(BatchError::Limit {
            what: "key size",
            limit: u64::from(limits.max_key_bytes),
            actual: k.len() as u64,
        });
    }
    let value = nullable(buf, &mut pos, end, index, "value")?;
    let header_count = get_i32(rec, &mut pos)?;
    if header_count < 0
        || header_count as u32 > limits.max_headers_per_record
        || header_count as usize > (end - pos) / 2
    {
        return Err(bad(index, format!("header count {header_count}")));
    }
    let headers_start = pos;
    for _ in 0..header_count {
        if nullable(buf, &mut pos, end, index, "header key")?.is_none() {
            return Err(bad(index, "null header key"));
        }
        nullable(buf, &mut pos, end, index, "header value")?;
    }
    if pos != end {
        return Err(bad(index, format!("{} trailing bytes", end - pos)));
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
    let mut pos = 0;
    let mut prev_delta: i64 = -1;
    for index in 0..h.records_count as u32 {
        if pos >= buf.len() {
            return Err(BatchError::BadRecordCount(format!(
                "header says {} records, found {index}",
                h.records_count
            )));
        }
        let p = parse_one(buf, pos, index, limits)?;
        if i64::from(p.offset_delta) <= prev_delta {
            return Err(bad(
                index,
                format!("offset delta {} not increasing", p.offset_delta),
            ));
        }
        prev_delta = i64::from(p.offset_delta);
        pos = p.end;
    }
    if pos != buf.len() {
        return Err(BatchError::BadRecordCount(format!(
            "{} bytes after the last of {} records",
            buf.len() - pos,
            h.records_count
        )));
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

    fn decode_next(&mut self) -> Result<Record, BatchError> {
        let p = parse_one(&self.buf, self.pos, self.index, &self.limits)?;
        let mut headers = Vec::with_capacity(p.header_count as usize);
        let mut hpos = p.headers_start;
        for _ in 0..p.header_count {
            let k = nullable(&self.buf, &mut hpos, p.end, self.index, "header key")?
                .ok_or_else(|| bad(self.index, "null header key"))?;
            // Kafka decodes header names as UTF-8 without failing; so do we (lossily).
            let key = String::from_utf8_lossy(&self.buf[k]).into_owned();
            let value = nullable(&self.buf, &mut hpos, p.end, self.index, "header value")?
                .map(|r| self.buf.slice(r));
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
