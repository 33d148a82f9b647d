//! CPU time spent by processes during a run's measured window, so every throughput figure can
//! come with its cost: CPU-seconds per GB, for the broker (`--watch-pid`) and for the load
//! generator itself (all of its threads, counted honestly since it shares the machine).
//!
//! The figures are `utime + stime` of `/proc/<pid>/stat` (all threads of the process, in
//! clock ticks, usually 10 ms), read at the start and at the end of the window.

use std::time::Instant;

use serde::Serialize;

/// CPU seconds (user + system, all threads) that process `pid` has used so far, or `None`
/// when it cannot be read (gone, or no `/proc`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    read_stat(&format!("/proc/{pid}/stat"))
}

/// [`cpu_seconds`] of this process.
pub fn own_cpu_seconds() -> Option<f64> {
    read_stat("/proc/self/stat")
}

/// CPU seconds the whole machine has been busy so far (all CPUs: user, nice, system, irq,
/// softirq, steal from the first line of `/proc/stat`).
pub fn machine_busy_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks = parse_machine_busy(text.lines().next()?)?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Busy ticks from the `cpu` line of `/proc/stat`: user nice system idle iowait irq softirq
/// steal …, idle and iowait left out.
fn parse_machine_busy(line: &str) -> Option<u64> {
    let v: Vec<u64> = line
        .strip_prefix("cpu ")?
        .split_ascii_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(f(0) + f(1) + f(2) + f(5) + f(6) + f(7))
}

fn read_stat(path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let ticks = parse_stat_ticks(&text)?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// `utime + stime` in clock ticks from the text of a `/proc/<pid>/stat` file. The command
/// name (field 2) is in parentheses and may contain spaces or parentheses itself, so fields
/// are counted after the last `)`: there, field 3 (state) comes first, utime is field 14 and
/// stime field 15.
fn parse_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU used over a measured window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuUsage {
    /// Length of the window the CPU time was taken over, in seconds.
    pub window_s: f64,
    /// CPU seconds of the load generator (this process, every thread).
    pub loadgen_s: f64,
    /// CPU seconds of each watched process (e.g. `spoold`), in the order given.
    pub watched: Vec<WatchedCpu>,
    /// CPU seconds the whole machine was busy (all processes, all CPUs).
    pub machine_busy_s: Option<f64>,
}

/// CPU seconds of one watched process over the window.
#[derive(Clone, Debug, Serialize)]
pub struct WatchedCpu {
    /// Process id.
    pub pid: u32,
    /// CPU seconds over the window (`None` when `/proc/<pid>/stat` could not be read).
    pub cpu_s: Option<f64>,
}

impl CpuUsage {
    /// Share of one core the first watched process used over the window (1.0 = one core).
    pub fn watched_cores(&self) -> Option<f64> {
        let s = self.watched.first()?.cpu_s?;
        (self.window_s > 0.0).then(|| s / self.window_s)
    }

    /// CPU seconds per 10^9 bytes of the first watched process, for `bytes` moved.
    pub fn watched_s_per_gb(&self, bytes: u64) -> Option<f64> {
        let s = self.watched.first()?.cpu_s?;
        (bytes > 0).then(|| s / (bytes as f64 / 1e9))
    }

    /// CPU seconds per 10^9 bytes of the load generator.
    pub fn loadgen_s_per_gb(&self, bytes: u64) -> Option<f64> {
        (bytes > 0).then(|| self.loadgen_s / (bytes as f64 / 1e9))
    }

    /// CPU seconds used by everything else on the machine (neither the load generator nor a
    /// watched process): how busy the neighbours were.
    pub fn others_s(&self) -> Option<f64> {
        let ours: f64 = self.loadgen_s + self.watched.iter().filter_map(|w| w.cpu_s).sum::<f64>();
        Some((self.machine_busy_s? - ours).max(0.0))
    }
}

/// Readings taken at the start of a window.
#[derive(Debug)]
pub(crate) struct CpuStart {
    at: Instant,
    own: Option<f64>,
    machine: Option<f64>,
    watched: Vec<(u32, Option<f64>)>,
}

impl CpuStart {
    /// Reads the counters now.
    pub(crate) fn now(pids: &[u32]) -> CpuStart {
        CpuStart {
            at: Instant::now(),
            own: own_cpu_seconds(),
            machine: machine_busy_seconds(),
            watched: pids.iter().map(|&p| (p, cpu_seconds(p))).collect(),
        }
    }

    /// Reads them again and returns the differences.
    pub(crate) fn finish(self) -> CpuUsage {
        let own_end = own_cpu_seconds();
        let machine_end = machine_busy_seconds();
        CpuUsage {
            machine_busy_s: self.machine.zip(machine_end).map(|(a, b)| (b - a).max(0.0)),
            window_s: self.at.elapsed().as_secs_f64(),
            loadgen_s: match (self.own, own_end) {
                (Some(a), Some(b)) => (b - a).max(0.0),
                _ => f64::NAN,
            },
            watched: self
                .watched
                .into_iter()
                .map(|(pid, start)| WatchedCpu {
                    pid,
                    cpu_s: start.zip(cpu_seconds(pid)).map(|(a, b)| (b - a).max(0.0)),
                })
                .collect(),
        }
    }
}

/// Samples the counters at `from` and at `until` on a thread of its own (the run's tasks
/// keep going meanwhile); join it after the run.
pub(crate) fn sample_window(
    pids: Vec<u32>,
    from: Instant,
    until: Instant,
) -> std::thread::JoinHandle<CpuUsage> {
    std::thread::spawn(move || {
        sleep_until(from);
        let start = CpuStart::now(&pids);
        sleep_until(until);
        start.finish()
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Spins on the CPU for `d`.
    fn burn(d: Duration) {
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < d {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            std::hint::black_box(x);
        }
    }

    #[test]
    fn parses_stat_with_awkward_names() {
        // A real line's shape: pid (comm) state ppid ... utime(14) stime(15) ...
        let line = "1234 (spo ol) d)) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 9 0 100";
        assert_eq!(parse_stat_ticks(line), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
        assert_eq!(
            parse_machine_busy("cpu  100 5 50 9000 20 3 2 1 0 0"),
            Some(100 + 5 + 50 + 3 + 2 + 1)
        );
        assert_eq!(parse_machine_busy("cpu0 1 2 3"), None);
    }

    #[test]
    fn own_cpu_counts_work_done() {
        let start = CpuStart::now(&[std::process::id()]);
        burn(Duration::from_millis(200));
        let u = start.finish();
        // 200 ms of spinning is at least 100 ms of CPU with 10 ms ticks, even on a busy box.
        assert!(u.loadgen_s >= 0.1, "{u:?}");
        let watched = u.watched[0].cpu_s.expect("own pid readable");
        assert!(watched >= 0.1, "{u:?}");
        assert!(u.watched_cores().is_some());
        assert!(u.machine_busy_s.expect("/proc/stat") >= 0.1, "{u:?}");
        assert_eq!(u.watched_s_per_gb(0), None);
    }
}
