//! Accepting connections under a limit, and closing idle ones.
//!
//! At most `limits.max_connections` client connections are open at once. Each accepted socket
//! carries a semaphore permit, released when the connection closes; while none is free the
//! broker stops accepting, so further clients wait in the kernel's backlog (as Kafka's
//! `max.connections` does) rather than being admitted and starved. Accepted sockets get
//! `TCP_NODELAY` (small replies must not wait for Nagle).
//!
//! **Idle connections** (as Kafka's `connections.max.idle.ms`): a connection on which no
//! request or response data moved for `limits.idle_timeout_ms` is closed by the broker, so
//! forgotten clients do not hold slots forever. Activity is counted at the HTTP level, not in
//! socket bytes: the broker's own HTTP/2 keepalive pings (every 30 s) and their acks would
//! otherwise keep every idle connection open. [`ActivityLayer`] marks a request's connection
//! active when the request arrives, when a frame of its body or of the response body passes
//! (each message of a stream), and when the response head is ready. It finds the connection
//! through [`ConnInfo`], the connect info tonic attaches to every request.
//!
//! Each connection has a watchdog task that sleeps until `last activity + idle_timeout`; if
//! nothing moved meanwhile it shuts the socket down (`shutdown(2)`, both directions). That
//! ends hyper's reads and writes whether or not it is polling the connection at that moment
//! (a TLS handshake that never finishes included); hyper then drops the connection, which
//! releases its slot. The watchdog is aborted when the connection drops first.
//!
//! **First request** (`limits.handshake_timeout_ms`, a few seconds): until a connection has
//! carried its first request, the watchdog's deadline is `accepted + handshake_timeout` (or
//! the idle timeout, if shorter), so sockets that never send a byte, never finish their TLS
//! or HTTP/2 handshake, or never call anything give their slot back within seconds instead of
//! holding it for the whole idle timeout (counted in `spool_handshake_timeouts_total`).
//!
//! **Per source address** (`limits.max_connections_per_address`): one address (IPv4-mapped
//! IPv6 addresses count as their IPv4 address) may hold at most that many connections. Past
//! it a new connection from the address is accepted and closed at once (so it does not
//! wait in the backlog ahead of others), counted in `spool_connections_refused_total` and
//! logged (at most every few seconds). Together with the first-request timeout, a careless
//! or hostile client cannot fill `max_connections` for long and lock everyone else out.
//!
//! What stays open: a unary call is answered within `request_timeout_ms`, which the config
//! keeps below the idle timeout (Fetch waits are below that); a Subscribe stream sends a
//! heartbeat at least every half idle timeout. What is idle: a connection without calls, a
//! ProduceStream that sends nothing, and a subscriber that stopped reading (HTTP/2 flow
//! control then stops its stream) — each for the whole timeout.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Shutdown};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http;
use tonic::transport::server::Connected;

/// Connection counters and gauges (registered with the broker's other metrics).
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnMetrics {
    /// Closed after `idle_timeout_ms` without request or response data.
    pub(crate) idle_closed: Counter,
    /// Closed because no request came within `handshake_timeout_ms` of accepting them.
    pub(crate) handshake_timeouts: Counter,
    /// Closed at once: their source address had `max_connections_per_address` open.
    pub(crate) refused_per_address: Counter,
    /// Client connections open now.
    pub(crate) open: Gauge,
}

impl ConnMetrics {
    /// Creates the metrics and registers them (the idle counter is registered by the caller,
    /// under its historical name).
    pub(crate) fn register(registry: &mut Registry, idle_closed: Counter) -> ConnMetrics {
        let m = ConnMetrics {
            idle_closed,
            ..ConnMetrics::default()
        };
        registry.register(
            "spool_handshake_timeouts",
            "Connections closed because no request arrived within limits.handshake_timeout_ms \
             of accepting them (silent sockets, unfinished TLS or HTTP/2 handshakes)",
            m.handshake_timeouts.clone(),
        );
        registry.register(
            "spool_connections_refused",
            "Connections closed at once because their source address already had \
             limits.max_connections_per_address open",
            m.refused_per_address.clone(),
        );
        registry.register(
            "spool_connections_open",
            "Client connections open now (at most limits.max_connections)",
            m.open.clone(),
        );
        m
    }
}

/// Connection limits `incoming` enforces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnLimits {
    /// Connections open at once.
    pub(crate) max: usize,
    /// Connections open at once from one source address.
    pub(crate) max_per_address: usize,
    /// Longest time from accept to the first request.
    pub(crate) handshake_timeout: Duration,
    /// Longest time without request or response data.
    pub(crate) idle_timeout: Duration,
}

/// When a connection last carried request or response data.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch`; only grows.
    last_ms: AtomicU64,
    /// Whether a request arrived yet (until then the handshake deadline applies).
    requested: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            requested: AtomicBool::new(false),
        }
    }

    /// Marks the connection active now: a clock read and an atomic max.
    pub(crate) fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// A request arrived: marks the connection active and ends its handshake period.
    fn request(&self) {
        self.touch();
        if !self.requested.load(Ordering::Relaxed) {
            self.requested.store(true, Ordering::Relaxed);
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// What a request knows of its connection: tonic inserts it into every request's extensions
/// (for TLS connections too, beside `TlsConnectInfo`). It replaces tonic's `TcpConnectInfo`,
/// so `Request::remote_addr` is `None`; nothing in the broker reads it.
#[derive(Clone, Debug)]
pub(crate) struct ConnInfo {
    activity: Arc<Activity>,
    /// The connection's share of reply memory (`budget.rs`).
    pub(crate) reply_memory: Arc<crate::budget::Budget>,
}

/// Open connections per source address.
#[derive(Debug, Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes one of `ip`'s `max` slots, if one is free.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = self.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            map: self.clone(),
            ip,
        })
    }
}

/// One connection's place in its address's count, given back on drop.
#[derive(Debug)]
struct AddressSlot {
    map: Arc<PerAddress>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.map.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A client connection holding one of the limited slots, watched for idleness.
#[derive(Debug)]
pub(crate) struct LimitedConn {
    /// Shared with the watchdog (weakly), which needs the socket to shut it down.
    stream: Arc<Mutex<TcpStream>>,
    info: ConnInfo,
    watchdog: AbortHandle,
    open: Gauge,
    _address: AddressSlot,
    _permit: OwnedSemaphorePermit,
}

impl LimitedConn {
    fn stream(&self) -> MutexGuard<'_, TcpStream> {
        // Held only for one non-blocking poll (or the watchdog's shutdown): never contended
        // for long, and a poisoned lock still guards a usable socket.
        self.stream.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for LimitedConn {
    fn drop(&mut self) {
        self.watchdog.abort();
        self.open.dec();
    }
}

impl Connected for LimitedConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for LimitedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream()).poll_shutdown(cx)
    }
}

/// Sleeps until the connection has gone without its first request for `handshake` or has
/// been idle for `idle`, then shuts its socket down.
async fn watchdog(
    stream: Weak<Mutex<TcpStream>>,
    activity: Arc<Activity>,
    (handshake, idle): (Duration, Duration),
    metrics: ConnMetrics,
) {
    let handshake = handshake.min(idle);
    loop {
        let requested = activity.requested();
        let deadline = if requested {
            activity.last() + idle
        } else {
            activity.epoch + handshake
        };
        tokio::time::sleep_until(deadline).await;
        if !requested && activity.requested() {
            continue; // the first request came meanwhile: idle rules from now on
        }
        if requested && activity.last() + idle > Instant::now() {
            continue; // something moved meanwhile
        }
        let (closed, timeout, what) = if requested {
            (&metrics.idle_closed, idle, "closed an idle connection")
        } else {
            (
                &metrics.handshake_timeouts,
                handshake,
                "closed a connection that sent no request in time",
            )
        };
        let Some(stream) = stream.upgrade() else {
            return;
        };
        let stream = stream.lock().unwrap_or_else(PoisonError::into_inner);
        let peer = stream.peer_addr().ok();
        // shutdown(2) acts on the socket, not the descriptor: a short-lived duplicate does it
        // without taking the stream from the connection.
        let shut = stream
            .as_fd()
            .try_clone_to_owned()
            .map(std::net::TcpStream::from)
            .and_then(|s| s.shutdown(Shutdown::Both));
        drop(stream);
        match shut {
            Ok(()) => {
                closed.inc();
                tracing::debug!(?peer, timeout_ms = timeout.as_millis() as u64, "{what}");
            }
            // The peer went away at the same moment: nothing left to close.
            Err(e) => tracing::debug!(?peer, error = %e, "shutting down a connection"),
        }
        return;
    }
}

/// Logs refusals of over-limit addresses at most this often.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The stream of accepted connections within `limits` (see the module docs), counted in
/// `metrics`.
pub(crate) fn incoming(
    listener: TcpListener,
    limits: ConnLimits,
    memory: Arc<crate::budget::ReplyMemory>,
    metrics: ConnMetrics,
) -> impl Stream<Item = io::Result<LimitedConn>> {
    let slots = Arc::new(Semaphore::new(limits.max));
    let per_address = Arc::new(PerAddress::default());
    // The last time a refusal was logged.
    let last_log: Option<Instant> = None;
    let state = (listener, slots, per_address, last_log);
    futures_util::stream::unfold(
        state,
        move |(listener, slots, per_address, mut last_log)| {
            let metrics = metrics.clone();
            let memory = memory.clone();
            async move {
                let permit = slots.clone().acquire_owned().await.ok()?;
                let conn = loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            let ip = peer.ip().to_canonical();
                            let Some(address) = per_address.take(ip, limits.max_per_address) else {
                                metrics.refused_per_address.inc();
                                if last_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL) {
                                    last_log = Some(Instant::now());
                                    tracing::warn!(
                                        address = %ip,
                                        limit = limits.max_per_address,
                                        refused_total = metrics.refused_per_address.get(),
                                        "refusing connections: the address has \
                                         limits.max_connections_per_address open"
                                    );
                                }
                                drop(stream); // closed at once
                                continue;
                            };
                            if let Err(e) = stream.set_nodelay(true) {
                                tracing::debug!(error = %e, "TCP_NODELAY failed");
                            }
                            let stream = Arc::new(Mutex::new(stream));
                            let activity = Arc::new(Activity::new());
                            let watchdog = tokio::spawn(watchdog(
                                Arc::downgrade(&stream),
                                activity.clone(),
                                (limits.handshake_timeout, limits.idle_timeout),
                                metrics.clone(),
                            ))
                            .abort_handle();
                            metrics.open.inc();
                            break Ok(LimitedConn {
                                stream,
                                info: ConnInfo {
                                    activity,
                                    reply_memory: memory.connection_budget(),
                                },
                                watchdog,
                                open: metrics.open.clone(),
                                _address: address,
                                _permit: permit,
                            });
                        }
                        // A connection that died before we accepted it: try the next one.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            // Out of file descriptors and the like: back off instead of spinning.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                };
                Some((conn, (listener, slots, per_address, last_log)))
            }
        },
    )
}

/// A tower layer (for tonic's `Server::layer`) marking each request's connection active; see
/// the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ActivityLayer;

impl<S> tower_layer::Layer<S> for ActivityLayer {
    type Service = ActivityService<S>;

    fn layer(&self, inner: S) -> ActivityService<S> {
        ActivityService { inner }
    }
}

/// The service [`ActivityLayer`] makes.
#[derive(Clone, Debug)]
pub(crate) struct ActivityService<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<http::Request<Body>> for ActivityService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let Some(activity) = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.activity.clone())
        else {
            return Box::pin(self.inner.call(req));
        };
        activity.request();
        let req = req.map(|b| Body::new(Tracked::new(b, activity.clone())));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            activity.touch();
            Ok(resp.map(|b| Body::new(Tracked::new(b, activity))))
        })
    }
}

/// A body that marks its connection active at each frame.
struct Tracked {
    inner: Body,
    activity: Arc<Activity>,
}

impl Tracked {
    fn new(inner: Body, activity: Arc<Activity>) -> Tracked {
        Tracked { inner, activity }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.activity.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn activity_only_grows() {
        let a = Activity::new();
        let start = a.last();
        tokio::time::advance(Duration::from_millis(1500)).await;
        a.touch();
        assert_eq!(a.last() - start, Duration::from_millis(1500));
        // A late writer with an older reading cannot move it back.
        a.last_ms.fetch_max(10, Ordering::Relaxed);
        assert_eq!(a.last() - start, Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_closes_only_after_a_full_idle_period() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(TcpStream::connect(addr));
        let (server, _) = listener.accept().await.unwrap();
        let mut client = client.await.unwrap().unwrap();
        let stream = Arc::new(Mutex::new(server));
        let activity = Arc::new(Activity::new());
        let metrics = ConnMetrics::default();
        let closed = metrics.idle_closed.clone();
        let dog = tokio::spawn(watchdog(
            Arc::downgrade(&stream),
            activity.clone(),
            (Duration::from_secs(5), Duration::from_secs(10)),
            metrics.clone(),
        ));
        // A request at 4 s (before the 5 s handshake deadline), activity at 6 s: the
        // deadline moves to 16 s.
        tokio::time::advance(Duration::from_secs(4)).await;
        activity.request();
        tokio::time::advance(Duration::from_secs(2)).await;
        activity.touch();
        tokio::time::advance(Duration::from_secs(9)).await;
        tokio::task::yield_now().await;
        assert!(!dog.is_finished());
        assert_eq!(closed.get(), 0);
        tokio::time::advance(Duration::from_secs(2)).await;
        dog.await.unwrap();
        assert_eq!(closed.get(), 1);
        assert_eq!(metrics.handshake_timeouts.get(), 0);
        // The peer sees the close: EOF.
        let mut buf = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut client, &mut buf)
            .await
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_closed_at_the_handshake_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(TcpStream::connect(addr));
        let (server, _) = listener.accept().await.unwrap();
        let _client = client.await.unwrap().unwrap();
        let stream = Arc::new(Mutex::new(server));
        let activity = Arc::new(Activity::new());
        let metrics = ConnMetrics::default();
        let dog = tokio::spawn(watchdog(
            Arc::downgrade(&stream),
            activity.clone(),
            (Duration::from_secs(3), Duration::from_secs(600)),
            metrics.clone(),
        ));
        // Data other than a request (say, HTTP/2 pings) does not end the handshake period.
        tokio::time::advance(Duration::from_secs(2)).await;
        activity.touch();
        tokio::time::advance(Duration::from_millis(1100)).await;
        dog.await.unwrap();
        assert_eq!(metrics.handshake_timeouts.get(), 1);
        assert_eq!(metrics.idle_closed.get(), 0);
    }

    #[test]
    fn per_address_slots_are_counted_and_given_back() {
        let map = Arc::new(PerAddress::default());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let two: Vec<_> = (0..2).map(|_| map.take(a, 2).unwrap()).collect();
        assert!(map.take(a, 2).is_none(), "a third from the same address");
        let other = map.take(b, 2).expect("another address is not affected");
        drop(two);
        assert!(map.take(a, 2).is_some());
        drop(other);
        assert_eq!(map.lock().get(&b), None, "emptied entries are removed");
        // An IPv4-mapped IPv6 peer counts as its IPv4 address.
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(mapped.to_canonical(), a);
    }
}
