//! The [`Context`] a handler works through: keyed state ([`Store`]), emitted records,
//! timers, idempotency keys of external effects, and the time.
//!
//! Everything a call does is buffered in the context and becomes part of the open
//! transaction only if the call returns `Ok`, with one exception: the idempotency keys it
//! marked done ([`Context::effect_done`]) are kept when it fails with a retry or a dead
//! letter (the effects happened; [`Context::into_effect_marks`]), so that the transaction
//! that retries or dead-letters the input records them.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use spool_client::ProducerRecord;

use crate::effects::{self, EFFECTS};
use crate::engine::Env;
use crate::envelope::{EnvelopeError, Event};
use crate::handler::{Failure, TimerKind};
use crate::state::{self, StateError, TaskState, Writes};

pub(crate) const TIMERS: &str = "__timers";
pub(crate) const TIMER_KEYS: &str = "__timerkeys";
pub(crate) const META: &str = "__meta";
pub(crate) const STREAM_TIME: &[u8] = b"stream_time";

/// A record a handler emitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emit {
    /// Destination topic.
    pub topic: String,
    /// Destination partition; `None`: by the key's murmur2 hash (partition 0 without a key).
    pub partition: Option<u32>,
    /// The record.
    pub record: ProducerRecord,
}

/// Whether an external effect still has to be carried out ([`Context::effect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EffectStatus {
    /// Not done yet: do it, then [`Context::effect_done`].
    Todo,
    /// Already done (recorded by a committed transaction): skip it.
    Done,
    /// Replay mode: external effects are disabled; skip it (do not mark it done).
    Disabled,
}

/// What a handler works through. See the [module docs](self).
pub struct Context<'a> {
    state: &'a TaskState,
    writes: Writes,
    emits: Vec<Emit>,
    partition: u32,
    now_ms: i64,
    stream_time_ms: i64,
    env: Env<'a>,
    /// Idempotency keys marked done by this call, in order.
    marked: Vec<String>,
    /// The cursor of the previous call for the same input ([`Context::call_again`]).
    resumed: Option<Bytes>,
    /// Set by [`Context::call_again`].
    again: Option<Bytes>,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("processor", &self.env.processor)
            .field("partition", &self.partition)
            .field("now_ms", &self.now_ms)
            .field("writes", &self.writes.len())
            .field("emits", &self.emits.len())
            .finish()
    }
}

/// Timer keys: by time `[kind][at, sign-flipped big-endian][key]`, by key `[kind][key]`.
pub(crate) fn timer_time_key(kind: TimerKind, at_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(kind.tag());
    k.extend_from_slice(&((at_ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(key);
    k
}

pub(crate) fn timer_by_key(kind: TimerKind, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(kind.tag());
    k.extend_from_slice(key);
    k
}

/// Decodes a by-time timer key into (kind, at, user key).
pub(crate) fn parse_timer_key(k: &[u8]) -> Option<(TimerKind, i64, &[u8])> {
    let kind = TimerKind::from_tag(*k.first()?)?;
    let at: [u8; 8] = k.get(1..9)?.try_into().ok()?;
    Some((kind, (u64::from_be_bytes(at) ^ (1 << 63)) as i64, &k[9..]))
}

pub(crate) fn i64_value(v: &[u8]) -> Option<i64> {
    Some(i64::from_be_bytes(v.try_into().ok()?))
}

/// A failing timer set again ([`crate::engine::Task::fire`]): the attempt it is due for next
/// (2 for the first retry) and when it was first due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimerRetry {
    pub(crate) attempt: u32,
    pub(crate) first_at_ms: i64,
}

/// The by-key entry of a timer: when it is due (i64 big-endian), followed for a failing timer
/// set again by its [`TimerRetry`] (attempt u32, first due i64, big-endian). A timer set by a
/// handler has the 8-byte form, as before retries existed.
pub(crate) fn timer_entry(at_ms: i64, retry: Option<TimerRetry>) -> Bytes {
    let mut v = Vec::with_capacity(20);
    v.extend_from_slice(&at_ms.to_be_bytes());
    if let Some(r) = retry {
        v.extend_from_slice(&r.attempt.to_be_bytes());
        v.extend_from_slice(&r.first_at_ms.to_be_bytes());
    }
    Bytes::from(v)
}

/// Decodes [`timer_entry`]: when it is due, and its retry if it is one.
pub(crate) fn parse_timer_entry(v: &[u8]) -> Option<(i64, Option<TimerRetry>)> {
    let at = i64_value(v.get(..8)?)?;
    let retry = match v.len() {
        8 => None,
        20 => Some(TimerRetry {
            attempt: u32::from_be_bytes(v[8..12].try_into().ok()?),
            first_at_ms: i64_value(&v[12..20])?,
        }),
        _ => return None,
    };
    Some((at, retry))
}

impl<'a> Context<'a> {
    pub(crate) fn new(
        state: &'a TaskState,
        partition: u32,
        now_ms: i64,
        stream_time_ms: i64,
        env: Env<'a>,
    ) -> Context<'a> {
        Context {
            state,
            writes: Writes::new(),
            emits: Vec::new(),
            partition,
            now_ms,
            stream_time_ms,
            env,
            marked: Vec::new(),
            resumed: None,
            again: None,
        }
    }

    /// What a call that failed (with a retry or a dead letter) leaves behind: only the
    /// idempotency keys it marked done, indexed and pruned as after a successful call. Its
    /// other writes, its emitted records and its [`Context::call_again`] cursor are dropped.
    /// The effects it marked did happen: without their marks, the retry (in place or from a
    /// retry topic) or a later redrive of the dead letter would repeat them.
    pub(crate) fn into_effect_marks(mut self) -> Result<Writes, StateError> {
        let marked = std::mem::take(&mut self.marked);
        self.writes.clear();
        self.emits.clear();
        self.again = None;
        if marked.is_empty() {
            return Ok(self.writes);
        }
        let now = Bytes::copy_from_slice(&self.now_ms.to_be_bytes());
        for key in &marked {
            self.put_raw(state::composite(EFFECTS, key.as_bytes()), Some(now.clone()));
        }
        let retention = self.env.effects_retention;
        effects::settle(&mut self, &marked, retention)?;
        Ok(self.writes)
    }

    /// Makes this call a continuation of an earlier one for the same input.
    pub(crate) fn resume(&mut self, cursor: Option<Bytes>) {
        self.resumed = cursor;
    }

    /// The call's writes, emitted records and [`Context::call_again`] cursor, after indexing
    /// and pruning the idempotency keys it marked ([`effects`]).
    pub(crate) fn into_parts(mut self) -> Result<(Writes, Vec<Emit>, Option<Bytes>), StateError> {
        let marked = std::mem::take(&mut self.marked);
        let retention = self.env.effects_retention;
        effects::settle(&mut self, &marked, retention)?;
        Ok((self.writes, self.emits, self.again))
    }

    /// Asks for another call with the same input once this one's records are sent, in the
    /// same transaction; that call sees this one's writes and gets `cursor` from
    /// [`Context::resumed`]. For work too large for one call (a fan-out to a million users):
    /// memory is bounded by what one call emits. The input counts as handled, and its offset
    /// moves, only after the last call (one that does not ask again). A call that fails after
    /// the first is fatal: the earlier calls' records are already in the open transaction, so
    /// the input can no longer be retried or dead-lettered on its own (the runtime aborts and
    /// stops; after the restart the input is handled from the start again). Inputs only: a
    /// timer handler that asks is a fatal failure.
    pub fn call_again(&mut self, cursor: impl Into<Bytes>) {
        self.again = Some(cursor.into());
    }

    /// The cursor the previous call for this input passed to [`Context::call_again`]; `None`
    /// in the first call.
    pub fn resumed(&self) -> Option<&[u8]> {
        self.resumed.as_deref()
    }

    /// The task (input partition number) this call runs for.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Wall-clock time of this call (ms since the epoch), as the runtime (or the test
    /// driver) passes it in: handlers never read a clock themselves.
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// The task's stream time: the largest input timestamp it has seen (ms).
    pub fn stream_time_ms(&self) -> i64 {
        self.stream_time_ms
    }

    /// The processor's name (e.g. for an event's `source`).
    pub fn processor(&self) -> &str {
        self.env.processor
    }

    /// True in replay mode (outputs go to prefixed topics; effects are disabled).
    pub fn is_replay(&self) -> bool {
        !self.env.effects_enabled
    }

    /// A named keyed store of this task. Names: 1..=64 bytes, not starting with `__`.
    pub fn store<'c>(&'c mut self, name: &'c str) -> Result<Store<'c, 'a>, StateError> {
        state::check_name(name)?;
        Ok(Store { ctx: self, name })
    }

    pub(crate) fn get_raw(&self, key: &[u8]) -> Result<Option<Bytes>, StateError> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.state.get(key),
        }
    }

    /// The value of a composite key before this call (the open transaction or committed).
    pub(crate) fn get_before_call(&self, key: &[u8]) -> Result<Option<Bytes>, StateError> {
        self.state.get(key)
    }

    /// Entries with `from <= key < to` as this call sees them, in key order, at most `limit`.
    pub(crate) fn range_raw(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StateError> {
        self.state.range(Some(&self.writes), from, to, limit)
    }

    pub(crate) fn put_raw(&mut self, key: Vec<u8>, value: Option<Bytes>) {
        self.writes.insert(key, value);
    }

    /// The records emitted so far (the runtime checks them, and routes keyed ones, before
    /// the call's writes are taken: [`crate::engine`]'s `OutputCheck`).
    pub(crate) fn emits_mut(&mut self) -> &mut [Emit] {
        &mut self.emits
    }

    /// Emits a record to `topic`, partitioned by its key (murmur2; partition 0 without a
    /// key). Part of the transaction.
    pub fn emit(&mut self, topic: impl Into<String>, record: ProducerRecord) {
        self.emits.push(Emit {
            topic: topic.into(),
            partition: None,
            record,
        });
    }

    /// Emits a record to one partition of `topic`.
    pub fn emit_to(&mut self, topic: impl Into<String>, partition: u32, record: ProducerRecord) {
        self.emits.push(Emit {
            topic: topic.into(),
            partition: Some(partition),
            record,
        });
    }

    /// Emits an event (CloudEvents binary mode) to `topic`, partitioned by its key.
    pub fn emit_event<T: Serialize>(
        &mut self,
        topic: impl Into<String>,
        event: &Event<T>,
    ) -> Result<(), EnvelopeError> {
        let r = event.to_record()?;
        self.emit(topic, r);
        Ok(())
    }

    /// Sets (or moves) the timer `key` on `kind`'s clock to fire at `at_ms` with `payload`.
    /// One timer per kind and key: setting it again replaces it. Persisted with the task's
    /// state, so it fires after a restart too.
    pub fn set_timer(
        &mut self,
        kind: TimerKind,
        key: &[u8],
        at_ms: i64,
        payload: impl Into<Bytes>,
    ) -> Result<(), StateError> {
        self.cancel_timer(kind, key)?;
        self.put_raw(
            state::composite(TIMERS, &timer_time_key(kind, at_ms, key)),
            Some(payload.into()),
        );
        self.put_raw(
            state::composite(TIMER_KEYS, &timer_by_key(kind, key)),
            Some(timer_entry(at_ms, None)),
        );
        Ok(())
    }

    /// Cancels the timer `key` (no effect if there is none). A failing timer waiting for its
    /// retry is cancelled too (and setting it again starts its attempts over).
    pub fn cancel_timer(&mut self, kind: TimerKind, key: &[u8]) -> Result<(), StateError> {
        let by_key = state::composite(TIMER_KEYS, &timer_by_key(kind, key));
        if let Some((at, _)) = self
            .get_raw(&by_key)?
            .as_deref()
            .and_then(parse_timer_entry)
        {
            self.put_raw(
                state::composite(TIMERS, &timer_time_key(kind, at, key)),
                None,
            );
            self.put_raw(by_key, None);
        }
        Ok(())
    }

    /// When the timer `key` is due, if set (for a failing timer set again: when its next
    /// attempt is due).
    pub fn timer(&self, kind: TimerKind, key: &[u8]) -> Result<Option<i64>, StateError> {
        let by_key = state::composite(TIMER_KEYS, &timer_by_key(kind, key));
        Ok(self
            .get_raw(&by_key)?
            .as_deref()
            .and_then(parse_timer_entry)
            .map(|(at, _)| at))
    }

    /// Whether the external effect with idempotency key `key` (derived from the input, e.g.
    /// a notification id) still has to be done. See [`EffectStatus`]. A key is kept for the
    /// processor's `[effects]` retention ([`effects`] says which repeat window that implies).
    pub fn effect(&self, key: &str) -> Result<EffectStatus, StateError> {
        if !self.env.effects_enabled {
            return Ok(EffectStatus::Disabled);
        }
        let k = state::composite(EFFECTS, key.as_bytes());
        Ok(match self.get_raw(&k)? {
            Some(_) => EffectStatus::Done,
            None => EffectStatus::Todo,
        })
    }

    /// Records that the effect `key` was carried out, in the same transaction as the input's
    /// offset. Kept even if the call then fails with a retry or a dead letter (the retry, or
    /// the dead letter's transaction, records it); lost only with the transaction (a crash
    /// before it commits, an abort, a fatal failure): see "External effects" in
    /// docs/processors.md. (No effect in replay mode.)
    pub fn effect_done(&mut self, key: &str) {
        if !self.env.effects_enabled {
            return;
        }
        let k = state::composite(EFFECTS, key.as_bytes());
        let now = self.now_ms;
        self.put_raw(k, Some(Bytes::copy_from_slice(&now.to_be_bytes())));
        self.marked.push(key.to_owned());
    }
}

/// One named store of a task, through a [`Context`].
pub struct Store<'c, 'a> {
    ctx: &'c mut Context<'a>,
    name: &'c str,
}

impl std::fmt::Debug for Store<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("name", &self.name).finish()
    }
}

impl Store<'_, '_> {
    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StateError> {
        self.ctx.get_raw(&state::composite(self.name, key))
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: &[u8], value: impl Into<Bytes>) {
        self.ctx
            .put_raw(state::composite(self.name, key), Some(value.into()));
    }

    /// Deletes `key`.
    pub fn delete(&mut self, key: &[u8]) {
        self.ctx.put_raw(state::composite(self.name, key), None);
    }

    /// The value of `key` decoded from JSON. A value that does not decode is a fatal
    /// failure (the store holds what this processor wrote).
    pub fn get_json<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, Failure> {
        match self.get(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| {
                Failure::fatal(format!(
                    "store {}: value of {:?} is not the expected JSON: {e}",
                    self.name,
                    String::from_utf8_lossy(key)
                ))
            }),
        }
    }

    /// Sets `key` to `value` as JSON.
    pub fn put_json<T: Serialize>(&mut self, key: &[u8], value: &T) -> Result<(), Failure> {
        let v = serde_json::to_vec(value)
            .map_err(|e| Failure::fatal(format!("store {}: cannot encode: {e}", self.name)))?;
        self.put(key, v);
        Ok(())
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order (keys without the
    /// store prefix).
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StateError> {
        self.scan_prefix_after(prefix, None, limit)
    }

    /// [`Store::scan_prefix`] from the first key after `after` (a key of this store, with
    /// the prefix): the next page of a scan that ended at `after`.
    pub fn scan_prefix_after(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StateError> {
        let start = state::composite(self.name, prefix);
        let to = state::prefix_end(&start);
        let from = match after {
            // The smallest key greater than `after`.
            Some(a) => {
                let mut k = state::composite(self.name, a);
                k.push(0);
                k.max(start)
            }
            None => start,
        };
        let skip = 1 + self.name.len();
        Ok(self
            .ctx
            .range_raw(&from, to.as_deref(), limit)?
            .into_iter()
            .map(|(k, v)| (k[skip..].to_vec(), v))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_keys_sort_by_time_and_round_trip() {
        let a = timer_time_key(TimerKind::Wall, -5, b"x");
        let b = timer_time_key(TimerKind::Wall, 3, b"a");
        let c = timer_time_key(TimerKind::Wall, 1_700_000_000_000, b"a");
        assert!(a < b && b < c);
        assert_eq!(
            parse_timer_key(&c),
            Some((TimerKind::Wall, 1_700_000_000_000, &b"a"[..]))
        );
        assert_eq!(parse_timer_key(&a), Some((TimerKind::Wall, -5, &b"x"[..])));
    }

    #[test]
    fn timer_entries_round_trip_with_and_without_a_retry() {
        assert_eq!(parse_timer_entry(&timer_entry(-7, None)), Some((-7, None)));
        let r = TimerRetry {
            attempt: 3,
            first_at_ms: 1_700_000_000_000,
        };
        assert_eq!(
            parse_timer_entry(&timer_entry(42, Some(r))),
            Some((42, Some(r)))
        );
        // The form written before retries existed.
        assert_eq!(parse_timer_entry(&5i64.to_be_bytes()), Some((5, None)));
        assert_eq!(parse_timer_entry(&[0; 9]), None);
    }
}
