//! One writer lock, many readers: concurrent appenders and tailing readers must agree, and
//! readers must never see a partial batch or anything past the high watermark.

use std::sync::Arc;
use std::time::Duration;

use spool_log_engine::{FsyncPolicy, Limits, Log, LogOptions, TopicConfig};

use crate::common::{batch, opts, read_all};

fn run(fsync: FsyncPolicy) {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    log.create_topic(
        "t",
        TopicConfig {
            segment_bytes: 16 << 10,
            index_interval_bytes: 512,
            fsync,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    let p = log.partition("t", 0).unwrap();
    const WRITERS: usize = 3;
    const BATCHES: usize = 150;
    let total = (WRITERS * BATCHES * 2) as u64;
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                // Tail the partition from 0: every offset exactly once, in order, each batch
                // whole and CRC-valid (the engine checks; the decoder re-checks structure).
                let mut next = 0u64;
                while next < total {
                    let hwm = p.wait_for_data(next, Duration::from_secs(10));
                    assert!(hwm > next, "no progress at {next} (hwm {hwm})");
                    let r = p.read(next, 4096).unwrap();
                    assert!(r.next_offset <= r.high_watermark);
                    for b in r.batches() {
                        let b = b.unwrap();
                        assert!(b.header().last_offset() < r.high_watermark);
                        for rec in b.records(&Default::default()).unwrap() {
                            let rec = rec.unwrap();
                            assert!(rec.offset >= next);
                            next = rec.offset + 1;
                        }
                    }
                    assert_eq!(next, r.next_offset);
                }
                next
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut offsets = Vec::new();
                for i in 0..BATCHES {
                    let info = p.append(&batch(&format!("w{w}-{i}"), 2, i as i64)).unwrap();
                    offsets.push(info.base_offset);
                }
                offsets
            })
        })
        .collect();
    let mut all: Vec<u64> = writers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), total);
    }
    all.sort_unstable();
    let want: Vec<u64> = (0..total).step_by(2).collect();
    assert_eq!(all, want, "{fsync}: every batch got its own dense offsets");
    // Each writer's batches are in the log in the order it appended them.
    let recs = read_all(&p, 0);
    for w in 0..WRITERS {
        let mine: Vec<_> = recs
            .iter()
            .filter_map(|r| {
                let k = String::from_utf8(r.key.clone().unwrap().to_vec()).unwrap();
                k.strip_prefix(&format!("w{w}-"))
                    .map(|i| i.parse::<usize>().unwrap())
            })
            .collect();
        let sorted: Vec<_> = (0..BATCHES).flat_map(|i| [i, i]).collect();
        assert_eq!(mine, sorted);
    }
}

#[test]
fn concurrent_appenders_and_readers_fsync_always() {
    run(FsyncPolicy::Always);
}

#[test]
fn concurrent_appenders_and_readers_fsync_never() {
    run(FsyncPolicy::Never);
}

#[test]
fn mapped_segments_stay_under_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_mapped_segments: 2,
        ..Limits::default()
    };
    let log = Log::open(dir.path(), LogOptions { limits, ..opts() }).unwrap();
    log.create_topic(
        "t",
        TopicConfig {
            segment_bytes: 4096,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    let p = Arc::new(log.partition("t", 0).unwrap());
    for i in 0..400 {
        p.append(&batch(&format!("m{i}"), 3, i)).unwrap();
    }
    assert!(p.segment_bases().len() > 10);
    for _ in 0..2 {
        assert_eq!(read_all(&p, 0).len(), 1200);
        assert!(
            log.mapped_segments() <= 2,
            "{} sealed segments mapped",
            log.mapped_segments()
        );
    }
}
