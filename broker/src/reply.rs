//! Assembling Fetch replies and Subscribe messages within a byte budget.
//!
//! A reply holds at most `max_reply` bytes: the request's `max_bytes` (Kafka's
//! `fetch.max.bytes`), capped by `limits.max_request_bytes`, tonic's encode limit, so a reply
//! is never built only to be refused. Its cost is counted as it is assembled, before memory
//! is used for it, and charged to the reply-memory budgets (`budget.rs`) at the same time:
//! - each partition entry: its encoded size without data (topic, offsets, error);
//! - raw batches (`record_batches`): their bytes (zero-copy slices of the log: counted because
//!   they pin mapped pages until the reply is written);
//! - decoded records (`decode_records`): per batch, the buffer the records are slices of
//!   (decompressed data, or the stored batch), charged up front at its bound
//!   (`min(max_decompressed_bytes, room left)`, so decompression can never go past the budget)
//!   and lowered to the real size after; plus, per record, its in-memory and wire overhead,
//!   and per header its name and overhead, charged as they are decoded.
//!
//! **Trimming** (as Kafka): partitions are read in request order; the first partition with
//! data always gets at least one whole batch (so readers progress), every later one only what
//! fits in what is left. A partition that got less than it could because the reply (or reply
//! memory) ran out has `trimmed` set and `next_offset` where it stopped (its requested
//! offset when it got nothing): the client fetches again from there. Decoded replies are cut
//! at batch boundaries, so a fetch from `next_offset` never returns a record twice.
//!
//! A first batch that can never fit (a stored batch larger than the reply limit, or one that
//! decodes to more) is an `ERROR_CODE_TOO_LARGE` for its partition (fetch it without
//! `decode_records`, or with a larger limit). When reply memory is short before anything is
//! in the reply, assembly returns [`Assembled::NeedMemory`] and the caller waits for it.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use spool_log_engine::batch::{self, DecodeLimits};
use spool_log_engine::{Error as EngineError, Isolation, Partition};
use spool_proto::v1;

use crate::budget::Charge;
use crate::error::{BrokerError, partition_error};

/// Framing of one entry inside its parent message: a field tag and a length varint.
const FRAMING: usize = 8;

/// Cost of one decoded record beyond the bytes of its buffer: the struct (twice, for the
/// vector's spare capacity) and its wire framing.
const RECORD_COST: usize = 2 * size_of::<v1::ConsumedRecord>() + 24;

/// Cost of one decoded header beyond its name's bytes.
const HEADER_COST: usize = size_of::<v1::RecordHeader>() + 16;

/// One partition a Fetch reads.
#[derive(Debug)]
pub(crate) struct Target {
    /// The partition, or why it cannot be read.
    pub(crate) partition: Result<Arc<Partition>, v1::PartitionError>,
    pub(crate) topic: String,
    pub(crate) id: u32,
    pub(crate) offset: u64,
    /// The partition's `max_bytes` (already clamped).
    pub(crate) max_bytes: u32,
}

/// How to read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) decode: bool,
    pub(crate) isolation: Isolation,
    /// The reply size the client asked for (`FetchRequest.max_bytes`): only the first batch
    /// of the reply may go past it.
    pub(crate) max_reply: usize,
    /// The largest reply the broker may send (tonic's encode limit): never exceeded.
    pub(crate) hard_max_reply: usize,
}

/// Most bytes one partition entry takes without its data: the topic name's bytes come on
/// top; the rest covers the numbers, the flags, framing and an error (its message is
/// shortened to [`MAX_ERROR_MESSAGE`]).
const ENTRY_MAX: usize = MAX_ERROR_MESSAGE + 144;

/// Longest error message in a reply entry (longer ones are cut, marked with `…`).
const MAX_ERROR_MESSAGE: usize = 256;

/// Bytes reserved up front for the entries of `targets` (see [`ENTRY_MAX`]): they always fit.
pub(crate) fn entries_reserve(targets: &[Target]) -> usize {
    targets.iter().map(|t| t.topic.len() + ENTRY_MAX).sum()
}

/// The result of assembling a reply.
#[derive(Debug)]
pub(crate) enum Assembled {
    /// The reply's entries, in request order; the charge covers them.
    Done(Vec<v1::PartitionData>),
    /// Nothing could go in: this many more bytes of reply memory are needed first.
    NeedMemory(usize),
}

/// Why a cost could not be taken.
#[derive(Debug)]
enum Short {
    /// Over the reply's byte limit.
    Reply,
    /// Reply memory is short by this many bytes.
    Memory(usize),
}

/// The reply's byte budget for data, charging reply memory as it is used. The entries'
/// own bytes are reserved (and charged) before any data.
struct ReplyBudget<'a> {
    /// `Shape::max_reply`: the limit once the reply has data.
    soft: usize,
    /// `Shape::hard_max_reply`: the limit for its first data.
    hard: usize,
    /// Reserved for the entries.
    entries: usize,
    /// Data bytes taken.
    used: usize,
    /// Whether any data (batches or records) is in the reply.
    has_data: bool,
    charge: &'a mut Charge,
}

impl ReplyBudget<'_> {
    fn max(&self) -> usize {
        if self.has_data { self.soft } else { self.hard }
    }

    /// Data bytes that still fit.
    fn room(&self) -> usize {
        self.max().saturating_sub(self.entries + self.used)
    }

    /// Data bytes that fit within what the client asked for (what to read: the engine
    /// returns at least one batch anyway).
    fn asked_room(&self) -> usize {
        self.soft.saturating_sub(self.entries + self.used)
    }

    fn take(&mut self, n: usize) -> Result<(), Short> {
        if n > self.room() {
            return Err(Short::Reply);
        }
        let need = (self.entries + self.used + n).saturating_sub(self.charge.bytes());
        if need > 0 && !self.charge.try_grow(need) {
            return Err(Short::Memory(need));
        }
        self.used += n;
        Ok(())
    }

    fn give_back(&mut self, n: usize) {
        self.used -= n.min(self.used);
    }
}

/// A per-partition error for a reply entry, its message cut to [`MAX_ERROR_MESSAGE`].
fn entry_error(e: impl Into<BrokerError>) -> v1::PartitionError {
    let mut err = partition_error(e);
    shorten(&mut err.message);
    err
}

fn shorten(message: &mut String) {
    if message.len() > MAX_ERROR_MESSAGE {
        let mut cut = MAX_ERROR_MESSAGE - '…'.len_utf8();
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
}

/// What reading one partition gave.
enum Outcome {
    /// The entry goes into the reply.
    Entry(v1::PartitionData),
    /// Nothing is in the reply yet and memory is short by this much.
    NeedMemory(usize),
}

/// Assembles a Fetch reply (blocking: reads and decodes). `charge` grows with the reply
/// and is lowered to its cost at the end.
pub(crate) fn assemble(
    targets: &[Target],
    shape: Shape,
    limits: &DecodeLimits,
    charge: &mut Charge,
) -> Assembled {
    let entries = entries_reserve(targets);
    // The caller refused requests whose entries alone do not fit.
    debug_assert!(entries <= shape.hard_max_reply);
    let need = entries.saturating_sub(charge.bytes());
    if need > 0 && !charge.try_grow(need) {
        return Assembled::NeedMemory(need);
    }
    let mut budget = ReplyBudget {
        soft: shape.max_reply.min(shape.hard_max_reply),
        hard: shape.hard_max_reply,
        entries,
        used: 0,
        has_data: false,
        charge,
    };
    let mut out = Vec::with_capacity(targets.len());
    let mut entries_used = 0;
    for t in targets {
        let entry = match &t.partition {
            Ok(p) => match read_one(p, t.offset, t.max_bytes, shape, limits, &mut budget) {
                Outcome::Entry(e) => e,
                Outcome::NeedMemory(n) => return Assembled::NeedMemory(n),
            },
            Err(e) => {
                let mut e = e.clone();
                shorten(&mut e.message);
                v1::PartitionData {
                    topic: t.topic.clone(),
                    partition: t.id,
                    next_offset: t.offset,
                    error: Some(e),
                    ..Default::default()
                }
            }
        };
        // The entry without its data (whose bytes the budget counted).
        let batches = if entry.record_batches.is_empty() {
            0
        } else {
            prost::encoding::bytes::encoded_len(3, &entry.record_batches)
        };
        let data = batches + prost::encoding::message::encoded_len_repeated(4, &entry.records);
        entries_used += (entry.encoded_len() + FRAMING).saturating_sub(data);
        out.push(entry);
    }
    debug_assert!(entries_used <= entries, "{entries_used} > {entries}");
    let cost = entries_used.min(entries) + budget.used;
    budget.charge.shrink_to(cost);
    Assembled::Done(out)
}

/// Reads one partition into a reply entry within `budget` (see the module docs).
fn read_one(
    p: &Partition,
    offset: u64,
    max_bytes: u32,
    shape: Shape,
    limits: &DecodeLimits,
    budget: &mut ReplyBudget<'_>,
) -> Outcome {
    let mut out = v1::PartitionData {
        topic: p.topic().to_owned(),
        partition: p.id(),
        next_offset: offset,
        ..Default::default()
    };
    // A deleted partition answers its error even when the reply is full: a Fetch waiting for
    // `min_bytes` would otherwise wake at once on its closed watch, again and again.
    if p.is_deleted()
        && let Some(e) = p.closed_error()
    {
        out.error = Some(entry_error(e));
        return Outcome::Entry(out);
    }
    if budget.has_data && budget.room() == 0 {
        out.high_watermark = p.high_watermark();
        out.log_start_offset = p.log_start_offset();
        out.last_stable_offset = p.last_stable_offset();
        out.trimmed = true;
        return Outcome::Entry(out);
    }
    let max = (max_bytes as usize).min(budget.asked_room()).max(1);
    let r = match p.read_with(offset, max, shape.isolation) {
        Ok(r) => r,
        Err(e) => {
            out.high_watermark = p.high_watermark();
            out.log_start_offset = p.log_start_offset();
            out.last_stable_offset = p.last_stable_offset();
            out.error = Some(entry_error(e));
            return Outcome::Entry(out);
        }
    };
    out.high_watermark = r.high_watermark;
    out.log_start_offset = r.log_start_offset;
    out.last_stable_offset = r.last_stable_offset;
    if r.data.is_empty() {
        out.next_offset = r.next_offset;
        return Outcome::Entry(out);
    }
    // Whether the read was cut short by the reply's room rather than by the partition's own
    // max_bytes, with more to read.
    let end = match shape.isolation {
        Isolation::ReadCommitted => r.last_stable_offset,
        Isolation::ReadUncommitted => r.high_watermark,
    };
    let limited = max < max_bytes as usize && r.next_offset < end;
    if shape.decode {
        return match decode_within(&r.data, limits, budget) {
            Ok(Decoded { records, next }) => {
                // Cut short: from the first batch left out (never below the offset asked
                // for, which may lie inside the first batch).
                out.next_offset = next.map_or(r.next_offset, |n| n.max(offset));
                out.trimmed = next.is_some() || limited;
                out.records = records;
                Outcome::Entry(out)
            }
            Err(DecodeFail::Memory(n)) => Outcome::NeedMemory(n),
            Err(DecodeFail::Error(e)) => {
                out.error = Some(entry_error(e));
                Outcome::Entry(out)
            }
        };
    }
    let n = r.data.len() + FRAMING;
    match budget.take(n) {
        Ok(()) => {
            budget.has_data = true;
            out.trimmed = limited;
            out.record_batches = r.data;
            out.next_offset = r.next_offset;
        }
        Err(Short::Memory(need)) if !budget.has_data => return Outcome::NeedMemory(need),
        Err(Short::Reply) if !budget.has_data => {
            out.error = Some(entry_error(too_large(
                "stored batch",
                budget.hard,
                r.data.len(),
            )));
        }
        // Trimmed: the rest of the reply had no room for this partition's first batch.
        Err(_) => out.trimmed = true,
    }
    Outcome::Entry(out)
}

fn too_large(what: &'static str, limit: usize, actual: usize) -> BrokerError {
    BrokerError::Engine(EngineError::LimitExceeded {
        what: match what {
            "stored batch" => {
                "a stored batch larger than the reply limit (FetchRequest.max_bytes, capped \
                 by limits.max_request_bytes)"
            }
            _ => {
                "a batch whose decoded records exceed the reply limit (fetch it without \
                 decode_records)"
            }
        },
        limit: limit as u64,
        actual: actual as u64,
    })
}

/// Decoded records of the batches that fit.
struct Decoded {
    records: Vec<v1::ConsumedRecord>,
    /// Where the records stop when not every batch fit (the next batch's offset).
    next: Option<u64>,
}

enum DecodeFail {
    Memory(usize),
    Error(BrokerError),
}

/// Decodes whole batches of `data` while they fit in `budget` (see the module docs). The
/// first batch of the reply either fits, or fails (too large), or asks for memory.
fn decode_within(
    data: &Bytes,
    limits: &DecodeLimits,
    budget: &mut ReplyBudget<'_>,
) -> Result<Decoded, DecodeFail> {
    let mut records = Vec::new();
    for batch in batch::split_batches(data) {
        let batch = batch.map_err(|e| DecodeFail::Error(e.into()))?;
        let h = *batch.header();
        let first = !budget.has_data;
        // Where the reply stops if this batch does not fit.
        let stop = |records: Vec<v1::ConsumedRecord>| {
            Ok(Decoded {
                records,
                next: Some(h.base_offset),
            })
        };
        if h.is_control() {
            continue; // a transaction marker carries no data (its offset is still passed)
        }
        let count = usize::try_from(h.records_count.max(0)).unwrap_or(0);
        let overhead = count.saturating_mul(RECORD_COST);
        let compressed = !matches!(h.compression(), Ok(batch::Compression::None));
        // The buffer's bound: the stored bytes, or what decompression may produce here.
        let room = budget.room().saturating_sub(overhead);
        let bound = if compressed {
            (limits.max_decompressed_bytes as usize).min(room)
        } else {
            batch.bytes().len()
        };
        let upfront = overhead.saturating_add(bound);
        match budget.take(upfront) {
            Ok(()) => {}
            Err(Short::Memory(n)) if first => return Err(DecodeFail::Memory(n)),
            Err(Short::Reply) if first => {
                return Err(DecodeFail::Error(too_large(
                    "decoded",
                    budget.hard,
                    upfront,
                )));
            }
            Err(_) => return stop(records),
        }
        let lowered = DecodeLimits {
            max_decompressed_bytes: u32::try_from(bound).unwrap_or(u32::MAX),
            ..*limits
        };
        let decoded = match batch.records(&lowered) {
            Ok(rs) => rs,
            Err(e)
                if e.is_decompressed_size_limit()
                    && bound < limits.max_decompressed_bytes as usize =>
            {
                // It would decompress to more than the room left.
                budget.give_back(upfront);
                if first {
                    return Err(DecodeFail::Error(too_large(
                        "decoded",
                        budget.hard,
                        bound + 1,
                    )));
                }
                return stop(records);
            }
            Err(e) => {
                budget.give_back(upfront);
                return Err(DecodeFail::Error(e.into()));
            }
        };
        // Lower the up-front charge to the buffer's real size.
        budget.give_back(bound.saturating_sub(decoded.buffer_len()));
        let batch_start = records.len();
        let mut taken = upfront - bound.saturating_sub(decoded.buffer_len());
        for rec in decoded {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => return Err(DecodeFail::Error(e.into())),
            };
            let headers: usize = rec.headers.iter().map(|h| HEADER_COST + h.key.len()).sum();
            if headers > 0 {
                match budget.take(headers) {
                    Ok(()) => taken += headers,
                    Err(s) => {
                        records.truncate(batch_start);
                        budget.give_back(taken);
                        return match s {
                            Short::Memory(n) if first => Err(DecodeFail::Memory(n)),
                            Short::Reply if first => Err(DecodeFail::Error(too_large(
                                "decoded",
                                budget.hard,
                                taken + headers,
                            ))),
                            _ => stop(records),
                        };
                    }
                }
            }
            records.push(v1::ConsumedRecord {
                offset: rec.offset,
                timestamp_ms: rec.timestamp,
                key: rec.key,
                value: rec.value,
                headers: rec
                    .headers
                    .into_iter()
                    .map(|h| v1::RecordHeader {
                        key: h.key,
                        value: h.value,
                    })
                    .collect(),
            });
        }
        budget.has_data = true;
    }
    Ok(Decoded {
        records,
        next: None,
    })
}

#[cfg(test)]
mod tests {
    use spool_log_engine::{
        BatchBuilder, Compression, FsyncPolicy, Limits, Log, LogOptions, TopicConfig,
    };

    use super::*;
    use crate::budget::{MemoryMetrics, ReplyMemory};

    const MIB: usize = 1 << 20;

    /// A log with topic `t` of `partitions` partitions, each holding `batches` batches of
    /// `records` records of `value` bytes (`compression`).
    fn log_with(
        partitions: u32,
        batches: usize,
        (records, value): (usize, usize),
        compression: Compression,
    ) -> (tempfile::TempDir, Log) {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(
            dir.path(),
            LogOptions {
                background_maintenance: false,
                ..LogOptions::default()
            },
        )
        .unwrap();
        log.create_topic(
            "t",
            TopicConfig {
                partitions,
                fsync: FsyncPolicy::Never,
                max_batch_bytes: 16 << 20,
                ..TopicConfig::default()
            },
        )
        .unwrap();
        for id in 0..partitions {
            let p = log.partition("t", id).unwrap();
            for b in 0..batches {
                let mut bb = BatchBuilder::new(compression);
                for r in 0..records {
                    let v = vec![b'a' + ((b + r) % 26) as u8; value];
                    bb.push(1000, None, Some(&v), &[("h", Some(b"x"))]);
                }
                p.append(&bb.finish().unwrap()).unwrap();
            }
        }
        (dir, log)
    }

    fn targets(log: &Log, parts: &[u32], max_bytes: u32) -> Vec<Target> {
        parts
            .iter()
            .map(|id| Target {
                partition: Ok(log.partition("t", *id).unwrap()),
                topic: "t".into(),
                id: *id,
                offset: 0,
                max_bytes,
            })
            .collect()
    }

    fn shape(decode: bool, max_reply: usize, hard: usize) -> Shape {
        Shape {
            decode,
            isolation: Isolation::ReadUncommitted,
            max_reply,
            hard_max_reply: hard,
        }
    }

    fn done(a: Assembled) -> Vec<v1::PartitionData> {
        match a {
            Assembled::Done(v) => v,
            Assembled::NeedMemory(n) => panic!("needs {n} bytes of memory"),
        }
    }

    fn reply_len(parts: &[v1::PartitionData]) -> usize {
        v1::FetchResponse {
            partitions: parts.to_vec(),
        }
        .encoded_len()
    }

    /// Issue 12: 9 partitions of 8 MiB over a 64 MiB reply limit are trimmed (first partition
    /// in full, then what fits), not refused.
    #[test]
    fn a_reply_over_its_limit_is_trimmed_not_refused() {
        // 9 partitions x 8 batches of ~1 MiB; hard limit 20 MiB.
        let (_dir, log) = log_with(9, 8, (1, MIB - 200), Compression::None);
        let memory = ReplyMemory::new(1 << 30, 1 << 30, MemoryMetrics::default());
        let mut charge = memory.detached_ledger().charge();
        let t = targets(&log, &(0..9).collect::<Vec<_>>(), 16 << 20);
        let parts = done(assemble(
            &t,
            shape(false, 20 * MIB, 20 * MIB),
            &Limits::default().decode(),
            &mut charge,
        ));
        assert_eq!(parts.len(), 9, "one entry per partition, in order");
        let len = reply_len(&parts);
        assert!(len <= 20 * MIB, "{len}");
        assert!(charge.bytes() >= len, "{} < {len}", charge.bytes());
        assert_eq!(charge.bytes(), memory.global().used());
        // p0 whole (8 MiB), p1 whole, p2 only the batches that fit, the rest none.
        assert_eq!((parts[0].next_offset, parts[0].trimmed), (8, false));
        assert_eq!((parts[1].next_offset, parts[1].trimmed), (8, false));
        assert!(parts[2].trimmed && (1..8).contains(&parts[2].next_offset));
        for p in &parts[3..] {
            assert!(p.trimmed && p.record_batches.is_empty() && p.next_offset == 0);
            assert_eq!(p.high_watermark, 8, "metadata still reported");
        }
    }

    /// Issue 12: the same partition named many times costs no more than the limit.
    #[test]
    fn the_same_partition_named_200_times_stays_within_the_limit() {
        let (_dir, log) = log_with(1, 8, (1, MIB - 200), Compression::None);
        let memory = ReplyMemory::new(1 << 30, 1 << 30, MemoryMetrics::default());
        let mut charge = memory.detached_ledger().charge();
        let t = targets(&log, &[0; 200], 16 << 20);
        let parts = done(assemble(
            &t,
            shape(false, 64 * MIB, 64 * MIB),
            &Limits::default().decode(),
            &mut charge,
        ));
        let data: usize = parts.iter().map(|p| p.record_batches.len()).sum();
        assert!((56 * MIB..=64 * MIB).contains(&data), "{data}");
        assert!(reply_len(&parts) <= 64 * MIB);
        assert_eq!(
            parts
                .iter()
                .filter(|p| !p.record_batches.is_empty())
                .count(),
            8
        );
        assert!(parts[8..].iter().all(|p| p.trimmed));
    }

    /// The first partition with data gets a whole batch even past the client's max_bytes,
    /// never past the hard limit; later partitions get nothing past max_bytes.
    #[test]
    fn the_first_batch_comes_even_over_max_bytes() {
        let (_dir, log) = log_with(2, 2, (1, MIB - 200), Compression::None);
        let memory = ReplyMemory::new(1 << 30, 1 << 30, MemoryMetrics::default());
        let mut charge = memory.detached_ledger().charge();
        let parts = done(assemble(
            &targets(&log, &[0, 1], 16 << 20),
            shape(false, 1000, 64 * MIB),
            &Limits::default().decode(),
            &mut charge,
        ));
        assert_eq!((parts[0].next_offset, parts[0].trimmed), (1, true));
        assert!(parts[1].record_batches.is_empty() && parts[1].trimmed);
        // Under a hard limit below the batch: too large for any reply, said so.
        let parts = done(assemble(
            &targets(&log, &[0], 16 << 20),
            shape(false, 1000, 512 << 10),
            &Limits::default().decode(),
            &mut charge,
        ));
        let e = parts[0].error.as_ref().expect("an error");
        assert_eq!(e.code, v1::ErrorCode::TooLarge as i32, "{e:?}");
        assert!(e.message.len() <= MAX_ERROR_MESSAGE, "{}", e.message);
    }

    /// Issue 12: decoding stops at the reply limit, counting decompressed bytes: small zstd
    /// batches that each decompress to 4 MiB are decoded only while they fit.
    #[test]
    fn decoding_stops_at_the_limit_counting_decompressed_bytes() {
        let (_dir, log) = log_with(2, 40, (4, MIB), Compression::Zstd);
        let p = log.partition("t", 0).unwrap();
        assert!(
            p.stats().size_bytes < 40 * 4096,
            "compressed batches are small"
        );
        let memory = ReplyMemory::new(1 << 30, 1 << 30, MemoryMetrics::default());
        let mut charge = memory.detached_ledger().charge();
        let parts = done(assemble(
            &targets(&log, &[0, 1], 16 << 20),
            shape(true, 20 * MIB, 20 * MIB),
            &Limits::default().decode(),
            &mut charge,
        ));
        let held: usize = parts
            .iter()
            .flat_map(|p| &p.records)
            .map(|r| r.value.as_ref().map_or(0, Bytes::len))
            .sum();
        assert!((12 * MIB..=20 * MIB).contains(&held), "{held}");
        assert!(charge.bytes() >= held && charge.bytes() <= 20 * MIB);
        // Cut at a batch boundary: next_offset is where the next batch starts.
        let p0 = &parts[0];
        assert!(p0.trimmed && p0.next_offset.is_multiple_of(4) && p0.next_offset > 0);
        assert_eq!(p0.records.len() as u64, p0.next_offset);
        assert!(parts[1].trimmed && parts[1].records.is_empty());
        // A single batch decoding past the hard limit is an error, not an allocation.
        let parts = done(assemble(
            &targets(&log, &[0], 16 << 20),
            shape(true, MIB, MIB),
            &Limits::default().decode(),
            &mut charge,
        ));
        let e = parts[0].error.as_ref().expect("too large");
        assert_eq!(e.code, v1::ErrorCode::TooLarge as i32, "{e:?}");
        assert!(charge.bytes() <= MIB);
    }

    /// Short of reply memory: nothing in the reply yet → NeedMemory; data in it → trimmed.
    #[test]
    fn short_memory_trims_or_asks_to_wait() {
        let (_dir, log) = log_with(2, 1, (1, MIB - 200), Compression::None);
        let memory = ReplyMemory::new(3 * MIB / 2, 3 * MIB / 2, MemoryMetrics::default());
        let ledger = memory.detached_ledger();
        let mut hog = ledger.charge();
        assert!(hog.try_grow(MIB));
        let mut charge = ledger.charge();
        let t = targets(&log, &[0, 1], 16 << 20);
        let s = shape(false, 64 * MIB, 64 * MIB);
        let limits = Limits::default().decode();
        match assemble(&t, s, &limits, &mut charge) {
            Assembled::NeedMemory(n) => assert!(n > MIB / 2, "{n}"),
            Assembled::Done(_) => panic!("1 MiB does not fit in the 0.5 MiB left"),
        }
        drop(hog);
        let parts = done(assemble(&t, s, &limits, &mut charge));
        assert_eq!(parts[0].next_offset, 1);
        assert!(parts[1].trimmed && parts[1].record_batches.is_empty());
        assert!(memory.global().used() <= 3 * MIB / 2);
    }
}
