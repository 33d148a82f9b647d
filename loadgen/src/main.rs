//! `spool-loadgen`: thin command line over the `spool_loadgen` library.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use spool_loadgen::{LoadArgs, Mode, scenarios};

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
    #[command(flatten)]
    load: LoadArgs,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let (mode, opts) = match cli.cmd {
        Cmd::Produce(o) => (Mode::Produce, o),
        Cmd::Consume(o) => (Mode::Consume, o),
        Cmd::E2e(o) => (Mode::E2e, o),
        Cmd::Scenarios(a) => {
            let out = scenarios::run_scenarios(&a)?;
            println!("{}", out.table);
            println!("results written to {}", out.path.display());
            return Ok(());
        }
    };
    let cfg = opts.load.config(mode, opts.broker.clone());
    let r = spool_loadgen::run(&cfg)?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", r.line());
    }
    Ok(())
}
