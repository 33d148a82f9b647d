//! Rolling by size and age, retention by time and size, and the rule that a deleted
//! segment's files outlive every reader that still holds its bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use spool_log_engine::{Clock, Error, Log, LogOptions, TopicConfig};

use crate::common::{batch, read_all};

#[derive(Debug, Default)]
struct FakeClock(AtomicI64);
impl Clock for FakeClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn open(dir: &std::path::Path, clock: Arc<FakeClock>) -> Log {
    Log::open(
        dir,
        LogOptions {
            clock,
            background_maintenance: false,
            ..LogOptions::default()
        },
    )
    .unwrap()
}

fn files(dir: &std::path::Path, suffix: &str) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    v.sort();
    v
}

#[test]
fn rolls_by_age_and_deletes_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000)));
    let log = open(dir.path(), clock.clone());
    let cfg = TopicConfig {
        segment_ms: 1000,
        retention_ms: Some(10_000),
        ..TopicConfig::default()
    };
    log.create_topic("t", cfg).unwrap();
    let p = log.partition("t", 0).unwrap();
    // Three segments, one per simulated second; record timestamps follow the clock.
    for i in 0..3 {
        let now = clock.now_ms();
        p.append(&batch(&format!("s{i}"), 2, now)).unwrap();
        clock.0.fetch_add(1500, Ordering::SeqCst);
    }
    p.append(&batch("last", 1, clock.now_ms())).unwrap();
    assert_eq!(
        p.segment_bases(),
        vec![0, 2, 4, 6],
        "one roll per elapsed segment_ms"
    );
    assert_eq!(p.enforce_retention().unwrap(), 0, "nothing is 10 s old yet");
    // At +11.2 s the cutoff is +1.2 s: the first segment (records at +0 s) is past it, the
    // second (records at +1.5 s) is not.
    clock.0.store(1_000_000 + 11_200, Ordering::SeqCst);
    assert_eq!(p.enforce_retention().unwrap(), 1);
    assert_eq!(p.log_start_offset(), 2);
    assert!(matches!(
        p.read(0, 100),
        Err(Error::OffsetOutOfRange { log_start: 2, .. })
    ));
    // Far in the future every sealed segment goes, the active one stays.
    clock.0.store(10_000_000, Ordering::SeqCst);
    assert_eq!(p.enforce_retention().unwrap(), 2);
    assert_eq!(p.segment_bases(), vec![6]);
    assert_eq!(read_all(&p, 6).len(), 1);
    assert_eq!(files(p.dir(), ".log"), vec!["00000000000000000006.log"]);
    // Offsets are never reused after retention, also across a reopen.
    drop(p);
    log.close().unwrap();
    drop(log);
    let log = open(dir.path(), clock);
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.log_start_offset(), 6);
    assert_eq!(
        p.append(&batch("again", 1, 10_000_000))
            .unwrap()
            .base_offset,
        7
    );
}

#[test]
fn deletes_by_size_but_never_under_a_reader() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock(AtomicI64::new(0)));
    let log = open(dir.path(), clock);
    let cfg = TopicConfig {
        segment_bytes: 4096,
        retention_bytes: Some(8192),
        ..TopicConfig::default()
    };
    log.create_topic("t", cfg).unwrap();
    let p = log.partition("t", 0).unwrap();
    for i in 0..300 {
        p.append(&batch(&format!("r{i}"), 4, i)).unwrap();
    }
    let before = p.stats();
    assert!(before.segments > 4);
    // A reader holds a zero-copy slice of the oldest segment.
    let held = p.read(0, 1 << 20).unwrap();
    let held_copy = held.data.to_vec();
    let deleted = p.enforce_retention().unwrap();
    assert!(deleted > 0);
    let after = p.stats();
    assert!(
        after.size_bytes >= 8192,
        "keeps at least retention_bytes: {after:?}"
    );
    assert!(
        after.size_bytes < 8192 + 4096 + 1024,
        "and not a whole segment more: {after:?}"
    );
    // The deleted segment's file is renamed, not unlinked, while the slice is alive.
    let pdir = p.dir().to_path_buf();
    assert!(!files(&pdir, ".log.deleted").is_empty());
    assert_eq!(
        held.data.to_vec(),
        held_copy,
        "the reader's bytes are intact"
    );
    drop(held);
    assert!(
        files(&pdir, ".log.deleted").is_empty(),
        "unlinked once the last reader let go"
    );
    assert_eq!(
        read_all(&p, p.log_start_offset()).len() as u64,
        p.high_watermark() - p.log_start_offset()
    );
}

/// Finding 2 of review-audit-engine: a handle to a deleted topic's partition (a maintenance
/// pass lists the partitions before it runs retention on them) must not run retention, by
/// file name, in the directory of a re-created topic of the same name. Before the fix it
/// renamed the new topic's active segment `00000000000000000000.log` away (and unlinked it
/// once the old handle dropped): the new topic's acknowledged records were lost.
#[test]
fn retention_through_a_deleted_topics_handle_leaves_a_recreated_topic_alone() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock(AtomicI64::new(0)));
    let log = open(dir.path(), clock.clone());
    let cfg = TopicConfig {
        segment_bytes: 4096,
        retention_bytes: Some(4096),
        ..TopicConfig::default()
    };
    log.create_topic("t", cfg.clone()).unwrap();
    let old = log.partition("t", 0).unwrap();
    for i in 0..300 {
        old.append(&batch(&format!("old{i}"), 4, i)).unwrap();
    }
    assert!(old.stats().segments > 3);
    log.delete_topic("t").unwrap();
    log.create_topic("t", cfg).unwrap();
    let new = log.partition("t", 0).unwrap();
    for i in 0..3 {
        new.append(&batch(&format!("new{i}"), 4, i)).unwrap();
    }
    let retention = old.enforce_retention();
    let lookup = old.offset_for_timestamp(0);
    assert!(
        matches!(lookup, Err(Error::TopicDeleted { .. })),
        "a timestamp lookup through a deleted topic's handle: {lookup:?}"
    );
    drop(old);
    drop(new);
    drop(log);
    let log = open(dir.path(), clock);
    let p = log.partition("t", 0).unwrap();
    let got: Vec<String> = read_all(&p, 0)
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(got.len(), 12, "the new topic's records: {got:?}");
    assert!(got.iter().all(|v| v.starts_with("new")), "{got:?}");
    assert!(
        matches!(retention, Ok(0)),
        "a closed partition runs no retention: {retention:?}"
    );
}

/// The guard behind finding 2 of review-audit-engine: a sealed segment is opened and mapped by
/// file name when it is first read. A file found there that is shorter than the segment (one
/// put under its name, as a re-created topic's segment could be) is refused, instead of being
/// mapped past its end, where reading it would kill the process with SIGBUS.
#[test]
fn a_sealed_segment_replaced_by_a_shorter_file_is_refused_not_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock(AtomicI64::new(0)));
    let log = open(dir.path(), clock.clone());
    let cfg = TopicConfig {
        segment_bytes: 64 << 10,
        ..TopicConfig::default()
    };
    log.create_topic("t", cfg).unwrap();
    let p = log.partition("t", 0).unwrap();
    for i in 0..1500 {
        p.append(&batch(&format!("r{i}"), 4, i)).unwrap();
    }
    assert!(p.stats().segments > 2);
    drop(p);
    drop(log);
    let log = open(dir.path(), clock);
    let p = log.partition("t", 0).unwrap();
    let pdir = dir.path().join("t/0");
    let seg0 = std::fs::read(pdir.join("00000000000000000000.log")).unwrap();
    assert!(seg0.len() > 32 << 10);
    // Its first page, as it was: the batches there parse, the rest of the mapping would not
    // be backed by the file.
    let tmp = pdir.join("replacement");
    std::fs::write(&tmp, &seg0[..4096]).unwrap();
    std::fs::rename(&tmp, pdir.join("00000000000000000000.log")).unwrap();
    let err = p.read(0, 1 << 20).unwrap_err();
    assert!(matches!(err, Error::Corruption { .. }), "{err}");
    // The other segments still read.
    let next = p.segment_bases()[1];
    assert!(!read_all(&p, next).is_empty());
}
