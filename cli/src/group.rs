//! `spool group list | describe | seek | delete`: consumer groups' committed offsets and lag.
//!
//! Lag is computed when the command runs, not when the group committed (Burrow #127): per
//! partition it is `high watermark − max(committed, log start)`, so records that retention
//! already deleted do not count (rpk #18843). A partition in scope without a committed offset
//! shows `-`: where the group would start there depends on its consumers' reset policy.
//!
//! Lag in time is `now − timestamp` of the oldest unconsumed record, the one at
//! `max(committed, log start)`, read with a one-batch fetch: the record's producer timestamp
//! against this machine's clock (negative values, from skewed clocks, show as 0). It is 0 when
//! the partition is caught up.
//!
//! Safety of `seek --execute` and `delete`, in two layers:
//! - **Members** (consumers that joined the group through the broker's `GroupService`): while a
//!   group has any, both are refused, and `--force` does not override it; the broker itself
//!   refuses plain offset changes then (`GROUP_NOT_EMPTY`). Stop the members first.
//! - **Consumers that commit without joining** (simple consumers) are invisible to the broker,
//!   so the CLI also refuses when the group committed anything within `--active-window` (60 s
//!   by default), a heuristic: a consumer that commits less often than that looks idle, and a
//!   stopped one looks active for a minute. `--force` overrides this layer only.
//!
//! `describe` shows the members (state, generation, each member's partitions) beside the lag.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use futures_util::StreamExt;
use serde::Serialize;
use spool_client::{
    Client, CommittedOffset, FetchOptions, Isolation, OffsetCommit, OffsetSpec, TopicPartition,
};

use crate::conn::parse_duration;
use crate::exit::{CliError, CliResult, usage};
use crate::position::{fmt_time, parse_time};
use crate::table::{Table, human_ms, opt};

/// Most ListOffsets queries sent in one request (the broker's default limit is 10 000).
const MAX_QUERIES: usize = 4096;
/// Fetches (lag in time) or offset lookups (group list) in flight at once.
const CONCURRENCY: usize = 8;

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCmd {
    /// Groups with committed offsets: partitions, topics, total lag, last commit.
    ///
    /// Examples:
    ///   spool group list
    ///   spool group list --sort lag | head -5      the groups furthest behind
    ///   spool group list --json | jq -r '.[] | select(.total_lag > 1000) | .group'
    #[command(alias = "ls", verbatim_doc_comment)]
    List(ListArgs),
    /// Per-partition offsets, lag and lag in time of a group, then per topic and in total.
    ///
    /// LAG is the high watermark minus max(committed, log start), so records that retention
    /// deleted do not count; LAG-TIME is now minus the timestamp of the oldest unconsumed
    /// record. `-` where not applicable (nothing committed, partition gone).
    ///
    /// Examples:
    ///   spool group describe billing
    ///   spool group describe billing --sort lag --topic events
    ///   spool group describe billing --watch 5s     redraw every 5s until Ctrl-C
    #[command(verbatim_doc_comment)]
    Describe(DescribeArgs),
    /// Move a group's committed offsets: prints the plan, changes nothing without --execute.
    ///
    /// --to: start | end | OFFSET | @TIME | -DURATION (that long ago) | +N / -N (shift from the
    /// committed offset). TIME is RFC 3339, a date, epoch s or ms, or -1h; times resolve
    /// through the broker's time index to the first record at or after them. New offsets are
    /// clamped into [log start, log end].
    ///
    /// Scope: every partition the group has committed, or what --topic names (which may add
    /// partitions the group never committed), or the lines of --from-file.
    ///
    /// Safety: --execute refuses (exit 1) while the group has members (consumers that joined
    /// it; --force does not override, the broker would refuse too), and, as a heuristic for
    /// consumers that commit without joining, when the group committed anything within
    /// --active-window (60s; --force overrides). With --execute every new offset is committed
    /// in one request (all or nothing).
    ///
    /// Examples:
    ///   spool group seek billing --to @2026-11-23T10:00:00Z            the plan only
    ///   spool group seek billing --to @2026-11-23T10:00:00Z --execute
    ///   spool group seek billing --to -1h --topic events --execute
    ///   spool group seek billing --to -100 --topic events/0,1          shift back 100
    ///   spool group seek billing --to end --export before.csv          save a plan
    ///   spool group seek billing --from-file before.csv --execute      apply a saved plan
    #[command(verbatim_doc_comment)]
    Seek(SeekArgs),
    /// Delete a group's committed offsets: all of them, or those of --topic.
    ///
    /// Refuses (exit 1) while the group has members, and when it committed within
    /// --active-window unless --force (the same checks as `seek`).
    ///
    /// Examples:
    ///   spool group delete old-billing
    ///   spool group delete billing --topic retired-events --force
    #[command(alias = "rm", verbatim_doc_comment)]
    Delete(DeleteArgs),
}

/// How `group list` sorts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum ListSort {
    /// By group name.
    #[default]
    Name,
    /// Largest total lag first.
    Lag,
    /// Most recent commit first.
    LastCommit,
}

/// How `group describe` sorts partitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum DescribeSort {
    /// By topic, then partition.
    #[default]
    Partition,
    /// Largest lag first (then largest lag in time).
    Lag,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Sort order.
    #[arg(long, value_enum, default_value = "name")]
    sort: ListSort,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DescribeArgs {
    /// Group name.
    group: String,
    /// Only these topics (repeatable); all their partitions are shown, committed or not.
    #[arg(long, short = 't', value_name = "TOPIC")]
    topic: Vec<String>,
    /// Sort partitions.
    #[arg(long, short = 's', value_enum, default_value = "partition")]
    sort: DescribeSort,
    /// Redraw every INTERVAL (default 2s) until Ctrl-C; the screen is cleared only when
    /// stdout is a terminal, otherwise successive tables (or JSON lines) are printed.
    #[arg(
        long,
        short = 'w',
        value_name = "INTERVAL",
        num_args = 0..=1,
        default_missing_value = "2s",
        value_parser = parse_duration
    )]
    watch: Option<Duration>,
    /// With --watch: stop after this many draws.
    #[arg(long, value_name = "N", requires = "watch")]
    watch_count: Option<u64>,
    /// JSON instead of tables (one line per draw with --watch).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SeekArgs {
    /// Group name.
    group: String,
    /// Where to: start | end | OFFSET | @TIME | -DURATION | +N | -N (see above).
    #[arg(
        long,
        value_name = "TARGET",
        allow_hyphen_values = true,
        required_unless_present = "from_file",
        conflicts_with = "from_file"
    )]
    to: Option<String>,
    /// TOPIC or TOPIC/P1,P2 (repeatable): only these partitions, committed or not.
    #[arg(
        long,
        short = 't',
        value_name = "TOPIC[/P,...]",
        conflicts_with = "from_file"
    )]
    topic: Vec<String>,
    /// Offsets from a file of `topic,partition,offset` lines (as --export writes; rpk's
    /// `topic partition offset` also accepted).
    #[arg(long, value_name = "FILE")]
    from_file: Option<PathBuf>,
    /// Write the plan's new offsets as `topic,partition,offset` lines (for --from-file).
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
    /// Commit the new offsets. Without it nothing changes.
    #[arg(long)]
    execute: bool,
    /// Execute even if the group looks active (see --active-window).
    #[arg(long)]
    force: bool,
    /// A group that committed within this window counts as active (a heuristic until spoold
    /// has group membership).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    active_window: Duration,
    /// JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// Group name.
    group: String,
    /// Only the offsets of these topics (repeatable).
    #[arg(long, short = 't', value_name = "TOPIC")]
    topic: Vec<String>,
    /// Delete even if the group looks active (see --active-window).
    #[arg(long)]
    force: bool,
    /// A group that committed within this window counts as active.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    active_window: Duration,
    /// JSON instead of a line of text.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(client: &Client, cmd: GroupCmd) -> CliResult<ExitCode> {
    match cmd {
        GroupCmd::List(a) => list(client, a).await,
        GroupCmd::Describe(a) => describe(client, a).await,
        GroupCmd::Seek(a) => seek(client, a).await,
        GroupCmd::Delete(a) => delete(client, a).await,
    }
}

pub(crate) fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

// ---- shared helpers (also used by replay) ------------------------------------------------

/// A partition's bounds, and the offsets of the times asked about (in order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub(crate) log_start: u64,
    pub(crate) high_watermark: u64,
    /// First offset at or after each time (the high watermark when none).
    pub(crate) at: Vec<u64>,
}

/// Bounds of every partition (and the offsets of `times`) through ListOffsets, in as few
/// requests as the broker's per-request limit allows. A partition-level failure (an unknown
/// topic, say) is an `Err` in its slot.
pub(crate) async fn partition_offsets(
    client: &Client,
    tps: &[TopicPartition],
    times: &[i64],
    isolation: spool_client::Isolation,
) -> CliResult<Vec<Result<Bounds, spool_client::Error>>> {
    let mut specs = vec![OffsetSpec::Earliest, OffsetSpec::Latest];
    specs.extend(times.iter().map(|t| OffsetSpec::Timestamp(*t)));
    let per = specs.len();
    let mut out = Vec::with_capacity(tps.len());
    for chunk in tps.chunks((MAX_QUERIES / per).max(1)) {
        let queries: Vec<_> = chunk
            .iter()
            .flat_map(|tp| specs.iter().map(move |s| (tp.clone(), *s)))
            .collect();
        let mut answers = client
            .list_offsets_with(&queries, isolation)
            .await?
            .into_iter();
        for _ in chunk {
            let slots: Vec<_> = answers.by_ref().take(per).collect();
            out.push(
                slots
                    .into_iter()
                    .map(|a| a.map(|a| a.offset))
                    .collect::<Result<Vec<u64>, _>>()
                    .map(|v| Bounds {
                        log_start: v[0],
                        high_watermark: v[1],
                        at: v[2..].to_vec(),
                    }),
            );
        }
    }
    Ok(out)
}

/// `TOPIC` or `TOPIC/P1,P2,…`.
pub(crate) fn parse_target(t: &str) -> CliResult<(String, Option<Vec<u32>>)> {
    match t.split_once('/') {
        None if t.is_empty() => Err(usage("empty topic name")),
        None => Ok((t.to_owned(), None)),
        Some((topic, ps)) => {
            let list = ps
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<u32>()
                        .map_err(|_| usage(format!("{t:?}: partitions after / must be numbers")))
                })
                .collect::<CliResult<Vec<_>>>()?;
            Ok((topic.to_owned(), Some(list)))
        }
    }
}

/// The partitions `targets` name (all of a topic's without `/P`), in order, deduplicated.
pub(crate) async fn expand_targets(
    client: &Client,
    targets: &[String],
) -> CliResult<Vec<TopicPartition>> {
    let mut out: Vec<TopicPartition> = Vec::new();
    for t in targets {
        let (topic, list) = parse_target(t)?;
        let list = match list {
            Some(l) => l,
            None => client
                .describe_topic(&topic)
                .await?
                .partitions
                .iter()
                .map(|p| p.partition)
                .collect(),
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

/// Writes `data` to `path` atomically: a temp file beside it, fsynced, renamed over it.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::from(e).context(format!("writing {}", path.display()))
    })
}

/// `12s ago` for a commit time; `-` for none.
fn ago(now: i64, t: Option<i64>) -> String {
    match t {
        Some(t) if t > 0 => format!("{} ago", human_ms(u64::try_from(now - t).unwrap_or(0))),
        _ => "-".into(),
    }
}

/// Lag of a partition: `hwm − max(committed, log start)`, none when nothing is committed.
fn lag(committed: Option<u64>, log_start: u64, hwm: u64) -> Option<u64> {
    committed.map(|c| hwm.saturating_sub(c.max(log_start)))
}

/// The group's most recent commit (ms), if it has any.
fn last_commit(committed: &[CommittedOffset]) -> Option<i64> {
    committed
        .iter()
        .filter(|c| c.offset.is_some() && c.commit_time_ms > 0)
        .map(|c| c.commit_time_ms)
        .max()
}

/// Refuses when the group committed within `window` (unless `force`).
fn check_active(
    group: &str,
    what: &str,
    last: Option<i64>,
    now: i64,
    window: Duration,
    force: bool,
) -> CliResult<()> {
    let Some(last) = last else { return Ok(()) };
    let age = u64::try_from(now - last).unwrap_or(0);
    if age >= window.as_millis() as u64 {
        return Ok(());
    }
    if force {
        status!(
            "% group {group:?} committed {} ago; going ahead because of --force",
            human_ms(age)
        );
        return Ok(());
    }
    Err(CliError::Problem(format!(
        "refusing to {what}: group {group:?} committed offsets {} ago (at {}), within \
         --active-window {}, so its consumers may be running and would overwrite the change \
         or keep reading from where they are. Stop them and retry, or pass --force. (Members \
         that joined the group are checked exactly; consumers that only commit are judged by \
         their commit times.)",
        human_ms(age),
        fmt_time(last),
        human_ms(window.as_millis() as u64),
    )))
}

/// Refuses while the group has members (not overridable: the broker would refuse too).
async fn check_members(client: &Client, group: &str, what: &str) -> CliResult<()> {
    let d = client.describe_group(group).await?;
    if d.members.is_empty() {
        return Ok(());
    }
    Err(CliError::Problem(members_refusal(group, what, &d.members)))
}

/// Members listed in a refusal, at most (the rest are counted).
const MAX_MEMBERS_SHOWN: usize = 20;

/// Why `what` is refused while `members` are in the group. A disconnected member (a static
/// member waiting out its session after its consumer stopped) is said to be one, with when its
/// session expires: stopping consumers does not help then, waiting does.
fn members_refusal(group: &str, what: &str, members: &[spool_client::MemberDescription]) -> String {
    let describe = |m: &spool_client::MemberDescription| {
        let id = m.instance_id.clone().unwrap_or_else(|| m.member_id.clone());
        if m.connected {
            id
        } else {
            let left = m.session_timeout.saturating_sub(m.last_heard_ago);
            format!(
                "{id}: disconnected, its session expires in {:.0}s",
                left.as_secs_f64().ceil()
            )
        }
    };
    let mut shown: Vec<String> = members
        .iter()
        .take(MAX_MEMBERS_SHOWN)
        .map(describe)
        .collect();
    if members.len() > MAX_MEMBERS_SHOWN {
        shown.push(format!("and {} more", members.len() - MAX_MEMBERS_SHOWN));
    }
    let connected = members.iter().filter(|m| m.connected).count();
    let advice = if connected == 0 {
        "none is connected (a static member keeps its place until its session expires): wait \
         until then"
    } else {
        "stop them first"
    };
    format!(
        "refusing to {what}: group {group:?} has {} member(s) ({}); {advice} (the broker \
         refuses offset changes from outside the group while it has members)",
        members.len(),
        shown.join(", ")
    )
}

/// The broker's own refusal (a member joined after `check_members`): exit 1 as that check's,
/// not 4, as the exit-code table says for a refused seek.
fn refused_by_members(e: spool_client::Error, what: &str) -> CliError {
    match e {
        spool_client::Error::GroupNotEmpty { group, message } => CliError::Problem(format!(
            "refusing to {what}: group {group:?} has members (they joined meanwhile): {message}; \
             stop them first"
        )),
        e => CliError::Client(e),
    }
}

// ---- describe ----------------------------------------------------------------------------

/// A member as `describe` shows it.
#[derive(Clone, Debug, Serialize)]
struct MemberRow {
    member_id: String,
    instance_id: Option<String>,
    connected: bool,
    partitions: usize,
    revoking: usize,
    last_heard_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
struct PartitionLag {
    topic: String,
    partition: u32,
    current_offset: Option<u64>,
    log_start_offset: Option<u64>,
    log_end_offset: Option<u64>,
    lag: Option<u64>,
    lag_ms: Option<u64>,
    last_commit_ms: Option<i64>,
    /// The member that owns the partition (its instance id if static), if any.
    member: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
struct TopicLag {
    topic: String,
    partitions: usize,
    lag: u64,
    lag_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
struct GroupLag {
    group: String,
    time_ms: i64,
    total_lag: u64,
    lag_ms: Option<u64>,
    last_commit_ms: Option<i64>,
    /// Membership (`Empty` when nobody joined).
    state: String,
    generation: u64,
    members: Vec<MemberRow>,
    partitions: Vec<PartitionLag>,
    topics: Vec<TopicLag>,
}

/// Age (ms) of the record at `offset`, read with a one-batch fetch.
async fn record_age(client: &Client, tp: &TopicPartition, offset: u64, now: i64) -> Option<u64> {
    let opts = FetchOptions {
        max_bytes: 1,
        ..FetchOptions::default()
    };
    let f = client
        .fetch(&tp.topic, tp.partition, offset, &opts)
        .await
        .ok()?;
    let r = f.records.first()?;
    Some(u64::try_from(now - r.timestamp_ms).unwrap_or(0))
}

/// One look at the group; `None` when it has nothing committed and no topic was named.
async fn describe_once(
    client: &Client,
    group: &str,
    topics: &[String],
    sort: DescribeSort,
) -> CliResult<Option<GroupLag>> {
    let committed = client.fetch_offsets(group, &[]).await?;
    let membership = client.describe_group(group).await?;
    let mut owner: HashMap<TopicPartition, String> = HashMap::new();
    for m in &membership.members {
        let name = m.instance_id.clone().unwrap_or_else(|| m.member_id.clone());
        for tp in &m.partitions {
            owner.insert(tp.clone(), name.clone());
        }
    }
    let by_tp: HashMap<TopicPartition, &CommittedOffset> = committed
        .iter()
        .filter(|c| c.offset.is_some())
        .map(|c| (TopicPartition::new(&c.topic, c.partition), c))
        .collect();
    let tps: Vec<TopicPartition> = if topics.is_empty() {
        // What the group committed, and what its members own (a new group may own partitions
        // it has not committed yet).
        let mut v: Vec<_> = by_tp.keys().chain(owner.keys()).cloned().collect();
        v.sort();
        v.dedup();
        v
    } else {
        expand_targets(client, topics).await?
    };
    if tps.is_empty() {
        return Ok(None);
    }
    let bounds = partition_offsets(client, &tps, &[], Isolation::ReadUncommitted).await?;
    let now = now_ms();
    let mut rows: Vec<PartitionLag> = tps
        .iter()
        .zip(&bounds)
        .map(|(tp, b)| {
            let c = by_tp.get(tp);
            let current = c.and_then(|c| c.offset);
            let last = c.map(|c| c.commit_time_ms).filter(|t| *t > 0);
            match b {
                Ok(b) => PartitionLag {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    current_offset: current,
                    log_start_offset: Some(b.log_start),
                    log_end_offset: Some(b.high_watermark),
                    lag: lag(current, b.log_start, b.high_watermark),
                    lag_ms: None,
                    last_commit_ms: last,
                    member: owner.get(tp).cloned(),
                    error: None,
                },
                Err(e) => PartitionLag {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    current_offset: current,
                    log_start_offset: None,
                    log_end_offset: None,
                    lag: None,
                    lag_ms: None,
                    last_commit_ms: last,
                    member: owner.get(tp).cloned(),
                    error: Some(e.to_string()),
                },
            }
        })
        .collect();

    // Lag in time: the age of the oldest unconsumed record of each lagging partition.
    let ages: Vec<Option<u64>> = futures_util::stream::iter(rows.iter().map(|r| {
        let tp = TopicPartition::new(&r.topic, r.partition);
        let from = r
            .current_offset
            .zip(r.log_start_offset)
            .map(|(c, s)| c.max(s));
        let lagging = r.lag.is_some_and(|l| l > 0);
        async move {
            match (lagging, from) {
                (true, Some(from)) => record_age(client, &tp, from, now).await,
                _ => None,
            }
        }
    }))
    .buffered(CONCURRENCY)
    .collect()
    .await;
    for (r, age) in rows.iter_mut().zip(ages) {
        r.lag_ms = match r.lag {
            Some(0) => Some(0),
            Some(_) => age,
            None => None,
        };
    }

    if sort == DescribeSort::Lag {
        rows.sort_by(|a, b| {
            b.lag
                .cmp(&a.lag)
                .then(b.lag_ms.cmp(&a.lag_ms))
                .then_with(|| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)))
        });
    }
    let mut per_topic: BTreeMap<&str, TopicLag> = BTreeMap::new();
    for r in &rows {
        let t = per_topic.entry(&r.topic).or_insert_with(|| TopicLag {
            topic: r.topic.clone(),
            partitions: 0,
            lag: 0,
            lag_ms: None,
        });
        t.partitions += 1;
        t.lag += r.lag.unwrap_or(0);
        t.lag_ms = t.lag_ms.max(r.lag_ms);
    }
    let topics: Vec<TopicLag> = per_topic.into_values().collect();
    Ok(Some(GroupLag {
        group: group.to_owned(),
        time_ms: now,
        total_lag: topics.iter().map(|t| t.lag).sum(),
        lag_ms: topics.iter().filter_map(|t| t.lag_ms).max(),
        last_commit_ms: last_commit(&committed),
        state: format!("{:?}", membership.state),
        generation: membership.generation,
        members: membership
            .members
            .iter()
            .map(|m| MemberRow {
                member_id: m.member_id.clone(),
                instance_id: m.instance_id.clone(),
                connected: m.connected,
                partitions: m.partitions.len(),
                revoking: m.revoking.len(),
                last_heard_ms: m.last_heard_ago.as_millis() as u64,
            })
            .collect(),
        partitions: rows,
        topics,
    }))
}

fn render_describe(g: &GroupLag, out: &mut impl Write) -> std::io::Result<()> {
    let now = g.time_ms;
    writeln!(out, "GROUP        {}", g.group)?;
    writeln!(out, "STATE        {}", g.state)?;
    writeln!(out, "GENERATION   {}", g.generation)?;
    writeln!(out, "MEMBERS      {}", g.members.len())?;
    writeln!(out, "PARTITIONS   {}", g.partitions.len())?;
    writeln!(out, "TOTAL-LAG    {}", g.total_lag)?;
    writeln!(out, "LAG-TIME     {}", opt(g.lag_ms.map(human_ms)))?;
    writeln!(
        out,
        "LAST-COMMIT  {}",
        match g.last_commit_ms {
            Some(t) => format!("{} ({})", fmt_time(t), ago(now, Some(t))),
            None => "-".into(),
        }
    )?;
    writeln!(out)?;
    let mut t = Table::new(&[
        "TOPIC",
        "PARTITION",
        "CURRENT-OFFSET",
        "LOG-START-OFFSET",
        "LOG-END-OFFSET",
        "LAG",
        "LAG-TIME",
        "LAST-COMMIT",
        "MEMBER",
    ]);
    for r in &g.partitions {
        t.row(vec![
            r.topic.clone(),
            r.partition.to_string(),
            opt(r.current_offset),
            opt(r.log_start_offset),
            opt(r.log_end_offset),
            opt(r.lag),
            opt(r.lag_ms.map(human_ms)),
            ago(now, r.last_commit_ms),
            opt(r.member.clone()),
        ]);
    }
    t.write(out)?;
    if !g.members.is_empty() {
        writeln!(out)?;
        let mut t = Table::new(&[
            "MEMBER-ID",
            "INSTANCE-ID",
            "CONNECTED",
            "PARTITIONS",
            "REVOKING",
            "LAST-HEARD",
        ]);
        for m in &g.members {
            t.row(vec![
                m.member_id.clone(),
                opt(m.instance_id.clone()),
                if m.connected { "yes" } else { "no" }.into(),
                m.partitions.to_string(),
                m.revoking.to_string(),
                format!("{} ago", human_ms(m.last_heard_ms)),
            ]);
        }
        t.write(out)?;
    }
    writeln!(out)?;
    let mut t = Table::new(&["TOPIC", "PARTITIONS", "LAG", "LAG-TIME"]);
    for tl in &g.topics {
        t.row(vec![
            tl.topic.clone(),
            tl.partitions.to_string(),
            tl.lag.to_string(),
            opt(tl.lag_ms.map(human_ms)),
        ]);
    }
    t.row(vec![
        "TOTAL".into(),
        g.partitions.len().to_string(),
        g.total_lag.to_string(),
        opt(g.lag_ms.map(human_ms)),
    ]);
    t.write(out)?;
    for r in g.partitions.iter().filter(|r| r.error.is_some()) {
        status!(
            "% {}/{}: {}",
            r.topic,
            r.partition,
            r.error.as_deref().unwrap_or_default()
        );
    }
    Ok(())
}

/// How the total lag moved since the previous draw of `--watch`.
fn trend(prev: Option<(u64, Instant)>, total: u64, now: Instant) -> Option<String> {
    let (before, at) = prev?;
    let secs = now.duration_since(at).as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let delta = total as i128 - before as i128;
    let mut s = format!("lag {before} -> {total} ({delta:+} in {secs:.1}s)");
    if delta < 0 && total > 0 {
        let per_s = (-delta) as f64 / secs;
        let eta = (total as f64 / per_s * 1000.0) as u64;
        s.push_str(&format!(
            ", catching up: ~{} to go at this pace",
            human_ms(eta)
        ));
    } else if total == 0 {
        s.push_str(", caught up");
    } else if delta > 0 {
        s.push_str(", falling behind");
    } else {
        s.push_str(", not moving");
    }
    Some(s)
}

async fn describe(client: &Client, a: DescribeArgs) -> CliResult<ExitCode> {
    let tty = std::io::stdout().is_terminal();
    let mut out = std::io::stdout().lock();
    let mut prev: Option<(u64, Instant)> = None;
    let mut draws = 0u64;
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        let Some(g) = describe_once(client, &a.group, &a.topic, a.sort).await? else {
            status!(
                "spool: group {:?} has no committed offsets (name topics with --topic to see \
                 where it would start)",
                a.group
            );
            return Ok(ExitCode::from(4));
        };
        let mut buf = Vec::new();
        if a.json {
            serde_json::to_writer(&mut buf, &g).map_err(anyhow::Error::from)?;
            buf.push(b'\n');
        } else {
            if let Some(every) = a.watch {
                let now = Instant::now();
                write!(
                    buf,
                    "every {}, {}",
                    human_ms(every.as_millis() as u64),
                    fmt_time(g.time_ms)
                )?;
                if let Some(t) = trend(prev, g.total_lag, now) {
                    write!(buf, "; {t}")?;
                }
                writeln!(buf, "\n")?;
                prev = Some((g.total_lag, now));
            }
            render_describe(&g, &mut buf)?;
        }
        if a.watch.is_some() && !a.json {
            if tty {
                out.write_all(b"\x1b[H\x1b[2J")?;
            } else if draws > 0 {
                out.write_all(b"\n")?;
            }
        }
        out.write_all(&buf)?;
        out.flush()?;
        draws += 1;
        let Some(every) = a.watch else { break };
        if a.watch_count.is_some_and(|n| draws >= n) {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = &mut ctrl_c => break,
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---- list --------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct GroupRow {
    group: String,
    partitions: u32,
    topics: Vec<String>,
    total_lag: Option<u64>,
    last_commit_ms: Option<i64>,
}

async fn list(client: &Client, a: ListArgs) -> CliResult<ExitCode> {
    let groups = client.list_groups().await?;
    let committed: Vec<Vec<CommittedOffset>> = futures_util::stream::iter(
        groups
            .iter()
            .map(|g| async move { client.fetch_offsets(&g.group, &[]).await }),
    )
    .buffered(CONCURRENCY)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    let mut all: Vec<TopicPartition> = committed
        .iter()
        .flatten()
        .map(|c| TopicPartition::new(&c.topic, c.partition))
        .collect();
    all.sort();
    all.dedup();
    let bounds: HashMap<TopicPartition, Bounds> = all
        .iter()
        .cloned()
        .zip(partition_offsets(client, &all, &[], Isolation::ReadUncommitted).await?)
        .filter_map(|(tp, b)| b.ok().map(|b| (tp, b)))
        .collect();
    let mut rows: Vec<GroupRow> = groups
        .iter()
        .zip(&committed)
        .map(|(g, cs)| {
            let lags: Vec<u64> = cs
                .iter()
                .filter_map(|c| {
                    let b = bounds.get(&TopicPartition::new(&c.topic, c.partition))?;
                    lag(c.offset, b.log_start, b.high_watermark)
                })
                .collect();
            GroupRow {
                group: g.group.clone(),
                partitions: g.partitions,
                topics: g.topics.clone(),
                total_lag: (!lags.is_empty()).then(|| lags.iter().sum()),
                last_commit_ms: (g.last_commit_time_ms > 0).then_some(g.last_commit_time_ms),
            }
        })
        .collect();
    match a.sort {
        ListSort::Name => rows.sort_by(|x, y| x.group.cmp(&y.group)),
        ListSort::Lag => {
            rows.sort_by(|x, y| y.total_lag.cmp(&x.total_lag).then(x.group.cmp(&y.group)))
        }
        ListSort::LastCommit => rows.sort_by(|x, y| {
            y.last_commit_ms
                .cmp(&x.last_commit_ms)
                .then(x.group.cmp(&y.group))
        }),
    }
    let mut out = BufWriter::new(std::io::stdout().lock());
    if a.json {
        serde_json::to_writer(&mut out, &rows).map_err(anyhow::Error::from)?;
        writeln!(out)?;
    } else {
        let now = now_ms();
        let mut t = Table::new(&["GROUP", "PARTITIONS", "TOPICS", "TOTAL-LAG", "LAST-COMMIT"]);
        for r in &rows {
            t.row(vec![
                r.group.clone(),
                r.partitions.to_string(),
                r.topics.join(","),
                opt(r.total_lag),
                ago(now, r.last_commit_ms),
            ]);
        }
        t.write(&mut out)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

// ---- seek --------------------------------------------------------------------------------

/// Where `seek --to` moves a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Start,
    End,
    Offset(u64),
    /// First record at or after this time (ms).
    Time(i64),
    /// Relative to the committed offset.
    Shift(i64),
}

fn parse_seek_target(s: &str, now: i64) -> Result<Target, String> {
    let s = s.trim();
    match s.to_ascii_lowercase().as_str() {
        "start" | "earliest" | "beginning" | "oldest" => return Ok(Target::Start),
        "end" | "latest" | "newest" => return Ok(Target::End),
        _ => {}
    }
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if digits(s) {
        return s
            .parse()
            .map(Target::Offset)
            .map_err(|_| format!("offset {s:?} is out of range"));
    }
    if let Some(n) = s.strip_prefix(['+', '-']).filter(|n| digits(n)) {
        let n: i64 = n
            .parse()
            .map_err(|_| format!("shift {s:?} is out of range"))?;
        return Ok(Target::Shift(if s.starts_with('-') { -n } else { n }));
    }
    if let Some(t) = s.strip_prefix('@') {
        return parse_time(t, now, None).map(Target::Time);
    }
    if s.starts_with('-') {
        return parse_time(s, now, None).map(Target::Time);
    }
    Err(format!(
        "invalid --to {s:?}: use start, end, an offset, @TIME (@2026-11-23T10:00:00Z, @-1h), \
         -DURATION (-30m) or a shift +N / -N"
    ))
}

/// The new offset of one partition and, when it was clamped, why.
fn new_offset(
    target: Target,
    prior: Option<u64>,
    b: &Bounds,
) -> Result<(u64, Option<String>), String> {
    let want: i128 = match target {
        Target::Start => b.log_start.into(),
        Target::End => b.high_watermark.into(),
        Target::Offset(n) => n.into(),
        Target::Time(_) => b.at.first().copied().unwrap_or(b.high_watermark).into(),
        // `+0` keeps the committed offset exactly, even outside the log (an open
        // transaction's range past the last stable offset, or below a log start retention
        // moved): `--to +0 --export F` is the undo file, and must restore what was there.
        Target::Shift(0) => match prior {
            Some(p) => return Ok((p, None)),
            None => return Err("has no committed offset to shift from".into()),
        },
        Target::Shift(d) => match prior {
            Some(p) => i128::from(p) + i128::from(d),
            None => return Err("has no committed offset to shift from".into()),
        },
    };
    let (lo, hi) = (
        i128::from(b.log_start),
        i128::from(b.high_watermark.max(b.log_start)),
    );
    let clamped = want.clamp(lo, hi);
    let note = (clamped != want).then(|| {
        format!(
            "{want} is outside [{lo}, {hi}]; using the log {}",
            if want < lo { "start" } else { "end" }
        )
    });
    Ok((clamped as u64, note))
}

/// Parses `topic,partition,offset` lines (or rpk's `topic partition offset`); `#` comments,
/// blank lines and a `topic,partition,offset` header are skipped.
fn parse_offsets_file(text: &str) -> Result<Vec<(TopicPartition, u64)>, String> {
    let mut out: Vec<(TopicPartition, u64)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = if line.contains(',') {
            let mut f: Vec<&str> = line.rsplitn(3, ',').map(str::trim).collect();
            f.reverse();
            f
        } else {
            line.split_whitespace().collect()
        };
        let [topic, partition, offset] = fields[..] else {
            return Err(format!(
                "line {n}: expected topic,partition,offset, got {line:?}"
            ));
        };
        if topic.eq_ignore_ascii_case("topic") && partition.eq_ignore_ascii_case("partition") {
            continue;
        }
        let partition: u32 = partition
            .parse()
            .map_err(|_| format!("line {n}: partition {partition:?} is not a number"))?;
        let offset: u64 = offset
            .parse()
            .map_err(|_| format!("line {n}: offset {offset:?} is not a number"))?;
        if topic.is_empty() {
            return Err(format!("line {n}: empty topic"));
        }
        let tp = TopicPartition::new(topic, partition);
        if out.iter().any(|(t, _)| *t == tp) {
            return Err(format!("line {n}: {topic}/{partition} appears twice"));
        }
        out.push((tp, offset));
    }
    if out.is_empty() {
        return Err("no offsets in the file".into());
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
struct PlanRow {
    topic: String,
    partition: u32,
    prior_offset: Option<u64>,
    new_offset: u64,
    log_start_offset: u64,
    log_end_offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    current_offset: Option<u64>,
    #[serde(skip)]
    metadata: String,
}

async fn seek(client: &Client, a: SeekArgs) -> CliResult<ExitCode> {
    let now = now_ms();
    let committed = client.fetch_offsets(&a.group, &[]).await?;
    let by_tp: HashMap<TopicPartition, &CommittedOffset> = committed
        .iter()
        .filter(|c| c.offset.is_some())
        .map(|c| (TopicPartition::new(&c.topic, c.partition), c))
        .collect();

    // Scope and, per partition, the target.
    let (tps, targets): (Vec<TopicPartition>, Vec<Target>) = if let Some(f) = &a.from_file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        parse_offsets_file(&text)
            .map_err(|e| usage(format!("{}: {e}", f.display())))?
            .into_iter()
            .map(|(tp, o)| (tp, Target::Offset(o)))
            .unzip()
    } else {
        let target = parse_seek_target(a.to.as_deref().unwrap_or_default(), now).map_err(usage)?;
        let tps = if a.topic.is_empty() {
            let mut v: Vec<_> = by_tp.keys().cloned().collect();
            v.sort();
            v
        } else {
            expand_targets(client, &a.topic).await?
        };
        let n = tps.len();
        (tps, vec![target; n])
    };
    if tps.is_empty() {
        status!(
            "spool: group {:?} has no committed offsets; name the partitions to seek with \
             --topic (or --from-file)",
            a.group
        );
        return Ok(ExitCode::from(4));
    }
    let time = targets.iter().find_map(|t| match t {
        Target::Time(t) => Some(*t),
        _ => None,
    });
    if let Some(t) = time {
        status!("% --to time {}", fmt_time(t));
    }
    let bounds = partition_offsets(
        client,
        &tps,
        time.as_slice(),
        // `end` is the last stable offset: seeking past an open transaction's records would
        // skip them once it commits.
        Isolation::ReadCommitted,
    )
    .await?;
    let mut plan = Vec::with_capacity(tps.len());
    for ((tp, target), b) in tps.iter().zip(&targets).zip(bounds) {
        let b = b?;
        let c = by_tp.get(tp);
        let prior = c.and_then(|c| c.offset);
        let (new, note) = new_offset(*target, prior, &b)
            .map_err(|e| usage(format!("{}/{} {e}", tp.topic, tp.partition)))?;
        if let Some(note) = note {
            status!("% {}/{}: {note}", tp.topic, tp.partition);
        }
        plan.push(PlanRow {
            topic: tp.topic.clone(),
            partition: tp.partition,
            prior_offset: prior,
            new_offset: new,
            log_start_offset: b.log_start,
            log_end_offset: b.high_watermark,
            current_offset: None,
            metadata: c.map(|c| c.metadata.clone()).unwrap_or_default(),
        });
    }

    if let Some(path) = &a.export {
        let mut csv = String::new();
        for r in &plan {
            csv.push_str(&format!("{},{},{}\n", r.topic, r.partition, r.new_offset));
        }
        write_atomic(path, csv.as_bytes())?;
        status!("% plan written to {}", path.display());
    }

    let last = last_commit(&committed);
    let mut out = BufWriter::new(std::io::stdout().lock());
    if !a.execute {
        if a.json {
            let v = serde_json::json!({"group": a.group, "executed": false, "partitions": plan});
            writeln!(out, "{v}")?;
        } else {
            let mut t = Table::new(&[
                "TOPIC",
                "PARTITION",
                "PRIOR-OFFSET",
                "NEW-OFFSET",
                "LOG-START-OFFSET",
                "LOG-END-OFFSET",
            ]);
            for r in &plan {
                t.row(vec![
                    r.topic.clone(),
                    r.partition.to_string(),
                    opt(r.prior_offset),
                    r.new_offset.to_string(),
                    r.log_start_offset.to_string(),
                    r.log_end_offset.to_string(),
                ]);
            }
            t.write(&mut out)?;
        }
        out.flush()?;
        if let Err(CliError::Problem(m)) = check_members(client, &a.group, "seek").await {
            status!("% note: --execute would fail now: {m}");
        } else if let Err(CliError::Problem(m)) =
            check_active(&a.group, "seek", last, now, a.active_window, a.force)
        {
            status!("% note: --execute would fail now: {m}");
        }
        status!("% dry run: nothing changed; add --execute to commit these offsets");
        return Ok(ExitCode::SUCCESS);
    }

    check_members(client, &a.group, "seek").await?;
    check_active(&a.group, "seek", last, now, a.active_window, a.force)?;
    let commits: Vec<OffsetCommit> = plan
        .iter()
        .map(|r| OffsetCommit {
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.new_offset,
            metadata: r.metadata.clone(),
        })
        .collect();
    client
        .commit_offsets(&a.group, &commits)
        .await
        .map_err(|e| refused_by_members(e, "seek"))?;
    let after = client.fetch_offsets(&a.group, &tps).await?;
    for (r, c) in plan.iter_mut().zip(after) {
        r.current_offset = c.offset;
    }
    if a.json {
        let v = serde_json::json!({"group": a.group, "executed": true, "partitions": plan});
        writeln!(out, "{v}")?;
    } else {
        let mut t = Table::new(&["TOPIC", "PARTITION", "PRIOR-OFFSET", "CURRENT-OFFSET"]);
        for r in &plan {
            t.row(vec![
                r.topic.clone(),
                r.partition.to_string(),
                opt(r.prior_offset),
                opt(r.current_offset),
            ]);
        }
        t.write(&mut out)?;
    }
    out.flush()?;
    status!(
        "% committed {} offset(s) for group {:?} in one request; consumers pick them up when \
         they (re)start from the committed offsets",
        plan.len(),
        a.group
    );
    Ok(ExitCode::SUCCESS)
}

// ---- delete ------------------------------------------------------------------------------

async fn delete(client: &Client, a: DeleteArgs) -> CliResult<ExitCode> {
    let committed = client.fetch_offsets(&a.group, &[]).await?;
    let scoped: Vec<CommittedOffset> = committed
        .into_iter()
        .filter(|c| a.topic.is_empty() || a.topic.contains(&c.topic))
        .collect();
    check_members(client, &a.group, "delete").await?;
    check_active(
        &a.group,
        "delete",
        last_commit(&scoped),
        now_ms(),
        a.active_window,
        a.force,
    )?;
    let d = client
        .delete_group(&a.group, &a.topic)
        .await
        .map_err(|e| refused_by_members(e, "delete"))?;
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({"group": d.group, "partitions_deleted": d.partitions_deleted});
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "deleted {} committed offset(s) of group {}",
            d.partitions_deleted, d.group
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000_000;

    fn b(lso: u64, hwm: u64, at: &[u64]) -> Bounds {
        Bounds {
            log_start: lso,
            high_watermark: hwm,
            at: at.to_vec(),
        }
    }

    #[test]
    fn lag_accounts_for_retention() {
        assert_eq!(lag(Some(40), 0, 100), Some(60));
        assert_eq!(lag(Some(40), 70, 100), Some(30));
        assert_eq!(lag(Some(100), 0, 100), Some(0));
        assert_eq!(lag(Some(150), 0, 100), Some(0));
        assert_eq!(lag(None, 0, 100), None);
    }

    #[test]
    fn seek_targets() {
        let t = |s| parse_seek_target(s, NOW).unwrap();
        assert_eq!(t("start"), Target::Start);
        assert_eq!(t("END"), Target::End);
        assert_eq!(t("42"), Target::Offset(42));
        assert_eq!(t("+5"), Target::Shift(5));
        assert_eq!(t("-5"), Target::Shift(-5));
        assert_eq!(t("-1h"), Target::Time(NOW - 3_600_000));
        assert_eq!(t("@-1h"), Target::Time(NOW - 3_600_000));
        assert_eq!(t("@2026-11-23T10:00:00Z"), Target::Time(1_795_428_000_000));
        assert!(parse_seek_target("soon", NOW).is_err());
        assert!(parse_seek_target("", NOW).is_err());
    }

    #[test]
    fn the_brokers_members_refusal_exits_1_as_the_checks() {
        let e = spool_client::Error::GroupNotEmpty {
            group: "g".into(),
            message: "member m-1 joined".into(),
        };
        let e = refused_by_members(e, "seek");
        assert_eq!(e.code(), 1);
        assert!(e.to_string().contains("refusing to seek"), "{e}");
        let other = refused_by_members(spool_client::Error::NoGroup, "seek");
        assert_eq!(other.code(), 4);
    }

    #[test]
    fn new_offsets_clamp_into_the_log() {
        let bounds = b(10, 100, &[55]);
        let n = |t, p| new_offset(t, p, &bounds).unwrap();
        assert_eq!(n(Target::Start, Some(50)), (10, None));
        assert_eq!(n(Target::End, None), (100, None));
        assert_eq!(n(Target::Offset(20), None), (20, None));
        assert_eq!(n(Target::Time(0), Some(1)), (55, None));
        assert_eq!(n(Target::Shift(-5), Some(50)), (45, None));
        let (o, note) = n(Target::Shift(-100), Some(50));
        assert_eq!(o, 10);
        assert!(note.unwrap().contains("log start"));
        let (o, note) = n(Target::Offset(500), None);
        assert_eq!(o, 100);
        assert!(note.unwrap().contains("log end"));
        assert!(new_offset(Target::Shift(1), None, &bounds).is_err());
        // +0 keeps a committed offset exactly, even outside the log: the undo file.
        assert_eq!(n(Target::Shift(0), Some(120)), (120, None));
        assert_eq!(n(Target::Shift(0), Some(3)), (3, None));
        assert_eq!(n(Target::Shift(0), Some(50)), (50, None));
        assert!(new_offset(Target::Shift(0), None, &bounds).is_err());
    }

    #[test]
    fn offsets_files() {
        let f = parse_offsets_file(
            "# plan\ntopic,partition,offset\nevents,0,5\n\nevents, 1 ,7\nrpk-style 2 9\n",
        )
        .unwrap();
        assert_eq!(
            f,
            vec![
                (TopicPartition::new("events", 0), 5),
                (TopicPartition::new("events", 1), 7),
                (TopicPartition::new("rpk-style", 2), 9),
            ]
        );
        assert!(parse_offsets_file("events,0").is_err());
        assert!(parse_offsets_file("events,x,1").is_err());
        assert!(parse_offsets_file("e,0,1\ne,0,2").is_err());
        assert!(parse_offsets_file("# nothing\n").is_err());
    }

    #[test]
    fn active_window() {
        let w = Duration::from_secs(60);
        assert!(check_active("g", "seek", None, NOW, w, false).is_ok());
        assert!(check_active("g", "seek", Some(NOW - 120_000), NOW, w, false).is_ok());
        let e = check_active("g", "seek", Some(NOW - 5_000), NOW, w, false).unwrap_err();
        assert_eq!(e.code(), 1);
        assert!(e.to_string().contains("5.0s ago"), "{e}");
        assert!(check_active("g", "seek", Some(NOW - 5_000), NOW, w, true).is_ok());
    }

    #[test]
    fn watch_trend() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(trend(None, 5, t1), None);
        let s = trend(Some((100, t0)), 80, t1).unwrap();
        assert!(
            s.contains("-20 in 2.0s") && s.contains("~8.0s to go"),
            "{s}"
        );
        assert!(trend(Some((1, t0)), 0, t1).unwrap().contains("caught up"));
        assert!(
            trend(Some((1, t0)), 9, t1)
                .unwrap()
                .contains("falling behind")
        );
    }
}
