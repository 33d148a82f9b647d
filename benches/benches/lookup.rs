//! Latency of offset lookups (`read` of a random offset with `max_bytes = 1`, which returns
//! the one batch holding it) and timestamp lookups (`offset_for_timestamp`), p50/p99.
//!
//! The partition holds 1 KiB records in batches of 16 records (~16.5 KiB, a typical producer
//! batch), 64 MiB segments (so most lookups land in sealed segments with mapped indexes),
//! default `index_interval_bytes` (4 KiB), and record timestamps `ts0 + offset` ms. Each
//! sample opens the log, reads it all once untimed (so mappings and page tables are warm:
//! this measures lookups on a hot partition), then times `SPOOL_BENCH_LOOKUPS` random
//! lookups one by one with `Instant::now()` around each call.
//!
//! A read with verify_reads on CRC-checks the batch it returns, so its latency grows with
//! the batch size; the verify-off case isolates the index search and header walk.
//! Every timestamp lookup's answer is checked (outside the timed region).
//!
//! Sizes: `SPOOL_BENCH_LOOKUP_BYTES` (default 256 MiB), `SPOOL_BENCH_LOOKUP_BATCH_RECORDS`
//! (default 16), `SPOOL_BENCH_LOOKUPS` (per sample, default 200 000).

use std::cell::RefCell;
use std::path::Path;
use std::time::Instant;

use spool_benches::{Config, Report, Rng, Stats, Suite, fmt_bytes, machine_load, scratch_dir};
use spool_log_engine::{
    BatchBuilder, Compression, FsyncPolicy, Log, LogOptions, Partition, TopicConfig,
};

const TOPIC: &str = "bench";
const TS0: i64 = 1_700_000_000_000;

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

fn warm(p: &Partition) {
    let mut off = p.log_start_offset();
    let mut sum = 0u64;
    while off < p.high_watermark() {
        let r = p.read(off, 1 << 20).expect("read");
        for page in r.data.chunks(4096) {
            sum = sum.wrapping_add(u64::from(page[0]));
        }
        off = r.next_offset;
    }
    std::hint::black_box(sum);
}

/// Per-sample percentiles in µs: [p50, p90, p99, p99.9, max].
type Pcts = [f64; 5];

fn pcts(lat_ns: Vec<f64>) -> Pcts {
    let s = Stats::new(lat_ns);
    [50.0, 90.0, 99.0, 99.9, 100.0].map(|q| s.percentile(q) / 1e3)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Offset,
    Timestamp,
}

fn sample(dir: &Path, verify: bool, kind: Kind, lookups: usize, seed: u64) -> Pcts {
    let log = open(dir, verify);
    let p = log.partition(TOPIC, 0).expect("partition");
    warm(&p);
    let hwm = p.high_watermark();
    let mut rng = Rng::new(seed);
    let mut lat = Vec::with_capacity(lookups);
    for _ in 0..lookups {
        let x = rng.below(hwm);
        match kind {
            Kind::Offset => {
                let t = Instant::now();
                let r = p.read(x, 1);
                let el = t.elapsed();
                let r = r.expect("read");
                std::hint::black_box(&r);
                assert!(r.next_offset > x && !r.data.is_empty(), "lookup of {x}");
                lat.push(el.as_nanos() as f64);
            }
            Kind::Timestamp => {
                let ts = TS0 + x as i64;
                let t = Instant::now();
                let r = p.offset_for_timestamp(ts);
                let el = t.elapsed();
                assert_eq!(r.expect("offset_for_timestamp"), Some(x), "timestamp {ts}");
                lat.push(el.as_nanos() as f64);
            }
        }
    }
    drop(p);
    drop(log);
    pcts(lat)
}

fn main() {
    let cfg = Config::from_env();
    let size = cfg.bytes("SPOOL_BENCH_LOOKUP_BYTES", 256 << 20, 16 << 20);
    let per_batch = cfg.count("SPOOL_BENCH_LOOKUP_BATCH_RECORDS", 16, 16).max(1);
    let lookups = cfg.count("SPOOL_BENCH_LOOKUPS", 200_000, 5_000).max(1);
    let seg = cfg.bytes("SPOOL_BENCH_LOOKUP_SEGMENT_BYTES", 64 << 20, 4 << 20);
    cfg.announce(
        "lookup",
        &format!(
            "{} partition, {per_batch} x 1 KiB records per batch, {} segments, {lookups} \
             lookups per sample; {}",
            fmt_bytes(size),
            fmt_bytes(seg),
            machine_load()
        ),
    );
    let scratch = scratch_dir("lookup");
    let dir = scratch.path().join("log");
    let value = vec![0x42u8; 1024];
    let (mut records, mut batch_len) = (0u64, 0usize);
    {
        let log = open(&dir, true);
        let tc = TopicConfig {
            fsync: FsyncPolicy::Never,
            segment_bytes: seg,
            ..TopicConfig::default()
        };
        log.create_topic(TOPIC, tc).expect("create topic");
        let p = log.partition(TOPIC, 0).expect("partition");
        let mut bytes = 0u64;
        while bytes < size {
            let mut b = BatchBuilder::with_capacity(Compression::None, per_batch * 1040);
            for i in 0..per_batch as u64 {
                b.push(TS0 + (records + i) as i64, None, Some(&value), &[]);
            }
            let batch = b.finish().expect("finish");
            batch_len = batch.len();
            p.append(&batch).expect("append");
            records += per_batch as u64;
            bytes += batch.len() as u64;
        }
        log.close().expect("close");
    }
    let segments = spool_benches::segment_files(&dir.join(TOPIC).join("0")).len();

    let store: RefCell<Vec<(&str, Pcts)>> = RefCell::new(Vec::new());
    let mut suite = Suite::new("lookup", &cfg);
    let cases: [(&str, bool, Kind); 3] = [
        ("offset_verify", true, Kind::Offset),
        ("offset_noverify", false, Kind::Offset),
        ("timestamp", true, Kind::Timestamp),
    ];
    for (i, (name, verify, kind)) in cases.into_iter().enumerate() {
        let (dir, store) = (&dir, &store);
        let seed = i as u64 + 2;
        let mut round = 0u64;
        suite.case(name, "µs p50", 0, move || {
            round += 1;
            let p = sample(dir, verify, kind, lookups, seed * 1000 + round);
            store.borrow_mut().push((name, p));
            p[0]
        });
    }
    let r = suite.run();
    let mut rep = Report::new(&format!(
        "lookup latency: {} partition ({records} records of 1 KiB, {per_batch} per \
         {batch_len}-byte batch, {segments} segments), {lookups} random lookups per sample",
        fmt_bytes(size)
    ));
    let store = store.into_inner();
    for (name, what) in [
        (
            "offset_verify",
            "offset lookup: read(random, max_bytes=1), verify on",
        ),
        (
            "offset_noverify",
            "offset lookup: read(random, max_bytes=1), verify off",
        ),
        (
            "timestamp",
            "timestamp lookup: offset_for_timestamp(random)",
        ),
    ] {
        let all: Vec<Pcts> = store
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|x| x.1)
            .collect();
        let measured = &all[cfg.warmup.min(all.len())..];
        assert_eq!(measured.len(), r.samples(name).len());
        for (i, q) in ["p50", "p90", "p99", "p99.9", "max"].iter().enumerate() {
            let s = Stats::new(measured.iter().map(|p| p[i]).collect());
            rep.figure(
                &format!("lookup.{name}.{q}"),
                &format!("{what} {q}"),
                &s,
                "µs",
            );
        }
    }
    rep.note("no target in the issue for these; median [min–max] is over samples of the given percentile");
    rep.note("timing includes Instant::now() (~20-40 ns on this VM)");
    rep.note(&format!("noise: {}", r.noise()));
    rep.print();
}
