//! Thread placement: optional CPU sets for `spoold`'s runtime workers and for its blocking
//! threads (appends, fsyncs, reads that may fault; the log's write-back thread), like
//! Redpanda's `--cpuset` or TANK's thread placement.
//!
//! Off by default: with both sets empty no thread's affinity is touched. With a set given,
//! every thread of that kind is restricted to it with `sched_setaffinity`; a kind whose set
//! is empty keeps the affinity the process started with. Issue 14 measured this on a 2-vCPU
//! machine (docs/benchmarks.md); the default stays off unless it pays on both one and two
//! partitions.
//!
//! Invariants:
//! - a [`CpuSet`] holds distinct CPU numbers below [`MAX_CPU`], in increasing order; the
//!   text form is a Linux CPU list (`"0"`, `"0-1"`, `"0,2-3"`), also what `taskset -c` takes;
//! - a thread is pinned at most once per kind change: blocking threads when they start,
//!   runtime workers the first time they go idle (tokio calls no hook on a worker alone when
//!   it starts), so until then a worker runs with the blocking threads' set;
//! - a set that names no CPU the process may run on is refused when the runtime is built
//!   ([`Placement::check`]), not silently ignored.

use std::cell::Cell;
use std::fmt;
use std::io;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ConfigError;

/// Highest CPU number a set may name, plus one (glibc's `CPU_SETSIZE`).
pub const MAX_CPU: usize = 1024;

/// A set of CPUs, written as a Linux CPU list. Empty: no pinning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuSet(Vec<usize>);

impl CpuSet {
    /// Parses a CPU list such as `"0"`, `"0-3"` or `"0,2-3"` (empty: the empty set).
    pub fn parse(s: &str) -> Result<CpuSet, ConfigError> {
        let bad = |why: String| ConfigError::Invalid(format!("CPU list {s:?}: {why}"));
        let mut cpus = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let num = |t: &str| -> Result<usize, ConfigError> {
                let n: usize = t
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("{t:?} is not a CPU number")))?;
                if n >= MAX_CPU {
                    return Err(bad(format!("CPU {n} is beyond {}", MAX_CPU - 1)));
                }
                Ok(n)
            };
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let n = num(part)?;
                    (n, n)
                }
            };
            if lo > hi {
                return Err(bad(format!("range {part:?} runs backwards")));
            }
            cpus.extend(lo..=hi);
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuSet(cpus))
    }

    /// True when no CPU is named (no pinning).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The CPU numbers, in increasing order.
    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    fn to_libc(&self) -> libc::cpu_set_t {
        // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in &self.0 {
            // SAFETY: c < MAX_CPU == CPU_SETSIZE (checked when parsed), so the bit is inside set.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        set
    }

    /// The CPUs the calling thread may run on now.
    pub fn of_current_thread() -> io::Result<CpuSet> {
        // SAFETY: as in `to_libc`.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: pid 0 is the calling thread; the size is that of `set`, which lives across
        // the call.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: c < CPU_SETSIZE, the size of `set`.
        Ok(CpuSet(
            (0..MAX_CPU)
                .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
                .collect(),
        ))
    }

    /// Restricts the calling thread to these CPUs.
    pub fn pin_current_thread(&self) -> io::Result<()> {
        let set = self.to_libc();
        // SAFETY: pid 0 is the calling thread; `set` outlives the call and its size is given.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl fmt::Display for CpuSet {
    /// The CPU list, ranges collapsed (`0-2,5`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let lo = self.0[i];
            let mut hi = lo;
            while i + 1 < self.0.len() && self.0[i + 1] == hi + 1 {
                i += 1;
                hi += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

impl Serialize for CpuSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CpuSet {
    /// A CPU list string, or one CPU as an integer (`SPOOL_RUNTIME_CPUS=1` arrives as one).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CpuSet, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            One(u64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Text(t) => t,
            Raw::One(n) => n.to_string(),
        };
        CpuSet::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Where the runtime's threads run: the sets to pin runtime workers and blocking threads to
/// (`None`: leave that kind alone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Runtime workers (the reactor threads).
    pub workers: Option<CpuSet>,
    /// Blocking-pool threads, and the threads they start (the log's write-back thread).
    pub blocking: Option<CpuSet>,
}

thread_local! {
    /// True once this runtime worker has been moved to the workers' set.
    static WORKER_PINNED: Cell<bool> = const { Cell::new(false) };
}

impl Placement {
    /// From the configured sets; `None` when both are empty (nothing to do).
    pub fn new(runtime_cpus: &CpuSet, blocking_cpus: &CpuSet) -> io::Result<Option<Placement>> {
        if runtime_cpus.is_empty() && blocking_cpus.is_empty() {
            return Ok(None);
        }
        // A kind without a set of its own keeps what the process started with; it must be
        // restored explicitly for workers, which start with the blocking threads' set.
        let start = CpuSet::of_current_thread()?;
        let or_start = |s: &CpuSet| {
            Some(if s.is_empty() {
                start.clone()
            } else {
                s.clone()
            })
        };
        Ok(Some(Placement {
            workers: or_start(runtime_cpus),
            blocking: or_start(blocking_cpus),
        }))
    }

    /// Refuses a set that leaves a kind of thread no CPU to run on (sets every named CPU
    /// the process may not use aside, the kernel would fail the pin).
    pub fn check(&self) -> Result<(), ConfigError> {
        let allowed = CpuSet::of_current_thread()
            .map_err(|e| ConfigError::Invalid(format!("reading the CPU affinity: {e}")))?;
        for (what, set) in [
            ("runtime_cpus", &self.workers),
            ("blocking_cpus", &self.blocking),
        ] {
            if let Some(set) = set
                && !set.cpus().iter().any(|c| allowed.cpus().contains(c))
            {
                return Err(ConfigError::Invalid(format!(
                    "{what} = \"{set}\" names no CPU this process may run on (allowed: {allowed})"
                )));
            }
        }
        Ok(())
    }

    /// Installs the placement on a runtime builder: blocking threads are pinned when they
    /// start, workers the first time they park.
    pub fn install(&self, rt: &mut tokio::runtime::Builder) {
        if let Some(set) = self.blocking.clone() {
            rt.on_thread_start(move || {
                if let Err(e) = set.pin_current_thread() {
                    tracing::warn!(cpus = %set, error = %e, "pinning a runtime thread failed");
                }
            });
        }
        if let Some(set) = self.workers.clone() {
            rt.on_thread_park(move || {
                if WORKER_PINNED.with(Cell::get) {
                    return;
                }
                WORKER_PINNED.with(|p| p.set(true));
                if let Err(e) = set.pin_current_thread() {
                    tracing::warn!(cpus = %set, error = %e, "pinning a runtime worker failed");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_print() {
        for (text, cpus, shown) in [
            ("", vec![], ""),
            ("0", vec![0], "0"),
            ("1,0", vec![0, 1], "0-1"),
            ("0-2,5, 7-8", vec![0, 1, 2, 5, 7, 8], "0-2,5,7-8"),
            ("3,3,2-3", vec![2, 3], "2-3"),
        ] {
            let s = CpuSet::parse(text).unwrap();
            assert_eq!(s.cpus(), cpus.as_slice(), "{text}");
            assert_eq!(s.to_string(), shown, "{text}");
            assert_eq!(CpuSet::parse(&s.to_string()).unwrap(), s);
        }
        for bad in ["x", "2-1", "1024", "0-1024", "-1", "1-"] {
            assert!(CpuSet::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn pinning_restricts_the_thread() {
        let allowed = CpuSet::of_current_thread().unwrap();
        let first = CpuSet(vec![allowed.cpus()[0]]);
        std::thread::spawn(move || {
            first.pin_current_thread().unwrap();
            assert_eq!(CpuSet::of_current_thread().unwrap(), first);
        })
        .join()
        .unwrap();
        // Not this thread: it is the test harness's.
        assert_eq!(CpuSet::of_current_thread().unwrap(), allowed);
    }

    #[test]
    fn a_set_outside_the_allowed_cpus_is_refused() {
        let p = Placement {
            workers: Some(CpuSet(vec![MAX_CPU - 1])),
            blocking: None,
        };
        assert!(p.check().is_err());
        assert_eq!(
            Placement::new(&CpuSet::default(), &CpuSet::default()).unwrap(),
            None
        );
    }
}
