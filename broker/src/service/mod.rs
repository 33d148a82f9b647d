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

use crate::error::BrokerError;

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
