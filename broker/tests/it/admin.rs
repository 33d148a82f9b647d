//! AdminService end to end, including the errors a program must be able to act on.

use std::time::Duration;

use spool_proto::v1;
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::Spoold;

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_lifecycle_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let mut admin = b.admin().await;

    let created = admin
        .create_topic(v1::CreateTopicRequest {
            topic: "orders".into(),
            partitions: 3,
            config: Some(v1::TopicConfig {
                retention_ms: Some(3_600_000),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let cfg = created.config.unwrap();
    assert_eq!(cfg.retention_ms, Some(3_600_000));
    assert_eq!(
        cfg.fsync_policy,
        v1::FsyncPolicy::Always as i32,
        "default policy is always"
    );

    let err = admin
        .create_topic(v1::CreateTopicRequest {
            topic: "orders".into(),
            partitions: 1,
            config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    for bad in ["", ".hidden", "a/b", "__consumer_offsets", &"x".repeat(250)] {
        let err = admin
            .create_topic(v1::CreateTopicRequest {
                topic: bad.into(),
                partitions: 1,
                config: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "name {bad:?}: {err:?}");
    }

    let list = admin
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list
        .topics
        .iter()
        .map(|t| (t.topic.as_str(), t.partitions))
        .collect();
    assert!(names.contains(&("orders", 3)), "{names:?}");
    assert!(
        names.contains(&("__consumer_offsets", 1)),
        "the internal topic is listed: {names:?}"
    );

    let altered = admin
        .alter_topic_config(v1::AlterTopicConfigRequest {
            topic: "orders".into(),
            config: Some(v1::TopicConfig {
                fsync_policy: v1::FsyncPolicy::Interval as i32,
                fsync_interval_ms: Some(200),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(altered.fsync_policy, v1::FsyncPolicy::Interval as i32);
    assert_eq!(altered.fsync_interval_ms, Some(200));
    assert_eq!(
        altered.retention_ms,
        Some(3_600_000),
        "unset fields keep their value"
    );

    admin
        .add_partitions(v1::AddPartitionsRequest {
            topic: "orders".into(),
            partitions: 5,
        })
        .await
        .unwrap();
    let err = admin
        .add_partitions(v1::AddPartitionsRequest {
            topic: "orders".into(),
            partitions: 2,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let d = admin
        .describe_topic(v1::DescribeTopicRequest {
            topic: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.partitions.len(), 5);
    assert!(
        d.partitions
            .iter()
            .all(|p| p.high_watermark == 0 && p.segments == 1)
    );

    let err = admin
        .describe_topic(v1::DescribeTopicRequest {
            topic: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let info = err.get_details_error_info().expect("ErrorInfo detail");
    assert_eq!(info.reason, "ERROR_CODE_UNKNOWN_TOPIC");
    assert_eq!(info.metadata.get("topic").map(String::as_str), Some("nope"));

    admin
        .delete_topic(v1::DeleteTopicRequest {
            topic: "orders".into(),
        })
        .await
        .unwrap();
    let err = admin
        .delete_topic(v1::DeleteTopicRequest {
            topic: "orders".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin
        .delete_topic(v1::DeleteTopicRequest {
            topic: "__consumer_offsets".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "internal topics are protected"
    );
    b.stop();
}

/// At shutdown every health status turns NOT_SERVING and a `Watch` stream sends that, then
/// ends. tonic-health's own `Watch` never ends while the server lives: a client doing gRPC
/// client-side health checking (one `Watch` kept open) held spoold's shutdown until
/// `shutdown_timeout_ms` (10 s). Multi-threaded: while the test thread blocks in `stop()`, the
/// client's connection task must keep running to answer the server's GOAWAY/PING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watch_says_not_serving_and_ends_at_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let mut health = tonic_health::pb::health_client::HealthClient::new(b.channel().await);
    let mut watches = Vec::new();
    for service in ["", "spool.v1.ConsumeService"] {
        let mut w = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .unwrap()
            .unwrap()
            .expect("a status");
        assert_eq!(first.status, ServingStatus::Serving as i32, "{service:?}");
        watches.push((service, w));
    }
    let took = b.stop();
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} with health watches open"
    );
    for (service, mut w) in watches {
        let mut last = None;
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match w.message().await {
                    Ok(Some(m)) => last = Some(m.status),
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(status),
                }
            }
        })
        .await
        .expect("the watch ended");
        assert!(ended.is_ok(), "{service:?}: {ended:?}");
        assert_eq!(
            last,
            Some(ServingStatus::NotServing as i32),
            "{service:?}: the last status before the end"
        );
    }
}

// Multi-threaded: while the test thread blocks in `stop()`, the client's connection task must
// keep running to answer the server's graceful-shutdown GOAWAY/PING (else stop waits 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_print_config() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start(dir.path(), &[]);
    let mut health = tonic_health::pb::health_client::HealthClient::new(b.channel().await);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "spool.v1.ProduceService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    b.stop();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spoold"))
        .args(["--print-config", "--data-dir", "/srv/spool"])
        .env("SPOOL_LIMITS__MAX_CONCURRENT_STREAMS", "77")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("data_dir = \"/srv/spool\""), "{text}");
    assert!(text.contains("max_concurrent_streams = 77"), "{text}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spoold"))
        .args(["--listen", "0.0.0.0:7170", "--print-config"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "non-loopback without opting in is refused"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    let b = Spoold::start_env(dir.path(), &[], &[("SPOOL_LIMITS__MAX_CONNECTIONS", "2")]);
    let list = |mut c: spool_proto::v1::admin_service_client::AdminServiceClient<
        tonic::transport::Channel,
    >| async move { c.list_topics(v1::ListTopicsRequest {}).await.map(|_| c) };
    let a1 = list(b.admin().await).await.unwrap();
    let a2 = list(b.admin().await).await.unwrap();
    // A third connection is not served while both slots are taken...
    let url = b.url();
    let third = tokio::spawn(async move {
        let ch = tonic::transport::Channel::from_shared(url)
            .unwrap()
            .connect_lazy();
        list(v1::admin_service_client::AdminServiceClient::new(ch))
            .await
            .map(|_| ())
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served over a limit of 2"
    );
    // ...and is served once one closes.
    drop(a1);
    tokio::time::timeout(std::time::Duration::from_secs(10), third)
        .await
        .expect("served after a slot freed")
        .unwrap()
        .unwrap();
    drop(a2);
    b.stop();
}
