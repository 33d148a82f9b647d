//! `spool processor list | pause | resume` and `spool dlq list | show (inspect) | redrive |
//! skip` against a real spoold, with a processor of the runtime running in this process:
//! each command's effect is checked on the processor's outputs, not only on what the command
//! prints.

#[allow(unreachable_pub)] // common's helpers are pub for the test files that use them
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Broker, spool, spool_in};
use serde_json::Value;
use spool_client::{Client, FetchOptions, Isolation, ProducerRecord};
use spool_processor::metrics::Metrics;
use spool_processor::runtime::{self, RuntimeConfig};
use spool_processor::{Context, Failure, Handler, Input, RetryPolicy};
use tokio::sync::watch;

/// Copies inputs to `out`. `bad…` is dead-lettered until `fixed` is set; `stuck…` fails
/// forever (retried in place until an operator skips it).
struct Fixer {
    fixed: Arc<AtomicBool>,
}

impl Handler for Fixer {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let v = String::from_utf8_lossy(input.value.as_deref().unwrap_or_default()).to_string();
        if v.starts_with("bad") && !self.fixed.load(Ordering::SeqCst) {
            return Err(Failure::dead_letter("bad input: not fixed yet"));
        }
        if v.starts_with("stuck") {
            return Err(Failure::retry("stuck forever"));
        }
        ctx.emit_to("out", 0, ProducerRecord::new(v));
        Ok(())
    }
}

fn json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn produce(b: &Broker, values: &[&str]) {
    let lines: String = values
        .iter()
        .map(|v| format!("{{\"value\":\"{v}\"}}\n"))
        .collect();
    spool_in(b, &["produce", "work/0", "--json"], lines.as_bytes()).ok();
}

/// The committed values of `topic` partition 0.
async fn values(c: &Client, topic: &str) -> Vec<(u64, String)> {
    let opts = FetchOptions {
        isolation: Isolation::ReadCommitted,
        ..FetchOptions::default()
    };
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let Ok(f) = c.fetch(topic, 0, offset, &opts).await else {
            return out;
        };
        for r in &f.records {
            let v = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).to_string();
            out.push((r.offset, v));
        }
        if f.records.is_empty() || f.next_offset <= offset {
            return out;
        }
        offset = f.next_offset;
    }
}

/// Waits (at most 15 s) until `topic` has `n` committed records, and returns their values.
fn wait_values(rt: &tokio::runtime::Runtime, c: &Client, topic: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = rt.block_on(values(c, topic));
        if got.len() >= n || Instant::now() > deadline {
            return got.into_iter().map(|(_, v)| v).collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `spool dlq list --json`'s entry for `topic`.
fn dlq_entry(b: &Broker, topic: &str) -> Value {
    let list = json(&spool(b, &["dlq", "list", "--json", "--group", "fixer"]).ok());
    list.as_array()
        .unwrap()
        .iter()
        .find(|d| d["topic"] == topic)
        .cloned()
        .unwrap_or_else(|| panic!("{topic} not listed: {list}"))
}

fn processor_row(b: &Broker) -> Value {
    let list = json(&spool(b, &["processor", "list", "--json", "--interval", "100ms"]).ok());
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "fixer")
        .cloned()
        .unwrap_or_else(|| panic!("fixer not listed: {list}"))
}

#[test]
fn operators_list_pause_resume_inspect_redrive_and_skip_through_the_cli() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "work"]).ok();
    spool(&b, &["topic", "create", "out"]).ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let c = rt.block_on(b.client());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = RuntimeConfig::new("fixer", ["work"]);
    cfg.state_dir = dir.path().to_owned();
    cfg.commit_interval = Duration::from_millis(20);
    cfg.tick_interval = Duration::from_millis(20);
    cfg.session_timeout = Duration::from_secs(1);
    cfg.retry = RetryPolicy {
        max_attempts: 0,
        initial_backoff_ms: 50,
        max_backoff_ms: 100,
        ..RetryPolicy::default()
    };
    let fixed = Arc::new(AtomicBool::new(false));
    let (stop, stop_rx) = watch::channel(false);
    let handler = Fixer {
        fixed: fixed.clone(),
    };
    let task = rt.spawn(runtime::run(
        c.clone(),
        cfg,
        handler,
        Arc::new(Metrics::new()),
        stop_rx,
    ));

    // Two dead letters, one good record.
    produce(&b, &["bad-1", "bad-2", "ok-1"]);
    assert_eq!(wait_values(&rt, &c, "out", 1), ["ok-1"]);
    assert_eq!(wait_values(&rt, &c, "work.fixer.dlq", 2).len(), 2);

    // list counts records, not offsets (each transaction's commit marker takes one too).
    let listed = dlq_entry(&b, "work.fixer.dlq");
    assert_eq!(listed["records"], 2, "{listed}");
    let table = spool(&b, &["dlq", "list"]).ok();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("work.fixer.dlq") && l.split_whitespace().nth(1) == Some("2")),
        "{table}"
    );

    // show / inspect: where each came from, why, how often it was tried.
    let shown: Vec<Value> = spool(&b, &["dlq", "inspect", "work.fixer.dlq", "--json"])
        .ok()
        .lines()
        .map(json)
        .collect();
    assert_eq!(shown.len(), 2);
    for (i, d) in shown.iter().enumerate() {
        assert_eq!(d["value"], format!("bad-{}", i + 1));
        assert_eq!(d["topic"], "work");
        assert_eq!(d["source_partition"], 0);
        assert_eq!(d["source_offset"], i);
        assert_eq!(d["group"], "fixer");
        assert_eq!(d["attempts"], 1);
        assert_eq!(d["error"], "bad input: not fixed yet");
    }
    let table = spool(&b, &["dlq", "show", "work.fixer.dlq"]).ok();
    assert!(table.contains("work/0@1"), "{table}");

    // processor list: the processor, its progress, nothing paused.
    let row = processor_row(&b);
    assert_eq!(row["done"], 3, "{row}");
    assert_eq!(row["lag"], 0, "{row}");
    assert_eq!(row["paused"], false, "{row}");

    // pause: nothing more is processed until resume.
    spool(&b, &["processor", "pause", "fixer"]).ok();
    assert_eq!(processor_row(&b)["paused"], true);
    std::thread::sleep(Duration::from_millis(300));
    produce(&b, &["ok-2"]);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        rt.block_on(values(&c, "out")).len(),
        1,
        "paused, yet processed"
    );
    assert_eq!(processor_row(&b)["lag"], 1);
    spool(&b, &["processor", "resume", "fixer"]).ok();
    assert_eq!(wait_values(&rt, &c, "out", 2), ["ok-1", "ok-2"]);

    // The same for one lane (inputs in no configured lane form a lane named after the topic).
    spool(&b, &["processor", "pause", "fixer", "--lane", "work"]).ok();
    let row = processor_row(&b);
    assert_eq!(row["paused_lanes"], serde_json::json!(["work"]), "{row}");
    std::thread::sleep(Duration::from_millis(300));
    produce(&b, &["ok-3"]);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        rt.block_on(values(&c, "out")).len(),
        2,
        "lane paused, yet processed"
    );
    spool(&b, &["processor", "resume", "fixer", "--lane", "work"]).ok();
    assert_eq!(wait_values(&rt, &c, "out", 3).len(), 3);
    assert_eq!(processor_row(&b)["paused_lanes"], serde_json::json!([]));

    // redrive: a dry run and a filter that matches nothing send nothing; then the cause is
    // fixed and both go back to their source partition and through the processor.
    fixed.store(true, Ordering::SeqCst);
    let work_before = rt.block_on(values(&c, "work")).len();
    let dry = json(&spool(&b, &["dlq", "redrive", "work.fixer.dlq", "--dry-run"]).ok());
    assert_eq!(
        (dry["read"].clone(), dry["sent"].clone()),
        (2.into(), 2.into())
    );
    let none = json(
        &spool(
            &b,
            &[
                "dlq",
                "redrive",
                "work.fixer.dlq",
                "--error",
                "no such error",
            ],
        )
        .ok(),
    );
    assert_eq!(none["sent"], 0);
    assert_eq!(rt.block_on(values(&c, "work")).len(), work_before);
    let sent = json(&spool(&b, &["dlq", "redrive", "work.fixer.dlq", "--rate", "20"]).ok());
    assert_eq!(sent["sent"], 2, "{sent}");
    assert_eq!(sent["per_topic"]["work"], 2, "{sent}");
    let out = wait_values(&rt, &c, "out", 5);
    assert_eq!(out[3..], ["bad-1", "bad-2"]);

    // skip: a partition stuck retrying one record in place moves on; the record becomes a
    // dead letter saying so.
    produce(&b, &["stuck-1", "after-stuck"]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(rt.block_on(values(&c, "out")).len(), 5, "should be stuck");
    let stuck_at = rt
        .block_on(values(&c, "work"))
        .into_iter()
        .find(|(_, v)| v == "stuck-1")
        .unwrap()
        .0
        .to_string();
    spool(
        &b,
        &[
            "dlq", "skip", "fixer", "work", "0", &stuck_at, "--reason", "poison",
        ],
    )
    .ok();
    assert_eq!(wait_values(&rt, &c, "out", 6)[5], "after-stuck");
    assert_eq!(wait_values(&rt, &c, "work.fixer.dlq", 3).len(), 3);
    assert_eq!(dlq_entry(&b, "work.fixer.dlq")["records"], 3);
    let last = spool(&b, &["dlq", "show", "work.fixer.dlq", "--json"])
        .ok()
        .lines()
        .map(json)
        .next_back()
        .unwrap();
    assert_eq!(last["value"], "stuck-1");
    assert_eq!(last["source_offset"].to_string(), stuck_at);
    assert!(
        last["history"].to_string().contains("poison"),
        "{}",
        last["history"]
    );

    // Errors are clear: an unknown processor or dead-letter topic.
    let r = spool(&b, &["processor", "pause", "nobody"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("nobody"), "{}", r.stderr);
    let r = spool(&b, &["dlq", "show", "no.such.dlq"]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no.such.dlq"), "{}", r.stderr);

    stop.send(true).unwrap();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), task).await })
        .expect("stops in time")
        .expect("joins")
        .expect("clean stop");
}
