//! Consumes a topic from a running `spoold` with the Rust client's streaming consumer, resuming
//! from the consumer group's committed offsets.
//!
//! ```text
//! cargo run --example consume                                    # topic "demo", group "demo-consumer"
//! cargo run --example consume -- 127.0.0.1:7170 demo my-group    # [BROKER] [TOPIC] [GROUP]
//! ```
//! The broker address is the first argument, else `$SPOOL_BROKER`, else `127.0.0.1:7170`.
//! It prints records as they arrive (following the topic live), commits its positions every
//! 100 records, and after 5 s without new records commits and exits. Run it twice: the second
//! run starts where the first stopped.

use std::time::Duration;

use spool_client::{Client, ConsumerConfig, StartAt};

const IDLE: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args
        .next()
        .or_else(|| std::env::var("SPOOL_BROKER").ok())
        .unwrap_or_else(|| spool_client::DEFAULT_BROKER.to_owned());
    let topic = args.next().unwrap_or_else(|| "demo".to_owned());
    let group = args.next().unwrap_or_else(|| "demo-consumer".to_owned());

    let client = Client::connect(broker.as_str()).await?;
    let mut consumer = client.consumer(ConsumerConfig::with_group(group.as_str()));
    // Every partition, from the group's committed offset (the earliest offset if none).
    consumer.subscribe_topic(&topic, StartAt::Committed).await?;
    for (tp, position) in consumer.positions() {
        println!(
            "{}/{}: starting at offset {position}",
            tp.topic, tp.partition
        );
    }

    let mut seen = 0u64;
    loop {
        let record = match tokio::time::timeout(IDLE, consumer.next()).await {
            Err(_) => break, // idle
            Ok(None) => break,
            Ok(Some(r)) => r?,
        };
        seen += 1;
        let value = record.value.as_deref().map(String::from_utf8_lossy);
        let key = record.key.as_deref().map(String::from_utf8_lossy);
        println!(
            "{}/{} @{} ts={} key={key:?} value={value:?} headers={}",
            record.topic,
            record.partition,
            record.offset,
            record.timestamp_ms,
            record.headers.len()
        );
        if seen.is_multiple_of(100) {
            consumer.commit().await?;
        }
    }
    consumer.commit().await?;
    println!("read {seen} records; no new ones for {IDLE:?}; committed for group {group}:");
    for (tp, position) in consumer.positions() {
        let lag = consumer
            .lag(&tp.topic, tp.partition)
            .map_or("?".into(), |l| l.to_string());
        println!(
            "  {}/{}: next offset {position}, lag {lag}",
            tp.topic, tp.partition
        );
    }
    Ok(())
}
