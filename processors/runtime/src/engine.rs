//! The part of processing that does not depend on the broker, shared by the live runtime
//! ([`crate::runtime`]) and the test driver ([`crate::testing`]): one [`Task`] per input
//! partition (its state, stream time and timers), running handler calls and timers against
//! it, the retry policy, and the dead-letter record format.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use spool_client::{Header, ProducerRecord};

use crate::context::{self, Context, Emit};
use crate::effects::EffectsRetention;
use crate::handler::{Action, AsyncHandler, Failure, Input, Timer, TimerKind};
use crate::state::{self, Backend, StateError, TaskState};

/// Headers the runtime writes on dead letters.
pub mod headers {
    /// Why the record was dead-lettered (the last failure's reason).
    pub const DLQ_ERROR: &str = "spool_dlq_error";
    /// The record's original topic.
    pub const DLQ_TOPIC: &str = "spool_dlq_topic";
    /// Its original partition.
    pub const DLQ_PARTITION: &str = "spool_dlq_partition";
    /// Its original offset.
    pub const DLQ_OFFSET: &str = "spool_dlq_offset";
    /// Attempts made.
    pub const DLQ_ATTEMPTS: &str = "spool_dlq_attempts";
    /// JSON array of `{attempt, at_ms, reason}`, oldest first.
    pub const DLQ_HISTORY: &str = "spool_dlq_history";
    /// The consumer group (processor) that gave up on it.
    pub const DLQ_GROUP: &str = "spool_dlq_group";
    /// When (ms since the epoch).
    pub const DLQ_TIME: &str = "spool_dlq_time_ms";
    /// Retry topics: the attempt the record is due for (2 for the first retry).
    pub const RETRY_ATTEMPT: &str = "spool_retry_attempt";
    /// Retry topics: when it is due (ms since the epoch).
    pub const RETRY_DUE: &str = "spool_retry_due_ms";
    /// Retry topics: the original topic.
    pub const RETRY_TOPIC: &str = "spool_retry_topic";
    /// Retry topics: the original partition.
    pub const RETRY_PARTITION: &str = "spool_retry_partition";
    /// Retry topics: the original offset.
    pub const RETRY_OFFSET: &str = "spool_retry_offset";
    /// Retry topics: JSON history of the failed attempts so far.
    pub const RETRY_HISTORY: &str = "spool_retry_history";
    /// Every header the runtime adds starts with this.
    pub const PREFIX: &str = "spool_";
}

/// How failed inputs are retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// `blocking`: the partition waits and retries the same input (ordered work).
    /// `topics`: the input goes to a retry topic and the partition goes on (unordered work).
    pub mode: RetryMode,
    /// Attempts in all (the first one included) before the input is dead-lettered; 0 retries
    /// a blocking input forever (until an operator skips it: `spool dlq skip`).
    pub max_attempts: u32,
    /// Blocking mode: delay before the first retry (ms); doubles per attempt, ±20% jitter.
    pub initial_backoff_ms: u64,
    /// Blocking mode: longest delay (ms).
    pub max_backoff_ms: u64,
    /// Topics mode: one retry topic per delay (ms), used in order; attempts past the list use
    /// its last topic.
    pub topic_delays_ms: Vec<u64>,
    /// Timers: attempts in all before a timer whose handler keeps failing is dropped (logged
    /// and counted); 0 (the default) retries it forever, with the backoff above (capped at
    /// `max_backoff_ms`), the partition's later timers firing meanwhile.
    pub timer_max_attempts: u32,
}

/// See [`RetryPolicy::mode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryMode {
    /// Retry in place.
    #[default]
    Blocking,
    /// Retry through retry topics.
    Topics,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            mode: RetryMode::Blocking,
            max_attempts: 5,
            initial_backoff_ms: 200,
            max_backoff_ms: 30_000,
            topic_delays_ms: vec![1_000, 10_000, 60_000],
            timer_max_attempts: 0,
        }
    }
}

impl RetryPolicy {
    /// Whether a failed attempt number `attempt` (1-based) gets another one.
    pub fn retries_after(&self, attempt: u32) -> bool {
        self.max_attempts == 0 || attempt < self.max_attempts
    }

    /// Whether a timer whose attempt number `attempt` (1-based) failed is set again.
    pub fn retries_timer_after(&self, attempt: u32) -> bool {
        self.timer_max_attempts == 0 || attempt < self.timer_max_attempts
    }

    /// The backoff before attempt `attempt + 1` in blocking mode, without jitter.
    pub fn base_backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        Duration::from_millis(
            self.initial_backoff_ms
                .saturating_mul(1u64 << exp)
                .min(self.max_backoff_ms),
        )
    }

    /// The same with ±20% jitter (so that many processors do not retry together).
    pub fn backoff(&self, attempt: u32) -> Duration {
        spool_client::Backoff {
            initial: Duration::from_millis(self.initial_backoff_ms),
            max: Duration::from_millis(self.max_backoff_ms),
        }
        .delay(attempt)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial_backoff_ms == 0 || self.max_backoff_ms < self.initial_backoff_ms {
            return Err("retry: need 0 < initial_backoff_ms <= max_backoff_ms".into());
        }
        if self.mode == RetryMode::Topics
            && (self.topic_delays_ms.is_empty()
                || self.topic_delays_ms.len() > 16
                || self.max_attempts == 0)
        {
            return Err(
                "retry: mode = \"topics\" needs 1..=16 topic_delays_ms and max_attempts > 0".into(),
            );
        }
        Ok(())
    }
}

/// One failed attempt, as recorded in the dead-letter history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Attempt number (1-based).
    pub attempt: u32,
    /// When it failed (ms since the epoch).
    pub at_ms: i64,
    /// Why.
    pub reason: String,
}

/// The dead-letter topic of `source` for `group`: `<source>.<group>.dlq`.
pub fn dlq_topic(source: &str, group: &str) -> String {
    format!("{source}.{group}.dlq")
}

/// Retry topic number `level` (1-based) of `source` for `group`:
/// `<source>.<group>.retry-<level>`. Per source topic and group, so groups never take each
/// other's retries.
pub fn retry_topic(source: &str, group: &str, level: usize) -> String {
    format!("{source}.{group}.retry-{level}")
}

fn text_header(headers: &[Header], name: &str) -> Option<String> {
    headers
        .iter()
        .rev()
        .find(|h| h.key == name)
        .and_then(|h| h.value.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

fn push_header(r: &mut ProducerRecord, k: &str, v: String) {
    r.headers.push(Header {
        key: k.to_owned(),
        value: Some(Bytes::from(v.into_bytes())),
    })
}

/// An input carried into a retry or dead-letter topic: its key, value, timestamp and own
/// headers (the runtime's `headers::PREFIX` ones are dropped; the caller adds fresh ones).
fn carried_over(input: &Input) -> ProducerRecord {
    ProducerRecord {
        key: input.key.clone(),
        value: input.value.clone(),
        headers: input
            .headers
            .iter()
            .filter(|h| !h.key.starts_with(headers::PREFIX))
            .cloned()
            .collect(),
        timestamp_ms: Some(input.timestamp_ms),
    }
}

/// The record an input becomes in a retry topic: its key, value and own headers, plus its
/// original position, the next attempt's number, when it is due, and the history so far.
pub(crate) fn retry_record(input: &Input, history: &[Attempt], due_ms: i64) -> ProducerRecord {
    let mut r = carried_over(input);
    let next = RetryInfo {
        attempt: input.attempt + 1,
        due_ms,
        topic: input.topic.to_string(),
        offset: input.offset,
        history: history.to_vec(),
    };
    push_retry_headers(&mut r, &next, input.partition);
    r
}

/// Adds the retry headers [`parse_retry`] reads: `info` and the original partition. The
/// record must not carry any already (its `spool_*` headers removed).
pub(crate) fn push_retry_headers(r: &mut ProducerRecord, info: &RetryInfo, partition: u32) {
    push_header(r, headers::RETRY_ATTEMPT, info.attempt.to_string());
    push_header(r, headers::RETRY_DUE, info.due_ms.to_string());
    push_header(r, headers::RETRY_TOPIC, info.topic.clone());
    push_header(r, headers::RETRY_PARTITION, partition.to_string());
    push_header(r, headers::RETRY_OFFSET, info.offset.to_string());
    push_header(
        r,
        headers::RETRY_HISTORY,
        serde_json::to_string(&info.history).unwrap_or_default(),
    );
}

/// What the retry headers of a record say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RetryInfo {
    pub(crate) attempt: u32,
    pub(crate) due_ms: i64,
    pub(crate) topic: String,
    pub(crate) offset: u64,
    pub(crate) history: Vec<Attempt>,
}

/// Reads a retry record's headers; `None` if they are missing or malformed (a record put
/// into a retry topic by hand: treated as a first attempt, due now).
pub(crate) fn parse_retry(headers: &[Header]) -> Option<RetryInfo> {
    let h = |n| text_header(headers, n);
    Some(RetryInfo {
        attempt: h(headers::RETRY_ATTEMPT)?.parse().ok()?,
        due_ms: h(headers::RETRY_DUE)?.parse().ok()?,
        topic: h(headers::RETRY_TOPIC)?,
        offset: h(headers::RETRY_OFFSET)?.parse().ok()?,
        history: serde_json::from_str(&h(headers::RETRY_HISTORY).unwrap_or_default())
            .unwrap_or_default(),
    })
}

/// The dead-letter topic and record of an input that a processor gives up on **outside** the
/// handler call that read it (e.g. an effect that finished later and is settled from a
/// timer): the same headers the runtime writes, so `spool dlq` and redrives treat it like any
/// other dead letter. Emit it with [`crate::Context::emit_to`] on `input.partition`, in the
/// transaction that settles the effect. (Not counted in `spool_processor_dead_letters_total`.)
pub fn dead_letter_for(
    input: &Input,
    group: &str,
    history: &[Attempt],
    now_ms: i64,
) -> (String, ProducerRecord) {
    (
        dlq_topic(&input.topic, group),
        dead_letter(input, group, history, now_ms),
    )
}

/// The dead-letter record of an input: its key, value and headers (the runtime's own
/// `spool_*` ones replaced), plus where it came from, why, and every attempt.
pub(crate) fn dead_letter(
    input: &Input,
    group: &str,
    history: &[Attempt],
    now_ms: i64,
) -> ProducerRecord {
    let mut r = carried_over(input);
    let last = history.last().map(|a| a.reason.clone()).unwrap_or_default();
    let push = push_header;
    push(&mut r, headers::DLQ_ERROR, last);
    push(&mut r, headers::DLQ_TOPIC, input.topic.to_string());
    push(&mut r, headers::DLQ_PARTITION, input.partition.to_string());
    push(&mut r, headers::DLQ_OFFSET, input.offset.to_string());
    push(&mut r, headers::DLQ_ATTEMPTS, history.len().to_string());
    push(
        &mut r,
        headers::DLQ_HISTORY,
        serde_json::to_string(history).unwrap_or_default(),
    );
    push(&mut r, headers::DLQ_GROUP, group.to_owned());
    push(&mut r, headers::DLQ_TIME, now_ms.to_string());
    r
}

/// Checks a handler call's emitted records before its writes join the open transaction
/// (the live runtime's [`crate::outputs`]: the topic exists, the partition is in range, the
/// record fits the topic's size limit; it also gives keyed records their partition). An
/// `Err` fails the call, as if the handler had returned it.
pub(crate) trait OutputCheck {
    /// Checks (and may route) `emits`.
    fn check(
        &mut self,
        emits: &mut [Emit],
    ) -> impl std::future::Future<Output = Result<(), Failure>> + Send;
}

/// No check (the test driver, which has no broker to ask).
pub(crate) struct Unchecked;

impl OutputCheck for Unchecked {
    async fn check(&mut self, _: &mut [Emit]) -> Result<(), Failure> {
        Ok(())
    }
}

/// Where the runtime is running a handler: its name and whether effects are enabled.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Env<'a> {
    pub(crate) processor: &'a str,
    pub(crate) effects_enabled: bool,
    pub(crate) effects_retention: EffectsRetention,
}

/// One task: an input partition number, its state, its stream time.
#[derive(Debug)]
pub(crate) struct Task {
    pub(crate) partition: u32,
    pub(crate) state: TaskState,
    /// Stream time as the open transaction sees it.
    pub(crate) stream_time: i64,
    /// Stream time as of the last check of stream timers.
    pub(crate) stream_timers_checked: i64,
}

impl Task {
    /// A task over a restored local store.
    pub(crate) fn open(partition: u32, backend: Box<dyn Backend>) -> Result<Task, StateError> {
        let state = TaskState::new(backend);
        let stream_time = committed_stream_time(&state)?;
        Ok(Task {
            partition,
            state,
            stream_time,
            stream_timers_checked: i64::MIN,
        })
    }

    /// The open transaction aborted: drop its writes, go back to the committed stream time.
    pub(crate) fn discard(&mut self) -> Result<(), StateError> {
        self.state.discard();
        self.stream_time = committed_stream_time(&self.state)?;
        self.stream_timers_checked = i64::MIN;
        Ok(())
    }

    /// Runs the handler on one input (`resume`: the cursor of the previous call for it,
    /// [`Context::call_again`]). On `Ok` its emitted records must pass `outputs` (else the
    /// call fails with that failure, as if the handler had returned it); then its writes
    /// join the open transaction and its emitted records are returned, with the cursor of a
    /// call asked for. On `Err` only the idempotency keys it marked done join the open
    /// transaction ([`Context::into_effect_marks`]; none on a fatal failure, which aborts it).
    pub(crate) async fn handle<H: AsyncHandler, C: OutputCheck>(
        &mut self,
        handler: &mut H,
        input: &Input,
        now_ms: i64,
        env: Env<'_>,
        resume: Option<Bytes>,
        outputs: &mut C,
    ) -> Result<(Vec<Emit>, Option<Bytes>), Failure> {
        let st = self.stream_time.max(input.timestamp_ms);
        let mut ctx = Context::new(&self.state, self.partition, now_ms, st, env);
        ctx.resume(resume);
        // The outputs are checked before the call's writes are taken, so a failed check keeps
        // the call's effect marks as a handler failure does.
        let r = match handler.handle(&mut ctx, input).await {
            Ok(()) => outputs.check(ctx.emits_mut()).await,
            Err(f) => Err(f),
        };
        if let Err(f) = r {
            if f.action != Action::Fatal {
                self.state.merge(ctx.into_effect_marks()?);
            }
            return Err(f);
        }
        let (mut writes, emits, again) = ctx.into_parts()?;
        if st > self.stream_time {
            self.stream_time = st;
            writes.insert(
                state::composite(context::META, context::STREAM_TIME),
                Some(Bytes::copy_from_slice(&st.to_be_bytes())),
            );
        }
        self.state.merge(writes);
        Ok((emits, again))
    }

    /// Timers of `kind` due at or before `upto`, earliest first, at most `limit`, as stored:
    /// `at_ms` is when each is due now and `attempt` is 1 ([`Task::fire`] reads a retried
    /// timer's attempt and first due time).
    pub(crate) fn due_timers(
        &self,
        kind: TimerKind,
        upto: i64,
        limit: usize,
    ) -> Result<Vec<Timer>, StateError> {
        let from = state::composite(context::TIMERS, &[kind.tag()]);
        let to = match upto.checked_add(1) {
            Some(end) => {
                state::composite(context::TIMERS, &context::timer_time_key(kind, end, b""))
            }
            None => state::composite(context::TIMERS, &[kind.tag() + 1]),
        };
        let entries = self.state.range(None, &from, Some(&to), limit)?;
        let skip = 1 + context::TIMERS.len();
        Ok(entries
            .into_iter()
            .filter_map(|(k, payload)| {
                let (kind, at_ms, key) = context::parse_timer_key(&k[skip..])?;
                Some(Timer {
                    kind,
                    key: Bytes::copy_from_slice(key),
                    at_ms,
                    attempt: 1,
                    payload,
                    partition: self.partition,
                })
            })
            .collect())
    }

    /// Fires one timer (`timer` as [`Task::due_timers`] found it: `at_ms` is when it is due
    /// now): removes it and runs the handler's `on_timer` (which may set it again), in the
    /// open transaction. The handler sees the timer with its attempt number and, for a retry,
    /// the time it was first due.
    ///
    /// A failing timer does not hold up the task's later timers: on a retry or a dead letter
    /// the call's writes and records are dropped (its effect marks are kept, as for an input:
    /// [`Context::into_effect_marks`]) and, in the same transaction, the timer is either set
    /// again on its own clock at (its clock's now) + `backoff(attempt)` with the same key and
    /// payload ([`Fired::Retrying`]), or removed for good ([`Fired::Dropped`]) when it asked
    /// for a dead letter or `retry.timer_max_attempts` allows no more (by default there is no
    /// limit). Its emitted records must pass `outputs`: a failed check is a failure of the
    /// call like any other (retried, effect marks kept). `Err` only for a fatal failure (the
    /// caller aborts).
    // The handler, the timer, its clock, its retry policy and the output check are all
    // distinct inputs of one firing; bundling them would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn fire<H: AsyncHandler, C: OutputCheck>(
        &mut self,
        handler: &mut H,
        timer: &Timer,
        now_ms: i64,
        env: Env<'_>,
        retry: &RetryPolicy,
        backoff: impl Fn(u32) -> Duration,
        outputs: &mut C,
    ) -> Result<Fired, Failure> {
        let slot = state::composite(
            context::TIMERS,
            &context::timer_time_key(timer.kind, timer.at_ms, &timer.key),
        );
        let by_key = state::composite(
            context::TIMER_KEYS,
            &context::timer_by_key(timer.kind, &timer.key),
        );
        let retried = self
            .state
            .get(&by_key)?
            .as_deref()
            .and_then(context::parse_timer_entry)
            .and_then(|(_, r)| r);
        let seen = Timer {
            attempt: retried.map_or(1, |r| r.attempt),
            at_ms: retried.map_or(timer.at_ms, |r| r.first_at_ms),
            ..timer.clone()
        };
        let mut ctx = Context::new(&self.state, self.partition, now_ms, self.stream_time, env);
        ctx.put_raw(slot.clone(), None);
        ctx.put_raw(by_key.clone(), None);
        let r = if seen.key.starts_with(crate::jobs::TIMER_PREFIX) {
            ctx.job_timer(&seen)
        } else {
            handler.on_timer(&mut ctx, &seen).await
        };
        let r = match r {
            Ok(()) => outputs.check(ctx.emits_mut()).await,
            Err(f) => Err(f),
        };
        let failure = match r {
            Ok(()) => {
                let (writes, emits, again) = ctx.into_parts()?;
                if again.is_some() {
                    return Err(Failure::fatal(
                        "a timer handler asked for call_again, which is for inputs only",
                    ));
                }
                self.state.merge(writes);
                return Ok(Fired::Done(emits));
            }
            Err(f) if f.action == Action::Fatal => return Err(f),
            Err(f) => f,
        };
        let mut writes = ctx.into_effect_marks()?;
        writes.insert(slot, None);
        if failure.action == Action::DeadLetter || !retry.retries_timer_after(seen.attempt) {
            writes.insert(by_key, None);
            self.state.merge(writes);
            return Ok(Fired::Dropped {
                attempts: seen.attempt,
                reason: failure.reason,
            });
        }
        let clock = match timer.kind {
            TimerKind::Wall => now_ms,
            TimerKind::Stream => self.stream_time,
        };
        let delay = i64::try_from(backoff(seen.attempt).as_millis()).unwrap_or(i64::MAX);
        // Later than now on its clock, so the same pass does not pick it again.
        let at_ms = clock.max(timer.at_ms).saturating_add(delay.max(1));
        let next = context::TimerRetry {
            attempt: seen.attempt.saturating_add(1),
            first_at_ms: seen.at_ms,
        };
        writes.insert(
            state::composite(
                context::TIMERS,
                &context::timer_time_key(timer.kind, at_ms, &timer.key),
            ),
            Some(timer.payload.clone()),
        );
        writes.insert(by_key, Some(context::timer_entry(at_ms, Some(next))));
        self.state.merge(writes);
        Ok(Fired::Retrying {
            attempt: next.attempt,
            at_ms,
            reason: failure.reason,
        })
    }

    /// A user store's committed-or-pending value (tests, tools).
    pub(crate) fn get(&self, store: &str, key: &[u8]) -> Result<Option<Bytes>, StateError> {
        self.state.get(&state::composite(store, key))
    }
}

/// What firing a timer came to ([`Task::fire`]).
#[derive(Debug)]
pub(crate) enum Fired {
    /// The handler ran; its writes joined the open transaction. Its emitted records.
    Done(Vec<Emit>),
    /// The handler failed; the timer is set again for attempt `attempt` at `at_ms` (on its
    /// own clock).
    Retrying {
        attempt: u32,
        at_ms: i64,
        reason: String,
    },
    /// The handler failed for the last time (it asked for a dead letter, or that was the
    /// retry policy's last attempt): the timer is removed.
    Dropped { attempts: u32, reason: String },
}

/// Stream time as committed (`state` has no open transaction's writes).
fn committed_stream_time(state: &TaskState) -> Result<i64, StateError> {
    Ok(state
        .get(&state::composite(context::META, context::STREAM_TIME))?
        .as_deref()
        .and_then(context::i64_value)
        .unwrap_or(i64::MIN))
}

/// The changelog record of one write: key as is, value (or a tombstone).
pub(crate) fn changelog_record(key: &[u8], value: &Option<Bytes>) -> ProducerRecord {
    ProducerRecord {
        key: Some(Bytes::copy_from_slice(key)),
        value: value.clone(),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::EffectStatus;
    use crate::handler::Handler;
    use crate::state::MemBackend;

    /// Refuses any output to one topic, as the runtime's check refuses a missing topic.
    struct Refuse(&'static str);

    impl OutputCheck for Refuse {
        async fn check(&mut self, emits: &mut [Emit]) -> Result<(), Failure> {
            match emits.iter().find(|e| e.topic == self.0) {
                Some(e) => Err(Failure::retry(format!(
                    "output topic {:?} refused",
                    e.topic
                ))),
                None => Ok(()),
            }
        }
    }

    /// Sends a mail (marks it done), then emits to `nope`; its timer emits to `nope` too.
    /// Records what it saw of the mark.
    #[derive(Default)]
    struct MailThenBadOutput {
        seen: Vec<EffectStatus>,
    }

    impl Handler for MailThenBadOutput {
        fn handle(&mut self, ctx: &mut Context<'_>, _: &Input) -> Result<(), Failure> {
            self.seen.push(ctx.effect("mail/1")?);
            ctx.effect_done("mail/1");
            ctx.set_timer(TimerKind::Wall, b"t", 10, Bytes::new())?;
            ctx.emit_to("nope", 0, ProducerRecord::new("x"));
            Ok(())
        }

        fn on_timer(&mut self, ctx: &mut Context<'_>, _: &Timer) -> Result<(), Failure> {
            ctx.emit_to("nope", 0, ProducerRecord::new("t"));
            Ok(())
        }
    }

    /// Offset 0 of partition 0 of `in`, first attempt, no key, value or headers.
    fn plain_input() -> Input {
        Input {
            topic: "in".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: 1,
            key: None,
            value: None,
            headers: Vec::new(),
            attempt: 1,
            lane: "in".into(),
        }
    }

    fn env() -> Env<'static> {
        Env {
            processor: "p",
            effects_enabled: true,
            effects_retention: EffectsRetention::default(),
        }
    }

    /// A failed output check fails the call as a handler failure does: its writes and records
    /// are dropped, its effect marks kept (so the retry does not repeat the mail).
    #[tokio::test]
    async fn a_failed_output_check_fails_the_call_and_keeps_its_effect_marks() {
        let mut task = Task::open(0, Box::new(MemBackend::default())).unwrap();
        let mut h = MailThenBadOutput::default();
        let input = plain_input();
        let mut check = Refuse("nope");
        for attempt in 1..=2 {
            let r = task
                .handle(
                    &mut h,
                    &Input {
                        attempt,
                        ..input.clone()
                    },
                    5,
                    env(),
                    None,
                    &mut check,
                )
                .await;
            let f = r.expect_err("the check refuses the output");
            assert_eq!(f.action, Action::Retry);
            assert!(f.reason.contains("nope"), "{}", f.reason);
        }
        assert_eq!(h.seen, [EffectStatus::Todo, EffectStatus::Done]);
        assert!(
            task.due_timers(TimerKind::Wall, i64::MAX, 10)
                .unwrap()
                .is_empty(),
            "the failed call's timer was dropped with its writes"
        );
    }

    /// A timer whose output fails the check goes down the timers' failure path (set again
    /// after its backoff), never a fatal error.
    #[tokio::test]
    async fn a_timer_whose_output_fails_the_check_is_retried_not_fatal() {
        let mut task = Task::open(0, Box::new(MemBackend::default())).unwrap();
        let mut h = MailThenBadOutput::default();
        let input = plain_input();
        // Set the timer with a call whose outputs all pass.
        task.handle(&mut h, &input, 5, env(), None, &mut Refuse("other"))
            .await
            .unwrap();
        let timer = task.due_timers(TimerKind::Wall, 10, 1).unwrap().remove(0);
        let policy = RetryPolicy::default();
        let fired = task
            .fire(
                &mut h,
                &timer,
                10,
                env(),
                &policy,
                |_| Duration::from_millis(100),
                &mut Refuse("nope"),
            )
            .await
            .expect("not fatal");
        match fired {
            Fired::Retrying {
                attempt,
                at_ms,
                reason,
            } => {
                assert_eq!((attempt, at_ms), (2, 110));
                assert!(reason.contains("nope"), "{reason}");
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn retry_headers_round_trip() {
        let input = Input {
            topic: "in".into(),
            partition: 2,
            offset: 40,
            timestamp_ms: 5,
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"v")),
            headers: vec![Header {
                key: "trace".into(),
                value: Some(Bytes::from_static(b"t")),
            }],
            attempt: 2,
            lane: "in".into(),
        };
        let history = vec![Attempt {
            attempt: 1,
            at_ms: 1,
            reason: "x".into(),
        }];
        let r = retry_record(&input, &history, 99);
        let info = parse_retry(&r.headers).unwrap();
        assert_eq!(
            info,
            RetryInfo {
                attempt: 3,
                due_ms: 99,
                topic: "in".into(),
                offset: 40,
                history
            }
        );
        assert_eq!(r.headers[0].key, "trace");
        assert_eq!(parse_retry(&input.headers), None);
        assert_eq!(retry_topic("in", "g", 2), "in.g.retry-2");
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let p = RetryPolicy {
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            ..RetryPolicy::default()
        };
        assert_eq!(p.base_backoff(1), Duration::from_millis(100));
        assert_eq!(p.base_backoff(3), Duration::from_millis(400));
        assert_eq!(p.base_backoff(40), Duration::from_millis(1000));
        assert!(p.retries_after(4) && !p.retries_after(5));
        let forever = RetryPolicy {
            max_attempts: 0,
            ..p
        };
        assert!(forever.retries_after(1_000_000));
    }
}
