//! Idempotent producers through a partition: retries are acknowledged with the original offsets
//! and not written again, gaps and zombies are refused, and all of it survives reopening,
//! whether or not the producer-state snapshot is there.

use spool_log_engine::{BatchBuilder, Compression, Error, Partition, TopicConfig};

use crate::common::{open_topic, read_all};

fn batch(pid: i64, epoch: i16, seq: i32, n: usize) -> bytes::Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    b.producer(pid, epoch, seq);
    for i in 0..n {
        let v = format!("p{pid}-s{}", seq as usize + i);
        b.push(1000, Some(b"k"), Some(v.as_bytes()), &[]);
    }
    b.finish().unwrap()
}

fn small_segments() -> TopicConfig {
    TopicConfig {
        segment_bytes: 4096,
        ..TopicConfig::default()
    }
}

/// Appends `count` batches of 2 records for producer `pid` starting at sequence `from`.
fn send(p: &Partition, pid: i64, from: i32, count: i32) {
    for k in 0..count {
        let info = p.append(&batch(pid, 0, from + 2 * k, 2)).unwrap();
        assert!(!info.duplicate);
    }
}

#[test]
fn retries_are_acknowledged_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_topic(dir.path(), TopicConfig::default());
    let p = log.partition("t", 0).unwrap();
    let first = p.append(&batch(7, 0, 0, 3)).unwrap();
    let second = p.append(&batch(7, 0, 3, 2)).unwrap();
    let hwm = p.high_watermark();
    let again = p.append(&batch(7, 0, 0, 3)).unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.base_offset, again.last_offset),
        (first.base_offset, first.last_offset)
    );
    let again = p.append(&batch(7, 0, 3, 2)).unwrap();
    assert_eq!(
        (again.base_offset, again.last_offset),
        (second.base_offset, second.last_offset)
    );
    assert_eq!(
        p.high_watermark(),
        hwm,
        "nothing was written for the retries"
    );
    assert_eq!(read_all(&p, 0).len(), 5);

    // A gap, a zombie and an unknown producer mid-stream: refused, nothing written.
    assert!(matches!(
        p.append(&batch(7, 0, 9, 1)),
        Err(Error::OutOfOrderSequence {
            expected: 5,
            got: 9,
            ..
        })
    ));
    p.append(&batch(7, 1, 0, 1)).unwrap();
    assert!(matches!(
        p.append(&batch(7, 0, 5, 1)),
        Err(Error::ProducerFenced {
            current_epoch: 1,
            ..
        })
    ));
    assert_eq!(p.high_watermark(), hwm + 1);
}

/// Reopens with and without the snapshot (missing, damaged): the state is the same.
#[test]
fn state_survives_reopen_with_or_without_the_snapshot() {
    for damage in ["none", "missing", "garbage"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open_topic(dir.path(), small_segments());
            let p = log.partition("t", 0).unwrap();
            // Enough to roll several times (each roll writes the snapshot).
            send(&p, 1, 0, 80);
            send(&p, 2, 0, 80);
            log.close().unwrap();
        }
        let snap = dir.path().join("t/0/producers.snapshot");
        assert!(snap.exists(), "a roll writes the snapshot");
        match damage {
            "missing" => std::fs::remove_file(&snap).unwrap(),
            "garbage" => std::fs::write(&snap, b"SPPS not really a snapshot").unwrap(),
            _ => {}
        }
        let log = open_topic(dir.path(), small_segments());
        let p = log.partition("t", 0).unwrap();
        assert!(p.stats().segments > 3, "{damage}");
        let hwm = p.high_watermark();
        // The last batches of each producer are recognised as retries (one in a sealed
        // segment's state, one in the active segment's)…
        for pid in [1, 2] {
            let dup = p.append(&batch(pid, 0, 158, 2)).unwrap();
            assert!(dup.duplicate, "{damage}: producer {pid}");
        }
        assert_eq!(p.high_watermark(), hwm);
        // …and the sequences continue where they were.
        assert!(p.append(&batch(1, 0, 161, 1)).is_err(), "{damage}");
        assert!(!p.append(&batch(1, 0, 160, 1)).unwrap().duplicate);
        log.close().unwrap();
    }
}

/// Without a clean close (the process dies): recovery rebuilds the state from the log.
#[test]
fn state_survives_an_unclean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_topic(dir.path(), small_segments());
    let p = log.partition("t", 0).unwrap();
    send(&p, 5, 0, 80);
    let last = p.append(&batch(5, 0, 160, 2)).unwrap();
    // Dropping without close leaves no clean-shutdown state behind.
    drop(p);
    std::mem::forget(log);
    let dir2 = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), dir2.path());
    let _ = std::fs::remove_file(dir2.path().join(".lock"));
    let log = open_topic(dir2.path(), small_segments());
    let p = log.partition("t", 0).unwrap();
    let dup = p.append(&batch(5, 0, 160, 2)).unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.base_offset, last.base_offset);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}
