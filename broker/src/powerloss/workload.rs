//! The broker workload of the power-cut loops and the model it is checked against.
//!
//! Steps call the coordinators as the gRPC services do: offset commits and group deletions
//! (`OffsetStore`), producer ids for idempotent producers (`ProducerIds`), transactional
//! producers (`Transactions::init`, `add_partitions` then a transactional append as the
//! produce path does, `add_offsets`, `end`, or `commit_with_offsets` carrying one more
//! offset: CommitTxn), the transaction coordinator's background pass
//! (`Transactions::sweep`: timeouts, retried decisions) with the clock moved past timeouts,
//! and consumer-group members (`Groups`: join and rejoin, static and dynamic, heartbeat,
//! acknowledge, leave, stream closed, fenced commits, commits from fenced members). Each step
//! records in the model what the broker acknowledged (returned `Ok` for, or told a member in
//! an Assignment) and what it was only asked (an error or a cut came first: it may or may not
//! have happened).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use spool_log_engine::io::sim::{SimFs, SimRng};
use spool_log_engine::{BatchBuilder, Clock, Compression, Isolation, Partition};
use spool_proto::v1;
use spool_proto::v1::membership_response::Response;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::State;
use crate::groups::{JoinArgs, MemberEvent, STREAM_CAPACITY};

/// Data topics the producers write to: (name, partitions).
pub(super) const DATA_TOPICS: &[(&str, u32)] = &[("d0", 2), ("d1", 1)];
/// Groups committed to with plain commits, and with transactions.
const PLAIN_GROUPS: &[&str] = &["g0", "g1"];
const TXN_GROUPS: &[&str] = &["tg0", "tg1"];
/// Transactional ids.
pub(super) const TXN_IDS: &[&str] = &["tx0", "tx1", "tx2"];
/// Transaction timeouts producers ask for: the short ones pass within an epoch's steps.
const TXN_TIMEOUTS_MS: &[u32] = &[300, 2_000, 60_000];
/// Groups whose consumers join as members (fenced commits, generations).
pub(super) const MEMBER_GROUPS: &[&str] = &["mg0", "mg1"];
/// Consumers per member group: the first `STATIC` have instance ids.
const CONSUMERS: usize = 4;
const STATIC: usize = 2;
/// Members' session and rebalance timeouts: far longer than a run (the groups' timers run
/// on real time; expiry is not what the loop tests).
const SESSION_MS: u64 = 300_000;
const REBALANCE_MS: u64 = 600_000;

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
    /// The broker's time at its first partition (its timeout runs from there).
    started_ms: i64,
    /// Per key of `offsets`, on a commit: the values in force or asked for when its EndTxn
    /// was called. Once it is known committed, none of them may be the committed offset any
    /// more (its decision came after all of them; a later commit has a new value, a later
    /// deletion none).
    before_end: BTreeMap<Key, Vec<u64>>,
    /// Its offsets were checked against its outcome (once, when that became known).
    offsets_checked: bool,
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
    /// Epochs an acknowledged InitProducerId, or a timeout's abort, fenced.
    fenced: Vec<(i64, i16)>,
    /// The timeout it asked for at its last InitProducerId.
    timeout_ms: u32,
}

type MemberRx = mpsc::Receiver<Result<v1::MembershipResponse, Status>>;

/// A consumer of a member group, as it sees its membership.
#[derive(Debug)]
pub(super) struct Consumer {
    group: &'static str,
    /// Its instance id (static membership), if any.
    instance: Option<String>,
    /// Its member id: the last join acknowledged (kept, as the id to rejoin with, while its
    /// membership is unsure).
    id: Option<String>,
    /// Its stream (`None`: ended; it must rejoin).
    rx: Option<MemberRx>,
    /// Its latest Assignment: generation and partitions.
    assigned: Option<(u64, BTreeSet<Tp>)>,
    /// The latest generation it acknowledged.
    acked: u64,
    /// An operation on its membership failed or was cut: the broker may have recorded it or
    /// not, so only a successful rejoin makes it sure again.
    unsure: bool,
    /// Stale (generation, partition) pairs of this member id: each partition was granted to
    /// it after that generation (first Assignment of an incarnation, or a partition new in an
    /// Assignment that came after it acknowledged the previous one), so a commit of it naming
    /// that generation is refused, across restarts too (the per-partition epochs are part of
    /// the durable group state, as Kafka's generation is).
    stale: Vec<(u64, Tp)>,
}

/// Stale pairs kept per consumer.
const STALE_KEPT: usize = 8;

/// A member id an acknowledged operation removed (LeaveGroup, a dynamic member's closed
/// stream) or replaced (a rejoin with its instance or member id), with its last Assignment:
/// every commit it makes from then on must be refused, across restarts too.
#[derive(Debug)]
pub(super) struct FencedMember {
    group: &'static str,
    id: String,
    assigned: Option<(u64, BTreeSet<Tp>)>,
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
    pub(super) consumers: Vec<Consumer>,
    /// Highest generation told to a member of each group (in an Assignment).
    pub(super) gen_told: BTreeMap<String, u64>,
    pub(super) fenced_members: Vec<FencedMember>,
    serial: u64,
    pub(super) violation: Option<String>,
}

/// Counters of one seed.
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub(super) commits_acked: u64,
    pub(super) pids: u64,
    pub(super) txns_decided: u64,
    /// Transactions the background pass aborted at their timeout (seen by the model).
    pub(super) timeouts: u64,
    /// Joins acknowledged (with a member id).
    pub(super) joins: u64,
    /// Fenced commits of members acknowledged.
    pub(super) member_commits: u64,
    /// Commits of fenced members, or naming a generation before the partition was granted, refused.
    pub(super) zombie_commits_refused: u64,
    /// Highest generation a member was told.
    pub(super) max_generation: u64,
}

impl Counts {
    pub(super) fn add(&mut self, o: &Counts) {
        self.commits_acked += o.commits_acked;
        self.pids += o.pids;
        self.txns_decided += o.txns_decided;
        self.timeouts += o.timeouts;
        self.joins += o.joins;
        self.member_commits += o.member_commits;
        self.zombie_commits_refused += o.zombie_commits_refused;
        self.max_generation = self.max_generation.max(o.max_generation);
    }
}

pub(super) struct Work<'a> {
    pub(super) state: &'a Arc<State>,
    pub(super) rt: &'a tokio::runtime::Runtime,
    pub(super) model: &'a mut Model,
    pub(super) rng: &'a mut SimRng,
    pub(super) clock: &'a ManualClock,
    pub(super) counts: &'a mut Counts,
    pub(super) sim: &'a SimFs,
    /// An EIO or a full disk is armed in this epoch: operations may fail for it.
    pub(super) faulty: bool,
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
        match self.rng.below(30) {
            0..=4 => self.plain_commit(),
            5 => self.delete_group(),
            6 | 7 => self.allocate_pid(),
            8..=17 => self.txn_step(),
            18 => self.zombie(),
            19 => self.maintenance(),
            20 => self.sweep(),
            _ => self.member_step(),
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

    /// A commit of `tp` at the next offset value.
    fn next_commit(&mut self, tp: Tp) -> v1::OffsetCommit {
        v1::OffsetCommit {
            topic: tp.0,
            partition: tp.1,
            offset: self.next_commit_value(),
            metadata: String::new(),
        }
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
            commits.push(self.next_commit(tp));
        }
        self.commits_asked(&group, &commits);
        let res = self.state.offsets.commit(&group, &commits, self.now());
        trace(format_args!("commit {group} {commits:?}: {res:?}"));
        if res.is_ok() {
            self.counts.commits_acked += 1;
            self.commits_acked(&group, &commits);
        }
    }

    /// Records commits asked for: each may be in force after a cut.
    fn commits_asked(&mut self, group: &str, commits: &[v1::OffsetCommit]) {
        for c in commits {
            self.model
                .commits
                .entry((group.to_owned(), c.topic.clone(), c.partition))
                .or_default()
                .maybe
                .push(Some(c.offset));
        }
    }

    /// Records commits acknowledged: each must hold from now on.
    fn commits_acked(&mut self, group: &str, commits: &[v1::OffsetCommit]) {
        for c in commits {
            let k = self
                .model
                .commits
                .get_mut(&(group.to_owned(), c.topic.clone(), c.partition))
                .expect("recorded");
            k.acked = Some(c.offset);
            k.maybe.clear();
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
        let timeout_ms = *self.rng.pick(TXN_TIMEOUTS_MS);
        let res = self.rt.block_on(self.state.txns.init(id, timeout_ms, None));
        trace(format_args!("init {id} (timeout {timeout_ms} ms): {res:?}"));
        let p = self.model.producers.entry(id.to_owned()).or_default();
        if res.is_ok() {
            p.timeout_ms = timeout_ms;
        }
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
        let now = self.now();
        let p = self.model.producers.get_mut(id).expect("exists");
        if p.fenced.contains(&(pid, epoch)) {
            self.model.violation = Some(format!(
                "{id}: producer {pid} epoch {epoch}, fenced (by an acknowledged InitProducerId or a timeout's abort), was let into a transaction"
            ));
            return;
        }
        let i = match p.open {
            Some(i) => i,
            None => {
                self.model.txns.push(Txn {
                    id: id.to_owned(),
                    recs: Vec::new(),
                    offsets: Vec::new(),
                    outcome: Outcome::Unknown,
                    started_ms: now,
                    before_end: BTreeMap::new(),
                    offsets_checked: false,
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
        // Half the time as a member of a member group (fenced by its generation), when one
        // holds partitions.
        let member = if self.rng.chance(0.5) {
            self.drain();
            let holders: Vec<usize> = (0..self.model.consumers.len())
                .filter(|&i| self.can_commit(i))
                .collect();
            if holders.is_empty() {
                None
            } else {
                let c = &self.model.consumers[*self.rng.pick(&holders)];
                let (generation, tps) = c.assigned.clone().expect("holds");
                let tps: Vec<Tp> = tps.into_iter().collect();
                let tp = self.rng.pick(&tps).clone();
                Some((
                    c.group.to_owned(),
                    c.id.clone().expect("in"),
                    generation,
                    tp,
                ))
            }
        } else {
            None
        };
        let (group, member_id, generation, tp) = match member {
            Some(m) => m,
            None => {
                let group = (*self.rng.pick(TXN_GROUPS)).to_owned();
                (group, String::new(), 0, self.pick_tp())
            }
        };
        let offset = self.next_commit_value();
        let req = v1::AddOffsetsToTxnRequest {
            transactional_id: id.to_owned(),
            producer_id: pid,
            producer_epoch: i32::from(epoch),
            group: group.clone(),
            member_id,
            generation,
            offsets: vec![v1::OffsetCommit {
                topic: tp.0.clone(),
                partition: tp.1,
                offset,
                metadata: String::new(),
            }],
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
        // Half the commits as CommitTxn, carrying one more offset of a plain group (recorded
        // only with the decision).
        let carried = (commit && self.rng.chance(0.5)).then(|| {
            let group = (*self.rng.pick(TXN_GROUPS)).to_owned();
            (group, self.pick_tp(), self.next_commit_value())
        });
        if let Some((group, tp, offset)) = &carried {
            let t = &mut self.model.txns[i];
            let key = (group.clone(), tp.0.clone(), tp.1);
            t.offsets.retain(|(k, _)| *k != key);
            t.offsets.push((key, *offset));
        }
        if commit {
            // Values other transactions asked for, still unsettled, are left out of
            // `before_end`: two decisions of one key both carried out late (at the next
            // start, equal `offsets_since`s in id order) can end with the older one's offset (docs/durability.md,
            // "A late decision never undoes a newer commit", left as it is).
            let txn_values: BTreeSet<u64> = self
                .model
                .txns
                .iter()
                .flat_map(|t| t.offsets.iter().map(|(_, v)| *v))
                .collect();
            for (k, v) in self.model.txns[i].offsets.clone() {
                let c = self.model.commits.entry(k.clone()).or_default();
                let maybe = c.maybe.iter().flatten().filter(|m| !txn_values.contains(m));
                let before: Vec<u64> = c.acked.iter().chain(maybe).copied().collect();
                c.maybe.push(Some(v));
                self.model.txns[i].before_end.insert(k, before);
            }
        }
        let res = match &carried {
            None => self
                .rt
                .block_on(self.state.txns.end(id, pid, i32::from(epoch), commit)),
            Some((group, tp, offset)) => {
                let req = v1::CommitTxnRequest {
                    transactional_id: id.to_owned(),
                    producer_id: pid,
                    producer_epoch: i32::from(epoch),
                    groups: vec![v1::TxnGroupOffsets {
                        group: group.clone(),
                        offsets: vec![v1::OffsetCommit {
                            topic: tp.0.clone(),
                            partition: tp.1,
                            offset: *offset,
                            metadata: String::new(),
                        }],
                        member_id: String::new(),
                        generation: 0,
                    }],
                };
                self.rt.block_on(self.state.txns.commit_with_offsets(req))
            }
        };
        trace(format_args!(
            "{id} end commit={commit} carried={carried:?}: {res:?}"
        ));
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

    /// The transaction coordinator's background pass, sometimes after the clock moved on:
    /// every transaction open past its timeout is aborted (decision recorded, epoch bumped,
    /// markers written), and decisions whose markers failed are retried.
    fn sweep(&mut self) {
        if self.rng.chance(0.5) {
            let by = i64::try_from(self.rng.range(0, 3_000)).unwrap_or(0);
            self.clock.0.fetch_add(by, Ordering::Relaxed);
        }
        let now = self.now();
        // Open transactions (per the model) past their timeout.
        let expired: Vec<(String, i64, i16, usize)> = self
            .model
            .producers
            .iter()
            .filter_map(|(id, p)| {
                let (pid, epoch) = p.current?;
                let i = p.open?;
                let t = &self.model.txns[i];
                (now.saturating_sub(t.started_ms) > i64::from(p.timeout_ms))
                    .then(|| (id.clone(), pid, epoch, i))
            })
            .collect();
        self.rt.block_on(self.state.txns.sweep());
        let list = self.rt.block_on(self.state.txns.list());
        trace(format_args!(
            "sweep at {now}: expired {expired:?}; now {:?}",
            list.iter()
                .map(|d| (
                    &d.transactional_id,
                    d.producer_id,
                    d.producer_epoch,
                    d.state
                ))
                .collect::<Vec<_>>()
        ));
        let strict = !self.faulty && !self.sim.is_down();
        for (id, pid, epoch, i) in expired {
            let Some(d) = list.iter().find(|d| d.transactional_id == id) else {
                continue;
            };
            // The abort is recorded (durably) before the coordinator moves to the new epoch.
            let aborted = d.producer_id != pid || d.producer_epoch > i32::from(epoch);
            if !aborted {
                if strict {
                    self.model.violation = Some(format!(
                        "{id}: transaction of producer {pid} epoch {epoch} started at {} with a {} ms timeout is still open at {now} after the background pass",
                        self.model.txns[i].started_ms, self.model.producers[&id].timeout_ms
                    ));
                }
                continue;
            }
            self.counts.timeouts += 1;
            self.model.txns[i].outcome = Outcome::Decided { commit: false };
            let p = self.model.producers.get_mut(&id).expect("listed");
            // The producer keeps its (pid, epoch) and learns of the abort at its next call.
            p.open = None;
            p.fenced.push((pid, epoch));
            if strict && d.state == v1::TxnState::CompleteAbort as i32 {
                // Its markers are durable: nothing of it holds the last stable offset back.
                let recs = self.model.txns[i].recs.clone();
                if let Err(e) = self.lso_past(&recs, pid) {
                    self.model.violation = Some(format!(
                        "{id}: transaction of producer {pid} epoch {epoch} aborted at its timeout: {e}"
                    ));
                    return;
                }
            }
        }
    }

    /// Checks that no partition holding `recs` still has `pid`'s transaction open, and that
    /// each one's last stable offset is past the first of them (unless an older open
    /// transaction holds it).
    fn lso_past(&self, recs: &[(Tp, u64)], pid: i64) -> Result<(), String> {
        let mut first: BTreeMap<&Tp, u64> = BTreeMap::new();
        for (tp, o) in recs {
            let f = first.entry(tp).or_insert(*o);
            *f = (*f).min(*o);
        }
        for (tp, first) in first {
            let p = self
                .state
                .log
                .partition(&tp.0, tp.1)
                .map_err(|e| e.to_string())?;
            let open = p.open_transactions();
            if open.iter().any(|o| o.producer_id == pid) {
                return Err(format!("{tp:?} still has it open: {open:?}"));
            }
            let lso = p.last_stable_offset();
            if lso <= first && !open.iter().any(|o| o.first_offset <= first) {
                return Err(format!(
                    "{tp:?}: last stable offset {lso} not past its first record {first} (open: {open:?})"
                ));
            }
        }
        Ok(())
    }

    /// A consumer-group member's step.
    fn member_step(&mut self) {
        if self.model.consumers.is_empty() {
            self.model.consumers = MEMBER_GROUPS
                .iter()
                .flat_map(|g| {
                    (0..CONSUMERS).map(move |i| Consumer {
                        group: g,
                        instance: (i < STATIC).then(|| format!("{g}-i{i}")),
                        id: None,
                        rx: None,
                        assigned: None,
                        acked: 0,
                        unsure: false,
                        stale: Vec::new(),
                    })
                })
                .collect();
        }
        self.drain();
        let i = self.rng.below(self.model.consumers.len() as u64) as usize;
        if self.model.consumers[i].rx.is_none() {
            return self.join(i);
        }
        match self.rng.below(12) {
            0 => self.join(i),
            1 => self.leave(i),
            2 => self.close(i),
            3 => self.heartbeat(i),
            4 if self.rng.chance(0.5) => self.zombie_commit(),
            4 => self.stale_commit(i),
            5..=7 => self.ack(i),
            _ => self.member_commit(i),
        }
        self.drain();
    }

    /// Reads what the members' streams hold: Assignments (each must be durable: the broker
    /// persists the group before telling anyone), or the end of the stream.
    fn drain(&mut self) {
        for c in &mut self.model.consumers {
            let Some(rx) = c.rx.as_mut() else {
                continue;
            };
            loop {
                match rx.try_recv() {
                    Ok(Ok(msg)) => {
                        if let Some(Response::Assignment(a)) = msg.response {
                            if let Some((g, _)) = &c.assigned
                                && a.generation <= *g
                            {
                                self.model.violation = Some(format!(
                                    "{} member {:?} was told generation {} after {g}",
                                    c.group, c.id, a.generation
                                ));
                            }
                            let tps: BTreeSet<Tp> = a
                                .partitions
                                .into_iter()
                                .map(|t| (t.topic, t.partition))
                                .collect();
                            let fresh: Vec<(u64, Tp)> = match &c.assigned {
                                None if a.generation > 0 => tps
                                    .iter()
                                    .map(|tp| (a.generation - 1, tp.clone()))
                                    .collect(),
                                Some((prev, held)) if c.acked >= *prev => {
                                    tps.difference(held).map(|tp| (*prev, tp.clone())).collect()
                                }
                                _ => Vec::new(),
                            };
                            c.stale.extend(fresh);
                            let over = c.stale.len().saturating_sub(STALE_KEPT);
                            c.stale.drain(..over);
                            trace(format_args!(
                                "{} member {:?} assigned generation {}: {tps:?}",
                                c.group, c.id, a.generation
                            ));
                            c.assigned = Some((a.generation, tps));
                            let told = self.model.gen_told.entry(c.group.to_owned()).or_default();
                            *told = (*told).max(a.generation);
                            self.counts.max_generation =
                                self.counts.max_generation.max(a.generation);
                        }
                    }
                    Ok(Err(status)) => {
                        // Removed, or the group went back to its durable state after a
                        // failed write: it rejoins (with its member id).
                        trace(format_args!(
                            "{} member {:?} stream ended: {status:?}",
                            c.group, c.id
                        ));
                        c.rx = None;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        c.rx = None;
                        break;
                    }
                }
            }
        }
    }

    /// May consumer `i` commit what it was assigned (it is in, sure of it, and holds some)?
    fn can_commit(&self, i: usize) -> bool {
        let c = &self.model.consumers[i];
        c.rx.is_some()
            && !c.unsure
            && c.id.is_some()
            && c.assigned.as_ref().is_some_and(|(_, p)| !p.is_empty())
    }

    fn fence(&mut self, i: usize) {
        let c = &mut self.model.consumers[i];
        if let Some(id) = c.id.take() {
            self.model.fenced_members.push(FencedMember {
                group: c.group,
                id,
                assigned: c.assigned.take(),
            });
        }
        c.rx = None;
        c.assigned = None;
        c.acked = 0;
        c.stale.clear();
    }

    /// Joins, or rejoins with its member id (and instance id): the previous incarnation is
    /// replaced, and fenced.
    fn join(&mut self, i: usize) {
        let mut topics = BTreeSet::new();
        while topics.is_empty() {
            for (t, _) in DATA_TOPICS {
                if self.rng.chance(0.6) {
                    topics.insert((*t).to_owned());
                }
            }
        }
        let c = &self.model.consumers[i];
        let args = JoinArgs {
            group: c.group.to_owned(),
            topics,
            instance: c.instance.clone(),
            previous_id: c.id.clone(),
            strategy: None,
            session_ms: SESSION_MS,
            rebalance_ms: REBALANCE_MS,
        };
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        trace(format_args!("join {args:?}"));
        let res = self.rt.block_on(self.state.groups.join(args, tx));
        trace(format_args!("join: {res:?}"));
        match res {
            Ok(id) => {
                self.counts.joins += 1;
                self.fence(i);
                let c = &mut self.model.consumers[i];
                c.id = Some(id);
                c.rx = Some(rx);
                c.unsure = false;
            }
            Err(_) => self.in_doubt(i),
        }
    }

    /// An operation on consumer `i`'s membership failed: the broker may have recorded it or
    /// not; it rejoins (with its member id) before anything else.
    fn in_doubt(&mut self, i: usize) {
        let c = &mut self.model.consumers[i];
        c.unsure = true;
        c.rx = None;
    }

    /// Consumer `i` says `event` on its stream; returns its group and member id.
    fn say(&mut self, i: usize, event: MemberEvent) -> (&'static str, String) {
        let c = &self.model.consumers[i];
        let (group, id) = (c.group, c.id.clone().expect("in"));
        let groups = self.state.groups.clone();
        self.rt.block_on(groups.member_event(group, &id, event));
        (group, id)
    }

    fn leave(&mut self, i: usize) {
        let c = &self.model.consumers[i];
        let (group, id) = (c.group, c.id.clone());
        let res = self
            .rt
            .block_on(self.state.groups.leave(group, id.clone(), None));
        trace(format_args!("{group} member {id:?} leaves: {res:?}"));
        match res {
            Ok(()) => self.fence(i),
            Err(_) => self.in_doubt(i),
        }
    }

    /// Its stream ends without a leave: a dynamic member is removed, a static one only
    /// disconnected (it keeps its partitions until its session ends).
    fn close(&mut self, i: usize) {
        let (group, id) = self.say(i, MemberEvent::Closed(None));
        let d = self.rt.block_on(self.state.groups.describe(group));
        trace(format_args!("{group} member {id} stream closed"));
        let c = &mut self.model.consumers[i];
        c.rx = None;
        if c.instance.is_some() {
            return;
        }
        match d {
            // Handled (events are handled in order) and persisted: it is gone.
            Ok(d) if !d.members.iter().any(|m| m.member_id == id) => self.fence(i),
            _ => c.unsure = true,
        }
    }

    fn heartbeat(&mut self, i: usize) {
        self.say(i, MemberEvent::Heartbeat);
    }

    /// Acknowledges its latest Assignment (releasing what it revoked), then waits until the
    /// group handled it.
    fn ack(&mut self, i: usize) {
        let c = &self.model.consumers[i];
        let Some((generation, _)) = c.assigned.clone() else {
            return;
        };
        if c.acked >= generation {
            return self.member_commit(i);
        }
        let (group, id) = self.say(i, MemberEvent::Ack(generation));
        let res = self.rt.block_on(self.state.groups.describe(group));
        trace(format_args!(
            "{group} member {id} acks {generation}: {:?}",
            res.as_ref().map(|d| d.generation)
        ));
        // Handled (events are handled in order) and what it released made durable, unless
        // the group failed meanwhile (then its stream ends and it rejoins).
        if res.is_ok() && !self.sim.is_down() {
            self.model.consumers[i].acked = generation;
        }
    }

    /// A commit naming a generation before the member got the partition: refused.
    fn stale_commit(&mut self, i: usize) {
        let c = &self.model.consumers[i];
        if c.unsure || c.stale.is_empty() {
            return;
        }
        let (group, id) = (c.group, c.id.clone().expect("in"));
        let (generation, tp) = c.stale[self.rng.below(c.stale.len() as u64) as usize].clone();
        self.refused_commit(
            group,
            id,
            generation,
            tp,
            "naming a generation before it was granted the partition",
        );
    }

    /// A commit that must be refused (`who` says why): of an offset nobody acknowledged (so
    /// `check` also catches it if it shows up after a restart).
    fn refused_commit(
        &mut self,
        group: &'static str,
        id: String,
        generation: u64,
        tp: Tp,
        who: &str,
    ) {
        let commit = v1::OffsetCommit {
            topic: tp.0.clone(),
            partition: tp.1,
            offset: u64::MAX / 2,
            metadata: String::new(),
        };
        let res = self.rt.block_on(self.state.groups.commit(
            group,
            id.clone(),
            generation,
            vec![commit],
            self.now(),
        ));
        trace(format_args!(
            "{group} member {id}, {who}, commits {tp:?} at generation {generation}: {res:?}"
        ));
        match res {
            Ok(()) => {
                self.model.violation = Some(format!(
                    "{group} member {id}, {who}, had a commit of {tp:?} at generation {generation} accepted"
                ));
            }
            Err(_) => self.counts.zombie_commits_refused += 1,
        }
    }

    /// A fenced commit of (some of) what it was assigned, with its generation: accepted,
    /// unless the disk fails it.
    fn member_commit(&mut self, i: usize) {
        if !self.can_commit(i) {
            return;
        }
        let c = &self.model.consumers[i];
        let (group, id) = (c.group, c.id.clone().expect("in"));
        let (generation, tps) = c.assigned.clone().expect("holds");
        let mut commits = Vec::new();
        for tp in tps {
            if self.rng.chance(0.6) {
                commits.push(self.next_commit(tp));
            }
        }
        if commits.is_empty() {
            return;
        }
        self.commits_asked(group, &commits);
        let res = self.rt.block_on(self.state.groups.commit(
            group,
            id.clone(),
            generation,
            commits.clone(),
            self.now(),
        ));
        trace(format_args!(
            "{group} member {id} commits {commits:?} at generation {generation}: {res:?}"
        ));
        match res {
            Ok(()) => {
                self.counts.member_commits += 1;
                self.commits_acked(group, &commits);
            }
            Err(s) if s.code() == Code::FailedPrecondition => {
                self.model.violation = Some(format!(
                    "{group} member {id}, told generation {generation}, was refused a commit of its partitions: {}",
                    s.message()
                ));
            }
            Err(_) => {}
        }
    }

    /// A member id fenced by an acknowledged operation commits: always refused.
    fn zombie_commit(&mut self) {
        if self.model.fenced_members.is_empty() {
            return;
        }
        let n = self.model.fenced_members.len() as u64;
        let z = &self.model.fenced_members[self.rng.below(n) as usize];
        let (group, id) = (z.group, z.id.clone());
        let (generation, tps) = z.assigned.clone().unwrap_or_default();
        let tp = match tps.iter().next() {
            Some(tp) => tp.clone(),
            None => self.pick_tp(),
        };
        self.refused_commit(
            group,
            id,
            generation,
            tp,
            "removed or replaced by an acknowledged operation",
        );
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

/// Checks that no transaction was ended twice in `p`: one marker per producer id and marker
/// epoch (a decision carried out again after a restart, or by the background pass, finds its
/// transaction ended and writes nothing).
fn markers_once(p: &Partition) -> Result<(), String> {
    let mut seen: BTreeMap<(i64, i16), u64> = BTreeMap::new();
    let mut offset = p.log_start_offset();
    loop {
        let r = p
            .read_with(offset, 64 << 10, Isolation::ReadUncommitted)
            .map_err(|e| format!("reading {}/{}: {e}", p.topic(), p.id()))?;
        if r.data.is_empty() {
            if r.next_offset > offset && r.next_offset < r.high_watermark {
                offset = r.next_offset;
                continue;
            }
            return Ok(());
        }
        for b in r.batches() {
            let b = b.map_err(|e| e.to_string())?;
            let h = b.header();
            if !h.is_control() {
                continue;
            }
            if let Some(first) = seen.insert((h.producer_id, h.producer_epoch), h.base_offset) {
                return Err(format!(
                    "{}/{}: producer {} has two markers of epoch {} (offsets {first} and {}): a transaction ended twice",
                    p.topic(),
                    p.id(),
                    h.producer_id,
                    h.producer_epoch,
                    h.base_offset
                ));
            }
        }
        offset = r.next_offset;
    }
}

fn offsets_of<'a>(tps: impl IntoIterator<Item = &'a Tp>) -> Vec<v1::OffsetCommit> {
    tps.into_iter()
        .map(|(topic, partition)| v1::OffsetCommit {
            topic: topic.clone(),
            partition: *partition,
            ..Default::default()
        })
        .collect()
}

/// The consumer groups after a restart: the generation never below what a member was told;
/// no partition held by two members; a member in by an acknowledged join still in, at
/// least at the generation it was told, its commits of its partitions with that generation
/// accepted (the restored member keeps them for its session timeout, to rejoin: as Kafka's
/// members after a coordinator failover); every fenced member id still refused.
fn check_groups(
    state: &State,
    model: &mut Model,
    rt: &tokio::runtime::Runtime,
) -> Result<(), String> {
    for g in MEMBER_GROUPS {
        let d = rt
            .block_on(state.groups.describe(g))
            .map_err(|s| format!("describing {g}: {}", s.message()))?;
        let told = model.gen_told.get(*g).copied().unwrap_or(0);
        if d.generation < told {
            return Err(format!(
                "group {g}: generation {} after the restart, but a member was told {told}",
                d.generation
            ));
        }
        let mut owner: BTreeMap<(String, u32), &str> = BTreeMap::new();
        for m in &d.members {
            for tp in m.partitions.iter().chain(&m.revoking) {
                if let Some(o) = owner.insert((tp.topic.clone(), tp.partition), &m.member_id) {
                    return Err(format!(
                        "group {g}: {}/{} held by {o} and {}",
                        tp.topic, tp.partition, m.member_id
                    ));
                }
            }
        }
        for c in model
            .consumers
            .iter()
            .filter(|c| c.group == *g && !c.unsure)
        {
            let Some(id) = &c.id else {
                continue;
            };
            let Some(m) = d.members.iter().find(|m| m.member_id == *id) else {
                return Err(format!(
                    "group {g}: member {id}, in by an acknowledged join, is gone after the restart"
                ));
            };
            let Some((generation, tps)) = &c.assigned else {
                continue;
            };
            if m.generation < *generation {
                return Err(format!(
                    "group {g}: member {id} was told generation {generation}, has {} after the restart",
                    m.generation
                ));
            }
            for (stale, tp) in &c.stale {
                if rt
                    .block_on(
                        state
                            .groups
                            .check_commit(g, id.clone(), *stale, offsets_of([tp])),
                    )
                    .is_ok()
                {
                    return Err(format!(
                        "group {g}: member {id} may commit {tp:?} at generation {stale}, before it was granted the partition, after the restart"
                    ));
                }
            }
            rt.block_on(state.groups.check_commit(
                g,
                id.clone(),
                *generation,
                offsets_of(tps),
            ))
            .map_err(|s| {
                format!(
                    "group {g}: member {id}, told {tps:?} at generation {generation}, may not commit them after the restart: {}",
                    s.message()
                )
            })?;
        }
        for z in model.fenced_members.iter().filter(|z| z.group == *g) {
            if d.members.iter().any(|m| m.member_id == z.id) {
                return Err(format!(
                    "group {g}: member {}, removed or replaced by an acknowledged operation, is back after the restart",
                    z.id
                ));
            }
            let (generation, tps) = z.assigned.clone().unwrap_or_default();
            let mut offsets = offsets_of(&tps);
            if offsets.is_empty() {
                offsets = offsets_of(&[(DATA_TOPICS[0].0.to_owned(), 0)]);
            }
            if rt
                .block_on(
                    state
                        .groups
                        .check_commit(g, z.id.clone(), generation, offsets),
                )
                .is_ok()
            {
                return Err(format!(
                    "group {g}: fenced member {} may commit {tps:?} at generation {generation} after the restart",
                    z.id
                ));
            }
        }
    }
    // The members' streams ended with the broker: they rejoin, with their member ids.
    for c in &mut model.consumers {
        c.rx = None;
    }
    Ok(())
}

/// Checks the reopened broker against the model, then makes what it holds now the model's
/// truth (values that were only asked for are settled one way or the other).
pub(super) fn check(
    state: &State,
    model: &mut Model,
    rt: &tokio::runtime::Runtime,
) -> Result<(), String> {
    check_groups(state, model, rt)?;
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
    // Kept for the transactions' check below.
    let all_fetched = fetched.clone();
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
            markers_once(&p)?;
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
        // Known: acknowledged, or shown by its records (one without records is settled as
        // aborted, but it may have committed offsets only: its offsets prove nothing).
        let known = match t.outcome {
            Outcome::Decided { commit } => Some(commit),
            Outcome::Unknown if t.recs.is_empty() => None,
            Outcome::Unknown => Some(
                t.recs
                    .iter()
                    .any(|(tp, o)| committed.get(tp).is_some_and(|s| s.contains(o))),
            ),
        };
        if t.outcome == Outcome::Unknown {
            t.outcome = Outcome::Decided {
                commit: known == Some(true),
            };
        }
        if std::mem::replace(&mut t.offsets_checked, true) {
            continue;
        }
        // Its offsets agree with its outcome: an aborted transaction's (values are never
        // reused) are nowhere; a committed one's replaced what was there before its EndTxn.
        for (k, v) in &t.offsets {
            let now = all_fetched.get(k).copied();
            let wrong = match known {
                Some(false) => now == Some(*v),
                Some(true) => {
                    now.is_some_and(|n| t.before_end.get(k).is_some_and(|b| b.contains(&n)))
                }
                None => false,
            };
            if wrong {
                return Err(format!(
                    "transaction of {} with records {:?} is {}, but the committed offset of {k:?} is {now:?} (its own: {v}; in force or asked for before its EndTxn: {:?})",
                    t.id,
                    t.recs,
                    if known == Some(true) {
                        "committed"
                    } else {
                        "aborted"
                    },
                    t.before_end.get(k)
                ));
            }
        }
    }
    // Producers keep their (pid, epoch): if a restart fenced them, their next call says so.
    for p in model.producers.values_mut() {
        p.open = None;
    }
    Ok(())
}
