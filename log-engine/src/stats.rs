//! Latency statistics the engine keeps for operators (exported by the broker as metrics).
//!
//! A fixed set of exponential buckets of atomic counters: recording is two relaxed atomic adds
//! and never allocates or locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds (the last bucket is unbounded).
pub const BUCKETS_MICROS: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
];

/// A latency histogram.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    count: AtomicU64,
    sum_nanos: AtomicU64,
    buckets: [AtomicU64; BUCKETS_MICROS.len()],
}

impl Latency {
    pub(crate) fn record(&self, d: Duration) {
        let micros = d.as_micros() as u64;
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        if let Some(i) = BUCKETS_MICROS.iter().position(|&b| micros <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            count: self.count.load(Ordering::Relaxed),
            sum: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)),
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
        }
    }
}

/// A point-in-time copy of a latency histogram.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Observations.
    pub count: u64,
    /// Sum of all observations.
    pub sum: Duration,
    /// Observations per bucket of [`BUCKETS_MICROS`] (not cumulative); observations above the
    /// last bound are `count - sum(buckets)`.
    pub buckets: [u64; BUCKETS_MICROS.len()],
}

impl LatencySnapshot {
    /// Adds another snapshot into this one (to aggregate partitions).
    pub fn merge(&mut self, other: &LatencySnapshot) {
        self.count += other.count;
        self.sum += other.sum;
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        let l = Latency::default();
        l.record(Duration::from_micros(10));
        l.record(Duration::from_micros(300));
        l.record(Duration::from_secs(1));
        let s = l.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[3], 1);
        assert_eq!(s.buckets.iter().sum::<u64>(), 2, "1 s is above every bound");
    }
}
