//! Kafka RecordBatch v2 (magic 2), byte for byte: Spool's record format, shared by the log
//! engine (which stores batches), the client (which builds and decodes them), the CLI, the load
//! generator and the benchmarks, and owned by none of them (as Kafka's `common/record`).
//!
//! The same bytes are written to disk and sent on the wire. [`validate_batch`] parses and
//! checks the 61-byte header, checks the CRC-32C, and for uncompressed batches walks the
//! records to check their structure; nothing here re-encodes a stored batch. Assigning offsets
//! ([`assign`]) only rewrites `base_offset` and `partition_leader_epoch`, which sit before the
//! CRC'd region, so the CRC is computed once, by the producer.
//!
//! This crate depends on no storage, network or runtime code; its errors are [`BatchError`]
//! and its bounds are [`DecodeLimits`] (the engine supplies its own from its `Limits`).
//!
//! ```text
//! Format (big-endian, as Kafka):
//! { base_offset i64 | batch_length i32 | partition_leader_epoch i32 | magic i8 = 2 | crc u32
//!   | attributes i16 | last_offset_delta i32 | base_timestamp i64 | max_timestamp i64
//!   | producer_id i64 | producer_epoch i16 | base_sequence i32 | records_count i32
//!   | records... }
//! crc = CRC-32C(bytes[21..]), batch_length = total length - 12
//! ```
//!
//! Every length read here is checked against the bytes actually present (and against
//! [`DecodeLimits`]) before it is used to slice or allocate.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod builder;
mod compression;
mod limits;
mod record;
pub mod varint;

pub use builder::BatchBuilder;
pub use compression::Compression;
pub use limits::{DecodeLimits, MAX_BATCH_BYTES};
pub use record::{Header, Record, Records};

use bytes::Bytes;

/// Bytes of the fixed batch header.
pub const HEADER_LEN: usize = 61;
/// Bytes before `batch_length` counts (base offset and the length field itself).
pub const LOG_OVERHEAD: usize = 12;
/// The only supported magic byte.
pub const MAGIC: i8 = 2;
/// First byte covered by the CRC (the attributes field).
pub const CRC_START: usize = 21;

const OFF_BATCH_LENGTH: usize = 8;
const OFF_LEADER_EPOCH: usize = 12;
const OFF_MAGIC: usize = 16;
const OFF_CRC: usize = 17;
const OFF_ATTRIBUTES: usize = 21;
const OFF_LAST_OFFSET_DELTA: usize = 23;
const OFF_BASE_TIMESTAMP: usize = 27;
const OFF_MAX_TIMESTAMP: usize = 35;
const OFF_PRODUCER_ID: usize = 43;
const OFF_PRODUCER_EPOCH: usize = 51;
const OFF_BASE_SEQUENCE: usize = 53;
const OFF_RECORDS_COUNT: usize = 57;

const _: () = assert!(OFF_RECORDS_COUNT + 4 == HEADER_LEN);
const _: () = assert!(OFF_CRC + 4 == CRC_START);

/// Attribute bits.
const ATTR_COMPRESSION_MASK: i16 = 0x07;
const ATTR_TIMESTAMP_TYPE: i16 = 0x08;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;
/// Attribute bit 6: the batch's `base_timestamp` holds the log cleaner's delete horizon
/// (Kafka's KIP-534).
pub const ATTR_DELETE_HORIZON: i16 = 0x40;
const ATTR_KNOWN: i16 = ATTR_COMPRESSION_MASK
    | ATTR_TIMESTAMP_TYPE
    | ATTR_TRANSACTIONAL
    | ATTR_CONTROL
    | ATTR_DELETE_HORIZON;

/// Why a batch was refused. Every variant means "nothing was written".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Fewer bytes than a field needs.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// `batch_length` does not match the bytes given.
    #[error("batch_length field says {declared} bytes but {actual} follow it")]
    LengthMismatch {
        /// Value of the field.
        declared: i64,
        /// Bytes actually present after it.
        actual: u64,
    },
    /// Magic byte other than 2.
    #[error("unsupported magic {0} (only RecordBatch v2, magic 2)")]
    BadMagic(i8),
    /// CRC-32C mismatch.
    #[error("CRC-32C mismatch: header says {stored:#010x}, bytes give {computed:#010x}")]
    BadCrc {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// Unknown attribute bits or compression codec.
    #[error("unsupported attributes {0:#06x}")]
    BadAttributes(i16),
    /// Record count out of range or not matching the records.
    #[error("bad record count: {0}")]
    BadRecordCount(String),
    /// A varint longer than its type allows.
    #[error("malformed varint")]
    BadVarint,
    /// A record's fields are inconsistent.
    #[error("malformed record {index}: {reason}")]
    BadRecord {
        /// Index of the record in the batch.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// A limit from [`DecodeLimits`] was exceeded.
    #[error("{what} of {actual} exceeds the limit of {limit}")]
    Limit {
        /// Which limit.
        what: &'static str,
        /// Limit.
        limit: u64,
        /// Size seen.
        actual: u64,
    },
    /// A feature the engine does not accept on this path.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// Decompression failed.
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// A record without a key was appended to a compacted topic, which keeps the latest
    /// record of each key and so needs one on every record (as Kafka).
    #[error("record {index} has no key: a compacted topic needs a key on every record")]
    KeyRequired {
        /// Index of the record in the batch.
        index: u32,
    },
}

/// The `what` of a [`BatchError::Limit`] on the decompressed size of a batch.
const DECOMPRESSED_SIZE: &str = "decompressed batch size";

impl BatchError {
    /// Whether decoding stopped because the batch decompresses to more than
    /// [`DecodeLimits::max_decompressed_bytes`] (a caller that lowered that limit to what it
    /// can hold learns that the batch does not fit).
    pub fn is_decompressed_size_limit(&self) -> bool {
        matches!(self, BatchError::Limit { what, .. } if *what == DECOMPRESSED_SIZE)
    }
}

/// The parsed fixed header of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Bytes after the `batch_length` field.
    pub batch_length: u32,
    /// Leader epoch stamped by the partition at append.
    pub partition_leader_epoch: i32,
    /// Stored CRC-32C.
    pub crc: u32,
    /// Raw attributes.
    pub attributes: i16,
    /// Offset of the last record minus `base_offset`.
    pub last_offset_delta: i32,
    /// Timestamp of the first record (ms).
    pub base_timestamp: i64,
    /// Largest timestamp in the batch (ms).
    pub max_timestamp: i64,
    /// Idempotent producer id, or -1.
    pub producer_id: i64,
    /// Producer epoch, or -1.
    pub producer_epoch: i16,
    /// Sequence number of the first record, or -1.
    pub base_sequence: i32,
    /// Number of records.
    pub records_count: i32,
}

#[inline]
fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
#[inline]
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}
#[inline]
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

impl BatchHeader {
    /// Parses the first [`HEADER_LEN`] bytes. Checks only the magic byte; see
    /// [`validate_batch`] for the full check.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_LEN {
            return Err(BatchError::Truncated("batch header"));
        }
        let magic = buf[OFF_MAGIC] as i8;
        if magic != MAGIC {
            return Err(BatchError::BadMagic(magic));
        }
        let batch_length = be_i32(buf, OFF_BATCH_LENGTH);
        if batch_length < (HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(BatchError::LengthMismatch {
                declared: i64::from(batch_length),
                actual: (buf.len() - LOG_OVERHEAD) as u64,
            });
        }
        Ok(BatchHeader {
            base_offset: be_i64(buf, 0) as u64,
            batch_length: batch_length as u32,
            partition_leader_epoch: be_i32(buf, OFF_LEADER_EPOCH),
            crc: be_i32(buf, OFF_CRC) as u32,
            attributes: be_i16(buf, OFF_ATTRIBUTES),
            last_offset_delta: be_i32(buf, OFF_LAST_OFFSET_DELTA),
            base_timestamp: be_i64(buf, OFF_BASE_TIMESTAMP),
            max_timestamp: be_i64(buf, OFF_MAX_TIMESTAMP),
            producer_id: be_i64(buf, OFF_PRODUCER_ID),
            producer_epoch: be_i16(buf, OFF_PRODUCER_EPOCH),
            base_sequence: be_i32(buf, OFF_BASE_SEQUENCE),
            records_count: be_i32(buf, OFF_RECORDS_COUNT),
        })
    }

    /// Total bytes of the batch, header included.
    #[inline]
    pub fn total_len(&self) -> usize {
        self.batch_length as usize + LOG_OVERHEAD
    }

    /// Offset of the last record.
    #[inline]
    pub fn last_offset(&self) -> u64 {
        self.base_offset + self.last_offset_delta.max(0) as u64
    }

    /// The next offset after this batch.
    #[inline]
    pub fn next_offset(&self) -> u64 {
        self.last_offset() + 1
    }

    /// Compression codec from the attributes.
    pub fn compression(&self) -> Result<Compression, BatchError> {
        Compression::from_attribute(self.attributes & ATTR_COMPRESSION_MASK)
    }

    /// True when the batch belongs to a transaction.
    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }

    /// True for control batches (transaction markers).
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    /// True when timestamps are the broker's append time rather than the producer's.
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & ATTR_TIMESTAMP_TYPE != 0
    }

    /// The delete horizon the log cleaner stored in a batch holding tombstones (attribute bit
    /// 6; the horizon is then in `base_timestamp`, as Kafka's KIP-534): tombstones in the batch
    /// may be removed once the clock passes it.
    pub fn delete_horizon(&self) -> Option<i64> {
        (self.attributes & ATTR_DELETE_HORIZON != 0).then_some(self.base_timestamp)
    }
}

/// Rewrites the idempotent-producer fields of an encoded batch (producer id, epoch, base
/// sequence) and its CRC, in place. For a producer that must re-send a batch under a new
/// producer id; nothing else changes (the CRC covers these fields, so it is recomputed).
pub fn restamp_producer(
    batch: &mut [u8],
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
) -> Result<(), BatchError> {
    let h = BatchHeader::parse(batch)?;
    if h.total_len() != batch.len() {
        return Err(BatchError::LengthMismatch {
            declared: h.batch_length as i64,
            actual: batch.len().saturating_sub(12) as u64,
        });
    }
    batch[OFF_PRODUCER_ID..OFF_PRODUCER_ID + 8].copy_from_slice(&producer_id.to_be_bytes());
    batch[OFF_PRODUCER_EPOCH..OFF_PRODUCER_EPOCH + 2]
        .copy_from_slice(&producer_epoch.to_be_bytes());
    batch[OFF_BASE_SEQUENCE..OFF_BASE_SEQUENCE + 4].copy_from_slice(&base_sequence.to_be_bytes());
    let crc = batch_crc(batch);
    batch[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// CRC-32C of the region a batch's CRC covers.
#[inline]
pub fn batch_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_START..])
}

/// Checks that `batch` is exactly one well-formed RecordBatch v2 within `max_batch_bytes` and
/// `limits`: header fields, length, CRC-32C, attributes, record count, and every record's
/// structure (lengths, offset deltas 0, 1, …, key size). LZ4 and zstd batches are decompressed
/// as a stream for this (never held whole; at most `max_decompressed_bytes` of output), as
/// Kafka's broker validates compressed batches on append. gzip and snappy batches, which Spool
/// stores but does not decode, are checked only as far as their header goes: their record
/// count must fit what their bytes could expand to (see [`MIN_RECORD_BYTES`]).
pub fn validate_batch(
    batch: &[u8],
    max_batch_bytes: u32,
    limits: &DecodeLimits,
) -> Result<BatchHeader, BatchError> {
    if batch.len() > max_batch_bytes as usize {
        return Err(BatchError::Limit {
            what: "batch size",
            limit: u64::from(max_batch_bytes),
            actual: batch.len() as u64,
        });
    }
    let h = BatchHeader::parse(batch)?;
    if h.total_len() != batch.len() {
        return Err(BatchError::LengthMismatch {
            declared: i64::from(h.batch_length),
            actual: (batch.len() - LOG_OVERHEAD) as u64,
        });
    }
    check_crc(batch, &h)?;
    if h.attributes & !ATTR_KNOWN != 0 {
        return Err(BatchError::BadAttributes(h.attributes));
    }
    let compression = h.compression()?;
    if h.records_count <= 0 || h.records_count as u32 > limits.max_records_per_batch {
        return Err(BatchError::BadRecordCount(format!(
            "{} records (allowed 1..={})",
            h.records_count, limits.max_records_per_batch
        )));
    }
    if h.last_offset_delta != h.records_count - 1 {
        return Err(BatchError::BadRecordCount(format!(
            "last_offset_delta {} with {} records (must be count - 1)",
            h.last_offset_delta, h.records_count
        )));
    }
    let body = &batch[HEADER_LEN..];
    match compression {
        Compression::None => record::check_records(body, &h, limits)?,
        Compression::Lz4 | Compression::Zstd => {
            check_claim(&h, body.len(), None, limits)?;
            record::check_compressed_records(body, compression, &h, limits)?;
        }
        Compression::Gzip => check_claim(&h, body.len(), Some(GZIP_MAX_RATIO), limits)?,
        Compression::Snappy => check_claim(&h, body.len(), Some(SNAPPY_MAX_RATIO), limits)?,
    }
    Ok(h)
}

/// Fewest bytes one record takes once decoded: a length, attributes, timestamp delta, offset
/// delta, key length, value length and header count, one byte each.
pub const MIN_RECORD_BYTES: u64 = 7;
/// Largest expansion of DEFLATE (gzip): a 258-byte match per 2 bits.
const GZIP_MAX_RATIO: u64 = 1032;
/// Largest expansion of Snappy: a 64-byte copy per 3-byte tag (rounded up).
const SNAPPY_MAX_RATIO: u64 = 22;

/// What a compressed batch's header may claim before anything is decompressed: its records
/// must fit in `max_decompressed_bytes` once decoded, and, for a codec of bounded expansion,
/// in what its `payload` bytes can expand to. For gzip and snappy (stored, never decoded) this
/// is the whole check of the count; LZ4 and zstd batches are then walked record by record.
fn check_claim(
    h: &BatchHeader,
    payload: usize,
    max_ratio: Option<u64>,
    limits: &DecodeLimits,
) -> Result<(), BatchError> {
    let needs = h.records_count as u64 * MIN_RECORD_BYTES;
    let room = match max_ratio {
        Some(ratio) => (payload as u64 * ratio).min(u64::from(limits.max_decompressed_bytes)),
        None => u64::from(limits.max_decompressed_bytes),
    };
    if needs > room {
        return Err(BatchError::BadRecordCount(format!(
            "{} records need at least {needs} bytes decoded, but {payload} compressed bytes \
             expand to at most {room}",
            h.records_count
        )));
    }
    Ok(())
}

/// Checks the stored CRC against the bytes.
#[inline]
pub fn check_crc(batch: &[u8], h: &BatchHeader) -> Result<(), BatchError> {
    let computed = batch_crc(batch);
    if computed != h.crc {
        return Err(BatchError::BadCrc {
            stored: h.crc,
            computed,
        });
    }
    Ok(())
}

/// Writes the offset and leader epoch fields the partition assigns. They precede the CRC'd
/// region, so the CRC stays valid.
#[inline]
pub fn assign(prefix: &mut [u8; 16], base_offset: u64, leader_epoch: i32) {
    prefix[0..8].copy_from_slice(&(base_offset as i64).to_be_bytes());
    prefix[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// One stored batch: its parsed header and its bytes (a zero-copy slice of the log when it came
/// from a read).
#[derive(Clone, Debug)]
pub struct Batch {
    header: BatchHeader,
    bytes: Bytes,
}

impl Batch {
    /// Parses and fully validates `bytes` as one batch.
    pub fn new(bytes: Bytes, limits: &DecodeLimits) -> Result<Batch, BatchError> {
        let header = validate_batch(&bytes, MAX_BATCH_BYTES, limits)?;
        Ok(Batch { header, bytes })
    }

    /// A batch from a header already parsed from `bytes` (and CRC-checked by the caller), for
    /// readers that walked the headers themselves. Nothing is checked here.
    pub fn from_parts(header: BatchHeader, bytes: Bytes) -> Batch {
        Batch { header, bytes }
    }

    /// The parsed header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The raw bytes, exactly as stored.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Decodes the records (decompressing if needed, within `limits`).
    pub fn records(&self, limits: &DecodeLimits) -> Result<Records, BatchError> {
        Records::new(&self.header, &self.bytes, limits)
    }
}

/// Records in a buffer of concatenated batches, from their headers alone (no CRC pass, no
/// decoding): for counting what is served. Stops at the first header that does not parse or
/// runs past the buffer.
pub fn count_records(buf: &[u8]) -> u64 {
    let mut pos = 0usize;
    let mut n = 0u64;
    while let Ok(h) = BatchHeader::parse(&buf[pos.min(buf.len())..]) {
        if h.total_len() > buf.len() - pos {
            break;
        }
        n += h.records_count.max(0) as u64;
        pos += h.total_len();
    }
    n
}

/// Splits a buffer of concatenated batches (such as one read result) into batches, checking
/// each header and CRC. Stops with an error at the first malformed batch.
pub fn split_batches(buf: &Bytes) -> impl Iterator<Item = Result<Batch, BatchError>> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= buf.len() {
            return None;
        }
        let rest = &buf[pos..];
        let res = BatchHeader::parse(rest).and_then(|h| {
            if h.total_len() > rest.len() {
                return Err(BatchError::Truncated("batch"));
            }
            check_crc(&rest[..h.total_len()], &h)?;
            Ok(h)
        });
        match res {
            Ok(h) => {
                let b = Batch::from_parts(h, buf.slice(pos..pos + h.total_len()));
                pos += h.total_len();
                Some(Ok(b))
            }
            Err(e) => {
                pos = buf.len();
                Some(Err(e))
            }
        }
    })
}
