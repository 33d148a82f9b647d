//! Integration tests of the log engine: one test binary, a module per area.

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
mod retention;
mod torn_tail;
mod transactions;
