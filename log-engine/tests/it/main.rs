//! Integration tests of the log engine: one test binary, a module per area.
// Tests reach files directly on purpose (damage them, read what the engine wrote).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod basic;
mod common;
mod compaction;
mod concurrency;
mod corruption;
mod crash;
mod decode;
mod disk_full;
mod fsync_eio;
mod idempotence;
mod inspect;
mod model;
mod powerloss;
mod retention;
mod sync_lock;
mod topic_create;
mod torn_tail;
mod transactions;
mod zero_ahead;
