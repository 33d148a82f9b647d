//! Flow control (seeds 001 and 003): priority lanes with a minimum share, throttles per lane
//! and per key, quiet hours in a time zone, and operator pauses.
//!
//! A *lane* is a set of input topics with a priority (0 is the highest), read over its own
//! Subscribe stream. The runtime decides which lanes it reads and in what order: every time it
//! asks the group consumer for a record it lists the lanes it may read, preferred first
//! ([`Lanes::order`]), and the consumer returns the first of those with a record ready
//! (`GroupConsumer::poll_streams`). A lane it does not list is simply not read: what its
//! stream already fetched stays buffered (one decoded broker message, plus the HTTP/2 window
//! and the broker's one-message queue), its partitions stay owned and nothing is fetched
//! again. A lane is not read while it is:
//! - **paused** by an operator (`spool processor pause NAME --lane L`, kept in the compacted
//!   control topic `<group>.control`, so it survives restarts);
//! - **quiet**: inside one of its quiet windows (`21:00`–`07:00` in `Europe/Athens`, computed
//!   with jiff on civil times, so the windows follow DST: a window spanning the spring-forward
//!   night is an hour shorter in absolute time, as a person would expect); it opens again by
//!   itself at the window's end;
//! - **throttled**: its rate limiter holds a record of it (the runtime keeps that record and
//!   reads nothing else of the lane until the limiter allows it).
//!
//! Among the lanes it may read, the order is: lanes below their `min_share` of the records
//! handled in the current one-second window (lanes at the top open priority excepted),
//! highest priority first; then by priority; lanes of one priority by fewest records in the
//! window (so they take turns). A lane with nothing ready does not hold the others back (the
//! consumer takes the next lane's ready record), so a lower lane gets its share whenever it
//! has records, the higher lanes get the rest, and a throttled lane is read at its rate.
//! Before, lanes were closed by pausing their partitions in the consumer, which dropped what
//! they had fetched (read again on resume), and the consumer always preferred the highest
//! lane, so a lower lane was read only while the lanes above it were paused: in `spool-demo`
//! that cut the alerts lane from ~140 to ~17 mails/s.
//!
//! **Single-partition holds.** Some waits concern one partition, not its lane: a restoring
//! partition, a retry not due yet, a record over its key's rate, a record waiting for its
//! tables. A Subscribe stream cannot leave one of its partitions out without being reopened,
//! which drops what it fetched for all of them (and fetches it again), twice per hold (pause
//! and resume). So the runtime does not pause such a partition: its lane's stream goes on, and
//! what it delivers for the held partition is *parked* ([`Parking`]), in order, until the
//! partition is free; then the parked records are handled first (as that lane's ready
//! records, in the lane order). Parking is bounded (`max_parked_bytes`); a partition that does
//! not fit is paused in the consumer instead, at its first record not parked, and resumed
//! once it is free and its parked records are done. `spool_processor_stream_resets_total`
//! counts the streams reopened.
//!
//! **Lower lanes yield to active higher lanes** ([`LaneYield`], `[flow] yield_window_ms`,
//! on by default). Ordering records is not enough on a small machine: a saturated lower lane
//! keeps the loop, the consumer's connection and the broker busy, and a higher lane's record
//! then waits for a CPU (the lanes bench: the high lane's p99 rose 2.8–4.3× with the low lane
//! saturated although the loop took every high-lane record first). So while a lane of
//! higher priority is *active* (it handled a record within the last `active_window`, default
//! 250 ms, and is not closed), a lower open lane *yields*: the loop time spent handling its
//! records is charged to it (by the runtime: from when a record was ready in the consumer
//! until it is processed, less an in-place token wait and a retry in place's commit and
//! backoff), and once it used its `min_share` (at least
//! [`MIN_YIELD_SHARE`]) of the current `period` (default 10 ms: 1 ms at a share of 0.1) it
//! is not read until the period ends. Not read means what the
//! module docs above say: its stream keeps what it fetched and the broker stops sending it
//! more once the flow-control window is full, so the broker's work for it stops too. The
//! loop is then free (idle, or handling the higher lanes). Time charged past the budget (a
//! slow record) is carried into the following periods, at most one period past the budget,
//! and every period that ended gives one budget (periods stay on a fixed grid from when the
//! lane began yielding), so over time a yielding lane gets its share of the loop and no
//! more, and one slow record cuts it off for at most about `period / budget` periods.
//! "Active" is one record within the window: a higher lane throttled to a few records a
//! second keeps the lanes below it at their share though the loop is mostly idle (a known
//! limit; see docs/processors.md). Invariants:
//! - a yielding lane is never starved: it gets `min_share` (at least [`MIN_YIELD_SHARE`],
//!   also with `min_share = 0`) of each period's loop time, and a lane below its
//!   `min_share` of the records of the one-second window is read whatever its budget (the
//!   record floor above still holds; `min_share = 0` has none);
//! - a closed (paused, quiet) lane does not yield;
//! - when the higher lanes go quiet (no record for `active_window`) or are closed, the lower
//!   lane is read at full speed again at its next period end at the latest;
//! - the top lanes, and every lane when the yield is off, are read as before.
//!
//! Throttles are GCRA limiters (governor): a lane's `rate_per_sec` (burst: a tenth of a
//! second's worth unless set) and optionally `key_rate_per_sec` per record key. A record over
//! the lane's rate whose token is due within [`INLINE_WAIT`] (every record at rates of
//! 200/s and more) waits for it in place; one that must wait longer is held and its lane not
//! read until then; one over its key's rate is held and its partition held back (the rest of
//! it parked). The limiters
//! read a [`ThrottleClock`]: the monotonic clock, or the test driver's clock.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::num::NonZeroU32;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::{Clock as _, QuantaClock, QuantaInstant, Reference as _};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use serde::{Deserialize, Serialize};

/// The longest wait for a lane token done in place (longer ones hold the record).
pub(crate) const INLINE_WAIT: Duration = Duration::from_millis(5);

/// The time source of the throttles.
#[derive(Clone, Debug)]
pub(crate) enum ThrottleClock {
    /// The monotonic clock (quanta), from when the lane was built.
    Real(QuantaClock, QuantaInstant),
    /// Set by hand (ns): the test driver's clock.
    Manual(Arc<AtomicU64>),
}

impl ThrottleClock {
    /// The monotonic clock.
    pub(crate) fn real() -> ThrottleClock {
        let c = QuantaClock::default();
        let origin = c.now();
        ThrottleClock::Real(c, origin)
    }

    /// A clock at `ms`, moved with [`ThrottleClock::set_ms`].
    pub(crate) fn manual(ms: i64) -> ThrottleClock {
        let c = ThrottleClock::Manual(Arc::new(AtomicU64::new(0)));
        c.set_ms(ms);
        c
    }

    /// Moves a manual clock (never backwards); no effect on the real one.
    pub(crate) fn set_ms(&self, ms: i64) {
        if let ThrottleClock::Manual(ns) = self {
            let v = u64::try_from(ms.max(0))
                .unwrap_or(0)
                .saturating_mul(1_000_000);
            ns.fetch_max(v, Ordering::Relaxed);
        }
    }
}

impl governor::clock::Clock for ThrottleClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match self {
            ThrottleClock::Real(c, origin) => c.now().duration_since(*origin),
            ThrottleClock::Manual(ns) => Nanos::from(ns.load(Ordering::Relaxed)),
        }
    }
}

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, ThrottleClock, NoOpMiddleware<Nanos>>;
type KeyedLimiter =
    RateLimiter<Vec<u8>, HashMapStateStore<Vec<u8>>, ThrottleClock, NoOpMiddleware<Nanos>>;

/// A record over a rate: how long until it may go, and whether its key's rate refused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Wait {
    /// Until the limiter allows it.
    pub(crate) after: Duration,
    /// Refused by the per-key limiter (else by the lane's).
    pub(crate) per_key: bool,
}

/// How lower lanes yield to active higher lanes (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaneYield {
    /// A lane is active while it handled a record within this long (default 250 ms): lower
    /// lanes yield meanwhile.
    pub active_window: Duration,
    /// The period over which a yielding lane's loop time is limited to its `min_share`
    /// (default 10 ms). Shorter: shorter bursts of the lower lane (less delay for a higher
    /// record arriving during one), more wake-ups.
    pub period: Duration,
}

impl Default for LaneYield {
    fn default() -> Self {
        LaneYield {
            active_window: Duration::from_millis(250),
            period: Duration::from_millis(10),
        }
    }
}

/// The smallest share of the loop a yielding lane gets, whatever its `min_share` (a lane
/// with `min_share = 0` too): 1 % of each period, so a lower lane is never starved while
/// the loop has time (with the defaults, 100 µs per 10 ms period).
pub const MIN_YIELD_SHARE: f64 = 0.01;

/// The loop time per `period` of a yielding lane with `share`: `share` (0..=1, at least
/// [`MIN_YIELD_SHARE`]) of `period`, to the nanosecond.
fn yield_budget(period: Duration, share: f64) -> Duration {
    let share = share.clamp(MIN_YIELD_SHARE, 1.0);
    Duration::from_nanos((period.as_nanos() as f64 * share).round() as u64)
}

/// One lane (TOML `[[lanes]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// Name (metrics label, CLI `--lane`).
    pub name: String,
    /// Its input topics (each input topic is in at most one lane; topics in none form a
    /// lane of their own named after the topic, priority 0).
    pub topics: Vec<String>,
    /// 0 is the highest.
    #[serde(default)]
    pub priority: u32,
    /// Share of the records this lane keeps while higher lanes have work (0.0..=1.0).
    #[serde(default = "default_share")]
    pub min_share: f64,
    /// Records per second at most (absent: no limit).
    #[serde(default)]
    pub rate_per_sec: Option<u32>,
    /// Burst of the rate limit (default: a tenth of a second's worth, at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Records per second per key at most (absent: no limit).
    #[serde(default)]
    pub key_rate_per_sec: Option<u32>,
    /// Windows when the lane is closed.
    #[serde(default)]
    pub quiet_hours: Vec<QuietHours>,
}

fn default_share() -> f64 {
    0.1
}

/// A daily window when a lane is closed, in a time zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// IANA time zone, e.g. `Europe/Athens`.
    pub time_zone: String,
    /// Start, `HH:MM` local time.
    pub start: String,
    /// End, `HH:MM` local time (before `start`: the window spans midnight).
    pub end: String,
}

impl QuietHours {
    fn parse(&self) -> Result<(jiff::tz::TimeZone, jiff::civil::Time, jiff::civil::Time), String> {
        let tz = jiff::tz::TimeZone::get(&self.time_zone)
            .map_err(|e| format!("quiet_hours: time zone {:?}: {e}", self.time_zone))?;
        let t = |s: &str| {
            s.parse::<jiff::civil::Time>()
                .map_err(|e| format!("quiet_hours: {s:?} is not HH:MM: {e}"))
        };
        Ok((tz, t(&self.start)?, t(&self.end)?))
    }

    /// Checks the window.
    pub fn validate(&self) -> Result<(), String> {
        let (_, s, e) = self.parse()?;
        if s == e {
            return Err("quiet_hours: start and end are equal".into());
        }
        Ok(())
    }

    /// If `now_ms` is inside the window: when it ends (ms since the epoch).
    pub fn quiet_until(&self, now_ms: i64) -> Option<i64> {
        let (tz, start, end) = self.parse().ok()?;
        let now = jiff::Timestamp::from_millisecond(now_ms)
            .ok()?
            .to_zoned(tz.clone());
        let at = |date: jiff::civil::Date, t: jiff::civil::Time| -> Option<i64> {
            date.to_datetime(t)
                .to_zoned(tz.clone())
                .ok()
                .map(|z| z.timestamp().as_millisecond())
        };
        let today = now.date();
        let start_today = at(today, start)?;
        let end_today = at(today, end)?;
        if start < end {
            (start_today <= now_ms && now_ms < end_today).then_some(end_today)
        } else if now_ms >= start_today {
            at(today.tomorrow().ok()?, end)
        } else if now_ms < end_today {
            Some(end_today)
        } else {
            None
        }
    }
}

impl LaneConfig {
    /// A lane named after its one topic, at `priority` with `min_share`, and no rate or
    /// quiet hours (set the other fields with struct update syntax).
    pub fn for_topic(topic: impl Into<String>, priority: u32, min_share: f64) -> LaneConfig {
        let topic = topic.into();
        LaneConfig {
            name: topic.clone(),
            topics: vec![topic],
            priority,
            min_share,
            rate_per_sec: None,
            burst: None,
            key_rate_per_sec: None,
            quiet_hours: Vec::new(),
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.topics.is_empty() {
            return Err("lanes: every lane needs a name and topics".into());
        }
        if !(0.0..=1.0).contains(&self.min_share) {
            return Err(format!(
                "lane {}: min_share must be within 0..=1",
                self.name
            ));
        }
        if self.rate_per_sec == Some(0) || self.key_rate_per_sec == Some(0) || self.burst == Some(0)
        {
            return Err(format!(
                "lane {}: rates and burst must be positive",
                self.name
            ));
        }
        for q in &self.quiet_hours {
            q.validate()?;
        }
        Ok(())
    }
}

/// Why a lane is not read right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// An operator paused it.
    Paused,
    /// Quiet hours until this time (ms).
    Quiet(i64),
}

/// A lane at run time.
pub(crate) struct Lane {
    pub(crate) cfg: LaneConfig,
    limiter: Option<DirectLimiter>,
    key_limiter: Option<KeyedLimiter>,
    /// Records processed in the current share window.
    pub(crate) window_count: u64,
    pub(crate) operator_paused: bool,
    pub(crate) closed: Option<Closed>,
    /// When it last handled a record (since the lanes' origin), if it has lower lanes.
    last_record: Option<Duration>,
    /// A higher lane is active: this one yields ([`Lanes::gate`]).
    pub(crate) yielding: bool,
    /// Loop time charged to it in the current period (past the budget: carried over).
    busy: Duration,
    /// Start of its current period (since the lanes' origin).
    period_start: Duration,
    /// Yielding and its period's budget spent: not read until the period ends (unless below
    /// its record share).
    gated: bool,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("name", &self.cfg.name)
            .field("closed", &self.closed)
            .finish()
    }
}

fn quota(rate: u32, burst: Option<u32>) -> Quota {
    let r = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let b = burst.unwrap_or((rate / 10).max(1));
    Quota::per_second(r).allow_burst(NonZeroU32::new(b).unwrap_or(NonZeroU32::MIN))
}

impl Lane {
    pub(crate) fn new(cfg: LaneConfig, clock: &ThrottleClock) -> Lane {
        Lane {
            limiter: cfg
                .rate_per_sec
                .map(|r| RateLimiter::direct_with_clock(quota(r, cfg.burst), clock.clone())),
            key_limiter: cfg
                .key_rate_per_sec
                .map(|r| RateLimiter::hashmap_with_clock(quota(r, None), clock.clone())),
            cfg,
            window_count: 0,
            operator_paused: false,
            closed: None,
            last_record: None,
            yielding: false,
            busy: Duration::ZERO,
            period_start: Duration::ZERO,
            gated: false,
        }
    }

    /// Takes a token for a record (and its key): `None` if allowed now, else how long to
    /// wait. A record refused by the key limiter takes no lane token.
    ///
    /// Each limiter's own clock tells the wait: building a clock calibrates it (cpuid and
    /// more), which took ~80% of the CPU when it was done per record.
    pub(crate) fn admit(&self, key: Option<&[u8]>) -> Option<Wait> {
        if let (Some(kl), Some(k)) = (&self.key_limiter, key)
            && let Err(not_until) = kl.check_key(&k.to_vec())
        {
            return Some(Wait {
                after: not_until.wait_time_from(kl.clock().now()),
                per_key: true,
            });
        }
        if let Some(l) = &self.limiter
            && let Err(not_until) = l.check()
        {
            return Some(Wait {
                after: not_until.wait_time_from(l.clock().now()),
                per_key: false,
            });
        }
        None
    }

    /// Forgets idle keys of the per-key limiter (bounded memory).
    pub(crate) fn prune(&self) {
        if let Some(kl) = &self.key_limiter {
            kl.retain_recent();
        }
    }
}

/// Records set aside for partitions the runtime holds back on its own (a restoring
/// partition; one holding a record until it is due, over its key's rate, or waiting for its
/// tables), in offset order per partition, so that their lane's stream keeps flowing for the
/// other partitions: a Subscribe stream cannot leave one partition out without being
/// reopened, which drops everything it had fetched for all of them (read again).
///
/// Bounded: at most `max_bytes` of records in all (a record counts its key, value, headers
/// and [`PARKED_OVERHEAD`]). A record that does not fit is refused and its partition marked
/// *overflowed*: the caller then stops reading that partition at that record (pauses it in
/// the consumer, which costs one stream reset, and once more on resume), so nothing is lost
/// and memory stays bounded however long the partition is held back. New records of a
/// partition that has parked records (or is overflowed) must be parked behind them, never
/// handled before them.
#[derive(Debug)]
pub(crate) struct Parking<K, R> {
    queues: BTreeMap<K, VecDeque<(R, usize)>>,
    overflowed: BTreeSet<K>,
    bytes: usize,
    records: usize,
    max_bytes: usize,
}

/// What a parked record counts beyond its key, value and headers (its struct, the queue
/// slot, the `Bytes` handles).
pub(crate) const PARKED_OVERHEAD: usize = 128;

impl<K: Ord + Clone, R> Parking<K, R> {
    /// Nothing parked; at most `max_bytes`.
    pub(crate) fn new(max_bytes: usize) -> Self {
        Parking {
            queues: BTreeMap::new(),
            overflowed: BTreeSet::new(),
            bytes: 0,
            records: 0,
            max_bytes,
        }
    }

    /// Sets `record` (`bytes` long) aside behind `key`'s other parked records. If it does not
    /// fit (or `key` is overflowed) it is given back and `key` is marked overflowed.
    pub(crate) fn park(&mut self, key: &K, record: R, bytes: usize) -> Result<(), R> {
        if self.overflowed.contains(key) || self.bytes.saturating_add(bytes) > self.max_bytes {
            self.overflowed.insert(key.clone());
            return Err(record);
        }
        self.bytes += bytes;
        self.records += 1;
        self.queues
            .entry(key.clone())
            .or_default()
            .push_back((record, bytes));
        Ok(())
    }

    /// Whether `key`'s new records must be parked (it has parked records or is overflowed).
    pub(crate) fn holds(&self, key: &K) -> bool {
        self.queues.contains_key(key) || self.overflowed.contains(key)
    }

    /// `key`'s first parked record.
    pub(crate) fn front(&self, key: &K) -> Option<&R> {
        self.queues.get(key).and_then(|q| q.front()).map(|(r, _)| r)
    }

    /// Takes `key`'s first parked record.
    pub(crate) fn pop(&mut self, key: &K) -> Option<R> {
        let q = self.queues.get_mut(key)?;
        let (r, bytes) = q.pop_front()?;
        if q.is_empty() {
            self.queues.remove(key);
        }
        self.bytes -= bytes;
        self.records -= 1;
        Some(r)
    }

    /// Drops `key`'s parked records (they are to be read again); it stays overflowed if it
    /// was (see [`Parking::end_overflow`]).
    pub(crate) fn drop_records(&mut self, key: &K) {
        if let Some(q) = self.queues.remove(key) {
            self.records -= q.len();
            self.bytes -= q.iter().map(|(_, b)| b).sum::<usize>();
        }
    }

    /// Drops every parked record (overflow marks stay).
    pub(crate) fn drop_all_records(&mut self) {
        self.queues.clear();
        self.bytes = 0;
        self.records = 0;
    }

    /// Forgets a key: its records and its overflow mark (a revoked partition).
    pub(crate) fn forget(&mut self, key: &K) {
        self.drop_records(key);
        self.overflowed.remove(key);
    }

    /// The keys with parked records.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.queues.keys()
    }

    /// The overflowed keys (read no more until [`Parking::end_overflow`]).
    pub(crate) fn overflowed(&self) -> &BTreeSet<K> {
        &self.overflowed
    }

    /// `key` may be read again (its parked records, if any, still come first).
    pub(crate) fn end_overflow(&mut self, key: &K) {
        self.overflowed.remove(key);
    }

    /// Whether no record is parked (partitions may still be overflowed).
    pub(crate) fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Records parked in all.
    pub(crate) fn len(&self) -> usize {
        self.records
    }

    /// Records parked for `key`.
    pub(crate) fn len_of(&self, key: &K) -> usize {
        self.queues.get(key).map_or(0, VecDeque::len)
    }

    /// Bytes parked in all (at most the bound).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The lanes of a processor and the topic → lane map.
#[derive(Debug)]
pub(crate) struct Lanes {
    pub(crate) lanes: Vec<Lane>,
    by_topic: HashMap<String, usize>,
    /// Lower lanes yield to active higher ones (`None`: off).
    yield_cfg: Option<LaneYield>,
    /// Per lane: some lane has a lower priority (its activity matters).
    has_lower: Vec<bool>,
}

impl Lanes {
    /// Lanes from config; input topics in no lane get a lane of their own (priority 0). The
    /// throttles read `clock`.
    pub(crate) fn new(configs: &[LaneConfig], inputs: &[String], clock: &ThrottleClock) -> Lanes {
        let mut lanes: Vec<Lane> = configs
            .iter()
            .cloned()
            .map(|c| Lane::new(c, clock))
            .collect();
        let mut by_topic = HashMap::new();
        for (i, l) in lanes.iter().enumerate() {
            for t in &l.cfg.topics {
                by_topic.insert(t.clone(), i);
            }
        }
        for t in inputs {
            if !by_topic.contains_key(t) {
                by_topic.insert(t.clone(), lanes.len());
                lanes.push(Lane::new(LaneConfig::for_topic(t, 0, 1.0), clock));
            }
        }
        let has_lower = lanes
            .iter()
            .map(|l| lanes.iter().any(|o| o.cfg.priority > l.cfg.priority))
            .collect();
        Lanes {
            lanes,
            by_topic,
            yield_cfg: None,
            has_lower,
        }
    }

    /// Sets how lower lanes yield to active higher ones (`None`: they do not).
    pub(crate) fn set_yield(&mut self, y: Option<LaneYield>) {
        self.yield_cfg = y.filter(|y| !y.active_window.is_zero() && !y.period.is_zero());
        if self.yield_cfg.is_none() {
            for l in &mut self.lanes {
                l.yielding = false;
                l.gated = false;
            }
        }
    }

    /// Whether lanes may yield at all (the yield is on and there are several priorities):
    /// else [`Lanes::gate`], [`Lanes::mark`] and [`Lanes::charge`] need not be called.
    pub(crate) fn yields(&self) -> bool {
        self.yield_cfg.is_some() && self.has_lower.iter().any(|&h| h)
    }

    /// Lane `l` handled a record at `now` (since the lanes' origin): lanes below it yield
    /// for the active window. A no-op for lanes with nothing below them.
    pub(crate) fn mark(&mut self, l: usize, now: Duration) {
        if self.has_lower[l] {
            self.lanes[l].last_record = Some(now);
        }
    }

    /// Charges `busy` of loop time (the handling of one of its records) to lane `l`
    /// (counted only while it yields). The debt is capped: at most one period past the
    /// budget is carried, so one slow record cuts the lane off for at most about
    /// `period / budget` periods.
    pub(crate) fn charge(&mut self, l: usize, busy: Duration) {
        let Some(y) = self.yield_cfg else { return };
        let lane = &mut self.lanes[l];
        if lane.yielding {
            let cap = y
                .period
                .saturating_add(yield_budget(y.period, lane.cfg.min_share));
            lane.busy = lane.busy.saturating_add(busy).min(cap);
        }
    }

    /// Whether lane `l` yields and spent its budget (is left out of the read order unless it
    /// is below its record share).
    pub(crate) fn gated(&self, l: usize) -> bool {
        self.lanes[l].gated
    }

    /// Decides at `now` (since the lanes' origin) which lanes yield (a higher open lane
    /// handled a record within the active window) and which of those spent their period's
    /// budget (`min_share` of the period) and are not read until it ends.
    pub(crate) fn gate(&mut self, now: Duration) {
        let Some(y) = self.yield_cfg else { return };
        let active = self
            .lanes
            .iter()
            .filter(|l| {
                l.closed.is_none()
                    && l.last_record
                        .is_some_and(|t| now.saturating_sub(t) < y.active_window)
            })
            .map(|l| l.cfg.priority)
            .min();
        for l in &mut self.lanes {
            // A closed lane is not read anyway: it does not yield (no wake-ups for it, and
            // the yielding gauge shows 0).
            if l.closed.is_some() || active.is_none_or(|a| a >= l.cfg.priority) {
                l.yielding = false;
                l.gated = false;
                continue;
            }
            if !l.yielding {
                l.yielding = true;
                l.busy = Duration::ZERO;
                l.period_start = now;
            }
            let budget = yield_budget(y.period, l.cfg.min_share);
            let elapsed = now.saturating_sub(l.period_start);
            if elapsed >= y.period {
                // Each period that ended gives one budget (spending past it is carried
                // over); the periods stay on their grid.
                let n = elapsed.as_nanos() / y.period.as_nanos();
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                l.busy = l.busy.saturating_sub(budget.saturating_mul(n));
                l.period_start += y.period.saturating_mul(n);
            }
            l.gated = l.busy >= budget;
        }
    }

    /// When the next gated lane's period ends (since the lanes' origin): the loop looks
    /// again then.
    pub(crate) fn next_ungate(&self) -> Option<Duration> {
        let period = self.yield_cfg?.period;
        self.lanes
            .iter()
            .filter(|l| l.gated)
            .map(|l| l.period_start + period)
            .min()
    }

    /// If lane `i` is gated and not below its record share (which would make it read
    /// anyway): when its period ends (since the lanes' origin).
    pub(crate) fn yield_until(&self, i: usize) -> Option<Duration> {
        let l = &self.lanes[i];
        (l.gated && !self.below_share(i, self.top()))
            .then(|| l.period_start + self.yield_cfg.map_or(Duration::ZERO, |y| y.period))
    }

    /// The top open priority.
    fn top(&self) -> Option<u32> {
        self.lanes
            .iter()
            .filter(|l| l.closed.is_none())
            .map(|l| l.cfg.priority)
            .min()
    }

    /// Whether lane `i` is below its `min_share` of the current window's records (lanes at
    /// the `top` open priority never are).
    fn below_share(&self, i: usize, top: Option<u32>) -> bool {
        let total: u64 = self.lanes.iter().map(|l| l.window_count).sum();
        let l = &self.lanes[i];
        Some(l.cfg.priority) != top
            && total > 0
            && (l.window_count as f64) < l.cfg.min_share * total as f64
    }

    /// The lane of a topic (retry topics map to their source's lane via `map_topic`).
    pub(crate) fn of(&self, topic: &str) -> Option<usize> {
        self.by_topic.get(topic).copied()
    }

    /// Adds a topic (a retry topic) to a lane.
    pub(crate) fn map_topic(&mut self, topic: &str, lane: usize) {
        self.by_topic.insert(topic.to_owned(), lane);
    }

    /// Decides which lanes are closed at `now_ms`: paused by an operator, or quiet.
    pub(crate) fn decide(&mut self, now_ms: i64) {
        for l in &mut self.lanes {
            l.closed = if l.operator_paused {
                Some(Closed::Paused)
            } else {
                l.cfg
                    .quiet_hours
                    .iter()
                    .filter_map(|q| q.quiet_until(now_ms))
                    .max()
                    .map(Closed::Quiet)
            };
        }
    }

    /// The open lanes in the order they are preferred (see the [module docs](self)): lanes
    /// below their `min_share` of the current window first (except those at the top open
    /// priority, which need no help), then by priority, then by fewest records this window.
    /// A lane that yields and spent its period's budget ([`Lanes::gate`]) is left out unless
    /// it is below its share.
    pub(crate) fn order(&self) -> Vec<usize> {
        let top = self.top();
        let mut open: Vec<(bool, u32, u64, usize)> = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(_, l)| l.closed.is_none())
            .filter_map(|(i, l)| {
                let below = self.below_share(i, top);
                if l.gated && !below {
                    return None;
                }
                Some((!below, l.cfg.priority, l.window_count, i))
            })
            .collect();
        open.sort_unstable();
        open.into_iter().map(|(_, _, _, i)| i).collect()
    }

    /// Starts a new share window.
    pub(crate) fn new_window(&mut self) {
        for l in &mut self.lanes {
            l.window_count = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn quiet_hours_span_midnight_and_follow_dst() {
        let q = QuietHours {
            time_zone: "Europe/Athens".into(),
            start: "21:00".into(),
            end: "07:00".into(),
        };
        // Winter (UTC+2): 21:00 local = 19:00Z.
        assert_eq!(q.quiet_until(ms("2024-01-10T18:59:00Z")), None);
        assert_eq!(
            q.quiet_until(ms("2024-01-10T19:00:00Z")),
            Some(ms("2024-01-11T05:00:00Z"))
        );
        assert_eq!(
            q.quiet_until(ms("2024-01-11T04:59:59Z")),
            Some(ms("2024-01-11T05:00:00Z"))
        );
        assert_eq!(q.quiet_until(ms("2024-01-11T05:00:00Z")), None);
        // Spring forward in Athens: 2024-03-31 03:00 → 04:00. The window from 21:00 on the
        // 30th (UTC+2) to 07:00 on the 31st (UTC+3) is 9 hours long.
        assert_eq!(
            q.quiet_until(ms("2024-03-30T19:00:00Z")),
            Some(ms("2024-03-31T04:00:00Z"))
        );
        assert_eq!(
            q.quiet_until(ms("2024-03-31T03:59:00Z")),
            Some(ms("2024-03-31T04:00:00Z"))
        );
        assert_eq!(q.quiet_until(ms("2024-03-31T04:00:00Z")), None);
        // The next evening starts at 21:00 UTC+3 = 18:00Z.
        assert_eq!(q.quiet_until(ms("2024-03-31T17:59:00Z")), None);
        assert!(q.quiet_until(ms("2024-03-31T18:00:00Z")).is_some());
        let day = QuietHours {
            time_zone: "UTC".into(),
            start: "12:00".into(),
            end: "13:00".into(),
        };
        assert_eq!(
            day.quiet_until(ms("2024-01-01T12:30:00Z")),
            Some(ms("2024-01-01T13:00:00Z"))
        );
        assert_eq!(day.quiet_until(ms("2024-01-01T13:30:00Z")), None);
        assert!(
            QuietHours {
                time_zone: "Mars/Base".into(),
                ..day.clone()
            }
            .validate()
            .is_err()
        );
    }

    fn lane(name: &str, priority: u32, min_share: f64) -> LaneConfig {
        LaneConfig::for_topic(name, priority, min_share)
    }

    #[test]
    fn a_lower_lane_below_its_share_is_read_first_and_paused_lanes_not_at_all() {
        let clock = ThrottleClock::manual(0);
        let mut l = Lanes::new(
            &[
                lane("alerts", 0, 1.0),
                lane("campaigns", 1, 0.2),
                lane("bulk", 2, 0.0),
            ],
            &[],
            &clock,
        );
        l.decide(0);
        assert_eq!(l.order(), vec![0, 1, 2], "an empty window: by priority");
        l.lanes[0].window_count = 90;
        l.lanes[1].window_count = 10;
        assert_eq!(l.order(), vec![1, 0, 2], "campaigns below 20%");
        l.lanes[1].window_count = 30;
        assert_eq!(l.order(), vec![0, 1, 2], "campaigns has its share");
        l.lanes[1].operator_paused = true;
        l.decide(0);
        assert_eq!(l.lanes[1].closed, Some(Closed::Paused));
        assert_eq!(l.order(), vec![0, 2], "a paused lane is not read");
        l.lanes[0].operator_paused = true;
        l.decide(0);
        assert_eq!(
            l.order(),
            vec![2],
            "bulk is the top open lane (its share does not matter)"
        );
        l.new_window();
        assert!(l.lanes.iter().all(|l| l.window_count == 0));
    }

    #[test]
    fn lanes_of_one_priority_take_turns_and_quiet_lanes_reopen() {
        let clock = ThrottleClock::manual(0);
        let mut night = lane("night", 0, 0.1);
        night.quiet_hours = vec![QuietHours {
            time_zone: "UTC".into(),
            start: "12:00".into(),
            end: "13:00".into(),
        }];
        let mut l = Lanes::new(&[night], &["a".into(), "b".into()], &clock);
        assert_eq!(l.of("a"), Some(1));
        l.lanes[1].window_count = 5;
        l.lanes[2].window_count = 4;
        l.decide(ms("2024-01-01T12:30:00Z"));
        assert_eq!(l.order(), vec![2, 1], "fewest records first");
        assert_eq!(
            l.lanes[0].closed,
            Some(Closed::Quiet(ms("2024-01-01T13:00:00Z")))
        );
        l.decide(ms("2024-01-01T13:00:00Z"));
        assert_eq!(l.order(), vec![0, 2, 1]);
    }

    #[test]
    fn a_lower_lane_yields_its_share_of_loop_time_while_a_higher_one_is_active() {
        let clock = ThrottleClock::manual(0);
        let mut l = Lanes::new(&[lane("hi", 0, 1.0), lane("lo", 1, 0.1)], &[], &clock);
        let ms = Duration::from_millis;
        l.gate(ms(0));
        assert!(!l.yields(), "off unless set");
        l.set_yield(Some(LaneYield::default()));
        assert!(l.yields());
        l.decide(0);
        l.lanes[1].window_count = 100;
        l.gate(ms(0));
        assert!(!l.lanes[1].yielding, "no higher lane active yet");
        l.charge(1, ms(50));
        l.gate(ms(1));
        assert_eq!(l.order(), vec![0, 1], "not yielding: no budget");
        l.mark(0, ms(1));
        l.lanes[0].window_count = 1;
        l.gate(ms(1));
        assert!(l.lanes[1].yielding && !l.lanes[1].gated);
        // The budget: 10% of the 10 ms period.
        l.charge(1, Duration::from_micros(900));
        l.gate(ms(2));
        assert_eq!(l.order(), vec![0, 1]);
        l.charge(1, Duration::from_micros(600));
        l.gate(ms(3));
        assert_eq!(l.yield_until(1), Some(ms(11)));
        assert_eq!(l.order(), vec![0], "budget spent: not read");
        assert_eq!(l.next_ungate(), Some(ms(11)));
        l.gate(ms(10));
        assert_eq!(l.order(), vec![0]);
        // The period ends: 1.5 ms charged, 1 ms budget, 0.5 ms carried over.
        l.gate(ms(11));
        assert!(!l.lanes[1].gated);
        l.charge(1, Duration::from_micros(500));
        l.gate(ms(12));
        assert!(l.lanes[1].gated, "the carried 0.5 ms counts");
        // Below its record share it is read whatever its budget (the floor).
        l.lanes[0].window_count = 10_000;
        assert_eq!(l.order(), vec![1, 0]);
        assert_eq!(l.yield_until(1), None);
        l.lanes[0].window_count = 1;
        // The higher lane goes quiet for the active window: full speed at once.
        l.gate(ms(1 + 250));
        assert!(!l.lanes[1].yielding && !l.lanes[1].gated);
        assert_eq!(l.order(), vec![0, 1]);
        assert_eq!(l.next_ungate(), None);
        // A closed higher lane does not make the lower one yield.
        l.mark(0, ms(300));
        l.lanes[0].operator_paused = true;
        l.decide(0);
        l.gate(ms(300));
        assert!(!l.lanes[1].yielding);
        // min_share 0: no record floor, but still MIN_YIELD_SHARE of each period (100 µs of
        // 10 ms), so it is never starved while the higher lane is active.
        let mut z = Lanes::new(&[lane("hi", 0, 1.0), lane("bulk", 1, 0.0)], &[], &clock);
        z.set_yield(Some(LaneYield::default()));
        z.decide(0);
        z.mark(0, ms(0));
        z.gate(ms(0));
        assert!(z.lanes[1].yielding);
        assert_eq!(z.order(), vec![0, 1], "its minimum budget is not spent");
        z.charge(1, Duration::from_micros(99));
        z.gate(ms(1));
        assert_eq!(z.order(), vec![0, 1]);
        z.charge(1, Duration::from_micros(1));
        z.gate(ms(2));
        assert_eq!(
            z.order(),
            vec![0],
            "100 µs spent: not read until the period ends"
        );
        assert_eq!(z.next_ungate(), Some(ms(10)));
        z.gate(ms(10));
        assert_eq!(z.order(), vec![0, 1], "a new period, a new budget");
        z.set_yield(None);
        assert_eq!(z.order(), vec![0, 1], "the yield off: read as before");
    }

    #[test]
    fn a_yielding_lanes_debt_is_capped_and_periods_stay_on_their_grid() {
        let clock = ThrottleClock::manual(0);
        let mut l = Lanes::new(&[lane("hi", 0, 1.0), lane("lo", 1, 0.1)], &[], &clock);
        l.set_yield(Some(LaneYield::default()));
        l.decide(0);
        let ms = Duration::from_millis;
        l.mark(0, ms(0));
        l.gate(ms(0));
        assert!(l.lanes[1].yielding && !l.lanes[1].gated);
        // A record that took 3 s (as a retry in place would, were its backoff charged): the
        // debt is capped at one period past the budget (11 ms), so the lane is cut off for
        // 11 periods, not 3 000.
        l.charge(1, Duration::from_secs(3));
        assert_eq!(l.lanes[1].busy, ms(11));
        let mut open_at = None;
        for t in (0..=400).step_by(10) {
            l.mark(0, ms(t));
            l.gate(ms(t));
            if !l.lanes[1].gated {
                open_at = Some(t);
                break;
            }
        }
        assert_eq!(open_at, Some(110), "cut off for 11 periods");
        // Periods that ended unseen each give a budget, and the next period starts on the
        // grid (not at the time the loop looked).
        l.charge(1, ms(5));
        l.mark(0, ms(115));
        l.gate(ms(115));
        assert!(l.lanes[1].gated);
        assert_eq!(l.next_ungate(), Some(ms(120)));
        l.mark(0, ms(137));
        l.gate(ms(137));
        // 110 → 130: two periods ended, two budgets (2 ms) off the 5 ms charged.
        assert_eq!(l.lanes[1].busy, ms(3));
        assert_eq!(l.lanes[1].period_start, ms(130));
        assert_eq!(l.next_ungate(), Some(ms(140)));
        l.mark(0, ms(171));
        l.gate(ms(171));
        assert_eq!(l.lanes[1].busy, ms(0), "three more budgets");
        assert_eq!(l.lanes[1].period_start, ms(170));
        assert!(!l.lanes[1].gated);
    }

    #[test]
    fn closed_lanes_do_not_yield_and_quiet_hours_end_the_yield() {
        let clock = ThrottleClock::manual(0);
        let day = |h: &str| ms(&format!("2024-01-01T{h}:00Z"));
        let mut hi = lane("hi", 0, 1.0);
        // The high lane is quiet 12:00–13:00 UTC.
        hi.quiet_hours = vec![QuietHours {
            time_zone: "UTC".into(),
            start: "12:00".into(),
            end: "13:00".into(),
        }];
        let mut lo = lane("lo", 1, 0.1);
        // The low lane is quiet 10:00–11:00 UTC.
        lo.quiet_hours = vec![QuietHours {
            time_zone: "UTC".into(),
            start: "10:00".into(),
            end: "11:00".into(),
        }];
        let mut l = Lanes::new(&[hi, lo], &[], &clock);
        l.set_yield(Some(LaneYield::default()));
        let d = Duration::from_millis;
        // 10:30: the low lane is quiet; an active high lane does not make it yield (no
        // wake-ups for it, the yielding gauge at 0).
        l.decide(day("10:30"));
        l.mark(0, d(0));
        l.gate(d(0));
        assert!(l.lanes[1].closed.is_some());
        assert!(!l.lanes[1].yielding && !l.lanes[1].gated);
        assert_eq!(l.next_ungate(), None);
        // 11:30: open again, and the high lane active: it yields.
        l.decide(day("11:30"));
        l.gate(d(1));
        assert!(l.lanes[1].yielding);
        l.charge(1, d(2));
        l.gate(d(2));
        assert!(l.lanes[1].gated);
        assert_eq!(l.order(), vec![0]);
        // 12:30: the high lane's quiet hours begin: the low lane is read at full speed at
        // once, though the high lane handled a record within the window.
        l.decide(day("12:30"));
        l.gate(d(3));
        assert!(!l.lanes[1].yielding && !l.lanes[1].gated);
        assert_eq!(l.order(), vec![1]);
        // An operator's pause of the low lane under an active high lane: not yielding.
        l.decide(day("13:30"));
        l.mark(0, d(4));
        l.lanes[1].operator_paused = true;
        l.decide(day("13:30"));
        l.gate(d(4));
        assert!(!l.lanes[1].yielding);
        assert_eq!(l.order(), vec![0]);
    }

    #[test]
    fn parking_keeps_each_partitions_order_and_refuses_past_its_bound() {
        let mut p: Parking<u32, u64> = Parking::new(300);
        assert!(p.park(&0, 10, 100).is_ok());
        assert!(p.park(&1, 20, 100).is_ok());
        assert!(p.park(&0, 11, 100).is_ok());
        assert_eq!((p.len(), p.bytes(), p.len_of(&0)), (3, 300, 2));
        assert_eq!(p.park(&1, 21, 1), Err(21), "past the bound: given back");
        assert!(p.overflowed().contains(&1) && p.holds(&1));
        assert_eq!(p.pop(&0), Some(10));
        assert_eq!(
            p.park(&1, 21, 50),
            Err(21),
            "an overflowed partition parks nothing more, even what would fit"
        );
        assert_eq!(p.park(&0, 12, 100), Ok(()), "another partition still fits");
        assert_eq!(p.front(&0), Some(&11));
        assert_eq!(p.pop(&0), Some(11));
        assert_eq!(p.pop(&0), Some(12));
        assert_eq!(p.pop(&0), None);
        assert!(!p.holds(&0), "drained: read directly again");
        assert_eq!(p.pop(&1), Some(20));
        assert!(p.holds(&1), "overflowed until the caller ends it");
        assert_eq!(p.keys().count(), 0);
        p.end_overflow(&1);
        assert!(!p.holds(&1) && p.is_empty());
        assert_eq!((p.len(), p.bytes()), (0, 0));
        p.park(&2, 1, 10).unwrap();
        p.park(&2, 2, 10).unwrap();
        assert!(p.park(&3, 3, 1000).is_err());
        p.drop_records(&2);
        assert_eq!((p.len(), p.bytes()), (0, 0));
        assert!(!p.holds(&2) && p.holds(&3));
        p.park(&4, 4, 10).unwrap();
        p.drop_all_records();
        assert!(p.holds(&3) && !p.holds(&4));
        p.forget(&3);
        assert!(p.is_empty());
        assert!(
            Parking::<u32, u8>::new(10).park(&0, 1, 11).is_err(),
            "a record larger than the bound is refused even with nothing parked"
        );
    }

    #[test]
    fn throttle_admits_at_the_rate() {
        let clock = ThrottleClock::manual(1_000);
        let l = Lane::new(
            LaneConfig {
                rate_per_sec: Some(100),
                burst: Some(10),
                key_rate_per_sec: Some(1),
                ..lane("c", 1, 0.1)
            },
            &clock,
        );
        assert_eq!(l.admit(Some(b"a")), None);
        assert!(
            l.admit(Some(b"a")).is_some_and(|w| w.per_key),
            "the key's rate is 1/s"
        );
        let admitted = (0..100)
            .filter(|i| l.admit(Some(format!("k{i}").as_bytes())).is_none())
            .count();
        assert_eq!(admitted, 9, "burst of 10 after one token: {admitted}");
        let w = l.admit(None).expect("the burst is spent");
        assert!(!w.per_key);
        assert_eq!(w.after, Duration::from_millis(10), "one token per 10 ms");
        clock.set_ms(1_010);
        assert_eq!(l.admit(None), None, "the manual clock moved to the token");
        assert!(l.admit(None).is_some());
        clock.set_ms(1_000);
        assert!(l.admit(None).is_some(), "the clock never goes back");
    }
}
