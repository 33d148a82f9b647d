//! The runtime against the real `spoold` (testkit) and the real processor binary
//! (`spool-passthrough`), on 127.0.0.1 with ephemeral ports.

mod cadence;
mod eos_kill;
mod flow;
mod redrive;
mod restore;
mod secure;
mod stop;
mod topics;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use spool_client::{Client, FetchOptions, Isolation, Record, TopicSettings};

/// Logs the runtime's tracing events to the test's output when `RUST_LOG` is set (e.g.
/// `RUST_LOG=spool_processor=debug` with `--nocapture`), to see where a slow run's time went.
pub(crate) fn trace() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Creates `topic` with `partitions` partitions.
pub(crate) async fn create(client: &Client, topic: &str, partitions: u32) {
    client
        .create_topic(topic, partitions, &TopicSettings::default())
        .await
        .unwrap_or_else(|e| panic!("creating {topic}: {e}"));
}

/// A fresh broker with the pass-through's topics `in` and `out`, `partitions` each.
pub(crate) async fn passthrough_broker(partitions: u32) -> (spool_testkit::Broker, Client) {
    let broker = spool_testkit::Broker::start();
    let c = broker.client().await;
    create(&c, "in", partitions).await;
    create(&c, "out", partitions).await;
    (broker, c)
}

/// Produces `n` inputs to `in` (values `v<i>`, keys `k<i % keys>`, `i` counting on from
/// `produced`), waits until every one is acknowledged, and appends them to `produced` in
/// produce order (what [`assert_passthrough_exactly_once`] checks against).
pub(crate) async fn produce_inputs(
    client: &Client,
    config: spool_client::ProducerConfig,
    n: usize,
    keys: usize,
    produced: &mut Vec<(String, String)>,
) {
    produce_padded_inputs(client, config, n, keys, 0, produced).await;
}

/// [`produce_inputs`] with `pad` bytes of `x` after each value (`v<i>-xxx…`).
pub(crate) async fn produce_padded_inputs(
    client: &Client,
    config: spool_client::ProducerConfig,
    n: usize,
    keys: usize,
    pad: usize,
    produced: &mut Vec<(String, String)>,
) {
    let producer = client.producer(config);
    let mut futs = Vec::new();
    let padding = if pad == 0 {
        String::new()
    } else {
        format!("-{}", "x".repeat(pad))
    };
    for _ in 0..n {
        let i = produced.len();
        let (key, value) = (format!("k{}", i % keys), format!("v{i}{padding}"));
        futs.push(
            producer
                .send(
                    "in",
                    spool_client::ProducerRecord::new(value.clone()).key(key.clone()),
                )
                .await
                .expect("send"),
        );
        produced.push((key, value));
    }
    producer.close().await;
    for f in futs {
        f.await.expect("delivered");
    }
}

/// Every record of a partition, read committed, once its last stable offset caught up.
pub(crate) async fn read_all(client: &Client, topic: &str, partition: u32) -> Vec<Record> {
    let mut out = Vec::new();
    let mut offset = 0;
    let settle = Instant::now() + Duration::from_secs(15);
    loop {
        let f = client
            .fetch(
                topic,
                partition,
                offset,
                &FetchOptions {
                    isolation: Isolation::ReadCommitted,
                    max_bytes: 4 << 20,
                    ..FetchOptions::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("fetching {topic}/{partition}: {e}"));
        if f.last_stable_offset < f.high_watermark && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        out.extend(f.records);
        if f.next_offset == offset {
            return out;
        }
        offset = f.next_offset;
    }
}

/// A processor binary run as a child process; SIGKILLed on drop.
pub(crate) struct Proc {
    child: Option<Child>,
    ready: mpsc::Receiver<()>,
    /// How many of its log lines said its producer was fenced.
    fenced: Arc<AtomicUsize>,
    /// Its lines that start with `Error:` (what the binary's `main` returned).
    errors: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `bin` with `--config config` and extra args, SPOOL_BROKER = `broker`.
    pub(crate) fn start(bin: &Path, config: &Path, broker: &str, args: &[&str]) -> Proc {
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SPOOL_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--config")
            .arg(config)
            .args(["--metrics-listen", "off"])
            .args(args)
            .env("SPOOL_BROKER", broker)
            .env(
                "SPOOL_LOG",
                std::env::var("SPOOL_TEST_PROCESSOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("piped");
        let (tx, ready) = mpsc::channel();
        let fenced = Arc::new(AtomicUsize::new(0));
        let fenced_lines = fenced.clone();
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let error_lines = errors.clone();
        let echo = std::env::var_os("SPOOL_TEST_PROCESSOR_LOG").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[processor] {line}");
                }
                if line.contains("producer fenced") {
                    fenced_lines.fetch_add(1, Ordering::Relaxed);
                }
                if line.starts_with("Error:") {
                    error_lines.lock().unwrap().push(line.clone());
                }
                if line.ends_with(" ready") {
                    let _ = tx.send(());
                }
            }
        });
        Proc {
            child: Some(child),
            ready,
            fenced,
            errors,
        }
    }

    /// Waits up to `timeout` for the process to exit by itself: its exit code (`None` if it
    /// still runs, or was killed by a signal).
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its `Error:` lines so far.
    pub(crate) fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Starts `spool-passthrough` with `config` as instance `instance_id` with its state
    /// under `state_dir`.
    pub(crate) fn passthrough(
        config: &Path,
        broker: &str,
        instance_id: &str,
        state_dir: &Path,
    ) -> Proc {
        let state = state_dir.to_str().expect("a UTF-8 path");
        let args = ["--instance-id", instance_id, "--state-dir", state];
        Proc::start(&passthrough_bin(), config, broker, &args)
    }

    /// Waits for the "NAME ready" line (state restored, in the group).
    pub(crate) fn wait_ready(&self, timeout: Duration) -> bool {
        self.ready.recv_timeout(timeout).is_ok()
    }

    /// How many times it logged that its transactional producer was fenced.
    pub(crate) fn fenced(&self) -> usize {
        self.fenced.load(Ordering::Relaxed)
    }

    /// Whether the process still runs (it has not exited by itself).
    pub(crate) fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends signal `sig` (`STOP`, `CONT`, …).
    pub(crate) fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// SIGKILL.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit; returns whether it exited 0.
    pub(crate) fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `spool-passthrough` binary cargo built for these tests.
pub(crate) fn passthrough_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spool-passthrough"))
}

/// Writes a processor config file.
pub(crate) fn write_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).expect("writing the config");
    p
}

/// xorshift64*, seeded (kill schedules).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Multiset difference for readable failures: (missing, extra).
fn diff(want: &[String], got: &[String]) -> (Vec<String>, Vec<String>) {
    let mut counts: BTreeMap<&String, i64> = BTreeMap::new();
    for w in want {
        *counts.entry(w).or_default() += 1;
    }
    for g in got {
        *counts.entry(g).or_default() -= 1;
    }
    let missing = counts
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(k, _)| (*k).clone())
        .collect();
    let extra = counts
        .iter()
        .filter(|(_, c)| **c < 0)
        .map(|(k, _)| (*k).clone())
        .collect();
    (missing, extra)
}

/// The pass-through processor's exactly-once check: from the `(key, value)` inputs in produce
/// order, the model says every input `v` of a key yields one output `v|n` (`n` = how many
/// inputs of that key so far); the outputs on `out`, read committed, must be exactly those
/// (none lost, none duplicated), each key's counts 1..n in output order. Returns the model's
/// per-key counts and how many outputs were read.
pub(crate) async fn assert_passthrough_exactly_once(
    client: &Client,
    produced: &[(String, String)],
    partitions: u32,
) -> (BTreeMap<String, u64>, usize) {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut want = Vec::new();
    for (k, v) in produced {
        let n = counts.entry(k.clone()).or_default();
        *n += 1;
        want.push(format!("{v}|{n}"));
    }
    let mut got = Vec::new();
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for part in 0..partitions {
        for r in read_all(client, "out", part).await {
            let v = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
            let k = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            let n: u64 = v.rsplit('|').next().unwrap().parse().unwrap();
            per_key.entry(k).or_default().push(n);
            got.push(v);
        }
    }
    let (missing, extra) = diff(&want, &got);
    assert!(
        missing.is_empty() && extra.is_empty(),
        "lost {} outputs (e.g. {:?}), duplicated {} (e.g. {:?})",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>()
    );
    for (k, ns) in &per_key {
        let expect: Vec<u64> = (1..=ns.len() as u64).collect();
        assert_eq!(ns, &expect, "counts of {k} in output order");
    }
    (counts, got.len())
}

/// Waits (up to 60 s) until group `passthrough` has committed every record of `in` that
/// exists now, on each of its `partitions`.
pub(crate) async fn wait_passthrough_caught_up(client: &Client, partitions: u32) {
    let tps: Vec<spool_client::TopicPartition> = (0..partitions)
        .map(|p| spool_client::TopicPartition::new("in", p))
        .collect();
    let mut ends = Vec::new();
    for part in 0..partitions {
        ends.push(
            client
                .list_offset("in", part, spool_client::OffsetSpec::Latest)
                .await
                .unwrap()
                .offset,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = match client.fetch_offsets("passthrough", &tps).await {
            Ok(committed) => committed
                .iter()
                .zip(&ends)
                .all(|(o, e)| o.offset == Some(*e)),
            Err(_) => false,
        };
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "the processors never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
