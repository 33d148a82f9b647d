//! The codec of the server stubs: tonic-prost's, with two differences on the request side.
//!
//! 1. **Counted before decoding.** prost allocates one struct for every element of a repeated
//!    field, and an element can be 2 bytes on the wire (`0a 00`, an empty message) but 50–100
//!    bytes decoded: a 64 MiB request of empty elements would decode to GiBs before a handler
//!    could compare a `len()` with its limit. So [`RequestDecoder`] first walks the message's
//!    wire format (tags and lengths only: no allocation, one pass) and counts the elements of
//!    every repeated field the request type lists in [`Counted::FIELDS`] (recursively:
//!    records inside a produce request's record lists, headers inside records, offsets inside
//!    a CommitTxn's groups). Over the installed [`RequestLimits`], the request is refused with
//!    `INVALID_ARGUMENT` (ErrorInfo reason `ERROR_CODE_INVALID_REQUEST`, as the broker's
//!    handlers refuse requests) and never decoded; decoded, it holds at most that many
//!    elements.
//! 2. **A request that does not decode is the caller's error**: `INVALID_ARGUMENT`, where
//!    tonic-prost reports `INTERNAL` for both directions. Client stubs keep tonic-prost's
//!    codec: a reply that does not decode is not the caller's fault.
//!
//! Why the limits are process-wide ([`install_request_limits`]): tonic-build's generated
//! servers create their codec with `Default::default()` for every call, so a codec cannot be
//! handed a broker's configuration. The alternatives were a fixed ratio (at most one element
//! per N wire bytes), which bounds memory only relative to the message size and cannot say
//! which configured limit was exceeded, or a layer that parses gRPC framing before tonic,
//! which would duplicate tonic's buffering. A broker installs its limits once when it starts
//! serving; in a process that serves several brokers (tests), the loosest installed limit of
//! each kind applies here and each broker's handlers still check its own exact limits after
//! decoding. Until limits are installed, nothing is counted.
//!
//! Invariants:
//! - Every repeated field of every request type served is listed in its [`Counted::FIELDS`]
//!   (with the non-repeated message fields that lead to one); the tests in this module check
//!   the field numbers against prost's own encoding.
//! - The scan accepts everything prost accepts that could allocate: it walks unknown fields
//!   (groups included) the way prost skips them, and a message field sent several times
//!   (which prost merges) is counted every time. Bytes it cannot walk are refused as not a
//!   protobuf message, as prost would refuse them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};
use tonic_types::{ErrorDetails, StatusExt};

use crate::v1;

/// Limits on the number of elements of a request's repeated fields, checked on the wire
/// before the request is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Partition-like entries in one request, per repeated field: a produce request's
    /// partitions; a fetch's, subscription's or FetchOffsets' partitions; ListOffsets
    /// queries; committed offsets (of a CommitTxn: all its groups' together, and its groups);
    /// topics of a DeleteGroup or a JoinGroup.
    pub max_partitions: usize,
    /// Records in one produce request, all its record lists together, each record's headers
    /// counted as records.
    pub max_records: usize,
}

/// `usize::MAX` (no limit) while no limits are installed. Read on every request, without a
/// lock.
static MAX_PARTITIONS: AtomicUsize = AtomicUsize::new(usize::MAX);
static MAX_RECORDS: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Serialises installs; true once limits were installed.
static INSTALLED: Mutex<bool> = Mutex::new(false);

/// Installs the count limits every request served by this process is checked against before
/// it is decoded. The first call sets them; a later call can only loosen them (each limit
/// becomes the larger of the two), so that every broker in the process still gets the
/// requests its own limits allow (its handlers check those exactly).
pub fn install_request_limits(limits: RequestLimits) {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        MAX_PARTITIONS.fetch_max(limits.max_partitions, Ordering::Relaxed);
        MAX_RECORDS.fetch_max(limits.max_records, Ordering::Relaxed);
    } else {
        MAX_PARTITIONS.store(limits.max_partitions, Ordering::Relaxed);
        MAX_RECORDS.store(limits.max_records, Ordering::Relaxed);
        *installed = true;
    }
}

/// The limits requests are counted against ([`install_request_limits`]); `None` while there
/// are none (nothing installed, or only unlimited ones).
pub fn request_limits() -> Option<RequestLimits> {
    let limits = RequestLimits {
        max_partitions: MAX_PARTITIONS.load(Ordering::Relaxed),
        max_records: MAX_RECORDS.load(Ordering::Relaxed),
    };
    (limits.max_partitions != usize::MAX || limits.max_records != usize::MAX).then_some(limits)
}

/// Which limit a counted field is held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// [`RequestLimits::max_partitions`].
    Partitions,
    /// [`RequestLimits::max_records`].
    Records,
}

/// Counters of one request; a [`Count`] names one.
const SLOTS: usize = 2;

/// How the elements of a repeated field are counted.
#[derive(Clone, Copy, Debug)]
pub struct Count {
    /// The counter (fields sharing one are counted together); below `SLOTS`.
    slot: usize,
    /// The limit the counter is held to.
    limit: Limit,
    /// What the elements are, for the error message ("partitions", "records and headers").
    what: &'static str,
}

/// A field of a request message the scan looks at.
#[derive(Debug)]
pub struct Field {
    /// Field number.
    number: u32,
    /// For a repeated field: how its elements are counted. `None` for a message field the
    /// scan only descends into.
    count: Option<Count>,
    /// The fields of the field's message type to look at (empty: none).
    inner: &'static [Field],
}

const fn counted(number: u32, slot: usize, limit: Limit, what: &'static str) -> Field {
    Field {
        number,
        count: Some(Count { slot, limit, what }),
        inner: &[],
    }
}

/// A request message type served by the stubs, with the fields its count limits apply to.
pub trait Counted {
    /// The repeated fields whose elements are counted, and the message fields leading to
    /// repeated fields deeper down. Empty for a request without repeated fields.
    const FIELDS: &'static [Field];
}

/// `Record.headers`: counted as records.
const RECORD: &[Field] = &[counted(4, 1, Limit::Records, "records and headers")];
/// `RecordList.records`.
const RECORD_LIST: &[Field] = &[Field {
    inner: RECORD,
    ..counted(1, 1, Limit::Records, "records and headers")
}];
/// `PartitionProduce.records` (a RecordList).
const PARTITION_PRODUCE: &[Field] = &[Field {
    number: 4,
    count: None,
    inner: RECORD_LIST,
}];

/// A produce request's partitions (field `number`), with their record lists.
const fn produce(number: u32) -> [Field; 1] {
    [Field {
        inner: PARTITION_PRODUCE,
        ..counted(number, 0, Limit::Partitions, "partitions")
    }]
}

macro_rules! counted_fields {
    ($($request:ident => $fields:expr;)*) => {
        $(impl Counted for v1::$request {
            const FIELDS: &'static [Field] = $fields;
        })*
    };
}

counted_fields! {
    // Requests without repeated fields.
    CreateTopicRequest => &[];
    DeleteTopicRequest => &[];
    ListTopicsRequest => &[];
    DescribeTopicRequest => &[];
    AlterTopicConfigRequest => &[];
    AddPartitionsRequest => &[];
    InitProducerIdRequest => &[];
    ListGroupsRequest => &[];
    LeaveGroupRequest => &[];
    DescribeGroupRequest => &[];
    EndTxnRequest => &[];
    ListTransactionsRequest => &[];
    // Produce.
    ProduceRequest => &produce(1);
    ProduceStreamRequest => &produce(2);
    // Consume.
    FetchRequest => &[counted(1, 0, Limit::Partitions, "partitions")];
    SubscribeRequest => &[counted(1, 0, Limit::Partitions, "partitions")];
    ListOffsetsRequest => &[counted(1, 0, Limit::Partitions, "queries")];
    // Offsets.
    CommitOffsetsRequest => &[counted(2, 0, Limit::Partitions, "offsets")];
    FetchOffsetsRequest => &[counted(2, 0, Limit::Partitions, "partitions")];
    DeleteGroupRequest => &[counted(2, 0, Limit::Partitions, "topics")];
    // Groups: JoinGroup.topics, inside MembershipRequest.join.
    MembershipRequest => &[Field {
        number: 1,
        count: None,
        inner: &[counted(2, 0, Limit::Partitions, "topics")],
    }];
    // Transactions.
    AddOffsetsToTxnRequest => &[counted(5, 0, Limit::Partitions, "offsets")];
    CommitTxnRequest => &[Field {
        inner: &[counted(2, 1, Limit::Partitions, "offsets")],
        ..counted(4, 0, Limit::Partitions, "groups")
    }];
}

/// Why a request's wire format was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanError {
    /// The bytes are not a protobuf message.
    Malformed(&'static str),
    /// A repeated field has more elements than its limit.
    TooMany {
        /// The elements counted.
        count: usize,
        /// What they are.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
}

impl From<ScanError> for Status {
    fn from(e: ScanError) -> Status {
        match e {
            ScanError::Malformed(why) => Status::invalid_argument(format!(
                "the request is not a valid protobuf message: {why}"
            )),
            // With the ErrorInfo the broker's statuses carry (`broker/src/error.rs`), so a
            // client keyed on the reason sees the refusal a handler would have given.
            ScanError::TooMany { count, what, limit } => Status::with_error_details(
                tonic::Code::InvalidArgument,
                format!("{count} {what} in one request, the limit is {limit}"),
                ErrorDetails::with_error_info(
                    v1::ErrorCode::InvalidRequest.as_str_name(),
                    "spool.v1",
                    HashMap::new(),
                ),
            ),
        }
    }
}

/// prost's nesting limit (messages and groups).
const MAX_DEPTH: u32 = 100;

/// Counts the elements of `T`'s counted fields in the encoded message `wire` and checks them
/// against `limits`, without decoding or allocating.
pub fn check_counts<T: Counted>(wire: &[u8], limits: &RequestLimits) -> Result<(), ScanError> {
    let mut counts = [(0usize, None::<Count>); SLOTS];
    scan(wire, T::FIELDS, &mut counts, 0)?;
    for (count, field) in counts {
        if let Some(f) = field {
            let limit = match f.limit {
                Limit::Partitions => limits.max_partitions,
                Limit::Records => limits.max_records,
            };
            if count > limit {
                return Err(ScanError::TooMany {
                    count,
                    what: f.what,
                    limit,
                });
            }
        }
    }
    Ok(())
}

fn varint(wire: &mut &[u8]) -> Result<u64, ScanError> {
    let mut value = 0u64;
    for i in 0..10 {
        let Some((&b, rest)) = wire.split_first() else {
            return Err(ScanError::Malformed("truncated varint"));
        };
        *wire = rest;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            // prost refuses a tenth byte above 1.
            if i == 9 && b > 1 {
                break;
            }
            return Ok(value);
        }
    }
    Err(ScanError::Malformed("invalid varint"))
}

fn skip(wire: &mut &[u8], n: u64) -> Result<(), ScanError> {
    match usize::try_from(n) {
        Ok(n) if n <= wire.len() => {
            *wire = &wire[n..];
            Ok(())
        }
        _ => Err(ScanError::Malformed(
            "a field runs past the end of the message",
        )),
    }
}

/// Reads one key: (field number, wire type).
fn key(wire: &mut &[u8]) -> Result<(u32, u8), ScanError> {
    let key = varint(wire)?;
    let number = u32::try_from(key >> 3)
        .ok()
        .filter(|&n| n >= 1 && key <= u64::from(u32::MAX))
        .ok_or(ScanError::Malformed("invalid tag"))?;
    Ok((number, (key & 7) as u8))
}

/// Walks the fields of one message, counting `fields`' elements into `counts` (a counter
/// remembers the first field counted into it, for its limit and name).
fn scan(
    mut wire: &[u8],
    fields: &[Field],
    counts: &mut [(usize, Option<Count>); SLOTS],
    depth: u32,
) -> Result<(), ScanError> {
    if depth >= MAX_DEPTH {
        return Err(ScanError::Malformed("nested too deeply"));
    }
    while !wire.is_empty() {
        let (number, wire_type) = key(&mut wire)?;
        if wire_type == 2 {
            let len = usize::try_from(varint(&mut wire)?)
                .ok()
                .filter(|&len| len <= wire.len())
                .ok_or(ScanError::Malformed(
                    "a field runs past the end of the message",
                ))?;
            let (body, rest) = wire.split_at(len);
            wire = rest;
            if let Some(f) = fields.iter().find(|f| f.number == number) {
                if let Some(c) = f.count {
                    let slot = &mut counts[c.slot];
                    slot.0 += 1;
                    slot.1.get_or_insert(c);
                }
                if !f.inner.is_empty() {
                    scan(body, f.inner, counts, depth + 1)?;
                }
            }
        } else {
            skip_value(&mut wire, number, wire_type, depth)?;
        }
    }
    Ok(())
}

/// Skips a value that is not length-delimited (groups as prost skips them: to their end tag).
fn skip_value(wire: &mut &[u8], number: u32, wire_type: u8, depth: u32) -> Result<(), ScanError> {
    match wire_type {
        0 => varint(wire).map(drop),
        1 => skip(wire, 8),
        5 => skip(wire, 4),
        3 => {
            if depth + 1 >= MAX_DEPTH {
                return Err(ScanError::Malformed("nested too deeply"));
            }
            loop {
                let (inner, inner_type) = key(wire)?;
                match inner_type {
                    4 if inner == number => return Ok(()),
                    4 => return Err(ScanError::Malformed("unexpected end group")),
                    2 => {
                        let len = varint(wire)?;
                        skip(wire, len)?;
                    }
                    t => skip_value(wire, inner, t, depth + 1)?,
                }
            }
        }
        4 => Err(ScanError::Malformed("unexpected end group")),
        _ => Err(ScanError::Malformed("invalid wire type")),
    }
}

/// [`ProstCodec`] with requests counted before decoding and decode errors mapped to
/// `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        RequestCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Counted + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(self.0.decoder())
    }
}

/// The decoder of [`RequestCodec`].
#[derive(Debug, Clone)]
pub struct RequestDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default + Counted> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if let Some(limits) = request_limits() {
            // tonic hands over the whole message, buffered in one `BytesMut`.
            if buf.chunk().len() == buf.remaining() {
                check_counts::<U>(buf.chunk(), &limits)?;
            } else {
                let wire = buf.copy_to_bytes(buf.remaining());
                check_counts::<U>(&wire, &limits)?;
                return U::decode(wire).map(Some).map_err(|e| {
                    Status::invalid_argument(format!(
                        "the request is not a valid protobuf message: {e}"
                    ))
                });
            }
        }
        self.0.decode(buf).map_err(|e| {
            Status::invalid_argument(format!(
                "the request is not a valid protobuf message: {}",
                e.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_partitions: 10,
        max_records: 100,
    };

    fn check<T: Counted + Message>(m: &T) -> Result<(), ScanError> {
        check_counts::<T>(&m.encode_to_vec(), &LIMITS)
    }

    fn too_many(count: usize, what: &'static str, limit: usize) -> Result<(), ScanError> {
        Err(ScanError::TooMany { count, what, limit })
    }

    fn records(n: usize, headers: usize) -> v1::PartitionProduce {
        let record = v1::Record {
            value: Some(prost::bytes::Bytes::from_static(b"v")),
            headers: vec![v1::RecordHeader::default(); headers],
            ..Default::default()
        };
        v1::PartitionProduce {
            topic: "t".into(),
            data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                records: vec![record; n],
                compression: 0,
            })),
            ..Default::default()
        }
    }

    fn batch() -> v1::PartitionProduce {
        v1::PartitionProduce {
            topic: "t".into(),
            data: Some(v1::partition_produce::Data::RecordBatch(
                prost::bytes::Bytes::from_static(&[0x0a; 100]),
            )),
            ..Default::default()
        }
    }

    /// Every counted field, at its limit and one past it, encoded by prost: the field numbers
    /// of the tables are the schema's.
    #[test]
    fn counts_every_repeated_field_of_the_schema() {
        for n in [10, 11] {
            let over = |what| {
                if n > 10 {
                    too_many(n, what, 10)
                } else {
                    Ok(())
                }
            };
            let p = v1::ProduceRequest {
                partitions: vec![batch(); n],
                acks: 3,
            };
            assert_eq!(check(&p), over("partitions"));
            let s = v1::ProduceStreamRequest {
                request_id: 7,
                partitions: vec![batch(); n],
                acks: 3,
            };
            assert_eq!(check(&s), over("partitions"));
            let f = v1::FetchRequest {
                partitions: vec![v1::PartitionFetch::default(); n],
                max_wait_ms: 5,
                ..Default::default()
            };
            assert_eq!(check(&f), over("partitions"));
            let s = v1::SubscribeRequest {
                partitions: vec![v1::SubscribePartition::default(); n],
                ..Default::default()
            };
            assert_eq!(check(&s), over("partitions"));
            let l = v1::ListOffsetsRequest {
                queries: vec![v1::OffsetQuery::default(); n],
                isolation_level: 2,
            };
            assert_eq!(check(&l), over("queries"));
            let c = v1::CommitOffsetsRequest {
                group: "g".into(),
                offsets: vec![v1::OffsetCommit::default(); n],
                ..Default::default()
            };
            assert_eq!(check(&c), over("offsets"));
            let f = v1::FetchOffsetsRequest {
                group: "g".into(),
                partitions: vec![v1::TopicPartition::default(); n],
            };
            assert_eq!(check(&f), over("partitions"));
            let d = v1::DeleteGroupRequest {
                group: "g".into(),
                topics: vec![String::new(); n],
            };
            assert_eq!(check(&d), over("topics"));
            let j = v1::MembershipRequest {
                request: Some(v1::membership_request::Request::Join(v1::JoinGroup {
                    group: "g".into(),
                    topics: vec!["t".into(); n],
                    ..Default::default()
                })),
            };
            assert_eq!(check(&j), over("topics"));
            let a = v1::AddOffsetsToTxnRequest {
                group: "g".into(),
                offsets: vec![v1::OffsetCommit::default(); n],
                ..Default::default()
            };
            assert_eq!(check(&a), over("offsets"));
            let groups = v1::CommitTxnRequest {
                groups: vec![v1::TxnGroupOffsets::default(); n],
                ..Default::default()
            };
            assert_eq!(check(&groups), over("groups"));
            // Offsets of all groups together.
            let offsets = v1::CommitTxnRequest {
                groups: vec![
                    v1::TxnGroupOffsets {
                        offsets: vec![v1::OffsetCommit::default(); n - 5],
                        ..Default::default()
                    },
                    v1::TxnGroupOffsets {
                        offsets: vec![v1::OffsetCommit::default(); 5],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            };
            assert_eq!(check(&offsets), over("offsets"));
        }
    }

    /// Records of all record lists count together, with their headers.
    #[test]
    fn records_and_headers_count_across_the_request() {
        let p = |parts: Vec<v1::PartitionProduce>| v1::ProduceRequest {
            partitions: parts,
            acks: 2,
        };
        assert_eq!(check(&p(vec![records(50, 0), records(50, 0)])), Ok(()));
        assert_eq!(
            check(&p(vec![records(50, 0), batch(), records(51, 0)])),
            too_many(101, "records and headers", 100)
        );
        // 20 records with 4 headers each: 100.
        assert_eq!(check(&p(vec![records(20, 4)])), Ok(()));
        assert_eq!(
            check(&p(vec![records(20, 4), records(1, 0)])),
            too_many(101, "records and headers", 100)
        );
        // prost merges a RecordList sent twice in one PartitionProduce: both count. The
        // partition is its topic "t" (0a 01 74), then field 4 (its list), here twice.
        let mut part = records(60, 0).encode_to_vec();
        let list = part[3..].to_vec();
        part.extend_from_slice(&list);
        let mut wire = vec![0x0a];
        prost::encoding::encode_varint(part.len() as u64, &mut wire);
        wire.extend_from_slice(&part);
        let decoded = v1::ProduceRequest::decode(&wire[..]).unwrap();
        let Some(v1::partition_produce::Data::Records(l)) = &decoded.partitions[0].data else {
            panic!("no records");
        };
        assert_eq!(l.records.len(), 120, "prost merged the two lists");
        assert_eq!(
            check_counts::<v1::ProduceRequest>(&wire, &LIMITS),
            too_many(120, "records and headers", 100)
        );
    }

    /// The hostile requests of the audit: 2-byte empty elements, far over the limit, and
    /// elements hidden behind unknown fields of every wire type (groups included).
    #[test]
    fn empty_elements_and_unknown_fields() {
        let wire = b"\x0a\x00".repeat(1000);
        assert_eq!(
            check_counts::<v1::ProduceRequest>(&wire, &LIMITS),
            too_many(1000, "partitions", 10)
        );
        assert_eq!(
            v1::ProduceRequest::decode(&wire[..])
                .unwrap()
                .partitions
                .len(),
            1000
        );
        // Unknown fields: varint 9, fixed64 10, fixed32 11, a group 12 holding a nested group
        // 13 and a length-delimited field, then 11 partitions.
        let mut wire = vec![
            0x48, 0x96, 0x01, 0x51, 0, 0, 0, 0, 0, 0, 0, 0, 0x5d, 0, 0, 0, 0,
        ];
        wire.extend_from_slice(&[0x63, 0x6b, 0x08, 0x01, 0x6c, 0x0a, 0x01, 0x7f, 0x64]);
        wire.extend_from_slice(&b"\x0a\x00".repeat(11));
        assert_eq!(
            v1::ProduceRequest::decode(&wire[..])
                .unwrap()
                .partitions
                .len(),
            11
        );
        assert_eq!(
            check_counts::<v1::ProduceRequest>(&wire, &LIMITS),
            too_many(11, "partitions", 10)
        );
    }

    /// What prost refuses, the scan refuses (or leaves to prost, which refuses it).
    #[test]
    fn malformed_wire_is_refused() {
        for wire in [
            &b"\x0f\xff\xff\xff"[..],                        // wire type 7
            b"\x0a\x7f\x01",                                 // length past the end
            b"\x0a",                                         // truncated length
            b"\x00\x01",                                     // field number 0
            b"\x63\x08\x01",                                 // unterminated group
            b"\x64",                                         // end group without a start
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", // varint over 64 bits
        ] {
            assert!(
                matches!(
                    check_counts::<v1::ProduceRequest>(wire, &LIMITS),
                    Err(ScanError::Malformed(_))
                ),
                "{wire:?}"
            );
            assert!(v1::ProduceRequest::decode(wire).is_err(), "{wire:?}");
        }
        // Nesting beyond prost's limit.
        let deep = b"\x63".repeat(200);
        assert!(check_counts::<v1::ProduceRequest>(&deep, &LIMITS).is_err());
    }

    /// The only test that installs limits (they are process-wide): the first install sets
    /// them, later ones only loosen them.
    #[test]
    fn installs_keep_the_loosest_limits() {
        assert_eq!(request_limits(), None);
        install_request_limits(LIMITS);
        assert_eq!(request_limits(), Some(LIMITS));
        install_request_limits(RequestLimits {
            max_partitions: 5,
            max_records: 200,
        });
        assert_eq!(
            request_limits(),
            Some(RequestLimits {
                max_partitions: 10,
                max_records: 200,
            })
        );
    }
}
