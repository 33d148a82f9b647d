//! Giving reply memory back to the system after a burst.
//!
//! Replies are built and encoded on the heap (decompressed data, decoded records, tonic's
//! encoded copy of each message). glibc's malloc keeps what was freed in its per-thread
//! arenas, so after a burst of large replies the freed memory stayed resident (issue 12:
//! 0.6–3 GB after every stream was cancelled). The budget bounds the peak; this module
//! returns the memory afterwards: every [`INTERVAL`], if the broker-wide reply memory in use
//! rose to at least [`threshold`] since the last look and is now below a quarter of it (the
//! burst is over), it calls glibc's `malloc_trim(0)` once on the blocking pool, which
//! releases the free pages of every arena. Counted in `spool_memory_trims_total`.
//!
//! Invariants: at most one trim per [`INTERVAL`] (one task, one trim at a time, awaited);
//! never on an async worker thread; a trim only follows a burst (the peak is reset by each
//! look that trims). Elsewhere than glibc (`target_env != "gnu"`) nothing is trimmed.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use crate::budget::Budget;

/// How often the reply memory is looked at: the most often memory is trimmed, and about
/// how long after a burst memory is returned.
pub(crate) const INTERVAL: Duration = Duration::from_secs(2);

/// The peak of reply memory in use that counts as a burst: 32 MiB, or an eighth of the
/// budget if that is smaller.
pub(crate) fn threshold(limit: usize) -> usize {
    (32 << 20).min(limit / 8).max(1)
}

/// Whether to trim now: a burst (a peak of at least `threshold`) is over (in use now is
/// below a quarter of it).
fn burst_is_over(peak: usize, used: usize, threshold: usize) -> bool {
    peak >= threshold && used < threshold / 4
}

/// Watches `budget` until `shutdown` and trims after each burst.
pub(crate) async fn run(budget: Arc<Budget>, trims: Counter, mut shutdown: watch::Receiver<bool>) {
    let threshold = threshold(budget.limit());
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        if !burst_is_over(budget.peak(), budget.used(), threshold) {
            continue;
        }
        budget.reset_peak();
        if trim().await {
            trims.inc();
        }
    }
}

/// Returns freed heap memory to the system (on the blocking pool); whether it was tried.
#[cfg(target_env = "gnu")]
async fn trim() -> bool {
    // SAFETY: malloc_trim only walks the allocator's own arenas under their locks; it has
    // no preconditions.
    let done = tokio::task::spawn_blocking(|| unsafe { libc::malloc_trim(0) }).await;
    done.is_ok()
}

#[cfg(not(target_env = "gnu"))]
async fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_after_a_burst() {
        let t = threshold(1 << 30);
        assert_eq!(t, 32 << 20);
        assert_eq!(threshold(48 << 20), 6 << 20);
        assert!(!burst_is_over(t - 1, 0, t), "no burst");
        assert!(!burst_is_over(t, t / 4, t), "still in use");
        assert!(burst_is_over(t, t / 4 - 1, t));
        assert!(burst_is_over(4 * t, 0, t));
    }

    #[tokio::test]
    async fn a_burst_is_trimmed_once() {
        let memory = crate::budget::ReplyMemory::new(
            64 << 20,
            64 << 20,
            crate::budget::MemoryMetrics::default(),
        );
        let budget = memory.global().clone();
        let trims = Counter::default();
        let (tx, rx) = watch::channel(false);
        tokio::time::pause();
        let task = tokio::spawn(run(budget.clone(), trims.clone(), rx));
        {
            let mut c = memory.detached_ledger().charge();
            assert!(c.try_grow(16 << 20));
            tokio::time::sleep(INTERVAL * 2).await;
            assert_eq!(trims.get(), 0, "not while the burst holds its memory");
        }
        tokio::time::sleep(INTERVAL * 2).await;
        let expected = u64::from(cfg!(target_env = "gnu"));
        assert_eq!(trims.get(), expected, "once after it");
        tokio::time::sleep(INTERVAL * 3).await;
        assert_eq!(trims.get(), expected, "and not again without a burst");
        tx.send(true).unwrap();
        task.await.unwrap();
    }
}
