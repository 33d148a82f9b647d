//! ConsumeService and OffsetService end to end.

use std::time::Duration;

use spool_proto::v1;
use tokio_stream::StreamExt;

use crate::common::{Spoold, record};

async fn setup(b: &Spoold) {
    b.admin()
        .await
        .create_topic(v1::CreateTopicRequest {
            topic: "t".into(),
            partitions: 2,
            config: None,
        })
        .await
        .unwrap();
}

async fn send(b: &Spoold, partition: u32, values: &[&str], ts: i64) {
    let records = values
        .iter()
        .map(|v| v1::Record {
            timestamp_ms: ts,
            ..record(None, v)
        })
        .collect();
    let r = b
        .produce()
        .await
        .produce(v1::ProduceRequest {
            partitions: vec![v1::PartitionProduce {
                topic: "t".into(),
                partition,
                data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                    records,
                    compression: 0,
                })),
            }],
            acks: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].error.is_none(), "{r:?}");
}

fn sub(partition: u32, start: Option<v1::start_position::Position>) -> v1::SubscribePartition {
    v1::SubscribePartition {
        topic: "t".into(),
        partition,
        start: start.map(|p| v1::StartPosition { position: Some(p) }),
    }
}

fn values(d: &v1::PartitionData) -> Vec<String> {
    d.records
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect()
}

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_from_each_start_and_follow_live() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    setup(&b).await;
    send(&b, 0, &["a", "b"], 1000).await;
    send(&b, 0, &["c"], 2000).await;
    use v1::start_position::Position;
    let mut cons = b.consume().await;
    for (start, want) in [
        (Some(Position::Earliest(true)), vec!["a", "b", "c"]),
        (Some(Position::Offset(1)), vec!["a", "b", "c"]), // batch granularity: starts at its batch
        (Some(Position::TimestampMs(1500)), vec!["c"]),
    ] {
        let mut s = cons
            .subscribe(v1::SubscribeRequest {
                partitions: vec![sub(0, start)],
                max_bytes: 0,
                decode_records: true,
                heartbeat_interval_ms: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let msg = tokio::time::timeout(Duration::from_secs(10), s.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(v1::subscribe_response::Message::Data(d)) = msg.message {
                got.extend(values(&d));
            }
        }
        assert_eq!(got, want, "{start:?}");
    }
    // Latest (the default): only what is appended after subscribing, pushed without polling,
    // from both partitions; heartbeats while idle.
    let mut s = cons
        .subscribe(v1::SubscribeRequest {
            partitions: vec![sub(0, None), sub(1, None)],
            max_bytes: 0,
            decode_records: true,
            heartbeat_interval_ms: 200,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match first.message {
        Some(v1::subscribe_response::Message::Heartbeat(h)) => {
            assert_eq!(h.high_watermarks, vec![3, 0])
        }
        other => panic!("expected a heartbeat while idle, got {other:?}"),
    }
    send(&b, 1, &["live-1"], 3000).await;
    send(&b, 0, &["live-0"], 3000).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(v1::subscribe_response::Message::Data(d)) = msg.message {
            got.extend(
                values(&d)
                    .into_iter()
                    .map(|v| format!("{}:{v}", d.partition)),
            );
        }
    }
    got.sort();
    assert_eq!(got, vec!["0:live-0", "1:live-1"]);
    // Shutdown ends open subscriptions: spoold must stop promptly even with this stream open.
    let took = b.stop();
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with an open subscription"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .unwrap();
    match end {
        Some(Err(status)) => {
            assert_eq!(status.code(), tonic::Code::Unavailable);
            // Built through error.rs, with its ErrorInfo (it used to be a bare status).
            let info = tonic_types::StatusExt::get_details_error_info(&status);
            assert_eq!(
                info.map(|i| i.reason).as_deref(),
                Some("ERROR_CODE_SHUTTING_DOWN"),
                "{status:?}"
            );
        }
        // The connection may close before the status reaches the client.
        None => {}
        Some(Ok(m)) => panic!("unexpected message after shutdown: {m:?}"),
    }
}

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_long_poll_list_offsets_and_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    setup(&b).await;
    send(&b, 0, &["a", "b"], 1000).await;
    let mut cons = b.consume().await;
    // A long poll at the end returns when data arrives, not at max_wait.
    let b2_url = b.url();
    let producer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ch = tonic::transport::Channel::from_shared(b2_url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        v1::produce_service_client::ProduceServiceClient::new(ch)
            .produce(v1::ProduceRequest {
                partitions: vec![v1::PartitionProduce {
                    topic: "t".into(),
                    partition: 0,
                    data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                        records: vec![record(None, "c")],
                        compression: 0,
                    })),
                }],
                acks: 0,
            })
            .await
            .unwrap();
    });
    let t = std::time::Instant::now();
    let f = cons
        .fetch(v1::FetchRequest {
            partitions: vec![v1::PartitionFetch {
                topic: "t".into(),
                partition: 0,
                offset: 2,
                max_bytes: 0,
            }],
            min_bytes: 1,
            max_wait_ms: 10_000,
            decode_records: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    producer.await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "long poll woke on append ({:?})",
        t.elapsed()
    );
    assert_eq!(values(&f.partitions[0]), vec!["c"]);

    let ans = cons
        .list_offsets(v1::ListOffsetsRequest {
            queries: vec![
                v1::OffsetQuery {
                    topic: "t".into(),
                    partition: 0,
                    spec: v1::OffsetSpec::Earliest as i32,
                    timestamp_ms: 0,
                },
                v1::OffsetQuery {
                    topic: "t".into(),
                    partition: 0,
                    spec: v1::OffsetSpec::Latest as i32,
                    timestamp_ms: 0,
                },
                v1::OffsetQuery {
                    topic: "t".into(),
                    partition: 0,
                    spec: v1::OffsetSpec::Timestamp as i32,
                    timestamp_ms: 1000,
                },
                v1::OffsetQuery {
                    topic: "t".into(),
                    partition: 0,
                    spec: v1::OffsetSpec::Timestamp as i32,
                    timestamp_ms: i64::MAX,
                },
                v1::OffsetQuery {
                    topic: "x".into(),
                    partition: 0,
                    spec: 0,
                    timestamp_ms: 0,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .answers;
    assert_eq!((ans[0].offset, ans[1].offset, ans[2].offset), (0, 3, 0));
    assert!(!ans[3].found);
    assert_eq!(
        ans[4].error.as_ref().unwrap().code,
        v1::ErrorCode::UnknownTopic as i32
    );

    let f = cons
        .fetch(v1::FetchRequest {
            partitions: vec![v1::PartitionFetch {
                topic: "t".into(),
                partition: 0,
                offset: 99,
                max_bytes: 0,
            }],
            min_bytes: 0,
            max_wait_ms: 0,
            decode_records: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = f.partitions[0].error.as_ref().unwrap();
    assert_eq!(e.code, v1::ErrorCode::OffsetOutOfRange as i32);
    assert_eq!((e.log_start_offset, e.high_watermark), (0, 3));
    let err = cons
        .subscribe(v1::SubscribeRequest {
            partitions: vec![sub(9, None)],
            max_bytes: 0,
            decode_records: false,
            heartbeat_interval_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Subscribing past the end is an error now (as Fetch), with the bounds in the details.
    let err = cons
        .subscribe(v1::SubscribeRequest {
            partitions: vec![sub(0, Some(v1::start_position::Position::Offset(99)))],
            max_bytes: 0,
            decode_records: false,
            heartbeat_interval_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    let info = tonic_types::StatusExt::get_details_error_info(&err).expect("ErrorInfo");
    assert_eq!(
        info.metadata.get("high_watermark").map(String::as_str),
        Some("3")
    );
    b.stop();
}

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_restart_and_kill() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    setup(&b).await;
    let commit = |o: u64, meta: &str| v1::CommitOffsetsRequest {
        group: "g1".into(),
        offsets: vec![
            v1::OffsetCommit {
                topic: "t".into(),
                partition: 0,
                offset: o,
                metadata: meta.into(),
            },
            v1::OffsetCommit {
                topic: "t".into(),
                partition: 1,
                offset: o + 1,
                metadata: String::new(),
            },
        ],
        ..Default::default()
    };
    let mut off = b.offsets().await;
    off.commit_offsets(commit(5, "first")).await.unwrap();
    off.commit_offsets(commit(7, "second")).await.unwrap();
    let err = off
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "g1".into(),
            offsets: vec![v1::OffsetCommit {
                topic: "nope".into(),
                partition: 0,
                offset: 1,
                metadata: String::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = off
        .commit_offsets(v1::CommitOffsetsRequest {
            group: String::new(),
            offsets: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    b.kill(); // SIGKILL: the commits were durable before the replies
    let b = Spoold::start(dir.path(), &[]);
    let mut off = b.offsets().await;
    let got = off
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "g1".into(),
            partitions: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .offsets;
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].offset, got[0].metadata.as_str()),
        (Some(7), "second")
    );
    assert_eq!(got[1].offset, Some(8));
    let none = off
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "other".into(),
            partitions: vec![v1::TopicPartition {
                topic: "t".into(),
                partition: 0,
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .offsets;
    assert_eq!(none[0].offset, None);
    b.stop();
    let b = Spoold::start(dir.path(), &[]);
    let got = b
        .offsets()
        .await
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "g1".into(),
            partitions: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .offsets;
    assert_eq!(got[0].offset, Some(7), "and after a clean restart");
    b.stop();
}

/// Issue 12: a Fetch spanning a damaged batch returns the intact batches before it (no
/// error), and the next Fetch (from its `next_offset`) fails with CORRUPTION; a Subscribe
/// delivers the same prefix, then ends with DATA_LOSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_batch_ends_reads_after_the_intact_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    setup(&b).await;
    for i in 0..4 {
        send(&b, 0, &[&format!("v{i}")], 1000).await;
    }
    b.stop(); // clean: the recovery point covers every batch, so the restart checks no CRC
    let seg = dir.path().join("t/0/00000000000000000000.log");
    let mut data = std::fs::read(&seg).unwrap();
    let mut pos = 0;
    for _ in 0..2 {
        let len = u32::from_be_bytes(data[pos + 8..pos + 12].try_into().unwrap()) as usize;
        pos += 12 + len;
    }
    data[pos + 40] ^= 0x40; // inside the third batch's CRC-covered part
    std::fs::write(&seg, &data).unwrap();

    let b = Spoold::start(dir.path(), &[]);
    let mut cons = b.consume().await;
    let fetch = |offset| v1::FetchRequest {
        partitions: vec![v1::PartitionFetch {
            topic: "t".into(),
            partition: 0,
            offset,
            max_bytes: 1 << 20,
        }],
        decode_records: true,
        ..Default::default()
    };
    let r = cons.fetch(fetch(0)).await.unwrap().into_inner();
    let d = &r.partitions[0];
    assert!(
        d.error.is_none(),
        "the prefix comes without an error: {d:?}"
    );
    assert_eq!(values(d), ["v0", "v1"]);
    assert_eq!(d.next_offset, 2);
    let r = cons.fetch(fetch(2)).await.unwrap().into_inner();
    let e = r.partitions[0].error.as_ref().expect("then the error");
    assert_eq!(e.code, v1::ErrorCode::Corruption as i32, "{e:?}");

    let mut s = cons
        .subscribe(v1::SubscribeRequest {
            partitions: vec![sub(0, Some(v1::start_position::Position::Earliest(true)))],
            decode_records: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(Some(Ok(m))) => {
                if let Some(v1::subscribe_response::Message::Data(d)) = m.message {
                    got.extend(values(&d));
                }
            }
            Ok(Some(Err(status))) => break status,
            other => panic!("the subscription must end with an error, got {other:?}"),
        }
    };
    assert_eq!(got, ["v0", "v1"], "the prefix before the error");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
}

/// A subscription waiting at the end of an `fsync = always` topic gets every batch produced
/// with `acks = written` (each made visible by the sync its writing thread runs once the
/// reply is handed back), in order and whole: small batches, and batches larger than a tail
/// read's cap (64 KiB, read on the subscription's own task), which arrive in one piece.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_subscription_gets_acks_written_fsync_always_batches_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let config = v1::TopicConfig {
        fsync_policy: v1::FsyncPolicy::Always as i32,
        ..Default::default()
    };
    b.create_topic_with("t", 1, Some(config)).await;
    let mut cons = b.consume().await;
    let mut s = cons
        .subscribe(v1::SubscribeRequest {
            partitions: vec![sub(0, None)],
            heartbeat_interval_ms: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A heartbeat first: the subscription now waits at the end of the log.
    let first = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            first.message,
            Some(v1::subscribe_response::Message::Heartbeat(_))
        ),
        "{first:?}"
    );
    let big = "x".repeat(200 << 10);
    let want: Vec<String> = (0..40)
        .map(|i| {
            if i % 10 == 5 {
                format!("{i}{big}")
            } else {
                format!("m{i}")
            }
        })
        .collect();
    let reqs: Vec<_> = want
        .iter()
        .enumerate()
        .map(|(id, v)| v1::ProduceStreamRequest {
            request_id: id as u64,
            partitions: vec![v1::PartitionProduce {
                topic: "t".into(),
                partition: 0,
                data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                    records: vec![record(None, v)],
                    compression: 0,
                })),
            }],
            acks: v1::Acks::Written as i32,
        })
        .collect();
    let mut prod = b.produce().await;
    let mut replies = prod
        .produce_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut answered = 0;
    while let Some(r) = replies.next().await {
        let r = r.unwrap();
        assert!(r.results[0].error.is_none(), "{r:?}");
        answered += 1;
    }
    assert_eq!(answered, want.len());
    let mut got: Vec<String> = Vec::new();
    while got.len() < want.len() {
        let msg = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("every acknowledged batch becomes visible")
            .unwrap()
            .unwrap();
        let Some(v1::subscribe_response::Message::Data(d)) = msg.message else {
            continue;
        };
        for batch in spool_log_engine::batch::split_batches(&d.record_batches) {
            for r in batch.unwrap().records(&Default::default()).unwrap() {
                let r = r.unwrap();
                assert_eq!(
                    r.offset,
                    got.len() as u64,
                    "offsets follow the stream's order"
                );
                got.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
            }
        }
    }
    assert_eq!(got, want);
    b.stop();
}

/// A subscription to a topic that is deleted ends promptly with UNKNOWN_TOPIC (NOT_FOUND,
/// with its ErrorInfo), even when a topic of the same name is created again and written to
/// (that is another topic: the client subscribes again). Before: it kept the deleted
/// partition, never ended, never saw the new topic's data, and sent heartbeats with the old
/// high watermark. A Fetch long poll on a partition deleted while it waits returns at once
/// with UNKNOWN_TOPIC for it (before: at its deadline, with no error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_to_a_deleted_topic_ends_with_unknown_topic() {
    use tonic_types::StatusExt;
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    setup(&b).await;
    send(&b, 0, &["a"], 1000).await;
    let mut cons = b.consume().await;
    let mut s = cons
        .subscribe(v1::SubscribeRequest {
            partitions: vec![sub(0, None), sub(1, None)],
            heartbeat_interval_ms: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Subscribed and idle at the end of the log: heartbeats.
    let first = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            first.message,
            Some(v1::subscribe_response::Message::Heartbeat(_))
        ),
        "{first:?}"
    );
    // A Fetch long poll waiting at the end of partition 1 (connected first, so that only
    // the call itself has to start within the sleep below).
    let ch = b.channel().await;
    let fetch = tokio::spawn(async move {
        let t = std::time::Instant::now();
        let r = v1::consume_service_client::ConsumeServiceClient::new(ch)
            .fetch(v1::FetchRequest {
                partitions: vec![v1::PartitionFetch {
                    topic: "t".into(),
                    partition: 1,
                    offset: 0,
                    max_bytes: 0,
                }],
                max_wait_ms: 20_000,
                min_bytes: 1,
                ..Default::default()
            })
            .await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let deleted = std::time::Instant::now();
    let mut admin = b.admin().await;
    admin
        .delete_topic(v1::DeleteTopicRequest { topic: "t".into() })
        .await
        .unwrap();
    setup(&b).await;
    send(&b, 0, &["new"], 2000).await;

    // One deadline for the whole wait: heartbeats (every 100 ms) must not extend it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let end = loop {
        let msg = tokio::time::timeout_at(deadline, s.next())
            .await
            .expect("the subscription ends within 3 s of the delete, not heartbeats for ever")
            .expect("a status, not a clean end");
        match msg {
            Ok(v1::SubscribeResponse {
                message: Some(v1::subscribe_response::Message::Data(d)),
            }) => panic!("data from a deleted topic's subscription: {d:?}"),
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    let took = deleted.elapsed();
    assert_eq!(end.code(), tonic::Code::NotFound, "{end:?}");
    let info = end.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "ERROR_CODE_UNKNOWN_TOPIC");
    assert_eq!(info.metadata["topic"], "t");
    assert!(end.message().contains("was deleted"), "{end:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    let (r, waited) = fetch.await.unwrap();
    let f = r.expect("the fetch answers").into_inner();
    let e = f.partitions[0]
        .error
        .as_ref()
        .expect("UNKNOWN_TOPIC for the deleted partition");
    assert_eq!(e.code, v1::ErrorCode::UnknownTopic as i32, "{e:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");

    // The new topic is served to a new subscription.
    let mut again = cons
        .subscribe(v1::SubscribeRequest {
            partitions: vec![sub(0, Some(v1::start_position::Position::Earliest(true)))],
            decode_records: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), again.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(v1::subscribe_response::Message::Data(d)) = msg.message {
            assert_eq!(values(&d), vec!["new"]);
            break;
        }
    }
}

/// A Fetch whose reply is full (its first partition fills `max_bytes`) and that waits for
/// more (`min_bytes`) answers UNKNOWN_TOPIC for a partition deleted meanwhile, at once. Before:
/// a full reply left that partition unread, so no error; its closed watch woke the long poll
/// at once, again and again, re-reading the first partition on the blocking pool until the
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_fetch_waiting_for_min_bytes_answers_a_deleted_partition_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    setup(&b).await;
    b.create_topic("u", 1).await;
    let value = "x".repeat(4000);
    send(&b, 0, &[value.as_str()], 1000).await;
    let ch = b.channel().await;
    let fetch = tokio::spawn(async move {
        let t = std::time::Instant::now();
        let r = v1::consume_service_client::ConsumeServiceClient::new(ch)
            .fetch(v1::FetchRequest {
                partitions: vec![
                    v1::PartitionFetch {
                        topic: "t".into(),
                        partition: 0,
                        offset: 0,
                        max_bytes: 0,
                    },
                    v1::PartitionFetch {
                        topic: "u".into(),
                        partition: 0,
                        offset: 0,
                        max_bytes: 0,
                    },
                ],
                // Room for t/0's batch only; never enough to return for min_bytes.
                max_bytes: 1000,
                min_bytes: 1 << 20,
                max_wait_ms: 5000,
                ..Default::default()
            })
            .await;
        (r, t.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.admin()
        .await
        .delete_topic(v1::DeleteTopicRequest { topic: "u".into() })
        .await
        .unwrap();
    let (r, waited) = fetch.await.unwrap();
    let f = r.expect("the fetch answers").into_inner();
    assert!(!f.partitions[0].record_batches.is_empty(), "{f:?}");
    let e = f.partitions[1]
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("UNKNOWN_TOPIC for u/0 after {waited:?}: {f:?}"));
    assert_eq!(e.code, v1::ErrorCode::UnknownTopic as i32, "{e:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
}
