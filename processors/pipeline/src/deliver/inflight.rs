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
//! - At most `max` sends run at once (hold a slot). Up to `max_waiting` more wait for a slot
//!   beside them, each in its own task that starts its send the moment a slot frees, so the
//!   processor's loop does not wait for a free slot: one slow send (a stalled MTA
//!   connection, a slow webhook) holds its slot, not the loop, and alerts, campaigns and
//!   settlements go on. [`InFlight::start`] waits only when `max_waiting` sends are already
//!   waiting (then the MTA is slower than the input, and waiting is the backpressure that
//!   bounds memory); [`InFlight::try_start`] never waits. A slot is freed when its send
//!   returns, not when its result is collected, so waiting never waits for the processor's
//!   own loop.
//! - An id has at most one send here: starting an id that is waiting, running or has a result
//!   does nothing. So an input processed again after an aborted transaction does not send
//!   again while this process lives.
//! - A result is kept until [`InFlight::forget`] (a retry), [`InFlight::forget_given_up`] (a
//!   failure already settled, sent anew) or [`RESULT_TTL`] after the send finished (a result
//!   whose timer moved to another instance is never collected), so memory is bounded by the
//!   send rate times the TTL. A failure being settled is marked ([`InFlight::give_up`]), not
//!   dropped, so an aborted settlement settles it again from here instead of sending again.
//! - [`InFlight::drain`] (a clean stop) starts nothing more: sends still waiting for a slot
//!   are dropped unsent (their ids become absent: their pending timers, committed, send them
//!   after the restart); it returns once every send that had started has returned.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Outcome;

/// How long a finished send's result is kept if nobody collects it.
pub const RESULT_TTL: Duration = Duration::from_secs(120);

/// Where a send is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendState {
    /// Never started here (or forgotten, or dropped unsent by a drain).
    Absent,
    /// Waiting for a slot, or running.
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
        /// Settled as given up ([`InFlight::give_up`]): kept for an aborted settlement,
        /// dropped by [`InFlight::forget_given_up`] when the same id is sent anew.
        given_up: bool,
    },
}

/// Sends running concurrently, at most `max` at once (and `max_waiting` more waiting for a
/// slot), and their results by id.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// Slots: one permit per send running.
    permits: Arc<Semaphore>,
    /// Sends started (waiting or running): `max + max_waiting` permits.
    admitted: Arc<Semaphore>,
    /// `max + max_waiting`.
    admitted_max: usize,
    max: usize,
    /// Set by [`InFlight::drain`]: waiting sends give up.
    draining: Arc<AtomicBool>,
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl InFlight {
    /// At most `max` (at least 1) sends at once, and `max_waiting` more waiting for a slot.
    pub fn new(max: usize, max_waiting: usize) -> InFlight {
        let max = max.max(1);
        InFlight {
            permits: Arc::new(Semaphore::new(max)),
            admitted: Arc::new(Semaphore::new(max + max_waiting)),
            admitted_max: max + max_waiting,
            max,
            draining: Arc::new(AtomicBool::new(false)),
            slots: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Sends running now (holding a slot).
    pub fn running(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `send` for `id` (it runs once a slot is free), unless `id` is already waiting,
    /// running or has a result here. Waits only while `max_waiting` sends already wait for a
    /// slot. Call inside a Tokio runtime.
    pub async fn start<F>(&self, id: &str, send: F)
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        if self.known(id) {
            return;
        }
        let admitted = Arc::clone(&self.admitted)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.spawn(id, admitted, send);
    }

    /// Starts `send` for `id` if it can without waiting (see [`InFlight::start`]); false if
    /// `max_waiting` sends already wait. An id already known here counts as started.
    pub fn try_start<F>(&self, id: &str, send: F) -> bool
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        if self.known(id) {
            return true;
        }
        match Arc::clone(&self.admitted).try_acquire_owned() {
            Ok(admitted) => {
                self.spawn(id, admitted, send);
                true
            }
            Err(_) => false,
        }
    }

    fn known(&self, id: &str) -> bool {
        self.prune();
        self.slots().contains_key(id)
    }

    fn spawn<F>(&self, id: &str, admitted: OwnedSemaphorePermit, send: F)
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        self.slots().insert(id.to_owned(), Slot::Running);
        let (slots, permits, draining) = (
            Arc::clone(&self.slots),
            Arc::clone(&self.permits),
            Arc::clone(&self.draining),
        );
        let id = id.to_owned();
        tokio::spawn(async move {
            let slot = permits
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let result = if draining.load(Ordering::SeqCst) {
                None // stopping: not handed over, so nothing to settle
            } else {
                Some(send.await)
            };
            let mut slots = slots.lock().unwrap_or_else(PoisonError::into_inner);
            match result {
                Some(outcome) => slots.insert(
                    id,
                    Slot::Finished {
                        outcome,
                        at_ms: now_ms(),
                        done: Instant::now(),
                        given_up: false,
                    },
                ),
                None => slots.remove(&id),
            };
            drop(slots);
            drop(slot);
            drop(admitted);
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

    /// Marks `id`'s result as given up (its failure is being settled: `failed`, the dead
    /// letter) **without dropping it**: if that settlement's transaction aborts, its timer
    /// fires again and settles from this same result instead of sending again. It goes with
    /// [`RESULT_TTL`], or with [`InFlight::forget_given_up`].
    pub fn give_up(&self, id: &str) {
        if let Some(Slot::Finished { given_up, .. }) = self.slots().get_mut(id) {
            *given_up = true;
        }
    }

    /// Drops `id`'s result if it was given up ([`InFlight::give_up`]), so a record sent anew
    /// (a redriven dead letter) is sent, not settled from the old failure. Anything else
    /// (running, a result not settled yet) stays.
    pub fn forget_given_up(&self, id: &str) {
        let mut slots = self.slots();
        if matches!(slots.get(id), Some(Slot::Finished { given_up: true, .. })) {
            slots.remove(id);
        }
    }

    /// A clean stop: no send starts any more (those waiting for a slot are dropped unsent),
    /// and this returns once every send that had started has returned (each is bounded by
    /// its own timeout). Results stay here to be settled.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        // Every send started holds its admission until it returns or gives up unsent; no
        // send is started while the processor stops, so once all are back nothing runs.
        let all = u32::try_from(self.admitted_max).unwrap_or(u32::MAX);
        drop(self.admitted.acquire_many(all).await);
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

    /// Yields (2 ms steps, at most 1 s) until `cond` holds.
    async fn until(cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("condition not reached in 1 s");
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
        let f = InFlight::new(2, 0);
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
        // The spawned sends take their slots when they first run.
        until(|| f.running() == 2).await;
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

    /// A failure being settled stays (an aborted settlement finds it again) until the same id
    /// is sent anew; a result not settled yet is never dropped that way.
    #[tokio::test]
    async fn a_given_up_result_stays_until_sent_anew() {
        let f = InFlight::new(1, 0);
        f.start("a", async { Outcome::Dead("550".into()) }).await;
        settled(&f, "a").await;
        // Not given up yet: a record read again (an aborted transaction) keeps the result.
        f.forget_given_up("a");
        assert!(matches!(f.state("a"), SendState::Finished { .. }));
        f.give_up("a");
        assert!(
            matches!(
                f.state("a"),
                SendState::Finished {
                    outcome: Outcome::Dead(_),
                    ..
                }
            ),
            "kept for a settlement that aborts"
        );
        f.start("a", async { panic!("a has a result") }).await;
        f.forget_given_up("a");
        assert_eq!(f.state("a"), SendState::Absent);
        assert!(f.try_start("a", async { ok() }));
        assert!(matches!(
            settled(&f, "a").await,
            SendState::Finished {
                outcome: Outcome::Delivered { .. },
                ..
            }
        ));
    }

    #[tokio::test]
    async fn start_waits_only_when_the_waiting_room_is_full() {
        let f = InFlight::new(1, 0);
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

    /// A send that cannot return yet (until `gate` gets a permit), counting its starts.
    fn gated(gate: &Arc<Semaphore>) -> impl Future<Output = Outcome> + Send + 'static {
        let gate = gate.clone();
        async move {
            let _open = gate.acquire().await;
            ok()
        }
    }

    #[tokio::test]
    async fn sends_wait_for_a_slot_beside_the_caller() {
        let f = InFlight::new(1, 2);
        let gate = Arc::new(Semaphore::new(0));
        f.start("a", gated(&gate)).await;
        // The slot is taken: "b" and "c" wait for it in their own tasks; the caller does not.
        for id in ["b", "c"] {
            tokio::time::timeout(Duration::from_secs(5), f.start(id, gated(&gate)))
                .await
                .expect("start does not wait for a free slot");
            assert_eq!(f.state(id), SendState::Running);
        }
        until(|| f.running() == 1).await;
        // One running and two waiting: the waiting room is full.
        assert!(!f.try_start("d", async { panic!("d admitted over the bound") }));
        gate.add_permits(3);
        for id in ["a", "b", "c"] {
            assert!(matches!(settled(&f, id).await, SendState::Finished { .. }));
        }
        assert!(f.try_start("d", async { ok() }));
        settled(&f, "d").await;
    }

    #[tokio::test]
    async fn drain_waits_for_the_running_sends_and_drops_the_waiting_ones() {
        let f = InFlight::new(1, 2);
        let gate = Arc::new(Semaphore::new(0));
        f.start("a", gated(&gate)).await;
        f.start("b", async { panic!("b was sent while draining") })
            .await;
        let drain = tokio::spawn({
            let f = f.clone();
            async move { f.drain().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!drain.is_finished(), "drain returned with a send running");
        gate.add_permits(1);
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .expect("drain returns once the running send has")
            .unwrap();
        assert!(matches!(f.state("a"), SendState::Finished { .. }));
        assert_eq!(f.state("b"), SendState::Absent, "dropped unsent");
        assert_eq!(f.running(), 0);
    }
}
