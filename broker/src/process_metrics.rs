//! The standard `process_*` metrics (the names every Prometheus client library exports, so
//! the usual dashboards and alerts work) and `spool_build_info`, read when scraped.
//!
//! | metric | type | source |
//! | --- | --- | --- |
//! | `process_cpu_seconds_total` | counter | user + system time, `/proc/self/stat` |
//! | `process_resident_memory_bytes`, `process_virtual_memory_bytes` | gauge | `/proc/self/stat` |
//! | `process_open_fds` | gauge | entries of `/proc/self/fd` |
//! | `process_max_fds` | gauge | the soft `RLIMIT_NOFILE` |
//! | `process_start_time_seconds` | gauge | start time since the epoch, `/proc/self/stat` and `/proc/stat` |
//! | `spool_build_info` | gauge (always 1) | labels `version` |
//!
//! Linux only, as spoold is: where `/proc` cannot be read the process metrics are left out
//! (the scrape still succeeds), never invented.
// Reads /proc (the process's own statistics), not durable state: no I/O seam needed.
#![allow(clippy::disallowed_methods)]

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// What `/proc` says about this process.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
}

/// Parses `/proc/self/stat` (`stat`) given the clock tick rate, the page size and the boot
/// time (`btime` of `/proc/stat`, seconds since the epoch).
fn parse_stat(
    stat: &str,
    ticks_per_second: u64,
    page_size: u64,
    boot_time: u64,
) -> Option<ProcessStats> {
    // The command name (field 2) is in parentheses and may hold spaces and ')': the fields
    // that follow start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let ticks = ticks_per_second.max(1) as f64;
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_size),
    })
}

/// `btime` of `/proc/stat`: boot time in seconds since the epoch.
fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn read_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = parse_boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    parse_stat(
        &stat,
        rustix::param::clock_ticks_per_second(),
        rustix::param::page_size() as u64,
        boot,
    )
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn max_fds() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// The `process_*` metrics and `spool_build_info`.
#[derive(Debug)]
pub(crate) struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(s) = read_stats() {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(s.cpu_seconds).encode(m)?;
            let gauges: [(&str, &str, f64); 3] = [
                (
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    s.resident_bytes as f64,
                ),
                (
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    s.virtual_bytes as f64,
                ),
                (
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    s.start_time_seconds,
                ),
            ];
            for (name, help, value) in gauges {
                let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(value).encode(m)?;
            }
        }
        if let Some(n) = open_fds() {
            let m = encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(n as i64).encode(m)?;
        }
        if let Some(n) = max_fds() {
            let m = encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(m)?;
        }
        let mut m = encoder.encode_descriptor(
            "spool_build_info",
            "The running spoold's version (the value is always 1)",
            None,
            MetricType::Gauge,
        )?;
        let labels = [("version", env!("CARGO_PKG_VERSION"))];
        ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        // A command name with a space and a parenthesis, as the kernel writes it.
        let stat = "4242 (spool d) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 50 0 0 20 0 \
                    9 0 123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 \
                    1 0 0 0 0 0 0 0 0 0 0 0 0 0";
        let s = parse_stat(stat, 100, 4096, 1_700_000_000).unwrap();
        assert_eq!(s.cpu_seconds, 3.0, "(250 + 50) ticks at 100 Hz");
        assert_eq!(s.start_time_seconds, 1_700_000_000.0 + 1234.56);
        assert_eq!(s.virtual_bytes, 987_654_321);
        assert_eq!(s.resident_bytes, 2048 * 4096);
        assert_eq!(parse_stat("garbage", 100, 4096, 0), None);
        assert_eq!(
            parse_boot_time("cpu 1 2\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn this_process_is_readable() {
        let s = read_stats().expect("/proc/self/stat");
        assert!(s.resident_bytes > 0 && s.virtual_bytes >= s.resident_bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0);
        assert!(open_fds().unwrap() >= 3);
        assert!(max_fds().unwrap() >= open_fds().unwrap());
    }
}
