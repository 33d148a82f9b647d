//! Errors at the gRPC boundary (issue 12): one table from error codes to gRPC codes, echoed
//! client input bounded, undecodable requests refused as the caller's error, compressed
//! batches that lie about their records refused.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use spool_log_engine::{BatchBuilder, Compression};
use spool_proto::v1;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_types::StatusExt;

use crate::common::Spoold;

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

#[tokio::test]
async fn topic_exists_has_its_own_code() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let mut admin = b.admin().await;
    let req = || v1::CreateTopicRequest {
        topic: "t".into(),
        partitions: 1,
        config: None,
    };
    admin.create_topic(req()).await.unwrap();
    let err = admin.create_topic(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(reason(&err), "ERROR_CODE_TOPIC_EXISTS", "{err:?}");
}

/// A 1 MB topic name came back whole inside the message and the `ErrorInfo` detail, so a
/// default gRPC client (16 KiB of response headers at most) saw a protocol error instead of
/// the status. Every echoed name is now cut to 256 bytes, with its length.
#[tokio::test]
async fn echoed_client_input_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    // Stubs with tonic's default limits: the client a user starts with.
    let channel = b.channel().await;
    let mut admin = v1::admin_service_client::AdminServiceClient::new(channel.clone());
    let mut produce = v1::produce_service_client::ProduceServiceClient::new(channel.clone());
    let mut consume = v1::consume_service_client::ConsumeServiceClient::new(channel);
    let long = "n".repeat(1 << 20);
    let short = |s: &tonic::Status, len: usize| {
        assert!(
            s.message().len() < 1024 && s.message().contains(&format!("…({len} bytes)")),
            "{} bytes: {:.300}",
            s.message().len(),
            s.message()
        );
        if let Some(info) = s.get_details_error_info() {
            assert!(info.metadata.values().all(|v| v.len() < 300), "{info:?}");
        }
    };

    // AdminService decodes at most 64 KiB (`request_limits.rs`): a 1 MiB name is refused
    // before it is decoded, a 32 KiB one reaches the handler and is echoed bounded.
    let err = admin
        .create_topic(v1::CreateTopicRequest {
            topic: long.clone(),
            partitions: 1,
            config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let admin_long = "n".repeat(32 << 10);
    let err = admin
        .create_topic(v1::CreateTopicRequest {
            topic: admin_long.clone(),
            partitions: 1,
            config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    short(&err, admin_long.len());
    let err = admin
        .describe_topic(v1::DescribeTopicRequest {
            topic: admin_long.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    short(&err, admin_long.len());

    // Per-partition errors inside a reply are bounded the same way.
    let r = produce
        .produce(v1::ProduceRequest {
            partitions: vec![v1::PartitionProduce {
                topic: long.clone(),
                partition: 0,
                data: Some(v1::partition_produce::Data::RecordBatch(
                    Bytes::from_static(b"x"),
                )),
            }],
            acks: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let e = r.results[0].error.as_ref().expect("an error");
    assert_eq!(e.code, v1::ErrorCode::UnknownTopic as i32);
    assert!(e.message.len() < 1024, "{} bytes", e.message.len());
    let r = consume
        .fetch(v1::FetchRequest {
            partitions: vec![v1::PartitionFetch {
                topic: long.clone(),
                partition: 0,
                offset: 0,
                max_bytes: 1024,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = r.partitions[0].error.as_ref().expect("an error");
    assert!(e.message.len() < 1024, "{} bytes", e.message.len());
}

/// Request bytes sent as they are, replies kept as bytes: for requests no stub can make.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// tonic-prost reports a request that does not decode as INTERNAL, which reads as the
/// broker's fault; the server stubs' codec makes it INVALID_ARGUMENT.
#[tokio::test]
async fn undecodable_requests_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let mut grpc = tonic::client::Grpc::new(b.channel().await);
    for (path, body) in [
        // Field 1 (topic, a string) with a length running past the end.
        ("/spool.v1.AdminService/CreateTopic", &b"\x0a\x7f\x01"[..]),
        // An invalid wire type.
        ("/spool.v1.ProduceService/Produce", &b"\x0f\xff\xff\xff"[..]),
        // A string field that is not UTF-8.
        (
            "/spool.v1.AdminService/DescribeTopic",
            &b"\x0a\x02\xff\xfe"[..],
        ),
    ] {
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<Bytes, Bytes, _>(
                tonic::Request::new(Bytes::from_static(body)),
                path.parse().unwrap(),
                RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{path}: {err:?}");
    }
    // The broker is fine afterwards.
    b.admin()
        .await
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap();
}

/// A `ProduceStream` request the codec refuses (over `limits.max_request_bytes`, not
/// decodable, or over a count limit on the wire) ends the stream with the codec's status, after the replies of the requests
/// before it, and nothing after it is written. The stream's reader used to take every receive
/// error for the client leaving, and ended the stream with OK: a client saw its stream end
/// "successfully" with its last requests never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_stream_request_the_codec_refuses_ends_the_stream_with_its_status() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("spoold.toml"),
        "[limits]\nmax_request_bytes = 1048576\n",
    )
    .unwrap();
    let cfg = dir.path().join("spoold.toml");
    let b = Spoold::start(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    );
    b.create_topic("t", 1).await;
    let req = |id: u64, value: &str| {
        Bytes::from(
            v1::ProduceStreamRequest {
                request_id: id,
                partitions: vec![v1::PartitionProduce {
                    topic: "t".into(),
                    partition: 0,
                    data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                        records: vec![crate::common::record(None, value)],
                        compression: 0,
                    })),
                }],
                acks: v1::Acks::Durable as i32,
            }
            .encode_to_vec(),
        )
    };
    let cases = [
        // An invalid wire type.
        (
            "not decodable",
            Bytes::from_static(b"\x0f\xff\xff\xff"),
            Code::InvalidArgument,
        ),
        // A well-formed request of 2 MiB, over the 1 MiB limit.
        ("too large", req(1, &"v".repeat(2 << 20)), Code::OutOfRange),
        // 10 001 partitions, over `limits.max_partitions_per_request`: counted on the wire
        // before decoding (proto/src/codec.rs).
        (
            "too many partitions",
            Bytes::from(
                v1::ProduceStreamRequest {
                    request_id: 1,
                    partitions: vec![
                        v1::PartitionProduce {
                            topic: "t".into(),
                            partition: 0,
                            data: None,
                        };
                        10_001
                    ],
                    acks: v1::Acks::Durable as i32,
                }
                .encode_to_vec(),
            ),
            Code::InvalidArgument,
        ),
    ];
    let mut written = 0;
    for (what, bad, want) in cases {
        let mut grpc = tonic::client::Grpc::new(b.channel().await);
        grpc.ready().await.unwrap();
        let sent = vec![req(0, "before"), bad, req(2, "after")];
        let mut replies = grpc
            .streaming::<_, Bytes, Bytes, _>(
                tonic::Request::new(tokio_stream::iter(sent)),
                "/spool.v1.ProduceService/ProduceStream".parse().unwrap(),
                RawCodec,
            )
            .await
            .unwrap()
            .into_inner();
        let mut answered = Vec::new();
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match replies.message().await {
                    Ok(Some(r)) => {
                        let r = v1::ProduceStreamResponse::decode(r).unwrap();
                        assert!(r.results[0].error.is_none(), "{what}: {r:?}");
                        answered.push(r.request_id);
                    }
                    Ok(None) => break None,
                    Err(status) => break Some(status),
                }
            }
        })
        .await
        .expect("the stream ended within 10 s");
        let status = end.unwrap_or_else(|| panic!("{what}: the stream ended with OK"));
        assert_eq!(status.code(), want, "{what}: {status:?}");
        assert_eq!(answered, [0], "{what}: the request before was answered");
        written += 1;
        assert_eq!(
            b.high_watermark("t", 0).await,
            written,
            "{what}: nothing after the refused request was written"
        );
    }
    let took = b.stop();
    assert!(
        took < std::time::Duration::from_secs(5),
        "shutdown took {took:?} after a stream ended by a request the codec refused"
    );
}

/// A Membership message the codec refuses, after the join, ends the member's stream with
/// INVALID_ARGUMENT. It used to end it with OK, as if the client had closed it: the member
/// left its group and was never told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_message_the_codec_refuses_ends_the_stream_with_its_status() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    b.create_topic("t", 1).await;
    let join = v1::MembershipRequest {
        request: Some(v1::membership_request::Request::Join(v1::JoinGroup {
            group: "g".into(),
            topics: vec!["t".into()],
            instance_id: None,
            member_id: String::new(),
            strategy: v1::AssignmentStrategy::Sticky as i32,
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 0,
        })),
    };
    let (send, sent) = tokio::sync::mpsc::channel::<Bytes>(4);
    send.send(Bytes::from(join.encode_to_vec())).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(b.channel().await);
    grpc.ready().await.unwrap();
    let mut replies = grpc
        .streaming::<_, Bytes, Bytes, _>(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(sent)),
            "/spool.v1.GroupService/Membership".parse().unwrap(),
            RawCodec,
        )
        .await
        .unwrap()
        .into_inner();
    let wait = std::time::Duration::from_secs(10);
    let first = tokio::time::timeout(wait, replies.message())
        .await
        .unwrap()
        .unwrap()
        .expect("Joined");
    let first = v1::MembershipResponse::decode(first).unwrap();
    assert!(
        matches!(
            first.response,
            Some(v1::membership_response::Response::Joined(_))
        ),
        "{first:?}"
    );
    // An invalid wire type.
    send.send(Bytes::from_static(b"\x0f\xff\xff\xff"))
        .await
        .unwrap();
    let end = tokio::time::timeout(wait, async {
        loop {
            match replies.message().await {
                Ok(Some(_)) => {} // its assignment, heartbeats
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        }
    })
    .await
    .expect("the stream ended within 10 s");
    let status = end.expect("the stream ended with a status, not OK");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    drop(send);
    b.stop();
}

/// Through the broker: a ~100-byte zstd batch claiming 2^20 records is refused (it moved the
/// high watermark by a million offsets), and nothing is written.
#[tokio::test]
async fn compressed_batch_claiming_records_it_lacks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    b.create_topic("t", 1).await;
    let mut bb = BatchBuilder::new(Compression::Zstd);
    bb.push(1_700_000_000_000, None, Some(b"v"), &[]);
    let mut lie = bb.finish().unwrap().to_vec();
    lie[23..27].copy_from_slice(&((1i32 << 20) - 1).to_be_bytes());
    lie[57..61].copy_from_slice(&(1i32 << 20).to_be_bytes());
    let crc = spool_log_engine::batch::batch_crc(&lie);
    lie[17..21].copy_from_slice(&crc.to_be_bytes());
    let r = b
        .produce()
        .await
        .produce(v1::ProduceRequest {
            partitions: vec![v1::PartitionProduce {
                topic: "t".into(),
                partition: 0,
                data: Some(v1::partition_produce::Data::RecordBatch(Bytes::from(lie))),
            }],
            acks: v1::Acks::Durable as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let e = r.results[0].error.as_ref().expect("refused");
    assert_eq!(e.code, v1::ErrorCode::InvalidBatch as i32, "{e:?}");
    assert_eq!(b.high_watermark("t", 0).await, 0, "nothing was written");
}

/// Sends `body` to `path` as it is.
async fn raw(b: &Spoold, path: &str, body: Vec<u8>) -> Result<Bytes, tonic::Status> {
    // Replies echo topic names: take them whatever their size.
    let mut grpc =
        tonic::client::Grpc::new(b.channel().await).max_decoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    grpc.unary::<Bytes, Bytes, _>(
        tonic::Request::new(Bytes::from(body)),
        path.parse().unwrap(),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Audit finding 2: FetchOffsets took any number of entries and answered each with a copy
/// of the committed metadata (up to 4 KiB): 20 001 copies of one partition came back as an
/// 80 MB answer built under the offsets store's lock. Refused now, on the default config,
/// over `limits.max_partitions_per_request`; at the limit it is answered.
#[tokio::test]
async fn fetch_offsets_entries_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    b.create_topic("t", 1).await;
    let mut offsets = b.offsets().await;
    offsets
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "g".into(),
            offsets: vec![v1::OffsetCommit {
                topic: "t".into(),
                partition: 0,
                offset: 1,
                metadata: "m".repeat(4096),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let fetch = |n| v1::FetchOffsetsRequest {
        group: "g".into(),
        partitions: vec![
            v1::TopicPartition {
                topic: "t".into(),
                partition: 0,
            };
            n
        ],
    };
    let e = offsets.fetch_offsets(fetch(20_001)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .starts_with("20001 partitions in one request, the limit is 10000"),
        "{e:?}"
    );
    assert_eq!(reason(&e), "ERROR_CODE_INVALID_REQUEST");
    let answer = offsets.fetch_offsets(fetch(10)).await.unwrap().into_inner();
    assert_eq!(answer.offsets.len(), 10);
    assert_eq!(answer.offsets[9].metadata.len(), 4096);
}

/// A FetchOffsets of all a group's offsets (an empty list, what the CLI's `group describe`,
/// `seek`, `delete` and `list` send) is answered whole for a group with more commits than a
/// listed fetch may name, and refused only when the answer would not fit in one reply. It was
/// refused past `max_partitions_per_request` commits (review-late 1), which left such a group
/// impossible to describe or delete from the CLI. (Small limits, so a few partitions show it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_of_all_offsets_answers_large_groups_within_the_reply_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("spoold.toml"),
        "[limits]\nmax_request_bytes = 16384\nmax_partitions_per_request = 10\n",
    )
    .unwrap();
    let cfg = dir.path().join("spoold.toml");
    let b = Spoold::start(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    );
    b.create_topic("t", 12).await;
    let mut offsets = b.offsets().await;
    let commit = |group: &str, from: u32, metadata: &str| v1::CommitOffsetsRequest {
        group: group.into(),
        offsets: (from..from + 6)
            .map(|p| v1::OffsetCommit {
                topic: "t".into(),
                partition: p,
                offset: 1,
                metadata: metadata.into(),
            })
            .collect(),
        ..Default::default()
    };
    let all = |group: &str| v1::FetchOffsetsRequest {
        group: group.into(),
        partitions: vec![],
    };
    // 12 commits, past the listed limit (10); well within one 16 KiB reply.
    for from in [0, 6] {
        offsets
            .commit_offsets(commit("big", from, ""))
            .await
            .unwrap();
    }
    let answer = offsets
        .fetch_offsets(all("big"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.offsets.len(), 12);
    // 12 commits with 2 000 bytes of metadata each: a 24 KB answer, refused before copying.
    for from in [0, 6] {
        offsets
            .commit_offsets(commit("fat", from, &"m".repeat(2000)))
            .await
            .unwrap();
    }
    let e = offsets.fetch_offsets(all("fat")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("list the partitions"), "{e:?}");
    b.stop();
}

/// Audit finding 1 (a): services whose requests are small decode at most what their count
/// limits need (`request_limits.rs`), not `limits.max_request_bytes` (64 MiB): a 12 MB Fetch
/// (more than 10 000 partitions of the longest topic names need) and a 100 KiB CreateTopic
/// are refused with OUT_OF_RANGE before they are buffered whole; Produce still takes them.
#[tokio::test]
async fn small_services_decode_small_requests() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    // Field 1 (one partition) holding field 1 (its topic) of `len` bytes.
    let long_topic = |len: usize| {
        let mut topic = vec![0x0a];
        prost::encoding::encode_varint(len as u64, &mut topic);
        topic.resize(topic.len() + len, b'a');
        let mut out = vec![0x0a];
        prost::encoding::encode_varint(topic.len() as u64, &mut out);
        out.extend_from_slice(&topic);
        out
    };
    for (path, body) in [
        ("/spool.v1.ConsumeService/Fetch", long_topic(12 << 20)),
        ("/spool.v1.AdminService/CreateTopic", long_topic(100 << 10)),
    ] {
        let e = raw(&b, path, body).await.unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{path}: {e:?}");
    }
    // Produce: decoded, and refused for what it says (an unknown topic, per partition).
    let r = raw(&b, "/spool.v1.ProduceService/Produce", long_topic(12 << 20)).await;
    let r = v1::ProduceResponse::decode(r.unwrap()).unwrap();
    assert!(r.results[0].error.is_some(), "{:?}", r.results[0].error);
}
