//! Producer ids for idempotent producers, allocated durably in the log.
//!
//! Ids are handed out from blocks of [`BLOCK`]. Before the first id of a block is handed out,
//! the block's end is appended (fsynced) to the internal topic `__producer_ids`; at start the
//! broker continues after the last recorded end. So an id is never handed out twice, even
//! across kill -9 (the unused rest of a block is skipped, which costs nothing: ids are i64).
//!
//! ```text
//! record value = block end, u64 little-endian (ids below it are taken)
//! ```

use std::sync::{Arc, Mutex};

use spool_log_engine::{BatchBuilder, Compression, Log, TopicConfig};

use crate::error::BrokerError;

/// Name of the internal topic.
pub const PRODUCER_IDS_TOPIC: &str = "__producer_ids";
/// Ids reserved by one durable append.
pub(crate) const BLOCK: u64 = 1000;
/// The first id ever handed out (0 is left unused, which makes "no id" easy to spot).
const FIRST: u64 = 1;

#[derive(Debug)]
struct Range {
    next: u64,
    end: u64,
}

/// The allocator.
#[derive(Debug)]
pub(crate) struct ProducerIds {
    log: Arc<Log>,
    range: Mutex<Range>,
}

impl ProducerIds {
    /// Opens the allocator, creating its topic if needed. Blocking.
    pub(crate) fn open(log: Arc<Log>) -> Result<ProducerIds, BrokerError> {
        if log.topic_config(PRODUCER_IDS_TOPIC).is_err() {
            log.create_topic(PRODUCER_IDS_TOPIC, TopicConfig::default())?;
        }
        let p = log.partition(PRODUCER_IDS_TOPIC, 0)?;
        let hwm = p.high_watermark();
        let mut taken = FIRST;
        if hwm > p.log_start_offset() {
            let r = p.read(hwm - 1, 1 << 16)?;
            for batch in r.batches() {
                for rec in batch?.records(&Default::default())? {
                    let rec = rec?;
                    let end = rec
                        .value
                        .as_deref()
                        .and_then(|v| <[u8; 8]>::try_from(v).ok())
                        .map(u64::from_le_bytes)
                        .ok_or_else(|| {
                            BrokerError::Engine(spool_log_engine::Error::Corruption {
                                path: p.dir().to_path_buf(),
                                position: 0,
                                offset: Some(rec.offset),
                                reason: "a __producer_ids record is not an 8-byte block end".into(),
                            })
                        })?;
                    taken = taken.max(end);
                }
            }
        }
        tracing::info!(next = taken, "producer ids resume");
        Ok(ProducerIds {
            log,
            range: Mutex::new(Range {
                next: taken,
                end: taken,
            }),
        })
    }

    /// A new producer id. Blocking when a new block has to be recorded (one fsync per
    /// [`BLOCK`] ids).
    pub(crate) fn allocate(&self, now_ms: i64) -> Result<i64, BrokerError> {
        let mut r = self.range.lock().unwrap_or_else(|e| e.into_inner());
        if r.next >= r.end {
            let end = r.end.max(r.next) + BLOCK;
            if end > i64::MAX as u64 {
                return Err(BrokerError::InvalidRequest(
                    "producer ids are exhausted".into(),
                ));
            }
            let mut b = BatchBuilder::new(Compression::None);
            b.push(now_ms, None, Some(&end.to_le_bytes()), &[]);
            let p = self.log.partition(PRODUCER_IDS_TOPIC, 0)?;
            let info = p.append_nowait(&b.finish()?)?;
            p.wait_durable(info.last_offset + 1)?;
            r.end = end;
        }
        let id = r.next;
        r.next += 1;
        Ok(id as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Arc<Log> {
        Arc::new(
            Log::open(
                dir,
                spool_log_engine::LogOptions {
                    background_maintenance: false,
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    }

    #[test]
    fn ids_are_unique_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = std::collections::HashSet::new();
        for round in 0..3 {
            let log = open(dir.path());
            let ids = ProducerIds::open(log.clone()).unwrap();
            for _ in 0..(BLOCK + 5) {
                let id = ids.allocate(0).unwrap();
                assert!(id >= FIRST as i64);
                assert!(seen.insert(id), "round {round}: {id} handed out twice");
            }
            // Two blocks per round: one append per block.
            let hwm = log
                .partition(PRODUCER_IDS_TOPIC, 0)
                .unwrap()
                .high_watermark();
            assert_eq!(hwm, 2 * (round + 1));
            drop(ids);
            log.close().unwrap();
        }
    }
}
