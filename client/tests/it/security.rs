//! TLS and bearer tokens against a spoold configured with a certificate made for the test and
//! two tokens (by hash): the client's `tls` and `bearer_token` options, and the typed errors of
//! each refusal.

use std::time::Duration;

use spool_client::{
    Client, ConsumerConfig, Error, ProducerConfig, ProducerRecord, StartAt, TlsOptions,
    TopicSettings,
};

use crate::broker::{Broker, hash_token};

const OPS: &str = "ops-token-0123456789abcdef";
const READER: &str = "reader-token-0123456789abcdef";

/// A broker with TLS (a self-signed certificate for `localhost`) and two tokens: `OPS` may do
/// everything, `READER` may only consume `public.*` and use groups `readers-*`. Returns the CA
/// (the certificate itself) with it.
fn secured_broker() -> (Broker, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let ca = ck.cert.pem().into_bytes();
    let broker = Broker::start_with_config(|dir| {
        std::fs::write(dir.join("server.crt"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), ck.signing_key.serialize_pem()).unwrap();
        Some(format!(
            r#"
[tls]
cert = "{crt}"
key = "{key}"

[[auth.tokens]]
name = "ops"
sha256 = "{ops}"
admin = ["*"]
produce = ["*"]
consume = ["*"]
groups = ["*"]

[[auth.tokens]]
name = "reader"
sha256 = "{reader}"
consume = ["public."]
groups = ["readers-"]
"#,
            crt = dir.join("server.crt").display(),
            key = dir.join("server.key").display(),
            ops = hash_token(OPS),
            reader = hash_token(READER),
        ))
    });
    (broker, ca)
}

async fn connect(b: &Broker, ca: &[u8], token: Option<&str>) -> Client {
    let mut builder = Client::builder(format!("localhost:{}", b.port())).tls(TlsOptions {
        ca_pem: ca.to_vec(),
        domain: None,
        identity: None,
    });
    if let Some(t) = token {
        builder = builder.bearer_token(t);
    }
    builder.connect().await.expect("TLS connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tokens() {
    let (broker, ca) = secured_broker();

    let ops = connect(&broker, &ca, Some(OPS)).await;
    ops.create_topic("public.prices", 2, &TopicSettings::default())
        .await
        .unwrap();
    ops.create_topic("secret", 1, &TopicSettings::default())
        .await
        .unwrap();
    let producer = ops.producer(ProducerConfig::default());
    for i in 0..10 {
        let f = producer
            .send(
                "public.prices",
                ProducerRecord::new(format!("p{i}")).key(format!("k{i}")),
            )
            .await
            .unwrap();
        f.await.unwrap();
    }
    producer.close().await;

    // No token, or one the broker does not know: unauthenticated.
    for token in [None, Some("unknown-token-0123456789abcdef")] {
        let c = connect(&broker, &ca, token).await;
        let e = c.list_topics().await.unwrap_err();
        assert!(
            matches!(e, Error::Unauthenticated { .. }),
            "{token:?}: {e:?}"
        );
        assert!(!e.is_retriable());
    }

    // The reader consumes what its ACL allows, commits in its groups, and is refused the rest.
    let reader = connect(&broker, &ca, Some(READER)).await;
    let mut consumer = reader.consumer(ConsumerConfig::with_group("readers-1"));
    consumer
        .subscribe_topic("public.prices", StartAt::Earliest)
        .await
        .unwrap();
    let mut n = 0;
    while n < 10 {
        let r = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("records in time")
            .expect("a record")
            .unwrap();
        assert!(r.value.is_some());
        n += 1;
    }
    consumer.commit().await.unwrap();

    let e = reader
        .create_topic("public.new", 1, &TopicSettings::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotAuthorized { .. }), "{e:?}");
    let e = reader.describe_topic("secret").await.unwrap_err();
    assert!(matches!(e, Error::NotAuthorized { .. }), "{e:?}");
    let e = reader
        .fetch("secret", 0, 0, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotAuthorized { .. }), "{e:?}");
    let mut denied = reader.consumer(ConsumerConfig::default());
    let e = denied
        .subscribe("secret", 0, StartAt::Earliest)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotAuthorized { .. }), "{e:?}");
    let e = reader.fetch_offsets("ops-group", &[]).await.unwrap_err();
    assert!(matches!(e, Error::NotAuthorized { .. }), "{e:?}");

    let reader_producer = reader.producer(ProducerConfig::default());
    let e = match reader_producer
        .send_to("public.prices", 0, ProducerRecord::new("x"))
        .await
    {
        Ok(delivery) => delivery.await.unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(e, Error::NotAuthorized { .. }), "{e:?}");
    assert_eq!(
        reader_producer.stats().retries,
        0,
        "refusals are not retried"
    );

    // Plaintext against the TLS listener fails; so does TLS without the right CA.
    let plain = Client::builder(broker.addr()).connect_timeout(Duration::from_secs(5));
    match plain.connect().await {
        Err(e) => assert!(matches!(e, Error::Connect { .. }), "{e:?}"),
        Ok(c) => assert!(c.list_topics().await.is_err()),
    }
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let wrong_ca = Client::builder(format!("localhost:{}", broker.port()))
        .tls(TlsOptions {
            ca_pem: other.cert.pem().into_bytes(),
            domain: None,
            identity: None,
        })
        .bearer_token(OPS)
        .connect()
        .await;
    assert!(
        wrong_ca.is_err(),
        "a certificate from another CA is refused"
    );
}
