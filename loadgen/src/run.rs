//! The workloads: produce, consume, end-to-end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use serde::Serialize;
use spool_client::proto as v1;
use spool_client::proto::consume_service_client::ConsumeServiceClient;
use spool_client::proto::produce_service_client::ProduceServiceClient;
use spool_client::{Client, FsyncPolicy, TlsOptions, TopicSettings};
use spool_record::{Batch, BatchBuilder, BatchHeader, DecodeLimits};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::cpu::{self, CpuStart, CpuUsage};

/// Largest gRPC message either way (the broker's default `max_request_bytes`).
const MAX_MESSAGE: usize = 64 << 20;
/// Distinct pre-encoded batches cycled through by producers.
const DISTINCT_BATCHES: usize = 4;

/// Which workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Produce only.
    Produce,
    /// Consume only (catch-up read of what is there).
    Consume,
    /// Produce at a rate and consume in the same process; latency is end to end.
    E2e,
}

/// Acknowledgement level asked of the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Acks {
    /// Reply once handed to the log.
    None,
    /// Reply after the page-cache write.
    Written,
    /// Reply after an fdatasync covered the batch.
    Durable,
}

impl Acks {
    fn wire(self) -> i32 {
        (match self {
            Acks::None => v1::Acks::None,
            Acks::Written => v1::Acks::Written,
            Acks::Durable => v1::Acks::Durable,
        }) as i32
    }
}

/// Batch compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// None.
    None,
    /// LZ4 frames.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl Compression {
    fn engine(self) -> spool_record::Compression {
        match self {
            Compression::None => spool_record::Compression::None,
            Compression::Lz4 => spool_record::Compression::Lz4,
            Compression::Zstd => spool_record::Compression::Zstd,
        }
    }
}

/// How to reach a broker that has TLS or bearer tokens configured (the default: plaintext, no
/// token). Every connection of a run uses it: the admin client and each producer's and
/// consumer's own HTTP/2 connection.
#[derive(Clone, Default)]
pub struct Connection {
    /// TLS settings; `None` is plaintext.
    pub tls: Option<TlsOptions>,
    /// Bearer token sent with every request.
    pub token: Option<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// How produced batches carry idempotent-producer fields (for measuring idempotence's cost).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Stamping {
    /// Pre-encoded batches as they are (no producer id): plain produce.
    #[default]
    Off,
    /// Every request copies its batch and rewrites the producer fields and CRC, without a
    /// producer id: plain produce paying the client-side cost of stamping (the control).
    Copy,
    /// Every request copies its batch and stamps a producer id (from InitProducerId) and the
    /// partition's next sequence: idempotent produce, checked by the broker.
    On,
}

/// How the e2e producer decides when to cut and send a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pacing {
    /// Like a Kafka producer (`linger.ms`, `max.in.flight.requests.per.connection`): each
    /// record is handed to the client at its intended time; a batch goes once its oldest
    /// record has waited `linger` (0: at once) or a full batch (`batch_bytes`) is due, as soon
    /// as fewer than `in_flight` requests await their reply. The producer wakes for that
    /// moment on a timerfd (measured ~40 µs late at p50, 70–160 µs at p99 on the 2-vCPU bench
    /// VM: `LatencySplit::timer_late`), not on tokio's 1 ms timer wheel.
    #[default]
    Linger,
    /// The producer before 2026-12-07 (issue 3's e2e): a batch of the records due whenever a
    /// reply frees the window and on a tokio `interval` tick every `linger` (1 ms granular), so
    /// a record that falls due while nothing is in flight waits for the next tick.
    Tick,
    /// As `Tick`, but only on the tick (the old `--linger-only`: a fixed request rate).
    TickOnly,
}

/// A duration in JSON: milliseconds, a plain number (the key says the unit), not serde's
/// `{"secs", "nanos"}`.
fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// Everything a run needs.
#[derive(Clone, Debug, Serialize)]
pub struct LoadConfig {
    /// Workload.
    pub mode: Mode,
    /// `host:port` of the broker.
    pub broker: String,
    /// TLS and token, if the broker wants them.
    #[serde(skip)]
    pub connection: Connection,
    /// Topic (created with `partitions` if missing).
    pub topic: String,
    /// Partitions of the topic (used when creating it, and spread over producers).
    pub partitions: u32,
    /// fsync policy of a topic created here (`None`: the broker's default).
    #[serde(skip)]
    pub fsync: Option<FsyncPolicy>,
    /// Concurrent producers, one HTTP/2 connection each.
    pub producers: usize,
    /// Concurrent consumers (consume mode), one connection and subscription each.
    pub consumers: usize,
    /// Value bytes per record.
    pub record_size: usize,
    /// Target batch size (records' encoded bytes).
    pub batch_bytes: usize,
    /// e2e: with [`Pacing::Linger`], how long a batch's oldest record may wait for more
    /// (Kafka's `linger.ms`; 0: sent as soon as the window allows); with the `Tick` pacings,
    /// the tick period (at least 100 µs).
    #[serde(rename = "linger_ms", serialize_with = "as_ms")]
    pub linger: Duration,
    /// e2e: when the producer cuts and sends a batch.
    pub pacing: Pacing,
    /// Acks asked of the broker.
    pub acks: Acks,
    /// Batch compression.
    pub compression: Compression,
    /// Records carry a 16-byte key.
    pub keyed: bool,
    /// Measured time.
    #[serde(rename = "duration_ms", serialize_with = "as_ms")]
    pub duration: Duration,
    /// Time before measuring.
    #[serde(rename = "warmup_ms", serialize_with = "as_ms")]
    pub warmup: Duration,
    /// Records per second over all producers (open loop); `None`: as fast as possible.
    pub rate: Option<f64>,
    /// Requests awaiting their reply per producer.
    pub in_flight: usize,
    /// Many unary `Produce` calls instead of one `ProduceStream`.
    pub unary: bool,
    /// Idempotent-producer stamping of produced batches (ProduceStream only).
    #[serde(skip)]
    pub stamping: Stamping,
    /// Tokio worker threads of the load generator (0: one per core).
    pub threads: usize,
    /// e2e: the consumer (its connection, subscription and decoding) runs on an OS thread and
    /// a current-thread runtime of its own, as a separate consumer process would, instead of
    /// sharing the producers' runtime (`threads` workers). Its CPU is still this process's.
    pub consumer_thread: bool,
    /// Subscribe `max_bytes` per chunk.
    pub fetch_bytes: u32,
    /// Consume mode: produce this many bytes first (acks = written) if the topic holds less.
    pub preload_bytes: u64,
    /// Touch and free this much memory right before measuring (see docs/benchmarks.md: fresh
    /// memory is slow on this VM).
    pub prefault_bytes: u64,
    /// Processes (e.g. the broker) whose CPU time over the measured window is reported.
    pub watch_pids: Vec<u32>,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            mode: Mode::Produce,
            broker: "127.0.0.1:7170".into(),
            connection: Connection::default(),
            topic: "loadgen".into(),
            partitions: 1,
            fsync: None,
            producers: 1,
            consumers: 1,
            record_size: 1024,
            batch_bytes: 1 << 20,
            linger: Duration::from_millis(1),
            pacing: Pacing::Linger,
            acks: Acks::Written,
            compression: Compression::None,
            keyed: false,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            rate: None,
            in_flight: 8,
            unary: false,
            stamping: Stamping::Off,
            threads: 1,
            consumer_thread: false,
            fetch_bytes: 1 << 20,
            preload_bytes: 1 << 30,
            prefault_bytes: 0,
            watch_pids: Vec::new(),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RunLatency {
    /// Samples (requests for produce, records for e2e).
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl RunLatency {
    fn from_hist(h: &Histogram<u64>) -> Option<RunLatency> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Some(RunLatency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        })
    }
}

/// The outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The settings.
    pub config: LoadConfig,
    /// Seconds measured.
    pub seconds: f64,
    /// Records counted in the measured window.
    pub records: u64,
    /// Bytes of batches (as on the wire / on disk) counted in the measured window.
    pub bytes: u64,
    /// 10^6 bytes per second.
    pub mb_per_s: f64,
    /// Records per second.
    pub records_per_s: f64,
    /// Requests acknowledged (produce) or messages received (consume) in the window.
    pub requests: u64,
    /// Failed requests or per-partition errors.
    pub errors: u64,
    /// Produce: request latency (from the intended send time under `rate`); e2e: delivery −
    /// intended send time per record; consume: none.
    pub latency: Option<RunLatency>,
    /// CPU time of the load generator and of the watched processes over the measured window.
    pub cpu: Option<CpuUsage>,
    /// e2e: where the records' latency went (values of at least 16 bytes).
    pub split: Option<LatencySplit>,
}

impl Report {
    /// One human-readable line.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:?}: {:.1} MB/s, {:.0} records/s, {} records, {} requests, {} errors, {:.2} s",
            self.config.mode,
            self.mb_per_s,
            self.records_per_s,
            self.records,
            self.requests,
            self.errors,
            self.seconds
        );
        if let Some(l) = &self.latency {
            s += &format!(
                "; latency µs p50 {:.0} p99 {:.0} p99.9 {:.0} max {:.0} (n={})",
                l.p50_us, l.p99_us, l.p999_us, l.max_us, l.count
            );
        }
        if let Some(x) = &self.split {
            let p = |l: &Option<RunLatency>| {
                l.map_or("–".to_owned(), |l| {
                    format!(
                        "{:.0}/{:.0}/{:.0}/{:.0}",
                        l.p50_us, l.p99_us, l.p999_us, l.max_us
                    )
                })
            };
            s += &format!(
                "; split µs p50/p99/p99.9/max (records by intended time, requests by cut time): before send {}, after send {}, produce reply {}, timer late {}; {} full-batch sends; {} records > 1 ms, {} of them mostly before send",
                p(&x.before_send),
                p(&x.after_send),
                p(&x.produce_reply),
                p(&x.timer_late),
                x.full_batch_sends,
                x.over_1ms,
                x.over_1ms_mostly_before_send
            );
        }
        if let Some(c) = &self.cpu {
            s += &format!(
                "; CPU over {:.2} s: load generator {:.2} s ({:.2} s/GB)",
                c.window_s,
                c.loadgen_s,
                c.loadgen_s_per_gb(self.bytes).unwrap_or(f64::NAN)
            );
            for w in &c.watched {
                match w.cpu_s {
                    Some(cpu) => {
                        s += &format!(
                            ", pid {} {:.2} s = {:.0}% of a core ({:.2} s/GB)",
                            w.pid,
                            cpu,
                            100.0 * cpu / c.window_s,
                            cpu / (self.bytes as f64 / 1e9)
                        )
                    }
                    None => s += &format!(", pid {} unreadable", w.pid),
                }
            }
        }
        s
    }
}

/// Where an e2e record's latency went, from the send time each batch carries in its records
/// (value bytes 8..16, ns since the run's base, when values have at least 16 bytes).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct LatencySplit {
    /// Intended send time → its batch was cut and handed to the stream: the producer's own
    /// wait (linger, a full window, a late timer or tick, its thread busy elsewhere).
    pub before_send: Option<RunLatency>,
    /// Batch cut → delivered to the consumer: the broker, both connections and the consumer.
    pub after_send: Option<RunLatency>,
    /// Batch cut → its produce reply, per request. Requests are counted by their cut time
    /// (those cut in the measured window), while `before_send`, `after_send` and the
    /// end-to-end latency count records by their intended time: the two populations differ by
    /// the batches that straddle the window's edges.
    pub produce_reply: Option<RunLatency>,
    /// [`Pacing::Linger`]: how late the producer ran after the timer's time, per wake on the
    /// timer (the timerfd's expiry, the epoll wake-up and the worker being free).
    pub timer_late: Option<RunLatency>,
    /// [`Pacing::Linger`]: requests cut in the window because a full batch (`batch_bytes`) was
    /// due before the linger ran out (the rest went on the linger).
    pub full_batch_sends: u64,
    /// Records over 1 ms end to end.
    pub over_1ms: u64,
    /// … of which more than half was before the send.
    pub over_1ms_mostly_before_send: u64,
}

/// The histograms behind a [`LatencySplit`].
struct Split {
    before: Histogram<u64>,
    after: Histogram<u64>,
    reply: Histogram<u64>,
    timer_late: Histogram<u64>,
    full_batch_sends: u64,
    over_1ms: u64,
    over_1ms_before: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

impl Split {
    fn new() -> Split {
        Split {
            before: histogram(),
            after: histogram(),
            reply: histogram(),
            timer_late: histogram(),
            full_batch_sends: 0,
            over_1ms: 0,
            over_1ms_before: 0,
        }
    }

    fn merge(&mut self, o: &Split) {
        self.before.add(&o.before).expect("same bounds");
        self.after.add(&o.after).expect("same bounds");
        self.reply.add(&o.reply).expect("same bounds");
        self.timer_late.add(&o.timer_late).expect("same bounds");
        self.full_batch_sends += o.full_batch_sends;
        self.over_1ms += o.over_1ms;
        self.over_1ms_before += o.over_1ms_before;
    }

    /// One record: `before` = cut − intended, `after` = delivery − cut.
    fn record(&mut self, before: u64, after: u64) {
        self.before.saturating_record(before.max(1));
        self.after.saturating_record(after.max(1));
        if before + after > 1_000_000 {
            self.over_1ms += 1;
            if before > after {
                self.over_1ms_before += 1;
            }
        }
    }

    fn summary(&self) -> LatencySplit {
        LatencySplit {
            before_send: RunLatency::from_hist(&self.before),
            after_send: RunLatency::from_hist(&self.after),
            produce_reply: RunLatency::from_hist(&self.reply),
            timer_late: RunLatency::from_hist(&self.timer_late),
            full_batch_sends: self.full_batch_sends,
            over_1ms: self.over_1ms,
            over_1ms_mostly_before_send: self.over_1ms_before,
        }
    }
}

/// Counters of one task, merged at the end.
struct Stats {
    records: u64,
    bytes: u64,
    requests: u64,
    errors: u64,
    hist: Histogram<u64>,
    /// e2e only.
    split: Option<Box<Split>>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            records: 0,
            bytes: 0,
            requests: 0,
            errors: 0,
            hist: histogram(),
            split: None,
        }
    }

    fn split(&mut self) -> &mut Split {
        self.split.get_or_insert_with(|| Box::new(Split::new()))
    }

    fn merge(&mut self, o: &Stats) {
        self.records += o.records;
        self.bytes += o.bytes;
        self.requests += o.requests;
        self.errors += o.errors;
        self.hist.add(&o.hist).expect("same bounds");
        if let Some(x) = &o.split {
            self.split().merge(x);
        }
    }

    fn record_ns(&mut self, ns: u64) {
        self.hist.saturating_record(ns.max(1));
    }
}

/// The measured window, shared by a run's tasks.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    from: Instant,
    until: Instant,
}

impl Window {
    fn new(cfg: &LoadConfig) -> Window {
        let start = Instant::now();
        let from = start + cfg.warmup;
        Window {
            start,
            from,
            until: from + cfg.duration,
        }
    }

    fn counts(&self, t: Instant) -> bool {
        t >= self.from && t < self.until
    }
}

/// Touches `bytes` of fresh memory and frees it, so the next allocations (page cache, buffers)
/// reuse guest-faulted pages instead of host-fresh ones.
pub fn prefault(bytes: u64) {
    if bytes == 0 {
        return;
    }
    let v = vec![1u8; bytes as usize];
    std::hint::black_box(&v);
    drop(v);
}

/// Runs `cfg` on a runtime of its own (`cfg.threads` workers).
pub fn run(cfg: &LoadConfig) -> Result<Report> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if cfg.threads > 0 {
        rt.worker_threads(cfg.threads);
    }
    let rt = rt.build().context("starting the tokio runtime")?;
    rt.block_on(async {
        match cfg.mode {
            Mode::Produce => run_produce(cfg).await,
            Mode::Consume => run_consume(cfg).await,
            Mode::E2e => run_e2e(cfg).await,
        }
    })
}

/// A connection of its own for one producer or consumer (TLS if configured).
async fn channel(cfg: &LoadConfig) -> Result<Channel> {
    let addr = &cfg.broker;
    let tls = cfg.connection.tls.as_ref();
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("{}://{addr}", if tls.is_some() { "https" } else { "http" })
    };
    let mut endpoint = Endpoint::from_shared(uri)?;
    if let Some(t) = tls {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&t.ca_pem));
        if let Some(d) = &t.domain {
            c = c.domain_name(d.clone());
        }
        if let Some(id) = &t.identity {
            c = c.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        endpoint = endpoint.tls_config(c).context("TLS settings")?;
    }
    endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(32 << 20)
        // Lets the broker send 1 MiB DATA frames (h2's default is 16 KiB), as the broker
        // itself accepts from producers.
        .max_frame_size(frame_size())
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// A `spool-client` for admin calls (creating the topic, reading watermarks).
async fn admin_client(cfg: &LoadConfig) -> Result<Client> {
    let mut b = Client::builder(cfg.broker.clone());
    if let Some(t) = &cfg.connection.tls {
        b = b.tls(t.clone());
    }
    if let Some(t) = &cfg.connection.token {
        b = b.bearer_token(t);
    }
    Ok(b.connect().await?)
}

/// The `authorization` header value of the bearer token, if any.
fn auth(cfg: &LoadConfig) -> Result<Option<AsciiMetadataValue>> {
    let Some(t) = &cfg.connection.token else {
        return Ok(None);
    };
    let mut v: AsciiMetadataValue = format!("Bearer {t}")
        .parse()
        .map_err(|_| anyhow!("the bearer token is not a valid header value"))?;
    v.set_sensitive(true);
    Ok(Some(v))
}

/// Wraps a message (or a request stream) with the `authorization` header from [`auth`].
fn request<T>(auth: &Option<AsciiMetadataValue>, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(v) = auth {
        req.metadata_mut().insert("authorization", v.clone());
    }
    req
}

/// HTTP/2 max frame size this client accepts: `SPOOL_LOADGEN_FRAME` bytes, else 1 MiB.
fn frame_size() -> u32 {
    std::env::var("SPOOL_LOADGEN_FRAME")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20)
}

fn produce_stub(ch: Channel) -> ProduceServiceClient<Channel> {
    ProduceServiceClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn consume_stub(ch: Channel) -> ConsumeServiceClient<Channel> {
    ConsumeServiceClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Creates the topic if it does not exist; returns its partition count.
pub async fn ensure_topic(cfg: &LoadConfig) -> Result<u32> {
    let client = admin_client(cfg).await?;
    match client.describe_topic(&cfg.topic).await {
        Ok(d) => Ok(d.partitions.len() as u32),
        Err(spool_client::Error::UnknownTopic { .. }) => {
            let settings = TopicSettings {
                fsync: cfg.fsync,
                // Room for the largest batches a run may send.
                max_message_bytes: Some((cfg.batch_bytes as u32).max(1 << 20) + (1 << 20)),
                ..TopicSettings::default()
            };
            client
                .create_topic(&cfg.topic, cfg.partitions, &settings)
                .await
                .with_context(|| format!("creating topic {}", cfg.topic))?;
            Ok(cfg.partitions)
        }
        Err(e) => Err(e.into()),
    }
}

/// A small deterministic generator, so payloads compress like text, not like zeros.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            // 32 printable letters: about 5 bits of entropy per byte.
            *b = b'a' + (self.next() & 31) as u8;
        }
    }
}

/// Pre-encoded batches for a producer, built once.
struct Batches {
    batches: Vec<Bytes>,
    records_per_batch: u64,
}

fn build_batches(cfg: &LoadConfig) -> Result<Batches> {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut value = vec![0u8; cfg.record_size];
    let now = now_ms();
    let mut batches = Vec::new();
    let mut per = 0;
    let mut key_n = 0u64;
    for _ in 0..DISTINCT_BATCHES {
        let mut b = BatchBuilder::with_capacity(cfg.compression.engine(), cfg.batch_bytes + 4096);
        loop {
            rng.fill(&mut value);
            let key = format!("key-{key_n:012}");
            key_n += 1;
            b.push(now, cfg.keyed.then_some(key.as_bytes()), Some(&value), &[]);
            if b.size_bytes() + cfg.record_size + 32 > cfg.batch_bytes {
                break;
            }
        }
        per = b.len() as u64;
        batches.push(b.finish().map_err(|e| anyhow!("encoding a batch: {e}"))?);
    }
    Ok(Batches {
        batches,
        records_per_batch: per,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Partitions of producer `i` of `n` over `partitions`: round robin.
fn partitions_of(i: usize, n: usize, partitions: u32) -> Vec<u32> {
    let mut v: Vec<u32> = (0..partitions).filter(|p| *p as usize % n == i).collect();
    if v.is_empty() {
        v.push((i as u32) % partitions);
    }
    v
}

/// Produce workload.
pub async fn run_produce(cfg: &LoadConfig) -> Result<Report> {
    if cfg.unary && cfg.stamping != Stamping::Off {
        bail!("--stamping works on ProduceStream only (drop --unary)");
    }
    let partitions = ensure_topic(cfg).await?;
    let batches = Arc::new(build_batches(cfg)?);
    let mut channels = Vec::new();
    for _ in 0..cfg.producers {
        channels.push(channel(cfg).await?);
    }
    prefault(cfg.prefault_bytes);
    let window = Window::new(cfg);
    let sampler = cpu::sample_window(cfg.watch_pids.clone(), window.from, window.until);
    let mut tasks = Vec::new();
    for (i, ch) in channels.into_iter().enumerate() {
        let cfg = cfg.clone();
        let batches = batches.clone();
        let parts = partitions_of(i, cfg.producers, partitions);
        tasks.push(tokio::spawn(async move {
            if cfg.unary {
                produce_unary(&cfg, ch, &batches, &parts, window).await
            } else {
                produce_stream(&cfg, ch, &batches, &parts, window).await
            }
        }));
    }
    let mut total = Stats::new();
    for t in tasks {
        total.merge(&t.await.context("producer task")??);
    }
    let mut r = report(cfg, &total, cfg.duration);
    r.cpu = join_sampler(sampler).await;
    Ok(r)
}

/// The CPU figures of a window sampler (which has finished once the window is over).
async fn join_sampler(h: std::thread::JoinHandle<CpuUsage>) -> Option<CpuUsage> {
    tokio::task::spawn_blocking(move || h.join().ok())
        .await
        .ok()
        .flatten()
}

fn report(cfg: &LoadConfig, s: &Stats, measured: Duration) -> Report {
    let secs = measured.as_secs_f64();
    Report {
        config: cfg.clone(),
        seconds: secs,
        records: s.records,
        bytes: s.bytes,
        mb_per_s: s.bytes as f64 / secs / 1e6,
        records_per_s: s.records as f64 / secs,
        requests: s.requests,
        errors: s.errors,
        latency: RunLatency::from_hist(&s.hist),
        cpu: None,
        split: s.split.as_ref().map(|x| x.summary()),
    }
}

/// When request `i` of a producer is due (open loop), or `None` (closed loop).
fn due(cfg: &LoadConfig, w: &Window, records_per_batch: u64, i: u64) -> Option<Instant> {
    let rate = cfg.rate? / cfg.producers as f64;
    let secs = (i * records_per_batch) as f64 / rate;
    Some(w.start + Duration::from_secs_f64(secs))
}

/// Per request in flight: (when its latency starts, records, bytes).
type Slot = (Instant, u64, u64);

async fn produce_stream(
    cfg: &LoadConfig,
    ch: Channel,
    b: &Batches,
    parts: &[u32],
    w: Window,
) -> Result<Stats> {
    let mut stats = Stats::new();
    let window = cfg.in_flight.max(1);
    let (tx, rx) = mpsc::channel::<v1::ProduceStreamRequest>(window);
    // Replies may come out of order (the broker's settle phases overlap).
    let mut slots: HashMap<u64, Slot> = HashMap::with_capacity(window * 2);
    let mut next: u64 = 0;
    let mut in_flight = 0usize;
    let producer_id = match cfg.stamping {
        Stamping::On => {
            produce_stub(ch.clone())
                .init_producer_id(request(&auth(cfg)?, v1::InitProducerIdRequest::default()))
                .await
                .context("InitProducerId")?
                .into_inner()
                .producer_id
        }
        _ => -1,
    };
    let mut sequences: HashMap<u32, i32> = HashMap::new();
    let mut make = |i: u64| -> Result<v1::ProduceStreamRequest> {
        let partition = parts[i as usize % parts.len()];
        let batch = &b.batches[i as usize % b.batches.len()];
        let batch = match cfg.stamping {
            Stamping::Off => batch.clone(),
            Stamping::Copy | Stamping::On => {
                let seq = sequences.entry(partition).or_insert(0);
                let (epoch, base) = if producer_id >= 0 {
                    (0, *seq)
                } else {
                    (-1, -1)
                };
                let mut copy = batch.to_vec();
                spool_record::restamp_producer(&mut copy, producer_id, epoch, base)
                    .map_err(|e| anyhow!("stamping a batch: {e}"))?;
                *seq = ((*seq as i64 + b.records_per_batch as i64) % (i32::MAX as i64 + 1)) as i32;
                Bytes::from(copy)
            }
        };
        Ok(v1::ProduceStreamRequest {
            request_id: i,
            partitions: vec![v1::PartitionProduce {
                topic: cfg.topic.clone(),
                partition,
                data: Some(v1::partition_produce::Data::RecordBatch(batch)),
            }],
            acks: cfg.acks.wire(),
        })
    };
    // Queue the first request before opening the stream so the call has a body to send.
    let first_due = due(cfg, &w, b.records_per_batch, 0);
    if let Some(t) = first_due {
        tokio::time::sleep_until(t.into()).await;
    }
    let len0 = b.batches[0].len() as u64;
    tx.try_send(make(0)?).map_err(|_| anyhow!("queueing"))?;
    slots.insert(
        0,
        (
            first_due.unwrap_or_else(Instant::now),
            b.records_per_batch,
            len0,
        ),
    );
    next = next.max(1);
    in_flight += 1;
    let mut inbound = produce_stub(ch)
        .produce_stream(request(&auth(cfg)?, ReceiverStream::new(rx)))
        .await
        .context("opening ProduceStream")?
        .into_inner();
    let mut tx = Some(tx);
    let drain_deadline = w.until + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        if now >= w.until {
            tx = None; // ends the request stream; replies still come
            if in_flight == 0 || now >= drain_deadline {
                break;
            }
        }
        let can_send = tx.is_some() && in_flight < window;
        let due_at = due(cfg, &w, b.records_per_batch, next);
        let send_wait = async {
            if let Some(t) = due_at {
                tokio::time::sleep_until(t.min(w.until).into()).await;
            }
        };
        tokio::select! {
            biased;
            msg = inbound.message() => {
                let msg = msg.context("ProduceStream")?;
                let Some(msg) = msg else { break };
                let at = Instant::now();
                let slot = slots.remove(&msg.request_id);
                in_flight -= 1;
                let Some((t0, records, bytes)) = slot else { bail!("reply to unknown request {}", msg.request_id) };
                let failed = msg.results.iter().any(|r| r.error.is_some());
                if w.counts(at) {
                    if failed {
                        stats.errors += 1;
                    } else {
                        stats.requests += 1;
                        stats.records += records;
                        stats.bytes += bytes;
                        stats.record_ns(at.duration_since(t0).as_nanos() as u64);
                    }
                }
            }
            () = send_wait, if can_send => {
                let now = Instant::now();
                if now >= w.until { continue; }
                let i = next;
                next += 1;
                let req = make(i)?;
                let bytes = b.batches[i as usize % b.batches.len()].len() as u64;
                slots.insert(i, (due_at.unwrap_or(now), b.records_per_batch, bytes));
                in_flight += 1;
                if let Some(tx) = &tx {
                    tx.send(req).await.map_err(|_| anyhow!("the ProduceStream request stream closed"))?;
                }
            }
        }
    }
    drop(tx);
    Ok(stats)
}

async fn produce_unary(
    cfg: &LoadConfig,
    ch: Channel,
    b: &Batches,
    parts: &[u32],
    w: Window,
) -> Result<Stats> {
    let mut stats = Stats::new();
    let window = cfg.in_flight.max(1);
    let stub = produce_stub(ch);
    let auth = auth(cfg)?;
    let mut futs = FuturesUnordered::new();
    let mut next: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= w.until && (futs.is_empty() || now >= w.until + Duration::from_secs(10)) {
            break;
        }
        let can_send = now < w.until && futs.len() < window;
        let due_at = due(cfg, &w, b.records_per_batch, next);
        let send_wait = async {
            if let Some(t) = due_at {
                tokio::time::sleep_until(t.min(w.until).into()).await;
            }
        };
        tokio::select! {
            biased;
            Some((t0, records, bytes, res)) = futs.next(), if !futs.is_empty() => {
                let at = Instant::now();
                let res: Result<tonic::Response<v1::ProduceResponse>, tonic::Status> = res;
                if w.counts(at) {
                    match res {
                        Ok(r) if r.get_ref().results.iter().all(|r| r.error.is_none()) => {
                            stats.requests += 1;
                            stats.records += records;
                            stats.bytes += bytes;
                            stats.record_ns(at.duration_since(t0).as_nanos() as u64);
                        }
                        _ => stats.errors += 1,
                    }
                }
            }
            () = send_wait, if can_send => {
                let now = Instant::now();
                if now >= w.until { continue; }
                let i = next;
                next += 1;
                let batch = b.batches[i as usize % b.batches.len()].clone();
                let bytes = batch.len() as u64;
                let req = v1::ProduceRequest {
                    partitions: vec![v1::PartitionProduce {
                        topic: cfg.topic.clone(),
                        partition: parts[i as usize % parts.len()],
                        data: Some(v1::partition_produce::Data::RecordBatch(batch)),
                    }],
                    acks: cfg.acks.wire(),
                };
                let t0 = due_at.unwrap_or(now);
                let mut stub = stub.clone();
                let records = b.records_per_batch;
                let req = request(&auth, req);
                futs.push(async move { (t0, records, bytes, stub.produce(req).await) });
            }
        }
    }
    Ok(stats)
}

/// Records and bytes of whole batches in `buf` (headers only, nothing decoded).
pub fn count_records(buf: &[u8]) -> Result<u64> {
    let mut pos = 0;
    let mut n = 0u64;
    while pos < buf.len() {
        let h = BatchHeader::parse(&buf[pos..]).map_err(|e| anyhow!("batch header: {e}"))?;
        n += h.records_count.max(0) as u64;
        pos += h.total_len();
    }
    Ok(n)
}

async fn describe_hwms(cfg: &LoadConfig) -> Result<Vec<u64>> {
    let client = admin_client(cfg).await?;
    let d = client.describe_topic(&cfg.topic).await?;
    Ok(d.partitions.iter().map(|p| p.high_watermark).collect())
}

async fn describe_bytes(cfg: &LoadConfig) -> Result<u64> {
    let client = admin_client(cfg).await?;
    let d = client.describe_topic(&cfg.topic).await?;
    Ok(d.partitions.iter().map(|p| p.size_bytes).sum())
}

/// Consume workload: a catch-up read of the topic from the earliest offset.
pub async fn run_consume(cfg: &LoadConfig) -> Result<Report> {
    let partitions = ensure_topic(cfg).await?;
    let have = describe_bytes(cfg).await?;
    if have < cfg.preload_bytes {
        // Fill it, closed loop, acks = written, then wait until readers can see it all.
        let mut fill = cfg.clone();
        fill.mode = Mode::Produce;
        fill.acks = Acks::Written;
        fill.rate = None;
        fill.warmup = Duration::ZERO;
        fill.prefault_bytes = 0;
        let start = Instant::now();
        let mut produced = 0;
        while have + produced < cfg.preload_bytes && start.elapsed() < Duration::from_secs(120) {
            fill.duration = Duration::from_millis(500);
            produced += run_produce(&fill).await?.bytes;
        }
    }
    let mut last = describe_hwms(cfg).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = describe_hwms(cfg).await?;
        if now == last {
            break;
        }
        last = now;
    }
    let ends = Arc::new(last);
    let mut channels = Vec::new();
    let consumers = cfg.consumers.max(1);
    for _ in 0..consumers {
        channels.push(channel(cfg).await?);
    }
    prefault(cfg.prefault_bytes);
    let cpu_start = CpuStart::now(&cfg.watch_pids);
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = Vec::new();
    for (i, ch) in channels.into_iter().enumerate() {
        let cfg = cfg.clone();
        let ends = ends.clone();
        let parts = partitions_of(i, consumers, partitions);
        tasks.push(tokio::spawn(async move {
            consume_one(&cfg, ch, &parts, &ends, deadline).await
        }));
    }
    let mut total = Stats::new();
    for t in tasks {
        total.merge(&t.await.context("consumer task")??);
    }
    let cpu = cpu_start.finish();
    let took = start.elapsed().min(cfg.duration);
    let mut r = report(cfg, &total, took);
    r.cpu = Some(cpu);
    Ok(r)
}

async fn consume_one(
    cfg: &LoadConfig,
    ch: Channel,
    parts: &[u32],
    ends: &[u64],
    deadline: Instant,
) -> Result<Stats> {
    let mut stats = Stats::new();
    let req = v1::SubscribeRequest {
        partitions: parts
            .iter()
            .map(|p| v1::SubscribePartition {
                topic: cfg.topic.clone(),
                partition: *p,
                start: Some(v1::StartPosition {
                    position: Some(v1::start_position::Position::Earliest(true)),
                }),
            })
            .collect(),
        max_bytes: cfg.fetch_bytes,
        decode_records: false,
        heartbeat_interval_ms: 1000,
        ..Default::default()
    };
    let mut left: Vec<(u32, u64)> = parts
        .iter()
        .map(|p| (*p, ends[*p as usize]))
        .filter(|(_, end)| *end > 0)
        .collect();
    if left.is_empty() {
        return Ok(stats);
    }
    let mut stream = consume_stub(ch)
        .subscribe(request(&auth(cfg)?, req))
        .await
        .context("Subscribe")?
        .into_inner();
    while !left.is_empty() {
        let msg = match tokio::time::timeout_at(deadline.into(), stream.message()).await {
            Err(_) => break,
            Ok(m) => m.context("Subscribe stream")?,
        };
        let Some(msg) = msg else { break };
        if let Some(v1::subscribe_response::Message::Data(d)) = msg.message {
            if d.error.is_some() {
                stats.errors += 1;
                continue;
            }
            stats.requests += 1;
            stats.bytes += d.record_batches.len() as u64;
            stats.records += count_records(&d.record_batches)?;
            left.retain(|(p, end)| !(*p == d.partition && d.next_offset >= *end));
        }
    }
    Ok(stats)
}

/// End-to-end workload: produce at `rate` with the send time in each value, consume in the
/// same process, latency = delivery − intended send time.
pub async fn run_e2e(cfg: &LoadConfig) -> Result<Report> {
    let rate = cfg
        .rate
        .ok_or_else(|| anyhow!("e2e needs --rate (records/s)"))?;
    if cfg.record_size < 8 {
        bail!("e2e needs records of at least 8 bytes (the send time)");
    }
    let partitions = ensure_topic(cfg).await?;
    let hwms = describe_hwms(cfg).await?;
    let base = Instant::now();
    // Subscribe first, from the current ends, so nothing produced is missed.
    let sub = if cfg.consumer_thread {
        E2eConsumer::Thread(spawn_e2e_consumer_thread(cfg, partitions, hwms).await?)
    } else {
        E2eConsumer::Here(Box::new(e2e_subscribe(cfg, partitions, &hwms).await?))
    };
    let mut channels = Vec::new();
    for _ in 0..cfg.producers {
        channels.push(channel(cfg).await?);
    }
    prefault(cfg.prefault_bytes);
    let w = Window::new(cfg);
    let sampler = cpu::sample_window(cfg.watch_pids.clone(), w.from, w.until);
    let (total_tx, total_rx) = tokio::sync::watch::channel(None::<u64>);
    let consumer = match sub {
        E2eConsumer::Here(stream) => tokio::spawn(e2e_consume(*stream, base, w, total_rx)),
        E2eConsumer::Thread(start) => {
            // The thread waits for its start (base and window) and answers on `done`.
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            start
                .send((base, w, total_rx, done_tx))
                .map_err(|_| anyhow!("the e2e consumer thread ended before its start"))?;
            tokio::spawn(async move {
                done_rx
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("the e2e consumer thread panicked")))
            })
        }
    };
    let mut tasks = Vec::new();
    for (i, ch) in channels.into_iter().enumerate() {
        let cfg = cfg.clone();
        let parts = partitions_of(i, cfg.producers, partitions);
        let per = rate / cfg.producers as f64;
        tasks.push(tokio::spawn(async move {
            e2e_produce(&cfg, ch, &parts, per, base, w).await
        }));
    }
    let mut prod = Stats::new();
    for t in tasks {
        prod.merge(&t.await.context("producer task")??);
    }
    // `records` of the producers' stats: every record they put in a batch.
    let _ = total_tx.send(Some(prod.records));
    let mut cons = consumer.await.context("consumer task")??;
    // The produce replies' times are the producers'; the rest of the split the consumer's.
    if let Some(p) = &prod.split {
        cons.split().reply.add(&p.reply).expect("same bounds");
        cons.split()
            .timer_late
            .add(&p.timer_late)
            .expect("same bounds");
        cons.split().full_batch_sends += p.full_batch_sends;
    }
    let mut r = report(cfg, &cons, cfg.duration);
    r.errors += prod.errors;
    r.requests = prod.requests;
    r.cpu = join_sampler(sampler).await;
    Ok(r)
}

/// Where the e2e consumer runs: a task on the producers' runtime, or its own thread.
enum E2eConsumer {
    Here(Box<tonic::Streaming<v1::SubscribeResponse>>),
    Thread(tokio::sync::oneshot::Sender<E2eStart>),
}

/// What the consumer thread needs once the producers are ready, and where it answers.
type E2eStart = (
    Instant,
    Window,
    tokio::sync::watch::Receiver<Option<u64>>,
    tokio::sync::oneshot::Sender<Result<Stats>>,
);

/// The e2e subscription: every partition from `hwms` (its current end).
async fn e2e_subscribe(
    cfg: &LoadConfig,
    partitions: u32,
    hwms: &[u64],
) -> Result<tonic::Streaming<v1::SubscribeResponse>> {
    let sub_ch = channel(cfg).await?;
    let req = v1::SubscribeRequest {
        partitions: (0..partitions)
            .map(|p| v1::SubscribePartition {
                topic: cfg.topic.clone(),
                partition: p,
                start: Some(v1::StartPosition {
                    position: Some(v1::start_position::Position::Offset(hwms[p as usize])),
                }),
            })
            .collect(),
        max_bytes: cfg.fetch_bytes,
        decode_records: false,
        heartbeat_interval_ms: 1000,
        ..Default::default()
    };
    Ok(consume_stub(sub_ch)
        .subscribe(request(&auth(cfg)?, req))
        .await
        .context("Subscribe")?
        .into_inner())
}

/// Starts the e2e consumer on a thread with a current-thread runtime of its own (its
/// connection's I/O included: tonic drives a channel on the runtime that made it), returns
/// once it has subscribed; the returned sender starts its consume loop.
async fn spawn_e2e_consumer_thread(
    cfg: &LoadConfig,
    partitions: u32,
    hwms: Vec<u64>,
) -> Result<tokio::sync::oneshot::Sender<E2eStart>> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let (start_tx, start_rx) = tokio::sync::oneshot::channel::<E2eStart>();
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("e2e-consumer".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("the consumer's runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let stream = match e2e_subscribe(&cfg, partitions, &hwms).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                // The run was abandoned before it started: nothing to answer.
                let Ok((base, w, total, done)) = start_rx.await else {
                    return;
                };
                let _ = done.send(e2e_consume(stream, base, w, total).await);
            });
        })
        .context("starting the e2e consumer thread")?;
    ready_rx
        .await
        .map_err(|_| anyhow!("the e2e consumer thread ended before subscribing"))??;
    Ok(start_tx)
}

/// One e2e producer (open loop) over one `ProduceStream`: record `i` is due at `start + i /
/// rate`; each value starts with its intended send time and then the time its batch was cut
/// (ns since `base`, little-endian, the second only in values of at least 16 bytes). When
/// batches are cut is `cfg.pacing`'s.
async fn e2e_produce(
    cfg: &LoadConfig,
    ch: Channel,
    parts: &[u32],
    rate: f64,
    base: Instant,
    w: Window,
) -> Result<Stats> {
    let window = cfg.in_flight.clamp(1, 64);
    let (tx, rx) = mpsc::channel::<v1::ProduceStreamRequest>(window);
    let inbound = produce_stub(ch)
        .produce_stream(request(&auth(cfg)?, ReceiverStream::new(rx)))
        .await
        .context("opening ProduceStream")?
        .into_inner();
    let mut rng = XorShift(0x1234_5678_9ABC_DEF1);
    let mut filler = vec![0u8; cfg.record_size];
    rng.fill(&mut filler);
    let mut p = E2eProducer {
        cfg,
        parts,
        rate,
        base,
        w,
        window,
        filler,
        produced: 0,
        // Records intended before the window's end: the run's last one is `total - 1`.
        total: due_by(w.until, &w, rate),
        next_id: 0,
        sent: std::collections::VecDeque::with_capacity(window),
        tx: Some(tx),
        inbound,
        stats: Stats::new(),
    };
    match cfg.pacing {
        Pacing::Linger => p.run_linger().await?,
        Pacing::Tick | Pacing::TickOnly => p.run_tick().await?,
    }
    p.stats.records = p.produced;
    Ok(p.stats)
}

/// The state of one e2e producer.
struct E2eProducer<'a> {
    cfg: &'a LoadConfig,
    parts: &'a [u32],
    rate: f64,
    base: Instant,
    w: Window,
    /// Requests that may await their reply at once.
    window: usize,
    filler: Vec<u8>,
    /// Records put in batches so far (record `produced` is the next one).
    produced: u64,
    /// Records of the run.
    total: u64,
    next_id: u64,
    /// Requests awaiting their reply: (id, when cut), in send order.
    sent: std::collections::VecDeque<(u64, Instant)>,
    /// `None` once every record is sent (ends the request stream).
    tx: Option<mpsc::Sender<v1::ProduceStreamRequest>>,
    inbound: tonic::Streaming<v1::ProduceStreamResponse>,
    stats: Stats,
}

impl E2eProducer<'_> {
    /// When record `i` is due.
    fn intended(&self, i: u64) -> Instant {
        self.w.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    fn in_flight(&self) -> usize {
        self.sent.len()
    }

    /// Cuts one batch of the records due by `now` (at least the next one, at most what fits in
    /// `batch_bytes`) and sends it.
    async fn send_due(&mut self, now: Instant) -> Result<()> {
        let cfg = self.cfg;
        let due_n = due_by(now.min(self.w.until), &self.w, self.rate)
            .max(self.produced + 1)
            .min(self.total);
        let mut b = BatchBuilder::with_capacity(
            cfg.compression.engine(),
            ((due_n - self.produced) as usize * (cfg.record_size + 32)).min(cfg.batch_bytes + 4096),
        );
        let ts = now_ms();
        let cut_ns = now.duration_since(self.base).as_nanos() as u64;
        if self.filler.len() >= 16 {
            self.filler[8..16].copy_from_slice(&cut_ns.to_le_bytes());
        }
        // A record goes in while it fits in `batch_bytes` (as Kafka's `batch.size`; the same
        // estimate as `LingerPolicy::per_batch`), and the first one always.
        let first = self.produced;
        while self.produced < due_n
            && (self.produced == first || b.size_bytes() + cfg.record_size + 32 <= cfg.batch_bytes)
        {
            let ns = self
                .intended(self.produced)
                .duration_since(self.base)
                .as_nanos() as u64;
            self.filler[..8].copy_from_slice(&ns.to_le_bytes());
            // Formatted only when records carry keys: this runs per record.
            let key = cfg.keyed.then(|| format!("key-{:012}", self.produced));
            b.push(
                ts,
                key.as_deref().map(str::as_bytes),
                Some(&self.filler),
                &[],
            );
            self.produced += 1;
        }
        let batch = b.finish().map_err(|e| anyhow!("encoding: {e}"))?;
        let id = self.next_id;
        let req = v1::ProduceStreamRequest {
            request_id: id,
            partitions: vec![v1::PartitionProduce {
                topic: cfg.topic.clone(),
                partition: self.parts[id as usize % self.parts.len()],
                data: Some(v1::partition_produce::Data::RecordBatch(batch)),
            }],
            acks: cfg.acks.wire(),
        };
        self.next_id += 1;
        self.sent.push_back((id, now));
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| anyhow!("sending after the end"))?;
        tx.send(req)
            .await
            .map_err(|_| anyhow!("request stream closed"))?;
        if self.produced >= self.total {
            self.tx = None;
        }
        Ok(())
    }

    /// Counts a produce reply; `false` if the stream ended.
    fn on_reply(&mut self, msg: Option<v1::ProduceStreamResponse>) -> Result<bool> {
        let Some(msg) = msg else { return Ok(false) };
        let at = Instant::now();
        let pos = self
            .sent
            .iter()
            .position(|(id, _)| *id == msg.request_id)
            .ok_or_else(|| anyhow!("reply to unknown request {}", msg.request_id))?;
        let (_, cut) = self.sent.remove(pos).expect("found");
        if msg.results.iter().any(|r| r.error.is_some()) {
            self.stats.errors += 1;
        } else if self.w.counts(cut) {
            // Windowed by the batch's cut time, not the reply's: a request belongs to the
            // window it was sent in, as a record belongs to the one it was intended in.
            self.stats.requests += 1;
            let ns = at.duration_since(cut).as_nanos() as u64;
            self.stats.split().reply.saturating_record(ns.max(1));
        }
        Ok(true)
    }

    /// [`Pacing::Linger`]: a batch goes once its oldest record has waited `linger` or a full
    /// batch is due, whenever the window has room ([`LingerPolicy::decide`]); the wait for
    /// that moment is a timerfd.
    async fn run_linger(&mut self) -> Result<()> {
        let mut timer = PreciseTimer::new()?;
        let policy = LingerPolicy {
            start: self.w.start,
            rate: self.rate,
            linger: self.cfg.linger,
            per_batch: LingerPolicy::per_batch(self.cfg.batch_bytes, self.cfg.record_size),
            window: self.window,
        };
        let drain_deadline = self.w.until + Duration::from_secs(10);
        // Set when the last wake was the timer's (for `timer_late`).
        let mut timer_woke = false;
        loop {
            if self.tx.is_none() && (self.sent.is_empty() || Instant::now() >= drain_deadline) {
                return Ok(());
            }
            let now = Instant::now();
            let wake = match policy.decide(now, self.produced, self.total, self.in_flight()) {
                SendDecision::Send { at, trigger } => {
                    if self.w.counts(now) {
                        if std::mem::take(&mut timer_woke) {
                            let ns = now.duration_since(at).as_nanos() as u64;
                            self.stats.split().timer_late.saturating_record(ns.max(1));
                        }
                        if trigger == Trigger::FullBatch {
                            self.stats.split().full_batch_sends += 1;
                        }
                    }
                    timer_woke = false;
                    self.send_due(now).await?;
                    continue;
                }
                SendDecision::WakeAt(go) => {
                    timer.arm(go)?;
                    Some(go)
                }
                SendDecision::Wait => None,
            };
            tokio::select! {
                biased;
                msg = self.inbound.message() => {
                    if !self.on_reply(msg.context("ProduceStream")?)? {
                        return Ok(());
                    }
                }
                r = timer.fired(), if wake.is_some() => {
                    r?;
                    timer_woke = true;
                }
                () = tokio::time::sleep_until(drain_deadline.into()), if self.tx.is_none() => {}
            }
        }
    }

    /// [`Pacing::Tick`] and [`Pacing::TickOnly`]: the producer before 2026-12-07, kept to
    /// compare with its figures. A batch of the records due on each tokio `interval` tick of
    /// `linger` while the window has room, and (`Tick`) whenever a reply comes.
    async fn run_tick(&mut self) -> Result<()> {
        let on_reply = self.cfg.pacing == Pacing::Tick;
        let mut tick = tokio::time::interval_at(
            self.w.start.into(),
            self.cfg.linger.max(Duration::from_micros(100)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let drain_deadline = self.w.until + Duration::from_secs(10);
        loop {
            let now = Instant::now();
            if self.tx.is_none() && (self.sent.is_empty() || now >= drain_deadline) {
                return Ok(());
            }
            let can_send = self.tx.is_some() && self.in_flight() < self.window;
            tokio::select! {
                biased;
                msg = self.inbound.message() => {
                    if !self.on_reply(msg.context("ProduceStream")?)? {
                        return Ok(());
                    }
                    if !on_reply {
                        continue;
                    }
                }
                _ = tick.tick(), if can_send => {}
                () = tokio::time::sleep_until(drain_deadline.into()), if self.tx.is_none() => {}
            }
            if self.tx.is_none() || self.in_flight() >= self.window {
                continue;
            }
            let now = Instant::now();
            if due_by(now.min(self.w.until), &self.w, self.rate).min(self.total) <= self.produced {
                continue;
            }
            self.send_due(now).await?;
        }
    }
}

/// Why a [`Pacing::Linger`] batch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// Its oldest record has waited `linger` (with `linger` 0: it is due).
    Linger,
    /// A full batch (`batch_bytes`) was due before the linger ran out, or the run's last
    /// record is due (no more will come to fill it).
    FullBatch,
}

/// What the [`Pacing::Linger`] producer does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendDecision {
    /// Cut and send a batch now; `at` is when it became due.
    Send { at: Instant, trigger: Trigger },
    /// Nothing is due yet: wake at this time (unless a reply comes first).
    WakeAt(Instant),
    /// The window is full, or every record is sent: only a reply can change that.
    Wait,
}

/// The send decision of [`Pacing::Linger`], apart from the I/O so it can be tested with
/// explicit instants. Record `i` is due at `start + i / rate`; a batch holds about
/// `per_batch` records; at most `window` requests await their reply.
#[derive(Clone, Copy, Debug)]
struct LingerPolicy {
    start: Instant,
    rate: f64,
    linger: Duration,
    per_batch: u64,
    window: usize,
}

impl LingerPolicy {
    /// Records a full batch holds: `batch_bytes` over each record's value and its ~32 bytes
    /// of framing, at least one.
    fn per_batch(batch_bytes: usize, record_size: usize) -> u64 {
        (batch_bytes / (record_size + 32)).max(1) as u64
    }

    fn intended(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// With `produced` of the run's `total` records put in batches and `in_flight` requests
    /// awaiting their reply, at `now`: send (and why), or when to look again.
    fn decide(&self, now: Instant, produced: u64, total: u64, in_flight: usize) -> SendDecision {
        if produced >= total || in_flight >= self.window {
            return SendDecision::Wait;
        }
        let lingered = self.intended(produced) + self.linger;
        let full = self.intended((produced + self.per_batch - 1).min(total - 1));
        // On a tie the linger is the reason (with linger 0 a one-record batch is "lingered").
        let (at, trigger) = if lingered <= full {
            (lingered, Trigger::Linger)
        } else {
            (full, Trigger::FullBatch)
        };
        if now >= at {
            SendDecision::Send { at, trigger }
        } else {
            SendDecision::WakeAt(at)
        }
    }
}

/// A one-shot `CLOCK_MONOTONIC` timerfd on the runtime's reactor: it expires at the time asked
/// for (nanosecond resolution; the task runs some tens of µs later, see
/// `LatencySplit::timer_late`), where tokio's timers round up to their 1 ms wheel (and a
/// `sleep_until` 20 µs away sleeps ~1 ms). One `timerfd_settime` per arming.
struct PreciseTimer {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    /// The time it is set for.
    armed: Option<Instant>,
}

impl PreciseTimer {
    fn new() -> Result<PreciseTimer> {
        use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .context("timerfd_create")?;
        // SAFETY: the `AsyncFd` owns the `OwnedFd`, which stays open and is the same
        // descriptor until the `AsyncFd` is dropped (nothing takes it out or closes it).
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow!("registering the timerfd: {e}"))?;
        Ok(PreciseTimer { fd, armed: None })
    }

    /// Sets the timer for `at` (at once if that has passed), unless it is already set for it.
    fn arm(&mut self, at: Instant) -> Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
        if self.armed == Some(at) {
            return Ok(());
        }
        // A zero value would disarm it.
        let d = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: d.as_secs() as _,
                tv_nsec: d.subsec_nanos() as _,
            },
        };
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &spec)
            .context("timerfd_settime")?;
        self.armed = Some(at);
        Ok(())
    }

    /// Waits until the timer has expired (cancel-safe: it stays set if dropped).
    async fn fired(&mut self) -> Result<()> {
        loop {
            let mut guard = self.fd.readable().await.context("timerfd")?;
            let mut buf = [0u8; 8];
            match guard
                .try_io(|fd| rustix::io::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from))
            {
                Ok(r) => {
                    r.context("reading the timerfd")?;
                    self.armed = None;
                    return Ok(());
                }
                Err(_would_block) => continue,
            }
        }
    }
}

/// Records due by `t` at `rate` from the window's start (record `i` is due at `i / rate`).
fn due_by(t: Instant, w: &Window, rate: f64) -> u64 {
    (t.saturating_duration_since(w.start).as_secs_f64() * rate).floor() as u64 + 1
}

/// The e2e consumer: decodes every record, latency = now − intended send time (and its split at
/// the batch's cut time, [`LatencySplit`]); stops once it
/// has seen every record the producers made (`total`, known when they finish).
async fn e2e_consume(
    mut stream: tonic::Streaming<v1::SubscribeResponse>,
    base: Instant,
    w: Window,
    mut total: tokio::sync::watch::Receiver<Option<u64>>,
) -> Result<Stats> {
    let mut stats = Stats::new();
    let limits = DecodeLimits::default();
    let mut seen: u64 = 0;
    let deadline = w.until + Duration::from_secs(10);
    loop {
        if let Some(t) = *total.borrow()
            && seen >= t
        {
            break;
        }
        let msg = tokio::select! {
            m = stream.message() => m.context("Subscribe stream")?,
            r = total.changed() => { if r.is_err() { std::future::pending::<()>().await; } continue }
            () = tokio::time::sleep_until(deadline.into()) => break,
        };
        let Some(msg) = msg else { break };
        let Some(v1::subscribe_response::Message::Data(d)) = msg.message else {
            continue;
        };
        let at = Instant::now();
        let now_ns = at.duration_since(base).as_nanos() as u64;
        let buf = d.record_batches;
        let mut pos = 0;
        while pos < buf.len() {
            let h = BatchHeader::parse(&buf[pos..]).map_err(|e| anyhow!("batch header: {e}"))?;
            let batch = Batch::new(buf.slice(pos..pos + h.total_len()), &limits)
                .map_err(|e| anyhow!("batch: {e}"))?;
            pos += h.total_len();
            for r in batch
                .records(&limits)
                .map_err(|e| anyhow!("records: {e}"))?
            {
                let r = r.map_err(|e| anyhow!("record: {e}"))?;
                seen += 1;
                let Some(v) = r.value else { continue };
                if v.len() < 8 {
                    continue;
                }
                let sent = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
                let intended = base + Duration::from_nanos(sent);
                if w.counts(intended) {
                    stats.records += 1;
                    stats.bytes += v.len() as u64;
                    stats.record_ns(now_ns.saturating_sub(sent));
                    if v.len() >= 16 {
                        let cut = u64::from_le_bytes(v[8..16].try_into().expect("8 bytes"));
                        stats
                            .split()
                            .record(cut.saturating_sub(sent), now_ns.saturating_sub(cut));
                    }
                }
            }
        }
        let _ = at;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 48 828.125 records/s (50 MB/s of 1 KiB values): record `i` is due at `i × 20.48 µs`.
    fn policy(linger_us: u64, batch_bytes: usize, window: usize) -> LingerPolicy {
        LingerPolicy {
            start: Instant::now(),
            rate: 50e6 / 1024.0,
            linger: Duration::from_micros(linger_us),
            per_batch: LingerPolicy::per_batch(batch_bytes, 1024),
            window,
        }
    }

    fn us(p: &LingerPolicy, us: f64) -> Instant {
        p.start + Duration::from_secs_f64(us / 1e6)
    }

    #[test]
    fn a_batch_goes_when_its_oldest_record_has_lingered() {
        let p = policy(250, 1 << 20, 1);
        // Record 10 is due at 204.8 µs, so it has lingered 250 µs at 454.8 µs.
        let go = p.intended(10) + Duration::from_micros(250);
        assert_eq!(
            p.decide(go - Duration::from_nanos(1), 10, 1000, 0),
            SendDecision::WakeAt(go),
            "not a nanosecond early"
        );
        for now in [go, go + Duration::from_millis(3)] {
            assert_eq!(
                p.decide(now, 10, 1000, 0),
                SendDecision::Send {
                    at: go,
                    trigger: Trigger::Linger
                }
            );
        }
        // linger 0: as soon as the record is due; before that, wait for it.
        let p0 = policy(0, 1 << 20, 1);
        assert_eq!(
            p0.decide(us(&p0, 100.0), 10, 1000, 0),
            SendDecision::WakeAt(p0.intended(10))
        );
        assert_eq!(
            p0.decide(p0.intended(10), 10, 1000, 0),
            SendDecision::Send {
                at: p0.intended(10),
                trigger: Trigger::Linger
            }
        );
    }

    #[test]
    fn a_full_batch_goes_before_the_linger_runs_out() {
        // Kafka's default batch.size: 16 KiB holds 15 records of 1 KiB (+ 32 bytes each).
        let p = policy(500, 16 << 10, 1);
        assert_eq!(p.per_batch, 15);
        // Records 0..=14 make a full batch once record 14 is due (286.72 µs), before record
        // 0's 500 µs linger.
        let full = p.intended(14);
        assert!(full < p.intended(0) + p.linger);
        assert_eq!(
            p.decide(us(&p, 100.0), 0, 1000, 0),
            SendDecision::WakeAt(full)
        );
        assert_eq!(
            p.decide(full, 0, 1000, 0),
            SendDecision::Send {
                at: full,
                trigger: Trigger::FullBatch
            }
        );
        // With a 250 µs linger the same batch is never full first (12.2 records in 250 µs).
        let p = policy(250, 16 << 10, 1);
        assert_eq!(
            p.decide(us(&p, 0.0), 0, 1000, 0),
            SendDecision::WakeAt(p.intended(0) + p.linger)
        );
        // The run's last records go once the last is due: nothing more will fill the batch.
        let p = policy(500, 16 << 10, 1);
        assert_eq!(
            p.decide(p.intended(999), 997, 1000, 0),
            SendDecision::Send {
                at: p.intended(999),
                trigger: Trigger::FullBatch
            }
        );
    }

    #[test]
    fn a_full_window_holds_everything_back() {
        let p = policy(250, 16 << 10, 2);
        let late = us(&p, 1e6);
        assert_eq!(p.decide(late, 10, 1000, 2), SendDecision::Wait);
        assert_eq!(p.decide(late, 10, 1000, 3), SendDecision::Wait);
        assert!(matches!(
            p.decide(late, 10, 1000, 1),
            SendDecision::Send { .. }
        ));
        // Every record sent: nothing left to decide.
        assert_eq!(p.decide(late, 1000, 1000, 0), SendDecision::Wait);
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Generous upper bound for a wake on a busy shared VM; the lower bounds are exact.
    const LATE: Duration = Duration::from_secs(2);

    #[test]
    fn the_timer_fires_not_early_and_re_arms() {
        current_thread().block_on(async {
            let mut t = PreciseTimer::new().unwrap();
            for _ in 0..3 {
                let at = Instant::now() + Duration::from_micros(300);
                t.arm(at).unwrap();
                t.fired().await.unwrap();
                let now = Instant::now();
                assert!(now >= at, "fired {:?} early", at - now);
                assert!(now - at < LATE, "fired {:?} late", now - at);
            }
        });
    }

    #[test]
    fn re_arming_later_moves_the_expiry() {
        current_thread().block_on(async {
            let mut t = PreciseTimer::new().unwrap();
            t.arm(Instant::now() + Duration::from_millis(20)).unwrap();
            let later = Instant::now() + Duration::from_millis(60);
            t.arm(later).unwrap();
            t.fired().await.unwrap();
            assert!(Instant::now() >= later, "fired at the first arming");
        });
    }

    #[test]
    fn a_past_time_fires_at_once() {
        current_thread().block_on(async {
            let mut t = PreciseTimer::new().unwrap();
            let asked = Instant::now();
            t.arm(asked - Duration::from_millis(5)).unwrap();
            t.fired().await.unwrap();
            assert!(asked.elapsed() < LATE);
        });
    }

    #[test]
    fn an_unread_expiry_does_not_leak_into_the_next_arming() {
        current_thread().block_on(async {
            let mut t = PreciseTimer::new().unwrap();
            t.arm(Instant::now() + Duration::from_millis(1)).unwrap();
            // It expires unread; the reactor sees it readable while this task sleeps.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let later = Instant::now() + Duration::from_millis(30);
            t.arm(later).unwrap();
            t.fired().await.unwrap();
            assert!(Instant::now() >= later, "a stale expiry returned early");
        });
    }
}
