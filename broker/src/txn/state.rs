//! One transactional id's state, as a pure state machine (no I/O): what the coordinator checks
//! and records; `mod.rs` does the writing.
//!
//! ```text
//!            add partitions / offsets            EndTxn, timeout, InitProducerId
//!  Empty ─────────────────────────────► Ongoing ───────────────────────────────► Prepare{Commit,Abort}
//!  Complete* ─────────────────────────► (epoch e)                                 (epoch e + 1, durable)
//!      ▲                                                                                 │ markers at e + 1,
//!      └───────────────────────────────── Complete{Commit,Abort} ◄───────────────────────┘ offsets on commit
//! ```
//!
//! Invariants:
//! - Every end of a transaction bumps the epoch (KIP-890's rule): the markers carry the new
//!   epoch, so any write of the ended transaction that arrives late is fenced by the
//!   partition itself, and the producer's next transaction uses the new epoch.
//! - A request names the producer id and epoch it holds; an older epoch is a zombie
//!   (`TxnProducerFenced`), except the epoch of a transaction the broker timed out, which gets
//!   `TransactionTimedOut` so the producer can abort and go on.
//! - `Prepare*` is the decision: once recorded it is carried out, whatever happens (a crash,
//!   a failed marker write); nothing is added to a transaction that is ending.
//! - Epochs stay below `i16::MAX`: when the next end could not bump it, the id gets a new
//!   producer id at epoch 0.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

/// A topic partition.
pub(crate) type Tp = (String, u32);

/// The phase of the current (or last) transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Phase {
    /// No transaction open.
    Empty,
    /// Open.
    Ongoing,
    /// Decided: commit.
    PrepareCommit,
    /// Decided: abort.
    PrepareAbort,
    /// Committed.
    CompleteCommit,
    /// Aborted.
    CompleteAbort,
}

/// Offsets a transaction commits for one group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GroupOffsets {
    /// Member id for a fenced commit (empty: plain).
    pub(crate) member_id: String,
    /// The member's generation.
    pub(crate) generation: u64,
    /// (topic, partition) → (offset, metadata).
    pub(crate) offsets: BTreeMap<String, BTreeMap<u32, (u64, String)>>,
}

/// How the last transaction ended, for retried EndTxn and timed-out producers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LastEnd {
    /// The producer id and epoch the transaction ran with.
    pub(crate) pid: i64,
    /// See `pid`.
    pub(crate) epoch: i16,
    /// Committed (else aborted).
    pub(crate) commit: bool,
    /// Aborted by the broker after its timeout.
    pub(crate) timed_out: bool,
}

/// One transactional id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TxnMeta {
    /// Producer id.
    pub(crate) pid: i64,
    /// Current epoch (in `Prepare*`: the epoch the markers carry).
    pub(crate) epoch: i16,
    /// Transaction timeout.
    pub(crate) timeout_ms: u32,
    /// Phase.
    pub(crate) phase: Phase,
    /// Partitions of the current transaction.
    pub(crate) partitions: BTreeSet<Tp>,
    /// Offsets of the current transaction, by group.
    pub(crate) groups: BTreeMap<String, GroupOffsets>,
    /// Broker time the current transaction started.
    pub(crate) started_ms: i64,
    /// How the last transaction ended.
    pub(crate) last_end: Option<LastEnd>,
    /// In `PrepareCommit` with offsets: where `__consumer_offsets` ended when the decision
    /// was recorded. Carrying it out commits only the offsets nobody committed since
    /// (`OffsetStore::commit_decided`): a late completion never undoes a newer commit.
    /// Positions past the durable end can be reused after a power cut, so the start clamps it
    /// to the recovered end before carrying the decision out ([`TxnMeta::clamp_since`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) offsets_since: Option<u64>,
    /// In memory only: `offsets_since` was clamped and the clamp is not recorded yet. Nothing
    /// of the decision is carried out before it is recorded durably: a later start would
    /// otherwise load the old position, past commits made meanwhile, and write over them.
    #[serde(skip)]
    pub(crate) since_unrecorded: bool,
    /// In memory only, while a decision left pending at start waits to be carried out: the
    /// partitions where the start found a transaction of this producer at the decision's
    /// epoch (its next transaction, begun before a power cut lost `Complete*`). Nothing
    /// decided it: it is aborted, with the epoch bumped, once the decision is carried out.
    #[serde(skip)]
    pub(crate) later_open: BTreeSet<Tp>,
}

/// What EndTxn has to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EndPlan {
    /// Write the decision, then complete it.
    Run,
    /// The decision is recorded but not carried out yet (a retry after a failed marker
    /// write): complete it.
    Finish,
    /// Nothing to do: reply with the current producer id and epoch (an EndTxn retried after
    /// it completed, or a transaction with nothing in it).
    Reply,
}

impl TxnMeta {
    /// A new transactional id.
    pub(crate) fn new(pid: i64, timeout_ms: u32) -> TxnMeta {
        TxnMeta {
            pid,
            epoch: 0,
            timeout_ms,
            phase: Phase::Empty,
            partitions: BTreeSet::new(),
            groups: BTreeMap::new(),
            started_ms: 0,
            last_end: None,
            offsets_since: None,
            since_unrecorded: false,
            later_open: BTreeSet::new(),
        }
    }

    /// True while a transaction is open (writes may still come).
    pub(crate) fn is_ongoing(&self) -> bool {
        self.phase == Phase::Ongoing
    }

    /// True when a decision is recorded and not yet carried out.
    pub(crate) fn is_preparing(&self) -> bool {
        matches!(self.phase, Phase::PrepareCommit | Phase::PrepareAbort)
    }

    /// Checks that `(pid, epoch)` is the id's current producer.
    pub(crate) fn check(&self, txn_id: &str, pid: i64, epoch: i16) -> Result<(), BrokerError> {
        if pid == self.pid && epoch == self.epoch && !self.is_preparing() {
            return Ok(());
        }
        let timed_out = self
            .last_end
            .is_some_and(|e| e.timed_out && e.pid == pid && e.epoch == epoch);
        if timed_out {
            return Err(BrokerError::TransactionTimedOut {
                txn_id: txn_id.to_owned(),
                epoch,
                timeout_ms: self.timeout_ms,
            });
        }
        let older = (pid == self.pid && epoch < self.epoch)
            || self
                .last_end
                .is_some_and(|e| e.pid == pid && epoch <= e.epoch);
        if older || (pid == self.pid && self.is_preparing()) {
            return Err(BrokerError::TxnProducerFenced {
                txn_id: txn_id.to_owned(),
                producer_id: pid,
                epoch,
                current_epoch: self.epoch,
            });
        }
        Err(BrokerError::InvalidTxnState {
            txn_id: txn_id.to_owned(),
            reason: format!(
                "producer {pid} epoch {epoch} is not its producer (that is {} epoch {})",
                self.pid, self.epoch
            ),
        })
    }

    fn begin_if_needed(&mut self, now_ms: i64) {
        if !self.is_ongoing() {
            self.phase = Phase::Ongoing;
            self.partitions.clear();
            self.groups.clear();
            self.started_ms = now_ms;
        }
    }

    /// Adds partitions the producer is about to write to (opening a transaction if none is).
    pub(crate) fn add_partitions(
        &mut self,
        txn_id: &str,
        pid: i64,
        epoch: i16,
        tps: impl IntoIterator<Item = Tp>,
        now_ms: i64,
        max_partitions: usize,
    ) -> Result<(), BrokerError> {
        self.check(txn_id, pid, epoch)?;
        self.begin_if_needed(now_ms);
        for tp in tps {
            if !self.partitions.contains(&tp) && self.partitions.len() >= max_partitions {
                return Err(BrokerError::InvalidTxnState {
                    txn_id: txn_id.to_owned(),
                    reason: format!("a transaction may touch at most {max_partitions} partitions"),
                });
            }
            self.partitions.insert(tp);
        }
        Ok(())
    }

    /// Adds offsets to commit with the transaction (a later offset for the same partition
    /// replaces the earlier one).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_offsets(
        &mut self,
        txn_id: &str,
        pid: i64,
        epoch: i16,
        group: &str,
        member_id: &str,
        generation: u64,
        offsets: impl IntoIterator<Item = (Tp, u64, String)>,
        now_ms: i64,
    ) -> Result<(), BrokerError> {
        self.check(txn_id, pid, epoch)?;
        self.begin_if_needed(now_ms);
        let g = self.groups.entry(group.to_owned()).or_default();
        g.member_id = member_id.to_owned();
        g.generation = generation;
        for ((topic, partition), offset, metadata) in offsets {
            g.offsets
                .entry(topic)
                .or_default()
                .insert(partition, (offset, metadata));
        }
        Ok(())
    }

    /// Decides what EndTxn(`commit`) by `(pid, epoch)` does.
    pub(crate) fn plan_end(
        &self,
        txn_id: &str,
        pid: i64,
        epoch: i16,
        commit: bool,
    ) -> Result<EndPlan, BrokerError> {
        if let Some(e) = self.last_end
            && e.pid == pid
            && e.epoch == epoch
        {
            // The transaction this request is about has ended (or is ending) already.
            if e.commit != commit {
                return Err(if e.timed_out {
                    BrokerError::TransactionTimedOut {
                        txn_id: txn_id.to_owned(),
                        epoch,
                        timeout_ms: self.timeout_ms,
                    }
                } else {
                    BrokerError::InvalidTxnState {
                        txn_id: txn_id.to_owned(),
                        reason: format!(
                            "the transaction was already {}",
                            if e.commit { "committed" } else { "aborted" }
                        ),
                    }
                });
            }
            return Ok(if self.is_preparing() {
                EndPlan::Finish
            } else {
                EndPlan::Reply
            });
        }
        self.check(txn_id, pid, epoch)?;
        Ok(if self.is_ongoing() {
            EndPlan::Run
        } else {
            EndPlan::Reply
        })
    }

    /// Records the decision: bumps the epoch (the markers' epoch).
    pub(crate) fn prepare(&mut self, commit: bool, timed_out: bool) {
        debug_assert!(self.is_ongoing());
        self.last_end = Some(LastEnd {
            pid: self.pid,
            epoch: self.epoch,
            commit,
            timed_out,
        });
        self.epoch += 1;
        self.phase = if commit {
            Phase::PrepareCommit
        } else {
            Phase::PrepareAbort
        };
    }

    /// Lowers a recorded decision's `offsets_since` to `end` (where `__consumer_offsets`
    /// ends now) when it lies past it: what lay at or after it was lost in a power cut (it was
    /// counted while still in flight), and every commit from now on lands at or after `end`,
    /// so it is newer than the decision. Returns whether it changed (then it must be recorded
    /// before the decision is carried out: `since_unrecorded`).
    pub(crate) fn clamp_since(&mut self, end: u64) -> bool {
        match self.offsets_since {
            Some(since) if self.is_preparing() && since > end => {
                self.offsets_since = Some(end);
                self.since_unrecorded = true;
                true
            }
            _ => false,
        }
    }

    /// True when the epoch cannot be bumped by one more transaction: the next producer id
    /// must be a new one.
    pub(crate) fn needs_new_pid(&self) -> bool {
        self.epoch >= i16::MAX - 1
    }

    /// Records that the decision is carried out; `new_pid` when [`TxnMeta::needs_new_pid`].
    pub(crate) fn complete(&mut self, new_pid: Option<i64>) {
        self.phase = match self.phase {
            Phase::PrepareCommit => Phase::CompleteCommit,
            _ => Phase::CompleteAbort,
        };
        self.partitions.clear();
        self.groups.clear();
        self.offsets_since = None;
        self.since_unrecorded = false;
        self.started_ms = 0;
        if let Some(pid) = new_pid {
            self.pid = pid;
            self.epoch = 0;
        }
    }

    /// A new producer instance (InitProducerId; any open transaction was ended first): bumps
    /// the epoch, or moves to `new_pid` at epoch 0.
    pub(crate) fn bump(&mut self, new_pid: Option<i64>, timeout_ms: u32) {
        debug_assert!(!self.is_ongoing() && !self.is_preparing());
        match new_pid {
            Some(pid) => {
                self.pid = pid;
                self.epoch = 0;
            }
            None => self.epoch += 1,
        }
        self.timeout_ms = timeout_ms;
        self.phase = Phase::Empty;
        self.last_end = None;
    }

    /// InitProducerId with an expected producer: allowed when it is the current one, or the
    /// one whose transaction the broker timed out (nobody initialised the id since).
    pub(crate) fn expected_ok(&self, pid: i64, epoch: i16) -> bool {
        (pid == self.pid && epoch == self.epoch)
            || self
                .last_end
                .is_some_and(|e| e.timed_out && e.pid == pid && e.epoch == epoch)
    }

    /// True when the open transaction has passed its timeout at `now_ms`.
    pub(crate) fn expired(&self, now_ms: i64) -> bool {
        self.is_ongoing() && now_ms.saturating_sub(self.started_ms) > i64::from(self.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ID: &str = "t";

    fn tp(p: u32) -> Tp {
        ("topic".to_owned(), p)
    }

    /// Drives an end the way the coordinator does.
    fn end(m: &mut TxnMeta, pid: i64, epoch: i16, commit: bool) -> Result<(i64, i16), BrokerError> {
        match m.plan_end(ID, pid, epoch, commit)? {
            EndPlan::Run => {
                m.prepare(commit, false);
                m.complete(None);
            }
            EndPlan::Finish => m.complete(None),
            EndPlan::Reply => {}
        }
        Ok((m.pid, m.epoch))
    }

    #[test]
    fn lifecycle_retries_and_fencing() {
        let mut m = TxnMeta::new(7, 1000);
        m.add_partitions(ID, 7, 0, [tp(0), tp(1)], 10, 100).unwrap();
        assert!(m.is_ongoing());
        assert_eq!(end(&mut m, 7, 0, true).unwrap(), (7, 1));
        assert_eq!(m.phase, Phase::CompleteCommit);
        // A retried EndTxn gets the same answer; the other decision is refused.
        assert_eq!(end(&mut m, 7, 0, true).unwrap(), (7, 1));
        assert!(matches!(
            end(&mut m, 7, 0, false),
            Err(BrokerError::InvalidTxnState { .. })
        ));
        // A late write of the ended transaction is a zombie.
        assert!(matches!(
            m.add_partitions(ID, 7, 0, [tp(2)], 20, 100),
            Err(BrokerError::TxnProducerFenced { .. })
        ));
        // The next transaction runs at epoch 1.
        m.add_partitions(ID, 7, 1, [tp(2)], 20, 100).unwrap();
        assert_eq!(m.partitions, [tp(2)].into());
        // A new instance: the open transaction is aborted first, then the epoch bumped.
        assert_eq!(m.plan_end(ID, 7, 1, false).unwrap(), EndPlan::Run);
        m.prepare(false, false);
        m.complete(None);
        m.bump(None, 1000);
        assert_eq!((m.pid, m.epoch, m.phase), (7, 3, Phase::Empty));
        assert!(m.check(ID, 7, 2).is_err() && m.check(ID, 7, 1).is_err());
        // An epoch from the future, another producer id: not this id's producer.
        assert!(matches!(
            m.check(ID, 7, 9),
            Err(BrokerError::InvalidTxnState { .. })
        ));
        assert!(matches!(
            m.check(ID, 8, 3),
            Err(BrokerError::InvalidTxnState { .. })
        ));
        // Limits.
        m.add_partitions(ID, 7, 3, [tp(0)], 30, 1).unwrap();
        assert!(m.add_partitions(ID, 7, 3, [tp(1)], 30, 1).is_err());
    }

    #[test]
    fn timeouts_let_the_producer_go_on() {
        let mut m = TxnMeta::new(7, 1000);
        m.add_partitions(ID, 7, 0, [tp(0)], 0, 100).unwrap();
        assert!(!m.expired(1000) && m.expired(1001));
        m.prepare(false, true);
        m.complete(None);
        assert!(matches!(
            m.add_partitions(ID, 7, 0, [tp(0)], 2000, 100),
            Err(BrokerError::TransactionTimedOut { .. })
        ));
        assert!(matches!(
            end(&mut m, 7, 0, true),
            Err(BrokerError::TransactionTimedOut { .. })
        ));
        // Aborting is accepted and hands out the new epoch.
        assert_eq!(end(&mut m, 7, 0, false).unwrap(), (7, 1));
        assert!(m.expected_ok(7, 0) && m.expected_ok(7, 1) && !m.expected_ok(7, 2));
        // Once another instance initialised the id, the old one is only a zombie.
        m.bump(None, 1000);
        assert!(!m.expected_ok(7, 0));
        assert!(matches!(
            m.check(ID, 7, 0),
            Err(BrokerError::TxnProducerFenced { .. })
        ));
    }

    #[test]
    fn epochs_roll_over_to_a_new_producer_id() {
        let mut m = TxnMeta::new(7, 1000);
        m.epoch = i16::MAX - 2;
        m.add_partitions(ID, 7, i16::MAX - 2, [tp(0)], 0, 100)
            .unwrap();
        m.prepare(true, false);
        assert_eq!(m.epoch, i16::MAX - 1);
        assert!(m.needs_new_pid());
        m.complete(Some(99));
        assert_eq!((m.pid, m.epoch), (99, 0));
        // The retry of the last EndTxn still answers with the new producer.
        assert_eq!(
            m.plan_end(ID, 7, i16::MAX - 2, true).unwrap(),
            EndPlan::Reply
        );
        assert!(matches!(
            m.check(ID, 7, i16::MAX - 2),
            Err(BrokerError::TxnProducerFenced { .. })
        ));
    }

    #[test]
    fn serde_round_trip() {
        let mut m = TxnMeta::new(7, 1000);
        m.add_partitions(ID, 7, 0, [tp(0), tp(3)], 5, 100).unwrap();
        m.add_offsets(ID, 7, 0, "g", "m-1", 4, [(tp(1), 42, "x".into())], 5)
            .unwrap();
        m.prepare(true, false);
        let json = serde_json::to_vec(&m).unwrap();
        assert_eq!(serde_json::from_slice::<TxnMeta>(&json).unwrap(), m);
    }

    /// A model: one transactional id, two producer instances (the second may be initialised
    /// at any time, fencing the first), random writes, ends, retries and timeouts. Checks
    /// that a fenced or ended producer never gets a write into a transaction, that every
    /// accepted write belongs to the transaction that later ends with the decision asked for,
    /// and that epochs only grow.
    #[derive(Clone, Debug)]
    enum Op {
        Write(bool, u32),
        End(bool, bool),
        RetryEnd(bool),
        Init,
        Timeout,
    }

    /// A producer instance of the model: (pid, epoch, its last end: (epoch, commit)).
    type Instance = (i64, i16, Option<(i16, bool)>);

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (any::<bool>(), 0u32..4).prop_map(|(w, p)| Op::Write(w, p)),
            2 => (any::<bool>(), any::<bool>()).prop_map(|(w, c)| Op::End(w, c)),
            1 => any::<bool>().prop_map(Op::RetryEnd),
            1 => Just(Op::Init),
            1 => Just(Op::Timeout),
        ]
    }

    proptest! {
        #[test]
        fn against_a_model(ops in prop::collection::vec(op(), 1..200)) {
            let mut m = TxnMeta::new(1, 1000);
            // Producer instances, oldest first: (pid, epoch, last end). Only the last is live.
            let mut producers: Vec<Instance> = vec![(1, 0, None)];
            let mut now = 0;
            let mut max_epoch = 0;
            let mut open_writes: Vec<usize> = Vec::new();
            for op in ops {
                now += 10;
                let live = producers.len() - 1;
                // `false` picks the live instance, `true` the one before it (a zombie).
                let pick = |zombie: bool| if zombie && live > 0 { live - 1 } else { live };
                match op {
                    Op::Write(zombie, p) => {
                        let i = pick(zombie);
                        let (pid, epoch, _) = producers[i];
                        if m.add_partitions(ID, pid, epoch, [tp(p)], now, 100).is_ok() {
                            prop_assert_eq!(i, live, "a zombie's write was accepted");
                            prop_assert!(m.is_ongoing());
                            open_writes.push(i);
                        }
                    }
                    Op::End(zombie, commit) => {
                        let i = pick(zombie);
                        let (pid, epoch, _) = producers[i];
                        let was_open = m.is_ongoing() && (m.pid, m.epoch) == (pid, epoch);
                        if let Ok(next) = end(&mut m, pid, epoch, commit) {
                            if was_open {
                                prop_assert_eq!(i, live);
                                prop_assert!(open_writes.iter().all(|&w| w == i));
                                open_writes.clear();
                                producers[i].2 = Some((epoch, commit));
                            }
                            producers[i].0 = next.0;
                            producers[i].1 = next.1;
                        }
                    }
                    Op::RetryEnd(zombie) => {
                        let i = pick(zombie);
                        if let (pid, _, Some((epoch, commit))) = producers[i]
                            && let Ok(plan) = m.plan_end(ID, pid, epoch, commit)
                        {
                            prop_assert_ne!(plan, EndPlan::Run, "a retry never starts a new end");
                        }
                    }
                    Op::Init => {
                        if m.is_ongoing() {
                            m.prepare(false, false);
                            m.complete(None);
                            open_writes.clear();
                        }
                        m.bump(None, 1000);
                        producers.push((m.pid, m.epoch, None));
                    }
                    Op::Timeout => {
                        if m.expired(now + 2000) {
                            m.prepare(false, true);
                            m.complete(None);
                            open_writes.clear();
                        }
                    }
                }
                prop_assert!(m.epoch >= max_epoch);
                max_epoch = m.epoch;
                for &(pid, epoch, _) in &producers[..producers.len() - 1] {
                    let mut probe = m.clone();
                    prop_assert!(probe.add_partitions(ID, pid, epoch, [tp(9)], now, 100).is_err());
                }
            }
        }
    }
}
