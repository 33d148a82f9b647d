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
            "{n} {what} in one request; at most {max}"
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
