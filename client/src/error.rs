//! Typed errors of the client.
//!
//! The broker reports errors two ways (see `broker/src/error.rs`), both from one table:
//! - a gRPC [`Status`] for a request about one thing, carrying a google.rpc `ErrorInfo` detail
//!   whose `reason` is the `ErrorCode` name (`ERROR_CODE_UNKNOWN_TOPIC`, …) and whose metadata
//!   names the `topic`, `partition` (or `group`) and, for out-of-range offsets,
//!   `log_start_offset` and `high_watermark`;
//! - a per-partition [`PartitionError`] inside replies covering several partitions.
//!
//! Both become the same [`Error`] variant here, so callers match on one enum whatever the call.
//! A status without an `ErrorInfo` (older brokers, tonic's size limits, the Subscribe stream
//! today) is classified by its gRPC code; one raised locally by a transport failure (it carries
//! a source error) is [`Error::Unavailable`].
//!
//! [`Error::is_retriable`] is the single definition of "worth retrying" used by the producer
//! and the consumer.

use std::sync::Arc;
use std::time::Duration;

use spool_proto::v1::{ErrorCode, PartitionError};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Result type of the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where an offset fell outside a partition's log, as far as the broker said.
///
/// Fields the broker did not report are `None` (the Subscribe stream's error status carries no
/// details today; the consumer fills them in with a `ListOffsets` call when it can).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutOfRange {
    /// Topic, when known.
    pub topic: Option<String>,
    /// Partition, when known.
    pub partition: Option<u32>,
    /// The offset that was asked for, when known.
    pub offset: Option<u64>,
    /// The partition's first offset.
    pub log_start_offset: Option<u64>,
    /// The partition's high watermark (next offset to be written).
    pub high_watermark: Option<u64>,
    /// The broker's message.
    pub message: String,
}

/// Everything that can go wrong in a client call.
///
/// Server-side failures keep the broker's message. Variants holding a `topic` and `partition`
/// name the partition as the request named it.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker address could not be parsed.
    #[error("invalid broker address {addr:?}: {reason}")]
    InvalidAddress {
        /// What was given.
        addr: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A client setting is unusable (a token that cannot be sent as a header, bad TLS
    /// material).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The first connection to the broker failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The broker address, as connected to (`host:port`).
        addr: String,
        /// What went wrong: the transport error's causes (connection refused, the TLS
        /// handshake's complaint, …) and, when the cause is a common mistake, what to do.
        reason: String,
        /// The transport error.
        #[source]
        source: Arc<tonic::transport::Error>,
    },
    /// The broker could not be reached, the connection broke, or the broker is not serving
    /// (gRPC `UNAVAILABLE` without a more specific reason). Retriable.
    #[error("broker unavailable: {message}")]
    Unavailable {
        /// Detail.
        message: String,
    },
    /// No reply within the request timeout. Retriable, but the request may have been carried
    /// out: a produce retried after a timeout may append the batch twice.
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    /// The topic does not exist.
    #[error("{}", or_default(message, || format!("unknown topic {topic:?}")))]
    UnknownTopic {
        /// Topic name (empty if the broker did not say).
        topic: String,
        /// Broker's message.
        message: String,
    },
    /// The topic has no such partition.
    #[error("{}", or_default(message, || format!("unknown partition {topic}/{partition}")))]
    UnknownPartition {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
        /// Broker's message.
        message: String,
    },
    /// The consumer group has no committed offsets (for the topics asked about, if any):
    /// `DeleteGroup` found nothing to delete.
    #[error("{}", or_default(message, || format!("unknown consumer group {group:?}")))]
    UnknownGroup {
        /// Group name (empty if the broker did not say).
        group: String,
        /// Broker's message.
        message: String,
    },
    /// `CreateTopic` for a topic that exists.
    #[error("topic {topic:?} already exists")]
    TopicExists {
        /// Topic name.
        topic: String,
    },
    /// The request was refused as malformed (bad name, bad config, no data, internal topic…).
    #[error("{}", prefixed("invalid request", message))]
    InvalidRequest {
        /// Broker's (or the client's) message.
        message: String,
    },
    /// The batch failed the broker's checks; nothing was written.
    #[error("{}", prefixed("invalid record batch", message))]
    InvalidBatch {
        /// Broker's message.
        message: String,
    },
    /// A batch or record is over a broker limit (e.g. the topic's `max_message_bytes`);
    /// nothing was written.
    #[error("{}", prefixed("too large", message))]
    TooLarge {
        /// Broker's message.
        message: String,
    },
    /// The offset is outside `[log_start_offset, high_watermark]`.
    #[error("offset out of range: {0:?}")]
    OffsetOutOfRange(Box<OutOfRange>),
    /// Stored data failed a check; the broker refused to serve it.
    #[error("{}", prefixed("corruption", message))]
    Corruption {
        /// Broker's message.
        message: String,
    },
    /// A write or fsync failed earlier on the broker; the partition refuses writes until the
    /// broker restarts. Retriable (a restarted broker accepts writes again).
    #[error("{}", prefixed("partition poisoned", message))]
    PartitionPoisoned {
        /// Broker's message.
        message: String,
    },
    /// The broker's disk is full. Retriable (retention may free space).
    #[error("broker storage full: {message}")]
    StorageFull {
        /// Broker's message.
        message: String,
    },
    /// The broker is shutting down. Retriable (against the restarted broker).
    #[error("broker shutting down: {message}")]
    ShuttingDown {
        /// Broker's message.
        message: String,
    },
    /// The caller's credentials do not allow this operation (gRPC `PERMISSION_DENIED`, error
    /// code `ERROR_CODE_NOT_AUTHORIZED`).
    #[error("{}", prefixed("not authorized", message))]
    NotAuthorized {
        /// Broker's message.
        message: String,
    },
    /// The broker wants credentials this client did not send or that it does not know (gRPC
    /// `UNAUTHENTICATED`).
    #[error("{}", prefixed("not authenticated", message))]
    Unauthenticated {
        /// Broker's message.
        message: String,
    },
    /// Any other server-side failure.
    #[error("broker internal error: {message}")]
    Internal {
        /// Broker's message.
        message: String,
    },
    /// A gRPC status this client has no specific variant for.
    #[error("gRPC status {code:?}: {message}")]
    Rpc {
        /// The gRPC code.
        code: Code,
        /// The message.
        message: String,
    },
    /// The broker's reply did not match the request (e.g. a missing result): a client/broker
    /// version mismatch or a bug.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Data received from the broker could not be decoded.
    #[error("cannot decode record batch: {0}")]
    Decode(#[from] spool_record::BatchError),
    /// A record is larger than the producer can ever send (its buffer or request limit).
    #[error("record of {size} bytes exceeds the producer's limit of {limit} bytes")]
    RecordTooLarge {
        /// Estimated encoded size of the record.
        size: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The producer's buffer stayed full for longer than `max_block`.
    #[error("producer buffer full for {0:?} (backpressure): the broker is not keeping up")]
    BufferFull(Duration),
    /// The record was not acknowledged within the producer's `delivery_timeout` (retries
    /// included). `last_error` is the failure of the last attempt, if one was made.
    #[error("delivery timed out after {elapsed:?}{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    DeliveryTimeout {
        /// Time since the record was sent.
        elapsed: Duration,
        /// The last attempt's error.
        last_error: Option<Box<Error>>,
    },
    /// The producer or consumer was closed.
    #[error("closed")]
    Closed,
    /// A consumer call that needs a group was made without one.
    #[error("no consumer group configured")]
    NoGroup,
    /// `StartAt::Committed` found no committed offset and `offset_reset` is `Error`.
    #[error("the group has no committed offset for {topic}/{partition}")]
    NoCommittedOffset {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
    },
    /// The member id is not (or no longer) a member of the group: it left, its session or
    /// rebalance timeout expired (or, for a commit, it was replaced). Its commits are
    /// refused; a [`crate::GroupConsumer`] rejoins by itself.
    #[error("fenced member of group {group:?}: {message}")]
    FencedMember {
        /// Group name (empty if the broker did not say).
        group: String,
        /// Broker's message.
        message: String,
    },
    /// A newer member joined with this member's instance id (another process took its place
    /// and its partitions). A [`crate::GroupConsumer`] does not rejoin (it would fence the
    /// newer one, which would do the same): its membership ends with this error, as Kafka's
    /// consumer does on `FENCED_INSTANCE_ID`.
    #[error("member of group {group:?} replaced by a newer one with the same id: {message}")]
    MemberReplaced {
        /// Group name (empty if the broker did not say).
        group: String,
        /// Broker's message.
        message: String,
    },
    /// A fenced commit named a partition the member does not own in the generation it gave
    /// (revoked since, or granted again later). Nothing was committed.
    #[error("illegal generation for {topic}/{partition}: {message}")]
    IllegalGeneration {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
        /// Broker's message.
        message: String,
    },
    /// The group has live members: offsets cannot be committed or deleted without a member id
    /// and generation.
    #[error("group {group:?} has live members: {message}")]
    GroupNotEmpty {
        /// Group name.
        group: String,
        /// Broker's message.
        message: String,
    },
    /// An idempotent producer's batch carried an older epoch than the partition has seen from
    /// its producer id (a zombie). Nothing was written.
    #[error("producer fenced on {topic}/{partition}: {message}")]
    ProducerFenced {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
        /// Broker's message.
        message: String,
    },
    /// An idempotent producer's batch did not follow its previous one on the partition (a
    /// batch before it failed for good). Nothing was written. The [`crate::Producer`] handles
    /// this itself by starting again under a new producer id.
    #[error("out-of-order sequence on {topic}/{partition}: {message}")]
    OutOfOrderSequence {
        /// Topic name.
        topic: String,
        /// Partition number.
        partition: u32,
        /// Broker's message.
        message: String,
    },
    /// A transactional request did not fit the transaction's state (see the message).
    #[error("invalid transaction state: {message}")]
    InvalidTxnState {
        /// Broker's message.
        message: String,
    },
    /// The broker aborted the transaction after its timeout. Abort it (which succeeds and
    /// hands out the next epoch) and go on.
    #[error("transaction timed out: {message}")]
    TransactionTimedOut {
        /// Broker's message.
        message: String,
    },
}

/// `message`, or the fallback when the broker sent none (its messages name what they are
/// about: "topic \"x\" does not exist").
fn or_default(message: &str, fallback: impl FnOnce() -> String) -> String {
    if message.is_empty() {
        fallback()
    } else {
        message.to_owned()
    }
}

/// `kind: message`, unless the message already starts with `kind` (the broker's own messages
/// often do: "not authorized: token …"), so that nothing is said twice.
fn prefixed(kind: &str, message: &str) -> String {
    let starts = message
        .get(..kind.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(kind));
    if starts {
        message.to_owned()
    } else if message.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {message}")
    }
}

impl Error {
    /// True for failures that may go away by themselves: the producer retries these, the
    /// consumer reconnects on them. Everything else needs the caller to change something.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. }
                | Error::Timeout(_)
                | Error::PartitionPoisoned { .. }
                | Error::StorageFull { .. }
                | Error::ShuttingDown { .. }
        )
    }

    /// The broker's error code for this error, if it is one of the broker's.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            Error::UnknownTopic { .. } => ErrorCode::UnknownTopic,
            Error::UnknownPartition { .. } => ErrorCode::UnknownPartition,
            Error::UnknownGroup { .. } => ErrorCode::UnknownGroup,
            Error::InvalidBatch { .. } => ErrorCode::InvalidBatch,
            Error::TooLarge { .. } => ErrorCode::TooLarge,
            Error::OffsetOutOfRange(_) => ErrorCode::OffsetOutOfRange,
            Error::Corruption { .. } => ErrorCode::Corruption,
            Error::PartitionPoisoned { .. } => ErrorCode::PartitionPoisoned,
            Error::StorageFull { .. } => ErrorCode::StorageFull,
            Error::Internal { .. } => ErrorCode::Internal,
            Error::InvalidRequest { .. } => ErrorCode::InvalidRequest,
            Error::TopicExists { .. } => ErrorCode::TopicExists,
            Error::ShuttingDown { .. } => ErrorCode::ShuttingDown,
            Error::ProducerFenced { .. } => ErrorCode::ProducerFenced,
            Error::FencedMember { .. } => ErrorCode::FencedMember,
            Error::MemberReplaced { .. } => ErrorCode::MemberReplaced,
            Error::IllegalGeneration { .. } => ErrorCode::IllegalGeneration,
            Error::GroupNotEmpty { .. } => ErrorCode::GroupNotEmpty,
            Error::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
            Error::InvalidTxnState { .. } => ErrorCode::InvalidTxnState,
            Error::TransactionTimedOut { .. } => ErrorCode::TransactionTimedOut,
            Error::NotAuthorized { .. } => return ErrorCode::from_str_name(NOT_AUTHORIZED),
            _ => return None,
        })
    }

    /// The out-of-range details, if this is [`Error::OffsetOutOfRange`].
    pub fn out_of_range(&self) -> Option<&OutOfRange> {
        match self {
            Error::OffsetOutOfRange(o) => Some(o),
            _ => None,
        }
    }

    /// Builds the error a per-partition [`PartitionError`] describes, for `topic`/`partition`
    /// as the request named them. `offset` is the offset the request asked for, if any.
    pub fn from_partition_error(
        topic: &str,
        partition: u32,
        offset: Option<u64>,
        e: &PartitionError,
    ) -> Error {
        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
        let oor = OutOfRange {
            topic: Some(topic.to_owned()),
            partition: Some(partition),
            offset,
            log_start_offset: Some(e.log_start_offset),
            high_watermark: Some(e.high_watermark),
            message: e.message.clone(),
        };
        from_code(
            code,
            Some(topic),
            Some(partition),
            None,
            e.message.clone(),
            oor,
        )
        .unwrap_or_else(|| Error::Protocol(format!("error code {}: {}", e.code, e.message)))
    }

    /// Builds the error a gRPC status describes, reading its `ErrorInfo` detail if present.
    pub fn from_status(status: &Status) -> Error {
        let message = status.message().to_owned();
        if let Some(info) = status.get_details_error_info()
            && let Some(code) = ErrorCode::from_str_name(&info.reason)
        {
            let meta = &info.metadata;
            let topic = meta.get("topic").map(String::as_str);
            let partition = meta.get("partition").and_then(|p| p.parse().ok());
            let num = |k: &str| meta.get(k).and_then(|v| v.parse::<u64>().ok());
            let oor = OutOfRange {
                topic: topic.map(str::to_owned),
                partition,
                offset: None,
                log_start_offset: num("log_start_offset"),
                high_watermark: num("high_watermark"),
                message: message.clone(),
            };
            // Brokers before ERROR_CODE_TOPIC_EXISTS said INVALID_REQUEST with ALREADY_EXISTS.
            if status.code() == Code::AlreadyExists {
                return Error::TopicExists {
                    topic: topic.unwrap_or_default().to_owned(),
                };
            }
            let group = meta.get("group").map(String::as_str);
            if let Some(e) = from_code(code, topic, partition, group, message.clone(), oor) {
                return e;
            }
        }
        // Statuses made on this side from a transport failure (connection refused or reset,
        // h2 errors, an early EOF) carry their cause as a source, whatever code tonic picked
        // (UNKNOWN, INTERNAL, even OUT_OF_RANGE for an EOF); statuses from the broker never do.
        if std::error::Error::source(status).is_some() {
            return Error::Unavailable {
                message: describe_causes(status.message(), std::error::Error::source(status)),
            };
        }
        match status.code() {
            Code::Unavailable | Code::Cancelled | Code::Aborted => Error::Unavailable { message },
            Code::DeadlineExceeded => Error::Timeout(Duration::ZERO),
            Code::NotFound => Error::UnknownTopic {
                topic: String::new(),
                message,
            },
            Code::AlreadyExists => Error::TopicExists {
                topic: String::new(),
            },
            Code::InvalidArgument => Error::InvalidRequest { message },
            // tonic's own message-size limits (the broker's `max_request_bytes` on decode, or
            // this client's `max_message_bytes` on encode) are OUT_OF_RANGE without details.
            Code::OutOfRange if message.contains("message length too large") => {
                Error::TooLarge { message }
            }
            Code::OutOfRange => Error::OffsetOutOfRange(Box::new(OutOfRange {
                message,
                ..OutOfRange::default()
            })),
            Code::DataLoss => Error::Corruption { message },
            Code::PermissionDenied => Error::NotAuthorized { message },
            Code::Unauthenticated => Error::Unauthenticated { message },
            Code::ResourceExhausted => Error::StorageFull { message },
            Code::Internal => Error::Internal { message },
            code => Error::Rpc { code, message },
        }
    }
}

/// The causes of a transport failure, joined by ": " and said once each, without tonic's
/// uninformative layers ("transport error", "status: Unknown"), with a hint when the cause is
/// a common mistake: a certificate rustls refuses, a name the certificate does not cover, TLS
/// against a plaintext port or the other way round.
pub(crate) fn describe_transport_error(e: &(dyn std::error::Error + 'static)) -> String {
    describe_causes(&e.to_string(), e.source())
}

/// `first` (an error's own message), then the messages of `source` and its sources, as
/// [`describe_transport_error`] says them.
fn describe_causes(first: &str, source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let vague = |t: &str| matches!(t, "transport error" | "") || t.starts_with("status: ");
    if !vague(first) {
        parts.push(first.to_owned());
    }
    let mut cur = source;
    while let Some(err) = cur {
        let text = err.to_string();
        if !vague(&text) && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    let mut out = if parts.is_empty() {
        first.to_owned()
    } else {
        parts.join(": ")
    };
    if let Some(hint) = transport_hint(&out) {
        out.push_str(" (");
        out.push_str(hint);
        out.push(')');
    }
    out
}

/// What to do about a transport failure whose causes read `text`, for the common mistakes.
fn transport_hint(text: &str) -> Option<&'static str> {
    let has = |s: &str| text.contains(s);
    Some(if has("CaUsedAsEndEntity") {
        "the broker's certificate is a CA certificate (basicConstraints CA:TRUE, as `openssl \
         req -x509` makes by default), which rustls refuses as a server certificate: issue a \
         server certificate from a CA, e.g. with `spoold gen-dev-certs`"
    } else if has("NotValidForName") || has("not valid for name") {
        "the broker's certificate does not name the host connected to: connect by a name it \
         has, or give that name with --tls-domain (SPOOL_TLS_DOMAIN)"
    } else if has("UnknownIssuer") || has("BadSignature") {
        "the broker's certificate is not signed by the CA given with --tls-ca (SPOOL_TLS_CA)"
    } else if has("Expired") || has("NotValidYet") {
        "check the certificate's validity dates and the clocks of both machines"
    } else if has("InvalidContentType") || has("corrupt message") {
        "the broker does not seem to speak TLS on this port: drop the TLS options, or check \
         the port"
    } else if has("CertificateRequired") || has("BadCertificate") || has("UnknownCA") {
        "the broker refused this client's certificate: mutual TLS needs --tls-cert and \
         --tls-key signed by the broker's client_ca"
    } else if has("Connection refused") {
        "is spoold running, and listening on this address?"
    } else {
        return None;
    })
}

/// A hint for a connection the broker dropped or answered with garbage, which depends on
/// whether this client speaks TLS: a TLS listener answers a plaintext HTTP/2 preface with a
/// TLS alert (which HTTP/2 reads as a bad frame) or closes; a listener that wants client
/// certificates closes a TLS 1.3 connection that has none right after the handshake.
pub(crate) fn tls_mode_hint(text: &str, tls: bool) -> Option<&'static str> {
    let dropped = [
        "connection closed",
        "operation was canceled",
        "reset by peer",
        "broken pipe",
    ]
    .iter()
    .any(|s| text.contains(s));
    let garbled = text.contains("FRAME_SIZE_ERROR") || text.contains("frame with invalid size");
    if !tls && (dropped || garbled) {
        Some(
            "the broker may be serving TLS: give the CA of its certificate with --tls-ca \
             (SPOOL_TLS_CA)",
        )
    } else if tls && dropped {
        Some(
            "the broker closed the connection after the TLS handshake: if it requires client \
             certificates (client_ca), give --tls-cert and --tls-key",
        )
    } else {
        None
    }
}

/// `ERROR_CODE_NOT_AUTHORIZED`, matched by name so that this client builds against contracts
/// with and without it.
const NOT_AUTHORIZED: &str = "ERROR_CODE_NOT_AUTHORIZED";

fn from_code(
    code: ErrorCode,
    topic: Option<&str>,
    partition: Option<u32>,
    group: Option<&str>,
    message: String,
    oor: OutOfRange,
) -> Option<Error> {
    let topic_s = || topic.unwrap_or_default().to_owned();
    Some(match code {
        ErrorCode::Unspecified => return None,
        ErrorCode::UnknownTopic => Error::UnknownTopic {
            topic: topic_s(),
            message,
        },
        ErrorCode::UnknownPartition => Error::UnknownPartition {
            topic: topic_s(),
            partition: partition.unwrap_or_default(),
            message,
        },
        ErrorCode::UnknownGroup => Error::UnknownGroup {
            group: group.unwrap_or_default().to_owned(),
            message,
        },
        ErrorCode::InvalidBatch => Error::InvalidBatch { message },
        ErrorCode::TooLarge => Error::TooLarge { message },
        ErrorCode::OffsetOutOfRange => Error::OffsetOutOfRange(Box::new(oor)),
        ErrorCode::Corruption => Error::Corruption { message },
        ErrorCode::PartitionPoisoned => Error::PartitionPoisoned { message },
        ErrorCode::StorageFull => Error::StorageFull { message },
        ErrorCode::Internal => Error::Internal { message },
        ErrorCode::InvalidRequest => Error::InvalidRequest { message },
        ErrorCode::TopicExists => Error::TopicExists { topic: topic_s() },
        ErrorCode::ShuttingDown => Error::ShuttingDown { message },
        ErrorCode::FencedMember => Error::FencedMember {
            group: group.unwrap_or_default().to_owned(),
            message,
        },
        ErrorCode::MemberReplaced => Error::MemberReplaced {
            group: group.unwrap_or_default().to_owned(),
            message,
        },
        ErrorCode::IllegalGeneration => Error::IllegalGeneration {
            topic: topic_s(),
            partition: partition.unwrap_or_default(),
            message,
        },
        ErrorCode::GroupNotEmpty => Error::GroupNotEmpty {
            group: group.unwrap_or_default().to_owned(),
            message,
        },
        ErrorCode::ProducerFenced => Error::ProducerFenced {
            topic: topic_s(),
            partition: partition.unwrap_or_default(),
            message,
        },
        ErrorCode::OutOfOrderSequence => Error::OutOfOrderSequence {
            topic: topic_s(),
            partition: partition.unwrap_or_default(),
            message,
        },
        ErrorCode::InvalidTxnState => Error::InvalidTxnState { message },
        ErrorCode::TransactionTimedOut => Error::TransactionTimedOut { message },
        // Codes added to the contract after this client was written: named ones it knows by
        // name, others as the gRPC status they come with (the caller matches on the code).
        #[allow(unreachable_patterns)]
        other if other.as_str_name() == NOT_AUTHORIZED => Error::NotAuthorized { message },
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

impl From<Status> for Error {
    fn from(s: Status) -> Error {
        Error::from_status(&s)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tonic_types::ErrorDetails;

    use super::*;

    fn status(code: Code, reason: ErrorCode, meta: &[(&str, &str)]) -> Status {
        let meta: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let details = ErrorDetails::with_error_info(reason.as_str_name(), "spool.v1", meta);
        Status::with_error_details(code, "detail", details)
    }

    #[test]
    fn status_with_error_info() {
        let e = Error::from_status(&status(
            Code::OutOfRange,
            ErrorCode::OffsetOutOfRange,
            &[("log_start_offset", "5"), ("high_watermark", "9")],
        ));
        let o = e.out_of_range().expect("out of range");
        assert_eq!((o.log_start_offset, o.high_watermark), (Some(5), Some(9)));
        assert!(!e.is_retriable());

        let e = Error::from_status(&status(
            Code::NotFound,
            ErrorCode::UnknownPartition,
            &[("topic", "t"), ("partition", "3")],
        ));
        assert!(
            matches!(&e, Error::UnknownPartition { topic, partition: 3, .. } if topic == "t"),
            "{e:?}"
        );
        let e = Error::from_status(&status(
            Code::AlreadyExists,
            ErrorCode::InvalidRequest,
            &[("topic", "t")],
        ));
        assert!(
            matches!(&e, Error::TopicExists { topic } if topic == "t"),
            "{e:?}"
        );
        let e = Error::from_status(&status(
            Code::AlreadyExists,
            ErrorCode::TopicExists,
            &[("topic", "t")],
        ));
        assert!(
            matches!(&e, Error::TopicExists { topic } if topic == "t"),
            "{e:?}"
        );
        let e = Error::from_status(&status(Code::Unavailable, ErrorCode::ShuttingDown, &[]));
        assert!(matches!(e, Error::ShuttingDown { .. }) && e.is_retriable());
        let e = Error::from_status(&status(
            Code::NotFound,
            ErrorCode::UnknownGroup,
            &[("group", "billing")],
        ));
        assert!(
            matches!(&e, Error::UnknownGroup { group, .. } if group == "billing"),
            "{e:?}"
        );
        assert_eq!(e.code(), Some(ErrorCode::UnknownGroup));
        assert!(!e.is_retriable());
    }

    #[test]
    fn local_transport_failures_are_unavailable() {
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "early eof");
        let status = Status::from_error(Box::new(eof));
        assert!(std::error::Error::source(&status).is_some());
        let e = Error::from_status(&status);
        assert!(
            matches!(e, Error::Unavailable { .. }) && e.is_retriable(),
            "{e:?}"
        );
    }

    #[test]
    fn status_without_details_uses_the_code() {
        assert!(Error::from_status(&Status::unavailable("x")).is_retriable());
        assert!(matches!(
            Error::from_status(&Status::out_of_range("x")),
            Error::OffsetOutOfRange(_)
        ));
        let too_big = Status::out_of_range(
            "Error, decoded message length too large: found 70000000 bytes, the limit is: 67108864 bytes",
        );
        assert!(matches!(
            Error::from_status(&too_big),
            Error::TooLarge { .. }
        ));
        assert!(matches!(
            Error::from_status(&Status::invalid_argument("x")),
            Error::InvalidRequest { .. }
        ));
        assert!(matches!(
            Error::from_status(&Status::permission_denied("x")),
            Error::NotAuthorized { .. }
        ));
        assert!(matches!(
            Error::from_status(&Status::unauthenticated("x")),
            Error::Unauthenticated { .. }
        ));
        assert!(matches!(
            Error::from_status(&Status::unimplemented("x")),
            Error::Rpc {
                code: Code::Unimplemented,
                ..
            }
        ));
    }

    #[test]
    fn not_authorized_by_name() {
        // Built by name so the test compiles with contracts that lack the code.
        let Some(code) = ErrorCode::from_str_name(NOT_AUTHORIZED) else {
            return;
        };
        let pe = PartitionError {
            code: code as i32,
            message: "token may not produce to t".into(),
            ..PartitionError::default()
        };
        let e = Error::from_partition_error("t", 0, None, &pe);
        assert!(matches!(e, Error::NotAuthorized { .. }), "{e:?}");
        assert_eq!(e.code(), Some(code));
        assert!(!e.is_retriable());
    }

    #[test]
    fn transport_causes_with_hints() {
        let eof = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let status = Status::from_error(Box::new(eof));
        let e = Error::from_status(&status);
        let text = e.to_string();
        assert!(
            text.contains("Connection refused (os error 111)")
                && text.contains("is spoold running"),
            "{text}"
        );
        assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
        let wrong_name = "invalid peer certificate: certificate not valid for name \"x\"; certificate is only valid for DnsName(\"localhost\")";
        assert!(transport_hint(wrong_name).unwrap().contains("--tls-domain"));
        let ca = "invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))";
        assert!(transport_hint(ca).unwrap().contains("CA:TRUE"));
        assert!(
            transport_hint("received corrupt message of type InvalidContentType")
                .unwrap()
                .contains("TLS")
        );
        let frame = "h2 protocol error: connection error detected: frame with invalid size";
        assert!(tls_mode_hint(frame, false).unwrap().contains("--tls-ca"));
        assert!(
            tls_mode_hint("connection closed", true)
                .unwrap()
                .contains("--tls-cert")
        );
        assert_eq!(tls_mode_hint("deadline has elapsed", true), None);
    }

    #[test]
    fn messages_say_things_once() {
        let e = Error::NotAuthorized {
            message: "not authorized: token \"w\" may not describe \"t\"".into(),
        };
        assert_eq!(
            e.to_string(),
            "not authorized: token \"w\" may not describe \"t\""
        );
        let e = Error::NotAuthorized {
            message: "token \"w\" may not describe \"t\"".into(),
        };
        assert_eq!(
            e.to_string(),
            "not authorized: token \"w\" may not describe \"t\""
        );
        let e = Error::UnknownTopic {
            topic: "t".into(),
            message: "topic \"t\" does not exist".into(),
        };
        assert_eq!(e.to_string(), "topic \"t\" does not exist");
        let e = Error::UnknownTopic {
            topic: "t".into(),
            message: String::new(),
        };
        assert_eq!(e.to_string(), "unknown topic \"t\"");
        let e = Error::InvalidBatch {
            message: "invalid record batch: CRC mismatch".into(),
        };
        assert_eq!(e.to_string(), "invalid record batch: CRC mismatch");
    }

    #[test]
    fn partition_errors() {
        let pe = PartitionError {
            code: ErrorCode::OffsetOutOfRange as i32,
            message: "m".into(),
            log_start_offset: 2,
            high_watermark: 7,
        };
        let e = Error::from_partition_error("t", 1, Some(99), &pe);
        assert_eq!(
            e.out_of_range(),
            Some(&OutOfRange {
                topic: Some("t".into()),
                partition: Some(1),
                offset: Some(99),
                log_start_offset: Some(2),
                high_watermark: Some(7),
                message: "m".into(),
            })
        );
        assert_eq!(e.code(), Some(ErrorCode::OffsetOutOfRange));
        let pe = PartitionError {
            code: ErrorCode::StorageFull as i32,
            ..pe
        };
        assert!(Error::from_partition_error("t", 1, None, &pe).is_retriable());
    }

    #[test]
    fn group_coordination_errors() {
        let e = Error::from_status(&status(
            Code::FailedPrecondition,
            ErrorCode::FencedMember,
            &[("group", "g"), ("member_id", "m-1")],
        ));
        assert!(
            matches!(&e, Error::FencedMember { group, .. } if group == "g"),
            "{e:?}"
        );
        assert_eq!(e.code(), Some(ErrorCode::FencedMember));
        assert!(!e.is_retriable());
        let e = Error::from_status(&status(
            Code::FailedPrecondition,
            ErrorCode::MemberReplaced,
            &[("group", "g"), ("member_id", "m-1")],
        ));
        assert!(
            matches!(&e, Error::MemberReplaced { group, .. } if group == "g"),
            "{e:?}"
        );
        assert_eq!(e.code(), Some(ErrorCode::MemberReplaced));
        assert!(!e.is_retriable());
        let e = Error::from_status(&status(
            Code::FailedPrecondition,
            ErrorCode::IllegalGeneration,
            &[("group", "g"), ("topic", "t"), ("partition", "2")],
        ));
        assert!(
            matches!(&e, Error::IllegalGeneration { topic, partition: 2, .. } if topic == "t"),
            "{e:?}"
        );
        let e = Error::from_status(&status(
            Code::FailedPrecondition,
            ErrorCode::GroupNotEmpty,
            &[("group", "g")],
        ));
        assert!(
            matches!(&e, Error::GroupNotEmpty { group, .. } if group == "g"),
            "{e:?}"
        );
        assert_eq!(e.code(), Some(ErrorCode::GroupNotEmpty));
    }
}
