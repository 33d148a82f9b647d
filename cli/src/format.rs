//! How consumed records are printed: one value per line (kcat's default), `-f` format strings,
//! JSON lines, or raw values.
//!
//! Format-string tokens (kcat's, with rpk's `%v`/`%d`/`{…}` modifiers):
//!
//! | token | prints |
//! |---|---|
//! | `%s` `%v` | value (`%v{hex}`, `%v{base64}`; nothing for a null value) |
//! | `%S` `%V` | value size in bytes (-1 for null) |
//! | `%k` | key (`%k{hex}`, `%k{base64}`) |
//! | `%K` | key size (-1 for null) |
//! | `%t` `%p` `%o` | topic, partition, offset |
//! | `%T` | timestamp, ms since the epoch |
//! | `%d` | timestamp as RFC 3339 UTC; `%d{%Y-%m-%d %H:%M}` takes a strftime format |
//! | `%h` | headers as `k=v,k=v` |
//! | `%H` | number of headers |
//! | `%%` | a `%` |
//! | `\n` `\r` `\t` `\0` `\\` `\xHH` | escapes |
//!
//! JSON lines carry `topic`, `partition`, `offset`, `timestamp`, `key`, `value` and `headers`
//! (a list of `{key, value}`, since keys may repeat). A key, value or header value that is not
//! UTF-8 is written in base64 (or hex, or always encoded, per `--encoding`) and its encoding is
//! named beside it (`"value_encoding":"base64"`), so `spool produce --json` reads the line
//! back into the same record.

use std::io::{self, Write};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use spool_client::{Header, Record};

use crate::position::fmt_time;

/// How keys and values are written in JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Encoding {
    /// UTF-8 text when valid, base64 otherwise.
    #[default]
    Auto,
    /// Always base64.
    Base64,
    /// Always hex.
    Hex,
    /// Always text (invalid UTF-8 replaced by U+FFFD: lossy).
    Utf8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Value,
    ValueSize,
    Key,
    KeySize,
    Topic,
    Partition,
    Offset,
    Timestamp,
    Headers,
    HeaderCount,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BytesAs {
    Raw,
    Hex,
    Base64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Literal(Vec<u8>),
    Bytes(Field, BytesAs),
    Number(Field),
    Date(Option<String>),
}

/// A compiled `-f` format string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Template {
    pieces: Vec<Piece>,
}

fn push_literal(pieces: &mut Vec<Piece>, b: u8) {
    if let Some(Piece::Literal(v)) = pieces.last_mut() {
        v.push(b);
    } else {
        pieces.push(Piece::Literal(vec![b]));
    }
}

impl Template {
    /// Compiles a format string; errors name the bad token.
    pub(crate) fn compile(fmt: &str) -> Result<Template, String> {
        let b = fmt.as_bytes();
        let mut pieces = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' => {
                    let Some(&c) = b.get(i + 1) else {
                        return Err("format ends with a lone %".into());
                    };
                    i += 2;
                    // Optional {modifier}.
                    let mut modifier = None;
                    if c != b'%' && b.get(i) == Some(&b'{') {
                        let close = fmt[i..]
                            .find('}')
                            .ok_or_else(|| format!("unclosed {{ after %{}", c as char))?;
                        modifier = Some(fmt[i + 1..i + close].to_owned());
                        i += close + 1;
                    }
                    let bytes_as = |m: &Option<String>| match m.as_deref() {
                        None | Some("raw") => Ok(BytesAs::Raw),
                        Some("hex") => Ok(BytesAs::Hex),
                        Some("base64") => Ok(BytesAs::Base64),
                        Some(other) => Err(format!(
                            "unknown modifier {{{other}}} for %{} (hex, base64)",
                            c as char
                        )),
                    };
                    let no_modifier = |m: &Option<String>| match m {
                        None => Ok(()),
                        Some(m) => Err(format!("%{} takes no modifier {{{m}}}", c as char)),
                    };
                    let piece = match c {
                        b's' | b'v' => Piece::Bytes(Field::Value, bytes_as(&modifier)?),
                        b'k' => Piece::Bytes(Field::Key, bytes_as(&modifier)?),
                        b'S' | b'V' => Piece::Number(Field::ValueSize),
                        b'K' => Piece::Number(Field::KeySize),
                        b't' => Piece::Bytes(Field::Topic, BytesAs::Raw),
                        b'p' => Piece::Number(Field::Partition),
                        b'o' => Piece::Number(Field::Offset),
                        b'T' => Piece::Number(Field::Timestamp),
                        b'h' => Piece::Bytes(Field::Headers, BytesAs::Raw),
                        b'H' => Piece::Number(Field::HeaderCount),
                        b'd' => {
                            if let Some(f) = &modifier {
                                // Reject a bad strftime now rather than on every record.
                                jiff::fmt::strtime::format(f, jiff::Timestamp::UNIX_EPOCH)
                                    .map_err(|e| format!("bad %d{{{f}}}: {e}"))?;
                            }
                            Piece::Date(modifier.take())
                        }
                        b'%' => {
                            push_literal(&mut pieces, b'%');
                            continue;
                        }
                        other => {
                            return Err(format!(
                                "unknown format token %{} (see `spool tail --help`)",
                                other as char
                            ));
                        }
                    };
                    if !matches!(
                        piece,
                        Piece::Bytes(Field::Value | Field::Key, _) | Piece::Date(_)
                    ) {
                        no_modifier(&modifier)?;
                    }
                    pieces.push(piece);
                }
                b'\\' => {
                    let Some(&c) = b.get(i + 1) else {
                        return Err("format ends with a lone \\".into());
                    };
                    i += 2;
                    let byte = match c {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'0' => 0,
                        b'\\' => b'\\',
                        b'x' => {
                            let hex = fmt
                                .get(i..i + 2)
                                .and_then(|h| u8::from_str_radix(h, 16).ok())
                                .ok_or("\\x takes two hex digits")?;
                            i += 2;
                            hex
                        }
                        other => return Err(format!("unknown escape \\{}", other as char)),
                    };
                    push_literal(&mut pieces, byte);
                }
                other => {
                    push_literal(&mut pieces, other);
                    i += 1;
                }
            }
        }
        Ok(Template { pieces })
    }

    /// Writes one record.
    pub(crate) fn render(&self, r: &Record, out: &mut impl Write) -> io::Result<()> {
        for p in &self.pieces {
            match p {
                Piece::Literal(v) => out.write_all(v)?,
                Piece::Bytes(f, how) => {
                    let data: Option<&[u8]> = match f {
                        Field::Value => r.value.as_deref(),
                        Field::Key => r.key.as_deref(),
                        Field::Topic => Some(r.topic.as_bytes()),
                        Field::Headers => {
                            write_headers(&r.headers, out)?;
                            continue;
                        }
                        _ => None,
                    };
                    if let Some(d) = data {
                        match how {
                            BytesAs::Raw => out.write_all(d)?,
                            BytesAs::Hex => out.write_all(hex(d).as_bytes())?,
                            BytesAs::Base64 => out.write_all(B64.encode(d).as_bytes())?,
                        }
                    }
                }
                Piece::Number(f) => {
                    let size = |b: &Option<Bytes>| b.as_ref().map_or(-1, |b| b.len() as i64);
                    match f {
                        Field::ValueSize => write!(out, "{}", size(&r.value))?,
                        Field::KeySize => write!(out, "{}", size(&r.key))?,
                        Field::Partition => write!(out, "{}", r.partition)?,
                        Field::Offset => write!(out, "{}", r.offset)?,
                        Field::Timestamp => write!(out, "{}", r.timestamp_ms)?,
                        Field::HeaderCount => write!(out, "{}", r.headers.len())?,
                        _ => {}
                    }
                }
                Piece::Date(None) => out.write_all(fmt_time(r.timestamp_ms).as_bytes())?,
                Piece::Date(Some(f)) => {
                    let text = jiff::Timestamp::from_millisecond(r.timestamp_ms)
                        .ok()
                        .and_then(|t| {
                            jiff::fmt::strtime::format(f, &t.to_zoned(jiff::tz::TimeZone::UTC)).ok()
                        })
                        .unwrap_or_else(|| r.timestamp_ms.to_string());
                    out.write_all(text.as_bytes())?;
                }
            }
        }
        Ok(())
    }
}

fn write_headers(headers: &[Header], out: &mut impl Write) -> io::Result<()> {
    for (i, h) in headers.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        out.write_all(h.key.as_bytes())?;
        out.write_all(b"=")?;
        if let Some(v) = &h.value {
            out.write_all(v)?;
        }
    }
    Ok(())
}

/// Lower-case hex.
pub(crate) fn hex(d: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(d.len() * 2);
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("hex of odd length".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad hex {s:?}"))
        })
        .collect()
}

/// Encodes bytes for JSON: the string and, when not plain text, the encoding's name.
fn encode(d: &[u8], how: Encoding) -> (String, Option<&'static str>) {
    match how {
        Encoding::Auto => match std::str::from_utf8(d) {
            Ok(s) => (s.to_owned(), None),
            Err(_) => (B64.encode(d), Some("base64")),
        },
        Encoding::Utf8 => (String::from_utf8_lossy(d).into_owned(), None),
        Encoding::Base64 => (B64.encode(d), Some("base64")),
        Encoding::Hex => (hex(d), Some("hex")),
    }
}

/// Decodes a JSON string written by [`encode`] (`encoding` as named beside it).
pub(crate) fn decode(s: &str, encoding: Option<&str>) -> Result<Bytes, String> {
    match encoding {
        None | Some("utf8") | Some("utf-8") => Ok(Bytes::copy_from_slice(s.as_bytes())),
        Some("base64") => B64
            .decode(s)
            .map(Bytes::from)
            .map_err(|e| format!("bad base64: {e}")),
        Some("hex") => unhex(s).map(Bytes::from),
        Some(other) => Err(format!("unknown encoding {other:?} (utf8, base64, hex)")),
    }
}

fn put_bytes(obj: &mut Map<String, Value>, name: &str, d: Option<&[u8]>, how: Encoding) {
    match d {
        None => {
            obj.insert(name.into(), Value::Null);
        }
        Some(d) => {
            let (s, enc) = encode(d, how);
            obj.insert(name.into(), Value::String(s));
            if let Some(enc) = enc {
                obj.insert(format!("{name}_encoding"), Value::String(enc.into()));
            }
        }
    }
}

/// One record as a JSON object (see the module docs).
pub(crate) fn to_json(r: &Record, how: Encoding) -> Value {
    let mut obj = Map::new();
    obj.insert("topic".into(), Value::String(r.topic.to_string()));
    obj.insert("partition".into(), r.partition.into());
    obj.insert("offset".into(), r.offset.into());
    obj.insert("timestamp".into(), r.timestamp_ms.into());
    put_bytes(&mut obj, "key", r.key.as_deref(), how);
    put_bytes(&mut obj, "value", r.value.as_deref(), how);
    let headers = r
        .headers
        .iter()
        .map(|h| {
            let mut o = Map::new();
            o.insert("key".into(), Value::String(h.key.clone()));
            put_bytes(&mut o, "value", h.value.as_deref(), how);
            Value::Object(o)
        })
        .collect();
    obj.insert("headers".into(), Value::Array(headers));
    Value::Object(obj)
}

/// A record read from a JSON line (`spool produce --json`): every field optional but `value`
/// (which may be null, a tombstone).
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct JsonRecord {
    #[serde(default)]
    pub(crate) key: Option<String>,
    #[serde(default)]
    pub(crate) key_encoding: Option<String>,
    pub(crate) value: Option<String>,
    #[serde(default)]
    pub(crate) value_encoding: Option<String>,
    #[serde(default)]
    pub(crate) headers: Vec<JsonHeader>,
    /// Ms since the epoch.
    #[serde(default)]
    pub(crate) timestamp: Option<i64>,
    /// Accepted (so `tail -f json` output reads back) and ignored: produce decides where
    /// records go.
    #[serde(default)]
    pub(crate) topic: Option<String>,
    #[serde(default)]
    pub(crate) partition: Option<u32>,
    #[serde(default)]
    pub(crate) offset: Option<u64>,
}

/// A header of a [`JsonRecord`].
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JsonHeader {
    pub(crate) key: String,
    pub(crate) value: Option<String>,
    #[serde(default)]
    pub(crate) value_encoding: Option<String>,
}

/// The output mode of `tail` and `replay` printing.
#[derive(Clone, Debug)]
pub(crate) enum Output {
    /// A template per record.
    Template(Template),
    /// One JSON object per line.
    Json(Encoding),
}

impl Output {
    /// From `-f`: `json` for JSON lines, `raw` for values without a delimiter, else a
    /// template; by default one value per line.
    pub(crate) fn from_flag(format: Option<&str>, encoding: Encoding) -> Result<Output, String> {
        Ok(match format {
            None => Output::Template(Template::compile("%v\\n")?),
            Some("json") => Output::Json(encoding),
            Some("raw") => Output::Template(Template::compile("%v")?),
            Some(f) => Output::Template(Template::compile(f)?),
        })
    }

    /// Writes one record.
    pub(crate) fn write(&self, r: &Record, out: &mut impl Write) -> io::Result<()> {
        match self {
            Output::Template(t) => t.render(r, out),
            Output::Json(how) => {
                serde_json::to_writer(&mut *out, &to_json(r, *how))?;
                out.write_all(b"\n")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    fn rec(key: Option<&[u8]>, value: Option<&[u8]>) -> Record {
        Record {
            topic: Arc::from("prices"),
            partition: 3,
            offset: 42,
            timestamp_ms: 1_795_428_000_123,
            key: key.map(Bytes::copy_from_slice),
            value: value.map(Bytes::copy_from_slice),
            headers: vec![
                Header {
                    key: "a".into(),
                    value: Some(Bytes::from_static(b"1")),
                },
                Header {
                    key: "a".into(),
                    value: None,
                },
            ],
        }
    }

    fn render(fmt: &str, r: &Record) -> String {
        let mut out = Vec::new();
        Template::compile(fmt).unwrap().render(r, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn tokens() {
        let r = rec(Some(b"k1"), Some(b"hello"));
        assert_eq!(
            render("%t [%p] at %o: key %k (%K) %s (%S) %T\\n", &r),
            "prices [3] at 42: key k1 (2) hello (5) 1795428000123\n"
        );
        assert_eq!(render("%v{hex} %k{base64}", &r), "68656c6c6f azE=");
        assert_eq!(render("%h|%H", &r), "a=1,a=|2");
        assert_eq!(render("%d", &r), "2026-11-23T10:00:00.123Z");
        assert_eq!(render("%d{%Y-%m-%d %H:%M}", &r), "2026-11-23 10:00");
        assert_eq!(render("100%%\\t\\x41\\\\", &r), "100%\tA\\");
        let null = rec(None, None);
        assert_eq!(render("[%k][%v] %K %S", &null), "[][] -1 -1");
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            "%",
            "%q",
            "\\",
            "\\q",
            "\\x4",
            "%v{rot13}",
            "%o{hex}",
            "%k{hex",
        ] {
            assert!(Template::compile(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_is_binary_safe_and_reads_back() {
        let r = rec(Some(b"k"), Some(&[0xff, 0x00, 0x41]));
        let v = to_json(&r, Encoding::Auto);
        assert_eq!(v["key"], "k");
        assert!(v.get("key_encoding").is_none());
        assert_eq!(v["value_encoding"], "base64");
        let back: JsonRecord = serde_json::from_value(v).unwrap();
        let value = decode(
            back.value.as_deref().unwrap(),
            back.value_encoding.as_deref(),
        )
        .unwrap();
        assert_eq!(&value[..], &[0xff, 0x00, 0x41]);
        assert_eq!(back.headers.len(), 2);
        assert!(back.headers[1].value.is_none());

        let hex = to_json(&r, Encoding::Hex);
        assert_eq!(hex["value"], "ff0041");
        assert_eq!(hex["key_encoding"], "hex");
        assert_eq!(
            &decode("ff0041", Some("hex")).unwrap()[..],
            &[0xff, 0, 0x41]
        );
        assert!(decode("f", Some("hex")).is_err());
        assert!(decode("x", Some("rot13")).is_err());
    }

    #[derive(Clone, Debug)]
    enum Part {
        Text(String),
        Token(&'static str),
    }

    fn expected(part: &Part, r: &Record) -> String {
        match part {
            Part::Text(t) => t.clone(),
            Part::Token(tok) => match *tok {
                "%v" | "%s" => String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap(),
                "%k" => String::from_utf8(r.key.clone().unwrap().to_vec()).unwrap(),
                "%o" => r.offset.to_string(),
                "%p" => r.partition.to_string(),
                "%t" => r.topic.to_string(),
                "%T" => r.timestamp_ms.to_string(),
                "%S" => r.value.as_ref().unwrap().len().to_string(),
                "%%" => "%".into(),
                "\\n" => "\n".into(),
                other => unreachable!("{other}"),
            },
        }
    }

    fn source(part: &Part) -> String {
        match part {
            Part::Text(t) => t.clone(),
            Part::Token(t) => (*t).to_owned(),
        }
    }

    proptest! {
        /// A format string made of literal text and tokens renders as the concatenation of
        /// each piece rendered alone.
        #[test]
        fn templates_compose(
            parts in prop::collection::vec(prop_oneof![
                "[a-zA-Z0-9 :,=\\[\\]-]{1,8}".prop_map(Part::Text),
                prop::sample::select(vec!["%v", "%s", "%k", "%o", "%p", "%t", "%T", "%S", "%%", "\\n"])
                    .prop_map(Part::Token),
            ], 0..12),
            key in "[a-z]{0,6}",
            value in "[ -~]{0,20}",
            offset in any::<u64>(),
        ) {
            let mut r = rec(Some(key.as_bytes()), Some(value.as_bytes()));
            r.offset = offset;
            let fmt: String = parts.iter().map(source).collect();
            let want: String = parts.iter().map(|p| expected(p, &r)).collect();
            prop_assert_eq!(render(&fmt, &r), want);
        }

        /// Any format string compiles or is refused with a message; none panics, and a compiled
        /// one renders any record.
        #[test]
        fn any_format_string(fmt in "\\PC{0,30}", value in prop::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(t) = Template::compile(&fmt) {
                let mut out = Vec::new();
                t.render(&rec(None, Some(&value)), &mut out).unwrap();
            }
        }

        /// Every value survives JSON output and produce's JSON input, in every encoding.
        #[test]
        fn json_round_trip(value in prop::collection::vec(any::<u8>(), 0..64),
                           how in prop::sample::select(vec![Encoding::Auto, Encoding::Base64, Encoding::Hex])) {
            let v = to_json(&rec(None, Some(&value)), how);
            let line = serde_json::to_string(&v).unwrap();
            let back: JsonRecord = serde_json::from_str(&line).unwrap();
            let got = decode(back.value.as_deref().unwrap(), back.value_encoding.as_deref()).unwrap();
            prop_assert_eq!(&got[..], &value[..]);
        }
    }
}
