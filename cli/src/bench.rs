//! `spool bench produce | consume | e2e`: the load generator (`spool-loadgen`'s library, the
//! same code and the same flags as its own binary) through the CLI's connection settings, so
//! it reaches a broker with TLS and tokens like every other command.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use spool_loadgen::{Connection, LoadArgs, Mode, Report};

use crate::conn::ConnArgs;
use crate::exit::{CliError, CliResult};

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCmd {
    /// Produce pre-encoded batches as fast as possible (closed loop), or at --rate records/s
    /// (open loop: latency counted from when each request was due, so stalls are not hidden).
    #[command(after_help = "Examples:\n  \
        spool bench produce --topic bench --record-size 1024 --duration 10s\n  \
        spool bench produce --acks durable --partitions 4 --producers 2 --keyed\n  \
        spool bench produce --rate 50000 --batch-bytes 65536 --compression lz4 --json")]
    Produce(BenchArgs),
    /// Read the topic from the earliest offset over Subscribe (raw batches, a catch-up read),
    /// after producing --preload-bytes into it if it holds less.
    #[command(after_help = "Examples:\n  \
        spool bench consume --topic bench --preload-bytes 1073741824 --duration 30s\n  \
        spool bench consume --topic bench --partitions 4 --consumers 2 --json")]
    Consume(BenchArgs),
    /// Produce at --rate and consume in this process: end-to-end latency per record.
    #[command(after_help = "Examples:\n  \
        spool bench e2e --rate 10000 --record-size 100 --duration 10s\n  \
        spool bench e2e --rate 48828 --acks durable --linger-ms 5 --json")]
    E2e(BenchArgs),
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Runs one workload and prints its report: exit 0, or 1 if requests failed.
pub(crate) fn run(conn: &ConnArgs, cmd: BenchCmd) -> CliResult<ExitCode> {
    let (mode, args) = match cmd {
        BenchCmd::Produce(a) => (Mode::Produce, a),
        BenchCmd::Consume(a) => (Mode::Consume, a),
        BenchCmd::E2e(a) => (Mode::E2e, a),
    };
    if mode == Mode::E2e && args.load.rate.is_none_or(|r| !r.is_finite()) {
        return Err(crate::exit::usage(
            "bench e2e needs --rate RECORDS_PER_SECOND (open loop)",
        ));
    }
    // Resolve and check the connection settings once, through the same code as every other
    // command (exit 3 when the broker cannot be reached); the load generator then opens its
    // own connections with them (one per producer and consumer) on a runtime of its own.
    let client = crate::runtime()?.block_on(conn.connect())?;
    let mut cfg = args.load.config(mode, client.addr().to_owned());
    cfg.connection = Connection {
        tls: client.options().tls.clone(),
        token: conn.token()?,
    };
    drop(client);
    status!(
        "% bench {}: topic {}, {} B records, {} producer(s), {}, acks {}, {:.1} s after {:.1} s warm-up",
        format!("{mode:?}").to_lowercase(),
        cfg.topic,
        cfg.record_size,
        cfg.producers,
        cfg.rate
            .map_or("max rate".to_owned(), |r| format!("{r} records/s")),
        format!("{:?}", cfg.acks).to_lowercase(),
        cfg.duration.as_secs_f64(),
        cfg.warmup.as_secs_f64()
    );
    let report = spool_loadgen::run(&cfg).map_err(client_error)?;
    print(&report, args.json)?;
    if report.errors > 0 {
        status!("spool: {} request(s) failed during the run", report.errors);
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn print(r: &Report, json: bool) -> CliResult {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string(r).map_err(anyhow::Error::from)?
        )?;
    } else {
        writeln!(out, "{}", r.line())?;
    }
    out.flush()?;
    Ok(())
}

/// A broker refusal or unreachable broker keeps its exit code (4 or 3) through the load
/// generator's `anyhow` errors; anything else is exit 2.
fn client_error(e: anyhow::Error) -> CliError {
    match e.downcast_ref::<spool_client::Error>() {
        Some(c) => CliError::Client(c.clone()),
        None => CliError::Other(e),
    }
}
