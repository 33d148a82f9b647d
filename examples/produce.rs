//! Produces records to a running `spoold` with the Rust client's batching producer.
//!
//! ```text
//! cargo run --bin spoold                                   # in one shell
//! cargo run --example produce                              # in another: 20 records to "demo"
//! cargo run --example produce -- 127.0.0.1:7170 demo 1000  # [BROKER] [TOPIC] [COUNT]
//! ```
//! The broker address is the first argument, else `$SPOOL_BROKER`, else `127.0.0.1:7170`.
//! The topic is created with 2 partitions if it does not exist. Records are keyed by sensor,
//! so each sensor's readings stay in order on one partition (murmur2 of the key, as Kafka).

use std::time::Duration;

use spool_client::{
    Acks, Client, Compression, Error, ProducerConfig, ProducerRecord, TopicSettings,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args
        .next()
        .or_else(|| std::env::var("SPOOL_BROKER").ok())
        .unwrap_or_else(|| spool_client::DEFAULT_BROKER.to_owned());
    let topic = args.next().unwrap_or_else(|| "demo".to_owned());
    let count: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(20);

    let client = Client::connect(broker.as_str()).await?;
    match client
        .create_topic(&topic, 2, &TopicSettings::default())
        .await
    {
        Ok(_) => println!("created topic {topic} with 2 partitions"),
        Err(Error::TopicExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }

    let producer = client.producer(ProducerConfig {
        acks: Acks::Durable,
        compression: Compression::Lz4,
        linger: Duration::from_millis(10),
        ..ProducerConfig::default()
    });
    let started = std::time::Instant::now();
    let mut deliveries = Vec::with_capacity(count);
    for i in 0..count {
        let sensor = format!("sensor-{}", i % 4);
        let reading = format!(
            r#"{{"sensor":"{sensor}","celsius":{:.1}}}"#,
            20.0 + (i % 7) as f64 * 0.5
        );
        let record = ProducerRecord::new(reading)
            .key(sensor)
            .header("source", "examples/produce.rs");
        // Returns once buffered (this is where backpressure applies); the future resolves once
        // the broker acknowledged the record.
        deliveries.push(producer.send(&topic, record).await?);
    }
    for d in deliveries.iter_mut().take(5) {
        let m = d.await?;
        println!(
            "acknowledged: {}/{} offset {:?}",
            m.topic, m.partition, m.offset
        );
    }
    for d in deliveries.into_iter().skip(5) {
        d.await?;
    }
    producer.close().await;
    let s = producer.stats();
    println!(
        "produced {} records to {topic} in {:?}: {} batches in {} requests, {} retries",
        s.records_acked,
        started.elapsed(),
        s.batches_sent,
        s.requests_sent,
        s.retries
    );
    for p in client.describe_topic(&topic).await?.partitions {
        println!(
            "  partition {}: offsets {}..{}",
            p.partition, p.log_start_offset, p.high_watermark
        );
    }
    Ok(())
}
