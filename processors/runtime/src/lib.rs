//! Spool's stream-processor runtime: write a processor as one handler, run it as one
//! binary under systemd.
//!
//! ```text
//! inputs (topics, lanes) ─► GroupConsumer ─► Task per partition ─► Handler::handle(ctx, input)
//!                                                  │ state (stores) ─ changelog + local SQLite
//!                                                  │ timers (wall / stream time)
//!                                                  └ emits ─► TransactionalProducer
//!   one transaction per batch: outputs + changelog records + input offsets
//! ```
//!
//! - [`Handler`] / [`AsyncHandler`]: what a processor implements; [`Context`]: state
//!   ([`Context::store`]), emitting ([`Context::emit`], [`Context::emit_event`]), timers
//!   ([`Context::set_timer`]), idempotency keys of external effects ([`Context::effect`]),
//!   the time ([`Context::now_ms`]); [`Failure`]: retry, dead-letter, or stop.
//! - [`envelope`]: CloudEvents (Kafka binding, binary mode) typed encode/decode.
//! - [`runtime`]: the exactly-once loop against `spoold`; [`app`]: a processor binary's
//!   `main` (flags, TOML config, systemd, metrics, replay mode); [`config`].
//! - [`testing`]: [`testing::TestDriver`], the same engine without a broker.
//!
//! The guarantees, their limits and how to operate processors: `docs/processors.md`.
#![warn(missing_docs)]

pub mod app;
pub mod config;
pub mod context;
pub mod control;
pub mod effects;
pub mod engine;
pub mod envelope;
pub mod flow;
pub mod handler;
pub mod jobs;
pub mod metrics;
pub mod ops;
mod outputs;
mod restore;
pub mod runtime;
pub mod state;
pub mod testing;

pub use context::{Context, EffectStatus, Emit, Store};
pub use effects::EffectsRetention;
pub use engine::{Attempt, RetryMode, RetryPolicy, dead_letter_for, dlq_topic, retry_topic};
pub use envelope::{Attributes, EnvelopeError, Event};
pub use flow::{LaneConfig, LaneYield, QuietHours};
pub use handler::{Action, AsyncHandler, Failure, Handler, Input, Timer, TimerKind};
pub use jobs::{JobEvent, JobState, JobStatus, Jobs};
pub use runtime::{Clock, RuntimeConfig, RuntimeError, SystemClock};
pub use state::StateError;
