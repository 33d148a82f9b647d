//! The producer: compression × acks, batching, key partitioning, backpressure, retries across
//! a broker restart, errors.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use spool_client::partitioner::partition_for_key;
use spool_client::{
    Acks, Backoff, Client, Compression, Error, FetchOptions, ProducerConfig, ProducerRecord,
    Record, TopicSettings,
};

use crate::broker::Broker;
use crate::create;

/// Reads `n` records of a partition from offset 0 with `fetch`, waiting for them to appear.
async fn read_all(c: &Client, topic: &str, partition: u32, n: usize) -> Vec<Record> {
    let mut out = Vec::new();
    let mut offset = 0;
    let opts = FetchOptions {
        min_bytes: 1,
        max_wait: Duration::from_millis(500),
        ..FetchOptions::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} records appeared",
            out.len()
        );
        let f = c.fetch(topic, partition, offset, &opts).await.unwrap();
        offset = f.next_offset;
        out.extend(f.records);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_and_acks() {
    let broker = Broker::start();
    let c = broker.client().await;
    const N: usize = 300;
    let value = Bytes::from(vec![b'x'; 1000]); // compressible
    for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
        for acks in [Acks::None, Acks::Written, Acks::Durable] {
            let topic = format!("t-{compression:?}-{acks:?}").to_lowercase();
            create(&c, &topic, 1).await;
            let producer = c.producer(ProducerConfig {
                compression,
                acks,
                linger: Duration::from_millis(20),
                batch_bytes: 64 << 10,
                ..ProducerConfig::default()
            });
            let mut futs = Vec::new();
            for i in 0..N {
                let r = ProducerRecord::new(value.clone())
                    .key(format!("k{i}"))
                    .header("i", i.to_string())
                    .timestamp_ms(1_700_000_000_000 + i as i64);
                futs.push(producer.send_to(&topic, 0, r).await.unwrap());
            }
            producer.flush().await;
            let mut offsets = Vec::new();
            for f in futs {
                let m = f.await.unwrap();
                assert_eq!((&*m.topic, m.partition), (topic.as_str(), 0));
                offsets.push(m.offset);
            }
            if acks == Acks::None {
                assert!(
                    offsets.iter().all(Option::is_none),
                    "acks=none reports no offsets"
                );
            } else {
                let want: Vec<_> = (0..N as u64).map(Some).collect();
                assert_eq!(offsets, want, "{topic}: dense offsets in send order");
            }
            let stats = producer.stats();
            assert_eq!(stats.records_acked, N as u64);
            assert!(
                stats.batches_sent < N as u64 / 4,
                "{topic}: records were batched: {stats:?}"
            );
            producer.close().await;

            let records = read_all(&c, &topic, 0, N).await;
            assert_eq!(records.len(), N);
            {
                // Every acks value keeps the send order (acks=none only leaves out offsets).
                for (i, r) in records.iter().enumerate() {
                    assert_eq!(r.offset, i as u64);
                    assert_eq!(r.key.as_deref(), Some(format!("k{i}").as_bytes()));
                    assert_eq!(r.timestamp_ms, 1_700_000_000_000 + i as i64);
                    assert_eq!(r.headers.len(), 1);
                    assert_eq!(
                        r.headers[0].value.as_deref(),
                        Some(i.to_string().as_bytes())
                    );
                }
            }
            assert!(records.iter().all(|r| r.value.as_ref() == Some(&value)));
            let keys: HashSet<_> = records.iter().map(|r| r.key.clone()).collect();
            assert_eq!(keys.len(), N, "{topic}: every record exactly once");

            let size = c.describe_topic(&topic).await.unwrap().partitions[0].size_bytes;
            let raw = (N * value.len()) as u64;
            match compression {
                Compression::None => assert!(size > raw, "{topic}: {size} bytes on disk"),
                _ => assert!(size < raw / 4, "{topic}: compressed to {size} bytes"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_partitioning_round_robin_and_explicit() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "keyed", 4).await;
    let producer = c.producer(ProducerConfig::default());

    let mut by_key: BTreeMap<String, HashSet<u32>> = BTreeMap::new();
    let mut futs = Vec::new();
    for i in 0..200 {
        let key = format!("user-{}", i % 17);
        let f = producer
            .send("keyed", ProducerRecord::new("v").key(key.clone()))
            .await
            .unwrap();
        futs.push((key, f));
    }
    for (key, f) in futs {
        let m = f.await.unwrap();
        assert_eq!(
            m.partition,
            partition_for_key(key.as_bytes(), 4),
            "{key}: murmur2 partition"
        );
        by_key.entry(key).or_default().insert(m.partition);
    }
    assert!(
        by_key.values().all(|ps| ps.len() == 1),
        "a key always maps to one partition"
    );
    let used: HashSet<u32> = by_key.values().flatten().copied().collect();
    assert!(
        used.len() > 1,
        "17 keys spread over several partitions: {used:?}"
    );

    // Null keys: round robin, so 8 records hit each of the 4 partitions twice.
    let mut counts = [0; 4];
    let mut futs = Vec::new();
    for _ in 0..8 {
        futs.push(
            producer
                .send("keyed", ProducerRecord::new("no key"))
                .await
                .unwrap(),
        );
    }
    for f in futs {
        counts[f.await.unwrap().partition as usize] += 1;
    }
    assert_eq!(counts, [2, 2, 2, 2]);

    let m = producer
        .send_to("keyed", 3, ProducerRecord::new("x").key("user-1"))
        .await
        .unwrap();
    assert_eq!(
        m.await.unwrap().partition,
        3,
        "an explicit partition beats the key"
    );
    let e = producer
        .send_to("keyed", 4, ProducerRecord::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownPartition { partition: 4, .. }),
        "{e:?}"
    );

    // Partitions added later are seen after a refresh (explicit partition forces one).
    c.add_partitions("keyed", 6).await.unwrap();
    let m = producer
        .send_to("keyed", 5, ProducerRecord::new("x"))
        .await
        .unwrap();
    assert_eq!(m.await.unwrap().partition, 5);
    producer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_bounds_the_buffer() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "bp", 2).await;
    let buffer = 64 << 10;
    let producer = c.producer(ProducerConfig {
        buffer_bytes: buffer,
        batch_bytes: 16 << 10,
        ..ProducerConfig::default()
    });
    let value = Bytes::from(vec![7u8; 1024]);
    let mut futs = Vec::new();
    for i in 0..2000u32 {
        futs.push(
            producer
                .send_to("bp", i % 2, ProducerRecord::new(value.clone()))
                .await
                .unwrap(),
        );
        assert!(producer.stats().buffered_bytes <= buffer as u64);
    }
    for f in futs {
        f.await.unwrap();
    }
    let d = c.describe_topic("bp").await.unwrap();
    assert_eq!(
        d.partitions.iter().map(|p| p.high_watermark).sum::<u64>(),
        2000
    );
    producer.close().await;
    assert_eq!(producer.stats().buffered_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_across_a_broker_restart_keep_order() {
    let mut broker = Broker::start();
    let c = broker.client().await;
    create(&c, "retry", 1).await;
    let producer = c.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        batch_bytes: 256, // several batches, to check their order after the retries
        retry_backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(300),
        },
        delivery_timeout: Duration::from_secs(60),
        ..ProducerConfig::default()
    });
    for i in 0..10 {
        producer
            .send("retry", ProducerRecord::new(format!("{i:03}")))
            .await
            .unwrap()
            .await
            .unwrap();
    }

    broker.kill();
    let mut futs = Vec::new();
    for i in 10..60 {
        // Metadata is cached, so sending works while the broker is down.
        futs.push(
            producer
                .send("retry", ProducerRecord::new(format!("{i:03}")))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.restart();
    for (i, f) in futs.into_iter().enumerate() {
        let m = f.await.unwrap_or_else(|e| panic!("record {}: {e}", i + 10));
        assert_eq!(
            m.offset,
            Some(10 + i as u64),
            "in order, once (the broker refused, nothing was half-done)"
        );
    }
    assert!(producer.stats().retries > 0, "{:?}", producer.stats());
    producer.close().await;

    let values: Vec<String> = read_all(&c, "retry", 0, 60)
        .await
        .into_iter()
        .map(|r| String::from_utf8(r.value.unwrap().to_vec()).unwrap())
        .collect();
    let want: Vec<String> = (0..60).map(|i| format!("{i:03}")).collect();
    assert_eq!(values, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_blocks_then_times_out() {
    let mut broker = Broker::start();
    let c = broker.client().await;
    create(&c, "down", 1).await;
    let producer = c.producer(ProducerConfig {
        buffer_bytes: 8 << 10,
        max_block: Duration::from_millis(300),
        delivery_timeout: Duration::from_secs(1),
        retry_backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
        ..ProducerConfig::default()
    });
    producer
        .send("down", ProducerRecord::new("warm"))
        .await
        .unwrap()
        .await
        .unwrap();
    broker.kill();

    let value = Bytes::from(vec![1u8; 1024]);
    let mut futs = Vec::new();
    let err = loop {
        match producer
            .send("down", ProducerRecord::new(value.clone()))
            .await
        {
            Ok(f) => futs.push(f),
            Err(e) => break e,
        }
        assert!(futs.len() < 100, "the buffer never filled");
    };
    assert!(matches!(err, Error::BufferFull(_)), "{err:?}");
    let mut attempted = 0;
    for f in futs {
        let e = f.await.unwrap_err();
        let Error::DeliveryTimeout { last_error, .. } = &e else {
            panic!("{e:?}");
        };
        // A batch queued behind another of its partition may expire before its first attempt.
        if let Some(last) = last_error {
            assert!(last.is_retriable(), "{e:?}");
            attempted += 1;
        }
    }
    assert!(attempted > 0);
    assert_eq!(
        producer.stats().buffered_bytes,
        0,
        "failed records release their bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_errors() {
    let broker = Broker::start();
    let c = broker.client().await;
    let producer = c.producer(ProducerConfig {
        buffer_bytes: 1 << 20,
        ..ProducerConfig::default()
    });

    let e = producer
        .send("missing", ProducerRecord::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownTopic { topic, .. } if topic == "missing"),
        "{e:?}"
    );

    let e = producer
        .send("missing", ProducerRecord::new(vec![0u8; 2 << 20]))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::RecordTooLarge { .. }), "{e:?}");

    // A topic that only takes small batches: the broker refuses each batch (every record alone
    // is over the limit), every record fails with TooLarge, and nothing is retried.
    c.create_topic(
        "small",
        1,
        &TopicSettings {
            max_message_bytes: Some(4096),
            ..TopicSettings::default()
        },
    )
    .await
    .unwrap();
    let linger = c.producer(ProducerConfig {
        linger: Duration::from_millis(50),
        ..ProducerConfig::default()
    });
    let mut futs = Vec::new();
    for _ in 0..20 {
        futs.push(
            linger
                .send("small", ProducerRecord::new(vec![3u8; 5000]))
                .await
                .unwrap(),
        );
    }
    for f in futs {
        let e = f.await.unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
    }
    assert_eq!(linger.stats().retries, 0);
    // Producing to an internal topic is refused too.
    let e = c
        .produce_batch("__consumer_offsets", 0, one_batch(), Acks::Durable)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");

    // After close, sends fail; clones share the state.
    let clone = producer.clone();
    producer.close().await;
    let e = clone
        .send("small", ProducerRecord::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Closed), "{e:?}");
}

fn one_batch() -> Bytes {
    let mut b = spool_record::BatchBuilder::new(spool_record::Compression::None);
    b.push(1, None, Some(b"v"), &[]);
    b.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_level_produce_batch() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "raw", 1).await;
    let a = c
        .produce_batch("raw", 0, one_batch(), Acks::Durable)
        .await
        .unwrap();
    assert_eq!((a.base_offset, a.last_offset), (0, 0));
    let a = c
        .produce_batch("raw", 0, one_batch(), Acks::Written)
        .await
        .unwrap();
    assert_eq!(a.base_offset, 1);
    let mut corrupt = one_batch().to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let e = c
        .produce_batch("raw", 0, corrupt.into(), Acks::Durable)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidBatch { .. }), "{e:?}");
    let e = c
        .produce_batch("raw", 7, one_batch(), Acks::Durable)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::UnknownPartition { partition: 7, .. }),
        "{e:?}"
    );
}
