//! `spool`: the operator's command-line tool.
//!
//! So far it has the offline commands, which read a data directory through the engine without
//! a broker: `spool inspect verify | stats | dump`. The online commands (topics, produce,
//! tail, replay, groups, bench) come next (issue 4).
//!
//! Exit codes: 0 success; 1 `verify` found corruption; 2 usage or I/O error. Output that
//! scripts read goes to stdout (tables, or JSON with `--json`); diagnostics go to stderr.

mod inspect;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Spool's command-line tool.
#[derive(Debug, Parser)]
#[command(name = "spool", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect a data directory offline (read-only; stop spoold or work on a copy).
    #[command(subcommand)]
    Inspect(inspect::Inspect),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(cmd) => inspect::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`spool inspect dump ... | head`) is not an error.
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("spool: {e:#}");
            ExitCode::from(2)
        }
    }
}
