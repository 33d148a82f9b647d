//! Typed errors of the log engine.
//!
//! Three families are kept apart because callers act on them differently:
//! - **caller errors** (`InvalidBatch`, `LimitExceeded`, `OffsetOutOfRange`, `TopicNotFound`,
//!   `OpenFilesLimit`, …):
//!   the request was wrong, nothing was written, the partition is fine;
//! - **I/O errors** (`Io`): the operating system refused something; the `io::Error` is kept as
//!   the source and the path is named;
//! - **integrity errors** (`Corruption`, `Poisoned`): the data on disk is not what was written,
//!   or a write/fsync failed and the partition refuses writes until it is reopened.

use std::io;
use std::path::PathBuf;

use crate::batch::BatchError;

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the engine was doing (`"open"`, `"fdatasync"`, …).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// Data on disk failed a check (CRC, structure, offsets) where it must be intact.
    /// Never raised for a torn tail past the recovery point, which is truncated instead.
    #[error("corruption in {path} at byte {position}{}: {reason}", offset.map(|o| format!(" (offset {o})")).unwrap_or_default())]
    Corruption {
        /// The damaged file.
        path: PathBuf,
        /// Byte position in the file where the damage starts.
        position: u64,
        /// The offset expected at that position, when known.
        offset: Option<u64>,
        /// What check failed.
        reason: String,
    },

    /// A batch given to `append` (or read back) is malformed.
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] BatchError),

    /// A configured limit was exceeded; nothing was written.
    #[error("{what} is {actual} bytes/items, over the limit of {limit}")]
    LimitExceeded {
        /// Which limit.
        what: &'static str,
        /// The configured limit.
        limit: u64,
        /// The size that was asked for.
        actual: u64,
    },

    /// A read asked for an offset outside `[log_start, high_watermark]`.
    #[error("offset {requested} is out of range [{log_start}, {high_watermark}]")]
    OffsetOutOfRange {
        /// The offset asked for.
        requested: u64,
        /// The first offset still in the log.
        log_start: u64,
        /// The next offset to be written and published.
        high_watermark: u64,
    },

    /// No topic of that name.
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),

    /// A topic of that name exists already.
    #[error("topic {0:?} already exists")]
    TopicExists(String),

    /// The topic exists but has no such partition.
    #[error("topic {topic:?} has no partition {partition}")]
    PartitionNotFound {
        /// Topic name.
        topic: String,
        /// Partition asked for.
        partition: u32,
    },

    /// A topic name that may not be used.
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidTopicName {
        /// The name given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// A configuration value out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A write or fsync failed (in this operation or an earlier one); the partition refuses
    /// writes until it is reopened. An fsync is never retried: after a failed fsync the kernel
    /// may have dropped the dirty pages, so a second "successful" fsync would prove nothing.
    #[error(
        "partition {topic}/{partition} is poisoned by a failed write or fsync ({cause}); reopen the log"
    )]
    Poisoned {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
        /// The first failure, as text.
        cause: String,
    },

    /// Opening the partitions an operation needs would take more file descriptors than the
    /// process's open-files limit (`RLIMIT_NOFILE`) leaves free (see [`crate::fd_budget`]).
    /// Nothing was created or opened.
    #[error(
        "{what} needs {needed} file descriptors ({per} per partition for {partitions} partition(s), plus {spare} spare), but only {available} of the open-files limit {limit} are free; raise the limit (ulimit -n, systemd LimitNOFILE=) or use fewer partitions",
        per = crate::fd_budget::FDS_PER_PARTITION,
        spare = crate::fd_budget::FD_HEADROOM
    )]
    OpenFilesLimit {
        /// The operation (`creating topic "t"`).
        what: String,
        /// Partitions it would open.
        partitions: u64,
        /// Descriptors it needs free.
        needed: u64,
        /// Descriptors free now (the limit minus those open).
        available: u64,
        /// The soft open-files limit.
        limit: u64,
    },

    /// Another process (or another `Log` in this one) has the data directory open.
    #[error("data directory {0} is locked by another open log")]
    Locked(PathBuf),

    /// The log or partition was closed.
    #[error("the log is closed")]
    Closed,

    /// The partition's topic was deleted while this handle to it was held (a reader or
    /// writer that looked it up before the delete). A topic created since under the same name
    /// is another topic: look it up again.
    #[error("topic {topic} was deleted: partition {topic}/{partition} no longer exists")]
    TopicDeleted {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
    },

    /// An idempotent producer's batch carries an older epoch than the producer's latest: a
    /// zombie. Nothing was written.
    #[error("producer {producer_id} epoch {epoch} is fenced by epoch {current_epoch}")]
    ProducerFenced {
        /// Producer id.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The producer's latest epoch on this partition.
        current_epoch: i16,
    },

    /// An idempotent producer's batch does not follow its previous one (a gap, an overlap, or
    /// a retry older than the duplicate cache). Nothing was written.
    #[error("producer {producer_id}: sequence {got} out of order, expected {expected}")]
    OutOfOrderSequence {
        /// Producer id.
        producer_id: i64,
        /// The sequence that would have been accepted.
        expected: i32,
        /// The batch's first sequence.
        got: i32,
    },

    /// A batch or marker does not fit the producer's transaction on the partition (see
    /// [`crate::txn`]). Nothing was written.
    #[error("producer {producer_id}: invalid transaction state: {reason}")]
    InvalidTxnState {
        /// Producer id.
        producer_id: i64,
        /// What did not fit.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corruption(
        path: impl Into<PathBuf>,
        position: u64,
        offset: Option<u64>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corruption {
            path: path.into(),
            position,
            offset,
            reason: reason.into(),
        }
    }

    /// True for errors that say the data on disk is damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. })
    }
}
