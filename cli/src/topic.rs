//! `spool topic create | list | describe | alter | add-partitions | delete`.

use std::io::Write;

use clap::Subcommand;
use serde_json::json;
use spool_client::{CleanupPolicy, Client, FsyncPolicy, TopicConfig, TopicSettings};

use crate::conn::parse_duration;
use crate::exit::{CliResult, usage};
use crate::table::{Table, human_bytes, opt};

#[derive(Debug, Subcommand)]
pub(crate) enum TopicCmd {
    /// Create a topic.
    ///
    /// Config keys (Kafka's names): retention.ms, retention.bytes (0 or "none": no limit;
    /// durations like 7d accepted for retention.ms and segment.ms), segment.bytes, segment.ms,
    /// fsync (always | never | interval:MS, e.g. interval:100), max.message.bytes,
    /// cleanup.policy (delete | compact | compact,delete), and for compacted topics
    /// delete.retention.ms, min.compaction.lag.ms, min.cleanable.dirty.ratio (0 to 1).
    ///
    /// Example: spool topic create prices --partitions 4 -c retention.ms=7d -c fsync=always
    Create {
        /// Topic name.
        name: String,
        /// Number of partitions, at least 1 [default: the broker's default].
        #[arg(long, short = 'p', value_parser = clap::value_parser!(u32).range(1..))]
        partitions: Option<u32>,
        /// Config as key=value (repeatable).
        #[arg(long = "config", short = 'c', value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Succeed if the topic already exists.
        #[arg(long)]
        if_not_exists: bool,
    },
    /// List topics.
    ///
    /// Example: spool topic list --json | jq -r '.[].topic'
    #[command(alias = "ls")]
    List {
        /// Include internal topics (names starting with __).
        #[arg(long, short = 'a')]
        all: bool,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a topic's config and each partition's offsets and size.
    ///
    /// Example: spool topic describe prices
    Describe {
        /// Topic name.
        name: String,
        /// JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Change a topic's config (only the keys given; see `create` for the keys).
    ///
    /// Example: spool topic alter prices -c retention.ms=none -c segment.bytes=268435456
    Alter {
        /// Topic name.
        name: String,
        /// Config as key=value (repeatable).
        #[arg(
            long = "config",
            short = 'c',
            value_name = "KEY=VALUE",
            required = true
        )]
        config: Vec<String>,
    },
    /// Grow a topic to a total number of partitions (keyed records may then map elsewhere;
    /// processors reading it stop unless they set allow_input_growth = true: see
    /// docs/processors.md, "Adding partitions to an input").
    ///
    /// Example: spool topic add-partitions prices --total 8
    AddPartitions {
        /// Topic name.
        name: String,
        /// The new total partition count.
        #[arg(long)]
        total: u32,
    },
    /// Delete a topic and all its data.
    ///
    /// Example: spool topic delete scratch
    #[command(alias = "rm")]
    Delete {
        /// Topic name(s).
        #[arg(required = true)]
        names: Vec<String>,
        /// Succeed if a topic does not exist.
        #[arg(long)]
        if_exists: bool,
    },
}

/// Parses `-c key=value` pairs into settings.
pub(crate) fn parse_settings(pairs: &[String]) -> CliResult<TopicSettings> {
    let mut s = TopicSettings::default();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| usage(format!("config {pair:?} is not key=value")))?;
        let (k, v) = (k.trim(), v.trim());
        let num = |v: &str| -> CliResult<u64> {
            v.parse()
                .map_err(|_| usage(format!("{k}: {v:?} is not a number")))
        };
        let ms = |v: &str| -> CliResult<u64> {
            if let Ok(n) = v.parse::<u64>() {
                return Ok(n);
            }
            let d = parse_duration(v).map_err(|e| usage(format!("{k}: {e}")))?;
            u64::try_from(d.as_millis()).map_err(|_| usage(format!("{k}: {v:?} is too long")))
        };
        let none_is_zero = |v: &str| matches!(v, "none" | "-1" | "unlimited" | "forever");
        match k {
            "retention.ms" | "retention_ms" => {
                s.retention_ms = Some(if none_is_zero(v) { 0 } else { ms(v)? });
            }
            "retention.bytes" | "retention_bytes" => {
                s.retention_bytes = Some(if none_is_zero(v) { 0 } else { num(v)? });
            }
            "segment.bytes" | "segment_bytes" => s.segment_bytes = Some(num(v)?),
            "segment.ms" | "segment_ms" => s.segment_ms = Some(ms(v)?),
            "max.message.bytes" | "max_message_bytes" => {
                s.max_message_bytes = Some(
                    u32::try_from(num(v)?).map_err(|_| usage(format!("{k}: {v} is too large")))?,
                );
            }
            "fsync" | "fsync.policy" | "fsync_policy" => {
                s.fsync = Some(match v {
                    "always" => FsyncPolicy::Always,
                    "never" => FsyncPolicy::Never,
                    v => match v.strip_prefix("interval:") {
                        Some(i) => FsyncPolicy::Interval {
                            interval_ms: ms(i)?,
                        },
                        None => {
                            return Err(usage(format!(
                                "fsync: {v:?} is not always, never or interval:MS"
                            )));
                        }
                    },
                });
            }
            "cleanup.policy" | "cleanup_policy" => {
                let mut parts: Vec<&str> = v.split(',').map(str::trim).collect();
                parts.sort_unstable();
                parts.dedup();
                s.cleanup = Some(match parts.as_slice() {
                    ["delete"] => CleanupPolicy::Delete,
                    ["compact"] => CleanupPolicy::Compact,
                    ["compact", "delete"] => CleanupPolicy::CompactDelete,
                    _ => {
                        return Err(usage(format!(
                            "cleanup.policy: {v:?} is not delete, compact or compact,delete"
                        )));
                    }
                });
            }
            "delete.retention.ms" | "delete_retention_ms" => s.delete_retention_ms = Some(ms(v)?),
            "min.compaction.lag.ms" | "min_compaction_lag_ms" => {
                s.min_compaction_lag_ms = Some(ms(v)?);
            }
            "min.cleanable.dirty.ratio" | "min_cleanable_dirty_ratio" => {
                let r: f64 = v
                    .parse()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| usage(format!("{k}: {v:?} is not a number from 0 to 1")))?;
                s.min_cleanable_dirty_percent = Some((r * 100.0).round() as u8);
            }
            other => {
                return Err(usage(format!(
                    "unknown config key {other:?} (retention.ms, retention.bytes, segment.bytes, \
                     segment.ms, fsync, max.message.bytes, cleanup.policy, delete.retention.ms, \
                     min.compaction.lag.ms, min.cleanable.dirty.ratio)"
                )));
            }
        }
    }
    Ok(s)
}

fn fsync_text(f: FsyncPolicy) -> String {
    match f {
        FsyncPolicy::Always => "always".into(),
        FsyncPolicy::Never => "never".into(),
        FsyncPolicy::Interval { interval_ms } => format!("interval:{interval_ms}"),
    }
}

fn dirty_ratio(c: &TopicConfig) -> f64 {
    f64::from(c.min_cleanable_dirty_percent) / 100.0
}

/// The compaction settings mean something (and are shown) only for compacted topics.
fn compacts(c: &TopicConfig) -> bool {
    c.cleanup != CleanupPolicy::Delete
}

fn config_rows(c: &TopicConfig) -> Vec<(&'static str, String)> {
    let mut rows = vec![
        ("retention.ms", opt(c.retention_ms)),
        ("retention.bytes", opt(c.retention_bytes)),
        ("segment.bytes", c.segment_bytes.to_string()),
        ("segment.ms", c.segment_ms.to_string()),
        ("fsync", fsync_text(c.fsync)),
        ("cleanup.policy", c.cleanup.to_string()),
    ];
    if compacts(c) {
        rows.extend([
            ("delete.retention.ms", c.delete_retention_ms.to_string()),
            ("min.compaction.lag.ms", c.min_compaction_lag_ms.to_string()),
            ("min.cleanable.dirty.ratio", dirty_ratio(c).to_string()),
        ]);
    }
    rows.push(("max.message.bytes", c.max_message_bytes.to_string()));
    rows
}

fn config_json(c: &TopicConfig) -> serde_json::Value {
    let mut v = json!({
        "retention.ms": c.retention_ms,
        "retention.bytes": c.retention_bytes,
        "segment.bytes": c.segment_bytes,
        "segment.ms": c.segment_ms,
        "fsync": fsync_text(c.fsync),
        "cleanup.policy": c.cleanup.as_str(),
        "max.message.bytes": c.max_message_bytes,
    });
    if compacts(c) {
        v["delete.retention.ms"] = json!(c.delete_retention_ms);
        v["min.compaction.lag.ms"] = json!(c.min_compaction_lag_ms);
        v["min.cleanable.dirty.ratio"] = json!(dirty_ratio(c));
    }
    v
}

pub(crate) async fn run(client: &Client, cmd: TopicCmd, out: &mut impl Write) -> CliResult {
    match cmd {
        TopicCmd::Create {
            name,
            partitions,
            config,
            if_not_exists,
        } => {
            let settings = parse_settings(&config)?;
            match client
                .create_topic(&name, partitions.unwrap_or(0), &settings)
                .await
            {
                Ok(_) => {
                    let d = client.describe_topic(&name).await?;
                    writeln!(
                        out,
                        "created topic {name} with {} partition(s)",
                        d.partitions.len()
                    )?;
                }
                Err(spool_client::Error::TopicExists { .. }) if if_not_exists => {
                    status!("topic {name} already exists");
                }
                Err(e) => return Err(e.into()),
            }
        }
        TopicCmd::List { all, json } => {
            let topics: Vec<_> = client
                .list_topics()
                .await?
                .into_iter()
                .filter(|t| all || !t.topic.starts_with("__"))
                .collect();
            if json {
                let v: Vec<_> = topics
                    .iter()
                    .map(|t| json!({"topic": t.topic, "partitions": t.partitions}))
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(v))?;
            } else {
                let mut t = Table::new(&["TOPIC", "PARTITIONS"]);
                for s in &topics {
                    t.row(vec![s.topic.clone(), s.partitions.to_string()]);
                }
                t.write(out)?;
            }
        }
        TopicCmd::Describe { name, json } => {
            let d = client.describe_topic(&name).await?;
            if json {
                let parts: Vec<_> = d
                    .partitions
                    .iter()
                    .map(|p| {
                        json!({
                            "partition": p.partition,
                            "log_start_offset": p.log_start_offset,
                            "high_watermark": p.high_watermark,
                            "records": p.high_watermark - p.log_start_offset,
                            "size_bytes": p.size_bytes,
                            "segments": p.segments,
                        })
                    })
                    .collect();
                let v = json!({"topic": d.topic, "config": config_json(&d.config), "partitions": parts});
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "NAME        {}", d.topic)?;
                writeln!(out, "PARTITIONS  {}", d.partitions.len())?;
                writeln!(out)?;
                let mut t = Table::new(&["KEY", "VALUE"]);
                for (k, v) in config_rows(&d.config) {
                    t.row(vec![k.into(), v]);
                }
                t.write(out)?;
                writeln!(out)?;
                let mut t = Table::new(&[
                    "PARTITION",
                    "LOG-START-OFFSET",
                    "HIGH-WATERMARK",
                    "RECORDS",
                    "SIZE",
                    "SEGMENTS",
                ]);
                for p in &d.partitions {
                    t.row(vec![
                        p.partition.to_string(),
                        p.log_start_offset.to_string(),
                        p.high_watermark.to_string(),
                        (p.high_watermark - p.log_start_offset).to_string(),
                        human_bytes(p.size_bytes),
                        p.segments.to_string(),
                    ]);
                }
                t.write(out)?;
            }
        }
        TopicCmd::Alter { name, config } => {
            let settings = parse_settings(&config)?;
            let now = client.alter_topic_config(&name, &settings).await?;
            writeln!(out, "altered topic {name}; config now:")?;
            let mut t = Table::new(&["KEY", "VALUE"]);
            for (k, v) in config_rows(&now) {
                t.row(vec![k.into(), v]);
            }
            t.write(out)?;
        }
        TopicCmd::AddPartitions { name, total } => {
            let n = client.add_partitions(&name, total).await?;
            writeln!(out, "topic {name} now has {n} partition(s)")?;
        }
        TopicCmd::Delete { names, if_exists } => {
            for name in names {
                match client.delete_topic(&name).await {
                    Ok(()) => writeln!(out, "deleted topic {name}")?,
                    Err(spool_client::Error::UnknownTopic { .. }) if if_exists => {
                        status!("topic {name} does not exist");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        let s = parse_settings(&[
            "retention.ms=7d".into(),
            "retention.bytes=none".into(),
            "segment.bytes=1048576".into(),
            "fsync=interval:250".into(),
            "max.message.bytes=1000".into(),
        ])
        .unwrap();
        assert_eq!(s.retention_ms, Some(7 * 24 * 3_600_000));
        assert_eq!(s.retention_bytes, Some(0));
        assert_eq!(s.segment_bytes, Some(1 << 20));
        assert_eq!(s.fsync, Some(FsyncPolicy::Interval { interval_ms: 250 }));
        assert_eq!(s.max_message_bytes, Some(1000));
        assert_eq!(s.cleanup, None);
        let s = parse_settings(&[
            "cleanup.policy=delete,compact".into(),
            "delete.retention.ms=1h".into(),
            "min.compaction.lag.ms=500".into(),
            "min.cleanable.dirty.ratio=0.25".into(),
        ])
        .unwrap();
        assert_eq!(s.cleanup, Some(CleanupPolicy::CompactDelete));
        assert_eq!(s.delete_retention_ms, Some(3_600_000));
        assert_eq!(s.min_compaction_lag_ms, Some(500));
        assert_eq!(s.min_cleanable_dirty_percent, Some(25));
        for (v, want) in [
            ("compact", CleanupPolicy::Compact),
            ("delete", CleanupPolicy::Delete),
            ("compact,delete", CleanupPolicy::CompactDelete),
        ] {
            let s = parse_settings(&[format!("cleanup.policy={v}")]).unwrap();
            assert_eq!(s.cleanup, Some(want));
        }
        for bad in [
            "retention.ms",
            "colour=blue",
            "fsync=sometimes",
            "segment.bytes=big",
            "cleanup.policy=shred",
            "cleanup.policy=compact,shred",
            "min.cleanable.dirty.ratio=1.5",
        ] {
            assert!(parse_settings(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
