//! The event envelope: CloudEvents 1.0 in the Kafka protocol binding's **binary mode**.
//!
//! Every event carries the same top-level attributes as record headers and its type-specific
//! payload as the record value:
//!
//! | header | CloudEvents attribute | required |
//! | --- | --- | --- |
//! | `ce_specversion` | `specversion` (always `1.0`) | yes |
//! | `ce_id` | `id` (unique per `source`; the idempotency key of whoever reacts to it) | yes |
//! | `ce_source` | `source` (who emitted it, e.g. `/spool/deals`) | yes |
//! | `ce_type` | `type` (e.g. `spool.deals.transition.v1`) | yes |
//! | `ce_time` | `time` (RFC 3339) | no |
//! | `ce_subject` | `subject` (what it is about, e.g. a product id) | no |
//! | `content-type` | `datacontenttype` (`application/json` here) | no (JSON assumed) |
//!
//! The record key is the partition key (the binding's `partitionkey`): [`Event::key`], or the
//! subject when no key is set.
//!
//! Decoding is strict and bounded: a missing or non-UTF-8 required attribute, another
//! spec version, a content type other than JSON, or a payload that does not deserialize into
//! the expected type is an [`EnvelopeError`] naming what is wrong; inside a handler `?` turns
//! it into a dead letter ([`crate::Failure`]), so a malformed event never stops a processor.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use spool_client::{Header, ProducerRecord};

/// The CloudEvents spec version written and accepted.
pub const SPEC_VERSION: &str = "1.0";
/// The content type of JSON payloads.
pub const JSON: &str = "application/json";
/// Largest attribute value accepted when decoding (bytes).
pub const MAX_ATTRIBUTE_BYTES: usize = 4096;

/// Why a record is not a valid event of the expected type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A required attribute header is absent (or null).
    #[error("not a CloudEvent: header {0} is missing")]
    Missing(&'static str),
    /// An attribute is not UTF-8 or is too long.
    #[error("header {name} is invalid: {why}")]
    BadAttribute {
        /// Header name.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// `ce_specversion` is not `1.0`.
    #[error("unsupported CloudEvents specversion {0:?} (want 1.0)")]
    SpecVersion(String),
    /// The content type is not JSON.
    #[error("unsupported content-type {0:?} (want application/json)")]
    ContentType(String),
    /// The record has no value.
    #[error("event {id} has no payload")]
    NoPayload {
        /// The event's id.
        id: String,
    },
    /// The payload is not the expected type.
    #[error("payload of event {id} (type {ty}) does not decode: {why}")]
    Payload {
        /// The event's id.
        id: String,
        /// The event's type.
        ty: String,
        /// The decoder's message.
        why: String,
    },
    /// Serializing a payload failed.
    #[error("cannot encode payload: {0}")]
    Encode(String),
}

/// An event: the CloudEvents context attributes and a typed payload.
#[derive(Clone, Debug, PartialEq)]
pub struct Event<T> {
    /// Unique id within `source` (deterministic ids make reprocessing emit the same event).
    pub id: String,
    /// Who emitted it (a URI reference, e.g. `/spool/deals`).
    pub source: String,
    /// What happened (e.g. `spool.deals.transition.v1`).
    pub ty: String,
    /// When it happened (ms since the Unix epoch); written as RFC 3339.
    pub time_ms: Option<i64>,
    /// What it is about (e.g. a product id).
    pub subject: Option<String>,
    /// The record key (partition key); the subject when `None`.
    pub key: Option<Bytes>,
    /// The payload.
    pub data: T,
}

impl<T> Event<T> {
    /// An event with the required attributes.
    pub fn new(
        ty: impl Into<String>,
        source: impl Into<String>,
        id: impl Into<String>,
        data: T,
    ) -> Event<T> {
        Event {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            time_ms: None,
            subject: None,
            key: None,
            data,
        }
    }

    /// Sets the subject.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the time (ms since the epoch).
    pub fn time_ms(mut self, ms: i64) -> Self {
        self.time_ms = Some(ms);
        self
    }

    /// Sets the record key (partition key).
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The key the record gets: [`Event::key`], else the subject.
    pub fn record_key(&self) -> Option<Bytes> {
        self.key.clone().or_else(|| {
            self.subject
                .as_ref()
                .map(|s| Bytes::from(s.clone().into_bytes()))
        })
    }
}

impl<T: Serialize> Event<T> {
    /// The record in binary mode: attributes as headers, JSON payload as value, the time (if
    /// any) also as the record timestamp.
    pub fn to_record(&self) -> Result<ProducerRecord, EnvelopeError> {
        Ok(binary_mode(
            json(&self.data)?,
            Attributes {
                id: self.id.clone(),
                source: self.source.clone(),
                ty: self.ty.clone(),
                time_ms: self.time_ms,
                subject: self.subject.clone(),
            },
            self.record_key(),
        ))
    }

    /// [`Event::to_record`] consuming the event: its attributes become headers without a
    /// copy.
    pub fn into_record(self) -> Result<ProducerRecord, EnvelopeError> {
        let key = self.record_key();
        Ok(binary_mode(
            json(&self.data)?,
            Attributes {
                id: self.id,
                source: self.source,
                ty: self.ty,
                time_ms: self.time_ms,
                subject: self.subject,
            },
            key,
        ))
    }
}

/// A payload as JSON.
fn json<T: Serialize>(data: &T) -> Result<Vec<u8>, EnvelopeError> {
    let mut value = Vec::with_capacity(256);
    serde_json::to_writer(&mut value, data).map_err(|e| EnvelopeError::Encode(e.to_string()))?;
    Ok(value)
}

/// The binary-mode record of a payload and its attributes.
fn binary_mode(value: Vec<u8>, a: Attributes, key: Option<Bytes>) -> ProducerRecord {
    record(
        value,
        Bytes::from(a.id),
        Bytes::from(a.source),
        Bytes::from(a.ty),
        a.time_ms.map(|t| (t, Bytes::from(format_time(t)))),
        a.subject.map(Bytes::from),
        key,
    )
}

/// The record of a JSON payload and its encoded attributes (`time`: ms and its RFC 3339 text).
fn record(
    value: Vec<u8>,
    id: Bytes,
    source: Bytes,
    ty: Bytes,
    time: Option<(i64, Bytes)>,
    subject: Option<Bytes>,
    key: Option<Bytes>,
) -> ProducerRecord {
    let mut headers = Vec::with_capacity(7);
    let mut h = |name: &str, value: Bytes| {
        headers.push(Header {
            key: name.to_owned(),
            value: Some(value),
        })
    };
    h(
        "ce_specversion",
        Bytes::from_static(SPEC_VERSION.as_bytes()),
    );
    h("ce_id", id);
    h("ce_source", source);
    h("ce_type", ty);
    let timestamp_ms = time.map(|(ms, text)| {
        h("ce_time", text);
        ms
    });
    if let Some(s) = subject {
        h("ce_subject", s);
    }
    h("content-type", Bytes::from_static(JSON.as_bytes()));
    ProducerRecord {
        key,
        value: Some(Bytes::from(value)),
        headers,
        timestamp_ms,
    }
}

/// The attributes that many events share, as in a fan-out (one cause, many events of one
/// type): type, source and time, encoded once. [`SharedAttributes::record`] makes each event's
/// record from its own id, subject, key and JSON payload; it is the record
/// [`Event::into_record`] makes of the same event (the header values are shared, not copied).
#[derive(Clone, Debug)]
pub struct SharedAttributes {
    source: Bytes,
    ty: Bytes,
    time: Option<(i64, Bytes)>,
}

impl SharedAttributes {
    /// Events of type `ty` from `source` at `time_ms` (written as RFC 3339, as [`Event`]).
    pub fn new(ty: &str, source: &str, time_ms: Option<i64>) -> SharedAttributes {
        SharedAttributes {
            source: Bytes::copy_from_slice(source.as_bytes()),
            ty: Bytes::copy_from_slice(ty.as_bytes()),
            time: time_ms.map(|t| (t, Bytes::from(format_time(t)))),
        }
    }

    /// The record of one event: `json` is its payload, already JSON; the record key is `key`,
    /// else the subject (as [`Event::record_key`]).
    pub fn record(
        &self,
        id: String,
        subject: Option<String>,
        key: Option<Bytes>,
        json: Vec<u8>,
    ) -> ProducerRecord {
        let subject = subject.map(Bytes::from);
        let key = key.or_else(|| subject.clone());
        record(
            json,
            Bytes::from(id),
            self.source.clone(),
            self.ty.clone(),
            self.time.clone(),
            subject,
            key,
        )
    }
}

/// The attributes of an event, read from headers without touching the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    /// `ce_id`.
    pub id: String,
    /// `ce_source`.
    pub source: String,
    /// `ce_type`.
    pub ty: String,
    /// `ce_time` in ms since the epoch, when present and valid.
    pub time_ms: Option<i64>,
    /// `ce_subject`.
    pub subject: Option<String>,
}

fn header<'a>(headers: &'a [Header], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .rev()
        .find(|h| h.key == name)
        .and_then(|h| h.value.as_deref())
}

fn text<'h>(headers: &'h [Header], name: &'static str) -> Result<Option<&'h str>, EnvelopeError> {
    let Some(v) = header(headers, name) else {
        return Ok(None);
    };
    if v.len() > MAX_ATTRIBUTE_BYTES {
        return Err(EnvelopeError::BadAttribute {
            name: name.into(),
            why: format!("{} bytes, at most {MAX_ATTRIBUTE_BYTES}", v.len()),
        });
    }
    std::str::from_utf8(v)
        .map(Some)
        .map_err(|e| EnvelopeError::BadAttribute {
            name: name.into(),
            why: e.to_string(),
        })
}

fn required<'h>(headers: &'h [Header], name: &'static str) -> Result<&'h str, EnvelopeError> {
    match text(headers, name)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(EnvelopeError::Missing(name)),
    }
}

/// The attributes as they are in the headers, checked (nothing copied).
struct Checked<'h> {
    id: &'h str,
    source: &'h str,
    ty: &'h str,
    time_ms: Option<i64>,
    subject: Option<&'h str>,
}

impl<'h> Checked<'h> {
    /// Checks the attributes: spec version, content type, time, the required ones.
    fn new(headers: &'h [Header]) -> Result<Checked<'h>, EnvelopeError> {
        let version = required(headers, "ce_specversion")?;
        if version != SPEC_VERSION {
            return Err(EnvelopeError::SpecVersion(version.to_owned()));
        }
        if let Some(ct) = text(headers, "content-type")? {
            let base = ct.split(';').next().unwrap_or_default().trim();
            if !base.eq_ignore_ascii_case(JSON) && !base.to_ascii_lowercase().ends_with("+json") {
                return Err(EnvelopeError::ContentType(ct.to_owned()));
            }
        }
        let time_ms = match text(headers, "ce_time")? {
            None => None,
            Some(t) => Some(parse_time(t).ok_or_else(|| EnvelopeError::BadAttribute {
                name: "ce_time".into(),
                why: format!("{t:?} is not an RFC 3339 time"),
            })?),
        };
        Ok(Checked {
            id: required(headers, "ce_id")?,
            source: required(headers, "ce_source")?,
            ty: required(headers, "ce_type")?,
            time_ms,
            subject: text(headers, "ce_subject")?,
        })
    }

    /// The JSON payload as a `T`.
    fn payload<T: DeserializeOwned>(&self, value: Option<&Bytes>) -> Result<T, EnvelopeError> {
        let Some(value) = value else {
            return Err(EnvelopeError::NoPayload {
                id: self.id.to_owned(),
            });
        };
        serde_json::from_slice(value).map_err(|e| EnvelopeError::Payload {
            id: self.id.to_owned(),
            ty: self.ty.to_owned(),
            why: e.to_string(),
        })
    }
}

impl Attributes {
    /// Reads and checks the attributes (spec version, required attributes, content type).
    pub fn from_headers(headers: &[Header]) -> Result<Attributes, EnvelopeError> {
        let c = Checked::new(headers)?;
        Ok(Attributes {
            id: c.id.to_owned(),
            source: c.source.to_owned(),
            ty: c.ty.to_owned(),
            time_ms: c.time_ms,
            subject: c.subject.map(str::to_owned),
        })
    }
}

/// Decodes a record (headers, key, value) into a typed event.
pub fn decode<T: DeserializeOwned>(
    headers: &[Header],
    key: Option<&Bytes>,
    value: Option<&Bytes>,
) -> Result<Event<T>, EnvelopeError> {
    let c = Checked::new(headers)?;
    let data = c.payload(value)?;
    Ok(Event {
        id: c.id.to_owned(),
        source: c.source.to_owned(),
        ty: c.ty.to_owned(),
        time_ms: c.time_ms,
        subject: c.subject.map(str::to_owned),
        key: key.cloned(),
        data,
    })
}

/// The payload of a record that must be a valid event, checked exactly as [`decode`] checks
/// it, without copying its attributes (for handlers that need only the data).
pub fn decode_data<T: DeserializeOwned>(
    headers: &[Header],
    value: Option<&Bytes>,
) -> Result<T, EnvelopeError> {
    Checked::new(headers)?.payload(value)
}

/// RFC 3339 (UTC, milliseconds) for `ce_time`.
pub fn format_time(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => format!("{t:.3}"),
        Err(_) => ms.to_string(),
    }
}

/// Parses an RFC 3339 time into ms since the epoch.
pub fn parse_time(s: &str) -> Option<i64> {
    s.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Price {
        sku: String,
        cents: u64,
    }

    #[test]
    fn round_trip_binary_mode() {
        let ev = Event::new(
            "spool.prices.update.v1",
            "/feed",
            "m1-42",
            Price {
                sku: "sku-1".into(),
                cents: 1299,
            },
        )
        .subject("sku-1")
        .time_ms(1_700_000_000_123);
        let r = ev.to_record().unwrap();
        assert_eq!(r.key.as_deref(), Some(&b"sku-1"[..]));
        assert_eq!(r.timestamp_ms, Some(1_700_000_000_123));
        assert_eq!(
            header(&r.headers, "ce_time"),
            Some(&b"2023-11-14T22:13:20.123Z"[..])
        );
        let back: Event<Price> = decode(&r.headers, r.key.as_ref(), r.value.as_ref()).unwrap();
        // Consuming the event gives the same record.
        assert_eq!(ev.clone().into_record().unwrap(), r);
        assert_eq!(back, ev.key("sku-1"));
    }

    #[test]
    fn shared_attributes_make_the_events_record() {
        let ev = Event::new(
            "spool.prices.update.v1",
            "/feed",
            "m1-42",
            Price {
                sku: "sku-1".into(),
                cents: 1299,
            },
        )
        .subject("sku-1")
        .time_ms(1_700_000_000_123);
        let shared =
            SharedAttributes::new("spool.prices.update.v1", "/feed", Some(1_700_000_000_123));
        let json = serde_json::to_vec(&ev.data).unwrap();
        assert_eq!(
            shared.record("m1-42".into(), Some("sku-1".into()), None, json.clone()),
            ev.to_record().unwrap()
        );
        let keyed = ev.clone().key("k").subject("s");
        assert_eq!(
            shared.record(
                "m1-42".into(),
                Some("s".into()),
                Some(Bytes::from("k")),
                json
            ),
            keyed.to_record().unwrap()
        );
        let untimed = Event::new("t", "/s", "i", 1u8);
        assert_eq!(
            SharedAttributes::new("t", "/s", None).record("i".into(), None, None, b"1".to_vec()),
            untimed.to_record().unwrap()
        );
    }

    #[test]
    fn malformed_events_are_named() {
        let ok = Event::new(
            "t",
            "/s",
            "id-1",
            Price {
                sku: "a".into(),
                cents: 1,
            },
        )
        .to_record()
        .unwrap();
        let without = |name: &str| {
            let mut h = ok.headers.clone();
            h.retain(|x| x.key != name);
            h
        };
        for name in ["ce_specversion", "ce_id", "ce_source", "ce_type"] {
            let e = decode::<Price>(&without(name), None, ok.value.as_ref()).unwrap_err();
            assert_eq!(
                e,
                EnvelopeError::Missing(match name {
                    "ce_specversion" => "ce_specversion",
                    "ce_id" => "ce_id",
                    "ce_source" => "ce_source",
                    _ => "ce_type",
                })
            );
        }
        let mut h = ok.headers.clone();
        h.push(Header {
            key: "ce_specversion".into(),
            value: Some(Bytes::from_static(b"0.3")),
        });
        assert!(matches!(
            decode::<Price>(&h, None, ok.value.as_ref()),
            Err(EnvelopeError::SpecVersion(_))
        ));
        let mut h = ok.headers.clone();
        h.push(Header {
            key: "content-type".into(),
            value: Some(Bytes::from_static(b"text/plain")),
        });
        assert!(matches!(
            decode::<Price>(&h, None, ok.value.as_ref()),
            Err(EnvelopeError::ContentType(_))
        ));
        let e = decode::<Price>(&ok.headers, None, Some(&Bytes::from_static(b"{\"sku\":1}")))
            .unwrap_err();
        assert!(e.to_string().contains("id-1"), "{e}");
        let e = decode::<Price>(&ok.headers, None, None).unwrap_err();
        assert!(matches!(e, EnvelopeError::NoPayload { .. }));
        let mut h = ok.headers.clone();
        h.push(Header {
            key: "ce_id".into(),
            value: Some(Bytes::from(vec![0xff, 0xfe])),
        });
        assert!(matches!(
            decode::<Price>(&h, None, ok.value.as_ref()),
            Err(EnvelopeError::BadAttribute { .. })
        ));
        let mut h = ok.headers.clone();
        h.push(Header {
            key: "ce_time".into(),
            value: Some(Bytes::from_static(b"yesterday")),
        });
        assert!(matches!(
            decode::<Price>(&h, None, ok.value.as_ref()),
            Err(EnvelopeError::BadAttribute { .. })
        ));
        // The payload alone is checked exactly as the whole event.
        let bad_json = Bytes::from_static(b"{\"sku\":1}");
        let cases = [
            (ok.headers.clone(), ok.value.clone()),
            (without("ce_id"), ok.value.clone()),
            (without("ce_specversion"), ok.value.clone()),
            (h, ok.value.clone()),
            (ok.headers.clone(), Some(bad_json)),
            (ok.headers.clone(), None),
        ];
        for (h, v) in &cases {
            let whole = decode::<Price>(h, None, v.as_ref()).map(|e| e.data);
            assert_eq!(decode_data::<Price>(h, v.as_ref()), whole);
        }
    }
}
