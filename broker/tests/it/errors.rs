//! Errors at the gRPC boundary (issue 12): one table from error codes to gRPC codes, echoed
//! client input bounded, undecodable requests refused as the caller's error, compressed
//! batches that lie about their records refused.

use bytes::{Buf, BufMut, Bytes};
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
    let short = |s: &tonic::Status| {
        assert!(
            s.message().len() < 1024 && s.message().contains("…(1048576 bytes)"),
            "{} bytes: {:.300}",
            s.message().len(),
            s.message()
        );
        if let Some(info) = s.get_details_error_info() {
            assert!(info.metadata.values().all(|v| v.len() < 300), "{info:?}");
        }
    };

    let err = admin
        .create_topic(v1::CreateTopicRequest {
            topic: long.clone(),
            partitions: 1,
            config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    short(&err);
    let err = admin
        .describe_topic(v1::DescribeTopicRequest {
            topic: long.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    short(&err);

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
struct RawCodec;

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
