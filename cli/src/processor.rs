//! `spool processor list | pause | resume` and `spool dlq list | show | redrive | skip`:
//! operating stream processors (`spool_processor::ops` does the work; see
//! docs/processors.md).
//!
//! `processor list` samples every processor's committed progress twice, `--interval` apart,
//! to show a rate and an estimate of the time to finish (lag / rate). Done, lag and rate
//! count **offsets**, as Kafka's consumer lag and `spool group` do: transaction markers and
//! aborted records take offsets too, so under exactly-once a lag of N offsets is at most N
//! records (counting records would mean reading every partition's backlog).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use spool_client::Client;
use spool_processor::ops::{self, RedriveOptions, RedriveTarget};

use crate::conn::parse_duration;
use crate::exit::{CliError, CliResult};
use crate::table::Table;

#[derive(Debug, Subcommand)]
pub(crate) enum ProcessorCmd {
    /// Processors (groups with a control topic): state, members, done, lag, rate, ETA,
    /// paused lanes. Done, lag and rate count offsets, like Kafka's consumer lag
    /// (transaction markers and aborted records included).
    ///
    /// Examples:
    ///   spool processor list
    ///   spool processor list --json --interval 5s
    #[command(alias = "ls", verbatim_doc_comment)]
    List {
        /// Time between the two samples the rate is computed from.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause a processor, or one lane of it (kept in its control topic: survives restarts).
    Pause(PauseArgs),
    /// Resume a processor, or one lane of it.
    Resume(PauseArgs),
}

#[derive(Debug, Args)]
pub(crate) struct PauseArgs {
    /// The processor (its group name).
    name: String,
    /// Only this lane.
    #[arg(long)]
    lane: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCmd {
    /// Dead-letter topics (`<source>.<group>.dlq`) and how many dead letters each holds
    /// (committed records, counted by reading them).
    #[command(alias = "ls")]
    List {
        /// Only this processor's.
        #[arg(long)]
        group: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The dead letters of a topic: original position, attempts, error (--json: everything,
    /// with the attempt history).
    #[command(alias = "inspect")]
    Show {
        /// The dead-letter topic.
        topic: String,
        /// Start offset in every partition.
        #[arg(long)]
        from: Option<u64>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their source topic (or the group's first retry topic, or a
    /// named topic), rate-limited, optionally filtered.
    ///
    /// Examples:
    ///   spool dlq redrive prices.deals.dlq --dry-run
    ///   spool dlq redrive mail.notifications.dlq --error 'SMTP 451' --rate 50
    ///   spool dlq redrive mail.notifications.dlq --to retry
    #[command(verbatim_doc_comment)]
    Redrive {
        /// The dead-letter topic.
        topic: String,
        /// source | retry | TOPIC. `retry`: the group's first retry topic, with the retry
        /// headers of the record's original position (attempt 1, due at once).
        #[arg(long, default_value = "source")]
        to: String,
        /// Records per second at most.
        #[arg(long)]
        rate: Option<u32>,
        /// Only records whose error contains this text.
        #[arg(long)]
        error: Option<String>,
        /// Only records from this original topic.
        #[arg(long)]
        source_topic: Option<String>,
        /// Start offset in every partition of the dead-letter topic.
        #[arg(long)]
        from: Option<u64>,
        /// At most this many records.
        #[arg(long)]
        limit: Option<usize>,
        /// Only say what would be sent.
        #[arg(long)]
        dry_run: bool,
        /// At most this many records sent and not yet acknowledged (with one fetch of at
        /// most 1 MiB, the bound on the command's memory however long the topic).
        #[arg(long, default_value_t = 1000)]
        in_flight: usize,
    },
    /// Make a processor give up on the record a partition is stuck retrying: it goes to the
    /// dead-letter topic (during the wait for its next attempt, without another handler
    /// call) and the partition moves on.
    Skip {
        /// The processor (group).
        name: String,
        /// The record's topic.
        topic: String,
        /// Its partition.
        partition: u32,
        /// Its offset.
        offset: u64,
        /// Why (recorded in the dead letter's history).
        #[arg(long, default_value = "skipped by an operator")]
        reason: String,
    },
}

fn other(e: impl std::fmt::Display) -> CliError {
    CliError::Other(anyhow::anyhow!("{e}"))
}

pub(crate) async fn run_processor(client: &Client, cmd: ProcessorCmd) -> CliResult<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        ProcessorCmd::List { interval, json } => {
            let first = ops::processors(client).await?;
            tokio::time::sleep(interval).await;
            let second = ops::processors(client).await?;
            let before: BTreeMap<&str, u64> =
                first.iter().map(|p| (p.name.as_str(), p.done)).collect();
            let secs = interval.as_secs_f64().max(0.001);
            let rows: Vec<serde_json::Value> = second
                .iter()
                .map(|p| {
                    let rate = before
                        .get(p.name.as_str())
                        .map_or(0.0, |d| p.done.saturating_sub(*d) as f64 / secs);
                    let eta = (rate > 0.0).then(|| p.lag as f64 / rate);
                    serde_json::json!({
                        "name": p.name, "state": p.state, "members": p.members,
                        "topics": p.topics, "done": p.done, "lag": p.lag,
                        "rate_per_sec": rate, "eta_seconds": eta,
                        "paused": p.paused, "paused_lanes": p.paused_lanes, "skips": p.skips,
                    })
                })
                .collect();
            if json {
                writeln!(out, "{}", serde_json::Value::Array(rows))?;
            } else {
                let mut t = Table::new(&[
                    "PROCESSOR",
                    "STATE",
                    "MEMBERS",
                    "DONE(OFFSETS)",
                    "LAG(OFFSETS)",
                    "OFFSETS/S",
                    "ETA",
                    "PAUSED",
                ]);
                for (p, r) in second.iter().zip(&rows) {
                    let paused = if p.paused {
                        "all".to_owned()
                    } else {
                        p.paused_lanes.join(",")
                    };
                    let eta = r["eta_seconds"]
                        .as_f64()
                        .map_or("-".to_owned(), |s| format!("{s:.0}s"));
                    t.row(vec![
                        p.name.clone(),
                        p.state.clone(),
                        p.members.to_string(),
                        p.done.to_string(),
                        p.lag.to_string(),
                        format!("{:.1}", r["rate_per_sec"].as_f64().unwrap_or(0.0)),
                        eta,
                        if paused.is_empty() {
                            "-".into()
                        } else {
                            paused
                        },
                    ]);
                }
                t.write(&mut out)?;
            }
        }
        ProcessorCmd::Pause(a) => {
            ops::pause(client, &a.name, a.lane.as_deref(), true).await?;
            status!(
                "paused {}{}",
                a.name,
                a.lane.map(|l| format!(" lane {l}")).unwrap_or_default()
            );
        }
        ProcessorCmd::Resume(a) => {
            ops::pause(client, &a.name, a.lane.as_deref(), false).await?;
            status!(
                "resumed {}{}",
                a.name,
                a.lane.map(|l| format!(" lane {l}")).unwrap_or_default()
            );
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn run_dlq(client: &Client, cmd: DlqCmd) -> CliResult<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        DlqCmd::List { group, json } => {
            let list = ops::dlq_topics(client, group.as_deref()).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&list).map_err(other)?)?;
            } else {
                let mut t = Table::new(&["TOPIC", "RECORDS"]);
                for d in list {
                    let more = if d.complete { "" } else { "+" };
                    t.row(vec![d.topic, format!("{}{more}", d.records)]);
                }
                t.write(&mut out)?;
            }
        }
        DlqCmd::Show {
            topic,
            from,
            limit,
            json,
        } => {
            let letters = ops::read_dead_letters(client, &topic, from, limit).await?;
            if json {
                for d in letters {
                    writeln!(out, "{}", serde_json::to_string(&d).map_err(other)?)?;
                }
            } else {
                let mut t =
                    Table::new(&["PARTITION", "OFFSET", "SOURCE", "ATTEMPTS", "KEY", "ERROR"]);
                for d in letters {
                    t.row(vec![
                        d.partition.to_string(),
                        d.offset.to_string(),
                        format!(
                            "{}/{}@{}",
                            d.topic.unwrap_or_default(),
                            d.source_partition.map_or("-".into(), |p| p.to_string()),
                            d.source_offset.map_or("-".into(), |o| o.to_string())
                        ),
                        d.attempts.map_or("-".into(), |a| a.to_string()),
                        d.key.unwrap_or_default(),
                        d.error.unwrap_or_default(),
                    ]);
                }
                t.write(&mut out)?;
            }
        }
        DlqCmd::Redrive {
            topic,
            to,
            rate,
            error,
            source_topic,
            from,
            limit,
            dry_run,
            in_flight,
        } => {
            let target = match to.as_str() {
                "source" => RedriveTarget::Source,
                "retry" => RedriveTarget::Retry,
                t => RedriveTarget::Topic(t.to_owned()),
            };
            let opts = RedriveOptions {
                target,
                rate_per_sec: rate,
                error_contains: error,
                source_topic,
                from,
                limit: limit.unwrap_or(usize::MAX),
                dry_run,
                in_flight,
            };
            let report = ops::redrive(client, &topic, &opts).await?;
            writeln!(out, "{}", serde_json::to_string(&report).map_err(other)?)?;
            status!(
                "{} {} of {} dead letters{}",
                if dry_run { "would send" } else { "sent" },
                report.sent,
                report.read,
                if dry_run { " (dry run)" } else { "" }
            );
        }
        DlqCmd::Skip {
            name,
            topic,
            partition,
            offset,
            reason,
        } => {
            ops::skip(client, &name, &topic, partition, offset, &reason).await?;
            status!("asked {name} to skip {topic}/{partition}@{offset}");
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
