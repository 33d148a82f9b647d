//! Transactions against the real spoold: all-or-nothing visibility across topics for
//! read-committed readers (read-uncommitted sees everything), the last stable offset holding
//! readers back while a transaction is open, zombie fencing by a new instance, offsets
//! committed with a transaction, timeouts, and a broker crash mid-transaction.

use std::time::Duration;

use spool_client::{
    Error, FetchOptions, Isolation, OffsetCommit, ProducerRecord, TopicPartition,
    TransactionalConfig, TransactionalProducer, proto,
};

use crate::broker::Broker;
use crate::create;

/// Values readable from `topic`/`partition` at `isolation`, from offset 0.
async fn values(
    c: &spool_client::Client,
    topic: &str,
    partition: u32,
    iso: Isolation,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let f = c
            .fetch(
                topic,
                partition,
                offset,
                &FetchOptions {
                    isolation: iso,
                    ..FetchOptions::default()
                },
            )
            .await
            .unwrap();
        out.extend(
            f.records
                .iter()
                .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()),
        );
        if f.next_offset == offset {
            return out;
        }
        offset = f.next_offset;
    }
}

/// Waits (bounded) until every transaction on the partition is visibly decided: a commit's
/// markers become durable just after `commit` returns.
async fn settled(c: &spool_client::Client, topic: &str, partition: u32) {
    for _ in 0..500 {
        let f = c
            .fetch(topic, partition, 0, &FetchOptions::default())
            .await
            .unwrap();
        if f.last_stable_offset == f.high_watermark {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{topic}/{partition}: a transaction stays open");
}

fn rec(v: &str) -> ProducerRecord {
    ProducerRecord::new(v.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_abort_are_all_or_nothing_across_topics() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "a", 2).await;
    create(&c, "b", 1).await;
    let mut tx = TransactionalProducer::new(c.clone(), TransactionalConfig::new("t1"))
        .await
        .unwrap();
    let first = tx.producer();

    tx.begin().unwrap();
    tx.send("a", 0, rec("a0-1")).await.unwrap();
    tx.send("a", 1, rec("a1-1")).await.unwrap();
    tx.send("b", 0, rec("b0-1")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        tx.producer(),
        (first.0, first.1 + 1),
        "every end bumps the epoch"
    );

    tx.begin().unwrap();
    tx.send("a", 0, rec("a0-2")).await.unwrap();
    tx.send("b", 0, rec("b0-2")).await.unwrap();
    tx.flush().await.unwrap();
    // Written but not decided: read-committed readers stop at the last stable offset.
    let f = c.fetch("a", 0, 0, &FetchOptions::default()).await.unwrap();
    assert_eq!(
        f.last_stable_offset, 2,
        "the commit marker and the new batch hold it"
    );
    assert_eq!(values(&c, "a", 0, Isolation::ReadCommitted).await, ["a0-1"]);
    assert_eq!(
        values(&c, "a", 0, Isolation::ReadUncommitted).await,
        ["a0-1", "a0-2"]
    );
    tx.abort().await.unwrap();

    tx.begin().unwrap();
    tx.send("b", 0, rec("b0-3")).await.unwrap();
    tx.commit().await.unwrap();
    for (t, p) in [("a", 0), ("a", 1), ("b", 0)] {
        settled(&c, t, p).await;
    }

    assert_eq!(values(&c, "a", 0, Isolation::ReadCommitted).await, ["a0-1"]);
    assert_eq!(values(&c, "a", 1, Isolation::ReadCommitted).await, ["a1-1"]);
    assert_eq!(
        values(&c, "b", 0, Isolation::ReadCommitted).await,
        ["b0-1", "b0-3"]
    );
    assert_eq!(
        values(&c, "b", 0, Isolation::ReadUncommitted).await,
        ["b0-1", "b0-2", "b0-3"]
    );
    let f = c.fetch("b", 0, 0, &FetchOptions::default()).await.unwrap();
    assert_eq!(f.last_stable_offset, f.high_watermark);
    let listed = c.list_transactions().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        [
            proto::TxnState::CompleteCommit as i32,
            proto::TxnState::PrepareCommit as i32
        ]
        .contains(&listed[0].state)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_fences_the_old_one_and_aborts_its_transaction() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "t", 1).await;
    let mut old = TransactionalProducer::new(c.clone(), TransactionalConfig::new("same"))
        .await
        .unwrap();
    old.begin().unwrap();
    old.send("t", 0, rec("zombie-1")).await.unwrap();
    old.flush().await.unwrap();

    let mut new = TransactionalProducer::new(c.clone(), TransactionalConfig::new("same"))
        .await
        .unwrap();
    assert_eq!(new.producer().0, old.producer().0);
    assert!(new.producer().1 > old.producer().1);
    // The old instance's open transaction was aborted; its writes and commit are refused.
    old.send("t", 0, rec("zombie-2")).await.unwrap(); // buffered
    let err = old.commit().await.unwrap_err();
    assert!(matches!(err, Error::ProducerFenced { .. }), "{err:?}");
    new.begin().unwrap();
    new.send("t", 0, rec("live")).await.unwrap();
    new.commit().await.unwrap();
    settled(&c, "t", 0).await;
    assert_eq!(values(&c, "t", 0, Isolation::ReadCommitted).await, ["live"]);
}

/// A transactional batch held up between its registration in the transaction and its append
/// (a roll's fdatasync, preemption; here the broker's `produce-txn-before-append` delay point,
/// 1 s) while a new instance of its transactional id fences the old one. The append used to
/// land after the abort, at the fenced epoch, on a partition where the abort had written no
/// marker (the batch was not there yet): a transaction no one tracked, the partition's last
/// stable offset stuck for read-committed readers, and the new instance refused there until
/// a restart. The registration now holds the id until the append is done, so the new
/// instance's abort waits for it and covers the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_held_up_before_its_append_cannot_outlive_its_fenced_transaction() {
    let mut broker = Broker::start();
    broker.set_env("SPOOL_FAILPOINTS", Some("produce-txn-before-append@1"));
    tokio::task::block_in_place(|| broker.restart());
    let c = broker.client().await;
    create(&c, "t", 1).await;
    let mut old = TransactionalProducer::new(c.clone(), TransactionalConfig::new("same"))
        .await
        .unwrap();
    old.begin().unwrap();
    old.send("t", 0, rec("zombie")).await.unwrap();
    // Its write reaches the broker and waits at the delay point.
    let held = tokio::spawn(async move { old.flush().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut new = TransactionalProducer::new(c.clone(), TransactionalConfig::new("same"))
        .await
        .unwrap();
    // Appended under the old epoch and then aborted, or fenced: either way not visible.
    let flushed = held.await.unwrap();
    assert!(
        matches!(flushed, Ok(()) | Err(Error::ProducerFenced { .. })),
        "{flushed:?}"
    );
    new.begin().unwrap();
    new.send("t", 0, rec("live")).await.unwrap();
    new.commit().await.unwrap();
    settled(&c, "t", 0).await;
    assert_eq!(values(&c, "t", 0, Isolation::ReadCommitted).await, ["live"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_commit_with_the_transaction_or_not_at_all() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", 1).await;
    create(&c, "out", 1).await;
    let mut tx = TransactionalProducer::new(c.clone(), TransactionalConfig::new("proc"))
        .await
        .unwrap();
    let at = |offset| OffsetCommit {
        topic: "in".into(),
        partition: 0,
        offset,
        metadata: String::new(),
    };
    let committed = || async {
        c.fetch_offsets("g", &[TopicPartition::new("in", 0)])
            .await
            .unwrap()[0]
            .offset
    };
    tx.begin().unwrap();
    tx.send("out", 0, rec("x")).await.unwrap();
    tx.send_offsets("g", &[at(5)], None).await.unwrap();
    tx.abort().await.unwrap();
    assert_eq!(committed().await, None);
    tx.begin().unwrap();
    tx.send("out", 0, rec("y")).await.unwrap();
    tx.send_offsets("g", &[at(7)], None).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(committed().await, Some(7));
    assert_eq!(values(&c, "out", 0, Isolation::ReadCommitted).await, ["y"]);
}

/// CommitTxn on the wire: the offsets it carries are committed with the transaction (also one
/// with no records), a retry of a CommitTxn that went through gets the same answer and
/// commits nothing new, and a zombie's (an older epoch's) commits nothing; the last offsets
/// sent for a partition win (`send_offsets` keeps them until the commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_txn_carries_the_offsets_in_the_commit() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", 2).await;
    create(&c, "out", 1).await;
    let at = |partition, offset| OffsetCommit {
        topic: "in".into(),
        partition,
        offset,
        metadata: String::new(),
    };
    let committed = || async {
        let o = c
            .fetch_offsets(
                "g",
                &[TopicPartition::new("in", 0), TopicPartition::new("in", 1)],
            )
            .await
            .unwrap();
        (o[0].offset, o[1].offset)
    };
    let mut tx = TransactionalProducer::new(c.clone(), TransactionalConfig::new("ct"))
        .await
        .unwrap();
    // Through the producer: two calls, the later position of partition 0 wins.
    tx.begin().unwrap();
    tx.send("out", 0, rec("a")).await.unwrap();
    tx.send_offsets("g", &[at(0, 3), at(1, 4)], None)
        .await
        .unwrap();
    tx.send_offsets("g", &[at(0, 5)], None).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(committed().await, (Some(5), Some(4)));
    settled(&c, "out", 0).await;
    assert_eq!(values(&c, "out", 0, Isolation::ReadCommitted).await, ["a"]);
    // On the wire, offsets only (no record): committed, and the epoch bumped.
    let producer = tx.producer();
    let groups = |o: u64| {
        vec![spool_client::TxnOffsets {
            group: "g".into(),
            offsets: vec![at(1, o)],
            member: None,
        }]
    };
    let next = c.commit_txn("ct", producer, &groups(9)).await.unwrap();
    assert_eq!(next, (producer.0, producer.1 + 1));
    assert_eq!(committed().await, (Some(5), Some(9)));
    // Its retry: the same answer, and its (different) offsets are not added.
    assert_eq!(
        c.commit_txn("ct", producer, &groups(11)).await.unwrap(),
        next
    );
    assert_eq!(committed().await, (Some(5), Some(9)));
    // A zombie of an older epoch commits nothing.
    let zombie = (producer.0, producer.1 - 1);
    assert!(c.commit_txn("ct", zombie, &groups(13)).await.is_err());
    assert_eq!(committed().await, (Some(5), Some(9)));
    // The current epoch goes on as usual.
    c.commit_txn("ct", next, &groups(15)).await.unwrap();
    assert_eq!(committed().await, (Some(5), Some(15)));
}

/// Offsets the store would refuse (metadata over 4 KiB) are refused by CommitTxn and
/// AddOffsetsToTxn before anything is recorded: no commit decision that could never be
/// carried out, so the transactional id is not left stuck (before, such a decision was
/// written, its markers made the output readable, its offsets were refused, and every later
/// InitProducerId of the id failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_the_store_would_refuse_are_refused_before_the_decision() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", 1).await;
    create(&c, "out", 1).await;
    let at = |offset, metadata: String| OffsetCommit {
        topic: "in".into(),
        partition: 0,
        offset,
        metadata,
    };
    let committed = || async {
        c.fetch_offsets("g", &[TopicPartition::new("in", 0)])
            .await
            .unwrap()[0]
            .offset
    };
    let mut tx = TransactionalProducer::new(c.clone(), TransactionalConfig::new("big"))
        .await
        .unwrap();
    tx.begin().unwrap();
    tx.send("out", 0, rec("a")).await.unwrap();
    tx.flush().await.unwrap();
    let producer = tx.producer();
    let big = "m".repeat(4097);
    let groups = |o: u64, metadata: String| {
        vec![spool_client::TxnOffsets {
            group: "g".into(),
            offsets: vec![at(o, metadata)],
            member: None,
        }]
    };
    assert!(
        c.commit_txn("big", producer, &groups(3, big.clone()))
            .await
            .is_err()
    );
    assert!(
        c.add_offsets_to_txn("big", producer, "g", &[at(3, big)], None)
            .await
            .is_err()
    );
    assert_eq!(committed().await, None);
    // Nothing was decided: the transaction is still open, and commits with valid offsets.
    let next = c
        .commit_txn("big", producer, &groups(4, "ok".into()))
        .await
        .unwrap();
    assert_eq!(next, (producer.0, producer.1 + 1));
    assert_eq!(committed().await, Some(4));
    settled(&c, "out", 0).await;
    assert_eq!(values(&c, "out", 0, Isolation::ReadCommitted).await, ["a"]);
    // And the id is not stuck: a new instance initialises and commits.
    let mut again = TransactionalProducer::new(c.clone(), TransactionalConfig::new("big"))
        .await
        .unwrap();
    again.begin().unwrap();
    again.send("out", 0, rec("b")).await.unwrap();
    again.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_past_its_timeout_is_aborted_and_the_producer_goes_on() {
    let broker = Broker::start_with_config(|_| {
        Some("[transactions]\ndefault_timeout_ms = 300\nabort_check_interval_ms = 50\n".into())
    });
    let c = broker.client().await;
    create(&c, "t", 1).await;
    let mut cfg = TransactionalConfig::new("slow");
    cfg.transaction_timeout = Duration::ZERO; // the broker's default (300 ms)
    let mut tx = TransactionalProducer::new(c.clone(), cfg).await.unwrap();
    tx.begin().unwrap();
    tx.send("t", 0, rec("late")).await.unwrap();
    tx.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let f = c.fetch("t", 0, 0, &FetchOptions::default()).await.unwrap();
    assert_eq!(
        f.last_stable_offset, f.high_watermark,
        "the broker aborted it"
    );
    let err = tx.commit().await.unwrap_err();
    assert!(matches!(err, Error::TransactionTimedOut { .. }), "{err:?}");
    tx.abort().await.unwrap();
    tx.begin().unwrap();
    tx.send("t", 0, rec("next")).await.unwrap();
    tx.commit().await.unwrap();
    settled(&c, "t", 0).await;
    assert_eq!(values(&c, "t", 0, Isolation::ReadCommitted).await, ["next"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_crash_aborts_the_open_transaction() {
    let mut broker = Broker::start();
    let c = broker.client().await;
    create(&c, "t", 2).await;
    let mut tx = TransactionalProducer::new(c.clone(), TransactionalConfig::new("crash"))
        .await
        .unwrap();
    tx.begin().unwrap();
    tx.send("t", 0, rec("committed")).await.unwrap();
    tx.commit().await.unwrap();
    tx.begin().unwrap();
    tx.send("t", 0, rec("lost-0")).await.unwrap();
    tx.send("t", 1, rec("lost-1")).await.unwrap();
    tx.flush().await.unwrap();
    broker.restart();
    let c = broker.client().await;
    for p in 0..2 {
        let f = c.fetch("t", p, 0, &FetchOptions::default()).await.unwrap();
        assert_eq!(f.last_stable_offset, f.high_watermark, "partition {p}");
    }
    assert_eq!(
        values(&c, "t", 0, Isolation::ReadCommitted).await,
        ["committed"]
    );
    assert!(
        values(&c, "t", 1, Isolation::ReadCommitted)
            .await
            .is_empty()
    );
    // The id carries on with a new instance.
    let mut tx = TransactionalProducer::new(c.clone(), TransactionalConfig::new("crash"))
        .await
        .unwrap();
    tx.begin().unwrap();
    tx.send("t", 1, rec("after")).await.unwrap();
    tx.commit().await.unwrap();
    settled(&c, "t", 1).await;
    assert_eq!(
        values(&c, "t", 1, Isolation::ReadCommitted).await,
        ["after"]
    );
}

/// `write_behind`: full batches written in the background land in order and commit with the
/// transaction; a fenced instance's background write fails its flush, and nothing of it is
/// readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_keeps_order_and_reports_a_failed_write_at_flush() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "wb", 1).await;
    let cfg = TransactionalConfig {
        batch_bytes: 1,
        write_behind: true,
        ..TransactionalConfig::new("wb-1")
    };
    let mut tx = TransactionalProducer::new(c.clone(), cfg.clone())
        .await
        .unwrap();
    tx.begin().unwrap();
    let want: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
    for v in &want {
        tx.send("wb", 0, rec(v)).await.unwrap();
    }
    tx.commit().await.unwrap();
    settled(&c, "wb", 0).await;
    assert_eq!(values(&c, "wb", 0, Isolation::ReadCommitted).await, want);

    // A new instance fences this one: its next full batch is refused in the background,
    // and its flush says so.
    tx.begin().unwrap();
    let _new = TransactionalProducer::new(c.clone(), cfg).await.unwrap();
    let sent = match tx.send("wb", 0, rec("zombie")).await {
        Ok(()) => tx.flush().await,
        Err(e) => Err(e),
    };
    assert!(sent.is_err(), "a fenced instance's write went through");
    assert!(
        !values(&c, "wb", 0, Isolation::ReadUncommitted)
            .await
            .contains(&"zombie".to_owned())
    );
}

/// `write_behind` with several writes in flight (one per partition at most): every
/// partition's records land in order, and all of them commit with the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_with_several_writes_in_flight_keeps_each_partition_in_order() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "wbn", 4).await;
    let cfg = TransactionalConfig {
        batch_bytes: 1,
        write_behind: true,
        max_writes_in_flight: 3,
        ..TransactionalConfig::new("wbn-1")
    };
    let mut tx = TransactionalProducer::new(c.clone(), cfg).await.unwrap();
    tx.begin().unwrap();
    // Every record is a full batch; partitions interleave unevenly, so a partition's next
    // batch often finds its previous one (or the bound) still in flight.
    for i in 0..200u32 {
        let p = [0, 1, 2, 3, 0, 0, 1][i as usize % 7];
        tx.send("wbn", p, rec(&format!("p{p}-{i}"))).await.unwrap();
    }
    tx.commit().await.unwrap();
    for p in 0..4u32 {
        settled(&c, "wbn", p).await;
        let want: Vec<String> = (0..200u32)
            .filter(|i| [0, 1, 2, 3, 0, 0, 1][*i as usize % 7] == p)
            .map(|i| format!("p{p}-{i}"))
            .collect();
        assert_eq!(
            values(&c, "wbn", p, Isolation::ReadCommitted).await,
            want,
            "partition {p}"
        );
    }
}

/// `send_keyed` describes a topic again once its partition count is `metadata_max_age` old:
/// after partitions were added, keyed records hash over the new count (as the plain
/// producer's), instead of over the count first seen, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_keyed_hashes_over_added_partitions_once_its_count_is_stale() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "keyed", 1).await;
    let cfg = TransactionalConfig {
        metadata_max_age: Duration::from_millis(200),
        ..TransactionalConfig::new("keyed-1")
    };
    let mut tx = TransactionalProducer::new(c.clone(), cfg).await.unwrap();
    // A key that hashes to a partition other than 0 over 4 partitions.
    let key = (0..100)
        .map(|i| format!("k{i}"))
        .find(|k| spool_client::partitioner::partition_for_key(k.as_bytes(), 4) != 0)
        .unwrap();
    let want = spool_client::partitioner::partition_for_key(key.as_bytes(), 4);
    tx.begin().unwrap();
    tx.send_keyed("keyed", rec("before").key(key.clone()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    c.add_partitions("keyed", 4).await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    tx.begin().unwrap();
    tx.send_keyed("keyed", rec("after").key(key.clone()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    settled(&c, "keyed", want).await;
    settled(&c, "keyed", 0).await;
    assert_eq!(
        values(&c, "keyed", 0, Isolation::ReadCommitted).await,
        ["before"]
    );
    assert_eq!(
        values(&c, "keyed", want, Isolation::ReadCommitted).await,
        ["after"],
        "{key} hashes to partition {want} of 4"
    );
}

/// A record is never packed into a partition's open batch past `batch_bytes`: the open batch
/// is sent first. So two records that each fit the topic's `max_message_bytes`, but not
/// together, are both written (before, the second one joined the first's batch, and the
/// broker refused the pair as too large).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_fit_the_topic_alone_are_not_packed_past_the_batch_size() {
    let broker = Broker::start();
    let c = broker.client().await;
    let settings = spool_client::TopicSettings {
        max_message_bytes: Some(64 << 10),
        ..spool_client::TopicSettings::default()
    };
    c.create_topic("small", 1, &settings).await.unwrap();
    let cfg = TransactionalConfig {
        batch_bytes: 48 << 10,
        ..TransactionalConfig::new("small-1")
    };
    let mut tx = TransactionalProducer::new(c.clone(), cfg).await.unwrap();
    let big = |tag: &str| format!("{tag}{}", "x".repeat(40 << 10));
    tx.begin().unwrap();
    tx.send("small", 0, rec(&big("a"))).await.unwrap();
    tx.send("small", 0, rec(&big("b"))).await.unwrap();
    tx.commit().await.unwrap();
    settled(&c, "small", 0).await;
    assert_eq!(
        values(&c, "small", 0, Isolation::ReadCommitted).await,
        [big("a"), big("b")]
    );
}

/// A partition's batch is capped at the topic's `max_message_bytes` when that is below
/// `batch_bytes` (default 1 MiB): records that each fit a 64 KiB topic are written, however
/// many one transaction sends (before, three 30 KiB records were packed into one 90 KiB
/// batch the broker refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_capped_at_a_topic_limit_below_the_batch_size() {
    let broker = Broker::start();
    let c = broker.client().await;
    let settings = spool_client::TopicSettings {
        max_message_bytes: Some(64 << 10),
        ..spool_client::TopicSettings::default()
    };
    c.create_topic("capped", 1, &settings).await.unwrap();
    let mut tx = TransactionalProducer::new(c.clone(), TransactionalConfig::new("capped-1"))
        .await
        .unwrap();
    let big = |i: usize| format!("{i}{}", "y".repeat(30 << 10));
    tx.begin().unwrap();
    for i in 0..3 {
        tx.send("capped", 0, rec(&big(i))).await.unwrap();
    }
    tx.commit().await.unwrap();
    settled(&c, "capped", 0).await;
    assert_eq!(
        values(&c, "capped", 0, Isolation::ReadCommitted).await,
        (0..3).map(big).collect::<Vec<_>>()
    );
}
