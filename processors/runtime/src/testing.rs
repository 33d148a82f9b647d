//! Running a processor without a broker, in the spirit of Kafka Streams'
//! `TopologyTestDriver`: feed records, move the wall clock, read what the handler emitted,
//! its state and its dead letters.
//!
//! ```
//! use spool_processor::testing::TestDriver;
//! use spool_processor::{Context, Failure, Handler, Input};
//! use spool_client::ProducerRecord;
//!
//! struct Count;
//! impl Handler for Count {
//!     fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
//!         let key = input.key.clone().unwrap_or_default();
//!         let mut store = ctx.store("counts")?;
//!         let n = store.get_json::<u64>(&key)?.unwrap_or(0) + 1;
//!         store.put_json(&key, &n)?;
//!         ctx.emit("counted", ProducerRecord::new(n.to_string()).key(key));
//!         Ok(())
//!     }
//! }
//!
//! let mut d = TestDriver::new("counter", Count);
//! d.pipe("clicks", "a", "x").pipe("clicks", "a", "y");
//! let out = d.read_output("counted");
//! assert_eq!(out.len(), 2);
//! assert_eq!(d.state_json::<u64>("counts", b"a"), Some(2));
//! ```
//!
//! What it does like the live runtime (it runs the same [`crate::engine`] code): each input is
//! one handler call whose writes, emitted records and timers are kept only if it returns
//! `Ok`; blocking retries with the same policy (the driver's clock moves by each backoff,
//! without jitter); dead letters with the same headers; stream-time timers fire after the
//! input that moves stream time past them, wall-clock timers when the clock is moved; every
//! piped input is its own committed transaction, and every commit appends the state changes to
//! a changelog from which [`TestDriver::restart`] rebuilds the state, as a restart of the
//! live runtime restores it.
//!
//! A timer whose handler fails is set again after the retry policy's backoff (without
//! jitter, on the timer's own clock) or dropped after its last attempt, as in the runtime
//! ([`TestDriver::timer_retries`], [`TestDriver::timers_dropped`]); a fatal failure panics.
//!
//! Retry topics are modelled too: a failed input under `mode = "topics"` is held (with its
//! due time) and handled again when the clock passes its due time.
//!
//! Lanes are modelled with the runtime's own flow control ([`crate::flow`]): with
//! [`TestDriver::with_lanes`], inputs of a lane's topics wait in their lane (in the order
//! piped) and [`TestDriver::advance_wall_clock`] hands them to the handler in the order the
//! live runtime's scheduler prefers (`Lanes::order`: a lower lane below its `min_share` of
//! the current one-second window first, then by priority), through the lane's throttles (the
//! same GCRA limiters, on the driver's clock) and not while the lane is quiet (its quiet
//! hours, on the driver's clock) or paused ([`TestDriver::pause_lane`]). Every input taken
//! from a lane moves the clock by [`TestDriver::with_record_time`] (1 ms by default), so
//! shares and rates are those of a handler taking that long. Lower lanes yield to an active
//! higher lane as in the runtime (the same `Lanes::gate`, its default
//! [`LaneYield`](crate::LaneYield) unless [`TestDriver::with_lane_yield`] says otherwise),
//! each input counting its record time as the loop time it took. A record over its key's rate
//! holds back just its partition until the key's token is due, as the runtime does: the
//! partition's later inputs wait behind it, in order, and the lane's other partitions go on.
//! The difference from the runtime: lanes are read without broker latency (a lane always has
//! its next input ready).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context as TaskCx, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use spool_client::{Header, ProducerRecord};

use crate::context::Emit;
use crate::effects::EffectsRetention;
use crate::engine::{self, Attempt, Env, Fired, RetryMode, RetryPolicy, Task};
use crate::envelope::{self, Event};
use crate::flow::{Closed, LaneConfig, LaneYield, Lanes, ThrottleClock};
use crate::handler::{Action, AsyncHandler, Input, TimerKind};
use crate::state::{self, MemBackend, Writes};

/// A record to feed.
#[derive(Clone, Debug, Default)]
pub struct TestRecord {
    /// Topic.
    pub topic: String,
    /// Partition; `None`: by key (murmur2 over the topic's partition count).
    pub partition: Option<u32>,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
    /// Timestamp (ms); `None`: the driver's wall clock.
    pub timestamp_ms: Option<i64>,
}

/// A record the handler emitted, as it would land.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputRecord {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
    /// Timestamp (ms).
    pub timestamp_ms: i64,
}

impl OutputRecord {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|h| h.key == name)
            .and_then(|h| h.value.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The value as text.
    pub fn value_str(&self) -> Option<&str> {
        self.value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The key as text.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Decodes the record as a CloudEvent.
    pub fn event<T: DeserializeOwned>(&self) -> Result<Event<T>, envelope::EnvelopeError> {
        envelope::decode(&self.headers, self.key.as_ref(), self.value.as_ref())
    }
}

/// One changelog record: composite key, value (`None`: a tombstone).
type ChangelogEntry = (Vec<u8>, Option<Bytes>);

#[derive(Debug)]
struct Held {
    input: Input,
    due_ms: i64,
    history: Vec<Attempt>,
}

/// The lanes of [`TestDriver::with_lanes`].
#[derive(Debug)]
struct LaneSim {
    lanes: Lanes,
    /// The throttles' clock (follows the driver's).
    clock: ThrottleClock,
    /// Inputs piped to each lane and not handled yet, in the order piped.
    queues: Vec<VecDeque<Input>>,
    /// A lane's throttle holds its first input until then (ms).
    held_until: Vec<Option<i64>>,
    /// A partition (topic, partition) held back by its key's rate until then (ms).
    part_held: BTreeMap<(Arc<str>, u32), i64>,
    /// When the current share window started (ms).
    window_start: i64,
    /// Per lane: the record time of its inputs, if not the driver's
    /// ([`TestDriver::with_lane_record_time`]).
    record_ms: Vec<Option<i64>>,
}

/// The driver's clock (ms since the epoch) as the lanes' time.
fn lanes_time(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl LaneSim {
    /// Starts a new share window every second (as the runtime does).
    fn roll_window(&mut self, now: i64) {
        if now >= self.window_start + 1000 {
            self.window_start += (now - self.window_start) / 1000 * 1000;
            self.lanes.new_window();
            for l in &self.lanes.lanes {
                l.prune();
            }
        }
    }

    /// When the first input of lane `i` whose partition is not held back may go, as far as
    /// partition holds say (`now` at the earliest); `None` if the lane has no input.
    fn first_free(&self, i: usize, now: i64) -> Option<i64> {
        let mut at: Option<i64> = None;
        for input in &self.queues[i] {
            let t = self
                .part_held
                .get(&(input.topic.clone(), input.partition))
                .map_or(now, |&u| u.max(now));
            at = Some(at.map_or(t, |a: i64| a.min(t)));
            if t == now {
                break;
            }
        }
        at
    }

    /// When the next input may be taken from a lane (`now` if one may go now), if any lane
    /// has inputs and is not paused.
    fn next_at(&mut self, now: i64) -> Option<i64> {
        self.roll_window(now);
        self.lanes.decide(now);
        self.lanes.gate(lanes_time(now));
        let mut at: Option<i64> = None;
        for (i, l) in self.lanes.lanes.iter().enumerate() {
            let Some(free) = self.first_free(i, now) else {
                continue;
            };
            // A lane yielding to an active higher one waits for its next period.
            let yielded = self
                .lanes
                .yield_until(i)
                .map_or(now, |t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX));
            let held = self.held_until[i]
                .unwrap_or(now)
                .max(now)
                .max(free)
                .max(yielded);
            let t = match l.closed {
                None => held,
                Some(Closed::Quiet(until)) => until.max(held),
                Some(Closed::Paused) => continue,
            };
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        at
    }

    /// Takes the next input at `now` as the runtime's scheduler would: the open lanes in
    /// their order, skipping those whose throttle holds a record, and in a lane the first
    /// input of a partition not held back by its key's rate. `None` if none may go now (the
    /// throttles then hold them until the token is due).
    /// Each input taken counts its lane's record time (`record_ms` unless the lane has its
    /// own) of loop time against its lane's yield budget; returned with the input.
    fn take(&mut self, now: i64, record_ms: i64) -> Option<(Input, i64)> {
        self.clock.set_ms(now);
        self.roll_window(now);
        self.lanes.decide(now);
        self.lanes.gate(lanes_time(now));
        self.part_held.retain(|_, until| *until > now);
        for l in self.lanes.order() {
            if self.held_until[l].is_some_and(|h| h > now) {
                continue;
            }
            self.held_until[l] = None;
            let mut i = 0;
            while let Some(input) = self.queues[l].get(i) {
                let tp = (input.topic.clone(), input.partition);
                if self.part_held.contains_key(&tp) {
                    // Behind its partition's held input.
                    i += 1;
                    continue;
                }
                let Some(wait) = self.lanes.lanes[l].admit(input.key.as_deref()) else {
                    self.lanes.lanes[l].window_count += 1;
                    let ms = self.record_ms[l].unwrap_or(record_ms);
                    self.lanes.mark(l, lanes_time(now));
                    self.lanes.charge(l, lanes_time(ms));
                    return self.queues[l].remove(i).map(|input| (input, ms));
                };
                let ms = wait.after.as_nanos().div_ceil(1_000_000);
                let until = now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX).max(1));
                if wait.per_key {
                    // Its partition waits; the lane's other partitions go on.
                    self.part_held.insert(tp, until);
                    i += 1;
                } else {
                    self.held_until[l] = Some(until);
                    break;
                }
            }
        }
        None
    }

    fn lane(&self, name: &str) -> usize {
        self.lanes
            .lanes
            .iter()
            .position(|l| l.cfg.name == name)
            .unwrap_or_else(|| panic!("no lane {name:?}"))
    }
}

/// Runs a handler without a broker. See the [module docs](self).
#[derive(Debug)]
pub struct TestDriver<H> {
    handler: H,
    name: String,
    group: String,
    retry: RetryPolicy,
    effects_enabled: bool,
    effects_retention: EffectsRetention,
    wall_ms: i64,
    partitions: BTreeMap<String, u32>,
    tasks: BTreeMap<u32, Task>,
    changelog: BTreeMap<u32, Vec<ChangelogEntry>>,
    outputs: BTreeMap<String, VecDeque<OutputRecord>>,
    next_offset: BTreeMap<(String, u32), u64>,
    held: Vec<Held>,
    commits: u64,
    calls: u64,
    timer_retries: u64,
    timers_dropped: u64,
    lanes: Option<LaneSim>,
    record_ms: i64,
}

/// Polls a future that must not wait (a synchronous [`crate::Handler`]'s).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut TaskCx::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!(
            "the handler awaited something: use TestDriver's *_async methods inside a tokio runtime"
        ),
    }
}

impl<H: AsyncHandler> TestDriver<H> {
    /// A driver for processor `name` (also its group) with `handler`. The wall clock starts
    /// at 2024-01-01T00:00:00Z; topics have one partition unless [`TestDriver::with_topic`]
    /// says otherwise.
    pub fn new(name: impl Into<String>, handler: H) -> TestDriver<H> {
        let name = name.into();
        TestDriver {
            handler,
            group: name.clone(),
            name,
            retry: RetryPolicy::default(),
            effects_enabled: true,
            effects_retention: EffectsRetention::default(),
            wall_ms: 1_704_067_200_000,
            partitions: BTreeMap::new(),
            tasks: BTreeMap::new(),
            changelog: BTreeMap::new(),
            outputs: BTreeMap::new(),
            next_offset: BTreeMap::new(),
            held: Vec::new(),
            commits: 0,
            calls: 0,
            timer_retries: 0,
            timers_dropped: 0,
            lanes: None,
            record_ms: 1,
        }
    }

    /// Reads the lanes' topics in lanes, with the runtime's priorities, shares, throttles and
    /// quiet hours (see the [module docs](self)): their inputs wait in their lane until
    /// [`TestDriver::advance_wall_clock`] hands them to the handler. Topics in no lane are
    /// handled when piped, as without lanes.
    pub fn with_lanes(mut self, lanes: Vec<LaneConfig>) -> Self {
        for l in &lanes {
            l.validate().expect("a valid lane");
        }
        let clock = ThrottleClock::manual(self.wall_ms);
        let n = lanes.len();
        let mut sim_lanes = Lanes::new(&lanes, &[], &clock);
        sim_lanes.set_yield(Some(LaneYield::default()));
        self.lanes = Some(LaneSim {
            lanes: sim_lanes,
            clock,
            queues: (0..n).map(|_| VecDeque::new()).collect(),
            held_until: vec![None; n],
            part_held: BTreeMap::new(),
            window_start: self.wall_ms,
            record_ms: vec![None; n],
        });
        self
    }

    /// How lower lanes yield to active higher ones, as the runtime's
    /// [`crate::RuntimeConfig::lane_yield`] (default: the runtime's default; `None`: off).
    /// Call after [`TestDriver::with_lanes`].
    pub fn with_lane_yield(mut self, y: Option<LaneYield>) -> Self {
        self.lanes
            .as_mut()
            .expect("with_lanes first")
            .lanes
            .set_yield(y);
        self
    }

    /// How far the clock moves for each input taken from a lane (default 1 ms, at least
    /// 1 ms): the handler's processing time, as far as shares and rates are concerned.
    pub fn with_record_time(mut self, d: Duration) -> Self {
        self.record_ms = (d.as_millis() as i64).max(1);
        self
    }

    /// How far the clock moves for each input taken from lane `lane` (at least 1 ms), if not
    /// [`TestDriver::with_record_time`]: a lane whose records take longer to handle. Call
    /// after [`TestDriver::with_lanes`].
    pub fn with_lane_record_time(mut self, lane: &str, d: Duration) -> Self {
        let sim = self.lanes.as_mut().expect("with_lanes");
        let i = sim.lane(lane);
        sim.record_ms[i] = Some((d.as_millis() as i64).max(1));
        self
    }

    /// Pauses a lane, as `spool processor pause NAME --lane L` does: its inputs wait.
    pub fn pause_lane(&mut self, lane: &str) -> &mut Self {
        let sim = self.lanes.as_mut().expect("with_lanes");
        let i = sim.lane(lane);
        sim.lanes.lanes[i].operator_paused = true;
        self
    }

    /// Resumes a paused lane.
    pub fn resume_lane(&mut self, lane: &str) -> &mut Self {
        let sim = self.lanes.as_mut().expect("with_lanes");
        let i = sim.lane(lane);
        sim.lanes.lanes[i].operator_paused = false;
        self
    }

    /// Inputs waiting in a lane.
    pub fn queued(&self, lane: &str) -> usize {
        let sim = self.lanes.as_ref().expect("with_lanes");
        sim.queues[sim.lane(lane)].len()
    }

    /// Declares a topic's partition count (inputs and outputs).
    pub fn with_topic(mut self, topic: impl Into<String>, partitions: u32) -> Self {
        self.partitions.insert(topic.into(), partitions.max(1));
        self
    }

    /// Sets the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the wall clock (ms since the epoch).
    pub fn with_wall_clock(mut self, ms: i64) -> Self {
        self.wall_ms = ms;
        self
    }

    /// Runs as in replay mode: [`crate::Context::effect`] says `Disabled`.
    pub fn with_effects_disabled(mut self) -> Self {
        self.effects_enabled = false;
        self
    }

    /// Sets how long idempotency keys of effects are kept.
    pub fn with_effects_retention(mut self, retention: EffectsRetention) -> Self {
        self.effects_retention = retention;
        self
    }

    /// The handler (to inspect what it recorded).
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The handler, mutably.
    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// The wall clock (ms).
    pub fn wall_clock_ms(&self) -> i64 {
        self.wall_ms
    }

    /// Transactions committed so far (one per input, plus one per clock move that fired
    /// something).
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Handler calls that returned `Ok` for inputs (more than the inputs when handlers use
    /// [`crate::Context::call_again`]).
    pub fn handler_calls(&self) -> u64 {
        self.calls
    }

    /// Timer handler calls that failed and set their timer again (the runtime's
    /// `spool_processor_timer_retries_total`).
    pub fn timer_retries(&self) -> u64 {
        self.timer_retries
    }

    /// Timers dropped after their handler's last failed attempt or a dead letter asked for
    /// (the runtime's `spool_processor_timers_dropped_total`).
    pub fn timers_dropped(&self) -> u64 {
        self.timers_dropped
    }

    fn partitions_of(&self, topic: &str) -> u32 {
        self.partitions.get(topic).copied().unwrap_or(1)
    }

    fn partition_for(&self, topic: &str, key: Option<&[u8]>) -> u32 {
        key.map_or(0, |k| {
            spool_client::partitioner::partition_for_key(k, self.partitions_of(topic))
        })
    }

    /// Feeds a keyed record (timestamp: the wall clock).
    pub fn pipe(
        &mut self,
        topic: &str,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> &mut Self {
        ready(self.pipe_async(topic, key, value));
        self
    }

    /// Feeds an event (CloudEvents binary mode).
    pub fn pipe_event<T: Serialize>(&mut self, topic: &str, event: &Event<T>) -> &mut Self {
        ready(self.pipe_event_async(topic, event));
        self
    }

    /// Feeds a record.
    pub fn pipe_record(&mut self, record: TestRecord) -> &mut Self {
        ready(self.pipe_record_async(record));
        self
    }

    /// Moves the wall clock forward, firing due wall-clock timers and retries, and handling
    /// the inputs waiting in lanes that may start before the new time, as the runtime would
    /// (the clock ends up to one record time past it when the last one started just before).
    pub fn advance_wall_clock(&mut self, by: Duration) -> &mut Self {
        ready(self.advance_wall_clock_async(by));
        self
    }

    /// [`TestDriver::pipe`] for handlers that await.
    pub async fn pipe_async(
        &mut self,
        topic: &str,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) {
        self.pipe_record_async(TestRecord {
            topic: topic.to_owned(),
            key: Some(key.into()),
            value: Some(value.into()),
            ..TestRecord::default()
        })
        .await
    }

    /// [`TestDriver::pipe_event`] for handlers that await.
    pub async fn pipe_event_async<T: Serialize>(&mut self, topic: &str, event: &Event<T>) {
        let r = event.to_record().expect("event encodes");
        self.pipe_record_async(TestRecord {
            topic: topic.to_owned(),
            partition: None,
            key: r.key,
            value: r.value,
            headers: r.headers,
            timestamp_ms: r.timestamp_ms,
        })
        .await
    }

    /// [`TestDriver::pipe_record`] for handlers that await.
    pub async fn pipe_record_async(&mut self, r: TestRecord) {
        let partition = r
            .partition
            .unwrap_or_else(|| self.partition_for(&r.topic, r.key.as_deref()));
        let offset = self
            .next_offset
            .entry((r.topic.clone(), partition))
            .or_insert(0);
        let input = Input {
            topic: Arc::from(r.topic.as_str()),
            partition,
            offset: *offset,
            timestamp_ms: r.timestamp_ms.unwrap_or(self.wall_ms),
            key: r.key,
            value: r.value,
            headers: r.headers,
            attempt: 1,
            lane: Arc::from(r.topic.as_str()),
        };
        *offset += 1;
        if let Some(sim) = &mut self.lanes
            && let Some(l) = sim.lanes.of(&r.topic)
        {
            let mut input = input;
            input.lane = Arc::from(sim.lanes.lanes[l].cfg.name.as_str());
            sim.queues[l].push_back(input);
            return;
        }
        self.process(input, Vec::new()).await;
        self.fire_stream_timers(partition).await;
    }

    /// [`TestDriver::advance_wall_clock`] for handlers that await.
    pub async fn advance_wall_clock_async(&mut self, by: Duration) {
        let target = self.wall_ms + by.as_millis() as i64;
        // Step through due retries and wall-clock timers in time order, with the clock at
        // each one's due time (as the live runtime's frequent ticks would see it).
        loop {
            let retry = self
                .held
                .iter()
                .enumerate()
                .filter(|(_, h)| h.due_ms <= target)
                .min_by_key(|(_, h)| h.due_ms)
                .map(|(i, h)| (h.due_ms, i));
            let timer = self
                .tasks
                .iter()
                .filter_map(|(p, t)| {
                    let due = t
                        .due_timers(TimerKind::Wall, target, 1)
                        .expect("memory store");
                    due.first().map(|d| (d.at_ms, *p))
                })
                .min();
            let now = self.wall_ms;
            let lane = self
                .lanes
                .as_mut()
                .and_then(|s| s.next_at(now))
                .filter(|&at| at < target);
            // Retries and timers due first, then lanes.
            let first_timed = match (retry, timer) {
                (Some((due, _)), Some((at, _))) => Some(due.min(at)),
                (Some((due, _)), None) => Some(due),
                (None, Some((at, _))) => Some(at),
                (None, None) => None,
            };
            match (retry, timer, lane) {
                (None, None, None) => break,
                (_, _, Some(at)) if first_timed.is_none_or(|t| at < t) => {
                    self.wall_ms = self.wall_ms.max(at);
                    let now = self.wall_ms;
                    let taken = self
                        .lanes
                        .as_mut()
                        .and_then(|s| s.take(now, self.record_ms));
                    if let Some((input, ms)) = taken {
                        let partition = input.partition;
                        self.process(input, Vec::new()).await;
                        self.fire_stream_timers(partition).await;
                        self.wall_ms += ms;
                    }
                }
                (Some((due, i)), t, _) if t.is_none_or(|(at, _)| due <= at) => {
                    let h = self.held.remove(i);
                    self.wall_ms = self.wall_ms.max(due);
                    let mut input = h.input;
                    input.attempt += 1;
                    self.process(input, h.history).await;
                }
                (_, Some((at, p)), _) => {
                    self.wall_ms = self.wall_ms.max(at);
                    let now = self.wall_ms;
                    self.fire_timers(p, TimerKind::Wall, now).await;
                }
                (Some(_), None, _) | (None, None, Some(_)) => unreachable!("matched above"),
            }
        }
        self.wall_ms = self.wall_ms.max(target);
        if let Some(sim) = &self.lanes {
            sim.clock.set_ms(self.wall_ms);
        }
    }

    fn task(&mut self, partition: u32) -> &mut Task {
        self.tasks.entry(partition).or_insert_with(|| {
            Task::open(partition, Box::new(MemBackend::default())).expect("memory store")
        })
    }

    /// One input through the retry policy, then a commit.
    async fn process(&mut self, mut input: Input, mut history: Vec<Attempt>) {
        let partition = input.partition;
        let mut resume = None;
        loop {
            let env = Env {
                processor: &self.name,
                effects_enabled: self.effects_enabled,
                effects_retention: self.effects_retention,
            };
            let now = self.wall_ms;
            let task = self.tasks.entry(input.partition).or_insert_with(|| {
                Task::open(input.partition, Box::new(MemBackend::default())).expect("memory store")
            });
            let resumed = resume.is_some();
            match task
                .handle(
                    &mut self.handler,
                    &input,
                    now,
                    env,
                    resume.take(),
                    &mut engine::Unchecked,
                )
                .await
            {
                Ok((emits, again)) => {
                    self.emit(emits, now);
                    self.calls += 1;
                    if again.is_some() {
                        resume = again;
                        continue;
                    }
                    break;
                }
                Err(f) if resumed => {
                    panic!("the handler failed after call_again (fatal): {}", f.reason)
                }
                Err(f) => {
                    history.push(Attempt {
                        attempt: input.attempt,
                        at_ms: now,
                        reason: f.reason.clone(),
                    });
                    match f.action {
                        Action::Fatal => panic!("the handler failed fatally: {}", f.reason),
                        Action::Retry if self.retry.retries_after(input.attempt) => {
                            if self.retry.mode == RetryMode::Topics {
                                let i = (input.attempt as usize - 1)
                                    .min(self.retry.topic_delays_ms.len().saturating_sub(1));
                                let delay = self.retry.topic_delays_ms.get(i).copied().unwrap_or(0);
                                self.held.push(Held {
                                    input,
                                    due_ms: now + delay as i64,
                                    history,
                                });
                                break;
                            }
                            self.wall_ms +=
                                self.retry.base_backoff(input.attempt).as_millis() as i64;
                            input.attempt += 1;
                        }
                        Action::Retry | Action::DeadLetter => {
                            let r = engine::dead_letter(&input, &self.group, &history, now);
                            let topic = engine::dlq_topic(&input.topic, &self.group);
                            self.emit(
                                vec![Emit {
                                    topic,
                                    partition: Some(input.partition),
                                    record: r,
                                }],
                                now,
                            );
                            break;
                        }
                    }
                }
            }
        }
        self.commit(partition);
    }

    fn emit(&mut self, emits: Vec<Emit>, now: i64) {
        for e in emits {
            let partition = e
                .partition
                .unwrap_or_else(|| self.partition_for(&e.topic, e.record.key.as_deref()));
            let out = OutputRecord {
                topic: e.topic.clone(),
                partition,
                key: e.record.key,
                value: e.record.value,
                headers: e.record.headers,
                timestamp_ms: e.record.timestamp_ms.unwrap_or(now),
            };
            self.outputs.entry(e.topic).or_default().push_back(out);
        }
    }

    /// Commits a task's open transaction: changelog, then the local store.
    fn commit(&mut self, partition: u32) {
        let task = self.task(partition);
        let writes: Writes = task.state.take();
        let log = self.changelog.entry(partition).or_default();
        for (k, v) in &writes {
            log.push((k.clone(), v.clone()));
        }
        let position = log.len() as u64;
        let task = self.task(partition);
        task.state.committed(writes, position);
        task.state.flush(true).expect("memory store");
        self.commits += 1;
    }

    async fn fire_stream_timers(&mut self, partition: u32) {
        let st = self.task(partition).stream_time;
        self.fire_timers(partition, TimerKind::Stream, st).await;
    }

    async fn fire_timers(&mut self, partition: u32, kind: TimerKind, upto: i64) {
        let env = Env {
            processor: &self.name,
            effects_enabled: self.effects_enabled,
            effects_retention: self.effects_retention,
        };
        let Some(task) = self.tasks.get_mut(&partition) else {
            return;
        };
        let now = self.wall_ms;
        let mut out = Vec::new();
        let mut fired = false;
        let retry = &self.retry;
        // Timers set by timers fire in the same pass while due (bounded). A failing one is
        // set again after the policy's backoff (without jitter) or dropped, as in the runtime.
        for _ in 0..100_000 {
            let due = task.due_timers(kind, upto, 1).expect("memory store");
            let Some(t) = due.into_iter().next() else {
                break;
            };
            let r = task
                .fire(
                    &mut self.handler,
                    &t,
                    now,
                    env,
                    retry,
                    |a| retry.base_backoff(a),
                    &mut engine::Unchecked,
                )
                .await;
            fired = true;
            match r {
                Ok(Fired::Done(emits)) => out.extend(emits),
                Ok(Fired::Retrying { .. }) => self.timer_retries += 1,
                Ok(Fired::Dropped { .. }) => self.timers_dropped += 1,
                Err(f) => panic!("timer {:?} failed fatally: {}", t.key, f.reason),
            }
        }
        if fired {
            self.emit(out, now);
            self.commit(partition);
        }
    }

    /// Reads (and removes) what was emitted to `topic`, in order.
    pub fn read_output(&mut self, topic: &str) -> Vec<OutputRecord> {
        self.outputs
            .get_mut(topic)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }

    /// Reads (and removes) what was emitted to `topic`, decoded as events.
    pub fn read_events<T: DeserializeOwned>(&mut self, topic: &str) -> Vec<Event<T>> {
        self.read_output(topic)
            .into_iter()
            .map(|r| r.event().expect("an event"))
            .collect()
    }

    /// Reads (and removes) the dead letters of `source` (its `<source>.<group>.dlq` topic).
    pub fn dead_letters(&mut self, source: &str) -> Vec<OutputRecord> {
        let t = engine::dlq_topic(source, &self.group);
        self.read_output(&t)
    }

    /// Topics something was emitted to and not read yet.
    pub fn pending_topics(&self) -> Vec<String> {
        self.outputs
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// A store's value of `key` in any task (tasks are partitions; keys are normally in one).
    pub fn state(&self, store: &str, key: &[u8]) -> Option<Bytes> {
        self.tasks
            .values()
            .find_map(|t| t.get(store, key).expect("memory store"))
    }

    /// A store's value decoded from JSON.
    pub fn state_json<T: DeserializeOwned>(&self, store: &str, key: &[u8]) -> Option<T> {
        self.state(store, key)
            .map(|v| serde_json::from_slice(&v).expect("the stored value is JSON of this type"))
    }

    /// Every entry of a store across tasks, in key order per task.
    pub fn store_entries(&self, store: &str) -> Vec<(Vec<u8>, Bytes)> {
        let from = state::composite(store, b"");
        let to = state::prefix_end(&from);
        let skip = 1 + store.len();
        let mut out = Vec::new();
        for t in self.tasks.values() {
            let entries = t
                .state
                .range(None, &from, to.as_deref(), usize::MAX)
                .expect("memory store");
            out.extend(entries.into_iter().map(|(k, v)| (k[skip..].to_vec(), v)));
        }
        out
    }

    /// When the timer `key` of a task is due, if set.
    pub fn timer(&self, partition: u32, kind: TimerKind, key: &[u8]) -> Option<i64> {
        let t = self.tasks.get(&partition)?;
        let k = state::composite(
            crate::context::TIMER_KEYS,
            &crate::context::timer_by_key(kind, key),
        );
        t.state
            .get(&k)
            .expect("memory store")
            .as_deref()
            .and_then(crate::context::parse_timer_entry)
            .map(|(at, _)| at)
    }

    /// Simulates a restart: drops every task and rebuilds its state from the changelog alone
    /// (as a live runtime does on a new machine), keeping outputs, offsets and held retries.
    pub fn restart(&mut self) {
        self.tasks.clear();
        for (p, log) in &self.changelog {
            let mut backend = MemBackend::default();
            let mut w = Writes::new();
            for (k, v) in log {
                w.insert(k.clone(), v.clone());
            }
            use crate::state::Backend;
            backend
                .apply(&w, log.len() as u64, true)
                .expect("memory store");
            self.tasks
                .insert(*p, Task::open(*p, Box::new(backend)).expect("memory store"));
        }
    }

    /// Records emitted to `topic` so far (read or not), for assertions on counts.
    pub fn output_len(&self, topic: &str) -> usize {
        self.outputs.get(topic).map_or(0, VecDeque::len)
    }

    /// A record for [`TestDriver::pipe_record`] with a value and key.
    pub fn record(topic: &str, key: &str, value: impl Into<Bytes>) -> TestRecord {
        TestRecord {
            topic: topic.to_owned(),
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            value: Some(value.into()),
            ..TestRecord::default()
        }
    }
}

/// Builds a [`ProducerRecord`] with a text key and value (tests).
pub fn text_record(key: &str, value: &str) -> ProducerRecord {
    ProducerRecord::new(value.to_owned()).key(key.to_owned())
}
