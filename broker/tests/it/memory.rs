//! Issue 12: memory is bounded by configuration, whatever clients do. The real `spoold` is
//! measured (`VmRSS` / `VmHWM` from `/proc/<pid>/status`) while hostile clients on loopback
//! ask for far more than its budgets: replies over the reply limit, decompression bombs,
//! HTTP/2 connections whose flow-control window never opens (raw `h2`), subscribers that
//! never read. Each scenario would grow the broker by hundreds of MiB to GiB without the
//! limits; the assertions leave a generous margin above the configured budgets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use spool_proto::v1;
use tonic::codegen::http;

use crate::common::Spoold;

const MIB: u64 = 1 << 20;

/// Replies at most 8 MiB; 48 MiB of replies in flight, 16 MiB per connection.
fn start(dir: &std::path::Path) -> Spoold {
    Spoold::start_env(
        dir,
        &[],
        &[
            ("SPOOL_LIMITS__MAX_REQUEST_BYTES", "8388608"),
            ("SPOOL_LIMITS__MAX_REPLY_MEMORY_BYTES", "50331648"),
            (
                "SPOOL_LIMITS__MAX_REPLY_MEMORY_BYTES_PER_CONNECTION",
                "16777216",
            ),
        ],
    )
}

/// A field of `/proc/<pid>/status` given in kB, in bytes.
fn status_field(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        * 1024
}

/// `(VmRSS, VmHWM)` of a process, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    (status_field(pid, "VmRSS:"), status_field(pid, "VmHWM:"))
}

/// The anonymous part of a process's RSS (`RssAnon`: its heap and stacks), in bytes. What the
/// allocator keeps shows here; the segment pages a Fetch touched through the engine's read
/// mappings are file-backed (`RssFile`), page cache the kernel reclaims, and stay mapped as
/// long as the segment is open, so they are not counted as retained memory.
fn anon_rss(pid: u32) -> u64 {
    status_field(pid, "RssAnon:")
}

/// The value of an unlabelled metric.
fn metric(b: &Spoold, name: &str) -> f64 {
    b.metric(name)
}

/// Creates `topic` (fsync never: the tests are about memory) with `partitions` partitions.
async fn create(b: &Spoold, topic: &str, partitions: u32) {
    let config = v1::TopicConfig {
        fsync_policy: v1::FsyncPolicy::Never as i32,
        ..Default::default()
    };
    b.create_topic_with(topic, partitions, Some(config)).await;
}

/// Appends `batches` batches of `records` records of `value` bytes to every partition.
async fn fill(
    b: &Spoold,
    topic: &str,
    partitions: u32,
    batches: usize,
    (records, value): (usize, usize),
    compression: v1::Compression,
) {
    let mut prod = b.produce().await;
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    for _ in 0..batches {
        let parts = (0..partitions)
            .map(|p| {
                let records = (0..records)
                    .map(|_| {
                        // Incompressible unless zstd is asked for (then: zeros).
                        let v: Vec<u8> = match compression {
                            v1::Compression::Zstd => vec![0; value],
                            _ => (0..value)
                                .map(|_| {
                                    seed ^= seed << 13;
                                    seed ^= seed >> 7;
                                    seed ^= seed << 17;
                                    seed as u8
                                })
                                .collect(),
                        };
                        v1::Record {
                            value: Some(Bytes::from(v)),
                            ..Default::default()
                        }
                    })
                    .collect();
                v1::PartitionProduce {
                    topic: topic.into(),
                    partition: p,
                    data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                        records,
                        compression: compression as i32,
                    })),
                }
            })
            .collect();
        let r = prod
            .produce(v1::ProduceRequest {
                partitions: parts,
                acks: v1::Acks::Written as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.results.iter().all(|r| r.error.is_none()), "{r:?}");
    }
}

fn fetch_of(topic: &str, parts: &[(u32, u64)], decode: bool) -> v1::FetchRequest {
    v1::FetchRequest {
        partitions: parts
            .iter()
            .map(|(p, offset)| v1::PartitionFetch {
                topic: topic.into(),
                partition: *p,
                offset: *offset,
                max_bytes: 16 << 20,
            })
            .collect(),
        decode_records: decode,
        ..Default::default()
    }
}

/// A broker (see [`start`]) with topic `big`: one partition of 7 MiB (28 batches of one
/// 256 KiB record), read once so that its pages are resident and a first reply was built.
async fn with_big_topic(dir: &std::path::Path) -> Spoold {
    let b = start(dir);
    create(&b, "big", 1).await;
    fill(&b, "big", 1, 28, (1, 256 << 10), v1::Compression::None).await;
    b.consume()
        .await
        .fetch(fetch_of("big", &[(0, 0)], false))
        .await
        .unwrap();
    b
}

/// An HTTP/2 connection that never opens its streams' flow-control windows: the broker can
/// send headers but no data.
async fn closed_window(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Starts a gRPC call on a raw h2 connection; the response is never read.
async fn call(
    client: &h2::client::SendRequest<Bytes>,
    path: &str,
    msg: &impl Message,
) -> h2::client::ResponseFuture {
    let mut c = client.clone().ready().await.unwrap();
    let req = http::Request::post(format!("http://spool{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = c.send_request(req, false).unwrap();
    let mut buf = vec![0u8];
    buf.extend((msg.encoded_len() as u32).to_be_bytes());
    msg.encode(&mut buf).unwrap();
    body.send_data(Bytes::from(buf), true).unwrap();
    resp
}

/// The process's peak RSS (`VmHWM`) is reset to its current RSS (`clear_refs` 5, Linux 4.0+),
/// so that the next peak is the peak of what follows, not of the setup before it.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// Peak RSS growth of `pid` while `f` runs: the peak (`VmHWM`, reset first) over the RSS
/// when `f` starts. Printed, for the record.
async fn peak_growth_during<F: std::future::Future>(
    what: &str,
    pid: u32,
    f: F,
) -> (u64, F::Output) {
    reset_peak(pid);
    let (baseline, _) = rss(pid);
    let out = f.await;
    let (now, hwm) = rss(pid);
    let growth = hwm.saturating_sub(baseline);
    eprintln!(
        "{what}: RSS {} MiB before, peak {} MiB (+{} MiB), {} MiB after",
        baseline / MIB,
        hwm / MIB,
        growth / MIB,
        now / MIB
    );
    (growth, out)
}

/// Issue 12: memory is returned after a burst. Once the reply memory in use is back to zero,
/// waits (at most 15 s) until the anonymous RSS is back within half [`KEPT_AT_MOST`] of `baseline`
/// (the anonymous RSS before the burst, [`anon_rss`]) and the broker has trimmed its heap
/// since `trims_before` (it looks every 2 s); prints it and returns how far above the
/// baseline it stayed.
async fn retained_after(what: &str, b: &Spoold, baseline: u64, trims_before: f64) -> u64 {
    let t = Instant::now();
    while metric(b, "spool_reply_memory_bytes") > 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "reply memory not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    let kept = loop {
        let kept = anon_rss(b.pid()).saturating_sub(baseline);
        let trimmed = metric(b, "spool_memory_trims_total") > trims_before;
        // Settles below half the bound (blocking-pool threads that served the burst exit
        // after 10 s idle, with their stacks) or is measured as it is after 15 s.
        if (kept < KEPT_AT_MOST / 2 && (trimmed || !cfg!(target_env = "gnu")))
            || t.elapsed() > Duration::from_secs(15)
        {
            break kept;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        metric(b, "spool_memory_trims_total") > trims_before || !cfg!(target_env = "gnu"),
        "{what}: the broker did not trim its heap after the burst"
    );
    eprintln!(
        "{what}: anonymous RSS {} MiB before, {} MiB {:.1} s after close (+{} MiB kept)",
        baseline / MIB,
        (baseline + kept) / MIB,
        t.elapsed().as_secs_f64(),
        kept / MIB
    );
    kept
}

/// What may stay resident after a burst, over the anonymous RSS before it. Without the trim
/// the burst's growth stays (in VmRSS: 21-35 MiB after the closed windows, 2-22 MiB after the
/// subscribers). With it, in anonymous RSS: 6-7 or 13-14 MiB after the closed windows
/// (bimodal, stable for 15 s, with the blocking-pool threads gone), 0-6 after the subscribers.
/// VmRSS is not used: it also counts the segment pages the Fetches touched through the read
/// mapping (file-backed page cache, not heap), which made a CI run see 20 MiB.
const KEPT_AT_MOST: u64 = 24 * MIB;

/// Issue 12: a Fetch over the reply limit is trimmed (not refused with OUT_OF_RANGE) and the
/// client continues from `next_offset`; the same partition named many times, and decoding
/// small zstd batches that expand to 160 MiB, stay within the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_trimmed_to_their_limit() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path());
    create(&b, "p", 3).await;
    fill(&b, "p", 3, 16, (1, 256 << 10), v1::Compression::None).await; // 4 MiB each
    let mut cons = b.consume().await;
    // 3 x 4 MiB asked for, 8 MiB allowed: trimmed, then the rest on the next fetches.
    let mut next = [0u64; 3];
    let mut fetches = 0;
    let mut bytes = 0;
    while next.iter().any(|n| *n < 16) {
        let parts: Vec<_> = (0..3).map(|p| (p, next[p as usize])).collect();
        let r = cons
            .fetch(fetch_of("p", &parts, false))
            .await
            .expect("trimmed, not refused")
            .into_inner();
        let len = r.encoded_len() as u64;
        assert!(len <= 8 * MIB, "{len}");
        for d in &r.partitions {
            assert!(d.error.is_none(), "{d:?}");
            assert!(d.next_offset >= next[d.partition as usize]);
            next[d.partition as usize] = d.next_offset;
            bytes += d.record_batches.len() as u64;
        }
        assert!(
            fetches > 0 || r.partitions.iter().any(|d| d.trimmed),
            "the first reply says it was trimmed"
        );
        fetches += 1;
        assert!(fetches < 10);
    }
    assert!(
        (12 * MIB..13 * MIB).contains(&bytes),
        "every batch once: {bytes}"
    );

    // The same partition 200 times: one reply of at most 8 MiB.
    let pid = b.pid();
    let (growth, r) = peak_growth_during("one partition 200 times", pid, async {
        cons.fetch(fetch_of("p", &[(0, 0); 200], false)).await
    })
    .await;
    let r = r.unwrap().into_inner();
    assert_eq!(r.partitions.len(), 200);
    assert!(r.encoded_len() as u64 <= 8 * MIB);
    assert!(growth < 64 * MIB, "grew {} MiB", growth / MIB);

    // Small zstd batches expanding to 4 MiB each (40 of them: 160 MiB decoded), decoded.
    create(&b, "z", 1).await;
    fill(&b, "z", 1, 40, (4, 1 << 20), v1::Compression::Zstd).await;
    let (growth, r) = peak_growth_during("decoding 160 MiB of zstd", pid, async {
        cons.fetch(fetch_of("z", &[(0, 0)], true)).await
    })
    .await;
    let d = &r.expect("trimmed, not refused").into_inner().partitions[0];
    assert!(d.error.is_none(), "{d:?}");
    assert!(
        d.trimmed && d.next_offset > 0 && d.next_offset < 160,
        "{}",
        d.next_offset
    );
    assert!(
        growth < 64 * MIB,
        "decoding grew the broker by {} MiB",
        growth / MIB
    );
    b.stop();
}

/// Issue 12: HTTP/2 connections whose windows never open, each with 40 Fetch streams of
/// 8 MiB replies (320 MiB asked per connection), hold at most their connection's budget;
/// the rest wait, then get RESOURCE_EXHAUSTED; another client is still served; everything
/// is given back when the connections go, to the budget and (trimmed) to the system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_windows_cannot_pin_more_than_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let b = with_big_topic(dir.path()).await;
    let addr: SocketAddr = b.addr.parse().unwrap();
    let mut cons = Some(b.consume().await);
    let pid = b.pid();
    let baseline = anon_rss(pid);
    let trims = metric(&b, "spool_memory_trims_total");
    let (growth, statuses) = peak_growth_during("2 closed windows x 40 fetches", pid, async {
        let mut pending = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..2 {
            let c = closed_window(addr).await;
            for _ in 0..40 {
                pending.push(
                    call(
                        &c,
                        "/spool.v1.ConsumeService/Fetch",
                        &fetch_of("big", &[(0, 0)], false),
                    )
                    .await,
                );
            }
            conns.push(c);
        }
        // Meanwhile a well-behaved client is served (the 2 x 16 MiB leave 16 of 48): not
        // refused, as it would be after 2 s had it to wait for memory. (No time bound: CI
        // machines are slow and shared.)
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = cons
            .as_mut()
            .unwrap()
            .fetch(fetch_of("big", &[(0, 0)], false))
            .await
            .expect("served while others hold their budgets");
        assert!(r.into_inner().partitions[0].record_batches.len() as u64 > 6 * MIB);
        // Closed: what the broker keeps for a live connection is not "retained".
        cons = None;
        // The streams past each connection's budget give up after their memory wait.
        // (Responses are kept: dropping one resets its stream, which frees its memory.)
        let mut statuses = Vec::new();
        let mut responses = Vec::new();
        for p in pending {
            let resp = tokio::time::timeout(Duration::from_secs(10), p)
                .await
                .expect("response headers")
                .unwrap();
            statuses.push(
                resp.headers()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_owned()),
            );
            responses.push(resp);
        }
        let used = metric(&b, "spool_reply_memory_bytes");
        assert!(used > 0.0 && used <= 48.0 * MIB as f64, "{used}");
        drop((responses, conns));
        statuses
    })
    .await;
    // 2 per connection fit in its 16 MiB (their headers came, data cannot); 38 refused.
    let refused = statuses
        .iter()
        .filter(|s| s.as_deref() == Some("8"))
        .count();
    let open = statuses.iter().filter(|s| s.is_none()).count();
    assert_eq!((open, refused), (4, 76), "{statuses:?}");
    assert_eq!(metric(&b, "spool_reply_memory_refusals_total"), 76.0);
    assert!(growth < 96 * MIB, "grew {} MiB", growth / MIB);
    // Given back once the connections are gone, to the budget and to the system.
    let kept = retained_after("2 closed windows x 40 fetches", &b, baseline, trims).await;
    assert!(kept < KEPT_AT_MOST, "{} MiB stayed resident", kept / MIB);
    b.stop();
}

/// Issue 12: 150 subscriptions of 8 MiB chunks on one connection that never reads hold at
/// most the connection's budget (without it, about 3 chunks each: over 3 GiB); they wait
/// rather than fail; their memory goes back to the system once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_never_read_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let b = with_big_topic(dir.path()).await;
    let addr: SocketAddr = b.addr.parse().unwrap();
    let pid = b.pid();
    let sub = v1::SubscribeRequest {
        partitions: vec![v1::SubscribePartition {
            topic: "big".into(),
            partition: 0,
            start: Some(v1::StartPosition {
                position: Some(v1::start_position::Position::Earliest(true)),
            }),
        }],
        max_bytes: 8 << 20,
        ..Default::default()
    };
    let baseline = anon_rss(pid);
    let trims = metric(&b, "spool_memory_trims_total");
    let (growth, conn) = peak_growth_during("150 subscribers never reading", pid, async {
        let c = closed_window(addr).await;
        let mut streams = Vec::new();
        for _ in 0..150 {
            streams.push(call(&c, "/spool.v1.ConsumeService/Subscribe", &sub).await);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        (c, streams)
    })
    .await;
    assert!(growth < 80 * MIB, "grew {} MiB", growth / MIB);
    let used = metric(&b, "spool_reply_memory_bytes");
    assert!(used > 0.0 && used <= 16.0 * MIB as f64, "{used}");
    assert!(metric(&b, "spool_reply_memory_waits_total") >= 100.0);
    assert_eq!(metric(&b, "spool_reply_memory_refusals_total"), 0.0);
    drop(conn);
    let kept = retained_after("150 subscribers never reading", &b, baseline, trims).await;
    assert!(kept < KEPT_AT_MOST, "{} MiB stayed resident", kept / MIB);
    b.stop();
}

/// A length-delimited field `tag` (its key byte) around `body`.
fn wrap(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

/// Audit finding 1: count limits (partitions per request, records, offsets, groups) were
/// checked only after prost had decoded every element, and an empty element is 2 bytes on the
/// wire but 50-100 decoded: each of these 8 MB requests of 4 M empty elements grew the broker
/// by 290-430 MiB before it was refused (64 MiB requests by GiBs: OOM). The server codec now
/// counts them on the wire: each is refused with INVALID_ARGUMENT, naming the count and the
/// limit, and the broker grows by little more than the request's own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_empty_elements_are_refused_before_decoding() {
    const N: usize = 4_000_000;
    let dir = tempfile::tempdir().unwrap();
    let b = start(dir.path());
    let pid = b.pid();
    let empties = |key: u8| [key, 0].repeat(N);
    // One partition whose record list (field 4) holds N empty records.
    let records = wrap(0x0a, &wrap(0x22, &empties(0x0a)));
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "/spool.v1.ProduceService/Produce",
            empties(0x0a),
            "partitions",
        ),
        (
            "/spool.v1.ProduceService/Produce",
            records,
            "records and headers",
        ),
        (
            "/spool.v1.ConsumeService/Fetch",
            empties(0x0a),
            "partitions",
        ),
        (
            "/spool.v1.OffsetService/FetchOffsets",
            empties(0x12),
            "partitions",
        ),
        (
            "/spool.v1.TransactionService/CommitTxn",
            empties(0x22),
            "groups",
        ),
    ];
    let mut grpc = tonic::client::Grpc::new(b.channel().await);
    for (path, body, what) in cases {
        assert!(body.len() < 8 << 20, "{path}: under max_request_bytes");
        let (growth, r) = peak_growth_during(&format!("{path}, {N} empty {what}"), pid, async {
            grpc.ready().await.unwrap();
            grpc.unary::<Bytes, Bytes, _>(
                tonic::Request::new(Bytes::from(body)),
                path.parse().unwrap(),
                crate::errors::RawCodec,
            )
            .await
        })
        .await;
        let e = r.expect_err(path);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{path}: {e:?}");
        assert!(
            e.message()
                .starts_with(&format!("{N} {what} in one request")),
            "{path}: {e:?}"
        );
        assert!(growth < 32 * MIB, "{path}: grew {} MiB", growth / MIB);
    }
    // The broker is fine afterwards.
    b.admin()
        .await
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap();
    b.stop();
}
