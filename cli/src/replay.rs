//! `spool replay`: print a bounded range of history, or copy it into another topic.
//!
//! The range uses tail's `-o` grammar and always ends: a spec without an end ends at `end`,
//! the high watermark when the command started (and never past it), so a copy is a fixed
//! `[start, end)` per partition, resolved up front in one ListOffsets request (times through
//! the broker's time index). Reading is `Client::fetch` in a loop, one bounded chunk per
//! partition in turn; nothing joins or commits for a group, so no group's offsets move.
//!
//! Copying (`--to-topic`) keeps each record's key, value, headers and timestamp, and sends it
//! to the same partition number when the destination has enough partitions (else by key hash;
//! `--partitioning`). Records are produced with `acks=durable`; a record counts as copied
//! only once acknowledged, per source partition in offset order; an offset that holds no
//! record for a read-committed reader (a transaction marker, an aborted record, a compaction
//! gap) counts as copied once every record before it in its partition is, so a range ending
//! on one completes. That is what the
//! progress, the "next offset" report and the `--resume-file` checkpoint (written atomically,
//! at most twice a second and at the end) say. So a resumed copy neither skips nor repeats
//! what was acknowledged before a clean stop (the end, `-n`, Ctrl-C, an error). One limit:
//! after a hard kill, records acknowledged since the last checkpoint (half a second's worth)
//! are copied again. A batch the producer retried after a timeout is not duplicated: the
//! producer is idempotent (the client's default), so the broker recognises the retry.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use spool_client::{
    Client, DeliveryFuture, FetchOptions, Producer, ProducerConfig, ProducerRecord, Record,
};
use tokio::sync::{mpsc, watch};

use crate::exit::{CliError, CliResult, usage};
use crate::format::{Encoding, Output};
use crate::group::{expand_targets, now_ms, parse_target, partition_offsets, write_atomic};
use crate::position::{End, Range, Start, fmt_time};
use crate::table::{Table, human_bytes, human_ms};

/// Bytes asked for per fetch.
const FETCH_BYTES: u32 = 1 << 20;
/// Records sent but not yet acknowledged, at most (the producer's buffer bounds bytes too).
const MAX_IN_FLIGHT: usize = 16 * 1024;
/// Checkpoints are written at most this often (and at the end).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// Exit code after Ctrl-C (128 + SIGINT), so scripts can tell an unfinished copy.
const EXIT_INTERRUPTED: u8 = 130;

/// Where copied records go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Partitioning {
    /// `same` when the destination has enough partitions, else `key`.
    Auto,
    /// The source record's partition number.
    Same,
    /// By key hash (murmur2, as produce); null keys round robin.
    Key,
}

/// Print a range of history, or copy it into another topic (resumable, rate-limited)
///
/// The range (-o) uses tail's grammar and always ends: start | end | N | +N | -N | @TIME,
/// optionally :END; without an end it stops at the end as it was when the command started.
/// Replay never reads as a group, so no group's offsets move.
///
/// Copying (--to-topic) keeps keys, headers and timestamps, goes to the same partition
/// number when the destination has enough partitions (else by key hash), waits for durable
/// acknowledgements, and on completion or Ctrl-C prints each partition's next offset and a
/// command that resumes. With --resume-file, progress is checkpointed to the file and a
/// rerun with the same file continues where the acknowledged copy stopped. Exit code 130
/// after Ctrl-C.
///
/// Examples:
///   spool replay events -o @-1h                            print the last hour, then exit
///   spool replay events/0 -o 100:200 -f '%o %k %v\n'
///   spool replay events -o @2026-11-22:1d --to-topic events-nov22 --dry-run
///   spool replay events -o @2026-11-22:1d --to-topic events-nov22 --rate 5000/s \
///       --resume-file nov22.resume
///   spool replay events --resume-file nov22.resume --to-topic events-nov22   continue
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub(crate) struct ReplayArgs {
    /// SRC, SRC/PARTITION or SRC/P1,P2.
    source: String,
    /// The range (see above); required unless --resume-file names an existing file.
    #[arg(long, short = 'o', value_name = "SPEC", allow_hyphen_values = true)]
    offset: Option<String>,
    /// Copy into this topic (it must exist) instead of printing.
    #[arg(long, value_name = "DST")]
    to_topic: Option<String>,
    /// Destination partition of each record.
    #[arg(long, value_enum, default_value = "auto", requires = "to_topic")]
    partitioning: Partitioning,
    /// At most this many records per second, e.g. 500, 500/s, 3000/m (a token bucket).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    rate: Option<f64>,
    /// Print the per-partition plan (start, end, record estimate) and stop; writes nothing.
    #[arg(long)]
    dry_run: bool,
    /// Checkpoint progress in FILE (atomically); if it exists, continue from it (the range
    /// recorded there wins over -o).
    #[arg(long, value_name = "FILE", requires = "to_topic")]
    resume_file: Option<PathBuf>,
    /// Stop after this many records (a copy can be resumed afterwards).
    #[arg(long, short = 'n')]
    num: Option<u64>,
    /// Copying: show progress on stderr even when it is not a terminal (by default only on
    /// a terminal).
    #[arg(long, overrides_with = "no_progress")]
    progress: bool,
    /// No progress line.
    #[arg(long)]
    no_progress: bool,
    /// Printing: a format string as in `spool tail -f`, `json` or `raw`.
    #[arg(long, short = 'f', value_name = "FORMAT", conflicts_with = "to_topic")]
    format: Option<String>,
    /// Printing: JSON lines. Copying or --dry-run: the summary or plan as JSON on stdout.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// How JSON output writes keys and values (auto: text when UTF-8, else base64).
    #[arg(long, value_enum, default_value = "auto")]
    encoding: Encoding,
    /// No status lines on stderr (the resume report after an unfinished copy stays).
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// Records per second: the one rate grammar (`spool_loadgen::units`).
pub(crate) fn parse_rate(s: &str) -> Result<f64, String> {
    spool_loadgen::units::parse_rate(s)
}

/// A token bucket: `rate` tokens a second, bursts of at most a tenth of a second's worth.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst: (rate / 10.0).max(1.0),
            tokens: 1.0,
            last: now,
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Waits for a token; false when `stop` fired first.
    async fn acquire(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        while let Some(wait) = self.take(Instant::now()) {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
        true
    }
}

/// One source partition's part of the job: `[start, end)`, and the first offset not yet
/// copied (acknowledged) or printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PartPlan {
    partition: u32,
    start: u64,
    end: u64,
    next: u64,
}

/// The `--resume-file` contents.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResumeState {
    version: u32,
    source: String,
    destination: String,
    partitioning: Partitioning,
    /// The -o the range was resolved from, and when (for people reading the file).
    spec: String,
    resolved_at: String,
    partitions: Vec<PartPlan>,
}

/// Reads one partition's `[next, end)` in chunks.
#[derive(Debug)]
struct Cursor {
    idx: usize,
    partition: u32,
    pos: u64,
    end: u64,
}

impl Cursor {
    fn done(&self) -> bool {
        self.pos >= self.end
    }

    /// The next records (offsets in `[pos, end)`), advancing `pos`.
    async fn next_chunk(&mut self, client: &Client, topic: &str) -> CliResult<Vec<Record>> {
        let opts = FetchOptions {
            max_bytes: FETCH_BYTES,
            ..FetchOptions::default()
        };
        let f = client.fetch(topic, self.partition, self.pos, &opts).await?;
        let (pos, end) = (self.pos, self.end);
        let recs: Vec<Record> = f
            .records
            .into_iter()
            .filter(|r| r.offset >= pos && r.offset < end)
            .collect();
        let after_last = recs.last().map_or(pos, |r| r.offset + 1);
        let next = after_last.max(f.next_offset.min(end));
        if next <= pos {
            return Err(CliError::Problem(format!(
                "{topic}/{}: no progress reading at offset {pos} (log ends at {}); the \
                 partition may have been truncated",
                self.partition, f.high_watermark
            )));
        }
        self.pos = next;
        Ok(recs)
    }
}

fn cursors(plan: &[PartPlan]) -> Vec<Cursor> {
    plan.iter()
        .enumerate()
        .filter(|(_, p)| p.next < p.end)
        .map(|(idx, p)| Cursor {
            idx,
            partition: p.partition,
            pos: p.next,
            end: p.end,
        })
        .collect()
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@,=+%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_resume(path: &Path) -> CliResult<ResumeState> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let st: ResumeState = serde_json::from_str(&text)
        .map_err(|e| usage(format!("{}: not a replay resume file: {e}", path.display())))?;
    if st.version != 1 {
        return Err(usage(format!(
            "{}: resume file version {} is not supported",
            path.display(),
            st.version
        )));
    }
    if st
        .partitions
        .iter()
        .any(|p| p.next < p.start || p.next > p.end)
    {
        return Err(usage(format!(
            "{}: a partition's next offset is outside its range",
            path.display()
        )));
    }
    Ok(st)
}

pub(crate) async fn run(client: &Client, a: ReplayArgs) -> CliResult<ExitCode> {
    let (src, only) = parse_target(&a.source)?;
    let resumed = match &a.resume_file {
        Some(p) if p.exists() => Some(read_resume(p)?),
        _ => None,
    };

    // The plan: from the resume file, or resolved now.
    let (plan, spec, resolved_at) = if let Some(st) = &resumed {
        let file = a.resume_file.as_deref().unwrap_or(Path::new(""));
        if st.source != src || Some(&st.destination) != a.to_topic.as_ref() {
            return Err(usage(format!(
                "{} records a copy from {} to {}, not from {} to {}",
                file.display(),
                st.source,
                st.destination,
                src,
                a.to_topic.as_deref().unwrap_or("-")
            )));
        }
        if a.partitioning != Partitioning::Auto && a.partitioning != st.partitioning {
            return Err(usage(format!(
                "{} records --partitioning {:?}; it cannot change while resuming",
                file.display(),
                st.partitioning
            )));
        }
        if !a.quiet && (a.offset.is_some() || only.is_some()) {
            status!(
                "% resuming from {}: the range and partitions recorded there are used, not -o \
                 or /P",
                file.display()
            );
        }
        (
            st.partitions.clone(),
            st.spec.clone(),
            st.resolved_at.clone(),
        )
    } else {
        let spec = a.offset.clone().ok_or_else(|| {
            usage("-o SPEC is required (e.g. -o @-1h, -o 100:200, -o @2026-11-22:1d, -o start)")
        })?;
        let plan = resolve(client, &a.source, &spec, a.quiet).await?;
        (plan, spec, fmt_time(now_ms()))
    };

    let Some(dst) = a.to_topic.clone() else {
        if a.dry_run {
            print_plan(&src, None, None, &plan, a.json)?;
            return Ok(ExitCode::SUCCESS);
        }
        let format = if a.json {
            Some("json")
        } else {
            a.format.as_deref()
        };
        let output = Output::from_flag(format, a.encoding).map_err(usage)?;
        print_range(client, &src, &plan, &a, &output).await?;
        return Ok(ExitCode::SUCCESS);
    };

    // Where records go.
    let dst_partitions =
        u32::try_from(client.describe_topic(&dst).await?.partitions.len()).unwrap_or(u32::MAX);
    let fits = plan.iter().all(|p| p.partition < dst_partitions);
    let partitioning = match resumed.as_ref().map_or(a.partitioning, |s| s.partitioning) {
        Partitioning::Auto if fits => Partitioning::Same,
        Partitioning::Auto => {
            if !a.quiet {
                status!(
                    "% {dst} has {dst_partitions} partition(s), fewer than {src}'s: records go \
                     by key hash"
                );
            }
            Partitioning::Key
        }
        Partitioning::Same if !fits => {
            return Err(usage(format!(
                "--partitioning same: {dst} has only {dst_partitions} partition(s); use \
                 --partitioning key or add partitions"
            )));
        }
        p => p,
    };
    if a.dry_run {
        print_plan(&src, Some(&dst), Some(partitioning), &plan, a.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let job = Arc::new(CopyJob {
        src,
        dst,
        partitioning,
        resume_file: a.resume_file.clone(),
        rate: a.rate,
        spec,
        resolved_at,
        plan,
        write_lock: Mutex::new(()),
    });
    if job.plan.iter().all(|p| p.next >= p.end) {
        if let (Some(f), false) = (&job.resume_file, a.quiet) {
            status!(
                "% nothing left to copy: {} records a finished copy",
                f.display()
            );
        } else if !a.quiet {
            status!("% nothing to copy: the range is empty");
        }
        if a.json {
            let next: Vec<u64> = job.plan.iter().map(|p| p.next).collect();
            // A closed stdout loses the summary, not the exit status.
            let _ = writeln!(
                std::io::stdout(),
                "{}",
                job.summary(&next, 0, 0, None, false)
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    copy(client, job, &a).await
}

/// Resolves `spec` on the partitions of `target` into a plan that always ends.
async fn resolve(
    client: &Client,
    target: &str,
    spec: &str,
    quiet: bool,
) -> CliResult<Vec<PartPlan>> {
    let now = now_ms();
    let mut range = Range::parse(spec, Start::Earliest, now).map_err(usage)?;
    if range.end == End::Follow {
        range.end = End::Latest;
    }
    let tps = expand_targets(client, &[target.to_owned()]).await?;
    let mut times = Vec::new();
    if let Start::Time(t) = range.start {
        times.push(t);
        if !quiet {
            status!("% start time {}", fmt_time(t));
        }
    }
    if let End::Time(t) = range.end {
        times.push(t);
        if !quiet {
            status!("% end time {}", fmt_time(t));
        }
    }
    // Read committed (as the copy's reads): the end is the last stable offset, so a replay
    // never waits for, or copies, an open transaction's records.
    let bounds =
        partition_offsets(client, &tps, &times, spool_client::Isolation::ReadCommitted).await?;
    let mut plan = Vec::with_capacity(tps.len());
    for (tp, b) in tps.iter().zip(bounds) {
        let b = b?;
        let r = range.resolve(b.log_start, b.high_watermark, |t| {
            times
                .iter()
                .position(|x| *x == t)
                .map_or(b.high_watermark, |i| b.at[i])
        });
        // Never past the end as it is now: replay is bounded history.
        let end = r
            .end
            .unwrap_or(b.high_watermark)
            .min(b.high_watermark)
            .max(r.start);
        if !quiet {
            status!(
                "% {}/{}: offsets [{}, {end}) ({} records)",
                tp.topic,
                tp.partition,
                r.start,
                end - r.start
            );
        }
        plan.push(PartPlan {
            partition: tp.partition,
            start: r.start,
            end,
            next: r.start,
        });
    }
    Ok(plan)
}

fn print_plan(
    src: &str,
    dst: Option<&str>,
    partitioning: Option<Partitioning>,
    plan: &[PartPlan],
    json: bool,
) -> CliResult<()> {
    let dest = |p: &PartPlan| match (dst, partitioning) {
        (None, _) => "stdout".to_owned(),
        (Some(d), Some(Partitioning::Same)) => format!("{d}/{}", p.partition),
        (Some(d), _) => format!("{d} (by key)"),
    };
    let total: u64 = plan.iter().map(|p| p.end - p.next).sum();
    let mut out = std::io::stdout().lock();
    if json {
        let parts: Vec<_> = plan
            .iter()
            .map(|p| {
                serde_json::json!({
                    "partition": p.partition,
                    "start": p.next,
                    "end": p.end,
                    "records": p.end - p.next,
                    "destination": dest(p),
                })
            })
            .collect();
        let v = serde_json::json!({
            "source": src,
            "destination": dst,
            "partitioning": partitioning,
            "records": total,
            "partitions": parts,
        });
        writeln!(out, "{v}")?;
    } else {
        let mut t = Table::new(&[
            "SOURCE",
            "PARTITION",
            "START",
            "END",
            "RECORDS",
            "DESTINATION",
        ]);
        for p in plan {
            t.row(vec![
                src.to_owned(),
                p.partition.to_string(),
                p.next.to_string(),
                p.end.to_string(),
                (p.end - p.next).to_string(),
                dest(p),
            ]);
        }
        t.row(vec![
            "TOTAL".into(),
            String::new(),
            String::new(),
            String::new(),
            total.to_string(),
            String::new(),
        ]);
        t.write(&mut out)?;
    }
    out.flush()?;
    status!("% dry run: nothing read or written");
    Ok(())
}

async fn print_range(
    client: &Client,
    src: &str,
    plan: &[PartPlan],
    a: &ReplayArgs,
    output: &Output,
) -> CliResult<()> {
    let (_stop_tx, mut stop) = watch::channel(false);
    let mut bucket = a.rate.map(|r| TokenBucket::new(r, Instant::now()));
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut printed = 0u64;
    let mut cs = cursors(plan);
    'outer: while !cs.is_empty() {
        for c in &mut cs {
            for r in c.next_chunk(client, src).await? {
                if a.num.is_some_and(|n| printed >= n) {
                    break 'outer;
                }
                if let Some(b) = &mut bucket {
                    b.acquire(&mut stop).await;
                }
                output.write(&r, &mut out)?;
                printed += 1;
            }
            out.flush()?;
        }
        cs.retain(|c| !c.done());
    }
    out.flush()?;
    if !a.quiet {
        status!("% {printed} record(s)");
    }
    Ok(())
}

// ---- copy --------------------------------------------------------------------------------

#[derive(Debug)]
struct CopyJob {
    src: String,
    dst: String,
    partitioning: Partitioning,
    resume_file: Option<PathBuf>,
    rate: Option<f64>,
    spec: String,
    resolved_at: String,
    /// As at the start of this run.
    plan: Vec<PartPlan>,
    /// Serialises checkpoint writes (the tracker's and a second Ctrl-C's).
    write_lock: Mutex<()>,
}

/// What the acknowledgements say so far.
#[derive(Debug)]
struct Progress {
    /// Per plan entry: first offset not yet acknowledged.
    next: Vec<u64>,
    /// Per plan entry: a delivery failed (its `next` stays there).
    failed: Vec<bool>,
    acked: u64,
    bytes: u64,
    /// The first failure: a message and, for a delivery, the client's error (its exit code).
    error: Option<(String, Option<spool_client::Error>)>,
}

impl CopyJob {
    fn state(&self, next: &[u64]) -> ResumeState {
        ResumeState {
            version: 1,
            source: self.src.clone(),
            destination: self.dst.clone(),
            partitioning: self.partitioning,
            spec: self.spec.clone(),
            resolved_at: self.resolved_at.clone(),
            partitions: self
                .plan
                .iter()
                .zip(next)
                .map(|(p, n)| PartPlan {
                    next: *n,
                    ..p.clone()
                })
                .collect(),
        }
    }

    /// Writes the resume file from the acknowledged progress (no-op without one).
    fn checkpoint(&self, progress: &Mutex<Progress>) -> anyhow::Result<()> {
        let Some(path) = &self.resume_file else {
            return Ok(());
        };
        let _w = lock(&self.write_lock);
        let next = lock(progress).next.clone();
        let mut text = serde_json::to_string_pretty(&self.state(&next))?;
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// Commands that copy what is left after `next`.
    fn resume_commands(&self, next: &[u64]) -> Vec<String> {
        let part = match self.partitioning {
            Partitioning::Key => " --partitioning key",
            _ => "",
        };
        let rate = self
            .rate
            .map(|r| format!(" --rate {}/s", (r * 1000.0).round() / 1000.0))
            .unwrap_or_default();
        if let Some(f) = &self.resume_file {
            return vec![format!(
                "spool replay {} --to-topic {} --resume-file {}{rate}",
                shell_quote(&self.src),
                shell_quote(&self.dst),
                shell_quote(&f.to_string_lossy())
            )];
        }
        // One command per distinct remaining range.
        let mut groups: Vec<((u64, u64), Vec<u32>)> = Vec::new();
        for (p, n) in self.plan.iter().zip(next) {
            if *n >= p.end {
                continue;
            }
            match groups.iter_mut().find(|(r, _)| *r == (*n, p.end)) {
                Some((_, ps)) => ps.push(p.partition),
                None => groups.push(((*n, p.end), vec![p.partition])),
            }
        }
        groups
            .into_iter()
            .map(|((n, e), ps)| {
                let ps: Vec<String> = ps.iter().map(u32::to_string).collect();
                format!(
                    "spool replay {}/{} -o {n}:{e} --to-topic {}{part}{rate}",
                    shell_quote(&self.src),
                    ps.join(","),
                    shell_quote(&self.dst)
                )
            })
            .collect()
    }

    /// The next offsets and how to resume, on stderr.
    fn report(&self, next: &[u64]) {
        let mut t = Table::new(&["PARTITION", "START", "END", "NEXT", "REMAINING"]);
        for (p, n) in self.plan.iter().zip(next) {
            t.row(vec![
                format!("{}/{}", self.src, p.partition),
                p.start.to_string(),
                p.end.to_string(),
                n.to_string(),
                (p.end - n).to_string(),
            ]);
        }
        let mut err = std::io::stderr().lock();
        let _ = t.write(&mut err);
        let cmds = self.resume_commands(next);
        if self.plan.iter().zip(next).any(|(p, n)| *n < p.end) {
            let _ = writeln!(err, "% to copy the rest:");
            for c in cmds {
                let _ = writeln!(err, "{c}");
            }
        }
    }

    fn summary(
        &self,
        next: &[u64],
        copied: u64,
        bytes: u64,
        error: Option<&str>,
        interrupted: bool,
    ) -> serde_json::Value {
        let complete = self.plan.iter().zip(next).all(|(p, n)| *n >= p.end);
        serde_json::json!({
            "source": self.src,
            "destination": self.dst,
            "partitioning": self.partitioning,
            "copied": copied,
            "bytes": bytes,
            "complete": complete,
            "interrupted": interrupted,
            "error": error,
            "partitions": self.state(next).partitions,
            "resume_commands": if complete { Vec::new() } else { self.resume_commands(next) },
        })
    }
}

/// What the tracker handles, in send order.
enum Pending {
    /// A record sent and not yet acknowledged.
    Record {
        idx: usize,
        offset: u64,
        bytes: u64,
        delivery: DeliveryFuture,
    },
    /// Every record of partition `idx` below `to` has been sent (the items before this one):
    /// once they are acknowledged, the offsets below `to` that hold no record for a
    /// read-committed reader (transaction markers, aborted records, compaction gaps) count as
    /// copied too, so a range that ends on such an offset completes.
    Advance { idx: usize, to: u64 },
}

fn record_bytes(r: &Record) -> u64 {
    let len = |b: &Option<bytes::Bytes>| b.as_ref().map_or(0, |b| b.len() as u64);
    len(&r.key)
        + len(&r.value)
        + r.headers
            .iter()
            .map(|h| h.key.len() as u64 + len(&h.value))
            .sum::<u64>()
}

/// Awaits deliveries in send order, advancing each partition's acknowledged offset and
/// checkpointing.
async fn track(
    job: Arc<CopyJob>,
    progress: Arc<Mutex<Progress>>,
    stop: Arc<watch::Sender<bool>>,
    mut rx: mpsc::Receiver<Pending>,
) {
    let mut last_write = Instant::now();
    let mut dirty = false;
    let fail = |msg: String, e: Option<spool_client::Error>| {
        let mut p = lock(&progress);
        p.error.get_or_insert((msg, e));
        drop(p);
        stop.send_replace(true);
    };
    while let Some(item) = rx.recv().await {
        match item {
            Pending::Advance { idx, to } => {
                let mut st = lock(&progress);
                if !st.failed[idx] && st.next[idx] < to {
                    st.next[idx] = to;
                    dirty = true;
                }
            }
            Pending::Record {
                idx,
                offset,
                bytes,
                delivery,
            } => {
                let res = delivery.await;
                let mut st = lock(&progress);
                match res {
                    Ok(_) if !st.failed[idx] => {
                        st.next[idx] = offset + 1;
                        st.acked += 1;
                        st.bytes += bytes;
                        dirty = true;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        st.failed[idx] = true;
                        drop(st);
                        fail(
                            format!(
                                "copying {}/{} offset {offset}: {e}",
                                job.src, job.plan[idx].partition
                            ),
                            Some(e),
                        );
                    }
                }
            }
        }
        if dirty && last_write.elapsed() >= CHECKPOINT_EVERY {
            if let Err(e) = job.checkpoint(&progress) {
                fail(format!("{e:#}"), None);
            }
            last_write = Instant::now();
            dirty = false;
        }
    }
    if let Err(e) = job.checkpoint(&progress) {
        fail(format!("{e:#}"), None);
    }
}

/// Progress on stderr until `done`: redrawn in place on a terminal, else a line a second.
async fn show_progress(
    progress: Arc<Mutex<Progress>>,
    total: u64,
    tty: bool,
    mut done: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let every = Duration::from_millis(if tty { 200 } else { 1000 });
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = done.wait_for(|d| *d) => break,
        }
        let (acked, bytes) = {
            let p = lock(&progress);
            (p.acked, p.bytes)
        };
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = acked as f64 / secs;
        let eta = if rate > 0.0 {
            human_ms(((total.saturating_sub(acked)) as f64 / rate * 1000.0) as u64)
        } else {
            "-".into()
        };
        let pct = (acked * 100).checked_div(total).unwrap_or(100);
        let line = format!(
            "copied {acked}/{total} records ({pct}%), {}, {rate:.0} records/s, {}/s, ETA {eta}",
            human_bytes(bytes),
            human_bytes((bytes as f64 / secs) as u64)
        );
        if tty {
            status_part!("\r\x1b[K{line}");
        } else {
            status!("% {line}");
        }
    }
    if tty {
        status_part!("\r\x1b[K");
    }
}

async fn copy(client: &Client, job: Arc<CopyJob>, a: &ReplayArgs) -> CliResult<ExitCode> {
    let started = Instant::now();
    let progress = Arc::new(Mutex::new(Progress {
        next: job.plan.iter().map(|p| p.next).collect(),
        failed: vec![false; job.plan.len()],
        acked: 0,
        bytes: 0,
        error: None,
    }));
    // Record the resolved range before anything is copied: a rerun must copy exactly it.
    job.checkpoint(&progress)?;

    let (stop_tx, mut stop) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let signals = {
        let (stop_tx, job, progress, interrupted) = (
            stop_tx.clone(),
            job.clone(),
            progress.clone(),
            interrupted.clone(),
        );
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
            stop_tx.send_replace(true);
            status!(
                "\n% interrupted: waiting for the records already sent to be acknowledged \
                 (Ctrl-C again to quit at once)"
            );
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            let _ = job.checkpoint(&progress);
            let next = lock(&progress).next.clone();
            status!("% quitting; records sent but not acknowledged count as not copied");
            job.report(&next);
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        })
    };

    let producer: Producer = client.producer(ProducerConfig {
        acks: spool_client::Acks::Durable,
        ..ProducerConfig::default()
    });
    let (tx, rx) = mpsc::channel::<Pending>(MAX_IN_FLIGHT);
    let tracker = tokio::spawn(track(job.clone(), progress.clone(), stop_tx.clone(), rx));
    let total: u64 = job.plan.iter().map(|p| p.end - p.next).sum();
    let tty = std::io::stderr().is_terminal();
    let show = !a.no_progress && (a.progress || (tty && !a.quiet));
    let (done_tx, done_rx) = watch::channel(false);
    let bar = show.then(|| tokio::spawn(show_progress(progress.clone(), total, tty, done_rx)));

    // Read and send; the tracker counts what is acknowledged.
    let mut bucket = job.rate.map(|r| TokenBucket::new(r, Instant::now()));
    let mut sent = 0u64;
    let mut read_error: Option<CliError> = None;
    let mut cs = cursors(&job.plan);
    'outer: while !cs.is_empty() {
        for c in &mut cs {
            if *stop.borrow() {
                break 'outer;
            }
            let recs = match c.next_chunk(client, &job.src).await {
                Ok(r) => r,
                Err(e) => {
                    read_error = Some(e);
                    break 'outer;
                }
            };
            for r in recs {
                if a.num.is_some_and(|n| sent >= n) || *stop.borrow() {
                    break 'outer;
                }
                if let Some(b) = &mut bucket
                    && !b.acquire(&mut stop).await
                {
                    break 'outer;
                }
                let bytes = record_bytes(&r);
                let (idx, offset, partition) = (c.idx, r.offset, r.partition);
                let rec = ProducerRecord {
                    key: r.key,
                    value: r.value,
                    headers: r.headers,
                    timestamp_ms: Some(r.timestamp_ms),
                };
                let sent_rec = match job.partitioning {
                    Partitioning::Key => producer.send(&job.dst, rec).await,
                    _ => producer.send_to(&job.dst, partition, rec).await,
                };
                let delivery = match sent_rec {
                    Ok(d) => d,
                    Err(e) => {
                        read_error = Some(e.into());
                        break 'outer;
                    }
                };
                let p = Pending::Record {
                    idx,
                    offset,
                    bytes,
                    delivery,
                };
                if tx.send(p).await.is_err() {
                    break 'outer;
                }
                sent += 1;
            }
            // The whole chunk was sent: offsets up to the cursor without a record (markers,
            // aborted records, gaps) are copied once the records before them are.
            let advance = Pending::Advance {
                idx: c.idx,
                to: c.pos,
            };
            if tx.send(advance).await.is_err() {
                break 'outer;
            }
        }
        cs.retain(|c| !c.done());
    }
    drop(tx);
    producer.flush().await;
    let _ = tracker.await;
    producer.close().await;
    done_tx.send_replace(true);
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    signals.abort();

    let (next, acked, bytes, error) = {
        let p = lock(&progress);
        (p.next.clone(), p.acked, p.bytes, p.error.clone())
    };
    let message = error
        .as_ref()
        .map(|(m, _)| m.clone())
        .or_else(|| read_error.as_ref().map(ToString::to_string));
    let interrupted = interrupted.load(std::sync::atomic::Ordering::SeqCst);
    let complete = job.plan.iter().zip(&next).all(|(p, n)| *n >= p.end);
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    if a.json {
        // A closed stdout loses the summary, not the report and exit status below.
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            job.summary(&next, acked, bytes, message.as_deref(), interrupted)
        );
    }
    if !a.quiet {
        status!(
            "% copied {acked} record(s) ({}) from {} to {} in {:.1}s ({:.0} records/s){}",
            human_bytes(bytes),
            job.src,
            job.dst,
            secs,
            acked as f64 / secs,
            if complete { "" } else { "; not finished" }
        );
    }
    if !a.json && (!a.quiet || !complete) {
        job.report(&next);
    }
    if let Some(f) = &job.resume_file
        && !a.quiet
    {
        status!("% progress recorded in {}", f.display());
    }
    match (read_error, error) {
        (Some(e), _) => Err(e),
        (None, Some((m, Some(e)))) => {
            status!("% failed {m}");
            Err(CliError::Client(e))
        }
        (None, Some((m, None))) => Err(CliError::Other(anyhow::anyhow!(m))),
        (None, None) if interrupted => Ok(ExitCode::from(EXIT_INTERRUPTED)),
        (None, None) => Ok(ExitCode::SUCCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("500"), Ok(500.0));
        assert_eq!(parse_rate("500/s"), Ok(500.0));
        assert_eq!(parse_rate("3000/m"), Ok(50.0));
        assert_eq!(parse_rate("7200/h"), Ok(2.0));
        assert_eq!(parse_rate("0.5/s"), Ok(0.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-3").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5/week").is_err());
    }

    #[test]
    fn token_bucket_holds_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, t0);
        assert_eq!(b.take(t0), None);
        // Empty now: the next token comes 100 ms later.
        let wait = b.take(t0).unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert_eq!(b.take(t0 + Duration::from_millis(100)), None);
        // A long pause gives at most a burst of one (a tenth of a second at 10/s).
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.take(later), None);
        assert!(b.take(later).is_some());
        // Over a simulated second at 1000/s, about 1000 tokens are handed out.
        let mut b = TokenBucket::new(1000.0, t0);
        let mut now = t0;
        let mut n = 0;
        while now < t0 + Duration::from_secs(1) {
            match b.take(now) {
                None => n += 1,
                Some(w) => now += w,
            }
        }
        assert!((1000..=1002).contains(&n), "{n}");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("events"), "events");
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    fn job(resume: Option<&str>, partitioning: Partitioning) -> CopyJob {
        CopyJob {
            src: "events".into(),
            dst: "copy".into(),
            partitioning,
            resume_file: resume.map(PathBuf::from),
            rate: Some(500.0),
            spec: "start:end".into(),
            resolved_at: String::new(),
            plan: vec![
                PartPlan {
                    partition: 0,
                    start: 0,
                    end: 10,
                    next: 0,
                },
                PartPlan {
                    partition: 1,
                    start: 5,
                    end: 10,
                    next: 5,
                },
                PartPlan {
                    partition: 2,
                    start: 0,
                    end: 10,
                    next: 0,
                },
            ],
            write_lock: Mutex::new(()),
        }
    }

    #[test]
    fn resume_commands() {
        let j = job(None, Partitioning::Same);
        assert_eq!(
            j.resume_commands(&[7, 10, 7]),
            ["spool replay events/0,2 -o 7:10 --to-topic copy --rate 500/s"]
        );
        let j = job(None, Partitioning::Key);
        assert_eq!(
            j.resume_commands(&[7, 8, 10]),
            [
                "spool replay events/0 -o 7:10 --to-topic copy --partitioning key --rate 500/s",
                "spool replay events/1 -o 8:10 --to-topic copy --partitioning key --rate 500/s",
            ]
        );
        let j = job(Some("/tmp/r.json"), Partitioning::Same);
        assert_eq!(
            j.resume_commands(&[7, 8, 10]),
            ["spool replay events --to-topic copy --resume-file /tmp/r.json --rate 500/s"]
        );
    }
}
