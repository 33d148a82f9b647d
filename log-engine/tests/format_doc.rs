//! Keeps `docs/format.md` honest: every golden vector in it is compared with what the engine
//! produces today, so the document cannot drift from the code.
//!
//! A vector is a fenced block whose info string is `hex golden:NAME` (bytes) or
//! `json golden:NAME` (text). In a hex block, `#` starts a comment, an optional leading
//! `N:` gives the decimal position of the line's first byte (checked), and every other token
//! is an even number of hex digits. Each NAME must appear exactly once and must be one of the
//! vectors built below; every vector built below must be in the document.
//!
//! To regenerate the bytes after a deliberate format change, run
//! `SPOOL_GOLDEN_PRINT=1 cargo test -p spool-log-engine --test format_doc -- --nocapture`
//! and copy the rows (then re-check the annotations by hand).
// Tests reach files directly on purpose (damage them, read what the engine wrote).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use spool_log_engine::{BatchBuilder, BatchHeader, Compression, Log, LogOptions, TopicConfig};

/// A vector as the engine produces it.
enum Vector {
    Hex(Vec<u8>),
    Text(String),
}

/// A vector as the document states it.
struct DocBlock {
    name: String,
    line: usize,
    vector: Vector,
}

fn doc_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/format.md")
}

/// Parses one hex block's lines (starting at document line `first_line`).
fn parse_hex(lines: &[&str], first_line: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (i, raw) in lines.iter().enumerate() {
        let at = first_line + i;
        let code = raw.split('#').next().unwrap_or("").trim();
        if code.is_empty() {
            continue;
        }
        let mut tokens = code.split_whitespace().peekable();
        if let Some(label) = tokens.peek().and_then(|t| t.strip_suffix(':')) {
            let pos: usize = label
                .parse()
                .map_err(|_| format!("line {at}: bad position label {label:?}"))?;
            if pos != out.len() {
                return Err(format!(
                    "line {at}: label says byte {pos}, but {} bytes precede it",
                    out.len()
                ));
            }
            tokens.next();
        }
        for t in tokens {
            if t.len() % 2 != 0 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("line {at}: {t:?} is not whole hex bytes"));
            }
            for k in (0..t.len()).step_by(2) {
                out.push(u8::from_str_radix(&t[k..k + 2], 16).expect("checked hex"));
            }
        }
    }
    Ok(out)
}

/// Finds every golden block of the document.
fn parse_doc(text: &str) -> Vec<DocBlock> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim_start();
        let Some(info) = l.strip_prefix("```") else {
            i += 1;
            continue;
        };
        let mut words = info.split_whitespace();
        let lang = words.next().unwrap_or("");
        let name = words.find_map(|w| w.strip_prefix("golden:"));
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && !lines[end].trim_start().starts_with("```") {
            end += 1;
        }
        assert!(
            end < lines.len(),
            "docs/format.md:{}: unterminated code block",
            i + 1
        );
        if let Some(name) = name {
            let body = &lines[start..end];
            let vector = match lang {
                "hex" => Vector::Hex(
                    parse_hex(body, start + 1)
                        .unwrap_or_else(|e| panic!("docs/format.md {name}: {e}")),
                ),
                _ => Vector::Text(body.join("\n")),
            };
            blocks.push(DocBlock {
                name: name.to_owned(),
                line: i + 1,
                vector,
            });
        }
        i = end + 1;
    }
    blocks
}

fn hex_rows(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, row)| {
            let h: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:>4}: {}\n", i * 16, h.join(" "))
        })
        .collect()
}

/// Timestamp of the first record of `two_records` (2023-11-14T22:13:20Z).
const T0: i64 = 1_700_000_000_000;

fn single_record() -> Vec<u8> {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(1000, Some(b"k"), Some(b"v"), &[]);
    b.finish().unwrap().to_vec()
}

fn two_records() -> Vec<u8> {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(T0, None, Some(b"hello"), &[("trace", Some(b"abc"))]);
    b.push(
        T0 + 300,
        Some(b"k2"),
        None,
        &[("a", Some(b"1")), ("b", None)],
    );
    b.finish().unwrap().to_vec()
}

fn lz4_batch() -> Vec<u8> {
    let mut b = BatchBuilder::new(Compression::Lz4);
    b.push(1000, Some(b"k"), Some(&[b'a'; 40]), &[]);
    b.finish().unwrap().to_vec()
}

/// Runs the documented scenario on a real log and returns the files it leaves.
fn partition_files() -> BTreeMap<&'static str, Vector> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let opts = LogOptions {
        background_maintenance: false,
        ..LogOptions::default()
    };
    let log = Log::open(&root, opts).unwrap();
    let cfg = TopicConfig {
        index_interval_bytes: 64,
        ..TopicConfig::default()
    };
    log.create_topic("golden", cfg).unwrap();
    let p = log.partition("golden", 0).unwrap();
    p.set_leader_epoch(7);
    let a = p.append(&single_record()).unwrap();
    let b = p.append(&two_records()).unwrap();
    assert_eq!((a.base_offset, b.base_offset, b.last_offset), (0, 1, 2));
    p.roll().unwrap();
    drop(p);
    log.close().unwrap();
    drop(log);

    let pdir = root.join("golden").join("0");
    let read = |name: &str| std::fs::read(pdir.join(name)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&pdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "00000000000000000000.index",
            "00000000000000000000.log",
            "00000000000000000000.timeindex",
            "00000000000000000003.log",
            "producers.snapshot",
            "recovery-point",
        ],
        "the partition directory of the documented scenario"
    );
    let mut out = BTreeMap::new();
    out.insert("segment_log", Vector::Hex(read("00000000000000000000.log")));
    out.insert(
        "offset_index",
        Vector::Hex(read("00000000000000000000.index")),
    );
    out.insert(
        "time_index",
        Vector::Hex(read("00000000000000000000.timeindex")),
    );
    out.insert("recovery_point", Vector::Hex(read("recovery-point")));
    out.insert("producer_snapshot", Vector::Hex(read("producers.snapshot")));
    let json = std::fs::read_to_string(root.join("golden").join("topic.json")).unwrap();
    out.insert("topic_json", Vector::Text(json));
    out
}

fn produced() -> BTreeMap<&'static str, Vector> {
    let mut v = partition_files();
    v.insert("single_record", Vector::Hex(single_record()));
    v.insert("two_records", Vector::Hex(two_records()));
    v.insert("lz4_batch", Vector::Hex(lz4_batch()));
    v
}

#[test]
fn golden_vectors_in_format_doc_match_the_code() {
    let produced = produced();
    if std::env::var_os("SPOOL_GOLDEN_PRINT").is_some() {
        for (name, v) in &produced {
            match v {
                Vector::Hex(b) => eprintln!("```hex golden:{name}\n{}```\n", hex_rows(b)),
                Vector::Text(t) => eprintln!("```json golden:{name}\n{t}\n```\n"),
            }
        }
    }
    let path = doc_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let blocks = parse_doc(&text);
    let mut seen = BTreeMap::new();
    let mut failures = Vec::new();
    for b in &blocks {
        if let Some(prev) = seen.insert(b.name.clone(), b.line) {
            failures.push(format!(
                "{} appears twice (lines {prev} and {})",
                b.name, b.line
            ));
            continue;
        }
        let Some(want) = produced.get(b.name.as_str()) else {
            failures.push(format!(
                "line {}: no test produces a vector named {}",
                b.line, b.name
            ));
            continue;
        };
        match (&b.vector, want) {
            (Vector::Hex(doc), Vector::Hex(code)) if doc != code => failures.push(format!(
                "line {}: {} differs from the code, first at byte {}.\n\
                 doc ({} bytes):\n{}code ({} bytes):\n{}",
                b.line,
                b.name,
                doc.iter().zip(code).take_while(|(a, b)| a == b).count(),
                doc.len(),
                hex_rows(doc),
                code.len(),
                hex_rows(code)
            )),
            (Vector::Text(doc), Vector::Text(code)) if doc.trim_end() != code.trim_end() => {
                failures.push(format!(
                    "line {}: {} differs from the code.\ndoc:\n{doc}\ncode:\n{code}",
                    b.line, b.name
                ))
            }
            (Vector::Hex(_), Vector::Text(_)) | (Vector::Text(_), Vector::Hex(_)) => failures.push(
                format!("line {}: {} has the wrong block type", b.line, b.name),
            ),
            _ => {}
        }
    }
    for name in produced.keys() {
        if !seen.contains_key(*name) {
            failures.push(format!("vector {name} is missing from the document"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} (run with SPOOL_GOLDEN_PRINT=1 and --nocapture to print the current bytes):\n\n{}",
        path.display(),
        failures.join("\n\n")
    );
}

/// CRC-32C (Castagnoli), bit by bit: independent of the `crc32c` crate the engine uses.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    crc_reflected(data, 0x82f6_3b78)
}

/// CRC-32 (IEEE, as zlib), bit by bit: independent of the `crc32fast` crate the engine uses.
fn crc32_bitwise(data: &[u8]) -> u32 {
    crc_reflected(data, 0xedb8_8320)
}

fn crc_reflected(data: &[u8], poly: u32) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ poly
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Every checksum in the documented vectors, recomputed from the definitions the document
/// gives (CRC-32C over batch bytes 21..end, big-endian; CRC-32 over Spool's own structures,
/// little-endian).
#[test]
fn checksums_match_the_documented_definitions() {
    // Check values from the CRC catalogue ("123456789").
    assert_eq!(crc32c_bitwise(b"123456789"), 0xe306_9283);
    assert_eq!(crc32_bitwise(b"123456789"), 0xcbf4_3926);
    let files = partition_files();
    let hex = |name: &str| match &files[name] {
        Vector::Hex(b) => b.clone(),
        Vector::Text(_) => unreachable!(),
    };
    let seg = hex("segment_log");
    let mut batches = vec![single_record(), two_records(), lz4_batch()];
    batches.push(seg[..70].to_vec());
    batches.push(seg[70..].to_vec());
    for b in &batches {
        assert_eq!(be_u32(b, 17), crc32c_bitwise(&b[21..]), "batch CRC-32C");
    }
    for name in ["offset_index", "time_index"] {
        let f = hex(name);
        assert_eq!(
            le_u32(&f, 40),
            crc32_bitwise(&f[48..]),
            "{name} entries_crc"
        );
        assert_eq!(le_u32(&f, 44), crc32_bitwise(&f[..44]), "{name} header_crc");
    }
    let rp = hex("recovery_point");
    assert_eq!(rp.len(), 128);
    for slot in rp.chunks(64) {
        assert_eq!(
            le_u32(slot, 40),
            crc32_bitwise(&slot[..40]),
            "recovery-point slot crc"
        );
    }
}

/// The claims the document makes about the vectors, checked directly.
#[test]
fn documented_properties_of_the_vectors() {
    let files = partition_files();
    let Vector::Hex(seg) = &files["segment_log"] else {
        unreachable!()
    };
    let a = single_record();
    let b = two_records();
    // The segment is the two batches back to back; append changed only bytes 0..16 (base
    // offset and leader epoch), so the producer's CRC is still the right one.
    assert_eq!(seg.len(), a.len() + b.len());
    assert_eq!(&seg[16..a.len()], &a[16..]);
    assert_eq!(&seg[a.len() + 16..], &b[16..]);
    let h0 = BatchHeader::parse(seg).unwrap();
    let h1 = BatchHeader::parse(&seg[a.len()..]).unwrap();
    assert_eq!((h0.base_offset, h0.partition_leader_epoch), (0, 7));
    assert_eq!((h1.base_offset, h1.partition_leader_epoch), (1, 7));
    assert_eq!(h0.crc, spool_log_engine::batch::batch_crc(&seg[..a.len()]));
    assert_eq!(h1.crc, spool_log_engine::batch::batch_crc(&seg[a.len()..]));
    // The builder leaves base offset 0 and leader epoch -1 for the partition to fill in.
    let hb = BatchHeader::parse(&b).unwrap();
    assert_eq!((hb.base_offset, hb.partition_leader_epoch), (0, -1));
    assert_eq!(hb.records_count, 2);
    assert_eq!(hb.max_timestamp, T0 + 300);
    // The LZ4 vector is one LZ4 frame with independent blocks and no checksums (the only kind
    // Kafka's Java reader accepts), 64 KiB maximum block size.
    let lz = lz4_batch();
    assert_eq!(&lz[61..65], &[0x04, 0x22, 0x4d, 0x18]);
    assert_eq!((lz[65], lz[66]), (0x60, 0x40));
}
