//! What bounds a request before the broker decodes it.
//!
//! Two checks run before prost allocates anything for a request:
//! - **Its size**, per service ([`DecodeLimits`]): tonic refuses a message over its service's
//!   decode limit with `OUT_OF_RANGE` before buffering it whole. Produce takes
//!   `limits.max_request_bytes`; every other service's limit is derived from the count limits
//!   and the schema's own bounds (names, metadata), so that the largest request the broker
//!   would accept fits and nothing much larger is buffered.
//! - **Its element counts** (`spool_proto::codec`): the server codec walks the wire format and
//!   refuses (`INVALID_ARGUMENT`) a request with more partitions, records, offsets, topics or
//!   groups than `limits.max_partitions_per_request` / `limits.max_records_per_request` allow,
//!   so a request of empty 2-byte elements cannot decode to GiBs. [`install`] hands it the
//!   limits, process-wide (the codec is created by tonic's generated code, which passes no
//!   configuration; see the codec's module docs).
//!
//! The handlers still check their counts after decoding (the codec applies the loosest
//! limits installed in the process, which are this broker's unless a process runs several).
//!
//! Invariant: a decoded request holds at most its service's decode limit of wire data plus
//! the configured number of elements, each a fixed-size struct.

use spool_proto::codec::{RequestLimits, install_request_limits};

use crate::config::LimitsConfig;
use crate::offsets::{MAX_GROUP_NAME, MAX_METADATA};

/// Wire bytes of a request's fields outside its repeated ones, at most: a group, topic or
/// transactional id (at most 249 bytes each), a member id, numbers and their tags, with room
/// for the fields later versions of the protocol add (an older broker skips them).
const FIXED_BYTES: usize = 64 << 10;

/// Wire bytes of one partition-like element at most (a `PartitionFetch`,
/// `SubscribePartition`, `OffsetQuery`, `TopicPartition`, a topic name): a topic name of at
/// most 249 bytes (`spool_log_engine::MAX_TOPIC_NAME`) and at most ~30 bytes of numbers,
/// tags and lengths, about 280 in all, with room for fields added later.
const ENTRY_BYTES: usize = 1 << 10;

/// Wire bytes of one `OffsetCommit` at most: an entry and its metadata.
const OFFSET_ENTRY_BYTES: usize = ENTRY_BYTES + MAX_METADATA;

/// Wire bytes of one `TxnGroupOffsets` besides its offsets: a group name and a member id.
const TXN_GROUP_BYTES: usize = ENTRY_BYTES + MAX_GROUP_NAME;

/// Largest request each service decodes (tonic's `max_decoding_message_size`), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DecodeLimits {
    /// AdminService: no repeated fields.
    pub(crate) admin: usize,
    /// ProduceService: `limits.max_request_bytes`.
    pub(crate) produce: usize,
    /// ConsumeService: Fetch, Subscribe, ListOffsets.
    pub(crate) consume: usize,
    /// OffsetService: CommitOffsets (metadata included), FetchOffsets, DeleteGroup.
    pub(crate) offsets: usize,
    /// GroupService: Membership's JoinGroup topics.
    pub(crate) groups: usize,
    /// TransactionService: AddOffsetsToTxn, CommitTxn (groups and their offsets).
    pub(crate) txns: usize,
}

impl DecodeLimits {
    /// The limits for `limits`: none above `max_request_bytes`.
    pub(crate) fn of(limits: &LimitsConfig) -> DecodeLimits {
        let max = limits.max_request_bytes;
        let n = limits.max_partitions_per_request;
        let entries = |each: usize| n.saturating_mul(each).saturating_add(FIXED_BYTES).min(max);
        DecodeLimits {
            admin: FIXED_BYTES.min(max),
            produce: max,
            consume: entries(ENTRY_BYTES),
            offsets: entries(OFFSET_ENTRY_BYTES),
            groups: entries(ENTRY_BYTES),
            txns: entries(OFFSET_ENTRY_BYTES + TXN_GROUP_BYTES),
        }
    }
}

/// Installs `limits`' count limits in the server codec (process-wide; see the module docs).
pub(crate) fn install(limits: &LimitsConfig) {
    install_request_limits(RequestLimits {
        max_partitions: limits.max_partitions_per_request,
        max_records: limits.max_records_per_request,
    });
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use spool_proto::v1;

    use super::*;

    /// The largest requests the broker accepts (every name at its longest, every number at
    /// its widest, every element the count limit allows) fit their service's decode limit.
    #[test]
    fn the_largest_valid_requests_fit() {
        let config = LimitsConfig::default();
        let d = DecodeLimits::of(&config);
        let n = config.max_partitions_per_request;
        let name = "n".repeat(spool_log_engine::MAX_TOPIC_NAME);
        let group = "g".repeat(MAX_GROUP_NAME);
        let commit = v1::OffsetCommit {
            topic: name.clone(),
            partition: u32::MAX,
            offset: u64::MAX,
            metadata: "m".repeat(MAX_METADATA),
        };
        let tp = v1::TopicPartition {
            topic: name.clone(),
            partition: u32::MAX,
        };
        let fits = |what: &str, len: usize, limit: usize| {
            assert!(len <= limit, "{what}: {len} bytes, the limit is {limit}");
            eprintln!("{what}: {len} of {limit} bytes");
        };
        let fetch = v1::FetchRequest {
            partitions: vec![
                v1::PartitionFetch {
                    topic: name.clone(),
                    partition: u32::MAX,
                    offset: u64::MAX,
                    max_bytes: u32::MAX,
                };
                n
            ],
            min_bytes: u32::MAX,
            max_wait_ms: u32::MAX,
            decode_records: true,
            isolation_level: 2,
            max_bytes: u32::MAX,
        };
        fits("Fetch", fetch.encoded_len(), d.consume);
        let subscribe = v1::SubscribeRequest {
            partitions: vec![
                v1::SubscribePartition {
                    topic: name.clone(),
                    partition: u32::MAX,
                    start: Some(v1::StartPosition {
                        position: Some(v1::start_position::Position::TimestampMs(i64::MIN)),
                    }),
                };
                n
            ],
            max_bytes: u32::MAX,
            decode_records: true,
            heartbeat_interval_ms: u32::MAX,
            isolation_level: 2,
        };
        fits("Subscribe", subscribe.encoded_len(), d.consume);
        let list = v1::ListOffsetsRequest {
            queries: vec![
                v1::OffsetQuery {
                    topic: name.clone(),
                    partition: u32::MAX,
                    spec: 3,
                    timestamp_ms: i64::MIN,
                };
                n
            ],
            isolation_level: 2,
        };
        fits("ListOffsets", list.encoded_len(), d.consume);
        let commit_offsets = v1::CommitOffsetsRequest {
            group: group.clone(),
            offsets: vec![commit.clone(); n],
            member_id: group.clone(),
            generation: u64::MAX,
        };
        fits("CommitOffsets", commit_offsets.encoded_len(), d.offsets);
        let fetch_offsets = v1::FetchOffsetsRequest {
            group: group.clone(),
            partitions: vec![tp; n],
        };
        fits("FetchOffsets", fetch_offsets.encoded_len(), d.offsets);
        let join = v1::MembershipRequest {
            request: Some(v1::membership_request::Request::Join(v1::JoinGroup {
                group: group.clone(),
                topics: vec![name.clone(); n],
                instance_id: Some(group.clone()),
                member_id: group.clone(),
                strategy: 3,
                session_timeout_ms: u32::MAX,
                rebalance_timeout_ms: u32::MAX,
            })),
        };
        fits("Membership", join.encoded_len(), d.groups);
        let add = v1::AddOffsetsToTxnRequest {
            transactional_id: group.clone(),
            producer_id: i64::MIN,
            producer_epoch: i32::MIN,
            group: group.clone(),
            offsets: vec![commit.clone(); n],
            member_id: group.clone(),
            generation: u64::MAX,
        };
        fits("AddOffsetsToTxn", add.encoded_len(), d.txns);
        // As many groups as offsets, each with one.
        let commit_txn = v1::CommitTxnRequest {
            transactional_id: group.clone(),
            producer_id: i64::MIN,
            producer_epoch: i32::MIN,
            groups: vec![
                v1::TxnGroupOffsets {
                    group: group.clone(),
                    offsets: vec![commit],
                    member_id: group.clone(),
                    generation: u64::MAX,
                };
                n
            ],
        };
        fits("CommitTxn", commit_txn.encoded_len(), d.txns);
        let create = v1::CreateTopicRequest {
            topic: name.clone(),
            partitions: u32::MAX,
            config: Some(v1::TopicConfig {
                retention_ms: Some(u64::MAX),
                retention_bytes: Some(u64::MAX),
                segment_bytes: Some(u64::MAX),
                segment_ms: Some(u64::MAX),
                fsync_policy: 3,
                fsync_interval_ms: Some(u64::MAX),
                cleanup_policy: 3,
                max_message_bytes: Some(u32::MAX),
                delete_retention_ms: Some(u64::MAX),
                min_compaction_lag_ms: Some(u64::MAX),
                min_cleanable_dirty_percent: Some(u32::MAX),
            }),
        };
        fits("CreateTopic", create.encoded_len(), d.admin);
        assert_eq!(d.produce, config.max_request_bytes);
    }

    /// No service decodes more than `max_request_bytes`; small services far less.
    #[test]
    fn limits_follow_the_configuration() {
        let mut config = LimitsConfig::default();
        let d = DecodeLimits::of(&config);
        assert!(d.consume < config.max_request_bytes / 4, "{d:?}");
        assert!(d.groups < config.max_request_bytes / 4, "{d:?}");
        assert!(d.admin <= 64 << 10, "{d:?}");
        config.max_partitions_per_request = 100;
        let small = DecodeLimits::of(&config);
        assert!(
            small.consume < 200 << 10 && small.offsets < 1 << 20,
            "{small:?}"
        );
        config.max_partitions_per_request = usize::MAX;
        config.max_request_bytes = 2 << 20;
        let big = DecodeLimits::of(&config);
        for l in [
            big.admin,
            big.produce,
            big.consume,
            big.offsets,
            big.groups,
            big.txns,
        ] {
            assert!(l <= 2 << 20, "{big:?}");
        }
    }
}
