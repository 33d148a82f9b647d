//! The connection to a broker and the unary calls: admin, fetch, offsets.
//!
//! A [`Client`] is one HTTP/2 connection (a tonic `Channel`, which reconnects by itself after a
//! failure) shared by every call, producer and consumer made from it; cloning it is cheap.
//! Requests are multiplexed as HTTP/2 streams (the broker allows 256 concurrent streams per
//! connection by default; each consumer subscription holds one).
//!
//! Every unary call is bounded by the request timeout (a `Fetch` by the timeout plus its
//! `max_wait`); the timeout is enforced on the client and also sent as `grpc-timeout`.
//!
//! Security: with [`ClientBuilder::tls`] the connection is TLS (rustls, the broker's `[tls]`;
//! a client certificate too for mutual TLS), and with [`ClientBuilder::bearer_token`] every
//! request carries `authorization: Bearer <token>` (the broker's `[[auth.tokens]]`). Both are
//! off by default, as on the broker, which then only listens on loopback. The token is added in
//! `Client::stream_request`, which every request passes through, and never appears in `Debug`
//! output.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use spool_proto::v1;
use spool_proto::v1::admin_service_client::AdminServiceClient;
use spool_proto::v1::consume_service_client::ConsumeServiceClient;
use spool_proto::v1::group_service_client::GroupServiceClient;
use spool_proto::v1::offset_service_client::OffsetServiceClient;
use spool_proto::v1::produce_service_client::ProduceServiceClient;
use spool_proto::v1::transaction_service_client::TransactionServiceClient;
use spool_record::DecodeLimits;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::consumer::{Consumer, ConsumerConfig};
use crate::decode::decode_batches;
use crate::error::{Error, Result};
use crate::producer::{Acks, Producer, ProducerConfig};
use crate::types::{
    CommittedOffset, Fetched, GroupDeletion, GroupSummary, Isolation, ListedOffset, OffsetCommit,
    OffsetSpec, TopicConfig, TopicDescription, TopicPartition, TopicSettings, TopicSummary,
    TxnOffsets,
};

/// The broker's default address.
pub const DEFAULT_BROKER: &str = "127.0.0.1:7170";
/// The port used when an address gives none.
pub const DEFAULT_PORT: u16 = 7170;

/// Connection options. Defaults match the broker's own settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Longest wait for the TCP connection (default 10 s).
    pub connect_timeout: Duration,
    /// Longest wait for a unary reply (default 30 s, the broker's own request limit).
    pub request_timeout: Duration,
    /// HTTP/2 initial stream window (default 16 MiB, as the broker).
    pub stream_window_bytes: u32,
    /// HTTP/2 initial connection window (default 32 MiB, as the broker).
    pub connection_window_bytes: u32,
    /// TCP_NODELAY (default on).
    pub tcp_nodelay: bool,
    /// Largest gRPC message sent or received (default 64 MiB, the broker's
    /// `max_request_bytes`).
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping interval (default 30 s, as the broker); detects dead connections.
    pub keepalive_interval: Duration,
    /// Longest wait for a keepalive ack (default 20 s).
    pub keepalive_timeout: Duration,
    /// Bounds used when decoding received batches (decompressed size, records per batch…).
    pub decode_limits: DecodeLimits,
    /// TLS; `None` is plaintext HTTP/2.
    pub tls: Option<TlsOptions>,
    /// Bearer token sent with every request; `None` sends none.
    pub token: Option<BearerToken>,
}

/// TLS settings of a client.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// PEM bundle of the CA(s) that signed the broker's certificate. There are no built-in
    /// roots: a broker's certificate is normally from a private CA (or self-signed).
    pub ca_pem: Vec<u8>,
    /// Name to check the broker's certificate against; default: the address's host.
    pub domain: Option<String>,
    /// Client certificate and key (PEM), for a broker that requires mutual TLS.
    pub identity: Option<ClientIdentity>,
}

/// A client certificate for mutual TLS.
#[derive(Clone)]
pub struct ClientIdentity {
    /// PEM certificate chain.
    pub cert_pem: Vec<u8>,
    /// PEM private key.
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &format_args!("<redacted>"))
            .finish()
    }
}

/// A bearer token, kept as the header value it becomes; `Debug` does not show it.
#[derive(Clone)]
pub struct BearerToken(AsciiMetadataValue);

impl BearerToken {
    /// Checks that `token` can travel in a header (visible ASCII, no spaces).
    pub fn new(token: &str) -> Result<BearerToken> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Config(
                "a bearer token must be non-empty visible ASCII without spaces".into(),
            ));
        }
        let mut v: AsciiMetadataValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Config("the bearer token is not a valid header value".into()))?;
        v.set_sensitive(true);
        Ok(BearerToken(v))
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            stream_window_bytes: 16 << 20,
            connection_window_bytes: 32 << 20,
            tcp_nodelay: true,
            max_message_bytes: 64 << 20,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            decode_limits: DecodeLimits::default(),
            tls: None,
            token: None,
        }
    }
}

/// Builds a [`Client`] with non-default options.
///
/// ```no_run
/// # async fn f() -> spool_client::Result<()> {
/// use std::time::Duration;
/// let client = spool_client::Client::builder("127.0.0.1:7170")
///     .request_timeout(Duration::from_secs(5))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    addr: String,
    options: ClientOptions,
    /// A setting that failed, reported when connecting (keeps the setters chainable).
    error: Option<Error>,
}

impl ClientBuilder {
    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.options.connect_timeout = d;
        self
    }

    /// Sets the unary request timeout.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.options.request_timeout = d;
        self
    }

    /// Sets the HTTP/2 stream and connection windows.
    pub fn windows(mut self, stream_bytes: u32, connection_bytes: u32) -> Self {
        self.options.stream_window_bytes = stream_bytes;
        self.options.connection_window_bytes = connection_bytes;
        self
    }

    /// Sets TCP_NODELAY.
    pub fn tcp_nodelay(mut self, on: bool) -> Self {
        self.options.tcp_nodelay = on;
        self
    }

    /// Sets the largest gRPC message sent or received.
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.options.max_message_bytes = n;
        self
    }

    /// Connects with TLS (addresses may then be given as `https://host:port` or `host:port`).
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.options.tls = Some(tls);
        self
    }

    /// Sends `authorization: Bearer <token>` with every request. The error is
    /// [`Error::Config`] for a token that cannot be a header value; it is reported by
    /// `connect` / `connect_lazy`.
    pub fn bearer_token(mut self, token: &str) -> Self {
        match BearerToken::new(token) {
            Ok(t) => self.options.token = Some(t),
            Err(e) => self.error = Some(e),
        }
        self
    }

    /// Replaces all options.
    pub fn options(mut self, options: ClientOptions) -> Self {
        self.options = options;
        self
    }

    fn endpoint(&self) -> Result<Endpoint> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let o = &self.options;
        let uri = endpoint_uri(&self.addr, o.tls.is_some())?;
        let mut endpoint = Endpoint::from_shared(uri).map_err(|e| Error::InvalidAddress {
            addr: self.addr.clone(),
            reason: e.to_string(),
        })?;
        if let Some(tls) = &o.tls {
            let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some(d) = &tls.domain {
                cfg = cfg.domain_name(d.clone());
            }
            if let Some(id) = &tls.identity {
                cfg = cfg.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
            }
            endpoint = endpoint
                .tls_config(cfg)
                .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        }
        Ok(endpoint
            .connect_timeout(o.connect_timeout)
            .tcp_nodelay(o.tcp_nodelay)
            .initial_stream_window_size(o.stream_window_bytes)
            .initial_connection_window_size(o.connection_window_bytes)
            // Accept 1 MiB DATA frames, as the broker does: with h2's default of 16 KiB a
            // 1 MiB Subscribe/Fetch message arrives in 64 frames, and catch-up reads ran at
            // 1.3-1.6 GB/s instead of 1.8-1.9 (spool-loadgen consume, docs/benchmarks.md).
            .max_frame_size(1 << 20)
            .http2_keep_alive_interval(o.keepalive_interval)
            .keep_alive_timeout(o.keepalive_timeout)
            .keep_alive_while_idle(true))
    }

    /// Connects now: fails with [`Error::Connect`] if the broker cannot be reached (TCP,
    /// TLS and HTTP/2 handshakes, within the connect timeout).
    pub async fn connect(self) -> Result<Client> {
        let endpoint = self.endpoint()?;
        let addr = authority(&endpoint, &self.addr);
        let tls = self.options.tls.is_some();
        let channel = endpoint.connect().await.map_err(|e| {
            let mut reason = crate::error::describe_transport_error(&e);
            if let Some(hint) = crate::error::tls_mode_hint(&reason, tls) {
                reason = format!("{reason} ({hint})");
            }
            Error::Connect {
                addr: addr.clone(),
                reason,
                source: Arc::new(e),
            }
        })?;
        Ok(self.client(channel, addr))
    }

    /// Returns a client that connects on first use (and reconnects after failures); calls
    /// fail with [`Error::Unavailable`] while the broker is unreachable.
    pub fn connect_lazy(self) -> Result<Client> {
        let endpoint = self.endpoint()?;
        let addr = authority(&endpoint, &self.addr);
        Ok(self.client(endpoint.connect_lazy(), addr))
    }

    fn client(self, channel: Channel, addr: String) -> Client {
        Client {
            inner: Arc::new(Inner {
                channel,
                addr,
                options: self.options,
            }),
        }
    }
}

/// `host:port` of an endpoint (the port filled in when the address had none).
fn authority(endpoint: &Endpoint, given: &str) -> String {
    endpoint
        .uri()
        .authority()
        .map_or_else(|| given.to_owned(), ToString::to_string)
}

/// `host:port`, `http://host:port` or (with TLS) `https://host:port` → the URI tonic wants.
fn endpoint_uri(addr: &str, tls: bool) -> Result<String> {
    let invalid = |reason: &str| Error::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let (scheme, rest) = match addr.split_once("://") {
        Some(("http", rest)) if !tls => ("http", rest),
        Some(("https", rest)) if tls => ("https", rest),
        Some(("http", _)) => return Err(invalid("http:// with TLS options: use https://")),
        Some(("https", _)) => {
            return Err(invalid("https:// needs TLS options (ClientBuilder::tls)"));
        }
        Some(_) => return Err(invalid("only http:// and https:// addresses are supported")),
        None => (if tls { "https" } else { "http" }, addr),
    };
    if rest.is_empty() {
        return Err(invalid("empty address"));
    }
    Ok(format!("{scheme}://{}", with_port(rest).map_err(invalid)?))
}

/// `host:port` as given, or `host` with the default port 7170 (as Kafka clients add 9092);
/// IPv6 addresses go in brackets (`[::1]:7170`, `[::1]`).
fn with_port(hostport: &str) -> std::result::Result<String, &'static str> {
    let default = DEFAULT_PORT;
    let port_ok = |p: &str| !p.is_empty() && p.parse::<u16>().is_ok();
    if let Some(v6) = hostport.strip_prefix('[') {
        let (_, after) = v6
            .split_once(']')
            .ok_or("an IPv6 address needs its closing bracket: [::1]:7170")?;
        return match after {
            "" => Ok(format!("{hostport}:{default}")),
            p if p.strip_prefix(':').is_some_and(port_ok) => Ok(hostport.to_owned()),
            _ => Err("after [IPv6], give :PORT (a number up to 65535)"),
        };
    }
    match hostport.matches(':').count() {
        0 => Ok(format!("{hostport}:{default}")),
        1 => {
            let (host, port) = hostport.split_once(':').unwrap_or_default();
            if host.is_empty() {
                Err("no host before the port: write HOST:PORT")
            } else if !port_ok(port) {
                Err("the port must be a number up to 65535: write HOST:PORT")
            } else {
                Ok(hostport.to_owned())
            }
        }
        _ => Err("an IPv6 address goes in brackets: [::1]:7170"),
    }
}

#[derive(Debug)]
struct Inner {
    channel: Channel,
    addr: String,
    options: ClientOptions,
}

/// A connection to a broker. Cheap to clone; all clones share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Options of [`Client::fetch`].
#[derive(Clone, Copy, Debug)]
pub struct FetchOptions {
    /// Largest amount of data returned (at least one batch is returned anyway).
    pub max_bytes: u32,
    /// Return as soon as this many bytes are available (0: at once).
    pub min_bytes: u32,
    /// Longest time to wait for `min_bytes`.
    pub max_wait: Duration,
    /// What the fetch may return (default: read committed, as Spool's consumers).
    pub isolation: Isolation,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            max_bytes: 1 << 20,
            min_bytes: 0,
            max_wait: Duration::ZERO,
            isolation: Isolation::ReadCommitted,
        }
    }
}

/// The wire form of an isolation level.
pub(crate) fn isolation_to_wire(i: Isolation) -> i32 {
    match i {
        Isolation::ReadCommitted => v1::IsolationLevel::ReadCommitted as i32,
        Isolation::ReadUncommitted => v1::IsolationLevel::ReadUncommitted as i32,
    }
}

/// Where a batch appended by [`Client::produce_batch`] landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first record (0 under `Acks::None`).
    pub base_offset: u64,
    /// Offset of the last record (0 under `Acks::None`).
    pub last_offset: u64,
    /// Broker time of the append.
    pub log_append_time_ms: i64,
    /// True when the batch (stamped by an idempotent producer) was a retry of one already in
    /// the log: nothing was written; the offsets are the original ones.
    pub duplicate: bool,
}

impl Client {
    /// Connects to `addr` (`host:port`) with default options.
    pub async fn connect(addr: impl Into<String>) -> Result<Client> {
        Client::builder(addr).connect().await
    }

    /// A builder for a client with non-default options.
    pub fn builder(addr: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            addr: addr.into(),
            options: ClientOptions::default(),
            error: None,
        }
    }

    /// The broker's `host:port`, as connected to (the default port filled in when the
    /// address had none).
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The options in force.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// A batching producer sharing this connection. Must be called within a tokio runtime.
    pub fn producer(&self, config: ProducerConfig) -> Producer {
        Producer::new(self.clone(), config)
    }

    /// A consumer sharing this connection.
    pub fn consumer(&self, config: ConsumerConfig) -> Consumer {
        Consumer::new(self.clone(), config)
    }

    /// Wraps a message into a request with the deadline set. Every request passes through
    /// here: this is where an authentication token will be attached.
    pub(crate) fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut req = self.stream_request(msg);
        req.set_timeout(timeout);
        req
    }

    /// [`Client::request`] without a deadline, for streams (a deadline would bound the whole
    /// stream, not just its opening).
    pub(crate) fn stream_request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(BearerToken(v)) = &self.inner.options.token {
            req.metadata_mut().insert("authorization", v.clone());
        }
        req
    }

    /// Runs a unary call, bounded by `timeout`.
    pub(crate) async fn unary<T>(
        &self,
        timeout: Duration,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(self.in_context(Error::from_status(&status))),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Names the broker in a transport failure (the connection is made when first used, so a
    /// TLS mismatch that the handshake let through shows up on the first call), with a hint
    /// that depends on whether this client speaks TLS.
    pub(crate) fn in_context(&self, e: Error) -> Error {
        match e {
            Error::Unavailable { message } => {
                let tls = self.inner.options.tls.is_some();
                let hint = crate::error::tls_mode_hint(&message, tls)
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                Error::Unavailable {
                    message: format!("{}: {message}{hint}", self.inner.addr),
                }
            }
            e => e,
        }
    }

    fn timeout(&self) -> Duration {
        self.inner.options.request_timeout
    }

    pub(crate) fn admin_stub(&self) -> AdminServiceClient<Channel> {
        let max = self.inner.options.max_message_bytes;
        AdminServiceClient::new(self.inner.channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    pub(crate) fn produce_stub(&self) -> ProduceServiceClient<Channel> {
        let max = self.inner.options.max_message_bytes;
        ProduceServiceClient::new(self.inner.channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    pub(crate) fn consume_stub(&self) -> ConsumeServiceClient<Channel> {
        let max = self.inner.options.max_message_bytes;
        ConsumeServiceClient::new(self.inner.channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    pub(crate) fn group_stub(&self) -> GroupServiceClient<Channel> {
        let max = self.inner.options.max_message_bytes;
        GroupServiceClient::new(self.inner.channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    pub(crate) fn txn_stub(&self) -> TransactionServiceClient<Channel> {
        let max = self.inner.options.max_message_bytes;
        TransactionServiceClient::new(self.inner.channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    pub(crate) fn offset_stub(&self) -> OffsetServiceClient<Channel> {
        let max = self.inner.options.max_message_bytes;
        OffsetServiceClient::new(self.inner.channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    // ---- admin ---------------------------------------------------------------------------

    /// Creates `topic` with `partitions` partitions (0: the broker's default) and `settings`
    /// (unset fields take the broker's defaults). Returns the config the topic got.
    ///
    /// Errors: [`Error::TopicExists`], [`Error::InvalidRequest`] (bad name or config, or a
    /// name starting with `__`, which the broker keeps for itself).
    pub async fn create_topic(
        &self,
        topic: &str,
        partitions: u32,
        settings: &TopicSettings,
    ) -> Result<TopicConfig> {
        let t = self.timeout();
        let req = self.request(
            v1::CreateTopicRequest {
                topic: topic.to_owned(),
                partitions,
                config: Some(settings.to_wire()),
            },
            t,
        );
        let resp = self.unary(t, self.admin_stub().create_topic(req)).await?;
        Ok(TopicConfig::from_wire(&resp.config.unwrap_or_default()))
    }

    /// Deletes `topic` and all its data. [`Error::UnknownTopic`] if it does not exist.
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        let t = self.timeout();
        let req = self.request(
            v1::DeleteTopicRequest {
                topic: topic.to_owned(),
            },
            t,
        );
        self.unary(t, self.admin_stub().delete_topic(req)).await?;
        Ok(())
    }

    /// Lists topics (internal `__` topics included), sorted by name.
    pub async fn list_topics(&self) -> Result<Vec<TopicSummary>> {
        let t = self.timeout();
        let req = self.request(v1::ListTopicsRequest {}, t);
        let resp = self.unary(t, self.admin_stub().list_topics(req)).await?;
        Ok(resp
            .topics
            .into_iter()
            .map(|s| TopicSummary {
                topic: s.topic,
                partitions: s.partitions,
            })
            .collect())
    }

    /// Describes `topic`: its config and each partition's offsets and size.
    pub async fn describe_topic(&self, topic: &str) -> Result<TopicDescription> {
        let t = self.timeout();
        let req = self.request(
            v1::DescribeTopicRequest {
                topic: topic.to_owned(),
            },
            t,
        );
        let resp = self.unary(t, self.admin_stub().describe_topic(req)).await?;
        Ok(TopicDescription::from_wire(resp))
    }

    /// Changes the set fields of `settings` on `topic`; returns the config now in force.
    pub async fn alter_topic_config(
        &self,
        topic: &str,
        settings: &TopicSettings,
    ) -> Result<TopicConfig> {
        let t = self.timeout();
        let req = self.request(
            v1::AlterTopicConfigRequest {
                topic: topic.to_owned(),
                config: Some(settings.to_wire()),
            },
            t,
        );
        let resp = self
            .unary(t, self.admin_stub().alter_topic_config(req))
            .await?;
        Ok(TopicConfig::from_wire(&resp.config.unwrap_or_default()))
    }

    /// Grows `topic` to `partitions` partitions in total; returns the count now.
    pub async fn add_partitions(&self, topic: &str, partitions: u32) -> Result<u32> {
        let t = self.timeout();
        let req = self.request(
            v1::AddPartitionsRequest {
                topic: topic.to_owned(),
                partitions,
            },
            t,
        );
        Ok(self
            .unary(t, self.admin_stub().add_partitions(req))
            .await?
            .partitions)
    }

    // ---- produce (low level) -------------------------------------------------------------

    /// Appends one pre-encoded batch (built with `spool_record::BatchBuilder`) to a
    /// partition, without batching or retries. Most callers want a [`Producer`].
    pub async fn produce_batch(
        &self,
        topic: &str,
        partition: u32,
        batch: Bytes,
        acks: Acks,
    ) -> Result<Appended> {
        let t = self.timeout();
        let req = self.request(
            v1::ProduceRequest {
                partitions: vec![v1::PartitionProduce {
                    topic: topic.to_owned(),
                    partition,
                    data: Some(v1::partition_produce::Data::RecordBatch(batch)),
                }],
                acks: acks.to_wire() as i32,
            },
            t,
        );
        let resp = self.unary(t, self.produce_stub().produce(req)).await?;
        let r = resp
            .results
            .into_iter()
            .next()
            .ok_or_else(|| Error::Protocol("produce reply without a result".into()))?;
        if let Some(e) = &r.error {
            return Err(Error::from_partition_error(topic, partition, None, e));
        }
        Ok(Appended {
            base_offset: r.base_offset,
            last_offset: r.last_offset,
            log_append_time_ms: r.log_append_time_ms,
            duplicate: r.duplicate,
        })
    }

    /// A new producer id for an idempotent producer (see `ProduceService.InitProducerId`): stamp
    /// batches with it (`BatchBuilder::producer(id, 0, sequence)`) and per-partition sequence
    /// numbers starting at 0. The [`Producer`] does this by itself.
    pub async fn init_producer_id(&self) -> Result<i64> {
        let t = self.timeout();
        let req = self.request(v1::InitProducerIdRequest::default(), t);
        Ok(self
            .unary(t, self.produce_stub().init_producer_id(req))
            .await?
            .producer_id)
    }

    /// Appends pre-encoded batches to several partitions in one request (all or some may
    /// fail: one result per batch, in order). No batching, no retries.
    pub async fn produce_batches(
        &self,
        batches: Vec<(String, u32, Bytes)>,
        acks: Acks,
    ) -> Result<Vec<Result<Appended>>> {
        let t = self.timeout();
        let names: Vec<(String, u32)> = batches.iter().map(|(t, p, _)| (t.clone(), *p)).collect();
        let req = self.request(
            v1::ProduceRequest {
                partitions: batches
                    .into_iter()
                    .map(|(topic, partition, batch)| v1::PartitionProduce {
                        topic,
                        partition,
                        data: Some(v1::partition_produce::Data::RecordBatch(batch)),
                    })
                    .collect(),
                acks: acks.to_wire() as i32,
            },
            t,
        );
        let resp = self.unary(t, self.produce_stub().produce(req)).await?;
        if resp.results.len() != names.len() {
            return Err(Error::Protocol(format!(
                "{} produce results for {} batches",
                resp.results.len(),
                names.len()
            )));
        }
        Ok(resp
            .results
            .into_iter()
            .zip(names)
            .map(|(r, (topic, partition))| match &r.error {
                Some(e) => Err(Error::from_partition_error(&topic, partition, None, e)),
                None => Ok(Appended {
                    base_offset: r.base_offset,
                    last_offset: r.last_offset,
                    log_append_time_ms: r.log_append_time_ms,
                    duplicate: r.duplicate,
                }),
            })
            .collect())
    }

    // ---- transactions --------------------------------------------------------------------

    /// InitProducerId for a transactional id (see `ProduceService.InitProducerId`): returns
    /// the producer id and epoch, fencing every older instance. `expected` is the producer a
    /// caller had when its transaction timed out. Most callers want a
    /// [`crate::TransactionalProducer`].
    pub async fn init_transactional_id(
        &self,
        transactional_id: &str,
        timeout: Duration,
        expected: Option<(i64, i16)>,
    ) -> Result<(i64, i16)> {
        let t = self.timeout();
        let req = self.request(
            v1::InitProducerIdRequest {
                transactional_id: transactional_id.to_owned(),
                transaction_timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
                expected_producer_id: expected.map(|e| e.0),
                expected_producer_epoch: expected.map(|e| i32::from(e.1)),
            },
            t,
        );
        let r = self
            .unary(t, self.produce_stub().init_producer_id(req))
            .await?;
        Ok((r.producer_id, epoch_from_wire(r.producer_epoch)?))
    }

    /// AddOffsetsToTxn: commits `offsets` for `group` with the producer's open transaction;
    /// `member` (id, generation) fences the commit like a group member's.
    pub async fn add_offsets_to_txn(
        &self,
        transactional_id: &str,
        producer: (i64, i16),
        group: &str,
        offsets: &[OffsetCommit],
        member: Option<(&str, u64)>,
    ) -> Result<()> {
        let t = self.timeout();
        let req = self.request(
            v1::AddOffsetsToTxnRequest {
                transactional_id: transactional_id.to_owned(),
                producer_id: producer.0,
                producer_epoch: i32::from(producer.1),
                group: group.to_owned(),
                offsets: wire_offsets(offsets),
                member_id: member.map(|m| m.0.to_owned()).unwrap_or_default(),
                generation: member.map_or(0, |m| m.1),
            },
            t,
        );
        self.unary(t, self.txn_stub().add_offsets_to_txn(req))
            .await?;
        Ok(())
    }

    /// EndTxn: commits or aborts the producer's open transaction; returns the producer id and
    /// epoch for the next one.
    pub async fn end_txn(
        &self,
        transactional_id: &str,
        producer: (i64, i16),
        commit: bool,
    ) -> Result<(i64, i16)> {
        let t = self.timeout();
        let req = self.request(
            v1::EndTxnRequest {
                transactional_id: transactional_id.to_owned(),
                producer_id: producer.0,
                producer_epoch: i32::from(producer.1),
                commit,
            },
            t,
        );
        let r = self.unary(t, self.txn_stub().end_txn(req)).await?;
        Ok((r.producer_id, epoch_from_wire(r.producer_epoch)?))
    }

    /// CommitTxn: commits the producer's open transaction with the offsets of `groups`, the
    /// offsets recorded only with the decision; returns the producer id and epoch for the next
    /// transaction. A broker without CommitTxn answers [`Error::Rpc`] with
    /// `Code::Unimplemented` before doing anything (then use
    /// [`Client::add_offsets_to_txn`] and [`Client::end_txn`]).
    pub async fn commit_txn(
        &self,
        transactional_id: &str,
        producer: (i64, i16),
        groups: &[TxnOffsets],
    ) -> Result<(i64, i16)> {
        let t = self.timeout();
        let req = self.request(
            v1::CommitTxnRequest {
                transactional_id: transactional_id.to_owned(),
                producer_id: producer.0,
                producer_epoch: i32::from(producer.1),
                groups: groups
                    .iter()
                    .map(|g| v1::TxnGroupOffsets {
                        group: g.group.clone(),
                        offsets: wire_offsets(&g.offsets),
                        member_id: g.member.as_ref().map(|m| m.0.clone()).unwrap_or_default(),
                        generation: g.member.as_ref().map_or(0, |m| m.1),
                    })
                    .collect(),
            },
            t,
        );
        let r = self.unary(t, self.txn_stub().commit_txn(req)).await?;
        Ok((r.producer_id, epoch_from_wire(r.producer_epoch)?))
    }

    /// ListTransactions (the wire type: state, partitions, age).
    pub async fn list_transactions(&self) -> Result<Vec<v1::TransactionDescription>> {
        let t = self.timeout();
        let req = self.request(v1::ListTransactionsRequest {}, t);
        Ok(self
            .unary(t, self.txn_stub().list_transactions(req))
            .await?
            .transactions)
    }

    // ---- consume -------------------------------------------------------------------------

    /// Reads one partition from `offset`: a long poll when `options.min_bytes > 0`. Records are
    /// decoded here; those before `offset` (the start of its batch) are dropped.
    ///
    /// Errors: [`Error::OffsetOutOfRange`] with the partition's bounds when `offset` is outside
    /// `[log_start_offset, high_watermark]`; [`Error::UnknownTopic`] /
    /// [`Error::UnknownPartition`].
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        options: &FetchOptions,
    ) -> Result<Fetched> {
        let t = self.timeout() + options.max_wait;
        let req = self.request(
            v1::FetchRequest {
                partitions: vec![v1::PartitionFetch {
                    topic: topic.to_owned(),
                    partition,
                    offset,
                    max_bytes: options.max_bytes,
                }],
                min_bytes: options.min_bytes,
                max_wait_ms: u32::try_from(options.max_wait.as_millis()).unwrap_or(u32::MAX),
                decode_records: false,
                isolation_level: isolation_to_wire(options.isolation),
                // One partition: at least its first batch always comes, within the
                // broker's reply limit.
                max_bytes: 0,
            },
            t,
        );
        let resp = self.unary(t, self.consume_stub().fetch(req)).await?;
        let d = resp
            .partitions
            .into_iter()
            .next()
            .ok_or_else(|| Error::Protocol("fetch reply without partition data".into()))?;
        if let Some(e) = &d.error {
            return Err(Error::from_partition_error(
                topic,
                partition,
                Some(offset),
                e,
            ));
        }
        let topic: Arc<str> = Arc::from(topic);
        let mut records = Vec::new();
        decode_batches(
            &topic,
            partition,
            &d.record_batches,
            offset,
            &self.inner.options.decode_limits,
            &mut records,
        )?;
        Ok(Fetched {
            records,
            next_offset: d.next_offset,
            high_watermark: d.high_watermark,
            log_start_offset: d.log_start_offset,
            last_stable_offset: d.last_stable_offset,
        })
    }

    /// Resolves offsets: one answer per query, in order; a per-partition failure is an `Err`
    /// in its slot, a failure of the whole request the outer `Err`. `Latest` is the high
    /// watermark (see [`Client::list_offsets_with`] for the last stable offset).
    pub async fn list_offsets(
        &self,
        queries: &[(TopicPartition, OffsetSpec)],
    ) -> Result<Vec<Result<ListedOffset>>> {
        self.list_offsets_with(queries, Isolation::ReadUncommitted)
            .await
    }

    /// [`Client::list_offsets`] for a reader at `isolation`: read-committed `Latest` is the
    /// last stable offset.
    pub async fn list_offsets_with(
        &self,
        queries: &[(TopicPartition, OffsetSpec)],
        isolation: Isolation,
    ) -> Result<Vec<Result<ListedOffset>>> {
        let t = self.timeout();
        let req = self.request(
            v1::ListOffsetsRequest {
                queries: queries
                    .iter()
                    .map(|(tp, spec)| {
                        let (spec, ts) = match spec {
                            OffsetSpec::Earliest => (v1::OffsetSpec::Earliest, 0),
                            OffsetSpec::Latest => (v1::OffsetSpec::Latest, 0),
                            OffsetSpec::Timestamp(ts) => (v1::OffsetSpec::Timestamp, *ts),
                        };
                        v1::OffsetQuery {
                            topic: tp.topic.clone(),
                            partition: tp.partition,
                            spec: spec as i32,
                            timestamp_ms: ts,
                        }
                    })
                    .collect(),
                isolation_level: isolation_to_wire(isolation),
            },
            t,
        );
        let resp = self.unary(t, self.consume_stub().list_offsets(req)).await?;
        if resp.answers.len() != queries.len() {
            return Err(Error::Protocol(format!(
                "{} answers to {} offset queries",
                resp.answers.len(),
                queries.len()
            )));
        }
        Ok(resp
            .answers
            .into_iter()
            .zip(queries)
            .map(|(a, (tp, _))| match &a.error {
                Some(e) => Err(Error::from_partition_error(
                    &tp.topic,
                    tp.partition,
                    None,
                    e,
                )),
                None => Ok(ListedOffset {
                    offset: a.offset,
                    found: a.found,
                }),
            })
            .collect())
    }

    /// Resolves one offset of one partition.
    pub async fn list_offset(
        &self,
        topic: &str,
        partition: u32,
        spec: OffsetSpec,
    ) -> Result<ListedOffset> {
        let mut v = self
            .list_offsets(&[(TopicPartition::new(topic, partition), spec)])
            .await?;
        v.pop()
            .unwrap_or_else(|| Err(Error::Protocol("no offset answer".into())))
    }

    // ---- consumer-group offsets ----------------------------------------------------------

    /// Durably commits `offsets` for `group` (all or nothing). Each partition must exist.
    pub async fn commit_offsets(&self, group: &str, offsets: &[OffsetCommit]) -> Result<()> {
        // A plain commit: no group membership (member id empty, generation 0).
        self.commit(group, "", 0, offsets).await
    }

    /// One CommitOffsets call; a non-empty `member_id` (with `generation`) fences it.
    pub(crate) async fn commit(
        &self,
        group: &str,
        member_id: &str,
        generation: u64,
        offsets: &[OffsetCommit],
    ) -> Result<()> {
        let t = self.timeout();
        let req = self.request(
            v1::CommitOffsetsRequest {
                group: group.to_owned(),
                offsets: wire_offsets(offsets),
                member_id: member_id.to_owned(),
                generation,
            },
            t,
        );
        self.unary(t, self.offset_stub().commit_offsets(req))
            .await?;
        Ok(())
    }

    /// A group's committed offsets for `partitions` (in order), or for everything the group
    /// committed when `partitions` is empty (refused, [`Error::InvalidRequest`], when that
    /// answer would not fit in one reply: then list the partitions).
    pub async fn fetch_offsets(
        &self,
        group: &str,
        partitions: &[TopicPartition],
    ) -> Result<Vec<CommittedOffset>> {
        let t = self.timeout();
        let req = self.request(
            v1::FetchOffsetsRequest {
                group: group.to_owned(),
                partitions: partitions
                    .iter()
                    .map(|tp| v1::TopicPartition {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                    })
                    .collect(),
            },
            t,
        );
        let resp = self.unary(t, self.offset_stub().fetch_offsets(req)).await?;
        Ok(resp
            .offsets
            .into_iter()
            .map(|c| CommittedOffset {
                topic: c.topic,
                partition: c.partition,
                offset: c.offset,
                metadata: c.metadata,
                commit_time_ms: c.commit_time_ms,
            })
            .collect())
    }

    /// Every consumer group with committed offsets, sorted by name: how many partitions, which
    /// topics, the latest commit time. With tokens, only the groups this one may use.
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        let t = self.timeout();
        let req = self.request(v1::ListGroupsRequest {}, t);
        let resp = self.unary(t, self.offset_stub().list_groups(req)).await?;
        Ok(resp
            .groups
            .into_iter()
            .map(GroupSummary::from_wire)
            .collect())
    }

    /// Deletes `group`'s committed offsets: all of them, or only those of `topics` when it is
    /// not empty. The broker makes the deletion durable before replying.
    ///
    /// Errors: [`Error::UnknownGroup`] when the group has nothing committed (for those
    /// topics); [`Error::NotAuthorized`] without the group ACL (or, with `topics`, `consume`
    /// on each).
    pub async fn delete_group(&self, group: &str, topics: &[String]) -> Result<GroupDeletion> {
        let t = self.timeout();
        let req = self.request(
            v1::DeleteGroupRequest {
                group: group.to_owned(),
                topics: topics.to_vec(),
            },
            t,
        );
        let resp = self.unary(t, self.offset_stub().delete_group(req)).await?;
        Ok(GroupDeletion {
            group: group.to_owned(),
            partitions_deleted: resp.partitions_deleted,
        })
    }
}

/// Offsets as the wire's `OffsetCommit`s (CommitOffsets, AddOffsetsToTxn and CommitTxn all
/// carry them the same way).
fn wire_offsets(offsets: &[OffsetCommit]) -> Vec<v1::OffsetCommit> {
    offsets
        .iter()
        .map(|o| v1::OffsetCommit {
            topic: o.topic.clone(),
            partition: o.partition,
            offset: o.offset,
            metadata: o.metadata.clone(),
        })
        .collect()
}

/// A wire epoch as the batch header's i16.
fn epoch_from_wire(epoch: i32) -> Result<i16> {
    i16::try_from(epoch)
        .map_err(|_| Error::Protocol(format!("producer epoch {epoch} is not an i16")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            endpoint_uri("127.0.0.1:7170", false).unwrap(),
            "http://127.0.0.1:7170"
        );
        assert_eq!(endpoint_uri("http://h:1", false).unwrap(), "http://h:1");
        assert_eq!(endpoint_uri("h:1", true).unwrap(), "https://h:1");
        assert_eq!(endpoint_uri("https://h:1", true).unwrap(), "https://h:1");
        for (addr, tls) in [
            ("https://h:1", false),
            ("http://h:1", true),
            ("ftp://h:1", false),
        ] {
            assert!(
                matches!(endpoint_uri(addr, tls), Err(Error::InvalidAddress { .. })),
                "{addr} tls={tls}"
            );
        }
        assert!(matches!(
            endpoint_uri("http://", false),
            Err(Error::InvalidAddress { .. })
        ));
        assert!(Client::builder("not a uri").connect_lazy().is_err());
        // Without a port, the broker's default one (as Kafka clients add 9092).
        assert_eq!(
            endpoint_uri("127.0.0.1", false).unwrap(),
            "http://127.0.0.1:7170"
        );
        assert_eq!(endpoint_uri("[::1]", true).unwrap(), "https://[::1]:7170");
        assert_eq!(endpoint_uri("[::1]:9", false).unwrap(), "http://[::1]:9");
        for bad in ["::1", "h:", "h:x", ":7170", "h:70000", "[::1"] {
            assert!(
                matches!(endpoint_uri(bad, false), Err(Error::InvalidAddress { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn tokens() {
        let t = BearerToken::new("s3cret-token-0123456789").unwrap();
        assert_eq!(format!("{t:?}"), "BearerToken(<redacted>)");
        let o = ClientOptions {
            token: Some(t),
            ..ClientOptions::default()
        };
        assert!(!format!("{o:?}").contains("s3cret"));
        for bad in ["", "has space", "tab\t", "é"] {
            assert!(
                matches!(BearerToken::new(bad), Err(Error::Config(_))),
                "{bad:?}"
            );
        }
        let e = Client::builder("h:1")
            .bearer_token("a b")
            .connect_lazy()
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
    }
}
