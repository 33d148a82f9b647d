//! Consumer-group rebalance time (issue 5 target: an 8-member group rebalances after one
//! member leaves in **< 1 s** plus the configured detection time), as
//! `cargo bench -p spool-benches --bench rebalance`.
//!
//! Builds `spoold` in this bench's profile (release under `cargo bench`), starts it on a
//! fresh data directory, creates a topic of 64 partitions and runs 8 `GroupConsumer`s (one
//! tokio task each, one connection each, in this process). Once the group is stable with 8
//! partitions per member, one member goes away and the clock runs until the 7 others have
//! *applied* (committed-offset lookups done, acknowledged) assignments covering all 64
//! partitions again. Scenarios:
//!
//! - `leave`: the member calls `leave()` (detection time 0);
//! - `crash`: a dynamic member's process dies (its stream closes; detection time 0);
//! - `static-crash`: a static member's process dies; the broker keeps its partitions for its
//!   session timeout (1 s here), the detection time, reported separately.
//!
//! Each scenario runs `--reps` times (default 7) per strategy (sticky, range) on a fresh
//! broker and group; the table gives the median, min and max. `SPOOL_BENCH_QUICK=1` (or
//! running without `--bench`, as `cargo test --benches` does) runs 1 rep of `leave`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use spool_benches::spoold::Spoold;
use spool_client::{
    AssignmentStrategy, Client, GroupConfig, GroupConsumer, GroupState, TopicPartition,
    TopicSettings,
};
use tokio::sync::{mpsc, oneshot};

const MEMBERS: usize = 8;
const PARTITIONS: u32 = 64;
const SESSION: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scenario {
    Leave,
    Crash,
    StaticCrash,
}

enum Stop {
    Leave,
    Crash,
}

/// One run: returns the time from the member going away until the others cover everything.
async fn run_once(
    bin: &Path,
    scenario: Scenario,
    strategy: AssignmentStrategy,
) -> Result<Duration> {
    let broker = Spoold::start(bin, "[groups]\nmin_session_timeout_ms = 100\n")?;
    let admin = Client::connect(broker.addr.as_str()).await?;
    admin
        .create_topic("rb", PARTITIONS, &TopicSettings::default())
        .await?;
    let (report_tx, mut reports) = mpsc::unbounded_channel::<(usize, BTreeSet<TopicPartition>)>();
    let mut stops = Vec::new();
    for i in 0..MEMBERS {
        let client = Client::connect(broker.addr.as_str()).await?;
        let mut config = GroupConfig::new("bench", ["rb"])
            .strategy(strategy)
            .session_timeout(SESSION);
        if scenario == Scenario::StaticCrash {
            config = config.instance_id(format!("member-{i}"));
        }
        let (stop_tx, mut stop_rx) = oneshot::channel::<Stop>();
        stops.push(stop_tx);
        let report = report_tx.clone();
        tokio::spawn(async move {
            let mut gc = GroupConsumer::join(&client, config).await.expect("join");
            let _ = report.send((i, gc.assignment().into_iter().collect()));
            loop {
                tokio::select! {
                    r = gc.wait_membership() => {
                        r.expect("membership");
                        let _ = report.send((i, gc.assignment().into_iter().collect()));
                    }
                    stop = &mut stop_rx => {
                        match stop {
                            Ok(Stop::Leave) => gc.leave().await.expect("leave"),
                            Ok(Stop::Crash) | Err(_) => drop(gc),
                        }
                        return;
                    }
                }
            }
        });
    }
    let mut owned: Vec<BTreeSet<TopicPartition>> = vec![BTreeSet::new(); MEMBERS];
    let covered = |owned: &[BTreeSet<TopicPartition>], skip: Option<usize>| {
        let mut all = BTreeSet::new();
        for (i, o) in owned.iter().enumerate() {
            if Some(i) != skip {
                all.extend(o.iter().cloned());
            }
        }
        all.len() == PARTITIONS as usize
    };
    // Wait for the stable 8 x 8 layout.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if covered(&owned, None) && owned.iter().all(|o| o.len() == 8) {
            let d = admin.describe_group("bench").await?;
            if d.state == GroupState::Stable {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the group never became stable: {owned:?}");
        }
        if let Ok(Some((i, a))) =
            tokio::time::timeout(Duration::from_millis(20), reports.recv()).await
        {
            owned[i] = a;
        }
    }
    let t0 = Instant::now();
    let gone = 0;
    let stop = match scenario {
        Scenario::Leave => Stop::Leave,
        Scenario::Crash | Scenario::StaticCrash => Stop::Crash,
    };
    let _ = stops.remove(gone).send(stop);
    owned[gone].clear();
    while !covered(&owned, Some(gone)) {
        match tokio::time::timeout(Duration::from_secs(30), reports.recv()).await {
            Ok(Some((i, a))) if i != gone => owned[i] = a,
            Ok(Some(_)) => {}
            _ => bail!("the others never covered every partition: {owned:?}"),
        }
    }
    let took = t0.elapsed();
    drop(stops);
    Ok(took)
}

fn stats(v: &mut [Duration]) -> (Duration, Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = std::env::var("SPOOL_BENCH_QUICK").is_ok_and(|v| v == "1")
        || !args.iter().any(|a| a == "--bench");
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 7 });
    let bin = match args.iter().position(|a| a == "--spoold") {
        Some(i) => PathBuf::from(args.get(i + 1).context("--spoold PATH")?),
        None => spool_benches::spoold::build()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let scenarios: &[Scenario] = if quick {
        &[Scenario::Leave]
    } else {
        &[Scenario::Leave, Scenario::Crash, Scenario::StaticCrash]
    };
    let strategies: &[AssignmentStrategy] = if quick {
        &[AssignmentStrategy::Sticky]
    } else {
        &[AssignmentStrategy::Sticky, AssignmentStrategy::Range]
    };
    println!(
        "== rebalance: {MEMBERS} members, {PARTITIONS} partitions, {reps} reps, session {SESSION:?}, spoold {}",
        bin.display()
    );
    println!("| scenario | strategy | detection | median | min | max | target |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut failed = false;
    for &scenario in scenarios {
        for &strategy in strategies {
            let mut samples = Vec::new();
            for _ in 0..reps {
                let t = rt.block_on(run_once(&bin, scenario, strategy))?;
                eprintln!("{scenario:?} {strategy:?}: {t:?}");
                samples.push(t);
            }
            let detection = if scenario == Scenario::StaticCrash {
                SESSION
            } else {
                Duration::ZERO
            };
            let (median, min, max) = stats(&mut samples);
            let ok = median < detection + Duration::from_secs(1);
            failed |= !ok;
            println!(
                "| {scenario:?} | {strategy:?} | {detection:?} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
                median.as_secs_f64() * 1e3,
                min.as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3,
                if ok {
                    "pass (< detection + 1 s)"
                } else {
                    "FAIL"
                }
            );
        }
    }
    if failed {
        bail!("a median missed the target");
    }
    Ok(())
}
