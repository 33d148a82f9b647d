//! Embeds Spool's log engine: opens a data directory, writes a few batches to a topic,
//! reads them back, looks an offset up by time, and prints what it did.
//!
//! ```text
//! cargo run --release --example embedded_log            # data under ./spool-data
//! cargo run --release --example embedded_log -- /tmp/x  # or anywhere else
//! ```
//! Run it twice: the second run continues at the offsets the first one left, because every
//! append was fsynced before it returned.

use std::time::{SystemTime, UNIX_EPOCH};

use spool_log_engine::{BatchBuilder, Compression, DecodeLimits, Log, LogOptions, TopicConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./spool-data".to_owned());
    let log = Log::open(&dir, LogOptions::default())?;
    println!("opened log at {dir}");
    for (topic, partition, r) in log.recovery_reports() {
        println!(
            "  recovered {topic}/{partition}: {} segment(s), {} bytes checked past the recovery point, {} torn bytes cut",
            r.segments, r.bytes_scanned, r.bytes_truncated
        );
    }
    if log.topic_config("prices").is_err() {
        log.create_topic(
            "prices",
            TopicConfig {
                partitions: 2,
                ..TopicConfig::default()
            },
        )?;
        println!("created topic prices with 2 partitions (fsync = always)");
    }

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let products = ["espresso-machine", "headphones", "air-fryer", "monitor"];
    let p = log.partition("prices", 0)?;
    let first = p.high_watermark();
    for (n, compression) in [Compression::None, Compression::Lz4, Compression::Zstd]
        .into_iter()
        .enumerate()
    {
        let mut b = BatchBuilder::new(compression);
        for (i, product) in products.iter().enumerate() {
            let price = format!(
                "{{\"product\":\"{product}\",\"price_cents\":{}}}",
                9_900 + 100 * (n * 4 + i)
            );
            b.push(
                now + n as i64,
                Some(product.as_bytes()),
                Some(price.as_bytes()),
                &[("source", Some(b"example"))],
            );
        }
        let at = p.append(&b.finish()?)?;
        println!(
            "appended a {compression:?} batch of {} records at offsets {}..={}",
            products.len(),
            at.base_offset,
            at.last_offset
        );
    }

    println!("reading prices/0 from offset {first}:");
    let mut offset = first;
    loop {
        let r = p.read(offset, 64 << 10)?;
        if r.data.is_empty() {
            break;
        }
        for batch in r.batches() {
            for rec in batch?.records(&DecodeLimits::default())? {
                let rec = rec?;
                println!(
                    "  offset {:>4}  ts {}  key {:<18} value {}",
                    rec.offset,
                    rec.timestamp,
                    String::from_utf8_lossy(rec.key.as_deref().unwrap_or_default()),
                    String::from_utf8_lossy(rec.value.as_deref().unwrap_or_default())
                );
            }
        }
        offset = r.next_offset;
    }
    let by_time = p.offset_for_timestamp(now + 1)?;
    println!(
        "first offset at or after timestamp {}: {by_time:?}",
        now + 1
    );
    let s = p.stats();
    println!(
        "prices/0: log start {}, high watermark {}, {} bytes in {} segment(s)",
        s.log_start_offset, s.high_watermark, s.size_bytes, s.segments
    );
    log.close()?;
    println!(
        "closed cleanly; run again to continue from offset {}",
        s.high_watermark
    );
    Ok(())
}
