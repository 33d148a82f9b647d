//! Crashes of the transaction coordinator at each of its failpoints (reliability bar §5 #10:
//! kill the broker before and after each marker).
//!
//! Each case runs a transaction that writes to four partitions of two topics and commits
//! offsets for a group (no member), with `SPOOL_FAILPOINTS` armed so that `spoold` aborts at
//! the point, then ends it (commit or abort): the broker dies and the client gets an error
//! (an abort that carries no offsets is answered before the markers are durable: at the
//! points after that the broker dies once it answered). Every other rep of an abort first
//! records its offsets durably (AddOffsetsToTxn), which sends the abort down the path that
//! answers only once it is complete.
//! Every failpoint is past the durable `Prepare*` record, so the decision must be carried out
//! when the broker starts again (disarmed). Checked after the restart:
//! - commit: every record visible read-committed, the group's offsets are the transaction's;
//!   abort: nothing visible read-committed (but every record there read-uncommitted), the
//!   offsets as they were;
//! - last stable offset == high watermark on every touched partition (nothing left hanging);
//! - `list_transactions` shows the id `CompleteCommit` / `CompleteAbort`;
//! - the interrupted EndTxn, retried by the old producer, gets the decision's answer (the
//!   opposite decision is refused);
//! - a new `TransactionalProducer` with the same id commits a transaction.
//!
//! The failpoint is armed (restart) before the transaction starts: a restart with it open
//! would abort it. Each case runs `REPS` times on the same broker (the id and the logs grow).
//!
//! The same failpoints on the coordinator's other paths to an abort: a new instance's
//! InitProducerId aborting what the old one left open, and the timeout sweep.
//!
//! Two more cases without failpoints: the broker killed after the writes but before the end
//! (the transaction is aborted at restart and the old producer is fenced), and killed after
//! the offsets were added but before any record reached the broker (a bug this test found,
//! fixed: the transaction is aborted at restart and the producer fenced).

use std::time::{Duration, Instant};

use spool_client::{
    Backoff, Client, FetchOptions, Isolation, OffsetCommit, OffsetSpec, ProducerRecord,
    TopicPartition, TransactionalConfig, TransactionalProducer, proto,
};

use crate::broker::Broker;
use crate::{create, produce_n};

const ID: &str = "crash-txn";
const GROUP: &str = "crash-group";
const REPS: usize = 3;

/// The partitions every transaction touches.
fn tps() -> Vec<(String, u32)> {
    [("cx-a", 0), ("cx-a", 1), ("cx-b", 0), ("cx-b", 1)]
        .iter()
        .map(|(t, p)| (t.to_string(), *p))
        .collect()
}

/// The partitions the group has offsets for.
fn group_tps() -> Vec<TopicPartition> {
    vec![
        TopicPartition::new("cx-a", 0),
        TopicPartition::new("cx-a", 1),
        TopicPartition::new("cx-b", 1),
    ]
}

fn config(eager: bool) -> TransactionalConfig {
    TransactionalConfig {
        // Eager: every record goes to the broker at once, so the partitions hold the open
        // transaction before it ends.
        batch_bytes: if eager { 1 } else { 1 << 20 },
        max_attempts: 2,
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(50),
        },
        ..TransactionalConfig::new(ID)
    }
}

/// A broker with the topics, a few plain records and initial group offsets.
async fn setup() -> Broker {
    setup_with(None).await
}

/// [`setup`] with a broker config file.
async fn setup_with(config: Option<&str>) -> Broker {
    let broker = Broker::start_with_config(|_| config.map(str::to_owned));
    let c = broker.client().await;
    create(&c, "cx-a", 2).await;
    create(&c, "cx-b", 2).await;
    produce_n(&c, "cx-a", 0, 3, 1_000).await;
    produce_n(&c, "cx-b", 1, 2, 1_000).await;
    c.commit_offsets(
        GROUP,
        &[
            OffsetCommit {
                topic: "cx-a".into(),
                partition: 0,
                offset: 1,
                metadata: "before".into(),
            },
            OffsetCommit {
                topic: "cx-b".into(),
                partition: 1,
                offset: 2,
                metadata: "before".into(),
            },
        ],
    )
    .await
    .unwrap();
    broker
}

/// Values readable from a partition at `isolation`.
async fn values(c: &Client, topic: &str, partition: u32, isolation: Isolation) -> Vec<String> {
    let mut out = Vec::new();
    let mut offset = 0;
    let opts = FetchOptions {
        isolation,
        ..FetchOptions::default()
    };
    loop {
        let f = c.fetch(topic, partition, offset, &opts).await.unwrap();
        out.extend(
            f.records
                .iter()
                .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()),
        );
        if f.next_offset <= offset {
            return out;
        }
        offset = f.next_offset;
    }
}

/// The group's committed offsets, as (partition, offset) pairs.
async fn group_offsets(c: &Client) -> Vec<(TopicPartition, Option<u64>)> {
    c.fetch_offsets(GROUP, &group_tps())
        .await
        .unwrap()
        .into_iter()
        .map(|o| (TopicPartition::new(o.topic, o.partition), o.offset))
        .collect()
}

/// Every touched partition's last stable offset equals its high watermark.
async fn assert_nothing_hangs(c: &Client, what: &str) {
    let queries: Vec<_> = tps()
        .into_iter()
        .map(|(t, p)| (TopicPartition::new(t, p), OffsetSpec::Latest))
        .collect();
    // A commit's markers become durable (moving the LSO) just after EndTxn replies: give
    // them a moment before calling anything still open a hanging transaction.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (hw, lso) = loop {
        let hw = c.list_offsets(&queries).await.unwrap();
        let lso = c
            .list_offsets_with(&queries, Isolation::ReadCommitted)
            .await
            .unwrap();
        let settled = hw
            .iter()
            .zip(&lso)
            .all(|(h, l)| h.as_ref().unwrap().offset == l.as_ref().unwrap().offset);
        if settled || Instant::now() > deadline {
            break (hw, lso);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for (((tp, _), hw), lso) in queries.iter().zip(hw).zip(lso) {
        let (hw, lso) = (hw.unwrap().offset, lso.unwrap().offset);
        assert_eq!(
            lso, hw,
            "{what}: {}/{}: last stable offset {lso} below the high watermark {hw} \
             (a hanging transaction)",
            tp.topic, tp.partition
        );
    }
}

/// The id's state in `list_transactions`.
async fn txn_state(c: &Client) -> (proto::TxnState, Vec<proto::TopicPartition>) {
    let list = c.list_transactions().await.unwrap();
    let d = list
        .into_iter()
        .find(|d| d.transactional_id == ID)
        .unwrap_or_else(|| panic!("{ID} not in list_transactions"));
    (
        proto::TxnState::try_from(d.state).expect("a known state"),
        d.partitions,
    )
}

/// Waits (bounded) for the broker process to exit.
async fn wait_dead(broker: &mut Broker, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.is_running() {
        assert!(
            Instant::now() < deadline,
            "{what}: the broker is still running 10 s after the end was asked for"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes two records to each partition of [`tps`] (eagerly) and adds offsets for the group.
/// Returns the values and the offsets.
async fn fill(
    c: &Client,
    tx: &mut TransactionalProducer,
    tag: &str,
) -> (Vec<((String, u32), String)>, Vec<OffsetCommit>) {
    tx.begin().unwrap();
    let mut records = Vec::new();
    for i in 0..2 {
        for (t, p) in tps() {
            let v = format!("{tag}-{t}-{p}-{i}");
            tx.send(&t, p, ProducerRecord::new(v.clone()))
                .await
                .unwrap();
            records.push(((t, p), v));
        }
    }
    // Offsets that differ from every earlier commit: the partition's high watermark + 1000.
    let mut offsets = Vec::new();
    for tp in group_tps() {
        let hw = c
            .list_offset(&tp.topic, tp.partition, OffsetSpec::Latest)
            .await
            .unwrap()
            .offset;
        offsets.push(OffsetCommit {
            topic: tp.topic.clone(),
            partition: tp.partition,
            offset: hw + 1000,
            metadata: tag.to_owned(),
        });
    }
    tx.send_offsets(GROUP, &offsets, None).await.unwrap();
    (records, offsets)
}

/// Checks the records and offsets of a transaction after its end (`commit` or not); `in_log`:
/// its records reached the log (read uncommitted sees each once).
async fn assert_outcome(
    c: &Client,
    what: &str,
    commit: bool,
    in_log: bool,
    records: &[((String, u32), String)],
    offsets: &[OffsetCommit],
    offsets_before: &[(TopicPartition, Option<u64>)],
) {
    for (t, p) in tps() {
        let committed = values(c, &t, p, Isolation::ReadCommitted).await;
        let uncommitted = values(c, &t, p, Isolation::ReadUncommitted).await;
        for ((rt, rp), v) in records {
            if (rt, *rp) != (&t, p) {
                continue;
            }
            let n = committed.iter().filter(|x| *x == v).count();
            assert_eq!(
                n,
                usize::from(commit),
                "{what}: {v} is {n} times in {t}/{p} read committed: {committed:?}"
            );
            let n = uncommitted.iter().filter(|x| *x == v).count();
            assert!(
                n == 1 || (!in_log && n == 0),
                "{what}: {v} is {n} times in {t}/{p} read uncommitted: {uncommitted:?}"
            );
        }
    }
    let after = group_offsets(c).await;
    if commit {
        let expected: Vec<_> = offsets
            .iter()
            .map(|o| {
                (
                    TopicPartition::new(o.topic.clone(), o.partition),
                    Some(o.offset),
                )
            })
            .collect();
        assert_eq!(
            after, expected,
            "{what}: the group's offsets are not the committed transaction's"
        );
    } else {
        assert_eq!(
            after, offsets_before,
            "{what}: the aborted transaction changed the group's offsets"
        );
    }
    assert_nothing_hangs(c, what).await;
}

/// A new instance with the id works: it commits a transaction that readers see.
async fn assert_new_instance_works(c: &Client, what: &str) {
    let mut tx = TransactionalProducer::new(c.clone(), config(false))
        .await
        .unwrap_or_else(|e| panic!("{what}: a new instance: {e}"));
    tx.begin().unwrap();
    let v = format!("{what}-new-instance");
    tx.send("cx-b", 0, ProducerRecord::new(v.clone()))
        .await
        .unwrap();
    tx.commit()
        .await
        .unwrap_or_else(|e| panic!("{what}: the new instance's commit: {e}"));
    assert_nothing_hangs(c, &format!("{what} (new instance)")).await;
    let seen = values(c, "cx-b", 0, Isolation::ReadCommitted).await;
    assert_eq!(
        seen.iter().filter(|x| **x == v).count(),
        1,
        "{what}: the new instance's record read committed"
    );
}

/// One failpoint, one decision, `REPS` times.
async fn crash_at(failpoint: &str, commit: bool) {
    let mut broker = setup().await;
    for rep in 0..REPS {
        let what = format!(
            "{failpoint}/{}/{rep}",
            if commit { "commit" } else { "abort" }
        );
        broker.set_env("SPOOL_FAILPOINTS", Some(failpoint));
        tokio::task::block_in_place(|| broker.restart());
        let c = broker.client().await;
        let offsets_before = group_offsets(&c).await;
        let mut tx = TransactionalProducer::new(c.clone(), config(true))
            .await
            .unwrap();
        let (records, offsets) = fill(&c, &mut tx, &what).await;
        let old = tx.producer();
        // Odd reps of an abort first record the offsets durably in the transaction
        // (AddOffsetsToTxn on the wire, as a client without CommitTxn sends it), so both of
        // the coordinator's abort paths meet every failpoint: with offsets recorded the abort
        // is answered only once it is complete (`end_locked`); without, once its markers are
        // appended (`end_pipelined`).
        let offsets_recorded = !commit && rep % 2 == 1;
        if offsets_recorded {
            c.add_offsets_to_txn(ID, old, GROUP, &offsets, None)
                .await
                .unwrap_or_else(|e| panic!("{what}: AddOffsetsToTxn: {e}"));
        }
        let ended = if commit {
            tx.commit().await
        } else {
            tx.abort().await
        };
        // An abort that sent no offsets (the producer keeps them until a commit) is answered
        // once the markers are appended; the broker makes them durable and records the
        // completion after the reply: these two points come after it. The broker dies at them
        // all the same (`wait_dead`).
        let after_reply = !commit
            && !offsets_recorded
            && matches!(failpoint, "txn-after-markers" | "txn-before-complete");
        assert!(
            ended.is_err() || after_reply,
            "{what}: the end succeeded: the failpoint was not reached"
        );
        wait_dead(&mut broker, &what).await;

        broker.set_env("SPOOL_FAILPOINTS", None);
        tokio::task::block_in_place(|| broker.restart());
        let c = broker.client().await;
        assert_outcome(&c, &what, commit, true, &records, &offsets, &offsets_before).await;
        let (state, partitions) = txn_state(&c).await;
        let expected = if commit {
            proto::TxnState::CompleteCommit
        } else {
            proto::TxnState::CompleteAbort
        };
        assert_eq!(state, expected, "{what}: list_transactions");
        assert!(
            partitions.is_empty(),
            "{what}: a completed transaction lists partitions {partitions:?}"
        );
        // The interrupted EndTxn, retried: the decision's answer, the next epoch.
        let next = c
            .end_txn(ID, old, commit)
            .await
            .unwrap_or_else(|e| panic!("{what}: the retried EndTxn: {e}"));
        assert_eq!(
            next,
            (old.0, old.1 + 1),
            "{what}: the retried EndTxn's answer"
        );
        assert!(
            c.end_txn(ID, old, !commit).await.is_err(),
            "{what}: the opposite decision was accepted after the crash"
        );
        assert_new_instance_works(&c, &what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_prepare_commit() {
    crash_at("txn-after-prepare", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_prepare_abort() {
    crash_at("txn-after-prepare", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_markers_commit() {
    crash_at("txn-mid-markers", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_markers_abort() {
    crash_at("txn-mid-markers", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_markers_commit() {
    crash_at("txn-after-markers", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_markers_abort() {
    crash_at("txn-after-markers", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_complete_commit() {
    crash_at("txn-before-complete", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_complete_abort() {
    crash_at("txn-before-complete", false).await;
}

/// Killed after the writes and offsets, before the end: aborted at restart, the old instance
/// fenced, a new one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_end_aborts() {
    let mut broker = setup().await;
    for rep in 0..REPS {
        let what = format!("killed before the end/{rep}");
        let c = broker.client().await;
        let offsets_before = group_offsets(&c).await;
        let mut tx = TransactionalProducer::new(c.clone(), config(true))
            .await
            .unwrap();
        let (records, offsets) = fill(&c, &mut tx, &what).await;
        let old = tx.producer();
        tokio::task::block_in_place(|| broker.restart());
        let c = broker.client().await;
        assert_outcome(&c, &what, false, true, &records, &offsets, &offsets_before).await;
        let (state, _) = txn_state(&c).await;
        assert_eq!(
            state,
            proto::TxnState::CompleteAbort,
            "{what}: list_transactions"
        );
        // The old instance is a zombie now: its writes and its commit are refused.
        let zombie = format!("{what}-zombie");
        let sent = tx
            .send("cx-a", 1, ProducerRecord::new(zombie.clone()))
            .await;
        assert!(
            sent.is_err(),
            "{what}: a write of the old instance was accepted"
        );
        assert!(
            c.end_txn(ID, old, true).await.is_err(),
            "{what}: the old instance's commit was accepted"
        );
        assert!(
            !values(&c, "cx-a", 1, Isolation::ReadUncommitted)
                .await
                .contains(&zombie),
            "{what}: the zombie's record is in the log"
        );
        assert_nothing_hangs(&c, &what).await;
        assert_new_instance_works(&c, &what).await;
    }
}

/// Killed after AddOffsetsToTxn was acknowledged, before any record reached the broker (they
/// are buffered): the transaction's offsets live only in the coordinator's memory. The
/// producer then commits. All or nothing: either the commit fails (the transaction was lost
/// with the crash) or it commits the records *and* the offsets.
///
/// Found a bug (fixed): the commit succeeded, the records were committed and the offsets were
/// not. AddOffsetsToTxn was recorded in memory only; after the restart `__transaction_state`
/// still said `Empty` at the producer's epoch and no partition held the transaction, so
/// nothing was aborted, the epoch was not bumped, and the producer's flush + EndTxn ran as a
/// new transaction without the offsets. Now AddOffsetsToTxn records the transaction
/// (`Ongoing`) durably before its reply, and the restart aborts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_offsets_before_records() {
    let mut broker = setup().await;
    let c = broker.client().await;
    let offsets_before = group_offsets(&c).await;
    let mut tx = TransactionalProducer::new(c.clone(), config(false))
        .await
        .unwrap();
    let what = "killed after the offsets";
    // Buffered: nothing reaches the broker before the commit.
    let (records, offsets) = fill(&c, &mut tx, what).await;
    // The producer keeps its offsets for CommitTxn; AddOffsetsToTxn on the wire (what a
    // client without CommitTxn, or the fallback for a broker without it, sends) is the path
    // this test is about: acknowledged, so recorded durably as `Ongoing`.
    c.add_offsets_to_txn(ID, tx.producer(), GROUP, &offsets, None)
        .await
        .unwrap();
    tokio::task::block_in_place(|| broker.restart());
    let c = broker.client().await;
    let committed = tx.commit().await;
    // The restart aborted the recorded transaction and bumped the epoch: the commit fails.
    assert!(committed.is_err(), "{what}: {committed:?}");
    assert_outcome(
        &c,
        &format!("{what} (commit: {committed:?})"),
        committed.is_ok(),
        committed.is_ok(),
        &records,
        &offsets,
        &offsets_before,
    )
    .await;
    if committed.is_err() {
        tx.abort().await.ok();
    }
    assert_new_instance_works(&c, what).await;
}

/// The coordinator dies while a new instance's InitProducerId aborts what the old instance
/// left open: after the restart the old transaction is aborted, the old instance cannot
/// commit it, and the new instance (retrying its init) works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_while_a_new_instance_aborts_the_old() {
    let mut broker = setup().await;
    for failpoint in [
        "txn-after-prepare",
        "txn-mid-markers",
        "txn-before-complete",
    ] {
        let what = format!("new instance, {failpoint}");
        broker.set_env("SPOOL_FAILPOINTS", Some(failpoint));
        tokio::task::block_in_place(|| broker.restart());
        let c = broker.client().await;
        let offsets_before = group_offsets(&c).await;
        let mut old = TransactionalProducer::new(c.clone(), config(true))
            .await
            .unwrap();
        let (records, offsets) = fill(&c, &mut old, &what).await;
        let new = TransactionalProducer::new(c.clone(), config(true)).await;
        assert!(
            new.is_err(),
            "{what}: the new instance's init succeeded: the failpoint was not reached"
        );
        wait_dead(&mut broker, &what).await;
        broker.set_env("SPOOL_FAILPOINTS", None);
        tokio::task::block_in_place(|| broker.restart());
        let c = broker.client().await;
        assert_outcome(&c, &what, false, true, &records, &offsets, &offsets_before).await;
        let (state, _) = txn_state(&c).await;
        assert_eq!(
            state,
            proto::TxnState::CompleteAbort,
            "{what}: list_transactions"
        );
        assert!(
            c.end_txn(ID, old.producer(), true).await.is_err(),
            "{what}: the old instance committed a transaction a new instance aborted"
        );
        assert_new_instance_works(&c, &what).await;
    }
}

/// The coordinator dies while it aborts a transaction past its timeout: after the restart
/// the transaction is aborted; the producer's commit gets an error, its abort succeeds and
/// it goes on with the next transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_while_timing_out() {
    // Timeouts are looked for every 50 ms (not every second).
    let mut broker = setup_with(Some("[transactions]\nabort_check_interval_ms = 50\n")).await;
    for failpoint in ["txn-after-prepare", "txn-mid-markers"] {
        let what = format!("timeout, {failpoint}");
        broker.set_env("SPOOL_FAILPOINTS", Some(failpoint));
        tokio::task::block_in_place(|| broker.restart());
        let c = broker.client().await;
        let offsets_before = group_offsets(&c).await;
        let mut tx = TransactionalProducer::new(
            c.clone(),
            TransactionalConfig {
                // Long enough for `fill` on a loaded machine (counted from the first write).
                transaction_timeout: Duration::from_millis(1500),
                ..config(true)
            },
        )
        .await
        .unwrap();
        let (records, offsets) = fill(&c, &mut tx, &what).await;
        // The broker's sweep finds it past its timeout and dies.
        wait_dead(&mut broker, &what).await;
        broker.set_env("SPOOL_FAILPOINTS", None);
        tokio::task::block_in_place(|| broker.restart());
        let c = broker.client().await;
        assert_outcome(&c, &what, false, true, &records, &offsets, &offsets_before).await;
        assert!(
            tx.commit().await.is_err(),
            "{what}: a timed-out transaction was committed"
        );
        tx.abort()
            .await
            .unwrap_or_else(|e| panic!("{what}: aborting the timed-out transaction: {e}"));
        tx.begin().unwrap();
        let v = format!("{what}-next");
        tx.send("cx-a", 0, ProducerRecord::new(v.clone()))
            .await
            .unwrap();
        tx.commit()
            .await
            .unwrap_or_else(|e| panic!("{what}: the next transaction: {e}"));
        assert_nothing_hangs(&c, &what).await;
        assert!(
            values(&c, "cx-a", 0, Isolation::ReadCommitted)
                .await
                .contains(&v),
            "{what}: the next transaction's record"
        );
    }
}
