//! Transactional produce against plain produce (issue 5 target: with 8 partitions per
//! transaction and 1 MiB per transaction, **≥ 70 %** of plain produce MB/s), as
//! `cargo bench -p spool-benches --bench transactions`.
//!
//! Builds `spoold` in this bench's profile (release under `cargo bench`) and starts it on a
//! fresh data directory with two topics of 8 partitions (the broker's default topic settings:
//! `fsync = always`). `--producers` clients (default 2) each run, for `--secs` seconds:
//!
//! - **plain**: encode 8 batches of 128 records of 1 KiB (one per partition, no producer id)
//!   and send them in one Produce request (acks = durable); repeat.
//! - **transactional**: a `TransactionalProducer` (its own transactional id) begins, sends the
//!   same 1024 records (128 per partition), and commits: one Produce request of 8 batches,
//!   then EndTxn (the decision's fsync, 8 markers and their fsyncs).
//!
//! So both sides move 1 MiB per round trip with the same request shape; the ratio is what a
//! transaction costs on top. Measurements alternate plain / transactional `--reps` times
//! (default 7, `--secs` 3 each), each on a fresh topic deleted afterwards, so that both see
//! the same machine and disk; the table gives medians (and min–max) of MB/s, of
//! transactions per second, and of the per-rep ratio. `SPOOL_BENCH_QUICK=1` (or running
//! without `--bench`, as `cargo test --benches` does) runs one short rep.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use spool_benches::spoold::Spoold;
use spool_benches::{Stats, flag_value};
use spool_client::{
    Acks, Client, ProducerRecord, TopicSettings, TransactionalConfig, TransactionalProducer,
};
use spool_log_engine::{BatchBuilder, Compression};

const PARTITIONS: u32 = 8;
const RECORDS_PER_PARTITION: usize = 128;
const RECORD_BYTES: usize = 1024;
/// Bytes of record values per round (1 MiB).
const ROUND_BYTES: usize = PARTITIONS as usize * RECORDS_PER_PARTITION * RECORD_BYTES;

fn value(round: u64, p: u32, i: usize) -> Vec<u8> {
    let mut v = vec![b'x'; RECORD_BYTES];
    let tag = format!("{round}-{p}-{i}");
    v[..tag.len()].copy_from_slice(tag.as_bytes());
    v
}

/// Plain rounds to `topic` until `deadline`: returns rounds done.
async fn plain(client: Client, topic: String, deadline: Instant) -> Result<u64> {
    let mut rounds = 0;
    while Instant::now() < deadline {
        let now = 1_700_000_000_000;
        let mut batches = Vec::with_capacity(PARTITIONS as usize);
        for p in 0..PARTITIONS {
            let mut b = BatchBuilder::with_capacity(Compression::None, 140 << 10);
            for i in 0..RECORDS_PER_PARTITION {
                b.push(now, None, Some(&value(rounds, p, i)), &[]);
            }
            batches.push((topic.clone(), p, b.finish()?));
        }
        for r in client.produce_batches(batches, Acks::Durable).await? {
            r?;
        }
        rounds += 1;
    }
    Ok(rounds)
}

/// Transactional rounds (one committed transaction each) to `topic` until `deadline`.
async fn transactional(
    client: Client,
    topic: String,
    id: String,
    deadline: Instant,
) -> Result<u64> {
    let mut cfg = TransactionalConfig::new(id);
    cfg.batch_bytes = 4 << 20; // one batch per partition per transaction
    let mut tx = TransactionalProducer::new(client, cfg).await?;
    let mut rounds = 0;
    while Instant::now() < deadline {
        tx.begin()?;
        for p in 0..PARTITIONS {
            for i in 0..RECORDS_PER_PARTITION {
                let rec = ProducerRecord::new(value(rounds, p, i)).timestamp_ms(1_700_000_000_000);
                tx.send(&topic, p, rec).await?;
            }
        }
        tx.commit().await?;
        rounds += 1;
    }
    Ok(rounds)
}

/// Runs `producers` clients of one kind for `secs` on a fresh topic (deleted afterwards, so
/// the disk holds one measurement's data at a time); returns (MB/s, rounds per second).
async fn measure(
    addr: &str,
    txn: bool,
    producers: usize,
    secs: f64,
    rep: usize,
) -> Result<(f64, f64)> {
    let admin = Client::connect(addr.to_owned()).await?;
    let topic = format!("{}-{rep}", if txn { "txn" } else { "plain" });
    admin
        .create_topic(&topic, PARTITIONS, &TopicSettings::default())
        .await?;
    let mut clients = Vec::new();
    for _ in 0..producers {
        clients.push(Client::connect(addr.to_owned()).await?);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let topic = topic.clone();
        tasks.push(if txn {
            tokio::spawn(transactional(
                c,
                topic,
                format!("bench-{rep}-{i}"),
                deadline,
            ))
        } else {
            tokio::spawn(plain(c, topic, deadline))
        });
    }
    let mut rounds = 0;
    for t in tasks {
        rounds += t.await.context("producer task")??;
    }
    let took = start.elapsed().as_secs_f64();
    admin.delete_topic(&topic).await?;
    let mb = rounds as f64 * ROUND_BYTES as f64 / 1e6;
    Ok((mb / took, rounds as f64 / took))
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
    let producers: usize = flag_value(&args, "--producers").unwrap_or(2);
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
        "== transactions: {PARTITIONS} partitions x {RECORDS_PER_PARTITION} records x {RECORD_BYTES} B = 1 MiB per round, {producers} producers, {reps} reps x {secs} s, fsync = always, spoold {}",
        bin.display()
    );
    let (mut plain_mb, mut txn_mb, mut txn_rate, mut ratios) = (vec![], vec![], vec![], vec![]);
    for rep in 0..reps {
        let (p, _) = rt.block_on(measure(&broker.addr, false, producers, secs, rep))?;
        let (t, rate) = rt.block_on(measure(&broker.addr, true, producers, secs, rep))?;
        eprintln!(
            "rep {rep}: plain {p:.0} MB/s, transactional {t:.0} MB/s ({rate:.1} txn/s), ratio {:.2}",
            t / p
        );
        plain_mb.push(p);
        txn_mb.push(t);
        txn_rate.push(rate);
        ratios.push(t / p);
    }
    let row = |name: &str, v: &[f64], unit: &str| {
        let (m, lo, hi) = stats(v);
        println!("| {name} | {m:.2} {unit} | {lo:.2} – {hi:.2} |");
    };
    println!("| measure | median | min – max |");
    println!("| --- | --- | --- |");
    row("plain produce", &plain_mb, "MB/s");
    row("transactional produce", &txn_mb, "MB/s");
    row("transactions", &txn_rate, "txn/s");
    row("ratio transactional / plain", &ratios, "×");
    let (ratio, _, _) = stats(&ratios);
    println!(
        "target: ratio >= 0.70: {}",
        if ratio >= 0.70 { "met" } else { "MISSED" }
    );
    Ok(())
}
