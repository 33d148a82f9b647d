//! The real `spoold` for these tests: see `spool-testkit`.

pub(crate) use spool_testkit::{Broker, hash_token};
