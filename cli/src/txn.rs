//! `spool txn list`: the broker's transactional ids and their current transactions, to spot a
//! transaction holding readers back (its partitions' last stable offset waits for it).

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use spool_client::{Client, proto};

use crate::exit::CliResult;
use crate::table::{Table, human_ms};

/// `spool txn ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum TxnCmd {
    /// Transactional ids: producer id, epoch, state, partitions and age of the open
    /// transaction (sorted by id; --open for open ones only).
    #[command(after_help = "Example:\n  spool txn list --open")]
    List(ListArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only transactions that are open or being ended.
    #[arg(long)]
    open: bool,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(client: &Client, cmd: TxnCmd) -> CliResult<ExitCode> {
    match cmd {
        TxnCmd::List(a) => list(client, a).await,
    }
}

fn state_name(s: i32) -> &'static str {
    match proto::TxnState::try_from(s).unwrap_or(proto::TxnState::Unspecified) {
        proto::TxnState::Empty => "empty",
        proto::TxnState::Ongoing => "ongoing",
        proto::TxnState::PrepareCommit => "prepare-commit",
        proto::TxnState::PrepareAbort => "prepare-abort",
        proto::TxnState::CompleteCommit => "committed",
        proto::TxnState::CompleteAbort => "aborted",
        proto::TxnState::Unspecified => "unknown",
    }
}

fn is_open(s: i32) -> bool {
    matches!(
        proto::TxnState::try_from(s),
        Ok(proto::TxnState::Ongoing
            | proto::TxnState::PrepareCommit
            | proto::TxnState::PrepareAbort)
    )
}

async fn list(client: &Client, a: ListArgs) -> CliResult<ExitCode> {
    let now = jiff::Timestamp::now().as_millisecond();
    let txns: Vec<_> = client
        .list_transactions()
        .await?
        .into_iter()
        .filter(|t| !a.open || is_open(t.state))
        .collect();
    let mut out = std::io::stdout().lock();
    if a.json {
        for t in &txns {
            let line = serde_json::json!({
                "transactional_id": t.transactional_id,
                "producer_id": t.producer_id,
                "producer_epoch": t.producer_epoch,
                "state": state_name(t.state),
                "partitions": t.partitions.iter().map(|p| format!("{}/{}", p.topic, p.partition)).collect::<Vec<_>>(),
                "started_ms": (t.started_ms > 0).then_some(t.started_ms),
                "timeout_ms": t.timeout_ms,
            });
            writeln!(out, "{line}")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        "TRANSACTIONAL ID",
        "PRODUCER",
        "EPOCH",
        "STATE",
        "PARTITIONS",
        "OPEN FOR",
        "TIMEOUT",
    ]);
    for t in &txns {
        table.row(vec![
            t.transactional_id.clone(),
            t.producer_id.to_string(),
            t.producer_epoch.to_string(),
            state_name(t.state).to_owned(),
            t.partitions.len().to_string(),
            if t.started_ms > 0 && is_open(t.state) {
                human_ms(now.saturating_sub(t.started_ms).max(0) as u64)
            } else {
                "-".to_owned()
            },
            human_ms(u64::from(t.timeout_ms)),
        ]);
    }
    table.write(&mut out)?;
    Ok(ExitCode::SUCCESS)
}
