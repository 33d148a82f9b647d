//! The broker over gRPC: the load generator's scenarios (issue 3) against a release `spoold`,
//! as `cargo bench -p spool-benches --bench broker`. It prints the table that
//! `spool-loadgen scenarios` prints and writes the same dated results file under
//! `loadgen/results/`.
//!
//! 1. Builds `spoold` in the profile of this bench (`cargo build --release -p spool-broker
//!    --bin spoold` under `cargo bench`), since cargo builds no other package's binaries for a
//!    bench; `--spoold PATH` uses that binary instead.
//! 2. Runs `spool_loadgen::scenarios`: every scenario on a fresh `spoold` over a fresh data
//!    directory, `--reps` times per broker × load-generator thread setting; medians, spreads
//!    and verdicts against the issue's targets.
//!
//! Arguments after `--` are the flags of `spool-loadgen scenarios` (`--reps`, `--duration`,
//! `--warmup`, `--only`, `--broker-threads`, `--loadgen-threads`, `--prefault-bytes`,
//! `--consume-bytes`, `--no-dd-reference`, `--data-parent`, `--out-dir`, `--spoold`), e.g.
//!
//! ```text
//! cargo bench -p spool-benches --bench broker -- --reps 1 --only produce-1KiB --broker-threads 1 --loadgen-threads 1
//! ```
//!
//! Relative `--data-parent` and `--out-dir` are taken from the workspace root (cargo runs a
//! bench in its package's directory). The defaults take 10–15 minutes on 2 vCPUs.
//!
//! Without `--bench` on the command line (`cargo test -p spool-benches --benches`), or with
//! `SPOOL_BENCH_QUICK=1`, it is a smoke test: one 0.3 s produce run against the `spoold` of
//! the same profile, results in a temporary directory. `.ci/test` runs neither (plain
//! `cargo test` builds no bench targets).

use std::path::Path;

use anyhow::{Result, bail};
use clap::Parser;
use spool_loadgen::scenarios::{self, ScenarioArgs};

#[derive(Parser, Debug)]
#[command(name = "broker", about = "spool-loadgen scenarios as a cargo bench")]
struct Cli {
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
    #[command(flatten)]
    scenarios: ScenarioArgs,
}

fn main() -> Result<()> {
    let quick = spool_benches::Config::from_env().quick;
    let (mut args, _scratch) = if quick {
        // A fixed smoke configuration; the command line belongs to the test harness here.
        let scratch = tempfile::tempdir()?;
        let mut a = Cli::parse_from(["broker"]).scenarios;
        a.reps = 1;
        a.duration = 0.3;
        a.warmup = 0.1;
        a.only = vec!["produce-1KiB-acks-written".into()];
        a.broker_threads = vec![1];
        a.loadgen_threads = vec![1];
        a.prefault_bytes = 0;
        a.no_dd_reference = true;
        a.data_parent = scratch.path().join("data");
        a.out_dir = scratch.path().join("results");
        (a, Some(scratch))
    } else {
        (Cli::parse().scenarios, None)
    };
    for dir in [&mut args.data_parent, &mut args.out_dir] {
        if dir.is_relative() {
            *dir = spool_benches::spoold::workspace_root().join(&*dir);
        }
    }
    if args.spoold.is_none() {
        args.spoold = Some(spool_benches::spoold::build()?);
    }
    println!(
        "== broker: {} mode, spool-loadgen scenarios with {} reps of {} s (+{} s warm-up), \
         spoold {}",
        if quick { "QUICK (smoke-test)" } else { "full" },
        args.reps,
        args.duration,
        args.warmup,
        args.spoold.as_deref().unwrap_or(Path::new("?")).display()
    );
    let out = scenarios::run_scenarios(&args)?;
    println!("{}", out.table);
    println!("results written to {}", out.path.display());
    if quick && !out.table.contains("| pass |") && !out.table.contains("| FAIL |") {
        bail!("the smoke run produced no figure:\n{}", out.table);
    }
    Ok(())
}
