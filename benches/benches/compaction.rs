//! Log compaction throughput: one full cleaning pass over a partition that was never cleaned,
//! in MB/s of input (the bytes of the segments the pass rewrites).
//!
//! Setup (untimed, once): a compacted topic of one partition holding
//! `SPOOL_BENCH_COMPACTION_BYTES` (default 1 GiB) of keyed records in 64 MiB segments: keys
//! `key-<12 digits>` drawn at random from `records / SPOOL_BENCH_COMPACTION_DUP` keys (default
//! 4 updates per key, so about three records in four are superseded), values of
//! `SPOOL_BENCH_COMPACTION_VALUE` bytes (default 200, half random, half repeated), one record in
//! ten a tombstone, in batches of about `SPOOL_BENCH_COMPACTION_BATCH` bytes (default 64 KiB).
//! Two such partitions are built: uncompressed batches and LZ4 batches.
//!
//! Each sample copies the pristine partition into a fresh log directory and fsyncs it
//! (untimed), opens the log, and times `Cleaner::clean_now`: a pass that maps the whole dirty
//! section (every record), rewrites every sealed segment with fdatasync of each output and the
//! swap's directory fsyncs. The cleaner (and its 64 MiB key map) is created once and reused,
//! as the log's cleaner thread does. The figure is the pass's `bytes_in / duration`.
//!
//! Baseline, same round: reading the same segment files from the page cache and CRC-32C'ing
//! them once (the least any pass must do; a pass reads its input twice: map, then rewrite).
//!
//! Target: ≥ 200 MB/s of input on the 2-core development machine (issue 5).

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use spool_benches::{Config, Goal, Report, Suite, fmt_bytes, machine_load, scratch_dir};
use spool_log_engine::{
    BatchBuilder, CleanReport, Cleaner, CleanerOptions, CleanupPolicy, Compression, FsyncPolicy,
    Log, LogOptions, TopicConfig,
};

const TOPIC: &str = "bench";

fn opts() -> LogOptions {
    LogOptions {
        background_maintenance: false,
        ..LogOptions::default()
    }
}

/// xorshift64*: reproducible data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

struct Shape {
    bytes: u64,
    dup: u64,
    value: usize,
    batch: usize,
}

/// Writes the pristine partition; returns (records, keys).
fn build(dir: &Path, shape: &Shape, compression: Compression) -> (u64, u64) {
    let log = Log::open(dir, opts()).expect("open");
    log.create_topic(
        TOPIC,
        TopicConfig {
            cleanup: CleanupPolicy::Compact,
            segment_bytes: 64 << 20,
            fsync: FsyncPolicy::Never,
            ..TopicConfig::default()
        },
    )
    .expect("create topic");
    let p = log.partition(TOPIC, 0).expect("partition");
    let per_record = (shape.value + 16 + 10) as u64;
    let keys = (shape.bytes / per_record / shape.dup).max(1);
    let mut rng = Rng(0x5eed_c0ff_ee00_0001);
    let mut value = vec![b'v'; shape.value];
    let mut records = 0u64;
    let mut written = 0u64;
    while written < shape.bytes {
        let mut b = BatchBuilder::with_capacity(compression, shape.batch + 1024);
        while b.size_bytes() < shape.batch {
            let key = format!("key-{:012}", rng.next() % keys);
            for chunk in value[..shape.value / 2].chunks_mut(8) {
                let r = rng.next().to_le_bytes();
                chunk.copy_from_slice(&r[..chunk.len()]);
            }
            let tombstone = rng.next().is_multiple_of(10);
            b.push(
                1_700_000_000_000 + records as i64,
                Some(key.as_bytes()),
                (!tombstone).then_some(&value[..]),
                &[],
            );
            records += 1;
        }
        let batch = b.finish().expect("batch");
        p.append(&batch).expect("append");
        written += batch.len() as u64;
    }
    p.roll().expect("roll");
    drop(p);
    log.close().expect("close");
    (records, keys)
}

fn copy_synced(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).expect("mkdir");
    for e in fs::read_dir(src).expect("read dir").flatten() {
        let to = dst.join(e.file_name());
        if e.path().is_dir() {
            copy_synced(&e.path(), &to);
        } else if e.file_name() != ".lock" {
            fs::copy(e.path(), &to).expect("copy");
            File::open(&to).and_then(|f| f.sync_all()).expect("fsync");
        }
    }
    File::open(dst)
        .and_then(|f| f.sync_all())
        .expect("fsync dir");
}

fn sealed_segments(pdir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = spool_benches::segment_files(pdir);
    v.pop(); // the active segment
    v
}

fn main() {
    let cfg = Config::from_env();
    let shape = Shape {
        bytes: cfg.bytes("SPOOL_BENCH_COMPACTION_BYTES", 1 << 30, 16 << 20),
        dup: cfg.count("SPOOL_BENCH_COMPACTION_DUP", 4, 4).max(1) as u64,
        value: cfg.count("SPOOL_BENCH_COMPACTION_VALUE", 200, 200).max(16),
        batch: cfg.bytes("SPOOL_BENCH_COMPACTION_BATCH", 64 << 10, 64 << 10) as usize,
    };
    cfg.announce(
        "compaction",
        &format!(
            "{} per partition, {} updates per key, {}-byte values, {} batches; {}",
            fmt_bytes(shape.bytes),
            shape.dup,
            shape.value,
            fmt_bytes(shape.batch as u64),
            machine_load()
        ),
    );
    let scratch = scratch_dir("compaction");
    let mut sources = Vec::new();
    for (name, c) in [("none", Compression::None), ("lz4", Compression::Lz4)] {
        let dir = scratch.path().join(format!("source-{name}"));
        let t = Instant::now();
        let (records, keys) = build(&dir, &shape, c);
        eprintln!(
            "  built {name}: {records} records over {keys} keys in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        sources.push((name, dir));
    }
    let cleaner = std::cell::RefCell::new(Cleaner::new(CleanerOptions::default()));
    let last: std::cell::RefCell<Vec<(&str, CleanReport)>> = Default::default();
    let mut suite = Suite::new("compaction", &cfg);
    for (name, src) in &sources {
        let work = scratch.path().join(format!("work-{name}"));
        let case = format!("clean_{name}");
        let (cleaner, last) = (&cleaner, &last);
        suite.case(&case, "MB/s", 0, move || {
            let _ = fs::remove_dir_all(&work);
            copy_synced(src, &work);
            let log = Log::open(&work, opts()).expect("open copy");
            let p = log.partition(TOPIC, 0).expect("partition");
            let r = cleaner.borrow_mut().clean_now(&p).expect("clean");
            assert!(r.ran && r.groups_swapped > 0, "{r:?}");
            let mbps = r.bytes_in as f64 / r.duration.as_secs_f64() / 1e6;
            last.borrow_mut().push((name, r));
            drop(p);
            drop(log);
            mbps
        });
        let base = format!("read_crc_{name}");
        let pdir = src.join(TOPIC).join("0");
        suite.case(&base, "MB/s", 0, move || {
            let files = sealed_segments(&pdir);
            let mut buf = vec![0u8; 1 << 20];
            let t = Instant::now();
            let mut n = 0u64;
            let mut crc = 0u32;
            for f in &files {
                let mut f = File::open(f).expect("open");
                loop {
                    let k = f.read(&mut buf).expect("read");
                    if k == 0 {
                        break;
                    }
                    crc = crc32c::crc32c_append(crc, &buf[..k]);
                    n += k as u64;
                }
            }
            std::hint::black_box(crc);
            n as f64 / t.elapsed().as_secs_f64() / 1e6
        });
    }
    let r = suite.run();
    let mut rep = Report::new(&format!(
        "compaction: one full pass over a never-cleaned partition of {} ({} updates per key, \
         {}-byte values, 10% tombstones, {} batches, 64 MiB segments)",
        fmt_bytes(shape.bytes),
        shape.dup,
        shape.value,
        fmt_bytes(shape.batch as u64)
    ));
    for (name, _) in &sources {
        let s = r.stats(&format!("clean_{name}"));
        rep.target(
            &format!("compaction.clean_{name}"),
            &format!("clean pass, {name} batches (MB/s of input)"),
            &s,
            "MB/s",
            ">= 200 MB/s",
            Some(&r.ratio(&format!("clean_{name}"), &format!("read_crc_{name}"))),
            &s,
            Goal::AtLeast(200.0),
        );
        rep.figure(
            &format!("compaction.baseline.read_crc_{name}"),
            "  baseline: read + CRC-32C the same segments once (page cache)",
            &r.stats(&format!("read_crc_{name}")),
            "MB/s",
        );
    }
    for (name, rep_) in last.borrow().iter().rev().take(sources.len()) {
        rep.note(&format!(
            "{name}: last pass: {} in, {} out, {} of {} records removed ({} tombstones), {} \
             keys, {} segments in, {} groups swapped, {:.2} s (map {:.2} s, fdatasync and swap \
             {:.2} s)",
            fmt_bytes(rep_.bytes_in),
            fmt_bytes(rep_.bytes_out),
            rep_.records_removed,
            rep_.records_in,
            rep_.tombstones_removed,
            rep_.keys,
            rep_.segments_in,
            rep_.groups_swapped,
            rep_.duration.as_secs_f64(),
            rep_.map_duration.as_secs_f64(),
            rep_.sync_duration.as_secs_f64()
        ));
    }
    rep.note("ratio column: pass throughput / read+CRC throughput of the same round");
    rep.note(&format!("noise: {}", r.noise()));
    rep.print();
}
