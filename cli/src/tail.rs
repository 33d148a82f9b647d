//! `spool tail` / `spool consume`: follow or read ranges of partitions.
//!
//! Ranges are resolved once, up front, per partition (rpk's semantics): `:end` means the high
//! watermark *when the command started*, so the command exits on a partition that is still
//! being written (kcat's `-e` never did, kcat #33). Empty ranges are dropped before reading, so
//! an empty topic with `:end` exits at once. The resolved start (and end) of every partition is
//! printed on stderr unless `-q`, so a default is never a surprise. Reading uses the client's
//! Subscribe-based consumer without a group: nothing is committed, no group is touched.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use spool_client::{
    Client, ConsumerConfig, Isolation, OffsetReset, Record, StartAt, TopicPartition,
};

use crate::conn::parse_duration;
use crate::exit::{CliResult, usage};
use crate::format::{Encoding, Output};
use crate::group::partition_offsets;
use crate::position::{Range, Resolved, Start, fmt_time};

/// Follow or read partitions.
#[derive(Debug, Args)]
#[command(
    after_help = "Offsets (-o): start | end | N | +N | -N | @TIME | s@MS, optionally :END where END is
end (the end when the command started), N, +N, @TIME, e@MS, or nothing to follow. TIME is
RFC 3339, a date, epoch s or ms, now, or a duration (-1h; a bare 1h means 1h ago, or 1h after
a time start). Ends are exclusive.

Examples:
  spool tail prices                          follow new records
  spool consume prices -o start:end          everything up to now, then exit
  spool tail prices -o @-1h                  from one hour ago, then follow
  spool tail prices/0,1 -o -100:end -f '%o %k %v\\n'
  spool consume events -o @2026-11-22:1d -f json > yesterday.jsonl
  spool tail events --key user-42 --grep refund -n 10"
)]
pub(crate) struct TailArgs {
    /// TOPIC, TOPIC/PARTITION or TOPIC/P1,P2 (several allowed).
    #[arg(required = true)]
    targets: Vec<String>,
    /// Partitions (for every topic given without /P).
    #[arg(long, short = 'p', value_delimiter = ',')]
    partitions: Vec<u32>,
    /// Where to start and end; see above. May be given twice, kcat style (-o s@T1 -o e@T2).
    #[arg(long, short = 'o', value_name = "SPEC", allow_hyphen_values = true)]
    offset: Vec<String>,
    /// Exit at the end that existed when the command started (same as ending the spec with
    /// :end); TANK's -d, kcat's -e.
    #[arg(long, short = 'e')]
    exit: bool,
    /// Stop after this many records (after filters).
    #[arg(long, short = 'n', alias = "count", short_alias = 'c')]
    num: Option<u64>,
    /// Output: a format string (see below), `json` (JSON lines) or `raw` (values without a
    /// delimiter). Default: one value per line.
    ///
    /// Tokens: %v/%s value, %k key, %V/%S and %K sizes, %t topic, %p partition, %o offset,
    /// %T timestamp ms, %d RFC 3339 (%d{%Y-%m-%d}), %h headers, %H header count, %% and
    /// \n \t \0 \xHH escapes; %v{hex} %v{base64} %k{hex} %k{base64}.
    #[arg(long, short = 'f', value_name = "FORMAT")]
    format: Option<String>,
    /// Same as -f json.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// How JSON output writes keys and values (auto: text when UTF-8, else base64).
    #[arg(long, value_enum, default_value = "auto")]
    encoding: Encoding,
    /// Only records with this key.
    #[arg(long)]
    key: Option<String>,
    /// Only records with this header (KEY or KEY=VALUE; repeatable, all must match).
    #[arg(long = "header", value_name = "KEY[=VALUE]")]
    headers: Vec<String>,
    /// Only records whose value contains this text.
    #[arg(long)]
    grep: Option<String>,
    /// Exit when no record arrived for this long (e.g. 10s).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    idle_exit: Option<Duration>,
    /// No status lines on stderr.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Which records to show: `committed` (only committed transactions' records and plain
    /// ones, up to each partition's last stable offset; what processors see) or
    /// `uncommitted` (everything written, open and aborted transactions included).
    #[arg(long, value_enum, default_value = "committed")]
    isolation: IsolationArg,
}

/// `--isolation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum IsolationArg {
    /// Read committed.
    Committed,
    /// Read uncommitted.
    Uncommitted,
}

impl IsolationArg {
    pub(crate) fn level(self) -> Isolation {
        match self {
            IsolationArg::Committed => Isolation::ReadCommitted,
            IsolationArg::Uncommitted => Isolation::ReadUncommitted,
        }
    }
}

/// Record filters; all given ones must match.
#[derive(Debug, Default)]
struct Filter {
    key: Option<Bytes>,
    headers: Vec<(String, Option<Bytes>)>,
    grep: Option<Vec<u8>>,
}

impl Filter {
    fn matches(&self, r: &Record) -> bool {
        if let Some(k) = &self.key
            && r.key.as_ref() != Some(k)
        {
            return false;
        }
        for (k, v) in &self.headers {
            let found = r
                .headers
                .iter()
                .any(|h| h.key == *k && v.as_ref().is_none_or(|v| h.value.as_ref() == Some(v)));
            if !found {
                return false;
            }
        }
        if let Some(g) = &self.grep {
            let hay = r.value.as_deref().unwrap_or_default();
            if !g.is_empty() && !hay.windows(g.len()).any(|w| w == &g[..]) {
                return false;
            }
        }
        true
    }
}

/// The partitions named by the targets (and `-p`), in order, deduplicated.
async fn partitions(client: &Client, a: &TailArgs) -> CliResult<Vec<TopicPartition>> {
    let mut out: Vec<TopicPartition> = Vec::new();
    for t in &a.targets {
        let (topic, list) = match t.split_once('/') {
            Some((topic, ps)) => {
                let list = ps
                    .split(',')
                    .map(|p| {
                        p.trim().parse::<u32>().map_err(|_| {
                            usage(format!("{t:?}: partitions after / must be numbers"))
                        })
                    })
                    .collect::<CliResult<Vec<_>>>()?;
                (topic.to_owned(), list)
            }
            None if !a.partitions.is_empty() => (t.clone(), a.partitions.clone()),
            None => {
                let d = client.describe_topic(t).await?;
                (
                    t.clone(),
                    d.partitions.iter().map(|p| p.partition).collect(),
                )
            }
        };
        for p in list {
            let tp = TopicPartition::new(topic.clone(), p);
            if !out.contains(&tp) {
                out.push(tp);
            }
        }
    }
    Ok(out)
}

/// Parses the `-o` values (and `-e`) into one range.
fn parse_range(a: &TailArgs, default_start: Start, now_ms: i64) -> CliResult<Range> {
    let mut range = match a.offset.as_slice() {
        [] => Range {
            start: default_start,
            end: crate::position::End::Follow,
        },
        [one] => Range::parse(one, default_start, now_ms).map_err(usage)?,
        [first, second] => {
            let r1 = Range::parse(first, default_start, now_ms).map_err(usage)?;
            let r2 = Range::parse(second, default_start, now_ms).map_err(usage)?;
            r1.merge(r2, second).map_err(usage)?
        }
        _ => return Err(usage("-o may be given at most twice")),
    };
    if a.exit && range.end == crate::position::End::Follow {
        range.end = crate::position::End::Latest;
    }
    Ok(range)
}

/// Resolves `range` on every partition: bounds from ListOffsets, times through the broker's
/// time index, in as few requests as the broker's per-request limit allows (group.rs's
/// `partition_offsets`, chunked), whatever the number of partitions.
pub(crate) async fn resolve(
    client: &Client,
    tps: &[TopicPartition],
    range: &Range,
    isolation: Isolation,
) -> CliResult<Vec<Resolved>> {
    let times: Vec<i64> = [
        match range.start {
            Start::Time(t) => Some(t),
            _ => None,
        },
        match range.end {
            crate::position::End::Time(t) => Some(t),
            _ => None,
        },
    ]
    .into_iter()
    .flatten()
    .collect();
    // `end` is where a reader at this isolation can read to (read committed: the last
    // stable offset), so `:end` terminates even while a transaction is open.
    let bounds = partition_offsets(client, tps, &times, isolation).await?;
    bounds
        .into_iter()
        .map(|b| {
            let b = b?;
            Ok(range.resolve(b.log_start, b.high_watermark, |t| {
                times
                    .iter()
                    .position(|x| *x == t)
                    .map_or(b.high_watermark, |i| b.at[i])
            }))
        })
        .collect()
}

fn describe(r: &Resolved) -> String {
    match r.end {
        None => format!("from offset {} (following)", r.start),
        Some(e) => format!("offsets [{}, {e})", r.start),
    }
}

pub(crate) async fn run(client: &Client, a: TailArgs, default_start: Start) -> CliResult<ExitCode> {
    let now_ms = jiff::Timestamp::now().as_millisecond();
    let range = parse_range(&a, default_start, now_ms)?;
    let format = if a.json {
        Some("json")
    } else {
        a.format.as_deref()
    };
    let output = Output::from_flag(format, a.encoding).map_err(usage)?;
    let filter = Filter {
        key: a.key.as_ref().map(|k| Bytes::copy_from_slice(k.as_bytes())),
        headers: a
            .headers
            .iter()
            .map(|h| match h.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(Bytes::copy_from_slice(v.as_bytes()))),
                None => (h.clone(), None),
            })
            .collect(),
        grep: a.grep.as_ref().map(|g| g.as_bytes().to_vec()),
    };
    let tps = partitions(client, &a).await?;
    let resolved = resolve(client, &tps, &range, a.isolation.level()).await?;
    if let (Start::Time(t), false) = (range.start, a.quiet) {
        status!("% start time {}", fmt_time(t));
    }

    // Partitions still to read, and where each stops.
    let mut ends: BTreeMap<TopicPartition, Option<u64>> = BTreeMap::new();
    let mut assign = Vec::new();
    for (tp, r) in tps.iter().zip(&resolved) {
        if !a.quiet {
            status!("% {}/{}: {}", tp.topic, tp.partition, describe(r));
        }
        if r.is_empty() {
            continue;
        }
        ends.insert(tp.clone(), r.end);
        assign.push((tp.clone(), StartAt::Offset(r.start)));
    }
    if assign.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    // Following (`tail -f` semantics, as Kafka's console consumer and kcat): a broker
    // restart or outage of any length is waited out, reconnecting with the client's backoff
    // (at most 5 s apart). A bounded range gives up after the client's default attempts
    // (about 26 s) with exit 3, so scripts do not hang.
    let following = ends.values().any(Option::is_none);
    let mut consumer = client.consumer(ConsumerConfig {
        // An explicit position that retention deleted meanwhile: say so rather than skip.
        offset_reset: OffsetReset::Error,
        isolation: a.isolation.level(),
        max_reconnect_attempts: if following {
            u32::MAX
        } else {
            ConsumerConfig::default().max_reconnect_attempts
        },
        ..ConsumerConfig::default()
    });
    consumer.assign(&assign).await?;

    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut printed = 0u64;
    let mut idle = Duration::ZERO;
    let tick = Duration::from_millis(100);
    // Since when reading has been failing (and retried), once said on stderr.
    let mut failing: Option<std::time::Instant> = None;
    loop {
        if !a.quiet {
            report_retrying(&consumer, &mut failing);
        }
        // A partition can reach its end without a record at the end offset: a transaction
        // marker or an aborted transaction's batch (left out for read-committed readers) may
        // be last. The consumer's position says so.
        let reached: Vec<(TopicPartition, u64)> = ends
            .iter()
            .filter_map(|(tp, end)| {
                let pos = consumer.position(&tp.topic, tp.partition)?;
                end.is_some_and(|e| pos >= e).then(|| (tp.clone(), pos))
            })
            .collect();
        for (tp, pos) in reached {
            finish(&mut consumer, &mut ends, &tp, a.quiet, pos);
        }
        if a.num.is_some_and(|n| printed >= n) || ends.is_empty() {
            break;
        }
        let rec = match tokio::time::timeout(tick, consumer.next()).await {
            Err(_) => {
                // Nothing for a moment: let readers of a pipe see what we have.
                out.flush()?;
                idle += tick;
                if a.idle_exit.is_some_and(|d| idle >= d) {
                    if !a.quiet {
                        status!(
                            "% no record for {:?}, exiting",
                            a.idle_exit.unwrap_or_default()
                        );
                    }
                    break;
                }
                continue;
            }
            Ok(None) => break,
            Ok(Some(r)) => r?,
        };
        idle = Duration::ZERO;
        let tp = TopicPartition::new(&*rec.topic, rec.partition);
        let end = ends.get(&tp).copied().flatten();
        if end.is_some_and(|e| rec.offset >= e) {
            finish(&mut consumer, &mut ends, &tp, a.quiet, rec.offset);
            continue;
        }
        if filter.matches(&rec) {
            output.write(&rec, &mut out)?;
            printed += 1;
        }
        if end.is_some_and(|e| rec.offset + 1 >= e) {
            finish(&mut consumer, &mut ends, &tp, a.quiet, rec.offset + 1);
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Says on stderr when the consumer starts failing (and retrying) and when it reads again: a
/// following tail retries for ever (a broker restart, a deleted topic that may come back, a
/// proxy answering UNAVAILABLE), and must not do it silently.
fn report_retrying(consumer: &spool_client::Consumer, failing: &mut Option<std::time::Instant>) {
    match (consumer.retrying(), *failing) {
        (Some((attempts, error)), None) => {
            *failing = Some(std::time::Instant::now());
            let _ = writeln!(
                std::io::stderr(),
                "% {}: reading failed ({attempts} attempt(s)): {error}; retrying with backoff \
                 (up to 5 s apart) until it works",
                fmt_time(jiff::Timestamp::now().as_millisecond())
            );
        }
        (None, Some(since)) => {
            *failing = None;
            let _ = writeln!(
                std::io::stderr(),
                "% {}: reading again after {:.1}s of failures",
                fmt_time(jiff::Timestamp::now().as_millisecond()),
                since.elapsed().as_secs_f64()
            );
        }
        _ => {}
    }
}

fn finish(
    consumer: &mut spool_client::Consumer,
    ends: &mut BTreeMap<TopicPartition, Option<u64>>,
    tp: &TopicPartition,
    quiet: bool,
    at: u64,
) {
    ends.remove(tp);
    consumer.unassign(&tp.topic, tp.partition);
    if !quiet {
        status!(
            "% Reached end of partition {}/{} at offset {at}",
            tp.topic,
            tp.partition
        );
    }
}
