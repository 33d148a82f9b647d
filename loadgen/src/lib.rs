//! Load generator for `spoold`: `spool bench` and the `spool-loadgen` binary.
//!
//! Three workloads against a running broker, each reporting MB/s, records/s and (where it
//! means something) latency percentiles from an HdrHistogram:
//!
//! - [`run_produce`]: producers send **pre-encoded** RecordBatch v2 batches (encoded once with
//!   `BatchBuilder` before the run and re-sent as refcounted `Bytes`, so the load generator
//!   spends no CPU encoding) over one `ProduceStream` per producer with up to `in_flight`
//!   requests awaiting their reply (or, with `unary`, that many unary `Produce` calls).
//!   Without `rate` it runs closed-loop at maximum throughput and latency is measured from the
//!   actual send. With `rate` it runs **open-loop**: request *i* is due at
//!   `start + i × records_per_batch / rate`, and its latency is measured from that intended
//!   time, so a stall (full window, slow broker) shows up in the latency instead of silently
//!   lowering the send rate (coordinated omission).
//! - [`run_consume`]: one `Subscribe` stream per consumer from the earliest offset, raw
//!   batches (never decoded); records are counted from batch headers. It reads until the high
//!   watermarks seen at the start are reached (catch-up read) or `duration` passes.
//! - [`run_e2e`]: producers at a fixed record rate put the intended send time (ns since a
//!   base instant of this process) in the first 8 bytes of each value; a `Subscribe` consumer in
//!   the same process decodes the records and records `delivery − intended send`. The
//!   producer acts like an application on a Kafka-like client ([`Pacing::Linger`], the
//!   default): each record is handed over at its intended time, and a batch goes once its
//!   oldest record has waited `linger` (0: at once) or a full batch is due, as soon as fewer
//!   than `in_flight` requests await their reply; it wakes for that on a timerfd (tens of µs late), not on
//!   tokio's 1 ms timers. The issue-3 producer (`Pacing::Tick`, `TickOnly`) stays for
//!   comparing old figures. Each value also carries its batch's cut time, so the report splits
//!   the latency into before and after the send ([`LatencySplit`]).
//!
//! Each run has a warm-up: only acknowledgements (or deliveries) inside
//! `[start + warmup, start + warmup + duration)` count.
//!
//! Every report carries the CPU time the load generator and any watched process (the broker,
//! `--watch-pid`) used over the measured window ([`cpu`]), so a throughput figure comes with
//! its cost in CPU-seconds per GB.
//!
//! [`broker::Spoold`] starts a real `spoold` on a temp dir; [`scenarios`] runs the issue's
//! scenarios with it and writes a results file.
//!
//! Both command lines (`spool-loadgen produce|consume|e2e` and `spool bench …`) take the same
//! workload flags, [`LoadArgs`]; a broker with TLS or bearer tokens is reached through
//! [`LoadConfig::connection`], which every connection of a run uses.

mod args;
pub mod broker;
pub mod cpu;
mod run;
pub mod scenarios;
pub mod units;

pub use args::LoadArgs;
pub use run::{
    Acks, Compression, Connection, LatencySplit, LoadConfig, Mode, Pacing, Report, RunLatency,
    Stamping, count_records, ensure_topic, prefault, run, run_consume, run_e2e, run_produce,
};
