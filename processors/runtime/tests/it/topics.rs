//! The runtime's topics against the real `spoold`, with the runtime in-process:
//! - an input that gains partitions while the processor runs, or while it is stopped, has
//!   its changelog, dead-letter and retry topics grown to match, and the new partitions are
//!   processed (the restore of a new partition used to read a changelog partition that did
//!   not exist: a fatal error, on every restart);
//! - an output the broker would refuse (unknown topic, partition out of range, over the
//!   topic's `max_message_bytes`) fails its own input, which is retried and dead-lettered
//!   with the reason, while the rest is processed without an abort (it used to abort and
//!   rewind every transaction, forever);
//! - a write refused for good after its check passed (the topic deleted since) stops the
//!   processor with an error naming the topic instead of rewinding forever;
//! - internal topics that do not fit the inputs (short without `allow_input_growth`, a retry
//!   topic larger than its input) stop it as `Misconfigured`, and its binary exits 6.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spool_client::{Client, ProducerConfig, ProducerRecord, Record, TopicSettings};
use spool_processor::engine::headers;
use spool_processor::metrics::Metrics;
use spool_processor::runtime::{self, RuntimeConfig};
use spool_processor::{Context, Failure, Handler, Input, RetryMode, RetryPolicy, RuntimeError};
use spool_testkit::Broker;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{create, read_all};

/// Counts inputs per key in a store and copies each to `out`/0 as `value|count`. A value
/// `to:TOPIC:PARTITION` is emitted there instead; `huge` emits a 100 KiB value to `out`.
struct Router;

impl Handler for Router {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let v = String::from_utf8_lossy(input.value.as_deref().unwrap_or_default()).to_string();
        let key = input.key.clone().unwrap_or_default();
        let mut store = ctx
            .store("counts")
            .map_err(|e| Failure::fatal(e.to_string()))?;
        let n = store
            .get(&key)
            .map_err(|e| Failure::fatal(e.to_string()))?
            .map_or(0, |b| u64::from_be_bytes(b[..8].try_into().unwrap()))
            + 1;
        store.put(&key, n.to_be_bytes().to_vec());
        if let Some(to) = v.strip_prefix("to:") {
            let (topic, partition) = to.rsplit_once(':').unwrap();
            ctx.emit_to(
                topic,
                partition.parse().unwrap(),
                ProducerRecord::new(v.clone()),
            );
        } else if v == "huge" {
            ctx.emit_to("out", 0, ProducerRecord::new(vec![b'x'; 100 << 10]));
        } else {
            ctx.emit_to("out", 0, ProducerRecord::new(format!("{v}|{n}")));
        }
        Ok(())
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), RuntimeError>>,
    metrics: Arc<Metrics>,
}

impl Running {
    fn start(client: &Client, cfg: RuntimeConfig) -> Running {
        let metrics = Arc::new(Metrics::new());
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(runtime::run(
            client.clone(),
            cfg,
            Router,
            metrics.clone(),
            rx,
        ));
        Running {
            stop,
            task,
            metrics,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let r = tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("stops in time")
            .expect("joins");
        r.expect("clean stop");
    }

    /// `spool_processor_aborts_total`.
    fn aborts(&self) -> u64 {
        let text = self.metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix("spool_processor_aborts_total "))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

fn config(dir: &std::path::Path) -> RuntimeConfig {
    let mut c = RuntimeConfig::new("g", ["in"]);
    c.state_dir = dir.join("state");
    c.commit_interval = Duration::from_millis(20);
    c.tick_interval = Duration::from_millis(20);
    // Wide enough that a loaded machine's missed heartbeat does not change the owned
    // partitions mid-test (that clears the output metadata the third test relies on).
    c.session_timeout = Duration::from_secs(6);
    c
}

async fn produce_to(client: &Client, topic: &str, partition: u32, values: &[&str]) {
    let p = client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..ProducerConfig::default()
    });
    let mut futs = Vec::new();
    for v in values {
        let r = ProducerRecord::new(v.to_string()).key(format!("k{partition}"));
        futs.push(p.send_to(topic, partition, r).await.unwrap());
    }
    p.close().await;
    for f in futs {
        f.await.unwrap();
    }
}

fn value(r: &Record) -> String {
    String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).to_string()
}

fn header<'a>(r: &'a Record, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .rev()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value.as_deref()?).ok())
}

/// Waits until `topic`/0 has at least `n` committed records, or 30 s, or `run` ends.
async fn wait_for(client: &Client, run: &Running, topic: &str, n: usize) -> Vec<Record> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = if client.describe_topic(topic).await.is_ok() {
            read_all(client, topic, 0).await
        } else {
            Vec::new()
        };
        if got.len() >= n || Instant::now() > deadline || run.task.is_finished() {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn partitions(client: &Client, topic: &str) -> usize {
    client.describe_topic(topic).await.unwrap().partitions.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_that_gains_partitions_grows_the_internal_topics_and_is_processed() {
    crate::trace();
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", 2).await;
    create(&c, "out", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.retry = RetryPolicy {
        mode: RetryMode::Topics,
        topic_delays_ms: vec![100],
        ..RetryPolicy::default()
    };
    cfg.allow_input_growth = true;
    let run = Running::start(&c, cfg.clone());
    produce_to(&c, "in", 0, &["a"]).await;
    produce_to(&c, "in", 1, &["b"]).await;
    assert_eq!(wait_for(&c, &run, "out", 2).await.len(), 2);

    // Grown while it runs: the group hands out partitions 2 and 3, whose restores need
    // changelog partitions 2 and 3.
    c.add_partitions("in", 4).await.unwrap();
    produce_to(&c, "in", 3, &["c", "c"]).await;
    let out = wait_for(&c, &run, "out", 4).await;
    assert!(
        !run.task.is_finished(),
        "the processor stopped: {:?}",
        run.task.await
    );
    let mut got: Vec<String> = out.iter().map(value).collect();
    got.sort();
    assert_eq!(got, ["a|1", "b|1", "c|1", "c|2"], "partition 3 processed");
    for t in ["g.changelog", "in.g.dlq", "in.g.retry-1"] {
        assert_eq!(partitions(&c, t).await, 4, "{t} grown to the input's 4");
    }
    run.stop().await;

    // Grown while it is stopped: the start grows the internal topics before joining.
    c.add_partitions("in", 6).await.unwrap();
    let run = Running::start(&c, cfg);
    produce_to(&c, "in", 5, &["d"]).await;
    produce_to(&c, "in", 3, &["c"]).await;
    let out = wait_for(&c, &run, "out", 6).await;
    assert!(
        !run.task.is_finished(),
        "the processor stopped: {:?}",
        run.task.await
    );
    let mut got: Vec<String> = out.iter().map(value).collect();
    got.sort();
    assert_eq!(
        got,
        ["a|1", "b|1", "c|1", "c|2", "c|3", "d|1"],
        "partition 5 processed, partition 3's state kept"
    );
    for t in ["g.changelog", "in.g.dlq", "in.g.retry-1"] {
        assert_eq!(partitions(&c, t).await, 6, "{t} grown to the input's 6");
    }
    run.stop().await;
}

/// Without `allow_input_growth` an input that gains partitions stops the processor, naming
/// the remedy, before anything is grown (keyed state would not follow its keys): while it
/// runs, and again at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_that_gains_partitions_stops_a_processor_that_did_not_allow_it() {
    crate::trace();
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", 2).await;
    create(&c, "out", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let run = Running::start(&c, cfg.clone());
    produce_to(&c, "in", 1, &["b"]).await;
    assert_eq!(wait_for(&c, &run, "out", 1).await.len(), 1);
    c.add_partitions("in", 3).await.unwrap();
    produce_to(&c, "in", 2, &["c"]).await;
    // Stops while it runs, then again at a start. (Each `Running` is kept: dropping its stop
    // sender would end the runtime's shutdown watch.)
    let mut runs = vec![run];
    for i in 0..2 {
        if i == 1 {
            runs.push(Running::start(&c, cfg.clone()));
        }
        let task = &mut runs[i].task;
        let ended = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the processor stops")
            .expect("joins");
        match ended {
            Err(RuntimeError::Misconfigured(msg)) => {
                assert!(
                    msg.contains("allow_input_growth"),
                    "names the remedy: {msg}"
                );
                assert!(msg.contains("g.changelog has 2 of 3"), "{msg}");
            }
            other => panic!("expected a misconfiguration, got {other:?}"),
        }
    }
    assert_eq!(partitions(&c, "g.changelog").await, 2, "nothing grown");
    assert_eq!(partitions(&c, "in.g.dlq").await, 2, "nothing grown");
}

fn with_retry_topic(mut cfg: RuntimeConfig) -> RuntimeConfig {
    cfg.retry = RetryPolicy {
        mode: RetryMode::Topics,
        topic_delays_ms: vec![100],
        ..RetryPolicy::default()
    };
    cfg
}

/// A retry topic made by hand with more partitions than the changelog (here: than its only
/// input) stops the processor at its start, naming both (the group reads the retry topic: its
/// extra partitions would be assigned to tasks whose changelog partitions do not exist, a
/// fatal restore).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_topic_larger_than_its_input_stops_the_processor_naming_both() {
    crate::trace();
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", 2).await;
    create(&c, "in.g.retry-1", 4).await;
    let dir = tempfile::tempdir().unwrap();
    let run = Running::start(&c, with_retry_topic(config(dir.path())));
    let ended = tokio::time::timeout(Duration::from_secs(30), run.task)
        .await
        .expect("the processor stops")
        .expect("joins");
    match ended {
        Err(RuntimeError::Misconfigured(msg)) => {
            assert!(
                msg.contains("in.g.retry-1 has 4 partitions")
                    && msg.contains("more than the changelog's 2")
                    && msg.contains("its input in has 2"),
                "names both: {msg}"
            );
        }
        other => panic!("expected a misconfiguration, got {other:?}"),
    }
    assert_eq!(partitions(&c, "in.g.retry-1").await, 4, "left as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_output_fails_its_input_into_the_dead_letter_topic_and_the_rest_goes_on() {
    crate::trace();
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", 1).await;
    let small = TopicSettings {
        max_message_bytes: Some(64 << 10),
        ..TopicSettings::default()
    };
    c.create_topic("out", 1, &small).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.retry = RetryPolicy {
        max_attempts: 2,
        initial_backoff_ms: 10,
        max_backoff_ms: 10,
        ..RetryPolicy::default()
    };
    let run = Running::start(&c, cfg);
    produce_to(
        &c,
        "in",
        0,
        &["a", "to:nope:0", "b", "to:out:7", "c", "huge", "d"],
    )
    .await;
    let out = wait_for(&c, &run, "out", 4).await;
    let dl = wait_for(&c, &run, "in.g.dlq", 3).await;
    assert!(
        !run.task.is_finished(),
        "the processor stopped: {:?}",
        run.task.await
    );
    let got: Vec<String> = out.iter().map(value).collect();
    assert_eq!(
        got,
        ["a|1", "b|2", "c|3", "d|4"],
        "the good inputs are processed in order; a failed one's state write is not kept"
    );
    let letters: Vec<(String, String)> = dl
        .iter()
        .map(|r| {
            let why = header(r, headers::DLQ_ERROR).unwrap_or_default().to_owned();
            (value(r), why)
        })
        .collect();
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert_eq!(letters[0].0, "to:nope:0");
    assert!(
        letters[0].1.contains("\"nope\" does not exist"),
        "{letters:?}"
    );
    assert_eq!(letters[1].0, "to:out:7");
    assert!(letters[1].1.contains("partition 7"), "{letters:?}");
    assert_eq!(letters[2].0, "huge");
    assert!(letters[2].1.contains("max_message_bytes"), "{letters:?}");
    for l in &dl {
        assert_eq!(header(l, headers::DLQ_ATTEMPTS), Some("2"), "retried first");
    }
    assert_eq!(run.aborts(), 0, "no transaction aborted");
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_after_its_check_stops_the_processor_naming_the_topic() {
    crate::trace();
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", 1).await;
    create(&c, "out", 1).await;
    create(&c, "gone", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let run = Running::start(&c, config(dir.path()));
    produce_to(&c, "in", 0, &["to:gone:0"]).await;
    assert_eq!(wait_for(&c, &run, "gone", 1).await.len(), 1);
    // Deleted after the check cached it (for up to a minute): the next write to it fails.
    c.delete_topic("gone").await.unwrap();
    produce_to(&c, "in", 0, &["to:gone:0"]).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), run.task)
        .await
        .expect("the processor stops instead of rewinding forever")
        .expect("joins");
    match ended {
        Err(RuntimeError::Fatal(msg)) => {
            assert!(msg.contains("gone"), "names the topic: {msg}");
        }
        other => panic!("expected a fatal error, got {other:?}"),
    }
}

/// A processor binary stopped for a misconfiguration (here an input that gained partitions
/// without `allow_input_growth`) exits with `MISCONFIGURED_EXIT_CODE` (6), which the systemd
/// unit's `RestartPreventExitStatus=3 6` keeps from being restarted into the same stop every
/// 2 s until systemd's start limit; it used to exit 1, as any failure does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_processor_binary_exits_with_its_own_status() {
    let (broker, c) = crate::passthrough_broker(2).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::write_config(
        dir.path(),
        "passthrough",
        "name = \"passthrough\"\ninputs = [\"in\"]\noutputs = [\"out\"]\n[app]\noutput = \"out\"\n",
    );
    let state = dir.path().join("state");
    let mut first = crate::Proc::passthrough(&cfg, &broker.addr(), "p0", &state);
    assert!(first.wait_ready(Duration::from_secs(30)), "never got ready");
    assert!(first.terminate(Duration::from_secs(20)), "clean exit");
    c.add_partitions("in", 3).await.unwrap();
    let mut second = crate::Proc::passthrough(&cfg, &broker.addr(), "p0", &state);
    let code = second.wait_exit(Duration::from_secs(30));
    let errors = second.errors();
    assert_eq!(
        code,
        Some(spool_processor::app::MISCONFIGURED_EXIT_CODE),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.contains("misconfigured") && l.contains("allow_input_growth")),
        "says why: {errors:?}"
    );
}
