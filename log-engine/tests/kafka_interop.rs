//! Interoperability with an independent implementation of Kafka's RecordBatch v2: kafka-python
//! (`DefaultRecordBatch`, `DefaultRecordBatchBuilder`, `MemoryRecords`) with its LZ4 (`lz4`)
//! and Zstandard (`zstandard`) codecs, driven through `tests/kafka_interop.py`.
//!
//! - Spool → Kafka: the engine writes a partition (uncompressed, LZ4 and Zstandard batches, keys,
//!   null keys, tombstones, headers, changing leader epochs, several segments); kafka-python
//!   decodes every batch of the segment files, checking CRCs its own way, and the records must be
//!   the ones written.
//! - Kafka → Spool: kafka-python builds batches (none, gzip, LZ4, Zstandard, idempotent producer
//!   fields); `Partition::append` accepts them (it checks CRC and structure), stores them byte
//!   for byte apart from the offset and leader epoch, and reads back the same records; then
//!   kafka-python decodes the stored segment.
//!
//! Missing Python or kafka-python is a test failure, never a skip (see `PIP`).
// Tests reach files directly on purpose (damage them, read what the engine wrote).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use spool_log_engine::{
    BatchBuilder, BatchError, BatchHeader, Compression, Log, LogOptions, Partition, TopicConfig,
};

/// What to install when the Python side is missing (the versions `.ci/run` pins).
const PIP: &str = "pip install kafka-python==3.0.12 lz4==4.4.5 zstandard==0.25.0";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("kafka_interop.py")
}

/// Runs the script with `args` and parses its JSON output.
fn python(args: &[OsString]) -> Value {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 ({e}). The Kafka interop test needs Python 3 with kafka-python \
                 and its codecs: {PIP}"
            )
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kafka_interop.py failed ({}):\n{stderr}\nIf a Python module is missing: {PIP}",
        out.status
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kafka_interop.py printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    eprintln!("kafka_interop.py used {}", v["versions"]);
    v
}

/// One record, as both sides describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rec {
    offset: u64,
    timestamp: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

/// One batch the test expects to find.
#[derive(Clone, Debug)]
struct Expected {
    base_offset: u64,
    leader_epoch: i32,
    compression: &'static str,
    producer: (i64, i16, i32),
    /// Bytes of the records region before compression.
    records_len: usize,
    records: Vec<Rec>,
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn opt_bytes(v: &Value) -> Option<Vec<u8>> {
    v.as_str().map(unhex)
}

/// A record from the script's JSON; `offset` is absolute, or `base + offset_delta`.
fn rec_from_json(v: &Value, base: u64) -> Rec {
    let offset = match v.get("offset") {
        Some(o) => o.as_u64().unwrap(),
        None => base + v["offset_delta"].as_u64().unwrap(),
    };
    Rec {
        offset,
        timestamp: v["timestamp"].as_i64().unwrap(),
        key: opt_bytes(&v["key"]),
        value: opt_bytes(&v["value"]),
        headers: v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h[0].as_str().unwrap().to_owned(), opt_bytes(&h[1])))
            .collect(),
    }
}

fn rec_from_spool(r: spool_log_engine::Record) -> Rec {
    Rec {
        offset: r.offset,
        timestamp: r.timestamp,
        key: r.key.map(|b| b.to_vec()),
        value: r.value.map(|b| b.to_vec()),
        headers: r
            .headers
            .into_iter()
            .map(|h| (h.key, h.value.map(|b| b.to_vec())))
            .collect(),
    }
}

fn codec_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Gzip => "gzip",
        Compression::Snappy => "snappy",
        Compression::Lz4 => "lz4",
        Compression::Zstd => "zstd",
        _ => "other",
    }
}

fn opts() -> LogOptions {
    LogOptions {
        background_maintenance: false,
        ..LogOptions::default()
    }
}

/// Segment files of a partition, oldest first.
fn segment_files(p: &Partition) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(p.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// Every batch of the partition as (header, bytes), read through the engine.
fn stored_batches(p: &Partition) -> Vec<(BatchHeader, bytes::Bytes)> {
    let mut out = Vec::new();
    let mut offset = p.log_start_offset();
    while offset < p.high_watermark() {
        let r = p.read(offset, 1 << 20).unwrap();
        for b in r.batches() {
            let b = b.unwrap();
            out.push((*b.header(), b.bytes().clone()));
        }
        offset = r.next_offset;
    }
    out
}

/// Checks the script's decoding of `files` against `expected`, batch by batch in order, and
/// returns the decoded batches.
fn check_kafka_view(files: &[PathBuf], expected: &[Expected]) -> Vec<Value> {
    let args: Vec<OsString> = files.iter().map(|f| f.clone().into_os_string()).collect();
    let out = python(&args);
    let mut decoded = Vec::new();
    for (f, path) in out["files"].as_array().unwrap().iter().zip(files) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            f["size"].as_u64(),
            Some(bytes.len() as u64),
            "{}",
            path.display()
        );
        assert_eq!(
            f["valid_bytes"],
            f["size"],
            "{}: bytes kafka-python could not frame",
            path.display()
        );
        let name_base: u64 = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        let batches = f["batches"].as_array().unwrap();
        if let Some(first) = batches.first() {
            assert_eq!(
                first["base_offset"].as_u64(),
                Some(name_base),
                "{}",
                path.display()
            );
        }
        for b in batches {
            let pos = b["position"].as_u64().unwrap() as usize;
            let h = BatchHeader::parse(&bytes[pos..]).unwrap();
            assert_eq!(b["size"].as_u64(), Some(h.total_len() as u64));
            assert_eq!(
                b["crc"].as_u64(),
                Some(u64::from(h.crc)),
                "CRC field as Kafka reads it"
            );
            decoded.push((path.clone(), b.clone()));
        }
    }
    assert_eq!(
        decoded.len(),
        expected.len(),
        "number of batches kafka-python found"
    );
    for ((path, b), e) in decoded.iter().zip(expected) {
        let at = format!("{} batch at offset {}", path.display(), e.base_offset);
        assert_eq!(b["magic"], 2, "{at}");
        assert_eq!(
            b["crc_valid"], true,
            "{at}: kafka-python's CRC-32C check failed"
        );
        assert_eq!(b["base_offset"].as_u64(), Some(e.base_offset), "{at}");
        assert_eq!(
            b["leader_epoch"].as_i64(),
            Some(i64::from(e.leader_epoch)),
            "{at}"
        );
        assert_eq!(b["compression"], e.compression, "{at}");
        assert_eq!(b["timestamp_type"], 0, "{at}");
        assert_eq!(b["is_transactional"], false, "{at}");
        assert_eq!(b["is_control"], false, "{at}");
        let n = e.records.len() as i64;
        assert_eq!(b["records_count"].as_i64(), Some(n), "{at}");
        assert_eq!(b["last_offset_delta"].as_i64(), Some(n - 1), "{at}");
        assert_eq!(
            b["first_timestamp"].as_i64(),
            Some(e.records[0].timestamp),
            "{at}"
        );
        let max_ts = e.records.iter().map(|r| r.timestamp).max().unwrap();
        assert_eq!(b["max_timestamp"].as_i64(), Some(max_ts), "{at}");
        assert_eq!(b["producer_id"].as_i64(), Some(e.producer.0), "{at}");
        assert_eq!(
            b["producer_epoch"].as_i64(),
            Some(i64::from(e.producer.1)),
            "{at}"
        );
        assert_eq!(
            b["base_sequence"].as_i64(),
            Some(i64::from(e.producer.2)),
            "{at}"
        );
        let recs: Vec<Rec> = b["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| rec_from_json(r, 0))
            .collect();
        assert_eq!(
            recs, e.records,
            "{at}: records as kafka-python decodes them"
        );
    }
    decoded.into_iter().map(|(_, b)| b).collect()
}

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

type RecSpec = (
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(String, Option<Vec<u8>>)>,
);

/// One batch to write: codec, idempotent-producer fields, records.
type BatchSpec = (Compression, Option<(i64, i16, i32)>, Vec<RecSpec>);

const T: i64 = 1_700_000_000_000;

/// The batches of the Spool → Kafka direction: (compression, producer fields, records).
fn spool_batches() -> Vec<BatchSpec> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let text = |i: usize| format!("value {i} ").repeat(10).into_bytes();
    let mut out = Vec::new();
    // Keys, a null key, a tombstone, an empty key and value, headers with a null value, a
    // non-ASCII header name, timestamps going backwards inside a batch.
    out.push((
        Compression::None,
        None,
        vec![
            (
                T,
                Some(b"key-0".to_vec()),
                Some(b"value-0".to_vec()),
                vec![("h".into(), Some(b"v".to_vec()))],
            ),
            (T - 7, None, Some(b"no key".to_vec()), vec![]),
            (
                T + 3,
                Some(b"tomb".to_vec()),
                None,
                vec![("gone".into(), None)],
            ),
            (
                T + 4,
                Some(vec![]),
                Some(vec![]),
                vec![
                    ("\u{e9}t\u{e9}".into(), Some(vec![0, 255])),
                    ("e".into(), Some(vec![])),
                ],
            ),
        ],
    ));
    for round in 0..6usize {
        for (c, n) in [
            (Compression::None, 5),
            (Compression::Lz4, 20),
            (Compression::Zstd, 20),
        ] {
            let recs = (0..n)
                .map(|i| {
                    let key = (i % 4 != 0).then(|| format!("k{}", i % 5).into_bytes());
                    let headers = if i % 3 == 0 {
                        vec![
                            ("round".to_string(), Some(round.to_string().into_bytes())),
                            ("n".to_string(), None),
                        ]
                    } else {
                        vec![]
                    };
                    (
                        T + (round * 1000 + i * 3) as i64,
                        key,
                        Some(text(i)),
                        headers,
                    )
                })
                .collect();
            let producer = (round == 2 && c == Compression::None).then_some((777, 1, 10));
            out.push((c, producer, recs));
        }
    }
    // LZ4 frames with 256 KiB and 4 MiB maximum blocks, the larger one incompressible (its
    // blocks are stored uncompressed inside the frame); a large Zstandard batch.
    let medium = text(3).repeat(1500);
    out.push((
        Compression::Lz4,
        None,
        vec![(T + 9000, Some(b"m".to_vec()), Some(medium.clone()), vec![])],
    ));
    let noise = rng.bytes(300 << 10);
    out.push((
        Compression::Lz4,
        None,
        vec![(T + 9001, Some(b"r".to_vec()), Some(noise.clone()), vec![])],
    ));
    out.push((
        Compression::Zstd,
        None,
        vec![
            (T + 9002, Some(b"z".to_vec()), Some(noise), vec![]),
            (T + 9003, None, Some(medium), vec![]),
        ],
    ));
    out
}

#[test]
fn spool_segments_decode_with_kafka_python() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let cfg = TopicConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        ..TopicConfig::default()
    };
    log.create_topic("interop", cfg).unwrap();
    let p = log.partition("interop", 0).unwrap();
    let mut expected = Vec::new();
    for (i, (c, producer, recs)) in spool_batches().into_iter().enumerate() {
        // The partition stamps its leader epoch at append; change it along the way.
        let epoch = [0, 3, 9][i % 3];
        p.set_leader_epoch(epoch);
        let mut b = BatchBuilder::new(c);
        if let Some((id, ep, seq)) = producer {
            b.producer(id, ep, seq);
        }
        for (ts, k, v, hs) in &recs {
            let hs: Vec<(&str, Option<&[u8]>)> =
                hs.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
            b.push(*ts, k.as_deref(), v.as_deref(), &hs);
        }
        let records_len = b.size_bytes() - 61;
        let at = p.append(&b.finish().unwrap()).unwrap();
        expected.push(Expected {
            base_offset: at.base_offset,
            leader_epoch: epoch,
            compression: codec_name(c),
            producer: producer.unwrap_or((-1, -1, -1)),
            records_len,
            records: recs
                .into_iter()
                .enumerate()
                .map(|(j, (timestamp, key, value, headers))| Rec {
                    offset: at.base_offset + j as u64,
                    timestamp,
                    key,
                    value,
                    headers,
                })
                .collect(),
        });
    }
    let files = segment_files(&p);
    assert!(
        files.len() >= 5,
        "expected several segments, got {}",
        files.len()
    );

    // The engine reads back what it wrote.
    let stored = stored_batches(&p);
    assert_eq!(stored.len(), expected.len());
    for ((h, bytes), e) in stored.iter().zip(&expected) {
        let b = spool_log_engine::Batch::new(bytes.clone(), &Default::default()).unwrap();
        let recs: Vec<Rec> = b
            .records(&Default::default())
            .unwrap()
            .map(|r| rec_from_spool(r.unwrap()))
            .collect();
        assert_eq!(recs, e.records);
        // What the document says about Spool's frames, checked on the real bytes here and by
        // kafka-python's decoders below.
        let payload = &bytes[61..];
        match e.compression {
            "lz4" => {
                let bd = match e.records_len {
                    n if n <= 64 << 10 => 0x40,
                    n if n <= 256 << 10 => 0x50,
                    _ => 0x70,
                };
                assert_eq!(
                    &payload[..6],
                    &[0x04, 0x22, 0x4d, 0x18, 0x60, bd],
                    "LZ4 frame header"
                );
                let first_block = u32::from_le_bytes(payload[7..11].try_into().unwrap());
                let incompressible = e.records_len > 256 << 10;
                assert_eq!(
                    first_block & 0x8000_0000 != 0,
                    incompressible,
                    "LZ4 stored-block bit"
                );
            }
            "zstd" => assert_eq!(
                &payload[..4],
                &[0x28, 0xb5, 0x2f, 0xfd],
                "Zstandard frame magic"
            ),
            _ => {}
        }
        assert_eq!(h.base_offset, e.base_offset);
    }
    let decoded = check_kafka_view(&files, &expected);

    // Frame details, as kafka-python's codecs (python-lz4, python-zstandard) read them.
    for (b, e) in decoded.iter().zip(&expected) {
        let frame = &b["frame"];
        if e.compression == "zstd" {
            assert_eq!(
                frame["content_size"].as_u64(),
                Some(e.records_len as u64),
                "zstd content size"
            );
            assert_eq!(frame["has_checksum"], false);
            assert_eq!(frame["dict_id"], 0);
        }
        if e.compression == "lz4" {
            assert_eq!(frame["flg"], 0x60);
        }
    }
    drop(p);
    log.close().unwrap();
}

#[test]
fn kafka_python_batches_append_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let built = dir.path().join("kafka-python.batches");
    let spec = python(&[OsString::from("--build"), built.clone().into_os_string()]);
    let data = std::fs::read(&built).unwrap();

    // Split the file into batches with the engine's header parser.
    let mut batches = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let h = BatchHeader::parse(&data[pos..]).unwrap();
        batches.push(&data[pos..pos + h.total_len()]);
        pos += h.total_len();
    }
    let specs = spec["batches"].as_array().unwrap();
    assert_eq!(batches.len(), specs.len());

    let log = Log::open(dir.path().join("data"), opts()).unwrap();
    log.create_topic("from-kafka", TopicConfig::default())
        .unwrap();
    let p = log.partition("from-kafka", 0).unwrap();
    p.set_leader_epoch(4);
    let mut expected = Vec::new();
    for (bytes, s) in batches.iter().zip(specs) {
        assert_eq!(s["size"].as_u64(), Some(bytes.len() as u64));
        // kafka-python leaves base offset 0 and leader epoch 0 for the broker to set.
        let h = BatchHeader::parse(bytes).unwrap();
        assert_eq!((h.base_offset, h.partition_leader_epoch), (0, 0));
        assert_eq!(s["crc"].as_u64(), Some(u64::from(h.crc)));
        let at = p
            .append(bytes)
            .unwrap_or_else(|e| panic!("append of a kafka-python {} batch: {e}", s["compression"]));
        let compression = match s["compression"].as_str().unwrap() {
            "none" => "none",
            "gzip" => "gzip",
            "lz4" => "lz4",
            "zstd" => "zstd",
            other => panic!("unexpected codec {other}"),
        };
        let records: Vec<Rec> = s["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| rec_from_json(r, at.base_offset))
            .collect();
        assert_eq!(at.last_offset, at.base_offset + records.len() as u64 - 1);
        expected.push(Expected {
            base_offset: at.base_offset,
            leader_epoch: 4,
            compression,
            producer: (
                s["producer_id"].as_i64().unwrap(),
                s["producer_epoch"].as_i64().unwrap() as i16,
                s["base_sequence"].as_i64().unwrap() as i32,
            ),
            records_len: 0,
            records,
        });
    }

    // Stored byte for byte, apart from the 16 bytes the partition assigns.
    let stored = stored_batches(&p);
    assert_eq!(stored.len(), batches.len());
    for (((h, bytes), original), e) in stored.iter().zip(&batches).zip(&expected) {
        assert_eq!(
            &bytes[16..],
            &original[16..],
            "stored bytes after the assigned prefix"
        );
        assert_eq!(h.base_offset, e.base_offset);
        assert_eq!(h.partition_leader_epoch, 4);
        let b = spool_log_engine::Batch::new(bytes.clone(), &Default::default()).unwrap();
        let got = b.records(&Default::default());
        if e.compression == "gzip" {
            // Stored as it is, but Spool does not decode gzip.
            assert!(
                matches!(got, Err(BatchError::Unsupported(_))),
                "gzip decode: {got:?}"
            );
            continue;
        }
        let recs: Vec<Rec> = got.unwrap().map(|r| rec_from_spool(r.unwrap())).collect();
        assert_eq!(
            recs, e.records,
            "records Spool decodes from a kafka-python {} batch",
            e.compression
        );
    }

    // And Kafka's reader sees the stored segment with the offsets and epoch Spool assigned.
    check_kafka_view(&segment_files(&p), &expected);
    drop(p);
    log.close().unwrap();
}
