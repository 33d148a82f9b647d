//! The invariants a reopened log must keep, checked against the model:
//! - every topic whose creation returned exists, every topic whose deletion returned is gone,
//!   one cut short is either whole or gone; configurations are what was last stored;
//! - the high watermark never goes below the acknowledged durable end (offsets never go back)
//!   and the log start never passes what retention was allowed to delete;
//! - every record read is exactly a record the engine accepted at that offset (nothing torn,
//!   nothing invented); every acknowledged durable record is there (or, on a compacted topic,
//!   a later record of its key); no value appears twice (idempotent retries);
//! - the last stable offset never goes back; a transaction whose marker was acknowledged
//!   stays ended, its records visible to read-committed readers if committed, hidden if
//!   aborted; after the repairs no transaction stays open;
//! - a flipped bit in acknowledged data is reported (open or read refused with
//!   `Corruption`, or the tail cut and kept in a `.torn-` file), never served or dropped
//!   silently.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use spool_log_engine::{Error, Isolation, Log, Partition};

use super::ROOT;
use super::Stats;
use super::model::{Life, Model, Part, Rec};
use super::workload::{end_txn, send};

/// `(topic, partition)` of a path under the log root (`partition` is `None` for the topic's
/// own files).
fn locate(path: &Path) -> Option<(String, Option<u32>)> {
    let rel = path.strip_prefix(ROOT).ok()?;
    let mut c = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    let topic = c.next()?;
    let part = c.next().and_then(|p| p.parse().ok());
    Some((topic, part))
}

/// True when an error about `reported` may come from damage to `flipped`: the same partition,
/// or the same topic when either is a topic-level file.
pub(crate) fn same_partition(flipped: &Path, reported: &Path) -> bool {
    match (locate(flipped), locate(reported)) {
        (Some((t1, p1)), Some((t2, p2))) => t1 == t2 && (p1.is_none() || p2.is_none() || p1 == p2),
        _ => false,
    }
}

#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// The flipped bit was reported by a read or a cut tail.
    pub(crate) flip_reported: bool,
}

/// Every record readable from the log start, with the offsets of control records marked.
fn read_all(p: &Partition, isolation: Isolation) -> Result<Vec<(u64, Rec)>, Error> {
    let mut out = Vec::new();
    let mut offset = p.log_start_offset();
    loop {
        let r = p.read_with(offset, 64 << 10, isolation)?;
        if r.data.is_empty() {
            if r.next_offset > offset && r.next_offset < r.high_watermark {
                offset = r.next_offset;
                continue;
            }
            return Ok(out);
        }
        for b in r.batches() {
            let b = b.map_err(Error::from)?;
            let control = b.header().is_control();
            for rec in b.records(&Default::default()).map_err(Error::from)? {
                let rec = rec.map_err(Error::from)?;
                let r = if control {
                    Rec::Marker
                } else {
                    Rec::Data(rec.key.map(|k| k.to_vec()), rec.value.map(|v| v.to_vec()))
                };
                out.push((rec.offset, r));
            }
        }
        offset = r.next_offset;
    }
}

/// Checks the reopened `log` against `model` and then brings the model up to date with what
/// the log holds now (unacknowledged records lost to the cut are forgotten).
pub(crate) fn check(
    log: &Log,
    model: &mut Model,
    flipped: Option<&Path>,
    torn_new: &[std::path::PathBuf],
    stats: &mut Stats,
) -> Result<Outcome, String> {
    let mut out = Outcome::default();
    let reports: BTreeMap<(String, u32), (u64, usize)> = log
        .recovery_reports()
        .iter()
        .map(|(t, p, r)| ((t.clone(), *p), (r.bytes_truncated, r.quarantined.len())))
        .collect();
    let engine: BTreeSet<String> = log.topics().into_iter().collect();
    for t in &engine {
        if !model.topics.contains_key(t) {
            return Err(format!("topic {t} exists but was never created"));
        }
    }
    let names: Vec<String> = model.topics.keys().cloned().collect();
    for name in names {
        let exists = engine.contains(&name);
        let topic = model.topics.get_mut(&name).expect("listed");
        match (topic.life, exists) {
            (Life::Live, false) => {
                return Err(format!(
                    "topic {name} was created (acknowledged) and is gone"
                ));
            }
            (Life::Creating | Life::Deleting, false) => {
                model.topics.remove(&name);
                continue;
            }
            (_, true) => topic.life = Life::Live,
        }
        let cfg = log.topic_config(&name).map_err(|e| e.to_string())?;
        let flip_here = flipped
            .is_some_and(|f| same_partition(f, &Path::new(ROOT).join(&name).join("topic.json")));
        if cfg != topic.cfg && Some(&cfg) != topic.cfg_maybe.as_ref() {
            return Err(format!(
                "topic {name}: configuration on disk {cfg:?} is neither the acknowledged {:?} nor the one in flight {:?}{}",
                topic.cfg,
                topic.cfg_maybe,
                if flip_here {
                    " (a flipped bit changed it silently)"
                } else {
                    ""
                }
            ));
        }
        topic.parts.truncate(cfg.partitions as usize);
        topic.cfg = cfg;
        topic.cfg_maybe = None;
        let (compacted, always) = (topic.compacted(), topic.always());
        for (i, m) in topic.parts.iter_mut().enumerate() {
            let i = i as u32;
            let damaged = flipped.is_some_and(|f| {
                same_partition(f, &Path::new(ROOT).join(&name).join(i.to_string()))
            });
            let (truncated, kept) = reports.get(&(name.clone(), i)).copied().unwrap_or_default();
            let part_dir = Path::new(ROOT).join(&name).join(i.to_string());
            let kept_by_a_failed_open = torn_new.iter().any(|f| f.starts_with(&part_dir));
            if truncated > 0 {
                stats.torn_tails_cut += 1;
            }
            let part = log.partition(&name, i).map_err(|e| e.to_string())?;
            let ctx = |what: String| format!("{name}/{i}: {what}");
            let r = check_part(&part, m, compacted, always, stats).map_err(ctx);
            match r {
                Ok(()) => {}
                Err(e)
                    if damaged
                        && (truncated > 0 && kept > 0
                            || kept_by_a_failed_open
                            || e.contains("corruption")) =>
                {
                    // The damage was reported: the tail was cut and kept (by this open, or by
                    // one that then failed, with a warning), or a read refused.
                    out.flip_reported = true;
                    continue;
                }
                Err(e) => return Err(e),
            }
            // The model follows the log from here on.
            let (start, hwm) = (part.log_start_offset(), part.high_watermark());
            let kept = m.recs.split_off(&start);
            m.retired.append(&mut std::mem::replace(&mut m.recs, kept));
            m.recs.retain(|&o, _| o < hwm);
            m.maybe.retain(|o| m.recs.contains_key(o));
            m.next = hwm;
            m.durable = hwm;
            m.start_ceiling = start;
            m.committed.retain(|o| m.recs.contains_key(o));
            m.aborted.retain(|o| m.recs.contains_key(o));
        }
    }
    // An unacknowledged batch the engine placed is durable now if it survived (the reopened
    // log is durable to its end), and must be sent again if it did not.
    for pr in &mut model.producers {
        let Some(m) = model
            .topics
            .get(&pr.topic)
            .and_then(|t| t.parts.get(pr.part as usize))
        else {
            continue;
        };
        pr.unacked.retain_mut(|u| match u.at {
            Some(a) if m.recs.contains_key(&a) => false,
            Some(_) => {
                u.at = None;
                true
            }
            None => true,
        });
    }
    // Records of open transactions that the cut took are no part of them any more.
    for x in &mut model.txns {
        for ((t, p), offsets) in &mut x.parts {
            if let Some(m) = model.topics.get(t).and_then(|t| t.parts.get(*p as usize)) {
                offsets.retain(|(o, r)| m.recs.get(o) == Some(r));
            }
        }
    }
    Ok(out)
}

fn check_part(
    p: &Partition,
    m: &mut Part,
    compacted: bool,
    always: bool,
    stats: &mut Stats,
) -> Result<(), String> {
    let (start, hwm) = (p.log_start_offset(), p.high_watermark());
    if hwm < m.durable {
        return Err(format!(
            "high watermark {hwm} below the acknowledged durable end {}",
            m.durable
        ));
    }
    if start > m.start_ceiling {
        return Err(format!(
            "log start {start} past what retention may have deleted ({})",
            m.start_ceiling
        ));
    }
    let read = read_all(p, Isolation::ReadUncommitted).map_err(|e| format!("reading: {e}"))?;
    let mut values = BTreeSet::new();
    let mut latest: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    for (o, r) in &read {
        match m.recs.get(o) {
            Some(want) if want == r => {}
            Some(want) => {
                return Err(format!(
                    "offset {o} holds {r:?}, but {want:?} was written there"
                ));
            }
            None => return Err(format!("offset {o} holds {r:?}, which was never written")),
        }
        if let Rec::Data(k, v) = r {
            if let Some(v) = v
                && !values.insert(v.clone())
            {
                return Err(format!(
                    "value {} appears twice (offset {o})",
                    String::from_utf8_lossy(v)
                ));
            }
            if let Some(k) = k {
                latest.insert(k.clone(), *o);
            }
        }
    }
    let read_offsets: BTreeSet<u64> = read.iter().map(|(o, _)| *o).collect();
    if compacted {
        // The latest acknowledged record of every key, or a later one of the same key.
        let mut want: BTreeMap<&[u8], u64> = BTreeMap::new();
        for (o, r) in m.recs.range(start..m.durable) {
            if let Rec::Data(Some(k), _) = r
                && !m.maybe.contains(o)
            {
                want.insert(k, *o);
            }
        }
        for (k, o) in want {
            if latest.get(k).is_none_or(|&l| l < o) {
                return Err(format!(
                    "key {} lost: its acknowledged record at offset {o} is gone and nothing later replaced it",
                    String::from_utf8_lossy(k)
                ));
            }
            stats.acked_checked += 1;
        }
    } else {
        for (o, _) in m.recs.range(start..hwm) {
            if !read_offsets.contains(o) {
                return Err(format!(
                    "offset {o} (below the high watermark {hwm}, durable end {}) is missing",
                    m.durable
                ));
            }
        }
        stats.acked_checked += m.recs.range(start..m.durable).count() as u64;
    }
    if always {
        let lso = p.last_stable_offset();
        if lso < m.lso_floor {
            return Err(format!(
                "last stable offset {lso} went back (was {})",
                m.lso_floor
            ));
        }
        // Decided transactions: committed records visible, aborted ones hidden, to
        // read-committed readers.
        let rc: BTreeSet<u64> = read_all(p, Isolation::ReadCommitted)
            .map_err(|e| format!("reading committed: {e}"))?
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        if let Some(o) = m.aborted.iter().find(|o| rc.contains(o)) {
            return Err(format!(
                "a read-committed reader sees offset {o} of an aborted transaction"
            ));
        }
        if let Some(o) = m
            .committed
            .range(start..lso)
            .find(|o| read_offsets.contains(o) && !rc.contains(o))
        {
            return Err(format!(
                "a read-committed reader misses offset {o} of a committed transaction (LSO {lso})"
            ));
        }
    }
    Ok(())
}

/// What the broker does after a restart, done by the test: decided transactions are finished
/// and undecided ones aborted (markers); idempotent producers resend what they did not see
/// acknowledged, which must be recognised when it survived and appended once when it did not.
pub(crate) fn repair(log: &Log, model: &mut Model) -> Result<(), String> {
    for i in 0..model.txns.len() {
        let x = &model.txns[i];
        if x.decision.is_some() || !x.parts.is_empty() {
            let commit = x.decision.unwrap_or(false);
            end_txn(log, model, i, commit);
            if model.txns[i].decision.is_some() {
                return Err(format!(
                    "transaction of producer {} could not be finished",
                    model.txns[i].pid
                ));
            }
        }
    }
    for t in log.topics() {
        for p in log.partitions(&t).map_err(|e| e.to_string())? {
            let open = p.open_transactions();
            if !open.is_empty() {
                return Err(format!(
                    "{t}/{}: transactions still open after every one was decided: {open:?}",
                    p.id()
                ));
            }
        }
    }
    for i in 0..model.producers.len() {
        let (t, pn) = {
            let pr = &model.producers[i];
            (pr.topic.clone(), pr.part)
        };
        if log.partition(&t, pn).is_err() {
            continue;
        }
        while let Some(u) = model.producers[i].unacked.pop_front() {
            if !send(log, model, i, u, true, Some(0))? {
                return Err(format!(
                    "{t}/{pn}: producer {} could not resend after the restart",
                    model.producers[i].pid
                ));
            }
        }
    }
    Ok(())
}
