//! The workload flags, shared by `spool-loadgen produce|consume|e2e` and `spool bench` (which
//! flattens [`LoadArgs`] into its own commands), so both take the same flags with the same
//! defaults and build the same [`LoadConfig`].

use std::time::Duration;

use clap::Args;
use spool_client::FsyncPolicy;

use crate::{Acks, Compression, LoadConfig, Mode};

/// Flags of one workload run (everything but where the broker is and how to print).
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Topic (created if missing).
    #[arg(long, default_value = "loadgen")]
    pub topic: String,
    /// Partitions of a topic created here.
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// fsync policy of a topic created here (default: the broker's).
    #[arg(long, value_parser = ["always", "never"])]
    pub fsync: Option<String>,
    /// Producers (one connection each).
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Consumers (consume mode; one connection each, partitions split between them).
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Value bytes per record.
    #[arg(long, default_value_t = 1024)]
    pub record_size: usize,
    /// Batch size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub batch_bytes: usize,
    /// e2e: how long a batch's oldest record waits for more before the batch goes (Kafka's
    /// linger.ms; 0: as soon as --in-flight allows); with --pacing tick|tick-only, the tick
    /// period. Fractions allowed.
    #[arg(long, default_value_t = 1.0)]
    pub linger_ms: f64,
    /// e2e: when the producer sends a batch: `linger` (Kafka-like, above), or the producer
    /// before 2026-12-07 for comparing old figures: `tick` (on every reply and on a 1 ms-granular
    /// tokio tick of --linger-ms), `tick-only` (on the tick only).
    #[arg(long, value_enum, default_value = "linger")]
    pub pacing: crate::Pacing,
    /// e2e: the old name of `--pacing tick-only`.
    #[arg(long, conflicts_with = "pacing")]
    pub linger_only: bool,
    /// Acknowledgement asked of the broker.
    #[arg(long, value_enum, default_value = "written")]
    pub acks: Acks,
    /// Batch compression.
    #[arg(long, value_enum, default_value = "none")]
    pub compression: Compression,
    /// Records carry a 16-byte key.
    #[arg(long)]
    pub keyed: bool,
    /// Measured time: seconds (fractions allowed) or with units: 500ms, 2s, 1m30s.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    pub duration: f64,
    /// Warm-up before measuring (not counted), same syntax as --duration.
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    pub warmup: f64,
    /// Records per second over all producers (N, N/s, N/m, N/h), open loop (latency counted
    /// from the intended send time), or `max`: as fast as possible, closed loop (the default; e2e needs a rate).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Requests awaiting their reply, per producer.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    /// Idempotent-producer stamping of produced batches: off (plain), copy (plain, paying the
    /// client's per-request copy and CRC: the control for `on`), on (idempotent).
    #[arg(long, value_enum, default_value = "off")]
    pub stamping: crate::Stamping,
    /// Unary Produce calls instead of one ProduceStream per producer.
    #[arg(long)]
    pub unary: bool,
    /// Tokio worker threads of the load generator (0: one per core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// e2e: run the consumer on a thread and runtime of its own (as a separate consumer
    /// process would), not on the producers' --threads workers.
    #[arg(long)]
    pub consumer_thread: bool,
    /// Subscribe max_bytes per message.
    #[arg(long, default_value_t = 1 << 20)]
    pub fetch_bytes: u32,
    /// Consume: produce until the topic holds this many bytes first.
    #[arg(long, default_value_t = 1 << 30)]
    pub preload_bytes: u64,
    /// Touch and free this many bytes of memory right before measuring.
    #[arg(long, default_value_t = 0)]
    pub prefault_bytes: u64,
    /// Report the CPU time of this process (e.g. the broker's pid) over the measured window,
    /// next to the load generator's own; may be repeated.
    #[arg(long = "watch-pid")]
    pub watch_pids: Vec<u32>,
}

impl LoadArgs {
    /// The run these flags describe, against `broker` (plaintext, no token: set
    /// [`LoadConfig::connection`] for those).
    pub fn config(&self, mode: Mode, broker: String) -> LoadConfig {
        LoadConfig {
            mode,
            broker,
            topic: self.topic.clone(),
            partitions: self.partitions,
            fsync: match self.fsync.as_deref() {
                Some("always") => Some(FsyncPolicy::Always),
                Some("never") => Some(FsyncPolicy::Never),
                _ => None,
            },
            producers: self.producers.max(1),
            consumers: self.consumers.max(1),
            record_size: self.record_size,
            batch_bytes: self.batch_bytes,
            linger: Duration::from_secs_f64(self.linger_ms / 1000.0),
            pacing: if self.linger_only {
                crate::Pacing::TickOnly
            } else {
                self.pacing
            },
            acks: self.acks,
            compression: self.compression,
            keyed: self.keyed,
            duration: Duration::from_secs_f64(self.duration),
            warmup: Duration::from_secs_f64(self.warmup),
            rate: self.rate.filter(|r| r.is_finite()),
            in_flight: self.in_flight,
            unary: self.unary,
            stamping: self.stamping,
            threads: self.threads,
            consumer_thread: self.consumer_thread,
            fetch_bytes: self.fetch_bytes,
            preload_bytes: self.preload_bytes,
            prefault_bytes: self.prefault_bytes,
            watch_pids: self.watch_pids.clone(),
            ..LoadConfig::default()
        }
    }
}

/// Seconds: `2`, `0.5`, `500ms`, `2s`, `1.5m`.
/// Seconds, in the one duration grammar (`crate::units`): `2`, `0.5`, `500ms`, `1m30s`.
fn parse_secs(s: &str) -> Result<f64, String> {
    let d = crate::units::parse_duration(s)?;
    if d.as_secs_f64() > 86_400.0 {
        return Err(format!("{s:?} is longer than a day"));
    }
    Ok(d.as_secs_f64())
}

/// Records per second (`crate::units::parse_rate`: `N`, `N/s`, `N/m`, `N/h`), or `max`
/// (infinity: closed loop).
fn parse_rate(s: &str) -> Result<f64, String> {
    if s.trim().eq_ignore_ascii_case("max") {
        return Ok(f64::INFINITY);
    }
    crate::units::parse_rate(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_secs("2"), Ok(2.0));
        assert_eq!(parse_secs("0.5"), Ok(0.5));
        assert_eq!(parse_secs("500ms"), Ok(0.5));
        assert_eq!(parse_secs("2s"), Ok(2.0));
        assert_eq!(parse_secs("1m30s"), Ok(90.0));
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("soon").is_err());
        assert!(parse_secs("2d").is_err());
        assert_eq!(parse_rate("1000"), Ok(1000.0));
        assert_eq!(parse_rate("5000/s"), Ok(5000.0));
        assert_eq!(parse_rate("max"), Ok(f64::INFINITY));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn max_rate_is_closed_loop() {
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: LoadArgs,
        }
        let t = <T as clap::Parser>::parse_from(["t", "--rate", "max", "--duration", "1500ms"]);
        let c = t.a.config(Mode::Produce, "h:1".into());
        assert_eq!(c.rate, None);
        assert_eq!(c.duration, Duration::from_millis(1500));
        let t = <T as clap::Parser>::parse_from(["t", "--rate", "250", "--fsync", "never"]);
        let c = t.a.config(Mode::E2e, "h:1".into());
        assert_eq!(c.rate, Some(250.0));
        assert_eq!(c.fsync, Some(FsyncPolicy::Never));
        assert_eq!(c.topic, "loadgen");
        assert_eq!(c.pacing, crate::Pacing::Linger);
        assert_eq!(c.linger, Duration::from_millis(1));
        let t = <T as clap::Parser>::parse_from(["t", "--pacing", "tick", "--linger-ms", "0.25"]);
        let c = t.a.config(Mode::E2e, "h:1".into());
        assert_eq!(c.pacing, crate::Pacing::Tick);
        assert_eq!(c.linger, Duration::from_micros(250));
        assert!(
            <T as clap::Parser>::try_parse_from(["t", "--linger-only", "--pacing", "linger"])
                .is_err()
        );
        let t = <T as clap::Parser>::parse_from(["t", "--linger-only"]);
        assert_eq!(
            t.a.config(Mode::E2e, "h:1".into()).pacing,
            crate::Pacing::TickOnly
        );
    }
}
