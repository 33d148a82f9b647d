//! Shared helpers for the integration tests.

use spool_log_engine::{BatchBuilder, Compression, Log, LogOptions, Partition, Record, TopicConfig};

/// Options for tests: no background thread, so every effect is caused by the test itself.
pub fn opts() -> LogOptions {
    LogOptions {
        background_maintenance: false,
        ..LogOptions::default()
    }
}

/// A batch of `n` records whose values are `"{tag}-{i}"`.
pub fn batch(tag: &str, n: usize, ts: i64) -> bytes::Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..n {
        let v = format!("{tag}-{i}");
        b.push(ts, Some(tag.as_bytes()), Some(v.as_bytes()), &[]);
    }
    b.finish().unwrap()
}

/// Every record readable from `offset` to the high watermark.
pub fn read_all(p: &Partition, mut offset: u64) -> Vec<Record> {
    let mut out = Vec::new();
    loop {
        let r = p.read(offset, 64 << 10).unwrap();
        if r.data.is_empty() {
            return out;
        }
        for b in r.batches() {
            for rec in b.unwrap().records(&Default::default()).unwrap() {
                out.push(rec.unwrap());
            }
        }
        offset = r.next_offset;
    }
}

/// Opens `dir` with one topic `t` configured by `cfg` (created if missing).
pub fn open_topic(dir: &std::path::Path, cfg: TopicConfig) -> Log {
    let log = Log::open(dir, opts()).unwrap();
    if log.topic_config("t").is_err() {
        log.create_topic("t", cfg).unwrap();
    }
    log
}
