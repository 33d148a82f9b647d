//! Integration tests of the client against a real `spoold` process (see `broker.rs` for how
//! it is found and run). Each test starts its own broker on a temp dir and an ephemeral port.

mod admin;
mod broker;
mod compaction;
mod consume;
mod exactly_once;
mod group_consumer;
mod groups;
mod history;
mod idempotence;
mod produce;
mod security;
mod transactions;
mod txn_crash;
mod txn_history;

use std::time::Duration;

use spool_client::{Client, ProducerConfig, ProducerRecord, TopicSettings};

/// Creates `topic` with `partitions` partitions and default settings.
async fn create(client: &Client, topic: &str, partitions: u32) {
    client
        .create_topic(topic, partitions, &TopicSettings::default())
        .await
        .unwrap_or_else(|e| panic!("creating {topic}: {e}"));
}

/// Produces `n` records `v0..v{n}` (keys `k{i}`, timestamps `base_ts + 1000 * i`) to one
/// partition and returns their offsets.
async fn produce_n(
    client: &Client,
    topic: &str,
    partition: u32,
    n: usize,
    base_ts: i64,
) -> Vec<u64> {
    let producer = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..ProducerConfig::default()
    });
    let mut futs = Vec::new();
    for i in 0..n {
        let r = ProducerRecord::new(format!("v{i}"))
            .key(format!("k{i}"))
            .timestamp_ms(base_ts + 1000 * i as i64);
        futs.push(producer.send_to(topic, partition, r).await.expect("send"));
    }
    producer.close().await;
    let mut offsets = Vec::new();
    for f in futs {
        offsets.push(f.await.expect("delivery").offset.expect("offset"));
    }
    offsets
}

/// xorshift64*, seeded: the history checkers' choices and kill schedules.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
