//! `spool inspect` against real data directories written by the engine.

use std::process::Command;

use spool_log_engine::{BatchBuilder, Compression, Log, LogOptions, TopicConfig};

fn write(dir: &std::path::Path) {
    write_n(dir, 100);
}

/// `n` records `value-I` at timestamp 1000 + I, one per batch, in segments of 4 KiB.
fn write_n(dir: &std::path::Path, n: i64) {
    let log = Log::open(
        dir,
        LogOptions {
            background_maintenance: false,
            ..LogOptions::default()
        },
    )
    .unwrap();
    log.create_topic(
        "prices",
        TopicConfig {
            segment_bytes: 4096,
            index_interval_bytes: 512,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    let p = log.partition("prices", 0).unwrap();
    for i in 0..n {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(
            1000 + i,
            Some(b"k"),
            Some(format!("value-{i}").as_bytes()),
            &[],
        );
        p.append(&b.finish().unwrap()).unwrap();
    }
    log.close().unwrap();
}

fn spool(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn verify_stats_and_dump() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path());
    let d = dir.path().to_str().unwrap();

    let (code, out, err) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("no corruption"), "{err}");

    let (code, out, _) = spool(&["inspect", "stats", d, "--json"]);
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.contains("\"prices\"")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["records"], 100);
    assert_eq!(v["end_offset"], 100);

    let seg = dir.path().join("prices/0/00000000000000000000.log");
    let (code, out, _) = spool(&["inspect", "dump", seg.to_str().unwrap(), "--records"]);
    assert_eq!(code, 0);
    assert!(out.contains("batch at byte 0: offsets 0..=0"), "{out}");
    assert!(
        out.contains(" compression none ") && !out.contains("Some("),
        "the codec by its name, no Rust debug output: {out}"
    );
    assert!(
        out.contains("offset 0 ts 1000 key k value value-0"),
        "{out}"
    );

    // A flipped bit in a sealed segment: exit 1 with file and position.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[300] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let (code, out, err) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("CORRUPTION") && out.contains("00000000000000000000.log at byte"),
        "{out}"
    );
    let (code, out, _) = spool(&["inspect", "verify", d, "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["severity"], "corruption");
    // dump: the batches before the damage, then the error naming it, exit 1 as verify.
    let (code, out, err) = spool(&["inspect", "dump", seg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("batch at byte 0: offsets 0..=0"), "{out}");
    assert!(
        err.contains("corruption in") && err.contains("at byte"),
        "{err}"
    );

    let (code, _, err) = spool(&["inspect", "verify", "/nonexistent/dir"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.matches("(os error 2)").count(),
        1,
        "the cause once: {err}"
    );
    let (code, _, err) = spool(&["inspect", "dump", "/nonexistent/0.log"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.matches("(os error 2)").count(),
        1,
        "the cause once: {err}"
    );
}

/// Sealed segments of `prices/0`, oldest first (the last one is the active segment).
fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let pdir = dir.join("prices/0");
    let mut v: Vec<_> = std::fs::read_dir(&pdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn reindex_rebuilds_missing_and_damaged_indexes() {
    let dir = tempfile::tempdir().unwrap();
    write_n(dir.path(), 250);
    let d = dir.path().to_str().unwrap();
    let segs = segments(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    let (idx0, tidx1) = (
        segs[0].with_extension("index"),
        segs[1].with_extension("timeindex"),
    );
    let (good_idx0, good_tidx1) = (
        std::fs::read(&idx0).unwrap(),
        std::fs::read(&tidx1).unwrap(),
    );

    // An intact directory: nothing to do.
    let (code, out, err) = spool(&["inspect", "reindex", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains(": rebuilt"), "{out}");
    assert!(out.contains("00000000000000000000.log: unchanged"), "{out}");
    assert!(err.contains("0 segment(s) rebuilt"), "{err}");

    // Damage: one index deleted, one time index with a flipped bit.
    std::fs::remove_file(&idx0).unwrap();
    let mut t = good_tidx1.clone();
    t[50] ^= 0x10;
    std::fs::write(&tidx1, &t).unwrap();
    let (code, out, _) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("repairable").count(), 2, "{out}");

    // Dry run: reported, nothing written.
    let (code, out, err) = spool(&["inspect", "reindex", d, "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("00000000000000000000.log: would rebuild: .index was invalid (missing)"),
        "{out}"
    );
    assert!(err.contains("2 segment(s) to rebuild"), "{err}");
    assert!(!idx0.exists());

    let (code, out, err) = spool(&[
        "inspect",
        "reindex",
        d,
        "--topic",
        "prices",
        "--partition",
        "0",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), segs.len());
    assert_eq!(lines[0]["outcome"], "rebuilt");
    assert_eq!(lines[0]["index"]["state"], "invalid");
    assert_eq!(lines[0]["timeindex"]["state"], "current");
    assert_eq!(lines[1]["outcome"], "rebuilt");
    assert_eq!(lines[1]["timeindex"]["state"], "invalid");
    assert!(lines[1]["offset_entries"].as_u64().unwrap() > 0);
    assert_eq!(lines.last().unwrap()["outcome"], "active");
    assert_eq!(std::fs::read(&idx0).unwrap(), good_idx0);
    assert_eq!(std::fs::read(&tidx1).unwrap(), good_tidx1);

    // verify is clean: no finding at all.
    let (code, out, err) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "", "{out}");

    // The engine opens it and finds records by offset and by timestamp.
    let log = Log::open(
        dir.path(),
        LogOptions {
            background_maintenance: false,
            ..LogOptions::default()
        },
    )
    .unwrap();
    let p = log.partition("prices", 0).unwrap();
    for off in [0u64, 1, 33, 64, 99, 180, 249] {
        let read = p.read(off, 1 << 16).unwrap();
        let batch = read.batches().next().unwrap().unwrap();
        assert_eq!(batch.header().base_offset, off);
        let rec = batch
            .records(&Default::default())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            rec.value.as_deref(),
            Some(format!("value-{off}").as_bytes())
        );
    }
    for (ts, want) in [
        (0, Some(0)),
        (1000, Some(0)),
        (1050, Some(50)),
        (1099, Some(99)),
    ] {
        assert_eq!(p.offset_for_timestamp(ts).unwrap(), want, "ts {ts}");
    }
    assert_eq!(p.offset_for_timestamp(1250).unwrap(), None);
    log.close().unwrap();
}

#[test]
fn reindex_refuses_a_locked_directory_and_reports_corruption() {
    let dir = tempfile::tempdir().unwrap();
    write_n(dir.path(), 250);
    let d = dir.path().to_str().unwrap();

    let log = Log::open(dir.path(), LogOptions::default()).unwrap();
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec!["inspect", "reindex", d];
        args.extend_from_slice(extra);
        let (code, out, err) = spool(&args);
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains("is locked by a running log"), "{err}");
        assert_eq!(out, "");
    }
    log.close().unwrap();
    drop(log);

    let segs = segments(dir.path());
    std::fs::remove_file(segs[1].with_extension("index")).unwrap();
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[300] ^= 0x01;
    std::fs::write(&segs[0], &bytes).unwrap();
    let (code, out, err) = spool(&["inspect", "reindex", d]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("00000000000000000000.log: CORRUPTION at byte"),
        "{out}"
    );
    assert!(
        out.contains("not reached (an earlier segment is corrupt)"),
        "{out}"
    );
    assert!(err.contains("CORRUPTION FOUND"), "{err}");
    // Nothing was indexed past the damage.
    assert!(!segs[1].with_extension("index").exists());

    let (code, _, err) = spool(&["inspect", "reindex", d, "--topic", "nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("\"nope\" does not exist"), "{err}");
}

/// A torn tail (half a batch past the recovery point of the last segment, as a crash mid-write
/// leaves it): `verify` warns and exits 0, because opening the log cuts it (keeping the bytes
/// aside); after an open, `verify` is clean.
#[test]
fn verify_reports_a_torn_tail_as_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path());
    let d = dir.path().to_str().unwrap();
    let last = segments(dir.path()).into_iter().max().unwrap();
    let mut b = BatchBuilder::new(Compression::None);
    b.push(5000, Some(b"k"), Some(b"never acknowledged"), &[]);
    let batch = b.finish().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    std::io::Write::write_all(&mut f, &batch[..batch.len() / 2]).unwrap();
    drop(f);

    let (code, out, err) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("torn tail"), "{out}");
    assert!(!out.contains("CORRUPTION"), "{out}");
    let (code, out, _) = spool(&["inspect", "verify", d, "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"torn_tail\""), "{out}");

    // Opening the log cuts the tail (and keeps it in a .torn-<pos> file); then all is clean.
    let log = Log::open(dir.path(), LogOptions::default()).unwrap();
    let report = &log.recovery_reports()[0].2;
    assert_eq!(report.quarantined.len(), 1);
    log.close().unwrap();
    drop(log);
    let (code, out, err) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("torn tail"), "{out}");
}

/// The zeros a log that zeroes ahead leaves after the active segment's last batch (here: the
/// directory as `kill -9` leaves it, read while the log is open): `stats` and `verify` print
/// how many (`zero_tail_bytes`), `dump` says where it stopped; none of them calls it damage.
#[test]
fn stats_verify_and_dump_print_the_zero_tail() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        LogOptions {
            background_maintenance: false,
            zero_ahead_bytes: spool_log_engine::MIN_ZERO_AHEAD_BYTES,
            ..LogOptions::default()
        },
    )
    .unwrap();
    log.create_topic(
        "prices",
        TopicConfig {
            fsync: spool_log_engine::FsyncPolicy::Always,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    let p = log.partition("prices", 0).unwrap();
    let mut b = BatchBuilder::new(Compression::None);
    b.push(1000, Some(b"k"), Some(b"acknowledged"), &[]);
    let batch = b.finish().unwrap();
    p.append(&batch).unwrap(); // one small sync measured: zeroing may start
    log.run_maintenance().unwrap();
    let end = p.stats().size_bytes;
    let seg = segments(dir.path()).pop().unwrap();
    let zeros = std::fs::metadata(&seg).unwrap().len() - end;
    assert!(zeros > 0, "the log zeroed ahead");
    let d = dir.path().to_str().unwrap();

    let (code, out, _) = spool(&["inspect", "stats", d, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        (v["bytes"].as_u64(), v["zero_tail_bytes"].as_u64()),
        (Some(end), Some(zeros))
    );
    let (code, out, _) = spool(&["inspect", "stats", d]);
    assert_eq!(code, 0);
    assert!(
        out.contains("ZERO-TAIL") && out.contains(&format!(" {zeros}\n")),
        "{out}"
    );

    // Zeros after the last batch have two causes the tools cannot tell apart: zeroing ahead,
    // and appended bytes a crash or a disk fault left as zeros. Every line names both.
    let says_both = |text: &str| {
        text.contains("no batch in them (zeros written ahead of the writer, or appended bytes a crash or a disk fault left as zeros)")
    };
    let (code, out, err) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "zero tail: {} at byte {end} (offset 1): {zeros} zero bytes",
            seg.display()
        )),
        "{out}"
    );
    assert!(says_both(&out), "{out}");
    assert!(err.contains("no corruption"), "{err}");
    let (code, out, _) = spool(&["inspect", "verify", d, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["severity"], "zero_tail");
    assert_eq!(v["zero_tail_bytes"].as_u64(), Some(zeros));
    assert!(says_both(v["problem"].as_str().unwrap()), "{v}");

    let (code, out, _) = spool(&["inspect", "dump", seg.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("batch at byte 0: offsets 0..=0"), "{out}");
    assert!(
        out.contains(&format!("zero tail at byte {end}: {zeros} zero bytes")),
        "{out}"
    );
    assert!(says_both(&out), "{out}");
    drop(p);
    log.close().unwrap();
}

/// Zeros where a sealed segment's last batch was (lost write-back, a disk fault): `verify`
/// and `dump` both call it corruption and exit 1; `dump` prints the batches before it.
#[test]
fn zeros_in_a_sealed_segment_are_corruption_for_dump_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path());
    let d = dir.path().to_str().unwrap();
    let sealed = segments(dir.path()).remove(0);
    let mut bytes = std::fs::read(&sealed).unwrap();
    // The last batch starts where the dump says.
    let (_, out, _) = spool(&["inspect", "dump", sealed.to_str().unwrap()]);
    let last: usize = out
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("batch at byte "))
        .and_then(|l| l.split(':').next())
        .unwrap()
        .parse()
        .unwrap();
    let batches = out.lines().count();
    bytes[last..].fill(0);
    std::fs::write(&sealed, &bytes).unwrap();
    let (code, out, err) = spool(&["inspect", "dump", sealed.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(out.lines().count(), batches - 1, "{out}");
    assert!(
        err.contains(&format!("at byte {last}")) && err.contains("zero bytes"),
        "{err}"
    );
    let (code, out, _) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("CORRUPTION"), "{out}");
}

/// A batch whose CRC checks but whose first record's length runs past the batch (written by
/// something other than this engine, or damaged before its CRC was computed): `dump --records`
/// prints the batch header, then names the batch and exits 1, as for a damaged batch.
#[test]
fn dump_records_calls_a_record_that_does_not_decode_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    write_n(dir.path(), 3);
    let seg = dir.path().join("prices/0/00000000000000000000.log");
    let mut bytes = std::fs::read(&seg).unwrap();
    // RecordBatch v2: batchLength at 8..12 counts from byte 12; records start at byte 61,
    // each with a zigzag varint length first. 0x7e is 63, past this ~20-byte record.
    let len = 12 + u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
    bytes[61] = 0x7e;
    let crc = spool_record::batch_crc(&bytes[..len]);
    bytes[17..21].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&seg, &bytes).unwrap();

    let (code, out, _) = spool(&["inspect", "dump", seg.to_str().unwrap()]);
    assert_eq!(
        code, 0,
        "without --records the CRC is all dump checks: {out}"
    );
    let (code, out, err) = spool(&["inspect", "dump", seg.to_str().unwrap(), "--records"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("batch at byte 0: offsets 0..=0"), "{out}");
    assert!(!out.contains("  offset 0 "), "{out}");
    assert!(
        err.contains("batch at byte 0: a record does not decode"),
        "{err}"
    );
}

/// Checking nothing is not a clean log: `verify` and `stats` on a directory without topics (a
/// wrong path) or with a `--topic` it does not have exit 2 and say what is wrong.
#[test]
fn verify_and_stats_refuse_to_check_nothing() {
    let empty = tempfile::tempdir().unwrap();
    let e = empty.path().to_str().unwrap();
    for cmd in ["verify", "stats"] {
        let (code, out, err) = spool(&["inspect", cmd, e]);
        assert_eq!(code, 2, "{cmd}: {out}{err}");
        assert!(err.contains(&format!("no topic in {e}")), "{cmd}: {err}");
        assert!(!err.contains("no corruption"), "{cmd}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    write(dir.path());
    let d = dir.path().to_str().unwrap();
    for cmd in ["verify", "stats"] {
        let (code, out, err) = spool(&["inspect", cmd, d, "--topic", "pricse"]);
        assert_eq!(code, 2, "{cmd}: {out}{err}");
        assert!(
            err.contains("no topic named \"pricse\"") && err.contains("it has: prices"),
            "{cmd}: {err}"
        );
        assert!(out.is_empty(), "{cmd}: {out}");
    }
    // A topic's own directory given instead of the data_dir.
    let (code, _, err) = spool(&["inspect", "verify", &format!("{d}/prices")]);
    assert_eq!(code, 2, "{err}");
    // The right one still passes.
    let (code, _, err) = spool(&["inspect", "verify", d, "--topic", "prices"]);
    assert_eq!(code, 0, "{err}");
}
