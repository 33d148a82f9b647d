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

/// The value of an unlabelled counter or gauge.
fn metric(b: &Spoold, name: &str) -> u64 {
    b.metric(name)
}

fn idle_closed(b: &Spoold) -> u64 {
    metric(b, "spool_idle_connections_closed_total")
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
    // It never sent a request: the handshake deadline (capped at the idle timeout) closed it.
    assert_eq!(metric(&b, "spool_handshake_timeouts_total"), 1);
    assert_eq!(idle_closed(&b), 0);
    b.stop();
}

/// Waits until the peer closes `s` (EOF or reset); returns how long that took.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => continue, // the server's HTTP/2 SETTINGS
        }
    }
}

/// Issue 12: sockets that never send a byte, all from one address, neither hold their slots
/// past the handshake timeout nor take more than their address's share, so other clients
/// are served at once; and a client that connected without calling yet recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_cannot_lock_others_out() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_env(
        dir.path(),
        &[],
        &[
            ("SPOOL_LIMITS__MAX_CONNECTIONS", "16"),
            ("SPOOL_LIMITS__MAX_CONNECTIONS_PER_ADDRESS", "12"),
            ("SPOOL_LIMITS__HANDSHAKE_TIMEOUT_MS", "1000"),
        ],
    );
    let addr: std::net::SocketAddr = b.addr.parse().unwrap();
    // Connected (eagerly) before the flood, first call only after the handshake timeout.
    let mut early = b.admin().await;
    let t = Instant::now();
    // Each silent socket's watcher: when the broker closed it.
    let mut watchers = Vec::new();
    for _ in 0..30 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        watchers.push(tokio::spawn(async move {
            closed_within(&mut s, Duration::from_secs(5))
                .await
                .map(|_| t.elapsed())
        }));
    }
    // Another address (127.0.0.1) is served at once: the flood took 12 slots, not 16.
    let mut admin = b.admin().await;
    tokio::time::timeout(
        Duration::from_millis(800),
        admin.list_topics(v1::ListTopicsRequest {}),
    )
    .await
    .expect("served while the silent sockets are open")
    .unwrap();
    // 18 were closed at once, the 12 others at the handshake deadline.
    let mut times = Vec::new();
    for w in watchers {
        times.push(
            w.await
                .unwrap()
                .expect("every silent socket is closed within seconds"),
        );
    }
    let quick = times
        .iter()
        .filter(|d| **d < Duration::from_millis(900))
        .count();
    assert_eq!(quick, 18, "refused at once: {times:?}");
    assert_eq!(metric(&b, "spool_connections_refused_total"), 18);
    // The 12, the early client's connection (no call yet), and nothing idle.
    assert_eq!(metric(&b, "spool_handshake_timeouts_total"), 13);
    assert_eq!(idle_closed(&b), 0);
    assert_eq!(
        metric(&b, "spool_connections_open"),
        1,
        "only the served client's"
    );
    // The early client's channel reconnects by itself (a call may race the close once).
    if early.list_topics(v1::ListTopicsRequest {}).await.is_err() {
        early.list_topics(v1::ListTopicsRequest {}).await.unwrap();
    }
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
