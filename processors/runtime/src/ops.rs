//! Operating processors from outside (the `spool processor …` and `spool dlq …` commands):
//! list processors with their lag and progress, pause and resume them or one lane, list,
//! read and redrive dead letters, skip a record a partition is stuck on.
//!
//! A processor is a group with a control topic (`<group>.control`, created by the runtime
//! at start). Pauses and skips are records in that topic ([`crate::control`]); every
//! instance follows it, and reads it whole before processing after a restart.
//!
//! Redrive streams a dead-letter topic, one partition after the other, from `from` (default:
//! its start) to its end as of the start of the command, keeps the records matching the
//! filter, and produces each one (key, value and its own headers; the `spool_*` ones
//! removed) to its original topic and partition, to the group's first retry topic (with the
//! retry headers of its original position, as attempt 1 due at once: [`DeadLetter::for_retry`]),
//! or to a named topic, at most `rate_per_sec` per second, in the dead-letter partition's order.
//! Memory is bounded whatever the topic's size: one fetch of at most [`REDRIVE_FETCH_BYTES`]
//! at a time and at most `in_flight` records sent and not yet acknowledged. The dead letters
//! stay where they are; the report gives, per partition, the offset to continue from (a
//! `limit` stops the redrive at the first record past it). Redriving the same records twice
//! sends them twice: handlers with external effects recognise repeats by their idempotency
//! keys ([`crate::Context::effect`]).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use spool_client::{
    Client, FetchOptions, Header, Isolation, OffsetSpec, ProducerConfig, ProducerRecord, Record,
    TopicPartition,
};

use crate::control::{self, Control};
use crate::engine::{self, Attempt, headers};

/// A processor as `spool processor list` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessorStatus {
    /// Name (its group).
    pub name: String,
    /// Group state (`stable`, `rebalancing`, `empty`).
    pub state: String,
    /// Members (running instances).
    pub members: usize,
    /// Input topics (those it committed offsets for).
    pub topics: Vec<String>,
    /// Offsets processed (committed offsets minus log starts, summed).
    pub done: u64,
    /// Offsets waiting (high watermark minus committed offset, summed): Kafka's consumer
    /// lag. Transaction markers and aborted records take offsets, so this is an upper bound
    /// on the records left to process.
    pub lag: u64,
    /// The whole processor is paused.
    pub paused: bool,
    /// Paused lanes.
    pub paused_lanes: Vec<String>,
    /// Records to skip that operators asked for.
    pub skips: usize,
}

/// Every processor (group with a control topic), with its lag.
pub async fn processors(client: &Client) -> spool_client::Result<Vec<ProcessorStatus>> {
    let topics = client.list_topics().await?;
    let mut out = Vec::new();
    for t in &topics {
        let Some(name) = t.topic.strip_suffix(".control") else {
            continue;
        };
        out.push(status(client, name).await?);
    }
    Ok(out)
}

/// One processor's status.
pub async fn status(client: &Client, name: &str) -> spool_client::Result<ProcessorStatus> {
    let (c, _) = control::load(client, &control::control_topic(name)).await?;
    let group = client.describe_group(name).await?;
    let summary = client
        .list_groups()
        .await?
        .into_iter()
        .find(|g| g.group == name);
    let topics: Vec<String> = summary.map(|s| s.topics).unwrap_or_default();
    let mut tps = Vec::new();
    for t in &topics {
        let n = client
            .describe_topic(t)
            .await
            .map(|d| d.partitions.len())
            .unwrap_or(0);
        tps.extend((0..n as u32).map(|p| TopicPartition::new(t.as_str(), p)));
    }
    let (done, lag) = progress(client, name, &tps).await?;
    Ok(ProcessorStatus {
        name: name.to_owned(),
        state: format!("{:?}", group.state).to_ascii_lowercase(),
        members: group.members.len(),
        topics,
        done,
        lag,
        paused: c.paused,
        paused_lanes: c.paused_lanes.into_iter().collect(),
        skips: c.skips.len(),
    })
}

/// (done, lag) of a group over partitions, in offsets: committed − log start, high
/// watermark − committed.
pub async fn progress(
    client: &Client,
    group: &str,
    tps: &[TopicPartition],
) -> spool_client::Result<(u64, u64)> {
    if tps.is_empty() {
        return Ok((0, 0));
    }
    let committed = client.fetch_offsets(group, tps).await?;
    let mut q = Vec::new();
    for tp in tps {
        q.push((tp.clone(), OffsetSpec::Earliest));
        q.push((tp.clone(), OffsetSpec::Latest));
    }
    let bounds = client.list_offsets(&q).await?;
    let (mut done, mut lag) = (0, 0);
    for (i, c) in committed.iter().enumerate() {
        let start = bounds[2 * i].as_ref().map_or(0, |o| o.offset);
        let end = bounds[2 * i + 1].as_ref().map_or(0, |o| o.offset);
        let pos = c.offset.unwrap_or(start).max(start);
        done += pos - start;
        lag += end.saturating_sub(pos);
    }
    Ok((done, lag))
}

/// Pauses (or resumes) a processor, or one lane of it. Takes effect within a tick on every
/// instance, and survives restarts.
pub async fn pause(
    client: &Client,
    name: &str,
    lane: Option<&str>,
    paused: bool,
) -> spool_client::Result<()> {
    let mut r = ProducerRecord::default().key(control::pause_key(lane));
    r.value = paused.then(|| Bytes::from_static(b"paused"));
    write_control(client, name, r).await
}

/// Asks a processor to give up on one record (it goes to the dead-letter topic): unblocks a
/// partition retrying it in place.
pub async fn skip(
    client: &Client,
    name: &str,
    topic: &str,
    partition: u32,
    offset: u64,
    reason: &str,
) -> spool_client::Result<()> {
    let r = ProducerRecord::new(reason.to_owned()).key(control::skip_key(topic, partition, offset));
    write_control(client, name, r).await
}

async fn write_control(client: &Client, name: &str, r: ProducerRecord) -> spool_client::Result<()> {
    let topic = control::control_topic(name);
    client.describe_topic(&topic).await?;
    let p = client.producer(ProducerConfig::default());
    let f = p.send_to(&topic, 0, r).await?;
    p.close().await;
    f.await?;
    Ok(())
}

/// What the control topic of a processor says.
pub async fn control_state(client: &Client, name: &str) -> spool_client::Result<Control> {
    Ok(control::load(client, &control::control_topic(name))
        .await?
        .0)
}

/// Most records `dlq list` counts per topic (it reads them all to count them).
pub const DLQ_COUNT_LIMIT: u64 = 10_000_000;

/// A dead-letter topic in a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DlqSummary {
    /// The topic (`<source>.<group>.dlq`).
    pub topic: String,
    /// Committed dead letters in it (read committed, every partition; transaction markers
    /// and aborted records are not counted).
    pub records: u64,
    /// False when counting stopped at [`DLQ_COUNT_LIMIT`] (`records` is then a lower bound).
    pub complete: bool,
}

/// Dead-letter topics (names ending in `.dlq`; of one group if given), with their records
/// counted.
pub async fn dlq_topics(
    client: &Client,
    group: Option<&str>,
) -> spool_client::Result<Vec<DlqSummary>> {
    let mut out = Vec::new();
    for t in client.list_topics().await? {
        let Some(rest) = t.topic.strip_suffix(".dlq") else {
            continue;
        };
        if let Some(g) = group
            && !rest.ends_with(&format!(".{g}"))
        {
            continue;
        }
        let mut records = 0u64;
        visit_committed(client, &t.topic, None, DLQ_COUNT_LIMIT, |_| records += 1).await?;
        out.push(DlqSummary {
            topic: t.topic,
            records,
            complete: records < DLQ_COUNT_LIMIT,
        });
    }
    Ok(out)
}

/// A dead letter, read back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Partition of the dead-letter topic.
    pub partition: u32,
    /// Offset in it.
    pub offset: u64,
    /// Key (lossy UTF-8 for display; `redrive` sends the bytes).
    pub key: Option<String>,
    /// Value (lossy UTF-8 for display).
    pub value: Option<String>,
    /// The original topic.
    pub topic: Option<String>,
    /// The original partition.
    pub source_partition: Option<u32>,
    /// The original offset.
    pub source_offset: Option<u64>,
    /// The group that gave up.
    pub group: Option<String>,
    /// Attempts made.
    pub attempts: Option<u32>,
    /// The last error.
    pub error: Option<String>,
    /// When (ms).
    pub time_ms: Option<i64>,
    /// Every attempt.
    pub history: Vec<Attempt>,
    #[serde(skip)]
    record: Record,
}

fn header(r: &Record, name: &str) -> Option<String> {
    r.headers
        .iter()
        .rev()
        .find(|h| h.key == name)
        .and_then(|h| std::str::from_utf8(h.value.as_deref()?).ok())
        .map(str::to_owned)
}

impl DeadLetter {
    /// Reads a dead-letter record's headers.
    pub fn from_record(r: Record) -> DeadLetter {
        let text = |b: &Option<Bytes>| b.as_deref().map(|v| String::from_utf8_lossy(v).to_string());
        DeadLetter {
            partition: r.partition,
            offset: r.offset,
            key: text(&r.key),
            value: text(&r.value),
            topic: header(&r, headers::DLQ_TOPIC),
            source_partition: header(&r, headers::DLQ_PARTITION).and_then(|v| v.parse().ok()),
            source_offset: header(&r, headers::DLQ_OFFSET).and_then(|v| v.parse().ok()),
            group: header(&r, headers::DLQ_GROUP),
            attempts: header(&r, headers::DLQ_ATTEMPTS).and_then(|v| v.parse().ok()),
            error: header(&r, headers::DLQ_ERROR),
            time_ms: header(&r, headers::DLQ_TIME).and_then(|v| v.parse().ok()),
            history: header(&r, headers::DLQ_HISTORY)
                .and_then(|h| serde_json::from_str(&h).ok())
                .unwrap_or_default(),
            record: r,
        }
    }

    /// The record to send back: key, value, timestamp and the headers it came with.
    pub fn original(&self) -> ProducerRecord {
        ProducerRecord {
            key: self.record.key.clone(),
            value: self.record.value.clone(),
            headers: self
                .record
                .headers
                .iter()
                .filter(|h| !h.key.starts_with(headers::PREFIX))
                .cloned()
                .collect::<Vec<Header>>(),
            timestamp_ms: Some(self.record.timestamp_ms),
        }
    }

    /// The record to send to a retry topic of its group: [`DeadLetter::original`] plus the
    /// retry headers the runtime reads, so that it is handled as the record at its original
    /// topic, partition and offset (its dead letter, if it fails again, and `spool dlq skip`
    /// name that position), as attempt 1 (the retry policy starts over), due at once
    /// (`spool_retry_due_ms` = 0, so that a clock of the machine running the redrive ahead
    /// of the processor's cannot hold it back), with no history. `None` if the letter does
    /// not say where it came from (no `spool_dlq_topic` / `spool_dlq_offset`).
    pub fn for_retry(&self) -> Option<ProducerRecord> {
        let info = engine::RetryInfo {
            attempt: 1,
            due_ms: 0,
            topic: self.topic.clone()?,
            offset: self.source_offset?,
            history: Vec::new(),
        };
        let mut r = self.original();
        let partition = self.source_partition.unwrap_or(self.partition);
        engine::push_retry_headers(&mut r, &info, partition);
        Some(r)
    }
}

/// Dead letters of `topic` (every partition, read committed) from `from` per partition
/// (default: the start) to the end as of now, at most `limit`.
pub async fn read_dead_letters(
    client: &Client,
    topic: &str,
    from: Option<u64>,
    limit: usize,
) -> spool_client::Result<Vec<DeadLetter>> {
    let mut out = Vec::new();
    visit_committed(client, topic, from, limit as u64, |r| {
        out.push(DeadLetter::from_record(r))
    })
    .await?;
    out.sort_by_key(|d| (d.time_ms, d.partition, d.offset));
    Ok(out)
}

/// Calls `f` on the committed records of `topic` (every partition in turn, read committed)
/// from `from` per partition (default: the start) to the high watermark as of the call, at
/// most `limit` in all.
async fn visit_committed(
    client: &Client,
    topic: &str,
    from: Option<u64>,
    limit: u64,
    mut f: impl FnMut(Record),
) -> spool_client::Result<()> {
    let d = client.describe_topic(topic).await?;
    let opts = FetchOptions {
        isolation: Isolation::ReadCommitted,
        ..FetchOptions::default()
    };
    let mut seen = 0u64;
    for p in &d.partitions {
        let end = p.high_watermark;
        let mut offset = from.unwrap_or(p.log_start_offset).max(p.log_start_offset);
        while offset < end && seen < limit {
            let fetched = client.fetch(topic, p.partition, offset, &opts).await?;
            for r in fetched.records {
                if r.offset < end && seen < limit {
                    seen += 1;
                    f(r);
                }
            }
            if fetched.next_offset <= offset {
                break;
            }
            offset = fetched.next_offset;
        }
    }
    Ok(())
}

/// Where redriven records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedriveTarget {
    /// Their original topic and partition.
    Source,
    /// The group's first retry topic (`<source>.<group>.retry-1`), same partition.
    Retry,
    /// A named topic, same partition number.
    Topic(String),
}

/// How to redrive.
#[derive(Clone, Debug)]
pub struct RedriveOptions {
    /// Where to.
    pub target: RedriveTarget,
    /// At most this many records per second (`None`: as fast as possible).
    pub rate_per_sec: Option<u32>,
    /// Only records whose error contains this.
    pub error_contains: Option<String>,
    /// Only records from this original topic.
    pub source_topic: Option<String>,
    /// Start offset in every partition of the dead-letter topic (default: its start).
    pub from: Option<u64>,
    /// At most this many records.
    pub limit: usize,
    /// Only report what would be sent.
    pub dry_run: bool,
    /// At most this many records sent and not yet acknowledged (default 1000; at least 1).
    pub in_flight: usize,
}

/// The largest fetch a redrive makes (one at a time).
pub const REDRIVE_FETCH_BYTES: u32 = 1 << 20;

impl Default for RedriveOptions {
    fn default() -> Self {
        RedriveOptions {
            target: RedriveTarget::Source,
            rate_per_sec: None,
            error_contains: None,
            source_topic: None,
            from: None,
            limit: usize::MAX,
            dry_run: false,
            in_flight: 1000,
        }
    }
}

/// What a redrive did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RedriveReport {
    /// Dead letters read.
    pub read: usize,
    /// Sent (or, in a dry run, that would be).
    pub sent: usize,
    /// Per destination topic.
    pub per_topic: BTreeMap<String, usize>,
    /// Per partition of the dead-letter topic, the offset after the last record read.
    pub next_offsets: BTreeMap<u32, u64>,
    /// The most records that were sent and not yet acknowledged at once (≤ `in_flight`).
    pub peak_in_flight: usize,
}

/// Redrives dead letters (see the [module docs](self)).
pub async fn redrive(
    client: &Client,
    dlq: &str,
    opts: &RedriveOptions,
) -> spool_client::Result<RedriveReport> {
    let d = client.describe_topic(dlq).await?;
    let fetch = FetchOptions {
        isolation: Isolation::ReadCommitted,
        max_bytes: REDRIVE_FETCH_BYTES,
        ..FetchOptions::default()
    };
    let mut report = RedriveReport::default();
    let producer = client.producer(ProducerConfig::default());
    let mut pace = opts.rate_per_sec.map(|r| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(r.max(1))));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let window = opts.in_flight.max(1);
    let mut pending = VecDeque::with_capacity(window.min(4096));
    'partitions: for p in &d.partitions {
        let end = p.high_watermark;
        let mut offset = opts
            .from
            .unwrap_or(p.log_start_offset)
            .max(p.log_start_offset);
        while offset < end {
            let fetched = client.fetch(dlq, p.partition, offset, &fetch).await?;
            for r in fetched.records {
                if r.offset >= end {
                    break;
                }
                if report.sent >= opts.limit {
                    break 'partitions;
                }
                report.read += 1;
                report.next_offsets.insert(p.partition, r.offset + 1);
                let letter = DeadLetter::from_record(r);
                let Some((topic, partition)) = redrive_to(&letter, opts) else {
                    continue;
                };
                report.sent += 1;
                *report.per_topic.entry(topic.clone()).or_default() += 1;
                if opts.dry_run {
                    continue;
                }
                if let Some(p) = &mut pace {
                    p.tick().await;
                }
                if pending.len() >= window
                    && let Some(oldest) = pending.pop_front()
                {
                    oldest.await?;
                }
                let record = match opts.target {
                    // A retry topic: with its original position (else the runtime would take
                    // the retry topic's offset for the source's).
                    RedriveTarget::Retry => letter.for_retry(),
                    RedriveTarget::Source | RedriveTarget::Topic(_) => None,
                }
                .unwrap_or_else(|| letter.original());
                pending.push_back(producer.send_to(&topic, partition, record).await?);
                report.peak_in_flight = report.peak_in_flight.max(pending.len());
            }
            if fetched.next_offset <= offset {
                break;
            }
            offset = fetched.next_offset;
        }
    }
    producer.close().await;
    for f in pending {
        f.await?;
    }
    Ok(report)
}

/// Where a dead letter goes back to (topic, partition), if it passes the filter.
fn redrive_to(d: &DeadLetter, opts: &RedriveOptions) -> Option<(String, u32)> {
    if let Some(e) = &opts.error_contains
        && !d.error.as_deref().unwrap_or_default().contains(e.as_str())
    {
        return None;
    }
    let source = d.topic.clone()?;
    if opts.source_topic.as_ref().is_some_and(|t| *t != source) {
        return None;
    }
    let partition = d.source_partition.unwrap_or(d.partition);
    let topic = match &opts.target {
        RedriveTarget::Source => source,
        RedriveTarget::Retry => {
            let group = d.group.clone().unwrap_or_default();
            engine::retry_topic(&source, &group, 1)
        }
        RedriveTarget::Topic(t) => t.clone(),
    };
    Some((topic, partition))
}
