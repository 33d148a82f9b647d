//! `spool-bounces` when the broker dies **between a transaction's commit request and its
//! reply**: the broker's failpoints (`SPOOL_FAILPOINTS`, `broker/src/failpoint.rs`) make
//! `spoold` abort at a chosen step of ending a transaction, after the decision is durable, so
//! the processor's commit fails ("broker unavailable") while the commit is decided, and it
//! learns the outcome only from the restarted broker ("already committed", or a retried
//! EndTxn's answer). This is the moment `tests/kill9.rs` hits only by chance.
//!
//! Each case: with nothing open, the broker is restarted with one failpoint armed, work
//! arrives, the first decision after it kills the broker; the test restarts it disarmed and
//! waits until everything is handled. Then, read committed: every Postfix log line is on
//! `postfix-log` once, and every mail has exactly one `mail-status` event.
//!
//! - `tailer_commit_crashes`: the tailer's transaction (lines and position, no offsets) is
//!   the first decision: it is what the new lines make the process write first.
//! - `handler_commit_crashes`: the handler alone (no log file), fed `postfix-log` records by
//!   the test's plain producer: its transaction (outputs, changelog, input offsets) is the
//!   first decision. This is the runtime's path, the same for every processor.
//!
//! `broker_kills_while_the_log_grows` (ignored: ~1-2 min) SIGKILLs the broker, the process or
//! both at random moments while the log grows (`CRASH_KILLS`, default 30) and checks the same.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_client::{Client, FetchOptions, Isolation, ProducerRecord, TopicPartition};
use spool_pipeline::events::{MailState, MailStatus};
use spool_pipeline::postfix::parse::parse;
use spool_pipeline::postfix::tail::Position;
use spool_pipeline::processors::bounces::LogRecord;
use spool_pipeline::{publish, topics};
use spool_processor::envelope;
use spool_testkit::Broker;
use support::procs::Processor;

const DOMAIN: &str = "deals.crash";
const PARTITIONS: u32 = 2;
/// Every step of ending a transaction the broker can die at: before the decision (the
/// restart aborts the transaction), then with the decision durable.
const FAILPOINTS: [&str; 5] = [
    "txn-end-received",
    "txn-after-prepare",
    "txn-mid-markers",
    "txn-after-markers",
    "txn-before-complete",
];
/// Mails per case.
const MAILS: usize = 30;

/// The three lines Postfix logs for mail `i` delivered: queued (our Message-ID), sent,
/// removed.
fn mail_lines(i: usize) -> [String; 3] {
    let qid = format!("4crash{i:05}Q");
    [
        format!("Dec 06 12:00:00 mta pfc/cleanup[10]: {qid}: message-id=<m{i}@{DOMAIN}>"),
        format!(
            "Dec 06 12:00:00 mta pfc/virtual[11]: {qid}: to=<u{i}@localhost>, relay=virtual, delay=0.01, delays=0/0/0/0, dsn=2.0.0, status=sent (delivered to mailbox)"
        ),
        format!("Dec 06 12:00:00 mta pfc/qmgr[12]: {qid}: removed"),
    ]
}

/// `spool-bounces` reading `log_path` ("": the handler only), committing every `commit_ms`.
fn bounces(dir: &Path, broker: &str, log_path: &str, commit_ms: u64) -> Processor {
    Processor::new(
        env!("CARGO_BIN_EXE_spool-bounces"),
        dir,
        "bounces",
        broker,
        &format!(
            "inputs = [\"postfix-log\"]\noutputs = [\"mail-status\", \"delivery-issues\", \"address-status\"]\n\
             [commit]\ninterval_ms = {commit_ms}\n\
             [group]\nsession_timeout_ms = 1000\ntransaction_timeout_ms = 10000\n\
             [app]\nlog_path = \"{log_path}\"\nmessage_id_domain = \"{DOMAIN}\"\naddress_partitions = {PARTITIONS}\npoll_ms = 10\n"
        ),
    )
}

/// The `sent` statuses on `mail-status` (read committed): how many events per mail id.
async fn sent(client: &Client) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in read_all(client, topics::MAIL_STATUS).await {
        let e = envelope::decode::<MailStatus>(&r.headers, r.key.as_ref(), r.value.as_ref())
            .expect("a mail-status envelope");
        if e.data.status == MailState::Sent {
            *out.entry(e.data.mail_id).or_default() += 1;
        }
    }
    out
}

/// Every record of every partition of `topic`, read committed.
async fn read_all(client: &Client, topic: &str) -> Vec<spool_client::Record> {
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        let mut offset = 0;
        loop {
            let opts = FetchOptions {
                isolation: Isolation::ReadCommitted,
                max_bytes: 4 << 20,
                ..FetchOptions::default()
            };
            let f = client.fetch(topic, p, offset, &opts).await.unwrap();
            out.extend(f.records);
            if f.next_offset == offset {
                break;
            }
            offset = f.next_offset;
        }
    }
    out
}

/// Whether the bounces group has committed past every committed `postfix-log` record and no
/// transaction is open there.
async fn caught_up(client: &Client) -> bool {
    let tps = support::input_partitions(&[topics::POSTFIX_LOG], PARTITIONS);
    let Ok(committed) = client.fetch_offsets("bounces", &tps).await else {
        return false;
    };
    for (tp, c) in tps.iter().zip(committed) {
        let Ok(f) = client
            .fetch(
                &tp.topic,
                tp.partition,
                c.offset.unwrap_or(0),
                &FetchOptions::default(),
            )
            .await
        else {
            return false;
        };
        if !f.records.is_empty() || f.last_stable_offset < f.high_watermark {
            return false;
        }
    }
    true
}

/// Waits until `mails` mails have their status and the group caught up; returns the statuses.
async fn settle(broker: &Broker, mails: usize, what: &str) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = broker.client().await;
        let got = sent(&c).await;
        if got.len() >= mails && caught_up(&c).await {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {mails} mails have a status after 60 s",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Restarts the broker with `failpoint` armed (`None`: disarmed).
fn restart(broker: &mut Broker, failpoint: Option<&str>) {
    broker.set_env("SPOOL_FAILPOINTS", failpoint);
    tokio::task::block_in_place(|| broker.restart());
}

/// Waits until the armed broker died at its failpoint.
async fn wait_dead(broker: &mut Broker, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker.is_running() {
        assert!(
            Instant::now() < deadline,
            "{what}: the failpoint was not reached within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts each mail of `0..mails` has exactly one `sent` status.
fn assert_once(got: &BTreeMap<String, usize>, mails: usize, what: &str) {
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{what}: {} mails have more than one status, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    let want: std::collections::BTreeSet<String> = (0..mails).map(|i| format!("m{i}")).collect();
    let have: std::collections::BTreeSet<String> = got.keys().cloned().collect();
    support::assert_same_set(&format!("{what}: mails with a status"), &have, &want);
}

async fn setup() -> (Broker, tempfile::TempDir) {
    let broker = Broker::start();
    let client = broker.client().await;
    publish::ensure_topics(&client, Some(PARTITIONS))
        .await
        .unwrap();
    (broker, tempfile::tempdir().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailer_commit_crashes() {
    let (mut broker, dir) = setup().await;
    let log = dir.path().join("maillog");
    std::fs::write(&log, "").unwrap();
    let mut p = bounces(dir.path(), &broker.addr(), log.to_str().unwrap(), 20);
    p.start();
    assert!(
        p.wait_ready(Duration::from_secs(60)),
        "bounces never got ready"
    );
    let mut mails = 0;
    let write = |from: usize, to: usize| {
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        for i in from..to {
            for l in mail_lines(i) {
                writeln!(f, "{l}").unwrap();
            }
        }
    };
    for fp in FAILPOINTS {
        let what = format!("tailer, {fp}");
        restart(&mut broker, Some(fp));
        write(mails, mails + MAILS);
        mails += MAILS;
        wait_dead(&mut broker, &what).await;
        restart(&mut broker, None);
        let got = settle(&broker, mails, &what).await;
        assert_once(&got, mails, &what);
    }
    // Each line on postfix-log once: nothing published twice, nothing skipped.
    let at = published_lines(&broker.client().await).await;
    let twice = at.values().filter(|n| **n > 1).count();
    assert_eq!(
        twice, 0,
        "log lines published more than once on postfix-log"
    );
    assert_eq!(at.len(), mails * 3, "every log line published");
    assert!(p.running(), "bounces exited: {}", p.log_since_start());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_commit_crashes() {
    let (mut broker, dir) = setup().await;
    // Its first commit comes 300 ms after its first input: every input is acknowledged by then.
    let mut p = bounces(dir.path(), &broker.addr(), "", 300);
    p.start();
    assert!(
        p.wait_ready(Duration::from_secs(60)),
        "bounces never got ready"
    );
    let mut mails = 0;
    let mut offset = 0u64;
    for fp in FAILPOINTS {
        let what = format!("handler, {fp}");
        restart(&mut broker, Some(fp));
        // The records the tailer would have written for these lines.
        let c = broker.client().await;
        let producer = publish::producer(&c);
        let mut acks = Vec::new();
        for i in mails..mails + MAILS {
            for l in mail_lines(i) {
                offset += l.len() as u64 + 1;
                let line = parse(&l);
                let qid = line.qid().expect("a queue id").to_owned();
                let rec = LogRecord {
                    line,
                    at: Position { inode: 1, offset },
                    read_ms: 0,
                    source: "mta1".into(),
                };
                let tp = TopicPartition::new(
                    topics::POSTFIX_LOG,
                    spool_client::partitioner::partition_for_key(qid.as_bytes(), PARTITIONS),
                );
                let r =
                    ProducerRecord::new(serde_json::to_vec(&rec).unwrap()).key(Bytes::from(qid));
                acks.push(producer.send_to(&tp.topic, tp.partition, r).await.unwrap());
            }
        }
        for a in acks {
            a.await.unwrap();
        }
        producer.close().await;
        mails += MAILS;
        wait_dead(&mut broker, &what).await;
        restart(&mut broker, None);
        let got = settle(&broker, mails, &what).await;
        assert_once(&got, mails, &what);
    }
    assert!(p.running(), "bounces exited: {}", p.log_since_start());
}

/// Postfix log lines on `postfix-log` (read committed) by their position in the file.
async fn published_lines(client: &Client) -> BTreeMap<(u64, u64), usize> {
    let mut at: BTreeMap<(u64, u64), usize> = BTreeMap::new();
    for r in read_all(client, topics::POSTFIX_LOG).await {
        let rec: LogRecord = serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
        *at.entry((rec.at.inode, rec.at.offset)).or_default() += 1;
    }
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stress (1-2 minutes): random kills of the broker and the process while the log grows"]
async fn broker_kills_while_the_log_grows() {
    let (mut broker, dir) = setup().await;
    let log = dir.path().join("maillog");
    std::fs::write(&log, "").unwrap();
    let mut p = bounces(dir.path(), &broker.addr(), log.to_str().unwrap(), 50);
    p.start();
    assert!(
        p.wait_ready(Duration::from_secs(60)),
        "bounces never got ready"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = {
        let (stop, written, log) = (stop.clone(), written.clone(), log.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..5 {
                    for l in mail_lines(i) {
                        writeln!(f, "{l}").unwrap();
                    }
                    i += 1;
                }
                written.store(i, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let kills: usize = std::env::var("CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(200 + rand(800))).await;
        let what = rand(3);
        if what != 1 {
            tokio::task::block_in_place(|| broker.kill());
            tokio::time::sleep(Duration::from_millis(rand(400))).await;
            restart(&mut broker, None);
        }
        if what != 0 {
            tokio::time::sleep(Duration::from_millis(rand(300))).await;
            p.kill();
            tokio::time::sleep(Duration::from_millis(rand(300))).await;
            p.start();
        }
        let c = broker.client().await;
        let got = sent(&c).await;
        let twice = got.values().filter(|n| **n > 1).count();
        let lines = published_lines(&c).await;
        let ltwice = lines.values().filter(|n| **n > 1).count();
        eprintln!(
            "kill {k}: {} mails written, {} with a status, {twice} twice; {} lines published, {ltwice} twice",
            written.load(std::sync::atomic::Ordering::Relaxed),
            got.len(),
            lines.len()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let mails = written.load(std::sync::atomic::Ordering::Relaxed);
    let got = settle(&broker, mails, "stress").await;
    let c = broker.client().await;
    let lines = published_lines(&c).await;
    let ltwice: Vec<_> = lines.iter().filter(|(_, n)| **n > 1).take(5).collect();
    eprintln!(
        "stress: {mails} mails, {} lines published, twice: {ltwice:?}; bounces log:\n{}",
        lines.len(),
        std::fs::read_to_string(dir.path().join("bounces.log")).unwrap_or_default()
    );
    assert_once(&got, mails, "stress");
    assert!(ltwice.is_empty(), "lines published twice");
}
