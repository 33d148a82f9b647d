//! The deals pipeline's two throughput targets (issue 11) against a release `spoold` on the same
//! machine, as `cargo bench -p spool-benches --bench deals_matching`:
//!
//! - **deals**: `spool_pipeline::processors::deals::Deals` on the processor runtime (in this
//!   process, default settings: exactly once, a transaction every 100 ms or 100 000 inputs,
//!   or after 2 ms without input, or at 32 MiB of state writes)
//!   reads `--updates` price updates of the seeded feed (`--products` products, 10 merchants,
//!   the CloudEvents `spool-feed` writes) from `prices`. Updates/s from ready until its
//!   committed offsets cover every input. Target ≥ 100 000/s.
//! - **matching**: `spool_pipeline::processors::matching::Matching` with `--users` users (all
//!   interested in one category, e-mail and push: two requests per user per deal) already in
//!   its state; then `--deals` deals entering that category are written to `deal-broadcast`
//!   (a copy per partition, as `spool-deals` writes them). Notification requests/s from the
//!   first deal's write until its committed offsets cover every deal. Target ≥ 100 000/s.
//! - **baselines**, in the same rep and on the same records: the runtime's stateless
//!   exactly-once pass-through (the floor any processor pays: read, emit one copy, commit)
//!   over `prices` (next to deals) and over the `notification-requests` matching wrote (next
//!   to matching), records/s; the ratio processor / pass-through per rep.
//!
//! Each rep starts a fresh `spoold` (the pipeline's topic names are fixed). deals and its
//! pass-through alternate their order between reps; matching's pass-through needs matching's
//! output, so it always runs right after it. Medians, min–max over `--reps` (5). `SPOOL_BENCH_QUICK=1` or
//! running without `--bench` (as `cargo test --benches` does) runs one small rep. Flags:
//! `--reps`, `--updates`, `--products`, `--users`, `--deals`, `--partitions` (2), `--only
//! deals,matching`, `--spoold PATH`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use spool_benches::inprocess::Running;
use spool_benches::spoold::{self, Spoold};
use spool_benches::{Stats, flag_value};
use spool_client::{Acks, Client, OffsetSpec, ProducerRecord, TopicPartition};
use spool_log_engine::{BatchBuilder, Compression};
use spool_pipeline::events::{
    AlertSettings, Channel, DealTransition, Event as Payload, PriceUpdate, TransitionKind,
};
use spool_pipeline::feed::{Feed, FeedConfig};
use spool_pipeline::processors::deals::{Deals, DealsSettings};
use spool_pipeline::processors::envelope;
use spool_pipeline::processors::matching::{Matching, MatchingSettings};
use spool_pipeline::{publish, topics};
use spool_processor::runtime::RuntimeConfig;
use spool_processor::{Context, Failure, Handler, Input};

/// mimalloc, not glibc malloc: allocation and free were ~20 % of the processors' CPU
/// (docs/benchmarks.md, deals_matching profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CATEGORY: &str = "bench";

/// Copies every input to `out`, same partition, key, value and headers.
struct PassThrough;

impl Handler for PassThrough {
    fn handle(&mut self, ctx: &mut Context<'_>, input: &Input) -> Result<(), Failure> {
        let out = ProducerRecord {
            key: input.key.clone(),
            value: input.value.clone(),
            headers: input.headers.clone(),
            timestamp_ms: Some(input.timestamp_ms),
        };
        ctx.emit_to("bench-out", input.partition, out);
        Ok(())
    }
}

fn config(name: &str, inputs: &[&str], dir: &Path) -> RuntimeConfig {
    let mut c = RuntimeConfig::new(name, inputs.iter().copied());
    c.instance_id = "bench".into();
    c.state_dir = dir.join(name);
    c
}

fn tps(topic: &str, partitions: u32) -> Vec<TopicPartition> {
    (0..partitions)
        .map(|p| TopicPartition::new(topic, p))
        .collect()
}

/// Waits until `group` committed `n` offsets in total over `tps`; returns when.
async fn committed(
    client: &Client,
    group: &str,
    tps: &[TopicPartition],
    n: u64,
) -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let c: u64 = client
            .fetch_offsets(group, tps)
            .await?
            .iter()
            .filter_map(|c| c.offset)
            .sum();
        if c >= n {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("group {group} committed {c} of {n} offsets in 900 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sum of the partitions' end offsets (records plus transaction markers).
async fn end_offsets(client: &Client, topic: &str, partitions: u32) -> Result<u64> {
    let q: Vec<_> = tps(topic, partitions)
        .into_iter()
        .map(|tp| (tp, OffsetSpec::Latest))
        .collect();
    let mut sum = 0;
    for r in client.list_offsets(&q).await? {
        sum += r?.offset;
    }
    Ok(sum)
}

/// Appends `events` (partition, event id, payload) in ~1 MiB batches per partition, acks =
/// durable, as the pipeline's producers encode them (CloudEvents in binary mode).
async fn append<T: Payload + Clone>(
    client: &Client,
    topic: &str,
    partitions: u32,
    events: impl Iterator<Item = (u32, String, T, i64)>,
) -> Result<u64> {
    let mut builders: Vec<BatchBuilder> = (0..partitions)
        .map(|_| BatchBuilder::with_capacity(Compression::None, 1 << 20))
        .collect();
    let mut n = 0u64;
    let flush = |builders: &mut Vec<BatchBuilder>| -> Result<Vec<_>> {
        let mut out = Vec::new();
        for (p, b) in builders.iter_mut().enumerate() {
            if !b.is_empty() {
                let full =
                    std::mem::replace(b, BatchBuilder::with_capacity(Compression::None, 1 << 20));
                out.push((topic.to_owned(), p as u32, full.finish()?));
            }
        }
        Ok(out)
    };
    for (p, id, data, at_ms) in events {
        let r = envelope("feed", id, &data, at_ms).to_record()?;
        let headers: Vec<(&str, Option<&[u8]>)> = r
            .headers
            .iter()
            .map(|h| (h.key.as_str(), h.value.as_deref()))
            .collect();
        builders[p as usize].push(at_ms, r.key.as_deref(), r.value.as_deref(), &headers);
        n += 1;
        if builders[p as usize].size_bytes() >= 1 << 20 {
            for res in client
                .produce_batches(flush(&mut builders)?, Acks::Durable)
                .await?
            {
                res?;
            }
        }
    }
    for res in client
        .produce_batches(flush(&mut builders)?, Acks::Durable)
        .await?
    {
        res?;
    }
    Ok(n)
}

/// A stable partition for a key (FNV-1a), as every record of a key must land in one place.
fn partition_of(key: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h % partitions
}

/// The first `n` price updates of the seeded feed.
fn price_updates(products: usize, n: u64) -> Vec<PriceUpdate> {
    let mut feed = Feed::new(FeedConfig {
        seed: 7,
        products,
        ..FeedConfig::default()
    });
    let mut out = Vec::with_capacity(n as usize);
    while (out.len() as u64) < n {
        let round = feed.next_round();
        out.extend(round.updates().take(n as usize - out.len()).cloned());
    }
    out
}

/// A fresh broker with the pipeline's topics.
async fn broker(bin: &Path, partitions: u32) -> Result<(Spoold, Client)> {
    let b = Spoold::start(bin, "")?;
    let c = Client::connect(b.addr.clone()).await?;
    publish::ensure_topics(&c, Some(partitions)).await?;
    c.create_topic("bench-out", partitions, &Default::default())
        .await?;
    Ok((b, c))
}

/// A pass-through over `input` (`n` records, done when the committed offsets sum to `ends`);
/// records/s from ready to committed.
async fn pass_through(
    client: &Client,
    input: &str,
    partitions: u32,
    n: u64,
    ends: u64,
    dir: &Path,
) -> Result<f64> {
    let p = Running::start(client, config("passthrough", &[input], dir), PassThrough);
    let t0 = p.ready(Duration::from_secs(120)).await?;
    let t1 = committed(client, "passthrough", &tps(input, partitions), ends).await?;
    p.stop().await?;
    Ok(n as f64 / (t1 - t0).as_secs_f64())
}

/// deals and the pass-through over the same updates, in `order`; (deals/s, pass-through/s).
async fn deals_rep(
    bin: &Path,
    updates: &[PriceUpdate],
    partitions: u32,
    deals_first: bool,
) -> Result<(f64, f64, u64)> {
    let (_b, client) = broker(bin, partitions).await?;
    let dir = tempfile::tempdir()?;
    let n = append(
        &client,
        topics::PRICES,
        partitions,
        updates.iter().map(|u| {
            (
                partition_of(&u.product, partitions),
                format!("{}:{}", u.merchant, u.at_ms),
                u.clone(),
                u.at_ms,
            )
        }),
    )
    .await?;
    let mut deals = 0.0;
    let mut base = 0.0;
    for case in if deals_first {
        [true, false]
    } else {
        [false, true]
    } {
        if case {
            let handler = Deals::new(DealsSettings {
                broadcast_partitions: partitions,
                ..DealsSettings::default()
            })?;
            let p = Running::start(
                &client,
                config("deals", &[topics::PRICES], dir.path()),
                handler,
            );
            let t0 = p.ready(Duration::from_secs(120)).await?;
            let t1 = committed(&client, "deals", &tps(topics::PRICES, partitions), n).await?;
            p.stop().await?;
            deals = n as f64 / (t1 - t0).as_secs_f64();
        } else {
            base = pass_through(&client, topics::PRICES, partitions, n, n, dir.path()).await?;
        }
    }
    let transitions = end_offsets(&client, topics::DEAL_TRANSITIONS, partitions).await?;
    Ok((deals, base, transitions))
}

fn user(i: usize) -> AlertSettings {
    let id = format!("u{i:07}");
    AlertSettings {
        user: id.clone(),
        name: format!("User {i}"),
        categories: vec![CATEGORY.to_owned()],
        min_drop_bp: (i % 20) as u32 * 50,
        channels: vec![Channel::Email, Channel::Push],
        email: Some(format!("{id}@example.com")),
        webhook_url: None,
        push_url: Some(format!("https://push.example/{id}")),
        time_zone: "Europe/Berlin".into(),
        quiet_hours: None,
        at_ms: 1_767_225_600_000,
    }
}

fn deal(i: usize) -> DealTransition {
    let product = format!("p{i:06}");
    DealTransition {
        id: format!("{product}:1"),
        product,
        episode: 1,
        kind: TransitionKind::Entered,
        category: CATEGORY.to_owned(),
        name: format!("Product {i}"),
        price: 7_500,
        reference: 10_000,
        drop_bp: 2_500,
        merchant: "m01".into(),
        at_ms: 1_767_225_600_000 + i as i64,
    }
}

/// matching with `users` in state, then `deals` deals; then the pass-through over the requests
/// it wrote (it needs them, so it always runs second). (requests/s, pass-through/s, requests).
async fn matching_rep(
    bin: &Path,
    users: usize,
    deals: usize,
    partitions: u32,
) -> Result<(f64, f64, u64)> {
    let (_b, client) = broker(bin, partitions).await?;
    let dir = tempfile::tempdir()?;
    let u = append(
        &client,
        topics::USER_SETTINGS,
        partitions,
        (0..users).map(|i| {
            let s = user(i);
            (
                partition_of(&s.user, partitions),
                format!("{}@0", s.user),
                s,
                0,
            )
        }),
    )
    .await?;
    let mut cfg = config(
        "matching",
        &[
            topics::DEAL_BROADCAST,
            topics::USER_SETTINGS,
            topics::ADDRESS_STATUS,
        ],
        dir.path(),
    );
    cfg.tables = vec![topics::USER_SETTINGS.into(), topics::ADDRESS_STATUS.into()];
    let p = Running::start(&client, cfg, Matching::new(MatchingSettings::default()));
    p.ready(Duration::from_secs(120)).await?;
    committed(
        &client,
        "matching",
        &tps(topics::USER_SETTINGS, partitions),
        u,
    )
    .await?;
    // Every user (min drop ≤ 25 %) is interested in every deal, on two channels.
    let requests = (deals * users * 2) as u64;
    let run_matching = async || -> Result<f64> {
        let t0 = Instant::now();
        append(
            &client,
            topics::DEAL_BROADCAST,
            partitions,
            (0..deals).flat_map(|i| {
                let d = deal(i);
                (0..partitions).map(move |p| (p, format!("{}:entered", d.id), d.clone(), d.at_ms))
            }),
        )
        .await?;
        let t1 = committed(
            &client,
            "matching",
            &tps(topics::DEAL_BROADCAST, partitions),
            (deals as u64) * u64::from(partitions),
        )
        .await?;
        Ok(requests as f64 / (t1 - t0).as_secs_f64())
    };
    let rate = run_matching().await?;
    p.stop().await?;
    // Read the requests back: their count, and per partition where the last one is (the
    // pass-through's committed offsets end there, before the last transaction marker).
    let (mut n, mut ends) = (0u64, 0u64);
    for p in 0..partitions {
        let (mut offset, mut end) = (0, 0);
        loop {
            let f = client
                .fetch(
                    topics::NOTIFICATION_REQUESTS,
                    p,
                    offset,
                    &Default::default(),
                )
                .await?;
            n += f.records.len() as u64;
            if let Some(last) = f.records.last() {
                end = last.offset + 1;
            }
            if f.next_offset == offset {
                break;
            }
            offset = f.next_offset;
        }
        ends += end;
    }
    if n != requests {
        bail!("read {n} notification requests back, expected {requests}");
    }
    let base = pass_through(
        &client,
        topics::NOTIFICATION_REQUESTS,
        partitions,
        n,
        ends,
        dir.path(),
    )
    .await?;
    Ok((rate, base, requests))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = std::env::var("SPOOL_BENCH_QUICK").is_ok_and(|v| v == "1")
        || !args.iter().any(|a| a == "--bench");
    let reps: usize = flag_value(&args, "--reps").unwrap_or(if quick { 1 } else { 5 });
    let n_updates: u64 =
        flag_value(&args, "--updates").unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let products: usize =
        flag_value(&args, "--products").unwrap_or(if quick { 1_000 } else { 20_000 });
    let users: usize = flag_value(&args, "--users").unwrap_or(if quick { 1_000 } else { 50_000 });
    let deals: usize = flag_value(&args, "--deals").unwrap_or(if quick { 2 } else { 6 });
    let partitions: u32 = flag_value(&args, "--partitions").unwrap_or(2);
    let only: Option<String> = flag_value(&args, "--only");
    let want = |case: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|c| c == case))
    };
    let bin = match flag_value::<String>(&args, "--spoold") {
        Some(p) => std::path::PathBuf::from(p),
        None => spoold::build()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "== deals_matching: deals over {n_updates} price updates of {products} products; matching of {deals} deals × {users} users × 2 channels; {partitions} partitions, {reps} reps, spoold {} (default config: fsync = always), loadavg at start {}",
        bin.display(),
        loadavg()
    );
    let updates = if want("deals") {
        price_updates(products, n_updates)
    } else {
        Vec::new()
    };
    let (mut d, mut db, mut dr) = (Vec::new(), Vec::new(), Vec::new());
    let (mut m, mut mb, mut mr) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        if want("deals") {
            let (rate, base, transitions) =
                rt.block_on(deals_rep(&bin, &updates, partitions, rep % 2 == 0))?;
            eprintln!(
                "rep {rep}: deals {rate:.0} updates/s, pass-through {base:.0} records/s, ratio {:.2} ({transitions} transition offsets; loadavg {})",
                rate / base,
                loadavg()
            );
            d.push(rate);
            db.push(base);
            dr.push(rate / base);
        }
        if want("matching") {
            let (rate, base, requests) =
                rt.block_on(matching_rep(&bin, users, deals, partitions))?;
            eprintln!(
                "rep {rep}: matching {rate:.0} requests/s ({requests} requests), pass-through of them {base:.0} records/s, ratio {:.2} (loadavg {})",
                rate / base,
                loadavg()
            );
            m.push(rate);
            mb.push(base);
            mr.push(rate / base);
        }
    }
    println!("| figure | median | min – max | target | verdict |");
    println!("| --- | --- | --- | --- | --- |");
    let row = |name: &str, v: &[f64], unit: &str, target: Option<f64>| {
        if v.is_empty() {
            return;
        }
        let s = Stats::new(v.to_vec());
        let (t, verdict) = match target {
            Some(t) => (
                format!(">= {t}"),
                if s.median() >= t { "met" } else { "MISSED" },
            ),
            None => ("-".into(), ""),
        };
        println!(
            "| {name} | {:.2} {unit} | {:.2} – {:.2} | {t} | {verdict} |",
            s.median(),
            s.min(),
            s.max()
        );
    };
    row("deals, exactly once", &d, "updates/s", Some(100_000.0));
    row(
        "pass-through over the same price updates",
        &db,
        "records/s",
        None,
    );
    row("deals / pass-through (per rep)", &dr, "×", None);
    row(
        "matching, notification requests emitted",
        &m,
        "requests/s",
        Some(100_000.0),
    );
    row(
        "pass-through over the same requests",
        &mb,
        "records/s",
        None,
    );
    row("matching / pass-through (per rep)", &mr, "×", None);
    Ok(())
}
