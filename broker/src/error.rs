//! The one place where errors become wire errors.
//!
//! Engine errors map to a per-partition [`PartitionError`] (inside replies that cover several
//! partitions) or to a gRPC [`Status`] (for requests about one thing), both from the same
//! table, documented in `docs/protocol.md`. Statuses carry a google.rpc `ErrorInfo` detail with
//! machine-readable fields: `reason` is the `ErrorCode` name, and the metadata names the topic,
//! partition (or the group, for UNKNOWN_GROUP) and, for OUT_OF_RANGE, `log_start_offset` and
//! `high_watermark`.

use std::collections::HashMap;

use spool_log_engine::{BatchError, Error as EngineError};
use spool_proto::v1::{ErrorCode, PartitionError};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A configuration problem, reported before the broker starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value or key that is not allowed.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Errors of the broker's own making (request validation), beside engine errors.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The request is malformed or over a limit.
    #[error("{0}")]
    InvalidRequest(String),
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The caller's token does not allow this.
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    /// The consumer group has no committed offsets (for `topics`, when not empty).
    #[error(
        "consumer group {group:?} has no committed offsets{}",
        for_topics(topics)
    )]
    UnknownGroup {
        /// Group name.
        group: String,
        /// The topics the request was limited to (empty: all).
        topics: Vec<String>,
    },
    /// The member id is not a member of the group (left, expired, replaced).
    #[error("member {member:?} is not a member of group {group:?}{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    FencedMember {
        /// Group name.
        group: String,
        /// Member id.
        member: String,
        /// Why, when known.
        reason: String,
    },
    /// The member does not own the partition in the generation it named.
    #[error("member {member:?} of group {group:?} may not commit {topic}/{partition}: {reason}")]
    IllegalGeneration {
        /// Group name.
        group: String,
        /// Member id.
        member: String,
        /// Topic.
        topic: String,
        /// Partition.
        partition: u32,
        /// Why.
        reason: String,
    },
    /// The group has live members; plain (unfenced) offset changes are refused.
    #[error(
        "group {group:?} has {members} live member(s): {what} needs a member id and generation, or no members"
    )]
    GroupNotEmpty {
        /// Group name.
        group: String,
        /// How many members.
        members: usize,
        /// What was refused.
        what: &'static str,
    },
    /// A transactional request does not fit the transaction's state.
    #[error("transactional id {txn_id:?}: {reason}")]
    InvalidTxnState {
        /// The transactional id.
        txn_id: String,
        /// Why.
        reason: String,
    },
    /// A transactional producer's epoch is older than its transactional id's current one.
    #[error(
        "transactional id {txn_id:?}: producer {producer_id} epoch {epoch} is fenced by epoch {current_epoch}"
    )]
    TxnProducerFenced {
        /// The transactional id.
        txn_id: String,
        /// Producer id.
        producer_id: i64,
        /// The request's epoch.
        epoch: i16,
        /// The current epoch.
        current_epoch: i16,
    },
    /// The broker aborted the producer's transaction after its timeout.
    #[error(
        "transactional id {txn_id:?}: the transaction of epoch {epoch} was aborted after its timeout of {timeout_ms} ms; abort, then go on with the new epoch (or call InitProducerId with the expected id and epoch)"
    )]
    TransactionTimedOut {
        /// The transactional id.
        txn_id: String,
        /// The timed-out transaction's epoch.
        epoch: i16,
        /// Its timeout.
        timeout_ms: u32,
    },
}

fn for_topics(topics: &[String]) -> String {
    if topics.is_empty() {
        String::new()
    } else {
        format!(" for topics {topics:?}")
    }
}

impl From<BatchError> for BrokerError {
    fn from(e: BatchError) -> Self {
        BrokerError::Engine(e.into())
    }
}

/// The wire code and gRPC code of an error.
fn classify(e: &BrokerError) -> (ErrorCode, Code) {
    match e {
        BrokerError::InvalidRequest(_) => (ErrorCode::InvalidRequest, Code::InvalidArgument),
        BrokerError::ShuttingDown => (ErrorCode::ShuttingDown, Code::Unavailable),
        BrokerError::NotAuthorized(_) => (ErrorCode::NotAuthorized, Code::PermissionDenied),
        BrokerError::UnknownGroup { .. } => (ErrorCode::UnknownGroup, Code::NotFound),
        BrokerError::FencedMember { .. } => (ErrorCode::FencedMember, Code::FailedPrecondition),
        BrokerError::IllegalGeneration { .. } => {
            (ErrorCode::IllegalGeneration, Code::FailedPrecondition)
        }
        BrokerError::GroupNotEmpty { .. } => (ErrorCode::GroupNotEmpty, Code::FailedPrecondition),
        BrokerError::InvalidTxnState { .. } => {
            (ErrorCode::InvalidTxnState, Code::FailedPrecondition)
        }
        BrokerError::TxnProducerFenced { .. } => {
            (ErrorCode::ProducerFenced, Code::FailedPrecondition)
        }
        BrokerError::TransactionTimedOut { .. } => {
            (ErrorCode::TransactionTimedOut, Code::FailedPrecondition)
        }
        BrokerError::Engine(e) => match e {
            EngineError::TopicNotFound(_) => (ErrorCode::UnknownTopic, Code::NotFound),
            EngineError::PartitionNotFound { .. } => (ErrorCode::UnknownPartition, Code::NotFound),
            EngineError::TopicExists(_) => (ErrorCode::InvalidRequest, Code::AlreadyExists),
            EngineError::InvalidTopicName { .. } | EngineError::InvalidConfig(_) => {
                (ErrorCode::InvalidRequest, Code::InvalidArgument)
            }
            EngineError::InvalidBatch(BatchError::Limit { .. })
            | EngineError::LimitExceeded { .. } => (ErrorCode::TooLarge, Code::InvalidArgument),
            EngineError::InvalidBatch(_) => (ErrorCode::InvalidBatch, Code::InvalidArgument),
            EngineError::OffsetOutOfRange { .. } => (ErrorCode::OffsetOutOfRange, Code::OutOfRange),
            EngineError::Corruption { .. } => (ErrorCode::Corruption, Code::DataLoss),
            EngineError::Poisoned { .. } => (ErrorCode::PartitionPoisoned, Code::Unavailable),
            EngineError::Closed => (ErrorCode::ShuttingDown, Code::Unavailable),
            EngineError::ProducerFenced { .. } => {
                (ErrorCode::ProducerFenced, Code::FailedPrecondition)
            }
            EngineError::OutOfOrderSequence { .. } => {
                (ErrorCode::OutOfOrderSequence, Code::FailedPrecondition)
            }
            EngineError::InvalidTxnState { .. } => {
                (ErrorCode::InvalidTxnState, Code::FailedPrecondition)
            }
            EngineError::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                (ErrorCode::StorageFull, Code::ResourceExhausted)
            }
            _ => (ErrorCode::Internal, Code::Internal),
        },
    }
}

fn offsets(e: &BrokerError) -> Option<(u64, u64)> {
    match e {
        BrokerError::Engine(EngineError::OffsetOutOfRange {
            log_start,
            high_watermark,
            ..
        }) => Some((*log_start, *high_watermark)),
        _ => None,
    }
}

/// The per-partition form of an error.
pub(crate) fn partition_error(e: impl Into<BrokerError>) -> PartitionError {
    let e = e.into();
    let (code, _) = classify(&e);
    let (log_start_offset, high_watermark) = offsets(&e).unwrap_or_default();
    if code == ErrorCode::Internal || code == ErrorCode::Corruption {
        tracing::error!(error = %e, "request failed");
    }
    PartitionError {
        code: code as i32,
        message: e.to_string(),
        log_start_offset,
        high_watermark,
    }
}

/// A per-partition error as a status (for streams, which end on their first error), with the
/// same `ErrorInfo` detail a request-level status carries.
pub(crate) fn partition_status(topic: &str, partition: u32, e: &PartitionError) -> Status {
    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
    let grpc = match code {
        ErrorCode::OffsetOutOfRange => Code::OutOfRange,
        ErrorCode::UnknownTopic | ErrorCode::UnknownPartition | ErrorCode::UnknownGroup => {
            Code::NotFound
        }
        ErrorCode::NotAuthorized => Code::PermissionDenied,
        ErrorCode::Corruption => Code::DataLoss,
        ErrorCode::PartitionPoisoned | ErrorCode::ShuttingDown => Code::Unavailable,
        ErrorCode::InvalidBatch | ErrorCode::InvalidRequest | ErrorCode::TooLarge => {
            Code::InvalidArgument
        }
        ErrorCode::StorageFull => Code::ResourceExhausted,
        ErrorCode::ProducerFenced
        | ErrorCode::OutOfOrderSequence
        | ErrorCode::InvalidTxnState
        | ErrorCode::TransactionTimedOut => Code::FailedPrecondition,
        ErrorCode::FencedMember | ErrorCode::IllegalGeneration | ErrorCode::GroupNotEmpty => {
            Code::FailedPrecondition
        }
        ErrorCode::Unspecified | ErrorCode::Internal => Code::Internal,
    };
    let mut meta = HashMap::new();
    meta.insert("topic".to_owned(), topic.to_owned());
    meta.insert("partition".to_owned(), partition.to_string());
    if code == ErrorCode::OffsetOutOfRange {
        meta.insert(
            "log_start_offset".to_owned(),
            e.log_start_offset.to_string(),
        );
        meta.insert("high_watermark".to_owned(), e.high_watermark.to_string());
    }
    let details = ErrorDetails::with_error_info(code.as_str_name(), "spool.v1", meta);
    Status::with_error_details(grpc, format!("{topic}/{partition}: {}", e.message), details)
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let (code, grpc) = classify(&e);
        if code == ErrorCode::Internal || code == ErrorCode::Corruption {
            tracing::error!(error = %e, "request failed");
        }
        let mut meta = HashMap::new();
        if let Some((start, hwm)) = offsets(&e) {
            meta.insert("log_start_offset".to_owned(), start.to_string());
            meta.insert("high_watermark".to_owned(), hwm.to_string());
        }
        match &e {
            BrokerError::Engine(EngineError::TopicNotFound(t) | EngineError::TopicExists(t)) => {
                meta.insert("topic".to_owned(), t.clone());
            }
            BrokerError::Engine(EngineError::PartitionNotFound { topic, partition }) => {
                meta.insert("topic".to_owned(), topic.clone());
                meta.insert("partition".to_owned(), partition.to_string());
            }
            BrokerError::UnknownGroup { group, .. } | BrokerError::GroupNotEmpty { group, .. } => {
                meta.insert("group".to_owned(), group.clone());
            }
            BrokerError::InvalidTxnState { txn_id, .. }
            | BrokerError::TxnProducerFenced { txn_id, .. }
            | BrokerError::TransactionTimedOut { txn_id, .. } => {
                meta.insert("transactional_id".to_owned(), txn_id.clone());
            }
            BrokerError::FencedMember { group, member, .. } => {
                meta.insert("group".to_owned(), group.clone());
                meta.insert("member_id".to_owned(), member.clone());
            }
            BrokerError::IllegalGeneration {
                group,
                member,
                topic,
                partition,
                ..
            } => {
                meta.insert("group".to_owned(), group.clone());
                meta.insert("member_id".to_owned(), member.clone());
                meta.insert("topic".to_owned(), topic.clone());
                meta.insert("partition".to_owned(), partition.to_string());
            }
            _ => {}
        }
        let details = ErrorDetails::with_error_info(code.as_str_name(), "spool.v1", meta);
        Status::with_error_details(grpc, e.to_string(), details)
    }
}
