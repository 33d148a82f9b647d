//! A stream processor run inside the bench process, on the runtime (`spool_processor::runtime`),
//! with its metrics at hand: what the processor and deals/matching benches measure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use spool_client::Client;
use spool_processor::metrics::Metrics;
use spool_processor::runtime::{self, RuntimeConfig};
use tokio::sync::watch;

/// A processor running in this process.
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), spool_processor::RuntimeError>>,
    /// Its metrics (readiness, records done, the Prometheus text).
    pub metrics: Arc<Metrics>,
    /// When it was started.
    pub started: Instant,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("started", &self.started)
            .field("finished", &self.task.is_finished())
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Starts `handler` with `cfg` on a task of the current runtime.
    pub fn start<H: spool_processor::AsyncHandler>(
        client: &Client,
        cfg: RuntimeConfig,
        handler: H,
    ) -> Running {
        let metrics = Arc::new(Metrics::new());
        let (stop, rx) = watch::channel(false);
        let started = Instant::now();
        let task = tokio::spawn(runtime::run(
            client.clone(),
            cfg,
            handler,
            metrics.clone(),
            rx,
        ));
        Running {
            stop,
            task,
            metrics,
            started,
        }
    }

    /// Waits until ready (in its group, state restored); returns when.
    pub async fn ready(&self, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        while !self.metrics.is_ready() {
            if self.task.is_finished() {
                bail!("the processor stopped before it was ready");
            }
            if Instant::now() > deadline {
                bail!("the processor was not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(Instant::now())
    }

    /// Stops it and waits for the end of its run.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("joining the processor")??;
        Ok(())
    }
}
