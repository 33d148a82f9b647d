//! Idempotent producers against the real spoold: producer ids are unique across restarts, a
//! retried batch is acknowledged with its original offsets (also after kill -9), a gap is
//! refused, and the batching producer delivers exactly once through a broker crash.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use spool_client::{Acks, Backoff, Error, FetchOptions, ProducerConfig, ProducerRecord};
use spool_record::{BatchBuilder, Compression};

use crate::broker::Broker;
use crate::create;

fn batch(pid: i64, seq: i32, n: usize, tag: &str) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    b.producer(pid, 0, seq);
    for i in 0..n {
        b.push(1000, None, Some(format!("{tag}-{i}").as_bytes()), &[]);
    }
    b.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_acknowledged_with_the_original_offsets() {
    let mut broker = Broker::start();
    let c = broker.client().await;
    create(&c, "t", 1).await;
    let pid = c.init_producer_id().await.unwrap();
    assert_ne!(pid, c.init_producer_id().await.unwrap(), "ids are unique");

    let first = c
        .produce_batch("t", 0, batch(pid, 0, 3, "a"), Acks::Durable)
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = c
        .produce_batch("t", 0, batch(pid, 0, 3, "a"), Acks::Durable)
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.base_offset, again.last_offset),
        (first.base_offset, first.last_offset)
    );
    let gap = c
        .produce_batch("t", 0, batch(pid, 7, 1, "g"), Acks::Durable)
        .await
        .unwrap_err();
    assert!(matches!(gap, Error::OutOfOrderSequence { .. }), "{gap:?}");
    assert!(!gap.is_retriable());

    // kill -9: the acknowledged batch is durable, and its retry is still recognised.
    broker.restart();
    let c = broker.client().await;
    let after = c
        .produce_batch("t", 0, batch(pid, 0, 3, "a"), Acks::Durable)
        .await
        .unwrap();
    assert!(after.duplicate);
    assert_eq!(after.base_offset, first.base_offset);
    let next = c
        .produce_batch("t", 0, batch(pid, 3, 1, "b"), Acks::Durable)
        .await
        .unwrap();
    assert_eq!(next.base_offset, 3);
    // Ids handed out after the restart were never handed out before it.
    let later = c.init_producer_id().await.unwrap();
    assert!(later > pid + 1, "{later} after {pid}");
    let f = c.fetch("t", 0, 0, &FetchOptions::default()).await.unwrap();
    assert_eq!(f.records.len(), 4);
}

/// The producer keeps sending while the broker is killed and restarted: every record is
/// delivered, none twice (batches whose acknowledgement was lost are retried and recognised).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_delivers_exactly_once_through_a_broker_crash() {
    let mut broker = Broker::start();
    let addr = broker.addr();
    let c = broker.client().await;
    create(&c, "t", 2).await;
    let producer = c.producer(ProducerConfig {
        acks: Acks::Durable,
        linger: Duration::from_millis(2),
        batch_bytes: 4096,
        retry_backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        ..ProducerConfig::default()
    });
    const N: usize = 4000;
    let sender = tokio::spawn(async move {
        let mut futs = Vec::with_capacity(N);
        for i in 0..N {
            let r = ProducerRecord::new(format!("v{i}")).key(format!("k{}", i % 17));
            futs.push(producer.send("t", r).await.expect("send"));
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        producer.close().await;
        let mut failed = 0;
        for f in futs {
            if f.await.is_err() {
                failed += 1;
            }
        }
        (failed, producer.stats())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    broker.restart();
    let (failed, stats) = sender.await.unwrap();
    assert_eq!(failed, 0);
    assert!(
        stats.retries > 0,
        "the crash must have interrupted sending: {stats:?}"
    );

    let c = spool_client::Client::connect(addr).await.unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for p in 0..2 {
        let mut offset = 0;
        loop {
            let f = c
                .fetch("t", p, offset, &FetchOptions::default())
                .await
                .unwrap();
            if f.records.is_empty() {
                break;
            }
            offset = f.next_offset;
            for r in f.records {
                let v = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
                *seen.entry(v).or_default() += 1;
            }
        }
    }
    let dups: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicated: {dups:?}");
    assert_eq!(seen.len(), N, "every record delivered");
}

/// A batch the broker refuses for good (too large) leaves a hole in the partition's sequence;
/// the producer's next batch is refused as out of sequence, and the producer carries on under
/// a new producer id instead of failing every later record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_does_not_wedge_the_partition() {
    let broker = Broker::start();
    let c = broker.client().await;
    c.create_topic(
        "small",
        1,
        &spool_client::TopicSettings {
            max_message_bytes: Some(1024),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let producer = c.producer(ProducerConfig {
        linger: Duration::ZERO,
        ..ProducerConfig::default()
    });
    let ok = producer
        .send("small", ProducerRecord::new("first"))
        .await
        .unwrap();
    assert_eq!(ok.await.unwrap().offset, Some(0));
    let big = producer
        .send("small", ProducerRecord::new(vec![b'x'; 4000]))
        .await
        .unwrap();
    assert!(matches!(big.await, Err(Error::TooLarge { .. })));
    for i in 0..3 {
        let f = producer
            .send("small", ProducerRecord::new(format!("after-{i}")))
            .await
            .unwrap();
        assert_eq!(f.await.unwrap().offset, Some(1 + i));
    }
    producer.close().await;
}
