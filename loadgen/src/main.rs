//! `spool-loadgen`: thin command line over the `spool_loadgen` library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use spool_client::FsyncPolicy;
use spool_loadgen::{Acks, Compression, LoadConfig, Mode, scenarios};

#[derive(Parser, Debug)]
#[command(name = "spool-loadgen", about = "Load generator for spoold")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Produce pre-encoded batches (closed loop, or open loop with --rate).
    Produce(Opts),
    /// Read the topic from the earliest offset over Subscribe (raw batches).
    Consume(Opts),
    /// Produce at --rate and consume in this process; latency = delivery − send time.
    E2e(Opts),
    /// Start fresh spoold processes and run the standard scenarios; write a results file.
    Scenarios(scenarios::ScenarioArgs),
}

#[derive(Args, Debug)]
struct Opts {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:7170")]
    broker: String,
    /// Topic (created if missing).
    #[arg(long, default_value = "loadgen")]
    topic: String,
    /// Partitions of a topic created here.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// fsync policy of a topic created here: always | never (default: the broker's).
    #[arg(long)]
    fsync: Option<String>,
    /// Producers (one connection each).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consumers (consume mode; one connection each, partitions split between them).
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Value bytes per record.
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// Batch size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    batch_bytes: usize,
    /// e2e: batch cut interval in ms (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    linger_ms: f64,
    /// none | written | durable.
    #[arg(long, value_enum, default_value = "written")]
    acks: Acks,
    /// none | lz4 | zstd.
    #[arg(long, value_enum, default_value = "none")]
    compression: Compression,
    /// Records carry a 16-byte key.
    #[arg(long)]
    keyed: bool,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Warm-up seconds (not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Records per second over all producers, open loop (latency from the intended send
    /// time). Without it: maximum throughput, closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests awaiting their reply, per producer.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Unary Produce calls instead of one ProduceStream per producer.
    #[arg(long)]
    unary: bool,
    /// Tokio worker threads of the load generator (0: one per core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Subscribe max_bytes per message.
    #[arg(long, default_value_t = 1 << 20)]
    fetch_bytes: u32,
    /// Consume: produce until the topic holds this many bytes first.
    #[arg(long, default_value_t = 1 << 30)]
    preload_bytes: u64,
    /// Touch and free this many bytes of memory right before measuring.
    #[arg(long, default_value_t = 0)]
    prefault_bytes: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn config(mode: Mode, o: &Opts) -> Result<LoadConfig> {
    let fsync = match o.fsync.as_deref() {
        None => None,
        Some("always") => Some(FsyncPolicy::Always),
        Some("never") => Some(FsyncPolicy::Never),
        Some(other) => anyhow::bail!("--fsync always|never, not {other:?}"),
    };
    Ok(LoadConfig {
        mode,
        broker: o.broker.clone(),
        topic: o.topic.clone(),
        partitions: o.partitions,
        fsync,
        producers: o.producers.max(1),
        consumers: o.consumers.max(1),
        record_size: o.record_size,
        batch_bytes: o.batch_bytes,
        linger: Duration::from_secs_f64(o.linger_ms / 1000.0),
        acks: o.acks,
        compression: o.compression,
        keyed: o.keyed,
        duration: Duration::from_secs_f64(o.duration),
        warmup: Duration::from_secs_f64(o.warmup),
        rate: o.rate,
        in_flight: o.in_flight,
        unary: o.unary,
        threads: o.threads,
        fetch_bytes: o.fetch_bytes,
        preload_bytes: o.preload_bytes,
        prefault_bytes: o.prefault_bytes,
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let (mode, opts) = match cli.cmd {
        Cmd::Produce(o) => (Mode::Produce, o),
        Cmd::Consume(o) => (Mode::Consume, o),
        Cmd::E2e(o) => (Mode::E2e, o),
        Cmd::Scenarios(a) => {
            let out: PathBuf = scenarios::run_all(&a)?;
            println!("results written to {}", out.display());
            return Ok(());
        }
    };
    let cfg = config(mode, &opts)?;
    let r = spool_loadgen::run(&cfg)?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", r.line());
    }
    Ok(())
}
