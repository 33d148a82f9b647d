//! A processor's Prometheus metrics and its health endpoint, on its own listener
//! (`metrics_listen`): `GET /metrics` (text exposition format), `GET /health` (200 `ready`
//! once every owned partition's state is restored and the processor is in its group, else
//! 503 with what it is waiting for).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `spool_processor_records_in_total` | counter | topic |
//! | `spool_processor_records_out_total` | counter | topic |
//! | `spool_processor_process_seconds` | histogram (handler call) | |
//! | `spool_processor_commit_seconds` | histogram (transaction commit) | |
//! | `spool_processor_commits_total`, `spool_processor_aborts_total` | counter | |
//! | `spool_processor_retries_total` | counter | topic |
//! | `spool_processor_dead_letters_total` | counter | topic |
//! | `spool_processor_timers_fired_total` | counter | |
//! | `spool_processor_timer_retries_total` | counter (timer handler calls that failed and set the timer again) | |
//! | `spool_processor_timers_dropped_total` | counter (timers removed after their handler's last failed attempt, or a dead letter asked for) | |
//! | `spool_processor_lag` | gauge (offsets behind the high watermark, as Kafka's consumer lag) | topic, partition |
//! | `spool_processor_restoring_partitions` | gauge | |
//! | `spool_processor_restored_records_total` | counter | |
//! | `spool_processor_grown_topics_total` | counter (changelog, dead-letter and retry topics grown to match an input that gained partitions; `allow_input_growth`) | |
//! | `spool_processor_paused_lanes` | gauge (1 when paused) | lane |
//! | `spool_processor_yielding_lanes` | gauge (1 while the lane yields to an active higher lane, as of the last tick) | lane |
//! | `spool_processor_blocked_partitions` | gauge (partitions retrying in place) | |
//! | `spool_processor_parked_records` | gauge (records set aside for partitions held back: restoring, or holding a record) | |
//! | `spool_processor_stream_resets_total` | counter (input streams reopened: pauses, resumes, seeks, rebalances) | |
//! | `spool_processor_refetched_records_total` | counter (fetched records those resets dropped, read again) | |
//! | `spool_processor_loop_wait_seconds` | histogram (the processing loop waiting instead of handling records: `commit` = for the commit in flight, `output` = a full output batch for the previous background write, `local` = the local stores' applies and fsyncs) | on |

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TopicLabel {
    pub(crate) topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PartitionLabel {
    pub(crate) topic: String,
    pub(crate) partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WaitLabel {
    pub(crate) on: &'static str,
}

/// What the processing loop waited for ([`Metrics`]'s `loop_wait_seconds`).
#[derive(Clone, Debug)]
pub(crate) struct LoopWaits {
    /// The commit in flight (a due transaction, a membership change, a stop).
    pub(crate) commit: Histogram,
    /// Sending outputs: a full batch waits for the previous background write.
    pub(crate) output: Histogram,
    /// The local stores: batched applies of committed writes, and their fsyncs.
    pub(crate) local: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LaneLabel {
    pub(crate) lane: String,
}

/// A processor's metrics (cheap to update: atomic adds).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) records_in: Family<TopicLabel, Counter>,
    pub(crate) records_out: Family<TopicLabel, Counter>,
    pub(crate) process_seconds: Histogram,
    pub(crate) commit_seconds: Histogram,
    pub(crate) commits: Counter,
    pub(crate) aborts: Counter,
    pub(crate) retries: Family<TopicLabel, Counter>,
    pub(crate) dead_letters: Family<TopicLabel, Counter>,
    pub(crate) timers_fired: Counter,
    pub(crate) timer_retries: Counter,
    pub(crate) timers_dropped: Counter,
    pub(crate) lag: Family<PartitionLabel, Gauge>,
    pub(crate) restoring: Gauge,
    pub(crate) restored_records: Counter,
    pub(crate) grown_topics: Counter,
    pub(crate) paused_lanes: Family<LaneLabel, Gauge>,
    pub(crate) yielding_lanes: Family<LaneLabel, Gauge>,
    pub(crate) blocked: Gauge,
    pub(crate) parked: Gauge,
    pub(crate) stream_resets: Counter,
    pub(crate) refetched: Counter,
    pub(crate) waits: LoopWaits,
    /// Health: in the group with every owned partition restored.
    pub(crate) ready: AtomicBool,
    /// Records processed (for progress and rate).
    pub(crate) done: AtomicU64,
    /// When the processing loop last went round (ms on a monotonic clock from `start`).
    last_alive_ms: AtomicU64,
    start: std::time::Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let wait_family: Family<WaitLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_01, 4.0, 12)));
        let wait = |on| wait_family.get_or_create(&WaitLabel { on }).clone();
        let waits = LoopWaits {
            commit: wait("commit"),
            output: wait("output"),
            local: wait("local"),
        };
        let m = Metrics {
            records_in: Family::default(),
            records_out: Family::default(),
            process_seconds: Histogram::new(exponential_buckets(0.000_001, 4.0, 14)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            commits: Counter::default(),
            aborts: Counter::default(),
            retries: Family::default(),
            dead_letters: Family::default(),
            timers_fired: Counter::default(),
            timer_retries: Counter::default(),
            timers_dropped: Counter::default(),
            lag: Family::default(),
            restoring: Gauge::default(),
            restored_records: Counter::default(),
            grown_topics: Counter::default(),
            paused_lanes: Family::default(),
            yielding_lanes: Family::default(),
            blocked: Gauge::default(),
            parked: Gauge::default(),
            stream_resets: Counter::default(),
            refetched: Counter::default(),
            waits,
            ready: AtomicBool::new(false),
            done: AtomicU64::new(0),
            last_alive_ms: AtomicU64::new(0),
            start: std::time::Instant::now(),
            registry: Registry::default(),
        };
        let p = "spool_processor";
        registry.register(
            format!("{p}_records_in"),
            "Input records processed",
            m.records_in.clone(),
        );
        registry.register(
            format!("{p}_records_out"),
            "Records emitted (committed or not yet)",
            m.records_out.clone(),
        );
        registry.register(
            format!("{p}_process_seconds"),
            "Handler call duration",
            m.process_seconds.clone(),
        );
        registry.register(
            format!("{p}_commit_seconds"),
            "Transaction commit duration",
            m.commit_seconds.clone(),
        );
        registry.register(
            format!("{p}_commits"),
            "Transactions committed",
            m.commits.clone(),
        );
        registry.register(
            format!("{p}_aborts"),
            "Transactions aborted",
            m.aborts.clone(),
        );
        registry.register(
            format!("{p}_retries"),
            "Failed attempts that were retried",
            m.retries.clone(),
        );
        registry.register(
            format!("{p}_dead_letters"),
            "Inputs sent to a dead-letter topic",
            m.dead_letters.clone(),
        );
        registry.register(
            format!("{p}_timers_fired"),
            "Timers fired",
            m.timers_fired.clone(),
        );
        registry.register(
            format!("{p}_timer_retries"),
            "Timer handler calls that failed and set their timer again",
            m.timer_retries.clone(),
        );
        registry.register(
            format!("{p}_timers_dropped"),
            "Timers dropped after their handler's last failed attempt",
            m.timers_dropped.clone(),
        );
        registry.register(
            format!("{p}_lag"),
            "Records between the position and the high watermark",
            m.lag.clone(),
        );
        registry.register(
            format!("{p}_restoring_partitions"),
            "Partitions restoring state from the changelog",
            m.restoring.clone(),
        );
        registry.register(
            format!("{p}_restored_records"),
            "Changelog records applied while restoring",
            m.restored_records.clone(),
        );
        registry.register(
            format!("{p}_grown_topics"),
            "Internal topics grown to match an input that gained partitions",
            m.grown_topics.clone(),
        );
        registry.register(
            format!("{p}_paused_lanes"),
            "1 for each paused lane",
            m.paused_lanes.clone(),
        );
        registry.register(
            format!("{p}_yielding_lanes"),
            "1 for each lane yielding the loop to an active higher lane",
            m.yielding_lanes.clone(),
        );
        registry.register(
            format!("{p}_blocked_partitions"),
            "Partitions waiting to retry a record in place",
            m.blocked.clone(),
        );
        registry.register(
            format!("{p}_parked_records"),
            "Records set aside for partitions held back (restoring, or holding a record)",
            m.parked.clone(),
        );
        registry.register(
            format!("{p}_stream_resets"),
            "Input streams reopened (pauses, resumes, seeks, rebalances), dropping what they had fetched",
            m.stream_resets.clone(),
        );
        registry.register(
            format!("{p}_refetched_records"),
            "Fetched input records dropped by stream resets (read again)",
            m.refetched.clone(),
        );
        registry.register(
            format!("{p}_loop_wait_seconds"),
            "Time the processing loop waited instead of handling records, by what it waited for",
            wait_family,
        );
        Metrics { registry, ..m }
    }

    pub(crate) fn topic(topic: &str) -> TopicLabel {
        TopicLabel {
            topic: topic.to_owned(),
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        s
    }

    /// Whether the processor is ready (health endpoint).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The processing loop went round (the watchdog's proof of life).
    pub(crate) fn alive(&self) {
        self.last_alive_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the processing loop last went round.
    pub fn since_alive(&self) -> std::time::Duration {
        let now = self.start.elapsed().as_millis() as u64;
        std::time::Duration::from_millis(
            now.saturating_sub(self.last_alive_ms.load(Ordering::Relaxed)),
        )
    }

    /// Input streams reopened so far (`spool_processor_stream_resets_total`; updated every
    /// tick).
    pub fn stream_resets(&self) -> u64 {
        self.stream_resets.get()
    }

    /// Fetched records dropped by those resets (`spool_processor_refetched_records_total`).
    pub fn refetched_records(&self) -> u64 {
        self.refetched.get()
    }

    /// Records parked now (`spool_processor_parked_records`).
    pub fn parked_records(&self) -> i64 {
        self.parked.get()
    }

    /// Records processed since start.
    pub fn records_done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// The counters of a per-topic family, kept by topic so that counting a record costs a hash
/// lookup (no label allocated, no family lock). At most [`TopicCounters::MAX`] topics (then
/// it starts over: the family keeps the counts).
#[derive(Debug, Default)]
pub(crate) struct TopicCounters {
    by_topic: std::collections::HashMap<String, Counter>,
}

impl TopicCounters {
    const MAX: usize = 1024;

    /// Adds one to `topic`'s counter of `family`.
    pub(crate) fn inc(&mut self, family: &Family<TopicLabel, Counter>, topic: &str) {
        if let Some(c) = self.by_topic.get(topic) {
            c.inc();
            return;
        }
        if self.by_topic.len() >= Self::MAX {
            self.by_topic.clear();
        }
        let c = family.get_or_create(&Metrics::topic(topic)).clone();
        c.inc();
        self.by_topic.insert(topic.to_owned(), c);
    }
}

/// Serves `/metrics` and `/health` on `listener` until `stop` turns true.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    match req.uri().path() {
                        "/metrics" => Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(metrics.render()))),
                        "/health" if metrics.is_ready() => {
                            Response::builder().body(Full::new(Bytes::from_static(b"ready\n")))
                        }
                        "/health" => Response::builder()
                            .status(StatusCode::SERVICE_UNAVAILABLE)
                            .body(Full::new(Bytes::from_static(
                                b"not ready: joining the group or restoring state\n",
                            ))),
                        _ => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"try /metrics or /health\n"))),
                    }
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}
