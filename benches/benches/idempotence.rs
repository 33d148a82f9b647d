//! Idempotent produce against plain produce through the real client (issue 5 target:
//! idempotent **≥ 95 %** of plain), as `cargo bench -p spool-benches --bench idempotence`.
//!
//! `loadgen/scripts/idempotence.sh` measures the broker's side with pre-encoded batches, but
//! its load generator has to copy and re-checksum every batch to stamp it, which on a 2-core
//! machine at ~1 GB/s costs the client more than the broker's check; the `spool-client`
//! `Producer` stamps a batch when it encodes it, at no extra cost. So this bench runs the
//! real producer, `ProducerConfig::idempotence` on and off, otherwise identical: 1 KiB
//! records, 1 MiB batches, linger 1 ms, acks = written, one partition of a topic with
//! `fsync = never` (so the disk does not set the pace), `--secs` (default 3) per measurement,
//! each on a fresh topic deleted afterwards; on and off alternate `--reps` times (default 7)
//! and the ratio is taken per pair. `SPOOL_BENCH_QUICK=1` (or running without `--bench`)
//! runs one short rep.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use spool_benches::spoold::Spoold;
use spool_benches::{Stats, flag_value};
use spool_client::{Acks, Client, ProducerConfig, ProducerRecord, TopicSettings};

const RECORD_BYTES: usize = 1024;

/// Produces for `secs` with idempotence `on`; returns MB/s of record values acknowledged.
async fn measure(addr: &str, on: bool, secs: f64, rep: usize) -> Result<f64> {
    let client = Client::connect(addr.to_owned()).await?;
    let topic = format!("idem-{}-{rep}", if on { "on" } else { "off" });
    let settings = TopicSettings {
        fsync: Some(spool_client::FsyncPolicy::Never),
        ..TopicSettings::default()
    };
    client.create_topic(&topic, 1, &settings).await?;
    let producer = client.producer(ProducerConfig {
        idempotence: on,
        acks: Acks::Written,
        linger: Duration::from_millis(1),
        batch_bytes: 1 << 20,
        ..ProducerConfig::default()
    });
    let value = Bytes::from(vec![b'x'; RECORD_BYTES]);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    let mut pending = std::collections::VecDeque::new();
    while Instant::now() < deadline {
        for _ in 0..1024 {
            pending.push_back(
                producer
                    .send_to(&topic, 0, ProducerRecord::new(value.clone()))
                    .await?,
            );
            sent += 1;
        }
        // Keep at most a few MiB unacknowledged (the producer's buffer bounds it anyway).
        while pending.len() > 8 * 1024 {
            pending.pop_front().expect("non-empty").await?;
        }
    }
    for d in pending {
        d.await?;
    }
    producer.close().await;
    let took = start.elapsed().as_secs_f64();
    client.delete_topic(&topic).await?;
    Ok(sent as f64 * RECORD_BYTES as f64 / 1e6 / took)
}

/// (median, min, max) of `v`.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let s = Stats::new(v.to_vec());
    (s.median(), s.min(), s.max())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = std::env::var("SPOOL_BENCH_QUICK").is_ok_and(|v| v == "1")
        || !args.iter().any(|a| a == "--bench");
    let reps: usize = flag_value(&args, "--reps").unwrap_or(if quick { 1 } else { 7 });
    let secs: f64 = flag_value(&args, "--secs").unwrap_or(if quick { 0.5 } else { 3.0 });
    let bin = match flag_value::<String>(&args, "--spoold") {
        Some(p) => PathBuf::from(p),
        None => spool_benches::spoold::build()?,
    };
    let broker = Spoold::start(&bin, "")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "== idempotence: spool-client Producer, 1 KiB records, 1 MiB batches, acks = written, fsync = never, {reps} reps x {secs} s, spoold {}",
        bin.display()
    );
    let (mut on, mut off, mut ratio) = (vec![], vec![], vec![]);
    for rep in 0..reps {
        // Alternate which goes first, so neither always runs on a warmer machine.
        let (a, b) = if rep % 2 == 0 {
            (false, true)
        } else {
            (true, false)
        };
        let x = rt.block_on(measure(&broker.addr, a, secs, rep))?;
        let y = rt.block_on(measure(&broker.addr, b, secs, rep))?;
        let (o, p) = if a { (x, y) } else { (y, x) };
        eprintln!(
            "rep {rep}: idempotent {o:.0} MB/s, plain {p:.0} MB/s, ratio {:.2}",
            o / p
        );
        on.push(o);
        off.push(p);
        ratio.push(o / p);
    }
    println!("| measure | median | min – max |");
    println!("| --- | --- | --- |");
    for (name, v, unit) in [
        ("plain produce", &off, "MB/s"),
        ("idempotent produce", &on, "MB/s"),
        ("ratio idempotent / plain", &ratio, "×"),
    ] {
        let (m, lo, hi) = stats(v);
        println!("| {name} | {m:.2} {unit} | {lo:.2} – {hi:.2} |");
    }
    let (r, _, _) = stats(&ratio);
    println!(
        "target: ratio >= 0.95: {}",
        if r >= 0.95 { "met" } else { "MISSED" }
    );
    Ok(())
}
