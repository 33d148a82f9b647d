//! Bounds on what decoding one batch may allocate or accept.
//!
//! The storage engine supplies these from its own engine-wide limits
//! (`spool_log_engine::Limits::decode`); a client decoding what it fetched can use the
//! defaults, which match the engine's.

/// Largest batch (header included) ever accepted or read back, whatever a topic allows.
pub const MAX_BATCH_BYTES: u32 = 256 << 20;

/// Limits checked while validating or decoding one batch. Every length read from a batch is
/// checked against the bytes present and against these before it is used to slice or allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Records in one batch.
    pub max_records_per_batch: u32,
    /// Bytes of one record (its varint length).
    pub max_record_bytes: u32,
    /// Bytes of one key.
    pub max_key_bytes: u32,
    /// Headers of one record.
    pub max_headers_per_record: u32,
    /// Bytes a compressed batch may expand to when decoded.
    pub max_decompressed_bytes: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_records_per_batch: 1 << 20,
            max_record_bytes: 8 << 20,
            max_key_bytes: 64 << 10,
            max_headers_per_record: 1024,
            max_decompressed_bytes: 64 << 20,
        }
    }
}
