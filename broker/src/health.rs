//! The gRPC health service (`grpc.health.v1.Health`): tonic-health's reporter and answers,
//! except that a `Watch` stream ends at shutdown.
//!
//! tonic-health keeps each service's status sender for as long as the reporter lives, so a
//! `Watch` stream never ends on its own. hyper's graceful shutdown waits for every open
//! stream: one client doing gRPC client-side health checking (which keeps a `Watch` open)
//! would hold the broker's shutdown until `shutdown_timeout_ms`.
//!
//! Invariants:
//! - From [`Health::start`] every service, and the server as a whole (`""`), is SERVING; at
//!   [`Health::stop`] every one of them turns NOT_SERVING, then the shutdown flag rises.
//! - Once the shutdown flag is up, a `Watch` stream sends the status it has not yet sent
//!   (NOT_SERVING, a watcher's last word) and ends; `Check` keeps answering until the server
//!   stops.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{FutureExt, Stream};
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health as HealthApi, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// The names of the services whose status the health service reports, besides `""`.
pub(crate) type Names = &'static [&'static str];

/// The health reporter and the statuses it reports.
pub(crate) struct Health {
    reporter: HealthReporter,
    names: Names,
}

impl Health {
    /// A health service reporting `names` (and `""`), whose `Watch` streams end once
    /// `shutdown` is true.
    pub(crate) fn new(
        names: Names,
        shutdown: watch::Receiver<bool>,
    ) -> (Health, HealthServer<Watched>) {
        let reporter = HealthReporter::new();
        let inner = HealthService::from_health_reporter(reporter.clone());
        let server = HealthServer::new(Watched { inner, shutdown });
        (Health { reporter, names }, server)
    }

    /// Every service SERVING.
    pub(crate) async fn start(&self) {
        self.set_all(ServingStatus::Serving).await;
    }

    /// Every service, and the server, NOT_SERVING; call before the shutdown flag rises, so a
    /// watcher's last status is this one.
    pub(crate) async fn stop(&self) {
        self.set_all(ServingStatus::NotServing).await;
    }

    async fn set_all(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for name in self.names {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// The name a service is registered under.
pub(crate) const fn name<S: NamedService>() -> &'static str {
    S::NAME
}

/// tonic-health's service, with `Watch` streams that end at shutdown.
pub(crate) struct Watched {
    inner: HealthService,
    shutdown: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl HealthApi for Watched {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchUntilShutdown;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        let mut shutdown = self.shutdown.clone();
        Ok(Response::new(WatchUntilShutdown {
            inner,
            shutdown: Box::pin(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            }),
            ending: false,
            last: None,
        }))
    }
}

/// A `Watch` stream: tonic-health's, until the shutdown flag rises; then the status not yet
/// sent, if any, and the end. Its last status is NOT_SERVING whatever the inner stream does
/// then (it may say `Pending` for a status it holds, when the task ran out of tokio's
/// cooperative budget): one is made up when the last one sent was another.
pub(crate) struct WatchUntilShutdown {
    inner: <HealthService as HealthApi>::WatchStream,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    ending: bool,
    /// The last status sent; `Some(NotServing)` once the stream has said its last word.
    last: Option<i32>,
}

impl Stream for WatchUntilShutdown {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if !self.ending && self.shutdown.poll_unpin(cx).is_ready() {
            self.ending = true;
        }
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(r))) = &next {
            self.last = Some(r.status);
        }
        if !self.ending {
            return next;
        }
        // Shutting down: what the watcher has not seen yet goes out (the reporter turned
        // every status NOT_SERVING before the flag rose), then the stream ends.
        let not_serving = NOT_SERVING as i32;
        match next {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            Poll::Ready(None) | Poll::Pending if self.last != Some(not_serving) => {
                self.last = Some(not_serving);
                Poll::Ready(Some(Ok(HealthCheckResponse {
                    status: not_serving,
                })))
            }
            Poll::Ready(None) | Poll::Pending => Poll::Ready(None),
        }
    }
}

/// NOT_SERVING as `grpc.health.v1` writes it.
const NOT_SERVING: tonic_health::pb::health_check_response::ServingStatus =
    tonic_health::pb::health_check_response::ServingStatus::NotServing;
