//! The consumer from each start position, commit and resume, fetch, list_offsets, out of range,
//! reconnecting across a broker restart.

use std::time::Duration;

use futures_util::StreamExt;
use spool_client::{
    Client, Consumer, ConsumerConfig, Error, FetchOptions, OffsetCommit, OffsetReset, OffsetSpec,
    ProducerConfig, ProducerRecord, Record, StartAt, TopicPartition,
};

use crate::broker::Broker;
use crate::{create, produce_n};

const TS: i64 = 1_700_000_000_000;

/// The next `n` records, failing the test if they take more than 10 s.
async fn take(c: &mut Consumer, n: usize) -> Vec<Record> {
    let mut out = Vec::new();
    while out.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(10), c.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {} of {n} records", out.len()))
            .expect("stream ended")
            .expect("record");
        out.push(r);
    }
    out
}

fn offsets(rs: &[Record]) -> Vec<u64> {
    rs.iter().map(|r| r.offset).collect()
}

fn fast() -> ConsumerConfig {
    ConsumerConfig {
        heartbeat_interval: Duration::from_millis(100),
        ..ConsumerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_positions() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "s", 1).await;
    produce_n(&c, "s", 0, 10, TS).await;

    let mut earliest = c.consumer(fast());
    earliest.subscribe("s", 0, StartAt::Earliest).await.unwrap();
    let rs = take(&mut earliest, 10).await;
    assert_eq!(offsets(&rs), (0..10).collect::<Vec<_>>());
    assert_eq!(rs[3].value.as_deref(), Some(&b"v3"[..]));
    assert_eq!(rs[3].key.as_deref(), Some(&b"k3"[..]));
    assert_eq!(rs[3].timestamp_ms, TS + 3000);
    assert_eq!((&*rs[3].topic, rs[3].partition), ("s", 0));
    assert_eq!(earliest.position("s", 0), Some(10));

    let mut at = c.consumer(fast());
    at.subscribe("s", 0, StartAt::Offset(4)).await.unwrap();
    assert_eq!(
        offsets(&take(&mut at, 6).await),
        (4..10).collect::<Vec<_>>()
    );

    let mut by_time = c.consumer(fast());
    by_time
        .subscribe("s", 0, StartAt::Timestamp(TS + 5500))
        .await
        .unwrap();
    assert_eq!(
        take(&mut by_time, 1).await[0].offset,
        6,
        "first record at or after the time"
    );

    // Latest: only what is appended after subscribing. Heartbeats (100 ms) keep the idle stream
    // alive meanwhile and report the high watermark.
    let mut latest = c.consumer(fast());
    latest.subscribe("s", 0, StartAt::Latest).await.unwrap();
    assert_eq!(latest.position("s", 0), Some(10));
    let waiting = tokio::spawn(async move {
        let rs = take(&mut latest, 3).await;
        (latest, rs)
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    produce_n(&c, "s", 0, 3, TS + 100_000).await;
    let (latest, rs) = waiting.await.unwrap();
    assert_eq!(offsets(&rs), vec![10, 11, 12]);
    assert_eq!(latest.lag("s", 0), Some(0));

    // A timestamp after every record: the high watermark.
    let mut future = c.consumer(fast());
    future
        .subscribe("s", 0, StartAt::Timestamp(TS + 10_000_000))
        .await
        .unwrap();
    assert_eq!(future.position("s", 0), Some(13));

    // As a Stream.
    let mut stream = c.consumer(fast());
    stream.subscribe("s", 0, StartAt::Earliest).await.unwrap();
    let rs: Vec<Record> = stream
        .into_stream()
        .take(13)
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(offsets(&rs), (0..13).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_partitions_in_one_subscription() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "multi", 3).await;
    let producer = c.producer(ProducerConfig::default());
    let mut futs = Vec::new();
    for i in 0..90 {
        futs.push(
            producer
                .send(
                    "multi",
                    ProducerRecord::new(format!("{i}")).key(format!("{i}")),
                )
                .await
                .unwrap(),
        );
    }
    let mut want = std::collections::BTreeMap::<u32, Vec<u64>>::new();
    for f in futs {
        let m = f.await.unwrap();
        want.entry(m.partition).or_default().push(m.offset.unwrap());
    }
    producer.close().await;

    let mut consumer = c.consumer(ConsumerConfig {
        max_bytes: 256, // several messages per partition
        ..fast()
    });
    consumer
        .subscribe_topic("multi", StartAt::Earliest)
        .await
        .unwrap();
    let mut got = std::collections::BTreeMap::<u32, Vec<u64>>::new();
    for r in take(&mut consumer, 90).await {
        got.entry(r.partition).or_default().push(r.offset);
    }
    assert_eq!(
        got, want,
        "every record once, in offset order per partition"
    );
    let positions = consumer.positions();
    assert_eq!(positions.len(), 3);
    for (tp, pos) in positions {
        assert_eq!(pos, want[&tp.partition].len() as u64);
    }

    assert!(consumer.unassign("multi", 1));
    assert!(!consumer.unassign("multi", 1));
    assert_eq!(consumer.positions().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_and_resume() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "g", 2).await;
    produce_n(&c, "g", 0, 10, TS).await;
    produce_n(&c, "g", 1, 4, TS).await;

    // Nothing committed yet: offset_reset decides.
    let mut fresh = c.consumer(ConsumerConfig::with_group("readers"));
    fresh.subscribe("g", 0, StartAt::Committed).await.unwrap();
    assert_eq!(fresh.position("g", 0), Some(0), "default reset: earliest");
    let mut strict = c.consumer(ConsumerConfig {
        offset_reset: OffsetReset::Error,
        ..ConsumerConfig::with_group("readers")
    });
    let e = strict
        .subscribe("g", 0, StartAt::Committed)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::NoCommittedOffset { topic, partition: 0 } if topic == "g"),
        "{e:?}"
    );
    let mut no_group = c.consumer(fast());
    let e = no_group
        .subscribe("g", 0, StartAt::Committed)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NoGroup), "{e:?}");
    assert!(matches!(no_group.commit().await, Err(Error::NoGroup)));

    // Read 6, commit, stop.
    let mut first = c.consumer(ConsumerConfig::with_group("readers"));
    first
        .subscribe_topic("g", StartAt::Committed)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.iter().filter(|r: &&Record| r.partition == 0).count() < 6 {
        seen.extend(take(&mut first, 1).await);
    }
    first.commit().await.unwrap();
    let committed = c
        .fetch_offsets(
            "readers",
            &[TopicPartition::new("g", 0), TopicPartition::new("g", 1)],
        )
        .await
        .unwrap();
    assert_eq!(committed[0].offset, first.position("g", 0));
    assert_eq!(committed[0].offset, Some(6));
    assert_eq!(committed[1].offset, first.position("g", 1));
    assert!(committed[0].commit_time_ms > 0);
    let p1 = first.position("g", 1).unwrap();
    drop(first);

    // A new consumer of the group resumes where the first stopped.
    let mut second = c.consumer(ConsumerConfig::with_group("readers"));
    second
        .subscribe_topic("g", StartAt::Committed)
        .await
        .unwrap();
    let rest = take(&mut second, (10 - 6) + (4 - p1 as usize)).await;
    let p0: Vec<u64> = rest
        .iter()
        .filter(|r| r.partition == 0)
        .map(|r| r.offset)
        .collect();
    assert_eq!(p0, vec![6, 7, 8, 9]);
    second.commit().await.unwrap();
    second.commit().await.unwrap(); // nothing moved: no request

    // Explicit commits with metadata, and reading everything a group committed.
    c.commit_offsets(
        "other",
        &[OffsetCommit {
            topic: "g".into(),
            partition: 1,
            offset: 2,
            metadata: "checkpoint 7".into(),
        }],
    )
    .await
    .unwrap();
    let all = c.fetch_offsets("other", &[]).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(
        (all[0].offset, all[0].metadata.as_str()),
        (Some(2), "checkpoint 7")
    );
    let none = c
        .fetch_offsets("other", &[TopicPartition::new("g", 0)])
        .await
        .unwrap();
    assert_eq!(none[0].offset, None);

    // Commits for partitions that do not exist are refused.
    let e = c
        .commit_offsets(
            "other",
            &[OffsetCommit {
                topic: "nope".into(),
                partition: 0,
                offset: 1,
                metadata: String::new(),
            }],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UnknownTopic { .. }), "{e:?}");
    let e = c.commit_offsets("", &[]).await.unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_and_list_offsets() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "f", 1).await;
    produce_n(&c, "f", 0, 10, TS).await;

    let f = c.fetch("f", 0, 3, &FetchOptions::default()).await.unwrap();
    assert_eq!(
        f.records.first().map(|r| r.offset),
        Some(3),
        "records before the offset dropped"
    );
    assert_eq!(f.records.last().map(|r| r.offset), Some(9));
    assert_eq!(
        (f.next_offset, f.high_watermark, f.log_start_offset),
        (10, 10, 0)
    );

    let f = c.fetch("f", 0, 10, &FetchOptions::default()).await.unwrap();
    assert!(f.records.is_empty());

    let e = c
        .fetch("f", 0, 15, &FetchOptions::default())
        .await
        .unwrap_err();
    let o = e.out_of_range().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(
        (
            o.topic.as_deref(),
            o.partition,
            o.offset,
            o.log_start_offset,
            o.high_watermark
        ),
        (Some("f"), Some(0), Some(15), Some(0), Some(10))
    );
    let e = c
        .fetch("nope", 0, 0, &FetchOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownTopic { topic, .. } if topic == "nope"),
        "{e:?}"
    );
    let e = c
        .fetch("f", 9, 0, &FetchOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::UnknownPartition { partition: 9, .. }),
        "{e:?}"
    );

    // Long poll: returns when data arrives, well before max_wait.
    let c2 = c.clone();
    let poll = tokio::spawn(async move {
        let opts = FetchOptions {
            min_bytes: 1,
            max_wait: Duration::from_secs(20),
            ..FetchOptions::default()
        };
        let started = std::time::Instant::now();
        let f = c2.fetch("f", 0, 10, &opts).await.unwrap();
        (f, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    produce_n(&c, "f", 0, 1, TS + 50_000).await;
    let (f, took) = poll.await.unwrap();
    assert_eq!(f.records.len(), 1);
    assert!(took < Duration::from_secs(10), "{took:?}");

    assert_eq!(
        c.list_offset("f", 0, OffsetSpec::Earliest)
            .await
            .unwrap()
            .offset,
        0
    );
    assert_eq!(
        c.list_offset("f", 0, OffsetSpec::Latest)
            .await
            .unwrap()
            .offset,
        11
    );
    let t = c
        .list_offset("f", 0, OffsetSpec::Timestamp(TS + 2500))
        .await
        .unwrap();
    assert_eq!((t.offset, t.found), (3, true));
    let t = c
        .list_offset("f", 0, OffsetSpec::Timestamp(TS + 99_000_000))
        .await
        .unwrap();
    assert_eq!((t.offset, t.found), (11, false));
    let answers = c
        .list_offsets(&[
            (TopicPartition::new("f", 0), OffsetSpec::Latest),
            (TopicPartition::new("nope", 0), OffsetSpec::Latest),
        ])
        .await
        .unwrap();
    assert_eq!(answers[0].as_ref().unwrap().offset, 11);
    assert!(
        matches!(answers[1], Err(Error::UnknownTopic { .. })),
        "{:?}",
        answers[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_and_unknown() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "o", 1).await;
    produce_n(&c, "o", 0, 5, TS).await;

    let mut strict = c.consumer(ConsumerConfig {
        offset_reset: OffsetReset::Error,
        ..fast()
    });
    let e = strict
        .subscribe("o", 0, StartAt::Offset(9))
        .await
        .unwrap_err();
    let o = e.out_of_range().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(
        (o.offset, o.log_start_offset, o.high_watermark),
        (Some(9), Some(0), Some(5))
    );
    assert_eq!(
        strict.position("o", 0),
        None,
        "a failed subscribe assigns nothing"
    );

    let mut to_latest = c.consumer(ConsumerConfig {
        offset_reset: OffsetReset::Latest,
        ..fast()
    });
    to_latest
        .subscribe("o", 0, StartAt::Offset(9))
        .await
        .unwrap();
    assert_eq!(to_latest.position("o", 0), Some(5));
    let mut to_earliest = c.consumer(fast());
    to_earliest
        .subscribe("o", 0, StartAt::Offset(9))
        .await
        .unwrap();
    assert_eq!(to_earliest.position("o", 0), Some(0));

    let e = strict
        .subscribe("nope", 0, StartAt::Earliest)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownTopic { topic, .. } if topic == "nope"),
        "{e:?}"
    );
    let e = strict
        .subscribe("o", 3, StartAt::Earliest)
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::UnknownPartition { partition: 3, .. }),
        "{e:?}"
    );
    let e = strict
        .subscribe_topic("nope", StartAt::Earliest)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UnknownTopic { .. }), "{e:?}");
    let mut idle = c.consumer(fast());
    assert!(
        idle.next().await.is_none(),
        "nothing assigned: the stream ends"
    );
}

/// The consumer survives a broker restart: it resubscribes from its positions, with neither
/// gaps nor repeats; and a topic recreated meanwhile (positions past its end) is caught by the
/// position check before resubscribing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_across_a_restart() {
    let mut broker = Broker::start();
    let c = broker.client().await;
    create(&c, "r", 1).await;
    create(&c, "gone", 1).await;
    produce_n(&c, "r", 0, 5, TS).await;
    produce_n(&c, "gone", 0, 5, TS).await;

    let mut consumer = c.consumer(ConsumerConfig {
        reconnect_backoff: spool_client::Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
        ..fast()
    });
    consumer.subscribe("r", 0, StartAt::Earliest).await.unwrap();
    assert_eq!(offsets(&take(&mut consumer, 5).await), vec![0, 1, 2, 3, 4]);
    let mut strict = c.consumer(ConsumerConfig {
        offset_reset: OffsetReset::Error,
        ..fast()
    });
    strict
        .subscribe("gone", 0, StartAt::Earliest)
        .await
        .unwrap();
    assert_eq!(take(&mut strict, 5).await.len(), 5);

    c.delete_topic("gone").await.unwrap();
    create(&c, "gone", 1).await;
    produce_n(&c, "gone", 0, 2, TS).await;

    broker.restart();
    produce_n(&c, "r", 0, 5, TS + 10_000).await;
    assert_eq!(offsets(&take(&mut consumer, 5).await), vec![5, 6, 7, 8, 9]);

    let e = tokio::time::timeout(Duration::from_secs(20), strict.next())
        .await
        .expect("no answer")
        .expect("stream ended")
        .unwrap_err();
    let o = e.out_of_range().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!((o.offset, o.high_watermark), (Some(5), Some(2)));
    strict.seek("gone", 0, StartAt::Earliest).await.unwrap();
    assert_eq!(offsets(&take(&mut strict, 2).await), vec![0, 1]);
}

/// A consumer keeps returning a dead broker's error only after its reconnect attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gives_up_after_max_reconnect_attempts() {
    let mut broker = Broker::start();
    let c: Client = broker.client().await;
    create(&c, "d", 1).await;
    let mut consumer = c.consumer(ConsumerConfig {
        max_reconnect_attempts: 2,
        reconnect_backoff: spool_client::Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(50),
        },
        ..fast()
    });
    consumer.subscribe("d", 0, StartAt::Earliest).await.unwrap();
    broker.kill();
    let e = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("gave up in time")
        .expect("an item")
        .unwrap_err();
    assert!(e.is_retriable(), "{e:?}");
}

/// A caller that polls `next` under a short timeout (as `spool tail` does, 100 ms) rides out a
/// broker outage of several seconds with the default reconnect settings: a cancelled `next`
/// neither restarts the backoff nor counts a failed attempt, so the ten attempts (about 26 s
/// of backoff) are not used up by ten polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_next_keeps_the_backoff_and_the_attempt_count() {
    let mut broker = Broker::start();
    let c = broker.client().await;
    create(&c, "o", 1).await;
    produce_n(&c, "o", 0, 2, TS).await;
    let mut consumer = c.consumer(fast());
    consumer.subscribe("o", 0, StartAt::Earliest).await.unwrap();
    assert_eq!(offsets(&take(&mut consumer, 2).await), vec![0, 1]);

    /// Polls as `spool tail` does for `d`; returns the records seen, panicking on an error.
    async fn poll_for(c: &mut Consumer, d: Duration) -> Vec<Record> {
        let until = tokio::time::Instant::now() + d;
        let mut got = Vec::new();
        while tokio::time::Instant::now() < until {
            match tokio::time::timeout(Duration::from_millis(100), c.next()).await {
                Err(_) => {}
                Ok(Some(Ok(r))) => got.push(r),
                Ok(Some(Err(e))) => panic!("next() gave up during the outage: {e:?}"),
                Ok(None) => panic!("stream ended"),
            }
        }
        got
    }

    broker.kill();
    assert!(
        poll_for(&mut consumer, Duration::from_secs(3))
            .await
            .is_empty()
    );
    broker.restart();
    produce_n(&c, "o", 0, 1, TS + 10_000).await;
    // The backoff after ~3 s of failures is at most a few seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.is_empty() && tokio::time::Instant::now() < deadline {
        got = poll_for(&mut consumer, Duration::from_millis(500)).await;
    }
    assert_eq!(offsets(&got), vec![2]);
}

/// A consumer assigned more partitions than one ListOffsets request may ask about (the
/// broker allows 4096 queries here; the bounds of 2100 partitions are 4200) resolves and
/// checks its positions in several requests instead of being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_partitions_are_resolved_in_several_requests() {
    let broker =
        Broker::start_with_config(|_| Some("[limits]\nmax_partitions_per_request = 4096\n".into()));
    let c = broker.client().await;
    create(&c, "big", 2100).await;
    produce_n(&c, "big", 2099, 1, TS).await;
    let mut consumer = c.consumer(fast());
    consumer
        .subscribe_topic("big", StartAt::Earliest)
        .await
        .unwrap();
    let got = take(&mut consumer, 1).await;
    assert_eq!((got[0].partition, got[0].offset), (2099, 0));
}
