//! Failure handling and flow control against the real `spoold`, with the runtime in-process
//! (so the clock can be injected): retry topics honour due times without blocking the rest;
//! dead letters carry their headers; priority lanes do not starve; a throttle holds its
//! rate; quiet hours follow an injected clock across a DST change; a paused lane stays
//! paused across a restart; a skip gives up during the wait without another attempt; a
//! redrive to a retry topic keeps the original position; a failing timer does not hold up
//! the later ones and is dropped after its attempts.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use spool_client::{Client, ProducerConfig, ProducerRecord, Record};
use spool_processor::engine::headers;
use spool_processor::metrics::Metrics;
use spool_processor::runtime::{self, RuntimeConfig};
use spool_processor::{
    AsyncHandler, Clock, Context, Failure, Handler, Input, LaneConfig, QuietHours, RetryMode,
    RetryPolicy, Timer, TimerKind,
};
use spool_testkit::Broker;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{create, read_all};

/// Copies each input to `out` with its lane and attempt in headers and the processing time
/// (the runtime's clock) as timestamp. Values starting with `flaky-N` fail their first N
/// attempts; `bad` always fails; `slow` inputs take 1 ms.
struct Recorder;

impl Handler for Recorder {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let v = String::from_utf8_lossy(input.value.as_deref().unwrap_or_default()).to_string();
        if let Some(n) = v.strip_prefix("flaky-").and_then(|r| r.split('-').next())
            && input.attempt <= n.parse::<u32>().unwrap_or(0)
        {
            return Err(Failure::retry(format!("flaky attempt {}", input.attempt)));
        }
        if let Some(until) = v
            .strip_prefix("bad-until-")
            .and_then(|t| t.parse::<i64>().ok())
        {
            if ctx.now_ms() < until {
                return Err(Failure::retry("not yet"));
            }
        } else if v.starts_with("bad") {
            return Err(Failure::retry("always fails"));
        }
        if v.starts_with("slow") {
            std::thread::sleep(Duration::from_millis(1));
        }
        let out = ProducerRecord::new(v)
            .header("lane", input.lane.to_string())
            .header("attempt", input.attempt.to_string())
            .header("offset", input.offset.to_string())
            .timestamp_ms(ctx.now_ms());
        ctx.emit_to("out", 0, out);
        Ok(())
    }
}

#[derive(Debug)]
struct FakeClock(AtomicI64);

impl Clock for FakeClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), spool_processor::RuntimeError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let r = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("stops in time")
            .expect("joins");
        r.expect("clean stop");
    }
}

fn start(client: &Client, cfg: RuntimeConfig) -> Running {
    start_with(client, cfg, Arc::new(Metrics::new()))
}

fn start_with(client: &Client, cfg: RuntimeConfig, metrics: Arc<Metrics>) -> Running {
    start_handler(client, cfg, Recorder, metrics)
}

fn start_handler<H: AsyncHandler>(
    client: &Client,
    cfg: RuntimeConfig,
    handler: H,
    metrics: Arc<Metrics>,
) -> Running {
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(runtime::run(client.clone(), cfg, handler, metrics, rx));
    Running { stop, task }
}

fn config(name: &str, inputs: &[&str], dir: &std::path::Path) -> RuntimeConfig {
    let mut c = RuntimeConfig::new(name, inputs.iter().copied());
    c.state_dir = dir.join(name);
    c.commit_interval = Duration::from_millis(20);
    c.tick_interval = Duration::from_millis(20);
    c.session_timeout = Duration::from_secs(1);
    c
}

async fn produce(client: &Client, topic: &str, values: &[String]) {
    let p = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..ProducerConfig::default()
    });
    let mut futs = Vec::new();
    for v in values {
        futs.push(
            p.send_to(topic, 0, ProducerRecord::new(v.clone()))
                .await
                .unwrap(),
        );
    }
    p.close().await;
    for f in futs {
        f.await.unwrap();
    }
}

fn header<'a>(r: &'a Record, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .rev()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value.as_deref()?).ok())
}

fn value(r: &Record) -> String {
    String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).to_string()
}

/// Waits until `topic` partition 0 has at least `n` committed records.
async fn wait_for(client: &Client, topic: &str, n: usize, within: Duration) -> Vec<Record> {
    let deadline = Instant::now() + within;
    // The runtime creates its dead-letter and retry topics as it starts.
    while client.describe_topic(topic).await.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    loop {
        let got = read_all(client, topic, 0).await;
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_topics_honour_due_times_and_dead_letters_carry_headers() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "jobs", 1).await;
    create(&c, "out", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("retrier", &["jobs"], dir.path());
    cfg.retry = RetryPolicy {
        mode: RetryMode::Topics,
        max_attempts: 3,
        topic_delays_ms: vec![400, 800],
        ..RetryPolicy::default()
    };
    let run = start(&c, cfg);
    let t0 = spool_processor::SystemClock.now_ms();
    produce(
        &c,
        "jobs",
        &["ok-1".into(), "flaky-2".into(), "ok-2".into(), "bad".into()],
    )
    .await;
    let out = wait_for(&c, "out", 3, Duration::from_secs(20)).await;
    let names: Vec<String> = out.iter().map(value).collect();
    assert_eq!(
        names,
        vec!["ok-1", "ok-2", "flaky-2"],
        "the retried record did not block the rest"
    );
    let flaky = &out[2];
    assert_eq!(header(flaky, "attempt"), Some("3"));
    assert!(
        flaky.timestamp_ms - t0 >= 1_200,
        "attempt 3 came {} ms after the first: before its due times (400 + 800 ms)",
        flaky.timestamp_ms - t0
    );
    let dl = wait_for(&c, "jobs.retrier.dlq", 1, Duration::from_secs(20)).await;
    assert_eq!(dl.len(), 1);
    let d = &dl[0];
    assert_eq!(value(d), "bad");
    assert_eq!(header(d, headers::DLQ_TOPIC), Some("jobs"));
    assert_eq!(header(d, headers::DLQ_PARTITION), Some("0"));
    assert_eq!(
        header(d, headers::DLQ_OFFSET),
        Some("3"),
        "the original offset, not the retry topic's"
    );
    assert_eq!(header(d, headers::DLQ_ATTEMPTS), Some("3"));
    assert_eq!(header(d, headers::DLQ_ERROR), Some("always fails"));
    let history: Vec<serde_json::Value> =
        serde_json::from_str(header(d, headers::DLQ_HISTORY).unwrap()).unwrap();
    assert_eq!(
        history
            .iter()
            .map(|a| a["attempt"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        d.headers.iter().all(|h| !h.key.starts_with("spool_retry")),
        "no retry headers left"
    );
    // The retry topics exist per source topic and group.
    assert!(c.describe_topic("jobs.retrier.retry-1").await.is_ok());
    assert!(c.describe_topic("jobs.retrier.retry-2").await.is_ok());
    run.stop().await;
}

async fn produce_to(client: &Client, topic: &str, partition: u32, values: &[String]) {
    let p = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..ProducerConfig::default()
    });
    let mut futs = Vec::new();
    for v in values {
        futs.push(
            p.send_to(topic, partition, ProducerRecord::new(v.clone()))
                .await
                .unwrap(),
        );
    }
    p.close().await;
    for f in futs {
        f.await.unwrap();
    }
}

/// Two retries wait in one retry partition (the first held until it is due, the second
/// parked behind it) while both partitions of the source keep flowing over the same lane
/// stream: nothing waits for them, and the stream is never reopened (a pause in the consumer
/// would reopen it, dropping what it had fetched for every partition, twice per hold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_not_due_holds_back_only_its_partition_and_keeps_the_lane_stream() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "jobs", 2).await;
    create(&c, "out", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("parker", &["jobs"], dir.path());
    cfg.retry = RetryPolicy {
        mode: RetryMode::Topics,
        max_attempts: 3,
        topic_delays_ms: vec![1_500],
        ..RetryPolicy::default()
    };
    let metrics = Arc::new(Metrics::new());
    let run = start_with(&c, cfg, metrics.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !metrics.is_ready() {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (resets, refetched) = (metrics.stream_resets(), metrics.refetched_records());
    let t0 = spool_processor::SystemClock.now_ms();
    produce_to(&c, "jobs", 0, &["flaky-1-x".into(), "flaky-1-y".into()]).await;
    // The two retries are in jobs.parker.retry-1/0 within a commit; then 1.5 s of traffic
    // on both partitions of jobs.
    let mut most_parked = 0;
    for i in 0..10 {
        produce_to(&c, "jobs", 0, &[format!("a-{i}")]).await;
        produce_to(&c, "jobs", 1, &[format!("b-{i}")]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        most_parked = most_parked.max(metrics.parked_records());
    }
    let out = wait_for(&c, "out", 22, Duration::from_secs(20)).await;
    let names: Vec<String> = out.iter().map(value).collect();
    assert_eq!(names.len(), 22, "{names:?}");
    assert_eq!(
        &names[20..],
        ["flaky-1-x", "flaky-1-y"],
        "the retries came last, in order: {names:?}"
    );
    for i in 0..10 {
        assert!(names.contains(&format!("a-{i}")) && names.contains(&format!("b-{i}")));
    }
    assert!(
        out[20].timestamp_ms - t0 >= 1_500,
        "retried {} ms after the first attempt, before its due time",
        out[20].timestamp_ms - t0
    );
    assert_eq!(header(&out[21], "attempt"), Some("2"));
    assert_eq!(
        most_parked, 1,
        "the second retry waited parked behind the first"
    );
    // The counters move at the next tick (20 ms).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        (metrics.stream_resets(), metrics.refetched_records()),
        (resets, refetched),
        "holding a retry reopened its lane's stream"
    );
    assert_eq!(metrics.parked_records(), 0);
    run.stop().await;
}

fn lane(name: &str, priority: u32, min_share: f64) -> LaneConfig {
    LaneConfig::for_topic(name, priority, min_share)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_lanes_drain_the_high_lane_first_without_starving_the_low_one() {
    crate::trace();
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "alerts", 1).await;
    create(&c, "campaigns", 1).await;
    create(&c, "out", 1).await;
    const N: usize = 1500;
    produce(
        &c,
        "campaigns",
        &(0..N).map(|i| format!("slow-c{i}")).collect::<Vec<_>>(),
    )
    .await;
    produce(
        &c,
        "alerts",
        &(0..N).map(|i| format!("slow-a{i}")).collect::<Vec<_>>(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("lanes", &["alerts", "campaigns"], dir.path());
    cfg.lanes = vec![lane("alerts", 0, 1.0), lane("campaigns", 1, 0.2)];
    let run = start(&c, cfg);
    let out = wait_for(&c, "out", 2 * N, Duration::from_secs(40)).await;
    run.stop().await;
    assert_eq!(out.len(), 2 * N);
    let lanes: Vec<&str> = out.iter().map(|r| header(r, "lane").unwrap()).collect();
    let last_alert = lanes.iter().rposition(|l| *l == "alerts").unwrap();
    let campaigns_before = lanes[..last_alert]
        .iter()
        .filter(|l| **l == "campaigns")
        .count();
    eprintln!(
        "lanes: the last alert was output #{last_alert} of {}; {campaigns_before} campaign records before it",
        2 * N
    );
    assert!(
        last_alert < 2 * N - N / 4,
        "alerts were not drained first (last alert at #{last_alert})"
    );
    assert!(
        campaigns_before >= N / 20,
        "campaigns starved while alerts waited ({campaigns_before})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_lane_holds_its_rate() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "bulk", 2).await;
    create(&c, "out", 1).await;
    const N: usize = 700;
    const RATE: u32 = 250;
    for p in 0..2 {
        let vals: Vec<String> = (0..N / 2).map(|i| format!("b{p}-{i}")).collect();
        let prod = c.producer(ProducerConfig::default());
        let mut futs = Vec::new();
        for v in vals {
            futs.push(
                prod.send_to("bulk", p, ProducerRecord::new(v))
                    .await
                    .unwrap(),
            );
        }
        prod.close().await;
        for f in futs {
            f.await.unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("throttled", &["bulk"], dir.path());
    cfg.lanes = vec![LaneConfig {
        rate_per_sec: Some(RATE),
        burst: None,
        ..lane("bulk", 0, 1.0)
    }];
    let run = start(&c, cfg);
    let out = wait_for(&c, "out", N, Duration::from_secs(30)).await;
    run.stop().await;
    assert_eq!(out.len(), N);
    let mut times: Vec<i64> = out.iter().map(|r| r.timestamp_ms).collect();
    times.sort_unstable();
    let span = (times[N - 1] - times[0]) as f64 / 1000.0;
    // The first burst (a tenth of a second's worth) is free.
    let rate = (N - RATE as usize / 10) as f64 / span;
    eprintln!("throttle: {N} records in {span:.2} s = {rate:.1}/s (limit {RATE}/s)");
    // The contract a test can hold on a loaded 2-core CI machine: never faster than the
    // limit (+5% for timestamp granularity), and not starved. How close it stays to the
    // limit (±5% over 10 s) is a benchmark target (`cargo bench --bench processor`), not a
    // test: a busy machine slows the processor below any rate (211/s seen with 3 suites).
    assert!(
        rate <= 1.05 * f64::from(RATE),
        "rate {rate:.1}/s exceeds the {RATE}/s limit by more than 5%"
    );
    assert!(
        rate >= 0.5 * f64::from(RATE),
        "rate {rate:.1}/s is under half the {RATE}/s limit: the throttle starves the lane"
    );
}

fn ms(s: &str) -> i64 {
    s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_follow_an_injected_clock_across_a_dst_change() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "campaigns", 1).await;
    create(&c, "out", 1).await;
    let clock = Arc::new(FakeClock(AtomicI64::new(ms("2024-03-30T18:59:00Z"))));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("quiet", &["campaigns"], dir.path());
    cfg.clock = clock.clone();
    cfg.lanes = vec![LaneConfig {
        quiet_hours: vec![QuietHours {
            time_zone: "Europe/Athens".into(),
            start: "21:00".into(),
            end: "07:00".into(),
        }],
        ..lane("campaigns", 0, 1.0)
    }];
    let run = start(&c, cfg);
    // 20:59 in Athens: open.
    produce(&c, "campaigns", &["before".into()]).await;
    assert_eq!(
        wait_for(&c, "out", 1, Duration::from_secs(10)).await.len(),
        1
    );
    // 21:30: quiet; the record waits.
    clock.0.store(ms("2024-03-30T19:30:00Z"), Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    produce(&c, "campaigns", &["night".into()]).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        read_all(&c, "out", 0).await.len(),
        1,
        "processed during quiet hours"
    );
    // 06:30 local after the spring-forward (UTC+3): still quiet.
    clock.0.store(ms("2024-03-31T03:30:00Z"), Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        read_all(&c, "out", 0).await.len(),
        1,
        "processed before 07:00 local"
    );
    // 07:00 local = 04:00Z (an hour earlier in UTC than the evening before): opens by itself.
    clock.0.store(ms("2024-03-31T04:00:00Z"), Ordering::SeqCst);
    let out = wait_for(&c, "out", 2, Duration::from_secs(10)).await;
    assert_eq!(out.len(), 2, "not resumed after the quiet hours");
    assert_eq!(value(&out[1]), "night");
    assert_eq!(out[1].timestamp_ms, ms("2024-03-31T04:00:00Z"));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_lane_stays_paused_across_a_restart() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "alerts", 1).await;
    create(&c, "campaigns", 1).await;
    create(&c, "out", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("pausable", &["alerts", "campaigns"], dir.path());
    cfg.lanes = vec![lane("alerts", 0, 1.0), lane("campaigns", 1, 0.2)];
    let run = start(&c, cfg.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // What `spool processor pause pausable --lane campaigns` writes.
    let control = spool_processor::control::control_topic("pausable");
    let key = spool_processor::control::pause_key(Some("campaigns"));
    let p = c.producer(ProducerConfig::default());
    p.send_to(&control, 0, ProducerRecord::new("paused").key(key.clone()))
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    produce(&c, "campaigns", &["c1".into()]).await;
    produce(&c, "alerts", &["a1".into()]).await;
    let out = wait_for(&c, "out", 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out2 = read_all(&c, "out", 0).await;
    assert_eq!(
        (out.len(), out2.len()),
        (1, 1),
        "the paused lane was processed"
    );
    assert_eq!(value(&out2[0]), "a1");
    run.stop().await;
    // Restarted: still paused.
    let run = start(&c, cfg);
    produce(&c, "alerts", &["a2".into()]).await;
    let out = wait_for(&c, "out", 2, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        read_all(&c, "out", 0).await.len(),
        2,
        "paused lane processed after a restart"
    );
    assert_eq!(value(&out[1]), "a2");
    // Resume (a tombstone): the waiting record goes through.
    let mut tomb = ProducerRecord::default().key(key);
    tomb.value = None;
    p.send_to(&control, 0, tomb).await.unwrap().await.unwrap();
    p.close().await;
    let out = wait_for(&c, "out", 3, Duration::from_secs(10)).await;
    assert_eq!(out.len(), 3);
    assert_eq!(value(&out[2]), "c1");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_redrive_back_and_a_stuck_partition_can_be_skipped() {
    use spool_processor::ops;
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "work", 1).await;
    create(&c, "out", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("fixer", &["work"], dir.path());
    cfg.retry = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    let run = start(&c, cfg.clone());
    let until = spool_processor::SystemClock.now_ms() + 1_500;
    produce(&c, "work", &[format!("bad-until-{until}"), "ok".into()]).await;
    let dl = wait_for(&c, "work.fixer.dlq", 1, Duration::from_secs(10)).await;
    assert_eq!(dl.len(), 1);
    assert_eq!(
        wait_for(&c, "out", 1, Duration::from_secs(10)).await.len(),
        1
    );
    let listed = ops::dlq_topics(&c, Some("fixer")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].topic, "work.fixer.dlq");
    assert_eq!(
        (listed[0].records, listed[0].complete),
        (1, true),
        "{listed:?}"
    );
    let shown = ops::read_dead_letters(&c, "work.fixer.dlq", None, 10)
        .await
        .unwrap();
    assert_eq!(shown[0].source_offset, Some(0));
    assert_eq!(shown[0].error.as_deref(), Some("not yet"));
    // The cause goes away; redrive (dry run first) sends it back and it is processed.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let dry = ops::redrive(
        &c,
        "work.fixer.dlq",
        &ops::RedriveOptions {
            dry_run: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((dry.read, dry.sent), (1, 1));
    assert_eq!(
        read_all(&c, "work", 0).await.len(),
        2,
        "a dry run sends nothing"
    );
    let filtered = ops::redrive(
        &c,
        "work.fixer.dlq",
        &ops::RedriveOptions {
            error_contains: Some("other".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(filtered.sent, 0);
    let report = ops::redrive(
        &c,
        "work.fixer.dlq",
        &ops::RedriveOptions {
            rate_per_sec: Some(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.sent, 1);
    let out = wait_for(&c, "out", 2, Duration::from_secs(10)).await;
    assert_eq!(
        value(&out[1]),
        format!("bad-until-{until}"),
        "the redriven record was processed"
    );
    run.stop().await;

    // A partition stuck retrying in place (forever) is unblocked by a skip.
    let mut cfg = cfg;
    cfg.retry = RetryPolicy {
        max_attempts: 0,
        initial_backoff_ms: 50,
        max_backoff_ms: 100,
        ..RetryPolicy::default()
    };
    let run = start(&c, cfg);
    produce(&c, "work", &["bad-forever".into(), "after".into()]).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        read_all(&c, "out", 0).await.len(),
        2,
        "the partition should be stuck"
    );
    let stuck_at = read_all(&c, "work", 0)
        .await
        .iter()
        .find(|r| value(r) == "bad-forever")
        .unwrap()
        .offset;
    ops::skip(&c, "fixer", "work", 0, stuck_at, "poison record")
        .await
        .unwrap();
    let out = wait_for(&c, "out", 3, Duration::from_secs(10)).await;
    assert_eq!(value(&out[2]), "after");
    let dl = wait_for(&c, "work.fixer.dlq", 2, Duration::from_secs(10)).await;
    let d = ops::DeadLetter::from_record(dl[1].clone());
    assert_eq!(d.source_offset, Some(stuck_at));
    assert!(
        d.history.last().unwrap().reason.contains("skipped"),
        "{:?}",
        d.history
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skip_during_the_wait_dead_letters_without_calling_the_handler_again() {
    use spool_processor::ops;
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "work", 1).await;
    create(&c, "out", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("skipper", &["work"], dir.path());
    // The first attempt fails; the second would succeed, 5 s later.
    cfg.retry = RetryPolicy {
        max_attempts: 0,
        initial_backoff_ms: 5_000,
        max_backoff_ms: 5_000,
        ..RetryPolicy::default()
    };
    let run = start(&c, cfg);
    produce(
        &c,
        "work",
        &["ok".into(), "flaky-1-x".into(), "after".into()],
    )
    .await;
    assert_eq!(
        wait_for(&c, "out", 1, Duration::from_secs(10)).await.len(),
        1
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    ops::skip(&c, "skipper", "work", 0, 1, "operator gave up")
        .await
        .unwrap();
    let dl = wait_for(&c, "work.skipper.dlq", 1, Duration::from_secs(4)).await;
    assert_eq!(dl.len(), 1, "dead-lettered during the wait");
    let d = ops::DeadLetter::from_record(dl[0].clone());
    assert_eq!(d.source_offset, Some(1));
    let reasons: Vec<&str> = d.history.iter().map(|a| a.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0], "flaky attempt 1");
    assert!(reasons[1].contains("operator gave up"), "{reasons:?}");
    let out = wait_for(&c, "out", 2, Duration::from_secs(10)).await;
    let values: Vec<String> = out.iter().map(value).collect();
    assert_eq!(
        values,
        vec!["ok", "after"],
        "the skipped record was not handled again"
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_redriven_to_a_retry_topic_keeps_its_original_position() {
    use spool_processor::ops;
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "work", 1).await;
    create(&c, "out", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("redriver", &["work"], dir.path());
    cfg.retry = RetryPolicy {
        mode: RetryMode::Topics,
        max_attempts: 1,
        topic_delays_ms: vec![100],
        ..RetryPolicy::default()
    };
    let run = start(&c, cfg);
    let until = spool_processor::SystemClock.now_ms() + 1_500;
    // Offset 2 in `work`; the retry topic is empty, so its first record is at offset 0.
    produce(
        &c,
        "work",
        &["ok-0".into(), "ok-1".into(), format!("bad-until-{until}")],
    )
    .await;
    let dl = wait_for(&c, "work.redriver.dlq", 1, Duration::from_secs(10)).await;
    assert_eq!(
        ops::DeadLetter::from_record(dl[0].clone()).source_offset,
        Some(2)
    );
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let report = ops::redrive(
        &c,
        "work.redriver.dlq",
        &ops::RedriveOptions {
            target: ops::RedriveTarget::Retry,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.per_topic["work.redriver.retry-1"], 1);
    let retried = read_all(&c, "work.redriver.retry-1", 0).await;
    assert_eq!(header(&retried[0], headers::RETRY_OFFSET), Some("2"));
    assert_eq!(header(&retried[0], headers::RETRY_TOPIC), Some("work"));
    assert_eq!(header(&retried[0], headers::RETRY_ATTEMPT), Some("1"));
    assert_eq!(header(&retried[0], headers::RETRY_DUE), Some("0"));
    let out = wait_for(&c, "out", 3, Duration::from_secs(10)).await;
    assert_eq!(value(&out[2]), format!("bad-until-{until}"));
    assert_eq!(
        (header(&out[2], "offset"), header(&out[2], "attempt")),
        (Some("2"), Some("1")),
        "the handler sees the original offset, as a first attempt"
    );
    run.stop().await;
}

/// Sets a wall timer per input (key = the value, due 100 ms later for "fail…" values,
/// 400 ms for others); `on_timer` fails with a retry for "fail…" keys and copies the others
/// to `out`.
struct TimerSetter;

impl Handler for TimerSetter {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let key = input.value.clone().unwrap_or_default();
        let delay = if key.starts_with(b"fail") { 100 } else { 400 };
        let at = ctx.now_ms() + delay;
        ctx.set_timer(TimerKind::Wall, &key, at, "")?;
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, t: &Timer) -> Result<(), Failure> {
        if t.key.starts_with(b"fail") {
            return Err(Failure::retry(format!("attempt {} failed", t.attempt)));
        }
        ctx.emit_to("out", 0, ProducerRecord::new(t.key.clone()));
        Ok(())
    }
}

fn counter(metrics: &Metrics, name: &str) -> u64 {
    let line = metrics
        .render()
        .lines()
        .find(|l| l.starts_with(name))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no {name}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_timer_does_not_hold_up_later_timers_and_is_dropped_after_its_attempts() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "work", 1).await;
    create(&c, "out", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("timers", &["work"], dir.path());
    cfg.retry = RetryPolicy {
        timer_max_attempts: 3,
        initial_backoff_ms: 500,
        max_backoff_ms: 500,
        ..RetryPolicy::default()
    };
    let metrics = Arc::new(Metrics::new());
    let run = start_handler(&c, cfg, TimerSetter, metrics.clone());
    produce(&c, "work", &["fail-a".into(), "b".into()]).await;
    // b is due 300 ms after fail-a, which fails meanwhile and keeps failing.
    let out = wait_for(&c, "out", 1, Duration::from_secs(10)).await;
    assert_eq!(out.len(), 1, "the later timer fired");
    assert_eq!(value(&out[0]), "b");
    // Attempts at +0, +~500 and +~1000 ms (±20%), then dropped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&metrics, "spool_processor_timers_dropped_total") == 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counter(&metrics, "spool_processor_timers_dropped_total"), 1);
    assert_eq!(counter(&metrics, "spool_processor_timer_retries_total"), 2);
    assert_eq!(counter(&metrics, "spool_processor_timers_fired_total"), 1);
    // Nothing more: no retry every tick.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(counter(&metrics, "spool_processor_timer_retries_total"), 2);
    run.stop().await;
}
