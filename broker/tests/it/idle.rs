//! Idle-connection timeout: connections without request or response data are closed by the
//! broker; busy connections and idle subscriptions (heartbeats) stay open.

use std::io::Read;
use std::time::{Duration, Instant};

use spool_proto::v1;
use tokio_stream::StreamExt;

use crate::common::{Spoold, record};

const IDLE_MS: u64 = 1500;

/// A broker whose connections idle out after 1.5 s (unary calls and fetch waits below it).
fn start(dir: &std::path::Path) -> Spoold {
    Spoold::start_env(
        dir,
        &[],
        &[
            ("SPOOL_LIMITS__IDLE_TIMEOUT_MS", "1500"),
            ("SPOOL_LIMITS__REQUEST_TIMEOUT_MS", "1000"),
            ("SPOOL_LIMITS__MAX_FETCH_WAIT_MS", "500"),
        ],
    )
}

fn idle_closed(b: &Spoold) -> u64 {
    let body = Spoold::scrape_addr(&b.metrics_addr);
    body.lines()
        .find(|l| l.starts_with("spool_idle_connections_closed_total "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no idle counter in:\n{body}"))
}

#[test]
fn a_silent_tcp_connection_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path());
    let t = Instant::now();
    let mut s = std::net::TcpStream::connect(&b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // Say nothing. The broker may send its HTTP/2 SETTINGS first; then the connection ends.
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("not closed after {:?}: {e}", t.elapsed()),
        }
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(IDLE_MS - 100) && took < Duration::from_secs(8),
        "closed after {took:?}"
    );
    assert_eq!(idle_closed(&b), 1);
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connections_stay_and_silent_ones_close() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path());
    // One connection, used every 400 ms for more than twice the idle timeout.
    let mut admin = b.admin().await;
    let until = Instant::now() + Duration::from_millis(3 * IDLE_MS);
    while Instant::now() < until {
        admin.list_topics(v1::ListTopicsRequest {}).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(idle_closed(&b), 0, "a busy connection is not idle");
    // Silent past the timeout: closed by the broker.
    tokio::time::sleep(Duration::from_millis(IDLE_MS + 1000)).await;
    assert_eq!(idle_closed(&b), 1);
    // The channel connects again by itself (a call may race the close once).
    if admin.list_topics(v1::ListTopicsRequest {}).await.is_err() {
        admin.list_topics(v1::ListTopicsRequest {}).await.unwrap();
    }
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscription_keeps_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path());
    b.admin()
        .await
        .create_topic(v1::CreateTopicRequest {
            topic: "quiet".into(),
            partitions: 1,
            config: None,
        })
        .await
        .unwrap();
    let mut stream = b
        .consume()
        .await
        .subscribe(v1::SubscribeRequest {
            partitions: vec![v1::SubscribePartition {
                topic: "quiet".into(),
                partition: 0,
                start: None,
            }],
            max_bytes: 0,
            decode_records: true,
            // Asks for far less often than the idle timeout allows: capped at half of it.
            heartbeat_interval_ms: 60_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let start = Instant::now();
    let mut heartbeats = 0;
    let mut last = Instant::now();
    while start.elapsed() < Duration::from_millis(3 * IDLE_MS) {
        let msg = tokio::time::timeout(Duration::from_millis(IDLE_MS), stream.next())
            .await
            .expect("a heartbeat within the idle timeout")
            .expect("the stream is open")
            .expect("no error");
        assert!(matches!(
            msg.message,
            Some(v1::subscribe_response::Message::Heartbeat(_))
        ));
        assert!(last.elapsed() <= Duration::from_millis(IDLE_MS / 2 + 400));
        last = Instant::now();
        heartbeats += 1;
    }
    assert!(heartbeats >= 4, "{heartbeats} heartbeats");

    // Still the same live stream: data produced now arrives on it.
    b.produce()
        .await
        .produce(v1::ProduceRequest {
            partitions: vec![v1::PartitionProduce {
                topic: "quiet".into(),
                partition: 0,
                data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                    records: vec![record(None, "after the silence")],
                    compression: 0,
                })),
            }],
            acks: 0,
        })
        .await
        .unwrap();
    let data = loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("data")
            .expect("the stream is open")
            .expect("no error");
        if let Some(v1::subscribe_response::Message::Data(d)) = msg.message {
            break d;
        }
    };
    assert_eq!(
        data.records[0].value.as_deref(),
        Some(&b"after the silence"[..])
    );
    b.stop();
}
