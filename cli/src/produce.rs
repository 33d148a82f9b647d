//! `spool produce`: records from arguments, stdin, a file, or JSON lines, through the client's
//! batching producer.
//!
//! Input is read on a thread of its own with every record bounded (`--max-record-bytes`), so
//! a line without an end never grows memory without limit. Records are sent in input order;
//! `-v` prints where each one landed, in input order, once acknowledged. If records were not
//! delivered, each failure is printed on stderr with its input record number and the exit code
//! is the first failure's (3 unreachable, 4 refused); malformed input exits 2 and stops
//! reading, but the records before it are still delivered. A record the producer refuses at
//! send time (unknown topic, over the size limit, broker unreachable) is reported at once and
//! stops the command as soon as the records already sent are settled, without waiting for
//! more input (a terminal or `tail -F | spool produce` may not send any for a long time).

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, ValueEnum};
use spool_client::{
    Acks, Client, Compression, DeliveryFuture, Header, ProducerConfig, ProducerRecord,
};
use tokio::sync::mpsc;

use crate::conn::parse_duration;
use crate::exit::{CliError, CliResult, usage};
use crate::format::{JsonRecord, decode};

/// Longest record accepted from input by default.
const DEFAULT_MAX_RECORD: usize = 8 << 20;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum AcksArg {
    /// Like `written` (in order, write errors reported), but the reply carries no offsets.
    None,
    /// Written to the page cache.
    Written,
    /// fsynced (survives power loss).
    Durable,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum CompressionArg {
    None,
    Lz4,
    Zstd,
}

/// Produce records.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  spool produce prices 'first record' 'second record'
  printf 'user-1:hello\\nuser-2:world\\n' | spool produce events -K: -v
  spool produce events/2 --file records.txt -H source=backfill
  spool consume old -o start:end -f json | spool produce new --json")]
pub(crate) struct ProduceArgs {
    /// TOPIC or TOPIC/PARTITION (without a partition, keyed records go by key hash and
    /// unkeyed ones round robin).
    target: String,
    /// Records to produce; without any, records are read from --file or stdin.
    values: Vec<String>,
    /// Read records from this file instead of stdin.
    #[arg(long, short = 'F', value_name = "FILE")]
    file: Option<PathBuf>,
    /// Record delimiter in the input (escapes \n, \t, \0 allowed).
    #[arg(long, short = 'D', default_value = "\\n")]
    delimiter: String,
    /// Split each record at the first SEP into key and value (kcat's -K).
    #[arg(long, short = 'K', value_name = "SEP")]
    key_delimiter: Option<String>,
    /// The same key for every record.
    #[arg(long, short = 'k', conflicts_with = "key_delimiter")]
    key: Option<String>,
    /// Header key=value (repeatable; keys may repeat).
    #[arg(long = "header", short = 'H', value_name = "KEY=VALUE")]
    headers: Vec<String>,
    /// Input is JSON lines: {"key", "value", "headers":[{"key","value"}], "timestamp"} with
    /// optional "key_encoding"/"value_encoding" (base64, hex), as `spool tail -f json` prints.
    #[arg(long, conflicts_with_all = ["key_delimiter", "delimiter"])]
    json: bool,
    /// An empty value is sent as null (a tombstone), as kcat's -Z.
    #[arg(long, short = 'Z')]
    null_empty: bool,
    /// Durability to wait for.
    #[arg(long, value_enum, default_value = "durable")]
    acks: AcksArg,
    /// Batch compression.
    #[arg(long, short = 'z', value_enum, default_value = "none")]
    compression: CompressionArg,
    /// How long a batch waits for more records.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    linger: Duration,
    /// Batch size in bytes before compression.
    #[arg(long, default_value_t = 1 << 20)]
    batch_bytes: usize,
    /// Longest record read from input (bytes).
    #[arg(long, default_value_t = DEFAULT_MAX_RECORD)]
    max_record_bytes: usize,
    /// Print topic/partition@offset for every record on stdout, in input order.
    #[arg(long, short = 'v')]
    verbose: bool,
}

/// `TOPIC` or `TOPIC/PARTITION`.
pub(crate) fn split_target(target: &str) -> CliResult<(String, Option<u32>)> {
    match target.rsplit_once('/') {
        None => Ok((target.to_owned(), None)),
        Some((t, p)) => {
            let p = p.parse().map_err(|_| {
                usage(format!(
                    "{target:?}: the partition after / must be a number"
                ))
            })?;
            Ok((t.to_owned(), Some(p)))
        }
    }
}

/// Expands `\n`, `\t`, `\r`, `\0`, `\\` in a delimiter.
fn unescape(s: &str) -> CliResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        out.push(match it.next() {
            Some(b'n') => b'\n',
            Some(b't') => b'\t',
            Some(b'r') => b'\r',
            Some(b'0') => 0,
            Some(b'\\') => b'\\',
            other => {
                return Err(usage(format!(
                    "unknown escape \\{} in delimiter",
                    other.map(char::from).unwrap_or(' ')
                )));
            }
        });
    }
    if out.is_empty() {
        return Err(usage("the delimiter is empty"));
    }
    Ok(out)
}

/// Turns input records into producer records; pure, so it is tested without a broker.
#[derive(Debug)]
struct Parser {
    key_delimiter: Option<Vec<u8>>,
    key: Option<Bytes>,
    headers: Vec<Header>,
    json: bool,
    null_empty: bool,
}

impl Parser {
    fn parse(&self, raw: &[u8]) -> Result<ProducerRecord, String> {
        if self.json {
            return self.parse_json(raw);
        }
        let (key, value) = match &self.key_delimiter {
            Some(sep) => match find(raw, sep) {
                Some(i) => (Some(&raw[..i]), &raw[i + sep.len()..]),
                None => {
                    return Err(format!(
                        "no key delimiter {:?} in the record",
                        String::from_utf8_lossy(sep)
                    ));
                }
            },
            None => (None, raw),
        };
        let mut r = ProducerRecord {
            key: key.map(Bytes::copy_from_slice).or_else(|| self.key.clone()),
            value: (!(self.null_empty && value.is_empty())).then(|| Bytes::copy_from_slice(value)),
            headers: self.headers.clone(),
            timestamp_ms: None,
        };
        if self.null_empty && r.key.as_ref().is_some_and(|k| k.is_empty()) {
            r.key = None;
        }
        Ok(r)
    }

    fn parse_json(&self, raw: &[u8]) -> Result<ProducerRecord, String> {
        let j: JsonRecord = serde_json::from_slice(raw).map_err(|e| format!("bad JSON: {e}"))?;
        let key = match &j.key {
            Some(k) => Some(decode(k, j.key_encoding.as_deref())?),
            None => self.key.clone(),
        };
        let value = match &j.value {
            Some(v) => Some(decode(v, j.value_encoding.as_deref())?),
            None => None,
        };
        let mut headers = self.headers.clone();
        for h in &j.headers {
            headers.push(Header {
                key: h.key.clone(),
                value: match &h.value {
                    Some(v) => Some(decode(v, h.value_encoding.as_deref())?),
                    None => None,
                },
            });
        }
        Ok(ProducerRecord {
            key,
            value,
            headers,
            timestamp_ms: j.timestamp,
        })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One input record, or why input stopped.
enum Input {
    Record(usize, ProducerRecord),
    Bad(usize, String),
}

/// Reads delimited records from `r` (bounded by `max`), parses them and sends them on `tx`.
fn read_records(
    r: impl Read,
    delimiter: &[u8],
    max: usize,
    parser: &Parser,
    tx: &mpsc::Sender<Input>,
) -> std::io::Result<()> {
    let mut r = BufReader::with_capacity(1 << 16, r);
    let last = *delimiter.last().unwrap_or(&b'\n');
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        // Read up to the delimiter's last byte, never more than `max` + delimiter bytes.
        loop {
            let limit = (max + delimiter.len()).saturating_sub(buf.len()) as u64 + 1;
            let got = (&mut r).take(limit).read_until(last, &mut buf)?;
            if got == 0 || buf.ends_with(delimiter) || buf.len() > max + delimiter.len() {
                break;
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        n += 1;
        let body = buf.strip_suffix(delimiter).unwrap_or(&buf);
        if body.len() > max {
            let _ = tx.blocking_send(Input::Bad(
                n,
                format!("record longer than --max-record-bytes {max}"),
            ));
            return Ok(());
        }
        // A trailing empty line in JSON or keyed input is not a record.
        if body.is_empty() && (parser.json || parser.key_delimiter.is_some()) {
            continue;
        }
        let item = match parser.parse(body) {
            Ok(rec) => Input::Record(n, rec),
            Err(e) => Input::Bad(n, e),
        };
        let stop = matches!(item, Input::Bad(..));
        if tx.blocking_send(item).is_err() || stop {
            return Ok(());
        }
    }
}

pub(crate) async fn run(client: &Client, a: ProduceArgs) -> CliResult<ExitCode> {
    let (topic, partition) = split_target(&a.target)?;
    let mut headers = Vec::new();
    for h in &a.headers {
        let (k, v) = h
            .split_once('=')
            .ok_or_else(|| usage(format!("header {h:?} is not key=value")))?;
        headers.push(Header {
            key: k.to_owned(),
            value: Some(Bytes::copy_from_slice(v.as_bytes())),
        });
    }
    let parser = Parser {
        key_delimiter: a.key_delimiter.as_deref().map(unescape).transpose()?,
        key: a.key.as_ref().map(|k| Bytes::copy_from_slice(k.as_bytes())),
        headers,
        json: a.json,
        null_empty: a.null_empty,
    };
    let delimiter = unescape(&a.delimiter)?;
    let producer = client.producer(ProducerConfig {
        acks: match a.acks {
            AcksArg::None => Acks::None,
            AcksArg::Written => Acks::Written,
            AcksArg::Durable => Acks::Durable,
        },
        compression: match a.compression {
            CompressionArg::None => Compression::None,
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zstd => Compression::Zstd,
        },
        linger: a.linger,
        batch_bytes: a.batch_bytes,
        ..ProducerConfig::default()
    });

    // Input on its own thread; records flow through a bounded channel (backpressure).
    let (tx, mut rx) = mpsc::channel::<Input>(1024);
    let values = a.values.clone();
    let file = a.file.clone();
    let max = a.max_record_bytes;
    if values.is_empty() && file.is_none() && std::io::stdin().is_terminal() {
        status!("reading records from stdin, one per line; Ctrl-D to finish");
    }
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        if !values.is_empty() {
            for (i, v) in values.iter().enumerate() {
                let item = match parser.parse(v.as_bytes()) {
                    Ok(r) => Input::Record(i + 1, r),
                    Err(e) => Input::Bad(i + 1, e),
                };
                if tx.blocking_send(item).is_err() {
                    break;
                }
            }
            return Ok(());
        }
        match file {
            Some(f) => read_records(std::fs::File::open(f)?, &delimiter, max, &parser, &tx),
            None => read_records(std::io::stdin().lock(), &delimiter, max, &parser, &tx),
        }
    });

    // Acknowledgements are awaited in input order by a task of their own.
    let (ack_tx, mut ack_rx) = mpsc::channel::<(usize, DeliveryFuture)>(1 << 16);
    let verbose = a.verbose;
    let acks = tokio::spawn(async move {
        let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
        let out = std::io::stdout();
        while let Some((n, fut)) = ack_rx.recv().await {
            match fut.await {
                Ok(m) => {
                    ok += 1;
                    if verbose {
                        let at = m.offset.map_or("?".to_owned(), |o| o.to_string());
                        // A closed stdout stops the printing, not the producing.
                        let _ = writeln!(out.lock(), "{}/{}@{at}", m.topic, m.partition);
                    }
                }
                Err(e) => {
                    failed += 1;
                    status!("spool: record {n} not delivered: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        let _ = out.lock().flush();
        (ok, failed, first_error)
    });

    let mut bad_input = None;
    let mut send_error = None;
    // Stopped before the input ended: the reader may be blocked reading (stdin).
    let mut stopped_early = false;
    while let Some(item) = rx.recv().await {
        match item {
            Input::Record(n, rec) => {
                let sent = match partition {
                    Some(p) => producer.send_to(&topic, p, rec).await,
                    None => producer.send(&topic, rec).await,
                };
                match sent {
                    Ok(fut) => {
                        if ack_tx.send((n, fut)).await.is_err() {
                            stopped_early = true;
                            break;
                        }
                    }
                    Err(e) => {
                        // Said now: the records already sent may take a while to settle, and
                        // the input may not end soon (a terminal, `tail -F | spool produce`).
                        // The reason is the error the command ends with (said once).
                        status!(
                            "spool: input record {n} not sent; stopping once the records \
                             before it are settled"
                        );
                        send_error = Some(e);
                        stopped_early = true;
                        break;
                    }
                }
            }
            Input::Bad(n, e) => {
                bad_input = Some(format!("input record {n}: {e}"));
                break;
            }
        }
    }
    drop(rx);
    producer.close().await;
    drop(ack_tx);
    let (ok, failed, first_error) = acks
        .await
        .map_err(|e| CliError::Other(anyhow::anyhow!("ack task: {e}")))?;
    // A reader blocked reading stdin would hold the exit until the next input line or EOF;
    // when stopping early it is left to die with the process (its input is not wanted).
    let joined = if stopped_early && !reader.is_finished() {
        Ok(Ok(()))
    } else {
        reader.join()
    };
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(CliError::Other(
                anyhow::Error::new(e).context("reading input"),
            ));
        }
        Err(_) => return Err(CliError::Other(anyhow::anyhow!("input thread panicked"))),
    }
    if let Some(e) = send_error {
        status!("spool: {ok} record(s) delivered before the failure");
        return Err(e.into());
    }
    if let Some(e) = bad_input {
        status!("spool: {ok} record(s) delivered before the bad input");
        return Err(usage(e));
    }
    if let Some(e) = first_error {
        // The exit code is the first failure's: 3 (unreachable) or 4 (refused).
        status!("spool: {failed} record(s) not delivered, {ok} delivered");
        return Err(e.into());
    }
    if verbose || std::io::stderr().is_terminal() {
        status!("produced {ok} record(s) to {topic}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> Parser {
        Parser {
            key_delimiter: None,
            key: None,
            headers: vec![],
            json: false,
            null_empty: false,
        }
    }

    fn read_all(
        input: &[u8],
        delimiter: &[u8],
        max: usize,
        p: &Parser,
    ) -> Vec<Result<ProducerRecord, String>> {
        let (tx, mut rx) = mpsc::channel(1024);
        read_records(input, delimiter, max, p, &tx).unwrap();
        drop(tx);
        let mut out = Vec::new();
        while let Ok(i) = rx.try_recv() {
            out.push(match i {
                Input::Record(_, r) => Ok(r),
                Input::Bad(_, e) => Err(e),
            });
        }
        out
    }

    fn values(v: &[Result<ProducerRecord, String>]) -> Vec<String> {
        v.iter()
            .map(|r| match r {
                Ok(r) => {
                    String::from_utf8_lossy(r.value.as_deref().unwrap_or(b"<null>")).into_owned()
                }
                Err(e) => format!("ERR {e}"),
            })
            .collect()
    }

    #[test]
    fn lines_and_delimiters() {
        let p = parser();
        assert_eq!(
            values(&read_all(b"a\nb\n\nc", b"\n", 100, &p)),
            ["a", "b", "", "c"]
        );
        assert_eq!(values(&read_all(b"a||b||", b"||", 100, &p)), ["a", "b"]);
        assert_eq!(values(&read_all(b"a|b||c", b"||", 100, &p)), ["a|b", "c"]);
        assert_eq!(values(&read_all(b"x\0y\0", b"\0", 100, &p)), ["x", "y"]);
    }

    #[test]
    fn records_are_bounded() {
        let p = parser();
        let long = vec![b'x'; 50];
        let mut input = b"ok\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nnever\n");
        let got = read_all(&input, b"\n", 10, &p);
        assert_eq!(got.len(), 2);
        assert!(got[1].as_ref().unwrap_err().contains("longer than"));
        // Exactly at the limit is fine.
        assert_eq!(
            values(&read_all(b"0123456789\n", b"\n", 10, &p)),
            ["0123456789"]
        );
    }

    #[test]
    fn keys_headers_tombstones() {
        let p = Parser {
            key_delimiter: Some(b":".to_vec()),
            headers: vec![Header {
                key: "h".into(),
                value: Some(Bytes::from_static(b"1")),
            }],
            null_empty: true,
            ..parser()
        };
        let r = p.parse(b"user-1:a:b").unwrap();
        assert_eq!(r.key.as_deref(), Some(&b"user-1"[..]));
        assert_eq!(r.value.as_deref(), Some(&b"a:b"[..]));
        assert_eq!(r.headers.len(), 1);
        let t = p.parse(b"user-2:").unwrap();
        assert_eq!(t.value, None);
        assert!(p.parse(b"no separator").is_err());
    }

    #[test]
    fn json_lines() {
        let p = Parser {
            json: true,
            ..parser()
        };
        let r = p
            .parse(br#"{"key":"k","value":"/wBB","value_encoding":"base64","headers":[{"key":"a","value":null}],"timestamp":5,"topic":"t","partition":0,"offset":9}"#)
            .unwrap();
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r.value.as_deref(), Some(&[0xff, 0, 0x41][..]));
        assert_eq!(r.timestamp_ms, Some(5));
        assert_eq!(r.headers[0].value, None);
        assert!(p.parse(b"{\"value\":\"x\",\"colour\":1}").is_err());
        assert!(p.parse(b"not json").is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(split_target("t").unwrap(), ("t".into(), None));
        assert_eq!(split_target("t/3").unwrap(), ("t".into(), Some(3)));
        assert!(split_target("t/x").is_err());
        assert_eq!(unescape("\\n").unwrap(), b"\n");
        assert!(unescape("").is_err());
    }
}
