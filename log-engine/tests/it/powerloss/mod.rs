//! Seeded power-cut loops: the engine runs on the simulated disk (`spool_io::sim::SimFs`), a
//! random workload is cut at a random operation, the disk comes back as a power cut leaves it
//! (unsynced data lost, torn at a sector, or reordered; undurable directory entries gone),
//! sometimes with one bit flipped in synced data, and the reopened log is checked against a
//! model of what the engine acknowledged (`check.rs`).
//!
//! Every run is a function of its seed; a failure prints the seed and the command that
//! replays it (`SPOOL_POWERLOSS_SEED=<seed>`). `SPOOL_POWERLOSS_SEEDS=<n>` runs a long loop.
//! Negative controls (a sync the engine makes is skipped by the disk) must be caught.

mod check;
mod model;
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use spool_log_engine::io::sim::{CutModel, Effect, Fault, OpKind, SimFs, SimRng};
use spool_log_engine::{Error, Log, LogOptions};

use model::{Life, Model, Topic};
use workload::{ManualClock, Work};

/// The log's root on the simulated disk.
pub(crate) const ROOT: &str = "/spool";

/// How a seed runs.
#[derive(Clone)]
pub(crate) struct Plan {
    /// Cuts per seed (each followed by a restart and a check).
    pub(crate) epochs: u32,
    /// Workload steps per epoch at most.
    pub(crate) steps: u32,
    /// The cut falls on one of the next `window` mutating operations of an epoch.
    pub(crate) window: u64,
    /// Chance per epoch of one flipped bit in synced data before the restart.
    pub(crate) flip: f64,
    /// Chance per epoch of an injected I/O error (EIO) or a full disk (ENOSPC).
    pub(crate) fault: f64,
    /// Chance per epoch that the first reopen itself meets an I/O error.
    pub(crate) open_fault: f64,
    /// Skipped syncs (negative controls), in force all the time.
    pub(crate) controls: Vec<fn() -> Fault>,
}

impl Plan {
    pub(crate) fn standard() -> Plan {
        Plan {
            epochs: 4,
            steps: 60,
            window: 200,
            flip: 0.15,
            fault: 0.2,
            open_fault: 0.1,
            controls: Vec::new(),
        }
    }
}

/// What a seed covered.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) cuts: u64,
    /// Cuts by the kind of operation they fell on (`None`: between operations).
    pub(crate) cut_kinds: BTreeMap<Option<OpKind>, u64>,
    /// Cuts by the operation and file they fell before (`CutPoint::class`).
    pub(crate) cut_files: BTreeMap<String, u64>,
    pub(crate) ops: u64,
    pub(crate) flips: u64,
    /// Flips that the engine reported (open refused, read refused, tail cut and kept).
    pub(crate) flips_reported: u64,
    pub(crate) faults: u64,
    pub(crate) acked_checked: u64,
    pub(crate) torn_tails_cut: u64,
}

impl Stats {
    pub(crate) fn add(&mut self, o: &Stats) {
        self.cuts += o.cuts;
        for (k, v) in &o.cut_kinds {
            *self.cut_kinds.entry(*k).or_default() += v;
        }
        for (k, v) in &o.cut_files {
            *self.cut_files.entry(k.clone()).or_default() += v;
        }
        self.ops += o.ops;
        self.flips += o.flips;
        self.flips_reported += o.flips_reported;
        self.faults += o.faults;
        self.acked_checked += o.acked_checked;
        self.torn_tails_cut += o.torn_tails_cut;
    }
}

fn open(sim: &SimFs, clock: &Arc<ManualClock>) -> spool_log_engine::Result<Log> {
    Log::open(
        ROOT,
        LogOptions {
            background_maintenance: false,
            clock: clock.clone(),
            fs: sim.fs(),
            // Zeroing ahead of the writers (`fsync = always` topics), run by the workload's
            // maintenance steps: cuts fall inside it too.
            zero_ahead_bytes: 8 << 10,
            ..LogOptions::default()
        },
    )
}

/// One I/O error or a full disk, somewhere in the coming operations.
fn random_fault(sim: &SimFs, rng: &mut SimRng) {
    let n = rng.below(30);
    let eio = Effect::Fail(libc::EIO);
    let fault = match rng.below(5) {
        0 => Fault::when(|k, _| k == OpKind::SyncData, eio),
        1 => Fault::when(|k, _| k == OpKind::Write, eio),
        2 => Fault::when(|k, _| k == OpKind::SyncDir, eio),
        3 => Fault::when(|k, _| matches!(k, OpKind::Rename | OpKind::Create), eio),
        _ => {
            sim.set_capacity(Some(sim.used() + rng.range(0, 20_000)));
            return;
        }
    };
    sim.inject(fault.after(n).times(1));
}

/// The file one bit of which a flip damages: any synced file but the lock and the kept torn
/// tails, which nothing reads.
fn flip_target(sim: &SimFs, rng: &mut SimRng) -> Option<(PathBuf, u64)> {
    let files: Vec<(PathBuf, u64)> = sim
        .durable_files(Path::new(ROOT))
        .into_iter()
        .filter(|(p, len)| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            *len > 0 && name.is_some_and(|n| n != ".lock" && !n.contains(".torn-"))
        })
        .collect();
    if files.is_empty() {
        return None;
    }
    let (path, len) = rng.pick(&files).clone();
    Some((path, rng.below(len)))
}

/// The kept torn tails (`*.torn-<position>`) on the durable disk.
fn torn_files(sim: &SimFs) -> std::collections::BTreeSet<PathBuf> {
    sim.durable_files(Path::new(ROOT))
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect()
}

/// Runs one seed. `Err` describes the first violated invariant.
pub(crate) fn run_seed(seed: u64, plan: &Plan) -> Result<Stats, String> {
    let sim = SimFs::new();
    let mut rng = SimRng::new(seed);
    let clock = Arc::new(ManualClock(AtomicI64::new(1_700_000_000_000)));
    let mut model = Model::default();
    let mut stats = Stats::default();
    let install_controls = |sim: &SimFs| {
        for c in &plan.controls {
            sim.inject(c());
        }
    };
    install_controls(&sim);
    let mut log = open(&sim, &clock).map_err(|e| format!("first open: {e}"))?;
    for i in 0..2 {
        let cfg = workload::random_config(&mut rng);
        let name = format!("base{i}");
        log.create_topic(&name, cfg.clone())
            .map_err(|e| format!("creating {name}: {e}"))?;
        model.topics.insert(name, Topic::new(cfg, Life::Live));
    }
    for epoch in 0..plan.epochs {
        let start_ops = sim.ops();
        sim.cut_before(start_ops + rng.range(1, plan.window));
        if rng.chance(plan.fault) {
            random_fault(&sim, &mut rng);
            stats.faults += 1;
        }
        for _ in 0..plan.steps {
            if sim.is_down() {
                break;
            }
            Work {
                log: &log,
                model: &mut model,
                rng: &mut rng,
                clock: &clock,
            }
            .step();
            if let Some(v) = model.violation.take() {
                return Err(format!("epoch {epoch}, during the workload: {v}"));
            }
        }
        sim.cut();
        let point = sim.cut_point().expect("cut");
        if workload::tracing() {
            eprintln!("--- epoch {epoch}: cut at {point:?}");
        }
        stats.cuts += 1;
        *stats.cut_kinds.entry(point.kind).or_default() += 1;
        *stats.cut_files.entry(point.class()).or_default() += 1;
        stats.ops += sim.ops() - start_ops;
        drop(log);
        let cut_model = CutModel::random(&mut rng);
        sim.restart(&cut_model, &mut rng);
        sim.set_capacity(None);
        install_controls(&sim);
        let torn_before = torn_files(&sim);
        let flipped = if rng.chance(plan.flip) {
            flip_target(&sim, &mut rng).map(|(path, pos)| {
                let bit = rng.below(8) as u8;
                sim.flip_bit(&path, pos, bit).expect("flip");
                stats.flips += 1;
                (path, pos, bit)
            })
        } else {
            None
        };
        let ctx = |what: String| {
            format!(
                "epoch {epoch}, cut before {:?} of {} (op #{}), {cut_model:?}{}: {what}\nrecent operations:\n  {}",
                point.kind,
                point.path.display(),
                point.op,
                flipped
                    .as_ref()
                    .map(|(p, pos, bit)| format!(
                        ", bit {bit} of byte {pos} of {} flipped",
                        p.display()
                    ))
                    .unwrap_or_default(),
                sim.recent_ops().join("\n  ")
            )
        };
        if rng.chance(plan.open_fault) {
            // Recovery itself meets an I/O error: it must leave the disk so that the next
            // open still finds everything.
            sim.inject(
                Fault::when(|k, _| k.mutates(), Effect::Fail(libc::EIO))
                    .after(rng.below(8))
                    .times(1),
            );
            if open(&sim, &clock).is_err() {
                sim.cut();
                sim.restart(&CutModel::random(&mut rng), &mut rng);
                install_controls(&sim);
            } else {
                sim.clear_faults();
                install_controls(&sim);
            }
        }
        log = match open(&sim, &clock) {
            Ok(l) => l,
            Err(e) => {
                return match (&flipped, &e) {
                    (Some((p, _, _)), Error::Corruption { path, .. } | Error::Io { path, .. })
                        if check::same_partition(p, path) =>
                    {
                        stats.flips_reported += 1;
                        Ok(stats)
                    }
                    _ => Err(ctx(format!("reopening failed: {e}"))),
                };
            }
        };
        if workload::tracing() {
            eprintln!("--- reopened: {:?}", log.recovery_reports());
        }
        let flip_path = flipped.as_ref().map(|f| f.0.as_path());
        // Tails cut by this epoch's opens, the failed one included: an open that cut a tail
        // (keeping the bytes, with a warning) and then failed leaves the cut to the next open,
        // whose report then says nothing of it.
        let torn_new: Vec<PathBuf> = torn_files(&sim).difference(&torn_before).cloned().collect();
        let outcome =
            check::check(&log, &mut model, flip_path, &torn_new, &mut stats).map_err(&ctx)?;
        if flipped.is_some() {
            if outcome.flip_reported {
                stats.flips_reported += 1;
            }
            // A damaged log is not worth running on; the check above was the point.
            return Ok(stats);
        }
        check::repair(&log, &mut model).map_err(&ctx)?;
        check::check(&log, &mut model, None, &[], &mut stats)
            .map_err(|e| ctx(format!("after the repairs: {e}")))?;
    }
    Ok(stats)
}

/// Runs `seeds` (printing a replay line for the first failure); returns the totals.
pub(crate) fn run_many(
    seeds: impl IntoIterator<Item = u64>,
    plan: &Plan,
) -> Result<Stats, (u64, String)> {
    let mut total = Stats::default();
    for seed in seeds {
        match run_seed(seed, plan) {
            Ok(s) => total.add(&s),
            Err(e) => return Err((seed, e)),
        }
    }
    Ok(total)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The seeds to run: `SPOOL_POWERLOSS_SEED` alone, or `SPOOL_POWERLOSS_SEEDS` from
/// `SPOOL_POWERLOSS_FIRST` (default 0), or `ci` of them.
fn seeds(ci: u64) -> std::ops::Range<u64> {
    if let Some(s) = env_u64("SPOOL_POWERLOSS_SEED") {
        return s..s + 1;
    }
    let first = env_u64("SPOOL_POWERLOSS_FIRST").unwrap_or(0);
    first..first + env_u64("SPOOL_POWERLOSS_SEEDS").unwrap_or(ci)
}

#[test]
fn power_cuts_lose_nothing_acknowledged() {
    let plan = Plan::standard();
    let started = std::time::Instant::now();
    match run_many(seeds(2000), &plan) {
        Ok(s) => {
            let mut files: Vec<_> = s.cut_files.iter().collect();
            files.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            for (class, n) in files {
                eprintln!("  cut before {class}: {n}");
            }
            eprintln!(
                "power-cut loop: {} seeds, {} cuts over {} operations (cut on: {:?}), {} acknowledged records checked, {} torn tails cut, {} faults, {} bit flips ({} reported) in {:.1?}",
                seeds(2000).count(),
                s.cuts,
                s.ops,
                s.cut_kinds,
                s.acked_checked,
                s.torn_tails_cut,
                s.faults,
                s.flips,
                s.flips_reported,
                started.elapsed()
            )
        }
        Err((seed, e)) => panic!(
            "seed {seed} violated an invariant:\n{e}\nreplay: SPOOL_POWERLOSS_SEED={seed} cargo test -p spool-log-engine --test it power_cuts_lose_nothing_acknowledged -- --nocapture"
        ),
    }
}

/// Seeds that once failed, kept whatever range the loop runs.
/// - 11065 (found by the 200,000-seed release run): a bit flip past the recovery point is cut
///   as a torn tail by an open that then fails (EIO on the truncation's fdatasync); the next
///   open finds the file already short and reports nothing. The bytes were kept in a `.torn-`
///   file and the failed open warned: the check now counts that as reported.
/// - 89357 (same run): an idempotent resend after the restart is answered as a duplicate of
///   offsets that retention had deleted meanwhile (the producer state outlives the records,
///   as in Kafka); the model now keeps the records retention removed to compare with.
#[test]
fn regression_seeds() {
    let plan = Plan::standard();
    for seed in [11065, 89357] {
        if let Err(e) = run_seed(seed, &plan) {
            panic!("regression seed {seed}:\n{e}");
        }
    }
}

#[test]
fn a_seed_replays_exactly() {
    let plan = Plan::standard();
    let a = run_seed(7, &plan).expect("seed 7");
    let b = run_seed(7, &plan).expect("seed 7");
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert!(a.cuts > 0 && a.ops > 0);
}

/// A sync the engine makes, removed (the disk skips it): each must make the loop fail, or the
/// loop could not see that sync missing (reliability-anchors §5 #3).
/// A named skipped sync.
pub(crate) type Control = (&'static str, fn() -> Fault);

pub(crate) const CONTROLS: &[Control] = &[
    (
        "fdatasync of segment files (append, roll, recovery)",
        || {
            Fault::when(
                |k, p| k == OpKind::SyncData && p.extension().is_some_and(|e| e == "log"),
                Effect::Skip,
            )
        },
    ),
    (
        "fsync of partition directories (roll, retention, compaction swaps)",
        || {
            Fault::when(
                |k, p| {
                    k == OpKind::SyncDir
                        && p.file_name()
                            .is_some_and(|n| n.to_string_lossy().parse::<u32>().is_ok())
                },
                Effect::Skip,
            )
        },
    ),
    (
        "fsync of the log's root directory (topic create and delete)",
        || {
            Fault::when(
                |k, p| k == OpKind::SyncDir && p == Path::new(ROOT),
                Effect::Skip,
            )
        },
    ),
    (
        "fsync of topic directories (partition directories, topic.json)",
        || {
            Fault::when(
                |k, p| k == OpKind::SyncDir && p.parent() == Some(Path::new(ROOT)),
                Effect::Skip,
            )
        },
    ),
    ("fdatasync of topic.json.tmp before its rename", || {
        Fault::on(OpKind::SyncData, "topic.json.tmp", Effect::Skip)
    }),
    (
        "fdatasync of a cleaned segment before the swap commits",
        || Fault::on(OpKind::SyncData, ".log.cleaned", Effect::Skip),
    ),
];

/// The first seed below `limit` that catches a control, with what it found.
pub(crate) fn catch(control: fn() -> Fault, limit: u64) -> Option<(u64, String)> {
    let plan = Plan {
        flip: 0.0,
        fault: 0.0,
        open_fault: 0.0,
        controls: vec![control],
        ..Plan::standard()
    };
    (0..limit).find_map(|seed| run_seed(seed, &plan).err().map(|e| (seed, e)))
}

#[test]
fn negative_controls_are_caught() {
    for (name, control) in CONTROLS {
        match catch(*control, 2000) {
            Some((seed, e)) => eprintln!(
                "control \"{name}\": caught by seed {seed}: {}",
                e.lines().next().unwrap_or_default()
            ),
            None => panic!(
                "control \"{name}\" was not caught by 2000 seeds: the loop cannot see that sync missing"
            ),
        }
    }
}
