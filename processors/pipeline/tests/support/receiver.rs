//! A real HTTP receiver on 127.0.0.1 for webhook and push calls (hyper, HTTP/1.1): records
//! every request (path, `Idempotency-Key`, JSON body) and answers with the status a policy
//! picks from the path and how many times that key was seen (to exercise retries and dead
//! letters).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// One request received.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    pub key: String,
    pub body: serde_json::Value,
    pub status: u16,
    /// When it arrived.
    pub at: std::time::Instant,
}

type Policy = dyn Fn(&str, &str, usize) -> u16 + Send + Sync;

/// A running receiver (stops with the runtime).
pub struct Receiver {
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Requests being answered now, and the most at once.
    open: Arc<(AtomicUsize, AtomicUsize)>,
}

impl Receiver {
    /// Starts on an ephemeral port; `policy(path, key, attempt)` (attempt 1-based per key) gives
    /// the status to answer.
    pub async fn start(
        policy: impl Fn(&str, &str, usize) -> u16 + Send + Sync + 'static,
    ) -> Receiver {
        Receiver::start_slow(Duration::ZERO, policy).await
    }

    /// [`Receiver::start`], answering each request `delay` after it arrived (a remote
    /// endpoint's latency).
    pub async fn start_slow(
        delay: Duration,
        policy: impl Fn(&str, &str, usize) -> u16 + Send + Sync + 'static,
    ) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let policy: Arc<Policy> = Arc::new(policy);
        let seen: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let c = calls.clone();
        let open: Arc<(AtomicUsize, AtomicUsize)> = Arc::default();
        let o = open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (calls, policy, seen, open) =
                    (c.clone(), policy.clone(), seen.clone(), o.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (calls, policy, seen, open) =
                            (calls.clone(), policy.clone(), seen.clone(), open.clone());
                        async move {
                            let now = open.0.fetch_add(1, Ordering::SeqCst) + 1;
                            open.1.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            open.0.fetch_sub(1, Ordering::SeqCst);
                            let path = req.uri().path().to_owned();
                            let key = req
                                .headers()
                                .get("idempotency-key")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let body =
                                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                            let attempt = {
                                let mut s = seen.lock().unwrap();
                                let n = s.entry(key.clone()).or_default();
                                *n += 1;
                                *n
                            };
                            let status = policy(&path, &key, attempt);
                            calls.lock().unwrap().push(Call {
                                path,
                                key,
                                body,
                                status,
                                at: std::time::Instant::now(),
                            });
                            Ok::<_, hyper::Error>(
                                Response::builder()
                                    .status(StatusCode::from_u16(status).unwrap())
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { addr, calls, open }
    }

    /// The most requests that were being answered at once.
    pub fn max_open(&self) -> usize {
        self.open.1.load(Ordering::SeqCst)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}
