//! Decoding record batches received from the broker.
//!
//! Batches arrive exactly as stored (Kafka RecordBatch v2). Each is CRC-checked and decoded
//! with the record crate's decoder within [`DecodeLimits`] (so a hostile or corrupt reply cannot make the
//! client allocate without bound: decompression stops at `max_decompressed_bytes`). A read
//! starting inside a batch returns the whole batch, so records before the requested offset are
//! dropped here.

use std::sync::Arc;

use bytes::Bytes;
use spool_record::{DecodeLimits, split_batches};

use crate::error::Result;
use crate::types::{Header, Record};

/// Decodes `data` (whole batches) into records with offsets `>= from`, appending to `out`.
pub(crate) fn decode_batches(
    topic: &Arc<str>,
    partition: u32,
    data: &Bytes,
    from: u64,
    limits: &DecodeLimits,
    out: &mut Vec<Record>,
) -> Result<()> {
    for batch in split_batches(data) {
        let batch = batch?;
        let h = batch.header();
        if h.next_offset() <= from || h.is_control() {
            continue;
        }
        for rec in batch.records(limits)? {
            let rec = rec?;
            if rec.offset < from {
                continue;
            }
            out.push(Record {
                topic: topic.clone(),
                partition,
                offset: rec.offset,
                timestamp_ms: rec.timestamp,
                key: rec.key,
                value: rec.value,
                headers: rec
                    .headers
                    .into_iter()
                    .map(|h| Header {
                        key: h.key,
                        value: h.value,
                    })
                    .collect(),
            });
        }
    }
    Ok(())
}
