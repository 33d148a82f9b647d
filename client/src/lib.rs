//! Rust client for Spool's broker `spoold` (gRPC, `spool.v1`).
//!
//! ```no_run
//! use spool_client::{Client, ConsumerConfig, ProducerConfig, ProducerRecord, StartAt, TopicSettings};
//!
//! # async fn demo() -> spool_client::Result<()> {
//! let client = Client::connect("127.0.0.1:7170").await?;
//! client.create_topic("events", 4, &TopicSettings::default()).await?;
//!
//! let producer = client.producer(ProducerConfig::default());
//! let delivery = producer.send("events", ProducerRecord::new("hello").key("user-1")).await?;
//! let meta = delivery.await?;                 // acknowledged (durable by default)
//! println!("at {}/{:?}", meta.partition, meta.offset);
//! producer.close().await;
//!
//! let mut consumer = client.consumer(ConsumerConfig::with_group("billing"));
//! consumer.subscribe_topic("events", StartAt::Committed).await?;
//! while let Some(record) = consumer.next().await {
//!     let record = record?;
//!     println!("{}/{} @{}: {:?}", record.topic, record.partition, record.offset, record.value);
//!     consumer.commit().await?;               // after processing: at-least-once
//! }
//! # Ok(()) }
//! ```
//!
//! # Pieces
//!
//! - [`Client`]: one HTTP/2 connection (windows, message limits and keepalives matching the
//!   broker), admin calls with typed configs ([`TopicSettings`], [`TopicDescription`]),
//!   [`Client::fetch`], [`Client::list_offsets`], group offsets and group administration
//!   ([`Client::list_groups`], [`Client::delete_group`]).
//! - [`Producer`]: batches records per partition (linger, batch bytes), encodes each batch
//!   once with the engine's `BatchBuilder` (none / LZ4 / zstd) and sends it pre-encoded; keeps
//!   per-partition order with at most one batch in flight per partition; retries with backoff;
//!   bounded buffer with backpressure. See [`producer`] for the exact guarantees.
//! - [`Consumer`]: follows partitions over the broker's Subscribe stream from an offset, a
//!   time, the earliest or latest offset, or the group's committed offset; reconnects (its
//!   backoff survives a cancelled `next`, so polling under a timeout does not use up the
//!   attempts); resets out-of-range positions per policy. See [`consumer`].
//! - [`GroupConsumer`]: a member of a consumer group whose partitions the broker assigns
//!   (range, round-robin, sticky) and moves with revocation before reassignment; commits are
//!   fenced by member id and generation; static membership by instance id. See [`group`];
//!   [`Client::describe_group`] shows a group's members and assignments.
//! - [`Error`]: one typed error for gRPC statuses (read with their google.rpc `ErrorInfo`) and
//!   per-partition errors alike; [`Error::is_retriable`] is what the producer and consumer
//!   retry on.
//!
//! Security, when the broker has it configured: [`ClientBuilder::tls`] (a CA, optionally a
//! client certificate for mutual TLS) and [`ClientBuilder::bearer_token`]; refusals are
//! [`Error::Unauthenticated`] and [`Error::NotAuthorized`].
//!
//! Transactions: [`TransactionalProducer`] (`txn.rs`) writes to several partitions and
//! topics, with consumer-group offsets, all or nothing (exactly-once consume-transform-produce;
//! see `examples/transactional.rs`).
#![warn(missing_docs)]

pub mod client;
pub mod consumer;
mod decode;
pub mod error;
pub mod group;
pub mod partitioner;
pub mod producer;
mod retry;
pub mod txn;
pub mod types;

pub use client::{
    Appended, BearerToken, Client, ClientBuilder, ClientIdentity, ClientOptions, DEFAULT_BROKER,
    DEFAULT_PORT, FetchOptions, TlsOptions,
};
pub use consumer::{Consumer, ConsumerConfig, OffsetReset};
pub use error::{Error, OutOfRange, Result};
pub use group::{
    AssignmentStrategy, GroupConfig, GroupConsumer, GroupDescription, GroupState,
    MemberDescription, Polled,
};
pub use producer::{Acks, Compression, DeliveryFuture, Producer, ProducerConfig, ProducerStats};
pub use retry::Backoff;
/// The wire types, for calls this crate does not wrap.
pub use spool_proto::v1 as proto;
pub use txn::{TransactionalConfig, TransactionalProducer};
pub use types::{
    CleanupPolicy, CommittedOffset, Fetched, FsyncPolicy, GroupDeletion, GroupSummary, Header,
    Isolation, ListedOffset, OffsetCommit, OffsetSpec, PartitionInfo, ProducerRecord, Record,
    RecordMetadata, StartAt, TopicConfig, TopicDescription, TopicPartition, TopicSettings,
    TopicSummary, TxnOffsets,
};
