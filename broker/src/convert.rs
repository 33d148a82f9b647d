//! Conversions between wire messages and engine types, with validation at the boundary.

use bytes::Bytes;
use spool_log_engine::{BatchBuilder, CleanupPolicy, Compression, FsyncPolicy, TopicConfig};
use spool_proto::v1;

use crate::error::BrokerError;

fn invalid(msg: impl Into<String>) -> BrokerError {
    BrokerError::InvalidRequest(msg.into())
}

/// Applies the set fields of a wire config onto `base`.
pub(crate) fn apply_topic_config(
    base: &mut TopicConfig,
    wire: &v1::TopicConfig,
) -> Result<(), BrokerError> {
    if let Some(v) = wire.retention_ms {
        base.retention_ms = (v > 0).then_some(v);
    }
    if let Some(v) = wire.retention_bytes {
        base.retention_bytes = (v > 0).then_some(v);
    }
    if let Some(v) = wire.segment_bytes {
        base.segment_bytes = v;
    }
    if let Some(v) = wire.segment_ms {
        base.segment_ms = v;
    }
    if let Some(v) = wire.max_message_bytes {
        base.max_batch_bytes = v;
    }
    let interval = wire.fsync_interval_ms;
    match v1::FsyncPolicy::try_from(wire.fsync_policy)
        .map_err(|_| invalid("unknown fsync_policy"))?
    {
        v1::FsyncPolicy::Unspecified => {
            if let (Some(ms), FsyncPolicy::Interval { .. }) = (interval, base.fsync) {
                base.fsync = FsyncPolicy::Interval { interval_ms: ms };
            }
        }
        v1::FsyncPolicy::Always => base.fsync = FsyncPolicy::Always,
        v1::FsyncPolicy::Never => base.fsync = FsyncPolicy::Never,
        v1::FsyncPolicy::Interval => {
            let previous = match base.fsync {
                FsyncPolicy::Interval { interval_ms } => interval_ms,
                _ => 1000,
            };
            base.fsync = FsyncPolicy::Interval {
                interval_ms: interval.unwrap_or(previous),
            };
        }
    }
    match v1::CleanupPolicy::try_from(wire.cleanup_policy)
        .map_err(|_| invalid("unknown cleanup_policy"))?
    {
        v1::CleanupPolicy::Unspecified => {}
        v1::CleanupPolicy::Delete => base.cleanup = CleanupPolicy::Delete,
        v1::CleanupPolicy::Compact => base.cleanup = CleanupPolicy::Compact,
        v1::CleanupPolicy::CompactDelete => base.cleanup = CleanupPolicy::CompactDelete,
    }
    if let Some(v) = wire.delete_retention_ms {
        base.delete_retention_ms = v;
    }
    if let Some(v) = wire.min_compaction_lag_ms {
        base.min_compaction_lag_ms = v;
    }
    if let Some(v) = wire.min_cleanable_dirty_percent {
        base.min_cleanable_dirty_percent = u8::try_from(v)
            .ok()
            .filter(|v| *v <= 100)
            .ok_or_else(|| invalid("min_cleanable_dirty_percent must be in 0..=100"))?;
    }
    Ok(())
}

/// The wire form of an engine config, every field set.
pub(crate) fn topic_config_to_wire(c: &TopicConfig) -> v1::TopicConfig {
    let (policy, interval) = match c.fsync {
        FsyncPolicy::Always => (v1::FsyncPolicy::Always, 0),
        FsyncPolicy::Never => (v1::FsyncPolicy::Never, 0),
        FsyncPolicy::Interval { interval_ms } => (v1::FsyncPolicy::Interval, interval_ms),
    };
    v1::TopicConfig {
        retention_ms: Some(c.retention_ms.unwrap_or(0)),
        retention_bytes: Some(c.retention_bytes.unwrap_or(0)),
        segment_bytes: Some(c.segment_bytes),
        segment_ms: Some(c.segment_ms),
        fsync_policy: policy as i32,
        fsync_interval_ms: Some(interval),
        cleanup_policy: match c.cleanup {
            CleanupPolicy::Delete => v1::CleanupPolicy::Delete,
            CleanupPolicy::Compact => v1::CleanupPolicy::Compact,
            CleanupPolicy::CompactDelete => v1::CleanupPolicy::CompactDelete,
        } as i32,
        max_message_bytes: Some(c.max_batch_bytes),
        delete_retention_ms: Some(c.delete_retention_ms),
        min_compaction_lag_ms: Some(c.min_compaction_lag_ms),
        min_cleanable_dirty_percent: Some(u32::from(c.min_cleanable_dirty_percent)),
    }
}

/// Encodes a wire record list into one batch. `now_ms` replaces zero timestamps.
pub(crate) fn encode_records(
    list: &v1::RecordList,
    now_ms: i64,
    max_records: usize,
) -> Result<Bytes, BrokerError> {
    if list.records.is_empty() {
        return Err(invalid("a record list needs at least one record"));
    }
    if list.records.len() > max_records {
        return Err(invalid(format!(
            "{} records in one list, the limit is {max_records}",
            list.records.len()
        )));
    }
    let compression = match v1::Compression::try_from(list.compression)
        .map_err(|_| invalid("unknown compression"))?
    {
        v1::Compression::Unspecified | v1::Compression::None => Compression::None,
        v1::Compression::Lz4 => Compression::Lz4,
        v1::Compression::Zstd => Compression::Zstd,
    };
    let size: usize = list
        .records
        .iter()
        .map(|r| r.value.as_ref().map_or(0, Bytes::len) + 16)
        .sum();
    let mut b = BatchBuilder::with_capacity(compression, size);
    let mut headers = Vec::new();
    for r in &list.records {
        headers.clear();
        headers.extend(
            r.headers
                .iter()
                .map(|h| (h.key.as_str(), h.value.as_deref())),
        );
        let ts = if r.timestamp_ms == 0 {
            now_ms
        } else {
            r.timestamp_ms
        };
        b.push(ts, r.key.as_deref(), r.value.as_deref(), &headers);
    }
    b.finish().map_err(BrokerError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_roundtrip_and_partial_alter() {
        let mut c = TopicConfig::default();
        let wire = v1::TopicConfig {
            retention_ms: Some(5000),
            fsync_policy: v1::FsyncPolicy::Interval as i32,
            fsync_interval_ms: Some(50),
            ..Default::default()
        };
        apply_topic_config(&mut c, &wire).unwrap();
        assert_eq!(c.retention_ms, Some(5000));
        assert_eq!(c.fsync, FsyncPolicy::Interval { interval_ms: 50 });
        assert_eq!(
            c.segment_bytes,
            TopicConfig::default().segment_bytes,
            "unset fields unchanged"
        );
        let mut again = TopicConfig::default();
        apply_topic_config(&mut again, &topic_config_to_wire(&c)).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn compaction_settings_roundtrip() {
        let mut c = TopicConfig::default();
        let wire = v1::TopicConfig {
            cleanup_policy: v1::CleanupPolicy::CompactDelete as i32,
            delete_retention_ms: Some(60_000),
            min_compaction_lag_ms: Some(5),
            min_cleanable_dirty_percent: Some(10),
            ..Default::default()
        };
        apply_topic_config(&mut c, &wire).unwrap();
        assert_eq!(c.cleanup, CleanupPolicy::CompactDelete);
        assert_eq!(
            (
                c.delete_retention_ms,
                c.min_compaction_lag_ms,
                c.min_cleanable_dirty_percent
            ),
            (60_000, 5, 10)
        );
        // Unset: unchanged.
        apply_topic_config(&mut c, &v1::TopicConfig::default()).unwrap();
        assert_eq!(c.cleanup, CleanupPolicy::CompactDelete);
        let mut again = TopicConfig::default();
        apply_topic_config(&mut again, &topic_config_to_wire(&c)).unwrap();
        assert_eq!(again, c);
        let bad = v1::TopicConfig {
            min_cleanable_dirty_percent: Some(101),
            ..Default::default()
        };
        assert!(apply_topic_config(&mut c, &bad).is_err());
    }
}
