//! Torn tails: the last segment cut, or followed by garbage, past the recovery point.
//!
//! A data directory is frozen (copied) while its log is still open, so that its last batches
//! lie past the persisted recovery point exactly as after `kill -9`. Each case copies that
//! image, damages the tail of the last segment, reopens it and checks that recovery keeps
//! every complete batch before the damage, cuts exactly the damaged bytes (and says so in its
//! report), serves nothing past the cut, and that appends continue at the next offset.
//!
//! Two layouts: `mid`, whose recovery point sits in the middle of the last segment (five
//! trusted batches, then three past the point), and `fresh`, whose last segment was just
//! rolled (the point is at its byte 0, so all three of its batches lie past it).

use std::path::{Path, PathBuf};

use spool_log_engine::{Error, FsyncPolicy, Log, TopicConfig};

use crate::common::{
    BatchSpan, XorShift, batch, batch_spans, copy_dir, open_topic, opts, read_all, report, scratch,
    seed, values,
};

fn cfg() -> TopicConfig {
    TopicConfig {
        segment_bytes: 4096,
        index_interval_bytes: 64,
        fsync: FsyncPolicy::Always,
        ..TopicConfig::default()
    }
}

/// Batches appended past the recovery point (the torn-tail candidates).
const TAIL: usize = 3;

/// A data directory copied while its log was open.
struct Image {
    name: &'static str,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    /// Path of the last segment, relative to `dir`.
    seg_rel: PathBuf,
    /// The last segment's bytes.
    seg: Vec<u8>,
    /// Its batches.
    spans: Vec<BatchSpan>,
    /// The recovery point's byte position in it.
    point: u64,
    /// Every record value, indexed by offset.
    values: Vec<String>,
}

impl Image {
    /// Builds the image: `before` batches in sealed segments, a roll, `trusted` batches made
    /// durable by a clean close (which writes the recovery point after them), then `TAIL`
    /// batches appended after reopening and frozen without a close.
    fn build(name: &'static str, before: usize, trusted: usize) -> Image {
        let src = scratch();
        {
            let log = open_topic(src.path(), cfg());
            let p = log.partition("t", 0).unwrap();
            for i in 0..before {
                p.append(&batch(&format!("a{i}"), 3, i as i64)).unwrap();
            }
            p.roll().unwrap();
            for i in 0..trusted {
                p.append(&batch(&format!("b{i}"), 3, 1000 + i as i64))
                    .unwrap();
            }
        } // dropping the log closes it: the recovery point now covers everything so far

        let log = open_topic(src.path(), cfg());
        let p = log.partition("t", 0).unwrap();
        let bases = p.segment_bases();
        for i in 0..TAIL {
            p.append(&batch(&format!("c{i}"), 3, 2000 + i as i64))
                .unwrap();
        }
        assert_eq!(p.segment_bases(), bases, "{name}: the tail must not roll");
        assert!(
            bases.len() >= 2,
            "{name}: want sealed segments too, got {bases:?}"
        );
        let tmp = scratch();
        let dir = tmp.path().join("data");
        copy_dir(src.path(), &dir);
        let values = values(&read_all(&p, 0));
        assert_eq!(values.len() as u64, p.high_watermark());
        let seg_abs = p.active_segment_path();
        let seg_rel = seg_abs.strip_prefix(src.path()).unwrap().to_path_buf();
        drop(log);
        let seg = std::fs::read(dir.join(&seg_rel)).unwrap();
        let spans = batch_spans(&seg);
        assert_eq!(
            spans.len(),
            trusted + TAIL,
            "{name}: batches in the last segment"
        );
        let point = spans[trusted].pos;
        Image {
            name,
            _tmp: tmp,
            dir,
            seg_rel,
            seg,
            spans,
            point,
            values,
        }
    }

    /// Copies the image to a fresh directory and applies `damage` to its last segment.
    fn case(&self, damage: impl FnOnce(&Path)) -> tempfile::TempDir {
        let tmp = scratch();
        copy_dir(&self.dir, tmp.path());
        damage(&tmp.path().join(&self.seg_rel));
        tmp
    }

    /// End position and next offset of the last complete batch ending at or before `at`.
    fn kept(&self, at: u64) -> (u64, u64) {
        let first = self.values.len() as u64
            - self
                .spans
                .iter()
                .map(|s| s.next_offset - s.base_offset)
                .sum::<u64>();
        self.spans
            .iter()
            .take_while(|s| s.end() <= at)
            .last()
            .map_or((0, first), |s| (s.end(), s.next_offset))
    }
}

/// Opens a damaged copy and checks it recovered to `keep_end` (the end of the last complete
/// batch), given that the file was `len` bytes before recovery. Reopens afterwards too when
/// `reopen`. Returns the bytes truncated.
fn check(
    img: &Image,
    dir: &Path,
    len: u64,
    keep_end: u64,
    keep_next: u64,
    reopen: bool,
    what: &str,
) -> u64 {
    let ctx = format!("{} layout, {what}", img.name);
    let log = Log::open(dir, opts()).unwrap_or_else(|e| panic!("{ctx}: open failed: {e}"));
    let r = report(&log, 0);
    assert!(r.had_recovery_point, "{ctx}: {r:?}");
    assert_eq!(
        r.bytes_truncated,
        len - keep_end,
        "{ctx}: bytes truncated ({r:?})"
    );
    assert_eq!(
        r.bytes_scanned,
        keep_end - img.point,
        "{ctx}: only bytes past the point are scanned ({r:?})"
    );
    let seg = dir.join(&img.seg_rel);
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        keep_end,
        "{ctx}: file length after recovery"
    );
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.high_watermark(), keep_next, "{ctx}: high watermark");
    let got = values(&read_all(&p, 0));
    assert!(
        got == img.values[..keep_next as usize],
        "{ctx}: records served differ from the complete batches before the cut"
    );
    assert!(p.read(keep_next, 1 << 20).unwrap().data.is_empty(), "{ctx}");
    assert!(
        matches!(
            p.read(keep_next + 1, 1),
            Err(Error::OffsetOutOfRange { .. })
        ),
        "{ctx}"
    );
    let info = p.append(&batch("new", 2, 9000)).unwrap();
    assert_eq!(
        info.base_offset, keep_next,
        "{ctx}: appends continue at the next offset"
    );
    let after = values(&read_all(&p, keep_next));
    assert_eq!(after, ["new-0", "new-1"], "{ctx}");
    drop(p);
    drop(log);
    if reopen {
        let log =
            Log::open(dir, opts()).unwrap_or_else(|e| panic!("{ctx}: second open failed: {e}"));
        let r = report(&log, 0);
        assert_eq!(
            (r.bytes_truncated, r.bytes_scanned),
            (0, 0),
            "{ctx}: clean close after recovery: {r:?}"
        );
        let p = log.partition("t", 0).unwrap();
        assert_eq!(p.high_watermark(), keep_next + 2, "{ctx}");
        let got = values(&read_all(&p, 0));
        assert!(
            got[..keep_next as usize] == img.values[..keep_next as usize],
            "{ctx}: after the second open"
        );
        assert_eq!(got[keep_next as usize..], ["new-0", "new-1"], "{ctx}");
    }
    len - keep_end
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

/// Cuts the last segment at every byte of its last `TAIL` batches (and at its full length, the
/// control), in both layouts.
#[test]
fn cut_at_every_byte_of_the_last_batches() {
    let start = std::time::Instant::now();
    let (mut cases, mut truncated, mut records) = (0u64, 0u64, 0u64);
    for img in [Image::build("mid", 60, 5), Image::build("fresh", 40, 0)] {
        let from = img.spans[img.spans.len() - TAIL].pos;
        assert_eq!(
            from, img.point,
            "{}: the cut region is exactly what lies past the point",
            img.name
        );
        let len = img.seg.len() as u64;
        for cut in from..=len {
            let dir = img.case(|seg| truncate(seg, cut));
            let (keep_end, keep_next) = img.kept(cut);
            // A second open is slower; do it at batch boundaries and every 16th byte.
            let reopen = cut % 16 == 0 || keep_end == cut;
            truncated += check(
                &img,
                dir.path(),
                cut,
                keep_end,
                keep_next,
                reopen,
                &format!("cut at byte {cut} of {len}"),
            );
            records += keep_next;
            cases += 1;
        }
    }
    eprintln!(
        "torn tail cuts: {cases} cases, {truncated} bytes truncated in total, {records} records recovered, {:?}",
        start.elapsed()
    );
}

/// A cut below the recovery point is not a torn tail: the log must refuse to open, naming the
/// segment, and must not cut anything itself.
#[test]
fn cut_before_the_recovery_point_is_corruption() {
    let img = Image::build("mid", 60, 5);
    for cut in [img.point - 1, img.point / 2, img.spans[1].pos + 7, 1] {
        let dir = img.case(|seg| truncate(seg, cut));
        match Log::open(dir.path(), opts()) {
            Err(Error::Corruption { path, .. }) => {
                assert!(
                    path.ends_with(img.seg_rel.file_name().unwrap()),
                    "cut at {cut}: names {path:?}"
                )
            }
            other => panic!(
                "cut at {cut} below the recovery point {}: want Corruption, got {other:?}",
                img.point
            ),
        }
        let len = std::fs::metadata(dir.path().join(&img.seg_rel))
            .unwrap()
            .len();
        assert_eq!(len, cut, "cut at {cut}: the file must be left as found");
    }
}

/// Random bytes, zeros and stale or adversarial batch headers after the last complete batch.
#[test]
fn garbage_and_zero_tails() {
    let seed = seed("SPOOL_TORN_SEED", 0x7041_1ea5);
    let mut rng = XorShift::new(seed);
    let start = std::time::Instant::now();
    let mut cases = 0;
    for img in [Image::build("mid", 60, 5), Image::build("fresh", 40, 0)] {
        let len = img.seg.len() as u64;
        let full = img.values.len() as u64;
        let last = *img.spans.last().unwrap();
        let last_bytes = &img.seg[last.pos as usize..last.end() as usize];
        let mut tails: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..16 {
            let n = if i < 4 {
                rng.range(1, 61)
            } else {
                rng.range(61, 600)
            } as usize;
            tails.push((
                format!("{n} random bytes (seed {seed:#x}, tail {i})"),
                rng.bytes(n),
            ));
        }
        for n in [1usize, 8, 12, 60, 61, 62, 100, 4096, 20_000] {
            tails.push((format!("{n} zero bytes"), vec![0; n]));
        }
        tails.push(("100 0xff bytes".into(), vec![0xff; 100]));
        // A complete, CRC-valid copy of the last batch: its base offset is stale.
        tails.push(("a stale copy of the last batch".into(), last_bytes.to_vec()));
        // The last batch's header claiming a huge length, then a little data.
        let mut huge = last_bytes.to_vec();
        huge[8..12].copy_from_slice(&i32::MAX.to_be_bytes());
        tails.push(("a header with batch_length i32::MAX".into(), huge));
        let mut tiny = last_bytes[..61].to_vec();
        tiny[8..12].copy_from_slice(&48i32.to_be_bytes());
        tails.push(("a header with batch_length 48".into(), tiny));
        let mut negative = last_bytes.to_vec();
        negative[8..12].copy_from_slice(&(-1i32).to_be_bytes());
        tails.push(("a header with batch_length -1".into(), negative));
        // A valid header with the right next offset, then zeros instead of the records (a
        // size update that reached the disk before the data did).
        let mut hollow = last_bytes.to_vec();
        hollow[..8].copy_from_slice(&(last.next_offset as i64).to_be_bytes());
        hollow[61..].fill(0);
        tails.push(("a hollow batch (header, then zeros)".into(), hollow));
        for (what, tail) in &tails {
            let dir = img.case(|seg| append_bytes(seg, tail));
            let n = tail.len() as u64;
            check(
                &img,
                dir.path(),
                len + n,
                len,
                full,
                true,
                &format!("tail of {what}"),
            );
            cases += 1;
        }
        // The last batch itself zeroed from some byte on, the file length unchanged.
        for from in [1u64, 8, 12, 17, 21, 57, 61, last.len - 2] {
            let dir = img.case(|seg| {
                let mut data = std::fs::read(seg).unwrap();
                data[(last.pos + from) as usize..].fill(0);
                std::fs::write(seg, data).unwrap();
            });
            let what = format!("last batch zeroed from its byte {from}");
            check(
                &img,
                dir.path(),
                len,
                last.pos,
                last.base_offset,
                true,
                &what,
            );
            cases += 1;
        }
    }
    eprintln!("garbage/zero tails: {cases} cases, {:?}", start.elapsed());
}

/// Finding 4 of review-audit-engine: appends resume at a cut, so a second tear can happen at
/// the same position. Its copy must not replace the first one, which may hold the only copy
/// of acknowledged batches (past the recovery point, they were fdatasync'd and answered).
/// Before the fix the second open truncated `<segment>.torn-<pos>` and wrote the new tail in.
#[test]
fn a_second_torn_tail_at_the_same_position_keeps_the_first_copy() {
    let img = Image::build("mid", 60, 5);
    let last = *img.spans.last().unwrap();
    let flip = |seg: &Path| {
        let mut data = std::fs::read(seg).unwrap();
        data[(last.pos + 70) as usize] ^= 0x20;
        std::fs::write(seg, data).unwrap();
    };
    // 1. The last (acknowledged) batch damaged: cut at its start, its bytes kept.
    let dir = img.case(flip);
    let log = Log::open(dir.path(), opts()).unwrap();
    let r = report(&log, 0);
    assert_eq!(r.quarantined.len(), 1, "{r:?}");
    let first = r.quarantined[0].clone();
    assert!(
        first
            .to_string_lossy()
            .ends_with(&format!(".torn-{}", last.pos))
    );
    let first_bytes = std::fs::read(&first).unwrap();
    assert_eq!(first_bytes.len() as u64, last.len);
    // 2. A new batch goes to the same position; freeze the directory before any close (the
    // batch lies past the recovery point, as after kill -9), and damage it the same way.
    let p = log.partition("t", 0).unwrap();
    let info = p.append(&batch("again", 3, 3000)).unwrap();
    assert_eq!(info.base_offset, last.base_offset);
    let frozen = scratch();
    copy_dir(dir.path(), frozen.path());
    drop(p);
    drop(log);
    flip(&frozen.path().join(&img.seg_rel));
    let log = Log::open(frozen.path(), opts()).unwrap();
    let r = report(&log, 0);
    assert_eq!(r.quarantined.len(), 1, "{r:?}");
    let second = r.quarantined[0].clone();
    let first = frozen.path().join(first.strip_prefix(dir.path()).unwrap());
    assert_ne!(second, first, "a new file for the second cut");
    // 3. Both copies, each with its own bytes.
    assert_eq!(
        std::fs::read(&first).unwrap(),
        first_bytes,
        "the first copy"
    );
    let second_bytes = std::fs::read(&second).unwrap();
    assert_ne!(second_bytes, first_bytes);
    let has = |b: &[u8], what: &[u8]| b.windows(what.len()).any(|w| w == what);
    assert!(
        has(&second_bytes, b"again-1"),
        "the second copy holds the new batch"
    );
    assert!(has(&first_bytes, b"c2-1") && !has(&first_bytes, b"again"));
}

/// Follows finding 4 (review of 30a5d4f, F5): a torn-tail copy that cannot be completed (a
/// full disk) is removed again. The open fails before the cut, so the segment still holds
/// those bytes; left behind, every failing open would add one more copy of the same tail, up
/// to the cap, after which the partition could not open at all.
#[test]
fn a_torn_tail_copy_that_fails_leaves_no_file() {
    use spool_log_engine::LogOptions;
    use spool_log_engine::io::sim::{CutModel, Effect, Fault, OpKind, SimFs, SimRng};

    let sim = SimFs::new();
    let open = || {
        Log::open(
            "/spool",
            LogOptions {
                background_maintenance: false,
                fs: sim.fs(),
                ..LogOptions::default()
            },
        )
    };
    let torn_files = || -> Vec<String> {
        let mut v: Vec<String> = sim
            .fs()
            .read_dir(Path::new("/spool/t/0"))
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n.contains(".torn-"))
            .collect();
        v.sort();
        v
    };
    let log = open().unwrap();
    log.create_topic("t", cfg()).unwrap();
    let p = log.partition("t", 0).unwrap();
    for i in 0..5 {
        p.append(&batch(&format!("b{i}"), 3, i)).unwrap();
    }
    let seg = p.active_segment_path();
    let size = sim.fs().metadata(&seg).unwrap().len;
    // Damage the last batch (synced: fsync = always), then cut the power with the log open:
    // the batches lie past the recovery point.
    sim.flip_bit(&seg, size - 10, 3).unwrap();
    sim.cut();
    drop(p);
    drop(log);
    sim.restart(&CutModel::LOSE_UNSYNCED, &mut SimRng::new(7));
    sim.inject(Fault::on(
        OpKind::Write,
        ".torn-",
        Effect::Fail(libc::ENOSPC),
    ));
    for attempt in 0..3 {
        let err = open().map(|_| ()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "attempt {attempt}: {err}");
        assert_eq!(torn_files(), Vec::<String>::new(), "attempt {attempt}");
    }
    sim.clear_faults();
    let log = open().unwrap();
    let torn = torn_files();
    assert_eq!(torn.len(), 1, "{torn:?}");
    assert!(!torn[0].ends_with("-1"), "{torn:?}");
    assert_eq!(log.partition("t", 0).unwrap().high_watermark(), 12);
}
