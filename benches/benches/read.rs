//! Sequential read of a whole partition from the page cache, against `dd` of the same
//! segment files and an in-process `pread` + CRC-32C of them, in the same run.
//!
//! The partition (1 KiB records in ~1 MiB batches, fsync=never, 256 MiB segments) is written
//! once and closed cleanly. Each sample then opens the log (a clean open scans nothing), reads
//! every batch with `Partition::read(offset, 1 MiB)` and touches the returned bytes:
//! - verify_reads on (the default): the engine CRC-32C-checks every batch before returning
//!   it, which reads every byte; the bench also sums one byte per 4 KiB page.
//! - verify_reads off: the bench sums one byte per 4 KiB page (so every page is faulted in
//!   and read), nothing more.
//!
//! A fresh open per sample means fresh mmaps: the page-table faults of a catch-up consumer
//! are included. The `hot` cases keep one log open across samples (mappings and page tables
//! already populated) to show what those faults cost. Target: ≥ 3 GB/s (10^9 bytes/s).
//!
//! Sizes: `SPOOL_BENCH_READ_BYTES` (default 1 GiB), `SPOOL_BENCH_READ_STEP` (max_bytes per
//! read, default 1 MiB), `SPOOL_BENCH_READ_SEGMENT_BYTES` (default 256 MiB).

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use spool_benches::{
    Config, Goal, Report, Suite, dd_read, fmt_bytes, machine_load, make_batch, scratch_dir,
    segment_files,
};
use spool_log_engine::{FsyncPolicy, Log, LogOptions, Partition, TopicConfig};

const TOPIC: &str = "bench";

fn open(dir: &Path, verify_reads: bool) -> Log {
    Log::open(
        dir,
        LogOptions {
            verify_reads,
            ..LogOptions::default()
        },
    )
    .expect("open log")
}

/// Reads the whole partition in `step`-byte reads, summing one byte per 4 KiB page of what
/// each read returns. Returns (bytes, seconds).
fn read_all(p: &Partition, step: usize) -> (u64, f64) {
    let hwm = p.high_watermark();
    let mut off = p.log_start_offset();
    let (mut bytes, mut sum) = (0u64, 0u64);
    let t = Instant::now();
    while off < hwm {
        let r = p.read(off, step).expect("read");
        assert!(
            !r.data.is_empty(),
            "no data at {off} below the high watermark {hwm}"
        );
        for page in r.data.chunks(4096) {
            sum = sum.wrapping_add(u64::from(page[0]));
        }
        bytes += r.data.len() as u64;
        off = r.next_offset;
    }
    let el = t.elapsed().as_secs_f64();
    std::hint::black_box(sum);
    (bytes, el)
}

/// pread 1 MiB at a time into one buffer and CRC-32C each block: what a copying reader that
/// verifies costs. Returns GB/s.
fn pread_crc(files: &[std::path::PathBuf]) -> f64 {
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut crc) = (0u64, 0u32);
    let t = Instant::now();
    for path in files {
        let f = File::open(path).expect("open segment");
        let mut pos = 0u64;
        loop {
            let n = f.read_at(&mut buf, pos).expect("pread");
            if n == 0 {
                break;
            }
            crc ^= crc32c::crc32c(&buf[..n]);
            pos += n as u64;
        }
        bytes += pos;
    }
    let el = t.elapsed().as_secs_f64();
    std::hint::black_box(crc);
    bytes as f64 / el / 1e9
}

fn main() {
    let cfg = Config::from_env();
    let size = cfg.bytes("SPOOL_BENCH_READ_BYTES", 1 << 30, 32 << 20);
    let step = cfg.bytes("SPOOL_BENCH_READ_STEP", 1 << 20, 1 << 20) as usize;
    let seg = cfg.bytes("SPOOL_BENCH_READ_SEGMENT_BYTES", 256 << 20, 8 << 20);
    cfg.announce(
        "read",
        &format!(
            "{} partition, {} per read, {} segments; {}",
            fmt_bytes(size),
            fmt_bytes(step as u64),
            fmt_bytes(seg),
            machine_load()
        ),
    );
    let scratch = scratch_dir("read");
    let dir = scratch.path().join("log");

    // Write the partition once.
    let (batch, recs) = make_batch(1024, 1 << 20, 1_700_000_000_000);
    let n = (size / batch.len() as u64).max(1);
    {
        let log = open(&dir, true);
        let tc = TopicConfig {
            fsync: FsyncPolicy::Never,
            segment_bytes: seg,
            ..TopicConfig::default()
        };
        log.create_topic(TOPIC, tc).expect("create topic");
        let p = log.partition(TOPIC, 0).expect("partition");
        let t = Instant::now();
        for _ in 0..n {
            p.append(&batch).expect("append");
        }
        eprintln!(
            "  wrote {} batches ({} records each) in {:.2} s",
            n,
            recs,
            t.elapsed().as_secs_f64()
        );
        log.close().expect("close");
    }
    let pdir = dir.join(TOPIC).join("0");
    let files = segment_files(&pdir);
    let total = n * batch.len() as u64;

    let hot_verify = RefCell::new(None::<Log>);
    let hot_plain = RefCell::new(None::<Log>);
    let cold = |verify: bool| {
        let log = open(&dir, verify);
        let p = log.partition(TOPIC, 0).expect("partition");
        let (bytes, secs) = read_all(&p, step);
        assert_eq!(bytes, total, "read back every byte");
        drop(p);
        drop(log);
        bytes as f64 / secs / 1e9
    };
    // The hot cases hold their log open between samples; only one Log may have the
    // directory open at a time, so they close it before a cold case opens it again.
    let hot = |slot: &RefCell<Option<Log>>, other: &RefCell<Option<Log>>, verify: bool| {
        other.borrow_mut().take();
        let mut s = slot.borrow_mut();
        if s.is_none() {
            let log = open(&dir, verify);
            read_all(&log.partition(TOPIC, 0).expect("partition"), step);
            *s = Some(log);
        }
        let p = s
            .as_ref()
            .expect("open")
            .partition(TOPIC, 0)
            .expect("partition");
        let (bytes, secs) = read_all(&p, step);
        assert_eq!(bytes, total, "read back every byte");
        bytes as f64 / secs / 1e9
    };
    let mut suite = Suite::new("read", &cfg);
    suite.case("engine_verify", "GB/s", 0, || {
        hot_verify.borrow_mut().take();
        hot_plain.borrow_mut().take();
        cold(true)
    });
    suite.case("engine_noverify", "GB/s", 0, || {
        hot_verify.borrow_mut().take();
        hot_plain.borrow_mut().take();
        cold(false)
    });
    suite.case("dd", "GB/s", 0, || {
        let (b, s) = files
            .iter()
            .map(|f| dd_read(f))
            .fold((0, 0.0), |a, x| (a.0 + x.0, a.1 + x.1));
        b as f64 / s / 1e9
    });
    suite.case("pread_crc", "GB/s", 0, || pread_crc(&files));
    suite.case("engine_verify_hot", "GB/s", 0, || {
        hot(&hot_verify, &hot_plain, true)
    });
    suite.case("engine_noverify_hot", "GB/s", 0, || {
        hot(&hot_plain, &hot_verify, false)
    });
    let r = suite.run();
    hot_verify.borrow_mut().take();
    hot_plain.borrow_mut().take();

    let mut rep = Report::new(&format!(
        "sequential read from page cache: {} in {} segments, read(offset, {}) steps, 1 KiB \
         records in {}-byte batches",
        fmt_bytes(total),
        files.len(),
        fmt_bytes(step as u64),
        batch.len()
    ));
    for (key, what) in [
        (
            "engine_verify",
            "read, verify_reads on (engine CRC-checks every byte)",
        ),
        (
            "engine_noverify",
            "read, verify_reads off (bench reads 1 byte / 4 KiB)",
        ),
    ] {
        let s = r.stats(key);
        rep.target(
            &format!("read.{key}"),
            what,
            &s,
            "GB/s",
            "≥ 3 GB/s",
            Some(&r.ratio(key, "dd")),
            &s,
            Goal::AtLeast(3.0),
        );
    }
    rep.figure(
        "read.baseline.dd",
        "  baseline: dd if=segment of=/dev/null bs=1M",
        &r.stats("dd"),
        "GB/s",
    );
    rep.figure(
        "read.baseline.pread_crc",
        "  baseline: pread 1 MiB + crc32c, in process",
        &r.stats("pread_crc"),
        "GB/s",
    );
    rep.versus(
        "read.engine_verify_hot",
        "read, verify on, log kept open (mappings warm)",
        &r.stats("engine_verify_hot"),
        "GB/s",
        &r.ratio("engine_verify_hot", "dd"),
    );
    rep.versus(
        "read.engine_noverify_hot",
        "read, verify off, log kept open (1 load per mapped page: per-call overhead only)",
        &r.stats("engine_noverify_hot"),
        "GB/s",
        &r.ratio("engine_noverify_hot", "dd"),
    );
    rep.note("ratio column: figure / dd of the same round (median over rounds)");
    rep.note("each non-hot sample opens the log afresh, so it includes mmap page-table faults");
    rep.note(&format!("noise: {}", r.noise()));
    rep.print();
}
