//! Admin calls and their typed errors.

use std::time::Duration;

use spool_client::{Client, Error, FsyncPolicy, TopicSettings};

use crate::broker::Broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_lifecycle() {
    let broker = Broker::start();
    let c = broker.client().await;

    let settings = TopicSettings {
        retention_ms: Some(3_600_000),
        fsync: Some(FsyncPolicy::Never),
        ..TopicSettings::default()
    };
    let cfg = c.create_topic("orders", 3, &settings).await.unwrap();
    assert_eq!(cfg.retention_ms, Some(3_600_000));
    assert_eq!(cfg.retention_bytes, None);
    assert_eq!(cfg.fsync, FsyncPolicy::Never);
    assert!(
        cfg.segment_bytes > 0 && cfg.max_message_bytes > 0,
        "{cfg:?}"
    );

    let topics = c.list_topics().await.unwrap();
    let orders = topics.iter().find(|t| t.topic == "orders").expect("listed");
    assert_eq!(orders.partitions, 3);

    let d = c.describe_topic("orders").await.unwrap();
    assert_eq!(d.topic, "orders");
    assert_eq!(d.config, cfg);
    assert_eq!(d.partitions.len(), 3);
    for (i, p) in d.partitions.iter().enumerate() {
        assert_eq!(p.partition, i as u32);
        assert_eq!((p.log_start_offset, p.high_watermark), (0, 0));
        assert!(p.segments >= 1);
    }

    // Alter changes only what is set.
    let altered = c
        .alter_topic_config(
            "orders",
            &TopicSettings {
                segment_bytes: Some(1 << 20),
                fsync: Some(FsyncPolicy::Interval { interval_ms: 50 }),
                ..TopicSettings::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(altered.segment_bytes, 1 << 20);
    assert_eq!(altered.fsync, FsyncPolicy::Interval { interval_ms: 50 });
    assert_eq!(
        altered.retention_ms,
        Some(3_600_000),
        "unset fields unchanged"
    );
    // Some(0) removes a limit.
    let altered = c
        .alter_topic_config(
            "orders",
            &TopicSettings {
                retention_ms: Some(0),
                ..TopicSettings::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(altered.retention_ms, None);
    assert_eq!(c.describe_topic("orders").await.unwrap().config, altered);

    assert_eq!(c.add_partitions("orders", 5).await.unwrap(), 5);
    assert_eq!(
        c.describe_topic("orders").await.unwrap().partitions.len(),
        5
    );
    let e = c.add_partitions("orders", 2).await.unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");

    c.delete_topic("orders").await.unwrap();
    let e = c.describe_topic("orders").await.unwrap_err();
    assert!(
        matches!(&e, Error::UnknownTopic { topic, .. } if topic == "orders"),
        "{e:?}"
    );
    let e = c.delete_topic("orders").await.unwrap_err();
    assert!(matches!(e, Error::UnknownTopic { .. }), "{e:?}");
    assert!(
        c.list_topics()
            .await
            .unwrap()
            .iter()
            .all(|t| t.topic != "orders")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_errors() {
    let broker = Broker::start();
    let c = broker.client().await;
    let none = TopicSettings::default();

    c.create_topic("dup", 1, &none).await.unwrap();
    let e = c.create_topic("dup", 1, &none).await.unwrap_err();
    assert!(
        matches!(&e, Error::TopicExists { topic } if topic == "dup"),
        "{e:?}"
    );
    assert!(!e.is_retriable());

    for bad in ["bad name!", "", ".hidden"] {
        let e = c.create_topic(bad, 1, &none).await.unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { .. }), "{bad:?}: {e:?}");
    }
    // Names starting with `__` belong to the broker.
    let e = c.create_topic("__mine", 1, &none).await.unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");
    let e = c.delete_topic("__consumer_offsets").await.unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");

    let e = c
        .create_topic("toomany", 1_000_000, &none)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");
    let e = c.alter_topic_config("nope", &none).await.unwrap_err();
    assert!(
        matches!(&e, Error::UnknownTopic { topic, .. } if topic == "nope"),
        "{e:?}"
    );
    let e = c.add_partitions("nope", 3).await.unwrap_err();
    assert!(matches!(e, Error::UnknownTopic { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors() {
    // A port nobody listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let e = Client::builder(addr.as_str())
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Connect { addr: a, .. } if *a == addr),
        "{e:?}"
    );

    // A lazy client fails per call, with a retriable error.
    let lazy = Client::builder(addr.as_str()).connect_lazy().unwrap();
    let e = lazy.list_topics().await.unwrap_err();
    assert!(e.is_retriable(), "{e:?}");

    let e = Client::connect("https://127.0.0.1:1").await.unwrap_err();
    assert!(matches!(e, Error::InvalidAddress { .. }), "{e:?}");
}
