//! Property test against an in-memory model: random sequences of append, read, roll,
//! retention, flush and reopen must give the model's answers.
//!
//! The model is a `Vec` of record values indexed by offset plus a log start offset. The engine
//! decides which segments retention deletes; the model checks that the new log start only
//! moves forward, stays at a segment boundary the engine reported, and that every offset from
//! it to the end still reads back exactly as written.

use proptest::prelude::*;
use spool_log_engine::{BatchBuilder, Compression, FsyncPolicy, Log, TopicConfig};

use crate::common::opts;

#[derive(Clone, Debug)]
enum Op {
    Append {
        records: u8,
        size: u16,
        compression: u8,
    },
    Read {
        at: u16,
        max_bytes: u16,
    },
    Roll,
    Retention {
        keep_bytes: u16,
    },
    Flush,
    Reopen,
    TimeLookup {
        at: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1u8..20, 0u16..600, 0u8..3).prop_map(|(records, size, compression)| Op::Append { records, size, compression }),
        4 => (any::<u16>(), 1u16..4096).prop_map(|(at, max_bytes)| Op::Read { at, max_bytes }),
        1 => Just(Op::Roll),
        1 => (0u16..8192).prop_map(|keep_bytes| Op::Retention { keep_bytes }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => any::<u16>().prop_map(|at| Op::TimeLookup { at }),
    ]
}

fn value(offset: usize, size: usize) -> Vec<u8> {
    let mut v = format!("{offset}:").into_bytes();
    v.resize(v.len() + size, b'a' + (offset % 26) as u8);
    v
}

fn run(ops: Vec<Op>, fsync: FsyncPolicy) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = TopicConfig {
        segment_bytes: 4096,
        index_interval_bytes: 128,
        fsync,
        ..TopicConfig::default()
    };
    let mut log = Log::open(dir.path(), opts()).unwrap();
    log.create_topic("t", cfg.clone()).unwrap();
    // Model: values by offset, timestamps by offset, and the log start.
    let mut values: Vec<Vec<u8>> = Vec::new();
    let mut start = 0u64;
    for op in ops {
        let p = log.partition("t", 0).unwrap();
        match op {
            Op::Append {
                records,
                size,
                compression,
            } => {
                let c =
                    [Compression::None, Compression::Lz4, Compression::Zstd][compression as usize];
                let mut b = BatchBuilder::new(c);
                for _ in 0..records {
                    let off = values.len();
                    let v = value(off, size as usize);
                    b.push(off as i64, None, Some(&v), &[]);
                    values.push(v);
                }
                let info = p.append(&b.finish().unwrap()).unwrap();
                prop_assert_eq!(info.base_offset as usize, values.len() - records as usize);
                prop_assert_eq!(info.last_offset as usize, values.len() - 1);
            }
            Op::Read { at, max_bytes } => {
                let end = values.len() as u64;
                let span = end - start + 1;
                let offset = start + u64::from(at) % span;
                let r = p.read(offset, max_bytes as usize).unwrap();
                prop_assert_eq!(r.high_watermark, end);
                prop_assert_eq!(r.log_start_offset, start);
                if offset == end {
                    prop_assert!(r.data.is_empty());
                    continue;
                }
                prop_assert!(!r.data.is_empty(), "read at {} returned nothing", offset);
                let mut expect_next = None;
                for b in r.batches() {
                    let b = b.unwrap();
                    for rec in b.records(&Default::default()).unwrap() {
                        let rec = rec.unwrap();
                        prop_assert_eq!(
                            rec.value.as_deref(),
                            Some(&values[rec.offset as usize][..])
                        );
                        prop_assert_eq!(rec.timestamp, rec.offset as i64);
                        if let Some(n) = expect_next {
                            prop_assert_eq!(rec.offset, n);
                        }
                        expect_next = Some(rec.offset + 1);
                    }
                }
                prop_assert_eq!(expect_next, Some(r.next_offset));
                prop_assert!(r.next_offset > offset);
            }
            Op::Roll => p.roll().unwrap(),
            Op::Retention { keep_bytes } => {
                // Lowering retention enforces it at once (alter_topic), and again here.
                let before = p.stats();
                let bases = p.segment_bases();
                cfg.retention_bytes = Some(u64::from(keep_bytes));
                log.alter_topic("t", cfg.clone()).unwrap();
                p.enforce_retention().unwrap();
                let after = p.stats();
                prop_assert!(after.log_start_offset >= start);
                prop_assert!(bases.contains(&after.log_start_offset));
                // Never deletes the active segment, never goes below the limit by a whole
                // segment's worth.
                prop_assert!(after.segments >= 1);
                if after.segments < before.segments {
                    prop_assert!(after.size_bytes >= u64::from(keep_bytes));
                }
                start = after.log_start_offset;
                cfg.retention_bytes = None;
                log.alter_topic("t", cfg.clone()).unwrap();
            }
            Op::Flush => {
                prop_assert_eq!(p.flush().unwrap(), values.len() as u64);
            }
            Op::Reopen => {
                drop(p);
                log.close().unwrap();
                drop(log);
                log = Log::open(dir.path(), opts()).unwrap();
                let p = log.partition("t", 0).unwrap();
                prop_assert_eq!(p.high_watermark(), values.len() as u64);
                prop_assert_eq!(p.log_start_offset(), start);
            }
            Op::TimeLookup { at } => {
                // Timestamps equal offsets here, so the answer is max(ts, start) when in range.
                let end = values.len() as i64;
                let ts = i64::from(at) % (end + 2);
                let got = p.offset_for_timestamp(ts).unwrap();
                let want = (ts < end).then(|| (ts as u64).max(start));
                prop_assert_eq!(got, want, "timestamp {}", ts);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model_fsync_never(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops, FsyncPolicy::Never)?;
    }

    #[test]
    fn engine_matches_model_fsync_always(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops, FsyncPolicy::Always)?;
    }
}
