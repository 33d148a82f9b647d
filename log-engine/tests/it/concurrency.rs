//! One writer lock, many readers: concurrent appenders and tailing readers must agree, and
//! readers must never see a partial batch or anything past the high watermark.

use std::sync::Arc;
use std::time::Duration;

use spool_log_engine::{FsyncPolicy, Limits, Log, LogOptions, Partition, TopicConfig};

use crate::common::{batch, opts, read_all};
use crate::sync_lock::{Disarm, Gate, GateFs};

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

/// Polls `f` to completion on this thread (a waker that unparks it).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_secs(1));
    }
}

/// A log in `dir` with topic "t" (`fsync = always`, 64 KiB segments); its partition 0.
fn always_partition(dir: &std::path::Path) -> (Log, Arc<Partition>) {
    let log = Log::open(dir, opts()).unwrap();
    log.create_topic(
        "t",
        TopicConfig {
            segment_bytes: 64 << 10,
            fsync: FsyncPolicy::Always,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    let p = log.partition("t", 0).unwrap();
    (log, p)
}

/// The broker's way to wait for durability: appenders on several threads `append_nowait`, ask
/// for a sync (`request_sync`; whoever gets `true` starts the sync loop on a thread of its
/// own) and await `durable`. Every waiter resolves, and only once its batch is readable
/// (under `fsync = always` the high watermark is the durable end); the loops all end.
#[test]
fn requested_syncs_cover_every_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, p) = always_partition(dir.path());
    let loops = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (p, loops) = (p.clone(), loops.clone());
            std::thread::spawn(move || {
                for i in 0..100 {
                    let info = p
                        .append_nowait(&batch(&format!("w{w}-{i}"), 2, i as i64))
                        .unwrap();
                    let next = info.last_offset + 1;
                    if p.request_sync(next) {
                        let p = p.clone();
                        let h = std::thread::spawn(move || p.run_requested_syncs());
                        loops.lock().unwrap().push(h);
                    }
                    block_on(p.durable(next)).unwrap();
                    assert!(p.high_watermark() >= next, "acknowledged but not visible");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let loops = std::mem::take(&mut *loops.lock().unwrap());
    assert!(!loops.is_empty());
    for h in loops {
        h.join().unwrap().unwrap();
    }
    assert_eq!(p.high_watermark(), 800);
    // Nothing left to sync: no loop to start.
    assert!(!p.request_sync(800));
}

/// The broker's way to make `acks = written` batches of an `fsync = always` partition visible
/// (`sync_behind`): many appenders, each calling it after its append. Callers may return
/// before their batch is durable (another caller waits to run the sync that covers it), but
/// once every caller has returned, everything appended is durable and readable.
#[test]
fn sync_behind_covers_every_append_once_all_callers_returned() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, p) = always_partition(dir.path());
    let left_early = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (p, left_early) = (p.clone(), left_early.clone());
            std::thread::spawn(move || {
                for i in 0..100 {
                    let info = p
                        .append_nowait(&batch(&format!("w{w}-{i}"), 2, i as i64))
                        .unwrap();
                    let next = info.last_offset + 1;
                    p.sync_behind(next).unwrap();
                    if p.high_watermark() < next {
                        left_early.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(p.high_watermark(), 1600, "every append durable and visible");
    // Nothing left: a call returns at once, durable.
    p.sync_behind(1600).unwrap();
    assert_eq!(p.high_watermark(), 1600);
    // Informational: how many callers left before a sync covered them (timing-dependent).
    eprintln!(
        "{} of 800 callers returned before their batch was durable",
        left_early.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// The broker's runtime-thread variant: after each append, `sync_behind_covered` first, and
/// `sync_behind` only when it says no running group commit covers the batch. Once every
/// caller has returned, everything appended is durable and visible: a batch `covered` let go
/// without a thread is synced by the caller that waited to run the next sync. (A stress test:
/// how often each branch runs depends on timing; the branches one by one, with the syncs held
/// at a gate, are [`sync_behind_covered_step_by_step`] and
/// [`sync_behind_covered_batch_is_never_published_after_the_queued_sync_fails`].)
#[test]
fn sync_behind_covered_leaves_no_batch_unsynced() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, p) = always_partition(dir.path());
    // Nothing appended: nothing to sync, covered.
    assert!(p.sync_behind_covered(0));
    let first = p.append_nowait(&batch("first", 2, 0)).unwrap();
    // No sync runs: not covered, a thread must run it.
    assert!(!p.sync_behind_covered(first.last_offset + 1));
    p.sync_behind(first.last_offset + 1).unwrap();
    assert!(p.sync_behind_covered(first.last_offset + 1));
    let skipped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (p, skipped) = (p.clone(), skipped.clone());
            std::thread::spawn(move || {
                for i in 0..100 {
                    let info = p
                        .append_nowait(&batch(&format!("w{w}-{i}"), 2, i as i64))
                        .unwrap();
                    let next = info.last_offset + 1;
                    if p.sync_behind_covered(next) {
                        skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    } else {
                        p.sync_behind(next).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(p.high_watermark(), 1602, "every append durable and visible");
    // Informational: how many appends needed no syncing thread (timing-dependent).
    eprintln!(
        "{} of 800 appends were left to a running group commit",
        skipped.load(std::sync::atomic::Ordering::Relaxed)
    );
}

/// An `fsync = always` partition whose segment fdatasyncs wait at `gate` once it is armed
/// (`sync_lock::GateFs`), and the calls set up so far: A appended and its sync (gate ticket 0)
/// held, run by a thread that called `sync_behind`; B appended during that sync, not covered
/// (that sync captured its end before B), so a second thread calls `sync_behind` for it and
/// waits to run the next sync; C appended after that, covered without a thread once the second
/// thread waits. Returns the partition, the three batches' ends, and the two threads.
#[allow(clippy::type_complexity)]
fn covered_setup(
    dir: &std::path::Path,
    gate: &Arc<Gate>,
) -> (
    Log,
    Arc<Partition>,
    [u64; 3],
    [std::thread::JoinHandle<spool_log_engine::Result<()>>; 2],
) {
    let log = Log::open(
        dir,
        LogOptions {
            background_maintenance: false,
            fs: Arc::new(GateFs {
                inner: spool_io::real(),
                gate: gate.clone(),
            }),
            ..LogOptions::default()
        },
    )
    .unwrap();
    log.create_topic(
        "t",
        TopicConfig {
            segment_bytes: 64 << 10,
            fsync: FsyncPolicy::Always,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    let p = log.partition("t", 0).unwrap();
    gate.arm();
    // Declared after the log: should an assertion below fail, the gate opens before the log's
    // close syncs. Forgotten on success: the caller's own guard takes over.
    let disarm_on_failure = Disarm(gate.clone());

    // Nothing appended: nothing to sync, covered.
    assert!(p.sync_behind_covered(0));
    let a = p.append_nowait(&batch("a", 2, 0)).unwrap().last_offset + 1;
    // No sync runs: not covered, a thread must run one.
    assert!(!p.sync_behind_covered(a));
    let pa = p.clone();
    let ta = std::thread::spawn(move || pa.sync_behind(a));
    gate.wait_begun(1);

    let b = p.append_nowait(&batch("b", 2, 1)).unwrap().last_offset + 1;
    // A sync runs, but it captured its end before B and nobody waits to run the next one.
    assert!(!p.sync_behind_covered(b));
    let pb = p.clone();
    let tb = std::thread::spawn(move || pb.sync_behind(b));

    let c = p.append_nowait(&batch("c", 2, 2)).unwrap().last_offset + 1;
    // Until B's thread waits to run the next sync, C is not covered (and a `false` records
    // nothing); from then on it is, and asking records C for that next sync.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !p.sync_behind_covered(c) {
        assert!(
            std::time::Instant::now() < deadline,
            "B's thread never took the next sync's place"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Asked again: still covered, and nothing else began or became visible meanwhile.
    assert!(p.sync_behind_covered(c));
    assert_eq!(gate.begun(), 1, "a second sync began beside the held one");
    assert_eq!(p.high_watermark(), 0, "visible before any fdatasync ended");
    std::mem::forget(disarm_on_failure);
    (log, p, [a, b, c], [ta, tb])
}

/// `sync_behind_covered` with every segment fdatasync held at a gate, so each branch is taken
/// at a known point (the stress test above only shows that no batch is left unsynced):
/// false when no sync runs, false while a sync runs that nobody waits to follow, true once a
/// `sync_behind` caller waits to run the next sync, and that next sync (which begins after the
/// covered call) makes the covered batch visible without a sync or a thread of its own.
#[test]
fn sync_behind_covered_step_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let (_log, p, [a, _b, c], [ta, tb]) = covered_setup(dir.path(), &gate);
    // Dropped first (declared last): the gate opens before the log's close syncs.
    let _disarm = Disarm(gate.clone());

    // The first sync ends: it publishes A only, and its thread leaves the next sync to B's.
    gate.release(0, None);
    ta.join().unwrap().unwrap();
    gate.wait_begun(2);
    assert_eq!(p.high_watermark(), a, "the first sync covered A only");
    // While the second sync runs, nobody waits to follow it: not covered.
    let d = p.append_nowait(&batch("d", 2, 3)).unwrap().last_offset + 1;
    assert!(!p.sync_behind_covered(d));

    gate.release(1, None);
    tb.join().unwrap().unwrap();
    assert_eq!(
        p.high_watermark(),
        c,
        "B's sync made C visible too, and nothing appended after it began"
    );
    assert_eq!(gate.begun(), 2, "C needed no sync of its own");
    assert!(p.sync_behind_covered(c), "durable: covered");
    assert!(!p.sync_behind_covered(d), "D still needs a sync");
    gate.release(2, None);
    p.sync_behind(d).unwrap();
    assert_eq!(p.high_watermark(), d);
}

/// The same steps, but the queued sync (the one a covered batch was left to) fails with EIO:
/// the partition is poisoned, the covered batch never becomes visible, nothing is retried, and
/// `sync_behind_covered` no longer says covered (a caller must not drop a batch on a poisoned
/// partition as if a sync would come).
#[test]
fn sync_behind_covered_batch_is_never_published_after_the_queued_sync_fails() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let (_log, p, [a, _b, c], [ta, tb]) = covered_setup(dir.path(), &gate);
    // Dropped first (declared last): the gate opens before the log's close syncs.
    let _disarm = Disarm(gate.clone());

    gate.release(0, None);
    ta.join().unwrap().unwrap();
    gate.wait_begun(2);
    gate.release(1, Some(libc::EIO));
    let r = tb.join().unwrap();
    assert!(r.is_err(), "the failed sync's caller got {r:?}");
    assert!(p.is_poisoned());
    assert_eq!(
        p.high_watermark(),
        a,
        "data covered only by the failed fdatasync became visible"
    );
    assert!(!p.sync_behind_covered(c));
    assert!(matches!(
        p.sync_behind(c),
        Err(spool_log_engine::Error::Poisoned { .. })
    ));
    assert_eq!(gate.begun(), 2, "a failed fdatasync was retried");
    assert_eq!(p.high_watermark(), a);
}
