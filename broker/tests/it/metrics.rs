//! Prometheus metrics: traffic counters, request histograms, partition gauges, fsync latency
//! and consumer-group lag, scraped over HTTP from the real broker.

use spool_proto::v1;

use crate::common::{Spoold, record};

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{body}"))
}

#[tokio::test]
async fn metrics_reflect_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    b.admin()
        .await
        .create_topic(v1::CreateTopicRequest {
            topic: "m".into(),
            partitions: 1,
            config: None,
        })
        .await
        .unwrap();
    let records = (0..5)
        .map(|i| record(None, &format!("value-{i}")))
        .collect();
    b.produce()
        .await
        .produce(v1::ProduceRequest {
            partitions: vec![v1::PartitionProduce {
                topic: "m".into(),
                partition: 0,
                data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                    records,
                    compression: 0,
                })),
            }],
            acks: 0,
        })
        .await
        .unwrap();
    let f = b
        .consume()
        .await
        .fetch(v1::FetchRequest {
            partitions: vec![v1::PartitionFetch {
                topic: "m".into(),
                partition: 0,
                offset: 0,
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
    let served = f.partitions[0].record_batches.len() as f64;
    b.offsets()
        .await
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "g".into(),
            offsets: vec![v1::OffsetCommit {
                topic: "m".into(),
                partition: 0,
                offset: 2,
                metadata: String::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let _ = b
        .admin()
        .await
        .describe_topic(v1::DescribeTopicRequest {
            topic: "nope".into(),
        })
        .await;

    let addr = b.metrics_addr.clone();
    let body = tokio::task::spawn_blocking(move || Spoold::scrape_addr(&addr))
        .await
        .unwrap();
    assert_eq!(
        sample(&body, "spool_produce_records_total{topic=\"m\"}"),
        5.0
    );
    assert!(sample(&body, "spool_produce_bytes_total{topic=\"m\"}") > 60.0);
    assert_eq!(
        sample(&body, "spool_consume_bytes_total{topic=\"m\"}"),
        served
    );
    assert_eq!(
        sample(&body, "spool_consume_records_total{topic=\"m\"}"),
        5.0
    );
    assert_eq!(
        sample(
            &body,
            "spool_partition_high_watermark{topic=\"m\",partition=\"0\"}"
        ),
        5.0
    );
    assert!(
        sample(
            &body,
            "spool_partition_size_bytes{topic=\"m\",partition=\"0\"}"
        ) > 60.0
    );
    assert_eq!(
        sample(
            &body,
            "spool_consumer_group_lag{group=\"g\",topic=\"m\",partition=\"0\"}"
        ),
        3.0
    );
    assert!(
        sample(&body, "spool_fsync_duration_seconds_count{topic=\"m\"}") >= 1.0,
        "acks=durable ran an fdatasync"
    );
    assert!(sample(&body, "spool_rpc_duration_seconds_count{rpc=\"Produce\"}") >= 1.0);
    assert_eq!(
        sample(&body, "spool_rpc_errors_total{rpc=\"DescribeTopic\"}"),
        1.0
    );
    b.stop();
}
