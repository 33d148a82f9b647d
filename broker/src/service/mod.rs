//! gRPC service implementations, one file per service.

mod admin;
mod consume;
mod groups;
mod offsets;
mod produce;
mod txn;

pub(crate) use admin::Admin;
pub(crate) use consume::Consume;
pub(crate) use groups::Groups;
pub(crate) use offsets::Offsets;
pub(crate) use produce::Produce;
pub(crate) use txn::Transactions;

use crate::State;
use crate::error::BrokerError;

/// Refuses a request holding more than `limits.max_partitions_per_request` elements (`what`)
/// of one kind. The server codec counts them before decoding (`request_limits.rs`), against
/// the loosest limit installed in the process; this is the broker's own, exact check.
pub(crate) fn check_count(state: &State, n: usize, what: &str) -> Result<(), BrokerError> {
    let max = state.config.limits.max_partitions_per_request;
    if n > max {
        return Err(BrokerError::InvalidRequest(format!(
            "{n} {what} in one request, the limit is {max}"
        )));
    }
    Ok(())
}

/// Topics whose names start with `__` belong to the broker; clients may read them but not
/// write, create, alter or delete them.
pub(crate) fn check_user_topic(topic: &str) -> Result<(), BrokerError> {
    if topic.starts_with("__") {
        return Err(BrokerError::InvalidRequest(format!(
            "topic {topic:?} is internal to the broker and cannot be changed by clients"
        )));
    }
    Ok(())
}

/// The status that ends a client stream (`ProduceStream`, `Membership`) whose next message
/// could not be received: the codec's OUT_OF_RANGE (over `limits.max_request_bytes`) and
/// INVALID_ARGUMENT (does not decode) as they are; tonic's INTERNAL, which it gives for the
/// client's malformed gRPC framing (a compressed flag without `grpc-encoding`, a bad flag, a
/// body that does not decompress, a message cut off by the end of the stream), becomes
/// INVALID_ARGUMENT: the fault is the client's, nothing of that message was written, and on a
/// `ProduceStream` INTERNAL would say the broker failed with the outcome unknown. (A broken
/// connection gives an error too; its status reaches no one.)
pub(crate) fn receive_error(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::Internal {
        tonic::Status::invalid_argument(format!(
            "the next message could not be received: {}",
            status.message()
        ))
    } else {
        status
    }
}
