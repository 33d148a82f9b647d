//! Consumer-group committed offsets, kept in the log itself.
//!
//! Every commit is one batch appended to the internal topic `__consumer_offsets` (one
//! partition, `fsync = always`) before the reply, so a commit survives restart and kill -9
//! exactly like produced data. The in-memory map is rebuilt on start by replaying that topic;
//! the log is the only truth, so the two cannot drift. Commits are serialised: the map is
//! updated in log order.
//!
//! ```text
//! record key   = group \0 topic \0 partition (decimal)
//! record value = JSON {"offset": u64, "metadata": string, "time_ms": i64}
//! ```
//! (Compaction of this topic arrives with compacted topics; until then it grows with commits
//! and retention must not be set on it.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use spool_log_engine::{BatchBuilder, Compression, Limits, Log, TopicConfig};
use spool_proto::v1;

use crate::error::BrokerError;

/// Name of the internal topic.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Longest group name.
pub(crate) const MAX_GROUP_NAME: usize = 249;
/// Longest commit metadata.
pub(crate) const MAX_METADATA: usize = 4096;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Value {
    offset: u64,
    metadata: String,
    time_ms: i64,
}

type Key = (String, String, u32);

/// The committed offsets of all groups.
#[derive(Debug)]
pub(crate) struct OffsetStore {
    log: Arc<Log>,
    map: Mutex<BTreeMap<Key, Value>>,
}

fn encode_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    format!("{group}\0{topic}\0{partition}").into_bytes()
}

fn decode_key(k: &[u8]) -> Option<Key> {
    let s = std::str::from_utf8(k).ok()?;
    let mut it = s.split('\0');
    let (g, t, p) = (it.next()?, it.next()?, it.next()?);
    Some((g.to_owned(), t.to_owned(), p.parse().ok()?))
}

impl OffsetStore {
    /// Opens the store, creating the internal topic if needed, and replays it. Blocking.
    pub(crate) fn open(log: Arc<Log>, limits: &Limits) -> Result<OffsetStore, BrokerError> {
        if log.topic_config(OFFSETS_TOPIC).is_err() {
            log.create_topic(OFFSETS_TOPIC, TopicConfig::default())?;
        }
        let p = log.partition(OFFSETS_TOPIC, 0)?;
        let mut map = BTreeMap::new();
        let mut offset = p.log_start_offset();
        loop {
            let r = p.read(offset, 4 << 20)?;
            if r.data.is_empty() {
                break;
            }
            for batch in r.batches() {
                let batch = batch?;
                for rec in batch.records(limits)? {
                    let rec = rec?;
                    let key = rec.key.as_deref().and_then(decode_key);
                    let value = rec
                        .value
                        .as_deref()
                        .and_then(|v| serde_json::from_slice::<Value>(v).ok());
                    match (key, value) {
                        (Some(k), Some(v)) => {
                            map.insert(k, v);
                        }
                        _ => tracing::warn!(
                            offset = rec.offset,
                            "skipping malformed offset commit record"
                        ),
                    }
                }
            }
            offset = r.next_offset;
        }
        tracing::info!(entries = map.len(), "loaded committed offsets");
        Ok(OffsetStore {
            log,
            map: Mutex::new(map),
        })
    }

    /// Durably commits `offsets` for `group` (all or nothing: one batch). Blocking.
    pub(crate) fn commit(
        &self,
        group: &str,
        offsets: &[v1::OffsetCommit],
        now_ms: i64,
    ) -> Result<(), BrokerError> {
        validate_group(group)?;
        if offsets.is_empty() {
            return Ok(());
        }
        let mut b = BatchBuilder::new(Compression::None);
        for c in offsets {
            if c.metadata.len() > MAX_METADATA {
                return Err(BrokerError::InvalidRequest(format!(
                    "metadata over {MAX_METADATA} bytes"
                )));
            }
            // The partition must exist: committing for a typo'd topic is a mistake to report.
            self.log.partition(&c.topic, c.partition)?;
            let value = serde_json::to_vec(&Value {
                offset: c.offset,
                metadata: c.metadata.clone(),
                time_ms: now_ms,
            })
            .map_err(|e| BrokerError::InvalidRequest(e.to_string()))?;
            b.push(
                now_ms,
                Some(&encode_key(group, &c.topic, c.partition)),
                Some(&value),
                &[],
            );
        }
        let batch = b.finish()?;
        let p = self.log.partition(OFFSETS_TOPIC, 0)?;
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let info = p.append_nowait(&batch)?;
        p.wait_durable(info.last_offset + 1)?;
        for c in offsets {
            map.insert(
                (group.to_owned(), c.topic.clone(), c.partition),
                Value {
                    offset: c.offset,
                    metadata: c.metadata.clone(),
                    time_ms: now_ms,
                },
            );
        }
        Ok(())
    }

    /// Every committed position: (group, topic, partition, offset).
    pub(crate) fn all(&self) -> Vec<(String, String, u32, u64)> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|((g, t, p), v)| (g.clone(), t.clone(), *p, v.offset))
            .collect()
    }

    /// A group's committed offsets: for the given partitions (in order), or all.
    pub(crate) fn fetch(
        &self,
        group: &str,
        partitions: &[v1::TopicPartition],
    ) -> Result<Vec<v1::CommittedOffset>, BrokerError> {
        validate_group(group)?;
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let answer = |topic: &str, partition: u32, v: Option<&Value>| v1::CommittedOffset {
            topic: topic.to_owned(),
            partition,
            offset: v.map(|v| v.offset),
            metadata: v.map(|v| v.metadata.clone()).unwrap_or_default(),
            commit_time_ms: v.map_or(0, |v| v.time_ms),
        };
        if partitions.is_empty() {
            return Ok(map
                .range((group.to_owned(), String::new(), 0)..)
                .take_while(|((g, _, _), _)| g == group)
                .map(|((_, t, p), v)| answer(t, *p, Some(v)))
                .collect());
        }
        Ok(partitions
            .iter()
            .map(|tp| {
                answer(
                    &tp.topic,
                    tp.partition,
                    map.get(&(group.to_owned(), tp.topic.clone(), tp.partition)),
                )
            })
            .collect())
    }
}

fn validate_group(group: &str) -> Result<(), BrokerError> {
    if group.is_empty() || group.len() > MAX_GROUP_NAME || group.chars().any(|c| c.is_control()) {
        return Err(BrokerError::InvalidRequest(format!(
            "group name must be 1 to {MAX_GROUP_NAME} printable characters"
        )));
    }
    Ok(())
}
