//! Idempotent producers: per-partition producer state, the sequence check made at append, and
//! its snapshot file.
//!
//! A batch with a producer id (≥ 0) carries the producer's epoch and the sequence number of its
//! first record; the sequence of its last record is `base_sequence + last_offset_delta`
//! (wrapping at `i32::MAX` to 0, as Kafka's). Under the partition's writer lock, before a write:
//!
//! | the batch | outcome |
//! |---|---|
//! | epoch older than the producer's | [`Error::ProducerFenced`]: a zombie; nothing written |
//! | epoch newer, sequence 0 | appended; the producer's state restarts at this epoch |
//! | epoch newer, sequence not 0 | [`Error::OutOfOrderSequence`] |
//! | same epoch, same first and last sequence as one of the last [`RECENT_BATCHES`] batches | a retry: **not written again**; the original offsets are returned ([`Check::Duplicate`]) |
//! | same epoch, first sequence = last sequence + 1 | appended |
//! | same epoch, anything else | [`Error::OutOfOrderSequence`] (a gap, or a retry older than the cache) |
//! | unknown producer | appended, whatever its sequence; tracking starts there |
//!
//! Accepting an unknown producer's first batch at any sequence is Kafka's rule (since KIP-360):
//! a producer's state can be forgotten (expiry, eviction, retention deleting its batches before
//! a snapshot kept them), and refusing its next batch would fail a healthy producer. The cost:
//! gap detection starts at the first batch a partition sees from a producer. Spool's client
//! starts every producer at sequence 0, so only forgotten state reaches this case.
//!
//! State is updated only after the write succeeded, so a failed write leaves it as it was.
//!
//! # Durability
//!
//! The state is derived from the log. On open it is rebuilt from the snapshot written at the
//! last segment roll (covering every batch below the active segment's base) plus a walk of the
//! active segment's batch headers, which recovery does anyway; a missing or damaged snapshot
//! means walking the headers of every segment instead. A torn tail cut at recovery takes its
//! batches' state with it, so a client's retry of an unacknowledged batch is appended, and a
//! retry of an acknowledged one (durable, so still in the log) is recognised as a duplicate.
//!
//! # Limits
//!
//! At most `max_producers` producers per partition; past it (and after `expiration_ms` of
//! inactivity) the least recently active producer is forgotten (so a retry of its last batch
//! is no longer recognised; expiry is a day by default, far beyond any retry).
//!
//! Snapshot file `producers.snapshot` (little-endian, as Spool's other own files). It also
//! holds the partition's transactions ([`crate::txn`]) at the same point:
//!
//! ```text
//! magic "SPPS" | version u16 = 2 | covers_below u64 | count u32
//! count × { producer_id i64 | epoch i16 | last_append_ms i64 | n u8 (1..=5)
//!           n × { first_seq i32 | last_seq i32 | base_offset u64 | last_offset u64 | append_ms i64 } }
//! open u32    | open × { producer_id i64 | epoch i16 | first_offset u64 }
//! aborted u32 | aborted × { producer_id i64 | first_offset u64 | marker_offset u64 }
//! crc u32 (CRC-32, as crc32fast, of everything before it)
//! ```
//!
//! Version 1 (written before transactions existed) has no `open` and `aborted` sections and is
//! still read.

use std::collections::{HashMap, VecDeque};
use std::path::Path;

use spool_io::FileSystem;

use crate::batch::BatchHeader;
use crate::error::{Error, Result};
use crate::txn::TxnIndex;

/// How many recent batches per producer are remembered for duplicate detection (Kafka's 5:
/// a producer may have at most this many batches in flight per partition).
pub const RECENT_BATCHES: usize = 5;

/// File name of a partition's producer-state snapshot.
pub(crate) const SNAPSHOT_NAME: &str = "producers.snapshot";

const MAGIC: &[u8; 4] = b"SPPS";
const VERSION: u16 = 2;
const HEADER_LEN: usize = 4 + 2 + 8 + 4;
const ENTRY_FIXED: usize = 8 + 2 + 8 + 1;
const BATCH_LEN: usize = 4 + 4 + 8 + 8 + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BatchMeta {
    first_seq: i32,
    last_seq: i32,
    base_offset: u64,
    last_offset: u64,
    append_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    epoch: i16,
    last_append_ms: i64,
    recent: VecDeque<BatchMeta>,
}

/// What the sequence check decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Not an idempotent batch, or the next one in sequence: write it.
    Append,
    /// A retry of a batch already in the log at these offsets (and append time): do not write.
    Duplicate {
        base_offset: u64,
        last_offset: u64,
        append_ms: i64,
    },
}

/// The last sequence number of a batch: `base + delta`, wrapping past `i32::MAX` to 0.
fn last_seq(h: &BatchHeader) -> i32 {
    let span = h.last_offset_delta.max(0) as i64;
    ((h.base_sequence as i64 + span) % (i32::MAX as i64 + 1)) as i32
}

fn next_seq(s: i32) -> i32 {
    if s == i32::MAX { 0 } else { s + 1 }
}

/// The producer state of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProducerStates {
    map: HashMap<i64, Entry>,
    max_producers: usize,
    expiration_ms: i64,
}

impl ProducerStates {
    pub(crate) fn new(max_producers: usize, expiration_ms: i64) -> ProducerStates {
        ProducerStates {
            map: HashMap::new(),
            max_producers: max_producers.max(1),
            expiration_ms,
        }
    }

    /// Number of producers remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Decides what to do with `h` (see the module docs). Changes nothing.
    pub(crate) fn check(&self, h: &BatchHeader) -> Result<Check> {
        if h.producer_id < 0 {
            return Ok(Check::Append);
        }
        let pid = h.producer_id;
        if h.base_sequence < 0 {
            return Err(Error::OutOfOrderSequence {
                producer_id: pid,
                expected: 0,
                got: h.base_sequence,
            });
        }
        let Some(e) = self.map.get(&pid) else {
            return Ok(Check::Append);
        };
        if h.producer_epoch < e.epoch {
            return Err(Error::ProducerFenced {
                producer_id: pid,
                epoch: h.producer_epoch,
                current_epoch: e.epoch,
            });
        }
        if h.producer_epoch > e.epoch {
            return if h.base_sequence == 0 {
                Ok(Check::Append)
            } else {
                Err(Error::OutOfOrderSequence {
                    producer_id: pid,
                    expected: 0,
                    got: h.base_sequence,
                })
            };
        }
        let last = last_seq(h);
        if let Some(b) = e
            .recent
            .iter()
            .find(|b| b.first_seq == h.base_sequence && b.last_seq == last)
        {
            return Ok(Check::Duplicate {
                base_offset: b.base_offset,
                last_offset: b.last_offset,
                append_ms: b.append_ms,
            });
        }
        let expected = e.recent.back().map_or(0, |b| next_seq(b.last_seq));
        if h.base_sequence != expected {
            return Err(Error::OutOfOrderSequence {
                producer_id: pid,
                expected,
                got: h.base_sequence,
            });
        }
        Ok(Check::Append)
    }

    /// Records a batch appended at `base_offset` (its header `h`) at `append_ms`.
    pub(crate) fn record(&mut self, h: &BatchHeader, base_offset: u64, append_ms: i64) {
        self.record_seen(h, base_offset, append_ms, append_ms);
    }

    /// Records a batch found in the log when opening it: `append_ms` is what a duplicate of it
    /// will report (its max timestamp; the append time is not stored) and `seen_ms` counts as
    /// the producer's last activity (now: record timestamps are the client's, so expiry never
    /// runs on them).
    pub(crate) fn record_seen(
        &mut self,
        h: &BatchHeader,
        base_offset: u64,
        append_ms: i64,
        seen_ms: i64,
    ) {
        if h.producer_id < 0 {
            return;
        }
        if h.is_control() {
            // A marker carries no sequence; a newer epoch (the coordinator bumps it at every
            // transaction's end) restarts the producer's sequences here.
            if let Some(e) = self.map.get_mut(&h.producer_id)
                && h.producer_epoch > e.epoch
            {
                e.epoch = h.producer_epoch;
                e.recent.clear();
                e.last_append_ms = e.last_append_ms.max(seen_ms);
            }
            return;
        }
        let meta = BatchMeta {
            first_seq: h.base_sequence,
            last_seq: last_seq(h),
            base_offset,
            last_offset: base_offset + h.last_offset_delta.max(0) as u64,
            append_ms,
        };
        if !self.map.contains_key(&h.producer_id) && self.map.len() >= self.max_producers {
            self.evict_oldest();
        }
        let e = self.map.entry(h.producer_id).or_insert_with(|| Entry {
            epoch: h.producer_epoch,
            last_append_ms: seen_ms,
            recent: VecDeque::with_capacity(RECENT_BATCHES),
        });
        if h.producer_epoch != e.epoch {
            e.epoch = h.producer_epoch;
            e.recent.clear();
        }
        if e.recent.len() == RECENT_BATCHES {
            e.recent.pop_front();
        }
        e.recent.push_back(meta);
        e.last_append_ms = e.last_append_ms.max(seen_ms);
    }

    /// Forgets producers idle for longer than the expiration time.
    pub(crate) fn expire(&mut self, now_ms: i64) {
        let limit = self.expiration_ms;
        self.map
            .retain(|_, e| now_ms.saturating_sub(e.last_append_ms) <= limit);
    }

    fn evict_oldest(&mut self) {
        if let Some((&pid, _)) = self.map.iter().min_by_key(|(_, e)| e.last_append_ms) {
            self.map.remove(&pid);
        }
    }

    /// The snapshot image (format in the module docs) of the state covering offsets below
    /// `covers_below`, with the partition's transactions `txn`.
    pub(crate) fn encode(&self, txn: &TxnIndex, covers_below: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.map.len() * (ENTRY_FIXED + BATCH_LEN));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&covers_below.to_le_bytes());
        out.extend_from_slice(&(self.map.len() as u32).to_le_bytes());
        let mut pids: Vec<_> = self.map.keys().copied().collect();
        pids.sort_unstable();
        for pid in pids {
            let e = &self.map[&pid];
            out.extend_from_slice(&pid.to_le_bytes());
            out.extend_from_slice(&e.epoch.to_le_bytes());
            out.extend_from_slice(&e.last_append_ms.to_le_bytes());
            out.push(e.recent.len() as u8);
            for b in &e.recent {
                out.extend_from_slice(&b.first_seq.to_le_bytes());
                out.extend_from_slice(&b.last_seq.to_le_bytes());
                out.extend_from_slice(&b.base_offset.to_le_bytes());
                out.extend_from_slice(&b.last_offset.to_le_bytes());
                out.extend_from_slice(&b.append_ms.to_le_bytes());
            }
        }
        txn.encode_into(&mut out);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a snapshot image; returns the state, the transactions and the offset they cover
    /// below. Every count is checked against the image's length before anything is allocated.
    pub(crate) fn decode(
        buf: &[u8],
        max_producers: usize,
        expiration_ms: i64,
        max_aborted: usize,
    ) -> std::result::Result<(ProducerStates, TxnIndex, u64), String> {
        if buf.len() < HEADER_LEN + 4 {
            return Err(format!("{} bytes, shorter than a header", buf.len()));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        let stored = u32::from_le_bytes(crc.try_into().map_err(|_| "crc")?);
        if crc32fast::hash(body) != stored {
            return Err("checksum mismatch".into());
        }
        if &body[..4] != MAGIC {
            return Err("bad magic".into());
        }
        let mut r = Reader { buf: body, pos: 4 };
        let version = u16::from_le_bytes(r.take()?);
        if version != VERSION && version != 1 {
            return Err(format!("unknown version {version}"));
        }
        let covers = u64::from_le_bytes(r.take()?);
        let count = u32::from_le_bytes(r.take()?) as usize;
        if count > max_producers.max(1) || count * ENTRY_FIXED > body.len() {
            return Err(format!("{count} producers: over the limit or the file"));
        }
        let mut s = ProducerStates::new(max_producers, expiration_ms);
        for _ in 0..count {
            let pid = i64::from_le_bytes(r.take()?);
            let epoch = i16::from_le_bytes(r.take()?);
            let last_append_ms = i64::from_le_bytes(r.take()?);
            let [n] = r.take::<1>()?;
            let n = n as usize;
            if n == 0 || n > RECENT_BATCHES {
                return Err(format!("producer {pid}: {n} recent batches"));
            }
            let mut recent = VecDeque::with_capacity(n);
            for _ in 0..n {
                recent.push_back(BatchMeta {
                    first_seq: i32::from_le_bytes(r.take()?),
                    last_seq: i32::from_le_bytes(r.take()?),
                    base_offset: u64::from_le_bytes(r.take()?),
                    last_offset: u64::from_le_bytes(r.take()?),
                    append_ms: i64::from_le_bytes(r.take()?),
                });
            }
            s.map.insert(
                pid,
                Entry {
                    epoch,
                    last_append_ms,
                    recent,
                },
            );
        }
        let txn = if version == 1 {
            TxnIndex::default()
        } else {
            let left = body.len() - r.pos;
            let mut take = |n: usize| {
                let v = r
                    .buf
                    .get(r.pos..r.pos + n)
                    .ok_or_else(|| format!("truncated at byte {}", r.pos))?
                    .to_vec();
                r.pos += n;
                Ok(v)
            };
            TxnIndex::decode_from(&mut take, left, max_producers.max(1), max_aborted)?
        };
        if r.pos != body.len() {
            return Err(format!("{} trailing bytes", body.len() - r.pos));
        }
        Ok((s, txn, covers))
    }

    /// Replaces the snapshot (temp file, fdatasync, rename; the rename is made durable by the
    /// next directory fsync, and until then the older snapshot serves just as well).
    pub(crate) fn write_snapshot(
        &self,
        fs: &dyn FileSystem,
        txn: &TxnIndex,
        dir: &Path,
        covers_below: u64,
    ) -> Result<()> {
        crate::fsutil::write_replace(
            fs,
            &dir.join(SNAPSHOT_NAME),
            &self.encode(txn, covers_below),
        )
    }

    /// Reads the snapshot of `dir`: `None` if there is none or it is unusable (logged).
    pub(crate) fn read_snapshot(
        fs: &dyn FileSystem,
        dir: &Path,
        max_producers: usize,
        expiration_ms: i64,
        max_aborted: usize,
    ) -> Option<(ProducerStates, TxnIndex, u64)> {
        let path = dir.join(SNAPSHOT_NAME);
        let limit = HEADER_LEN
            + 12
            + max_producers * (ENTRY_FIXED + RECENT_BATCHES * BATCH_LEN + crate::txn::OPEN_LEN)
            + max_aborted * crate::txn::ABORTED_LEN;
        // Bounded as it is read (not by an earlier stat the file could outgrow).
        let buf = fs.read_at_most(&path, limit).ok()?;
        if buf.len() > limit {
            tracing::warn!(path = %path.display(), limit, "producer snapshot over its size limit: rebuilding from the log");
            return None;
        }
        match ProducerStates::decode(&buf, max_producers, expiration_ms, max_aborted) {
            Ok(v) => Some(v),
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "unusable producer snapshot: rebuilding from the log");
                None
            }
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let s = self
            .buf
            .get(self.pos..self.pos + N)
            .ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        self.pos += N;
        Ok(s.try_into().expect("slice of length N"))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header(pid: i64, epoch: i16, seq: i32, records: i32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            batch_length: 0,
            partition_leader_epoch: 0,
            crc: 0,
            attributes: 0,
            last_offset_delta: records - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            records_count: records,
        }
    }

    /// Checks and, when appended, records at `*next` (like the writer does).
    fn offer(s: &mut ProducerStates, h: &BatchHeader, next: &mut u64) -> Result<Check> {
        let c = s.check(h)?;
        if c == Check::Append {
            s.record(h, *next, 7);
            *next += h.records_count as u64;
        }
        Ok(c)
    }

    #[test]
    fn sequences_duplicates_gaps_and_fencing() {
        let mut s = ProducerStates::new(100, i64::MAX);
        let mut next = 0;
        assert_eq!(
            offer(&mut s, &header(1, 0, 0, 3), &mut next).unwrap(),
            Check::Append
        );
        assert_eq!(
            offer(&mut s, &header(1, 0, 3, 2), &mut next).unwrap(),
            Check::Append
        );
        // A retry of either batch is a duplicate with the original offsets.
        assert_eq!(
            offer(&mut s, &header(1, 0, 0, 3), &mut next).unwrap(),
            Check::Duplicate {
                base_offset: 0,
                last_offset: 2,
                append_ms: 7
            }
        );
        assert_eq!(
            offer(&mut s, &header(1, 0, 3, 2), &mut next).unwrap(),
            Check::Duplicate {
                base_offset: 3,
                last_offset: 4,
                append_ms: 7
            }
        );
        // A gap, an overlap, and a negative sequence are refused.
        assert!(matches!(
            offer(&mut s, &header(1, 0, 6, 1), &mut next),
            Err(Error::OutOfOrderSequence {
                expected: 5,
                got: 6,
                ..
            })
        ));
        assert!(matches!(
            offer(&mut s, &header(1, 0, 4, 2), &mut next),
            Err(Error::OutOfOrderSequence { .. })
        ));
        assert!(offer(&mut s, &header(1, 0, -5, 1), &mut next).is_err());
        // A new epoch restarts at 0 and fences the old one.
        assert!(offer(&mut s, &header(1, 1, 3, 1), &mut next).is_err());
        assert_eq!(
            offer(&mut s, &header(1, 1, 0, 1), &mut next).unwrap(),
            Check::Append
        );
        assert!(matches!(
            offer(&mut s, &header(1, 0, 5, 1), &mut next),
            Err(Error::ProducerFenced {
                epoch: 0,
                current_epoch: 1,
                ..
            })
        ));
        // An unknown producer is tracked from its first batch, whatever its sequence.
        assert_eq!(
            offer(&mut s, &header(2, 0, 9, 1), &mut next).unwrap(),
            Check::Append
        );
        assert!(offer(&mut s, &header(2, 0, 11, 1), &mut next).is_err());
        // Batches without a producer id are not checked.
        assert_eq!(
            offer(&mut s, &header(-1, -1, -1, 4), &mut next).unwrap(),
            Check::Append
        );
        assert_eq!(next, 11);
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let mut s = ProducerStates::new(10, i64::MAX);
        let mut next = 0;
        s.record(&header(1, 0, 0, 1), 0, 0);
        s.map
            .get_mut(&1)
            .unwrap()
            .recent
            .back_mut()
            .unwrap()
            .last_seq = i32::MAX - 1;
        assert_eq!(
            offer(&mut s, &header(1, 0, i32::MAX, 3), &mut next).unwrap(),
            Check::Append
        );
        assert_eq!(s.map[&1].recent.back().unwrap().last_seq, 1);
        assert_eq!(
            offer(&mut s, &header(1, 0, 2, 1), &mut next).unwrap(),
            Check::Append
        );
    }

    #[test]
    fn limits_and_expiry() {
        let mut s = ProducerStates::new(2, 1000);
        s.record(&header(1, 0, 0, 1), 0, 100);
        s.record(&header(2, 0, 0, 1), 1, 200);
        s.record(&header(3, 0, 0, 1), 2, 300);
        assert_eq!(s.len(), 2);
        assert!(
            !s.map.contains_key(&1),
            "the least recently active is evicted"
        );
        s.expire(1250);
        assert_eq!(s.map.keys().copied().collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn snapshot_round_trip_and_damage() {
        let mut s = ProducerStates::new(100, i64::MAX);
        let mut next = 0;
        for pid in 0..10 {
            for seq in 0..7 {
                offer(&mut s, &header(pid, 3, seq * 2, 2), &mut next).unwrap();
            }
        }
        let img = s.encode(&TxnIndex::default(), next);
        let (back, txn, covers) = ProducerStates::decode(&img, 100, i64::MAX, 10).unwrap();
        assert_eq!((back, covers), (s.clone(), next));
        assert_eq!(txn, TxnIndex::default());
        for i in 0..img.len() {
            let mut bad = img.clone();
            bad[i] ^= 0x10;
            assert!(
                ProducerStates::decode(&bad, 100, i64::MAX, 10).is_err(),
                "flip at {i}"
            );
        }
        for len in 0..img.len() {
            assert!(ProducerStates::decode(&img[..len], 100, i64::MAX, 10).is_err());
        }
        assert!(
            ProducerStates::decode(&img, 5, i64::MAX, 10).is_err(),
            "over the limit"
        );
    }

    /// A model: a producer sends batches with consecutive sequences and retries any of its
    /// recent ones; the log must hold each batch exactly once, in order.
    #[derive(Clone, Debug)]
    enum Op {
        Next(u8, i32),
        Retry(u8, usize),
        Gap(u8, i32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, 1i32..5).prop_map(|(p, n)| Op::Next(p, n)),
            3 => (0u8..3, 0usize..8).prop_map(|(p, k)| Op::Retry(p, k)),
            1 => (0u8..3, 1i32..5).prop_map(|(p, g)| Op::Gap(p, g)),
        ]
    }

    proptest! {
        #[test]
        fn exactly_once_against_a_model(ops in prop::collection::vec(op(), 1..200)) {
            let mut s = ProducerStates::new(100, i64::MAX);
            let mut next = 0u64;
            // Per producer: batches sent so far (first seq, records, base offset once appended).
            let mut sent: HashMap<u8, Vec<(i32, i32, u64)>> = HashMap::new();
            let mut log: Vec<(u8, i32)> = Vec::new();
            for op in ops {
                match op {
                    Op::Next(p, n) => {
                        let seq = sent.get(&p).and_then(|v| v.last()).map_or(0, |(f, n, _)| f + n);
                        let c = offer(&mut s, &header(p as i64, 0, seq, n), &mut next).unwrap();
                        prop_assert_eq!(c, Check::Append);
                        sent.entry(p).or_default().push((seq, n, next - n as u64));
                        log.push((p, seq));
                    }
                    Op::Retry(p, k) => {
                        let Some(v) = sent.get(&p) else { continue };
                        if v.is_empty() { continue }
                        let idx = v.len() - 1 - k.min(v.len() - 1);
                        let (seq, n, base) = v[idx];
                        let r = offer(&mut s, &header(p as i64, 0, seq, n), &mut next);
                        if v.len() - idx <= RECENT_BATCHES {
                            prop_assert_eq!(r.unwrap(), Check::Duplicate {
                                base_offset: base, last_offset: base + n as u64 - 1, append_ms: 7 });
                        } else {
                            prop_assert!(r.is_err(), "an old retry is refused, never appended");
                        }
                    }
                    Op::Gap(p, g) => {
                        // (A producer's first batch is accepted at any sequence.)
                        let Some(&(f, n, _)) = sent.get(&p).and_then(|v| v.last()) else { continue };
                        let seq = f + n;
                        prop_assert!(offer(&mut s, &header(p as i64, 0, seq + g, 1), &mut next).is_err());
                    }
                }
            }
            let appended: usize = sent.values().map(Vec::len).sum();
            prop_assert_eq!(appended, log.len());
            // Snapshots preserve all of it.
            let (back, _, _) = ProducerStates::decode(&s.encode(&TxnIndex::default(), next), 100, i64::MAX, 10).unwrap();
            prop_assert_eq!(back, s);
        }
    }
}
