//! Idempotency keys of external effects ([`crate::Context::effect`]) and how long they are
//! kept.
//!
//! # Layout (a task's state, written in the processor's transactions)
//!
//! - `__effects` + key → when it was marked done (ms, i64 big-endian);
//! - `__effectsat` + `[at, sign-flipped big-endian][key]` → empty: the same keys by time,
//!   oldest first, so pruning never scans;
//! - `__meta` + `effects_count` → how many keys `__effects` holds (i64 big-endian).
//!
//! # Retention
//!
//! After a handler call that marked effects done returns `Ok`, or fails with a retry or a
//! dead letter (its marks are kept: [`crate::Context::effect_done`]), the runtime indexes the new
//! marks and then prunes, oldest first, at most [`PRUNE_PER_CALL`] keys that are older than
//! [`EffectsRetention::retention_ms`] or beyond [`EffectsRetention::max_per_task`], all in the
//! same transaction. Since each call adds at most as many keys as it prunes-up-to, a task
//! never holds more than `max_per_task` keys for long (a lowered limit converges by
//! [`PRUNE_PER_CALL`] per call). Pruning runs only when effects are marked: an idle task keeps
//! its keys, which only makes it more careful.
//!
//! **The repeat window this implies:** a key is recognised for at least `retention_ms` after
//! its latest mark, unless `max_per_task` newer keys of the same task push it out first, so
//! for a task marking `r` effects per second the window is `min(retention_ms,
//! max_per_task / r)`. An input processed again after that (a dead letter redriven later, a
//! group's offsets reset) repeats its effect.
//!
//! Keys marked before this index existed are recognised but neither counted nor pruned.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::context::{self, Context};
use crate::state::{self, StateError};

pub(crate) const EFFECTS: &str = "__effects";
const BY_TIME: &str = "__effectsat";
const COUNT: &[u8] = b"effects_count";
/// Most keys one handler call prunes.
pub const PRUNE_PER_CALL: usize = 16;

/// How long idempotency keys are kept (`[effects]` in a processor's configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EffectsRetention {
    /// Keep a key at least this long after its mark (ms; default 7 days).
    pub retention_ms: u64,
    /// Keep at most this many keys per task (input partition; default 1 000 000).
    pub max_per_task: u64,
}

impl Default for EffectsRetention {
    fn default() -> Self {
        EffectsRetention {
            retention_ms: 7 * 24 * 3600 * 1000,
            max_per_task: 1_000_000,
        }
    }
}

impl EffectsRetention {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.retention_ms < 1000 || self.max_per_task == 0 {
            return Err("effects: retention_ms >= 1000, max_per_task >= 1".into());
        }
        Ok(())
    }
}

fn by_time_key(at_ms: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&((at_ms as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(key);
    state::composite(BY_TIME, &k)
}

fn i64_bytes(v: i64) -> Bytes {
    Bytes::copy_from_slice(&v.to_be_bytes())
}

/// Indexes the keys `ctx` marked done in this call (`marked`, as given to
/// `effect_done`), then prunes. `retention` is the processor's setting.
pub(crate) fn settle(
    ctx: &mut Context<'_>,
    marked: &[String],
    retention: EffectsRetention,
) -> Result<(), StateError> {
    if marked.is_empty() {
        return Ok(());
    }
    let now = ctx.now_ms();
    let count_key = state::composite(context::META, COUNT);
    let mut count = ctx
        .get_raw(&count_key)?
        .as_deref()
        .and_then(context::i64_value)
        .unwrap_or(0);
    let mut seen = std::collections::BTreeSet::new();
    for key in marked.iter().filter(|k| seen.insert(k.as_str())) {
        // What the key held before this call (the call's own mark is `now`).
        match ctx.get_before_call(&state::composite(EFFECTS, key.as_bytes()))? {
            Some(old) => {
                if let Some(at) = context::i64_value(&old) {
                    ctx.put_raw(by_time_key(at, key.as_bytes()), None);
                }
            }
            None => count += 1,
        }
        ctx.put_raw(by_time_key(now, key.as_bytes()), Some(Bytes::new()));
    }
    let cutoff = now.saturating_sub(retention.retention_ms.min(i64::MAX as u64) as i64);
    let from = state::composite(BY_TIME, b"");
    let to = state::prefix_end(&from);
    let skip = from.len();
    for (k, _) in ctx.range_raw(&from, to.as_deref(), PRUNE_PER_CALL)? {
        let Some(at) = k.get(skip..skip + 8).and_then(context::i64_value) else {
            continue;
        };
        let at = ((at as u64) ^ (1 << 63)) as i64;
        if at > cutoff && count as u64 <= retention.max_per_task {
            break;
        }
        ctx.put_raw(k.clone(), None);
        ctx.put_raw(state::composite(EFFECTS, &k[skip + 8..]), None);
        count = (count - 1).max(0);
    }
    ctx.put_raw(count_key, Some(i64_bytes(count)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_time_keys_sort_by_time() {
        let a = by_time_key(-1, b"z");
        let b = by_time_key(5, b"a");
        let c = by_time_key(1_700_000_000_000, b"a");
        assert!(a < b && b < c);
    }

    #[test]
    fn retention_is_validated() {
        assert!(EffectsRetention::default().validate().is_ok());
        let zero = EffectsRetention {
            max_per_task: 0,
            ..EffectsRetention::default()
        };
        assert!(zero.validate().is_err());
    }
}
