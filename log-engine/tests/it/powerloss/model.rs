//! What the engine was told and what it answered: the model the crash loop checks a reopened
//! log against.
//!
//! Per partition the model keeps every record the engine accepted (at the offset it gave),
//! the durable end (everything below was acknowledged durable: an `append` that waited under
//! `fsync = always`, a `wait_durable`, a `flush`, a `roll`), records whose append failed (they
//! may or may not be there, but if they are they must be whole), the highest last stable
//! offset seen, and the highest log start a cut may leave (retention in flight).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use spool_log_engine::{FsyncPolicy, TopicConfig};

/// One record as written: key, value (None = tombstone), or a transaction marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Rec {
    Data(Option<Vec<u8>>, Option<Vec<u8>>),
    Marker,
}

#[derive(Debug, Default)]
pub(crate) struct Part {
    /// Records the engine accepted or may have written, by offset.
    pub(crate) recs: BTreeMap<u64, Rec>,
    /// Offsets of `recs` whose append failed: present or not, never torn.
    pub(crate) maybe: BTreeSet<u64>,
    /// Everything below was acknowledged durable.
    pub(crate) durable: u64,
    /// The next offset the engine will assign.
    pub(crate) next: u64,
    /// The highest last stable offset seen (fsync = always topics).
    pub(crate) lso_floor: u64,
    /// The highest log start offset a cut may leave.
    pub(crate) start_ceiling: u64,
    /// Offsets of records of committed / aborted transactions (marker durable).
    pub(crate) committed: BTreeSet<u64>,
    pub(crate) aborted: BTreeSet<u64>,
    /// Records below the log start (deleted by retention), kept to check a resend the engine
    /// answers as a duplicate of them (its producer state outlives the records).
    pub(crate) retired: BTreeMap<u64, Rec>,
}

impl Part {
    /// Records `recs` as appended at `base`.
    pub(crate) fn put(&mut self, base: u64, recs: &[Rec]) {
        for (i, r) in recs.iter().enumerate() {
            let o = base + i as u64;
            self.recs.insert(o, r.clone());
            // A failed append's tentative offsets went to this one: whatever was said of
            // them no longer holds.
            self.maybe.remove(&o);
            self.committed.remove(&o);
            self.aborted.remove(&o);
        }
        self.next = self.next.max(base + recs.len() as u64);
    }

    /// Records `recs` as possibly written at the next offset (the append failed).
    pub(crate) fn put_maybe(&mut self, recs: &[Rec]) {
        let base = self.next;
        for (i, r) in recs.iter().enumerate() {
            self.recs.insert(base + i as u64, r.clone());
            self.maybe.insert(base + i as u64);
        }
    }

    pub(crate) fn durable_to(&mut self, next: u64) {
        self.durable = self.durable.max(next);
    }
}

/// Whether a topic's create or delete was cut short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Life {
    Live,
    /// `create_topic` did not return: the topic may or may not exist.
    Creating,
    /// `delete_topic` did not return: the topic may still exist, whole.
    Deleting,
}

#[derive(Debug)]
pub(crate) struct Topic {
    pub(crate) cfg: TopicConfig,
    /// An `alter_topic`/`add_partitions` whose outcome is unknown: either config may be on disk.
    pub(crate) cfg_maybe: Option<TopicConfig>,
    pub(crate) parts: Vec<Part>,
    pub(crate) life: Life,
}

impl Topic {
    pub(crate) fn new(cfg: TopicConfig, life: Life) -> Topic {
        Topic {
            parts: (0..cfg.partitions).map(|_| Part::default()).collect(),
            cfg,
            cfg_maybe: None,
            life,
        }
    }

    pub(crate) fn always(&self) -> bool {
        self.cfg.fsync == FsyncPolicy::Always
    }

    pub(crate) fn compacted(&self) -> bool {
        self.cfg.cleanup.compacts()
    }
}

/// A batch an idempotent producer sent and has not seen acknowledged durable.
#[derive(Clone, Debug)]
pub(crate) struct Unacked {
    pub(crate) bytes: Bytes,
    pub(crate) recs: Vec<Rec>,
    /// Where the engine put it, when it said so.
    pub(crate) at: Option<u64>,
    /// Sent at least once (a duplicate answer is legitimate only then).
    pub(crate) sent: bool,
}

/// `(topic, partition)`.
pub(crate) type PartKey = (String, u32);

/// An idempotent producer writing to one partition of an `fsync = always` topic.
#[derive(Debug)]
pub(crate) struct Producer {
    pub(crate) pid: i64,
    pub(crate) topic: String,
    pub(crate) part: u32,
    pub(crate) next_seq: i32,
    pub(crate) unacked: VecDeque<Unacked>,
}

/// A transactional producer (the test is its coordinator and remembers its decisions across
/// cuts, as the broker's coordinator does in `__transaction_state`).
#[derive(Debug)]
pub(crate) struct TxnProducer {
    pub(crate) pid: i64,
    pub(crate) epoch: i16,
    /// Partitions of the open transaction, with its records there (and their offsets).
    pub(crate) parts: BTreeMap<PartKey, Vec<(u64, Rec)>>,
    pub(crate) seqs: BTreeMap<PartKey, i32>,
    /// The decision, once taken (true = commit); markers follow.
    pub(crate) decision: Option<bool>,
}

#[derive(Debug, Default)]
pub(crate) struct Model {
    pub(crate) topics: BTreeMap<String, Topic>,
    pub(crate) producers: Vec<Producer>,
    pub(crate) txns: Vec<TxnProducer>,
    /// Every value written so far is unique; counts them.
    pub(crate) serial: u64,
    /// Producer ids handed out (never reused).
    pub(crate) pids: i64,
    /// A violation the workload saw (checked after every step).
    pub(crate) violation: Option<String>,
}

impl Model {
    pub(crate) fn part(&mut self, topic: &str, p: u32) -> Option<&mut Part> {
        self.topics
            .get_mut(topic)
            .and_then(|t| t.parts.get_mut(p as usize))
    }
}
