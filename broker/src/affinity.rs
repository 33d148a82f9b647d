//! Thread placement: optional CPU sets for `spoold`'s runtime workers and for its blocking
//! threads, like Redpanda's `--cpuset` or TANK's thread placement.
//!
//! Blocking threads are tokio's blocking-pool threads (appends, fsyncs, reads that may fault
//! pages in) and every thread such a thread starts, because a new thread inherits its
//! parent's mask: the log's write-back thread, its retention thread (`spool-log-maint`) and
//! its compaction thread (`spool-log-cleaner`) all start inside `Broker::open`, which
//! `main.rs` runs in `spawn_blocking` for exactly that reason. Opening the broker anywhere
//! else would leave those three threads on the runtime workers' set.
//!
//! Off by default: with both sets empty no thread's affinity is touched. With a set given,
//! every thread of that kind is restricted to it with `sched_setaffinity`; a kind whose set
//! is empty keeps the affinity the process started with. Issue 14 measured this on a 2-vCPU
//! machine (docs/benchmarks.md); the default stays off unless it pays on both one and two
//! partitions.
//!
//! Invariants:
//! - a [`CpuSet`] is a bit set of CPU numbers below [`MAX_CPU`] (a fixed 128 bytes whatever
//!   the text); the text form is a Linux CPU list (`"0"`, `"0-1"`, `"0,2-3"`), also what
//!   `taskset -c` takes; `""` is the only spelling of "no pinning", and the text is at most
//!   [`MAX_LIST_LEN`] bytes;
//! - pinning only ever narrows: a kind's effective set is its configured set intersected with
//!   the mask the process started with (`taskset`, systemd's `CPUAffinity=`), so pinning
//!   never widens what the operator allowed. CPUs dropped by the intersection are reported
//!   ([`Placement::narrowed`]); an empty intersection, or a set the kernel refuses on a trial
//!   pin, fails the start ([`Placement::new`]) instead of being ignored;
//! - a thread is pinned at most once per kind change: blocking threads when they start,
//!   runtime workers the first time they go idle (tokio calls no hook on a worker alone when
//!   it starts), so until then a worker runs with the blocking threads' set. A pin that fails
//!   later (a CPU taken offline since the start) falls back to the start mask, so the thread
//!   does not keep its parent's (a worker's) mask, and is logged once, not per thread;
//! - nothing in the broker calls `tokio::task::block_in_place` (refused by
//!   `broker/clippy.toml`): it would turn a pinned worker into a blocking-pool thread that
//!   keeps the workers' set for the rest of its life, since the pin is not re-checked;
//! - the start mask is read once: if the cgroup's cpuset is rewritten while `spoold` runs (a
//!   kubelet CPU manager, for example), kernels before 6.2 reset every thread's affinity to the
//!   new cpuset; blocking threads started later are pinned again, runtime workers are not
//!   (they pin once), so placement is then partial until a restart. Restart `spoold` after
//!   changing its cpuset;
//! - at most [`MAX_CPU`] (1024, glibc's `CPU_SETSIZE`) CPUs: on a kernel built for more
//!   possible CPUs `sched_getaffinity` refuses the fixed-size mask, and `spoold` with pinning
//!   on fails to start with a message saying so (pinning off is unaffected).

use std::cell::Cell;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ConfigError;

/// Highest CPU number a set may name, plus one (glibc's `CPU_SETSIZE`).
pub const MAX_CPU: usize = 1024;

/// Longest CPU list accepted, in bytes (every CPU below [`MAX_CPU`] written out one by one,
/// `"0,1,2,…,1023"`, takes 4 010).
pub const MAX_LIST_LEN: usize = 4096;

const WORDS: usize = MAX_CPU / 64;

/// A set of CPUs, written as a Linux CPU list. Empty: no pinning.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuSet([u64; WORDS]);

impl CpuSet {
    /// Parses a CPU list such as `"0"`, `"0-3"` or `"0,2-3"` (`""`: the empty set).
    ///
    /// Entries are CPU numbers in decimal digits (no sign) or ranges `lo-hi` with `lo <= hi`,
    /// separated by commas, with optional spaces around them. An empty entry (`","`, `"0,"`,
    /// `"  "`) is refused: only `""` means "no pinning".
    pub fn parse(s: &str) -> Result<CpuSet, ConfigError> {
        let bad = |why: String| ConfigError::Invalid(format!("CPU list {s:?}: {why}"));
        if s.len() > MAX_LIST_LEN {
            return Err(ConfigError::Invalid(format!(
                "a CPU list of {} bytes is longer than the {MAX_LIST_LEN} allowed",
                s.len()
            )));
        }
        let mut set = CpuSet::default();
        if s.is_empty() {
            return Ok(set);
        }
        for part in s.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(bad(
                    "an empty entry (write \"\" alone for no pinning)".to_owned()
                ));
            }
            let num = |t: &str| -> Result<usize, ConfigError> {
                let t = t.trim();
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(format!("{t:?} is not a CPU number")));
                }
                match t.parse::<usize>() {
                    Ok(n) if n < MAX_CPU => Ok(n),
                    _ => Err(bad(format!("CPU {t} is beyond {}", MAX_CPU - 1))),
                }
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
            for c in lo..=hi {
                set.insert(c);
            }
        }
        Ok(set)
    }

    /// The set of one CPU.
    ///
    /// # Panics
    /// If `cpu >= MAX_CPU`.
    pub fn one(cpu: usize) -> CpuSet {
        assert!(cpu < MAX_CPU, "CPU {cpu} is beyond {}", MAX_CPU - 1);
        let mut s = CpuSet::default();
        s.insert(cpu);
        s
    }

    fn insert(&mut self, cpu: usize) {
        self.0[cpu / 64] |= 1 << (cpu % 64);
    }

    /// True when `cpu` is in the set.
    pub fn contains(&self, cpu: usize) -> bool {
        cpu < MAX_CPU && self.0[cpu / 64] & (1 << (cpu % 64)) != 0
    }

    /// True when no CPU is named (no pinning).
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// How many CPUs the set names.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The CPU numbers, in increasing order.
    pub fn cpus(&self) -> Vec<usize> {
        (0..MAX_CPU).filter(|&c| self.contains(c)).collect()
    }

    /// The CPUs in both sets.
    pub fn intersection(&self, other: &CpuSet) -> CpuSet {
        CpuSet(std::array::from_fn(|i| self.0[i] & other.0[i]))
    }

    /// The CPUs of this set that are not in `other`.
    pub fn difference(&self, other: &CpuSet) -> CpuSet {
        CpuSet(std::array::from_fn(|i| self.0[i] & !other.0[i]))
    }

    fn to_libc(self) -> libc::cpu_set_t {
        // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for c in self.cpus() {
            // SAFETY: c < MAX_CPU == CPU_SETSIZE, so the bit is inside set.
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
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                // The kernel's possible-CPU count is larger than the mask.
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{e}: this kernel has more possible CPUs than the {MAX_CPU} thread \
                         placement supports; leave runtime_cpus and blocking_cpus empty"
                    ),
                ));
            }
            return Err(e);
        }
        let mut out = CpuSet::default();
        for c in 0..MAX_CPU {
            // SAFETY: c < CPU_SETSIZE, the size of `set`.
            if unsafe { libc::CPU_ISSET(c, &set) } {
                out.insert(c);
            }
        }
        Ok(out)
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
        let cpus = self.cpus();
        let mut i = 0;
        let mut first = true;
        while i < cpus.len() {
            let lo = cpus[i];
            let mut hi = lo;
            while i + 1 < cpus.len() && cpus[i + 1] == hi + 1 {
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

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({:?})", self.to_string())
    }
}

impl Serialize for CpuSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CpuSet {
    /// A CPU list string, or one CPU as an integer (`SPOOL_RUNTIME_CPUS=1` arrives as one);
    /// anything else is refused with a message saying what is expected.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<CpuSet, D::Error> {
        struct ListVisitor;
        impl Visitor<'_> for ListVisitor {
            type Value = CpuSet;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a CPU list in quotes such as \"0\", \"0-3\" or \"0,2\" (\"\" for no \
                     pinning), or one CPU number",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CpuSet, E> {
                CpuSet::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CpuSet, E> {
                match usize::try_from(v) {
                    Ok(c) if c < MAX_CPU => Ok(CpuSet::one(c)),
                    _ => Err(E::custom(format!(
                        "CPU {v} is beyond {}, the highest CPU number thread placement takes",
                        MAX_CPU - 1
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CpuSet, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::custom(format!(
                        "CPU {v} is negative: CPU numbers start at 0 (\"\" means no pinning)"
                    ))),
                }
            }
        }
        d.deserialize_any(ListVisitor)
    }
}

/// Where the runtime's threads run: the effective sets runtime workers and blocking threads
/// are pinned to.
#[derive(Clone, Debug)]
pub struct Placement {
    /// Runtime workers (the reactor threads): `runtime_cpus` ∩ the start mask, or the start
    /// mask when `runtime_cpus` is empty.
    pub workers: CpuSet,
    /// Blocking-pool threads and the threads they start (see the module docs):
    /// `blocking_cpus` ∩ the start mask, or the start mask when `blocking_cpus` is empty.
    pub blocking: CpuSet,
    /// The mask the process started with (read on the thread that built the placement).
    pub start: CpuSet,
    /// CPUs a configured set named that the start mask does not allow, by config key: left
    /// out of the effective set (pinning never widens the start mask). For a warning.
    pub narrowed: Vec<(&'static str, CpuSet)>,
    /// Set once a failed pin has been logged: a failure is reported once, not per thread.
    warned: Arc<AtomicBool>,
}

thread_local! {
    /// True once this runtime worker has been moved to the workers' set.
    static WORKER_PINNED: Cell<bool> = const { Cell::new(false) };
}

impl Placement {
    /// From the configured sets; `None` when both are empty (nothing to do, no syscall).
    ///
    /// Reads the calling thread's mask as the start mask, so call it on the main thread
    /// before any pinning. Refuses a set that shares no CPU with the start mask, and a set
    /// the kernel refuses to pin a probe thread to (offline CPUs, a sandbox that forbids
    /// `sched_setaffinity`), so an unusable set fails the start.
    pub fn new(
        runtime_cpus: &CpuSet,
        blocking_cpus: &CpuSet,
    ) -> Result<Option<Placement>, ConfigError> {
        if runtime_cpus.is_empty() && blocking_cpus.is_empty() {
            return Ok(None);
        }
        let start = CpuSet::of_current_thread()
            .map_err(|e| ConfigError::Invalid(format!("reading the CPU affinity: {e}")))?;
        let p = Placement::within(runtime_cpus, blocking_cpus, start)?;
        p.trial_pin()?;
        Ok(Some(p))
    }

    /// The effective sets for a given start mask (no syscall).
    fn within(
        runtime_cpus: &CpuSet,
        blocking_cpus: &CpuSet,
        start: CpuSet,
    ) -> Result<Placement, ConfigError> {
        let mut narrowed = Vec::new();
        let mut effective = |what: &'static str, set: &CpuSet| {
            if set.is_empty() {
                return Ok(start);
            }
            let inside = set.intersection(&start);
            if inside.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{what} = \"{set}\" shares no CPU with the CPUs spoold was started on \
                     ({start}: its taskset / CPUAffinity= mask); pinning only narrows that mask"
                )));
            }
            let outside = set.difference(&start);
            if !outside.is_empty() {
                narrowed.push((what, outside));
            }
            Ok(inside)
        };
        let workers = effective("runtime_cpus", runtime_cpus)?;
        let blocking = effective("blocking_cpus", blocking_cpus)?;
        Ok(Placement {
            workers,
            blocking,
            start,
            narrowed,
            warned: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Pins a short-lived probe thread to each effective set: a set the kernel refuses
    /// fails here, at start, rather than on every thread later.
    fn trial_pin(&self) -> Result<(), ConfigError> {
        let (workers, blocking) = (self.workers, self.blocking);
        let probe = std::thread::Builder::new()
            .name("spoold-pin-probe".into())
            .spawn(move || -> Result<(), ConfigError> {
                for (what, set) in [("runtime_cpus", workers), ("blocking_cpus", blocking)] {
                    set.pin_current_thread().map_err(|e| {
                        ConfigError::Invalid(format!("{what}: pinning a thread to {set}: {e}"))
                    })?;
                }
                Ok(())
            })
            .map_err(|e| ConfigError::Invalid(format!("starting the pinning probe: {e}")))?;
        probe
            .join()
            .map_err(|_| ConfigError::Invalid("the pinning probe panicked".to_owned()))?
    }

    /// Pins the calling thread to `set`; if the kernel refuses (a CPU went offline since the
    /// start), pins it to the start mask instead, so it does not keep its parent's mask.
    /// The first failure is logged; later ones are not (the pool starts threads all day).
    fn pin_or_fall_back(&self, set: &CpuSet, kind: &str) {
        let Err(e) = set.pin_current_thread() else {
            return;
        };
        let fallback = self.start.pin_current_thread();
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                kind,
                cpus = %set,
                error = %e,
                fallback = %self.start,
                fallback_failed = fallback.err().map(|e| e.to_string()),
                "pinning a thread failed; it runs on the start mask instead \
                 (logged once: later failures are not)"
            );
        }
    }

    /// True once a pin has failed (and been logged).
    pub fn pin_failed(&self) -> bool {
        self.warned.load(Ordering::Relaxed)
    }

    /// Installs the placement on a runtime builder: blocking threads are pinned when they
    /// start, workers the first time they park.
    pub fn install(&self, rt: &mut tokio::runtime::Builder) {
        let me = self.clone();
        rt.on_thread_start(move || me.pin_or_fall_back(&me.blocking, "blocking"));
        let me = self.clone();
        rt.on_thread_park(move || {
            if WORKER_PINNED.with(Cell::get) {
                return;
            }
            WORKER_PINNED.with(|p| p.set(true));
            me.pin_or_fall_back(&me.workers, "runtime worker");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(cpus: &[usize]) -> CpuSet {
        let mut s = CpuSet::default();
        for &c in cpus {
            s.insert(c);
        }
        s
    }

    #[test]
    fn cpu_lists_parse_and_print() {
        for (text, cpus, shown) in [
            ("", vec![], ""),
            ("0", vec![0], "0"),
            ("1,0", vec![0, 1], "0-1"),
            ("0-2,5, 7-8", vec![0, 1, 2, 5, 7, 8], "0-2,5,7-8"),
            ("3,3,2-3", vec![2, 3], "2-3"),
            (" 0 - 1 ", vec![0, 1], "0-1"),
            ("1023", vec![1023], "1023"),
        ] {
            let s = CpuSet::parse(text).unwrap();
            assert_eq!(s.cpus(), cpus, "{text}");
            assert_eq!(s.len(), cpus.len(), "{text}");
            assert_eq!(s.to_string(), shown, "{text}");
            assert_eq!(CpuSet::parse(&s.to_string()).unwrap(), s);
        }
        for bad in [
            "x", "2-1", "1024", "0-1024", "-1", "1-", "+1", "1-+2", ",", "  ", "0,", ",0", "0,,1",
            "1-2-3", "0x1",
        ] {
            assert!(CpuSet::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn long_lists_are_refused_and_sets_stay_fixed_size() {
        // Every CPU spelled out is within the limit...
        let all = (0..MAX_CPU)
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(all.len() <= MAX_LIST_LEN);
        assert_eq!(CpuSet::parse(&all).unwrap().len(), MAX_CPU);
        // ...a repeated full range is not, however it would dedup.
        let huge = "0-1023,".repeat(150_000);
        let e = CpuSet::parse(&huge).unwrap_err().to_string();
        assert!(e.contains("longer than"), "{e}");
        assert_eq!(std::mem::size_of::<CpuSet>(), MAX_CPU / 8);
    }

    #[test]
    fn values_of_the_wrong_kind_get_plain_messages() {
        #[derive(Deserialize, Debug)]
        struct C {
            #[allow(dead_code)]
            cpus: CpuSet,
        }
        let err = |t: &str| toml::from_str::<C>(t).unwrap_err().to_string();
        let e = err("cpus = -1");
        assert!(e.contains("negative"), "{e}");
        let e = err("cpus = [0, 1]");
        assert!(e.contains("a CPU list in quotes"), "{e}");
        let e = err("cpus = 4096");
        assert!(e.contains("beyond 1023"), "{e}");
        let e = err("cpus = \"0,\"");
        assert!(e.contains("empty entry"), "{e}");
        assert_eq!(
            toml::from_str::<C>("cpus = 3").unwrap().cpus,
            CpuSet::one(3)
        );
        assert_eq!(
            toml::from_str::<C>("cpus = \"1-2\"").unwrap().cpus,
            set(&[1, 2])
        );
    }

    #[test]
    fn pinning_restricts_the_thread() {
        let allowed = CpuSet::of_current_thread().unwrap();
        let first = CpuSet::one(allowed.cpus()[0]);
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
    fn effective_sets_only_narrow_the_start_mask() {
        let start = set(&[0, 1]);
        // Partly outside: narrowed to the start mask, and the dropped CPUs reported.
        let p = Placement::within(&set(&[0, 1, 2, 3]), &CpuSet::default(), start).unwrap();
        assert_eq!(p.workers, start);
        assert_eq!(p.blocking, start, "an empty set keeps the start mask");
        assert_eq!(p.narrowed, vec![("runtime_cpus", set(&[2, 3]))]);
        let p = Placement::within(&CpuSet::one(0), &CpuSet::one(1), start).unwrap();
        assert_eq!((p.workers, p.blocking), (CpuSet::one(0), CpuSet::one(1)));
        assert!(p.narrowed.is_empty());
        // Entirely outside: refused, naming the start mask.
        let e = Placement::within(&CpuSet::default(), &CpuSet::one(5), start)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blocking_cpus = \"5\"") && e.contains("(0-1"),
            "{e}"
        );
        // Through the real start mask: a CPU beyond it is refused; nothing configured, None.
        assert!(Placement::new(&CpuSet::one(MAX_CPU - 1), &CpuSet::default()).is_err());
        assert!(
            Placement::new(&CpuSet::default(), &CpuSet::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_refused_pin_falls_back_to_the_start_mask_and_warns_once() {
        let allowed = CpuSet::of_current_thread().unwrap();
        if allowed.contains(MAX_CPU - 1) {
            eprintln!(
                "skipped: CPU {} is usable here, so it cannot stand for an offline CPU",
                MAX_CPU - 1
            );
            return;
        }
        let first = CpuSet::one(allowed.cpus()[0]);
        let p = Placement::within(&CpuSet::default(), &CpuSet::default(), allowed).unwrap();
        assert!(!p.pin_failed());
        // The thread starts narrowed to `first` (standing for a worker parent's mask); pinning
        // it to a CPU the kernel refuses must put it on the start mask, not leave it there.
        let offline = CpuSet::one(MAX_CPU - 1);
        for _ in 0..2 {
            let on_thread = p.clone();
            let seen = std::thread::spawn(move || {
                first.pin_current_thread().unwrap();
                on_thread.pin_or_fall_back(&offline, "blocking");
                CpuSet::of_current_thread().unwrap()
            })
            .join()
            .unwrap();
            assert_eq!(seen, allowed);
            assert!(p.pin_failed());
        }
    }

    /// The mechanism itself: a runtime built with the placement installed puts each kind of
    /// thread on its own set.
    #[test]
    fn install_places_each_kind_of_thread() {
        let allowed = CpuSet::of_current_thread().unwrap();
        let cpus = allowed.cpus();
        if cpus.len() < 2 {
            eprintln!(
                "skipped: needs 2 CPUs to tell the sets apart; this process may use {allowed}"
            );
            return;
        }
        let (workers, blocking) = (CpuSet::one(cpus[0]), CpuSet::one(cpus[1]));
        let p = Placement::new(&workers, &blocking).unwrap().unwrap();
        assert_eq!((p.workers, p.blocking), (workers, blocking));
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(1).enable_all();
        p.install(&mut b);
        let rt = b.build().unwrap();
        let (in_blocking, started_from_blocking, in_task) = rt.block_on(async {
            let mine = || CpuSet::of_current_thread().unwrap();
            let in_blocking = tokio::task::spawn_blocking(mine).await.unwrap();
            let started_from_blocking =
                tokio::task::spawn_blocking(move || std::thread::spawn(mine).join().unwrap())
                    .await
                    .unwrap();
            // The one worker has to park for the timer to fire (it drives the timer when it
            // parks), and parking pins it: after the sleep it is on the workers' set.
            let in_task = tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                mine()
            })
            .await
            .unwrap();
            (in_blocking, started_from_blocking, in_task)
        });
        drop(rt);
        assert_eq!(in_blocking, blocking, "a spawn_blocking closure");
        assert_eq!(
            started_from_blocking, blocking,
            "a thread started from a blocking closure (the write-back, retention and \
             compaction threads' case)"
        );
        assert_eq!(in_task, workers, "a task on the runtime worker");
        assert!(!p.pin_failed());
        assert_eq!(
            CpuSet::of_current_thread().unwrap(),
            allowed,
            "the thread that built the runtime is left alone"
        );
    }
}
