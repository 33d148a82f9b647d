//! `spoold`: Spool's broker, serving the log engine over gRPC (`spool.v1`).
//!
//! The binary is thin (`src/main.rs`: flags, logging, systemd); everything else is here so
//! tests and embedders can run a broker on a listener they bound themselves:
//!
//! ```text
//! let broker = Broker::open(config)?;            // blocking: opens and recovers the log
//! broker.serve(listener, metrics_listener, shutdown_future).await?; // until shutdown, then flush and close
//! ```
//!
//! Invariants:
//! - Engine work that may block (appends, fsyncs, reads that may fault pages in) runs on
//!   tokio's blocking pool, never on a reactor thread. The one exception is an append that
//!   cannot block for long: a small request of uncompressed batches that waits for no
//!   fdatasync (on the async path, no `fsync = always` partition; or a `ProduceStream`
//!   request with `acks = written | none`, whose sync then runs on the blocking pool) whose
//!   partitions take it at once (`Partition::try_append_nowait`: writer lock free, no roll
//!   due), a copy into the page cache that costs less than the hand-off
//!   (`service/produce.rs`).
//! - Engine errors become wire errors in one place (`error.rs`).
//! - Every request is bounded before the broker decodes it (`request_limits.rs`): its size,
//!   by its service's decode limit (`limits.max_request_bytes` for Produce, derived from the
//!   count limits for the others), and the elements of its repeated fields (partitions,
//!   records, offsets, topics), counted on the wire by the server codec against
//!   `limits.max_partitions_per_request` / `max_records_per_request`. Handlers check the same
//!   counts again after decoding, and bound fetch sizes and waits.
//! - Replies are assembled within their byte limit and trimmed to it (`reply.rs`); replies in
//!   flight are charged to a broker-wide and a per-connection memory budget until written
//!   (`budget.rs`).
//! - Shutdown turns every health status NOT_SERVING, stops accepting, ends subscriptions,
//!   produce streams and health watches (`health.rs`), waits at most `shutdown_timeout_ms`
//!   for in-flight requests, then flushes and closes the log.
//! - A connection without request or response data for `limits.idle_timeout_ms`, or without
//!   a first request for `limits.handshake_timeout_ms`, is closed; one source address holds
//!   at most `limits.max_connections_per_address` connections (`conn.rs`).

pub mod affinity;
mod auth;
mod budget;
pub mod config;
mod conn;
mod convert;
pub mod devcerts;
pub mod error;
mod failpoint;
mod groups;
mod health;
mod metrics;
mod metrics_text;
mod offsets;
#[cfg(test)]
mod powerloss;
mod process_metrics;
mod producer_ids;
mod reply;
mod request_limits;
pub mod rlimit;
mod service;
mod trim;
mod txn;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use spool_log_engine::io::FileSystem;
use spool_log_engine::{CleanerOptions, Clock, Limits, Log, LogOptions, SystemClock, TopicConfig};
use spool_proto::v1::admin_service_server::AdminServiceServer;
use spool_proto::v1::consume_service_server::ConsumeServiceServer;
use spool_proto::v1::group_service_server::GroupServiceServer;
use spool_proto::v1::offset_service_server::OffsetServiceServer;
use spool_proto::v1::produce_service_server::ProduceServiceServer;
use spool_proto::v1::transaction_service_server::TransactionServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

pub use auth::{TokenConfig, hash_token};
pub use config::{Config, log_colour};
pub use error::{BrokerError, ConfigError};
pub use offsets::OFFSETS_TOPIC;
pub use producer_ids::PRODUCER_IDS_TOPIC;
pub use txn::TXN_STATE_TOPIC;

/// Why the broker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log could not be opened (corruption is reported here, with file and position).
    #[error("opening the log: {0}")]
    Engine(#[from] BrokerError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection setup failed.
    #[error("reflection: {0}")]
    Reflection(String),
}

/// State shared by all services.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) log: Arc<Log>,
    pub(crate) config: Config,
    pub(crate) topic_defaults: TopicConfig,
    pub(crate) limits: Limits,
    pub(crate) offsets: Arc<offsets::OffsetStore>,
    pub(crate) producer_ids: Arc<producer_ids::ProducerIds>,
    pub(crate) groups: Arc<groups::Groups>,
    pub(crate) txns: Arc<txn::Transactions>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) auth: Arc<auth::Auth>,
    /// Memory for replies in flight (`budget.rs`).
    pub(crate) memory: Arc<budget::ReplyMemory>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl State {
    /// Wall-clock milliseconds from the broker's one clock: the log's, given to
    /// [`Broker::open_with_clock`] (the system clock by default). Every wall-clock reading of
    /// the broker (timestamps it stamps, commit times, transaction timeouts, producer-id
    /// allocation, group snapshots, metrics) and of the engine (rolls, retention, append
    /// times) comes from it; timers and timeouts use tokio's monotonic time.
    pub(crate) fn now_ms(&self) -> i64 {
        self.log.clock().now_ms()
    }
}

/// An opened broker, ready to serve.
#[derive(Debug)]
pub struct Broker {
    state: Arc<State>,
    shutdown_tx: watch::Sender<bool>,
}

impl Broker {
    /// Opens (and recovers) the log. Blocking: call it before starting to serve, or from a
    /// blocking context.
    pub fn open(config: Config) -> Result<Broker, StartError> {
        Broker::open_with_clock(config, Arc::new(SystemClock))
    }

    /// [`Broker::open`] with the wall clock every part of the broker and its log reads
    /// (tests inject a fixed or stepped one).
    pub fn open_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Broker, StartError> {
        Broker::open_on(config, clock, spool_log_engine::io::real())
    }

    /// [`Broker::open_with_clock`] on the file system `fs`: every file the broker's durable
    /// state lives in (the log, its internal topics) is read, written and synced through it.
    /// Tests pass a simulated disk (`spool_io::sim`) to cut the power inside the
    /// coordinators.
    pub fn open_on(
        config: Config,
        clock: Arc<dyn Clock>,
        fs: Arc<dyn FileSystem>,
    ) -> Result<Broker, StartError> {
        config.validate()?;
        let options = LogOptions {
            limits: Limits::default(),
            retention_check_interval: Duration::from_millis(config.retention_check_interval_ms),
            cleaner: CleanerOptions {
                check_interval: Duration::from_millis(config.cleaner_check_interval_ms),
                dedupe_buffer_bytes: usize::try_from(config.cleaner_dedupe_buffer_bytes)
                    .unwrap_or(usize::MAX),
                ..CleanerOptions::default()
            },
            clock,
            fs,
            zero_ahead_bytes: config.zero_ahead_bytes,
            ..LogOptions::default()
        };
        Broker::open_with_options(config, options)
    }

    /// Opens the broker on a log opened with `options` (the power-cut loops turn the
    /// background maintenance off, to run it at chosen steps).
    pub(crate) fn open_with_options(
        config: Config,
        options: LogOptions,
    ) -> Result<Broker, StartError> {
        config.validate()?;
        let topic_defaults = config.topic_defaults.to_topic_config()?;
        let limits = options.limits.clone();
        let log = Log::open(&config.data_dir, options).map_err(BrokerError::from)?;
        for (topic, partition, r) in log.recovery_reports() {
            if r.bytes_truncated > 0 || r.bytes_scanned > 0 || r.bytes_zero_tail > 0 {
                tracing::info!(
                    topic,
                    partition,
                    scanned = r.bytes_scanned,
                    truncated = r.bytes_truncated,
                    zero_tail = r.bytes_zero_tail,
                    "recovered partition"
                );
            }
        }
        let log = Arc::new(log);
        let offsets = Arc::new(
            offsets::OffsetStore::open(log.clone(), &limits)?
                .with_max_answer_bytes(config.limits.max_request_bytes),
        );
        let producer_ids = Arc::new(producer_ids::ProducerIds::open(log.clone())?);
        let metrics = Arc::new(metrics::Metrics::new(log.clone(), offsets.clone()));
        let auth = Arc::new(auth::Auth::new(&config.auth.tokens)?);
        let memory = Arc::new(budget::ReplyMemory::new(
            usize::try_from(config.limits.max_reply_memory_bytes).unwrap_or(usize::MAX),
            usize::try_from(config.limits.max_reply_memory_bytes_per_connection)
                .unwrap_or(usize::MAX),
            metrics.memory(),
        ));
        let (shutdown_tx, shutdown) = watch::channel(false);
        let groups = Arc::new(groups::Groups::open(
            log.clone(),
            offsets.clone(),
            metrics.clone(),
            config.groups.clone(),
            shutdown.clone(),
        ));
        // Before serving: every recorded decision carried out, every undecided transaction
        // aborted.
        let txns = Arc::new(txn::Transactions::open(
            log.clone(),
            offsets.clone(),
            groups.clone(),
            producer_ids.clone(),
            config.transactions.clone(),
        )?);
        Ok(Broker {
            state: Arc::new(State {
                log,
                config,
                topic_defaults,
                limits,
                offsets,
                producer_ids,
                groups,
                txns,
                metrics,
                auth,
                memory,
                shutdown,
            }),
            shutdown_tx,
        })
    }

    /// Number of topics and partitions (for status lines).
    pub fn summary(&self) -> (usize, usize) {
        let topics = self.state.log.topics();
        let partitions = topics
            .iter()
            .filter_map(|t| self.state.log.partitions(t).ok())
            .map(|p| p.len())
            .sum();
        (topics.len(), partitions)
    }

    /// Serves gRPC on `listener` (and Prometheus metrics on `metrics_listener`, if given)
    /// until `shutdown` resolves, then shuts down gracefully (bounded by
    /// `shutdown_timeout_ms`) and closes the log.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let state = self.state.clone();
        let cfg = &state.config;
        let max = cfg.limits.max_request_bytes;
        // Requests are counted on the wire before they are decoded (request_limits.rs).
        request_limits::install(&cfg.limits);
        let decode = request_limits::DecodeLimits::of(&cfg.limits);
        let (reporter, health_service) = health::Health::new(HEALTH_NAMES, state.shutdown.clone());
        reporter.start().await;
        // Restored groups' sessions run from now; so do transaction timeouts.
        state.groups.start();
        state.txns.start(state.shutdown.clone());
        // Freed reply memory goes back to the system after bursts.
        tokio::spawn(trim::run(
            state.memory.global().clone(),
            state.memory.metrics().trims.clone(),
            state.shutdown.clone(),
        ));
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(spool_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(spool_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartError::Reflection(e.to_string()))?;

        let (stop_tx, mut stop_rx) = watch::channel(false);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &cfg.tls {
            builder = builder.tls_config(tls_config(tls)?)?;
        }
        let intercept = state.auth.interceptor();
        let router = builder
            // Marks connections active as requests and their data pass (idle timeout).
            .layer(conn::ActivityLayer)
            // Charges reply memory until replies are written (budget.rs).
            .layer(budget::ReplyMemoryLayer::new(&state.memory))
            .tcp_nodelay(true)
            // Unary handlers (fetch long polls included, whose wait is capped below this) are
            // cut off after request_timeout_ms; streams are not (the timeout covers producing
            // the response head only).
            .timeout(Duration::from_millis(cfg.limits.request_timeout_ms))
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(32 << 20)
            .max_frame_size(1 << 20)
            .max_concurrent_streams(cfg.limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .http2_max_pending_accept_reset_streams(Some(64))
            // Health and reflection stay open (load balancers and grpcurl need them); every
            // spool.v1 service goes through the token check.
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(
                AdminServiceServer::new(service::Admin::new(state.clone()))
                    .max_decoding_message_size(decode.admin)
                    .max_encoding_message_size(max),
                intercept.clone(),
            ))
            .add_service(InterceptedService::new(
                ProduceServiceServer::new(service::Produce::new(state.clone()))
                    .max_decoding_message_size(decode.produce)
                    .max_encoding_message_size(max),
                intercept.clone(),
            ))
            .add_service(InterceptedService::new(
                ConsumeServiceServer::new(service::Consume::new(state.clone()))
                    .max_decoding_message_size(decode.consume)
                    .max_encoding_message_size(max),
                intercept.clone(),
            ))
            .add_service(InterceptedService::new(
                OffsetServiceServer::new(service::Offsets::new(state.clone()))
                    .max_decoding_message_size(decode.offsets)
                    .max_encoding_message_size(max),
                intercept.clone(),
            ))
            .add_service(InterceptedService::new(
                GroupServiceServer::new(service::Groups::new(state.clone()))
                    .max_decoding_message_size(decode.groups)
                    .max_encoding_message_size(max),
                intercept.clone(),
            ))
            .add_service(InterceptedService::new(
                TransactionServiceServer::new(service::Transactions::new(state.clone()))
                    .max_decoding_message_size(decode.txns)
                    .max_encoding_message_size(max),
                intercept,
            ));
        if let Some(ml) = metrics_listener {
            tokio::spawn(metrics::serve(state.metrics.clone(), ml, stop_rx.clone()));
        }
        let incoming = conn::incoming(
            listener,
            conn::ConnLimits {
                max: cfg.limits.max_connections,
                max_per_address: cfg.limits.max_connections_per_address,
                handshake_timeout: Duration::from_millis(cfg.limits.handshake_timeout_ms),
                idle_timeout: Duration::from_millis(cfg.limits.idle_timeout_ms),
            },
            state.memory.clone(),
            state.metrics.conn(),
        );
        let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));

        shutdown.await;
        tracing::info!("shutting down: no new connections, ending subscriptions");
        // Health turns NOT_SERVING first, so a `Watch` stream's last status is that one.
        reporter.stop().await;
        let _ = self.shutdown_tx.send(true);
        let _ = stop_tx.send(true);
        let limit = Duration::from_millis(cfg.shutdown_timeout_ms);
        let served = match tokio::time::timeout(limit, server).await {
            Ok(Ok(r)) => r.map_err(StartError::from),
            Ok(Err(join)) => {
                tracing::error!(error = %join, "server task failed");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = cfg.shutdown_timeout_ms,
                    "in-flight requests did not finish in time; closing anyway"
                );
                Ok(())
            }
        };
        let log = state.log.clone();
        let closed = tokio::task::spawn_blocking(move || log.close()).await;
        match closed {
            Ok(Ok(())) => tracing::info!("log flushed and closed"),
            Ok(Err(e)) => tracing::error!(error = %e, "closing the log failed"),
            Err(e) => tracing::error!(error = %e, "closing the log panicked"),
        }
        served
    }
}

/// The services whose health `grpc.health.v1` reports (besides the server's, `""`).
const HEALTH_NAMES: health::Names = &[
    health::name::<AdminServiceServer<service::Admin>>(),
    health::name::<ProduceServiceServer<service::Produce>>(),
    health::name::<ConsumeServiceServer<service::Consume>>(),
    health::name::<OffsetServiceServer<service::Offsets>>(),
    health::name::<GroupServiceServer<service::Groups>>(),
    health::name::<TransactionServiceServer<service::Transactions>>(),
];

/// Reads the PEM files of the TLS settings.
fn tls_config(tls: &config::TlsConfig) -> Result<tonic::transport::ServerTlsConfig, StartError> {
    // The operator's key material, not durable state: no I/O seam needed.
    #[allow(clippy::disallowed_methods)]
    let read = |p: &std::path::Path| {
        std::fs::read(p)
            .map_err(|e| ConfigError::Invalid(format!("tls: reading {}: {e}", p.display())))
    };
    let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
    let mut out = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        out = out.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(out)
}

/// Runs blocking engine work on tokio's blocking pool; its failure as a status (see
/// [`blocking_task`]).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tonic::Status> {
    blocking_task(f).await.map_err(tonic::Status::from)
}

/// Runs blocking engine work on tokio's blocking pool. If it panicked: `Internal` (a bug; the
/// panic is logged with the error, the client is told only that the broker failed); if the
/// runtime cancelled it before it ran (it is shutting down): `ShuttingDown`.
pub(crate) async fn blocking_task<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        if e.is_cancelled() {
            BrokerError::ShuttingDown
        } else {
            tracing::error!(error = %e, "a task on the blocking pool panicked");
            BrokerError::Internal("a worker failed inside the broker; see its log".into())
        }
    })
}
