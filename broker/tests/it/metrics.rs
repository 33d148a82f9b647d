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

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    commit_and_fail_a_describe(&b, "m", 0, 2).await;

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
        sample(
            &body,
            "spool_rpc_errors_total{rpc=\"DescribeTopic\",code=\"NOT_FOUND\"}"
        ),
        1.0
    );
    // Lag in time: the group's next record (offset 2) was produced a moment ago.
    let lag_s = sample(
        &body,
        "spool_consumer_group_lag_seconds{group=\"g\",topic=\"m\",partition=\"0\"}",
    );
    assert!((0.0..60.0).contains(&lag_s), "{lag_s}");
    // The standard process metrics and the build info.
    assert!(sample(&body, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&body, "process_open_fds") >= 3.0);
    assert!(sample(&body, "process_max_fds") >= sample(&body, "process_open_fds"));
    assert!(sample(&body, "process_cpu_seconds_total") >= 0.0);
    let started = sample(&body, "process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now + 1.0 && started > now - 600.0,
        "{started} vs {now}"
    );
    assert_eq!(
        sample(
            &body,
            &format!(
                "spool_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    b.stop();
}

/// Commits `offset` for group `g` on `topic`/`partition`, then fails a DescribeTopic of a
/// topic that does not exist (NOT_FOUND), so that lag and error metrics have samples.
async fn commit_and_fail_a_describe(b: &Spoold, topic: &str, partition: u32, offset: u64) {
    b.offsets()
        .await
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "g".into(),
            offsets: vec![v1::OffsetCommit {
                topic: topic.into(),
                partition,
                offset,
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
}

/// `promtool`: from $PROMTOOL, `target/tools` (where .ci/install-test-tools puts it) or PATH.
fn promtool() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("PROMTOOL") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/promtool");
    if local.exists() {
        return local;
    }
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok()
    {
        return PathBuf::from("promtool");
    }
    panic!(
        "promtool not found: run `bash .ci/install-test-tools` (or set PROMTOOL=/path/to/promtool)"
    );
}

/// GET /metrics with an optional Accept header; returns the content type and the body.
fn get_metrics(addr: &str, accept: Option<&str>) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to /metrics");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: spool\r\n{accept}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (content_type, body.to_owned())
}

/// The real broker's /metrics, after traffic of every kind of metric, passes `promtool check
/// metrics` (the format and Prometheus' naming lints); Prometheus itself, which asks for
/// OpenMetrics, gets OpenMetrics under its own content type.
// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    b.admin()
        .await
        .create_topic(v1::CreateTopicRequest {
            topic: "p".into(),
            partitions: 2,
            config: None,
        })
        .await
        .unwrap();
    b.produce()
        .await
        .produce(v1::ProduceRequest {
            partitions: vec![v1::PartitionProduce {
                topic: "p".into(),
                partition: 1,
                data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                    records: vec![record(Some("k"), "v")],
                    compression: 0,
                })),
            }],
            acks: 0,
        })
        .await
        .unwrap();
    commit_and_fail_a_describe(&b, "p", 1, 0).await;
    let addr = b.metrics_addr.clone();
    let (plain, om) = tokio::task::spawn_blocking(move || {
        (
            get_metrics(&addr, None),
            get_metrics(
                &addr,
                Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
            ),
        )
    })
    .await
    .unwrap();
    assert_eq!(plain.0, "text/plain; version=0.0.4; charset=utf-8");
    assert!(
        plain
            .1
            .contains("# TYPE spool_produce_records_total counter"),
        "{}",
        plain.1
    );
    assert!(!plain.1.contains("# EOF"));
    assert_eq!(
        om.0,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.1.ends_with("# EOF\n"), "{}", om.1);

    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running promtool");
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(plain.1.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics ({}):\n{}{}\n--- the metrics:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        plain.1
    );
    b.stop();
}

/// Audit finding 9: the metrics listener accepted every connection, however many. It now
/// serves 16 at once: with 16 silent connections open, a 17th scrape waits in the backlog,
/// and is answered as soon as one of them ends.
#[test]
fn metrics_connections_are_capped() {
    use std::io::{Read, Write};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    // Answered at once while nothing else is open.
    assert!(Spoold::scrape_addr(&b.metrics_addr).contains("spool_build_info"));
    let mut held: Vec<_> = (0..16)
        .map(|_| std::net::TcpStream::connect(&b.metrics_addr).unwrap())
        .collect();
    // Let the broker accept them (in order: the 17th comes after them in the backlog).
    std::thread::sleep(Duration::from_millis(300));
    let mut s = std::net::TcpStream::connect(&b.metrics_addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: spool\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut first = [0u8; 16];
    let waited = s.read(&mut first);
    assert!(
        waited.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "a 17th connection was served beside 16 open ones: {waited:?}"
    );
    drop(held.pop());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(out.contains("spool_build_info"), "{out}");
    drop(held);
    b.stop();
}
