//! Append throughput against the disk's buffered write bandwidth measured in the same run.
//!
//! Part 1, big records (1 KiB values, batches of ~1 MiB built once and appended repeatedly,
//! as a broker appends what producers built):
//! - fsync=never, 1 appender thread, vs `dd`/`fio`/in-process `pwrite` of the same size into
//!   the same directory, each preceded by the same pre-fault. Target: ≥ 70 % of `dd`.
//! - fsync=always, 4 appender threads (group commit). Target: ≥ 50 % of the fsync=never
//!   figure of the same round.
//! - diagnostics: fsync=never with 4 threads, with the batch built inside the timed loop, and
//!   with segment rolls; fsync=always with 1 thread; pwrite + fdatasync baselines.
//!
//! Part 2, 100-byte records through `BatchBuilder` + `append` (fsync=never), records/s.
//! Target: ≥ 3 million records/s.
//!
//! Sizes: `SPOOL_BENCH_APPEND_BYTES` (default 1 GiB), `SPOOL_BENCH_SYNC_BYTES` (bytes per
//! fsync'd sample, default 512 MiB), `SPOOL_BENCH_BATCH_BYTES` (default 1 MiB),
//! `SPOOL_BENCH_SMALL_RECORDS` (default 5 000 000), `SPOOL_BENCH_THREADS` (default 4).

use std::path::Path;
use std::sync::Barrier;
use std::time::Instant;

use spool_benches::{
    Config, Goal, Report, Suite, dd_write, fio_write, fmt_best_and_round, fmt_bytes, have_fio,
    machine_load, make_batch, raw_pwrite, raw_pwrite_engine_pattern, scratch_dir, truncate_all,
};
use spool_log_engine::{BatchBuilder, Compression, FsyncPolicy, Log, LogOptions, TopicConfig};

const TOPIC: &str = "bench";

/// A log with one single-partition topic in a fresh subdirectory of `root`.
fn fresh_log(root: &Path, name: &str, fsync: FsyncPolicy, segment_bytes: u64) -> Log {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let log = Log::open(&dir, LogOptions::default()).expect("open log");
    let cfg = TopicConfig {
        fsync,
        segment_bytes,
        ..TopicConfig::default()
    };
    log.create_topic(TOPIC, cfg).expect("create topic");
    log
}

/// Drops the log's data without writing it back, closes it and removes its directory.
fn discard(log: Log) {
    let dir = log.dir().to_path_buf();
    truncate_all(&dir).expect("truncating bench data");
    drop(log);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Appends `batches` copies of `batch` from each of `threads` threads; returns MB/s.
fn append_copies(
    root: &Path,
    fsync: FsyncPolicy,
    segment_bytes: u64,
    threads: usize,
    batch: &[u8],
    batches_per_thread: usize,
) -> f64 {
    let log = fresh_log(root, "engine", fsync, segment_bytes);
    let p = log.partition(TOPIC, 0).expect("partition");
    let start = Barrier::new(threads + 1);
    let el = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (p, start) = (&p, &start);
                s.spawn(move || {
                    start.wait();
                    for _ in 0..batches_per_thread {
                        p.append(batch).expect("append");
                    }
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        for h in handles {
            h.join().expect("appender thread");
        }
        t.elapsed()
    });
    let bytes = (batch.len() * batches_per_thread * threads) as f64;
    assert_eq!(
        p.stats().size_bytes as f64,
        bytes,
        "every byte appended landed in the partition"
    );
    drop(p);
    discard(log);
    bytes / el.as_secs_f64() / 1e6
}

/// Builds each batch inside the timed loop (`records_per_batch` records of `value_len`
/// bytes, no key) and appends it, until `records` records are in. Returns
/// (records/s, MB/s of batches, seconds spent building).
fn build_and_append(
    root: &Path,
    value_len: usize,
    batch_bytes: usize,
    records_per_batch: usize,
    records: usize,
) -> (f64, f64, f64) {
    let log = fresh_log(root, "engine", FsyncPolicy::Never, 2 << 30);
    let p = log.partition(TOPIC, 0).expect("partition");
    let value: Vec<u8> = (0..value_len).map(|i| (i * 31 + 7) as u8).collect();
    let ts0 = 1_700_000_000_000i64;
    let (mut done, mut bytes) = (0usize, 0usize);
    let mut build_secs = 0.0;
    let t = Instant::now();
    while done < records {
        let tb = Instant::now();
        let n = records_per_batch.min(records - done);
        let mut b = BatchBuilder::with_capacity(Compression::None, batch_bytes);
        for i in 0..n {
            b.push(ts0 + (done + i) as i64, None, Some(&value), &[]);
        }
        let batch = b.finish().expect("finish");
        build_secs += tb.elapsed().as_secs_f64();
        p.append(&batch).expect("append");
        done += n;
        bytes += batch.len();
    }
    let el = t.elapsed().as_secs_f64();
    drop(p);
    discard(log);
    (records as f64 / el, bytes as f64 / el / 1e6, build_secs)
}

/// A batch of `batch_bytes` (uncompressed size) of JSON-like 1 KiB values that compress about
/// as real payloads do (3–4× with LZ4), encoded with `c`. Returns (batch, records).
fn json_batch(c: Compression, batch_bytes: usize) -> (bytes::Bytes, usize) {
    let mut rng = spool_benches::Rng::new(42);
    let words = [
        "price", "sku", "store", "qty", "eur", "open", "closed", "north", "south",
    ];
    let mut b = BatchBuilder::with_capacity(c, batch_bytes);
    let mut n = 0usize;
    while n * 1100 < batch_bytes {
        let mut v = String::with_capacity(1100);
        v.push('{');
        while v.len() < 1000 {
            let w = words[rng.below(words.len() as u64) as usize];
            v.push_str(&format!("\"{w}\":{},", rng.below(1_000_000)));
        }
        v.push('}');
        b.push(1_700_000_000_000 + n as i64, None, Some(v.as_bytes()), &[]);
        n += 1;
    }
    (b.finish().expect("finish"), n)
}

/// Runs `check` over `batch` `times` times; returns records/s.
fn check_rate(
    batch: &[u8],
    records: usize,
    times: usize,
    mut check: impl FnMut(&[u8]) -> bool,
) -> f64 {
    let t = Instant::now();
    for _ in 0..times {
        assert!(check(std::hint::black_box(batch)));
    }
    (records * times) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let cfg = Config::from_env();
    let size = cfg.bytes("SPOOL_BENCH_APPEND_BYTES", 1 << 30, 32 << 20);
    let sync_size = cfg.bytes("SPOOL_BENCH_SYNC_BYTES", 512 << 20, 16 << 20);
    let batch_bytes = cfg.bytes("SPOOL_BENCH_BATCH_BYTES", 1 << 20, 1 << 20) as usize;
    let small_records = cfg.count("SPOOL_BENCH_SMALL_RECORDS", 5_000_000, 100_000);
    let threads = cfg.count("SPOOL_BENCH_THREADS", 4, 4).max(1);
    cfg.announce(
        "append",
        &format!(
            "{} per fsync=never sample, {} per fsync'd sample, {} batches, {} threads, {} \
             small records; {}",
            fmt_bytes(size),
            fmt_bytes(sync_size),
            fmt_bytes(batch_bytes as u64),
            threads,
            small_records,
            machine_load()
        ),
    );
    let scratch = scratch_dir("append");
    let root = scratch.path();

    // ---- Part 1: 1 KiB records in ~1 MiB batches.
    let (batch, recs) = make_batch(1024, batch_bytes, 1_700_000_000_000);
    let n_batches = (size / batch.len() as u64) as usize;
    let n_sync = ((sync_size / batch.len() as u64) as usize).max(threads);
    let mb = size >> 20;
    let written = (n_batches * batch.len()) as u64;
    // Segments big enough that no roll (which fdatasyncs the sealed segment) happens inside
    // the measured window; the `roll` case shows what rolls cost.
    let big_seg = 2u64 << 30;
    let pf = size + (64 << 20);
    let mut suite = Suite::new("append", &cfg);
    suite.case("engine_never_1t", "MB/s", pf, || {
        append_copies(root, FsyncPolicy::Never, big_seg, 1, &batch, n_batches)
    });
    suite.case("dd", "MB/s", pf, || dd_write(&root.join("dd.dat"), mb));
    let fio = have_fio();
    if fio {
        suite.case("fio", "MB/s", pf, || {
            fio_write(&root.join("fio.dat"), mb << 20)
        });
    }
    suite.case("pwrite", "MB/s", pf, || {
        raw_pwrite(&root.join("pw.dat"), size, 1 << 20, 0, false)
    });
    suite.case("pwrite_engine_pattern", "MB/s", pf, || {
        raw_pwrite_engine_pattern(&root.join("pwe.dat"), written, batch.len())
    });
    suite.case("engine_never_build_1t", "MB/s", pf, || {
        build_and_append(root, 1024, batch_bytes, recs, n_batches * recs).1
    });
    suite.case("engine_never_nt", "MB/s", pf, || {
        append_copies(
            root,
            FsyncPolicy::Never,
            big_seg,
            threads,
            &batch,
            n_batches / threads,
        )
    });
    suite.case("engine_never_roll", "MB/s", pf, || {
        append_copies(
            root,
            FsyncPolicy::Never,
            (written / 4).max(4096),
            1,
            &batch,
            n_batches,
        )
    });
    let pfs = sync_size + (64 << 20);
    suite.case("engine_always_nt", "MB/s", pfs, || {
        append_copies(
            root,
            FsyncPolicy::Always,
            big_seg,
            threads,
            &batch,
            n_sync / threads,
        )
    });
    suite.case("engine_always_1t", "MB/s", pfs, || {
        append_copies(root, FsyncPolicy::Always, big_seg, 1, &batch, n_sync)
    });
    suite.case("pwrite_fdatasync_each_1m", "MB/s", pfs, || {
        raw_pwrite(&root.join("pws.dat"), sync_size, 1 << 20, 1, false)
    });
    suite.case("pwrite_fdatasync_each_4m", "MB/s", pfs, || {
        raw_pwrite(&root.join("pws.dat"), sync_size, 1 << 20, 4, false)
    });
    suite.case("pwrite_end_fdatasync", "MB/s", pfs, || {
        raw_pwrite(&root.join("pws.dat"), sync_size, 1 << 20, 0, true)
    });
    let r = suite.run();

    let mut rep = Report::new(&format!(
        "append: 1 KiB records in {}-byte batches ({recs} records), {} per sample",
        batch.len(),
        fmt_bytes(size)
    ));
    let never = r.stats("engine_never_1t");
    let dd = r.stats("dd");
    rep.target_text(
        "append.never_1t",
        "append fsync=never, 1 thread",
        &never,
        "MB/s",
        "≥ 0.70× dd (best/best)",
        &fmt_best_and_round(
            &r.best_ratio("engine_never_1t", "dd"),
            &r.ratio("engine_never_1t", "dd"),
        ),
        &r.best_ratio("engine_never_1t", "dd"),
        Goal::AtLeast(0.70),
    );
    rep.figure(
        "append.baseline.dd",
        "  baseline: dd bs=1M, buffered, no fsync",
        &dd,
        "MB/s",
    );
    if fio {
        rep.target_text(
            "append.never_1t_vs_fio",
            "  same, judged against fio instead",
            &never,
            "MB/s",
            "≥ 0.70× fio (best/best)",
            &fmt_best_and_round(
                &r.best_ratio("engine_never_1t", "fio"),
                &r.ratio("engine_never_1t", "fio"),
            ),
            &r.best_ratio("engine_never_1t", "fio"),
            Goal::AtLeast(0.70),
        );
        rep.figure(
            "append.baseline.fio",
            "  baseline: fio psync bs=1M, buffered, no fsync",
            &r.stats("fio"),
            "MB/s",
        );
    }
    rep.target_text(
        "append.never_1t_vs_pwrite",
        "  same, judged against in-process pwrite 1 MiB",
        &never,
        "MB/s",
        "≥ 0.70× pwrite (best/best)",
        &fmt_best_and_round(
            &r.best_ratio("engine_never_1t", "pwrite"),
            &r.ratio("engine_never_1t", "pwrite"),
        ),
        &r.best_ratio("engine_never_1t", "pwrite"),
        Goal::AtLeast(0.70),
    );
    rep.figure(
        "append.baseline.pwrite",
        "  baseline: in-process pwrite 1 MiB, buffered",
        &r.stats("pwrite"),
        "MB/s",
    );
    rep.push_text(
        "append.never_1t_vs_engine_pattern",
        "  same, ratio to pwrite with the engine's write pattern",
        &never,
        "MB/s",
        &fmt_best_and_round(
            &r.best_ratio("engine_never_1t", "pwrite_engine_pattern"),
            &r.ratio("engine_never_1t", "pwrite_engine_pattern"),
        ),
    );
    rep.figure(
        "append.baseline.pwrite_engine_pattern",
        "  baseline: pwrite 16 B + rest per batch (engine's pattern)",
        &r.stats("pwrite_engine_pattern"),
        "MB/s",
    );
    rep.target(
        "append.always_nt",
        &format!("append fsync=always, {threads} threads (group commit)"),
        &r.stats("engine_always_nt"),
        "MB/s",
        "≥ 0.50× fsync=never",
        Some(&r.ratio("engine_always_nt", "engine_never_1t")),
        &r.ratio("engine_always_nt", "engine_never_1t"),
        Goal::AtLeast(0.50),
    );
    rep.versus(
        "append.always_nt_vs_end_fdatasync",
        "  same, ratio to pwrite + one final fdatasync",
        &r.stats("engine_always_nt"),
        "MB/s",
        &r.ratio("engine_always_nt", "pwrite_end_fdatasync"),
    );
    rep.versus(
        "append.always_1t",
        "append fsync=always, 1 thread (diagnostic)",
        &r.stats("engine_always_1t"),
        "MB/s",
        &r.ratio("engine_always_1t", "pwrite_fdatasync_each_1m"),
    );
    for (key, what) in [
        (
            "pwrite_fdatasync_each_1m",
            "  baseline: pwrite 1 MiB + fdatasync each",
        ),
        (
            "pwrite_fdatasync_each_4m",
            "  baseline: pwrite 1 MiB, fdatasync every 4 MiB",
        ),
        (
            "pwrite_end_fdatasync",
            "  baseline: pwrite 1 MiB, one final fdatasync",
        ),
    ] {
        rep.figure(
            &format!("append.baseline.{key}"),
            what,
            &r.stats(key),
            "MB/s",
        );
    }
    rep.versus(
        "append.never_nt",
        &format!("append fsync=never, {threads} threads (diagnostic)"),
        &r.stats("engine_never_nt"),
        "MB/s",
        &r.ratio("engine_never_nt", "dd"),
    );
    rep.versus(
        "append.never_build_1t",
        "append fsync=never, batch built in the loop (diagnostic)",
        &r.stats("engine_never_build_1t"),
        "MB/s",
        &r.ratio("engine_never_build_1t", "dd"),
    );
    rep.versus(
        "append.never_roll",
        "append fsync=never, 3 segment rolls inside (diagnostic)",
        &r.stats("engine_never_roll"),
        "MB/s",
        &r.ratio("engine_never_roll", "dd"),
    );
    rep.note(
        "best/best = best sample / best baseline sample (each side's warm-memory capability; \
         the disk-relative verdicts use it, see docs/benchmarks.md); per round = median over \
         rounds of figure / baseline of the same round (the fsync=always verdict uses it)",
    );
    rep.note(&format!(
        "fsync=never cases use segment_bytes={} so that no roll happens in the window; \
         fsync'd cases write {} per sample",
        fmt_bytes(big_seg),
        fmt_bytes(sync_size)
    ));
    rep.note(&format!("noise: {}", r.noise()));
    rep.print();

    // ---- Part 2: 100-byte records through BatchBuilder + append.
    let (small_batch, per_batch) = make_batch(100, batch_bytes, 0);
    let small_bytes = (small_records / per_batch + 1) as u64 * small_batch.len() as u64;
    let pf = small_bytes + (64 << 20);
    let build_share = std::cell::RefCell::new(Vec::new());
    let mut suite = Suite::new("append-small", &cfg);
    suite.case("small_build_append", "records/s", pf, || {
        let (rps, _, build) = build_and_append(root, 100, batch_bytes, per_batch, small_records);
        build_share
            .borrow_mut()
            .push(build * rps / small_records as f64);
        rps
    });
    suite.case("small_append_prebuilt", "records/s", pf, || {
        let n = small_records.div_ceil(per_batch);
        let mbs = append_copies(root, FsyncPolicy::Never, 2 << 30, 1, &small_batch, n);
        mbs * 1e6 / small_batch.len() as f64 * per_batch as f64
    });
    suite.case("dd_small", "MB/s", pf, || {
        dd_write(&root.join("dd.dat"), small_bytes >> 20)
    });
    let r = suite.run();
    let mut rep = Report::new(&format!(
        "append: 100-byte records (no key), {per_batch} per ~{} batch, fsync=never, 1 thread",
        fmt_bytes(batch_bytes as u64)
    ));
    let rps = r.stats("small_build_append");
    rep.target(
        "append.small_build_append",
        "BatchBuilder + append, 100 B records",
        &rps,
        "records/s",
        "≥ 3 000 000/s",
        None,
        &rps,
        Goal::AtLeast(3e6),
    );
    rep.figure(
        "append.small_append_prebuilt",
        "  append only (prebuilt batch, diagnostic)",
        &r.stats("small_append_prebuilt"),
        "records/s",
    );
    let rec_bytes = small_batch.len() as f64 / per_batch as f64;
    let small_mbs: Vec<f64> = r
        .samples("small_build_append")
        .iter()
        .map(|x| x * rec_bytes / 1e6)
        .collect();
    let small_ratio: Vec<f64> = small_mbs
        .iter()
        .zip(r.samples("dd_small"))
        .map(|(a, b)| a / b)
        .collect();
    rep.versus(
        "append.small_build_append_mbs",
        "  same, in MB/s of batch bytes",
        &spool_benches::Stats::new(small_mbs),
        "MB/s",
        &spool_benches::Stats::new(small_ratio),
    );
    rep.figure(
        "append.baseline.dd_small",
        "  baseline: dd, same bytes",
        &r.stats("dd_small"),
        "MB/s",
    );
    let share = spool_benches::Stats::new(
        build_share.borrow()[cfg.warmup.min(build_share.borrow().len())..].to_vec(),
    );
    rep.figure(
        "append.small_build_share",
        "  share of the time spent in BatchBuilder",
        &share,
        "fraction",
    );
    rep.note(&format!("noise: {}", r.noise()));
    rep.print();

    // ---- Part 3: compressed batches. Append checks their records (decompressing as a
    // stream, as Kafka's broker does); the same run measures that check alone, the header +
    // CRC check that was all a compressed batch got before, and appends of the same records
    // uncompressed.
    let per_sample = cfg.count("SPOOL_BENCH_COMPRESSED_RECORDS", 1_000_000, 50_000);
    let (plain, recs) = json_batch(Compression::None, batch_bytes);
    let mut suite = Suite::new("append-compressed", &cfg);
    let limits = spool_log_engine::Limits::default().decode();
    let mut sizes = Vec::new();
    for (name, c) in [("lz4", Compression::Lz4), ("zstd", Compression::Zstd)] {
        let (batch, n) = json_batch(c, batch_bytes);
        assert_eq!(n, recs);
        sizes.push(format!("{name} {} B", batch.len()));
        let times = per_sample.div_ceil(recs);
        let pf = (times * batch.len()) as u64 + (64 << 20);
        let b = batch.clone();
        suite.case(&format!("{name}_append"), "records/s", pf, move || {
            let mbs = append_copies(root, FsyncPolicy::Never, 2 << 30, 1, &b, times);
            mbs * 1e6 / b.len() as f64 * recs as f64
        });
        let b = batch.clone();
        suite.case(
            &format!("{name}_check_records"),
            "records/s",
            0,
            move || {
                check_rate(&b, recs, times, |b| {
                    spool_record::validate_batch(b, u32::MAX, &limits).is_ok()
                })
            },
        );
        let b = batch.clone();
        suite.case(&format!("{name}_decompress"), "records/s", 0, move || {
            let mut out = Vec::new();
            check_rate(&b, recs, times, |b| {
                c.decompress_into(&b[spool_record::HEADER_LEN..], u32::MAX, &mut out)
                    .is_ok()
            })
        });
        suite.case(&format!("{name}_check_header"), "records/s", 0, move || {
            check_rate(&batch, recs, times, |b| {
                spool_record::BatchHeader::parse(b)
                    .and_then(|h| spool_record::check_crc(b, &h))
                    .is_ok()
            })
        });
    }
    let times = per_sample.div_ceil(recs);
    let pf = (times * plain.len()) as u64 + (64 << 20);
    let b = plain.clone();
    suite.case("none_append", "records/s", pf, move || {
        let mbs = append_copies(root, FsyncPolicy::Never, 2 << 30, 1, &b, times);
        mbs * 1e6 / b.len() as f64 * recs as f64
    });
    let r = suite.run();
    let mut rep = Report::new(&format!(
        "append: compressed batches of {recs} JSON-like 1 KiB records ({} B uncompressed; {}), \
         fsync=never, 1 thread",
        plain.len(),
        sizes.join(", ")
    ));
    for name in ["lz4", "zstd"] {
        let append = r.stats(&format!("{name}_append"));
        rep.versus(
            &format!("append.{name}_append"),
            &format!("append {name} batches (records checked)"),
            &append,
            "records/s",
            &r.ratio(&format!("{name}_append"), "none_append"),
        );
        rep.figure(
            &format!("append.{name}_check_records"),
            "  validate_batch alone (header, CRC, records streamed)",
            &r.stats(&format!("{name}_check_records")),
            "records/s",
        );
        rep.figure(
            &format!("append.{name}_decompress"),
            "  decompressing the batch alone (into a reused buffer)",
            &r.stats(&format!("{name}_decompress")),
            "records/s",
        );
        rep.figure(
            &format!("append.{name}_check_header"),
            "  header + CRC alone (all a compressed batch got before)",
            &r.stats(&format!("{name}_check_header")),
            "records/s",
        );
        // Share of an append's time spent walking the records: per round, (1/check - 1/header)
        // / (1/append).
        let share: Vec<f64> = r
            .samples(&format!("{name}_append"))
            .iter()
            .zip(r.samples(&format!("{name}_check_records")))
            .zip(r.samples(&format!("{name}_check_header")))
            .map(|((a, c), h)| (1.0 / c - 1.0 / h) * a)
            .collect();
        rep.figure(
            &format!("append.{name}_record_check_share"),
            "  share of append time spent checking records",
            &spool_benches::Stats::new(share),
            "fraction",
        );
    }
    rep.figure(
        "append.none_append_json",
        "  baseline: the same records uncompressed (records walked in place)",
        &r.stats("none_append"),
        "records/s",
    );
    rep.note(
        "ratio column: per round, compressed append / uncompressed append of the same records",
    );
    rep.note(&format!("noise: {}", r.noise()));
    rep.print();
}
