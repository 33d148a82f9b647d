//! One injected clock (issue 12): the broker read `SystemTime::now` in several places and its
//! log had its own clock. Now every wall-clock reading of the broker and of its log comes from
//! the clock given to `Broker::open_with_clock`; this test runs the broker in-process with a
//! stepped clock and finds that clock's time everywhere the broker stamps one.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use spool_broker::{Broker, Config};
use spool_log_engine::Clock;
use spool_proto::v1;

#[derive(Debug)]
struct Stepped(AtomicI64);

impl Clock for Stepped {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

const T0: i64 = 1_234_567_890_123;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broker_timestamp_comes_from_the_injected_clock() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(Stepped(AtomicI64::new(T0)));
    let config = Config {
        data_dir: dir.path().join("data"),
        metrics_listen: None,
        ..Config::default()
    };
    let c: Arc<dyn Clock> = clock.clone();
    let broker = tokio::task::spawn_blocking(move || Broker::open_with_clock(config, c))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(broker.serve(listener, None, async {
        let _ = stopped.await;
    }));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = v1::admin_service_client::AdminServiceClient::new(channel.clone());
    let mut produce = v1::produce_service_client::ProduceServiceClient::new(channel.clone());
    let mut consume = v1::consume_service_client::ConsumeServiceClient::new(channel.clone());
    let mut offsets = v1::offset_service_client::OffsetServiceClient::new(channel);
    admin
        .create_topic(v1::CreateTopicRequest {
            topic: "t".into(),
            partitions: 1,
            config: None,
        })
        .await
        .unwrap();

    // A record without a timestamp is stamped by the broker; the append time is the log's.
    let r = produce
        .produce(v1::ProduceRequest {
            partitions: vec![v1::PartitionProduce {
                topic: "t".into(),
                partition: 0,
                data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                    records: vec![v1::Record {
                        value: Some(bytes::Bytes::from_static(b"v")),
                        ..Default::default()
                    }],
                    compression: 0,
                })),
            }],
            acks: v1::Acks::Durable as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].error, None);
    assert_eq!(r.results[0].log_append_time_ms, T0);
    let f = consume
        .fetch(v1::FetchRequest {
            partitions: vec![v1::PartitionFetch {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                max_bytes: 1 << 20,
            }],
            decode_records: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.partitions[0].records[0].timestamp_ms, T0);

    // Commit times, read at each commit (the clock is read, not cached).
    for step in [0, 5_000] {
        clock.0.store(T0 + step, Ordering::SeqCst);
        offsets
            .commit_offsets(v1::CommitOffsetsRequest {
                group: "g".into(),
                offsets: vec![v1::OffsetCommit {
                    topic: "t".into(),
                    partition: 0,
                    offset: 1,
                    metadata: String::new(),
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        let got = offsets
            .fetch_offsets(v1::FetchOffsetsRequest {
                group: "g".into(),
                partitions: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.offsets[0].commit_time_ms, T0 + step, "{got:?}");
    }
    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
}
