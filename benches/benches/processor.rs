//! The stream-processor runtime (issue 10) against a release `spoold` on the same machine,
//! 200-byte records, as `cargo bench -p spool-benches --bench processor`.
//!
//! Every figure of the list, each per rep, reps alternating so that machine noise
//! hits the compared cases alike:
//!
//! - **eos**: a stateless pass-through ([`spool_processor::runtime::run`] in this process,
//!   default settings: a transaction every 100 ms) copies `--records` records (200-byte
//!   values, 16-byte keys, over `--partitions` partitions) to an output topic. Records/s from
//!   the moment the processor is ready (in its group, state restored) until its committed
//!   offsets cover every input.
//! - **alo**: the same loop without transactions (at least once), in the same rep, right
//!   before or after eos: a `GroupConsumer` reads the same input, a plain (idempotent,
//!   acks = durable) `Producer` copies every record to the same partition of an output
//!   topic, and every 100 ms the loop flushes the producer and commits the consumer's
//!   positions. Same measurement window.
//! - **state**: the pass-through plus one state-store update per record (`put` of the
//!   record's value under its key; the keys are distinct, so the store ends with
//!   `--records` keys).
//! - **restart**: that processor stopped cleanly (SIGTERM's path), then started again on the
//!   same state directory: time from `run` to ready (producer fenced, control topic read,
//!   group joined, local stores opened and found complete).
//! - **restore**: the same with the state directory deleted: time to ready, and the
//!   changelog's size (`DescribeTopic`'s partition bytes) over that time.
//! - **lanes**: a high lane (priority 0) gets `--lane-rate` records/s, each carrying its send
//!   time, from a producer on a thread and runtime of its own (on the processor's runtime
//!   its sends waited behind the saturated processor's tasks); the handler measures the time
//!   from send to its call. Once with the low lane idle
//!   (an empty topic), once with the low lane saturated (a topic of its own filled with
//!   `--lane-records` records, default 4 M, read from its start by a new group). p50/p99 of
//!   each phase and the ratio of the p99s. A rep whose low lane ran dry before the phase
//!   ended (nothing left in it) measured nothing saturated: its ratio is reported INVALID
//!   and left out of the medians.
//! - **throttle**: a lane reading the `--records` input with `rate_per_sec = --throttle`:
//!   records done between 1 s and 11 s after ready, over 10 s, against the configured rate.
//! - **rss**: the release `spool-passthrough` binary, idle on an empty topic, VmRSS 3 s after
//!   it said ready.
//!
//! `SPOOL_BENCH_QUICK=1` (or running without `--bench`, as `cargo test --benches` does) runs
//! one short rep with 20 000 records. Flags: `--reps`, `--records`, `--partitions`,
//! `--lane-rate`, `--lane-secs`, `--lane-records`, `--throttle`, `--only eos,alo,...`, `--spoold PATH`,
//! `--passthrough PATH`, `--apply-bytes N` (the runtime's `apply_bytes`; 0 applies state to
//! the local store after every transaction, as before it was batched), `--linger-ms N` (the
//! runtime's `commit_linger`; 100 = the interval: commit on the interval only, the cadence
//! before the linger), `--interval-ms N` (the runtime's `commit_interval`, default 100), `--sync-commit` (the
//! runtime's `overlap_commits` off: the loop waits for every commit, as before they
//! overlapped). `SPOOL_BENCH_VERBOSE=1` prints each pass-through's latency and
//! commit metrics (sums and counts, and `loop_wait_seconds`: what the loop waited for)
//! after its phase, to see where the time went, and in the lanes case runs a plain
//! consumer of the high lane beside the processor (what the broker and the machine add) and
//! compares the two record by record.
//!
//! `--eos-variants a,b,...` runs the exactly-once case once per variant in every rep, the
//! variants and alo in an order rotated by one each rep, each variant's ratio to that rep's
//! alo reported on its own row (an A/B of runtime settings in one binary, one run). A
//! variant is `base` (the defaults and flags) or `+`-joined settings: `noyield` (the
//! runtime's `yield_every` off), `yield<N>us` (`yield_every` = N µs), `sync` (overlapping
//! commits off), `overlap` (on), `writes<N>` (the runtime's `output_writes_in_flight`).
//! `--lanes-variants a,b,...` runs
//! the lanes case (both phases) once per variant in every rep, in an order rotated each rep;
//! besides the parts above, `nolaneyield` (the runtime's `lane_yield` off: lower lanes do
//! not yield to active higher ones, priorities order records only), `lperiod<N>ms` and
//! `lwindow<N>ms` (the yield's period and active window). The lanes case also reports the
//! low lane's records/s in the saturated phase while the high lane sends and over 1 s from
//! 0.5 s after it stopped (the cost of the yield, and its end).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use spool_benches::inprocess::Running;
use spool_benches::spoold::{self, Spoold};
use spool_benches::{Stats, flag_value};
use spool_client::{
    Acks, Client, ConsumerConfig, GroupConfig, GroupConsumer, Polled, ProducerConfig,
    ProducerRecord, StartAt, TopicPartition, TopicSettings,
};
use spool_log_engine::{BatchBuilder, Compression};
use spool_processor::runtime::RuntimeConfig;
use spool_processor::{Context, Failure, Handler, Input, LaneConfig, LaneYield};

const VALUE_BYTES: usize = 200;

/// Copies every input to `out` (same partition, key, value, timestamp); with `state`, also
/// puts the value under the key in store `s`.
struct PassThrough {
    out: String,
    state: bool,
}

impl Handler for PassThrough {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        if self.state {
            let key = input.key.as_deref().unwrap_or_default();
            ctx.store("s")?
                .put(key, input.value.clone().unwrap_or_default());
        }
        let out = ProducerRecord {
            key: input.key.clone(),
            value: input.value.clone(),
            headers: Vec::new(),
            timestamp_ms: Some(input.timestamp_ms),
        };
        ctx.emit_to(self.out.as_str(), input.partition, out);
        Ok(())
    }
}

/// Records, for lane `hi`, the send time in the value (µs since the epoch, as text before a
/// `|`) and the time from it to the call (ms).
struct LaneProbe {
    latencies: Arc<Mutex<Vec<(u64, f64)>>>,
    /// Records of the other (low) lane handled.
    low: Arc<AtomicU64>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Handler for LaneProbe {
    fn handle(&mut self, _ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        if &*input.lane != "hi" {
            self.low.fetch_add(1, Ordering::Relaxed);
        } else {
            let v = input.value.as_deref().unwrap_or_default();
            let sent = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.split('|').next())
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(sent) = sent {
                let lat_ms = now_us().saturating_sub(sent) as f64 / 1000.0;
                self.latencies
                    .lock()
                    .expect("not poisoned")
                    .push((sent, lat_ms));
            }
        }
        Ok(())
    }
}

/// Appends `n` records (16-byte key, 200-byte value) round robin over the partitions, in
/// ~1 MiB batches, acks = durable.
async fn fill(client: &Client, topic: &str, partitions: u32, n: u64) -> Result<()> {
    let per_batch = 4096u64;
    let mut i = 0u64;
    let ts = 1_700_000_000_000;
    while i < n {
        let mut batches = Vec::new();
        for p in 0..partitions {
            let mut b = BatchBuilder::with_capacity(Compression::None, 1 << 20);
            let mut k = 0;
            while k < per_batch && i < n {
                // Keys spread over the key space (hashed), as real keys are.
                let key = format!("{:016x}", (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let mut value = format!("{i}-{p}|").into_bytes();
                value.resize(VALUE_BYTES, b'x');
                b.push(ts, Some(key.as_bytes()), Some(&value), &[]);
                i += 1;
                k += 1;
            }
            if k > 0 {
                batches.push((topic.to_owned(), p, b.finish()?));
            }
        }
        for r in client.produce_batches(batches, Acks::Durable).await? {
            r?;
        }
    }
    Ok(())
}

fn tps(topic: &str, partitions: u32) -> Vec<TopicPartition> {
    (0..partitions)
        .map(|p| TopicPartition::new(topic, p))
        .collect()
}

/// Sum of `group`'s committed offsets over `tps`.
async fn committed(client: &Client, group: &str, tps: &[TopicPartition]) -> Result<u64> {
    Ok(client
        .fetch_offsets(group, tps)
        .await?
        .iter()
        .filter_map(|c| c.offset)
        .sum())
}

/// Waits until `group` committed `n` offsets over `tps`; the time it took from `since`.
async fn wait_committed(
    client: &Client,
    group: &str,
    tps: &[TopicPartition],
    n: u64,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if committed(client, group, tps).await? >= n {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("group {group} did not commit {n} offsets within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Applies an `--eos-variants` variant to `c`.
fn apply_variant(c: &mut RuntimeConfig, variant: &str) -> Result<()> {
    for part in variant.split('+') {
        match part {
            "base" | "" => {}
            "noyield" => c.yield_every = None,
            "sync" => c.overlap_commits = false,
            "overlap" => c.overlap_commits = true,
            "nolaneyield" => c.lane_yield = None,
            p if p.starts_with("lperiod") && p.ends_with("ms") => {
                let ms: u64 = p["lperiod".len()..p.len() - 2]
                    .parse()
                    .with_context(|| format!("variant part {p:?}"))?;
                c.lane_yield.get_or_insert_with(LaneYield::default).period =
                    Duration::from_millis(ms);
            }
            p if p.starts_with("lwindow") && p.ends_with("ms") => {
                let ms: u64 = p["lwindow".len()..p.len() - 2]
                    .parse()
                    .with_context(|| format!("variant part {p:?}"))?;
                c.lane_yield
                    .get_or_insert_with(LaneYield::default)
                    .active_window = Duration::from_millis(ms);
            }
            p if p.starts_with("writes") => {
                c.output_writes_in_flight = p["writes".len()..]
                    .parse()
                    .with_context(|| format!("variant part {p:?}"))?;
            }
            p if p.starts_with("yield") && p.ends_with("us") => {
                let us: u64 = p["yield".len()..p.len() - 2]
                    .parse()
                    .with_context(|| format!("variant part {p:?}"))?;
                c.yield_every = Some(Duration::from_micros(us));
            }
            p => bail!(
                "unknown variant part {p:?} (base, noyield, yield<N>us, sync, overlap, writes<N>, nolaneyield, lperiod<N>ms, lwindow<N>ms)"
            ),
        }
    }
    Ok(())
}

fn processor_config(name: &str, inputs: &[&str], state_dir: &Path) -> RuntimeConfig {
    let mut c = RuntimeConfig::new(name, inputs.iter().copied());
    c.instance_id = "bench".into();
    c.state_dir = state_dir.join(name);
    let args: Vec<String> = std::env::args().collect();
    if let Some(b) = flag_value::<usize>(&args, "--apply-bytes") {
        c.apply_bytes = b;
    }
    if let Some(ms) = flag_value::<u64>(&args, "--linger-ms") {
        c.commit_linger = Duration::from_millis(ms);
    }
    if let Some(ms) = flag_value::<u64>(&args, "--interval-ms") {
        c.commit_interval = Duration::from_millis(ms);
    }
    if args.iter().any(|a| a == "--sync-commit") {
        c.overlap_commits = false;
    }
    c
}

/// A client of `addr` and the output topic `<name>-out` it created.
async fn with_output(addr: &str, name: &str, partitions: u32) -> Result<(Client, String)> {
    let client = Client::connect(addr.to_owned()).await?;
    let out = format!("{name}-out");
    client
        .create_topic(&out, partitions, &TopicSettings::default())
        .await?;
    Ok((client, out))
}

/// eos or state: records/s from ready to every offset committed (`variant`: see
/// `--eos-variants`).
#[allow(clippy::too_many_arguments)]
async fn pass_through(
    addr: &str,
    input: &str,
    partitions: u32,
    n: u64,
    name: &str,
    state: bool,
    dir: &Path,
    variant: &str,
) -> Result<f64> {
    let (client, out) = with_output(addr, name, partitions).await?;
    let mut cfg = processor_config(name, &[input], dir);
    apply_variant(&mut cfg, variant)?;
    let p = Running::start(&client, cfg, PassThrough { out, state });
    let t0 = p.ready(Duration::from_secs(60)).await?;
    let t1 = wait_committed(
        &client,
        name,
        &tps(input, partitions),
        n,
        Duration::from_secs(600),
    )
    .await?;
    if std::env::var_os("SPOOL_BENCH_VERBOSE").is_some() {
        eprintln!(
            "  {name}: {:.3} s from ready to committed",
            (t1 - t0).as_secs_f64()
        );
        print_metrics(name, &p.metrics.render());
    }
    p.stop().await?;
    Ok(n as f64 / (t1 - t0).as_secs_f64())
}

/// Prints the sums and counts of `metrics` (the Prometheus text) that say where the time
/// went; empty histogram rows are left out.
fn print_metrics(name: &str, metrics: &str) {
    for l in metrics.lines() {
        let wanted = l.contains("_sum") || l.contains("_count") || l.contains("commits_total");
        let empty = l.ends_with(" 0") || l.ends_with(" 0.0");
        if wanted && !(empty && l.contains("loop_wait")) {
            eprintln!("  {name}: {l}");
        }
    }
}

/// The same loop at least once: consume, produce, every 100 ms flush + commit.
async fn at_least_once(
    addr: &str,
    input: &str,
    partitions: u32,
    n: u64,
    name: &str,
) -> Result<f64> {
    let (client, out) = with_output(addr, name, partitions).await?;
    let producer = client.producer(ProducerConfig::default());
    let mut member = GroupConsumer::join(&client, GroupConfig::new(name, [input])).await?;
    let t0 = Instant::now();
    let mut done = 0u64;
    let mut last_commit = Instant::now();
    let mut pending = Vec::new();
    let interval = Duration::from_millis(100);
    loop {
        let polled = tokio::select! {
            p = member.poll() => Some(p),
            () = tokio::time::sleep_until((last_commit + interval).into()) => None,
        };
        match polled {
            Some(None) => bail!("the consumer ended"),
            Some(Some(Err(e))) => return Err(e.into()),
            Some(Some(Ok(Polled::Membership))) => member.poll_membership().await?,
            Some(Some(Ok(Polled::Record(r)))) => {
                let rec = ProducerRecord {
                    key: r.key,
                    value: r.value,
                    headers: Vec::new(),
                    timestamp_ms: Some(r.timestamp_ms),
                };
                pending.push(producer.send_to(&out, r.partition, rec).await?);
                done += 1;
            }
            None => {}
        }
        if last_commit.elapsed() >= interval || done == n {
            producer.flush().await;
            for f in pending.drain(..) {
                f.await?;
            }
            member.commit().await?;
            last_commit = Instant::now();
            if done == n {
                break;
            }
        }
    }
    let t1 = Instant::now();
    producer.close().await;
    member.leave().await?;
    Ok(n as f64 / (t1 - t0).as_secs_f64())
}

/// Starts the `state` processor again on `dir`; seconds to ready.
async fn restart(addr: &str, input: &str, name: &str, dir: &Path) -> Result<f64> {
    let client = Client::connect(addr.to_owned()).await?;
    let cfg = processor_config(name, &[input], dir);
    let p = Running::start(
        &client,
        cfg,
        PassThrough {
            out: format!("{name}-out"),
            state: true,
        },
    );
    let ready = p.ready(Duration::from_secs(600)).await?;
    let secs = (ready - p.started).as_secs_f64();
    p.stop().await?;
    Ok(secs)
}

/// Bytes of the `name` processor's changelog.
async fn changelog_bytes(addr: &str, name: &str) -> Result<u64> {
    let client = Client::connect(addr.to_owned()).await?;
    let d = client.describe_topic(&format!("{name}.changelog")).await?;
    Ok(d.partitions.iter().map(|p| p.size_bytes).sum())
}

/// One lanes phase: the processor's high-lane latencies (ms, warm-up left out), the records
/// left in the low lane at the end, and (with `SPOOL_BENCH_VERBOSE`) a plain consumer's p99
/// of the same records.
struct LanePhase {
    latencies: Vec<f64>,
    lo_lag: u64,
    plain_p99: Option<f64>,
    /// Low-lane records/s while the high lane was sending.
    lo_rate_active: f64,
    /// Low-lane records/s over 1 s starting 0.5 s after the high lane's last record.
    lo_rate_quiet: f64,
}

/// High-lane latencies with the low lane reading `low` (from its start, new group).
async fn lanes(
    addr: &str,
    low: &str,
    name: &str,
    rate: u32,
    secs: f64,
    dir: &Path,
    variant: &str,
) -> Result<LanePhase> {
    let client = Client::connect(addr.to_owned()).await?;
    let hi = format!("{name}-hi");
    client
        .create_topic(&hi, 1, &TopicSettings::default())
        .await?;
    let mut cfg = processor_config(name, &[hi.as_str(), low], dir);
    apply_variant(&mut cfg, variant)?;
    let lane = |n: &str, t: &str, priority| LaneConfig {
        name: n.into(),
        topics: vec![t.into()],
        priority,
        min_share: 0.1,
        rate_per_sec: None,
        burst: None,
        key_rate_per_sec: None,
        quiet_hours: Vec::new(),
    };
    cfg.lanes = vec![lane("hi", &hi, 0), lane("lo", low, 1)];
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let low_count = Arc::new(AtomicU64::new(0));
    let p = Running::start(
        &client,
        cfg,
        LaneProbe {
            latencies: latencies.clone(),
            low: low_count.clone(),
        },
    );
    p.ready(Duration::from_secs(60)).await?;
    // The high lane's producer (and, with SPOOL_BENCH_VERBOSE, a plain consumer of its topic
    // on a connection of its own: what the broker and the machine add without the processor)
    // run on a thread and runtime of their own, as another process would: on this runtime
    // they would wait behind the processor's tasks, and their delay would count as the
    // processor's.
    let verbose = std::env::var_os("SPOOL_BENCH_VERBOSE").is_some();
    let sched_before = thread_sched();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let (addr2, hi2, low2) = (addr.to_owned(), hi.clone(), low_count.clone());
    std::thread::spawn(move || {
        let r = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(drive_high_lane(addr2, hi2, rate, secs, verbose, low2)));
        let _ = done_tx.send(r);
    });
    let (sent, probe, lo_rate_active) =
        done_rx.await.context("the high lane's driver thread")??;
    // The low lane once the high lane is quiet (past the runtime's active window).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (n0, t0) = (low_count.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lo_rate_quiet =
        (low_count.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    if verbose {
        print_sched(name, &sched_before, &thread_sched());
    }
    // Let the last ones arrive.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (latencies.lock().expect("not poisoned").len() as u64) < sent && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lo_lag: u64 = {
        let d = client.describe_topic(low).await?;
        let end: u64 = d.partitions.iter().map(|p| p.high_watermark).sum();
        let all = tps(low, d.partitions.len() as u32);
        end.saturating_sub(committed(&client, name, &all).await?)
    };
    if std::env::var_os("SPOOL_BENCH_VERBOSE").is_some() {
        print_metrics(name, &p.metrics.render());
    }
    p.stop().await?;
    let mut l = latencies.lock().expect("not poisoned").clone();
    // The first tenth is warm-up (connections, first fetches).
    let skip = l.len() / 10;
    l.drain(..skip);
    let plain_p99 = probe.map(|mut plain| {
        plain.drain(..plain.len() / 10);
        compare_with_plain(name, &l, &plain)
    });
    Ok(LanePhase {
        latencies: l.into_iter().map(|(_, ms)| ms).collect(),
        lo_lag,
        plain_p99,
        lo_rate_active,
        lo_rate_quiet,
    })
}

/// Per thread of this process (by tid): its name, ns on a CPU and ns runnable but waiting
/// for one (`/proc/self/task/*/schedstat`).
fn thread_sched() -> std::collections::HashMap<u32, (String, u64, u64)> {
    let mut m = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return m;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
        let mut f = stat
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        let (cpu, wait) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        m.insert(tid, (comm.trim().to_owned(), cpu, wait));
    }
    m
}

/// Prints, per thread name, the CPU time and the time waiting for a CPU between two
/// [`thread_sched`] snapshots (threads that existed in both).
fn print_sched(
    name: &str,
    before: &std::collections::HashMap<u32, (String, u64, u64)>,
    after: &std::collections::HashMap<u32, (String, u64, u64)>,
) {
    let mut by_name: std::collections::BTreeMap<String, (u64, u64, usize)> =
        std::collections::BTreeMap::new();
    for (tid, (comm, cpu, wait)) in after {
        if let Some((_, cpu0, wait0)) = before.get(tid) {
            let e = by_name.entry(comm.clone()).or_default();
            e.0 += cpu.saturating_sub(*cpu0);
            e.1 += wait.saturating_sub(*wait0);
            e.2 += 1;
        }
    }
    let line: Vec<String> = by_name
        .iter()
        .filter(|(_, (cpu, _, _))| *cpu > 1_000_000)
        .map(|(n, (cpu, wait, k))| {
            format!(
                "{n} x{k}: on CPU {:.2} s, waiting for a CPU {:.2} s",
                *cpu as f64 / 1e9,
                *wait as f64 / 1e9
            )
        })
        .collect();
    eprintln!("  {name}: threads during the phase: {}", line.join("; "));
}

/// Prints what a plain consumer saw of the high lane's records beside the processor, and
/// for the processor's slowest 1 % of records what the plain consumer saw of the same ones
/// (slow in both: the broker or the machine; slow in the processor only: the processor).
/// Returns the plain consumer's p99.
fn compare_with_plain(name: &str, processor: &[(u64, f64)], plain: &[(u64, f64)]) -> f64 {
    let lat: Vec<f64> = plain.iter().map(|(_, ms)| *ms).collect();
    let p99 = percentile(&lat, 99.0);
    eprintln!(
        "  {name}: a plain consumer of the high lane: p50/p99 {:.2}/{p99:.2} ms ({} records)",
        percentile(&lat, 50.0),
        lat.len()
    );
    let by_sent: std::collections::HashMap<u64, f64> = plain.iter().copied().collect();
    let (Some(&(t0, _)), false) = (processor.first(), processor.is_empty()) else {
        return p99;
    };
    let mut added: Vec<f64> = processor
        .iter()
        .filter_map(|(sent, ms)| by_sent.get(sent).map(|p| ms - p))
        .collect();
    let mut slowest: Vec<(u64, f64)> = processor.to_vec();
    slowest.sort_by(|a, b| b.1.total_cmp(&a.1));
    slowest.truncate((processor.len() / 100).max(1));
    let line: Vec<String> = slowest
        .iter()
        .map(|(sent, ms)| {
            let at = sent.saturating_sub(t0) as f64 / 1e3;
            match by_sent.get(sent) {
                Some(p) => format!("{at:.0}ms:{ms:.1}/{p:.1}"),
                None => format!("{at:.0}ms:{ms:.1}/-"),
            }
        })
        .collect();
    if !added.is_empty() {
        added.sort_by(f64::total_cmp);
        eprintln!(
            "  {name}: processor minus plain consumer, same records: p50/p99/max {:.2}/{:.2}/{:.2} ms",
            percentile(&added, 50.0),
            percentile(&added, 99.0),
            added[added.len() - 1]
        );
    }
    eprintln!(
        "  {name}: slowest 1 % (sent at, after the first measured record: processor/plain ms): {}",
        line.join(" ")
    );
    p99
}

/// Sends `rate` records/s for `secs` to `hi` (each carrying its send time), after letting
/// the low lane get going; with `probe`, also reads them back with a plain consumer. The
/// records sent, the probe's latencies (ms), and the low lane's records/s (`low` counts
/// them) while sending.
async fn drive_high_lane(
    addr: String,
    hi: String,
    rate: u32,
    secs: f64,
    probe: bool,
    low: Arc<AtomicU64>,
) -> Result<(u64, Option<Vec<(u64, f64)>>, f64)> {
    let client = Client::connect(addr).await?;
    let probe = if probe {
        let mut consumer = client.consumer(ConsumerConfig::default());
        consumer.subscribe(&hi, 0, StartAt::Earliest).await?;
        Some(tokio::spawn(async move {
            let mut l = Vec::new();
            while let Ok(Some(Ok(r))) =
                tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
            {
                let v = r.value.as_deref().unwrap_or_default();
                if let Some(sent) = std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.split('|').next())
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    l.push((sent, now_us().saturating_sub(sent) as f64 / 1000.0));
                }
            }
            l
        }))
    } else {
        None
    };
    // Let the low lane get going.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let producer = client.producer(ProducerConfig {
        linger: Duration::ZERO,
        acks: Acks::Written,
        ..ProducerConfig::default()
    });
    let every = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let low_at_start = low.load(Ordering::Relaxed);
    let end = start + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    let mut acks = Vec::new();
    while Instant::now() < end {
        tick.tick().await;
        let v = format!("{}|", now_us());
        acks.push(
            producer
                .send_to(&hi, 0, ProducerRecord::new(v).key("h"))
                .await?,
        );
        sent += 1;
    }
    let low_rate =
        (low.load(Ordering::Relaxed) - low_at_start) as f64 / start.elapsed().as_secs_f64();
    for a in acks {
        a.await?;
    }
    producer.close().await;
    let probe = match probe {
        Some(p) => Some(p.await?),
        None => None,
    };
    Ok((sent, probe, low_rate))
}

/// Records/s of a lane throttled at `rate`, between 1 s and 11 s after ready.
async fn throttle(addr: &str, input: &str, name: &str, rate: u32, dir: &Path) -> Result<f64> {
    let client = Client::connect(addr.to_owned()).await?;
    let mut cfg = processor_config(name, &[input], dir);
    cfg.lanes = vec![LaneConfig {
        name: "t".into(),
        topics: vec![input.into()],
        priority: 0,
        min_share: 0.1,
        rate_per_sec: Some(rate),
        burst: None,
        key_rate_per_sec: None,
        quiet_hours: Vec::new(),
    }];
    let p = Running::start(
        &client,
        cfg,
        LaneProbe {
            latencies: Arc::default(),
            low: Arc::default(),
        },
    );
    let t0 = p.ready(Duration::from_secs(60)).await?;
    tokio::time::sleep_until((t0 + Duration::from_secs(1)).into()).await;
    let (a, ta) = (p.metrics.records_done(), Instant::now());
    tokio::time::sleep_until((ta + Duration::from_secs(10)).into()).await;
    let (b, tb) = (p.metrics.records_done(), Instant::now());
    p.stop().await?;
    Ok((b - a) as f64 / (tb - ta).as_secs_f64())
}

/// VmRSS (KiB) of the release `spool-passthrough`, idle, 3 s after ready.
fn idle_rss(bin: &Path, addr: &str, topic: &str, dir: &Path) -> Result<(u64, u64)> {
    let cfg = dir.join("idle.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"idle\"\ninputs = [\"{topic}\"]\noutputs = [\"idle-out\"]\ninstance_id = \"bench\"\nstate_dir = \"{}\"\n[app]\noutput = \"idle-out\"\n",
            dir.join("idle-state").display()
        ),
    )?;
    let mut child = std::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .args(["--metrics-listen", "off", "--broker", addr])
        .env("SPOOL_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        for line in BufReader::new(stderr)
            .lines()
            .map_while(std::io::Result::ok)
        {
            if line.ends_with(" ready") {
                let _ = tx.send(());
            }
        }
    });
    let r = (|| {
        rx.recv_timeout(Duration::from_secs(60))
            .context("spool-passthrough was not ready")?;
        std::thread::sleep(Duration::from_secs(3));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    })();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    r
}

fn percentile(v: &[f64], q: f64) -> f64 {
    Stats::new(v.to_vec()).percentile(q)
}

fn busy() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[derive(Clone, Default)]
struct LaneSamples {
    idle_p50: Vec<f64>,
    idle_p99: Vec<f64>,
    busy_p50: Vec<f64>,
    busy_p99: Vec<f64>,
    ratio: Vec<f64>,
    plain_idle_p99: Vec<f64>,
    plain_busy_p99: Vec<f64>,
    /// Low-lane records/s in the saturated phase while the high lane sent / once it was quiet.
    lo_active: Vec<f64>,
    lo_quiet: Vec<f64>,
}

#[derive(Default)]
struct Samples {
    /// Per `--eos-variants` variant (just `base` without it): eos records/s and eos ÷ alo.
    variants: Vec<String>,
    eos: Vec<Vec<f64>>,
    ratio: Vec<Vec<f64>>,
    alo: Vec<f64>,
    state: Vec<f64>,
    restart: Vec<f64>,
    restore_secs: Vec<f64>,
    restore_mbs: Vec<f64>,
    /// Per `--lanes-variants` variant.
    lane_variants: Vec<String>,
    lanes: Vec<LaneSamples>,
    throttle: Vec<f64>,
    throttle_err: Vec<f64>,
    rss: Vec<f64>,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = std::env::var("SPOOL_BENCH_QUICK").is_ok_and(|v| v == "1")
        || !args.iter().any(|a| a == "--bench");
    let reps: usize = flag_value(&args, "--reps").unwrap_or(if quick { 1 } else { 5 });
    let n: u64 = flag_value(&args, "--records").unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let partitions: u32 = flag_value(&args, "--partitions").unwrap_or(4);
    let lane_rate: u32 = flag_value(&args, "--lane-rate").unwrap_or(500);
    let lane_secs: f64 = flag_value(&args, "--lane-secs").unwrap_or(if quick { 1.0 } else { 6.0 });
    let lane_records: u64 =
        flag_value(&args, "--lane-records").unwrap_or(if quick { 200_000 } else { 4_000_000 });
    let throttle_rate: u32 = flag_value(&args, "--throttle").unwrap_or(10_000);
    let only: Option<String> = flag_value(&args, "--only");
    let variants: Vec<String> = flag_value::<String>(&args, "--eos-variants").map_or_else(
        || vec!["base".to_owned()],
        |v| v.split(',').map(str::to_owned).collect(),
    );
    let lane_variants: Vec<String> = flag_value::<String>(&args, "--lanes-variants").map_or_else(
        || vec!["base".to_owned()],
        |v| v.split(',').map(str::to_owned).collect(),
    );
    for v in variants.iter().chain(&lane_variants) {
        apply_variant(&mut RuntimeConfig::new("check", ["check"]), v)?;
    }
    let want = |case: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|c| c == case))
    };
    let bin = match flag_value::<String>(&args, "--spoold") {
        Some(p) => PathBuf::from(p),
        None => spoold::build()?,
    };
    let passthrough = if want("rss") {
        Some(match flag_value::<String>(&args, "--passthrough") {
            Some(p) => PathBuf::from(p),
            None => spoold::build_bin("spool-processor", "spool-passthrough")?,
        })
    } else {
        None
    };
    let broker = Spoold::start(&bin, "")?;
    let addr = broker.addr.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "== processor: {n} records of {VALUE_BYTES} B (16 B keys) over {partitions} partitions, {reps} reps, lanes {lane_rate}/s for {lane_secs} s, throttle {throttle_rate}/s, spoold {} (default config: fsync = always), loadavg at start {}",
        bin.display(),
        busy()
    );
    let mut s = Samples {
        eos: vec![Vec::new(); variants.len()],
        ratio: vec![Vec::new(); variants.len()],
        variants: variants.clone(),
        lanes: vec![LaneSamples::default(); lane_variants.len()],
        lane_variants: lane_variants.clone(),
        ..Samples::default()
    };
    for rep in 0..reps {
        let dir = tempfile::Builder::new()
            .prefix("spool-processor-bench")
            .tempdir_in(spool_benches::spoold::workspace_root().join("target"))?;
        let input = format!("in-{rep}");
        let idle_topic = format!("idle-{rep}");
        let low_topic = format!("low-{rep}");
        rt.block_on(async {
            let c = Client::connect(addr.clone()).await?;
            c.create_topic(&input, partitions, &TopicSettings::default())
                .await?;
            c.create_topic(&idle_topic, 1, &TopicSettings::default())
                .await?;
            let t = Instant::now();
            fill(&c, &input, partitions, n).await?;
            eprintln!(
                "rep {rep}: filled {input} in {:.1} s (loadavg {})",
                t.elapsed().as_secs_f64(),
                busy()
            );
            if want("lanes") {
                c.create_topic(&low_topic, partitions, &TopicSettings::default())
                    .await?;
                fill(&c, &low_topic, partitions, lane_records).await?;
            }
            anyhow::Ok(())
        })?;
        // alo and each eos variant, in an order rotated by one each rep (with one variant:
        // eos and alo alternate which goes first).
        let mut order: Vec<Option<usize>> = (0..variants.len()).map(Some).collect();
        order.push(None);
        let k = order.len();
        order.rotate_left(rep % k);
        let mut eos = vec![None; variants.len()];
        let mut alo = None;
        for case in order {
            let (what, label) = match case {
                Some(v) => ("eos", variants[v].as_str()),
                None => ("alo", ""),
            };
            if !want(what) {
                continue;
            }
            let name = match case {
                Some(v) if variants.len() > 1 => format!("eos-{rep}-{v}"),
                _ => format!("{what}-{rep}"),
            };
            let r = rt.block_on(async {
                match case {
                    Some(_) => {
                        pass_through(
                            &addr,
                            &input,
                            partitions,
                            n,
                            &name,
                            false,
                            dir.path(),
                            label,
                        )
                        .await
                    }
                    None => at_least_once(&addr, &input, partitions, n, &name).await,
                }
            })?;
            let shown = if variants.len() > 1 {
                format!("{what} {label}")
            } else {
                what.to_owned()
            };
            eprintln!("rep {rep}: {shown} {r:.0} records/s (loadavg {})", busy());
            match case {
                Some(v) => eos[v] = Some(r),
                None => alo = Some(r),
            }
        }
        if let Some(a) = alo {
            s.alo.push(a);
        }
        for (v, e) in eos.into_iter().enumerate() {
            if let Some(e) = e {
                s.eos[v].push(e);
                if let Some(a) = alo {
                    s.ratio[v].push(e / a);
                }
            }
        }
        let name = format!("state-{rep}");
        if want("state") {
            let r = rt.block_on(pass_through(
                &addr,
                &input,
                partitions,
                n,
                &name,
                true,
                dir.path(),
                "base",
            ))?;
            eprintln!("rep {rep}: state {r:.0} records/s (loadavg {})", busy());
            s.state.push(r);
            let secs = rt.block_on(restart(&addr, &input, &name, dir.path()))?;
            eprintln!(
                "rep {rep}: restart with {n} keys ready in {:.0} ms",
                secs * 1e3
            );
            s.restart.push(secs);
            std::fs::remove_dir_all(dir.path().join(&name))?;
            let bytes = rt.block_on(changelog_bytes(&addr, &name))?;
            let secs = rt.block_on(restart(&addr, &input, &name, dir.path()))?;
            let mbs = bytes as f64 / 1e6 / secs;
            eprintln!(
                "rep {rep}: restore of {:.0} MB of changelog ready in {:.2} s = {mbs:.0} MB/s",
                bytes as f64 / 1e6,
                secs
            );
            s.restore_secs.push(secs);
            s.restore_mbs.push(mbs);
        }
        if want("lanes") {
            let mut order: Vec<usize> = (0..lane_variants.len()).collect();
            order.rotate_left(rep % lane_variants.len());
            for v in order {
                let label = lane_variants[v].as_str();
                let tag = if lane_variants.len() > 1 {
                    format!("{rep}-{v}")
                } else {
                    format!("{rep}")
                };
                let idle = rt.block_on(lanes(
                    &addr,
                    &idle_topic,
                    &format!("lanes-idle-{tag}"),
                    lane_rate,
                    lane_secs,
                    dir.path(),
                    label,
                ))?;
                let saturated = rt.block_on(lanes(
                    &addr,
                    &low_topic,
                    &format!("lanes-busy-{tag}"),
                    lane_rate,
                    lane_secs,
                    dir.path(),
                    label,
                ))?;
                let lag = saturated.lo_lag;
                let (i50, i99) = (
                    percentile(&idle.latencies, 50.0),
                    percentile(&idle.latencies, 99.0),
                );
                let (b50, b99) = (
                    percentile(&saturated.latencies, 50.0),
                    percentile(&saturated.latencies, 99.0),
                );
                eprintln!(
                    "rep {rep}: [{label}] high lane p50/p99 {i50:.2}/{i99:.2} ms with the low lane idle, {b50:.2}/{b99:.2} ms saturated ({} left in it); ratio of p99s {:.2}; low lane {:.0} records/s while the high lane sent, {:.0} once it was quiet",
                    lag,
                    b99 / i99,
                    saturated.lo_rate_active,
                    saturated.lo_rate_quiet
                );
                if lag == 0 {
                    eprintln!(
                        "rep {rep}: [{label}] INVALID lanes measurement: the low lane ran dry during the saturated phase (use more --lane-records); left out of the medians"
                    );
                } else {
                    let l = &mut s.lanes[v];
                    l.idle_p50.push(i50);
                    l.idle_p99.push(i99);
                    l.busy_p50.push(b50);
                    l.busy_p99.push(b99);
                    l.ratio.push(b99 / i99);
                    l.plain_idle_p99.extend(idle.plain_p99);
                    l.plain_busy_p99.extend(saturated.plain_p99);
                    l.lo_active.push(saturated.lo_rate_active);
                    l.lo_quiet.push(saturated.lo_rate_quiet);
                }
            }
        }
        if want("throttle") {
            let r = rt.block_on(throttle(
                &addr,
                &input,
                &format!("throttle-{rep}"),
                throttle_rate,
                dir.path(),
            ))?;
            let err = (r / f64::from(throttle_rate) - 1.0) * 100.0;
            eprintln!("rep {rep}: throttle {throttle_rate}/s held {r:.1}/s ({err:+.2}%)");
            s.throttle.push(r);
            s.throttle_err.push(err);
        }
        if let Some(bin) = &passthrough {
            let (rss, hwm) = idle_rss(bin, &addr, &idle_topic, dir.path())?;
            eprintln!("rep {rep}: idle spool-passthrough VmRSS {rss} KiB (peak {hwm} KiB)");
            s.rss.push(rss as f64 / 1024.0);
        }
        // Free the disk for the next rep.
        rt.block_on(async {
            let c = Client::connect(addr.clone()).await?;
            for t in c.list_topics().await? {
                if !t.topic.starts_with("__") {
                    let _ = c.delete_topic(&t.topic).await;
                }
            }
            anyhow::Ok(())
        })?;
    }
    report(&s, throttle_rate);
    println!("loadavg at end {}", busy());
    Ok(())
}

fn report(s: &Samples, throttle_rate: u32) {
    println!("| measure | median | min – max | target | verdict |");
    println!("| --- | --- | --- | --- | --- |");
    let row = |name: &str, v: &[f64], unit: &str, target: &str, ok: Option<fn(f64) -> bool>| {
        if v.is_empty() {
            return;
        }
        let st = Stats::new(v.to_vec());
        let verdict = ok.map_or("", |f| if f(st.median()) { "met" } else { "MISSED" });
        println!(
            "| {name} | {:.2} {unit} | {:.2} – {:.2} | {target} | {verdict} |",
            st.median(),
            st.min(),
            st.max()
        );
    };
    let named = |what: &str, v: usize| {
        if s.variants.len() > 1 {
            format!("{what} [{}]", s.variants[v])
        } else {
            what.to_owned()
        }
    };
    for v in 0..s.variants.len() {
        row(
            &named("stateless pass-through, exactly once", v),
            &s.eos[v],
            "records/s",
            ">= 200 000",
            Some(|x| x >= 200_000.0),
        );
    }
    row("same loop, at least once", &s.alo, "records/s", "-", None);
    for v in 0..s.variants.len() {
        row(
            &named("ratio exactly once / at least once (per rep)", v),
            &s.ratio[v],
            "×",
            ">= 0.60",
            Some(|x| x >= 0.6),
        );
    }
    row(
        "one state-store update per record",
        &s.state,
        "records/s",
        ">= 100 000",
        Some(|x| x >= 100_000.0),
    );
    row(
        "restart with the keys in the local store, to ready",
        &s.restart,
        "s",
        "< 1",
        Some(|x| x < 1.0),
    );
    row(
        "restore from the changelog alone, to ready",
        &s.restore_secs,
        "s",
        "-",
        None,
    );
    row(
        "restore rate (changelog bytes / time to ready)",
        &s.restore_mbs,
        "MB/s",
        ">= 100",
        Some(|x| x >= 100.0),
    );
    for (v, l) in s.lanes.iter().enumerate() {
        let named = |what: &str| {
            if s.lane_variants.len() > 1 {
                format!("{what} [{}]", s.lane_variants[v])
            } else {
                what.to_owned()
            }
        };
        row(
            &named("high lane p50, low lane idle"),
            &l.idle_p50,
            "ms",
            "-",
            None,
        );
        row(
            &named("high lane p99, low lane idle"),
            &l.idle_p99,
            "ms",
            "-",
            None,
        );
        row(
            &named("high lane p50, low lane saturated"),
            &l.busy_p50,
            "ms",
            "-",
            None,
        );
        row(
            &named("high lane p99, low lane saturated"),
            &l.busy_p99,
            "ms",
            "-",
            None,
        );
        row(
            &named("a plain consumer's p99 of the high lane, low lane idle"),
            &l.plain_idle_p99,
            "ms",
            "-",
            None,
        );
        row(
            &named("a plain consumer's p99 of the high lane, low lane saturated"),
            &l.plain_busy_p99,
            "ms",
            "-",
            None,
        );
        row(
            &named("low lane records/s while the high lane is active"),
            &l.lo_active,
            "records/s",
            "-",
            None,
        );
        row(
            &named("low lane records/s once the high lane is quiet"),
            &l.lo_quiet,
            "records/s",
            "-",
            None,
        );
        row(
            &named("ratio of high-lane p99s saturated / idle (per rep)"),
            &l.ratio,
            "×",
            "<= 2",
            Some(|x| x <= 2.0),
        );
    }
    row(
        &format!("throttle at {throttle_rate}/s, 10 s window"),
        &s.throttle,
        "records/s",
        "-",
        None,
    );
    row(
        "throttle error",
        &s.throttle_err,
        "%",
        "within ±5",
        Some(|x| x.abs() <= 5.0),
    );
    row(
        "idle spool-passthrough VmRSS",
        &s.rss,
        "MiB",
        "< 30",
        Some(|x| x < 30.0),
    );
}
