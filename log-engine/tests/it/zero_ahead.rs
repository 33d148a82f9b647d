//! Zeroing ahead of the writer (`fsync = always`, `LogOptions::zero_ahead_bytes`): the active
//! segment's file runs past its last batch by zeros written and synced ahead of the writer.
//!
//! The tests turn background maintenance off (`common::opts`), so zeroing runs exactly when a
//! test calls `Log::run_maintenance`; one runs it as spoold does, on the write-back thread
//! (`the_background_job_zeroes_ahead_while_appends_and_rolls_go_on`), and crash.rs has a kill
//! -9 loop with zeroing on. They check that the writer appends into the zeros, that
//! close and roll cut them (sealed segments end on their last batch), that recovery after
//! `kill -9` (a directory copied while the log is open) or a power cut takes a zero tail for
//! end-of-data (reported apart, nothing kept aside) while a torn batch followed by zeros, or
//! garbage after zeros, is still a torn tail; and that an I/O error on the zeroing's sync
//! poisons the partition while a full disk only stops the zeroing.

use std::path::{Path, PathBuf};

use spool_log_engine::io::sim::{CutModel, Effect, Fault, OpKind, SimFs, SimRng};
use spool_log_engine::{
    BatchBuilder, Compression, Error, FsyncPolicy, Log, LogOptions, TopicConfig, inspect,
};

use crate::common::{batch, batch_spans, copy_dir, opts, read_all, report, scratch, values};

/// How far ahead the tests zero (the smallest window there is).
const WINDOW: u64 = spool_log_engine::MIN_ZERO_AHEAD_BYTES;

fn zopts() -> LogOptions {
    LogOptions {
        zero_ahead_bytes: WINDOW,
        ..opts()
    }
}

fn cfg(segment_bytes: u64) -> TopicConfig {
    TopicConfig {
        segment_bytes,
        fsync: FsyncPolicy::Always,
        ..TopicConfig::default()
    }
}

fn open(dir: &Path, options: LogOptions, segment_bytes: u64) -> Log {
    let log = Log::open(dir, options).unwrap();
    if log.topic_config("t").is_err() {
        log.create_topic("t", cfg(segment_bytes)).unwrap();
    }
    log
}

/// The last segment file of `t/0` under `dir`.
fn last_segment(dir: &Path) -> PathBuf {
    crate::common::segment_files(&dir.join("t").join("0"))
        .pop()
        .unwrap()
}

/// Values `"{tag}-{i}"` of `n` records.
fn expect(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{i}")).collect()
}

/// A directory image taken while the log was open (as after `kill -9`): `before` batches,
/// zeroing, `after` more batches (all acknowledged, so synced). Returns the image, the last
/// segment's path in it, its logical end and the values written.
fn kill9_image(before: usize, after: usize) -> (tempfile::TempDir, PathBuf, u64, Vec<String>) {
    let src = scratch();
    let log = open(src.path(), zopts(), 1 << 20);
    let p = log.partition("t", 0).unwrap();
    let mut want = Vec::new();
    for i in 0..before {
        let tag = format!("b{i}");
        p.append(&batch(&tag, 5, 1)).unwrap();
        want.extend(expect(&tag, 5));
    }
    log.run_maintenance().unwrap();
    for i in 0..after {
        let tag = format!("a{i}");
        p.append(&batch(&tag, 5, 1)).unwrap();
        want.extend(expect(&tag, 5));
    }
    let end = p.stats().size_bytes;
    let img = scratch();
    copy_dir(src.path(), img.path());
    drop(log);
    let seg = last_segment(img.path());
    (img, seg, end, want)
}

#[test]
fn the_writer_appends_into_zeros_and_close_cuts_them() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), zopts(), 1 << 20);
    let p = log.partition("t", 0).unwrap();
    let mut want = Vec::new();
    p.append(&batch("first", 3, 1)).unwrap();
    want.extend(expect("first", 3));
    let seg = last_segment(dir.path());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), p.stats().size_bytes);
    log.run_maintenance().unwrap();
    let end = p.stats().size_bytes;
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        (end + WINDOW).next_multiple_of(4096),
        "zeroed a window ahead of the writer, to a block boundary"
    );
    for i in 0..200 {
        let tag = format!("r{i}");
        p.append(&batch(&tag, 4, 1)).unwrap();
        want.extend(expect(&tag, 4));
        if i % 10 == 0 {
            log.run_maintenance().unwrap();
        }
        let end = p.stats().size_bytes;
        let file = std::fs::read(&seg).unwrap();
        assert!(file.len() as u64 >= end);
        assert!(
            file[end as usize..].iter().all(|&b| b == 0),
            "only zeros past the data"
        );
        assert!(file.len() as u64 <= end + WINDOW + 4096);
    }
    assert_eq!(values(&read_all(&p, 0)), want);
    let end = p.stats().size_bytes;
    log.close().unwrap();
    drop(log);
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        end,
        "close cut the zero tail"
    );
    let log = open(dir.path(), zopts(), 1 << 20);
    let r = report(&log, 0);
    assert_eq!((r.bytes_zero_tail, r.bytes_truncated), (0, 0));
    assert_eq!(values(&read_all(&log.partition("t", 0).unwrap(), 0)), want);
}

#[test]
fn after_kill_9_a_zero_tail_is_end_of_data() {
    let (img, seg, end, want) = kill9_image(4, 6);
    let len = std::fs::metadata(&seg).unwrap().len();
    assert!(
        len > end,
        "the image has a zero tail ({len} bytes, data {end})"
    );
    let (log, warned) = warnings_while(|| open(img.path(), zopts(), 1 << 20));
    let r = report(&log, 0);
    assert_eq!(r.bytes_zero_tail, len - end);
    assert_eq!(r.bytes_truncated, 0);
    assert!(r.quarantined.is_empty(), "zeros are not kept aside");
    // The warning states what recovery knows, not a cause it cannot tell apart from another.
    assert!(
        warned.contains("cutting the zero tail after the last batch, taken for end-of-data"),
        "{warned:?}"
    );
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        end,
        "cut to the data"
    );
    let p = log.partition("t", 0).unwrap();
    assert_eq!(values(&read_all(&p, 0)), want);
    let next = p.append(&batch("later", 2, 1)).unwrap();
    assert_eq!(next.base_offset, want.len() as u64);
}

#[test]
fn a_torn_batch_followed_by_zeros_is_a_torn_tail() {
    let (img, seg, end, want) = kill9_image(4, 6);
    let mut data = std::fs::read(&seg).unwrap();
    let spans = batch_spans(&data[..end as usize]);
    let last = *spans.last().unwrap();
    // The last batch's second half never reached the disk: zeros from there on.
    let cut = last.pos + last.len / 2;
    data[cut as usize..end as usize].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let len = data.len() as u64;
    let log = open(img.path(), zopts(), 1 << 20);
    let r = report(&log, 0);
    assert_eq!(r.bytes_truncated, len - last.pos, "cut from the torn batch");
    assert_eq!(r.bytes_zero_tail, 0);
    assert_eq!(r.quarantined.len(), 1, "a torn tail is kept aside");
    let got = values(&read_all(&log.partition("t", 0).unwrap(), 0));
    assert_eq!(got, want[..want.len() - 5]);
}

#[test]
fn garbage_after_zeros_is_a_torn_tail() {
    let (img, seg, end, want) = kill9_image(2, 3);
    let mut data = std::fs::read(&seg).unwrap();
    let len = data.len();
    data[len - 1] = 0x5a;
    std::fs::write(&seg, &data).unwrap();
    let log = open(img.path(), zopts(), 1 << 20);
    let r = report(&log, 0);
    assert_eq!(r.bytes_truncated, len as u64 - end);
    assert_eq!(r.bytes_zero_tail, 0);
    assert_eq!(r.quarantined.len(), 1);
    assert_eq!(values(&read_all(&log.partition("t", 0).unwrap(), 0)), want);
}

#[test]
fn offline_inspection_reports_the_zero_tail_and_sealed_segments_end_on_their_last_batch() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the writer rolls with zeros ahead of it every few batches.
    let log = open(dir.path(), zopts(), 4096);
    let p = log.partition("t", 0).unwrap();
    let mut want = Vec::new();
    for i in 0..120 {
        let tag = format!("r{i}");
        p.append(&batch(&tag, 8, 1)).unwrap();
        want.extend(expect(&tag, 8));
        log.run_maintenance().unwrap();
    }
    assert!(p.segment_bases().len() > 2, "rolled");
    let active = last_segment(dir.path());
    let len = std::fs::metadata(&active).unwrap().len();
    let end = p.stats().size_bytes
        - crate::common::segment_files(&dir.path().join("t").join("0"))
            .iter()
            .filter(|s| **s != active)
            .map(|s| std::fs::metadata(s).unwrap().len())
            .sum::<u64>();
    assert!(len > end, "the active segment has zeros ahead");
    let ins = inspect::inspect_partition(&dir.path().join("t").join("0")).unwrap();
    assert!(ins.findings.is_empty(), "{:?}", ins.findings);
    let (last, sealed) = ins.segments.split_last().unwrap();
    assert_eq!(last.zero_tail_bytes, len - end);
    assert_eq!(last.bytes, end);
    for s in sealed {
        assert_eq!(s.zero_tail_bytes, 0);
        let data = std::fs::read(&s.path).unwrap();
        let spans = batch_spans(&data);
        assert_eq!(spans.last().unwrap().end(), data.len() as u64, "{s:?}");
    }
    let mut dumped = 0;
    let zero = inspect::dump_segment(&active, |_, _| dumped += 1).unwrap();
    assert!(dumped > 0);
    assert_eq!(
        zero,
        Some(inspect::ZeroTail {
            position: end,
            bytes: len - end
        }),
        "dump says where it stopped"
    );
    assert_eq!(values(&read_all(&p, 0)), want);
    drop(p);
    log.close().unwrap();
    // Zeros where a sealed segment's last batch was: corruption for verify and for dump (it
    // stopped there quietly before), after the batches before them.
    let sealed = &sealed[0].path;
    let mut data = std::fs::read(sealed).unwrap();
    let spans = batch_spans(&data);
    let cut = spans.last().unwrap().pos;
    data[cut as usize..].fill(0);
    std::fs::write(sealed, &data).unwrap();
    let ins = inspect::inspect_partition(&dir.path().join("t").join("0")).unwrap();
    assert_eq!(ins.worst(), Some(inspect::Severity::Corruption), "{ins:?}");
    let mut dumped = 0;
    match inspect::dump_segment(sealed, |_, _| dumped += 1) {
        Err(Error::Corruption { position, .. }) => assert_eq!(position, cut),
        other => panic!("expected corruption, got {other:?}"),
    }
    assert_eq!(dumped, spans.len() - 1);
}

/// The log on the simulated disk (zeroing on, 1 MiB segments), opened or reopened.
fn sim_open(sim: &SimFs) -> Log {
    open(
        Path::new("/spool"),
        LogOptions {
            fs: sim.fs(),
            ..zopts()
        },
        1 << 20,
    )
}

/// A log on the simulated disk with one `fsync = always` partition holding one acknowledged
/// batch.
fn sim_log(sim: &SimFs) -> (Log, std::sync::Arc<spool_log_engine::Partition>) {
    let log = sim_open(sim);
    let p = log.partition("t", 0).unwrap();
    p.append(&batch("acked", 5, 1)).unwrap();
    (log, p)
}

fn sim_len(sim: &SimFs, p: &spool_log_engine::Partition) -> u64 {
    sim.fs().metadata(&p.active_segment_path()).unwrap().len
}

#[test]
fn an_io_error_on_the_zeroing_sync_poisons() {
    let sim = SimFs::new();
    let (log, p) = sim_log(&sim);
    let end = p.stats().size_bytes;
    sim.inject(Fault::on(OpKind::SyncData, ".log", Effect::Fail(libc::EIO)).times(1));
    log.run_maintenance().unwrap();
    assert!(p.is_poisoned(), "a failed fdatasync of the segment poisons");
    assert!(matches!(
        p.append(&batch("refused", 1, 1)),
        Err(Error::Poisoned { .. })
    ));
    drop(p);
    drop(log);
    // Reopened (the process still sees the zeros): the zero tail is cut, the data stays.
    let log = sim_open(&sim);
    assert_eq!(
        report(&log, 0).bytes_zero_tail,
        (end + WINDOW).next_multiple_of(4096) - end
    );
    let p = log.partition("t", 0).unwrap();
    assert_eq!(values(&read_all(&p, 0)), expect("acked", 5));
}

#[test]
fn a_full_disk_stops_the_zeroing_and_appends_go_on() {
    let sim = SimFs::new();
    let (log, p) = sim_log(&sim);
    let end = p.stats().size_bytes;
    sim.set_capacity(Some(sim.used() + (8 << 10)));
    log.run_maintenance().unwrap();
    assert!(
        !p.is_poisoned(),
        "out of space while zeroing is not a failure"
    );
    assert_eq!(sim_len(&sim, &p), end, "the zeros were cut off again");
    p.append(&batch("more", 3, 1)).unwrap();
    sim.set_capacity(None);
    // Stopped for this segment: no more zeroing until it rolls.
    log.run_maintenance().unwrap();
    assert_eq!(sim_len(&sim, &p), p.stats().size_bytes);
    let mut want = expect("acked", 5);
    want.extend(expect("more", 3));
    assert_eq!(values(&read_all(&p, 0)), want);
}

#[test]
fn a_power_cut_around_the_zeroing_loses_nothing_acknowledged() {
    // Cut before each mutating operation of the zeroing pass (its write, its sync) and after
    // it, under several cut models; then the acknowledged batch is all there is, and the
    // tail, whatever of the zeros survived, is a zero tail, never a torn one.
    let mut rng = SimRng::new(14);
    for k in 0..=2u64 {
        for model in [
            CutModel::LOSE_UNSYNCED,
            CutModel {
                sector: 512,
                keep: 0.5,
                reorder: true,
            },
            CutModel {
                sector: 4096,
                keep: 0.7,
                reorder: false,
            },
        ] {
            let sim = SimFs::new();
            let (log, p) = sim_log(&sim);
            let ops = sim.ops();
            sim.cut_before(ops + k);
            let _ = log.run_maintenance();
            sim.cut();
            drop(p);
            drop(log);
            sim.restart(&model, &mut rng);
            let log = sim_open(&sim);
            let r = report(&log, 0);
            assert_eq!(r.bytes_truncated, 0, "cut before op +{k}, {model:?}: {r:?}");
            assert!(r.quarantined.is_empty());
            let p = log.partition("t", 0).unwrap();
            assert_eq!(
                values(&read_all(&p, 0)),
                expect("acked", 5),
                "cut before op +{k}, {model:?}"
            );
            assert_eq!(sim_len(&sim, &p), p.stats().size_bytes, "zeros cut");
        }
    }
}

thread_local! {
    /// What this thread logged at WARN or above since [`warnings_while`] cleared it.
    static WARNINGS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Appends to this thread's [`WARNINGS`].
struct ThisThread;

impl std::io::Write for ThisThread {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        WARNINGS.with_borrow_mut(|w| w.extend_from_slice(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What `f` logged at WARN or above on this thread (recovery runs on the thread that opens
/// the log), and its result. The subscriber is process-wide (installed once, writing to each
/// thread's own buffer), not scoped: tracing caches a callsite's interest when it is first
/// hit, and a scoped subscriber would let another test's thread, without one, cache "never"
/// for the same warning (tokio-rs/tracing#3611).
fn warnings_while<T>(f: impl FnOnce() -> T) -> (T, String) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| ThisThread)
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("the only global subscriber of this test binary");
    });
    WARNINGS.with_borrow_mut(Vec::clear);
    let out = f();
    let text = WARNINGS.with_borrow_mut(std::mem::take);
    (out, String::from_utf8(text).unwrap())
}

/// A torn tail of zeros only was cut and kept aside, its copy holds only zeros, and the
/// warning says so and names both causes that leave one (recovery cannot tell them apart):
/// zeros written ahead before a restart without zeroing, and appended bytes a crash or a
/// disk fault left as zeros.
fn assert_zeros_only_kept_aside(r: &spool_log_engine::RecoveryReport, warned: &str) {
    assert_eq!(r.quarantined.len(), 1, "{r:?}");
    let copy = std::fs::read(&r.quarantined[0]).unwrap();
    assert_eq!(copy.len() as u64, r.bytes_truncated);
    assert!(
        copy.iter().all(|&b| b == 0),
        "the kept copy holds only zeros"
    );
    let line = warned
        .lines()
        .find(|l| l.contains("torn tail of zeros only"))
        .unwrap_or_else(|| panic!("no zeros-only warning in {warned:?}"));
    for says in [
        "the kept copy holds only zeros, no batch",
        "zeros written ahead (zero_ahead_bytes) that this open does not take for a zero tail",
        "appended bytes a crash or a disk fault left as zeros",
    ] {
        assert!(line.contains(says), "{says:?} not in {line:?}");
    }
}

#[test]
fn with_zeroing_off_zeros_after_the_last_batch_are_a_torn_tail() {
    // The same kill -9 image, opened by a log that does not zero ahead: zeros it could not have
    // written are what they were before zeroing existed, a torn tail kept aside.
    let (img, seg, end, want) = kill9_image(2, 3);
    let len = std::fs::metadata(&seg).unwrap().len();
    let (log, warned) = warnings_while(|| open(img.path(), opts(), 1 << 20));
    let r = report(&log, 0);
    assert_eq!((r.bytes_truncated, r.bytes_zero_tail), (len - end, 0));
    assert_zeros_only_kept_aside(&r, &warned);
    assert_eq!(values(&read_all(&log.partition("t", 0).unwrap(), 0)), want);
}

#[test]
fn zeros_a_crash_or_disk_fault_left_without_zeroing_are_a_torn_tail_with_the_same_warning() {
    // A log that never zeroed ahead, its last batch written but not acknowledged (not synced,
    // past the recovery point) when the process died, and read back as zeros (a disk fault,
    // or an extended file whose data never reached the disk): the same torn tail of zeros
    // only as above, and the same warning, true of this cause too.
    let src = scratch();
    let log = open(src.path(), opts(), 1 << 20);
    let p = log.partition("t", 0).unwrap();
    let mut want = Vec::new();
    for i in 0..3 {
        let tag = format!("a{i}");
        p.append(&batch(&tag, 5, 1)).unwrap();
        want.extend(expect(&tag, 5));
    }
    p.append_nowait(&batch("unacknowledged", 5, 1)).unwrap();
    let img = scratch();
    copy_dir(src.path(), img.path());
    drop(p);
    drop(log);
    let seg = last_segment(img.path());
    let mut data = std::fs::read(&seg).unwrap();
    let last = *batch_spans(&data).last().unwrap();
    assert_eq!(last.pos + last.len, data.len() as u64, "no zeros ahead");
    data[last.pos as usize..].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let (log, warned) = warnings_while(|| open(img.path(), opts(), 1 << 20));
    let r = report(&log, 0);
    assert_eq!((r.bytes_truncated, r.bytes_zero_tail), (last.len, 0));
    assert_zeros_only_kept_aside(&r, &warned);
    assert_eq!(values(&read_all(&log.partition("t", 0).unwrap(), 0)), want);
}

#[test]
fn zeroed_batches_below_the_recovery_point_are_corruption() {
    // Acknowledged, checkpointed batches that read back as zeros to the end of the file (lost
    // write-back, a disk fault) are not a zero tail, for recovery and for inspection alike.
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path(), zopts(), 1 << 20);
        let p = log.partition("t", 0).unwrap();
        for i in 0..6 {
            p.append(&batch(&format!("c{i}"), 4, 1)).unwrap();
        }
        log.close().unwrap();
    }
    let seg = last_segment(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    let last = *batch_spans(&data).last().unwrap();
    data[last.pos as usize..].fill(0);
    std::fs::write(&seg, &data).unwrap();
    let ins = inspect::inspect_partition(&dir.path().join("t").join("0")).unwrap();
    assert_eq!(ins.worst(), Some(inspect::Severity::Corruption), "{ins:?}");
    assert_eq!(ins.segments.last().unwrap().zero_tail_bytes, 0);
    assert!(
        matches!(
            inspect::dump_segment(&seg, |_, _| {}),
            Err(Error::Corruption { position, .. }) if position == last.pos
        ),
        "dump: zeros below the recovery point are corruption too"
    );
    match Log::open(dir.path(), zopts()) {
        Err(Error::Corruption { .. }) => {}
        other => panic!("expected corruption, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn no_zeroing_before_a_measured_small_sync_nor_on_other_policies() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), zopts()).unwrap();
    log.create_topic(
        "never",
        TopicConfig {
            fsync: FsyncPolicy::Never,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    log.create_topic("t", cfg(16 << 20)).unwrap();
    let len =
        |p: &spool_log_engine::Partition| std::fs::metadata(p.active_segment_path()).unwrap().len();
    let never = log.partition("never", 0).unwrap();
    never.append(&batch("n", 5, 1)).unwrap();
    let p = log.partition("t", 0).unwrap();
    // Written, not synced yet: no sync measured, no zeroing.
    p.append_nowait(&batch("a", 5, 1)).unwrap();
    log.run_maintenance().unwrap();
    assert_eq!(len(&never), never.stats().size_bytes, "fsync = never");
    assert_eq!(len(&p), p.stats().size_bytes, "before any sync");
    // One sync over more than ZERO_AHEAD_MAX_SYNC_BYTES: the syncs are large, no zeroing.
    let mut big = BatchBuilder::new(Compression::None);
    big.push(1, None, Some(&vec![7u8; 300 << 10][..]), &[]);
    p.append(&big.finish().unwrap()).unwrap();
    log.run_maintenance().unwrap();
    assert_eq!(len(&p), p.stats().size_bytes, "after a large sync");
    // Small syncs again: zeroing starts.
    p.append(&batch("b", 5, 1)).unwrap();
    log.run_maintenance().unwrap();
    assert!(len(&p) > p.stats().size_bytes, "after a small sync");
    log.run_maintenance().unwrap();
}

/// The path spoold runs (background maintenance on; the other tests here zero in
/// `run_maintenance`): the job is asked for by an append and runs on the write-back thread,
/// while two threads go on appending across rolls. The zeros appear ahead of the writer
/// without any call from the test, the writer appends into them, every sealed segment ends
/// on its last batch, every record reads back, and close cuts the active segment's zeros.
#[test]
fn the_background_job_zeroes_ahead_while_appends_and_rolls_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        background_maintenance: true,
        ..zopts()
    };
    let log = open(dir.path(), options, 64 << 10);
    let p = log.partition("t", 0).unwrap();
    let active_len = || std::fs::metadata(p.active_segment_path()).unwrap().len();
    let active_end = |p: &spool_log_engine::Partition| {
        let sealed: u64 = crate::common::segment_files(&dir.path().join("t").join("0"))
            .iter()
            .filter(|s| **s != p.active_segment_path())
            .map(|s| std::fs::metadata(s).unwrap().len())
            .sum();
        p.stats().size_bytes - sealed
    };
    // One small sync measured, then appends ask for the job until it has run.
    let mut want = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut i = 0;
    while active_len() <= active_end(&p) {
        assert!(
            std::time::Instant::now() < deadline,
            "the background job never zeroed ahead"
        );
        let tag = format!("w{i}");
        p.append(&batch(&tag, 2, 1)).unwrap();
        want.extend(expect(&tag, 2));
        i += 1;
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Appends into the zeros, from two threads, across rolls (64 KiB segments), while the
    // job keeps zeroing ahead.
    let rolled_from = p.segment_bases().len();
    std::thread::scope(|s| {
        for t in 0..2 {
            let p = &p;
            s.spawn(move || {
                for j in 0..150 {
                    let tag = format!("t{t}-{j}{}", "x".repeat(300));
                    p.append(&batch(&tag, 2, 1)).unwrap();
                }
            });
        }
    });
    assert!(p.segment_bases().len() > rolled_from, "rolled");
    let got = values(&read_all(&p, 0));
    assert_eq!(&got[..want.len()], &want[..], "the records before");
    assert_eq!(got.len(), want.len() + 2 * 2 * 150);
    // Each thread's batches, whole and in its order.
    for t in 0..2 {
        let prefix = format!("t{t}-");
        let js: Vec<u64> = got
            .iter()
            .filter_map(|v| v.strip_prefix(prefix.as_str()))
            .map(|r| r[..r.find('x').unwrap()].parse().unwrap())
            .collect();
        let expected: Vec<u64> = (0..150).flat_map(|j| [j, j]).collect();
        assert_eq!(js, expected, "thread {t}");
    }
    for seg in crate::common::segment_files(&dir.path().join("t").join("0")) {
        if seg == p.active_segment_path() {
            continue;
        }
        let data = std::fs::read(&seg).unwrap();
        assert_eq!(
            batch_spans(&data).last().unwrap().end(),
            data.len() as u64,
            "a sealed segment ends on its last batch: {}",
            seg.display()
        );
    }
    let active = p.active_segment_path();
    let end = active_end(&p);
    drop(p);
    log.close().unwrap();
    assert_eq!(
        std::fs::metadata(&active).unwrap().len(),
        end,
        "close cut the zeros"
    );
}
