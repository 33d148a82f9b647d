//! Decoder robustness: random bytes and adversarial batches against the batch validator, the
//! record decoder, the batch splitter and `Partition::append`.
//!
//! The properties: nothing panics or allocates from an unchecked length (errors, not
//! crashes); a batch `validate_batch` accepts (uncompressed) decodes into exactly its
//! declared records; and an append that fails writes nothing (the high watermark, the
//! partition's size and the segment file's length are unchanged, and the next good append
//! gets the next offset).
//!
//! Headers and records are mutated *and then given a correct CRC and length*, so the
//! mutations reach the structural checks instead of stopping at the CRC. All runs are seeded
//! (`SPOOL_DECODE_SEED`); no regression files are written.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use spool_log_engine::batch::{self, DecodeLimits, HEADER_LEN, split_batches, validate_batch};
use spool_log_engine::{
    BatchBuilder, BatchHeader, Compression, Error, FsyncPolicy, Limits, Partition, TopicConfig,
};

use crate::common::{open_topic, scratch};

fn config(cases: u32) -> Config {
    let seed = std::env::var("SPOOL_DECODE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xdec0_de00_u64);
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Limits small enough that limit checks are reachable with small inputs.
fn tight_limits() -> DecodeLimits {
    DecodeLimits {
        max_records_per_batch: 64,
        max_record_bytes: 512,
        max_key_bytes: 32,
        max_headers_per_record: 4,
        max_decompressed_bytes: 4096,
    }
}

// ---- encoding helpers (independent of the engine's) ----

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint(out: &mut Vec<u8>, v: i64) {
    put_uvarint(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Sets `batch_length` from the buffer's size and recomputes the CRC, when long enough.
fn seal(b: &mut [u8]) {
    if b.len() >= 12 {
        let len = (b.len() - 12) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
    }
    fix_crc(b);
}

fn fix_crc(b: &mut [u8]) {
    if b.len() >= HEADER_LEN {
        let crc = batch::batch_crc(b);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
    }
}

/// A 61-byte header for `count` records of `last_delta`, uncompressed unless `attributes`.
fn header(count: i32, last_delta: i32, attributes: i16) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    h[12..16].copy_from_slice(&(-1i32).to_be_bytes());
    h[16] = 2;
    h[21..23].copy_from_slice(&attributes.to_be_bytes());
    h[23..27].copy_from_slice(&last_delta.to_be_bytes());
    h[27..35].copy_from_slice(&1_000i64.to_be_bytes());
    h[35..43].copy_from_slice(&1_000i64.to_be_bytes());
    h[43..51].copy_from_slice(&(-1i64).to_be_bytes());
    h[51..53].copy_from_slice(&(-1i16).to_be_bytes());
    h[53..57].copy_from_slice(&(-1i32).to_be_bytes());
    h[57..61].copy_from_slice(&count.to_be_bytes());
    h
}

// ---- strategies ----

fn edgy_i32() -> impl Strategy<Value = i32> {
    prop_oneof![
        any::<i32>(),
        Just(i32::MAX),
        Just(i32::MIN),
        Just(-2),
        Just(-1),
        Just(0),
        Just(1),
        -4..64i32,
        Just(1 << 20),
        Just((1 << 20) + 1),
        Just(i32::MAX - 11),
    ]
}

fn edgy_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        Just(i64::MAX),
        Just(i64::MIN),
        -4..64i64,
        Just(i64::from(i32::MAX) + 1),
        Just(i64::from(u32::MAX)),
    ]
}

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        4 => Just(Compression::None),
        1 => Just(Compression::Lz4),
        1 => Just(Compression::Zstd)
    ]
}

type RawRecord = (
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(String, Option<Vec<u8>>)>,
);

/// A well-formed batch (offsets zero, as a producer sends it).
fn valid_batch() -> impl Strategy<Value = Vec<u8>> {
    let record = (
        proptest::option::of(vec(any::<u8>(), 0..24)),
        proptest::option::of(vec(any::<u8>(), 0..80)),
        vec(
            ("[a-z]{0,6}", proptest::option::of(vec(any::<u8>(), 0..8))),
            0..3,
        ),
    );
    (compression(), vec(record, 1..6), any::<i64>()).prop_map(
        |(c, records, ts): (Compression, Vec<RawRecord>, i64)| {
            let mut b = BatchBuilder::new(c);
            for (i, (k, v, hs)) in records.iter().enumerate() {
                let hs: Vec<(&str, Option<&[u8]>)> =
                    hs.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
                b.push(ts.wrapping_add(i as i64), k.as_deref(), v.as_deref(), &hs);
            }
            b.finish().unwrap().to_vec()
        },
    )
}

/// A change to one header field.
#[derive(Clone, Debug)]
enum Field {
    BatchLength(i32),
    Magic(u8),
    Attributes(i16),
    LastOffsetDelta(i32),
    RecordsCount(i32),
    Timestamps(i64, i64),
    Byte(usize, u8),
}

fn field() -> impl Strategy<Value = Field> {
    prop_oneof![
        edgy_i32().prop_map(Field::BatchLength),
        any::<u8>().prop_map(Field::Magic),
        prop_oneof![
            any::<i16>(),
            (0i16..8),
            Just(0x10i16),
            Just(0x20i16),
            Just(0x80i16)
        ]
        .prop_map(Field::Attributes),
        edgy_i32().prop_map(Field::LastOffsetDelta),
        edgy_i32().prop_map(Field::RecordsCount),
        (edgy_i64(), edgy_i64()).prop_map(|(a, b)| Field::Timestamps(a, b)),
        (0usize..4096, any::<u8>()).prop_map(|(at, v)| Field::Byte(at, v)),
    ]
}

fn apply(b: &mut Vec<u8>, f: &Field) {
    let put = |b: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        if b.len() >= at + bytes.len() {
            b[at..at + bytes.len()].copy_from_slice(bytes);
        }
    };
    match *f {
        Field::BatchLength(v) => put(b, 8, &v.to_be_bytes()),
        Field::Magic(v) => put(b, 16, &[v]),
        Field::Attributes(v) => put(b, 21, &v.to_be_bytes()),
        Field::LastOffsetDelta(v) => put(b, 23, &v.to_be_bytes()),
        Field::RecordsCount(v) => put(b, 57, &v.to_be_bytes()),
        Field::Timestamps(a, m) => {
            put(b, 27, &a.to_be_bytes());
            put(b, 35, &m.to_be_bytes());
        }
        Field::Byte(at, v) => {
            if !b.is_empty() {
                let at = at % b.len();
                b[at] = v;
            }
        }
    }
}

/// A valid batch with header fields changed, then (usually) re-sealed so that the change is
/// seen by the structural checks rather than the CRC; sometimes truncated or extended.
fn mutated_batch() -> impl Strategy<Value = Vec<u8>> {
    (
        valid_batch(),
        vec(field(), 1..4),
        0u8..4,
        0usize..200,
        vec(any::<u8>(), 0..40),
    )
        .prop_map(|(mut b, fields, mode, cut, extra)| {
            for f in &fields {
                apply(&mut b, f);
            }
            match mode {
                0 => fix_crc(&mut b), // keep the (possibly wrong) length field, fix the CRC
                1 => {
                    b.truncate(b.len().saturating_sub(cut % b.len().max(1)));
                    fix_crc(&mut b);
                }
                2 => {
                    b.extend_from_slice(&extra);
                    fix_crc(&mut b);
                }
                _ => {} // leave the CRC stale
            }
            b
        })
}

/// One piece of a hand-made record.
#[derive(Clone, Debug)]
enum Token {
    Varint(i64),
    /// A varint of `n` continuation bytes (longer than any valid one when `n >= 5`).
    Overlong(usize),
    Raw(Vec<u8>),
}

fn token() -> impl Strategy<Value = Token> {
    prop_oneof![
        4 => edgy_i64().prop_map(Token::Varint),
        1 => (1usize..12).prop_map(Token::Overlong),
        2 => vec(any::<u8>(), 0..16).prop_map(Token::Raw),
    ]
}

fn put_token(out: &mut Vec<u8>, t: &Token) {
    match t {
        Token::Varint(v) => put_varint(out, *v),
        Token::Overlong(n) => {
            out.extend(std::iter::repeat_n(0xff, *n));
            out.push(0x01);
        }
        Token::Raw(b) => out.extend_from_slice(b),
    }
}

/// A length-prefixed field: the length to encode (`None`: the true one) and the bytes.
type LenBytes = (Option<i64>, Vec<u8>);

/// One record: either a token soup, or a well-ordered record whose length fields may lie.
#[derive(Clone, Debug)]
enum RecordSpec {
    Soup {
        length: Option<i64>,
        body: Vec<Token>,
    },
    Shaped {
        length: Option<i64>,
        /// `None`: the record's index, as it must be.
        offset_delta: Option<i64>,
        ts_delta: i64,
        key: LenBytes,
        value: LenBytes,
        header_count: Option<i64>,
        headers: Vec<(LenBytes, LenBytes)>,
    },
}

fn lying_len() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![12 => Just(None), 1 => edgy_i64().prop_map(Some), 1 => Just(Some(-1))]
}

fn field_bytes() -> impl Strategy<Value = LenBytes> {
    (lying_len(), vec(any::<u8>(), 0..20))
}

/// Header keys: mostly UTF-8 (as they must be), sometimes not.
fn key_bytes() -> impl Strategy<Value = LenBytes> {
    let text = "[a-z\\x{e9}\\x{1F600}]{0,6}".prop_map(String::into_bytes);
    (
        lying_len(),
        prop_oneof![6 => text, 1 => vec(any::<u8>(), 0..8)],
    )
}

fn record_spec() -> impl Strategy<Value = RecordSpec> {
    prop_oneof![
        1 => (lying_len(), vec(token(), 0..8)).prop_map(|(length, body)| RecordSpec::Soup { length, body }),
        6 => (
            lying_len(),
            prop_oneof![8 => Just(None), 1 => (0i64..8).prop_map(Some), 1 => edgy_i64().prop_map(Some)],
            edgy_i64(),
            field_bytes(),
            field_bytes(),
            prop_oneof![4 => Just(None), 1 => edgy_i64().prop_map(Some)],
            vec((key_bytes(), field_bytes()), 0..3),
        )
            .prop_map(|(length, offset_delta, ts_delta, key, value, header_count, headers)| {
                RecordSpec::Shaped { length, offset_delta, ts_delta, key, value, header_count, headers }
            }),
    ]
}

fn put_field(out: &mut Vec<u8>, (len, bytes): &LenBytes) {
    put_varint(out, len.unwrap_or(bytes.len() as i64));
    if *len != Some(-1) {
        out.extend_from_slice(bytes);
    }
}

fn encode_record(out: &mut Vec<u8>, index: usize, r: &RecordSpec) {
    let mut body = Vec::new();
    let length = match r {
        RecordSpec::Soup {
            length,
            body: tokens,
        } => {
            tokens.iter().for_each(|t| put_token(&mut body, t));
            *length
        }
        RecordSpec::Shaped {
            length,
            offset_delta,
            ts_delta,
            key,
            value,
            header_count,
            headers,
        } => {
            body.push(0);
            put_varint(&mut body, *ts_delta);
            put_varint(&mut body, offset_delta.unwrap_or(index as i64));
            put_field(&mut body, key);
            put_field(&mut body, value);
            put_varint(&mut body, header_count.unwrap_or(headers.len() as i64));
            for (k, v) in headers {
                put_field(&mut body, k);
                put_field(&mut body, v);
            }
            *length
        }
    };
    put_varint(out, length.unwrap_or(body.len() as i64));
    out.extend_from_slice(&body);
}

/// A batch of hand-made records (uncompressed, LZ4 or zstd) with a correct CRC and length; the
/// record count and last offset delta are the true ones or adversarial.
fn crafted_batch() -> impl Strategy<Value = Vec<u8>> {
    (
        vec(record_spec(), 0..6),
        prop_oneof![3 => Just(None), 1 => edgy_i32().prop_map(Some)],
        prop_oneof![3 => Just(None), 1 => edgy_i32().prop_map(Some)],
        compression(),
    )
        .prop_map(|(records, count, last_delta, codec)| {
            let n = records.len() as i32;
            let count = count.unwrap_or(n);
            let bits = match codec {
                Compression::Lz4 => 3,
                Compression::Zstd => 4,
                _ => 0,
            };
            let mut b = header(count, last_delta.unwrap_or(count.wrapping_sub(1)), bits);
            // Compressed, the same records reach the streaming check of append.
            let mut recs = Vec::new();
            for (i, r) in records.iter().enumerate() {
                encode_record(&mut recs, i, r);
            }
            codec.compress(&recs, &mut b).unwrap();
            seal(&mut b);
            b
        })
}

/// A compressed (or stored-only) batch whose payload is garbage, or a small decompression bomb.
fn compressed_garbage() -> impl Strategy<Value = Vec<u8>> {
    (1i16..5, vec(any::<u8>(), 0..300), 1i32..5, any::<bool>()).prop_map(
        |(codec, junk, count, bomb)| {
            let mut b = header(count, count - 1, codec);
            if bomb && codec == 4 {
                b.extend_from_slice(&zstd_bomb());
            } else {
                b.extend_from_slice(&junk);
            }
            seal(&mut b);
            b
        },
    )
}

/// 1 MiB of zeros, zstd-compressed (a few dozen bytes): far over `tight_limits`.
fn zstd_bomb() -> Vec<u8> {
    static BOMB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BOMB.get_or_init(|| {
        let mut b = BatchBuilder::with_capacity(Compression::Zstd, 1 << 20);
        b.push(0, None, Some(&vec![0u8; 1 << 20]), &[]);
        b.finish().unwrap()[HEADER_LEN..].to_vec()
    })
    .clone()
}

fn any_input() -> impl Strategy<Value = Vec<u8>> {
    labelled_input().prop_map(|(_, b)| b)
}

/// Inputs labelled with the generator that made them, so that the tests can report (and
/// require) that each one reaches both verdicts.
fn labelled_input() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    prop_oneof![
        1 => vec(any::<u8>(), 0..400).prop_map(|b| ("random bytes", b)),
        1 => valid_batch().prop_map(|b| ("valid", b)),
        3 => mutated_batch().prop_map(|b| ("mutated header", b)),
        3 => crafted_batch().prop_map(|b| ("crafted records", b)),
        1 => compressed_garbage().prop_map(|b| ("compressed garbage", b)),
    ]
}

// ---- the checks ----

/// Runs every decoder over `input` (as one batch, and as a buffer of batches) under `limits`;
/// returns what `validate_batch` said.
fn decode_everything(
    input: &[u8],
    limits: &DecodeLimits,
) -> Result<BatchHeader, batch::BatchError> {
    let _ = BatchHeader::parse(input);
    let verdict = validate_batch(input, spool_log_engine::config::MAX_BATCH_BYTES, limits);
    let bytes = Bytes::copy_from_slice(input);
    if let Ok(b) = spool_log_engine::Batch::new(bytes.clone(), limits) {
        assert!(
            verdict.is_ok(),
            "Batch::new accepted what validate_batch refused"
        );
        if let Ok(records) = b.records(limits) {
            records.for_each(drop);
        }
    }
    // Twice in a row, so that the splitter also walks a batch boundary.
    let mut two = input.to_vec();
    two.extend_from_slice(input);
    for buf in [bytes, Bytes::from(two)] {
        for b in split_batches(&buf) {
            let Ok(b) = b else { break };
            assert!(b.bytes().len() >= HEADER_LEN);
            if let Ok(records) = b.records(limits) {
                let mut n = 0u64;
                for r in records {
                    n += 1;
                    assert!(
                        n <= limits.max_records_per_batch as u64,
                        "decoder ran past the record limit"
                    );
                    if r.is_err() {
                        break;
                    }
                }
            }
        }
    }
    verdict
}

/// What `validate_batch` accepts must decode into exactly its records (gzip and snappy, which
/// are stored but not decoded, aside).
fn accepted_means_decodable(input: &[u8], h: &BatchHeader, limits: &DecodeLimits) {
    if matches!(h.compression(), Ok(Compression::Gzip | Compression::Snappy)) {
        return;
    }
    let b = spool_log_engine::Batch::new(Bytes::copy_from_slice(input), limits).unwrap();
    let records: Vec<_> = b
        .records(limits)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            panic!("validate_batch accepted a batch whose records do not decode: {e}")
        });
    assert_eq!(records.len() as i64, i64::from(h.records_count));
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.offset, h.base_offset + i as u64, "offsets must be dense");
    }
}

/// Runs `check` over `cases` inputs; panics with the (shrunk) failing input.
fn run<S: Strategy>(cases: u32, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    if let Err(e) = TestRunner::new(config(cases)).run(&strategy, check) {
        panic!("{e}");
    }
}

#[test]
fn decoders_never_panic() {
    let tally = std::cell::RefCell::new(std::collections::BTreeMap::<&str, (u64, u64)>::new());
    run(3000, labelled_input(), |(kind, input)| {
        let mut accepted = false;
        for limits in [DecodeLimits::default(), tight_limits()] {
            if let Ok(h) = decode_everything(&input, &limits) {
                accepted_means_decodable(&input, &h, &limits);
                accepted = true;
            }
        }
        let mut t = tally.borrow_mut();
        let e = t.entry(kind).or_default();
        if accepted {
            e.0 += 1
        } else {
            e.1 += 1
        }
        Ok(())
    });
    let t = tally.into_inner();
    eprintln!("decoder fuzz (accepted, refused) by generator: {t:?}");
    for kind in ["mutated header", "crafted records"] {
        let (a, r) = t[kind];
        assert!(
            a > 20 && r > 20,
            "{kind}: both verdicts must be reached ({a} accepted, {r} refused)"
        );
    }
}

proptest! {
    #![proptest_config(config(500))]

    /// Many batches back to back, some damaged: the splitter yields the good prefix and then
    /// at most one error, and never reads past the buffer.
    #[test]
    fn split_stops_at_the_first_bad_batch(parts in vec((valid_batch(), any::<bool>(), vec(field(), 1..3)), 1..6)) {
        let mut buf = Vec::new();
        let mut good_prefix = 0;
        let mut broken = false;
        for (b, damage, fields) in &parts {
            let mut b = b.clone();
            if *damage {
                fields.iter().for_each(|f| apply(&mut b, f));
            }
            let ok = validate_batch(&b, spool_log_engine::config::MAX_BATCH_BYTES, &DecodeLimits::default()).is_ok();
            if !ok {
                broken = true;
            } else if !broken {
                good_prefix += 1;
            }
            buf.extend_from_slice(&b);
        }
        let buf = Bytes::from(buf);
        let got: Vec<_> = split_batches(&buf).collect();
        let oks = got.iter().take_while(|r| r.is_ok()).count();
        prop_assert!(oks >= good_prefix, "{oks} batches split, {good_prefix} good ones in front");
        prop_assert!(got.iter().skip(oks).count() <= 1, "nothing after an error");
    }
}

/// Sizes that tell whether an append wrote anything.
fn footprint(p: &Partition) -> (u64, u64, u64) {
    let s = p.stats();
    let file = std::fs::metadata(p.active_segment_path()).unwrap().len();
    (p.high_watermark(), s.size_bytes, file)
}

#[test]
fn append_of_bad_batches_writes_nothing() {
    let dir = scratch();
    let cfg = TopicConfig {
        segment_bytes: 16 << 10,
        max_batch_bytes: 2048,
        fsync: FsyncPolicy::Always,
        ..TopicConfig::default()
    };
    let log = open_topic(dir.path(), cfg.clone());
    let p = log.partition("t", 0).unwrap();
    let limits = Limits::default().decode();
    let (refused, accepted) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    let mut runner = TestRunner::new(config(1500));
    let result = runner.run(&any_input(), |input| {
        let before = footprint(&p);
        let verdict = validate_batch(&input, cfg.max_batch_bytes, &limits)
            .ok()
            // Control batches come only from the coordinator; a transactional batch needs a
            // producer id (these inputs have none).
            .filter(|h| !(h.is_control() || (h.is_transactional() && h.producer_id < 0)));
        match (p.append(&input), verdict) {
            (Ok(info), Some(h)) => {
                prop_assert_eq!(info.base_offset, before.0, "appends take the next offset");
                prop_assert_eq!(
                    info.last_offset - info.base_offset,
                    h.last_offset_delta as u64
                );
                let after = footprint(&p);
                prop_assert_eq!(after.0, info.last_offset + 1);
                prop_assert_eq!(after.1, before.1 + input.len() as u64);
                let r = p.read(info.base_offset, 1).unwrap();
                // Stored as given, except the offset and leader epoch the partition assigns.
                prop_assert_eq!(r.data.len(), input.len());
                prop_assert_eq!(&r.data[8..12], &input[8..12]);
                prop_assert_eq!(&r.data[16..], &input[16..]);
                prop_assert_eq!(&r.data[..8], &(info.base_offset as i64).to_be_bytes()[..]);
                accepted.set(accepted.get() + 1);
            }
            (Err(Error::InvalidBatch(_) | Error::InvalidTxnState { .. }), None) => {
                prop_assert_eq!(
                    footprint(&p),
                    before,
                    "a refused append changed the partition"
                );
                refused.set(refused.get() + 1);
            }
            (got, verdict) => {
                return Err(TestCaseError::fail(format!(
                    "append gave {got:?}, validate_batch gave {verdict:?}"
                )));
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // A batch over max_batch_bytes, a transactional batch without a producer id, and a control
    // batch, are refused too.
    let mut big = BatchBuilder::new(Compression::None);
    big.push(0, None, Some(&[7u8; 4096]), &[]);
    let mut txn = header(1, 0, 0x10);
    encode_record(
        &mut txn,
        0,
        &RecordSpec::Shaped {
            length: None,
            offset_delta: None,
            ts_delta: 0,
            key: (Some(-1), vec![]),
            value: (None, b"v".to_vec()),
            header_count: None,
            headers: vec![],
        },
    );
    seal(&mut txn);
    let mut control = txn.clone();
    control[21..23].copy_from_slice(&0x20i16.to_be_bytes());
    fix_crc(&mut control);
    for (what, b) in [
        ("oversize", big.finish().unwrap().to_vec()),
        ("transactional", txn),
        ("control", control),
    ] {
        let before = footprint(&p);
        assert!(p.append(&b).is_err(), "{what} batch accepted");
        assert_eq!(footprint(&p), before, "{what} batch changed the partition");
    }
    // The partition still works, and nothing it holds is damaged.
    let hwm = p.high_watermark();
    let mut good = BatchBuilder::new(Compression::None);
    good.push(1, None, Some(b"after"), &[]);
    assert_eq!(p.append(&good.finish().unwrap()).unwrap().base_offset, hwm);
    let mut at = 0;
    while at < p.high_watermark() {
        let r = p.read(at, 1 << 20).unwrap();
        assert!(r.batches().all(|b| b.is_ok()));
        at = r.next_offset;
    }
    drop(p);
    drop(log);
    let log = crate::common::open_topic(dir.path(), cfg);
    assert_eq!(log.partition("t", 0).unwrap().high_watermark(), hwm + 1);
    let (accepted, refused) = (accepted.get(), refused.get());
    eprintln!("append fuzz: {accepted} accepted, {refused} refused");
    assert!(
        accepted > 50 && refused > 500,
        "both outcomes must be exercised: {accepted} accepted, {refused} refused"
    );
}

/// Regression: a header key that is not UTF-8 passed `validate_batch` (which does not look at
/// header keys) but failed every decode, so `append` stored a batch no reader could decode.
/// Now (as Kafka) it is accepted and decoded lossily.
#[test]
fn non_utf8_header_key_is_stored_and_decodes() {
    let mut b = header(1, 0, 0);
    let record = RecordSpec::Shaped {
        length: None,
        offset_delta: None,
        ts_delta: 0,
        key: (None, b"k".to_vec()),
        value: (None, b"v".to_vec()),
        header_count: None,
        headers: vec![((None, vec![b'h', 0xff]), (None, b"x".to_vec()))],
    };
    encode_record(&mut b, 0, &record);
    seal(&mut b);
    let dir = scratch();
    let log = open_topic(dir.path(), TopicConfig::default());
    let p = log.partition("t", 0).unwrap();
    let at = p.append(&b).unwrap().base_offset;
    let records = crate::common::read_all(&p, at);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].headers[0].key, "h\u{fffd}");
    assert_eq!(records[0].headers[0].value.as_deref(), Some(&b"x"[..]));
}

/// Regression (issue 12): the records of a compressed batch were not looked at on append, so
/// a ~100-byte zstd batch claiming 2^20 records was stored and moved the high watermark by a
/// million offsets. Now (as Kafka's LogValidator) an LZ4 or zstd batch is decompressed on
/// append, as a stream, and its records must match its header; a gzip or snappy batch (stored,
/// not decoded) may claim no more records than its codec could expand its bytes into.
#[test]
fn compressed_batch_must_hold_the_records_it_claims() {
    let dir = scratch();
    let log = open_topic(dir.path(), TopicConfig::default());
    let p = log.partition("t", 0).unwrap();
    // One true record; the header rewritten to claim `count`, last delta `count - 1`.
    let lying = |c: Compression, records: usize, count: i32| {
        let mut b = BatchBuilder::new(c);
        for i in 0..records {
            b.push(1_000 + i as i64, Some(b"k"), Some(b"v"), &[]);
        }
        let mut bytes = b.finish().unwrap().to_vec();
        bytes[23..27].copy_from_slice(&(count - 1).to_be_bytes());
        bytes[57..61].copy_from_slice(&count.to_be_bytes());
        fix_crc(&mut bytes);
        bytes
    };
    for c in [Compression::Lz4, Compression::Zstd] {
        for (records, count) in [(1, 1 << 20), (1, 2), (3, 2)] {
            let b = lying(c, records, count);
            assert!(b.len() < 160, "{c:?}: {} bytes", b.len());
            let before = footprint(&p);
            match p.append(&b) {
                Err(Error::InvalidBatch(batch::BatchError::BadRecordCount(why))) => {
                    eprintln!("{c:?} {records} records claiming {count}: {why}")
                }
                other => panic!("{c:?} {records} records claiming {count}: {other:?}"),
            }
            assert_eq!(
                footprint(&p),
                before,
                "a refused batch changed the partition"
            );
        }
        // Offset deltas inside the compressed records must be 0, 1, 2, … as uncompressed.
        let mut b = header(2, 1, if c == Compression::Lz4 { 3 } else { 4 });
        let mut recs = Vec::new();
        for delta in [0, 0] {
            encode_record(
                &mut recs,
                delta,
                &RecordSpec::Shaped {
                    length: None,
                    offset_delta: None,
                    ts_delta: 0,
                    key: (None, b"k".to_vec()),
                    value: (None, b"v".to_vec()),
                    header_count: None,
                    headers: vec![],
                },
            );
        }
        c.compress(&recs, &mut b).unwrap();
        seal(&mut b);
        assert!(matches!(
            p.append(&b),
            Err(Error::InvalidBatch(batch::BatchError::BadRecord {
                index: 1,
                ..
            }))
        ));
        // The honest batch goes in, with the offsets it holds.
        let at = p.append(&lying(c, 3, 3)).unwrap();
        assert_eq!(at.last_offset - at.base_offset, 2);
    }
    assert_eq!(p.high_watermark(), 6);
    // gzip (1) and snappy (2) are stored without decoding: 40 bytes cannot expand into 2^20
    // records of at least 7 bytes each under either codec's largest ratio.
    for codec in [1i16, 2] {
        let mut b = header(1 << 20, (1 << 20) - 1, codec);
        b.extend_from_slice(&[0x1f; 40]);
        seal(&mut b);
        assert!(
            matches!(
                p.append(&b),
                Err(Error::InvalidBatch(batch::BatchError::BadRecordCount(_)))
            ),
            "codec {codec}"
        );
    }
    assert_eq!(p.high_watermark(), 6);
}
