//! Transactions inside one partition: control batches (commit and abort markers), the open
//! transactions, the aborted-transaction index, and the last stable offset (LSO).
//!
//! A transactional producer's batches carry the transactional attribute. The first one a
//! partition receives from a producer opens a transaction there, starting at its base offset;
//! a marker written by the transaction coordinator ([`crate::Partition::write_marker`]) ends
//! it. A marker is a control batch (Kafka's format: one record, key `version i16 = 0 |
//! type i16` with 0 = abort and 1 = commit, value `version i16 = 0 | coordinator_epoch i32`).
//!
//! Invariants (all changes are made under the partition's writer lock, after the write they
//! describe succeeded):
//! - The **last stable offset** is the smallest of the high watermark, the first offset of
//!   every open transaction, and the first offset of every transaction whose marker readers
//!   cannot see yet (at or past the high watermark: under `fsync = always` the marker is not
//!   durable yet, and a crash would reopen the transaction). So the LSO never goes backwards,
//!   across a crash too: everything below it is decided, durably.
//! - Below the LSO, a transactional batch belongs to a committed transaction unless
//!   `(producer id, offset)` falls in an entry of the aborted index (first offset .. marker).
//! - A producer with a transaction open on the partition may write only transactional batches
//!   of that epoch; a marker needs an epoch at least the transaction's. Clients may not write
//!   control batches.
//! - State is derived from the log: rebuilt from the producer snapshot plus a walk of batch
//!   headers (and markers' keys) at open, like the idempotent-producer state.
//!
//! Limits: at most [`crate::Limits::max_aborted_txns_per_partition`] aborted transactions are
//! remembered per partition (retention forgets those below the log start); past it, new
//! transactions are refused on the partition ([`Error::InvalidTxnState`]) rather than
//! forgetting what must stay hidden.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;

use crate::batch::{BatchBuilder, BatchHeader, Compression, HEADER_LEN, varint};
use crate::error::{Error, Result};

/// What a marker decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Marker {
    /// The transaction is aborted: its batches are hidden from read-committed readers.
    Abort,
    /// The transaction is committed.
    Commit,
}

impl Marker {
    fn code(self) -> i16 {
        match self {
            Marker::Abort => 0,
            Marker::Commit => 1,
        }
    }
}

/// What a reader may see.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Isolation {
    /// Everything below the high watermark.
    #[default]
    ReadUncommitted,
    /// Only below the last stable offset, without aborted transactions' batches.
    ReadCommitted,
}

/// An open transaction on a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenTxn {
    /// Producer id.
    pub producer_id: i64,
    /// The epoch of its batches.
    pub epoch: i16,
    /// Offset of its first batch on the partition.
    pub first_offset: u64,
}

/// Encodes a marker batch for `producer_id` at `epoch` (offsets are assigned at append).
pub fn marker_batch(
    producer_id: i64,
    epoch: i16,
    marker: Marker,
    coordinator_epoch: i32,
    timestamp_ms: i64,
) -> Bytes {
    let mut key = [0u8; 4];
    key[2..].copy_from_slice(&marker.code().to_be_bytes());
    let mut value = [0u8; 6];
    value[2..].copy_from_slice(&coordinator_epoch.to_be_bytes());
    let mut b = BatchBuilder::with_capacity(Compression::None, 32);
    b.producer(producer_id, epoch, -1).control();
    b.push(timestamp_ms, Some(&key), Some(&value), &[]);
    b.finish().expect("a one-record batch always encodes")
}

/// The decision carried by a control batch (`batch` starts at its header `h`), or `None`
/// when it is not a control batch or its record cannot be read (an unknown control type).
pub fn marker_of(batch: &[u8], h: &BatchHeader) -> Option<Marker> {
    if !h.is_control() || h.compression().ok()? != Compression::None {
        return None;
    }
    let recs = batch.get(HEADER_LEN..h.total_len().min(batch.len()))?;
    let mut pos = 0;
    let _len = varint::get_i32(recs, &mut pos).ok()?;
    pos += 1; // attributes
    let _ts = varint::get_i64(recs, &mut pos).ok()?;
    let _delta = varint::get_i32(recs, &mut pos).ok()?;
    let klen = varint::get_i32(recs, &mut pos).ok()?;
    if klen < 4 {
        return None;
    }
    let key = recs.get(pos..pos + 4)?;
    match i16::from_be_bytes([key[2], key[3]]) {
        0 => Some(Marker::Abort),
        1 => Some(Marker::Commit),
        _ => None,
    }
}

/// The transactions of one partition (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TxnIndex {
    open: HashMap<i64, OpenTxn>,
    /// `(first offset, producer id)` of every open transaction, for the LSO.
    open_by_first: BTreeSet<(u64, i64)>,
    /// `(first offset, marker offset)` of transactions ended by a marker readers may not
    /// see yet.
    ending: Vec<(u64, u64)>,
    /// `(producer id, first offset)` → marker offset, for aborted transactions.
    aborted: BTreeMap<(i64, u64), u64>,
}

impl TxnIndex {
    /// Checks a batch a client wants to append (not a marker). Changes nothing.
    pub(crate) fn check(&self, h: &BatchHeader, max_aborted: usize) -> Result<()> {
        let pid = h.producer_id;
        let open = self.open.get(&pid);
        if !h.is_transactional() {
            return match open {
                Some(o) if pid >= 0 => Err(Error::InvalidTxnState {
                    producer_id: pid,
                    reason: format!(
                        "a non-transactional batch while its transaction (epoch {}) is open on the partition",
                        o.epoch
                    ),
                }),
                _ => Ok(()),
            };
        }
        if pid < 0 {
            return Err(Error::InvalidTxnState {
                producer_id: pid,
                reason: "a transactional batch needs a producer id".into(),
            });
        }
        match open {
            Some(o) if h.producer_epoch < o.epoch => Err(Error::ProducerFenced {
                producer_id: pid,
                epoch: h.producer_epoch,
                current_epoch: o.epoch,
            }),
            Some(o) if h.producer_epoch > o.epoch => Err(Error::InvalidTxnState {
                producer_id: pid,
                reason: format!(
                    "epoch {} while the transaction of epoch {} is still open on the partition",
                    h.producer_epoch, o.epoch
                ),
            }),
            Some(_) => Ok(()),
            None if self.aborted.len() >= max_aborted => Err(Error::InvalidTxnState {
                producer_id: pid,
                reason: format!(
                    "the partition already remembers {} aborted transactions (the limit): no new transaction until retention removes some",
                    self.aborted.len()
                ),
            }),
            None => Ok(()),
        }
    }

    /// The open transaction of `pid`, if any.
    pub(crate) fn open_txn(&self, pid: i64) -> Option<OpenTxn> {
        self.open.get(&pid).copied()
    }

    /// All open transactions, by first offset.
    pub(crate) fn open_txns(&self) -> Vec<OpenTxn> {
        self.open_by_first
            .iter()
            .map(|&(_, pid)| self.open[&pid])
            .collect()
    }

    /// Records a batch written at `base_offset` (header `h`; `batch` its bytes, for markers).
    /// `visible_end` is the offset readers can see below (the high watermark; `u64::MAX` when
    /// rebuilding from a log that is all visible).
    pub(crate) fn record(
        &mut self,
        h: &BatchHeader,
        batch: &[u8],
        base_offset: u64,
        visible_end: u64,
    ) {
        let pid = h.producer_id;
        if pid < 0 || !h.is_transactional() {
            return;
        }
        if !h.is_control() {
            self.open.entry(pid).or_insert_with(|| {
                self.open_by_first.insert((base_offset, pid));
                OpenTxn {
                    producer_id: pid,
                    epoch: h.producer_epoch,
                    first_offset: base_offset,
                }
            });
            return;
        }
        let Some(marker) = marker_of(batch, h) else {
            return;
        };
        let Some(o) = self.open.remove(&pid) else {
            return;
        };
        self.open_by_first.remove(&(o.first_offset, pid));
        if marker == Marker::Abort {
            self.aborted.insert((pid, o.first_offset), base_offset);
        }
        self.ending.retain(|&(_, m)| m >= visible_end);
        if base_offset >= visible_end {
            self.ending.push((o.first_offset, base_offset));
        }
    }

    /// The last stable offset given the high watermark `hwm`.
    pub(crate) fn last_stable(&self, hwm: u64) -> u64 {
        let open = self.open_by_first.first().map_or(u64::MAX, |&(f, _)| f);
        let ending = self
            .ending
            .iter()
            .filter(|&&(_, m)| m >= hwm)
            .map(|&(f, _)| f)
            .min()
            .unwrap_or(u64::MAX);
        hwm.min(open).min(ending)
    }

    /// True when the batch of `pid` at `offset` belongs to an aborted transaction.
    pub(crate) fn is_aborted(&self, pid: i64, offset: u64) -> bool {
        self.aborted
            .range(..=(pid, offset))
            .next_back()
            .is_some_and(|(&(p, _), &last)| p == pid && offset <= last)
    }

    /// Number of aborted transactions remembered.
    #[cfg(test)]
    pub(crate) fn aborted_len(&self) -> usize {
        self.aborted.len()
    }

    /// Forgets aborted transactions that ended below `log_start`.
    pub(crate) fn prune(&mut self, log_start: u64) {
        self.aborted.retain(|_, last| *last >= log_start);
    }

    /// Appends the snapshot sections (format in [`crate::producer`]).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.open.len() as u32).to_le_bytes());
        for &(first, pid) in &self.open_by_first {
            out.extend_from_slice(&pid.to_le_bytes());
            out.extend_from_slice(&self.open[&pid].epoch.to_le_bytes());
            out.extend_from_slice(&first.to_le_bytes());
        }
        out.extend_from_slice(&(self.aborted.len() as u32).to_le_bytes());
        for (&(pid, first), &last) in &self.aborted {
            out.extend_from_slice(&pid.to_le_bytes());
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&last.to_le_bytes());
        }
    }

    /// Parses the sections written by [`TxnIndex::encode_into`] from `take`, bounding every
    /// count by the bytes left (`left`) and the limits.
    pub(crate) fn decode_from(
        take: &mut dyn FnMut(usize) -> std::result::Result<Vec<u8>, String>,
        left: usize,
        max_open: usize,
        max_aborted: usize,
    ) -> std::result::Result<TxnIndex, String> {
        let u32_of = |b: Vec<u8>| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
        let i64_of = |b: &[u8]| i64::from_le_bytes(b.try_into().expect("8 bytes"));
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let mut t = TxnIndex::default();
        let n_open = u32_of(take(4)?);
        if n_open > max_open || n_open * OPEN_LEN > left {
            return Err(format!(
                "{n_open} open transactions: over the limit or the file"
            ));
        }
        for _ in 0..n_open {
            let b = take(OPEN_LEN)?;
            let pid = i64_of(&b[0..8]);
            let epoch = i16::from_le_bytes([b[8], b[9]]);
            let first = u64_of(&b[10..18]);
            if t.open.contains_key(&pid) {
                return Err(format!("producer {pid} has two open transactions"));
            }
            t.open.insert(
                pid,
                OpenTxn {
                    producer_id: pid,
                    epoch,
                    first_offset: first,
                },
            );
            t.open_by_first.insert((first, pid));
        }
        let n_aborted = u32_of(take(4)?);
        if n_aborted > max_aborted || n_aborted * ABORTED_LEN > left {
            return Err(format!(
                "{n_aborted} aborted transactions: over the limit or the file"
            ));
        }
        for _ in 0..n_aborted {
            let b = take(ABORTED_LEN)?;
            let (pid, first, last) = (i64_of(&b[0..8]), u64_of(&b[8..16]), u64_of(&b[16..24]));
            if last < first {
                return Err(format!(
                    "aborted transaction {first}..{last} ends before it starts"
                ));
            }
            t.aborted.insert((pid, first), last);
        }
        Ok(t)
    }
}

/// Bytes of one open transaction in the snapshot.
pub(crate) const OPEN_LEN: usize = 8 + 2 + 8;
/// Bytes of one aborted transaction in the snapshot.
pub(crate) const ABORTED_LEN: usize = 8 + 8 + 8;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::batch::validate_batch;

    fn data_batch(pid: i64, epoch: i16, txn: bool) -> (BatchHeader, Bytes) {
        let mut b = BatchBuilder::new(Compression::None);
        b.producer(pid, epoch, 0).transactional(txn);
        b.push(1, Some(b"k"), Some(b"v"), &[]);
        let bytes = b.finish().unwrap();
        (
            validate_batch(&bytes, u32::MAX, &Default::default()).unwrap(),
            bytes,
        )
    }

    fn marker(pid: i64, epoch: i16, m: Marker) -> (BatchHeader, Bytes) {
        let bytes = marker_batch(pid, epoch, m, 7, 1);
        (
            validate_batch(&bytes, u32::MAX, &Default::default()).unwrap(),
            bytes,
        )
    }

    #[test]
    fn marker_round_trip() {
        for m in [Marker::Abort, Marker::Commit] {
            let (h, b) = marker(5, 2, m);
            assert!(h.is_control() && h.is_transactional());
            assert_eq!(
                (h.producer_id, h.producer_epoch, h.base_sequence),
                (5, 2, -1)
            );
            assert_eq!(marker_of(&b, &h), Some(m));
        }
        let (h, b) = data_batch(5, 2, true);
        assert_eq!(marker_of(&b, &h), None);
    }

    #[test]
    fn lso_aborted_and_fencing() {
        let mut t = TxnIndex::default();
        let (h1, b1) = data_batch(1, 0, true);
        let (h2, b2) = data_batch(2, 0, true);
        t.record(&h1, &b1, 10, 10);
        t.record(&h2, &b2, 11, 11);
        t.record(&h1, &b1, 12, 12);
        assert_eq!(t.last_stable(13), 10);
        // Plain batches from a producer with an open transaction, and other epochs, refused.
        assert!(t.check(&data_batch(1, 0, false).0, 10).is_err());
        assert!(matches!(
            t.check(&data_batch(1, 1, true).0, 10),
            Err(Error::InvalidTxnState { .. })
        ));
        assert!(t.check(&data_batch(3, 0, false).0, 10).is_ok());
        assert!(t.check(&data_batch(-1, -1, true).0, 10).is_err());
        // Abort 1 at 13; the marker is not visible yet (hwm 13): the LSO stays.
        let (ha, ba) = marker(1, 1, Marker::Abort);
        t.record(&ha, &ba, 13, 13);
        assert_eq!(t.last_stable(13), 10);
        assert_eq!(
            t.last_stable(14),
            11,
            "once the marker is visible, 2's start holds it"
        );
        assert!(t.is_aborted(1, 10) && t.is_aborted(1, 12) && t.is_aborted(1, 13));
        assert!(!t.is_aborted(2, 11) && !t.is_aborted(1, 14) && !t.is_aborted(1, 9));
        let (hc, bc) = marker(2, 1, Marker::Commit);
        t.record(&hc, &bc, 14, 20);
        assert_eq!(t.last_stable(20), 20);
        assert!(!t.is_aborted(2, 11));
        // The limit on remembered aborts refuses new transactions only.
        assert!(t.check(&data_batch(9, 0, true).0, 1).is_err());
        assert!(t.check(&data_batch(9, 0, true).0, 2).is_ok());
        t.prune(14);
        assert_eq!(t.aborted_len(), 0);
    }

    proptest! {
        /// Against a model: interleaved transactions of a few producers, ended at random;
        /// every batch below the LSO is classified as its transaction ended, and the snapshot
        /// sections round-trip.
        #[test]
        fn against_a_model(ops in prop::collection::vec((0i64..4, 0u8..4), 1..200)) {
            let mut t = TxnIndex::default();
            // Model: per offset, (pid, Some(committed?) once decided).
            let mut log: Vec<(i64, Option<bool>)> = Vec::new();
            let mut open: HashMap<i64, Vec<usize>> = HashMap::new();
            for (pid, op) in ops {
                let at = log.len() as u64;
                if op < 2 || !open.contains_key(&pid) {
                    let (h, b) = data_batch(pid, 0, true);
                    prop_assert!(t.check(&h, usize::MAX).is_ok());
                    t.record(&h, &b, at, at + 1);
                    log.push((pid, None));
                    open.entry(pid).or_default().push(at as usize);
                } else {
                    let commit = op == 2;
                    let (h, b) = marker(pid, 0, if commit { Marker::Commit } else { Marker::Abort });
                    t.record(&h, &b, at, at + 1);
                    for i in open.remove(&pid).unwrap() {
                        log[i].1 = Some(commit);
                    }
                    log.push((-2, None));
                }
            }
            let hwm = log.len() as u64;
            let lso = t.last_stable(hwm);
            let first_open = log.iter().position(|(p, d)| *p >= 0 && d.is_none()).map_or(hwm, |i| i as u64);
            prop_assert_eq!(lso, first_open);
            for (i, (pid, d)) in log.iter().enumerate().take(lso as usize) {
                if *pid >= 0 {
                    prop_assert_eq!(t.is_aborted(*pid, i as u64), *d == Some(false));
                }
            }
            let mut img = Vec::new();
            t.encode_into(&mut img);
            let mut pos = 0;
            let mut take = |n: usize| {
                let s = img.get(pos..pos + n).ok_or("short")?.to_vec();
                pos += n;
                Ok::<_, String>(s)
            };
            let back = TxnIndex::decode_from(&mut take, img.len(), 100, 1000).unwrap();
            prop_assert_eq!(back.open, t.open.clone());
            prop_assert_eq!(back.aborted, t.aborted.clone());
        }
    }
}
