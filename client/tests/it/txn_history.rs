//! A history checker for transactions, in the spirit of Jepsen's Kafka checker (reliability
//! bar §5 #10: lost writes, aborted reads and torn transactions are where Kafka-compatible
//! transaction protocols actually broke).
//!
//! Several `TransactionalProducer`s (distinct transactional ids) run transactions that write
//! uniquely numbered records (`p<producer>-t<txn>-r<i>`) to random partitions of three topics
//! and commit an offset for a consumer group of their own (`txh-g-<txn>`, so whether a
//! transaction's offsets took effect is visible at the end); about 30% are aborted on
//! purpose. Some producers send every record at once (so open transactions sit in the
//! partitions and hold the last stable offset back), the others buffer until `flush`.
//! Read-committed readers follow every partition live: a `Consumer` (Subscribe) and a fetch
//! loop that also records each fetch's last stable offset. Meanwhile
//! the broker is SIGKILLed and restarted at seeded moments (after a seeded number of finished
//! transactions, plus a seeded delay), and now and then a *client* dies: the producer is
//! dropped mid-transaction (or kept as a zombie that tries to write and commit afterwards)
//! and a new instance with the same transactional id takes over.
//!
//! What each transaction's outcome is, from the client's point of view:
//! - **committed**: `commit` returned Ok;
//! - **aborted**: `abort` returned Ok, or the transaction failed before its commit was asked
//!   for (a failed send or flush, a failed abort, a zombie): it can never become committed;
//! - **indeterminate**: `commit` itself failed (connection error, timeout, ...): it may have
//!   been committed or aborted, but all or nothing.
//!
//! After any failure the producer makes a new `TransactionalProducer` (which fences the old
//! instance and aborts what it left open). Afterwards every partition is read back
//! read-committed and read-uncommitted, and [`check`] reports (all must be zero):
//! - **lost**: a committed transaction with a record missing from the read-committed log, or
//!   whose offset commit did not take effect;
//! - **aborted reads**: a record of an aborted transaction (or of an indeterminate one that
//!   ended aborted) seen by a read-committed reader, live or at the end;
//! - **torn**: a transaction only partly visible read-committed (its offsets count as a
//!   part);
//! - **duplicates**: a record more than once in the log;
//! - **order**: a live reader seeing a partition's offsets go backwards (or repeat);
//! - **LSO regressions**: a fetch's last stable offset below an earlier fetch's of the same
//!   partition, or a read-committed fetch returning data at or past the LSO;
//! - **zombie writes**: a send, commit or EndTxn of a fenced instance that succeeded;
//! - **inconsistent**: a record where no transaction put it (another partition, an unknown
//!   value), or read live at an offset that the final log holds something else at;
//! - **hanging**: a partition whose LSO stays below its high watermark once every producer
//!   is done (a transaction nobody ends).
//!
//! `SPOOL_TXN_HISTORY_SEED` reproduces a run's choices and kill schedule (timing still
//! varies). The checker checks itself: `checker_reports_fabricated_anomalies` feeds it a
//! history with a torn transaction, an aborted read and more, and asserts it reports them;
//! with `SPOOL_TXN_HISTORY_READ_UNCOMMITTED=1` the "read-committed" readers read uncommitted,
//! and a run reports hundreds of aborted reads and torn transactions. Offset commits may come
//! first in a transaction, before any of its records (this found a broker bug, since fixed:
//! see [`LATE_OFFSETS`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_client::{
    Backoff, Client, ConsumerConfig, FetchOptions, Isolation, OffsetCommit, OffsetSpec,
    ProducerRecord, StartAt, TopicPartition, TransactionalConfig, TransactionalProducer,
};

use crate::broker::Broker;
use crate::{Rng, create};

const PRODUCERS: usize = 4;
const TXNS_PER_PRODUCER: usize = 150;
/// Topics and their partition counts.
const TOPICS: [(&str, u32); 3] = [("txh-a", 3), ("txh-b", 2), ("txh-c", 2)];
/// Broker kills per run.
const KILLS: usize = 12;
/// Share of transactions aborted on purpose.
const ABORT_PERCENT: u64 = 30;
/// Share of transactions whose client "dies" mid-transaction.
const CLIENT_DEATH_PERCENT: u64 = 6;
/// Set, offset commits come only once a record of the transaction is in the log. By default
/// they may come first, before any record reached the broker: that found a broker bug (fixed;
/// `txn_crash::crash_after_offsets_before_records` pins it), where AddOffsetsToTxn was kept
/// in memory only, so a broker restart between it and the commit forgot the offsets while the
/// producer's epoch stayed valid, and the commit then succeeded without them (lost + torn).
const LATE_OFFSETS: &str = "SPOOL_TXN_HISTORY_LATE_OFFSETS";

/// A topic partition.
type Tp = (String, u32);
/// Per partition, (offset, value) in the order read.
type PartitionLog = BTreeMap<Tp, Vec<(u64, String)>>;

/// What the client knows of a transaction's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Committed,
    Aborted,
    Indeterminate,
}

/// One transaction as the client saw it.
#[derive(Clone, Debug)]
struct Txn {
    outcome: Outcome,
    /// Why it ended this way (for reports and the summary).
    how: &'static str,
    /// Every record the client tried to write in it: (partition, value).
    records: Vec<(Tp, String)>,
    /// The consumer group (one per transaction) the client tried to commit an offset for
    /// with the transaction.
    offsets: Option<String>,
}

/// One fetch of the live fetch follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FetchObs {
    last_stable_offset: u64,
    high_watermark: u64,
    next_offset: u64,
    /// Offset of the last record returned, if any.
    last_record: Option<u64>,
}

/// Everything recorded during a run, and the log read back at its end.
#[derive(Debug, Default)]
struct History {
    /// Transaction name → what the client saw.
    txns: BTreeMap<String, Txn>,
    /// The final log, read committed.
    committed: PartitionLog,
    /// The final log, read uncommitted.
    uncommitted: PartitionLog,
    /// What each live read-committed reader saw: (reader name, records per partition).
    live: Vec<(String, PartitionLog)>,
    /// Every fetch of the live fetch follower, per partition, in order.
    fetches: BTreeMap<Tp, Vec<FetchObs>>,
    /// Final (high watermark, last stable offset) per partition, once every producer is done.
    ends: BTreeMap<Tp, (u64, u64)>,
    /// Operations of fenced instances that the broker accepted.
    zombie_accepted: Vec<String>,
    /// Per transaction's group: whether it has a committed offset at the end.
    groups: BTreeMap<String, bool>,
}

/// The anomalies [`check`] finds; each entry describes one.
#[derive(Debug, Default)]
struct Report {
    lost: Vec<String>,
    aborted_reads: Vec<String>,
    torn: Vec<String>,
    duplicates: Vec<String>,
    order: Vec<String>,
    lso: Vec<String>,
    zombie_writes: Vec<String>,
    inconsistent: Vec<String>,
    hanging: Vec<String>,
}

impl Report {
    fn categories(&self) -> [(&'static str, &Vec<String>); 9] {
        [
            ("lost", &self.lost),
            ("aborted reads", &self.aborted_reads),
            ("torn", &self.torn),
            ("duplicates", &self.duplicates),
            ("order regressions", &self.order),
            ("LSO regressions", &self.lso),
            ("zombie writes", &self.zombie_writes),
            ("inconsistent", &self.inconsistent),
            ("hanging", &self.hanging),
        ]
    }

    fn is_clean(&self) -> bool {
        self.categories().iter().all(|(_, v)| v.is_empty())
    }

    fn counts(&self) -> String {
        self.categories()
            .iter()
            .map(|(name, v)| format!("{name} {}", v.len()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every anomaly (the first 20 of each kind).
    fn details(&self) -> String {
        let mut out = String::new();
        for (name, v) in self.categories() {
            for a in v.iter().take(20) {
                out.push_str(&format!("\n  {name}: {a}"));
            }
            if v.len() > 20 {
                out.push_str(&format!("\n  {name}: ... and {} more", v.len() - 20));
            }
        }
        out
    }
}

/// Checks a history (see the module docs for what each anomaly means).
fn check(h: &History) -> Report {
    let mut r = Report::default();
    // value → (transaction, the partition it was sent to).
    let mut owner: HashMap<&str, (&str, &Tp)> = HashMap::new();
    for (name, t) in &h.txns {
        for (tp, v) in &t.records {
            owner.insert(v.as_str(), (name.as_str(), tp));
        }
    }
    // Where each value is in the final logs.
    let places = |log: &PartitionLog| {
        let mut at: HashMap<String, Vec<(Tp, u64)>> = HashMap::new();
        for (tp, recs) in log {
            for (o, v) in recs {
                at.entry(v.clone()).or_default().push((tp.clone(), *o));
            }
        }
        at
    };
    let committed_at = places(&h.committed);
    let uncommitted_at = places(&h.uncommitted);
    for (what, at) in [
        ("read committed", &committed_at),
        ("read uncommitted", &uncommitted_at),
    ] {
        let mut dups: Vec<String> = at
            .iter()
            .filter(|(_, p)| p.len() > 1)
            .map(|(v, p)| format!("{v} {p:?} ({what})"))
            .collect();
        dups.sort();
        r.duplicates.extend(dups);
    }
    for (tp, recs) in &h.committed {
        for (o, v) in recs {
            match owner.get(v.as_str()) {
                None => r
                    .inconsistent
                    .push(format!("{tp:?}@{o}: {v} was written by no transaction")),
                Some((_, sent_to)) if *sent_to != tp => r
                    .inconsistent
                    .push(format!("{tp:?}@{o}: {v} was sent to {sent_to:?}")),
                Some(_) => {}
            }
        }
        let uncommitted: HashMap<u64, &str> = h
            .uncommitted
            .get(tp)
            .map(|v| v.iter().map(|(o, v)| (*o, v.as_str())).collect())
            .unwrap_or_default();
        for (o, v) in recs {
            if uncommitted.get(o) != Some(&v.as_str()) {
                r.inconsistent.push(format!(
                    "{tp:?}@{o}: {v} read committed, {:?} read uncommitted",
                    uncommitted.get(o)
                ));
            }
        }
    }
    // Per transaction: all or nothing, and what its outcome allows.
    // Transactions of which something is visible at the end.
    let mut any_visible: HashMap<&str, bool> = HashMap::new();
    for (name, t) in &h.txns {
        // Its records and its offset commit, each visible or not.
        let mut items: Vec<(String, bool)> = t
            .records
            .iter()
            .map(|(_, v)| (v.clone(), committed_at.contains_key(v)))
            .collect();
        if let Some(g) = &t.offsets {
            items.push((
                format!("offsets of {g}"),
                h.groups.get(g).copied().unwrap_or(false),
            ));
        }
        let visible: Vec<&str> = items
            .iter()
            .filter(|(_, vis)| *vis)
            .map(|(v, _)| v.as_str())
            .collect();
        let missing: Vec<&str> = items
            .iter()
            .filter(|(_, vis)| !*vis)
            .map(|(v, _)| v.as_str())
            .collect();
        any_visible.insert(name, !visible.is_empty());
        if !visible.is_empty() && !missing.is_empty() {
            r.torn.push(format!(
                "{name} ({:?}, {}): visible {visible:?}, missing {missing:?}",
                t.outcome, t.how
            ));
        }
        match t.outcome {
            Outcome::Committed if !missing.is_empty() => r.lost.push(format!(
                "{name} (commit acknowledged): missing {missing:?}, visible {visible:?}"
            )),
            Outcome::Aborted if !visible.is_empty() => r.aborted_reads.push(format!(
                "{name} ({}): {visible:?} visible read committed",
                t.how
            )),
            _ => {}
        }
    }
    // Live readers.
    for (reader, seen) in &h.live {
        for (tp, recs) in seen {
            let final_log: HashMap<u64, &str> = h
                .committed
                .get(tp)
                .map(|v| v.iter().map(|(o, v)| (*o, v.as_str())).collect())
                .unwrap_or_default();
            let mut prev: Option<u64> = None;
            for (o, v) in recs {
                if let Some(p) = prev
                    && *o <= p
                {
                    r.order
                        .push(format!("{reader}: {tp:?} offset {o} after {p} ({v})"));
                }
                prev = Some(*o);
                let txn = owner.get(v.as_str()).map(|(n, _)| *n);
                // Aborted by the client, or indeterminate and (by the final log) aborted.
                let aborted = txn.is_some_and(|n| match h.txns[n].outcome {
                    Outcome::Aborted => true,
                    Outcome::Indeterminate => !any_visible[n],
                    Outcome::Committed => false,
                });
                if aborted {
                    let t = &h.txns[txn.unwrap()];
                    r.aborted_reads.push(format!(
                        "{reader}: {tp:?}@{o} {v} of {} ({:?}, {}) read live",
                        txn.unwrap(),
                        t.outcome,
                        t.how
                    ));
                } else if final_log.get(o) != Some(&v.as_str()) {
                    r.inconsistent.push(format!(
                        "{reader}: {tp:?}@{o} read {v} live, the final log holds {:?}",
                        final_log.get(o)
                    ));
                }
            }
        }
    }
    // Last stable offsets seen by the fetch follower.
    for (tp, obs) in &h.fetches {
        let mut prev: Option<u64> = None;
        for f in obs {
            if let Some(p) = prev
                && f.last_stable_offset < p
            {
                r.lso
                    .push(format!("{tp:?}: LSO {} after {p}", f.last_stable_offset));
            }
            prev = Some(prev.map_or(f.last_stable_offset, |p| p.max(f.last_stable_offset)));
            if f.last_stable_offset > f.high_watermark {
                r.lso.push(format!(
                    "{tp:?}: LSO {} above the high watermark {}",
                    f.last_stable_offset, f.high_watermark
                ));
            }
            if f.last_record.is_some_and(|o| o >= f.last_stable_offset)
                || f.next_offset > f.last_stable_offset
            {
                r.lso.push(format!(
                    "{tp:?}: a read-committed fetch returned up to {:?} (next {}) past its LSO {}",
                    f.last_record, f.next_offset, f.last_stable_offset
                ));
            }
        }
    }
    for (tp, (hw, lso)) in &h.ends {
        if lso != hw {
            r.hanging.push(format!(
                "{tp:?}: LSO {lso} < high watermark {hw} after every producer finished"
            ));
        }
    }
    r.zombie_writes = h.zombie_accepted.clone();
    r
}

/// A client for the run's tasks: connects lazily and reconnects; short timeouts so a dead
/// broker is noticed quickly.
fn lazy_client(addr: &str) -> Client {
    Client::builder(addr.to_owned())
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(5))
        .connect_lazy()
        .expect("client")
}

/// A new instance of a transactional producer, retried while the broker restarts.
async fn new_instance(client: &Client, cfg: &TransactionalConfig) -> TransactionalProducer {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TransactionalProducer::new(client.clone(), cfg.clone()).await {
            Ok(t) => return t,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            Err(e) => panic!("{}: no new instance within 30 s: {e}", cfg.transactional_id),
        }
    }
}

/// What the producers share with the test.
#[derive(Default)]
struct Shared {
    txns: BTreeMap<String, Txn>,
    zombie_accepted: Vec<String>,
}

/// One producer's run: `TXNS_PER_PRODUCER` transactions.
async fn run_producer(
    p: usize,
    addr: String,
    seed: u64,
    shared: Arc<Mutex<Shared>>,
    finished: Arc<AtomicUsize>,
) {
    let mut rng = Rng((seed ^ (0x9E37_79B9_7F4A_7C15_u64.wrapping_mul(p as u64 + 1))) | 1);
    let client = lazy_client(&addr);
    // Even producers send every record at once; odd ones buffer until flush.
    let eager = p.is_multiple_of(2);
    let cfg = TransactionalConfig {
        transaction_timeout: Duration::from_secs(20),
        batch_bytes: if eager { 1 } else { 64 << 10 },
        max_attempts: 3,
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        ..TransactionalConfig::new(format!("txh-{p}"))
    };
    let id = cfg.transactional_id.clone();
    let early_offsets = std::env::var_os(LATE_OFFSETS).is_none();
    let mut tx = new_instance(&client, &cfg).await;
    for t in 0..TXNS_PER_PRODUCER {
        let name = format!("p{p}-t{t:03}");
        let n = 1 + rng.below(5) as usize;
        let abort = rng.below(100) < ABORT_PERCENT;
        let dies = rng.below(100) < CLIENT_DEATH_PERCENT;
        let dies_after = rng.below(n as u64) as usize;
        let zombie_tries = rng.below(2) == 0;
        // The offset commit goes before record `offsets_at` (after the last one if n): by
        // default anywhere, with LATE_OFFSETS once a record of the transaction is in the log.
        let offsets_at = if early_offsets {
            rng.below(n as u64 + 1) as usize
        } else {
            1 + rng.below(n as u64) as usize
        };
        let mut records = Vec::new();
        let mut offsets = None;
        tx.begin().expect("begin on an idle producer");
        let mut failed = false;
        for i in 0..=n {
            if i == offsets_at {
                if !early_offsets && !eager && tx.flush().await.is_err() {
                    failed = true;
                    break;
                }
                let group = format!("txh-g-{name}");
                offsets = Some(group.clone());
                let commit = OffsetCommit {
                    topic: TOPICS[0].0.to_owned(),
                    partition: 0,
                    offset: t as u64 + 1,
                    metadata: name.clone(),
                };
                if tx.send_offsets(&group, &[commit], None).await.is_err() {
                    failed = true;
                    break;
                }
            }
            if i == n {
                break;
            }
            let (topic, parts) = TOPICS[rng.below(TOPICS.len() as u64) as usize];
            let tp = (topic.to_owned(), rng.below(u64::from(parts)) as u32);
            let value = format!("{name}-r{i}");
            // Recorded before the send: a failed send may still have reached the log.
            records.push((tp.clone(), value.clone()));
            let rec = ProducerRecord::new(value.clone()).key(name.clone());
            if tx.send(&tp.0, tp.1, rec).await.is_err() {
                failed = true;
                break;
            }
            if dies && i == dies_after {
                break;
            }
            // Keep transactions open a little, so that kills land inside them.
            tokio::time::sleep(Duration::from_millis(rng.below(4))).await;
        }
        let (outcome, how) = if failed {
            tx = new_instance(&client, &cfg).await;
            (Outcome::Aborted, "send failed")
        } else if dies {
            // The client dies mid-transaction; a new instance with the same id takes over.
            let mut zombie = std::mem::replace(&mut tx, new_instance(&client, &cfg).await);
            if zombie_tries {
                let old = zombie.producer();
                let (topic, parts) = TOPICS[rng.below(TOPICS.len() as u64) as usize];
                let tp = (topic.to_owned(), rng.below(u64::from(parts)) as u32);
                let value = format!("{name}-z");
                records.push((tp.clone(), value.clone()));
                let sent = zombie
                    .send(&tp.0, tp.1, ProducerRecord::new(value.clone()))
                    .await;
                let mut accepted = Vec::new();
                if sent.is_ok() && eager {
                    accepted.push(format!("{name}: a fenced instance's send of {value}"));
                }
                if zombie.commit().await.is_ok() {
                    accepted.push(format!("{name}: a fenced instance's commit"));
                }
                if client.end_txn(&id, old, true).await.is_ok() {
                    accepted.push(format!("{name}: a fenced instance's EndTxn {old:?}"));
                }
                shared.lock().unwrap().zombie_accepted.extend(accepted);
                (Outcome::Aborted, "zombie")
            } else {
                drop(zombie);
                (Outcome::Aborted, "client died")
            }
        } else if abort {
            match tx.abort().await {
                Ok(()) => (Outcome::Aborted, "aborted"),
                Err(_) => {
                    tx = new_instance(&client, &cfg).await;
                    (Outcome::Aborted, "abort failed")
                }
            }
        } else if tx.flush().await.is_err() {
            tx = new_instance(&client, &cfg).await;
            (Outcome::Aborted, "flush failed")
        } else {
            match tx.commit().await {
                Ok(()) => (Outcome::Committed, "committed"),
                Err(_) => {
                    tx = new_instance(&client, &cfg).await;
                    (Outcome::Indeterminate, "commit failed")
                }
            }
        };
        shared.lock().unwrap().txns.insert(
            name,
            Txn {
                outcome,
                how,
                records,
                offsets,
            },
        );
        finished.fetch_add(1, Ordering::SeqCst);
    }
}

/// Every partition of the run.
fn partitions() -> Vec<Tp> {
    TOPICS
        .iter()
        .flat_map(|(t, n)| (0..*n).map(|p| (t.to_string(), p)))
        .collect()
}

/// Reads a partition from offset 0 to `end` at `isolation`.
async fn read_all(c: &Client, tp: &Tp, isolation: Isolation, end: u64) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut offset = 0;
    let opts = FetchOptions {
        isolation,
        ..FetchOptions::default()
    };
    while offset < end {
        let f = c.fetch(&tp.0, tp.1, offset, &opts).await.unwrap();
        for r in f.records {
            out.push((r.offset, value_of(&r.value)));
        }
        if f.next_offset <= offset {
            break;
        }
        offset = f.next_offset;
    }
    out
}

fn value_of(v: &Option<bytes::Bytes>) -> String {
    String::from_utf8(v.as_ref().expect("a value").to_vec()).expect("utf-8")
}

/// (high watermark, last stable offset) of every partition.
async fn ends(c: &Client) -> spool_client::Result<BTreeMap<Tp, (u64, u64)>> {
    let tps = partitions();
    let queries: Vec<_> = tps
        .iter()
        .map(|(t, p)| (TopicPartition::new(t.clone(), *p), OffsetSpec::Latest))
        .collect();
    let hw = c.list_offsets(&queries).await?;
    let lso = c
        .list_offsets_with(&queries, Isolation::ReadCommitted)
        .await?;
    let mut out = BTreeMap::new();
    for ((tp, hw), lso) in tps.into_iter().zip(hw).zip(lso) {
        out.insert(tp, (hw?.offset, lso?.offset));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_through_broker_and_client_crashes() {
    let started = Instant::now();
    let seed = std::env::var("SPOOL_TXN_HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7a_5eed_u64);
    eprintln!("txn history seed {seed} (SPOOL_TXN_HISTORY_SEED to reproduce)");
    // The checker's own check: readers that should read committed read uncommitted.
    let iso = if std::env::var_os("SPOOL_TXN_HISTORY_READ_UNCOMMITTED").is_some() {
        Isolation::ReadUncommitted
    } else {
        Isolation::ReadCommitted
    };
    let mut rng = Rng(seed | 1);
    let mut broker = Broker::start();
    let addr = broker.addr();
    let c = broker.client().await;
    for (t, n) in TOPICS {
        create(&c, t, n).await;
    }

    // Live readers, read committed: a Consumer and a fetch loop (which sees the LSO).
    let consumed: Arc<Mutex<PartitionLog>> = Arc::default();
    let consumer = {
        let c = lazy_client(&addr);
        let consumed = consumed.clone();
        tokio::spawn(async move {
            let mut cons = c.consumer(ConsumerConfig {
                heartbeat_interval: Duration::from_millis(200),
                reconnect_backoff: Backoff {
                    initial: Duration::from_millis(20),
                    max: Duration::from_millis(300),
                },
                max_reconnect_attempts: 10_000,
                isolation: iso,
                ..ConsumerConfig::default()
            });
            let parts: Vec<_> = partitions()
                .into_iter()
                .map(|(t, p)| (TopicPartition::new(t, p), StartAt::Offset(0)))
                .collect();
            cons.assign(&parts).await.unwrap();
            while let Some(r) = cons.next().await {
                let Ok(r) = r else { continue };
                consumed
                    .lock()
                    .unwrap()
                    .entry((r.topic.to_string(), r.partition))
                    .or_default()
                    .push((r.offset, value_of(&r.value)));
            }
        })
    };
    let fetched: Arc<Mutex<PartitionLog>> = Arc::default();
    let fetches: Arc<Mutex<BTreeMap<Tp, Vec<FetchObs>>>> = Arc::default();
    let positions: Arc<Mutex<BTreeMap<Tp, u64>>> = Arc::default();
    let follower = {
        let c = lazy_client(&addr);
        let (fetched, fetches, positions) = (fetched.clone(), fetches.clone(), positions.clone());
        tokio::spawn(async move {
            let opts = FetchOptions {
                isolation: iso,
                max_bytes: 64 << 10,
                ..FetchOptions::default()
            };
            loop {
                for tp in partitions() {
                    let pos = positions.lock().unwrap().get(&tp).copied().unwrap_or(0);
                    let Ok(f) = c.fetch(&tp.0, tp.1, pos, &opts).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    fetches
                        .lock()
                        .unwrap()
                        .entry(tp.clone())
                        .or_default()
                        .push(FetchObs {
                            last_stable_offset: f.last_stable_offset,
                            high_watermark: f.high_watermark,
                            next_offset: f.next_offset,
                            last_record: f.records.last().map(|r| r.offset),
                        });
                    let mut log = fetched.lock().unwrap();
                    let log = log.entry(tp.clone()).or_default();
                    for r in &f.records {
                        log.push((r.offset, value_of(&r.value)));
                    }
                    positions.lock().unwrap().insert(tp, f.next_offset.max(pos));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let shared: Arc<Mutex<Shared>> = Arc::default();
    let finished = Arc::new(AtomicUsize::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            tokio::spawn(run_producer(
                p,
                addr.clone(),
                seed,
                shared.clone(),
                finished.clone(),
            ))
        })
        .collect();

    // Kill -9 and restart after seeded numbers of finished transactions, plus a seeded delay.
    let total = PRODUCERS * TXNS_PER_PRODUCER;
    let mut at: Vec<usize> = (0..KILLS)
        .map(|_| 5 + rng.below((total - 20) as u64) as usize)
        .collect();
    at.sort_unstable();
    let mut kills = 0;
    for (k, threshold) in at.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while finished.load(Ordering::SeqCst) < *threshold && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let delay = rng.below(40);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        eprintln!(
            "kill {k} after {} transactions + {delay} ms",
            finished.load(Ordering::SeqCst)
        );
        tokio::task::block_in_place(|| broker.restart());
        kills += 1;
    }
    for p in producers {
        p.await.expect("producer task");
    }
    let produced_in = started.elapsed();

    // Every producer is done: every transaction must be decided.
    let c = broker.client().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let final_ends = loop {
        let e = ends(&c).await.expect("list offsets");
        if e.values().all(|(hw, lso)| hw == lso) || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut committed = PartitionLog::new();
    let mut uncommitted = PartitionLog::new();
    for (tp, (hw, lso)) in &final_ends {
        committed.insert(
            tp.clone(),
            read_all(
                &c,
                tp,
                iso,
                if iso == Isolation::ReadCommitted {
                    *lso
                } else {
                    *hw
                },
            )
            .await,
        );
        uncommitted.insert(
            tp.clone(),
            read_all(&c, tp, Isolation::ReadUncommitted, *hw).await,
        );
    }
    // Which transactions' offset commits took effect.
    let mut groups = BTreeMap::new();
    let offsets_tp = [TopicPartition::new(TOPICS[0].0, 0)];
    for t in shared.lock().unwrap().txns.values() {
        if let Some(g) = &t.offsets {
            groups.insert(g.clone(), false);
        }
    }
    for (g, committed) in groups.iter_mut() {
        let got = c
            .fetch_offsets(g, &offsets_tp)
            .await
            .expect("fetch offsets");
        *committed = got.iter().any(|o| o.offset.is_some());
    }
    // Let the live readers catch up with the end of the committed log, then stop them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let caught_up = loop {
        let follower_done = final_ends
            .iter()
            .all(|(tp, (_, lso))| positions.lock().unwrap().get(tp).copied().unwrap_or(0) >= *lso);
        let consumer_done = committed.iter().all(|(tp, recs)| {
            let last = recs.last().map(|(o, _)| *o);
            let seen = consumed
                .lock()
                .unwrap()
                .get(tp)
                .and_then(|v| v.last().map(|(o, _)| *o));
            last.is_none() || seen >= last
        });
        if (follower_done && consumer_done) || Instant::now() > deadline {
            break (follower_done, consumer_done);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    consumer.abort();
    follower.abort();
    let _ = consumer.await;
    let _ = follower.await;

    let shared = std::mem::take(&mut *shared.lock().unwrap());
    let history = History {
        txns: shared.txns,
        committed,
        uncommitted,
        live: vec![
            (
                "consumer".to_owned(),
                std::mem::take(&mut *consumed.lock().unwrap()),
            ),
            (
                "fetcher".to_owned(),
                std::mem::take(&mut *fetched.lock().unwrap()),
            ),
        ],
        fetches: std::mem::take(&mut *fetches.lock().unwrap()),
        ends: final_ends,
        zombie_accepted: shared.zombie_accepted,
        groups,
    };
    let report = check(&history);

    let count = |o: Outcome| history.txns.values().filter(|t| t.outcome == o).count();
    let count_how = |how: &str| history.txns.values().filter(|t| t.how == how).count();
    let committed_at: std::collections::HashSet<&str> = history
        .committed
        .values()
        .flatten()
        .map(|(_, v)| v.as_str())
        .collect();
    let indeterminate_committed = history
        .txns
        .values()
        .filter(|t| {
            t.outcome == Outcome::Indeterminate
                && t.records
                    .iter()
                    .all(|(_, v)| committed_at.contains(v.as_str()))
                && t.offsets.as_ref().is_none_or(|g| history.groups[g])
        })
        .count();
    let records: usize = history.txns.values().map(|t| t.records.len()).sum();
    let live: Vec<String> = history
        .live
        .iter()
        .map(|(n, l)| format!("{n} {}", l.values().map(Vec::len).sum::<usize>()))
        .collect();
    eprintln!(
        "txn history seed {seed}: {} transactions: {} committed, {} aborted ({} on purpose, \
         {} client deaths, {} zombies, {} failed before commit), {} indeterminate ({} of them \
         committed); {records} records, {} visible read committed, {} in the log; {kills} \
         broker kills; read live: {}; {} LSOs seen; produced in {:.1} s, total {:.1} s; \
         anomalies: {}",
        history.txns.len(),
        count(Outcome::Committed),
        count(Outcome::Aborted),
        count_how("aborted"),
        count_how("client died"),
        count_how("zombie"),
        count_how("send failed") + count_how("flush failed") + count_how("abort failed"),
        count(Outcome::Indeterminate),
        indeterminate_committed,
        committed_at.len(),
        history.uncommitted.values().map(Vec::len).sum::<usize>(),
        live.join(", "),
        history.fetches.values().map(Vec::len).sum::<usize>(),
        produced_in.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        report.counts(),
    );
    assert!(
        report.is_clean(),
        "transactional anomalies (seed {seed}): {}{}",
        report.counts(),
        report.details()
    );
    assert_eq!(history.txns.len(), total, "every transaction recorded");
    assert!(
        caught_up == (true, true),
        "live readers did not reach the end of the committed log within 15 s \
         (fetcher, consumer): {caught_up:?}"
    );
    assert_eq!(kills, KILLS);
}

/// The checker finds what it is meant to find: a fabricated history with one anomaly of each
/// kind (and a clean one, which it passes).
#[test]
fn checker_reports_fabricated_anomalies() {
    let tp = |t: &str, p: u32| (t.to_owned(), p);
    let txn = |outcome, how, recs: &[(Tp, &str)]| Txn {
        outcome,
        how,
        records: recs
            .iter()
            .map(|(tp, v)| (tp.clone(), v.to_string()))
            .collect(),
        offsets: None,
    };
    let with_offsets = |mut t: Txn, group: &str| {
        t.offsets = Some(group.to_owned());
        t
    };
    let (a0, a1, b0) = (tp("a", 0), tp("a", 1), tp("b", 0));
    let clean = || History {
        txns: BTreeMap::from([
            (
                "t1".to_owned(),
                txn(
                    Outcome::Committed,
                    "committed",
                    &[(a0.clone(), "t1-r0"), (b0.clone(), "t1-r1")],
                ),
            ),
            (
                "t2".to_owned(),
                txn(Outcome::Aborted, "aborted", &[(a1.clone(), "t2-r0")]),
            ),
            (
                "t4".to_owned(),
                with_offsets(
                    txn(Outcome::Committed, "committed", &[(b0.clone(), "t4-r0")]),
                    "g4",
                ),
            ),
            (
                "t5".to_owned(),
                with_offsets(txn(Outcome::Aborted, "aborted", &[]), "g5"),
            ),
            (
                "t3".to_owned(),
                txn(
                    Outcome::Indeterminate,
                    "commit failed",
                    &[(a0.clone(), "t3-r0"), (a1.clone(), "t3-r1")],
                ),
            ),
        ]),
        committed: BTreeMap::from([
            (
                a0.clone(),
                vec![(0, "t1-r0".to_owned()), (3, "t3-r0".to_owned())],
            ),
            (a1.clone(), vec![(2, "t3-r1".to_owned())]),
            (
                b0.clone(),
                vec![(0, "t1-r1".to_owned()), (1, "t4-r0".to_owned())],
            ),
        ]),
        uncommitted: BTreeMap::from([
            (
                a0.clone(),
                vec![(0, "t1-r0".to_owned()), (3, "t3-r0".to_owned())],
            ),
            (
                a1.clone(),
                vec![(0, "t2-r0".to_owned()), (2, "t3-r1".to_owned())],
            ),
            (
                b0.clone(),
                vec![(0, "t1-r1".to_owned()), (1, "t4-r0".to_owned())],
            ),
        ]),
        live: vec![(
            "consumer".to_owned(),
            BTreeMap::from([(
                a0.clone(),
                vec![(0, "t1-r0".to_owned()), (3, "t3-r0".to_owned())],
            )]),
        )],
        fetches: BTreeMap::from([(
            a0.clone(),
            vec![
                FetchObs {
                    last_stable_offset: 1,
                    high_watermark: 3,
                    next_offset: 1,
                    last_record: Some(0),
                },
                FetchObs {
                    last_stable_offset: 5,
                    high_watermark: 5,
                    next_offset: 5,
                    last_record: Some(3),
                },
            ],
        )]),
        ends: BTreeMap::from([
            (a0.clone(), (5, 5)),
            (a1.clone(), (4, 4)),
            (b0.clone(), (2, 2)),
        ]),
        zombie_accepted: Vec::new(),
        groups: BTreeMap::from([("g4".to_owned(), true), ("g5".to_owned(), false)]),
    };
    let r = check(&clean());
    assert!(
        r.is_clean(),
        "a clean history: {}{}",
        r.counts(),
        r.details()
    );

    // A torn, lost committed transaction (t1-r1 missing), an aborted read (t2-r0 visible),
    // a duplicate, an order regression and an aborted read live, an LSO regression, a hanging
    // partition, a zombie write, a record nobody wrote.
    let mut h = clean();
    h.committed
        .get_mut(&b0)
        .unwrap()
        .retain(|(_, v)| v != "t1-r1");
    h.committed
        .get_mut(&a1)
        .unwrap()
        .insert(0, (0, "t2-r0".to_owned()));
    h.committed
        .get_mut(&a0)
        .unwrap()
        .push((4, "t1-r0".to_owned()));
    h.uncommitted
        .get_mut(&a0)
        .unwrap()
        .push((4, "t1-r0".to_owned()));
    h.committed
        .get_mut(&a0)
        .unwrap()
        .push((5, "nobody".to_owned()));
    h.uncommitted
        .get_mut(&a0)
        .unwrap()
        .push((5, "nobody".to_owned()));
    h.live[0]
        .1
        .get_mut(&a0)
        .unwrap()
        .push((0, "t1-r0".to_owned()));
    h.live[0]
        .1
        .insert(a1.clone(), vec![(0, "t2-r0".to_owned())]);
    h.fetches.get_mut(&a0).unwrap().push(FetchObs {
        last_stable_offset: 4,
        high_watermark: 5,
        next_offset: 4,
        last_record: None,
    });
    h.ends.insert(b0.clone(), (3, 2));
    h.zombie_accepted
        .push("t9: a fenced instance's commit".to_owned());
    let r = check(&h);
    eprintln!("fabricated anomalies: {}{}", r.counts(), r.details());
    assert_eq!(r.lost.len(), 1, "lost: {:?}", r.lost);
    assert!(r.lost[0].starts_with("t1 "), "{:?}", r.lost);
    assert_eq!(r.torn.len(), 1, "torn: {:?}", r.torn);
    assert!(r.torn[0].starts_with("t1 "), "{:?}", r.torn);
    // Once at the end, once live.
    assert_eq!(
        r.aborted_reads.len(),
        2,
        "aborted reads: {:?}",
        r.aborted_reads
    );
    assert!(r.aborted_reads.iter().all(|a| a.contains("t2")));
    assert_eq!(r.duplicates.len(), 2, "duplicates: {:?}", r.duplicates);
    assert_eq!(r.order.len(), 1, "order: {:?}", r.order);
    assert_eq!(r.lso.len(), 1, "LSO: {:?}", r.lso);
    assert_eq!(r.hanging.len(), 1, "hanging: {:?}", r.hanging);
    assert_eq!(r.zombie_writes.len(), 1);
    assert_eq!(
        r.inconsistent.len(),
        1,
        "inconsistent: {:?}",
        r.inconsistent
    );

    // An indeterminate transaction may go either way, but not half: torn, not lost.
    let mut h = clean();
    h.committed.get_mut(&a1).unwrap().clear();
    let r = check(&h);
    assert_eq!(
        (r.torn.len(), r.lost.len(), r.aborted_reads.len()),
        (1, 0, 0),
        "{r:?}"
    );
    assert!(r.torn[0].starts_with("t3 "));

    // Offsets are part of the transaction: a committed transaction without its offsets is
    // lost and torn; an aborted one's offsets applied are an aborted read.
    let mut h = clean();
    h.groups.insert("g4".to_owned(), false);
    h.groups.insert("g5".to_owned(), true);
    let r = check(&h);
    assert_eq!(
        (r.lost.len(), r.torn.len(), r.aborted_reads.len()),
        (1, 1, 1),
        "{r:?}"
    );
    assert!(r.lost[0].contains("offsets of g4") && r.aborted_reads[0].contains("offsets of g5"));
}
