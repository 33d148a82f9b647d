//! Configuration: per-topic settings, engine-wide limits and the clock.
//!
//! Every limit has a documented default and a hard ceiling checked by [`TopicConfig::validate`]
//! and [`Limits::validate`]; the engine never allocates from a length it has not bounded by one
//! of these first.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use spool_io::FileSystem;
use spool_record::DecodeLimits;

use crate::error::{Error, Result};

/// When appended data is forced to stable storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum FsyncPolicy {
    /// `append` returns only after an `fdatasync` covering the batch has returned. Concurrent
    /// appenders share one fdatasync (group commit). Readers see only durable data.
    #[default]
    Always,
    /// A background thread runs fdatasync every `interval_ms`. An acknowledged write can be
    /// lost on power failure (not on a process crash).
    Interval {
        /// Milliseconds between flushes.
        interval_ms: u64,
    },
    /// Never fsync on the append path (page cache only). Sealed segments are still flushed when
    /// rolled, so that the recovery point stays truthful.
    Never,
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval { interval_ms } => write!(f, "interval({interval_ms}ms)"),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

/// What happens to old data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CleanupPolicy {
    /// Delete whole sealed segments past the retention limits.
    #[default]
    Delete,
    /// Keep the latest record of each key (log compaction, see [`crate::compact`]); retention
    /// limits are ignored. Every record must have a key.
    Compact,
    /// Both: compact, and delete whole sealed segments past the retention limits.
    #[serde(rename = "compact,delete", alias = "delete,compact")]
    CompactDelete,
}

impl CleanupPolicy {
    /// True when the cleaner compacts the topic (`compact` or `compact,delete`).
    pub fn compacts(self) -> bool {
        matches!(self, CleanupPolicy::Compact | CleanupPolicy::CompactDelete)
    }

    /// True when retention deletes old segments (`delete` or `compact,delete`).
    pub fn deletes(self) -> bool {
        matches!(self, CleanupPolicy::Delete | CleanupPolicy::CompactDelete)
    }

    /// Kafka's spelling: `delete`, `compact` or `compact,delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::CompactDelete => "compact,delete",
        }
    }

    /// Parses Kafka's spellings (`delete`, `compact`, `compact,delete` or `delete,compact`).
    pub fn parse(s: &str) -> Option<CleanupPolicy> {
        let mut parts: Vec<&str> = s.split(',').map(str::trim).collect();
        parts.sort_unstable();
        parts.dedup();
        match parts.as_slice() {
            ["delete"] => Some(CleanupPolicy::Delete),
            ["compact"] => Some(CleanupPolicy::Compact),
            ["compact", "delete"] => Some(CleanupPolicy::CompactDelete),
            _ => None,
        }
    }
}

impl fmt::Display for CleanupPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of one topic, stored in its `topic.json` and applied to each partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Number of partitions, `1..=MAX_PARTITIONS`.
    pub partitions: u32,
    /// Roll the active segment once it holds this many bytes.
    pub segment_bytes: u64,
    /// Roll the active segment once its first batch is this old (milliseconds).
    pub segment_ms: u64,
    /// Delete sealed segments whose newest record is older than this (milliseconds);
    /// `None` keeps them forever.
    pub retention_ms: Option<u64>,
    /// Delete the oldest sealed segments while the partition is larger than this; `None` keeps
    /// everything.
    pub retention_bytes: Option<u64>,
    /// Bytes between two sparse index entries.
    pub index_interval_bytes: u32,
    /// When to fdatasync.
    pub fsync: FsyncPolicy,
    /// What happens to old data.
    pub cleanup: CleanupPolicy,
    /// Largest batch (whole RecordBatch, header included) accepted by `append`.
    pub max_batch_bytes: u32,
    /// Advance the persisted recovery point after this many durable bytes, so that recovery
    /// after a crash scans at most about this much.
    pub recovery_checkpoint_bytes: u64,
    /// Compacted topics: how long a tombstone (null value) stays after the cleaner first
    /// passed it, in milliseconds (Kafka's `delete.retention.ms`). A consumer that reads the
    /// whole topic within this time after a deletion sees the tombstone.
    pub delete_retention_ms: u64,
    /// Compacted topics: a sealed segment is cleaned only once its newest record timestamp is
    /// at least this old (milliseconds; Kafka's `min.compaction.lag.ms`).
    pub min_compaction_lag_ms: u64,
    /// Compacted topics: the cleaner runs on a partition once the uncleaned ("dirty") part of
    /// its cleanable segments is at least this percentage of them (Kafka's
    /// `min.cleanable.dirty.ratio` × 100), or when a tombstone's retention has run out.
    pub min_cleanable_dirty_percent: u8,
}

/// Largest partition count of a topic.
pub const MAX_PARTITIONS: u32 = 10_000;
/// Largest segment: index positions are u32 and a batch may overshoot the roll size once.
pub const MAX_SEGMENT_BYTES: u64 = 2 << 30;
/// Largest batch the engine ever accepts or reads back, whatever the topic says.
pub use spool_record::MAX_BATCH_BYTES;

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            partitions: 1,
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            retention_ms: None,
            retention_bytes: None,
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Always,
            cleanup: CleanupPolicy::Delete,
            max_batch_bytes: 8 << 20,
            recovery_checkpoint_bytes: 64 << 20,
            delete_retention_ms: 24 * 3600 * 1000,
            min_compaction_lag_ms: 0,
            min_cleanable_dirty_percent: 50,
        }
    }
}

impl TopicConfig {
    /// Checks every field against its bounds.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return bad(format!(
                "partitions must be in 1..={MAX_PARTITIONS}, got {}",
                self.partitions
            ));
        }
        if self.segment_bytes < 4096 || self.segment_bytes > MAX_SEGMENT_BYTES {
            return bad(format!(
                "segment_bytes must be in 4096..={MAX_SEGMENT_BYTES}, got {}",
                self.segment_bytes
            ));
        }
        if self.segment_ms == 0 {
            return bad("segment_ms must be > 0".into());
        }
        if self.index_interval_bytes < 64 || self.index_interval_bytes > (16 << 20) {
            return bad(format!(
                "index_interval_bytes must be in 64..=16MiB, got {}",
                self.index_interval_bytes
            ));
        }
        if self.max_batch_bytes < spool_record::HEADER_LEN as u32 + 7
            || self.max_batch_bytes > MAX_BATCH_BYTES
        {
            return bad(format!(
                "max_batch_bytes must be in 68..={MAX_BATCH_BYTES}, got {}",
                self.max_batch_bytes
            ));
        }
        if let FsyncPolicy::Interval { interval_ms } = self.fsync
            && (interval_ms == 0 || interval_ms > 3_600_000)
        {
            return bad(format!(
                "fsync interval must be in 1..=3600000 ms, got {interval_ms}"
            ));
        }
        if self.recovery_checkpoint_bytes < (1 << 20) {
            return bad("recovery_checkpoint_bytes must be at least 1 MiB".into());
        }
        if self.min_cleanable_dirty_percent > 100 {
            return bad(format!(
                "min_cleanable_dirty_percent must be in 0..=100, got {}",
                self.min_cleanable_dirty_percent
            ));
        }
        if self.delete_retention_ms > i64::MAX as u64 / 2
            || self.min_compaction_lag_ms > i64::MAX as u64 / 2
        {
            return bad("delete_retention_ms and min_compaction_lag_ms must be below 2^62".into());
        }
        Ok(())
    }
}

/// Engine-wide limits on what a batch may contain and on resources held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Records in one batch.
    pub max_records_per_batch: u32,
    /// Bytes of one record (its varint length).
    pub max_record_bytes: u32,
    /// Bytes of one key.
    pub max_key_bytes: u32,
    /// Headers of one record.
    pub max_headers_per_record: u32,
    /// Bytes a compressed batch may expand to when decoded.
    pub max_decompressed_bytes: u32,
    /// Sealed segments kept memory-mapped at once across the whole log; the least recently
    /// used mapping is dropped past it (readers holding its bytes keep theirs alive).
    pub max_mapped_segments: usize,
    /// Idempotent producers remembered per partition; past it the least recently active one
    /// is forgotten (see [`crate::producer`]).
    pub max_producers_per_partition: usize,
    /// A producer that appended nothing to a partition for this long is forgotten there (ms;
    /// Kafka's `producer.id.expiration.ms`, one day).
    pub producer_expiration_ms: i64,
    /// Aborted transactions remembered per partition (24 bytes each; see [`crate::txn`]):
    /// past it the partition refuses new transactions until retention drops old ones.
    pub max_aborted_txns_per_partition: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let decode = DecodeLimits::default();
        Limits {
            max_records_per_batch: decode.max_records_per_batch,
            max_record_bytes: decode.max_record_bytes,
            max_key_bytes: decode.max_key_bytes,
            max_headers_per_record: decode.max_headers_per_record,
            max_decompressed_bytes: decode.max_decompressed_bytes,
            max_mapped_segments: 4096,
            max_producers_per_partition: 10_000,
            producer_expiration_ms: 24 * 3600 * 1000,
            max_aborted_txns_per_partition: 1_000_000,
        }
    }
}

impl Limits {
    /// The part of these limits that bounds decoding one batch, for the record crate.
    pub fn decode(&self) -> DecodeLimits {
        DecodeLimits {
            max_records_per_batch: self.max_records_per_batch,
            max_record_bytes: self.max_record_bytes,
            max_key_bytes: self.max_key_bytes,
            max_headers_per_record: self.max_headers_per_record,
            max_decompressed_bytes: self.max_decompressed_bytes,
        }
    }

    /// Checks that the limits are usable.
    pub fn validate(&self) -> Result<()> {
        if self.max_records_per_batch == 0
            || self.max_record_bytes == 0
            || self.max_decompressed_bytes == 0
            || self.max_mapped_segments == 0
            || self.max_producers_per_partition == 0
            || self.producer_expiration_ms <= 0
            || self.max_aborted_txns_per_partition == 0
        {
            return Err(Error::InvalidConfig("limits must be non-zero".into()));
        }
        Ok(())
    }
}

/// Source of wall-clock time, injected so that tests of rolling and retention are
/// deterministic.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as i64
    }
}

/// Options for opening a [`crate::Log`].
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// Limits applied to every partition.
    pub limits: Limits,
    /// Clock for roll and retention decisions.
    pub clock: Arc<dyn Clock>,
    /// Verify each batch's CRC-32C before handing it to a reader (default on). Turning it off
    /// trades corruption detection on the read path for speed.
    pub verify_reads: bool,
    /// Run a background thread for interval fsyncs and retention (default on). Without it, call
    /// [`crate::Log::run_maintenance`] yourself.
    pub background_maintenance: bool,
    /// How often the background thread applies retention.
    pub retention_check_interval: Duration,
    /// The log cleaner of compacted topics (its own background thread, started with the
    /// maintenance thread).
    pub cleaner: CleanerOptions,
    /// The file system every file operation goes through (the real one by default; tests
    /// pass a simulated disk, `spool_io::sim::SimFs`).
    pub fs: Arc<dyn FileSystem>,
    /// Under `fsync = always`, how far ahead of the writer the active segment is written with
    /// zeros and made durable, off the append path, so that a group commit's fdatasync
    /// overwrites allocated, durable blocks instead of growing the file (no size change and no
    /// block allocation to commit: about half the sync's latency on ext4; docs/durability.md,
    /// "Zero ahead"). Only while the syncs are small (at most
    /// [`ZERO_AHEAD_MAX_SYNC_BYTES`] each): large syncs amortise that cost, and zeroing
    /// would double the bytes written. 0 (the default, also spoold's) turns it off; other values
    /// are clamped into [`MIN_ZERO_AHEAD_BYTES`]..=[`MAX_ZERO_AHEAD_BYTES`] and rounded down to
    /// 4 KiB. Costs up to this much disk per `fsync = always` partition beyond what stats and
    /// retention count (until the segment rolls or the log closes).
    pub zero_ahead_bytes: u64,
}

/// The [`LogOptions::zero_ahead_bytes`] measured (docs/benchmarks.md, issue 14): zeroing starts
/// when less than half of it is left, so each zeroing writes and syncs about 1 MiB. On this
/// project's test VM a 1 MiB zeroing fdatasync took ~0.9 ms, a 4 MiB one ~15 ms.
pub const RECOMMENDED_ZERO_AHEAD_BYTES: u64 = 2 << 20;

/// Upper bound of [`LogOptions::zero_ahead_bytes`]: one zeroing syncs about half of it under
/// the partition's sync lock.
pub const MAX_ZERO_AHEAD_BYTES: u64 = 8 << 20;

/// Lower bound of a non-zero [`LogOptions::zero_ahead_bytes`]: smaller windows would add an
/// fdatasync every few appends.
pub const MIN_ZERO_AHEAD_BYTES: u64 = 256 << 10;

/// The window actually used for a configured [`LogOptions::zero_ahead_bytes`]: 0 stays 0 (off),
/// anything else is clamped into the bounds and rounded down to 4 KiB.
pub fn zero_ahead_window(configured: u64) -> u64 {
    if configured == 0 {
        0
    } else {
        configured.clamp(MIN_ZERO_AHEAD_BYTES, MAX_ZERO_AHEAD_BYTES) & !4095
    }
}

/// The longest run of zeros after the last batch that recovery takes for a zero tail with a
/// zeroing window of `window` bytes: the window plus the writes of one small sync (zeroing runs
/// only while syncs cover at most [`ZERO_AHEAD_MAX_SYNC_BYTES`]) that a power cut may have
/// turned back into zeros. A longer run is a torn tail, kept aside as before.
pub(crate) const fn max_zero_tail(window: u64) -> u64 {
    window + ZERO_AHEAD_MAX_SYNC_BYTES
}

/// The longest zero tail any zeroing window could leave ([`max_zero_tail`] of the largest
/// window): what offline inspection, which does not know the window, and recovery's "zeros
/// only" warning accept.
pub(crate) const MAX_ZERO_TAIL_ANY_WINDOW: u64 = max_zero_tail(MAX_ZERO_AHEAD_BYTES);

/// The largest a segment file can be: a full segment, one batch past it (a batch that did not
/// fit starts the next segment only when the current one holds data), and zeros written ahead.
/// The offline tools refuse longer files before reading them.
pub(crate) const MAX_SEGMENT_FILE_BYTES: u64 =
    MAX_SEGMENT_BYTES + MAX_BATCH_BYTES as u64 + MAX_ZERO_TAIL_ANY_WINDOW;

/// Zeroing ahead runs only while the last group commit covered at most this many bytes
/// (see [`LogOptions::zero_ahead_bytes`]).
pub const ZERO_AHEAD_MAX_SYNC_BYTES: u64 = 256 << 10;

/// Settings of the log cleaner (see [`crate::compact`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CleanerOptions {
    /// Run the cleaner thread (default on; it also needs `background_maintenance`). Without
    /// it, call [`crate::Log::run_cleaner`] yourself.
    pub enabled: bool,
    /// Memory for the key → offset map of one cleaning pass (Kafka's
    /// `log.cleaner.dedupe.buffer.size`), reserved once (zeroed pages: only the part a pass
    /// sized for its dirty records uses becomes resident): 24 bytes per key. A pass whose dirty
    /// part has more distinct keys than fit cleans the prefix that fits and leaves the rest to
    /// the next pass. Default 64 MiB (about 2.5 million keys at the 0.9 load factor).
    pub dedupe_buffer_bytes: usize,
    /// How often the cleaner thread looks for partitions to clean (Kafka's
    /// `log.cleaner.backoff.ms`). Default 15 s.
    pub check_interval: Duration,
}

impl Default for CleanerOptions {
    fn default() -> Self {
        CleanerOptions {
            enabled: true,
            dedupe_buffer_bytes: 64 << 20,
            check_interval: Duration::from_secs(15),
        }
    }
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            limits: Limits::default(),
            clock: Arc::new(SystemClock),
            verify_reads: true,
            background_maintenance: true,
            retention_check_interval: Duration::from_secs(60),
            cleaner: CleanerOptions::default(),
            fs: spool_io::real(),
            zero_ahead_bytes: 0,
        }
    }
}
