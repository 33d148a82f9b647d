//! Memory for replies in flight: one budget for the whole broker
//! (`limits.max_reply_memory_bytes`) and one per connection
//! (`limits.max_reply_memory_bytes_per_connection`).
//!
//! Every Fetch reply and every Subscribe message is charged, in bytes, against both budgets
//! from the moment its data is read until HTTP/2 has handed its last byte to the socket, or
//! dropped it because the stream or the connection ended. What is counted: the batches read
//! (zero-copy slices of mapped segments: they pin pages and mappings), decompressed data and
//! decoded records' overhead (heap), and the wire message's framing; the encoded copy tonic
//! makes replaces the message it encodes, and is covered by the same charge until written.
//!
//! **When a charge ends.** [`ReplyMemoryLayer`] gives every request a [`Ledger`] (in the
//! request's extensions) and wraps the response body. A handler moves a message's [`Charge`]
//! into the ledger when tonic takes the message to encode it (unary replies: before returning
//! the reply; streams: when the stream yields it). The body wrapper attaches whatever the
//! ledger holds to the next data frame it yields (`Bytes::from_owner`). hyper and h2 keep
//! that frame until it is written to the socket (or the stream is reset, or the connection
//! closed), so the charge is released exactly when the bytes leave the process. A client
//! that stops reading (a closed flow-control window) keeps its charges until it reads, resets
//! the stream, or its connection is closed by the idle timeout.
//!
//! **When the budget is short.** Charges grow with `try_grow` while a reply is assembled (on
//! the blocking pool, never waiting): a Fetch reply that already holds data is trimmed where
//! memory ran out, as where its byte budget ran out (`reply.rs`); one that holds nothing yet
//! waits (`grow`, FIFO with the other waiters) until its deadline, then fails with
//! `RESOURCE_EXHAUSTED` / `ERROR_CODE_REPLY_MEMORY_EXHAUSTED`. A subscription waits
//! (backpressure): it reads on once memory is free. Waits and refusals are counted
//! (`spool_reply_memory_waits_total`, `spool_reply_memory_refusals_total`), and the bytes in
//! use are `spool_reply_memory_bytes` (limit: `spool_reply_memory_limit_bytes`).
//!
//! Invariant: the bytes charged to a budget never exceed its limit (a semaphore of bytes);
//! a charge is taken before the memory it stands for is allocated (reads are zero-copy, so
//! their charge follows the read, before any copy), and a charge larger than a budget can
//! never be granted: replies are capped below the per-connection budget, which the config
//! keeps at least `limits.max_request_bytes`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http;

use crate::conn::ConnInfo;

/// Reply-memory metrics (registered with the broker's other metrics).
#[derive(Clone, Debug, Default)]
pub(crate) struct MemoryMetrics {
    /// Bytes charged to the broker-wide budget now.
    used: Gauge,
    /// The broker-wide budget.
    limit: Gauge,
    /// Replies or messages that had to wait for memory.
    pub(crate) waits: Counter,
    /// Fetches refused with RESOURCE_EXHAUSTED after waiting.
    pub(crate) refusals: Counter,
    /// Heap trims after bursts (`trim.rs`).
    pub(crate) trims: Counter,
}

impl MemoryMetrics {
    /// Creates the metrics and registers them.
    pub(crate) fn register(registry: &mut Registry) -> MemoryMetrics {
        let m = MemoryMetrics::default();
        registry.register(
            "spool_reply_memory_bytes",
            "Bytes of replies in flight (read, being encoded, or waiting to be written to a \
             socket), charged to limits.max_reply_memory_bytes",
            m.used.clone(),
        );
        registry.register(
            "spool_reply_memory_limit_bytes",
            "limits.max_reply_memory_bytes: the most the broker holds for replies in flight",
            m.limit.clone(),
        );
        registry.register(
            "spool_reply_memory_waits",
            "Fetch replies and Subscribe messages that waited for reply memory (broker-wide \
             or their connection's)",
            m.waits.clone(),
        );
        registry.register(
            "spool_reply_memory_refusals",
            "Fetches refused with RESOURCE_EXHAUSTED because reply memory stayed short until \
             their deadline",
            m.refusals.clone(),
        );
        registry.register(
            "spool_memory_trims",
            "Times freed heap memory was given back to the system (malloc_trim) after a burst \
             of reply memory",
            m.trims.clone(),
        );
        m
    }
}

/// A budget of bytes: a semaphore with one permit per byte.
#[derive(Debug)]
pub(crate) struct Budget {
    sem: Arc<Semaphore>,
    limit: usize,
    /// The gauge of bytes in use (the broker-wide budget only).
    used: Option<Gauge>,
    /// The most bytes in use since [`Budget::reset_peak`] (for `trim.rs`).
    peak: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            sem: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            limit,
            used: None,
            peak: AtomicUsize::new(0),
        })
    }

    /// Bytes charged now.
    pub(crate) fn used(&self) -> usize {
        self.limit.saturating_sub(self.sem.available_permits())
    }

    /// The limit.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// The most bytes in use since the last [`Budget::reset_peak`].
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak from the bytes in use now.
    pub(crate) fn reset_peak(&self) {
        self.peak.store(self.used(), Ordering::Relaxed);
    }

    fn note(&self, delta: i64) {
        if let Some(g) = &self.used {
            g.inc_by(delta);
        }
    }
}

/// The broker-wide budget and how to make connections' budgets.
#[derive(Debug)]
pub(crate) struct ReplyMemory {
    global: Arc<Budget>,
    per_connection: usize,
    metrics: MemoryMetrics,
}

impl ReplyMemory {
    /// The budgets for `limit` bytes broker-wide and `per_connection` per connection.
    pub(crate) fn new(limit: usize, per_connection: usize, metrics: MemoryMetrics) -> ReplyMemory {
        metrics.limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
        let global = Arc::new(Budget {
            sem: Arc::new(Semaphore::new(limit.min(Semaphore::MAX_PERMITS))),
            limit,
            used: Some(metrics.used.clone()),
            peak: AtomicUsize::new(0),
        });
        ReplyMemory {
            global,
            per_connection,
            metrics,
        }
    }

    /// A new connection's budget.
    pub(crate) fn connection_budget(&self) -> Arc<Budget> {
        Budget::new(self.per_connection)
    }

    /// The broker-wide budget.
    pub(crate) fn global(&self) -> &Arc<Budget> {
        &self.global
    }

    pub(crate) fn metrics(&self) -> &MemoryMetrics {
        &self.metrics
    }

    /// A ledger for a request that came without one (not through [`ReplyMemoryLayer`]): its
    /// charges count against the broker-wide budget only, and end when it is dropped.
    pub(crate) fn detached_ledger(&self) -> Ledger {
        Ledger::new(self.global.clone(), None)
    }
}

/// Permits of one budget held by a charge.
#[derive(Debug)]
struct Held {
    budget: Arc<Budget>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Held {
    fn new(budget: Arc<Budget>) -> Held {
        Held {
            budget,
            permit: None,
        }
    }

    fn add(&mut self, p: OwnedSemaphorePermit) {
        self.budget.note(p.num_permits() as i64);
        match &mut self.permit {
            Some(mine) => mine.merge(p),
            None => self.permit = Some(p),
        }
        self.budget
            .peak
            .fetch_max(self.budget.used(), Ordering::Relaxed);
    }

    fn try_take(&self, n: u32) -> Option<OwnedSemaphorePermit> {
        self.budget.sem.clone().try_acquire_many_owned(n).ok()
    }

    /// Gives back all but `keep` bytes.
    fn shrink_to(&mut self, keep: usize) {
        let Some(p) = &mut self.permit else { return };
        let held = p.num_permits();
        if held > keep {
            drop(p.split(held - keep));
            self.budget.note(-((held - keep) as i64));
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(p) = &self.permit {
            self.budget.note(-(p.num_permits() as i64));
        }
    }
}

/// Bytes held against the broker-wide budget and (usually) a connection's, given back when
/// dropped.
#[derive(Debug)]
pub(crate) struct Charge {
    global: Held,
    conn: Option<Held>,
    bytes: usize,
}

/// Converts a byte count to semaphore permits (replies are far below 4 GiB; a larger request
/// can never be granted anyway).
fn permits(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Charge {
    fn new(global: Arc<Budget>, conn: Option<Arc<Budget>>) -> Charge {
        Charge {
            global: Held::new(global),
            conn: conn.map(Held::new),
            bytes: 0,
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes `n` more bytes if both budgets have them now.
    pub(crate) fn try_grow(&mut self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let n32 = permits(n);
        let c = match &self.conn {
            Some(c) => match c.try_take(n32) {
                Some(p) => Some(p),
                None => return false,
            },
            None => None,
        };
        let Some(g) = self.global.try_take(n32) else {
            return false; // `c` goes back
        };
        self.global.add(g);
        if let (Some(held), Some(p)) = (&mut self.conn, c) {
            held.add(p);
        }
        self.bytes += n;
        true
    }

    /// Takes `n` more bytes, waiting (in FIFO order with other waiters) until both budgets
    /// have them. Cancel-safe: nothing is taken unless it completes.
    pub(crate) async fn grow(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let n32 = permits(n);
        // The connection's budget first: a connection that holds its own budget waits
        // without holding broker-wide bytes that other connections could use.
        let c = match &self.conn {
            Some(c) => match c.budget.sem.clone().acquire_many_owned(n32).await {
                Ok(p) => Some(p),
                Err(_) => return, // never closed
            },
            None => None,
        };
        let Ok(g) = self.global.budget.sem.clone().acquire_many_owned(n32).await else {
            return;
        };
        self.global.add(g);
        if let (Some(held), Some(p)) = (&mut self.conn, c) {
            held.add(p);
        }
        self.bytes += n;
    }

    /// Gives back all but `keep` bytes.
    pub(crate) fn shrink_to(&mut self, keep: usize) {
        if keep >= self.bytes {
            return;
        }
        self.global.shrink_to(keep);
        if let Some(c) = &mut self.conn {
            c.shrink_to(keep);
        }
        self.bytes = keep;
    }

    /// The error for a reply that needed `needed` bytes and waited `waited` in vain.
    pub(crate) fn exhausted(
        &self,
        needed: usize,
        waited: std::time::Duration,
    ) -> crate::error::BrokerError {
        let (conn_used, conn_limit) = self
            .conn
            .as_ref()
            .map_or((0, 0), |c| (c.budget.used(), c.budget.limit()));
        crate::error::BrokerError::ReplyMemoryExhausted {
            needed,
            waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
            used: self.global.budget.used(),
            limit: self.global.budget.limit(),
            conn_used,
            conn_limit,
        }
    }

    /// Whether `n` bytes could ever be granted (both budgets are at least that large).
    pub(crate) fn fits_at_all(&self, n: usize) -> bool {
        n <= self.global.budget.limit && self.conn.as_ref().is_none_or(|c| n <= c.budget.limit)
    }
}

/// The charges of one request's reply messages that tonic has taken but whose bytes the
/// body has not yet yielded (see the module docs).
#[derive(Clone, Debug)]
pub(crate) struct Ledger(Arc<LedgerInner>);

#[derive(Debug)]
struct LedgerInner {
    global: Arc<Budget>,
    conn: Option<Arc<Budget>>,
    pending: Mutex<Vec<Charge>>,
}

impl Ledger {
    fn new(global: Arc<Budget>, conn: Option<Arc<Budget>>) -> Ledger {
        Ledger(Arc::new(LedgerInner {
            global,
            conn,
            pending: Mutex::new(Vec::new()),
        }))
    }

    /// The ledger [`ReplyMemoryLayer`] attached to a request.
    pub(crate) fn of<T>(req: &tonic::Request<T>) -> Option<Ledger> {
        req.extensions().get::<Ledger>().cloned()
    }

    /// An empty charge against this request's budgets.
    pub(crate) fn charge(&self) -> Charge {
        Charge::new(self.0.global.clone(), self.0.conn.clone())
    }

    /// Hands a message's charge over to the body: it ends once the next data frame is
    /// written (call it when tonic takes the message to encode it).
    pub(crate) fn hand_over(&self, c: Charge) {
        if c.bytes() > 0 {
            self.lock().push(c);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Charge>> {
        self.0
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Vec<Charge> {
        std::mem::take(&mut *self.lock())
    }
}

/// A tower layer (for tonic's `Server::layer`) giving each request a [`Ledger`] on its
/// connection's budget and tying the ledger's charges to the response's data frames.
#[derive(Clone, Debug)]
pub(crate) struct ReplyMemoryLayer {
    global: Arc<Budget>,
}

impl ReplyMemoryLayer {
    pub(crate) fn new(memory: &ReplyMemory) -> ReplyMemoryLayer {
        ReplyMemoryLayer {
            global: memory.global().clone(),
        }
    }
}

impl<S> tower_layer::Layer<S> for ReplyMemoryLayer {
    type Service = ReplyMemoryService<S>;

    fn layer(&self, inner: S) -> ReplyMemoryService<S> {
        ReplyMemoryService {
            inner,
            global: self.global.clone(),
        }
    }
}

/// The service [`ReplyMemoryLayer`] makes.
#[derive(Clone, Debug)]
pub(crate) struct ReplyMemoryService<S> {
    inner: S,
    global: Arc<Budget>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<http::Request<Body>> for ReplyMemoryService<S>
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

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let conn = req
            .extensions()
            .get::<ConnInfo>()
            .map(|c| c.reply_memory.clone());
        let ledger = Ledger::new(self.global.clone(), conn);
        req.extensions_mut().insert(ledger.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|b| Body::new(ChargedBody { inner: b, ledger })))
        })
    }
}

/// A response body that attaches its ledger's charges to the data frames it yields.
struct ChargedBody {
    inner: Body,
    ledger: Ledger,
}

/// A data frame's bytes and the charges that end when h2 drops them.
struct FrameOwner {
    data: Bytes,
    _charges: Vec<Charge>,
}

impl AsRef<[u8]> for FrameOwner {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl HttpBody for ChargedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                let charges = self.ledger.take();
                if charges.is_empty() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Ok(frame.map_data(|data| {
                    Bytes::from_owner(FrameOwner {
                        data,
                        _charges: charges,
                    })
                }))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A server stream whose items carry reply-memory charges: each charge is handed to the
/// ledger when tonic takes its item, so it ends when the item's bytes are written.
#[derive(Debug)]
pub(crate) struct ChargedStream<T> {
    rx: tokio::sync::mpsc::Receiver<(Result<T, tonic::Status>, Option<Charge>)>,
    ledger: Ledger,
}

impl<T> ChargedStream<T> {
    pub(crate) fn new(
        rx: tokio::sync::mpsc::Receiver<(Result<T, tonic::Status>, Option<Charge>)>,
        ledger: Ledger,
    ) -> ChargedStream<T> {
        ChargedStream { rx, ledger }
    }
}

impl<T> futures_util::Stream for ChargedStream<T> {
    type Item = Result<T, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some((item, charge))) => {
                if let Some(c) = charge {
                    self.ledger.hand_over(c);
                }
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_grow_shrink_and_end_on_drop() {
        let memory = ReplyMemory::new(1000, 600, MemoryMetrics::default());
        let conn = memory.connection_budget();
        let ledger = Ledger::new(memory.global().clone(), Some(conn.clone()));
        let mut a = ledger.charge();
        assert!(a.try_grow(500));
        assert!(!a.try_grow(200), "the connection's 600 would be exceeded");
        assert_eq!((memory.global().used(), conn.used()), (500, 500));
        a.shrink_to(100);
        assert_eq!((memory.global().used(), conn.used()), (100, 100));
        // Another connection: the broker-wide 1000 is the bound.
        let other = Ledger::new(memory.global().clone(), Some(memory.connection_budget()));
        let mut b = other.charge();
        assert!(b.try_grow(600));
        let third = Ledger::new(memory.global().clone(), Some(memory.connection_budget()));
        let mut c = third.charge();
        assert!(!c.try_grow(400), "1100 > 1000 broker-wide");
        assert!(c.try_grow(300));
        assert_eq!(memory.global().used(), 1000);
        assert_eq!(memory.metrics().used.get(), 1000);
        drop(a);
        drop(b);
        drop(c);
        assert_eq!((memory.global().used(), conn.used()), (0, 0));
        assert_eq!(memory.metrics().used.get(), 0);
        assert!(!ledger.charge().fits_at_all(601));
        assert!(ledger.charge().fits_at_all(600));
    }

    #[tokio::test]
    async fn a_waiter_gets_memory_when_a_frame_is_dropped() {
        let memory = ReplyMemory::new(1000, 1000, MemoryMetrics::default());
        let ledger = memory.detached_ledger();
        let mut a = ledger.charge();
        assert!(a.try_grow(900));
        // The charge rides on a frame's bytes; dropping the frame (written) releases it.
        ledger.hand_over(a);
        let frame = Bytes::from_owner(FrameOwner {
            data: Bytes::from_static(b"x"),
            _charges: ledger.take(),
        });
        let mut b = ledger.charge();
        let waiter = tokio::spawn(async move {
            b.grow(500).await;
            b
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let clone = frame.clone(); // h2 slices frames: the last slice releases
        drop(frame);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(clone);
        let b = waiter.await.unwrap();
        assert_eq!(b.bytes(), 500);
        assert_eq!(memory.global().used(), 500);
    }
}
