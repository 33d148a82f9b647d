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
    /// A fault of the broker's own (a worker task panicked): the request may be retried.
    #[error("internal error: {0}")]
    Internal(String),
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
    /// The member id is not a member of the group (left, expired; for a commit or a
    /// LeaveGroup also replaced).
    #[error("member {member:?} is not a member of group {group:?}{}", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    FencedMember {
        /// Group name.
        group: String,
        /// Member id.
        member: String,
        /// Why, when known.
        reason: String,
    },
    /// A newer member joined with this member's instance id (or named its member id) and
    /// took its partitions: the member's stream ends with this, and it must not rejoin.
    #[error(
        "member {member:?} of group {group:?} was replaced: a newer member joined with the same instance or member id"
    )]
    MemberReplaced {
        /// Group name.
        group: String,
        /// Member id.
        member: String,
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
    /// Reply memory stayed short until the request's deadline (`budget.rs`).
    #[error(
        "no memory for a reply of {needed} bytes within {waited_ms} ms: {used} of \
         limits.max_reply_memory_bytes = {limit} bytes are held by replies in flight \
         ({conn_used} of this connection's {conn_limit}); retry later"
    )]
    ReplyMemoryExhausted {
        /// Bytes the reply needed.
        needed: usize,
        /// How long it waited.
        waited_ms: u64,
        /// Broker-wide bytes in use.
        used: usize,
        /// Broker-wide limit.
        limit: usize,
        /// The connection's bytes in use.
        conn_used: usize,
        /// The connection's limit.
        conn_limit: usize,
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

/// The one table from wire error codes to gRPC status codes (`docs/protocol.md`, "Errors").
/// Whole-request statuses and stream-ending per-partition statuses both use it.
pub(crate) fn grpc_code(code: ErrorCode) -> Code {
    match code {
        ErrorCode::UnknownTopic | ErrorCode::UnknownPartition | ErrorCode::UnknownGroup => {
            Code::NotFound
        }
        ErrorCode::TopicExists => Code::AlreadyExists,
        ErrorCode::InvalidBatch | ErrorCode::InvalidRequest | ErrorCode::TooLarge => {
            Code::InvalidArgument
        }
        ErrorCode::OffsetOutOfRange => Code::OutOfRange,
        ErrorCode::Corruption => Code::DataLoss,
        ErrorCode::PartitionPoisoned | ErrorCode::ShuttingDown => Code::Unavailable,
        ErrorCode::StorageFull | ErrorCode::ReplyMemoryExhausted | ErrorCode::OpenFilesLimit => {
            Code::ResourceExhausted
        }
        ErrorCode::NotAuthorized => Code::PermissionDenied,
        ErrorCode::ProducerFenced
        | ErrorCode::OutOfOrderSequence
        | ErrorCode::InvalidTxnState
        | ErrorCode::TransactionTimedOut
        | ErrorCode::FencedMember
        | ErrorCode::MemberReplaced
        | ErrorCode::IllegalGeneration
        | ErrorCode::GroupNotEmpty => Code::FailedPrecondition,
        ErrorCode::Unspecified | ErrorCode::Internal => Code::Internal,
    }
}

/// The wire code of an error.
fn error_code(e: &BrokerError) -> ErrorCode {
    match e {
        BrokerError::InvalidRequest(_) => ErrorCode::InvalidRequest,
        BrokerError::ShuttingDown => ErrorCode::ShuttingDown,
        BrokerError::Internal(_) => ErrorCode::Internal,
        BrokerError::NotAuthorized(_) => ErrorCode::NotAuthorized,
        BrokerError::UnknownGroup { .. } => ErrorCode::UnknownGroup,
        BrokerError::FencedMember { .. } => ErrorCode::FencedMember,
        BrokerError::MemberReplaced { .. } => ErrorCode::MemberReplaced,
        BrokerError::IllegalGeneration { .. } => ErrorCode::IllegalGeneration,
        BrokerError::GroupNotEmpty { .. } => ErrorCode::GroupNotEmpty,
        BrokerError::InvalidTxnState { .. } => ErrorCode::InvalidTxnState,
        BrokerError::TxnProducerFenced { .. } => ErrorCode::ProducerFenced,
        BrokerError::TransactionTimedOut { .. } => ErrorCode::TransactionTimedOut,
        BrokerError::ReplyMemoryExhausted { .. } => ErrorCode::ReplyMemoryExhausted,
        BrokerError::Engine(e) => match e {
            EngineError::TopicNotFound(_) => ErrorCode::UnknownTopic,
            EngineError::PartitionNotFound { .. } => ErrorCode::UnknownPartition,
            EngineError::TopicExists(_) => ErrorCode::TopicExists,
            EngineError::InvalidTopicName { .. } | EngineError::InvalidConfig(_) => {
                ErrorCode::InvalidRequest
            }
            EngineError::InvalidBatch(BatchError::Limit { .. })
            | EngineError::LimitExceeded { .. } => ErrorCode::TooLarge,
            EngineError::InvalidBatch(_) => ErrorCode::InvalidBatch,
            EngineError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            EngineError::Corruption { .. } => ErrorCode::Corruption,
            EngineError::Poisoned { .. } => ErrorCode::PartitionPoisoned,
            // Closed: the log closed, which happens only at shutdown. A partition whose topic
            // was deleted under a request says TopicDeleted instead.
            EngineError::Closed => ErrorCode::ShuttingDown,
            EngineError::TopicDeleted { .. } => ErrorCode::UnknownTopic,
            EngineError::ProducerFenced { .. } => ErrorCode::ProducerFenced,
            EngineError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
            EngineError::InvalidTxnState { .. } => ErrorCode::InvalidTxnState,
            EngineError::OpenFilesLimit { .. } => ErrorCode::OpenFilesLimit,
            EngineError::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                ) =>
            {
                ErrorCode::StorageFull
            }
            _ => ErrorCode::Internal,
        },
    }
}

/// Longest client-given name (topic, group, member, transactional id) echoed in an error.
pub(crate) const ECHO_MAX: usize = 256;
/// Longest free-form text (which may quote client input) in an error message.
const TEXT_MAX: usize = 1024;
/// Longest error message sent at all (the names and texts in it are bounded first).
const MESSAGE_MAX: usize = 4096;
/// Names of a list (e.g. a request's topics) echoed in an error; the rest are counted.
const LIST_MAX: usize = 8;

/// `s` cut to at most `max` bytes (at a character boundary) followed by `…(N bytes)` when
/// longer, so that what a client sent never comes back unbounded: a default gRPC client
/// refuses response metadata over a few KiB, and would then see that instead of the error.
fn bound(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…({} bytes)", &s[..end], s.len()).into()
}

/// A client-given name as it may be echoed in an error message or detail.
pub(crate) fn echo(s: &str) -> std::borrow::Cow<'_, str> {
    bound(s, ECHO_MAX)
}

fn echo_owned(s: String) -> String {
    match echo(&s) {
        std::borrow::Cow::Borrowed(_) => s,
        std::borrow::Cow::Owned(b) => b,
    }
}

fn text_owned(s: String) -> String {
    match bound(&s, TEXT_MAX) {
        std::borrow::Cow::Borrowed(_) => s,
        std::borrow::Cow::Owned(b) => b,
    }
}

/// The same error with every string a client could have sent bounded ([`echo`] for names,
/// [`TEXT_MAX`] for free text that may quote a request): done once, here, at the boundary, so
/// no handler has to remember it.
fn bounded(e: BrokerError) -> BrokerError {
    use BrokerError as B;
    use EngineError as E;
    match e {
        B::InvalidRequest(m) => B::InvalidRequest(text_owned(m)),
        B::NotAuthorized(m) => B::NotAuthorized(text_owned(m)),
        B::UnknownGroup { group, topics } => {
            let n = topics.len();
            let mut topics: Vec<String> =
                topics.into_iter().take(LIST_MAX).map(echo_owned).collect();
            if n > LIST_MAX {
                topics.push(format!("…({} more)", n - LIST_MAX));
            }
            B::UnknownGroup {
                group: echo_owned(group),
                topics,
            }
        }
        B::FencedMember {
            group,
            member,
            reason,
        } => B::FencedMember {
            group: echo_owned(group),
            member: echo_owned(member),
            reason: text_owned(reason),
        },
        B::MemberReplaced { group, member } => B::MemberReplaced {
            group: echo_owned(group),
            member: echo_owned(member),
        },
        B::IllegalGeneration {
            group,
            member,
            topic,
            partition,
            reason,
        } => B::IllegalGeneration {
            group: echo_owned(group),
            member: echo_owned(member),
            topic: echo_owned(topic),
            partition,
            reason: text_owned(reason),
        },
        B::GroupNotEmpty {
            group,
            members,
            what,
        } => B::GroupNotEmpty {
            group: echo_owned(group),
            members,
            what,
        },
        B::InvalidTxnState { txn_id, reason } => B::InvalidTxnState {
            txn_id: echo_owned(txn_id),
            reason: text_owned(reason),
        },
        B::TxnProducerFenced {
            txn_id,
            producer_id,
            epoch,
            current_epoch,
        } => B::TxnProducerFenced {
            txn_id: echo_owned(txn_id),
            producer_id,
            epoch,
            current_epoch,
        },
        B::TransactionTimedOut {
            txn_id,
            epoch,
            timeout_ms,
        } => B::TransactionTimedOut {
            txn_id: echo_owned(txn_id),
            epoch,
            timeout_ms,
        },
        B::Engine(e) => B::Engine(match e {
            E::TopicNotFound(t) => E::TopicNotFound(echo_owned(t)),
            E::TopicExists(t) => E::TopicExists(echo_owned(t)),
            E::PartitionNotFound { topic, partition } => E::PartitionNotFound {
                topic: echo_owned(topic),
                partition,
            },
            E::TopicDeleted { topic, partition } => E::TopicDeleted {
                topic: echo_owned(topic),
                partition,
            },
            E::InvalidTopicName { name, reason } => E::InvalidTopicName {
                name: echo_owned(name),
                reason,
            },
            E::InvalidConfig(m) => E::InvalidConfig(text_owned(m)),
            E::InvalidTxnState {
                producer_id,
                reason,
            } => E::InvalidTxnState {
                producer_id,
                reason: text_owned(reason),
            },
            other => other,
        }),
        other => other,
    }
}

/// The message of an error, every echoed client string in it bounded.
fn message(e: &BrokerError) -> String {
    bound(&e.to_string(), MESSAGE_MAX).into_owned()
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
    let e = bounded(e.into());
    let code = error_code(&e);
    let (log_start_offset, high_watermark) = offsets(&e).unwrap_or_default();
    if code == ErrorCode::Internal || code == ErrorCode::Corruption {
        tracing::error!(error = %e, "request failed");
    }
    PartitionError {
        code: code as i32,
        message: message(&e),
        log_start_offset,
        high_watermark,
    }
}

/// A per-partition error as a status (for streams, which end on their first error), with the
/// same `ErrorInfo` detail a request-level status carries.
pub(crate) fn partition_status(topic: &str, partition: u32, e: &PartitionError) -> Status {
    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
    let topic = echo(topic);
    let mut meta = HashMap::new();
    meta.insert("topic".to_owned(), topic.clone().into_owned());
    meta.insert("partition".to_owned(), partition.to_string());
    if code == ErrorCode::OffsetOutOfRange {
        meta.insert(
            "log_start_offset".to_owned(),
            e.log_start_offset.to_string(),
        );
        meta.insert("high_watermark".to_owned(), e.high_watermark.to_string());
    }
    let details = ErrorDetails::with_error_info(code.as_str_name(), "spool.v1", meta);
    let message = format!("{topic}/{partition}: {}", bound(&e.message, MESSAGE_MAX));
    Status::with_error_details(grpc_code(code), message, details)
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let e = bounded(e);
        let code = error_code(&e);
        if code == ErrorCode::Internal || code == ErrorCode::Corruption {
            tracing::error!(error = %e, "request failed");
        }
        let mut meta = HashMap::new();
        if let Some((start, hwm)) = offsets(&e) {
            meta.insert("log_start_offset".to_owned(), start.to_string());
            meta.insert("high_watermark".to_owned(), hwm.to_string());
        }
        // Every string below was bounded by `bounded`.
        match &e {
            BrokerError::Engine(EngineError::TopicNotFound(t) | EngineError::TopicExists(t)) => {
                meta.insert("topic".to_owned(), t.clone());
            }
            BrokerError::Engine(
                EngineError::PartitionNotFound { topic, partition }
                | EngineError::TopicDeleted { topic, partition },
            ) => {
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
            BrokerError::FencedMember { group, member, .. }
            | BrokerError::MemberReplaced { group, member } => {
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
        Status::with_error_details(grpc_code(code), message(&e), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_grpc_code() {
        // The table is total over the enum (a new code fails to compile until it has a row);
        // spot-check the rows the docs call out.
        assert_eq!(grpc_code(ErrorCode::TopicExists), Code::AlreadyExists);
        assert_eq!(grpc_code(ErrorCode::PartitionPoisoned), Code::Unavailable);
        assert_eq!(grpc_code(ErrorCode::InvalidRequest), Code::InvalidArgument);
        assert_eq!(grpc_code(ErrorCode::Internal), Code::Internal);
        // A status and the per-partition status of the same error agree.
        let e = || BrokerError::Engine(EngineError::TopicNotFound("t".into()));
        let whole = Status::from(e());
        let part = partition_status("t", 0, &partition_error(e()));
        assert_eq!(whole.code(), part.code());
    }

    /// A write or wait that raced a DeleteTopic says the topic is unknown (with the topic and
    /// partition in its ErrorInfo), not that the broker is shutting down; a closed log (which
    /// happens only at shutdown) still says shutting down.
    #[test]
    fn a_deleted_topic_is_unknown_and_a_closed_log_is_shutting_down() {
        let deleted = || {
            BrokerError::Engine(EngineError::TopicDeleted {
                topic: "t".into(),
                partition: 3,
            })
        };
        let s = Status::from(deleted());
        assert_eq!(s.code(), Code::NotFound);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "ERROR_CODE_UNKNOWN_TOPIC");
        assert_eq!(info.metadata["topic"], "t");
        assert_eq!(info.metadata["partition"], "3");
        let p = partition_error(deleted());
        assert_eq!(p.code, ErrorCode::UnknownTopic as i32);
        assert_eq!(
            p.message,
            "topic t was deleted: partition t/3 no longer exists"
        );
        let s = Status::from(BrokerError::Engine(EngineError::Closed));
        assert_eq!(s.code(), Code::Unavailable);
        let info = s.get_details_error_info().unwrap();
        assert_eq!(info.reason, "ERROR_CODE_SHUTTING_DOWN");
    }

    #[test]
    fn echoed_names_are_bounded() {
        let long = "é".repeat(600_000); // 1.2 MB, two bytes a character
        let s = Status::from(BrokerError::Engine(EngineError::TopicNotFound(
            long.clone(),
        )));
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().len() < ECHO_MAX + 100, "{}", s.message().len());
        assert!(s.message().contains("…(1200000 bytes)"), "{}", s.message());
        let info = s.get_details_error_info().unwrap();
        assert!(info.metadata["topic"].len() <= ECHO_MAX + 32);
        // Free text quoting a request is bounded too, and lists are cut.
        let s = Status::from(BrokerError::InvalidRequest(format!("bad name {long:?}")));
        assert!(s.message().len() <= TEXT_MAX + 32);
        let s = Status::from(BrokerError::UnknownGroup {
            group: long.clone(),
            topics: vec![long.clone(); 1000],
        });
        assert!(
            s.message().len() <= MESSAGE_MAX + 32,
            "{}",
            s.message().len()
        );
        assert!(s.message().contains("…(992 more)"));
        let p = partition_error(BrokerError::Engine(EngineError::PartitionNotFound {
            topic: long.clone(),
            partition: 3,
        }));
        assert!(p.message.len() < ECHO_MAX + 100);
        let st = partition_status(&long, 3, &p);
        assert!(st.message().len() < 2 * ECHO_MAX + 200);
        // Short names pass through untouched.
        assert_eq!(echo("prices"), "prices");
    }
}
