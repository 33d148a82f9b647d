//! ProduceService end to end: both data forms, every acks level, and bad input.

use bytes::Bytes;
use spool_log_engine::{BatchBuilder, Compression};
use spool_proto::v1;
use tonic::Code;

use crate::common::{Spoold, record};

async fn topic(b: &Spoold, name: &str, partitions: u32) {
    b.create_topic(name, partitions).await;
}

fn batch_of(values: &[&str]) -> Bytes {
    let mut bb = BatchBuilder::new(Compression::Lz4);
    for v in values {
        bb.push(
            1_700_000_000_000,
            Some(b"k"),
            Some(v.as_bytes()),
            &[("h", Some(b"1"))],
        );
    }
    bb.finish().unwrap()
}

/// One uncompressed batch of `value`: what the runtime-thread path takes.
fn plain_batch(value: &str) -> Bytes {
    let mut bb = BatchBuilder::new(Compression::None);
    bb.push(1_700_000_000_000, Some(b"k"), Some(value.as_bytes()), &[]);
    bb.finish().unwrap()
}

fn pp(topic: &str, partition: u32, data: v1::partition_produce::Data) -> v1::PartitionProduce {
    v1::PartitionProduce {
        topic: topic.into(),
        partition,
        data: Some(data),
    }
}

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_every_form_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    topic(&b, "t", 2).await;
    let mut prod = b.produce().await;
    let list = v1::RecordList {
        records: vec![record(Some("a"), "one"), record(None, "two")],
        compression: v1::Compression::Zstd as i32,
    };
    for acks in [v1::Acks::Durable, v1::Acks::Written, v1::Acks::Unspecified] {
        let r = prod
            .produce(v1::ProduceRequest {
                partitions: vec![
                    pp(
                        "t",
                        0,
                        v1::partition_produce::Data::RecordBatch(batch_of(&["x", "y", "z"])),
                    ),
                    pp("t", 1, v1::partition_produce::Data::Records(list.clone())),
                ],
                acks: acks as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.results.len(), 2);
        for res in &r.results {
            assert!(res.error.is_none(), "{acks:?}: {res:?}");
        }
        assert_eq!(r.results[0].last_offset - r.results[0].base_offset, 2);
        assert_eq!(r.results[1].last_offset - r.results[1].base_offset, 1);
    }
    // acks=none: the reply carries no offsets; the data still arrives.
    let r = prod
        .produce(v1::ProduceRequest {
            partitions: vec![pp(
                "t",
                0,
                v1::partition_produce::Data::RecordBatch(batch_of(&["late"])),
            )],
            acks: v1::Acks::None as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.results[0].error.is_none());

    // Read back decoded through Fetch (waiting for the acks=none record).
    let mut cons = b.consume().await;
    let f = cons
        .fetch(v1::FetchRequest {
            partitions: vec![v1::PartitionFetch {
                topic: "t".into(),
                partition: 0,
                offset: 9,
                max_bytes: 0,
            }],
            min_bytes: 1,
            max_wait_ms: 5000,
            decode_records: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let p0 = &f.partitions[0];
    assert!(p0.error.is_none(), "{p0:?}");
    assert_eq!(p0.records.len(), 1);
    assert_eq!(p0.records[0].value.as_deref(), Some(&b"late"[..]));
    assert_eq!(p0.records[0].headers[0].key, "h");
    assert_eq!(p0.high_watermark, 10);
    // Raw batches come back byte for byte as stored (offsets assigned, CRC unchanged).
    let f = cons
        .fetch(v1::FetchRequest {
            partitions: vec![v1::PartitionFetch {
                topic: "t".into(),
                partition: 1,
                offset: 0,
                max_bytes: 1 << 20,
            }],
            min_bytes: 0,
            max_wait_ms: 0,
            decode_records: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let raw = &f.partitions[0].record_batches;
    let batches: Vec<_> = spool_log_engine::batch::split_batches(raw)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches.len(), 3);
    let recs: Vec<_> = batches[2]
        .records(&Default::default())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(recs[0].offset, 4);
    assert_eq!(recs[0].key.as_deref(), Some(&b"a"[..]));
    assert_eq!(recs[1].key, None);
    assert!(
        recs[0].timestamp > 1_700_000_000_000,
        "timestamp 0 means the broker's clock"
    );
    b.stop();
}

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    topic(&b, "t", 1).await;
    let mut prod = b.produce().await;
    let send = |data| v1::ProduceRequest {
        partitions: vec![pp("t", 0, data)],
        acks: 0,
    };
    let code_of = |r: &v1::ProduceResponse| r.results[0].error.as_ref().map(|e| e.code);

    let mut bad_crc = batch_of(&["x"]).to_vec();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 1;
    let cases: Vec<(v1::partition_produce::Data, v1::ErrorCode)> = vec![
        (
            v1::partition_produce::Data::RecordBatch(Bytes::from(bad_crc)),
            v1::ErrorCode::InvalidBatch,
        ),
        (
            v1::partition_produce::Data::RecordBatch(Bytes::from_static(b"garbage")),
            v1::ErrorCode::InvalidBatch,
        ),
        (
            v1::partition_produce::Data::RecordBatch(Bytes::from(vec![0xff; 4096])),
            v1::ErrorCode::InvalidBatch,
        ),
        (
            v1::partition_produce::Data::Records(v1::RecordList {
                records: vec![],
                compression: 0,
            }),
            v1::ErrorCode::InvalidRequest,
        ),
    ];
    for (data, want) in cases {
        let r = prod.produce(send(data)).await.unwrap().into_inner();
        assert_eq!(code_of(&r), Some(want as i32), "{r:?}");
    }
    // Over the topic's max_message_bytes (8 MiB default): refused as too large.
    let big = "v".repeat(9 << 20);
    let r = prod
        .produce(send(v1::partition_produce::Data::Records(v1::RecordList {
            records: vec![record(None, &big)],
            compression: 0,
        })))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code_of(&r), Some(v1::ErrorCode::TooLarge as i32), "{r:?}");
    // Over the request limit (64 MiB): refused by tonic before it is decoded.
    let huge = Bytes::from(vec![0u8; 65 << 20]);
    let err = prod
        .produce(send(v1::partition_produce::Data::RecordBatch(huge)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // Unknown topic / partition are per-partition errors.
    let r = prod
        .produce(v1::ProduceRequest {
            partitions: vec![
                pp(
                    "nope",
                    0,
                    v1::partition_produce::Data::RecordBatch(batch_of(&["x"])),
                ),
                pp(
                    "t",
                    7,
                    v1::partition_produce::Data::RecordBatch(batch_of(&["x"])),
                ),
                pp(
                    "t",
                    0,
                    v1::partition_produce::Data::RecordBatch(batch_of(&["ok"])),
                ),
            ],
            acks: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results[0].error.as_ref().unwrap().code,
        v1::ErrorCode::UnknownTopic as i32
    );
    assert_eq!(
        r.results[1].error.as_ref().unwrap().code,
        v1::ErrorCode::UnknownPartition as i32
    );
    assert!(r.results[2].error.is_none());
    assert_eq!(r.results[2].base_offset, 0, "nothing before it was written");
    // Writing to the internal topic is refused.
    let r = prod
        .produce(v1::ProduceRequest {
            partitions: vec![pp(
                "__consumer_offsets",
                0,
                v1::partition_produce::Data::RecordBatch(batch_of(&["x"])),
            )],
            acks: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.results[0].error.as_ref().unwrap().code,
        v1::ErrorCode::InvalidRequest as i32
    );
    // The broker is still fine.
    let d = b
        .admin()
        .await
        .describe_topic(v1::DescribeTopicRequest { topic: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.partitions[0].high_watermark, 1);
    b.stop();
}

/// On an `fsync = always` topic (the default): the broker's blocking path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_stream_pipelines_and_keeps_partition_order() {
    produce_stream_order_case(v1::FsyncPolicy::Always, false).await;
}

/// The same on an `fsync = never` topic: the async path (appends on the runtime thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_stream_keeps_partition_order_on_the_async_path() {
    produce_stream_order_case(v1::FsyncPolicy::Never, false).await;
}

/// Uncompressed pre-encoded batches on an `fsync = always` topic, two in three with
/// `acks = written`: those are appended and answered on the runtime thread, their sync run on
/// the blocking pool. Order kept, and every batch becomes visible with no later append to
/// carry it (each one's sync was asked for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_stream_written_batches_appended_on_the_runtime_thread_keep_order() {
    produce_stream_order_case(v1::FsyncPolicy::Always, true).await;
}

/// 300 requests on one stream (the reader decodes ahead of the writer), mixed acks, two
/// partitions: one reply each, per partition the offsets follow the stream's order, and
/// every record becomes visible. `batches`: uncompressed pre-encoded batches, two in three
/// with `acks = written` (else record lists, one in three `acks = written`).
async fn produce_stream_order_case(fsync: v1::FsyncPolicy, batches: bool) {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let config = v1::TopicConfig {
        fsync_policy: fsync as i32,
        ..Default::default()
    };
    b.create_topic_with("s", 2, Some(config)).await;
    let mut prod = b.produce().await;
    let n = 300u64;
    let reqs = (0..n).map(move |id| v1::ProduceStreamRequest {
        request_id: id,
        partitions: vec![pp(
            "s",
            (id % 2) as u32,
            if batches {
                v1::partition_produce::Data::RecordBatch(plain_batch(&format!("m{id}")))
            } else {
                v1::partition_produce::Data::Records(v1::RecordList {
                    records: vec![record(None, &format!("m{id}"))],
                    compression: 0,
                })
            },
        )],
        acks: if (batches && id % 3 != 2) || (!batches && id % 3 == 0) {
            v1::Acks::Written as i32
        } else {
            0
        },
    });
    let mut replies = prod
        .produce_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut by_id = std::collections::BTreeMap::new();
    while let Some(r) = tokio_stream::StreamExt::next(&mut replies).await {
        let r = r.unwrap();
        assert!(r.results[0].error.is_none(), "{r:?}");
        by_id.insert(r.request_id, r.results[0].base_offset);
    }
    assert_eq!(by_id.len() as u64, n, "one reply per request");
    // Per partition, offsets follow the stream's order.
    for part in 0..2u64 {
        let offsets: Vec<u64> = by_id
            .iter()
            .filter(|(id, _)| *id % 2 == part)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(offsets, (0..n / 2).collect::<Vec<_>>(), "partition {part}");
    }
    // Everything becomes visible (after its fdatasync on `fsync = always`), nothing more sent.
    let mut admin = b.admin().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let d = admin
            .describe_topic(v1::DescribeTopicRequest { topic: "s".into() })
            .await
            .unwrap()
            .into_inner();
        let hws: Vec<u64> = d.partitions.iter().map(|p| p.high_watermark).collect();
        if hws == [n / 2, n / 2] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every record became visible within 10 s: high watermarks {hws:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    b.stop();
}

/// A `ProduceStream` that ends with an error status (here a request with an unknown `acks`,
/// refused as a whole) first answers every request appended before it: tonic ends the reply
/// stream at its first error, so a status sent while earlier `acks = durable` requests still
/// waited for their fdatasync used to cut their replies off, though their records were in
/// the log (a client that never heard of them would send them again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_stream_answers_appended_requests_before_the_status_that_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let config = v1::TopicConfig {
        fsync_policy: v1::FsyncPolicy::Always as i32,
        ..Default::default()
    };
    b.create_topic_with("d", 1, Some(config)).await;
    let mut prod = b.produce().await;
    let n = 20u64;
    let mut reqs: Vec<v1::ProduceStreamRequest> = (0..n)
        .map(|id| v1::ProduceStreamRequest {
            request_id: id,
            partitions: vec![pp(
                "d",
                0,
                v1::partition_produce::Data::Records(v1::RecordList {
                    records: vec![record(None, &format!("m{id}"))],
                    compression: 0,
                }),
            )],
            acks: v1::Acks::Durable as i32,
        })
        .collect();
    reqs.push(v1::ProduceStreamRequest {
        request_id: n,
        partitions: vec![pp(
            "d",
            0,
            v1::partition_produce::Data::Records(v1::RecordList {
                records: vec![record(None, "refused")],
                compression: 0,
            }),
        )],
        acks: 99,
    });
    // Sent after the refused request: never written.
    reqs.push(v1::ProduceStreamRequest {
        request_id: n + 1,
        partitions: vec![pp(
            "d",
            0,
            v1::partition_produce::Data::Records(v1::RecordList {
                records: vec![record(None, "after")],
                compression: 0,
            }),
        )],
        acks: v1::Acks::Durable as i32,
    });
    let mut replies = prod
        .produce_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut answered = std::collections::BTreeSet::new();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match tokio_stream::StreamExt::next(&mut replies).await {
                Some(Ok(r)) => {
                    assert!(r.results[0].error.is_none(), "{r:?}");
                    assert!(answered.insert(r.request_id), "answered twice: {r:?}");
                }
                Some(Err(status)) => break status,
                None => panic!("the stream ended without the refused request's status"),
            }
        }
    })
    .await
    .expect("the stream ended within 10 s");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        answered,
        (0..n).collect(),
        "every request appended before the refused one was answered before its status"
    );
    assert!(
        tokio_stream::StreamExt::next(&mut replies).await.is_none(),
        "nothing after the status"
    );
    assert_eq!(
        b.high_watermark("d", 0).await,
        n,
        "neither the refused request nor the one after it was written"
    );
    let took = b.stop();
    assert!(
        took < std::time::Duration::from_secs(5),
        "shutdown took {took:?} after a stream ended by a refused request"
    );
}

/// At shutdown an open `ProduceStream` ends with UNAVAILABLE, after the replies of what it
/// wrote. Its reader used to wait only for the next request: hyper's graceful shutdown waits
/// for every open stream, so a producer holding its stream open between bursts (as loadgen
/// and the docs' pipelining do) held spoold's shutdown until `shutdown_timeout_ms` (10 s).
/// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task
/// must keep running to answer the server's graceful-shutdown GOAWAY/PING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_produce_stream_ends_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    topic(&b, "t", 1).await;
    let (send, requests) = tokio::sync::mpsc::channel(4);
    let mut replies = b
        .produce()
        .await
        .produce_stream(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    send.send(v1::ProduceStreamRequest {
        request_id: 7,
        partitions: vec![pp(
            "t",
            0,
            v1::partition_produce::Data::Records(v1::RecordList {
                records: vec![record(None, "v")],
                compression: 0,
            }),
        )],
        acks: v1::Acks::Durable as i32,
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), replies.message())
        .await
        .unwrap()
        .unwrap()
        .expect("a reply");
    assert_eq!(r.request_id, 7);
    assert!(r.results[0].error.is_none(), "{r:?}");
    // The stream stays open (`send` is alive) and idle.
    let took = b.stop();
    assert!(
        took < std::time::Duration::from_secs(5),
        "shutdown took {took:?} with an idle produce stream open"
    );
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), replies.message())
        .await
        .unwrap();
    match end {
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            // The broker's status, not a torn-down connection's.
            assert_eq!(reason(&status), "ERROR_CODE_SHUTTING_DOWN", "{status:?}");
        }
        Ok(m) => panic!("expected UNAVAILABLE, got {m:?}"),
    }
    drop(send);
}

/// A `ProduceStream` whose reader or writer task panics (a bug; here the broker's panic
/// points) ends with INTERNAL after the replies of what it wrote, never a clean end: a
/// panicking task used to drop its channel, and the client saw the stream end as if nothing
/// were missing, its last request unanswered. The broker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_produce_stream_ends_it_with_internal_not_a_clean_end() {
    for point in ["produce-stream-reader", "produce-stream-writer"] {
        let dir = tempfile::tempdir().unwrap();
        let env = [("SPOOL_FAILPOINTS", format!("{point}@3"))];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let b = Spoold::start_env(dir.path(), &[], &env);
        topic(&b, "t", 1).await;
        let (send, requests) = tokio::sync::mpsc::channel(4);
        let mut replies = b
            .produce()
            .await
            .produce_stream(tokio_stream::wrappers::ReceiverStream::new(requests))
            .await
            .unwrap()
            .into_inner();
        let req = |id: u64| v1::ProduceStreamRequest {
            request_id: id,
            partitions: vec![pp(
                "t",
                0,
                v1::partition_produce::Data::Records(v1::RecordList {
                    records: vec![record(None, &format!("m{id}"))],
                    compression: 0,
                }),
            )],
            acks: v1::Acks::Durable as i32,
        };
        let next = async |replies: &mut tonic::Streaming<v1::ProduceStreamResponse>| {
            tokio::time::timeout(std::time::Duration::from_secs(10), replies.message())
                .await
                .expect("an answer within 10 s")
        };
        for id in 0..2 {
            send.send(req(id)).await.unwrap();
            let r = next(&mut replies).await.unwrap().expect("a reply");
            assert_eq!(r.request_id, id, "{point}");
            assert!(r.results[0].error.is_none(), "{point}: {r:?}");
        }
        // The third request reaches the panic point.
        send.send(req(2)).await.unwrap();
        match next(&mut replies).await {
            Err(status) => {
                assert_eq!(status.code(), Code::Internal, "{point}: {status:?}");
                assert_eq!(
                    reason(&status),
                    "ERROR_CODE_INTERNAL",
                    "{point}: {status:?}"
                );
                assert!(
                    !status.message().contains("failpoint"),
                    "{point}: the panic stays in the log: {status:?}"
                );
            }
            Ok(m) => panic!("{point}: expected INTERNAL, got {m:?}"),
        }
        drop(send);
        assert_eq!(b.high_watermark("t", 0).await, 2, "{point}: nothing after");
        // A new stream is served (the point fires once).
        let mut replies = b
            .produce()
            .await
            .produce_stream(tokio_stream::iter([req(3)]))
            .await
            .unwrap()
            .into_inner();
        let r = next(&mut replies).await.unwrap().expect("a reply");
        assert!(r.results[0].error.is_none(), "{point}: {r:?}");
        assert_eq!(b.high_watermark("t", 0).await, 3, "{point}");
        b.stop();
    }
}

/// One request naming a transactional producer at two epochs (its current one and the next:
/// the client never sends that, but any pre-encoded batch may, and a pid is a small integer
/// any producer can name) is answered, the wrong epoch refused, and the transactional id stays
/// usable. The id is locked from a batch's
/// registration until its append; locked once per (producer, epoch), the request's thread
/// waited for the lock it already held, and the id stayed locked for good (EndTxn,
/// InitProducerId and ListTransactions hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_with_two_epochs_of_a_producer_is_answered_and_the_id_stays_usable() {
    use spool_proto::v1::transaction_service_client::TransactionServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    topic(&b, "t", 2).await;
    let mut prod = b.produce().await;
    let init = || v1::InitProducerIdRequest {
        transactional_id: "x".into(),
        transaction_timeout_ms: 60_000,
        ..Default::default()
    };
    let now = prod.init_producer_id(init()).await.unwrap().into_inner();
    let batch = |epoch: i32, v: &str| {
        let mut bb = BatchBuilder::new(Compression::None);
        bb.producer(now.producer_id, i16::try_from(epoch).unwrap(), 0);
        bb.transactional(true);
        bb.push(1_700_000_000_000, None, Some(v.as_bytes()), &[]);
        v1::partition_produce::Data::RecordBatch(bb.finish().unwrap())
    };
    let req = v1::ProduceRequest {
        partitions: vec![
            pp("t", 0, batch(now.producer_epoch, "current")),
            pp("t", 1, batch(now.producer_epoch + 1, "next epoch")),
        ],
        acks: v1::Acks::Durable as i32,
    };
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), prod.produce(req))
        .await
        .expect("the request is answered")
        .unwrap()
        .into_inner();
    assert!(r.results[0].error.is_none(), "{r:?}");
    assert!(
        r.results[1].error.is_some(),
        "the other epoch is refused: {r:?}"
    );
    let mut txn = TransactionServiceClient::new(b.channel().await);
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        txn.end_txn(v1::EndTxnRequest {
            transactional_id: "x".into(),
            producer_id: now.producer_id,
            producer_epoch: now.producer_epoch,
            commit: true,
        }),
    )
    .await
    .expect("the id is not stuck")
    .unwrap();
    assert_eq!(
        b.high_watermark("t", 1).await,
        0,
        "nothing of the refused part"
    );
}

fn reason(s: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

/// A shutdown in the middle of a `ProduceStream` burst: every request the broker wrote is
/// answered before the stream's UNAVAILABLE, and none it did not answer is in the log (the
/// written ones are a prefix of the stream: the restarted broker's high watermark is exactly
/// the number answered, and the answered ids are exactly that prefix).
///
/// The client has sent its whole burst (and ended its request side) before the stop: HTTP/2
/// has read it all off the socket, so the connection closes cleanly after the status. A client
/// still writing when the broker closes the connection makes its kernel answer with a TCP
/// reset, which can discard replies and the status the client had not read yet (it then
/// resends what got no reply, with an idempotent producer; docs/protocol.md says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_stream_cut_by_shutdown_answers_everything_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let config = v1::TopicConfig {
        fsync_policy: v1::FsyncPolicy::Always as i32,
        ..Default::default()
    };
    b.create_topic_with("t", 1, Some(config)).await;
    // ~1.3 MB, within one stream's HTTP/2 window (16 MiB): sent at once. With an fdatasync
    // per group commit, it takes the broker far longer to write than the stop below waits.
    let total = 20_000u64;
    let reqs: Vec<_> = (0..total)
        .map(|id| v1::ProduceStreamRequest {
            request_id: id,
            partitions: vec![pp(
                "t",
                0,
                v1::partition_produce::Data::Records(v1::RecordList {
                    records: vec![record(None, &format!("m{id}"))],
                    compression: 0,
                }),
            )],
            acks: v1::Acks::Durable as i32,
        })
        .collect();
    let mut replies = b
        .produce()
        .await
        .produce_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let (seen, got) = tokio::sync::oneshot::channel();
    let collector = tokio::spawn(async move {
        let mut answered = std::collections::BTreeSet::new();
        let mut seen = Some(seen);
        let end = loop {
            match replies.message().await {
                Ok(Some(r)) => {
                    assert!(r.results[0].error.is_none(), "{r:?}");
                    assert!(answered.insert(r.request_id), "answered twice: {r:?}");
                    if answered.len() == 200 {
                        let _ = seen.take().map(|s| s.send(()));
                    }
                }
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        (answered, end)
    });
    tokio::time::timeout(std::time::Duration::from_secs(20), got)
        .await
        .expect("200 replies within 20 s")
        .unwrap();
    // Mid-burst.
    let took = b.stop();
    let (answered, end) = tokio::time::timeout(std::time::Duration::from_secs(10), collector)
        .await
        .expect("the reply stream ended")
        .unwrap();
    let n = answered.len() as u64;
    assert!(n < total, "the stop came after the whole burst was written");
    let status = end.expect("the stream ended with a status, not OK");
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "{status:?} after {took:?}"
    );
    assert_eq!(reason(&status), "ERROR_CODE_SHUTTING_DOWN", "{status:?}");
    assert_eq!(
        answered,
        (0..n).collect(),
        "the answered requests are a prefix of the stream"
    );
    let b = Spoold::start(dir.path(), &[]);
    assert_eq!(
        b.high_watermark("t", 0).await,
        n,
        "exactly the answered requests are in the log"
    );
    b.stop();
}
