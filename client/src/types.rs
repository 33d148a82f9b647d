//! Typed forms of the wire messages that callers handle directly: topic configs and
//! descriptions, records, offsets, consumer groups.
//!
//! Conversions to and from `spool_proto::v1` live here and nowhere else.

use std::sync::Arc;

use bytes::Bytes;
use spool_proto::v1;

/// When a topic's appended data is forced to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Acknowledged as durable only after an fdatasync that covers it (group commit).
    Always,
    /// fdatasync every `interval_ms`; acknowledged data can be lost on power failure.
    Interval {
        /// Milliseconds between syncs.
        interval_ms: u64,
    },
    /// Never fsync on the write path (page cache only).
    Never,
}

/// What happens to a topic's old data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CleanupPolicy {
    /// Whole old segments are deleted past the retention limits.
    #[default]
    Delete,
    /// Compaction: the latest record of each key is kept (offsets of kept records never
    /// change, so offsets become sparse); tombstones (null values) go `delete_retention_ms`
    /// after the cleaner first passed them. Every record needs a key. Retention limits are
    /// ignored.
    Compact,
    /// Compaction and deletion of old segments past the retention limits.
    CompactDelete,
}

impl CleanupPolicy {
    /// Kafka's spelling: `delete`, `compact` or `compact,delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::CompactDelete => "compact,delete",
        }
    }

    fn to_wire(self) -> v1::CleanupPolicy {
        match self {
            CleanupPolicy::Delete => v1::CleanupPolicy::Delete,
            CleanupPolicy::Compact => v1::CleanupPolicy::Compact,
            CleanupPolicy::CompactDelete => v1::CleanupPolicy::CompactDelete,
        }
    }
}

impl std::fmt::Display for CleanupPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A topic's effective settings, as the broker reports them (every field known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    /// Segments whose newest record is older than this are deleted; `None` keeps forever.
    pub retention_ms: Option<u64>,
    /// Oldest segments are deleted while a partition is larger than this; `None`: no limit.
    pub retention_bytes: Option<u64>,
    /// The active segment rolls at this size.
    pub segment_bytes: u64,
    /// The active segment rolls at this age.
    pub segment_ms: u64,
    /// fsync policy.
    pub fsync: FsyncPolicy,
    /// Cleanup policy.
    pub cleanup: CleanupPolicy,
    /// Largest record batch the topic accepts (bytes, header included).
    pub max_message_bytes: u32,
    /// Compacted topics: how long a tombstone stays after the cleaner first passed it (ms).
    pub delete_retention_ms: u64,
    /// Compacted topics: a segment is cleaned only once its newest record is this old (ms).
    pub min_compaction_lag_ms: u64,
    /// Compacted topics: a partition is cleaned once its uncleaned part is this percentage of
    /// its sealed segments.
    pub min_cleanable_dirty_percent: u8,
}

/// Settings to create a topic with, or to change: `None` fields take the broker's default
/// (create) or stay as they are (alter).
///
/// Retention limits use `Some(0)` for "no limit" (as the wire does), so that an alter can remove
/// a limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicSettings {
    /// Time retention; `Some(0)` keeps forever.
    pub retention_ms: Option<u64>,
    /// Size retention per partition; `Some(0)` means no limit.
    pub retention_bytes: Option<u64>,
    /// Segment roll size.
    pub segment_bytes: Option<u64>,
    /// Segment roll age.
    pub segment_ms: Option<u64>,
    /// fsync policy.
    pub fsync: Option<FsyncPolicy>,
    /// Largest batch accepted.
    pub max_message_bytes: Option<u32>,
    /// Cleanup policy.
    pub cleanup: Option<CleanupPolicy>,
    /// Compacted topics: tombstone retention after the cleaner first passed it (ms).
    pub delete_retention_ms: Option<u64>,
    /// Compacted topics: minimum age of a segment's newest record before it is cleaned (ms).
    pub min_compaction_lag_ms: Option<u64>,
    /// Compacted topics: dirty percentage that triggers cleaning (0–100).
    pub min_cleanable_dirty_percent: Option<u8>,
}

impl TopicSettings {
    pub(crate) fn to_wire(&self) -> v1::TopicConfig {
        let (policy, interval) = match self.fsync {
            None => (v1::FsyncPolicy::Unspecified, None),
            Some(FsyncPolicy::Always) => (v1::FsyncPolicy::Always, None),
            Some(FsyncPolicy::Never) => (v1::FsyncPolicy::Never, None),
            Some(FsyncPolicy::Interval { interval_ms }) => {
                (v1::FsyncPolicy::Interval, Some(interval_ms))
            }
        };
        v1::TopicConfig {
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            segment_bytes: self.segment_bytes,
            segment_ms: self.segment_ms,
            fsync_policy: policy as i32,
            fsync_interval_ms: interval,
            cleanup_policy: self
                .cleanup
                .map_or(v1::CleanupPolicy::Unspecified, CleanupPolicy::to_wire)
                as i32,
            max_message_bytes: self.max_message_bytes,
            delete_retention_ms: self.delete_retention_ms,
            min_compaction_lag_ms: self.min_compaction_lag_ms,
            min_cleanable_dirty_percent: self.min_cleanable_dirty_percent.map(u32::from),
        }
    }
}

impl TopicConfig {
    pub(crate) fn from_wire(c: &v1::TopicConfig) -> TopicConfig {
        let nonzero = |v: Option<u64>| v.filter(|v| *v > 0);
        let fsync = match v1::FsyncPolicy::try_from(c.fsync_policy) {
            Ok(v1::FsyncPolicy::Never) => FsyncPolicy::Never,
            Ok(v1::FsyncPolicy::Interval) => FsyncPolicy::Interval {
                interval_ms: c.fsync_interval_ms.unwrap_or_default(),
            },
            _ => FsyncPolicy::Always,
        };
        TopicConfig {
            retention_ms: nonzero(c.retention_ms),
            retention_bytes: nonzero(c.retention_bytes),
            segment_bytes: c.segment_bytes.unwrap_or_default(),
            segment_ms: c.segment_ms.unwrap_or_default(),
            fsync,
            cleanup: match v1::CleanupPolicy::try_from(c.cleanup_policy) {
                Ok(v1::CleanupPolicy::Compact) => CleanupPolicy::Compact,
                Ok(v1::CleanupPolicy::CompactDelete) => CleanupPolicy::CompactDelete,
                _ => CleanupPolicy::Delete,
            },
            max_message_bytes: c.max_message_bytes.unwrap_or_default(),
            delete_retention_ms: c.delete_retention_ms.unwrap_or_default(),
            min_compaction_lag_ms: c.min_compaction_lag_ms.unwrap_or_default(),
            min_cleanable_dirty_percent: c
                .min_cleanable_dirty_percent
                .map_or(0, |v| v.min(100) as u8),
        }
    }
}

/// A topic in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSummary {
    /// Name.
    pub topic: String,
    /// Number of partitions.
    pub partitions: u32,
}

/// The state of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Partition number.
    pub partition: u32,
    /// First offset still in the log.
    pub log_start_offset: u64,
    /// Next offset to be read (everything below is readable).
    pub high_watermark: u64,
    /// Bytes of all segments.
    pub size_bytes: u64,
    /// Number of segments.
    pub segments: u32,
}

/// A topic's config and per-partition state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicDescription {
    /// Name.
    pub topic: String,
    /// Effective config.
    pub config: TopicConfig,
    /// One entry per partition, in order.
    pub partitions: Vec<PartitionInfo>,
}

impl TopicDescription {
    pub(crate) fn from_wire(d: v1::DescribeTopicResponse) -> TopicDescription {
        TopicDescription {
            topic: d.topic,
            config: TopicConfig::from_wire(&d.config.unwrap_or_default()),
            partitions: d
                .partitions
                .into_iter()
                .map(|p| PartitionInfo {
                    partition: p.partition,
                    log_start_offset: p.log_start_offset,
                    high_watermark: p.high_watermark,
                    size_bytes: p.size_bytes,
                    segments: p.segments,
                })
                .collect(),
        }
    }
}

/// A record header: a UTF-8 name and a nullable value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Name.
    pub key: String,
    /// Value; `None` is Kafka's null.
    pub value: Option<Bytes>,
}

/// A record to produce. Build it with [`ProducerRecord::new`] and the setters.
///
/// Routing: [`crate::Producer::send`] picks the partition from the key's murmur2 hash, or round
/// robin for a null key; [`crate::Producer::send_to`] names the partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerRecord {
    /// Key; `None` is a null key.
    pub key: Option<Bytes>,
    /// Value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<Header>,
    /// Timestamp (ms since the epoch); `None` takes the producer's clock when it is sent.
    pub timestamp_ms: Option<i64>,
}

impl ProducerRecord {
    /// A record with a value and nothing else.
    pub fn new(value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord {
            value: Some(value.into()),
            ..ProducerRecord::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: Some(value.into()),
        });
        self
    }

    /// Sets the timestamp.
    pub fn timestamp_ms(mut self, ts: i64) -> Self {
        self.timestamp_ms = Some(ts);
        self
    }

    /// An upper bound of the record's encoded size inside a batch: its bytes plus the most
    /// its varints can take. The producer's buffer accounting uses this.
    pub(crate) fn encoded_size_bound(&self) -> usize {
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        // length, attributes, timestamp delta, offset delta, key len, value len, header count
        let fixed = 5 + 1 + 10 + 5 + 5 + 5 + 5;
        fixed
            + len(&self.key)
            + len(&self.value)
            + self
                .headers
                .iter()
                .map(|h| 10 + h.key.len() + len(&h.value))
                .sum::<usize>()
    }

    /// An upper bound of the size of a batch holding only this record, uncompressed: what a
    /// topic's `max_message_bytes` limits (the record's bytes, the most its varints can take,
    /// and the batch header).
    pub fn batch_size_bound(&self) -> usize {
        spool_record::HEADER_LEN + self.encoded_size_bound()
    }
}

/// A consumed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Topic (shared by all records of a partition).
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Timestamp (ms since the epoch).
    pub timestamp_ms: i64,
    /// Key; `None` is a null key.
    pub key: Option<Bytes>,
    /// Value; `None` is a tombstone.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<Header>,
}

/// Which records a read may return (Kafka's `isolation.level`). Spool's consumers and fetches
/// read committed by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Isolation {
    /// Everything below the high watermark, records of open and aborted transactions included.
    ReadUncommitted,
    /// Only below the last stable offset, without aborted transactions' records.
    #[default]
    ReadCommitted,
}

/// Where to start reading a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The first offset still in the log.
    Earliest,
    /// The high watermark: only records appended from now on.
    Latest,
    /// An absolute offset (must be within `[log_start_offset, high_watermark]`).
    Offset(u64),
    /// The first record at or after this time (ms); the high watermark if none is.
    Timestamp(i64),
    /// The consumer group's committed offset; the consumer's `offset_reset` decides when the
    /// group has none.
    Committed,
}

/// Which offset [`crate::Client::list_offsets`] resolves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetSpec {
    /// First offset in the log.
    Earliest,
    /// High watermark.
    Latest,
    /// First record at or after this time (ms).
    Timestamp(i64),
}

/// One answer of [`crate::Client::list_offsets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedOffset {
    /// The offset (for a timestamp after every record: the high watermark).
    pub offset: u64,
    /// False when no record is at or after the timestamp.
    pub found: bool,
}

/// A topic partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
}

impl TopicPartition {
    /// Names a partition.
    pub fn new(topic: impl Into<String>, partition: u32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

/// A position to commit for a consumer group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetCommit {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
    /// The next offset the group will read (last processed offset + 1).
    pub offset: u64,
    /// Free-form metadata (at most 4 KiB).
    pub metadata: String,
}

/// One consumer group's offsets committed with a transaction ([`crate::Client::commit_txn`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnOffsets {
    /// The consumer group.
    pub group: String,
    /// Its positions (a partition at most once).
    pub offsets: Vec<OffsetCommit>,
    /// (member id, generation) of a fenced commit; `None` for a plain one.
    pub member: Option<(String, u64)>,
}

/// A group's committed position for one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedOffset {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
    /// The committed offset; `None` when nothing was committed.
    pub offset: Option<u64>,
    /// Metadata stored with it.
    pub metadata: String,
    /// Broker time of the commit (ms), 0 if none.
    pub commit_time_ms: i64,
}

/// A consumer group in [`crate::Client::list_groups`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSummary {
    /// Group name.
    pub group: String,
    /// Number of partitions the group has a committed offset for.
    pub partitions: u32,
    /// The topics of those partitions, sorted.
    pub topics: Vec<String>,
    /// Broker time (ms) of the group's most recent commit.
    pub last_commit_time_ms: i64,
}

impl GroupSummary {
    pub(crate) fn from_wire(g: v1::GroupSummary) -> GroupSummary {
        GroupSummary {
            group: g.group,
            partitions: g.partitions,
            topics: g.topics,
            last_commit_time_ms: g.last_commit_time_ms,
        }
    }
}

/// What [`crate::Client::delete_group`] deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDeletion {
    /// Group name.
    pub group: String,
    /// Number of partitions whose committed offset was deleted.
    pub partitions_deleted: u32,
}

/// Where a produced record landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset; `None` under `Acks::None`, whose replies carry no offsets (the batch was
    /// written all the same).
    pub offset: Option<u64>,
    /// The record's timestamp.
    pub timestamp_ms: i64,
}

/// The result of [`crate::Client::fetch`]: decoded records of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Records at or after the requested offset, in offset order.
    pub records: Vec<Record>,
    /// The offset to ask for next.
    pub next_offset: u64,
    /// High watermark when the data was read.
    pub high_watermark: u64,
    /// First offset in the log when the data was read.
    pub log_start_offset: u64,
    /// Last stable offset when the data was read (below it every transaction is decided;
    /// read-committed fetches never return data at or past it).
    pub last_stable_offset: u64,
}
