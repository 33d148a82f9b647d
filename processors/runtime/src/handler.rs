//! What a processor implements: a [`Handler`] (pure, synchronous) or an [`AsyncHandler`]
//! (for external effects), and what they receive ([`Input`], [`Timer`]) and report
//! ([`Failure`]).
//!
//! A handler call is all or nothing: when it returns `Err`, everything it did through the
//! [`crate::Context`] for that input (state writes, emitted records, timers) is discarded,
//! and the runtime applies the failure's [`Action`]. The one exception: effects it marked
//! done ([`crate::Context::effect_done`]) before failing with [`Action::Retry`] or
//! [`Action::DeadLetter`] stay marked (they happened), in the transaction that retries or
//! dead-letters the input.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use spool_client::Header;

use crate::context::Context;
use crate::envelope::{self, Attributes, EnvelopeError, Event};
use crate::state::StateError;

/// What the runtime does with an input whose handler failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Try again later, per the processor's retry policy (blocking: the same partition waits;
    /// non-blocking: the input goes to the next retry topic). After the last attempt the input
    /// goes to the dead-letter topic.
    Retry,
    /// Give up on this input now: it goes to the dead-letter topic with the reason.
    DeadLetter,
    /// Something is wrong with the processor itself (its state store failed): abort the
    /// transaction and stop; the supervisor (systemd) restarts it from the last commit.
    Fatal,
}

/// A failed handler call: what to do and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{action:?}: {reason}")]
pub struct Failure {
    /// What the runtime does.
    pub action: Action,
    /// Why (goes into the dead-letter record's `spool_error` header and the logs).
    pub reason: String,
}

impl Failure {
    /// A transient failure: retry.
    pub fn retry(reason: impl Into<String>) -> Failure {
        Failure {
            action: Action::Retry,
            reason: reason.into(),
        }
    }

    /// A permanent failure of this input: dead-letter it.
    pub fn dead_letter(reason: impl Into<String>) -> Failure {
        Failure {
            action: Action::DeadLetter,
            reason: reason.into(),
        }
    }

    /// A failure of the processor itself: stop.
    pub fn fatal(reason: impl Into<String>) -> Failure {
        Failure {
            action: Action::Fatal,
            reason: reason.into(),
        }
    }
}

/// A malformed event is this input's problem: dead-letter it.
impl From<EnvelopeError> for Failure {
    fn from(e: EnvelopeError) -> Failure {
        Failure::dead_letter(e.to_string())
    }
}

/// A failing state store is the processor's problem: stop.
impl From<StateError> for Failure {
    fn from(e: StateError) -> Failure {
        Failure::fatal(e.to_string())
    }
}

/// One input record, as the handler sees it.
#[derive(Clone, Debug)]
pub struct Input {
    /// The topic it was read from (for a record from a retry topic: the original topic).
    pub topic: Arc<str>,
    /// Its partition (the task's partition).
    pub partition: u32,
    /// Its offset (in the original topic, for a retried record).
    pub offset: u64,
    /// Its timestamp (ms since the epoch).
    pub timestamp_ms: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value (`None`: a tombstone).
    pub value: Option<Bytes>,
    /// Headers (the runtime's own `spool_*` retry headers removed).
    pub headers: Vec<Header>,
    /// 1 for the first attempt, 2 for the first retry, …
    pub attempt: u32,
    /// The lane the input came through (its priority class; the topic when lanes are not
    /// configured).
    pub lane: Arc<str>,
}

impl Input {
    /// The value decoded as a CloudEvent with a JSON payload of type `T`
    /// ([`crate::envelope`]). `?` on the error dead-letters the input.
    pub fn event<T: DeserializeOwned>(&self) -> Result<Event<T>, EnvelopeError> {
        envelope::decode(&self.headers, self.key.as_ref(), self.value.as_ref())
    }

    /// The payload alone of [`Input::event`], checked the same way (a record that is not a
    /// valid event of type `T` is an error), without copying the attributes.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, EnvelopeError> {
        envelope::decode_data(&self.headers, self.value.as_ref())
    }

    /// The CloudEvents attributes alone (checked), without decoding the payload.
    pub fn attributes(&self) -> Result<Attributes, EnvelopeError> {
        Attributes::from_headers(&self.headers)
    }

    /// The value as plain JSON (no envelope). `?` on the error dead-letters the input.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        let v = self
            .value
            .as_deref()
            .ok_or_else(|| Failure::dead_letter("no value"))?;
        serde_json::from_slice(v)
            .map_err(|e| Failure::dead_letter(format!("value is not the expected JSON: {e}")))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.key == name)
            .and_then(|h| h.value.as_deref())
    }

    /// The key as UTF-8 text, if it is.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }
}

/// Which clock a timer follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimerKind {
    /// Wall-clock time: fires when the processor's clock passes it, with or without input.
    Wall,
    /// Stream time (the largest input timestamp the task has seen): fires when input moves
    /// stream time past it.
    Stream,
}

impl TimerKind {
    pub(crate) fn tag(self) -> u8 {
        match self {
            TimerKind::Wall => b'w',
            TimerKind::Stream => b's',
        }
    }

    pub(crate) fn from_tag(t: u8) -> Option<TimerKind> {
        match t {
            b'w' => Some(TimerKind::Wall),
            b's' => Some(TimerKind::Stream),
            _ => None,
        }
    }
}

/// A timer that fired. Built by the runtime (or, in a handler's own tests, with
/// [`Timer::new`]); more fields may come.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timer {
    /// Its clock.
    pub kind: TimerKind,
    /// The key it was set under (one timer per kind and key).
    pub key: Bytes,
    /// When it was due (ms since the epoch, on its clock): for a retry, when the first
    /// attempt was due.
    pub at_ms: i64,
    /// 1 for the first attempt, 2 for the first retry of a timer whose handler failed, …
    pub attempt: u32,
    /// What was stored with it.
    pub payload: Bytes,
    /// The task (partition) it belongs to.
    pub partition: u32,
}

impl Timer {
    /// A timer as it fires the first time (attempt 1), e.g. to call a handler's `on_timer`
    /// in its own unit tests.
    pub fn new(
        kind: TimerKind,
        key: impl Into<Bytes>,
        at_ms: i64,
        payload: impl Into<Bytes>,
        partition: u32,
    ) -> Timer {
        Timer {
            kind,
            key: key.into(),
            at_ms,
            attempt: 1,
            payload: payload.into(),
            partition,
        }
    }
}

/// A pure processor: no I/O, no clock (the context carries the time). Implementing this
/// gives an [`AsyncHandler`] for free.
pub trait Handler: Send + 'static {
    /// Handles one input.
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure>;

    /// Handles a timer that fired (default: nothing).
    fn on_timer(&mut self, ctx: &mut Context<'_>, timer: &Timer) -> Result<(), Failure> {
        let _ = (ctx, timer);
        Ok(())
    }
}

/// A processor with external effects (SMTP, HTTP): the same contract, but its calls may
/// wait. Everything inside the log (state, emitted records, offsets) stays exactly once;
/// effects outside it are at-least-once, deduplicated with [`Context::effect`].
pub trait AsyncHandler: Send + 'static {
    /// Handles one input.
    fn handle(
        &mut self,
        ctx: &mut Context<'_>,
        input: &Input,
    ) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Handles a timer that fired (default: nothing).
    fn on_timer(
        &mut self,
        ctx: &mut Context<'_>,
        timer: &Timer,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        let _ = (ctx, timer);
        async { Ok(()) }
    }

    /// A clean stop (SIGTERM), after the last input was handled: finish the external effects
    /// already started (bounded by the handler's own timeouts). The wall timers due when it
    /// returns fire in the last transaction, before it commits, so a handler that settles
    /// its effects on a timer settles them there and a restart does not repeat them
    /// (default: nothing to wait for).
    fn drain(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

impl<H: Handler> AsyncHandler for H {
    fn handle(
        &mut self,
        ctx: &mut Context<'_>,
        input: &Input,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        std::future::ready(Handler::handle(self, ctx, input))
    }

    fn on_timer(
        &mut self,
        ctx: &mut Context<'_>,
        timer: &Timer,
    ) -> impl Future<Output = Result<(), Failure>> + Send {
        std::future::ready(Handler::on_timer(self, ctx, timer))
    }
}
