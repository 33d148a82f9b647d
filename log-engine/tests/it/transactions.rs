//! Transactions through a partition: markers end transactions, read-committed readers see
//! only decided, committed data below the last stable offset, zombies and misuse are refused,
//! and all of it survives reopening (clean, unclean, with and without the snapshot).

use spool_log_engine::{
    BatchBuilder, Compression, Error, FsyncPolicy, Isolation, Log, Marker, Partition, TopicConfig,
};

use crate::common::{open_topic, opts};

fn txn_batch(pid: i64, epoch: i16, seq: i32, tag: &str) -> bytes::Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    b.producer(pid, epoch, seq).transactional(true);
    b.push(1000, Some(b"k"), Some(tag.as_bytes()), &[]);
    b.finish().unwrap()
}

fn plain(tag: &str) -> bytes::Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(1000, Some(b"k"), Some(tag.as_bytes()), &[]);
    b.finish().unwrap()
}

/// Values of the data records visible from `from` at `isolation` (control batches skipped).
fn values(p: &Partition, isolation: Isolation) -> Vec<String> {
    let mut out = Vec::new();
    let mut offset = p.log_start_offset();
    loop {
        let r = p.read_with(offset, 1 << 20, isolation).unwrap();
        if r.data.is_empty() && r.next_offset == offset {
            return out;
        }
        for b in r.batches() {
            let b = b.unwrap();
            if b.header().is_control() {
                continue;
            }
            for rec in b.records(&Default::default()).unwrap() {
                let rec = rec.unwrap();
                out.push(String::from_utf8(rec.value.unwrap().to_vec()).unwrap());
            }
        }
        offset = r.next_offset;
    }
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Producer 1 commits a, b; producer 2 aborts x, y; producer 3 leaves z open. Interleaved
/// with plain data.
fn scenario(p: &Partition) {
    p.append(&plain("p0")).unwrap(); // 0
    p.append(&txn_batch(1, 0, 0, "a")).unwrap(); // 1
    p.append(&txn_batch(2, 0, 0, "x")).unwrap(); // 2
    p.append(&plain("p1")).unwrap(); // 3
    p.append(&txn_batch(1, 0, 1, "b")).unwrap(); // 4
    p.append(&txn_batch(2, 0, 1, "y")).unwrap(); // 5
    assert_eq!(p.last_stable_offset(), 1);
    p.write_marker(2, 1, Marker::Abort, 0).unwrap().unwrap(); // 6
    assert_eq!(p.last_stable_offset(), 1, "producer 1 still open");
    p.write_marker(1, 1, Marker::Commit, 0).unwrap().unwrap(); // 7
    assert_eq!(p.last_stable_offset(), 8);
    p.append(&txn_batch(3, 0, 0, "z")).unwrap(); // 8
    p.append(&plain("p2")).unwrap(); // 9
}

fn check(p: &Partition) {
    assert_eq!(p.last_stable_offset(), 8);
    assert_eq!(
        values(p, Isolation::ReadCommitted),
        strs(&["p0", "a", "p1", "b"])
    );
    assert_eq!(
        values(p, Isolation::ReadUncommitted),
        strs(&["p0", "a", "x", "p1", "b", "y", "z", "p2"])
    );
    let open: Vec<_> = p
        .open_transactions()
        .iter()
        .map(|t| (t.producer_id, t.epoch, t.first_offset))
        .collect();
    assert_eq!(open, vec![(3, 0, 8)]);
    // Reading at the LSO gives nothing yet, and says where the LSO is.
    let r = p.read_with(8, 1 << 20, Isolation::ReadCommitted).unwrap();
    assert!(r.data.is_empty());
    assert_eq!((r.next_offset, r.last_stable_offset), (8, 8));
    // Starting inside the aborted run skips it: the data starts at the plain batch.
    let r = p.read_with(2, 1 << 20, Isolation::ReadCommitted).unwrap();
    let first = r.batches().next().unwrap().unwrap();
    assert_eq!(first.header().base_offset, 3);
}

#[test]
fn read_committed_sees_only_decided_committed_data() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_topic(dir.path(), TopicConfig::default());
    let p = log.partition("t", 0).unwrap();
    scenario(&p);
    check(&p);
    // Once 3 commits, everything is stable.
    p.write_marker(3, 1, Marker::Commit, 0).unwrap().unwrap();
    assert_eq!(p.last_stable_offset(), p.high_watermark());
    assert_eq!(
        values(&p, Isolation::ReadCommitted),
        strs(&["p0", "a", "p1", "b", "z", "p2"])
    );
}

#[test]
fn misuse_and_zombies_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_topic(dir.path(), TopicConfig::default());
    let p = log.partition("t", 0).unwrap();
    p.append(&txn_batch(1, 3, 0, "a")).unwrap();
    let hwm = p.high_watermark();
    // A plain batch from a producer in a transaction; another epoch mid-transaction.
    let mut b = BatchBuilder::new(Compression::None);
    b.producer(1, 3, 1);
    b.push(1, Some(b"k"), Some(b"v"), &[]);
    assert!(matches!(
        p.append(&b.finish().unwrap()),
        Err(Error::InvalidTxnState { .. })
    ));
    assert!(matches!(
        p.append(&txn_batch(1, 4, 0, "b")),
        Err(Error::InvalidTxnState { .. })
    ));
    // A transactional batch without a producer id.
    assert!(p.append(&txn_batch(-1, -1, -1, "c")).is_err());
    // A marker with an older epoch is fenced; a marker for nobody's transaction writes nothing.
    assert!(matches!(
        p.write_marker(1, 2, Marker::Commit, 0),
        Err(Error::ProducerFenced { .. })
    ));
    assert!(p.write_marker(9, 0, Marker::Commit, 0).unwrap().is_none());
    assert_eq!(p.high_watermark(), hwm);
    // Clients cannot write control batches.
    let marker = spool_log_engine::txn::marker_batch(1, 4, Marker::Commit, 0, 1);
    assert!(p.append(&marker).is_err());
    // The coordinator's marker bumps the epoch: a late write of the ended transaction is a
    // zombie, and the next transaction starts at the new epoch, sequence 0.
    p.write_marker(1, 4, Marker::Commit, 0).unwrap().unwrap();
    assert!(matches!(
        p.append(&txn_batch(1, 3, 1, "late")),
        Err(Error::ProducerFenced { .. })
    ));
    p.append(&txn_batch(1, 4, 0, "next")).unwrap();
    assert_eq!(p.last_stable_offset(), p.high_watermark() - 1);
}

/// Reopens after a clean close, after an unclean stop, with the snapshot (segments rolled
/// mid-scenario) and without it: the same transactions, the same committed view.
#[test]
fn survives_reopening() {
    for (clean, roll, drop_snapshot) in [
        (true, false, false),
        (false, false, false),
        (true, true, false),
        (false, true, false),
        (false, true, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open_topic(dir.path(), TopicConfig::default());
            let p = log.partition("t", 0).unwrap();
            scenario(&p);
            if roll {
                p.roll().unwrap();
                p.append(&plain("p3")).unwrap();
            }
            if clean {
                log.close().unwrap();
            }
        }
        if drop_snapshot {
            std::fs::remove_file(dir.path().join("t/0/producers.snapshot")).unwrap();
        }
        let log = Log::open(dir.path(), opts()).unwrap();
        let p = log.partition("t", 0).unwrap();
        let case = format!("clean {clean}, roll {roll}, drop snapshot {drop_snapshot}");
        assert_eq!(p.last_stable_offset(), 8, "{case}");
        let committed = values(&p, Isolation::ReadCommitted);
        assert_eq!(committed, strs(&["p0", "a", "p1", "b"]), "{case}");
        assert_eq!(p.open_transactions().len(), 1, "{case}");
        // The coordinator can still end the open transaction after the restart.
        p.write_marker(3, 1, Marker::Abort, 0).unwrap().unwrap();
        let mut want = strs(&["p0", "a", "p1", "b", "p2"]);
        if roll {
            want.push("p3".into());
        }
        assert_eq!(values(&p, Isolation::ReadCommitted), want, "{case}");
    }
}

/// Under `fsync = always`, a marker is as durable as any batch before `write_marker` returns,
/// and the LSO moves with it.
#[test]
fn markers_are_durable_under_fsync_always() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TopicConfig {
        fsync: FsyncPolicy::Always,
        ..TopicConfig::default()
    };
    let log = open_topic(dir.path(), cfg);
    let p = log.partition("t", 0).unwrap();
    p.append(&txn_batch(5, 0, 0, "a")).unwrap();
    assert_eq!(p.last_stable_offset(), 0);
    let m = p.write_marker(5, 1, Marker::Commit, 0).unwrap().unwrap();
    assert_eq!(p.high_watermark(), m.last_offset + 1);
    assert_eq!(p.last_stable_offset(), p.high_watermark());
    drop(log); // unclean
    let log = Log::open(dir.path(), opts()).unwrap();
    let p = log.partition("t", 0).unwrap();
    assert_eq!(values(&p, Isolation::ReadCommitted), strs(&["a"]));
}

/// A marker carries the wall-clock time it was written (here: now, far after the records'
/// event times): a timestamp lookup finds the data record, never the marker.
#[test]
fn a_timestamp_lookup_skips_transaction_markers() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_topic(dir.path(), TopicConfig::default());
    let p = log.partition("t", 0).unwrap();
    let at = |epoch: i16, ts: i64| {
        let mut b = BatchBuilder::new(Compression::None);
        b.producer(1, epoch, 0).transactional(true);
        b.push(ts, Some(b"k"), Some(b"v"), &[]);
        b.finish().unwrap()
    };
    // Each end bumps the epoch; the next transaction uses it.
    p.append(&at(0, 1000)).unwrap(); // 0
    p.write_marker(1, 1, Marker::Commit, 0).unwrap().unwrap(); // 1, wall-clock time
    p.append(&at(1, 1001)).unwrap(); // 2
    p.write_marker(1, 2, Marker::Commit, 0).unwrap().unwrap(); // 3
    p.append(&at(2, 2000)).unwrap(); // 4
    p.write_marker(1, 3, Marker::Commit, 0).unwrap().unwrap(); // 5
    assert_eq!(p.offset_for_timestamp(1000).unwrap(), Some(0));
    assert_eq!(
        p.offset_for_timestamp(1001).unwrap(),
        Some(2),
        "landed on a marker"
    );
    assert_eq!(
        p.offset_for_timestamp(1500).unwrap(),
        Some(4),
        "landed on a marker"
    );
    assert_eq!(
        p.offset_for_timestamp(2001).unwrap(),
        None,
        "only markers are newer"
    );
}
