//! Time to `Log::open` a partition of ~1 GiB after the writing process was killed with
//! SIGKILL in the middle of appending.
//!
//! 1. A child process (this binary re-executed with `SPOOL_BENCH_RECOVERY_CHILD=<dir>`)
//!    appends 1 KiB records in 64 KiB batches from 4 threads with fsync=always (group
//!    commit) into one topic whose segments are 2 GiB, so the whole GiB sits in the active
//!    segment: the worst case, since recovery walks the active segment's batch headers to
//!    rebuild its in-memory index and CRC-checks everything past the recovery point.
//! 2. When the partition holds `SPOOL_BENCH_RECOVERY_BYTES` (default 1 GiB) the parent sends
//!    SIGKILL, then saves the crash state: the 128-byte `recovery-point` file and the bytes
//!    of the last segment from the recovery point to its end.
//! 3. The first open sees the real crash state. Before every later timed open the parent puts
//!    the crash state back (rewrites the saved tail at its position, restores the file length
//!    and the recovery-point file, fdatasyncs both, all untimed), because an open that
//!    succeeds writes a new recovery point and truncates any torn tail, after which the next
//!    open would have nothing to check. So each timed open re-does the same recovery work
//!    as the first.
//! 4. Cases: open with the segment in the page cache (what kill -9 leaves: the machine kept
//!    running), open after evicting the segment file from the page cache
//!    (`posix_fadvise(DONTNEED)` on that file only: what a reboot leaves), and a clean open
//!    (after a clean close: no CRC scan, still the header walk) as the baseline.
//!
//! Target: < 1 s to open after kill -9.
//!
//! Settings: `SPOOL_BENCH_RECOVERY_BYTES` (default 1 GiB), `SPOOL_BENCH_RECOVERY_BATCH`
//! (default 64 KiB), `SPOOL_BENCH_RECOVERY_THREADS` (default 4), `SPOOL_BENCH_RECOVERY_FSYNC`
//! (`always` (default), `interval:<ms>` or `never`).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use spool_benches::{
    Config, Goal, Report, Stats, Suite, evict_from_page_cache, fmt_bytes, log_bytes, machine_load,
    make_batch, parse_bytes, scratch_dir, segment_files,
};
use spool_log_engine::{FsyncPolicy, Log, LogOptions, RecoveryReport, TopicConfig};

const TOPIC: &str = "bench";
const CHILD_ENV: &str = "SPOOL_BENCH_RECOVERY_CHILD";
const SEGMENT_BYTES: u64 = 2 << 30;

fn fsync_policy() -> FsyncPolicy {
    let v = std::env::var("SPOOL_BENCH_RECOVERY_FSYNC").unwrap_or_else(|_| "always".into());
    match v.as_str() {
        "always" => FsyncPolicy::Always,
        "never" => FsyncPolicy::Never,
        other => match other
            .strip_prefix("interval:")
            .and_then(|ms| ms.parse().ok())
        {
            Some(interval_ms) => FsyncPolicy::Interval { interval_ms },
            None => panic!("SPOOL_BENCH_RECOVERY_FSYNC={v}: use always, never or interval:<ms>"),
        },
    }
}

/// Child mode: append until killed (or until `cap` bytes, as a safety stop).
fn child(dir: &Path) -> ! {
    let batch_bytes = parse_bytes(&std::env::var("SPOOL_BENCH_RECOVERY_BATCH").expect("batch"))
        .expect("batch size");
    let threads: usize = std::env::var("SPOOL_BENCH_RECOVERY_THREADS")
        .expect("threads")
        .parse()
        .expect("thread count");
    let cap: u64 = std::env::var("SPOOL_BENCH_RECOVERY_CAP")
        .expect("cap")
        .parse()
        .expect("cap");
    let log = Log::open(dir, LogOptions::default()).expect("child: open");
    let tc = TopicConfig {
        fsync: fsync_policy(),
        segment_bytes: SEGMENT_BYTES,
        ..TopicConfig::default()
    };
    log.create_topic(TOPIC, tc).expect("child: create topic");
    let p = log.partition(TOPIC, 0).expect("child: partition");
    let (batch, _) = make_batch(1024, batch_bytes as usize, 1_700_000_000_000);
    let written = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while written.fetch_add(batch.len() as u64, Ordering::Relaxed) < cap {
                    p.append(&batch).expect("child: append");
                }
            });
        }
    });
    // Not killed in time: the parent will notice the exit status.
    std::process::exit(3);
}

/// The crash state that the timed opens start from.
struct CrashState {
    pdir: PathBuf,
    recovery_point: Vec<u8>,
    segment: PathBuf,
    /// Position in `segment` from which `tail` was saved.
    tail_at: u64,
    tail: Vec<u8>,
    len: u64,
}

impl CrashState {
    /// Reads the newest recovery point (format in log-engine/src/checkpoint.rs: two 64-byte
    /// little-endian slots { magic "SPRP", version, seq u64 @8, segment_base u64 @16,
    /// position u64 @24, ... }) and saves the last segment from it to the end.
    fn capture(pdir: &Path) -> CrashState {
        let rp_path = pdir.join("recovery-point");
        let recovery_point = fs::read(&rp_path).unwrap_or_default();
        let u64_at =
            |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let point = recovery_point
            .chunks_exact(64)
            .filter(|s| &s[0..4] == b"SPRP")
            .map(|s| (u64_at(s, 8), u64_at(s, 16), u64_at(s, 24)))
            .max();
        let segment = segment_files(pdir).pop().expect("a segment file");
        let base: u64 = segment
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .expect("segment name");
        let tail_at = match point {
            Some((_, seg_base, pos)) if seg_base == base => pos,
            _ => 0,
        };
        let f = fs::File::open(&segment).expect("open segment");
        let len = f.metadata().expect("stat segment").len();
        let mut tail = vec![0u8; (len - tail_at) as usize];
        f.read_exact_at(&mut tail, tail_at)
            .expect("read the segment tail");
        CrashState {
            pdir: pdir.to_path_buf(),
            recovery_point,
            tail,
            len,
            segment,
            tail_at,
        }
    }

    /// Puts the crash state back (untimed) and makes it durable, as it was after the kill
    /// (under fsync=always everything before the torn tail had been fdatasync'd).
    fn restore(&self) {
        let f = OpenOptions::new()
            .write(true)
            .open(&self.segment)
            .expect("open segment");
        f.write_all_at(&self.tail, self.tail_at)
            .expect("restore tail");
        f.set_len(self.len).expect("restore length");
        f.sync_data().expect("fdatasync segment");
        let rp = self.pdir.join("recovery-point");
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&rp)
            .expect("open recovery-point");
        f.write_all_at(&self.recovery_point, 0)
            .expect("restore recovery point");
        f.sync_data().expect("fdatasync recovery-point");
    }
}

/// Opens the log, returning (seconds, report, high watermark).
fn timed_open(dir: &Path) -> (f64, RecoveryReport, u64) {
    let t = Instant::now();
    let log = Log::open(dir, LogOptions::default()).expect("open after crash");
    let el = t.elapsed().as_secs_f64();
    let report = log.recovery_reports()[0].2.clone();
    let hwm = log.partition(TOPIC, 0).expect("partition").high_watermark();
    drop(log);
    (el, report, hwm)
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
    }
    let cfg = Config::from_env();
    let target = cfg.bytes("SPOOL_BENCH_RECOVERY_BYTES", 1 << 30, 32 << 20);
    let batch = cfg.bytes("SPOOL_BENCH_RECOVERY_BATCH", 64 << 10, 64 << 10);
    let threads = cfg.count("SPOOL_BENCH_RECOVERY_THREADS", 4, 4).max(1);
    let fsync = fsync_policy();
    cfg.announce(
        "recovery",
        &format!(
            "kill -9 at {}, {} batches, {threads} appender threads, fsync={fsync}; {}",
            fmt_bytes(target),
            fmt_bytes(batch),
            machine_load()
        ),
    );
    assert!(
        target + (256 << 20) < SEGMENT_BYTES,
        "the data must fit one segment"
    );
    let scratch = scratch_dir("recovery");
    let dir = scratch.path().join("log");
    let pdir = dir.join(TOPIC).join("0");

    // 1-2. Write in a child and kill it.
    let cap = (target * 2).min(SEGMENT_BYTES - (128 << 20));
    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .env(CHILD_ENV, &dir)
        .env("SPOOL_BENCH_RECOVERY_BATCH", batch.to_string())
        .env("SPOOL_BENCH_RECOVERY_THREADS", threads.to_string())
        .env("SPOOL_BENCH_RECOVERY_CAP", cap.to_string())
        .env(
            "SPOOL_BENCH_RECOVERY_FSYNC",
            std::env::var("SPOOL_BENCH_RECOVERY_FSYNC").unwrap_or("always".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning the writer child");
    let t = Instant::now();
    let deadline = t + Duration::from_secs(300);
    while log_bytes(&dir) < target {
        if let Some(st) = child.try_wait().expect("child status") {
            panic!("writer child exited early: {st}");
        }
        assert!(Instant::now() < deadline, "the writer child is too slow");
        std::thread::sleep(Duration::from_millis(2));
    }
    let write_secs = t.elapsed().as_secs_f64();
    child.kill().expect("SIGKILL the child");
    let st = child.wait().expect("reaping the child");
    assert_eq!(st.signal(), Some(9), "child died of SIGKILL");
    let on_disk = log_bytes(&dir);
    let crash = CrashState::capture(&pdir);
    eprintln!(
        "  child wrote {} in {:.2} s ({:.0} MB/s incl. startup), killed; {} past the \
         recovery point",
        fmt_bytes(on_disk),
        write_secs,
        target as f64 / write_secs / 1e6,
        fmt_bytes(crash.tail.len() as u64)
    );

    // 3. The first open sees the real crash state.
    let (first, first_report, hwm) = timed_open(&dir);
    eprintln!(
        "  first open after the kill: {:.3} s, {first_report:?}",
        first
    );

    // 4. Re-create the crash state before each timed open.
    let reports = std::cell::RefCell::new(Vec::new());
    let mut suite = Suite::new("recovery", &cfg);
    let check = |kind: &'static str, (secs, rep, h): (f64, RecoveryReport, u64)| {
        assert_eq!(h, hwm, "every open recovers the same high watermark");
        reports.borrow_mut().push((kind, rep));
        secs * 1e3
    };
    suite.case("open_after_kill", "ms", 0, || {
        crash.restore();
        check("kill", timed_open(&dir))
    });
    suite.case("open_after_kill_cold", "ms", 0, || {
        crash.restore();
        for f in segment_files(&pdir) {
            evict_from_page_cache(&f);
        }
        check("cold", timed_open(&dir))
    });
    suite.case("open_clean", "ms", 0, || {
        // The previous case's open closed the log cleanly; make sure, then time a clean open.
        drop(Log::open(&dir, LogOptions::default()).expect("open"));
        check("clean", timed_open(&dir))
    });
    let r = suite.run();

    let kill_rep = reports
        .borrow()
        .iter()
        .find(|(k, _)| *k == "kill")
        .map(|x| x.1.clone());
    let clean_rep = reports
        .borrow()
        .iter()
        .find(|(k, _)| *k == "clean")
        .map(|x| x.1.clone());
    let mut rep = Report::new(&format!(
        "recovery: Log::open after SIGKILL of a writer at {} ({} batches, {threads} threads, \
         fsync={fsync}), one 2 GiB-max segment",
        fmt_bytes(on_disk),
        fmt_bytes(batch)
    ));
    let first_s = Stats::new(vec![first * 1e3]);
    rep.target(
        "recovery.first_open",
        "first open after the real kill (1 sample)",
        &first_s,
        "ms",
        "< 1000 ms",
        None,
        &first_s,
        Goal::Below(1000.0),
    );
    let kill = r.stats("open_after_kill");
    rep.target(
        "recovery.open_after_kill",
        "open after kill -9, crash state re-created, page cache warm",
        &kill,
        "ms",
        "< 1000 ms",
        Some(&r.ratio("open_after_kill", "open_clean")),
        &kill,
        Goal::Below(1000.0),
    );
    let cold = r.stats("open_after_kill_cold");
    rep.target(
        "recovery.open_after_kill_cold",
        "same, segment evicted from page cache (as after reboot)",
        &cold,
        "ms",
        "< 1000 ms",
        Some(&r.ratio("open_after_kill_cold", "open_clean")),
        &cold,
        Goal::Below(1000.0),
    );
    rep.figure(
        "recovery.baseline.open_clean",
        "  baseline: open after a clean close",
        &r.stats("open_clean"),
        "ms",
    );
    rep.note(&format!("first open's report: {first_report:?}"));
    if let Some(k) = kill_rep {
        rep.note(&format!("re-created crash opens report: {k:?}"));
    }
    if let Some(c) = clean_rep {
        rep.note(&format!("clean open report: {c:?}"));
    }
    rep.note("ratio column: open time / clean-open time of the same round");
    rep.note(&format!("noise: {}", r.noise()));
    rep.print();
}
