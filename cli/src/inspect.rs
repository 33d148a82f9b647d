//! `spool inspect`: offline, read-only views of a data directory through the engine.
//!
//! `verify` and `stats` never report on nothing: a directory without topics or a `--topic` it
//! does not have is an error (exit 2), so a wrong path cannot pass as a clean log.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use spool_log_engine::inspect::{PartitionInspection, Severity, inspect_log};
use spool_log_engine::reindex::{IndexFileState, Outcome, ReindexOptions, reindex_log};

/// What leaves a zero tail (zeros after the last batch of the last segment, past its recovery
/// point): both causes, as `verify` and `dump` cannot tell them apart (nor can recovery, whose
/// warning names the same two).
const ZERO_TAIL_CAUSES: &str =
    "zeros written ahead of the writer, or appended bytes a crash or a disk fault left as zeros";

#[derive(Debug, Subcommand)]
pub(crate) enum Inspect {
    /// Check every batch (CRC, offsets), segment chain and index of a data directory.
    ///
    /// Exits 1 if it finds corruption (damage the broker would refuse to open with), 0
    /// otherwise; torn tails (which opening would cut and keep aside) and damaged indexes
    /// (rebuilt on use) are reported as warnings. A directory without topics (not a data_dir)
    /// or a --topic it does not have exits 2: nothing checked is not a clean log.
    ///
    /// Example: spool inspect verify /var/lib/spool
    Verify {
        /// The data directory (spoold's data_dir).
        dir: PathBuf,
        /// Only this topic.
        #[arg(long)]
        topic: Option<String>,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Per-partition segments, bytes, records, offsets and recovery points.
    ///
    /// Example: spool inspect stats ./spool-data --topic prices
    Stats {
        /// The data directory.
        dir: PathBuf,
        /// Only this topic.
        #[arg(long)]
        topic: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the offset and time indexes of sealed segments (stop spoold first).
    ///
    /// Every batch is CRC-checked; each index is rebuilt exactly as the broker writes it and
    /// replaced only if it differs (temporary file, fdatasync, rename, directory fsync).
    /// Refuses a directory a running broker holds. Exits 1 if a segment is corrupt (it and
    /// the partition's later segments are left alone) or the directory is locked.
    ///
    /// Example: spool inspect reindex /var/lib/spool --topic prices --dry-run
    Reindex {
        /// The data directory (spoold's data_dir).
        dir: PathBuf,
        /// Only this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only this partition (of --topic, or of every topic).
        #[arg(long)]
        partition: Option<u32>,
        /// Check and report what would be rebuilt; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// JSON lines (one per segment) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the batches (and with --records, the records) of one segment file.
    ///
    /// Example: spool inspect dump ./spool-data/prices/0/00000000000000000000.log --records
    Dump {
        /// A segment file (NNN.log).
        segment: PathBuf,
        /// Decode and print every record.
        #[arg(long)]
        records: bool,
    },
}

/// Topic names listed in the error for a `--topic` that matches none, at most.
const MAX_NAMES_SHOWN: usize = 20;

/// The partitions of `all` that `topic` selects (all without it). Checking nothing is an
/// error (exit 2), never a clean result: a wrong directory (spoold creates
/// `__consumer_offsets` in its data_dir when it first starts, so a real one is never empty) or
/// a mistyped `--topic` must not pass `verify && systemctl start spoold`.
fn selected<'a>(
    dir: &Path,
    all: &'a [(String, u32, PartitionInspection)],
    topic: Option<&str>,
) -> anyhow::Result<Vec<&'a (String, u32, PartitionInspection)>> {
    let parts: Vec<_> = all
        .iter()
        .filter(|(t, _, _)| topic.is_none_or(|want| want == t))
        .collect();
    if !parts.is_empty() {
        return Ok(parts);
    }
    if all.is_empty() {
        anyhow::bail!(
            "no topic in {}: is it spoold's data_dir? (spoold creates __consumer_offsets there \
             when it first starts)",
            dir.display()
        );
    }
    let mut names: Vec<&str> = all.iter().map(|(t, _, _)| t.as_str()).collect();
    names.dedup();
    let more = names.len().saturating_sub(MAX_NAMES_SHOWN);
    names.truncate(MAX_NAMES_SHOWN);
    anyhow::bail!(
        "no topic named {:?} in {} (it has: {}{})",
        topic.unwrap_or_default(),
        dir.display(),
        names.join(", "),
        if more > 0 {
            format!(", and {more} more")
        } else {
            String::new()
        }
    )
}

pub(crate) fn run(cmd: Inspect) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cmd {
        Inspect::Reindex {
            dir,
            topic,
            partition,
            dry_run,
            json,
        } => {
            let opts = ReindexOptions {
                topic,
                partition,
                dry_run,
            };
            reindex(&dir, &opts, json, &mut out)
        }
        Inspect::Verify { dir, topic, json } => {
            let all = inspect_log(&dir).with_context(|| format!("inspecting {}", dir.display()))?;
            let mut corrupt = false;
            let mut checked = 0;
            for (t, p, ins) in selected(&dir, &all, topic.as_deref())? {
                checked += 1;
                // Not a finding: end-of-data that opening the log cuts (engine docs), shown so
                // that the bytes past the last batch are accounted for.
                for z in ins.segments.iter().filter(|s| s.zero_tail_bytes > 0) {
                    let at = z.bytes;
                    if json {
                        writeln!(
                            out,
                            "{}",
                            json!({
                                "topic": t, "partition": p, "severity": "zero_tail",
                                "file": z.path, "position": at, "offset": z.next_offset,
                                "zero_tail_bytes": z.zero_tail_bytes,
                                "problem": format!("zeros after the last batch, no batch in them ({ZERO_TAIL_CAUSES})"),
                            })
                        )?;
                    } else {
                        writeln!(
                            out,
                            "{t}/{p}: zero tail: {} at byte {at} (offset {}): {} zero bytes after \
                             the last batch, no batch in them ({ZERO_TAIL_CAUSES}); opening the \
                             log cuts them",
                            z.path.display(),
                            z.next_offset,
                            z.zero_tail_bytes
                        )?;
                    }
                }
                for f in &ins.findings {
                    corrupt |= f.severity == Severity::Corruption;
                    if json {
                        // Stable names for scripts (not Debug output).
                        let severity = match f.severity {
                            Severity::Corruption => "corruption",
                            Severity::TornTail => "torn_tail",
                            Severity::Repairable => "repairable",
                        };
                        writeln!(
                            out,
                            "{}",
                            json!({
                                "topic": t, "partition": p, "severity": severity,
                                "file": f.path, "position": f.position, "offset": f.offset, "problem": f.problem,
                            })
                        )?;
                    } else {
                        let label = match f.severity {
                            Severity::Corruption => "CORRUPTION",
                            Severity::TornTail => "torn tail",
                            Severity::Repairable => "repairable",
                        };
                        let at = f
                            .offset
                            .map(|o| format!(" (offset {o})"))
                            .unwrap_or_default();
                        writeln!(
                            out,
                            "{t}/{p}: {label}: {} at byte {}{at}: {}",
                            f.path.display(),
                            f.position,
                            f.problem
                        )?;
                    }
                }
            }
            status!(
                "checked {checked} partition(s) in {}: {}",
                dir.display(),
                if corrupt {
                    "CORRUPTION FOUND"
                } else {
                    "no corruption"
                }
            );
            Ok(if corrupt {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Inspect::Stats { dir, topic, json } => {
            let all = inspect_log(&dir).with_context(|| format!("inspecting {}", dir.display()))?;
            let parts = selected(&dir, &all, topic.as_deref())?;
            if !json {
                writeln!(
                    out,
                    "{:<30} {:>5} {:>8} {:>14} {:>14} {:>12} {:>14} {:>10}",
                    "TOPIC",
                    "PART",
                    "SEGMENTS",
                    "LOG-START",
                    "END",
                    "RECORDS",
                    "BYTES",
                    "ZERO-TAIL"
                )?;
            }
            for (t, p, ins) in parts {
                let start = ins.segments.first().map_or(0, |s| s.base_offset);
                let end = ins.segments.last().map_or(0, |s| s.next_offset);
                let records: u64 = ins.segments.iter().map(|s| s.records).sum();
                let bytes: u64 = ins.segments.iter().map(|s| s.bytes).sum();
                let zero_tail: u64 = ins.segments.iter().map(|s| s.zero_tail_bytes).sum();
                if json {
                    writeln!(
                        out,
                        "{}",
                        json!({
                            "topic": t, "partition": p, "segments": ins.segments.len(), "log_start_offset": start,
                            "end_offset": end, "records": records, "bytes": bytes, "zero_tail_bytes": zero_tail,
                            "recovery_point": ins.recovery_point.map(|(s, pos, n)| json!({"segment": s, "position": pos, "next_offset": n})),
                            "findings": ins.findings.len(),
                        })
                    )?;
                } else {
                    writeln!(
                        out,
                        "{t:<30} {p:>5} {:>8} {start:>14} {end:>14} {records:>12} {bytes:>14} {zero_tail:>10}",
                        ins.segments.len()
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Inspect::Dump { segment, records } => {
            let limits = spool_record::DecodeLimits::default();
            let mut failure = None;
            let dumped = spool_log_engine::inspect::dump_segment(&segment, |pos, b| {
                if failure.is_some() {
                    return;
                }
                if let Err(stop) = dump_batch(&mut out, pos, b, records.then_some(&limits)) {
                    failure = Some(stop);
                }
            });
            match failure {
                Some(DumpStop::Output(e)) => return Err(e),
                // A batch whose CRC checks but whose records do not decode: a problem found
                // in the data, exit 1 as for a damaged batch (and as verify).
                Some(DumpStop::Record { pos, error }) => {
                    status!(
                        "spool: {}: batch at byte {pos}: a record does not decode: {error}",
                        segment.display()
                    );
                    return Ok(ExitCode::from(1));
                }
                None => {}
            }
            let zero_tail = match dumped {
                Ok(z) => z,
                // Damage found, after the batches before it: exit 1, as verify.
                Err(e @ spool_log_engine::Error::Corruption { .. }) => {
                    status!("spool: {e}");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(z) = zero_tail {
                writeln!(
                    out,
                    "zero tail at byte {}: {} zero bytes after the last batch, no batch in them \
                     ({ZERO_TAIL_CAUSES}); opening the log cuts them",
                    z.position, z.bytes
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The codec as `spool topic` and `spool produce -z` spell it (`unknown` for attribute bits
/// this version does not know).
fn compression_name(c: Option<spool_log_engine::Compression>) -> &'static str {
    use spool_log_engine::Compression as C;
    match c {
        Some(C::None) => "none",
        Some(C::Gzip) => "gzip",
        Some(C::Snappy) => "snappy",
        Some(C::Lz4) => "lz4",
        Some(C::Zstd) => "zstd",
        _ => "unknown",
    }
}

fn reindex(
    dir: &Path,
    opts: &ReindexOptions,
    json: bool,
    out: &mut impl Write,
) -> anyhow::Result<ExitCode> {
    let all = match reindex_log(dir, opts) {
        Ok(all) => all,
        Err(spool_log_engine::Error::Locked(_)) => {
            status!(
                "spool: {} is locked by a running log (spoold?): stop it first, or reindex a copy",
                dir.display()
            );
            return Ok(ExitCode::from(1));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("reindexing {}", dir.display())));
        }
    };
    if all.is_empty() {
        anyhow::bail!(
            "nothing to reindex in {}{}",
            dir.display(),
            opts.partition
                .map(|p| format!(": no topic has a partition {p}"))
                .unwrap_or_default()
        );
    }
    let (mut rebuilt, mut unchanged, mut corrupt) = (0, 0, false);
    for p in &all {
        for s in &p.segments {
            let name = s.path.file_name().unwrap_or_default().to_string_lossy();
            match s.outcome {
                Outcome::Rebuilt | Outcome::WouldRebuild => rebuilt += 1,
                Outcome::Unchanged => unchanged += 1,
                Outcome::Corrupt { .. } => corrupt = true,
                Outcome::Active | Outcome::NotReached => {}
            }
            if json {
                let file = |st: &Option<IndexFileState>| match st {
                    None => serde_json::Value::Null,
                    Some(IndexFileState::Current) => json!({"state": "current"}),
                    Some(IndexFileState::Different) => json!({"state": "different"}),
                    Some(IndexFileState::Invalid(why)) => {
                        json!({"state": "invalid", "reason": why})
                    }
                };
                let mut v = json!({
                    "topic": p.topic, "partition": p.partition, "segment": s.path,
                    "base_offset": s.base_offset, "bytes": s.bytes, "batches": s.batches,
                    "records": s.records, "offset_entries": s.offset_entries,
                    "time_entries": s.time_entries, "index": file(&s.index),
                    "timeindex": file(&s.timeindex), "outcome": outcome_name(&s.outcome),
                });
                if let Outcome::Corrupt {
                    position,
                    offset,
                    problem,
                } = &s.outcome
                {
                    v["position"] = json!(position);
                    v["offset"] = json!(offset);
                    v["problem"] = json!(problem);
                }
                writeln!(out, "{v}")?;
                continue;
            }
            let what = match &s.outcome {
                Outcome::Unchanged => "unchanged".to_owned(),
                Outcome::Rebuilt | Outcome::WouldRebuild => format!(
                    "{}: .index {}, .timeindex {}",
                    if s.outcome == Outcome::Rebuilt { "rebuilt" } else { "would rebuild" },
                    state_text(&s.index),
                    state_text(&s.timeindex)
                ),
                Outcome::Active => {
                    "active segment, skipped (its index is kept in memory and rebuilt when the log opens)"
                        .to_owned()
                }
                Outcome::NotReached => "not reached (an earlier segment is corrupt)".to_owned(),
                Outcome::Corrupt { position, offset, problem } => format!(
                    "CORRUPTION at byte {position}{}: {problem}; not indexed",
                    offset.map(|o| format!(" (offset {o})")).unwrap_or_default()
                ),
            };
            let counts = if matches!(s.outcome, Outcome::Active | Outcome::NotReached) {
                String::new()
            } else if matches!(s.outcome, Outcome::Corrupt { .. }) {
                format!(" [{} good batches before it]", s.batches)
            } else {
                format!(
                    " [{} batches, {} records, {} offset + {} time entries]",
                    s.batches, s.records, s.offset_entries, s.time_entries
                )
            };
            writeln!(out, "{}/{} {name}: {what}{counts}", p.topic, p.partition)?;
        }
    }
    status!(
        "{} {} partition(s) in {}: {rebuilt} segment(s) {}, {unchanged} unchanged{}",
        if opts.dry_run { "checked" } else { "reindexed" },
        all.len(),
        dir.display(),
        if opts.dry_run {
            "to rebuild"
        } else {
            "rebuilt"
        },
        if corrupt { "; CORRUPTION FOUND" } else { "" }
    );
    Ok(if corrupt {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Unchanged => "unchanged",
        Outcome::Rebuilt => "rebuilt",
        Outcome::WouldRebuild => "would_rebuild",
        Outcome::Active => "active",
        Outcome::Corrupt { .. } => "corrupt",
        Outcome::NotReached => "not_reached",
    }
}

fn state_text(s: &Option<IndexFileState>) -> String {
    match s {
        None => "not examined".to_owned(),
        Some(IndexFileState::Current) => "was current".to_owned(),
        Some(IndexFileState::Different) => "differed (other entries)".to_owned(),
        Some(IndexFileState::Invalid(why)) => format!("was invalid ({why})"),
    }
}

/// Why `inspect dump` stopped early.
enum DumpStop {
    /// Writing the output failed.
    Output(anyhow::Error),
    /// A record of the batch at `pos` does not decode.
    Record { pos: u64, error: String },
}

/// Prints one batch's header line and, with `limits` (`--records`), its records.
fn dump_batch(
    out: &mut impl Write,
    pos: u64,
    b: &spool_record::Batch,
    limits: Option<&spool_record::DecodeLimits>,
) -> Result<(), DumpStop> {
    let h = b.header();
    writeln!(
        out,
        "batch at byte {pos}: offsets {}..={} records {} bytes {} compression {} max_ts {} crc {:#010x}",
        h.base_offset,
        h.last_offset(),
        h.records_count,
        h.total_len(),
        compression_name(h.compression().ok()),
        h.max_timestamp,
        h.crc
    )
    .map_err(|e| DumpStop::Output(e.into()))?;
    let Some(limits) = limits else {
        return Ok(());
    };
    let bad = |e: spool_record::BatchError| DumpStop::Record {
        pos,
        error: e.to_string(),
    };
    for rec in b.records(limits).map_err(bad)? {
        let rec = rec.map_err(bad)?;
        let show = |v: Option<&[u8]>| {
            v.map_or_else(
                || "null".to_owned(),
                |b| String::from_utf8_lossy(b).into_owned(),
            )
        };
        writeln!(
            out,
            "  offset {} ts {} key {} value {}",
            rec.offset,
            rec.timestamp,
            show(rec.key.as_deref()),
            show(rec.value.as_deref())
        )
        .map_err(|e| DumpStop::Output(e.into()))?;
    }
    Ok(())
}
