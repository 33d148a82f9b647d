//! Spool's embedded append-only log engine.
//!
//! A [`Log`] is a directory of topics; a topic has partitions; a [`Partition`] is an ordered
//! list of segment files of Kafka RecordBatch v2 batches with sparse, memory-mapped indexes.
//! Any Rust program can embed it; the `spoold` broker is one such program.
//!
//! ```no_run
//! use spool_log_engine::{BatchBuilder, Compression, Log, LogOptions, TopicConfig};
//!
//! let log = Log::open("./spool-data", LogOptions::default())?;
//! if log.topic_config("events").is_err() {
//!     log.create_topic("events", TopicConfig { partitions: 2, ..TopicConfig::default() })?;
//! }
//! let p = log.partition("events", 0)?;
//! let mut b = BatchBuilder::new(Compression::Lz4);
//! b.push(1_700_000_000_000, Some(b"key"), Some(b"value"), &[]);
//! let at = p.append(&b.finish()?)?; // durable when it returns (fsync = always)
//! let read = p.read(at.base_offset, 1 << 20)?;
//! for batch in read.batches() {
//!     for record in batch?.records(&Default::default())? {
//!         println!("{:?}", record?);
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Architecture invariants (see `docs/ARCHITECTURE.md`): no async runtime and no network code
//! here; typed errors ([`Error`]) only; every length read from disk or from a caller is bounded
//! before it is used; no `unsafe` (memory maps live behind the I/O seam, `spool_io`); every file
//! operation goes through [`io::FileSystem`] ([`LogOptions::fs`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// The RecordBatch v2 format: the `spool-record` crate, re-exported for embedders.
pub use spool_record as batch;
mod checkpoint;
pub mod compact;
pub mod config;
pub mod error;
pub mod fd_budget;
mod fsutil;
mod index;
pub mod inspect;
mod log;
mod mapcache;
mod notify;
mod partition;
pub mod producer;
pub mod reindex;
mod segment;
mod staging;
pub mod stats;
mod topic_file;
pub mod txn;
mod writeback;

pub use batch::{
    Batch, BatchBuilder, BatchError, BatchHeader, Compression, DecodeLimits, Header, Record,
};
pub use compact::{CleanReport, Cleaner};
pub use config::{
    CleanerOptions, CleanupPolicy, Clock, FsyncPolicy, Limits, LogOptions, MAX_ZERO_AHEAD_BYTES,
    MIN_ZERO_AHEAD_BYTES, RECOMMENDED_ZERO_AHEAD_BYTES, SystemClock, TopicConfig,
    ZERO_AHEAD_MAX_SYNC_BYTES, zero_ahead_window,
};
pub use error::{Error, Result};
pub use log::{Log, MAX_TOPIC_NAME, validate_topic_name};
pub use notify::DataAvailable;
pub use partition::{AppendInfo, Durable, Partition, PartitionStats, ReadResult, RecoveryReport};
/// The I/O seam (`spool-io`): the [`io::FileSystem`] every file operation goes through.
pub use spool_io as io;
pub use txn::{Isolation, Marker, OpenTxn};
