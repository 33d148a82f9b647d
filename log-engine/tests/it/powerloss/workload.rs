//! The random workload: every step is one engine call (or a few), chosen by the seed, and
//! what the engine answered goes into the model.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use spool_log_engine::io::sim::SimRng;
use spool_log_engine::{
    BatchBuilder, CleanupPolicy, Clock, Compression, Error, FsyncPolicy, Log, Marker, TopicConfig,
};

use super::model::{Life, Model, PartKey, Producer, Rec, Topic, TxnProducer, Unacked};

/// True when a failed write may still have reached the disk: an I/O error or the power cut,
/// or `Poisoned` for the append whose own write or fdatasync failed (`was_poisoned`: the
/// partition refused before the call, nothing written); false for the other refusals
/// (closed, a producer check).
pub(crate) fn may_have_written(e: &Error, was_poisoned: bool) -> bool {
    !was_poisoned && matches!(e, Error::Io { .. } | Error::Poisoned { .. })
}

/// True when `SPOOL_POWERLOSS_TRACE` is set: every step is printed.
pub(crate) fn tracing() -> bool {
    std::env::var_os("SPOOL_POWERLOSS_TRACE").is_some()
}

macro_rules! trace {
    ($($a:tt)*) => {
        if tracing() {
            eprintln!($($a)*);
        }
    };
}

/// The test's clock: moved only by the workload.
#[derive(Debug)]
pub(crate) struct ManualClock(pub(crate) AtomicI64);

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub(crate) struct Work<'a> {
    pub(crate) log: &'a Log,
    pub(crate) model: &'a mut Model,
    pub(crate) rng: &'a mut SimRng,
    pub(crate) clock: &'a Arc<ManualClock>,
}

/// A random topic configuration: small segments (so rolls happen), any fsync policy, some
/// with retention or compaction.
pub(crate) fn random_config(rng: &mut SimRng) -> TopicConfig {
    let fsync = match rng.below(10) {
        0..=5 => FsyncPolicy::Always,
        6 | 7 => FsyncPolicy::Interval { interval_ms: 50 },
        _ => FsyncPolicy::Never,
    };
    let segment_bytes = *rng.pick(&[4096, 6000, 12000]);
    let mut cfg = TopicConfig {
        partitions: rng.range(1, 3) as u32,
        segment_bytes,
        index_interval_bytes: *rng.pick(&[64, 300, 4096]),
        fsync,
        delete_retention_ms: 1 << 40,
        min_cleanable_dirty_percent: 0,
        ..TopicConfig::default()
    };
    match rng.below(4) {
        0 => cfg.retention_bytes = Some(segment_bytes * 3),
        1 => cfg.cleanup = CleanupPolicy::Compact,
        _ => {}
    }
    cfg
}

impl Work<'_> {
    fn next_serial(&mut self) -> u64 {
        self.model.serial += 1;
        self.model.serial
    }

    /// A batch of 1–4 records with unique values; keyed from a small set (compaction has
    /// something to do); sometimes a tombstone on compacted topics.
    fn records(&mut self, compacted: bool) -> Vec<Rec> {
        let n = self.rng.range(1, 4);
        (0..n)
            .map(|_| {
                let s = self.next_serial();
                let key = format!("k{}", self.rng.below(6)).into_bytes();
                let value = if compacted && self.rng.chance(0.1) {
                    None
                } else {
                    Some(format!("v{s}-{}", "x".repeat(self.rng.below(300) as usize)).into_bytes())
                };
                Rec::Data(Some(key), value)
            })
            .collect()
    }

    fn encode(&self, recs: &[Rec], producer: Option<(i64, i16, i32)>, txn: bool) -> Bytes {
        let mut b = BatchBuilder::new(Compression::None);
        if let Some((pid, epoch, seq)) = producer {
            b.producer(pid, epoch, seq);
        }
        b.transactional(txn);
        let now = self.clock.now_ms();
        for r in recs {
            if let Rec::Data(k, v) = r {
                b.push(now, k.as_deref(), v.as_deref(), &[]);
            }
        }
        b.finish().expect("a valid batch")
    }

    fn pick_topic(&mut self, pred: impl Fn(&Topic) -> bool) -> Option<String> {
        let names: Vec<String> = self
            .model
            .topics
            .iter()
            .filter(|(_, t)| t.life == Life::Live && pred(t))
            .map(|(n, _)| n.clone())
            .collect();
        (!names.is_empty()).then(|| self.rng.pick(&names).clone())
    }

    fn pick_part(&mut self, pred: impl Fn(&Topic) -> bool) -> Option<(String, u32)> {
        let t = self.pick_topic(pred)?;
        let n = self.model.topics[&t].parts.len() as u64;
        Some((t, self.rng.below(n) as u32))
    }

    /// One random step. Errors are expected (injected faults, the power cut); the model
    /// records what the engine said either way.
    pub(crate) fn step(&mut self) {
        match self.rng.below(100) {
            0..=39 => self.append(),
            40..=49 => self.idempotent(),
            50..=57 => self.txn_step(),
            58..=62 => self.flush(),
            63..=67 => self.roll(),
            68..=71 => self.retention(),
            72..=76 => self.compact(),
            77..=80 => self.maintenance(),
            81..=83 => self.create_topic(),
            84..=85 => self.delete_topic(),
            86..=87 => self.alter_topic(),
            88 => self.add_partitions(),
            _ => self.append(),
        }
    }

    fn append(&mut self) {
        let Some((t, p)) = self.pick_part(|_| true) else {
            return;
        };
        let compacted = self.model.topics[&t].compacted();
        let recs = self.records(compacted);
        let bytes = self.encode(&recs, None, false);
        let Ok(part) = self.log.partition(&t, p) else {
            return;
        };
        let wait = self.rng.below(3);
        let always = self.model.topics[&t].always();
        let was = part.is_poisoned();
        let res = if wait == 0 {
            part.append(&bytes)
        } else {
            part.append_nowait(&bytes)
        };
        trace!("append {t}/{p} wait={wait} {} recs -> {res:?}", recs.len());
        let m = self.model.part(&t, p).expect("modelled");
        match res {
            Ok(info) => {
                m.put(info.base_offset, &recs);
                if always && wait == 0 {
                    m.durable_to(info.last_offset + 1);
                }
                if wait == 2 && part.wait_durable(info.last_offset + 1).is_ok() {
                    m.durable_to(info.last_offset + 1);
                }
            }
            Err(e) if may_have_written(&e, was) => m.put_maybe(&recs),
            Err(_) => {}
        }
        if always {
            let lso = part.last_stable_offset();
            let m = self.model.part(&t, p).expect("modelled");
            m.lso_floor = m.lso_floor.max(lso);
        }
    }

    /// An idempotent producer's next batch (a new producer now and then, at most 3
    /// unacknowledged batches each, on `fsync = always` topics without compaction). A batch
    /// whose send failed is sent again before anything new, as a Kafka producer retries.
    fn idempotent(&mut self) {
        let fresh = self.model.producers.is_empty() || self.rng.chance(0.1);
        if fresh {
            let Some((t, p)) = self.pick_part(|t| t.always() && !t.compacted()) else {
                return;
            };
            self.model.pids += 1;
            let pid = 1000 + self.model.pids;
            self.model.producers.push(Producer {
                pid,
                topic: t,
                part: p,
                next_seq: 0,
                unacked: VecDeque::new(),
            });
        }
        let i = self.rng.below(self.model.producers.len() as u64) as usize;
        let pr = &self.model.producers[i];
        if self
            .model
            .topics
            .get(&pr.topic)
            .is_none_or(|t| t.life != Life::Live)
        {
            return;
        }
        let wait = self.rng.chance(0.6);
        if let Some(j) = pr.unacked.iter().position(|u| u.at.is_none()) {
            let u = self.model.producers[i].unacked.remove(j).expect("found");
            if let Err(v) = send(self.log, self.model, i, u, wait, Some(j)) {
                self.model.violation.get_or_insert(v);
            }
            return;
        }
        if pr.unacked.len() >= 3 {
            return;
        }
        let (pid, seq) = (pr.pid, pr.next_seq);
        let recs = self.records(false);
        let bytes = self.encode(&recs, Some((pid, 0, seq)), false);
        self.model.producers[i].next_seq += recs.len() as i32;
        let u = Unacked {
            bytes,
            recs,
            at: None,
            sent: false,
        };
        if let Err(v) = send(self.log, self.model, i, u, wait, None) {
            self.model.violation.get_or_insert(v);
        }
    }

    /// Transactions on `fsync = always` topics without compaction: begin and write, or decide
    /// and write the markers.
    fn txn_step(&mut self) {
        if self.model.txns.is_empty() || (self.model.txns.len() < 3 && self.rng.chance(0.1)) {
            let pid = 5000 + self.model.txns.len() as i64;
            self.model.txns.push(TxnProducer {
                pid,
                epoch: 0,
                parts: Default::default(),
                seqs: Default::default(),
                decision: None,
            });
        }
        let i = self.rng.below(self.model.txns.len() as u64) as usize;
        let ending = self.model.txns[i].decision.is_some()
            || (!self.model.txns[i].parts.is_empty() && self.rng.chance(0.3));
        if ending {
            let commit = self.rng.chance(0.6);
            end_txn(self.log, self.model, i, commit);
            return;
        }
        let Some((t, p)) = self.pick_part(|t| t.always() && !t.compacted()) else {
            return;
        };
        let (pid, epoch) = (self.model.txns[i].pid, self.model.txns[i].epoch);
        let key = (t.clone(), p);
        let seq = *self.model.txns[i].seqs.get(&key).unwrap_or(&0);
        let recs = self.records(false);
        let bytes = self.encode(&recs, Some((pid, epoch, seq)), true);
        let Ok(part) = self.log.partition(&t, p) else {
            return;
        };
        self.model.txns[i]
            .seqs
            .insert(key.clone(), seq + recs.len() as i32);
        let was = part.is_poisoned();
        let res = part.append(&bytes);
        trace!("txn {pid} epoch {epoch} seq {seq} {t}/{p} -> {res:?}");
        let m = self.model.part(&t, p).expect("modelled");
        let base = match res {
            Ok(info) => {
                m.put(info.base_offset, &recs);
                m.durable_to(info.last_offset + 1);
                Some(info.base_offset)
            }
            Err(e) if may_have_written(&e, was) => {
                m.put_maybe(&recs);
                Some(m.next)
            }
            Err(_) => None,
        };
        // Records, not just offsets: a failed append's offsets may go to the next one.
        let offsets: Vec<(u64, Rec)> = base
            .map(|b| (b..).zip(recs.iter().cloned()).collect())
            .unwrap_or_default();
        self.model.txns[i]
            .parts
            .entry(key)
            .or_default()
            .extend(offsets);
    }

    fn flush(&mut self) {
        let Some((t, p)) = self.pick_part(|_| true) else {
            return;
        };
        if let Ok(part) = self.log.partition(&t, p)
            && let Ok(next) = part.flush().inspect_err(|e| trace!("flush {t}/{p} -> {e}"))
        {
            trace!("flush {t}/{p} -> {next}");
            self.model.part(&t, p).expect("modelled").durable_to(next);
        }
    }

    fn roll(&mut self) {
        let Some((t, p)) = self.pick_part(|_| true) else {
            return;
        };
        if let Ok(part) = self.log.partition(&t, p) {
            let next = self.model.part(&t, p).expect("modelled").next;
            let r = part.roll();
            trace!("roll {t}/{p} -> {r:?}");
            if r.is_ok() {
                self.model.part(&t, p).expect("modelled").durable_to(next);
            }
        }
    }

    fn retention(&mut self) {
        let Some((t, p)) = self.pick_part(|t| t.cfg.retention_bytes.is_some()) else {
            return;
        };
        if let Ok(part) = self.log.partition(&t, p) {
            // Retention may delete every sealed segment: until it returns, a cut may leave any
            // log start up to the active segment's base.
            let active = *part.segment_bases().last().expect("a segment");
            let m = self.model.part(&t, p).expect("modelled");
            m.start_ceiling = m.start_ceiling.max(active);
            let r = part.enforce_retention();
            trace!("retention {t}/{p} -> {r:?}");
            let start = part.log_start_offset();
            let m = self.model.part(&t, p).expect("modelled");
            m.start_ceiling = m.start_ceiling.max(start);
        }
    }

    /// Time passes; the maintenance pass runs interval flushes and retention everywhere.
    fn maintenance(&mut self) {
        self.clock
            .0
            .fetch_add(self.rng.range(1, 100) as i64, Ordering::Relaxed);
        let names: Vec<String> = self.model.topics.keys().cloned().collect();
        for t in &names {
            for (i, part) in self
                .log
                .partitions(t)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                if let Some(m) = self.model.part(t, i as u32) {
                    let active = *part.segment_bases().last().expect("a segment");
                    m.start_ceiling = m.start_ceiling.max(active);
                }
            }
        }
        let r = self.log.run_maintenance();
        trace!("maintenance -> {r:?}");
    }

    fn compact(&mut self) {
        let Some((t, p)) = self.pick_part(|t| t.compacted()) else {
            return;
        };
        let r = self.log.clean_now(&t, p);
        trace!("clean {t}/{p} -> {r:?}");
    }

    fn create_topic(&mut self) {
        if self.model.topics.len() >= 5 {
            return;
        }
        let name = format!("t{}", self.next_serial());
        let cfg = random_config(self.rng);
        self.model
            .topics
            .insert(name.clone(), Topic::new(cfg.clone(), Life::Creating));
        let r = self.log.create_topic(&name, cfg.clone());
        trace!("create {name} {cfg:?} -> {r:?}");
        if r.is_ok() {
            self.model.topics.get_mut(&name).expect("inserted").life = Life::Live;
        }
    }

    fn delete_topic(&mut self) {
        if self.model.topics.len() <= 1 {
            return;
        }
        let Some(t) = self.pick_topic(|_| true) else {
            return;
        };
        // A deleted topic's producers and transactions go with it.
        self.model.producers.retain(|p| p.topic != t);
        if self
            .model
            .txns
            .iter()
            .any(|x| x.parts.keys().any(|(n, _)| *n == t))
        {
            return;
        }
        self.model.topics.get_mut(&t).expect("picked").life = Life::Deleting;
        let r = self.log.delete_topic(&t);
        trace!("delete {t} -> {r:?}");
        if r.is_ok() {
            self.model.topics.remove(&t);
        }
    }

    fn alter_topic(&mut self) {
        let Some(t) = self.pick_topic(|t| t.cfg.retention_bytes.is_some()) else {
            return;
        };
        let topic = self.model.topics.get_mut(&t).expect("picked");
        let mut cfg = topic.cfg.clone();
        cfg.retention_bytes = Some(cfg.segment_bytes * self.rng.range(2, 5));
        let lowers = cfg.retention_bytes < topic.cfg.retention_bytes;
        topic.cfg_maybe = Some(cfg.clone());
        if lowers {
            // Lowering retention enforces it first (`Log::alter_topic`): until the call
            // returns, a cut may leave any log start up to each partition's active segment, as
            // for the retention and maintenance steps.
            for (i, part) in self
                .log
                .partitions(&t)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                if let Some(m) = self.model.part(&t, i as u32) {
                    let active = *part.segment_bases().last().expect("a segment");
                    m.start_ceiling = m.start_ceiling.max(active);
                }
            }
        }
        if self.log.alter_topic(&t, cfg.clone()).is_ok() {
            let topic = self.model.topics.get_mut(&t).expect("picked");
            topic.cfg = cfg;
            topic.cfg_maybe = None;
        }
    }

    fn add_partitions(&mut self) {
        let Some(t) = self.pick_topic(|t| t.parts.len() < 4) else {
            return;
        };
        let topic = self.model.topics.get_mut(&t).expect("picked");
        let mut cfg = topic.cfg.clone();
        cfg.partitions += 1;
        topic.cfg_maybe = Some(cfg.clone());
        topic.parts.push(Default::default());
        let ok = self.log.add_partitions(&t, cfg.partitions).is_ok();
        let topic = self.model.topics.get_mut(&t).expect("picked");
        if ok {
            topic.cfg = cfg;
            topic.cfg_maybe = None;
        }
    }
}

/// Sends (or sends again) batch `u` of idempotent producer `i`, waiting for durability if
/// `wait`, and puts it back into the producer's unacknowledged queue (at `slot`, or last)
/// unless it is now acknowledged durable. `Err` is a violation: the engine answered a resend
/// as a duplicate of something else, or a first send as a duplicate. `Ok(true)`: acknowledged
/// durable.
pub(crate) fn send(
    log: &Log,
    model: &mut Model,
    i: usize,
    mut u: Unacked,
    wait: bool,
    slot: Option<usize>,
) -> Result<bool, String> {
    let (t, pn, pid) = {
        let pr = &model.producers[i];
        (pr.topic.clone(), pr.part, pr.pid)
    };
    let Ok(part) = log.partition(&t, pn) else {
        return Ok(false);
    };
    let was = part.is_poisoned();
    let res = if wait {
        part.append(&u.bytes)
    } else {
        part.append_nowait(&u.bytes)
    };
    trace!(
        "idempotent {pid} {t}/{pn} resend={} wait={wait} -> {res:?}",
        u.sent
    );
    let m = model.part(&t, pn).expect("modelled");
    match res {
        Ok(info) => {
            if info.duplicate {
                let there: Vec<Option<&Rec>> = (info.base_offset..=info.last_offset)
                    .map(|o| m.recs.get(&o).or_else(|| m.retired.get(&o)))
                    .collect();
                let same = there.len() == u.recs.len()
                    && there.iter().zip(&u.recs).all(|(a, b)| *a == Some(b));
                if !u.sent || !same {
                    return Err(format!(
                        "{t}/{pn}: producer {pid}'s batch (sent before: {}) was answered as a duplicate of offsets {}..={}, which hold {there:?}",
                        u.sent, info.base_offset, info.last_offset
                    ));
                }
                if u.at.is_some_and(|a| a != info.base_offset) {
                    return Err(format!(
                        "{t}/{pn}: producer {pid}'s batch moved from {:?} to {}",
                        u.at, info.base_offset
                    ));
                }
            } else {
                m.put(info.base_offset, &u.recs);
            }
            if wait {
                // Durable, and so is everything the producer sent before (in order).
                m.durable_to(info.last_offset + 1);
                let upto = slot.unwrap_or(model.producers[i].unacked.len());
                model.producers[i].unacked.drain(..upto);
                return Ok(true);
            }
            u.at = Some(info.base_offset);
        }
        Err(e) => {
            if may_have_written(&e, was) {
                m.put_maybe(&u.recs);
            }
        }
    }
    u.sent = true;
    let q = &mut model.producers[i].unacked;
    q.insert(slot.unwrap_or(q.len()).min(q.len()), u);
    Ok(false)
}

/// Takes (or keeps) the decision of transaction producer `i` and writes its markers; once all
/// are written the producer moves to the next epoch. Stops at the first failure (the test,
/// like the broker's coordinator, finishes after the restart).
pub(crate) fn end_txn(log: &Log, model: &mut Model, i: usize, commit: bool) {
    let commit = *model.txns[i].decision.get_or_insert(commit);
    let (pid, epoch) = (model.txns[i].pid, model.txns[i].epoch);
    let marker = if commit {
        Marker::Commit
    } else {
        Marker::Abort
    };
    let parts: Vec<(PartKey, Vec<(u64, Rec)>)> = model.txns[i]
        .parts
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for ((t, p), offsets) in parts {
        let Ok(part) = log.partition(&t, p) else {
            return;
        };
        let was = part.is_poisoned();
        let res = part.write_marker(pid, epoch + 1, marker, 0);
        trace!(
            "marker {pid} epoch {} {marker:?} {t}/{p} -> {res:?}",
            epoch + 1
        );
        match res {
            Ok(info) => {
                let m = model.part(&t, p).expect("modelled");
                if let Some(info) = info {
                    m.put(info.base_offset, &[Rec::Marker]);
                    m.durable_to(info.last_offset + 1);
                }
                let mine: Vec<u64> = offsets
                    .iter()
                    .filter(|(o, r)| m.recs.get(o) == Some(r))
                    .map(|(o, _)| *o)
                    .collect();
                let set = if commit {
                    &mut m.committed
                } else {
                    &mut m.aborted
                };
                set.extend(mine);
                let lso = part.last_stable_offset();
                m.lso_floor = m.lso_floor.max(lso);
                model.txns[i].parts.remove(&(t, p));
            }
            Err(e) => {
                if may_have_written(&e, was) {
                    model
                        .part(&t, p)
                        .expect("modelled")
                        .put_maybe(&[Rec::Marker]);
                }
                return;
            }
        }
    }
    let x = &mut model.txns[i];
    x.epoch += 1;
    x.seqs.clear();
    x.decision = None;
}
