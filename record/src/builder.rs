//! Encodes records into one RecordBatch v2.
//!
//! Uncompressed records are written straight after a reserved header in a single buffer (each
//! record's length is computed arithmetically first, so nothing is encoded twice); compressed
//! batches compress that region once in [`BatchBuilder::finish`]. The CRC-32C is computed once,
//! over the final bytes.

use bytes::Bytes;

use super::varint::{len_i32, len_i64, put_i32, put_i64};
use super::{BatchError, CRC_START, Compression, HEADER_LEN, LOG_OVERHEAD, MAGIC};

/// Builds one batch. Offsets are left at zero: the partition assigns them at append.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    compression: Compression,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
    /// Attribute bits besides compression (transactional, control).
    flags: i16,
}

impl BatchBuilder {
    /// A builder for a batch compressed with `compression`.
    pub fn new(compression: Compression) -> BatchBuilder {
        Self::with_capacity(compression, 4096)
    }

    /// A builder whose buffer starts with room for `bytes` of records.
    pub fn with_capacity(compression: Compression, bytes: usize) -> BatchBuilder {
        let mut buf = Vec::with_capacity(HEADER_LEN + bytes);
        buf.resize(HEADER_LEN, 0);
        BatchBuilder {
            buf,
            count: 0,
            base_timestamp: -1,
            max_timestamp: -1,
            compression,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            flags: 0,
        }
    }

    /// Marks the batch as part of a transaction (or not).
    pub fn transactional(&mut self, yes: bool) -> &mut Self {
        if yes {
            self.flags |= super::ATTR_TRANSACTIONAL;
        } else {
            self.flags &= !super::ATTR_TRANSACTIONAL;
        }
        self
    }

    /// Marks the batch as a control batch (a transaction marker; implies transactional).
    pub fn control(&mut self) -> &mut Self {
        self.flags |= super::ATTR_TRANSACTIONAL | super::ATTR_CONTROL;
        self
    }

    /// Sets the idempotent-producer fields of the header.
    pub fn producer(
        &mut self,
        producer_id: i64,
        producer_epoch: i16,
        base_sequence: i32,
    ) -> &mut Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Number of records pushed so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True before the first push.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the batch so far (before compression), header included.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Appends one record. `headers` are `(name, value)` pairs; a `None` value is Kafka's null.
    pub fn push(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, Option<&[u8]>)],
    ) {
        if self.count == 0 {
            self.base_timestamp = timestamp;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp);
        let ts_delta = timestamp.wrapping_sub(self.base_timestamp);
        let offset_delta = self.count;
        let field = |b: Option<&[u8]>| match b {
            None => len_i32(-1),
            Some(b) => len_i32(b.len() as i32) + b.len(),
        };
        let mut body = 1 + len_i64(ts_delta) + len_i32(offset_delta) + field(key) + field(value);
        body += len_i32(headers.len() as i32);
        for (k, v) in headers {
            body += field(Some(k.as_bytes())) + field(*v);
        }
        self.buf.reserve(body + 5);
        put_i32(&mut self.buf, body as i32);
        self.buf.push(0);
        put_i64(&mut self.buf, ts_delta);
        put_i32(&mut self.buf, offset_delta);
        let put = |buf: &mut Vec<u8>, b: Option<&[u8]>| match b {
            None => put_i32(buf, -1),
            Some(b) => {
                put_i32(buf, b.len() as i32);
                buf.extend_from_slice(b);
            }
        };
        put(&mut self.buf, key);
        put(&mut self.buf, value);
        put_i32(&mut self.buf, headers.len() as i32);
        for (k, v) in headers {
            put(&mut self.buf, Some(k.as_bytes()));
            put(&mut self.buf, *v);
        }
        self.count += 1;
    }

    /// Encodes the header, compresses if asked, computes the CRC and returns the batch.
    pub fn finish(self) -> Result<Bytes, BatchError> {
        if self.count == 0 {
            return Err(BatchError::BadRecordCount(
                "a batch needs at least one record".into(),
            ));
        }
        let mut out = if self.compression == Compression::None {
            self.buf
        } else {
            let mut out = Vec::with_capacity(HEADER_LEN + self.buf.len() / 2);
            out.resize(HEADER_LEN, 0);
            self.compression
                .compress(&self.buf[HEADER_LEN..], &mut out)?;
            out
        };
        let batch_length = i32::try_from(out.len() - LOG_OVERHEAD)
            .map_err(|_| BatchError::Unsupported("batch larger than 2 GiB"))?;
        let h = &mut out[..HEADER_LEN];
        h[0..8].copy_from_slice(&0i64.to_be_bytes());
        h[8..12].copy_from_slice(&batch_length.to_be_bytes());
        h[12..16].copy_from_slice(&(-1i32).to_be_bytes());
        h[16] = MAGIC as u8;
        h[21..23].copy_from_slice(&(self.compression.attribute() | self.flags).to_be_bytes());
        h[23..27].copy_from_slice(&(self.count - 1).to_be_bytes());
        h[27..35].copy_from_slice(&self.base_timestamp.to_be_bytes());
        h[35..43].copy_from_slice(&self.max_timestamp.to_be_bytes());
        h[43..51].copy_from_slice(&self.producer_id.to_be_bytes());
        h[51..53].copy_from_slice(&self.producer_epoch.to_be_bytes());
        h[53..57].copy_from_slice(&self.base_sequence.to_be_bytes());
        h[57..61].copy_from_slice(&self.count.to_be_bytes());
        let crc = crc32c::crc32c(&out[CRC_START..]);
        out[17..21].copy_from_slice(&crc.to_be_bytes());
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Batch, Header, validate_batch};
    use super::*;
    use crate::DecodeLimits;
    use proptest::prelude::*;

    #[test]
    fn restamp_changes_only_the_producer_fields() {
        let mut b = BatchBuilder::new(Compression::None);
        b.producer(1, 0, 0);
        b.push(5, Some(b"k"), Some(b"v"), &[]);
        let before = b.finish().unwrap();
        let mut after = before.to_vec();
        super::super::restamp_producer(&mut after, 99, 3, 42).unwrap();
        let h = validate_batch(&after, u32::MAX, &DecodeLimits::default()).unwrap();
        assert_eq!(
            (h.producer_id, h.producer_epoch, h.base_sequence),
            (99, 3, 42)
        );
        let differs: Vec<usize> = (0..after.len())
            .filter(|&i| after[i] != before[i])
            .collect();
        assert!(
            differs
                .iter()
                .all(|&i| (17..21).contains(&i) || (43..57).contains(&i)),
            "{differs:?}"
        );
        // Not exactly one batch: refused, untouched.
        let mut two = [before.to_vec(), before.to_vec()].concat();
        assert!(super::super::restamp_producer(&mut two, 7, 0, 0).is_err());
        assert!(super::super::restamp_producer(&mut after[..20], 7, 0, 0).is_err());
    }

    type Bytesish = Option<Vec<u8>>;
    type TestRecord = (i64, Bytesish, Bytesish, Vec<(String, Bytesish)>);

    fn build(c: Compression, recs: &[TestRecord]) -> Bytes {
        let mut b = BatchBuilder::new(c);
        for (ts, k, v, hs) in recs {
            let hs: Vec<(&str, Option<&[u8]>)> =
                hs.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
            b.push(*ts, k.as_deref(), v.as_deref(), &hs);
        }
        b.finish().unwrap()
    }

    /// Golden vector: one record, key "k", value "v", timestamp 1000, no headers. The bytes are
    /// the ones documented in docs/format.md; Kafka's DefaultRecordBatch produces the same (checked
    /// against an independent bitwise CRC-32C in Python).
    #[test]
    fn golden_single_record() {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(1000, Some(b"k"), Some(b"v"), &[]);
        let bytes = b.finish().unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "0000000000000000", // base offset 0
                "0000003a",         // batch length 58 = 70 - 12
                "ffffffff",         // partition leader epoch -1
                "02",               // magic
                "716a6189",         // CRC-32C of bytes 21..70
                "0000",             // attributes
                "00000000",         // last offset delta
                "00000000000003e8", // base timestamp 1000
                "00000000000003e8", // max timestamp 1000
                "ffffffffffffffff", // producer id -1
                "ffff",             // producer epoch -1
                "ffffffff",         // base sequence -1
                "00000001",         // records count
                "10",               // record length 8 (zig-zag)
                "00",               // attributes
                "00",               // timestamp delta 0
                "00",               // offset delta 0
                "02",
                "6b", // key length 1, "k"
                "02",
                "76", // value length 1, "v"
                "00"  // header count 0
            )
        );
        validate_batch(&bytes, 1 << 20, &DecodeLimits::default()).unwrap();
    }

    #[test]
    fn count_records_reads_headers_only() {
        let mut all = Vec::new();
        for n in [1, 3, 5] {
            let mut b = BatchBuilder::new(Compression::Zstd);
            for i in 0..n {
                b.push(i, None, Some(b"v"), &[]);
            }
            all.extend_from_slice(&b.finish().unwrap());
        }
        assert_eq!(super::super::count_records(&all), 9);
        assert_eq!(
            super::super::count_records(&all[..all.len() - 1]),
            4,
            "a cut batch is not counted"
        );
        assert_eq!(super::super::count_records(&[]), 0);
    }

    proptest! {
        #[test]
        fn roundtrip(
            comp in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)],
            recs in proptest::collection::vec((
                -1i64..=i64::MAX / 4,
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
                proptest::collection::vec(("[a-z]{0,8}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20))), 0..3),
            ), 1..20)
        ) {
            let bytes = build(comp, &recs);
            let limits = DecodeLimits::default();
            let batch = Batch::new(bytes, &limits).unwrap();
            prop_assert_eq!(batch.header().records_count as usize, recs.len());
            let decoded: Vec<_> = batch.records(&limits).unwrap().collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(decoded.len(), recs.len());
            for (i, (r, (ts, k, v, hs))) in decoded.iter().zip(recs.iter()).enumerate() {
                prop_assert_eq!(r.offset, i as u64);
                prop_assert_eq!(r.timestamp, *ts);
                prop_assert_eq!(r.key.as_deref(), k.as_deref());
                prop_assert_eq!(r.value.as_deref(), v.as_deref());
                let want: Vec<Header> = hs.iter().map(|(k, v)| Header { key: k.clone(), value: v.clone().map(Bytes::from) }).collect();
                prop_assert_eq!(&r.headers, &want);
            }
        }
    }
}
