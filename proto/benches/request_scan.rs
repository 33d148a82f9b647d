//! What the server codec's count pre-scan (`spool_proto::codec::check_counts`) adds to
//! decoding a request: per request shape, ns per request of prost's decode alone (the
//! baseline: what tonic-prost did) and of the scan followed by the decode (what the server
//! codec does now), measured in the same rounds, in rotating order; reported as the median
//! [min–max] over rounds and the median of the per-round ratio.
//!
//! `cargo bench -p spool-proto --bench request_scan` (release). Without `--bench` on the
//! command line (under `cargo test --benches`) it runs a tiny smoke configuration.
//! `SPOOL_BENCH_REPS` (default 9) measured rounds after 2 warm-up rounds.

use std::hint::black_box;
use std::time::Instant;

use prost::Message;
use prost::bytes::Bytes;
use spool_proto::codec::{Counted, RequestLimits, check_counts};
use spool_proto::v1;

const LIMITS: RequestLimits = RequestLimits {
    max_partitions: 10_000,
    max_records: 1 << 20,
};

fn batch_part(topic: &str, partition: u32, bytes: usize) -> v1::PartitionProduce {
    v1::PartitionProduce {
        topic: topic.into(),
        partition,
        data: Some(v1::partition_produce::Data::RecordBatch(Bytes::from(vec![
            0x5a;
            bytes
        ]))),
    }
}

/// ns per request of `f` over `n` runs.
fn time(n: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn decode<T: Message + Default>(wire: &Bytes) -> T {
    T::decode(wire.clone()).unwrap()
}

fn scan_then_decode<T: Message + Default + Counted>(wire: &Bytes) -> T {
    check_counts::<T>(wire, &LIMITS).unwrap();
    T::decode(wire.clone()).unwrap()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Case {
    name: &'static str,
    wire: Bytes,
    iters: usize,
    run: fn(&Bytes, usize) -> (f64, f64),
}

fn run_as<T: Message + Default + Counted>(wire: &Bytes, n: usize) -> (f64, f64) {
    let base = time(n, || {
        black_box(decode::<T>(black_box(wire)));
    });
    let scanned = time(n, || {
        black_box(scan_then_decode::<T>(black_box(wire)));
    });
    (base, scanned)
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let reps: usize = std::env::var("SPOOL_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2 } else { 9 });
    let scale = if quick { 100 } else { 1 };
    let stream_16k = v1::ProduceStreamRequest {
        request_id: 42,
        partitions: vec![batch_part("prices", 3, 16 << 10)],
        acks: 2,
    };
    let produce_100x1k = v1::ProduceRequest {
        partitions: (0..100).map(|p| batch_part("prices", p, 1 << 10)).collect(),
        acks: 3,
    };
    let record = v1::Record {
        key: Some(Bytes::from_static(b"key-0001")),
        value: Some(Bytes::from(vec![0x61; 100])),
        timestamp_ms: 1_700_000_000_000,
        headers: vec![
            v1::RecordHeader {
                key: "trace".into(),
                value: Some(Bytes::from_static(b"0123456789abcdef")),
            };
            2
        ],
    };
    let list_1000 = v1::ProduceRequest {
        partitions: vec![v1::PartitionProduce {
            topic: "prices".into(),
            partition: 0,
            data: Some(v1::partition_produce::Data::Records(v1::RecordList {
                records: vec![record; 1000],
                compression: 0,
            })),
        }],
        acks: 3,
    };
    let fetch_100 = v1::FetchRequest {
        partitions: (0..100)
            .map(|p| v1::PartitionFetch {
                topic: "prices".into(),
                partition: p,
                offset: 123_456_789,
                max_bytes: 1 << 20,
            })
            .collect(),
        max_wait_ms: 500,
        ..Default::default()
    };
    let cases = [
        Case {
            name: "ProduceStream, 1 partition, 16 KiB batch",
            wire: stream_16k.encode_to_vec().into(),
            iters: 200_000 / scale,
            run: run_as::<v1::ProduceStreamRequest>,
        },
        Case {
            name: "Produce, 100 partitions x 1 KiB batch",
            wire: produce_100x1k.encode_to_vec().into(),
            iters: 20_000 / scale,
            run: run_as::<v1::ProduceRequest>,
        },
        Case {
            name: "Produce, record list of 1000 records (2 headers each)",
            wire: list_1000.encode_to_vec().into(),
            iters: 2_000 / scale,
            run: run_as::<v1::ProduceRequest>,
        },
        Case {
            name: "Fetch, 100 partitions",
            wire: fetch_100.encode_to_vec().into(),
            iters: 20_000 / scale,
            run: run_as::<v1::FetchRequest>,
        },
    ];
    let warmup = 2;
    let mut results: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = vec![Default::default(); cases.len()];
    for round in 0..warmup + reps {
        for k in 0..cases.len() {
            let i = (round + k) % cases.len();
            let c = &cases[i];
            let (base, scanned) = (c.run)(&c.wire, c.iters);
            if round >= warmup {
                let r = &mut results[i];
                r.0.push(base);
                r.1.push(scanned);
                r.2.push(scanned / base);
            }
        }
    }
    println!("request_scan: {reps} rounds (after {warmup} warm-up), ns per request");
    for (c, (mut base, mut scanned, mut ratio)) in cases.iter().zip(results) {
        let range = |v: &mut Vec<f64>| {
            let m = median(v);
            format!("{m:.0} [{:.0}–{:.0}]", v[0], v[v.len() - 1])
        };
        println!(
            "{} ({} bytes): decode {} | scan + decode {} | ratio {:.3} [{:.3}–{:.3}]",
            c.name,
            c.wire.len(),
            range(&mut base),
            range(&mut scanned),
            median(&mut ratio),
            ratio[0],
            ratio[ratio.len() - 1]
        );
    }
}
