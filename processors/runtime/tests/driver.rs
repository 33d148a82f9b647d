//! The runtime's behaviours through the test driver (no broker): state and changelog
//! restore, per-call atomicity, blocking retries with backoff, dead letters and their
//! headers, malformed events, wall-clock and stream-time timers, idempotency keys, and
//! flow control: lane shares, throttles and quiet hours on the driver's clock.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use spool_client::ProducerRecord;
use spool_processor::engine::headers;
use spool_processor::testing::{OutputRecord, TestDriver, TestRecord};
use spool_processor::{
    Context, EffectStatus, EffectsRetention, Event, Failure, Handler, Input, LaneConfig, LaneYield,
    QuietHours, RetryPolicy, Timer, TimerKind,
};

/// Counts per key, emits `value|n`; fails on demand: value "retry-N" fails its first N
/// attempts with Retry, "dead" dead-letters, "boom" writes state and then fails (which must
/// leave nothing behind).
#[derive(Default)]
struct Counter {
    attempts: std::collections::HashMap<String, u32>,
}

impl Handler for Counter {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let key = input.key.clone().unwrap_or_default();
        let value = String::from_utf8_lossy(input.value.as_deref().unwrap_or_default()).to_string();
        let mut store = ctx.store("counts")?;
        let n = store.get_json::<u64>(&key)?.unwrap_or(0) + 1;
        store.put_json(&key, &n)?;
        ctx.emit(
            "out",
            ProducerRecord::new(format!("{value}|{n}")).key(key.clone()),
        );
        let tries = self.attempts.entry(value.clone()).or_default();
        *tries += 1;
        if let Some(k) = value.strip_prefix("retry-") {
            let k: u32 = k.parse().unwrap();
            if *tries <= k {
                return Err(Failure::retry(format!("transient {tries}")));
            }
        }
        match value.as_str() {
            "dead" => Err(Failure::dead_letter("cannot process dead")),
            "boom" => Err(Failure::retry("always fails")),
            _ => Ok(()),
        }
    }
}

#[test]
fn state_outputs_and_restore_from_the_changelog() {
    let mut d = TestDriver::new("counter", Counter::default()).with_topic("in", 4);
    for i in 0..20 {
        d.pipe("in", format!("k{}", i % 3), format!("v{i}"));
    }
    let out = d.read_output("out");
    assert_eq!(out.len(), 20);
    assert_eq!(out[0].value_str(), Some("v0|1"));
    assert_eq!(out[3].value_str(), Some("v3|2"));
    // Records of one key land in one partition, in order.
    let k0: Vec<&str> = out
        .iter()
        .filter(|r| r.key_str() == Some("k0"))
        .map(|r| r.value_str().unwrap())
        .collect();
    assert_eq!(&k0[..3], &["v0|1", "v3|2", "v6|3"]);
    assert_eq!(d.state_json::<u64>("counts", b"k0"), Some(7));
    d.restart();
    assert_eq!(
        d.state_json::<u64>("counts", b"k0"),
        Some(7),
        "restored from the changelog"
    );
    d.pipe("in", "k0", "after");
    assert_eq!(d.read_output("out")[0].value_str(), Some("after|8"));
}

/// Emits one record per call and asks to be called again until it emitted the input's value
/// (a number) of records; each call sees the previous calls' writes; value "fail" fails in
/// its second call.
struct Chunked;

impl Handler for Chunked {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let value = String::from_utf8_lossy(input.value.as_deref().unwrap_or_default()).to_string();
        let i = ctx.resumed().map_or(0, |c| c[0]);
        let mut store = ctx.store("calls")?;
        let seen = store.get_json::<u8>(b"n")?.unwrap_or(0);
        assert_eq!(seen, i, "a call sees the earlier calls' writes");
        store.put_json(b"n", &(i + 1))?;
        ctx.emit("out", ProducerRecord::new(format!("{value}:{i}")));
        if value == "fail" && i == 1 {
            return Err(Failure::dead_letter("cannot"));
        }
        let n: u8 = value.parse().unwrap_or(2);
        if i + 1 < n {
            ctx.call_again(vec![i + 1]);
        }
        Ok(())
    }
}

#[test]
fn call_again_continues_the_input_in_its_transaction() {
    let mut d = TestDriver::new("chunked", Chunked);
    d.pipe("in", "k", "3");
    let out: Vec<String> = d
        .read_output("out")
        .iter()
        .map(|r| r.value_str().unwrap().to_owned())
        .collect();
    assert_eq!(out, ["3:0", "3:1", "3:2"]);
    assert_eq!(
        (d.handler_calls(), d.commits()),
        (3, 1),
        "three calls, one transaction"
    );
}

#[test]
#[should_panic(expected = "failed after call_again")]
fn a_failure_after_call_again_is_fatal() {
    let mut d = TestDriver::new("chunked", Chunked);
    d.pipe("in", "k", "fail");
}

#[test]
fn blocking_retries_back_off_and_keep_nothing_of_failed_attempts() {
    let policy = RetryPolicy {
        max_attempts: 5,
        initial_backoff_ms: 100,
        max_backoff_ms: 10_000,
        ..RetryPolicy::default()
    };
    let mut d = TestDriver::new("counter", Counter::default()).with_retry(policy);
    let t0 = d.wall_clock_ms();
    d.pipe("in", "a", "retry-3");
    // Failed attempts 1..3 each waited: 100 + 200 + 400 ms.
    assert_eq!(d.wall_clock_ms() - t0, 700);
    let out = d.read_output("out");
    assert_eq!(out.len(), 1, "only the successful attempt's output is kept");
    assert_eq!(out[0].value_str(), Some("retry-3|1"));
    assert_eq!(d.state_json::<u64>("counts", b"a"), Some(1));
    assert!(d.dead_letters("in").is_empty());
}

#[test]
fn dead_letters_carry_position_reason_and_history() {
    let policy = RetryPolicy {
        max_attempts: 3,
        initial_backoff_ms: 10,
        ..RetryPolicy::default()
    };
    let mut d = TestDriver::new("counter", Counter::default()).with_retry(policy);
    d.pipe("in", "a", "ok");
    d.pipe_record(TestRecord {
        headers: vec![spool_client::Header {
            key: "trace".into(),
            value: Some("t-1".into()),
        }],
        ..TestDriver::<Counter>::record("in", "a", "boom")
    });
    d.pipe("in", "a", "dead");
    let dl = d.dead_letters("in");
    assert_eq!(dl.len(), 2);
    let boom = &dl[0];
    assert_eq!(boom.topic, "in.counter.dlq");
    assert_eq!(boom.value_str(), Some("boom"));
    assert_eq!(boom.header("trace"), Some("t-1"), "original headers kept");
    assert_eq!(boom.header(headers::DLQ_TOPIC), Some("in"));
    assert_eq!(boom.header(headers::DLQ_PARTITION), Some("0"));
    assert_eq!(boom.header(headers::DLQ_OFFSET), Some("1"));
    assert_eq!(boom.header(headers::DLQ_ATTEMPTS), Some("3"));
    assert_eq!(boom.header(headers::DLQ_ERROR), Some("always fails"));
    assert_eq!(boom.header(headers::DLQ_GROUP), Some("counter"));
    let history: Vec<serde_json::Value> =
        serde_json::from_str(boom.header(headers::DLQ_HISTORY).unwrap()).unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(history[2]["attempt"], 3);
    let dead = &dl[1];
    assert_eq!(
        dead.header(headers::DLQ_ATTEMPTS),
        Some("1"),
        "dead-letter: no retries"
    );
    assert_eq!(dead.header(headers::DLQ_OFFSET), Some("2"));
    // Neither failed input changed the state or emitted anything.
    assert_eq!(d.state_json::<u64>("counts", b"a"), Some(1));
    assert_eq!(d.read_output("out").len(), 1);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Price {
    sku: String,
    cents: u64,
}

/// Decodes CloudEvents; a malformed one must be dead-lettered by `?`.
struct Prices;

impl Handler for Prices {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let ev: Event<Price> = input.event()?;
        let mut last = ctx.store("last")?;
        last.put_json(ev.data.sku.as_bytes(), &ev.data.cents)?;
        let out = Event::new(
            "seen.v1",
            "/test",
            format!("seen-{}", ev.id),
            ev.data.clone(),
        )
        .subject(ev.data.sku.clone());
        ctx.emit_event("seen", &out)?;
        Ok(())
    }
}

#[test]
fn malformed_events_go_to_the_dead_letter_topic_with_the_reason() {
    let mut d = TestDriver::new("prices", Prices);
    let ev = Event::new(
        "price.v1",
        "/feed",
        "e1",
        Price {
            sku: "s1".into(),
            cents: 100,
        },
    )
    .subject("s1");
    d.pipe_event("prices", &ev);
    d.pipe("prices", "s2", "not an event");
    let mut bad = ev.clone().to_record().unwrap();
    bad.value = Some("{\"sku\": 5}".into());
    d.pipe_record(TestRecord {
        topic: "prices".into(),
        key: bad.key,
        value: bad.value,
        headers: bad.headers,
        ..TestRecord::default()
    });
    let seen: Vec<Event<Price>> = d.read_events("seen");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id, "seen-e1");
    assert_eq!(seen[0].subject.as_deref(), Some("s1"));
    let dl = d.dead_letters("prices");
    assert_eq!(dl.len(), 2);
    assert!(
        dl[0]
            .header(headers::DLQ_ERROR)
            .unwrap()
            .contains("ce_specversion is missing"),
        "{:?}",
        dl[0].header(headers::DLQ_ERROR)
    );
    assert!(
        dl[1]
            .header(headers::DLQ_ERROR)
            .unwrap()
            .contains("payload of event e1"),
        "{:?}",
        dl[1].header(headers::DLQ_ERROR)
    );
    assert_eq!(d.state_json::<u64>("last", b"s1"), Some(100));
}

/// Sets a wall timer per key ("deadline") and a stream timer; on_timer emits what fired.
struct Timers;

impl Handler for Timers {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let key = input.key.clone().unwrap_or_default();
        match input.value.as_deref() {
            Some(b"cancel") => ctx.cancel_timer(TimerKind::Wall, &key)?,
            _ => {
                let at = ctx.now_ms() + 60_000;
                ctx.set_timer(TimerKind::Wall, &key, at, "wall")?;
                let st = input.timestamp_ms + 10_000;
                ctx.set_timer(TimerKind::Stream, &key, st, "stream")?;
            }
        }
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, t: &Timer) -> Result<(), Failure> {
        let what = format!(
            "{}:{}",
            String::from_utf8_lossy(&t.payload),
            String::from_utf8_lossy(&t.key)
        );
        ctx.emit("fired", ProducerRecord::new(what).key(t.key.clone()));
        Ok(())
    }
}

#[test]
fn wall_and_stream_timers_fire_persist_and_can_be_moved_or_cancelled() {
    let mut d = TestDriver::new("timers", Timers);
    let t0 = d.wall_clock_ms();
    d.pipe_record(TestRecord {
        timestamp_ms: Some(t0),
        ..TestDriver::<Timers>::record("in", "a", "x")
    });
    d.advance_wall_clock(Duration::from_secs(30));
    // Setting again moves the timer (one per kind and key).
    d.pipe_record(TestRecord {
        timestamp_ms: Some(t0 + 1_000),
        ..TestDriver::<Timers>::record("in", "a", "x")
    });
    d.pipe_record(TestRecord {
        timestamp_ms: Some(t0 + 2_000),
        ..TestDriver::<Timers>::record("in", "b", "x")
    });
    d.pipe_record(TestRecord {
        timestamp_ms: Some(t0 + 3_000),
        ..TestDriver::<Timers>::record("in", "b", "cancel")
    });
    assert!(d.read_output("fired").is_empty());
    assert_eq!(
        d.timer(0, TimerKind::Wall, b"a"),
        Some(t0 + 30_000 + 60_000)
    );
    assert_eq!(d.timer(0, TimerKind::Wall, b"b"), None, "cancelled");
    // Stream time moves only with input: a record 11 s later fires a's stream timer.
    d.pipe_record(TestRecord {
        timestamp_ms: Some(t0 + 11_500),
        ..TestDriver::<Timers>::record("in", "c", "cancel")
    });
    let fired: Vec<String> = d
        .read_output("fired")
        .iter()
        .map(|r| r.value_str().unwrap().to_owned())
        .collect();
    assert_eq!(fired, vec!["stream:a"]);
    // Timers survive a restart (they are state).
    d.restart();
    d.advance_wall_clock(Duration::from_secs(59));
    assert!(d.read_output("fired").is_empty());
    d.advance_wall_clock(Duration::from_secs(1));
    let fired: Vec<String> = d
        .read_output("fired")
        .iter()
        .map(|r| r.value_str().unwrap().to_owned())
        .collect();
    assert_eq!(fired, vec!["wall:a"]);
    assert_eq!(
        d.timer(0, TimerKind::Wall, b"a"),
        None,
        "a fired timer is gone"
    );
}

/// An "external effect" (recorded in the handler) guarded by an idempotency key.
#[derive(Default)]
struct Mailer {
    sent: Vec<String>,
}

impl Handler for Mailer {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let id = input.key_str().unwrap_or_default().to_owned();
        match ctx.effect(&id)? {
            EffectStatus::Todo => {
                self.sent.push(id.clone());
                ctx.effect_done(&id);
            }
            EffectStatus::Done | EffectStatus::Disabled => {}
        }
        Ok(())
    }
}

#[test]
fn effects_are_done_once_per_idempotency_key_and_disabled_in_replay() {
    let mut d = TestDriver::new("mailer", Mailer::default());
    d.pipe("in", "n1", "x")
        .pipe("in", "n2", "x")
        .pipe("in", "n1", "redelivered");
    d.restart();
    d.pipe("in", "n2", "after restart");
    assert_eq!(d.handler().sent, vec!["n1", "n2"]);
    let mut r = TestDriver::new("mailer", Mailer::default()).with_effects_disabled();
    r.pipe("in", "n1", "x");
    assert!(r.handler().sent.is_empty());
}

#[test]
fn idempotency_keys_are_kept_for_the_retention_then_pruned() {
    let retention = EffectsRetention {
        retention_ms: 60_000,
        max_per_task: 1_000,
    };
    let mut d = TestDriver::new("mailer", Mailer::default()).with_effects_retention(retention);
    d.pipe("in", "n1", "x");
    d.advance_wall_clock(Duration::from_secs(59));
    // Within the window: recognised, even when the mark is refreshed by a new one.
    d.pipe("in", "n1", "redelivered");
    assert_eq!(d.handler().sent, vec!["n1"]);
    d.advance_wall_clock(Duration::from_secs(2));
    // n1 is 61 s old; the next mark prunes it (in its transaction, so a restart agrees).
    d.pipe("in", "n2", "x");
    assert_eq!(effect_keys(&d), vec!["n2"]);
    d.restart();
    assert_eq!(effect_keys(&d), vec!["n2"]);
    d.pipe("in", "n1", "again, past the window");
    d.pipe("in", "n2", "redelivered");
    assert_eq!(d.handler().sent, vec!["n1", "n2", "n1"]);
}

#[test]
fn idempotency_keys_are_bounded_per_task_oldest_first() {
    let retention = EffectsRetention {
        retention_ms: 3_600_000,
        max_per_task: 3,
    };
    let mut d = TestDriver::new("mailer", Mailer::default()).with_effects_retention(retention);
    for id in ["a", "b", "c", "d", "e"] {
        d.pipe("in", id, "x");
        d.advance_wall_clock(Duration::from_secs(1));
    }
    assert_eq!(effect_keys(&d), vec!["c", "d", "e"]);
    d.restart();
    assert_eq!(effect_keys(&d), vec!["c", "d", "e"]);
    // The evicted ones are done again; the kept ones are not.
    d.pipe("in", "e", "x").pipe("in", "a", "x");
    assert_eq!(d.handler().sent, vec!["a", "b", "c", "d", "e", "a"]);
    assert_eq!(effect_keys(&d), vec!["a", "d", "e"]);
}

fn effect_keys(d: &TestDriver<Mailer>) -> Vec<String> {
    d.store_entries("__effects")
        .into_iter()
        .map(|(k, _)| String::from_utf8(k).unwrap())
        .collect()
}

/// A feed import: "start" begins job J with parts m0..m2, other records mark a merchant done.
struct Imports;

impl Handler for Imports {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let what = input.key_str().unwrap_or_default().to_owned();
        let job = String::from_utf8_lossy(input.value.as_deref().unwrap_or_default()).to_string();
        let mut jobs = ctx.jobs("imports")?;
        if what == "start" {
            jobs.begin(&job, &["m0", "m1", "m2"], "import-status", 60_000)?;
        } else {
            jobs.part_done(&job, &what)?;
        }
        Ok(())
    }
}

#[test]
fn completion_counter_completes_once_and_reports_stuck_parts() {
    use spool_processor::{JobEvent, JobState};
    let mut d = TestDriver::new("importer", Imports);
    // A part marked before the job began still counts.
    d.pipe("in", "m1", "j1").pipe("in", "start", "j1");
    d.pipe("in", "m1", "j1"); // a retried part counts once
    d.advance_wall_clock(Duration::from_secs(30));
    d.pipe("in", "m0", "j1");
    // No part for a slot (60 s after the last one): stuck, naming m2.
    d.advance_wall_clock(Duration::from_secs(59));
    assert!(d.read_output("import-status").is_empty());
    d.advance_wall_clock(Duration::from_secs(1));
    let ev: Vec<Event<JobEvent>> = d.read_events("import-status");
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].ty, "spool.job.stuck.v1");
    assert_eq!(ev[0].id, "imports/j1/stuck/1");
    assert_eq!(ev[0].data.missing, vec!["m2".to_owned()]);
    assert_eq!((ev[0].data.parts_done, ev[0].data.parts_total), (2, 3));
    // The last part completes it after all: one completed event, never again.
    d.pipe("in", "m2", "j1")
        .pipe("in", "m2", "j1")
        .pipe("in", "start", "j1");
    d.advance_wall_clock(Duration::from_secs(600));
    let ev: Vec<Event<JobEvent>> = d.read_events("import-status");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].ty, "spool.job.completed.v1");
    assert_eq!(ev[0].subject.as_deref(), Some("j1"));
    assert!(ev[0].data.missing.is_empty());
    // A job that never progresses reports once per slot, and state survives restarts.
    d.pipe("in", "start", "j2");
    d.restart();
    d.advance_wall_clock(Duration::from_secs(125));
    let ev: Vec<Event<JobEvent>> = d.read_events("import-status");
    let ids: Vec<&str> = ev.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, vec!["imports/j2/stuck/1", "imports/j2/stuck/2"]);
    assert_eq!(ev[1].data.missing, vec!["m0", "m1", "m2"]);
    let _ = JobState::Stuck;
}

/// Copies each input to `out` (partition 0) with its lane in a header and the driver's clock
/// as its timestamp.
struct Relay;

impl Handler for Relay {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let out = ProducerRecord::new(input.value.clone().unwrap_or_default())
            .header("lane", input.lane.to_string())
            .timestamp_ms(ctx.now_ms());
        ctx.emit_to("out", 0, out);
        Ok(())
    }
}

fn lane(name: &str, priority: u32, min_share: f64) -> LaneConfig {
    LaneConfig::for_topic(name, priority, min_share)
}

fn pipe_n(d: &mut TestDriver<Relay>, topic: &str, n: usize) {
    for i in 0..n {
        d.pipe(topic, format!("k{i}"), format!("{topic}-{i}"));
    }
}

/// Every input of `topic` (`n` of them) came out exactly once, in the order piped.
fn assert_all_once_in_order(out: &[OutputRecord], topic: &str, n: usize) {
    let got: Vec<&str> = out
        .iter()
        .filter_map(|r| r.value_str())
        .filter(|v| v.starts_with(&format!("{topic}-")))
        .collect();
    let want: Vec<String> = (0..n).map(|i| format!("{topic}-{i}")).collect();
    assert_eq!(got, want, "{topic}: each input once, in order");
}

fn count_lane(out: &[OutputRecord], lane: &str) -> usize {
    out.iter()
        .filter(|r| r.header("lane") == Some(lane))
        .count()
}

#[test]
fn a_lower_lane_keeps_its_share_while_a_higher_one_is_busy_and_nothing_is_dropped() {
    const N: usize = 3000;
    let mut d = TestDriver::new("lanes", Relay)
        .with_lanes(vec![lane("alerts", 0, 1.0), lane("campaigns", 1, 0.2)]);
    pipe_n(&mut d, "alerts", N);
    pipe_n(&mut d, "campaigns", N);
    assert_eq!(d.output_len("out"), 0, "lane inputs wait for the clock");
    let mut seen = Vec::new();
    // 1 ms per input: 1000 inputs per one-second window, a fifth of them campaigns.
    for second in 0..3 {
        d.advance_wall_clock(Duration::from_secs(1));
        let out = d.read_output("out");
        assert_eq!(out.len(), 1000, "second {second}");
        let c = count_lane(&out, "campaigns");
        assert!(
            (200..=201).contains(&c),
            "second {second}: campaigns got {c} of 1000 (min_share 0.2)"
        );
        seen.extend(out);
    }
    // Alerts (2400 handled) run out during the 4th second; then campaigns take it all.
    d.advance_wall_clock(Duration::from_secs(10));
    seen.extend(d.read_output("out"));
    assert_eq!(d.queued("alerts") + d.queued("campaigns"), 0);
    assert_eq!(seen.len(), 2 * N);
    assert_all_once_in_order(&seen, "alerts", N);
    assert_all_once_in_order(&seen, "campaigns", N);
    let last_alert = seen
        .iter()
        .rposition(|r| r.header("lane") == Some("alerts"))
        .unwrap();
    assert!(
        (3700..3800).contains(&last_alert),
        "alerts drained first, at 80%: last alert is output #{last_alert}"
    );
}

/// Runs `chunks` chunks of 100 ms, each with 20 alerts piped 5 ms apart (a light but active
/// higher lane, 1 ms per input), and returns (alerts, bulk) handled per chunk.
fn light_alerts(d: &mut TestDriver<Relay>, chunks: usize, next: &mut usize) -> Vec<(usize, usize)> {
    let mut per_chunk = Vec::new();
    for _ in 0..chunks {
        for _ in 0..20 {
            d.pipe("alerts", "a", format!("alerts-{next}"));
            *next += 1;
            d.advance_wall_clock(Duration::from_millis(5));
        }
        let out = d.read_output("out");
        per_chunk.push((count_lane(&out, "alerts"), count_lane(&out, "bulk")));
    }
    per_chunk
}

#[test]
fn a_lower_lane_yields_to_an_active_higher_one_and_runs_at_full_speed_once_it_is_quiet() {
    const BULK: usize = 20_000;
    let mut d = TestDriver::new("yield", Relay)
        .with_lanes(vec![lane("alerts", 0, 1.0), lane("bulk", 1, 0.1)]);
    pipe_n(&mut d, "bulk", BULK);
    let mut alerts = 0;
    // The alerts lane is active: bulk gets its min_share (10%) of each 10 ms period, one
    // input of 1 ms, never none, and every alert is handled in the chunk it arrived in.
    let active = light_alerts(&mut d, 20, &mut alerts);
    for (i, &(a, b)) in active.iter().enumerate() {
        assert_eq!(a, 20, "chunk {i}: every alert handled at once");
        assert!(
            (9..=11).contains(&b),
            "chunk {i}: bulk got {b} inputs of 1 ms in 100 ms (share 0.1 while alerts are active)"
        );
    }
    // The alerts go quiet: after the active window (250 ms) and at most one period, bulk runs
    // at full speed (1 input per ms).
    d.advance_wall_clock(Duration::from_millis(260));
    let warm = count_lane(&d.read_output("out"), "bulk");
    assert!(
        warm <= 40,
        "bulk still yields for the active window: {warm}"
    );
    d.advance_wall_clock(Duration::from_secs(1));
    assert_eq!(
        count_lane(&d.read_output("out"), "bulk"),
        1000,
        "alerts quiet: bulk at full speed"
    );
    // Active again: back to its share.
    let again = light_alerts(&mut d, 5, &mut alerts);
    assert!(
        again
            .iter()
            .skip(1)
            .all(|&(a, b)| a == 20 && (9..=11).contains(&b)),
        "{again:?}"
    );
    // Nothing dropped or reordered.
    d.advance_wall_clock(Duration::from_secs(60));
    assert_eq!(d.queued("bulk") + d.queued("alerts"), 0);

    // The same with the yield off: bulk takes every millisecond the alerts leave.
    let mut d = TestDriver::new("no-yield", Relay)
        .with_lanes(vec![lane("alerts", 0, 1.0), lane("bulk", 1, 0.1)])
        .with_lane_yield(None);
    pipe_n(&mut d, "bulk", BULK);
    let mut alerts = 0;
    let off = light_alerts(&mut d, 5, &mut alerts);
    assert!(off.iter().all(|&(a, b)| a == 20 && b == 80), "{off:?}");

    // A saturated higher lane does not starve a yielding lane either: its record share (the
    // floor) still holds although its time budget is spent (here with a 50 ms period). Bulk's
    // inputs take 4 ms, the alerts' 1 ms: by time alone (10 ms of each 50 ms) bulk would get
    // ~50 inputs a second; by its record share (20 %), 4b + a = 1000 ms with b = a / 4:
    // 125.
    let mut d = TestDriver::new("busy", Relay)
        .with_lanes(vec![lane("alerts", 0, 1.0), lane("bulk", 1, 0.2)])
        .with_lane_yield(Some(LaneYield {
            active_window: Duration::from_millis(250),
            period: Duration::from_millis(50),
        }))
        .with_lane_record_time("bulk", Duration::from_millis(4));
    pipe_n(&mut d, "alerts", 5_000);
    pipe_n(&mut d, "bulk", 5_000);
    d.advance_wall_clock(Duration::from_secs(1));
    let out = d.read_output("out");
    let (a, b) = (count_lane(&out, "alerts"), count_lane(&out, "bulk"));
    assert!(
        (124..=127).contains(&b) && (4 * b).abs_diff(a) <= 8,
        "bulk {b}, alerts {a} with alerts saturated: bulk at its record share"
    );
}

#[test]
fn a_lane_with_min_share_0_is_not_starved_by_an_active_higher_lane() {
    // Alerts arrive every 5 ms (1 ms each): the loop is idle 80 % of the time, and a bulk
    // lane with min_share 0 (no record floor) still gets its minimum budget of each period
    // (MIN_YIELD_SHARE, 1 %: here 1 ms inputs of a 100 ms period: one per period), not
    // nothing; at full speed once the alerts are quiet.
    let mut d = TestDriver::new("zero", Relay)
        .with_lanes(vec![lane("alerts", 0, 1.0), lane("bulk", 1, 0.0)])
        .with_lane_yield(Some(LaneYield {
            active_window: Duration::from_millis(250),
            period: Duration::from_millis(100),
        }));
    pipe_n(&mut d, "bulk", 5_000);
    let mut alerts = 0;
    let active = light_alerts(&mut d, 10, &mut alerts);
    for (i, &(a, b)) in active.iter().enumerate() {
        assert_eq!(a, 20, "chunk {i}: every alert handled at once");
        assert!(
            (1..=2).contains(&b),
            "chunk {i}: bulk got {b} inputs in 100 ms (its minimum budget)"
        );
    }
    d.advance_wall_clock(Duration::from_millis(400));
    let _ = d.read_output("out");
    d.advance_wall_clock(Duration::from_secs(1));
    assert_eq!(count_lane(&d.read_output("out"), "bulk"), 1000);
}

#[test]
fn a_throttled_lane_holds_its_rate_over_ten_seconds_beside_a_busy_lane() {
    const RATE: u32 = 200;
    let mut d = TestDriver::new("throttled", Relay).with_lanes(vec![
        lane("alerts", 0, 1.0),
        // Its share (half) asks for more than its rate allows: the rate wins, and the
        // alerts lane is not held back by a lane its own throttle keeps below its share.
        LaneConfig {
            rate_per_sec: Some(RATE),
            ..lane("bulk", 1, 0.5)
        },
    ]);
    pipe_n(&mut d, "alerts", 20_000);
    pipe_n(&mut d, "bulk", 5_000);
    let t0 = d.wall_clock_ms();
    d.advance_wall_clock(Duration::from_secs(10));
    assert_eq!(d.wall_clock_ms() - t0, 10_000);
    let out = d.read_output("out");
    let bulk = count_lane(&out, "bulk");
    // The burst (a tenth of a second's worth) is free; then RATE per second.
    let rate = (bulk - RATE as usize / 10) as f64 / 10.0;
    assert!(
        (f64::from(RATE) * 0.95..=f64::from(RATE) * 1.05).contains(&rate),
        "bulk at {rate}/s over 10 s (limit {RATE}/s)"
    );
    let alerts = count_lane(&out, "alerts");
    assert_eq!(
        alerts + bulk,
        10_000,
        "every millisecond the bulk lane's throttle holds goes to alerts"
    );
    // The next 10 s keep the rate (no drift, no catch-up burst).
    d.advance_wall_clock(Duration::from_secs(10));
    let out2 = d.read_output("out");
    let bulk2 = count_lane(&out2, "bulk");
    assert!(
        (1900..=2100).contains(&bulk2),
        "bulk {bulk2} in the next 10 s"
    );
    // Nothing dropped: the rest comes out, in order.
    d.advance_wall_clock(Duration::from_secs(60));
    let mut all = out;
    all.extend(out2);
    all.extend(d.read_output("out"));
    assert_eq!(d.queued("bulk") + d.queued("alerts"), 0);
    assert_all_once_in_order(&all, "bulk", 5_000);
    assert_all_once_in_order(&all, "alerts", 20_000);
}

fn ms(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

#[test]
fn quiet_hours_close_and_reopen_across_a_dst_change_and_operators_pause_lanes() {
    let mut campaigns = lane("campaigns", 1, 0.1);
    campaigns.quiet_hours = vec![QuietHours {
        time_zone: "Europe/Athens".into(),
        start: "21:00".into(),
        end: "07:00".into(),
    }];
    // 20:58 in Athens (UTC+2) on the night the clocks go forward (03:00 → 04:00).
    let mut d = TestDriver::new("quiet", Relay)
        .with_wall_clock(ms("2024-03-30T18:58:00Z"))
        .with_record_time(Duration::from_secs(1))
        .with_lanes(vec![lane("alerts", 0, 1.0), campaigns]);
    pipe_n(&mut d, "campaigns", 300);
    d.advance_wall_clock(Duration::from_secs(3600));
    let before = d.read_output("out");
    assert_eq!(before.len(), 120, "one a second until 21:00 local");
    assert_eq!(
        before.last().unwrap().timestamp_ms,
        ms("2024-03-30T18:59:59Z")
    );
    assert_eq!(d.queued("campaigns"), 180, "the rest waits");
    // Alerts flow during the campaigns' quiet hours.
    pipe_n(&mut d, "alerts", 5);
    d.advance_wall_clock(Duration::from_secs(10));
    let alerts = d.read_output("out");
    assert_eq!(count_lane(&alerts, "alerts"), 5);
    assert_eq!(count_lane(&alerts, "campaigns"), 0);
    // 07:00 local is 04:00Z after the spring forward (a 9-hour night, not 10).
    let to = ms("2024-03-31T04:01:00Z") - d.wall_clock_ms();
    d.advance_wall_clock(Duration::from_millis(to as u64));
    let after = d.read_output("out");
    assert_eq!(after.len(), 60, "from 04:00Z, not 05:00Z");
    assert_eq!(after[0].timestamp_ms, ms("2024-03-31T04:00:00Z"));
    // An operator pause holds the lane; a resume goes on where it stopped.
    d.pause_lane("campaigns");
    d.advance_wall_clock(Duration::from_secs(600));
    assert!(d.read_output("out").is_empty(), "paused");
    d.resume_lane("campaigns");
    d.advance_wall_clock(Duration::from_secs(600));
    let rest = d.read_output("out");
    assert_eq!(rest.len(), 120);
    let mut all = before;
    all.extend(after);
    all.extend(rest);
    assert_all_once_in_order(&all, "campaigns", 300);
}

#[test]
fn a_record_over_its_keys_rate_holds_back_only_its_partition() {
    let mut d = TestDriver::new("keyed", Relay)
        .with_topic("mail", 2)
        .with_lanes(vec![LaneConfig {
            key_rate_per_sec: Some(1),
            ..lane("mail", 0, 1.0)
        }]);
    let on = |d: &mut TestDriver<Relay>, partition: u32, key: &str, value: &str| {
        d.pipe_record(TestRecord {
            partition: Some(partition),
            ..TestDriver::<Relay>::record("mail", key, value.to_owned())
        });
    };
    // Partition 0: a hot key (one a second), then a cold key behind it.
    on(&mut d, 0, "hot", "hot-0");
    on(&mut d, 0, "hot", "hot-1");
    on(&mut d, 0, "cold", "cold-0");
    on(&mut d, 0, "hot", "hot-2");
    // Partition 1: ten keys, piped after partition 0's.
    for i in 0..10 {
        on(&mut d, 1, &format!("c{i}"), &format!("p1-{i}"));
    }
    d.advance_wall_clock(Duration::from_millis(100));
    let first: Vec<String> = d
        .read_output("out")
        .iter()
        .filter_map(|r| r.value_str().map(str::to_owned))
        .collect();
    let mut want = vec!["hot-0".to_owned()];
    want.extend((0..10).map(|i| format!("p1-{i}")));
    assert_eq!(
        first, want,
        "partition 1 is not held back by partition 0's hot key, nor is cold-0 taken before hot-1"
    );
    assert_eq!(d.queued("mail"), 3);
    d.advance_wall_clock(Duration::from_secs(1));
    let second: Vec<String> = d
        .read_output("out")
        .iter()
        .filter_map(|r| r.value_str().map(str::to_owned))
        .collect();
    assert_eq!(
        second,
        vec!["hot-1", "cold-0"],
        "the hot key's next token, then its partition goes on in order"
    );
    d.advance_wall_clock(Duration::from_secs(1));
    let third = d.read_output("out");
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].value_str(), Some("hot-2"));
    assert_eq!(d.queued("mail"), 0);
}

/// Two external effects per input, each guarded by its idempotency key: a mail, then an SMS.
/// Value "sms-down-N": the SMS fails (a retry) on the first N attempts; "bad-number": the SMS
/// fails for good (a dead letter). Either way the mail was already sent and marked.
#[derive(Default)]
struct MailThenSms {
    sent: Vec<String>,
}

impl Handler for MailThenSms {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let id = input.key_str().unwrap_or_default().to_owned();
        let value = String::from_utf8_lossy(input.value.as_deref().unwrap_or_default()).to_string();
        let mail = format!("mail/{id}");
        if ctx.effect(&mail)? == EffectStatus::Todo {
            self.sent.push(mail.clone());
            ctx.effect_done(&mail);
        }
        if let Some(n) = value.strip_prefix("sms-down-")
            && input.attempt <= n.parse::<u32>().unwrap()
        {
            return Err(Failure::retry("SMS gateway down"));
        }
        if value == "bad-number" {
            return Err(Failure::dead_letter("no such number"));
        }
        let sms = format!("sms/{id}");
        if ctx.effect(&sms)? == EffectStatus::Todo {
            self.sent.push(sms.clone());
            ctx.effect_done(&sms);
        }
        ctx.emit("notified", ProducerRecord::new(id));
        Ok(())
    }
}

#[test]
fn an_effect_marked_before_a_failure_is_not_repeated_by_the_retry_or_a_redrive() {
    // Blocking: the retry in place sees the mail done.
    let mut d = TestDriver::new("notify", MailThenSms::default());
    d.pipe("in", "n1", "sms-down-2");
    assert_eq!(d.handler().sent, vec!["mail/n1", "sms/n1"]);
    assert_eq!(d.read_output("notified").len(), 1);

    // Retry topics, with a restart before the retry: the mark committed with the retry record.
    let policy = RetryPolicy {
        mode: spool_processor::RetryMode::Topics,
        topic_delays_ms: vec![1_000],
        ..RetryPolicy::default()
    };
    let mut d = TestDriver::new("notify", MailThenSms::default()).with_retry(policy);
    d.pipe("in", "n2", "sms-down-1");
    assert_eq!(d.handler().sent, vec!["mail/n2"]);
    d.restart();
    d.advance_wall_clock(Duration::from_secs(1));
    assert_eq!(d.handler().sent, vec!["mail/n2", "sms/n2"]);

    // Dead-lettered after the mail: the mark commits with the dead letter, so the input
    // redriven later (the number fixed) sends only the SMS.
    let mut d = TestDriver::new("notify", MailThenSms::default());
    d.pipe("in", "n3", "bad-number");
    assert_eq!(d.dead_letters("in").len(), 1);
    d.restart();
    d.pipe("in", "n3", "redriven");
    assert_eq!(d.handler().sent, vec!["mail/n3", "sms/n3"]);
    // The failed call's marks are indexed like any other (counted, prunable).
    let keys: Vec<String> = d
        .store_entries("__effects")
        .into_iter()
        .map(|(k, _)| String::from_utf8(k).unwrap())
        .collect();
    assert_eq!(keys, vec!["mail/n3", "sms/n3"]);
}

/// Sets wall timers from inputs (`key` = timer key, value = delay in ms) and one stream timer
/// per "stream-<delay>" value. `on_timer`: keys starting with "fail" fail with a retry (after
/// marking an effect), "dead" asks for a dead letter, others emit `key@now`. Every call is
/// logged as (key, attempt, at_ms, now).
#[derive(Default)]
struct FlakyTimers {
    calls: Vec<(String, u32, i64, i64)>,
    effects: Vec<String>,
}

impl Handler for FlakyTimers {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let key = input.key.clone().unwrap_or_default();
        let value = String::from_utf8_lossy(input.value.as_deref().unwrap_or_default()).to_string();
        if let Some(delay) = value.strip_prefix("stream-") {
            let at = input.timestamp_ms + delay.parse::<i64>().unwrap();
            ctx.set_timer(TimerKind::Stream, &key, at, "p")?;
        } else if let Ok(delay) = value.parse::<i64>() {
            let at = ctx.now_ms() + delay;
            ctx.set_timer(TimerKind::Wall, &key, at, "p")?;
        }
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, t: &Timer) -> Result<(), Failure> {
        let key = String::from_utf8_lossy(&t.key).to_string();
        self.calls
            .push((key.clone(), t.attempt, t.at_ms, ctx.now_ms()));
        assert_eq!(&t.payload[..], b"p", "the payload is kept across retries");
        if key.starts_with("fail") {
            let e = format!("effect/{key}");
            if ctx.effect(&e)? == EffectStatus::Todo {
                self.effects.push(e.clone());
                ctx.effect_done(&e);
            }
            return Err(Failure::retry("downstream unavailable"));
        }
        if key == "dead" {
            return Err(Failure::dead_letter("cannot be handled"));
        }
        ctx.emit(
            "fired",
            ProducerRecord::new(format!("{key}@{}", ctx.now_ms())),
        );
        Ok(())
    }
}

#[test]
fn a_failing_timer_backs_off_lets_later_timers_fire_and_is_dropped_after_its_attempts() {
    let policy = RetryPolicy {
        timer_max_attempts: 3,
        initial_backoff_ms: 500,
        max_backoff_ms: 10_000,
        ..RetryPolicy::default()
    };
    let mut d = TestDriver::new("timers", FlakyTimers::default()).with_retry(policy);
    let t0 = d.wall_clock_ms();
    d.pipe("in", "fail-a", "1000").pipe("in", "b", "2000");
    // a fails at t0+1000, is retried at +1500 (500 ms later), fails, is set for +2500.
    d.advance_wall_clock(Duration::from_millis(1_600));
    assert_eq!(d.timer(0, TimerKind::Wall, b"fail-a"), Some(t0 + 2_500));
    // Its retry state is state: it survives a restart.
    d.restart();
    d.advance_wall_clock(Duration::from_millis(2_000));
    let fired: Vec<String> = d
        .read_output("fired")
        .iter()
        .map(|r| r.value_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        fired,
        vec![format!("b@{}", t0 + 2_000)],
        "the later timer fired"
    );
    let a: Vec<(u32, i64, i64)> = d
        .handler()
        .calls
        .iter()
        .filter(|c| c.0 == "fail-a")
        .map(|c| (c.1, c.2, c.3 - t0))
        .collect();
    // Attempts 1..3, each seeing when it was first due, 500 then 1000 ms apart; then dropped.
    assert_eq!(
        a,
        vec![
            (1, t0 + 1_000, 1_000),
            (2, t0 + 1_000, 1_500),
            (3, t0 + 1_000, 2_500)
        ]
    );
    assert_eq!(d.timer(0, TimerKind::Wall, b"fail-a"), None, "dropped");
    assert_eq!((d.timer_retries(), d.timers_dropped()), (2, 1));
    // The effect its first attempt marked was not repeated by the retries.
    assert_eq!(d.handler().effects, vec!["effect/fail-a"]);
    // Nothing fires later.
    d.advance_wall_clock(Duration::from_secs(60));
    assert_eq!(d.handler().calls.len(), 4);
}

#[test]
fn a_timer_asking_for_a_dead_letter_is_dropped_and_a_failing_stream_timer_waits_on_stream_time() {
    let mut d = TestDriver::new("timers", FlakyTimers::default());
    d.pipe("in", "dead", "100").pipe("in", "c", "200");
    d.advance_wall_clock(Duration::from_secs(1));
    assert_eq!(d.handler().calls.len(), 2, "{:?}", d.handler().calls);
    assert_eq!(d.timer(0, TimerKind::Wall, b"dead"), None);
    assert_eq!((d.timer_retries(), d.timers_dropped()), (0, 1));
    assert_eq!(d.read_output("fired").len(), 1);

    // A stream timer that fails is set again 200 ms (the default first backoff) later in
    // stream time: it fires again only once input moves stream time that far.
    let t0 = d.wall_clock_ms();
    let at = |ms: i64, value: &str| TestRecord {
        timestamp_ms: Some(t0 + ms),
        ..TestDriver::<FlakyTimers>::record("in", "fail-s", value.to_owned())
    };
    d.pipe_record(at(0, "stream-1000"));
    d.pipe_record(at(1_000, "-"));
    assert_eq!(d.timer(0, TimerKind::Stream, b"fail-s"), Some(t0 + 1_200));
    d.advance_wall_clock(Duration::from_secs(60));
    d.pipe_record(at(1_100, "-"));
    let stream_calls = |d: &TestDriver<FlakyTimers>| {
        d.handler()
            .calls
            .iter()
            .filter(|c| c.0 == "fail-s")
            .map(|c| c.1)
            .collect::<Vec<_>>()
    };
    assert_eq!(stream_calls(&d), vec![1]);
    d.pipe_record(at(1_200, "-"));
    assert_eq!(stream_calls(&d), vec![1, 2]);
}

#[test]
fn by_default_a_failing_timer_is_retried_forever_with_a_capped_backoff() {
    let mut d = TestDriver::new("timers", FlakyTimers::default());
    let t0 = d.wall_clock_ms();
    d.pipe("in", "fail-x", "0");
    d.advance_wall_clock(Duration::from_secs(600));
    let times: Vec<i64> = d.handler().calls.iter().map(|c| c.3 - t0).collect();
    // 200 ms doubling to the 30 s cap: +0, 0.2, 0.6, 1.4, 3.0, 6.2, 12.6, 25.4, 51, 81, ...
    assert_eq!(
        &times[..9],
        &[0, 200, 600, 1_400, 3_000, 6_200, 12_600, 25_400, 51_000]
    );
    assert!(times.windows(2).all(|w| w[1] - w[0] <= 30_000), "{times:?}");
    assert_eq!(times.len(), 9 + (600_000 - 51_000) / 30_000);
    assert_eq!(d.timers_dropped(), 0);
    let next = d.timer(0, TimerKind::Wall, b"fail-x").expect("still set");
    assert_eq!(next - t0, times.last().unwrap() + 30_000);
    assert_eq!(d.handler().calls.last().unwrap().1 as usize, times.len());
}
