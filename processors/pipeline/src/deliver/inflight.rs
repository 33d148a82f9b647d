//! Deliveries in flight: a bounded number of sends running concurrently beside the
//! processor's loop, so `spool-notifications` hands several mails to the MTA at once instead
//! of waiting for each `250` before reading the next record.
//!
//! This module only runs the sends and keeps their results; the notifications processor
//! ([`crate::processors::notifications`]) keeps the contract around it:
//!
//! 1. reading an `outgoing-mail` record, it records a *pending* wall-clock timer (the record
//!    itself as payload) in the transaction of the record's offset, and starts the send here;
//! 2. on that timer it settles the result found here, in one transaction: the idempotency key
//!    (effect done) + `mail-status` `queued`, or `failed` + the dead letter, or a later retry
//!    (the timer set again); a send still running sets the timer again a moment later;
//! 3. a timer that finds no result here (the process restarted, or the partition moved to this
//!    instance) starts the send again: at least once.
//!
//! # Invariants
//!
//! - At most `max` sends run at once: [`InFlight::start`] waits for a free slot, and
//!   [`InFlight::try_start`] starts nothing without one. A slot is freed when its send returns,
//!   not when its result is collected, so waiting for a slot never waits for the processor's
//!   own loop.
//! - An id has at most one send here: starting an id that is running or has a result does
//!   nothing. So an input processed again after an aborted transaction does not send again
//!   while this process lives.
//! - A result is kept until [`InFlight::forget`] or [`RESULT_TTL`] after the send finished
//!   (a result whose timer moved to another instance is never collected), so memory is bounded
//!   by the send rate times the TTL.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::Outcome;

/// How long a finished send's result is kept if nobody collects it.
pub const RESULT_TTL: Duration = Duration::from_secs(120);

/// Where a send is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendState {
    /// Never started here (or forgotten).
    Absent,
    /// Running.
    Running,
    /// Returned `outcome` at `at_ms` (wall clock, ms since the epoch).
    Finished {
        /// What it came to.
        outcome: Outcome,
        /// When it returned.
        at_ms: i64,
    },
}

#[derive(Debug)]
enum Slot {
    Running,
    Finished {
        outcome: Outcome,
        at_ms: i64,
        done: Instant,
    },
}

/// Sends running concurrently, at most `max` at once, and their results by id.
#[derive(Debug, Clone)]
pub struct InFlight {
    permits: Arc<Semaphore>,
    max: usize,
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl InFlight {
    /// At most `max` (at least 1) sends at once.
    pub fn new(max: usize) -> InFlight {
        let max = max.max(1);
        InFlight {
            permits: Arc::new(Semaphore::new(max)),
            max,
            slots: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Sends running now.
    pub fn running(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `send` for `id` once a slot is free (waits for one), unless `id` is already
    /// running or has a result here. Call inside a Tokio runtime.
    pub async fn start<F>(&self, id: &str, send: F)
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        if self.known(id) {
            return;
        }
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.spawn(id, permit, send);
    }

    /// Starts `send` for `id` if a slot is free now; false if every slot is busy. An id
    /// already running or with a result counts as started.
    pub fn try_start<F>(&self, id: &str, send: F) -> bool
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        if self.known(id) {
            return true;
        }
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                self.spawn(id, permit, send);
                true
            }
            Err(_) => false,
        }
    }

    fn known(&self, id: &str) -> bool {
        self.prune();
        self.slots().contains_key(id)
    }

    fn spawn<F>(&self, id: &str, permit: tokio::sync::OwnedSemaphorePermit, send: F)
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        self.slots().insert(id.to_owned(), Slot::Running);
        let slots = Arc::clone(&self.slots);
        let id = id.to_owned();
        tokio::spawn(async move {
            let outcome = send.await;
            drop(permit);
            slots.lock().unwrap_or_else(PoisonError::into_inner).insert(
                id,
                Slot::Finished {
                    outcome,
                    at_ms: now_ms(),
                    done: Instant::now(),
                },
            );
        });
    }

    /// Where `id`'s send is.
    pub fn state(&self, id: &str) -> SendState {
        match self.slots().get(id) {
            None => SendState::Absent,
            Some(Slot::Running) => SendState::Running,
            Some(Slot::Finished { outcome, at_ms, .. }) => SendState::Finished {
                outcome: outcome.clone(),
                at_ms: *at_ms,
            },
        }
    }

    /// Drops `id`'s result, so the id can be sent again (a retry). A running send is left
    /// alone: its result is kept when it returns, for at most [`RESULT_TTL`].
    pub fn forget(&self, id: &str) {
        let mut slots = self.slots();
        if matches!(slots.get(id), Some(Slot::Finished { .. })) {
            slots.remove(id);
        }
    }

    /// Drops results older than [`RESULT_TTL`].
    fn prune(&self) {
        let mut slots = self.slots();
        slots.retain(|_, s| match s {
            Slot::Running => true,
            Slot::Finished { done, .. } => done.elapsed() < RESULT_TTL,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Outcome {
        Outcome::Delivered {
            queue_id: None,
            detail: "250".into(),
        }
    }

    async fn settled(f: &InFlight, id: &str) -> SendState {
        for _ in 0..500 {
            if let s @ SendState::Finished { .. } = f.state(id) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("{id} did not finish");
    }

    #[tokio::test]
    async fn bounded_and_once_per_id() {
        let f = InFlight::new(2);
        let gate = Arc::new(Semaphore::new(0));
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for id in ["a", "b"] {
            let (gate, started) = (gate.clone(), started.clone());
            f.start(id, async move {
                started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _open = gate.acquire().await;
                ok()
            })
            .await;
        }
        assert_eq!(f.running(), 2);
        // Full: nothing else starts, and "a" again is not a second send.
        assert!(!f.try_start("c", async { ok() }));
        assert!(f.try_start("a", async { panic!("a started twice") }));
        assert_eq!(f.state("a"), SendState::Running);
        gate.add_permits(2);
        assert!(matches!(settled(&f, "a").await, SendState::Finished { .. }));
        settled(&f, "b").await;
        assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(f.running(), 0);
        // A result stays until forgotten; then the id can be sent again.
        f.start("a", async { panic!("a has a result") }).await;
        f.forget("a");
        assert_eq!(f.state("a"), SendState::Absent);
        assert!(f.try_start("a", async { Outcome::Retry("4xx".into()) }));
        assert!(matches!(
            settled(&f, "a").await,
            SendState::Finished {
                outcome: Outcome::Retry(_),
                ..
            }
        ));
    }

    #[tokio::test]
    async fn start_waits_for_a_free_slot() {
        let f = InFlight::new(1);
        f.start("slow", async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            ok()
        })
        .await;
        let t = Instant::now();
        f.start("next", async { ok() }).await;
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{:?}",
            t.elapsed()
        );
        settled(&f, "next").await;
    }
}
