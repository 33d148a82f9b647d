//! The broker workload of the power-cut loops and the model it is checked against.
//!
//! Steps call the coordinators as the gRPC services do: offset commits and group deletions
//! (`OffsetStore`), producer ids for idempotent producers (`ProducerIds`), transactional
//! producers (`Transactions::init`, `add_partitions` then a transactional append as the
//! produce path does, `add_offsets`, `end`). Each step records in the model what the broker
//! acknowledged (returned `Ok` for) and what it was only asked (an error or a cut came first:
//! it may or may not have happened).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use spool_log_engine::io::sim::SimRng;
use spool_log_engine::{BatchBuilder, Clock, Compression, Isolation, Partition};
use spool_proto::v1;

use crate::State;

/// Data topics the producers write to: (name, partitions).
pub(super) const DATA_TOPICS: &[(&str, u32)] = &[("d0", 2), ("d1", 1)];
/// Groups committed to with plain commits, and with transactions.
const PLAIN_GROUPS: &[&str] = &["g0", "g1"];
const TXN_GROUPS: &[&str] = &["tg0", "tg1"];
/// Transactional ids.
pub(super) const TXN_IDS: &[&str] = &["tx0", "tx1", "tx2"];

/// A wall clock the loop moves by hand.
#[derive(Debug)]
pub(super) struct ManualClock(pub(super) AtomicI64);

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub(super) fn tracing_on() -> bool {
    std::env::var_os("SPOOL_POWERLOSS_TRACE").is_some()
}

type Tp = (String, u32);
type Key = (String, String, u32);

/// What is known of one committed offset.
#[derive(Debug, Default)]
pub(super) struct Committed {
    /// The last acknowledged value (`None`: none, or deleted).
    pub(super) acked: Option<u64>,
    /// Values asked for after it, not acknowledged (each may be in force after a cut).
    pub(super) maybe: Vec<Option<u64>>,
}

/// How a transaction ended, as far as its producer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// EndTxn was not called, or returned an error before the decision could be recorded
    /// for sure: anything but a torn transaction is allowed.
    Unknown,
    /// EndTxn returned `Ok`: the decision must hold for ever.
    Decided { commit: bool },
}

/// One transaction of a producer.
#[derive(Debug)]
pub(super) struct Txn {
    pub(super) id: String,
    /// Its records: partition and offset (each appended and acknowledged).
    pub(super) recs: Vec<(Tp, u64)>,
    /// Offsets it commits (acknowledged by AddOffsetsToTxn).
    pub(super) offsets: Vec<(Key, u64)>,
    pub(super) outcome: Outcome,
}

/// A transactional producer.
#[derive(Debug, Default)]
pub(super) struct Producer {
    /// The (producer id, epoch) it writes with; `None`: it must call InitProducerId.
    pub(super) current: Option<(i64, i16)>,
    /// Next sequence per (pid, epoch, partition).
    seqs: BTreeMap<(i64, i16, Tp), i32>,
    /// Index in `Model::txns` of its open transaction.
    open: Option<usize>,
    /// Epochs an acknowledged InitProducerId fenced.
    fenced: Vec<(i64, i16)>,
}

/// What the broker acknowledged.
#[derive(Debug, Default)]
pub(super) struct Model {
    pub(super) commits: BTreeMap<Key, Committed>,
    /// Every producer id handed out, in any life of the broker, with whom it went to (a
    /// transactional id, or "" for an idempotent producer's InitProducerId).
    pub(super) pids: BTreeMap<i64, String>,
    pub(super) producers: BTreeMap<String, Producer>,
    pub(super) txns: Vec<Txn>,
    /// Highest last stable offset seen per data partition.
    pub(super) lso_seen: BTreeMap<Tp, u64>,
    /// Acknowledged durable end per data partition.
    pub(super) acked_end: BTreeMap<Tp, u64>,
    /// Next offset value to commit (commits only move forward, as a consumer's do).
    next_commit: u64,
    serial: u64,
    pub(super) violation: Option<String>,
}

/// Counters of one seed.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) commits_acked: u64,
    pub(super) pids: u64,
    pub(super) txns_decided: u64,
}

pub(super) struct Work<'a> {
    pub(super) state: &'a Arc<State>,
    pub(super) rt: &'a tokio::runtime::Runtime,
    pub(super) model: &'a mut Model,
    pub(super) rng: &'a mut SimRng,
    pub(super) clock: &'a ManualClock,
    pub(super) counts: &'a mut Counts,
}

fn trace(what: std::fmt::Arguments<'_>) {
    if tracing_on() {
        eprintln!("    {what}");
    }
}

impl Work<'_> {
    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    pub(super) fn step(&mut self) {
        self.clock.0.fetch_add(
            i64::try_from(self.rng.range(1, 50)).unwrap_or(1),
            Ordering::Relaxed,
        );
        match self.rng.below(20) {
            0..=4 => self.plain_commit(),
            5 => self.delete_group(),
            6 | 7 => self.allocate_pid(),
            8..=17 => self.txn_step(),
            18 => self.zombie(),
            _ => self.maintenance(),
        }
        self.observe_lso();
    }

    fn pick_tp(&mut self) -> Tp {
        let (t, n) = *self.rng.pick(DATA_TOPICS);
        (t.to_owned(), self.rng.below(u64::from(n)) as u32)
    }

    fn next_commit_value(&mut self) -> u64 {
        self.model.next_commit += self.rng.range(1, 5);
        self.model.next_commit
    }

    fn plain_commit(&mut self) {
        let group = (*self.rng.pick(PLAIN_GROUPS)).to_owned();
        let n = self.rng.range(1, 3);
        let mut commits = Vec::new();
        let mut seen = BTreeSet::new();
        for _ in 0..n {
            let tp = self.pick_tp();
            if !seen.insert(tp.clone()) {
                continue;
            }
            let offset = self.next_commit_value();
            commits.push(v1::OffsetCommit {
                topic: tp.0,
                partition: tp.1,
                offset,
                metadata: String::new(),
            });
        }
        for c in &commits {
            self.model
                .commits
                .entry((group.clone(), c.topic.clone(), c.partition))
                .or_default()
                .maybe
                .push(Some(c.offset));
        }
        let res = self.state.offsets.commit(&group, &commits, self.now());
        trace(format_args!("commit {group} {commits:?}: {res:?}"));
        if res.is_ok() {
            self.counts.commits_acked += 1;
            for c in &commits {
                let k = self
                    .model
                    .commits
                    .get_mut(&(group.clone(), c.topic.clone(), c.partition))
                    .expect("recorded");
                k.acked = Some(c.offset);
                k.maybe.clear();
            }
        }
    }

    fn delete_group(&mut self) {
        let group = (*self.rng.pick(PLAIN_GROUPS)).to_owned();
        let keys: Vec<Key> = self
            .model
            .commits
            .keys()
            .filter(|(g, _, _)| *g == group)
            .cloned()
            .collect();
        for k in &keys {
            self.model
                .commits
                .get_mut(k)
                .expect("listed")
                .maybe
                .push(None);
        }
        let res = self
            .state
            .offsets
            .delete_group_with(&group, &[], self.now(), || Ok(()));
        trace(format_args!("delete group {group}: {res:?}"));
        if res.is_ok() {
            for k in &keys {
                let c = self.model.commits.get_mut(k).expect("listed");
                c.acked = None;
                c.maybe.clear();
            }
        }
    }

    /// Records that `pid` went to `owner`: a producer id is never handed to anyone else
    /// (an idempotent producer's is its alone; a transactional id keeps its own).
    fn new_pid(&mut self, pid: i64, owner: &str) {
        match self.model.pids.get(&pid) {
            None => {
                self.counts.pids += 1;
                self.model.pids.insert(pid, owner.to_owned());
            }
            Some(o) if !o.is_empty() && o == owner => {}
            Some(o) => {
                self.model.violation = Some(format!(
                    "producer id {pid} handed out twice: to {o:?}, then to {owner:?}"
                ));
            }
        }
    }

    fn allocate_pid(&mut self) {
        let res = self.state.producer_ids.allocate(self.now());
        trace(format_args!("allocate producer id: {res:?}"));
        if let Ok(pid) = res {
            self.new_pid(pid, "");
        }
    }

    fn maintenance(&mut self) {
        if self.rng.chance(0.5) {
            // A day passes: rolls by segment age, deletes expired tombstones.
            self.clock
                .0
                .fetch_add(8 * 24 * 3600 * 1000, Ordering::Relaxed);
        }
        let res = self.state.log.run_maintenance();
        trace(format_args!("maintenance: {res:?}"));
        if self.rng.chance(0.5) {
            let res = self.state.log.run_cleaner();
            trace(format_args!("cleaner: {res:?}"));
        }
    }

    /// Tries writing with an epoch an acknowledged InitProducerId fenced: always refused.
    fn zombie(&mut self) {
        let id = (*self.rng.pick(TXN_IDS)).to_owned();
        let Some(&(pid, epoch)) = self.model.producers.get(&id).and_then(|p| p.fenced.last())
        else {
            return;
        };
        let tp = self.pick_tp();
        let res = self.state.txns.add_partitions(pid, epoch, vec![tp.clone()]);
        trace(format_args!(
            "zombie {id} ({pid}, {epoch}) adds {tp:?}: {res:?}"
        ));
        if res.is_ok() {
            self.model.violation = Some(format!(
                "{id}: producer {pid} epoch {epoch}, fenced by an acknowledged InitProducerId, was let into a transaction"
            ));
        }
    }

    fn txn_step(&mut self) {
        let id = (*self.rng.pick(TXN_IDS)).to_owned();
        let p = self.model.producers.entry(id.clone()).or_default();
        let Some((pid, epoch)) = p.current else {
            return self.init(&id);
        };
        match p.open {
            None => self.txn_write(&id, pid, epoch),
            Some(_) => match self.rng.below(10) {
                0..=3 => self.txn_write(&id, pid, epoch),
                4 => self.txn_offsets(&id, pid, epoch),
                5 => self.init(&id),
                _ => self.end(&id, pid, epoch),
            },
        }
    }

    fn init(&mut self, id: &str) {
        let res = self.rt.block_on(self.state.txns.init(id, 60_000, None));
        trace(format_args!("init {id}: {res:?}"));
        let p = self.model.producers.entry(id.to_owned()).or_default();
        // An open transaction is aborted by the init, or left undecided (then aborted at
        // the next start): either way it never commits. Its outcome stays unknown to the
        // model only when the init failed.
        if let Some(i) = p.open.take()
            && res.is_ok()
        {
            self.model.txns[i].outcome = Outcome::Decided { commit: false };
        }
        let old = p.current.take();
        if let Ok((pid, epoch)) = res {
            if let Some(o) = old {
                p.fenced.push(o);
            }
            p.current = Some((pid, epoch));
            self.new_pid(pid, id);
        }
    }

    fn txn_write(&mut self, id: &str, pid: i64, epoch: i16) {
        let tp = self.pick_tp();
        let res = self.state.txns.add_partitions(pid, epoch, vec![tp.clone()]);
        trace(format_args!("{id} add partition {tp:?}: {res:?}"));
        if res.is_err() {
            // Fenced or timed out: the producer starts over.
            self.abandon(id);
            return;
        }
        let p = self.model.producers.get_mut(id).expect("exists");
        let i = match p.open {
            Some(i) => i,
            None => {
                self.model.txns.push(Txn {
                    id: id.to_owned(),
                    recs: Vec::new(),
                    offsets: Vec::new(),
                    outcome: Outcome::Unknown,
                });
                let i = self.model.txns.len() - 1;
                p.open = Some(i);
                i
            }
        };
        let seq = p.seqs.entry((pid, epoch, tp.clone())).or_insert(0);
        let n = self.rng.range(1, 4) as i32;
        let mut b = BatchBuilder::new(Compression::None);
        b.producer(pid, epoch, *seq);
        b.transactional(true);
        self.model.serial += 1;
        for r in 0..n {
            let v = format!("{id}-{}-{r}", self.model.serial);
            b.push(self.clock.now_ms(), None, Some(v.as_bytes()), &[]);
        }
        let batch = b.finish().expect("a valid batch");
        let res = self
            .state
            .log
            .partition(&tp.0, tp.1)
            .and_then(|part| part.append(&batch));
        trace(format_args!("{id} append to {tp:?}: {res:?}"));
        match res {
            Ok(info) => {
                *seq += n;
                let end = self.model.acked_end.entry(tp.clone()).or_default();
                *end = (*end).max(info.last_offset + 1);
                for o in info.base_offset..=info.last_offset {
                    self.model.txns[i].recs.push((tp.clone(), o));
                }
            }
            Err(_) => self.abandon(id),
        }
    }

    fn txn_offsets(&mut self, id: &str, pid: i64, epoch: i16) {
        let group = (*self.rng.pick(TXN_GROUPS)).to_owned();
        let tp = self.pick_tp();
        let offset = self.next_commit_value();
        let req = v1::AddOffsetsToTxnRequest {
            transactional_id: id.to_owned(),
            producer_id: pid,
            producer_epoch: i32::from(epoch),
            group: group.clone(),
            offsets: vec![v1::OffsetCommit {
                topic: tp.0.clone(),
                partition: tp.1,
                offset,
                metadata: String::new(),
            }],
            ..Default::default()
        };
        let res = self.rt.block_on(self.state.txns.add_offsets(req));
        trace(format_args!(
            "{id} add offsets {group} {tp:?} {offset}: {res:?}"
        ));
        match res {
            Ok(()) => {
                let i = self.model.producers[id].open.expect("open");
                let t = &mut self.model.txns[i];
                let key = (group, tp.0, tp.1);
                t.offsets.retain(|(k, _)| *k != key);
                t.offsets.push((key, offset));
            }
            Err(_) => self.abandon(id),
        }
    }

    fn end(&mut self, id: &str, pid: i64, epoch: i16) {
        let commit = self.rng.chance(0.7);
        let i = self.model.producers[id].open.expect("open");
        if commit {
            for (k, v) in self.model.txns[i].offsets.clone() {
                self.model.commits.entry(k).or_default().maybe.push(Some(v));
            }
        }
        let res = self
            .rt
            .block_on(self.state.txns.end(id, pid, i32::from(epoch), commit));
        trace(format_args!("{id} end commit={commit}: {res:?}"));
        // Completions that run after the reply finish before the next step: one order of
        // disk operations per seed (the id's lock is free once they are done).
        self.rt.block_on(self.state.txns.list());
        match res {
            Ok(next) => {
                let p = self.model.producers.get_mut(id).expect("exists");
                p.open = None;
                p.current = Some(next);
                self.new_pid(next.0, id);
                self.counts.txns_decided += 1;
                let t = &mut self.model.txns[i];
                t.outcome = Outcome::Decided { commit };
                if commit {
                    for (k, v) in t.offsets.clone() {
                        let c = self.model.commits.get_mut(&k).expect("recorded");
                        c.acked = Some(v);
                        c.maybe.clear();
                    }
                } else {
                    let offs = t.offsets.clone();
                    for (k, v) in offs {
                        if let Some(c) = self.model.commits.get_mut(&k) {
                            c.maybe.retain(|m| *m != Some(v));
                        }
                    }
                }
            }
            Err(_) => self.abandon(id),
        }
    }

    /// The producer saw an error: it forgets its transaction (left to the broker) and will
    /// call InitProducerId again.
    fn abandon(&mut self, id: &str) {
        let p = self.model.producers.get_mut(id).expect("exists");
        p.open = None;
        p.current = None;
    }

    fn observe_lso(&mut self) {
        for (t, n) in DATA_TOPICS {
            for part in 0..*n {
                let Ok(p) = self.state.log.partition(t, part) else {
                    continue;
                };
                let lso = p.last_stable_offset();
                let seen = self
                    .model
                    .lso_seen
                    .entry(((*t).to_owned(), part))
                    .or_default();
                *seen = (*seen).max(lso);
            }
        }
    }
}

/// Offsets of the data records a reader with `isolation` sees.
fn visible(p: &Partition, isolation: Isolation) -> Result<BTreeSet<u64>, String> {
    let mut out = BTreeSet::new();
    let mut offset = p.log_start_offset();
    loop {
        let r = p
            .read_with(offset, 64 << 10, isolation)
            .map_err(|e| format!("reading {}/{}: {e}", p.topic(), p.id()))?;
        if r.data.is_empty() {
            if r.next_offset > offset && r.next_offset < r.high_watermark {
                offset = r.next_offset;
                continue;
            }
            return Ok(out);
        }
        for b in r.batches() {
            let b = b.map_err(|e| e.to_string())?;
            if b.header().is_control() {
                continue;
            }
            for rec in b.records(&Default::default()).map_err(|e| e.to_string())? {
                out.insert(rec.map_err(|e| e.to_string())?.offset);
            }
        }
        offset = r.next_offset;
    }
}

/// Checks the reopened broker against the model, then makes what it holds now the model's
/// truth (values that were only asked for are settled one way or the other).
pub(super) fn check(state: &State, model: &mut Model) -> Result<(), String> {
    // Committed offsets: the acknowledged value, or one asked for after it; never an older
    // one.
    let mut fetched: BTreeMap<Key, u64> = BTreeMap::new();
    let groups: BTreeSet<String> = model.commits.keys().map(|k| k.0.clone()).collect();
    for g in &groups {
        for c in state
            .offsets
            .fetch(g, &[])
            .map_err(|e| format!("fetching {g}'s offsets: {e}"))?
        {
            if let Some(o) = c.offset {
                fetched.insert((g.clone(), c.topic, c.partition), o);
            }
        }
    }
    for (k, c) in &mut model.commits {
        let now = fetched.remove(k);
        if now != c.acked && !c.maybe.contains(&now) {
            return Err(format!(
                "committed offset of {k:?} is {now:?}: acknowledged {:?}, asked for since {:?}",
                c.acked, c.maybe
            ));
        }
        c.acked = now;
        c.maybe.clear();
    }
    if let Some((k, o)) = fetched.into_iter().next() {
        return Err(format!("committed offset {o} of {k:?} was never committed"));
    }

    // Data partitions: nothing acknowledged lost, the LSO never back, nothing left open,
    // decided transactions as decided, no transaction torn.
    let mut committed: BTreeMap<Tp, BTreeSet<u64>> = BTreeMap::new();
    for (t, n) in DATA_TOPICS {
        for part in 0..*n {
            let tp = ((*t).to_owned(), part);
            let p = state
                .log
                .partition(t, part)
                .map_err(|e| format!("{tp:?}: {e}"))?;
            let hwm = p.high_watermark();
            let acked = model.acked_end.get(&tp).copied().unwrap_or(0);
            if hwm < acked {
                return Err(format!(
                    "{tp:?}: high watermark {hwm} below the acknowledged end {acked}"
                ));
            }
            let lso = p.last_stable_offset();
            let seen = model.lso_seen.get(&tp).copied().unwrap_or(0);
            if lso < seen {
                return Err(format!(
                    "{tp:?}: last stable offset went back from {seen} to {lso}"
                ));
            }
            model.lso_seen.insert(tp.clone(), lso);
            let open = p.open_transactions();
            if !open.is_empty() {
                return Err(format!(
                    "{tp:?}: transactions still open after the coordinator's start: {open:?}"
                ));
            }
            committed.insert(tp, visible(&p, Isolation::ReadCommitted)?);
        }
    }
    for t in &model.txns {
        let shown = t
            .recs
            .iter()
            .filter(|(tp, o)| committed.get(tp).is_some_and(|s| s.contains(o)))
            .count();
        let what = match t.outcome {
            Outcome::Decided { commit: true } if shown != t.recs.len() => {
                "committed (acknowledged), but not all its records are visible"
            }
            Outcome::Decided { commit: false } if shown != 0 => {
                "aborted (acknowledged), but records of it are visible"
            }
            _ if shown != 0 && shown != t.recs.len() => "torn: only some records visible",
            _ => continue,
        };
        return Err(format!(
            "transaction of {} with records {:?}: {what} ({shown} of {} read-committed)",
            t.id,
            t.recs,
            t.recs.len()
        ));
    }
    // Settled now: an unknown outcome is whatever the log shows.
    for t in &mut model.txns {
        if t.outcome == Outcome::Unknown {
            let shown = t
                .recs
                .iter()
                .any(|(tp, o)| committed.get(tp).is_some_and(|s| s.contains(o)));
            t.outcome = Outcome::Decided { commit: shown };
        }
    }
    // Producers keep their (pid, epoch): if a restart fenced them, their next call says so.
    for p in model.producers.values_mut() {
        p.open = None;
    }
    Ok(())
}
