//! `spool`: the operator's command-line tool.
//!
//! Online commands talk to `spoold` through `spool-client`; `inspect` reads a data directory
//! offline through the engine. Each command lives in its own module; this file only parses
//! flags, connects and maps errors to exit codes ([`exit`] documents them).
//!
//! Conventions (kcat / rpk / tank-cli users expect them): data on stdout, status and progress on
//! stderr; tables by default and `--json` for scripts; nothing interactive when stdout or stdin
//! is not a terminal; a closed pipe ends the command quietly. Status lines go through
//! `status!` / `status_part!`, never `eprintln!`: a closed stderr (`spool … |& head -1`)
//! must not panic the command (exit 101), it only loses the status.

/// A status line on stderr (`eprintln!` that ignores a closed or failing stderr).
macro_rules! status {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Status text on stderr without a newline (`eprint!` that ignores a closed stderr).
macro_rules! status_part {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

mod bench;
mod conn;
mod exit;
mod format;
mod group;
mod inspect;
mod position;
mod processor;
mod produce;
mod replay;
mod table;
mod tail;
mod topic;
mod txn;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::conn::ConnArgs;
use crate::exit::{CliError, CliResult};

/// Spool's command-line tool: topics, produce, tail, replay, consumer groups, offline
/// inspection and load generation.
#[derive(Debug, Parser)]
#[command(
    name = "spool",
    version,
    about,
    propagate_version = true,
    after_help = "Broker address: --broker, $SPOOL_BROKER, a profile in ~/.config/spool/cli.toml, \
                  or 127.0.0.1:7170.\nExit codes: 0 ok, 1 problem found, 2 usage or input error, \
                  3 broker unreachable, 4 broker refused the request."
)]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe, alter and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCmd),
    /// Produce records from arguments, stdin lines, a file or JSON lines.
    Produce(produce::ProduceArgs),
    /// Follow partitions like `tail -f` (starts at the end unless -o says otherwise).
    Tail(tail::TailArgs),
    /// Read partitions from the start (rpk's default); the same flags as `tail`.
    Consume(tail::TailArgs),
    // The about and the examples come from ReplayArgs' doc comment (a doc comment here
    // would replace them).
    Replay(replay::ReplayArgs),
    /// Consumer groups: list, describe (lag, lag in time), seek, delete.
    #[command(subcommand)]
    Group(group::GroupCmd),
    /// Transactions: list transactional ids and their open transactions.
    #[command(subcommand)]
    Txn(txn::TxnCmd),
    /// Stream processors: list (lag, rate, ETA, paused lanes), pause, resume.
    #[command(subcommand)]
    Processor(processor::ProcessorCmd),
    /// Dead letters of stream processors: list, show, redrive, skip.
    #[command(subcommand)]
    Dlq(processor::DlqCmd),
    /// Inspect a data directory offline (stop spoold or work on a copy).
    #[command(subcommand)]
    Inspect(inspect::Inspect),
    /// Load generator: produce, consume or end-to-end throughput and latency.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Print a shell completion script: spool completions bash > /etc/bash_completion.d/spool
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn run(cli: Cli) -> CliResult<ExitCode> {
    let conn = cli.conn;
    match cli.command {
        Command::Inspect(cmd) => inspect::run(cmd).map_err(CliError::Other),
        Command::Bench(cmd) => bench::run(&conn, cmd),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics when its writer fails, and a closed
            // pipe (`spool completions bash | head`) is not an error.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "spool", &mut script);
            std::io::stdout().lock().write_all(&script)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topic(cmd) => runtime()?.block_on(async {
            let client = conn.connect().await?;
            let mut out = std::io::stdout().lock();
            topic::run(&client, cmd, &mut out).await?;
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Produce(args) => runtime()?.block_on(async {
            let client = conn.connect().await?;
            produce::run(&client, args).await
        }),
        Command::Tail(args) => runtime()?.block_on(async {
            let client = conn.connect().await?;
            tail::run(&client, args, position::Start::Latest).await
        }),
        Command::Consume(args) => runtime()?.block_on(async {
            let client = conn.connect().await?;
            tail::run(&client, args, position::Start::Earliest).await
        }),
        Command::Replay(args) => runtime()?.block_on(async {
            let client = conn.connect().await?;
            replay::run(&client, args).await
        }),
        Command::Group(cmd) => runtime()?.block_on(async {
            let client = conn.connect().await?;
            group::run(&client, cmd).await
        }),
        Command::Processor(cmd) => runtime()?.block_on(async {
            let client = conn.connect().await?;
            processor::run_processor(&client, cmd).await
        }),
        Command::Dlq(cmd) => runtime()?.block_on(async {
            let client = conn.connect().await?;
            processor::run_dlq(&client, cmd).await
        }),
        Command::Txn(cmd) => runtime()?.block_on(async {
            let client = conn.connect().await?;
            txn::run(&client, cmd).await
        }),
    }
}

/// The command line definition, with the connection flags (global, so that they may come
/// after the subcommand too) hidden from the help of the offline commands, which ignore them.
fn command() -> clap::Command {
    let mut cmd = Cli::command();
    cmd.build();
    for offline in ["inspect", "completions"] {
        cmd = cmd.mut_subcommand(offline, hide_connection_args);
    }
    cmd
}

fn hide_connection_args(mut c: clap::Command) -> clap::Command {
    let ids: Vec<String> = c
        .get_arguments()
        .filter(|a| a.get_help_heading() == Some("Connection"))
        .map(|a| a.get_id().to_string())
        .collect();
    for id in ids {
        c = c.mut_arg(id, |a| a.hide(true));
    }
    let subs: Vec<String> = c
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in subs {
        c = c.mut_subcommand(name, hide_connection_args);
    }
    c
}

fn main() -> ExitCode {
    let cli = match command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => exit::report(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Connection flags have their own heading, and offline commands do not show them.
    #[test]
    fn connection_flags_are_grouped_and_only_on_online_commands() {
        let mut cmd = command();
        let help = cmd.render_help().to_string();
        assert!(
            help.contains("Connection:") && help.contains("--broker"),
            "{help}"
        );
        let topic = cmd.find_subcommand_mut("topic").unwrap();
        let create = topic.find_subcommand_mut("create").unwrap();
        let help = create.render_help().to_string();
        assert!(
            help.contains("Connection:") && help.contains("--tls-ca"),
            "{help}"
        );
        let inspect = cmd.find_subcommand_mut("inspect").unwrap();
        let verify = inspect.find_subcommand_mut("verify").unwrap();
        let help = verify.render_help().to_string();
        assert!(
            !help.contains("--broker") && !help.contains("--tls-ca"),
            "{help}"
        );
    }
}
